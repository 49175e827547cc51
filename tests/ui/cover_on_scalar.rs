use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Scaled {
    #[cover(qo_heads)]
    pub scale: f32,
    #[cover(qo_heads)]
    pub slopes: Array<f32>,
}

fn main() {}
