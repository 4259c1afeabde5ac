//! The `Arm`: a conditional, a head, a pixel ordering and the number of levels.
//!
//! log p(x) = sum_d log p(x_{pi(d)} | x_{pi(<d)}) over the ordering pi, evaluated for all d in one
//! parallel pass (teacher forcing). Units: nats per image, and bits per dimension
//! = nats / (D ln 2). Three exact samplers share pre-drawn uniform noise:
//! - naive: the default stepper (a full forward pass per pixel, O(D^2));
//! - cached: the plugin's own stepper (O(D) where the plugin keeps caches);
//! - jacobi: fixed-point iteration of all positions in parallel from the previous iterate with
//!   the same noise (Song et al. 2021, "Accelerating feedforward computation via parallel
//!   nonlinear equation solving", Alg. 1); after t iterations the first t positions are final, so
//!   it ends in at most D passes and returns exactly the sequential sample;
//! - predictive: parallel passes that check forecasts of the next pixels, with the last pass's
//!   draws as forecasts and optionally a fitted forecaster (Wiggers & Hoogeboom 2020; see
//!   `predictive.rs`); also exact, in at most D passes.

use candle_core::{DType, Device, Tensor};

use crate::{Conditional, Forecaster, Head, NaiveStepper, Ordering, Result, Stepper};

/// Nats per image to bits per dimension.
pub fn bits_per_dim(nats: f64, dims: usize) -> f64 {
    nats / (dims as f64 * std::f64::consts::LN_2)
}

/// How `Arm::sample` walks the pixels; every sampler returns the same images for one noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Sampler {
    /// A full forward pass per pixel (the default stepper).
    Naive,
    /// The plugin's own stepper, with its caches.
    Cached,
    /// Parallel fixed-point iterations of all pixels.
    Jacobi,
    /// Parallel passes that check forecasts of the next pixels (Wiggers & Hoogeboom 2020).
    Predictive,
}

impl Sampler {
    /// The name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Naive => "naive",
            Sampler::Cached => "cached",
            Sampler::Jacobi => "jacobi",
            Sampler::Predictive => "predictive",
        }
    }
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub struct SampleOutput {
    /// (B, D) levels as f32, in image (row-major) layout.
    pub images: Tensor,
    /// Forward passes (jacobi, predictive: the slowest image's) or steps (naive, cached) taken.
    pub iterations: usize,
    /// Network calls per image, the mean over the batch: D steps for naive and cached, the
    /// passes for Jacobi, and the passes each image took part in for predictive.
    pub calls: f64,
}

pub struct Arm {
    conditional: Box<dyn Conditional>,
    head: std::sync::Arc<dyn Head>,
    levels: usize,
    height: usize,
    width: usize,
    ordering: Ordering,
    /// Sequence -> image and image -> sequence index maps; None for the identity.
    perm: Option<(Tensor, Tensor)>,
    /// Forecasts of the predictive sampler besides its fixed-point ones.
    forecaster: Option<Forecaster>,
}

impl Arm {
    pub fn new(
        conditional: Box<dyn Conditional>,
        head: Box<dyn Head>,
        levels: usize,
        (height, width): (usize, usize),
        ordering: Ordering,
    ) -> Result<Self> {
        if levels < 2 {
            candle_core::bail!("levels must be at least 2, got {levels}");
        }
        if conditional.seq_len() != height * width {
            candle_core::bail!("conditional built for {} pixels, data has {height}x{width}", conditional.seq_len());
        }
        let p = ordering.permutation(height, width);
        let dev = conditional.device();
        // Both None for the identity, both Some otherwise.
        let perm = crate::gather_index(&p, dev)?.zip(crate::gather_index(&crate::invert(&p), dev)?);
        Ok(Self { conditional, head: head.into(), levels, height, width, ordering, perm, forecaster: None })
    }

    /// The same head, levels, shape and ordering over another network (a conditional network
    /// with its conditioning vector fixed, [`crate::Conditioned`]).
    pub fn rebind(&self, conditional: Box<dyn Conditional>) -> Result<Arm> {
        if conditional.seq_len() != self.dims() {
            candle_core::bail!("conditional built for {} pixels, the model has {}", conditional.seq_len(), self.dims());
        }
        let perm = self.perm.as_ref().map(|(a, b)| (a.clone(), b.clone()));
        Ok(Arm { conditional, head: self.head.clone(), perm, forecaster: None, ..*self })
    }

    pub fn head(&self) -> &dyn Head {
        self.head.as_ref()
    }
    pub fn conditional(&self) -> &dyn Conditional {
        self.conditional.as_ref()
    }
    pub fn levels(&self) -> usize {
        self.levels
    }
    pub fn dims(&self) -> usize {
        self.height * self.width
    }
    pub fn shape(&self) -> (usize, usize) {
        (self.height, self.width)
    }
    pub fn ordering(&self) -> Ordering {
        self.ordering
    }
    pub fn device(&self) -> &Device {
        self.conditional.device()
    }

    /// The forecaster the predictive sampler uses (None: fixed-point forecasts only).
    pub fn set_forecaster(&mut self, forecaster: Option<Forecaster>) {
        self.forecaster = forecaster;
    }

    pub fn forecaster(&self) -> Option<&Forecaster> {
        self.forecaster.as_ref()
    }

    /// (B, D) image layout -> (B, D) sequence order.
    pub fn to_sequence(&self, x: &Tensor) -> Result<Tensor> {
        match &self.perm {
            None => Ok(x.clone()),
            Some((fwd, _)) => x.index_select(fwd, 1),
        }
    }

    /// (B, D) sequence order -> (B, D) image layout.
    pub fn to_image(&self, x: &Tensor) -> Result<Tensor> {
        match &self.perm {
            None => Ok(x.clone()),
            Some((_, inv)) => x.index_select(inv, 1),
        }
    }

    /// Levels -> network inputs in [0, 1] (0 stays 0, so zero padding reads as background).
    pub(crate) fn scale(&self, levels: &Tensor) -> Result<Tensor> {
        levels.affine(1.0 / (self.levels - 1) as f64, 0.0)
    }

    /// x: (B, D) levels in image layout -> (B, D) log p per pixel, in sequence order.
    pub fn log_prob_pixels(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let xs = self.to_sequence(&x.to_dtype(DType::F32)?)?; // (B, D)
        let params = self.conditional.forward_t(&self.scale(&xs)?, train)?; // (B, D, P)
        self.head.log_prob(&params, &xs) // (B, D)
    }

    /// (B,) log p(x) in nats per image: of the network's default ensemble (one member for
    /// most plugins; see [`Conditional::members`]).
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        self.log_prob_members(x, self.conditional.members().0)
    }

    /// (B,) log p_m(x) of member `m` of the network's ensemble alone.
    pub fn log_prob_member(&self, x: &Tensor, m: usize) -> Result<Tensor> {
        let xs = self.to_sequence(&x.to_dtype(DType::F32)?)?; // (B, D)
        let params = self.conditional.forward_member(&self.scale(&xs)?, m)?; // (B, D, P)
        self.head.log_prob(&params, &xs)?.sum(1)
    }

    /// (B,) log p(x) of the ensemble of the network's first `n` members, log (1/n) sum_m p_m(x)
    /// (the log of the mean probability, not the mean of the logs), or log sum_m w_m p_m(x)
    /// with the network's member weights renormalised over the n, from a stable log-sum-exp
    /// over members.
    pub fn log_prob_members(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let available = self.conditional.members().1;
        if n == 0 || n > available {
            candle_core::bail!("ensemble of {n} members: the network has {available}");
        }
        if n == 1 {
            return self.log_prob_pixels(x, false)?.sum(1);
        }
        let per_member = (0..n).map(|m| self.log_prob_member(x, m)).collect::<Result<Vec<_>>>()?; // n x (B,)
        let mut lp = Tensor::stack(&per_member, 1)?.to_dtype(DType::F64)?; // (B, n)
        let weights = self.conditional.member_weights().map(|w| w[..n].to_vec()).unwrap_or_else(|| vec![1.0; n]);
        let total: f64 = weights.iter().sum();
        if weights.iter().any(|&w| w.is_nan() || w < 0.0) || total.is_nan() || total <= 0.0 {
            candle_core::bail!("member weights {weights:?}: expected non-negative numbers with a positive sum");
        }
        let log_w: Vec<f64> = weights.iter().map(|w| (w / total).ln()).collect();
        lp = lp.broadcast_add(&Tensor::from_vec(log_w, (1, n), lp.device())?)?;
        let top = lp.max_keepdim(1)?; // (B, 1)
        let lse = (lp.broadcast_sub(&top)?.exp()?.sum_keepdim(1)?.log()? + top)?; // (B, 1)
        lse.squeeze(1)?.to_dtype(DType::F32)
    }

    /// Mean negative log-likelihood in nats per image (the training loss).
    pub fn nll(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.log_prob_pixels(x, train)?.sum(1)?.mean(0)?.neg()
    }

    /// Draws samples; `noise` is (B, D, Q) uniform in [0, 1) indexed by sequence position,
    /// with Q = head.noise_dim(). The same noise gives the same images for every sampler.
    pub fn sample(&self, noise: &Tensor, sampler: Sampler) -> Result<SampleOutput> {
        let (b, d, q) = noise.dims3()?;
        if d != self.dims() || q != self.head.noise_dim() {
            candle_core::bail!("noise shape ({b}, {d}, {q}), expected (B, {}, {})", self.dims(), self.head.noise_dim());
        }
        let (seq, iterations, calls) = match sampler {
            Sampler::Naive => {
                let st = NaiveStepper::new(self.conditional.as_ref(), b)?;
                (self.run_stepper(Box::new(st), noise)?, d, d as f64)
            }
            Sampler::Cached => (self.cached_in(noise, arm_kernels::own_threads())?, d, d as f64),
            Sampler::Jacobi => {
                let (seq, it) = self.jacobi(noise)?;
                (seq, it, it as f64)
            }
            Sampler::Predictive => {
                let p = crate::predictive::sample(self, noise, self.forecaster.as_ref(), None)?;
                let mean = p.mean_calls();
                (p.seq, p.passes, mean)
            }
        };
        Ok(SampleOutput { images: self.to_image(&seq)?, iterations, calls })
    }

    /// (B, D) images from the predictive sampler with `forecaster` in place of the Arm's own,
    /// and the mean network calls per image.
    pub fn sample_predictive_with(&self, noise: &Tensor, forecaster: Option<&Forecaster>) -> Result<(Tensor, f64)> {
        let p = crate::predictive::sample(self, noise, forecaster, None)?;
        Ok((self.to_image(&p.seq)?, p.mean_calls()))
    }

    /// (B, D) images from the cached sampler with the batch cut into `parts` parts of equal
    /// size (the last may be smaller), each with its own stepper; they do not depend on `parts`.
    pub fn sample_cached_in(&self, noise: &Tensor, parts: usize) -> Result<Tensor> {
        self.to_image(&self.cached_in(noise, parts)?)
    }

    /// The cached sampler. On the CPU the batch is split into `parts` parts (one per thread
    /// for `sample`), each sampled by its own stepper on a thread of its own: a step's products
    /// are too small to share between threads, and the images of a batch are independent
    /// (PERF.md, "One stepper per thread").
    fn cached_in(&self, noise: &Tensor, parts: usize) -> Result<Tensor> {
        let b = noise.dim(0)?;
        let run = |noise: &Tensor| self.run_stepper(self.conditional.stepper(noise.dim(0)?)?, noise);
        if !self.device().is_cpu() || b == 0 {
            return run(noise);
        }
        // Even one part runs on a pool thread of its own: from this thread every parallel
        // region of a step would hand its work to a pool thread and wait for it.
        let per = b.div_ceil(parts.max(1));
        let seqs = arm_kernels::on_own_threads(b.div_ceil(per), |i| {
            let start = i * per;
            run(&noise.narrow(0, start, per.min(b - start))?)
        });
        Tensor::cat(&seqs.into_iter().collect::<Result<Vec<_>>>()?, 0)
    }

    fn run_stepper(&self, mut st: Box<dyn Stepper + '_>, noise: &Tensor) -> Result<Tensor> {
        let (_, d, _) = noise.dims3()?;
        let mut cols = Vec::with_capacity(d);
        for i in 0..d {
            let params = st.params()?; // (B, P)
            let u = noise.narrow(1, i, 1)?.squeeze(1)?; // (B, Q)
            let x = self.head.sample(&params, &u)?; // (B,)
            st.push(&self.scale(&x)?)?;
            cols.push(x);
        }
        Tensor::stack(&cols, 1) // (B, D)
    }

    fn jacobi(&self, noise: &Tensor) -> Result<(Tensor, usize)> {
        let (b, d, q) = noise.dims3()?;
        let flat_noise = noise.reshape((b * d, q))?;
        let mut x = Tensor::zeros((b, d), DType::F32, self.device())?;
        for it in 1..=d {
            let params = self.conditional.forward_t(&self.scale(&x)?, false)?; // (B, D, P)
            let p = params.dim(2)?;
            let next = self.head.sample(&params.reshape((b * d, p))?, &flat_noise)?.reshape((b, d))?;
            let changed = next.ne(&x)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            x = next;
            // After `it` passes the first `it` positions are final; an unchanged iterate is
            // a fixed point, which is the sequential sample.
            if changed == 0.0 || it == d {
                return Ok((x, it));
            }
        }
        Ok((x, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Categorical;

    /// Two members with fixed logits for one pixel of 2 levels: member m predicts
    /// p_m(0) = sigmoid(-l_m) whatever the input.
    struct TwoMembers {
        logits: [f32; 2],
    }

    impl Conditional for TwoMembers {
        fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
            self.forward_member(x, 0)
        }
        fn seq_len(&self) -> usize {
            1
        }
        fn device(&self) -> &Device {
            &Device::Cpu
        }
        fn members(&self) -> (usize, usize) {
            (2, 2)
        }
        fn forward_member(&self, x: &Tensor, m: usize) -> Result<Tensor> {
            let b = x.dim(0)?;
            Tensor::new(&[[[0f32, self.logits[m]]]], x.device())?.broadcast_as((b, 1, 2))?.contiguous()
        }
    }

    /// The same members weighted 3 : 1.
    struct Weighted(TwoMembers);

    impl Conditional for Weighted {
        fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
            self.0.forward_t(x, train)
        }
        fn seq_len(&self) -> usize {
            1
        }
        fn device(&self) -> &Device {
            &Device::Cpu
        }
        fn members(&self) -> (usize, usize) {
            (2, 2)
        }
        fn member_weights(&self) -> Option<Vec<f64>> {
            Some(vec![3.0, 1.0])
        }
        fn forward_member(&self, x: &Tensor, m: usize) -> Result<Tensor> {
            self.0.forward_member(x, m)
        }
    }

    #[test]
    fn a_weighted_ensemble_is_the_log_of_the_weighted_probability() -> Result<()> {
        // p(0) = 3/4 * 1/4 + 1/4 * 1/2 = 5/16, p(1) = 11/16; the first member alone: 1/4.
        let net = Weighted(TwoMembers { logits: [3f32.ln(), 0.0] });
        let arm = Arm::new(Box::new(net), Box::new(Categorical::new(2)), 2, (1, 1), Ordering::Raster)?;
        let x = Tensor::new(&[[0f32], [1.0]], &Device::Cpu)?;
        let lp = arm.log_prob(&x)?.to_vec1::<f32>()?;
        assert!((lp[0] - (5f32 / 16.0).ln()).abs() < 1e-6, "{}", lp[0]);
        assert!((lp[1] - (11f32 / 16.0).ln()).abs() < 1e-6, "{}", lp[1]);
        let one = arm.log_prob_members(&x, 1)?.to_vec1::<f32>()?;
        assert!((one[0] - 0.25f32.ln()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn an_ensemble_is_the_log_of_the_mean_probability() -> Result<()> {
        // logits [0, ln 3] -> p(0) = 1/4; [0, 0] -> p(0) = 1/2. Ensemble p(0) = 3/8, p(1) = 5/8.
        // python: import math; math.log(3/8), math.log(5/8)
        let net = TwoMembers { logits: [3f32.ln(), 0.0] };
        let arm = Arm::new(Box::new(net), Box::new(Categorical::new(2)), 2, (1, 1), Ordering::Raster)?;
        let x = Tensor::new(&[[0f32], [1.0]], &Device::Cpu)?;
        let lp = arm.log_prob(&x)?.to_vec1::<f32>()?;
        assert!((lp[0] - (-0.980_829_3)).abs() < 1e-6, "{}", lp[0]);
        assert!((lp[1] - (-0.470_003_6)).abs() < 1e-6, "{}", lp[1]);
        // The mean of the logs would be (ln 1/4 + ln 1/2) / 2 = -1.0397 for x = 0.
        let one = arm.log_prob_members(&x, 1)?.to_vec1::<f32>()?;
        assert!((one[0] - 0.25f32.ln()).abs() < 1e-6);
        assert!(arm.log_prob_members(&x, 3).is_err());
        Ok(())
    }
}
