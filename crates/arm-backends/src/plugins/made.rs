//! `made`: the masked autoencoder for distribution estimation (Germain et al. 2015, §4, eq.
//! 10-13): an MLP whose weight masks leave output d connected only to inputs that come before
//! d in an ordering. Units carry connectivity degrees: input j has its rank in the ordering,
//! m_0(j) in 1..D; a hidden unit k of layer l has m_l(k) drawn uniformly from
//! [min m_{l-1}, D - 1]; a hidden weight exists where m_l(k) >= m_{l-1}(k') (eq. 12) and an
//! output weight where m_0(d) > m_L(k) (eq. 13):
//!
//!   h_l = ReLU((W_l . M_l) h_{l-1} + b_l),   params = (V . M_V) h_L + c.
//!
//! Connectivity- and order-agnostic training (§4.2): `num_masks` mask sets (masks and, with
//! `order = "random"`, orderings) are drawn once from the run's seed; each training step uses
//! one of them, drawn from a stream re-seeded per epoch, so a resumed run repeats the draws.
//! Mask set 0 keeps the sequence order (the one the samplers walk). Evaluation averages the
//! probabilities of the first `eval_masks` sets: log (1/n) sum_m p_m(x), the log of the mean.
//!
//! The cached stepper (mask set 0) keeps the first layer's pre-activations as a running sum
//! over the pixels pushed so far and recomputes only the deeper layers and the current pixel's
//! output columns.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};

use crate::layers::{masked_linear, MaskedLinear, MemberDraws};
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MadeOrder {
    /// Every mask set follows the sequence order (connectivity-agnostic only).
    #[default]
    Raster,
    /// Mask sets after the first follow random orderings (order-agnostic).
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MadeConfig {
    /// Widths of the hidden layers (any depth; [] is a masked linear map).
    pub hidden: Vec<usize>,
    /// "raster" (the sequence order for every mask set) or "random" (random orderings after
    /// the first set).
    pub order: MadeOrder,
    /// Mask sets drawn from the seed; one per training step.
    pub num_masks: usize,
    /// Mask sets averaged at evaluation (the first ones; <= num_masks).
    pub eval_masks: usize,
}

impl Default for MadeConfig {
    /// The paper's single hidden layer of 500 units, one mask.
    fn default() -> Self {
        Self { hidden: vec![500], order: MadeOrder::Raster, num_masks: 1, eval_masks: 1 }
    }
}

impl PluginConfig for MadeConfig {
    const NAME: &'static str = "made";
    const SUMMARY: &'static str = "MADE: masked MLP from connectivity degrees; mask and order ensembles";
    const SEES_PREDECESSOR: bool = false;

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if let Some(i) = self.hidden.iter().position(|&h| h == 0) {
            return Err(invalid(&format!("hidden[{i}]"), "must be at least 1, got 0"));
        }
        if self.num_masks == 0 {
            return Err(invalid("num_masks", "must be at least 1, got 0"));
        }
        if self.eval_masks == 0 || self.eval_masks > self.num_masks {
            return Err(invalid(
                "eval_masks",
                format!("must be between 1 and num_masks = {}, got {}", self.num_masks, self.eval_masks),
            ));
        }
        if self.order == MadeOrder::Random && self.num_masks < 2 {
            return Err(invalid(
                "order",
                "\"random\" needs num_masks >= 2: mask set 0 keeps the sequence order the samplers walk",
            ));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        Ok(Box::new(Made::new(self, &ctx)?))
    }

    fn test_configs() -> Vec<Self> {
        let c = |hidden: &[usize], order, num_masks, eval_masks| Self {
            hidden: hidden.to_vec(),
            order,
            num_masks,
            eval_masks,
        };
        vec![
            c(&[6], MadeOrder::Raster, 1, 1),
            c(&[5, 7], MadeOrder::Raster, 3, 3),
            c(&[8], MadeOrder::Random, 4, 2),
            c(&[], MadeOrder::Random, 2, 2),
        ]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("hidden", "widths of the hidden layers (any depth)"),
            ("order", "\"raster\" (sequence order) or \"random\" (random orderings after mask set 0)"),
            ("num_masks", "mask sets drawn from the seed; training uses one per step"),
            ("eval_masks", "mask sets whose probabilities are averaged at evaluation (<= num_masks)"),
        ]
    }
}

/// Salts of the two seeded streams: the mask sets, and the per-step draws among them.
const MASK_SALT: u64 = 0x4D41_4445;
const DRAW_SALT: u64 = 0x4D41_4446;

/// One connectivity pattern: the ordering (order[i] = position of the i-th variable) and the
/// degrees of the inputs (degrees[0][j] = rank of position j, 1-based) and of each hidden layer.
struct MaskSet {
    order: Vec<usize>,
    degrees: Vec<Vec<usize>>,
}

fn mask_sets(d: usize, hidden: &[usize], order: MadeOrder, n: usize, seed: u64) -> Vec<MaskSet> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ MASK_SALT);
    (0..n)
        .map(|m| {
            let mut ord: Vec<usize> = (0..d).collect();
            if m > 0 && order == MadeOrder::Random {
                ord.shuffle(&mut rng);
            }
            let mut rank = vec![0; d];
            for (i, &j) in ord.iter().enumerate() {
                rank[j] = i + 1;
            }
            let mut degrees = vec![rank];
            for &width in hidden {
                let lo = degrees.last().and_then(|p| p.iter().copied().min()).unwrap_or(1);
                // D - 1 is the highest useful degree; with D = 1 no hidden unit can be used.
                let hi = d.saturating_sub(1).max(lo);
                degrees.push((0..width).map(|_| rng.random_range(lo..=hi)).collect());
            }
            MaskSet { order: ord, degrees }
        })
        .collect()
}

/// Hidden weight (k', k) exists where m_l(k) >= m_{l-1}(k') (eq. 12), (in, out) row-major.
fn hidden_mask(prev: &[usize], cur: &[usize]) -> Vec<f32> {
    prev.iter().flat_map(|&a| cur.iter().map(move |&b| f32::from(b >= a))).collect()
}

/// Output weight (k, d p) exists where m_0(d) > m_L(k) (eq. 13); without hidden layers the
/// inputs themselves are the last layer.
fn output_mask(inputs: &[usize], last: Option<&Vec<usize>>, p: usize) -> Vec<f32> {
    let last = last.map_or(inputs, |v| v.as_slice());
    last.iter().flat_map(|&k| inputs.iter().flat_map(move |&d| std::iter::repeat_n(f32::from(d > k), p))).collect()
}

pub struct Made {
    hidden: Vec<MaskedLinear>,
    out: MaskedLinear, // (H_L, D P)
    orders: Vec<Vec<usize>>,
    eval_masks: usize,
    draws: MemberDraws,
    params: usize,
    dims: usize,
    device: Device,
}

impl Made {
    fn new(cfg: &MadeConfig, ctx: &BuildCtx) -> Result<Made> {
        let (d, p) = (ctx.dims(), ctx.num_params);
        let sets = mask_sets(d, &cfg.hidden, cfg.order, cfg.num_masks, ctx.seed);
        let mut widths = vec![d];
        widths.extend(&cfg.hidden);
        let mut hidden = Vec::with_capacity(cfg.hidden.len());
        for l in 0..cfg.hidden.len() {
            let masks: Vec<Vec<f32>> = sets.iter().map(|s| hidden_mask(&s.degrees[l], &s.degrees[l + 1])).collect();
            hidden.push(masked_linear(widths[l], widths[l + 1], &masks, ctx.vb.pp(format!("hidden.{l}")))?);
        }
        let last = widths[widths.len() - 1];
        let masks: Vec<Vec<f32>> = sets.iter().map(|s| output_mask(&s.degrees[0], s.degrees.last(), p)).collect();
        let out = masked_linear(last, d * p, &masks, ctx.vb.pp("out"))?;
        Ok(Made {
            hidden,
            out,
            orders: sets.into_iter().map(|s| s.order).collect(),
            eval_masks: cfg.eval_masks,
            draws: MemberDraws::new(ctx.seed, DRAW_SALT),
            params: p,
            dims: d,
            device: ctx.device.clone(),
        })
    }

    /// The forward pass through mask set `m`: (B, D) -> (B, D, P).
    fn forward_with(&self, x: &Tensor, m: usize) -> Result<Tensor> {
        let (b, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("made: input has {d} positions, built for {}", self.dims);
        }
        let mut h = x.clone();
        for layer in &self.hidden {
            h = layer.forward(&h, m, true)?; // (B, H_l)
        }
        self.out.forward(&h, m, false)?.reshape((b, d, self.params))
    }
}

impl Conditional for Made {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let n = self.orders.len();
        let m = self.draws.member(n, train);
        self.forward_with(x, m)
    }

    fn seq_len(&self) -> usize {
        self.dims
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn begin_epoch(&self, epoch: usize) {
        self.draws.begin_epoch(epoch);
    }

    fn members(&self) -> (usize, usize) {
        (self.eval_masks, self.orders.len())
    }

    fn forward_member(&self, x: &Tensor, m: usize) -> Result<Tensor> {
        if m >= self.orders.len() {
            candle_core::bail!("made: mask set {m} of {}", self.orders.len());
        }
        self.forward_with(x, m)
    }

    fn member_order(&self, m: usize) -> Option<Vec<usize>> {
        let ord = self.orders.get(m)?;
        (!ord.iter().enumerate().all(|(i, &j)| i == j)).then(|| ord.clone())
    }

    fn flops_per_image(&self) -> Option<f64> {
        let mut widths = vec![self.dims];
        widths.extend(self.hidden.iter().map(|l| l.out_features()));
        let products: usize = widths.windows(2).map(|w| w[0] * w[1]).sum();
        Some(2.0 * (products + widths[widths.len() - 1] * self.dims * self.params) as f64)
    }

    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        let first = self.hidden.first().unwrap_or(&self.out);
        Ok(Box::new(MadeStepper { net: self, pos: 0, acc: first.bias_rows(batch)? }))
    }
}

/// Cached generation with mask set 0: `acc` is the first layer's pre-activations over the
/// pixels pushed so far (B, H_1), or the outputs themselves when there is no hidden layer.
struct MadeStepper<'a> {
    net: &'a Made,
    pos: usize,
    acc: Tensor,
}

impl Stepper for MadeStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        let (net, p) = (self.net, self.net.params);
        if self.pos >= net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", net.dims);
        }
        if net.hidden.is_empty() {
            return self.acc.narrow(1, self.pos * p, p);
        }
        let mut h = self.acc.relu()?; // (B, H_1)
        for layer in &net.hidden[1..] {
            h = layer.forward(&h, 0, true)?;
        }
        net.out.forward_columns(&h, 0, self.pos * p, p) // (B, P)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        let first = self.net.hidden.first().unwrap_or(&self.net.out);
        self.acc = first.add_input(&self.acc, &x_d.flatten_all()?, self.pos, 0)?;
        self.pos += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use arm_core::{seeded_var_builder, Arm, Categorical, Ordering};
    use candle_nn::VarMap;

    fn made(cfg: &MadeConfig, (h, w): (usize, usize), p: usize) -> Result<(Made, VarMap)> {
        let map = VarMap::new();
        let ctx = BuildCtx {
            vb: seeded_var_builder(&map, 3, &Device::Cpu),
            device: Device::Cpu,
            height: h,
            width: w,
            num_params: p,
            levels: 5,
            seed: 3,
            order: None,
            cond_dim: 0,
        };
        Ok((Made::new(cfg, &ctx)?, map))
    }

    /// Hand-checked degrees: hidden unit k of degree m connects from inputs of rank <= m and
    /// to outputs of rank > m.
    #[test]
    fn masks_follow_the_degrees() {
        // Inputs ranks [1, 2, 3]; hidden degrees [1, 2].
        assert_eq!(hidden_mask(&[1, 2, 3], &[1, 2]), vec![1., 1., 0., 1., 0., 0.]);
        // Hidden degrees [1, 2] -> outputs of ranks [1, 2, 3], P = 1.
        assert_eq!(output_mask(&[1, 2, 3], Some(&vec![1, 2]), 1), vec![0., 1., 1., 0., 0., 1.]);
        // No hidden layer: output d sees inputs of lower rank (P = 2).
        // Position 0 has rank 2, position 1 rank 1: only input 1 feeds output 0.
        assert_eq!(output_mask(&[2, 1], None, 2), vec![0., 0., 0., 0., 1., 1., 0., 0.]);
    }

    /// Every mask set of a trained-size config is a valid ARM in its own order, and connecting
    /// one forbidden weight (an output to a hidden unit that already sees that output's input,
    /// or a hidden unit to a later input) makes the conformance checks fail.
    #[test]
    fn the_conformance_checks_catch_a_broken_mask() -> Result<()> {
        let cfg = MadeConfig { hidden: vec![16], order: MadeOrder::Random, num_masks: 3, eval_masks: 3 };
        let (net, _) = made(&cfg, (2, 2), 3)?;
        conformance::causality(&net, 2, false, false).map_err(candle_core::Error::msg)?;
        // Break the output mask of set 0: the first variable's parameters read a hidden unit
        // of the highest degree (which sees every earlier input, so more than nothing).
        let (mut broken, _) = made(&cfg, (2, 2), 3)?;
        let top = (0..16).find(|&k| !broken.out.connected(0, k, 3 * 3).unwrap_or(true)).unwrap_or(0);
        broken.out.force_connect(0, top, 0)?;
        let e = conformance::causality(&broken, 2, false, false).expect_err("a broken output mask passed");
        assert!(e.contains("member 0"), "{e}");
        let arm = Arm::new(Box::new(broken), Box::new(Categorical::new(3)), 3, (2, 2), Ordering::Raster)?;
        assert!(conformance::sums_to_one(&arm).is_err(), "a broken mask still sums to one");
        // Break a hidden mask of set 2: a unit of degree 1 reads the last input in its order.
        let (mut broken, _) = made(&cfg, (2, 2), 3)?;
        let last = broken.orders[2][3];
        let low = (0..16).find(|&k| !broken.hidden[0].connected(2, last, k).unwrap_or(true)).unwrap_or(0);
        broken.hidden[0].force_connect(2, last, low)?;
        let e = conformance::causality(&broken, 2, false, false).expect_err("a broken hidden mask passed");
        assert!(e.contains("member 2"), "{e}");
        Ok(())
    }

    /// Training draws a mask set per step from a stream re-seeded per epoch: the same epoch
    /// gives the same draws, and with several sets not all steps use the same one.
    #[test]
    fn training_draws_repeat_per_epoch() -> Result<()> {
        let cfg = MadeConfig { hidden: vec![8], order: MadeOrder::Random, num_masks: 4, eval_masks: 1 };
        let (net, _) = made(&cfg, (2, 3), 2)?;
        let x = conformance::random_levels(2, 6, 2, 1, &Device::Cpu)?;
        let run = |epoch| -> Result<Vec<Vec<f32>>> {
            net.begin_epoch(epoch);
            (0..6).map(|_| net.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()).collect()
        };
        let (a, b) = (run(3)?, run(3)?);
        assert_eq!(a, b, "same epoch, different draws");
        assert!(a.iter().any(|o| o != &a[0]), "six steps all used one mask set");
        Ok(())
    }
}
