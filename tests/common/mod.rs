//! Helpers shared by the end-to-end tests of the `runner` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use polars::prelude::{DataFrame, DataType, ParquetReader, SerReader};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// The binary with `--results` set and no log filter from the environment.
pub fn runner(results: &Path) -> Command {
    let mut c = Command::cargo_bin("runner").expect("runner binary");
    c.arg("--results").arg(results).env_remove("RUST_LOG");
    c
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn read_parquet(p: &Path) -> DataFrame {
    ParquetReader::new(std::fs::File::open(p).expect("open parquet")).finish().expect("read parquet")
}

pub fn f64_col(df: &DataFrame, name: &str) -> Vec<f64> {
    let c = df.column(name).expect("column").cast(&DataType::Float64).expect("cast");
    c.f64().expect("f64").iter().map(|v| v.unwrap_or(f64::NAN)).collect()
}

/// Run folders of experiment `name`, sorted.
pub fn run_dirs(results: &Path, name: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(results.join(name).join("runs"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Polls `cond` every 20 ms; fails the test after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
