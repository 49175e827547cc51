//! Tensor parallelism (`--tp N`): one thread per rank, each with its own [`Exec`] (GPU `rank`, or
//! the CPU backend for a simulated split) and a [`Model`] holding its shard: its query and KV heads
//! (so its KV cache holds only its KV heads) and its MLP columns; embedding, norms and LM head
//! whole. After the attention output projection and the down projection the ranks sum their
//! partial hidden states: NCCL's all-reduce on the rank's stream on the GPU (inside the captured
//! CUDA graphs), a shared host buffer between threads on the CPU. Every rank then holds the same
//! hidden state, computes the same logits and samples with the same seed, so the ranks' tokens
//! agree; [`Group::step`] checks that they do.
//!
//! The scheduler runs once, on the caller's thread: [`Group::step`] sends each step's input to
//! every rank over a channel and collects their tokens.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;

use ferrinfer::KvIndex;
use ferrinfer::prelude::bf16;

use crate::config::Config;
use crate::exec::{Exec, Mem, Res};
use crate::graphs::Graphs;
use crate::model::{Capacity, Model, Reduce, SampleParams, StepInput};
use crate::weights::Weights;

/// Where the ranks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Rank `r` on GPU `r`, summed by NCCL (feature `nccl` for more than one rank).
    Gpu,
    /// Every rank on the CPU backend, summed through host memory (a simulated split).
    Cpu,
}

/// The CPU ranks' sum: each adds its values into a shared f32 buffer, then all read the total
/// (so every rank gets the same bits), then one clears it for the next call.
struct HostSum {
    acc: Mutex<Vec<f32>>,
    barrier: Barrier,
}

impl Reduce for Arc<HostSum> {
    fn sum(&self, ex: &Exec, x: &mut Mem<bf16>, n: usize) -> Res<()> {
        let mine = ex.read(x, n)?;
        {
            let mut acc = self.acc.lock().map_err(|_| "a rank panicked")?;
            if acc.len() < n {
                acc.resize(n, 0.0);
            }
            acc.iter_mut()
                .zip(&mine)
                .for_each(|(a, v)| *a += v.to_f32());
        }
        self.barrier.wait();
        let total: Vec<bf16> = {
            let acc = self.acc.lock().map_err(|_| "a rank panicked")?;
            acc[..n].iter().map(|&v| bf16::from_f32(v)).collect()
        };
        ex.write(x, &total)?;
        if self.barrier.wait().is_leader() {
            self.acc.lock().map_err(|_| "a rank panicked")?.fill(0.0);
        }
        self.barrier.wait();
        Ok(())
    }
}

/// NCCL's in-place all-reduce of the hidden state on the rank's stream.
#[cfg(feature = "nccl")]
struct NcclSum(ferrinfer::distributed::Communicator);

#[cfg(feature = "nccl")]
impl Reduce for NcclSum {
    fn sum(&self, ex: &Exec, x: &mut Mem<bf16>, n: usize) -> Res<()> {
        let mut v = ex.view_mut(x, 0..n)?;
        self.0
            .all_reduce_sum(&mut v)
            .map_err(crate::exec::err("all-reduce"))
    }
}

/// Start `world` rank threads. Each makes its [`Exec`]; once every rank has one (or one failed:
/// then all stop, so none waits forever in NCCL's set-up), each joins the rank group and runs
/// `f(rank, exec, reduce)` (`reduce` is `None` for one rank). Returns the threads' handles.
pub fn spawn_ranks<R, F>(world: usize, place: Place, f: F) -> Res<Vec<JoinHandle<Res<R>>>>
where
    R: Send + 'static,
    F: Fn(usize, Exec, Option<Box<dyn Reduce>>) -> Res<R> + Send + Sync + 'static,
{
    if world == 0 {
        return Err("--tp must be at least 1".into());
    }
    #[cfg(feature = "nccl")]
    let id = match (place, world) {
        (Place::Gpu, 2..) => {
            Some(ferrinfer::distributed::NcclId::new().map_err(crate::exec::err("NCCL"))?)
        }
        _ => None,
    };
    #[cfg(not(feature = "nccl"))]
    if place == Place::Gpu && world > 1 {
        return Err(format!(
            "--tp {world} on GPUs needs NCCL: build with --features nccl \
             (or run a simulated split on the CPU with --cpu)"
        ));
    }
    let f = Arc::new(f);
    let ready = Arc::new((Barrier::new(world), Mutex::new(Vec::<String>::new())));
    let host = Arc::new(HostSum {
        acc: Mutex::new(Vec::new()),
        barrier: Barrier::new(world),
    });
    let handles = (0..world)
        .map(|rank| {
            let (f, ready, host) = (f.clone(), ready.clone(), host.clone());
            std::thread::Builder::new()
                .name(format!("tp-rank-{rank}"))
                .spawn(move || -> Res<R> {
                    let exec = match place {
                        Place::Cpu => Ok(Exec::cpu()),
                        Place::Gpu => Exec::gpu(rank),
                    };
                    if let Err(e) = &exec {
                        ready.1.lock().unwrap().push(format!("rank {rank}: {e}"));
                    }
                    ready.0.wait();
                    let failed = ready.1.lock().unwrap().clone();
                    if !failed.is_empty() {
                        return Err(failed.join("; "));
                    }
                    let exec = exec?;
                    let reduce: Option<Box<dyn Reduce>> = match (place, world) {
                        (_, 1) => None,
                        (Place::Cpu, _) => Some(Box::new(host)),
                        #[cfg(feature = "nccl")]
                        (Place::Gpu, _) => {
                            use ferrinfer::distributed::Communicator;
                            let id = id.as_ref().ok_or("no NCCL id")?;
                            let comm = Communicator::new(&exec.backend, id, rank, world)
                                .map_err(crate::exec::err("NCCL communicator"))?;
                            Some(Box::new(NcclSum(comm)))
                        }
                        #[cfg(not(feature = "nccl"))]
                        (Place::Gpu, _) => unreachable!("refused above"),
                    };
                    f(rank, exec, reduce)
                })
                .map_err(crate::exec::err("spawn"))
        })
        .collect::<Res<Vec<_>>>()?;
    Ok(handles)
}

/// Join rank threads, returning their results in rank order (the first error if any failed).
pub fn join<R>(handles: Vec<JoinHandle<Res<R>>>) -> Res<Vec<R>> {
    let mut out = Vec::with_capacity(handles.len());
    let mut first_err = None;
    for (rank, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(format!("rank {rank} panicked"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// A step's input as the ranks receive it (owned: it crosses threads).
struct StepMsg {
    tokens: Vec<i32>,
    qo_indptr: Vec<i32>,
    kv: KvIndex,
    params: Vec<SampleParams>,
    graphs: bool,
}

enum Cmd {
    // Boxed: a step's message is much larger than the other command.
    Step(Box<StepMsg>),
    /// The last step's logits of its first `b` requests.
    Logits(usize),
}

enum Reply {
    /// Sampled tokens, and the rank's graph replays so far.
    Tokens(Vec<i32>, usize),
    Logits(Vec<f32>),
}

/// The rank threads of a tensor-parallel model, driven step by step from the caller's thread.
pub struct Group {
    world: usize,
    to_ranks: Vec<Sender<Cmd>>,
    from_ranks: Vec<Receiver<Res<Reply>>>,
    handles: Vec<JoinHandle<Res<()>>>,
    /// Decode steps replayed from a CUDA graph (rank 0's count).
    pub replays: usize,
}

impl Group {
    /// `world` ranks of the model `c` (the full config) with weights `w` split by
    /// [`Weights::shard`] (or, with `None`, random weights filled on each rank's device, per
    /// shard: the timing mode's stand-in). Every rank's sampler starts from `seed`.
    pub fn new(
        c: &Config,
        world: usize,
        place: Place,
        w: Option<&Weights>,
        cap: Capacity,
        seed: u64,
    ) -> Res<Group> {
        let mut shards = Vec::with_capacity(world);
        for rank in 0..world {
            let rc = c
                .shard(rank, world)
                .map_err(|e| format!("--tp {world}: {e}"))?;
            let rw = w.map(|w| w.shard(c, rank, world)).transpose()?;
            shards.push(Mutex::new(Some((rc, rw))));
        }
        let (mut to_ranks, mut from_ranks, mut ends) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..world {
            let (cmd_tx, cmd_rx) = channel::<Cmd>();
            let (reply_tx, reply_rx) = channel::<Res<Reply>>();
            to_ranks.push(cmd_tx);
            from_ranks.push(reply_rx);
            ends.push(Mutex::new(Some((cmd_rx, reply_tx))));
        }
        let (shards, ends) = (Arc::new(shards), Arc::new(ends));
        let handles = spawn_ranks(world, place, move |rank, exec, reduce| {
            fn take<T>(m: &Mutex<Option<T>>) -> Res<T> {
                m.lock()
                    .ok()
                    .and_then(|mut g| g.take())
                    .ok_or_else(|| "a rank started twice".into())
            }
            let (rc, rw) = take(&shards[rank])?;
            let (inbox, outbox) = take(&ends[rank])?;
            let setup = Model::new(&rc, exec, rw.as_ref(), cap, seed).map(|mut m| {
                m.reduce = reduce;
                m
            });
            drop(rw);
            let mut m = match setup {
                Ok(m) => m,
                Err(e) => {
                    let _ = outbox.send(Err(format!("rank {rank}: {e}")));
                    return Err(e);
                }
            };
            let _ = outbox.send(Ok(Reply::Tokens(Vec::new(), 0))); // ready
            let mut graphs = Graphs::default();
            // Until the group is dropped (its senders close the channel).
            while let Ok(cmd) = inbox.recv() {
                let r = match cmd {
                    Cmd::Step(s) => {
                        let inp = StepInput {
                            tokens: &s.tokens,
                            qo_indptr: &s.qo_indptr,
                            kv: s.kv,
                            params: &s.params,
                        };
                        let on_gpu = m.exec.dev.is_some();
                        let r = if on_gpu && s.graphs && inp.is_decode() {
                            graphs.step(&mut m, &inp)
                        } else {
                            m.step(&inp)
                        };
                        r.map(|t| Reply::Tokens(t, graphs.replays))
                    }
                    Cmd::Logits(b) => m.logits(b).map(Reply::Logits),
                };
                let failed = r.is_err();
                let _ = outbox.send(r.map_err(|e| format!("rank {rank}: {e}")));
                if failed {
                    // The other ranks may wait in a collective for this one: stop the group.
                    return Err(format!("rank {rank} stopped after an error"));
                }
            }
            Ok(())
        })?;
        let mut g = Group {
            world,
            to_ranks,
            from_ranks,
            handles,
            replays: 0,
        };
        g.collect()?;
        Ok(g)
    }

    /// Every rank's reply to the last command, in rank order.
    fn collect(&mut self) -> Res<Vec<Reply>> {
        let mut out = Vec::with_capacity(self.world);
        let mut first_err = None;
        for (rank, rx) in self.from_ranks.iter().enumerate() {
            match rx.recv() {
                Ok(Ok(r)) => out.push(r),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(format!("rank {rank} has stopped"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn send(&self, cmd: impl Fn() -> Cmd) -> Res<()> {
        for (rank, tx) in self.to_ranks.iter().enumerate() {
            tx.send(cmd())
                .map_err(|_| format!("rank {rank} has stopped"))?;
        }
        Ok(())
    }

    /// Run one step on every rank (decode steps through CUDA graphs when `graphs` and on the
    /// GPU) and return the tokens, which every rank must have sampled alike.
    pub fn step(&mut self, inp: &StepInput, graphs: bool) -> Res<Vec<i32>> {
        self.send(|| {
            Cmd::Step(Box::new(StepMsg {
                tokens: inp.tokens.to_vec(),
                qo_indptr: inp.qo_indptr.to_vec(),
                kv: inp.kv.clone(),
                params: inp.params.to_vec(),
                graphs,
            }))
        })?;
        let replies = self.collect()?;
        if let Some(Reply::Tokens(_, n)) = replies.first() {
            self.replays = *n;
        }
        let mut tokens = replies.into_iter().map(|r| match r {
            Reply::Tokens(t, _) => t,
            Reply::Logits(_) => Vec::new(),
        });
        let first = tokens.next().unwrap_or_default();
        for (rank, t) in tokens.enumerate() {
            if t != first {
                return Err(format!(
                    "tensor-parallel ranks disagree: rank 0 sampled {first:?}, rank {} {t:?}",
                    rank + 1
                ));
            }
        }
        Ok(first)
    }

    /// Each rank's logits of the last step's first `b` requests, `[b, vocab]` per rank.
    pub fn logits(&mut self, b: usize) -> Res<Vec<Vec<f32>>> {
        self.send(|| Cmd::Logits(b))?;
        Ok(self
            .collect()?
            .into_iter()
            .map(|r| match r {
                Reply::Logits(l) => l,
                Reply::Tokens(..) => Vec::new(),
            })
            .collect())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Closing the channels ends every rank's loop; then wait for the threads (and their
        // devices) to finish.
        self.to_ranks.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// What runs the steps: one model on the caller's thread, or a tensor-parallel [`Group`].
pub enum Engine {
    /// One rank: the model and its decode graphs (used when `graphs` and on the GPU).
    One {
        m: Box<Model>,
        graphs: Graphs,
        use_graphs: bool,
    },
    /// `--tp N`.
    Tp { group: Group, use_graphs: bool },
}

impl Engine {
    /// Run one step; the sampled tokens of its requests.
    pub fn step(&mut self, inp: &StepInput) -> Res<Vec<i32>> {
        match self {
            Engine::One {
                m,
                graphs,
                use_graphs,
            } => {
                if *use_graphs && m.exec.dev.is_some() && inp.is_decode() {
                    graphs.step(m, inp)
                } else {
                    m.step(inp)
                }
            }
            Engine::Tp { group, use_graphs } => group.step(inp, *use_graphs),
        }
    }
    /// The last step's logits of its first `b` requests (rank 0's), `[b, vocab]`.
    pub fn logits(&mut self, b: usize) -> Res<Vec<f32>> {
        match self {
            Engine::One { m, .. } => m.logits(b),
            Engine::Tp { group, .. } => Ok(group.logits(b)?.swap_remove(0)),
        }
    }
    /// Decode steps replayed from CUDA graphs so far.
    pub fn replays(&self) -> usize {
        match self {
            Engine::One { graphs, .. } => graphs.replays,
            Engine::Tp { group, .. } => group.replays,
        }
    }
}
