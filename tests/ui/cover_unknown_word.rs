use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Slopes {
    #[cover(qo_head)]
    pub slopes: Array<f32>,
    #[cover(batch * requests)]
    pub offsets: Array<u32>,
}

fn main() {}
