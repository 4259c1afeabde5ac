//! The user scripts under scripts/ still parse and answer their flags. Nothing here trains
//! or needs Python packages (CI has neither the time nor polars/duckdb); running them for
//! real is `scripts/reproduce.sh --quick && scripts/read_results.py results/quick`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn reproduce_sh_parses_and_answers_help_from_any_directory() {
    let script = root().join("scripts/reproduce.sh");
    let o = run(Command::new("bash").arg("-n").arg(&script));
    assert!(o.status.success(), "bash -n: {}", text(&o));

    // From another directory: the script finds the repository by its own location.
    let o = run(Command::new("bash").arg(&script).arg("--help").current_dir(std::env::temp_dir()));
    assert!(o.status.success(), "--help: {}", text(&o));
    for want in ["Usage: scripts/reproduce.sh", "--quick", "--results DIR", "--jobs N", "--only NAME"] {
        assert!(text(&o).contains(want), "--help lacks {want:?}: {}", text(&o));
    }
}

#[test]
fn reproduce_sh_refuses_bad_flags_before_building() {
    let script = root().join("scripts/reproduce.sh");
    let cases: [(&[&str], &str); 4] = [
        (&["--frobnicate"], "unknown argument '--frobnicate'"),
        (&["--jobs", "0"], "--jobs: expected a positive whole number"),
        (&["--only", "no_such_experiment"], "no experiment file experiments/no_such_experiment.toml"),
        (&["--results"], "--results needs a folder"),
    ];
    for (args, want) in cases {
        let o = run(Command::new("bash").arg(&script).args(args).current_dir(std::env::temp_dir()));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("cargo build"), "{args:?} started a build: {}", text(&o));
    }
}

/// Whatever Python has installed, the example exits with one clear line: a missing package
/// (CI: `pip install polars duckdb`) or a folder without results.
#[test]
fn read_results_py_says_what_is_missing() {
    let Ok(o) = Command::new("python3").arg("--version").output() else {
        eprintln!("no python3: skipped");
        return;
    };
    if !o.status.success() {
        eprintln!("no working python3: skipped");
        return;
    }
    let empty = std::env::temp_dir().join(format!("armlab-no-results-{}", std::process::id()));
    std::fs::create_dir_all(&empty).ok();
    let o = run(Command::new("python3").arg(root().join("scripts/read_results.py")).arg(&empty));
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("pip install polars duckdb") || t.contains("no <experiment>/summary.parquet under"), "{t}");
    assert!(!t.contains("Traceback"), "{t}");
    std::fs::remove_dir_all(&empty).ok();
}
