//! The one-request convenience calls against the CPU reference of the same batch.

use ferrinfer::attention::reference;
use ferrinfer::prelude::*;
use ferrinfer::variants::{SoftCap, Standard};
use ferrinfer_testkit::Rng;

fn bf(rng: &mut Rng, n: usize) -> Vec<bf16> {
    rng.normal_vec(n).into_iter().map(bf16::from_f32).collect()
}

/// `Single` on `backend` agrees with the reference of the equivalent one-request batch.
fn single_calls_are_one_request_batches(backend: &Backend, tolerance: f64) {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let heads = Heads::new(8, 2, 128).unwrap();
    let (qo, kvl) = (37usize, 300usize);
    let q = bf(&mut rng, qo * 8 * 128);
    let k = bf(&mut rng, kvl * 2 * 128);
    let v = bf(&mut rng, kvl * 2 * 128);
    let (qb, kb, vb) = (
        backend.upload(&q).unwrap(),
        backend.upload(&k).unwrap(),
        backend.upload(&v).unwrap(),
    );
    let variant = SoftCap { cap: 5.0 };
    for layout in [KvLayout::Nhd, KvLayout::Hnd] {
        let single = Single::new(heads)
            .layout(layout)
            .causal(true)
            .sm_scale(0.05);
        let kv = KvIndex::ragged(&[0, kvl as i32], layout).unwrap();
        let batch = Batch::new(heads, &[0, qo as i32], kv)
            .unwrap()
            .with_causal(true)
            .with_sm_scale(0.05)
            .unwrap();
        let want = reference::attention_typed(&variant, &batch, &q, &k, &v).unwrap();
        let mut o = backend.filled(q.len(), bf16::NAN).unwrap();
        let mut lse = backend.filled(qo * 8, f32::NAN).unwrap();
        single
            .prefill(backend, &variant, &qb, &kb, &vb, &mut o, Some(&mut lse))
            .unwrap();
        let got: Vec<f32> = o.to_vec().unwrap().iter().map(|x| x.to_f32()).collect();
        let (err, _, head) = reference::worst_rel_l2(&batch, &got, &want.o);
        assert!(
            err <= tolerance,
            "{layout:?} prefill: {err:.2e} at head {head} (seed {seed})"
        );
        let lse = lse.to_vec().unwrap();
        assert!((f64::from(lse[100]) - want.lse[100]).abs() < 1e-2);

        // Decode: one row, every key visible.
        let q1 = &q[..8 * 128];
        let q1b = backend.upload(q1).unwrap();
        let mut o1 = backend.filled(8 * 128, bf16::NAN).unwrap();
        single
            .decode(backend, &Standard, &q1b, &kb, &vb, &mut o1, None)
            .unwrap();
        let kv = KvIndex::ragged(&[0, kvl as i32], layout).unwrap();
        let batch = Batch::decode(heads, kv)
            .unwrap()
            .with_sm_scale(0.05)
            .unwrap();
        let want = reference::attention_typed(&Standard, &batch, q1, &k, &v).unwrap();
        let got: Vec<f32> = o1.to_vec().unwrap().iter().map(|x| x.to_f32()).collect();
        let (err, _, head) = reference::worst_rel_l2(&batch, &got, &want.o);
        assert!(
            err <= tolerance,
            "{layout:?} decode: {err:.2e} at head {head} (seed {seed})"
        );
    }
}

#[test]
fn single_calls_on_the_cpu() {
    single_calls_are_one_request_batches(&Backend::Cpu, 1e-2);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_single_calls() {
    let gpu = Backend::cuda(0).expect("this test needs a CUDA GPU");
    single_calls_are_one_request_batches(&gpu, 1e-2);
}

#[test]
fn shapes_that_do_not_divide_are_errors() {
    let cpu = Backend::Cpu;
    let single = Single::new(Heads::new(4, 2, 64).unwrap());
    let q = cpu.filled(4 * 64 + 1, bf16::ZERO).unwrap();
    let k = cpu.filled(2 * 64 * 3, bf16::ZERO).unwrap();
    let mut o = cpu.filled(4 * 64 + 1, bf16::ZERO).unwrap();
    let e = single
        .prefill(&cpu, &Standard, &q, &k, &k, &mut o, None)
        .unwrap_err();
    assert!(e.to_string().contains("not a multiple"), "{e}");
    let q2 = cpu.filled(2 * 4 * 64, bf16::ZERO).unwrap();
    let mut o2 = cpu.filled(2 * 4 * 64, bf16::ZERO).unwrap();
    let e = single
        .decode(&cpu, &Standard, &q2, &k, &k, &mut o2, None)
        .unwrap_err();
    assert!(e.to_string().contains("one query row"), "{e}");
}
