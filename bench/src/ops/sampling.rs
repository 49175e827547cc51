//! Sampling rows of DESIGN.md ("Serving ops"): 128 requests over Llama 3's 128256-token
//! vocabulary, logits = standard normal x 2 and probabilities = their softmax, as the anchor makes
//! them; bytes are those of the f32 logits or probabilities read once. Chain speculative sampling:
//! 64 requests of 4 draft tokens, bytes of the draft and target probabilities (as the anchor
//! counts them, though one step reads only the rows it needs).

use ferrinfer::ops::sampling::speculative::{self, SpecShape};
use ferrinfer::ops::sampling::{self, Filter, Param, SampleShape, SamplerState};
use ferrinfer::prelude::*;
use ferrinfer_testkit::Rng;

use super::{Call, OpCase};
use crate::inputs::normal_bf16;
use crate::timing::BenchResult;

const VOCAB: u32 = 128_256;
const BATCH: u32 = 128;
const BYTES: u64 = BATCH as u64 * VOCAB as u64 * 4;

/// Chain speculative sampling: requests and draft tokens per request.
const SPEC_BATCH: u32 = 64;
const SPEC_N: u32 = 4;
/// As the anchor counts it: the draft and target probabilities, `64 x (4 + 5) x vocab` f32.
const SPEC_BYTES: u64 = SPEC_BATCH as u64 * (2 * SPEC_N as u64 + 1) * VOCAB as u64 * 4;

/// The five sampling cases.
pub fn cases() -> Vec<OpCase> {
    vec![
        OpCase {
            key: "sample_top_k_top_p_logits_b128_v128256",
            bytes: BYTES,
            set_bytes: BYTES,
            setup: |b, seed| setup(b, seed, Kind::TopKTopPLogits),
        },
        OpCase {
            key: "sample_top_p_probs_b128_v128256",
            bytes: BYTES,
            set_bytes: BYTES,
            setup: |b, seed| setup(b, seed, Kind::TopP),
        },
        OpCase {
            key: "sample_min_p_probs_b128_v128256",
            bytes: BYTES,
            set_bytes: BYTES,
            setup: |b, seed| setup(b, seed, Kind::MinP),
        },
        OpCase {
            key: "sample_top_k_probs_b128_v128256",
            bytes: BYTES,
            set_bytes: BYTES,
            setup: |b, seed| setup(b, seed, Kind::TopK),
        },
        OpCase {
            key: "chain_speculative_b64_n4_v128256",
            bytes: SPEC_BYTES,
            set_bytes: SPEC_BYTES,
            setup: setup_speculative,
        },
    ]
}

#[derive(Clone, Copy)]
enum Kind {
    TopKTopPLogits,
    TopP,
    MinP,
    TopK,
}

/// `rows` rows of `vocab` logits, standard normal x 2.
pub(crate) fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    normal_bf16(rows * vocab, seed)
        .into_iter()
        .map(|x| 2.0 * x.to_f32())
        .collect()
}

/// The row-wise softmax of `x` (rows of `vocab`), in f64.
pub(crate) fn softmax_rows(x: &[f32], vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(vocab) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = row.iter().map(|&v| f64::from(v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        out.extend(e.iter().map(|&v| (v / z) as f32));
    }
    out
}

fn setup(backend: &Backend, seed: u64, kind: Kind) -> BenchResult<Call> {
    let shape = SampleShape::new(BATCH, VOCAB)?;
    let l = logits(BATCH as usize, VOCAB as usize, seed);
    let x = match kind {
        Kind::TopKTopPLogits => l,
        _ => softmax_rows(&l, VOCAB as usize),
    };
    let x = backend.upload(&x)?;
    let mut state = SamplerState::new(backend, seed)?;
    let mut tokens = backend.filled(BATCH as usize, -1i32)?;
    let backend = backend.clone();
    Ok(Box::new(move || {
        let filter = match kind {
            Kind::TopKTopPLogits => Filter::none().top_k(Param::All(50)).top_p(Param::All(0.9)),
            Kind::TopP => Filter::none().top_p(Param::All(0.9)),
            Kind::MinP => Filter::none().min_p(Param::All(0.05)),
            Kind::TopK => Filter::none().top_k(Param::All(50)),
        };
        match kind {
            Kind::TopKTopPLogits => sampling::sample_from_logits(
                &backend,
                &mut state,
                shape,
                &x,
                Param::All(1.0),
                &filter,
                &mut tokens,
            ),
            _ => sampling::sample_from_probs(&backend, &mut state, shape, &x, &filter, &mut tokens),
        }
    }))
}

/// Draft and target probabilities as softmax(normal x 2), the draft ids drawn from the draft rows.
fn setup_speculative(backend: &Backend, seed: u64) -> BenchResult<Call> {
    let (b, n, v) = (SPEC_BATCH as usize, SPEC_N as usize, VOCAB as usize);
    let shape = SpecShape::new(SPEC_BATCH, SPEC_N, VOCAB)?;
    let draft = softmax_rows(&logits(b * n, v, seed), v);
    let target = softmax_rows(&logits(b * (n + 1), v, seed ^ 0x5eed), v);
    let mut rng = Rng::new(seed);
    let ids: Vec<i32> = draft
        .chunks(v)
        .map(|row| {
            let u = rng.uniform();
            let mut acc = 0.0;
            row.iter()
                .position(|&p| {
                    acc += p;
                    u < acc
                })
                .unwrap_or(v - 1) as i32
        })
        .collect();
    let (draft, ids, target) = (
        backend.upload(&draft)?,
        backend.upload(&ids)?,
        backend.upload(&target)?,
    );
    let mut state = SamplerState::new(backend, seed)?;
    let mut tokens = backend.filled(b * (n + 1), -1i32)?;
    let mut accepted = backend.filled(b, 0i32)?;
    let mut emitted = backend.filled(b, 0i32)?;
    let backend = backend.clone();
    Ok(Box::new(move || {
        speculative::chain_speculative_sampling(
            &backend,
            &mut state,
            shape,
            &draft,
            &ids,
            &target,
            &mut tokens,
            &mut accepted,
            &mut emitted,
        )
    }))
}
