//! Context parallelism: a batch whose KV cache is sharded by pages over N ranks. Each rank
//! decodes (or prefills) its shard with the LSE; the ranks' states are gathered rank-major and
//! merged. Here the ranks are simulated on the CPU backend (the same sharding and merge code the
//! GPU path runs), and the results are checked against attention over the whole cache: a decode
//! step, then a causal prefill of new tokens at the end of each request. Built with
//! `--features nccl` and run on a machine with GPUs, it also runs `ContextParallelDecode` and
//! `ContextParallelPrefill` with every GPU a rank.
//!
//!     cargo run --example context_parallel [--features nccl]

use ferrinfer::attention::reference::{self, worst_rel_l2};
use ferrinfer::distributed::{merge_ranks, shard_kv};
use ferrinfer::ops::cascade::{State, StateMut, StateShape};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;
use ferrinfer_testkit::Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = Rng::new(13);
    // ANCHOR: shard
    let heads = Heads::new(8, 2, 64)?;
    let lens = [300u32, 17, 1000];
    let pages: u32 = lens.iter().map(|l| l.div_ceil(16)).sum();
    let kv = KvIndex::paged_from_lens(
        16,
        &lens,
        &(0..pages as i32).collect::<Vec<_>>(),
        pages,
        KvLayout::Nhd,
    )?;
    let world = 4;
    let shards = shard_kv(&kv, world)?;
    for s in &shards {
        let held: Vec<_> = (0..lens.len()).map(|b| s.tokens(b)).collect();
        println!("rank {}: keys {held:?}", s.rank());
    }
    // ANCHOR_END: shard
    let mut draw =
        |n: usize| -> Vec<bf16> { rng.normal_vec(n).into_iter().map(bf16::from_f32).collect() };
    let (q, k, v) = (
        draw(lens.len() * 8 * 64),
        draw(kv.buffer_len(&heads)),
        draw(kv.buffer_len(&heads)),
    );

    // ANCHOR: ranks
    let cpu = Backend::Cpu;
    let shape = StateShape::new(lens.len() as u32, 8, 64)?;
    // What an all-gather leaves: [world, rows, heads, head_dim] and [world, rows, heads].
    let mut gathered_o = vec![bf16::ZERO; world * shape.v_len()];
    let mut gathered_lse = vec![0f32; world * shape.s_len()];
    let slots = gathered_o
        .chunks_mut(shape.v_len())
        .zip(gathered_lse.chunks_mut(shape.s_len()));
    for (shard, (o, lse)) in shards.into_iter().zip(slots) {
        let plan = BatchDecode::plan(&cpu, heads, shard.into_kv(), None)?;
        plan.run(
            &Standard,
            &View::host(&q),
            &View::host(&k),
            &View::host(&v),
            &mut ViewMut::host(o),
            Some(&mut ViewMut::host(lse)),
        )?;
    }
    // ANCHOR_END: ranks
    // ANCHOR: merge
    let (mut o, mut lse) = (vec![bf16::ZERO; shape.v_len()], vec![0f32; shape.s_len()]);
    merge_ranks(
        &cpu,
        shape,
        world as u32,
        State::new(&View::host(&gathered_o), &View::host(&gathered_lse)),
        StateMut::new(&mut ViewMut::host(&mut o), &mut ViewMut::host(&mut lse)),
    )?;
    // ANCHOR_END: merge

    let f32s = |x: &[bf16]| -> Vec<f32> { x.iter().map(|e| e.to_f32()).collect() };
    let batch = Batch::decode(heads, kv.clone())?;
    let want = reference::attention(&Standard, &batch, &f32s(&q), &f32s(&k), &f32s(&v))?;
    let (err, b, h) = worst_rel_l2(&batch, &f32s(&o), &want.o);
    println!(
        "{world} simulated ranks vs the whole cache: worst rel. L2 {err:.2e} (request {b}, head {h})"
    );
    assert!(err <= 1e-2);

    // ANCHOR: prefill
    // A causal prefill: 40, 17 and 100 new query rows at the end of each request. Each shard
    // knows where its keys sit (KvShard sets KvIndex::with_key_positions), so its causal mask is
    // the whole request's; the states merge as for decode.
    let qo = ferrinfer::attention::indptr(&[40, 17, 100]);
    let rows = *qo.last().unwrap() as u32;
    let pq = draw(rows as usize * 8 * 64);
    let pshape = StateShape::new(rows, 8, 64)?;
    let mut gathered_o = vec![bf16::ZERO; world * pshape.v_len()];
    let mut gathered_lse = vec![0f32; world * pshape.s_len()];
    let slots = gathered_o
        .chunks_mut(pshape.v_len())
        .zip(gathered_lse.chunks_mut(pshape.s_len()));
    for (shard, (o, lse)) in shard_kv(&kv, world)?.into_iter().zip(slots) {
        let batch = Batch::new(heads, &qo, shard.into_kv())?.with_causal(true);
        let plan = BatchPrefill::plan(&cpu, batch)?;
        plan.run(
            &Standard,
            &View::host(&pq),
            &View::host(&k),
            &View::host(&v),
            &mut ViewMut::host(o),
            Some(&mut ViewMut::host(lse)),
        )?;
    }
    let (mut po, mut plse) = (vec![bf16::ZERO; pshape.v_len()], vec![0f32; pshape.s_len()]);
    merge_ranks(
        &cpu,
        pshape,
        world as u32,
        State::new(&View::host(&gathered_o), &View::host(&gathered_lse)),
        StateMut::new(&mut ViewMut::host(&mut po), &mut ViewMut::host(&mut plse)),
    )?;
    // ANCHOR_END: prefill
    let pbatch = Batch::new(heads, &qo, kv.clone())?.with_causal(true);
    let want = reference::attention(&Standard, &pbatch, &f32s(&pq), &f32s(&k), &f32s(&v))?;
    let (err, b, h) = worst_rel_l2(&pbatch, &f32s(&po), &want.o);
    println!(
        "causal prefill, {world} simulated ranks vs the whole cache: worst rel. L2 {err:.2e} \
         (request {b}, head {h})"
    );
    assert!(err <= 1e-2);

    #[cfg(feature = "nccl")]
    {
        use ferrinfer::distributed::{Communicator, ContextParallelDecode, ContextParallelPrefill};
        use std::sync::Arc;
        on_every_gpu("ContextParallelDecode", &f32s(&o), |rank, world, id| {
            // ANCHOR: nccl
            let backend = Backend::cuda(rank)?;
            let comm = Arc::new(Communicator::new(&backend, id, rank, world)?);
            let shard = shard_kv(&kv, world)?.swap_remove(rank);
            let plan = ContextParallelDecode::<bf16>::plan(
                comm,
                heads,
                shard.into_kv(),
                None,
                PlanConfig::default(),
            )?;
            let (q, k, v) = (
                backend.upload(&q)?,
                backend.upload(&k)?,
                backend.upload(&v)?,
            );
            let mut o = backend.filled(q.len(), bf16::ZERO)?;
            plan.run(&Standard, &q, &k, &v, &mut o, None)?;
            o.to_vec()
            // ANCHOR_END: nccl
        })?;
        on_every_gpu("ContextParallelPrefill", &f32s(&po), |rank, world, id| {
            // ANCHOR: nccl_prefill
            let backend = Backend::cuda(rank)?;
            let comm = Arc::new(Communicator::new(&backend, id, rank, world)?);
            // The same requests and query rows on every rank, over this rank's keys.
            let shard = shard_kv(pbatch.kv(), world)?.swap_remove(rank);
            let batch = Batch::new(heads, pbatch.qo_indptr(), shard.into_kv())?
                .with_causal(pbatch.causal());
            let plan = ContextParallelPrefill::<bf16>::plan(comm, batch, PlanConfig::default())?;
            let (q, k, v) = (
                backend.upload(&pq)?,
                backend.upload(&k)?,
                backend.upload(&v)?,
            );
            let mut o = backend.filled(q.len(), bf16::ZERO)?;
            plan.run(&Standard, &q, &k, &v, &mut o, None)?;
            o.to_vec()
            // ANCHOR_END: nccl_prefill
        })?;
    }
    Ok(())
}

/// Every visible GPU a rank: `rank(rank, world, id)` on a thread each, all in one NCCL group,
/// then each rank's largest difference from the CPU merge `want`.
#[cfg(feature = "nccl")]
fn on_every_gpu(
    what: &str,
    want: &[f32],
    rank: impl Fn(usize, usize, &ferrinfer::distributed::NcclId) -> ferrinfer::Result<Vec<bf16>> + Sync,
) -> Result<(), Box<dyn std::error::Error>> {
    let world = match ferrinfer::device::Gpu::count() {
        Ok(n) if n > 0 => n,
        Ok(_) => {
            println!("no GPU: skipped {what}");
            return Ok(());
        }
        Err(e) => {
            println!("skipped {what}: {e}");
            return Ok(());
        }
    };
    // ANCHOR: gpu_threads
    let id = ferrinfer::distributed::NcclId::new()?;
    let outputs = std::thread::scope(|s| {
        let threads: Vec<_> = (0..world)
            .map(|r| {
                let (rank, id) = (&rank, &id);
                s.spawn(move || rank(r, world, id))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("rank thread"))
            .collect::<Vec<_>>()
    });
    // ANCHOR_END: gpu_threads
    for (r, o) in outputs.into_iter().enumerate() {
        let o: Vec<f32> = o?.iter().map(|e| e.to_f32()).collect();
        let diff = o
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("GPU rank {r} of {world}, {what}: max |o - CPU merge| = {diff:.2e}");
    }
    Ok(())
}
