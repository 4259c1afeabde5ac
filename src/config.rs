//! Experiment files: figment layers (file <- grid point <- `RUNNER__*` env <- `--set`), grid
//! expansion (cartesian product of `[grid]` lists, `[[zip]]` groups varying together, times
//! `seeds`), validation of every run before the first one starts, and stable run ids.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// An embedded data set name.
    pub name: String,
    #[serde(default)]
    pub ordering: Ordering,
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

impl RunConfig {
    /// The resolved config as written to `config.toml` (the plugin table nested under
    /// `[model.<backend>]`, as in experiment files).
    pub fn to_toml(&self) -> String {
        let mut root = toml::Table::new();
        root.insert("name".into(), self.name.clone().into());
        root.insert("seed".into(), toml::Value::Integer(self.seed as i64));
        root.insert("data".into(), toml::Value::try_from(&self.data).unwrap_or(toml::Value::Table(Default::default())));
        let mut model = toml::Table::new();
        model.insert("backend".into(), self.model.backend.clone().into());
        model.insert("head".into(), self.model.head.clone().into());
        model.insert(self.model.backend.clone(), toml::Value::Table(self.model.plugin.clone()));
        if !self.model.head_table.is_empty() {
            model.insert(self.model.head.clone(), toml::Value::Table(self.model.head_table.clone()));
        }
        root.insert("model".into(), toml::Value::Table(model));
        root.insert("train".into(), toml::Value::try_from(&self.train).unwrap_or(toml::Value::Table(Default::default())));
        root.insert("sample".into(), toml::Value::try_from(&self.sample).unwrap_or(toml::Value::Table(Default::default())));
        if !self.grid.is_empty() {
            let g: toml::Table = self.grid.iter().cloned().collect();
            root.insert("grid_point".into(), toml::Value::Table(g));
        }
        toml::to_string(&root).unwrap_or_default()
    }

    /// Stable id: sha256 of the resolved config (grid description excluded: it only labels).
    pub fn hash(&self) -> String {
        let mut c = self.clone();
        c.grid.clear();
        c.name.clear();
        let digest = Sha256::digest(c.to_toml().as_bytes());
        digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
    }

    /// Folder name: readable grid values and seed, then the hash.
    pub fn run_id(&self) -> String {
        let mut parts: Vec<String> = self
            .grid
            .iter()
            .map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), compact(v)))
            .collect();
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
        format!("{slug}-{}", self.hash())
    }

    /// Parses a run folder's `config.toml` back.
    pub fn from_toml(text: &str) -> Result<Self> {
        let root: toml::Table = toml::from_str(text)?;
        let get = |k: &str| root.get(k).cloned().ok_or_else(|| anyhow!("missing key {k}"));
        let model = get("model")?;
        let backend = model.get("backend").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("missing model.backend"))?.to_string();
        let head = model.get("head").and_then(|v| v.as_str()).unwrap_or("categorical").to_string();
        let plugin = model.get(&backend).and_then(|v| v.as_table()).cloned().unwrap_or_default();
        let head_table = model.get(&head).and_then(|v| v.as_table()).cloned().unwrap_or_default();
        let grid = root.get("grid_point").and_then(|v| v.as_table()).map(|t| t.clone().into_iter().collect()).unwrap_or_default();
        Ok(RunConfig {
            name: get("name")?.as_str().unwrap_or_default().to_string(),
            seed: get("seed")?.as_integer().unwrap_or(0) as u64,
            data: get("data")?.try_into()?,
            model: ModelConfig { backend, head, plugin, head_table },
            train: get("train")?.try_into()?,
            sample: root.get("sample").cloned().map(|v| v.try_into()).transpose()?.unwrap_or_default(),
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

/// `key=value` from the command line; the value is read as TOML, else taken as a string.
pub fn parse_set(s: &str) -> Result<(String, toml::Value)> {
    let (k, v) = s.split_once('=').ok_or_else(|| anyhow!("--set {s:?}: expected key=value"))?;
    let k = k.trim();
    if k.is_empty() {
        bail!("--set {s:?}: empty key");
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {}", v.trim()))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.trim().to_string()));
    Ok((k.to_string(), value))
}

/// One line from a figment error: key path and message (the file is added by the caller).
fn figment_msg(e: figment::Error) -> String {
    let n = e.count();
    let first = e.into_iter().next();
    let Some(e) = first else { return "invalid configuration".into() };
    let key = e.path.join(".");
    let more = if n > 1 { format!(" (and {} more)", n - 1) } else { String::new() };
    let kind = e.kind.to_string();
    if key.is_empty() {
        format!("{kind}{more}")
    } else {
        format!("{key}: {kind}{more}")
    }
}

/// Position of a TOML syntax error as "line L, column C".
fn toml_syntax_error(text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}: ")
        })
        .unwrap_or_default();
    format!("TOML syntax error at {at}{}", e.message().trim())
}

fn grid_points(file: &ExperimentFile) -> Result<Vec<Vec<(String, toml::Value)>>, String> {
    let mut axes: Vec<Vec<Vec<(String, toml::Value)>>> = Vec::new();
    for (k, v) in &file.grid {
        let list = v.as_array().ok_or_else(|| format!("grid.\"{k}\": expected a list of values, got {v}"))?;
        if list.is_empty() {
            return Err(format!("grid.\"{k}\": the list is empty; give at least one value"));
        }
        axes.push(list.iter().map(|x| vec![(k.clone(), x.clone())]).collect());
    }
    for (i, group) in file.zip.iter().enumerate() {
        let mut len = None;
        for (k, v) in group {
            let list = v.as_array().ok_or_else(|| format!("zip[{i}].\"{k}\": expected a list of values, got {v}"))?;
            match len {
                None => len = Some(list.len()),
                Some(n) if n != list.len() => {
                    return Err(format!("zip[{i}].\"{k}\": {} values, but the group's other lists have {n}", list.len()))
                }
                _ => {}
            }
        }
        let n = len.unwrap_or(0);
        if n == 0 {
            return Err(format!("zip[{i}]: the group is empty; give lists of at least one value"));
        }
        axes.push((0..n).map(|j| group.iter().map(|(k, v)| (k.clone(), v.as_array().map(|a| a[j].clone()).unwrap_or(toml::Value::Boolean(false)))).collect()).collect());
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

/// Reads, expands and validates an experiment file. Errors are one line naming the file, the
/// key path and (for grids) the point.
pub fn load(path: &Path, sets: &[String]) -> Result<Experiment> {
    let file_s = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{file_s}: cannot read the experiment file: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| anyhow!("{file_s}: {}", toml_syntax_error(&text, &e)))?;
    let sets = sets.iter().map(|s| parse_set(s)).collect::<Result<Vec<_>>>().map_err(|e| anyhow!("{e:#}"))?;

    let layered = |point: &[(String, toml::Value)]| -> Figment {
        let mut f = Figment::from(Toml::string(&text));
        for (k, v) in point {
            f = f.merge(Serialized::default(k, v));
        }
        f = f.merge(Env::prefixed("RUNNER__").split("__"));
        for (k, v) in &sets {
            f = f.merge(Serialized::default(k, v));
        }
        f
    };
    let base: ExperimentFile = layered(&[]).extract().map_err(|e| anyhow!("{file_s}: {}", figment_msg(e)))?;
    let _ = table;
    let points = grid_points(&base).map_err(|e| anyhow!("{file_s}: {e}"))?;
    let seeds = base.seeds.clone().unwrap_or_else(|| vec![0]);
    if seeds.is_empty() {
        bail!("{file_s}: seeds: the list is empty; give at least one seed");
    }

    let mut runs = Vec::new();
    for (i, point) in points.iter().enumerate() {
        let where_ = if points.len() > 1 || !point.is_empty() {
            let desc: Vec<String> = point.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            format!("{file_s}: grid point {} ({})", i + 1, desc.join(", "))
        } else {
            file_s.clone()
        };
        let ef: ExperimentFile = layered(point).extract().map_err(|e| anyhow!("{where_}: {}", figment_msg(e)))?;
        let (data, model, train, sample) = resolve_point(&ef).map_err(|e| anyhow!("{where_}: {e}"))?;
        for &seed in &seeds {
            runs.push(RunConfig {
                name: base.name.clone(),
                seed,
                data: data.clone(),
                model: model.clone(),
                train: train.clone(),
                sample: sample.clone(),
                grid: point.clone(),
            });
        }
    }
    validate_name(&base.name).map_err(|e| anyhow!("{file_s}: name: {e}"))?;
    Ok(Experiment { name: base.name, runs })
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} must be a non-empty folder name of letters, digits, '-', '_' or '.'"))
    }
}

/// Checks one grid point's sections against the registries and the data shape.
fn resolve_point(ef: &ExperimentFile) -> Result<(DataConfig, ModelConfig, TrainConfig, SampleConfig), String> {
    let (h, w, levels) = arm_data::shape_of(&ef.data.name)
        .ok_or_else(|| format!("data.name: unknown data set {:?}: expected one of {}", ef.data.name, arm_data::DATASET_NAMES.join(", ")))?;
    let plugin = arm_backends::plugin(&ef.model.backend).map_err(|e| format!("model.backend: {e}"))?;
    if plugin.is_2d && ef.data.ordering != Ordering::Raster {
        return Err(format!(
            "data.ordering: {:?} is a 2D plugin and accepts only \"raster\", got {:?}",
            plugin.name,
            ef.data.ordering.name()
        ));
    }
    if !arm_core::head_names().contains(&ef.model.head.as_str()) {
        return Err(format!("model.head: unknown head {:?}: expected one of {}", ef.model.head, arm_core::head_names().join(", ")));
    }
    let head_in = match ef.model.tables.get(&ef.model.head) {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => toml::Table::new(),
    };
    let head_table = arm_core::resolve_head(&ef.model.head, &head_in, levels).map_err(|(k, m)| {
        if k.is_empty() {
            format!("model.{}: {m}", ef.model.head)
        } else {
            format!("model.{}.{k}: {m}", ef.model.head)
        }
    })?;
    for (k, v) in &ef.model.tables {
        let known = arm_backends::plugin_names().contains(&k.as_str()) || arm_core::head_names().contains(&k.as_str());
        if !known {
            return Err(format!(
                "model.{k}: unknown key: expected backend, head, or a table named after a plugin ({}) or head",
                arm_backends::plugin_names().join(", ")
            ));
        }
        if !v.is_table() {
            return Err(format!("model.{k}: expected a table, got {v}"));
        }
    }
    let table = match ef.model.tables.get(plugin.name) {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => toml::Table::new(),
    };
    let resolved = plugin.resolve(&table, h, w).map_err(|e| match e {
        arm_backends::PluginError::Invalid { key, msg } if key.is_empty() => format!("model.{}: {msg}", plugin.name),
        arm_backends::PluginError::Invalid { key, msg } => format!("model.{}.{key}: {msg}", plugin.name),
        other => format!("model.{}: {other}", plugin.name),
    })?;
    ef.train.validate().map_err(|(k, m)| format!("train.{k}: {m}"))?;
    if ef.sample.n == 0 {
        return Err("sample.n: must be at least 1, got 0".into());
    }
    Ok((
        ef.data.clone(),
        ModelConfig { backend: plugin.name.to_string(), head: ef.model.head.clone(), plugin: resolved, head_table },
        ef.train.clone(),
        ef.sample.clone(),
    ))
}

/// Reads the resolved config of a run folder.
pub fn read_run_config(dir: &Path) -> Result<RunConfig> {
    let p = dir.join("config.toml");
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    RunConfig::from_toml(&text).with_context(|| format!("{}: not a run config", p.display()))
}
