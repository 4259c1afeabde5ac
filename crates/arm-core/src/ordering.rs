//! Pixel orderings. An ordering is a permutation of the H x W pixels: `perm[i]` is the image
//! index (row-major) of the i-th pixel generated, and its inverse `rank[j]` is when pixel j
//! comes. 1D plugins see images permuted into sequence order by the `Arm`; 2D plugins keep the
//! image layout and mask each location's kernel to the pixels of lower rank (locally masked
//! convolutions, Jain, Abbeel & Pathak 2020).
//!
//! - `zigzag` is the chapter's alternative (Tomczak, "Deep Generative Modeling", §2.2.3, after
//!   its ref. [14]): anti-diagonals r + c = 0, 1, ... walked in alternating directions, so every
//!   pixel comes after the pixels to its left and above it.
//! - `hilbert` is the Hilbert curve (Hilbert 1891) of the enclosing 2^k x 2^k square, keeping
//!   the pixels inside the image: each step moves to a 4-neighbour when H = W = 2^k.

use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Ordering {
    /// Row by row, left to right.
    #[default]
    Raster,
    /// Even rows left to right, odd rows right to left (a boustrophedon path: neighbours in
    /// the sequence are neighbours in the image).
    Snake,
    /// Anti-diagonals in alternating directions: left and upper neighbours always come first.
    Zigzag,
    /// The Hilbert curve of the enclosing power-of-two square.
    Hilbert,
    /// Column by column, top to bottom.
    Columns,
    /// A uniformly random permutation drawn from the seed.
    Random(u64),
}

/// The names `FromStr` accepts, for error messages and `runner list`.
pub const ORDERING_NAMES: &str = "raster, snake, zigzag, hilbert, columns, random(SEED)";

impl Ordering {
    /// One of each kind (random with seed 0), in the order `runner list` shows them.
    pub const EXAMPLES: [Ordering; 6] = [
        Ordering::Raster,
        Ordering::Snake,
        Ordering::Zigzag,
        Ordering::Hilbert,
        Ordering::Columns,
        Ordering::Random(0),
    ];

    /// perm[i] = image index (row-major) of the i-th pixel of the sequence.
    pub fn permutation(self, height: usize, width: usize) -> Vec<usize> {
        let (h, w) = (height, width);
        match self {
            Ordering::Raster => (0..h * w).collect(),
            Ordering::Snake => {
                (0..h).flat_map(|r| (0..w).map(move |c| r * w + if r % 2 == 0 { c } else { w - 1 - c })).collect()
            }
            Ordering::Zigzag => {
                let mut p = Vec::with_capacity(h * w);
                for d in 0..(h + w).saturating_sub(1) {
                    // Cells with r + c = d, from the top row down; odd diagonals go back up.
                    let rows: Vec<usize> = (d.saturating_sub(w - 1)..=d.min(h - 1)).collect();
                    let cells = rows.into_iter().map(|r| r * w + (d - r));
                    if d % 2 == 0 {
                        p.extend(cells.rev());
                    } else {
                        p.extend(cells);
                    }
                }
                p
            }
            Ordering::Hilbert => {
                let n = h.max(w).next_power_of_two();
                (0..n * n)
                    .map(|t| hilbert_cell(n, t))
                    .filter(|&(r, c)| r < h && c < w)
                    .map(|(r, c)| r * w + c)
                    .collect()
            }
            Ordering::Columns => (0..w).flat_map(|c| (0..h).map(move |r| r * w + c)).collect(),
            Ordering::Random(seed) => {
                let mut p: Vec<usize> = (0..h * w).collect();
                p.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
                p
            }
        }
    }

    /// rank[j] = sequence position of image pixel j (the inverse permutation).
    pub fn rank(self, height: usize, width: usize) -> Vec<usize> {
        invert(&self.permutation(height, width))
    }

    pub fn name(self) -> String {
        match self {
            Ordering::Raster => "raster".into(),
            Ordering::Snake => "snake".into(),
            Ordering::Zigzag => "zigzag".into(),
            Ordering::Hilbert => "hilbert".into(),
            Ordering::Columns => "columns".into(),
            Ordering::Random(s) => format!("random({s})"),
        }
    }

    /// One line for `runner list`.
    pub fn summary(self) -> &'static str {
        match self {
            Ordering::Raster => "row by row, left to right (the fast path of every 2D plugin)",
            Ordering::Snake => "even rows left to right, odd rows right to left",
            Ordering::Zigzag => "anti-diagonals in alternating directions: left and upper neighbours come first",
            Ordering::Hilbert => "Hilbert curve of the enclosing power-of-two square",
            Ordering::Columns => "column by column, top to bottom",
            Ordering::Random(_) => "a uniformly random permutation drawn from SEED",
        }
    }
}

/// (row, column) of step `t` of the Hilbert curve of an n x n square (n a power of two),
/// starting at the top-left corner: two bits of t per level, rotating the quadrant's frame.
fn hilbert_cell(n: usize, t: usize) -> (usize, usize) {
    let (mut x, mut y, mut t) = (0usize, 0usize, t);
    let mut s = 1;
    while s < n {
        let rx = 1 & (t / 2);
        let ry = 1 & (t ^ rx);
        if ry == 0 {
            if rx == 1 {
                x = s - 1 - x;
                y = s - 1 - y;
            }
            std::mem::swap(&mut x, &mut y);
        }
        x += s * rx;
        y += s * ry;
        t /= 4;
        s *= 2;
    }
    (y, x)
}

impl FromStr for Ordering {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown ordering {s:?}: expected one of {ORDERING_NAMES}");
        Ok(match s {
            "raster" => Ordering::Raster,
            "snake" => Ordering::Snake,
            "zigzag" => Ordering::Zigzag,
            "hilbert" => Ordering::Hilbert,
            "columns" => Ordering::Columns,
            _ => {
                let seed = s.strip_prefix("random(").and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
                Ordering::Random(seed.trim().parse().map_err(|_| bad())?)
            }
        })
    }
}

impl std::fmt::Display for Ordering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for Ordering {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Ordering {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The inverse of a permutation: inv[p[i]] = i.
pub fn invert(p: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; p.len()];
    for (i, &j) in p.iter().enumerate() {
        inv[j] = i;
    }
    inv
}

/// A permutation as a u32 index tensor for `index_select`; None for the identity, which
/// needs no gather.
pub fn gather_index(p: &[usize], dev: &candle_core::Device) -> candle_core::Result<Option<candle_core::Tensor>> {
    if p.iter().enumerate().all(|(i, &j)| i == j) {
        return Ok(None);
    }
    Ok(Some(candle_core::Tensor::new(p.iter().map(|&j| j as u32).collect::<Vec<_>>(), dev)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(p: &[usize], n: usize) -> bool {
        let mut seen = vec![false; n];
        p.len() == n && p.iter().all(|&j| j < n && !std::mem::replace(&mut seen[j], true))
    }

    #[test]
    fn every_ordering_is_a_permutation_with_its_inverse() {
        for o in Ordering::EXAMPLES.into_iter().chain([Ordering::Random(7)]) {
            for (h, w) in [(1, 1), (1, 5), (4, 1), (8, 8), (3, 7), (28, 28), (5, 2)] {
                let p = o.permutation(h, w);
                assert!(is_permutation(&p, h * w), "{o} on {h}x{w}: {p:?}");
                let rank = o.rank(h, w);
                assert!(p.iter().enumerate().all(|(i, &j)| rank[j] == i), "{o} on {h}x{w}");
            }
        }
    }

    #[test]
    fn hand_checked_small_orderings() {
        assert_eq!(Ordering::Snake.permutation(2, 3), vec![0, 1, 2, 5, 4, 3]);
        assert_eq!(Ordering::Raster.permutation(2, 2), vec![0, 1, 2, 3]);
        assert_eq!(Ordering::Columns.permutation(2, 3), vec![0, 3, 1, 4, 2, 5]);
        // 3x3 grid, cells numbered row-major:
        //  0 1 2        ranks: 0 1 5
        //  3 4 5               2 4 6
        //  6 7 8               3 7 8
        assert_eq!(Ordering::Zigzag.permutation(3, 3), vec![0, 1, 3, 6, 4, 2, 5, 7, 8]);
        // The 2x2 Hilbert curve is a U: top-left, bottom-left, bottom-right, top-right.
        assert_eq!(Ordering::Hilbert.permutation(2, 2), vec![0, 2, 3, 1]);
    }

    /// The chapter's property of the zig-zag order: a pixel's left and upper neighbours
    /// precede it.
    #[test]
    fn zigzag_puts_left_and_upper_neighbours_first() {
        for (h, w) in [(8, 8), (3, 7), (7, 3), (28, 28), (1, 6), (6, 1)] {
            let rank = Ordering::Zigzag.rank(h, w);
            for r in 0..h {
                for c in 0..w {
                    let me = rank[r * w + c];
                    if c > 0 {
                        assert!(rank[r * w + c - 1] < me, "{h}x{w}: left of ({r}, {c})");
                    }
                    if r > 0 {
                        assert!(rank[(r - 1) * w + c] < me, "{h}x{w}: above ({r}, {c})");
                    }
                }
            }
        }
        // Snake is not zig-zag: on odd rows the left neighbour comes after.
        let rank = Ordering::Snake.rank(2, 3);
        assert!(rank[3] > rank[4]);
    }

    #[test]
    fn hilbert_moves_to_a_neighbour_at_every_step_on_power_of_two_squares() {
        for n in [1, 2, 4, 8, 16, 32] {
            let p = Ordering::Hilbert.permutation(n, n);
            for s in p.windows(2) {
                let (a, b) = ((s[0] / n, s[0] % n), (s[1] / n, s[1] % n));
                assert_eq!(a.0.abs_diff(b.0) + a.1.abs_diff(b.1), 1, "{n}x{n}: {a:?} -> {b:?}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_bad_names_say_what_is_expected() {
        for o in Ordering::EXAMPLES.into_iter().chain([Ordering::Random(123)]) {
            assert_eq!(o.name().parse::<Ordering>(), Ok(o));
        }
        assert_eq!(" random( 5 )".trim().parse::<Ordering>(), Ok(Ordering::Random(5)));
        for bad in ["diagonal", "random", "random(x)", "random(-1)", "Raster"] {
            let e = bad.parse::<Ordering>().unwrap_err();
            assert!(e.contains(bad) && e.contains("zigzag"), "{e}");
        }
        assert_ne!(Ordering::Random(1).permutation(8, 8), Ordering::Random(2).permutation(8, 8));
        assert_eq!(Ordering::Random(1).permutation(8, 8), Ordering::Random(1).permutation(8, 8));
    }
}
