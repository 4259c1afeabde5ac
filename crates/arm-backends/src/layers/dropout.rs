//! Inverted dropout (Srivastava et al. 2014) whose masks come from a seeded ChaCha8 stream
//! (candle's CPU RNG cannot be seeded), re-seeded per epoch so that a resumed run draws the
//! masks an uninterrupted one would.

use std::sync::Mutex;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use arm_core::Result;

#[derive(Debug)]
pub struct Dropout {
    p: f64,
    seed: u64,
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        let seed = seed ^ 0xD80F_0u64;
        Self { p, seed, rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) }
    }

    /// Restarts the mask stream at `epoch` (one ChaCha8 stream per epoch).
    pub fn begin_epoch(&self, epoch: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch as u64);
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = rng;
    }

    /// Whether [`Self::forward_t`] changes anything (training with p > 0).
    pub fn active(&self, train: bool) -> bool {
        train && self.p > 0.0
    }

    /// x * mask / (1 - p) in training, x otherwise.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !self.active(train) {
            return Ok(x.clone());
        }
        x.mul(&self.mask(x.shape(), x.device())?.to_dtype(x.dtype())?)
    }

    /// The next mask of `shape`: 1 / (1 - p) where a unit is kept, 0 where it is dropped.
    pub fn mask(&self, shape: &candle_core::Shape, device: &candle_core::Device) -> Result<Tensor> {
        let keep = 1.0 - self.p;
        let n = shape.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..n).map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect()
        };
        Tensor::from_vec(mask, shape, device)
    }
}
