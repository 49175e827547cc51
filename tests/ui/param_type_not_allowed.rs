use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Wide {
    pub scale: f64,
    pub table: Vec<f32>,
}

fn main() {}
