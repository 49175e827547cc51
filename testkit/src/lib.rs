//! A tiny seedable PRNG (SplitMix64) for tests and examples: fresh random inputs on every run, and
//! a printed seed to replay a failure. Not for anything that needs cryptographic quality.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable that [`Rng::from_time`] takes its seed from when it is set.
pub const SEED_ENV: &str = "FERRINFER_SEED";

/// SplitMix64: one 64-bit word of state, full period, good enough statistics for test data.
#[derive(Clone, Debug)]
pub struct Rng {
    seed: u64,
    state: u64,
}

impl Rng {
    /// A generator that always yields the same sequence for the same seed.
    pub fn new(seed: u64) -> Self {
        Rng { seed, state: seed }
    }

    /// A generator with a fresh seed each run (clock and a process-wide counter, so two generators
    /// made in the same nanosecond differ). If `FERRINFER_SEED` is set to an integer, that seed is
    /// used instead, so a failing test can be replayed with the seed it printed.
    pub fn from_time() -> Self {
        if let Some(seed) = std::env::var(SEED_ENV)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Rng::new(seed);
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Mixing through one SplitMix64 step spreads nearby clock values over the whole range.
        let seed = Rng::new(nanos ^ count.rotate_left(32)).next_u64();
        Rng::new(seed)
    }

    /// The seed this generator started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, a multiple of 2^-24 (every value is exact in f32).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Standard normal (mean 0, variance 1), by Box-Muller in f64.
    pub fn normal(&mut self) -> f32 {
        // 53 random bits mapped to (0, 1]: the logarithm never sees 0.
        let u1 = ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// `n` standard normal values.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }

    /// Uniform in `0..n`, without modulo bias (Lemire's method). Panics if `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0): the range is empty");
        let n = n as u64;
        let threshold = n.wrapping_neg() % n;
        loop {
            let wide = u128::from(self.next_u64()) * u128::from(n);
            if (wide as u64) >= threshold {
                return (wide >> 64) as usize;
            }
        }
    }

    /// Shuffle in place (Fisher-Yates), every permutation equally likely.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_eq!(a.seed(), 42);
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn splitmix64_known_values() {
        // First outputs for seed 1234567, from the reference implementation's published sequence.
        let mut r = Rng::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn uniform_and_normal_have_the_right_moments() {
        let mut r = Rng::new(7);
        let n = 20_000;
        let u: Vec<f32> = (0..n).map(|_| r.uniform()).collect();
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean_u = u.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        assert!((mean_u - 0.5).abs() < 0.02, "{mean_u}");
        let z = r.normal_vec(n);
        assert!(z.iter().all(|x| x.is_finite() && *x != 0.0));
        let mean = z.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = z
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }

    #[test]
    fn below_and_shuffle() {
        let mut r = Rng::new(3);
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            seen[r.below(5)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
        let mut xs: Vec<u32> = (0..50).collect();
        r.shuffle(&mut xs);
        assert_ne!(xs, (0..50).collect::<Vec<_>>());
        xs.sort_unstable();
        assert_eq!(xs, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn fresh_seeds_differ() {
        if std::env::var(SEED_ENV).is_err() {
            assert_ne!(Rng::from_time().seed(), Rng::from_time().seed());
        }
    }
}
