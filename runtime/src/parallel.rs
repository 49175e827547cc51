//! A parallel map over a slice on scoped threads: the CPU reference and the variant check use it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `f` of every job, in job order, computed on up to `max_threads` threads (at most one per core;
/// inline when that is one). Jobs are handed out one at a time, so uneven ones balance.
pub(crate) fn map<J: Sync, R: Send>(
    jobs: &[J],
    max_threads: usize,
    f: impl Fn(&J) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(max_threads)
        .min(jobs.len());
    if threads <= 1 {
        return jobs.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(j) else { break mine };
                        mine.push((j, f(job)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    done.sort_by_key(|(j, _)| *j);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_come_back_in_job_order() {
        let jobs: Vec<u64> = (0..1000).collect();
        let out = super::map(&jobs, 4, |&j| j * j);
        assert_eq!(out, jobs.iter().map(|j| j * j).collect::<Vec<_>>());
        assert!(super::map(&[] as &[u8], 4, |&x| x).is_empty());
    }
}
