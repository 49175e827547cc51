use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Index {
    pub table: Array<f32>,
}

// Only `self.<array field>[i]` is lowered; a local copy of an array cannot be made in a hook.
#[attention_variant]
impl Index {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        let row = at.qo_head;
        s * row[0] + self.table[at.qo_head]
    }
}

fn main() {}
