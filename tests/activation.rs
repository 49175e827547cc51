//! Gated activations: SiLU-, GELU- and GELU(tanh)-and-mul. CPU: the activations at known values,
//! the CPU backend against naive formulas, empty batches, every error; the NVRTC compile of every
//! activation kernel instance. GPU (`gpu_*`): the kernels against the f64 CPU reference on random
//! inputs, outputs poisoned with NaN.

use ferrinfer::attention::reference::rel_l2;
use ferrinfer::jit::{Arch, Jit, JitConfig};
use ferrinfer::ops::activation::{self, Act, ActShape};
use ferrinfer::prelude::*;
use ferrinfer::{DType, Element, Error};
use ferrinfer_testkit::Rng;

fn random<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    rng.normal_vec(n).into_iter().map(T::from_f32).collect()
}

fn f64s<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| f64::from(x.to_f32())).collect()
}

fn f32s<T: Element>(xs: &[T]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

fn call<T: Element>(
    backend: &Backend,
    act: Act,
    shape: ActShape,
    x: &Buffer<T>,
    out: &mut Buffer<T>,
) -> ferrinfer::Result<()> {
    match act {
        Act::Silu => activation::silu_and_mul(backend, shape, x, out),
        Act::Gelu => activation::gelu_and_mul(backend, shape, x, out),
        Act::GeluTanh => activation::gelu_tanh_and_mul(backend, shape, x, out),
    }
}

#[test]
fn activations_at_known_values() {
    // Reference values from Python's math.erf / math.tanh / math.exp in double precision.
    let table = [
        (
            1.0,
            0.8413447460685429,
            0.8411919906082768,
            0.7310585786300049,
        ),
        (
            -1.0,
            -0.15865525393145707,
            -0.15880800939172324,
            -0.2689414213699951,
        ),
        (
            2.0,
            1.9544997361036416,
            1.954597694087775,
            1.7615941559557646,
        ),
        (
            -3.5,
            -0.0008142017766243903,
            -0.0006161976553737403,
            -0.10259280762974712,
        ),
    ];
    for (x, gelu, gelu_tanh, silu) in table {
        for (act, want) in [
            (Act::Gelu, gelu),
            (Act::GeluTanh, gelu_tanh),
            (Act::Silu, silu),
        ] {
            let got = activation::act_f64(act, x);
            assert!(
                (got - want).abs() <= 1e-13 * (1.0 + want.abs()),
                "{act:?}({x}) = {got}, want {want}"
            );
        }
    }
    assert_eq!(activation::act_f64(Act::Silu, 0.0), 0.0);
    assert_eq!(activation::act_f64(Act::Silu, -1000.0), 0.0);
    assert_eq!(activation::act_f64(Act::Gelu, 40.0), 40.0);
}

/// The naive gated activation, written out apart from the library's (GELU through its erf).
fn naive(act: Act, g: f64, u: f64) -> f64 {
    let a = match act {
        Act::Silu => g * (1.0 / (1.0 + (-g).exp())),
        Act::Gelu => g * 0.5 * (1.0 + activation::erf(g * std::f64::consts::FRAC_1_SQRT_2)),
        Act::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            g * 0.5 * (1.0 + (c * (g + 0.044715 * g.powi(3))).tanh())
        }
    };
    a * u
}

fn cpu_matches_naive<T: Element>() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let backend = Backend::Cpu;
    for act in Act::ALL {
        for (rows, d) in [(0, 8), (1, 1), (3, 7), (5, 64), (2, 1000)] {
            let shape = ActShape::new(rows, d).unwrap();
            let what = format!("{act:?} {:?} [{rows}, {d}] (seed {seed})", T::DTYPE);
            let x = random::<T>(&mut rng, shape.input_len());
            let xd = backend.upload(&x).unwrap();
            let mut out = backend
                .filled(shape.output_len(), T::from_f32(f32::NAN))
                .unwrap();
            call(&backend, act, shape, &xd, &mut out).unwrap();
            let xf = f64s(&x);
            let d = d as usize;
            let want: Vec<f64> = xf
                .chunks(2 * d)
                .flat_map(|row| (0..d).map(move |c| naive(act, row[c], row[d + c])))
                .collect();
            let got = out.to_vec().unwrap();
            assert_eq!(got.len(), want.len(), "{what}");
            let unit = match T::DTYPE {
                DType::Bf16 => 2f64.powi(-8),
                DType::F16 => 2f64.powi(-11),
            };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let g = f64::from(g.to_f32());
                assert!(
                    (g - w).abs() <= unit * w.abs() + subnormal::<T>(),
                    "{what}: [{i}] = {g}, want {w}"
                );
            }
            let f = activation::act_and_mul_f64(act, shape, &xf).unwrap();
            assert!(
                f.iter()
                    .zip(&want)
                    .all(|(a, b)| (a - b).abs() <= 1e-12 * (1.0 + b.abs()))
            );
        }
    }
}

#[test]
fn cpu_activations_are_the_rounded_naive_formulas() {
    cpu_matches_naive::<bf16>();
    cpu_matches_naive::<f16>();
}

#[test]
fn shapes_and_lengths_are_checked() {
    let backend = Backend::Cpu;
    let shape = ActShape::new(3, 5).unwrap();
    let b = |n: usize| backend.filled(n, bf16::ONE).unwrap();
    let message = |r: ferrinfer::Result<()>| match r {
        Err(Error::InvalidInput(m)) => m,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    let m = message(activation::silu_and_mul(
        &backend,
        shape,
        &b(15),
        &mut b(15),
    ));
    assert!(
        m.contains("silu_and_mul: x has 15 elements") && m.contains("[rows=3, d=5] needs 30"),
        "{m}"
    );
    let m = message(activation::gelu_and_mul(
        &backend,
        shape,
        &b(30),
        &mut b(30),
    ));
    assert!(
        m.contains("gelu_and_mul: out has 30 elements") && m.contains("needs 15"),
        "{m}"
    );
    let m = message(activation::act_and_mul(
        &backend,
        Act::GeluTanh,
        shape,
        &b(31),
        &mut b(15),
    ));
    assert!(m.contains("gelu_tanh_and_mul: x has 31"), "{m}");
    for d in [0, activation::MAX_D + 1] {
        match ActShape::new(1, d) {
            Err(Error::InvalidInput(m)) => assert!(m.contains(&format!("d = {d}")), "{m}"),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
    assert!(activation::act_and_mul_f64(Act::Silu, shape, &[0.0; 29]).is_err());
    // Zero rows: empty buffers, nothing to do.
    let empty = ActShape::new(0, 5).unwrap();
    activation::silu_and_mul(&backend, empty, &b(0), &mut b(0)).unwrap();
}

#[test]
fn nvrtc_compiles_every_activation_kernel_instance() {
    let jit = Jit::new(JitConfig {
        cache_dir: None,
        compile: true,
        extra_options: Vec::new(),
    });
    for arch in [Arch::new(8, 0), Arch::new(9, 0)] {
        for act in Act::ALL {
            for dtype in DType::ALL {
                for vec in activation::VEC_WIDTHS {
                    let k = activation::compile(&jit, act, dtype, vec, arch)
                        .unwrap_or_else(|e| panic!("{act:?} {dtype:?} v{vec} {arch}: {e}"));
                    assert!(!k.cubin.is_empty() && k.stats.registers > 0);
                    assert_eq!(
                        k.stats.spill_stores, 0,
                        "{act:?} {dtype:?} v{vec} {arch} spills"
                    );
                }
            }
        }
    }
    assert!(activation::compile(&jit, Act::Silu, DType::F16, 3, Arch::new(9, 0)).is_err());
}

// ---- GPU ----

fn gpu() -> Backend {
    Backend::cuda(0).expect("a CUDA GPU")
}

/// The spacing of T's subnormals.
fn subnormal<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 2f64.powi(-133),
        DType::F16 => 2f64.powi(-24),
    }
}

/// The tolerance of DESIGN.md's testing rules.
fn tolerance<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 1e-2,
        DType::F16 => 2e-3,
    }
}

/// Run `act` on the GPU over random `[rows, 2d]` and compare with the f64 reference, overall and
/// row by row.
fn gpu_case<T: Element>(gpu: &Backend, rng: &mut Rng, act: Act, rows: u32, d: u32, seed: u64) {
    let shape = ActShape::new(rows, d).unwrap();
    let what = format!("{act:?} {:?} [{rows}, {d}] (seed {seed})", T::DTYPE);
    let x = random::<T>(rng, shape.input_len());
    let want = activation::act_and_mul_f64(act, shape, &f64s(&x)).unwrap();
    let xd = gpu.upload(&x).unwrap();
    let mut out = gpu
        .filled(shape.output_len(), T::from_f32(f32::NAN))
        .unwrap();
    call(gpu, act, shape, &xd, &mut out).unwrap();
    let got = f32s(&out.to_vec().unwrap());
    let err = rel_l2(&got, &want);
    assert!(
        err <= tolerance::<T>(),
        "{what}: relative L2 error {err:.2e}"
    );
    // Per row, with room for f16's coarse subnormals: a row of a few elements may hold only
    // tiny products.
    let (d, floor) = (d as usize, subnormal::<T>());
    for (row, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let diff = g
            .iter()
            .zip(w)
            .map(|(&g, w)| (f64::from(g) - w).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = w.iter().map(|w| w * w).sum::<f64>().sqrt();
        assert!(
            diff <= tolerance::<T>() * norm + (d as f64).sqrt() * floor,
            "{what}: row {row} L2 error {diff:.2e}, relative {:.2e}",
            diff / norm
        );
    }
}

/// Each vector width (d a multiple of 8, 4, 2 or odd), short rows stacked in a block, long rows
/// over several blocks.
const GPU_D: [u32; 10] = [1, 2, 3, 4, 8, 13, 64, 1000, 14336, 14337];
const GPU_ROWS: [u32; 4] = [1, 5, 70, 333];

fn gpu_act<T: Element>(act: Act) {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for d in GPU_D {
        for rows in GPU_ROWS {
            gpu_case::<T>(&gpu, &mut rng, act, rows, d, seed);
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_silu_and_mul_matches_cpu() {
    gpu_act::<bf16>(Act::Silu);
    gpu_act::<f16>(Act::Silu);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_gelu_and_mul_matches_cpu() {
    gpu_act::<bf16>(Act::Gelu);
    gpu_act::<f16>(Act::Gelu);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_gelu_tanh_and_mul_matches_cpu() {
    gpu_act::<bf16>(Act::GeluTanh);
    gpu_act::<f16>(Act::GeluTanh);
}

/// More rows than grid.y holds (65535 blocks of one row each at d = 257): the kernel steps over
/// the rest. Zero rows write nothing.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_activation_rows_past_the_grid_limit_and_empty_batches() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    gpu_case::<bf16>(&gpu, &mut rng, Act::Silu, 65600, 257, seed);
    let empty = ActShape::new(0, 64).unwrap();
    let x = gpu.upload::<bf16>(&[]).unwrap();
    let mut out = gpu.upload::<bf16>(&[]).unwrap();
    activation::silu_and_mul(&gpu, empty, &x, &mut out).unwrap();
    gpu.synchronize().unwrap();
    assert!(out.to_vec().unwrap().is_empty());
}
