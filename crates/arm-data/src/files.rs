//! User data files: CSV (one image per row, integer levels, optional header line) and NPY
//! (integer or integral float arrays of shape (N, D) or (N, H, W)). Parquet is read by the
//! runner (which owns the parquet dependency) and handed over as rows here.
//!
//! Every problem is reported with the file, the row (image, 1-based) and the column (pixel,
//! 1-based) where it was found.

use std::path::Path;

use crate::{DataError, Dataset};

/// Images as read from a file, before shape and level checks.
#[derive(Debug, Clone)]
pub struct RawImages {
    pub rows: Vec<Vec<i64>>,
    /// (H, W) when the file says it (NPY with 3 dimensions).
    pub shape: Option<(usize, usize)>,
}

fn err(file: &Path, msg: impl Into<String>) -> DataError {
    DataError::Format { file: file.display().to_string(), msg: msg.into() }
}

/// Reads a CSV of integer levels; a first line that is not numeric is taken as a header.
pub fn read_csv(path: &Path) -> Result<RawImages, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if i == 0 && fields.iter().any(|f| f.parse::<f64>().is_err()) {
            continue; // header
        }
        let mut row = Vec::with_capacity(fields.len());
        for (c, f) in fields.iter().enumerate() {
            let v: f64 =
                f.parse().map_err(|_| err(path, format!("row {}, column {}: {f:?} is not a number", i + 1, c + 1)))?;
            if v.fract() != 0.0 || !v.is_finite() {
                return Err(err(path, format!("row {}, column {}: {f} is not an integer level", i + 1, c + 1)));
            }
            row.push(v as i64);
        }
        rows.push(row);
    }
    Ok(RawImages { rows, shape: None })
}

/// Reads a little-endian, C-order NPY array of integers (or integral floats).
pub fn read_npy(path: &Path) -> Result<RawImages, DataError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(err(path, "not an NPY file (missing \\x93NUMPY magic)"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(err(path, format!("unsupported NPY version {v}"))),
    };
    let header = bytes.get(start..start + hlen).ok_or_else(|| err(path, "truncated NPY header"))?;
    let header = String::from_utf8_lossy(header);
    let field = |key: &str| -> Option<String> {
        let at = header.find(&format!("'{key}'"))?;
        let rest = &header[at + key.len() + 2..];
        let rest = rest.trim_start().strip_prefix(':')?.trim_start();
        if let Some(r) = rest.strip_prefix('\'') {
            r.split('\'').next().map(str::to_string)
        } else if let Some(r) = rest.strip_prefix('(') {
            r.split(')').next().map(str::to_string)
        } else {
            rest.split([',', '}']).next().map(|s| s.trim().to_string())
        }
    };
    let descr = field("descr").ok_or_else(|| err(path, "NPY header has no descr"))?;
    if field("fortran_order").as_deref() == Some("True") {
        return Err(err(path, "Fortran-order arrays are not supported; save with np.ascontiguousarray"));
    }
    let dims: Vec<usize> = field("shape")
        .ok_or_else(|| err(path, "NPY header has no shape"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| err(path, format!("bad shape entry {s:?}"))))
        .collect::<Result<_, _>>()?;
    let (n, d, shape) = match dims.as_slice() {
        [n, d] => (*n, *d, None),
        [n, h, w] => (*n, h * w, Some((*h, *w))),
        other => return Err(err(path, format!("array of shape {other:?}: expected (N, D) or (N, H, W)"))),
    };
    let (size, kind) = match descr.as_str() {
        "|u1" | "u1" => (1, 'u'),
        "|i1" | "i1" => (1, 'i'),
        "<u2" => (2, 'u'),
        "<i2" => (2, 'i'),
        "<u4" => (4, 'u'),
        "<i4" => (4, 'i'),
        "<u8" => (8, 'u'),
        "<i8" => (8, 'i'),
        "<f4" => (4, 'f'),
        "<f8" => (8, 'f'),
        other => {
            return Err(err(
                path,
                format!("dtype {other:?} is not supported: use integers (uint8, int64, ...) or float32/64"),
            ))
        }
    };
    let data = &bytes[start + hlen..];
    if data.len() != n * d * size {
        return Err(err(
            path,
            format!("header says {n}x{d} values of {size} bytes, file has {} data bytes", data.len()),
        ));
    }
    let mut rows = Vec::with_capacity(n);
    for r in 0..n {
        let mut row = Vec::with_capacity(d);
        for c in 0..d {
            let off = (r * d + c) * size;
            let b = &data[off..off + size];
            let mut buf = [0u8; 8];
            buf[..size].copy_from_slice(b);
            let v: i64 = match (kind, size) {
                ('u', _) => u64::from_le_bytes(buf) as i64,
                ('i', 1) => b[0] as i8 as i64,
                ('i', 2) => i16::from_le_bytes([b[0], b[1]]) as i64,
                ('i', 4) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
                ('i', _) => i64::from_le_bytes(buf),
                (_, 4) | (_, 8) => {
                    let f = if size == 4 {
                        f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64
                    } else {
                        f64::from_le_bytes(buf)
                    };
                    if f.fract() != 0.0 || !f.is_finite() {
                        return Err(err(path, format!("row {}, column {}: {f} is not an integer level", r + 1, c + 1)));
                    }
                    f as i64
                }
                _ => 0,
            };
            row.push(v);
        }
        rows.push(row);
    }
    Ok(RawImages { rows, shape })
}

/// Options a user gives next to the file; unset ones are inferred.
#[derive(Debug, Clone, Default)]
pub struct FileSpec {
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub levels: Option<usize>,
    /// Fractions of the images for train and validation; the rest is test.
    pub split: (f64, f64),
}

/// Checks row lengths and levels, infers what is missing, and splits in file order.
pub fn to_dataset(path: &Path, name: &str, raw: RawImages, spec: &FileSpec) -> Result<Dataset, DataError> {
    let first = raw.rows.first().ok_or_else(|| err(path, "no images in the file"))?;
    let d = first.len();
    let (h, w) = match (spec.height, spec.width, raw.shape) {
        (Some(h), Some(w), _) => (h, w),
        (Some(h), None, _) if h > 0 && d % h == 0 => (h, d / h),
        (None, Some(w), _) if w > 0 && d % w == 0 => (d / w, w),
        (None, None, Some(s)) => s,
        (None, None, None) => {
            let s = (d as f64).sqrt().round() as usize;
            if s * s != d {
                return Err(err(
                    path,
                    format!("rows have {d} values, not a square image: give data.height and data.width"),
                ));
            }
            (s, s)
        }
        _ => return Err(err(path, format!("rows have {d} values, which data.height/data.width do not divide"))),
    };
    if h * w != d {
        return Err(err(path, format!("row 1: {d} values, expected data.height x data.width = {h}x{w} = {}", h * w)));
    }
    for (r, row) in raw.rows.iter().enumerate() {
        if row.len() != d {
            return Err(err(path, format!("row {}: {} values, expected {d}", r + 1, row.len())));
        }
    }
    let max = raw.rows.iter().flatten().copied().max().unwrap_or(0);
    let levels = spec.levels.unwrap_or((max + 1).max(2) as usize);
    if !(2..=256).contains(&levels) {
        return Err(err(path, format!("{levels} levels: expected 2..=256 (data.levels)")));
    }
    for (r, row) in raw.rows.iter().enumerate() {
        if let Some((c, v)) = row.iter().enumerate().find(|(_, v)| **v < 0 || **v >= levels as i64) {
            return Err(err(path, format!("row {}, column {}: level {v} is outside 0..={}", r + 1, c + 1, levels - 1)));
        }
    }
    let n = raw.rows.len();
    let (ft, fv) = spec.split;
    let train_end = ((n as f64) * ft).round() as usize;
    let val_end = (((n as f64) * (ft + fv)).round() as usize).min(n);
    if train_end == 0 || val_end <= train_end || val_end >= n {
        return Err(err(
            path,
            format!("{n} images split {ft}/{fv}/rest leaves an empty train, validation or test set (data.split)"),
        ));
    }
    let pixels: Vec<u8> = raw.rows.into_iter().flatten().map(|v| v as u8).collect();
    Ok(Dataset::from_pixels(name, (h, w), levels, &pixels, (train_end, val_end)))
}

/// Reads a CSV or NPY file by extension.
pub fn load_file(path: &Path, spec: &FileSpec) -> Result<Dataset, DataError> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    let raw = match ext.as_str() {
        "csv" => read_csv(path)?,
        "npy" => read_npy(path)?,
        other => return Err(err(path, format!("unsupported extension {other:?}: expected .csv, .npy or .parquet"))),
    };
    let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "file".into());
    to_dataset(path, &name, raw, spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FileSpec {
        FileSpec { split: (0.5, 0.25), ..Default::default() }
    }

    #[test]
    fn csv_with_header_infers_square_shape_and_levels() -> Result<(), DataError> {
        let dir = std::env::temp_dir().join(format!("armdata-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let p = dir.join("a.csv");
        std::fs::write(&p, "p0,p1,p2,p3\n0,1,2,3\n3,2,1,0\n1,1,1,1\n0,0,0,2\n").ok();
        let d = load_file(&p, &spec())?;
        assert_eq!((d.height, d.width, d.levels), (2, 2, 4));
        assert_eq!((d.train.n, d.val.n, d.test.n), (2, 1, 1));
        assert_eq!(d.test.pixels, vec![0, 0, 0, 2]);
        Ok(())
    }

    #[test]
    fn bad_values_name_the_row_and_column() {
        let dir = std::env::temp_dir().join(format!("armdata-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let cases = [
            ("0,1,2,3\n0,1,2\n", "row 2: 3 values, expected 4"),
            ("0,1,2,3\n0,1.5,2,3\n", "row 2, column 2: 1.5 is not an integer level"),
            ("0,1,2,3\n0,1,x,3\n", "row 2, column 3"),
            ("0,1,2,3\n0,1,-2,3\n", "row 2, column 3: level -2"),
        ];
        for (i, (body, want)) in cases.iter().enumerate() {
            let p = dir.join(format!("b{i}.csv"));
            std::fs::write(&p, body).ok();
            let e = load_file(&p, &spec()).expect_err("bad file accepted").to_string();
            assert!(e.contains(want) && e.contains(&format!("b{i}.csv")), "{e}");
        }
        // Levels given: a value past them is out of range.
        let p = dir.join("c.csv");
        std::fs::write(&p, "0,1,2,3\n0,1,2,3\n0,1,2,3\n0,1,2,3\n").ok();
        let s = FileSpec { levels: Some(3), ..spec() };
        let e = load_file(&p, &s).expect_err("out of range accepted").to_string();
        assert!(e.contains("row 1, column 4: level 3 is outside 0..=2"), "{e}");
    }

    /// An NPY v1 file as `np.save` writes it: magic, header padded to 64 bytes, data.
    fn npy(header: &str, data: Vec<u8>) -> Vec<u8> {
        let mut h = header.to_string();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((h.len() as u16).to_le_bytes());
        bytes.extend(h.as_bytes());
        bytes.extend(data);
        bytes
    }

    #[test]
    fn npy_uint8_and_float_arrays_round_trip() -> Result<(), DataError> {
        let dir = std::env::temp_dir().join(format!("armdata-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        // np.save of np.arange(16, dtype=np.uint8).reshape(4, 2, 2) % 3, written by hand.
        let bytes =
            npy("{'descr': '|u1', 'fortran_order': False, 'shape': (4, 2, 2), }", (0..16u8).map(|v| v % 3).collect());
        let p = dir.join("a.npy");
        std::fs::write(&p, &bytes).ok();
        let d = load_file(&p, &spec())?;
        assert_eq!((d.height, d.width, d.levels), (2, 2, 3));
        assert_eq!(d.train.pixels, vec![0, 1, 2, 0, 1, 2, 0, 1]);
        // Float data with a fraction is rejected with its position.
        let bytes = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }",
            [1.0f32.to_le_bytes(), 0.25f32.to_le_bytes()].concat(),
        );
        let p = dir.join("f.npy");
        std::fs::write(&p, &bytes).ok();
        let e = load_file(&p, &spec()).expect_err("fraction accepted").to_string();
        assert!(e.contains("row 1, column 2: 0.25"), "{e}");
        Ok(())
    }
}
