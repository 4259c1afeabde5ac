//! Buffers of unspecified contents, handed back after use and taken again by the next step.
//!
//! A training step of the gated stack makes several buffers per layer and image that the
//! products overwrite in full; a fresh `vec![0.0; n]` zero-fills each first (safe Rust cannot
//! hand out uninitialised memory), and that pass and the page traffic behind it cost as much as
//! a small product. The pool keeps the freed buffers by length, so the next step finds its own
//! again. A caller must write every value it later reads (the gated stack's tests run it on
//! buffers filled with NaN).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Values the pool holds at most (1 GiB of f32; a step of the 28x28 gated network at batch 64
/// uses about 300 MB): past that, handed-back buffers are freed.
const MAX_POOLED: usize = 1 << 28;

/// Buffers by length: a step hands back a few thousand, so `take` must not scan them all.
struct Pool {
    bufs: BTreeMap<usize, Vec<Vec<f32>>>,
    held: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { bufs: BTreeMap::new(), held: 0 });

/// A buffer of `len` values whose contents are unspecified (a pooled one, or zeros).
pub(crate) fn take(len: usize) -> Vec<f32> {
    if let Ok(mut pool) = POOL.lock() {
        if let Some(buf) = pool.bufs.get_mut(&len).and_then(Vec::pop) {
            pool.held -= len;
            return buf;
        }
    }
    vec![0f32; len]
}

/// Hands `buf` back for a later [`take`] of its length.
pub(crate) fn give(buf: Vec<f32>) {
    if buf.is_empty() {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        if pool.held + buf.len() <= MAX_POOLED {
            pool.held += buf.len();
            pool.bufs.entry(buf.len()).or_default().push(buf);
        }
    }
}

/// Fills every pooled buffer with `value`, so that a test sees any value read before written.
#[cfg(test)]
pub(crate) fn fill_pooled(value: f32) {
    if let Ok(mut pool) = POOL.lock() {
        pool.bufs.values_mut().flatten().for_each(|b| b.fill(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_handed_back_is_taken_again_by_its_length_only() {
        // A length no other test uses, so that parallel tests do not take it.
        let len = 1_234_567;
        let mut buf = take(len);
        assert_eq!(buf.len(), len);
        buf[7] = 3.5;
        let ptr = buf.as_ptr();
        give(buf);
        assert_eq!(take(len - 1).len(), len - 1);
        let again = take(len);
        assert_eq!((again.as_ptr(), again[7]), (ptr, 3.5));
        give(Vec::new());
    }
}
