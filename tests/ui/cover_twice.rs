use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Slopes {
    #[cover(batch)]
    #[cover(qo_heads)]
    pub slopes: Array<f32>,
}

fn main() {}
