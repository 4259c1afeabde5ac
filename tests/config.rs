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
    exp.runs.iter().map(|r| (r.seed, r.run_id())).collect()
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
        let ch = r.model.plugin["channels"].as_integer().unwrap();
        assert_eq!(r.train.batch_size as i64, 2 * ch);
    }
    let distinct: std::collections::BTreeSet<_> = exp.runs.iter().map(|r| r.run_id()).collect();
    assert_eq!(distinct.len(), 18);
}

#[test]
fn seeds_can_differ_per_grid_point() {
    // The costly point gets one seed, the cheap one three; `seeds` is not a label.
    let text = format!("{BASE}\n[[zip]]\n\"model.causal_conv1d.channels\" = [4, 64]\nseeds = [[0, 1, 2], [7]]\n");
    let exp = load_str(&text, "t.toml", &[]).expect("loads");
    let got: Vec<(i64, u64)> =
        exp.runs.iter().map(|r| (r.model.plugin["channels"].as_integer().unwrap(), r.seed)).collect();
    assert_eq!(got, vec![(4, 0), (4, 1), (4, 2), (64, 7)]);
    for r in &exp.runs {
        assert!(r.grid.iter().all(|(k, _)| k != "seeds"), "{:?}", r.grid);
        assert!(!r.run_id().contains("seeds"));
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
