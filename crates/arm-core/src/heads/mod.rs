//! Likelihood heads: turn per-pixel parameters into log-probabilities and samples.

pub mod categorical;
pub mod dlogistic;

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
}

/// Names accepted by `head = "..."`.
pub fn head_names() -> &'static [&'static str] {
    &["categorical", "dlogistic_mixture"]
}

/// A head's config error: (key inside the head's table, what was expected).
pub type HeadConfigError = (String, String);

/// Fills defaults into a head's (possibly empty) `[model.<head>]` table and validates it for
/// data with `levels` levels; returns the complete table.
pub fn resolve_head(
    name: &str,
    table: &toml::Table,
    levels: usize,
) -> std::result::Result<toml::Table, HeadConfigError> {
    match name {
        "categorical" => {
            if let Some(k) = table.keys().next() {
                return Err((k.clone(), "unknown key: the categorical head has no settings".into()));
            }
            if levels < 2 {
                return Err((String::new(), format!("needs at least 2 levels, data has {levels}")));
            }
            Ok(toml::Table::new())
        }
        "dlogistic_mixture" => Ok(dlogistic::to_table(&dlogistic::from_table(table, levels)?)),
        other => Err((String::new(), format!("unknown head {other:?}: expected one of {}", head_names().join(", ")))),
    }
}

/// Builds a head from its resolved table.
pub fn build_head(
    name: &str,
    table: &toml::Table,
    levels: usize,
) -> std::result::Result<Box<dyn Head>, HeadConfigError> {
    resolve_head(name, table, levels)?;
    match name {
        "categorical" => Ok(Box::new(categorical::Categorical::new(levels))),
        "dlogistic_mixture" => Ok(Box::new(dlogistic::from_table(table, levels)?)),
        other => Err((String::new(), format!("unknown head {other:?}"))),
    }
}
