//! Decode steps as CUDA graphs, one per batch-size bucket (1, 2, 4, ... up to the model's
//! batch): a bucket's first step runs eagerly (loading every kernel) and is then captured on the
//! engine's stream, GEMMs and all; later steps re-plan the bucket's decode and append plans in
//! place (outside the graph) and replay it. A batch smaller than its bucket is padded: padded rows
//! take token 0, are not appended to the cache (the append plan skips rows past its tokens), are
//! not attended (the decode plan holds the real batch) and their samples are dropped.

use ferrinfer::cudarc::driver::sys::{
    CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use ferrinfer::cudarc::driver::{CudaEvent, CudaGraph};
use ferrinfer::ops::kv_append::AppendPlan;
use ferrinfer::prelude::*;

use crate::exec::{Res, err};
use crate::model::{Attn, Model, StepInput, fe};

/// Work items of a bucket's decode plan (its fixed grid).
const WORK_ITEMS: u32 = 1024;

struct Bucket {
    size: usize,
    plan: BatchDecode,
    append: AppendPlan,
    graph: CudaGraph,
}

/// The captured buckets.
#[derive(Default)]
pub struct Graphs {
    buckets: Vec<Bucket>,
    /// Replays so far (steps that did not capture).
    pub replays: usize,
    /// When set, CUDA events recorded right around each replay (the timing mode's step time,
    /// without the host's re-planning between steps).
    pub replay_events: Option<Vec<(CudaEvent, CudaEvent)>>,
}

/// The bucket of a batch of `b`: the next power of two.
pub fn bucket_of(b: usize) -> usize {
    b.next_power_of_two()
}

impl Graphs {
    // ANCHOR: step
    /// Run a decode step through its bucket's graph (capturing it first if needed) and return
    /// the batch's tokens.
    pub fn step(&mut self, m: &mut Model, inp: &StepInput) -> Res<Vec<i32>> {
        if !inp.is_decode() {
            return Err("graphs run decode steps only".into());
        }
        let b = inp.batch();
        let size = bucket_of(b).min(m.max_batch).max(b);
        if size > m.max_tokens {
            return Err(format!(
                "bucket {size} exceeds the model's {} rows",
                m.max_tokens
            ));
        }
        m.stage(inp, size, size)?;
        if let Some(bk) = self.buckets.iter_mut().find(|bk| bk.size == size) {
            bk.plan.replan(inp.kv.clone(), None).map_err(fe)?;
            bk.append.replan(&inp.kv, inp.qo_indptr).map_err(fe)?;
            let timed = self.replay_events.is_some();
            let event = || {
                m.exec
                    .dev
                    .as_ref()
                    .map(|d| d.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
            };
            let start = if timed {
                event().transpose().map_err(err("event"))?
            } else {
                None
            };
            bk.graph.launch().map_err(err("graph launch"))?;
            if let (Some(start), Some(ev)) = (start, self.replay_events.as_mut()) {
                let end = event().transpose().map_err(err("event"))?.ok_or("no GPU")?;
                ev.push((start, end));
            }
            self.replays += 1;
            return m.tokens(b);
        }
        let config = PlanConfig {
            graph: Some(GraphCapacity {
                work_items: WORK_ITEMS,
                batch: size as u32,
                qo_rows: size as u32,
                kv_blocks: m.num_pages,
            }),
            ..PlanConfig::default()
        };
        let be = m.exec.backend.clone();
        let plan =
            BatchDecode::plan_with(&be, m.heads, inp.kv.clone(), None, config).map_err(fe)?;
        let append = m.append_plan(&inp.kv, inp.qo_indptr, size)?;
        // The eager run is this step: it loads every kernel, so the capture below queues only.
        m.forward(size, size, &append, Attn::Decode(&plan))?;
        let tokens = m.tokens(b)?;
        let stream = m
            .exec
            .dev
            .as_ref()
            .ok_or("graphs need the GPU")?
            .stream
            .clone();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(err("begin capture"))?;
        let queued = m.forward(size, size, &append, Attn::Decode(&plan));
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        queued?;
        let graph = graph
            .map_err(err("end capture"))?
            .ok_or("the capture recorded nothing")?;
        self.buckets.push(Bucket {
            size,
            plan,
            append,
            graph,
        });
        Ok(tokens)
    }
    // ANCHOR_END: step
}
