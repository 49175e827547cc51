//! The serving-ops rows of DESIGN.md ("Serving ops"): one file per op group, each listing its
//! cases. A case says its key, the bytes one call reads and writes (as the anchor counts them), and
//! how to set up one input set; the driver here rotates input sets past L2 and times the calls.

mod activation;
mod kv_append;
mod norm;
mod rope;
mod sampling;

use ferrinfer::prelude::*;

use crate::report::Row;
use crate::timing::{self, BenchResult};

/// The implementation name of serving-op rows (`<key>@ferrinfer`).
pub const IMPL: &str = "ferrinfer";

/// One call of an op on one input set, enqueued on the GPU's stream.
pub type Call = Box<dyn FnMut() -> ferrinfer::Result<()>>;

/// One configuration of an op.
pub struct OpCase {
    /// The anchor's key, without `@impl`.
    pub key: &'static str,
    /// Bytes one call moves, exactly as `flashinfer_anchor.py` counts them for this key.
    pub bytes: u64,
    /// Device bytes of one input set (to decide how many sets keep L2 cold).
    pub set_bytes: u64,
    /// Upload one input set (from `seed`); the returned closure enqueues one call and no more.
    pub setup: fn(&Backend, u64) -> BenchResult<Call>,
}

/// Every op group's cases, one row per file.
const GROUPS: &[fn() -> Vec<OpCase>] = &[
    norm::cases,
    activation::cases,
    sampling::cases,
    rope::cases,
    kv_append::cases,
];

/// All cases, in table order.
pub fn cases() -> Vec<OpCase> {
    GROUPS.iter().flat_map(|g| g()).collect()
}

/// Time `case` on `backend` (a GPU): the median call over rotating input sets, as GB/s.
pub fn bench(backend: &Backend, case: &OpCase, schedule: timing::Schedule) -> BenchResult<Row> {
    let gpu = backend.gpu().ok_or("not a CUDA backend")?;
    let sets = timing::input_sets(case.set_bytes);
    let mut calls = (0..sets as u64)
        .map(|s| (case.setup)(backend, s))
        .collect::<BenchResult<Vec<_>>>()?;
    backend.synchronize()?;
    let n = calls.len();
    let t = timing::time_on_stream(gpu.stream(), schedule, |i| Ok((calls[i % n])()?))?;
    Ok(Row {
        key: format!("{}@{IMPL}", case.key),
        value: case.bytes as f64 / t.median_ms / 1e6,
        unit: "GB/s",
        ms: t.median_ms,
        compile_s: Some(t.compile_s()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_named_as_the_anchor() {
        let mut keys = std::collections::BTreeSet::new();
        for c in cases() {
            assert!(keys.insert(c.key), "{} twice", c.key);
            assert!(c.bytes > 0 && c.set_bytes > 0, "{}", c.key);
            assert!(
                bench(&Backend::Cpu, &c, timing::Schedule::default()).is_err(),
                "{} ran without a GPU",
                c.key
            );
        }
    }
}
