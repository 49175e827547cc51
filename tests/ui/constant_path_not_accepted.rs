use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Clamp;

// `f32::MAX` (or `core::primitive::f32::MAX`), not the legacy module constant `core::f32::MAX`.
#[attention_variant]
impl Clamp {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        s.min(core::f32::MAX).max(::core::primitive::f32::MIN)
    }
}

fn main() {}
