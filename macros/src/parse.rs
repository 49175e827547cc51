//! Reads the `impl` block into a [`VariantDef`]: which hooks it defines and the `SOFTMAX` switch.
//! Rules about a single item's shape live here; rules about signatures and bodies in `check`.

use proc_macro2::TokenStream;
use syn::ext::IdentExt;
use syn::{Expr, ImplItem, ImplItemFn, ItemImpl, Lit, Pat, Type};

use crate::errors::Errors;
use crate::vocab::{self, HookSig};

/// A variant as the macro understands it; borrowed from the impl block.
pub struct VariantDef<'a> {
    pub item: &'a ItemImpl,
    /// The struct name, e.g. `SoftCap`.
    pub name: String,
    /// The defined hooks, in source order.
    pub hooks: Vec<Hook<'a>>,
    /// The literal of `const SOFTMAX: bool = ...;`, when present and well-formed.
    pub softmax: Option<&'a syn::LitBool>,
}

impl VariantDef<'_> {
    pub fn self_ty(&self) -> &Type {
        &self.item.self_ty
    }
    pub fn hook(&self, name: &str) -> Option<&Hook<'_>> {
        self.hooks.iter().find(|h| h.sig.name == name)
    }
    /// Whether the variant normalises with softmax (the default).
    pub fn softmax(&self) -> bool {
        self.softmax.is_none_or(|b| b.value)
    }
}

/// One defined hook: the method and the signature it must have.
pub struct Hook<'a> {
    pub sig: &'static HookSig,
    pub func: &'a ImplItemFn,
}

/// The hook's argument names (after `&self`); `None` for `_` or a pattern `check` rejects.
pub fn arg_names(func: &ImplItemFn) -> Vec<Option<String>> {
    func.sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            syn::FnArg::Typed(t) => Some(match &*t.pat {
                Pat::Ident(p) => Some(p.ident.unraw().to_string()),
                _ => None,
            }),
            syn::FnArg::Receiver(_) => None,
        })
        .collect()
}

/// Read the impl block, reporting every item the DSL does not allow.
pub fn variant<'a>(attr: TokenStream, item: &'a ItemImpl, errors: &mut Errors) -> VariantDef<'a> {
    if !attr.is_empty() {
        errors.at(attr, "#[attention_variant] takes no arguments");
    }
    let mut def = VariantDef {
        item,
        name: String::new(),
        hooks: Vec::new(),
        softmax: None,
    };
    if let Some((_, path, for_token)) = &item.trait_ {
        // Its items are the trait's, not hooks: reporting each of them would only be noise.
        errors.at(
            quote::quote!(#path #for_token),
            "#[attention_variant] goes on an inherent impl (`impl MyVariant { ... }`), not a trait impl: it writes the `Variant` impl itself",
        );
        return def;
    }
    let generic = !item.generics.params.is_empty() || item.generics.where_clause.is_some();
    if generic {
        errors.at(&item.generics, GENERIC);
    }
    if let Some(u) = &item.unsafety {
        errors.at(u, "a variant impl cannot be `unsafe`");
    }
    def.name = type_name(&item.self_ty, !generic, errors);
    for it in &item.items {
        match it {
            ImplItem::Fn(f) => match vocab::hook(&f.sig.ident.unraw().to_string()) {
                Some(sig) => def.hooks.push(Hook { sig, func: f }),
                None => errors.at(
                    &f.sig.ident,
                    format!(
                        "unknown hook `{}`: a variant defines any of {} (and `const SOFTMAX: bool`)",
                        f.sig.ident,
                        vocab::hook_list()
                    ),
                ),
            },
            ImplItem::Const(c) if c.ident == "SOFTMAX" => def.softmax = softmax(c, errors),
            ImplItem::Const(c) => errors.at(
                &c.ident,
                format!(
                    "unknown constant `{}`: the only constant of a variant is `const SOFTMAX: bool`",
                    c.ident
                ),
            ),
            ImplItem::Macro(m) => errors.at(
                m,
                "macro invocations are not supported in a variant impl: write the hooks out",
            ),
            other => errors.at(
                other,
                format!(
                    "not allowed in a variant impl: define any of the hooks {} and `const SOFTMAX: bool`",
                    vocab::hook_list()
                ),
            ),
        }
    }
    def
}

const GENERIC: &str =
    "a variant impl cannot be generic: each variant is one concrete struct, lowered once";

/// The struct's name; `report_generic` is false when the impl's own generics were reported already.
fn type_name(ty: &Type, report_generic: bool, errors: &mut Errors) -> String {
    if let Type::Path(p) = ty
        && p.qself.is_none()
        && let Some(last) = p.path.segments.last()
    {
        if !last.arguments.is_empty() && report_generic {
            errors.at(&last.arguments, GENERIC);
        }
        return last.ident.unraw().to_string();
    }
    errors.at(
        ty,
        "#[attention_variant] needs the impl of a named struct (`impl MyVariant { ... }`)",
    );
    String::new()
}

const SOFTMAX_HELP: &str = "write `const SOFTMAX: bool = false;` (or `true`, the default)";

fn softmax<'a>(c: &'a syn::ImplItemConst, errors: &mut Errors) -> Option<&'a syn::LitBool> {
    let is_bool = match vocab::type_ref(&c.ty) {
        vocab::TypeRef::Known("bool", _) => true,
        vocab::TypeRef::Misspelled("bool") => {
            errors.at(&c.ty, vocab::spellings("bool"));
            false
        }
        _ => {
            errors.at(&c.ty, format!("SOFTMAX must be a bool: {SOFTMAX_HELP}"));
            false
        }
    };
    match &c.expr {
        Expr::Lit(l) => match &l.lit {
            Lit::Bool(b) => return is_bool.then_some(b),
            other => errors.at(
                other,
                format!("SOFTMAX must be a bool literal: {SOFTMAX_HELP}"),
            ),
        },
        other => errors.at(
            other,
            format!("SOFTMAX must be a bool literal: {SOFTMAX_HELP}"),
        ),
    }
    None
}
