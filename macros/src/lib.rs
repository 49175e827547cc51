//! `#[attention_variant]` and `#[derive(AttentionParams)]`: attention variants written in Rust and
//! lowered to CUDA at build time.
//!
//! The attribute runs in four steps, one module each: `parse` reads the impl block into a
//! `VariantDef`, `check` enforces the DSL (signatures and the accepted Rust subset) and builds the
//! typed IR of each hook (`ir`), `lower` prints that IR as the CUDA `struct Variant` (with the
//! logits hook also split around its scales, found by `split`, for the prefill kernels to fold),
//! `emit` writes the Rust (the hooks' arithmetic rewritten to the DSL's numeric rules). Every
//! problem is collected in `errors::Errors` and reported in one compile, with its span.
//!
//! Use these through the facade crate `ferrinfer` (its docs have the examples): the expansion
//! names `::ferrinfer::__private`.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;

mod check;
#[cfg(test)]
mod diff_tests;
mod emit;
mod errors;
mod ir;
mod lower;
#[cfg(test)]
mod lower_tests;
mod params;
mod parse;
mod split;
mod tile;
mod vocab;

/// Turns an inherent `impl` block of hooks into an attention variant: keeps the impl, implements
/// `ferrinfer::Variant` for the type (forwarding to the hooks), lowers the hooks to CUDA and
/// registers the variant. The type also needs `#[derive(AttentionParams)]`.
///
/// Hooks (each optional): `query`, `key`, `logits`, `mask`, `output`, `sink`, and
/// `const SOFTMAX: bool`. See the `ferrinfer` crate for their signatures and the accepted Rust.
///
/// Types are inferred as rustc infers them (an unsuffixed `0` later assigned a `u32` is a `u32`),
/// and the CUDA is written from those types. A float literal whose type nothing decides would be
/// an `f64` in Rust: that is an error asking for `f32`.
///
/// Arithmetic has one meaning on the CPU and the GPU (the macro rewrites the hooks' operators to
/// `ferrinfer::variant::dsl`, and the CUDA calls its twin, `variant/numeric.cuh`): integer `+ - *`,
/// unary `-` and `abs` wrap; shifts take the amount modulo 32; `x / 0 == 0`, `x % 0 == x`,
/// `i32::MIN / -1 == i32::MIN`; float-to-integer `as` saturates and maps NaN to 0; `min`/`max`
/// are Rust's (NaN gives the other operand); f32 `+ - * /` are each rounded, never fused into a
/// multiply-add unless the hook asks for one with `a.mul_add(b, c)` (one rounding, `fmaf` on the
/// GPU: the same bits on both sides). No hook panics on overflow, in debug builds either.
///
/// Types may also be written in full: `core::primitive::f32` or `std::primitive::f32` (likewise
/// `i32`, `u32`, `bool`, and in constants, `core::primitive::f32::MAX`); `ferrinfer::Pos`,
/// `ferrinfer::prelude::Pos` or `ferrinfer::variant::Pos`; `&self` as `self: &Self`. A prefix may
/// start with `::`. Other paths ending in these names are refused (the macro cannot see where
/// they lead), with the accepted spellings in the error.
#[proc_macro_attribute]
pub fn attention_variant(attr: TokenStream, item: TokenStream) -> TokenStream {
    let original = TokenStream2::from(item.clone());
    let imp = match syn::parse::<syn::ItemImpl>(item) {
        Ok(imp) => imp,
        Err(_) => {
            let e = syn::Error::new_spanned(
                &original,
                "#[attention_variant] goes on an impl block of hooks: `impl MyVariant { fn logits(&self, s: f32, at: Pos) -> f32 { ... } }`",
            );
            return errors::with_item(e, original).into();
        }
    };
    match expand_variant(attr.into(), &imp) {
        Ok(out) => out.into(),
        Err(e) => errors::with_item(e, original).into(),
    }
}

fn expand_variant(attr: TokenStream2, imp: &syn::ItemImpl) -> syn::Result<TokenStream2> {
    let mut errors = errors::Errors::default();
    let def = parse::variant(attr, imp, &mut errors);
    let typed = check::variant(&def, &mut errors);
    errors.finish()?;
    let cuda = lower::variant(&def, &typed);
    // With a type conflict rustc rejects the hooks: it does so best on the code as written.
    Ok(emit::variant(&def, &cuda, typed.conflicts.is_empty()))
}

/// Declares a variant's parameters: fields of type `f32`, `i32`, `u32`, `bool`, or
/// `Array<f32 | i32 | u32>`, in a struct with named fields (or a unit struct); the scalars may be
/// written `core::primitive::f32` or `std::primitive::f32`, and `Array` as `ferrinfer::Array`,
/// `ferrinfer::prelude::Array` or `ferrinfer::variant::params::Array` (with or without a leading
/// `::`). Implements
/// `ferrinfer::AttentionParams`: the field layout and the packing of values for the device.
///
/// # `#[cover(...)]`: what an array must cover
///
/// A hook that indexes an array by head or request needs the array to be long enough for the
/// batch it runs on. State it on the field, and `run` (and the CPU reference) check it before
/// launching, with an error such as `Alibi.slopes has 8 elements but must cover num_qo_heads = 32`
/// instead of a trap in the CUDA context (or a panic on the CPU).
///
/// The attribute takes a product, joined by `*`, of:
///
/// | word | size in the batch | an index it makes safe |
/// |---|---|---|
/// | `batch` | number of requests | `at.batch` |
/// | `qo_heads` | `num_qo_heads` | `at.qo_head` |
/// | `kv_heads` | `num_kv_heads` | `at.kv_head` |
/// | `head_dim` | `head_dim` | element `i` of `query`, `key`, `output` |
/// | an integer, e.g. `16` | itself | any index below it |
///
/// The array must have at least that many elements (more is fine). A field without the attribute
/// has no requirement; the attribute on a scalar, an unknown word, or a zero is a compile error.
///
/// For example (the built-in `ferrinfer::variants::Alibi` is a tested one, with the error):
///
/// ```text
/// use ferrinfer::prelude::*;
///
/// #[derive(AttentionParams)]
/// pub struct Biased {
///     /// One bias per query head.
///     #[cover(qo_heads)]
///     pub bias: Array<f32>,
///     /// Eight scales per request, request-major.
///     #[cover(batch * 8)]
///     pub scale: Array<f32>,
/// }
///
/// #[attention_variant]
/// impl Biased {
///     fn logits(&self, s: f32, at: Pos) -> f32 {
///         s * self.scale[at.batch * 8 + at.qo_head % 8] + self.bias[at.qo_head]
///     }
/// }
/// ```
///
/// An index computed from an array's contents (the per-request bit offsets of
/// `ferrinfer::variants::CustomMask`) cannot be covered: on the CPU reference an out-of-range
/// index becomes an error when the hook runs; on the GPU it traps. Check such data where it is
/// built.
#[proc_macro_derive(AttentionParams, attributes(cover))]
pub fn derive_attention_params(item: TokenStream) -> TokenStream {
    let input = match syn::parse::<syn::DeriveInput>(item) {
        Ok(input) => input,
        Err(e) => return e.to_compile_error().into(),
    };
    match params::derive(&input) {
        Ok(out) => out.into(),
        Err(e) => e.to_compile_error().into(),
    }
}
