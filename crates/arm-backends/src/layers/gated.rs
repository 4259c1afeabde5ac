//! The gated layer of the gated PixelCNN (van den Oord et al. 2016, "Conditional Image
//! Generation with PixelCNN Decoders", §2.1-2.2, eq. 2 and Fig. 2):
//!
//!   v' = W_v * v + V_v c                                     (vertical stack: rows strictly above)
//!   h' = h + W_o gate(W_h * h + W_vh gate-input(v') + V_h c)  (horizontal stack: the row so far)
//!
//! The V c terms are the conditional gated PixelCNN's (eq. 4): a linear map of a conditioning
//! vector c (a VAE's latent), the same at every position; without c they are absent.
//! with gate(a) = tanh(a_f) . sigmoid(a_g) over the two halves of a's channels (eq. 2). The
//! vertical stack passes on its pre-activations v' (the next layer's vertical convolution reads
//! gate(v')); the horizontal stack adds them through a 1x1 map before its own gate.
//!
//! How it runs: without dropout, each gate is computed inside the op of the layer that reads
//! it (`forward_gated`), and the horizontal convolution, the 1x1 map of v' and their sum are
//! one product ([`arm_kernels::dense_pair`]); with dropout (between a gate and the layer that
//! reads it) the gates are separate ops. Both give the same values. On large grids without
//! dropout or conditioning the plugin runs all its layers as one op instead
//! ([`arm_kernels::gated_stack`], the same equations).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use arm_core::Result;
use arm_kernels::gate;

use super::conv2d::{horizontal_taps, local_conv2d, tap_conv2d, vertical_taps, window_taps, TapConv2d};
use super::{linear, Dropout, Linear};

/// What the vertical stack hands to the next layer.
pub enum Vertical {
    /// The image itself (before the first layer: nothing to gate).
    Pixels(Tensor),
    /// The pre-activations v' of a layer, (B, H*W, 2C): the next layer reads gate(v').
    Pre(Tensor),
}

/// One gated layer: vertical (k/2 + 1) x k and horizontal 1 x (k/2 + 1) convolutions, the 1x1
/// map from the vertical to the horizontal stack, and the 1x1 output map. The first layer
/// (mask A) reads the pixels, stops left of the current one and has no residual connection.
pub struct GatedBlock {
    vertical: TapConv2d,   // C_in -> 2C
    horizontal: TapConv2d, // C_in -> 2C
    v_to_h: Linear,        // 1x1, 2C -> 2C
    out: Linear,           // 1x1, C -> C
    /// V_v and V_h of eq. 4 as one map, cond_dim -> 4C (vertical, then horizontal).
    cond: Option<Linear>,
    residual: bool,
}

/// A layer's conditioning biases V_v c and V_h c, each (B, 2C) (or (1, 2C) for one c).
pub type CondBias = (Tensor, Tensor);

/// Layer `first` reads 1 channel, later ones `channels`; kernel width k (odd, >= 3).
/// With `rank` (another ordering than raster) both stacks are locally masked (Jain et al.
/// 2020): the vertical stack over a k x k window, the horizontal one over the 1 x k row, each
/// tap kept where it reads an earlier pixel of the ordering (and, after the first layer, the
/// location itself), so the vertical output at a location is still safe for the horizontal
/// stack there.
pub fn gated_block(
    channels: usize,
    k: usize,
    first: bool,
    shape: (usize, usize),
    rank: Option<&[usize]>,
    cond_dim: usize,
    vb: VarBuilder,
) -> Result<GatedBlock> {
    let (c, cin) = (channels, if first { 1 } else { channels });
    let (vertical, horizontal) = match rank {
        None => (
            tap_conv2d(cin, 2 * c, vertical_taps(k, first), shape, vb.pp("vertical"))?,
            tap_conv2d(cin, 2 * c, horizontal_taps(k, first), shape, vb.pp("horizontal"))?,
        ),
        Some(rank) => {
            let h = (k / 2) as isize;
            let row = (-h..=h).map(|dx| (0, dx)).collect();
            (
                local_conv2d(cin, 2 * c, window_taps(k), rank, first, shape, vb.pp("vertical"))?,
                local_conv2d(cin, 2 * c, row, rank, first, shape, vb.pp("horizontal"))?,
            )
        }
    };
    Ok(GatedBlock {
        vertical,
        horizontal,
        v_to_h: linear(2 * c, 2 * c, vb.pp("v_to_h"))?,
        out: linear(c, c, vb.pp("out"))?,
        cond: if cond_dim > 0 { Some(linear(cond_dim, 4 * c, vb.pp("cond"))?) } else { None },
        residual: !first,
    })
}

impl GatedBlock {
    /// The biases of conditioning vector `c`, (B, cond_dim); None for a layer without V.
    pub fn cond_bias(&self, c: &Tensor) -> Result<Option<CondBias>> {
        let Some(map) = &self.cond else { return Ok(None) };
        let both = map.forward(c)?; // (B, 4C)
        let half = both.dim(1)? / 2;
        Ok(Some((both.narrow(1, 0, half)?.contiguous()?, both.narrow(1, half, half)?.contiguous()?)))
    }

    /// The layer as [`arm_kernels::gated_stack`] reads it (without conditioning).
    pub fn stack_layer(&self) -> arm_kernels::GatedLayer<'_> {
        let (v, h) = (&self.vertical, &self.horizontal);
        arm_kernels::GatedLayer {
            vertical: &v.unfold,
            wv: &v.w,
            bv: &v.b,
            horizontal: &h.unfold,
            wh: &h.w,
            bh: &h.b,
            wvh: &self.v_to_h.w,
            bvh: &self.v_to_h.b,
            wo: &self.out.w,
            bo: &self.out.b,
        }
    }

    /// (v, h) -> (v', h') over whole images, h: (B, H*W, C_in), with the biases of a
    /// conditioning vector when given. Dropout acts on each gate's output in training.
    pub fn forward(
        &self,
        v: &Vertical,
        h: &Tensor,
        dropout: &Dropout,
        train: bool,
        bias: Option<&CondBias>,
    ) -> Result<(Vertical, Tensor)> {
        let fuse = !dropout.active(train);
        let add = |t: Tensor, b: Option<&Tensor>| match b {
            Some(b) => t.broadcast_add(&b.unsqueeze(1)?), // (B, H*W, 2C) + (B, 1, 2C)
            None => Ok(t),
        };
        let v_pre = match v {
            Vertical::Pixels(x) => self.vertical.forward(x)?,
            Vertical::Pre(p) if fuse => self.vertical.forward_gated(p)?,
            Vertical::Pre(p) => self.vertical.forward(&dropout.forward_t(&gate(p)?, train)?)?,
        }; // (B, H*W, 2C)
        let v_pre = add(v_pre, bias.map(|b| &b.0))?;
        let (hc, vh) = (&self.horizontal, &self.v_to_h);
        let h_pre = arm_kernels::dense_pair(h, &hc.unfold, &hc.w, &hc.b, &v_pre, &vh.w, &vh.b)?; // (B, H*W, 2C)
        let h_pre = add(h_pre, bias.map(|b| &b.1))?;
        let o = if fuse {
            self.out.forward_gated(&h_pre)?
        } else {
            self.out.forward(&dropout.forward_t(&gate(&h_pre)?, train)?)?
        }; // (B, H*W, C)
        let h = if self.residual { (h + o)? } else { o };
        Ok((Vertical::Pre(v_pre), h))
    }

    /// The vertical stack at cell `p` for a stepper: (pre-activations, gate of them), both
    /// (B, 2C) and (B, C). `input[q]` is the previous layer's gated vertical output (or the
    /// pixel) at cell q, for every cell this one reads; `zero` stands for cells outside.
    pub fn step_vertical(&self, p: usize, input: &[Tensor], zero: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let pre = self.vertical.forward_at(p, input, zero)?; // (B, 2C)
        let pre = match bias {
            Some(b) => pre.broadcast_add(b)?,
            None => pre,
        };
        let gated = gate(&pre)?; // (B, C)
        Ok((pre, gated))
    }

    /// The horizontal stack at cell `p` for a stepper: h' at p, (B, C). `input[q]` is the
    /// previous layer's h (or the pixel) at every cell up to p; `v_pre` this layer's vertical
    /// pre-activations at p.
    pub fn step_horizontal(
        &self,
        p: usize,
        input: &[Tensor],
        zero: &Tensor,
        v_pre: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let from_h = self.horizontal.forward_at(p, input, zero)?; // (B, 2C)
        let h_pre = (from_h + self.v_to_h.forward(v_pre)?)?; // (B, 2C)
        let h_pre = match bias {
            Some(b) => h_pre.broadcast_add(b)?,
            None => h_pre,
        };
        let o = self.out.forward(&gate(&h_pre)?)?; // (B, C)
        if self.residual {
            let h = input.get(p).ok_or_else(|| candle_core::Error::Msg(format!("step: cell {p} not computed yet")))?;
            h + o
        } else {
            Ok(o)
        }
    }
}
