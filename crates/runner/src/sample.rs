//! `runner sample RUN_DIR`: draws images from a trained run with a chosen sampler (naive,
//! cached or Jacobi) and writes them as a PNG grid. The noise comes from `--seed`, so the three
//! samplers give the same images (and the same PNG bytes) for one seed; only the time differs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

use arm_core::Sampler;

use crate::{bad_input, plots, trained};

pub struct Options {
    pub n: usize,
    pub sampler: Sampler,
    pub seed: u64,
    pub out: Option<PathBuf>,
}

pub fn sample(run_dir: &std::path::Path, device: &Device, opts: &Options) -> Result<()> {
    // Flags first: a bad flag is reported before any model is built.
    let sampler = opts.sampler;
    if opts.n == 0 {
        return Err(bad_input("--n: must be at least 1, got 0"));
    }
    let t = trained::open(run_dir, device)?;
    let out = opts.out.clone().unwrap_or_else(|| run_dir.join(format!("samples_{sampler}_seed{}.png", opts.seed)));
    let t0 = Instant::now();
    let (imgs, iterations) = crate::run::draw_samples(&t.arm, opts.n, opts.seed, sampler)?;
    let secs = t0.elapsed().as_secs_f64();
    // The title names no sampler, so every sampler writes the same bytes for the same seed.
    let title = format!("{} samples (seed {})", t.cfg.model.backend, opts.seed);
    plots::sample_grid(&out, &title, &imgs, t.arm.shape(), t.arm.levels())?;
    let d = t.arm.dims();
    let passes = match sampler {
        Sampler::Jacobi => format!("; {iterations} parallel iterations (of at most {d})"),
        _ => format!("; {iterations} sequential steps"),
    };
    println!(
        "sampler {sampler}: {} images of {}x{} in {secs:.3} s ({:.3} ms per image){passes}\nwrote {}",
        opts.n,
        t.arm.shape().0,
        t.arm.shape().1,
        1e3 * secs / opts.n as f64,
        out.display()
    );
    Ok(())
}
