//! A finished run loaded back from its folder: the resolved `config.toml`, the model rebuilt
//! from it and the best weights from `model.safetensors`. Shared by `runner sample`,
//! `runner eval` and the report's sample grids.

use std::path::Path;

use anyhow::{anyhow, Result};
use candle_core::Device;
use candle_nn::VarMap;

use arm_data::Dataset;

use crate::bad_input;
use crate::config::{self, RunConfig};
use crate::store::RunStatus;

pub struct Trained {
    pub cfg: RunConfig,
    /// The run's `status.toml`; None when it has none.
    pub status: Option<RunStatus>,
    pub model: crate::run::Model,
    /// The run's own data set (as named in its config).
    pub data: Dataset,
}

/// Opens the run folder `dir`. A missing folder, config or weights file, or a config or status
/// file that does not read, is bad input (exit 2).
pub fn open(dir: &Path, device: &Device) -> Result<Trained> {
    let cfg = read_config(dir)?;
    build_with_weights(dir, cfg, RunStatus::read(dir)?, device)
}

/// Opens the run folder `dir` of a run trained with `train.augment`, evaluated as `mode`
/// ("identity" or "mixture", as `train.augment_eval`) whatever its config says; also whether
/// that is the run's own mode.
pub fn open_augmented_as(dir: &Path, device: &Device, mode: &str) -> Result<(Trained, bool)> {
    let mut cfg = read_config(dir)?;
    if cfg.train.augment.is_empty() {
        return Err(bad_input(format!("--augment-eval: {} was trained without train.augment", dir.display())));
    }
    let eval: arm_train::AugmentEval = toml::Value::String(mode.to_string())
        .try_into()
        .map_err(|e| bad_input(format!("--augment-eval {mode}: {e}")))?;
    let own = cfg.train.augment_eval == eval;
    cfg.train.augment_eval = eval;
    cfg.train.validate().map_err(|e| bad_input(format!("--augment-eval {mode}: {e}")))?;
    Ok((build_with_weights(dir, cfg, RunStatus::read(dir)?, device)?, own))
}

/// The run folder's `config.toml`, or bad input naming what is missing.
fn read_config(dir: &Path) -> Result<RunConfig> {
    if !dir.is_dir() {
        return Err(bad_input(format!("{}: no such run folder", dir.display())));
    }
    if !dir.join("config.toml").is_file() {
        return Err(bad_input(format!("{}: not a run folder (no config.toml inside)", dir.display())));
    }
    config::read_run_config(dir).map_err(|e| bad_input(format!("{e:#}")))
}

/// Builds the model of `cfg` (read from `dir/config.toml`) and loads `dir/model.safetensors`
/// into it.
pub fn build_with_weights(dir: &Path, cfg: RunConfig, status: Option<RunStatus>, device: &Device) -> Result<Trained> {
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(bad_input(format!(
            "{}: no model.safetensors (the run has not finished; see its status.toml)",
            dir.display()
        )));
    }
    // Everything the model is built from (data, head and plugin tables) is in config.toml.
    let config = dir.join("config.toml");
    let (model, map, data) =
        crate::run::build_model(&cfg, device).map_err(|e| bad_input(format!("{}: {e:#}", config.display())))?;
    load_weights(&map, &weights).map_err(|e| bad_input(format!("{e:#}")))?;
    Ok(Trained { cfg, status, model, data })
}

fn load_weights(map: &VarMap, path: &Path) -> Result<()> {
    let mut m = map.clone();
    m.load(path).map_err(|e| anyhow!("{}: cannot load weights: {e}", path.display()))
}
