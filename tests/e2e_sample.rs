//! End-to-end tests of `runner sample` and `runner eval` on a tiny trained run (seconds each).

use std::path::{Path, PathBuf};

mod common;
use common::{f64_col, fixture, read_parquet, runner, stderr, stdout};

/// Trains tests/fixtures/tiny.toml (2 epochs on digits) under `results`; returns the run folder.
fn train_tiny(results: &Path) -> PathBuf {
    train_fixture(results, "tiny.toml", &[])
}

fn status_value(run: &Path, key: &str) -> f64 {
    let s: toml::Table =
        toml::from_str(&std::fs::read_to_string(run.join("status.toml")).expect("status")).expect("toml");
    s.get(key).and_then(|v| v.as_float()).unwrap_or_else(|| panic!("status.toml lacks {key}"))
}

/// The number printed as "mean NLL <x> nats".
fn printed_mean(out: &str) -> f64 {
    out.split("mean NLL ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no mean NLL in {out:?}"))
}

fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

#[test]
fn every_sampler_writes_the_same_png_for_one_seed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = train_tiny(&tmp.path().join("results"));
    let png_with = |sampler: &str, seed: u64, extra: &[&str]| -> (Vec<u8>, String) {
        let out = tmp.path().join(format!("{sampler}_{seed}.png"));
        let o = runner(tmp.path())
            .arg("sample")
            .arg(&run)
            .args(["--n", "9", "--sampler", sampler, "--seed", &seed.to_string(), "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .expect("run");
        assert!(o.status.success(), "{sampler}: {}", stderr(&o));
        let s = stdout(&o);
        assert!(s.contains(&format!("sampler {sampler}")) && s.contains(" s "), "{s}");
        if sampler == "jacobi" {
            assert!(s.contains("parallel iterations"), "{s}");
        }
        let bytes = std::fs::read(&out).expect("png written");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{sampler}: not a PNG");
        (bytes, s)
    };
    let png = |sampler: &str, seed: u64| png_with(sampler, seed, &[]).0;
    let naive = png("naive", 11);
    assert!(naive == png("cached", 11), "cached differs from naive");
    assert!(naive == png("jacobi", 11), "jacobi differs from naive");
    // Predictive, with fixed-point forecasts and with a fitted forecaster: the same images, and
    // the network calls per image (at most the 64 pixels) are printed.
    for extra in [&[][..], &["--offsets", "3"][..]] {
        let (bytes, s) = png_with("predictive", 11, extra);
        assert!(naive == bytes, "predictive {extra:?} differs from naive");
        let calls: f64 = s
            .lines()
            .find(|l| l.starts_with("sampler predictive"))
            .and_then(|l| l.split("; ").nth(1))
            .and_then(|t| t.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no calls in {s}"));
        assert!((1.0..=64.0).contains(&calls) && s.contains("network calls per image (of 64)"), "{s}");
        assert_eq!(s.contains("forecaster: 3 pixels ahead"), !extra.is_empty(), "{s}");
    }
    assert!(naive != png("cached", 12), "another seed gives the same images");
    // The default output goes into the run folder.
    let o = runner(tmp.path()).arg("sample").arg(&run).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run.join("samples_cached_seed0.png").is_file());
}

#[test]
fn eval_reproduces_the_test_nll_of_the_status_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = train_tiny(&tmp.path().join("results"));
    let o = runner(tmp.path()).arg("eval").arg(&run).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let mean = printed_mean(&stdout(&o));
    let test_nll = status_value(&run, "test_nll");
    assert!(rel(mean, test_nll) < 1e-6, "eval {mean} vs status.toml {test_nll}");

    // One row per test image (447 digits), the documented columns, the printed mean.
    let df = read_parquet(&run.join("eval_test.parquet"));
    let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    assert_eq!(names, ["index", "nll_nats", "bpd"]);
    assert_eq!(df.height(), 447);
    let nll = f64_col(&df, "nll_nats");
    let bpd = f64_col(&df, "bpd");
    assert_eq!(f64_col(&df, "index"), (0..447).map(f64::from).collect::<Vec<_>>());
    let file_mean = nll.iter().sum::<f64>() / nll.len() as f64;
    assert!(rel(file_mean, mean) < 1e-6, "file mean {file_mean} vs printed {mean}");
    for (n, b) in nll.iter().zip(&bpd) {
        assert!((n / (64.0 * std::f64::consts::LN_2) - b).abs() < 1e-9);
    }

    // CSV of the validation split: its mean is the best validation NLL (same best weights).
    let csv = tmp.path().join("val.csv");
    let o = runner(tmp.path()).arg("eval").arg(&run).args(["--split", "val", "--out"]).arg(&csv).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let val = printed_mean(&stdout(&o));
    assert!(rel(val, status_value(&run, "best_val_nll")) < 1e-6, "{val}");
    let text = std::fs::read_to_string(&csv).expect("csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("index,nll_nats,bpd"));
    let vals: Vec<f64> = lines.map(|l| l.split(',').nth(1).and_then(|v| v.parse().ok()).expect("number")).collect();
    assert_eq!(vals.len(), 350);
    assert!(rel(vals.iter().sum::<f64>() / 350.0, val) < 1e-6);
}

#[test]
fn bad_input_gets_one_line_and_exit_2() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = train_tiny(&tmp.path().join("results"));
    // A run folder without weights (as left by a run that never finished).
    let unfinished = tmp.path().join("unfinished");
    std::fs::create_dir_all(&unfinished).expect("mkdir");
    std::fs::copy(run.join("config.toml"), unfinished.join("config.toml")).expect("copy");
    let not_a_run = tmp.path().join("empty");
    std::fs::create_dir_all(&not_a_run).expect("mkdir");
    let s = |p: &Path| p.to_str().expect("utf8").to_string();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (vec!["sample".into(), s(&tmp.path().join("missing"))], vec!["missing", "no such run folder"]),
        (vec!["sample".into(), s(&not_a_run)], vec!["config.toml"]),
        (vec!["sample".into(), s(&unfinished)], vec!["model.safetensors"]),
        (
            vec!["sample".into(), s(&run), "--sampler".into(), "fast".into()],
            vec!["--sampler", "fast", "naive, cached, jacobi, predictive"],
        ),
        (vec!["sample".into(), s(&run), "--offsets".into(), "2".into()], vec!["--offsets", "predictive", "cached"]),
        (
            vec!["sample".into(), s(&run), "--sampler".into(), "predictive".into(), "--offsets".into(), "64".into()],
            vec!["--offsets", "64 pixels", "64"],
        ),
        (vec!["sample".into(), s(&run), "--n".into(), "0".into()], vec!["--n"]),
        (vec!["eval".into(), s(&tmp.path().join("missing"))], vec!["missing", "no such run folder"]),
        (vec!["eval".into(), s(&unfinished)], vec!["model.safetensors"]),
        (vec!["eval".into(), s(&run), "--split".into(), "dev".into()], vec!["--split", "dev"]),
        (vec!["eval".into(), s(&run), "--out".into(), "x.txt".into()], vec!["--out", ".parquet or .csv"]),
        (
            vec!["eval".into(), s(&run), "--data".into(), "mnist10k".into()],
            vec!["--data mnist10k", "28x28", "256 levels", "8x8", "17 levels"],
        ),
        (vec!["eval".into(), s(&run), "--data".into(), "cifar".into()], vec!["cifar", "digits"]),
    ];
    for (args, needles) in cases {
        let o = runner(tmp.path()).args(&args).output().expect("run");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
        }
    }
    assert!(!tmp.path().join("x.txt").exists());
}

/// A run trained on several orderings: its test NLL is the ensemble of `data.eval_orders`
/// orderings, `runner eval` reproduces it, `--orders 1` (the first ordering alone) and
/// `--orders 3` give other figures, and more orderings than trained is one line and exit 2.
#[test]
fn eval_orders_reproduces_the_order_ensemble_and_evaluates_fewer_or_more() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let results = tmp.path().join("results");
    let o = runner(&results).arg("train").arg(fixture("tiny_orders.toml")).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let run = std::fs::read_dir(results.join("tiny_orders/runs")).expect("runs").filter_map(|e| e.ok()).next().expect("run").path();
    assert!(run.join("data_and_samples.png").is_file());
    let eval = |n: &str| {
        let o = runner(tmp.path()).arg("eval").arg(&run).args(["--orders", n, "--out"]).arg(tmp.path().join(format!("e{n}.csv"))).output().expect("run");
        assert!(o.status.success(), "{}", stderr(&o));
        printed_mean(&stdout(&o))
    };
    let (one, two, three) = (eval("1"), eval("2"), eval("3"));
    let test_nll = status_value(&run, "test_nll");
    assert!(rel(two, test_nll) < 1e-6, "eval --orders 2 {two} vs status.toml {test_nll}");
    assert!(rel(one, two) > 1e-6 && rel(three, two) > 1e-6, "{one} {two} {three}");
    let o = runner(tmp.path()).arg("eval").arg(&run).args(["--orders", "4"]).output().expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--orders 4") && err.contains("1..=3"), "{err}");
}

/// Trains one run of tests/fixtures/`name` under `results` with `extra` flags; returns its folder.
fn train_fixture(results: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let o = runner(results).arg("train").arg(fixture(name)).args(extra).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let experiment = std::fs::read_dir(results).expect("results").filter_map(|e| e.ok()).find(|e| e.path().join("runs").is_dir());
    let experiment = experiment.expect("an experiment folder with runs");
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(experiment.path().join("runs")).expect("runs").filter_map(|e| e.ok()).map(|e| e.path()).collect();
    assert_eq!(dirs.len(), 1);
    dirs.remove(0)
}

/// Distribution augmentation: the run trains, its config keeps the keys, its test NLL is the
/// model at the identity (`runner eval` reproduces it), a run stopped and resumed ends with the
/// same weights, the same run without augmentation trains to another figure, and cached sampling draws the
/// naive sampler's images.
#[test]
fn augmented_run_evaluates_and_samples_at_the_identity() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = train_fixture(&tmp.path().join("a"), "tiny_augment.toml", &[]);
    let cfg = std::fs::read_to_string(run.join("config.toml")).expect("config");
    assert!(cfg.contains("augment = [\"shifts\", \"rotations\"]") && cfg.contains("augment_prob = 0.7"), "{cfg}");
    let o = runner(tmp.path()).arg("eval").arg(&run).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let test_nll = status_value(&run, "test_nll");
    assert!(rel(printed_mean(&stdout(&o)), test_nll) < 1e-6, "eval vs status.toml {test_nll}");

    // Stopped after epoch 1 and resumed: the draws of epoch 2 and the weights are the same.
    let b = tmp.path().join("b");
    let o = runner(&b).arg("train").arg(fixture("tiny_augment.toml")).env("RUNNER_STOP_AFTER_EPOCHS", "1").output().expect("run");
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let resumed = train_fixture(&b, "tiny_augment.toml", &["--resume"]);
    assert_eq!(status_value(&resumed, "test_nll"), test_nll, "a resumed run differs");
    let w = |d: &Path| std::fs::read(d.join("model.safetensors")).expect("weights");
    assert!(w(&resumed) == w(&run), "best weights differ");
    let plain = train_fixture(&tmp.path().join("c"), "tiny_augment.toml", &["--set", "train.augment=[]"]);
    assert!(rel(status_value(&plain, "test_nll"), test_nll) > 1e-4, "augmentation changed nothing");
    let o = runner(tmp.path()).arg("eval").arg(&plain).args(["--augment-eval", "mixture"]).output().expect("run");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("trained without train.augment") && stderr(&o).lines().count() == 1, "{}", stderr(&o));

    let png = |sampler: &str| sample_png(tmp.path(), &run, 4, sampler);
    assert!(png("naive") == png("cached"), "cached differs from naive");
}

/// The bytes of the PNG of `n` samples (seed 5) that `sampler` draws from `run`.
fn sample_png(tmp: &Path, run: &Path, n: usize, sampler: &str) -> Vec<u8> {
    let out = tmp.join(format!("{}-{n}-{sampler}.png", run.file_name().expect("a run folder").to_string_lossy()));
    let o = runner(tmp)
        .arg("sample")
        .arg(run)
        .args(["--n", &n.to_string(), "--sampler", sampler, "--seed", "5", "--out"])
        .arg(&out)
        .output()
        .expect("run");
    assert!(o.status.success(), "{sampler}: {}", stderr(&o));
    std::fs::read(&out).expect("png")
}

/// The nll_nats column of a `runner eval --out X.csv` file.
fn per_image(csv: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(csv).expect("csv");
    let mut lines = text.lines();
    let col = lines.next().expect("header").split(',').position(|c| c == "nll_nats").expect("nll_nats column");
    lines.map(|l| l.split(',').nth(col).and_then(|v| v.parse().ok()).expect("a number")).collect()
}

/// `train.augment_eval = "mixture"`: the run trains as with the identity (the same weights),
/// its test NLL is the mixture over the identity and the three quarter turns (`runner eval`
/// reproduces it; `--members 1` is the identity run's figure; `--member K` gives each member,
/// and the mixture is their average weighted by the training draws; `--augment-eval` turns
/// one run into the other), and sampling draws each image
/// from a member: cached equals naive, and the images differ from the identity's.
#[test]
fn a_mixture_run_evaluates_and_samples_the_transform_mixture() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let id = train_fixture(&tmp.path().join("a"), "tiny_augment.toml", &[]);
    let mix = train_fixture(&tmp.path().join("b"), "tiny_augment.toml", &["--set", "train.augment_eval=\"mixture\""]);
    let cfg = std::fs::read_to_string(mix.join("config.toml")).expect("config");
    assert!(cfg.contains("augment_eval = \"mixture\""), "{cfg}");
    let w = |d: &Path| std::fs::read(d.join("model.safetensors")).expect("weights");
    let best = |d: &Path| std::fs::read_to_string(d.join("status.toml")).expect("status").contains("best_epoch = 2");
    assert!(best(&id) && best(&mix), "both runs keep their last epoch's weights");
    assert!(w(&id) == w(&mix), "the evaluation changed the training");

    let eval = |args: &[&str]| {
        let o = runner(tmp.path()).current_dir(tmp.path()).arg("eval").arg(&mix).args(args).output().expect("run");
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let all = eval(&[]);
    assert!(all.contains("ensemble of 4 of 4 members"), "{all}");
    let test_nll = status_value(&mix, "test_nll");
    assert!(rel(printed_mean(&all), test_nll) < 1e-6, "eval vs status.toml {test_nll}");
    let identity = printed_mean(&eval(&["--members", "1", "--out", "m1.csv"]));
    assert!(rel(identity, status_value(&id, "test_nll")) < 1e-6, "member 0 is not the identity model");
    assert!(tmp.path().join("m1.csv").is_file(), "--out with a bare file name writes into the working folder");
    // The mixture's weights: the identity 0.3, each of the 11 transforms (8 shifts, 3 turns)
    // 0.7 / 11 (prob 0.7), renormalised over the identity and the three quarter turns.
    let member = |k: usize| {
        let out = eval(&["--member", &k.to_string(), "--out", &format!("member{k}.csv")]);
        assert!(out.contains(&format!("member {k} of 4 alone")), "{out}");
        per_image(&tmp.path().join(format!("member{k}.csv")))
    };
    let members: Vec<Vec<f64>> = (0..4).map(member).collect();
    assert_eq!(members[0], per_image(&tmp.path().join("m1.csv")), "member 0 alone is the first member's ensemble");
    eval(&["--out", "mix.csv"]);
    let turn = 0.7 / 11.0;
    let pi = [0.3, turn, turn, turn].map(|w| w / (0.3 + 3.0 * turn));
    for (i, nll) in per_image(&tmp.path().join("mix.csv")).iter().enumerate() {
        let p: f64 = members.iter().zip(pi).map(|(m, w)| w * (-m[i]).exp()).sum();
        assert!((nll + p.ln()).abs() < 1e-3, "image {i}: {nll} vs {}", -p.ln());
    }
    // The identity run evaluated as the mixture is the mixture run (the same weights).
    let o = runner(tmp.path()).arg("eval").arg(&id).args(["--augment-eval", "mixture"]).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(rel(printed_mean(&stdout(&o)), test_nll) < 1e-6, "{}", stdout(&o));
    assert!(id.join("eval_test_mixture.parquet").is_file(), "the mode is in the default file name");
    let o = runner(tmp.path()).arg("eval").arg(&mix).args(["--augment-eval", "identity"]).output().expect("run");
    assert!(rel(printed_mean(&stdout(&o)), status_value(&id, "test_nll")) < 1e-6, "{}", stdout(&o));
    let o = runner(tmp.path()).arg("eval").arg(&mix).args(["--member", "4"]).output().expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--member 4: expected 0..=3"), "{}", stderr(&o));
    assert!(rel(identity, test_nll) > 1e-4, "the mixture equals its identity member");

    let png = |run: &Path, sampler: &str| sample_png(tmp.path(), run, 8, sampler);
    let cached = png(&mix, "cached");
    assert!(png(&mix, "naive") == cached, "cached differs from naive");
    assert!(png(&id, "cached") != cached, "the mixture sampled the identity alone");
}

/// The report's mixture column: absent until a run of the group has a mixture figure; the
/// identity-trained run's comes from `runner eval --augment-eval mixture` and equals the
/// mixture-trained run's test NLL (same weights); training the run again removes the
/// evaluation of the weights it replaces, and the column with it.
#[test]
fn report_shows_the_transform_mixture_beside_the_identity() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let id = train_fixture(&a, "tiny_augment.toml", &[]);
    let mix = train_fixture(&b, "tiny_augment.toml", &["--set", "train.augment_eval=\"mixture\""]);
    // The report's CSV as (header, first row).
    let report = |results: &Path| {
        let o = runner(results).args(["report", "--format", "csv", "--samples", "1"]).output().expect("report");
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let mut lines = out.lines();
        let split = |l: Option<&str>| l.expect("a line").split(',').map(String::from).collect::<Vec<_>>();
        (split(lines.next()), split(lines.next()))
    };
    let column =
        |(h, r): &(Vec<String>, Vec<String>), name: &str| h.iter().position(|c| c == name).map(|i| r[i].clone());
    let before = report(&a);
    assert_eq!(column(&before, "mixture test NLL"), None, "{before:?}");
    let mix_nll = format!("{:.2}", status_value(&mix, "test_nll"));
    assert_eq!(column(&report(&b), "mixture test NLL").as_deref(), Some(mix_nll.as_str()));

    let o = runner(&a).arg("eval").arg(&id).args(["--augment-eval", "mixture"]).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let after = report(&a);
    assert_eq!(column(&after, "mixture test NLL").as_deref(), Some(mix_nll.as_str()), "{after:?}");
    let identity = format!("{:.2}", status_value(&id, "test_nll"));
    assert_eq!(
        column(&after, "test NLL (nats)").as_deref(),
        Some(identity.as_str()),
        "the test NLL stays the identity's"
    );
    assert_ne!(identity, mix_nll);

    let again = train_fixture(&a, "tiny_augment.toml", &[]);
    assert_eq!(again, id);
    assert!(!id.join("eval_test_mixture.parquet").exists(), "the evaluation of the replaced weights survived");
    assert_eq!(column(&report(&a), "mixture test NLL"), None);
}
