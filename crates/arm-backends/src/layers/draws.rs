//! Which ensemble member a training pass uses (MADE's mask sets, the orderings of an
//! order-agnostic network): one draw per pass from a seeded stream re-seeded per epoch, so a
//! run resumed at an epoch draws the same members as an uninterrupted one.

use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct MemberDraws {
    rng: Mutex<ChaCha8Rng>,
    /// seed ^ salt: the stream's key.
    key: u64,
}

impl MemberDraws {
    /// Draws for a run seeded with `seed`; `salt` keeps the stream apart from the run's others.
    pub fn new(seed: u64, salt: u64) -> Self {
        MemberDraws { rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ salt)), key: seed ^ salt }
    }

    /// Restarts the stream of `epoch`.
    pub fn begin_epoch(&self, epoch: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.key);
        rng.set_stream(epoch as u64);
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = rng;
    }

    /// The member of `n` a pass uses: a draw in training, member 0 in evaluation.
    pub fn member(&self, n: usize, train: bool) -> usize {
        if train && n > 1 {
            self.rng.lock().unwrap_or_else(|e| e.into_inner()).random_range(0..n)
        } else {
            0
        }
    }
}
