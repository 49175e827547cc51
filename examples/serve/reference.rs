//! The same model in plain f32 Rust, written from the Llama formulas and sharing no code with
//! ferrinfer's ops: what the GPU run and the CPU backend run are checked against.

use crate::config::Config;
use crate::weights::Weights;

fn f32s(xs: &[ferrinfer::prelude::bf16]) -> Vec<f32> {
    xs.iter().map(|x| x.to_f32()).collect()
}

/// `y[n] = sum_k x[k] w[n, k]` for a row-major `w` of `[out, x.len()]`.
fn linear(x: &[f32], w: &[f32], out: usize) -> Vec<f32> {
    let k = x.len();
    (0..out)
        .map(|n| {
            w[n * k..(n + 1) * k]
                .iter()
                .zip(x)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>() as f32
        })
        .collect()
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + f64::from(eps)).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, g)| (f64::from(*v) * r) as f32 * g)
        .collect()
}

/// Llama 3.1's scaled RoPE frequency of pair `j` of head dim `d` (theta 500000, factor 8, low 1,
/// high 4, original context 8192).
pub fn llama31_frequency(j: usize, d: usize) -> f64 {
    let (theta, factor, low, high, orig) = (500000f64, 8f64, 1f64, 4f64, 8192f64);
    let f = theta.powf(-2.0 * j as f64 / d as f64);
    let wavelen = 2.0 * std::f64::consts::PI / f;
    if wavelen < orig / high {
        f
    } else if wavelen > orig / low {
        f / factor
    } else {
        let smooth = (orig / wavelen - low) / (high - low);
        (1.0 - smooth) * f / factor + smooth * f
    }
}

/// Rotate one head in place (NeoX halves: dim `j` pairs with `j + d/2`, as Hugging Face's Llama).
fn rope(x: &mut [f32], pos: usize) {
    let d = x.len();
    for j in 0..d / 2 {
        let a = pos as f64 * llama31_frequency(j, d);
        let (s, c) = a.sin_cos();
        let (x1, x2) = (f64::from(x[j]), f64::from(x[j + d / 2]));
        x[j] = (x1 * c - x2 * s) as f32;
        x[j + d / 2] = (x2 * c + x1 * s) as f32;
    }
}

/// The weights in f32, converted once.
pub struct Reference {
    c: Config,
    embed: Vec<f32>,
    layers: Vec<[Vec<f32>; 7]>,
    final_norm: Vec<f32>,
    lm_head: Vec<f32>,
}

impl Reference {
    /// Convert `w` (shaped by `c`).
    pub fn new(c: &Config, w: &Weights) -> Self {
        Reference {
            c: c.clone(),
            embed: f32s(&w.embed),
            layers: w
                .layers
                .iter()
                .map(|l| {
                    [
                        &l.attn_norm,
                        &l.wq,
                        &l.wkv,
                        &l.wo,
                        &l.mlp_norm,
                        &l.wgu,
                        &l.wdown,
                    ]
                    .map(|x| f32s(x))
                })
                .collect(),
            final_norm: f32s(&w.final_norm),
            lm_head: f32s(&w.lm_head),
        }
    }

    /// The logits after the last of `tokens` (the whole sequence recomputed, causal attention).
    pub fn logits(&self, tokens: &[i32]) -> Vec<f32> {
        let c = &self.c;
        let (h, d, qd, kvd) = (c.hidden, c.head_dim, c.q_dim(), c.kv_dim());
        let group = c.heads_q / c.heads_kv;
        let mut x: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| self.embed[t as usize * h..(t as usize + 1) * h].to_vec())
            .collect();
        for [attn_norm, wq, wkv, wo, mlp_norm, wgu, wdown] in &self.layers {
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, row) in x.iter().enumerate() {
                let n = rmsnorm(row, attn_norm, c.eps);
                let mut q = linear(&n, wq, qd);
                let kv = linear(&n, wkv, 2 * kvd);
                let (mut k, v) = (kv[..kvd].to_vec(), kv[kvd..].to_vec());
                q.chunks_mut(d).for_each(|hd| rope(hd, pos));
                k.chunks_mut(d).for_each(|hd| rope(hd, pos));
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            let scale = 1.0 / (d as f64).sqrt();
            for (t, row) in x.iter_mut().enumerate() {
                let mut o = vec![0f32; qd];
                for hq in 0..c.heads_q {
                    let hk = hq / group;
                    let q = &qs[t][hq * d..(hq + 1) * d];
                    let s: Vec<f64> = (0..=t)
                        .map(|j| {
                            let k = &ks[j][hk * d..(hk + 1) * d];
                            q.iter()
                                .zip(k)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = p.iter().sum();
                    for e in 0..d {
                        let acc: f64 = (0..=t).map(|j| p[j] * f64::from(vs[j][hk * d + e])).sum();
                        o[hq * d + e] = (acc / z) as f32;
                    }
                }
                let proj = linear(&o, wo, h);
                row.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
                let n = rmsnorm(row, mlp_norm, c.eps);
                let gu = linear(&n, wgu, 2 * c.inter);
                let act: Vec<f32> = (0..c.inter)
                    .map(|i| {
                        let g = f64::from(gu[i]);
                        (g / (1.0 + (-g).exp()) * f64::from(gu[c.inter + i])) as f32
                    })
                    .collect();
                let down = linear(&act, wdown, h);
                row.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            }
        }
        let last = rmsnorm(
            x.last().expect("at least one token"),
            &self.final_norm,
            c.eps,
        );
        linear(&last, &self.lm_head, c.vocab)
    }
}

/// Index of the largest value, and its margin over the second largest.
#[allow(dead_code)] // used by tests/serve.rs
pub fn argmax_margin(xs: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    let mut second = f32::NEG_INFINITY;
    for (i, &v) in xs.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0, best.1 - second)
}

/// `|got - want| / |want|` (L2).
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (f64::from(*g) - f64::from(*w)).powi(2);
        den += f64::from(*w).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}
