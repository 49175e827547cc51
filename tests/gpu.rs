//! GPU tests: every built-in variant on the GPU against the CPU reference (f64), on fresh random
//! inputs, with the output poisoned with NaN before each run. Run on the GPU machine through
//! `../shared/tools/gpu-stage` and `.gpu/run tests`.

use ferrinfer::attention::reference::{self, worst_rel_l2};
use ferrinfer::prelude::*;
use ferrinfer::variants::*;
use ferrinfer::{DType, Element, HEAD_DIMS, Variant, indptr};
use ferrinfer_testkit::Rng;

/// One test case: a batch shape.
struct Case {
    heads: Heads,
    qo_lens: Vec<u32>,
    kv_lens: Vec<u32>,
    /// `None`: ragged KV.
    page_size: Option<u32>,
    layout: KvLayout,
    causal: bool,
    decode: bool,
}

/// NHD for even case numbers, HND for odd: the grids cover both layouts.
fn alternate_layout(n: usize) -> KvLayout {
    if n.is_multiple_of(2) {
        KvLayout::Nhd
    } else {
        KvLayout::Hnd
    }
}

/// The tolerance of DESIGN.md's testing rules.
fn tolerance<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 1e-2,
        DType::F16 => 2e-3,
    }
}

/// Scatter each request's keys over shuffled pages; returns the index and the page-major K, V.
fn kv_index(case: &Case, rng: &mut Rng) -> KvIndex {
    match case.page_size {
        // HND: spare tokens after the last request, as in a server's preallocated buffer. NHD:
        // a buffer that ends with the last request, so a partial last tile is read up to the
        // buffer's end.
        None => {
            let kv_indptr = indptr(&case.kv_lens);
            let spare = match case.layout {
                KvLayout::Nhd => 0,
                KvLayout::Hnd => 5,
            };
            let capacity = kv_indptr[kv_indptr.len() - 1] as u32 + spare;
            KvIndex::ragged_in(&kv_indptr, capacity, case.layout).unwrap()
        }
        Some(p) => {
            let total: u32 = case.kv_lens.iter().map(|&l| l.div_ceil(p)).sum();
            // A few spare pages, so that unused pages exist in the cache as in a real server.
            let num_pages = total + 3;
            let mut ids: Vec<i32> = (0..num_pages as i32).collect();
            rng.shuffle(&mut ids);
            let pages = &ids[..total as usize];
            KvIndex::paged_from_lens(p, &case.kv_lens, pages, num_pages, case.layout).unwrap()
        }
    }
}

/// NaN in every K/V element no request owns (spare pages, the tail of a ragged buffer): a kernel
/// that reads a wrong page or past a request's end produces NaN, which the error bound catches.
fn poison_spare<T: Element>(batch: &Batch, kv: &mut [T]) {
    let mut owned = vec![false; kv.len()];
    let heads = batch.heads();
    let d = heads.head_dim() as usize;
    for b in 0..batch.batch() {
        for j in 0..batch.kv().kv_len(b) {
            for h in 0..heads.num_kv_heads() {
                let at = batch.kv().offset(&heads, b, j, h);
                owned[at..at + d].iter_mut().for_each(|o| *o = true);
            }
        }
    }
    // Slots past the last key of a partly filled page stay finite: a kernel may load a whole
    // page and mask the keys past the end, which is correct (zero weight) unless the value is NaN.
    let page = batch.kv().page_size();
    for pages in batch.kv().indptr().windows(2) {
        if let (Some(p), true) = (page, pages[1] > pages[0]) {
            let last_page = batch.kv().indices()[pages[1] as usize - 1];
            let s = batch.kv().strides(&heads);
            for slot in 0..p as u64 {
                for h in 0..u64::from(heads.num_kv_heads()) {
                    let at = (last_page as u64 * s.block + slot * s.token + h * s.head) as usize;
                    owned[at..at + d].iter_mut().for_each(|o| *o = true);
                }
            }
        }
    }
    for (x, o) in kv.iter_mut().zip(owned) {
        if !o {
            *x = T::from_f32(f32::NAN);
        }
    }
}

/// Run `variant` on the GPU and the CPU reference; assert they agree. Decode runs on both of its
/// kernels, prefill on FA2 and on FA3 where that exists (Hopper, head dims 64, 128 and 256;
/// forcing FA3 plans its 128-row tile; elsewhere the FA3 run is refused and skipped), and at head
/// dim 256 under Auto too.
fn check<V: Variant, T: Element>(gpu: &Backend, variant: &V, case: &Case) {
    let configs: Vec<PlanConfig> = if case.decode {
        [DecodeKernel::CudaCores, DecodeKernel::TensorCores]
            .map(|decode_kernel| PlanConfig {
                decode_kernel,
                ..PlanConfig::default()
            })
            .to_vec()
    } else {
        // At head dim 256 Auto plans a tile neither forced run does on Hopper: 128 rows for
        // requests of more than 64 packed rows, so FA3 where the variant has a form there and
        // FA2's 128-row tile where not.
        let auto = (case.heads.head_dim() == 256).then_some(PrefillKernel::Auto);
        [PrefillKernel::Fa2, PrefillKernel::Fa3]
            .into_iter()
            .chain(auto)
            .map(|prefill_kernel| PlanConfig {
                prefill_kernel,
                ..PlanConfig::default()
            })
            .collect()
    };
    check_with::<V, T>(gpu, variant, case, &configs);
}

/// [`check`] on the given plan configs.
fn check_with<V: Variant, T: Element>(
    gpu: &Backend,
    variant: &V,
    case: &Case,
    configs: &[PlanConfig],
) {
    check_runs::<V, T>(gpu, variant, case, configs, 1);
}

/// [`check_with`], each config's plan run `runs` times, every run checked.
fn check_runs<V: Variant, T: Element>(
    gpu: &Backend,
    variant: &V,
    case: &Case,
    configs: &[PlanConfig],
    runs: usize,
) {
    check_scaled::<V, T>(gpu, variant, case, configs, runs, None);
}

/// [`check_runs`] with the batch's `sm_scale` set (else its default, 1 / sqrt(head dim)).
fn check_scaled<V: Variant, T: Element>(
    gpu: &Backend,
    variant: &V,
    case: &Case,
    configs: &[PlanConfig],
    runs: usize,
    sm_scale: Option<f32>,
) {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let kv = kv_index(case, &mut rng);
    let batch = if case.decode {
        Batch::decode(case.heads, kv).unwrap()
    } else {
        Batch::new(case.heads, &indptr(&case.qo_lens), kv)
            .unwrap()
            .with_causal(case.causal)
    };
    let batch = match sm_scale {
        Some(s) => batch.with_sm_scale(s).unwrap(),
        None => batch,
    };
    let round = |xs: Vec<f32>| -> Vec<T> { xs.into_iter().map(T::from_f32).collect() };
    let q = round(rng.normal_vec(batch.q_len()));
    let mut k = round(rng.normal_vec(batch.kv().buffer_len(&batch.heads())));
    let mut v = round(rng.normal_vec(batch.kv().buffer_len(&batch.heads())));
    poison_spare(&batch, &mut k);
    poison_spare(&batch, &mut v);
    let want = reference::attention_typed(variant, &batch, &q, &k, &v).unwrap();

    let (qd, kd, vd) = (
        gpu.upload(&q).unwrap(),
        gpu.upload(&k).unwrap(),
        gpu.upload(&v).unwrap(),
    );
    'configs: for &config in configs {
        // Unless FA3 is all a config asks for, an FA3 run the plan's instance has no form of is
        // skipped (checked by `gpu_sm90_prefill`).
        let optional_fa3 = configs.len() > 1 && config.prefill_kernel == PrefillKernel::Fa3;
        let decode = case.decode.then(|| {
            BatchDecode::plan_with(gpu, case.heads, batch.kv().clone(), None, config).unwrap()
        });
        let prefill =
            (!case.decode).then(|| BatchPrefill::plan_with(gpu, batch.clone(), config).unwrap());
        for run in 0..runs {
            let mut od = gpu.filled(batch.q_len(), T::from_f32(f32::NAN)).unwrap();
            let with_lse = V::SPEC.softmax;
            let mut lsed = gpu.filled(batch.lse_len(), f32::NAN).unwrap();
            let lse: Option<&mut dyn ferrinfer::Dst<f32>> =
                if with_lse { Some(&mut lsed) } else { None };
            if let Some(plan) = &decode {
                plan.run(variant, &qd, &kd, &vd, &mut od, lse).unwrap();
            } else if let Some(plan) = &prefill {
                match plan.run(variant, &qd, &kd, &vd, &mut od, lse) {
                    Err(e) if optional_fa3 && e.to_string().contains("no FA3 instance") => {
                        continue 'configs;
                    }
                    r => r.unwrap(),
                }
            }
            let got: Vec<f32> = od.to_vec().unwrap().iter().map(|x| x.to_f32()).collect();
            // Bounded per request and head: one wrong request cannot hide in a large batch.
            let (err, request, head) = worst_rel_l2(&batch, &got, &want.o);
            let what = format!(
                "{} {:?} hd{} qo{:?} kv{:?} page {:?} {:?} causal {} decode {} {:?} {:?} {:?} run \
             {run} (seed {seed})",
                V::SPEC.name,
                T::DTYPE,
                case.heads.head_dim(),
                case.qo_lens,
                case.kv_lens,
                case.page_size,
                case.layout,
                case.causal,
                case.decode,
                config.decode_kernel,
                config.prefill_kernel,
                config.kv_warps
            );
            assert!(
                err <= tolerance::<T>(),
                "{what}: relative L2 error {err:.2e} at request {request}, head {head}"
            );
            if with_lse {
                let got = lsed.to_vec().unwrap();
                for (i, (g, w)) in got.iter().zip(&want.lse).enumerate() {
                    let ok = if w.is_infinite() {
                        *g == *w as f32
                    } else {
                        (f64::from(*g) - w).abs() <= 1e-2 * (1.0 + w.abs())
                    };
                    assert!(ok, "{what}: lse[{i}] = {g}, want {w}");
                }
            }
        }
    }
}

/// The grid of the issue, sampled so that every value appears with every other dimension's
/// values somewhere: batch 1, 7, 33; KV lengths 1, 15, 16, 17, 511, 4096 (and 0); page sizes 1,
/// 16, 32 and ragged; GQA 1, 4, 8; NHD and HND; causal and not; prefill and decode.
fn cases(head_dim: u32) -> Vec<Case> {
    const KV: [u32; 7] = [1, 15, 16, 17, 511, 4096, 0];
    const QO: [u32; 5] = [1, 16, 17, 63, 128];
    let pages = [None, Some(1), Some(16), Some(32)];
    let groups = [1u32, 4, 8];
    let mut out = Vec::new();
    let mut n = 0usize;
    for (bi, &batch) in [1usize, 7, 33].iter().enumerate() {
        for (pi, &page_size) in pages.iter().enumerate() {
            for decode in [false, true] {
                n += 1;
                let group = groups[(bi + pi + n) % 3];
                // Long KV only where the batch is small, so the f64 reference stays quick.
                let kv_lens: Vec<u32> = (0..batch)
                    .map(|r| KV[(r + n) % KV.len()])
                    .map(|l| if batch == 33 { l.min(511) } else { l })
                    .collect();
                let qo_lens: Vec<u32> = if decode {
                    vec![1; batch]
                } else {
                    (0..batch).map(|r| QO[(r + n) % QO.len()]).collect()
                };
                out.push(Case {
                    heads: Heads::new(8, 8 / group, head_dim).unwrap(),
                    qo_lens,
                    kv_lens,
                    page_size: if decode && page_size.is_none() {
                        Some(16)
                    } else {
                        page_size
                    },
                    layout: alternate_layout(n),
                    causal: !decode && !n.is_multiple_of(3),
                    decode,
                });
            }
        }
    }
    out
}

/// True (and says so) when the GPU is not a Hopper: the FA3 template is sm_90a only.
fn not_hopper(gpu: &Backend) -> bool {
    let not = gpu.gpu().is_some_and(|g| g.arch().major != 9);
    if not {
        println!("not a Hopper GPU: the FA3 template is sm_90a only, nothing to check");
    }
    not
}

/// The FA3 template forced.
fn fa3() -> PlanConfig {
    PlanConfig {
        prefill_kernel: PrefillKernel::Fa3,
        ..PlanConfig::default()
    }
}

fn gpu() -> Backend {
    Backend::cuda(0).expect("this test needs a CUDA GPU")
}

/// Every case at every head dim and both dtypes.
fn sweep<V: Variant>(variant: &V) {
    let gpu = gpu();
    for hd in HEAD_DIMS {
        for case in cases(hd) {
            check::<V, bf16>(&gpu, variant, &case);
            check::<V, f16>(&gpu, variant, &case);
        }
    }
}

/// Long prompts at head dim 128 take the 128-row tile and, for variants that compile without
/// spills, its 64-key K/V tile (Alibi spills there and keeps 32 keys): both, with causal diagonals
/// inside and across tiles, over ragged and paged KV. Small enough for compute-sanitizer.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_long_prompt_tiles() {
    let gpu = gpu();
    for page_size in [None, Some(16)] {
        for causal in [true, false] {
            let case = Case {
                heads: Heads::new(8, 2, 128).unwrap(),
                qo_lens: vec![300, 129, 64],
                kv_lens: vec![700, 129, 1000],
                page_size,
                layout: KvLayout::Nhd,
                causal,
                decode: false,
            };
            check::<Standard, bf16>(&gpu, &Standard, &case);
            check::<SoftCap, f16>(&gpu, &SoftCap { cap: 5.0 }, &case);
            check::<Alibi, bf16>(&gpu, &Alibi::new(8), &case);
        }
    }
}

/// Soft-capping with and without the running row maximum (kernels/cuda/variant/hooks.cuh,
/// `fixed_max`), FA2 and FA3: caps whose bound against the scale takes the copies with no
/// maximum (in log2 units up to 80 for bf16, 12 for f16) and caps past it, negative caps too.
/// Scores with a standard deviation of 11 (bf16) make the weights span up to 2^-58..2^58 without
/// a maximum; rows that see no key (a request with fewer keys than rows, causal) end with z = 0.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_soft_cap_with_and_without_the_row_maximum() {
    let gpu = gpu();
    let case = Case {
        heads: Heads::new(8, 2, 128).unwrap(),
        qo_lens: vec![300, 1, 200],
        kv_lens: vec![700, 40, 129],
        page_size: None,
        layout: KvLayout::Nhd,
        causal: true,
        decode: false,
    };
    let configs = [PrefillKernel::Fa2, PrefillKernel::Fa3].map(|prefill_kernel| PlanConfig {
        prefill_kernel,
        ..PlanConfig::default()
    });
    // bf16: 30 and 50 (Gemma 2) without a maximum, -50 too, 100 (144 in log2 units) with one.
    for cap in [30.0, 50.0, -50.0, 100.0] {
        check_scaled::<SoftCap, bf16>(&gpu, &SoftCap { cap }, &case, &configs, 1, Some(1.0));
    }
    // f16: 5 and 8 without (11.5 in log2 units at 8), 30 with.
    for cap in [5.0, 8.0, -8.0, 30.0] {
        check_scaled::<SoftCap, f16>(&gpu, &SoftCap { cap }, &case, &configs, 1, Some(0.3));
    }
}

/// The FA3 grid at one head dim with [`fa3`] forced: ragged and paged KV (page sizes 1 and 16),
/// causal and not, GQA 1, 4 and 8 (Q by TMA), NHD and HND, rows that are not a multiple of the
/// tile, an empty request and one with fewer keys than rows, with Standard, SoftCap and ALiBi.
/// Head dim 128 takes every combination (18 cases); 64 and 256 one group size per (page size,
/// causal), cycling (6 each). Returns the cases run.
fn sm90_grid(gpu: &Backend, head_dim: u32) -> usize {
    let fa3 = [fa3()];
    let mut n = 0;
    for (pc, (page_size, causal)) in [None, Some(1), Some(16)]
        .into_iter()
        .flat_map(|p| [(p, true), (p, false)])
        .enumerate()
    {
        for group in [1, 4, 8] {
            if head_dim != 128 && group != [1, 4, 8][pc % 3] {
                continue;
            }
            n += 1;
            let case = Case {
                heads: Heads::new(8, 8 / group, head_dim).unwrap(),
                qo_lens: vec![300, 129, 0, 64, 200],
                kv_lens: vec![700, 129, 50, 1000, 100],
                page_size,
                layout: alternate_layout(n),
                causal,
                decode: false,
            };
            check_with::<Standard, bf16>(gpu, &Standard, &case, &fa3);
            check_with::<SoftCap, f16>(gpu, &SoftCap { cap: 5.0 }, &case, &fa3);
            check_with::<Alibi, bf16>(gpu, &Alibi::new(8), &case, &fa3);
        }
    }
    n
}

/// The FA3 template forced at head dim 128 (Hopper only): the grid of [`sm90_grid`], GQA 3 (Q by
/// cp.async), every other variant on a batch large enough that the plan splits KV (partials and
/// the merge). (Head dims 64 and 256: `gpu_sm90_prefill_hd64_hd256`, query and key hooks:
/// `gpu_sm90_query_and_key_hooks`; separate tests so that each finishes in a call under
/// compute-sanitizer's racecheck.)
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_prefill() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    let fa3 = [fa3()];
    assert_eq!(sm90_grid(&gpu, 128), 18, "cases run");
    // A group of three does not divide the 128-row tile: a tile's packed rows start inside a
    // query row, so Q goes by cp.async, not by TMA (whose boxes are whole query rows).
    let case = Case {
        heads: Heads::new(6, 2, 128).unwrap(),
        qo_lens: vec![300, 129, 0, 64, 200],
        kv_lens: vec![700, 129, 50, 1000, 100],
        page_size: None,
        layout: KvLayout::Nhd,
        causal: true,
        decode: false,
    };
    check_with::<Standard, bf16>(&gpu, &Standard, &case, &fa3);
    let case = Case {
        heads: Heads::new(32, 8, 128).unwrap(),
        qo_lens: vec![1024, 3000],
        kv_lens: vec![4096, 3000],
        page_size: Some(16),
        layout: KvLayout::Nhd,
        causal: true,
        decode: false,
    };
    check_with::<Standard, bf16>(&gpu, &Standard, &case, &fa3);
    check_with::<SlidingWindow, f16>(&gpu, &SlidingWindow { window: 700 }, &case, &fa3);
    let sinks: Vec<f32> = (0..32).map(|h| 0.25 * h as f32 - 2.0).collect();
    let sink = AttentionSink {
        sinks: Array::new(sinks),
    };
    check_with::<AttentionSink, bf16>(&gpu, &sink, &case, &fa3);
    check_with::<FlashSigmoid, bf16>(&gpu, &FlashSigmoid { bias: -1.0 }, &case, &fa3);
}

/// Few query rows over long KV in pages of 16, so that the plan splits the KV (partials of
/// head_dim floats and the merge), and a request with no rows.
fn split_case(head_dim: u32, causal: bool) -> Case {
    Case {
        heads: Heads::new(8, 2, head_dim).unwrap(),
        qo_lens: vec![100, 37, 0],
        kv_lens: vec![4000, 2500, 10],
        page_size: Some(16),
        layout: KvLayout::Nhd,
        causal,
        decode: false,
    }
}

/// Query and key hooks on the FA3 template (Hopper only): `LlamaRope`, whose consumers rewrite
/// their Q rows and each K tile in shared memory, forced at head dims 64, 128 and 256 over Q by
/// cp.async (GQA 3) and by TMA, ragged K/V (by TMA but each request's last tile) and pages of 16
/// (cp.async), few query rows over long KV so that the plan splits it, and under Auto.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_query_and_key_hooks() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    let fa3 = [fa3()];
    let rope = LlamaRope { theta: 10_000.0 };
    for head_dim in [64, 128, 256] {
        let ragged = |kv_heads, layout| Case {
            heads: Heads::new(6, kv_heads, head_dim).unwrap(),
            qo_lens: vec![300, 129, 0, 64],
            kv_lens: vec![700, 129, 50, 1000],
            page_size: None,
            layout,
            causal: true,
            decode: false,
        };
        check_with::<LlamaRope, bf16>(&gpu, &rope, &ragged(2, KvLayout::Nhd), &fa3);
        let auto = [fa3[0], PlanConfig::default()];
        check_with::<LlamaRope, f16>(&gpu, &rope, &ragged(6, KvLayout::Hnd), &auto);
        for causal in [true, false] {
            check_with::<LlamaRope, bf16>(&gpu, &rope, &split_case(head_dim, causal), &fa3);
        }
    }
}

/// FA3's long prompts' K/V tile at head dim 128 (176 keys, two stages, K and V copied on their
/// own pipelines), Hopper only: forced (`KvTile::Long`) over ragged KV, causal and not, GQA 1, 4
/// and 8, NHD and HND, both dtypes, with requests shorter than a tile, one without rows, a
/// partial last tile (by cp.async) and split KV; variants whose build of it spills or loses the
/// overlap (SoftCap, SlidingWindow, ALiBi) run the 128-key tile with its own maps; and Auto takes
/// it for a batch of long requests.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_long_kv_tile() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    let long = [PlanConfig {
        kv_tile: KvTile::Long,
        ..fa3()
    }];
    let mut n = 0;
    for causal in [true, false] {
        for group in [1, 4, 8] {
            n += 1;
            let case = Case {
                heads: Heads::new(8, 8 / group, 128).unwrap(),
                qo_lens: vec![300, 129, 0, 64, 200],
                kv_lens: vec![700, 129, 50, 1000, 250],
                page_size: None,
                layout: alternate_layout(n),
                causal,
                decode: false,
            };
            check_with::<Standard, bf16>(&gpu, &Standard, &case, &long);
            check_with::<Standard, f16>(&gpu, &Standard, &case, &long);
            check_with::<SoftCap, f16>(&gpu, &SoftCap { cap: 5.0 }, &case, &long);
            check_with::<Alibi, bf16>(&gpu, &Alibi::new(8), &case, &long);
        }
    }
    // Few rows over long keys: the plan splits them (partials and the merge); a window.
    let case = Case {
        heads: Heads::new(32, 8, 128).unwrap(),
        qo_lens: vec![1024, 100],
        kv_lens: vec![4096, 5000],
        page_size: None,
        layout: KvLayout::Nhd,
        causal: true,
        decode: false,
    };
    check_with::<Standard, bf16>(&gpu, &Standard, &case, &long);
    check_with::<SlidingWindow, f16>(&gpu, &SlidingWindow { window: 700 }, &case, &long);
    // Auto: every request holds FA3_LONG_TILE_MIN_KV keys or more.
    check_with::<Standard, bf16>(&gpu, &Standard, &case, &[PlanConfig::default()]);
}

/// The FA3 template forced at head dims 64 (128-key tiles, P V by m64n64k16) and 256 (64-key
/// tiles, two stages, O as two n128 accumulators), Hopper only: the grid of [`sm90_grid`], and
/// few query rows over long KV so that the plan splits it (partials of head_dim floats and the
/// merge), causal and not, with every hook kind.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_prefill_hd64_hd256() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    let fa3 = [fa3()];
    assert_eq!(sm90_grid(&gpu, 64) + sm90_grid(&gpu, 256), 12, "cases run");
    for head_dim in [64, 256] {
        for causal in [true, false] {
            let case = split_case(head_dim, causal);
            check_with::<Standard, bf16>(&gpu, &Standard, &case, &fa3);
            check_with::<SlidingWindow, f16>(&gpu, &SlidingWindow { window: 700 }, &case, &fa3);
            let sink = AttentionSink {
                sinks: Array::new((0..8).map(|h| 0.5 * h as f32 - 2.0).collect()),
            };
            check_with::<AttentionSink, bf16>(&gpu, &sink, &case, &fa3);
            check_with::<FlashSigmoid, f16>(&gpu, &FlashSigmoid { bias: -1.0 }, &case, &fa3);
        }
    }
}

/// A plan run again computes every item again (Hopper only): more items than an H100/H200 has
/// SMs, so each persistent FA3 CTA takes several, handing each over in a shared-memory slot that
/// the next items reuse, over three runs of one plan.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_plan_runs_again() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    // Paged (cp.async) and ragged (whole tiles by TMA, each request's last tile by cp.async).
    for page_size in [Some(16), None] {
        let case = Case {
            heads: Heads::new(16, 4, 128).unwrap(),
            qo_lens: vec![1000, 1500, 0, 77],
            kv_lens: vec![1200, 1500, 5, 77],
            page_size,
            layout: KvLayout::Nhd,
            causal: true,
            decode: false,
        };
        check_runs::<Standard, bf16>(&gpu, &Standard, &case, &[fa3()], 3);
    }
}

/// Scales of zero and below with FA3 forced (Hopper only): its build folds sm_scale into the
/// exponents and takes only positive scales, so these batches run FA2 (zero: every visible key
/// weighs the same; negative: the smallest scores weigh most). With and without a logits hook
/// (whose copies test the hook's scale at run time, a positive scale here too).
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_scale_of_zero_or_below() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    for sm_scale in [0.0, -0.05, 0.05] {
        for page_size in [None, Some(16)] {
            let case = Case {
                heads: Heads::new(8, 2, 128).unwrap(),
                qo_lens: vec![300, 1, 129],
                kv_lens: vec![700, 40, 129],
                page_size,
                layout: KvLayout::Nhd,
                causal: true,
                decode: false,
            };
            let fa3 = [fa3()];
            check_scaled::<Standard, bf16>(&gpu, &Standard, &case, &fa3, 1, Some(sm_scale));
            check_scaled::<SlidingWindow, bf16>(
                &gpu,
                &SlidingWindow { window: 200 },
                &case,
                &fa3,
                1,
                Some(sm_scale),
            );
            let soft = SoftCap { cap: 5.0 };
            check_scaled::<SoftCap, f16>(&gpu, &soft, &case, &fa3, 1, Some(sm_scale));
        }
    }
}

/// FA3 over pages of 32 (cp.async), 64 and 256 keys (TMA) with KV chunks of 144 and 160 (Hopper
/// only): a chunk that starts inside a page must not be copied a page at a time from there (a TMA
/// copy would run past its page, where it reads zeros), and one that starts on a page boundary
/// may.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_pages_and_unaligned_chunks() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    for page in [32, 64, 256] {
        for chunk in [144, 160, 256] {
            let config = PlanConfig {
                fixed_kv_chunk: Some(chunk),
                ..fa3()
            };
            let case = Case {
                heads: Heads::new(16, 4, 128).unwrap(),
                qo_lens: vec![200, 1, 77],
                kv_lens: vec![1500, 700, 1030],
                page_size: Some(page),
                layout: KvLayout::Nhd,
                causal: true,
                decode: false,
            };
            check_with::<Standard, bf16>(&gpu, &Standard, &case, &[config]);
        }
    }
}

/// Many items a CTA at every FA3 head dim (Hopper only): 32 KV heads over 40 short requests
/// give about ten 128-row items to each of an H100/H200's persistent CTAs, so every Q slot and
/// item slot is reused many times (head dim 64 has two Q slots), and one request with more
/// query rows than keys gives items that see no key (the Q slot is freed before any S). Over
/// paged caches (pages of 16 by cp.async, of 64 by TMA) and ragged ones (TMA for whole tiles).
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_many_items_a_cta() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    let fa3 = [fa3()];
    let mut qo_lens: Vec<u32> = (0..40).map(|i| 64 + (i * 37) % 65).collect();
    let mut kv_lens: Vec<u32> = (0..40).map(|i| 64 + (i * 53) % 193).collect();
    qo_lens.push(300);
    kv_lens.push(100);
    for head_dim in HEAD_DIMS {
        for (page_size, layout) in [
            (Some(16), KvLayout::Nhd),
            (Some(64), KvLayout::Hnd),
            (None, KvLayout::Nhd),
            (None, KvLayout::Hnd),
        ] {
            let case = Case {
                heads: Heads::new(32, 32, head_dim).unwrap(),
                qo_lens: qo_lens.clone(),
                kv_lens: kv_lens.clone(),
                page_size,
                layout,
                causal: true,
                decode: false,
            };
            check_with::<Standard, bf16>(&gpu, &Standard, &case, &fa3);
        }
    }
}

/// FA3 at head dim 128 runs its consumers in order where K/V go through cp.async (pages of 16
/// and 32, and of 12 keys, which TMA cannot copy) and overlapped where they go by TMA (ragged,
/// pages of 64) (Hopper only). The cases alternate, so both builds are loaded at once, and each
/// plan runs twice; ALiBi's overlapped build spills, so it runs in order under both. Then a CUDA
/// graph over pages of 16, captured with the in-order build, replanned and replayed.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sm90_in_order_where_kv_goes_by_cp_async() {
    let gpu = gpu();
    if not_hopper(&gpu) {
        return;
    }
    let fa3 = [fa3()];
    let heads = Heads::new(8, 2, 128).unwrap();
    for (page_size, layout) in [
        (Some(16), KvLayout::Nhd),
        (None, KvLayout::Nhd),
        (Some(32), KvLayout::Hnd),
        (Some(64), KvLayout::Nhd),
        (Some(12), KvLayout::Hnd),
        (Some(16), KvLayout::Hnd),
    ] {
        for causal in [true, false] {
            let case = Case {
                heads,
                qo_lens: vec![300, 129, 0, 64, 200],
                kv_lens: vec![700, 129, 50, 1000, 100],
                page_size,
                layout,
                causal,
                decode: false,
            };
            check_runs::<Standard, bf16>(&gpu, &Standard, &case, &fa3, 2);
            check_with::<SoftCap, f16>(&gpu, &SoftCap { cap: 5.0 }, &case, &fa3);
            check_with::<Alibi, bf16>(&gpu, &Alibi::new(8), &case, &fa3);
        }
    }
    // Few rows over long KV: the plan splits it (partials and the merge).
    let split = Case {
        heads,
        qo_lens: vec![100, 37, 0],
        kv_lens: vec![4000, 2500, 10],
        page_size: Some(16),
        layout: KvLayout::Nhd,
        causal: true,
        decode: false,
    };
    check_with::<Standard, bf16>(&gpu, &Standard, &split, &fa3);

    // The graph: the batches share one cache of shuffled pages of 16.
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let (num_pages, max_rows) = (200u32, 600u32);
    let round = |xs: Vec<f32>| -> Vec<bf16> { xs.into_iter().map(bf16::from_f32).collect() };
    let cache = num_pages as usize * 16 * 2 * 128;
    let (k, v) = (round(rng.normal_vec(cache)), round(rng.normal_vec(cache)));
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let batch = |qo: &[u32], kv: &[u32]| {
        let pages: u32 = kv.iter().map(|l| l.div_ceil(16)).sum();
        let index =
            KvIndex::paged_from_lens(16, kv, &ids[..pages as usize], num_pages, KvLayout::Nhd)
                .unwrap();
        Batch::new(heads, &indptr(qo), index)
            .unwrap()
            .with_causal(true)
    };
    let steps: [(&[u32], &[u32]); 3] = [
        (&[300, 129], &[700, 129]),
        (&[1, 599], &[5, 1000]),
        (&[200, 200, 200], &[1000, 300, 900]),
    ];
    let config = PlanConfig {
        graph: Some(GraphCapacity {
            work_items: 2048,
            batch: 4,
            qo_rows: max_rows,
            kv_blocks: num_pages,
        }),
        ..fa3[0]
    };
    let q_elems = max_rows as usize * 8 * 128;
    let plan = BatchPrefill::plan_with(&gpu, batch(steps[0].0, steps[0].1), config).unwrap();
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
        let rows = b.q_len();
        let mut q = round(rng.normal_vec(rows));
        q.resize(q_elems, bf16::NAN);
        graph.write(Input::Q, &q).unwrap();
        graph.launch().unwrap();
        let got: Vec<f32> = graph.o().to_vec().unwrap()[..rows]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let want = reference::attention_typed(&Standard, &b, &q[..rows], &k, &v).unwrap();
        let (err, request, head) = worst_rel_l2(&b, &got, &want.o);
        assert!(
            err <= tolerance::<bf16>(),
            "graph step {step}: relative L2 error {err:.2e} at request {request}, head {head} \
             (seed {seed})"
        );
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_standard() {
    sweep(&Standard);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_soft_cap() {
    sweep(&SoftCap { cap: 5.0 });
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_alibi() {
    sweep(&Alibi::new(8));
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_sliding_window() {
    sweep(&SlidingWindow { window: 12 });
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_custom_mask() {
    // A fixed pseudo-random bit pattern long enough for every case's (request, qo, kv) triples.
    let mut rng = Rng::from_time();
    // Enough bits for the largest request of the grid (128 query rows x 4096 keys).
    let words: Vec<u32> = (0..1 << 15).map(|_| rng.next_u64() as u32).collect();
    // Request b starts at bit 1000 * b: distinct, overlapping masks, one offset per request of the
    // largest batch (33).
    let offsets: Vec<u32> = (0..33).map(|b| 1000 * b).collect();
    sweep(&CustomMask {
        bits: Array::new(words),
        offsets: Array::new(offsets),
    });
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_flash_sigmoid() {
    sweep(&FlashSigmoid { bias: -1.0 });
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_llama_rope() {
    sweep(&LlamaRope { theta: 10_000.0 });
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_attention_sink() {
    let sinks: Vec<f32> = (0..8).map(|h| 0.5 * h as f32 - 1.0).collect();
    sweep(&AttentionSink {
        sinks: Array::new(sinks),
    });
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_bad_input_is_an_error_not_a_crash() {
    let gpu = gpu();
    let heads = Heads::new(8, 2, 96).unwrap();
    let kv = KvIndex::ragged(&[0, 4], KvLayout::Nhd).unwrap();
    let batch = Batch::new(heads, &[0, 4], kv).unwrap();
    let err = BatchPrefill::plan(&gpu, batch)
        .err()
        .expect("head dim 96 must be refused");
    assert!(err.to_string().contains("head_dim 96"), "{err}");

    let heads = Heads::new(8, 2, 64).unwrap();
    let kv = KvIndex::ragged(&[0, 4], KvLayout::Nhd).unwrap();
    let plan = BatchPrefill::plan(&gpu, Batch::new(heads, &[0, 4], kv).unwrap()).unwrap();
    let q = gpu.filled(4 * 8 * 64, bf16::ONE).unwrap();
    let kv = gpu.filled(4 * 2 * 64, bf16::ONE).unwrap();
    let mut short = gpu.filled(10, bf16::ZERO).unwrap();
    let err = plan
        .run(&Standard, &q, &kv, &kv, &mut short, None)
        .unwrap_err();
    assert!(err.to_string().contains("o has 10 elements"), "{err}");
    let host = Backend::Cpu.upload(&vec![bf16::ONE; 4 * 8 * 64]).unwrap();
    let mut o = gpu.filled(4 * 8 * 64, bf16::ZERO).unwrap();
    let err = plan
        .run(&Standard, &host, &kv, &kv, &mut o, None)
        .unwrap_err();
    assert!(err.to_string().contains("host buffer"), "{err}");
    let mut lse = gpu.filled(4 * 8, 0.0f32).unwrap();
    let err = plan
        .run(
            &FlashSigmoid { bias: 0.0 },
            &q,
            &kv,
            &kv,
            &mut o,
            Some(&mut lse),
        )
        .unwrap_err();
    assert!(err.to_string().contains("no softmax"), "{err}");
    // Slopes for 4 of the 8 query heads: refused before the launch (it would trap the context).
    let err = plan
        .run(&Alibi::new(4), &q, &kv, &kv, &mut o, None)
        .unwrap_err();
    assert!(
        err.to_string().contains("must cover num_qo_heads = 8"),
        "{err}"
    );
    // The context is still usable.
    plan.run(&Alibi::new(8), &q, &kv, &kv, &mut o, None)
        .unwrap();
    assert!(o.to_vec().unwrap().iter().all(|x| x.is_finite()));
}

/// The 16-row tile in both its forms, one warp along the keys and two (each taking a slice of
/// every K/V tile, their states merged in shared memory), forced in turn: short causal and full
/// prefills (packed rows of at most 16 a request, so the plan takes that tile) and decode batches
/// whose KV lengths end inside, on and past the edges of a warp's slice and of the CTA's tile,
/// over ragged and paged KV, with a request of no keys, and a decode batch small enough that the
/// plan splits KV at chunk edges that are not tile edges (partials and the merge). Every hook
/// kind: logits (SoftCap), mask (SlidingWindow, CustomMask), query and key (LlamaRope), sink
/// (AttentionSink), softmax off (FlashSigmoid).
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_short_tile_warps_along_the_keys() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let words: Vec<u32> = (0..1 << 15).map(|_| rng.next_u64() as u32).collect();
    let mask = CustomMask {
        bits: Array::new(words),
        offsets: Array::new((0..8).map(|b| 1000 * b).collect::<Vec<u32>>()),
    };
    let sink = AttentionSink {
        sinks: Array::new((0..8).map(|h| 0.5 * h as f32 - 1.0).collect::<Vec<f32>>()),
    };
    for hd in HEAD_DIMS {
        let mut cases = Vec::new();
        for (n, page_size) in [None, Some(1), Some(16)].into_iter().enumerate() {
            for causal in [true, false] {
                cases.push(Case {
                    heads: Heads::new(8, 2, hd).unwrap(),
                    qo_lens: vec![1, 3, 2, 4, 1, 2],
                    kv_lens: vec![1, 31, 129, 600, 0, 257],
                    page_size,
                    layout: alternate_layout(n),
                    causal,
                    decode: false,
                });
            }
            for kv_heads in [1, 2, 8] {
                cases.push(Case {
                    heads: Heads::new(8, kv_heads, hd).unwrap(),
                    qo_lens: vec![1; 8],
                    kv_lens: vec![32, 33, 63, 64, 127, 128, 129, 0],
                    page_size: page_size.or(Some(16)),
                    layout: KvLayout::Nhd,
                    causal: false,
                    decode: true,
                });
                // Few items: the plan splits the long requests.
                cases.push(Case {
                    heads: Heads::new(8, kv_heads, hd).unwrap(),
                    qo_lens: vec![1; 3],
                    kv_lens: vec![5000, 1100, 300],
                    page_size: page_size.or(Some(16)),
                    layout: KvLayout::Hnd,
                    causal: false,
                    decode: true,
                });
            }
        }
        for case in &cases {
            // Decode on tensor cores (the 16-row tile), prefill on FA2, with each warp count, and
            // one warp with the narrow K/V tile (a decode at head dim 128 only: elsewhere the
            // plan keeps the default).
            let forms = [
                (KvWarps::One, KvTile::Default),
                (KvWarps::Two, KvTile::Auto),
                (KvWarps::One, KvTile::Narrow),
            ];
            let configs = forms.map(|(kv_warps, kv_tile)| PlanConfig {
                decode_kernel: DecodeKernel::TensorCores,
                prefill_kernel: PrefillKernel::Fa2,
                kv_warps,
                kv_tile,
                ..PlanConfig::default()
            });
            // Each config must plan the 16-row tile with its warp count and K/V tile, or the case
            // does not test what it says.
            let kv = kv_index(case, &mut rng);
            let narrow = [false, false, case.decode && hd == 128];
            for ((config, warps), narrow) in configs.iter().zip([0, 2, 0]).zip(narrow) {
                let tiles = if case.decode {
                    let plan = BatchDecode::plan_with(&gpu, case.heads, kv.clone(), None, *config);
                    plan.unwrap().work_list().and_then(|l| l.tiles.clone())
                } else {
                    let batch = Batch::new(case.heads, &indptr(&case.qo_lens), kv.clone())
                        .unwrap()
                        .with_causal(case.causal);
                    let plan = BatchPrefill::plan_with(&gpu, batch, *config).unwrap();
                    plan.work_list().and_then(|l| l.tiles.clone())
                };
                let t = tiles.expect("a GPU plan records its tiles");
                assert_eq!((t.cta_tile_q, t.instance.kv_warps), (16, warps), "{t}");
                assert_eq!(t.instance.kv_tile == 16, narrow, "{t}");
            }
            check_with::<Standard, bf16>(&gpu, &Standard, case, &configs);
            check_with::<SoftCap, f16>(&gpu, &SoftCap { cap: 5.0 }, case, &configs);
            let window = SlidingWindow { window: 12 };
            check_with::<SlidingWindow, bf16>(&gpu, &window, case, &configs);
            check_with::<CustomMask, bf16>(&gpu, &mask, case, &configs);
            let rope = LlamaRope { theta: 10_000.0 };
            check_with::<LlamaRope, f16>(&gpu, &rope, case, &configs);
            check_with::<AttentionSink, bf16>(&gpu, &sink, case, &configs);
            let sigmoid = FlashSigmoid { bias: -1.0 };
            check_with::<FlashSigmoid, bf16>(&gpu, &sigmoid, case, &configs);
        }
    }
}

/// The benchmark's skewed decode (4 requests of 8192 keys among 60 of 512, GQA 4, head dim 128):
/// on Hopper the plan's wave model takes the narrow K/V tile for it, in 512-key chunks (host
/// test `a_skewed_decode_takes_the_narrow_kv_tile_where_the_wave_model_says`); its result must
/// match the reference, as the default tile's does.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_skewed_decode_on_the_narrow_kv_tile() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let mut kv_lens = vec![512; 64];
    for l in kv_lens.iter_mut().step_by(16) {
        *l = 8192;
    }
    let case = Case {
        heads: Heads::new(32, 8, 128).unwrap(),
        qo_lens: vec![1; 64],
        kv_lens,
        page_size: Some(16),
        layout: KvLayout::Nhd,
        causal: false,
        decode: true,
    };
    let configs = [KvTile::Auto, KvTile::Default].map(|kv_tile| PlanConfig {
        decode_kernel: DecodeKernel::TensorCores,
        kv_tile,
        ..PlanConfig::default()
    });
    let kv = kv_index(&case, &mut rng);
    let plan = BatchDecode::plan_with(&gpu, case.heads, kv, None, configs[0]).unwrap();
    let list = plan.work_list().expect("a GPU plan");
    let t = list.tiles.as_ref().expect("its tiles");
    let hopper = gpu.gpu().is_some_and(|g| g.arch().major == 9);
    if hopper {
        assert_eq!((t.instance.kv_tile, list.kv_chunk), (16, 512), "{t}");
    }
    check_with::<Standard, bf16>(&gpu, &Standard, &case, &configs);
}

/// The narrow K/V tile forced on a small decode batch (short, empty and split requests, every
/// hook kind that reads the K/V tile), for the sanitizers.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_narrow_kv_tile_small() {
    let gpu = gpu();
    let case = Case {
        heads: Heads::new(8, 2, 128).unwrap(),
        qo_lens: vec![1; 5],
        kv_lens: vec![600, 33, 0, 1, 129],
        page_size: Some(16),
        layout: KvLayout::Hnd,
        causal: false,
        decode: true,
    };
    let configs = [PlanConfig {
        decode_kernel: DecodeKernel::TensorCores,
        kv_warps: KvWarps::One,
        kv_tile: KvTile::Narrow,
        ..PlanConfig::default()
    }];
    check_with::<Standard, bf16>(&gpu, &Standard, &case, &configs);
    let rope = LlamaRope { theta: 10_000.0 };
    check_with::<LlamaRope, f16>(&gpu, &rope, &case, &configs);
    check_with::<SoftCap, bf16>(&gpu, &SoftCap { cap: 5.0 }, &case, &configs);
}
