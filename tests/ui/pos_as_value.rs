use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Copied;

#[attention_variant]
impl Copied {
    fn mask(&self, at: Pos) -> bool {
        let p = at;
        true
    }
}

fn main() {}
