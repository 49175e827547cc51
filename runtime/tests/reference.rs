//! The CPU reference against naive, independent f64 formulas: dense per-request matrices built from
//! the inputs, addressed here without `KvIndex::offset`, and softmax the textbook way. Inputs are
//! fresh random values each run; every test prints its seed (`FERRINFER_SEED=<seed>` replays it).

use ferrinfer_runtime::attention::reference::{self, Reference};
use ferrinfer_runtime::error::Error;
use ferrinfer_runtime::variant::params::{
    Array, AttentionParams, Extent, ParamField, ParamType, ParamWriter,
};
use ferrinfer_runtime::variant::{Hooks, Pos, Variant, VariantSpec};
use ferrinfer_runtime::{Batch, Heads, KvIndex, KvLayout};
use ferrinfer_testkit::Rng;

// ---------------------------------------------------------------------------------------------
// Test variants, written by hand: this crate cannot use `#[attention_variant]` (dependency cycle).

const NO_HOOKS: Hooks = Hooks {
    query: false,
    key: false,
    logits: false,
    mask: false,
    output: false,
    sink: false,
};

const fn spec(
    name: &'static str,
    hooks: Hooks,
    softmax: bool,
    params: &'static [ParamField],
) -> VariantSpec {
    VariantSpec {
        name,
        module_path: module_path!(),
        hooks,
        softmax,
        params,
        cuda: "struct Variant {};",
    }
}

const fn f32_field(name: &'static str) -> ParamField {
    ParamField::new(name, ParamType::F32)
}

struct Plain;
impl AttentionParams for Plain {
    const FIELDS: &'static [ParamField] = &[];
    fn pack(&self, _: &mut ParamWriter<'_>) {}
}
impl Variant for Plain {
    const SPEC: &'static VariantSpec = &spec("Plain", NO_HOOKS, true, &[]);
}

struct SoftCap {
    cap: f32,
}
impl AttentionParams for SoftCap {
    const FIELDS: &'static [ParamField] = &[f32_field("cap")];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.f32(self.cap);
    }
}
impl Variant for SoftCap {
    const SPEC: &'static VariantSpec = &spec(
        "SoftCap",
        Hooks {
            logits: true,
            ..NO_HOOKS
        },
        true,
        Self::FIELDS,
    );
    fn logits(&self, s: f32, _: Pos) -> f32 {
        self.cap * (s / self.cap).tanh()
    }
}

/// Sliding window: a query sees the last `window` keys up to its own absolute position.
struct Window {
    window: u32,
}
impl AttentionParams for Window {
    const FIELDS: &'static [ParamField] = &[ParamField::new("window", ParamType::U32)];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.u32(self.window);
    }
}
impl Variant for Window {
    const SPEC: &'static VariantSpec = &spec(
        "Window",
        Hooks {
            mask: true,
            ..NO_HOOKS
        },
        true,
        Self::FIELDS,
    );
    fn mask(&self, at: Pos) -> bool {
        let abs = i64::from(at.qo_pos) + i64::from(at.kv_len) - i64::from(at.qo_len);
        i64::from(at.kv_pos) + i64::from(self.window) > abs
    }
}

/// One sink logit per query head: `base + 0.5 * head`.
struct Sink {
    base: f32,
}
impl AttentionParams for Sink {
    const FIELDS: &'static [ParamField] = &[f32_field("base")];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.f32(self.base);
    }
}
impl Variant for Sink {
    const SPEC: &'static VariantSpec = &spec(
        "Sink",
        Hooks {
            sink: true,
            ..NO_HOOKS
        },
        true,
        Self::FIELDS,
    );
    fn sink(&self, at: Pos) -> f32 {
        self.base + 0.5 * at.qo_head as f32
    }
}

/// FlashSigmoid: softmax off, the weights are `sigmoid(s + bias)`.
struct Sigmoid {
    bias: f32,
}
impl AttentionParams for Sigmoid {
    const FIELDS: &'static [ParamField] = &[f32_field("bias")];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.f32(self.bias);
    }
}
impl Variant for Sigmoid {
    const SPEC: &'static VariantSpec = &spec(
        "Sigmoid",
        Hooks {
            logits: true,
            ..NO_HOOKS
        },
        false,
        Self::FIELDS,
    );
    fn logits(&self, s: f32, _: Pos) -> f32 {
        1.0 / (1.0 + (-(s + self.bias)).exp())
    }
}

/// Rotary embedding on the (i, i + D/2) pairs, queries at their absolute position.
struct Rope {
    theta: f32,
}
impl AttentionParams for Rope {
    const FIELDS: &'static [ParamField] = &[f32_field("theta")];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.f32(self.theta);
    }
}
impl Rope {
    fn rotate(&self, x: f32, partner: f32, i: u32, d: u32, pos: f32) -> f32 {
        let pair = i % (d / 2);
        let angle = pos * self.theta.powf(-2.0 * pair as f32 / d as f32);
        let (sin, cos) = angle.sin_cos();
        if i < d / 2 {
            x * cos - partner * sin
        } else {
            x * cos + partner * sin
        }
    }
}
impl Variant for Rope {
    const SPEC: &'static VariantSpec = &spec(
        "Rope",
        Hooks {
            query: true,
            key: true,
            ..NO_HOOKS
        },
        true,
        Self::FIELDS,
    );
    fn query(&self, x: f32, partner: f32, i: u32, at: Pos) -> f32 {
        let pos = (at.qo_pos + at.kv_len - at.qo_len) as f32;
        self.rotate(x, partner, i, at.head_dim, pos)
    }
    fn key(&self, x: f32, partner: f32, i: u32, at: Pos) -> f32 {
        self.rotate(x, partner, i, at.head_dim, at.kv_pos as f32)
    }
}

/// Output transform: `alpha * o + 0.01 * i + 0.1 * head`.
struct Affine {
    alpha: f32,
}
impl AttentionParams for Affine {
    const FIELDS: &'static [ParamField] = &[f32_field("alpha")];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.f32(self.alpha);
    }
}
impl Variant for Affine {
    const SPEC: &'static VariantSpec = &spec(
        "Affine",
        Hooks {
            output: true,
            ..NO_HOOKS
        },
        true,
        Self::FIELDS,
    );
    fn output(&self, o: f32, i: u32, at: Pos) -> f32 {
        self.alpha * o + 0.01 * i as f32 + 0.1 * at.qo_head as f32
    }
}

/// ALiBi-like: a bias per query head (`slopes` covers `qo_heads`) and a scale per request and KV
/// head (`scales` covers `batch * kv_heads`), as `#[cover]` would declare them.
struct HeadBias {
    slopes: Array<f32>,
    scales: Array<f32>,
}
impl AttentionParams for HeadBias {
    const FIELDS: &'static [ParamField] = &[
        ParamField::new("slopes", ParamType::ArrayF32).covering(&[Extent::QoHeads]),
        f32_field("unused"),
        ParamField::new("scales", ParamType::ArrayF32).covering(&[Extent::Batch, Extent::KvHeads]),
    ];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.array(&self.slopes);
        w.f32(0.0);
        w.array(&self.scales);
    }
}
impl Variant for HeadBias {
    const SPEC: &'static VariantSpec = &spec(
        "HeadBias",
        Hooks {
            logits: true,
            ..NO_HOOKS
        },
        true,
        Self::FIELDS,
    );
    fn logits(&self, s: f32, at: Pos) -> f32 {
        // Two KV heads per request in the tests below.
        s * self.scales[at.batch * 2 + at.kv_head] + self.slopes[at.qo_head]
    }
}

/// A mask read through a table of offsets, as CustomMask does: no coverage can bound `bits`.
struct Indirect {
    offsets: Array<u32>,
    bits: Array<u32>,
}
impl AttentionParams for Indirect {
    const FIELDS: &'static [ParamField] = &[
        ParamField::new("offsets", ParamType::ArrayU32).covering(&[Extent::Batch]),
        ParamField::new("bits", ParamType::ArrayU32),
    ];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.array(&self.offsets);
        w.array(&self.bits);
    }
}
impl Variant for Indirect {
    const SPEC: &'static VariantSpec = &spec(
        "Indirect",
        Hooks {
            mask: true,
            ..NO_HOOKS
        },
        true,
        Self::FIELDS,
    );
    fn mask(&self, at: Pos) -> bool {
        self.bits[self.offsets[at.batch] + at.kv_pos] == 1
    }
}

// ---------------------------------------------------------------------------------------------
// Problems: random inputs, stored in any KV layout.

fn rng(test: &str) -> Rng {
    let rng = Rng::from_time();
    eprintln!("{test}: seed {}", rng.seed());
    rng
}

/// A batch's logical contents: q as the kernels take it, keys and values per request, dense.
struct Problem {
    heads: Heads,
    qo_lens: Vec<u32>,
    kv_lens: Vec<u32>,
    /// `[total_qo, num_qo_heads, head_dim]`.
    q: Vec<f32>,
    /// Per request, `[kv_len, num_kv_heads, head_dim]`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

#[derive(Clone, Copy, Debug)]
enum Storage {
    Ragged(KvLayout),
    Paged(u32, KvLayout),
}

impl Problem {
    fn random(rng: &mut Rng, heads: (u32, u32, u32), qo_lens: &[u32], kv_lens: &[u32]) -> Self {
        let heads = Heads::new(heads.0, heads.1, heads.2).unwrap();
        let row = (heads.num_kv_heads() * heads.head_dim()) as usize;
        let total_qo: u32 = qo_lens.iter().sum();
        let q =
            rng.normal_vec(total_qo as usize * (heads.num_qo_heads() * heads.head_dim()) as usize);
        let keys = kv_lens
            .iter()
            .map(|&n| rng.normal_vec(n as usize * row))
            .collect();
        let values = kv_lens
            .iter()
            .map(|&n| rng.normal_vec(n as usize * row))
            .collect();
        Problem {
            heads,
            qo_lens: qo_lens.to_vec(),
            kv_lens: kv_lens.to_vec(),
            q,
            keys,
            values,
        }
    }

    fn qo_indptr(&self) -> Vec<i32> {
        prefix_sums(&self.qo_lens)
    }

    /// Scatter K and V into `storage`. Slots no request owns are NaN, so reading one shows.
    fn store(&self, storage: Storage, rng: &mut Rng) -> (KvIndex, Vec<f32>, Vec<f32>) {
        let (hk, d) = (
            self.heads.num_kv_heads() as usize,
            self.heads.head_dim() as usize,
        );
        match storage {
            Storage::Ragged(layout) => {
                let indptr = prefix_sums(&self.kv_lens);
                let total = *indptr.last().unwrap() as usize;
                let at = |t: usize, h: usize| match layout {
                    KvLayout::Nhd => (t * hk + h) * d,
                    KvLayout::Hnd => (h * total + t) * d,
                };
                let kv = KvIndex::ragged(&indptr, layout).unwrap();
                let (k, v) = self.scatter(total * hk * d, |b, j, h| at(indptr[b] as usize + j, h));
                (kv, k, v)
            }
            Storage::Paged(p, layout) => {
                let p = p as usize;
                let counts: Vec<u32> = self.kv_lens.iter().map(|&n| n.div_ceil(p as u32)).collect();
                let used = counts.iter().sum::<u32>() as usize;
                // Two spare pages, and the pages handed out in a random order.
                let num_pages = used + 2;
                let mut pages: Vec<i32> = (0..num_pages as i32).collect();
                rng.shuffle(&mut pages);
                pages.truncate(used);
                let indptr = prefix_sums(&counts);
                let last: Vec<i32> = self
                    .kv_lens
                    .iter()
                    .map(|&n| {
                        if n == 0 {
                            0
                        } else {
                            ((n - 1) % p as u32 + 1) as i32
                        }
                    })
                    .collect();
                let at = |page: usize, slot: usize, h: usize| match layout {
                    KvLayout::Nhd => ((page * p + slot) * hk + h) * d,
                    KvLayout::Hnd => ((page * hk + h) * p + slot) * d,
                };
                let kv = KvIndex::paged(p as u32, &indptr, &pages, &last, num_pages as u32, layout)
                    .unwrap();
                let (k, v) = self.scatter(num_pages * p * hk * d, |b, j, h| {
                    at(pages[indptr[b] as usize + j / p] as usize, j % p, h)
                });
                (kv, k, v)
            }
        }
    }

    fn scatter(
        &self,
        len: usize,
        at: impl Fn(usize, usize, usize) -> usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (hk, d) = (
            self.heads.num_kv_heads() as usize,
            self.heads.head_dim() as usize,
        );
        let (mut k, mut v) = (vec![f32::NAN; len], vec![f32::NAN; len]);
        for b in 0..self.kv_lens.len() {
            for j in 0..self.kv_lens[b] as usize {
                for h in 0..hk {
                    let src = (j * hk + h) * d;
                    let dst = at(b, j, h);
                    k[dst..dst + d].copy_from_slice(&self.keys[b][src..src + d]);
                    v[dst..dst + d].copy_from_slice(&self.values[b][src..src + d]);
                }
            }
        }
        (k, v)
    }

    fn run<V: Variant>(
        &self,
        variant: &V,
        storage: Storage,
        causal: bool,
        rng: &mut Rng,
    ) -> Reference {
        let (kv, k, v) = self.store(storage, rng);
        let batch = Batch::new(self.heads, &self.qo_indptr(), kv)
            .unwrap()
            .with_causal(causal);
        reference::attention(variant, &batch, &self.q, &k, &v).unwrap()
    }

    fn dense(&self) -> Dense {
        let f = |xs: &[f32]| xs.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        Dense {
            q: f(&self.q),
            keys: self.keys.iter().map(|x| f(x)).collect(),
            values: self.values.iter().map(|x| f(x)).collect(),
        }
    }
}

fn prefix_sums(lens: &[u32]) -> Vec<i32> {
    let mut out = vec![0];
    for &n in lens {
        out.push(out.last().unwrap() + n as i32);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The naive formula.

/// f64 copies of a problem's inputs (the query/key test rotates them before attention).
struct Dense {
    q: Vec<f64>,
    keys: Vec<Vec<f64>>,
    values: Vec<Vec<f64>>,
}

/// Attention written from the definition. Every closure gets f64 and plain indices.
struct Formula {
    causal: bool,
    scale: f64,
    logits: Box<dyn Fn(f64) -> f64>,
    /// Extra mask: (query row, key, qo_len, kv_len).
    keep: Box<dyn Fn(i64, i64, i64, i64) -> bool>,
    /// Sink logit of a query head.
    sink: Option<Box<dyn Fn(usize) -> f64>>,
    softmax: bool,
    /// (value, element, query head).
    output: Box<dyn Fn(f64, usize, usize) -> f64>,
}

impl Formula {
    fn plain(head_dim: u32) -> Self {
        Formula {
            causal: false,
            scale: 1.0 / f64::from(head_dim).sqrt(),
            logits: Box::new(|s| s),
            keep: Box::new(|_, _, _, _| true),
            sink: None,
            softmax: true,
            output: Box::new(|o, _, _| o),
        }
    }

    /// (o, lse) as dense vectors in the kernels' layout.
    fn eval(&self, p: &Problem, x: &Dense) -> (Vec<f64>, Vec<f64>) {
        let (hq, hk, d) = (
            p.heads.num_qo_heads() as usize,
            p.heads.num_kv_heads() as usize,
            p.heads.head_dim() as usize,
        );
        let mut o = Vec::new();
        let mut lse = Vec::new();
        let mut row0 = 0;
        for b in 0..p.qo_lens.len() {
            let (qo, kv) = (p.qo_lens[b] as usize, p.kv_lens[b] as usize);
            for i in 0..qo {
                for h in 0..hq {
                    let g = h / (hq / hk);
                    let qv = &x.q[((row0 + i) * hq + h) * d..][..d];
                    // (logit, key) of every visible key
                    let mut seen = Vec::new();
                    for j in 0..kv {
                        let causal_ok = !self.causal || j + qo <= i + kv;
                        if !causal_ok || !(self.keep)(i as i64, j as i64, qo as i64, kv as i64) {
                            continue;
                        }
                        let kj = &x.keys[b][(j * hk + g) * d..][..d];
                        let mut dot = 0.0;
                        for e in 0..d {
                            dot += qv[e] * kj[e];
                        }
                        seen.push(((self.logits)(dot * self.scale), j));
                    }
                    let weights: Vec<f64> = if self.softmax {
                        seen.iter().map(|(l, _)| l.exp()).collect()
                    } else {
                        seen.iter().map(|(l, _)| *l).collect()
                    };
                    let z = weights.iter().sum::<f64>()
                        + self.sink.as_ref().map_or(0.0, |s| s(h).exp());
                    for e in 0..d {
                        let mut acc = 0.0;
                        for (w, (_, j)) in weights.iter().zip(&seen) {
                            acc += w * x.values[b][(j * hk + g) * d + e];
                        }
                        // Nothing to attend to: 0, not 0/0.
                        let val = if !self.softmax {
                            acc
                        } else if z == 0.0 {
                            0.0
                        } else {
                            acc / z
                        };
                        o.push((self.output)(val, e, h));
                    }
                    lse.push(if self.softmax { z.ln() } else { f64::NAN });
                }
            }
            row0 += qo;
        }
        (o, lse)
    }
}

/// `got` within `tol` of `want`, relative to the magnitude of each entry.
fn assert_close(got: &Reference, want: &(Vec<f64>, Vec<f64>), tol: f64) {
    let check = |name: &str, got: &[f64], want: &[f64]| {
        assert_eq!(got.len(), want.len(), "{name} length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let same =
                g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol * (1.0 + w.abs());
            assert!(same, "{name}[{i}]: got {g}, want {w}");
        }
    };
    check("o", &got.o, &want.0);
    check("lse", &got.lse, &want.1);
}

const TOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn softmax_with_gqa_and_lse_as_log_sum_exp() {
    let mut rng = rng("gqa");
    let p = Problem::random(&mut rng, (4, 2, 64), &[1, 5, 9], &[1, 37, 300]);
    let got = p.run(&Plain, Storage::Ragged(KvLayout::Nhd), false, &mut rng);
    // `eval` takes lse as ln(sum(exp(l))) with no max subtracted: the textbook definition.
    assert_close(&got, &Formula::plain(64).eval(&p, &p.dense()), TOL);
    assert!(got.lse.iter().all(|x| x.is_finite()));
}

#[test]
fn causal_short_square_and_longer_queries() {
    let mut rng = rng("causal");
    // qo < kv, qo == kv, decode, and qo > kv (the first rows see nothing).
    let p = Problem::random(&mut rng, (4, 2, 32), &[3, 7, 1, 4], &[11, 7, 5, 2]);
    let got = p.run(&Plain, Storage::Ragged(KvLayout::Nhd), true, &mut rng);
    let f = Formula {
        causal: true,
        ..Formula::plain(32)
    };
    assert_close(&got, &f.eval(&p, &p.dense()), TOL);
    // Request 3, rows 0 and 1: keys 0..=i-2 do not exist.
    let row = (3 + 7 + 1) * 4;
    assert!(
        got.lse[row..row + 8]
            .iter()
            .all(|&x| x == f64::NEG_INFINITY)
    );
    assert!(got.lse[row + 8..].iter().all(|x| x.is_finite()));
}

#[test]
fn paged_and_ragged_layouts_agree() {
    let mut rng = rng("layouts");
    // Full pages, partial last pages, a single token, and no KV at all.
    let kv_lens = [1, 16, 17, 33, 5, 0, 40];
    let p = Problem::random(&mut rng, (4, 2, 16), &[1, 4, 3, 5, 2, 2, 6], &kv_lens);
    let want = Formula {
        causal: true,
        ..Formula::plain(16)
    }
    .eval(&p, &p.dense());
    let base = p.run(&Plain, Storage::Ragged(KvLayout::Nhd), true, &mut rng);
    assert_close(&base, &want, TOL);
    for storage in [
        Storage::Ragged(KvLayout::Hnd),
        Storage::Paged(1, KvLayout::Nhd),
        Storage::Paged(1, KvLayout::Hnd),
        Storage::Paged(16, KvLayout::Nhd),
        Storage::Paged(16, KvLayout::Hnd),
        Storage::Paged(5, KvLayout::Hnd),
    ] {
        // Same values in the same order: bit-identical results.
        assert_eq!(p.run(&Plain, storage, true, &mut rng), base, "{storage:?}");
    }
}

#[test]
fn request_without_kv_gives_zero_and_minus_infinity() {
    let mut rng = rng("empty");
    let p = Problem::random(&mut rng, (2, 1, 8), &[2, 3, 1], &[5, 0, 3]);
    for storage in [
        Storage::Ragged(KvLayout::Nhd),
        Storage::Paged(4, KvLayout::Nhd),
    ] {
        let got = p.run(&Plain, storage, false, &mut rng);
        assert_close(&got, &Formula::plain(8).eval(&p, &p.dense()), TOL);
        let rows = 2 * 2..5 * 2;
        assert!(
            got.lse[rows.clone()]
                .iter()
                .all(|&x| x == f64::NEG_INFINITY)
        );
        assert!(
            got.o[rows.start * 8..rows.end * 8]
                .iter()
                .all(|&x| x == 0.0)
        );
        assert!(
            got.lse[..4]
                .iter()
                .chain(&got.lse[10..])
                .all(|x| x.is_finite())
        );
    }
}

#[test]
fn soft_cap() {
    let mut rng = rng("softcap");
    let p = Problem::random(&mut rng, (4, 2, 16), &[3, 6], &[20, 6]);
    // A large scale pushes the scores into the tanh's curved part.
    let (kv, k, v) = p.store(Storage::Paged(4, KvLayout::Nhd), &mut rng);
    let batch = Batch::new(p.heads, &p.qo_indptr(), kv)
        .unwrap()
        .with_causal(true)
        .with_sm_scale(2.0)
        .unwrap();
    let got = reference::attention(&SoftCap { cap: 3.0 }, &batch, &p.q, &k, &v).unwrap();
    let f = Formula {
        causal: true,
        scale: 2.0,
        logits: Box::new(|s| 3.0 * (s / 3.0).tanh()),
        ..Formula::plain(16)
    };
    assert_close(&got, &f.eval(&p, &p.dense()), TOL);
}

#[test]
fn sliding_window_mask() {
    let mut rng = rng("window");
    let p = Problem::random(&mut rng, (4, 4, 16), &[4, 9, 1], &[30, 9, 50]);
    let got = p.run(
        &Window { window: 5 },
        Storage::Paged(3, KvLayout::Hnd),
        true,
        &mut rng,
    );
    let f = Formula {
        causal: true,
        keep: Box::new(|i, j, qo, kv| j + 5 > i + kv - qo),
        ..Formula::plain(16)
    };
    assert_close(&got, &f.eval(&p, &p.dense()), TOL);
}

#[test]
fn sink_adds_to_the_denominator() {
    let mut rng = rng("sink");
    let p = Problem::random(&mut rng, (4, 2, 16), &[3, 2, 4], &[12, 0, 4]);
    let got = p.run(
        &Sink { base: 0.75 },
        Storage::Ragged(KvLayout::Nhd),
        true,
        &mut rng,
    );
    let f = Formula {
        causal: true,
        sink: Some(Box::new(|h| 0.75 + 0.5 * h as f64)),
        ..Formula::plain(16)
    };
    assert_close(&got, &f.eval(&p, &p.dense()), TOL);
    // The request with no KV: only the sink, so o = 0 and lse = the sink logit.
    let rows = 3 * 4..5 * 4;
    let sinks: Vec<f64> = (0..8).map(|r| 0.75 + 0.5 * (r % 4) as f64).collect();
    assert_eq!(got.lse[rows.clone()], sinks[..]);
    assert!(
        got.o[rows.start * 16..rows.end * 16]
            .iter()
            .all(|&x| x == 0.0)
    );
}

#[test]
fn softmax_off_uses_the_logits_as_weights() {
    let mut rng = rng("sigmoid");
    let p = Problem::random(&mut rng, (4, 2, 16), &[5, 1], &[9, 0]);
    let got = p.run(
        &Sigmoid { bias: -1.0 },
        Storage::Paged(2, KvLayout::Nhd),
        true,
        &mut rng,
    );
    let f = Formula {
        causal: true,
        softmax: false,
        logits: Box::new(|s| 1.0 / (1.0 + (-(s - 1.0)).exp())),
        ..Formula::plain(16)
    };
    assert_close(&got, &f.eval(&p, &p.dense()), TOL);
    assert!(got.lse.iter().all(|x| x.is_nan()));
}

#[test]
fn query_and_key_hooks_rotate_before_attention() {
    let mut rng = rng("rope");
    let theta = 100.0;
    let p = Problem::random(&mut rng, (4, 2, 16), &[3, 4], &[10, 4]);
    let got = p.run(
        &Rope { theta },
        Storage::Paged(4, KvLayout::Nhd),
        true,
        &mut rng,
    );

    // Rotate the dense copies pair by pair, then plain causal attention.
    let (hq, hk, d) = (4, 2, 16);
    let rotate = |row: &mut [f64], pos: f64| {
        for e in 0..d / 2 {
            let angle = pos * f64::from(theta).powf(-2.0 * e as f64 / d as f64);
            let (a, b) = (row[e], row[e + d / 2]);
            row[e] = a * angle.cos() - b * angle.sin();
            row[e + d / 2] = b * angle.cos() + a * angle.sin();
        }
    };
    let mut x = p.dense();
    let mut row0 = 0;
    for b in 0..2 {
        let (qo, kv) = (p.qo_lens[b] as usize, p.kv_lens[b] as usize);
        for i in 0..qo {
            for h in 0..hq {
                let at = ((row0 + i) * hq + h) * d;
                rotate(&mut x.q[at..at + d], (i + kv - qo) as f64);
            }
        }
        for j in 0..kv {
            for h in 0..hk {
                let at = (j * hk + h) * d;
                rotate(&mut x.keys[b][at..at + d], j as f64);
            }
        }
        row0 += qo;
    }
    let f = Formula {
        causal: true,
        ..Formula::plain(16)
    };
    assert_close(&got, &f.eval(&p, &x), TOL);
    // The rotation must matter, or the test proves nothing.
    let plain = f.eval(&p, &p.dense());
    assert!(
        got.o
            .iter()
            .zip(&plain.0)
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
}

#[test]
fn output_hook() {
    let mut rng = rng("output");
    let p = Problem::random(&mut rng, (4, 2, 16), &[2, 3], &[7, 0]);
    let got = p.run(
        &Affine { alpha: 1.5 },
        Storage::Ragged(KvLayout::Hnd),
        false,
        &mut rng,
    );
    let f = Formula {
        output: Box::new(|o, e, h| 1.5 * o + 0.01 * e as f64 + 0.1 * h as f64),
        ..Formula::plain(16)
    };
    assert_close(&got, &f.eval(&p, &p.dense()), TOL);
}

#[test]
fn thousands_of_keys() {
    let mut rng = rng("long");
    let p = Problem::random(&mut rng, (4, 1, 64), &[16], &[3000]);
    let got = p.run(&Plain, Storage::Paged(16, KvLayout::Nhd), true, &mut rng);
    let f = Formula {
        causal: true,
        ..Formula::plain(64)
    };
    assert_close(&got, &f.eval(&p, &p.dense()), TOL);
}

#[test]
fn typed_inputs_convert_exactly() {
    let mut rng = rng("typed");
    let p = Problem::random(&mut rng, (2, 1, 8), &[3], &[6]);
    let (kv, k, v) = p.store(Storage::Ragged(KvLayout::Nhd), &mut rng);
    let batch = Batch::new(p.heads, &p.qo_indptr(), kv).unwrap();
    let bf = |xs: &[f32]| {
        xs.iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect::<Vec<_>>()
    };
    let (q16, k16, v16) = (bf(&p.q), bf(&k), bf(&v));
    let typed = reference::attention_typed(&Plain, &batch, &q16, &k16, &v16).unwrap();
    let f = |xs: &[half::bf16]| xs.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let plain = reference::attention(&Plain, &batch, &f(&q16), &f(&k16), &f(&v16)).unwrap();
    assert_eq!(typed, plain);
}

#[test]
fn wrong_buffer_lengths_are_invalid_input() {
    let mut rng = rng("lengths");
    let p = Problem::random(&mut rng, (2, 1, 8), &[2], &[5]);
    let (kv, k, v) = p.store(Storage::Paged(4, KvLayout::Nhd), &mut rng);
    let batch = Batch::new(p.heads, &p.qo_indptr(), kv).unwrap();
    let run = |q: &[f32], k: &[f32], v: &[f32]| reference::attention(&Plain, &batch, q, k, v);
    assert!(run(&p.q, &k, &v).is_ok());
    assert!(matches!(
        run(&p.q[1..], &k, &v),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        run(&p.q, &k[1..], &v),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        run(&p.q, &k, &v[..8]),
        Err(Error::InvalidInput(_))
    ));
    let err = batch.clone().with_sm_scale(f32::NAN).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("sm_scale must be finite"), "{err}");
}

#[test]
fn bad_page_tables_are_refused() {
    let nhd = KvLayout::Nhd;
    let invalid = |r: Result<KvIndex, Error>| matches!(r, Err(Error::InvalidInput(_)));
    assert!(invalid(KvIndex::paged(4, &[0, 2], &[0, 7], &[2], 4, nhd)));
    assert!(invalid(KvIndex::paged(4, &[0, 2], &[0, -1], &[2], 4, nhd)));
    assert!(invalid(KvIndex::paged(4, &[0, 1], &[0], &[0], 4, nhd)));
    assert!(invalid(KvIndex::paged(4, &[0, 0], &[], &[1], 4, nhd)));
    assert!(invalid(KvIndex::paged(4, &[0, 3], &[0, 1], &[1], 4, nhd)));
    assert!(invalid(KvIndex::paged(4, &[0, 1], &[0], &[1, 1], 4, nhd)));
    assert!(invalid(KvIndex::ragged(&[0, 5, 3], nhd)));
    let heads = Heads::new(2, 1, 8).unwrap();
    let kv = KvIndex::paged(4, &[0, 1], &[0], &[3], 1, nhd).unwrap();
    assert!(matches!(
        Batch::new(heads, &[0, 1, 2], kv),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn tampered_page_tables_are_refused_by_every_constructor() {
    // The fields are private (tests/ui/batch_fields_are_private.rs), so an edit can only come in
    // through a constructor: each one an old `Batch` with public fields let through to the kernels.
    let nhd = KvLayout::Nhd;
    let heads = Heads::new(2, 1, 8).unwrap();
    let (indptr, pages, last) = ([0, 2, 3], [0, 1, 2], [4, 3]);
    let good = KvIndex::paged(4, &indptr, &pages, &last, 3, nhd).unwrap();
    assert!(Batch::new(heads, &[0, 2, 3], good).is_ok());
    let refused = |r: Result<KvIndex, Error>, want: &str| match r {
        Err(Error::InvalidInput(m)) => assert!(m.contains(want), "{m}"),
        other => panic!("expected an error naming {want:?}, got {other:?}"),
    };
    refused(
        KvIndex::paged(4, &indptr, &[0, 1000, 2], &last, 3, nhd),
        "kv_indices[1] = 1000",
    );
    refused(
        KvIndex::paged(4, &indptr, &[0, -1, 2], &last, 3, nhd),
        "kv_indices[1] = -1",
    );
    refused(
        KvIndex::paged(4, &indptr, &pages, &[100, 3], 3, nhd),
        "kv_last_page_len[0] = 100",
    );
    refused(
        KvIndex::paged(4, &[0, 9, 3], &pages, &last, 3, nhd),
        "must not decrease",
    );
    refused(
        KvIndex::paged(4, &[0, 2, 2], &pages, &last, 3, nhd),
        "ends at 2",
    );
    refused(KvIndex::ragged_in(&[0, 5, 9], 8, nhd), "reach token 9");
    let kv = KvIndex::paged(4, &indptr, &pages, &last, 3, nhd).unwrap();
    let e = Batch::new(heads, &[0, 2], kv.clone()).unwrap_err();
    assert!(e.to_string().contains("describes 1 requests"), "{e}");
    let e = Batch::new(heads, &[0, 3, 2], kv).unwrap_err();
    assert!(e.to_string().contains("must not decrease"), "{e}");
    assert!(Heads::new(2, 0, 8).is_err());
}

#[test]
fn the_worst_request_and_head_bound_what_a_batch_average_hides() {
    let mut rng = rng("worst");
    // One long request among short ones: its output, an average over 4000 values, is small, so
    // zeroing it barely moves the batch's error (the old GPU tests' only bound).
    let kv_lens: Vec<u32> = std::iter::once(4000).chain([1; 23]).collect();
    let p = Problem::random(&mut rng, (4, 2, 16), &[1; 24], &kv_lens);
    let (kv, k, v) = p.store(Storage::Ragged(KvLayout::Nhd), &mut rng);
    let batch = Batch::new(p.heads, &p.qo_indptr(), kv).unwrap();
    let want = reference::attention(&Plain, &batch, &p.q, &k, &v).unwrap();
    let exact: Vec<f32> = want.o.iter().map(|&x| x as f32).collect();
    assert!(reference::worst_rel_l2(&batch, &exact, &want.o).0 < 1e-6);
    let mut got = exact.clone();
    got[..4 * 16].fill(0.0);
    let average = reference::rel_l2(&got, &want.o);
    assert!(average < 1e-2, "the batch average hides it: {average}");
    let (err, request, _) = reference::worst_rel_l2(&batch, &got, &want.o);
    assert_eq!((err, request), (1.0, 0));
}

#[test]
fn short_parameter_arrays_are_refused_before_any_hook_runs() {
    let mut rng = rng("coverage");
    // 2 requests, 4 query heads, 2 KV heads: slopes need 4, scales 2 * 2.
    let p = Problem::random(&mut rng, (4, 2, 8), &[2, 1], &[3, 4]);
    let (kv, k, v) = p.store(Storage::Ragged(KvLayout::Nhd), &mut rng);
    let batch = Batch::new(p.heads, &p.qo_indptr(), kv).unwrap();
    let run = |slopes: usize, scales: usize| {
        let variant = HeadBias {
            slopes: Array::new(vec![0.5; slopes]),
            scales: Array::new(vec![1.0; scales]),
        };
        reference::attention(&variant, &batch, &p.q, &k, &v)
    };
    assert!(run(4, 4).is_ok());
    // Longer than needed is fine.
    assert!(run(7, 9).is_ok());
    let err = run(3, 4).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(
        err.to_string()
            .contains("HeadBias.slopes has 3 elements but must cover num_qo_heads = 4"),
        "{err}"
    );
    let err = run(4, 3).unwrap_err();
    assert!(
        err.to_string().contains(
            "HeadBias.scales has 3 elements but must cover batch * num_kv_heads = 2 * 2 = 4"
        ),
        "{err}"
    );
}

#[test]
fn an_index_out_of_range_in_a_hook_is_an_error_not_a_panic() {
    let mut rng = rng("indirect");
    let p = Problem::random(&mut rng, (2, 1, 8), &[1, 2], &[3, 4]);
    let (kv, k, v) = p.store(Storage::Ragged(KvLayout::Nhd), &mut rng);
    let batch = Batch::new(p.heads, &p.qo_indptr(), kv).unwrap();
    let run = |offsets: Vec<u32>, bits: usize| {
        let variant = Indirect {
            offsets: Array::new(offsets),
            bits: Array::new(vec![1; bits]),
        };
        reference::attention(&variant, &batch, &p.q, &k, &v)
    };
    let want = Formula::plain(8).eval(&p, &p.dense());
    assert_close(&run(vec![0, 3], 7).unwrap(), &want, TOL);
    // Covered (one offset per request), but request 1 reads bits 5..9 of 7.
    let err = run(vec![0, 5], 7).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("a hook of Indirect panicked at request 1, query row 0, query head 0")
            && msg.contains("index 7 out of range of a parameter array of 7 elements"),
        "{msg}"
    );
    // Not covered: refused before the hook runs.
    let err = run(vec![0], 7).unwrap_err();
    assert!(
        err.to_string()
            .contains("Indirect.offsets has 1 elements but must cover batch = 2"),
        "{err}"
    );
}

#[test]
fn nan_in_q_or_k_gives_nan_rows() {
    let mut rng = rng("nan");
    let (hq, d) = (4usize, 8usize);
    // Request 0: a decode row over 5 keys; request 1: 3 rows, causal, over 3 keys.
    let mut p = Problem::random(&mut rng, (4, 2, 8), &[1, 3], &[5, 3]);
    // q of row 0, head 1; one element is enough.
    p.q[d + 3] = f32::NAN;
    // Key 0 of request 1, KV head 1 (query heads 2 and 3): seen by every row of request 1.
    p.keys[1][d + 5] = f32::NAN;
    for storage in [
        Storage::Ragged(KvLayout::Nhd),
        Storage::Paged(2, KvLayout::Hnd),
    ] {
        let got = p.run(&Plain, storage, true, &mut rng);
        let row_nan = |at: usize| {
            got.lse[at].is_nan() && got.o[at * d..(at + 1) * d].iter().all(|x| x.is_nan())
        };
        let row_finite = |at: usize| {
            got.lse[at].is_finite() && got.o[at * d..(at + 1) * d].iter().all(|x| x.is_finite())
        };
        let nan: Vec<usize> = (0..4 * hq).filter(|&at| row_nan(at)).collect();
        // Row 0 head 1; rows 1..=3 of request 1 (global rows 1, 2, 3), heads 2 and 3.
        assert_eq!(nan, [1, 6, 7, 10, 11, 14, 15], "{storage:?}");
        assert!(
            (0..4 * hq).all(|at| nan.contains(&at) || row_finite(at)),
            "{storage:?}"
        );
        // The naive formula agrees, NaN rows included.
        let f = Formula {
            causal: true,
            ..Formula::plain(8)
        };
        assert_close(&got, &f.eval(&p, &p.dense()), TOL);
    }
}

#[test]
fn nan_keys_that_are_masked_out_do_not_matter() {
    let mut rng = rng("nan-masked");
    let d = 8;
    let mut p = Problem::random(&mut rng, (2, 1, 8), &[2, 3], &[2, 1]);
    // Request 0: key 1 is NaN but causal hides it from row 0, which then sees key 0 only.
    p.keys[0][d..2 * d].fill(f32::NAN);
    // Request 1 has 3 rows over 1 key: causal rows 0 and 1 see nothing and stay empty, even
    // with a NaN query; row 2 sees the key.
    // q is [row, head, dim]: global rows 2 and 3, both heads.
    p.q[2 * 2 * d..4 * 2 * d].fill(f32::NAN);
    let got = p.run(&Plain, Storage::Paged(1, KvLayout::Nhd), true, &mut rng);
    let f = Formula {
        causal: true,
        ..Formula::plain(8)
    };
    assert_close(&got, &f.eval(&p, &p.dense()), TOL);
    // Row 0 of request 0 (heads 0, 1): finite. Row 1: NaN.
    assert!(got.lse[0..2].iter().all(|x| x.is_finite()));
    assert!(got.lse[2..4].iter().all(|x| x.is_nan()));
    // Request 1, rows 0 and 1: empty, o = 0 and lse = -inf, NaN query or not.
    assert!(got.lse[4..8].iter().all(|&x| x == f64::NEG_INFINITY));
    assert!(got.o[4 * d..8 * d].iter().all(|&x| x == 0.0));
    assert!(got.lse[8..10].iter().all(|x| x.is_finite()));
}
