use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Counting {
    pub seen: u32,
}

#[attention_variant]
impl Counting {
    fn logits(&mut self, s: f32, _at: Pos) -> f32 {
        s
    }
}

fn main() {}
