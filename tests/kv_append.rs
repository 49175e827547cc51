//! KV append. CPU: the plan writes every new token at the slot a naive page walk gives (NHD,
//! HND, page sizes 1 to 16, ragged caches) and nothing else; replan and padded rows; the fused
//! RoPE + append against the naive rotation; the explicit page-table form against the plan; every
//! error. GPU (`gpu_*`): the same on random data, caches poisoned with NaN whose untouched slots
//! must stay NaN, and the explicit form skipping every out-of-range token.

use ferrinfer::ops::kv_append::{
    AppendPlan, KvCacheMut, NewKv, PageTable, PagedCache, append_explicit,
};
use ferrinfer::ops::rope::{self, Angles, Frequencies, Positions, QkMut, Rope, RopeLayout};
use ferrinfer::prelude::*;
use ferrinfer::{DType, Element, Error, indptr};
use ferrinfer_testkit::Rng;

/// One step: the cache index after the append, the new tokens' qo_indptr, and each request's
/// blocks (pages, or the first token of a ragged request).
struct Step {
    heads: Heads,
    kv: KvIndex,
    qo_indptr: Vec<i32>,
    lens: Vec<u32>,
    blocks: Vec<Vec<i32>>,
}

impl Step {
    fn paged(
        rng: &mut Rng,
        heads: Heads,
        page: u32,
        layout: KvLayout,
        lens: &[u32],
        new: &[u32],
    ) -> Self {
        let counts: Vec<u32> = lens.iter().map(|l| l.div_ceil(page)).collect();
        let total: u32 = counts.iter().sum();
        let spare = 3;
        let mut ids: Vec<i32> = (0..(total + spare) as i32).collect();
        rng.shuffle(&mut ids);
        let mut blocks = Vec::new();
        let mut at = 0usize;
        for &c in &counts {
            blocks.push(ids[at..at + c as usize].to_vec());
            at += c as usize;
        }
        let pages: Vec<i32> = blocks.concat();
        let kv = KvIndex::paged_from_lens(page, lens, &pages, total + spare, layout).unwrap();
        Step {
            heads,
            kv,
            qo_indptr: indptr(new),
            lens: lens.to_vec(),
            blocks,
        }
    }
    /// A ragged cache: request `b` holds tokens `kv_indptr[b]..` of K and V, packed.
    fn ragged(heads: Heads, layout: KvLayout, lens: &[u32], new: &[u32]) -> Self {
        let kv_indptr = indptr(lens);
        let total = *kv_indptr.last().unwrap() as u32;
        // Three spare tokens at the end.
        let kv = KvIndex::ragged_in(&kv_indptr, total + 3, layout).unwrap();
        let blocks = kv_indptr[..lens.len()].iter().map(|&s| vec![s]).collect();
        Step {
            heads,
            kv,
            qo_indptr: indptr(new),
            lens: lens.to_vec(),
            blocks,
        }
    }
    fn rows(&self) -> usize {
        *self.qo_indptr.last().unwrap() as usize
    }
    fn row(&self) -> usize {
        (self.heads.num_kv_heads() * self.heads.head_dim()) as usize
    }
    /// Element offset of `(b, position j, head h)` by a naive walk of the blocks.
    fn naive_offset(&self, b: usize, j: u32, h: u32) -> usize {
        let (hk, d) = (
            self.heads.num_kv_heads() as usize,
            self.heads.head_dim() as usize,
        );
        let h = h as usize;
        match self.kv.page_size() {
            Some(p) => {
                let page = self.blocks[b][(j / p) as usize] as usize;
                let (p, s) = (p as usize, (j % p) as usize);
                match self.kv.layout() {
                    KvLayout::Nhd => ((page * p + s) * hk + h) * d,
                    KvLayout::Hnd => ((page * hk + h) * p + s) * d,
                }
            }
            None => {
                let t = self.blocks[b][0] as usize + j as usize;
                match self.kv.layout() {
                    KvLayout::Nhd => (t * hk + h) * d,
                    KvLayout::Hnd => (h * self.kv.capacity() as usize + t) * d,
                }
            }
        }
    }
    /// `(row, request, position)` of every new token.
    fn new_tokens(&self) -> Vec<(usize, usize, u32)> {
        let mut out = Vec::new();
        for b in 0..self.lens.len() {
            let (s, e) = (self.qo_indptr[b], self.qo_indptr[b + 1]);
            let n = (e - s) as u32;
            for i in 0..n {
                out.push(((s as u32 + i) as usize, b, self.lens[b] - n + i));
            }
        }
        out
    }
    /// The cache `before` with each new token's K (through `turn`) at its slot.
    fn expected<T: Copy>(
        &self,
        before: &[T],
        new: &[T],
        turn: impl Fn(usize, &[T]) -> Vec<T>,
    ) -> Vec<T> {
        let mut out = before.to_vec();
        let d = self.heads.head_dim() as usize;
        for (r, b, j) in self.new_tokens() {
            let row = turn(r, &new[r * self.row()..][..self.row()]);
            for h in 0..self.heads.num_kv_heads() {
                let o = self.naive_offset(b, j, h);
                out[o..o + d].copy_from_slice(&row[h as usize * d..][..d]);
            }
        }
        out
    }
}

fn random<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.normal())).collect()
}

fn nan<T: Element>() -> T {
    T::from_f32(f32::NAN)
}

/// Equal, with NaN equal to NaN.
fn same<T: Element>(a: &[T], b: &[T]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).position(|(x, y)| {
        let (x, y) = (x.to_f32(), y.to_f32());
        !(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    })
}

fn steps(rng: &mut Rng) -> Vec<Step> {
    let mut out = Vec::new();
    for layout in [KvLayout::Nhd, KvLayout::Hnd] {
        for (hk, d) in [(2, 8), (1, 6), (4, 128)] {
            let heads = Heads::new(2 * hk, hk, d).unwrap();
            for page in [1, 3, 16] {
                // Decode-like, prefill-like (all tokens new), and a request with nothing new.
                out.push(Step::paged(
                    rng,
                    heads,
                    page,
                    layout,
                    &[5, 17, 1, 33],
                    &[1, 1, 1, 1],
                ));
                out.push(Step::paged(
                    rng,
                    heads,
                    page,
                    layout,
                    &[7, 16, 2],
                    &[7, 3, 0],
                ));
            }
            out.push(Step::ragged(heads, layout, &[4, 9, 1], &[2, 9, 0]));
        }
    }
    out
}

fn cpu_plan<T: Element>() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for s in steps(&mut rng) {
        let what = format!("{:?} {:?} (seed {seed})", T::DTYPE, s.kv);
        let plan = AppendPlan::new(&cpu, s.heads, &s.kv, &s.qo_indptr, 64).unwrap();
        assert_eq!(plan.tokens() as usize, s.rows());
        let positions = plan.positions().to_vec().unwrap();
        for (r, _, j) in s.new_tokens() {
            assert_eq!(positions[r], j as i32, "{what}");
        }
        let (k, v): (Vec<T>, Vec<T>) = (
            random(&mut rng, s.rows() * s.row()),
            random(&mut rng, s.rows() * s.row()),
        );
        let before: Vec<T> = vec![nan(); s.kv.buffer_len(&s.heads)];
        let (nk, nv) = (cpu.upload(&k).unwrap(), cpu.upload(&v).unwrap());
        let (mut kc, mut vc) = (cpu.upload(&before).unwrap(), cpu.upload(&before).unwrap());
        plan.run(
            &cpu,
            NewKv { k: &nk, v: &nv },
            KvCacheMut {
                k: &mut kc,
                v: &mut vc,
            },
        )
        .unwrap();
        let want_k = s.expected(&before, &k, |_, x| x.to_vec());
        let want_v = s.expected(&before, &v, |_, x| x.to_vec());
        assert_eq!(same(&kc.to_vec().unwrap(), &want_k), None, "k: {what}");
        assert_eq!(same(&vc.to_vec().unwrap(), &want_v), None, "v: {what}");
    }
}

#[test]
fn cpu_plan_writes_every_new_token_at_its_slot_and_nothing_else() {
    cpu_plan::<bf16>();
    cpu_plan::<f16>();
}

#[test]
fn replan_moves_the_plan_and_padded_rows_are_not_written() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let heads = Heads::new(4, 2, 8).unwrap();
    let s1 = Step::paged(&mut rng, heads, 4, KvLayout::Nhd, &[5, 8], &[1, 1]);
    // The next step on the same cache: both requests one token longer.
    let pages: Vec<i32> = s1.blocks.concat();
    let mut s2 = Step::paged(&mut rng, heads, 4, KvLayout::Nhd, &[6, 9], &[1, 1]);
    let mut pages2 = s1.blocks.clone();
    let spare = (0..s1.kv.capacity() as i32)
        .find(|p| !pages.contains(p))
        .unwrap();
    pages2[1].push(spare); // request 1 grows onto a spare page
    s2.kv = KvIndex::paged_from_lens(
        4,
        &[6, 9],
        &pages2.concat(),
        s1.kv.capacity(),
        KvLayout::Nhd,
    )
    .unwrap();
    s2.blocks = pages2.clone();
    let mut plan = AppendPlan::new(&cpu, heads, &s1.kv, &s1.qo_indptr, 4).unwrap();
    plan.replan(&s2.kv, &s2.qo_indptr).unwrap();
    assert_eq!(plan.tokens(), 2);
    // Four rows (a padded batch); rows 2 and 3 are not written.
    let (k, v): (Vec<bf16>, Vec<bf16>) = (random(&mut rng, 4 * 16), random(&mut rng, 4 * 16));
    let before = vec![nan::<bf16>(); s2.kv.buffer_len(&heads)];
    let (nk, nv) = (cpu.upload(&k).unwrap(), cpu.upload(&v).unwrap());
    let (mut kc, mut vc) = (cpu.upload(&before).unwrap(), cpu.upload(&before).unwrap());
    plan.run(
        &cpu,
        NewKv { k: &nk, v: &nv },
        KvCacheMut {
            k: &mut kc,
            v: &mut vc,
        },
    )
    .unwrap();
    assert_eq!(
        same(
            &kc.to_vec().unwrap(),
            &s2.expected(&before, &k, |_, x| x.to_vec())
        ),
        None
    );
    assert_eq!(
        same(
            &vc.to_vec().unwrap(),
            &s2.expected(&before, &v, |_, x| x.to_vec())
        ),
        None
    );
    // A cache of another geometry is refused.
    let other = KvIndex::paged_from_lens(
        4,
        &[6, 9],
        &pages2.concat(),
        s1.kv.capacity() + 1,
        KvLayout::Nhd,
    )
    .unwrap();
    assert!(
        plan.replan(&other, &s2.qo_indptr)
            .unwrap_err()
            .to_string()
            .contains("replan")
    );
    let hnd = KvIndex::paged_from_lens(
        4,
        &[6, 9],
        &pages2.concat(),
        s1.kv.capacity(),
        KvLayout::Hnd,
    )
    .unwrap();
    assert!(plan.replan(&hnd, &s2.qo_indptr).is_err());
}

/// The naive rotation of one token's heads at `pos` (NeoX or GPT-J, rotary dims `rd`), in f64.
fn naive_turn(
    layout: RopeLayout,
    f: Frequencies,
    rd: u32,
    d: usize,
    pos: i64,
    x: &[f64],
) -> Vec<f64> {
    let mut out = x.to_vec();
    let half = rd as usize / 2;
    for h in 0..x.len() / d {
        for j in 0..half {
            let a = pos as f64 * f.frequency(j as u32, rd);
            let (c, s) = (a.cos(), a.sin());
            let (i1, i2) = match layout {
                RopeLayout::NeoX => (h * d + j, h * d + j + half),
                RopeLayout::GptJ => (h * d + 2 * j, h * d + 2 * j + 1),
            };
            out[i1] = x[i1] * c - x[i2] * s;
            out[i2] = x[i2] * c + x[i1] * s;
        }
    }
    out
}

fn f64s<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| f64::from(x.to_f32())).collect()
}

fn ulp<T: Element>() -> f64 {
    match T::DTYPE {
        DType::Bf16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
    }
}

/// Within rounding of the naive values; NaN exactly where `want` is NaN.
fn close<T: Element>(got: &[T], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let g = f64::from(g.to_f32());
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            (g - w).abs() <= tol * w.abs() + 1e-6
        };
        assert!(ok, "{what}: element {i} = {g}, want {w}");
    }
}

/// The fused run on `backend`, checked against the naive rotation with tolerance `tol`.
fn fused<T: Element>(backend: &Backend, tol: f64) {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for s in steps(&mut rng) {
        for layout in [RopeLayout::NeoX, RopeLayout::GptJ] {
            let d = s.heads.head_dim();
            let rd = if d > 8 { d / 2 } else { d };
            let rope = Rope::new(s.heads, rd, layout).unwrap();
            let f = Frequencies::llama31();
            let what = format!("{:?} {layout:?} rd {rd} {:?} (seed {seed})", T::DTYPE, s.kv);
            let plan = AppendPlan::new(backend, s.heads, &s.kv, &s.qo_indptr, 64).unwrap();
            let n = s.rows();
            let (k, v): (Vec<T>, Vec<T>) =
                (random(&mut rng, n * s.row()), random(&mut rng, n * s.row()));
            let q: Vec<T> = random(&mut rng, rope.q_len(n));
            let before: Vec<T> = vec![nan(); s.kv.buffer_len(&s.heads)];
            let (nk, nv) = (backend.upload(&k).unwrap(), backend.upload(&v).unwrap());
            let mut qb = backend.upload(&q).unwrap();
            let (mut kc, mut vc) = (
                backend.upload(&before).unwrap(),
                backend.upload(&before).unwrap(),
            );
            plan.run_with_rope(
                backend,
                &rope,
                Angles::Computed(f),
                &mut qb,
                NewKv { k: &nk, v: &nv },
                KvCacheMut {
                    k: &mut kc,
                    v: &mut vc,
                },
            )
            .unwrap();
            let pos: Vec<i64> = {
                let mut p = vec![0i64; n];
                for (r, _, j) in s.new_tokens() {
                    p[r] = i64::from(j);
                }
                p
            };
            let du = d as usize;
            let qt = rope.q_len(1);
            let want_q: Vec<f64> = (0..n)
                .flat_map(|t| naive_turn(layout, f, rd, du, pos[t], &f64s(&q[t * qt..][..qt])))
                .collect();
            close(&qb.to_vec().unwrap(), &want_q, tol, &format!("q: {what}"));
            let before_f: Vec<f64> = vec![f64::NAN; before.len()];
            let kf = f64s(&k);
            let want_k = s.expected(&before_f, &kf, |t, x| {
                naive_turn(layout, f, rd, du, pos[t], x)
            });
            close(&kc.to_vec().unwrap(), &want_k, tol, &format!("k: {what}"));
            assert_eq!(
                same(
                    &vc.to_vec().unwrap(),
                    &s.expected(&before, &v, |_, x| x.to_vec())
                ),
                None,
                "v: {what}"
            );
        }
    }
}

#[test]
fn cpu_fused_rope_append_turns_keys_into_the_cache_and_queries_in_place() {
    fused::<bf16>(&Backend::Cpu, ulp::<bf16>());
    fused::<f16>(&Backend::Cpu, ulp::<f16>());
}

#[test]
fn fused_positions_are_the_plans_and_match_plain_rope() {
    // The fused q equals rope::apply_in_place with the plan's positions.
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let heads = Heads::new(4, 2, 16).unwrap();
    let s = Step::paged(&mut rng, heads, 4, KvLayout::Hnd, &[9, 3], &[3, 2]);
    let plan = AppendPlan::new(&cpu, heads, &s.kv, &s.qo_indptr, 5).unwrap();
    let rope = Rope::new(heads, 16, RopeLayout::NeoX).unwrap();
    let f = Angles::Computed(Frequencies::new(10_000.0).unwrap());
    let q: Vec<bf16> = random(&mut rng, rope.q_len(5));
    let k: Vec<bf16> = random(&mut rng, rope.k_len(5));
    let mut q1 = cpu.upload(&q).unwrap();
    let (nk, nv) = (cpu.upload(&k).unwrap(), cpu.upload(&k).unwrap());
    let mut kc = cpu.filled(s.kv.buffer_len(&heads), bf16::ZERO).unwrap();
    let mut vc = cpu.filled(s.kv.buffer_len(&heads), bf16::ZERO).unwrap();
    plan.run_with_rope(
        &cpu,
        &rope,
        f,
        &mut q1,
        NewKv { k: &nk, v: &nv },
        KvCacheMut {
            k: &mut kc,
            v: &mut vc,
        },
    )
    .unwrap();
    let (mut q2, mut k2) = (cpu.upload(&q).unwrap(), cpu.upload(&k).unwrap());
    rope::apply_in_place(
        &cpu,
        &rope,
        f,
        Positions::PerToken(plan.positions()),
        QkMut {
            q: &mut q2,
            k: &mut k2,
        },
    )
    .unwrap();
    assert_eq!(q1.to_vec().unwrap(), q2.to_vec().unwrap());
    assert_eq!(plan.positions().to_vec().unwrap(), vec![6, 7, 8, 1, 2]);
}

/// FlashInfer's arrays for a step: per-token request and position, and the page table.
struct Table {
    batch_indices: Vec<i32>,
    positions: Vec<i32>,
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    last: Vec<i32>,
}

fn table_of(s: &Step) -> Table {
    let mut t = Table {
        batch_indices: vec![0; s.rows()],
        positions: vec![0; s.rows()],
        kv_indptr: s.kv.indptr().to_vec(),
        kv_indices: s.kv.indices().to_vec(),
        last: s.kv.last_len().to_vec(),
    };
    for (r, b, j) in s.new_tokens() {
        t.batch_indices[r] = b as i32;
        t.positions[r] = j as i32;
    }
    t
}

fn explicit<T: Element>(
    backend: &Backend,
    s: &Step,
    t: &Table,
    k: &[T],
    v: &[T],
    before: &[T],
) -> ferrinfer::Result<(Vec<T>, Vec<T>)> {
    let up = |x: &[i32]| backend.upload(x).unwrap();
    let (bi, pos, ip, ix, last) = (
        up(&t.batch_indices),
        up(&t.positions),
        up(&t.kv_indptr),
        up(&t.kv_indices),
        up(&t.last),
    );
    let (nk, nv) = (backend.upload(k).unwrap(), backend.upload(v).unwrap());
    let (mut kc, mut vc) = (
        backend.upload(before).unwrap(),
        backend.upload(before).unwrap(),
    );
    append_explicit(
        backend,
        PagedCache {
            heads: s.heads,
            page_size: s.kv.page_size().unwrap(),
            layout: s.kv.layout(),
        },
        PageTable {
            batch_indices: &bi,
            positions: &pos,
            kv_indptr: &ip,
            kv_indices: &ix,
            kv_last_page_len: &last,
        },
        NewKv { k: &nk, v: &nv },
        KvCacheMut {
            k: &mut kc,
            v: &mut vc,
        },
    )?;
    Ok((kc.to_vec().unwrap(), vc.to_vec().unwrap()))
}

#[test]
fn cpu_explicit_page_table_matches_the_plan_and_refuses_bad_indices() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    for s in steps(&mut rng)
        .iter()
        .filter(|s| s.kv.page_size().is_some())
    {
        let t = table_of(s);
        let (k, v): (Vec<bf16>, Vec<bf16>) = (
            random(&mut rng, s.rows() * s.row()),
            random(&mut rng, s.rows() * s.row()),
        );
        let before = vec![nan::<bf16>(); s.kv.buffer_len(&s.heads)];
        let (kc, vc) = explicit(&cpu, s, &t, &k, &v, &before).unwrap();
        assert_eq!(same(&kc, &s.expected(&before, &k, |_, x| x.to_vec())), None);
        assert_eq!(same(&vc, &s.expected(&before, &v, |_, x| x.to_vec())), None);
        for (rows, bad) in bad_tables(s, &t) {
            let e = explicit(&cpu, s, &bad, &k, &v, &before).unwrap_err();
            assert!(
                e.to_string().contains(&format!("new token {} ", rows[0])),
                "{e}"
            );
        }
    }
}

/// Tables with one bad index each: the new tokens it makes bad (rows, ascending), and the table.
fn bad_tables(s: &Step, t: &Table) -> Vec<(Vec<usize>, Table)> {
    let clone = |t: &Table| Table {
        batch_indices: t.batch_indices.clone(),
        positions: t.positions.clone(),
        kv_indptr: t.kv_indptr.clone(),
        kv_indices: t.kv_indices.clone(),
        last: t.last.clone(),
    };
    let mut out = Vec::new();
    let r = s.rows() - 1;
    let b = t.batch_indices[r] as usize;
    let len = s.lens[b] as i32;
    for (batch, value) in [
        (true, s.lens.len() as i32),
        (true, -1),
        (false, len),
        (false, -1),
    ] {
        let mut x = clone(t);
        if batch {
            x.batch_indices[r] = value;
        } else {
            x.positions[r] = value;
        }
        out.push((vec![r], x));
    }
    // A page id past the cache: every new token of request b on that page is bad.
    let p = s.kv.page_size().unwrap();
    let page_of = |j: u32| t.kv_indptr[b] as usize + (j / p) as usize;
    let page = page_of(t.positions[r] as u32);
    let mut x = clone(t);
    x.kv_indices[page] = s.kv.capacity() as i32;
    let rows = s
        .new_tokens()
        .iter()
        .filter(|n| n.1 == b && page_of(n.2) == page)
        .map(|n| n.0)
        .collect();
    out.push((rows, x));
    // A last-page length of 0: every new token of request b is bad.
    let mut x = clone(t);
    x.last[b] = 0;
    out.push((
        s.new_tokens()
            .iter()
            .filter(|n| n.1 == b)
            .map(|n| n.0)
            .collect(),
        x,
    ));
    out
}

fn invalid<X: std::fmt::Debug>(r: ferrinfer::Result<X>, needle: &str) {
    match r {
        Err(Error::InvalidInput(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected an invalid-input error naming {needle:?}, got {other:?}"),
    }
}

#[test]
fn every_bad_plan_or_run_is_an_error_naming_it() {
    let cpu = Backend::Cpu;
    let mut rng = Rng::from_time();
    let heads = Heads::new(2, 1, 4).unwrap();
    let s = Step::paged(&mut rng, heads, 2, KvLayout::Nhd, &[3, 2], &[2, 1]);
    let plan = |ip: &[i32], cap: u32| AppendPlan::new(&cpu, heads, &s.kv, ip, cap);
    invalid(plan(&[0, 2], 8), "qo_indptr has 2 entries for a batch of 2");
    invalid(plan(&[1, 2, 3], 8), "qo_indptr[0] must be 0");
    invalid(plan(&[0, 2, 1], 8), "must not decrease");
    invalid(plan(&[0, 2, 3], 2), "capacity of 2");
    invalid(
        plan(&[0, 4, 5], 8),
        "request 0 appends 4 tokens but holds only 3",
    );
    invalid(plan(&[0, 2, 3], u32::MAX), "capacity");
    let p = plan(&[0, 2, 3], 4).unwrap();
    let z = bf16::ONE;
    let run = |k: usize, v: usize, kc: usize, vc: usize| {
        let (nk, nv) = (cpu.filled(k, z).unwrap(), cpu.filled(v, z).unwrap());
        let (mut kc, mut vc) = (cpu.filled(kc, z).unwrap(), cpu.filled(vc, z).unwrap());
        p.run(
            &cpu,
            NewKv { k: &nk, v: &nv },
            KvCacheMut {
                k: &mut kc,
                v: &mut vc,
            },
        )
    };
    let c = s.kv.buffer_len(&heads);
    run(12, 12, c, c).unwrap();
    run(16, 16, c, c).unwrap(); // one padded row
    invalid(run(8, 8, c, c), "with 3 to 4 rows");
    invalid(run(20, 20, c, c), "with 3 to 4 rows");
    invalid(run(12, 16, c, c), "new k has 12 and v 16");
    invalid(run(13, 13, c, c), "new k has 13");
    invalid(run(12, 12, c - 1, c), "k_cache has");
    invalid(run(12, 12, c, c + 4), "v_cache has");
    // The fused form: rope of other heads, q of other rows.
    let rope = Rope::new(Heads::new(4, 1, 4).unwrap(), 4, RopeLayout::NeoX).unwrap();
    let good = Rope::new(heads, 4, RopeLayout::NeoX).unwrap();
    let f = Angles::Computed(Frequencies::new(1e4).unwrap());
    let fused = |rope: &Rope, q: usize| {
        let mut qb = cpu.filled(q, z).unwrap();
        let (nk, nv) = (cpu.filled(12, z).unwrap(), cpu.filled(12, z).unwrap());
        let (mut kc, mut vc) = (cpu.filled(c, z).unwrap(), cpu.filled(c, z).unwrap());
        p.run_with_rope(
            &cpu,
            rope,
            f,
            &mut qb,
            NewKv { k: &nk, v: &nv },
            KvCacheMut {
                k: &mut kc,
                v: &mut vc,
            },
        )
    };
    invalid(fused(&rope, 48), "rope is for");
    invalid(fused(&good, 20), "q has 20 elements");
    fused(&good, 24).unwrap();
    // A cos/sin cache too short for position 2 on the CPU: an error naming the token.
    let table = cpu.filled(2 * 4, 1.0f32).unwrap();
    let mut qb = cpu.filled(24, z).unwrap();
    let (nk, nv) = (cpu.filled(12, z).unwrap(), cpu.filled(12, z).unwrap());
    let (mut kc, mut vc) = (cpu.filled(c, z).unwrap(), cpu.filled(c, z).unwrap());
    invalid(
        p.run_with_rope(
            &cpu,
            &good,
            Angles::Cache(&table),
            &mut qb,
            NewKv { k: &nk, v: &nv },
            KvCacheMut {
                k: &mut kc,
                v: &mut vc,
            },
        ),
        "token 1 is at position 2",
    );
    // The explicit form's host checks.
    let t = table_of(&s);
    let (k, v) = (vec![z; 12], vec![z; 12]);
    let before = vec![z; c];
    invalid(
        explicit(
            &cpu,
            &s,
            &Table {
                positions: vec![0; 2],
                ..table_of(&s)
            },
            &k,
            &v,
            &before,
        ),
        "positions 2 entries for 3",
    );
    invalid(
        explicit(
            &cpu,
            &s,
            &Table {
                last: vec![1],
                ..table_of(&s)
            },
            &k,
            &v,
            &before,
        ),
        "kv_last_page_len 1",
    );
    invalid(
        explicit(&cpu, &s, &t, &k, &v[..8], &before),
        "new k has 12 and v 8",
    );
    invalid(
        explicit(&cpu, &s, &t, &k, &v, &before[..c - 1]),
        "whole pages",
    );
}

// ---- GPU ----

fn gpu() -> Backend {
    Backend::cuda(0).expect("a CUDA GPU")
}

fn gpu_plan<T: Element>() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for s in steps(&mut rng) {
        let what = format!("{:?} {:?} (seed {seed})", T::DTYPE, s.kv);
        let plan = AppendPlan::new(&gpu, s.heads, &s.kv, &s.qo_indptr, 64).unwrap();
        let (k, v): (Vec<T>, Vec<T>) = (
            random(&mut rng, s.rows() * s.row()),
            random(&mut rng, s.rows() * s.row()),
        );
        let before: Vec<T> = vec![nan(); s.kv.buffer_len(&s.heads)];
        let (nk, nv) = (gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap());
        let (mut kc, mut vc) = (gpu.upload(&before).unwrap(), gpu.upload(&before).unwrap());
        plan.run(
            &gpu,
            NewKv { k: &nk, v: &nv },
            KvCacheMut {
                k: &mut kc,
                v: &mut vc,
            },
        )
        .unwrap();
        assert_eq!(
            same(
                &kc.to_vec().unwrap(),
                &s.expected(&before, &k, |_, x| x.to_vec())
            ),
            None,
            "k: {what}"
        );
        assert_eq!(
            same(
                &vc.to_vec().unwrap(),
                &s.expected(&before, &v, |_, x| x.to_vec())
            ),
            None,
            "v: {what}"
        );
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_append_plan_writes_exactly_the_new_slots() {
    gpu_plan::<bf16>();
    gpu_plan::<f16>();
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_append_replan_reuses_buffers_and_skips_padded_rows() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let heads = Heads::new(32, 8, 128).unwrap();
    let lens1: Vec<u32> = (0..37).map(|_| 1 + rng.below(100) as u32).collect();
    let s1 = Step::paged(&mut rng, heads, 16, KvLayout::Nhd, &lens1, &[1; 37]);
    let mut plan = AppendPlan::new(&gpu, heads, &s1.kv, &s1.qo_indptr, 64).unwrap();
    let before = vec![nan::<bf16>(); s1.kv.buffer_len(&heads)];
    let mut kc = gpu.upload(&before).unwrap();
    let mut vc = gpu.upload(&before).unwrap();
    // Step 2 on the same cache buffers, pages re-dealt; 40 rows passed for 37 tokens.
    let mut ids: Vec<i32> = (0..s1.kv.capacity() as i32).collect();
    rng.shuffle(&mut ids);
    let counts: Vec<usize> = lens1.iter().map(|l| l.div_ceil(16) as usize).collect();
    let mut blocks = Vec::new();
    let mut at = 0;
    for c in counts {
        blocks.push(ids[at..at + c].to_vec());
        at += c;
    }
    let kv2 = KvIndex::paged_from_lens(
        16,
        &lens1,
        &blocks.concat(),
        s1.kv.capacity(),
        KvLayout::Nhd,
    )
    .unwrap();
    let s2 = Step {
        kv: kv2,
        blocks,
        ..s1
    };
    plan.replan(&s2.kv, &s2.qo_indptr).unwrap();
    let (k, v): (Vec<bf16>, Vec<bf16>) = (
        random(&mut rng, 40 * s2.row()),
        random(&mut rng, 40 * s2.row()),
    );
    let (nk, nv) = (gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap());
    plan.run(
        &gpu,
        NewKv { k: &nk, v: &nv },
        KvCacheMut {
            k: &mut kc,
            v: &mut vc,
        },
    )
    .unwrap();
    assert_eq!(
        same(
            &kc.to_vec().unwrap(),
            &s2.expected(&before, &k, |_, x| x.to_vec())
        ),
        None
    );
    assert_eq!(
        same(
            &vc.to_vec().unwrap(),
            &s2.expected(&before, &v, |_, x| x.to_vec())
        ),
        None
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_fused_rope_append_matches_the_naive_rotation() {
    let gpu = gpu();
    // bf16 and f16 within their tolerances per element (looser than the CPU's rounding bound).
    fused::<bf16>(&gpu, 1e-2);
    fused::<f16>(&gpu, 2e-3);
}

fn gpu_explicit<T: Element>() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for s in steps(&mut rng)
        .iter()
        .filter(|s| s.kv.page_size().is_some())
    {
        let what = format!("{:?} {:?} (seed {seed})", T::DTYPE, s.kv);
        let t = table_of(s);
        let (k, v): (Vec<T>, Vec<T>) = (
            random(&mut rng, s.rows() * s.row()),
            random(&mut rng, s.rows() * s.row()),
        );
        let before: Vec<T> = vec![nan(); s.kv.buffer_len(&s.heads)];
        let (kc, vc) = explicit(&gpu, s, &t, &k, &v, &before).unwrap();
        assert_eq!(
            same(&kc, &s.expected(&before, &k, |_, x| x.to_vec())),
            None,
            "{what}"
        );
        assert_eq!(
            same(&vc, &s.expected(&before, &v, |_, x| x.to_vec())),
            None,
            "{what}"
        );
        // One bad index: that token is skipped, every other one written, nothing else touched.
        for (bad_rows, bad) in bad_tables(s, &t) {
            let (kc, vc) = explicit(&gpu, s, &bad, &k, &v, &before).unwrap();
            // The expected cache without the skipped tokens' writes.
            let skip = |new: &[T]| {
                let mut out = before.clone();
                let d = s.heads.head_dim() as usize;
                for (r, b, j) in s.new_tokens() {
                    if bad_rows.contains(&r) {
                        continue;
                    }
                    for h in 0..s.heads.num_kv_heads() {
                        let o = s.naive_offset(b, j, h);
                        out[o..o + d].copy_from_slice(&new[r * s.row() + h as usize * d..][..d]);
                    }
                }
                out
            };
            assert_eq!(
                same(&kc, &skip(&k)),
                None,
                "k, bad rows {bad_rows:?}: {what}"
            );
            assert_eq!(
                same(&vc, &skip(&v)),
                None,
                "v, bad rows {bad_rows:?}: {what}"
            );
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_append_explicit_writes_valid_tokens_and_skips_bad_ones() {
    gpu_explicit::<bf16>();
    gpu_explicit::<f16>();
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_append_of_no_tokens_is_a_no_op() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let heads = Heads::new(4, 2, 8).unwrap();
    let s = Step::paged(&mut rng, heads, 4, KvLayout::Nhd, &[3, 5], &[0, 0]);
    let plan = AppendPlan::new(&gpu, heads, &s.kv, &s.qo_indptr, 0).unwrap();
    let before = vec![nan::<bf16>(); s.kv.buffer_len(&heads)];
    let (nk, nv) = (
        gpu.upload::<bf16>(&[]).unwrap(),
        gpu.upload::<bf16>(&[]).unwrap(),
    );
    let (mut kc, mut vc) = (gpu.upload(&before).unwrap(), gpu.upload(&before).unwrap());
    plan.run(
        &gpu,
        NewKv { k: &nk, v: &nv },
        KvCacheMut {
            k: &mut kc,
            v: &mut vc,
        },
    )
    .unwrap();
    assert_eq!(same(&kc.to_vec().unwrap(), &before), None);
}
