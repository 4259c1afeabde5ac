//! The results layout and its files. Every file is written to a temporary name in the same
//! folder and renamed into place, so a kill at any moment leaves the old file or the new one,
//! never a torn one.
//!
//! results/<name>/runs/<run-id>/{config.toml, metrics.parquet, model.safetensors,
//! nll_curve.png, samples.png, status.toml}; results/<name>/summary.parquet.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use polars::prelude::{df, DataFrame, DataType, ParquetReader, ParquetWriter, SerReader};
use serde::{Deserialize, Serialize};

use arm_train::EpochMetrics;

/// Writes `path` atomically through `write(tmp_path)`.
pub fn atomic_write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let res = write(&tmp)
        .and_then(|_| fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display())));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
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
    Ok((0..e.len())
        .map(|i| EpochMetrics { epoch: e[i] as usize, train_nll: t[i], val_nll: v[i], val_bpd: b[i], seconds: s[i] })
        .collect())
}

/// `status.toml`: what happened to a run; written at start (running) and at the end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// running | finished | failed | interrupted
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub n_params: u64,
    #[serde(default)]
    pub epochs: u64,
    #[serde(default)]
    pub best_epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_nll: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_nll: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_bpd: Option<f64>,
    #[serde(default)]
    pub wall_seconds: f64,
    #[serde(default)]
    pub pid: u32,
}

impl RunStatus {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("status.toml")
    }

    pub fn read(dir: &Path) -> Option<RunStatus> {
        let text = fs::read_to_string(Self::path(dir)).ok()?;
        toml::from_str(&text).ok()
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        atomic_write(&Self::path(dir), toml::to_string(self)?.as_bytes())
    }

    pub fn is_finished(&self) -> bool {
        self.status == "finished"
    }
}

pub fn experiment_dir(results: &Path, name: &str) -> PathBuf {
    results.join(name)
}

pub fn runs_dir(results: &Path, name: &str) -> PathBuf {
    experiment_dir(results, name).join("runs")
}
