//! Model sizes: a tiny Llama for the CPU and tests, and Llama-3-8B's shapes for timing.

use ferrinfer::Heads;
use ferrinfer::ops::rope::Frequencies;

/// A Llama-architecture decoder's sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Name as `--config` takes it.
    pub name: &'static str,
    /// Decoder layers.
    pub layers: usize,
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads (GQA).
    pub heads_kv: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// MLP width (gate and up each).
    pub inter: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
}

impl Config {
    /// A 2-layer model small enough for the CPU backend: hidden 256, 4 query / 2 KV heads of 64.
    pub fn tiny() -> Self {
        Config {
            name: "tiny",
            layers: 2,
            hidden: 256,
            heads_q: 4,
            heads_kv: 2,
            head_dim: 64,
            inter: 512,
            vocab: 512,
            eps: 1e-5,
        }
    }
    /// Llama-3-8B's shapes: 32 layers, hidden 4096, 32/8 heads of 128, MLP 14336, vocab 128256.
    pub fn llama3_8b() -> Self {
        Config {
            name: "llama3-8b",
            layers: 32,
            hidden: 4096,
            heads_q: 32,
            heads_kv: 8,
            head_dim: 128,
            inter: 14336,
            vocab: 128256,
            eps: 1e-5,
        }
    }
    /// The config named `name` (`tiny` or `llama3-8b`).
    pub fn by_name(name: &str) -> Result<Self, String> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "llama3-8b" => Ok(Self::llama3_8b()),
            _ => Err(format!("--config {name}: expected tiny or llama3-8b")),
        }
    }
    /// Query projection width.
    pub fn q_dim(&self) -> usize {
        self.heads_q * self.head_dim
    }
    /// Key (or value) projection width.
    pub fn kv_dim(&self) -> usize {
        self.heads_kv * self.head_dim
    }
    /// The attention heads, as ferrinfer validates them.
    pub fn heads(&self) -> ferrinfer::Result<Heads> {
        Heads::new(
            self.heads_q as u32,
            self.heads_kv as u32,
            self.head_dim as u32,
        )
    }
    /// Llama 3.1 RoPE: theta 500000 with the 3.1 frequency scaling.
    pub fn rope(&self) -> Frequencies {
        Frequencies::llama31()
    }
    /// Parameters in bf16 (for the weight bytes a decode step reads).
    pub fn params(&self) -> usize {
        let per_layer = 2 * self.hidden
            + self.hidden * (self.q_dim() + 2 * self.kv_dim())
            + self.q_dim() * self.hidden
            + 3 * self.hidden * self.inter;
        self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden
    }
    /// This rank's slice of the model for `world`-way tensor parallelism: query and KV heads and
    /// MLP columns divided evenly (the weights of a rank are the matching rows of the column-split
    /// projections and columns of the row-split ones: [`crate::weights::Weights::shard`]).
    pub fn shard(&self, rank: usize, world: usize) -> Result<Self, String> {
        if world == 0 || rank >= world {
            return Err(format!("rank {rank} of world {world}"));
        }
        for (what, n) in [
            ("query heads", self.heads_q),
            ("KV heads", self.heads_kv),
            ("MLP width", self.inter),
        ] {
            if n % world != 0 {
                return Err(format!("{what} = {n} do not split {world} ways"));
            }
        }
        Ok(Config {
            heads_q: self.heads_q / world,
            heads_kv: self.heads_kv / world,
            inter: self.inter / world,
            ..self.clone()
        })
    }
}
