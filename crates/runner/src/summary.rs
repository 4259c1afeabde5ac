//! `summary.parquet`: one row per run, rebuilt from the run folders (never appended in place),
//! so shards and concurrent sweeps merge by construction.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use polars::prelude::{Column, DataFrame};

use crate::bad_input;
use crate::config::{compact, read_run_config, RunConfig};
use crate::store::{self, RunState, RunStatus};

#[derive(Debug, Clone)]
pub struct Row {
    pub experiment: String,
    pub run_id: String,
    pub config: RunConfig,
    pub status: RunStatus,
}

impl Row {
    /// The run's grid values, in the experiment's key order.
    pub fn grid_label(&self) -> String {
        if self.config.grid.is_empty() {
            return self.config.model.backend.clone();
        }
        self.config
            .grid
            .iter()
            .map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), compact(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Every run folder of an experiment. A folder without `config.toml` was claimed by a process
/// killed before it wrote one: there is no run to list yet. A run without a status file (killed
/// before it was written) counts as unfinished. A config or status file that does not read is
/// an error naming it: a run is never listed with made-up values.
pub fn collect(exp_dir: &Path) -> Result<Vec<Row>> {
    let name = exp_dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let runs = exp_dir.join("runs");
    let mut rows = Vec::new();
    let Ok(entries) = std::fs::read_dir(&runs) else { return Ok(rows) };
    let mut dirs: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for dir in dirs {
        if !dir.join("config.toml").exists() {
            continue;
        }
        let config = read_run_config(&dir).map_err(|e| bad_input(format!("{e:#}")))?;
        let status = live_status(&dir, RunStatus::read(&dir)?);
        let run_id = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        rows.push(Row { experiment: name.clone(), run_id, config, status });
    }
    Ok(rows)
}

/// What a run folder's status file says, corrected by its claim lock: a run "running" that no
/// live process holds died (kill -9, power loss) and is shown as stale; a folder without a status
/// file is running if its claim is held, else unfinished.
pub fn live_status(dir: &Path, written: Option<RunStatus>) -> RunStatus {
    let claimed = || crate::sweep::is_claimed(dir);
    match written {
        Some(st) if st.status == RunState::Running && !claimed() => RunStatus {
            status: RunState::Stale,
            reason: Some(format!(
                "its process (pid {}) is gone and left the status file unchanged; `--resume` continues it from its checkpoint",
                st.pid
            )),
            ..st
        },
        Some(st) => st,
        None if claimed() => RunStatus::new(RunState::Running),
        None => RunStatus::new(RunState::Unfinished),
    }
}

/// A typed column for one grid key: integers, floats and booleans keep their type.
fn grid_column(key: &str, vals: &[Option<toml::Value>]) -> Column {
    let all = |f: fn(&toml::Value) -> bool| vals.iter().all(|v| v.as_ref().is_none_or(f));
    if all(|v| v.is_integer()) {
        Column::new(key.into(), vals.iter().map(|v| v.as_ref().and_then(|v| v.as_integer())).collect::<Vec<_>>())
    } else if all(|v| v.is_integer() || v.is_float()) {
        let f = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        Column::new(key.into(), vals.iter().map(|v| v.as_ref().and_then(f)).collect::<Vec<_>>())
    } else if all(|v| v.is_bool()) {
        Column::new(key.into(), vals.iter().map(|v| v.as_ref().and_then(|v| v.as_bool())).collect::<Vec<_>>())
    } else {
        Column::new(key.into(), vals.iter().map(|v| v.as_ref().map(compact)).collect::<Vec<_>>())
    }
}

pub fn frame(rows: &[Row]) -> Result<DataFrame> {
    let mut keys: Vec<String> = Vec::new();
    for r in rows {
        for (k, _) in &r.config.grid {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let mut cols: Vec<Column> = vec![
        Column::new("experiment".into(), rows.iter().map(|r| r.experiment.clone()).collect::<Vec<_>>()),
        Column::new("run_id".into(), rows.iter().map(|r| r.run_id.clone()).collect::<Vec<_>>()),
    ];
    for k in &keys {
        let vals: Vec<Option<toml::Value>> =
            rows.iter().map(|r| r.config.grid.iter().find(|(g, _)| g == k).map(|(_, v)| v.clone())).collect();
        cols.push(grid_column(k, &vals));
    }
    let s = |f: fn(&Row) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let u = |f: fn(&Row) -> u64| rows.iter().map(f).collect::<Vec<_>>();
    let o = |f: fn(&Row) -> Option<f64>| rows.iter().map(f).collect::<Vec<_>>();
    cols.extend([
        Column::new("seed".into(), u(|r| r.config.seed)),
        Column::new("data".into(), s(|r| r.config.data.name.clone())),
        Column::new("backend".into(), s(|r| r.config.model.backend.clone())),
        Column::new("head".into(), s(|r| r.config.model.head.clone())),
        Column::new("n_params".into(), u(|r| r.status.n_params)),
        Column::new("epochs".into(), u(|r| r.status.epochs)),
        Column::new("best_epoch".into(), u(|r| r.status.best_epoch)),
        Column::new("best_val_nll".into(), o(|r| r.status.best_val_nll)),
        Column::new("test_nll".into(), o(|r| r.status.test_nll)),
        Column::new("test_bpd".into(), o(|r| r.status.test_bpd)),
        Column::new("wall_seconds".into(), rows.iter().map(|r| r.status.wall_seconds).collect::<Vec<_>>()),
        Column::new("status".into(), s(|r| r.status.status.name().to_string())),
        Column::new("reason".into(), rows.iter().map(|r| r.status.reason.clone()).collect::<Vec<_>>()),
    ]);
    Ok(DataFrame::new(rows.len(), cols)?)
}

/// Rebuilds `<exp_dir>/summary.parquet` from the run folders; returns the rows.
pub fn rebuild(exp_dir: &Path) -> Result<Vec<Row>> {
    let rows = collect(exp_dir)?;
    if !rows.is_empty() {
        let mut df = frame(&rows)?;
        store::write_parquet(&exp_dir.join("summary.parquet"), &mut df)?;
    }
    Ok(rows)
}

/// Counts of runs by status name (in the names' order).
pub fn counts(rows: &[Row]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(r.status.status.name()).or_insert(0) += 1;
    }
    m
}
