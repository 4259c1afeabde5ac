//! Experiment files: figment layers (file <- grid point <- `RUNNER__*` env <- `--set`), grid
//! expansion (cartesian product of `[grid]` lists, `[[zip]]` groups varying together, times
//! `seeds`), validation of every run before the first one starts, and stable run ids.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use arm_core::Ordering;
use arm_train::TrainConfig;

/// The experiment file as written (before grid expansion).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentFile {
    name: String,
    #[serde(default)]
    seeds: Option<Vec<u64>>,
    data: DataConfig,
    model: ModelSection,
    #[serde(default)]
    train: TrainConfig,
    #[serde(default)]
    sample: SampleConfig,
    #[serde(default)]
    grid: BTreeMap<String, toml::Value>,
    #[serde(default)]
    zip: Vec<BTreeMap<String, toml::Value>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// An embedded data set (digits, mnist10k, mnist10k-binary), or a label for `path`.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ordering: Ordering,
    /// A user file (.csv, .npy, .parquet), one image per row, integer levels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Image height and width; inferred for square images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Number of levels; inferred as the largest value + 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levels: Option<usize>,
    /// Fractions of the file's images for train and validation (the rest is test), in file
    /// order; default [0.8, 0.1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<[f64; 2]>,
}

#[derive(Debug, Clone, Deserialize)]
struct ModelSection {
    backend: String,
    #[serde(default = "default_head")]
    head: String,
    /// Per-plugin and per-head tables, keyed by their names.
    #[serde(flatten)]
    tables: BTreeMap<String, toml::Value>,
}

fn default_head() -> String {
    "categorical".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    /// Images in the sample grid written after training.
    pub n: usize,
    /// Seed of the sampling noise.
    pub seed: u64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self { n: 64, seed: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub backend: String,
    pub head: String,
    /// The backend's complete resolved table.
    pub plugin: toml::Table,
    /// The head's complete resolved table (empty for heads without settings).
    pub head_table: toml::Table,
}

/// One fully resolved run: everything needed to reproduce it, incl. the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub name: String,
    pub seed: u64,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub sample: SampleConfig,
    /// Grid keys and this run's values (for slugs, summary columns and reports).
    pub grid: Vec<(String, toml::Value)>,
}

/// A run config that cannot be written as, or read back from, `config.toml`.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    #[error("{section}: cannot be written as TOML: {source}")]
    Serialise { section: &'static str, source: toml::ser::Error },
    #[error("seed {0} is larger than a TOML integer can hold ({max})", max = i64::MAX)]
    SeedTooLarge(u64),
    #[error("{0}")]
    Syntax(String),
    #[error("missing key {0}")]
    Missing(String),
    #[error("{key}: expected {expected}")]
    Type { key: String, expected: &'static str },
    #[error("{0}")]
    Value(KeyError),
}

fn to_value<T: Serialize>(section: &'static str, v: &T) -> Result<toml::Value, RunConfigError> {
    toml::Value::try_from(v).map_err(|source| RunConfigError::Serialise { section, source })
}

/// `root[key]` of a config being read back, which must be there.
fn field<'a>(t: &'a toml::Table, prefix: &str, key: &str) -> Result<&'a toml::Value, RunConfigError> {
    t.get(key).ok_or_else(|| RunConfigError::Missing(format!("{prefix}{key}")))
}

fn typed<'a, T: ?Sized>(
    v: &'a toml::Value,
    key: &str,
    expected: &'static str,
    get: impl FnOnce(&'a toml::Value) -> Option<&'a T>,
) -> Result<&'a T, RunConfigError> {
    get(v).ok_or_else(|| RunConfigError::Type { key: key.to_string(), expected })
}

/// Reads back a section written from a `T`: every key its default writes must be there (the
/// serde defaults are for experiment files, not for reading a run's own record).
fn section<T: Serialize + DeserializeOwned + Default>(
    root: &toml::Table,
    key: &'static str,
) -> Result<T, RunConfigError> {
    let v = field(root, "", key)?;
    let t = typed(v, key, "a table", toml::Value::as_table)?;
    for k in to_value(key, &T::default())?.as_table().into_iter().flat_map(|d| d.keys()) {
        field(t, &format!("{key}."), k)?;
    }
    from_value(v.clone()).map_err(|e| {
        RunConfigError::Value(KeyError { key: Some(e.key.map_or(key.to_string(), |k| format!("{key}.{k}"))), ..e })
    })
}

/// Deserialises a TOML value; the error names the key path inside it (None for the value itself).
pub fn from_value<T: DeserializeOwned>(v: toml::Value) -> Result<T, KeyError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().message().trim().to_string();
        if path == "." {
            KeyError::general(msg)
        } else {
            KeyError::at(path, msg)
        }
    })
}

impl RunConfig {
    /// The resolved config as written to `config.toml` (the plugin table nested under
    /// `[model.<backend>]`, as in experiment files).
    pub fn to_toml(&self) -> Result<String, RunConfigError> {
        let mut root = toml::Table::new();
        root.insert("name".into(), self.name.clone().into());
        let seed = i64::try_from(self.seed).map_err(|_| RunConfigError::SeedTooLarge(self.seed))?;
        root.insert("seed".into(), toml::Value::Integer(seed));
        root.insert("data".into(), to_value("data", &self.data)?);
        let mut model = toml::Table::new();
        model.insert("backend".into(), self.model.backend.clone().into());
        model.insert("head".into(), self.model.head.clone().into());
        model.insert(self.model.backend.clone(), toml::Value::Table(self.model.plugin.clone()));
        if !self.model.head_table.is_empty() {
            model.insert(self.model.head.clone(), toml::Value::Table(self.model.head_table.clone()));
        }
        root.insert("model".into(), toml::Value::Table(model));
        root.insert("train".into(), to_value("train", &self.train)?);
        root.insert("sample".into(), to_value("sample", &self.sample)?);
        if !self.grid.is_empty() {
            let g: toml::Table = self.grid.iter().cloned().collect();
            root.insert("grid_point".into(), toml::Value::Table(g));
        }
        toml::to_string(&root).map_err(|source| RunConfigError::Serialise { section: "config", source })
    }

    /// Stable id: sha256 of the resolved config (grid description excluded: it only labels).
    pub fn hash(&self) -> Result<String, RunConfigError> {
        let mut c = self.clone();
        c.grid.clear();
        c.name.clear();
        let digest = Sha256::digest(c.to_toml()?.as_bytes());
        Ok(digest.iter().take(5).map(|b| format!("{b:02x}")).collect())
    }

    /// Folder name: readable grid values and seed, then the hash.
    pub fn run_id(&self) -> Result<String, RunConfigError> {
        let mut parts: Vec<String> =
            self.grid.iter().map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), compact(v))).collect();
        if parts.is_empty() {
            parts.push(self.model.backend.clone());
        }
        parts.push(format!("s{}", self.seed));
        let slug: String = parts
            .join("_")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "=-_.".contains(c) { c } else { '-' })
            .take(80)
            .collect();
        Ok(format!("{slug}-{}", self.hash()?))
    }

    /// Parses a run folder's `config.toml` back. Every key that [`RunConfig::to_toml`] writes
    /// must be there with its type: a run's record is never completed with defaults.
    pub fn from_toml(text: &str) -> Result<Self, RunConfigError> {
        let root: toml::Table = toml::from_str(text).map_err(|e| RunConfigError::Syntax(toml_error(text, &e)))?;
        let name = typed(field(&root, "", "name")?, "name", "a string", toml::Value::as_str)?;
        let seed = field(&root, "", "seed")?
            .as_integer()
            .and_then(|s| u64::try_from(s).ok())
            .ok_or_else(|| RunConfigError::Type { key: "seed".into(), expected: "an integer >= 0" })?;
        let model = typed(field(&root, "", "model")?, "model", "a table", toml::Value::as_table)?;
        let backend = typed(field(model, "model.", "backend")?, "model.backend", "a string", toml::Value::as_str)?;
        let head = typed(field(model, "model.", "head")?, "model.head", "a string", toml::Value::as_str)?;
        let plugin_key = format!("model.{backend}");
        let plugin = typed(field(model, "model.", backend)?, &plugin_key, "a table", toml::Value::as_table)?;
        // The head's table is written only when the head has settings.
        let head_key = format!("model.{head}");
        let head_table = match model.get(head) {
            Some(v) => typed(v, &head_key, "a table", toml::Value::as_table)?.clone(),
            None => toml::Table::new(),
        };
        let grid = match root.get("grid_point") {
            Some(v) => typed(v, "grid_point", "a table", toml::Value::as_table)?.clone().into_iter().collect(),
            None => Vec::new(),
        };
        Ok(RunConfig {
            name: name.to_string(),
            seed,
            data: section(&root, "data")?,
            model: ModelConfig {
                backend: backend.to_string(),
                head: head.to_string(),
                plugin: plugin.clone(),
                head_table,
            },
            train: section(&root, "train")?,
            sample: section(&root, "sample")?,
            grid,
        })
    }
}

/// Short text for a grid value: arrays joined by '-'.
pub fn compact(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(compact).collect::<Vec<_>>().join("-"),
        toml::Value::Table(t) => t.iter().map(|(k, v)| format!("{k}{}", compact(v))).collect::<Vec<_>>().join("-"),
        other => other.to_string(),
    }
}

/// A whole experiment, expanded and validated.
#[derive(Debug)]
pub struct Experiment {
    pub name: String,
    pub runs: Vec<RunConfig>,
}

/// A problem with the value at a key path of an experiment (`data.split`, `grid."train.lr"`,
/// `zip[0]`, `model.causal_conv1d.dilations[1]`), or with no key (a data file's content).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyError {
    pub key: Option<String>,
    pub msg: String,
}

impl KeyError {
    pub fn at(key: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Self { key: Some(key.into()), msg: msg.to_string() }
    }

    pub fn general(msg: impl std::fmt::Display) -> Self {
        Self { key: None, msg: msg.to_string() }
    }
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{k}: {}", self.msg),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for KeyError {}

/// An experiment file that cannot be used; one line naming the file (and where possible the
/// line, the grid point, the key and the layer the value came from).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the experiment file: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("--set {0:?}: expected key=value")]
    SetWithoutValue(String),
    #[error("--set {0:?}: empty key")]
    SetEmptyKey(String),
    #[error("{0}")]
    Invalid(Box<Located>),
}

/// A [`KeyError`] located in an experiment file: `FILE[:LINE]: [POINT: ]KEY[ (from FROM)]: MESSAGE`.
#[derive(Debug)]
pub struct Located {
    pub file: String,
    pub line: Option<usize>,
    /// The grid point, when the experiment has several.
    pub point: Option<String>,
    /// The `--set k=v` or `RUNNER__*` variable that set the key.
    pub from: Option<String>,
    pub error: KeyError,
}

impl std::fmt::Display for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": ")?;
        if let Some(p) = &self.point {
            write!(f, "{p}: ")?;
        }
        match (&self.error.key, &self.from) {
            (Some(k), Some(from)) => write!(f, "{k} (from {from}): {}", self.error.msg),
            _ => write!(f, "{}", self.error),
        }
    }
}

/// `key=value` from the command line; the value is read as TOML, else taken as a string.
pub fn parse_set(s: &str) -> Result<(String, toml::Value), ConfigError> {
    let (k, v) = s.split_once('=').ok_or_else(|| ConfigError::SetWithoutValue(s.to_string()))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(ConfigError::SetEmptyKey(s.to_string()));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {}", v.trim()))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.trim().to_string()));
    Ok((k.to_string(), value))
}

/// The first problem of a figment error, at its key path (the file is added by the caller).
/// Unknown and missing keys name the key itself, not just its table.
fn figment_error(e: figment::Error) -> KeyError {
    use figment::error::Kind;
    let n = e.count();
    let first = e.into_iter().next();
    let Some(e) = first else { return KeyError::general("invalid configuration") };
    let mut path = e.path.clone();
    let kind = match &e.kind {
        Kind::UnknownField(f, expected) => {
            if path.last() != Some(f) {
                path.push(f.clone());
            }
            let exp =
                if expected.is_empty() { String::new() } else { format!(": expected one of {}", expected.join(", ")) };
            format!("unknown key{exp}")
        }
        Kind::UnknownVariant(v, expected) => format!("unknown value {v:?}: expected one of {}", expected.join(", ")),
        Kind::InvalidType(actual, expected) if expected.starts_with("struct ") || expected.starts_with("map") => {
            format!("invalid type: found {actual}, expected a table")
        }
        Kind::MissingField(f) => {
            path.push(f.to_string());
            "missing; this key is required".into()
        }
        other => other.to_string(),
    };
    // Grid keys are dotted themselves: quote such segments; list positions read as `[i]`.
    let mut key = String::new();
    for s in &path {
        if !key.is_empty() && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{s}]"));
            continue;
        }
        if !key.is_empty() {
            key.push('.');
        }
        key.push_str(&if s.contains('.') || s.is_empty() { format!("\"{s}\"") } else { s.clone() });
    }
    let more = if n > 1 { format!(" (and {} more)", n - 1) } else { String::new() };
    if key.is_empty() {
        KeyError::general(format!("{kind}{more}"))
    } else {
        KeyError::at(key, format!("{kind}{more}"))
    }
}

/// A TOML error on one line: "line L, column C: message" (the position when the error has one).
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|s| {
            let before = text.get(..s.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}: ")
        })
        .unwrap_or_default();
    format!("{at}{}", e.message().trim())
}

fn grid_points(file: &ExperimentFile) -> Result<Vec<Vec<(String, toml::Value)>>, KeyError> {
    let mut axes: Vec<Vec<Vec<(String, toml::Value)>>> = Vec::new();
    for (k, v) in &file.grid {
        let key = format!("grid.\"{k}\"");
        let list = v.as_array().ok_or_else(|| KeyError::at(&key, format!("expected a list of values, got {v}")))?;
        if list.is_empty() {
            return Err(KeyError::at(key, "the list is empty; give at least one value"));
        }
        axes.push(list.iter().map(|x| vec![(k.clone(), x.clone())]).collect());
    }
    for (i, group) in file.zip.iter().enumerate() {
        let mut len = None;
        for (k, v) in group {
            let key = format!("zip[{i}].\"{k}\"");
            let list = v.as_array().ok_or_else(|| KeyError::at(&key, format!("expected a list of values, got {v}")))?;
            match len {
                None => len = Some(list.len()),
                Some(n) if n != list.len() => {
                    return Err(KeyError::at(
                        key,
                        format!("{} values, but the group's other lists have {n}", list.len()),
                    ))
                }
                _ => {}
            }
        }
        let n = len.unwrap_or(0);
        if n == 0 {
            return Err(KeyError::at(format!("zip[{i}]"), "the group is empty; give lists of at least one value"));
        }
        axes.push(
            (0..n)
                .map(|j| {
                    group
                        .iter()
                        .map(|(k, v)| {
                            (k.clone(), v.as_array().map(|a| a[j].clone()).unwrap_or(toml::Value::Boolean(false)))
                        })
                        .collect()
                })
                .collect(),
        );
    }
    if axes.iter().try_fold(1usize, |n, a| n.checked_mul(a.len()).filter(|&n| n <= MAX_RUNS)).is_none() {
        return Err(KeyError::at("grid", format!("more than {MAX_RUNS} grid points")));
    }
    let mut points: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    for axis in axes {
        points = points
            .into_iter()
            .flat_map(|p| axis.iter().map(move |vals| p.iter().cloned().chain(vals.iter().cloned()).collect()))
            .collect();
    }
    Ok(points)
}

/// Reads, expands and validates an experiment file. Errors are one line naming the file (and
/// the line, or the `--set` / environment variable a value came from), the grid point and the
/// key path.
pub fn load(path: &Path, sets: &[String]) -> Result<Experiment, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
    load_str(&text, &file, sets)
}

/// Most runs one experiment file may expand to (grid points x seeds): a typo such as a long
/// list in every grid key should fail with a message, not exhaust memory.
pub const MAX_RUNS: usize = 100_000;

/// [`load`] on the text of an experiment file; `file` names it in error messages. Never panics
/// on any input (tests/bad_input.rs fuzzes it).
pub fn load_str(text: &str, file: &str, sets: &[String]) -> Result<Experiment, ConfigError> {
    let _: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        file: file.to_string(),
        message: format!("TOML syntax error at {}", toml_error(text, &e)),
    })?;
    let sets = sets.iter().map(|s| parse_set(s)).collect::<Result<Vec<_>, _>>()?;
    let origin = Origin { file, text, doc: toml_edit::ImDocument::parse(text).ok(), sets: &sets };
    let base: ExperimentFile =
        layered(text, &[], &sets).extract().map_err(|e| origin.error(None, &[], figment_error(e)))?;
    validate_name(&base.name).map_err(|e| origin.error(None, &[], KeyError::at("name", e)))?;
    let points = grid_points(&base).map_err(|e| origin.error(None, &[], e))?;
    let mut runs = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, point) in points.iter().enumerate() {
        let where_ = (points.len() > 1 || !point.is_empty()).then(|| {
            let desc: Vec<String> = point.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            format!("grid point {} ({})", i + 1, desc.join(", "))
        });
        let fail = |e: KeyError| origin.error(where_.as_deref(), point, e);
        let ef: ExperimentFile = layered(text, point, &sets).extract().map_err(|e| fail(figment_error(e)))?;
        for run in point_runs(&base.name, &ef, point, runs.len()).map_err(fail)? {
            // Two grid points that resolve to the same config would be one run trained twice.
            if let Some(j) = seen.insert(run.hash().map_err(|e| fail(KeyError::general(e)))?, i) {
                let msg = format!("the same run as grid point {} (the grid lists one configuration twice)", j + 1);
                return Err(fail(KeyError::at("grid", msg)));
            }
            runs.push(run);
        }
    }
    Ok(Experiment { name: base.name, runs })
}

/// The figment layers of one grid point: file <- grid values <- `RUNNER__*` <- `--set`.
fn layered(text: &str, point: &[(String, toml::Value)], sets: &[(String, toml::Value)]) -> Figment {
    let mut f = Figment::from(Toml::string(text));
    for (k, v) in point {
        f = f.merge(Serialized::default(k, v));
    }
    f = f.merge(Env::prefixed("RUNNER__").split("__"));
    for (k, v) in sets {
        f = f.merge(Serialized::default(k, v));
    }
    f
}

/// The runs of one grid point (one per seed), checked; `before` runs came from earlier points.
fn point_runs(
    name: &str,
    ef: &ExperimentFile,
    point: &[(String, toml::Value)],
    before: usize,
) -> Result<Vec<RunConfig>, KeyError> {
    let (data, model, train, sample) = resolve_point(ef)?;
    // `seeds` may vary per grid point (a zip or grid key), e.g. fewer seeds for a costly point.
    let seeds = ef.seeds.clone().unwrap_or_else(|| vec![0]);
    if seeds.is_empty() {
        return Err(KeyError::at("seeds", "the list is empty; give at least one seed"));
    }
    if let Some(i) = (1..seeds.len()).find(|&i| seeds[..i].contains(&seeds[i])) {
        return Err(KeyError::at("seeds", format!("seed {} is listed twice", seeds[i])));
    }
    if let Some(&s) = seeds.iter().find(|&&s| i64::try_from(s).is_err()) {
        return Err(KeyError::at("seeds", RunConfigError::SeedTooLarge(s)));
    }
    if before + seeds.len() > MAX_RUNS {
        return Err(KeyError::general(format!("grid points x seeds is more than {MAX_RUNS} runs")));
    }
    let run = |seed| RunConfig {
        name: name.to_string(),
        seed,
        data: data.clone(),
        model: model.clone(),
        train: train.clone(),
        sample: sample.clone(),
        // Labels name what differs between configs; the seed is in the run id already.
        grid: point.iter().filter(|(k, _)| k != "seeds").cloned().collect(),
    };
    Ok(seeds.iter().map(|&s| run(s)).collect())
}

/// Where an error's key came from: a line of the file, a grid entry, `--set` or `RUNNER__*`.
struct Origin<'a> {
    file: &'a str,
    text: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
    sets: &'a [(String, toml::Value)],
}

/// Whether an error at key path `at` concerns the value set at key path `set` (the same key or
/// inside it).
fn within(at: &str, set: &str) -> bool {
    at == set || at.strip_prefix(set).is_some_and(|r| r.starts_with('.') || r.starts_with('['))
}

/// Splits a key path such as `grid."train.lr"`, `zip[0].x` or `model.c.dilations[1]` into
/// (segment, index) pairs.
fn key_segments(key: &str) -> Vec<(String, Option<usize>)> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut idx) = (String::new(), false, String::new());
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => out.push((std::mem::take(&mut cur), std::mem::take(&mut idx).parse().ok())),
            '[' if !quoted => {
                for d in chars.by_ref() {
                    if d == ']' {
                        break;
                    }
                    idx.push(d);
                }
            }
            c => cur.push(c),
        }
    }
    out.push((cur, idx.parse().ok()));
    out
}

impl Origin<'_> {
    /// Byte span of the key path's last segment in the file, if the file sets it.
    fn span_of(&self, key: &str) -> Option<std::ops::Range<usize>> {
        use toml_edit::TableLike;
        let segs = key_segments(key);
        let mut table: &dyn TableLike = self.doc.as_ref()?.as_table();
        let mut span = None;
        for (n, (name, idx)) in segs.iter().enumerate() {
            let last = n + 1 == segs.len();
            let (k, item) = table.get_key_value(name)?;
            span = k.span().or_else(|| item.span());
            match idx {
                None if last => {}
                None => table = item.as_table_like()?,
                Some(j) => {
                    if let Some(aot) = item.as_array_of_tables() {
                        let t = aot.get(*j)?;
                        span = t.span().or(span);
                        table = t;
                    } else {
                        let v = item.as_array()?.get(*j)?;
                        span = v.span().or(span);
                        if !last {
                            table = v.as_inline_table()?;
                        }
                    }
                }
            }
        }
        span
    }

    fn line_of(&self, key: &str) -> Option<usize> {
        let start = self.span_of(key)?.start;
        Some(self.text.get(..start)?.matches('\n').count() + 1)
    }

    /// The line of a grid key: its entry in `[grid]` or in one of the `[[zip]]` groups.
    fn grid_line(&self, grid_key: &str) -> Option<usize> {
        let quoted = format!("\"{}\"", grid_key.replace('"', ""));
        self.line_of(&format!("grid.{quoted}"))
            .or_else(|| (0..64).find_map(|i| self.line_of(&format!("zip[{i}].{quoted}"))))
    }

    /// The error `e` (of the grid point `point`, whose values are `point_keys`) with the file,
    /// and the line or the layer its key was set in.
    fn error(&self, point: Option<&str>, point_keys: &[(String, toml::Value)], e: KeyError) -> ConfigError {
        let (mut line, mut from) = (None, None);
        if let Some(key) = e.key.as_deref() {
            // The error is at the overridden key, inside it, or at a table it put there.
            let hits = |k: &str| within(key, k) || within(k, key);
            if let Some((k, v)) = self.sets.iter().rev().find(|(k, _)| hits(k)) {
                from = Some(format!("--set {k}={v}"));
            } else if let Some(var) = std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .find(|k| k.strip_prefix("RUNNER__").is_some_and(|rest| hits(&rest.to_lowercase().replace("__", "."))))
            {
                from = Some(var);
            } else if let Some((k, _)) = point_keys.iter().find(|(k, _)| hits(k)) {
                line = self.grid_line(k);
            } else {
                line = self.line_of(key);
            }
        }
        let point = point.map(str::to_string);
        ConfigError::Invalid(Box::new(Located { file: self.file.to_string(), line, point, from, error: e }))
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} must be a non-empty folder name of letters, digits, '-', '_' or '.'"))
    }
}

/// Checks one grid point's sections against the registries and the data shape.
fn resolve_point(ef: &ExperimentFile) -> Result<(DataConfig, ModelConfig, TrainConfig, SampleConfig), KeyError> {
    let (h, w, levels) = check_data(&ef.data)?;
    let plugin = arm_backends::plugin(&ef.model.backend).map_err(|e| KeyError::at("model.backend", e))?;
    if plugin.is_2d && ef.data.ordering != Ordering::Raster {
        let msg =
            format!("{:?} is a 2D plugin and accepts only \"raster\", got {:?}", plugin.name, ef.data.ordering.name());
        return Err(KeyError::at("data.ordering", msg));
    }
    let head_table = resolve_head(&ef.model, levels)?;
    for (k, v) in &ef.model.tables {
        let known = arm_backends::plugin_names().contains(&k.as_str()) || arm_core::head_names().contains(&k.as_str());
        if !known {
            let msg = format!(
                "unknown key: expected backend, head, or a table named after a plugin ({}) or head",
                arm_backends::plugin_names().join(", ")
            );
            return Err(KeyError::at(format!("model.{k}"), msg));
        }
        if !v.is_table() {
            return Err(KeyError::at(format!("model.{k}"), format!("expected a table, got {v}")));
        }
    }
    let table = match ef.model.tables.get(plugin.name) {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => toml::Table::new(),
    };
    let resolved = plugin.resolve(&table, h, w).map_err(|e| match e {
        arm_backends::PluginError::Invalid { key, msg } if key.is_empty() => {
            KeyError::at(format!("model.{}", plugin.name), msg)
        }
        arm_backends::PluginError::Invalid { key, msg } => KeyError::at(format!("model.{}.{key}", plugin.name), msg),
        other => KeyError::at(format!("model.{}", plugin.name), other),
    })?;
    ef.train.validate().map_err(|e| KeyError::at(format!("train.{}", e.key), e.problem))?;
    if ef.sample.n == 0 {
        return Err(KeyError::at("sample.n", "must be at least 1, got 0"));
    }
    Ok((
        ef.data.clone(),
        ModelConfig { backend: plugin.name.to_string(), head: ef.model.head.clone(), plugin: resolved, head_table },
        ef.train.clone(),
        ef.sample.clone(),
    ))
}

/// Checks `[data]` and returns the data's (height, width, levels).
fn check_data(data: &DataConfig) -> Result<(usize, usize, usize), KeyError> {
    if data.path.is_none() && data.name.is_empty() {
        return Err(KeyError::at("data", "give name (an embedded data set) or path (a user file)"));
    }
    if let Some([t, v]) = data.split {
        if !(t > 0.0 && v > 0.0 && t + v < 1.0) {
            return Err(KeyError::at(
                "data.split",
                format!("[{t}, {v}] must be two positive fractions with a sum below 1"),
            ));
        }
    }
    crate::data::shape(data)
}

/// The complete table of the model's head (defaults filled), checked for data with `levels`.
fn resolve_head(model: &ModelSection, levels: usize) -> Result<toml::Table, KeyError> {
    let head = &model.head;
    if !arm_core::head_names().contains(&head.as_str()) {
        let msg = format!("unknown head {head:?}: expected one of {}", arm_core::head_names().join(", "));
        return Err(KeyError::at("model.head", msg));
    }
    let table = match model.tables.get(head) {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => toml::Table::new(),
    };
    arm_core::heads::resolve(head, &table, levels).map_err(|e| match e.key {
        Some(k) => KeyError::at(format!("model.{head}.{k}"), e.problem),
        None => KeyError::at(format!("model.{head}"), e.problem),
    })
}

/// Reads the resolved config of a run folder; any problem names its `config.toml`.
pub fn read_run_config(dir: &Path) -> Result<RunConfig> {
    let p = dir.join("config.toml");
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    RunConfig::from_toml(&text).with_context(|| format!("{}: not a valid run config", p.display()))
}
