//! Wall-clock time per named phase of the fused ops, for `runner bench train --profile`.
//! Off by default: a disabled [`scope`] costs one relaxed atomic load. Phases nest (a gemm
//! inside a layer's backward counts in both), so the table is read per line, not summed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Starts recording afresh, or stops (keeping what was recorded).
pub fn enable(on: bool) {
    if on {
        if let Ok(mut t) = TOTALS.lock() {
            t.clear();
        }
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// A running phase: its time is added to `name` when dropped.
pub struct Scope {
    name: &'static str,
    t0: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let dt = self.t0.elapsed().as_secs_f64();
        if let Ok(mut t) = TOTALS.lock() {
            let e = t.entry(self.name).or_insert((0.0, 0));
            e.0 += dt;
            e.1 += 1;
        }
    }
}

/// Times the rest of the enclosing block as `name` while recording is on.
#[must_use = "the phase ends when the scope is dropped"]
pub fn scope(name: &'static str) -> Option<Scope> {
    ENABLED.load(Ordering::Relaxed).then(|| Scope { name, t0: Instant::now() })
}

/// (name, total seconds, calls) of every phase recorded since [`enable`], by name.
pub fn totals() -> Vec<(&'static str, f64, u64)> {
    TOTALS.lock().map(|t| t.iter().map(|(k, v)| (*k, v.0, v.1)).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_add_up_only_while_enabled() {
        enable(true);
        for _ in 0..3 {
            let _s = scope("test.phase");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        enable(false);
        {
            let _s = scope("test.off");
        }
        // Read before anything else can clear it: other tests of this crate do not profile.
        let t = totals();
        let phase = t.iter().find(|(n, ..)| *n == "test.phase").expect("phase recorded");
        assert_eq!(phase.2, 3);
        assert!(phase.1 >= 0.006, "three 2 ms sleeps, got {} s", phase.1);
        assert!(t.iter().all(|(n, ..)| *n != "test.off"));
    }
}
