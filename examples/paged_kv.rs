//! Paged and ragged KV caches as block-sparse rows: the same three requests described both ways,
//! the index arrays and strides printed, one decode step run over each (on the GPU when there is
//! one, on the CPU reference backend otherwise) and the two outputs compared.
//!
//!     cargo run --example paged_kv

use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;
use ferrinfer_testkit::Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (backend, _) = Backend::auto();
    println!("backend: {}", backend.describe());

    // ANCHOR: ragged
    // 4 query heads over 2 KV heads, head dim 64. Three requests hold 5, 12 and 3 tokens.
    let heads = Heads::new(4, 2, 64)?;
    let lens = [5u32, 12, 3];
    // Ragged: the requests' tokens back to back, K and V each [20, 2, 64] (NHD).
    let kv_indptr = ferrinfer::indptr(&lens); // [0, 5, 17, 20]
    let ragged = KvIndex::ragged(&kv_indptr, KvLayout::Nhd)?;
    // ANCHOR_END: ragged
    println!(
        "ragged: kv_indptr {kv_indptr:?} -> indptr {:?} indices {:?} last_len {:?}",
        ragged.indptr(),
        ragged.indices(),
        ragged.last_len()
    );

    // ANCHOR: paged
    // Paged: 8 pages of 4 tokens; request 0 owns pages 7 and 2, request 1 pages 0, 5 and 3,
    // request 2 page 1. Pages 4 and 6 are free.
    let paged = KvIndex::paged(
        4,
        &[0, 2, 5, 6], // kv_indptr: request b owns indices[indptr[b]..indptr[b + 1]]
        &[7, 2, 0, 5, 3, 1], // kv_indices: page ids
        &[1, 4, 3],    // kv_last_page_len: 5 = 4 + 1, 12 = 4 + 4 + 4, 3
        8,             // pages in the cache: K and V are each [8, 4, 2, 64] (NHD)
        KvLayout::Nhd,
    )?;
    // The same index from the lengths and the pages handed out, in request order.
    let from_lens = KvIndex::paged_from_lens(4, &lens, &[7, 2, 0, 5, 3, 1], 8, KvLayout::Nhd)?;
    assert_eq!(paged, from_lens);
    // ANCHOR_END: paged
    println!(
        "paged: indptr {:?} indices {:?} last_len {:?}, kv_len of request 1: {}",
        paged.indptr(),
        paged.indices(),
        paged.last_len(),
        paged.kv_len(1)
    );

    // ANCHOR: strides
    let nhd = paged.strides(&heads);
    let hnd =
        KvIndex::paged_from_lens(4, &lens, &[7, 2, 0, 5, 3, 1], 8, KvLayout::Hnd)?.strides(&heads);
    let interleaved = paged.clone().interleaved(&heads)?.strides(&heads);
    // ANCHOR_END: strides
    for (name, s) in [("NHD", nhd), ("HND", hnd), ("interleaved NHD", interleaved)] {
        println!(
            "{name:>16} strides: block {:>4}, token {:>3}, head {:>3}",
            s.block, s.token, s.head
        );
    }

    // ANCHOR: errors
    // A page id past the cache, a last page longer than a page, and a batch whose query rows
    // describe a different number of requests than its KV index: errors, not kernel faults.
    let bad_page = KvIndex::paged(4, &[0, 1], &[8], &[2], 8, KvLayout::Nhd);
    let bad_last = KvIndex::paged(4, &[0, 1], &[3], &[5], 8, KvLayout::Nhd);
    let bad_batch = Batch::new(heads, &[0, 1, 2], paged.clone());
    // ANCHOR_END: errors
    for r in [
        bad_page.map(|_| ()),
        bad_last.map(|_| ()),
        bad_batch.map(|_| ()),
    ] {
        println!("refused: {}", r.unwrap_err());
    }

    // ANCHOR: copy
    // Fill the ragged K and V, then scatter every (request, token, KV head) vector to where the
    // paged index says it lives: KvIndex::offset is the addressing the kernels use.
    let mut rng = Rng::new(7);
    let mut draw =
        |n: usize| -> Vec<bf16> { rng.normal_vec(n).into_iter().map(bf16::from_f32).collect() };
    let (k_ragged, v_ragged) = (
        draw(ragged.buffer_len(&heads)),
        draw(ragged.buffer_len(&heads)),
    );
    let mut k_paged = vec![bf16::ZERO; paged.buffer_len(&heads)];
    let mut v_paged = k_paged.clone();
    let d = heads.head_dim() as usize;
    for (b, &len) in lens.iter().enumerate() {
        for j in 0..len {
            for h in 0..heads.num_kv_heads() {
                let (from, to) = (
                    ragged.offset(&heads, b, j, h),
                    paged.offset(&heads, b, j, h),
                );
                k_paged[to..to + d].copy_from_slice(&k_ragged[from..from + d]);
                v_paged[to..to + d].copy_from_slice(&v_ragged[from..from + d]);
            }
        }
    }
    // ANCHOR_END: copy

    // ANCHOR: decode
    // One decode step (one query row per request) over each cache: the same attention.
    let q = draw(lens.len() * 4 * 64);
    let mut outputs = Vec::new();
    for (kv, k, v) in [(ragged, &k_ragged, &v_ragged), (paged, &k_paged, &v_paged)] {
        let plan = BatchDecode::plan(&backend, heads, kv, None)?;
        let (qd, kd, vd) = (backend.upload(&q)?, backend.upload(k)?, backend.upload(v)?);
        let mut o = backend.filled(q.len(), bf16::ZERO)?;
        plan.run(&Standard, &qd, &kd, &vd, &mut o, None)?;
        outputs.push(o.to_vec()?);
    }
    // ANCHOR_END: decode
    let worst = outputs[0]
        .iter()
        .zip(&outputs[1])
        .map(|(a, b)| (a.to_f32() - b.to_f32()).abs())
        .fold(0.0f32, f32::max);
    println!("ragged vs paged decode: largest difference {worst:.1e}");
    if worst > 1e-2 {
        return Err(format!("ragged and paged decode disagree by {worst}").into());
    }
    Ok(())
}
