//! Image transforms for distribution augmentation (Jun et al. 2020, "Distribution Augmentation
//! for Generative Modeling", §3): the model learns p(t(x) | t) for every transform t and is
//! evaluated at t = identity, so its test NLL stays the exact NLL of the untransformed data.
//!
//! Every transform is a map of pixel positions: output pixel p takes input pixel `src[p]`, or
//! level 0 (the background of the embedded data sets) where a shift brings in a border.

/// One transform of an H x W image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    Identity,
    /// Moves the content down by `dy` rows and right by `dx` columns (negative: up / left).
    Shift { dy: i32, dx: i32 },
    /// Mirror left-right.
    FlipH,
    /// Mirror top-bottom.
    FlipV,
    Transpose,
    /// Quarter turns clockwise.
    Rot90,
    Rot180,
    Rot270,
}

/// The names `train.augment` accepts, each a group of transforms.
pub const AUGMENT_NAMES: &[&str] = &["shifts", "flips", "transpose", "rotations"];

impl Transform {
    /// The transforms of a group name of [`AUGMENT_NAMES`].
    pub fn group(name: &str) -> Option<Vec<Transform>> {
        Some(match name {
            "shifts" => {
                let mut v = Vec::new();
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        if (dy, dx) != (0, 0) {
                            v.push(Transform::Shift { dy, dx });
                        }
                    }
                }
                v
            }
            "flips" => vec![Transform::FlipH, Transform::FlipV],
            "transpose" => vec![Transform::Transpose],
            "rotations" => vec![Transform::Rot90, Transform::Rot180, Transform::Rot270],
            _ => return None,
        })
    }

    /// Whether it maps an H x W image to an H x W image (transposes and quarter turns need
    /// a square).
    pub fn fits(self, height: usize, width: usize) -> bool {
        !matches!(self, Transform::Transpose | Transform::Rot90 | Transform::Rot270) || height == width
    }

    /// Whether it is a bijection of images (every output pixel reads a distinct input pixel):
    /// all but the shifts, which bring in a border.
    pub fn is_permutation(self) -> bool {
        !matches!(self, Transform::Shift { .. })
    }

    /// src[p] = the input pixel that output pixel p takes, None for a border brought in.
    pub fn source_map(self, height: usize, width: usize) -> Vec<Option<usize>> {
        assert!(self.fits(height, width), "{self:?} needs a square image, got {height}x{width}");
        let (h, w) = (height as i64, width as i64);
        let mut src = Vec::with_capacity(height * width);
        for r in 0..h {
            for c in 0..w {
                let (sr, sc) = match self {
                    Transform::Identity => (r, c),
                    Transform::Shift { dy, dx } => (r - dy as i64, c - dx as i64),
                    Transform::FlipH => (r, w - 1 - c),
                    Transform::FlipV => (h - 1 - r, c),
                    Transform::Transpose => (c, r),
                    // Clockwise: output (r, c) shows input (h - 1 - c, r).
                    Transform::Rot90 => (h - 1 - c, r),
                    Transform::Rot180 => (h - 1 - r, w - 1 - c),
                    Transform::Rot270 => (c, w - 1 - r),
                };
                let inside = (0..h).contains(&sr) && (0..w).contains(&sc);
                src.push(inside.then(|| (sr * w + sc) as usize));
            }
        }
        src
    }
}

/// Applies a source map to one image (row-major levels) into `out`.
pub fn apply(src: &[Option<usize>], image: &[f32], out: &mut Vec<f32>) {
    out.extend(src.iter().map(|s| s.map_or(0.0, |i| image[i])));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: Transform, h: usize, w: usize, img: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        apply(&t.source_map(h, w), img, &mut out);
        out
    }

    #[test]
    fn hand_checked_maps_on_a_2x3_and_a_3x3_image() {
        let img = [1., 2., 3., 4., 5., 6.]; // 2x3
        assert_eq!(run(Transform::FlipH, 2, 3, &img), [3., 2., 1., 6., 5., 4.]);
        assert_eq!(run(Transform::FlipV, 2, 3, &img), [4., 5., 6., 1., 2., 3.]);
        assert_eq!(run(Transform::Rot180, 2, 3, &img), [6., 5., 4., 3., 2., 1.]);
        assert_eq!(run(Transform::Shift { dy: 0, dx: 1 }, 2, 3, &img), [0., 1., 2., 0., 4., 5.]);
        assert_eq!(run(Transform::Shift { dy: -1, dx: -1 }, 2, 3, &img), [5., 6., 0., 0., 0., 0.]);
        let sq = [1., 2., 3., 4., 5., 6., 7., 8., 9.];
        // 1 2 3      7 4 1
        // 4 5 6  ->  8 5 2  a quarter turn clockwise
        // 7 8 9      9 6 3
        assert_eq!(run(Transform::Rot90, 3, 3, &sq), [7., 4., 1., 8., 5., 2., 9., 6., 3.]);
        assert_eq!(run(Transform::Rot270, 3, 3, &sq), [3., 6., 9., 2., 5., 8., 1., 4., 7.]);
        assert_eq!(run(Transform::Transpose, 3, 3, &sq), [1., 4., 7., 2., 5., 8., 3., 6., 9.]);
        assert_eq!(run(Transform::Identity, 3, 3, &sq), sq);
    }

    #[test]
    fn the_dihedral_maps_compose_as_the_group_does() {
        let img: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let twice = |t| run(t, 4, 4, &run(t, 4, 4, &img));
        assert_eq!(twice(Transform::Rot90), run(Transform::Rot180, 4, 4, &img));
        assert_eq!(twice(Transform::Transpose), img);
        assert_eq!(twice(Transform::FlipH), img);
        assert_eq!(run(Transform::FlipV, 4, 4, &run(Transform::FlipH, 4, 4, &img)), run(Transform::Rot180, 4, 4, &img));
        assert_eq!(run(Transform::Rot270, 4, 4, &run(Transform::Rot90, 4, 4, &img)), img);
    }

    #[test]
    fn groups_and_what_fits() {
        let shifts = Transform::group("shifts").unwrap();
        assert_eq!(shifts.len(), 8);
        assert!(!shifts.contains(&Transform::Shift { dy: 0, dx: 0 }));
        for name in AUGMENT_NAMES {
            assert!(Transform::group(name).is_some(), "{name}");
        }
        assert!(Transform::group("shift").is_none());
        assert!(!Transform::Rot90.fits(2, 3) && Transform::Rot180.fits(2, 3) && Transform::Transpose.fits(3, 3));
        // A permutation's map reads every input pixel once; a shift's does not.
        for name in AUGMENT_NAMES {
            for t in Transform::group(name).unwrap() {
                let mut seen: Vec<usize> = t.source_map(3, 3).into_iter().flatten().collect();
                seen.sort_unstable();
                assert_eq!(seen == (0..9).collect::<Vec<_>>(), t.is_permutation(), "{t:?}");
            }
        }
    }
}
