//! Exact 2D receptive fields of the raster-order plugins on a 5x5 image, by perturbation:
//! output row d depends on input j iff changing x_j changes row d for some image of a random
//! batch. 16 channels make a ReLU that is dead on every channel for every image improbable
//! (with 4, some true dependencies vanish); weights and batch are seeded, so the outcome is
//! fixed. The gated PixelCNN sees every earlier pixel; the plain PixelCNN misses exactly the
//! wedge above-right of the current pixel that its masked kernels cannot reach (its "blind
//! spot", van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders",
//! §2.2, Fig. 1). The expected sets are derived by hand in the comments.

use arm_backends::{plugin, BuildCtx};
use arm_core::seeded_var_builder;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type R<T> = Result<T, Box<dyn std::error::Error>>;

const H: usize = 5;
const W: usize = 5;
const D: usize = H * W;

/// `dep[d][j]`: does output row d change when input j changes?
fn dependencies(name: &str, cfg: &str) -> R<Vec<Vec<bool>>> {
    let p = plugin(name)?;
    let cfg: toml::Table = toml::from_str(cfg)?;
    let map = VarMap::new();
    let ctx = BuildCtx {
        vb: seeded_var_builder(&map, 3, &Device::Cpu),
        device: Device::Cpu,
        height: H,
        width: W,
        num_params: 2,
        levels: 2,
        seed: 3,
        order: None,
        cond_dim: 0,
    };
    let net = p.build(&cfg, ctx)?;
    let b = 16;
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let x: Vec<Vec<f32>> = (0..b).map(|_| (0..D).map(|_| rng.random::<f32>()).collect()).collect();
    let base = net.forward_t(&Tensor::new(x.clone(), &Device::Cpu)?, false)?; // (B, D, P)
    let mut dep = vec![vec![false; D]; D];
    for j in 0..D {
        let mut xj = x.clone();
        for (i, row) in xj.iter_mut().enumerate() {
            row[j] += if i % 2 == 0 { 0.6 } else { -0.8 };
        }
        let out = net.forward_t(&Tensor::new(xj, &Device::Cpu)?, false)?;
        let diff = (&out - &base)?.abs()?.sum(2)?.sum(0)?.to_vec1::<f32>()?; // (D,)
        for (d, v) in diff.iter().enumerate() {
            dep[d][j] = *v != 0.0;
        }
    }
    Ok(dep)
}

/// Compares the measured field of every output pixel with `expected(r, c, r2, c2)` and lists
/// every mismatch.
fn assert_field(dep: &[Vec<bool>], expected: impl Fn(usize, usize, usize, usize) -> bool) {
    let mut bad = Vec::new();
    for d in 0..D {
        for j in 0..D {
            let want = expected(d / W, d % W, j / W, j % W);
            if dep[d][j] != want {
                bad.push(format!(
                    "output ({}, {}) <- input ({}, {}): got {}, want {want}",
                    d / W,
                    d % W,
                    j / W,
                    j % W,
                    dep[d][j]
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{} mismatches:\n{}", bad.len(), bad.join("\n"));
}

/// The inputs output (r, c) misses although they come earlier in raster order.
fn blind(dep: &[Vec<bool>], r: usize, c: usize) -> Vec<(usize, usize)> {
    let d = r * W + c;
    (0..d).filter(|&j| !dep[d][j]).map(|j| (j / W, j % W)).collect()
}

#[test]
fn gated_pixelcnn_sees_every_earlier_pixel() -> R<()> {
    // k = 3, 4 layers: the horizontal stack reaches 1 + 3 = 4 columns left in the current row;
    // the last vertical layer covers rows r-5..r-1 and columns c-4..c+4. Together: all of x_<d.
    let dep = dependencies("gated_pixelcnn", "channels = 16\nlayers = 4\nkernel = 3")?;
    assert_field(&dep, |r, c, r2, c2| (r2, c2) < (r, c));
    assert!(blind(&dep, H - 1, W - 1).is_empty());
    Ok(())
}

#[test]
fn gated_pixelcnn_first_layer_has_the_designed_field() -> R<()> {
    // One layer: the vertical stack reads rows r-2..r-1, columns c-1..c+1 (strictly above);
    // the horizontal stack reads (r, c-1) only (mask A: not the pixel itself).
    let dep = dependencies("gated_pixelcnn", "channels = 16\nlayers = 1\nkernel = 3")?;
    assert_field(&dep, |r, c, r2, c2| {
        let above = r2 < r && r - r2 <= 2 && c2 + 1 >= c && c2 <= c + 1;
        let left = r2 == r && c2 + 1 == c;
        above || left
    });
    Ok(())
}

#[test]
fn pixelcnn_has_exactly_its_blind_spot() -> R<()> {
    // 3x3 mask A, then 3 residual 3x3 mask-B blocks: 4 kernels in a row. A path from output
    // (r, c) back to input (r - j, c + dx) takes one step per kernel: a step "up" (to the row
    // above, dx in -1..=1) or "along" (same row, dx = -1 for mask A, dx in -1..=0 for mask B).
    // Reaching j rows up takes j up-steps; the rightmost reach is dx = j (every up-step leans
    // right, the mask-A step is one of them, along-steps stay put). Leftwards every step can
    // go one column, so 4 columns: the whole 5x5 image. Hence (r, c) sees (r2, c2) iff it is
    // earlier in raster order and, in rows above, c2 - c <= r - r2.
    let dep = dependencies("pixelcnn", "channels = 16\nlayers = 3\nfirst_kernel = 3\nkernel = 3")?;
    assert_field(&dep, |r, c, r2, c2| (r2, c2) < (r, c) && (r2 == r || c2 <= c + (r - r2)));
    // Spelled out for two pixels: (4, 1) misses (2, 4), (3, 3) and (3, 4); (2, 2) misses (1, 4).
    assert_eq!(blind(&dep, 4, 1), vec![(2, 4), (3, 3), (3, 4)]);
    assert_eq!(blind(&dep, 2, 2), vec![(1, 4)]);
    // The last pixel has nothing above-right of it, so it sees everything before it.
    assert!(blind(&dep, H - 1, W - 1).is_empty());
    Ok(())
}
