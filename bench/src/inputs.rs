//! Random inputs (standard normal bf16, never zeros) made on every host core, and uploaded once per
//! configuration: decode caches reach a billion elements, which one core would take seconds over.

use std::thread;

use ferrinfer::prelude::*;
use ferrinfer_testkit::Rng;

use crate::configs::Config;
use crate::timing::BenchResult;

/// Elements each thread's generator fills; a fixed split keeps the data independent of core count.
const CHUNK: usize = 1 << 20;

/// `n` standard normal bf16 values from `seed`, the same for the same seed on any machine.
pub fn normal_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; n];
    let chunks: Vec<(usize, &mut [bf16])> = out.chunks_mut(CHUNK).enumerate().collect();
    let workers = thread::available_parallelism().map_or(1, |n| n.get());
    let per_worker = chunks.len().div_ceil(workers).max(1);
    let mut chunks = chunks.into_iter();
    thread::scope(|s| {
        loop {
            let mine: Vec<_> = chunks.by_ref().take(per_worker).collect();
            if mine.is_empty() {
                break;
            }
            s.spawn(move || {
                for (i, chunk) in mine {
                    let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    for x in chunk {
                        *x = bf16::from_f32(rng.normal());
                    }
                }
            });
        }
    });
    out
}

/// One set of device buffers for a configuration.
pub struct InputSet {
    /// `[total_qo, 32, 128]`.
    pub q: Buffer<bf16>,
    /// K and V, as the KV index lays them out.
    pub k: Buffer<bf16>,
    /// See `k`.
    pub v: Buffer<bf16>,
    /// Written by every run.
    pub o: Buffer<bf16>,
}

impl InputSet {
    /// Random q, k and v (set `set` of the configuration), o filled with NaN so a kernel that
    /// writes nothing cannot pass unnoticed in a later check.
    pub fn upload(backend: &Backend, cfg: &Config, kv_len: usize, set: u64) -> BenchResult<Self> {
        let q_len = cfg.qo_lens.iter().map(|&l| l as usize).sum::<usize>()
            * (cfg.heads.0 * cfg.head_dim) as usize;
        let seed = set * 4;
        Ok(InputSet {
            q: backend.upload(&normal_bf16(q_len, seed))?,
            k: backend.upload(&normal_bf16(kv_len, seed + 1))?,
            v: backend.upload(&normal_bf16(kv_len, seed + 2))?,
            o: backend.filled(q_len, bf16::NAN)?,
        })
    }

    /// o filled with NaN again, for the next row timed on these inputs.
    pub fn poison_output(&mut self, backend: &Backend) -> BenchResult<()> {
        self.o = backend.filled(self.o.len(), bf16::NAN)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_normal_and_never_zero() {
        let n = 3 * CHUNK + 17;
        let x = normal_bf16(n, 5);
        assert_eq!(x.len(), n);
        assert!(
            x.iter()
                .all(|v| v.to_f32().is_finite() && v.to_f32() != 0.0)
        );
        let mean = x.iter().map(|v| f64::from(v.to_f32())).sum::<f64>() / n as f64;
        let var = x.iter().map(|v| f64::from(v.to_f32()).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
        // Chunks differ from each other, and the same seed gives the same data.
        assert_ne!(x[..64], x[CHUNK..CHUNK + 64]);
        assert_eq!(x, normal_bf16(n, 5));
        assert_ne!(x[..64], normal_bf16(64, 6)[..]);
    }

    #[test]
    fn cpu_backend_sets_have_the_batch_shapes() {
        let cfg = Config {
            qo_lens: vec![3, 2],
            kv_lens: vec![5, 4],
            ..crate::configs::standard()
                .into_iter()
                .find(|c| c.key == "prefill_ragged_b16_l1024_causal")
                .unwrap()
        };
        let kv = cfg.kv_index().unwrap().buffer_len(&cfg.heads().unwrap());
        let set = InputSet::upload(&Backend::Cpu, &cfg, kv, 1).unwrap();
        assert_eq!(set.q.len(), 5 * 32 * 128);
        assert_eq!((set.k.len(), set.v.len()), (9 * 8 * 128, 9 * 8 * 128));
        assert!(set.o.to_vec().unwrap().iter().all(|x| x.is_nan()));
        assert_ne!(set.k.to_vec().unwrap(), set.v.to_vec().unwrap());
    }
}
