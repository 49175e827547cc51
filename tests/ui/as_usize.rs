use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct PerHead {
    pub scale: Array<f32>,
}

#[attention_variant]
impl PerHead {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        let head = at.qo_head as usize;
        s * self.scale[head as u32]
    }
}

fn main() {}
