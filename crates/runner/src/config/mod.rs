//! Experiment files: figment layers (file <- grid point <- `RUNNER__*` env <- `--set`), grid
//! expansion (cartesian product of `[variants]`, `[grid]` lists, `[[zip]]` groups varying
//! together, times `seeds`), validation of every run before the first one starts, and stable
//! run ids.

use std::collections::BTreeMap;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use arm_core::Ordering;
use arm_train::TrainConfig;

mod errors;
mod run_config;
mod search;

use errors::{figment_error, Origin};
pub use errors::{toml_error, ConfigError, KeyError, Located};
pub use run_config::{compact, from_value, read_run_config, RunConfig, RunConfigError};
pub use search::{round4, Metric, Prune, Search};

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
    /// Named sets of dotted keys: `name = { "model.backend" = "made", ... }`.
    #[serde(default)]
    variants: BTreeMap<String, toml::Value>,
    /// Random search (and successive halving) over distributions per key.
    #[serde(default)]
    search: Option<search::SearchSection>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// An embedded data set (digits, mnist10k, mnist10k-binary), or a label for `path`.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ordering: Ordering,
    /// Order-agnostic training: one ordering drawn per batch from this list (the first is the
    /// sampling order). Empty: `ordering` alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orderings: Vec<Ordering>,
    /// Orderings averaged at evaluation (an order ensemble: the first N of `orderings`,
    /// log-mean-exp of p); default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_orders: Option<usize>,
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
    /// "arm" (the default) or "vae".
    #[serde(default)]
    kind: Option<String>,
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
    /// `model.kind = "vae"`: the resolved `[model.vae]` (the backend is then the decoder).
    pub vae: Option<toml::Table>,
}

/// The decoder name of a VAE that is not a plugin.
pub use arm_vae::FACTORIZED;

/// A whole experiment, expanded and validated.
#[derive(Debug)]
pub struct Experiment {
    pub name: String,
    pub runs: Vec<RunConfig>,
    /// The file's `[search]`, when it has one: its runs' labels hold `trial` and the drawn keys.
    pub search: Option<Search>,
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

/// A value one axis of the product sets: the dotted key, the value, and the key path it was
/// written at (`grid."train.lr"`, `zip[0]."train.lr"`, `variants.made_8masks."model.backend"`),
/// which errors name.
#[derive(Debug, Clone)]
pub(crate) struct Setting {
    pub(crate) key: String,
    pub(crate) value: toml::Value,
    pub(crate) source: String,
    /// Errors at this key are reported at `source` (variants, search parameters) rather than
    /// at the key itself with the source's line (grid and zip entries).
    pub(crate) rename: bool,
}

/// One point of an axis, or of the whole product: what it sets, how runs are labelled (grid key
/// -> value: slugs, summary columns, report rows) and how errors describe it.
#[derive(Debug, Clone, Default)]
struct Point {
    settings: Vec<Setting>,
    label: Vec<(String, toml::Value)>,
    desc: Vec<String>,
}

impl Point {
    fn join(&self, other: &Point) -> Point {
        let cat = |a: &[String], b: &[String]| a.iter().chain(b).cloned().collect();
        Point {
            settings: self.settings.iter().chain(&other.settings).cloned().collect(),
            label: self.label.iter().chain(&other.label).cloned().collect(),
            desc: cat(&self.desc, &other.desc),
        }
    }
}

/// A grid or zip entry: sets its key and labels the run with it (`seeds` sets, never labels).
fn plain(key: &str, value: toml::Value, source: String) -> Point {
    let label = if key == "seeds" { vec![] } else { vec![(key.to_string(), value.clone())] };
    let desc = vec![format!("{key} = {value}")];
    Point { settings: vec![Setting { key: key.to_string(), value, source, rename: false }], label, desc }
}

fn list_of<'a>(key: &str, v: &'a toml::Value) -> Result<&'a Vec<toml::Value>, KeyError> {
    v.as_array().ok_or_else(|| KeyError::at(key, format!("expected a list of values, got {v}")))
}

fn grid_axes(file: &ExperimentFile) -> Result<Vec<Vec<Point>>, KeyError> {
    let mut axes: Vec<Vec<Point>> = Vec::new();
    for (k, v) in &file.grid {
        let key = format!("grid.\"{k}\"");
        let list = list_of(&key, v)?;
        if list.is_empty() {
            return Err(KeyError::at(key, "the list is empty; give at least one value"));
        }
        axes.push(list.iter().map(|x| plain(k, x.clone(), key.clone())).collect());
    }
    for (i, group) in file.zip.iter().enumerate() {
        let mut len = None;
        for (k, v) in group {
            let key = format!("zip[{i}].\"{k}\"");
            let list = list_of(&key, v)?;
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
        let point = |j: usize| {
            let parts = group.iter().map(|(k, v)| {
                let value = v.as_array().and_then(|a| a.get(j)).cloned().unwrap_or(toml::Value::Boolean(false));
                plain(k, value, format!("zip[{i}].\"{k}\""))
            });
            parts.fold(Point::default(), |p, q| p.join(&q))
        };
        axes.push((0..n).map(point).collect());
    }
    Ok(axes)
}

/// Sections a variant, a grid key or a search parameter must not set: they define the product.
const AXIS_SECTIONS: [&str; 5] = ["grid", "zip", "variants", "search", "name"];

fn axis_section(key: &str) -> bool {
    AXIS_SECTIONS.iter().any(|s| key == *s || key.strip_prefix(s).is_some_and(|r| r.starts_with('.')))
}

/// `[variants]`: named sets of dotted keys, one axis whose runs are labelled `variant = NAME`.
fn variant_axis(file: &ExperimentFile) -> Result<Option<Vec<Point>>, KeyError> {
    if file.variants.is_empty() {
        return Ok(None);
    }
    let mut axis = Vec::new();
    for (name, v) in &file.variants {
        let at = format!("variants.{}", quote_key(name));
        let table = v.as_table().ok_or_else(|| {
            KeyError::at(&at, format!("expected an inline table of dotted keys, e.g. {{ \"model.backend\" = \"made\" }}, got {v}"))
        })?;
        let mut settings = Vec::new();
        for (k, value) in table {
            let source = format!("{at}.\"{k}\"");
            if axis_section(k) {
                return Err(KeyError::at(source, "a variant cannot set the experiment's name, grid, zip, variants or search"));
            }
            let axis_keys = file.grid.keys().map(|g| ("[grid]", g)).chain(file.zip.iter().flat_map(|z| z.keys().map(|g| ("[[zip]]", g))));
            if let Some((section, g)) = axis_keys.into_iter().find(|(_, g)| within_key(g, k) || within_key(k, g)) {
                return Err(KeyError::at(source, format!("also set by the {section} key \"{g}\"; set it in one place")));
            }
            settings.push(Setting { key: k.clone(), value: value.clone(), source, rename: true });
        }
        let label = vec![("variant".to_string(), toml::Value::String(name.clone()))];
        axis.push(Point { settings, label, desc: vec![format!("variant {name}")] });
    }
    Ok(Some(axis))
}

/// Whether dotted key `inner` is `outer` or lies inside it.
fn within_key(inner: &str, outer: &str) -> bool {
    inner == outer || inner.strip_prefix(outer).is_some_and(|r| r.starts_with('.'))
}

/// A table key as written in a key path: bare when it can be, quoted otherwise.
fn quote_key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        k.to_string()
    } else {
        format!("\"{}\"", k.replace('"', "\\\""))
    }
}

/// `[search]`: the trials as one axis (each sets its drawn keys; labelled `trial = i` and the
/// drawn values).
fn trial_axis(file: &ExperimentFile) -> Result<Option<(Search, Vec<Point>)>, KeyError> {
    let Some(section) = &file.search else { return Ok(None) };
    let mut taken: Vec<(String, String)> = file.grid.keys().map(|k| ("the [grid] key".to_string(), k.clone())).collect();
    taken.extend(file.zip.iter().flat_map(|z| z.keys().map(|k| ("the [[zip]] key".to_string(), k.clone()))));
    for (name, v) in &file.variants {
        let keys = v.as_table().into_iter().flat_map(|t| t.keys());
        taken.extend(keys.map(|k| (format!("variant {name}'s key"), k.clone())));
    }
    let default_seed = file.seeds.as_ref().and_then(|s| s.first().copied()).unwrap_or(0);
    let (search, trials) = section.resolve(default_seed, &taken)?;
    let axis = trials
        .into_iter()
        .enumerate()
        .map(|(i, drawn)| {
            let settings = drawn
                .iter()
                .map(|(k, v)| Setting { key: k.clone(), value: v.clone(), source: format!("search.params.\"{k}\""), rename: true })
                .collect();
            let values: Vec<String> = drawn.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            let mut label = vec![("trial".to_string(), toml::Value::Integer(i as i64))];
            label.extend(drawn);
            Point { settings, label, desc: vec![format!("trial {i} ({})", values.join(", "))] }
        })
        .collect();
    Ok(Some((search, axis)))
}

/// The cartesian product of the axes: variants, then `[grid]` keys, then `[[zip]]` groups, then
/// the trials of `[search]`.
fn grid_points(file: &ExperimentFile) -> Result<(Vec<Point>, Option<Search>), KeyError> {
    let mut axes = Vec::new();
    axes.extend(variant_axis(file)?);
    axes.extend(grid_axes(file)?);
    let search = match trial_axis(file)? {
        Some((search, axis)) => {
            axes.push(axis);
            Some(search)
        }
        None => None,
    };
    if axes.iter().try_fold(1usize, |n, a| n.checked_mul(a.len()).filter(|&n| n <= MAX_RUNS)).is_none() {
        return Err(KeyError::at("grid", format!("more than {MAX_RUNS} grid points")));
    }
    let mut points = vec![Point::default()];
    for axis in axes {
        points = points.iter().flat_map(|p| axis.iter().map(move |q| p.join(q))).collect();
    }
    Ok((points, search))
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
    let (points, search) = grid_points(&base).map_err(|e| origin.error(None, &[], e))?;
    let mut runs = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, point) in points.iter().enumerate() {
        let where_ = (points.len() > 1 || !point.desc.is_empty())
            .then(|| format!("grid point {} ({})", i + 1, point.desc.join(", ")));
        let fail = |e: KeyError| origin.error(where_.as_deref(), &point.settings, e);
        let ef: ExperimentFile =
            layered(text, &point.settings, &sets).extract().map_err(|e| fail(figment_error(e)))?;
        for run in point_runs(&base.name, &ef, &point.label, runs.len()).map_err(fail)? {
            // Two grid points that resolve to the same config would be one run trained twice.
            if let Some(j) = seen.insert(run.hash().map_err(|e| fail(KeyError::general(e)))?, i) {
                let msg = format!(
                    "the same run as grid point {} ({}): two points of the product resolve to one configuration \
                     (a key that does not apply to the point's backend is ignored)",
                    j + 1,
                    points[j].desc.join(", ")
                );
                return Err(fail(KeyError::at("grid", msg)));
            }
            runs.push(run);
        }
    }
    Ok(Experiment { name: base.name, runs, search })
}

/// The figment layers of one grid point: file <- grid values <- `RUNNER__*` <- `--set`.
fn layered(text: &str, point: &[Setting], sets: &[(String, toml::Value)]) -> Figment {
    let mut f = Figment::from(Toml::string(text));
    for s in point {
        f = f.merge(Serialized::default(&s.key, &s.value));
    }
    f = f.merge(Env::prefixed("RUNNER__").split("__"));
    for (k, v) in sets {
        f = f.merge(Serialized::default(k, v));
    }
    f
}

/// The runs of one grid point (one per seed), checked; `before` runs came from earlier points.
/// `label` names the point in slugs, summary columns and reports.
fn point_runs(
    name: &str,
    ef: &ExperimentFile,
    label: &[(String, toml::Value)],
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
        grid: label.to_vec(),
    };
    Ok(seeds.iter().map(|&s| run(s)).collect())
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
    let vae = match ef.model.kind.as_deref() {
        None | Some("arm") => false,
        Some("vae") => true,
        Some(other) => return Err(KeyError::at("model.kind", format!("expected \"arm\" or \"vae\", got {other:?}"))),
    };
    if vae && ef.model.backend == FACTORIZED {
        return resolve_factorized(ef, levels);
    }
    let plugin = arm_backends::plugin(&ef.model.backend).map_err(|e| KeyError::at("model.backend", e))?;
    let orderings = check_orderings(&ef.data)?;
    let head_table = resolve_head(&ef.model, levels)?;
    check_tables(ef, vae)?;
    let table = match ef.model.tables.get(plugin.name) {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => toml::Table::new(),
    };
    let key = if ef.data.orderings.is_empty() { "data.ordering" } else { "data.orderings" };
    plugin.check_orderings(&table, &orderings).map_err(|e| match e {
        arm_backends::PluginError::Invalid { key: k, msg } if k.is_empty() => {
            KeyError::at(key, format!("{:?}: {msg}", plugin.name))
        }
        arm_backends::PluginError::Invalid { key: k, msg } => {
            KeyError::at(format!("model.{}.{k}", plugin.name), format!("{msg} ({key} = {})", names(&orderings)))
        }
        other => KeyError::at(key, other),
    })?;
    let resolved = plugin.resolve(&table, h, w).map_err(|e| match e {
        arm_backends::PluginError::Invalid { key, msg } if key.is_empty() => {
            KeyError::at(format!("model.{}", plugin.name), msg)
        }
        arm_backends::PluginError::Invalid { key, msg } => KeyError::at(format!("model.{}.{key}", plugin.name), msg),
        other => KeyError::at(format!("model.{}", plugin.name), other),
    })?;
    check_augment(ef, &plugin, vae, h, w)?;
    let vae = if vae {
        if !plugin.conditioning {
            let takes: Vec<&str> = arm_backends::registry().iter().filter(|p| p.conditioning).map(|p| p.name).collect();
            let msg = format!("{:?} cannot be a VAE decoder: it reads no latent; expected {FACTORIZED} or one of {}", plugin.name, takes.join(", "));
            return Err(KeyError::at("model.backend", msg));
        }
        Some(resolve_vae(ef)?)
    } else {
        None
    };
    check_rest(ef)?;
    Ok((
        ef.data.clone(),
        ModelConfig { backend: plugin.name.to_string(), head: ef.model.head.clone(), plugin: resolved, head_table, vae },
        ef.train.clone(),
        ef.sample.clone(),
    ))
}

/// `train.augment` needs an ARM whose network reads a conditioning vector (the transform),
/// and transforms that keep the image's shape.
fn check_augment(ef: &ExperimentFile, plugin: &arm_backends::Plugin, vae: bool, h: usize, w: usize) -> Result<(), KeyError> {
    if ef.train.augment.is_empty() {
        return Ok(());
    }
    if vae {
        return Err(KeyError::at("train.augment", "is for ARMs; a VAE's decoder reads the latent"));
    }
    if !plugin.conditioning {
        let takes: Vec<&str> = arm_backends::registry().iter().filter(|p| p.conditioning).map(|p| p.name).collect();
        let msg = format!(
            "{:?} reads no conditioning input, which distribution augmentation gives the transform through; expected a backend among {}",
            plugin.name,
            takes.join(", ")
        );
        return Err(KeyError::at("train.augment", msg));
    }
    let list = orderings(&ef.data);
    if list != [Ordering::Raster] {
        let names: Vec<String> = list.iter().map(|o| o.name()).collect();
        let msg = format!(
            "needs the raster ordering alone (the transform reaches the network as a conditioning input, which order-wrapped networks do not read); data.ordering(s) give {}",
            names.join(", ")
        );
        return Err(KeyError::at("train.augment", msg));
    }
    for g in &ef.train.augment {
        let group = arm_data::augment::Transform::group(g).unwrap_or_default();
        if !group.iter().all(|t| t.fits(h, w)) {
            return Err(KeyError::at("train.augment", format!("{g:?} needs a square image, the data is {h}x{w}")));
        }
    }
    Ok(())
}

/// A VAE with the factorized decoder (which has no table of its own).
fn resolve_factorized(ef: &ExperimentFile, levels: usize) -> Result<(DataConfig, ModelConfig, TrainConfig, SampleConfig), KeyError> {
    check_orderings(&ef.data)?;
    let head_table = resolve_head(&ef.model, levels)?;
    check_tables(ef, true)?;
    let vae = Some(resolve_vae(ef)?);
    check_rest(ef)?;
    let model = ModelConfig { backend: FACTORIZED.into(), head: ef.model.head.clone(), plugin: toml::Table::new(), head_table, vae };
    Ok((ef.data.clone(), model, ef.train.clone(), ef.sample.clone()))
}

/// Every table under `[model]` is a plugin's, a head's, or (for a VAE) `vae`.
fn check_tables(ef: &ExperimentFile, vae: bool) -> Result<(), KeyError> {
    for (k, v) in &ef.model.tables {
        if k == "vae" && !vae {
            return Err(KeyError::at("model.vae", "only with model.kind = \"vae\""));
        }
        let known = arm_backends::plugin_names().contains(&k.as_str())
            || arm_core::head_names().contains(&k.as_str())
            || (vae && k == "vae");
        if !known {
            let msg = format!(
                "unknown key: expected kind, backend, head, vae, or a table named after a plugin ({}) or head",
                arm_backends::plugin_names().join(", ")
            );
            return Err(KeyError::at(format!("model.{k}"), msg));
        }
        if !v.is_table() {
            return Err(KeyError::at(format!("model.{k}"), format!("expected a table, got {v}")));
        }
    }
    Ok(())
}

/// `[model.vae]` resolved: defaults filled, every value checked. A VAE's decoder reads the
/// image in raster order.
fn resolve_vae(ef: &ExperimentFile) -> Result<toml::Table, KeyError> {
    let orderings = orderings(&ef.data);
    if orderings != [Ordering::Raster] {
        let key = if ef.data.orderings.is_empty() { "data.ordering" } else { "data.orderings" };
        return Err(KeyError::at(key, format!("a VAE's decoder reads raster order only, got {}", names(&orderings))));
    }
    let t = ef.model.tables.get("vae").cloned().unwrap_or(toml::Value::Table(toml::Table::new()));
    let mut cfg: arm_vae::VaeConfig = from_value(t).map_err(|e| match e.key {
        Some(k) => KeyError::at(format!("model.vae.{k}"), e.msg),
        None => KeyError::at("model.vae", e.msg),
    })?;
    cfg.validate().map_err(|e| KeyError::at(format!("model.vae.{}", e.key), e.msg))?;
    toml::Table::try_from(&cfg).map_err(|e| KeyError::at("model.vae", e.to_string()))
}

fn check_rest(ef: &ExperimentFile) -> Result<(), KeyError> {
    ef.train.validate().map_err(|e| KeyError::at(format!("train.{}", e.key), e.problem))?;
    if ef.sample.n == 0 {
        return Err(KeyError::at("sample.n", "must be at least 1, got 0"));
    }
    Ok(())
}

fn names(orderings: &[Ordering]) -> String {
    format!("[{}]", orderings.iter().map(|o| format!("{:?}", o.name())).collect::<Vec<_>>().join(", "))
}

/// The orderings a run trains with: `data.orderings`, or `data.ordering` alone.
pub fn orderings(data: &DataConfig) -> Vec<Ordering> {
    if data.orderings.is_empty() {
        vec![data.ordering]
    } else {
        data.orderings.clone()
    }
}

/// Checks `data.ordering`, `data.orderings` and `data.eval_orders` against each other.
fn check_orderings(data: &DataConfig) -> Result<Vec<Ordering>, KeyError> {
    let list = orderings(data);
    if !data.orderings.is_empty() && data.ordering != Ordering::Raster && data.ordering != list[0] {
        let msg = format!("{:?} differs from the first of data.orderings ({:?}), the sampling order", data.ordering.name(), list[0].name());
        return Err(KeyError::at("data.ordering", msg));
    }
    for (i, o) in list.iter().enumerate() {
        if list[..i].contains(o) {
            return Err(KeyError::at(format!("data.orderings[{i}]"), format!("{:?} is listed twice", o.name())));
        }
    }
    if let Some(n) = data.eval_orders {
        if n == 0 || n > list.len() {
            return Err(KeyError::at("data.eval_orders", format!("must be in 1..={} (the orderings listed), got {n}", list.len())));
        }
    }
    Ok(list)
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
