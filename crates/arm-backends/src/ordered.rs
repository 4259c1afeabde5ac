//! Any ordering for every plugin, and order-agnostic training with order ensembles.
//!
//! The `Arm` hands a network the pixels in its own sequence order (the first ordering listed,
//! the one the samplers walk). An [`Ordered`] network has one member per ordering, all with
//! the plugin's one set of weights:
//! - 1D plugins: one network; member m gathers the sequence into its ordering, runs the
//!   network and gathers the parameters back to the `Arm`'s positions (order-agnostic
//!   training as in Uria, Murray & Larochelle 2014, "A Deep and Tractable Density Estimator");
//! - 2D plugins: one locally masked network per ordering over the image layout (the same
//!   variables, each location's kernels masked to the pixels earlier in that ordering; Jain,
//!   Abbeel & Pathak 2020, "Locally Masked Convolution for Autoregressive Models", §3-4).
//!
//! Training draws one member per batch from a stream re-seeded per epoch (a resumed run draws
//! the same ones). Evaluation averages the first `eval_orders` members' probabilities,
//! log (1/n) sum_m p_m(x) (`Arm::log_prob_members`): the order ensemble of Jain et al. §4.

use candle_core::{Device, Tensor};

use arm_core::{Conditional, NaiveStepper, Ordering, Stepper};

use crate::layers::MemberDraws;
use crate::registry::{invalid, BuildCtx, Plugin, PluginError};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

/// Per-epoch draws of the training member; distinct from the dropout streams.
const DRAW_SALT: u64 = 0x6f72_6465_7273_0001;

/// Whether `orderings` need [`Ordered`]: more than one, or another than raster for a 2D plugin
/// (one ordering of a 1D plugin is the `Arm`'s permutation alone).
pub fn needs_wrapper(is_2d: bool, orderings: &[Ordering]) -> bool {
    orderings.len() > 1 || (is_2d && orderings.first().is_some_and(|&o| o != Ordering::Raster))
}

struct Member {
    net: usize,
    /// Sequence -> network input positions, None for the identity.
    gather_in: Option<Tensor>,
    /// Network output -> sequence positions, None for the identity.
    gather_out: Option<Tensor>,
    /// Sequence positions in this member's order (None: sequence order).
    order: Option<Vec<usize>>,
}

pub struct Ordered {
    nets: Vec<Box<dyn Conditional>>,
    members: Vec<Member>,
    names: Vec<String>,
    eval_orders: usize,
    draws: MemberDraws,
    dims: usize,
    device: Device,
}

fn is_identity(p: &[usize]) -> bool {
    p.iter().enumerate().all(|(i, &j)| i == j)
}

/// The members of `plugin` with table `t` for `orderings`; see the module header.
pub fn build(
    plugin: &Plugin,
    t: &toml::Table,
    ctx: BuildCtx,
    orderings: &[Ordering],
    eval_orders: usize,
) -> Result<Box<dyn Conditional>, PluginError> {
    let (h, w) = (ctx.height, ctx.width);
    let first = *orderings.first().ok_or_else(|| invalid("", "no orderings"))?;
    if eval_orders == 0 || eval_orders > orderings.len() {
        return Err(invalid("", format!("{eval_orders} orders to evaluate, {} listed", orderings.len())));
    }
    let (arm_perm, arm_rank) = (first.permutation(h, w), first.rank(h, w));
    let dev = ctx.device.clone();
    let mut nets = Vec::new();
    let mut members = Vec::new();
    for (m, o) in orderings.iter().enumerate() {
        let perm = o.permutation(h, w);
        // Sequence positions in this member's order.
        let order: Vec<usize> = perm.iter().map(|&j| arm_rank[j]).collect();
        let order_opt = (!is_identity(&order)).then(|| order.clone());
        if plugin.is_2d {
            nets.push(plugin.build(t, ctx.with_order(Some(o.rank(h, w).into())))?);
            members.push(Member {
                net: m,
                gather_in: arm_core::gather_index(&arm_rank, &dev)?,
                gather_out: arm_core::gather_index(&arm_perm, &dev)?,
                order: order_opt,
            });
        } else {
            if nets.is_empty() {
                nets.push(plugin.build(t, ctx.with_order(None))?);
            }
            let rank = o.rank(h, w);
            let out: Vec<usize> = arm_perm.iter().map(|&j| rank[j]).collect();
            members.push(Member {
                net: 0,
                gather_in: arm_core::gather_index(&order, &dev)?,
                gather_out: arm_core::gather_index(&out, &dev)?,
                order: order_opt,
            });
        }
    }
    Ok(Box::new(Ordered {
        nets,
        members,
        names: orderings.iter().map(|o| o.name()).collect(),
        eval_orders,
        draws: MemberDraws::new(ctx.seed, DRAW_SALT),
        dims: h * w,
        device: dev,
    }))
}

impl Ordered {
    fn run(&self, x: &Tensor, m: usize, train: bool) -> Result<Tensor> {
        let mem = self.members.get(m).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "ordering {m}: the network has {} ({})",
                self.members.len(),
                self.names.join(", ")
            ))
        })?;
        let x = match &mem.gather_in {
            Some(g) => x.index_select(g, 1)?,
            None => x.clone(),
        };
        let p = self.nets[mem.net].forward_t(&x, train)?; // (B, D, P) in the network's positions
        match &mem.gather_out {
            Some(g) => p.index_select(g, 1),
            None => Ok(p),
        }
    }
}

impl Conditional for Ordered {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let n = self.members.len();
        let m = self.draws.member(n, train);
        self.run(x, m, train)
    }

    fn seq_len(&self) -> usize {
        self.dims
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn begin_epoch(&self, epoch: usize) {
        self.draws.begin_epoch(epoch);
        for net in &self.nets {
            net.begin_epoch(epoch);
        }
    }

    /// Member 0 without gathers is the network itself, with its own (cached) stepper.
    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        let m = &self.members[0];
        if m.gather_in.is_none() && m.gather_out.is_none() {
            return self.nets[m.net].stepper(batch);
        }
        Ok(Box::new(NaiveStepper::new(self, batch)?))
    }

    fn members(&self) -> (usize, usize) {
        (self.eval_orders, self.members.len())
    }

    fn forward_member(&self, x: &Tensor, m: usize) -> Result<Tensor> {
        self.run(x, m, false)
    }

    fn member_order(&self, m: usize) -> Option<Vec<usize>> {
        self.members.get(m)?.order.clone()
    }

    fn flops_per_image(&self) -> Option<f64> {
        self.nets[0].flops_per_image()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    fn net(seed: u64) -> Result<(Box<dyn Conditional>, candle_nn::VarMap)> {
        let map = candle_nn::VarMap::new();
        let ctx = conformance::test_ctx(&map, seed, (3, 3), (3, conformance::LEVELS));
        let p = crate::plugin("pixelcnn").map_err(candle_core::Error::msg)?;
        let mut t = toml::Table::new();
        t.insert("channels".into(), toml::Value::Integer(6));
        t.insert("layers".into(), toml::Value::Integer(1));
        let o = [Ordering::Raster, Ordering::Zigzag, Ordering::Columns];
        Ok((p.build_ordered(&t, ctx, &o, 2).map_err(candle_core::Error::msg)?, map))
    }

    /// Which member each of `n` training passes used (outputs equal to that member's).
    fn draws(net: &dyn Conditional, epoch: usize, n: usize) -> Result<Vec<usize>> {
        let x = conformance::random_levels(2, 9, conformance::LEVELS, 1, &Device::Cpu)?.affine(0.25, 0.0)?;
        let members: Vec<Vec<f32>> =
            (0..3).map(|m| net.forward_member(&x, m)?.flatten_all()?.to_vec1::<f32>()).collect::<Result<_>>()?;
        net.begin_epoch(epoch);
        (0..n)
            .map(|_| {
                let y = net.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
                members.iter().position(|m| *m == y).ok_or_else(|| candle_core::Error::Msg("no member matches".into()))
            })
            .collect()
    }

    /// The members share one set of weights; each training pass uses one member drawn from a
    /// stream re-seeded per epoch (a resumed run draws the same), and all of them get drawn.
    #[test]
    fn members_share_weights_and_draws_repeat_per_epoch() -> Result<()> {
        let (a, map) = net(3)?;
        let n_vars = map.all_vars().len();
        let (single, map1) = {
            let map = candle_nn::VarMap::new();
            let ctx = conformance::test_ctx(&map, 3, (3, 3), (3, conformance::LEVELS));
            let mut t = toml::Table::new();
            t.insert("channels".into(), toml::Value::Integer(6));
            t.insert("layers".into(), toml::Value::Integer(1));
            let p = crate::plugin("pixelcnn").map_err(candle_core::Error::msg)?;
            (p.build_ordered(&t, ctx, &[Ordering::Zigzag], 1).map_err(candle_core::Error::msg)?, map)
        };
        assert_eq!(n_vars, map1.all_vars().len(), "three orderings, more variables than one");
        assert_eq!(single.members(), (1, 1));
        assert_eq!(a.members(), (2, 3));
        let d1 = draws(a.as_ref(), 4, 24)?;
        let (b, _) = net(3)?;
        assert_eq!(d1, draws(b.as_ref(), 4, 24)?, "same seed and epoch, other draws");
        assert_ne!(d1, draws(a.as_ref(), 5, 24)?, "another epoch, the same draws");
        assert!((0..3).all(|m| d1.contains(&m)), "{d1:?}");
        // Evaluation is member 0, the sampling order.
        let x = conformance::random_levels(1, 9, conformance::LEVELS, 2, &Device::Cpu)?.affine(0.25, 0.0)?;
        let diff = (a.forward_t(&x, false)? - a.forward_member(&x, 0)?)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
