//! The generator behind every draw: Philox4x32-10, counter-based, with its state (seed, offset) in a
//! buffer on the backend, so that a draw on the GPU reads it there and a one-thread kernel after it
//! advances the offset on the device: a replayed CUDA graph draws fresh numbers, and a seed
//! reproduces a run bit for bit. The CPU backend computes the same Philox words.

use crate::device::backend::{Backend, Buffer};
use crate::error::{Error, Result};

/// Philox4x32-10 of `counter` under `key` (Salmon et al., SC 2011): ten rounds, the key bumped by
/// the Weyl constants between rounds. `kernels/cuda/ops/philox.cuh` computes the same words.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    // Plain `as` arithmetic in u64 (no call per operation), so debug builds (the CPU tests) stay
    // quick; every sum and product fits in 64 bits.
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = (k0 as u64 + 0x9E37_79B9) as u32;
            k1 = (k1 as u64 + 0xBB67_AE85) as u32;
        }
        let p0 = 0xD251_1F53u64 * c0 as u64;
        let p1 = 0xCD9E_8D57u64 * c2 as u64;
        (c0, c1, c2, c3) = (
            (p1 >> 32) as u32 ^ c1 ^ k0,
            p1 as u32,
            (p0 >> 32) as u32 ^ c3 ^ k1,
            p0 as u32,
        );
    }
    [c0, c1, c2, c3]
}

/// A word to a uniform in the open interval (0, 1): `(2 m + 1) 2^-24` for its top 23 bits `m`,
/// exact in f32 (as `fi::philox_uniform`).
pub fn philox_uniform(bits: u32) -> f32 {
    ((bits >> 9) * 2 + 1) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// The Philox group of per-request scalar draws (speculative acceptance tests), above every
/// token group `t / 4` (`fi::kPhiloxScalarGroups`).
pub const SCALAR_GROUPS: u32 = 0xC000_0000;

/// The uniforms of one call for one row: word `i % 4` of the Philox block at counter
/// `(i / 4, row, offset low, offset high)` under key `(seed low, seed high)`.
#[derive(Clone, Copy, Debug)]
pub struct RowDraws {
    row: u32,
    seed: u64,
    offset: u64,
}

impl RowDraws {
    /// The draws of row `row` in the call made at (`seed`, `offset`).
    pub fn new(seed: u64, offset: u64, row: u32) -> Self {
        RowDraws { row, seed, offset }
    }
    /// The four words of Philox group `g` (tokens `4 g .. 4 g + 4`).
    pub fn block(&self, g: u32) -> [u32; 4] {
        philox4x32_10(
            [g, self.row, self.offset as u32, (self.offset >> 32) as u32],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }
    /// The 32-bit word of index `i` (token `i`, or `SCALAR_GROUPS * 4 + j` for scalar draw `j`).
    pub fn word(&self, i: u64) -> u32 {
        self.block((i / 4) as u32)[(i % 4) as usize]
    }
    /// The uniform of token `t`.
    pub fn token_uniform(&self, t: u32) -> f32 {
        philox_uniform(self.word(u64::from(t)))
    }
    /// Scalar draw `j` of the row (apart from every token's).
    pub fn scalar_uniform(&self, j: u32) -> f32 {
        philox_uniform(self.word(u64::from(SCALAR_GROUPS) * 4 + u64::from(j)))
    }
}

/// The generator's state, (seed, offset), in a two-element buffer on its backend. Every sampling
/// call reads it where the kernel runs and adds 1 to the offset there afterwards (an asynchronous
/// one-thread kernel on a GPU), so calls, and replays of a captured graph, draw fresh numbers.
///
/// Not `Sync`-shared: the calls that use it take it by `&mut` and are ordered on the backend's
/// stream.
#[derive(Debug)]
pub struct SamplerState {
    state: Buffer<u64>,
}

impl SamplerState {
    /// A state on `backend` at (`seed`, offset 0). This allocates (once); the draws do not.
    pub fn new(backend: &Backend, seed: u64) -> Result<Self> {
        Ok(SamplerState {
            state: backend.upload(&[seed, 0])?,
        })
    }
    /// Back to (`seed`, offset 0), keeping the buffer (a captured graph sees the new seed). A host
    /// copy on the stream: not for inside a captured graph.
    pub fn reset(&mut self, seed: u64) -> Result<()> {
        self.state.copy_from(&[seed, 0])
    }
    /// (seed, offset), read back (waits for queued GPU work).
    pub fn read(&self) -> Result<(u64, u64)> {
        match self.state.to_vec()?[..] {
            [seed, offset] => Ok((seed, offset)),
            _ => Err(Error::invalid(
                "sampler state: the buffer lost its two words",
            )),
        }
    }
    pub(crate) fn buffer(&self) -> &Buffer<u64> {
        &self.state
    }
    pub(crate) fn buffer_mut(&mut self) -> &mut Buffer<u64> {
        &mut self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Random123's kat_vectors for philox4x32-10.
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniforms_are_open_and_exact() {
        assert_eq!(philox_uniform(0), 1.0 / (1u32 << 24) as f32);
        assert_eq!(philox_uniform(u32::MAX), 1.0 - 1.0 / (1u32 << 24) as f32);
        for bits in [0u32, 1 << 9, 12345 << 9, u32::MAX] {
            let u = philox_uniform(bits);
            assert!(u > 0.0 && u < 1.0);
            assert_eq!(
                f64::from(u),
                f64::from((bits >> 9) * 2 + 1) / f64::from(1u32 << 24)
            );
        }
    }

    #[test]
    fn cpu_state_round_trips() {
        let mut s = SamplerState::new(&Backend::Cpu, 42).unwrap();
        assert_eq!(s.read().unwrap(), (42, 0));
        s.buffer_mut().host_mut().unwrap()[1] = 7;
        assert_eq!(s.read().unwrap(), (42, 7));
        s.reset(9).unwrap();
        assert_eq!(s.read().unwrap(), (9, 0));
    }
}
