//! `pixelcnn`: the PixelCNN of van den Oord et al. 2016, "Pixel Recurrent Neural Networks"
//! (§3.4 masked convolution, §3.5 PixelCNN, Table 1): a k x k mask-A convolution (the first
//! layer never sees the current pixel, Fig. 2 right), residual blocks h + conv_B(ReLU(h)) with
//! mask-B convolutions (they may see the centre, which from then on holds features of earlier
//! pixels only; Fig. 5), then ReLU, 1x1, ReLU, 1x1 to the head's P parameters.
//! p(x) = prod_i p(x_i | x_<i) (eq. 1) in raster order; the input (B, D) is read as a
//! (B, H*W, 1) channels-last image:
//!
//!   h_0 = conv_A(x),  h_l = h_{l-1} + conv_B,l(ReLU(h_{l-1})),  params = out(h_L)
//!
//! Masked convolutions list only the taps the mask allows (`layers/conv2d.rs`), so masks are
//! exact.
//! The stack has the known blind spot (van den Oord et al. 2016, "Conditional Image Generation
//! with PixelCNN Decoders", §2.2, Fig. 1): the field of view reaches right only as far as the
//! rows above are reached by kernels leaning right, so a wedge of earlier pixels above-right
//! of the current one is never seen; `tests/receptive_field.rs` pins it down.
//!
//! The cached stepper computes every layer at the current pixel only (all its taps read
//! earlier pixels or the current one), so sampling is linear in D. Left out: the colour-channel
//! masks (greyscale data) and the 1x1 bottleneck inside the paper's residual block.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};
type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

use crate::layers::{masked_conv2d, output_mlp, Dropout, Mask, OutputMlp, TapConv2d};
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PixelCnnConfig {
    /// Feature maps of every hidden layer.
    pub channels: usize,
    /// Residual mask-B blocks after the first (mask-A) layer.
    pub layers: usize,
    /// Side of the first layer's k x k mask-A kernel (odd).
    pub first_kernel: usize,
    /// Side of the mask-B kernels (odd).
    pub kernel: usize,
    /// Dropout probability on each residual branch (training only).
    pub dropout: f64,
}

impl Default for PixelCnnConfig {
    /// The paper's 7x7 first layer and 3x3 blocks, sized for 8x8 digits.
    fn default() -> Self {
        Self { channels: 64, layers: 5, first_kernel: 7, kernel: 3, dropout: 0.0 }
    }
}

fn check_odd(key: &str, k: usize, min: usize) -> Result<(), PluginError> {
    if k < min || k % 2 == 0 {
        return Err(invalid(key, format!("must be odd and at least {min}, got {k}")));
    }
    Ok(())
}

impl PluginConfig for PixelCnnConfig {
    const NAME: &'static str = "pixelcnn";
    const SUMMARY: &'static str = "PixelCNN: mask-A conv, residual mask-B conv blocks (raster order only)";
    const IS_2D: bool = true;

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if self.channels == 0 {
            return Err(invalid("channels", "must be at least 1, got 0"));
        }
        // A 1x1 mask-A kernel has no taps at all: the network would see nothing.
        check_odd("first_kernel", self.first_kernel, 3)?;
        check_odd("kernel", self.kernel, 1)?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        let (hw, c) = ((ctx.height, ctx.width), self.channels);
        let first = masked_conv2d(1, c, self.first_kernel, Mask::A, hw, ctx.vb.pp("first"))?;
        let blocks = (0..self.layers)
            .map(|i| masked_conv2d(c, c, self.kernel, Mask::B, hw, ctx.vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let head = output_mlp(c, ctx.num_params, ctx.vb.pp("head"))?;
        Ok(Box::new(PixelCnnNet {
            first,
            blocks,
            head,
            channels: c,
            dropout: Dropout::new(self.dropout, ctx.seed),
            dims: ctx.dims(),
            device: ctx.device,
        }))
    }

    fn test_configs() -> Vec<Self> {
        let c = |channels, layers, first_kernel, kernel| Self { channels, layers, first_kernel, kernel, dropout: 0.0 };
        vec![c(4, 0, 3, 3), c(3, 2, 3, 3), c(5, 1, 5, 1), c(4, 2, 7, 3)]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("channels", "feature maps of every hidden layer"),
            ("layers", "residual mask-B blocks after the mask-A layer"),
            ("first_kernel", "side of the first layer's mask-A kernel (odd, >= 3)"),
            ("kernel", "side of the mask-B kernels (odd)"),
            ("dropout", "dropout on each residual branch"),
        ]
    }
}

pub struct PixelCnnNet {
    first: TapConv2d,
    blocks: Vec<TapConv2d>,
    head: OutputMlp,
    channels: usize,
    dropout: Dropout,
    dims: usize,
    device: Device,
}

impl Conditional for PixelCnnNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("pixelcnn: input has {d} pixels, built for {}", self.dims);
        }
        let mut h = self.first.forward(&x.unsqueeze(2)?)?; // (B, H*W, C)
        for conv in &self.blocks {
            let branch = conv.forward(&h.relu()?)?; // (B, H*W, C)
            h = (h + self.dropout.forward_t(&branch, train)?)?;
        }
        self.head.forward(&h) // (B, H*W, P)
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
        Ok(Box::new(PixelCnnStepper {
            net: self,
            batch,
            pos: 0,
            pixels: Vec::with_capacity(self.dims),
            acts: vec![Vec::with_capacity(self.dims); self.blocks.len()],
            zero_pixel: Tensor::zeros((batch, 1), DType::F32, &self.device)?,
            zero_act: Tensor::zeros((batch, self.channels), DType::F32, &self.device)?,
            out: None,
        }))
    }
}

/// Cached generation: `pixels[p]` is x_p, (B, 1); `acts[l][p]` is block l's input ReLU(h) at
/// pixel p, (B, C). Each step appends the current pixel's column of every layer.
struct PixelCnnStepper<'a> {
    net: &'a PixelCnnNet,
    batch: usize,
    pos: usize,
    pixels: Vec<Tensor>,
    acts: Vec<Vec<Tensor>>,
    zero_pixel: Tensor,
    zero_act: Tensor,
    out: Option<Tensor>,
}

impl Stepper for PixelCnnStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if let Some(o) = &self.out {
            return Ok(o.clone());
        }
        if self.pos >= self.net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", self.net.dims);
        }
        let mut h = self.net.first.forward_at(self.pos, &self.pixels, &self.zero_pixel)?; // (B, C)
        for (conv, acts) in self.net.blocks.iter().zip(self.acts.iter_mut()) {
            acts.push(h.relu()?);
            h = (&h + conv.forward_at(self.pos, acts, &self.zero_act)?)?; // (B, C)
        }
        let p = self.net.head.forward(&h)?; // (B, P)
        self.out = Some(p.clone());
        Ok(p)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        if self.out.is_none() {
            self.params()?; // every layer's column at this pixel must exist before moving on
        }
        self.pixels.push(x_d.to_dtype(DType::F32)?.reshape((self.batch, 1))?);
        self.out = None;
        self.pos += 1;
        Ok(())
    }
}
