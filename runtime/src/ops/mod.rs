//! Operations beside attention, one file per op: its checks, its CPU reference and its GPU launch
//! side by side.

pub mod cascade;
