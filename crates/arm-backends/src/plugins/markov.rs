//! `markov`: the worked example of the plugin guide (README, "Adding a conditional plugin").
//! A first-order, position-dependent model: the parameters of pixel d are
//! a_d + x_{d-1} * b_d (x_{-1} = 0), one (a_d, b_d) pair of P-vectors per position; the
//! non-parametric cousin of Frey et al. 1996 "logistic autoregressive" networks restricted to
//! one predecessor. Small enough to read in a minute, and a useful floor in NLL tables.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};

use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

/// Config: every key has a default (`serde(default)`), unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarkovConfig {
    /// Scale of the initial weights.
    pub init_scale: f64,
}

impl Default for MarkovConfig {
    fn default() -> Self {
        Self { init_scale: 0.1 }
    }
}

impl PluginConfig for MarkovConfig {
    const NAME: &'static str = "markov";
    const SUMMARY: &'static str = "first-order position-dependent model (the plugin-guide example)";

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if !(self.init_scale.is_finite() && self.init_scale >= 0.0) {
            return Err(invalid("init_scale", format!("must be a finite number >= 0, got {}", self.init_scale)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        let (d, p) = (ctx.dims(), ctx.num_params);
        let init = candle_nn::Init::Uniform { lo: -self.init_scale, up: self.init_scale };
        let a = ctx.vb.get_with_hints((d, p), "a", init)?; // (D, P)
        let b = ctx.vb.get_with_hints((d, p), "b", init)?; // (D, P)
        Ok(Box::new(Markov { a, b, device: ctx.device }))
    }

    fn test_configs() -> Vec<Self> {
        vec![Self { init_scale: 0.5 }]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[("init_scale", "initial weights are uniform in [-init_scale, init_scale]")]
    }
}

pub struct Markov {
    a: Tensor,
    b: Tensor,
    device: Device,
}

impl Conditional for Markov {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let (bsz, d) = x.dims2()?;
        // Shift right by one: position d sees x_{d-1}, position 0 sees 0.
        let prev = Tensor::cat(&[&Tensor::zeros((bsz, 1), x.dtype(), x.device())?, &x.narrow(1, 0, d - 1)?], 1)?; // (B, D)
        let out = prev.unsqueeze(2)?.broadcast_mul(&self.b.unsqueeze(0)?)?; // (B, D, P)
        out.broadcast_add(&self.a.unsqueeze(0)?)
    }

    fn seq_len(&self) -> usize {
        self.a.dims()[0]
    }

    fn device(&self) -> &Device {
        &self.device
    }

    /// Cached: only the last pixel is needed.
    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        Ok(Box::new(MarkovStepper {
            net: self,
            pos: 0,
            prev: Tensor::zeros((batch, 1), candle_core::DType::F32, &self.device)?,
        }))
    }
}

struct MarkovStepper<'a> {
    net: &'a Markov,
    pos: usize,
    prev: Tensor, // (B, 1)
}

impl Stepper for MarkovStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        let a = self.net.a.narrow(0, self.pos, 1)?; // (1, P)
        let b = self.net.b.narrow(0, self.pos, 1)?; // (1, P)
        self.prev.broadcast_mul(&b)?.broadcast_add(&a) // (B, P)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        self.prev = x_d.reshape((x_d.elem_count(), 1))?;
        self.pos += 1;
        Ok(())
    }
}
