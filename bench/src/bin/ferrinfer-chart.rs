//! `ferrinfer-chart`: an SVG bar chart of ferrinfer against the best other implementation, per
//! configuration, from the JSON files of one GPU call (ours and the FlashInfer anchor's).
//!
//!     ferrinfer-chart ours.json anchor.json [-o chart.svg] [--title TEXT]
//!
//! Each bar is ferrinfer's value over the best other implementation's for one configuration (the
//! same ratio as `bench/anchor/compare.py`); its label gives both values. The 1.0 line is parity.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

const USAGE: &str = "usage: ferrinfer-chart OURS.json OTHER.json... [-o OUT.svg] [--title TEXT]";
/// The implementations that are ours: keys `<config>@ferrinfer...`.
const OURS: &str = "ferrinfer";
/// Ratios are drawn up to this; a longer bar is cut and marked.
const MAX_RATIO: f64 = 2.5;

/// One configuration: our best implementation and value, and the best other one.
#[derive(Debug, PartialEq)]
struct Bar {
    config: String,
    unit: String,
    ours: (String, f64),
    other: (String, f64),
}

impl Bar {
    fn ratio(&self) -> f64 {
        self.ours.1 / self.other.1
    }
}

/// Bars of every configuration that has both an implementation of ours and another, in key order.
fn bars(files: &[serde_json::Value]) -> Result<Vec<Bar>, String> {
    let mut by_config: BTreeMap<String, (String, Vec<(String, f64)>)> = BTreeMap::new();
    for file in files {
        let obj = file
            .as_object()
            .ok_or("a results file is not a JSON object")?;
        for (key, rec) in obj {
            let (config, implementation) = key
                .split_once('@')
                .ok_or_else(|| format!("key {key:?} is not <config>@<implementation>"))?;
            let value = rec["value"]
                .as_f64()
                .ok_or_else(|| format!("{key}: no numeric \"value\""))?;
            let unit = rec["unit"].as_str().unwrap_or("").to_string();
            let entry = by_config
                .entry(config.to_string())
                .or_insert((unit, Vec::new()));
            entry.1.push((implementation.to_string(), value));
        }
    }
    let best = |it: &mut dyn Iterator<Item = &(String, f64)>| {
        it.filter(|(_, v)| v.is_finite() && *v > 0.0)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .cloned()
    };
    Ok(by_config
        .into_iter()
        .filter_map(|(config, (unit, impls))| {
            let ours = best(&mut impls.iter().filter(|(i, _)| i.starts_with(OURS)))?;
            let other = best(&mut impls.iter().filter(|(i, _)| !i.starts_with(OURS)))?;
            Some(Bar {
                config,
                unit,
                ours,
                other,
            })
        })
        .collect())
}

/// XML text escaping for labels.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart: one row per bar, the configuration on the left, the ratio bar in the middle, the two
/// values on the right.
fn svg(bars: &[Bar], title: &str) -> String {
    let (label_w, bar_w, value_w, row_h, top) = (330.0, 420.0, 330.0, 22.0, 56.0);
    let width = label_w + bar_w + value_w;
    let height = top + row_h * bars.len() as f64 + 30.0;
    let x_of = |r: f64| label_w + bar_w * (r.min(MAX_RATIO) / MAX_RATIO);
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n\
         <text x=\"10\" y=\"42\" fill=\"#555\">bar: ferrinfer / best other implementation \
         (higher is better; the line is parity, grey within 1%)</text>\n",
        esc(title)
    );
    for tick in [0.5, 1.0, 1.5, 2.0, 2.5] {
        let x = x_of(tick);
        let (stroke, dash) = if tick == 1.0 {
            ("#333", "")
        } else {
            ("#ccc", " stroke-dasharray=\"3,3\"")
        };
        let _ = writeln!(
            out,
            "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"{stroke}\"{dash}/>\n\
             <text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{tick:.1}x</text>",
            top - 4.0,
            top + row_h * bars.len() as f64,
            top + row_h * bars.len() as f64 + 16.0
        );
    }
    for (i, b) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let r = b.ratio();
        // Within 1% is parity: neither ahead nor behind.
        let color = match r {
            r if (r - 1.0).abs() < 0.01 => "#999999",
            r if r > 1.0 => "#2e8b57",
            _ => "#e07b39",
        };
        let cut = if r > MAX_RATIO { " (cut)" } else { "" };
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{label_w}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{color}\"/>\n\
             <text x=\"{}\" y=\"{}\">{r:.2}x{cut}  {} {:.0} vs {} {:.0} {}</text>",
            label_w - 8.0,
            y + 15.0,
            esc(&b.config),
            y + 3.0,
            x_of(r) - label_w,
            row_h - 6.0,
            x_of(r.min(MAX_RATIO)) + 6.0,
            y + 15.0,
            esc(&b.ours.0),
            b.ours.1,
            esc(&b.other.0),
            b.other.1,
            esc(&b.unit),
        );
    }
    out.push_str("</svg>\n");
    out
}

fn main() -> ExitCode {
    let mut inputs = Vec::new();
    let (mut out, mut title) = (None, "ferrinfer vs FlashInfer, one GPU call".to_string());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-o" => out = args.next(),
            "--title" => title = args.next().unwrap_or_default(),
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => inputs.push(a),
        }
    }
    if inputs.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let files: Result<Vec<serde_json::Value>, String> = inputs
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("{p}: {e}"))
        })
        .collect();
    let bars = match files.and_then(|f| bars(&f)) {
        Ok(b) if !b.is_empty() => b,
        Ok(_) => {
            eprintln!("no configuration has both a ferrinfer and another implementation");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let svg = svg(&bars, &title);
    match out {
        Some(path) => {
            if let Err(e) = std::fs::write(&path, svg) {
                eprintln!("cannot write {path}: {e}");
                return ExitCode::FAILURE;
            }
        }
        None => print!("{svg}"),
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<serde_json::Value> {
        let ours = r#"{"rmsnorm_t2048@ferrinfer": {"value": 2400.0, "unit": "GB/s", "ms": 0.03},
                       "decode_b64@ferrinfer-fa2": {"value": 4000.0, "unit": "GB/s", "ms": 1.0},
                       "decode_b64@ferrinfer-cuda-cores": {"value": 3000.0, "unit": "GB/s", "ms": 1.2},
                       "copy@ferrinfer": {"value": 4270.0, "unit": "GB/s", "ms": 1.0}}"#;
        let other = r#"{"rmsnorm_t2048@fi": {"value": 2000.0, "unit": "GB/s", "ms": 0.04},
                        "decode_b64@fi": {"value": 3500.0, "unit": "GB/s", "ms": 1.1},
                        "decode_b64@fi-tc": {"value": 5000.0, "unit": "GB/s", "ms": 0.9},
                        "gemm@torch": {"value": 690.0, "unit": "TFLOP/s", "ms": 1.5}}"#;
        vec![
            serde_json::from_str(ours).unwrap(),
            serde_json::from_str(other).unwrap(),
        ]
    }

    #[test]
    fn each_bar_is_our_best_over_the_best_other() {
        let b = bars(&files()).unwrap();
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b[0].config, "decode_b64");
        assert_eq!(b[0].ours, ("ferrinfer-fa2".to_string(), 4000.0));
        assert_eq!(b[0].other, ("fi-tc".to_string(), 5000.0));
        assert!((b[0].ratio() - 0.8).abs() < 1e-12);
        assert!((b[1].ratio() - 1.2).abs() < 1e-12);
    }

    #[test]
    fn the_svg_has_a_row_per_bar_and_escapes_labels() {
        let mut b = bars(&files()).unwrap();
        b[0].config = "a<b&c".into();
        let s = svg(&b, "t");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<rect x=").count(), 2);
        assert!(s.contains("a&lt;b&amp;c") && s.contains("0.80x") && s.contains("1.20x"));
    }

    #[test]
    fn bad_files_are_errors() {
        let not_object = serde_json::json!([1, 2]);
        assert!(bars(&[not_object]).is_err());
        let no_at = serde_json::json!({"rmsnorm": {"value": 1.0}});
        assert!(bars(&[no_at]).unwrap_err().contains("<config>@"));
    }
}
