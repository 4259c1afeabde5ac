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

use crate::checkpoint;
use crate::config::RunConfig;
use crate::plots;
use crate::store::{self, RunState, RunStatus};

/// Set by the Ctrl-C handler: runs stop after the current step and are marked interrupted.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// A run's model: an ARM, or a VAE (`model.kind = "vae"`).
pub enum Model {
    Arm(Arm),
    Vae(Box<arm_vae::Vae>),
    /// An ARM trained with distribution augmentation (`train.augment`); evaluated, saved and
    /// sampled at the identity.
    Augmented(Box<arm_train::DistAug>),
}

impl Model {
    /// What the trainer trains.
    pub fn trainable(&self) -> &dyn arm_train::Model {
        match self {
            Model::Arm(a) => a,
            Model::Vae(v) => v.as_ref(),
            Model::Augmented(m) => m.as_ref(),
        }
    }
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Model::Arm(a) => a.shape(),
            Model::Vae(v) => v.shape(),
            Model::Augmented(m) => m.arm().shape(),
        }
    }
    pub fn levels(&self) -> usize {
        match self {
            Model::Arm(a) => a.levels(),
            Model::Vae(v) => v.levels(),
            Model::Augmented(m) => m.arm().levels(),
        }
    }
    pub fn head(&self) -> &dyn arm_core::Head {
        match self {
            Model::Arm(a) => a.head(),
            Model::Vae(v) => v.head(),
            Model::Augmented(m) => m.arm().head(),
        }
    }
    /// The ARM, or an error naming `what` for a VAE run.
    pub fn arm(&self, what: &str) -> Result<&Arm> {
        match self {
            Model::Arm(a) => Ok(a),
            Model::Augmented(m) => Ok(m.arm()),
            Model::Vae(_) => Err(crate::bad_input(format!("{what} is for ARM runs; this run is a VAE (model.kind = \"vae\")"))),
        }
    }

    /// Draws `n` images with noise from `seed`: levels per image, the sampler's iterations and
    /// its network calls per image.
    pub fn draw(&self, n: usize, seed: u64, sampler: Sampler) -> Result<(Vec<Vec<u8>>, usize, f64)> {
        match self {
            Model::Arm(a) => draw_samples(a, n, seed, sampler),
            Model::Augmented(m) => {
                let out = m.sample(&sample_noise(m.arm(), n, seed)?, seed, sampler)?;
                Ok((levels_of(&out.images)?, out.iterations, out.calls))
            }
            Model::Vae(v) => {
                let out = v.sample(n, seed, sampler).map_err(|e| crate::bad_input(format!("{e}")))?;
                Ok((levels_of(&out.images)?, out.iterations, out.calls))
            }
        }
    }
}

/// The model's name in plot titles: the backend, or the VAE and its decoder.
pub fn model_label(cfg: &RunConfig) -> String {
    match cfg.model.vae {
        Some(_) => format!("VAE ({} decoder)", cfg.model.backend),
        None => cfg.model.backend.clone(),
    }
}

/// (B, D) levels as f32 -> one Vec of levels per image.
fn levels_of(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let rows = images.to_vec2::<f32>()?;
    Ok(rows.into_iter().map(|r| r.into_iter().map(|v| v as u8).collect()).collect())
}

/// Builds data, model and variables for an ARM run (weights drawn from the run's seed); a VAE
/// run is an error naming `what` needs an ARM.
pub fn build(cfg: &RunConfig, device: &Device) -> Result<(Arm, VarMap, Dataset)> {
    match build_model(cfg, device)? {
        (Model::Arm(a), map, data) => Ok((a, map, data)),
        (Model::Augmented(m), map, data) => Ok((m.into_arm(), map, data)),
        (Model::Vae(_), ..) => Err(anyhow!("model.kind: expected an ARM here, got a VAE")),
    }
}

/// Builds data, model and variables for a run (weights drawn from the run's seed).
pub fn build_model(cfg: &RunConfig, device: &Device) -> Result<(Model, VarMap, Dataset)> {
    let data = crate::data::load(&cfg.data)?;
    let head =
        arm_core::heads::build(&cfg.model.head, &cfg.model.head_table, data.levels).map_err(|e| match e.key {
            Some(k) => anyhow!("model.{}.{k}: {}", cfg.model.head, e.problem),
            None => anyhow!("model.{}: {}", cfg.model.head, e.problem),
        })?;
    let map = VarMap::new();
    let ctx = BuildCtx {
        vb: seeded_var_builder(&map, cfg.seed, device),
        device: device.clone(),
        height: data.height,
        width: data.width,
        num_params: head.num_params(),
        levels: data.levels,
        seed: cfg.seed,
        order: None,
        cond_dim: 0,
    };
    let transforms = augment_transforms(&cfg.train.augment);
    if let Some(vae) = &cfg.model.vae {
        let vcfg: arm_vae::VaeConfig =
            crate::config::from_value(toml::Value::Table(vae.clone())).map_err(|e| anyhow!("model.vae: {e}"))?;
        let plugin;
        let decoder = if cfg.model.backend == arm_vae::FACTORIZED {
            arm_vae::Decoder::Factorized
        } else {
            plugin = arm_backends::plugin(&cfg.model.backend)?;
            arm_vae::Decoder::Plugin(&plugin, &cfg.model.plugin)
        };
        let vae = arm_vae::build(&vcfg, decoder, head, ctx).map_err(|e| match e {
            arm_vae::VaeError::Decoder(e) => anyhow!("model.{}: {e}", cfg.model.backend),
            other => anyhow!("model.{other}"),
        })?;
        return Ok((Model::Vae(Box::new(vae)), map, data));
    }
    let plugin = arm_backends::plugin(&cfg.model.backend)?;
    let orderings = crate::config::orderings(&cfg.data);
    let eval_orders = cfg.data.eval_orders.unwrap_or(1);
    let classes = if transforms.is_empty() { 0 } else { transforms.len() + 1 };
    let cond = plugin
        .build_ordered(&cfg.model.plugin, BuildCtx { cond_dim: classes, ..ctx }, &orderings, eval_orders)
        .map_err(|e| anyhow!("model.{}: {e}", cfg.model.backend))?;
    if classes == 0 {
        let arm = Arm::new(cond, head, data.levels, (data.height, data.width), orderings[0])?;
        return Ok((Model::Arm(arm), map, data));
    }
    let net: std::sync::Arc<dyn arm_core::Conditional> = std::sync::Arc::from(cond);
    // The Arm's own network is replaced by DistAug's identity-conditioned one.
    let shell = Arm::new(
        Box::new(arm_core::Conditioned::new(net.clone(), arm_train::identity_condition(classes, device)?)?),
        head,
        data.levels,
        (data.height, data.width),
        orderings[0],
    )?;
    let (prob, seed) = (cfg.train.augment_prob, cfg.seed ^ AUGMENT_STREAM);
    let aug = arm_train::DistAug::new(&shell, net, &transforms, prob, seed, cfg.train.augment_eval)
        .map_err(|e| crate::bad_input(format!("train.augment: {e}")))?;
    Ok((Model::Augmented(Box::new(aug)), map, data))
}

/// Separates the augmentation draws from the other streams of the run's seed.
const AUGMENT_STREAM: u64 = 0x61_7567_6d65_6e74;

/// The transforms of `train.augment`'s groups, in order (the groups were validated).
fn augment_transforms(groups: &[String]) -> Vec<arm_data::augment::Transform> {
    groups.iter().flat_map(|g| arm_data::augment::Transform::group(g).unwrap_or_default()).collect()
}

pub fn n_params(map: &VarMap) -> u64 {
    map.all_vars().iter().map(|v| v.elem_count() as u64).sum()
}

/// Uniform sampling noise for `n` images, (n, D, Q), drawn from `seed`: the same seed gives the
/// same noise, hence the same images, for every sampler.
pub fn sample_noise(arm: &Arm, n: usize, seed: u64) -> Result<Tensor> {
    let (d, q) = (arm.dims(), arm.head().noise_dim());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise: Vec<f32> = (0..n * d * q).map(|_| rng.random::<f32>()).collect();
    Ok(Tensor::from_vec(noise, (n, d, q), arm.device())?)
}

/// Draws `n` samples with noise from `seed`; returns images as level vectors (image layout),
/// the sampler's iterations and its network calls per image.
pub fn draw_samples(arm: &Arm, n: usize, seed: u64, sampler: Sampler) -> Result<(Vec<Vec<u8>>, usize, f64)> {
    let noise = sample_noise(arm, n, seed)?;
    let out = arm.sample(&noise, sampler)?;
    Ok((levels_of(&out.images)?, out.iterations, out.calls))
}

pub fn save_weights(map: &VarMap, path: &Path) -> Result<()> {
    store::atomic_write_with(path, |tmp| {
        map.save(tmp).with_context(|| format!("{}: cannot save weights", path.display()))
    })
}

/// What a run's training figure is: the NLL in nats, or the loss of a head without a
/// likelihood (which has no bits/dim).
#[derive(Debug, Clone, Copy)]
pub struct Figure {
    pub likelihood: bool,
    pub name: &'static str,
    /// Appended to a value: " nats", or nothing.
    pub unit: &'static str,
    /// The y-axis label of its curves.
    pub axis: &'static str,
}

pub fn figure(head: &str) -> Figure {
    if arm_core::heads::has_likelihood(head) {
        Figure { likelihood: true, name: "NLL", unit: " nats", axis: "NLL (nats per image)" }
    } else {
        Figure { likelihood: false, name: "quantile loss", unit: "", axis: "quantile loss (per image)" }
    }
}

pub fn write_curve(dir: &Path, title: &str, history: &[arm_train::EpochMetrics], fig: Figure) -> Result<()> {
    let pts =
        |f: fn(&arm_train::EpochMetrics) -> f64| history.iter().map(|m| (m.epoch as f64, f(m))).collect::<Vec<_>>();
    plots::curves(
        &dir.join("nll_curve.png"),
        title,
        "epoch",
        fig.axis,
        &[
            plots::Series { label: "train".into(), points: pts(|m| m.train_nll), band: vec![] },
            plots::Series { label: "validation".into(), points: pts(|m| m.val_nll), band: vec![] },
        ],
    )
}

/// Hidden test hook: `RUNNER_STOP_AFTER_EPOCHS=N` acts like a Ctrl-C at the end of epoch N.
fn stop_after_epochs() -> Option<usize> {
    std::env::var("RUNNER_STOP_AFTER_EPOCHS").ok()?.trim().parse().ok()
}

/// The checkpoint to resume `dir` from, if it has one that fits the model's variables (else
/// the run starts afresh).
fn resume_state(dir: &Path, map: &VarMap, device: &Device, run_id: &str) -> Option<(arm_train::TrainState, f64)> {
    let path = dir.join(checkpoint::FILE);
    if !path.exists() {
        return None;
    }
    let fits = |st: &arm_train::TrainState| {
        let vars = map.data().lock().unwrap_or_else(|e| e.into_inner());
        vars.len() == st.weights.len()
            && vars.iter().all(|(k, v)| {
                let same = |t: Option<&Tensor>| t.is_some_and(|t| t.shape() == v.shape());
                same(st.weights.get(k))
                    && same(st.best_weights.get(k))
                    && same(st.moments.get(k).map(|m| &m.0))
                    && same(st.moments.get(k).map(|m| &m.1))
            })
    };
    match checkpoint::load(&path, device) {
        Ok((st, _)) if !fits(&st) => {
            tracing::warn!("{run_id}: {} does not fit this model's variables; training from the start", path.display());
            None
        }
        Ok((st, wall)) => {
            tracing::info!("{run_id}: resuming from the checkpoint of epoch {}", st.epoch);
            Some((st, wall))
        }
        Err(e) => {
            tracing::warn!("{run_id}: {e:#}; training from the start");
            None
        }
    }
}

/// Trains `cfg` into `dir`. `bar` shows epochs; `log_epochs` adds a log line per epoch. After
/// every epoch the checkpoint and metrics are written (atomically); with `resume`, training
/// continues from the folder's checkpoint when it has one. With `rung`, training pauses at the
/// end of that epoch (successive halving): the run is marked pruned until a ranking promotes it.
pub fn execute(
    cfg: &RunConfig,
    dir: &Path,
    device: &Device,
    bar: &ProgressBar,
    log_epochs: bool,
    resume: bool,
    rung: Option<usize>,
) -> Result<RunStatus> {
    let t0 = Instant::now();
    let mut status = begin(cfg, dir)?;
    let (model, map, data) = build_model(cfg, device)?;
    status.n_params = n_params(&map);
    let run_id = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let start = if resume { resume_state(dir, &map, device, &run_id) } else { None };
    let wall_before = start.as_ref().map_or(0.0, |(_, w)| *w);
    bar.set_length(cfg.train.max_epochs as u64);
    bar.set_position(start.as_ref().map_or(0, |(st, _)| st.epoch as u64));
    let mut progress = Progress {
        dir,
        run_id: &run_id,
        bar,
        log_epochs,
        t0,
        wall_before,
        best_so_far: start.as_ref().map_or(f64::INFINITY, |(st, _)| st.best_val_nll),
        figure: figure(&cfg.model.head),
        stop_after: stop_after_epochs(),
        rung,
        at_rung: false,
        write_err: None,
    };
    let outcome = arm_train::train_from(model.trainable(), &map, &data, &cfg.train, cfg.seed, start.map(|(st, _)| st), &mut |ev| {
        progress.on(ev)
    })?;
    if let Some(e) = progress.write_err {
        status.status = RunState::Failed;
        status.reason = Some(format!("{e:#}"));
        status.write(dir)?;
        return Err(e);
    }
    write_history(cfg, dir, &run_id, &outcome, &mut status)?;
    record_outcome(cfg, dir, (&model, &data), &map, &outcome, &mut status)?;
    if progress.at_rung && status.status == RunState::Interrupted && !STOP.load(AtomicOrdering::SeqCst) {
        status.status = RunState::Pruned;
        status.reason = Some(format!(
            "stopped at epoch {}, a rung of successive halving; resumes if the rung's ranking promotes it",
            outcome.history.len()
        ));
    }
    status.wall_seconds = wall_before + t0.elapsed().as_secs_f64();
    status.write(dir)?;
    if status.is_finished() {
        // model.safetensors holds the best weights now; the checkpoint is no longer needed.
        let _ = std::fs::remove_file(dir.join(checkpoint::FILE));
    }
    Ok(status)
}

/// Removes the per-image evaluations `runner eval` wrote into a run folder by default
/// (`eval_*.parquet`): they describe the weights that new ones replace (a run trained again),
/// and `runner report` reads them as the run's.
fn remove_evaluations(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("eval_") && name.ends_with(".parquet") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Creates the run folder with its `config.toml` and a running status (returned).
fn begin(cfg: &RunConfig, dir: &Path) -> Result<RunStatus> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create run folder", dir.display()))?;
    store::atomic_write(&dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let status = RunStatus { pid: std::process::id(), ..RunStatus::new(RunState::Running) };
    status.write(dir)?;
    Ok(status)
}

/// The trainer's observer: writes the checkpoint and metrics after every epoch, shows progress,
/// and asks to stop on Ctrl-C (or the test hook), or when a file cannot be written.
struct Progress<'a> {
    dir: &'a Path,
    run_id: &'a str,
    bar: &'a ProgressBar,
    log_epochs: bool,
    t0: Instant,
    /// Wall seconds of the run before this process resumed it.
    wall_before: f64,
    best_so_far: f64,
    figure: Figure,
    stop_after: Option<usize>,
    /// Pause at the end of this epoch (a rung of successive halving).
    rung: Option<usize>,
    at_rung: bool,
    write_err: Option<anyhow::Error>,
}

impl Progress<'_> {
    fn on(&mut self, ev: Event) -> Control {
        match ev {
            Event::Step { epoch, step, steps } => {
                self.bar.set_message(format!("epoch {epoch} step {step}/{steps} best val {:.2}", self.best_so_far));
            }
            Event::Epoch { metrics, best, state } => {
                if let Err(e) = self.save(state) {
                    self.write_err = Some(e);
                    return Control::Stop;
                }
                if metrics.clipped_steps > 0 {
                    // Always logged, progress bar or not: clipping changes the optimisation.
                    tracing::info!(
                        "{} epoch {}: gradient norm clipped in {} steps (largest {:.3})",
                        self.run_id,
                        metrics.epoch,
                        metrics.clipped_steps,
                        metrics.max_grad_norm
                    );
                }
                if self.stop_after.is_some_and(|n| metrics.epoch >= n) {
                    STOP.store(true, AtomicOrdering::SeqCst);
                }
                if best {
                    self.best_so_far = metrics.val_nll;
                }
                self.show(metrics, best);
                if self.rung.is_some_and(|r| metrics.epoch >= r) {
                    self.at_rung = true;
                    return Control::Stop;
                }
            }
        }
        if STOP.load(AtomicOrdering::SeqCst) {
            return Control::Stop;
        }
        Control::Continue
    }

    /// The checkpoint and metrics of the epoch that just ended.
    fn save(&self, state: &arm_train::TrainState) -> Result<()> {
        let wall = self.wall_before + self.t0.elapsed().as_secs_f64();
        checkpoint::save(&self.dir.join(checkpoint::FILE), state, wall)?;
        store::write_parquet(&self.dir.join("metrics.parquet"), &mut store::metrics_frame(&state.history)?)
    }

    fn show(&self, m: &arm_train::EpochMetrics, best: bool) {
        self.bar.set_position(m.epoch as u64);
        let unit = self.figure.unit;
        self.bar.set_message(format!("val {:.3}{unit}, best {:.3}", m.val_nll, self.best_so_far));
        if self.log_epochs {
            let bpd = if self.figure.likelihood { format!(" ({:.4} bits/dim)", m.val_bpd) } else { String::new() };
            tracing::info!(
                "{} epoch {} train {:.3} val {:.3}{unit}{bpd}{}",
                self.run_id,
                m.epoch,
                m.train_nll,
                m.val_nll,
                if best { " *" } else { "" }
            );
        }
    }
}

/// `metrics.parquet` and the NLL curve of the epochs run; the epoch counts in `status`.
fn write_history(
    cfg: &RunConfig,
    dir: &Path,
    run_id: &str,
    outcome: &arm_train::Outcome,
    status: &mut RunStatus,
) -> Result<()> {
    let mut df = store::metrics_frame(&outcome.history)?;
    store::write_parquet(&dir.join("metrics.parquet"), &mut df)?;
    status.epochs = outcome.history.len() as u64;
    status.best_epoch = outcome.best_epoch as u64;
    status.best_val_nll = outcome.best_val_nll.is_finite().then_some(outcome.best_val_nll);
    if !outcome.history.is_empty() {
        write_curve(dir, &format!("{} ({})", cfg.name, run_id), &outcome.history, figure(&cfg.model.head))?;
    }
    Ok(())
}

/// The first `n` images of a split (fewer if it has fewer), one Vec of levels each.
pub fn first_images(split: &arm_data::Split, n: usize) -> Vec<Vec<u8>> {
    split.pixels.chunks(split.dims).take(n).map(<[u8]>::to_vec).collect()
}

/// How training ended, into `status`; a finished run also gets its best weights and samples.
fn record_outcome(
    cfg: &RunConfig,
    dir: &Path,
    (model, data): (&Model, &Dataset),
    map: &VarMap,
    outcome: &arm_train::Outcome,
    status: &mut RunStatus,
) -> Result<()> {
    match &outcome.status {
        Status::Finished { .. } => {
            remove_evaluations(dir);
            save_weights(map, &dir.join("model.safetensors"))?;
            let (imgs, ..) = model.draw(cfg.sample.n, cfg.sample.seed, Sampler::Cached)?;
            let (shape, levels) = (model.shape(), model.levels());
            let title = format!("{} samples", model_label(cfg));
            plots::sample_grid(&dir.join("samples.png"), &title, &imgs, shape, levels)?;
            let real = first_images(&data.test, cfg.sample.n);
            let title = format!("{}: {} test images and samples", model_label(cfg), data.name);
            plots::real_and_samples(&dir.join("data_and_samples.png"), &title, &real, &imgs, shape, levels)?;
            let q = crate::quality::against_test(&imgs, data);
            (status.sample_w1, status.sample_mmd2) = (q.w1, q.mmd2);
            status.status = RunState::Finished;
            status.test_nll = outcome.test_nll;
            // Bits per dimension only for a likelihood.
            status.test_bpd = outcome.test_bpd.filter(|_| model.head().likelihood());
            if let Model::Vae(vae) = model {
                // The trainer's test figure is minus the ELBO; the NLL reported is the tighter
                // importance-weighted bound.
                let samples = vae.config().iw_samples;
                let (elbo, iw, kl) = crate::eval::vae_bounds(vae, &data.test, samples)?;
                status.test_elbo = Some(-elbo);
                status.test_kl = Some(kl);
                status.test_nll = Some(-iw);
                status.test_bpd = Some(arm_core::bits_per_dim(-iw, data.dims()));
                status.bound = Some(format!("IW-{samples}"));
            }
        }
        Status::Diverged { epoch, reason } => {
            status.status = RunState::Failed;
            status.reason = Some(format!("diverged at epoch {epoch}: {reason}"));
        }
        Status::Interrupted { epoch } => {
            status.status = RunState::Interrupted;
            let done = outcome.history.len();
            status.reason = Some(if done > 0 {
                format!("interrupted in epoch {epoch}; --resume continues after epoch {done}")
            } else {
                format!("interrupted in epoch {epoch}")
            });
        }
    }
    Ok(())
}
