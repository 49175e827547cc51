//! Plan, run, replan; the batch-invariant mode; and (on a GPU only) a decode step captured into a
//! CUDA graph and replayed for growing batches. Every output is checked against the f64 CPU
//! reference.
//!
//!     cargo run --example plan_and_graphs

use ferrinfer::attention::reference::{self, rel_l2};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;
use ferrinfer_testkit::Rng;

fn bf(xs: Vec<f32>) -> Vec<bf16> {
    xs.into_iter().map(bf16::from_f32).collect()
}

fn f32s(xs: &[bf16]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

/// A paged index of these lengths on pages 0, 1, 2... in order.
fn paged(lens: &[u32], page: u32, num_pages: u32) -> ferrinfer::Result<KvIndex> {
    let used: u32 = lens.iter().map(|l| l.div_ceil(page)).sum();
    let pages: Vec<i32> = (0..used as i32).collect();
    KvIndex::paged_from_lens(page, lens, &pages, num_pages, KvLayout::Nhd)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (backend, _) = Backend::auto();
    println!("backend: {}", backend.describe());
    let mut rng = Rng::new(11);
    let heads = Heads::new(8, 2, 64)?;
    let (page, num_pages) = (16u32, 128u32);
    let cache = (num_pages * page) as usize * 2 * 64;
    let (k, v) = (bf(rng.normal_vec(cache)), bf(rng.normal_vec(cache)));
    let (kd, vd) = (backend.upload(&k)?, backend.upload(&v)?);

    // ANCHOR: plan
    // Two requests append 3 and 20 tokens to a paged cache (their KV lengths count the new ones).
    let first =
        Batch::new(heads, &[0, 3, 23], paged(&[40, 200], page, num_pages)?)?.with_causal(true);
    let mut plan = BatchPrefill::plan(&backend, first)?;
    let mut q = bf(rng.normal_vec(plan.batch().q_len()));
    let mut o = backend.filled(q.len(), bf16::ZERO)?;
    plan.run(&Standard, &backend.upload(&q)?, &kd, &vd, &mut o, None)?;

    // The next step: another batch with the same heads, planned into the same buffers.
    let next = Batch::new(
        heads,
        &[0, 1, 2, 10],
        paged(&[41, 201, 8], page, num_pages)?,
    )?
    .with_causal(true);
    plan.replan(next)?;
    q = bf(rng.normal_vec(plan.batch().q_len()));
    let mut o = backend.filled(q.len(), bf16::ZERO)?;
    plan.run(&Standard, &backend.upload(&q)?, &kd, &vd, &mut o, None)?;
    // ANCHOR_END: plan
    let want = reference::attention_typed(&Standard, plan.batch(), &q, &k, &v)?;
    println!(
        "replanned prefill of {} rows: relative L2 error {:.1e}",
        plan.batch().total_qo(),
        rel_l2(&f32s(&o.to_vec()?), &want.o)
    );
    // ANCHOR: work_list
    if let Some(work) = plan.work_list() {
        println!(
            "work list: {} items, query tile {} rows, KV chunk {} tokens",
            work.items.len(),
            work.cta_tile_q,
            work.kv_chunk
        );
        if let Some(tiles) = &work.tiles {
            println!("{tiles}");
        }
    }
    // ANCHOR_END: work_list

    // ANCHOR: invariant
    // Batch-invariant mode: every request's KV is cut into chunks of exactly 128 tokens, so
    // request 0's output is the same bit for bit alone and next to two long requests.
    let config = PlanConfig {
        fixed_kv_chunk: Some(128),
        ..PlanConfig::default()
    };
    let q0 = bf(rng.normal_vec(8 * 64));
    let mut rows = Vec::new();
    for lens in [&[300u32][..], &[300, 900, 17]] {
        let plan =
            BatchDecode::plan_with(&backend, heads, paged(lens, page, num_pages)?, None, config)?;
        let mut q = q0.clone();
        q.resize(lens.len() * 8 * 64, bf16::ONE);
        let mut o = backend.filled(q.len(), bf16::ZERO)?;
        plan.run(&Standard, &backend.upload(&q)?, &kd, &vd, &mut o, None)?;
        rows.push(o.to_vec()?[..8 * 64].to_vec());
    }
    println!(
        "request 0 alone and in a batch of 3, bit for bit equal: {}",
        rows[0] == rows[1]
    );
    // ANCHOR_END: invariant
    if rows[0] != rows[1] {
        return Err("the batch-invariant mode changed request 0's output".into());
    }

    // ANCHOR: graph
    // CUDA graphs need a GPU: the CPU backend refuses to capture.
    if let Backend::Cuda(_) = &backend {
        let max_batch = 4u32;
        let config = PlanConfig {
            graph: Some(GraphCapacity {
                work_items: 512,
                batch: max_batch,
                qo_rows: max_batch,
                kv_blocks: num_pages,
            }),
            ..PlanConfig::default()
        };
        let steps: [&[u32]; 3] = [&[40, 7], &[41, 8, 100], &[42, 9, 101, 300]];
        let plan = BatchDecode::plan_with(
            &backend,
            heads,
            paged(steps[0], page, num_pages)?,
            None,
            config,
        )?;
        // Buffers of the capacity, not of the batch: the graph keeps their addresses.
        let q_len = max_batch as usize * 8 * 64;
        let buffers = RunBuffers {
            q: backend.filled(q_len, bf16::ZERO)?,
            k: backend.upload(&k)?,
            v: backend.upload(&v)?,
            o: backend.filled(q_len, bf16::ZERO)?,
            lse: None,
        };
        // Runs once eagerly (JIT, parameter upload), then records.
        let mut graph = plan.capture(Standard, buffers)?;
        for lens in steps {
            let kv = paged(lens, page, num_pages)?;
            graph.replan(kv.clone(), None)?; // new work list, same device addresses
            let rows = lens.len() * 8 * 64;
            let mut q = bf(rng.normal_vec(rows));
            q.resize(q_len, bf16::ZERO);
            graph.write(Input::Q, &q)?; // the whole buffer, in place
            graph.launch()?;
            let got = f32s(&graph.o().to_vec()?[..rows]);
            let want = reference::attention_typed(
                &Standard,
                &Batch::decode(heads, kv)?,
                &q[..rows],
                &k,
                &v,
            )?;
            println!(
                "graph replay, batch {}: relative L2 error {:.1e}",
                lens.len(),
                rel_l2(&got, &want.o)
            );
        }
    } else {
        println!("CUDA graphs need a GPU: capture skipped on the CPU backend");
    }
    // ANCHOR_END: graph
    Ok(())
}
