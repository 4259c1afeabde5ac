//! Fully connected layers: y = x W + b over the last dimension (a 1x1 convolution on
//! channels-last grids), and the ReLU, 1x1, ReLU, 1x1 output stack of the 2D plugins
//! (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", §3.5 and Table 1).

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use arm_core::Result;

/// PyTorch's default for Linear and Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
pub(crate) fn torch_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// y = x W + b over the last dimension; x (..., in) -> (..., out).
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) w: Tensor, // (in, out)
    pub(crate) b: Tensor, // (out,)
}

pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    let init = torch_uniform(inp);
    Ok(Linear { w: vb.get_with_hints((inp, out), "weight", init)?, b: vb.get_with_hints(out, "bias", init)? })
}

impl Linear {
    /// x W + b, one op.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, None, None)
    }

    /// ReLU(x W + b), one op.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, None, Some(0.0))
    }

    /// LeakyReLU(x W + b) with negative slope `slope`, one op.
    pub fn forward_leaky(&self, x: &Tensor, slope: f64) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, None, Some(slope))
    }

    /// GELU(x W + b), one op.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::dense_gelu(x, &self.w, &self.b)
    }

    /// gate(a) W + b with gate(a) = tanh(a[.., :C]) * sigmoid(a[.., C:]) (a has 2C channels),
    /// the gate running inside this layer's op.
    pub fn forward_gated(&self, a: &Tensor) -> Result<Tensor> {
        arm_kernels::dense_gated(a, &self.w, &self.b, None)
    }

    pub fn out_features(&self) -> Result<usize> {
        self.w.dim(1)
    }
}

/// The output stack of the 2D plugins: ReLU, 1x1, ReLU, 1x1; (..., C) -> (..., P).
#[derive(Debug, Clone)]
pub struct OutputMlp {
    hidden: Linear, // C -> C
    out: Linear,    // C -> P
}

pub fn output_mlp(channels: usize, num_params: usize, vb: VarBuilder) -> Result<OutputMlp> {
    Ok(OutputMlp { hidden: linear(channels, channels, vb.pp("0"))?, out: linear(channels, num_params, vb.pp("1"))? })
}

impl OutputMlp {
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.forward_rectified(&h.relu()?)
    }

    /// The same from ReLU(h), where the layer before applied it.
    pub fn forward_rectified(&self, r: &Tensor) -> Result<Tensor> {
        let h = self.hidden.forward_relu(r)?; // (..., C), the second ReLU inside the op
        self.out.forward(&h) // (..., P)
    }
}
