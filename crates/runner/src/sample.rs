//! `runner sample RUN_DIR`: draws images from a trained run with a chosen sampler (naive,
//! cached, Jacobi or predictive) and writes them as a PNG grid. The noise comes from `--seed`,
//! so every sampler gives the same images (and the same PNG bytes) for one seed; only the time
//! and the number of network calls differ. With `--offsets T` the predictive sampler first fits
//! a forecaster to fixed-point sampling runs of the model (timed apart from sampling).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

use arm_core::{FitOptions, Forecaster, Sampler};

use crate::{bad_input, plots, trained};

pub struct Options {
    pub n: usize,
    pub sampler: Sampler,
    pub seed: u64,
    pub out: Option<PathBuf>,
    /// Predictive sampler: pixels a fitted forecaster predicts ahead (None or 0: fixed-point
    /// forecasts only).
    pub offsets: Option<usize>,
}

pub fn sample(run_dir: &std::path::Path, device: &Device, opts: &Options) -> Result<()> {
    // Flags first: a bad flag is reported before any model is built.
    let sampler = opts.sampler;
    if opts.n == 0 {
        return Err(bad_input("--n: must be at least 1, got 0"));
    }
    if opts.offsets.is_some() && sampler != Sampler::Predictive {
        return Err(bad_input(format!("--offsets: only the predictive sampler forecasts, not {sampler}")));
    }
    let mut t = trained::open(run_dir, device)?;
    if sampler == Sampler::Predictive {
        fit_forecaster(&mut t, opts)?;
    }
    let out = opts.out.clone().unwrap_or_else(|| run_dir.join(format!("samples_{sampler}_seed{}.png", opts.seed)));
    let t0 = Instant::now();
    let (imgs, iterations, calls) = t.model.draw(opts.n, opts.seed, sampler)?;
    let secs = t0.elapsed().as_secs_f64();
    // The title names no sampler, so every sampler writes the same bytes for the same seed.
    let title = format!("{} samples (seed {})", crate::run::model_label(&t.cfg), opts.seed);
    let (shape, levels) = (t.model.shape(), t.model.levels());
    plots::sample_grid(&out, &title, &imgs, shape, levels)?;
    let d = shape.0 * shape.1;
    let passes = match sampler {
        Sampler::Jacobi => format!("; {iterations} parallel iterations (of at most {d})"),
        Sampler::Predictive => {
            format!("; {calls:.2} network calls per image (of {d}), {iterations} for the slowest")
        }
        _ => format!("; {iterations} sequential steps"),
    };
    let q = crate::quality::against_test(&imgs, &t.data);
    let fig = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    println!(
        "quality against the first {} test images: sample W1 {}, sample MMD² {}",
        t.data.test.n.min(crate::quality::TEST_IMAGES),
        fig(q.w1),
        fig(q.mmd2)
    );
    println!(
        "sampler {sampler}: {} images of {}x{} in {secs:.3} s ({:.3} ms per image){passes}\nwrote {}",
        opts.n,
        shape.0,
        shape.1,
        1e3 * secs / opts.n as f64,
        out.display()
    );
    Ok(())
}

/// Fits the predictive sampler's forecaster to fixed-point sampling runs of the model (seeded
/// with the sampling seed) and gives it to the model.
fn fit_forecaster(t: &mut trained::Trained, opts: &Options) -> Result<()> {
    let arm = match &mut t.model {
        crate::run::Model::Arm(arm) => arm,
        crate::run::Model::Augmented(m) => m.arm_mut(),
        crate::run::Model::Vae(_) => {
            return Err(bad_input("--sampler predictive: a VAE's decoder samples with naive, cached or jacobi"))
        }
    };
    let d = arm.dims();
    let fit = FitOptions::for_shape(arm.shape(), opts.seed);
    let offsets = opts.offsets.unwrap_or(0);
    if offsets >= d {
        return Err(bad_input(format!("--offsets: must be below the {d} pixels of an image, got {offsets}")));
    }
    if offsets == 0 {
        println!("forecaster: none (fixed-point forecasts only)");
        return Ok(());
    }
    let t0 = Instant::now();
    let images = fit.images;
    match Forecaster::fit(arm, &FitOptions { offsets, ..fit })? {
        None => println!("forecaster: none (every image of the fitting runs settled in one pass)"),
        Some((fc, report)) => {
            println!(
                "forecaster: {offsets} pixels ahead, fitted to {} states of {images} fixed-point sampling runs in {:.2} s; forecast NLL {:.3} -> {:.3} nats per pixel",
                report.states,
                t0.elapsed().as_secs_f64(),
                report.initial_nll,
                report.fitted_nll
            );
            arm.set_forecaster(Some(fc));
        }
    }
    Ok(())
}
