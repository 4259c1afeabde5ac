//! Likelihood heads: turn per-pixel parameters into log-probabilities and samples.

pub mod categorical;

use candle_core::Tensor;

use crate::Result;

/// A per-pixel likelihood over the levels 0..K.
pub trait Head: Send + Sync {
    /// Name used in experiment files.
    fn name(&self) -> &'static str;
    /// Number of parameters per pixel, P.
    fn num_params(&self) -> usize;
    /// Uniform noise values needed to draw one pixel.
    fn noise_dim(&self) -> usize;
    /// params (..., P), x (...) integer levels as f32 -> log p(x) in nats, shape (...).
    fn log_prob(&self, params: &Tensor, x: &Tensor) -> Result<Tensor>;
    /// params (N, P), noise (N, noise_dim) uniform in [0, 1) -> levels (N,) as f32.
    /// Deterministic given the noise, so every sampler gives identical samples.
    fn sample(&self, params: &Tensor, noise: &Tensor) -> Result<Tensor>;
}

/// Names accepted by `head = "..."`.
pub fn head_names() -> &'static [&'static str] {
    &["categorical"]
}
