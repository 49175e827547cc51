//! How long a decode's work list takes on a wave of CTAs, as the plan predicts it to choose
//! between the 16-row tile's two K/V tiles (plan.rs, `take_narrow_tile`).
//!
//! A decode CTA is bound by memory latency: alone it streams at a fixed rate (its bytes in flight
//! over the latency), and HBM saturates at `saturating` such CTAs, past which they share it. So
//! with `active` CTAs running each streams at `min(1, saturating / active)` of its rate alone.
//! Items start in list order (longest first, as the hardware hands out CTAs) on `slots` resident
//! CTAs, each also paying a start ([`START_KEYS`]: its work item, page ids and first tile are
//! dependent loads). Time is in keys streamed by one CTA alone. A skewed batch is where this
//! differs from counting waves: its short items end early, and its long ones then run on too
//! few CTAs to fill HBM.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A CTA's start, in keys of streaming: its dependent loads before the first K/V byte. Measured
/// (H200, the narrow tile, b64 l4096 split into 384-key items, 4.3 items a CTA): 7.4% over the
/// same bytes in one item each, so 28 keys an item.
pub(crate) const START_KEYS: u64 = 28;

/// The predicted time of items of `keys` each (sorted longest first), run on `slots` CTAs of
/// which `saturating` fill HBM, in keys streamed by one CTA alone.
pub(crate) fn predicted_time(keys: &[u64], slots: u64, saturating: f64) -> f64 {
    debug_assert!(keys.windows(2).all(|w| w[0] >= w[1]), "longest first");
    let slots = slots.max(1) as usize;
    // Every running item advances by the same amount, so each is kept as the progress at which
    // it ends; the next to end is the heap's least.
    let mut running = BinaryHeap::with_capacity(slots.min(keys.len()));
    let mut queue = keys.iter();
    for &k in queue.by_ref().take(slots) {
        running.push(Reverse(k + START_KEYS));
    }
    let (mut progress, mut time) = (0u64, 0.0f64);
    while let Some(Reverse(end)) = running.pop() {
        let active = running.len() + 1;
        let rate = (saturating / active as f64).min(1.0);
        time += (end - progress) as f64 / rate;
        progress = end;
        if let Some(&k) = queue.next() {
            running.push(Reverse(progress + k + START_KEYS));
        }
    }
    time
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wave_over_saturation_streams_at_the_shared_rate() {
        // 100 equal items, all resident, 50 saturate: each at half speed.
        let t = predicted_time(&[1000; 100], 128, 50.0);
        assert!((t - 2.0 * (1000 + START_KEYS) as f64).abs() < 1e-6, "{t}");
        // Under saturation each streams alone.
        let t = predicted_time(&[1000; 10], 128, 50.0);
        assert!((t - (1000 + START_KEYS) as f64).abs() < 1e-6, "{t}");
    }

    #[test]
    fn the_long_items_of_a_skewed_batch_end_alone() {
        // 10 long and 90 short on 100 slots, 50 saturating: the short ones end at 2 x 500, the
        // long ones then stream alone (10 < 50) for their last 500.
        let mut keys = vec![1000u64 - START_KEYS; 10];
        keys.extend([500u64 - START_KEYS; 90]);
        let t = predicted_time(&keys, 100, 50.0);
        assert!((t - (2.0 * 500.0 + 500.0)).abs() < 1e-6, "{t}");
        // The same keys in equal items take the shared rate to the end: less time.
        let even = vec![550u64 - START_KEYS; 100];
        assert!(predicted_time(&even, 100, 50.0) < t);
    }

    #[test]
    fn a_second_wave_starts_as_the_first_ends() {
        // 4 items on 2 slots that each stream alone: two rounds.
        let t = predicted_time(&[100; 4], 2, 2.0);
        assert!((t - 2.0 * (100 + START_KEYS) as f64).abs() < 1e-6, "{t}");
    }
}
