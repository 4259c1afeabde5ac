//! Interruption, resumption, divergence and concurrency, end to end on tiny configs:
//! - a run stopped after epoch 2 and resumed with `--resume` ends with exactly the metrics,
//!   test NLL and weights of an uninterrupted run (Adamax and AdamW), for `train` and `sweep`;
//! - Ctrl-C marks the run interrupted and `--resume` continues its history;
//! - a diverging run is marked failed with the epoch, the sweep carries on (or stops with
//!   --fail-fast) and the report lists it;
//! - two sweeps on one folder train every run exactly once;
//! - a sweep killed (SIGKILL) at random moments never leaves a torn file, and the rerun trains
//!   exactly the missing runs.
//!
//! `RUNNER_STOP_AFTER_EPOCHS=N` (a hidden test hook) acts like Ctrl-C at the end of epoch N.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::wait_for;

use polars::prelude::{DataFrame, DataType, ParquetReader, SerReader};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BIN: &str = env!("CARGO_BIN_EXE_runner");

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name).to_string_lossy().to_string()
}

fn cmd(results: &Path, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(BIN);
    c.arg("--results").arg(results).args(args).env_remove("RUST_LOG").env_remove("RUNNER_STOP_AFTER_EPOCHS");
    c
}

fn run(results: &Path, args: &[&str]) -> Output {
    cmd(results, args).output().expect("run runner")
}

fn spawn(results: &Path, args: &[&str]) -> Child {
    cmd(results, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn runner")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn read_parquet(p: &Path) -> DataFrame {
    ParquetReader::new(std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .finish()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f64_col(df: &DataFrame, name: &str) -> Vec<f64> {
    let c = df.column(name).expect("column").cast(&DataType::Float64).expect("cast");
    c.f64().expect("f64").iter().map(|v| v.unwrap_or(f64::NAN)).collect()
}

fn str_col(df: &DataFrame, name: &str) -> Vec<String> {
    df.column(name).expect("column").str().expect("str").iter().map(|v| v.unwrap_or_default().to_string()).collect()
}

fn run_dirs(results: &Path, name: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(results.join(name).join("runs"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn status(dir: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(dir.join("status.toml")).expect("status.toml")).expect("status parses")
}

fn status_of(dir: &Path) -> String {
    status(dir).get("status").and_then(|v| v.as_str()).unwrap_or_default().to_string()
}

/// The number after `word ` in a sweep's summary line ("trained 3, skipped 5 finished, ...").
fn count(stdout: &str, word: &str) -> usize {
    stdout
        .split(&format!("{word} "))
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{word} N` in {stdout}"))
}

/// The metrics that must not depend on interruptions (wall seconds aside).
fn metrics(dir: &Path) -> Vec<Vec<f64>> {
    let m = read_parquet(&dir.join("metrics.parquet"));
    ["epoch", "train_nll", "val_nll", "val_bpd", "lr", "clipped_steps"].iter().map(|c| f64_col(&m, c)).collect()
}

#[test]
fn resumed_run_matches_an_uninterrupted_one() {
    let fix = fixture("tiny.toml");
    for opt in [
        &["--set", "train.max_epochs=4"][..],
        &["--set", "train.max_epochs=4", "--set", "train.optimizer=\"adamw\"", "--set", "train.weight_decay=0.01"],
        // Dropout masks are re-seeded per epoch, so they resume too.
        &["--set", "train.max_epochs=4", "--set", "model.causal_conv1d.dropout=0.3"],
        // Averaged weights, a schedule with warm-up, and clipping (a norm of 5 clips some steps).
        &[
            "--set",
            "train.max_epochs=4",
            "--set",
            "train.ema=0.9",
            "--set",
            "train.schedule=\"cosine\"",
            "--set",
            "train.warmup_epochs=1",
            "--set",
            "train.clip_grad_norm=5.0",
        ],
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let args: Vec<&str> = ["train", fix.as_str()].into_iter().chain(opt.iter().copied()).collect();
        let o = run(&a, &args);
        assert!(o.status.success(), "{}", text(&o.stderr));

        // Stopped after epoch 2: interrupted (exit status 130), with a checkpoint and two
        // metrics rows.
        let o = cmd(&b, &args).env("RUNNER_STOP_AFTER_EPOCHS", "2").output().expect("run");
        assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
        let dir = &run_dirs(&b, "tiny1")[0];
        let st = status(dir);
        assert_eq!(st["status"].as_str(), Some("interrupted"), "{st:?}");
        assert!(st["reason"].as_str().is_some_and(|r| r.contains("--resume")), "{st:?}");
        assert!(dir.join("checkpoint.safetensors").is_file());
        assert_eq!(metrics(dir)[0], vec![1.0, 2.0]);

        // Resumed: the same run id, continued from epoch 2 to the end.
        let resumed: Vec<&str> = args.iter().copied().chain(["--resume"]).collect();
        let o = run(&b, &resumed);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(text(&o.stderr).contains("resuming from the checkpoint of epoch 2"), "{}", text(&o.stderr));
        let (da, db) = (&run_dirs(&a, "tiny1")[0], &run_dirs(&b, "tiny1")[0]);
        assert_eq!(da.file_name(), db.file_name());
        assert_eq!(status_of(db), "finished");
        assert_eq!(metrics(da), metrics(db), "metrics differ for {opt:?}");
        for k in ["test_nll", "best_val_nll", "best_epoch", "epochs"] {
            assert_eq!(status(da)[k], status(db)[k], "{k} for {opt:?}");
        }
        assert_eq!(
            std::fs::read(da.join("model.safetensors")).expect("a"),
            std::fs::read(db.join("model.safetensors")).expect("b"),
            "best weights differ"
        );
        assert!(!db.join("checkpoint.safetensors").exists(), "a finished run keeps no checkpoint");

        // --resume on a finished run trains nothing.
        let before = metrics(db);
        let o = run(&b, &resumed);
        assert!(o.status.success() && text(&o.stderr).contains("already finished"), "{}", text(&o.stderr));
        assert_eq!(metrics(db), before);
    }
}

#[test]
fn sweep_resume_continues_interrupted_runs_with_identical_results() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let grid = fixture("tiny_grid.toml");
    let args = ["sweep", grid.as_str(), "--set", "train.max_epochs=3", "--set", "seeds=[0]"];
    let o = run(&a, &args);
    assert!(o.status.success(), "{}", text(&o.stderr));

    // Ctrl-C (simulated) at the end of epoch 2 of the first run: the sweep stops, non-zero.
    let o = cmd(&b, &args).env("RUNNER_STOP_AFTER_EPOCHS", "2").output().expect("run");
    assert_eq!(o.status.code(), Some(130));
    assert!(text(&o.stdout).contains("1 interrupted"), "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("interrupted; rerun"), "{}", text(&o.stderr));

    let resumed: Vec<&str> = args.iter().copied().chain(["--resume"]).collect();
    let o = run(&b, &resumed);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(count(&text(&o.stdout), "trained"), 4, "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("resuming from the checkpoint of epoch 2"), "{}", text(&o.stderr));

    let (ra, rb) = (run_dirs(&a, "tiny"), run_dirs(&b, "tiny"));
    assert_eq!(
        ra.iter().map(|d| d.file_name()).collect::<Vec<_>>(),
        rb.iter().map(|d| d.file_name()).collect::<Vec<_>>()
    );
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(metrics(x), metrics(y), "{}", y.display());
        assert_eq!(status(x)["test_nll"], status(y)["test_nll"]);
    }
}

/// Sends SIGINT (the Ctrl-C signal) to a child.
fn interrupt(child: &Child) {
    let ok =
        std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill").success();
    assert!(ok, "kill -INT failed");
}

fn metrics_rows(dir: &Path) -> usize {
    // The file is replaced atomically, so any version that exists reads whole.
    if dir.join("metrics.parquet").exists() {
        read_parquet(&dir.join("metrics.parquet")).height()
    } else {
        0
    }
}

#[test]
fn ctrl_c_marks_the_run_interrupted_and_resume_continues_its_history() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("r");
    let fix = fixture("tiny.toml");
    // Long enough never to finish on its own here.
    let args = ["train", fix.as_str(), "--set", "train.max_epochs=100000", "--set", "train.patience=100000"];
    let child = spawn(&r, &args);
    let dir = || run_dirs(&r, "tiny1").first().cloned();
    wait_for("the first checkpoint", Duration::from_secs(60), || {
        dir().is_some_and(|d| d.join("checkpoint.safetensors").exists() && metrics_rows(&d) >= 1)
    });
    interrupt(&child);
    let o = child.wait_with_output().expect("wait");
    assert!(text(&o.stderr).contains("stopping after the current step"), "{}", text(&o.stderr));
    assert_eq!(o.status.code(), Some(130), "an interrupted train exits as shells expect");
    let d = dir().expect("run dir");
    let st = status(&d);
    assert_eq!(st["status"].as_str(), Some("interrupted"), "{st:?}");
    let first = metrics(&d);
    let n1 = first[0].len();
    assert!(n1 >= 1);

    let resumed: Vec<&str> = args.iter().copied().chain(["--resume"]).collect();
    let child = spawn(&r, &resumed);
    wait_for("an epoch after the resume", Duration::from_secs(60), || metrics_rows(&d) > n1);
    interrupt(&child);
    let o = child.wait_with_output().expect("wait");
    assert!(text(&o.stderr).contains(&format!("resuming from the checkpoint of epoch {n1}")), "{}", text(&o.stderr));
    assert_eq!(status_of(&d), "interrupted");
    let second = metrics(&d);
    let n2 = second[0].len();
    assert!(n2 > n1);
    assert_eq!(second[0], (1..=n2).map(|e| e as f64).collect::<Vec<_>>(), "epochs are numbered on");
    for (c, col) in first.iter().enumerate() {
        assert_eq!(&second[c][..n1], &col[..], "the history before the interruption is kept");
    }
}

/// A 2-point grid of which one point diverges (lr 1e30: NaN loss within the first epoch; lr 1e6
/// only gives huge but finite NLLs on this model).
fn diverging_grid(dir: &Path, lrs: &str) -> PathBuf {
    let body = std::fs::read_to_string(fixture("tiny_grid.toml"))
        .expect("fixture")
        .replace("seeds = [0, 1]", "seeds = [0]")
        .replace("\"model.causal_conv1d.kernel_size\" = [2, 3]\n", "")
        .replace("\"train.lr\" = [0.001, 0.003]", &format!("\"train.lr\" = {lrs}"));
    let p = dir.join("diverge.toml");
    std::fs::write(&p, body).expect("write");
    p
}

#[test]
fn a_diverging_run_fails_with_the_epoch_and_the_sweep_carries_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("r");
    let file = diverging_grid(tmp.path(), "[1e30, 0.001]");
    let f = file.to_str().expect("utf8");
    // The sweep trains every run, then exits non-zero for the failed one.
    let o = run(&r, &["sweep", f]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("1 run(s) failed"), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert_eq!(count(&out, "trained"), 1, "{out}");
    assert!(out.contains("0 interrupted, 1 failed"), "{out}");
    let dirs = run_dirs(&r, "tiny");
    assert_eq!(dirs.len(), 2);
    let (bad, good): (Vec<_>, Vec<_>) = dirs.iter().partition(|d| status_of(d) == "failed");
    assert_eq!((bad.len(), good.len()), (1, 1));
    let cfg: toml::Table =
        toml::from_str(&std::fs::read_to_string(bad[0].join("config.toml")).expect("config")).expect("parse");
    assert_eq!(cfg["train"]["lr"].as_float(), Some(1e30));
    let st = status(bad[0]);
    assert_eq!(st["status"].as_str(), Some("failed"), "{st:?}");
    let reason = st["reason"].as_str().expect("reason");
    assert!(reason.contains("diverged at epoch 1") && (reason.contains("NaN") || reason.contains("inf")), "{reason}");
    assert_eq!(status_of(good[0]), "finished");
    let s = read_parquet(&r.join("tiny/summary.parquet"));
    assert_eq!(str_col(&s, "status").iter().filter(|v| *v == "failed").count(), 1);

    // The report lists the failed run with its reason.
    let o = run(&r, &["report"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let rep = text(&o.stdout);
    let name = bad[0].file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        rep.lines().any(|l| l.contains("failed") && l.contains(name) && l.contains("diverged at epoch 1")),
        "{rep}"
    );

    // --fail-fast stops at the failed run: non-zero, the later point never trained.
    let r2 = tmp.path().join("r2");
    let o = run(&r2, &["sweep", f, "--fail-fast"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--fail-fast"), "{}", text(&o.stderr));
    let finished =
        run_dirs(&r2, "tiny").iter().filter(|d| d.join("status.toml").exists() && status_of(d) == "finished").count();
    assert_eq!(finished, 0);
}

#[test]
fn two_concurrent_sweeps_train_every_run_exactly_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("r");
    let grid = fixture("tiny_grid.toml");
    let args = ["sweep", grid.as_str(), "--set", "train.max_epochs=3"];
    let (a, b) = (spawn(&r, &args), spawn(&r, &args));
    let (oa, ob) = (a.wait_with_output().expect("a"), b.wait_with_output().expect("b"));
    assert!(oa.status.success(), "{}", text(&oa.stderr));
    assert!(ob.status.success(), "{}", text(&ob.stderr));
    let (sa, sb) = (text(&oa.stdout), text(&ob.stdout));
    assert_eq!(count(&sa, "trained") + count(&sb, "trained"), 8, "{sa}\n{sb}");
    // Each run's "finished" log line appears once over both sweeps.
    let mut finished: Vec<String> = [&oa.stderr, &ob.stderr]
        .iter()
        .flat_map(|e| {
            let e = text(e);
            e.lines()
                .filter_map(|l| l.split_once(" finished: test NLL"))
                .filter_map(|(head, _)| head.split_whitespace().last().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect();
    finished.sort();
    let unique: BTreeSet<&String> = finished.iter().collect();
    assert_eq!((finished.len(), unique.len()), (8, 8), "{finished:?}");
    let dirs = run_dirs(&r, "tiny");
    assert_eq!(dirs.len(), 8);
    for d in &dirs {
        assert_eq!(status_of(d), "finished");
        assert_eq!(metrics_rows(d), 3);
    }
    let s = read_parquet(&r.join("tiny/summary.parquet"));
    assert_eq!(s.height(), 8);
}

/// Every file a run folder holds reads back whole; temporary files and the lock aside.
fn check_whole(results: &Path, name: &str, expected: &BTreeSet<String>) {
    for d in run_dirs(results, name) {
        let id = d.file_name().and_then(|n| n.to_str()).expect("name").to_string();
        assert!(expected.contains(&id), "unexpected run folder {id}");
        for e in std::fs::read_dir(&d).expect("read_dir").filter_map(|e| e.ok()) {
            let p = e.path();
            let f = p.file_name().and_then(|n| n.to_str()).expect("name").to_string();
            if f.starts_with('.') {
                continue; // .lock and .<file>.<pid>.tmp
            }
            let bytes = std::fs::read(&p).expect("read");
            match f.as_str() {
                "status.toml" | "config.toml" => {
                    toml::from_str::<toml::Table>(&text(&bytes))
                        .unwrap_or_else(|e| panic!("torn {}: {e}", p.display()));
                }
                "metrics.parquet" => {
                    read_parquet(&p);
                }
                "checkpoint.safetensors" | "model.safetensors" => {
                    candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
                        .unwrap_or_else(|e| panic!("torn {}: {e}", p.display()));
                }
                f if f.ends_with(".png") => {
                    assert!(
                        bytes.starts_with(b"\x89PNG")
                            && bytes.len() > 12
                            && &bytes[bytes.len() - 8..bytes.len() - 4] == b"IEND",
                        "torn {}",
                        p.display()
                    );
                }
                _ => assert!(!bytes.is_empty(), "empty {}", p.display()),
            }
        }
    }
    let summary = results.join(name).join("summary.parquet");
    if summary.exists() {
        let s = read_parquet(&summary);
        let ids = str_col(&s, "run_id");
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "a run listed twice in the summary");
    }
}

#[test]
fn a_sweep_killed_at_random_moments_never_tears_a_file_and_reruns_finish_the_missing_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("r");
    let grid = fixture("tiny_grid.toml");
    let args = ["sweep", grid.as_str(), "--set", "train.max_epochs=4"];
    let o = run(&r, &[&args[..], &["--dry-run"]].concat());
    let expected: BTreeSet<String> = text(&o.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("todo"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert_eq!(expected.len(), 8, "{}", text(&o.stdout));
    assert!(!r.exists(), "a dry run writes nothing");

    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let t0 = Instant::now();
    let finished = |r: &Path| {
        run_dirs(r, "tiny").iter().filter(|d| d.join("status.toml").exists() && status_of(d) == "finished").count()
    };
    let mut kills = 0;
    while kills < 6 && t0.elapsed() < Duration::from_secs(25) && finished(&r) < 8 {
        let extra: &[&str] = match kills % 3 {
            0 => &[],
            1 => &["--resume"],
            _ => &["--jobs", "2", "--resume"],
        };
        let mut child =
            cmd(&r, &[&args[..], extra].concat()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
        std::thread::sleep(Duration::from_millis(rng.random_range(200..3000)));
        let _ = child.kill(); // SIGKILL: no handler runs
        let _ = child.wait();
        kills += 1;
        check_whole(&r, "tiny", &expected);
    }
    let before = finished(&r);
    eprintln!(
        "{kills} kills in {:.1} s; {before} of 8 runs finished before the last rerun",
        t0.elapsed().as_secs_f64()
    );
    let o = run(&r, &[&args[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert_eq!((count(&out, "trained"), count(&out, "skipped")), (8 - before, before), "{out}");
    check_whole(&r, "tiny", &expected);
    let dirs = run_dirs(&r, "tiny");
    let ids: BTreeSet<String> =
        dirs.iter().filter_map(|d| d.file_name().and_then(|n| n.to_str()).map(str::to_string)).collect();
    assert_eq!(ids, expected);
    let mut epochs = BTreeMap::new();
    for d in &dirs {
        assert_eq!(status_of(d), "finished");
        epochs.insert(d.clone(), metrics(d)[0].clone());
    }
    assert!(epochs.values().all(|e| *e == vec![1.0, 2.0, 3.0, 4.0]), "{epochs:?}");
    assert_eq!(read_parquet(&r.join("tiny/summary.parquet")).height(), 8);
}
