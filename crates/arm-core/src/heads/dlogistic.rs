//! Discretised mixture of logistics head (Salimans et al. 2017, "PixelCNN++: Improving the
//! PixelCNN with discretized logistic mixture likelihood and other modifications", eq. 2 and
//! §2.1), for any number of levels K >= 2.
//!
//! Level k stands for x_k = 2k/(K-1) - 1 in [-1, 1]; its bin is [x_k - h, x_k + h] with
//! h = 1/(K-1), except that the lowest bin is open to -inf and the highest to +inf (§2.1), so
//!
//!   p(k) = sum_j pi_j [sigma((x_k + h - mu_j)/s_j) - sigma((x_k - h - mu_j)/s_j)]   (eq. 2)
//!
//! with sigma(+inf) = 1 at the top and sigma(-inf) = 0 at the bottom.
//!
//! Parameter layout, P = 3M for M components, along the last axis:
//! `[logits_0..M | means_0..M | log_scales_0..M]`; pi = softmax(logits), s = exp(log_scale)
//! after clamping the log-scale from below at `min_log_scale`.
//!
//! Numerics. With a = (upper edge - mu)/s, b = (lower edge - mu)/s and delta = a - b = 2h/s,
//! the CDF difference factorises exactly:
//!
//!   sigma(a) - sigma(b) = sigma(a) * sigma(-b) * (1 - exp(-delta)),
//!
//! so log p = log_sigmoid(a) + log_sigmoid(-b) + log(1 - exp(-delta)) with no subtraction of
//! nearly equal CDFs. log_sigmoid is a softplus that never overflows, and log(1 - exp(-delta))
//! switches to its series for small delta. PixelCNN++'s underflow branch, the log density at
//! the bin centre plus log(2h), is the leading term of that series branch (log_sigmoid at the
//! centre rather than at the edges, log delta = log 2h - log s). PixelCNN++ switches to it when the CDF difference
//! is < 1e-5; that test also fires in the tails of narrow components, where the centre density
//! under-counts the bin mass by a factor of up to exp(-delta/2) * delta (x0.12 at K = 256, log
//! s = -7) and breaks normalisation by ~1e-5 even in exact arithmetic. Here the branch is
//! chosen on delta, which is what makes the subtraction ill-conditioned, and the series keeps
//! the correction terms, so every bin is exact to float precision.

use candle_core::{DType, Tensor, D};

use super::{Head, HeadConfigError, HeadProblem};
use crate::Result;

/// `[model.dlogistic_mixture]` keys and their defaults.
pub const DEFAULT_COMPONENTS: usize = 5;
pub const DEFAULT_MIN_LOG_SCALE: f64 = -7.0;

/// Below this delta = 2h/s the log(1 - exp(-delta)) series is used; its first omitted term,
/// delta^6/181440, is < 1e-7 here, and above it 1 - exp(-delta) >= 0.39 loses no precision.
const SERIES_BELOW: f64 = 0.5;

/// Uniform noise is kept in [EPS, 1 - EPS] so Gumbel and logistic transforms stay finite;
/// the probability mass this moves is at most 2e-10.
const NOISE_EPS: f64 = 1e-10;

#[derive(Debug, Clone, Copy)]
pub struct DLogisticMixture {
    pub levels: usize,
    pub components: usize,
    pub min_log_scale: f64,
}

impl DLogisticMixture {
    pub fn new(levels: usize, components: usize, min_log_scale: f64) -> Result<Self> {
        if levels < 2 {
            candle_core::bail!("dlogistic_mixture: needs at least 2 levels, got {levels}");
        }
        if components == 0 {
            candle_core::bail!("dlogistic_mixture: components must be >= 1");
        }
        if !min_log_scale.is_finite() {
            candle_core::bail!("dlogistic_mixture: min_log_scale must be finite, got {min_log_scale}");
        }
        Ok(Self { levels, components, min_log_scale })
    }

    /// Half-width of a bin in x-space, h = 1/(K-1).
    fn half_width(&self) -> f64 {
        1.0 / (self.levels - 1) as f64
    }
}

/// log(1 + e^z) = max(z, 0) + log(1 + e^{-|z|}): the exponent is <= 0, so nothing overflows and
/// the gradient is finite for every finite z (0.5 at z = 0 with candle's relu/abs derivatives).
fn softplus(z: &Tensor) -> Result<Tensor> {
    z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// log sigmoid(z) = -softplus(-z).
fn log_sigmoid(z: &Tensor) -> Result<Tensor> {
    softplus(&z.neg()?)?.neg()
}

/// log(1 - e^{-delta}) for delta > 0, given delta and log delta (the latter exact even where
/// delta underflows to 0 in float, as for huge scales).
fn log1mexp(delta: &Tensor, log_delta: &Tensor) -> Result<Tensor> {
    // Small delta: 1 - e^{-delta} would round (relative error ~1e-7/delta, and 0 below ~1e-8),
    // so use log delta + log((1 - e^{-delta})/delta) = log delta - d/2 + d^2/24 - d^4/2880.
    // The clamp keeps the polynomial finite (and its gradient zero, not NaN) where the other
    // branch is taken and delta is huge.
    let d = delta.minimum(SERIES_BELOW)?;
    let d2 = d.sqr()?;
    let series = ((log_delta - d.affine(0.5, 0.0)?)? + d2.affine(1.0 / 24.0, 0.0)?)?;
    let series = (series - d2.sqr()?.affine(1.0 / 2880.0, 0.0)?)?;
    // Large delta: direct. The clamp keeps 1 - e^{-d} >= 0.39 so log and its gradient stay
    // finite where the series branch is taken.
    let d = delta.maximum(SERIES_BELOW)?;
    let direct = (d.neg()?.exp()?.neg()? + 1.0)?.log()?;
    delta.lt(SERIES_BELOW)?.where_cond(&series, &direct)
}

/// Log of the logistic mass of each bin, eq. 2 per component. `lower`/`upper` are the bin edges
/// in x-space and `is_low`/`is_high` mark the open end bins; all shapes (..., M).
fn log_bin_mass(
    lower: &Tensor,
    upper: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
    is_low: &Tensor,
    is_high: &Tensor,
    half_width: f64,
) -> Result<Tensor> {
    let inv_s = log_scales.neg()?.exp()?;
    let a = ((upper - means)? * &inv_s)?;
    let b = ((lower - means)? * &inv_s)?;
    let log_cdf_upper = log_sigmoid(&a)?; // log P(X < upper): the whole mass of the lowest bin
    let log_sf_lower = log_sigmoid(&b.neg()?)?; // log P(X > lower): the whole mass of the highest
    let log_delta = log_scales.neg()?.affine(1.0, (2.0 * half_width).ln())?; // log(2h/s)
    let interior = ((&log_cdf_upper + &log_sf_lower)? + log1mexp(&log_delta.exp()?, &log_delta)?)?;
    // All three candidates are finite everywhere, so the branches not taken pass zero
    // gradients rather than NaN.
    let end = is_high.where_cond(&log_sf_lower, &interior)?;
    is_low.where_cond(&log_cdf_upper, &end)
}

impl Head for DLogisticMixture {
    fn name(&self) -> &'static str {
        "dlogistic_mixture"
    }

    fn num_params(&self) -> usize {
        3 * self.components
    }

    fn noise_dim(&self) -> usize {
        self.components + 1
    }

    fn log_prob(&self, params: &Tensor, x: &Tensor) -> Result<Tensor> {
        let m = self.components;
        let dims = params.dims();
        if dims.last() != Some(&(3 * m)) || &dims[..dims.len() - 1] != x.dims() {
            candle_core::bail!(
                "dlogistic_mixture: params {:?} and x {:?}, expected (..., {}) and (...)",
                dims,
                x.dims(),
                3 * m
            );
        }
        let shape = params.narrow(D::Minus1, 0, m)?.shape().clone(); // (..., M)
        let logits = params.narrow(D::Minus1, 0, m)?;
        let means = params.narrow(D::Minus1, m, m)?;
        // Clamp from below, as the PixelCNN++ code does at -7: a vanishing scale makes 1/s and the
        // gradients blow up.
        let log_scales = params.narrow(D::Minus1, 2 * m, m)?.maximum(self.min_log_scale)?;

        let k = x.to_dtype(params.dtype())?.unsqueeze(D::Minus1)?; // (..., 1) levels
        let h = self.half_width();
        // Edges from the integer edge index 2k -/+ 1, so the upper edge of bin k and the lower
        // edge of bin k+1 are the same float: the masses then telescope to exactly 1 instead of
        // leaking rounding (x inv_s, up to ~1e-4 at log s = -7) at every edge.
        let upper = k.affine(2.0, 1.0)?.affine(h, -1.0)?.broadcast_as(&shape)?;
        let lower = k.affine(2.0, -1.0)?.affine(h, -1.0)?.broadcast_as(&shape)?;
        let is_low = k.lt(0.5)?.broadcast_as(&shape)?;
        let is_high = k.gt(self.levels as f64 - 1.5)?.broadcast_as(&shape)?;

        let log_mass = log_bin_mass(&lower, &upper, &means, &log_scales, &is_low, &is_high, h)?;
        let log_pi = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        (log_pi + log_mass)?.log_sum_exp(D::Minus1) // (...)
    }

    fn sample(&self, params: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let m = self.components;
        let (n, p) = params.dims2()?;
        let (nn, q) = noise.dims2()?;
        if p != 3 * m || nn != n || q != m + 1 {
            candle_core::bail!(
                "dlogistic_mixture: params ({n}, {p}) and noise ({nn}, {q}), expected (N, {}) and (N, {})",
                3 * m,
                m + 1
            );
        }
        // On the host in f64, like the categorical head, so every sampler agrees exactly.
        let rows = params.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let us = noise.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let out: Vec<f32> = rows
            .iter()
            .zip(us.iter())
            .map(|(row, u)| {
                let j = gumbel_argmax(&row[..m], &u[..m]);
                let log_s = row[2 * m + j].max(self.min_log_scale);
                let value = logistic_quantile(row[m + j], log_s, u[m]);
                nearest_level(value, self.levels) as f32
            })
            .collect();
        Tensor::from_vec(out, n, params.device())
    }
}

/// Gumbel-max trick: argmax_j (logit_j + g_j) with g_j = -ln(-ln u_j) ~ Gumbel(0, 1) is a draw
/// from softmax(logits). Ties go to the first component.
fn gumbel_argmax(logits: &[f64], u: &[f64]) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (j, (l, u)) in logits.iter().zip(u).enumerate() {
        // u = 0 gives -inf and u = 1 gives +inf (a certain, tie-prone pick): keep u inside.
        let g = -(-u.clamp(NOISE_EPS, 1.0 - NOISE_EPS).ln()).ln();
        if l + g > best.1 {
            best = (j, l + g);
        }
    }
    best.0
}

/// Inverse logistic CDF: mean + s * ln(u / (1 - u)).
fn logistic_quantile(mean: f64, log_scale: f64, u: f64) -> f64 {
    // Same guard as the Gumbel: u at 0 or 1 would give an infinite value (and NaN if the mean
    // were infinite too).
    let u = u.clamp(NOISE_EPS, 1.0 - NOISE_EPS);
    mean + log_scale.exp() * (u.ln() - (-u).ln_1p())
}

/// Nearest level to x in [-1, 1]-space, clamped to [0, K-1] (the open end bins). NaN stays NaN.
fn nearest_level(x: f64, levels: usize) -> f64 {
    let top = (levels - 1) as f64;
    ((x + 1.0) * top / 2.0).round().clamp(0.0, top)
}

/// Keys of `[model.dlogistic_mixture]`.
pub const KEYS: [&str; 2] = ["components", "min_log_scale"];

/// Reads (and validates) a `[model.dlogistic_mixture]` table, filling defaults, for data with
/// `levels` levels. Errors name the offending key ("" for the data).
pub fn from_table(table: &toml::Table, levels: usize) -> std::result::Result<DLogisticMixture, HeadConfigError> {
    super::check_keys(table, &KEYS)?;
    let i = super::int_key(table, "components", DEFAULT_COMPONENTS as i64, |i| i >= 1, "an integer >= 1")?;
    let components = usize::try_from(i).map_err(|_| HeadConfigError::at("components", HeadProblem::TooLarge(i)))?;
    let min_log_scale =
        super::float_key(table, "min_log_scale", DEFAULT_MIN_LOG_SCALE, f64::is_finite, "a finite number")?;
    if levels < 2 {
        return Err(HeadConfigError::general(HeadProblem::TooFewLevels(levels)));
    }
    Ok(DLogisticMixture { levels, components, min_log_scale })
}

/// The complete table (every key, defaults filled) for a validated head.
pub fn to_table(head: &DLogisticMixture) -> toml::Table {
    let mut t = toml::Table::new();
    // components came from an i64 (or the default), so it fits.
    t.insert("components".into(), toml::Value::Integer(i64::try_from(head.components).unwrap_or(i64::MAX)));
    t.insert("min_log_scale".into(), toml::Value::Float(head.min_log_scale));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arm, Conditional, Ordering, Sampler};
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const DEV: Device = Device::Cpu;

    fn head(levels: usize, components: usize) -> DLogisticMixture {
        DLogisticMixture { levels, components, min_log_scale: DEFAULT_MIN_LOG_SCALE }
    }

    /// One parameter row repeated for every level: (K, P) params and x = 0..K.
    fn all_levels(h: &DLogisticMixture, row: &[f32]) -> Result<(Tensor, Tensor)> {
        let k = h.levels;
        let params = Tensor::new(row, &DEV)?.unsqueeze(0)?.repeat((k, 1))?;
        let x = Tensor::arange(0u32, k as u32, &DEV)?.to_dtype(DType::F32)?;
        Ok((params, x))
    }

    fn log_probs(h: &DLogisticMixture, row: &[f32]) -> Result<Vec<f32>> {
        let (params, x) = all_levels(h, row)?;
        h.log_prob(&params, &x)?.to_vec1::<f32>()
    }

    /// Rows (logits | means | log-scales) for M = 3 at the extremes named in the brief.
    fn extreme_rows(levels: usize) -> Vec<[f32; 9]> {
        let h = 1.0 / (levels - 1) as f32;
        vec![
            // Tiny scales (at and far below the clamp), means at bin centres and edges.
            [0., 0., 0., 0.3, -0.7, 0.01, -7., -7., -7.],
            [0., 0., 0., h - 1.0, 1.0 - h, 0.0, -7., -20., -100.],
            // Means far outside [-1, 1].
            [0., 0., 0., 50., -50., 0., 0., 0., -7.],
            [0., 0., 0., 50., 50., 50., -7., 0., 5.],
            [0., 0., 0., -50., -50., -50., -7., 0., 5.],
            // Very peaked mixture logits.
            [1000., -1000., 0., 0.2, -0.2, 0., -3., -3., -3.],
            [-1000., 1000., -1000., 0.2, -0.2, 0., -7., -7., -7.],
            [80., -80., 0., -0.9, 0.9, 0., -1., -7., 0.],
            // Huge scales (delta = 2h/s underflows in float).
            [0., 0., 0., 0., 0.5, -50., 20., 30., 10.],
            // Everything at once.
            [1000., -1000., 0., -50., 50., 0.5, -7., 30., -30.],
        ]
    }

    fn random_rows(rng: &mut ChaCha8Rng, m: usize, n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                let mut row = Vec::with_capacity(3 * m);
                row.extend((0..m).map(|_| rng.random_range(-3.0f32..3.0)));
                row.extend((0..m).map(|_| rng.random_range(-1.5f32..1.5)));
                row.extend((0..m).map(|_| rng.random_range(-7.0f32..1.0)));
                row
            })
            .collect()
    }

    #[test]
    fn probabilities_sum_to_one_random_and_extreme() -> Result<()> {
        // Truth: the K bins partition the real line, so the masses must sum to 1.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for k in [2usize, 17, 256] {
            let mut rows: Vec<Vec<f32>> = extreme_rows(k).iter().map(|r| r.to_vec()).collect();
            rows.extend(random_rows(&mut rng, 3, 50));
            let h = head(k, 3);
            for row in &rows {
                let lp = log_probs(&h, row)?;
                assert!(lp.iter().all(|v| v.is_finite() && *v <= 1e-6), "K={k} {row:?}: {lp:?}");
                let total: f64 = lp.iter().map(|&v| (v as f64).exp()).sum();
                assert!((total - 1.0).abs() < 1e-5, "K={k} {row:?}: sum {total}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_are_finite_at_the_extremes() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for k in [2usize, 17, 256] {
            let mut rows: Vec<Vec<f32>> = extreme_rows(k).iter().map(|r| r.to_vec()).collect();
            rows.extend(random_rows(&mut rng, 3, 5));
            let h = head(k, 3);
            for row in &rows {
                let (params, x) = all_levels(&h, row)?;
                let var = Var::from_tensor(&params)?;
                let loss = h.log_prob(var.as_tensor(), &x)?.sum_all()?;
                let grads = loss.backward()?;
                let g = match grads.get(var.as_tensor()) {
                    Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                    None => panic!("no gradient for params"),
                };
                assert!(g.iter().all(|v| v.is_finite()), "K={k} {row:?}: {g:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        // Truth: central differences in f64. Rows cover the series branch (delta = 2h/s < 0.5)
        // and the direct branch, end bins and interior bins.
        let h = head(17, 2);
        let dev = &DEV;
        let rows: [[f64; 6]; 3] = [
            [0.3, -0.4, 0.1, -0.6, 3.0, -1.0],   // deltas 0.006 (series), 0.34 (series)
            [-1.0, 0.5, 0.95, -0.2, -3.0, -2.0], // deltas 2.5, 0.92 (direct)
            [0.0, 0.0, -0.99, 0.42, 0.5, -4.0],  // deltas 0.076, 6.8
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let w: Vec<f64> = (0..17).map(|_| rng.random_range(0.1..1.0)).collect();
        let w = Tensor::new(w.as_slice(), dev)?;
        let x = Tensor::arange(0u32, 17, dev)?.to_dtype(DType::F64)?;
        let f = |p: &Tensor| -> Result<Tensor> {
            let params = p.unsqueeze(0)?.repeat((17, 1))?;
            (h.log_prob(&params, &x)? * &w)?.sum_all()
        };
        for row in rows {
            let var = Var::from_tensor(&Tensor::new(&row, dev)?)?;
            let grads = f(var.as_tensor())?.backward()?;
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.to_vec1::<f64>()?,
                None => panic!("no gradient"),
            };
            for i in 0..6 {
                let eps = 1e-6;
                let mut hi = row;
                hi[i] += eps;
                let mut lo = row;
                lo[i] -= eps;
                let fd = (f(&Tensor::new(&hi, dev)?)?.to_scalar::<f64>()?
                    - f(&Tensor::new(&lo, dev)?)?.to_scalar::<f64>()?)
                    / (2.0 * eps);
                assert!((g[i] - fd).abs() < 1e-6 * (1.0 + fd.abs()), "{row:?} param {i}: {} vs {fd}", g[i]);
            }
        }
        Ok(())
    }

    fn assert_close(got: f32, want: f64, tol: f64) {
        assert!((got as f64 - want).abs() < tol, "{got} vs {want}");
    }

    #[test]
    fn log_prob_matches_hand_computed_values() -> Result<()> {
        // One component, mean 0, log-scale 0, K = 3: x = -1, 0, 1 and h = 1/2, so
        // p(0) = sigmoid(-1/2), p(1) = sigmoid(1/2) - sigmoid(-1/2), p(2) = 1 - sigmoid(1/2).
        // python: s = lambda z: 1/(1+math.exp(-z)); [math.log(v) for v in
        //   (s(-.5), s(.5) - s(-.5), 1 - s(.5))]
        //   = [-0.97407698418010668, -1.4068291137472953, -0.97407698418010668]
        let lp = log_probs(&head(3, 1), &[0., 0., 0.])?;
        for (got, want) in lp.iter().zip([-0.974_076_984_180_106_7, -1.406_829_113_747_295_3, -0.974_076_984_180_106_7])
        {
            assert_close(*got, want, 1e-6);
        }

        // Two components, K = 4 (x = -1, -1/3, 1/3, 1; h = 1/3): weights softmax(0, ln 3) =
        // (1/4, 3/4), means (-1/2, 1/2), scales (1/2, 1).
        // mpmath (dps 40): p(k) = sum_j w_j (s((x_k+h-mu_j)/s_j) - s((x_k-h-mu_j)/s_j)) with
        // s(+inf) = 1, s(-inf) = 0 at the ends; log p =
        //   [-1.2642503022468587, -1.6957086004537508, -1.7828524734216892, -1.0053349275790486]
        let lp = log_probs(&head(4, 2), &[0., 3f32.ln(), -0.5, 0.5, 0.5f32.ln(), 0.])?;
        let want =
            [-1.264_250_302_246_858_7, -1.695_708_600_453_750_8, -1.782_852_473_421_689_2, -1.005_334_927_579_048_6];
        for (got, want) in lp.iter().zip(want) {
            assert_close(*got, want, 2e-6);
        }

        // Far tail of a narrow component, K = 17, mean 0, log-scale -3: level 15 is
        // [0.8125, 0.9375] and level 16 is [0.9375, inf). A naive f32 sigmoid difference gives
        // log 0 here. mpmath: log(s(0.9375 e^3) - s(0.8125 e^3)) = -16.404198719989817,
        // log(1 - s(0.9375 e^3)) = -18.830190872128193
        let lp = log_probs(&head(17, 1), &[0., 0., -3.])?;
        assert_close(lp[15], -16.404_198_719_989_817, 2e-5);
        assert_close(lp[16], -18.830_190_872_128_193, 2e-5);

        // Huge scale (series branch), K = 256, mean 0, log-scale 10: the centre bin holds
        // ~ pdf(0) * 2h = (1/(4 e^10)) (2/255). mpmath: log(s(1/255/e^10) - s(-1/255/e^10)) =
        // -16.234410725718382; each end bin holds ~1/2: -0.69316979176098386.
        let lp = log_probs(&head(256, 1), &[0., 0., 10.])?;
        assert_close(lp[128], -16.234_410_725_718_382, 2e-5);
        assert_close(lp[0], -0.693_169_791_760_983_9, 1e-6);
        assert_close(lp[255], -0.693_169_791_760_983_9, 1e-6);

        // Clamped tiny scale, K = 256, mean at the centre of level 129 (x = 3/255), log-scale
        // -7: mpmath log p for levels 129..=133 (note the raw -9 is clamped to -7).
        let lp = log_probs(&head(256, 1), &[0., 3.0 / 255.0, -9.])?;
        let want = [
            -0.027_124_613_937_814_813,
            -4.314_178_956_287_262,
            -12.901_752_994_874_03,
            -21.502_794_880_568_253,
            -30.103_839_259_940_595,
        ];
        for (got, want) in lp[129..134].iter().zip(want) {
            assert_close(*got, want, 2e-4 * (1.0 + want.abs()));
        }
        Ok(())
    }

    #[test]
    fn log_prob_accepts_batched_shapes() -> Result<()> {
        // (B, D, P) params and (B, D) levels, as the Arm passes them.
        let h = head(5, 2);
        let row = [0.1f32, -0.3, 0.2, -0.5, -1.0, -2.0];
        let params = Tensor::new(&row, &DEV)?.reshape((1, 1, 6))?.repeat((2, 3, 1))?;
        let x = Tensor::new(&[[0f32, 1., 2.], [3., 4., 4.]], &DEV)?;
        let lp = h.log_prob(&params, &x)?.to_vec2::<f32>()?;
        let flat = log_probs(&h, &row)?;
        assert_eq!(lp, vec![vec![flat[0], flat[1], flat[2]], vec![flat[3], flat[4], flat[4]]]);
        let bad = Tensor::new(&[0f32, 1.], &DEV)?;
        assert!(h.log_prob(&params, &bad).is_err());
        Ok(())
    }

    #[test]
    fn sample_with_fixed_noise_returns_expected_levels() -> Result<()> {
        // K = 5 (x = -1, -0.5, 0, 0.5, 1), two narrow components at levels 1 and 3, equal
        // logits: the larger Gumbel noise picks the component; u = 1/2 lands on the mean.
        let h = head(5, 2);
        let row = [0f32, 0., -0.5, 0.5, -7., -7.];
        let params = Tensor::new(&[row, row, row], &DEV)?;
        let noise = Tensor::new(&[[0.9f32, 0.1, 0.5], [0.1, 0.9, 0.5], [0.6, 0.5, 0.3]], &DEV)?;
        assert_eq!(h.sample(&params, &noise)?.to_vec1::<f32>()?, vec![1., 3., 1.]);

        // Very peaked logits: component 0 whatever the Gumbel noise (|g| <= 23.1 after the guard),
        // including u = 0 and u just below 1.
        let row = [100f32, -100., 0.5, -0.5, -7., -7.];
        let params = Tensor::new(&[row, row, row], &DEV)?;
        let noise = Tensor::new(&[[0.0f32, 0.999_999_9, 0.5], [0.999_999_9, 0.0, 0.5], [0.5, 0.5, 0.5]], &DEV)?;
        assert_eq!(h.sample(&params, &noise)?.to_vec1::<f32>()?, vec![3., 3., 3.]);

        // Inverse CDF: one component, mean 0, scale 0.1, K = 21 (levels 0.1 apart in x, level =
        // round(10 (x + 1))). u = sigmoid(t) gives x = 0.1 t:
        //   t = 1 -> x = 0.1 -> level 11;  t = -2.6 -> x = -0.26 -> 7.4 -> 7;
        //   t = 20 -> x = 2 -> clamped to 20;  u = 0 -> x = 0.1 ln(1e-10) = -2.3 -> clamped to 0.
        let h = head(21, 1);
        let row = [0f32, 0., 0.1f32.ln()];
        let params = Tensor::new(&[row, row, row, row], &DEV)?;
        let sig = |t: f32| 1.0 / (1.0 + (-t).exp());
        let noise = Tensor::new(&[[0.3f32, sig(1.0)], [0.3, sig(-2.6)], [0.3, sig(20.0)], [0.3, 0.0]], &DEV)?;
        assert_eq!(h.sample(&params, &noise)?.to_vec1::<f32>()?, vec![11., 7., 20., 0.]);

        // Shapes are checked, not assumed.
        assert!(h.sample(&params, &noise.narrow(1, 0, 1)?).is_err());
        Ok(())
    }

    #[test]
    fn sampling_frequencies_match_probabilities() -> Result<()> {
        // Truth: exp(log_prob). K = 5, three components, 20000 draws.
        let h = head(5, 3);
        let row = [0.5f32, -0.3, 0.0, -0.6, 0.1, 0.8, -1.2, -0.8, -2.5];
        let n = 20_000;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let u: Vec<f32> = (0..n * 4).map(|_| rng.random::<f32>()).collect();
        let noise = Tensor::from_vec(u, (n, 4), &DEV)?;
        let params = Tensor::new(&row, &DEV)?.unsqueeze(0)?.repeat((n, 1))?;
        let s = h.sample(&params, &noise)?.to_vec1::<f32>()?;
        let p: Vec<f64> = log_probs(&h, &row)?.iter().map(|&v| (v as f64).exp()).collect();
        for (k, pk) in p.iter().enumerate() {
            let freq = s.iter().filter(|&&v| v == k as f32).count() as f64 / n as f64;
            assert!((freq - pk).abs() < 0.02, "level {k}: freq {freq} vs p {pk}");
        }
        Ok(())
    }

    fn table(s: &str) -> toml::Table {
        match s.parse::<toml::Table>() {
            Ok(t) => t,
            Err(e) => panic!("bad test toml: {e}"),
        }
    }

    #[test]
    fn config_defaults_validation_and_registry() {
        let full = super::super::resolve("dlogistic_mixture", &toml::Table::new(), 256);
        assert_eq!(full, Ok(table("components = 5\nmin_log_scale = -7.0")));
        let t = table("components = 2\nmin_log_scale = -5");
        assert_eq!(
            super::super::resolve("dlogistic_mixture", &t, 4),
            Ok(table("components = 2\nmin_log_scale = -5.0"))
        );
        let err = |s: &str, levels| super::super::resolve("dlogistic_mixture", &table(s), levels).err();
        let at = |key: &str, problem| Some(HeadConfigError::at(key, problem));
        let invalid = |expected, got: &str| HeadProblem::Invalid { expected, got: got.into() };
        assert_eq!(err("components = 0", 256), at("components", invalid("an integer >= 1", "0")));
        assert_eq!(err("components = 2.5", 256), at("components", invalid("an integer >= 1", "2.5")));
        assert_eq!(err("min_log_scale = \"low\"", 256), at("min_log_scale", invalid("a finite number", "\"low\"")));
        assert_eq!(err("min_log_scale = nan", 256), at("min_log_scale", invalid("a finite number", "nan")));
        assert_eq!(err("scales = 3", 256), at("scales", HeadProblem::UnknownKey("components, min_log_scale".into())));
        assert_eq!(err("", 1), Some(HeadConfigError::general(HeadProblem::TooFewLevels(1))));
        // The message names the key and what was expected.
        let msg = err("components = 0", 256).map(|e| e.to_string());
        assert_eq!(msg.as_deref(), Some("components: expected an integer >= 1, got 0"));
        match super::super::build("dlogistic_mixture", &table("components = 4"), 17) {
            Ok(h) => {
                assert_eq!((h.name(), h.num_params(), h.noise_dim()), ("dlogistic_mixture", 12, 5));
            }
            Err(e) => panic!("{e:?}"),
        }
        assert!(super::super::head_names().contains(&"dlogistic_mixture"));
        assert!(DLogisticMixture::new(1, 5, -7.0).is_err());
        assert!(DLogisticMixture::new(256, 0, -7.0).is_err());
        assert!(DLogisticMixture::new(256, 5, f64::NEG_INFINITY).is_err());
        assert!(DLogisticMixture::new(2, 1, -7.0).is_ok());
    }

    /// A hand-written causal conditional: params for position d are a fixed random affine
    /// function of x_{<d} (computed on the host in f64, so every batch shape gives the same bits).
    struct ToyLinear {
        d: usize,
        p: usize,
        w: Vec<f64>, // (D, D, P): w[(d * D + j) * P + q], used only for j < d
        b: Vec<f64>, // (D, P)
        dev: Device,
    }

    impl ToyLinear {
        fn new(d: usize, m: usize, seed: u64) -> Self {
            let p = 3 * m;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let w = (0..d * d * p).map(|_| rng.random_range(-2.0..2.0)).collect();
            let b = (0..d * p)
                .map(|i| match (i % p) / m {
                    0 => rng.random_range(-1.0..1.0),  // logits
                    1 => rng.random_range(-0.8..0.8),  // means
                    _ => rng.random_range(-2.5..-0.5), // log-scales
                })
                .collect();
            Self { d, p, w, b, dev: Device::Cpu }
        }
    }

    impl Conditional for ToyLinear {
        fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
            let (bsz, d) = x.dims2()?;
            let (dd, p) = (self.d, self.p);
            let xs = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            let mut out = Vec::with_capacity(bsz * d * p);
            for xb in &xs {
                for i in 0..d {
                    for q in 0..p {
                        let dot: f64 = (0..i).map(|j| self.w[(i * dd + j) * p + q] * xb[j]).sum();
                        out.push((self.b[i * p + q] + dot) as f32);
                    }
                }
            }
            Tensor::from_vec(out, (bsz, d, p), &self.dev)
        }
        fn seq_len(&self) -> usize {
            self.d
        }
        fn device(&self) -> &Device {
            &self.dev
        }
    }

    #[test]
    fn arm_with_this_head_is_normalised_and_samplers_agree() -> Result<()> {
        let (levels, m, d) = (3usize, 2usize, 4usize);
        for ordering in [Ordering::Raster, Ordering::Snake] {
            let arm = Arm::new(Box::new(ToyLinear::new(d, m, 4)), Box::new(head(levels, m)), levels, (2, 2), ordering)?;

            // Truth: the 81 images are all the outcomes, so their probabilities sum to 1.
            let images: Vec<f32> =
                (0..81u32).flat_map(|i| (0..4).map(move |j| ((i / 3u32.pow(j)) % 3) as f32)).collect();
            let x = Tensor::from_vec(images.clone(), (81, 4), &DEV)?;
            let lp = arm.log_prob(&x)?.to_vec1::<f32>()?;
            let total: f64 = lp.iter().map(|&v| (v as f64).exp()).sum();
            assert!((total - 1.0).abs() < 1e-4, "{ordering:?}: sum {total}");

            // Same noise, same images, for every sampler.
            let n = 20_000;
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let u: Vec<f32> = (0..n * d * (m + 1)).map(|_| rng.random::<f32>()).collect();
            let noise = Tensor::from_vec(u, (n, d, m + 1), &DEV)?;
            let naive = arm.sample(&noise, Sampler::Naive)?.images.to_vec2::<f32>()?;
            let cached = arm.sample(&noise, Sampler::Cached)?.images.to_vec2::<f32>()?;
            let jacobi = arm.sample(&noise, Sampler::Jacobi)?.images.to_vec2::<f32>()?;
            assert_eq!(naive, cached, "{ordering:?}");
            assert_eq!(naive, jacobi, "{ordering:?}");

            // And their frequencies follow p(x) (truth: exp(log p) above).
            let mut counts = [0usize; 81];
            for img in &naive {
                let idx: usize = img.iter().enumerate().map(|(j, &v)| v as usize * 3usize.pow(j as u32)).sum();
                counts[idx] += 1;
            }
            for (i, (&c, &l)) in counts.iter().zip(&lp).enumerate() {
                let (freq, p) = (c as f64 / n as f64, (l as f64).exp());
                assert!((freq - p).abs() < 0.02, "{ordering:?} image {i}: freq {freq} vs p {p}");
            }
        }
        Ok(())
    }
}
