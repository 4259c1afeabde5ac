//! `mlp`: a finite-memory ARM, p(x_d | x_<d) ~= p(x_d | x_{d-1}, ..., x_{d-m}), with one MLP
//! shared by every position (Tomczak, "Deep Generative Modeling", §2.2.1 "Finite memory", which
//! truncates the factorisation p(x) = prod_d p(x_d | x_<d) of Larochelle & Murray 2011, eq. 1;
//! Frey et al. 1996 used the unshared, full-memory logistic version). The window
//! x_{d-1..d-m} is zero before the start of the sequence. Hidden layers are Linear + ReLU
//! (eq. 2.6) or LeakyReLU (the lab's default), + dropout; the last layer outputs the head's P
//! parameters. depth = 0 is a linear model.
//!
//! The cached stepper keeps the window of the last m pixels, so each pixel costs one MLP pass.
//! Left out: position embeddings (the shared MLP does not know where it is in the image).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};
type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

use crate::layers::{linear, window, Dropout, Linear, Window};
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

/// LeakyReLU slope between hidden layers (the causal_conv1d default).
const SLOPE: f64 = 0.01;

/// The hidden layers' non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x), as eq. 2.6 writes it.
    Relu,
    /// max(0.01 x, x), the lab's default.
    #[default]
    LeakyRelu,
}

impl Activation {
    fn is_default(&self) -> bool {
        *self == Activation::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlpConfig {
    /// m: how many previous pixels the MLP sees.
    pub memory: usize,
    /// Width of each hidden layer.
    pub hidden: usize,
    /// Number of hidden layers (0: a linear map from the window to the parameters).
    pub depth: usize,
    /// Non-linearity of the hidden layers. Added after the first runs: written to a run's
    /// config only when not the default, so their ids (config hashes) stay the same.
    #[serde(skip_serializing_if = "Activation::is_default")]
    pub activation: Activation,
    /// Dropout probability after each hidden activation (training only).
    pub dropout: f64,
}

impl Default for MlpConfig {
    /// Digits (8x8): the previous row is in the window.
    fn default() -> Self {
        Self { memory: 8, hidden: 256, depth: 2, activation: Activation::LeakyRelu, dropout: 0.0 }
    }
}

impl PluginConfig for MlpConfig {
    const NAME: &'static str = "mlp";
    const SUMMARY: &'static str = "finite-memory ARM: one shared MLP over the previous `memory` pixels";

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if self.memory == 0 {
            return Err(invalid("memory", "must be at least 1, got 0"));
        }
        if self.depth > 0 && self.hidden == 0 {
            return Err(invalid("hidden", "must be at least 1 when depth > 0, got 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        let mut layers = Vec::with_capacity(self.depth + 1);
        let mut inp = self.memory;
        for i in 0..self.depth {
            layers.push(linear(inp, self.hidden, ctx.vb.pp(format!("layers.{i}")))?);
            inp = self.hidden;
        }
        layers.push(linear(inp, ctx.num_params, ctx.vb.pp(format!("layers.{}", self.depth)))?);
        Ok(Box::new(MlpNet {
            layers,
            window: window(self.memory, ctx.dims()),
            memory: self.memory,
            activation: self.activation,
            dropout: Dropout::new(self.dropout, ctx.seed),
            dims: ctx.dims(),
            device: ctx.device,
        }))
    }

    fn test_configs() -> Vec<Self> {
        let c = |memory, hidden, depth, activation| Self { memory, hidden, depth, activation, dropout: 0.0 };
        vec![
            c(1, 4, 1, Activation::LeakyRelu),
            c(3, 5, 2, Activation::LeakyRelu),
            c(9, 3, 1, Activation::LeakyRelu),
            c(3, 8, 1, Activation::Relu),
            c(2, 4, 0, Activation::LeakyRelu),
        ]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("memory", "m: previous pixels the MLP sees (zero before the start)"),
            ("hidden", "width of each hidden layer"),
            ("depth", "number of hidden layers (0: linear)"),
            ("activation", "\"relu\" (eq. 2.6) or \"leaky_relu\" (slope 0.01; the default) between layers"),
            ("dropout", "dropout after each hidden activation"),
        ]
    }
}

pub struct MlpNet {
    layers: Vec<Linear>,
    window: Window,
    memory: usize,
    activation: Activation,
    dropout: Dropout,
    dims: usize,
    device: Device,
}

impl MlpNet {
    /// The MLP on windows (..., m) -> (..., P).
    fn mlp(&self, h: Tensor, train: bool) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut h = h;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?; // (..., hidden or P)
            if i < last {
                let a = match self.activation {
                    Activation::Relu => h.relu()?,
                    Activation::LeakyRelu => crate::layers::leaky_relu(&h, SLOPE)?,
                };
                h = self.dropout.forward_t(&a, train)?;
            }
        }
        Ok(h)
    }
}

impl Conditional for MlpNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("mlp: input has {d} positions, built for {}", self.dims);
        }
        let win = self.window.forward(x)?; // (B, D, m): x_{d-1}, ..., x_{d-m}
        self.mlp(win, train) // (B, D, P)
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
        let window = Tensor::zeros((batch, self.memory), DType::F32, &self.device)?;
        Ok(Box::new(MlpStepper { net: self, batch, window, pos: 0 }))
    }
}

/// Cached generation: the last m pixels, newest first, as the forward pass's window.
struct MlpStepper<'a> {
    net: &'a MlpNet,
    batch: usize,
    window: Tensor, // (B, m)
    pos: usize,
}

impl Stepper for MlpStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if self.pos >= self.net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", self.net.dims);
        }
        self.net.mlp(self.window.clone(), false) // (B, P)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        let x = x_d.to_dtype(DType::F32)?.reshape((self.batch, 1))?; // (B, 1)
        self.window = if self.net.memory == 1 {
            x
        } else {
            let older = self.window.narrow(1, 0, self.net.memory - 1)?; // (B, m-1)
            Tensor::cat(&[&x, &older], 1)? // (B, m)
        };
        self.pos += 1;
        Ok(())
    }
}
