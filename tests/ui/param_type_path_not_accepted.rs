use ferrinfer::prelude::*;

// Valid Rust for the same types, but not a path the DSL accepts.
mod my {
    pub use core::primitive::f32;
    pub use ferrinfer::Array;
}

#[derive(AttentionParams)]
pub struct Table {
    pub scale: my::f32,
    pub table: my::Array<f32>,
    pub bias: Array<my::f32>,
}

fn main() {}
