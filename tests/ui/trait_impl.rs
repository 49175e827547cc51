use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct ByHand;

#[attention_variant]
impl ferrinfer::Variant for ByHand {
    const SPEC: &'static ferrinfer::VariantSpec = todo!();
}

fn main() {}
