//! One decode step of a candle model's attention layer on a paged KV cache held in one candle
//! tensor: RoPE, KV append, batch decode, all in place on candle's tensors with no copy of the
//! cache. CPU tensors through the CPU reference backend; with `--features candle-cuda` (it needs
//! the CUDA toolkit candle's `cuda` feature needs) and a GPU, CUDA tensors on candle's stream.
//!
//!     cargo run --example candle_decode --features candle
//!     cargo run --example candle_decode --no-default-features --features candle-cuda

use candle_core::{DType, Device, Tensor};
use ferrinfer::candle::{self as fc, PagedKvCache};
use ferrinfer::ops::kv_append::AppendPlan;
use ferrinfer::ops::rope::{Frequencies, Rope, RopeLayout};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: backend
    let device = Device::cuda_if_available(0)?;
    let backend = fc::backend(&device)?;
    println!(
        "candle {:?} -> ferrinfer {}",
        device.location(),
        backend.describe()
    );
    // ANCHOR_END: backend

    // ANCHOR: cache
    // 32 query heads over 8 KV heads of dim 128; pages of 16 tokens, 64 pages.
    let (hq, hk, d, page) = (32, 8, 128, 16);
    let cache = PagedKvCache::new(
        Tensor::randn(0f32, 1., (64, 2, page, hk, d), &device)?.to_dtype(DType::BF16)?,
        KvLayout::Nhd,
    )?;
    let heads = cache.heads(hq as u32)?;

    // Two requests of 40 and 17 tokens after this step; the page table is the engine's.
    let kv = cache.paged_from_lens(&[40, 17], &[7, 3, 12, 9, 30])?;
    let positions = Tensor::new(&[39i32, 16], &device)?;
    // ANCHOR_END: cache

    // The step's projections: q [2, hq, d], k and v [2, hk, d].
    let q = Tensor::randn(0f32, 1., (2, hq, d), &device)?.to_dtype(DType::BF16)?;
    let k = Tensor::randn(0f32, 1., (2, hk, d), &device)?.to_dtype(DType::BF16)?;
    let v = Tensor::randn(0f32, 1., (2, hk, d), &device)?.to_dtype(DType::BF16)?;

    // ANCHOR: step
    // RoPE in place on q and k, then k and v into the cache at each request's last slot.
    let rope = Rope::new(heads, d as u32, RopeLayout::NeoX)?;
    fc::rope(&backend, &rope, Frequencies::llama31(), &positions, &q, &k)?;
    let append = AppendPlan::new(&backend, heads, &kv, &[0, 1, 2], 2)?;
    fc::append_kv(&backend, &append, &k, &v, &cache)?;

    // Attention over the cache into a preallocated output.
    let plan = BatchDecode::plan(&backend, heads, kv, None)?;
    let out = q.zeros_like()?;
    fc::batch_decode(&backend, &plan, &Standard, &q, &cache, &out)?;
    // ANCHOR_END: step

    // Candle's next op on the same stream sees the result.
    let norms = out.to_dtype(DType::F32)?.sqr()?.sum((1, 2))?.sqrt()?;
    println!("|out| per request: {:?}", norms.to_vec1::<f32>()?);
    Ok(())
}
