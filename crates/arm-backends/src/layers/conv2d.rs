//! Shifted 2D convolution for the raster-order plugins, channels-last, as im2col + one matmul.
//!
//! A convolution here is a list of taps (dy, dx): output cell (r, c) reads input cells
//! (r + dy, c + dx), zero outside the image. Masked convolutions (van den Oord et al. 2016,
//! "Pixel Recurrent Neural Networks", §3.4, Fig. 2: mask A / mask B) and the vertical and
//! horizontal stacks of the gated PixelCNN (van den Oord et al. 2016, "Conditional Image
//! Generation with PixelCNN Decoders", §2.1, Fig. 1-2) differ only in their tap lists. Listing
//! only the taps a mask allows makes the mask exact (there are no masked-out weights to leak or
//! to waste FLOPs on) and the convolution is [`arm_kernels::Unfold`] followed by one matmul
//! with a (taps * C_in, C_out) weight, at the gemm's speed (one op: [`arm_kernels::dense`]).
//!
//! Grids are (B, H*W, C): cell index r * W + c is the raster position, so (B, D) inputs only
//! need an `unsqueeze(2)`. Left out: colour-channel masks (the data are greyscale).

use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use arm_core::Result;

use arm_kernels::Unfold;

/// Which taps of a k x k PixelCNN kernel are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Rows above, and left of the centre in the centre row (first layer: never sees x_d).
    A,
    /// Mask A plus the centre (later layers: the centre holds features of x_<d only).
    B,
}

/// Taps of a k x k kernel (k odd) under a PixelCNN mask.
pub fn masked_taps(k: usize, mask: Mask) -> Vec<(isize, isize)> {
    let h = (k / 2) as isize;
    let mut taps: Vec<(isize, isize)> = (-h..0).flat_map(|dy| (-h..=h).map(move |dx| (dy, dx))).collect();
    taps.extend((-h..0).map(|dx| (0, dx)));
    if mask == Mask::B {
        taps.push((0, 0));
    }
    taps
}

/// Vertical stack of the gated PixelCNN: a (k/2 + 1) x k window of rows strictly above.
/// The first layer reads the input rows r-1-k/2 ..= r-1 (the "shift down by one row"); later
/// layers read their input rows r-k/2 ..= r, which already hold only rows above each cell, so
/// the centre row (including cells to the right) is safe to read.
pub fn vertical_taps(k: usize, first: bool) -> Vec<(isize, isize)> {
    let h = (k / 2) as isize;
    let top = if first { -h - 1 } else { -h };
    let bottom = if first { -1 } else { 0 };
    (top..=bottom).flat_map(|dy| (-h..=h).map(move |dx| (dy, dx))).collect()
}

/// Horizontal stack of the gated PixelCNN: a 1 x (k/2 + 1) window of the current row ending at
/// the current cell; the first layer stops one cell earlier (mask A).
pub fn horizontal_taps(k: usize, first: bool) -> Vec<(isize, isize)> {
    let h = ((k / 2) as isize).max(1);
    let right = if first { -1 } else { 0 };
    (-h..=right).map(|dx| (0, dx)).collect()
}

/// Every tap of a k x k window (k odd), row by row.
pub fn window_taps(k: usize) -> Vec<(isize, isize)> {
    let h = (k / 2) as isize;
    (-h..=h).flat_map(|dy| (-h..=h).map(move |dx| (dy, dx))).collect()
}

/// The cell masks of a locally masked convolution (Jain, Abbeel & Pathak 2020, §3): tap t of
/// cell p is kept where it reads a pixel q inside the image that comes before p in the
/// ordering, rank[q] < rank[p], or (`strict` false, layers after the first, whose cell p holds
/// features of earlier pixels only) rank[q] <= rank[p]. Laid out as `Unfold::mask`.
pub fn local_mask(rank: &[usize], (height, width): (usize, usize), taps: &[(isize, isize)], strict: bool) -> Arc<[bool]> {
    let mut mask = Vec::with_capacity(height * width * taps.len());
    for p in 0..height * width {
        let (r, c) = ((p / width) as isize, (p % width) as isize);
        for &(dy, dx) in taps {
            let (rr, cc) = (r + dy, c + dx);
            let inside = rr >= 0 && cc >= 0 && (rr as usize) < height && (cc as usize) < width;
            let keep = inside && {
                let q = rr as usize * width + cc as usize;
                if strict {
                    rank[q] < rank[p]
                } else {
                    rank[q] <= rank[p]
                }
            };
            mask.push(keep);
        }
    }
    mask.into()
}

/// A locally masked convolution over `taps` for the ordering of `rank` (see [`local_mask`]).
pub fn local_conv2d(
    cin: usize,
    cout: usize,
    taps: Vec<(isize, isize)>,
    rank: &[usize],
    strict: bool,
    shape: (usize, usize),
    vb: VarBuilder,
) -> Result<TapConv2d> {
    let mask = local_mask(rank, shape, &taps, strict);
    let mut conv = tap_conv2d(cin, cout, taps, shape, vb)?;
    conv.unfold.mask = Some(mask);
    Ok(conv)
}

/// Channels-last convolution over a fixed tap list: (B, H*W, C_in) -> (B, H*W, C_out).
#[derive(Debug, Clone)]
pub struct TapConv2d {
    pub(crate) w: Tensor, // (taps * C_in, C_out), tap-major rows
    pub(crate) b: Tensor, // (C_out,)
    pub(crate) unfold: Unfold,
}

/// PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the fan-in of the taps actually
/// present (PyTorch would count the masked-out weights too).
pub fn tap_conv2d(
    cin: usize,
    cout: usize,
    taps: Vec<(isize, isize)>,
    (height, width): (usize, usize),
    vb: VarBuilder,
) -> Result<TapConv2d> {
    if taps.is_empty() {
        candle_core::bail!("tap_conv2d: no taps");
    }
    let bound = 1.0 / ((taps.len() * cin).max(1) as f64).sqrt();
    let init = Init::Uniform { lo: -bound, up: bound };
    Ok(TapConv2d {
        w: vb.get_with_hints((taps.len() * cin, cout), "weight", init)?,
        b: vb.get_with_hints(cout, "bias", init)?,
        unfold: Unfold { height, width, taps, mask: None },
    })
}

/// A k x k convolution under a PixelCNN mask (Fig. 2 of the PixelRNN paper): only the taps the
/// mask allows exist.
pub fn masked_conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    mask: Mask,
    shape: (usize, usize),
    vb: VarBuilder,
) -> Result<TapConv2d> {
    tap_conv2d(cin, cout, masked_taps(k, mask), shape, vb)
}

impl TapConv2d {
    /// (B, N, C_in) -> (B, N, C_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, Some(&self.unfold), None) // (B, N, C_out)
    }

    /// conv(gate(a)) with gate(a) = tanh(a[.., :C]) * sigmoid(a[.., C:]), a: (B, N, 2C): the
    /// gate runs inside the convolution's op.
    pub fn forward_gated(&self, a: &Tensor) -> Result<Tensor> {
        arm_kernels::dense_gated(a, &self.w, &self.b, Some(&self.unfold)) // (B, N, C_out)
    }

    /// One output cell for a stepper. `cells[p]` is the input at raster position p, (B, C_in),
    /// for every position computed so far; taps outside the image read zeros, and a tap that
    /// reads a position not yet computed is an error (it would be a causality bug).
    pub fn forward_at(&self, pos: usize, cells: &[Tensor], zero: &Tensor) -> Result<Tensor> {
        let cols = self
            .taps()
            .iter()
            .map(|&tap| match self.source(pos, tap) {
                None => Ok(zero.clone()),
                Some(src) => cells.get(src).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("tap {tap:?} of cell {pos} reads uncomputed cell {src}"))
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&cols, 1)?.matmul(&self.w)?.broadcast_add(&self.b) // (B, C_out)
    }

    /// Input cell read by `tap` for output cell `pos`; None outside the image.
    pub fn source(&self, pos: usize, (dy, dx): (isize, isize)) -> Option<usize> {
        let w = self.unfold.width;
        let (r, c) = ((pos / w) as isize + dy, (pos % w) as isize + dx);
        let inside = r >= 0 && c >= 0 && (r as usize) < self.unfold.height && (c as usize) < w;
        inside.then(|| r as usize * w + c as usize)
    }

    pub fn taps(&self) -> &[(isize, isize)] {
        &self.unfold.taps
    }

    pub fn out_channels(&self) -> Result<usize> {
        self.w.dim(1)
    }
}

/// Straightforward reference for tests: loops over cells, taps and channels.
pub fn tap_conv2d_reference(conv: &TapConv2d, x: &Tensor) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let xv = x.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let w = conv.w.to_vec2::<f32>()?; // (taps*C_in, C_out)
    let bias = conv.b.to_vec1::<f32>()?;
    let cout = bias.len();
    let mut out = vec![0f32; b * n * cout];
    for bi in 0..b {
        for pos in 0..n {
            for o in 0..cout {
                let mut acc = bias[o];
                for (t, &tap) in conv.taps().iter().enumerate() {
                    if let Some(src) = conv.source(pos, tap) {
                        for ci in 0..c {
                            acc += xv[bi][src][ci] * w[t * c + ci][o];
                        }
                    }
                }
                out[(bi * n + pos) * cout + o] = acc;
            }
        }
    }
    Tensor::from_vec(out, (b, n, cout), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A 3x3 mask-B convolution of a 7x7 input (the setup of the chapter's Fig. 2.6), with
    /// every weight 1 and no bias, on an all-ones image: each output counts the taps mask B
    /// keeps inside the image. Written out by hand: the first cell sees itself only, the rest
    /// of the first row itself and its left neighbour, the first column the two cells above
    /// and itself, the last column two above, the left one and itself, the inside all five.
    #[test]
    fn mask_b_on_a_7x7_image_by_hand() -> Result<()> {
        let taps = masked_taps(3, Mask::B);
        assert_eq!(taps, vec![(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0)]);
        let unfold = Unfold { height: 7, width: 7, taps, mask: None };
        let conv = TapConv2d {
            w: Tensor::ones((5, 1), DType::F32, &Device::Cpu)?,
            b: Tensor::zeros(1, DType::F32, &Device::Cpu)?,
            unfold,
        };
        let y = conv.forward(&Tensor::ones((1, 49, 1), DType::F32, &Device::Cpu)?)?.flatten_all()?.to_vec1::<f32>()?;
        #[rustfmt::skip]
        let want = [
            1., 2., 2., 2., 2., 2., 2.,
            3., 5., 5., 5., 5., 5., 4.,
            3., 5., 5., 5., 5., 5., 4.,
            3., 5., 5., 5., 5., 5., 4.,
            3., 5., 5., 5., 5., 5., 4.,
            3., 5., 5., 5., 5., 5., 4.,
            3., 5., 5., 5., 5., 5., 4.,
        ];
        assert_eq!(y, want);
        // A digit-like input and kernel weights 1..9 over the full 3x3 window, masked by the
        // 0/1 kernel of mask B; against a direct double loop over the zero-padded image.
        let x: Vec<f32> = (0..49).map(|i| ((i * 3 + i / 7) % 4) as f32).collect();
        let kernel: [[f32; 3]; 3] = [[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]];
        let keep = [[1., 1., 1.], [1., 1., 0.], [0., 0., 0.]]; // mask B
        let mut direct = vec![0f32; 49];
        for r in 0..7i32 {
            for c in 0..7i32 {
                for (i, dy) in (-1..=1).enumerate() {
                    for (j, dx) in (-1..=1).enumerate() {
                        let (rr, cc) = (r + dy, c + dx);
                        if (0..7).contains(&rr) && (0..7).contains(&cc) {
                            direct[(r * 7 + c) as usize] += keep[i][j] * kernel[i][j] * x[(rr * 7 + cc) as usize];
                        }
                    }
                }
            }
        }
        let w: Vec<f32> = masked_taps(3, Mask::B).iter().map(|&(dy, dx)| kernel[(dy + 1) as usize][(dx + 1) as usize]).collect();
        let conv = TapConv2d {
            w: Tensor::from_vec(w, (5, 1), &Device::Cpu)?,
            b: Tensor::zeros(1, DType::F32, &Device::Cpu)?,
            unfold: Unfold { height: 7, width: 7, taps: masked_taps(3, Mask::B), mask: None },
        };
        let y = conv.forward(&Tensor::from_vec(x, (1, 49, 1), &Device::Cpu)?)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, direct);
        Ok(())
    }

    /// The chapter's Fig. 2.6 exactly (J. M. Tomczak, "Deep Generative Modeling", Springer 2022,
    /// ch. 2, Fig. 2.6; its numbers are those of `teaching/figures/arms/pixelcnn_masking_numeric.pdf`
    /// in github.com/jmtomczak/intro_dgm): a 7x7 binary image of a "7", the 3x3 masked kernel
    /// [[1, 1, 1], [1, 1, 0], [0, 0, 0]] and the feature map it gives. The kernel's non-zero
    /// entries are exactly the taps of mask B, and the layer's output is the figure's map.
    #[test]
    fn reproduces_the_chapters_fig_2_6() -> Result<()> {
        #[rustfmt::skip]
        let image: [f32; 49] = [
            0., 0., 0., 0., 0., 0., 0.,
            0., 1., 1., 1., 1., 1., 0.,
            0., 0., 0., 0., 0., 1., 0.,
            0., 0., 0., 0., 1., 0., 0.,
            0., 0., 0., 1., 0., 0., 0.,
            0., 0., 1., 0., 0., 0., 0.,
            0., 1., 0., 0., 0., 0., 0.,
        ];
        let kernel: [[f32; 3]; 3] = [[1., 1., 1.], [1., 1., 0.], [0., 0., 0.]];
        #[rustfmt::skip]
        let feature_map: [f32; 49] = [
            0., 0., 0., 0., 0., 0., 0.,
            0., 1., 2., 2., 2., 2., 1.,
            1., 2., 3., 3., 3., 3., 2.,
            0., 0., 0., 0., 2., 2., 1.,
            0., 0., 0., 2., 2., 1., 0.,
            0., 0., 2., 2., 1., 0., 0.,
            0., 2., 2., 1., 0., 0., 0.,
        ];
        let nonzero: Vec<(isize, isize)> = (0..3)
            .flat_map(|i| (0..3).map(move |j| (i, j)))
            .filter(|&(i, j)| kernel[i][j] != 0.0)
            .map(|(i, j)| (i as isize - 1, j as isize - 1))
            .collect();
        assert_eq!(nonzero, masked_taps(3, Mask::B), "the figure's kernel is mask B");
        let w: Vec<f32> = masked_taps(3, Mask::B).iter().map(|&(dy, dx)| kernel[(dy + 1) as usize][(dx + 1) as usize]).collect();
        let map = VarMap::new();
        let conv = masked_conv2d(1, 1, 3, Mask::B, (7, 7), arm_core::seeded_var_builder(&map, 0, &Device::Cpu))?;
        let conv = TapConv2d { w: Tensor::from_vec(w, (5, 1), &Device::Cpu)?, b: Tensor::zeros(1, DType::F32, &Device::Cpu)?, ..conv };
        let x = Tensor::from_vec(image.to_vec(), (1, 49, 1), &Device::Cpu)?;
        assert_eq!(conv.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, feature_map);
        // The cached stepper's per-cell path gives the same map.
        let cells: Vec<Tensor> = (0..49).map(|p| x.narrow(1, p, 1)?.squeeze(1)).collect::<Result<_>>()?;
        let zero = Tensor::zeros((1, 1), DType::F32, &Device::Cpu)?;
        let stepped = (0..49).map(|p| Ok(conv.forward_at(p, &cells, &zero)?.flatten_all()?.to_vec1::<f32>()?[0])).collect::<Result<Vec<f32>>>()?;
        assert_eq!(stepped, feature_map);
        Ok(())
    }

    /// In raster order a locally masked k x k window is the PixelCNN's mask A / B: the same
    /// outputs as the tap list of the mask with the same weights, whatever the weights of the
    /// taps the local mask drops (Jain et al. 2020 generalise the masked convolution).
    #[test]
    fn local_masks_in_raster_order_are_masks_a_and_b() -> Result<()> {
        let (h, w, cin, cout) = (4, 5, 3, 2);
        let rank: Vec<usize> = (0..h * w).collect();
        for k in [3, 5] {
            for mask in [Mask::A, Mask::B] {
                let full = window_taps(k);
                let map = VarMap::new();
                let vb = arm_core::seeded_var_builder(&map, 4, &Device::Cpu);
                let local = local_conv2d(cin, cout, full.clone(), &rank, mask == Mask::A, (h, w), vb)?;
                // The tap list's weights: the rows of the full window's weight for its taps.
                let kept = masked_taps(k, mask);
                let rows: Vec<Tensor> = kept
                    .iter()
                    .map(|t| {
                        let i = full.iter().position(|f| f == t).expect("tap in the window");
                        local.w.narrow(0, i * cin, cin)
                    })
                    .collect::<Result<_>>()?;
                let listed = TapConv2d {
                    w: Tensor::cat(&rows, 0)?,
                    b: local.b.clone(),
                    unfold: Unfold { height: h, width: w, taps: kept, mask: None },
                };
                let x = rand_input(2, h * w, cin, 9)?;
                let d = (local.forward(&x)? - listed.forward(&x)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(d < 1e-5, "k {k} {mask:?}: {d}");
            }
        }
        Ok(())
    }

    fn rand_input(b: usize, n: usize, c: usize, seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..b * n * c).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, (b, n, c), &Device::Cpu)
    }

    fn tap_sets() -> Vec<Vec<(isize, isize)>> {
        vec![
            masked_taps(3, Mask::A),
            masked_taps(3, Mask::B),
            masked_taps(7, Mask::A),
            masked_taps(1, Mask::B),
            vertical_taps(3, true),
            vertical_taps(5, false),
            horizontal_taps(3, true),
            horizontal_taps(5, false),
        ]
    }

    #[test]
    fn tap_lists_match_the_papers_masks() {
        // 3x3 mask A: the three cells above and the one to the left; B adds the centre.
        assert_eq!(masked_taps(3, Mask::A), vec![(-1, -1), (-1, 0), (-1, 1), (0, -1)]);
        assert_eq!(masked_taps(3, Mask::B).len(), 5);
        // k x k mask A keeps (k*k - 1) / 2 taps.
        assert_eq!(masked_taps(7, Mask::A).len(), 24);
        assert_eq!(vertical_taps(3, true), vec![(-2, -1), (-2, 0), (-2, 1), (-1, -1), (-1, 0), (-1, 1)]);
        assert_eq!(vertical_taps(3, false), vec![(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1)]);
        assert_eq!(horizontal_taps(3, true), vec![(0, -1)]);
        assert_eq!(horizontal_taps(5, false), vec![(0, -2), (0, -1), (0, 0)]);
    }

    #[test]
    fn im2col_conv_equals_the_loop_in_values_and_gradients() -> Result<()> {
        let (h, w) = (4, 5);
        for taps in tap_sets() {
            let map = VarMap::new();
            let vb = arm_core::seeded_var_builder(&map, 3, &Device::Cpu);
            let conv = tap_conv2d(3, 4, taps.clone(), (h, w), vb)?;
            let x = Var::from_tensor(&rand_input(2, h * w, 3, 5)?)?;
            let fast = conv.forward(x.as_tensor())?; // (B, N, C_out)
            let slow = tap_conv2d_reference(&conv, x.as_tensor())?;
            let diff = (&fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{taps:?}: max diff {diff}");
            // Input gradient against central differences of the reference.
            let grads = fast.sqr()?.sum_all()?.backward()?;
            let g = grads.get(&x).expect("input gradient").to_vec3::<f32>()?;
            let xv = x.as_tensor().to_vec3::<f32>()?;
            let loss = |xv: &Vec<Vec<Vec<f32>>>| -> Result<f64> {
                let flat: Vec<f32> = xv.iter().flatten().flatten().copied().collect();
                let t = Tensor::from_vec(flat, (2, h * w, 3), &Device::Cpu)?;
                tap_conv2d_reference(&conv, &t)?.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
            };
            for (bi, pi, ci) in [(0, 0, 0), (1, 19, 2), (0, 7, 1), (1, 12, 0)] {
                let eps = 1e-2f32;
                let mut up = xv.clone();
                up[bi][pi][ci] += eps;
                let mut dn = xv.clone();
                dn[bi][pi][ci] -= eps;
                let num = (loss(&up)? - loss(&dn)?) / (2.0 * eps as f64);
                let ana = g[bi][pi][ci] as f64;
                assert!((num - ana).abs() < 1e-2 * (1.0 + ana.abs()), "grad {taps:?}: {num} vs {ana}");
            }
        }
        Ok(())
    }

    #[test]
    fn masked_conv_equals_candle_conv2d_with_a_zeroed_kernel() -> Result<()> {
        // The tap offsets are read as (row, column) the way a cross-correlation kernel is.
        let (h, w, cin, cout) = (5, 6, 2, 3);
        for (k, mask) in [(3, Mask::A), (3, Mask::B), (5, Mask::A)] {
            let map = VarMap::new();
            let vb = arm_core::seeded_var_builder(&map, 9, &Device::Cpu);
            let conv = tap_conv2d(cin, cout, masked_taps(k, mask), (h, w), vb)?;
            let wv = conv.w.to_vec2::<f32>()?;
            let half = (k / 2) as isize;
            let mut kernel = vec![0f32; cout * cin * k * k]; // (C_out, C_in, k, k)
            for (t, &(dy, dx)) in conv.taps().iter().enumerate() {
                let (ky, kx) = ((half + dy) as usize, (half + dx) as usize);
                for o in 0..cout {
                    for ci in 0..cin {
                        kernel[((o * cin + ci) * k + ky) * k + kx] = wv[t * cin + ci][o];
                    }
                }
            }
            let kernel = Tensor::from_vec(kernel, (cout, cin, k, k), &Device::Cpu)?;
            let x = rand_input(2, h * w, cin, 4)?; // (B, N, C_in)
            let nchw = x.reshape((2, h, w, cin))?.permute((0, 3, 1, 2))?.contiguous()?;
            let want = nchw.conv2d(&kernel, k / 2, 1, 1, 1)?; // (B, C_out, H, W)
            let want = want.permute((0, 2, 3, 1))?.reshape((2, h * w, cout))?.broadcast_add(&conv.b)?;
            let got = conv.forward(&x)?;
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "k={k} {mask:?}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn forward_at_equals_forward_rows() -> Result<()> {
        let (h, w) = (3, 4);
        for taps in tap_sets().into_iter().filter(|t| t.iter().all(|&(dy, dx)| dy < 0 || (dy == 0 && dx <= 0))) {
            let map = VarMap::new();
            let conv = tap_conv2d(2, 3, taps.clone(), (h, w), arm_core::seeded_var_builder(&map, 1, &Device::Cpu))?;
            let x = rand_input(2, h * w, 2, 8)?;
            let full = conv.forward(&x)?; // (B, N, C_out)
            let cells = (0..h * w).map(|p| x.narrow(1, p, 1)?.squeeze(1)).collect::<Result<Vec<_>>>()?;
            let zero = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?;
            for p in 0..h * w {
                let got = conv.forward_at(p, &cells[..=p], &zero)?;
                let want = full.narrow(1, p, 1)?.squeeze(1)?;
                let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{taps:?} cell {p}: {diff}");
            }
        }
        Ok(())
    }
}
