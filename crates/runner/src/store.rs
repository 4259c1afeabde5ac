//! The results layout and its files. Every file is written to a temporary name in the same
//! folder, synced, renamed into place and the folder synced, so a kill or a power loss at any
//! moment leaves the old file or the new one, never a torn one.
//!
//! results/<name>/runs/<run-id>/{config.toml, metrics.parquet, model.safetensors,
//! nll_curve.png, samples.png, data_and_samples.png, status.toml}; results/<name>/summary.parquet.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use polars::prelude::{df, DataFrame, DataType, ParquetReader, ParquetWriter, SerReader};
use serde::{Deserialize, Serialize};

use arm_train::EpochMetrics;

use crate::bad_input;

/// Writes `path` atomically through `write(tmp_path)`.
pub fn atomic_write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    // A bare file name's parent is "", which is the working folder.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let res = write(&tmp)
        .and_then(|_| sync_file(&tmp))
        .and_then(|_| fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display())))
        .and_then(|_| sync_dir(dir));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// The file's data on disk before it is renamed over the old one (else a power loss can leave
/// the new name pointing at an empty file).
fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot sync to disk", path.display()))
}

/// The rename itself on disk: the folder's entry is synced too.
fn sync_dir(dir: &Path) -> Result<()> {
    match fs::File::open(dir).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        // Some file systems cannot sync a folder; the file itself is already on disk.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput || e.raw_os_error() == Some(22) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("{}: cannot sync the folder", dir.display())),
    }
}

pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |tmp| fs::write(tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display())))
}

pub fn write_parquet(path: &Path, df: &mut DataFrame) -> Result<()> {
    atomic_write_with(path, |tmp| {
        let f = fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        ParquetWriter::new(f).finish(df).with_context(|| format!("{}: cannot write parquet", path.display()))?;
        Ok(())
    })
}

pub fn read_parquet(path: &Path) -> Result<DataFrame> {
    let f = fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    ParquetReader::new(f).finish().with_context(|| format!("{}: not a readable parquet file", path.display()))
}

pub fn metrics_frame(history: &[EpochMetrics]) -> Result<DataFrame> {
    Ok(df!(
        "epoch" => history.iter().map(|m| m.epoch as u32).collect::<Vec<_>>(),
        "train_nll" => history.iter().map(|m| m.train_nll).collect::<Vec<_>>(),
        "val_nll" => history.iter().map(|m| m.val_nll).collect::<Vec<_>>(),
        "val_bpd" => history.iter().map(|m| m.val_bpd).collect::<Vec<_>>(),
        "seconds" => history.iter().map(|m| m.seconds).collect::<Vec<_>>(),
        "lr" => history.iter().map(|m| m.lr).collect::<Vec<_>>(),
        "clipped_steps" => history.iter().map(|m| m.clipped_steps as u32).collect::<Vec<_>>(),
        "max_grad_norm" => history.iter().map(|m| m.max_grad_norm).collect::<Vec<_>>(),
    )?)
}

pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>> {
    let df = read_parquet(path)?;
    let col = |n: &str| -> Result<Vec<f64>> {
        let s = df.column(n).with_context(|| format!("{}: no column {n}", path.display()))?;
        let s = s.cast(&DataType::Float64)?;
        Ok(s.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    };
    let (e, t, v, b, s) = (col("epoch")?, col("train_nll")?, col("val_nll")?, col("val_bpd")?, col("seconds")?);
    // Columns added later are absent from older files.
    let optional = |n: &str, missing: f64| col(n).unwrap_or_else(|_| vec![missing; e.len()]);
    let (lr, clipped, norm) = (optional("lr", f64::NAN), optional("clipped_steps", 0.0), optional("max_grad_norm", f64::NAN));
    Ok((0..e.len())
        .map(|i| EpochMetrics {
            epoch: e[i] as usize,
            train_nll: t[i],
            val_nll: v[i],
            val_bpd: b[i],
            seconds: s[i],
            lr: lr[i],
            clipped_steps: clipped[i] as usize,
            max_grad_norm: norm[i],
        })
        .collect())
}

/// Where a run stands. In `status.toml` and `summary.parquet` as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Training (or the process died while training: the claim lock tells).
    Running,
    Finished,
    /// Diverged, or an error stopped it (`reason` says which).
    Failed,
    /// Stopped by Ctrl-C; `--resume` continues it.
    Interrupted,
    /// A run folder without a status file (killed before writing one).
    Unfinished,
    /// Stopped at a rung of successive halving (`[search.prune]`): its metrics and checkpoint
    /// stay, and it resumes if a later ranking promotes it.
    Pruned,
    /// Never written: shown for a run whose file says running while no process holds its
    /// claim (the process was killed); `--resume` continues it from its checkpoint.
    Stale,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Finished => "finished",
            RunState::Failed => "failed",
            RunState::Interrupted => "interrupted",
            RunState::Unfinished => "unfinished",
            RunState::Pruned => "pruned",
            RunState::Stale => "stale",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `status.toml`: what happened to a run; written at start (running) and at the end. Every
/// field but the optional ones is always written, so reading requires them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    pub status: RunState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub n_params: u64,
    pub epochs: u64,
    pub best_epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_nll: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_nll: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_bpd: Option<f64>,
    /// Sample quality against test images (quality.rs): W1 between per-pixel marginals and
    /// the kernel MMD^2, of the samples drawn at the end of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_w1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_mmd2: Option<f64>,
    /// A VAE's test NLL is a bound: which (e.g. "IW-256", the importance-weighted bound of
    /// that many samples); None for an exact NLL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<String>,
    /// A VAE's minus ELBO on the test set, nats per image (from the same draws as the bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_elbo: Option<f64>,
    /// That ELBO's KL term, nats per image (near 0: the decoder ignores the latent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_kl: Option<f64>,
    pub wall_seconds: f64,
    pub pid: u32,
}

impl RunStatus {
    /// A status with nothing measured yet.
    pub fn new(status: RunState) -> Self {
        Self {
            status,
            reason: None,
            n_params: 0,
            epochs: 0,
            best_epoch: 0,
            best_val_nll: None,
            test_nll: None,
            test_bpd: None,
            sample_w1: None,
            sample_mmd2: None,
            bound: None,
            test_elbo: None,
            test_kl: None,
            wall_seconds: 0.0,
            pid: 0,
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join("status.toml")
    }

    /// The run's status; None when it has no status file (a run killed before writing one).
    /// A status file that does not read is bad input naming it (exit status 2).
    pub fn read(dir: &Path) -> Result<Option<RunStatus>> {
        let path = Self::path(dir);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad_input(format!("{}: cannot read: {e}", path.display()))),
        };
        let bad = |e: &dyn std::fmt::Display| bad_input(format!("{}: not a valid status file: {e}", path.display()));
        let table: toml::Table = toml::from_str(&text).map_err(|e| bad(&crate::config::toml_error(&text, &e)))?;
        crate::config::from_value(toml::Value::Table(table)).map(Some).map_err(|e| bad(&e))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        atomic_write(&Self::path(dir), toml::to_string(self)?.as_bytes())
    }

    pub fn is_finished(&self) -> bool {
        self.status == RunState::Finished
    }
}

pub fn experiment_dir(results: &Path, name: &str) -> PathBuf {
    results.join(name)
}

pub fn runs_dir(results: &Path, name: &str) -> PathBuf {
    experiment_dir(results, name).join("runs")
}
