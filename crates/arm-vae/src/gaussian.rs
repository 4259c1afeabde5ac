//! Continuous densities of the latent space: the standard normal, the diagonal Gaussian of the
//! encoder and the per-dimension mixture of Gaussians that is the head of an ARM prior
//! (Tomczak, "Deep Generative Modeling", ch. 4.4, the "ARM prior"). Draws are functions of
//! uniform noise (Box-Muller), so a seeded stream gives the same latents everywhere.

use candle_core::{Tensor, D};

use arm_core::Result;

/// ln sqrt(2 pi).
pub const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_7;

/// Lower bound of a log-scale: a component narrower than e^-7 would let the density of one
/// latent value grow without bound.
const MIN_LOG_SCALE: f64 = -7.0;

/// log N(z; 0, 1) per element.
pub fn standard_log_density(z: &Tensor) -> Result<Tensor> {
    z.sqr()?.affine(-0.5, -LN_SQRT_2PI)
}

/// log N(z; mu, exp(log_var)) per element, from the standardised value eps = (z - mu) / sigma.
pub fn diagonal_log_density(eps: &Tensor, log_var: &Tensor) -> Result<Tensor> {
    // -eps^2 / 2 - log sigma - ln sqrt(2 pi), with log sigma = log_var / 2.
    eps.sqr()?.affine(-0.5, -LN_SQRT_2PI)? - log_var.affine(0.5, 0.0)?
}

/// KL(N(mu, sigma^2) || N(0, 1)) per element, in closed form (Kingma & Welling 2014, App. B).
pub fn standard_kl(mu: &Tensor, log_var: &Tensor) -> Result<Tensor> {
    // (mu^2 + sigma^2 - 1 - log sigma^2) / 2
    ((mu.sqr()? + log_var.exp()?)? - log_var)?.affine(0.5, -0.5)
}

/// log sum_k exp(t_k) over the last dimension, stable.
pub fn log_sum_exp(t: &Tensor) -> Result<Tensor> {
    let top = t.max_keepdim(D::Minus1)?.detach();
    let sum = t.broadcast_sub(&top)?.exp()?.sum_keepdim(D::Minus1)?;
    (sum.log()? + top)?.squeeze(D::Minus1)
}

/// A mixture of K Gaussians per latent dimension: parameters (..., 3K) as K logits, K means
/// and K log-scales.
#[derive(Debug, Clone, Copy)]
pub struct Mixture {
    pub components: usize,
}

impl Mixture {
    pub fn num_params(&self) -> usize {
        3 * self.components
    }

    /// params (..., 3K), z (...) -> log p(z) in nats, (...).
    pub fn log_prob(&self, params: &Tensor, z: &Tensor) -> Result<Tensor> {
        let k = self.components;
        let logits = params.narrow(D::Minus1, 0, k)?;
        let mu = params.narrow(D::Minus1, k, k)?;
        let log_s = params.narrow(D::Minus1, 2 * k, k)?.maximum(MIN_LOG_SCALE)?;
        let eps = z.unsqueeze(D::Minus1)?.broadcast_sub(&mu)?.div(&log_s.exp()?)?; // (..., K)
        let comp = (eps.sqr()?.affine(-0.5, -LN_SQRT_2PI)? - &log_s)?; // log N per component
        let log_w = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        log_sum_exp(&(log_w + comp)?)
    }

    /// params (N, 3K), noise (N, 3) uniform in [0, 1) -> z (N,): the component whose
    /// cumulative weight first exceeds u_0, then its mean plus its scale times a Box-Muller
    /// normal of (u_1, u_2).
    pub fn sample(&self, params: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let k = self.components;
        let p = params.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
        let u = noise.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
        let z: Vec<f32> = p
            .iter()
            .zip(&u)
            .map(|(row, u)| {
                let top = row[..k].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = row[..k].iter().map(|l| (l - top).exp()).collect();
                let total: f64 = w.iter().sum();
                let mut acc = 0.0;
                // The last component takes any rounding left at the top of [0, 1).
                let c = w.iter().position(|wi| {
                    acc += wi / total;
                    u[0] < acc
                });
                let c = c.unwrap_or(k - 1);
                let s = row[2 * k + c].max(MIN_LOG_SCALE).exp();
                (row[k + c] + s * box_muller(u[1], u[2])) as f32
            })
            .collect();
        Tensor::from_vec(z, p.len(), params.device())
    }
}

/// A standard normal draw from two uniforms in [0, 1) (Box & Muller 1958); 1 - u keeps the
/// logarithm finite.
pub fn box_muller(u1: f64, u2: f64) -> f64 {
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The mixture density integrates to one over a fine grid, and with one component it is
    /// the Gaussian's.
    #[test]
    fn mixture_is_a_density() -> Result<()> {
        let mix = Mixture { components: 3 };
        // logits, means, log-scales
        let p = Tensor::new(&[0.3f32, -1.0, 2.0, -2.0, 0.5, 3.0, -0.5, 0.2, -1.5], &Device::Cpu)?;
        let (lo, hi, n) = (-12.0f64, 12.0f64, 24_001);
        let step = (hi - lo) / (n - 1) as f64;
        let z: Vec<f32> = (0..n).map(|i| (lo + i as f64 * step) as f32).collect();
        let z = Tensor::from_vec(z, n, &Device::Cpu)?;
        let params = p.unsqueeze(0)?.broadcast_as((n, 9))?.contiguous()?;
        let dens = mix.log_prob(&params, &z)?.exp()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        let integral: f64 = dens.iter().sum::<f64>() * step;
        assert!((integral - 1.0).abs() < 1e-4, "{integral}");
        // One component, mean 1, log-scale ln 2, at z = 2: N(2; 1, 4).
        // python: from scipy.stats import norm; norm.logpdf(2, 1, 2) = -1.7370857137646178
        let one = Mixture { components: 1 };
        let lp =
            one.log_prob(&Tensor::new(&[[0f32, 1.0, 2f32.ln()]], &Device::Cpu)?, &Tensor::new(&[2f32], &Device::Cpu)?)?;
        assert!((lp.to_vec1::<f32>()?[0] - (-1.737_085_7)).abs() < 1e-5);
        Ok(())
    }

    /// Draws follow the mixture: weights near 0.5 / 0.5 and each component's mean.
    #[test]
    fn mixture_draws_follow_the_weights() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mix = Mixture { components: 2 };
        let n = 20_000;
        let row = [0f32, 0.0, -5.0, 5.0, -2.0, -2.0];
        let params = Tensor::new(&row, &Device::Cpu)?.unsqueeze(0)?.broadcast_as((n, 6))?.contiguous()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let u: Vec<f32> = (0..3 * n).map(|_| rng.random::<f32>()).collect();
        let z = mix.sample(&params, &Tensor::from_vec(u, (n, 3), &Device::Cpu)?)?.to_vec1::<f32>()?;
        let right: Vec<f32> = z.iter().copied().filter(|&v| v > 0.0).collect();
        let frac = right.len() as f64 / n as f64;
        assert!((frac - 0.5).abs() < 0.02, "{frac}");
        let mean = right.iter().map(|&v| v as f64).sum::<f64>() / right.len() as f64;
        assert!((mean - 5.0).abs() < 0.01, "{mean}");
        Ok(())
    }

    #[test]
    fn closed_form_kl_matches_hand_values() -> Result<()> {
        // mu = 1, sigma^2 = e: (1 + e - 1 - 1) / 2 = (e - 1) / 2
        let kl = standard_kl(&Tensor::new(&[1f32], &Device::Cpu)?, &Tensor::new(&[1f32], &Device::Cpu)?)?;
        assert!((kl.to_vec1::<f32>()?[0] - (std::f32::consts::E - 1.0) / 2.0).abs() < 1e-6);
        Ok(())
    }
}
