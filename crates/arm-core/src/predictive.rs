//! Predictive sampling with forecasting (Wiggers & Hoogeboom 2020, "Predictive Sampling with
//! Forecasting Autoregressive Models", Alg. 1 and Sec. 3).
//!
//! With the sampling noise drawn up front, x_d = g(theta_d, u_d) is a deterministic function of
//! the head parameters theta_d = f(x_<d). The sampler keeps, per image, a prefix known to be
//! final and forecasts for the rest; one parallel pass of the network computes theta for every
//! position, and the draws g(theta_d, u_d) are exact up to and including the first position
//! where the draw disagrees with the forecast (its conditioning was still all exact). Forecasts
//! only decide how many positions a pass settles, never what they are, so the images are the
//! naive sampler's for the same noise, in at most D passes.
//!
//! Forecasts for the positions after the last settled one, j:
//! - the draws of the last pass (the paper's "ARM fixed-point iteration"), always;
//! - with a [`Forecaster`], for the next T positions j + t (t = 1..T), the head's draw, with the
//!   noise of j + t, from parameters a linear module predicts from the sampler's state at j (the
//!   paper's forecasting modules, here on the head parameters theta_j rather than a hidden
//!   state, so that it works for every plugin): theta_j, x_j, the last pass's parameters and
//!   draw at j + t (computed from a partly wrong prefix), the pixel one image row above j + t
//!   when it is settled, and the column of j + t. Drawing with the same noise as the model
//!   makes a forecast right whenever its distribution is close to the model's. The module
//!   starts as the identity on the last pass's parameters (exactly the fixed-point forecasts)
//!   and is fitted, with the model frozen, to the states of fixed-point sampling runs of the
//!   model itself, by maximum likelihood of the values their positions took in the end.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Arm, Result};

/// Linear forecasting modules for the next `offsets` positions: params(j + t) = b_t + phi_t W_t,
/// with phi_t = [theta_j, last theta_{j+t}, onehot(x_j), onehot(x_{j+t-W}) when t <= W and
/// j + t >= W, onehot(last draw at j + t), onehot of the column (j + t) mod W].
#[derive(Debug, Clone)]
pub struct Forecaster {
    offsets: usize,
    width: usize,
    levels: usize,
    params: usize,
    /// (T, F, P) row-major.
    w: Vec<f32>,
    /// (T, P).
    b: Vec<f32>,
}

/// How the forecaster is fitted.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// T, the positions forecast after the last settled one.
    pub offsets: usize,
    /// Images sampled with fixed-point forecasts to fit on.
    pub images: usize,
    /// AdamW steps.
    pub steps: usize,
    /// (state, position) pairs drawn per offset and step.
    pub rows: usize,
    pub lr: f64,
    /// Seed of the sampling noise and of the draws of pairs.
    pub seed: u64,
}

impl FitOptions {
    /// T = one image row (the pixel above is then always settled), at most 32; as many images
    /// as 2^17 pixels, between 64 and 512.
    pub fn for_shape((height, width): (usize, usize), seed: u64) -> Self {
        let images = ((1usize << 17) / (height * width).max(1)).clamp(64, 512);
        Self { offsets: width.clamp(1, 32), images, steps: 300, rows: 512, lr: 0.02, seed }
    }
}

/// Mean forecast negative log-likelihood per position (nats, for a head with a likelihood) on
/// a batch of (state, t) pairs drawn before fitting and not fitted on, before fitting (the
/// last pass's parameters) and after.
#[derive(Debug, Clone, Copy)]
pub struct FitReport {
    pub initial_nll: f64,
    pub fitted_nll: f64,
    /// Sampler states fitted to (one per image and pass of the fixed-point runs).
    pub states: usize,
}

/// A sampler state after a pass: the image, the last settled position j, theta from j to
/// j + T (exact at j), and the sequence from position `base` to j + T (settled up to j, last
/// draws after).
struct State {
    image: usize,
    j: usize,
    theta: Vec<f32>,
    base: usize,
    x: Vec<f32>,
}

impl Forecaster {
    /// Number of features F for a head with `params` parameters, `levels` levels and images
    /// `width` wide.
    pub fn features(params: usize, levels: usize, width: usize) -> usize {
        2 * params + 3 * levels + width
    }

    /// A forecaster with the given weights: `w` (T, F, P) and `b` (T, P) row-major.
    pub fn from_weights(
        offsets: usize,
        width: usize,
        levels: usize,
        params: usize,
        w: Vec<f32>,
        b: Vec<f32>,
    ) -> Result<Self> {
        let f = Self::features(params, levels, width);
        if offsets == 0 || width == 0 || w.len() != offsets * f * params || b.len() != offsets * params {
            candle_core::bail!(
                "forecaster: {offsets} offsets, F = {f}, P = {params} need w of {} and b of {} values, got {} and {}",
                offsets * f * params,
                offsets * params,
                w.len(),
                b.len()
            );
        }
        Ok(Self { offsets, width, levels, params, w, b })
    }

    pub fn offsets(&self) -> usize {
        self.offsets
    }

    /// Feature indices set to one besides the thetas (the one-hot blocks) for forecasting
    /// position `pos` = j + t; `x(i)` is the sampler's value at position i.
    fn hot(&self, x: impl Fn(usize) -> f32, j: usize, pos: usize) -> [Option<usize>; 4] {
        let (p, k, w) = (2 * self.params, self.levels, self.width);
        let t = pos - j;
        let above = (t <= w && pos >= w).then(|| p + k + x(pos - w) as usize);
        [Some(p + x(j) as usize), above, Some(p + 2 * k + x(pos) as usize), Some(p + 3 * k + pos % w)]
    }

    /// Head parameters forecast for positions j + 1 ..= min(j + T, D - 1): calls `emit(pos,
    /// params)` for each. `theta` holds the last pass's parameters of positions j, j + 1, ..
    /// (P each), `x` the sampler's sequence.
    fn forecast(&self, theta: &[f32], x: &[f32], j: usize, mut emit: impl FnMut(usize, &[f32])) {
        let (p, f) = (self.params, Self::features(self.params, self.levels, self.width));
        let mut out = vec![0f32; p];
        for t in 1..=self.offsets {
            let pos = j + t;
            if pos >= x.len() {
                break;
            }
            let wt = &self.w[(t - 1) * f * p..t * f * p];
            out.copy_from_slice(&self.b[(t - 1) * p..t * p]);
            let dense = theta[..p].iter().chain(&theta[t * p..(t + 1) * p]);
            for (i, &th) in dense.enumerate() {
                for (o, &wv) in out.iter_mut().zip(&wt[i * p..(i + 1) * p]) {
                    *o += th * wv;
                }
            }
            for i in self.hot(|i| x[i], j, pos).into_iter().flatten() {
                for (o, &wv) in out.iter_mut().zip(&wt[i * p..(i + 1) * p]) {
                    *o += wv;
                }
            }
            emit(pos, &out);
        }
    }

    /// Fits a forecaster to `arm` with the model frozen: samples `opts.images` images with
    /// fixed-point forecasts, keeps every state after a pass, and maximises with AdamW the
    /// head's log-likelihood, under the forecast parameters, of the value each position j + t
    /// took in the end, over random (state, t) pairs. None when every image settled in one pass
    /// (there is nothing to forecast).
    pub fn fit(arm: &Arm, opts: &FitOptions) -> Result<Option<(Self, FitReport)>> {
        let d = arm.dims();
        let (_, width) = arm.shape();
        let (p, k) = (arm.head().num_params(), arm.levels());
        let t_max = opts.offsets;
        if t_max == 0 || t_max >= d {
            candle_core::bail!("forecaster: offsets must be in 1..{d}, got {t_max}");
        }
        if opts.steps == 0 || opts.rows == 0 || opts.images == 0 {
            candle_core::bail!("forecaster: needs images, steps and rows");
        }
        let dev = arm.device();
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let q = arm.head().noise_dim();
        let noise: Vec<f32> = (0..opts.images * d * q).map(|_| rng.random::<f32>()).collect();
        let noise = Tensor::from_vec(noise, (opts.images, d, q), dev)?;
        let mut states = Vec::new();
        let mut keep = |image: usize, j: usize, theta: &[f32], x: &[f32]| {
            let base = (j + 1).saturating_sub(width);
            let end = (j + t_max + 1).min(d);
            let theta = theta[..(end - j) * p].to_vec();
            states.push(State { image, j, theta, base, x: x[base..end].to_vec() });
        };
        let done = sample(arm, &noise, None, Some(&mut keep))?.seq.flatten_all()?.to_vec1::<f32>()?;
        if states.is_empty() {
            return Ok(None);
        }
        // The states from which offset t reaches inside the image.
        let reach: Vec<Vec<usize>> =
            (1..=t_max).map(|t| (0..states.len()).filter(|&r| states[r].j + t < d).collect()).collect();

        let f = Self::features(p, k, width);
        let shell = Self { offsets: t_max, width, levels: k, params: p, w: vec![], b: vec![] };
        let rows = opts.rows;
        // A batch: phi (T, R, F), targets (T, R), and a mask for offsets no state reaches.
        let draw = |rng: &mut ChaCha8Rng| -> Result<(Tensor, Tensor, Tensor)> {
            let mut phi = vec![0f32; t_max * rows * f];
            let mut y = vec![0f32; t_max * rows];
            let mut mask = vec![0f32; t_max * rows];
            for (t, reach) in (1..=t_max).zip(&reach) {
                if reach.is_empty() {
                    continue;
                }
                for r in 0..rows {
                    let st = &states[reach[rng.random_range(0..reach.len())]];
                    let row = &mut phi[((t - 1) * rows + r) * f..][..f];
                    row[..p].copy_from_slice(&st.theta[..p]);
                    row[p..2 * p].copy_from_slice(&st.theta[t * p..(t + 1) * p]);
                    for i in shell.hot(|i| st.x[i - st.base], st.j, st.j + t).into_iter().flatten() {
                        row[i] = 1.0;
                    }
                    y[(t - 1) * rows + r] = done[st.image * d + st.j + t];
                    mask[(t - 1) * rows + r] = 1.0;
                }
            }
            let shape = (t_max, rows);
            Ok((
                Tensor::from_vec(phi, (t_max, rows, f), dev)?,
                Tensor::from_vec(y, shape, dev)?,
                Tensor::from_vec(mask, shape, dev)?,
            ))
        };
        // The identity on the last pass's parameters: the fixed-point forecasts.
        let mut w0 = vec![0f32; t_max * f * p];
        for t in 0..t_max {
            for i in 0..p {
                w0[(t * f + p + i) * p + i] = 1.0;
            }
        }
        let w = Var::from_tensor(&Tensor::from_vec(w0, (t_max, f, p), dev)?)?;
        let b = Var::zeros((t_max, 1, p), DType::F32, dev)?;
        let nll = |(phi, y, mask): &(Tensor, Tensor, Tensor)| -> Result<Tensor> {
            let params = phi.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?; // (T, R, P)
            let lp = (arm.head().log_prob(&params, y)? * mask)?.sum_all()?;
            lp.neg()? / mask.sum_all()?.to_scalar::<f32>()? as f64
        };
        // Drawn first and never stepped on (its states are shared with the fitting pairs).
        let held_out = draw(&mut rng)?;
        let initial_nll = nll(&held_out)?.to_scalar::<f32>()? as f64;
        let mut opt = AdamW::new(
            vec![w.clone(), b.clone()],
            ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..Default::default() },
        )?;
        for _ in 0..opts.steps {
            opt.backward_step(&nll(&draw(&mut rng)?)?)?;
        }
        let fitted_nll = nll(&held_out)?.to_scalar::<f32>()? as f64;
        let fc = Self::from_weights(
            t_max,
            width,
            k,
            p,
            w.as_tensor().flatten_all()?.to_vec1()?,
            b.as_tensor().flatten_all()?.to_vec1()?,
        )?;
        Ok(Some((fc, FitReport { initial_nll, fitted_nll, states: states.len() })))
    }
}

/// What the predictive sampler returns.
pub(crate) struct Predicted {
    /// (B, D) levels in sequence order.
    pub seq: Tensor,
    /// Parallel passes over the batch (those of its slowest image).
    pub passes: usize,
    /// Passes each image took part in.
    pub calls: Vec<usize>,
}

impl Predicted {
    /// Network calls per image, the mean over the batch.
    pub fn mean_calls(&self) -> f64 {
        self.calls.iter().sum::<usize>() as f64 / self.calls.len().max(1) as f64
    }
}

/// Called with (image, j, theta of positions j.., sequence) after each pass for every image not
/// yet settled.
type Observer<'a> = &'a mut dyn FnMut(usize, usize, &[f32], &[f32]);

/// The predictive sampler: `noise` (B, D, Q) as for `Arm::sample`. Each pass runs the network
/// on the images not yet settled only.
pub(crate) fn sample(
    arm: &Arm,
    noise: &Tensor,
    forecaster: Option<&Forecaster>,
    mut observe: Option<Observer<'_>>,
) -> Result<Predicted> {
    let (b, d, q) = noise.dims3()?;
    let p = arm.head().num_params();
    let dev: &Device = arm.device();
    let noise_host = noise.flatten_all()?.to_vec1::<f32>()?; // (B, D, Q)
    let mut x = vec![0f32; b * d];
    let mut settled = vec![0usize; b];
    let mut calls = vec![0usize; b];
    let mut passes = 0;
    loop {
        let active: Vec<usize> = (0..b).filter(|&i| settled[i] < d).collect();
        if active.is_empty() {
            break;
        }
        passes += 1;
        let n = active.len();
        let input: Vec<f32> = active.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect();
        let input = Tensor::from_vec(input, (n, d), dev)?;
        let theta = arm.conditional().forward_t(&arm.scale(&input)?, false)?; // (n, D, P)
        let u: Vec<f32> = active.iter().flat_map(|&i| noise_host[i * d * q..(i + 1) * d * q].iter().copied()).collect();
        let u = Tensor::from_vec(u, (n * d, q), dev)?;
        let draws = arm.head().sample(&theta.reshape((n * d, p))?, &u)?.to_vec1::<f32>()?; // (n D)
        let theta_host = match forecaster.is_some() || observe.is_some() {
            true => theta.flatten_all()?.to_vec1::<f32>()?,
            false => vec![],
        };
        // Forecasts to draw in one call of the head: parameters, noise and (image, position).
        let (mut f_params, mut f_noise, mut f_at) = (Vec::new(), Vec::new(), Vec::new());
        for (a, &i) in active.iter().enumerate() {
            calls[i] += 1;
            let row = &mut x[i * d..(i + 1) * d];
            let s = &draws[a * d..(a + 1) * d];
            // The draw at the first unsettled position is exact; each later one is while every
            // forecast before it was right.
            let mut k = settled[i];
            loop {
                let right = row[k] == s[k];
                row[k] = s[k];
                k += 1;
                if !right || k == d {
                    break;
                }
            }
            settled[i] = k;
            if k == d {
                continue;
            }
            row[k..].copy_from_slice(&s[k..]);
            let j = k - 1;
            let theta = theta_host.get((a * d + j) * p..(a + 1) * d * p).unwrap_or(&[]);
            if let Some(f) = observe.as_mut() {
                f(i, j, theta, row);
            }
            if let Some(fc) = forecaster {
                fc.forecast(theta, row, j, |pos, params| {
                    f_params.extend_from_slice(params);
                    f_noise.extend_from_slice(&noise_host[(i * d + pos) * q..][..q]);
                    f_at.push(i * d + pos);
                });
            }
        }
        if !f_at.is_empty() {
            let m = f_at.len();
            let params = Tensor::from_vec(f_params, (m, p), dev)?;
            let vals = arm.head().sample(&params, &Tensor::from_vec(f_noise, (m, q), dev)?)?.to_vec1::<f32>()?;
            for (at, v) in f_at.into_iter().zip(vals) {
                x[at] = v;
            }
        }
    }
    Ok(Predicted { seq: Tensor::from_vec(x, (b, d), dev)?, passes, calls })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Categorical, Conditional, Ordering, Sampler};

    const K: usize = 3;

    /// x_0 uniform over K levels, then x_d = x_{d-1} with probability 1 - O(e^-20): every
    /// image is one level repeated, which a forecaster can learn and fixed points cannot.
    struct Copy {
        d: usize,
    }

    impl Conditional for Copy {
        fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
            let (b, d) = x.dims2()?;
            let prev = Tensor::cat(&[Tensor::zeros((b, 1), DType::F32, x.device())?, x.narrow(1, 0, d - 1)?], 1)?;
            let level = (prev * (K - 1) as f64)?.unsqueeze(2)?; // (B, D, 1)
            let ks = Tensor::arange(0f32, K as f32, x.device())?.reshape((1, 1, K))?;
            let logits = (level.broadcast_sub(&ks)?.sqr()? * -20.0)?; // (B, D, K)
            let first = Tensor::from_vec((0..d).map(|i| (i > 0) as u8 as f32).collect(), (1, d, 1), x.device())?;
            logits.broadcast_mul(&first)
        }
        fn seq_len(&self) -> usize {
            self.d
        }
        fn device(&self) -> &Device {
            &Device::Cpu
        }
    }

    fn copy_arm() -> Result<Arm> {
        Arm::new(Box::new(Copy { d: 16 }), Box::new(Categorical::new(K)), K, (4, 4), Ordering::Raster)
    }

    fn noise(b: usize, seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Tensor::from_vec((0..b * 16).map(|_| rng.random::<f32>()).collect(), (b, 16, 1), &Device::Cpu)
    }

    #[test]
    fn forecasts_settle_a_row_per_pass_where_fixed_points_settle_one_pixel() -> Result<()> {
        let mut arm = copy_arm()?;
        let u = noise(60, 1)?;
        let naive = arm.sample(&u, Sampler::Naive)?.images.to_vec2::<f32>()?;
        // By construction every image is its first pixel repeated.
        assert!(naive.iter().all(|r| r.iter().all(|&v| v == r[0])));
        let constant = naive.iter().filter(|r| r[0] == 0.0).count();
        assert!(constant > 0 && constant < 60, "{constant}");

        // Fixed points: an image of zeros settles in the first pass; any other settles one
        // pixel per pass (each pass's draws copy a forecast that is one pixel behind).
        let fixed = arm.sample(&u, Sampler::Predictive)?;
        assert_eq!(fixed.images.to_vec2::<f32>()?, naive);
        let want = (constant + 16 * (60 - constant)) as f64 / 60.0;
        assert!((fixed.calls - want).abs() < 1e-9, "{} vs {want}", fixed.calls);
        assert_eq!(fixed.iterations, 16);

        // A forecaster fitted to fixed-point runs of the model forecasts x_j for the next T = 4
        // pixels: pass 1 settles pixel 0, each later pass T + 1 pixels, so a perfect one takes
        // 1 + ceil(15 / 5) = 4 passes per non-zero image. Fitted, it needs under half the
        // fixed-point passes.
        let (fc, report) = Forecaster::fit(&arm, &FitOptions::for_shape((4, 4), 0))?.expect("states");
        assert_eq!(fc.offsets(), 4);
        assert!(report.fitted_nll < 0.05 && report.initial_nll > 1.0, "{report:?}");
        arm.set_forecaster(Some(fc));
        let fore = arm.sample(&u, Sampler::Predictive)?;
        assert_eq!(fore.images.to_vec2::<f32>()?, naive);
        let perfect = (constant + 4 * (60 - constant)) as f64 / 60.0;
        assert!(fore.calls >= perfect && fore.calls < want / 2.0, "{} vs {perfect}, {want}", fore.calls);
        Ok(())
    }

    #[test]
    fn bad_weights_and_offsets_are_refused() -> Result<()> {
        let f = Forecaster::features(3, 3, 4);
        assert!(Forecaster::from_weights(2, 4, 3, 3, vec![0.0; 2 * f * 3], vec![0.0; 6]).is_ok());
        assert!(Forecaster::from_weights(2, 4, 3, 3, vec![0.0; 2 * f * 3 - 1], vec![0.0; 6]).is_err());
        assert!(Forecaster::from_weights(0, 4, 3, 3, vec![], vec![]).is_err());
        let arm = copy_arm()?;
        let opts = |offsets| FitOptions { offsets, ..FitOptions::for_shape((4, 4), 0) };
        assert!(Forecaster::fit(&arm, &opts(0)).is_err());
        assert!(Forecaster::fit(&arm, &opts(16)).is_err());
        Ok(())
    }
}
