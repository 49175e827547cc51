//! Emission: the original impl block, the `Variant` impl that forwards to it, the static
//! `VariantSpec` with the lowered CUDA, and the registration with `inventory`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

use crate::parse::VariantDef;
use crate::vocab::{self, SigTy};

pub fn variant(def: &VariantDef<'_>, cuda: &str) -> TokenStream {
    let p = quote!(::ferrinfer::__private);
    let item = def.item;
    let ty = def.self_ty();
    let name = &def.name;
    let flags = vocab::HOOKS.iter().map(|sig| {
        let field = format_ident!("{}", sig.name);
        let on = def.hook(sig.name).is_some();
        quote!(#field: #on)
    });
    let forwards = vocab::HOOKS
        .iter()
        .filter(|sig| def.hook(sig.name).is_some())
        .map(|sig| {
            let hook = format_ident!("{}", sig.name);
            // Mixed-site hygiene: a user's `const x` in scope cannot turn these into patterns.
            let args: Vec<_> = sig
                .args
                .iter()
                .map(|(_, n)| format_ident!("{n}", span = Span::mixed_site()))
                .collect();
            let types = sig.args.iter().map(|(t, _)| rust_type(*t));
            let ret = rust_type(sig.ret);
            quote! {
                fn #hook(&self, #(#args: #types),*) -> #ret {
                    <#ty>::#hook(self, #(#args),*)
                }
            }
        });
    // Reading the constant (rather than copying the literal) also keeps it from being "unused".
    let softmax = match def.softmax {
        Some(_) => quote!(<#ty>::SOFTMAX),
        None => quote!(true),
    };
    // Spanned on the type, so a missing `#[derive(AttentionParams)]` is reported at `impl Name`.
    let variant_impl = quote_spanned! {ty.span()=>
        impl #p::Variant for #ty {
            const SPEC: &'static #p::VariantSpec = &#p::VariantSpec {
                name: #name,
                module_path: ::core::module_path!(),
                hooks: #p::Hooks { #(#flags),* },
                softmax: #softmax,
                params: <Self as #p::AttentionParams>::FIELDS,
                cuda: #cuda,
            };
            #(#forwards)*
        }
    };
    quote! {
        #item
        #variant_impl
        #p::inventory::submit! {
            #p::VariantEntry(<#ty as #p::Variant>::SPEC)
        }
    }
}

fn rust_type(t: SigTy) -> TokenStream {
    match t {
        SigTy::F32 => quote!(::core::primitive::f32),
        SigTy::U32 => quote!(::core::primitive::u32),
        SigTy::Bool => quote!(::core::primitive::bool),
        SigTy::Pos => quote!(::ferrinfer::__private::Pos),
    }
}
