//! Kernels beside attention, one file per op: the arguments, the translation unit and the launch
//! geometry of each.

pub mod merge_states;
