use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Chatty;

#[attention_variant]
impl Chatty {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        dbg!(s)
    }
}

fn main() {}
