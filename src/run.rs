//! Executes one resolved run into its folder: build, train (metrics written every epoch),
//! best weights, sample grid, NLL curve and the status file.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use arm_backends::BuildCtx;
use arm_core::{seeded_var_builder, Arm, Sampler};
use arm_data::Dataset;
use arm_train::{Control, Event, Status};

use crate::config::RunConfig;
use crate::plots;
use crate::store::{self, RunStatus};

/// Set by the Ctrl-C handler: runs stop after the current step and are marked interrupted.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Builds data, model and variables for a run (weights drawn from the run's seed).
pub fn build(cfg: &RunConfig, device: &Device) -> Result<(Arm, VarMap, Dataset)> {
    let data = arm_data::load(&cfg.data.name)?;
    let head = arm_core::build_head(&cfg.model.head, &cfg.model.head_table, data.levels)
        .map_err(|(k, m)| anyhow!("model.{}{}{k}: {m}", cfg.model.head, if k.is_empty() { "" } else { "." }))?;
    let plugin = arm_backends::plugin(&cfg.model.backend)?;
    let map = VarMap::new();
    let ctx = BuildCtx {
        vb: seeded_var_builder(&map, cfg.seed, device),
        device: device.clone(),
        height: data.height,
        width: data.width,
        num_params: head.num_params(),
        seed: cfg.seed,
    };
    let cond = plugin.build(&cfg.model.plugin, ctx).map_err(|e| anyhow!("model.{}: {e}", cfg.model.backend))?;
    let arm = Arm::new(cond, head, data.levels, (data.height, data.width), cfg.data.ordering)?;
    Ok((arm, map, data))
}

pub fn n_params(map: &VarMap) -> u64 {
    map.all_vars().iter().map(|v| v.elem_count() as u64).sum()
}

/// Draws `n` samples with noise from `seed`; returns images as level vectors (image layout).
pub fn draw_samples(arm: &Arm, n: usize, seed: u64, sampler: Sampler) -> Result<(Vec<Vec<u8>>, usize)> {
    let (d, q) = (arm.dims(), arm.head().noise_dim());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise: Vec<f32> = (0..n * d * q).map(|_| rng.random::<f32>()).collect();
    let noise = Tensor::from_vec(noise, (n, d, q), arm.device())?;
    let out = arm.sample(&noise, sampler)?;
    let rows = out.images.to_vec2::<f32>()?;
    Ok((rows.into_iter().map(|r| r.into_iter().map(|v| v as u8).collect()).collect(), out.iterations))
}

pub fn save_weights(map: &VarMap, path: &Path) -> Result<()> {
    store::atomic_write_with(path, |tmp| {
        map.save(tmp).with_context(|| format!("{}: cannot save weights", path.display()))
    })
}

pub fn write_curve(dir: &Path, title: &str, history: &[arm_train::EpochMetrics]) -> Result<()> {
    let pts = |f: fn(&arm_train::EpochMetrics) -> f64| history.iter().map(|m| (m.epoch as f64, f(m))).collect::<Vec<_>>();
    plots::curves(
        &dir.join("nll_curve.png"),
        title,
        "epoch",
        "NLL (nats per image)",
        &[
            plots::Series { label: "train".into(), points: pts(|m| m.train_nll), band: vec![] },
            plots::Series { label: "validation".into(), points: pts(|m| m.val_nll), band: vec![] },
        ],
    )
}

/// Trains `cfg` into `dir`. `bar` shows epochs; `log_epochs` adds a log line per epoch.
pub fn execute(cfg: &RunConfig, dir: &Path, device: &Device, bar: &ProgressBar, log_epochs: bool) -> Result<RunStatus> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create run folder", dir.display()))?;
    store::atomic_write(&dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    let mut status = RunStatus { status: "running".into(), pid: std::process::id(), ..Default::default() };
    status.write(dir)?;

    let (arm, map, data) = build(cfg, device)?;
    status.n_params = n_params(&map);
    let run_id = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    bar.set_length(cfg.train.max_epochs as u64);
    bar.set_position(0);
    let mut best_so_far = f64::INFINITY;
    let outcome = arm_train::train(&arm, &map, &data, &cfg.train, cfg.seed, &mut |ev| {
        match ev {
            Event::Step { epoch, step, steps } => {
                bar.set_message(format!("epoch {epoch} step {step}/{steps} best val {best_so_far:.2}"));
            }
            Event::Epoch { metrics, best } => {
                if best {
                    best_so_far = metrics.val_nll;
                }
                bar.set_position(metrics.epoch as u64);
                bar.set_message(format!("val {:.3} nats, best {best_so_far:.3}", metrics.val_nll));
                if log_epochs {
                    tracing::info!(
                        "{run_id} epoch {} train {:.3} val {:.3} nats ({:.4} bits/dim){}",
                        metrics.epoch,
                        metrics.train_nll,
                        metrics.val_nll,
                        metrics.val_bpd,
                        if best { " *" } else { "" }
                    );
                }
            }
        }
        if STOP.load(AtomicOrdering::SeqCst) {
            return Control::Stop;
        }
        Control::Continue
    })?;
    let mut df = store::metrics_frame(&outcome.history)?;
    store::write_parquet(&dir.join("metrics.parquet"), &mut df)?;
    status.epochs = outcome.history.len() as u64;
    status.best_epoch = outcome.best_epoch as u64;
    status.best_val_nll = outcome.best_val_nll.is_finite().then_some(outcome.best_val_nll);
    if !outcome.history.is_empty() {
        write_curve(dir, &format!("{} ({})", cfg.name, run_id), &outcome.history)?;
    }
    match &outcome.status {
        Status::Finished { .. } => {
            save_weights(&map, &dir.join("model.safetensors"))?;
            let (imgs, _) = draw_samples(&arm, cfg.sample.n, cfg.sample.seed, Sampler::Cached)?;
            plots::sample_grid(&dir.join("samples.png"), &format!("{} samples", cfg.model.backend), &imgs, arm.shape(), arm.levels())?;
            status.status = "finished".into();
            status.test_nll = outcome.test_nll;
            status.test_bpd = outcome.test_bpd;
        }
        Status::Diverged { epoch, reason } => {
            status.status = "failed".into();
            status.reason = Some(format!("diverged at epoch {epoch}: {reason}"));
        }
        Status::Interrupted { epoch } => {
            status.status = "interrupted".into();
            status.reason = Some(format!("interrupted during epoch {epoch}"));
        }
    }
    status.wall_seconds = t0.elapsed().as_secs_f64();
    status.write(dir)?;
    Ok(status)
}
