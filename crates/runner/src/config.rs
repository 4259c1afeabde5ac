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
        root.insert(
            "train".into(),
            toml::Value::try_from(&self.train).unwrap_or(toml::Value::Table(Default::default())),
        );
        root.insert(
            "sample".into(),
            toml::Value::try_from(&self.sample).unwrap_or(toml::Value::Table(Default::default())),
        );
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
        format!("{slug}-{}", self.hash())
    }

    /// Parses a run folder's `config.toml` back.
    pub fn from_toml(text: &str) -> Result<Self> {
        let root: toml::Table = toml::from_str(text)?;
        let get = |k: &str| root.get(k).cloned().ok_or_else(|| anyhow!("missing key {k}"));
        let model = get("model")?;
        let backend =
            model.get("backend").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("missing model.backend"))?.to_string();
        let head = model.get("head").and_then(|v| v.as_str()).unwrap_or("categorical").to_string();
        let plugin = model.get(&backend).and_then(|v| v.as_table()).cloned().unwrap_or_default();
        let head_table = model.get(&head).and_then(|v| v.as_table()).cloned().unwrap_or_default();
        let grid = root
            .get("grid_point")
            .and_then(|v| v.as_table())
            .map(|t| t.clone().into_iter().collect())
            .unwrap_or_default();
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

/// One line from a figment error: `key.path: message` (the file is added by the caller).
/// Unknown and missing keys name the key itself, not just its table.
fn figment_msg(e: figment::Error) -> String {
    use figment::error::Kind;
    let n = e.count();
    let first = e.into_iter().next();
    let Some(e) = first else { return "invalid configuration".into() };
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
            let before = text.get(..s.start).unwrap_or(text);
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
                    return Err(format!(
                        "zip[{i}].\"{k}\": {} values, but the group's other lists have {n}",
                        list.len()
                    ))
                }
                _ => {}
            }
        }
        let n = len.unwrap_or(0);
        if n == 0 {
            return Err(format!("zip[{i}]: the group is empty; give lists of at least one value"));
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
        return Err(format!("grid: more than {MAX_RUNS} grid points"));
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
pub fn load(path: &Path, sets: &[String]) -> Result<Experiment> {
    let file_s = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{file_s}: cannot read the experiment file: {e}"))?;
    load_str(&text, &file_s, sets)
}

/// Most runs one experiment file may expand to (grid points x seeds): a typo such as a long
/// list in every grid key should fail with a message, not exhaust memory.
pub const MAX_RUNS: usize = 100_000;

/// [`load`] on the text of an experiment file; `file` names it in error messages. Never panics
/// on any input (tests/bad_input.rs fuzzes it).
pub fn load_str(text: &str, file: &str, sets: &[String]) -> Result<Experiment> {
    let file_s = file.to_string();
    let _: toml::Table = toml::from_str(text).map_err(|e| anyhow!("{file_s}: {}", toml_syntax_error(text, &e)))?;
    let sets = sets.iter().map(|s| parse_set(s)).collect::<Result<Vec<_>>>().map_err(|e| anyhow!("{e:#}"))?;
    let origin = Origin { file, text, doc: toml_edit::ImDocument::parse(text).ok(), sets: &sets };

    let layered = |point: &[(String, toml::Value)]| -> Figment {
        let mut f = Figment::from(Toml::string(text));
        for (k, v) in point {
            f = f.merge(Serialized::default(k, v));
        }
        f = f.merge(Env::prefixed("RUNNER__").split("__"));
        for (k, v) in &sets {
            f = f.merge(Serialized::default(k, v));
        }
        f
    };
    let base: ExperimentFile =
        layered(&[]).extract().map_err(|e| anyhow!("{}", origin.message(None, &[], &figment_msg(e))))?;
    validate_name(&base.name).map_err(|e| anyhow!("{}", origin.message(None, &[], &format!("name: {e}"))))?;
    let points = grid_points(&base).map_err(|e| anyhow!("{}", origin.message(None, &[], &e)))?;
    let mut runs = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, point) in points.iter().enumerate() {
        let where_ = (points.len() > 1 || !point.is_empty()).then(|| {
            let desc: Vec<String> = point.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            format!("grid point {} ({})", i + 1, desc.join(", "))
        });
        let fail = |e: &str| anyhow!("{}", origin.message(where_.as_deref(), point, e));
        let ef: ExperimentFile = layered(point).extract().map_err(|e| fail(&figment_msg(e)))?;
        let (data, model, train, sample) = resolve_point(&ef).map_err(|e| fail(&e))?;
        // `seeds` may vary per grid point (a zip or grid key), e.g. fewer seeds for a costly point.
        let seeds = ef.seeds.clone().unwrap_or_else(|| vec![0]);
        if seeds.is_empty() {
            return Err(fail("seeds: the list is empty; give at least one seed"));
        }
        if let Some(i) = (1..seeds.len()).find(|&i| seeds[..i].contains(&seeds[i])) {
            return Err(fail(&format!("seeds: seed {} is listed twice", seeds[i])));
        }
        if runs.len() + seeds.len() > MAX_RUNS {
            return Err(fail(&format!("grid points x seeds is more than {MAX_RUNS} runs")));
        }
        for &seed in &seeds {
            let run = RunConfig {
                name: base.name.clone(),
                seed,
                data: data.clone(),
                model: model.clone(),
                train: train.clone(),
                sample: sample.clone(),
                // Labels name what differs between configs; the seed is in the run id already.
                grid: point.iter().filter(|(k, _)| k != "seeds").cloned().collect(),
            };
            // Two grid points that resolve to the same config would be one run trained twice.
            if let Some(j) = seen.insert(run.hash(), i) {
                return Err(fail(&format!(
                    "grid: the same run as grid point {} (the grid lists one configuration twice)",
                    j + 1
                )));
            }
            runs.push(run);
        }
    }
    Ok(Experiment { name: base.name, runs })
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

    /// `FILE[:LINE]: [grid point ...: ]KEY[ (from --set ...)]: MESSAGE` for an error written as
    /// `KEY: MESSAGE` (or just `MESSAGE`).
    fn message(&self, point: Option<&str>, point_keys: &[(String, toml::Value)], err: &str) -> String {
        let key = err.split_once(": ").map(|(k, _)| k).filter(|k| !k.is_empty() && !k.contains(char::is_whitespace));
        let (mut line, mut from) = (None, None);
        if let Some(key) = key {
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
        let mut s = self.file.to_string();
        if let Some(l) = line {
            s.push_str(&format!(":{l}"));
        }
        s.push_str(": ");
        if let Some(p) = point {
            s.push_str(p);
            s.push_str(": ");
        }
        match (key, from) {
            (Some(k), Some(f)) => s.push_str(&format!("{k} (from {f}){}", &err[k.len()..])),
            _ => s.push_str(err),
        }
        s
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
fn resolve_point(ef: &ExperimentFile) -> Result<(DataConfig, ModelConfig, TrainConfig, SampleConfig), String> {
    if ef.data.path.is_none() && ef.data.name.is_empty() {
        return Err("data: give name (an embedded data set) or path (a user file)".into());
    }
    if let Some([t, v]) = ef.data.split {
        if !(t > 0.0 && v > 0.0 && t + v < 1.0) {
            return Err(format!("data.split: [{t}, {v}] must be two positive fractions with a sum below 1"));
        }
    }
    let (h, w, levels) = crate::data::shape(&ef.data)?;
    let plugin = arm_backends::plugin(&ef.model.backend).map_err(|e| format!("model.backend: {e}"))?;
    if plugin.is_2d && ef.data.ordering != Ordering::Raster {
        return Err(format!(
            "data.ordering: {:?} is a 2D plugin and accepts only \"raster\", got {:?}",
            plugin.name,
            ef.data.ordering.name()
        ));
    }
    if !arm_core::head_names().contains(&ef.model.head.as_str()) {
        return Err(format!(
            "model.head: unknown head {:?}: expected one of {}",
            ef.model.head,
            arm_core::head_names().join(", ")
        ));
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
