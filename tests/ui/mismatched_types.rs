use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Mixed;

#[attention_variant]
impl Mixed {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        // Reported once by the macro (and explained by rustc), not again at each use of `x`.
        let x = s + at.kv_pos;
        let y = x * 2.0;
        x + y
    }
}

fn main() {}
