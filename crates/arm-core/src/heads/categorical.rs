//! Categorical head: P = K logits, p(x = k) = softmax(logits)_k.
//!
//! The log-probability is an exact log-softmax (log-sum-exp with the max subtracted); unlike the
//! chapter's reference code it clamps no probability, so NLLs are exact to float precision.

use candle_core::{DType, Tensor, D};

use super::Head;
use crate::Result;

#[derive(Debug, Clone, Copy)]
pub struct Categorical {
    pub levels: usize,
}

impl Categorical {
    pub fn new(levels: usize) -> Self {
        Self { levels }
    }
}

impl Head for Categorical {
    fn name(&self) -> &'static str {
        "categorical"
    }

    fn num_params(&self) -> usize {
        self.levels
    }

    fn noise_dim(&self) -> usize {
        1
    }

    fn log_prob(&self, params: &Tensor, x: &Tensor) -> Result<Tensor> {
        let logp = candle_nn::ops::log_softmax(params, D::Minus1)?; // (..., K)
        let idx = x.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?; // (..., 1)
        logp.gather(&idx.contiguous()?, D::Minus1)?.squeeze(D::Minus1) // (...)
    }

    fn sample(&self, params: &Tensor, noise: &Tensor) -> Result<Tensor> {
        // Inverse CDF: the smallest k with cdf_k > u. Computed in f64 on the host so that
        // samplers fed the same logits and noise agree exactly.
        let logits = params.to_dtype(DType::F64)?.to_vec2::<f64>()?; // (N, K)
        let u = noise.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?; // (N,)
        let out: Vec<f32> = logits
            .iter()
            .zip(u.iter())
            .map(|(row, &u)| {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = row.iter().map(|l| (l - m).exp()).collect();
                let total: f64 = w.iter().sum();
                let target = u * total;
                let mut acc = 0.0;
                for (k, wk) in w.iter().enumerate() {
                    acc += wk;
                    if acc > target {
                        return k as f32;
                    }
                }
                // u * total can round to total itself: the last level with mass.
                w.iter().rposition(|&wk| wk > 0.0).unwrap_or(0) as f32
            })
            .collect();
        Tensor::from_vec(out, logits.len(), params.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn log_prob_matches_hand_computed_values() -> Result<()> {
        // logits [0, ln 2, ln 3]: softmax = [1/6, 2/6, 3/6].
        // python: import math; [math.log(1/6), math.log(2/6), math.log(3/6)]
        let l = [0.0f32, 2f32.ln(), 3f32.ln()];
        let params = Tensor::new(&[l, l, l], &Device::Cpu)?; // (3, 3)
        let x = Tensor::new(&[0f32, 1., 2.], &Device::Cpu)?;
        let lp = Categorical::new(3).log_prob(&params, &x)?.to_vec1::<f32>()?;
        let want = [-1.791_759_5f32, -1.098_612_3, -0.693_147_2];
        for (a, b) in lp.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn log_prob_is_exact_for_extreme_logits() -> Result<()> {
        // A clamped implementation gives log(1e-5)-ish here; the exact answer is -200.
        let params = Tensor::new(&[[0f32, 200.0]], &Device::Cpu)?;
        let x = Tensor::new(&[0f32], &Device::Cpu)?;
        let lp = Categorical::new(2).log_prob(&params, &x)?.to_vec1::<f32>()?;
        assert!((lp[0] + 200.0).abs() < 1e-3, "{}", lp[0]);
        Ok(())
    }

    #[test]
    fn sample_inverts_the_cdf() -> Result<()> {
        // probs [1/6, 2/6, 3/6] -> cdf [1/6, 1/2, 1].
        let l = [0.0f32, 2f32.ln(), 3f32.ln()];
        let params = Tensor::new(&[l, l, l, l, l], &Device::Cpu)?;
        let u = Tensor::new(&[[0.0f32], [0.16], [0.17], [0.49], [0.51]], &Device::Cpu)?;
        let s = Categorical::new(3).sample(&params, &u)?.to_vec1::<f32>()?;
        assert_eq!(s, vec![0., 0., 1., 1., 2.]);
        Ok(())
    }
}
