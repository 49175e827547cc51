//! Context-parallel decode benchmark: decode of a long context (default 1M tokens per request,
//! batch 1 and 8; Llama-3-8B attention: 32 query heads, 8 KV heads, head dim 128, bf16, page 16)
//! on one GPU against the context sharded over `--world` GPUs (one thread per GPU, NCCL
//! all-gather and merge included). Times are wall time over many iterations, from every rank's
//! start (a barrier after a device sync) to every rank's end (a device sync, then a barrier).
//!
//! ```text
//! ferrinfer-cp-decode [--world 2] [--tokens 1048576] [--batch 1,8] [--iters 50] [--json PATH]
//! ```
//! Build: `cargo build --release -p ferrinfer-bench --features nccl --bin ferrinfer-cp-decode`.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use ferrinfer::distributed::{Communicator, ContextParallelDecode, NcclId, shard_kv};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;

const PAGE: u32 = 16;

struct Args {
    world: usize,
    tokens: u32,
    batches: Vec<u32>,
    iters: usize,
    json: Option<std::path::PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        world: 2,
        tokens: 1 << 20,
        batches: vec![1, 8],
        iters: 50,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--world" => a.world = val().parse().expect("--world N"),
            "--tokens" => a.tokens = val().parse().expect("--tokens N"),
            "--iters" => a.iters = val().parse().expect("--iters N"),
            "--batch" => {
                a.batches = val()
                    .split(',')
                    .map(|b| b.parse().expect("--batch 1,8"))
                    .collect()
            }
            "--json" => a.json = Some(val().into()),
            other => panic!("unknown argument {other}; see the file's documentation"),
        }
    }
    a
}

fn heads() -> Heads {
    Heads::new(32, 8, 128).unwrap()
}

/// A cache of `lens` requests on pages 0.. of one GPU, K and V zero-filled on the device.
struct Cache {
    kv: KvIndex,
    k: ferrinfer::cudarc::driver::CudaSlice<bf16>,
    v: ferrinfer::cudarc::driver::CudaSlice<bf16>,
}

fn cache(gpu: &Backend, lens: &[u32]) -> Cache {
    let pages: u32 = lens.iter().map(|l| l.div_ceil(PAGE)).sum();
    let ids: Vec<i32> = (0..pages as i32).collect();
    let kv = KvIndex::paged_from_lens(PAGE, lens, &ids, pages.max(1), KvLayout::Nhd).unwrap();
    let n = kv.buffer_len(&heads());
    let stream = gpu.gpu().unwrap().stream();
    Cache {
        k: stream.alloc_zeros::<bf16>(n).unwrap(),
        v: stream.alloc_zeros::<bf16>(n).unwrap(),
        kv,
    }
}

/// A decode step's q (ones) and o of `batch` rows on `backend`.
fn q_and_o(backend: &Backend, batch: u32) -> (Buffer<bf16>, Buffer<bf16>) {
    let n = batch as usize * heads().num_qo_heads() as usize * heads().head_dim() as usize;
    (
        backend.filled(n, bf16::ONE).unwrap(),
        backend.filled(n, bf16::ZERO).unwrap(),
    )
}

/// Milliseconds per decode step of `batch` requests of `tokens` on one GPU (plain BatchDecode).
fn one_gpu(batch: u32, tokens: u32, iters: usize) -> f64 {
    let backend = Backend::cuda(0).unwrap();
    let gpu = backend.gpu().unwrap().clone();
    let c = cache(&backend, &vec![tokens; batch as usize]);
    let plan = BatchDecode::plan(&backend, heads(), c.kv.clone(), None).unwrap();
    let (q, mut o) = q_and_o(&backend, batch);
    let (k, v) = (
        View::device(&c.k, &gpu).unwrap(),
        View::device(&c.v, &gpu).unwrap(),
    );
    let mut step = || plan.run(&Standard, &q, &k, &v, &mut o, None).unwrap();
    for _ in 0..3 {
        step();
    }
    backend.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        step();
    }
    backend.synchronize().unwrap();
    t.elapsed().as_secs_f64() * 1e3 / iters as f64
}

/// Milliseconds per context-parallel decode step over `world` GPUs: each rank holds only its
/// shard's pages (its own cache, pages 0..).
fn cp(world: usize, batch: u32, tokens: u32, iters: usize) -> f64 {
    let id = NcclId::new().unwrap();
    let barrier = Barrier::new(world);
    // The shard lengths of each rank, from the sharding of the whole index.
    let whole_pages = batch * tokens.div_ceil(PAGE);
    let whole = KvIndex::paged_from_lens(
        PAGE,
        &vec![tokens; batch as usize],
        &(0..whole_pages as i32).collect::<Vec<_>>(),
        whole_pages,
        KvLayout::Nhd,
    )
    .unwrap();
    let shards = shard_kv(&whole, world).unwrap();
    let times: Vec<f64> = std::thread::scope(|s| {
        let ranks: Vec<_> = shards
            .iter()
            .map(|shard| {
                let (barrier, rank) = (&barrier, shard.rank());
                let lens: Vec<u32> = (0..batch as usize)
                    .map(|b| shard.tokens(b).len() as u32)
                    .collect();
                s.spawn(move || {
                    let backend = Backend::cuda(rank).unwrap();
                    let gpu = backend.gpu().unwrap().clone();
                    let comm = Arc::new(Communicator::new(&backend, &id, rank, world).unwrap());
                    let c = cache(&backend, &lens);
                    let plan = ContextParallelDecode::<bf16>::plan(
                        comm,
                        heads(),
                        c.kv.clone(),
                        None,
                        PlanConfig::default(),
                    )
                    .unwrap();
                    let (q, mut o) = q_and_o(&backend, batch);
                    let k = View::device(&c.k, &gpu).unwrap();
                    let v = View::device(&c.v, &gpu).unwrap();
                    let mut step = || plan.run(&Standard, &q, &k, &v, &mut o, None).unwrap();
                    for _ in 0..3 {
                        step();
                    }
                    backend.synchronize().unwrap();
                    barrier.wait();
                    let t = Instant::now();
                    for _ in 0..iters {
                        step();
                    }
                    backend.synchronize().unwrap();
                    barrier.wait();
                    t.elapsed().as_secs_f64() * 1e3 / iters as f64
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    times.into_iter().fold(0.0, f64::max)
}

fn main() {
    let a = args();
    let gpus = ferrinfer::device::Gpu::count().unwrap_or(0);
    if gpus < a.world {
        eprintln!(
            "only {gpus} GPU(s) visible; --world {} needs as many",
            a.world
        );
        std::process::exit(2);
    }
    let mut json = serde_json::Map::new();
    println!(
        "{:<34} {:>10} {:>12} {:>8}",
        "config",
        "1 GPU ms",
        format!("{} GPUs ms", a.world),
        "speedup"
    );
    for &batch in &a.batches {
        let one = one_gpu(batch, a.tokens, a.iters);
        let many = cp(a.world, batch, a.tokens, a.iters);
        let key = format!("cp_decode_b{batch}_l{}_p{PAGE}_w{}", a.tokens, a.world);
        println!("{key:<34} {one:>10.3} {many:>12.3} {:>7.2}x", one / many);
        // K and V bytes read per step, for GB/s.
        let bytes = 2.0 * f64::from(batch) * f64::from(a.tokens) * 8.0 * 128.0 * 2.0;
        json.insert(
            format!("{key}@ferrinfer"),
            serde_json::json!({
                "ms_1gpu": one, "ms_cp": many, "speedup": one / many,
                "gbps_1gpu": bytes / one / 1e6, "gbps_cp": bytes / many / 1e6,
            }),
        );
    }
    if let Some(path) = &a.json {
        let text = serde_json::Value::Object(json).to_string();
        match std::fs::write(path, text) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => {
                eprintln!("cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
}
