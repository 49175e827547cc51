//! Math that hooks may call where speed matters more than the last bits: each function names the
//! hardware approximation the GPU uses and its error bound. The CPU reference computes the exact
//! function, so GPU and CPU agree to within that bound.

/// Approximate math on `f32`, for attention-variant hooks.
///
/// ```
/// use ferrinfer_runtime::FastMath;
///
/// assert_eq!(0.5f32.tanh_approx(), 0.5f32.tanh());
/// ```
pub trait FastMath {
    /// `tanh`, as the GPU's `tanh.approx.f32` (one special-function instruction; relative error
    /// at most 2^-10.987, about 5e-4) computes it. `tanh` (`tanhf`) is exact to 2 ulp but costs
    /// about ten times as much; FlashAttention and FlashInfer cap logits with the approximation.
    fn tanh_approx(self) -> f32;
}

impl FastMath for f32 {
    fn tanh_approx(self) -> f32 {
        self.tanh()
    }
}
