//! The Llama decoder on ferrinfer: weights and KV cache on the backend, and one step (any mix of
//! prefill chunks and decode rows) queued op by op: embedding, per layer fused add + RMSNorm, the
//! Q and KV GEMMs, RoPE fused into the KV append, batch prefill or decode, the output GEMM, fused
//! add + RMSNorm, gate/up GEMM, SiLU-and-mul, down GEMM (under tensor parallelism each of the
//! two row-parallel GEMMs is followed by the ranks' all-reduce); then the final norm, the LM head and
//! sampling with per-request parameters.

use ferrinfer::ops::activation::{self, ActShape};
use ferrinfer::ops::kv_append::{AppendPlan, KvCacheMut, NewKv};
use ferrinfer::ops::norm::{self, NormShape};
use ferrinfer::ops::rope::{Angles, Rope, RopeLayout, RowStrides};
use ferrinfer::ops::sampling::{self, Filter, Param, SampleShape, SamplerState};
use ferrinfer::prelude::*;
use ferrinfer::variants::Standard;

use crate::config::Config;
use crate::exec::{Exec, Mem, Res};
use crate::profile::{Op, Profiler};
use crate::weights::Weights;

/// ferrinfer's error as the example's.
pub fn fe(e: ferrinfer::Error) -> String {
    e.to_string()
}

/// How one request samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
}

impl SampleParams {
    /// Greedy: top-k 1.
    pub fn greedy() -> Self {
        SampleParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
        }
    }
}

/// One step's batch, request after request.
pub struct StepInput<'a> {
    /// The new tokens of every request, concatenated.
    pub tokens: &'a [i32],
    /// `[batch + 1]`: request `b`'s new tokens are `tokens[qo_indptr[b]..qo_indptr[b + 1]]`.
    pub qo_indptr: &'a [i32],
    /// The paged cache index after this step's append.
    pub kv: KvIndex,
    /// Sampling of each request.
    pub params: &'a [SampleParams],
}

impl StepInput<'_> {
    /// Requests.
    pub fn batch(&self) -> usize {
        self.qo_indptr.len().saturating_sub(1)
    }
    /// Whether every request has one new token (a pure decode step).
    pub fn is_decode(&self) -> bool {
        self.qo_indptr.windows(2).all(|w| w[1] - w[0] == 1)
    }
}

/// The attention of a step.
pub enum Attn<'a> {
    Prefill(&'a BatchPrefill),
    Decode(&'a BatchDecode),
}

struct DevLayer {
    attn_norm: Mem<bf16>,
    wq: Mem<bf16>,
    wkv: Mem<bf16>,
    wo: Mem<bf16>,
    mlp_norm: Mem<bf16>,
    wgu: Mem<bf16>,
    wdown: Mem<bf16>,
}

/// Activations for `max_tokens` rows (and `max_batch` sampled rows).
struct Scratch {
    ids: Mem<i32>,
    last: Mem<i32>,
    x: Mem<bf16>,
    res: Mem<bf16>,
    q: Mem<bf16>,
    kv: Mem<bf16>,
    o: Mem<bf16>,
    gu: Mem<bf16>,
    act: Mem<bf16>,
    xl: Mem<bf16>,
    logits: Mem<f32>,
    out: Mem<i32>,
    temp: Mem<f32>,
    top_k: Mem<i32>,
    top_p: Mem<f32>,
}

/// The model on a backend.
pub struct Model {
    pub c: Config,
    pub exec: Exec,
    pub heads: Heads,
    rope: Rope,
    pub num_pages: u32,
    pub max_tokens: usize,
    pub max_batch: usize,
    embed: Mem<bf16>,
    layers: Vec<DevLayer>,
    final_norm: Mem<bf16>,
    lm_head: Mem<bf16>,
    k_cache: Vec<Mem<bf16>>,
    v_cache: Vec<Mem<bf16>>,
    s: Scratch,
    sampler: SamplerState,
    append: Option<AppendPlan>,
    pub prof: Profiler,
    /// Tensor parallelism: sums the row-parallel projections' partial outputs over the ranks
    /// (after the attention output projection and after the down projection). `None`: one rank.
    pub reduce: Option<Box<dyn Reduce>>,
}

/// The sum over ranks of a tensor-parallel model's partial hidden state, in place, queued on the
/// rank's stream (so a CUDA graph captures it).
pub trait Reduce {
    /// Replace the first `n` elements of `x` by their sum over every rank.
    fn sum(&self, ex: &Exec, x: &mut Mem<bf16>, n: usize) -> Res<()>;
}

/// Sizes of a [`Model`]'s cache and step buffers.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub page_size: u32,
    pub num_pages: u32,
    /// Rows of one step (prefill chunk tokens plus decode rows).
    pub max_tokens: usize,
    /// Requests of one step.
    pub max_batch: usize,
}

impl Model {
    /// Upload `w` (or, with `None`, fill random weights on the backend: the timing mode's 16 GB)
    /// and allocate the cache and step buffers.
    pub fn new(c: &Config, exec: Exec, w: Option<&Weights>, cap: Capacity, seed: u64) -> Res<Self> {
        let heads = c.heads().map_err(fe)?;
        let (h, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        let mut n = 0u32;
        let mut mk = |data: Option<&Vec<bf16>>, len: usize, scale: f32| -> Res<Mem<bf16>> {
            match data {
                Some(d) => exec.upload(d),
                None => {
                    n += 1;
                    let mut m = exec.zeros(len)?;
                    exec.fill_random(&mut m, seed as u32 ^ n.wrapping_mul(0x9e37_79b9), scale)?;
                    Ok(m)
                }
            }
        };
        // Uniform in [-a, a) has standard deviation a / sqrt(3): a = sqrt(3 / fan_in).
        let sd = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let lw = w.map(|w| &w.layers[l]);
            layers.push(DevLayer {
                attn_norm: mk(lw.map(|l| &l.attn_norm), h, 1.0)?,
                wq: mk(lw.map(|l| &l.wq), qd * h, sd(h))?,
                wkv: mk(lw.map(|l| &l.wkv), 2 * kvd * h, sd(h))?,
                wo: mk(lw.map(|l| &l.wo), h * qd, sd(qd))?,
                mlp_norm: mk(lw.map(|l| &l.mlp_norm), h, 1.0)?,
                wgu: mk(lw.map(|l| &l.wgu), 2 * c.inter * h, sd(h))?,
                wdown: mk(lw.map(|l| &l.wdown), h * c.inter, sd(c.inter))?,
            });
        }
        let embed = mk(w.map(|w| &w.embed), c.vocab * h, 1.0)?;
        let final_norm = mk(w.map(|w| &w.final_norm), h, 1.0)?;
        let lm_head = mk(w.map(|w| &w.lm_head), c.vocab * h, sd(h))?;
        let cache_len = cap.num_pages as usize * cap.page_size as usize * kvd;
        let mut k_cache = Vec::with_capacity(c.layers);
        let mut v_cache = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            k_cache.push(exec.zeros(cache_len)?);
            v_cache.push(exec.zeros(cache_len)?);
        }
        let (t, b) = (cap.max_tokens, cap.max_batch);
        let s = Scratch {
            ids: exec.zeros(t)?,
            last: exec.zeros(b)?,
            x: exec.zeros(t * h)?,
            res: exec.zeros(t * h)?,
            q: exec.zeros(t * qd)?,
            kv: exec.zeros(t * 2 * kvd)?,
            o: exec.zeros(t * qd)?,
            gu: exec.zeros(t * 2 * c.inter)?,
            act: exec.zeros(t * c.inter)?,
            xl: exec.zeros(b * h)?,
            logits: exec.zeros(b * c.vocab)?,
            out: exec.zeros(b)?,
            temp: exec.zeros(b)?,
            top_k: exec.zeros(b)?,
            top_p: exec.zeros(b)?,
        };
        let sampler = SamplerState::new(&exec.backend, seed).map_err(fe)?;
        Ok(Model {
            c: c.clone(),
            heads,
            rope: Rope::new(heads, c.head_dim as u32, RopeLayout::NeoX).map_err(fe)?,
            num_pages: cap.num_pages,
            max_tokens: t,
            max_batch: b,
            embed,
            layers,
            final_norm,
            lm_head,
            k_cache,
            v_cache,
            s,
            sampler,
            append: None,
            prof: Profiler::default(),
            reduce: None,
            exec,
        })
    }

    /// Where q, k and v of the new tokens are: q dense, K and V side by side in each kv row.
    pub fn row_strides(&self) -> RowStrides {
        let kv = 2 * self.c.kv_dim() as u64;
        RowStrides {
            q: self.c.q_dim() as u64,
            k: kv,
            v: kv,
        }
    }

    /// An append plan for up to `capacity` rows of this model's cache.
    pub fn append_plan(&self, kv: &KvIndex, qo_indptr: &[i32], capacity: usize) -> Res<AppendPlan> {
        AppendPlan::new(
            &self.exec.backend,
            self.heads,
            kv,
            qo_indptr,
            capacity as u32,
        )
        .and_then(|p| p.with_row_strides(self.row_strides()))
        .map_err(fe)
    }

    /// Check a step against the buffers and write its ids, last-row indices and sampling
    /// parameters, padded to `rows` and `batch` (padding: token 0, greedy).
    pub fn stage(&mut self, inp: &StepInput, rows: usize, batch: usize) -> Res<()> {
        let (n, b) = (inp.tokens.len(), inp.batch());
        if rows > self.max_tokens || batch > self.max_batch || n > rows || b > batch {
            return Err(format!(
                "step of {n} tokens / {b} requests (padded {rows} / {batch}) exceeds the model's \
                 {} tokens / {} requests",
                self.max_tokens, self.max_batch
            ));
        }
        if inp.qo_indptr.first() != Some(&0)
            || inp.qo_indptr.last() != Some(&(n as i32))
            || inp.qo_indptr.windows(2).any(|w| w[1] <= w[0])
            || inp.params.len() != b
        {
            return Err(format!(
                "step: qo_indptr {:?} must rise from 0 to {n}; {} sampling params for {b} requests",
                inp.qo_indptr,
                inp.params.len()
            ));
        }
        let mut ids = inp.tokens.to_vec();
        ids.resize(rows, 0);
        let mut last: Vec<i32> = inp.qo_indptr[1..].iter().map(|e| e - 1).collect();
        last.extend(n as i32..(n + batch - b) as i32);
        let mut p = inp.params.to_vec();
        p.resize(batch, SampleParams::greedy());
        let ex = &self.exec;
        ex.write(&mut self.s.ids, &ids)?;
        ex.write(&mut self.s.last, &last)?;
        ex.write(
            &mut self.s.temp,
            &p.iter().map(|p| p.temperature).collect::<Vec<_>>(),
        )?;
        ex.write(
            &mut self.s.top_k,
            &p.iter().map(|p| p.top_k).collect::<Vec<_>>(),
        )?;
        ex.write(
            &mut self.s.top_p,
            &p.iter().map(|p| p.top_p).collect::<Vec<_>>(),
        )?;
        Ok(())
    }

    /// One step without a graph: plans made here, every op queued, the tokens read back.
    pub fn step(&mut self, inp: &StepInput) -> Res<Vec<i32>> {
        let (n, b) = (inp.tokens.len(), inp.batch());
        self.stage(inp, n, b)?;
        let append = match self.append.take() {
            Some(mut a) => {
                a.replan(&inp.kv, inp.qo_indptr).map_err(fe)?;
                a
            }
            None => self.append_plan(&inp.kv, inp.qo_indptr, self.max_tokens)?,
        };
        let be = self.exec.backend.clone();
        let r = if inp.is_decode() {
            let plan = BatchDecode::plan(&be, self.heads, inp.kv.clone(), None).map_err(fe)?;
            self.forward(n, b, &append, Attn::Decode(&plan))
        } else {
            let batch = Batch::new(self.heads, inp.qo_indptr, inp.kv.clone())
                .map_err(fe)?
                .with_causal(true);
            let plan = BatchPrefill::plan(&be, batch).map_err(fe)?;
            self.forward(n, b, &append, Attn::Prefill(&plan))
        };
        // Keep the plan (its buffers) for the next step, also after an error.
        self.append = Some(append);
        r?;
        self.tokens(b)
    }

    /// The sampled tokens of the last step's first `b` requests (waits for the step).
    pub fn tokens(&self, b: usize) -> Res<Vec<i32>> {
        self.exec.read(&self.s.out, b)
    }
    /// The last step's logits of its first `b` requests, `[b, vocab]` (waits for the step).
    pub fn logits(&self, b: usize) -> Res<Vec<f32>> {
        self.exec.read(&self.s.logits, b * self.c.vocab)
    }

    /// Fill the whole KV cache with random values (the timing mode's stand-in for a prefill).
    pub fn fill_cache_random(&mut self, seed: u32) -> Res<()> {
        for (l, (k, v)) in self.k_cache.iter_mut().zip(&mut self.v_cache).enumerate() {
            self.exec.fill_random(k, seed ^ (2 * l as u32 + 1), 1.0)?;
            self.exec.fill_random(v, seed ^ (2 * l as u32 + 2), 1.0)?;
        }
        Ok(())
    }

    // ANCHOR: forward
    /// Queue one step over `rows` rows (the step's tokens, then padding) and `batch` sampled rows,
    /// with the ids and parameters [`Model::stage`] wrote. No allocation and no host
    /// synchronisation: a CUDA graph can capture it.
    pub fn forward(
        &mut self,
        rows: usize,
        batch: usize,
        append: &AppendPlan,
        attn: Attn<'_>,
    ) -> Res<()> {
        let Model {
            c,
            exec: ex,
            rope,
            embed,
            layers,
            final_norm,
            lm_head,
            k_cache,
            v_cache,
            s,
            sampler,
            prof: p,
            reduce,
            ..
        } = self;
        let (h, qd, kvd, inter, vocab) = (c.hidden, c.q_dim(), c.kv_dim(), c.inter, c.vocab);
        let be = &ex.backend;
        let st = ex.dev.as_ref().map(|d| &*d.stream);
        let eps = c.eps;
        let shape = NormShape::new(rows as u32, h as u32).map_err(fe)?;
        let angles = || Angles::Computed(c.rope());
        p.time(Op::Embed, st, || {
            ex.gather(&s.ids, rows, embed, h, &mut s.x)
        })?;
        p.time(Op::Embed, st, || ex.zero(&mut s.res, rows * h))?;
        let add_norm = |x: &mut Mem<bf16>, res: &mut Mem<bf16>, w: &Mem<bf16>| -> Res<()> {
            p.time(Op::Norm, st, || {
                norm::fused_add_rmsnorm(
                    be,
                    shape,
                    &mut ex.view_mut(x, 0..rows * h)?,
                    &mut ex.view_mut(res, 0..rows * h)?,
                    &ex.view(w, 0..h)?,
                    eps,
                )
                .map_err(fe)
            })
        };
        for (l, lw) in layers.iter().enumerate() {
            // The residual stream keeps the sum; x becomes its norm (layer 0: residual 0 + embedding).
            add_norm(&mut s.x, &mut s.res, &lw.attn_norm)?;
            p.time(Op::Gemm, st, || {
                ex.gemm(&s.x, &lw.wq, &mut s.q, (rows, qd, h))
            })?;
            p.time(Op::Gemm, st, || {
                ex.gemm(&s.x, &lw.wkv, &mut s.kv, (rows, 2 * kvd, h))
            })?;
            let cache_len = k_cache[l].len();
            p.time(Op::RopeAppend, st, || {
                let k = ex.view(&s.kv, 0..rows * 2 * kvd)?;
                let v = ex.view(&s.kv, kvd..rows * 2 * kvd)?;
                append
                    .run_with_rope(
                        be,
                        rope,
                        angles(),
                        &mut ex.view_mut(&mut s.q, 0..rows * qd)?,
                        NewKv { k: &k, v: &v },
                        KvCacheMut {
                            k: &mut ex.view_mut(&mut k_cache[l], 0..cache_len)?,
                            v: &mut ex.view_mut(&mut v_cache[l], 0..cache_len)?,
                        },
                    )
                    .map_err(fe)
            })?;
            p.time(Op::Attention, st, || {
                let q = ex.view(&s.q, 0..rows * qd)?;
                let k = ex.view(&k_cache[l], 0..k_cache[l].len())?;
                let v = ex.view(&v_cache[l], 0..v_cache[l].len())?;
                let mut o = ex.view_mut(&mut s.o, 0..rows * qd)?;
                match attn {
                    Attn::Prefill(a) => a.run(&Standard, &q, &k, &v, &mut o, None),
                    Attn::Decode(a) => a.run(&Standard, &q, &k, &v, &mut o, None),
                }
                .map_err(fe)
            })?;
            p.time(Op::Gemm, st, || {
                ex.gemm(&s.o, &lw.wo, &mut s.x, (rows, h, qd))
            })?;
            if let Some(r) = reduce {
                p.time(Op::AllReduce, st, || r.sum(ex, &mut s.x, rows * h))?;
            }
            add_norm(&mut s.x, &mut s.res, &lw.mlp_norm)?;
            p.time(Op::Gemm, st, || {
                ex.gemm(&s.x, &lw.wgu, &mut s.gu, (rows, 2 * inter, h))
            })?;
            p.time(Op::Activation, st, || {
                let shape = ActShape::new(rows as u32, inter as u32).map_err(fe)?;
                activation::silu_and_mul(
                    be,
                    shape,
                    &ex.view(&s.gu, 0..rows * 2 * inter)?,
                    &mut ex.view_mut(&mut s.act, 0..rows * inter)?,
                )
                .map_err(fe)
            })?;
            p.time(Op::Gemm, st, || {
                ex.gemm(&s.act, &lw.wdown, &mut s.x, (rows, h, inter))
            })?;
            if let Some(r) = reduce {
                p.time(Op::AllReduce, st, || r.sum(ex, &mut s.x, rows * h))?;
            }
        }
        add_norm(&mut s.x, &mut s.res, final_norm)?;
        // Only each request's last row goes through the LM head.
        p.time(Op::Embed, st, || {
            ex.gather(&s.last, batch, &s.x, h, &mut s.xl)
        })?;
        p.time(Op::Gemm, st, || {
            ex.gemm(&s.xl, lm_head, &mut s.logits, (batch, vocab, h))
        })?;
        p.time(Op::Sampling, st, || {
            let (temp, k, tp) = (
                ex.view(&s.temp, 0..batch)?,
                ex.view(&s.top_k, 0..batch)?,
                ex.view(&s.top_p, 0..batch)?,
            );
            let filter = Filter::none()
                .top_k(Param::PerRequest(&k))
                .top_p(Param::PerRequest(&tp));
            sampling::sample_from_logits(
                be,
                sampler,
                SampleShape::new(batch as u32, vocab as u32).map_err(fe)?,
                &ex.view(&s.logits, 0..batch * vocab)?,
                Param::PerRequest(&temp),
                &filter,
                &mut ex.view_mut(&mut s.out, 0..batch)?,
            )
            .map_err(fe)
        })
    }
    // ANCHOR_END: forward
}
