//! `causal_conv1d`: a stack of dilated causal Conv1d layers (WaveNet, van den Oord et al. 2016,
//! §2.1-2.2), the network of Tomczak's "Deep Generative Modeling", ch. 2 (ARM with causal
//! convolutions). The first layer is option A (it cannot see the current pixel), the rest
//! option B; LeakyReLU (and optional dropout) between layers; the last layer outputs the head's
//! P parameters. Depth is the length of `dilations`.
//!
//! The cached stepper keeps every layer's past inputs, so generating pixel d costs one
//! k-tap matmul per layer (Paine et al. 2016, "Fast WaveNet generation"), not a full pass.
//! Left out: gated units and skip connections of the full WaveNet.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};
type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

use crate::layers::{causal_conv1d, leaky_relu, CausalConv1d, CausalMode, Dropout};
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
        let n = self.dilations.len();
        let mut layers = Vec::with_capacity(n);
        for (i, &dil) in self.dilations.iter().enumerate() {
            let cin = if i == 0 { 1 } else { self.channels };
            let cout = if i + 1 == n { ctx.num_params } else { self.channels };
            let mode = if i == 0 { CausalMode::A } else { CausalMode::B };
            layers.push(causal_conv1d(cin, cout, self.kernel_size, dil, mode, ctx.vb.pp(format!("layers.{i}")))?);
        }
        Ok(Box::new(CausalConvNet {
            layers,
            slope: self.leaky_slope,
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
    layers: Vec<CausalConv1d>,
    slope: f64,
    dropout: Dropout,
    dims: usize,
    device: Device,
}

impl Conditional for CausalConvNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.layers.iter().all(|l| l.time_major_ok(x)) {
            return self.forward_time_major(x, train);
        }
        self.forward_batch_major(x, train)
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
        Ok(Box::new(ConvStepper { net: self, batch, pos: 0, inputs: vec![Vec::new(); self.layers.len()], out: None }))
    }
}

impl CausalConvNet {
    /// The CPU path: activations kept time-major, (reach + D, B, C) with the next layer's
    /// reach of zero steps in front, so every layer is gemms on shifted views
    /// ([`crate::timeconv`]). Transposed once on the way in (B x D values) and out (B x D x P).
    fn forward_time_major(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let reach: Vec<usize> = self.layers.iter().map(|l| l.reach()).collect();
        let mut h = x.t()?.contiguous()?.unsqueeze(2)?.pad_with_zeros(0, reach[0], 0)?; // (r0 + D, B, 1)
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            if i < last {
                h = layer.forward_time_major(&h, reach[i], reach[i + 1], Some(self.slope))?;
                h = self.dropout.forward_t(&h, train)?;
            } else {
                h = layer.forward_time_major(&h, reach[i], 0, None)?; // (D, B, P)
            }
        }
        h.transpose(0, 1)?.contiguous() // (B, D, P)
    }

    /// The device-agnostic path: (B, D, C) activations, im2col convolutions.
    fn forward_batch_major(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.unsqueeze(2)?; // (B, D, 1)
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            if i < last {
                h = self.dropout.forward_t(&layer.forward_leaky(&h, self.slope)?, train)?;
            // (B, D, C)
            } else {
                h = layer.forward(&h)?; // (B, D, P)
            }
        }
        Ok(h) // (B, D, P)
    }
}

/// Cached generation: `inputs[l][d]` is layer l's input at position d, (B, C_l).
struct ConvStepper<'a> {
    net: &'a CausalConvNet,
    batch: usize,
    pos: usize,
    inputs: Vec<Vec<Tensor>>,
    out: Option<Tensor>,
}

impl Stepper for ConvStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if let Some(o) = &self.out {
            return Ok(o.clone());
        }
        let last = self.net.layers.len() - 1;
        let mut y = None;
        for (l, layer) in self.net.layers.iter().enumerate() {
            let cin = if l == 0 { 1 } else { self.inputs[l].first().map_or(0, |t| t.dim(1).unwrap_or(0)) };
            let zero = Tensor::zeros((self.batch, cin.max(1)), candle_core::DType::F32, &self.net.device)?;
            let taps = (0..layer.kernel())
                .map(|t| {
                    let back = layer.shift() + t * layer.dilation();
                    match self.pos.checked_sub(back) {
                        Some(j) => self.inputs[l][j].clone(),
                        None => zero.clone(),
                    }
                })
                .collect::<Vec<_>>();
            let o = layer.forward_taps(&Tensor::cat(&taps, 1)?)?; // (B, C_out)
            if l < last {
                self.inputs[l + 1].push(leaky_relu(&o, self.net.slope)?);
            } else {
                y = Some(o);
            }
        }
        let y = y.ok_or_else(|| candle_core::Error::Msg("network has no layers".into()))?;
        self.out = Some(y.clone());
        Ok(y)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        if self.out.is_none() {
            self.params()?; // hidden inputs at this position must exist before moving on
        }
        self.inputs[0].push(x_d.reshape((self.batch, 1))?);
        self.out = None;
        self.pos += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    /// The CPU's time-major network against the device-agnostic batch-major one (each layer of
    /// which is tested against a loop and composed ops), in values and in the gradients of
    /// every weight: narrow (unfold), wide (per-tap) and output-side layers, dilations, both
    /// modes.
    #[test]
    fn time_major_network_equals_batch_major_in_values_and_gradients() -> Result<()> {
        let mut cfgs = CausalConv1dConfig::test_configs();
        cfgs.push(CausalConv1dConfig {
            channels: 70,
            kernel_size: 3,
            dilations: vec![1, 2, 1],
            leaky_slope: 0.01,
            dropout: 0.0,
        });
        for (i, cfg) in cfgs.iter().enumerate() {
            let (b, d, p) = (3, 12, 4);
            let map = VarMap::new();
            let vb = arm_core::seeded_var_builder(&map, 5 + i as u64, &Device::Cpu);
            let n = cfg.dilations.len();
            let layers = (0..n)
                .map(|l| {
                    let (cin, cout) =
                        (if l == 0 { 1 } else { cfg.channels }, if l + 1 == n { p } else { cfg.channels });
                    let mode = if l == 0 { CausalMode::A } else { CausalMode::B };
                    causal_conv1d(cin, cout, cfg.kernel_size, cfg.dilations[l], mode, vb.pp(format!("layers.{l}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let net = CausalConvNet {
                layers,
                slope: cfg.leaky_slope,
                dropout: Dropout::new(0.0, 0),
                dims: d,
                device: Device::Cpu,
            };
            let x = Tensor::from_vec(
                (0..b * d).map(|j| ((j * 7) % 17) as f32 / 16.0).collect::<Vec<_>>(),
                (b, d),
                &Device::Cpu,
            )?;
            let probe = Tensor::from_vec(
                (0..b * d * p).map(|j| ((j * 5) % 11) as f32 - 5.0).collect::<Vec<_>>(),
                (b, d, p),
                &Device::Cpu,
            )?;
            let fast = net.forward_time_major(&x, true)?;
            let slow = net.forward_batch_major(&x, true)?;
            let max =
                |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
            assert!(max(&fast, &slow)? < 1e-4, "{cfg:?}: values differ by {}", max(&fast, &slow)?);
            let gf = (&fast * &probe)?.sum_all()?.backward()?;
            let gs = (&slow * &probe)?.sum_all()?.backward()?;
            for v in map.all_vars() {
                let diff = max(gf.get(&v).expect("grad"), gs.get(&v).expect("grad"))?;
                assert!(diff < 1e-4, "{cfg:?}: a gradient of shape {:?} differs by {diff}", v.dims());
            }
        }
        Ok(())
    }
}
