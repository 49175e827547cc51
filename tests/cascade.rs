//! Cascade attention: merging (output, LSE) states of disjoint KV parts. CPU: the merge of
//! attention over random parts equals attention over the whole KV set; empty parts; errors; the
//! NVRTC compile of every merge kernel instance. GPU (`gpu_*`): the kernel against the f64 merge.

use ferrinfer::attention::reference::{self, Reference, rel_l2};
use ferrinfer::jit::{Arch, Jit, JitConfig};
use ferrinfer::ops::cascade::{self, State, StateMut, StateShape};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;
use ferrinfer::{DType, Element, Error, indptr};
use ferrinfer_testkit::Rng;

/// A ragged batch, its inputs, and the same KV set dealt out to `parts` ragged batches.
struct Split {
    whole: Batch,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// (batch, k, v) of each part.
    parts: Vec<(Batch, Vec<f32>, Vec<f32>)>,
}

/// Every key of every request goes to a random part, except that request 0 keeps all its keys
/// in part 0 and request 1 in the last part, so that empty parts (LSE -inf) are always present.
fn split(rng: &mut Rng, heads: Heads, qo_lens: &[u32], kv_lens: &[u32], parts: usize) -> Split {
    let kv = KvIndex::ragged(&indptr(kv_lens), KvLayout::Nhd).unwrap();
    let whole = Batch::new(heads, &indptr(qo_lens), kv).unwrap();
    let q = rng.normal_vec(whole.q_len());
    let k = rng.normal_vec(whole.kv().buffer_len(&heads));
    let v = rng.normal_vec(whole.kv().buffer_len(&heads));
    let token = (heads.num_kv_heads() * heads.head_dim()) as usize;
    let mut lens = vec![vec![0u32; kv_lens.len()]; parts];
    let mut data = vec![(Vec::new(), Vec::new()); parts];
    let mut start = 0usize;
    for (b, &len) in kv_lens.iter().enumerate() {
        for t in start..start + len as usize {
            let p = match b {
                0 => 0,
                1 => parts - 1,
                _ => rng.below(parts),
            };
            lens[p][b] += 1;
            data[p].0.extend_from_slice(&k[t * token..(t + 1) * token]);
            data[p].1.extend_from_slice(&v[t * token..(t + 1) * token]);
        }
        start += len as usize;
    }
    let parts = lens
        .iter()
        .zip(data)
        .map(|(lens, (k, v))| {
            let kv = KvIndex::ragged(&indptr(lens), KvLayout::Nhd).unwrap();
            (Batch::new(heads, &indptr(qo_lens), kv).unwrap(), k, v)
        })
        .collect();
    Split {
        whole,
        q,
        k,
        v,
        parts,
    }
}

impl Split {
    fn whole(&self) -> Reference {
        reference::attention(&Standard, &self.whole, &self.q, &self.k, &self.v).unwrap()
    }
    fn parts(&self) -> Vec<Reference> {
        self.parts
            .iter()
            .map(|(b, k, v)| reference::attention(&Standard, b, &self.q, k, v).unwrap())
            .collect()
    }
    fn shape(&self) -> StateShape {
        let h = self.whole.heads();
        StateShape::new(self.whole.total_qo() as u32, h.num_qo_heads(), h.head_dim()).unwrap()
    }
}

/// `[rows, n, ...]` from n arrays of `[rows, ...]` with `per_row` elements per row.
fn stack<X: Copy>(states: &[&[X]], per_row: usize) -> Vec<X> {
    let rows = states.first().map_or(0, |s| s.len() / per_row);
    let mut out = Vec::with_capacity(rows * per_row * states.len());
    for r in 0..rows {
        for s in states {
            out.extend_from_slice(&s[r * per_row..(r + 1) * per_row]);
        }
    }
    out
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0.0, f64::max)
}

#[test]
fn merging_random_parts_equals_attention_over_the_whole_kv() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(4, 2, 16).unwrap();
    for parts in [2, 3, 5] {
        let s = split(&mut rng, heads, &[3, 1, 4, 2], &[7, 9, 33, 1], parts);
        let want = s.whole();
        let got = s.parts();
        let shape = s.shape();
        let v: Vec<&[f64]> = got.iter().map(|r| r.o.as_slice()).collect();
        let lse: Vec<&[f64]> = got.iter().map(|r| r.lse.as_slice()).collect();
        let hd = (heads.num_qo_heads() * heads.head_dim()) as usize;
        let (o, l) = cascade::merge_states_f64(
            shape,
            parts as u32,
            &stack(&v, hd),
            &stack(&lse, heads.num_qo_heads() as usize),
        )
        .unwrap();
        let (eo, el) = (max_abs_diff(&o, &want.o), max_abs_diff(&l, &want.lse));
        assert!(
            eo <= 1e-9 && el <= 1e-9,
            "{parts} parts: |o| {eo:e}, |lse| {el:e} (seed {seed})"
        );
        // Request 0 lives in part 0 alone: the other parts are empty there.
        assert_eq!(got[parts - 1].lse[0], f64::NEG_INFINITY);
    }
}

/// Outputs and LSEs of one state, on the host.
type HostState<T> = (Vec<T>, Vec<f32>);

/// Two states of `shape` with LSEs in a few units of each other, and -inf in chosen places.
fn random_pair<T: Element>(rng: &mut Rng, shape: StateShape) -> (HostState<T>, HostState<T>) {
    let round = |xs: Vec<f32>| -> Vec<T> { xs.into_iter().map(T::from_f32).collect() };
    let lse =
        |rng: &mut Rng| -> Vec<f32> { (0..shape.s_len()).map(|_| 3.0 * rng.normal()).collect() };
    let (mut s_a, mut s_b) = (lse(rng), lse(rng));
    // Pair 0: a empty; pair 1: b empty; pair 2: both empty.
    for (i, (a, b)) in [(true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        if i < shape.s_len() {
            if a {
                s_a[i] = f32::NEG_INFINITY;
            }
            if b {
                s_b[i] = f32::NEG_INFINITY;
            }
        }
    }
    (
        (round(rng.normal_vec(shape.v_len())), s_a),
        (round(rng.normal_vec(shape.v_len())), s_b),
    )
}

fn f64s<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| f64::from(x.to_f32())).collect()
}

fn f64s_f32(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| f64::from(x)).collect()
}

/// The f64 merge of the two states, as the CPU backend computes it (before rounding).
fn want_pair<T: Element>(
    shape: StateShape,
    a: &HostState<T>,
    b: &HostState<T>,
) -> (Vec<f64>, Vec<f64>) {
    let hd = (shape.num_heads * shape.head_dim) as usize;
    let h = shape.num_heads as usize;
    let v = stack(&[&f64s(&a.0)[..], &f64s(&b.0)[..]], hd);
    let s = stack(&[&f64s_f32(&a.1)[..], &f64s_f32(&b.1)[..]], h);
    cascade::merge_states_f64(shape, 2, &v, &s).unwrap()
}

/// Where one side is empty the other comes back bit for bit; both empty gives 0 and -inf.
fn check_empty_parts<T: Element>(
    shape: StateShape,
    a: &HostState<T>,
    b: &HostState<T>,
    v: &[T],
    s: &[f32],
) {
    let d = shape.head_dim as usize;
    let bits = |xs: &[T]| -> Vec<u32> { xs.iter().map(|x| x.to_f32().to_bits()).collect() };
    for pair in 0..shape.s_len().min(3) {
        let got = bits(&v[pair * d..(pair + 1) * d]);
        let (want_v, want_s) = match (
            a.1[pair] == f32::NEG_INFINITY,
            b.1[pair] == f32::NEG_INFINITY,
        ) {
            (true, true) => (vec![0f32.to_bits(); d], f32::NEG_INFINITY),
            (true, false) => (bits(&b.0[pair * d..(pair + 1) * d]), b.1[pair]),
            (false, true) => (bits(&a.0[pair * d..(pair + 1) * d]), a.1[pair]),
            (false, false) => unreachable!(),
        };
        assert_eq!(got, want_v, "outputs of (row, head) pair {pair}");
        assert_eq!(s[pair].to_bits(), want_s.to_bits(), "LSE of pair {pair}");
    }
}

fn round_f64<T: Element>(xs: &[f64]) -> Vec<T> {
    xs.iter().map(|&x| T::from_f32(x as f32)).collect()
}

fn cpu_merge_state_is_the_rounded_f64_merge<T: Element>() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let backend = Backend::Cpu;
    for head_dim in [1, 6, 64] {
        let shape = StateShape::new(5, 3, head_dim).unwrap();
        let (a, b) = random_pair::<T>(&mut rng, shape);
        let (want_v, want_s) = want_pair(shape, &a, &b);
        let up = |x: &HostState<T>| (backend.upload(&x.0).unwrap(), backend.upload(&x.1).unwrap());
        let ((va, sa), (vb, sb)) = (up(&a), up(&b));
        let mut v = backend
            .filled(shape.v_len(), T::from_f32(f32::NAN))
            .unwrap();
        let mut s = backend.filled(shape.s_len(), f32::NAN).unwrap();
        cascade::merge_state(
            &backend,
            shape,
            State::new(&va, &sa),
            State::new(&vb, &sb),
            StateMut::new(&mut v, &mut s),
        )
        .unwrap();
        let (v, s) = (v.to_vec().unwrap(), s.to_vec().unwrap());
        let same = |x: &[T], y: &[T]| {
            x.iter()
                .zip(y)
                .all(|(p, q)| p.to_f32().to_bits() == q.to_f32().to_bits())
        };
        assert!(
            same(&v, &round_f64::<T>(&want_v)),
            "hd {head_dim} (seed {seed})"
        );
        let want_s: Vec<f32> = want_s.iter().map(|&x| x as f32).collect();
        assert_eq!(s, want_s, "hd {head_dim} (seed {seed})");
        check_empty_parts(shape, &a, &b, &v, &s);

        // In place gives the same, and merge_states of the stacked pair too.
        let (mut va2, mut sa2) = up(&a);
        cascade::merge_state_in_place(
            &backend,
            shape,
            StateMut::new(&mut va2, &mut sa2),
            State::new(&vb, &sb),
        )
        .unwrap();
        assert!(same(&va2.to_vec().unwrap(), &v) && sa2.to_vec().unwrap() == s);
        let hd = (shape.num_heads * head_dim) as usize;
        let stacked_v = backend.upload(&stack(&[&a.0[..], &b.0[..]], hd)).unwrap();
        let stacked_s = backend
            .upload(&stack(&[&a.1[..], &b.1[..]], shape.num_heads as usize))
            .unwrap();
        let mut v3 = backend
            .filled(shape.v_len(), T::from_f32(f32::NAN))
            .unwrap();
        let mut s3 = backend.filled(shape.s_len(), f32::NAN).unwrap();
        cascade::merge_states(
            &backend,
            shape,
            2,
            State::new(&stacked_v, &stacked_s),
            StateMut::new(&mut v3, &mut s3),
        )
        .unwrap();
        assert!(same(&v3.to_vec().unwrap(), &v) && s3.to_vec().unwrap() == s);
    }
}

#[test]
fn cpu_merge_state_bf16() {
    cpu_merge_state_is_the_rounded_f64_merge::<bf16>();
}

#[test]
fn cpu_merge_state_f16() {
    cpu_merge_state_is_the_rounded_f64_merge::<f16>();
}

#[test]
fn empty_parts_never_make_nan() {
    let backend = Backend::Cpu;
    let shape = StateShape::new(1, 3, 2).unwrap();
    let inf = f32::NEG_INFINITY;
    // An empty part's output is garbage here (NaN, inf): it must not leak into the merge.
    let va = backend
        .upload(&[1.5, -2.0, f32::NAN, f32::INFINITY, 0.0, 0.0].map(bf16::from_f32))
        .unwrap();
    let sa = backend.upload(&[0.25, inf, inf]).unwrap();
    let vb = backend
        .upload(&[f32::NAN, 7.0, 3.0, 4.0, f32::NAN, 1.0].map(bf16::from_f32))
        .unwrap();
    let sb = backend.upload(&[inf, -1.0, inf]).unwrap();
    let mut v = backend.filled(6, bf16::from_f32(f32::NAN)).unwrap();
    let mut s = backend.filled(3, f32::NAN).unwrap();
    cascade::merge_state(
        &backend,
        shape,
        State::new(&va, &sa),
        State::new(&vb, &sb),
        StateMut::new(&mut v, &mut s),
    )
    .unwrap();
    let v: Vec<f32> = v.to_vec().unwrap().iter().map(|x| x.to_f32()).collect();
    assert_eq!(v, [1.5, -2.0, 3.0, 4.0, 0.0, 0.0]);
    assert_eq!(s.to_vec().unwrap(), [0.25, -1.0, inf]);

    // merge_states with zero states is the identity of the merge.
    let (none_v, none_s) = (
        backend.upload::<bf16>(&[]).unwrap(),
        backend.upload::<f32>(&[]).unwrap(),
    );
    let mut v = backend.filled(6, bf16::from_f32(f32::NAN)).unwrap();
    let mut s = backend.filled(3, f32::NAN).unwrap();
    cascade::merge_states(
        &backend,
        shape,
        0,
        State::new(&none_v, &none_s),
        StateMut::new(&mut v, &mut s),
    )
    .unwrap();
    assert!(v.to_vec().unwrap().iter().all(|x| x.to_f32() == 0.0));
    assert_eq!(s.to_vec().unwrap(), [inf; 3]);
}

#[test]
fn lengths_and_shapes_are_checked() {
    let backend = Backend::Cpu;
    let shape = StateShape::new(2, 3, 4).unwrap();
    let v = |n: usize| backend.filled(n, bf16::ONE).unwrap();
    let s = |n: usize| backend.filled(n, 0.0f32).unwrap();
    let (va, sa, vb, sb) = (v(24), s(6), v(24), s(6));
    let message = |r: ferrinfer::Result<()>| match r {
        Err(Error::InvalidInput(m)) => m,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    let (bad_v, bad_s) = (v(23), s(7));
    let (mut vo, mut so) = (v(24), s(6));
    let m = message(cascade::merge_state(
        &backend,
        shape,
        State::new(&va, &sa),
        State::new(&bad_v, &sb),
        StateMut::new(&mut vo, &mut so),
    ));
    assert!(
        m.contains("b.v has 23 elements") && m.contains("needs 24"),
        "{m}"
    );
    let m = message(cascade::merge_state(
        &backend,
        shape,
        State::new(&va, &bad_s),
        State::new(&vb, &sb),
        StateMut::new(&mut vo, &mut so),
    ));
    assert!(
        m.contains("a.s has 7 elements") && m.contains("rows=2, num_heads=3"),
        "{m}"
    );
    let mut short = s(5);
    let m = message(cascade::merge_state(
        &backend,
        shape,
        State::new(&va, &sa),
        State::new(&vb, &sb),
        StateMut::new(&mut vo, &mut short),
    ));
    assert!(m.contains("out.s has 5 elements"), "{m}");
    let (mut va2, mut sa2) = (v(25), s(6));
    let m = message(cascade::merge_state_in_place(
        &backend,
        shape,
        StateMut::new(&mut va2, &mut sa2),
        State::new(&vb, &sb),
    ));
    assert!(m.contains("a.v has 25 elements"), "{m}");
    let m = message(cascade::merge_states(
        &backend,
        shape,
        3,
        State::new(&va, &sa),
        StateMut::new(&mut vo, &mut so),
    ));
    assert!(
        m.contains("states.v has 24 elements") && m.contains("x 3 states needs 72"),
        "{m}"
    );
    assert!(cascade::merge_states_f64(shape, 2, &[0.0; 48], &[0.0; 11]).is_err());
    assert!(matches!(
        StateShape::new(1, 0, 4),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        StateShape::new(1, 2, 0),
        Err(Error::InvalidInput(_))
    ));
    let zero_heads = StateShape {
        rows: 1,
        num_heads: 0,
        head_dim: 4,
    };
    assert!(cascade::merge_states_f64(zero_heads, 1, &[], &[]).is_err());
}

#[test]
fn nvrtc_compiles_every_merge_kernel_instance() {
    let jit = Jit::new(JitConfig {
        cache_dir: None,
        compile: true,
        extra_options: Vec::new(),
    });
    for arch in [Arch::new(8, 0), Arch::new(9, 0)] {
        for dtype in DType::ALL {
            for vec in cascade::VEC_WIDTHS {
                let k = cascade::compile(&jit, dtype, vec, arch)
                    .unwrap_or_else(|e| panic!("{dtype:?} v{vec} {arch}: {e}"));
                assert!(!k.cubin.is_empty());
                assert!(
                    k.stats.registers > 0,
                    "no ptxas report for {dtype:?} v{vec}"
                );
                assert_eq!(k.stats.spill_stores, 0, "{dtype:?} v{vec} {arch} spills");
                println!(
                    "merge_states {:<5} v{vec} {:<7} {:>3} regs",
                    dtype.name(),
                    arch.sm_name(),
                    k.stats.registers
                );
            }
        }
    }
    assert!(cascade::compile(&jit, DType::F16, 3, Arch::new(9, 0)).is_err());
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

fn check_lse(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            f64::from(g) == w
        } else {
            (f64::from(g) - w).abs() <= 1e-5 * (1.0 + w.abs())
        };
        assert!(ok, "{what}: lse[{i}] = {g}, want {w}");
    }
}

fn gpu_pair<T: Element>(in_place: bool) {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for head_dim in [1, 5, 6, 12, 64, 128, 200, 256, 520] {
        for (rows, heads) in [(1, 1), (37, 3), (130, 8)] {
            let shape = StateShape::new(rows, heads, head_dim).unwrap();
            let what = format!(
                "{:?} rows {rows} heads {heads} hd {head_dim} in place {in_place} (seed {seed})",
                T::DTYPE
            );
            let (a, b) = random_pair::<T>(&mut rng, shape);
            let (want_v, want_s) = want_pair(shape, &a, &b);
            let (vb, sb) = (gpu.upload(&b.0).unwrap(), gpu.upload(&b.1).unwrap());
            let (v, s) = if in_place {
                let (mut va, mut sa) = (gpu.upload(&a.0).unwrap(), gpu.upload(&a.1).unwrap());
                cascade::merge_state_in_place(
                    &gpu,
                    shape,
                    StateMut::new(&mut va, &mut sa),
                    State::new(&vb, &sb),
                )
                .unwrap();
                (va.to_vec().unwrap(), sa.to_vec().unwrap())
            } else {
                let (va, sa) = (gpu.upload(&a.0).unwrap(), gpu.upload(&a.1).unwrap());
                let mut v = gpu.filled(shape.v_len(), T::from_f32(f32::NAN)).unwrap();
                let mut s = gpu.filled(shape.s_len(), f32::NAN).unwrap();
                cascade::merge_state(
                    &gpu,
                    shape,
                    State::new(&va, &sa),
                    State::new(&vb, &sb),
                    StateMut::new(&mut v, &mut s),
                )
                .unwrap();
                (v.to_vec().unwrap(), s.to_vec().unwrap())
            };
            let got: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
            let err = rel_l2(&got, &want_v);
            assert!(
                err <= tolerance::<T>(),
                "{what}: relative L2 error {err:.2e}"
            );
            check_lse(&s, &want_s, &what);
            check_empty_parts(shape, &a, &b, &v, &s);
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_merge_state_matches_cpu() {
    gpu_pair::<bf16>(false);
    gpu_pair::<f16>(false);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_merge_state_in_place_matches_cpu() {
    gpu_pair::<bf16>(true);
    gpu_pair::<f16>(true);
}

fn gpu_many<T: Element>() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    for num_states in [1u32, 3, 7] {
        for head_dim in [6, 128, 200] {
            let shape = StateShape::new(45, 4, head_dim).unwrap();
            let n = num_states as usize;
            let what = format!(
                "{:?} {num_states} states hd {head_dim} (seed {seed})",
                T::DTYPE
            );
            let v: Vec<T> = rng
                .normal_vec(shape.v_len() * n)
                .into_iter()
                .map(T::from_f32)
                .collect();
            let mut s: Vec<f32> = (0..shape.s_len() * n).map(|_| 3.0 * rng.normal()).collect();
            // (row 0, head 0) empty in every state; (row 1, head 0) in all but the last.
            let h = shape.num_heads as usize;
            for k in 0..n {
                s[k * h] = f32::NEG_INFINITY;
                if k + 1 < n {
                    s[(n + k) * h] = f32::NEG_INFINITY;
                }
            }
            let (want_v, want_s) =
                cascade::merge_states_f64(shape, num_states, &f64s(&v), &f64s_f32(&s)).unwrap();
            let (vd, sd) = (gpu.upload(&v).unwrap(), gpu.upload(&s).unwrap());
            let mut vo = gpu.filled(shape.v_len(), T::from_f32(f32::NAN)).unwrap();
            let mut so = gpu.filled(shape.s_len(), f32::NAN).unwrap();
            cascade::merge_states(
                &gpu,
                shape,
                num_states,
                State::new(&vd, &sd),
                StateMut::new(&mut vo, &mut so),
            )
            .unwrap();
            let (vo, so) = (vo.to_vec().unwrap(), so.to_vec().unwrap());
            let got: Vec<f32> = vo.iter().map(|x| x.to_f32()).collect();
            let err = rel_l2(&got, &want_v);
            assert!(
                err <= tolerance::<T>(),
                "{what}: relative L2 error {err:.2e}"
            );
            check_lse(&so, &want_s, &what);
            let d = head_dim as usize;
            assert!(got[..d].iter().all(|&x| x == 0.0), "{what}: all-empty pair");
            assert_eq!(so[0], f32::NEG_INFINITY, "{what}");
            // (row 1, state n - 1, head 0).
            let last = (2 * n - 1) * h * d;
            let lone: Vec<f32> = v[last..last + d].iter().map(|x| x.to_f32()).collect();
            assert_eq!(
                &got[h * d..h * d + d],
                &lone[..],
                "{what}: a lone state comes back exactly"
            );
        }
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_merge_states_matches_cpu() {
    gpu_many::<bf16>();
    gpu_many::<f16>();
}

/// The cascade end to end: prefill over each part with its LSE, merged on the GPU, against the
/// CPU reference over the whole KV set.
fn gpu_cascade<T: Element>() {
    let gpu = gpu();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(8, 2, 128).unwrap();
    let s = split(&mut rng, heads, &[5, 1, 17, 64], &[40, 33, 300, 129], 2);
    let round = |xs: &[f32]| -> Vec<T> { xs.iter().map(|&x| T::from_f32(x)).collect() };
    let q = round(&s.q);
    let want =
        reference::attention_typed(&Standard, &s.whole, &q, &round(&s.k), &round(&s.v)).unwrap();
    let shape = s.shape();
    let qd = gpu.upload(&q).unwrap();
    let mut states = Vec::new();
    for (batch, k, v) in &s.parts {
        let (kd, vd) = (
            gpu.upload(&round(k)).unwrap(),
            gpu.upload(&round(v)).unwrap(),
        );
        let mut o = gpu.filled(shape.v_len(), T::from_f32(f32::NAN)).unwrap();
        let mut lse = gpu.filled(shape.s_len(), f32::NAN).unwrap();
        let plan = BatchPrefill::plan(&gpu, batch.clone()).unwrap();
        plan.run(&Standard, &qd, &kd, &vd, &mut o, Some(&mut lse))
            .unwrap();
        states.push((o, lse));
    }
    let (first, rest) = states.split_at_mut(1);
    let (o, lse) = &mut first[0];
    cascade::merge_state_in_place(
        &gpu,
        shape,
        StateMut::new(o, lse),
        State::new(&rest[0].0, &rest[0].1),
    )
    .unwrap();
    let got: Vec<f32> = o.to_vec().unwrap().iter().map(|x| x.to_f32()).collect();
    let (err, request, head) = reference::worst_rel_l2(&s.whole, &got, &want.o);
    assert!(
        err <= tolerance::<T>(),
        "{:?} (seed {seed}): relative L2 error {err:.2e} at request {request}, head {head}",
        T::DTYPE
    );
    for (i, (g, w)) in lse.to_vec().unwrap().iter().zip(&want.lse).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-2 * (1.0 + w.abs()),
            "lse[{i}] = {g}, want {w} (seed {seed})"
        );
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_cascade_of_two_prefills_matches_whole_attention() {
    gpu_cascade::<bf16>();
    gpu_cascade::<f16>();
}
