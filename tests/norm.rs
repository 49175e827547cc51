//! Row norms: RMSNorm, fused residual add + RMSNorm, their Gemma forms, LayerNorm. CPU: the CPU
//! backend against naive formulas written out here, the fused pair against the unfused one,
//! empty batches, every error; the NVRTC compile of every norm kernel instance. GPU (`gpu_*`): the
//! kernels against the f64 CPU reference on random inputs, outputs poisoned with NaN.

use ferrinfer::attention::reference::rel_l2;
use ferrinfer::jit::{Arch, Jit, JitConfig};
use ferrinfer::ops::norm::{self, NormKind, NormShape};
use ferrinfer::prelude::*;
use ferrinfer::{DType, Element, Error};
use ferrinfer_testkit::Rng;

const EPS: f32 = 1e-6;

fn random<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    rng.normal_vec(n).into_iter().map(T::from_f32).collect()
}

fn f64s<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| f64::from(x.to_f32())).collect()
}

fn f32s<T: Element>(xs: &[T]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

/// Relative rounding error of one rounding to T (its unit roundoff, doubled for slack).
fn ulp<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
    }
}

/// The spacing of T's subnormals, where the relative bound no longer holds.
fn subnormal<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 2f64.powi(-133),
        DType::F16 => 2f64.powi(-24),
    }
}

/// The naive RMSNorm of one row, written out apart from the library's.
fn naive_rms(row: &[f64], w: &[f64], offset: f64, eps: f64) -> Vec<f64> {
    let n = row.len() as f64;
    let rms = (row.iter().map(|v| v * v).sum::<f64>() / n + eps).sqrt();
    row.iter()
        .zip(w)
        .map(|(v, w)| v / rms * (offset + w))
        .collect()
}

fn naive_layer(row: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    row.iter()
        .zip(g.iter().zip(b))
        .map(|(v, (g, b))| (v - mean) / (var + eps).sqrt() * g + b)
        .collect()
}

/// Every element within one rounding of the naive value.
fn assert_rounded<T: Element>(got: &[T], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = f64::from(g.to_f32());
        assert!(
            (g - w).abs() <= ulp::<T>() * w.abs() + subnormal::<T>(),
            "{what}: [{i}] = {g}, want {w}"
        );
    }
}

const SHAPES: [(u32, u32); 7] = [
    (0, 8),
    (1, 1),
    (3, 7),
    (5, 64),
    (2, 1000),
    (4, 4097),
    (1, 12),
];

fn cpu_rmsnorm<T: Element>(gemma: bool) {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let backend = Backend::Cpu;
    let offset = if gemma { 1.0 } else { 0.0 };
    for (rows, hidden) in SHAPES {
        let shape = NormShape::new(rows, hidden).unwrap();
        let what = format!(
            "{:?} gemma {gemma} [{rows}, {hidden}] (seed {seed})",
            T::DTYPE
        );
        let (x, w) = (
            random::<T>(&mut rng, shape.elements()),
            random::<T>(&mut rng, hidden as usize),
        );
        let (xd, wd) = (backend.upload(&x).unwrap(), backend.upload(&w).unwrap());
        let mut out = backend
            .filled(shape.elements(), T::from_f32(f32::NAN))
            .unwrap();
        if gemma {
            norm::gemma_rmsnorm(&backend, shape, &xd, &wd, EPS, &mut out).unwrap();
        } else {
            norm::rmsnorm(&backend, shape, &xd, &wd, EPS, &mut out).unwrap();
        }
        let (xf, wf) = (f64s(&x), f64s(&w));
        let want: Vec<f64> = xf
            .chunks(hidden as usize)
            .flat_map(|r| naive_rms(r, &wf, offset, f64::from(EPS)))
            .collect();
        assert_rounded(&out.to_vec().unwrap(), &want, &what);
        let f = norm::rmsnorm_f64(shape, &xf, &wf, offset, f64::from(EPS)).unwrap();
        assert!(
            f.iter()
                .zip(&want)
                .all(|(a, b)| (a - b).abs() <= 1e-12 * (1.0 + b.abs()))
        );
    }
}

#[test]
fn cpu_rmsnorm_is_the_rounded_naive_formula() {
    cpu_rmsnorm::<bf16>(false);
    cpu_rmsnorm::<f16>(false);
}

#[test]
fn cpu_gemma_rmsnorm_applies_one_plus_w() {
    cpu_rmsnorm::<bf16>(true);
    cpu_rmsnorm::<f16>(true);
}

fn cpu_fused<T: Element>(gemma: bool) {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let backend = Backend::Cpu;
    for (rows, hidden) in SHAPES {
        let shape = NormShape::new(rows, hidden).unwrap();
        let what = format!(
            "{:?} gemma {gemma} [{rows}, {hidden}] (seed {seed})",
            T::DTYPE
        );
        let x = random::<T>(&mut rng, shape.elements());
        let r = random::<T>(&mut rng, shape.elements());
        let w = random::<T>(&mut rng, hidden as usize);
        let (mut xd, mut rd) = (backend.upload(&x).unwrap(), backend.upload(&r).unwrap());
        let wd = backend.upload(&w).unwrap();
        if gemma {
            norm::gemma_fused_add_rmsnorm(&backend, shape, &mut xd, &mut rd, &wd, EPS).unwrap();
        } else {
            norm::fused_add_rmsnorm(&backend, shape, &mut xd, &mut rd, &wd, EPS).unwrap();
        }
        // The residual is the sum rounded once.
        let sum: Vec<T> = x
            .iter()
            .zip(&r)
            .map(|(a, b)| T::from_f32(a.to_f32() + b.to_f32()))
            .collect();
        let new_r = rd.to_vec().unwrap();
        assert_eq!(f32s(&new_r), f32s(&sum), "{what}: residual");
        // x is the RMSNorm of the rounded residual: the unfused pair, bit for bit.
        let sum_d = backend.upload(&sum).unwrap();
        let mut unfused = backend.filled(shape.elements(), T::from_f32(0.0)).unwrap();
        if gemma {
            norm::gemma_rmsnorm(&backend, shape, &sum_d, &wd, EPS, &mut unfused).unwrap();
        } else {
            norm::rmsnorm(&backend, shape, &sum_d, &wd, EPS, &mut unfused).unwrap();
        }
        let got = xd.to_vec().unwrap();
        assert_eq!(f32s(&got), f32s(&unfused.to_vec().unwrap()), "{what}: x");
        let offset = if gemma { 1.0 } else { 0.0 };
        let want: Vec<f64> = f64s(&sum)
            .chunks(hidden as usize)
            .flat_map(|row| naive_rms(row, &f64s(&w), offset, f64::from(EPS)))
            .collect();
        assert_rounded(&got, &want, &what);
    }
}

#[test]
fn cpu_fused_add_rmsnorm_is_the_unfused_pair() {
    cpu_fused::<bf16>(false);
    cpu_fused::<f16>(false);
    cpu_fused::<bf16>(true);
    cpu_fused::<f16>(true);
}

fn cpu_layernorm<T: Element>() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let backend = Backend::Cpu;
    for (rows, hidden) in SHAPES {
        let shape = NormShape::new(rows, hidden).unwrap();
        let what = format!("{:?} [{rows}, {hidden}] (seed {seed})", T::DTYPE);
        // A large mean: the variance must be taken about it.
        let x: Vec<T> = (0..shape.elements())
            .map(|_| T::from_f32(4.0 + rng.normal()))
            .collect();
        let g = rng.normal_vec(hidden as usize);
        let b = rng.normal_vec(hidden as usize);
        let xd = backend.upload(&x).unwrap();
        let (gd, bd) = (backend.upload(&g).unwrap(), backend.upload(&b).unwrap());
        let mut out = backend
            .filled(shape.elements(), T::from_f32(f32::NAN))
            .unwrap();
        norm::layernorm(&backend, shape, &xd, &gd, &bd, EPS, &mut out).unwrap();
        let gf: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
        let bf: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
        let want: Vec<f64> = f64s(&x)
            .chunks(hidden as usize)
            .flat_map(|r| naive_layer(r, &gf, &bf, f64::from(EPS)))
            .collect();
        assert_rounded(&out.to_vec().unwrap(), &want, &what);
    }
}

#[test]
fn cpu_layernorm_is_the_rounded_naive_formula() {
    cpu_layernorm::<bf16>();
    cpu_layernorm::<f16>();
}

fn message(r: ferrinfer::Result<()>) -> String {
    match r {
        Err(Error::InvalidInput(m)) => m,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn shapes_lengths_and_eps_are_checked() {
    let backend = Backend::Cpu;
    let shape = NormShape::new(2, 4).unwrap();
    let b = |n: usize| backend.filled(n, bf16::ONE).unwrap();
    let f = |n: usize| backend.filled(n, 1.0f32).unwrap();
    let (x, w) = (b(8), b(4));
    let (mut out, mut bad_out) = (b(8), b(9));

    let m = message(norm::rmsnorm(&backend, shape, &b(7), &w, EPS, &mut out));
    assert!(
        m.contains("rmsnorm: x has 7 elements") && m.contains("[rows=2, hidden=4] needs 8"),
        "{m}"
    );
    let m = message(norm::gemma_rmsnorm(
        &backend,
        shape,
        &x,
        &b(5),
        EPS,
        &mut out,
    ));
    assert!(
        m.contains("gemma_rmsnorm: weight has 5 elements") && m.contains("needs 4"),
        "{m}"
    );
    let m = message(norm::rmsnorm(&backend, shape, &x, &w, EPS, &mut bad_out));
    assert!(m.contains("out has 9 elements"), "{m}");
    for eps in [-1e-6, f32::NAN, f32::INFINITY] {
        let m = message(norm::rmsnorm(&backend, shape, &x, &w, eps, &mut out));
        assert!(m.contains(&format!("eps = {eps}")), "{m}");
    }

    let (mut xm, mut short_r) = (b(8), b(6));
    let m = message(norm::fused_add_rmsnorm(
        &backend,
        shape,
        &mut xm,
        &mut short_r,
        &w,
        EPS,
    ));
    assert!(
        m.contains("fused_add_rmsnorm: residual has 6 elements"),
        "{m}"
    );
    let (mut long_x, mut r) = (b(10), b(8));
    let m = message(norm::gemma_fused_add_rmsnorm(
        &backend,
        shape,
        &mut long_x,
        &mut r,
        &w,
        EPS,
    ));
    assert!(
        m.contains("gemma_fused_add_rmsnorm: x has 10 elements"),
        "{m}"
    );
    let m = message(norm::fused_add_rmsnorm(
        &backend, shape, &mut xm, &mut r, &w, -1.0,
    ));
    assert!(m.contains("eps = -1"), "{m}");
    // A refused call leaves its in-place buffers alone.
    assert!(xm.to_vec().unwrap().iter().all(|v| v.to_f32() == 1.0));

    let m = message(norm::layernorm(
        &backend,
        shape,
        &x,
        &f(3),
        &f(4),
        EPS,
        &mut out,
    ));
    assert!(m.contains("layernorm: gamma has 3 elements"), "{m}");
    let m = message(norm::layernorm(
        &backend,
        shape,
        &x,
        &f(4),
        &f(8),
        EPS,
        &mut out,
    ));
    assert!(m.contains("beta has 8 elements"), "{m}");

    for (rows, hidden) in [(1, 0), (1, norm::MAX_HIDDEN + 1)] {
        match NormShape::new(rows, hidden) {
            Err(Error::InvalidInput(m)) => {
                assert!(m.contains(&format!("hidden = {hidden}")), "{m}")
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
    assert!(norm::rmsnorm_f64(shape, &[0.0; 8], &[0.0; 3], 0.0, 1e-6).is_err());
    assert!(norm::layernorm_f64(shape, &[0.0; 7], &[0.0; 4], &[0.0; 4], 1e-6).is_err());
}

#[test]
fn empty_batches_are_fine() {
    let backend = Backend::Cpu;
    let shape = NormShape::new(0, 4096).unwrap();
    let none = backend.upload::<bf16>(&[]).unwrap();
    let w = backend.filled(4096, bf16::ONE).unwrap();
    let mut out = backend.upload::<bf16>(&[]).unwrap();
    norm::rmsnorm(&backend, shape, &none, &w, EPS, &mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn nvrtc_compiles_every_norm_kernel_instance() {
    let jit = Jit::new(JitConfig {
        cache_dir: None,
        compile: true,
        extra_options: Vec::new(),
    });
    for arch in [Arch::new(8, 0), Arch::new(9, 0)] {
        for kind in NormKind::ALL {
            for dtype in DType::ALL {
                for vec in norm::VEC_WIDTHS {
                    let k = norm::compile(&jit, kind, dtype, vec, arch)
                        .unwrap_or_else(|e| panic!("{kind:?} {dtype:?} v{vec} {arch}: {e}"));
                    assert!(!k.cubin.is_empty() && k.stats.registers > 0);
                    // The wide instances carry the benchmarks: they must not spill.
                    if vec == 8 {
                        assert_eq!(k.stats.spill_stores, 0, "{kind:?} {dtype:?} {arch} spills");
                    }
                }
            }
        }
    }
    assert!(norm::compile(&jit, NormKind::Rms, DType::F16, 16, Arch::new(9, 0)).is_err());
}

// ---- GPU ----

fn gpu() -> Backend {
    Backend::cuda(0).expect("a CUDA GPU")
}

/// The tolerance of DESIGN.md's testing rules.
fn tolerance<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 1e-2,
        DType::F16 => 2e-3,
    }
}

/// Relative L2 error overall and of every row, none above the tolerance, no NaN. A row of a few
/// elements may hold only tiny values, where f16's subnormals round coarsely: a row's error may
/// also be up to T's subnormal spacing per element.
fn assert_close<T: Element>(got: &[T], want: &[f64], hidden: u32, what: &str) {
    let got = f32s(got);
    let err = rel_l2(&got, want);
    assert!(
        err <= tolerance::<T>(),
        "{what}: relative L2 error {err:.2e}"
    );
    let h = hidden as usize;
    for (row, (g, w)) in got.chunks(h).zip(want.chunks(h)).enumerate() {
        let diff = g
            .iter()
            .zip(w)
            .map(|(&g, w)| (f64::from(g) - w).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = w.iter().map(|w| w * w).sum::<f64>().sqrt();
        let bound = tolerance::<T>() * norm + (h as f64).sqrt() * subnormal::<T>();
        assert!(
            diff <= bound && !g.iter().any(|v| v.is_nan()),
            "{what}: row {row} L2 error {diff:.2e}, relative {:.2e}",
            diff / norm
        );
    }
}

/// Hidden sizes through every path: each vector width (8, 4, 2 and 1 per access), odd sizes, rows
/// that fit the registers, and rows longer than they hold (read twice).
const GPU_HIDDEN: [u32; 16] = [
    1, 2, 6, 7, 12, 128, 129, 1000, 4096, 8192, 8193, 20002, 40000, 40004, 65537, 100000,
];
const GPU_ROWS: [u32; 3] = [1, 5, 37];
/// (rows, hidden) with more rows than one wave of the persistent grid holds on any GPU of up to
/// 160 SMs, so blocks walk several rows (and pipeline the next one's loads): short rows many to a
/// block, rows in registers (each vector width), rows longer than the registers.
const GPU_MANY_ROWS: [(u32, u32); 9] = [
    (9000, 7),
    (9000, 129),
    (6000, 1000),
    (1000, 2002),
    (1000, 4100),
    (1500, 8192),
    (1500, 8193),
    (700, 40004),
    (400, 100000),
];

/// Every GPU_HIDDEN x GPU_ROWS shape, then GPU_MANY_ROWS.
fn gpu_shapes() -> impl Iterator<Item = (u32, u32)> {
    GPU_HIDDEN
        .into_iter()
        .flat_map(|hidden| GPU_ROWS.map(|rows| (rows, hidden)))
        .chain(GPU_MANY_ROWS)
}

fn gpu_rms<T: Element>(gemma: bool) {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let offset = if gemma { 1.0 } else { 0.0 };
    for (rows, hidden) in gpu_shapes() {
        let shape = NormShape::new(rows, hidden).unwrap();
        let what = format!(
            "{:?} gemma {gemma} [{rows}, {hidden}] (seed {seed})",
            T::DTYPE
        );
        let x = random::<T>(&mut rng, shape.elements());
        let w = random::<T>(&mut rng, hidden as usize);
        let want = norm::rmsnorm_f64(shape, &f64s(&x), &f64s(&w), offset, f64::from(EPS)).unwrap();
        let (xd, wd) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
        let mut out = gpu.filled(shape.elements(), T::from_f32(f32::NAN)).unwrap();
        if gemma {
            norm::gemma_rmsnorm(&gpu, shape, &xd, &wd, EPS, &mut out).unwrap();
        } else {
            norm::rmsnorm(&gpu, shape, &xd, &wd, EPS, &mut out).unwrap();
        }
        assert_close(&out.to_vec().unwrap(), &want, hidden, &what);
        assert_eq!(f32s(&xd.to_vec().unwrap()), f32s(&x), "{what}: x changed");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_rmsnorm_matches_cpu() {
    gpu_rms::<bf16>(false);
    gpu_rms::<f16>(false);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_gemma_rmsnorm_matches_cpu() {
    gpu_rms::<bf16>(true);
    gpu_rms::<f16>(true);
}

fn gpu_fused<T: Element>(gemma: bool) {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let offset = if gemma { 1.0 } else { 0.0 };
    for (rows, hidden) in gpu_shapes() {
        let shape = NormShape::new(rows, hidden).unwrap();
        let what = format!(
            "{:?} gemma {gemma} [{rows}, {hidden}] (seed {seed})",
            T::DTYPE
        );
        let x = random::<T>(&mut rng, shape.elements());
        let r = random::<T>(&mut rng, shape.elements());
        let w = random::<T>(&mut rng, hidden as usize);
        let (xd, rd, wd) = (
            Backend::Cpu.upload(&x).unwrap(),
            Backend::Cpu.upload(&r).unwrap(),
            Backend::Cpu.upload(&w).unwrap(),
        );
        let (mut want_x, mut want_r) = (xd, rd);
        norm::fused_add_rmsnorm(&Backend::Cpu, shape, &mut want_x, &mut want_r, &wd, EPS)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let want_r = want_r.to_vec().unwrap();
        let want =
            norm::rmsnorm_f64(shape, &f64s(&want_r), &f64s(&w), offset, f64::from(EPS)).unwrap();
        let (mut xg, mut rg) = (gpu.upload(&x).unwrap(), gpu.upload(&r).unwrap());
        let wg = gpu.upload(&w).unwrap();
        if gemma {
            norm::gemma_fused_add_rmsnorm(&gpu, shape, &mut xg, &mut rg, &wg, EPS).unwrap();
        } else {
            norm::fused_add_rmsnorm(&gpu, shape, &mut xg, &mut rg, &wg, EPS).unwrap();
        }
        // One f32 add rounded once, as the CPU rounds the exact sum: bit for bit.
        assert_eq!(
            f32s(&rg.to_vec().unwrap()),
            f32s(&want_r),
            "{what}: residual"
        );
        assert_close(&xg.to_vec().unwrap(), &want, hidden, &what);
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_fused_add_rmsnorm_matches_cpu() {
    gpu_fused::<bf16>(false);
    gpu_fused::<f16>(false);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_gemma_fused_add_rmsnorm_matches_cpu() {
    gpu_fused::<bf16>(true);
    gpu_fused::<f16>(true);
}

fn gpu_layer<T: Element>() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for (rows, hidden) in gpu_shapes() {
        let shape = NormShape::new(rows, hidden).unwrap();
        let what = format!("{:?} [{rows}, {hidden}] (seed {seed})", T::DTYPE);
        let x: Vec<T> = (0..shape.elements())
            .map(|_| T::from_f32(4.0 + rng.normal()))
            .collect();
        let g = rng.normal_vec(hidden as usize);
        let b = rng.normal_vec(hidden as usize);
        let to64 = |v: &[f32]| -> Vec<f64> { v.iter().map(|&e| f64::from(e)).collect() };
        let want =
            norm::layernorm_f64(shape, &f64s(&x), &to64(&g), &to64(&b), f64::from(EPS)).unwrap();
        let xd = gpu.upload(&x).unwrap();
        let (gd, bd) = (gpu.upload(&g).unwrap(), gpu.upload(&b).unwrap());
        let mut out = gpu.filled(shape.elements(), T::from_f32(f32::NAN)).unwrap();
        norm::layernorm(&gpu, shape, &xd, &gd, &bd, EPS, &mut out).unwrap();
        assert_close(&out.to_vec().unwrap(), &want, hidden, &what);
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_layernorm_matches_cpu() {
    gpu_layer::<bf16>();
    gpu_layer::<f16>();
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_norms_of_empty_batches_write_nothing() {
    let gpu = gpu();
    let shape = NormShape::new(0, 4096).unwrap();
    let none = gpu.upload::<bf16>(&[]).unwrap();
    let w = gpu.filled(4096, bf16::ONE).unwrap();
    let g = gpu.filled(4096, 1.0f32).unwrap();
    let mut out = gpu.upload::<bf16>(&[]).unwrap();
    norm::rmsnorm(&gpu, shape, &none, &w, EPS, &mut out).unwrap();
    norm::layernorm(&gpu, shape, &none, &g, &g, EPS, &mut out).unwrap();
    let (mut x, mut r) = (
        gpu.upload::<bf16>(&[]).unwrap(),
        gpu.upload::<bf16>(&[]).unwrap(),
    );
    norm::fused_add_rmsnorm(&gpu, shape, &mut x, &mut r, &w, EPS).unwrap();
    gpu.synchronize().unwrap();
    assert!(out.to_vec().unwrap().is_empty());
}
