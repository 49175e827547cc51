use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Table {
    #[cover(batch * 0)]
    pub table: Array<f32>,
}

fn main() {}
