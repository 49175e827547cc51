//! `ferrinfer-bench`: the standard configurations of DESIGN.md ("Benchmarks" and "Serving ops")
//! through ferrinfer's public API, timed with CUDA events, printed as a table and written as the anchor's JSON.
//!
//!     ferrinfer-bench [--filter SUBSTR[,SUBSTR...]] [--json PATH] [--kv-chunks N[,N...]]
//!                     [--warm-ms MS] [--time-ms MS]
//!
//! A filter item selects the keys that contain it, or with a leading `=` the one key it names.
//!
//! `--kv-chunks` also times every selected decode configuration with its KV split forced to each
//! chunk size (batch-invariant mode, tensor cores, rows `<key>@ferrinfer-chunk-N`): the curve the
//! planner's split rule is checked against.
//!
//! Every configuration is planned once (not timed), warmed up (the first call includes the JIT
//! compile, reported apart), then timed for about 200 ms (`--time-ms`); the median iteration is
//! reported. `--warm-ms` runs each configuration that long first, untimed, so the timed loop sees
//! the GPU's steady power-capped clocks rather than the boost of its first 100 ms (see
//! `timing::Schedule`). A configuration that fails is reported and skipped; the exit status is 1
//! if any failed.

mod configs;
mod inputs;
mod ops;
mod report;
mod timing;

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::CudaStream;
use ferrinfer::Variant;
use ferrinfer::prelude::*;
use ferrinfer::variants::{LlamaRope, SlidingWindow, SoftCap, Standard};

use configs::{Config, Kind};
use inputs::InputSet;
use report::Row;
use timing::{BenchResult, Schedule, Timing};

const USAGE: &str = "usage: ferrinfer-bench [--filter SUBSTR[,SUBSTR...]] [--json PATH] \
     [--impls IMPL[,IMPL...]] [--kv-chunks N[,N...]] [--warm-ms MS] [--time-ms MS]";
/// Elements of each buffer of the copy ceiling: 1024^3 bf16 (2 GiB), as the anchor copies.
const COPY_ELEMS: usize = 1 << 30;

/// Command-line options.
#[derive(Debug, Default, PartialEq)]
struct Args {
    /// Run only the configurations whose key contains one of these (comma-separated); all when
    /// empty.
    filter: String,
    /// Time only the rows of these implementations (`ferrinfer-fa3`, ...); all when empty. An
    /// A/B of one kernel then spends no device time on the rows beside it.
    impls: Vec<String>,
    /// Where to write the JSON results.
    json: Option<PathBuf>,
    /// KV chunk sizes each decode configuration is also timed with (forced splits).
    kv_chunks: Vec<u32>,
    /// How long each configuration runs before and while it is timed.
    schedule: Schedule,
}

impl Args {
    /// A filter item takes the keys that contain it, or with a leading `=` only the key it names.
    fn selects(&self, key: &str) -> bool {
        self.filter.split(',').any(|f| {
            f.strip_prefix('=')
                .map_or(key.contains(f), |exact| key == exact)
        })
    }

    fn times(&self, imp: &str) -> bool {
        self.impls.is_empty() || self.impls.iter().any(|i| i == imp)
    }
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args::default();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--filter" => args.filter = value()?,
            "--impls" => args.impls = value()?.split(',').map(|i| i.trim().into()).collect(),
            "--json" => args.json = Some(PathBuf::from(value()?)),
            "--kv-chunks" => args.kv_chunks = kv_chunks(&value()?)?,
            "--warm-ms" => args.schedule.warm_ms = millis(&a, &value()?, 0.0)?,
            "--time-ms" => args.schedule.timed_ms = millis(&a, &value()?, 1.0)?,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(args)
}

/// `--kv-chunks`' list: positive multiples of 16 (what the batch-invariant mode takes), each once,
/// in the order given.
fn kv_chunks(list: &str) -> Result<Vec<u32>, String> {
    let mut chunks = Vec::new();
    for token in list.split(',').map(str::trim) {
        let chunk = token
            .parse::<u32>()
            .ok()
            .filter(|c| *c > 0 && c % 16 == 0)
            .ok_or(format!(
                "--kv-chunks takes positive multiples of 16, not {token:?}"
            ))?;
        if !chunks.contains(&chunk) {
            chunks.push(chunk);
        }
    }
    Ok(chunks)
}

/// A duration option's milliseconds: a finite number of at least `least`.
fn millis(name: &str, v: &str, least: f64) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms >= least => Ok(ms),
        _ => Err(format!(
            "{name} takes milliseconds of at least {least}, not {v:?}"
        )),
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let backend = Backend::cuda(0).map_err(|e| e.to_string());
    match &backend {
        Ok(b) => println!("device: {}", b.describe()),
        Err(e) => println!("no GPU: {e}"),
    }
    println!("{}", report::header());

    let mut rows = Vec::new();
    let mut failed = 0;
    let mut record = |key: String, result: BenchResult<Row>| match result {
        Ok(row) => {
            println!("{}", report::line(&row));
            rows.push(row);
        }
        Err(e) => {
            println!("{key:60} FAILED: {e}");
            failed += 1;
        }
    };
    let on_gpu = |f: &dyn Fn(&Backend) -> BenchResult<Row>| match &backend {
        Ok(b) => guarded(|| f(b)),
        Err(_) => Err("no GPU (see the first line)".into()),
    };

    let schedule = args.schedule;
    record(
        "copy@ferrinfer".into(),
        on_gpu(&|b: &Backend| bench_copy(b, schedule)),
    );
    let hopper = backend
        .as_ref()
        .is_ok_and(|b| b.gpu().is_some_and(|g| g.arch().major == 9));
    for cfg in configs::standard().into_iter().chain(configs::ours_only()) {
        if !args.selects(cfg.key) {
            continue;
        }
        // Prefill's default row runs FA2 forced, so the FA3 row beside it shows the change;
        // decode also runs on each kernel forced, and on tensor cores with each count of warps
        // along the keys forced, so Auto's choices can be checked against both, and with each
        // `--kv-chunks` split forced, to check the plan's split against.
        let prefill = |prefill_kernel| PlanConfig {
            prefill_kernel,
            ..PlanConfig::default()
        };
        let decode = |decode_kernel| PlanConfig {
            decode_kernel,
            ..PlanConfig::default()
        };
        let mut rows = vec![(report::IMPL.to_string(), prefill(PrefillKernel::Fa2))];
        if cfg.kind == Kind::Prefill && hopper {
            rows.push((report::IMPL_FA3.into(), prefill(PrefillKernel::Fa3)));
            rows.push((report::IMPL_AUTO.into(), prefill(PrefillKernel::Auto)));
            if cfg.head_dim == 128 && !matches!(cfg.storage, configs::Storage::Paged(_)) {
                for (imp, kv_tile) in [
                    (report::IMPL_FA3_K128, KvTile::Default),
                    (report::IMPL_FA3_K176, KvTile::Long),
                ] {
                    let config = PlanConfig {
                        kv_tile,
                        ..prefill(PrefillKernel::Fa3)
                    };
                    rows.push((imp.into(), config));
                }
            }
        }
        if cfg.kind == Kind::Decode {
            rows.push((
                report::IMPL_CUDA_CORES.into(),
                decode(DecodeKernel::CudaCores),
            ));
            rows.push((
                report::IMPL_TENSOR_CORES.into(),
                decode(DecodeKernel::TensorCores),
            ));
            for (imp, kv_warps, kv_tile) in [
                (report::IMPL_KV_WARPS_1, KvWarps::One, KvTile::Auto),
                (report::IMPL_KV_WARPS_2, KvWarps::Two, KvTile::Auto),
                (report::IMPL_KV_TILE_DEFAULT, KvWarps::Auto, KvTile::Default),
                (report::IMPL_KV_TILE_NARROW, KvWarps::Auto, KvTile::Narrow),
            ] {
                let config = PlanConfig {
                    kv_warps,
                    kv_tile,
                    ..decode(DecodeKernel::TensorCores)
                };
                rows.push((imp.into(), config));
            }
            for &chunk in &args.kv_chunks {
                let config = PlanConfig {
                    fixed_kv_chunk: Some(chunk),
                    ..decode(DecodeKernel::TensorCores)
                };
                rows.push((report::chunk_impl(chunk), config));
            }
        }
        rows.retain(|(imp, _)| args.times(imp));
        if rows.is_empty() {
            continue;
        }
        // The inputs once for all the rows: the same data every row had from its seeds, without
        // making and uploading it again (a decode cache is half a billion elements, seconds of
        // host work a row on the device machine's 16 cores, where time is scarcest).
        let inputs = backend
            .as_ref()
            .ok()
            .map(|b| guarded(|| upload_inputs(b, &cfg).map(RefCell::new)));
        for (imp, kernels) in rows {
            let key = format!("{}@{imp}", cfg.key);
            let result = match &inputs {
                None => Err("no GPU (see the first line)".into()),
                Some(Err(e)) => Err(format!("inputs: {e}").into()),
                Some(Ok(sets)) => on_gpu(&|b: &Backend| {
                    bench_config(b, &cfg, &key, kernels, schedule, &mut sets.borrow_mut())
                }),
            };
            record(key.clone(), result);
        }
    }

    for case in ops::cases() {
        if args.selects(case.key) {
            let key = format!("{}@{}", case.key, ops::IMPL);
            record(key, on_gpu(&|b: &Backend| ops::bench(b, &case, schedule)));
        }
    }

    if let Some(path) = &args.json {
        match std::fs::write(path, report::json(&rows)) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => {
                println!("cannot write {}: {e}", path.display());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        println!("{failed} failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Run `f`, turning a panic into an error so that the other configurations still run.
fn guarded<T>(f: impl FnOnce() -> BenchResult<T>) -> BenchResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(format!("panicked: {msg}").into())
    })
}

fn stream_of(backend: &Backend) -> BenchResult<&Arc<CudaStream>> {
    Ok(backend.gpu().ok_or("not a CUDA backend")?.stream())
}

/// Device-to-device copy bandwidth (read plus write bytes): the ceiling for decode.
fn bench_copy(backend: &Backend, schedule: Schedule) -> BenchResult<Row> {
    let stream = stream_of(backend)?;
    let pattern = stream.clone_htod(&inputs::normal_bf16(1 << 24, 99))?;
    let mut src = stream.alloc_zeros::<bf16>(COPY_ELEMS)?;
    for start in (0..COPY_ELEMS).step_by(pattern.len()) {
        let end = (start + pattern.len()).min(COPY_ELEMS);
        stream.memcpy_dtod(
            &pattern.slice(..end - start),
            &mut src.slice_mut(start..end),
        )?;
    }
    let mut dst = stream.alloc_zeros::<bf16>(COPY_ELEMS)?;
    let t = timing::time_on_stream(
        stream,
        schedule,
        |_| Ok(stream.memcpy_dtod(&src, &mut dst)?),
    )?;
    // Read once and written once, 2 bytes an element.
    let bytes = (2 * COPY_ELEMS * 2) as f64;
    Ok(Row {
        key: "copy@ferrinfer".into(),
        value: bytes / t.median_ms / 1e6,
        unit: "GB/s",
        ms: t.median_ms,
        compile_s: None,
    })
}

/// A planned configuration, whichever wrapper runs it.
enum Plan {
    Decode(BatchDecode),
    Prefill(BatchPrefill),
}

impl Plan {
    fn new(backend: &Backend, cfg: &Config, config: PlanConfig) -> BenchResult<Self> {
        let heads = cfg.heads()?;
        let kv = cfg.kv_index()?;
        Ok(match cfg.kind {
            Kind::Decode => Plan::Decode(BatchDecode::plan_with(backend, heads, kv, None, config)?),
            Kind::Prefill => {
                let batch = Batch::new(heads, &cfg.qo_indptr(), kv)?.with_causal(cfg.causal);
                Plan::Prefill(BatchPrefill::plan_with(backend, batch, config)?)
            }
        })
    }

    fn run<V: Variant>(&self, variant: &V, s: &mut InputSet) -> ferrinfer::Result<()> {
        match self {
            Plan::Decode(p) => p.run(variant, &s.q, &s.k, &s.v, &mut s.o, None),
            Plan::Prefill(p) => p.run(variant, &s.q, &s.k, &s.v, &mut s.o, None),
        }
    }
}

/// The configuration's input sets (enough copies that one set's reads miss L2), uploaded.
fn upload_inputs(backend: &Backend, cfg: &Config) -> BenchResult<Vec<InputSet>> {
    let heads = cfg.heads()?;
    let kv_len = cfg.kv_index()?.buffer_len(&heads);
    let sets = timing::input_sets(cfg.input_bytes()?);
    (0..sets as u64)
        .map(|s| InputSet::upload(backend, cfg, kv_len, s))
        .collect()
}

/// Plan once and time the configuration with its variant on `inputs` (their outputs poisoned
/// with NaN again first, as a fresh upload would leave them).
fn bench_config(
    backend: &Backend,
    cfg: &Config,
    key: &str,
    config: PlanConfig,
    schedule: Schedule,
    inputs: &mut [InputSet],
) -> BenchResult<Row> {
    let stream = stream_of(backend)?;
    for set in inputs.iter_mut() {
        set.poison_output(backend)?;
    }
    let plan = Plan::new(backend, cfg, config)?;
    backend.synchronize()?;
    let t = if cfg.window > 0 {
        let window = SlidingWindow { window: cfg.window };
        time_variant(stream, schedule, &plan, &window, inputs)?
    } else if cfg.soft_cap > 0.0 {
        let cap = SoftCap { cap: cfg.soft_cap };
        time_variant(stream, schedule, &plan, &cap, inputs)?
    } else if cfg.rope_theta > 0.0 {
        let rope = LlamaRope {
            theta: cfg.rope_theta,
        };
        time_variant(stream, schedule, &plan, &rope, inputs)?
    } else {
        time_variant(stream, schedule, &plan, &Standard, inputs)?
    };
    let (value, unit) = cfg.metric(t.median_ms);
    Ok(Row {
        key: key.to_string(),
        value,
        unit,
        ms: t.median_ms,
        compile_s: Some(t.compile_s()),
    })
}

fn time_variant<V: Variant>(
    stream: &Arc<CudaStream>,
    schedule: Schedule,
    plan: &Plan,
    variant: &V,
    inputs: &mut [InputSet],
) -> BenchResult<Timing> {
    let n = inputs.len();
    timing::time_on_stream(stream, schedule, |i| {
        Ok(plan.run(variant, &mut inputs[i % n])?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xs: &[&str]) -> Result<Args, String> {
        parse_args(xs.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        assert_eq!(parse(&[]).unwrap(), Args::default());
        let a = parse(&["--json", "out.json", "--filter", "decode"]).unwrap();
        assert_eq!(a.filter, "decode");
        assert!(a.selects("decode_b64") && !a.selects("prefill_single"));
        let two = parse(&["--filter", "rmsnorm,sample_"]).unwrap();
        assert!(
            two.selects("rmsnorm_t2048") && two.selects("sample_top_p") && !two.selects("decode")
        );
        assert!(parse(&[]).unwrap().selects("anything"));
        let exact = parse(&["--filter", "=prefill_a,decode"]).unwrap();
        assert!(exact.selects("prefill_a") && !exact.selects("prefill_a_softcap"));
        assert!(exact.selects("decode_b64"));
        assert_eq!(a.json, Some(PathBuf::from("out.json")));
        assert!(parse(&["--json"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--bogus"]).unwrap_err().contains("unknown"));
        assert!(parse(&["--help"]).is_err());
        assert_eq!(
            parse(&["--kv-chunks", "512, 1024"]).unwrap().kv_chunks,
            [512, 1024]
        );
        assert_eq!(
            parse(&["--kv-chunks", "512,1024,512"]).unwrap().kv_chunks,
            [512, 1024]
        );
        let only = parse(&["--impls", "ferrinfer-fa3, ferrinfer-auto"]).unwrap();
        assert!(only.times("ferrinfer-auto") && !only.times("ferrinfer-fa2"));
        assert!(a.times("ferrinfer-fa2"));
        let s = parse(&["--warm-ms", "1500", "--time-ms", "500"]).unwrap();
        assert_eq!((s.schedule.warm_ms, s.schedule.timed_ms), (1500.0, 500.0));
        assert_eq!(parse(&[]).unwrap().schedule, Schedule::default());
        assert_eq!(parse(&["--warm-ms", "0"]).unwrap().schedule.warm_ms, 0.0);
        for (opt, bad) in [
            ("--warm-ms", "-1"),
            ("--warm-ms", "NaN"),
            ("--time-ms", "0"),
            ("--time-ms", "x"),
        ] {
            let e = parse(&[opt, bad]).unwrap_err();
            assert!(
                e.contains("milliseconds") && e.contains(opt),
                "{opt} {bad}: {e}"
            );
        }
        for bad in ["x", "0", "100", "512,,1024"] {
            let e = parse(&["--kv-chunks", bad]).unwrap_err();
            assert!(e.contains("multiples of 16"), "{bad}: {e}");
        }
        assert!(
            parse(&["--kv-chunks", "100"])
                .unwrap_err()
                .contains("\"100\"")
        );
    }

    #[test]
    fn panics_become_errors() {
        let e = guarded::<()>(|| panic!("boom")).unwrap_err();
        assert_eq!(e.to_string(), "panicked: boom");
    }

    #[test]
    fn without_a_gpu_a_config_fails_cleanly() {
        let cfg = &configs::standard()[0];
        assert!(
            bench_config(
                &Backend::Cpu,
                cfg,
                "k",
                PlanConfig::default(),
                Schedule::default(),
                &mut []
            )
            .is_err()
        );
        assert!(bench_copy(&Backend::Cpu, Schedule::default()).is_err());
    }
}
