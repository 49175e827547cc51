use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Tables {
    #[cover]
    pub a: Array<f32>,
    #[cover(batch + qo_heads)]
    pub b: Array<f32>,
    #[cover()]
    pub c: Array<f32>,
    #[cover = "qo_heads"]
    pub d: Array<f32>,
}

fn main() {}
