use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Messy {
    pub cap: f32,
}

#[attention_variant]
impl Messy {
    const fn query(&self, x: f32, _partner: f32, _i: u32, _at: Pos) -> f32 {
        x
    }

    fn logits(&self, s: f32, at: Pos) -> f32 {
        let f = |x: f32| x * self.cap;
        let mut t = f(s);
        while t > self.cap {
            t -= 1.0;
        }
        t.sigmoid() + at.qo_head as f32
    }

    fn mask(self, at: Pos) -> bool {
        at.kv_pos <= at.qo_pos
    }

    fn scale(&self) -> f32 {
        1.0
    }
}

fn main() {}
