//! `pixelcnnpp`: PixelCNN++ (Salimans, Karpathy, Chen & Kingma 2017, "PixelCNN++: Improving
//! the PixelCNN with Discretized Logistic Mixture Likelihood and Other Modifications", §2.3-2.5
//! and Fig. 2), for single-channel images. Two streams replace masks with shifted
//! convolutions: u sees the rows above (down-shifted 2x3 kernels), ul the rows above and the
//! pixels to the left (down-right-shifted 2x2 kernels, fed u as well):
//!
//!   u_0 = down_shift(conv_2x3(x)),  ul_0 = down_shift(conv_1x3(x)) + right_shift(conv_2x1(x))
//!   gated_resnet(v, a) = v + glu(conv(dropout(celu(conv(celu(v)) + nin(celu(a))))))
//!     with celu = concat_elu(y) = elu([y, -y]) and glu([p, q]) = p * sigmoid(q)
//!   up pass, at each of `resolutions` levels (after the first, a stride-2 conv of each stream):
//!     u <- gated_resnet(u),  ul <- gated_resnet(ul, u)              (nr_resnet times)
//!   down pass, from the coarsest level, consuming the up pass's outputs in reverse:
//!     u <- gated_resnet(u, u_skip),  ul <- gated_resnet(ul, [u, ul_skip])
//!     (nr_resnet times at the coarsest level, nr_resnet + 1 at the others, each after a
//!     stride-2 transposed conv of each stream)
//!   params = nin(elu(ul))
//!
//! The shifts are folded into tap lists (`layers/grid.rs`): u_0 reads rows r-2..r-1, columns
//! c-1..c+1; ul_0's two convolutions together read (r-1, c-1..c+1) and (r, c-1), one kernel
//! with the same reach as the sum of the two. Input cells are (2x - 1, 1): the paper's extra
//! channel of ones, so a convolution knows a zero pixel from the padding.
//! Left out: weight normalisation with data-dependent initialisation (weights start at
//! PyTorch's uniform default), colour channels, and the paper's 3 resolutions for 32x32 (the
//! number of levels is a key; each halves the grid, rounding up).
//!
//! Other orderings than raster (one resolution only): every kernel is a 3x3 window, locally
//! masked at each location to the pixels earlier in the ordering (Jain, Abbeel & Pathak 2020,
//! §3; their network is PixelCNN++ with these convolutions).
//!
//! The cached stepper computes every cell of every layer once, when the last pixel it depends
//! on is sampled (`GridNet::stepper`), so sampling costs one forward pass in total.

use serde::{Deserialize, Serialize};

use arm_core::Conditional;

use crate::layers::grid::{GridBuilder, GridConditional, GridNet, NodeId, Resample};
use crate::layers::Dropout;
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

/// Down-shifted 2x3 kernel: the row above and this row, columns c-1..c+1 (u stream).
const DOWN: [(isize, isize); 6] = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1)];
/// Down-right-shifted 2x2 kernel: rows r-1..r, columns c-1..c (ul stream).
const DOWN_RIGHT: [(isize, isize); 4] = [(-1, -1), (-1, 0), (0, -1), (0, 0)];
/// down_shift(conv_2x3(x)): the two rows above.
const U_FIRST: [(isize, isize); 6] = [(-2, -1), (-2, 0), (-2, 1), (-1, -1), (-1, 0), (-1, 1)];
/// down_shift(conv_1x3(x)) + right_shift(conv_2x1(x)): the row above and the pixel to the left.
const UL_FIRST: [(isize, isize); 4] = [(-1, -1), (-1, 0), (-1, 1), (0, -1)];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PixelCnnPpConfig {
    /// Gated ResNet blocks per stream at each resolution of the up pass.
    pub nr_resnet: usize,
    /// Feature maps of every layer.
    pub nr_filters: usize,
    /// Resolutions (levels): the image, then halved (rounding up) resolutions-1 times.
    pub resolutions: usize,
    /// Dropout inside every gated ResNet block (training only).
    pub dropout: f64,
}

impl Default for PixelCnnPpConfig {
    fn default() -> Self {
        Self { nr_resnet: 2, nr_filters: 64, resolutions: 2, dropout: 0.5 }
    }
}

impl PluginConfig for PixelCnnPpConfig {
    const NAME: &'static str = "pixelcnnpp";
    const SUMMARY: &'static str = "PixelCNN++: down / down-right shifted gated ResNet streams over several resolutions";
    const CONDITIONING: bool = true;
    const IS_2D: bool = true;
    const LOCAL_MASKS: bool = true;

    fn validate_local(&self) -> Result<(), PluginError> {
        if self.resolutions != 1 {
            let msg = format!("must be 1 for another ordering than raster (a down-sampled cell mixes pixels of different ranks), got {}", self.resolutions);
            return Err(invalid("resolutions", msg));
        }
        Ok(())
    }

    fn validate(&self, h: usize, w: usize) -> Result<(), PluginError> {
        if self.nr_resnet == 0 {
            return Err(invalid("nr_resnet", "must be at least 1, got 0"));
        }
        if self.nr_filters == 0 {
            return Err(invalid("nr_filters", "must be at least 1, got 0"));
        }
        // Below 1x1 halving changes nothing; a level more than the image allows is a mistake.
        let most = 1 + (h.max(w) as f64).log2().ceil() as usize;
        if self.resolutions == 0 || self.resolutions > most {
            return Err(invalid(
                "resolutions",
                format!("must be in 1..={most} for {h}x{w} images, got {}", self.resolutions),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        Ok(Box::new(network(self, &ctx, Shifts::Paper)?))
    }

    fn test_configs() -> Vec<Self> {
        let c = |nr_resnet, nr_filters, resolutions| Self { nr_resnet, nr_filters, resolutions, dropout: 0.0 };
        vec![c(1, 3, 1), c(1, 4, 2), c(2, 3, 2)]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("nr_resnet", "gated ResNet blocks per stream and resolution"),
            ("nr_filters", "feature maps of every layer"),
            ("resolutions", "levels: the image, then halved (rounding up) each time"),
            ("dropout", "dropout inside each gated ResNet block"),
        ]
    }
}

/// The paper's kernels, or (for the tests) a ul stream that also reads the pixel itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shifts {
    Paper,
    #[cfg(test)]
    Leaky,
}

fn network(cfg: &PixelCnnPpConfig, ctx: &BuildCtx, shifts: Shifts) -> Result<GridConditional> {
    let (r, f) = (cfg.nr_resnet, cfg.nr_filters);
    let image = (ctx.height, ctx.width);
    let g = GridNet::new(image, Dropout::new(cfg.dropout, ctx.seed)).locally_masked(ctx.order.clone()).conditioned(ctx.cond_dim);
    let mut b = GridBuilder::new(g, ctx.vb.clone());
    let x = GridNet::INPUT;
    let ul_first: &[(isize, isize)] = match shifts {
        Shifts::Paper => &UL_FIRST,
        #[cfg(test)]
        Shifts::Leaky => &[(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0)],
    };
    // Another ordering: every kernel is the 3x3 window, locally masked by the grid.
    let window = crate::layers::window_taps(3);
    type Taps<'t> = &'t [(isize, isize)];
    let (u_first, ul_first, down, down_right): (Taps, Taps, Taps, Taps) = match ctx.order {
        Some(_) => (&window, &window, &window, &window),
        None => (&U_FIRST, ul_first, &DOWN, &DOWN_RIGHT),
    };

    // Up pass.
    let mut u_list = vec![b.conv(x, u_first, Resample::Same, f)?];
    let mut ul_list = vec![b.conv(x, ul_first, Resample::Same, f)?];
    let mut grids = vec![image];
    for level in 0..cfg.resolutions {
        if level > 0 {
            let (u, ul) = (last(&u_list)?, last(&ul_list)?);
            u_list.push(b.conv(u, down, Resample::Down2, f)?);
            ul_list.push(b.conv(ul, down_right, Resample::Down2, f)?);
            grids.push(b.g.grid(last(&u_list)?));
        }
        for _ in 0..r {
            let u = b.gated_resnet(last(&u_list)?, None, down)?;
            u_list.push(u);
            let ul = b.gated_resnet(last(&ul_list)?, Some(u), down_right)?;
            ul_list.push(ul);
        }
    }

    // Down pass.
    let (mut u, mut ul) = (pop(&mut u_list)?, pop(&mut ul_list)?);
    for level in (0..cfg.resolutions).rev() {
        let blocks = if level + 1 == cfg.resolutions { r } else { r + 1 };
        for _ in 0..blocks {
            let u_skip = pop(&mut u_list)?;
            u = b.gated_resnet(u, Some(u_skip), down)?;
            let ul_skip = pop(&mut ul_list)?;
            let aux = b.g.concat(u, ul_skip)?;
            ul = b.gated_resnet(ul, Some(aux), down_right)?;
        }
        if level > 0 {
            u = b.conv(u, down, Resample::Up2(grids[level - 1]), f)?;
            ul = b.conv(ul, down_right, Resample::Up2(grids[level - 1]), f)?;
        }
    }
    if !u_list.is_empty() || !ul_list.is_empty() {
        candle_core::bail!("pixelcnnpp: {} skip connections left unused", u_list.len() + ul_list.len());
    }
    let out = b.g.elu(ul);
    b.nin(out, ctx.num_params)?;
    Ok(GridConditional::new("pixelcnnpp", b.finish(), ctx.device.clone()))
}

fn last(list: &[NodeId]) -> Result<NodeId> {
    list.last().copied().ok_or_else(|| candle_core::Error::Msg("pixelcnnpp: empty stream".into()))
}

fn pop(list: &mut Vec<NodeId>) -> Result<NodeId> {
    list.pop().ok_or_else(|| candle_core::Error::Msg("pixelcnnpp: skip connections run out".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use arm_core::{Arm, Categorical, Ordering};
    use candle_nn::VarMap;

    fn net(
        cfg: &PixelCnnPpConfig,
        (h, w): (usize, usize),
        (p, k): (usize, usize),
        shifts: Shifts,
    ) -> Result<GridConditional> {
        let ctx = conformance::test_ctx(&VarMap::new(), 3, (h, w), (p, k));
        network(cfg, &ctx, shifts)
    }

    fn small(resolutions: usize) -> PixelCnnPpConfig {
        PixelCnnPpConfig { nr_resnet: 1, nr_filters: 4, resolutions, dropout: 0.0 }
    }

    /// A first ul kernel that also reads the pixel itself fails causality and normalisation;
    /// the paper's passes both.
    #[test]
    fn the_conformance_checks_catch_a_broken_shift() -> Result<()> {
        for resolutions in [1, 2, 3] {
            let cfg = small(resolutions);
            let good = net(&cfg, (3, 4), (3, conformance::LEVELS), Shifts::Paper)?;
            conformance::causality(&good, 4, true, true).map_err(candle_core::Error::msg)?;
            let broken = net(&cfg, (3, 4), (3, conformance::LEVELS), Shifts::Leaky)?;
            let e = conformance::causality(&broken, 4, true, true).expect_err("a leaky shift passed causality");
            assert!(e.contains("changed when input"), "{e}");
            assert!(broken.stepper(1).is_err(), "the stepper accepted a non-causal network");
            let arm = |shifts| -> Result<Arm> {
                let n = net(&cfg, (2, 2), (3, 3), shifts)?;
                Arm::new(Box::new(n), Box::new(Categorical::new(3)), 3, (2, 2), Ordering::Raster)
            };
            conformance::sums_to_one(&arm(Shifts::Paper)?).map_err(candle_core::Error::msg)?;
            assert!(conformance::sums_to_one(&arm(Shifts::Leaky)?).is_err(), "a leaky shift still sums to one");
        }
        Ok(())
    }

    /// On 8x8 with 2 and 3 levels (the digits shapes) the stepper reproduces the forward rows.
    #[test]
    fn stepper_matches_forward_on_8x8() -> Result<()> {
        for resolutions in [2, 3] {
            let n = net(&small(resolutions), (8, 8), (4, conformance::LEVELS), Shifts::Paper)?;
            conformance::stepper_matches_forward(&n).map_err(candle_core::Error::msg)?;
        }
        Ok(())
    }

    /// FLOPs of a 1-level network counted by hand: two first convs, then per block a conv to F
    /// and a conv to 2F (the ul blocks with a nin of the 2F-channel concat_elu of u or [u, ul]),
    /// and the output nin.
    #[test]
    fn flops_are_counted_per_layer() -> Result<()> {
        let (f, p, n) = (4.0, 3.0, 6.0); // 2x3 image
        let cfg = PixelCnnPpConfig { nr_resnet: 1, nr_filters: 4, resolutions: 1, dropout: 0.0 };
        let got = net(&cfg, (2, 3), (3, 3), Shifts::Paper)?.flops_per_image().expect("counted");
        let first = 6.0 * 2.0 * f + 4.0 * 2.0 * f;
        let u_block = |aux: f64| 6.0 * 2.0 * f * f + 6.0 * 2.0 * f * 2.0 * f + aux * f;
        let ul_block = |aux: f64| 4.0 * 2.0 * f * f + 4.0 * 2.0 * f * 2.0 * f + aux * f;
        let up = u_block(0.0) + ul_block(2.0 * f);
        let down = u_block(2.0 * f) + ul_block(4.0 * f);
        let want = 2.0 * n * (first + up + down + f * p);
        assert_eq!(got, want);
        Ok(())
    }
}
