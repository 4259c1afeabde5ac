//! `checkpoint.safetensors`: a run's [`TrainState`] at the end of its last completed epoch,
//! written atomically after every epoch so `--resume` can continue an interrupted or killed run
//! exactly (same batches, same optimiser state, same metrics as an uninterrupted run).
//!
//! Tensors, by name:
//! - `weights.<var>` current weights, `best.<var>` weights of the best epoch so far
//! - `moment1.<var>`, `moment2.<var>` the optimiser's moments (adamax m, u; adam/adamw m, v)
//! - `ema.<var>` the moving averages of the weights (runs with `train.ema`)
//! - `history` (E, 8) f64 per completed epoch: epoch, train_nll, val_nll, val_bpd, seconds, lr,
//!   clipped_steps, max_grad_norm (format 1 had the first 5; its other columns read as NaN or 0)
//! - `meta` f64: [format version, epoch, best_epoch, best_val_nll, optimiser steps, wall seconds]
//!
//! The shuffling RNG needs no saving: the trainer re-seeds it from (seed, epoch).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};

use arm_train::{EpochMetrics, TrainState};

use crate::store;

pub const FILE: &str = "checkpoint.safetensors";
const VERSION: f64 = 2.0;
/// Columns of a history row in the current format, and in format 1.
const COLUMNS: usize = 8;
const COLUMNS_V1: usize = 5;

/// Writes `state` (and the wall seconds spent so far) to `path` atomically.
pub fn save(path: &Path, state: &TrainState, wall_seconds: f64) -> Result<()> {
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in &state.weights {
        t.insert(format!("weights.{k}"), v.clone());
    }
    for (k, v) in &state.best_weights {
        t.insert(format!("best.{k}"), v.clone());
    }
    for (k, (m1, m2)) in &state.moments {
        t.insert(format!("moment1.{k}"), m1.clone());
        t.insert(format!("moment2.{k}"), m2.clone());
    }
    for (k, v) in state.ema.iter().flatten() {
        t.insert(format!("ema.{k}"), v.clone());
    }
    let rows: Vec<f64> = state
        .history
        .iter()
        .flat_map(|m| {
            let (lr, clipped, norm) = (m.lr, m.clipped_steps as f64, m.max_grad_norm);
            [m.epoch as f64, m.train_nll, m.val_nll, m.val_bpd, m.seconds, lr, clipped, norm]
        })
        .collect();
    t.insert("history".into(), Tensor::from_vec(rows, (state.history.len(), COLUMNS), &Device::Cpu)?);
    let meta = vec![
        VERSION,
        state.epoch as f64,
        state.best_epoch as f64,
        state.best_val_nll,
        state.steps as f64,
        wall_seconds,
    ];
    t.insert("meta".into(), Tensor::from_vec(meta, 6, &Device::Cpu)?);
    store::atomic_write_with(path, |tmp| {
        candle_core::safetensors::save(&t, tmp)
            .with_context(|| format!("{}: cannot write the checkpoint", path.display()))
    })
}

/// Reads a checkpoint back: (state, wall seconds spent so far). Weights land on `device`.
pub fn load(path: &Path, device: &Device) -> Result<(TrainState, f64)> {
    let bad = |what: &str| anyhow!("{}: not a usable checkpoint: {what}", path.display());
    let mut t = candle_core::safetensors::load(path, device)
        .with_context(|| format!("{}: cannot read the checkpoint", path.display()))?;
    let meta = t.remove("meta").ok_or_else(|| bad("no meta tensor"))?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let [version, epoch, best_epoch, best_val, steps, wall] = meta[..] else {
        return Err(bad("meta has the wrong length"));
    };
    let columns = match version {
        1.0 => COLUMNS_V1,
        v if v == VERSION => COLUMNS,
        _ => return Err(bad(&format!("format version {version}, this runner reads 1 and {VERSION}"))),
    };
    let history =
        t.remove("history").ok_or_else(|| bad("no history tensor"))?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let history: Vec<EpochMetrics> = history
        .iter()
        .map(|r| {
            if r.len() != columns {
                return Err(bad(&format!("history rows must have {columns} values")));
            }
            let at = |i: usize, missing: f64| r.get(i).copied().unwrap_or(missing);
            Ok(EpochMetrics {
                epoch: r[0] as usize,
                train_nll: r[1],
                val_nll: r[2],
                val_bpd: r[3],
                seconds: r[4],
                lr: at(5, f64::NAN),
                clipped_steps: at(6, 0.0) as usize,
                max_grad_norm: at(7, f64::NAN),
            })
        })
        .collect::<Result<_>>()?;
    let (mut weights, mut best_weights, mut m1, mut m2, mut ema) =
        (HashMap::new(), HashMap::new(), HashMap::new(), HashMap::new(), HashMap::new());
    for (k, v) in t {
        let (kind, var) = k.split_once('.').ok_or_else(|| bad(&format!("unexpected tensor {k}")))?;
        let into = match kind {
            "weights" => &mut weights,
            "best" => &mut best_weights,
            "moment1" => &mut m1,
            "moment2" => &mut m2,
            "ema" => &mut ema,
            _ => return Err(bad(&format!("unexpected tensor {k}"))),
        };
        into.insert(var.to_string(), v);
    }
    let mut moments = HashMap::new();
    for (k, a) in m1 {
        let b = m2.remove(&k).ok_or_else(|| bad(&format!("no second moment for {k}")))?;
        moments.insert(k, (a, b));
    }
    if history.len() != epoch as usize {
        return Err(bad(&format!("{} history rows for {epoch} epochs", history.len())));
    }
    let state = TrainState {
        epoch: epoch as usize,
        history,
        best_epoch: best_epoch as usize,
        best_val_nll: best_val,
        weights,
        best_weights,
        moments,
        steps: steps as usize,
        ema: (!ema.is_empty()).then_some(ema),
    };
    Ok((state, wall))
}
