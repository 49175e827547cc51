//! `#[attention_variant]` and `#[derive(AttentionParams)]`: attention variants written in Rust and
//! lowered to CUDA at build time.
//!
//! The attribute runs in four steps, one module each: [`parse`] reads the impl block into a
//! `VariantDef`, [`check`] enforces the DSL (signatures and the accepted Rust subset), [`lower`]
//! writes the CUDA `struct Variant`, [`emit`] writes the Rust. Every problem is collected in
//! [`errors::Errors`] and reported in one compile, with its span.
//!
//! Use these through the facade crate `ferrinfer` (its docs have the examples): the expansion
//! names `::ferrinfer::__private`.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;

mod check;
mod emit;
mod errors;
mod lower;
#[cfg(test)]
mod lower_tests;
mod params;
mod parse;
mod vocab;

/// Turns an inherent `impl` block of hooks into an attention variant: keeps the impl, implements
/// `ferrinfer::Variant` for the type (forwarding to the hooks), lowers the hooks to CUDA and
/// registers the variant. The type also needs `#[derive(AttentionParams)]`.
///
/// Hooks (each optional): `query`, `key`, `logits`, `mask`, `output`, `sink`, and
/// `const SOFTMAX: bool`. See the `ferrinfer` crate for their signatures and the accepted Rust.
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
    check::variant(&def, &mut errors);
    errors.finish()?;
    let cuda = lower::variant(&def);
    Ok(emit::variant(&def, &cuda))
}

/// Declares a variant's parameters: fields of type `f32`, `i32`, `u32`, `bool`, or
/// `Array<f32 | i32 | u32>`, in a struct with named fields (or a unit struct). Implements
/// `ferrinfer::AttentionParams`: the field layout and the packing of values for the device.
#[proc_macro_derive(AttentionParams)]
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
