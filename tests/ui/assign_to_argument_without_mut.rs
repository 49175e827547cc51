use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Doubling;

#[attention_variant]
impl Doubling {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        s = s * 2.0;
        s
    }
}

fn main() {}
