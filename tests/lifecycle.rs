//! How runs end when their process is stopped from outside, end to end:
//! - SIGTERM (what Slurm and `kill` send) mid-epoch leaves the run interrupted with a checkpoint,
//!   the sweep exits 130, and `--resume` ends with the metrics of an uninterrupted sweep;
//! - after `kill -9`, `runner status` and `runner report` call the run stale, never running,
//!   while a live run shows as running with its epoch;
//! - the `runner slurm` script passes Slurm's warning signal on, requeues its task (a stand-in
//!   `scontrol` records the call) and its next start resumes the run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod common;
use common::{f64_col, fixture, read_parquet, run_dirs, runner, stderr, stdout, wait_for};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_runner"))
}

fn spawn(results: &Path, args: &[&str]) -> Child {
    Command::new(bin())
        .arg("--results")
        .arg(results)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill -{sig} failed");
}

fn epochs(dir: &Path) -> usize {
    let p = dir.join("metrics.parquet");
    if p.exists() {
        read_parquet(&p).height()
    } else {
        0
    }
}

fn status_of(dir: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(dir.join("status.toml")).expect("status")).expect("toml")
}

fn nll_columns(dir: &Path) -> Vec<Vec<f64>> {
    let df = read_parquet(&dir.join("metrics.parquet"));
    ["epoch", "train_nll", "val_nll"].iter().map(|c| f64_col(&df, c)).collect()
}

fn first_run(results: &Path, name: &str) -> Option<PathBuf> {
    if !results.join(name).join("runs").is_dir() {
        return None;
    }
    run_dirs(results, name).into_iter().find(|d| d.join("config.toml").exists())
}

#[test]
fn sigterm_mid_epoch_interrupts_the_sweep_and_resume_matches_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let fix = fixture("tiny.toml");
    let args = ["sweep", fix.to_str().expect("utf8"), "--set", "train.max_epochs=30", "--set", "train.patience=100"];
    let o = runner(&a).args(args).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));

    let child = spawn(&b, &args);
    wait_for("the first epoch", Duration::from_secs(60), || first_run(&b, "tiny1").is_some_and(|d| epochs(&d) >= 1));
    signal(child.id(), "TERM");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("stopping after the current step"), "{}", stderr(&o));
    let dir = first_run(&b, "tiny1").expect("run");
    assert_eq!(status_of(&dir)["status"].as_str(), Some("interrupted"));
    assert!(dir.join("checkpoint.safetensors").is_file());
    let done = epochs(&dir);
    assert!(done < 30, "the signal stopped it early");

    let o = runner(&b).args(args).arg("--resume").output().expect("resume");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("resuming from the checkpoint of epoch {done}")), "{}", stderr(&o));
    let da = first_run(&a, "tiny1").expect("a");
    assert_eq!(da.file_name(), dir.file_name());
    assert_eq!(nll_columns(&da), nll_columns(&dir));
    assert_eq!(status_of(&da)["test_nll"], status_of(&dir)["test_nll"]);
}

#[test]
fn a_killed_run_is_stale_never_running_and_a_live_one_is_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("r");
    let fix = fixture("tiny.toml");
    let args = ["train", fix.to_str().expect("utf8"), "--set", "train.max_epochs=100000", "--set", "train.patience=100000"];
    let mut child = spawn(&r, &args);
    wait_for("two epochs", Duration::from_secs(60), || first_run(&r, "tiny1").is_some_and(|d| epochs(&d) >= 2));

    let o = runner(&r).arg("status").output().expect("status");
    assert!(o.status.success(), "{}", stderr(&o));
    let live = stdout(&o);
    assert!(live.contains("1 running"), "{live}");
    assert!(live.lines().any(|l| l.trim_start().starts_with("running") && l.contains("epoch ") && l.contains("/100000")), "{live}");

    child.kill().expect("kill -9");
    let _ = child.wait();
    let dir = first_run(&r, "tiny1").expect("run");
    assert_eq!(status_of(&dir)["status"].as_str(), Some("running"), "the file still says running");
    for cmd in ["status", "report"] {
        let o = runner(&r).arg(cmd).output().expect(cmd);
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("stale"), "{cmd}: {out}");
        assert!(!out.split_whitespace().any(|w| w.trim_matches(|c: char| !c.is_alphabetic()) == "running"), "{cmd}: {out}");
    }
    let s = read_parquet(&r.join("tiny1/summary.parquet"));
    let col = s.column("status").expect("status").str().expect("str").get(0).map(str::to_string);
    assert_eq!(col.as_deref(), Some("stale"));

    // --resume takes it over from its checkpoint.
    let n = epochs(&dir);
    let child = spawn(&r, &[&args[..], &["--resume"]].concat());
    wait_for("an epoch after the resume", Duration::from_secs(60), || epochs(&dir) > n);
    signal(child.id(), "INT");
    let o = child.wait_with_output().expect("wait");
    assert!(stderr(&o).contains("resuming from the checkpoint"), "{}", stderr(&o));
}

fn slurm_script(tmp: &Path, results: &Path) -> PathBuf {
    let out = tmp.join("job.sbatch");
    let fix = fixture("tiny.toml");
    let o = runner(results)
        .args(["slurm", fix.to_str().expect("utf8"), "--array", "1", "--out", out.to_str().expect("utf8")])
        .args(["--set", "train.max_epochs=40", "--set", "train.patience=100"])
        .output()
        .expect("slurm");
    assert!(o.status.success(), "{}", stderr(&o));
    let s = std::fs::read_to_string(&out).expect("script");
    for line in ["#SBATCH --signal=B:TERM@120", "#SBATCH --requeue", "--resume"] {
        assert!(s.contains(line), "{line} missing from\n{s}");
    }
    out
}

/// Runs the script as Slurm would run array task 0 of job 77, with `scontrol` recording its
/// arguments into `calls`.
fn batch(script: &Path, fake_bin: &Path, calls: &Path) -> Child {
    let path = format!("{}:{}", fake_bin.display(), std::env::var("PATH").unwrap_or_default());
    Command::new("bash")
        .arg(script)
        .env("PATH", path)
        .env("RUNNER", bin())
        .env("SCONTROL_CALLS", calls)
        .env("SLURM_ARRAY_TASK_ID", "0")
        .env("SLURM_ARRAY_JOB_ID", "77")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash")
}

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

#[test]
fn the_slurm_script_checkpoints_on_the_warning_signal_requeues_and_resumes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = tmp.path().join("r");
    let script = slurm_script(tmp.path(), &r);
    let fake = tmp.path().join("bin");
    std::fs::create_dir_all(&fake).expect("mkdir");
    let scontrol = fake.join("scontrol");
    std::fs::write(&scontrol, "#!/bin/sh\necho \"$@\" >> \"$SCONTROL_CALLS\"\n").expect("write");
    let made_exec = Command::new("chmod").arg("+x").arg(&scontrol).status().expect("chmod").success();
    assert!(made_exec);
    let calls = tmp.path().join("calls.txt");

    let child = batch(&script, &fake, &calls);
    wait_for("the first epoch", Duration::from_secs(60), || first_run(&r, "tiny1").is_some_and(|d| epochs(&d) >= 1));
    signal(child.id(), "TERM");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    let dir = first_run(&r, "tiny1").expect("run");
    assert_eq!(status_of(&dir)["status"].as_str(), Some("interrupted"));
    assert_eq!(std::fs::read_to_string(&calls).expect("scontrol was called"), "requeue 77_0\n");

    // The requeued task starts the script again: it resumes and finishes, without a requeue.
    let done = epochs(&dir);
    let o = batch(&script, &fake, &calls).wait_with_output().expect("rerun");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("resuming from the checkpoint of epoch {done}")), "{}", text(&o));
    assert_eq!(status_of(&dir)["status"].as_str(), Some("finished"));
    assert_eq!(epochs(&dir), 40);
    assert_eq!(std::fs::read_to_string(&calls).expect("calls"), "requeue 77_0\n");
}
