//! The element types of Q, K, V and O.

use ferrinfer_kernels::DType;

/// Plain data that can live in a [`crate::device::backend::Buffer`] on any backend.
pub trait Pod:
    Copy
    + Send
    + Sync
    + Default
    + std::fmt::Debug
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
}

impl<T> Pod for T where
    T: Copy
        + Send
        + Sync
        + Default
        + std::fmt::Debug
        + cudarc::driver::DeviceRepr
        + cudarc::driver::ValidAsZeroBits
        + 'static
{
}

/// An element type the kernels accept: `half::f16` or `half::bf16`. Arithmetic is f32 throughout.
pub trait Element: Pod {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// Convert a slice to f32.
pub(crate) fn to_f32<T: Element>(xs: &[T]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}
