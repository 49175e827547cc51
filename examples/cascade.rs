//! Cascade attention: three requests share a 64-token prefix. A decode step attends the prefix
//! (stored once, one large block) and each request's own suffix (pages of 16) separately, then
//! merges the two attention states. The result is checked against attention over each request's
//! whole sequence. GPU when there is one, CPU reference backend otherwise.
//!
//!     cargo run --example cascade

use ferrinfer::attention::reference::{self, rel_l2};
use ferrinfer::ops::cascade::{self, State, StateMut, StateShape};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;
use ferrinfer_testkit::Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (backend, _) = Backend::auto();
    println!("backend: {}", backend.describe());
    let mut rng = Rng::new(5);
    let mut draw =
        |n: usize| -> Vec<bf16> { rng.normal_vec(n).into_iter().map(bf16::from_f32).collect() };

    // ANCHOR: indices
    let heads = Heads::new(8, 2, 64)?;
    let prefix_len = 64u32;
    let suffix_lens = [5u32, 20, 1];
    // The shared prefix: one page of 64 tokens, and every request's page table points at it.
    let prefix = KvIndex::paged(
        prefix_len,
        &[0, 1, 2, 3],
        &[0, 0, 0],
        &[64, 64, 64],
        1,
        KvLayout::Nhd,
    )?;
    // The suffixes: pages of 16 tokens, private to each request.
    let suffix = KvIndex::paged_from_lens(16, &suffix_lens, &[3, 0, 1, 2], 4, KvLayout::Nhd)?;
    // ANCHOR_END: indices
    let (k_pre, v_pre) = (
        draw(prefix.buffer_len(&heads)),
        draw(prefix.buffer_len(&heads)),
    );
    let (k_suf, v_suf) = (
        draw(suffix.buffer_len(&heads)),
        draw(suffix.buffer_len(&heads)),
    );
    let q = draw(suffix_lens.len() * 8 * 64);

    // ANCHOR: states
    // One decode step over each part, each writing its output and its log-sum-exp.
    let shape = StateShape::new(suffix_lens.len() as u32, 8, 64)?;
    let qd = backend.upload(&q)?;
    let part = |kv: KvIndex, k: &[bf16], v: &[bf16]| -> ferrinfer::Result<_> {
        let plan = BatchDecode::plan(&backend, heads, kv, None)?;
        let mut o = backend.filled(shape.v_len(), bf16::ZERO)?;
        let mut lse = backend.filled(shape.s_len(), 0.0f32)?;
        plan.run(
            &Standard,
            &qd,
            &backend.upload(k)?,
            &backend.upload(v)?,
            &mut o,
            Some(&mut lse),
        )?;
        Ok((o, lse))
    };
    let (o_pre, s_pre) = part(prefix.clone(), &k_pre, &v_pre)?;
    let (o_suf, s_suf) = part(suffix.clone(), &k_suf, &v_suf)?;
    // ANCHOR_END: states

    // ANCHOR: merge
    let mut o = backend.filled(shape.v_len(), bf16::ZERO)?;
    let mut s = backend.filled(shape.s_len(), 0.0f32)?;
    cascade::merge_state(
        &backend,
        shape,
        State::new(&o_pre, &s_pre),
        State::new(&o_suf, &s_suf),
        StateMut::new(&mut o, &mut s),
    )?;
    // ANCHOR_END: merge

    // The same step without the cascade: each request's prefix and suffix copied into one ragged
    // cache, attended in one pass by the f64 reference.
    let lens: Vec<u32> = suffix_lens.iter().map(|l| prefix_len + l).collect();
    let whole = KvIndex::ragged(&ferrinfer::indptr(&lens), KvLayout::Nhd)?;
    let (mut k_all, mut v_all) = (Vec::new(), Vec::new());
    for (b, &len) in suffix_lens.iter().enumerate() {
        for (kv, k, v, n) in [
            (&prefix, &k_pre, &v_pre, prefix_len),
            (&suffix, &k_suf, &v_suf, len),
        ] {
            for j in 0..n {
                let at = kv.offset(&heads, b, j, 0);
                k_all.extend_from_slice(&k[at..at + 2 * 64]);
                v_all.extend_from_slice(&v[at..at + 2 * 64]);
            }
        }
    }
    let want =
        reference::attention_typed(&Standard, &Batch::decode(heads, whole)?, &q, &k_all, &v_all)?;
    let got: Vec<f32> = o.to_vec()?.iter().map(|x| x.to_f32()).collect();
    let lse_err = s
        .to_vec()?
        .iter()
        .zip(&want.lse)
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0.0, f64::max);
    let err = rel_l2(&got, &want.o);
    println!(
        "cascade vs whole-sequence attention: relative L2 error {err:.1e}, largest LSE difference {lse_err:.1e}"
    );
    if err > 1e-2 || lse_err > 1e-2 {
        return Err("the merged states disagree with attention over the whole sequences".into());
    }
    Ok(())
}
