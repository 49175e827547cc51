//! Quickstart: write an attention variant in Rust and run it on a paged KV cache, on the GPU when
//! there is one and on the CPU reference backend otherwise.
//!
//!     cargo run --release --example quickstart

use ferrinfer::attention::reference::{self, rel_l2};
use ferrinfer::prelude::*;
use ferrinfer_testkit::Rng;

// ANCHOR: variant
/// Soft-capped logits with a temperature per query head.
#[derive(AttentionParams)]
pub struct CappedTemperature {
    pub cap: f32,
    #[cover(qo_heads)]
    pub temperature: Array<f32>,
}

#[attention_variant]
impl CappedTemperature {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        let t = self.temperature[at.qo_head];
        self.cap * (s / (t * self.cap)).tanh()
    }
}
// ANCHOR_END: variant

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: backend
    let (backend, why_not_gpu) = Backend::auto();
    println!("backend: {}", backend.describe());
    if let Some(e) = why_not_gpu {
        println!("  (no GPU: {e})");
    }
    // ANCHOR_END: backend

    // ANCHOR: batch
    // 8 query heads over 2 KV heads (GQA 4), head dim 128. Two requests append 5 and 3 new tokens
    // to 40 and 20 cached ones; the cache has pages of 16 tokens, handed out in any order.
    let heads = Heads::new(8, 2, 128)?;
    let kv = KvIndex::paged(
        16,
        &[0, 3, 5],       // request b owns pages indices[indptr[b]..indptr[b + 1]]
        &[4, 0, 2, 1, 5], // page ids
        &[8, 4],          // tokens used in each request's last page: 2*16+8 = 40, 16+4 = 20
        6,                // pages in the cache
        KvLayout::Nhd,
    )?;
    let batch = Batch::new(heads, &[0, 5, 8], kv)?.with_causal(true);
    // ANCHOR_END: batch

    let mut rng = Rng::from_time();
    let draw = |n: usize, rng: &mut Rng| -> Vec<bf16> {
        rng.normal_vec(n).into_iter().map(bf16::from_f32).collect()
    };
    let q = draw(batch.q_len(), &mut rng);
    let k = draw(batch.kv().buffer_len(&heads), &mut rng);
    let v = draw(batch.kv().buffer_len(&heads), &mut rng);

    // ANCHOR: run
    let variant = CappedTemperature {
        cap: 30.0,
        temperature: Array::new(vec![1.0, 1.0, 0.5, 0.5, 2.0, 2.0, 1.0, 1.0]),
    };
    let plan = BatchPrefill::plan(&backend, batch.clone())?;
    let (qd, kd, vd) = (
        backend.upload(&q)?,
        backend.upload(&k)?,
        backend.upload(&v)?,
    );
    let mut o = backend.filled(batch.q_len(), bf16::ZERO)?;
    let started = std::time::Instant::now();
    plan.run(&variant, &qd, &kd, &vd, &mut o, None)?;
    let out = o.to_vec()?;
    println!(
        "ran CappedTemperature on {} query rows in {:.3} s (a first GPU run includes the JIT compile)",
        batch.total_qo(),
        started.elapsed().as_secs_f64()
    );
    // ANCHOR_END: run

    let first: Vec<String> = out[..6]
        .iter()
        .map(|x| format!("{:+.4}", x.to_f32()))
        .collect();
    println!("o[row 0, head 0, 0..6] = [{}]", first.join(", "));

    // The same Rust source, run by the CPU reference in f64: the oracle of every test.
    let want = reference::attention_typed(&variant, &batch, &q, &k, &v)?;
    let got: Vec<f32> = out.iter().map(|x| x.to_f32()).collect();
    println!(
        "relative L2 error against the f64 reference: {:.2e}",
        rel_l2(&got, &want.o)
    );
    Ok(())
}
