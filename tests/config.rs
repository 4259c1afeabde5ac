//! Grid expansion: the cartesian product of `[grid]` axes and `[[zip]]` groups, times seeds that
//! may differ per grid point; labels and run ids.

use runner::config::load_str;

const BASE: &str = r#"
name = "x"
seeds = [0, 1, 2]

[data]
name = "digits"

[model]
backend = "causal_conv1d"

[model.causal_conv1d]
channels = 4
kernel_size = 2
dilations = [1]
"#;

fn ids(text: &str) -> Vec<(u64, String)> {
    let exp = load_str(text, "t.toml", &[]).expect("loads");
    exp.runs.iter().map(|r| (r.seed, r.run_id().expect("run id"))).collect()
}

#[test]
fn grid_times_zip_times_seeds() {
    let text = format!(
        "{BASE}\n[grid]\n\"train.lr\" = [1e-3, 3e-4]\n\n[[zip]]\n\"model.causal_conv1d.channels\" = [4, 8, 16]\n\
         \"train.batch_size\" = [8, 16, 32]\n"
    );
    let exp = load_str(&text, "t.toml", &[]).expect("loads");
    // 2 lr x 3 zipped (channels, batch) x 3 seeds; zipped keys move together.
    assert_eq!(exp.runs.len(), 18);
    for r in &exp.runs {
        let ch = r.model.plugin["channels"].as_integer().expect("channels");
        assert_eq!(r.train.batch_size as i64, 2 * ch);
    }
    let distinct: std::collections::BTreeSet<_> = exp.runs.iter().map(|r| r.run_id().expect("run id")).collect();
    assert_eq!(distinct.len(), 18);
}

#[test]
fn seeds_can_differ_per_grid_point() {
    // The costly point gets one seed, the cheap one three; `seeds` is not a label.
    let text = format!("{BASE}\n[[zip]]\n\"model.causal_conv1d.channels\" = [4, 64]\nseeds = [[0, 1, 2], [7]]\n");
    let exp = load_str(&text, "t.toml", &[]).expect("loads");
    let got: Vec<(i64, u64)> =
        exp.runs.iter().map(|r| (r.model.plugin["channels"].as_integer().expect("channels"), r.seed)).collect();
    assert_eq!(got, vec![(4, 0), (4, 1), (4, 2), (64, 7)]);
    for r in &exp.runs {
        assert!(r.grid.iter().all(|(k, _)| k != "seeds"), "{:?}", r.grid);
        assert!(!r.run_id().expect("run id").contains("seeds"));
    }
    // A run keeps its id whether its seed came from the file's list or the point's own.
    let plain = format!("{BASE}\n[[zip]]\n\"model.causal_conv1d.channels\" = [4, 64]\n");
    let a = ids(&text);
    let b = ids(&plain);
    for (seed, id) in a.iter().take(3) {
        assert!(b.contains(&(*seed, id.clone())), "{id}");
    }
}

#[test]
fn set_overrides_every_points_seeds() {
    let text = format!("{BASE}\n[[zip]]\n\"model.causal_conv1d.channels\" = [4, 64]\nseeds = [[0, 1, 2], [7]]\n");
    let exp = load_str(&text, "t.toml", &["seeds=[5]".to_string()]).expect("loads");
    assert_eq!(exp.runs.iter().map(|r| r.seed).collect::<Vec<_>>(), vec![5, 5]);
}

/// Run ids must not change between versions: a sweep finds its finished runs by their ids.
/// This is the folder name of the reference experiment's seed 0 in existing results.
#[test]
fn the_reference_run_keeps_its_id() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/reference.toml");
    let exp = runner::config::load(&file, &[]).expect("loads");
    let ids: Vec<String> = exp.runs.iter().map(|r| r.run_id().expect("run id")).collect();
    assert_eq!(ids[0], "causal_conv1d_s0-b48bde5dcf");
}

/// config.toml reads back to the same run (hence the same id), grid labels included.
#[test]
fn config_toml_round_trips() {
    let text = format!(
        "{BASE}\n[model.dlogistic_mixture]\ncomponents = 2\n\n[grid]\n\"train.lr\" = [1e-3, 3e-4]\n\
         \"model.causal_conv1d.dilations\" = [[1], [1, 2]]\n"
    )
    .replace("backend = \"causal_conv1d\"", "backend = \"causal_conv1d\"\nhead = \"dlogistic_mixture\"");
    let exp = load_str(&text, "t.toml", &[]).expect("loads");
    assert_eq!(exp.runs.len(), 12);
    for r in &exp.runs {
        let back = runner::config::RunConfig::from_toml(&r.to_toml().expect("to_toml")).expect("from_toml");
        assert_eq!(&back, r);
        assert_eq!(back.run_id().expect("id"), r.run_id().expect("id"));
    }
}

/// A config.toml missing a key, or with a value of the wrong type, is an error naming the key,
/// never completed with a default.
#[test]
fn config_toml_with_missing_or_mistyped_keys_is_an_error() {
    let exp = load_str(BASE, "t.toml", &[]).expect("loads");
    let good = exp.runs[0].to_toml().expect("to_toml");
    let cases = [
        ("seed = 0\n", "", "missing key seed"),
        ("seed = 0\n", "seed = -1\n", "seed: expected an integer >= 0"),
        ("name = \"x\"\n", "", "missing key name"),
        ("name = \"x\"\n", "name = 1\n", "name: expected a string"),
        ("lr = 0.001\n", "", "missing key train.lr"),
        ("lr = 0.001\n", "lr = \"high\"\n", "train.lr: invalid type"),
        ("lr = 0.001\n", "lr = 0.001\nlr_decai = 1\n", "train.lr_decai: unknown field"),
        ("[sample]\n", "[samples]\n", "missing key sample"),
        ("head = \"categorical\"\n", "", "missing key model.head"),
        ("ordering = \"raster\"\n", "ordering = \"spiral\"\n", "data.ordering: unknown ordering \"spiral\": expected one of raster, snake, zigzag"),
    ];
    for (from, to, says) in cases {
        assert!(good.contains(from), "{from:?} not in\n{good}");
        let text = good.replacen(from, to, 1);
        let err = runner::config::RunConfig::from_toml(&text).map(|_| ()).expect_err(says).to_string();
        assert!(err.contains(says), "{err:?} lacks {says:?}");
    }
}

/// `[variants]`: one axis of named key sets; runs are labelled `variant = NAME`, not with the
/// keys a variant set, and the keys are applied like grid values (under `--set`).
#[test]
fn variants_are_one_labelled_axis_of_the_product() {
    let text = format!(
        "{BASE}\n[grid]\n\"train.lr\" = [1e-3, 3e-4]\n\n[variants]\n\
         fvsbn = {{ \"model.backend\" = \"fvsbn\" }}\n\
         made_2 = {{ \"model.backend\" = \"made\", \"model.made.hidden\" = [8], \"model.made.num_masks\" = 2 }}\n\
         conv = {{}}\n"
    );
    let exp = load_str(&text, "t.toml", &[]).expect("loads");
    // 3 variants x 2 learning rates x 3 seeds.
    assert_eq!(exp.runs.len(), 18);
    let names: std::collections::BTreeSet<String> = exp
        .runs
        .iter()
        .map(|r| {
            assert_eq!(r.grid[0].0, "variant", "{:?}", r.grid);
            assert_eq!(r.grid.len(), 2, "{:?}", r.grid);
            let name = r.grid[0].1.as_str().expect("name").to_string();
            let backend = match name.as_str() {
                "fvsbn" => "fvsbn",
                "made_2" => "made",
                _ => "causal_conv1d",
            };
            assert_eq!(r.model.backend, backend);
            let id = r.run_id().expect("id");
            assert!(id.starts_with(&format!("variant={name}_lr=")), "{id}");
            assert!(!id.contains("backend"), "{id}");
            name
        })
        .collect();
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["conv", "fvsbn", "made_2"]);
    let made = exp.runs.iter().find(|r| r.model.backend == "made").expect("made");
    assert_eq!(made.model.plugin["num_masks"].as_integer(), Some(2));
    // --set wins over a variant's keys.
    let exp = load_str(&text, "t.toml", &["model.made.num_masks=3".to_string()]).expect("loads");
    let made = exp.runs.iter().find(|r| r.model.backend == "made").expect("made");
    assert_eq!(made.model.plugin["num_masks"].as_integer(), Some(3));
}

#[test]
fn variant_errors_name_the_variant_key_and_line() {
    let with = |v: &str| format!("{BASE}\n[variants]\nok = {{}}\n{v}\n");
    let cases = [
        ("m = { \"model.backend\" = \"made\", \"model.made.num_masks\" = 0 }", "t.toml:18:", "variants.m.\"model.made.num_masks\""),
        ("m = { \"model.backend\" = \"made\", \"model.made.num_maskz\" = 2 }", "t.toml:18:", "variants.m.\"model.made.num_maskz\""),
        ("m = { \"model.backend\" = \"madd\" }", "t.toml:18:", "unknown backend \"madd\""),
        ("m = 3", "t.toml", "variants.m: expected an inline table"),
        ("m = { \"grid.x\" = [1] }", "t.toml", "cannot set"),
    ];
    for (line, at, says) in cases {
        let err = load_str(&with(line), "t.toml", &[]).map(|_| ()).expect_err(line).to_string();
        assert!(err.starts_with(at) && err.contains(says), "{line}: {err}");
    }
    // A variant and a grid key that set the same key: one of them would silently win.
    let text = format!("{BASE}\n[grid]\n\"train.lr\" = [1e-3]\n[variants]\nfast = {{ \"train.lr\" = 1e-2 }}\n");
    let err = load_str(&text, "t.toml", &[]).map(|_| ()).expect_err("overlap").to_string();
    assert!(err.contains("variants.fast.\"train.lr\"") && err.contains("[grid]"), "{err}");
}

/// The quantile head's keys are checked like the other heads': one line naming the key, the
/// line and what was expected.
#[test]
fn quantile_head_keys_are_validated() {
    let with = |table: &str| {
        format!("{BASE}\n[model.quantile]\n{table}\n").replace("backend = \"causal_conv1d\"", "backend = \"causal_conv1d\"\nhead = \"quantile\"")
    };
    assert!(load_str(&with("quantiles = 8\nkappa = 0.0"), "t.toml", &[]).is_ok());
    let cases = [
        ("quantiles = 0", "model.quantile.quantiles: expected an integer in 1..=4096, got 0"),
        ("quantiles = 2.5", "model.quantile.quantiles"),
        ("kappa = -0.1", "model.quantile.kappa: expected a finite number >= 0, got -0.1"),
        ("kappa = nan", "model.quantile.kappa"),
        ("kapa = 1", "model.quantile.kapa: unknown key: expected one of quantiles, kappa"),
    ];
    for (table, says) in cases {
        let err = load_str(&with(table), "t.toml", &[]).map(|_| ()).expect_err(table).to_string();
        assert!(err.starts_with("t.toml:") && err.contains(says) && err.lines().count() == 1, "{table}: {err}");
    }
}
