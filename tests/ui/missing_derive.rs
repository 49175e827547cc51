use ferrinfer::prelude::*;

pub struct NoDerive {
    pub cap: f32,
}

#[attention_variant]
impl NoDerive {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        self.cap * (s / self.cap).tanh()
    }
}

fn main() {}
