//! `gated_pixelcnn`: the gated PixelCNN of van den Oord et al. 2016, "Conditional Image
//! Generation with PixelCNN Decoders", §2.1-2.2, eq. 2 and Fig. 2; with a conditioning vector
//! (`BuildCtx::cond_dim`, a VAE's latent) each layer adds its linear map as in eq. 4.
//! Every layer has two stacks that together see every earlier pixel (no blind spot): a
//! vertical stack over the rows strictly above and a horizontal stack over the current row up
//! to the current pixel (the first layer stops left of it: mask A), joined as in Fig. 2
//! (`layers/gated.rs` writes the layer out):
//!
//!   (v_l, h_l) = GatedBlock_l(v_{l-1}, h_{l-1}),  v_0 = h_0 = x,  params = out(h_L)
//!
//! Each block's horizontal output passes a 1x1 convolution and is added to its input (a
//! residual connection, from the second layer on) and summed into skip connections. The
//! residual and skip paths share the 1x1 map and the first layer has no residual, so after
//! layer l both sums are o_0 + ... + o_l: the skip sum is h_L itself. The head is ReLU, 1x1,
//! ReLU, 1x1 to the head's P parameters. (B, D) is read as (B, H*W, 1). Other orderings than
//! raster use locally masked stacks (`layers/gated.rs`, Jain, Abbeel & Pathak 2020).
//!
//! The cached stepper computes the vertical stack one image row at a time (at the first pixel
//! of the row: it depends on rows above only, and later layers read cells to the right) and
//! the horizontal stack at the current pixel only: sampling is linear in D.
//! Left out: colour-channel masks.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, NaiveStepper, Stepper};
type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

use crate::layers::{gated_block, output_mlp, CondBias, Dropout, GatedBlock, OutputMlp, Vertical};
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatedPixelCnnConfig {
    /// Feature maps of each stack (the gates use twice as many pre-activations).
    pub channels: usize,
    /// Gated layers; the first is the mask-A layer.
    pub layers: usize,
    /// Kernel width k (odd): vertical (k/2 + 1) x k, horizontal 1 x (k/2 + 1).
    pub kernel: usize,
    /// Dropout probability on the gated outputs (training only).
    pub dropout: f64,
}

impl Default for GatedPixelCnnConfig {
    fn default() -> Self {
        Self { channels: 64, layers: 5, kernel: 3, dropout: 0.0 }
    }
}

impl PluginConfig for GatedPixelCnnConfig {
    const NAME: &'static str = "gated_pixelcnn";
    const SUMMARY: &'static str = "gated PixelCNN: vertical + horizontal stacks, no blind spot (raster order)";
    const IS_2D: bool = true;
    const LOCAL_MASKS: bool = true;
    const CONDITIONING: bool = true;

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if self.channels == 0 {
            return Err(invalid("channels", "must be at least 1, got 0"));
        }
        if self.layers == 0 {
            return Err(invalid("layers", "must be at least 1, got 0"));
        }
        // k = 1 would give the first horizontal layer nothing to its left.
        if self.kernel < 3 || self.kernel % 2 == 0 {
            return Err(invalid("kernel", format!("must be odd and at least 3, got {}", self.kernel)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        Ok(Box::new(self.network(ctx)?))
    }

    fn test_configs() -> Vec<Self> {
        let c = |channels, layers, kernel| Self { channels, layers, kernel, dropout: 0.0 };
        vec![c(3, 1, 3), c(4, 2, 3), c(3, 3, 5), c(5, 2, 7)]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        KEY_DOCS
    }
}

const KEY_DOCS: &[(&str, &str)] = &[
    ("channels", "feature maps of each stack"),
    ("layers", "gated layers (the first is mask A)"),
    ("kernel", "kernel width k (odd, >= 3): vertical (k/2+1) x k, horizontal 1 x (k/2+1)"),
    ("dropout", "dropout on the gated outputs"),
];

impl GatedPixelCnnConfig {
    fn network(&self, ctx: BuildCtx) -> Result<GatedPixelCnnNet> {
        let (hw, c, k) = ((ctx.height, ctx.width), self.channels, self.kernel);
        let layers = (0..self.layers)
            .map(|l| gated_block(c, k, l == 0, hw, ctx.order.as_deref(), ctx.cond_dim, ctx.vb.pp(format!("layers.{l}"))))
            .collect::<Result<Vec<_>>>()?;
        let head = output_mlp(c, ctx.num_params, ctx.vb.pp("head"))?;
        Ok(GatedPixelCnnNet {
            layers,
            head,
            channels: c,
            width: ctx.width,
            dropout: Dropout::new(self.dropout, ctx.seed),
            dims: ctx.dims(),
            half: k / 2,
            local: ctx.order.is_some(),
            cond_dim: ctx.cond_dim,
            device: ctx.device,
        })
    }
}

pub struct GatedPixelCnnNet {
    layers: Vec<GatedBlock>,
    head: OutputMlp,
    channels: usize,
    width: usize,
    dropout: Dropout,
    dims: usize,
    /// k / 2: how many rows above and cells to the left a layer reads.
    half: usize,
    /// Locally masked (another order than raster): the raster stepper does not apply.
    local: bool,
    /// Width of the conditioning vector (0: unconditional).
    cond_dim: usize,
    device: Device,
}

impl GatedPixelCnnNet {
    /// The forward pass with every layer's conditioning biases (or none).
    fn forward_biased(&self, x: &Tensor, train: bool, biases: &[Option<CondBias>]) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("gated_pixelcnn: input has {d} pixels, built for {}", self.dims);
        }
        let x = x.unsqueeze(2)?; // (B, H*W, 1)
        if !self.dropout.active(train) && biases.iter().all(Option::is_none) {
            if let Some(r) = self.stack(&x)? {
                return self.head.forward_rectified(&r); // (B, H*W, P)
            }
        }
        self.forward_blocks(&x, train, biases)
    }

    /// ReLU(h_L), the head's first step, with every layer as one op ([`arm_kernels::gated_stack`]:
    /// large grids, no dropout, no conditioning); None where that route does not apply.
    fn stack(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let layers: Vec<_> = self.layers.iter().map(GatedBlock::stack_layer).collect();
        arm_kernels::gated_stack(x, &layers, true)
    }

    /// The forward pass layer by layer, x: (B, H*W, 1).
    fn forward_blocks(&self, x: &Tensor, train: bool, biases: &[Option<CondBias>]) -> Result<Tensor> {
        let (mut v, mut h) = (Vertical::Pixels(x.clone()), x.clone());
        for (l, block) in self.layers.iter().enumerate() {
            let bias = biases.get(l).and_then(Option::as_ref);
            (v, h) = block.forward(&v, &h, &self.dropout, train, bias)?; // h: (B, H*W, C)
        }
        if self.layers.is_empty() {
            candle_core::bail!("network has no layers");
        }
        self.head.forward(&h) // (B, H*W, P)
    }

    /// Every layer's biases of conditioning vector `c`, (B, cond_dim).
    fn biases(&self, c: &Tensor) -> Result<Vec<Option<CondBias>>> {
        if c.dim(1)? != self.cond_dim || self.cond_dim == 0 {
            candle_core::bail!("gated_pixelcnn: conditioning of width {}, built for {}", c.dim(1)?, self.cond_dim);
        }
        self.layers.iter().map(|b| b.cond_bias(c)).collect()
    }
}

impl Conditional for GatedPixelCnnNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.cond_dim > 0 {
            candle_core::bail!("gated_pixelcnn: built to read a conditioning vector of width {}", self.cond_dim);
        }
        self.forward_biased(x, train, &[])
    }

    fn cond_dim(&self) -> usize {
        self.cond_dim
    }

    fn forward_cond(&self, x: &Tensor, c: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_biased(x, train, &self.biases(c)?)
    }

    fn stepper_cond(&self, batch: usize, c: &Tensor) -> Result<Option<Box<dyn Stepper + '_>>> {
        if self.local {
            return Ok(None);
        }
        let mut st = self.cached_stepper(batch)?;
        st.bias = self.biases(c)?;
        Ok(Some(Box::new(st)))
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
        Ok(Box::new(self.cached_stepper(batch)?))
    }
}

impl GatedPixelCnnNet {
    fn cached_stepper(&self, batch: usize) -> Result<GatedStepper<'_>> {
        let n = self.layers.len();
        Ok(GatedStepper {
            net: self,
            batch,
            pos: 0,
            pixels: Vec::with_capacity(self.dims),
            v: vec![Vec::with_capacity(self.dims); n],
            v_pre: vec![Vec::with_capacity(self.dims); n],
            h: vec![Vec::with_capacity(self.dims); n],
            zero_pixel: Tensor::zeros((batch, 1), DType::F32, &self.device)?,
            zero_act: Tensor::zeros((batch, self.channels), DType::F32, &self.device)?,
            empty: Tensor::zeros(0, DType::F32, &self.device)?,
            out: None,
            bias: Vec::new(),
        })
    }
}

/// Cached generation, every cell (B, channels): `pixels[p]` = x_p; `v[l][p]`, `v_pre[l][p]`
/// = layer l's vertical output and pre-activation (filled a row at a time); `h[l][p]` = layer
/// l's horizontal output (filled a pixel at a time).
struct GatedStepper<'a> {
    net: &'a GatedPixelCnnNet,
    batch: usize,
    pos: usize,
    pixels: Vec<Tensor>,
    v: Vec<Vec<Tensor>>,
    v_pre: Vec<Vec<Tensor>>,
    h: Vec<Vec<Tensor>>,
    zero_pixel: Tensor,
    zero_act: Tensor,
    /// What released cells hold.
    empty: Tensor,
    out: Option<Tensor>,
    /// Every layer's conditioning biases (empty: unconditional).
    bias: Vec<Option<CondBias>>,
}

impl GatedStepper<'_> {
    /// The vertical stack for the whole row starting at `self.pos`: it reads rows above (all
    /// pushed) and, after the first layer, the previous layer's cells of this row.
    fn vertical_row(&mut self) -> Result<()> {
        let row = self.pos..self.pos + self.net.width;
        for (l, block) in self.net.layers.iter().enumerate() {
            let bias = self.bias.get(l).and_then(Option::as_ref).map(|b| &b.0);
            for p in row.clone() {
                let (pre, gated) = match l {
                    0 => block.step_vertical(p, &self.pixels, &self.zero_pixel, bias)?,
                    _ => block.step_vertical(p, &self.v[l - 1], &self.zero_act, bias)?,
                }; // (B, 2C), (B, C)
                self.v[l].push(gated);
                self.v_pre[l].push(pre);
            }
        }
        Ok(())
    }
}

/// Cell `p` of a cache, or an error naming the broken invariant.
fn cell(cache: &[Tensor], p: usize) -> Result<&Tensor> {
    cache.get(p).ok_or_else(|| candle_core::Error::Msg(format!("stepper: cell {p} not computed yet")))
}

impl Stepper for GatedStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if let Some(o) = &self.out {
            return Ok(o.clone());
        }
        if self.pos >= self.net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", self.net.dims);
        }
        if self.pos % self.net.width == 0 {
            self.vertical_row()?;
        }
        for (l, block) in self.net.layers.iter().enumerate() {
            let v_pre = cell(&self.v_pre[l], self.pos)?;
            let bias = self.bias.get(l).and_then(Option::as_ref).map(|b| &b.1);
            let h = match l {
                0 => block.step_horizontal(self.pos, &self.pixels, &self.zero_pixel, v_pre, bias)?,
                _ => block.step_horizontal(self.pos, &self.h[l - 1], &self.zero_act, v_pre, bias)?,
            }; // (B, C)
            self.h[l].push(h);
        }
        let skip = self
            .h
            .last()
            .and_then(|h| h.last())
            .ok_or_else(|| candle_core::Error::Msg("network has no layers".into()))?;
        let p = self.net.head.forward(skip)?; // (B, P) from the skip sum (the last layer's h)
        self.out = Some(p.clone());
        Ok(p)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        if self.out.is_none() {
            self.params()?; // this pixel's cells must exist before moving on
        }
        self.pixels.push(x_d.to_dtype(DType::F32)?.reshape((self.batch, 1))?);
        self.out = None;
        self.pos += 1;
        self.release_unread();
        Ok(())
    }
}

impl GatedStepper<'_> {
    /// Drops the cells no later step reads, so the caches stay a few rows deep instead of
    /// growing with the image (at batch 256 on 28x28 the growth made every step's temporaries
    /// land on fresh pages). From the next position on: the first layer's vertical stack reads
    /// the pixels k/2 + 1 rows up, the horizontal stacks read k/2 cells to the left, the later
    /// vertical stacks read k/2 rows up, and a vertical pre-activation is read at its own cell.
    fn release_unread(&mut self) {
        let (w, half, pos) = (self.net.width, self.net.half, self.pos);
        let row = pos / w;
        let empty = self.empty.clone();
        release(&mut self.pixels, (row.saturating_sub(half + 1) * w).min(pos.saturating_sub(half)), &empty);
        for l in 0..self.net.layers.len() {
            release(&mut self.v[l], row.saturating_sub(half) * w, &empty);
            release(&mut self.v_pre[l], pos, &empty);
            release(&mut self.h[l], pos.saturating_sub(half), &empty);
        }
    }
}

/// Replaces the cells before `upto` with `empty` (a 0-element tensor: reading one is a shape
/// error, never a silent zero), walking back from `upto` to the last one released.
fn release(cache: &mut [Tensor], upto: usize, empty: &Tensor) {
    let n = upto.min(cache.len());
    for c in cache[..n].iter_mut().rev() {
        if c.elem_count() == 0 {
            break;
        }
        *c = empty.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    /// On an 18x20 grid the convolutions take the padded route of the kernels (no im2col):
    /// causality by perturbation and stepper = forward still hold there.
    #[test]
    fn padded_route_is_causal_and_matches_the_stepper() -> Result<()> {
        let (h, w) = (18, 20);
        for first in [true, false] {
            let u = arm_kernels::Unfold { height: h, width: w, taps: crate::layers::conv2d::vertical_taps(3, first), mask: None };
            assert!(u.padded_route(), "the grid must take the padded route (first layer {first})");
        }
        let cfg = GatedPixelCnnConfig { channels: 3, layers: 3, kernel: 3, dropout: 0.0 };
        let map = candle_nn::VarMap::new();
        let net = cfg.build(conformance::test_ctx(&map, 5, (h, w), (3, conformance::LEVELS))).map_err(candle_core::Error::msg)?;
        conformance::causality(net.as_ref(), w, true, true).map_err(candle_core::Error::msg)?;
        conformance::stepper_matches_forward(net.as_ref()).map_err(candle_core::Error::msg)
    }

    /// On the 18x20 grid the layers run as one op; its values and the gradients of every
    /// weight equal those of the layer-by-layer ops (the route of small grids and dropout).
    #[test]
    fn one_op_stack_equals_the_layer_by_layer_pass() -> Result<()> {
        let (h, w) = (18, 20);
        let cfg = GatedPixelCnnConfig { channels: 4, layers: 3, kernel: 3, dropout: 0.0 };
        let map = candle_nn::VarMap::new();
        let net = cfg.network(conformance::test_ctx(&map, 4, (h, w), (3, conformance::LEVELS)))?;
        let x = conformance::random_levels(3, h * w, conformance::LEVELS, 7, &Device::Cpu)?.affine(0.25, 0.0)?;
        let x3 = x.unsqueeze(2)?;
        assert!(net.stack(&x3)?.is_some(), "the 18x20 grid must take the one-op route");
        let (fused, layered) = (net.forward_t(&x, false)?, net.forward_blocks(&x3, false, &[])?);
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&fused, &layered)? < 1e-4, "values differ by {}", diff(&fused, &layered)?);
        // A loss that weighs every output differently.
        let r = conformance::random_levels(3, fused.elem_count() / 3, 11, 5, &Device::Cpu)?.reshape(fused.shape())?;
        let (gf, gl) = ((fused * &r)?.sum_all()?.backward()?, (layered * &r)?.sum_all()?.backward()?);
        let vars = map.all_vars();
        assert_eq!(vars.len(), 3 * 8 + 4, "every layer's eight weights and the head's four");
        for v in &vars {
            let (a, b) = (gf.get(v).expect("fused gradient"), gl.get(v).expect("layered gradient"));
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff(a, b)? <= 1e-4 * (1.0 + scale), "gradient of {:?} differs by {}", v.dims(), diff(a, b)?);
        }
        Ok(())
    }

    /// On 7x9 images (several rows below every kernel's reach) the stepper still reproduces
    /// every forward row, while holding only a few rows of cells per cache.
    #[test]
    fn stepper_matches_forward_and_holds_a_few_rows() -> Result<()> {
        let (h, w) = (7, 9);
        for k in [3, 5] {
            let cfg = GatedPixelCnnConfig { channels: 4, layers: 3, kernel: k, dropout: 0.0 };
            let map = candle_nn::VarMap::new();
            let net = cfg.build(conformance::test_ctx(&map, 2, (h, w), (3, conformance::LEVELS))).map_err(candle_core::Error::msg)?;
            conformance::stepper_matches_forward(net.as_ref()).map_err(candle_core::Error::msg)?;
            let gated = cfg.network(conformance::test_ctx(&map, 2, (h, w), (3, conformance::LEVELS)))?;
            let mut st = gated.cached_stepper(2)?;
            let x = conformance::random_levels(2, h * w, conformance::LEVELS, 3, &Device::Cpu)?.affine(0.25, 0.0)?;
            let half = k / 2;
            for i in 0..h * w {
                st.params()?;
                st.push(&x.narrow(1, i, 1)?.squeeze(1)?)?;
                let held = |c: &[Tensor]| c.iter().filter(|t| t.elem_count() > 0).count();
                // Pixels: k/2 + 2 rows at most; vertical: k/2 + 1 rows; horizontal: k/2 + 1 cells.
                assert!(held(&st.pixels) <= (half + 2) * w, "k {k} step {i}: {} pixels", held(&st.pixels));
                for l in 0..3 {
                    assert!(held(&st.v[l]) <= (half + 1) * w, "k {k} step {i}: v[{l}] holds {}", held(&st.v[l]));
                    assert!(held(&st.h[l]) <= half + 1, "k {k} step {i}: h[{l}] holds {}", held(&st.h[l]));
                    assert!(held(&st.v_pre[l]) <= w, "k {k} step {i}: v_pre[{l}] holds {}", held(&st.v_pre[l]));
                }
            }
        }
        Ok(())
    }
}
