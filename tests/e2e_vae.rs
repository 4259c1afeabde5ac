//! End-to-end tests of a VAE run (`model.kind = "vae"`) on a tiny config: the run writes the
//! bound it reports and the ELBO, the report says its NLL is a bound, `runner eval` reproduces
//! the status figure, every sampler draws the same grid, and bad VAE keys are one-line errors.

mod common;
use common::{f64_col, fixture, read_parquet, run_dirs, runner, stderr, stdout};

const TINY: &str = r#"name = "vae_tiny"
seeds = [0]
[data]
name = "digits"
[model]
kind = "vae"
backend = "gated_pixelcnn"
head = "categorical"
[model.vae]
latent = 4
hidden = 32
prior = "arm"
iw_samples = 8
[model.vae.prior_net]
hidden = [16]
[model.gated_pixelcnn]
channels = 8
layers = 2
[train]
max_epochs = 2
[sample]
n = 9
"#;

fn status_value(dir: &std::path::Path, key: &str) -> Option<toml::Value> {
    let text = std::fs::read_to_string(dir.join("status.toml")).expect("status");
    let t: toml::Table = toml::from_str(&text).expect("toml");
    t.get(key).cloned()
}

#[test]
fn a_vae_run_reports_its_bound_beside_the_elbo() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("vae.toml");
    std::fs::write(&file, TINY).expect("write");
    let results = tmp.path().join("results");
    let o = runner(&results).arg("sweep").arg(&file).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let dirs = run_dirs(&results, "vae_tiny");
    assert_eq!(dirs.len(), 1);
    let dir = &dirs[0];
    for f in ["model.safetensors", "samples.png", "metrics.parquet"] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    assert_eq!(status_value(dir, "bound").and_then(|v| v.as_str().map(String::from)).as_deref(), Some("IW-8"));
    let nll = status_value(dir, "test_nll").and_then(|v| v.as_float()).expect("test_nll");
    let neg_elbo = status_value(dir, "test_elbo").and_then(|v| v.as_float()).expect("test_elbo");
    // Minus the IW bound of S draws is at most minus the ELBO of the same draws, of which the
    // KL term is a part.
    assert!(nll <= neg_elbo && nll > 0.0, "{nll} {neg_elbo}");
    let kl = status_value(dir, "test_kl").and_then(|v| v.as_float()).expect("test_kl");
    assert!(kl.is_finite() && kl < neg_elbo, "{kl}");
    // The config records the kind and the resolved [model.vae].
    let cfg = std::fs::read_to_string(dir.join("config.toml")).expect("config");
    assert!(cfg.contains("kind = \"vae\"") && cfg.contains("prior_components = 4"), "{cfg}");

    let o = runner(&results).arg("report").output().expect("report");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("NLL is") && out.contains("bound IW-8") && out.contains("KL"), "{out}");

    // eval with the run's own samples reproduces the status figure; per image, nll <= -ELBO.
    let csv = tmp.path().join("e.csv");
    let o = runner(&results).arg("eval").arg(dir).arg("--out").arg(&csv).output().expect("eval");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("relative difference 0.0e0"), "{}", stdout(&o));
    let pq = tmp.path().join("e.parquet");
    let o = runner(&results).arg("eval").arg(dir).arg("--out").arg(&pq).output().expect("eval");
    assert!(o.status.success(), "{}", stderr(&o));
    let df = read_parquet(&pq);
    for (a, b) in f64_col(&df, "nll_nats").iter().zip(f64_col(&df, "neg_elbo_nats")) {
        assert!(*a <= b + 1e-9, "{a} > {b}");
    }
    let mean_kl = f64_col(&df, "kl_nats").iter().sum::<f64>() / df.height() as f64;
    assert!((mean_kl - kl).abs() < 1e-9 * kl.abs().max(1.0), "{mean_kl} vs status {kl}");

    // The latent representation: mean and log-variance of q(z|x) per test image.
    let lat = tmp.path().join("z.csv");
    let o = runner(&results).arg("encode").arg(dir).arg("--out").arg(&lat).output().expect("encode");
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&lat).expect("latents");
    assert_eq!(text.lines().next(), Some("index,mu_0,mu_1,mu_2,mu_3,log_var_0,log_var_1,log_var_2,log_var_3"));
    assert_eq!(text.lines().count(), 1 + 447, "one row per digits test image");

    // Every sampler but the predictive one draws the same grid; predictive is exit 2.
    let mut bytes = Vec::new();
    for s in ["naive", "cached", "jacobi"] {
        let png = tmp.path().join(format!("{s}.png"));
        let o = runner(&results)
            .args(["sample", dir.to_str().expect("utf8"), "--sampler", s, "--out"])
            .arg(&png)
            .output()
            .expect("sample");
        assert!(o.status.success(), "{}", stderr(&o));
        bytes.push(std::fs::read(&png).expect("png"));
    }
    assert!(bytes.windows(2).all(|w| w[0] == w[1]), "samplers drew different grids");
    let o = runner(&results)
        .args(["sample", dir.to_str().expect("utf8"), "--sampler", "predictive"])
        .output()
        .expect("sample");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn bad_vae_keys_are_one_line_errors() {
    let cases: &[(&str, &str, &str)] = &[
        ("kind = \"vae\"", "kind = \"vea\"", "model.kind"),
        ("latent = 4", "latent = 0", "model.vae.latent: must be at least 1"),
        ("backend = \"gated_pixelcnn\"", "backend = \"made\"", "cannot be a VAE decoder"),
        ("prior = \"arm\"", "prior = \"arm\"\nprior_backend = \"transformer\"", "model.vae.prior_backend"),
        ("[data]\nname = \"digits\"", "[data]\nname = \"digits\"\nordering = \"snake\"", "raster order only"),
        ("hidden = [16]", "hidden = [0]", "model.vae.prior_net.hidden"),
        ("kind = \"vae\"\n", "", "model.vae: only with model.kind"),
    ];
    for (from, to, want) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("bad.toml");
        std::fs::write(&file, TINY.replacen(from, to, 1)).expect("write");
        let results = tmp.path().join("results");
        let o = runner(&results).arg("sweep").arg(&file).output().expect("run");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{to}: {err}");
        assert!(err.contains(want) && err.contains("bad.toml"), "{to}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{to}: {err}");
        assert!(!results.join("vae_tiny").join("runs").exists(), "{to}: a run started");
    }
}

/// A VAE run (its latent draws re-seeded per epoch) stopped after epoch 1 and resumed ends with
/// the metrics, bound and weights of an uninterrupted run.
#[test]
fn a_resumed_vae_run_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("vae.toml");
    std::fs::write(&file, TINY.replace("max_epochs = 2", "max_epochs = 3")).expect("write");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = runner(&a).arg("train").arg(&file).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = runner(&b).arg("train").arg(&file).env("RUNNER_STOP_AFTER_EPOCHS", "1").output().expect("run");
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let o = runner(&b).arg("train").arg(&file).arg("--resume").output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let (da, db) = (&run_dirs(&a, "vae_tiny")[0], &run_dirs(&b, "vae_tiny")[0]);
    let (ma, mb) = (read_parquet(&da.join("metrics.parquet")), read_parquet(&db.join("metrics.parquet")));
    assert_eq!(f64_col(&ma, "val_nll").len(), 3);
    for c in ["train_nll", "val_nll"] {
        assert_eq!(f64_col(&ma, c), f64_col(&mb, c), "{c}");
    }
    for k in ["test_nll", "test_elbo"] {
        assert_eq!(status_value(da, k), status_value(db, k), "{k}");
    }
    let w = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).expect("weights");
    assert_eq!(w(da), w(db), "best weights differ");
}

/// `runner encode` on an ARM run is a one-line error (exit 2): it has no latent.
#[test]
fn encoding_an_arm_run_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = runner(tmp.path()).arg("train").arg(fixture("tiny.toml")).output().expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = &run_dirs(tmp.path(), "tiny1")[0];
    let o = runner(tmp.path()).arg("encode").arg(dir).output().expect("encode");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no latent representation"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1);
}
