//! Errors of experiment files, and where in the layers (file line, grid point, `--set`,
//! `RUNNER__*`) the offending value came from.

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

/// The first problem of a figment error, at its key path (the file is added by the caller).
/// Unknown and missing keys name the key itself, not just its table.
pub(super) fn figment_error(e: figment::Error) -> KeyError {
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

/// Where an error's key came from: a line of the file, a grid entry, `--set` or `RUNNER__*`.
pub(super) struct Origin<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    pub(super) doc: Option<toml_edit::ImDocument<&'a str>>,
    pub(super) sets: &'a [(String, toml::Value)],
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

    /// The error `e` (of the grid point `point`, whose values are `settings`) with the file,
    /// and the line or the layer its key was set in. An error at a key a variant or a search
    /// parameter set is named by where it was set (`variants.made."model.made.hidden"`).
    pub(super) fn error(&self, point: Option<&str>, settings: &[super::Setting], e: KeyError) -> ConfigError {
        let (mut line, mut from) = (None, None);
        let mut e = e;
        if let Some(key) = e.key.clone() {
            // The error is at the overridden key, inside it, or at a table it put there.
            let hits = |k: &str| within(&key, k) || within(k, &key);
            if let Some((k, v)) = self.sets.iter().rev().find(|(k, _)| hits(k)) {
                from = Some(format!("--set {k}={v}"));
            } else if let Some(var) = std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .find(|k| k.strip_prefix("RUNNER__").is_some_and(|rest| hits(&rest.to_lowercase().replace("__", "."))))
            {
                from = Some(var);
            } else if let Some(s) = settings.iter().rev().find(|s| hits(&s.key)) {
                line = self.line_of(&s.source);
                if s.rename {
                    let inner = key.strip_prefix(s.key.as_str()).filter(|_| within(&key, &s.key)).unwrap_or("");
                    e.key = Some(format!("{}{inner}", s.source));
                }
            } else {
                line = self.line_of(&key);
            }
        }
        let point = point.map(str::to_string);
        ConfigError::Invalid(Box::new(Located { file: self.file.to_string(), line, point, from, error: e }))
    }
}
