//! `pixelsnail`: PixelSNAIL (Chen, Mishra, Rohaninejad & Abbeel 2018, "PixelSNAIL: An Improved
//! Autoregressive Generative Model", §2-3 and Fig. 3), for single-channel images: residual
//! blocks of gated causal convolutions, each followed by causal attention over every earlier
//! pixel in raster order:
//!
//!   ul_0 = down_shift(conv_1x3(x)) + right_shift(conv_2x1(x))      (as in PixelCNN++)
//!   block b:  ul <- gated_resnet(ul)                                 (nr_resnet times, 2x2
//!                                                                     down-right kernels)
//!             k = nin(gated_resnet_1x1([x, ul, bg])),  v = nin(gated_resnet_1x1([x, ul, bg]))
//!             q = nin(gated_resnet_1x1([ul, bg]))
//!             a = attention(q, k, v),  pixel i attending to pixels j < i (several heads)
//!             ul <- gated_resnet_1x1(ul, aux = a)
//!   params = nin(elu(ul))
//!
//! with gated_resnet as in PixelCNN++ (`layers/grid.rs`) and bg the background channels
//! ((r - H/2)/H, (c - W/2)/W). The keys and values read the input pixel itself, so the
//! attention must be strict (j < i; pixel 0 attends to nothing and gets zeros).
//! Left out: colour channels and the paper's per-block skip of the raw input features.
//!
//! Other orderings than raster: the 2x2 and first kernels become 3x3 windows, locally masked
//! to the pixels earlier in the ordering (Jain, Abbeel & Pathak 2020, §3), and the attention
//! runs over the cells permuted into the ordering, so its causal mask is the ordering's.
//!
//! The cached stepper computes each cell of every layer once, when the pixels it depends on
//! are known; the attention of pixel i reads the cached keys and values of pixels < i.

use serde::{Deserialize, Serialize};

use arm_core::Conditional;

use crate::layers::grid::{GridBuilder, GridConditional, GridNet, Resample};
use crate::layers::Dropout;
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

/// Down-right-shifted 2x2 kernel: rows r-1..r, columns c-1..c.
const DOWN_RIGHT: [(isize, isize); 4] = [(-1, -1), (-1, 0), (0, -1), (0, 0)];
/// The first layer: the row above (c-1..c+1) and the pixel to the left.
const FIRST: [(isize, isize); 4] = [(-1, -1), (-1, 0), (-1, 1), (0, -1)];
/// A 1x1 convolution.
const NIN: [(isize, isize); 1] = [(0, 0)];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PixelSnailConfig {
    /// Residual blocks, each gated ResNets followed by attention.
    pub nr_blocks: usize,
    /// Gated ResNet blocks (2x2 down-right kernels) before each attention.
    pub nr_resnet: usize,
    /// Feature maps of the convolutional stream.
    pub nr_filters: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key (and query) size per head.
    pub key_size: usize,
    /// Value size per head.
    pub value_size: usize,
    /// Dropout inside every gated ResNet block (training only).
    pub dropout: f64,
}

impl Default for PixelSnailConfig {
    fn default() -> Self {
        Self { nr_blocks: 2, nr_resnet: 2, nr_filters: 64, heads: 2, key_size: 16, value_size: 32, dropout: 0.2 }
    }
}

impl PluginConfig for PixelSnailConfig {
    const NAME: &'static str = "pixelsnail";
    const SUMMARY: &'static str =
        "PixelSNAIL: gated causal convolutions and strictly causal attention over all earlier pixels";
    const CONDITIONING: bool = true;
    const IS_2D: bool = true;
    const LOCAL_MASKS: bool = true;

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        for (key, v) in [
            ("nr_blocks", self.nr_blocks),
            ("nr_resnet", self.nr_resnet),
            ("nr_filters", self.nr_filters),
            ("heads", self.heads),
            ("key_size", self.key_size),
            ("value_size", self.value_size),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1, got 0"));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        Ok(Box::new(network(self, &ctx, true)?))
    }

    fn test_configs() -> Vec<Self> {
        let c = |nr_blocks, nr_resnet, nr_filters, heads| Self {
            nr_blocks,
            nr_resnet,
            nr_filters,
            heads,
            key_size: 2,
            value_size: 3,
            dropout: 0.0,
        };
        vec![c(1, 1, 3, 1), c(2, 1, 4, 2)]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("nr_blocks", "residual blocks, each gated ResNets then attention"),
            ("nr_resnet", "gated ResNet blocks (2x2 down-right kernels) per block"),
            ("nr_filters", "feature maps of the convolutional stream"),
            ("heads", "attention heads"),
            ("key_size", "key and query size per head"),
            ("value_size", "value size per head"),
            ("dropout", "dropout inside each gated ResNet block"),
        ]
    }
}

/// `strict = false` (tests only) lets each pixel attend to its own key, which reads it.
fn network(cfg: &PixelSnailConfig, ctx: &BuildCtx, strict: bool) -> Result<GridConditional> {
    let f = cfg.nr_filters;
    let (hk, hv) = (cfg.heads * cfg.key_size, cfg.heads * cfg.value_size);
    let g = GridNet::new((ctx.height, ctx.width), Dropout::new(cfg.dropout, ctx.seed)).locally_masked(ctx.order.clone()).conditioned(ctx.cond_dim);
    let mut b = GridBuilder::new(g, ctx.vb.clone());
    // Another ordering: 3x3 windows, locally masked by the grid (the 1x1 maps stay).
    let window = crate::layers::window_taps(3);
    let (first, down_right): (&[(isize, isize)], &[(isize, isize)]) = match ctx.order {
        Some(_) => (&window, &window),
        None => (&FIRST, &DOWN_RIGHT),
    };
    let x = GridNet::INPUT;
    let bg = b.g.background();
    let mut ul = b.conv(x, first, Resample::Same, f)?;
    for _ in 0..cfg.nr_blocks {
        for _ in 0..cfg.nr_resnet {
            ul = b.gated_resnet(ul, None, down_right)?;
        }
        let x_ul = b.g.concat(x, ul)?;
        let kv_in = b.g.concat(x_ul, bg)?;
        let q_in = b.g.concat(ul, bg)?;
        let k = b.gated_resnet(kv_in, None, &NIN)?;
        let k = b.nin(k, hk)?;
        let v = b.gated_resnet(kv_in, None, &NIN)?;
        let v = b.nin(v, hv)?;
        let q = b.gated_resnet(q_in, None, &NIN)?;
        let q = b.nin(q, hk)?;
        let a = b.g.attention(q, k, v, cfg.heads, strict)?;
        ul = b.gated_resnet(ul, Some(a), &NIN)?;
    }
    let out = b.g.elu(ul);
    b.nin(out, ctx.num_params)?;
    Ok(GridConditional::new("pixelsnail", b.finish(), ctx.device.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use arm_core::{Arm, Categorical, Ordering};
    use candle_core::{Device, Tensor};
    use candle_nn::VarMap;

    fn net(
        cfg: &PixelSnailConfig,
        (h, w): (usize, usize),
        (p, k): (usize, usize),
        strict: bool,
    ) -> Result<GridConditional> {
        let ctx = conformance::test_ctx(&VarMap::new(), 5, (h, w), (p, k));
        network(cfg, &ctx, strict)
    }

    fn small() -> PixelSnailConfig {
        PixelSnailConfig {
            nr_blocks: 2,
            nr_resnet: 1,
            nr_filters: 4,
            heads: 2,
            key_size: 2,
            value_size: 2,
            dropout: 0.0,
        }
    }

    /// Attention that lets a pixel see its own key (which reads the pixel) fails causality and
    /// normalisation, and the stepper refuses it; the strict one passes both.
    #[test]
    fn the_conformance_checks_catch_a_non_strict_causal_mask() -> Result<()> {
        let good = net(&small(), (3, 4), (3, conformance::LEVELS), true)?;
        conformance::causality(&good, 4, true, true).map_err(candle_core::Error::msg)?;
        let broken = net(&small(), (3, 4), (3, conformance::LEVELS), false)?;
        let e = conformance::causality(&broken, 4, true, true).expect_err("a non-strict mask passed causality");
        assert!(e.contains("changed when input"), "{e}");
        assert!(broken.stepper(1).is_err(), "the stepper accepted a non-causal network");
        let arm = |strict| -> Result<Arm> {
            let n = net(&small(), (2, 2), (3, 3), strict)?;
            Arm::new(Box::new(n), Box::new(Categorical::new(3)), 3, (2, 2), Ordering::Raster)
        };
        conformance::sums_to_one(&arm(true)?).map_err(candle_core::Error::msg)?;
        assert!(conformance::sums_to_one(&arm(false)?).is_err(), "a non-strict mask still sums to one");
        Ok(())
    }

    /// On 8x8 the stepper reproduces the forward rows (attention over up to 63 cached pixels).
    #[test]
    fn stepper_matches_forward_on_8x8() -> Result<()> {
        let n = net(&small(), (8, 8), (4, conformance::LEVELS), true)?;
        conformance::stepper_matches_forward(&n).map_err(candle_core::Error::msg)
    }

    /// A pixel beyond the convolutions' reach is seen through the attention: with one block of
    /// one ResNet, the convolutions of pixel (7, 7) reach 3 rows up (the first layer and two
    /// 2x2 kernels), yet its output changes with pixel (0, 0).
    #[test]
    fn attention_reaches_beyond_the_convolutions() -> Result<()> {
        let cfg = PixelSnailConfig { nr_blocks: 1, nr_resnet: 1, ..small() };
        let n = net(&cfg, (8, 8), (3, conformance::LEVELS), true)?;
        let x = Tensor::zeros((1, 64), candle_core::DType::F32, &Device::Cpu)?;
        let mut v = vec![0f32; 64];
        v[0] = 1.0;
        let x2 = Tensor::from_vec(v, (1, 64), &Device::Cpu)?;
        let diff = (n.forward_t(&x2, false)? - n.forward_t(&x, false)?)?
            .narrow(1, 63, 1)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(diff > 0.0, "the last pixel does not see the first");
        Ok(())
    }

    /// In another ordering the attention follows it: in zig-zag order on 8x8, the last pixel
    /// (7, 7) sees the first (0, 0) through the attention (the convolutions reach 3 cells), and
    /// in the reversed direction nothing leaks: pixel (0, 0), first in the order, changes with
    /// no other pixel (causality of the attention's permuted mask).
    #[test]
    fn attention_follows_another_ordering() -> Result<()> {
        let cfg = PixelSnailConfig { nr_blocks: 1, nr_resnet: 1, ..small() };
        let mut ctx = conformance::test_ctx(&VarMap::new(), 5, (8, 8), (3, conformance::LEVELS));
        ctx.order = Some(Ordering::Zigzag.rank(8, 8).into());
        let n = network(&cfg, &ctx, true)?;
        let base = n.forward_t(&Tensor::zeros((1, 64), candle_core::DType::F32, &Device::Cpu)?, false)?;
        let change = |pixel: usize| -> Result<Vec<f32>> {
            let mut v = vec![0f32; 64];
            v[pixel] = 1.0;
            let out = n.forward_t(&Tensor::from_vec(v, (1, 64), &Device::Cpu)?, false)?;
            (out - &base)?.abs()?.sum(2)?.squeeze(0)?.to_vec1::<f32>()
        };
        assert!(change(0)?[63] > 0.0, "the last pixel does not see the first");
        for pixel in 1..64 {
            assert_eq!(change(pixel)?[0], 0.0, "pixel 0, first in zig-zag order, sees pixel {pixel}");
        }
        Ok(())
    }
}
