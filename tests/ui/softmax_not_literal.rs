use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Switch;

const ON: bool = false;

#[attention_variant]
impl Switch {
    const SOFTMAX: bool = ON;
}

fn main() {}
