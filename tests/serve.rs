//! The serving example's model (examples/serve) against its plain-Rust f32 reference: on the CPU
//! backend here, on the GPU (eager mixed steps and graph-replayed decode steps) in `gpu_*`.
//!
//! GPU tests: `cargo test --test serve -- --ignored`.

// The example's modules are included whole; these tests use part of each.
#![allow(dead_code)]

#[path = "../examples/serve/config.rs"]
mod config;
#[path = "../examples/serve/exec.rs"]
mod exec;
#[path = "../examples/serve/graphs.rs"]
mod graphs;
#[path = "../examples/serve/model.rs"]
mod model;
#[path = "../examples/serve/profile.rs"]
mod profile;
#[path = "../examples/serve/reference.rs"]
mod reference;
#[path = "../examples/serve/scheduler.rs"]
mod scheduler;
#[path = "../examples/serve/weights.rs"]
mod weights;

use config::Config;
use exec::Exec;
use ferrinfer::ops::rope::Frequencies;
use ferrinfer_testkit::Rng;
use graphs::Graphs;
use model::{Capacity, Model, SampleParams, StepInput};
use reference::{Reference, argmax_margin, rel_l2};
use scheduler::{Request, Scheduler};
use weights::Weights;

/// bf16 activations and weights against the f32 model: relative L2 error of a request's logits.
const LOGITS_TOL: f64 = 2e-2;
/// A greedy token must be the reference's argmax where the reference's top-2 margin exceeds this
/// (the logits are O(1); bf16 error is about 1e-2).
const MARGIN: f32 = 0.1;

const CAP: Capacity = Capacity {
    page_size: 16,
    num_pages: 48,
    max_tokens: 32,
    max_batch: 8,
};

/// Serve requests arriving at different steps (chunked prefill mixed with decodes, batches that
/// grow and shrink), checking every step's logits and greedy tokens against the reference of the
/// sequence each request has cached. Returns (checked rows, graph replays).
fn serve_against_reference(exec: Exec, use_graphs: bool, seed: u64) -> (usize, usize) {
    let c = Config::tiny();
    let w = Weights::random(&c, seed);
    let r = Reference::new(&c, &w);
    let mut m = Model::new(&c, exec, Some(&w), CAP, seed).unwrap();
    let mut sched = Scheduler::new(
        CAP.page_size,
        CAP.num_pages,
        CAP.max_tokens,
        CAP.max_batch,
        20,
    );
    let mut rng = Rng::new(seed);
    let sampled = SampleParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.9,
    };
    // (arrival step, prompt, new tokens, params): prompts over a page and over a chunk.
    let arrivals = [
        (0, 19, 9, SampleParams::greedy()),
        (0, 4, 6, sampled),
        (1, 33, 7, SampleParams::greedy()),
        (4, 2, 8, SampleParams::greedy()),
        (6, 17, 3, sampled),
    ];
    let (mut step, mut checked) = (0, 0);
    let mut graphs = Graphs::default();
    loop {
        for (id, &(at, len, new, params)) in arrivals.iter().enumerate() {
            if at == step {
                let prompt = (0..len).map(|_| rng.below(c.vocab) as i32).collect();
                sched
                    .add(Request {
                        id,
                        prompt,
                        max_new: new,
                        params,
                    })
                    .unwrap();
            }
        }
        let Some(s) = sched.next().unwrap() else {
            if arrivals.iter().all(|a| a.0 < step) {
                break;
            }
            step += 1;
            continue;
        };
        let inp: StepInput = s.input();
        let tokens = if use_graphs && inp.is_decode() {
            graphs.step(&mut m, &inp).unwrap()
        } else {
            m.step(&inp).unwrap()
        };
        let logits = m.logits(inp.batch()).unwrap();
        for (row, &id) in s.ids.iter().enumerate() {
            let seq = sched.cached(id).unwrap();
            if seq.len() < arrivals[id].1 {
                continue; // a chunk in the middle of the prompt: its sample is dropped
            }
            let want = r.logits(seq);
            let got = &logits[row * c.vocab..(row + 1) * c.vocab];
            let err = rel_l2(got, &want);
            assert!(
                err <= LOGITS_TOL && got.iter().all(|x| x.is_finite()),
                "step {step} request {id} ({} cached tokens): logits relative L2 error {err:.2e} \
                 (seed {seed})",
                seq.len()
            );
            let (best, margin) = argmax_margin(&want);
            if arrivals[id].3 == SampleParams::greedy() && margin > MARGIN {
                assert_eq!(
                    tokens[row], best as i32,
                    "step {step} request {id}: greedy token (reference margin {margin}, seed {seed})"
                );
            }
            assert!((0..c.vocab as i32).contains(&tokens[row]));
            checked += 1;
        }
        sched.finish(&s, &tokens);
        step += 1;
    }
    assert_eq!(
        sched.free_pages(),
        CAP.num_pages as usize,
        "every page back on the free list"
    );
    (checked, graphs.replays)
}

#[test]
fn cpu_backend_matches_the_f32_reference() {
    let (checked, _) = serve_against_reference(Exec::cpu(), false, 7);
    assert!(checked >= 30, "{checked} rows checked");
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_serve_matches_the_f32_reference() {
    let seed = Rng::from_time().seed();
    // Eager steps only, then decode steps through bucketed graphs (padded buckets included: the
    // batch runs through 2, 3, 4 and 5 requests).
    let (checked, _) = serve_against_reference(Exec::gpu(0).unwrap(), false, seed);
    assert!(checked >= 30, "{checked} rows checked");
    let (checked, replays) = serve_against_reference(Exec::gpu(0).unwrap(), true, seed);
    assert!(checked >= 30, "{checked} rows checked");
    assert!(replays >= 5, "only {replays} graph replays");
}

#[test]
fn reference_rope_frequencies_are_llama31() {
    let f = Frequencies::llama31();
    for d in [64usize, 128] {
        for j in 0..d / 2 {
            let (a, b) = (
                reference::llama31_frequency(j, d),
                f.frequency(j as u32, d as u32),
            );
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "pair {j} of {d}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn safetensors_round_trip() {
    let c = Config::tiny();
    let w = Weights::random(&c, 3);
    let path = std::env::temp_dir().join(format!(
        "ferrinfer-serve-{}.safetensors",
        std::process::id()
    ));
    w.save(&c, &path).unwrap();
    let back = Weights::load(&c, &path).unwrap();
    assert_eq!(back.embed, w.embed);
    assert_eq!(back.lm_head, w.lm_head);
    assert_eq!(back.final_norm, w.final_norm);
    for (a, b) in back.layers.iter().zip(&w.layers) {
        assert_eq!((&a.wq, &a.wkv, &a.wo), (&b.wq, &b.wkv, &b.wo));
        assert_eq!((&a.wgu, &a.wdown), (&b.wgu, &b.wdown));
        assert_eq!((&a.attn_norm, &a.mlp_norm), (&b.attn_norm, &b.mlp_norm));
    }
    // Another config's shapes are refused with the tensor's name.
    let mut other = c.clone();
    other.vocab += 1;
    let e = Weights::load(&other, &path).unwrap_err();
    assert!(e.contains("model.embed_tokens.weight"), "{e}");
    std::fs::remove_file(&path).unwrap();
    assert!(Weights::load(&c, &path).is_err());
}

#[test]
fn scheduler_chunks_prompts_and_recycles_pages() {
    let mut s = Scheduler::new(4, 6, 8, 4, 5);
    let r = |id, len, max_new| Request {
        id,
        prompt: vec![1; len],
        max_new,
        params: SampleParams::greedy(),
    };
    // A request that could never fit is refused.
    assert!(s.add(r(9, 20, 8)).is_err());
    s.add(r(0, 7, 2)).unwrap();
    s.add(r(1, 3, 1)).unwrap();
    // Chunk 5 of request 0, then 3 of request 1 (budget 8).
    let a = s.next().unwrap().unwrap();
    assert_eq!(a.qo_indptr, [0, 5, 8]);
    assert_eq!(s.free_pages(), 6 - 2 - 1);
    assert!(
        s.finish(&a, &[11, 12])
            .iter()
            .any(|d| d.id == 1 && d.generated == [12])
    );
    assert_eq!(s.free_pages(), 6 - 2, "request 1's page is back");
    // The rest of request 0's prompt; its first token; then one decode.
    let b = s.next().unwrap().unwrap();
    assert_eq!(b.qo_indptr, [0, 2]);
    assert!(s.finish(&b, &[13]).is_empty());
    let c = s.next().unwrap().unwrap();
    assert_eq!(
        (c.tokens.as_slice(), c.qo_indptr.as_slice()),
        (&[13][..], &[0, 1][..])
    );
    let done = s.finish(&c, &[14]);
    assert_eq!(done[0].generated, [13, 14]);
    assert_eq!(s.free_pages(), 6);
    assert!(s.next().unwrap().is_none());
}

#[test]
fn a_bad_step_is_an_error() {
    let c = Config::tiny();
    let w = Weights::random(&c, 1);
    let mut m = Model::new(&c, Exec::cpu(), Some(&w), CAP, 1).unwrap();
    let kv = ferrinfer::KvIndex::paged_from_lens(
        16,
        &[3],
        &[0],
        CAP.num_pages,
        ferrinfer::KvLayout::Nhd,
    )
    .unwrap();
    let p = [SampleParams::greedy()];
    // qo_indptr does not end at the token count.
    let bad = StepInput {
        tokens: &[1, 2, 3],
        qo_indptr: &[0, 2],
        kv: kv.clone(),
        params: &p,
    };
    assert!(m.step(&bad).unwrap_err().contains("qo_indptr"));
    // More tokens than the model's step holds.
    let many = vec![1; CAP.max_tokens + 1];
    let n = many.len() as i32;
    let big = StepInput {
        tokens: &many,
        qo_indptr: &[0, n],
        kv,
        params: &p,
    };
    assert!(m.step(&big).unwrap_err().contains("exceeds"));
}

#[test]
fn profile_breakdown_and_chart() {
    let c = Config::tiny();
    let w = Weights::random(&c, 2);
    let mut m = Model::new(&c, Exec::cpu(), Some(&w), CAP, 2).unwrap();
    let kv = ferrinfer::KvIndex::paged_from_lens(
        16,
        &[5],
        &[3],
        CAP.num_pages,
        ferrinfer::KvLayout::Nhd,
    )
    .unwrap();
    let p = [SampleParams::greedy()];
    let inp = StepInput {
        tokens: &[1, 2, 3, 4, 5],
        qo_indptr: &[0, 5],
        kv,
        params: &p,
    };
    m.prof.start();
    m.step(&inp).unwrap();
    m.prof.stop();
    let totals = m.prof.totals().unwrap();
    for op in [
        profile::Op::Gemm,
        profile::Op::Attention,
        profile::Op::Norm,
        profile::Op::Sampling,
    ] {
        let t = totals.iter().find(|t| t.0 == op).unwrap().1;
        assert!(t > 0.0, "{op:?} was not timed");
    }
    assert!(profile::table(&totals).contains("attention"));
    let svg = profile::svg(&totals, "a <tiny> step");
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n") && svg.contains("&lt;tiny&gt;"));
}
