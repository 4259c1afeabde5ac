//! Inverted dropout (Srivastava et al. 2014) whose masks come from a seeded ChaCha8 stream
//! (candle's CPU RNG cannot be seeded), re-seeded per epoch so that a resumed run draws the
//! masks an uninterrupted one would.

use std::sync::Mutex;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use arm_core::Result;

/// Mixed into the seed so that dropout's stream differs from the weights' (0xD80F0).
const SALT: u64 = 0x000D_80F0;

#[derive(Debug)]
pub struct Dropout {
    p: f64,
    seed: u64,
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        let seed = seed ^ SALT;
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
    /// Unit i is kept when the i-th uniform draw u_i = (w_i >> 11) 2^-53 of the stream's 64-bit
    /// words w_i is below 1 - p (rand's f64 draw); the words are generated a block at a time.
    pub fn mask(&self, shape: &candle_core::Shape, device: &candle_core::Device) -> Result<Tensor> {
        let keep = 1.0 - self.p;
        let (scale, unit) = ((1.0 / keep) as f32, 1.0 / (1u64 << 53) as f64);
        let mut words = vec![0u64; shape.elem_count()];
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).fill(&mut words[..]);
        let mask: Vec<f32> = words.iter().map(|&w| if ((w >> 11) as f64) * unit < keep { scale } else { 0.0 }).collect();
        Tensor::from_vec(mask, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The block-drawn masks equal masks drawn one `random::<f64>()` at a time from the same
    /// stream (so runs made before this change keep their masks), across consecutive masks of
    /// odd sizes and after re-seeding.
    #[test]
    fn masks_equal_one_draw_per_unit() -> Result<()> {
        let d = Dropout::new(0.3, 11);
        let mut reference = ChaCha8Rng::seed_from_u64(11 ^ SALT);
        for (epoch, sizes) in [(None, vec![1usize, 7, 1000, 33]), (Some(4usize), vec![5, 64])] {
            if let Some(e) = epoch {
                d.begin_epoch(e);
                reference = ChaCha8Rng::seed_from_u64(11 ^ SALT);
                reference.set_stream(e as u64);
            }
            for n in sizes {
                let got = d.mask(&n.into(), &Device::Cpu)?.to_vec1::<f32>()?;
                let want: Vec<f32> =
                    (0..n).map(|_| if reference.random::<f64>() < 0.7 { (1.0 / 0.7f64) as f32 } else { 0.0 }).collect();
                assert_eq!(got, want, "mask of {n} units");
            }
        }
        Ok(())
    }
}
