//! Memory the caller owns: host and device views, q and o inside wider rows (a fused QKV), one
//! interleaved K/V cache. Each strided run is compared with the dense run of the same data (bit
//! for bit on the CPU) or with the CPU reference (GPU).

use ferrinfer::attention::KvStrides;
use ferrinfer::attention::{QoStrides, reference};
use ferrinfer::ops::kv_append::{AppendPlan, KvCacheMut, NewKv};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;
use ferrinfer::{Element, indptr};
use ferrinfer_testkit::Rng;
use std::sync::Arc;

use ferrinfer::cudarc::driver::{CudaSlice, DevicePtr};
use ferrinfer::device::Gpu;

/// One batch over a paged cache, its data dense and in the caller's layouts.
struct Case<T> {
    heads: Heads,
    /// Dense batch (dense K/V, q and o).
    dense: Batch,
    /// The same batch over the interleaved cache, q in fused QKV rows, o in padded rows.
    strided: Batch,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// `[rows, (hq + 2 hk) * d]`, q first.
    qkv: Vec<T>,
    /// `[pages, 2, page]`: K then V of each page.
    cache: Vec<T>,
    o_row: usize,
    rows: usize,
}

fn case<T: Element>(
    rng: &mut Rng,
    page: u32,
    kv_lens: &[u32],
    qo_lens: &[u32],
    layout: KvLayout,
) -> Case<T> {
    let heads = Heads::new(8, 2, 64).unwrap();
    let (hq, hk, d) = (8usize, 2usize, 64usize);
    let used: u32 = kv_lens.iter().map(|l| l.div_ceil(page)).sum();
    let pages = used + 3; // spare pages hold NaN: reading one fails the test
    let mut ids: Vec<i32> = (0..pages as i32).collect();
    rng.shuffle(&mut ids);
    ids.truncate(used as usize);
    let kv = KvIndex::paged_from_lens(page, kv_lens, &ids, pages, layout).unwrap();
    let ps = page as usize * hk * d;
    let mut k = vec![T::from_f32(f32::NAN); pages as usize * ps];
    let mut v = k.clone();
    for &p in &ids {
        for e in 0..ps {
            k[p as usize * ps + e] = T::from_f32(rng.normal());
            v[p as usize * ps + e] = T::from_f32(rng.normal());
        }
    }
    let mut cache = Vec::with_capacity(2 * k.len());
    for p in 0..pages as usize {
        cache.extend_from_slice(&k[p * ps..][..ps]);
        cache.extend_from_slice(&v[p * ps..][..ps]);
    }
    let rows: u32 = qo_lens.iter().sum();
    let rows = rows as usize;
    let row = (hq + 2 * hk) * d;
    let qkv: Vec<T> = (0..rows * row).map(|_| T::from_f32(rng.normal())).collect();
    let q: Vec<T> = qkv.chunks(row).flat_map(|r| r[..hq * d].to_vec()).collect();
    let dense = Batch::new(heads, &indptr(qo_lens), kv.clone())
        .unwrap()
        .with_causal(true);
    let o_row = hq * d + 64;
    let strided = Batch::new(heads, &indptr(qo_lens), kv.interleaved(&heads).unwrap())
        .unwrap()
        .with_causal(true)
        .with_qo_strides(
            QoStrides::new(row as u64, d as u64),
            QoStrides::new(o_row as u64, d as u64),
        )
        .unwrap();
    Case {
        heads,
        dense,
        strided,
        q,
        k,
        v,
        qkv,
        cache,
        o_row,
        rows,
    }
}

impl<T: Element> Case<T> {
    /// The dense rows of a padded o (and check that the padding was not written).
    fn unpad(&self, o: &[T]) -> Vec<T> {
        let w = self.heads.num_qo_heads() as usize * self.heads.head_dim() as usize;
        assert_padding_nan(o, self.o_row, w);
        o.chunks(self.o_row).flat_map(|r| r[..w].to_vec()).collect()
    }
    fn v_off(&self) -> usize {
        self.strided.kv().interleaved_v_offset(&self.heads)
    }
}

/// Rows of `stride` elements whose columns past `width` are all still NaN (not written).
fn assert_padding_nan<T: Element>(x: &[T], stride: usize, width: usize) {
    assert!(
        x.chunks(stride)
            .all(|r| r[width..].iter().all(|x| x.to_f32().is_nan())),
        "padding written"
    );
}

fn bits<T: Element>(xs: &[T]) -> Vec<u32> {
    xs.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// Prefill over the interleaved cache with q in fused rows and padded o, on the CPU through host
/// views: bit for bit the dense run.
#[test]
fn strided_prefill_matches_dense_on_the_cpu() {
    let mut rng = Rng::from_time();
    let cpu = Backend::Cpu;
    for layout in [KvLayout::Nhd, KvLayout::Hnd] {
        for page in [1, 16] {
            let c = case::<bf16>(&mut rng, page, &[37, 5, 70], &[9, 5, 1], layout);
            let plan = BatchPrefill::plan(&cpu, c.dense.clone()).unwrap();
            let (qb, kb, vb) = (
                cpu.upload(&c.q).unwrap(),
                cpu.upload(&c.k).unwrap(),
                cpu.upload(&c.v).unwrap(),
            );
            let mut ob = cpu.filled(c.q.len(), bf16::NAN).unwrap();
            plan.run(&Standard, &qb, &kb, &vb, &mut ob, None).unwrap();

            let plan = BatchPrefill::plan(&cpu, c.strided.clone()).unwrap();
            let mut o = vec![bf16::NAN; c.rows * c.o_row];
            let v = View::host(&c.cache).slice(c.v_off()..).unwrap();
            plan.run(
                &Standard,
                &View::host(&c.qkv),
                &View::host(&c.cache),
                &v,
                &mut ViewMut::host(&mut o),
                None,
            )
            .unwrap();
            assert_eq!(
                bits(&c.unpad(&o)),
                bits(&ob.to_vec().unwrap()),
                "{layout:?} page {page}"
            );
        }
    }
}

/// Decode with `plan_batch`: q strided, interleaved cache, host views; equal to the dense run.
#[test]
fn strided_decode_matches_dense_on_the_cpu() {
    let mut rng = Rng::from_time();
    let cpu = Backend::Cpu;
    let c = case::<f16>(&mut rng, 16, &[40, 1, 17], &[1, 1, 1], KvLayout::Nhd);
    let plan = BatchDecode::plan(&cpu, c.heads, c.dense.kv().clone(), None).unwrap();
    let mut want = vec![f16::NAN; c.q.len()];
    plan.run(
        &Standard,
        &View::host(&c.q),
        &View::host(&c.k),
        &View::host(&c.v),
        &mut ViewMut::host(&mut want),
        None,
    )
    .unwrap();
    let batch = Batch::decode(c.heads, c.strided.kv().clone())
        .unwrap()
        .with_qo_strides(c.strided.q_strides(), c.strided.o_strides())
        .unwrap();
    let plan = BatchDecode::plan_batch(&cpu, batch, PlanConfig::default()).unwrap();
    let mut o = vec![f16::NAN; c.rows * c.o_row];
    let cache = View::host(&c.cache);
    plan.run(
        &Standard,
        &View::host(&c.qkv),
        &cache,
        &cache.slice(c.v_off()..).unwrap(),
        &mut ViewMut::host(&mut o),
        None,
    )
    .unwrap();
    assert_eq!(bits(&c.unpad(&o)), bits(&want));
    // A prefill batch is not a decode batch.
    let e = BatchDecode::plan_batch(&cpu, c.dense.clone(), PlanConfig::default());
    assert!(e.is_err() || c.dense.total_qo() == c.dense.batch());
}

/// Append into an interleaved cache equals appending into separate K and V caches.
#[test]
fn append_into_an_interleaved_cache() {
    let mut rng = Rng::from_time();
    let cpu = Backend::Cpu;
    for layout in [KvLayout::Nhd, KvLayout::Hnd] {
        let c = case::<bf16>(&mut rng, 4, &[9, 3], &[1, 1], layout);
        let heads = c.heads;
        let qo = [0, 2, 5];
        let rows = 5 * 2 * 64;
        let nk: Vec<bf16> = (0..rows).map(|_| bf16::from_f32(rng.normal())).collect();
        let nv: Vec<bf16> = (0..rows).map(|_| bf16::from_f32(rng.normal())).collect();
        let (nkb, nvb) = (cpu.upload(&nk).unwrap(), cpu.upload(&nv).unwrap());
        let dense = AppendPlan::new(&cpu, heads, c.dense.kv(), &qo, 8).unwrap();
        let (mut k, mut v) = (c.k.clone(), c.v.clone());
        dense
            .run(
                &cpu,
                NewKv { k: &nkb, v: &nvb },
                KvCacheMut {
                    k: &mut ViewMut::host(&mut k),
                    v: &mut ViewMut::host(&mut v),
                },
            )
            .unwrap();
        let inter = AppendPlan::new(&cpu, heads, c.strided.kv(), &qo, 8).unwrap();
        let mut cache = c.cache.clone();
        inter
            .run_interleaved(
                &cpu,
                NewKv { k: &nkb, v: &nvb },
                &mut ViewMut::host(&mut cache),
            )
            .unwrap();
        let ps = cache.len() / 2 / (c.k.len() / (4 * 2 * 64));
        let (mut gk, mut gv) = (Vec::new(), Vec::new());
        for p in cache.chunks(2 * ps) {
            gk.extend_from_slice(&p[..ps]);
            gv.extend_from_slice(&p[ps..]);
        }
        assert_eq!(bits(&gk), bits(&k), "{layout:?} K");
        assert_eq!(bits(&gv), bits(&v), "{layout:?} V");
        // A dense plan cannot write an interleaved cache.
        let e = dense
            .run_interleaved(
                &cpu,
                NewKv { k: &nkb, v: &nvb },
                &mut ViewMut::host(&mut cache),
            )
            .unwrap_err();
        assert!(e.to_string().contains("KvIndex::interleaved"), "{e}");
        // A cache one element short.
        let n = cache.len() - 1;
        let e = inter
            .run_interleaved(
                &cpu,
                NewKv { k: &nkb, v: &nvb },
                &mut ViewMut::host(&mut cache[..n]),
            )
            .unwrap_err();
        assert!(e.to_string().contains("at least"), "{e}");
    }
}

/// Views work with the ops too (RMSNorm through a row of a wider tensor's slice).
#[test]
fn ops_take_views() {
    use ferrinfer::ops::norm;
    let cpu = Backend::Cpu;
    let x: Vec<bf16> = (0..4 * 64)
        .map(|i| bf16::from_f32(i as f32 / 50.0))
        .collect();
    let w = vec![bf16::ONE; 64];
    let mut want = cpu.filled(2 * 64, bf16::ZERO).unwrap();
    let xb = cpu.upload(&x[64..192]).unwrap();
    let shape = norm::NormShape::new(2, 64).unwrap();
    norm::rmsnorm(&cpu, shape, &xb, &cpu.upload(&w).unwrap(), 1e-6, &mut want).unwrap();
    let mut got = vec![bf16::ZERO; 2 * 64];
    let xv = View::host(&x).slice(64..192).unwrap();
    norm::rmsnorm(
        &cpu,
        shape,
        &xv,
        &View::host(&w),
        1e-6,
        &mut ViewMut::host(&mut got),
    )
    .unwrap();
    assert_eq!(bits(&got), bits(&want.to_vec().unwrap()));
}

/// Short views, overlapping o, aliasing K/V strides, misplaced views: clear errors.
#[test]
fn bad_views_and_strides_are_refused() {
    let mut rng = Rng::from_time();
    let cpu = Backend::Cpu;
    let c = case::<bf16>(&mut rng, 16, &[20], &[4], KvLayout::Nhd);
    let plan = BatchPrefill::plan(&cpu, c.strided.clone()).unwrap();
    let mut o = vec![bf16::NAN; c.rows * c.o_row];
    let cache = View::host(&c.cache);
    let v = cache.slice(c.v_off()..).unwrap();
    // q's extent ends with the last row's q heads (its K and V columns are not read).
    let q_extent = (c.rows - 1) * 12 * 64 + 8 * 64;
    assert!(View::host(&c.qkv[..q_extent]).len() < c.qkv.len());
    let short_q = View::host(&c.qkv[..q_extent - 1]);
    let err = |r: ferrinfer::Result<()>| r.unwrap_err().to_string();
    let e = err(plan.run(
        &Standard,
        &short_q,
        &cache,
        &v,
        &mut ViewMut::host(&mut o),
        None,
    ));
    assert!(e.contains("q has") && e.contains("reach"), "{e}");
    let short_v = cache.slice(c.v_off() + 1..).unwrap();
    let e = err(plan.run(
        &Standard,
        &View::host(&c.qkv),
        &cache,
        &short_v,
        &mut ViewMut::host(&mut o),
        None,
    ));
    assert!(e.contains("v has") && e.contains("at least"), "{e}");
    // o rows overlapping: row stride below a row of heads.
    let e = c
        .dense
        .clone()
        .with_qo_strides(QoStrides::dense(&c.heads), QoStrides::new(64, 64));
    let e = BatchPrefill::plan(&cpu, e.unwrap())
        .err()
        .map(|e| e.to_string());
    let e = e.unwrap_or_else(|| {
        let plan = BatchPrefill::plan(
            &cpu,
            c.dense
                .clone()
                .with_qo_strides(QoStrides::dense(&c.heads), QoStrides::new(64, 64))
                .unwrap(),
        )
        .unwrap();
        let (q, k, vv) = (View::host(&c.q), View::host(&c.k), View::host(&c.v));
        err(plan.run(&Standard, &q, &k, &vv, &mut ViewMut::host(&mut o), None))
    });
    assert!(e.contains("overlap"), "{e}");
    // K/V strides whose heads alias, and a ragged index with block != token.
    let kv = c
        .dense
        .kv()
        .clone()
        .with_strides(KvStrides {
            block: 16 * 128,
            token: 128,
            head: 32,
        })
        .unwrap();
    let e = Batch::new(c.heads, &[0, 4], kv).unwrap_err().to_string();
    assert!(e.contains("alias"), "{e}");
    let e = KvIndex::ragged(&[0, 5], KvLayout::Nhd)
        .unwrap()
        .with_strides(KvStrides {
            block: 256,
            token: 128,
            head: 64,
        })
        .unwrap_err();
    assert!(e.to_string().contains("block == token"), "{e}");
    assert!(
        KvIndex::ragged(&[0, 5], KvLayout::Nhd)
            .unwrap()
            .interleaved(&c.heads)
            .is_err()
    );
}

// ---------------------------------------------------------------------------------------------
// GPU: device views of cudarc slices and raw pointers, compared with the CPU reference.

/// GPU 0's backend and its `Gpu`.
fn cuda() -> (Backend, Arc<Gpu>) {
    let backend = Backend::cuda(0).unwrap();
    let gpu = backend.gpu().unwrap().clone();
    (backend, gpu)
}

/// A copy of `x` on the GPU, as the caller's cudarc code would make it.
fn up<T: ferrinfer::device::Pod>(gpu: &Arc<Gpu>, x: &[T]) -> CudaSlice<T> {
    gpu.stream().clone_htod(x).unwrap()
}

fn down<T: ferrinfer::device::Pod>(gpu: &Arc<Gpu>, x: &CudaSlice<T>) -> Vec<T> {
    gpu.stream().clone_dtoh(x).unwrap()
}

/// The device address of `x` (for `View::from_raw`).
fn raw_ptr<T>(gpu: &Arc<Gpu>, x: &CudaSlice<T>) -> u64 {
    let (ptr, _sync) = x.device_ptr(gpu.stream());
    ptr
}

fn tolerance<T: Element>() -> f64 {
    if T::DTYPE == ferrinfer::DType::F16 {
        2e-3
    } else {
        1e-2
    }
}

/// Prefill (or decode) over the interleaved cache on the GPU with q in fused QKV rows (a device
/// view of a `CudaSlice`), V a sub-view of the cache, o padded (a raw-pointer view when `raw`).
fn gpu_strided<T: Element>(page: u32, decode: bool, layout: KvLayout, raw: bool) {
    let (backend, gpu) = cuda();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let qo: &[u32] = if decode {
        &[1, 1, 1, 1]
    } else {
        &[33, 1, 70, 7]
    };
    let c = case::<T>(&mut rng, page, &[300, 17, 129, 7], qo, layout);
    let want = reference::attention_typed(&Standard, &c.dense, &c.q, &c.k, &c.v).unwrap();
    let qkv = up(&gpu, &c.qkv);
    let cache = up(&gpu, &c.cache);
    let mut o = up(&gpu, &vec![T::from_f32(f32::NAN); c.rows * c.o_row]);
    let q = View::device(&qkv, &gpu).unwrap();
    let k = View::device(&cache, &gpu).unwrap();
    let v_part = cache.slice(c.v_off()..);
    let v = View::device(&v_part, &gpu).unwrap();
    {
        let mut ov = if raw {
            let ptr = raw_ptr(&gpu, &o);
            // SAFETY: `o` is `rows * o_row` elements of this GPU, outlives the view, and nothing
            // else touches it until the run below is synchronised.
            unsafe { ViewMut::<T>::from_raw(ptr, c.rows * c.o_row, &gpu).unwrap() }
        } else {
            ViewMut::device(&mut o, &gpu).unwrap()
        };
        if decode {
            let batch = Batch::decode(c.heads, c.strided.kv().clone())
                .unwrap()
                .with_qo_strides(c.strided.q_strides(), c.strided.o_strides())
                .unwrap();
            for kernel in [DecodeKernel::CudaCores, DecodeKernel::TensorCores] {
                let config = PlanConfig {
                    decode_kernel: kernel,
                    ..PlanConfig::default()
                };
                let plan = BatchDecode::plan_batch(&backend, batch.clone(), config).unwrap();
                plan.run(&Standard, &q, &k, &v, &mut ov, None).unwrap();
            }
        } else {
            let plan = BatchPrefill::plan(&backend, c.strided.clone()).unwrap();
            plan.run(&Standard, &q, &k, &v, &mut ov, None).unwrap();
        }
    }
    backend.synchronize().unwrap();
    let got: Vec<f32> = c
        .unpad(&down(&gpu, &o))
        .iter()
        .map(|x| x.to_f32())
        .collect();
    assert!(!reference::has_nan(&got), "NaN in o (seed {seed})");
    let (err, req, head) = reference::worst_rel_l2(&c.dense, &got, &want.o);
    assert!(
        err <= tolerance::<T>(),
        "{:?} page {page} decode {decode} {layout:?}: {err:.2e} at request {req} head {head} \
         (seed {seed})",
        T::DTYPE
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_views_interleaved_prefill() {
    for page in [1, 16] {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            gpu_strided::<bf16>(page, false, layout, false);
            gpu_strided::<f16>(page, false, layout, true);
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_views_interleaved_decode() {
    for page in [1, 16] {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            gpu_strided::<f16>(page, true, layout, false);
            gpu_strided::<bf16>(page, true, layout, true);
        }
    }
}

/// Interleaved append on the GPU equals the CPU's, and misplaced or misaligned views are refused.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_views_append_and_errors() {
    let (backend, gpu) = cuda();
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    for page in [1, 16] {
        let c = case::<bf16>(&mut rng, page, &[40, 3], &[1, 1], KvLayout::Nhd);
        let qo = [0, 5, 8];
        let nk: Vec<bf16> = (0..8 * 128).map(|_| bf16::from_f32(rng.normal())).collect();
        let nv: Vec<bf16> = (0..8 * 128).map(|_| bf16::from_f32(rng.normal())).collect();
        let mut want = c.cache.clone();
        let (nkc, nvc) = (cpu.upload(&nk).unwrap(), cpu.upload(&nv).unwrap());
        AppendPlan::new(&cpu, c.heads, c.strided.kv(), &qo, 8)
            .unwrap()
            .run_interleaved(
                &cpu,
                NewKv { k: &nkc, v: &nvc },
                &mut ViewMut::host(&mut want),
            )
            .unwrap();
        let plan = AppendPlan::new(&backend, c.heads, c.strided.kv(), &qo, 8).unwrap();
        let (nkd, nvd) = (up(&gpu, &nk), up(&gpu, &nv));
        let mut cache = up(&gpu, &c.cache);
        plan.run_interleaved(
            &backend,
            NewKv {
                k: &View::device(&nkd, &gpu).unwrap(),
                v: &View::device(&nvd, &gpu).unwrap(),
            },
            &mut ViewMut::device(&mut cache, &gpu).unwrap(),
        )
        .unwrap();
        let got = down(&gpu, &cache);
        assert_eq!(bits(&got), bits(&want), "page {page}");
    }
    // A host view on the GPU backend, and a q view 2 bytes off 16-byte alignment.
    let c = case::<bf16>(&mut rng, 16, &[20], &[4], KvLayout::Nhd);
    let plan = BatchPrefill::plan(&backend, c.dense.clone()).unwrap();
    let (q, k, v) = (up(&gpu, &c.q), up(&gpu, &c.k), up(&gpu, &c.v));
    let mut o = up(&gpu, &c.q);
    let (kv, vv) = (
        View::device(&k, &gpu).unwrap(),
        View::device(&v, &gpu).unwrap(),
    );
    let mut ov = ViewMut::device(&mut o, &gpu).unwrap();
    let e = plan
        .run(&Standard, &View::host(&c.q), &kv, &vv, &mut ov, None)
        .unwrap_err();
    assert!(e.to_string().contains("host"), "{e}");
    let big = up(&gpu, &[c.q.clone(), vec![bf16::ZERO]].concat());
    let shifted = View::device(&big, &gpu).unwrap().slice(1..).unwrap();
    let e = plan
        .run(&Standard, &shifted, &kv, &vv, &mut ov, None)
        .unwrap_err();
    assert!(e.to_string().contains("16-byte"), "{e}");
    let _ = q;
}

// ---------------------------------------------------------------------------------------------
// RoPE, fused RoPE + append, explicit append and single-request attention at the caller's
// strides: bit for bit the dense runs on the CPU.

use ferrinfer::attention::Single;
use ferrinfer::ops::kv_append::{self, PageTable, PagedCache};
use ferrinfer::ops::rope::{
    self, Angles, Frequencies, Positions, Qk, QkMut, Rope, RopeLayout, RowStrides,
};

fn randv<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.normal())).collect()
}

/// Rows `[rows, width]` taken from `[rows, stride]` starting at column `at`.
fn cols<T: Copy>(x: &[T], stride: usize, at: usize, width: usize, rows: usize) -> Vec<T> {
    (0..rows)
        .flat_map(|r| x[r * stride + at..][..width].to_vec())
        .collect()
}

/// `[rows, width]` rows spread to `stride`, the gaps NaN.
fn pad<T: Element>(x: &[T], width: usize, stride: usize) -> Vec<T> {
    x.chunks(width)
        .flat_map(|r| {
            let mut row = r.to_vec();
            row.resize(stride, T::from_f32(f32::NAN));
            row
        })
        .collect()
}

const QKV_HEADS: (usize, usize, usize) = (8, 2, 64);

fn qkv_heads() -> Heads {
    Heads::new(8, 2, 64).unwrap()
}

/// q and k of the fused QKV rows `qkv` (one a position), turned in place by `rope` on the CPU:
/// the dense run the strided ones are compared with.
fn dense_rope<T: Element>(
    rope: &Rope,
    angles: Angles,
    qkv: &[T],
    positions: &Buffer<i32>,
) -> (Vec<T>, Vec<T>) {
    let (hq, hk, d) = QKV_HEADS;
    let (tokens, row) = (positions.len(), (hq + 2 * hk) * d);
    let (mut q, mut k) = (
        cols(qkv, row, 0, hq * d, tokens),
        cols(qkv, row, hq * d, hk * d, tokens),
    );
    rope::apply_in_place(
        &Backend::Cpu,
        rope,
        angles,
        Positions::PerToken(positions),
        QkMut {
            q: &mut ViewMut::host(&mut q),
            k: &mut ViewMut::host(&mut k),
        },
    )
    .unwrap();
    (q, k)
}

/// RoPE in place on q and k in padded rows, and out of place from a fused QKV into dense and
/// padded outputs: each equals the dense in-place run.
#[test]
fn strided_rope_matches_dense_on_the_cpu() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let heads = qkv_heads();
    let (hq, hk, d) = QKV_HEADS;
    let (tokens, row) = (7usize, (hq + 2 * hk) * d);
    let qkv: Vec<bf16> = randv(&mut rng, tokens * row);
    let pos: Vec<i32> = (0..tokens).map(|_| rng.below(5000) as i32).collect();
    let positions = cpu.upload(&pos).unwrap();
    for (rd, layout) in [(64, RopeLayout::NeoX), (32, RopeLayout::GptJ)] {
        let angles = Angles::Computed(Frequencies::new(1e4).unwrap());
        let dense = Rope::new(heads, rd, layout).unwrap();
        let (q, k) = dense_rope(&dense, angles, &qkv, &positions);
        // In place, padded rows.
        let padded = RowStrides {
            q: (hq * d + 8) as u64,
            k: (hk * d + 24) as u64,
            v: (hk * d) as u64,
        };
        let rope_p = dense.with_row_strides(padded, padded).unwrap();
        let mut qp = pad(&cols(&qkv, row, 0, hq * d, tokens), hq * d, hq * d + 8);
        let mut kp = pad(
            &cols(&qkv, row, hq * d, hk * d, tokens),
            hk * d,
            hk * d + 24,
        );
        rope::apply_in_place(
            &cpu,
            &rope_p,
            angles,
            Positions::PerToken(&positions),
            QkMut {
                q: &mut ViewMut::host(&mut qp),
                k: &mut ViewMut::host(&mut kp),
            },
        )
        .unwrap();
        assert_eq!(bits(&cols(&qp, hq * d + 8, 0, hq * d, tokens)), bits(&q));
        assert_eq!(bits(&cols(&kp, hk * d + 24, 0, hk * d, tokens)), bits(&k));
        assert_padding_nan(&qp, hq * d + 8, hq * d);
        // Out of place, from the fused QKV (the views end at the buffer's end) into dense and
        // into padded outputs.
        let fused = RowStrides::fused_qkv(&heads);
        for out in [RowStrides::dense(&heads), padded] {
            let r = dense.with_row_strides(fused, out).unwrap();
            let (wq, wk) = (out.q as usize, out.k as usize);
            let mut qo = vec![bf16::from_f32(f32::NAN); tokens * wq];
            let mut ko = vec![bf16::from_f32(f32::NAN); tokens * wk];
            let src = View::host(&qkv);
            rope::apply(
                &cpu,
                &r,
                angles,
                Positions::PerToken(&positions),
                Qk {
                    q: &src,
                    k: &src.slice(hq * d..).unwrap(),
                },
                QkMut {
                    q: &mut ViewMut::host(&mut qo),
                    k: &mut ViewMut::host(&mut ko),
                },
            )
            .unwrap();
            assert_eq!(bits(&cols(&qo, wq, 0, hq * d, tokens)), bits(&q), "{out:?}");
            assert_eq!(bits(&cols(&ko, wk, 0, hk * d, tokens)), bits(&k), "{out:?}");
        }
    }
}

/// The interleaved cache of `[pages, page, hk, d]` K and V (NHD).
fn interleave<T: Copy>(k: &[T], v: &[T], page_elems: usize) -> Vec<T> {
    k.chunks(page_elems)
        .zip(v.chunks(page_elems))
        .flat_map(|(a, b)| [a, b].concat())
        .collect()
}

/// A paged step of two requests for the appends: the index after the append, the new tokens'
/// qo_indptr, and NaN-filled dense caches with random old tokens.
fn append_step(
    rng: &mut Rng,
    page: u32,
    layout: KvLayout,
) -> (KvIndex, Vec<i32>, Vec<bf16>, Vec<bf16>) {
    let heads = qkv_heads();
    let lens = [37u32, 5];
    let used: u32 = lens.iter().map(|l| l.div_ceil(page)).sum();
    let pages = used + 2;
    let mut ids: Vec<i32> = (0..pages as i32).collect();
    rng.shuffle(&mut ids);
    ids.truncate(used as usize);
    let kv = KvIndex::paged_from_lens(page, &lens, &ids, pages, layout).unwrap();
    let n = kv.buffer_len(&heads);
    let mut kc: Vec<bf16> = randv(rng, n);
    let mut vc: Vec<bf16> = randv(rng, n);
    // Spare pages NaN.
    let ps = page as usize * 2 * 64;
    for p in 0..pages as usize {
        if !ids.contains(&(p as i32)) {
            kc[p * ps..][..ps].fill(bf16::from_f32(f32::NAN));
            vc[p * ps..][..ps].fill(bf16::from_f32(f32::NAN));
        }
    }
    (kv, vec![0, 4, 7], kc, vc)
}

/// The page table rows of [`append_step`]'s new tokens (the last of each request): each token's
/// request and position.
fn new_token_rows(kv: &KvIndex, qo: &[i32]) -> (Vec<i32>, Vec<i32>) {
    let (mut bi, mut pos) = (Vec::new(), Vec::new());
    for b in 0..qo.len() - 1 {
        let n = qo[b + 1] - qo[b];
        for i in 0..n {
            bi.push(b as i32);
            pos.push(kv.kv_len(b) as i32 - n + i);
        }
    }
    (bi, pos)
}

/// A page table's arrays on one backend: the rows `bi` and `pos`, and `kv`'s pages.
struct TableOn {
    bi: Buffer<i32>,
    pos: Buffer<i32>,
    indptr: Buffer<i32>,
    indices: Buffer<i32>,
    last: Buffer<i32>,
}

impl TableOn {
    fn new(b: &Backend, kv: &KvIndex, bi: &[i32], pos: &[i32]) -> Self {
        TableOn {
            bi: b.upload(bi).unwrap(),
            pos: b.upload(pos).unwrap(),
            indptr: b.upload(kv.indptr()).unwrap(),
            indices: b.upload(kv.indices()).unwrap(),
            last: b.upload(kv.last_len()).unwrap(),
        }
    }
    fn table(&self) -> PageTable<'_> {
        PageTable {
            batch_indices: &self.bi,
            positions: &self.pos,
            kv_indptr: &self.indptr,
            kv_indices: &self.indices,
            kv_last_page_len: &self.last,
        }
    }
}

/// Fused RoPE + append with q, k and v in one fused QKV buffer into an interleaved cache:
/// bit for bit the dense run (q, K cache, V cache).
#[test]
fn fused_append_from_qkv_into_an_interleaved_cache_matches_dense() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let heads = qkv_heads();
    let (hq, hk, d) = QKV_HEADS;
    let row = (hq + 2 * hk) * d;
    for (page, layout) in [(16, KvLayout::Nhd), (4, KvLayout::Hnd), (1, KvLayout::Nhd)] {
        let (kv, qo, kc, vc) = append_step(&mut rng, page, layout);
        let rows = 8; // one padded row past the 7 new tokens
        let qkv: Vec<bf16> = randv(&mut rng, rows * row);
        let rope = Rope::new(heads, 64, RopeLayout::NeoX).unwrap();
        let angles = Angles::Computed(Frequencies::llama31());
        // Dense.
        let plan = AppendPlan::new(&cpu, heads, &kv, &qo, rows as u32).unwrap();
        let mut q = cols(&qkv, row, 0, hq * d, rows);
        let (nk, nv) = (
            cols(&qkv, row, hq * d, hk * d, rows),
            cols(&qkv, row, (hq + hk) * d, hk * d, rows),
        );
        let (mut kd, mut vd) = (kc.clone(), vc.clone());
        plan.run_with_rope(
            &cpu,
            &rope,
            angles,
            &mut ViewMut::host(&mut q),
            NewKv {
                k: &View::host(&nk),
                v: &View::host(&nv),
            },
            KvCacheMut {
                k: &mut ViewMut::host(&mut kd),
                v: &mut ViewMut::host(&mut vd),
            },
        )
        .unwrap();
        // Fused QKV into the interleaved cache.
        let ikv = kv.clone().interleaved(&heads).unwrap();
        let plan = AppendPlan::new(&cpu, heads, &ikv, &qo, rows as u32)
            .unwrap()
            .with_row_strides(RowStrides::fused_qkv(&heads))
            .unwrap();
        let page_elems = page as usize * hk * d;
        let mut cache = interleave(&kc, &vc, page_elems);
        let mut qbuf = qkv.clone();
        let src = View::host(&qkv);
        plan.run_with_rope_interleaved(
            &cpu,
            &rope,
            angles,
            &mut ViewMut::host(&mut qbuf),
            NewKv {
                k: &src.slice(hq * d..).unwrap(),
                v: &src.slice((hq + hk) * d..).unwrap(),
            },
            &mut ViewMut::host(&mut cache),
        )
        .unwrap();
        assert_eq!(
            bits(&cols(&qbuf, row, 0, hq * d, rows)),
            bits(&q),
            "page {page}"
        );
        assert_eq!(
            bits(&cols(&qbuf, row, hq * d, 2 * hk * d, rows)),
            bits(&cols(&qkv, row, hq * d, 2 * hk * d, rows))
        );
        assert_eq!(
            bits(&cache),
            bits(&interleave(&kd, &vd, page_elems)),
            "page {page} {layout:?}"
        );
    }
}

/// FlashInfer's page-table append into padded pages and into an interleaved cache: bit for bit
/// the dense append.
#[test]
fn explicit_append_at_strides_matches_dense() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let heads = qkv_heads();
    let (_, hk, d) = QKV_HEADS;
    for (page, layout) in [(16u32, KvLayout::Nhd), (4, KvLayout::Hnd)] {
        let (kv, qo, kc, vc) = append_step(&mut rng, page, layout);
        let geometry = PagedCache {
            heads,
            page_size: page,
            layout,
        };
        let (bi, pos) = new_token_rows(&kv, &qo);
        let on_cpu = TableOn::new(&cpu, &kv, &bi, &pos);
        let table = on_cpu.table();
        let (nk, nv): (Vec<bf16>, Vec<bf16>) =
            (randv(&mut rng, 7 * hk * d), randv(&mut rng, 7 * hk * d));
        let (mut kd, mut vd) = (kc.clone(), vc.clone());
        kv_append::append_explicit(
            &cpu,
            geometry,
            table,
            NewKv {
                k: &View::host(&nk),
                v: &View::host(&nv),
            },
            KvCacheMut {
                k: &mut ViewMut::host(&mut kd),
                v: &mut ViewMut::host(&mut vd),
            },
        )
        .unwrap();
        let page_elems = page as usize * hk * d;
        let mut cache = interleave(&kc, &vc, page_elems);
        kv_append::append_explicit_interleaved(
            &cpu,
            geometry,
            table,
            NewKv {
                k: &View::host(&nk),
                v: &View::host(&nv),
            },
            &mut ViewMut::host(&mut cache),
        )
        .unwrap();
        assert_eq!(
            bits(&cache),
            bits(&interleave(&kd, &vd, page_elems)),
            "page {page} {layout:?}"
        );
        // Padded pages: each page followed by 64 spare elements.
        let dense = kv.strides(&heads);
        let strides = KvStrides {
            block: dense.block + 64,
            ..dense
        };
        let padded = |c: &[bf16]| pad(c, page_elems, page_elems + 64);
        let (mut kp, mut vp) = (padded(&kc), padded(&vc));
        kv_append::append_explicit_strided(
            &cpu,
            geometry,
            strides,
            table,
            NewKv {
                k: &View::host(&nk),
                v: &View::host(&nv),
            },
            KvCacheMut {
                k: &mut ViewMut::host(&mut kp),
                v: &mut ViewMut::host(&mut vp),
            },
        )
        .unwrap();
        assert_eq!(bits(&kp), bits(&padded(&kd)));
        assert_eq!(bits(&vp), bits(&padded(&vd)));
    }
}

/// One request's q, K and V in the caller's layouts (q in fused QKV rows `qkv`, K and V
/// interleaved per token in `kvt`) and dense.
struct SingleCase {
    qkv: Vec<bf16>,
    kvt: Vec<bf16>,
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

/// The o rows of the strided single calls: the q heads, then 64 elements of padding.
const SINGLE_O_ROW: usize = QKV_HEADS.0 * QKV_HEADS.2 + 64;

impl SingleCase {
    fn new(rng: &mut Rng, qo_len: usize, kv_len: usize) -> Self {
        let (hq, hk, d) = QKV_HEADS;
        let row = (hq + 2 * hk) * d;
        let qkv: Vec<bf16> = randv(rng, qo_len * row);
        let kvt: Vec<bf16> = randv(rng, kv_len * 2 * hk * d);
        let q = cols(&qkv, row, 0, hq * d, qo_len);
        let (k, v) = (
            cols(&kvt, 2 * hk * d, 0, hk * d, kv_len),
            cols(&kvt, 2 * hk * d, hk * d, hk * d, kv_len),
        );
        SingleCase { qkv, kvt, q, k, v }
    }

    /// `single` at these layouts' strides, o in rows of [`SINGLE_O_ROW`].
    fn strided(single: Single) -> Single {
        let (hq, hk, d) = QKV_HEADS;
        single
            .qo_strides(
                QoStrides::new(((hq + 2 * hk) * d) as u64, d as u64),
                QoStrides::new(SINGLE_O_ROW as u64, d as u64),
            )
            .kv_strides(KvStrides {
                block: (2 * hk * d) as u64,
                token: (2 * hk * d) as u64,
                head: d as u64,
            })
    }
}

/// Single-request prefill and decode with q in fused QKV rows, o padded and K/V interleaved per
/// token: bit for bit the dense calls.
#[test]
fn single_at_strides_matches_dense_on_the_cpu() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let heads = qkv_heads();
    let (hq, hk, d) = QKV_HEADS;
    let o_row = SINGLE_O_ROW;
    for (qo_len, kv_len) in [(9usize, 40usize), (1, 33)] {
        let SingleCase { qkv, kvt, q, k, v } = SingleCase::new(&mut rng, qo_len, kv_len);
        let mut od = vec![bf16::ZERO; qo_len * hq * d];
        let single = Single::new(heads).causal(true);
        let decode = qo_len == 1;
        let run = |s: &Single,
                   q: &dyn Src<bf16>,
                   k: &dyn Src<bf16>,
                   v: &dyn Src<bf16>,
                   o: &mut dyn Dst<bf16>| {
            if decode {
                s.decode(&cpu, &Standard, q, k, v, o, None)
            } else {
                s.prefill(&cpu, &Standard, q, k, v, o, None)
            }
        };
        run(
            &single,
            &View::host(&q),
            &View::host(&k),
            &View::host(&v),
            &mut ViewMut::host(&mut od),
        )
        .unwrap();
        let strided = SingleCase::strided(single);
        let mut op = vec![bf16::from_f32(f32::NAN); qo_len * o_row];
        let kview = View::host(&kvt);
        run(
            &strided,
            &View::host(&qkv),
            &kview,
            &kview.slice(hk * d..).unwrap(),
            &mut ViewMut::host(&mut op),
        )
        .unwrap();
        assert_eq!(
            bits(&cols(&op, o_row, 0, hq * d, qo_len)),
            bits(&od),
            "qo_len {qo_len}"
        );
        assert_padding_nan(&op, o_row, hq * d);
    }
}

/// Bad strides and lengths of the strided RoPE, appends and single calls are named errors.
#[test]
fn bad_row_and_cache_strides_are_refused() {
    let cpu = Backend::Cpu;
    let heads = qkv_heads();
    let (hq, hk, d) = QKV_HEADS;
    let dense = RowStrides::dense(&heads);
    let rope = Rope::new(heads, 64, RopeLayout::NeoX).unwrap();
    let e = rope
        .with_row_strides(RowStrides { q: 100, ..dense }, dense)
        .unwrap_err();
    assert!(e.to_string().contains("input q row stride 100"), "{e}");
    let e = rope
        .with_row_strides(dense, RowStrides { k: 0, ..dense })
        .unwrap_err();
    assert!(e.to_string().contains("output k row stride 0"), "{e}");
    // In place needs equal strides; k too short for q's rows.
    let padded = RowStrides {
        q: (hq * d + 8) as u64,
        ..dense
    };
    let pos = cpu.upload(&[0i32, 1]).unwrap();
    let angles = Angles::Computed(Frequencies::new(1e4).unwrap());
    let (mut q, mut k) = (vec![bf16::ONE; 2 * hq * d + 8], vec![bf16::ONE; 2 * hk * d]);
    let r = rope.with_row_strides(padded, dense).unwrap();
    let e = rope::apply_in_place(
        &cpu,
        &r,
        angles,
        Positions::PerToken(&pos),
        QkMut {
            q: &mut ViewMut::host(&mut q),
            k: &mut ViewMut::host(&mut k),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("differ"), "{e}");
    let r = rope.with_row_strides(padded, padded).unwrap();
    let mut short = vec![bf16::ONE; hk * d];
    let e = rope::apply_in_place(
        &cpu,
        &r,
        angles,
        Positions::PerToken(&pos),
        QkMut {
            q: &mut ViewMut::host(&mut q),
            k: &mut ViewMut::host(&mut short),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("k has 128 elements; 2 rows"), "{e}");
    // A fused run takes its strides from the plan, not the rope.
    let mut rng = Rng::new(7);
    let (kv, qo, mut kc, mut vc) = append_step(&mut rng, 16, KvLayout::Nhd);
    let plan = AppendPlan::new(&cpu, heads, &kv, &qo, 7).unwrap();
    let (nk, nv) = (vec![bf16::ONE; 7 * hk * d], vec![bf16::ONE; 7 * hk * d]);
    let mut q7 = vec![bf16::ONE; 7 * hq * d];
    let e = plan
        .run_with_rope(
            &cpu,
            &r,
            angles,
            &mut ViewMut::host(&mut q7),
            NewKv {
                k: &View::host(&nk),
                v: &View::host(&nv),
            },
            KvCacheMut {
                k: &mut ViewMut::host(&mut kc),
                v: &mut ViewMut::host(&mut vc),
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("must be dense"), "{e}");
    // v shorter than k's rows at their strides.
    let fused = RowStrides::fused_qkv(&heads);
    let plan = AppendPlan::new(&cpu, heads, &kv, &qo, 7)
        .unwrap()
        .with_row_strides(fused)
        .unwrap();
    let long = vec![bf16::ONE; 7 * fused.k as usize];
    let e = plan
        .run(
            &cpu,
            NewKv {
                k: &View::host(&long),
                v: &View::host(&long[..6 * fused.v as usize]),
            },
            KvCacheMut {
                k: &mut ViewMut::host(&mut kc),
                v: &mut ViewMut::host(&mut vc),
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("new v has"), "{e}");
    assert!(
        AppendPlan::new(&cpu, heads, &kv, &qo, 7)
            .unwrap()
            .with_row_strides(RowStrides { v: 8, ..fused })
            .is_err()
    );
    // An explicit append at aliasing strides.
    let (bi, p) = (cpu.upload(&[0i32]).unwrap(), cpu.upload(&[0i32]).unwrap());
    let (ip, ix, ll) = (
        cpu.upload(&[0i32, 1]).unwrap(),
        cpu.upload(&[0i32]).unwrap(),
        cpu.upload(&[1i32]).unwrap(),
    );
    let table = PageTable {
        batch_indices: &bi,
        positions: &p,
        kv_indptr: &ip,
        kv_indices: &ix,
        kv_last_page_len: &ll,
    };
    let geometry = PagedCache {
        heads,
        page_size: 4,
        layout: KvLayout::Nhd,
    };
    let one = vec![bf16::ONE; hk * d];
    let mut c = vec![bf16::ZERO; 4096];
    let mut c2 = vec![bf16::ZERO; 4096];
    for s in [
        KvStrides {
            block: 0,
            token: 128,
            head: 64,
        },
        KvStrides {
            block: 512,
            token: 64,
            head: 64,
        },
    ] {
        let e = kv_append::append_explicit_strided(
            &cpu,
            geometry,
            s,
            table,
            NewKv {
                k: &View::host(&one),
                v: &View::host(&one),
            },
            KvCacheMut {
                k: &mut ViewMut::host(&mut c),
                v: &mut ViewMut::host(&mut c2),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("alias"), "{s:?}: {e}");
    }
    let e = kv_append::append_explicit_interleaved(
        &cpu,
        geometry,
        table,
        NewKv {
            k: &View::host(&one),
            v: &View::host(&one),
        },
        &mut ViewMut::host(&mut c[..1000]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("whole pages"), "{e}");
    // Single: K/V strides that alias, and a decode q of two rows at its strides.
    let q = vec![bf16::ONE; hq * d];
    let kvs = vec![bf16::ONE; 10 * hk * d];
    let mut o = vec![bf16::ZERO; hq * d];
    let e = Single::new(heads)
        .kv_strides(KvStrides {
            block: 64,
            token: 64,
            head: 64,
        })
        .decode(
            &cpu,
            &Standard,
            &View::host(&q),
            &View::host(&kvs),
            &View::host(&kvs),
            &mut ViewMut::host(&mut o),
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("alias"), "{e}");
    let q2 = vec![bf16::ONE; 3 * hq * d];
    let e = Single::new(heads)
        .qo_strides(
            QoStrides::new((hq * d) as u64, d as u64),
            QoStrides::new((2 * hq * d) as u64, d as u64),
        )
        .decode(
            &cpu,
            &Standard,
            &View::host(&q2),
            &View::host(&kvs),
            &View::host(&kvs),
            &mut ViewMut::host(&mut o),
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("one query row"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// GPU: the strided RoPE, appends and single calls against the CPU.

/// Every element within a rounding of `want` (NaN where `want` is NaN, and only there).
fn close<T: Element>(got: &[T], want: &[T], what: &str) {
    let tol = if T::DTYPE == ferrinfer::DType::F16 {
        2f32.powi(-9)
    } else {
        2f32.powi(-6)
    };
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f32(), w.to_f32());
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            !g.is_nan() && (g - w).abs() <= tol * w.abs().max(1.0)
        };
        assert!(ok, "{what}: element {i} is {g}, the CPU's {w}");
    }
}

/// A raw view of `len` elements of `x` from element `at` (q, k or v inside one fused buffer).
///
/// # Safety
/// As `View::from_raw`: `at + len` within `x`, which outlives the view.
unsafe fn raw_mut<T: Element>(
    gpu: &Arc<Gpu>,
    x: &CudaSlice<T>,
    at: usize,
    len: usize,
) -> ViewMut<'static, T> {
    let ptr = raw_ptr(gpu, x) + (at * size_of::<T>()) as u64;
    // SAFETY: the caller's contract.
    unsafe { ViewMut::from_raw(ptr, len, gpu).unwrap() }
}

fn gpu_rope<T: Element>() {
    let (backend, gpu) = cuda();
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = qkv_heads();
    let (hq, hk, d) = QKV_HEADS;
    let (tokens, row) = (33usize, (hq + 2 * hk) * d);
    let qkv: Vec<T> = randv(&mut rng, tokens * row);
    let pos: Vec<i32> = (0..tokens).map(|_| rng.below(100_000) as i32).collect();
    let angles = Angles::Computed(Frequencies::new(1e4).unwrap());
    let fused = RowStrides::fused_qkv(&heads);
    for (rd, layout) in [(64, RopeLayout::NeoX), (48, RopeLayout::GptJ)] {
        let dense = Rope::new(heads, rd, layout).unwrap();
        let (q, k) = dense_rope(&dense, angles, &qkv, &cpu.upload(&pos).unwrap());
        let p_gpu = backend.upload(&pos).unwrap();
        // In place inside the fused QKV: q and k are raw views of one buffer.
        let buf = up(&gpu, &qkv);
        {
            // SAFETY: both views lie inside `buf`, which outlives them; q's and k's elements are
            // disjoint, so the kernel never writes what another thread reads.
            let (mut qv, mut kv) = unsafe {
                (
                    raw_mut(&gpu, &buf, 0, tokens * row),
                    raw_mut(&gpu, &buf, hq * d, tokens * row - hq * d),
                )
            };
            let r = dense.with_row_strides(fused, fused).unwrap();
            rope::apply_in_place(
                &backend,
                &r,
                angles,
                Positions::PerToken(&p_gpu),
                QkMut {
                    q: &mut qv,
                    k: &mut kv,
                },
            )
            .unwrap();
        }
        let got = down(&gpu, &buf);
        let what = format!("{:?} in place rd {rd} (seed {seed})", T::DTYPE);
        close(&cols(&got, row, 0, hq * d, tokens), &q, &what);
        close(&cols(&got, row, hq * d, hk * d, tokens), &k, &what);
        assert_eq!(
            bits(&cols(&got, row, (hq + hk) * d, hk * d, tokens)),
            bits(&cols(&qkv, row, (hq + hk) * d, hk * d, tokens))
        );
        // Out of place into rows whose strides allow only 8- and 4-byte vectors.
        let out = RowStrides {
            q: (hq * d + 4) as u64,
            k: (hk * d + 2) as u64,
            v: (hk * d) as u64,
        };
        let r = dense.with_row_strides(fused, out).unwrap();
        let src = up(&gpu, &qkv);
        let mut qo = up(&gpu, &vec![T::from_f32(f32::NAN); tokens * out.q as usize]);
        let mut ko = up(&gpu, &vec![T::from_f32(f32::NAN); tokens * out.k as usize]);
        {
            let s = View::device(&src, &gpu).unwrap();
            rope::apply(
                &backend,
                &r,
                angles,
                Positions::PerToken(&p_gpu),
                Qk {
                    q: &s,
                    k: &s.slice(hq * d..).unwrap(),
                },
                QkMut {
                    q: &mut ViewMut::device(&mut qo, &gpu).unwrap(),
                    k: &mut ViewMut::device(&mut ko, &gpu).unwrap(),
                },
            )
            .unwrap();
        }
        let what = format!("{:?} narrow strides rd {rd} (seed {seed})", T::DTYPE);
        close(&down(&gpu, &qo), &pad(&q, hq * d, out.q as usize), &what);
        close(&down(&gpu, &ko), &pad(&k, hk * d, out.k as usize), &what);
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_views_rope_in_fused_qkv_and_narrow_rows() {
    gpu_rope::<bf16>();
    gpu_rope::<f16>();
}

/// Fused RoPE + append from a fused QKV into an interleaved cache, and the explicit appends into
/// an interleaved and a padded cache: the GPU equals the CPU (the copies bit for bit).
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_views_appends_at_strides() {
    let (backend, gpu) = cuda();
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = qkv_heads();
    let (hq, hk, d) = QKV_HEADS;
    let row = (hq + 2 * hk) * d;
    for (page, layout) in [(16, KvLayout::Nhd), (4, KvLayout::Hnd), (1, KvLayout::Nhd)] {
        let (kv, qo, kc, vc) = append_step(&mut rng, page, layout);
        let page_elems = page as usize * hk * d;
        let rows = 8;
        let qkv: Vec<bf16> = randv(&mut rng, rows * row);
        let rope = Rope::new(heads, 64, RopeLayout::NeoX).unwrap();
        let angles = Angles::Computed(Frequencies::llama31());
        let ikv = kv.clone().interleaved(&heads).unwrap();
        let fused = RowStrides::fused_qkv(&heads);
        let cache0 = interleave(&kc, &vc, page_elems);
        // CPU.
        let plan = AppendPlan::new(&cpu, heads, &ikv, &qo, rows as u32)
            .unwrap()
            .with_row_strides(fused)
            .unwrap();
        let (mut q_want, mut c_want) = (qkv.clone(), cache0.clone());
        let src = View::host(&qkv);
        plan.run_with_rope_interleaved(
            &cpu,
            &rope,
            angles,
            &mut ViewMut::host(&mut q_want),
            NewKv {
                k: &src.slice(hq * d..).unwrap(),
                v: &src.slice((hq + hk) * d..).unwrap(),
            },
            &mut ViewMut::host(&mut c_want),
        )
        .unwrap();
        // GPU: q, k and v raw views of one fused buffer.
        let plan = AppendPlan::new(&backend, heads, &ikv, &qo, rows as u32)
            .unwrap()
            .with_row_strides(fused)
            .unwrap();
        let buf = up(&gpu, &qkv);
        let mut cache = up(&gpu, &cache0);
        {
            // SAFETY: all three lie inside `buf`, which outlives them; q is written, k and v
            // only read, and their elements are disjoint from q's.
            let (mut qv, kv_, vv) = unsafe {
                (
                    raw_mut(&gpu, &buf, 0, rows * row),
                    raw_mut(&gpu, &buf, hq * d, rows * row - hq * d),
                    raw_mut(&gpu, &buf, (hq + hk) * d, rows * row - (hq + hk) * d),
                )
            };
            plan.run_with_rope_interleaved(
                &backend,
                &rope,
                angles,
                &mut qv,
                NewKv { k: &kv_, v: &vv },
                &mut ViewMut::device(&mut cache, &gpu).unwrap(),
            )
            .unwrap();
        }
        let what = format!("fused append page {page} {layout:?} (seed {seed})");
        close(&down(&gpu, &buf), &q_want, &what);
        close(&down(&gpu, &cache), &c_want, &what);

        // Explicit appends: the page table of the same step.
        let geometry = PagedCache {
            heads,
            page_size: page,
            layout,
        };
        let (bi, mut pos) = new_token_rows(&kv, &qo);
        // One token of a request past the batch: skipped on the GPU.
        let mut with_bad = bi.clone();
        with_bad.push(5); // request 5 of a batch of 2
        pos.push(0);
        let nk: Vec<bf16> = randv(&mut rng, 8 * hk * d);
        let nv: Vec<bf16> = randv(&mut rng, 8 * hk * d);
        // The CPU refuses the bad token, so its expectation comes from the 7 good ones.
        let on_cpu = TableOn::new(&cpu, &kv, &with_bad, &pos);
        let good = PageTable {
            batch_indices: &View::of(&on_cpu.bi).slice(..7).unwrap(),
            positions: &View::of(&on_cpu.pos).slice(..7).unwrap(),
            ..on_cpu.table()
        };
        let on_gpu = TableOn::new(&backend, &kv, &with_bad, &pos);
        let table = on_gpu.table();
        let (nk7, nv7) = (&nk[..7 * hk * d], &nv[..7 * hk * d]);
        let mut want = cache0.clone();
        kv_append::append_explicit_interleaved(
            &cpu,
            geometry,
            good,
            NewKv {
                k: &View::host(nk7),
                v: &View::host(nv7),
            },
            &mut ViewMut::host(&mut want),
        )
        .unwrap();
        let (gk, gv) = (up(&gpu, &nk), up(&gpu, &nv));
        let (gk, gv) = (
            View::device(&gk, &gpu).unwrap(),
            View::device(&gv, &gpu).unwrap(),
        );
        let mut cache = up(&gpu, &cache0);
        kv_append::append_explicit_interleaved(
            &backend,
            geometry,
            table,
            NewKv { k: &gk, v: &gv },
            &mut ViewMut::device(&mut cache, &gpu).unwrap(),
        )
        .unwrap();
        assert_eq!(
            bits(&down(&gpu, &cache)),
            bits(&want),
            "explicit interleaved page {page} {layout:?}"
        );
        // Padded pages.
        let dense = kv.strides(&heads);
        let strides = KvStrides {
            block: dense.block + 64,
            ..dense
        };
        let padded = |c: &[bf16]| pad(c, page_elems, page_elems + 64);
        let (mut kw, mut vw) = (padded(&kc), padded(&vc));
        kv_append::append_explicit_strided(
            &cpu,
            geometry,
            strides,
            good,
            NewKv {
                k: &View::host(nk7),
                v: &View::host(nv7),
            },
            KvCacheMut {
                k: &mut ViewMut::host(&mut kw),
                v: &mut ViewMut::host(&mut vw),
            },
        )
        .unwrap();
        let (mut kd, mut vd) = (up(&gpu, &padded(&kc)), up(&gpu, &padded(&vc)));
        kv_append::append_explicit_strided(
            &backend,
            geometry,
            strides,
            table,
            NewKv { k: &gk, v: &gv },
            KvCacheMut {
                k: &mut ViewMut::device(&mut kd, &gpu).unwrap(),
                v: &mut ViewMut::device(&mut vd, &gpu).unwrap(),
            },
        )
        .unwrap();
        assert_eq!(
            bits(&down(&gpu, &kd)),
            bits(&kw),
            "explicit padded page {page} {layout:?}"
        );
        assert_eq!(
            bits(&down(&gpu, &vd)),
            bits(&vw),
            "explicit padded page {page} {layout:?}"
        );
    }
}

/// Single prefill and decode with q in fused QKV rows, o padded and K/V interleaved per token,
/// against the CPU reference.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_views_single_at_strides() {
    let (backend, gpu) = cuda();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = qkv_heads();
    let (hq, hk, d) = QKV_HEADS;
    let o_row = SINGLE_O_ROW;
    for (qo_len, kv_len) in [(77usize, 300usize), (1, 1000)] {
        let SingleCase { qkv, kvt, q, k, v } = SingleCase::new(&mut rng, qo_len, kv_len);
        let batch = Batch::new(
            heads,
            &[0, qo_len as i32],
            KvIndex::ragged(&[0, kv_len as i32], KvLayout::Nhd).unwrap(),
        )
        .unwrap()
        .with_causal(true);
        let want = reference::attention_typed(&Standard, &batch, &q, &k, &v).unwrap();
        let single = SingleCase::strided(Single::new(heads).causal(true));
        let (gq, gkv) = (up(&gpu, &qkv), up(&gpu, &kvt));
        let mut o = up(&gpu, &vec![bf16::from_f32(f32::NAN); qo_len * o_row]);
        {
            let (qv, kv) = (
                View::device(&gq, &gpu).unwrap(),
                View::device(&gkv, &gpu).unwrap(),
            );
            let vv = kv.slice(hk * d..).unwrap();
            let mut ov = ViewMut::device(&mut o, &gpu).unwrap();
            if qo_len == 1 {
                single
                    .decode(&backend, &Standard, &qv, &kv, &vv, &mut ov, None)
                    .unwrap();
            } else {
                single
                    .prefill(&backend, &Standard, &qv, &kv, &vv, &mut ov, None)
                    .unwrap();
            }
        }
        let got = down(&gpu, &o);
        assert_padding_nan(&got, o_row, hq * d);
        let got: Vec<f32> = cols(&got, o_row, 0, hq * d, qo_len)
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert!(!reference::has_nan(&got), "NaN in o (seed {seed})");
        let (err, _, head) = reference::worst_rel_l2(&batch, &got, &want.o);
        assert!(
            err <= 1e-2,
            "qo_len {qo_len}: {err:.2e} at head {head} (seed {seed})"
        );
    }
}
