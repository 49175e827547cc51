//! RoPE. CPU: the CPU backend against a naive f64 formula (HF's Llama 3.1 definition with its
//! branches), both layouts, partial rotary dims, in and out of place, per-token positions and
//! per-request offsets, the cos/sin cache, and every error. GPU (`gpu_*`): the kernel against the
//! naive formula on random inputs, NaN-poisoned outputs, odd head dims, positions up to 2^31 - 1,
//! invalid positions (NaN), empty batches.

use ferrinfer::attention::reference::rel_l2;
use ferrinfer::ops::rope::{
    self, Angles, Frequencies, Llama31, Positions, Qk, QkMut, Rope, RopeLayout,
};
use ferrinfer::prelude::*;
use ferrinfer::{DType, Element, Error};
use ferrinfer_testkit::Rng;

/// HF's `_compute_llama3_parameters`, branch for branch, then the linear scale.
fn naive_freq(theta: f64, scale: f64, llama: Option<Llama31>, j: u32, rd: u32) -> f64 {
    let inv = 1.0 / theta.powf(f64::from(2 * j) / f64::from(rd));
    let f = match llama {
        None => inv,
        Some(l) => {
            let (low, high) = (f64::from(l.low_freq_factor), f64::from(l.high_freq_factor));
            let orig = f64::from(l.original_max_position);
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            if wavelen < orig / high {
                inv
            } else if wavelen > orig / low {
                inv / f64::from(l.factor)
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 - smooth) * inv / f64::from(l.factor) + smooth * inv
            }
        }
    };
    f / scale
}

/// `(cos, sin)` of each pair at a position, from a frequency function or a cache.
type AngleFn<'a> = dyn Fn(i64) -> Option<Vec<(f64, f64)>> + 'a;

/// One head turned the naive way; dims past the rotary ones copied. `None` angles give NaN.
fn naive_head(layout: RopeLayout, cs: Option<&[(f64, f64)]>, x: &[f64], out: &mut [f64]) {
    out.copy_from_slice(x);
    let Some(cs) = cs else {
        // Only the rotated dims become NaN.
        return;
    };
    let half = cs.len();
    for (j, &(c, s)) in cs.iter().enumerate() {
        let (a, b) = match layout {
            RopeLayout::NeoX => (j, j + half),
            RopeLayout::GptJ => (2 * j, 2 * j + 1),
        };
        out[a] = x[a] * c - x[b] * s;
        out[b] = x[b] * c + x[a] * s;
    }
}

/// The naive result of RoPE on `x` (`[tokens, heads, head_dim]`) at `pos`; a token with no
/// angles gets NaN in its rotated dims.
fn naive(rope: &Rope, heads: u32, pos: &[Option<i64>], angles: &AngleFn, x: &[f64]) -> Vec<f64> {
    let (d, rd) = (rope.heads().head_dim() as usize, rope.rotary_dim() as usize);
    let mut out = vec![0.0; x.len()];
    for (t, p) in pos.iter().enumerate() {
        let cs = p.and_then(angles);
        for h in 0..heads as usize {
            let at = (t * heads as usize + h) * d;
            naive_head(
                rope.layout(),
                cs.as_deref(),
                &x[at..at + d],
                &mut out[at..at + d],
            );
            if cs.is_none() {
                out[at..at + rd].fill(f64::NAN);
            }
        }
    }
    out
}

fn computed(f: Frequencies, rd: u32) -> impl Fn(i64) -> Option<Vec<(f64, f64)>> {
    move |p| {
        Some(
            (0..rd / 2)
                .map(|j| {
                    let a = p as f64
                        * naive_freq(
                            f64::from(f.theta()),
                            f64::from(f.scale()),
                            f.llama31_scaling(),
                            j,
                            rd,
                        );
                    (a.cos(), a.sin())
                })
                .collect(),
        )
    }
}

/// A cos/sin cache of `rows` positions (f32, FlashInfer's layout) and its angle function.
fn cache_of(f: Frequencies, rd: u32, rows: u32) -> Vec<f32> {
    let half = rd as usize / 2;
    let mut out = vec![0.0f32; rows as usize * rd as usize];
    for p in 0..rows as usize {
        let cs = computed(f, rd)(p as i64).unwrap();
        for (j, (c, s)) in cs.into_iter().enumerate() {
            out[p * rd as usize + j] = c as f32;
            out[p * rd as usize + half + j] = s as f32;
        }
    }
    out
}

fn cached(table: &[f32], rd: u32) -> impl Fn(i64) -> Option<Vec<(f64, f64)>> + '_ {
    move |p| {
        let rd = rd as usize;
        let rows = (table.len() / rd) as i64;
        if p < 0 || p >= rows {
            return None;
        }
        let row = &table[p as usize * rd..][..rd];
        Some(
            (0..rd / 2)
                .map(|j| (f64::from(row[j]), f64::from(row[rd / 2 + j])))
                .collect(),
        )
    }
}

fn f64s<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| f64::from(x.to_f32())).collect()
}

fn random<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.normal())).collect()
}

/// Half an ulp of `T` relative, doubled: what rounding the f64 result to `T` may cost.
fn ulp<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
    }
}

fn assert_close_each<T: Element>(got: &[T], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let g = f64::from(g.to_f32());
        assert!(
            (g - w).abs() <= ulp::<T>() * w.abs() + 1e-6,
            "{what}: element {i} = {g}, want {w}"
        );
    }
}

struct Setup {
    rope: Rope,
    freqs: Frequencies,
    tokens: usize,
}

fn setups() -> Vec<Setup> {
    let llama = Frequencies::llama31();
    let scaled = Frequencies::new(10_000.0)
        .unwrap()
        .with_scale(2.5)
        .unwrap()
        .with_llama31(Llama31 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 2.0,
            original_max_position: 64,
        })
        .unwrap();
    let mut out = Vec::new();
    for layout in [RopeLayout::NeoX, RopeLayout::GptJ] {
        for (hq, hk, d, rd, freqs, tokens) in [
            (4, 2, 16, 16, Frequencies::new(10_000.0).unwrap(), 5),
            (3, 1, 12, 8, scaled, 7),
            (2, 2, 6, 6, llama, 3),
            (8, 2, 128, 64, llama, 9),
            (2, 1, 10, 2, Frequencies::new(7.0).unwrap(), 4),
        ] {
            let rope = Rope::new(Heads::new(hq, hk, d).unwrap(), rd, layout).unwrap();
            out.push(Setup {
                rope,
                freqs,
                tokens,
            });
        }
    }
    out
}

fn cpu_matches_naive<T: Element>() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let cpu = Backend::Cpu;
    for s in setups() {
        let (rope, n) = (&s.rope, s.tokens);
        let what = format!("{:?} {rope:?} (seed {seed})", T::DTYPE);
        let q: Vec<T> = random(&mut rng, rope.q_len(n));
        let k: Vec<T> = random(&mut rng, rope.k_len(n));
        let pos: Vec<i32> = (0..n).map(|_| rng.below(100_000) as i32).collect();
        let want_pos: Vec<Option<i64>> = pos.iter().map(|&p| Some(i64::from(p))).collect();
        let h = rope.heads();
        let angles = computed(s.freqs, rope.rotary_dim());
        let want_q = naive(rope, h.num_qo_heads(), &want_pos, &angles, &f64s(&q));
        let want_k = naive(rope, h.num_kv_heads(), &want_pos, &angles, &f64s(&k));
        let p = cpu.upload(&pos).unwrap();
        // Out of place, then in place: the same values, and past rotary_dim bit for bit the input.
        let (qb, kb) = (cpu.upload(&q).unwrap(), cpu.upload(&k).unwrap());
        let mut qo = cpu.filled(q.len(), T::from_f32(f32::NAN)).unwrap();
        let mut ko = cpu.filled(k.len(), T::from_f32(f32::NAN)).unwrap();
        rope::apply(
            &cpu,
            rope,
            Angles::Computed(s.freqs),
            Positions::PerToken(&p),
            Qk { q: &qb, k: &kb },
            QkMut {
                q: &mut qo,
                k: &mut ko,
            },
        )
        .unwrap();
        let (mut qi, mut ki) = (cpu.upload(&q).unwrap(), cpu.upload(&k).unwrap());
        rope::apply_in_place(
            &cpu,
            rope,
            Angles::Computed(s.freqs),
            Positions::PerToken(&p),
            QkMut {
                q: &mut qi,
                k: &mut ki,
            },
        )
        .unwrap();
        for (got, want, x) in [
            (qo.to_vec().unwrap(), &want_q, &q),
            (ko.to_vec().unwrap(), &want_k, &k),
            (qi.to_vec().unwrap(), &want_q, &q),
            (ki.to_vec().unwrap(), &want_k, &k),
        ] {
            assert_close_each(&got, want, &what);
            let d = h.head_dim() as usize;
            for (g, x) in got.chunks(d).zip(x.chunks(d)) {
                let rd = rope.rotary_dim() as usize;
                assert!(
                    g[rd..]
                        .iter()
                        .zip(&x[rd..])
                        .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()),
                    "{what}: a dim past rotary_dim changed"
                );
            }
        }
    }
}

#[test]
fn cpu_rope_matches_the_naive_formula_bf16() {
    cpu_matches_naive::<bf16>();
}

#[test]
fn cpu_rope_matches_the_naive_formula_f16() {
    cpu_matches_naive::<f16>();
}

#[test]
fn llama31_frequencies_match_the_branchy_definition() {
    let l = Llama31::default();
    let f = Frequencies::llama31();
    assert_eq!(f.theta(), 5e5);
    assert_eq!(f.llama31_scaling(), Some(l));
    for rd in [2, 8, 64, 128, 256] {
        for j in 0..rd / 2 {
            let (got, want) = (f.frequency(j, rd), naive_freq(5e5, 1.0, Some(l), j, rd));
            assert!(
                (got - want).abs() <= 1e-14 * want,
                "rd {rd} j {j}: {got} vs {want}"
            );
        }
    }
    // The three regimes all occur at head dim 128: kept, divided and blended.
    let ratio: Vec<f64> = (0..64)
        .map(|j| f.frequency(j, 128) / naive_freq(5e5, 1.0, None, j, 128))
        .collect();
    assert_eq!(ratio[0], 1.0);
    assert!((ratio[63] - 0.125).abs() < 1e-15);
    assert!(ratio.iter().any(|&r| r > 0.13 && r < 0.99));
    let scaled = Frequencies::new(100.0).unwrap().with_scale(4.0).unwrap();
    assert!((scaled.frequency(1, 4) - 0.1 / 4.0).abs() < 1e-15);
}

#[test]
fn offsets_per_request_equal_positions_per_token() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let rope = Rope::new(Heads::new(2, 1, 8).unwrap(), 8, RopeLayout::GptJ).unwrap();
    let (indptr, offsets) = ([0i32, 3, 3, 7], [10i32, 500, 2]);
    let pos: Vec<i32> = vec![10, 11, 12, 2, 3, 4, 5];
    let q: Vec<bf16> = random(&mut rng, rope.q_len(7));
    let k: Vec<bf16> = random(&mut rng, rope.k_len(7));
    let freqs = Angles::Computed(Frequencies::new(10_000.0).unwrap());
    let run = |positions: Positions<'_>| {
        let (mut qb, mut kb) = (cpu.upload(&q).unwrap(), cpu.upload(&k).unwrap());
        rope::apply_in_place(
            &cpu,
            &rope,
            freqs,
            positions,
            QkMut {
                q: &mut qb,
                k: &mut kb,
            },
        )
        .map(|()| (qb.to_vec().unwrap(), kb.to_vec().unwrap()))
    };
    let per_token = run(Positions::PerToken(&cpu.upload(&pos).unwrap())).unwrap();
    let (i, o) = (cpu.upload(&indptr).unwrap(), cpu.upload(&offsets).unwrap());
    let by_offsets = run(Positions::Offsets {
        qo_indptr: &i,
        offsets: &o,
    })
    .unwrap();
    assert_eq!(per_token, by_offsets);
    // A qo_indptr that does not cover every token is refused on the CPU.
    for bad in [[0, 3, 3, 6], [1, 3, 3, 7], [0, 4, 3, 7]] {
        let b = cpu.upload(&bad).unwrap();
        let e = run(Positions::Offsets {
            qo_indptr: &b,
            offsets: &o,
        })
        .unwrap_err();
        assert!(e.to_string().contains("qo_indptr"), "{e}");
    }
}

#[test]
fn the_cos_sin_cache_gives_the_computed_rotation() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    for layout in [RopeLayout::NeoX, RopeLayout::GptJ] {
        let rope = Rope::new(Heads::new(4, 2, 16).unwrap(), 12, layout).unwrap();
        let f = Frequencies::llama31();
        let table = cache_of(f, 12, 50);
        let pos = [0i32, 49, 17, 3];
        let q: Vec<f16> = random(&mut rng, rope.q_len(4));
        let k: Vec<f16> = random(&mut rng, rope.k_len(4));
        let (mut qb, mut kb) = (cpu.upload(&q).unwrap(), cpu.upload(&k).unwrap());
        let c = cpu.upload(&table).unwrap();
        let p = cpu.upload(&pos).unwrap();
        rope::apply_in_place(
            &cpu,
            &rope,
            Angles::Cache(&c),
            Positions::PerToken(&p),
            QkMut {
                q: &mut qb,
                k: &mut kb,
            },
        )
        .unwrap();
        let want_pos: Vec<_> = pos.iter().map(|&p| Some(i64::from(p))).collect();
        let want = naive(&rope, 4, &want_pos, &computed(f, 12), &f64s(&q));
        let err = rel_l2(&ferrinfer_f32(&qb.to_vec().unwrap()), &want);
        assert!(err < 1e-3, "{layout:?}: {err:e}");
        // Position 50 is outside the 50-row cache: the error names the token.
        let bad = cpu.upload(&[0i32, 1, 50, 2]).unwrap();
        let e = rope::apply_in_place(
            &cpu,
            &rope,
            Angles::Cache(&c),
            Positions::PerToken(&bad),
            QkMut {
                q: &mut qb,
                k: &mut kb,
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("token 2") && e.to_string().contains("50"),
            "{e}"
        );
    }
}

fn ferrinfer_f32<T: Element>(xs: &[T]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

fn invalid(r: ferrinfer::Result<()>, needle: &str) {
    match r {
        Err(Error::InvalidInput(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected an invalid-input error naming {needle:?}, got {other:?}"),
    }
}

#[test]
fn every_bad_input_is_an_error_naming_it() {
    let heads = Heads::new(2, 1, 8).unwrap();
    for rd in [0, 3, 10] {
        let e = Rope::new(heads, rd, RopeLayout::NeoX).unwrap_err();
        assert!(e.to_string().contains(&format!("rotary_dim = {rd}")), "{e}");
    }
    for theta in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(Frequencies::new(theta).is_err());
    }
    let f = Frequencies::new(10_000.0).unwrap();
    for scale in [0.0, f32::NAN] {
        assert!(
            f.with_scale(scale)
                .unwrap_err()
                .to_string()
                .contains("scale")
        );
    }
    let good = Llama31::default();
    for bad in [
        Llama31 {
            factor: 0.0,
            ..good
        },
        Llama31 {
            high_freq_factor: 1.0,
            ..good
        },
        Llama31 {
            low_freq_factor: -1.0,
            ..good
        },
        Llama31 {
            original_max_position: 0,
            ..good
        },
    ] {
        assert!(
            f.with_llama31(bad)
                .unwrap_err()
                .to_string()
                .contains("Llama 3.1")
        );
    }

    let cpu = Backend::Cpu;
    let rope = Rope::new(heads, 8, RopeLayout::NeoX).unwrap();
    let z = bf16::from_f32(0.5);
    let angles = Angles::Computed(f);
    let pos = cpu.upload(&[0i32, 1, 2]).unwrap();
    let per_token = Positions::PerToken(&pos);
    let run = |q: usize, k: usize, positions: Positions<'_>, angles: Angles<'_>| {
        let (mut qb, mut kb) = (cpu.filled(q, z).unwrap(), cpu.filled(k, z).unwrap());
        rope::apply_in_place(
            &cpu,
            &rope,
            angles,
            positions,
            QkMut {
                q: &mut qb,
                k: &mut kb,
            },
        )
    };
    invalid(run(3 * 16 + 1, 3 * 8, per_token, angles), "q has 49");
    invalid(run(3 * 16, 3 * 8 + 8, per_token, angles), "k has 32");
    invalid(
        run(2 * 16, 2 * 8, per_token, angles),
        "positions has 3 entries for 2",
    );
    let (i, o) = (
        cpu.upload(&[0i32, 3]).unwrap(),
        cpu.upload(&[0i32, 0]).unwrap(),
    );
    invalid(
        run(
            3 * 16,
            3 * 8,
            Positions::Offsets {
                qo_indptr: &i,
                offsets: &o,
            },
            angles,
        ),
        "qo_indptr has 2 entries and offsets 2",
    );
    for len in [0, 12, 7] {
        let c = cpu.filled(len, 1.0f32).unwrap();
        invalid(
            run(3 * 16, 3 * 8, per_token, Angles::Cache(&c)),
            &format!("cos_sin cache has {len} elements"),
        );
    }
    // Outputs of the wrong length.
    let (q, k) = (
        cpu.filled(3 * 16, z).unwrap(),
        cpu.filled(3 * 8, z).unwrap(),
    );
    let (mut qo, mut ko) = (
        cpu.filled(3 * 16, z).unwrap(),
        cpu.filled(3 * 8 - 1, z).unwrap(),
    );
    invalid(
        rope::apply(
            &cpu,
            &rope,
            angles,
            per_token,
            Qk { q: &q, k: &k },
            QkMut {
                q: &mut qo,
                k: &mut ko,
            },
        ),
        "k_out has 23",
    );
    // An empty batch is fine.
    run(
        0,
        0,
        Positions::PerToken(&cpu.upload::<i32>(&[]).unwrap()),
        angles,
    )
    .unwrap();
}

// ---- GPU ----

fn gpu() -> Backend {
    Backend::cuda(0).expect("a CUDA GPU")
}

fn tolerance<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 1e-2,
        DType::F16 => 2e-3,
    }
}

/// Relative L2 over everything, and over every (token, head) row; NaN where `want` is NaN and
/// nowhere else.
fn check_rows<T: Element>(got: &[T], want: &[f64], d: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let got = ferrinfer_f32(got);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.is_nan(),
            w.is_nan(),
            "{what}: element {i} = {g}, want {w}"
        );
    }
    let keep = |xs: &[f32], ws: &[f64]| -> (Vec<f32>, Vec<f64>) {
        xs.iter()
            .zip(ws)
            .filter(|(_, w)| !w.is_nan())
            .map(|(&x, &w)| (x, w))
            .unzip()
    };
    let (g, w) = keep(&got, want);
    let err = rel_l2(&g, &w);
    assert!(err <= tolerance::<T>(), "{what}: relative L2 {err:.2e}");
    for (r, (gr, wr)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let (g, w) = keep(gr, wr);
        if w.iter().all(|&x| x == 0.0) {
            continue;
        }
        let err = rel_l2(&g, &w);
        assert!(
            err <= tolerance::<T>(),
            "{what}: row {r}: relative L2 {err:.2e}"
        );
    }
}

fn gpu_case<T: Element>(rng: &mut Rng, s: &Setup, in_place: bool, max_pos: usize, seed: u64) {
    let (gpu, rope, n) = (gpu(), &s.rope, s.tokens);
    let what = format!(
        "{:?} {rope:?} n {n} in place {in_place} (seed {seed})",
        T::DTYPE
    );
    let h = rope.heads();
    let q: Vec<T> = random(rng, rope.q_len(n));
    let k: Vec<T> = random(rng, rope.k_len(n));
    let mut pos: Vec<i32> = (0..n).map(|_| rng.below(max_pos) as i32).collect();
    if n > 1 {
        pos[n - 1] = (max_pos - 1) as i32;
    }
    let want_pos: Vec<Option<i64>> = pos.iter().map(|&p| Some(i64::from(p))).collect();
    let angles = computed(s.freqs, rope.rotary_dim());
    let want_q = naive(rope, h.num_qo_heads(), &want_pos, &angles, &f64s(&q));
    let want_k = naive(rope, h.num_kv_heads(), &want_pos, &angles, &f64s(&k));
    let p = gpu.upload(&pos).unwrap();
    let (qb, kb) = (gpu.upload(&q).unwrap(), gpu.upload(&k).unwrap());
    let (got_q, got_k) = if in_place {
        let (mut qb, mut kb) = (qb, kb);
        rope::apply_in_place(
            &gpu,
            rope,
            Angles::Computed(s.freqs),
            Positions::PerToken(&p),
            QkMut {
                q: &mut qb,
                k: &mut kb,
            },
        )
        .unwrap();
        (qb.to_vec().unwrap(), kb.to_vec().unwrap())
    } else {
        let mut qo = gpu.filled(q.len(), T::from_f32(f32::NAN)).unwrap();
        let mut ko = gpu.filled(k.len(), T::from_f32(f32::NAN)).unwrap();
        rope::apply(
            &gpu,
            rope,
            Angles::Computed(s.freqs),
            Positions::PerToken(&p),
            Qk { q: &qb, k: &kb },
            QkMut {
                q: &mut qo,
                k: &mut ko,
            },
        )
        .unwrap();
        (qo.to_vec().unwrap(), ko.to_vec().unwrap())
    };
    let d = h.head_dim() as usize;
    check_rows(&got_q, &want_q, d, &format!("q: {what}"));
    check_rows(&got_k, &want_k, d, &format!("k: {what}"));
    // Dims past rotary_dim: bit for bit the input (copied or untouched).
    let rd = rope.rotary_dim() as usize;
    for (got, x) in [(&got_q, &q), (&got_k, &k)] {
        for (g, x) in got.chunks(d).zip(x.chunks(d)) {
            for (a, b) in g[rd..].iter().zip(&x[rd..]) {
                assert_eq!(a.to_f32().to_bits(), b.to_f32().to_bits(), "{what}");
            }
        }
    }
}

fn gpu_rope<T: Element>() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for s in setups() {
        for tokens in [s.tokens, 1, 257] {
            let s = Setup { tokens, ..s };
            for in_place in [false, true] {
                gpu_case::<T>(&mut rng, &s, in_place, 4096, seed);
            }
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_rope_matches_the_naive_formula() {
    gpu_rope::<bf16>();
    gpu_rope::<f16>();
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_rope_is_accurate_at_large_positions() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for s in setups() {
        let s = Setup { tokens: 300, ..s };
        for max_pos in [1 << 20, i32::MAX as usize] {
            gpu_case::<f16>(&mut rng, &s, false, max_pos, seed);
            gpu_case::<bf16>(&mut rng, &s, true, max_pos, seed);
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_rope_empty_batch_is_a_no_op() {
    let gpu = gpu();
    let rope = Rope::new(Heads::new(4, 2, 128).unwrap(), 128, RopeLayout::NeoX).unwrap();
    let (mut q, mut k) = (
        gpu.upload::<bf16>(&[]).unwrap(),
        gpu.upload::<bf16>(&[]).unwrap(),
    );
    let p = gpu.upload::<i32>(&[]).unwrap();
    rope::apply_in_place(
        &gpu,
        &rope,
        Angles::Computed(Frequencies::llama31()),
        Positions::PerToken(&p),
        QkMut {
            q: &mut q,
            k: &mut k,
        },
    )
    .unwrap();
    gpu.synchronize().unwrap();
}

/// The cos/sin cache and per-request offsets on the GPU, with positions outside the cache and
/// tokens outside every request: their rotated dims are NaN, nothing else.
fn gpu_cache_and_offsets<T: Element>() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for layout in [RopeLayout::NeoX, RopeLayout::GptJ] {
        for (hq, hk, d, rd) in [(4, 2, 128, 128), (3, 3, 12, 4), (2, 1, 6, 6)] {
            let rope = Rope::new(Heads::new(hq, hk, d).unwrap(), rd, layout).unwrap();
            let f = Frequencies::new(10_000.0).unwrap();
            let rows = 300;
            let table = cache_of(f, rd, rows);
            let c = gpu.upload(&table).unwrap();
            let what = format!("{:?} {rope:?} (seed {seed})", T::DTYPE);
            let n = 41;
            let q: Vec<T> = random(&mut rng, rope.q_len(n));
            let k: Vec<T> = random(&mut rng, rope.k_len(n));
            // Requests cover tokens 0..37 only; request 1's offset runs past the cache.
            let indptr = [0i32, 10, 30, 30, 37];
            let offsets = [5i32, 290, 0, -3];
            let pos: Vec<Option<i64>> = (0..n as i64)
                .map(|t| {
                    let b = indptr
                        .windows(2)
                        .position(|w| i64::from(w[0]) <= t && t < i64::from(w[1]))?;
                    Some(i64::from(offsets[b]) + t - i64::from(indptr[b]))
                })
                .collect();
            let angles = cached(&table, rd);
            let want_q = naive(&rope, hq, &pos, &angles, &f64s(&q));
            let want_k = naive(&rope, hk, &pos, &angles, &f64s(&k));
            let (qb, kb) = (gpu.upload(&q).unwrap(), gpu.upload(&k).unwrap());
            let mut qo = gpu.filled(q.len(), T::from_f32(f32::NAN)).unwrap();
            let mut ko = gpu.filled(k.len(), T::from_f32(f32::NAN)).unwrap();
            let (i, o) = (gpu.upload(&indptr).unwrap(), gpu.upload(&offsets).unwrap());
            rope::apply(
                &gpu,
                &rope,
                Angles::Cache(&c),
                Positions::Offsets {
                    qo_indptr: &i,
                    offsets: &o,
                },
                Qk { q: &qb, k: &kb },
                QkMut {
                    q: &mut qo,
                    k: &mut ko,
                },
            )
            .unwrap();
            check_rows(&qo.to_vec().unwrap(), &want_q, d as usize, &what);
            check_rows(&ko.to_vec().unwrap(), &want_k, d as usize, &what);
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_rope_cos_sin_cache_and_offsets_match_and_mark_bad_positions() {
    gpu_cache_and_offsets::<bf16>();
    gpu_cache_and_offsets::<f16>();
}
