//! `fvsbn`: the fully visible sigmoid belief network (Neal 1992; Frey et al. 1996, "Does the
//! wake-sleep algorithm produce good density estimators?"), the logistic-regression ARM:
//! every pixel's head parameters are an affine function of all earlier pixels,
//!
//!   params_d = b_d + sum_{j<d} W_{j,d} x_j,
//!
//! one masked linear layer (W strictly lower-triangular over positions), with any number of
//! levels through the head (sigmoid for 2 levels with the categorical head's softmax, a
//! softmax or a logistic mixture otherwise). D(D-1)/2 x P weights.
//!
//! The cached stepper keeps the running sums b + sum_{j<d} W_{j,.} x_j: one row of W per pixel.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};

use crate::layers::{masked_linear, MaskedLinear};
use crate::registry::{BuildCtx, PluginConfig, PluginError};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

/// FVSBN has no settings: its size follows from the image and the head.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FvsbnConfig {}

/// The mask of W: input j feeds the P parameters of every later position d > j.
fn strictly_lower(d: usize, p: usize) -> Vec<f32> {
    (0..d).flat_map(|j| (0..d * p).map(move |o| f32::from(o / p > j))).collect()
}

impl PluginConfig for FvsbnConfig {
    const NAME: &'static str = "fvsbn";
    const SUMMARY: &'static str = "fully visible sigmoid belief net: logistic regression on all earlier pixels";

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        let (d, p) = (ctx.dims(), ctx.num_params);
        let linear = masked_linear(d, d * p, &[strictly_lower(d, p)], ctx.vb.pp("linear"))?;
        Ok(Box::new(Fvsbn { linear, dims: d, params: p, device: ctx.device }))
    }

    fn test_configs() -> Vec<Self> {
        vec![Self {}]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[]
    }
}

pub struct Fvsbn {
    linear: MaskedLinear, // (D, D P)
    dims: usize,
    params: usize,
    device: Device,
}

impl Conditional for Fvsbn {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let (b, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("fvsbn: input has {d} positions, built for {}", self.dims);
        }
        self.linear.forward(x, 0, false)?.reshape((b, d, self.params)) // (B, D, P)
    }

    fn seq_len(&self) -> usize {
        self.dims
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn flops_per_image(&self) -> Option<f64> {
        Some(2.0 * (self.dims * self.dims * self.params) as f64)
    }

    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        Ok(Box::new(FvsbnStepper { net: self, pos: 0, acc: self.linear.bias_rows(batch)? }))
    }
}

/// Cached generation: acc = b + sum_{j<pos} x_j W_{j,.}, (B, D P).
struct FvsbnStepper<'a> {
    net: &'a Fvsbn,
    pos: usize,
    acc: Tensor,
}

impl Stepper for FvsbnStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if self.pos >= self.net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", self.net.dims);
        }
        self.acc.narrow(1, self.pos * self.net.params, self.net.params) // (B, P)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        self.acc = self.net.linear.add_input(&self.acc, &x_d.flatten_all()?, self.pos, 0)?;
        self.pos += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use arm_core::seeded_var_builder;
    use candle_nn::VarMap;

    #[test]
    fn the_mask_is_strictly_lower_and_breaking_it_fails_the_checks() -> Result<()> {
        // D = 3, P = 1: input j feeds outputs d > j.
        assert_eq!(strictly_lower(3, 1), vec![0., 1., 1., 0., 0., 1., 0., 0., 0.]);
        let map = VarMap::new();
        let ctx = BuildCtx {
            vb: seeded_var_builder(&map, 1, &Device::Cpu),
            device: Device::Cpu,
            height: 2,
            width: 2,
            num_params: 3,
            levels: 5,
            seed: 1,
            order: None,
            cond_dim: 0,
        };
        let (d, p) = (4, 3);
        let mut net = Fvsbn {
            linear: masked_linear(d, d * p, &[strictly_lower(d, p)], ctx.vb.pp("linear"))?,
            dims: d,
            params: p,
            device: Device::Cpu,
        };
        conformance::causality(&net, 2, false, true).map_err(candle_core::Error::msg)?;
        net.linear.force_connect(0, 2, 2 * p)?; // input 2 -> the parameters of pixel 2 itself
        let e = conformance::causality(&net, 2, false, true).expect_err("a broken mask passed");
        assert!(e.contains("row 2 changed when input 2 changed"), "{e}");
        Ok(())
    }
}
