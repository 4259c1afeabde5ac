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

mod adam;
mod adamax;

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
use arm_core::{bits_per_dim, Arm};
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
    /// Batch size for validation and test passes (no gradients).
    pub eval_batch_size: usize,
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
}

/// A `[train]` value out of range: its key (relative to `[train]`) and the problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct TrainConfigError {
    pub key: &'static str,
    pub problem: Problem,
}

impl TrainConfig {
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

/// Mean NLL in nats per image over a split, accumulated in f64.
pub fn evaluate(arm: &Arm, split: &Split, batch: usize) -> candle_core::Result<f64> {
    let mut total = 0.0f64;
    for x in split.batches(batch, arm.device()) {
        let lp = in_pool(arm.device(), || arm.log_prob(&x?))?; // (B,)
        total += lp.to_dtype(candle_core::DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(-total / split.n.max(1) as f64)
}

/// Runs `f` on a worker of the current rayon pool (in place when already on one). The fused
/// CPU ops split their products and loops over that pool; called from a thread outside it,
/// every parallel region hands its work to a pool thread and wakes the caller when done, and
/// a pool thread that went to sleep between regions (these are VMs: its CPU may be halted)
/// took up to a third of a millisecond to start. From a worker, a region runs its first half
/// in place and only the second worker has to be woken. Measured with `runner bench train`,
/// 3 alternated runs each: gated PixelCNN 0.122-0.128 -> 0.113-0.123 s per step, reference
/// 0.057-0.059 -> 0.056 s. Other devices run `f` on the calling thread (a GPU context is
/// bound to the thread that made it current).
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

/// Trains `arm` (whose variables live in `map`) on `data.train`, early-stopping on `data.val`.
/// On return the map holds the best weights (lowest validation NLL).
pub fn train(
    arm: &Arm,
    map: &VarMap,
    data: &Dataset,
    cfg: &TrainConfig,
    seed: u64,
    on: &mut dyn FnMut(Event) -> Control,
) -> candle_core::Result<Outcome> {
    train_from(arm, map, data, cfg, seed, None, on)
}

/// [`train`], continuing from `resume` (a state handed out by an earlier run of the same config
/// and seed) when given: its weights, optimiser state, history and best epoch are restored and
/// training goes on with epoch `resume.epoch + 1`, exactly as if it had never stopped.
pub fn train_from(
    arm: &Arm,
    map: &VarMap,
    data: &Dataset,
    cfg: &TrainConfig,
    seed: u64,
    resume: Option<TrainState>,
    on: &mut dyn FnMut(Event) -> Control,
) -> candle_core::Result<Outcome> {
    let device: Device = arm.device().clone();
    let vars = named_vars(map);
    let mut opt = Opt::new(vars.iter().map(|(_, v)| v.clone()).collect(), cfg)?;
    let steps = data.train.n.div_ceil(cfg.batch_size);
    let mut history = Vec::new();
    let (mut best_epoch, mut best_val) = (0usize, f64::INFINITY);
    let mut best = snapshot(map)?;
    let mut status = Status::Finished { stopped_early: false };
    let mut first = 1;

    if let Some(st) = resume {
        restore_all(map, &st.weights, "checkpoint weights")?;
        let mut moments = Vec::with_capacity(vars.len());
        for (k, _) in &vars {
            let m = st.moments.get(k).ok_or_else(|| {
                candle_core::Error::Msg(format!("checkpoint optimiser state: no moments for variable {k}"))
            })?;
            moments.push(m.clone());
        }
        opt.set_state(moments, st.steps)?;
        // Check the best weights against the model too (restored into the map at the end).
        for (k, v) in &vars {
            match st.best_weights.get(k) {
                Some(t) if t.shape() == v.shape() => {}
                _ => candle_core::bail!("checkpoint best weights: no tensor of shape {:?} for variable {k}", v.shape()),
            }
        }
        best = st.best_weights;
        (best_epoch, best_val, history, first) = (st.best_epoch, st.best_val_nll, st.history, st.epoch + 1);
        // The run may have ended at that epoch (patience) and been stopped before saying so.
        if st.epoch > 0 && st.epoch.saturating_sub(best_epoch) >= cfg.patience {
            status = Status::Finished { stopped_early: true };
            first = usize::MAX;
        }
    }

    'epochs: for epoch in first..=cfg.max_epochs {
        let t0 = Instant::now();
        let order = epoch_order(data.train.n, seed, epoch);
        arm.conditional().begin_epoch(epoch);
        let mut train_sum = 0.0f64;
        for (step, idx) in order.chunks(cfg.batch_size).enumerate() {
            let x = data.train.batch(idx, &device)?; // (B, D)
            let lv = in_pool(&device, || -> candle_core::Result<f64> {
                let loss = arm.nll(&x, true)?; // scalar, nats per image
                let lv = loss.to_scalar::<f32>()? as f64;
                if lv.is_finite() {
                    opt.backward_step(&loss)?;
                }
                Ok(lv)
            })?;
            if !lv.is_finite() {
                status = Status::Diverged { epoch, reason: format!("training loss is {lv} at step {}", step + 1) };
                break 'epochs;
            }
            train_sum += lv * idx.len() as f64;
            if on(Event::Step { epoch, step: step + 1, steps }) == Control::Stop {
                status = Status::Interrupted { epoch };
                break 'epochs;
            }
        }
        let val_nll = evaluate(arm, &data.val, cfg.eval_batch_size)?;
        if !val_nll.is_finite() {
            status = Status::Diverged { epoch, reason: format!("validation NLL is {val_nll}") };
            break;
        }
        let improved = val_nll < best_val;
        if improved {
            best_val = val_nll;
            best_epoch = epoch;
            best = snapshot(map)?;
        }
        let m = EpochMetrics {
            epoch,
            train_nll: train_sum / data.train.n.max(1) as f64,
            val_nll,
            val_bpd: bits_per_dim(val_nll, data.dims()),
            seconds: t0.elapsed().as_secs_f64(),
        };
        history.push(m);
        let (moments, opt_steps) = opt.state();
        let state = TrainState {
            epoch,
            history: history.clone(),
            best_epoch,
            best_val_nll: best_val,
            weights: snapshot(map)?,
            best_weights: best.clone(),
            moments: vars.iter().map(|(k, _)| k.clone()).zip(moments).collect(),
            steps: opt_steps,
        };
        let stop = on(Event::Epoch { metrics: &history[history.len() - 1], best: improved, state: &state });
        if stop == Control::Stop {
            status = Status::Interrupted { epoch };
            break;
        }
        if epoch - best_epoch >= cfg.patience {
            status = Status::Finished { stopped_early: true };
            break;
        }
    }
    restore(map, &best)?;
    let (test_nll, test_bpd) = if matches!(status, Status::Finished { .. }) {
        let t = evaluate(arm, &data.test, cfg.eval_batch_size)?;
        (Some(t), Some(bits_per_dim(t, data.dims())))
    } else {
        (None, None)
    };
    Ok(Outcome { status, history, best_epoch, best_val_nll: best_val, test_nll, test_bpd })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn in_pool_runs_on_a_rayon_worker() {
        assert_eq!(rayon::current_thread_index(), None, "the test thread is not a worker");
        let (on_worker, v) = in_pool(&Device::Cpu, || (rayon::current_thread_index().is_some(), 7));
        assert!(on_worker);
        assert_eq!(v, 7);
    }
}
