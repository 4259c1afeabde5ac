//! Gradient clipping by global norm (Pascanu, Mikolov & Bengio 2013, "On the difficulty of
//! training recurrent neural networks", Algorithm 1): when ||g|| over all parameters exceeds
//! the threshold, every gradient is scaled by threshold / ||g||, keeping its direction. The
//! remedy the chapter gives for the exploding gradients of RNNs (Tomczak, §2.2.2).

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

/// Scales the gradients of `vars` in `grads` so that their global L2 norm is at most
/// `max_norm`; returns the norm before clipping (accumulated in f64).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> candle_core::Result<f64> {
    let mut sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if norm > max_norm {
        let scale = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.get(v) {
                let scaled = g.affine(scale, 0.0)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn gradients_are_scaled_to_the_threshold_only_above_it() -> candle_core::Result<()> {
        // Gradients of sum(a * [3, 0]) + sum(b * [4]) are [3, 0] and [4]: norm 5.
        let a = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::new(&[1f32], &Device::Cpu)?)?;
        let loss = || -> candle_core::Result<Tensor> {
            (a.as_tensor() * Tensor::new(&[3f32, 0.0], &Device::Cpu)?)?.sum_all()?
                + (b.as_tensor() * Tensor::new(&[4f32], &Device::Cpu)?)?.sum_all()?
        };
        let vars = [a.clone(), b.clone()];
        let mut g = loss()?.backward()?;
        assert!((clip_grad_norm(&mut g, &vars, 10.0)? - 5.0).abs() < 1e-12);
        assert_eq!(g.get(&a).expect("grad").to_vec1::<f32>()?, vec![3.0, 0.0], "below the threshold: unchanged");
        let mut g = loss()?.backward()?;
        assert!((clip_grad_norm(&mut g, &vars, 1.0)? - 5.0).abs() < 1e-12);
        assert_eq!(g.get(&a).expect("grad").to_vec1::<f32>()?, vec![0.6, 0.0]);
        assert_eq!(g.get(&b).expect("grad").to_vec1::<f32>()?, vec![0.8]);
        Ok(())
    }
}
