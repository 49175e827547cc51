use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Clamped;

#[attention_variant]
impl Clamped {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        s.clamp(-10.0, 10.0)
    }
}

fn main() {}
