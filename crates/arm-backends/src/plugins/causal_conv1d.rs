//! `causal_conv1d`: a stack of dilated causal Conv1d layers (WaveNet, van den Oord et al. 2016,
//! §2.1-2.2), the network of Tomczak's "Deep Generative Modeling", ch. 2 (ARM with causal
//! convolutions). The first layer is option A (it cannot see the current pixel), the rest
//! option B; LeakyReLU (and optional dropout) between layers; the last layer outputs the head's
//! P parameters. Depth is the length of `dilations`.
//!
//!   h_1 = LeakyReLU(conv_A(x)),  h_l = LeakyReLU(conv_B,l(h_{l-1})),  params = conv_B,L(h_{L-1})
//!
//! The cached stepper keeps every layer's past inputs, so generating pixel d costs one
//! k-tap matmul per layer (Paine et al. 2016, "Fast WaveNet generation"), not a full pass.
//! Left out: gated units and skip connections of the full WaveNet.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};
type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

use crate::layers::{causal_conv_stack, CausalConvStack, ConvCache, Dropout};
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CausalConv1dConfig {
    /// Hidden channels.
    pub channels: usize,
    /// Taps per layer.
    pub kernel_size: usize,
    /// One dilation per layer; the first layer is option A.
    pub dilations: Vec<usize>,
    /// Negative slope of the LeakyReLU between layers.
    pub leaky_slope: f64,
    /// Dropout probability after each hidden activation (training only).
    pub dropout: f64,
}

impl Default for CausalConv1dConfig {
    /// The chapter's network: 4 layers of 256 channels, kernel 7, dilation 1.
    fn default() -> Self {
        Self { channels: 256, kernel_size: 7, dilations: vec![1, 1, 1, 1], leaky_slope: 0.01, dropout: 0.0 }
    }
}

impl PluginConfig for CausalConv1dConfig {
    const NAME: &'static str = "causal_conv1d";
    const SUMMARY: &'static str = "stack of dilated causal Conv1d layers (first option A, rest option B)";

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if self.channels == 0 {
            return Err(invalid("channels", "must be at least 1, got 0"));
        }
        if self.kernel_size == 0 {
            return Err(invalid("kernel_size", "must be at least 1, got 0"));
        }
        if self.dilations.is_empty() {
            return Err(invalid("dilations", "must list at least one layer's dilation"));
        }
        if let Some(i) = self.dilations.iter().position(|&d| d == 0) {
            return Err(invalid(&format!("dilations[{i}]"), "must be at least 1, got 0"));
        }
        if !(0.0..=1.0).contains(&self.leaky_slope) {
            return Err(invalid("leaky_slope", format!("must be in [0, 1], got {}", self.leaky_slope)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        let channels = (1, self.channels, ctx.num_params);
        let convs = causal_conv_stack(channels, self.kernel_size, &self.dilations, self.leaky_slope, ctx.vb.clone())?;
        Ok(Box::new(CausalConvNet {
            convs,
            dropout: Dropout::new(self.dropout, ctx.seed),
            dims: ctx.dims(),
            device: ctx.device,
        }))
    }

    fn test_configs() -> Vec<Self> {
        let c = |k, dil: &[usize]| Self {
            channels: 5,
            kernel_size: k,
            dilations: dil.to_vec(),
            leaky_slope: 0.1,
            dropout: 0.0,
        };
        vec![c(2, &[1]), c(3, &[1, 1]), c(2, &[1, 2, 4]), c(3, &[2, 1, 3])]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("channels", "hidden channels"),
            ("kernel_size", "taps per layer"),
            ("dilations", "one dilation per layer (depth = length); layer 0 is option A"),
            ("leaky_slope", "negative slope of LeakyReLU"),
            ("dropout", "dropout after each hidden activation"),
        ]
    }
}

pub struct CausalConvNet {
    convs: CausalConvStack,
    dropout: Dropout,
    dims: usize,
    device: Device,
}

impl Conditional for CausalConvNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("causal_conv1d: input has {d} positions, built for {}", self.dims);
        }
        self.convs.forward(x, |h| self.dropout.forward_t(h, train)) // (B, D, P)
    }

    fn seq_len(&self) -> usize {
        self.dims
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn begin_epoch(&self, epoch: usize) {
        self.dropout.begin_epoch(epoch);
    }

    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        Ok(Box::new(ConvStepper { net: self, cache: self.convs.cache(batch), out: None }))
    }
}

/// Cached generation: every layer's inputs at the positions generated so far.
struct ConvStepper<'a> {
    net: &'a CausalConvNet,
    cache: ConvCache,
    out: Option<Tensor>,
}

impl Stepper for ConvStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if let Some(o) = &self.out {
            return Ok(o.clone());
        }
        let y = self.net.convs.step(&mut self.cache)?; // (B, P)
        self.out = Some(y.clone());
        Ok(y)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        if self.out.is_none() {
            self.params()?; // hidden inputs at this position must exist before moving on
        }
        self.cache.push(x_d)?;
        self.out = None;
        Ok(())
    }
}
