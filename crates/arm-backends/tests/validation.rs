//! Invalid values are rejected with an error that names the key (what `runner` shows the user
//! with the file and table path in front).

use arm_backends::plugin;

fn err(name: &str, toml_src: &str) -> String {
    let t: toml::Table = toml::from_str(toml_src).expect("test table parses");
    match plugin(name).expect("registered").resolve(&t, 8, 8) {
        Ok(_) => panic!("{name}: {toml_src:?} accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        ("mlp", "memory = 0", "memory"),
        ("mlp", "hidden = 0", "hidden"),
        ("mlp", "dropout = 1.0", "dropout"),
        ("rnn", "cell = \"lstn\"", "cell"),
        ("rnn", "layers = 0", "layers"),
        ("rnn", "hidden = 0", "hidden"),
        ("rnn", "dropout = -0.1", "dropout"),
        ("pixelcnn", "first_kernel = 1", "first_kernel"),
        ("pixelcnn", "kernel = 4", "kernel"),
        ("pixelcnn", "channels = 0", "channels"),
        ("gated_pixelcnn", "kernel = 1", "kernel"),
        ("gated_pixelcnn", "layers = 0", "layers"),
        ("gated_pixelcnn", "channels = \"many\"", "channels"),
        ("transformer", "width = 12\nheads = 5", "heads"),
        ("transformer", "heads = 0", "heads"),
        ("transformer", "depth = 0", "depth"),
        ("transformer", "width = 0", "width"),
        ("transformer", "mlp_ratio = 0", "mlp_ratio"),
        ("transformer", "dropout = -0.1", "dropout"),
        ("transformer", "dropout = 1.0", "dropout"),
        ("transformer", "positions = \"sinusoidal\"", "positions"),
    ];
    for (name, src, key) in cases {
        let e = err(name, src);
        assert!(e.starts_with(&format!("{key}:")), "{name} {src:?}: {e}");
    }
    // A linear finite-memory model (no hidden layer) needs no width.
    let t: toml::Table = toml::from_str("depth = 0\nhidden = 0").expect("parses");
    assert!(plugin("mlp").expect("registered").resolve(&t, 8, 8).is_ok());
}
