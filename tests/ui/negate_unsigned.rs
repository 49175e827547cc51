use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Negated;

#[attention_variant]
impl Negated {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        // u32 has no `-` in Rust, and the DSL's rewritten arithmetic keeps it that way.
        s + (-at.kv_pos) as f32
    }
}

fn main() {}
