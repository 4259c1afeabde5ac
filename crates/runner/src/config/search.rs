//! `[search]`: random search over distributions per key, drawn from a seed so that one file
//! gives the same trials (and run ids) on every machine, and the settings of successive
//! halving (`[search.prune]`), which the sweep carries out.
//!
//! Trials are one axis of the grid product: trial i sets the keys it drew and is labelled
//! `trial = i` plus the drawn values. Draws are portable: ChaCha8 (stream i for trial i) gives
//! 53-bit uniforms, mapped by plain float arithmetic; drawn floats are rounded to 4 significant
//! digits, so labels stay readable and a last-bit difference in `ln`/`exp` between platforms
//! cannot change a run id (short of landing exactly on a rounding boundary).

use std::collections::BTreeMap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::KeyError;

/// `[search]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SearchSection {
    #[serde(default = "random")]
    method: String,
    trials: usize,
    /// Seed of the draws (default: the first of the file's `seeds`, else 0).
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
    #[serde(default)]
    prune: Option<PruneSection>,
}

fn random() -> String {
    "random".into()
}

/// `[search.prune]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneSection {
    /// `--set search.prune.enabled=false` runs the same trials to the end.
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "val_nll")]
    metric: String,
    min_epochs: usize,
    #[serde(default = "three")]
    reduction_factor: usize,
}

fn yes() -> bool {
    true
}
fn val_nll() -> String {
    "val_nll".into()
}
fn three() -> usize {
    3
}

/// The per-epoch metric that ranks trials at a rung (lower is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    ValNll,
    ValBpd,
    TrainNll,
}

impl Metric {
    pub const NAMES: [&'static str; 3] = ["val_nll", "val_bpd", "train_nll"];

    pub fn name(self) -> &'static str {
        match self {
            Metric::ValNll => "val_nll",
            Metric::ValBpd => "val_bpd",
            Metric::TrainNll => "train_nll",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "val_nll" => Some(Metric::ValNll),
            "val_bpd" => Some(Metric::ValBpd),
            "train_nll" => Some(Metric::TrainNll),
            _ => None,
        }
    }
}

/// Successive halving: rungs at `min_epochs * reduction_factor^k` epochs below `max_epochs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Prune {
    pub metric: Metric,
    pub min_epochs: usize,
    pub reduction_factor: usize,
}

impl Prune {
    /// The rung epochs below `max_epochs` (the last segment runs to `max_epochs`).
    pub fn rungs(&self, max_epochs: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut r = self.min_epochs.max(1);
        while r < max_epochs {
            out.push(r);
            match r.checked_mul(self.reduction_factor.max(2)) {
                Some(next) => r = next,
                None => break,
            }
        }
        out
    }
}

/// A random search, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    pub trials: usize,
    pub seed: u64,
    /// The drawn keys, in the order they are drawn (sorted).
    pub keys: Vec<String>,
    /// None when the file has no `[search.prune]` or it is disabled.
    pub prune: Option<Prune>,
}

/// One key's distribution.
#[derive(Debug, Clone, PartialEq)]
enum Dist {
    Uniform { low: f64, high: f64 },
    LogUniform { low: f64, high: f64 },
    Int { low: i64, high: i64 },
    Choice(Vec<toml::Value>),
}

const DISTS: &str = "uniform, log_uniform, int, choice";

/// Reads one `[search.params]` entry; errors name `search.params."KEY".FIELD`.
fn parse_dist(key: &str, v: &toml::Value) -> Result<Dist, KeyError> {
    let at = format!("search.params.\"{key}\"");
    let example = "e.g. { dist = \"log_uniform\", low = 1e-4, high = 3e-3 }";
    let t = v.as_table().ok_or_else(|| KeyError::at(&at, format!("expected a table ({example}), got {v}")))?;
    let dist = match t.get("dist") {
        Some(toml::Value::String(s)) => s.as_str(),
        Some(other) => return Err(KeyError::at(format!("{at}.dist"), format!("expected a string ({DISTS}), got {other}"))),
        None => return Err(KeyError::at(format!("{at}.dist"), format!("missing; give one of {DISTS}"))),
    };
    let allowed: &[&str] = match dist {
        "uniform" | "log_uniform" | "int" => &["dist", "low", "high"],
        "choice" => &["dist", "values"],
        other => return Err(KeyError::at(format!("{at}.dist"), format!("unknown distribution {other:?}: expected one of {DISTS}"))),
    };
    if let Some(k) = t.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(KeyError::at(format!("{at}.{k}"), format!("unknown key for dist = {dist:?}: expected {}", allowed.join(", "))));
    }
    let field = |name: &str| {
        t.get(name).ok_or_else(|| KeyError::at(format!("{at}.{name}"), format!("missing; dist = {dist:?} needs low and high")))
    };
    let float = |name: &str| -> Result<f64, KeyError> {
        let v = field(name)?;
        let x = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        match x {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(KeyError::at(format!("{at}.{name}"), format!("expected a finite number, got {v}"))),
        }
    };
    let ordered = |low: String, high: String, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(KeyError::at(format!("{at}.low"), format!("low = {low} is above high = {high}")))
        }
    };
    Ok(match dist {
        "uniform" => {
            let (low, high) = (float("low")?, float("high")?);
            ordered(low.to_string(), high.to_string(), low <= high)?;
            Dist::Uniform { low, high }
        }
        "log_uniform" => {
            let (low, high) = (float("low")?, float("high")?);
            if low <= 0.0 {
                return Err(KeyError::at(format!("{at}.low"), format!("must be positive for log_uniform, got {low}")));
            }
            ordered(low.to_string(), high.to_string(), low <= high)?;
            Dist::LogUniform { low, high }
        }
        "int" => {
            let int = |name: &str| -> Result<i64, KeyError> {
                let v = field(name)?;
                v.as_integer().ok_or_else(|| KeyError::at(format!("{at}.{name}"), format!("expected an integer, got {v}")))
            };
            let (low, high) = (int("low")?, int("high")?);
            ordered(low.to_string(), high.to_string(), low <= high)?;
            Dist::Int { low, high }
        }
        _ => {
            let values = t
                .get("values")
                .ok_or_else(|| KeyError::at(format!("{at}.values"), "missing; dist = \"choice\" needs a list of values"))?;
            let list = values
                .as_array()
                .ok_or_else(|| KeyError::at(format!("{at}.values"), format!("expected a list, got {values}")))?;
            if list.is_empty() {
                return Err(KeyError::at(format!("{at}.values"), "the list is empty; give at least one value"));
            }
            Dist::Choice(list.clone())
        }
    })
}

/// A uniform draw in [0, 1) from the top 53 bits of one ChaCha8 word: the same on every
/// platform (no library float conversion in between).
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `x` to 4 significant digits (decimal, via the shortest round-trip formatting).
pub fn round4(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    format!("{x:.3e}").parse().unwrap_or(x)
}

impl Dist {
    fn draw(&self, rng: &mut ChaCha8Rng) -> toml::Value {
        let u = unit(rng);
        match self {
            Dist::Uniform { low, high } => toml::Value::Float(round4(low + u * (high - low)).clamp(*low, *high)),
            Dist::LogUniform { low, high } => {
                let x = (low.ln() + u * (high.ln() - low.ln())).exp();
                toml::Value::Float(round4(x).clamp(*low, *high))
            }
            Dist::Int { low, high } => {
                let span = (*high as i128 - *low as i128 + 1) as f64;
                let k = ((u * span).floor() as i128).min(*high as i128 - *low as i128);
                toml::Value::Integer((*low as i128 + k) as i64)
            }
            Dist::Choice(values) => {
                let i = ((u * values.len() as f64).floor() as usize).min(values.len() - 1);
                values[i].clone()
            }
        }
    }

    /// How many distinct values it can draw (None: practically unbounded).
    fn size(&self) -> Option<u128> {
        match self {
            Dist::Int { low, high } => Some((*high as i128 - *low as i128 + 1) as u128),
            Dist::Choice(v) => Some(v.len() as u128),
            Dist::Uniform { low, high } | Dist::LogUniform { low, high } if low == high => Some(1),
            _ => None,
        }
    }
}

/// Draws the trials: for trial i, ChaCha8 seeded with `seed` on stream i, one draw per key in
/// key order; a trial equal to an earlier one is drawn again from the same stream (so adding
/// trials never changes the earlier ones).
fn draw_trials(dists: &[(String, Dist)], trials: usize, seed: u64) -> Vec<Vec<(String, toml::Value)>> {
    let mut out: Vec<Vec<(String, toml::Value)>> = Vec::with_capacity(trials);
    for i in 0..trials {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(i as u64);
        loop {
            let t: Vec<(String, toml::Value)> = dists.iter().map(|(k, d)| (k.clone(), d.draw(&mut rng))).collect();
            if !out.contains(&t) {
                out.push(t);
                break;
            }
        }
    }
    out
}

/// Reserved top-level keys a search parameter must not set.
fn reserved(key: &str) -> bool {
    ["grid", "zip", "variants", "search", "name", "seeds"]
        .iter()
        .any(|s| key == *s || key.strip_prefix(s).is_some_and(|r| r.starts_with('.')))
}

impl SearchSection {
    /// Checks the section and draws its trials: (the search, each trial's drawn key values).
    /// `default_seed` is the first of the file's seeds. `taken` are the keys other axes set.
    pub(super) fn resolve(
        &self,
        default_seed: u64,
        taken: &[(String, String)],
    ) -> Result<(Search, Vec<Vec<(String, toml::Value)>>), KeyError> {
        if self.method != "random" {
            return Err(KeyError::at("search.method", format!("unknown method {:?}: expected \"random\"", self.method)));
        }
        if self.trials == 0 {
            return Err(KeyError::at("search.trials", "must be at least 1, got 0"));
        }
        if self.trials > super::MAX_RUNS {
            return Err(KeyError::at("search.trials", format!("more than {} trials", super::MAX_RUNS)));
        }
        if self.params.is_empty() {
            return Err(KeyError::at("search.params", "give at least one key to draw, e.g. \"train.lr\" = { dist = \"log_uniform\", low = 1e-4, high = 3e-3 }"));
        }
        let mut dists = Vec::new();
        for (k, v) in &self.params {
            let at = format!("search.params.\"{k}\"");
            if reserved(k) {
                return Err(KeyError::at(at, "a search cannot draw the experiment's name, seeds, grid, zip, variants or search"));
            }
            let clash = |t: &String| t == k || t.strip_prefix(k.as_str()).is_some_and(|r| r.starts_with('.')) || k.strip_prefix(t.as_str()).is_some_and(|r| r.starts_with('.'));
            if let Some((section, t)) = taken.iter().find(|(_, t)| clash(t)) {
                return Err(KeyError::at(at, format!("also set by {section} \"{t}\"; set it in one place")));
            }
            dists.push((k.clone(), parse_dist(k, v)?));
        }
        let space = dists.iter().try_fold(1u128, |n, (_, d)| d.size().and_then(|s| n.checked_mul(s)));
        if let Some(n) = space.filter(|&n| n < self.trials as u128) {
            return Err(KeyError::at(
                "search.trials",
                format!("{} trials, but the parameters have only {n} distinct combinations", self.trials),
            ));
        }
        let prune = match &self.prune {
            Some(p) if p.enabled => {
                let metric = Metric::parse(&p.metric).ok_or_else(|| {
                    KeyError::at("search.prune.metric", format!("unknown metric {:?}: expected one of {}", p.metric, Metric::NAMES.join(", ")))
                })?;
                if p.min_epochs == 0 {
                    return Err(KeyError::at("search.prune.min_epochs", "must be at least 1, got 0"));
                }
                if p.reduction_factor < 2 {
                    return Err(KeyError::at(
                        "search.prune.reduction_factor",
                        format!("must be at least 2, got {}", p.reduction_factor),
                    ));
                }
                Some(Prune { metric, min_epochs: p.min_epochs, reduction_factor: p.reduction_factor })
            }
            _ => None,
        };
        let seed = self.seed.unwrap_or(default_seed);
        let trials = draw_trials(&dists, self.trials, seed);
        let keys = dists.into_iter().map(|(k, _)| k).collect();
        Ok((Search { trials: self.trials, seed, keys, prune }, trials))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_four_significant_digits() {
        assert_eq!(round4(0.000123456), 0.0001235);
        assert_eq!(round4(123456.0), 123500.0);
        assert_eq!(round4(-5.43216), -5.432);
        assert_eq!(round4(0.0), 0.0);
    }

    #[test]
    fn rungs_grow_by_the_reduction_factor_below_max_epochs() {
        let p = Prune { metric: Metric::ValNll, min_epochs: 2, reduction_factor: 3 };
        assert_eq!(p.rungs(54), vec![2, 6, 18]);
        assert_eq!(p.rungs(2), Vec::<usize>::new());
        assert_eq!(p.rungs(3), vec![2]);
    }

    #[test]
    fn draws_are_fixed_by_the_seed() {
        // The first uniforms of ChaCha8 seed 0, stream 0, as this module maps them; if these
        // change, every search's trials (and run ids) change.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let u: Vec<f64> = (0..3).map(|_| unit(&mut rng)).collect();
        let mut again = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(u, (0..3).map(|_| unit(&mut again)).collect::<Vec<_>>());
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
    }
}
