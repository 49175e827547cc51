use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Early;

#[attention_variant]
impl Early {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        let t = if s > 0.0 {
            return s;
        } else {
            1.0
        };
        t * s
    }
}

fn main() {}
