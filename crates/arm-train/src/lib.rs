//! The training loop, written once for every plugin and head: seeded shuffling, Adamax / Adam /
//! AdamW, early stopping on validation NLL with patience, best weights kept and restored for the
//! test NLL, divergence detection. Knows nothing about TOML, parquet or the terminal: progress
//! goes to an observer callback, which can also ask to stop (Ctrl-C).
//!
//! Resumable: after every epoch the observer receives a [`TrainState`] (weights, best weights,
//! optimiser moments and step count, history); [`train_from`] continues from one and produces
//! exactly the epochs an uninterrupted run would have. The shuffling RNG is re-seeded from
//! (seed, epoch) at every epoch start, so it needs no saving; so are the plugins' dropout
//! streams (`Conditional::begin_epoch`), so a resumed run draws the same masks.
//!
//! Options: learning-rate schedules (a function of the epoch, `schedule.rs`), gradient clipping
//! by global norm (`clip.rs`) and Polyak averaging of the weights (`ema.rs`): with `ema`, the
//! validation and test NLL, the best weights and the saved model are the averages.

mod adam;
mod adamax;
mod clip;
mod dist_aug;
mod ema;
mod model;
mod schedule;
mod transform_mixture;

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use adam::{Adam, ParamsAdam};
pub use adamax::{Adamax, ParamsAdamax};
pub use clip::clip_grad_norm;
pub use dist_aug::{identity_condition, AugmentEval, DistAug};
pub use ema::Ema;
pub use model::Model;
pub use schedule::{lr_at, Schedule};
pub use transform_mixture::TransformMixture;
use arm_core::bits_per_dim;

use arm_data::{Dataset, Split};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamax,
    Adam,
    Adamw,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub batch_size: usize,
    pub max_epochs: usize,
    /// Epochs without a new best validation NLL before stopping.
    pub patience: usize,
    /// L2 (adamax, adam) or decoupled (adamw) weight decay.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Batch size for validation and test passes (no gradients), at most; see `eval_chunk`.
    pub eval_batch_size: usize,
    // The keys below were added later: they are written to a run's config only when set, so
    // the ids (config hashes) of runs made before them do not change.
    /// Learning-rate schedule over epochs: constant, exponential (`lr_decay`) or cosine.
    #[serde(skip_serializing_if = "is_default")]
    pub schedule: Schedule,
    /// Factor per epoch of the exponential schedule, in (0, 1].
    #[serde(skip_serializing_if = "is_one")]
    pub lr_decay: f64,
    /// Epochs of linear warm-up before the schedule.
    #[serde(skip_serializing_if = "is_default")]
    pub warmup_epochs: usize,
    /// The cosine schedule's floor.
    #[serde(skip_serializing_if = "is_default")]
    pub min_lr: f64,
    /// Rescale the gradients when their global L2 norm exceeds this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// Decay of the exponential moving average of the weights used for evaluation (Polyak
    /// averaging, e.g. 0.9995).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
    /// Distribution augmentation: groups of transforms (`arm_data::augment::AUGMENT_NAMES`)
    /// the model is also trained on, conditioned on which one was applied; evaluated and
    /// sampled at the identity. Empty: off.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub augment: Vec<String>,
    /// Probability that a training image is transformed (by one of `augment`'s transforms,
    /// uniformly); otherwise it is kept as it is, conditioned on the identity.
    #[serde(skip_serializing_if = "is_half")]
    pub augment_prob: f64,
    /// What an augmented model is evaluated and sampled as: p(x | identity), or the exact
    /// mixture over the identity and the listed transforms that permute pixels.
    #[serde(skip_serializing_if = "is_default")]
    pub augment_eval: AugmentEval,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

fn is_half(v: &f64) -> bool {
    *v == 0.5
}

impl Default for TrainConfig {
    /// The chapter's protocol: Adamax, lr 1e-3, batch 64, patience 20, up to 1000 epochs.
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::Adamax,
            lr: 1e-3,
            batch_size: 64,
            max_epochs: 1000,
            patience: 20,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eval_batch_size: 500,
            schedule: Schedule::Constant,
            lr_decay: 1.0,
            warmup_epochs: 0,
            min_lr: 0.0,
            clip_grad_norm: None,
            ema: None,
            augment: Vec::new(),
            augment_prob: 0.5,
            augment_eval: AugmentEval::Identity,
        }
    }
}

/// What is wrong with a value of `[train]`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("must be a positive number, got {0}")]
    NotPositive(f64),
    #[error("must be at least 1, got 0")]
    Zero,
    #[error("must be >= 0, got {0}")]
    Negative(f64),
    #[error("must be in [0, 1), got {0}")]
    NotBelowOne(f64),
    #[error("must be in (0, 1), got {0}")]
    NotInUnitInterval(f64),
    #[error("{0}")]
    Other(String),
}

/// A `[train]` value out of range: its key (relative to `[train]`) and the problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct TrainConfigError {
    pub key: &'static str,
    pub problem: Problem,
}

/// Pixels one validation or test forward pass holds at most, unless one training batch holds
/// more; see [`TrainConfig::eval_chunk`].
pub const EVAL_PIXELS: usize = 1 << 16;

impl TrainConfig {
    /// Images per validation / test forward pass for images of `dims` pixels: `eval_batch_size`,
    /// cut to [`EVAL_PIXELS`] pixels or one training batch, whichever is more. The weights are
    /// variables, so candle records the graph of an evaluation pass too and keeps all of its
    /// activations until the pass ends: 500 images of 28x28 took 2.7 GB more than training
    /// (PERF.md, "Evaluation in chunks"). 8x8 digits keep 500 (1024 fit).
    pub fn eval_chunk(&self, dims: usize) -> usize {
        self.eval_batch_size.min(self.batch_size.max(EVAL_PIXELS / dims.max(1))).max(1)
    }

    /// Checks ranges; the error names the first key out of range.
    pub fn validate(&self) -> Result<(), TrainConfigError> {
        let fail = |key, problem| Err(TrainConfigError { key, problem });
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.lr) {
            return fail("lr", Problem::NotPositive(self.lr));
        }
        for (key, v) in [
            ("batch_size", self.batch_size),
            ("eval_batch_size", self.eval_batch_size),
            ("patience", self.patience),
            ("max_epochs", self.max_epochs),
        ] {
            if v == 0 {
                return fail(key, Problem::Zero);
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return fail("weight_decay", Problem::Negative(self.weight_decay));
        }
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return fail(key, Problem::NotBelowOne(v));
            }
        }
        self.validate_options()
    }

    /// The schedule, clipping and averaging keys.
    fn validate_options(&self) -> Result<(), TrainConfigError> {
        let fail = |key, problem| Err(TrainConfigError { key, problem });
        let other = |s: String| Problem::Other(s);
        if !(self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            return fail("lr_decay", other(format!("must be in (0, 1], got {}", self.lr_decay)));
        }
        if self.lr_decay != 1.0 && self.schedule != Schedule::Exponential {
            return fail("lr_decay", other("is used only with schedule = \"exponential\"".into()));
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return fail("min_lr", other(format!("must be in [0, lr = {}], got {}", self.lr, self.min_lr)));
        }
        if self.warmup_epochs >= self.max_epochs {
            let msg = format!("must be below max_epochs = {}, got {}", self.max_epochs, self.warmup_epochs);
            return fail("warmup_epochs", other(msg));
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return fail("clip_grad_norm", Problem::NotPositive(c));
            }
        }
        if let Some(d) = self.ema {
            if !(d > 0.0 && d < 1.0) {
                return fail("ema", Problem::NotInUnitInterval(d));
            }
        }
        for (i, name) in self.augment.iter().enumerate() {
            if arm_data::augment::Transform::group(name).is_none() {
                let expected = arm_data::augment::AUGMENT_NAMES.join(", ");
                return fail("augment", other(format!("unknown transform group {name:?}: expected one of {expected}")));
            }
            if self.augment[..i].contains(name) {
                return fail("augment", other(format!("{name:?} is listed twice")));
            }
        }
        if !(self.augment_prob > 0.0 && self.augment_prob < 1.0) {
            return fail("augment_prob", Problem::NotInUnitInterval(self.augment_prob));
        }
        if self.augment_eval == AugmentEval::Mixture {
            let permutes = |g: &String| {
                arm_data::augment::Transform::group(g).unwrap_or_default().iter().any(|t| t.is_permutation())
            };
            if !self.augment.iter().any(permutes) {
                let msg = format!(
                    "\"mixture\" averages over the transforms that permute pixels (flips, transpose, rotations); train.augment lists {}",
                    if self.augment.is_empty() { "none".to_string() } else { format!("{:?}", self.augment) }
                );
                return fail("augment_eval", other(msg));
            }
        }
        Ok(())
    }
}

/// One row of `metrics.parquet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_nll: f64,
    pub val_nll: f64,
    pub val_bpd: f64,
    pub seconds: f64,
    /// The epoch's learning rate.
    pub lr: f64,
    /// Steps whose gradient norm was clipped (0 without clipping).
    pub clipped_steps: usize,
    /// The largest gradient norm of the epoch before clipping (NaN without clipping: the norm
    /// is not computed then).
    pub max_grad_norm: f64,
}

pub enum Event<'a> {
    Step {
        epoch: usize,
        step: usize,
        steps: usize,
    },
    /// An epoch ended; `state` is everything needed to resume right after it.
    Epoch {
        metrics: &'a EpochMetrics,
        best: bool,
        state: &'a TrainState,
    },
}

/// A run's complete training state at the end of an epoch: what a checkpoint holds. Tensors
/// are keyed by variable name (the `VarMap` key); how they are stored is the caller's business.
#[derive(Debug, Clone)]
pub struct TrainState {
    /// Completed epochs.
    pub epoch: usize,
    pub history: Vec<EpochMetrics>,
    pub best_epoch: usize,
    pub best_val_nll: f64,
    /// Current weights.
    pub weights: HashMap<String, Tensor>,
    /// Weights of the best epoch so far.
    pub best_weights: HashMap<String, Tensor>,
    /// The optimiser's two moments per variable (adamax: m, u; adam and adamw: m, v).
    pub moments: HashMap<String, (Tensor, Tensor)>,
    /// Optimiser steps taken (for bias correction).
    pub steps: usize,
    /// The moving averages of the weights, with `ema`.
    pub ema: Option<HashMap<String, Tensor>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Ran to max_epochs or stopped early on patience.
    Finished { stopped_early: bool },
    /// The loss became NaN or infinite.
    Diverged { epoch: usize, reason: String },
    /// The observer asked to stop.
    Interrupted { epoch: usize },
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub history: Vec<EpochMetrics>,
    pub best_epoch: usize,
    pub best_val_nll: f64,
    /// Test NLL of the best weights (nats per image); None unless finished.
    pub test_nll: Option<f64>,
    pub test_bpd: Option<f64>,
}

/// Mean NLL (or the bound a model evaluates) in nats per image over a split, accumulated in f64.
pub fn evaluate(model: &dyn Model, split: &Split, batch: usize) -> candle_core::Result<f64> {
    let mut total = 0.0f64;
    for x in split.batches(batch, model.device()) {
        let lp = in_pool(model.device(), || model.eval_log_prob(&x?))?; // (B,)
        total += lp.to_dtype(candle_core::DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(-total / split.n.max(1) as f64)
}

/// Runs `f` on a worker of the current rayon pool (in place when already on one). The fused
/// CPU ops split their products and loops over that pool; called from a thread outside it,
/// every parallel region hands its work to a pool thread and wakes the caller when done, and
/// a pool thread that went to sleep between regions (on a VM its CPU may be halted) is slow
/// to start. From a worker, a region runs its first half in place and only the second worker
/// has to be woken (see PERF.md, "Training steps on a rayon worker"). Other devices run `f`
/// on the calling thread (a GPU context is bound to the thread that made it current).
pub fn in_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Shuffled training indices of `epoch`: a ChaCha8 stream per (seed, epoch), so an epoch's
/// batches do not depend on how many epochs ran in this process.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

fn snapshot(map: &VarMap) -> candle_core::Result<HashMap<String, Tensor>> {
    let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect()
}

fn restore(map: &VarMap, snap: &HashMap<String, Tensor>) -> candle_core::Result<()> {
    let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
    for (k, v) in data.iter() {
        if let Some(t) = snap.get(k) {
            v.set(t)?;
        }
    }
    Ok(())
}

/// Like `restore`, but every variable must be present with its shape (a checkpoint of another
/// model is an error, not a partial load).
fn restore_all(map: &VarMap, snap: &HashMap<String, Tensor>, what: &str) -> candle_core::Result<()> {
    let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
    for (k, v) in data.iter() {
        let t = snap.get(k).ok_or_else(|| candle_core::Error::Msg(format!("{what}: no tensor for variable {k}")))?;
        if t.shape() != v.shape() {
            candle_core::bail!("{what}: variable {k} has shape {:?}, the model's is {:?}", t.shape(), v.shape());
        }
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    Ok(())
}

/// The float variables sorted by name: a stable order for optimiser state across processes
/// (`VarMap::all_vars` follows a HashMap's order).
fn named_vars(map: &VarMap) -> Vec<(String, Var)> {
    let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<(String, Var)> =
        data.iter().filter(|(_, v)| v.dtype().is_float()).map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

enum Opt {
    Adamax(Adamax),
    Adam(Adam),
}

impl Opt {
    fn new(vars: Vec<Var>, cfg: &TrainConfig) -> candle_core::Result<Self> {
        let (lr, beta1, beta2, eps, weight_decay) = (cfg.lr, cfg.beta1, cfg.beta2, 1e-8, cfg.weight_decay);
        Ok(match cfg.optimizer {
            OptimizerKind::Adamax => {
                Opt::Adamax(Adamax::new(vars, ParamsAdamax { lr, beta1, beta2, eps, weight_decay })?)
            }
            // adam: weight decay as an L2 term on the gradient; adamw: decoupled decay.
            OptimizerKind::Adam | OptimizerKind::Adamw => Opt::Adam(Adam::new(
                vars,
                ParamsAdam { lr, beta1, beta2, eps, weight_decay, decoupled: cfg.optimizer == OptimizerKind::Adamw },
            )?),
        })
    }

    fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        match self {
            Opt::Adamax(o) => o.backward_step(loss),
            Opt::Adam(o) => o.backward_step(loss),
        }
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        match self {
            Opt::Adamax(o) => o.step(grads),
            Opt::Adam(o) => o.step(grads),
        }
    }

    fn set_lr(&mut self, lr: f64) {
        match self {
            Opt::Adamax(o) => o.set_learning_rate(lr),
            Opt::Adam(o) => o.set_learning_rate(lr),
        }
    }

    /// (moments in `new`'s variable order, step count).
    fn state(&self) -> (Vec<(Tensor, Tensor)>, usize) {
        match self {
            Opt::Adamax(o) => (o.state_tensors(), o.steps()),
            Opt::Adam(o) => (o.state_tensors(), o.steps()),
        }
    }

    fn set_state(&mut self, moments: Vec<(Tensor, Tensor)>, steps: usize) -> candle_core::Result<()> {
        match self {
            Opt::Adamax(o) => o.set_state(moments, steps),
            Opt::Adam(o) => o.set_state(moments, steps),
        }
    }
}

/// Trains `model` (whose variables live in `map`) on `data.train`, early-stopping on `data.val`.
/// On return the map holds the best weights (lowest validation NLL).
pub fn train(
    model: &dyn Model,
    map: &VarMap,
    data: &Dataset,
    cfg: &TrainConfig,
    seed: u64,
    on: &mut dyn FnMut(Event) -> Control,
) -> candle_core::Result<Outcome> {
    train_from(model, map, data, cfg, seed, None, on)
}

/// [`train`], continuing from `resume` (a state handed out by an earlier run of the same config
/// and seed) when given: its weights, optimiser state, history and best epoch are restored and
/// training goes on with epoch `resume.epoch + 1`, exactly as if it had never stopped.
pub fn train_from(
    model: &dyn Model,
    map: &VarMap,
    data: &Dataset,
    cfg: &TrainConfig,
    seed: u64,
    resume: Option<TrainState>,
    on: &mut dyn FnMut(Event) -> Control,
) -> candle_core::Result<Outcome> {
    let mut t = Trainer::new(model, map, data, cfg, seed)?;
    let (mut stopping, mut history, first) = match resume {
        None => (EarlyStopping::new(map, cfg.patience)?, Vec::new(), 1),
        Some(st) => t.resume(st)?,
    };
    // A resumed run may have ended at its last epoch (patience) and been stopped before saying so.
    let status = if stopping.exhausted(first - 1) {
        Status::Finished { stopped_early: true }
    } else {
        t.epochs(first, &mut stopping, &mut history, on)?
    };
    restore(map, &stopping.best_weights)?;
    let (test_nll, test_bpd) = if matches!(status, Status::Finished { .. }) {
        let nll = evaluate(model, &data.test, cfg.eval_chunk(data.dims()))?;
        (Some(nll), Some(bits_per_dim(nll, data.dims())))
    } else {
        (None, None)
    };
    let (best_epoch, best_val_nll) = (stopping.best_epoch, stopping.best_val);
    Ok(Outcome { status, history, best_epoch, best_val_nll, test_nll, test_bpd })
}

/// Early stopping on the validation NLL: the best epoch so far, its NLL and its weights.
struct EarlyStopping {
    /// Epochs without a new best before training stops.
    patience: usize,
    best_epoch: usize,
    best_val: f64,
    best_weights: HashMap<String, Tensor>,
}

impl EarlyStopping {
    /// Before the first epoch: the current weights stand as the best until an epoch improves.
    fn new(map: &VarMap, patience: usize) -> candle_core::Result<Self> {
        Ok(Self { patience, best_epoch: 0, best_val: f64::INFINITY, best_weights: snapshot(map)? })
    }

    /// Records the validation NLL of `epoch`; a new best keeps the map's weights. Returns whether
    /// it was one.
    fn record(&mut self, epoch: usize, val_nll: f64, map: &VarMap) -> candle_core::Result<bool> {
        let improved = val_nll < self.best_val;
        if improved {
            self.best_val = val_nll;
            self.best_epoch = epoch;
            self.best_weights = snapshot(map)?;
        }
        Ok(improved)
    }

    /// Whether training stops after `epoch` (0: none yet): `patience` epochs without a new best.
    fn exhausted(&self, epoch: usize) -> bool {
        epoch > 0 && epoch.saturating_sub(self.best_epoch) >= self.patience
    }
}

/// How an epoch's training pass ended.
enum EpochEnd {
    /// Every batch stepped; the sum of per-image losses (nats).
    Trained { train_sum: f64 },
    /// Divergence or the observer ended training in the middle of the epoch.
    Stopped(Status),
}

/// What one training run works on: the model, its variables in a stable order, the optimiser.
struct Trainer<'a> {
    model: &'a dyn Model,
    map: &'a VarMap,
    data: &'a Dataset,
    cfg: &'a TrainConfig,
    seed: u64,
    device: Device,
    vars: Vec<(String, Var)>,
    opt: Opt,
    /// The moving averages of the weights, with `ema`.
    ema: Option<Ema>,
    /// This epoch so far: steps whose gradients were clipped, the largest norm before clipping.
    clipped: usize,
    max_norm: f64,
}

impl<'a> Trainer<'a> {
    fn new(
        model: &'a dyn Model,
        map: &'a VarMap,
        data: &'a Dataset,
        cfg: &'a TrainConfig,
        seed: u64,
    ) -> candle_core::Result<Self> {
        let vars = named_vars(map);
        let opt = Opt::new(vars.iter().map(|(_, v)| v.clone()).collect(), cfg)?;
        let ema = cfg.ema.map(|d| Ema::new(vars.iter().map(|(_, v)| v.clone()).collect(), d)).transpose()?;
        let device = model.device().clone();
        Ok(Self { model, map, data, cfg, seed, device, vars, opt, ema, clipped: 0, max_norm: f64::NAN })
    }

    /// Puts a checkpoint's weights and optimiser state in place; returns its early-stopping
    /// state, its history and the epoch to continue with.
    fn resume(&mut self, st: TrainState) -> candle_core::Result<(EarlyStopping, Vec<EpochMetrics>, usize)> {
        restore_all(self.map, &st.weights, "checkpoint weights")?;
        let mut moments = Vec::with_capacity(self.vars.len());
        for (k, _) in &self.vars {
            let m = st.moments.get(k).ok_or_else(|| {
                candle_core::Error::Msg(format!("checkpoint optimiser state: no moments for variable {k}"))
            })?;
            moments.push(m.clone());
        }
        self.opt.set_state(moments, st.steps)?;
        match (&mut self.ema, &st.ema) {
            (Some(ema), Some(avg)) => {
                let get = |k: &String| {
                    avg.get(k).cloned().ok_or_else(|| {
                        candle_core::Error::Msg(format!("checkpoint weight averages: none for variable {k}"))
                    })
                };
                ema.set(self.vars.iter().map(|(k, _)| get(k)).collect::<candle_core::Result<Vec<_>>>()?)?;
            }
            (Some(_), None) => candle_core::bail!("checkpoint has no weight averages, the run averages them (ema)"),
            (None, Some(_)) => candle_core::bail!("checkpoint has weight averages, the run does not average (ema)"),
            (None, None) => {}
        }
        // Check the best weights against the model too (restored into the map at the end).
        for (k, v) in &self.vars {
            match st.best_weights.get(k) {
                Some(t) if t.shape() == v.shape() => {}
                _ => candle_core::bail!("checkpoint best weights: no tensor of shape {:?} for variable {k}", v.shape()),
            }
        }
        let stopping = EarlyStopping {
            patience: self.cfg.patience,
            best_epoch: st.best_epoch,
            best_val: st.best_val_nll,
            best_weights: st.best_weights,
        };
        Ok((stopping, st.history, st.epoch + 1))
    }

    /// Epochs `first..=max_epochs`: train, validate, hand the state to the observer, stop early.
    fn epochs(
        &mut self,
        first: usize,
        stopping: &mut EarlyStopping,
        history: &mut Vec<EpochMetrics>,
        on: &mut dyn FnMut(Event) -> Control,
    ) -> candle_core::Result<Status> {
        for epoch in first..=self.cfg.max_epochs {
            let t0 = Instant::now();
            let c = self.cfg;
            let lr = lr_at(c.schedule, (c.lr, c.lr_decay, c.min_lr), (epoch, c.warmup_epochs, c.max_epochs));
            self.opt.set_lr(lr);
            let train_sum = match self.run_epoch(epoch, on)? {
                EpochEnd::Trained { train_sum } => train_sum,
                EpochEnd::Stopped(status) => return Ok(status),
            };
            let (val_nll, improved) = self.validate(epoch, stopping)?;
            if !val_nll.is_finite() {
                return Ok(Status::Diverged { epoch, reason: format!("validation NLL is {val_nll}") });
            }
            history.push(EpochMetrics {
                epoch,
                train_nll: train_sum / self.data.train.n.max(1) as f64,
                val_nll,
                val_bpd: bits_per_dim(val_nll, self.data.dims()),
                seconds: t0.elapsed().as_secs_f64(),
                lr,
                clipped_steps: self.clipped,
                max_grad_norm: self.max_norm,
            });
            let state = self.state(epoch, history, stopping)?;
            let metrics = &history[history.len() - 1];
            if on(Event::Epoch { metrics, best: improved, state: &state }) == Control::Stop {
                return Ok(Status::Interrupted { epoch });
            }
            if stopping.exhausted(epoch) {
                return Ok(Status::Finished { stopped_early: true });
            }
        }
        Ok(Status::Finished { stopped_early: false })
    }

    /// The validation NLL after an epoch, of the averaged weights with `ema` (which are then
    /// the ones early stopping keeps), and whether it is a new best. A non-finite NLL is
    /// returned before anything is recorded.
    fn validate(&mut self, epoch: usize, stopping: &mut EarlyStopping) -> candle_core::Result<(f64, bool)> {
        let training = match &self.ema {
            None => None,
            Some(ema) => {
                let current = snapshot(self.map)?;
                for ((_, v), avg) in self.vars.iter().zip(ema.averages()) {
                    v.set(avg)?;
                }
                Some(current)
            }
        };
        let val_nll = evaluate(self.model, &self.data.val, self.cfg.eval_chunk(self.data.dims()))?;
        let improved = val_nll.is_finite() && stopping.record(epoch, val_nll, self.map)?;
        if let Some(current) = training {
            restore(self.map, &current)?;
        }
        Ok((val_nll, improved))
    }

    /// One pass over the shuffled training set, a step per batch.
    fn run_epoch(&mut self, epoch: usize, on: &mut dyn FnMut(Event) -> Control) -> candle_core::Result<EpochEnd> {
        (self.clipped, self.max_norm) = (0, f64::NAN);
        let order = epoch_order(self.data.train.n, self.seed, epoch);
        self.model.begin_epoch(epoch);
        let steps = self.data.train.n.div_ceil(self.cfg.batch_size);
        let mut train_sum = 0.0f64;
        for (step, idx) in order.chunks(self.cfg.batch_size).enumerate() {
            let lv = self.step(idx, epoch)?;
            if !lv.is_finite() {
                let reason = format!("training loss is {lv} at step {}", step + 1);
                return Ok(EpochEnd::Stopped(Status::Diverged { epoch, reason }));
            }
            train_sum += lv * idx.len() as f64;
            if on(Event::Step { epoch, step: step + 1, steps }) == Control::Stop {
                return Ok(EpochEnd::Stopped(Status::Interrupted { epoch }));
            }
        }
        Ok(EpochEnd::Trained { train_sum })
    }

    /// One optimiser step on the training images `idx`; returns the loss (nats per image). A
    /// loss that is not finite takes no step.
    fn step(&mut self, idx: &[usize], epoch: usize) -> candle_core::Result<f64> {
        let x = self.data.train.batch(idx, &self.device)?; // (B, D)
        let (model, opt, ema, clip) = (self.model, &mut self.opt, &mut self.ema, self.cfg.clip_grad_norm);
        let vars: Vec<Var> = if clip.is_some() { self.vars.iter().map(|(_, v)| v.clone()).collect() } else { vec![] };
        let (lv, norm) = in_pool(&self.device, || -> candle_core::Result<(f64, Option<f64>)> {
            let loss = model.loss(&x, epoch)?; // scalar, nats per image
            let lv = loss.to_scalar::<f32>()? as f64;
            let mut norm = None;
            if lv.is_finite() {
                match clip {
                    None => opt.backward_step(&loss)?,
                    Some(max) => {
                        let mut grads = loss.backward()?;
                        norm = Some(clip_grad_norm(&mut grads, &vars, max)?);
                        opt.step(&grads)?;
                    }
                }
                if let Some(e) = ema {
                    e.update()?;
                }
            }
            Ok((lv, norm))
        })?;
        if let (Some(n), Some(max)) = (norm, clip) {
            self.clipped += usize::from(n > max);
            self.max_norm = if self.max_norm.is_nan() { n } else { self.max_norm.max(n) };
        }
        Ok(lv)
    }

    /// Everything needed to resume right after `epoch`.
    fn state(
        &self,
        epoch: usize,
        history: &[EpochMetrics],
        stopping: &EarlyStopping,
    ) -> candle_core::Result<TrainState> {
        let (moments, steps) = self.opt.state();
        Ok(TrainState {
            epoch,
            history: history.to_vec(),
            best_epoch: stopping.best_epoch,
            best_val_nll: stopping.best_val,
            weights: snapshot(self.map)?,
            best_weights: stopping.best_weights.clone(),
            moments: self.vars.iter().map(|(k, _)| k.clone()).zip(moments).collect(),
            steps,
            ema: self.ema.as_ref().map(|e| self.vars.iter().map(|(k, _)| k.clone()).zip(e.averages().to_vec()).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new best resets the count; training stops once `patience` epochs pass without one.
    #[test]
    fn early_stopping_counts_epochs_since_the_best() -> candle_core::Result<()> {
        let map = VarMap::new();
        let mut es = EarlyStopping::new(&map, 2)?;
        assert!(!es.exhausted(0), "nothing to stop before the first epoch");
        let vals = [5.0, 4.0, 4.5, 3.0, 3.0, 3.5];
        let mut seen = Vec::new();
        for (i, v) in vals.into_iter().enumerate() {
            let epoch = i + 1;
            seen.push((es.record(epoch, v, &map)?, es.exhausted(epoch)));
        }
        // Epoch 4 is the best (an equal NLL is no improvement); 6 is the second epoch after it.
        let want = [(true, false), (true, false), (false, false), (true, false), (false, false), (false, true)];
        assert_eq!(seen, want);
        assert_eq!((es.best_epoch, es.best_val), (4, 3.0));
        Ok(())
    }

    /// The first key out of range is named, with the value it has.
    #[test]
    fn validate_names_the_first_bad_key() {
        assert_eq!(TrainConfig::default().validate(), Ok(()));
        let bad = |c: TrainConfig| c.validate().err();
        let err = |key, problem| Some(TrainConfigError { key, problem });
        assert_eq!(bad(TrainConfig { lr: f64::NAN, batch_size: 0, ..Default::default() }).map(|e| e.key), Some("lr"));
        assert_eq!(bad(TrainConfig { lr: -0.5, ..Default::default() }), err("lr", Problem::NotPositive(-0.5)));
        assert_eq!(bad(TrainConfig { patience: 0, ..Default::default() }), err("patience", Problem::Zero));
        assert_eq!(
            bad(TrainConfig { weight_decay: -1.0, ..Default::default() }),
            err("weight_decay", Problem::Negative(-1.0))
        );
        assert_eq!(bad(TrainConfig { beta2: 1.0, ..Default::default() }), err("beta2", Problem::NotBelowOne(1.0)));
        let msg = bad(TrainConfig { max_epochs: 0, ..Default::default() }).map(|e| e.to_string());
        assert_eq!(msg.as_deref(), Some("max_epochs: must be at least 1, got 0"));
    }

    /// The step runs on a worker of the pool the fused ops split their work over, and gives
    /// back what the closure returned.
    #[test]
    fn eval_chunks_cap_the_pixels_of_a_pass_but_not_below_a_training_batch() {
        let cfg = |batch_size, eval_batch_size| TrainConfig { batch_size, eval_batch_size, ..Default::default() };
        assert_eq!(cfg(64, 500).eval_chunk(64), 500, "digits: 65536 / 64 = 1024 would fit");
        assert_eq!(cfg(64, 500).eval_chunk(784), 83, "28x28: 65536 / 784 = 83");
        assert_eq!(cfg(128, 500).eval_chunk(784), 128, "never below a training batch");
        assert_eq!(cfg(64, 50).eval_chunk(784), 50, "never above eval_batch_size");
        assert_eq!(cfg(64, 500).eval_chunk(1 << 20), 64);
    }

    #[test]
    fn in_pool_runs_on_a_rayon_worker() {
        assert_eq!(rayon::current_thread_index(), None, "the test thread is not a worker");
        let (on_worker, v) = in_pool(&Device::Cpu, || (rayon::current_thread_index().is_some(), 7));
        assert!(on_worker);
        assert_eq!(v, 7);
    }
}
