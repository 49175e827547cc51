use ferrinfer::prelude::*;

pub struct Scaled<T> {
    pub scale: T,
}

#[attention_variant]
impl<T> Scaled<T> {
    fn logits(&self, s: f32, _at: Pos) -> f32 {
        s
    }
}

fn main() {}
