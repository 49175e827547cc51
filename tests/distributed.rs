//! Context parallelism. CPU: a simulated N-rank split (shard_kv, each rank's decode or prefill
//! with the LSE on the CPU backend, merge_ranks: the code the GPU path runs) equals
//! single-device attention over the whole context, for random batches (causal prefill with
//! fewer query rows than keys, variants that read key positions); key positions of 0 change
//! nothing; bad key positions and variants a shard cannot run are refused. GPU (`gpu_*`): the
//! prefill and decode kernels with key positions against the CPU reference (one GPU); with
//! feature `nccl`, every visible GPU a rank over NCCL, each rank's merged result against
//! one-GPU attention of the whole context, decode and prefill; world size 1; capture and replay;
//! the in-place all-reduce (bf16, f32) against the host sum of every rank's input.

use ferrinfer::attention::reference::{self, worst_rel_l2};
use ferrinfer::distributed::{check_shardable, merge_ranks, shard_kv};
use ferrinfer::ops::cascade::{State, StateMut, StateShape};
use ferrinfer::prelude::*;
use ferrinfer::variant::Variant;
use ferrinfer::variants::{
    Alibi, AttentionSink, FlashSigmoid, LlamaRope, SlidingWindow, SoftCap, Standard,
};
use ferrinfer_testkit::Rng;

/// A decode or prefill batch over a paged cache: shuffled page ids, spare pages of NaN (reading
/// a page that is not the request's shows), random q/k/v rounded to bf16.
struct Case {
    heads: Heads,
    kv: KvIndex,
    /// `qo_indptr`; one row per request for a decode.
    qo: Vec<i32>,
    /// A prefill (BatchPrefill, maybe causal) rather than a decode (BatchDecode).
    prefill: bool,
    causal: bool,
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

impl Case {
    /// A decode step over requests of `lens` keys.
    fn new(rng: &mut Rng, heads: Heads, page: u32, lens: &[u32]) -> Case {
        let ones = vec![1; lens.len()];
        let mut case = Case::prefill(rng, heads, page, lens, &ones, false);
        case.prefill = false;
        case
    }
    /// A prefill of `qo_lens` query rows over requests of `lens` keys.
    fn prefill(
        rng: &mut Rng,
        heads: Heads,
        page: u32,
        lens: &[u32],
        qo_lens: &[u32],
        causal: bool,
    ) -> Case {
        let used: u32 = lens.iter().map(|l| l.div_ceil(page)).sum();
        let spare = 3;
        let mut ids: Vec<i32> = (0..(used + spare) as i32).collect();
        rng.shuffle(&mut ids);
        let pages = &ids[..used as usize];
        let kv = KvIndex::paged_from_lens(page, lens, pages, used + spare, KvLayout::Nhd).unwrap();
        let len = kv.buffer_len(&heads);
        let per_page = len / (used + spare) as usize;
        let fill = |rng: &mut Rng| -> Vec<bf16> {
            let mut x: Vec<bf16> = rng
                .normal_vec(len)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            for &p in &ids[used as usize..] {
                x[p as usize * per_page..(p as usize + 1) * per_page].fill(bf16::NAN);
            }
            x
        };
        let (k, v) = (fill(rng), fill(rng));
        let qo = ferrinfer::attention::indptr(qo_lens);
        let rows = *qo.last().unwrap() as usize;
        let q = rng
            .normal_vec(rows * (heads.num_qo_heads() * heads.head_dim()) as usize)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        Case {
            heads,
            kv,
            qo,
            prefill: true,
            causal,
            q,
            k,
            v,
        }
    }
    fn shape(&self) -> StateShape {
        let h = self.heads;
        let rows = *self.qo.last().unwrap() as u32;
        StateShape::new(rows, h.num_qo_heads(), h.head_dim()).unwrap()
    }
    /// The batch over `kv` (the whole index, or a shard of it).
    fn batch(&self, kv: KvIndex) -> Batch {
        Batch::new(self.heads, &self.qo, kv)
            .unwrap()
            .with_causal(self.causal)
    }
}

/// `world` simulated ranks on the CPU backend: each decodes its shard with the LSE into its slot
/// of the rank-major gathered buffers (what NCCL's all-gather leaves), then merge_ranks.
fn simulate<V: Variant>(variant: &V, case: &Case, world: usize) -> (Vec<bf16>, Vec<f32>) {
    let cpu = Backend::Cpu;
    let shape = case.shape();
    let mut go = vec![bf16::NAN; world * shape.v_len()];
    let mut gs = vec![f32::NAN; world * shape.s_len()];
    let slots = go
        .chunks_mut(shape.v_len())
        .zip(gs.chunks_mut(shape.s_len()));
    for (shard, (o, s)) in shard_kv(&case.kv, world).unwrap().into_iter().zip(slots) {
        let (q, k, v) = (
            View::host(&case.q),
            View::host(&case.k),
            View::host(&case.v),
        );
        let (mut o, mut s) = (ViewMut::host(o), ViewMut::host(s));
        if case.prefill {
            let plan = BatchPrefill::plan(&cpu, case.batch(shard.into_kv())).unwrap();
            plan.run(variant, &q, &k, &v, &mut o, Some(&mut s)).unwrap();
        } else {
            let plan = BatchDecode::plan(&cpu, case.heads, shard.into_kv(), None).unwrap();
            plan.run(variant, &q, &k, &v, &mut o, Some(&mut s)).unwrap();
        }
    }
    let (mut o, mut lse) = (
        vec![bf16::NAN; shape.v_len()],
        vec![f32::NAN; shape.s_len()],
    );
    merge_ranks(
        &cpu,
        shape,
        world as u32,
        State::new(&View::host(&go), &View::host(&gs)),
        StateMut::new(&mut ViewMut::host(&mut o), &mut ViewMut::host(&mut lse)),
    )
    .unwrap();
    (o, lse)
}

fn f32s(xs: &[bf16]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

/// The merged result against the f64 reference of the whole batch: rel. L2 <= 1e-2 per
/// (request, head) for o (bf16), 1e-4 absolute for the LSE (f32 merge of f64-exact parts).
fn check_against_whole<V: Variant>(variant: &V, case: &Case, world: usize, what: &str) {
    let batch = case.batch(case.kv.clone());
    let want = reference::attention(
        variant,
        &batch,
        &f32s(&case.q),
        &f32s(&case.k),
        &f32s(&case.v),
    )
    .unwrap();
    let (o, lse) = simulate(variant, case, world);
    let (err, b, h) = worst_rel_l2(&batch, &f32s(&o), &want.o);
    assert!(
        err <= 1e-2,
        "{what}, world {world}: rel L2 {err:e} at request {b} head {h}"
    );
    for (i, (g, w)) in lse.iter().zip(&want.lse).enumerate() {
        let ok = (f64::from(*g) == *w) || (f64::from(*g) - w).abs() <= 1e-4 * w.abs().max(1.0);
        assert!(ok, "{what}, world {world}: lse[{i}] {g} vs {w}");
    }
}

/// The simulated tests' heads and page sizes: GQA 4 and 1, page sizes 16 and 1.
fn shapes() -> [(Heads, u32); 3] {
    [
        (Heads::new(8, 2, 16).unwrap(), 16),
        (Heads::new(4, 4, 8).unwrap(), 1),
        (Heads::new(8, 2, 32).unwrap(), 1),
    ]
}

#[test]
fn simulated_ranks_equal_single_device_decode() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    // GQA 4 and 1, page sizes 1 and 16; lengths below one page, below N pages, empty, long.
    for (heads, page) in shapes() {
        for _ in 0..3 {
            let n = 1 + rng.below(5);
            let mut lens: Vec<u32> = (0..n).map(|_| 1 + rng.below(150) as u32).collect();
            lens.push(1 + rng.below(3) as u32); // fewer pages than ranks
            lens.push(0); // no keys at all: o = 0, lse = -inf on every rank
            rng.shuffle(&mut lens);
            let case = Case::new(&mut rng, heads, page, &lens);
            for world in 1..=4 {
                let what = format!("seed {seed}, page {page}, {heads:?}, lens {lens:?}");
                check_against_whole(&Standard, &case, world, &what);
                check_against_whole(&SoftCap { cap: 5.0 }, &case, world, &what);
            }
        }
    }
}

#[test]
fn simulated_ranks_equal_single_device_prefill() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    // GQA 4 and 1, page sizes 1 and 16; causal and not; queries shorter than their context
    // (append), as long, and longer (rows that see no key under the causal mask); requests
    // shorter than N pages and empty ones.
    for (heads, page) in shapes() {
        for causal in [true, false] {
            let n = 1 + rng.below(4);
            let mut lens: Vec<u32> = (0..n).map(|_| 1 + rng.below(120) as u32).collect();
            lens.push(1 + rng.below(3) as u32);
            lens.push(0);
            rng.shuffle(&mut lens);
            let qo_lens: Vec<u32> = lens
                .iter()
                .map(|&l| match rng.below(3) {
                    0 => (1 + rng.below(l.max(1) as usize) as u32).min(l.max(1)),
                    1 => l.max(1),
                    _ => l + 1 + rng.below(4) as u32,
                })
                .collect();
            let case = Case::prefill(&mut rng, heads, page, &lens, &qo_lens, causal);
            let alibi = Alibi::new(heads.num_qo_heads());
            for world in 1..=4 {
                let what = format!(
                    "seed {seed}, page {page}, {heads:?}, causal {causal}, lens {lens:?}, \
                     qo {qo_lens:?}"
                );
                check_against_whole(&Standard, &case, world, &what);
                check_against_whole(&SoftCap { cap: 5.0 }, &case, world, &what);
                // Variants that read key positions (logits, mask, query and key hooks).
                check_against_whole(&alibi, &case, world, &what);
                check_against_whole(&SlidingWindow { window: 9 }, &case, world, &what);
                check_against_whole(&LlamaRope { theta: 1e4 }, &case, world, &what);
            }
        }
    }
}

#[test]
fn simulated_ranks_equal_single_device_decode_with_positions() {
    // Decode with variants that read key positions: each shard sees its keys' places.
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(8, 2, 16).unwrap();
    let lens = [70, 2, 0, 33, 150];
    let case = Case::new(&mut rng, heads, 16, &lens);
    for world in 1..=4 {
        let what = format!("seed {seed}, decode");
        check_against_whole(&Alibi::new(8), &case, world, &what);
        check_against_whole(&SlidingWindow { window: 40 }, &case, world, &what);
        check_against_whole(&LlamaRope { theta: 1e4 }, &case, world, &what);
    }
}

/// Key positions of 0 over whole requests are what an index without positions means: the
/// reference gives the same numbers bit for bit, for every hook that reads positions.
#[test]
fn zero_key_positions_change_nothing() {
    let mut rng = Rng::from_time();
    let heads = Heads::new(4, 2, 16).unwrap();
    let lens = [37, 5, 0, 64];
    let case = Case::prefill(&mut rng, heads, 16, &lens, &[9, 5, 3, 64], true);
    let zero = case.kv.clone().with_key_positions(&[0; 4], &lens).unwrap();
    assert!(zero.has_key_positions() && !case.kv.has_key_positions());
    for (b, &len) in lens.iter().enumerate() {
        assert_eq!((case.kv.key_offset(b), case.kv.key_total(b)), (0, len));
    }
    let (q, k, v) = (f32s(&case.q), f32s(&case.k), f32s(&case.v));
    let run = |variant: &dyn Fn(&Batch) -> reference::Reference| {
        let a = variant(&case.batch(case.kv.clone()));
        let b = variant(&case.batch(zero.clone()));
        assert_eq!(
            a.o.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.o.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            a.lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    };
    run(&|b| reference::attention(&Standard, b, &q, &k, &v).unwrap());
    run(&|b| reference::attention(&Alibi::new(4), b, &q, &k, &v).unwrap());
    run(&|b| reference::attention(&LlamaRope { theta: 1e4 }, b, &q, &k, &v).unwrap());
    run(&|b| reference::attention(&SlidingWindow { window: 7 }, b, &q, &k, &v).unwrap());
}

/// A shard's keys at an offset see the causal mask of the whole request. Four keys with equal
/// (zero) scores and values 1..=4, so a row's output is the mean of the values it sees.
#[test]
fn key_positions_move_the_causal_diagonal() {
    let heads = Heads::new(1, 1, 8).unwrap();
    let k = vec![0.0f32; 4 * 8];
    let v: Vec<f32> = (0..4).flat_map(|j| [j as f32 + 1.0; 8]).collect();
    let rows = |positions: Option<(u32, u32)>, qo: u32| -> Vec<f64> {
        let mut kv = KvIndex::ragged(&[0, 4], KvLayout::Nhd).unwrap();
        if let Some((offset, total)) = positions {
            kv = kv.with_key_positions(&[offset], &[total]).unwrap();
        }
        let batch = Batch::new(heads, &[0, qo as i32], kv)
            .unwrap()
            .with_causal(true);
        let q = vec![0.0f32; qo as usize * 8];
        let r = reference::attention(&Standard, &batch, &q, &k, &v).unwrap();
        r.o.chunks(8).map(|row| row[0]).collect()
    };
    // The whole request: rows at positions 0..=3 see 1, 2, 3, 4 keys.
    assert_eq!(rows(None, 4), [1.0, 1.5, 2.0, 2.5]);
    // Keys 3..=6 of 10, rows at positions 6..=9: every row sees all four.
    assert_eq!(rows(Some((3, 10)), 4), [2.5; 4]);
    // Keys 4..=7 of 8, rows at positions 2..=7: the first two see none (o 0), then 1..=4 keys.
    assert_eq!(rows(Some((4, 8)), 6), [0.0, 0.0, 1.0, 1.5, 2.0, 2.5]);
    // The last four keys of 10 with four rows: the whole request's diagonal again.
    assert_eq!(rows(Some((6, 10)), 4), [1.0, 1.5, 2.0, 2.5]);
}

#[test]
fn bad_key_positions_are_refused() {
    let kv = || KvIndex::paged_from_lens(4, &[6, 0], &[1, 0], 2, KvLayout::Nhd).unwrap();
    let err = |r: ferrinfer::Result<KvIndex>| r.unwrap_err().to_string();
    let e = err(kv().with_key_positions(&[0], &[6]));
    assert!(
        e.contains("key positions are given for 1 requests but the KV index has 2"),
        "{e}"
    );
    let e = err(kv().with_key_positions(&[0, 0], &[6]));
    assert!(e.contains("2 offsets but 1 totals"), "{e}");
    let e = err(kv().with_key_positions(&[1, 0], &[6, 0]));
    assert!(
        e.contains("request 0's 6 keys at position 1 end at 7, past its request's 6 keys"),
        "{e}"
    );
    let e = err(kv().with_key_positions(&[0, 3], &[6, 2]));
    assert!(
        e.contains("request 1's 0 keys at position 3 end at 3"),
        "{e}"
    );
    let e = err(kv().with_key_positions(&[0, 0], &[6, 1 << 31]));
    assert!(e.contains("at most 2^31 - 1"), "{e}");
    // Empty requests may sit anywhere inside their request, and a run may end at its total.
    let ok = kv().with_key_positions(&[2, 5], &[8, 5]).unwrap();
    assert_eq!(
        (ok.key_offset(0), ok.key_total(0), ok.key_total(1)),
        (2, 8, 5)
    );
}

#[test]
fn variants_a_shard_cannot_run_are_refused() {
    assert!(check_shardable(Standard::SPEC).is_ok());
    assert!(check_shardable(SoftCap::SPEC).is_ok());
    // Key positions reach the hooks of a shard as the whole request's.
    assert!(check_shardable(Alibi::SPEC).is_ok());
    assert!(check_shardable(LlamaRope::SPEC).is_ok());
    assert!(check_shardable(SlidingWindow::SPEC).is_ok());
    for (spec, why) in [
        (AttentionSink::SPEC, "sink"),
        (FlashSigmoid::SPEC, "no softmax"),
    ] {
        let e = check_shardable(spec).unwrap_err().to_string();
        assert!(e.contains(why) && e.contains(spec.name), "{e}");
    }
}

/// The worst rel. L2 of `o` per (request, head) and the LSE, against the f64 reference of
/// `batch`: bf16 bounds.
fn check_gpu_result<V: Variant>(
    variant: &V,
    case: &Case,
    batch: &Batch,
    got: &(Vec<f32>, Vec<f32>),
    what: &str,
) {
    let want = reference::attention(
        variant,
        batch,
        &f32s(&case.q),
        &f32s(&case.k),
        &f32s(&case.v),
    )
    .unwrap();
    let (err, b, h) = worst_rel_l2(batch, &got.0, &want.o);
    assert!(
        err <= 1e-2,
        "{what}: rel L2 {err:e} at request {b} head {h}"
    );
    for (i, (g, w)) in got.1.iter().zip(&want.lse).enumerate() {
        let ok = f64::from(*g) == *w || (f64::from(*g) - w).abs() <= 1e-2 * w.abs().max(1.0);
        assert!(ok, "{what}: lse[{i}] {g} vs {w}");
    }
}

/// [`on_gpu`], then [`check_gpu_result`] with the variant's name before `what`.
fn check_on_gpu<V: Variant>(
    variant: &V,
    case: &Case,
    batch: &Batch,
    config: PlanConfig,
    decode: bool,
    what: &str,
) {
    let got = on_gpu(variant, case, batch.clone(), config, decode);
    check_gpu_result(
        variant,
        case,
        batch,
        &got,
        &format!("{}, {what}", V::SPEC.name),
    );
}

/// `batch` on GPU 0 with `config`, o and lse poisoned with NaN first: a prefill, or (one query
/// row per request, `decode`) a decode.
fn on_gpu<V: Variant>(
    variant: &V,
    case: &Case,
    batch: Batch,
    config: PlanConfig,
    decode: bool,
) -> (Vec<f32>, Vec<f32>) {
    let gpu = Backend::cuda(0).unwrap();
    let (q, k, v) = (
        gpu.upload(&case.q).unwrap(),
        gpu.upload(&case.k).unwrap(),
        gpu.upload(&case.v).unwrap(),
    );
    let mut o = gpu.filled(batch.q_len(), bf16::NAN).unwrap();
    let mut lse = gpu.filled(batch.lse_len(), f32::NAN).unwrap();
    if decode {
        let plan = BatchDecode::plan_batch(&gpu, batch, config).unwrap();
        plan.run(variant, &q, &k, &v, &mut o, Some(&mut lse))
            .unwrap();
    } else {
        let plan = BatchPrefill::plan_with(&gpu, batch, config).unwrap();
        plan.run(variant, &q, &k, &v, &mut o, Some(&mut lse))
            .unwrap();
    }
    (f32s(&o.to_vec().unwrap()), lse.to_vec().unwrap())
}

/// The prefill kernel (with and without a KV split, so the merge pass too) and both decode
/// kernels, over a shard in the middle of its requests (key positions past 0), equal the CPU
/// reference of that shard, for variants that read key positions in each hook; and key
/// positions of 0 give the kernels' output without positions bit for bit. One GPU.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_key_positions_equal_the_reference() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(32, 8, 128).unwrap();
    let lens = [3000, 40, 0, 900, 1];
    let split = PlanConfig {
        fixed_kv_chunk: Some(128),
        ..PlanConfig::default()
    };
    let alibi = Alibi::new(32);
    let rope = LlamaRope { theta: 1e4 };
    let window = SlidingWindow { window: 300 };
    for causal in [true, false] {
        let case = Case::prefill(&mut rng, heads, 16, &lens, &[700, 40, 3, 128, 2], causal);
        // Rank 1 of 3: keys from about a third of each request on.
        let shard = shard_kv(&case.kv, 3).unwrap().swap_remove(1).into_kv();
        assert!(shard.key_offset(0) > 0);
        let batch = case.batch(shard);
        for (name, config) in [("unsplit", PlanConfig::default()), ("split", split)] {
            let what = format!("seed {seed}, causal {causal}, {name}");
            check_on_gpu(&Standard, &case, &batch, config, false, &what);
            check_on_gpu(&alibi, &case, &batch, config, false, &what);
            check_on_gpu(&rope, &case, &batch, config, false, &what);
            check_on_gpu(&window, &case, &batch, config, false, &what);
        }
        // Zero positions over whole requests: the same bits as no positions.
        let zero = case.kv.clone().with_key_positions(&[0; 5], &lens).unwrap();
        let a = on_gpu(&alibi, &case, case.batch(case.kv.clone()), split, false);
        let b = on_gpu(&alibi, &case, case.batch(zero), split, false);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.0), bits(&b.0), "causal {causal}: o");
        assert_eq!(bits(&a.1), bits(&b.1), "causal {causal}: lse");
    }
    // Decode on both kernels over a middle shard.
    let case = Case::new(&mut rng, heads, 16, &lens);
    let shard = shard_kv(&case.kv, 3).unwrap().swap_remove(1).into_kv();
    let batch = Batch::decode(heads, shard).unwrap();
    for kernel in [DecodeKernel::CudaCores, DecodeKernel::TensorCores] {
        for chunk in [None, Some(128)] {
            let config = PlanConfig {
                decode_kernel: kernel,
                fixed_kv_chunk: chunk,
                ..PlanConfig::default()
            };
            let what = format!("seed {seed}, decode {kernel:?}, chunk {chunk:?}");
            check_on_gpu(&alibi, &case, &batch, config, true, &what);
            check_on_gpu(&rope, &case, &batch, config, true, &what);
            check_on_gpu(&window, &case, &batch, config, true, &what);
        }
    }
}

#[cfg(feature = "nccl")]
mod gpu {
    //! One thread per visible GPU, each a rank of one NCCL communicator.

    use super::*;
    use ferrinfer::distributed::{
        Communicator, ContextParallelDecode, ContextParallelPrefill, NcclId,
    };
    use std::sync::Arc;

    fn device_count() -> usize {
        ferrinfer::device::Gpu::count().expect("this test needs a CUDA driver")
    }

    /// Every visible GPU as a rank (at least one); says so when it cannot test a real split.
    fn world() -> usize {
        let n = device_count();
        assert!(n >= 1, "this test needs a CUDA GPU");
        if n < 2 {
            println!("only {n} GPU(s): ran world size {n}");
        }
        n
    }

    /// One-GPU attention of the whole context on GPU 0: the answer every rank must give.
    fn single_gpu<V: Variant>(variant: &V, case: &Case) -> (Vec<f32>, Vec<f32>) {
        let batch = case.batch(case.kv.clone());
        on_gpu(variant, case, batch, PlanConfig::default(), !case.prefill)
    }

    /// Run `f(rank, communicator)` on one thread per rank and collect what each returns.
    fn on_ranks<R: Send>(world: usize, f: impl Fn(usize, Communicator) -> R + Sync) -> Vec<R> {
        let id = NcclId::new().unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let f = &f;
                    s.spawn(move || {
                        let backend = Backend::cuda(rank).unwrap();
                        let comm = Communicator::new(&backend, &id, rank, world).unwrap();
                        f(rank, comm)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Each rank uploads the whole cache and decodes its shard of it (page ids unchanged).
    fn cp_decode(case: &Case, world: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        on_ranks(world, |rank, comm| {
            let comm = Arc::new(comm);
            let shard = shard_kv(&case.kv, world).unwrap().swap_remove(rank);
            let backend = comm.backend().clone();
            let plan = ContextParallelDecode::<bf16>::plan(
                comm,
                case.heads,
                shard.into_kv(),
                None,
                PlanConfig::default(),
            )
            .unwrap();
            let (q, k, v) = (
                backend.upload(&case.q).unwrap(),
                backend.upload(&case.k).unwrap(),
                backend.upload(&case.v).unwrap(),
            );
            let shape = case.shape();
            let mut o = backend.filled(shape.v_len(), bf16::NAN).unwrap();
            let mut lse = backend.filled(shape.s_len(), f32::NAN).unwrap();
            plan.run(&Standard, &q, &k, &v, &mut o, Some(&mut lse))
                .unwrap();
            (f32s(&o.to_vec().unwrap()), lse.to_vec().unwrap())
        })
    }

    /// Each rank uploads the whole cache and prefills over its shard of it (page ids unchanged).
    fn cp_prefill<V: Variant + Sync>(
        variant: &V,
        case: &Case,
        world: usize,
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        on_ranks(world, |rank, comm| {
            let comm = Arc::new(comm);
            let shard = shard_kv(&case.kv, world).unwrap().swap_remove(rank);
            let backend = comm.backend().clone();
            let batch = case.batch(shard.into_kv());
            let plan =
                ContextParallelPrefill::<bf16>::plan(comm, batch, PlanConfig::default()).unwrap();
            let (q, k, v) = (
                backend.upload(&case.q).unwrap(),
                backend.upload(&case.k).unwrap(),
                backend.upload(&case.v).unwrap(),
            );
            let shape = case.shape();
            let mut o = backend.filled(shape.v_len(), bf16::NAN).unwrap();
            let mut lse = backend.filled(shape.s_len(), f32::NAN).unwrap();
            plan.run(variant, &q, &k, &v, &mut o, Some(&mut lse))
                .unwrap();
            (f32s(&o.to_vec().unwrap()), lse.to_vec().unwrap())
        })
    }

    fn compare(case: &Case, got: &[(Vec<f32>, Vec<f32>)], what: &str) {
        compare_with(&Standard, case, got, what)
    }

    fn compare_with<V: Variant>(
        variant: &V,
        case: &Case,
        got: &[(Vec<f32>, Vec<f32>)],
        what: &str,
    ) {
        let batch = case.batch(case.kv.clone());
        let (want_o, want_lse) = single_gpu(variant, case);
        let want_o: Vec<f64> = want_o.iter().map(|&x| f64::from(x)).collect();
        for (rank, (o, lse)) in got.iter().enumerate() {
            let (err, b, h) = worst_rel_l2(&batch, o, &want_o);
            assert!(
                err <= 1e-2,
                "{what}, rank {rank}: rel L2 {err:e} at request {b} head {h}"
            );
            for (i, (g, w)) in lse.iter().zip(&want_lse).enumerate() {
                let ok = g == w || (g - w).abs() <= 1e-3 * w.abs().max(1.0);
                assert!(ok, "{what}, rank {rank}: lse[{i}] {g} vs {w}");
            }
        }
    }

    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_context_parallel_decode_equals_one_gpu() {
        let world = world();
        let mut rng = Rng::from_time();
        let seed = rng.seed();
        for (heads, page) in [
            (Heads::new(32, 8, 128).unwrap(), 16),
            (Heads::new(8, 8, 64).unwrap(), 1),
        ] {
            let lens = [4000, 1, 0, 17, 2500, 33];
            let case = Case::new(&mut rng, heads, page, &lens);
            let got = cp_decode(&case, world);
            compare(
                &case,
                &got,
                &format!("seed {seed}, page {page}, world {world}"),
            );
        }
    }

    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_context_parallel_world_size_one() {
        let mut rng = Rng::from_time();
        let case = Case::new(
            &mut rng,
            Heads::new(32, 8, 128).unwrap(),
            16,
            &[3000, 5, 700],
        );
        let got = cp_decode(&case, 1);
        compare(&case, &got, "world 1");
    }

    /// A rank whose plan fails (here: a non-finite sm_scale on the last rank) makes every rank's
    /// plan fail with an error, and none waits for it in NCCL.
    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_context_parallel_a_failed_rank_fails_every_rank() {
        let world = world();
        let mut rng = Rng::from_time();
        let case = Case::new(&mut rng, Heads::new(32, 8, 128).unwrap(), 16, &[700, 90]);
        let errors = on_ranks(world, |rank, comm| {
            let shard = shard_kv(&case.kv, world).unwrap().swap_remove(rank);
            let scale = (rank + 1 == world).then_some(f32::NAN);
            ContextParallelDecode::<bf16>::plan(
                Arc::new(comm),
                case.heads,
                shard.into_kv(),
                scale,
                PlanConfig::default(),
            )
            .err()
            .map(|e| e.to_string())
        });
        for (rank, e) in errors.iter().enumerate() {
            let e = e
                .as_deref()
                .unwrap_or_else(|| panic!("rank {rank} planned"));
            if rank + 1 == world {
                assert!(e.contains("sm_scale"), "rank {rank}: {e}");
            } else {
                assert!(e.contains("could not plan"), "rank {rank}: {e}");
            }
        }
    }

    /// A CUDA graph of `run` (decode, all-gather, merge) on each rank, replayed after a replan to
    /// another batch of the same capacity, equals one-GPU decode of that batch.
    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_context_parallel_capture_and_replay() {
        let world = world();
        let mut rng = Rng::from_time();
        let heads = Heads::new(32, 8, 128).unwrap();
        let first = Case::new(&mut rng, heads, 16, &[900, 40, 7]);
        let second = Case::new(&mut rng, heads, 16, &[50, 1200, 300]);
        let pages = first.kv.capacity().max(second.kv.capacity());
        // Both batches inside one cache of `pages` pages (the graph pins the cache's capacity).
        let grow = |c: &Case| -> Case {
            let len = |p: u32| p as usize * c.kv.buffer_len(&heads) / c.kv.capacity() as usize;
            let mut k = c.k.clone();
            let mut v = c.v.clone();
            k.resize(len(pages), bf16::NAN);
            v.resize(len(pages), bf16::NAN);
            let kv = KvIndex::paged(
                16,
                c.kv.indptr(),
                c.kv.indices(),
                c.kv.last_len(),
                pages,
                KvLayout::Nhd,
            )
            .unwrap();
            Case {
                heads,
                kv,
                qo: c.qo.clone(),
                prefill: false,
                causal: false,
                q: c.q.clone(),
                k,
                v,
            }
        };
        let (first, second) = (grow(&first), grow(&second));
        let capacity = GraphCapacity {
            work_items: 1024,
            batch: 3,
            qo_rows: 3,
            kv_blocks: pages,
        };
        let got = on_ranks(world, |rank, comm| {
            let comm = Arc::new(comm);
            let backend = comm.backend().clone();
            let shard = |c: &Case| shard_kv(&c.kv, world).unwrap().swap_remove(rank).into_kv();
            let config = PlanConfig {
                graph: Some(capacity),
                ..PlanConfig::default()
            };
            let plan =
                ContextParallelDecode::<bf16>::plan(comm, heads, shard(&first), None, config)
                    .unwrap();
            let shape = first.shape();
            let buffers = RunBuffers {
                q: backend.upload(&first.q).unwrap(),
                k: backend.upload(&first.k).unwrap(),
                v: backend.upload(&first.v).unwrap(),
                o: backend.filled(shape.v_len(), bf16::NAN).unwrap(),
                lse: Some(backend.filled(shape.s_len(), f32::NAN).unwrap()),
            };
            let mut graph = plan.capture(Standard, buffers).unwrap();
            graph.replan(shard(&second), None).unwrap();
            graph.write(Input::Q, &second.q).unwrap();
            graph.write(Input::K, &second.k).unwrap();
            graph.write(Input::V, &second.v).unwrap();
            graph.launch().unwrap();
            let o = f32s(&graph.o().to_vec().unwrap());
            let lse = graph.lse().unwrap().to_vec().unwrap();
            (o, lse)
        });
        compare(&second, &got, &format!("replayed graph, world {world}"));
    }

    /// Causal and full prefill (and append: fewer query rows than keys) with every visible GPU
    /// a rank equals one-GPU prefill of the whole context, for a plain variant and one that
    /// reads key positions; also checked against the f64 reference.
    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_context_parallel_prefill_equals_one_gpu() {
        let world = world();
        let mut rng = Rng::from_time();
        let seed = rng.seed();
        for (heads, page) in [
            (Heads::new(32, 8, 128).unwrap(), 16),
            (Heads::new(8, 8, 64).unwrap(), 1),
        ] {
            for causal in [true, false] {
                let lens = [3000, 1, 0, 17, 1500, 33];
                let qo = [600, 1, 2, 17, 1500, 40];
                let case = Case::prefill(&mut rng, heads, page, &lens, &qo, causal);
                let what = format!("seed {seed}, page {page}, causal {causal}, world {world}");
                let got = cp_prefill(&Standard, &case, world);
                compare_with(&Standard, &case, &got, &format!("Standard, {what}"));
                let alibi = Alibi::new(heads.num_qo_heads());
                let got = cp_prefill(&alibi, &case, world);
                compare_with(&alibi, &case, &got, &format!("Alibi, {what}"));
                let batch = case.batch(case.kv.clone());
                check_gpu_result(&alibi, &case, &batch, &got[0], &format!("Alibi, {what}"));
            }
        }
    }

    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_context_parallel_prefill_world_size_one() {
        let mut rng = Rng::from_time();
        let heads = Heads::new(32, 8, 128).unwrap();
        let case = Case::prefill(&mut rng, heads, 16, &[3000, 5, 700], &[500, 5, 1], true);
        let got = cp_prefill(&Standard, &case, 1);
        compare(&case, &got, "prefill, world 1");
    }

    /// A shard without key positions is refused for a causal prefill over several ranks (its
    /// diagonal would be the shard's), on every rank, before anything is queued.
    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_context_parallel_prefill_needs_key_positions() {
        let world = world();
        if world < 2 {
            println!("only 1 GPU: a single rank needs no key positions; nothing to check");
            return;
        }
        let mut rng = Rng::from_time();
        let heads = Heads::new(32, 8, 128).unwrap();
        let case = Case::prefill(&mut rng, heads, 16, &[700, 90], &[100, 90], true);
        let errors = on_ranks(world, |rank, comm| {
            let comm = Arc::new(comm);
            let backend = comm.backend().clone();
            let shard = shard_kv(&case.kv, world).unwrap().swap_remove(rank);
            // The same blocks, without positions.
            let kv = shard.kv();
            let bare = KvIndex::paged(
                16,
                kv.indptr(),
                kv.indices(),
                kv.last_len(),
                kv.capacity(),
                KvLayout::Nhd,
            )
            .unwrap();
            let plan =
                ContextParallelPrefill::<bf16>::plan(comm, case.batch(bare), PlanConfig::default())
                    .unwrap();
            let (q, k, v) = (
                backend.upload(&case.q).unwrap(),
                backend.upload(&case.k).unwrap(),
                backend.upload(&case.v).unwrap(),
            );
            let mut o = backend.filled(case.shape().v_len(), bf16::NAN).unwrap();
            plan.run(&Standard, &q, &k, &v, &mut o, None)
                .unwrap_err()
                .to_string()
        });
        for (rank, e) in errors.iter().enumerate() {
            assert!(
                e.contains("causal mask") && e.contains("key positions"),
                "rank {rank}: {e}"
            );
        }
    }

    /// A CUDA graph of the context-parallel prefill, replayed after a replan to another batch
    /// of the same capacity, equals one-GPU prefill of that batch.
    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_context_parallel_prefill_capture_and_replay() {
        let world = world();
        let mut rng = Rng::from_time();
        let heads = Heads::new(32, 8, 128).unwrap();
        let pages = 200;
        // Both batches in one cache of `pages` pages (the graph pins the capacity) and with the
        // same query rows (the buffers are sized for the capacity's rows).
        let make = |rng: &mut Rng, lens: &[u32], qo: &[u32]| {
            let mut c = Case::prefill(rng, heads, 16, lens, qo, true);
            let per_page = c.kv.buffer_len(&heads) / c.kv.capacity() as usize;
            c.k.resize(pages as usize * per_page, bf16::NAN);
            c.v.resize(pages as usize * per_page, bf16::NAN);
            c.kv = KvIndex::paged(
                16,
                c.kv.indptr(),
                c.kv.indices(),
                c.kv.last_len(),
                pages,
                KvLayout::Nhd,
            )
            .unwrap();
            c
        };
        let first = make(&mut rng, &[900, 40, 7], &[300, 40, 4]);
        let second = make(&mut rng, &[50, 1200, 300], &[50, 200, 94]);
        let capacity = GraphCapacity {
            work_items: 2048,
            batch: 3,
            qo_rows: 344,
            kv_blocks: pages,
        };
        let got = on_ranks(world, |rank, comm| {
            let comm = Arc::new(comm);
            let backend = comm.backend().clone();
            let shard = |c: &Case| {
                let kv = shard_kv(&c.kv, world).unwrap().swap_remove(rank).into_kv();
                c.batch(kv)
            };
            let config = PlanConfig {
                graph: Some(capacity),
                ..PlanConfig::default()
            };
            let plan = ContextParallelPrefill::<bf16>::plan(comm, shard(&first), config).unwrap();
            let shape = first.shape();
            let buffers = RunBuffers {
                q: backend.upload(&first.q).unwrap(),
                k: backend.upload(&first.k).unwrap(),
                v: backend.upload(&first.v).unwrap(),
                o: backend.filled(shape.v_len(), bf16::NAN).unwrap(),
                lse: Some(backend.filled(shape.s_len(), f32::NAN).unwrap()),
            };
            let mut graph = plan.capture(Standard, buffers).unwrap();
            graph.replan(shard(&second)).unwrap();
            graph.write(Input::Q, &second.q).unwrap();
            graph.write(Input::K, &second.k).unwrap();
            graph.write(Input::V, &second.v).unwrap();
            graph.launch().unwrap();
            let o = f32s(&graph.o().to_vec().unwrap());
            let lse = graph.lse().unwrap().to_vec().unwrap();
            (o, lse)
        });
        compare(
            &second,
            &got,
            &format!("replayed prefill graph, world {world}"),
        );
    }

    /// Rank `r`'s input of the all-reduce test: normal values from (seed, rank), as `T`.
    fn rank_input<T>(seed: u64, rank: usize, n: usize, conv: impl Fn(f32) -> T) -> Vec<T> {
        Rng::new(seed ^ (rank as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .normal_vec(n)
            .into_iter()
            .map(conv)
            .collect()
    }

    /// Every rank's result equals the f64 sum of the ranks' inputs within `tol` of the sum of
    /// magnitudes (bf16 is summed by NCCL in bf16: one rounding per rank), and the ranks agree
    /// bit for bit.
    fn check_sums(got: &[Vec<f64>], inputs: &[Vec<f64>], tol: f64, what: &str) {
        for (i, _) in inputs[0].iter().enumerate() {
            let want: f64 = inputs.iter().map(|x| x[i]).sum();
            let mag: f64 = inputs.iter().map(|x| x[i].abs()).sum();
            for (rank, g) in got.iter().enumerate() {
                assert!(
                    (g[i] - want).abs() <= tol * mag + 1e-30 && g[i].is_finite(),
                    "{what}: rank {rank} element {i}: {} vs {want}",
                    g[i]
                );
                assert_eq!(
                    g[i].to_bits(),
                    got[0][i].to_bits(),
                    "{what}: ranks differ at {i}"
                );
            }
        }
    }

    fn all_reduce_case(world: usize) {
        let seed = Rng::from_time().seed();
        // Odd lengths: no multiple of a vector width or of a rank's chunk.
        let (nb, nf) = (4096 * 3 + 7, 1001);
        let got = on_ranks(world, |rank, comm| {
            let backend = comm.backend().clone();
            let mut b = backend
                .upload(&rank_input(seed, rank, nb, bf16::from_f32))
                .unwrap();
            let mut f = backend.upload(&rank_input(seed, rank, nf, |x| x)).unwrap();
            comm.all_reduce_sum(&mut b).unwrap();
            comm.all_reduce_sum(&mut f).unwrap();
            // A sub-range through a view: only its elements change.
            let mut part = backend.upload(&[1.0f32; 8]).unwrap();
            {
                let gpu = backend.gpu().unwrap().clone();
                let mut cuda = part.cuda_view_mut().unwrap();
                let mut view = ViewMut::device(&mut cuda, &gpu).unwrap();
                comm.all_reduce_sum(&mut view.slice_mut(2..5).unwrap())
                    .unwrap();
            }
            // An empty buffer is a no-op; host memory is refused with the rank named.
            comm.all_reduce_sum(&mut backend.upload::<f32>(&[]).unwrap())
                .unwrap();
            let mut host = [1.0f32; 4];
            let e = comm
                .all_reduce_sum(&mut ViewMut::host(&mut host))
                .unwrap_err()
                .to_string();
            assert!(e.contains("all_reduce_sum") && e.contains("rank"), "{e}");
            (
                b.to_vec().unwrap(),
                f.to_vec().unwrap(),
                part.to_vec().unwrap(),
            )
        });
        let w = world as f32;
        for (rank, (_, _, part)) in got.iter().enumerate() {
            assert_eq!(
                part,
                &[1.0, 1.0, w, w, w, 1.0, 1.0, 1.0],
                "rank {rank}: view"
            );
        }
        let inputs_b: Vec<Vec<f64>> = (0..world)
            .map(|r| {
                rank_input(seed, r, nb, bf16::from_f32)
                    .iter()
                    .map(|x| f64::from(x.to_f32()))
                    .collect()
            })
            .collect();
        let inputs_f: Vec<Vec<f64>> = (0..world)
            .map(|r| rank_input(seed, r, nf, f64::from))
            .collect();
        let got_b: Vec<Vec<f64>> = got
            .iter()
            .map(|g| g.0.iter().map(|x| f64::from(x.to_f32())).collect())
            .collect();
        let got_f: Vec<Vec<f64>> = got
            .iter()
            .map(|g| g.1.iter().map(|&x| f64::from(x)).collect())
            .collect();
        let what = format!("seed {seed}, world {world}");
        check_sums(
            &got_b,
            &inputs_b,
            world as f64 * 2f64.powi(-8),
            &format!("bf16, {what}"),
        );
        check_sums(&got_f, &inputs_f, 1e-6, &format!("f32, {what}"));
    }

    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_all_reduce_sum_equals_the_host_sum() {
        all_reduce_case(world());
    }

    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_all_reduce_sum_world_size_one() {
        all_reduce_case(1);
    }
}
