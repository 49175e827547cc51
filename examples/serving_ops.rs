//! Serving ops: the calls around attention in one decode step of a Llama-style layer (fused
//! add + RMSNorm, RoPE fused into the KV append, batch decode, SiLU-and-mul, sampling), on the GPU
//! when there is one and on the CPU reference backend otherwise.
//!
//!     cargo run --release --example serving_ops
//!
//! The model's GEMMs are not ferrinfer's business: random tensors from a fixed seed stand in for
//! their outputs, so every run prints the same numbers.

use ferrinfer::ops::activation::{self, ActShape};
use ferrinfer::ops::kv_append::{AppendPlan, KvCacheMut, NewKv};
use ferrinfer::ops::norm::{self, NormShape};
use ferrinfer::ops::rope::{Angles, Frequencies, Rope, RopeLayout};
use ferrinfer::ops::sampling::{self, Filter, Param, SampleShape, SamplerState};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;
use ferrinfer_testkit::Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: backend
    let (backend, why_not_gpu) = Backend::auto();
    println!("backend: {}", backend.describe());
    if let Some(e) = why_not_gpu {
        println!("  (no GPU: {e})");
    }
    // ANCHOR_END: backend

    // A fixed seed for the stand-in activations, so that the printed values repeat run to run.
    let mut rng = Rng::new(2026);
    let mut draw = |n: usize, scale: f32| -> Vec<bf16> {
        rng.normal_vec(n)
            .into_iter()
            .map(|x| bf16::from_f32(x * scale))
            .collect()
    };

    // ANCHOR: step
    // 4 requests decode one token each. Hidden 256 = 4 query heads of 64; 2 KV heads (GQA 2).
    let (batch, hidden, inter, vocab) = (4u32, 256u32, 512u32, 1000u32);
    let heads = Heads::new(4, 2, 64)?;
    // The cache index *after* this step's append: the requests hold 17, 40, 5 and 64 tokens on
    // pages of 16, handed out in any order; the new token of each is its last.
    let kv = KvIndex::paged_from_lens(
        16,
        &[17, 40, 5, 64],
        &[3, 7, 0, 9, 1, 2, 11, 4, 5, 8], // 2 + 3 + 1 + 4 pages
        12,
        KvLayout::Nhd,
    )?;
    let qo_indptr = [0, 1, 2, 3, 4]; // one new token per request
    // ANCHOR_END: step

    // ANCHOR: norm
    // The residual stream and the output of the previous sublayer. One call adds them (the
    // residual keeps the sum, rounded to bf16) and normalises the sum into `x`, in place.
    let shape = NormShape::new(batch, hidden)?;
    let mut x = backend.upload(&draw(shape.elements(), 1.0))?;
    let mut residual = backend.upload(&draw(shape.elements(), 1.0))?;
    let weight = backend.upload(&vec![bf16::ONE; hidden as usize])?;
    norm::fused_add_rmsnorm(&backend, shape, &mut x, &mut residual, &weight, 1e-5)?;
    // ANCHOR_END: norm
    print_row("normed x[0, 0..4]", &x.to_vec()?[..4]);

    // The K and V of the tokens cached by earlier steps (random here); the append fills in the
    // last slot of each request.
    let mut k_cache = backend.upload(&draw(kv.buffer_len(&heads), 1.0))?;
    let mut v_cache = backend.upload(&draw(kv.buffer_len(&heads), 1.0))?;

    // ANCHOR: rope_append
    // Built on the host once per step from the same KvIndex as the attention plan; it knows each
    // new token's slot and position, so no page table goes to the kernel. `capacity` (here the
    // batch) bounds the rows of later steps, which `replan` moves the plan to in place.
    let append = AppendPlan::new(&backend, heads, &kv, &qo_indptr, batch)?;
    let rope = Rope::new(heads, heads.head_dim(), RopeLayout::NeoX)?;
    let angles = Angles::Computed(Frequencies::llama31());
    // q, k, v as the QKV projection would give them.
    let mut q = backend.upload(&draw(rope.q_len(batch as usize), 1.0))?;
    let new_k = backend.upload(&draw(rope.k_len(batch as usize), 1.0))?;
    let new_v = backend.upload(&draw(rope.k_len(batch as usize), 1.0))?;
    // One launch: q turned in place, k turned on its way into the cache, v copied into it.
    append.run_with_rope(
        &backend,
        &rope,
        angles,
        &mut q,
        NewKv {
            k: &new_k,
            v: &new_v,
        },
        KvCacheMut {
            k: &mut k_cache,
            v: &mut v_cache,
        },
    )?;
    // ANCHOR_END: rope_append
    let positions = append.positions().to_vec()?;
    println!("positions of the new tokens: {positions:?}");
    print_row("rotated q[0, head 0, 0..4]", &q.to_vec()?[..4]);

    // ANCHOR: decode
    // Attention over the cache the append just wrote: one query row per request.
    let decode = BatchDecode::plan(&backend, heads, kv, None)?;
    let mut o = backend.filled(rope.q_len(batch as usize), bf16::ZERO)?;
    decode.run(&Standard, &q, &k_cache, &v_cache, &mut o, None)?;
    // ANCHOR_END: decode
    print_row("attention o[0, head 0, 0..4]", &o.to_vec()?[..4]);

    // ANCHOR: activation
    // The gate and up projections side by side, [batch, 2 * inter]: silu(gate) * up.
    let act = ActShape::new(batch, inter)?;
    let gate_up = backend.upload(&draw(act.input_len(), 1.0))?;
    let mut mlp = backend.filled(act.output_len(), bf16::ZERO)?;
    activation::silu_and_mul(&backend, act, &gate_up, &mut mlp)?;
    // ANCHOR_END: activation
    print_row("silu_and_mul[0, 0..4]", &mlp.to_vec()?[..4]);

    // ANCHOR: sampling
    // The LM head's logits, f32. Every request has its own temperature and top-p; top-k is
    // shared. The parameters stay on the device, so changing them needs no new plan or graph.
    let sample = SampleShape::new(batch, vocab)?;
    let logits: Vec<f32> = draw(sample.len(), 3.0).iter().map(|x| x.to_f32()).collect();
    let logits = backend.upload(&logits)?;
    let temperature = backend.upload(&[0.7f32, 1.0, 1.3, 0.5])?;
    let top_p = backend.upload(&[0.9f32, 0.95, 0.8, 1.0])?;
    let filter = Filter::none()
        .top_k(Param::All(50))
        .top_p(Param::PerRequest(&top_p));
    // Seed and offset live in a device buffer; every call advances the offset there.
    let mut state = SamplerState::new(&backend, 42)?;
    let mut tokens = backend.filled(batch as usize, -1i32)?;
    sampling::sample_from_logits(
        &backend,
        &mut state,
        sample,
        &logits,
        Param::PerRequest(&temperature),
        &filter,
        &mut tokens,
    )?;
    // ANCHOR_END: sampling
    let first = tokens.to_vec()?;
    println!("sampled tokens: {first:?} (state {:?})", state.read()?);

    // ANCHOR: reproduce
    // The same seed and offset draw the same tokens; the next offset draws fresh ones.
    state.reset(42)?;
    sampling::sample_from_logits(
        &backend,
        &mut state,
        sample,
        &logits,
        Param::PerRequest(&temperature),
        &filter,
        &mut tokens,
    )?;
    assert_eq!(tokens.to_vec()?, first);
    // ANCHOR_END: reproduce
    println!("after reset(42): the same tokens again");
    Ok(())
}

/// Print a few values of a bf16 row.
fn print_row(name: &str, xs: &[bf16]) {
    let xs: Vec<String> = xs.iter().map(|x| format!("{:+.4}", x.to_f32())).collect();
    println!("{name} = [{}]", xs.join(", "));
}
