use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct SigmoidSink {
    pub sink: f32,
}

#[attention_variant]
impl SigmoidSink {
    const SOFTMAX: bool = false;

    fn sink(&self, _at: Pos) -> f32 {
        self.sink
    }
}

fn main() {}
