use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Scaled {
    pub scale: f32,
}

#[attention_variant]
impl Scaled {
    fn logits(&self, s: f64, _at: Pos) -> f32 {
        s as f32 * self.scale
    }
}

fn main() {}
