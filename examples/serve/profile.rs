//! Per-op time of a step: CUDA events around each op (GPU) or wall clocks (CPU), summed by op
//! class, printed as a table and optionally drawn as an SVG bar chart.

use std::cell::RefCell;
use std::fmt::Write;
use std::time::Instant;

use ferrinfer::cudarc::driver::sys::CUevent_flags;
use ferrinfer::cudarc::driver::{CudaEvent, CudaStream};

use crate::exec::{Res, err};

/// The op classes of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Embed,
    Gemm,
    Norm,
    /// RoPE fused into the KV append: one launch does both.
    RopeAppend,
    Attention,
    Activation,
    Sampling,
    /// The tensor-parallel sum of the hidden state across ranks.
    AllReduce,
}

impl Op {
    /// Every class, in table order.
    pub const ALL: [Op; 8] = [
        Op::Gemm,
        Op::Attention,
        Op::Norm,
        Op::RopeAppend,
        Op::Activation,
        Op::Sampling,
        Op::Embed,
        Op::AllReduce,
    ];
    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Op::Embed => "embedding + row gathers",
            Op::Gemm => "GEMM (cuBLAS / host)",
            Op::Norm => "RMSNorm (fused add)",
            Op::RopeAppend => "RoPE + KV append (fused)",
            Op::Attention => "attention",
            Op::Activation => "SiLU-and-mul",
            Op::Sampling => "sampling",
            Op::AllReduce => "all-reduce (tensor parallel)",
        }
    }
}

enum Mark {
    Gpu(CudaEvent, CudaEvent),
    Cpu(f64),
}

/// Records op times when switched on; does nothing otherwise (the graph and the timed steps
/// run without it).
#[derive(Default)]
pub struct Profiler {
    on: bool,
    marks: RefCell<Vec<(Op, Mark)>>,
}

impl Profiler {
    /// Start recording (clears what was recorded).
    pub fn start(&mut self) {
        self.on = true;
        self.marks.borrow_mut().clear();
    }
    /// Stop recording.
    pub fn stop(&mut self) {
        self.on = false;
    }
    /// Run `f` as one op of class `op` on `stream` (None: the CPU backend).
    pub fn time<R>(
        &self,
        op: Op,
        stream: Option<&CudaStream>,
        f: impl FnOnce() -> Res<R>,
    ) -> Res<R> {
        if !self.on {
            return f();
        }
        match stream {
            Some(s) => {
                let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
                let a = s.record_event(flags).map_err(err("event"))?;
                let r = f()?;
                let b = s.record_event(flags).map_err(err("event"))?;
                self.marks.borrow_mut().push((op, Mark::Gpu(a, b)));
                Ok(r)
            }
            None => {
                let t = Instant::now();
                let r = f()?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                self.marks.borrow_mut().push((op, Mark::Cpu(ms)));
                Ok(r)
            }
        }
    }
    /// Milliseconds per class (waits for the events).
    pub fn totals(&self) -> Res<Vec<(Op, f64)>> {
        let mut t: Vec<(Op, f64)> = Op::ALL.iter().map(|&o| (o, 0.0)).collect();
        for (op, m) in self.marks.borrow().iter() {
            let ms = match m {
                Mark::Gpu(a, b) => f64::from(a.elapsed_ms(b).map_err(err("elapsed"))?),
                Mark::Cpu(ms) => *ms,
            };
            if let Some(e) = t.iter_mut().find(|(o, _)| o == op) {
                e.1 += ms;
            }
        }
        Ok(t)
    }
}

/// The breakdown as printed lines.
pub fn table(totals: &[(Op, f64)]) -> String {
    let sum: f64 = totals.iter().map(|t| t.1).sum();
    let mut s = String::new();
    for (op, ms) in totals {
        let _ = writeln!(
            s,
            "  {:<28} {:>9.3} ms  {:>5.1} %",
            op.name(),
            ms,
            100.0 * ms / sum.max(1e-12)
        );
    }
    let _ = writeln!(s, "  {:<28} {:>9.3} ms", "sum of ops", sum);
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart of the breakdown (share of the step per op class).
pub fn svg(totals: &[(Op, f64)], title: &str) -> String {
    let (label_w, bar_w, value_w, row_h, top) = (200.0, 420.0, 170.0, 22.0, 40.0);
    let width = label_w + bar_w + value_w;
    let height = top + row_h * totals.len() as f64 + 20.0;
    let sum: f64 = totals.iter().map(|t| t.1).sum::<f64>().max(1e-12);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        esc(title)
    );
    for (i, (op, ms)) in totals.iter().enumerate() {
        let y = top + row_h * i as f64;
        let share = ms / sum;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{label_w}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"#4682b4\"/>\n\
             <text x=\"{:.1}\" y=\"{}\">{:.3} ms ({:.1} %)</text>",
            label_w - 8.0,
            y + 15.0,
            esc(op.name()),
            y + 3.0,
            bar_w * share,
            row_h - 6.0,
            label_w + bar_w * share + 6.0,
            y + 15.0,
            ms,
            100.0 * share
        );
    }
    out.push_str("</svg>\n");
    out
}
