//! Quantile-regression head, after the autoregressive implicit quantile networks of Ostrovski,
//! Dabney & Munos 2018 ("Autoregressive Quantile Networks for Generative Modeling", eq. 4-5):
//! the conditional gives, per pixel, a quantile function of the pixel value (scaled to [0, 1]),
//! trained with the quantile Huber loss instead of a likelihood, and a pixel is drawn as
//! Q(tau) with tau ~ U(0, 1).
//!
//! The quantile function is given at N fixed fractions tau_i = (2i + 1) / (2N), the midpoints
//! that minimise the W1 error of an N-point approximation (Dabney et al. 2018, "Distributional
//! reinforcement learning with quantile regression", lemma 2): Q_i = p_i, one parameter per
//! fraction, so that each fraction's loss trains its own parameter (like QR-DQN, and like the
//! implicit networks, monotonicity is not imposed: N atoms of mass 1/N are a distribution in any
//! order). A draw takes tau in [i/N, (i+1)/N) to Q_i, rounded to the nearest level. Per pixel,
//! with delta_i = x - Q_i,
//!
//!   loss = (1/N) sum_i |tau_i - 1{delta_i < 0}| L_kappa(delta_i) / kappa      (eq. 10 of QR-DQN)
//!
//! with the Huber L_kappa(d) = d^2 / 2 for |d| <= kappa, kappa (|d| - kappa / 2) otherwise; with
//! kappa = 0 it is the pinball loss |tau_i - 1{delta_i < 0}| |delta_i|.
//!
//! The head has no likelihood: `log_prob` returns minus this loss, so the trainer minimises it,
//! and runs report it as a loss, not in nats ([`Head::likelihood`]).

use candle_core::{DType, Tensor, D};

use super::{Head, HeadConfigError, HeadProblem};
use crate::Result;

/// `[model.quantile]` keys and their defaults.
pub const DEFAULT_QUANTILES: usize = 32;
pub const DEFAULT_KAPPA: f64 = 0.01;
pub const KEYS: [&str; 2] = ["quantiles", "kappa"];

#[derive(Debug, Clone, Copy)]
pub struct Quantile {
    pub levels: usize,
    /// N, the fractions the quantile function is given at.
    pub quantiles: usize,
    /// Huber threshold on the [0, 1] pixel scale; 0: the pinball loss.
    pub kappa: f64,
}

impl Quantile {
    /// tau_i = (2i + 1) / (2N).
    pub fn fractions(&self) -> Vec<f64> {
        let n = self.quantiles as f64;
        (0..self.quantiles).map(|i| (2 * i + 1) as f64 / (2.0 * n)).collect()
    }
}

impl Head for Quantile {
    fn name(&self) -> &'static str {
        "quantile"
    }

    fn num_params(&self) -> usize {
        self.quantiles
    }

    fn noise_dim(&self) -> usize {
        1
    }

    fn likelihood(&self) -> bool {
        false
    }

    fn log_prob(&self, params: &Tensor, x: &Tensor) -> Result<Tensor> {
        // Q_i = p_i: params (..., N) are the quantile function at the fractions.
        let target = x.to_dtype(DType::F32)?.affine(1.0 / (self.levels - 1) as f64, 0.0)?.unsqueeze(D::Minus1)?;
        let delta = target.broadcast_sub(params)?; // (..., N)
        let taus: Vec<f32> = self.fractions().into_iter().map(|t| t as f32).collect();
        let tau = Tensor::from_vec(taus, self.quantiles, params.device())?;
        let below = delta.lt(0f32)?.to_dtype(DType::F32)?;
        let weight = below.broadcast_sub(&tau)?.abs()?;
        let a = delta.abs()?;
        let huber = if self.kappa > 0.0 {
            let quad = (delta.sqr()? * (0.5 / self.kappa))?;
            let lin = (&a - 0.5 * self.kappa)?;
            a.le(self.kappa)?.where_cond(&quad, &lin)?
        } else {
            a
        };
        (weight * huber)?.mean(D::Minus1)?.neg()
    }

    fn sample(&self, params: &Tensor, noise: &Tensor) -> Result<Tensor> {
        // On the host in f64, like the other heads, so every sampler draws the same levels.
        let p = params.to_dtype(DType::F64)?.to_vec2::<f64>()?; // (M, N)
        let u = noise.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?; // (M,)
        let (n, top) = (self.quantiles, (self.levels - 1) as f64);
        let out: Vec<f32> = p
            .iter()
            .zip(&u)
            .map(|(row, &u)| {
                let at = row[((u * n as f64) as usize).min(n - 1)];
                (at * top).round().clamp(0.0, top) as f32
            })
            .collect();
        Tensor::from_vec(out, u.len(), params.device())
    }
}

/// Reads `[model.quantile]` for data with `levels` levels.
pub fn from_table(table: &toml::Table, levels: usize) -> std::result::Result<Quantile, HeadConfigError> {
    super::check_keys(table, &KEYS)?;
    let in_range = |i: i64| (1..=4096).contains(&i);
    let quantiles =
        super::int_key(table, "quantiles", DEFAULT_QUANTILES as i64, in_range, "an integer in 1..=4096")? as usize;
    let ok = |f: f64| f.is_finite() && f >= 0.0;
    let kappa = super::float_key(table, "kappa", DEFAULT_KAPPA, ok, "a finite number >= 0")?;
    if levels < 2 {
        return Err(HeadConfigError::general(HeadProblem::TooFewLevels(levels)));
    }
    Ok(Quantile { levels, quantiles, kappa })
}

/// The complete table (every key, defaults filled).
pub fn to_table(head: &Quantile) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("quantiles".into(), toml::Value::Integer(head.quantiles as i64));
    t.insert("kappa".into(), toml::Value::Float(head.kappa));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    /// p(k) for a known 17-level distribution: mass 0.5 on level 0 (background) and 0.1 on each
    /// of the levels 4, 6, 8, 10, 12. F jumps at 0.5, 0.6, .., 1.0.
    fn toy() -> Vec<f64> {
        (0..17)
            .map(|k| {
                if k == 0 {
                    0.5
                } else if (4..=12).contains(&k) && k % 2 == 0 {
                    0.1
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The true quantile level at tau: the smallest k with F(k) >= tau.
    fn true_quantile(p: &[f64], tau: f64) -> usize {
        let mut f = 0.0;
        for (k, pk) in p.iter().enumerate() {
            f += pk;
            if f >= tau - 1e-12 {
                return k;
            }
        }
        p.len() - 1
    }

    #[test]
    fn learned_quantiles_match_a_known_distribution() -> Result<()> {
        // Minimise the expected loss over the whole support (exact, no sampling noise) for one
        // pixel's N = 10 parameters. The fractions 0.05, 0.15, .. sit halfway between the
        // jumps of F, so each has one exact quantile level: 0 five times, then 4, 6, .., 12.
        // Tolerance: a quarter level (the Huber zone, kappa = 0.01, is 0.16 of a level).
        let head = Quantile { levels: 17, quantiles: 10, kappa: DEFAULT_KAPPA };
        let p = toy();
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 17.0, &dev)?;
        let w = Tensor::from_vec(p.iter().map(|&v| v as f32).collect::<Vec<_>>(), 17, &dev)?;
        // One parameter vector for the pixel, its loss at each of the 17 levels weighted by p.
        let shared = Var::from_tensor(&Tensor::zeros((1, 10), DType::F32, &dev)?)?;
        let mut opt =
            AdamW::new(vec![shared.clone()], ParamsAdamW { lr: 0.05, weight_decay: 0.0, ..Default::default() })?;
        for step in 0..4000 {
            // Adam's steps of ~lr oscillate around a kink of the loss: shrink them.
            opt.set_learning_rate(0.05 * 0.999f64.powi(step));
            let rows = shared.as_tensor().broadcast_as((17, 10))?;
            let loss = (head.log_prob(&rows, &x)?.neg()? * &w)?.sum_all()?;
            opt.backward_step(&loss)?;
        }
        let knots = shared.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for (tau, q) in head.fractions().into_iter().zip(knots) {
            let want = true_quantile(&p, tau) as f32;
            assert!((q * 16.0 - want).abs() < 0.25, "tau {tau}: {} levels, want {want}", q * 16.0);
        }
        // Draws at tau on a grid of U(0, 1): each atom gets 1/N of them, so the sampled
        // distribution is p itself.
        let m = 20_000;
        let u = Tensor::from_vec((0..m).map(|i| (i as f32 + 0.5) / m as f32).collect::<Vec<_>>(), (m, 1), &dev)?;
        let draws = head.sample(&shared.as_tensor().broadcast_as((m, 10))?.contiguous()?, &u)?.to_vec1::<f32>()?;
        let mut freq = vec![0f64; 17];
        draws.iter().for_each(|&v| freq[v as usize] += 1.0 / m as f64);
        let tv: f64 = freq.iter().zip(&p).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
        assert!(tv < 1e-9, "total variation {tv}: {freq:?}");
        Ok(())
    }

    #[test]
    fn loss_matches_hand_computed_values() -> Result<()> {
        // N = 2 (tau 1/4, 3/4), params [0.2, 0.6]: the knots on [0, 1].
        // x = 1 of 2 levels (1.0): deltas 0.8, 0.4, both >= 0: pinball = (0.25 * 0.8 + 0.75 *
        // 0.4) / 2 = 0.25. x = 0: deltas -0.2, -0.6: (0.75 * 0.2 + 0.25 * 0.6) / 2 = 0.15.
        let head = Quantile { levels: 2, quantiles: 2, kappa: 0.0 };
        let dev = Device::Cpu;
        let q1 = 0.6f32;
        let params = Tensor::new(&[[0.2f32, q1], [0.2, q1]], &dev)?;
        let lp = head.log_prob(&params, &Tensor::new(&[1f32, 0.0], &dev)?)?.to_vec1::<f32>()?;
        assert!((lp[0] + 0.25).abs() < 1e-6 && (lp[1] + 0.15).abs() < 1e-6, "{lp:?}");
        // Huber with kappa = 0.5: |d| = 0.2 is quadratic (0.04 / 2 / 0.5 = 0.04), 0.6 linear
        // (0.6 - 0.25 = 0.35): x = 0 gives (0.75 * 0.04 + 0.25 * 0.35) / 2 = 0.05875.
        let huber = Quantile { kappa: 0.5, ..head };
        let lp = huber.log_prob(&params, &Tensor::new(&[0f32], &dev)?.broadcast_as(2)?.contiguous()?)?;
        assert!((lp.to_vec1::<f32>()?[0] + 0.05875).abs() < 1e-6);
        // Draws: tau in [0, 1/2) gives knot 0.2 -> level 0, [1/2, 1) knot 0.6 -> level 1.
        let u = Tensor::new(&[[0.1f32], [0.49], [0.5], [0.99]], &dev)?;
        let rows = Tensor::new(&[[0.2f32, q1], [0.2, q1], [0.2, q1], [0.2, q1]], &dev)?;
        assert_eq!(head.sample(&rows, &u)?.to_vec1::<f32>()?, vec![0.0, 0.0, 1.0, 1.0]);
        Ok(())
    }

    #[test]
    fn config_defaults_and_bad_values() {
        let t = |s: &str| s.parse::<toml::Table>().expect("toml");
        let q = from_table(&t(""), 17).expect("defaults");
        assert_eq!((q.quantiles, q.kappa), (DEFAULT_QUANTILES, DEFAULT_KAPPA));
        assert_eq!(from_table(&to_table(&q), 17).expect("round trip").quantiles, q.quantiles);
        for (bad, key) in [("quantiles = 0", "quantiles"), ("kappa = -1.0", "kappa"), ("kapa = 1", "kapa")] {
            let e = from_table(&t(bad), 17).expect_err(bad);
            assert_eq!(e.key.as_deref(), Some(key), "{bad}: {e}");
        }
    }
}
