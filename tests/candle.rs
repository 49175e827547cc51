//! `ferrinfer::candle` (feature `candle`): every call on candle tensors gives what the plain API
//! gives on the same elements (CPU tensors through the CPU backend, bit for bit), strided q
//! and offsets are read in place, and bad tensors are refused with errors that name them. The
//! `gpu_*` tests (feature `candle-cuda`) run CUDA tensors on candle's stream against the CPU
//! reference.

use candle_core::{DType, Device, Tensor};
use ferrinfer::candle::{self as fc, PagedKvCache};
use ferrinfer::ops::activation::{self, ActShape};
use ferrinfer::ops::kv_append::{AppendPlan, NewKv};
use ferrinfer::ops::norm::{self, NormShape};
use ferrinfer::ops::rope::{self, Angles, Frequencies, Positions, QkMut, Rope, RopeLayout};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;
use ferrinfer_testkit::Rng;

type R = Result<(), Box<dyn std::error::Error>>;

fn randn(rng: &mut Rng, shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.normal_vec(n), shape, dev)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

fn bf16s(t: &Tensor) -> Vec<bf16> {
    t.flatten_all().unwrap().to_vec1::<bf16>().unwrap()
}

/// 3 requests of 1, 37 and 16 tokens on 7 pages of 16 (2 spare), GQA 4, head dim 64.
fn setup(rng: &mut Rng, layout: KvLayout) -> (PagedKvCache, KvIndex, Heads) {
    let dev = Device::Cpu;
    let t = match layout {
        KvLayout::Nhd => randn(rng, &[7, 2, 16, 2, 64], DType::BF16, &dev),
        KvLayout::Hnd => randn(rng, &[7, 2, 2, 16, 64], DType::BF16, &dev),
    };
    let cache = PagedKvCache::new(t, layout).unwrap();
    let kv = cache
        .paged_from_lens(&[1, 37, 16], &[6, 0, 3, 2, 4])
        .unwrap();
    let heads = cache.heads(8).unwrap();
    (cache, kv, heads)
}

#[test]
fn decode_matches_the_plain_api() -> R {
    let mut rng = Rng::from_time();
    for layout in [KvLayout::Nhd, KvLayout::Hnd] {
        let (cache, kv, heads) = setup(&mut rng, layout);
        let backend = fc::backend(&Device::Cpu)?;
        let plan = BatchDecode::plan(&backend, heads, kv.clone(), None)?;
        let q = randn(&mut rng, &[3, 8, 64], DType::BF16, &Device::Cpu);
        let out = Tensor::zeros((3, 8, 64), DType::BF16, &Device::Cpu)?;
        fc::batch_decode(&backend, &plan, &Standard, &q, &cache, &out)?;

        let (qh, ch) = (bf16s(&q), bf16s(cache.tensor()));
        let v_off = kv.interleaved_v_offset(&heads);
        let mut want = vec![bf16::ZERO; 3 * 8 * 64];
        plan.run(
            &Standard,
            &View::host(&qh),
            &View::host(&ch),
            &View::host(&ch[v_off..]),
            &mut ViewMut::host(&mut want),
            None,
        )?;
        assert_eq!(bf16s(&out), want, "{layout:?}");
        assert!(want.iter().any(|v| v.to_f32() != 0.0));
    }
    Ok(())
}

#[test]
fn prefill_with_q_and_out_inside_larger_tensors() -> R {
    let mut rng = Rng::from_time();
    let (cache, kv, heads) = setup(&mut rng, KvLayout::Nhd);
    let backend = Backend::Cpu;
    // q: heads 0..8 of a fused QKV [rows, 12, 64] starting at row 1; out: a window of a wider
    // tensor at an offset. Both strided, neither copied.
    let qkv = randn(&mut rng, &[6, 12, 64], DType::BF16, &Device::Cpu);
    let q = qkv.narrow(0, 1, 5)?.narrow(1, 0, 8)?;
    let big = Tensor::zeros((6, 10, 64), DType::BF16, &Device::Cpu)?;
    let out = big.narrow(0, 1, 5)?.narrow(1, 2, 8)?;
    let batch = Batch::new(heads, &[0, 1, 3, 5], kv.clone())?
        .with_causal(true)
        .with_qo_strides(fc::qo_strides(&q)?, fc::qo_strides(&out)?)?;
    let plan = BatchPrefill::plan(&backend, batch)?;
    fc::batch_prefill(&backend, &plan, &Standard, &q, &cache, &out)?;

    let dense = BatchPrefill::plan(
        &backend,
        Batch::new(heads, &[0, 1, 3, 5], kv.clone())?.with_causal(true),
    )?;
    let qh = bf16s(&q.contiguous()?);
    let ch = bf16s(cache.tensor());
    let mut want = vec![bf16::ZERO; 5 * 8 * 64];
    dense.run(
        &Standard,
        &View::host(&qh),
        &View::host(&ch),
        &View::host(&ch[kv.interleaved_v_offset(&heads)..]),
        &mut ViewMut::host(&mut want),
        None,
    )?;
    assert_eq!(bf16s(&out.contiguous()?), want);
    // Nothing outside the window was written.
    let outside = big
        .narrow(1, 0, 2)?
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?;
    assert_eq!(outside.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn append_writes_the_planned_slots() -> R {
    let mut rng = Rng::from_time();
    let (cache, kv, heads) = setup(&mut rng, KvLayout::Nhd);
    let backend = Backend::Cpu;
    // Each request appends its last token (rows 0, 1, 2).
    let plan = AppendPlan::new(&backend, heads, &kv, &[0, 1, 2, 3], 4)?;
    let k = randn(&mut rng, &[3, 2, 64], DType::BF16, &Device::Cpu);
    let v = randn(&mut rng, &[3, 2, 64], DType::BF16, &Device::Cpu);
    let mut want = bf16s(cache.tensor());
    let (kh, vh) = (bf16s(&k), bf16s(&v));
    plan.run_interleaved(
        &backend,
        NewKv {
            k: &View::host(&kh),
            v: &View::host(&vh),
        },
        &mut ViewMut::host(&mut want),
    )?;
    fc::append_kv(&backend, &plan, &k, &v, &cache)?;
    assert_eq!(bf16s(cache.tensor()), want);
    Ok(())
}

#[test]
fn norms_activation_and_rope_match_the_plain_api() -> R {
    let mut rng = Rng::from_time();
    let dev = Device::Cpu;
    let backend = Backend::Cpu;
    let x = randn(&mut rng, &[2, 3, 128], DType::F16, &dev);
    let w = randn(&mut rng, &[128], DType::F16, &dev);
    let shape = NormShape::new(6, 128)?;
    let f16s = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f16>().unwrap();

    let out = x.zeros_like()?;
    fc::rmsnorm(&backend, &x, &w, 1e-6, &out)?;
    let mut want = vec![f16::ZERO; 6 * 128];
    let (xh, wh) = (f16s(&x), f16s(&w));
    norm::rmsnorm(
        &backend,
        shape,
        &View::host(&xh),
        &View::host(&wh),
        1e-6,
        &mut ViewMut::host(&mut want),
    )?;
    assert_eq!(f16s(&out), want);

    let residual = randn(&mut rng, &[2, 3, 128], DType::F16, &dev);
    let (mut xw, mut rw) = (f16s(&x), f16s(&residual));
    norm::fused_add_rmsnorm(
        &backend,
        shape,
        &mut ViewMut::host(&mut xw),
        &mut ViewMut::host(&mut rw),
        &View::host(&wh),
        1e-6,
    )?;
    fc::fused_add_rmsnorm(&backend, &x, &residual, &w, 1e-6)?;
    assert_eq!((f16s(&x), f16s(&residual)), (xw, rw));

    let gu = randn(&mut rng, &[4, 2 * 96], DType::F16, &dev);
    let act = Tensor::zeros((4, 96), DType::F16, &dev)?;
    fc::silu_and_mul(&backend, &gu, &act)?;
    let mut want = vec![f16::ZERO; 4 * 96];
    let guh = f16s(&gu);
    activation::silu_and_mul(
        &backend,
        ActShape::new(4, 96)?,
        &View::host(&guh),
        &mut ViewMut::host(&mut want),
    )?;
    assert_eq!(f16s(&act), want);

    let r = Rope::new(Heads::new(4, 2, 64)?, 64, RopeLayout::NeoX)?;
    let q = randn(&mut rng, &[5, 4, 64], DType::BF16, &dev);
    let k = randn(&mut rng, &[5, 2, 64], DType::BF16, &dev);
    let pos = [3i32, 0, 17, 1000, 5];
    let (mut qw, mut kw) = (bf16s(&q), bf16s(&k));
    let freqs = Frequencies::llama31();
    rope::apply_in_place(
        &backend,
        &r,
        Angles::Computed(freqs),
        Positions::PerToken(&View::host(&pos)),
        QkMut {
            q: &mut ViewMut::host(&mut qw),
            k: &mut ViewMut::host(&mut kw),
        },
    )?;
    fc::rope(&backend, &r, freqs, &Tensor::new(&pos, &dev)?, &q, &k)?;
    assert_eq!((bf16s(&q), bf16s(&k)), (qw, kw));
    Ok(())
}

fn err(r: ferrinfer::Result<()>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bad_tensors_are_refused_by_name() -> R {
    let mut rng = Rng::from_time();
    let dev = Device::Cpu;
    let (cache, kv, heads) = setup(&mut rng, KvLayout::Nhd);
    let backend = Backend::Cpu;
    let plan = BatchDecode::plan(&backend, heads, kv.clone(), None)?;
    let q = randn(&mut rng, &[3, 8, 64], DType::BF16, &dev);
    let out = q.zeros_like()?;
    let run = |q: &Tensor, c: &PagedKvCache, o: &Tensor| {
        err(fc::batch_decode(&backend, &plan, &Standard, q, c, o))
    };

    let e = run(&q.to_dtype(DType::F16)?, &cache, &out);
    assert!(e.contains("kv cache is BF16; expected F16"), "{e}");
    let e = run(&q.narrow(0, 0, 2)?, &cache, &out);
    assert!(
        e.contains("q has shape [2, 8, 64]; expected [3, 8, 64]"),
        "{e}"
    );
    let e = run(&q.to_dtype(DType::F32)?, &cache, &out);
    assert!(e.contains("q is F32; expected f16 or bf16"), "{e}");
    // A q whose head dim is strided; one strided in rows the plan did not plan for.
    let wide = randn(&mut rng, &[3, 8, 128], DType::BF16, &dev);
    let e = run(&wide.narrow(2, 0, 64)?, &cache, &out);
    assert!(e.contains("plan with Batch::with_qo_strides"), "{e}");
    let e = run(
        &q.transpose(1, 2)?.contiguous()?.transpose(1, 2)?,
        &cache,
        &out,
    );
    assert!(e.contains("head_dim) dimension must be contiguous"), "{e}");
    // The output may not alias q (nor be a broadcast).
    let e = run(&q, &cache, &q);
    assert!(
        e.contains("out is written and must not share storage with q"),
        "{e}"
    );
    let e = run(&q, &cache, &out.i_broadcast());
    assert!(e.contains("out"), "{e}");
    // A plan over another cache geometry.
    let other = PagedKvCache::zeros(8, 16, 2, 64, KvLayout::Nhd, DType::BF16, &dev)?;
    let e = run(&q, &other, &out);
    assert!(e.contains("is not over this cache"), "{e}");
    // A plain (non-interleaved) index is refused before anything runs.
    let plain = KvIndex::paged_from_lens(16, &[1, 37, 16], &[6, 0, 3, 2, 4], 7, KvLayout::Nhd)?;
    let plan2 = BatchDecode::plan(&backend, heads, plain, None)?;
    let e = err(fc::batch_decode(
        &backend, &plan2, &Standard, &q, &cache, &out,
    ));
    assert!(e.contains("make it with PagedKvCache::paged"), "{e}");

    // Caches: rank, K/V dim, dtype, strides.
    let t = Tensor::zeros((2, 3, 4, 1, 64), DType::BF16, &dev)?;
    assert!(err(PagedKvCache::new(t, KvLayout::Nhd).map(drop)).contains("dim 1 must be 2"));
    let t = Tensor::zeros((2, 2, 4, 1, 64), DType::F32, &dev)?;
    assert!(err(PagedKvCache::new(t, KvLayout::Nhd).map(drop)).contains("F32"));
    let t = Tensor::zeros((2, 2, 4, 2, 64), DType::BF16, &dev)?.transpose(2, 3)?;
    let e = err(PagedKvCache::new(t, KvLayout::Nhd).map(drop));
    assert!(e.contains("kv cache is not contiguous"), "{e}");

    // Ops: shapes, aliasing, strides.
    let x = randn(&mut rng, &[4, 64], DType::BF16, &dev);
    let w = Tensor::ones(64, DType::BF16, &dev)?;
    let e = err(fc::rmsnorm(
        &backend,
        &x,
        &w.narrow(0, 0, 32)?,
        1e-6,
        &x.zeros_like()?,
    ));
    assert!(e.contains("weight has shape [32]; expected [64]"), "{e}");
    let e = err(fc::rmsnorm(&backend, &x, &w, 1e-6, &x));
    assert!(
        e.contains("out is written and must not share storage with x"),
        "{e}"
    );
    let e = err(fc::fused_add_rmsnorm(
        &backend,
        &x,
        &x.narrow(0, 0, 4)?,
        &w,
        1e-6,
    ));
    assert!(
        e.contains("x is written and must not share storage with residual"),
        "{e}"
    );
    let e = err(fc::silu_and_mul(&backend, &x.t()?, &x.zeros_like()?));
    assert!(e.contains("x is not contiguous"), "{e}");
    let e = err(fc::silu_and_mul(&backend, &x, &x.zeros_like()?));
    assert!(e.contains("out has shape [4, 64]; expected [4, 32]"), "{e}");
    Ok(())
}

/// A broadcast view (every element repeated), which candle refuses to write.
trait Broadcast {
    fn i_broadcast(&self) -> Tensor;
}
impl Broadcast for Tensor {
    fn i_broadcast(&self) -> Tensor {
        let one = self.narrow(0, 0, 1).unwrap();
        one.broadcast_as(self.dims()).unwrap()
    }
}

/// Decode on CUDA tensors on candle's stream, against the CPU reference on the same elements
/// (spare pages NaN, output poisoned with NaN first).
#[cfg(feature = "candle-cuda")]
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_decode_append_and_ops_on_candle_cuda_tensors() -> R {
    use ferrinfer::attention::reference::rel_l2;
    let mut rng = Rng::from_time();
    let cpu = Device::Cpu;
    let gpu_dev = Device::new_cuda(0)?;
    let backend = fc::backend(&gpu_dev)?;
    assert!(backend.gpu().unwrap().on_caller_stream());

    // CPU cache with pages 1 and 5 (unused) full of NaN.
    let (cache_cpu, kv, heads) = setup(&mut rng, KvLayout::Nhd);
    let nan = Tensor::full(f32::NAN, (1, 2, 16, 2, 64), &cpu)?.to_dtype(DType::BF16)?;
    let t = cache_cpu.tensor();
    let t = Tensor::cat(
        &[
            &t.narrow(0, 0, 1)?,
            &nan,
            &t.narrow(0, 2, 3)?,
            &nan,
            &t.narrow(0, 6, 1)?,
        ],
        0,
    )?;
    let cache_cpu = PagedKvCache::new(t, KvLayout::Nhd)?;
    let cache_gpu = PagedKvCache::new(cache_cpu.tensor().to_device(&gpu_dev)?, KvLayout::Nhd)?;

    let q = randn(&mut rng, &[3, 8, 64], DType::BF16, &cpu);
    let out_cpu = q.zeros_like()?;
    let plan_cpu = BatchDecode::plan(&Backend::Cpu, heads, kv.clone(), None)?;
    fc::batch_decode(
        &Backend::Cpu,
        &plan_cpu,
        &Standard,
        &q,
        &cache_cpu,
        &out_cpu,
    )?;
    let plan = BatchDecode::plan(&backend, heads, kv.clone(), None)?;
    let q_gpu = q.to_device(&gpu_dev)?;
    let out_gpu = Tensor::full(f32::NAN, (3, 8, 64), &gpu_dev)?.to_dtype(DType::BF16)?;
    fc::batch_decode(&backend, &plan, &Standard, &q_gpu, &cache_gpu, &out_gpu)?;
    // Candle's own work after ours on the same stream sees the result: no synchronisation.
    let got: Vec<f32> = out_gpu.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let want: Vec<f64> = bf16s(&out_cpu)
        .iter()
        .map(|v| f64::from(v.to_f32()))
        .collect();
    for b in 0..3 {
        let r = 8 * 64;
        let e = rel_l2(&got[b * r..(b + 1) * r], &want[b * r..(b + 1) * r]);
        assert!(e <= 1e-2, "request {b}: rel L2 {e}");
    }

    // Append the last token of each request, then compare the whole cache (NaN pages equal).
    let plan = AppendPlan::new(&backend, heads, &kv, &[0, 1, 2, 3], 3)?;
    let k = randn(&mut rng, &[3, 2, 64], DType::BF16, &cpu);
    let v = randn(&mut rng, &[3, 2, 64], DType::BF16, &cpu);
    fc::append_kv(
        &backend,
        &plan,
        &k.to_device(&gpu_dev)?,
        &v.to_device(&gpu_dev)?,
        &cache_gpu,
    )?;
    let plan_cpu = AppendPlan::new(&Backend::Cpu, heads, &kv, &[0, 1, 2, 3], 3)?;
    fc::append_kv(&Backend::Cpu, &plan_cpu, &k, &v, &cache_cpu)?;
    let same = |a: &Tensor, b: &Tensor| {
        let (a, b) = (bf16s(a), bf16s(&b.to_device(&cpu).unwrap()));
        a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    assert!(same(cache_cpu.tensor(), cache_gpu.tensor()));

    // RMSNorm and SiLU-and-mul against the CPU backend.
    let x = randn(&mut rng, &[33, 4096], DType::BF16, &cpu);
    let w = randn(&mut rng, &[4096], DType::BF16, &cpu);
    let (o_cpu, o_gpu) = (x.zeros_like()?, x.to_device(&gpu_dev)?.zeros_like()?);
    fc::rmsnorm(&Backend::Cpu, &x, &w, 1e-6, &o_cpu)?;
    fc::rmsnorm(
        &backend,
        &x.to_device(&gpu_dev)?,
        &w.to_device(&gpu_dev)?,
        1e-6,
        &o_gpu,
    )?;
    let got: Vec<f32> = o_gpu.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let want: Vec<f64> = bf16s(&o_cpu)
        .iter()
        .map(|v| f64::from(v.to_f32()))
        .collect();
    assert!(rel_l2(&got, &want) <= 1e-2);
    let a_cpu = Tensor::zeros((33, 2048), DType::BF16, &cpu)?;
    let a_gpu = a_cpu.to_device(&gpu_dev)?;
    fc::silu_and_mul(&Backend::Cpu, &x, &a_cpu)?;
    fc::silu_and_mul(&backend, &x.to_device(&gpu_dev)?, &a_gpu)?;
    let got: Vec<f32> = a_gpu.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let want: Vec<f64> = bf16s(&a_cpu)
        .iter()
        .map(|v| f64::from(v.to_f32()))
        .collect();
    assert!(rel_l2(&got, &want) <= 1e-2);

    // A CPU tensor on the GPU backend is refused by name.
    let e = err(fc::rmsnorm(
        &backend,
        &x,
        &w.to_device(&gpu_dev)?,
        1e-6,
        &o_gpu,
    ));
    assert!(e.contains("x is on candle's Cpu"), "{e}");
    Ok(())
}
