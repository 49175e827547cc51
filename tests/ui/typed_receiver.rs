use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Typed;

// `self: &Self` is `&self` written out, and accepted; other typed receivers are not.
#[attention_variant]
impl Typed {
    fn logits(self: &mut Self, s: f32, _at: Pos) -> f32 {
        s
    }

    fn mask(self: &Self, at: Pos) -> bool {
        at.kv_pos <= at.qo_pos
    }
}

fn main() {}
