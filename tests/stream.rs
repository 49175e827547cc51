//! A backend on the caller's cudarc stream (`Backend::on_stream`): every launch, copy, allocation
//! and plan upload of ours goes on that stream, so it is ordered with the caller's own work there,
//! and a CUDA graph the caller captures on it contains our work. The caller's context is made as
//! cudarc makes it, event tracking on, and stays so.
//!
//! GPU tests are `gpu_*`; run them on the GPU machine with `cargo test --test stream -- --ignored`.

use std::sync::{Arc, Mutex, MutexGuard};

use ferrinfer::attention::reference::{self, rel_l2, worst_rel_l2};
use ferrinfer::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use ferrinfer::cudarc::driver::{CudaContext, CudaStream};
use ferrinfer::indptr;
use ferrinfer::ops::norm::{self, NormShape};
use ferrinfer::ops::sampling::{self, Filter, SampleShape, SamplerState};
use ferrinfer::prelude::*;
use ferrinfer::variants::{SoftCap, Standard};
use ferrinfer::{Input, RunBuffers};
use ferrinfer_testkit::Rng;

/// The GPU tests share one device and count its module loads: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A caller's context as cudarc makes it (event tracking on) and a stream of its own.
fn caller() -> (Arc<CudaContext>, Arc<CudaStream>) {
    let ctx = CudaContext::new(0).expect("this test needs a CUDA GPU");
    assert!(ctx.is_event_tracking(), "cudarc's default");
    let stream = ctx.new_stream().unwrap();
    (ctx, stream)
}

fn bf(xs: Vec<f32>) -> Vec<bf16> {
    xs.into_iter().map(bf16::from_f32).collect()
}

fn f32s(xs: &[bf16]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

fn f64s(xs: &[bf16]) -> Vec<f64> {
    xs.iter().map(|x| f64::from(x.to_f32())).collect()
}

const EPS: f32 = 1e-6;
const PAGE: u32 = 16;
/// Requests of the decode batches: short, one-page and long (a split KV).
const DECODE_LENS: [u32; 3] = [300, 17, 1000];

fn heads() -> Heads {
    Heads::new(8, 2, 128).unwrap()
}

/// A paged cache of `lens` on shuffled pages, with 3 spare pages; returns it and its elements.
fn paged(lens: &[u32], rng: &mut Rng) -> (KvIndex, usize) {
    let total: u32 = lens.iter().map(|&l| l.div_ceil(PAGE)).sum();
    let num_pages = total + 3;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let kv = KvIndex::paged_from_lens(PAGE, lens, &ids[..total as usize], num_pages, KvLayout::Nhd)
        .unwrap();
    (kv, (num_pages * PAGE * 2 * 128) as usize)
}

/// A decode batch of [`DECODE_LENS`] over a paged cache (and that cache), random K and V.
fn decode_case(rng: &mut Rng) -> (KvIndex, Batch, Vec<bf16>, Vec<bf16>) {
    let (kv, cache) = paged(&DECODE_LENS, rng);
    let batch = Batch::decode(heads(), kv.clone()).unwrap();
    (
        kv,
        batch,
        bf(rng.normal_vec(cache)),
        bf(rng.normal_vec(cache)),
    )
}

/// Our buffer of `n` NaN, then the caller's own copy of `data` into it on its stream.
fn caller_writes(backend: &Backend, stream: &Arc<CudaStream>, data: &[bf16]) -> Buffer<bf16> {
    let mut b = backend.filled(data.len(), bf16::NAN).unwrap();
    stream
        .memcpy_htod(data, &mut b.cuda_view_mut().unwrap())
        .unwrap();
    b
}

/// The caller's read of our buffer on its stream: no synchronisation of ours in between.
fn caller_reads(stream: &Arc<CudaStream>, b: &Buffer<bf16>) -> Vec<f32> {
    f32s(&stream.clone_dtoh(&b.cuda_view().unwrap()).unwrap())
}

/// Our q, K and V written by the caller on `stream`, and an o of NaN.
fn caller_inputs(
    backend: &Backend,
    stream: &Arc<CudaStream>,
    [q, k, v]: [&[bf16]; 3],
) -> [Buffer<bf16>; 4] {
    [
        caller_writes(backend, stream, q),
        caller_writes(backend, stream, k),
        caller_writes(backend, stream, v),
        backend.filled(q.len(), bf16::NAN).unwrap(),
    ]
}

/// o as the caller reads it on `stream`, checked against the reference attention of `batch`.
fn check_o(
    stream: &Arc<CudaStream>,
    o: &Buffer<bf16>,
    batch: &Batch,
    [q, k, v]: [&[bf16]; 3],
    what: &str,
) -> Vec<f32> {
    let got = caller_reads(stream, o);
    let want = reference::attention_typed(&Standard, batch, q, k, v).unwrap();
    let (err, b, h) = worst_rel_l2(batch, &got, &want.o);
    assert!(
        err <= 1e-2,
        "{what}: request {b} head {h} relative L2 error {err:.2e}"
    );
    got
}

/// A decode on `backend`: the caller writes q, K and V on `stream` and calls us at once, then reads
/// o on `stream`.
fn check_decode(backend: &Backend, stream: &Arc<CudaStream>, rng: &mut Rng, what: &str) {
    let (kv, batch, k, v) = decode_case(rng);
    let q = bf(rng.normal_vec(batch.q_len()));
    let [qd, kd, vd, mut od] = caller_inputs(backend, stream, [&q, &k, &v]);
    let plan = BatchDecode::plan(backend, heads(), kv, None).unwrap();
    plan.run(&Standard, &qd, &kd, &vd, &mut od, None).unwrap();
    let what = format!("decode {what}");
    check_o(stream, &od, &batch, [&q, &k, &v], &what);
}

/// A causal prefill over a ragged cache, written and read as in [`check_decode`].
fn check_prefill(backend: &Backend, stream: &Arc<CudaStream>, rng: &mut Rng, what: &str) {
    let (qo_lens, kv_lens) = ([37u32, 5, 128], [100u32, 5, 300]);
    let kv = KvIndex::ragged(&indptr(&kv_lens), KvLayout::Nhd).unwrap();
    let batch = Batch::new(heads(), &indptr(&qo_lens), kv)
        .unwrap()
        .with_causal(true);
    let kv_elems = kv_lens.iter().sum::<u32>() as usize * 2 * 128;
    let (k, v) = (bf(rng.normal_vec(kv_elems)), bf(rng.normal_vec(kv_elems)));
    let q = bf(rng.normal_vec(batch.q_len()));
    let [qd, kd, vd, mut od] = caller_inputs(backend, stream, [&q, &k, &v]);
    let plan = BatchPrefill::plan(backend, batch.clone()).unwrap();
    plan.run(&Standard, &qd, &kd, &vd, &mut od, None).unwrap();
    let what = format!("prefill {what}");
    check_o(stream, &od, &batch, [&q, &k, &v], &what);
}

/// Every row of `got` against the f64 RMSNorm of `x` by `w`.
fn assert_rmsnorm(shape: NormShape, x: &[bf16], w: &[bf16], got: &[f32], what: &str) {
    let want = norm::rmsnorm_f64(shape, &f64s(x), &f64s(w), 0.0, f64::from(EPS)).unwrap();
    let h = shape.hidden() as usize;
    for (r, (g, w)) in got.chunks(h).zip(want.chunks(h)).enumerate() {
        let err = rel_l2(g, w);
        assert!(
            err <= 1e-2,
            "rmsnorm {what}: row {r} relative L2 error {err:.2e}"
        );
    }
}

/// RMSNorm, x written and the output read by the caller on `stream`.
fn check_rmsnorm(backend: &Backend, stream: &Arc<CudaStream>, rng: &mut Rng, what: &str) {
    let shape = NormShape::new(33, 4096).unwrap();
    let x = bf(rng.normal_vec(shape.elements()));
    let w = bf(rng.normal_vec(4096));
    let xd = caller_writes(backend, stream, &x);
    let wd = backend.upload(&w).unwrap();
    let mut od = backend.filled(shape.elements(), bf16::NAN).unwrap();
    norm::rmsnorm(backend, shape, &xd, &wd, EPS, &mut od).unwrap();
    assert_rmsnorm(shape, &x, &w, &caller_reads(stream, &od), what);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_runs_on_the_callers_stream_in_its_order() {
    let _one = serial();
    let (ctx, stream) = caller();
    let backend = Backend::on_stream(stream.clone()).unwrap();
    let gpu = backend.gpu().unwrap();
    assert!(Arc::ptr_eq(gpu.stream(), &stream));
    assert!(gpu.on_caller_stream());
    assert!(backend.describe().contains("caller stream"));
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    // A long transfer of the caller's is queued first: our work waits behind it on the stream.
    let big = stream.clone_htod(&vec![1u8; 512 << 20]).unwrap();
    for round in 0..2 {
        // Round 0 compiles and loads; round 1 runs warm, when a launch on the wrong stream would
        // overtake the caller's copies.
        let what = format!("round {round} (seed {seed})");
        check_decode(&backend, &stream, &mut rng, &what);
        check_prefill(&backend, &stream, &mut rng, &what);
        check_rmsnorm(&backend, &stream, &mut rng, &what);
    }
    // Backend::synchronize is the caller's stream's.
    backend.synchronize().unwrap();
    drop(big);
    assert!(
        ctx.is_event_tracking(),
        "ferrinfer changed the caller's event tracking"
    );
    ctx.check_err().unwrap();
}

/// What one step of the caller's graph queues: the caller's copy of the next q into ours, our
/// decode, an RMSNorm of its output, and a draw from fixed probabilities (which advances the
/// sampler's offset on the device).
struct Step {
    staging: Buffer<bf16>,
    q: Buffer<bf16>,
    k: Buffer<bf16>,
    v: Buffer<bf16>,
    o: Buffer<bf16>,
    w: Buffer<bf16>,
    normed: Buffer<bf16>,
    probs: Buffer<f32>,
    state: SamplerState,
    tokens: Buffer<i32>,
}

/// Rows of the decode output, as RMSNorm sees them: one per (request, head).
fn norm_shape() -> NormShape {
    NormShape::new(DECODE_LENS.len() as u32 * 8, 128).unwrap()
}

/// One-hot rows: row `r` can only draw token `hot(r)`.
const VOCAB: u32 = 1000;
fn hot(r: usize) -> i32 {
    (r * 337 % VOCAB as usize) as i32
}

impl Step {
    fn queue(&mut self, backend: &Backend, stream: &Arc<CudaStream>, plan: &BatchDecode) {
        stream
            .memcpy_dtod(
                &self.staging.cuda_view().unwrap(),
                &mut self.q.cuda_view_mut().unwrap(),
            )
            .unwrap();
        plan.run(&Standard, &self.q, &self.k, &self.v, &mut self.o, None)
            .unwrap();
        norm::rmsnorm(
            backend,
            norm_shape(),
            &self.o,
            &self.w,
            EPS,
            &mut self.normed,
        )
        .unwrap();
        let shape = SampleShape::new(DECODE_LENS.len() as u32, VOCAB).unwrap();
        sampling::sample_from_probs(
            backend,
            &mut self.state,
            shape,
            &self.probs,
            &Filter::none(),
            &mut self.tokens,
        )
        .unwrap();
    }
    /// Check o, the normed rows and the tokens, all read on the caller's stream.
    fn check(&self, stream: &Arc<CudaStream>, batch: &Batch, q: &[bf16], k: &[bf16], v: &[bf16]) {
        let got = check_o(stream, &self.o, batch, [q, k, v], "captured decode");
        // The norm read the o this replay wrote (as bf16), through the graph's order.
        let o = bf(got);
        let w = stream.clone_dtoh(&self.w.cuda_view().unwrap()).unwrap();
        assert_rmsnorm(
            norm_shape(),
            &o,
            &w,
            &caller_reads(stream, &self.normed),
            "captured",
        );
        let tokens = stream
            .clone_dtoh(&self.tokens.cuda_view().unwrap())
            .unwrap();
        let want: Vec<i32> = (0..DECODE_LENS.len()).map(hot).collect();
        assert_eq!(tokens, want, "captured sampling");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_callers_capture_contains_our_work() {
    let _one = serial();
    let (ctx, stream) = caller();
    let backend = Backend::on_stream(stream.clone()).unwrap();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let (kv, batch, k, v) = decode_case(&mut rng);
    let n = batch.q_len();
    let rows = DECODE_LENS.len();
    let mut probs = vec![0.0f32; rows * VOCAB as usize];
    for r in 0..rows {
        probs[r * VOCAB as usize + hot(r) as usize] = 1.0;
    }
    let mut q = bf(rng.normal_vec(n));
    let mut step = Step {
        staging: backend.upload(&q).unwrap(),
        q: backend.filled(n, bf16::NAN).unwrap(),
        k: backend.upload(&k).unwrap(),
        v: backend.upload(&v).unwrap(),
        o: backend.filled(n, bf16::NAN).unwrap(),
        w: backend.upload(&bf(rng.normal_vec(128))).unwrap(),
        normed: backend.filled(n, bf16::NAN).unwrap(),
        probs: backend.upload(&probs).unwrap(),
        state: SamplerState::new(&backend, seed).unwrap(),
        tokens: backend.filled(rows, -1).unwrap(),
    };
    let plan = BatchDecode::plan(&backend, heads(), kv, None).unwrap();
    // The first, eager step compiles and loads every kernel: after it, a step is capturable.
    step.queue(&backend, &stream, &plan);
    step.check(&stream, &batch, &q, &k, &v);

    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    // What a graph cannot hold is refused with an error that leaves the capture intact.
    let refused = |e: ferrinfer::Error, what: &str| {
        let e = e.to_string();
        assert!(e.contains("captured into a CUDA graph"), "{what}: {e}");
    };
    refused(backend.upload(&[1.0f32]).unwrap_err(), "upload");
    refused(backend.synchronize().unwrap_err(), "synchronize");
    refused(step.o.copy_from(&q).unwrap_err(), "copy_from");
    refused(step.o.to_vec().unwrap_err(), "to_vec");
    let unloaded = plan.run(
        &SoftCap { cap: 30.0 },
        &step.q,
        &step.k,
        &step.v,
        &mut step.o,
        None,
    );
    let e = unloaded.unwrap_err().to_string();
    assert!(
        e.contains("loading kernel"),
        "a first run inside a capture: {e}"
    );
    step.queue(&backend, &stream, &plan);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded our work");

    let replays = 4;
    for replay in 0..replays {
        // New inputs between replays, written by the caller on its stream; outputs poisoned.
        q = bf(rng.normal_vec(n));
        stream
            .memcpy_htod(&q, &mut step.staging.cuda_view_mut().unwrap())
            .unwrap();
        step.o.copy_from(&vec![bf16::NAN; n]).unwrap();
        step.normed.copy_from(&vec![bf16::NAN; n]).unwrap();
        step.tokens.copy_from(&vec![-1; rows]).unwrap();
        graph.launch().unwrap();
        // No synchronisation: the caller's reads are ordered after the replay on its stream.
        step.check(&stream, &batch, &q, &k, &v);
        eprintln!("replay {replay} correct (seed {seed})");
    }
    // Each replay advanced the sampler on the device: the advance kernel is in the graph.
    assert_eq!(step.state.read().unwrap(), (seed, 1 + replays));
    assert!(ctx.is_event_tracking());
    ctx.check_err().unwrap();
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_graph_run_on_a_callers_stream() {
    let _one = serial();
    let (_ctx, stream) = caller();
    let backend = Backend::on_stream(stream.clone()).unwrap();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let (kv, batch, k, v) = decode_case(&mut rng);
    let n = batch.q_len();
    let rows = DECODE_LENS.len() as u32;
    let pages = kv.indices().len() as u32;
    let config = PlanConfig {
        graph: Some(GraphCapacity {
            work_items: 1024,
            batch: rows,
            qo_rows: rows,
            kv_blocks: pages,
        }),
        ..PlanConfig::default()
    };
    let plan = BatchDecode::plan_with(&backend, heads(), kv, None, config).unwrap();
    let buffers = RunBuffers {
        q: backend.filled(n, bf16::NAN).unwrap(),
        k: backend.upload(&k).unwrap(),
        v: backend.upload(&v).unwrap(),
        o: backend.filled(n, bf16::NAN).unwrap(),
        lse: None,
    };
    let mut graph = plan.capture(Standard, buffers).unwrap();
    for replay in 0..3 {
        let q = bf(rng.normal_vec(n));
        graph.write(Input::Q, &q).unwrap();
        graph.launch().unwrap();
        // Read on the caller's stream right after the replay: ordered after it.
        let what = format!("GraphRun replay {replay} (seed {seed})");
        check_o(&stream, graph.o(), &batch, [&q, &k, &v], &what);
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_streams_of_one_device_share_loaded_modules() {
    let _one = serial();
    let (ctx, first) = caller();
    let second = ctx.new_stream().unwrap();
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    let what = |name: &str| format!("{name} (seed {seed})");
    let a = Backend::on_stream(first.clone()).unwrap();
    check_decode(&a, &first, &mut rng, &what("first stream"));
    check_rmsnorm(&a, &first, &mut rng, &what("first stream"));
    let loaded = a.gpu().unwrap().modules_loaded();
    assert!(loaded >= 2, "{loaded} modules after a decode and a norm");

    let b = Backend::on_stream(second.clone()).unwrap();
    check_decode(&b, &second, &mut rng, &what("second stream"));
    check_rmsnorm(&b, &second, &mut rng, &what("second stream"));
    assert_eq!(
        b.gpu().unwrap().modules_loaded(),
        loaded,
        "a second stream loaded its kernels again"
    );
    // The private stream of Backend::cuda shares them too.
    let own = Backend::cuda(0).unwrap();
    let own_stream = own.gpu().unwrap().stream().clone();
    check_rmsnorm(&own, &own_stream, &mut rng, &what("Backend::cuda"));
    assert_eq!(own.gpu().unwrap().modules_loaded(), loaded);

    // Nothing orders two streams: a buffer of one is refused by a backend on the other.
    let shape = NormShape::new(1, 128).unwrap();
    let x = a.upload(&[bf16::ONE; 128]).unwrap();
    let w = b.upload(&[bf16::ONE; 128]).unwrap();
    let mut out = b.filled(128, bf16::NAN).unwrap();
    let e = norm::rmsnorm(&b, shape, &x, &w, EPS, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another stream"), "{e}");
    // The same stream twice is one stream: its buffers go together.
    let a2 = Backend::on_stream(first.clone()).unwrap();
    let mut out = a2.filled(128, bf16::NAN).unwrap();
    let w = a.upload(&[bf16::ONE; 128]).unwrap();
    norm::rmsnorm(&a2, shape, &x, &w, EPS, &mut out).unwrap();
    assert!(out.to_vec().unwrap().iter().all(|v| v.to_f32() == 1.0));
}

#[test]
fn host_buffers_have_no_cuda_view() {
    let mut b = Backend::Cpu.upload(&[1.0f32, 2.0]).unwrap();
    assert!(b.cuda_view().is_none());
    assert!(b.cuda_view_mut().is_none());
}
