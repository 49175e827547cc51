//! A Llama-style serving loop on ferrinfer: continuous batching with chunked prefill, paged KV,
//! decode steps replayed as CUDA graphs per batch-size bucket, cuBLAS GEMMs, sampling with
//! per-request parameters. Without a GPU it runs the tiny config on the CPU backend.
//!
//!     cargo run --release --example serve                       # tiny model, a few requests
//!     cargo run --release --example serve -- --weights m.safetensors --config tiny
//!     cargo run --release --example serve -- --config llama3-8b --batch 64 --context 4096 \
//!         --steps 20 --chart serve.svg                          # GPU timing mode
//!     cargo run --release --features nccl --example serve -- --tp 2 ...  # tensor parallel
//!     cargo run --release --example serve -- --cpu --tp 2      # a simulated split on the CPU

mod config;
mod exec;
mod graphs;
mod model;
mod profile;
mod reference;
mod scheduler;
mod tp;
mod weights;

use std::path::PathBuf;
use std::time::Instant;

use ferrinfer::cudarc::driver::sys::CUevent_flags;
use ferrinfer::prelude::*;
use ferrinfer_testkit::Rng;

use config::Config;
use exec::{Exec, Res, err};
use graphs::Graphs;
use model::{Capacity, Model, Reduce, SampleParams};
use scheduler::{Request, Scheduler};
use tp::{Engine, Group, Place};
use weights::Weights;

#[derive(Clone)]
struct Args {
    config: Config,
    weights: Option<PathBuf>,
    seed: u64,
    cpu: bool,
    batch: Option<usize>,
    context: usize,
    steps: usize,
    chart: Option<PathBuf>,
    no_graphs: bool,
    /// Tensor-parallel ranks (one GPU each).
    tp: usize,
}

fn parse() -> Res<Args> {
    let mut a = Args {
        config: Config::tiny(),
        weights: None,
        seed: 2026,
        cpu: false,
        batch: None,
        context: 4096,
        steps: 20,
        chart: None,
        no_graphs: false,
        tp: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--config" => a.config = Config::by_name(&val()?)?,
            "--weights" => a.weights = Some(val()?.into()),
            "--seed" => a.seed = num(val()?)? as u64,
            "--cpu" => a.cpu = true,
            "--batch" => a.batch = Some(num(val()?)?),
            "--context" => a.context = num(val()?)?,
            "--steps" => a.steps = num(val()?)?,
            "--chart" => a.chart = Some(val()?.into()),
            "--no-graphs" => a.no_graphs = true,
            "--tp" => a.tp = num(val()?)?,
            "-h" | "--help" => {
                println!(
                    "serve [--config tiny|llama3-8b] [--weights FILE] [--seed N] [--cpu] \
                     [--no-graphs] [--tp N]\n      [--batch B --context L --steps N \
                     [--chart OUT.svg]] (timing mode, GPU)\n  --tp N: tensor parallelism over \
                     GPUs 0..N (build with --features nccl; with --cpu, a simulated split)"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {flag} (--help lists them)")),
        }
    }
    if a.tp == 0 {
        return Err("--tp must be at least 1".into());
    }
    // Refused here, before any device is touched: heads and MLP must split evenly.
    a.config
        .shard(0, a.tp)
        .map_err(|e| format!("--tp {}: {e}", a.tp))?;
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = parse()?;
    if args.tp > 1 {
        return run_tp(args);
    }
    let exec = if args.cpu {
        Exec::cpu()
    } else {
        match Exec::gpu(0) {
            Ok(e) => e,
            Err(why) => {
                println!("no GPU ({why}): running on the CPU backend (ferrinfer's reference ops)");
                Exec::cpu()
            }
        }
    };
    println!("backend: {}", exec.backend.describe());
    if args.batch.is_some() {
        return timing(&args, 0, 1, exec, None);
    }
    if exec.dev.is_none() && args.config.name != "tiny" {
        return Err(format!(
            "the CPU backend runs the tiny config only, not {}",
            args.config.name
        ));
    }
    let w = weights(&args)?;
    let on_gpu = exec.dev.is_some();
    let m = Model::new(&args.config, exec, Some(&w), DEMO_CAP, args.seed)?;
    let engine = Engine::One {
        m: Box::new(m),
        graphs: Graphs::default(),
        use_graphs: !args.no_graphs,
    };
    demo(&args, engine, &w, on_gpu)
}

/// `--tp N`: N rank threads, GPU r for rank r (or N simulated ranks on the CPU with `--cpu`).
fn run_tp(args: Args) -> Res<()> {
    let world = args.tp;
    let place = if args.cpu { Place::Cpu } else { Place::Gpu };
    println!(
        "backend: tensor parallel, {world} ranks on {}",
        match place {
            Place::Gpu => format!("GPUs 0..{world}, summed by NCCL"),
            Place::Cpu => "the CPU backend, summed in host memory".into(),
        }
    );
    if args.batch.is_some() {
        if place == Place::Cpu {
            return Err("the timing mode needs GPUs".into());
        }
        let a = args.clone();
        let ranks = tp::spawn_ranks(world, place, move |rank, exec, reduce| {
            timing(&a, rank, world, exec, reduce)
        })?;
        return tp::join(ranks).map(|_| ());
    }
    if place == Place::Cpu && args.config.name != "tiny" {
        return Err(format!(
            "the CPU backend runs the tiny config only, not {}",
            args.config.name
        ));
    }
    let w = weights(&args)?;
    let group = Group::new(&args.config, world, place, Some(&w), DEMO_CAP, args.seed)?;
    let engine = Engine::Tp {
        group,
        use_graphs: !args.no_graphs,
    };
    demo(&args, engine, &w, place == Place::Gpu)
}

/// The demo's weights: loaded, or random from the seed (the same full model for any `--tp`).
fn weights(args: &Args) -> Res<Weights> {
    match &args.weights {
        Some(p) => Weights::load(&args.config, p),
        None => Ok(Weights::random(&args.config, args.seed)),
    }
}

/// The demo's cache and step sizes.
const DEMO_CAP: Capacity = Capacity {
    page_size: 16,
    num_pages: 64,
    max_tokens: 64,
    max_batch: 8,
};

/// Continuous batching over a few requests arriving at different steps.
fn demo(args: &Args, mut engine: Engine, w: &Weights, on_gpu: bool) -> Res<()> {
    let c = &args.config;
    let cap = DEMO_CAP;
    let mut sched = Scheduler::new(
        cap.page_size,
        cap.num_pages,
        cap.max_tokens,
        cap.max_batch,
        24,
    );
    let mut rng = Rng::new(args.seed);
    // (arrival step, prompt length, new tokens, sampling)
    let plan = [
        (0, 21, 12, SampleParams::greedy()),
        (
            0,
            5,
            8,
            SampleParams {
                temperature: 0.8,
                top_k: 50,
                top_p: 0.9,
            },
        ),
        (2, 40, 10, SampleParams::greedy()),
        (
            3,
            9,
            14,
            SampleParams {
                temperature: 1.2,
                top_k: 20,
                top_p: 0.95,
            },
        ),
        (
            5,
            17,
            6,
            SampleParams {
                temperature: 0.7,
                top_k: 100,
                top_p: 0.8,
            },
        ),
        (8, 3, 9, SampleParams::greedy()),
    ];
    let (mut step, mut generated) = (0usize, 0usize);
    let start = Instant::now();
    let mut decode_ms = Vec::new();
    loop {
        for (id, &(at, len, new, params)) in plan.iter().enumerate() {
            if at == step {
                let prompt = (0..len).map(|_| rng.below(c.vocab) as i32).collect();
                sched.add(Request {
                    id,
                    prompt,
                    max_new: new,
                    params,
                })?;
                println!(
                    "step {step:>3}: request {id} arrives ({len} prompt tokens, {new} to generate)"
                );
            }
        }
        let Some(s) = sched.next()? else {
            if plan.iter().all(|p| p.0 < step) {
                break;
            }
            step += 1;
            continue;
        };
        let inp = s.input();
        let t = Instant::now();
        let tokens = engine.step(&inp)?;
        if inp.is_decode() {
            decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let kind = if inp.is_decode() { "decode" } else { "mixed" };
        println!(
            "step {step:>3}: {kind:<6} {:>2} requests {:>3} rows  free pages {:>2}  tokens {:?}",
            inp.batch(),
            inp.tokens.len(),
            sched.free_pages(),
            s.ids.iter().zip(&tokens).collect::<Vec<_>>()
        );
        if step == 0 {
            check_first_step(&mut engine, c, w, &sched, &s)?;
        }
        for d in sched.finish(&s, &tokens) {
            generated += d.generated.len();
            println!("           request {} done: {:?}", d.id, d.generated);
        }
        step += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    decode_ms.sort_by(f64::total_cmp);
    println!(
        "{generated} tokens in {step} steps, {secs:.2} s ({:.1} tokens/s), median decode step {:.3} ms, \
         {} graph replays; pages all back: {}",
        generated as f64 / secs,
        decode_ms.get(decode_ms.len() / 2).copied().unwrap_or(0.0),
        engine.replays(),
        sched.free_pages() == cap.num_pages as usize
    );
    if !on_gpu {
        println!("ran on the CPU backend (no GPU): the tiny config, ferrinfer's reference ops");
    }
    Ok(())
}

/// The first step's logits against the plain-Rust f32 model, for requests whose prompt is now
/// cached.
fn check_first_step(
    engine: &mut Engine,
    c: &Config,
    w: &Weights,
    sched: &Scheduler,
    s: &scheduler::Step,
) -> Res<()> {
    let r = reference::Reference::new(c, w);
    let logits = engine.logits(s.ids.len())?;
    for (row, id) in s.ids.iter().enumerate() {
        let Some(seq) = sched.cached(*id) else {
            continue;
        };
        let want = r.logits(seq);
        let got = &logits[row * c.vocab..(row + 1) * c.vocab];
        println!(
            "           request {id}: logits vs the f32 reference, relative L2 error {:.2e}",
            reference::rel_l2(got, &want)
        );
    }
    Ok(())
}

/// Decode-step timing at a given batch and context, against the bandwidth limit: rank `rank`
/// of `world` (tensor parallelism; every rank runs the same steps, rank 0 prints). The limit is
/// one GPU's: the bytes its shard reads.
fn timing(
    args: &Args,
    rank: usize,
    world: usize,
    exec: Exec,
    reduce: Option<Box<dyn Reduce>>,
) -> Res<()> {
    macro_rules! say {
        ($($t:tt)*) => { if rank == 0 { println!($($t)*) } };
    }
    let c = &args.config.shard(rank, world)?;
    let dev = exec.dev.as_ref().ok_or("the timing mode needs a GPU")?;
    let stream = dev.stream.clone();
    let b = args.batch.unwrap_or(64);
    let ctx_len = args.context;
    let page = 16u32;
    let per_req = (ctx_len + args.steps + 2).div_ceil(page as usize);
    let num_pages = (b * per_req) as u32;
    say!(
        "timing: {} ({:.2} B params), batch {b}, context {ctx_len}, TP {world}: weights random \
         on the device{}; the KV cache is filled with random values for the context (no prefill \
         is run)",
        c.name,
        args.config.params() as f64 / 1e9,
        if world > 1 {
            " (filled per shard: not one model split, which timing does not need)"
        } else {
            ""
        }
    );
    let cap = Capacity {
        page_size: page,
        num_pages,
        max_tokens: b,
        max_batch: b,
    };
    let t = Instant::now();
    let mut m = Model::new(c, exec, None, cap, args.seed)?;
    m.reduce = reduce;
    m.fill_cache_random(args.seed as u32)?;
    m.exec.sync()?;
    say!("  setup {:.1} s", t.elapsed().as_secs_f64());
    let mut rng = Rng::new(args.seed);
    let tokens: Vec<i32> = (0..b).map(|_| rng.below(c.vocab) as i32).collect();
    let qo: Vec<i32> = (0..=b as i32).collect();
    let params = vec![
        SampleParams {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.9
        };
        b
    ];
    let pages: Vec<i32> = (0..num_pages as i32).collect();
    let step_input = |len: usize| -> Res<(KvIndex, Vec<i32>)> {
        let np = len.div_ceil(page as usize);
        let idx: Vec<i32> = (0..b)
            .flat_map(|r| pages[r * per_req..r * per_req + np].to_vec())
            .collect();
        let kv =
            KvIndex::paged_from_lens(page, &vec![len as u32; b], &idx, num_pages, KvLayout::Nhd)
                .map_err(model::fe)?;
        Ok((kv, idx))
    };
    let mut graphs = Graphs::default();
    graphs.replay_events = Some(Vec::new());
    // Step 0 runs eagerly and captures; the rest replan and replay, timed around the replay.
    for s in 0..=args.steps {
        let (kv, _) = step_input(ctx_len + 1 + s)?;
        let inp = model::StepInput {
            tokens: &tokens,
            qo_indptr: &qo,
            kv,
            params: &params,
        };
        graphs.step(&mut m, &inp)?;
    }
    let mut times = Vec::new();
    for (a, b) in graphs.replay_events.as_ref().ok_or("no events")? {
        times.push(f64::from(a.elapsed_ms(b).map_err(err("elapsed"))?));
    }
    if times.is_empty() {
        return Err("--steps must be at least 1 (step 0 captures)".into());
    }
    times.sort_by(f64::total_cmp);
    let step_ms = times[times.len() / 2];
    // Bytes a decode step must read on one GPU: every weight of its shard but the embedding
    // table (b rows of it), and every cached K and V of its KV heads, of every layer.
    let weight_bytes = 2.0 * (c.params() - c.vocab * c.hidden) as f64;
    let kv_len = ctx_len + 1 + args.steps / 2;
    let kv_bytes = 2.0 * 2.0 * (b * kv_len * c.kv_dim() * c.layers) as f64;
    let bw = copy_bandwidth(&m)?;
    let limit_ms = (weight_bytes + kv_bytes) / bw * 1e3;
    say!(
        "  decode step (graph replay, median of {}): {step_ms:.3} ms, {:.0} tokens/s, TP {world}",
        times.len(),
        b as f64 / step_ms * 1e3
    );
    say!(
        "  bytes per step{}: weights {:.2} GB + KV {:.2} GB; copy bandwidth {:.0} GB/s (read + write) \
         -> limit {limit_ms:.3} ms; ratio {:.3} (goal <= 1.25)",
        if world > 1 { " per GPU" } else { "" },
        weight_bytes / 1e9,
        kv_bytes / 1e9,
        bw / 1e9,
        step_ms / limit_ms
    );
    // The breakdown: one eager step with events around every op.
    let (kv, _) = step_input(ctx_len + 2 + args.steps)?;
    let inp = model::StepInput {
        tokens: &tokens,
        qo_indptr: &qo,
        kv,
        params: &params,
    };
    if rank == 0 {
        m.prof.start();
    }
    let t0 = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(err("event"))?;
    m.step(&inp)?;
    let t1 = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(err("event"))?;
    m.prof.stop();
    if rank != 0 {
        return Ok(());
    }
    let totals = m.prof.totals()?;
    println!(
        "  per-op breakdown (one eager step with events around each op, {:.3} ms wall on the stream):",
        t0.elapsed_ms(&t1).map_err(err("elapsed"))?
    );
    print!("{}", profile::table(&totals));
    if let Some(path) = &args.chart {
        let title = format!(
            "{} decode step, batch {b}, context {ctx_len}, TP {world}: time per op",
            c.name
        );
        std::fs::write(path, profile::svg(&totals, &title)).map_err(err("chart"))?;
        println!("  chart written to {}", path.display());
    }
    Ok(())
}

/// Device-to-device copy bandwidth, counting bytes read and written (as the anchors do).
fn copy_bandwidth(m: &Model) -> Res<f64> {
    let d = m.exec.dev.as_ref().ok_or("no GPU")?;
    let n = 1usize << 30;
    let src = d.stream.alloc_zeros::<u8>(n).map_err(err("alloc"))?;
    let mut dst = d.stream.alloc_zeros::<u8>(n).map_err(err("alloc"))?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let a = d
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err("event"))?;
        d.stream.memcpy_dtod(&src, &mut dst).map_err(err("copy"))?;
        let b = d
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err("event"))?;
        best = best.min(f64::from(a.elapsed_ms(&b).map_err(err("elapsed"))?));
    }
    Ok(2.0 * n as f64 / (best * 1e-3))
}
