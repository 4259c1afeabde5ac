//! Layer normalisation (Ba et al. 2016, "Layer Normalization", eq. 4) over the last dimension:
//!
//!   y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta,
//!
//! with the biased variance, as PyTorch's `LayerNorm`: one op of `arm-kernels` with its
//! backward (candle-nn's own `LayerNorm` runs a fused op without a backward on contiguous
//! inputs, and composed from candle ops its backward cost four times the forward).

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use arm_core::Result;

/// PyTorch's default epsilon.
const EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    gamma: Tensor, // (C,)
    beta: Tensor,  // (C,)
}

/// A layer normalisation of `size` features, starting as the identity map (gamma 1, beta 0).
pub fn layer_norm(size: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        gamma: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
        beta: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
    })
}

impl LayerNorm {
    /// x (..., C) -> (..., C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::layer_norm(x, &self.gamma, &self.beta, EPS)
    }

    /// (gamma, beta), for ops that normalise inside.
    pub(crate) fn params(&self) -> (&Tensor, &Tensor) {
        (&self.gamma, &self.beta)
    }

    pub(crate) fn eps(&self) -> f64 {
        EPS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn normalises_each_row() -> Result<()> {
        let map = candle_nn::VarMap::new();
        let ln = layer_norm(4, candle_nn::VarBuilder::from_varmap(&map, candle_core::DType::F32, &Device::Cpu))?;
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [2., 2., 2., 6.]], &Device::Cpu)?;
        // torch.nn.functional.layer_norm(torch.tensor([[1., 2, 3, 4], [2, 2, 2, 6]]), (4,))
        let want = [[-1.3416f32, -0.4472, 0.4472, 1.3416], [-0.5773, -0.5773, -0.5773, 1.7320]];
        let got = ln.forward(&x)?.to_vec2::<f32>()?;
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-3, "{got:?}");
        }
        Ok(())
    }
}
