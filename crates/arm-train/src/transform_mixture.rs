//! The test-time mixture of a model trained with distribution augmentation (Jun et al. 2020,
//! §3, which evaluates at the identity; the mixture is the order ensemble of Uria, Murray &
//! Larochelle 2014, §3.2, with transforms for orderings): p(x) = sum_k pi_k p(t_k(x) | t_k)
//! over the identity and every trained transform that permutes pixels (flips, the transpose,
//! quarter turns; a shift loses a border, so it is not a bijection of images and stays
//! training-only). Each term is a normalised distribution of x because t_k is a bijection, so
//! the mixture is an exact likelihood. pi is the distribution training drew the transforms
//! from, renormalised over the members: DistAug fits the joint pi(t) p(t(x) | t), and this is
//! its marginal over the invertible t (uniform when every transform was drawn equally often).
//! Member k reads x gathered into t_k's layout and is autoregressive in the order t_k walks x;
//! sampling draws k per image from pi, samples t_k(x) from the conditional and maps it back.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

use arm_core::{Conditional, Conditioned, Stepper};
use arm_data::augment::Transform;

#[derive(Clone)]
struct Member {
    /// (1, classes): the one-hot of the member's transform.
    h: Tensor,
    /// x positions -> t(x) positions (t(x)[p] = x[src[p]]), None for the identity.
    gather_in: Option<Tensor>,
    /// Network output in t(x)'s positions -> x's positions, None for the identity.
    gather_out: Option<Tensor>,
    /// order[i] = the x position of the member's i-th variable (src itself), None for the
    /// identity.
    order: Option<Vec<usize>>,
}

/// The network of a [`crate::DistAug`] model evaluated as the mixture above. Member 0 is the
/// identity; `forward_t` and the stepper are member 0's. Clones share the weights.
#[derive(Clone)]
pub struct TransformMixture {
    net: Arc<dyn Conditional>,
    /// Member 0, which evaluation mode's forward pass and the stepper are.
    identity: Conditioned,
    members: Vec<Member>,
    /// pi of each member, summing to one.
    weights: Vec<f64>,
}

impl TransformMixture {
    /// `transforms[k]` is the transform of conditioning class k (class 0 must be the identity)
    /// and `shares[k]` the probability that training drew it; those that permute pixels become
    /// members. Images are `height` x `width` in raster order.
    pub fn new(
        net: Arc<dyn Conditional>,
        transforms: &[Transform],
        shares: &[f64],
        height: usize,
        width: usize,
    ) -> Result<Self> {
        if transforms.first() != Some(&Transform::Identity) || shares.len() != transforms.len() {
            candle_core::bail!("transform mixture: class 0 must be the identity, with one share per class");
        }
        let classes = transforms.len();
        let dev = net.device().clone();
        let (mut members, mut weights) = (Vec::new(), Vec::new());
        for (k, t) in transforms.iter().enumerate().filter(|(_, t)| t.is_permutation()) {
            let src: Vec<usize> = t.source_map(height, width).into_iter().map(|s| s.expect("a permutation")).collect();
            let mut inv = vec![0; src.len()];
            for (p, &q) in src.iter().enumerate() {
                inv[q] = p;
            }
            members.push(Member {
                h: crate::dist_aug::one_hot(k, classes, &dev)?,
                gather_in: arm_core::gather_index(&src, &dev)?,
                gather_out: arm_core::gather_index(&inv, &dev)?,
                order: (k != 0).then_some(src),
            });
            weights.push(shares[k]);
        }
        let total: f64 = weights.iter().sum();
        if total.is_nan() || total <= 0.0 || weights.iter().any(|&w| w.is_nan() || w < 0.0) {
            candle_core::bail!("transform mixture: shares {shares:?} are not a distribution");
        }
        weights.iter_mut().for_each(|w| *w /= total);
        let identity = Conditioned::new(net.clone(), members[0].h.clone())?;
        Ok(Self { net, identity, members, weights })
    }

    /// pi of each member.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Member `m`'s one-hot condition (1, classes) and the gather from t(x)'s positions back to
    /// x's (None for the identity).
    pub fn member(&self, m: usize) -> (&Tensor, Option<&Tensor>) {
        let mem = &self.members[m];
        (&mem.h, mem.gather_out.as_ref())
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn run(&self, x: &Tensor, m: usize, train: bool) -> Result<Tensor> {
        let Some(mem) = self.members.get(m) else {
            candle_core::bail!("member {m}: the transform mixture has {}", self.members.len())
        };
        let xt = match &mem.gather_in {
            Some(g) => x.index_select(g, 1)?,
            None => x.clone(),
        };
        let p = self.net.forward_cond(&xt, &mem.h, train)?; // (B, D, P) in t(x)'s positions
        match &mem.gather_out {
            Some(g) => p.index_select(g, 1),
            None => Ok(p),
        }
    }
}

impl Conditional for TransformMixture {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.identity.forward_t(x, train)
    }
    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        self.identity.stepper(batch)
    }
    fn seq_len(&self) -> usize {
        self.identity.seq_len()
    }
    fn device(&self) -> &Device {
        self.identity.device()
    }
    fn begin_epoch(&self, epoch: usize) {
        self.identity.begin_epoch(epoch);
    }
    fn members(&self) -> (usize, usize) {
        (self.members.len(), self.members.len())
    }
    fn member_weights(&self) -> Option<Vec<f64>> {
        Some(self.weights.clone())
    }
    fn forward_member(&self, x: &Tensor, m: usize) -> Result<Tensor> {
        self.run(x, m, false)
    }
    fn member_order(&self, m: usize) -> Option<Vec<usize>> {
        self.members.get(m)?.order.clone()
    }
    fn flops_per_image(&self) -> Option<f64> {
        self.net.flops_per_image()
    }
}
