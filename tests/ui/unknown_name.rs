use ferrinfer::prelude::*;
use std::f32::consts::PI;

#[derive(AttentionParams)]
pub struct Wave;

#[attention_variant]
impl Wave {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        s * (PI / 4.0).cos()
    }
}

fn main() {}
