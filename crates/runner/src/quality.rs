//! Sample-quality figures that need no downloaded network, so that every head (also the
//! quantile head, which has no likelihood) can be compared on one scale: samples against test
//! images of the same data set, both as levels scaled to [0, 1].
//!
//! - `w1`: the Wasserstein-1 distance between the per-pixel marginals, averaged over pixels.
//!   For distributions on the levels, W1 = sum_k |F_a(k) - F_b(k)| / (K - 1) (the area between
//!   the two CDFs; Villani 2009, "Optimal Transport", remark 2.19 in one dimension).
//! - `mmd2`: the unbiased squared maximum mean discrepancy with a Gaussian kernel
//!   k(x, y) = exp(-|x - y|^2 / (2 s^2)) (Gretton et al. 2012, "A Kernel Two-Sample Test",
//!   eq. 3). The bandwidth s^2 is half the median squared distance between the test images
//!   themselves, so it depends on the data set only and figures of different models on one
//!   data set share a scale. It can be slightly negative when the sets are alike.

/// Test images the figures compare with: the first of the test split (the same for every run
/// on a data set).
pub const TEST_IMAGES: usize = 1000;
/// Test images the kernel bandwidth is the median over.
pub const BANDWIDTH_IMAGES: usize = 500;

/// Both figures of one set of samples, None where undefined (fewer than two samples).
#[derive(Debug, Clone, Copy)]
pub struct Quality {
    pub w1: Option<f64>,
    pub mmd2: Option<f64>,
}

/// `samples` (levels, image layout) against the first [`TEST_IMAGES`] test images of `data`.
pub fn against_test(samples: &[Vec<u8>], data: &arm_data::Dataset) -> Quality {
    let real = crate::run::first_images(&data.test, TEST_IMAGES);
    let w1 = Some(w1(samples, &real, data.levels)).filter(|v| v.is_finite());
    let mmd2 = bandwidth(&real[..real.len().min(BANDWIDTH_IMAGES)], data.levels)
        .map(|s2| mmd2(samples, &real, data.levels, s2))
        .filter(|v| v.is_finite());
    Quality { w1, mmd2 }
}

/// W1 between per-pixel marginals of `a` and `b` (images of `levels` levels), mean over pixels.
pub fn w1(a: &[Vec<u8>], b: &[Vec<u8>], levels: usize) -> f64 {
    let dims = a.first().map_or(0, Vec::len);
    if dims == 0 || b.is_empty() || levels < 2 {
        return f64::NAN;
    }
    let hist = |set: &[Vec<u8>], d: usize| {
        let mut h = vec![0f64; levels];
        for img in set {
            h[(img[d] as usize).min(levels - 1)] += 1.0;
        }
        h.iter_mut().for_each(|v| *v /= set.len() as f64);
        h
    };
    let mut total = 0.0;
    for d in 0..dims {
        let (ha, hb) = (hist(a, d), hist(b, d));
        let (mut fa, mut fb, mut area) = (0.0, 0.0, 0.0);
        for k in 0..levels - 1 {
            fa += ha[k];
            fb += hb[k];
            area += (fa - fb).abs();
        }
        total += area / (levels - 1) as f64;
    }
    total / dims as f64
}

fn scaled(set: &[Vec<u8>], levels: usize) -> Vec<Vec<f32>> {
    let s = 1.0 / (levels - 1) as f32;
    set.iter().map(|img| img.iter().map(|&v| v as f32 * s).collect()).collect()
}

fn sq_dist(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(a, b)| ((a - b) * (a - b)) as f64).sum()
}

/// Half the median squared distance between distinct images of `real` (scaled to [0, 1]), the
/// kernel bandwidth s^2 of [`mmd2`]; None with fewer than two images or all of them equal.
pub fn bandwidth(real: &[Vec<u8>], levels: usize) -> Option<f64> {
    let r = scaled(real, levels);
    let mut d: Vec<f64> =
        (0..r.len()).flat_map(|i| (0..i).map(move |j| (i, j))).map(|(i, j)| sq_dist(&r[i], &r[j])).collect();
    if d.is_empty() {
        return None;
    }
    let mid = d.len() / 2;
    let (_, m, _) = d.select_nth_unstable_by(mid, f64::total_cmp);
    (*m > 0.0).then_some(*m / 2.0)
}

/// Unbiased MMD^2 between `a` and `b` (each at least two images) with kernel bandwidth `s2`.
pub fn mmd2(a: &[Vec<u8>], b: &[Vec<u8>], levels: usize, s2: f64) -> f64 {
    if a.len() < 2 || b.len() < 2 || levels < 2 {
        return f64::NAN;
    }
    let (a, b) = (scaled(a, levels), scaled(b, levels));
    let k = |x: &[f32], y: &[f32]| (-sq_dist(x, y) / (2.0 * s2)).exp();
    let within = |s: &[Vec<f32>]| {
        let n = s.len() as f64;
        let sum: f64 = (0..s.len()).flat_map(|i| (0..i).map(move |j| (i, j))).map(|(i, j)| k(&s[i], &s[j])).sum();
        2.0 * sum / (n * (n - 1.0))
    };
    let cross: f64 = a.iter().flat_map(|x| b.iter().map(move |y| (x, y))).map(|(x, y)| k(x, y)).sum();
    within(&a) + within(&b) - 2.0 * cross / (a.len() * b.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w1_is_the_area_between_the_cdfs() {
        // K = 3, one pixel: half the images at level 0 and half at 2, against all at 1: every
        // image moves one level, 1/2 on the [0, 1] scale. CDFs [.5, .5] vs [0, 1]: area 1 / 2.
        let a = vec![vec![0u8], vec![2], vec![0], vec![2]];
        let b = vec![vec![1u8], vec![1]];
        assert!((w1(&a, &b, 3) - 0.5).abs() < 1e-12);
        // Black against white on every pixel: the whole range, 1.
        let (black, white) = (vec![vec![0u8; 4]; 3], vec![vec![16u8; 4]; 5]);
        assert!((w1(&black, &white, 17) - 1.0).abs() < 1e-12);
        // Two pixels, one equal and one a level apart (of 16): the mean (0 + 1/16) / 2.
        let (x, y) = (vec![vec![3u8, 4]], vec![vec![3u8, 5]]);
        assert!((w1(&x, &y, 17) - 1.0 / 32.0).abs() < 1e-12);
        assert!(w1(&a, &a, 3).abs() < 1e-12);
    }

    #[test]
    fn mmd2_matches_a_hand_computed_case() {
        // One pixel, 2 levels. X = {0, 0}, Y = {1, 1}, s^2 = 1/2: k(0, 0) = 1, k(0, 1) = e^-1.
        // MMD^2 = 1 + 1 - 2 e^-1 = 1.264241...
        let (x, y) = (vec![vec![0u8], vec![0]], vec![vec![1u8], vec![1]]);
        assert!((mmd2(&x, &y, 2, 0.5) - (2.0 - 2.0 / std::f64::consts::E)).abs() < 1e-12);
        // X = {0, 1} against itself: the within terms are k(0, 1) = e^-1 each, the cross term
        // (1 + e^-1 + e^-1 + 1) / 4, so MMD^2 = 2 e^-1 - (1 + e^-1) = e^-1 - 1 < 0.
        let z = vec![vec![0u8], vec![1]];
        assert!((mmd2(&z, &z, 2, 0.5) - (1.0 / std::f64::consts::E - 1.0)).abs() < 1e-12);
    }

    #[test]
    fn bandwidth_is_half_the_median_squared_distance() {
        // Three 1-pixel images at 0, 1/2 and 1 (K = 3): squared distances 1/4, 1, 1/4.
        let r = vec![vec![0u8], vec![1], vec![2]];
        assert_eq!(bandwidth(&r, 3), Some(0.125));
        assert_eq!(bandwidth(&r[..1], 3), None);
        assert_eq!(bandwidth(&[vec![1u8], vec![1]], 3), None);
    }
}
