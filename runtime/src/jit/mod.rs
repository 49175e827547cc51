//! The JIT: find CUDA, compile a translation unit with NVRTC, cache the result in memory and on disk.

pub mod toolkit;
