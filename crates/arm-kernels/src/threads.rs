//! Where small work runs. A parallel region called from outside rayon's pool hands its halves
//! to pool threads and waits for them; for the tiny products of one cached sampling step that
//! hand-off costs more than the work (PERF.md, "One stepper per thread").
//! [`on_own_threads`] runs independent parts of such a loop (a sampler's batch) at the same
//! time, each on a pool of a single thread, so every parallel region inside runs in place.
//! Results do not depend on it: a forward product splits its output, not its sums, between
//! threads (only weight gradients split sums, and sampling computes none).

use std::sync::OnceLock;

/// Pools of one thread each, as many as candle uses threads, built on first use.
fn pools() -> &'static [rayon::ThreadPool] {
    static POOLS: OnceLock<Vec<rayon::ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        (0..candle_core::utils::get_num_threads().max(1))
            .map_while(|i| {
                rayon::ThreadPoolBuilder::new().num_threads(1).thread_name(move |_| format!("arm-one-{i}")).build().ok()
            })
            .collect()
    })
}

/// How many [`on_own_threads`] runs at once (at least 1).
pub fn own_threads() -> usize {
    pools().len().max(1)
}

/// Runs `f(0)`, ..., `f(n - 1)` on pools of one thread each, up to [`own_threads`] at the same
/// time (part i on pool i mod that), where every parallel region inside `f` runs in place: for
/// loops of calls too small to share, split into independent parts instead (a sampler's
/// batch). With no pools (they could not be built) the parts run here in turn.
pub fn on_own_threads<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let pools = pools();
    if pools.is_empty() {
        return (0..n).map(&f).collect();
    }
    let lanes = pools.len().min(n);
    if lanes == 0 {
        return Vec::new();
    }
    let f = &f;
    let lane = move |l: usize| pools[l].install(|| (l..n).step_by(lanes).map(|i| (i, f(i))).collect::<Vec<_>>());
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..lanes).map(|l| s.spawn(move || lane(l))).collect();
        let mut out = lane(0);
        for h in handles {
            out.extend(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        out
    });
    done.sort_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Whether the pool this code runs on has one thread (then the gemm runs unthreaded).
pub(crate) fn single() -> bool {
    rayon::current_num_threads() <= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_part_runs_its_parallel_regions_on_one_worker_of_its_own() {
        use rayon::prelude::*;
        let here = std::thread::current().id();
        let lanes = own_threads();
        let n = 2 * lanes + 1;
        let parts = on_own_threads(n, |i| {
            let ids: std::collections::HashSet<_> =
                (0..64).into_par_iter().map(|_| std::thread::current().id()).collect();
            (i, single(), ids)
        });
        assert_eq!(parts.len(), n);
        let mut lane_ids = vec![std::collections::HashSet::new(); lanes];
        for (k, (i, is_single, ids)) in parts.into_iter().enumerate() {
            assert_eq!(i, k, "parts come back in order");
            assert!(is_single);
            assert_eq!(ids.len(), 1, "part {i} ran on one worker");
            assert!(!ids.contains(&here), "the worker is not the calling thread");
            lane_ids[i % lanes].extend(ids);
        }
        let all: std::collections::HashSet<_> = lane_ids.iter().flatten().collect();
        assert!(lane_ids.iter().all(|l| l.len() == 1), "a lane keeps its worker");
        assert_eq!(all.len(), lanes, "every lane has a worker of its own");
        assert!(on_own_threads(0, |i| i).is_empty());
    }
}
