//! Data sets embedded in the binary, with the fixed splits every comparison uses.
//!
//! - `digits`: the UCI optical recognition of handwritten digits test set (Alpaydin & Kaynak
//!   1998) as shipped by scikit-learn (8x8, 17 levels), 1,797 images; train [0, 1000),
//!   validation [1000, 1350), test [1350, 1797), no shuffling.
//! - `mnist10k` (28x28, 256 levels) and `mnist10k-binary` (pixel >= 128): 10,000 MNIST digits
//!   (LeCun et al. 1998); train [0, 8000), validation [8000, 9000), test [9000, 10000).
//!
//! Each embedded file is checked against its sha256 before it is parsed.

pub mod augment;
pub mod files;

use std::io::Read;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

const DIGITS_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");
const DIGITS_SHA256: &str = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22";
const MNIST_IMAGES_GZ: &[u8] = include_bytes!("../data/mnist10k-images-idx3-ubyte.gz");
const MNIST_IMAGES_SHA256: &str = "4ad5fec1bd0cf5999236acb54a81c2c9f42db47d3745a46e59d9af87e91f0c34";

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("unknown data set {name:?}: expected one of {expected}")]
    Unknown { name: String, expected: String },
    #[error("embedded data {name} is corrupt: sha256 {got}, expected {want}")]
    Checksum { name: &'static str, got: String, want: &'static str },
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
}

/// Names accepted by `[data] name = ...`.
pub const DATASET_NAMES: &[&str] = &["digits", "mnist10k", "mnist10k-binary"];

/// Which part of a data set: the training, validation or test images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SplitName {
    Train,
    /// Also accepted as "validation".
    #[serde(alias = "validation")]
    #[cfg_attr(feature = "clap", value(alias = "validation"))]
    Val,
    Test,
}

impl SplitName {
    /// The name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Val => "val",
            SplitName::Test => "test",
        }
    }
}

impl std::fmt::Display for SplitName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Images of one split: `n` images of `dims` pixels, row-major, levels in 0..levels.
#[derive(Debug, Clone)]
pub struct Split {
    pub n: usize,
    pub dims: usize,
    pub pixels: Vec<u8>,
}

impl Split {
    fn new(pixels: Vec<u8>, dims: usize) -> Self {
        Self { n: pixels.len() / dims, dims, pixels }
    }

    /// The images at `idx` as a (B, D) f32 tensor of levels.
    pub fn batch(&self, idx: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let mut v = Vec::with_capacity(idx.len() * self.dims);
        for &i in idx {
            v.extend(self.pixels[i * self.dims..(i + 1) * self.dims].iter().map(|&p| p as f32));
        }
        Tensor::from_vec(v, (idx.len(), self.dims), device)
    }

    /// Every image in order, in batches of at most `batch`.
    pub fn batches(&self, batch: usize, device: &Device) -> impl Iterator<Item = candle_core::Result<Tensor>> + '_ {
        let device = device.clone();
        (0..self.n).step_by(batch.max(1)).map(move |s| {
            let idx: Vec<usize> = (s..(s + batch).min(self.n)).collect();
            self.batch(&idx, &device)
        })
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub height: usize,
    pub width: usize,
    pub levels: usize,
    pub train: Split,
    pub val: Split,
    pub test: Split,
}

impl Dataset {
    pub fn dims(&self) -> usize {
        self.height * self.width
    }

    pub fn split(&self, which: SplitName) -> &Split {
        match which {
            SplitName::Train => &self.train,
            SplitName::Val => &self.val,
            SplitName::Test => &self.test,
        }
    }

    /// Splits `pixels` (n * dims, row-major) at the given image boundaries.
    pub fn from_pixels(
        name: &str,
        (height, width): (usize, usize),
        levels: usize,
        pixels: &[u8],
        (train_end, val_end): (usize, usize),
    ) -> Self {
        let d = height * width;
        let n = pixels.len() / d;
        let (a, b) = (train_end.min(n), val_end.min(n));
        Self {
            name: name.to_string(),
            height,
            width,
            levels,
            train: Split::new(pixels[..a * d].to_vec(), d),
            val: Split::new(pixels[a * d..b * d].to_vec(), d),
            test: Split::new(pixels[b * d..n * d].to_vec(), d),
        }
    }
}

fn gunzip_checked(name: &'static str, bytes: &[u8], want: &'static str) -> Result<Vec<u8>, DataError> {
    let got: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    if got != want {
        return Err(DataError::Checksum { name, got, want });
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| DataError::Format { file: name.into(), msg: format!("gunzip: {e}") })?;
    Ok(out)
}

/// sklearn digits: 8x8, 17 levels, split 1000 / 350 / 447.
pub fn digits() -> Result<Dataset, DataError> {
    let csv = gunzip_checked("digits.csv.gz", DIGITS_GZ, DIGITS_SHA256)?;
    let text = String::from_utf8_lossy(&csv);
    let mut pixels = Vec::with_capacity(1797 * 64);
    for (r, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 65 {
            return Err(DataError::Format {
                file: "digits.csv.gz".into(),
                msg: format!("row {}: {} fields, expected 65", r + 1, fields.len()),
            });
        }
        for (c, f) in fields[..64].iter().enumerate() {
            let v: u8 = f.trim().parse().ok().filter(|v| *v <= 16).ok_or_else(|| DataError::Format {
                file: "digits.csv.gz".into(),
                msg: format!("row {}, column {}: {f:?} is not a level in 0..=16", r + 1, c + 1),
            })?;
            pixels.push(v);
        }
    }
    Ok(Dataset::from_pixels("digits", (8, 8), 17, &pixels, (1000, 1350)))
}

fn mnist_pixels() -> Result<Vec<u8>, DataError> {
    let raw = gunzip_checked("mnist10k-images-idx3-ubyte.gz", MNIST_IMAGES_GZ, MNIST_IMAGES_SHA256)?;
    let be = |i: usize| u32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]) as usize;
    let bad = |msg: String| DataError::Format { file: "mnist10k-images-idx3-ubyte.gz".into(), msg };
    if raw.len() < 16 || be(0) != 0x803 {
        return Err(bad("not an IDX3 image file (magic 0x00000803)".into()));
    }
    let (n, h, w) = (be(4), be(8), be(12));
    if (h, w) != (28, 28) || raw.len() != 16 + n * h * w {
        return Err(bad(format!("header says {n}x{h}x{w}, file has {} bytes", raw.len())));
    }
    Ok(raw[16..].to_vec())
}

/// 10k MNIST digits, 28x28, 256 levels, split 8000 / 1000 / 1000.
pub fn mnist10k() -> Result<Dataset, DataError> {
    Ok(Dataset::from_pixels("mnist10k", (28, 28), 256, &mnist_pixels()?, (8000, 9000)))
}

/// The same images binarised at 128 (deterministic), 2 levels.
pub fn mnist10k_binary() -> Result<Dataset, DataError> {
    let px: Vec<u8> = mnist_pixels()?.into_iter().map(|p| u8::from(p >= 128)).collect();
    Ok(Dataset::from_pixels("mnist10k-binary", (28, 28), 2, &px, (8000, 9000)))
}

/// (height, width, levels) of an embedded data set, without loading it.
pub fn shape_of(name: &str) -> Option<(usize, usize, usize)> {
    match name {
        "digits" => Some((8, 8, 17)),
        "mnist10k" => Some((28, 28, 256)),
        "mnist10k-binary" => Some((28, 28, 2)),
        _ => None,
    }
}

/// An embedded data set by name.
pub fn load(name: &str) -> Result<Dataset, DataError> {
    match name {
        "digits" => digits(),
        "mnist10k" => mnist10k(),
        "mnist10k-binary" => mnist10k_binary(),
        _ => Err(DataError::Unknown { name: name.to_string(), expected: DATASET_NAMES.join(", ") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_has_the_documented_split_and_levels() -> Result<(), DataError> {
        let d = digits()?;
        assert_eq!((d.train.n, d.val.n, d.test.n), (1000, 350, 447));
        assert_eq!((d.height, d.width, d.levels), (8, 8, 17));
        assert_eq!(d.train.pixels.iter().copied().max(), Some(16));
        // First row of the file (sklearn's digits.images[0] is a zero).
        assert_eq!(&d.train.pixels[..8], &[0, 0, 5, 13, 9, 1, 0, 0]);
        Ok(())
    }

    #[test]
    fn split_names_read_from_toml_with_the_validation_alias() -> Result<(), DataError> {
        #[derive(serde::Deserialize)]
        struct T {
            s: SplitName,
        }
        let parse = |v: &str| toml::from_str::<T>(&format!("s = {v:?}")).map(|t| t.s).ok();
        assert_eq!(parse("train"), Some(SplitName::Train));
        assert_eq!(parse("val"), Some(SplitName::Val));
        assert_eq!(parse("validation"), Some(SplitName::Val));
        assert_eq!(parse("test"), Some(SplitName::Test));
        assert_eq!(parse("dev"), None);
        let d = digits()?;
        assert_eq!(d.split(SplitName::Val).n, 350);
        assert_eq!(SplitName::Val.to_string(), "val");
        Ok(())
    }

    #[test]
    fn corrupt_bytes_fail_the_checksum() {
        let mut bytes = DIGITS_GZ.to_vec();
        bytes[100] ^= 1;
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        assert!(matches!(gunzip_checked("digits.csv.gz", leaked, DIGITS_SHA256), Err(DataError::Checksum { .. })));
    }

    #[test]
    fn mnist_views_agree() -> Result<(), DataError> {
        let (g, b) = (mnist10k()?, mnist10k_binary()?);
        assert_eq!((g.train.n, g.val.n, g.test.n), (8000, 1000, 1000));
        assert_eq!(b.levels, 2);
        let agree = g.test.pixels.iter().zip(&b.test.pixels).all(|(&p, &q)| u8::from(p >= 128) == q);
        assert!(agree);
        Ok(())
    }
}
