//! `runner report`: NLL tables grouped by grid point (mean +- std and a 95% confidence
//! interval over seeds, nats and bits per dim, sorted by test NLL, best marked), failed runs,
//! `report.md`, `nll_curves.png` (`nll_curves_<data>.png` per data set when there are several;
//! validation NLL per epoch, mean over seeds with a min-max
//! band) and one sample grid per config.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;

use arm_core::Sampler;

use crate::plots::{self, Series};
use crate::run::Figure;
use crate::store;
use crate::summary::{self, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Markdown,
    Csv,
}

/// Two-sided 97.5% quantile of Student's t with `df` degrees of freedom (scipy.stats.t.ppf).
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    if df == 0 {
        f64::NAN
    } else {
        T.get(df - 1).copied().unwrap_or(1.960)
    }
}

/// Mean, sample standard deviation and 95% CI half-width of `v`.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let std = var.sqrt();
    (mean, std, t975(v.len() - 1) * std / n.sqrt())
}

pub(crate) struct Group {
    pub(crate) experiment: String,
    pub(crate) label: String,
    pub(crate) runs: Vec<Row>,
}

impl Group {
    fn finished(&self) -> Vec<&Row> {
        self.runs.iter().filter(|r| r.status.is_finished()).collect()
    }
    fn values(&self, f: fn(&Row) -> Option<f64>) -> Vec<f64> {
        self.finished().into_iter().filter_map(f).collect()
    }
    fn test_mean(&self) -> f64 {
        let v = self.values(|r| r.status.test_nll);
        stats(&v).0
    }
    /// Whether the group's test figure is an NLL (false for a head without a likelihood, whose
    /// runs record their test loss there).
    fn likelihood(&self) -> bool {
        self.figure().likelihood
    }
    fn figure(&self) -> crate::run::Figure {
        crate::run::figure(self.runs.first().map_or("", |r| r.config.model.head.as_str()))
    }
    fn slug(&self) -> String {
        let s: String = format!("{}_{}", self.experiment, self.label)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "=-_.".contains(c) { c } else { '_' })
            .collect();
        s.chars().take(100).collect()
    }
}

/// Experiment folders to report: the given ones, or every folder under `results` with runs.
pub fn experiment_dirs(results: &Path, dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if !dirs.is_empty() {
        for d in dirs {
            if !d.join("runs").is_dir() {
                return Err(crate::bad_input(format!("{}: not an experiment folder (no runs/ inside)", d.display())));
            }
        }
        return Ok(dirs.to_vec());
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(results)
        .map_err(|e| crate::bad_input(format!("{}: cannot read the results folder: {e}", results.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("runs").is_dir())
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(crate::bad_input(format!(
            "{}: no experiments found (run `runner sweep FILE` first)",
            results.display()
        )));
    }
    Ok(out)
}

fn fmt_pm(v: &[f64], prec: usize) -> (String, String) {
    let (m, s, ci) = stats(v);
    if v.is_empty() {
        return ("-".into(), "-".into());
    }
    let pm = if s.is_nan() { format!("{m:.prec$}") } else { format!("{m:.prec$} ± {s:.prec$}") };
    let ci = if ci.is_nan() { "-".into() } else { format!("[{:.prec$}, {:.prec$}]", m - ci, m + ci) };
    (pm, ci)
}

pub(crate) struct Table {
    pub(crate) header: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
}

impl Table {
    fn render(&self, format: Format) -> String {
        let mut out = String::new();
        match format {
            Format::Csv => {
                let esc = |s: &str| {
                    if s.contains([',', '"']) {
                        format!("\"{}\"", s.replace('"', "\"\""))
                    } else {
                        s.to_string()
                    }
                };
                let _ = writeln!(out, "{}", self.header.iter().map(|h| esc(h)).collect::<Vec<_>>().join(","));
                for r in &self.rows {
                    let _ = writeln!(out, "{}", r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(","));
                }
            }
            Format::Markdown => {
                let _ = writeln!(out, "| {} |", self.header.join(" | "));
                let _ = writeln!(out, "|{}|", self.header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
                for r in &self.rows {
                    let _ = writeln!(out, "| {} |", r.join(" | "));
                }
            }
            Format::Table => {
                let w: Vec<usize> = (0..self.header.len())
                    .map(|i| {
                        self.rows
                            .iter()
                            .map(|r| r[i].chars().count())
                            .chain([self.header[i].chars().count()])
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                let line = |cells: &[String]| {
                    cells.iter().zip(&w).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ")
                };
                let _ = writeln!(out, "{}", line(&self.header).trim_end());
                let _ = writeln!(out, "{}", w.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
                for r in &self.rows {
                    let _ = writeln!(out, "{}", line(r).trim_end());
                }
            }
        }
        out
    }
}

pub struct Options {
    pub format: Format,
    pub out: Option<PathBuf>,
    pub samples: usize,
    /// Also write the self-contained `report.html` (see html.rs).
    pub html: bool,
}

pub fn report(results: &Path, dirs: &[PathBuf], device: &Device, opts: &Options) -> Result<()> {
    let exp_dirs = experiment_dirs(results, dirs)?;
    let mut rows = Vec::new();
    for d in &exp_dirs {
        rows.extend(summary::rebuild(d)?);
    }
    if rows.is_empty() {
        return Err(crate::bad_input("no runs found in the selected experiments"));
    }
    let out_dir =
        opts.out
            .clone()
            .unwrap_or_else(|| if exp_dirs.len() == 1 { exp_dirs[0].clone() } else { results.to_path_buf() });
    let multi = exp_dirs.len() > 1;
    let groups = groups(rows);
    let mixtures: Vec<Vec<f64>> =
        groups.iter().map(|g| g.finished().iter().filter_map(|r| mixture_test_nll(&exp_dirs, r)).collect()).collect();
    let table = nll_table(&groups, &mixtures, multi);
    let problems = problem_lines(&groups);
    print_table(&table, &problems, opts.format);

    std::fs::create_dir_all(&out_dir)?;
    let curves = write_curves(&out_dir, &curve_series(&groups, &exp_dirs, multi))?;
    let mut written = curves.clone();
    let sample_dir = out_dir.join("samples");
    let sample_files = write_sample_grids(&groups, &exp_dirs, &sample_dir, device, opts.samples)?;
    let md = markdown(&exp_dirs, &out_dir, &table, &problems, &written, &sample_files);
    let md_path = out_dir.join("report.md");
    store::atomic_write(&md_path, md.as_bytes())?;
    written.push(md_path);
    if opts.html {
        let input = crate::html::Input {
            exp_dirs: &exp_dirs,
            out_dir: &out_dir,
            groups: &groups,
            table: &table,
            curves: &curves,
            samples: &sample_files,
            n_real: opts.samples,
        };
        written.push(crate::html::write(&input)?);
    }
    eprintln!(
        "wrote {} and {} sample grid(s) in {}",
        written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        sample_files.len(),
        sample_dir.display()
    );
    Ok(())
}

/// Runs grouped by experiment and grid point (every key but the seed), best mean test NLL first.
fn groups(rows: Vec<Row>) -> Vec<Group> {
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    for r in rows {
        let key = (r.experiment.clone(), r.grid_label());
        groups
            .entry(key.clone())
            .or_insert_with(|| Group { experiment: key.0, label: key.1, runs: vec![] })
            .runs
            .push(r);
    }
    let mut groups: Vec<Group> = groups.into_values().collect();
    // NLLs first, best first; losses of heads without a likelihood do not rank with them.
    groups.sort_by(|a, b| (!a.likelihood()).cmp(&!b.likelihood()).then(a.test_mean().total_cmp(&b.test_mean())));
    groups
}

/// The test NLL of a run trained with `train.augment` as its transform mixture: its own test
/// figure when it was trained with `augment_eval = "mixture"`, else the mean of the
/// `eval_test_mixture.parquet` that `runner eval RUN --augment-eval mixture` wrote (training
/// removes it when it replaces the weights).
fn mixture_test_nll(exp_dirs: &[PathBuf], r: &Row) -> Option<f64> {
    if r.config.train.augment.is_empty() {
        return None;
    }
    if r.config.train.augment_eval == arm_train::AugmentEval::Mixture {
        return r.status.test_nll;
    }
    let df = store::read_parquet(&results_run_dir(exp_dirs, r).join("eval_test_mixture.parquet")).ok()?;
    let col = df.column("nll_nats").ok()?.f64().ok()?;
    if col.is_empty() || col.null_count() > 0 {
        return None;
    }
    let nll = col.into_no_null_iter().sum::<f64>() / col.len() as f64;
    nll.is_finite().then_some(nll)
}

/// One row per group: seeds finished, NLLs (mean ± std, CI), parameters, epochs, sample
/// quality; `*` marks the best NLL, `‡` a test loss that is not an NLL. `multi` adds the
/// experiment column; `mixtures[g]` (the finished runs' transform-mixture test NLLs) a column
/// of their own when any group has them.
fn nll_table(groups: &[Group], mixtures: &[Vec<f64>], multi: bool) -> Table {
    let best = groups.iter().position(|g| g.likelihood() && g.test_mean().is_finite());
    let mut header: Vec<String> = vec![" ".into()];
    if multi {
        header.push("experiment".into());
    }
    header.extend(
        [
            "config",
            "seeds",
            "test NLL (nats)",
            "95% CI",
            "NLL is",
            "test -ELBO",
            "KL",
            "test bits/dim",
            "best val NLL",
            "params",
            "epochs",
            "sample W1",
            "sample MMD²",
        ]
        .map(String::from),
    );
    // The mixture's column goes beside the CI, before the last nine ("NLL is" .. MMD²).
    let mixture_at = mixtures.iter().any(|m| !m.is_empty()).then(|| header.len() - 9);
    if let Some(at) = mixture_at {
        header.insert(at, "mixture test NLL".into());
    }
    let mut table = Table { header, rows: vec![] };
    for (i, g) in groups.iter().enumerate() {
        let fin = g.finished();
        let (mut test, ci) = fmt_pm(&g.values(|r| r.status.test_nll), 2);
        if !g.likelihood() && test != "-" {
            test.push_str(" ‡");
        }
        let (w1, _) = fmt_pm(&g.values(|r| r.status.sample_w1), 4);
        let (mmd, _) = fmt_pm(&g.values(|r| r.status.sample_mmd2), 4);
        let (bpd, _) = fmt_pm(&g.values(|r| r.status.test_bpd), 4);
        let (elbo, _) = fmt_pm(&g.values(|r| r.status.test_elbo), 2);
        let (kl, _) = fmt_pm(&g.values(|r| r.status.test_kl), 2);
        // A VAE's NLL is an upper bound (its importance-weighted bound); an ARM's is exact.
        let kind = match fin.first() {
            None => "-".to_string(),
            Some(_) if !g.likelihood() => "loss".into(),
            Some(r) => r.status.bound.as_ref().map_or("exact".into(), |b| format!("bound {b}")),
        };
        let (mut val, _) = fmt_pm(&g.values(|r| r.status.best_val_nll), 2);
        if !g.likelihood() && val != "-" {
            val.push_str(" ‡");
        }
        let params = fin.first().map_or("-".into(), |r| r.status.n_params.to_string());
        let epochs = if fin.is_empty() {
            "-".into()
        } else {
            format!("{:.0}", fin.iter().map(|r| r.status.epochs as f64).sum::<f64>() / fin.len() as f64)
        };
        let mut row = vec![if Some(i) == best { "*".into() } else { " ".into() }];
        if multi {
            row.push(g.experiment.clone());
        }
        row.extend([g.label.clone(), format!("{}/{}", fin.len(), g.runs.len()), test, ci, kind, elbo, kl, bpd, val, params, epochs, w1, mmd]);
        if let Some(at) = mixture_at {
            let (m, _) = fmt_pm(&mixtures[i], 2);
            let seeds = if mixtures[i].is_empty() || mixtures[i].len() == fin.len() {
                String::new()
            } else {
                format!(" ({} of {})", mixtures[i].len(), fin.len())
            };
            row.insert(at, m + &seeds);
        }
        table.rows.push(row);
    }
    table
}

/// "STATUS EXPERIMENT/RUN: REASON" for every run that did not finish.
fn problem_lines(groups: &[Group]) -> Vec<String> {
    groups
        .iter()
        .flat_map(|g| g.runs.iter())
        .filter(|r| !r.status.is_finished())
        .map(|r| {
            format!(
                "{} {}/{}: {}",
                r.status.status,
                r.experiment,
                r.run_id,
                r.status.reason.clone().unwrap_or_default()
            )
        })
        .collect()
}

pub(crate) const FOOTNOTE: &str = "± is the sample std over seeds; CI is the 95% t-interval of the mean. NLL is: exact for an ARM; for a VAE an upper bound, minus its importance-weighted bound with that many samples (IW-S), beside minus its ELBO (test -ELBO; its validation NLL is minus the ELBO too) and the ELBO's KL term (near 0: the decoder ignores z). ‡ a head without a likelihood (quantile): its quantile loss, not nats, unranked. Sample W1 (per-pixel marginals, [0, 1] scale) and MMD² (Gaussian kernel) compare the samples drawn at the end of each run with up to the first 1000 test images; lower is closer. Mixture test NLL (runs trained with train.augment): the transform mixture's, from `runner eval RUN --augment-eval mixture` (or the test NLL of runs trained with augment_eval = \"mixture\"); \"(k of n)\": only k of the n finished seeds have it.";

fn print_table(table: &Table, problems: &[String], format: Format) {
    print!("{}", table.render(format));
    if format != Format::Csv {
        if !problems.is_empty() {
            println!("\nruns not finished ({}):", problems.len());
            for l in problems {
                println!("  {l}");
            }
        }
        println!("\n* best mean test NLL; {FOOTNOTE}");
    }
}

/// Mean validation NLL per epoch over each group's finished seeds, with a min-max band; keyed
/// by data set, since NLLs of different image sizes do not share a scale.
fn curve_series(groups: &[Group], exp_dirs: &[PathBuf], multi: bool) -> BTreeMap<String, (Figure, Vec<Series>)> {
    let mut series: BTreeMap<String, (Figure, Vec<Series>)> = BTreeMap::new();
    for g in groups {
        let mut per_epoch: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for r in g.finished() {
            let p = results_run_dir(exp_dirs, r).join("metrics.parquet");
            if let Ok(h) = store::read_metrics(&p) {
                for m in h {
                    per_epoch.entry(m.epoch).or_default().push(m.val_nll);
                }
            }
        }
        if per_epoch.is_empty() {
            continue;
        }
        let points = per_epoch.iter().map(|(e, v)| (*e as f64, v.iter().sum::<f64>() / v.len() as f64)).collect();
        let band = per_epoch
            .iter()
            .map(|(e, v)| {
                (
                    *e as f64,
                    v.iter().cloned().fold(f64::INFINITY, f64::min),
                    v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                )
            })
            .collect();
        let label = if multi { format!("{} {}", g.experiment, g.label) } else { g.label.clone() };
        let mut data = g.finished().first().map(|r| data_key(&r.config.data)).unwrap_or_default();
        // A loss is not on the NLLs' scale: its own plot.
        let fig = g.figure();
        if !fig.likelihood {
            data.push_str("-quantile_loss");
        }
        series.entry(data).or_insert_with(|| (fig, vec![])).1.push(Series { label, points, band });
    }
    series
}

/// `nll_curves.png`, or `nll_curves_<data>.png` per data set when there are several; curve
/// files of an earlier report are removed first (their data sets may be gone).
fn write_curves(out_dir: &Path, series: &BTreeMap<String, (Figure, Vec<Series>)>) -> Result<Vec<PathBuf>> {
    if let Ok(entries) = std::fs::read_dir(out_dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("nll_curves") && n.ends_with(".png") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut written = vec![];
    for (d, (fig, these)) in series {
        let what = fig.name;
        let (file, title) = if series.len() == 1 {
            ("nll_curves.png".to_string(), format!("validation {what} (mean over seeds, band: min-max)"))
        } else {
            (format!("nll_curves_{d}.png"), format!("{d}: validation {what} (mean over seeds, band: min-max)"))
        };
        let p = out_dir.join(file);
        plots::curves(&p, &title, "epoch", fig.axis, these)?;
        written.push(p);
    }
    Ok(written)
}

/// One sample grid per group from its best seed (lowest validation NLL); a run whose model
/// cannot be rebuilt is reported and skipped.
fn write_sample_grids(
    groups: &[Group],
    exp_dirs: &[PathBuf],
    sample_dir: &Path,
    device: &Device,
    n: usize,
) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    for g in groups {
        let Some(best_run) = g.finished().into_iter().min_by(|a, b| {
            a.status.best_val_nll.unwrap_or(f64::INFINITY).total_cmp(&b.status.best_val_nll.unwrap_or(f64::INFINITY))
        }) else {
            continue;
        };
        let dir = results_run_dir(exp_dirs, best_run);
        match sample_config(&dir, best_run, device, n) {
            Ok(grid) => {
                let p = sample_dir.join(format!("{}.png", g.slug()));
                let title = format!("{} {} (seed {})", g.experiment, g.label, best_run.config.seed);
                plots::real_and_samples(&p, &title, &grid.real, &grid.images, grid.shape, grid.levels)?;
                files.push(p);
            }
            Err(e) => tracing::warn!("samples for {}: {e:#}", g.label),
        }
    }
    Ok(files)
}

/// `report.md`: the table, the unfinished runs, the curve plots and the sample grids.
fn markdown(
    exp_dirs: &[PathBuf],
    out_dir: &Path,
    table: &Table,
    problems: &[String],
    curves: &[PathBuf],
    samples: &[PathBuf],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# NLL report\n");
    let _ = writeln!(
        md,
        "Experiments: {}\n",
        exp_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    md.push_str(&table.render(Format::Markdown));
    let _ = writeln!(md, "\n`*` best mean test NLL; {FOOTNOTE}\n");
    if !problems.is_empty() {
        let _ = writeln!(md, "## Runs not finished\n");
        for l in problems {
            let _ = writeln!(md, "- {l}");
        }
        md.push('\n');
    }
    let rel = |p: &PathBuf| p.strip_prefix(out_dir).unwrap_or(p).display().to_string();
    for p in curves {
        let _ = writeln!(md, "![validation NLL]({})\n", rel(p));
    }
    for p in samples {
        let _ = writeln!(md, "![samples]({})", rel(p));
    }
    md
}

/// A file-name-safe name of a run's data set: the embedded set's name or the user file's stem.
pub(crate) fn data_key(d: &crate::config::DataConfig) -> String {
    let name = match (&d.path, d.name.is_empty()) {
        (Some(p), true) => Path::new(p).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(),
        _ => d.name.clone(),
    };
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

pub(crate) fn results_run_dir(exp_dirs: &[PathBuf], r: &Row) -> PathBuf {
    exp_dirs
        .iter()
        .find(|d| d.file_name().is_some_and(|n| n.to_string_lossy() == r.experiment))
        .map_or_else(|| PathBuf::from(&r.experiment), |d| d.join("runs").join(&r.run_id))
}

/// Images drawn from a run beside as many of its test images, with the image shape and number
/// of levels.
pub struct SampleGrid {
    pub images: Vec<Vec<u8>>,
    pub real: Vec<Vec<u8>>,
    pub shape: (usize, usize),
    pub levels: usize,
}

/// Loads a run's best weights and draws `n` samples with the cached sampler.
pub fn sample_config(dir: &Path, run: &Row, device: &Device, n: usize) -> Result<SampleGrid> {
    let t = crate::trained::build_with_weights(dir, run.config.clone(), Some(run.status.clone()), device)?;
    let (images, ..) = t.model.draw(n, run.config.sample.seed, Sampler::Cached)?;
    let real = crate::run::first_images(&t.data.test, n);
    Ok(SampleGrid { images, real, shape: t.model.shape(), levels: t.model.levels() })
}
