//! User data files: CSV (one image per row, integer levels, optional header line) and NPY
//! (integer or integral float arrays of shape (N, D) or (N, H, W)). The formats themselves are
//! the libraries' business: the `csv` crate splits records (quoting, CRLF, byte-order mark) and
//! `npyz` parses NPY headers and dtypes (either byte order); this file checks what they return.
//! Parquet is read by the runner (which owns the parquet dependency) and handed over as rows here.
//!
//! Every problem is reported with the file, the row (image, 1-based) and the column (pixel,
//! 1-based) where it was found; for CSV also the file's line when a header or blank lines
//! make it differ from the row.

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

/// Reads a CSV of integer levels (the `csv` crate: quoted fields, CRLF line ends and a UTF-8
/// byte-order mark are handled there). A first record that is not all numbers is a header.
/// Errors count rows as images (the header is not one) and add the file's line where they differ.
pub fn read_csv(path: &Path) -> Result<RawImages, DataError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    // flexible: ragged rows reach `to_dataset`, whose message names the row and both lengths.
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(bytes.as_slice());
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    let mut first = true;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(err(path, format!("cannot read row {}: {e}", rows.len() + 1))),
        }
        // The csv crate skips empty lines; a line of spaces is one empty field after trimming.
        if record.len() == 1 && record[0].is_empty() {
            continue;
        }
        let number = |f: &[u8]| std::str::from_utf8(f).ok().and_then(|s| s.parse::<f64>().ok());
        if std::mem::take(&mut first) && record.iter().any(|f| number(f).is_none()) {
            continue; // header
        }
        let r = rows.len() + 1;
        let start = record.position().map_or(0, |p| p.byte() as usize);
        let at = |c: usize| {
            let line = line_of(&bytes, start);
            let line = if line == r { String::new() } else { format!(" (line {line})") };
            format!("row {r}, column {}{line}", c + 1)
        };
        let mut row = Vec::with_capacity(record.len());
        for (c, f) in record.iter().enumerate() {
            let text = String::from_utf8_lossy(f);
            let v = number(f).ok_or_else(|| err(path, format!("{}: {text:?} is not a number", at(c))))?;
            if v.fract() != 0.0 || !v.is_finite() {
                return Err(err(path, format!("{}: {text} is not an integer level", at(c))));
            }
            row.push(v as i64); // saturates; `to_dataset` then reports the level as out of range
        }
        rows.push(row);
    }
    Ok(RawImages { rows, shape: None })
}

/// The 1-based line on which a record starts. The csv crate's record position is where the
/// previous record ended: before the `\n` of a CRLF and before skipped blank lines.
fn line_of(bytes: &[u8], start: usize) -> usize {
    let start = start.min(bytes.len());
    let skipped = bytes[start..].iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
    1 + bytes[..start + skipped].iter().filter(|&&b| b == b'\n').count()
}

/// Reads a C-order NPY array (the `npyz` crate parses the header and the byte order) of
/// integers (u1..u8, i1..i8) or integral floats (f4, f8), shaped (N, D) or (N, H, W).
pub fn read_npy(path: &Path) -> Result<RawImages, DataError> {
    use npyz::TypeChar::{Float, Int, Uint};

    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    if !bytes.starts_with(b"\x93NUMPY") {
        return Err(err(path, "not an NPY file (missing \\x93NUMPY magic)"));
    }
    let mut data: &[u8] = &bytes;
    // Leaves `data` at the first byte after the header.
    let header = npyz::NpyHeader::from_reader(&mut data).map_err(|e| err(path, format!("bad NPY header: {e}")))?;
    if header.order() == npyz::Order::Fortran {
        return Err(err(path, "Fortran-order arrays are not supported; save with np.ascontiguousarray"));
    }
    let dims: Vec<usize> = header.shape().iter().map(|&v| usize::try_from(v).unwrap_or(usize::MAX)).collect();
    let (n, d, shape) = match dims.as_slice() {
        [n, d] => (*n, *d, None),
        [n, h, w] => (*n, h.saturating_mul(*w), Some((*h, *w))),
        other => return Err(err(path, format!("array of shape {other:?}: expected (N, D) or (N, H, W)"))),
    };
    if d == 0 {
        return Err(err(path, format!("array of shape {dims:?} has no pixels")));
    }
    let dtype = header.dtype();
    let kind = match &dtype {
        npyz::DType::Plain(t) if matches!(t.type_char(), Int | Uint) && [1, 2, 4, 8].contains(&t.size_field()) => {
            Some((t.type_char(), t.size_field() as usize))
        }
        npyz::DType::Plain(t) if t.type_char() == Float && [4, 8].contains(&t.size_field()) => {
            Some((Float, t.size_field() as usize))
        }
        _ => None,
    };
    let Some((kind, size)) = kind else {
        return Err(err(
            path,
            format!(
                "dtype {:?} is not supported: use integers (uint8, int64, ...) or float32/64",
                dtype.descr().trim_matches('\'')
            ),
        ));
    };
    if Some(data.len()) != n.checked_mul(d).and_then(|v| v.checked_mul(size)) {
        return Err(err(
            path,
            format!("header says {n}x{d} values of {size} bytes, file has {} data bytes", data.len()),
        ));
    }
    let npy = npyz::NpyFile::with_header(header, data);
    let read = |e: std::io::Error| err(path, format!("cannot read the NPY data: {e}"));
    // Unsigned 64-bit values past i64::MAX saturate; `to_dataset` reports them as out of range.
    let values: Vec<i64> = match (kind, size) {
        (Uint, 1) => npy.into_vec::<u8>().map_err(read)?.into_iter().map(i64::from).collect(),
        (Uint, 2) => npy.into_vec::<u16>().map_err(read)?.into_iter().map(i64::from).collect(),
        (Uint, 4) => npy.into_vec::<u32>().map_err(read)?.into_iter().map(i64::from).collect(),
        (Uint, _) => {
            npy.into_vec::<u64>().map_err(read)?.into_iter().map(|v| i64::try_from(v).unwrap_or(i64::MAX)).collect()
        }
        (Int, 1) => npy.into_vec::<i8>().map_err(read)?.into_iter().map(i64::from).collect(),
        (Int, 2) => npy.into_vec::<i16>().map_err(read)?.into_iter().map(i64::from).collect(),
        (Int, 4) => npy.into_vec::<i32>().map_err(read)?.into_iter().map(i64::from).collect(),
        (Int, _) => npy.into_vec::<i64>().map_err(read)?,
        (_, 4) => integral(path, d, npy.into_vec::<f32>().map_err(read)?.into_iter().map(f64::from))?,
        _ => integral(path, d, npy.into_vec::<f64>().map_err(read)?.into_iter())?,
    };
    let rows = values.chunks(d).map(<[i64]>::to_vec).collect();
    Ok(RawImages { rows, shape })
}

/// Float pixels must be whole numbers; the first one that is not is reported with its place.
fn integral(path: &Path, d: usize, values: impl Iterator<Item = f64>) -> Result<Vec<i64>, DataError> {
    values
        .enumerate()
        .map(|(i, f)| {
            if f.fract() != 0.0 || !f.is_finite() {
                let (r, c) = (i / d, i % d);
                return Err(err(path, format!("row {}, column {}: {f} is not an integer level", r + 1, c + 1)));
            }
            Ok(f as i64)
        })
        .collect()
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
        while !(10 + h.len() + 1).is_multiple_of(64) {
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

    fn write(dir: &str, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("armdata-{dir}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let p = dir.join(name);
        std::fs::write(&p, bytes).ok();
        p
    }

    /// What the `csv` crate handles that splitting lines on commas did not (or did by luck).
    #[test]
    fn csv_quotes_crlf_bom_and_blank_lines() -> Result<(), DataError> {
        let cases: [(&str, &[u8]); 5] = [
            ("quoted.csv", b"\"p0\",\"p1\"\n\"1\",\"2\"\n\" 3 \",0\n"),
            ("crlf.csv", b"p0,p1\r\n1,2\r\n3,0\r\n"),
            ("bom.csv", b"\xef\xbb\xbf1,2\n3,0\n"),
            ("blank.csv", b"\n1,2\n\n   \n3,0\n\n"),
            ("spaces.csv", b" p0 , p1 \n 1 , 2 \n3,  0\n"),
        ];
        for (name, body) in cases {
            let raw = read_csv(&write("csv", name, body))?;
            assert_eq!(raw.rows, vec![vec![1, 2], vec![3, 0]], "{name}");
        }
        // A quoted field may hold the delimiter: it is one field, and not a number.
        let e = read_csv(&write("csv", "comma.csv", b"1,2\n\"3,4\",0\n")).expect_err("accepted").to_string();
        assert!(e.contains("row 2, column 1: \"3,4\" is not a number"), "{e}");
        Ok(())
    }

    /// Rows count images, so a header shifts them from the file's lines; both are named.
    #[test]
    fn csv_rows_are_images_and_the_line_is_added_after_a_header() {
        let p = write("csv", "hdr.csv", b"a,b\r\n1,2\r\n3,x\r\n");
        let e = read_csv(&p).expect_err("accepted").to_string();
        assert!(e.contains("hdr.csv: row 2, column 2 (line 3): \"x\" is not a number"), "{e}");
        // Blank lines are not rows either, and a quoted field may span lines (trimmed: "3\n" is 3).
        let p = write("csv", "gaps.csv", b"\n1,2\n\n\n\"3\n\",4\r\n\r\n5,-\n");
        let e = read_csv(&p).expect_err("accepted").to_string();
        assert!(e.contains("gaps.csv: row 3, column 2 (line 8): \"-\" is not a number"), "{e}");
        let p = write("csv", "nohdr.csv", b"1,2\n3,1.5\n");
        let e = read_csv(&p).expect_err("accepted").to_string();
        assert!(e.ends_with("nohdr.csv: row 2, column 2: 1.5 is not an integer level"), "{e}");
        let p = write("csv", "bytes.csv", b"1,2\n3,\xff\n");
        let e = read_csv(&p).expect_err("accepted").to_string();
        assert!(e.contains("row 2, column 2: \"\u{fffd}\" is not a number"), "{e}");
    }

    /// Little-endian bytes of `vals`, each `size` bytes wide (two's complement for negatives).
    fn le(vals: &[i64], size: usize) -> Vec<u8> {
        vals.iter().flat_map(|v| v.to_le_bytes()[..size].to_vec()).collect()
    }

    /// Every accepted dtype, written by hand: the same 2x3 levels come back from each.
    #[test]
    fn npy_every_dtype_reads_the_same_levels() -> Result<(), DataError> {
        let want: Vec<i64> = vec![0, 1, 2, 3, 4, 5];
        let header = |descr: &str| format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2, 3), }}");
        let mut cases: Vec<(&str, Vec<u8>)> = ["|u1", "|i1"].iter().map(|t| (*t, le(&want, 1))).collect();
        for (t, size) in [("<u2", 2), ("<i2", 2), ("<u4", 4), ("<i4", 4), ("<u8", 8), ("<i8", 8)] {
            cases.push((t, le(&want, size)));
        }
        cases.push(("<f4", want.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()));
        cases.push(("<f8", want.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect()));
        // Big-endian files (np.dtype('>i2')) are read too: npyz swaps the bytes.
        cases.push((">i2", want.iter().flat_map(|&v| (v as i16).to_be_bytes()).collect()));
        for (descr, data) in cases {
            let p = write("npy-dtypes", "a.npy", &npy(&header(descr), data));
            let raw = read_npy(&p)?;
            assert_eq!(raw.rows, vec![want[..3].to_vec(), want[3..].to_vec()], "{descr}");
            assert_eq!(raw.shape, None, "{descr}");
        }
        // Negative values keep their sign (rejected later, with their place, by to_dataset).
        let p = write("npy-dtypes", "neg.npy", &npy(&header("|i1"), le(&[0, -1, 2, -128, 4, 127], 1)));
        assert_eq!(read_npy(&p)?.rows, vec![vec![0, -1, 2], vec![-128, 4, 127]]);
        let e = load_file(&p, &FileSpec { height: Some(1), ..spec() }).expect_err("negative accepted").to_string();
        assert!(e.contains("row 1, column 2: level -1"), "{e}");
        Ok(())
    }

    #[test]
    fn npy_refusals_say_why() {
        let cases: [(&str, &str, Vec<u8>, &str); 7] = [
            ("fortran", "{'descr': '|u1', 'fortran_order': True, 'shape': (2, 2), }", vec![0; 4], "Fortran-order"),
            ("bool", "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 2), }", vec![0; 4], "dtype \"|b1\""),
            ("half", "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2), }", vec![0; 8], "dtype \"<f2\""),
            ("vector", "{'descr': '|u1', 'fortran_order': False, 'shape': (4,), }", vec![0; 4], "shape [4]"),
            ("short", "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }", vec![0; 15], "file has 15"),
            ("long", "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), }", vec![0; 5], "file has 5"),
            ("empty", "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 0), }", vec![], "no pixels"),
        ];
        for (name, header, data, want) in cases {
            let p = write("npy-bad", &format!("{name}.npy"), &npy(header, data));
            let e = read_npy(&p).expect_err("accepted").to_string();
            assert!(e.contains(want) && e.contains(&format!("{name}.npy")), "{name}: {e}");
        }
        let p = write("npy-bad", "magic.npy", b"PK\x03\x04 not numpy");
        let e = read_npy(&p).expect_err("accepted").to_string();
        assert!(e.contains("missing \\x93NUMPY magic"), "{e}");
        let p = write("npy-bad", "garbled.npy", &npy("{'descr': '|u1', 'shape': (2, 2) ", vec![0; 4]));
        let e = read_npy(&p).expect_err("accepted").to_string();
        assert!(e.contains("garbled.npy: bad NPY header"), "{e}");
        // A float that is not a whole number is named by row and column in an (N, H, W) array.
        let data: Vec<u8> =
            [0.0, 1.0, 2.0, 3.0, 1.0, f64::NAN, 0.0, 1.0].iter().flat_map(|v: &f64| v.to_le_bytes()).collect();
        let p =
            write("npy-bad", "nan.npy", &npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2, 2), }", data));
        let e = read_npy(&p).expect_err("accepted").to_string();
        assert!(e.contains("row 2, column 2: NaN is not an integer level"), "{e}");
    }

    /// NPY format 2.0 (a 4-byte header length, for very long headers) as np.save writes it.
    #[test]
    fn npy_version_2_header() -> Result<(), DataError> {
        let mut h = "{'descr': '<u2', 'fortran_order': False, 'shape': (1, 2, 2), }".to_string();
        while !(12 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
        bytes.extend((h.len() as u32).to_le_bytes());
        bytes.extend(h.as_bytes());
        bytes.extend(le(&[3, 2, 1, 0], 2));
        let raw = read_npy(&write("npy-v2", "v2.npy", &bytes))?;
        assert_eq!((raw.rows, raw.shape), (vec![vec![3, 2, 1, 0]], Some((2, 2))));
        Ok(())
    }
}
