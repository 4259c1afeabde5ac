//! End-to-end tests of the `runner` binary on tiny configs (seconds each).

use std::path::{Path, PathBuf};
use std::process::Output;

use polars::prelude::{DataFrame, DataType};

mod common;
use common::{f64_col, fixture, read_parquet, run_dirs, runner, stderr, stdout};

#[test]
fn train_writes_every_output_and_is_deterministic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for r in [&a, &b] {
        let o = runner(r).arg("train").arg(fixture("tiny.toml")).output().expect("run");
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("test NLL"), "{}", stdout(&o));
    }
    let (da, db) = (run_dirs(&a, "tiny1"), run_dirs(&b, "tiny1"));
    assert_eq!(da.len(), 1);
    let dir = &da[0];
    for f in ["config.toml", "metrics.parquet", "model.safetensors", "nll_curve.png", "samples.png", "data_and_samples.png", "status.toml"] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    // One row per epoch with the documented columns.
    let m = read_parquet(&dir.join("metrics.parquet"));
    assert_eq!(m.height(), 2);
    let names: Vec<String> = m.get_column_names().iter().map(|s| s.to_string()).collect();
    assert_eq!(names, ["epoch", "train_nll", "val_nll", "val_bpd", "seconds", "lr", "clipped_steps", "max_grad_norm"]);
    let val = f64_col(&m, "val_nll");
    let bpd = f64_col(&m, "val_bpd");
    for (v, b) in val.iter().zip(&bpd) {
        assert!((v / (64.0 * std::f64::consts::LN_2) - b).abs() < 1e-9);
    }
    // Same config and seed: identical metrics (wall seconds aside) and the same run id.
    assert_eq!(da[0].file_name(), db[0].file_name());
    let m2 = read_parquet(&db[0].join("metrics.parquet"));
    for c in ["train_nll", "val_nll", "val_bpd"] {
        assert_eq!(f64_col(&m, c), f64_col(&m2, c), "column {c}");
    }
    // The resolved config is complete: every default written out.
    let cfg = std::fs::read_to_string(dir.join("config.toml")).expect("config");
    for key in ["seed = 3", "leaky_slope", "optimizer = \"adamax\"", "patience = 20"] {
        assert!(cfg.contains(key), "config.toml lacks {key}:\n{cfg}");
    }
}

#[test]
fn seed_flag_and_set_override_change_the_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = runner(tmp.path())
        .args(["train", fixture("tiny.toml").to_str().expect("utf8"), "--seed", "5", "--set", "train.max_epochs=1"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let dirs = run_dirs(tmp.path(), "tiny1");
    assert_eq!(dirs.len(), 1);
    let cfg = std::fs::read_to_string(dirs[0].join("config.toml")).expect("config");
    assert!(cfg.contains("seed = 5") && cfg.contains("max_epochs = 1"), "{cfg}");
    assert_eq!(read_parquet(&dirs[0].join("metrics.parquet")).height(), 1);
}

/// Writes `body` as an experiment file and returns (exit code, stderr, results folder exists).
fn bad(body: &str) -> (i32, String, bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, body).expect("write");
    let results = tmp.path().join("results");
    let o = runner(&results).arg("train").arg(&file).output().expect("run");
    (o.status.code().unwrap_or(-1), stderr(&o), results.exists())
}

const GOOD: &str = "name = \"x\"\n[data]\nname = \"digits\"\n[model]\nbackend = \"causal_conv1d\"\n[model.causal_conv1d]\nchannels = 4\n[train]\nmax_epochs = 1\n";

#[test]
fn bad_input_gets_one_line_naming_file_and_key_exit_2_and_no_results() {
    let cases: &[(&str, &[&str])] = &[
        (&GOOD.replace("[train]", "[train\n"), &["bad.toml", "TOML syntax error at line"]),
        (&GOOD.replace("channels = 4", "channels = 4\nkernal = 3"), &["bad.toml", "model.causal_conv1d", "kernal"]),
        (&GOOD.replace("max_epochs = 1", "max_epochs = 1\nlearning_rate = 3"), &["bad.toml", "train", "learning_rate"]),
        (&GOOD.replace("max_epochs = 1", "max_epochs = \"ten\""), &["bad.toml", "train.max_epochs"]),
        (&GOOD.replace("channels = 4", "channels = \"wide\""), &["bad.toml", "model.causal_conv1d.channels"]),
        (
            &GOOD.replace("backend = \"causal_conv1d\"", "backend = \"no_such_plugin\""),
            &["bad.toml", "model.backend", "no_such_plugin", "causal_conv1d"],
        ),
        (
            &GOOD.replace("channels = 4", "channels = 4\nkernel_size = 0"),
            &["bad.toml", "model.causal_conv1d.kernel_size", "at least 1"],
        ),
        (&GOOD.replace("channels = 4", "dilations = [1, 0]"), &["bad.toml", "model.causal_conv1d.dilations[1]"]),
        (&GOOD.replace("max_epochs = 1", "lr = -0.1"), &["bad.toml", "train.lr", "positive"]),
        (&GOOD.replace("max_epochs = 1", "batch_size = 0"), &["bad.toml", "train.batch_size"]),
        (&GOOD.replace("name = \"digits\"", "name = \"cifar\""), &["bad.toml", "data.name", "cifar"]),
        (
            &GOOD.replace("backend = \"causal_conv1d\"", "backend = \"causal_conv1d\"\nhead = \"gaussian\""),
            &["bad.toml", "model.head", "gaussian"],
        ),
        (&format!("{GOOD}[extra]\na = 1\n"), &["bad.toml", "extra"]),
        (&GOOD.replace("name = \"x\"\n", ""), &["bad.toml", "name"]),
    ];
    for (body, needles) in cases {
        let (code, err, exists) = bad(body);
        assert_eq!(code, 2, "exit code for case {needles:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line for {needles:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
        for n in *needles {
            assert!(err.contains(n), "{needles:?}: {err:?} lacks {n:?}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(!exists, "a results folder was created for {needles:?}");
    }
    // A missing experiment file.
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = runner(&tmp.path().join("r")).args(["train", "no/such/file.toml"]).output().expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no/such/file.toml"), "{}", stderr(&o));
    assert!(!tmp.path().join("r").exists());
}

#[test]
fn env_and_set_layers_override_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = runner(tmp.path())
        .env("RUNNER__TRAIN__MAX_EPOCHS", "0")
        .args(["train", fixture("tiny.toml").to_str().expect("utf8")])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "env layer not applied: {}", stderr(&o));
    assert!(stderr(&o).contains("train.max_epochs"), "{}", stderr(&o));
    // --set wins over the environment.
    let o = runner(tmp.path())
        .env("RUNNER__TRAIN__MAX_EPOCHS", "0")
        .args(["sweep", fixture("tiny.toml").to_str().expect("utf8"), "--set", "train.max_epochs=1", "--dry-run"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
}

fn sweep(results: &Path, extra: &[&str]) -> Output {
    runner(results).arg("sweep").arg(fixture("tiny_grid.toml")).args(extra).output().expect("run")
}

#[test]
fn sweep_report_rerun_and_shards() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("results");
    let o = sweep(&r, &["--jobs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("trained 8"), "{}", stdout(&o));
    assert_eq!(run_dirs(&r, "tiny").len(), 8);

    // Summary: one row per run, grid keys as typed columns.
    let s = read_parquet(&r.join("tiny/summary.parquet"));
    assert_eq!(s.height(), 8);
    assert_eq!(s.column("model.causal_conv1d.kernel_size").expect("grid col").dtype(), &DataType::Int64);
    assert_eq!(s.column("train.lr").expect("grid col").dtype(), &DataType::Float64);
    for c in
        ["seed", "n_params", "epochs", "best_epoch", "best_val_nll", "test_nll", "test_bpd", "wall_seconds", "status"]
    {
        assert!(s.column(c).is_ok(), "summary lacks {c}");
    }
    let test = f64_col(&s, "test_nll");
    let bpd = f64_col(&s, "test_bpd");
    assert!(test.iter().zip(&bpd).all(|(t, b)| (t / (64.0 * std::f64::consts::LN_2) - b).abs() < 1e-9));
    assert_eq!(f64_col(&s, "epochs"), vec![2.0; 8]);

    // A rerun trains nothing.
    let o = sweep(&r, &[]);
    assert!(stdout(&o).contains("trained 0, skipped 8"), "{}", stdout(&o));

    // Report: 4 configs with mean +- std over 2 seeds, best marked, markdown and csv forms.
    let o = runner(&r).args(["report"]).output().expect("report");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("kernel_size=")).collect();
    assert_eq!(rows.len(), 4, "{out}");
    assert!(rows.iter().all(|l| l.contains("±") && l.contains("2/2")), "{out}");
    assert_eq!(rows.iter().filter(|l| l.starts_with('*')).count(), 1, "{out}");
    for f in ["report.md", "nll_curves.png"] {
        assert!(r.join("tiny").join(f).is_file(), "missing {f}");
    }
    assert_eq!(std::fs::read_dir(r.join("tiny/samples")).expect("samples").count(), 4);
    let o = runner(&r).args(["report", "--format", "csv"]).output().expect("report");
    let csv = stdout(&o);
    assert_eq!(csv.lines().count(), 5, "{csv}");
    // Sorted by mean test NLL: the first row has the smallest mean.
    let means: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(3).and_then(|c| c.split(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN))
        .collect();
    assert!(means.windows(2).all(|w| w[0] <= w[1]), "{means:?}");

    // A run that was cut short (status not finished) is redone, and only it.
    let victim = &run_dirs(&r, "tiny")[2];
    std::fs::remove_file(victim.join("status.toml")).expect("rm");
    std::fs::remove_file(victim.join("model.safetensors")).expect("rm");
    let o = sweep(&r, &[]);
    assert!(stdout(&o).contains("trained 1, skipped 7"), "{}", stdout(&o));

    // Shards partition the grid exactly once.
    let fresh = tmp.path().join("sharded");
    let mut trained = 0;
    for i in 0..3 {
        let o = sweep(&fresh, &["--shard", &format!("{i}/3")]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = stdout(&o);
        let n: usize =
            s.split("trained ").nth(1).and_then(|t| t.split(',').next()).and_then(|n| n.parse().ok()).expect("count");
        trained += n;
    }
    assert_eq!(trained, 8);
    assert_eq!(run_dirs(&fresh, "tiny").len(), 8);
    let ids =
        |p: &Path| run_dirs(p, "tiny").iter().map(|d| d.file_name().map(|n| n.to_os_string())).collect::<Vec<_>>();
    assert_eq!(ids(&fresh), ids(&r), "sharded and whole sweeps give the same run ids");
}

#[test]
fn invalid_grid_point_fails_before_any_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("g.toml");
    // Points in order: kernel 1..=4 are fine, the 5th (kernel 0) is not.
    let body = std::fs::read_to_string(fixture("tiny_grid.toml"))
        .expect("fixture")
        .replace(
            "\"model.causal_conv1d.kernel_size\" = [2, 3]",
            "\"model.causal_conv1d.kernel_size\" = [1, 2, 3, 4, 0]",
        )
        .replace("\"train.lr\" = [0.001, 0.003]", "");
    std::fs::write(&file, body).expect("write");
    let results = tmp.path().join("results");
    let o = runner(&results).arg("sweep").arg(&file).output().expect("run");
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("grid point 5") && err.contains("kernel_size"), "{err}");
    assert!(!results.exists());
    // An unknown grid key is caught the same way.
    std::fs::write(
        &file,
        std::fs::read_to_string(fixture("tiny_grid.toml")).expect("fixture").replace("\"train.lr\"", "\"train.lrr\""),
    )
    .expect("write");
    let o = runner(&results).arg("sweep").arg(&file).output().expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("lrr"), "{}", stderr(&o));
    assert!(!results.exists());
}

#[test]
fn killed_sweep_resumes_with_exactly_the_missing_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("results");
    let bin = assert_cmd::cargo::cargo_bin("runner");
    // Longer runs so that the kill lands mid-sweep.
    let mut child = std::process::Command::new(&bin)
        .arg("--results")
        .arg(&r)
        .args(["sweep", fixture("tiny_grid.toml").to_str().expect("utf8"), "--set", "train.max_epochs=6"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let finished = |r: &Path| {
        run_dirs(r, "tiny")
            .iter()
            .filter(|d| std::fs::read_to_string(d.join("status.toml")).is_ok_and(|s| s.contains("finished")))
            .count()
    };
    let t0 = std::time::Instant::now();
    while finished(&r) < 2 && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().expect("kill");
    let _ = child.wait();
    let done = finished(&r);
    assert!(done >= 2, "no run finished before the kill");
    // Every file present is whole: configs and statuses parse, parquet files read.
    for d in run_dirs(&r, "tiny") {
        if let Ok(s) = std::fs::read_to_string(d.join("status.toml")) {
            assert!(toml::from_str::<toml::Table>(&s).is_ok(), "torn status {s}");
        }
        if d.join("metrics.parquet").exists() {
            read_parquet(&d.join("metrics.parquet"));
        }
    }
    let o = runner(&r)
        .args(["sweep", fixture("tiny_grid.toml").to_str().expect("utf8"), "--set", "train.max_epochs=6"])
        .output()
        .expect("rerun");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("trained {}, skipped {done}", 8 - done)), "{}", stdout(&o));
    assert_eq!(finished(&r), 8);
}

#[test]
fn slurm_script_runs_one_shard_per_array_task() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("job.sbatch");
    let o = runner(tmp.path())
        .args([
            "slurm",
            fixture("tiny_grid.toml").to_str().expect("utf8"),
            "--array",
            "3",
            "--out",
            out.to_str().expect("utf8"),
        ])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let s = std::fs::read_to_string(&out).expect("script");
    assert!(s.starts_with("#!/bin/bash"));
    assert!(s.contains("#SBATCH --array=0-2"), "{s}");
    assert!(s.contains("--shard \"${SLURM_ARRAY_TASK_ID}/3\""), "{s}");
}

#[test]
fn list_names_every_plugin_with_keys_and_defaults() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = runner(tmp.path()).arg("list").output().expect("run");
    let s = stdout(&o);
    assert!(s.contains("causal_conv1d") && s.contains("kernel_size") && s.contains("default 7"), "{s}");
    assert!(s.contains("categorical"), "{s}");
    assert!(s.contains("augment = [GROUP, ...]") && s.contains("shifts, flips, transpose, rotations"), "{s}");
    assert!(s.contains("augment_eval = \"identity\"") && s.contains("\"mixture\""), "{s}");
}

fn user_file_experiment(dir: &Path, data_path: &Path, extra: &str) -> PathBuf {
    let f = dir.join("user.toml");
    let body = format!(
        "name = \"user\"\n[data]\npath = \"{}\"\n{extra}\n[model]\nbackend = \"causal_conv1d\"\n[model.causal_conv1d]\nchannels = 4\nkernel_size = 2\ndilations = [1]\n[train]\nmax_epochs = 1\n[sample]\nn = 2\n",
        data_path.display()
    );
    std::fs::write(&f, body).expect("write");
    f
}

#[test]
fn user_csv_and_parquet_files_train_and_bad_files_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 20 images of 3x3 with levels 0..=4.
    let rows: Vec<Vec<i64>> = (0..20).map(|i| (0..9).map(|j| (i * 7 + j * 3) % 5).collect()).collect();
    let csv: String =
        rows.iter().map(|r| r.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",") + "\n").collect();
    let csv_path = tmp.path().join("imgs.csv");
    std::fs::write(&csv_path, &csv).expect("write");
    let r = tmp.path().join("results");
    let o = runner(&r).arg("train").arg(user_file_experiment(tmp.path(), &csv_path, "")).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = std::fs::read_to_string(run_dirs(&r, "user")[0].join("config.toml")).expect("config");
    assert!(cfg.contains("imgs.csv"), "{cfg}");

    // The same images as parquet (one integer column per pixel).
    let cols: Vec<polars::prelude::Column> = (0..9)
        .map(|j| polars::prelude::Column::new(format!("p{j}").into(), rows.iter().map(|r| r[j]).collect::<Vec<i64>>()))
        .collect();
    let mut df = DataFrame::new(20, cols).expect("frame");
    let pq = tmp.path().join("imgs.parquet");
    polars::prelude::ParquetWriter::new(std::fs::File::create(&pq).expect("create"))
        .finish(&mut df)
        .expect("write parquet");
    let o = runner(&tmp.path().join("r2"))
        .arg("train")
        .arg(user_file_experiment(tmp.path(), &pq, "levels = 5"))
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", stderr(&o));

    // Bad files: one line naming the file, row and column; nothing trained.
    let cases = [
        ("short.csv", csv.replacen("\n", "\n1,2\n", 1), "row 2: 2 values, expected 9"),
        ("frac.csv", csv.replacen("0", "0.5", 1), "column"),
        ("range.csv", csv.clone(), "level 4 is outside 0..=3"),
    ];
    for (name, body, want) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).expect("write");
        let extra = if name == "range.csv" { "levels = 4" } else { "" };
        let res = tmp.path().join(format!("res-{name}"));
        let o = runner(&res).arg("train").arg(user_file_experiment(tmp.path(), &p, extra)).output().expect("run");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(name) && err.contains(want) && err.trim_end().lines().count() == 1, "{name}: {err}");
        assert!(!res.exists());
    }
    let o = runner(&tmp.path().join("r3"))
        .arg("train")
        .arg(user_file_experiment(tmp.path(), &tmp.path().join("nope.csv"), ""))
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("data.path") && stderr(&o).contains("nope.csv"), "{}", stderr(&o));
}

#[test]
fn bench_train_counts_the_reference_flops_and_its_ratios_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["bench", "train", "--steps", "1", "--model", "reference", "--profile"];
    let o = runner(dir.path()).args(args).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let row = out.lines().find(|l| l.contains("(reference)")).unwrap_or_else(|| panic!("no row in {out}"));
    let cols: Vec<f64> = row
        .split(')')
        .nth(1)
        .expect("values")
        .split_whitespace()
        .map(|v| v.trim_end_matches('%').parse().expect("number"))
        .collect();
    let (step, gflop, gflops, peak, pct) = (cols[0], cols[4], cols[5], cols[6], cols[7]);
    // Weights: 7x1x256 (first layer) + 2 x 7x256x256 + 7x256x17 (output) = 949,760; every one
    // is used once per pixel, 64 pixels x 64 images, 2 FLOPs each, x3 for the backward.
    let by_hand = 3.0 * 2.0 * 64.0 * 64.0 * 949_760.0 / 1e9;
    assert!((gflop - by_hand).abs() < 0.01, "{gflop} vs {by_hand}");
    assert!((gflops - gflop / step).abs() <= 0.01 * gflops + 0.1, "{row}");
    assert!((pct - 100.0 * gflops / peak).abs() < 0.2, "{row} with peak {peak}");
    // --profile: one call per layer (4) each way, and the layers' forward within the step's.
    let phase = |name: &str| -> (f64, f64) {
        let line =
            out.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or_else(|| panic!("no {name} in {out}"));
        let v: Vec<&str> = line[line.find(name).unwrap_or(0) + name.len()..].split_whitespace().collect();
        (v[0].parse().expect("ms"), v[2].parse().expect("calls"))
    };
    let (fwd_ms, fwd_calls) = phase("timeconv fwd");
    assert_eq!((fwd_calls, phase("timeconv bwd").1), (4.0, 4.0), "{out}");
    assert!(fwd_ms > 0.0 && fwd_ms <= 1e3 * cols[1], "{fwd_ms} ms of a {} s forward", cols[1]);
    // Only the selected model ran; an unknown one is a one-line error.
    assert!(!out.contains("gated_pixelcnn"), "{out}");
    let bad = runner(dir.path()).args(["bench", "train", "--model", "nonesuch"]).output().expect("run");
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).trim().lines().count() == 1 && stderr(&bad).contains("--model nonesuch"), "{}", stderr(&bad));
}

#[test]
fn bench_sampling_counts_flops_per_image_and_rows_per_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["bench", "sampling", "--plugin", "causal_conv1d", "--batch", "1", "--batch", "2", "--max-seconds", "0.5"];
    let o = runner(dir.path()).args(args).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let peak: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("matmul peak (1024^3): "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak in {out}"));
    let rows: Vec<Vec<&str>> =
        out.lines().filter(|l| l.starts_with("causal_conv1d")).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 4, "{out}");
    // The reference network's weights are used once per pixel, 2 FLOPs each: 7x1x256 +
    // 2 x 7x256x256 + 7x256xK (K = 17 levels on 8x8, 2 on 28x28).
    let hand = |k: f64, d: f64| 2.0 * d * (7.0 * 256.0 + 2.0 * 7.0 * 256.0 * 256.0 + 7.0 * 256.0 * k) / 1e9;
    for (row, (image, batch, gflop)) in
        rows.iter().zip([("8x8", 1.0, hand(17.0, 64.0)), ("8x8", 2.0, hand(17.0, 64.0)), ("28x28", 1.0, hand(2.0, 784.0)), ("28x28", 2.0, hand(2.0, 784.0))])
    {
        let num = |i: usize| -> f64 { row[i].trim_end_matches(['%', 'x']).parse().unwrap_or_else(|_| panic!("{row:?}")) };
        assert_eq!((row[1], num(2)), (image, batch), "{row:?}");
        // Columns: plugin image batch naive fwd cached jacobi (it) predictive (calls/im) cached-x
        // jacobi-x ms/px GFLOP/im GF/s % same.
        assert!((num(13) - gflop).abs() < 1e-4, "{row:?}: {gflop} GFLOP per image by hand");
        let (cached_s, gfs) = (num(5), num(14));
        assert!((gfs - gflop * batch / cached_s).abs() <= 0.02 * gfs + 0.01, "{row:?}");
        assert!((num(15) - 100.0 * gfs / peak).abs() <= 0.02 * num(15) + 0.01, "{row:?} with peak {peak}");
        assert_eq!(row[16], "yes", "{row:?}");
        // Predictive calls per image: at least one pass, at most the Jacobi passes (both stop
        // with the slowest image; predictive's mean cannot exceed it) and the pixels.
        let calls: f64 = row[9].trim_matches(['(', ')']).parse().unwrap_or_else(|_| panic!("{row:?}"));
        let jacobi_it: f64 = row[7].trim_matches(['(', ')']).parse().unwrap_or_else(|_| panic!("{row:?}"));
        assert!(calls >= 1.0 && calls <= jacobi_it, "{row:?}");
    }
}

#[test]
fn report_over_two_data_sets_plots_one_curve_file_each() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("results");
    let o = runner(&r).arg("train").arg(fixture("tiny.toml")).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: String =
        (0..20).map(|i| (0..9).map(|j| ((i + j) % 3).to_string()).collect::<Vec<_>>().join(",") + "\n").collect();
    let csv = tmp.path().join("dots.csv");
    std::fs::write(&csv, rows).expect("write");
    let o = runner(&r).arg("train").arg(user_file_experiment(tmp.path(), &csv, "")).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    // A stale single-set plot from an earlier report must not survive.
    let out = tmp.path().join("both");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("nll_curves.png"), b"old").expect("write");
    let o = runner(&r)
        .args(["report", r.join("tiny1").to_str().expect("utf8"), r.join("user").to_str().expect("utf8"), "--out"])
        .arg(&out)
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let mut pngs: Vec<String> = std::fs::read_dir(&out)
        .expect("read")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".png"))
        .collect();
    pngs.sort();
    assert_eq!(pngs, ["nll_curves_digits.png", "nll_curves_dots.png"]);
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("(nll_curves_digits.png)") && md.contains("(nll_curves_dots.png)"), "{md}");
}

/// The quantile head (no likelihood) trains through the same sweep; its runs record the test
/// quantile loss with no bits/dim, every run records sample W1 and MMD² against test images, and
/// the report ranks the NLL first and shows the loss apart (‡, never starred).
#[test]
fn quantile_head_reports_its_loss_apart_and_every_head_gets_sample_quality() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("results");
    let exp = tmp.path().join("heads.toml");
    let file = std::fs::read_to_string(fixture("tiny.toml")).expect("fixture").replace("tiny1", "qheads")
        + "\n[model.quantile]\nquantiles = 8\n\n[grid]\n\"model.head\" = [\"categorical\", \"quantile\"]\n";
    std::fs::write(&exp, file.replace("n = 4", "n = 16")).expect("write");
    let o = runner(&r).arg("sweep").arg(&exp).output().expect("sweep");
    assert!(o.status.success(), "{}", stderr(&o));
    let dirs = run_dirs(&r, "qheads");
    assert_eq!(dirs.len(), 2);
    for d in &dirs {
        let st: toml::Table = std::fs::read_to_string(d.join("status.toml")).expect("status").parse().expect("toml");
        let num = |k: &str| st.get(k).and_then(toml::Value::as_float);
        let (w1, mmd) = (num("sample_w1").expect("sample_w1"), num("sample_mmd2").expect("sample_mmd2"));
        // W1 on the [0, 1] scale lies in [0, 1]; a Gaussian-kernel MMD² is at most 2.
        assert!((0.0..=1.0).contains(&w1) && mmd.abs() <= 2.0, "{d:?}: {w1} {mmd}");
        let quantile = d.to_string_lossy().contains("head=quantile");
        assert!(num("test_nll").is_some(), "{d:?}");
        assert_eq!(num("test_bpd").is_none(), quantile, "{d:?}: bits/dim only for a likelihood");
        if quantile {
            let o = runner(&r).arg("eval").arg(d).output().expect("eval");
            assert!(o.status.success() && stdout(&o).contains("mean quantile loss"), "{}", stdout(&o));
        }
    }
    let o = runner(&r).args(["report", "--format", "csv"]).output().expect("report");
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = stdout(&o);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].contains("sample W1") && lines[0].contains("sample MMD²"), "{csv}");
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[1].starts_with('*') && lines[1].contains("head=categorical"), "{csv}");
    assert!(!lines[2].starts_with('*') && lines[2].contains("head=quantile") && lines[2].contains('‡'), "{csv}");
    // The loss is not plotted on the NLLs' axis: one curve file each.
    for f in ["nll_curves_digits.png", "nll_curves_digits-quantile_loss.png"] {
        assert!(r.join("qheads").join(f).is_file(), "missing {f}");
    }
}
