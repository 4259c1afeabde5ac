//! `runner bench sampling`: seconds to draw a batch of images with the naive, cached, Jacobi
//! and predictive samplers, for every registered plugin (its default config, seeded random
//! weights, a categorical head) on 8x8 digits (17 levels) and 28x28 binary images (2 levels).
//! Speedups are ratios within one run, so machine noise moves numerator and denominator alike.
//! The samplers get the same noise and must return the same images; the table says whether
//! they did. The predictive sampler runs with fixed-point forecasts; its column gives the mean
//! network calls per image.
//!
//! The naive sampler does one full forward pass per pixel (quadratic in D). When D passes
//! would exceed `--max-seconds`, it is run for a prefix of the pixels only and its time is
//! extrapolated linearly (every naive step is the same full pass), marked `~` in the table.
//!
//! FLOPs: with F the matrix-product FLOPs of one forward pass per image (as `bench train`
//! counts them), the naive sampler does D F per image, Jacobi (iterations) F, and the cached
//! steppers F: each computes every layer's output once per position. (A cached attention layer
//! scores each pixel against the earlier ones only, half of the forward's T x T count, so for
//! the attention plugins F overstates it.) GFLOP/s and % of the matmul peak (a 1024^3 product
//! timed before the table; it is timed again after, to show drift) are the cached sampler's.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use arm_core::{Arm, NaiveStepper, Sampler, Stepper};

use crate::config::{DataConfig, ModelConfig, RunConfig, SampleConfig};

pub struct Options {
    /// Limit for one naive measurement before it is cut short and extrapolated.
    pub max_seconds: f64,
    /// One row per batch size.
    pub batches: Vec<usize>,
    pub seed: u64,
    /// Only these plugins (default: every registered plugin).
    pub plugins: Vec<String>,
}

/// (label, data set whose shape and levels are used): 8x8 with 17 levels, 28x28 with 2.
const SHAPES: [(&str, &str); 2] = [("8x8", "digits"), ("28x28", "mnist10k-binary")];

/// The plugin `name` with its default config on data set `data`, as a run config.
fn case_config(name: &str, defaults: toml::Table, data: &str, seed: u64) -> RunConfig {
    RunConfig {
        name: "bench".into(),
        seed,
        data: DataConfig { name: data.into(), ordering: Default::default(), ..Default::default() },
        model: ModelConfig {
            backend: name.into(),
            head: "categorical".into(),
            plugin: defaults,
            head_table: Default::default(),
            vae: None,
        },
        train: Default::default(),
        sample: SampleConfig::default(),
        grid: vec![],
    }
}

/// Seconds of the fastest of up to `reps` runs of `f` (fewer when one run takes over a second).
fn time_best<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let t0 = Instant::now();
    let mut out = f()?;
    let mut best = t0.elapsed().as_secs_f64();
    for _ in 1..reps {
        if best > 1.0 {
            break;
        }
        let t0 = Instant::now();
        out = f()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok((best, out))
}

struct Naive {
    seconds: f64,
    /// Pixels actually sampled (D when complete).
    steps: usize,
    /// (B, steps) in sequence order.
    seq: Tensor,
}

/// The naive sampler (one full forward pass per pixel), as `Arm::sample(.., Naive)` runs it, but
/// stopped once `max_seconds` have passed; the time is then extrapolated to all D pixels.
fn naive_budgeted(arm: &Arm, noise: &Tensor, max_seconds: f64) -> Result<Naive> {
    let (b, d, _) = noise.dims3()?;
    let scale = 1.0 / (arm.levels() - 1) as f64;
    let mut st = NaiveStepper::new(arm.conditional(), b)?;
    let mut cols = Vec::with_capacity(d);
    let t0 = Instant::now();
    for i in 0..d {
        let params = st.params()?; // (B, P)
        let u = noise.narrow(1, i, 1)?.squeeze(1)?; // (B, Q)
        let x = arm.head().sample(&params, &u)?; // (B,)
        st.push(&x.affine(scale, 0.0)?)?;
        cols.push(x);
        if t0.elapsed().as_secs_f64() >= max_seconds {
            break;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Naive { seconds: seconds * d as f64 / cols.len() as f64, steps: cols.len(), seq: Tensor::stack(&cols, 1)? })
}

fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(a.dims() == b.dims() && a.ne(b)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? == 0.0)
}

struct Row {
    plugin: String,
    image: String,
    batch: usize,
    cells: std::result::Result<Cells, String>,
}

struct Cells {
    fwd: f64,
    naive: f64,
    naive_steps: usize,
    cached: f64,
    jacobi: f64,
    iterations: usize,
    predictive: f64,
    /// Mean network calls per image of the predictive sampler.
    calls: f64,
    dims: usize,
    /// F: forward matrix-product FLOPs per image.
    flops_image: f64,
    identical: String,
}

fn measure(cfg: &RunConfig, dev: &Device, opts: &Options, b: usize) -> Result<Cells> {
    let (arm, map, _data) = crate::run::build(cfg, dev)?;
    let d = arm.dims();
    let noise = crate::run::sample_noise(&arm, b, opts.seed)?; // (B, D, Q)
                                                               // One full parallel pass: what each naive step and each Jacobi iteration costs. An untimed
                                                               // first call warms up the allocator (the largest buffers of the whole benchmark).
    let zeros = Tensor::zeros((b, d), DType::F32, dev)?;
    let _ = arm.conditional().forward_t(&zeros, false)?;
    let (fwd, _) = time_best(3, || {
        let o = arm.conditional().forward_t(&zeros, false)?;
        dev.synchronize()?;
        Ok(o)
    })?;
    let (cached, c) = time_best(3, || Ok(arm.sample(&noise, Sampler::Cached)?))?;
    let (jacobi, j) = time_best(3, || Ok(arm.sample(&noise, Sampler::Jacobi)?))?;
    let (predictive, pr) = time_best(3, || Ok(arm.sample(&noise, Sampler::Predictive)?))?;
    // The full naive sampler of the library when it fits the limit (estimated from `fwd`),
    // else a budgeted prefix.
    let naive = if fwd * d as f64 <= opts.max_seconds {
        let t0 = Instant::now();
        let n = arm.sample(&noise, Sampler::Naive)?;
        Naive { seconds: t0.elapsed().as_secs_f64(), steps: d, seq: arm.to_sequence(&n.images)? }
    } else {
        naive_budgeted(&arm, &noise, opts.max_seconds)?
    };
    let cached_seq = arm.to_sequence(&c.images)?; // (B, D) sequence order
    let parallel = same(&c.images, &j.images)? && same(&c.images, &pr.images)?;
    let cn = same(&cached_seq.narrow(1, 0, naive.steps)?, &naive.seq)?;
    let identical = match (parallel, cn, naive.steps == d) {
        (true, true, true) => "yes".to_string(),
        (true, true, false) => format!("yes (naive: first {} px)", naive.steps),
        (false, _, _) => "NO: jacobi or predictive != cached".to_string(),
        (true, false, _) => "NO: naive != cached".to_string(),
    };
    Ok(Cells {
        fwd,
        naive: naive.seconds,
        naive_steps: naive.steps,
        cached,
        jacobi,
        iterations: j.iterations,
        predictive,
        calls: pr.calls,
        dims: d,
        flops_image: crate::bench::forward_flops_per_image(&arm, &map),
        identical,
    })
}

pub fn bench_sampling(dev: &Device, opts: &Options) -> Result<()> {
    let registry = arm_backends::registry();
    for p in &opts.plugins {
        if !registry.iter().any(|r| r.name == p) {
            return Err(crate::bad_input(format!(
                "--plugin {p:?}: unknown plugin: expected one of {}",
                arm_backends::plugin_names().join(", ")
            )));
        }
    }
    if opts.batches.contains(&0) {
        return Err(crate::bad_input("--batch: must be at least 1, got 0"));
    }
    if !(opts.max_seconds.is_finite() && opts.max_seconds > 0.0) {
        return Err(crate::bad_input(format!("--max-seconds: must be a positive number, got {}", opts.max_seconds)));
    }
    let peak_before = crate::bench::matmul_gflops(1024, 1024, 1024, 10, dev)?;
    println!(
        "sampling with default plugin configs, seeded random weights (seed {}), categorical head; naive limited to {} s",
        opts.seed, opts.max_seconds
    );
    let mut rows = Vec::new();
    for plugin in registry.iter().filter(|p| opts.plugins.is_empty() || opts.plugins.iter().any(|n| n == p.name)) {
        for (label, data) in SHAPES {
            for &batch in &opts.batches {
                let (h, w, _) = arm_data::shape_of(data).unwrap_or((0, 0, 0));
                let cells = plugin
                    .resolve(&plugin.defaults(), h, w)
                    .map_err(|e| format!("default config invalid for {label}: {e}"))
                    .and_then(|resolved| {
                        measure(&case_config(plugin.name, resolved, data, opts.seed), dev, opts, batch)
                            .map_err(|e| format!("{e:#}"))
                    });
                let row = Row { plugin: plugin.name.to_string(), image: label.to_string(), batch, cells };
                print_row(&row, rows.is_empty(), peak_before);
                rows.push(row);
            }
        }
    }
    let peak_after = crate::bench::matmul_gflops(1024, 1024, 1024, 10, dev)?;
    println!("\nmatmul peak (1024^3): {peak_before:.1} GFLOP/s before the table (% peak), {peak_after:.1} after");
    println!("\n~ extrapolated: the naive sampler ran for the first N of D pixels within --max-seconds, and its");
    println!("  time is scaled by D/N (each naive step is the same full forward pass). fwd s: one parallel pass.");
    println!(
        "  Jacobi iterations (it) depend on the weights: random weights settle in few; trained ones can take more."
    );
    println!("  pred: the predictive sampler with fixed-point forecasts; calls/im = its mean network calls per image.");
    let reference = |r: &&Row| r.plugin == "causal_conv1d" && r.image == "8x8";
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let row = rows.iter().filter(reference).find(|r| r.batch == 16).or_else(|| rows.iter().find(reference));
    if let Some(Row { cells: Ok(c), batch, .. }) = row {
        let x = c.naive / c.cached;
        println!(
            "target: cached sampling of the reference causal Conv1d network, {batch} images of 8x8, at least 30x faster than naive: {x:.1}x, {}",
            met(x >= 30.0)
        );
    }
    if let Some(Row { cells: Ok(c), batch, .. }) = rows.iter().filter(reference).find(|r| r.batch == 256) {
        let pct = 100.0 * c.flops_image * *batch as f64 / c.cached / 1e9 / peak_before;
        println!(
            "target: the same network's cached sampler at batch 256, at least 25% of the matmul peak: {pct:.1}%, {}",
            met(pct >= 25.0)
        );
    }
    Ok(())
}

fn print_row(r: &Row, header: bool, peak: f64) {
    if header {
        println!(
            "\n{:<16} {:>6} {:>5} {:>10} {:>9} {:>9} {:>15} {:>17} {:>9} {:>9} {:>12} {:>9} {:>10} {:>7}  same images",
            "plugin",
            "image",
            "batch",
            "naive s",
            "fwd s",
            "cached s",
            "jacobi s (it)",
            "pred s (calls/im)",
            "cached x",
            "jacobi x",
            "cached ms/px",
            "GFLOP/im",
            "cached GF/s",
            "% peak",
        );
    }
    match &r.cells {
        Err(e) => println!("{:<16} {:>6} {:>5} skipped: {e}", r.plugin, r.image, r.batch),
        Ok(c) => {
            let naive = if c.naive_steps == c.dims { format!("{:.3}", c.naive) } else { format!("~{:.1}", c.naive) };
            let gflops = c.flops_image * r.batch as f64 / c.cached / 1e9;
            println!(
                "{:<16} {:>6} {:>5} {:>10} {:>9.4} {:>9.4} {:>15} {:>17} {:>8.1}x {:>8.1}x {:>12.4} {:>9.4} {:>10.2} {:>6.2}%  {}",
                r.plugin,
                r.image,
                r.batch,
                naive,
                c.fwd,
                c.cached,
                format!("{:.4} ({})", c.jacobi, c.iterations),
                format!("{:.4} ({:.1})", c.predictive, c.calls),
                c.naive / c.cached,
                c.naive / c.jacobi,
                1e3 * c.cached / c.dims as f64,
                c.flops_image / 1e9,
                gflops,
                100.0 * gflops / peak,
                c.identical
            );
        }
    }
}
