//! Adam (Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization", Algorithm 1) and AdamW
//! (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2) as a
//! candle-nn `Optimizer` whose moments can be read and restored, so a checkpointed run resumes
//! exactly (candle-nn's `AdamW` keeps its moments private).
//!
//! The update is computed in the same order as candle-nn's `AdamW`:
//! theta <- theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps). Weight decay is decoupled as
//! above when `decoupled` (torch.optim.AdamW), else it is an L2 term added to the gradient,
//! g <- g + wd theta (torch.optim.Adam).

use candle_core::{backprop::GradStore, Tensor, Var};
use candle_nn::Optimizer;

#[derive(Debug, Clone, Copy)]
pub struct ParamsAdam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW (decay the weights) rather than Adam (decay as an L2 term on the gradient).
    pub decoupled: bool,
}

impl Default for ParamsAdam {
    /// PyTorch's Adam defaults except lr, which follows the chapter (1e-3).
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
}

struct State {
    var: Var,
    m: Tensor, // first moment
    v: Tensor, // second raw moment
}

pub struct Adam {
    state: Vec<State>,
    params: ParamsAdam,
    t: usize,
}

impl Optimizer for Adam {
    type Config = ParamsAdam;

    fn new(vars: Vec<Var>, params: ParamsAdam) -> candle_core::Result<Self> {
        let state = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let m = var.zeros_like()?;
                let v = var.zeros_like()?;
                Ok(State { var, m, v })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { state, params, t: 0 })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.t += 1;
        let p = self.params;
        let scale_m = 1.0 / (1.0 - p.beta1.powi(self.t as i32)); // bias corrections
        let scale_v = 1.0 / (1.0 - p.beta2.powi(self.t as i32));
        for s in self.state.iter_mut() {
            let Some(g) = grads.get(&s.var) else { continue };
            // Detached: moments built from the gradient must not keep the step's graph alive.
            let g = g.detach();
            let theta = s.var.as_tensor();
            let g = if !p.decoupled && p.weight_decay != 0.0 { (g + theta.affine(p.weight_decay, 0.0)?)? } else { g };
            let m = ((&s.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&m * scale_m)?;
            let v_hat = (&v * scale_v)?;
            let decay = if p.decoupled { p.lr * p.weight_decay } else { 0.0 };
            let next = (theta * (1.0 - decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let next = (next - (adjusted * p.lr)?)?;
            s.var.set(&next)?;
            s.m = m.detach();
            s.v = v.detach();
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

impl Adam {
    /// The moments (m, v) per variable, in the order of the `vars` given to `new`.
    pub fn state_tensors(&self) -> Vec<(Tensor, Tensor)> {
        self.state.iter().map(|s| (s.m.clone(), s.v.clone())).collect()
    }

    pub fn steps(&self) -> usize {
        self.t
    }

    /// Restores moments (in `state_tensors` order) and the step count from a checkpoint.
    pub fn set_state(&mut self, moments: Vec<(Tensor, Tensor)>, steps: usize) -> candle_core::Result<()> {
        if moments.len() != self.state.len() {
            candle_core::bail!(
                "adam state: {} variables in the checkpoint, {} in the model",
                moments.len(),
                self.state.len()
            );
        }
        for (s, (m, v)) in self.state.iter_mut().zip(moments) {
            if m.shape() != s.var.shape() || v.shape() != s.var.shape() {
                candle_core::bail!(
                    "adam state: moment shape {:?} does not match variable shape {:?}",
                    m.shape(),
                    s.var.shape()
                );
            }
            s.m = m.to_dtype(s.var.dtype())?.to_device(s.var.device())?.detach();
            s.v = v.to_dtype(s.var.dtype())?.to_device(s.var.device())?.detach();
        }
        self.t = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{AdamW, ParamsAdamW};

    /// Two steps on f(w) = sum(c * w) (gradient c) from w = [1, -2], c = [0.5, -3], lr 0.1.
    fn two_steps(weight_decay: f64, decoupled: bool) -> candle_core::Result<Vec<f32>> {
        let w = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let c = Tensor::new(&[0.5f32, -3.0], &Device::Cpu)?;
        let mut opt =
            Adam::new(vec![w.clone()], ParamsAdam { lr: 0.1, weight_decay, decoupled, ..Default::default() })?;
        for _ in 0..2 {
            let loss = (w.as_tensor() * &c)?.sum_all()?;
            opt.backward_step(&loss)?;
        }
        w.as_tensor().to_vec1::<f32>()
    }

    // python:
    //   def adam(w, c, lr, b1, b2, eps, wd, dec, steps):
    //     m = [0]*len(w); v = [0]*len(w)
    //     for t in range(1, steps + 1):
    //       g = [ci + (0 if dec else wd*wi) for ci, wi in zip(c, w)]
    //       m = [b1*mi + (1-b1)*gi for mi, gi in zip(m, g)]
    //       v = [b2*vi + (1-b2)*gi*gi for vi, gi in zip(v, g)]
    //       mh = [mi/(1-b1**t) for mi in m]; vh = [vi/(1-b2**t) for vi in v]
    //       w = [(wi*(1-lr*wd) if dec else wi) - lr*mhi/(math.sqrt(vhi)+eps)
    //            for wi, mhi, vhi in zip(w, mh, vh)]
    //     return w
    //   adam([1., -2.], [.5, -3.], 0.1, 0.9, 0.999, 1e-8, wd, dec, 2)
    #[test]
    fn two_steps_match_hand_computed_values() -> candle_core::Result<()> {
        for (wd, dec, want) in [
            (0.0, false, [0.8000000040000006, -1.8000000006666672]), // plain Adam
            (0.1, true, [0.7811000039800006, -1.761200000663334]),   // AdamW
            (0.1, false, [0.8000473404883316, -1.8000082813418699]), // Adam with L2
        ] {
            let got = two_steps(wd, dec)?;
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-6, "wd {wd} decoupled {dec}: {got:?} vs {want:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn decoupled_matches_candle_nn_adamw_bit_for_bit() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        let (a, b) = (Var::new(init.as_slice(), &dev)?, Var::new(init.as_slice(), &dev)?);
        let p = ParamsAdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
        let mut ours = Adam::new(
            vec![a.clone()],
            ParamsAdam {
                lr: p.lr,
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                weight_decay: p.weight_decay,
                decoupled: true,
            },
        )?;
        let mut theirs = AdamW::new(vec![b.clone()], p)?;
        for _ in 0..5 {
            ours.backward_step(&a.as_tensor().powf(3.0)?.sum_all()?)?;
            theirs.backward_step(&b.as_tensor().powf(3.0)?.sum_all()?)?;
        }
        assert_eq!(a.as_tensor().to_vec1::<f32>()?, b.as_tensor().to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn restored_state_continues_exactly() -> candle_core::Result<()> {
        // Four steps straight through equal two steps, a save of (w, m, v, t), and two more.
        let dev = Device::Cpu;
        let f = |w: &Var| w.as_tensor().sqr()?.sum_all();
        let a = Var::new(&[1f32, -0.5, 2.0], &dev)?;
        let mut oa = Adam::new(vec![a.clone()], ParamsAdam { lr: 0.05, ..Default::default() })?;
        for _ in 0..4 {
            oa.backward_step(&f(&a)?)?;
        }
        let b = Var::new(&[1f32, -0.5, 2.0], &dev)?;
        let mut ob = Adam::new(vec![b.clone()], ParamsAdam { lr: 0.05, ..Default::default() })?;
        for _ in 0..2 {
            ob.backward_step(&f(&b)?)?;
        }
        let (w, st, t) = (b.as_tensor().copy()?, ob.state_tensors(), ob.steps());
        let c = Var::from_tensor(&w)?;
        let mut oc = Adam::new(vec![c.clone()], ParamsAdam { lr: 0.05, ..Default::default() })?;
        oc.set_state(st, t)?;
        for _ in 0..2 {
            oc.backward_step(&f(&c)?)?;
        }
        assert_eq!(a.as_tensor().to_vec1::<f32>()?, c.as_tensor().to_vec1::<f32>()?);
        Ok(())
    }
}
