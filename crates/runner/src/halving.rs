//! Successive halving for `[search.prune]` (Jamieson & Talwalkar 2016, "Non-stochastic best arm
//! identification and hyperparameter optimization"; the rungs and reduction factor of ASHA, Li
//! et al. 2020, "A system for massively parallel hyperparameter tuning").
//!
//! Every trial trains to the first rung (`min_epochs`) and pauses there, marked pruned, with its
//! metrics and checkpoint. When every trial has reached the rung, the trials are ranked by their
//! best validation NLL up to the rung and the best 1/`reduction_factor` (at least one) are
//! promoted: they resume from their checkpoints to the next rung (`min_epochs * factor^k`), and
//! the last survivors train to the end. The promotions are synchronous: a rung is ranked only
//! once it is complete, from the files in the results folder, so one process, `--jobs N` and
//! `--shard I/N` processes promote exactly the same trials, and a promoted trial continues its
//! own run (the same weights and metrics as if it had never paused). Each process trains its
//! shard's trials first, then any trial of the rung nobody has claimed (a shard that died or is
//! slow), then waits for the rest; the run claims keep every trial to one trainer.
//! Finished trials (stopped by patience before a rung) rank with their best NLL; failed ones
//! rank last and are not retried by a pruned search.

use std::path::Path;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use anyhow::Result;
use candle_core::Device;

use crate::commands::Ui;
use crate::config::{Experiment, Metric, Prune};
use crate::run;
use crate::store::{self, RunState, RunStatus};
use crate::sweep::{self, Job, Options, Rung, Tally};

/// Trains the experiment's trials by successive halving; returns what this process trained.
pub fn halving(
    exp: &Experiment,
    prune: &Prune,
    results: &Path,
    device: &Device,
    opts: &Options,
    ui: &Ui,
) -> Result<Tally> {
    let all = sweep::selected(exp, None, &store::runs_dir(results, &exp.name))?;
    let max_epochs = all.iter().map(|j| j.cfg.train.max_epochs).max().unwrap_or(0);
    let rungs = prune.rungs(max_epochs);
    let mut alive: Vec<usize> = (0..all.len()).collect();
    let mut tally = Tally::default();
    for (k, epoch) in rungs.iter().copied().map(Some).chain([None]).enumerate() {
        let rung = Rung { epoch };
        let mine: Vec<Job> = alive
            .iter()
            .filter(|&&i| opts.shard.is_none_or(|s| i % s.count == s.index))
            .map(|&i| all[i].clone())
            .collect();
        tally.merge(sweep::train_all(exp, pending(&mine, epoch)?, device, opts, ui, Some(rung)));
        let others: Vec<Job> = alive.iter().map(|&i| all[i].clone()).collect();
        if !finish_rung(exp, &others, rung, device, opts, ui, &mut tally)? {
            return Ok(tally);
        }
        let Some(e) = epoch else { break };
        alive = promote(&all, &alive, e, k, rungs.len(), prune)?;
    }
    print_compute(&all, max_epochs)?;
    Ok(tally)
}

/// The jobs that have not reached the rung yet.
fn pending(jobs: &[Job], epoch: Option<usize>) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    for j in jobs {
        if !reached(&j.dir, epoch)? {
            out.push(j.clone());
        }
    }
    Ok(out)
}

/// Trains the rung's leftovers that nobody holds and waits for those others hold. False when a
/// signal stopped the sweep.
fn finish_rung(
    exp: &Experiment,
    jobs: &[Job],
    rung: Rung,
    device: &Device,
    opts: &Options,
    ui: &Ui,
    tally: &mut Tally,
) -> Result<bool> {
    let mut told = false;
    loop {
        if run::STOP.load(AtomicOrdering::SeqCst) {
            return Ok(false);
        }
        let left = pending(jobs, rung.epoch)?;
        if left.is_empty() {
            return Ok(true);
        }
        let free: Vec<Job> = left.iter().filter(|j| !sweep::is_claimed(&j.dir)).cloned().collect();
        if !free.is_empty() {
            tally.merge(sweep::train_all(exp, free, device, opts, ui, Some(rung)));
            continue;
        }
        if !told {
            let at = rung.epoch.map_or("the end".to_string(), |e| format!("epoch {e}"));
            tracing::info!("waiting for {} trial(s) that other processes are training to {at}", left.len());
            told = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether a run folder needs no training to get to `epoch` (None: to the end): it finished,
/// failed, or holds a checkpointed history of at least `epoch` epochs and nobody trains it.
pub fn reached(dir: &Path, epoch: Option<usize>) -> Result<bool> {
    let Some(st) = RunStatus::read(dir)? else { return Ok(false) };
    match st.status {
        RunState::Finished | RunState::Failed => Ok(true),
        RunState::Running if sweep::is_claimed(dir) => Ok(false),
        _ => Ok(epoch.is_some_and(|e| epochs_done(dir) >= e)),
    }
}

fn epochs_done(dir: &Path) -> usize {
    store::read_metrics(&dir.join("metrics.parquet")).map_or(0, |h| h.len())
}

/// The ranking value of a trial at a rung: the best value of the metric over its first `epoch`
/// epochs (failed trials: infinite).
fn score(job: &Job, epoch: usize, metric: Metric) -> Result<f64> {
    let st = RunStatus::read(&job.dir)?;
    if st.is_some_and(|s| s.status == RunState::Failed) {
        return Ok(f64::INFINITY);
    }
    let hist = store::read_metrics(&job.dir.join("metrics.parquet"))?;
    let value = |m: &arm_train::EpochMetrics| match metric {
        Metric::ValNll => m.val_nll,
        Metric::ValBpd => m.val_bpd,
        Metric::TrainNll => m.train_nll,
    };
    Ok(hist.iter().filter(|m| m.epoch <= epoch).map(value).filter(|v| v.is_finite()).fold(f64::INFINITY, f64::min))
}

/// Ranks the rung (ties by trial order) and keeps the best 1/factor; the others are marked
/// pruned with their rank. Returns the survivors.
fn promote(all: &[Job], alive: &[usize], epoch: usize, k: usize, n_rungs: usize, prune: &Prune) -> Result<Vec<usize>> {
    let mut ranked: Vec<(usize, f64)> = Vec::new();
    for &i in alive {
        ranked.push((i, score(&all[i], epoch, prune.metric)?));
    }
    let factor = prune.reduction_factor;
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let keep = (alive.len() / factor).max(1).min(ranked.len());
    for (rank, &(i, v)) in ranked.iter().enumerate().skip(keep) {
        let Some(mut st) = RunStatus::read(&all[i].dir)? else { continue };
        if st.status != RunState::Pruned {
            continue;
        }
        st.reason = Some(format!(
            "pruned at epoch {epoch} (rung {} of {n_rungs}): best {} {v:.3}, ranked {} of {}; the best {keep} went on",
            k + 1,
            prune.metric.name(),
            rank + 1,
            alive.len()
        ));
        st.write(&all[i].dir)?;
    }
    tracing::info!(
        "rung {} (epoch {epoch}): {} trials ranked, the best {keep} go on ({})",
        k + 1,
        alive.len(),
        ranked[..keep].iter().map(|(i, v)| format!("{} {v:.3}", all[*i].id)).collect::<Vec<_>>().join(", ")
    );
    Ok(ranked[..keep].iter().map(|(i, _)| *i).collect())
}

/// The epochs the pruned search trained against running every trial to `max_epochs`.
fn print_compute(all: &[Job], max_epochs: usize) -> Result<()> {
    let epochs: usize = all.iter().map(|j| epochs_done(&j.dir)).sum();
    println!(
        "successive halving: {} trials trained {epochs} epochs in all ({:.0}% of the {} epochs of every trial run to max_epochs)",
        all.len(),
        100.0 * epochs as f64 / (all.len() * max_epochs).max(1) as f64,
        all.len() * max_epochs
    );
    Ok(())
}
