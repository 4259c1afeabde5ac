//! `runner sweep`: every run of an experiment, resumable and safe to run in parallel.
//! - A run is done when its `status.toml` says finished; finished runs are skipped, anything
//!   else (missing, running but dead, interrupted, failed) is redone from scratch, or with
//!   `--resume` continued from its `checkpoint.safetensors` (written after every epoch).
//! - Each run is claimed with an exclusive OS file lock on `<run>/.lock` held while it trains:
//!   two sweeps on the same folder never train the same run, and a lock from a dead process
//!   disappears with it (the OS releases it), so stale claims are taken over.
//! - `--shard I/N` takes the runs whose index in the expanded grid is I modulo N.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Mutex;

use anyhow::{anyhow, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use crate::commands::Ui;
use crate::config::{Experiment, RunConfig};
use crate::run;
use crate::store::{self, RunState, RunStatus};
use crate::summary;

#[derive(Debug, Clone, Copy)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard {s:?}: expected I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) =
            (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

pub struct Options {
    pub jobs: usize,
    pub shard: Option<Shard>,
    pub dry_run: bool,
    pub fail_fast: bool,
    /// Continue unfinished runs from their checkpoints.
    pub resume: bool,
}

/// One run of the sweep: its config, id and folder.
#[derive(Clone)]
pub(crate) struct Job {
    pub cfg: RunConfig,
    pub id: String,
    pub dir: PathBuf,
}

pub(crate) fn selected(exp: &Experiment, shard: Option<Shard>, runs_dir: &Path) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for (i, cfg) in exp.runs.iter().enumerate() {
        if shard.is_none_or(|s| i % s.count == s.index) {
            let id = cfg.run_id()?;
            jobs.push(Job { cfg: cfg.clone(), dir: runs_dir.join(&id), id });
        }
    }
    Ok(jobs)
}

/// Whether a run folder holds a finished run (its status file, if any, must read).
fn is_finished(dir: &Path) -> Result<bool> {
    Ok(RunStatus::read(dir)?.is_some_and(|s| s.is_finished()))
}

#[derive(Default)]
pub(crate) struct Tally {
    trained: usize,
    failed: Vec<String>,
    interrupted: usize,
    claimed_elsewhere: usize,
    /// Trainings that stopped at a rung of successive halving.
    pub at_rung: usize,
}

impl Tally {
    pub fn merge(&mut self, o: Tally) {
        self.trained += o.trained;
        self.failed.extend(o.failed);
        self.interrupted += o.interrupted;
        self.claimed_elsewhere += o.claimed_elsewhere;
        self.at_rung += o.at_rung;
    }

    /// Counts how a run went; a failure stops the sweep with `fail_fast`.
    fn record(&mut self, job: &Job, res: Result<Claim>, fail_fast: bool) {
        let failed = match res {
            Ok(Claim::Trained(st)) if st.is_finished() => {
                self.trained += 1;
                None
            }
            Ok(Claim::Trained(st)) if st.status == RunState::Interrupted => {
                self.interrupted += 1;
                None
            }
            Ok(Claim::Trained(st)) if st.status == RunState::Pruned => {
                self.at_rung += 1;
                None
            }
            Ok(Claim::Trained(st)) => Some(st.reason.unwrap_or_default()),
            Ok(Claim::Elsewhere) => {
                self.claimed_elsewhere += 1;
                None
            }
            Err(e) => Some(format!("{e:#}")),
        };
        if let Some(why) = failed {
            self.failed.push(format!("{}: {why}", job.id));
            if fail_fast {
                run::STOP.store(true, AtomicOrdering::SeqCst);
            }
        }
    }
}

pub fn sweep(exp: &Experiment, results: &Path, device: &Device, opts: &Options) -> Result<()> {
    let (done, todo) = plan(exp, results, opts.shard)?;
    if opts.dry_run {
        return print_plan(exp, &done, &todo);
    }
    let ui = Ui::new();
    crate::commands::install_ctrlc();
    let ids = exp.runs.iter().map(|c| c.run_id()).collect::<Result<Vec<_>, _>>()?;
    crate::status::write_plan(&store::experiment_dir(results, &exp.name), ids)?;
    tracing::info!(
        "{}: {} finished runs skipped, {} to train with {} job(s)",
        exp.name,
        done.len(),
        todo.len(),
        opts.jobs
    );
    let tally = match exp.search.as_ref().and_then(|s| s.prune.as_ref()) {
        Some(prune) => crate::halving::halving(exp, prune, results, device, opts, &ui)?,
        None => train_all(exp, todo, device, opts, &ui, None),
    };
    summarise(exp, results, done.len(), &tally)?;
    outcome(&tally, opts)
}

/// The sweep's exit: an error when a run failed (after training all the others, unless
/// `--fail-fast`), so `&&` chains and Slurm see it; interrupted (exit status 130) on a signal.
fn outcome(tally: &Tally, opts: &Options) -> Result<()> {
    if !tally.failed.is_empty() && opts.fail_fast {
        return Err(anyhow!("stopped after a failed run (--fail-fast)"));
    }
    if run::STOP.load(AtomicOrdering::SeqCst) {
        return Err(crate::commands::interrupted(
            "interrupted; rerun the same command with --resume to continue the interrupted runs",
        ));
    }
    if !tally.failed.is_empty() {
        return Err(anyhow!("{} run(s) failed (listed above); the others trained", tally.failed.len()));
    }
    Ok(())
}

/// The selected runs, split into (finished, to train).
fn plan(exp: &Experiment, results: &Path, shard: Option<Shard>) -> Result<(Vec<Job>, Vec<Job>)> {
    let runs_dir = store::runs_dir(results, &exp.name);
    let (mut done, mut todo) = (Vec::new(), Vec::new());
    for job in selected(exp, shard, &runs_dir)? {
        if is_finished(&job.dir)? {
            done.push(job);
        } else {
            todo.push(job);
        }
    }
    Ok((done, todo))
}

/// `--dry-run`: the runs and what state each is in.
fn print_plan(exp: &Experiment, done: &[Job], todo: &[Job]) -> Result<()> {
    println!(
        "{}: {} runs in this selection, {} finished, {} to train",
        exp.name,
        done.len() + todo.len(),
        done.len(),
        todo.len()
    );
    for r in done {
        println!("  done   {}", r.id);
    }
    for r in todo {
        let st = RunStatus::read(&r.dir)?.map_or("missing", |s| s.status.name());
        let ckpt = if r.dir.join(crate::checkpoint::FILE).exists() { ", has a checkpoint for --resume" } else { "" };
        println!("  todo   {}  ({st}{ckpt})", r.id);
    }
    Ok(())
}

/// Trains `todo` with `opts.jobs` workers, each on its share of the cores, until the queue is
/// empty or a stop is asked for; with `rung`, each pauses at the end of that epoch.
pub(crate) fn train_all(
    exp: &Experiment,
    todo: Vec<Job>,
    device: &Device,
    opts: &Options,
    ui: &Ui,
    rung: Option<Rung>,
) -> Tally {
    let overall = ui.multi.add(ProgressBar::new(todo.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {pos}/{len} runs {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    overall.set_prefix(exp.name.clone());
    let queue = Mutex::new(todo.into_iter().collect::<VecDeque<_>>());
    let tally = Mutex::new(Tally::default());
    let jobs = opts.jobs.max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads_per_job = (cores / jobs).max(1);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads_per_job).build();
                loop {
                    if run::STOP.load(AtomicOrdering::SeqCst) {
                        break;
                    }
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some(job) = next else { break };
                    let work = || one_run(&job, device, ui, opts.resume, rung);
                    let res = match &pool {
                        Ok(p) => p.install(work),
                        Err(_) => work(),
                    };
                    tally.lock().unwrap_or_else(|e| e.into_inner()).record(&job, res, opts.fail_fast);
                    overall.inc(1);
                }
            });
        }
    });
    overall.finish_and_clear();
    tally.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Rebuilds `summary.parquet` and prints what the sweep did.
fn summarise(exp: &Experiment, results: &Path, skipped: usize, t: &Tally) -> Result<()> {
    let exp_dir = store::experiment_dir(results, &exp.name);
    let rows = summary::rebuild(&exp_dir)?;
    let c = summary::counts(&rows);
    let paused = if t.at_rung > 0 { format!(", {} stopped at a rung", t.at_rung) } else { String::new() };
    println!(
        "{}: trained {}{paused}, skipped {skipped} finished, {} claimed by another sweep, {} interrupted, {} failed; summary: {} ({} runs: {})",
        exp.name,
        t.trained,
        t.claimed_elsewhere,
        t.interrupted,
        t.failed.len(),
        exp_dir.join("summary.parquet").display(),
        rows.len(),
        c.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
    );
    for f in &t.failed {
        println!("  failed {f}");
    }
    Ok(())
}

enum Claim {
    Trained(RunStatus),
    Elsewhere,
}

fn lock_path(dir: &Path) -> PathBuf {
    dir.join(".lock")
}

/// Claims a run folder: an exclusive OS lock on `<run>/.lock`, held while the returned file
/// lives; None when another process (or thread) holds it. Temporary files left by a killed
/// writer are removed once the claim is ours.
pub fn claim(dir: &Path) -> Result<Option<std::fs::File>> {
    std::fs::create_dir_all(dir)?;
    let lock = OpenOptions::new().create(true).truncate(false).write(true).open(lock_path(dir))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(anyhow!("{}: cannot lock: {e}", lock_path(dir).display()));
        }
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(Some(lock))
}

/// Whether a live process holds the claim on a run folder. Probing takes the lock for an
/// instant when it is free, which a claimer racing with us sees as "claimed elsewhere" at worst.
pub fn is_claimed(dir: &Path) -> bool {
    let Ok(f) = OpenOptions::new().write(true).open(lock_path(dir)) else { return false };
    matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// Successive halving's part in a training: the epoch to pause at (None: to the end).
#[derive(Clone, Copy)]
pub(crate) struct Rung {
    pub epoch: Option<usize>,
}

fn one_run(job: &Job, device: &Device, ui: &Ui, resume: bool, rung: Option<Rung>) -> Result<Claim> {
    let (cfg, dir) = (&job.cfg, job.dir.as_path());
    let Some(lock) = claim(dir)? else { return Ok(Claim::Elsewhere) };
    // Another sweep may have finished it (or taken it to the rung) between our listing and the lock.
    let done = match rung {
        Some(r) => crate::halving::reached(dir, r.epoch)?,
        None => is_finished(dir)?,
    };
    if done {
        return Ok(Claim::Elsewhere);
    }
    let bar = ui.run_bar(&job.id);
    // A pruned search always continues a run from its checkpoint: that is how a promotion works.
    let resume = resume || rung.is_some();
    let res = run::execute(cfg, dir, device, &bar, !ui.tty, resume, rung.and_then(|r| r.epoch));
    bar.finish_and_clear();
    ui.multi.remove(&bar);
    let st = match res {
        Ok(st) => st,
        Err(e) => {
            let st = RunStatus { reason: Some(format!("{e:#}")), ..RunStatus::new(RunState::Failed) };
            st.write(dir)?;
            st
        }
    };
    if st.is_finished() {
        let fig = crate::run::figure(&job.cfg.model.head);
        tracing::info!(
            "{} finished: test {} {:.3}{}, best val {:.3} at epoch {}",
            job.id,
            fig.name,
            st.test_nll.unwrap_or(f64::NAN),
            fig.unit,
            st.best_val_nll.unwrap_or(f64::NAN),
            st.best_epoch
        );
    }
    drop(lock);
    Ok(Claim::Trained(st))
}
