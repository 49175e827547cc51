//! ferrinfer: attention kernels for LLM inference serving, with attention variants written in Rust.
//!
//! A variant is a parameter struct and an `impl` block of hooks, lowered to CUDA at build time,
//! registered, JIT-compiled into the kernel templates on first use, and run on the GPU, or on the
//! CPU reference backend with the very same Rust source.
//!
//! ```
//! use ferrinfer::prelude::*;
//!
//! #[derive(AttentionParams)]
//! pub struct SoftCap {
//!     pub cap: f32,
//! }
//!
//! #[attention_variant]
//! impl SoftCap {
//!     fn logits(&self, s: f32, at: Pos) -> f32 {
//!         self.cap * (s / self.cap).tanh()
//!     }
//! }
//!
//! assert!(ferrinfer::variants().any(|v| v.name == "SoftCap"));
//! ```

// The macros name this crate as `::ferrinfer`, also from inside it (for the built-in variants).
extern crate self as ferrinfer;

pub mod variants;

pub use ferrinfer_macros::{AttentionParams, attention_variant};
pub use ferrinfer_runtime::*;

/// Everything a variant definition and a typical caller need.
pub mod prelude {
    pub use crate::{AttentionParams, attention_variant};
    pub use ferrinfer_runtime::prelude::*;
}

/// Every variant linked into this program (built-in ones and those of any crate that uses the macro).
pub fn variants() -> impl Iterator<Item = &'static VariantSpec> {
    ferrinfer_runtime::variant::registered()
}

/// What the macros expand to refers to these paths. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use ferrinfer_runtime::variant::dsl;
    pub use ferrinfer_runtime::variant::params::{
        AttentionParams, Extent, ParamField, ParamType, ParamWriter,
    };
    pub use ferrinfer_runtime::variant::{Hooks, Pos, Variant, VariantEntry, VariantSpec};
    pub use inventory;
}

#[cfg(feature = "candle")]
pub mod candle;
