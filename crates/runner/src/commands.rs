//! Subcommands.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::EnvFilter;

use crate::config::{self};
use crate::{bad_input, run, store, Cli, Command};

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), |n| n.parse())
                .map_err(|_| bad_input(format!("--device {s:?}: expected cpu, cuda or cuda:N")))?;
            if !candle_core::utils::cuda_is_available() {
                return Err(bad_input(format!("--device {s}: this runner was built without the `cuda` feature")));
            }
            Device::new_cuda(n).with_context(|| format!("--device {s}"))
        }
        _ => Err(bad_input(format!("--device {s:?}: expected cpu, cuda or cuda:N"))),
    }
}

/// Progress bars that logs do not garble: log lines are printed while the bars are suspended.
pub struct Ui {
    pub multi: MultiProgress,
    pub tty: bool,
}

impl Ui {
    pub fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let m = multi.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
            .with_target(false)
            .with_ansi(tty)
            .with_writer(move || BarWriter(m.clone()))
            .try_init();
        Ui { multi, tty }
    }

    pub fn run_bar(&self, label: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(1));
        bar.set_style(
            ProgressStyle::with_template("{prefix:.bold} [{bar:30}] epoch {pos}/{len} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar
    }
}

struct BarWriter(MultiProgress);

impl std::io::Write for BarWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::Write::write_all(&mut std::io::stderr(), buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut std::io::stderr())
    }
}

/// Ctrl-C, SIGTERM (what Slurm and `kill` send) and SIGHUP (a closed terminal) all stop the
/// work after the current step: the run is checkpointed and marked interrupted.
pub fn install_ctrlc() {
    let _ = ctrlc::set_handler(|| {
        if run::STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // A second signal: leave now; files are written atomically, so nothing is torn.
            std::process::exit(130);
        }
        eprintln!("stopping after the current step (interrupt again to quit now)");
    });
}

pub fn interrupted(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(crate::Interrupted(msg.into()))
}

/// Runs the command line's subcommand.
pub fn dispatch(cli: Cli) -> Result<()> {
    let Cli { results, device, command } = cli;
    match command {
        Command::Train { file, sets, seed, resume } => train(&results, &device, &file, &sets, seed, resume),
        Command::Sweep { file, sets, jobs, shard, dry_run, fail_fast, resume } => {
            let exp = config::load(&file, &sets).map_err(bad_input)?;
            if jobs == 0 {
                return Err(bad_input("--jobs: must be at least 1, got 0"));
            }
            let device = parse_device(&device)?;
            let opts = crate::sweep::Options { jobs, shard, dry_run, fail_fast, resume };
            crate::sweep::sweep(&exp, &results, &device, &opts)
        }
        Command::Report { dirs, format, out, samples, html } => {
            let device = parse_device(&device)?;
            let _ui = Ui::new();
            let opts = crate::report::Options { format, out, samples: samples.max(1), html };
            crate::report::report(&results, &dirs, &device, &opts)
        }
        Command::Slurm { file, array, time, cpus, out, sets } => slurm(&results, &file, array, time, cpus, out, sets),
        Command::Status { folder, watch, every } => {
            let folder = folder.unwrap_or(results);
            crate::status::status(&folder, &crate::status::Options { watch: watch.then_some(every) })
        }
        Command::List { masks, orderings, plot } if masks || orderings => {
            if masks {
                print_masks();
            }
            if orderings {
                print_orderings(8, 8);
            }
            if let Some(path) = plot {
                for (h, w) in [(8, 8), (28, 28)] {
                    let maps: Vec<(String, Vec<usize>)> =
                        arm_core::Ordering::EXAMPLES.iter().map(|o| (o.name(), o.rank(h, w))).collect();
                    let file = if h == 8 { path.clone() } else { path.with_extension("28x28.png") };
                    let title = format!("pixel orderings, {h}x{w}: rank of each pixel (dark first, yellow last)");
                    crate::plots::ordering_maps(&file, &title, &maps, (h, w))
                        .map_err(|e| bad_input(format!("--plot {}: {e:#}", file.display())))?;
                    println!("wrote {}", file.display());
                }
            }
            Ok(())
        }
        Command::List { .. } => {
            list();
            Ok(())
        }
        Command::Sample { run_dir, n, sampler, seed, out, offsets } => {
            let device = parse_device(&device)?;
            crate::sample::sample(&run_dir, &device, &crate::sample::Options { n, sampler, seed, out, offsets })
        }
        Command::Eval { run_dir, data, split, out, members, member, augment_eval, iw_samples } => {
            let device = parse_device(&device)?;
            crate::eval::eval(&run_dir, &device, &crate::eval::Options { data, split, out, members, member, augment_eval, iw_samples })
        }
        Command::Encode { run_dir, split, out } => {
            let device = parse_device(&device)?;
            crate::eval::encode(&run_dir, &device, split, out)
        }
        Command::Bench { what: crate::BenchWhat::Train { steps, model, profile } } => {
            bench_train(&device, steps, model.as_deref(), profile)
        }
        Command::Bench { what: crate::BenchWhat::Sampling { max_seconds, batches, seed, plugins } } => {
            let device = parse_device(&device)?;
            let opts = crate::bench_sampling::Options { max_seconds, batches, seed, plugins };
            crate::bench_sampling::bench_sampling(&device, &opts)
        }
    }
}

/// `runner train`: one run of an experiment file without a grid (its first seed, or `seed`).
fn train(results: &Path, device: &str, file: &Path, sets: &[String], seed: Option<u64>, resume: bool) -> Result<()> {
    let exp = config::load(file, sets).map_err(bad_input)?;
    let device = parse_device(device)?;
    let points: std::collections::BTreeSet<String> = exp.runs.iter().map(|r| format!("{:?}", r.grid)).collect();
    if points.len() > 1 {
        return Err(bad_input(format!(
            "{}: has a [grid] of {} points; `runner train` trains one run, use `runner sweep {}`",
            file.display(),
            points.len(),
            file.display()
        )));
    }
    let mut cfg = exp.runs[0].clone();
    if let Some(s) = seed {
        if i64::try_from(s).is_err() {
            return Err(bad_input(format!("--seed {s}: must be at most {} (a TOML integer)", i64::MAX)));
        }
        cfg.seed = s;
    }
    let id = cfg.run_id().map_err(bad_input)?;
    let ui = Ui::new();
    install_ctrlc();
    let dir = store::runs_dir(results, &exp.name).join(&id);
    // The same claim as a sweep's: never two trainings of one run folder at once.
    let _claim = crate::sweep::claim(&dir)?
        .ok_or_else(|| anyhow::anyhow!("{}: another runner process is training this run", dir.display()))?;
    let done = if resume { store::RunStatus::read(&dir)?.filter(|s| s.is_finished()) } else { None };
    let st = match done {
        Some(st) => {
            tracing::info!("{id}: already finished, nothing to resume");
            st
        }
        None => {
            tracing::info!("training {} -> {}", exp.name, dir.display());
            let bar = ui.run_bar(&id);
            let st = run::execute(&cfg, &dir, &device, &bar, !ui.tty, resume, None)?;
            bar.finish_and_clear();
            st
        }
    };
    print_trained(&cfg, &id, &dir, st)
}

/// The one-line result of `runner train`; a failed run is an error.
fn print_trained(cfg: &config::RunConfig, id: &str, dir: &Path, st: store::RunStatus) -> Result<()> {
    let dims = crate::data::shape(&cfg.data).map_or(1, |(h, w, _)| h * w);
    let fig = crate::run::figure(&cfg.model.head);
    let what = fig.name;
    match (st.best_val_nll, st.test_nll) {
        (Some(v), Some(t)) if st.is_finished() && !fig.likelihood => println!(
            "{id}: best val {what} {v:.4} at epoch {} of {}; test {what} {t:.4} (no likelihood); {} parameters, {:.0} s\nresults in {}",
            st.best_epoch,
            st.epochs,
            st.n_params,
            st.wall_seconds,
            dir.display()
        ),
        (Some(v), Some(t)) if st.is_finished() => println!(
            "{id}: best val NLL {v:.3} nats ({:.4} bits/dim) at epoch {} of {}; test NLL {t:.3} nats ({:.4} bits/dim); {} parameters, {:.0} s\nresults in {}",
            arm_core::bits_per_dim(v, dims),
            st.best_epoch,
            st.epochs,
            st.test_bpd.unwrap_or(f64::NAN),
            st.n_params,
            st.wall_seconds,
            dir.display()
        ),
        _ => {
            println!("{id}: {} ({})", st.status, st.reason.clone().unwrap_or_default());
            match st.status {
                store::RunState::Failed => anyhow::bail!("run {id} failed: {}", st.reason.unwrap_or_default()),
                store::RunState::Interrupted => {
                    return Err(interrupted(format!("run {id} interrupted; `runner train --resume` continues it")))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// `runner slurm`: writes the sbatch array script of a sweep.
fn slurm(
    results: &Path,
    file: &Path,
    array: usize,
    time: String,
    cpus: usize,
    out: Option<PathBuf>,
    sets: Vec<String>,
) -> Result<()> {
    let exp = config::load(file, &sets).map_err(bad_input)?;
    if array == 0 {
        return Err(bad_input("--array: must be at least 1, got 0"));
    }
    let p = crate::slurm::write_script(&exp, file, results, &crate::slurm::Options { array, time, cpus, out, sets })?;
    println!("wrote {} ({} runs in {array} shards); submit with: sbatch {}", p.display(), exp.runs.len(), p.display());
    Ok(())
}

/// `runner bench train`: the default cases, or those whose label contains `model`.
fn bench_train(device: &str, steps: usize, model: Option<&str>, profile: bool) -> Result<()> {
    let device = parse_device(device)?;
    let mut cases = crate::bench::default_cases();
    if let Some(m) = model {
        let labels: Vec<String> = cases.iter().map(|c| format!("'{}'", c.label)).collect();
        cases.retain(|c| c.label.contains(m));
        if cases.is_empty() {
            return Err(bad_input(format!("--model {m}: matches none of {}", labels.join(", "))));
        }
    }
    crate::bench::bench_train(&cases, steps, profile, &device)
}

fn type_of(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::Integer(_) => "integer",
        toml::Value::Float(_) => "float",
        toml::Value::String(_) => "string",
        toml::Value::Boolean(_) => "bool",
        toml::Value::Array(_) => "list",
        toml::Value::Table(_) => "table",
        toml::Value::Datetime(_) => "datetime",
    }
}

fn list() {
    println!("Conditional plugins ([model] backend = NAME; keys go in [model.NAME]):\n");
    for p in arm_backends::registry() {
        let kind = match (p.is_2d, p.any_order) {
            (true, true) => " (2D, any order through local masks)",
            (true, false) => " (2D, raster only)",
            _ => "",
        };
        let decoder = if p.conditioning { " [VAE decoder]" } else { "" };
        println!("{}{kind}{decoder}  {}", p.name, p.summary);
        let defaults = p.defaults();
        for (k, doc) in p.key_docs {
            let v = defaults.get(*k);
            // Keys added after the first runs are not written when default (the doc says it).
            let (ty, dv) = v.map_or(("", "-".to_string()), |v| (type_of(v), v.to_string()));
            println!("    {k:<16} {ty:<8} default {dv:<14} {doc}");
        }
        println!();
    }
    println!("Heads ([model] head = NAME; keys go in [model.NAME]):\n");
    for h in arm_core::head_names() {
        println!("{h:<18} {}", arm_core::heads::summary(h));
        if let Ok(t) = arm_core::heads::resolve(h, &toml::Table::new(), 17) {
            for (k, v) in &t {
                println!("    {k:<16} {:<8} default {}", type_of(v), v);
            }
        }
    }
    println!("\nVAEs ([model] kind = \"vae\"; backend = the decoder p(x|z): factorized, or a plugin marked");
    println!("[VAE decoder], which adds a linear map of z to every layer; keys go in [model.vae]):\n");
    let vae = toml::Table::try_from(arm_vae::VaeConfig::default()).unwrap_or_default();
    for (k, doc) in arm_vae::KEY_DOCS {
        let (ty, dv) = vae.get(*k).map_or(("", "-".to_string()), |v| (type_of(v), v.to_string()));
        println!("    {k:<16} {ty:<8} default {dv:<14} {doc}");
    }
    println!(
        "\nDistribution augmentation ([train] augment = [GROUP, ...], augment_prob = 0.5; a plugin marked\n\
         [VAE decoder] reads the transform as its conditioning vector): {}\n\
         augment_eval = \"identity\" (default) evaluates and samples p(x | identity); \"mixture\" the exact mixture\n\
         sum_t pi_t p(t(x) | t) over the identity and the listed flips, transpose and rotations, pi_t the\n\
         share of training images drawn with t (renormalised).",
        arm_data::augment::AUGMENT_NAMES.join(", ")
    );
    println!("\nData sets ([data] name = NAME): {}", arm_data::DATASET_NAMES.join(", "));
    println!("\nOrderings ([data] ordering = NAME, or orderings = [NAME, ...] drawn per batch):\n");
    for o in arm_core::Ordering::EXAMPLES {
        let name = match o {
            arm_core::Ordering::Random(_) => "random(SEED)".to_string(),
            o => o.name(),
        };
        println!("{name:<14} {}", o.summary());
    }
    println!("\n`runner list --orderings` draws them; `runner list --masks` prints the PixelCNN masks.");
}

/// The masks of a k x k masked convolution (van den Oord et al. 2016, §3.4; the chapter's Fig.
/// 2.5), from the tap lists the plugins use: 1 where a weight exists.
fn print_masks() {
    use arm_backends::layers::conv2d::{masked_taps, Mask};
    for k in [3, 5] {
        for (name, mask) in [("A", Mask::A), ("B", Mask::B)] {
            let taps = masked_taps(k, mask);
            println!("mask {name}, {k}x{k}:");
            let h = (k / 2) as isize;
            for dy in -h..=h {
                let row: Vec<&str> = (-h..=h).map(|dx| if taps.contains(&(dy, dx)) { "1" } else { "0" }).collect();
                println!("  {}", row.join(" "));
            }
            println!();
        }
    }
}

/// Every ordering of an h x w image: the rank of each pixel, row by row.
fn print_orderings(h: usize, w: usize) {
    for o in arm_core::Ordering::EXAMPLES {
        println!("{o} ({h}x{w}): rank of each pixel");
        let rank = o.rank(h, w);
        for r in 0..h {
            let row: Vec<String> = (0..w).map(|c| format!("{:>2}", rank[r * w + c])).collect();
            println!("  {}", row.join(" "));
        }
        println!();
    }
}
