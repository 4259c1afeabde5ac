//! What the trainer trains: a model with a training loss and an evaluation figure. An `Arm`
//! is one (the exact NLL); so is a latent-variable model (a bound, `arm-vae`).

use candle_core::{Device, Tensor};

use arm_core::Arm;

/// What the trainer trains: an ARM (the exact NLL) or a latent-variable model (a bound).
pub trait Model: Sync {
    fn device(&self) -> &Device;
    /// Re-seeds the model's training-time randomness (dropout, a VAE's latent draws) from
    /// (seed, epoch), so a resumed run draws what an uninterrupted one would.
    fn begin_epoch(&self, epoch: usize);
    /// The scalar training loss of a batch in `epoch` (1-based), nats per image.
    fn loss(&self, x: &Tensor, epoch: usize) -> candle_core::Result<Tensor>;
    /// (B,) log p(x) per image in evaluation mode, or a lower bound of it; deterministic.
    fn eval_log_prob(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

impl Model for Arm {
    fn device(&self) -> &Device {
        Arm::device(self)
    }
    fn begin_epoch(&self, epoch: usize) {
        self.conditional().begin_epoch(epoch);
    }
    fn loss(&self, x: &Tensor, _epoch: usize) -> candle_core::Result<Tensor> {
        self.nll(x, true)
    }
    fn eval_log_prob(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.log_prob(x)
    }
}
