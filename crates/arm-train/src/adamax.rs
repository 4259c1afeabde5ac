//! Adamax (Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization", Algorithm 2), the
//! infinity-norm variant of Adam, as a candle-nn `Optimizer`. Like PyTorch's `torch.optim.Adamax`
//! it adds eps inside the max (u_t = max(beta2 u_{t-1}, |g_t| + eps)) so a parameter whose
//! gradient has always been zero gets no 0/0, and applies weight decay as an L2 term on g.

use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use candle_nn::Optimizer;

use arm_kernels::{cpu_f32, cpu_f32_mut};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct ParamsAdamax {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for ParamsAdamax {
    /// PyTorch's defaults except lr, which follows the chapter (1e-3).
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

struct State {
    var: Var,
    m: Tensor, // first moment
    u: Tensor, // exponentially weighted infinity norm
}

pub struct Adamax {
    state: Vec<State>,
    params: ParamsAdamax,
    t: usize,
}

impl Optimizer for Adamax {
    type Config = ParamsAdamax;

    fn new(vars: Vec<Var>, params: ParamsAdamax) -> candle_core::Result<Self> {
        let state = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let m = var.zeros_like()?;
                let u = var.zeros_like()?;
                Ok(State { var, m, u })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { state, params, t: 0 })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.t += 1;
        let p = self.params;
        let step = p.lr / (1.0 - p.beta1.powi(self.t as i32)); // bias-corrected step size
        for s in self.state.iter_mut() {
            let Some(g) = grads.get(&s.var) else { continue };
            let fused = p.weight_decay == 0.0
                && g.device().is_cpu()
                && [g.dtype(), s.var.dtype(), s.m.dtype(), s.u.dtype()].iter().all(|&d| d == DType::F32);
            if fused {
                // One pass each over m, u and the variable, in place: no temporaries.
                let g = g.detach().contiguous()?;
                s.m.inplace_op2(&g, &Moment { beta1: p.beta1 as f32 })?;
                s.u.inplace_op2(&g, &InfNorm { beta2: p.beta2 as f32, eps: p.eps as f32 })?;
                s.var.as_tensor().inplace_op3(&s.m, &s.u, &Update { step: step as f32 })?;
                continue;
            }
            // Gradients carry the step's autograd graph; state built from them must not, or
            // every step's graph would stay reachable from the moments (a leak of GBs).
            let g = g.detach();
            let g =
                if p.weight_decay != 0.0 { (g + s.var.as_tensor().affine(p.weight_decay, 0.0)?)? } else { g.clone() };
            let m = ((&s.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let u = (&s.u * p.beta2)?.maximum(&g.abs()?.affine(1.0, p.eps)?)?;
            let update = (m.div(&u)? * step)?;
            s.var.set(&s.var.as_tensor().sub(&update)?)?;
            s.m = m.detach();
            s.u = u.detach();
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

const CHUNK: usize = 1 << 14;

/// m = beta1 m + (1 - beta1) g, in place.
struct Moment {
    beta1: f32,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamax_moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (m, g) = (cpu_f32_mut(s1, l1, "adamax state")?, cpu_f32(s2, l2, "adamax input")?);
        let b1 = self.beta1;
        m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
            m.iter_mut().zip(g).for_each(|(m, &g)| *m = b1 * *m + (1.0 - b1) * g);
        });
        Ok(())
    }
}

/// u = max(beta2 u, |g| + eps), in place.
struct InfNorm {
    beta2: f32,
    eps: f32,
}

impl InplaceOp2 for InfNorm {
    fn name(&self) -> &'static str {
        "adamax_inf_norm"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (u, g) = (cpu_f32_mut(s1, l1, "adamax state")?, cpu_f32(s2, l2, "adamax input")?);
        let (b2, eps) = (self.beta2, self.eps);
        u.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(u, g)| {
            u.iter_mut().zip(g).for_each(|(u, &g)| *u = (b2 * *u).max(g.abs() + eps));
        });
        Ok(())
    }
}

/// w -= step m / u, in place.
struct Update {
    step: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamax_update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (w, m, u) =
            (cpu_f32_mut(s1, l1, "adamax state")?, cpu_f32(s2, l2, "adamax input")?, cpu_f32(s3, l3, "adamax input")?);
        let step = self.step;
        w.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(w, (m, u))| {
            w.iter_mut().zip(m.iter().zip(u)).for_each(|(w, (&m, &u))| *w -= step * (m / u));
        });
        Ok(())
    }
}

impl Adamax {
    /// Optimiser state for checkpoints: the moments (m, u) per variable, in `vars` order.
    pub fn state_tensors(&self) -> Vec<(Tensor, Tensor)> {
        self.state.iter().map(|s| (s.m.clone(), s.u.clone())).collect()
    }
    pub fn steps(&self) -> usize {
        self.t
    }

    /// Restores moments (in `state_tensors` order) and the step count from a checkpoint.
    pub fn set_state(&mut self, moments: Vec<(Tensor, Tensor)>, steps: usize) -> candle_core::Result<()> {
        if moments.len() != self.state.len() {
            candle_core::bail!(
                "adamax state: {} variables in the checkpoint, {} in the model",
                moments.len(),
                self.state.len()
            );
        }
        for (s, (m, u)) in self.state.iter_mut().zip(moments) {
            if m.shape() != s.var.shape() || u.shape() != s.var.shape() {
                candle_core::bail!(
                    "adamax state: moment shape {:?} does not match variable shape {:?}",
                    m.shape(),
                    s.var.shape()
                );
            }
            s.m = m.to_dtype(s.var.dtype())?.to_device(s.var.device())?.detach();
            s.u = u.to_dtype(s.var.dtype())?.to_device(s.var.device())?.detach();
        }
        self.t = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place f32 update against the composed candle ops (taken for f64), over steps
    /// whose gradients change sign and size.
    #[test]
    fn in_place_update_equals_composed_ops() -> candle_core::Result<()> {
        let init = [0.3f64, -1.2, 2.0, 0.0, 5.0];
        let w32 = Var::new(&init.map(|v| v as f32), &Device::Cpu)?;
        let w64 = Var::new(&init, &Device::Cpu)?;
        let params = ParamsAdamax { lr: 0.05, ..Default::default() };
        let mut o32 = Adamax::new(vec![w32.clone()], params)?;
        let mut o64 = Adamax::new(vec![w64.clone()], params)?;
        for t in 0..6 {
            let c: Vec<f64> = (0..5).map(|i| ((i * 7 + t * 3) % 11) as f64 - 5.0).collect();
            let c32 = Tensor::new(c.iter().map(|&v| v as f32).collect::<Vec<_>>(), &Device::Cpu)?;
            let c64 = Tensor::new(c, &Device::Cpu)?;
            o32.backward_step(&(w32.as_tensor() * &c32)?.sqr()?.sum_all()?)?;
            o64.backward_step(&(w64.as_tensor() * &c64)?.sqr()?.sum_all()?)?;
        }
        let (a, b) = (w32.as_tensor().to_vec1::<f32>()?, w64.as_tensor().to_vec1::<f64>()?);
        for (x, y) in a.iter().zip(&b) {
            assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        assert!(a.iter().zip(init).any(|(x, i)| (*x as f64 - i).abs() > 0.1), "the weights moved: {a:?}");
        Ok(())
    }

    #[test]
    fn two_steps_match_hand_computed_values() -> candle_core::Result<()> {
        // f(w) = sum(c * w), so g = c at every step. Starting from w = [1, -2], c = [0.5, -3]:
        // python:
        //   b1, b2, lr, eps = 0.9, 0.999, 0.1, 1e-8; w = [1., -2.]; c = [.5, -3.]; m=[0,0]; u=[0,0]
        //   for t in (1, 2):
        //     m = [b1*mi + (1-b1)*ci for mi, ci in zip(m, c)]
        //     u = [max(b2*ui, abs(ci) + eps) for ui, ci in zip(u, c)]
        //     w = [wi - lr/(1-b1**t) * mi/ui for wi, mi, ui in zip(w, m, u)]
        //   -> w = [0.800000004, -1.8000000006666665]
        let w = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let c = Tensor::new(&[0.5f32, -3.0], &Device::Cpu)?;
        let mut opt = Adamax::new(vec![w.clone()], ParamsAdamax { lr: 0.1, ..Default::default() })?;
        for _ in 0..2 {
            let loss = (w.as_tensor() * &c)?.sum_all()?;
            opt.backward_step(&loss)?;
        }
        let got = w.as_tensor().to_vec1::<f32>()?;
        assert!((got[0] - 0.8).abs() < 1e-6 && (got[1] + 1.8).abs() < 1e-6, "{got:?}");
        Ok(())
    }

    #[test]
    fn state_holds_no_autograd_graph() -> candle_core::Result<()> {
        // The moments must not keep the step's graph alive (that leaked GBs per epoch).
        let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let mut opt = Adamax::new(vec![w.clone()], ParamsAdamax::default())?;
        let loss = w.as_tensor().sqr()?.sum_all()?;
        opt.backward_step(&loss)?;
        for (m, u) in opt.state_tensors() {
            assert!(!m.track_op() && !u.track_op());
        }
        Ok(())
    }

    #[test]
    fn infinity_norm_remembers_the_largest_gradient() -> candle_core::Result<()> {
        // Gradients 4 then 1: u_2 = max(0.999 * 4, 1) = 3.996; m_2 = 0.9*0.4 + 0.1*1 = 0.46;
        // w_2 = w_1 - lr/(1 - 0.81) * 0.46 / 3.996, w_1 = 0 - lr/(0.1) * 0.4/4 = -lr.
        // python: lr=0.01; w1=-lr; w2 = w1 - lr/0.19*0.46/3.996  -> -0.010605833...
        let w = Var::new(&[0f32], &Device::Cpu)?;
        let mut opt = Adamax::new(vec![w.clone()], ParamsAdamax { lr: 0.01, eps: 0.0, ..Default::default() })?;
        for c in [4f32, 1.0] {
            let loss = (w.as_tensor() * c as f64)?.sum_all()?;
            opt.backward_step(&loss)?;
        }
        let got = w.as_tensor().to_vec1::<f32>()?[0];
        let want = -0.01 - 0.01 / 0.19 * 0.46 / 3.996;
        assert!((got as f64 - want).abs() < 1e-7, "{got} vs {want}");
        Ok(())
    }
}
