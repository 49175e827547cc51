use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Scaled {
    pub scale: f32,
}

#[attention_variant]
impl Scaled {
    fn logit(&self, s: f32, _at: Pos) -> f32 {
        s * self.scale
    }
}

fn main() {}
