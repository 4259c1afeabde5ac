//! Likelihood heads: the per-pixel distribution p(x_d | x_<d) over K levels, from the
//! parameters the conditional gives for position d: log-probabilities for training, and draws
//! from pre-drawn noise for sampling. `categorical` is a softmax over the levels;
//! `dlogistic_mixture` the discretised logistic mixture of PixelCNN++ (Salimans et al. 2017,
//! eq. 2); `quantile` a quantile function per pixel trained with the quantile loss (Ostrovski
//! et al. 2018), which has no likelihood.

pub mod categorical;
pub mod dlogistic;
pub mod quantile;

use candle_core::Tensor;

use crate::Result;

/// A per-pixel likelihood over the levels 0..K.
pub trait Head: Send + Sync {
    /// Name used in experiment files.
    fn name(&self) -> &'static str;
    /// Number of parameters per pixel, P.
    fn num_params(&self) -> usize;
    /// Uniform noise values needed to draw one pixel.
    fn noise_dim(&self) -> usize;
    /// params (..., P), x (...) integer levels as f32 -> log p(x) in nats, shape (...).
    fn log_prob(&self, params: &Tensor, x: &Tensor) -> Result<Tensor>;
    /// params (N, P), noise (N, noise_dim) uniform in [0, 1) -> levels (N,) as f32.
    /// Deterministic given the noise, so every sampler gives identical samples.
    fn sample(&self, params: &Tensor, noise: &Tensor) -> Result<Tensor>;
    /// Whether `log_prob` is a log-likelihood in nats. A head without one (the quantile head)
    /// returns minus its per-pixel training loss there, and runs report it as a loss.
    fn likelihood(&self) -> bool {
        true
    }
}

/// Names accepted by `head = "..."`.
pub fn head_names() -> &'static [&'static str] {
    &["categorical", "dlogistic_mixture", "quantile"]
}

/// Whether the head `name` has a likelihood (see [`Head::likelihood`]): asked of the head
/// built with its defaults; true for an unknown name (its config is refused elsewhere).
pub fn has_likelihood(name: &str) -> bool {
    let head = resolve(name, &toml::Table::new(), 2).and_then(|t| build(name, &t, 2));
    head.map_or(true, |h| h.likelihood())
}

/// The first key of `table` outside `keys`, as an error listing them.
pub(crate) fn check_keys(table: &toml::Table, keys: &[&str]) -> std::result::Result<(), HeadConfigError> {
    match table.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(HeadConfigError::at(k, HeadProblem::UnknownKey(keys.join(", ")))),
        None => Ok(()),
    }
}

/// Integer `key` of `table` (`default` when absent), refused unless `ok`.
pub(crate) fn int_key(
    table: &toml::Table,
    key: &str,
    default: i64,
    ok: impl Fn(i64) -> bool,
    expected: &'static str,
) -> std::result::Result<i64, HeadConfigError> {
    match table.get(key) {
        None => Ok(default),
        Some(toml::Value::Integer(i)) if ok(*i) => Ok(*i),
        Some(v) => Err(HeadConfigError::at(key, HeadProblem::Invalid { expected, got: v.to_string() })),
    }
}

/// Number `key` of `table` (a float or an integer; `default` when absent), refused unless `ok`.
pub(crate) fn float_key(
    table: &toml::Table,
    key: &str,
    default: f64,
    ok: impl Fn(f64) -> bool,
    expected: &'static str,
) -> std::result::Result<f64, HeadConfigError> {
    let v = match table.get(key) {
        None => return Ok(default),
        Some(toml::Value::Float(f)) => Some(*f),
        Some(toml::Value::Integer(i)) => Some(*i as f64),
        Some(_) => None,
    };
    match v {
        Some(f) if ok(f) => Ok(f),
        _ => {
            let got = table.get(key).map(|v| v.to_string()).unwrap_or_default();
            Err(HeadConfigError::at(key, HeadProblem::Invalid { expected, got }))
        }
    }
}

/// One line on the head `name` for `runner list`.
pub fn summary(name: &str) -> &'static str {
    match name {
        "categorical" => "softmax over the levels",
        "dlogistic_mixture" => "discretised mixture of logistics (PixelCNN++, Salimans et al. 2017, eq. 2)",
        "quantile" => "quantile function at N fractions, quantile Huber loss (Ostrovski et al. 2018); no likelihood: runs report the loss",
        _ => "",
    }
}

/// What is wrong in a head's config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HeadProblem {
    #[error("unknown head {name:?}: expected one of {expected}")]
    UnknownHead { name: String, expected: String },
    #[error("unknown key: the categorical head has no settings")]
    NoSettings,
    #[error("unknown key: expected one of {0}")]
    UnknownKey(String),
    #[error("expected {expected}, got {got}")]
    Invalid { expected: &'static str, got: String },
    #[error("{0} is too large")]
    TooLarge(i64),
    #[error("needs at least 2 levels, data has {0}")]
    TooFewLevels(usize),
}

/// A head's config error: the key inside the head's `[model.<head>]` table it concerns (None
/// for the head's name or the data's levels) and the problem.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadConfigError {
    pub key: Option<String>,
    pub problem: HeadProblem,
}

impl HeadConfigError {
    pub fn at(key: &str, problem: HeadProblem) -> Self {
        Self { key: Some(key.to_string()), problem }
    }

    pub fn general(problem: HeadProblem) -> Self {
        Self { key: None, problem }
    }
}

impl std::fmt::Display for HeadConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{k}: {}", self.problem),
            None => write!(f, "{}", self.problem),
        }
    }
}

impl std::error::Error for HeadConfigError {}

fn unknown_head(name: &str) -> HeadConfigError {
    HeadConfigError::general(HeadProblem::UnknownHead { name: name.to_string(), expected: head_names().join(", ") })
}

/// Fills defaults into a head's (possibly empty) `[model.<head>]` table and validates it for
/// data with `levels` levels; returns the complete table.
pub fn resolve(name: &str, table: &toml::Table, levels: usize) -> std::result::Result<toml::Table, HeadConfigError> {
    match name {
        "categorical" => {
            if let Some(k) = table.keys().next() {
                return Err(HeadConfigError::at(k, HeadProblem::NoSettings));
            }
            if levels < 2 {
                return Err(HeadConfigError::general(HeadProblem::TooFewLevels(levels)));
            }
            Ok(toml::Table::new())
        }
        "dlogistic_mixture" => Ok(dlogistic::to_table(&dlogistic::from_table(table, levels)?)),
        "quantile" => Ok(quantile::to_table(&quantile::from_table(table, levels)?)),
        other => Err(unknown_head(other)),
    }
}

/// Builds a head from its resolved table.
pub fn build(name: &str, table: &toml::Table, levels: usize) -> std::result::Result<Box<dyn Head>, HeadConfigError> {
    resolve(name, table, levels)?;
    match name {
        "categorical" => Ok(Box::new(categorical::Categorical::new(levels))),
        "dlogistic_mixture" => Ok(Box::new(dlogistic::from_table(table, levels)?)),
        "quantile" => Ok(Box::new(quantile::from_table(table, levels)?)),
        other => Err(unknown_head(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_lookups_agree_with_the_built_heads() {
        for name in head_names() {
            let table = resolve(name, &toml::Table::new(), 17).expect("defaults");
            let head = build(name, &table, 17).expect("head");
            assert_eq!(head.name(), *name);
            assert_eq!(head.likelihood(), has_likelihood(name), "{name}");
            assert!(!summary(name).is_empty(), "{name} has no summary");
        }
        assert!(!has_likelihood("quantile") && has_likelihood("categorical"));
    }
}
