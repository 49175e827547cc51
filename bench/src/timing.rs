//! GPU timing with CUDA events: the first call timed on the wall clock (it includes the JIT
//! compile), a warm-up (optionally a longer one, [`Schedule::warm_ms`]), then enough iterations
//! for about [`Schedule::timed_ms`] ([`TARGET_MS`] by default), each between two events,
//! and the median of those per-iteration times. Before each timed iteration the stream zeroes a
//! [`FLUSH_BYTES`] buffer, as the anchor's `do_bench` does: it evicts L2, and it keeps the GPU
//! busy while the host enqueues the iteration, so the events time the GPU's work alone and not
//! the host's launch cost (which decides a call of a few microseconds).

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaStream;
use cudarc::driver::sys::CUevent_flags;

/// What a benchmark step returns; any error ends the configuration, not the program.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Measured time per configuration, like the anchor's `do_bench(rep=200)`.
pub const TARGET_MS: f64 = 200.0;

/// How long a configuration runs before and while it is timed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Milliseconds of untimed iterations (each after its flush, as the timed ones) right before
    /// the timed loop. An H200 at its 700 W cap boosts to 1980 MHz for about the first 100 ms of
    /// a dense kernel and then settles near 1725-1740 MHz (2026-12-02, BENCHMARKS.md), so a
    /// 200 ms loop from a cool GPU times mostly the boost and depends on what ran before; a
    /// second of this first times the steady clocks a serving GPU runs at.
    pub warm_ms: f64,
    /// Milliseconds of timed iterations.
    pub timed_ms: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            warm_ms: 0.0,
            timed_ms: TARGET_MS,
        }
    }
}
/// Iterations run untimed after the first call (clocks up, caches and TLBs warm).
const WARMUP: usize = 3;
/// Iterations of the estimate that sizes the timed loop.
const ESTIMATE: usize = 5;
const MIN_ITERS: usize = 10;
const MAX_ITERS: usize = 5000;
/// The L2 size we guard against (H100 50 MB; H200 the same): smaller inputs get several copies.
pub const L2_BYTES: u64 = 50 * 1000 * 1000;
const MAX_SETS: usize = 16;
/// Bytes zeroed before each timed iteration (`do_bench`'s cache-clearing buffer: 256 MB).
pub const FLUSH_BYTES: usize = 256 * 1024 * 1024;

/// The result of timing one closure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Wall-clock seconds of the first call, synchronised (JIT compile included).
    pub first_s: f64,
    /// Median milliseconds of one timed iteration.
    pub median_ms: f64,
    /// Timed iterations.
    pub iters: usize,
}

impl Timing {
    /// The first call's time beyond one ordinary iteration: the JIT compile and module load.
    pub fn compile_s(&self) -> f64 {
        (self.first_s - self.median_ms / 1e3).max(0.0)
    }
}

/// Median of `xs` (the mean of the middle two for an even count); NaN for an empty slice.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Timed iterations for about `target_ms`, given one iteration's estimated time.
pub fn iterations(estimate_ms: f64, target_ms: f64) -> usize {
    if estimate_ms.is_nan() || estimate_ms <= 0.0 {
        return MAX_ITERS;
    }
    ((target_ms / estimate_ms).ceil() as usize).clamp(MIN_ITERS, MAX_ITERS)
}

/// Input sets to rotate through: one when a set is larger than L2, else enough that all of them
/// together are at least twice L2 (at least 2), so no iteration reads inputs left in L2.
pub fn input_sets(set_bytes: u64) -> usize {
    if set_bytes > L2_BYTES {
        return 1;
    }
    let n = (2 * L2_BYTES).div_ceil(set_bytes.max(1)) as usize;
    n.clamp(2, MAX_SETS)
}

/// Time `f(i)` (iteration `i`, to pick an input set) on `stream`. `f` only enqueues work there.
pub fn time_on_stream(
    stream: &Arc<CudaStream>,
    schedule: Schedule,
    mut f: impl FnMut(usize) -> BenchResult<()>,
) -> BenchResult<Timing> {
    let started = Instant::now();
    f(0)?;
    stream.synchronize()?;
    let first_s = started.elapsed().as_secs_f64();

    for i in 0..WARMUP {
        f(i + 1)?;
    }
    let ctx = stream.context();
    let timed_event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    let (start, end) = (timed_event()?, timed_event()?);
    start.record(stream)?;
    for i in 0..ESTIMATE {
        f(i)?;
    }
    end.record(stream)?;
    let estimate_ms = f64::from(start.elapsed_ms(&end)?) / ESTIMATE as f64;

    let iters = iterations(estimate_ms, schedule.timed_ms);
    let mut flush = stream.alloc_zeros::<u8>(FLUSH_BYTES)?;
    if schedule.warm_ms > 0.0 {
        for i in 0..iterations(estimate_ms, schedule.warm_ms) {
            stream.memset_zeros(&mut flush)?;
            f(i)?;
        }
    }
    let events = (0..2 * iters)
        .map(|_| timed_event())
        .collect::<Result<Vec<_>, _>>()?;
    for (i, pair) in events.chunks_exact(2).enumerate() {
        stream.memset_zeros(&mut flush)?;
        pair[0].record(stream)?;
        f(i)?;
        pair[1].record(stream)?;
    }
    stream.synchronize()?;
    let times = events
        .chunks_exact(2)
        .map(|pair| pair[0].elapsed_ms(&pair[1]).map(f64::from))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Timing {
        first_s,
        median_ms: median(&times),
        iters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn iterations_fill_the_target() {
        assert_eq!(iterations(1.0, 200.0), 200);
        assert_eq!(iterations(0.3, 200.0), 667);
        assert_eq!(iterations(50.0, 200.0), MIN_ITERS);
        assert_eq!(iterations(1e-6, 200.0), MAX_ITERS);
        assert_eq!(iterations(0.0, 200.0), MAX_ITERS);
        assert_eq!(iterations(f64::NAN, 200.0), MAX_ITERS);
    }

    #[test]
    fn small_inputs_rotate() {
        assert_eq!(input_sets(1 << 30), 1);
        assert_eq!(input_sets(L2_BYTES + 1), 1);
        assert_eq!(input_sets(L2_BYTES), 2);
        assert_eq!(input_sets(30_000_000), 4);
        assert_eq!(input_sets(1000), MAX_SETS);
        assert_eq!(input_sets(0), MAX_SETS);
    }

    #[test]
    fn compile_time_excludes_one_iteration() {
        let t = Timing {
            first_s: 2.5,
            median_ms: 500.0,
            iters: 10,
        };
        assert_eq!(t.compile_s(), 2.0);
        let fast = Timing {
            first_s: 0.001,
            median_ms: 5.0,
            ..t
        };
        assert_eq!(fast.compile_s(), 0.0);
    }
}
