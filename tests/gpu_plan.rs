//! GPU tests of plan/run: a run captured in a CUDA graph and replayed after a re-plan of another
//! batch into the same buffers; bit-for-bit batch invariance with a fixed KV split.

use ferrinfer::attention::reference::{self, rel_l2};
use ferrinfer::indptr;
use ferrinfer::prelude::*;
use ferrinfer::variants::{SoftCap, Standard};
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
    graph_replays_a_replanned_batch(DecodeKernel::CudaCores);
    graph_replays_a_replanned_batch(DecodeKernel::TensorCores);
}

fn graph_replays_a_replanned_batch(decode_kernel: DecodeKernel) {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(8, 2, 128).unwrap();
    let num_pages = 600;
    let cache_len = num_pages as usize * 16 * 2 * 128;
    let k = bf(rng.normal_vec(cache_len));
    let v = bf(rng.normal_vec(cache_len));
    let (kd, vd) = (gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap());
    let max_batch = 8;
    let capacity = GraphCapacity {
        work_items: 1024,
        batch: max_batch,
        qo_rows: max_batch,
        kv_blocks: num_pages,
    };
    let config = PlanConfig {
        graph: Some(capacity),
        decode_kernel,
        ..PlanConfig::default()
    };

    // Static query and output buffers, as a graph needs; sized for the largest batch.
    let q_elems = max_batch as usize * 8 * 128;
    let mut qd = gpu.filled(q_elems, bf16::ZERO).unwrap();
    let mut od = gpu.filled(q_elems, bf16::NAN).unwrap();
    let variant = SoftCap { cap: 20.0 };

    let first = paged(&[300, 17, 4096, 1], 16, num_pages, &mut rng);
    let mut plan = BatchDecode::plan_with(&gpu, heads, first, None, config).unwrap();
    // The first step is captured with buffers of its size (run checks lengths); later steps are
    // replays only, so they may use fewer requests: the kernels take the batch from the workspace.
    let steps: [&[u32]; 4] = [
        &[300, 17, 4096, 1, 2000, 64, 65, 9],
        &[16, 16, 16],
        &[4000, 1, 1, 1, 3000, 2, 511, 512],
        &[5000, 33],
    ];
    let mut graph = None;
    for (step, lens) in steps.iter().enumerate() {
        let kv = paged(lens, 16, num_pages, &mut rng);
        plan.replan(kv.clone(), None).unwrap();
        let q = bf(rng.normal_vec(q_elems));
        qd.copy_from(&q).unwrap();
        od.copy_from(&vec![bf16::NAN; q_elems]).unwrap();
        if step == 0 {
            // Warm up (compile, load), then capture.
            plan.run(&variant, &qd, &kd, &vd, &mut od, None).unwrap();
            let g = gpu
                .gpu()
                .unwrap()
                .capture(|| plan.run(&variant, &qd, &kd, &vd, &mut od, None))
                .unwrap();
            graph = Some(g);
        }
        graph.as_ref().unwrap().launch().unwrap();
        let rows = lens.len() * 8 * 128;
        let got = to_f32(&od.to_vec().unwrap()[..rows]);
        let batch = Batch::decode(heads, kv).unwrap();
        let want = reference::attention_typed(&variant, &batch, &q[..rows], &k, &v).unwrap();
        let err = rel_l2(&got, &want.o);
        assert!(
            err <= 1e-2,
            "{decode_kernel:?} step {step}: relative L2 error {err:.2e} (seed {seed})"
        );
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

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_prefill_fixed_split_is_batch_invariant() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let heads = Heads::new(8, 2, 64).unwrap();
    let config = PlanConfig {
        fixed_kv_chunk: Some(512),
        ..PlanConfig::default()
    };
    let (qa, ka) = (300u32, 2000u32);
    let q_a = bf(rng.normal_vec(qa as usize * 8 * 64));
    let k_a = bf(rng.normal_vec(ka as usize * 2 * 64));
    let v_a = bf(rng.normal_vec(ka as usize * 2 * 64));
    let mut outputs = Vec::new();
    for others in [vec![], vec![(5u32, 40u32)], vec![(1000, 3000), (1, 1)]] {
        let mut qo = vec![qa];
        let mut kvl = vec![ka];
        for &(q, k) in &others {
            qo.push(q);
            kvl.push(k);
        }
        let (mut q, mut k, mut v) = (q_a.clone(), k_a.clone(), v_a.clone());
        let extra_q: u32 = qo[1..].iter().sum();
        let extra_k: u32 = kvl[1..].iter().sum();
        q.extend(bf(rng.normal_vec(extra_q as usize * 8 * 64)));
        k.extend(bf(rng.normal_vec(extra_k as usize * 2 * 64)));
        v.extend(bf(rng.normal_vec(extra_k as usize * 2 * 64)));
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
