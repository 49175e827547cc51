//! Emission: the original impl block, the `Variant` impl that forwards to it, the static
//! `VariantSpec` with the lowered CUDA, and the registration with `inventory`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;

use crate::parse::VariantDef;
use crate::vocab::{self, SigTy};

/// `rewrite`: give the hooks the DSL's numeric rules (off when rustc is going to reject them).
pub fn variant(def: &VariantDef<'_>, cuda: &str, rewrite: bool) -> TokenStream {
    let p = quote!(::ferrinfer::__private);
    let item = match rewrite {
        true => numeric(def, &p),
        false => def.item.clone(),
    };
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

/// The impl block with the arithmetic of every hook rewritten to `__private::dsl`, so the CPU
/// reference computes what the lowered CUDA computes (wrapping, masked shifts, defined division by
/// zero) and never panics on overflow in a debug build. Each call carries the operator's span, so
/// rustc's type errors still point at the user's operator.
fn numeric(def: &VariantDef<'_>, p: &TokenStream) -> syn::ItemImpl {
    let mut item = def.item.clone();
    for it in &mut item.items {
        if let syn::ImplItem::Fn(f) = it
            && def.hooks.iter().any(|h| h.func.sig.ident == f.sig.ident)
        {
            Numeric { p }.visit_block_mut(&mut f.block);
        }
    }
    item
}

struct Numeric<'p> {
    p: &'p TokenStream,
}

impl VisitMut for Numeric<'_> {
    fn visit_expr_mut(&mut self, e: &mut syn::Expr) {
        syn::visit_mut::visit_expr_mut(self, e);
        let p = self.p;
        let new: syn::Expr = match e {
            syn::Expr::Binary(b) => {
                use syn::BinOp as B;
                let (f, assign) = match b.op {
                    B::Add(_) => ("add", false),
                    B::Sub(_) => ("sub", false),
                    B::Mul(_) => ("mul", false),
                    B::Div(_) => ("div", false),
                    B::Rem(_) => ("rem", false),
                    B::Shl(_) => ("shl", false),
                    B::Shr(_) => ("shr", false),
                    B::AddAssign(_) => ("add", true),
                    B::SubAssign(_) => ("sub", true),
                    B::MulAssign(_) => ("mul", true),
                    B::DivAssign(_) => ("div", true),
                    B::RemAssign(_) => ("rem", true),
                    B::ShlAssign(_) => ("shl", true),
                    B::ShrAssign(_) => ("shr", true),
                    _ => return,
                };
                let f = format_ident!("{f}", span = b.op.span());
                let (l, r) = (unparen(&b.left), unparen(&b.right));
                let call = quote_spanned!(b.op.span()=> #p::dsl::#f(#l, #r));
                match assign {
                    true => syn::parse_quote!(#l = #call),
                    false => syn::parse_quote!(#call),
                }
            }
            // `-1` stays a literal: rustc folds it, so `-2147483648` is the valid i32::MIN.
            syn::Expr::Unary(u)
                if matches!(u.op, syn::UnOp::Neg(_)) && !matches!(&*u.expr, syn::Expr::Lit(_)) =>
            {
                let x = unparen(&u.expr);
                syn::parse_quote_spanned!(u.op.span()=> #p::dsl::neg(#x))
            }
            syn::Expr::MethodCall(m) if m.method == "abs" && m.args.is_empty() => {
                let x = unparen(&m.receiver);
                syn::parse_quote_spanned!(m.method.span()=> #p::dsl::abs(#x))
            }
            _ => return,
        };
        *e = new;
    }
}

/// An operand without its parentheses: as a function argument it needs none (and rustc's
/// `unused_parens` would point at the user's code).
fn unparen(e: &syn::Expr) -> &syn::Expr {
    match e {
        syn::Expr::Paren(p) => unparen(&p.expr),
        other => other,
    }
}
