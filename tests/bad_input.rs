//! Bad experiment files: the corpus under tests/bad/ run through `runner train` and `runner
//! sweep`, and a seeded fuzzer that feeds thousands of mutated files to the config loader.
//!
//! Each tests/bad/*.toml starts with `# expect: A | B | ...`, fragments the one-line error must
//! contain (`:N:` is the line the error points at), and optionally `# args: ...`, extra
//! arguments such as `--set k=v`. Every case must exit with status 2, print exactly one line
//! starting with "error: " that names the file, never panic, and leave a results folder that
//! already exists byte-for-byte unchanged.
//! The data_* cases point at files under tests/bad/data/ (relative to the package root).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The workspace root (the tests are targets of crates/runner).
fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// (file, expected fragments, extra arguments) for every case in tests/bad/.
fn corpus() -> Vec<(PathBuf, Vec<String>, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/bad"))
        .expect("tests/bad")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read case");
            let field = |tag: &str| text.lines().find_map(|l| l.strip_prefix(tag)).map(str::trim).map(str::to_string);
            let expect = field("# expect:").unwrap_or_else(|| panic!("{}: no `# expect:` line", p.display()));
            let frags = expect.split('|').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect();
            let args = field("# args:").map(|a| a.split_whitespace().map(str::to_string).collect()).unwrap_or_default();
            (p, frags, args)
        })
        .collect()
}

/// Every file under `dir` with its bytes (folders as empty entries).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.clone(), None);
                stack.push(p);
            } else {
                out.insert(p.clone(), Some(std::fs::read(&p).expect("read")));
            }
        }
    }
    out
}

#[test]
fn every_bad_file_gets_one_line_naming_file_and_key_exit_2_and_results_untouched() {
    let cases = corpus();
    assert!(cases.len() >= 50, "only {} cases in tests/bad", cases.len());
    let tmp = tempfile::tempdir().expect("tempdir");
    // A results folder that exists already, with an experiment of the cases' name in it.
    let results = tmp.path().join("results");
    let run = results.join("bad/runs/lr=0.1_s0-0123456789");
    std::fs::create_dir_all(&run).expect("mkdir");
    std::fs::write(run.join("status.toml"), "status = \"finished\"\n").expect("write");
    std::fs::write(run.join("config.toml"), "name = \"bad\"\n").expect("write");
    std::fs::write(results.join("bad/summary.parquet"), b"PAR1 not really").expect("write");
    std::fs::write(results.join("README.md"), "results\n").expect("write");
    let before = snapshot(&results);

    let mut failures = Vec::new();
    for (file, frags, args) in &cases {
        let name = file.file_name().and_then(|n| n.to_str()).expect("name").to_string();
        for cmd in ["train", "sweep"] {
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
                .current_dir(root()) // data paths in the cases are relative to the package root
                .arg("--results")
                .arg(&results)
                .arg(cmd)
                .arg(file)
                .args(args)
                .env_remove("RUST_LOG")
                .output()
                .expect("run runner");
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            let mut why = Vec::new();
            if o.status.code() != Some(2) {
                why.push(format!("exit status {:?}", o.status.code()));
            }
            if err.trim_end().lines().count() != 1 || !err.starts_with("error: ") {
                why.push("not one line starting with \"error: \"".to_string());
            }
            if err.contains("panicked") {
                why.push("panicked".into());
            }
            for f in std::iter::once(&name).chain(frags) {
                if !err.contains(f.as_str()) {
                    why.push(format!("lacks {f:?}"));
                }
            }
            if !why.is_empty() {
                failures.push(format!("{name} ({cmd}): {}\n    stderr: {}", why.join(", "), err.trim_end()));
            }
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(snapshot(&results), before, "the results folder changed");

    // Nothing is created either where no results folder exists.
    let fresh = tmp.path().join("fresh");
    for (file, _, args) in cases.iter().take(5) {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
            .arg("--results")
            .arg(&fresh)
            .arg("sweep")
            .arg(file)
            .args(args)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2));
    }
    assert!(!fresh.exists(), "a results folder was created");
}

// ---------------------------------------------------------------------------------------------
// Fuzzing the loader: it returns Ok or Err on anything, never panics.

const KEYS: &[&str] = &[
    "name",
    "seeds",
    "data",
    "model",
    "train",
    "sample",
    "grid",
    "zip",
    "backend",
    "head",
    "ordering",
    "orderings",
    "eval_orders",
    "path",
    "height",
    "width",
    "levels",
    "split",
    "channels",
    "kernel_size",
    "dilations",
    "leaky_slope",
    "dropout",
    "optimizer",
    "lr",
    "batch_size",
    "max_epochs",
    "patience",
    "weight_decay",
    "beta1",
    "beta2",
    "eval_batch_size",
    "n",
    "seed",
    "components",
    "min_log_scale",
    "quantiles",
    "kappa",
    "\"train.lr\"",
    "\"model.causal_conv1d.kernel_size\"",
    "\"\"",
    "\"a..b\"",
    "x.y",
    "trials",
    "dist",
    "low",
    "high",
    "values",
    "method",
    "min_epochs",
    "reduction_factor",
    "enabled",
    "\"model.made.num_masks\"",
    "\"model.backend\"",
];
const HEADERS: &[&str] = &[
    "[data]",
    "[model]",
    "[train]",
    "[sample]",
    "[grid]",
    "[[zip]]",
    "[model.causal_conv1d]",
    "[model.categorical]",
    "[model.dlogistic_mixture]",
    "[model.quantile]",
    "[model.mlp]",
    "[model.pixelcnn]",
    "[[grid]]",
    "[zip]",
    "[train.lr]",
    "[model.backend]",
    "[variants]",
    "[search]",
    "[search.params]",
    "[search.prune]",
    "[[search]]",
];

fn random_value(rng: &mut ChaCha8Rng, depth: usize) -> String {
    match rng.random_range(0..17) {
        0 => "0".into(),
        1 => "-1".into(),
        2 => rng.random_range(-1000i64..1000).to_string(),
        3 => ["9223372036854775807", "-9223372036854775808", "4294967296", "18446744073709551615"]
            [rng.random_range(0..4)]
        .into(),
        4 => ["nan", "inf", "-inf", "1e308", "-0.0", "5e-324", "0.5", "1.0"][rng.random_range(0..8)].into(),
        5 => format!("{}", rng.random::<f64>() * 10.0 - 5.0),
        6 => ["true", "false"][rng.random_range(0..2)].into(),
        7 => [
            "\"digits\"",
            "\"causal_conv1d\"",
            "\"categorical\"",
            "\"dlogistic_mixture\"",
            "\"quantile\"",
            "\"adamw\"",
            "\"snake\"",
            "\"mnist10k-binary\"",
        ][rng.random_range(0..8)]
        .into(),
        8 => ["\"\"", "\"../x\"", "\"é\u{1F600}\"", "'lit'", "\"\"\"multi\nline\"\"\"", "\"a\\u0000b\""]
            [rng.random_range(0..6)]
        .into(),
        9 => "1979-05-27T07:32:00Z".into(),
        10 | 11 if depth < 3 => {
            let n = rng.random_range(0..4);
            format!("[{}]", (0..n).map(|_| random_value(rng, depth + 1)).collect::<Vec<_>>().join(", "))
        }
        12 if depth < 3 => {
            let n = rng.random_range(0..3);
            let kv: Vec<String> = (0..n)
                .map(|_| format!("{} = {}", KEYS[rng.random_range(0..KEYS.len())], random_value(rng, depth + 1)))
                .collect();
            format!("{{ {} }}", kv.join(", "))
        }
        13 => "[[1, 2], [3]]".into(),
        14 => "[]".into(),
        _ => rng.random_range(0..5).to_string(),
    }
}

fn mutate(text: &str, rng: &mut ChaCha8Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..rng.random_range(1..5) {
        let n = lines.len().max(1);
        let i = rng.random_range(0..n);
        match rng.random_range(0..10) {
            // Replace a value with one of a random type.
            0..=2 => {
                if let Some(l) = lines.get_mut(i) {
                    if let Some((k, _)) = l.split_once('=') {
                        *l = format!("{}= {}", k, random_value(rng, 0));
                    }
                }
            }
            // Insert a key = value line (known or odd keys) or a section header.
            3 | 4 => {
                let line = if rng.random_bool(0.7) {
                    format!("{} = {}", KEYS[rng.random_range(0..KEYS.len())], random_value(rng, 0))
                } else {
                    HEADERS[rng.random_range(0..HEADERS.len())].to_string()
                };
                lines.insert(i.min(lines.len()), line);
            }
            5 => {
                if !lines.is_empty() {
                    lines.remove(i.min(lines.len() - 1));
                }
            }
            6 => {
                if let Some(l) = lines.get(i).cloned() {
                    lines.insert(i, l);
                }
            }
            7 => {
                let j = rng.random_range(0..n);
                if i < lines.len() && j < lines.len() {
                    lines.swap(i, j);
                }
            }
            // Character edits: delete, duplicate or replace one character.
            _ => {
                if let Some(l) = lines.get_mut(i) {
                    let mut chars: Vec<char> = l.chars().collect();
                    if !chars.is_empty() {
                        let c = rng.random_range(0..chars.len());
                        const ALPHABET: &[char] = &[
                            '[', ']', '{', '}', '=', '"', '\'', '.', ',', '#', '-', '+', '0', '9', 'e', '_', ' ', 'é',
                            '\\',
                        ];
                        match rng.random_range(0..3) {
                            0 => {
                                chars.remove(c);
                            }
                            1 => chars.insert(c, chars[c]),
                            _ => chars[c] = ALPHABET[rng.random_range(0..ALPHABET.len())],
                        }
                    }
                    *l = chars.into_iter().collect();
                }
            }
        }
    }
    lines.join("\n")
}

#[test]
fn config_loader_never_panics_on_random_and_mutated_files() {
    let read = |dirs: &[&str]| -> Vec<String> {
        let mut out = Vec::new();
        for dir in dirs {
            let Ok(rd) = std::fs::read_dir(root().join(dir)) else { continue };
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            out.extend(files.iter().filter_map(|p| std::fs::read_to_string(p).ok()));
        }
        out
    };
    // Valid files (mutated, some stay valid) and the bad corpus (mutated further).
    let (good, bad) = (read(&["tests/fixtures", "experiments"]), read(&["tests/bad"]));
    assert!(good.len() >= 3 && !bad.is_empty());
    let sets_pool = [
        "train.lr=abc",
        "train.lr=0.01",
        "=",
        "noequals",
        "a..b=1",
        "grid.x=[1]",
        "model.causal_conv1d.dilations=[1,0]",
        ".=1",
        "seeds=[]",
        "train=3",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(20251128);
    let (mut ok, mut err) = (0usize, 0usize);
    let mut panics = Vec::new();
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..6000 {
        let pool = if rng.random_bool(0.6) { &good } else { &bad };
        let base = &pool[rng.random_range(0..pool.len())];
        let text = if i % 50 == 0 {
            // Now and then pure noise.
            (0..rng.random_range(0..200)).map(|_| rng.random_range(0x20u8..0x7f) as char).collect()
        } else {
            mutate(base, &mut rng)
        };
        let sets: Vec<String> = if rng.random_bool(0.1) {
            vec![sets_pool[rng.random_range(0..sets_pool.len())].to_string()]
        } else {
            vec![]
        };
        match std::panic::catch_unwind(|| runner::config::load_str(&text, "fuzz.toml", &sets)) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => {
                assert!(!format!("{e:#}").is_empty());
                err += 1;
            }
            Err(_) => panics.push((text, sets)),
        }
    }
    std::panic::set_hook(prev_hook);
    if let Some((text, sets)) = panics.first() {
        // Rerun the first offender with the hook back, so the panic message is shown.
        let _ = std::panic::catch_unwind(|| runner::config::load_str(text, "fuzz.toml", sets));
        panic!("{} inputs panicked; the first (sets {sets:?}):\n{text}", panics.len());
    }
    // The mutations should exercise both outcomes.
    assert!(ok > 300 && err > 3000, "ok {ok}, err {err}");
}
