//! A Llama-style serving loop on ferrinfer: continuous batching with chunked prefill, paged KV,
//! decode steps replayed as CUDA graphs per batch-size bucket, cuBLAS GEMMs, sampling with
//! per-request parameters. Without a GPU it runs the tiny config on the CPU backend.
//!
//!     cargo run --release --example serve                       # tiny model, a few requests
//!     cargo run --release --example serve -- --weights m.safetensors --config tiny
//!     cargo run --release --example serve -- --config llama3-8b --batch 64 --context 4096 \
//!         --steps 20 --chart serve.svg                          # GPU timing mode

mod config;
mod exec;
mod graphs;
mod model;
mod profile;
mod reference;
mod scheduler;
mod weights;

use std::path::PathBuf;
use std::time::Instant;

use ferrinfer::cudarc::driver::sys::CUevent_flags;
use ferrinfer::prelude::*;
use ferrinfer_testkit::Rng;

use config::Config;
use exec::{Exec, Res, err};
use graphs::Graphs;
use model::{Capacity, Model, SampleParams};
use scheduler::{Request, Scheduler};
use weights::Weights;

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
            "-h" | "--help" => {
                println!(
                    "serve [--config tiny|llama3-8b] [--weights FILE] [--seed N] [--cpu] \
                     [--no-graphs]\n      [--batch B --context L --steps N [--chart OUT.svg]] \
                     (timing mode, GPU)"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {flag} (--help lists them)")),
        }
    }
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
        return timing(&args, exec);
    }
    if exec.dev.is_none() && args.config.name != "tiny" {
        return Err(format!(
            "the CPU backend runs the tiny config only, not {}",
            args.config.name
        ));
    }
    demo(&args, exec)
}

/// Continuous batching over a few requests arriving at different steps.
fn demo(args: &Args, exec: Exec) -> Res<()> {
    let c = &args.config;
    let w = match &args.weights {
        Some(p) => Weights::load(c, p)?,
        None => Weights::random(c, args.seed),
    };
    let on_gpu = exec.dev.is_some();
    let cap = Capacity {
        page_size: 16,
        num_pages: 64,
        max_tokens: 64,
        max_batch: 8,
    };
    let mut m = Model::new(c, exec, Some(&w), cap, args.seed)?;
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
    let mut graphs = Graphs::default();
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
        let tokens = if on_gpu && !args.no_graphs && inp.is_decode() {
            graphs.step(&mut m, &inp)?
        } else {
            m.step(&inp)?
        };
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
            check_first_step(&m, &w, &sched, &s)?;
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
        graphs.replays,
        sched.free_pages() == cap.num_pages as usize
    );
    if !on_gpu {
        println!("ran on the CPU backend (no GPU): the tiny config, ferrinfer's reference ops");
    }
    Ok(())
}

/// The first step's logits against the plain-Rust f32 model, for requests whose prompt is now
/// cached.
fn check_first_step(m: &Model, w: &Weights, sched: &Scheduler, s: &scheduler::Step) -> Res<()> {
    let r = reference::Reference::new(&m.c, w);
    let logits = m.logits(s.ids.len())?;
    for (row, id) in s.ids.iter().enumerate() {
        let Some(seq) = sched.cached(*id) else {
            continue;
        };
        let want = r.logits(seq);
        let got = &logits[row * m.c.vocab..(row + 1) * m.c.vocab];
        println!(
            "           request {id}: logits vs the f32 reference, relative L2 error {:.2e}",
            reference::rel_l2(got, &want)
        );
    }
    Ok(())
}

/// Decode-step timing at a given batch and context, against the bandwidth limit.
fn timing(args: &Args, exec: Exec) -> Res<()> {
    let c = &args.config;
    let dev = exec.dev.as_ref().ok_or("the timing mode needs a GPU")?;
    let stream = dev.stream.clone();
    let b = args.batch.unwrap_or(64);
    let ctx_len = args.context;
    let page = 16u32;
    let per_req = (ctx_len + args.steps + 2).div_ceil(page as usize);
    let num_pages = (b * per_req) as u32;
    println!(
        "timing: {} ({:.2} B params), batch {b}, context {ctx_len}: weights random on the device; \
         the KV cache is filled with random values for the context (no prefill is run)",
        c.name,
        c.params() as f64 / 1e9
    );
    let cap = Capacity {
        page_size: page,
        num_pages,
        max_tokens: b,
        max_batch: b,
    };
    let t = Instant::now();
    let mut m = Model::new(c, exec, None, cap, args.seed)?;
    m.fill_cache_random(args.seed as u32)?;
    m.exec.sync()?;
    println!("  setup {:.1} s", t.elapsed().as_secs_f64());
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
    // Bytes a decode step must read: every weight but the embedding table (b rows of it), and
    // every cached K and V of every layer.
    let weight_bytes = 2.0 * (c.params() - c.vocab * c.hidden) as f64;
    let kv_len = ctx_len + 1 + args.steps / 2;
    let kv_bytes = 2.0 * 2.0 * (b * kv_len * c.kv_dim() * c.layers) as f64;
    let bw = copy_bandwidth(&m)?;
    let limit_ms = (weight_bytes + kv_bytes) / bw * 1e3;
    println!(
        "  decode step (graph replay, median of {}): {step_ms:.3} ms, {:.0} tokens/s",
        times.len(),
        b as f64 / step_ms * 1e3
    );
    println!(
        "  bytes per step: weights {:.2} GB + KV {:.2} GB; copy bandwidth {:.0} GB/s (read + write) \
         -> limit {limit_ms:.3} ms; ratio {:.3} (goal <= 1.25)",
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
    m.prof.start();
    let t0 = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(err("event"))?;
    m.step(&inp)?;
    let t1 = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(err("event"))?;
    m.prof.stop();
    let totals = m.prof.totals()?;
    println!(
        "  per-op breakdown (one eager step with events around each op, {:.3} ms wall on the stream):",
        t0.elapsed_ms(&t1).map_err(err("elapsed"))?
    );
    print!("{}", profile::table(&totals));
    if let Some(path) = &args.chart {
        let title = format!(
            "{} decode step, batch {b}, context {ctx_len}: time per op",
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
