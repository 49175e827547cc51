use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Stepped;

#[attention_variant]
impl Stepped {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        // Nothing makes `step` an f32: Rust would compute `step as i32` in f64.
        let step = 2.5;
        s * (step as i32) as f32
    }
}

fn main() {}
