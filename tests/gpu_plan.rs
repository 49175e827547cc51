//! GPU tests of plan/run: a run captured in a CUDA graph and replayed after a re-plan of another
//! batch into the same buffers; bit-for-bit batch invariance with a fixed KV split.

use ferrinfer::attention::reference::{self, rel_l2};
use ferrinfer::indptr;
use ferrinfer::prelude::*;
use ferrinfer::variants::{SoftCap, Standard};
use ferrinfer::{Input, RunBuffers};
use ferrinfer_testkit::Rng;

fn gpu() -> Backend {
    Backend::cuda(0).expect("this test needs a CUDA GPU")
}

/// A paged cache of `num_pages` pages holding requests of `kv_lens` tokens on shuffled pages.
fn paged(kv_lens: &[u32], page: u32, num_pages: u32, rng: &mut Rng) -> KvIndex {
    let total: u32 = kv_lens.iter().map(|&l| l.div_ceil(page)).sum();
    assert!(total <= num_pages);
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    KvIndex::paged_from_lens(
        page,
        kv_lens,
        &ids[..total as usize],
        num_pages,
        KvLayout::Nhd,
    )
    .unwrap()
}

/// Request A's output from every batch equals the one from the first, bit for bit, and is written.
fn assert_bit_identical(outputs: &[Vec<bf16>]) {
    for (i, o) in outputs.iter().enumerate() {
        assert!(o.iter().all(|x| !x.is_nan()), "neighbour set {i} left NaN");
        let same = o
            .iter()
            .zip(&outputs[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "request A differs bit for bit when batched with neighbour set {i}"
        );
    }
}

fn bf(xs: Vec<f32>) -> Vec<bf16> {
    xs.into_iter().map(bf16::from_f32).collect()
}

fn to_f32(xs: &[bf16]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_cuda_graph_replays_a_replanned_batch() {
    graph_replays_a_replanned_batch(DecodeKernel::CudaCores, KvWarps::Auto);
    graph_replays_a_replanned_batch(DecodeKernel::TensorCores, KvWarps::Auto);
    graph_replays_a_replanned_batch(DecodeKernel::TensorCores, KvWarps::Two);
}

/// A decode graph plan of 8 heads over 2 KV heads, hd128, page 16, in a cache of `num_pages`.
fn graph_plan(
    gpu: &Backend,
    first: KvIndex,
    (decode_kernel, kv_warps): (DecodeKernel, KvWarps),
    max_batch: u32,
    num_pages: u32,
) -> BatchDecode {
    let capacity = GraphCapacity {
        work_items: 1024,
        batch: max_batch,
        qo_rows: max_batch,
        kv_blocks: num_pages,
    };
    let config = PlanConfig {
        graph: Some(capacity),
        decode_kernel,
        kv_warps,
        ..PlanConfig::default()
    };
    let heads = Heads::new(8, 2, 128).unwrap();
    BatchDecode::plan_with(gpu, heads, first, None, config).unwrap()
}

fn graph_replays_a_replanned_batch(decode_kernel: DecodeKernel, kv_warps: KvWarps) {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(8, 2, 128).unwrap();
    let num_pages = 600;
    let cache_len = num_pages as usize * 16 * 2 * 128;
    let k = bf(rng.normal_vec(cache_len));
    let v = bf(rng.normal_vec(cache_len));
    let max_batch = 8;
    // Static buffers, as a graph needs, sized for the capacity (not the batch); spare rows of q
    // hold NaN, so a kernel that read past the batch would show it.
    let q_elems = max_batch as usize * 8 * 128;
    let variant = SoftCap { cap: 20.0 };

    // Captured on a small batch; later steps re-plan larger (and smaller) ones within capacity.
    let steps: [&[u32]; 5] = [
        &[300, 17],
        &[300, 17, 4096, 1, 2000, 64, 65, 9],
        &[16, 16, 16],
        &[4000, 1, 1, 1, 3000, 2, 511, 512],
        &[5000, 33],
    ];
    let first = paged(steps[0], 16, num_pages, &mut rng);
    let kernel = (decode_kernel, kv_warps);
    let plan = graph_plan(&gpu, first, kernel, max_batch, num_pages);
    let buffers = RunBuffers {
        q: gpu.filled(q_elems, bf16::NAN).unwrap(),
        k: gpu.upload(&k).unwrap(),
        v: gpu.upload(&v).unwrap(),
        o: gpu.filled(q_elems, bf16::NAN).unwrap(),
        lse: Some(gpu.filled(max_batch as usize * 8, f32::NAN).unwrap()),
    };
    let mut graph = plan.capture(variant, buffers).unwrap();
    for (step, lens) in steps.iter().enumerate() {
        let kv = paged(lens, 16, num_pages, &mut rng);
        graph.replan(kv.clone(), None).unwrap();
        let rows = lens.len() * 8 * 128;
        let mut q = bf(rng.normal_vec(rows));
        q.resize(q_elems, bf16::NAN);
        graph.write(Input::Q, &q).unwrap();
        graph.launch().unwrap();
        let got = to_f32(&graph.o().to_vec().unwrap()[..rows]);
        let batch = Batch::decode(heads, kv).unwrap();
        let want = reference::attention_typed(&variant, &batch, &q[..rows], &k, &v).unwrap();
        for (b, err) in per_request_errors(&got, &want.o, 8 * 128)
            .iter()
            .enumerate()
        {
            assert!(
                *err <= 1e-2,
                "{kernel:?} step {step} request {b}: relative L2 error {err:.2e} (seed {seed})"
            );
        }
        let lse = graph.lse().unwrap().to_vec().unwrap();
        for (i, (g, w)) in lse.iter().zip(&want.lse).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-2 * (1.0 + w.abs()),
                "{kernel:?} step {step} lse[{i}] = {g}, want {w} (seed {seed})"
            );
        }
    }
}

/// Relative L2 error of each consecutive run of `per` elements.
fn per_request_errors(got: &[f32], want: &[f64], per: usize) -> Vec<f64> {
    got.chunks(per)
        .zip(want.chunks(per))
        .map(|(g, w)| rel_l2(g, w))
        .collect()
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_cuda_graph_refuses_what_a_capture_froze() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let num_pages = 64;
    let kv = paged(&[40, 7], 16, num_pages, &mut rng);
    let heads = Heads::new(8, 2, 128).unwrap();
    let kernel = (DecodeKernel::Auto, KvWarps::Auto);
    let mut plan = graph_plan(&gpu, kv.clone(), kernel, 4, num_pages);
    let err = |r: ferrinfer::Result<()>| r.unwrap_err().to_string();
    // sm_scale, page size and the cache's capacity were frozen by the first plan.
    let e = err(plan.replan(kv.clone(), Some(0.5)));
    assert!(e.contains("cannot change sm_scale"), "{e}");
    let bigger = KvIndex::paged(
        16,
        kv.indptr(),
        kv.indices(),
        kv.last_len(),
        65,
        KvLayout::Nhd,
    );
    let e = err(plan.replan(bigger.unwrap(), None));
    assert!(e.contains("capacity"), "{e}");
    let pages8 = paged(&[40, 7], 8, num_pages, &mut rng);
    let e = err(plan.replan(pages8, None));
    assert!(e.contains("cannot change page_size"), "{e}");
    let hnd = KvIndex::paged(
        16,
        kv.indptr(),
        kv.indices(),
        kv.last_len(),
        64,
        KvLayout::Hnd,
    );
    let e = err(plan.replan(hnd.unwrap(), None));
    assert!(e.contains("cannot change layout"), "{e}");
    // Past the capacity: five requests for four.
    let e = err(plan.replan(paged(&[1; 5], 16, num_pages, &mut rng), None));
    assert!(e.contains("capacity"), "{e}");
    // A prefill graph plan pins the causal flag.
    let ragged = KvIndex::ragged_in(&[0, 10, 30], 64, KvLayout::Nhd).unwrap();
    let batch = Batch::new(heads, &[0, 3, 5], ragged.clone()).unwrap();
    let config = PlanConfig {
        graph: Some(GraphCapacity {
            work_items: 256,
            batch: 4,
            qo_rows: 16,
            kv_blocks: 4,
        }),
        ..PlanConfig::default()
    };
    let mut prefill = BatchPrefill::plan_with(&gpu, batch.clone(), config).unwrap();
    let e = err(prefill.replan(batch.with_causal(true)));
    assert!(e.contains("cannot change causal"), "{e}");
    // Buffers sized for the batch rather than the capacity are refused.
    let (q, k, v) = (
        gpu.filled(5 * 8 * 128, bf16::ONE).unwrap(),
        gpu.filled(64 * 2 * 128, bf16::ONE).unwrap(),
        gpu.filled(64 * 2 * 128, bf16::ONE).unwrap(),
    );
    let mut o = gpu.filled(5 * 8 * 128, bf16::NAN).unwrap();
    let e = err(prefill.run(&Standard, &q, &k, &v, &mut o, None));
    assert!(e.contains("q has 5120 elements"), "{e}");
    // A plan made without graph mode cannot be captured.
    let plain = BatchDecode::plan(&gpu, heads, kv, None).unwrap();
    let buffers = RunBuffers {
        q: gpu.filled(2 * 8 * 128, bf16::ONE).unwrap(),
        k: gpu.filled(64 * 16 * 2 * 128, bf16::ONE).unwrap(),
        v: gpu.filled(64 * 16 * 2 * 128, bf16::ONE).unwrap(),
        o: gpu.filled(2 * 8 * 128, bf16::NAN).unwrap(),
        lse: None,
    };
    let e = plain.capture(Standard, buffers).err().unwrap().to_string();
    assert!(e.contains("CUDA-graph mode"), "{e}");
}

/// A prefill graph plan keeps the query tile of its first plan: a captured kernel of 16 rows
/// replayed on a replanned batch of long prompts (which alone would get 64- or 128-row tiles, and
/// items of as many rows) must still write every row. Ragged cache, GQA 4, head dim 128, causal.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_cuda_graph_prefill_keeps_its_query_tile() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(8, 2, 128).unwrap();
    let (max_rows, cache_tokens) = (600u32, 1200u32);
    let k = bf(rng.normal_vec(cache_tokens as usize * 2 * 128));
    let v = bf(rng.normal_vec(cache_tokens as usize * 2 * 128));
    let q_elems = max_rows as usize * 8 * 128;
    let batch = |qo: &[u32], kv: &[u32]| {
        let cache = KvIndex::ragged_in(&indptr(kv), cache_tokens, KvLayout::Nhd).unwrap();
        Batch::new(heads, &indptr(qo), cache)
            .unwrap()
            .with_causal(true)
    };
    let tile = |list: Option<&ferrinfer::attention::plan::WorkList>| {
        list.and_then(|l| l.tiles.as_ref())
            .expect("a GPU plan records its tiles")
            .cta_tile_q
    };
    // (query rows, keys) a request: a short first batch (a 16-row tile), then long prompts.
    let steps: [(&[u32], &[u32]); 3] = [
        (&[2, 3], &[40, 90]),
        (&[300, 250], &[300, 700]),
        (&[1, 599], &[5, 600]),
    ];
    let long = batch(steps[1].0, steps[1].1);
    let alone = BatchPrefill::plan(&gpu, long).unwrap();
    assert!(
        tile(alone.work_list()) > 16,
        "the long batch alone takes a larger tile"
    );
    let config = PlanConfig {
        graph: Some(GraphCapacity {
            work_items: 2048,
            batch: 4,
            qo_rows: max_rows,
            kv_blocks: 4,
        }),
        ..PlanConfig::default()
    };
    let plan = BatchPrefill::plan_with(&gpu, batch(steps[0].0, steps[0].1), config).unwrap();
    assert_eq!(tile(plan.work_list()), 16);
    let buffers = RunBuffers {
        q: gpu.filled(q_elems, bf16::NAN).unwrap(),
        k: gpu.upload(&k).unwrap(),
        v: gpu.upload(&v).unwrap(),
        o: gpu.filled(q_elems, bf16::NAN).unwrap(),
        lse: None,
    };
    let mut graph = plan.capture(Standard, buffers).unwrap();
    for (step, (qo, kv)) in steps.iter().enumerate() {
        let b = batch(qo, kv);
        graph.replan(b.clone()).unwrap();
        assert_eq!(tile(graph.plan().work_list()), 16, "step {step}");
        let rows = qo.iter().sum::<u32>() as usize * 8 * 128;
        let mut q = bf(rng.normal_vec(rows));
        q.resize(q_elems, bf16::NAN);
        graph.write(Input::Q, &q).unwrap();
        graph.launch().unwrap();
        let got = to_f32(&graph.o().to_vec().unwrap()[..rows]);
        let want = reference::attention_typed(&Standard, &b, &q[..rows], &k, &v).unwrap();
        let err = rel_l2(&got, &want.o);
        assert!(
            err <= 1e-2,
            "step {step}: relative L2 error {err:.2e} (seed {seed})"
        );
    }
}

/// A decode graph plan keeps the warps along the keys of its first plan (a captured kernel does
/// not change), whichever the later batches would get alone: GQA 4 at head dim 64, 128 requests
/// over pages of 16 (1024 work items, at least a wave of two-warp CTAs on any GPU of up to 256
/// SMs: one warp) against 2 (16 items, under a wave: two).
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_cuda_graph_keeps_the_warps_along_the_keys_of_its_first_plan() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let heads = Heads::new(32, 8, 64).unwrap();
    let num_pages = 128 * 7;
    let many = || paged(&[100; 128], 16, num_pages, &mut Rng::new(1));
    let few = paged(&[100; 2], 16, num_pages, &mut rng);
    let warps = |plan: &BatchDecode| {
        let list = plan.work_list().expect("a GPU plan has a work list");
        let tiles = list.tiles.as_ref().expect("a plan records its tiles");
        assert_eq!(tiles.cta_tile_q, 16);
        tiles.instance.kv_warps.max(1)
    };
    // Alone, each batch gets its own count.
    let alone = |kv: KvIndex| BatchDecode::plan(&gpu, heads, kv, None).unwrap();
    assert_eq!((warps(&alone(many())), warps(&alone(few.clone()))), (1, 2));
    // In graph mode the first plan's count holds.
    let config = PlanConfig {
        graph: Some(GraphCapacity {
            work_items: 8192,
            batch: 128,
            qo_rows: 128,
            kv_blocks: num_pages,
        }),
        ..PlanConfig::default()
    };
    let graph = |kv: KvIndex| BatchDecode::plan_with(&gpu, heads, kv, None, config).unwrap();
    let mut from_many = graph(many());
    from_many.replan(few.clone(), None).unwrap();
    assert_eq!(warps(&from_many), 1);
    let mut from_few = graph(few);
    from_few.replan(many(), None).unwrap();
    assert_eq!(warps(&from_few), 2);
    // A caller's count holds in graph mode against the one `Auto` would pick, either way.
    let fixed = |n: KvWarps| PlanConfig {
        kv_warps: n,
        ..config
    };
    let mut one = BatchDecode::plan_with(&gpu, heads, many(), None, fixed(KvWarps::One)).unwrap();
    assert_eq!(warps(&one), 1);
    one.replan(many(), None).unwrap();
    assert_eq!(warps(&one), 1);
    let few = paged(&[1], 16, num_pages, &mut rng);
    let mut two = BatchDecode::plan_with(&gpu, heads, few, None, fixed(KvWarps::Two)).unwrap();
    assert_eq!(warps(&two), 2);
    two.replan(many(), None).unwrap();
    assert_eq!(warps(&two), 2);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_one_device_one_stream_and_concurrent_runs_do_not_mix() {
    let a = Backend::cuda(0).unwrap();
    let b = Backend::cuda(0).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(a.gpu().unwrap(), b.gpu().unwrap()),
        "two Backend::cuda(0) must share one Gpu (one stream)"
    );
    // Four threads run one split-KV plan (its scratch buffers shared) on different inputs.
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(8, 2, 128).unwrap();
    let num_pages = 1600;
    let kv = paged(&[8000, 9000, 7000], 16, num_pages, &mut rng);
    let plan = BatchDecode::plan(&a, heads, kv.clone(), None).unwrap();
    assert!(
        plan.work_list().unwrap().kv_chunk < 7000,
        "the test needs a split KV"
    );
    let cache = num_pages as usize * 16 * 2 * 128;
    let k = bf(rng.normal_vec(cache));
    let v = bf(rng.normal_vec(cache));
    let (kd, vd) = (a.upload(&k).unwrap(), a.upload(&v).unwrap());
    let batch = Batch::decode(heads, kv).unwrap();
    let qs: Vec<Vec<bf16>> = (0..4).map(|_| bf(rng.normal_vec(3 * 8 * 128))).collect();
    let outs: Vec<Vec<bf16>> = std::thread::scope(|s| {
        let handles: Vec<_> = qs
            .iter()
            .map(|q| {
                let (plan, kd, vd, a) = (&plan, &kd, &vd, &a);
                s.spawn(move || {
                    let qd = a.upload(q).unwrap();
                    let mut od = a.filled(q.len(), bf16::NAN).unwrap();
                    for _ in 0..20 {
                        plan.run(&Standard, &qd, kd, vd, &mut od, None).unwrap();
                    }
                    od.to_vec().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, (q, o)) in qs.iter().zip(&outs).enumerate() {
        let want = reference::attention_typed(&Standard, &batch, q, &k, &v).unwrap();
        for (b, err) in per_request_errors(&to_f32(o), &want.o, 8 * 128)
            .iter()
            .enumerate()
        {
            assert!(
                *err <= 1e-2,
                "thread {t} request {b}: {err:.2e} (seed {seed})"
            );
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_fixed_split_is_batch_invariant() {
    fixed_split_is_batch_invariant(DecodeKernel::CudaCores);
    fixed_split_is_batch_invariant(DecodeKernel::TensorCores);
}

fn fixed_split_is_batch_invariant(decode_kernel: DecodeKernel) {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let heads = Heads::new(8, 2, 128).unwrap();
    let num_pages = 800u32;
    let cache_len = num_pages as usize * 16 * 2 * 128;
    let (kd, vd) = (
        gpu.upload(&bf(rng.normal_vec(cache_len))).unwrap(),
        gpu.upload(&bf(rng.normal_vec(cache_len))).unwrap(),
    );
    let config = PlanConfig {
        fixed_kv_chunk: Some(256),
        decode_kernel,
        ..PlanConfig::default()
    };
    // Request A (3000 tokens on pages 0..188) alone, then with different neighbours on the pages
    // after it.
    let q_a = bf(rng.normal_vec(8 * 128));
    let mut outputs = Vec::new();
    for others in [vec![], vec![17u32], vec![4096, 1, 600], vec![1; 20]] {
        let lens: Vec<u32> = std::iter::once(3000)
            .chain(others.iter().copied())
            .collect();
        let pages: Vec<i32> = (0..lens.iter().map(|l| l.div_ceil(16) as i32).sum()).collect();
        let kv = KvIndex::paged_from_lens(16, &lens, &pages, num_pages, KvLayout::Nhd).unwrap();
        let batch = 1 + others.len();
        let mut q = q_a.clone();
        q.extend(bf(rng.normal_vec((batch - 1) * 8 * 128)));
        let qd = gpu.upload(&q).unwrap();
        let mut od = gpu.filled(batch * 8 * 128, bf16::NAN).unwrap();
        let plan = BatchDecode::plan_with(&gpu, heads, kv, None, config).unwrap();
        plan.run(&Standard, &qd, &kd, &vd, &mut od, None).unwrap();
        outputs.push(od.to_vec().unwrap()[..8 * 128].to_vec());
    }
    assert_bit_identical(&outputs);
}

/// A request's prefill output is the same bit for bit whatever it is batched with, at head dims 64
/// and 256 (where `Auto` on Hopper would otherwise pick its tile, and so FA2 or FA3, by the batch's
/// average rows: forty one-row requests beside it bring that under 64).
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_prefill_fixed_split_is_batch_invariant() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let config = PlanConfig {
        fixed_kv_chunk: Some(512),
        ..PlanConfig::default()
    };
    let (qa, ka) = (300u32, 2000u32);
    for d in [64usize, 256] {
        let heads = Heads::new(8, 2, d as u32).unwrap();
        let q_a = bf(rng.normal_vec(qa as usize * 8 * d));
        let k_a = bf(rng.normal_vec(ka as usize * 2 * d));
        let v_a = bf(rng.normal_vec(ka as usize * 2 * d));
        let mut outputs = Vec::new();
        let short = vec![(1u32, 100u32); 40];
        for others in [
            vec![],
            vec![(5u32, 40u32)],
            vec![(1000, 3000), (1, 1)],
            short,
        ] {
            let mut qo = vec![qa];
            let mut kvl = vec![ka];
            for &(q, k) in &others {
                qo.push(q);
                kvl.push(k);
            }
            let (mut q, mut k, mut v) = (q_a.clone(), k_a.clone(), v_a.clone());
            let extra_q: u32 = qo[1..].iter().sum();
            let extra_k: u32 = kvl[1..].iter().sum();
            q.extend(bf(rng.normal_vec(extra_q as usize * 8 * d)));
            k.extend(bf(rng.normal_vec(extra_k as usize * 2 * d)));
            v.extend(bf(rng.normal_vec(extra_k as usize * 2 * d)));
            let kv = KvIndex::ragged(&indptr(&kvl), KvLayout::Nhd).unwrap();
            let batch = Batch::new(heads, &indptr(&qo), kv)
                .unwrap()
                .with_causal(true);
            let plan = BatchPrefill::plan_with(&gpu, batch, config).unwrap();
            let (qd, kd, vd) = (
                gpu.upload(&q).unwrap(),
                gpu.upload(&k).unwrap(),
                gpu.upload(&v).unwrap(),
            );
            let mut od = gpu.filled(q.len(), bf16::NAN).unwrap();
            plan.run(&Standard, &qd, &kd, &vd, &mut od, None).unwrap();
            outputs.push(od.to_vec().unwrap()[..q_a.len()].to_vec());
        }
        assert_bit_identical(&outputs);
    }
}
