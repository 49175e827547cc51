//! Continuous batching: requests arrive and finish at different steps; pages come from a free
//! list and go back to it; each step takes one decode row per running request and fills the rest
//! of its token budget with prefill chunks of waiting requests.

use ferrinfer::prelude::*;

use crate::model::{SampleParams, StepInput};

/// A request as the caller submits it.
#[derive(Clone, Debug)]
pub struct Request {
    pub id: usize,
    pub prompt: Vec<i32>,
    pub max_new: usize,
    pub params: SampleParams,
}

/// A request being served.
#[derive(Debug)]
struct Live {
    req: Request,
    /// Prompt and generated tokens.
    seq: Vec<i32>,
    /// Tokens whose K and V are in the cache.
    cached: usize,
    pages: Vec<i32>,
}

/// A finished request.
#[derive(Clone, Debug)]
pub struct Done {
    pub id: usize,
    pub generated: Vec<i32>,
}

/// One planned step: what the model runs, and which request each row of output belongs to.
pub struct Step {
    pub tokens: Vec<i32>,
    pub qo_indptr: Vec<i32>,
    pub kv: KvIndex,
    pub params: Vec<SampleParams>,
    /// Index in the live list of each request of the step.
    slots: Vec<usize>,
    /// Id of each request of the step.
    pub ids: Vec<usize>,
}

impl Step {
    /// The model's view of the step.
    pub fn input(&self) -> StepInput<'_> {
        StepInput {
            tokens: &self.tokens,
            qo_indptr: &self.qo_indptr,
            kv: self.kv.clone(),
            params: &self.params,
        }
    }
}

/// The scheduler.
pub struct Scheduler {
    page_size: u32,
    num_pages: u32,
    free: Vec<i32>,
    live: Vec<Live>,
    /// Rows of one step.
    budget: usize,
    /// Requests of one step.
    max_batch: usize,
    /// Largest prefill chunk of one request in one step.
    chunk: usize,
}

impl Scheduler {
    /// A scheduler over `num_pages` pages of `page_size`, steps of at most `budget` rows and
    /// `max_batch` requests, prefill chunks of at most `chunk` tokens.
    pub fn new(
        page_size: u32,
        num_pages: u32,
        budget: usize,
        max_batch: usize,
        chunk: usize,
    ) -> Self {
        Scheduler {
            page_size,
            num_pages,
            // Popped from the end: pages 0, 1, ... first.
            free: (0..num_pages as i32).rev().collect(),
            live: Vec::new(),
            budget,
            max_batch,
            chunk: chunk.max(1),
        }
    }
    /// Pages on the free list.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Admit a request (it is prefilled in later steps). Refuses an empty prompt, or one whose
    /// whole sequence could never fit the cache.
    pub fn add(&mut self, req: Request) -> Result<(), String> {
        let need = (req.prompt.len() + req.max_new).div_ceil(self.page_size as usize);
        if req.prompt.is_empty() || need > self.num_pages as usize {
            return Err(format!(
                "request {}: prompt {} + {} new tokens needs {need} pages of {} (cache {})",
                req.id,
                req.prompt.len(),
                req.max_new,
                self.page_size,
                self.num_pages
            ));
        }
        self.live.push(Live {
            seq: req.prompt.clone(),
            req,
            cached: 0,
            pages: Vec::new(),
        });
        Ok(())
    }

    /// Take pages until request `i` holds `len` tokens; false when the free list is short.
    fn grow(&mut self, i: usize, len: usize) -> bool {
        let need = len.div_ceil(self.page_size as usize);
        while self.live[i].pages.len() < need {
            match self.free.pop() {
                Some(p) => self.live[i].pages.push(p),
                None => return false,
            }
        }
        true
    }

    // ANCHOR: next
    /// The next step, or `None` when nothing is running. Decode rows first (requests whose prompt
    /// is cached), then prefill chunks in arrival order while the budget lasts.
    pub fn next(&mut self) -> Result<Option<Step>, String> {
        let mut rows: Vec<(usize, usize)> = Vec::new(); // (live index, new tokens)
        let mut used = 0;
        for i in 0..self.live.len() {
            let l = &self.live[i];
            let pending = l.seq.len() - l.cached;
            if l.cached >= l.req.prompt.len() && pending == 1 {
                if rows.len() == self.max_batch || used == self.budget {
                    break;
                }
                if !self.grow(i, l.cached + 1) {
                    break;
                }
                rows.push((i, 1));
                used += 1;
            }
        }
        for i in 0..self.live.len() {
            let l = &self.live[i];
            if l.cached >= l.req.prompt.len() {
                continue;
            }
            let n = (l.req.prompt.len() - l.cached)
                .min(self.chunk)
                .min(self.budget - used);
            if n == 0 || rows.len() == self.max_batch {
                break;
            }
            let len = l.cached + n;
            if !self.grow(i, len) {
                break;
            }
            rows.push((i, n));
            used += n;
        }
        if rows.is_empty() {
            return if self.live.is_empty() {
                Ok(None)
            } else {
                Err("no request can make progress: the cache is full".into())
            };
        }
        let mut tokens = Vec::with_capacity(used);
        let mut qo_indptr = vec![0i32];
        let (mut lens, mut pages, mut params) = (Vec::new(), Vec::new(), Vec::new());
        for &(i, n) in &rows {
            let l = &self.live[i];
            tokens.extend_from_slice(&l.seq[l.cached..l.cached + n]);
            qo_indptr.push(tokens.len() as i32);
            let len = l.cached + n;
            lens.push(len as u32);
            pages.extend_from_slice(&l.pages[..len.div_ceil(self.page_size as usize)]);
            params.push(l.req.params);
        }
        let kv =
            KvIndex::paged_from_lens(self.page_size, &lens, &pages, self.num_pages, KvLayout::Nhd)
                .map_err(|e| e.to_string())?;
        // The tokens are cached once the step runs: count them now.
        for &(i, n) in &rows {
            self.live[i].cached += n;
        }
        Ok(Some(Step {
            tokens,
            qo_indptr,
            kv,
            params,
            slots: rows.iter().map(|r| r.0).collect(),
            ids: rows.iter().map(|r| self.live[r.0].req.id).collect(),
        }))
    }
    // ANCHOR_END: next

    /// Take the step's sampled tokens: a request whose prompt is now cached gets its token;
    /// finished requests give their pages back and are returned.
    pub fn finish(&mut self, step: &Step, sampled: &[i32]) -> Vec<Done> {
        for (&i, &t) in step.slots.iter().zip(sampled) {
            let l = &mut self.live[i];
            // A chunk that leaves part of the prompt uncached samples nothing useful.
            if l.cached == l.seq.len() {
                l.seq.push(t);
            }
        }
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.live.len() {
            let l = &self.live[i];
            if l.seq.len() - l.req.prompt.len() >= l.req.max_new {
                let l = self.live.remove(i);
                self.free.extend(l.pages.iter().rev());
                done.push(Done {
                    id: l.req.id,
                    generated: l.seq[l.req.prompt.len()..].to_vec(),
                });
            } else {
                i += 1;
            }
        }
        done
    }

    /// The cached tokens of running request `id` (after [`Scheduler::next`], those of the step).
    pub fn cached(&self, id: usize) -> Option<&[i32]> {
        self.live
            .iter()
            .find(|l| l.req.id == id)
            .map(|l| &l.seq[..l.cached])
    }
}
