use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Scaled {
    pub scale: f32,
}

#[attention_variant]
impl Scaled {
    fn logits(&self, s: f32) -> f32 {
        s * self.scale
    }
}

fn main() {}
