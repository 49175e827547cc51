//! Sampling: exact tests (never a token outside the top-k / top-p / min-p set, a seed reproduces a
//! run, every call draws fresh numbers, bad rows and parameters) and statistical ones (chi-square
//! of sampled frequencies against the target renormalised within the allowed set, with a bound a
//! biased sampler fails). The CPU backend in CI; the same checks on the GPU in `gpu_*`.

use ferrinfer::Error;
use ferrinfer::ops::sampling::{
    self, Filter, Param, RowDraws, SampleShape, SamplerState, philox4x32_10,
};
use ferrinfer::prelude::*;
use ferrinfer_testkit::Rng;

/// Which filters a test case applies (scalars), and whether the input is logits.
#[derive(Clone, Copy, Debug)]
struct Case {
    logits: bool,
    temperature: f32,
    top_k: Option<i32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
}

const PLAIN: Case = Case {
    logits: false,
    temperature: 1.0,
    top_k: None,
    top_p: None,
    min_p: None,
};

impl Case {
    fn filter(&self) -> Filter<'static> {
        let mut f = Filter::none();
        if let Some(k) = self.top_k {
            f = f.top_k(Param::All(k));
        }
        if let Some(p) = self.top_p {
            f = f.top_p(Param::All(p));
        }
        if let Some(p) = self.min_p {
            f = f.min_p(Param::All(p));
        }
        f
    }
}

/// The target distribution of one row by the naive formula: softmax (logits) or the weights
/// themselves, top-k by sorting, then top-p (smallest prefix of the sorted weights whose mass
/// reaches p, ties kept) or min-p; renormalised. `None` where no token has weight.
fn target(x: &[f32], c: &Case) -> Vec<f64> {
    let n = x.len();
    let w: Vec<f64> = if c.logits {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        x.iter()
            .map(|&l| ((f64::from(l) - f64::from(m)) / f64::from(c.temperature)).exp())
            .collect()
    } else {
        x.iter().map(|&p| f64::from(p.max(0.0))).collect()
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
    let mut keep = vec![true; n];
    if let Some(k) = c.top_k {
        let kth = x[order[k as usize - 1]];
        for i in 0..n {
            keep[i] = x[i] >= kth;
        }
    }
    let kept_mass: f64 = (0..n).filter(|&i| keep[i]).map(|i| w[i]).sum();
    if let Some(p) = c.top_p {
        let mut above = 0.0;
        let mut i = 0;
        let sorted: Vec<usize> = order.iter().copied().filter(|&i| keep[i]).collect();
        while i < sorted.len() {
            let mut j = i;
            while j < sorted.len() && w[sorted[j]] == w[sorted[i]] {
                j += 1;
            }
            let inside = above < f64::from(p) * kept_mass || above == 0.0;
            for &t in &sorted[i..j] {
                keep[t] = inside;
            }
            above += sorted[i..j].iter().map(|&t| w[t]).sum::<f64>();
            i = j;
        }
    }
    if let Some(mp) = c.min_p {
        let top = (0..n)
            .filter(|&i| keep[i])
            .map(|i| w[i])
            .fold(0.0, f64::max);
        for i in 0..n {
            keep[i] &= w[i] >= f64::from(mp) * top;
        }
    }
    let z: f64 = (0..n).filter(|&i| keep[i]).map(|i| w[i]).sum();
    (0..n)
        .map(|i| if keep[i] { w[i] / z } else { 0.0 })
        .collect()
}

/// Draw one token for each of `rows` rows of `vocab` (the row data repeated or given whole).
fn draw(
    backend: &Backend,
    state: &mut SamplerState,
    x: &[f32],
    vocab: u32,
    c: &Case,
) -> ferrinfer::Result<Vec<i32>> {
    let batch = (x.len() / vocab as usize) as u32;
    let shape = SampleShape::new(batch, vocab)?;
    let xd = backend.upload(x)?;
    let mut out = backend.filled(batch as usize, -7i32)?;
    let f = c.filter();
    if c.logits {
        sampling::sample_from_logits(
            backend,
            state,
            shape,
            &xd,
            Param::All(c.temperature),
            &f,
            &mut out,
        )?;
    } else {
        sampling::sample_from_probs(backend, state, shape, &xd, &f, &mut out)?;
    }
    out.to_vec()
}

/// Chi-square statistic of `counts` against `p` (categories with expectation < 5 pooled), and
/// its degrees of freedom. A token of probability 0 that was drawn makes it infinite.
fn chi_square(counts: &[u64], p: &[f64]) -> (f64, usize) {
    let total: u64 = counts.iter().sum();
    let (mut stat, mut df) = (0.0, 0usize);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (&o, &q) in counts.iter().zip(p) {
        let e = q * total as f64;
        if q == 0.0 {
            if o > 0 {
                return (f64::INFINITY, 1);
            }
            continue;
        }
        if e < 5.0 {
            pool_o += o as f64;
            pool_e += e;
            continue;
        }
        stat += (o as f64 - e).powi(2) / e;
        df += 1;
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e.max(1e-12);
        df += 1;
    }
    (stat, df.saturating_sub(1).max(1))
}

/// The chi-square value with upper tail 1e-6 for `df` degrees of freedom (Wilson-Hilferty).
fn chi_square_bound(df: usize) -> f64 {
    let d = df as f64;
    let z = 4.753; // one-sided normal quantile of 1e-6
    let h = 2.0 / (9.0 * d);
    d * (1.0 - h + z * h.sqrt()).powi(3)
}

fn counts(tokens: &[i32], vocab: usize) -> Vec<u64> {
    let mut c = vec![0u64; vocab];
    for &t in tokens {
        assert!(
            (0..vocab as i32).contains(&t),
            "token {t} outside 0..{vocab}"
        );
        c[t as usize] += 1;
    }
    c
}

/// A skewed distribution on `vocab` tokens: weights 1/(i+1)^1.3 in a shuffled order, two tokens
/// of exactly equal weight, and one zero.
fn skewed(rng: &mut Rng, vocab: usize) -> Vec<f32> {
    let mut w: Vec<f32> = (0..vocab)
        .map(|i| 1.0 / ((i + 1) as f32).powf(1.3))
        .collect();
    w[vocab - 1] = 0.0;
    w[3] = w[2];
    rng.shuffle(&mut w);
    let z: f32 = w.iter().sum();
    w.iter().map(|x| x / z).collect()
}

fn stat_cases() -> Vec<Case> {
    vec![
        PLAIN,
        Case {
            top_k: Some(5),
            ..PLAIN
        },
        Case {
            top_p: Some(0.7),
            ..PLAIN
        },
        Case {
            min_p: Some(0.15),
            ..PLAIN
        },
        Case {
            top_k: Some(8),
            top_p: Some(0.8),
            ..PLAIN
        },
        Case {
            logits: true,
            temperature: 0.7,
            ..PLAIN
        },
        Case {
            logits: true,
            temperature: 1.5,
            top_k: Some(6),
            top_p: Some(0.9),
            ..PLAIN
        },
        Case {
            logits: true,
            temperature: 1.0,
            min_p: Some(0.05),
            ..PLAIN
        },
    ]
}

/// Every statistical case on `backend`: `draws` rows of one skewed distribution per call.
fn frequencies_match_the_target(backend: &Backend, draws: usize) {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for vocab in [8usize, 40] {
        let p = skewed(&mut rng, vocab);
        for c in stat_cases() {
            let x: Vec<f32> = if c.logits {
                p.iter().map(|&q| (q + 1e-3).ln() * 1.3).collect()
            } else {
                p.clone()
            };
            let want = target(&x, &c);
            let mut state = SamplerState::new(backend, seed).unwrap();
            let rows: Vec<f32> = x.iter().copied().cycle().take(vocab * draws).collect();
            let tokens = draw(backend, &mut state, &rows, vocab as u32, &c).unwrap();
            let got = counts(&tokens, vocab);
            let (stat, df) = chi_square(&got, &want);
            assert!(
                stat <= chi_square_bound(df),
                "{c:?} vocab {vocab}: chi-square {stat:.1} > {:.1} (df {df}, seed {seed})\n\
                 counts {got:?}\nwant {want:?}",
                chi_square_bound(df)
            );
        }
    }
}

#[test]
fn cpu_frequencies_match_the_target() {
    frequencies_match_the_target(&Backend::Cpu, 20_000);
}

#[test]
fn the_chi_square_check_fails_biased_samplers() {
    let mut rng = Rng::from_time();
    let p = skewed(&mut rng, 16);
    let mut state = SamplerState::new(&Backend::Cpu, rng.next_u64()).unwrap();
    let rows: Vec<f32> = p.iter().copied().cycle().take(16 * 20_000).collect();
    let tokens = draw(&Backend::Cpu, &mut state, &rows, 16, &PLAIN).unwrap();
    let want = target(&p, &PLAIN);
    let (stat, df) = chi_square(&counts(&tokens, 16), &want);
    assert!(stat <= chi_square_bound(df), "the right sampler: {stat}");
    // Off by one: every token reported as its neighbour.
    let shifted: Vec<i32> = tokens.iter().map(|&t| (t + 1) % 16).collect();
    let (stat, df) = chi_square(&counts(&shifted, 16), &want);
    assert!(stat > chi_square_bound(df), "off by one passed: {stat}");
    // A 25% bias on the largest token.
    let top = (0..16).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
    let mut biased = p.clone();
    biased[top] *= 1.25;
    let rows: Vec<f32> = biased.iter().copied().cycle().take(16 * 20_000).collect();
    let tokens = draw(&Backend::Cpu, &mut state, &rows, 16, &PLAIN).unwrap();
    let (stat, df) = chi_square(&counts(&tokens, 16), &want);
    assert!(stat > chi_square_bound(df), "a 25% bias passed: {stat}");
    // Top-k that keeps one token too many.
    let c = Case {
        top_k: Some(6),
        ..PLAIN
    };
    let tokens = draw(&Backend::Cpu, &mut state, &rows, 16, &c).unwrap();
    let five = Case {
        top_k: Some(5),
        ..PLAIN
    };
    let (stat, _) = chi_square(&counts(&tokens, 16), &target(&biased, &five));
    assert!(stat.is_infinite(), "a token outside top-5 was not caught");
}

/// Random rows (softmax of normal x 2, or the logits themselves) with ties and zeros mixed in.
fn random_rows(rng: &mut Rng, batch: usize, vocab: usize, logits: bool) -> Vec<f32> {
    let mut x = Vec::with_capacity(batch * vocab);
    for _ in 0..batch {
        let l: Vec<f32> = (0..vocab).map(|_| 2.0 * rng.normal()).collect();
        if logits {
            x.extend(l);
        } else {
            let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = l.iter().map(|v| (v - m).exp()).collect();
            let z: f32 = e.iter().sum();
            x.extend(e.iter().map(|v| v / z));
        }
    }
    x
}

fn exact_cases() -> Vec<Case> {
    let mut cases = stat_cases();
    cases.extend([
        Case {
            top_k: Some(1),
            ..PLAIN
        },
        Case {
            top_p: Some(0.05),
            ..PLAIN
        },
        Case {
            top_p: Some(1.0),
            ..PLAIN
        },
        Case {
            min_p: Some(1.0),
            ..PLAIN
        },
        Case {
            logits: true,
            temperature: 0.3,
            top_k: Some(3),
            ..PLAIN
        },
        Case {
            logits: true,
            temperature: 2.0,
            top_p: Some(0.5),
            ..PLAIN
        },
    ]);
    cases
}

/// Every drawn token has positive target probability (the allowed set by the naive formula).
fn tokens_stay_in_the_allowed_set(backend: &Backend, vocabs: &[usize], batch: usize) {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for &vocab in vocabs {
        for c in exact_cases() {
            let c = Case {
                top_k: c.top_k.map(|k| k.min(vocab as i32)),
                ..c
            };
            let x = random_rows(&mut rng, batch, vocab, c.logits);
            let mut state = SamplerState::new(backend, rng.next_u64()).unwrap();
            let tokens = draw(backend, &mut state, &x, vocab as u32, &c).unwrap();
            for (r, &t) in tokens.iter().enumerate() {
                let row = &x[r * vocab..(r + 1) * vocab];
                let want = target(row, &c);
                assert!(
                    (0..vocab as i32).contains(&t) && want[t as usize] > 0.0,
                    "{c:?} vocab {vocab} row {r}: token {t} is outside the allowed set (seed {seed})"
                );
            }
        }
    }
}

#[test]
fn cpu_tokens_stay_in_the_allowed_set() {
    tokens_stay_in_the_allowed_set(&Backend::Cpu, &[1, 7, 50, 301], 60);
}

/// A seed reproduces a run; the offset advances on every call, so calls draw fresh numbers.
fn seeds_reproduce_and_offsets_advance(backend: &Backend) {
    let mut rng = Rng::from_time();
    let vocab = 1000;
    let x = random_rows(&mut rng, 64, vocab, false);
    let seed = rng.next_u64();
    let c = Case {
        top_p: Some(0.95),
        ..PLAIN
    };
    let mut a = SamplerState::new(backend, seed).unwrap();
    let mut b = SamplerState::new(backend, seed).unwrap();
    let a1 = draw(backend, &mut a, &x, vocab as u32, &c).unwrap();
    let a2 = draw(backend, &mut a, &x, vocab as u32, &c).unwrap();
    let b1 = draw(backend, &mut b, &x, vocab as u32, &c).unwrap();
    let b2 = draw(backend, &mut b, &x, vocab as u32, &c).unwrap();
    assert_eq!((&a1, &a2), (&b1, &b2), "seed {seed} did not reproduce");
    assert_ne!(a1, a2, "two calls drew the same tokens (seed {seed})");
    assert_eq!(a.read().unwrap(), (seed, 2));
    a.reset(seed).unwrap();
    assert_eq!(draw(backend, &mut a, &x, vocab as u32, &c).unwrap(), a1);
    let mut other = SamplerState::new(backend, seed ^ 1).unwrap();
    assert_ne!(draw(backend, &mut other, &x, vocab as u32, &c).unwrap(), a1);
}

#[test]
fn cpu_seeds_reproduce_and_offsets_advance() {
    seeds_reproduce_and_offsets_advance(&Backend::Cpu);
}

#[test]
fn cpu_draw_is_the_race_over_philox_uniforms() {
    // Plain sampling is the argmax of w / -ln(u) over Philox words (token t: word t % 4 of the
    // block at counter (t / 4, row, offset)): recomputed here from philox4x32_10 directly.
    let mut rng = Rng::from_time();
    let (vocab, batch) = (37usize, 20usize);
    let x = random_rows(&mut rng, batch, vocab, false);
    let seed = rng.next_u64();
    let mut state = SamplerState::new(&Backend::Cpu, seed).unwrap();
    draw(&Backend::Cpu, &mut state, &x, vocab as u32, &PLAIN).unwrap();
    let tokens = draw(&Backend::Cpu, &mut state, &x, vocab as u32, &PLAIN).unwrap();
    for (r, &t) in tokens.iter().enumerate() {
        let key = |i: usize| {
            let block = philox4x32_10(
                [(i / 4) as u32, r as u32, 1, 0],
                [seed as u32, (seed >> 32) as u32],
            );
            let u = ((block[i % 4] >> 9) * 2 + 1) as f64 / f64::from(1u32 << 24);
            assert_eq!(
                u,
                f64::from(RowDraws::new(seed, 1, r as u32).token_uniform(i as u32))
            );
            f64::from(x[r * vocab + i]) / -u.ln()
        };
        let want = (0..vocab)
            .max_by(|&a, &b| key(a).total_cmp(&key(b)).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(t as usize, want, "row {r}");
    }
}

/// Rows without a positive weight give token 0; NaN, negative and infinite entries never win.
fn bad_rows_have_defined_results(backend: &Backend) {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let probs = [
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [nan, nan, nan, nan, nan],
        [nan, -1.0, inf, 0.5, 0.0],
        [-0.0, 0.0, -3.0, 0.0, 2.0],
    ]
    .concat();
    for c in [
        PLAIN,
        Case {
            top_k: Some(2),
            ..PLAIN
        },
        Case {
            top_p: Some(0.5),
            ..PLAIN
        },
        Case {
            min_p: Some(0.5),
            ..PLAIN
        },
    ] {
        let mut s = SamplerState::new(backend, 3).unwrap();
        assert_eq!(
            draw(backend, &mut s, &probs, 5, &c).unwrap(),
            [0, 0, 3, 4],
            "{c:?}"
        );
    }
    let logits = [
        [f32::NEG_INFINITY; 4],
        [nan, inf, -inf, 1.0],
        [nan, nan, nan, nan],
    ]
    .concat();
    let c = Case {
        logits: true,
        ..PLAIN
    };
    let mut s = SamplerState::new(backend, 3).unwrap();
    assert_eq!(draw(backend, &mut s, &logits, 4, &c).unwrap(), [0, 3, 0]);
}

#[test]
fn cpu_bad_rows_have_defined_results() {
    bad_rows_have_defined_results(&Backend::Cpu);
}

/// Per-request parameters, bad values included: the kernel clamps them.
fn per_request_parameters_are_clamped(backend: &Backend) {
    let vocab = 6u32;
    // Strictly decreasing weights: top-1 is token 0, top-2 is {0, 1}.
    let row = [0.4f32, 0.25, 0.15, 0.1, 0.06, 0.04];
    let batch = 8;
    let x: Vec<f32> = row.iter().copied().cycle().take(6 * batch).collect();
    let shape = SampleShape::new(batch as u32, vocab).unwrap();
    let xd = backend.upload(&x).unwrap();
    let ks = backend.upload(&[0, -5, 1, 2, 6, 100, i32::MIN, 1]).unwrap();
    let ps = backend
        .upload(&[f32::NAN, -1.0, 0.0, 0.3, 2.0, 1e-30, 0.5, 1.0])
        .unwrap();
    for _ in 0..20 {
        let mut state = SamplerState::new(backend, 77).unwrap();
        let mut out = backend.filled(batch, -7i32).unwrap();
        let f = Filter::none().top_k(Param::PerRequest(&ks));
        sampling::sample_from_probs(backend, &mut state, shape, &xd, &f, &mut out).unwrap();
        let t = out.to_vec().unwrap();
        for (r, k) in [1usize, 1, 1, 2, 6, 6, 1, 1].into_iter().enumerate() {
            assert!(
                (t[r] as usize) < k,
                "row {r}: token {} outside top-{k}",
                t[r]
            );
        }
        let f = Filter::none().top_p(Param::PerRequest(&ps));
        sampling::sample_from_probs(backend, &mut state, shape, &xd, &f, &mut out).unwrap();
        let t = out.to_vec().unwrap();
        // NaN: no filter; <= 0, tiny and 0.3 (< 0.4): only the largest; 0.5: {0, 1}; >= 1: all.
        for (r, k) in [6usize, 1, 1, 1, 6, 1, 2, 6].into_iter().enumerate() {
            assert!(
                (t[r] as usize) < k,
                "row {r}: token {} outside top-p set",
                t[r]
            );
        }
    }
    let temps = backend
        .upload(&[0.0, f32::NAN, -1.0, f32::INFINITY, 1e-30, 1.0, 1e-6, 2.0])
        .unwrap();
    let logits: Vec<f32> = x.iter().map(|p| p.ln()).collect();
    let ld = backend.upload(&logits).unwrap();
    let mut state = SamplerState::new(backend, 5).unwrap();
    let mut out = backend.filled(batch, -7i32).unwrap();
    sampling::sample_from_logits(
        backend,
        &mut state,
        shape,
        &ld,
        Param::PerRequest(&temps),
        &Filter::none(),
        &mut out,
    )
    .unwrap();
    let t = out.to_vec().unwrap();
    assert!(t.iter().all(|&t| (0..6).contains(&t)), "{t:?}");
    // A tiny temperature is greedy.
    assert_eq!((t[4], t[6]), (0, 0));
}

#[test]
fn cpu_per_request_parameters_are_clamped() {
    per_request_parameters_are_clamped(&Backend::Cpu);
}

/// Near-flat rows with one largest weight and a tiny p keep only that token: through the GPU's
/// radix select by mass (top-p alone), and through its rejection over race candidates (top-p after
/// a top-k of all but one token), which on 128K flat tokens shrinks the set about fivefold a round
/// and so often runs out of rounds and falls back to the radix select: every path must give the
/// largest token on every row.
fn tiny_top_p_keeps_the_largest(backend: &Backend, vocab: usize, batch: usize) {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for logits in [false, true] {
        let mut x = Vec::with_capacity(batch * vocab);
        let mut top = Vec::with_capacity(batch);
        for _ in 0..batch {
            let row: Vec<f32> = (0..vocab).map(|_| 1.0 + 0.01 * rng.uniform()).collect();
            let t = (rng.next_u64() % vocab as u64) as usize;
            let at = x.len() + t;
            x.extend(row);
            x[at] = 1.5;
            top.push(t as i32);
        }
        if !logits {
            for row in x.chunks_mut(vocab) {
                let z: f32 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= z);
            }
        }
        for top_k in [None, Some(vocab as i32 - 1)] {
            let c = Case {
                logits,
                top_k,
                top_p: Some(1e-7),
                ..PLAIN
            };
            let mut state = SamplerState::new(backend, rng.next_u64()).unwrap();
            for call in 0..3 {
                let got = draw(backend, &mut state, &x, vocab as u32, &c).unwrap();
                assert_eq!(got, top, "{c:?} call {call} (seed {seed})");
            }
        }
    }
}

#[test]
fn cpu_tiny_top_p_keeps_the_largest() {
    tiny_top_p_keeps_the_largest(&Backend::Cpu, 5000, 3);
}

fn invalid(r: ferrinfer::Result<()>) -> String {
    match r {
        Err(Error::InvalidInput(m)) => m,
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[test]
fn bad_arguments_are_errors_that_name_them() {
    let b = Backend::Cpu;
    assert!(invalid(SampleShape::new(2, 0).map(|_| ())).contains("vocab = 0"));
    assert!(invalid(SampleShape::new(2, (1 << 30) + 1).map(|_| ())).contains("vocab"));
    assert!(invalid(SampleShape::new(1 << 31, 4).map(|_| ())).contains("batch"));
    let shape = SampleShape::new(2, 4).unwrap();
    let x = b.filled(8, 0.25f32).unwrap();
    let short = b.filled(7, 0.25f32).unwrap();
    let mut out = b.filled(2, 0i32).unwrap();
    let mut short_out = b.filled(3, 0i32).unwrap();
    let mut s = SamplerState::new(&b, 1).unwrap();
    let probs = |s: &mut SamplerState, x: &Buffer<f32>, f: &Filter, out: &mut Buffer<i32>| {
        sampling::sample_from_probs(&b, s, shape, x, f, out)
    };
    let none = Filter::none();
    assert!(invalid(probs(&mut s, &short, &none, &mut out)).contains("probs has 7 elements"));
    assert!(invalid(probs(&mut s, &x, &none, &mut short_out)).contains("tokens has 3"));
    for (f, needle) in [
        (Filter::none().top_k(Param::All(0)), "top_k = 0"),
        (Filter::none().top_k(Param::All(5)), "top_k = 5"),
        (Filter::none().top_p(Param::All(0.0)), "top_p = 0"),
        (Filter::none().top_p(Param::All(1.5)), "top_p = 1.5"),
        (Filter::none().top_p(Param::All(f32::NAN)), "top_p = NaN"),
        (Filter::none().min_p(Param::All(-0.1)), "min_p = -0.1"),
        (Filter::none().min_p(Param::All(f32::NAN)), "min_p = NaN"),
        (
            Filter::none().top_p(Param::All(0.5)).min_p(Param::All(0.1)),
            "top-p and min-p",
        ),
    ] {
        let m = invalid(probs(&mut s, &x, &f, &mut out));
        assert!(m.contains(needle), "{m}");
    }
    let three = b.filled(3, 1i32).unwrap();
    let m = invalid(probs(
        &mut s,
        &x,
        &Filter::none().top_k(Param::PerRequest(&three)),
        &mut out,
    ));
    assert!(m.contains("top_k has 3 values"), "{m}");
    for t in [0.0, -1.0, f32::INFINITY, f32::NAN] {
        let m = invalid(sampling::sample_from_logits(
            &b,
            &mut s,
            shape,
            &x,
            Param::All(t),
            &none,
            &mut out,
        ));
        assert!(m.contains("temperature"), "{m}");
    }
    // Nothing was drawn by the refused calls.
    assert_eq!(s.read().unwrap(), (1, 0));
    // An empty batch draws nothing and leaves the offset.
    let empty = SampleShape::new(0, 4).unwrap();
    let (e, mut eo) = (b.filled(0, 0.0f32).unwrap(), b.filled(0, 0i32).unwrap());
    sampling::sample_from_probs(&b, &mut s, empty, &e, &none, &mut eo).unwrap();
    assert_eq!(s.read().unwrap(), (1, 0));
}

// ---- GPU ----

fn gpu() -> Backend {
    Backend::cuda(0).expect("a CUDA GPU")
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_frequencies_match_the_target() {
    frequencies_match_the_target(&gpu(), 100_000);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_tokens_stay_in_the_allowed_set() {
    // Odd sizes (vector widths 1 and 2), a 16-byte multiple, and large vocabularies.
    tokens_stay_in_the_allowed_set(&gpu(), &[1, 7, 50, 301, 4096, 5003], 40);
    tokens_stay_in_the_allowed_set(&gpu(), &[128_256], 4);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_tiny_top_p_keeps_the_largest() {
    tiny_top_p_keeps_the_largest(&gpu(), 128_256, 32);
    tiny_top_p_keeps_the_largest(&gpu(), 301, 64);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_seeds_reproduce_and_offsets_advance() {
    seeds_reproduce_and_offsets_advance(&gpu());
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_bad_rows_have_defined_results() {
    bad_rows_have_defined_results(&gpu());
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_per_request_parameters_are_clamped() {
    per_request_parameters_are_clamped(&gpu());
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_draws_match_the_cpu_with_one_seed() {
    // The same Philox uniforms on both: the tokens agree except where two keys (or a weight and a
    // filter threshold) are within f32 rounding, which random rows make rare.
    let g = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for vocab in [5usize, 64, 1001, 32_000, 128_256] {
        let batch = if vocab > 10_000 { 16 } else { 200 };
        for c in exact_cases() {
            let c = Case {
                top_k: c.top_k.map(|k| k.min(vocab as i32)),
                ..c
            };
            let x = random_rows(&mut rng, batch, vocab, c.logits);
            let s = rng.next_u64();
            let mut sg = SamplerState::new(&g, s).unwrap();
            let mut sc = SamplerState::new(&Backend::Cpu, s).unwrap();
            for call in 0..2 {
                let tg = draw(&g, &mut sg, &x, vocab as u32, &c).unwrap();
                let tc = draw(&Backend::Cpu, &mut sc, &x, vocab as u32, &c).unwrap();
                let differ = tg.iter().zip(&tc).filter(|(a, b)| a != b).count();
                assert!(
                    differ * 100 <= batch,
                    "{c:?} vocab {vocab} call {call}: {differ} of {batch} rows differ \
                     (seed {seed})\ngpu {tg:?}\ncpu {tc:?}"
                );
            }
            assert_eq!(sg.read().unwrap(), (s, 2));
        }
    }
}

// ---- Row transforms ----

mod transforms {
    use super::*;
    use ferrinfer::ops::sampling::transform;

    /// Naive f64 references: softmax, and top-k / top-p renormalisation and top-k masking by
    /// sorting.
    fn softmax_ref(x: &[f32], t: f64) -> Vec<f64> {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = x
            .iter()
            .map(|&v| ((f64::from(v) - f64::from(m)) / t).exp())
            .collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    }

    fn renorm_ref(x: &[f32], keep: impl Fn(usize) -> bool) -> Vec<f64> {
        let z: f64 = (0..x.len())
            .filter(|&i| keep(i))
            .map(|i| f64::from(x[i]))
            .sum();
        (0..x.len())
            .map(|i| if keep(i) { f64::from(x[i]) / z } else { 0.0 })
            .collect()
    }

    fn kth(x: &[f32], k: usize) -> f32 {
        let mut s = x.to_vec();
        s.sort_by(|a, b| b.total_cmp(a));
        s[k - 1]
    }

    /// Zeros and -inf (what a filter removes) must match exactly; the rest within a relative L2
    /// error of 1e-5 for the row (f32 arithmetic on the GPU: the exponent's argument alone is
    /// rounded relative to its size).
    fn close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let (mut err, mut norm) = (0.0, 0.0);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if w == 0.0 || w.is_infinite() {
                assert!(f64::from(g) == w, "{what}: [{i}] = {g}, want {w}");
            } else {
                assert!(g.is_finite(), "{what}: [{i}] = {g}, want {w}");
                err += (f64::from(g) - w).powi(2);
                norm += w * w;
            }
        }
        let rel = (err / norm.max(1e-300)).sqrt();
        assert!(rel <= 1e-5, "{what}: relative L2 error {rel:e}");
    }

    /// Every transform on `backend` against the naive references, odd and round sizes, scalars
    /// and per-request arrays.
    pub(super) fn transforms_match_the_naive_formulas(backend: &Backend, vocabs: &[usize]) {
        let mut rng = Rng::from_time();
        let seed = rng.seed();
        let batch = 6usize;
        for &vocab in vocabs {
            let shape = SampleShape::new(batch as u32, vocab as u32).unwrap();
            let what = |op: &str| format!("{op} vocab {vocab} (seed {seed})");
            let logits = random_rows(&mut rng, batch, vocab, true);
            let probs = random_rows(&mut rng, batch, vocab, false);
            let (ld, pd) = (
                backend.upload(&logits).unwrap(),
                backend.upload(&probs).unwrap(),
            );
            let mut out = backend.filled(batch * vocab, f32::NAN).unwrap();
            let temps = [0.5f32, 1.0, 2.0, 0.1, 1.7, 1.0];
            let td = backend.upload(&temps).unwrap();
            transform::softmax(backend, shape, &ld, Param::PerRequest(&td), &mut out).unwrap();
            let got = out.to_vec().unwrap();
            for r in 0..batch {
                let want = softmax_ref(&logits[r * vocab..(r + 1) * vocab], f64::from(temps[r]));
                close(&got[r * vocab..(r + 1) * vocab], &want, &what("softmax"));
            }
            let ks: Vec<i32> = (0..batch).map(|r| 1 + (r * 7 % vocab) as i32).collect();
            let kd = backend.upload(&ks).unwrap();
            let mut out = backend.filled(batch * vocab, f32::NAN).unwrap();
            transform::top_k_renorm_probs(backend, shape, &pd, Param::PerRequest(&kd), &mut out)
                .unwrap();
            let got = out.to_vec().unwrap();
            for r in 0..batch {
                let row = &probs[r * vocab..(r + 1) * vocab];
                let t = kth(row, ks[r] as usize);
                let want = renorm_ref(row, |i| row[i] >= t);
                close(
                    &got[r * vocab..(r + 1) * vocab],
                    &want,
                    &what("top-k renorm"),
                );
            }
            let mut out = backend.filled(batch * vocab, f32::NAN).unwrap();
            transform::top_k_mask_logits(backend, shape, &ld, Param::PerRequest(&kd), &mut out)
                .unwrap();
            let got = out.to_vec().unwrap();
            for r in 0..batch {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let t = kth(row, ks[r] as usize);
                let want: Vec<f64> = row
                    .iter()
                    .map(|&v| {
                        if v >= t {
                            f64::from(v)
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                close(&got[r * vocab..(r + 1) * vocab], &want, &what("top-k mask"));
            }
            for p in [0.05f32, 0.5, 0.9, 1.0] {
                let mut out = backend.filled(batch * vocab, f32::NAN).unwrap();
                transform::top_p_renorm_probs(backend, shape, &pd, Param::All(p), &mut out)
                    .unwrap();
                let got = out.to_vec().unwrap();
                for r in 0..batch {
                    let row = &probs[r * vocab..(r + 1) * vocab];
                    let set = target(
                        row,
                        &Case {
                            top_p: Some(p),
                            ..PLAIN
                        },
                    );
                    let want = renorm_ref(row, |i| set[i] > 0.0);
                    close(
                        &got[r * vocab..(r + 1) * vocab],
                        &want,
                        &what("top-p renorm"),
                    );
                }
            }
        }
    }

    #[test]
    fn cpu_transforms_match_the_naive_formulas() {
        transforms_match_the_naive_formulas(&Backend::Cpu, &[1, 7, 64, 1001]);
    }

    #[test]
    fn transforms_handle_bad_rows_and_arguments() {
        let b = Backend::Cpu;
        let shape = SampleShape::new(2, 4).unwrap();
        let nan = f32::NAN;
        let x = b
            .upload(&[
                nan,
                f32::INFINITY,
                1.0,
                -0.0,
                f32::NEG_INFINITY,
                nan,
                nan,
                nan,
            ])
            .unwrap();
        let mut out = b.filled(8, 5.0f32).unwrap();
        transform::softmax(&b, shape, &x, Param::All(1.0), &mut out).unwrap();
        assert_eq!(
            out.to_vec().unwrap()[..4]
                .iter()
                .filter(|&&v| v > 0.0)
                .count(),
            2
        );
        assert_eq!(&out.to_vec().unwrap()[4..], &[0.0; 4]);
        transform::top_k_renorm_probs(&b, shape, &x, Param::All(1), &mut out).unwrap();
        assert_eq!(
            out.to_vec().unwrap(),
            [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        transform::top_k_mask_logits(&b, shape, &x, Param::All(2), &mut out).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            out.to_vec().unwrap(),
            [inf, inf, 1.0, 0.0, inf, inf, inf, inf]
        );
        let m = invalid(transform::top_k_mask_logits(
            &b,
            shape,
            &x,
            Param::All(5),
            &mut out,
        ));
        assert!(m.contains("top_k = 5"), "{m}");
        let m = invalid(transform::top_p_renorm_probs(
            &b,
            shape,
            &x,
            Param::All(0.0),
            &mut out,
        ));
        assert!(m.contains("top_p = 0"), "{m}");
        let m = invalid(transform::softmax(
            &b,
            shape,
            &x,
            Param::All(-1.0),
            &mut out,
        ));
        assert!(m.contains("temperature = -1"), "{m}");
        let mut short = b.filled(7, 0.0f32).unwrap();
        let m = invalid(transform::softmax(
            &b,
            shape,
            &x,
            Param::All(1.0),
            &mut short,
        ));
        assert!(m.contains("out has 7 elements"), "{m}");
    }

    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_transforms_match_the_naive_formulas() {
        transforms_match_the_naive_formulas(&gpu(), &[1, 7, 64, 1001, 4096, 128_256]);
    }
}

// ---- Chain speculative sampling ----

mod speculative {
    use super::*;
    use ferrinfer::ops::sampling::speculative::{self as spec, SpecShape};

    struct Step {
        tokens: Vec<i32>,
        accepted: Vec<i32>,
        emitted: Vec<i32>,
    }

    fn step(
        backend: &Backend,
        state: &mut SamplerState,
        shape: SpecShape,
        draft: &[f32],
        ids: &[i32],
        target: &[f32],
    ) -> Step {
        let b = shape.batch() as usize;
        let n = shape.n() as usize;
        let (d, i, t) = (
            backend.upload(draft).unwrap(),
            backend.upload(ids).unwrap(),
            backend.upload(target).unwrap(),
        );
        let mut tokens = backend.filled(b * (n + 1), -7i32).unwrap();
        let mut accepted = backend.filled(b, -7i32).unwrap();
        let mut emitted = backend.filled(b, -7i32).unwrap();
        spec::chain_speculative_sampling(
            backend,
            state,
            shape,
            &d,
            &i,
            &t,
            &mut tokens,
            &mut accepted,
            &mut emitted,
        )
        .unwrap();
        Step {
            tokens: tokens.to_vec().unwrap(),
            accepted: accepted.to_vec().unwrap(),
            emitted: emitted.to_vec().unwrap(),
        }
    }

    /// Draw from `p` with the test generator (the draft model's proposals).
    fn pick(rng: &mut Rng, p: &[f32]) -> i32 {
        let u = rng.uniform() * p.iter().sum::<f32>();
        let mut acc = 0.0;
        for (i, &q) in p.iter().enumerate() {
            acc += q;
            if u < acc {
                return i as i32;
            }
        }
        (p.len() - 1) as i32
    }

    /// Structure of every output row: accepted drafts, one emitted token, -1 after; counts agree.
    fn check_structure(s: &Step, ids: &[i32], n: usize, vocab: usize) {
        for r in 0..s.accepted.len() {
            let a = s.accepted[r] as usize;
            assert!(a <= n, "row {r}: accepted {a}");
            assert_eq!(s.emitted[r] as usize, a + 1, "row {r}");
            let row = &s.tokens[r * (n + 1)..(r + 1) * (n + 1)];
            assert_eq!(
                &row[..a],
                &ids[r * n..r * n + a],
                "row {r}: accepted prefix"
            );
            assert!(
                (0..vocab as i32).contains(&row[a]),
                "row {r}: emitted {}",
                row[a]
            );
            assert!(
                row[a + 1..].iter().all(|&t| t == -1),
                "row {r}: padding {row:?}"
            );
        }
    }

    /// The emitted tokens are distributed as the target's: position 0 over every row, position
    /// 1 over the rows that accepted draft 0 (chi-square, with a draft distribution different
    /// from the target).
    pub(super) fn outputs_follow_the_target(backend: &Backend, rows: usize) {
        let mut rng = Rng::from_time();
        let seed = rng.seed();
        let (n, vocab) = (2usize, 12usize);
        let p0 = skewed(&mut rng, vocab);
        let p1 = skewed(&mut rng, vocab);
        let q0 = skewed(&mut rng, vocab);
        let q1: Vec<f32> = (0..vocab).map(|_| 1.0 / vocab as f32).collect();
        let mut draft = Vec::with_capacity(rows * n * vocab);
        let mut target = Vec::with_capacity(rows * (n + 1) * vocab);
        let mut ids = Vec::with_capacity(rows * n);
        for _ in 0..rows {
            draft.extend_from_slice(&q0);
            draft.extend_from_slice(&q1);
            target.extend_from_slice(&p0);
            target.extend_from_slice(&p1);
            target.extend_from_slice(&p0);
            ids.push(pick(&mut rng, &q0));
            ids.push(pick(&mut rng, &q1));
        }
        let shape = SpecShape::new(rows as u32, n as u32, vocab as u32).unwrap();
        let mut state = SamplerState::new(backend, seed).unwrap();
        let s = step(backend, &mut state, shape, &draft, &ids, &target);
        check_structure(&s, &ids, n, vocab);
        let first: Vec<i32> = (0..rows).map(|r| s.tokens[r * (n + 1)]).collect();
        let second: Vec<i32> = (0..rows)
            .filter(|&r| s.accepted[r] >= 1)
            .map(|r| s.tokens[r * (n + 1) + 1])
            .collect();
        for (what, got, p) in [("position 0", &first, &p0), ("position 1", &second, &p1)] {
            let want: Vec<f64> = {
                let z: f64 = p.iter().map(|&x| f64::from(x)).sum();
                p.iter().map(|&x| f64::from(x) / z).collect()
            };
            let (stat, df) = chi_square(&counts(got, vocab), &want);
            assert!(
                stat <= chi_square_bound(df),
                "{what}: chi-square {stat:.1} > {:.1} over {} draws (seed {seed})",
                chi_square_bound(df),
                got.len()
            );
        }
        // Acceptance rate of draft 0: sum min(q, p) = 1 - TV(p, q).
        let rate = s.accepted.iter().filter(|&&a| a >= 1).count() as f64 / rows as f64;
        let want: f64 = p0.iter().zip(&q0).map(|(&a, &b)| f64::from(a.min(b))).sum();
        let sd = (want * (1.0 - want) / rows as f64).sqrt();
        assert!(
            (rate - want).abs() <= 6.0 * sd,
            "acceptance {rate} vs {want} (seed {seed})"
        );
        assert_eq!(state.read().unwrap(), (seed, 1));
    }

    #[test]
    fn cpu_outputs_follow_the_target() {
        outputs_follow_the_target(&Backend::Cpu, 30_000);
    }

    /// Exact cases: a draft equal to the target is always accepted; a draft token the target
    /// gives 0 is always rejected and never emitted; ids outside the vocabulary are rejected.
    pub(super) fn exact_acceptance(backend: &Backend) {
        let mut rng = Rng::from_time();
        let (n, vocab, rows) = (3usize, 5usize, 200usize);
        let mut draft = Vec::new();
        let mut target = Vec::new();
        let mut ids = Vec::new();
        for r in 0..rows {
            let p = skewed(&mut rng, vocab);
            match r % 3 {
                0 => {
                    // Identical: all accepted, bonus from target[n].
                    for _ in 0..n {
                        draft.extend_from_slice(&p);
                        target.extend_from_slice(&p);
                        ids.push(pick(&mut rng, &p));
                    }
                    target.extend_from_slice(&p);
                }
                1 => {
                    // Target gives draft token 0 probability 0 at position 0.
                    let mut t = p.clone();
                    t[0] = 0.0;
                    draft.extend_from_slice(&p);
                    target.extend_from_slice(&t);
                    ids.push(0);
                    ids.extend(std::iter::repeat_n(1, n - 1));
                    for _ in 1..n {
                        draft.extend_from_slice(&p);
                        target.extend_from_slice(&p);
                    }
                    target.extend_from_slice(&p);
                }
                _ => {
                    for i in 0..n {
                        draft.extend_from_slice(&p);
                        target.extend_from_slice(&p);
                        ids.push(if i == 1 {
                            vocab as i32 + 3
                        } else {
                            -1 - i as i32
                        });
                    }
                    target.extend_from_slice(&p);
                }
            }
        }
        let shape = SpecShape::new(rows as u32, n as u32, vocab as u32).unwrap();
        let mut state = SamplerState::new(backend, rng.next_u64()).unwrap();
        let s = step(backend, &mut state, shape, &draft, &ids, &target);
        check_structure(&s, &ids, n, vocab);
        for r in 0..rows {
            let row = &s.tokens[r * (n + 1)..(r + 1) * (n + 1)];
            match r % 3 {
                0 => assert_eq!(s.accepted[r], n as i32, "row {r}"),
                1 => {
                    assert_eq!(s.accepted[r], 0, "row {r}");
                    assert_ne!(row[0], 0, "row {r}: a zero-probability token was emitted");
                }
                _ => assert_eq!(s.accepted[r], 0, "row {r}"),
            }
        }
    }

    #[test]
    fn cpu_exact_acceptance() {
        exact_acceptance(&Backend::Cpu);
    }

    #[test]
    fn lengths_are_checked() {
        let b = Backend::Cpu;
        assert!(invalid(SpecShape::new(1, 1, 0).map(|_| ())).contains("vocab = 0"));
        let shape = SpecShape::new(2, 1, 3).unwrap();
        let f = |n: usize| b.filled(n, 0.5f32).unwrap();
        let i = |n: usize| b.filled(n, 0i32).unwrap();
        let mut s = SamplerState::new(&b, 1).unwrap();
        let (mut t, mut a, mut e) = (i(4), i(2), i(2));
        let m = invalid(spec::chain_speculative_sampling(
            &b,
            &mut s,
            shape,
            &f(6),
            &i(2),
            &f(11),
            &mut t,
            &mut a,
            &mut e,
        ));
        assert!(
            m.contains("target_probs has 11 elements") && m.contains("needs 12"),
            "{m}"
        );
        let m = invalid(spec::chain_speculative_sampling(
            &b,
            &mut s,
            shape,
            &f(6),
            &i(3),
            &f(12),
            &mut t,
            &mut a,
            &mut e,
        ));
        assert!(m.contains("draft_ids has 3"), "{m}");
        let mut t5 = i(5);
        let m = invalid(spec::chain_speculative_sampling(
            &b,
            &mut s,
            shape,
            &f(6),
            &i(2),
            &f(12),
            &mut t5,
            &mut a,
            &mut e,
        ));
        assert!(m.contains("tokens has 5"), "{m}");
        assert_eq!(s.read().unwrap(), (1, 0));
    }

    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_chain_speculative_outputs_follow_the_target() {
        outputs_follow_the_target(&gpu(), 100_000);
        exact_acceptance(&gpu());
    }

    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_chain_speculative_matches_the_cpu_with_one_seed() {
        let g = gpu();
        let mut rng = Rng::from_time();
        let seed = rng.seed();
        for (n, vocab) in [(1usize, 7usize), (4, 1001), (4, 128_256), (0, 33)] {
            let rows = if vocab > 10_000 { 8 } else { 100 };
            let draft = random_rows(&mut rng, rows * n, vocab, false);
            let target = random_rows(&mut rng, rows * (n + 1), vocab, false);
            let ids: Vec<i32> = (0..rows * n)
                .map(|j| pick(&mut rng, &draft[j * vocab..(j + 1) * vocab]))
                .collect();
            let shape = SpecShape::new(rows as u32, n as u32, vocab as u32).unwrap();
            let s = rng.next_u64();
            let mut sg = SamplerState::new(&g, s).unwrap();
            let mut sc = SamplerState::new(&Backend::Cpu, s).unwrap();
            let a = step(&g, &mut sg, shape, &draft, &ids, &target);
            let b = step(&Backend::Cpu, &mut sc, shape, &draft, &ids, &target);
            check_structure(&a, &ids, n, vocab);
            assert_eq!(a.accepted, b.accepted, "n {n} vocab {vocab} (seed {seed})");
            let differ = (0..rows)
                .filter(|&r| {
                    a.tokens[r * (n + 1)..(r + 1) * (n + 1)]
                        != b.tokens[r * (n + 1)..(r + 1) * (n + 1)]
                })
                .count();
            assert!(
                differ * 50 <= rows,
                "n {n} vocab {vocab}: {differ} rows differ (seed {seed})"
            );
            assert_eq!(sg.read().unwrap(), (s, 1));
        }
    }
}

// ---- The kernel's algorithms, mirrored in f64 ----

/// After top-k the GPU finds the top-p winner by rejection over race candidates (sampling.cuh,
/// top_p_race): race within {w > pivot}; accept the winner j when the mass strictly above w_j is
/// below p of the row's (or is 0), else pivot = w_j. Mirrored here (one candidate a round), it
/// draws exactly the race within the directly computed nucleus on every row, within few rounds.
#[test]
fn top_p_rejection_rounds_draw_the_direct_sets_token() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let (vocab, batch) = (300usize, 400usize);
    let mut worst = 0;
    for p in [0.1f32, 0.5, 0.9, 0.99] {
        let mut x = random_rows(&mut rng, batch / 2, vocab, false);
        // Flat rows: the slowest case for rejection (the set shrinks by half per round).
        x.extend((0..batch / 2 * vocab).map(|_| 1.0 + 1e-3 * rng.uniform()));
        let s = rng.next_u64();
        for r in 0..batch {
            let w: Vec<f64> = x[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let draws = RowDraws::new(s, 0, r as u32);
            let key = |i: usize| w[i] / -f64::from(draws.token_uniform(i as u32)).ln();
            let race = |pivot: f64| {
                (0..vocab)
                    .filter(|&i| w[i] > pivot)
                    .max_by(|&a, &b| key(a).total_cmp(&key(b)).then(b.cmp(&a)))
            };
            let target = f64::from(p) * w.iter().sum::<f64>();
            // The nucleus directly: the tokens whose mass strictly above is below the target.
            let in_nucleus = |i: usize| {
                let above: f64 = w.iter().filter(|&&v| v > w[i]).sum();
                above <= 0.0 || above < target
            };
            let t = (0..vocab)
                .filter(|&i| in_nucleus(i))
                .max_by(|&a, &b| key(a).total_cmp(&key(b)).then(b.cmp(&a)))
                .unwrap();
            let mut j = race(0.0).unwrap();
            let mut rounds = 1;
            loop {
                let above: f64 = w.iter().filter(|&&v| v > w[j]).sum();
                if above <= 0.0 || above < target {
                    break;
                }
                j = race(w[j]).unwrap();
                rounds += 1;
            }
            worst = worst.max(rounds);
            assert_eq!(j, t, "p {p} row {r} (seed {seed})");
        }
    }
    assert!(worst < 40, "{worst} rounds (seed {seed})");
}

/// The kernel's radix select (11 + 11 + 10 bits of order-preserving keys, walking bins from the
/// top) mirrored: by count it finds the k-th largest, by mass the top-p threshold.
#[test]
fn radix_select_finds_the_kth_largest_and_the_top_p_threshold() {
    fn key(v: f32) -> u32 {
        let b = v.to_bits();
        if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    }
    fn value(k: u32) -> f32 {
        f32::from_bits(if k & 0x8000_0000 != 0 {
            k & 0x7fff_ffff
        } else {
            !k
        })
    }
    /// By count (`mass` None) or by mass (weights = the values, `want` the target).
    fn select(x: &[f32], k: usize, want: Option<f64>) -> f32 {
        let (mut prefix, mut mask, mut remaining, mut want) = (0u32, 0u32, k, want);
        for (shift, bins) in [(21u32, 2048u32), (10, 2048), (0, 1024)] {
            let mut count = vec![0usize; bins as usize];
            let mut mass = vec![0f64; bins as usize];
            for &v in x {
                let kk = key(v);
                if kk & mask == prefix {
                    let b = ((kk >> shift) & (bins - 1)) as usize;
                    count[b] += 1;
                    mass[b] += f64::from(v);
                }
            }
            let mut acc_c = 0;
            let mut acc_m = 0.0;
            let mut pick = None;
            let mut lowest = 0;
            for b in (0..bins as usize).rev() {
                if count[b] == 0 {
                    continue;
                }
                lowest = b;
                match want {
                    None if acc_c + count[b] >= remaining => {
                        pick = Some((b, remaining - acc_c, 0.0));
                        break;
                    }
                    Some(w) if w <= 0.0 || acc_m + mass[b] >= w => {
                        pick = Some((b, 0, w - acc_m));
                        break;
                    }
                    _ => {}
                }
                acc_c += count[b];
                acc_m += mass[b];
            }
            let (b, r, w) = pick.unwrap_or((lowest, 0, f64::INFINITY));
            prefix |= (b as u32) << shift;
            mask |= (bins - 1) << shift;
            remaining = r;
            want = want.map(|_| w);
        }
        value(prefix)
    }
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for vocab in [1usize, 5, 100, 3000] {
        let mut x: Vec<f32> = random_rows(&mut rng, 1, vocab, true);
        if vocab > 4 {
            x[1] = x[0];
            x[3] = -0.0;
        }
        let mut sorted = x.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for k in [1, 2, vocab / 2 + 1, vocab] {
            let k = k.clamp(1, vocab);
            assert_eq!(select(&x, k, None), sorted[k - 1], "k {k} (seed {seed})");
        }
        let probs = random_rows(&mut rng, 1, vocab, false);
        for p in [0.0f64, 0.3, 0.9, 0.999] {
            let total: f64 = probs.iter().map(|&v| f64::from(v)).sum();
            let t = select(&probs, 0, Some(p * total));
            let above: f64 = probs
                .iter()
                .filter(|&&v| v > t)
                .map(|&v| f64::from(v))
                .sum();
            let at_least: f64 = probs
                .iter()
                .filter(|&&v| v >= t)
                .map(|&v| f64::from(v))
                .sum();
            assert!(
                (above < p * total || above == 0.0) && at_least >= p * total,
                "p {p} vocab {vocab}: t {t}, above {above}, at least {at_least} (seed {seed})"
            );
        }
    }
}
