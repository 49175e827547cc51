use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Shrinking {
    pub cap: f32,
}

#[attention_variant]
impl Shrinking {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        let mut c = self.cap;
        c = c * 0.5;
        if s > c {
            c
        } else {
            let d = s;
            d
        }
    }

    fn output(&self, o: f32, _i: u32, at: Pos) -> f32 {
        let t = if at.qo_pos > 0 {
            let h = o * 0.5;
            h + self.cap
        } else {
            o
        };
        let x = at;
        x.qo_len as f32 * t
    }
}

fn main() {}
