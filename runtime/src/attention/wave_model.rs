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

use std::collections::BTreeMap;

/// A CTA's start, in keys of streaming: its dependent loads before the first K/V byte. Measured
/// (H200, the narrow tile, b64 l4096 split into 384-key items, 4.3 items a CTA): 7.4% over the
/// same bytes in one item each, so 28 keys an item.
pub(crate) const START_KEYS: u64 = 28;

/// The predicted time of a work list given as `(keys, items)` groups (longest first: `items`
/// items of `keys` keys each), run on `slots` CTAs of which `saturating` fill HBM, in keys
/// streamed by one CTA alone. Items that start together and are as long end together, so the
/// simulation steps through groups of them, not items: a plan calls this for a few splits.
pub(crate) fn predicted_time(groups: &[(u64, u64)], slots: u64, saturating: f64) -> f64 {
    debug_assert!(
        groups.windows(2).all(|w| w[0].0 > w[1].0),
        "longest first, merged"
    );
    // Every running item advances by the same amount, so items are kept by the progress at
    // which they end.
    let mut running: BTreeMap<u64, u64> = BTreeMap::new();
    let mut queue = groups.iter().copied().filter(|&(_, n)| n > 0);
    let mut head: Option<(u64, u64)> = queue.next();
    let (mut active, mut progress, mut time) = (0u64, 0u64, 0.0f64);
    // Start up to `free` queued items at `progress`.
    let mut start =
        |free: u64, progress: u64, running: &mut BTreeMap<u64, u64>, active: &mut u64| {
            let mut free = free;
            while free > 0 {
                let Some((keys, n)) = head else { break };
                let m = n.min(free);
                *running.entry(progress + keys + START_KEYS).or_default() += m;
                *active += m;
                free -= m;
                head = if m < n {
                    Some((keys, n - m))
                } else {
                    queue.next()
                };
            }
        };
    start(slots.max(1), 0, &mut running, &mut active);
    while let Some((end, n)) = running.pop_first() {
        let rate = (saturating / active as f64).min(1.0);
        time += (end - progress) as f64 / rate;
        progress = end;
        active -= n;
        start(n, progress, &mut running, &mut active);
    }
    time
}

/// `(keys, items)` groups of `items` items of `keys` each, merged and longest first.
pub(crate) fn groups(mut items: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    items.sort_unstable_by_key(|&(keys, _)| std::cmp::Reverse(keys));
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(items.len());
    for (keys, n) in items {
        match out.last_mut() {
            Some(last) if last.0 == keys => last.1 += n,
            _ => out.push((keys, n)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wave_over_saturation_streams_at_the_shared_rate() {
        // 100 equal items, all resident, 50 saturate: each at half speed.
        let t = predicted_time(&[(1000, 100)], 128, 50.0);
        assert!((t - 2.0 * (1000 + START_KEYS) as f64).abs() < 1e-6, "{t}");
        // Under saturation each streams alone.
        let t = predicted_time(&[(1000, 10)], 128, 50.0);
        assert!((t - (1000 + START_KEYS) as f64).abs() < 1e-6, "{t}");
    }

    #[test]
    fn the_long_items_of_a_skewed_batch_end_alone() {
        // 10 long and 90 short on 100 slots, 50 saturating: the short ones end at 2 x 500, the
        // long ones then stream alone (10 < 50) for their last 500.
        let keys = groups(vec![(500 - START_KEYS, 90), (1000 - START_KEYS, 10)]);
        assert_eq!(keys, [(1000 - START_KEYS, 10), (500 - START_KEYS, 90)]);
        let t = predicted_time(&keys, 100, 50.0);
        assert!((t - (2.0 * 500.0 + 500.0)).abs() < 1e-6, "{t}");
        // The same keys in equal items take the shared rate to the end: less time.
        let even = [(550 - START_KEYS, 100)];
        assert!(predicted_time(&even, 100, 50.0) < t);
    }

    #[test]
    fn a_second_wave_starts_as_the_first_ends() {
        // 4 items on 2 slots that each stream alone: two rounds.
        let t = predicted_time(&[(100, 4)], 2, 2.0);
        assert!((t - 2.0 * (100 + START_KEYS) as f64).abs() < 1e-6, "{t}");
        // A group split across the wave's end: 3 of 5 start, the other 2 as the first end.
        let t = predicted_time(&[(100, 5)], 3, 3.0);
        assert!((t - 2.0 * (100 + START_KEYS) as f64).abs() < 1e-6, "{t}");
        // Groups merge as equal lengths meet.
        assert_eq!(groups(vec![(5, 1), (7, 2), (5, 3)]), [(7, 2), (5, 4)]);
    }
}
