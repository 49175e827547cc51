//! The results: a table on stdout, and the JSON object of `flashinfer_anchor.py`
//! (`{"<config>@<impl>": {"value": v, "unit": u, "ms": ms}}`, keys sorted) for `compare.py`.

use std::fmt::Write as _;

/// The implementation name of ferrinfer's kernels in result keys (`<config>@ferrinfer-fa2`).
pub const IMPL: &str = "ferrinfer-fa2";
/// Decode on the CUDA-core template, which the default no longer picks at GQA 4
/// (`<config>@ferrinfer-cuda-cores`).
pub const IMPL_CUDA_CORES: &str = "ferrinfer-cuda-cores";
/// The implementation name of decode rows forced onto the tensor-core (prefill template) kernel.
pub const IMPL_TENSOR_CORES: &str = "ferrinfer-tensor-cores";
/// Decode rows on the tensor-core kernel with one warp along the keys of its 16-row tile forced.
pub const IMPL_KV_WARPS_1: &str = "ferrinfer-kv-warps-1";
/// Decode rows on the tensor-core kernel with two warps along the keys forced.
pub const IMPL_KV_WARPS_2: &str = "ferrinfer-kv-warps-2";
/// Decode rows on the tensor-core kernel with each K/V tile of the one-warp 16-row tile forced
/// (the default one, and the narrow one; where the plan runs that tile).
pub const IMPL_KV_TILE_DEFAULT: &str = "ferrinfer-kv-tile-default";
pub const IMPL_KV_TILE_NARROW: &str = "ferrinfer-kv-tile-narrow";
/// The implementation name of a decode row with its KV split forced to `chunk` keys.
pub fn chunk_impl(chunk: u32) -> String {
    format!("ferrinfer-chunk-{chunk}")
}

/// Prefill rows on the sm_90a (FA3) template, beside the FA2 rows of [`IMPL`] (Hopper only).
pub const IMPL_FA3: &str = "ferrinfer-fa3";
/// Prefill rows on FA3 with each of its K/V tiles at head dim 128 forced (`KvTile::Default`, 128
/// keys; `KvTile::Long`, 176), over contiguous and ragged caches (Hopper only): Auto's choice
/// between them ([`IMPL_AUTO`]) can be checked against both.
pub const IMPL_FA3_K128: &str = "ferrinfer-fa3-k128";
pub const IMPL_FA3_K176: &str = "ferrinfer-fa3-k176";
/// Prefill rows with the template `PrefillKernel::Auto` picks (Hopper only, where it has a choice).
pub const IMPL_AUTO: &str = "ferrinfer-auto";

/// One measured row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The full key, `<config>@<impl>`.
    pub key: String,
    pub value: f64,
    /// `GB/s` or `TFLOP/s`.
    pub unit: &'static str,
    /// Median milliseconds per iteration.
    pub ms: f64,
    /// Seconds the first call took beyond an iteration (JIT compile); `None` where nothing compiles.
    pub compile_s: Option<f64>,
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:60} {:>9} {:8} {:>9} {:>9}",
        "key", "value", "unit", "ms", "compile s"
    )
}

/// One table line, as the anchor prints it, plus the compile time.
pub fn line(r: &Row) -> String {
    let compile = r.compile_s.map_or("-".to_string(), |s| format!("{s:.2}"));
    format!(
        "{:60} {:9.1} {:8} {:9.3} {:>9}",
        r.key, r.value, r.unit, r.ms, compile
    )
}

/// The JSON object of all rows with finite numbers, keys sorted, one key per line.
pub fn json(rows: &[Row]) -> String {
    let mut rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.value.is_finite() && r.ms.is_finite())
        .collect();
    rows.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out = String::from("{");
    for (i, r) in rows.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        // `{:?}` of a finite f64 is always a valid JSON number ("1.0", "1e-7", "3.25").
        let _ = write!(
            out,
            "{sep}\n {}: {{\"value\": {:?}, \"unit\": {}, \"ms\": {:?}}}",
            string(&r.key),
            r.value,
            string(r.unit),
            r.ms
        );
    }
    out.push_str(if rows.is_empty() { "}\n" } else { "\n}\n" });
    out
}

/// A JSON string literal.
fn string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, value: f64, unit: &'static str, ms: f64) -> Row {
        Row {
            key: key.to_string(),
            value,
            unit,
            ms,
            compile_s: None,
        }
    }

    #[test]
    fn json_is_sorted_and_in_the_anchor_format() {
        let rows = [
            row("prefill_x@ferrinfer-fa2", 350.25, "TFLOP/s", 3.5),
            row("decode_y@ferrinfer-fa2", 2000.0, "GB/s", 0.5),
        ];
        assert_eq!(
            json(&rows),
            "{\n \"decode_y@ferrinfer-fa2\": {\"value\": 2000.0, \"unit\": \"GB/s\", \"ms\": 0.5},\
             \n \"prefill_x@ferrinfer-fa2\": {\"value\": 350.25, \"unit\": \"TFLOP/s\", \"ms\": 3.5}\n}\n"
        );
    }

    #[test]
    fn json_skips_non_finite_rows_and_handles_none() {
        let rows = [
            row("a@b", f64::NAN, "GB/s", 1.0),
            row("c@d", 1.0, "GB/s", f64::INFINITY),
        ];
        assert_eq!(json(&rows), "{}\n");
        assert_eq!(json(&[]), "{}\n");
    }

    #[test]
    fn tiny_and_huge_numbers_stay_json() {
        let out = json(&[row("k", 1e-9, "GB/s", 1e21)]);
        assert!(out.contains("\"value\": 1e-9"), "{out}");
        assert!(out.contains("\"ms\": 1e21"), "{out}");
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn table_lines() {
        let mut r = row("decode_b64_l4096_p16@ferrinfer-fa2", 2500.04, "GB/s", 0.43);
        assert!(line(&r).ends_with("   2500.0 GB/s         0.430         -"));
        r.compile_s = Some(0.1234);
        assert!(line(&r).ends_with("0.430      0.12"), "{}", line(&r));
        assert!(header().starts_with("key "));
    }
}
