//! Pixel orderings for 1D plugins. The `Arm` permutes images into sequence order before the
//! conditional sees them, so causality holds in the chosen order for any 1D plugin.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Ordering {
    /// Row by row, left to right.
    #[default]
    Raster,
    /// Even rows left to right, odd rows right to left (a boustrophedon path: neighbours in
    /// the sequence are neighbours in the image).
    Snake,
}

impl Ordering {
    /// perm[i] = image index (row-major) of the i-th pixel of the sequence.
    pub fn permutation(self, height: usize, width: usize) -> Vec<usize> {
        match self {
            Ordering::Raster => (0..height * width).collect(),
            Ordering::Snake => (0..height)
                .flat_map(|r| {
                    let row: Vec<usize> = (0..width).map(|c| r * width + c).collect();
                    if r % 2 == 0 {
                        row
                    } else {
                        row.into_iter().rev().collect()
                    }
                })
                .collect(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Ordering::Raster => "raster",
            Ordering::Snake => "snake",
        }
    }
}

impl std::fmt::Display for Ordering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_reverses_odd_rows() {
        assert_eq!(Ordering::Snake.permutation(2, 3), vec![0, 1, 2, 5, 4, 3]);
        assert_eq!(Ordering::Raster.permutation(2, 2), vec![0, 1, 2, 3]);
    }
}
