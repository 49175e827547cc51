use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Halved;

#[attention_variant]
impl Halved {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        let half = 0.5f64;
        s * half as f32
    }
}

fn main() {}
