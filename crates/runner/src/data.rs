//! Data for a run: an embedded set by name, or a user file (CSV, NPY, parquet) with its shape,
//! levels and split given or inferred. Files are checked when the experiment is loaded, so a
//! bad file stops a sweep before anything is trained.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use polars::prelude::{DataType, ParquetReader, SerReader};

use arm_data::files::{self, FileSpec, RawImages};
use arm_data::{DataError, Dataset};

use crate::config::{DataConfig, KeyError};

fn spec(cfg: &DataConfig) -> FileSpec {
    let s = cfg.split.unwrap_or([0.8, 0.1]);
    FileSpec { height: cfg.height, width: cfg.width, levels: cfg.levels, split: (s[0], s[1]) }
}

/// A parquet file whose columns are the pixels (integers), one image per row.
fn read_parquet_images(path: &Path) -> Result<RawImages, DataError> {
    let bad = |msg: String| DataError::Format { file: path.display().to_string(), msg };
    let f = std::fs::File::open(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let df = ParquetReader::new(f).finish().map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
    let mut cols = Vec::new();
    for (c, col) in df.columns().iter().enumerate() {
        if !col.dtype().is_primitive_numeric() {
            return Err(bad(format!(
                "column {} ({:?}) is {}, expected integer pixel levels",
                c + 1,
                col.name(),
                col.dtype()
            )));
        }
        let as_f = col.cast(&DataType::Float64).map_err(|e| bad(format!("column {}: {e}", c + 1)))?;
        let v: Vec<Option<f64>> = as_f.f64().map_err(|e| bad(e.to_string()))?.iter().collect();
        cols.push(v);
    }
    let n = df.height();
    let mut rows = Vec::with_capacity(n);
    for r in 0..n {
        let mut row = Vec::with_capacity(cols.len());
        for (c, col) in cols.iter().enumerate() {
            let v = col[r].ok_or_else(|| bad(format!("row {}, column {}: missing value", r + 1, c + 1)))?;
            if v.fract() != 0.0 || !v.is_finite() {
                return Err(bad(format!("row {}, column {}: {v} is not an integer level", r + 1, c + 1)));
            }
            row.push(v as i64);
        }
        rows.push(row);
    }
    Ok(RawImages { rows, shape: None })
}

/// Problems of a user file's content name the file (and row and column), not a key.
fn load_uncached(cfg: &DataConfig) -> Result<Dataset, KeyError> {
    let Some(p) = &cfg.path else {
        return arm_data::load(&cfg.name).map_err(|e| KeyError::at("data.name", e));
    };
    let path = Path::new(p);
    if !path.is_file() {
        return Err(KeyError::at("data.path", format!("{p}: no such file")));
    }
    let is_parquet = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let loaded = if is_parquet {
        read_parquet_images(path).and_then(|raw| files::to_dataset(path, &cfg.name, raw, &spec(cfg)))
    } else {
        files::load_file(path, &spec(cfg))
    };
    let mut ds = loaded.map_err(KeyError::general)?;
    if !cfg.name.is_empty() {
        ds.name = cfg.name.clone();
    }
    Ok(ds)
}

/// Loads (and memoises: a sweep asks for the same data once per run) a run's data.
pub fn load(cfg: &DataConfig) -> Result<Dataset, KeyError> {
    static CACHE: Mutex<Option<HashMap<String, Dataset>>> = Mutex::new(None);
    let key = format!("{cfg:?}");
    if let Some(d) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).get(&key) {
        return Ok(d.clone());
    }
    let d = load_uncached(cfg)?;
    CACHE.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(key, d.clone());
    Ok(d)
}

/// (height, width, levels) of a run's data; embedded sets without loading them.
pub fn shape(cfg: &DataConfig) -> Result<(usize, usize, usize), KeyError> {
    if cfg.path.is_none() {
        return arm_data::shape_of(&cfg.name).ok_or_else(|| {
            let msg = format!(
                "unknown data set {:?}: expected one of {} (or give data.path)",
                cfg.name,
                arm_data::DATASET_NAMES.join(", ")
            );
            KeyError::at("data.name", msg)
        });
    }
    let d = load(cfg)?;
    Ok((d.height, d.width, d.levels))
}
