use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Cap(pub f32);

fn main() {}
