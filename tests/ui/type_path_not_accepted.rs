use ferrinfer::prelude::*;

// Valid Rust for the same types, but not a path the DSL accepts: it cannot see through `num`
// or `crate`, so it names the spellings it takes.
mod num {
    pub use core::primitive::{bool, f32, u32};
}

#[derive(AttentionParams)]
pub struct Shift {
    pub shift: f32,
}

#[attention_variant]
impl Shift {
    const SOFTMAX: num::bool = true;

    fn logits(&self, s: num::f32, at: crate::Pos) -> f32 {
        let x: num::f32 = s + self.shift;
        x + at.qo_pos as num::u32 as f32
    }
}

fn main() {}
