//! `[search]`: random trials drawn from a seed (the same trials and run ids every time, values
//! within bounds, choices from the list), combined with `[grid]`; and successive halving end to
//! end: statuses, a promoted trial resuming to exactly the metrics of an unpruned run, and two
//! `--shard` processes promoting the same trials as one process.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use runner::config::load_str;

mod common;
use common::{f64_col, read_parquet, run_dirs, runner, stderr, stdout};

const BASE: &str = r#"
name = "s"
seeds = [0]

[data]
name = "digits"

[model]
backend = "causal_conv1d"

[model.causal_conv1d]
channels = 4
kernel_size = 2
dilations = [1]
"#;

const SEARCH: &str = r#"
[search]
method = "random"
trials = 12
seed = 3

[search.params]
"train.lr" = { dist = "log_uniform", low = 1e-4, high = 3e-3 }
"model.causal_conv1d.channels" = { dist = "choice", values = [4, 8, 16] }
"model.causal_conv1d.kernel_size" = { dist = "int", low = 2, high = 5 }
"model.causal_conv1d.dropout" = { dist = "uniform", low = 0.0, high = 0.3 }
"#;

fn label(r: &runner::config::RunConfig, key: &str) -> toml::Value {
    r.grid.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {key} in {:?}", r.grid))
}

#[test]
fn the_same_file_gives_the_same_trials_and_run_ids() {
    let text = format!("{BASE}{SEARCH}");
    let a = load_str(&text, "t.toml", &[]).expect("loads");
    let b = load_str(&text, "t.toml", &[]).expect("loads");
    let ids = |e: &runner::config::Experiment| e.runs.iter().map(|r| r.run_id().expect("id")).collect::<Vec<_>>();
    assert_eq!(a.runs.len(), 12);
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(ids(&a).iter().collect::<BTreeSet<_>>().len(), 12, "trials are distinct runs");
    let search = a.search.as_ref().expect("search");
    assert_eq!((search.trials, search.seed), (12, 3));
    for (i, r) in a.runs.iter().enumerate() {
        assert_eq!(label(r, "trial").as_integer(), Some(i as i64));
        // Drawn values are applied, within their bounds, and labelled.
        let lr = r.train.lr;
        assert!((1e-4..=3e-3).contains(&lr), "lr {lr}");
        assert_eq!(label(r, "train.lr").as_float(), Some(lr));
        assert_eq!(runner::config::round4(lr), lr, "4 significant digits");
        let ch = r.model.plugin["channels"].as_integer().expect("channels");
        assert!([4, 8, 16].contains(&ch), "channels {ch}");
        let k = r.model.plugin["kernel_size"].as_integer().expect("kernel");
        assert!((2..=5).contains(&k), "kernel {k}");
        let p = r.model.plugin["dropout"].as_float().expect("dropout");
        assert!((0.0..=0.3).contains(&p), "dropout {p}");
        let id = r.run_id().expect("id");
        assert!(id.starts_with(&format!("trial={i}_")) && id.contains("lr="), "{id}");
    }
    // Over 12 trials the choices and integers vary.
    let distinct = |k: &str| a.runs.iter().map(|r| label(r, k).to_string()).collect::<BTreeSet<_>>().len();
    assert!(distinct("model.causal_conv1d.channels") >= 2 && distinct("model.causal_conv1d.kernel_size") >= 2);

    // Another seed, other trials; more trials keep the first ones.
    let other = load_str(&text.replace("seed = 3", "seed = 4"), "t.toml", &[]).expect("loads");
    assert_ne!(ids(&a), ids(&other));
    let more = load_str(&text.replace("trials = 12", "trials = 15"), "t.toml", &[]).expect("loads");
    assert_eq!(ids(&more)[..12], ids(&a)[..]);
}

/// The run ids of this search are fixed: if the draws or the rounding change, every search's
/// finished trials would be trained again.
#[test]
fn trial_run_ids_are_stable_across_versions_and_machines() {
    let text = format!("{BASE}{SEARCH}");
    let e = load_str(&text, "t.toml", &[]).expect("loads");
    let got: Vec<String> = e.runs.iter().take(3).map(|r| r.run_id().expect("id")).collect();
    assert_eq!(
        got,
        [
            "trial=0_channels=8_dropout=0.02439_kernel_size=3_lr=0.0001329_s0-1ea2d11330",
            "trial=1_channels=16_dropout=0.06805_kernel_size=5_lr=0.001125_s0-482c2f681c",
            "trial=2_channels=8_dropout=0.2172_kernel_size=2_lr=0.0001008_s0-29c543fa73",
        ]
    );
}

#[test]
fn trials_combine_with_the_grid_and_seeds() {
    let text = format!("{BASE}{SEARCH}\n[grid]\n\"train.batch_size\" = [100, 200]\n")
        .replace("trials = 12", "trials = 3")
        .replace("seeds = [0]", "seeds = [0, 1]");
    let e = load_str(&text, "t.toml", &[]).expect("loads");
    // 2 batch sizes x 3 trials x 2 seeds; each trial draws the same values at every grid point.
    assert_eq!(e.runs.len(), 12);
    let mut by_trial: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for r in &e.runs {
        by_trial.entry(label(r, "trial").as_integer().expect("trial")).or_default().insert(r.train.lr.to_string());
    }
    assert_eq!(by_trial.len(), 3);
    assert!(by_trial.values().all(|lrs| lrs.len() == 1), "{by_trial:?}");
    // A key both in the grid and drawn by the search is an error.
    let clash = format!("{BASE}{SEARCH}\n[grid]\n\"train.lr\" = [1e-3]\n");
    let err = load_str(&clash, "t.toml", &[]).map(|_| ()).expect_err("clash").to_string();
    assert!(err.contains("search.params.\"train.lr\"") && err.contains("[grid]"), "{err}");
}

#[test]
fn bad_search_values_get_one_line_naming_the_key() {
    let cases: [(&str, &str, &str); 9] = [
        ("dist = \"log_uniform\"", "dist = \"normal\"", "search.params.\"train.lr\".dist: unknown distribution \"normal\""),
        ("low = 1e-4, high = 3e-3", "low = 3e-3, high = 1e-4", "search.params.\"train.lr\".low: low = 0.003 is above high = 0.0001"),
        ("trials = 12", "trials = 0", "search.trials: must be at least 1, got 0"),
        ("low = 2, high = 5", "low = 2.5, high = 5", "kernel_size\".low: expected an integer"),
        ("values = [4, 8, 16]", "values = []", "channels\".values: the list is empty"),
        ("low = 1e-4, high = 3e-3", "low = 0.0, high = 3e-3", "must be positive for log_uniform"),
        ("method = \"random\"", "method = \"bayes\"", "search.method: unknown method \"bayes\""),
        ("low = 1e-4, high = 3e-3", "low = 1e-4, hi = 3e-3", "search.params.\"train.lr\".hi: unknown key"),
        ("trials = 12", "trials = 12\nfoo = 1", "search.foo"),
    ];
    for (from, to, says) in cases {
        let text = format!("{BASE}{SEARCH}").replacen(from, to, 1);
        let err = load_str(&text, "t.toml", &[]).map(|_| ()).expect_err(says).to_string();
        assert!(err.contains(says) && err.starts_with("t.toml"), "{to}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // Fewer distinct combinations than trials.
    let small = format!("{BASE}[search]\ntrials = 4\n[search.params]\n\"model.causal_conv1d.channels\" = {{ dist = \"choice\", values = [4, 8] }}\n");
    let err = load_str(&small, "t.toml", &[]).map(|_| ()).expect_err("small").to_string();
    assert!(err.contains("only 2 distinct combinations"), "{err}");
    // A drawn value the model rejects is named at its search parameter.
    let bad = format!("{BASE}{SEARCH}").replace("low = 0.0, high = 0.3", "low = 1.5, high = 2.0");
    let err = load_str(&bad, "t.toml", &[]).map(|_| ()).expect_err("dropout").to_string();
    assert!(err.contains("trial 0") && err.contains("search.params.\"model.causal_conv1d.dropout\""), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Successive halving, end to end.


fn toml_of(p: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(p).expect("read")).expect("toml")
}

/// (status, epochs in metrics.parquet) of every run folder of `name`, by run id.
fn states(results: &Path, name: &str) -> BTreeMap<String, (String, usize)> {
    run_dirs(results, name)
        .iter()
        .map(|d| {
            let st = toml_of(&d.join("status.toml"));
            let n = read_parquet(&d.join("metrics.parquet")).height();
            let id = d.file_name().and_then(|n| n.to_str()).expect("id").to_string();
            (id, (st["status"].as_str().expect("status").to_string(), n))
        })
        .collect()
}

fn val_nll(results: &Path, name: &str, id: &str) -> Vec<f64> {
    f64_col(&read_parquet(&results.join(name).join("runs").join(id).join("metrics.parquet")), "val_nll")
}

fn sweep(results: &Path, file: &Path, extra: &[&str]) -> std::process::Output {
    let o = runner(results).arg("sweep").arg(file).args(extra).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

#[test]
fn successive_halving_prunes_by_rank_and_a_promoted_trial_matches_an_unpruned_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = common::fixture("tiny_search.toml");
    let (pruned, full) = (tmp.path().join("pruned"), tmp.path().join("full"));
    let o = sweep(&pruned, &file, &[]);
    assert!(stdout(&o).contains("successive halving: 4 trials trained"), "{}", stdout(&o));

    // Rungs at epochs 1 and 2 (factor 2): 4 trials -> 2 -> 1, which trains to epoch 4.
    let st = states(&pruned, "tsearch");
    assert_eq!(st.len(), 4);
    let by_epochs = |n: usize, s: &str| st.values().filter(|(x, e)| x == s && *e == n).count();
    assert_eq!((by_epochs(1, "pruned"), by_epochs(2, "pruned"), by_epochs(4, "finished")), (2, 1, 1), "{st:?}");

    // The two promoted at rung 1 are the two best by validation NLL at epoch 1.
    let first: Vec<(String, f64)> = st.keys().map(|id| (id.clone(), val_nll(&pruned, "tsearch", id)[0])).collect();
    let mut ranked = first.clone();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    let promoted: BTreeSet<&String> = st.iter().filter(|(_, (_, e))| *e >= 2).map(|(id, _)| id).collect();
    assert_eq!(promoted, ranked[..2].iter().map(|(id, _)| id).collect::<BTreeSet<_>>());
    let dropped = run_dirs(&pruned, "tsearch").into_iter().find(|d| st[d.file_name().and_then(|n| n.to_str()).expect("id")].1 == 1).expect("one");
    let reason = toml_of(&dropped.join("status.toml"))["reason"].as_str().expect("reason").to_string();
    assert!(reason.contains("pruned at epoch 1 (rung 1 of 2)") && reason.contains("of 4"), "{reason}");
    assert!(dropped.join("checkpoint.safetensors").is_file(), "a pruned trial keeps its checkpoint");

    // The same trials without pruning: the same run ids, and the winner's metrics are those of
    // its uninterrupted run, bit for bit.
    sweep(&full, &file, &["--set", "search.prune.enabled=false"]);
    let all = states(&full, "tsearch");
    assert_eq!(all.keys().collect::<Vec<_>>(), st.keys().collect::<Vec<_>>());
    assert!(all.values().all(|(s, e)| s == "finished" && *e == 4), "{all:?}");
    let (winner, _) = st.iter().find(|(_, (s, _))| s == "finished").expect("winner");
    assert_eq!(val_nll(&pruned, "tsearch", winner), val_nll(&full, "tsearch", winner));
    let best_full = all.keys().map(|id| val_nll(&full, "tsearch", id).into_iter().fold(f64::INFINITY, f64::min));
    eprintln!("pruned winner {winner}; best of the full search {:.3}", best_full.fold(f64::INFINITY, f64::min));

    // The report lists the pruned trials with their reasons.
    let o = runner(&pruned).arg("report").output().expect("report");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().filter(|l| l.contains("pruned") && l.contains("ranked")).count(), 3, "{}", stdout(&o));
}

#[test]
fn two_shards_promote_the_same_trials_as_one_process_and_train_each_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = common::fixture("tiny_search.toml");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    sweep(&one, &file, &[]);
    let spawn = |i: usize| {
        runner(&two)
            .arg("sweep")
            .arg(&file)
            .args(["--shard", &format!("{i}/2")])
            .env("RUST_LOG", "info")
            .output()
            .expect("shard")
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn(0));
        let b = s.spawn(|| spawn(1));
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert!(a.status.success() && b.status.success(), "{}\n{}", stderr(&a), stderr(&b));
    assert_eq!(states(&one, "tsearch"), states(&two, "tsearch"));
    for id in states(&one, "tsearch").keys() {
        assert_eq!(val_nll(&one, "tsearch", id), val_nll(&two, "tsearch", id), "{id}");
    }
    // Every training of a trial segment happened once: 4 + 2 + 1 segments between the shards.
    let segments = |o: &std::process::Output| {
        let out = stdout(o);
        let after = |word: &str| -> usize {
            out.split(word).nth(1).and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0)
        };
        let before = |word: &str| -> usize {
            out.split(word).next().filter(|t| t.len() < out.len()).and_then(|t| t.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
        };
        after("tsearch: trained ") + before(" stopped at a rung")
    };
    assert_eq!(segments(&a) + segments(&b), 7, "{}\n{}", stdout(&a), stdout(&b));
}
