//! `runner eval RUN_DIR`: per-image log-likelihood of a split under a trained run's best
//! weights, written as parquet or CSV (columns index, nll_nats, bpd), with the mean printed.
//! The mean over the test split is the test NLL that training wrote to status.toml: same
//! weights, same batches (`train.eval_batch_size`), f32 per-image sums accumulated in f64.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use polars::prelude::{df, CsvWriter, DataFrame, SerWriter};

use arm_core::bits_per_dim;
use arm_data::{Dataset, Split, SplitName};

use crate::store;
use crate::{bad_input, trained};

pub struct Options {
    pub data: Option<String>,
    pub split: SplitName,
    pub out: Option<PathBuf>,
    /// Ensemble members to average (MADE's masks); None: the run's own `eval_masks`.
    pub members: Option<usize>,
    /// One member alone (0-based).
    pub member: Option<usize>,
    /// "identity" or "mixture" in place of the run's `train.augment_eval`.
    pub augment_eval: Option<String>,
    /// Samples per image of a VAE's importance-weighted bound; None: the run's `iw_samples`.
    pub iw_samples: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutFormat {
    Parquet,
    Csv,
}

fn out_format(p: &Path) -> Result<OutFormat> {
    match p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("parquet") => Ok(OutFormat::Parquet),
        Some("csv") => Ok(OutFormat::Csv),
        _ => Err(bad_input(format!("--out {}: expected a file ending in .parquet or .csv", p.display()))),
    }
}

/// Per-image NLL frame: index (u32), nll_nats (f64), bpd (f64).
pub fn frame(nll: &[f64], dims: usize) -> Result<DataFrame> {
    Ok(df!(
        "index" => (0..nll.len() as u32).collect::<Vec<_>>(),
        "nll_nats" => nll.to_vec(),
        "bpd" => nll.iter().map(|&v| bits_per_dim(v, dims)).collect::<Vec<_>>(),
    )?)
}

pub fn write_csv(path: &Path, df: &mut DataFrame) -> Result<()> {
    store::atomic_write_with(path, |tmp| {
        let f = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        CsvWriter::new(f).finish(df).with_context(|| format!("{}: cannot write CSV", path.display()))?;
        Ok(())
    })
}

pub fn eval(run_dir: &Path, device: &Device, opts: &Options) -> Result<()> {
    // Flags that need no model are checked first.
    if let Some(out) = &opts.out {
        out_format(out)?;
    }
    let (t, as_trained) = match &opts.augment_eval {
        None => (trained::open(run_dir, device)?, true),
        Some(mode) => trained::open_augmented_as(run_dir, device, mode)?,
    };
    if let crate::run::Model::Vae(vae) = &t.model {
        return eval_vae(run_dir, &t, vae, opts);
    }
    if opts.iw_samples.is_some() {
        return Err(bad_input(format!("--iw-samples: {} holds an ARM, whose NLL is exact (no bound to sample)", run_dir.display())));
    }
    let arm = t.model.arm("--members")?;
    let (default_members, available) = arm.conditional().members();
    let members = opts.members.unwrap_or(default_members);
    if members == 0 || members > available {
        return Err(bad_input(format!(
            "--members / --orders {members}: expected 1..={available}, the members (mask sets or orderings) of the model in {}",
            run_dir.display()
        )));
    }
    if let Some(k) = opts.member.filter(|&k| k >= available) {
        return Err(bad_input(format!(
            "--member {k}: expected 0..={}, the members (mask sets, orderings or transforms) of the model in {}",
            available - 1,
            run_dir.display()
        )));
    }
    let (data_name, data, own) = eval_data(run_dir, &t, opts.data.as_deref())?;
    let split = data.split(opts.split);
    if split.n == 0 {
        return Err(bad_input(format!("--data {data_name} --split {}: the split is empty", opts.split)));
    }
    let out = opts.out.clone().unwrap_or_else(|| {
        let mode = match (&opts.augment_eval, as_trained) {
            (Some(m), false) => format!("_{m}"),
            _ => String::new(),
        };
        if own {
            run_dir.join(format!("eval_{}{mode}.parquet", opts.split))
        } else {
            run_dir.join(format!("eval_{data_name}_{}{mode}.parquet", opts.split))
        }
    });
    let format = out_format(&out)?;
    let nll = per_image_nll(&t, split, device, members, opts.member)?;
    let dims = arm.dims();
    let mean = nll.iter().sum::<f64>() / nll.len() as f64;
    let mut df = frame(&nll, dims)?;
    match format {
        OutFormat::Parquet => store::write_parquet(&out, &mut df)?,
        OutFormat::Csv => write_csv(&out, &mut df)?,
    }
    let ensemble = match opts.member {
        Some(k) => format!(", member {k} of {available} alone"),
        None if available > 1 => format!(", ensemble of {members} of {available} members"),
        None => String::new(),
    };
    if arm.head().likelihood() {
        println!(
            "{data_name} {}: {} images, mean NLL {mean:.6} nats ({:.6} bits/dim){ensemble}",
            opts.split,
            nll.len(),
            bits_per_dim(mean, dims)
        );
    } else {
        // The nll_nats column holds the quantile loss: the head has no likelihood.
        println!("{data_name} {}: {} images, mean quantile loss {mean:.6} (no likelihood: not nats)", opts.split, nll.len());
    }
    if own && as_trained && opts.split == SplitName::Test && members == default_members && opts.member.is_none() {
        if let Some(s) = t.status.as_ref().and_then(|s| s.test_nll) {
            println!("status.toml test figure {s:.6} (relative difference {:.1e})", ((mean - s) / s).abs());
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// Per image of `split`: the ELBO, the importance-weighted bound of `samples` draws and the
/// ELBO's KL term, in nats (log-likelihood bounds, not NLLs), a few images per pass.
pub fn vae_bounds_per_image(vae: &arm_vae::Vae, split: &Split, samples: usize) -> Result<arm_vae::Bounds> {
    let mut all = arm_vae::Bounds::default();
    let dev = arm_train::Model::device(vae).clone();
    // About 1024 (image, sample) rows per pass.
    let per = (1024 / samples).max(1);
    for x in split.batches(per, &dev) {
        let b = arm_train::in_pool(&dev, || vae.bounds(&x?, samples))?;
        all.elbo.extend(b.elbo);
        all.iw.extend(b.iw);
        all.kl.extend(b.kl);
    }
    Ok(all)
}

/// The means over `split` of the ELBO, the importance-weighted bound and the KL term (nats
/// per image).
pub fn vae_bounds(vae: &arm_vae::Vae, split: &Split, samples: usize) -> Result<(f64, f64, f64)> {
    let b = vae_bounds_per_image(vae, split, samples)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok((mean(&b.elbo), mean(&b.iw), mean(&b.kl)))
}

/// `runner eval` of a VAE run: per image, minus the importance-weighted bound (nll_nats, an
/// upper bound of the NLL), bits/dim, minus the ELBO (neg_elbo_nats) and its KL term (kl_nats).
fn eval_vae(run_dir: &Path, t: &trained::Trained, vae: &arm_vae::Vae, opts: &Options) -> Result<()> {
    if opts.members.is_some() || opts.member.is_some() {
        let flag = if opts.member.is_some() { "--member" } else { "--members / --orders" };
        return Err(bad_input(format!("{flag}: {} holds a VAE, which has no ensemble", run_dir.display())));
    }
    let samples = opts.iw_samples.unwrap_or(vae.config().iw_samples);
    if samples == 0 {
        return Err(bad_input("--iw-samples 0: expected at least 1"));
    }
    let (data_name, data, own) = eval_data(run_dir, t, opts.data.as_deref())?;
    let split = data.split(opts.split);
    if split.n == 0 {
        return Err(bad_input(format!("--data {data_name} --split {}: the split is empty", opts.split)));
    }
    let out = opts.out.clone().unwrap_or_else(|| {
        let tag = if own { String::new() } else { format!("{data_name}_") };
        run_dir.join(format!("eval_{tag}{}.parquet", opts.split))
    });
    let format = out_format(&out)?;
    let b = vae_bounds_per_image(vae, split, samples)?;
    let nll: Vec<f64> = b.iw.iter().map(|v| -v).collect();
    let neg_elbo: Vec<f64> = b.elbo.iter().map(|v| -v).collect();
    let mut df = frame(&nll, vae.dims())?;
    df.with_column(polars::prelude::Column::new("neg_elbo_nats".into(), neg_elbo.clone()))?;
    df.with_column(polars::prelude::Column::new("kl_nats".into(), b.kl.clone()))?;
    match format {
        OutFormat::Parquet => store::write_parquet(&out, &mut df)?,
        OutFormat::Csv => write_csv(&out, &mut df)?,
    }
    let n = nll.len() as f64;
    let (mean, mean_elbo) = (nll.iter().sum::<f64>() / n, neg_elbo.iter().sum::<f64>() / n);
    let mean_kl = b.kl.iter().sum::<f64>() / n;
    println!(
        "{data_name} {}: {} images, NLL <= {mean:.6} nats ({:.6} bits/dim; importance-weighted bound, {samples} samples), -ELBO {mean_elbo:.6} (KL term {mean_kl:.4})",
        opts.split,
        nll.len(),
        bits_per_dim(mean, vae.dims())
    );
    if own && opts.split == SplitName::Test && samples == vae.config().iw_samples {
        if let Some(s) = t.status.as_ref().and_then(|s| s.test_nll) {
            println!("status.toml test figure {s:.6} (relative difference {:.1e})", ((mean - s) / s).abs());
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// `runner encode`: q(z|x)'s mean and log-variance for every image of a split of a VAE run's
/// own data.
pub fn encode(run_dir: &Path, device: &Device, split: SplitName, out: Option<PathBuf>) -> Result<()> {
    if let Some(o) = &out {
        out_format(o)?;
    }
    let t = trained::open(run_dir, device)?;
    let crate::run::Model::Vae(vae) = &t.model else {
        return Err(bad_input(format!("{}: an ARM has no latent representation (runner encode takes VAE runs)", run_dir.display())));
    };
    let data = t.data.split(split);
    if data.n == 0 {
        return Err(bad_input(format!("--split {split}: the split is empty")));
    }
    let out = out.unwrap_or_else(|| run_dir.join(format!("latents_{split}.parquet")));
    let z = vae.latent();
    let (mut mu, mut lv) = (vec![Vec::with_capacity(data.n); z], vec![Vec::with_capacity(data.n); z]);
    for x in data.batches(t.cfg.train.eval_batch_size, device) {
        let (m, v) = vae.encode(&x?)?; // (B, Z) each
        for (cols, t) in [(&mut mu, m), (&mut lv, v)] {
            for row in t.to_dtype(DType::F64)?.to_vec2::<f64>()? {
                for (j, val) in row.into_iter().enumerate() {
                    cols[j].push(val);
                }
            }
        }
    }
    let mut columns = vec![polars::prelude::Column::new("index".into(), (0..data.n as u32).collect::<Vec<_>>())];
    for (j, c) in mu.into_iter().enumerate() {
        columns.push(polars::prelude::Column::new(format!("mu_{j}").into(), c));
    }
    for (j, c) in lv.into_iter().enumerate() {
        columns.push(polars::prelude::Column::new(format!("log_var_{j}").into(), c));
    }
    let mut df = DataFrame::new(data.n, columns)?;
    match out_format(&out)? {
        OutFormat::Parquet => store::write_parquet(&out, &mut df)?,
        OutFormat::Csv => write_csv(&out, &mut df)?,
    }
    println!("{} {split}: {} images, {z} latent dimensions (mean and log-variance of q(z|x))", t.data.name, data.n);
    println!("wrote {}", out.display());
    Ok(())
}

/// The data to evaluate on: the run's own (an embedded set or its user file), or another
/// embedded set of the model's shape and levels. Returns (name, data, whether it is the run's own).
fn eval_data(run_dir: &Path, t: &trained::Trained, name: Option<&str>) -> Result<(String, Dataset, bool)> {
    let other = match name {
        Some(d) if d != t.cfg.data.name => d,
        _ => return Ok((t.data.name.clone(), t.data.clone(), true)),
    };
    let (h, w, levels) = arm_data::shape_of(other).ok_or_else(|| {
        bad_input(format!("--data {other:?}: unknown data set: expected one of {}", arm_data::DATASET_NAMES.join(", ")))
    })?;
    let ((mh, mw), ml) = (t.model.shape(), t.model.levels());
    if (h, w, levels) != (mh, mw, ml) {
        return Err(bad_input(format!(
            "--data {other}: {h}x{w} images with {levels} levels, but the model in {} was built for {mh}x{mw} with {ml} levels ({})",
            run_dir.display(),
            t.cfg.data.name
        )));
    }
    Ok((other.to_string(), arm_data::load(other)?, false))
}

/// Per-image NLL in nats, in the batches training evaluated with.
/// -log p per image of the ensemble of the first `members`, or of member `one` alone.
fn per_image_nll(
    t: &trained::Trained,
    split: &Split,
    device: &Device,
    members: usize,
    one: Option<usize>,
) -> Result<Vec<f64>> {
    let mut nll = Vec::with_capacity(split.n);
    let arm = t.model.arm("per-image NLL")?;
    for x in split.batches(t.cfg.train.eval_batch_size, device) {
        let x = x?;
        let lp = match one {
            Some(k) => arm.log_prob_member(&x, k)?,
            None => arm.log_prob_members(&x, members)?,
        }; // (B,) nats
        nll.extend(lp.to_dtype(DType::F64)?.to_vec1::<f64>()?.into_iter().map(|v| -v));
    }
    Ok(nll)
}
