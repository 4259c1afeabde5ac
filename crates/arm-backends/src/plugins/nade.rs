//! `nade`: the neural autoregressive distribution estimator (Larochelle & Murray 2011, eq. 3-4),
//! with the head's parameters in place of the Bernoulli mean, so any number of levels works:
//!
//!   a_d = c + W_{.,<d} x_{<d},   h_d = sigmoid(a_d),   params_d = V_d h_d + b_d.
//!
//! W (one H-vector per input position) and c are shared by every conditional; a_d is a running
//! sum, so the forward pass is O(D H) plus the D output maps (h_d for every d is one op,
//! `layers::running_sigmoid`). The cached stepper is the paper's own recursion:
//! a_{d+1} = a_d + x_d W_d, O(H P) per pixel.
//! Left out: the paper's weight-tying variants and its ordering-agnostic follow-ups.

use candle_core::{DType, Device, Tensor};
use candle_nn::ops::sigmoid;
use candle_nn::Init;
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};

use crate::layers::running_sigmoid;
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NadeConfig {
    /// H: hidden units.
    pub hidden: usize,
}

impl Default for NadeConfig {
    /// The paper's size for binarised MNIST.
    fn default() -> Self {
        Self { hidden: 500 }
    }
}

impl PluginConfig for NadeConfig {
    const NAME: &'static str = "nade";
    const SUMMARY: &'static str = "NADE: shared input weights, running hidden pre-activation, O(DH)";

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if self.hidden == 0 {
            return Err(invalid("hidden", "must be at least 1, got 0"));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        let (d, hd, p) = (ctx.dims(), self.hidden, ctx.num_params);
        // PyTorch's Linear default for the fan-ins of the two maps (D inputs, H hidden units).
        let u = |fan_in: usize| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Init::Uniform { lo: -bound, up: bound }
        };
        Ok(Box::new(Nade {
            w: ctx.vb.get_with_hints((d, hd), "w", u(d))?,
            c: ctx.vb.get_with_hints(hd, "c", u(d))?,
            v: ctx.vb.get_with_hints((d, hd, p), "v", u(hd))?,
            b: ctx.vb.get_with_hints((d, p), "b", u(hd))?,
            dims: d,
            device: ctx.device,
        }))
    }

    fn test_configs() -> Vec<Self> {
        vec![Self { hidden: 1 }, Self { hidden: 5 }]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[("hidden", "H: hidden units shared by every conditional")]
    }
}

pub struct Nade {
    w: Tensor, // (D, H): row j is input j's contribution
    c: Tensor, // (H,)
    v: Tensor, // (D, H, P)
    b: Tensor, // (D, P)
    dims: usize,
    device: Device,
}

impl Nade {
    /// params_d = V_d h_d + b_d for every position: h (D, B, H) -> (B, D, P).
    fn outputs(&self, h: &Tensor) -> Result<Tensor> {
        let y = h.matmul(&self.v)?; // (D, B, P): one (B, H) x (H, P) product per position
        y.transpose(0, 1)?.broadcast_add(&self.b.unsqueeze(0)?) // (B, D, P)
    }
}

impl Conditional for Nade {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("nade: input has {d} positions, built for {}", self.dims);
        }
        let h = running_sigmoid(x, &self.w, &self.c)?; // (B, D, H): h_d = sigmoid(a_d)
        self.outputs(&h.transpose(0, 1)?.contiguous()?) // (B, D, P)
    }

    fn seq_len(&self) -> usize {
        self.dims
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn flops_per_image(&self) -> Option<f64> {
        let (d, hd, p) = self.v.dims3().unwrap_or((0, 0, 0));
        // x_j W_j and the running sum (2 D H), and the D output maps (2 D H P).
        Some(2.0 * (d * hd) as f64 + 2.0 * (d * hd * p) as f64)
    }

    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        let a = self.c.unsqueeze(0)?.broadcast_as((batch, self.c.dim(0)?))?.contiguous()?;
        Ok(Box::new(NadeStepper { net: self, pos: 0, a }))
    }
}

/// Cached generation: a = c + sum_{j<pos} x_j W_j, (B, H).
struct NadeStepper<'a> {
    net: &'a Nade,
    pos: usize,
    a: Tensor,
}

impl Stepper for NadeStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if self.pos >= self.net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", self.net.dims);
        }
        let h = sigmoid(&self.a)?; // (B, H)
        let v = self.net.v.get(self.pos)?; // (H, P)
        h.matmul(&v)?.broadcast_add(&self.net.b.get(self.pos)?) // (B, P)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        let x = x_d.to_dtype(DType::F32)?.flatten_all()?.unsqueeze(1)?; // (B, 1)
        self.a = (&self.a + x.broadcast_mul(&self.net.w.get(self.pos)?.unsqueeze(0)?)?)?;
        self.pos += 1;
        Ok(())
    }
}
