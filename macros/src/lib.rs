//! `#[attention_variant]` and `#[derive(AttentionParams)]` (stub).
use proc_macro::TokenStream;

#[proc_macro_attribute]
pub fn attention_variant(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}

#[proc_macro_derive(AttentionParams)]
pub fn derive_attention_params(_item: TokenStream) -> TokenStream {
    TokenStream::new()
}
