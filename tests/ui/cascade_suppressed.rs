use ferrinfer::prelude::*;
use std::f32::consts::PI;

#[derive(AttentionParams)]
pub struct Pair {
    pub scale: f32,
}

// One error per mistake: the names a refused construct binds are not reported again below.
#[attention_variant]
impl Pair {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        let (a, b) = (s, self.scale);
        let twice = |v: f32| v * 2.0;
        let t = twice(a);
        let r: f64 = 1.0;
        let _ = r;
        // Reported at its first use only.
        t + b + at.qo_pos as f32 + PI * PI
    }

    fn mask(&self, (at, _): (Pos, u32)) -> bool {
        at.kv_pos <= at.qo_pos
    }
}

fn main() {}
