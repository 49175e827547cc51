use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Causalish;

#[attention_variant]
impl Causalish {
    fn mask(&self, at: Pos) -> u32 {
        at.kv_pos
    }
}

fn main() {}
