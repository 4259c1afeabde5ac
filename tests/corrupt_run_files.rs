//! A run folder whose `config.toml` or `status.toml` does not read (not TOML, a key missing, a
//! value of the wrong type) stops `runner report`, `runner sample`, `runner eval` and a sweep
//! over that folder with one line naming that file; nothing is listed or sampled with made-up values. A missing
//! `status.toml` (a run killed before writing it) is legitimate: the run reads as unfinished.

use std::path::{Path, PathBuf};

mod common;
use common::{fixture, runner, stderr, stdout};

/// Trains tests/fixtures/tiny.toml (2 epochs on digits) under `results`; returns the run folder.
fn train_tiny(results: &Path) -> PathBuf {
    let o = runner(results).arg("train").arg(fixture("tiny.toml")).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let dirs = common::run_dirs(results, "tiny1");
    assert_eq!(dirs.len(), 1);
    dirs[0].clone()
}

/// The file's text with the first line starting with `prefix` replaced by `with` (or removed).
fn edit(text: &str, prefix: &str, with: Option<&str>) -> String {
    let mut done = false;
    let mut out = String::new();
    for l in text.lines() {
        if !done && l.starts_with(prefix) {
            done = true;
            if let Some(w) = with {
                out.push_str(w);
                out.push('\n');
            }
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    assert!(done, "no line starting with {prefix:?} in\n{text}");
    out
}

#[test]
fn corrupt_config_or_status_fails_report_sample_and_eval_naming_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let results = tmp.path().join("results");
    let run = train_tiny(&results);
    let config = std::fs::read_to_string(run.join("config.toml")).expect("config");
    let status = std::fs::read_to_string(run.join("status.toml")).expect("status");

    // (file, corrupted text, a fragment of what the error says)
    let cases: Vec<(&str, String, &str)> = vec![
        ("config.toml", "name = \"tiny1\"\nseed = [".into(), "line 2"),
        ("config.toml", String::new(), "missing key name"),
        ("config.toml", edit(&config, "seed = ", None), "missing key seed"),
        ("config.toml", edit(&config, "seed = ", Some("seed = \"three\"")), "seed: expected an integer"),
        ("config.toml", edit(&config, "seed = ", Some("seed = -3")), "seed: expected an integer >= 0"),
        ("config.toml", edit(&config, "name = ", Some("name = 5")), "name: expected a string"),
        ("config.toml", edit(&config, "backend = ", None), "missing key model.backend"),
        ("config.toml", edit(&config, "lr = ", None), "missing key train.lr"),
        ("config.toml", edit(&config, "lr = ", Some("lr = \"fast\"")), "train"),
        ("config.toml", edit(&config, "ordering = ", None), "missing key data.ordering"),
        ("config.toml", edit(&config, "[sample]", Some("[sampling]")), "missing key sample"),
        ("status.toml", "status = \"finished\"\nepochs = ".into(), "line 2"),
        ("status.toml", edit(&status, "status = ", None), "status"),
        ("status.toml", edit(&status, "status = ", Some("status = \"done\"")), "done"),
        ("status.toml", edit(&status, "epochs = ", Some("epochs = \"two\"")), "epochs"),
        ("status.toml", edit(&status, "n_params = ", None), "n_params"),
    ];
    let run_s = run.to_str().expect("utf8").to_string();
    let tiny = fixture("tiny.toml").to_str().expect("utf8").to_string();
    for (file, text, says) in &cases {
        let path = run.join(file);
        std::fs::write(&path, text).expect("write");
        for args in [vec!["report"], vec!["sample", &run_s], vec!["eval", &run_s], vec!["sweep", &tiny]] {
            let o = runner(&results).args(&args).output().expect("run");
            let what = format!("{args:?} with a corrupt {file} ({says})");
            // A sweep logs what it found before it reads the folders; the error is the last line.
            let all = stderr(&o);
            let err = if args[0] == "sweep" { all.trim_end().lines().last().unwrap_or_default() } else { &all };
            assert_eq!(o.status.code(), Some(2), "{what}: {all}");
            assert_eq!(err.trim_end().lines().count(), 1, "{what}: {all}");
            assert!(err.starts_with("error: "), "{what}: {all}");
            assert!(err.contains(path.to_str().expect("utf8")), "{what}: the error does not name the file: {err}");
            assert!(err.contains(says), "{what}: {err:?} lacks {says:?}");
            assert!(!err.contains("panicked"), "{what}: {err}");
        }
        // The report wrote nothing from the corrupt folder.
        assert!(!results.join("tiny1/report.md").exists(), "{file}: a report was written");
        let original = if *file == "config.toml" { &config } else { &status };
        std::fs::write(&path, original).expect("restore");
    }

    // The plugin's table is checked when the model is built: `sample` and `eval` fail naming the
    // file and key; the report lists the run (its numbers are in status.toml) and says why it
    // has no sample grid for it.
    let path = run.join("config.toml");
    std::fs::write(&path, edit(&config, "dilations = ", Some("dilations = 3"))).expect("write");
    for args in [vec!["sample", &run_s], vec!["eval", &run_s]] {
        let o = runner(&results).args(&args).output().expect("run");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(path.to_str().expect("utf8")) && err.contains("dilations"), "{args:?}: {err}");
    }
    let o = runner(&results).arg("report").output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(path.to_str().expect("utf8")) && stderr(&o).contains("dilations"), "{}", stderr(&o));
    std::fs::write(&path, &config).expect("restore");

    // A run without a status file (killed before writing it) is listed as unfinished, and its
    // weights still sample.
    std::fs::remove_file(run.join("status.toml")).expect("rm");
    let o = runner(&results).arg("report").output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).lines().any(|l| l.contains("unfinished") && l.contains("tiny1/")), "{}", stdout(&o));
    let s = common::read_parquet(&results.join("tiny1/summary.parquet"));
    let states: Vec<String> = s
        .column("status")
        .expect("status column")
        .str()
        .expect("str")
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect();
    assert_eq!(states, ["unfinished"]);
    let o = runner(&results).args(["sample", &run_s, "--n", "2"]).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
}
