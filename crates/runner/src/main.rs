//! `runner`: train, sweep, report and compare autoregressive image models.
//! A thin main: parse, dispatch, print the error chain on one line, exit non-zero
//! (2 for bad input, 1 for failures while running, 130 when a signal stopped the work).

mod bench;
mod bench_sampling;
mod checkpoint;
mod commands;
mod eval;
mod halving;
mod html;
mod plots;
mod quality;
mod report;
mod run;
mod sample;
mod slurm;
mod status;
mod store;
mod summary;
mod sweep;
mod trained;

use runner::{config, data};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Training allocates and frees tens of MB per step. glibc (and jemalloc's oversize arena)
// hand such blocks back to the OS, and the kernel's zeroing of fresh pages on each reuse then
// costs a large part of a step; mimalloc with purging disabled keeps and reuses them (see
// PERF.md, "Allocator").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (same index in mimalloc v2 and v3).
#[cfg(not(target_env = "msvc"))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[cfg(not(target_env = "msvc"))]
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets a process-wide integer option of the allocator; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // Transparent huge pages: every first touch of a fresh 2 MiB region (a new cache cell, a
    // temporary the allocator has not held before) faults in a whole huge page and zeroes it;
    // cached sampling at batch 256 spent 60% of its time there (PERF.md, "Huge pages").
    #[cfg(target_os = "linux")]
    // SAFETY: a process attribute with integer arguments; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(target_env = "msvc")]
fn keep_freed_memory() {}

/// candle runs element-wise ops on its own pool, whose threads spin 25,000 rounds after each
/// op before parking: on few cores that spinning takes time from the matrix product that
/// follows. 50 rounds, unless the user set the variable (see PERF.md, "candle's element-wise
/// pool"). Read when candle starts that pool, so set first.
fn short_candle_spin() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "50");
    }
}

/// candle and the fused ops ask `candle_core::utils::get_num_threads()` for the thread count
/// at every matrix product and parallel op. Without `RAYON_NUM_THREADS` that call counts the
/// physical cores from /proc each time, which made a cached sampling step of the gated
/// PixelCNN 10x slower (PERF.md, "The thread count, once"). Counted once here instead, and
/// set before rayon's pool starts, so rayon and candle agree on it.
fn count_threads_once() {
    const VAR: &str = "RAYON_NUM_THREADS";
    if std::env::var(VAR).ok().and_then(|v| v.parse::<usize>().ok()).is_none_or(|n| n == 0) {
        std::env::set_var(VAR, candle_core::utils::get_num_threads().to_string());
    }
}

/// `runner report | head` should end quietly, as other command-line tools do, not panic on a
/// closed stdout: restore the default SIGPIPE action that Rust's runtime ignores.
#[cfg(unix)]
#[allow(unsafe_code)]
fn quiet_broken_pipe() {
    // SAFETY: installs the default disposition for one signal before any thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

#[cfg(not(unix))]
fn quiet_broken_pipe() {}

/// Bad input (config, files, flags): exit status 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for BadInput {}

pub fn bad_input(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(BadInput(e.to_string()))
}

/// Work stopped by Ctrl-C, SIGTERM or SIGHUP after checkpointing: exit status 130, as shells
/// expect of an interrupted command.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Interrupted {}

#[derive(Parser)]
#[command(name = "runner", version, about = "Train, sweep and compare autoregressive image models")]
pub struct Cli {
    /// Results folder.
    #[arg(long, global = true, default_value = "results", env = "RUNNER_RESULTS")]
    results: PathBuf,
    /// Device: cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one run of an experiment file (the first seed unless --seed).
    Train {
        file: PathBuf,
        /// Override a key: --set train.lr=0.002 (value read as TOML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Which of the file's seeds (or any seed) to train.
        #[arg(long)]
        seed: Option<u64>,
        /// Continue an unfinished run from its checkpoint (weights, optimiser state, history)
        /// instead of starting it again.
        #[arg(long)]
        resume: bool,
    },
    /// Train every run of an experiment grid (x seeds); finished runs are skipped.
    Sweep {
        file: PathBuf,
        /// Override a key in every run (after the grid and zips): --set train.ema=0.999.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Runs trained at the same time (the cores are split between them).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Take a deterministic share of the runs: I/N (0-based).
        #[arg(long)]
        shard: Option<sweep::Shard>,
        /// List the runs and which are done; train nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stop the sweep at the first failed run.
        #[arg(long)]
        fail_fast: bool,
        /// Continue unfinished runs from their checkpoints instead of restarting them.
        #[arg(long)]
        resume: bool,
    },
    /// NLL comparison table, report.md, validation curves and sample grids.
    Report {
        /// Experiment folders (default: every experiment under --results).
        dirs: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        format: report::Format,
        /// Where report.md and the plots go (default: the experiment folder, or --results
        /// when several experiments are compared).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Images per sample grid.
        #[arg(long, default_value_t = 16)]
        samples: usize,
        /// Also write report.html: one self-contained page (sortable tables, plots, configs).
        #[arg(long)]
        html: bool,
    },
    /// Write an sbatch array script whose task i runs `sweep FILE --shard i/N`.
    Slurm {
        file: PathBuf,
        #[arg(long)]
        array: usize,
        #[arg(long, default_value = "04:00:00")]
        time: String,
        #[arg(long, default_value_t = 2)]
        cpus: usize,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a key in every run, passed on to each task's sweep.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// What a sweep is doing, from its results folder alone: runs by state, the epoch, validation
    /// NLL and time left of the running ones, and the runs not started.
    Status {
        /// A results folder or one experiment folder (default: --results).
        folder: Option<PathBuf>,
        /// Refresh until interrupted.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 5.0)]
        every: f64,
    },
    /// List every conditional plugin and head with its config keys and defaults, and the
    /// pixel orderings.
    List {
        /// Print the masks A and B of a k x k masked convolution (the chapter's Fig. 2.5).
        #[arg(long)]
        masks: bool,
        /// Print each ordering of an 8 x 8 image as a grid of pixel ranks.
        #[arg(long)]
        orderings: bool,
        /// With --orderings: also draw them as heat maps of the rank into this PNG (8x8 and
        /// 28x28 panels).
        #[arg(long, requires = "orderings")]
        plot: Option<PathBuf>,
    },
    /// Draw images from a trained run with a chosen sampler and write a PNG grid.
    Sample {
        /// Run folder (results/<name>/runs/<run-id>).
        run_dir: PathBuf,
        /// Number of images.
        #[arg(long, default_value_t = 16)]
        n: usize,
        /// How to walk the pixels (the same seed gives the same images with each).
        #[arg(long, value_enum, default_value_t = arm_core::Sampler::Cached)]
        sampler: arm_core::Sampler,
        /// Seed of the sampling noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// PNG file (default: RUN_DIR/samples_<sampler>_seed<seed>.png).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Predictive sampler: fit a forecaster of this many pixels ahead to fixed-point
        /// sampling runs of the model first (default 0: the last pass's draws are the
        /// forecasts).
        #[arg(long)]
        offsets: Option<usize>,
    },
    /// Per-image NLL (nats, bits/dim) of a data split under a trained run, to parquet or CSV.
    Eval {
        /// Run folder (results/<name>/runs/<run-id>).
        run_dir: PathBuf,
        /// Data set (default: the run's own; must have the model's shape and levels).
        #[arg(long)]
        data: Option<String>,
        /// Which split of the data.
        #[arg(long, value_enum, default_value_t = arm_data::SplitName::Test)]
        split: arm_data::SplitName,
        /// FILE.parquet or FILE.csv (default: RUN_DIR/eval_<split>.parquet).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Average the probabilities of this many ensemble members (MADE's masks, or the
        /// orderings of a run trained with `data.orderings`; default: the run's own
        /// `eval_masks` / `data.eval_orders`). 1 evaluates the first alone.
        #[arg(long, visible_alias = "orders")]
        members: Option<usize>,
        /// Evaluate ensemble member K alone (0-based: member 0 is the first ordering, mask
        /// set or, for `train.augment_eval = "mixture"`, the identity).
        #[arg(long, value_name = "K", conflicts_with = "members")]
        member: Option<usize>,
        /// A run trained with `train.augment`: evaluate it at the identity or as the transform
        /// mixture (default: the run's own `train.augment_eval`).
        #[arg(long, value_parser = ["identity", "mixture"])]
        augment_eval: Option<String>,
        /// Samples per image of a VAE's importance-weighted bound (default: the run's
        /// `model.vae.iw_samples`).
        #[arg(long)]
        iw_samples: Option<usize>,
    },
    /// The latent representation of a VAE run: q(z|x)'s mean and log-variance per image of a
    /// split, to parquet or CSV (columns index, mu_0.., log_var_0..).
    Encode {
        /// Run folder of a VAE (results/<name>/runs/<run-id>).
        run_dir: PathBuf,
        /// Which split of the run's data.
        #[arg(long, value_enum, default_value_t = arm_data::SplitName::Test)]
        split: arm_data::SplitName,
        /// FILE.parquet or FILE.csv (default: RUN_DIR/latents_<split>.parquet).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmarks: `runner bench train`, `runner bench sampling`.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Seconds per training step against the matmul peak measured in the same run.
    Train {
        /// Timed steps per model (median reported).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Only the models whose label contains this text (e.g. `reference`, `gated`).
        #[arg(long)]
        model: Option<String>,
        /// Also print the milliseconds per step of each phase of the fused CPU ops.
        #[arg(long)]
        profile: bool,
    },
    /// Seconds of the naive, cached and Jacobi samplers per plugin on 8x8 and 28x28 images.
    Sampling {
        /// Limit per naive measurement; beyond it the naive time is extrapolated from a prefix.
        #[arg(long, default_value_t = 20.0)]
        max_seconds: f64,
        /// Images per batch (repeatable: one row per batch size, e.g. --batch 1 --batch 16 --batch 256).
        #[arg(long = "batch", default_values_t = [16])]
        batches: Vec<usize>,
        /// Seed of the weights and the sampling noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Only this plugin (repeatable; default: every registered plugin).
        #[arg(long = "plugin")]
        plugins: Vec<String>,
    },
}

/// Help and version go to stdout as clap prints them; a bad command line is clap's message on
/// one line (its hints joined on), exit status 2, like every other bad input.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let lines: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("For more information")).collect();
    eprintln!("{}", lines.join(" "));
    ExitCode::from(2)
}

fn main() -> ExitCode {
    short_candle_spin();
    count_threads_once();
    keep_freed_memory();
    quiet_broken_pipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            if e.downcast_ref::<BadInput>().is_some() {
                ExitCode::from(2)
            } else if e.downcast_ref::<Interrupted>().is_some() {
                ExitCode::from(130)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
