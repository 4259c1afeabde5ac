//! A resolved run as `config.toml`: written once when the run starts, read back by `report`,
//! `sample`, `eval` and `--resume`. The run id is a hash of this text, so the serialisation of
//! an existing config must never change.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use arm_train::TrainConfig;

use super::{toml_error, DataConfig, KeyError, ModelConfig, SampleConfig};

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
        // Written only for a VAE, so an ARM run's config (and id) is what it always was.
        if let Some(vae) = &self.model.vae {
            model.insert("kind".into(), "vae".into());
            model.insert("vae".into(), toml::Value::Table(vae.clone()));
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
        let vae = match model.get("kind").map(|k| k.as_str()) {
            None | Some(Some("arm")) => None,
            Some(Some("vae")) => {
                let v = typed(field(model, "model.", "vae")?, "model.vae", "a table", toml::Value::as_table)?;
                Some(v.clone())
            }
            Some(_) => return Err(RunConfigError::Type { key: "model.kind".into(), expected: "\"arm\" or \"vae\"" }),
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
                vae,
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

/// Reads the resolved config of a run folder; any problem names its `config.toml`.
pub fn read_run_config(dir: &Path) -> Result<RunConfig> {
    let p = dir.join("config.toml");
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    RunConfig::from_toml(&text).with_context(|| format!("{}: not a valid run config", p.display()))
}
