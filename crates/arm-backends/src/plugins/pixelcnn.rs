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
//! exact. For another ordering than raster every convolution is locally masked (Jain, Abbeel
//! & Pathak 2020, §3): a full k x k window whose taps at each location keep the pixels earlier
//! in the ordering (mask A: strictly earlier; mask B: the location too).
//! The stack has the known blind spot (van den Oord et al. 2016, "Conditional Image Generation
//! with PixelCNN Decoders", §2.2, Fig. 1): the field of view reaches right only as far as the
//! rows above are reached by kernels leaning right, so a wedge of earlier pixels above-right
//! of the current one is never seen; `tests/receptive_field.rs` pins it down.
//!
//! The cached stepper computes every layer at the current pixel only (all its taps read
//! earlier pixels or the current one), so sampling is linear in D. With a conditioning vector c
//! (`BuildCtx::cond_dim`, a VAE's latent) every convolution's output gains V_l c, the same at
//! every position (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
//! Decoders", eq. 4 without the gate). Left out: the colour-channel
//! masks (greyscale data) and the 1x1 bottleneck inside the paper's residual block.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, NaiveStepper, Stepper};
type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

use crate::layers::{linear, local_conv2d, masked_conv2d, output_mlp, window_taps, Dropout, Linear, Mask, OutputMlp, TapConv2d};
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
    const SUMMARY: &'static str = "PixelCNN: mask-A conv, residual mask-B conv blocks";
    const IS_2D: bool = true;
    const LOCAL_MASKS: bool = true;
    const CONDITIONING: bool = true;

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
        Ok(Box::new(self.network(ctx)?))
    }

    fn test_configs() -> Vec<Self> {
        let c = |channels, layers, first_kernel, kernel| Self { channels, layers, first_kernel, kernel, dropout: 0.0 };
        vec![c(4, 0, 3, 3), c(3, 2, 3, 3), c(5, 1, 5, 1), c(4, 2, 7, 3)]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        KEY_DOCS
    }
}

const KEY_DOCS: &[(&str, &str)] = &[
    ("channels", "feature maps of every hidden layer"),
    ("layers", "residual mask-B blocks after the mask-A layer"),
    ("first_kernel", "side of the first layer's mask-A kernel (odd, >= 3)"),
    ("kernel", "side of the mask-B kernels (odd)"),
    ("dropout", "dropout on each residual branch"),
];

impl PixelCnnConfig {
    fn network(&self, ctx: BuildCtx) -> Result<PixelCnnNet> {
        let (hw, c) = ((ctx.height, ctx.width), self.channels);
        let conv = |cin, k, mask, vb| match &ctx.order {
            None => masked_conv2d(cin, c, k, mask, hw, vb),
            Some(rank) => local_conv2d(cin, c, window_taps(k), rank, mask == Mask::A, hw, vb),
        };
        let first = conv(1, self.first_kernel, Mask::A, ctx.vb.pp("first"))?;
        let blocks = (0..self.layers)
            .map(|i| conv(c, self.kernel, Mask::B, ctx.vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let head = output_mlp(c, ctx.num_params, ctx.vb.pp("head"))?;
        // V_l of every convolution as one map, cond_dim -> (1 + layers) C.
        let cond = match ctx.cond_dim {
            0 => None,
            n => Some(linear(n, (1 + self.layers) * c, ctx.vb.pp("cond"))?),
        };
        Ok(PixelCnnNet {
            first,
            blocks,
            head,
            cond,
            channels: c,
            dropout: Dropout::new(self.dropout, ctx.seed),
            dims: ctx.dims(),
            local: ctx.order.is_some(),
            device: ctx.device,
        })
    }
}

pub struct PixelCnnNet {
    first: TapConv2d,
    blocks: Vec<TapConv2d>,
    head: OutputMlp,
    cond: Option<Linear>,
    channels: usize,
    dropout: Dropout,
    dims: usize,
    /// Locally masked (another order than raster): the raster stepper does not apply.
    local: bool,
    device: Device,
}

impl PixelCnnNet {
    /// The forward pass, with every convolution's bias V_l c from `bias` = (Bc, (1 + L) C).
    fn forward_biased(&self, x: &Tensor, train: bool, bias: Option<&Tensor>) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("pixelcnn: input has {d} pixels, built for {}", self.dims);
        }
        let c = self.channels;
        let add = |t: Tensor, l: usize| match bias {
            Some(b) => t.broadcast_add(&b.narrow(1, l * c, c)?.unsqueeze(1)?), // + (Bc, 1, C)
            None => Ok(t),
        };
        let mut h = add(self.first.forward(&x.unsqueeze(2)?)?, 0)?; // (B, H*W, C)
        for (l, conv) in self.blocks.iter().enumerate() {
            let branch = add(conv.forward(&h.relu()?)?, l + 1)?; // (B, H*W, C)
            h = (h + self.dropout.forward_t(&branch, train)?)?;
        }
        self.head.forward(&h) // (B, H*W, P)
    }

    /// Every convolution's bias for conditioning vectors `c` (Bc, cond_dim).
    fn cond_bias(&self, c: &Tensor) -> Result<Tensor> {
        match &self.cond {
            Some(map) => map.forward(c),
            None => candle_core::bail!("pixelcnn: built without a conditioning input"),
        }
    }

    fn cached_stepper(&self, batch: usize, bias: Option<Tensor>) -> Result<PixelCnnStepper<'_>> {
        Ok(PixelCnnStepper {
            net: self,
            batch,
            pos: 0,
            pixels: Vec::with_capacity(self.dims),
            acts: vec![Vec::with_capacity(self.dims); self.blocks.len()],
            zero_pixel: Tensor::zeros((batch, 1), DType::F32, &self.device)?,
            zero_act: Tensor::zeros((batch, self.channels), DType::F32, &self.device)?,
            out: None,
            bias,
        })
    }
}

impl Conditional for PixelCnnNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.cond.is_some() {
            candle_core::bail!("pixelcnn: built to read a conditioning vector");
        }
        self.forward_biased(x, train, None)
    }

    fn cond_dim(&self) -> usize {
        self.cond.as_ref().map_or(0, |m| m.w.dim(0).unwrap_or(0))
    }

    fn forward_cond(&self, x: &Tensor, c: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_biased(x, train, Some(&self.cond_bias(c)?))
    }

    fn stepper_cond(&self, batch: usize, c: &Tensor) -> Result<Option<Box<dyn Stepper + '_>>> {
        if self.local {
            return Ok(None);
        }
        Ok(Some(Box::new(self.cached_stepper(batch, Some(self.cond_bias(c)?))?)))
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
        if self.local {
            return Ok(Box::new(NaiveStepper::new(self, batch)?));
        }
        Ok(Box::new(self.cached_stepper(batch, None)?))
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
    /// Every convolution's conditioning bias, (B or 1, (1 + L) C).
    bias: Option<Tensor>,
}

impl PixelCnnStepper<'_> {
    fn add_bias(&self, t: Tensor, l: usize) -> Result<Tensor> {
        let c = self.net.channels;
        match &self.bias {
            Some(b) => t.broadcast_add(&b.narrow(1, l * c, c)?),
            None => Ok(t),
        }
    }
}

impl Stepper for PixelCnnStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if let Some(o) = &self.out {
            return Ok(o.clone());
        }
        if self.pos >= self.net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", self.net.dims);
        }
        let first = self.net.first.forward_at(self.pos, &self.pixels, &self.zero_pixel)?; // (B, C)
        let mut h = self.add_bias(first, 0)?;
        for l in 0..self.net.blocks.len() {
            self.acts[l].push(h.relu()?);
            let branch = self.net.blocks[l].forward_at(self.pos, &self.acts[l], &self.zero_act)?; // (B, C)
            h = (&h + self.add_bias(branch, l + 1)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use arm_core::Ordering;

    /// A network over the image layout that is autoregressive in `order` (image positions).
    struct InOrder {
        net: PixelCnnNet,
        order: Vec<usize>,
    }

    impl Conditional for InOrder {
        fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
            self.net.forward_t(x, train)
        }
        fn seq_len(&self) -> usize {
            self.net.seq_len()
        }
        fn device(&self) -> &Device {
            self.net.device()
        }
        fn member_order(&self, _m: usize) -> Option<Vec<usize>> {
            Some(self.order.clone())
        }
    }

    /// Opening one entry of one local mask (a tap that reads a later pixel of the ordering)
    /// makes the conformance suite's causality check fail; intact, it passes.
    #[test]
    fn a_broken_local_mask_fails_causality() -> Result<()> {
        let (h, w) = (3, 4);
        let cfg = PixelCnnConfig { channels: 8, layers: 1, first_kernel: 3, kernel: 3, dropout: 0.0 };
        for o in [Ordering::Zigzag, Ordering::Random(4)] {
            let rank = o.rank(h, w);
            let map = candle_nn::VarMap::new();
            let mut ctx = conformance::test_ctx(&map, 1, (h, w), (3, conformance::LEVELS));
            ctx.order = Some(rank.clone().into());
            let mut intact = InOrder { net: cfg.network(ctx)?, order: o.permutation(h, w) };
            conformance::causality(&intact, w, true, false).map_err(candle_core::Error::msg)?;
            // The first later pixel any tap of the first layer reaches.
            let u = &intact.net.first.unfold;
            let k = u.taps.len();
            let (p, t) = (0..h * w)
                .flat_map(|p| (0..k).map(move |t| (p, t)))
                .find(|&(p, t)| {
                    let (r, c) = ((p / w) as isize + u.taps[t].0, (p % w) as isize + u.taps[t].1);
                    r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w && rank[r as usize * w + c as usize] > rank[p]
                })
                .expect("a masked tap");
            let mut mask = u.mask.as_deref().expect("a local mask").to_vec();
            assert!(!mask[p * k + t], "{o}: the tap reading a later pixel must be masked");
            mask[p * k + t] = true;
            intact.net.first.unfold.mask = Some(mask.into());
            let e = conformance::causality(&intact, w, true, false).expect_err("a broken local mask passed");
            assert!(e.contains("changed when"), "{o}: {e}");
        }
        Ok(())
    }
}
