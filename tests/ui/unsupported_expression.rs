use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Picky;

#[attention_variant]
impl Picky {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        match at.qo_head {
            0 => s,
            _ => -s,
        }
    }
}

fn main() {}
