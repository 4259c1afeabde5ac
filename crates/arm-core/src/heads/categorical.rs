//! Categorical head: P = K logits, p(x = k) = softmax(logits)_k.
//!
//! The log-probability is an exact log-softmax (log-sum-exp with the max subtracted); unlike the
//! chapter's reference code it clamps no probability, so NLLs are exact to float precision.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::Head;
use arm_kernels::cpu_f32;

use crate::Result;

/// log softmax(logits)[x] from candle ops: the path off the CPU, and the reference in tests.
fn log_prob_composed(params: &Tensor, x: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(params, D::Minus1)?; // (..., K)
    let idx = x.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?; // (..., 1)
    logp.gather(&idx.contiguous()?, D::Minus1)?.squeeze(D::Minus1) // (...)
}

/// log softmax(logits)[x] as one op (params (..., K), x (...) of level indices): composed, the
/// log-softmax, gather and squeeze are eight graph nodes, each with its own backward pass.
/// Backward: d logits = g (onehot(x) - softmax(logits)).
#[derive(Debug, Clone, Copy)]
struct LogProb;

/// (m, sum_k exp(l_k - m)) with m = max_k l_k: log-sum-exp = m + ln(sum), softmax_k =
/// exp(l_k - m) / sum, without overflow.
fn max_and_sum_exp(row: &[f32]) -> (f32, f32) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (m, row.iter().map(|&l| (l - m).exp()).sum())
}

/// The level index of x, checked against K levels.
fn level(x: f32, k: usize) -> Result<usize> {
    if x >= 0.0 && (x as usize) < k {
        Ok(x as usize)
    } else {
        bail!("categorical: pixel value {x} outside 0..{k}")
    }
}

impl CustomOp2 for LogProb {
    fn name(&self) -> &'static str {
        "categorical_log_prob"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, x) = (cpu_f32(s1, l1, "logits")?, cpu_f32(s2, l2, "levels")?);
        let k = l1.dims().last().copied().unwrap_or(0).max(1);
        if logits.len() != x.len() * k {
            bail!("categorical: {} logits for {} pixels of {k} levels", logits.len(), x.len());
        }
        let out = logits
            .par_chunks(k)
            .zip(x.par_iter())
            .map(|(row, &xv)| {
                let (m, total) = max_and_sum_exp(row);
                Ok(row[level(xv, k)?] - (m + total.ln()))
            })
            .collect::<Result<Vec<f32>>>()?;
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }

    fn bwd(
        &self,
        params: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = params.contiguous()?.apply_op3_no_bwd(&x.contiguous()?, &grad.contiguous()?, &LogProbGrad)?;
        Ok((Some(d), None))
    }
}

/// d logits = g (onehot(x) - softmax(logits)) from (logits, x, g).
#[derive(Debug, Clone, Copy)]
struct LogProbGrad;

impl CustomOp3 for LogProbGrad {
    fn name(&self) -> &'static str {
        "categorical_log_prob_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, x, g) = (cpu_f32(s1, l1, "logits")?, cpu_f32(s2, l2, "levels")?, cpu_f32(s3, l3, "gradient")?);
        let k = l1.dims().last().copied().unwrap_or(0).max(1);
        if logits.len() != x.len() * k || g.len() != x.len() {
            bail!("categorical: {} logits, {} pixels, {} gradients", logits.len(), x.len(), g.len());
        }
        let mut d = vec![0f32; logits.len()];
        d.par_chunks_mut(k).zip(logits.par_chunks(k)).zip(x.par_iter().zip(g.par_iter())).try_for_each(
            |((drow, row), (&xv, &gv))| {
                let (m, total) = max_and_sum_exp(row);
                for (dv, &l) in drow.iter_mut().zip(row) {
                    *dv = -gv * (l - m).exp() / total;
                }
                drow[level(xv, k)?] += gv;
                Ok::<(), candle_core::Error>(())
            },
        )?;
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

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
        if params.device().is_cpu() && params.dtype() == DType::F32 && x.dtype() == DType::F32 {
            return params.contiguous()?.apply_op2(&x.contiguous()?, LogProb);
        }
        log_prob_composed(params, x)
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

    /// The fused op against log_softmax + gather, in values and in the logits' gradient, and a
    /// level outside 0..K is an error.
    #[test]
    fn fused_log_prob_equals_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (23, 5);
        let l: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 613) as f32 - 306.0) / 40.0).collect();
        let params = candle_core::Var::from_tensor(&Tensor::from_vec(l, (n, k), &dev)?)?;
        let x = Tensor::from_vec((0..n).map(|i| (i * 3 % k) as f32).collect::<Vec<_>>(), n, &dev)?;
        let probe = Tensor::from_vec((0..n).map(|i| i as f32 - 11.0).collect::<Vec<_>>(), n, &dev)?;
        let fast = Categorical::new(k).log_prob(params.as_tensor(), &x)?;
        let slow = log_prob_composed(params.as_tensor(), &x)?;
        let diff =
            |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&fast, &slow)? < 1e-5, "values");
        let gf = (&fast * &probe)?.sum_all()?.backward()?;
        let gs = (&slow * &probe)?.sum_all()?.backward()?;
        assert!(diff(gf.get(&params).expect("grad"), gs.get(&params).expect("grad"))? < 1e-5, "gradient");
        let bad = Tensor::from_vec(vec![k as f32; n], n, &dev)?;
        assert!(Categorical::new(k).log_prob(params.as_tensor(), &bad).is_err());
        Ok(())
    }

    #[test]
    // The expected values are Python's output (one of them is -ln 2), not the constant.
    #[allow(clippy::approx_constant)]
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
