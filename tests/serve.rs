//! The serving example's model (examples/serve) against its plain-Rust f32 reference: on the CPU
//! backend here, on the GPU (eager mixed steps and graph-replayed decode steps) in `gpu_*`.
//!
//! Tensor parallelism: the shards recombine to the full model; a simulated 2-rank split on the
//! CPU backend (host all-reduce) matches the reference; `gpu_tensor_parallel_*` (feature `nccl`)
//! runs TP 2 over NCCL against TP 1 and the reference.
//!
//! GPU tests: `cargo test --test serve -- --ignored` (and `--features nccl` for TP).

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
#[path = "../examples/serve/tp.rs"]
mod tp;
#[path = "../examples/serve/weights.rs"]
mod weights;

use config::Config;
use exec::Exec;
use ferrinfer::ops::rope::Frequencies;
use ferrinfer::prelude::bf16;
use ferrinfer_testkit::Rng;
use graphs::Graphs;
use model::{Capacity, Model, SampleParams, StepInput};
use reference::{Reference, argmax_margin, rel_l2};
use scheduler::{Request, Scheduler};
use tp::{Engine, Group, Place};
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
    serve_engine_against_reference(seed, |c, w| one(c, w, exec, use_graphs, seed))
}

/// One model on this thread.
fn one(c: &Config, w: &Weights, exec: Exec, use_graphs: bool, seed: u64) -> Engine {
    Engine::One {
        m: Box::new(Model::new(c, exec, Some(w), CAP, seed).unwrap()),
        graphs: Graphs::default(),
        use_graphs,
    }
}

/// A tensor-parallel group of `world` ranks.
fn group(c: &Config, w: &Weights, world: usize, place: Place, graphs: bool, seed: u64) -> Engine {
    Engine::Tp {
        group: Group::new(c, world, place, Some(w), CAP, seed).unwrap(),
        use_graphs: graphs,
    }
}

/// [`serve_against_reference`] on the engine `make` builds for the tiny model's weights; a
/// tensor-parallel engine's ranks must also give the same logits, bit for bit (and tokens:
/// `Group::step` checks those).
fn serve_engine_against_reference(
    seed: u64,
    make: impl FnOnce(&Config, &Weights) -> Engine,
) -> (usize, usize) {
    let c = Config::tiny();
    let w = Weights::random(&c, seed);
    let r = Reference::new(&c, &w);
    let mut m = make(&c, &w);
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
        let tokens = m.step(&inp).unwrap();
        let logits = match &mut m {
            Engine::Tp { group, .. } => {
                let all = group.logits(inp.batch()).unwrap();
                for (rank, l) in all.iter().enumerate() {
                    let same = l.len() == all[0].len()
                        && l.iter()
                            .zip(&all[0])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "step {step}: rank {rank}'s logits differ from rank 0's"
                    );
                }
                all.into_iter().next().unwrap()
            }
            Engine::One { .. } => m.logits(inp.batch()).unwrap(),
        };
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
    (checked, m.replays())
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

/// The shards' column-split rows and row-split columns, put back side by side, are the full
/// weights, and the rest is replicated; a split that does not divide is refused.
#[test]
fn tensor_parallel_shards_recombine_to_the_full_model() {
    let c = Config::tiny();
    let w = Weights::random(&c, 11);
    let h = c.hidden;
    for world in [1, 2] {
        let shards: Vec<Weights> = (0..world).map(|r| w.shard(&c, r, world).unwrap()).collect();
        let rc = c.shard(0, world).unwrap();
        let (qd, kvd, i) = (rc.q_dim(), rc.kv_dim(), rc.inter);
        for (l, full) in w.layers.iter().enumerate() {
            let part = |f: fn(&weights::Layer) -> &Vec<bf16>| -> Vec<&[bf16]> {
                shards.iter().map(|s| f(&s.layers[l]).as_slice()).collect()
            };
            // Column-parallel: rank blocks of rows, K and V (gate and up) halves each split.
            let wq: Vec<bf16> = part(|l| &l.wq).concat();
            assert_eq!(wq, full.wq, "layer {l} wq, world {world}");
            let kv = part(|l| &l.wkv);
            let k: Vec<bf16> = kv.iter().flat_map(|s| s[..kvd * h].to_vec()).collect();
            let v: Vec<bf16> = kv.iter().flat_map(|s| s[kvd * h..].to_vec()).collect();
            assert_eq!([k, v].concat(), full.wkv, "layer {l} wkv, world {world}");
            let gu = part(|l| &l.wgu);
            let g: Vec<bf16> = gu.iter().flat_map(|s| s[..i * h].to_vec()).collect();
            let u: Vec<bf16> = gu.iter().flat_map(|s| s[i * h..].to_vec()).collect();
            assert_eq!([g, u].concat(), full.wgu, "layer {l} wgu, world {world}");
            // Row-parallel: each output row is the ranks' column blocks side by side.
            for (name, parts, width, full) in [
                ("wo", part(|l| &l.wo), qd, &full.wo),
                ("wdown", part(|l| &l.wdown), i, &full.wdown),
            ] {
                let joined: Vec<bf16> = (0..h)
                    .flat_map(|row| {
                        parts
                            .iter()
                            .flat_map(move |p| p[row * width..(row + 1) * width].to_vec())
                    })
                    .collect();
                assert_eq!(&joined, full, "layer {l} {name}, world {world}");
            }
            for s in &shards {
                assert_eq!(s.layers[l].attn_norm, full.attn_norm);
                assert_eq!(s.layers[l].mlp_norm, full.mlp_norm);
            }
        }
        for s in &shards {
            assert_eq!((&s.embed, &s.lm_head), (&w.embed, &w.lm_head));
            assert_eq!(s.final_norm, w.final_norm);
        }
    }
    // 4 query heads and 2 KV heads do not split 4 ways.
    let e = w.shard(&c, 0, 4).unwrap_err();
    assert!(e.contains("KV heads"), "{e}");
    assert!(c.shard(2, 2).is_err());
}

/// Two ranks on the CPU backend, summing through host memory: the tensor-parallel model (shards,
/// the sums after o_proj and down_proj, replicated LM head and sampler) serves as the one-rank
/// model does, against the same f32 reference.
#[test]
fn cpu_tensor_parallel_matches_the_f32_reference() {
    let seed = 7;
    let (checked, _) =
        serve_engine_against_reference(seed, |c, w| group(c, w, 2, Place::Cpu, false, seed));
    assert!(checked >= 30, "{checked} rows checked");
}

/// One mixed step (two prompts, prefill) on `engine`: its logits.
fn first_step_logits(engine: &mut Engine, c: &Config, seed: u64) -> (Vec<i32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let tokens: Vec<i32> = (0..21).map(|_| rng.below(c.vocab) as i32).collect();
    let kv = ferrinfer::KvIndex::paged_from_lens(
        CAP.page_size,
        &[13, 8],
        &[5, 2],
        CAP.num_pages,
        ferrinfer::KvLayout::Nhd,
    )
    .unwrap();
    let p = [SampleParams::greedy(); 2];
    let inp = StepInput {
        tokens: &tokens,
        qo_indptr: &[0, 13, 21],
        kv,
        params: &p,
    };
    let sampled = engine.step(&inp).unwrap();
    (sampled, engine.logits(2).unwrap())
}

/// A prefill step's logits at TP N equal TP 1's within bf16 error, and its greedy tokens are TP
/// 1's where the reference's margin is clear. TP 1 runs (and is dropped) first.
fn compare_with_tp1(mut tp1: Engine, tpn: impl FnOnce() -> Engine, world: usize, seed: u64) {
    let c = Config::tiny();
    let (t1, l1) = first_step_logits(&mut tp1, &c, seed);
    drop(tp1);
    let mut tpn = tpn();
    let (tn, ln) = first_step_logits(&mut tpn, &c, seed);
    for row in 0..2 {
        let (a, b) = (
            &l1[row * c.vocab..(row + 1) * c.vocab],
            &ln[row * c.vocab..(row + 1) * c.vocab],
        );
        let err = rel_l2(b, a);
        assert!(
            err <= LOGITS_TOL,
            "request {row}: TP {world} vs TP 1 logits rel L2 {err:.2e} (seed {seed})"
        );
        let (best, margin) = argmax_margin(a);
        if margin > MARGIN {
            assert_eq!(
                tn[row], best as i32,
                "request {row}: greedy token (seed {seed})"
            );
            assert_eq!(tn[row], t1[row], "request {row}: TP {world} vs TP 1 token");
        }
    }
}

#[test]
fn cpu_tensor_parallel_prefill_equals_tp1() {
    let c = Config::tiny();
    let w = Weights::random(&c, 5);
    let tp1 = one(&c, &w, Exec::cpu(), false, 5);
    compare_with_tp1(tp1, || group(&c, &w, 2, Place::Cpu, false, 5), 2, 5);
}

/// `--tp` that does not divide the heads is refused before any device is touched.
#[test]
fn tensor_parallel_refuses_a_split_that_does_not_divide() {
    let c = Config::tiny();
    let w = Weights::random(&c, 1);
    let e = Group::new(&c, 4, Place::Gpu, Some(&w), CAP, 1)
        .err()
        .unwrap();
    assert!(e.contains("--tp 4") && e.contains("KV heads"), "{e}");
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

#[cfg(feature = "nccl")]
mod gpu_tp {
    //! Tensor parallelism over NCCL: rank r on GPU r.

    use super::*;

    /// TP 2 when two GPUs are visible; TP 1 (through the same rank threads) otherwise, said so.
    fn world() -> usize {
        let n = ferrinfer::device::Gpu::count().expect("this test needs a CUDA driver");
        assert!(n >= 1, "this test needs a CUDA GPU");
        if n < 2 {
            println!("only {n} GPU: ran TP 1 through the rank threads, not a real split");
        }
        n.min(2)
    }

    /// TP N (graphs on and off) serves against the f32 reference, every rank's logits and
    /// tokens alike; a prefill step's logits at TP N equal TP 1's within bf16 error and its
    /// greedy tokens are TP 1's where the reference's margin is clear.
    #[test]
    #[ignore = "requires a CUDA GPU"]
    fn gpu_tensor_parallel_matches_tp1_and_the_reference() {
        let world = world();
        let seed = Rng::from_time().seed();
        let (checked, _) = serve_engine_against_reference(seed, |c, w| {
            group(c, w, world, Place::Gpu, false, seed)
        });
        assert!(checked >= 30, "{checked} rows checked (eager, seed {seed})");
        let (checked, replays) =
            serve_engine_against_reference(seed, |c, w| group(c, w, world, Place::Gpu, true, seed));
        assert!(
            checked >= 30,
            "{checked} rows checked (graphs, seed {seed})"
        );
        assert!(replays >= 5, "only {replays} graph replays");

        let c = Config::tiny();
        let w = Weights::random(&c, seed);
        let tp1 = one(&c, &w, Exec::gpu(0).unwrap(), false, seed);
        compare_with_tp1(
            tp1,
            || group(&c, &w, world, Place::Gpu, false, seed),
            world,
            seed,
        );
    }
}
