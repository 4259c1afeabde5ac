//! `runner status [FOLDER]`: what a sweep is doing, read from the results folder alone: runs by
//! state (a run whose file says running but whose claim nobody holds is stale, never running),
//! the epoch and validation NLL of the running ones with their ETA from the epoch times, and
//! how many of the planned runs (`plan.toml`, written by `runner sweep`) have not started.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::store::{self, RunState};
use crate::summary::{self, Row};

/// `plan.toml` in an experiment folder: the run ids of its full grid (every shard's).
pub const PLAN: &str = "plan.toml";

#[derive(serde::Serialize, serde::Deserialize)]
struct Plan {
    runs: Vec<String>,
}

/// Records the experiment's run ids, so that `runner status` can count the runs not started.
pub fn write_plan(exp_dir: &Path, ids: Vec<String>) -> Result<()> {
    store::atomic_write(&exp_dir.join(PLAN), toml::to_string(&Plan { runs: ids })?.as_bytes())
}

fn read_plan(exp_dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(exp_dir.join(PLAN)).ok()?;
    toml::from_str::<Plan>(&text).ok().map(|p| p.runs)
}

pub struct Options {
    /// Refresh every this many seconds until interrupted.
    pub watch: Option<f64>,
}

pub fn status(folder: &Path, opts: &Options) -> Result<()> {
    let Some(every) = opts.watch else {
        print!("{}", render(folder)?);
        return Ok(());
    };
    loop {
        let text = render(folder)?;
        // Clear the screen and home the cursor, as `watch` does.
        print!("\x1b[2J\x1b[H{text}\n(refreshed every {every} s; Ctrl-C to quit)\n");
        std::thread::sleep(Duration::from_secs_f64(every.max(0.2)));
    }
}

/// A results folder (each experiment under it) or one experiment folder.
fn experiments(folder: &Path) -> Result<Vec<PathBuf>> {
    if folder.join("runs").is_dir() {
        return Ok(vec![folder.to_path_buf()]);
    }
    crate::report::experiment_dirs(folder, &[])
}

pub fn render(folder: &Path) -> Result<String> {
    let mut out = String::new();
    for exp_dir in experiments(folder)? {
        let rows = summary::collect(&exp_dir)?;
        out.push_str(&experiment_block(&exp_dir, &rows));
    }
    Ok(out)
}

fn experiment_block(exp_dir: &Path, rows: &[Row]) -> String {
    let name = exp_dir.file_name().map_or(String::new(), |n| n.to_string_lossy().to_string());
    let counts = summary::counts(rows);
    let mut parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let not_started = read_plan(exp_dir).map(|ids| ids.iter().filter(|id| !rows.iter().any(|r| &r.run_id == *id)).count());
    if let Some(n) = not_started {
        parts.push(format!("{n} not started"));
    }
    let planned = not_started.map_or(String::new(), |n| format!(" of {}", rows.len() + n));
    let mut out = format!("{name}: {} runs{planned}: {}\n", rows.len(), parts.join(", "));
    let running: Vec<&Row> = rows.iter().filter(|r| r.status.status == RunState::Running).collect();
    for r in &running {
        out.push_str(&running_line(exp_dir, r));
    }
    for r in rows.iter().filter(|r| matches!(r.status.status, RunState::Stale | RunState::Failed | RunState::Interrupted)) {
        out.push_str(&format!(
            "  {:<11} {} ({}): {}\n",
            r.status.status.name(),
            r.run_id,
            r.grid_label(),
            r.status.reason.clone().unwrap_or_default()
        ));
    }
    if let Some(eta) = sweep_eta(rows, not_started.unwrap_or(0), running.len()) {
        out.push_str(&format!("  the {} runs left, at the mean time of a finished run: about {eta}\n", not_started.unwrap_or(0)));
    }
    out
}

/// One running run: its epoch, last and best validation NLL and the time left, from the epoch
/// times so far: at the earliest when patience ends it, at the latest at `max_epochs`.
fn running_line(exp_dir: &Path, r: &Row) -> String {
    let dir = exp_dir.join("runs").join(&r.run_id);
    let hist = store::read_metrics(&dir.join("metrics.parquet")).unwrap_or_default();
    let t = &r.config.train;
    let Some(last) = hist.last() else {
        return format!("  running     {} ({}): first epoch, of {}\n", r.run_id, r.grid_label(), t.max_epochs);
    };
    let best = hist.iter().min_by(|a, b| a.val_nll.total_cmp(&b.val_nll)).unwrap_or(last);
    let per_epoch = hist.iter().map(|m| m.seconds).sum::<f64>() / hist.len() as f64;
    let earliest = (best.epoch + t.patience).min(t.max_epochs).saturating_sub(last.epoch);
    let latest = t.max_epochs.saturating_sub(last.epoch);
    format!(
        "  running     {} ({}): epoch {}/{}, val {:.3} nats (best {:.3} at {}), {:.1} s/epoch, left {} to {}\n",
        r.run_id,
        r.grid_label(),
        last.epoch,
        t.max_epochs,
        last.val_nll,
        best.val_nll,
        best.epoch,
        per_epoch,
        duration(earliest as f64 * per_epoch),
        duration(latest as f64 * per_epoch)
    )
}

/// Time for the runs not started: their count times the mean wall time of the finished runs,
/// shared among the runs training now.
fn sweep_eta(rows: &[Row], not_started: usize, running: usize) -> Option<String> {
    let walls: Vec<f64> = rows.iter().filter(|r| r.status.is_finished()).map(|r| r.status.wall_seconds).collect();
    if not_started == 0 || walls.is_empty() {
        return None;
    }
    let mean = walls.iter().sum::<f64>() / walls.len() as f64;
    Some(duration(mean * not_started as f64 / running.max(1) as f64))
}

pub fn duration(s: f64) -> String {
    if !s.is_finite() {
        return "-".into();
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::duration;

    #[test]
    fn durations_read_in_the_largest_units() {
        assert_eq!(duration(59.4), "59 s");
        assert_eq!(duration(61.0), "1 min 1 s");
        assert_eq!(duration(10920.0), "3 h 2 min");
        assert_eq!(duration(f64::NAN), "-");
    }
}
