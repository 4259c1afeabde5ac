//! The training loop, written once for every plugin and head: seeded shuffling, Adamax / Adam /
//! AdamW, early stopping on validation NLL with patience, best weights kept and restored for the
//! test NLL, divergence detection. Knows nothing about TOML, parquet or the terminal: progress
//! goes to an observer callback, which can also ask to stop (Ctrl-C).

mod adamax;

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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

impl TrainConfig {
    /// Checks ranges; the error is (key, what was expected).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.lr) {
            return Err(("lr", format!("must be a positive number, got {}", self.lr)));
        }
        if self.batch_size == 0 {
            return Err(("batch_size", "must be at least 1, got 0".into()));
        }
        if self.eval_batch_size == 0 {
            return Err(("eval_batch_size", "must be at least 1, got 0".into()));
        }
        if self.patience == 0 {
            return Err(("patience", "must be at least 1, got 0".into()));
        }
        if self.max_epochs == 0 {
            return Err(("max_epochs", "must be at least 1, got 0".into()));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(("weight_decay", format!("must be >= 0, got {}", self.weight_decay)));
        }
        for (k, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err((k, format!("must be in [0, 1), got {v}")));
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
    Step { epoch: usize, step: usize, steps: usize },
    Epoch { metrics: &'a EpochMetrics, best: bool },
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
        let lp = arm.log_prob(&x?)?; // (B,)
        total += lp.to_dtype(candle_core::DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(-total / split.n.max(1) as f64)
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

enum Opt {
    Adamax(Adamax),
    AdamW(AdamW),
}

impl Opt {
    fn new(map: &VarMap, cfg: &TrainConfig) -> candle_core::Result<Self> {
        let vars = map.all_vars();
        Ok(match cfg.optimizer {
            OptimizerKind::Adamax => Opt::Adamax(Adamax::new(
                vars,
                ParamsAdamax { lr: cfg.lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: 1e-8, weight_decay: cfg.weight_decay },
            )?),
            // Adam is AdamW without decay; with decay, adam means decoupled decay as well.
            OptimizerKind::Adam | OptimizerKind::Adamw => Opt::AdamW(AdamW::new(
                vars,
                ParamsAdamW { lr: cfg.lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: 1e-8, weight_decay: cfg.weight_decay },
            )?),
        })
    }

    fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        match self {
            Opt::Adamax(o) => o.backward_step(loss),
            Opt::AdamW(o) => o.backward_step(loss),
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
    let device: Device = arm.device().clone();
    let mut opt = Opt::new(map, cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..data.train.n).collect();
    let steps = data.train.n.div_ceil(cfg.batch_size);
    let mut history = Vec::new();
    let (mut best_epoch, mut best_val) = (0usize, f64::INFINITY);
    let mut best = snapshot(map)?;
    let mut status = Status::Finished { stopped_early: false };

    'epochs: for epoch in 1..=cfg.max_epochs {
        let t0 = Instant::now();
        order.shuffle(&mut rng);
        let mut train_sum = 0.0f64;
        for (step, idx) in order.chunks(cfg.batch_size).enumerate() {
            let x = data.train.batch(idx, &device)?; // (B, D)
            let loss = arm.nll(&x, true)?; // scalar, nats per image
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                status = Status::Diverged { epoch, reason: format!("training loss is {lv} at step {}", step + 1) };
                break 'epochs;
            }
            opt.backward_step(&loss)?;
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
        let stop = on(Event::Epoch { metrics: &history[history.len() - 1], best: improved });
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
