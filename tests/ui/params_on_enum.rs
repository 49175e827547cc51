use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub enum Mode {
    Soft,
    Hard,
}

fn main() {}
