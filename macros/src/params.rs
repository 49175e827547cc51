//! `#[derive(AttentionParams)]`: the parameter layout (`FIELDS`) and the packer (`pack`).

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ext::IdentExt;
use syn::{Data, DeriveInput, Fields, GenericArgument, PathArguments, Type};

use crate::errors::Errors;
use crate::vocab;

const TYPE_HELP: &str = "parameter type not allowed: use f32, i32, u32, bool or Array<f32|i32|u32>";

/// One accepted field: its Rust name and the `ParamType` variant / `ParamWriter` method it uses.
struct Field<'a> {
    ident: &'a syn::Ident,
    name: String,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Scalar(&'static str),
    Array(&'static str),
}

impl Kind {
    fn param_type(self) -> &'static str {
        match self {
            Kind::Scalar("f32") => "F32",
            Kind::Scalar("i32") => "I32",
            Kind::Scalar("u32") => "U32",
            Kind::Scalar(_) => "Bool",
            Kind::Array("f32") => "ArrayF32",
            Kind::Array("i32") => "ArrayI32",
            Kind::Array(_) => "ArrayU32",
        }
    }
}

/// Expand the derive, or return every problem found.
pub fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    if !input.generics.params.is_empty() || input.generics.where_clause.is_some() {
        errors.at(
            &input.generics,
            "a parameter struct cannot be generic: its layout is fixed at build time",
        );
    }
    let fields = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(named) => named.named.iter().collect(),
            Fields::Unit => Vec::new(),
            Fields::Unnamed(_) => {
                errors.at(
                    &s.fields,
                    "tuple structs cannot be parameters: use named fields (`struct P { cap: f32 }`) or a unit struct",
                );
                Vec::new()
            }
        },
        Data::Enum(e) => {
            errors.at(
                e.enum_token,
                "AttentionParams needs a struct with named fields or a unit struct, not an enum",
            );
            Vec::new()
        }
        Data::Union(u) => {
            errors.at(
                u.union_token,
                "AttentionParams needs a struct with named fields or a unit struct, not a union",
            );
            Vec::new()
        }
    };
    let accepted = fields_of(&fields, &mut errors);
    errors.finish()?;
    Ok(emit(&input.ident, &accepted))
}

fn fields_of<'a>(fields: &[&'a syn::Field], errors: &mut Errors) -> Vec<Field<'a>> {
    let mut out = Vec::new();
    for f in fields {
        let Some(ident) = &f.ident else { continue };
        let name = ident.unraw().to_string();
        if vocab::is_reserved_in_cuda(&name) {
            errors.at(
                ident,
                format!("field name `{name}` is reserved in the generated CUDA: rename the field"),
            );
        }
        match kind_of(&f.ty) {
            Some(kind) => out.push(Field { ident, name, kind }),
            None => errors.at(&f.ty, TYPE_HELP),
        }
    }
    // An array `a` also becomes a CUDA member `a_len`.
    for a in &out {
        if let Kind::Array(_) = a.kind {
            let len = format!("{}_len", a.name);
            if let Some(clash) = out.iter().find(|f| f.name == len) {
                errors.at(
                    clash.ident,
                    format!("field `{len}` clashes with the length of array `{}` on the device: rename it", a.name),
                );
            }
        }
    }
    out
}

fn scalar_name(ty: &Type) -> Option<&'static str> {
    let Type::Path(p) = ty else { return None };
    if p.qself.is_some() {
        return None;
    }
    let ident = p.path.get_ident()?;
    ["f32", "i32", "u32", "bool"]
        .into_iter()
        .find(|s| ident == s)
}

fn kind_of(ty: &Type) -> Option<Kind> {
    if let Some(s) = scalar_name(ty) {
        return Some(Kind::Scalar(s));
    }
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if p.qself.is_some() || last.ident != "Array" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(elem)] => match scalar_name(elem)? {
            "bool" => None,
            s => Some(Kind::Array(s)),
        },
        _ => None,
    }
}

fn emit(name: &syn::Ident, fields: &[Field<'_>]) -> TokenStream {
    let p = quote!(::ferrinfer::__private);
    let entries = fields.iter().map(|f| {
        let n = &f.name;
        let ty = format_ident!("{}", f.kind.param_type());
        quote!(#p::ParamField { name: #n, ty: #p::ParamType::#ty })
    });
    let writes = fields.iter().map(|f| {
        let ident = f.ident;
        match f.kind {
            Kind::Scalar(s) => {
                let method = format_ident!("{s}");
                quote!(w.#method(self.#ident);)
            }
            Kind::Array(_) => quote!(w.array(&self.#ident);),
        }
    });
    quote! {
        impl #p::AttentionParams for #name {
            const FIELDS: &'static [#p::ParamField] = &[#(#entries),*];
            fn pack(&self, w: &mut #p::ParamWriter<'_>) {
                let _ = &w;
                #(#writes)*
            }
        }
    }
}
