//! `#[derive(AttentionParams)]`: the parameter layout (`FIELDS`, with each array's `#[cover]`)
//! and the packer (`pack`).

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ext::IdentExt;
use syn::parse::ParseStream;
use syn::{Data, DeriveInput, Fields, GenericArgument, PathArguments, Token, Type};

use crate::errors::Errors;
use crate::vocab;

const TYPE_HELP: &str = "parameter type not allowed: use f32, i32, u32, bool or Array<f32|i32|u32>";

const COVER_HELP: &str = "write the extents an array must cover, joined by `*`: `batch`, `qo_heads`, \
     `kv_heads`, `head_dim` or an integer, e.g. `#[cover(qo_heads)]` or `#[cover(batch * qo_heads)]`";

/// One accepted field: its Rust name, the `ParamType` variant / `ParamWriter` method it uses, and
/// the `Extent` variants its `#[cover]` names (empty without one).
struct Field<'a> {
    ident: &'a syn::Ident,
    name: String,
    kind: Kind,
    cover: Vec<Extent>,
}

/// One factor of `#[cover(...)]`; mirrors the runtime's `Extent`.
#[derive(Clone, Copy)]
enum Extent {
    Word(&'static str),
    Fixed(u32),
}

/// The words of `#[cover]` and the `Extent` variants they name.
const EXTENTS: [(&str, &str); 4] = [
    ("batch", "Batch"),
    ("qo_heads", "QoHeads"),
    ("kv_heads", "KvHeads"),
    ("head_dim", "HeadDim"),
];

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
        let kind = kind_of(&f.ty);
        let cover = cover_of(f, &name, kind.as_ref().ok().copied(), errors);
        match kind {
            Ok(kind) => out.push(Field {
                ident,
                name,
                kind,
                cover,
            }),
            Err((ty, message)) => errors.at(ty, message),
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

/// The `#[cover(...)]` of a field: at most one, only on an array, each factor a known word or a
/// positive integer. Every problem is reported; what is wrong is left out.
fn cover_of(f: &syn::Field, name: &str, kind: Option<Kind>, errors: &mut Errors) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut seen = false;
    for attr in f.attrs.iter().filter(|a| a.path().is_ident("cover")) {
        if seen {
            errors.at(
                attr,
                "only one `#[cover]` per field: write a product, `#[cover(batch * qo_heads)]`",
            );
            continue;
        }
        seen = true;
        // On a scalar the attribute means nothing: a scalar is never indexed.
        if let Some(Kind::Scalar(_)) = kind {
            errors.at(
                attr,
                format!("`#[cover]` goes on an `Array` field (it states how many elements the hooks may index); `{name}` is a scalar"),
            );
            continue;
        }
        let list = match &attr.meta {
            syn::Meta::List(list) if !list.tokens.is_empty() => list,
            _ => {
                errors.at(attr, COVER_HELP);
                continue;
            }
        };
        match list.parse_args_with(|input: ParseStream<'_>| parse_cover(input, errors)) {
            Ok(factors) => out = factors,
            Err(e) => errors.push(e),
        }
    }
    out
}

/// `factor (* factor)*`, a factor being a word of [`EXTENTS`] or a positive integer literal.
/// Unknown words and zeros go to `errors` (so every one is reported); bad syntax is the `Err`.
fn parse_cover(input: ParseStream<'_>, errors: &mut Errors) -> syn::Result<Vec<Extent>> {
    if input.is_empty() {
        return Err(input.error(COVER_HELP));
    }
    let mut out = Vec::new();
    loop {
        if input.peek(syn::LitInt) {
            let lit: syn::LitInt = input.parse()?;
            match lit.base10_parse::<u32>() {
                Ok(n) if n > 0 => out.push(Extent::Fixed(n)),
                _ => errors.at(
                    &lit,
                    "a fixed coverage is a positive `u32`, e.g. `#[cover(16)]`",
                ),
            }
        } else {
            let word = syn::Ident::parse_any(input)
                .map_err(|e| syn::Error::new(e.span(), COVER_HELP))?
                .unraw();
            match EXTENTS.iter().find(|(w, _)| word == w) {
                Some(&(_, variant)) => out.push(Extent::Word(variant)),
                None => errors.at(&word, unknown_word(&word.to_string())),
            }
        }
        if input.is_empty() {
            return Ok(out);
        }
        input
            .parse::<Token![*]>()
            .map_err(|e| syn::Error::new(e.span(), COVER_HELP))?;
    }
}

/// The message for an unknown word, with the likely one for a near miss (`qo_head`, `num_kv_heads`).
fn unknown_word(word: &str) -> String {
    let stem = word.strip_prefix("num_").unwrap_or(word);
    let near = EXTENTS
        .iter()
        .map(|(w, _)| *w)
        .find(|w| *w == stem || w.strip_suffix('s') == Some(stem));
    match near {
        Some(w) => format!("unknown coverage `{word}`: did you mean `{w}`?"),
        None => format!("unknown coverage `{word}`: {COVER_HELP}"),
    }
}

/// The field's kind; `Err` with the refused type (the field's, or an array's element type) and the
/// message.
fn kind_of(ty: &Type) -> Result<Kind, (&Type, String)> {
    let refused = |t| Err((t, TYPE_HELP.to_string()));
    match vocab::type_ref(ty) {
        vocab::TypeRef::Known("Array", PathArguments::AngleBracketed(args)) => {
            match args.args.iter().collect::<Vec<_>>().as_slice() {
                [GenericArgument::Type(elem)] => match scalar(elem)? {
                    Some(s) if s != "bool" => Ok(Kind::Array(s)),
                    _ => refused(ty),
                },
                _ => refused(ty),
            }
        }
        vocab::TypeRef::Misspelled("Array") => Err((ty, vocab::spellings("Array"))),
        _ => match scalar(ty)? {
            Some(s) => Ok(Kind::Scalar(s)),
            None => refused(ty),
        },
    }
}

/// The scalar `ty` names; `Err` for a scalar's name behind a path the DSL does not accept.
fn scalar(ty: &Type) -> Result<Option<&'static str>, (&Type, String)> {
    const SCALARS: [&str; 4] = ["f32", "i32", "u32", "bool"];
    match vocab::type_ref(ty) {
        vocab::TypeRef::Known(n, _) => Ok(SCALARS.into_iter().find(|s| *s == n)),
        vocab::TypeRef::Misspelled(n) if SCALARS.contains(&n) => Err((ty, vocab::spellings(n))),
        _ => Ok(None),
    }
}

fn emit(name: &syn::Ident, fields: &[Field<'_>]) -> TokenStream {
    let p = quote!(::ferrinfer::__private);
    let entries = fields.iter().map(|f| {
        let n = &f.name;
        let ty = format_ident!("{}", f.kind.param_type());
        let cover = f.cover.iter().map(|e| match e {
            Extent::Word(variant) => {
                let v = format_ident!("{variant}");
                quote!(#p::Extent::#v)
            }
            Extent::Fixed(n) => quote!(#p::Extent::Fixed(#n)),
        });
        quote!(#p::ParamField { name: #n, ty: #p::ParamType::#ty, cover: &[#(#cover),*] })
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
