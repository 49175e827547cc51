//! The built-in variants, each written with the DSL itself (`#[attention_variant]`), so each is
//! also an example of it.

mod alibi;
mod attention_sink;
mod custom_mask;
mod flash_sigmoid;
mod llama_rope;
mod sliding_window;
mod soft_cap;
mod standard;

pub use alibi::Alibi;
pub use attention_sink::AttentionSink;
pub use custom_mask::CustomMask;
pub use flash_sigmoid::FlashSigmoid;
pub use llama_rope::LlamaRope;
pub use sliding_window::SlidingWindow;
pub use soft_cap::SoftCap;
pub use standard::Standard;
