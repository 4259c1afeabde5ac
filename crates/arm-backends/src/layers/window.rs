//! The finite-memory window of an ARM (Tomczak, "Deep Generative Modeling", §2.2.1): at every
//! position d of a sequence, the m previous values x_{d-1}, ..., x_{d-m}, newest first, zero
//! before the start.

use candle_core::Tensor;

use arm_core::Result;
use arm_kernels::Unfold;

#[derive(Debug, Clone)]
pub struct Window {
    unfold: Unfold,
}

/// The window of `memory` values over sequences of length `len`.
pub fn window(memory: usize, len: usize) -> Window {
    let taps = (0..memory).map(|t| (0isize, -(t as isize) - 1)).collect();
    Window { unfold: Unfold { height: 1, width: len, taps, mask: None } }
}

impl Window {
    /// x (B, D) -> (B, D, m).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.unfold.apply(&x.unsqueeze(2)?)
    }
}
