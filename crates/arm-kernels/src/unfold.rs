//! im2col as a custom candle op: for every cell of a (B, H*W, C) channels-last grid, gather the
//! C-vectors at fixed (row, column) offsets into one row of (B, H*W, taps*C); cells outside
//! the grid read zeros. Causal Conv1d (H = 1) and masked / shifted Conv2d are this op followed
//! by one matmul, which runs at candle's gemm speed. Its backward is the adjoint (col2im: a
//! scatter-add of row slices), so no autograd graph of narrows and concatenations is built.
//!
//! A per-cell mask (`mask[pos * taps + t]`) turns it into the locally masked convolution of
//! Jain, Abbeel & Pathak 2020 ("Locally Masked Convolution for Autoregressive Models", §3,
//! eq. 2): im2col, zero the masked (cell, tap) slices, then the shared matmul; the fold skips the
//! same slices, so the backward is still the exact adjoint.
//!
//! Written as contiguous row copies (memcpy of C floats), parallel over the batch. On devices
//! without a kernel here, callers fall back to the narrow + cat formulation.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::Arc;

use rayon::prelude::*;

use crate::Result;

use crate::gemm::f32s;

/// Tap offsets (dy, dx): tap t of cell (r, c) reads cell (r + dy, c + dx).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfold {
    pub height: usize,
    pub width: usize,
    pub taps: Vec<(isize, isize)>,
    /// Per-cell tap mask, `mask[pos * taps + t]`: false reads zero (a locally masked
    /// convolution); None keeps every tap of every cell.
    pub mask: Option<Arc<[bool]>>,
}

/// Adjoint of [`Unfold`]: (B, H*W, taps*C) -> (B, H*W, C), summing each slice into its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fold(pub Unfold);

impl Unfold {
    /// Source cell of tap `t` for cell `pos`, if inside the grid.
    /// Source cell of tap `t` (index) for cell `pos`, if inside the grid and not masked.
    #[inline]
    pub fn source_of(&self, pos: usize, t: usize) -> Option<usize> {
        if let Some(m) = &self.mask {
            if !m[pos * self.taps.len() + t] {
                return None;
            }
        }
        self.source_unmasked(pos, self.taps[t])
    }

    #[inline]
    fn source_unmasked(&self, pos: usize, (dy, dx): (isize, isize)) -> Option<usize> {
        let (r, c) = ((pos / self.width) as isize, (pos % self.width) as isize);
        let (rr, cc) = (r + dy, c + dx);
        if rr >= 0 && cc >= 0 && (rr as usize) < self.height && (cc as usize) < self.width {
            Some(rr as usize * self.width + cc as usize)
        } else {
            None
        }
    }

    fn check(&self, l: &Layout, chan_mult: usize) -> Result<(usize, usize, usize)> {
        let (b, n, c) = l.shape().dims3()?;
        if n != self.height * self.width {
            bail!("unfold: {n} cells, expected {}x{}", self.height, self.width);
        }
        if self.mask.as_ref().is_some_and(|m| m.len() != n * self.taps.len()) {
            bail!("unfold: mask is not {n} cells x {} taps", self.taps.len());
        }
        if c % chan_mult != 0 {
            bail!("fold: {c} columns is not a multiple of {chan_mult} taps");
        }
        Ok((b, n, c / chan_mult))
    }

    /// The columns (B*N*taps*C floats) of a contiguous (B, N, C) input.
    pub(crate) fn unfold_cpu(&self, x: &[f32], b: usize, n: usize, c: usize) -> Vec<f32> {
        let k = self.taps.len();
        let mut out = vec![0f32; b * n * k * c];
        out.par_chunks_mut(n * k * c).enumerate().for_each(|(bi, ob)| {
            let xb = &x[bi * n * c..(bi + 1) * n * c];
            for pos in 0..n {
                for t in 0..k {
                    if let Some(src) = self.source_of(pos, t) {
                        let dst = (pos * k + t) * c;
                        ob[dst..dst + c].copy_from_slice(&xb[src * c..(src + 1) * c]);
                    }
                }
            }
        });
        out
    }

    /// The adjoint of [`Self::unfold_cpu`]: (B*N*taps*C) columns summed back into (B*N*C).
    pub(crate) fn fold_cpu(&self, g: &[f32], b: usize, n: usize, c: usize) -> Vec<f32> {
        let k = self.taps.len();
        let mut out = vec![0f32; b * n * c];
        out.par_chunks_mut(n * c).enumerate().for_each(|(bi, ob)| {
            let gb = &g[bi * n * k * c..(bi + 1) * n * k * c];
            for pos in 0..n {
                for t in 0..k {
                    if let Some(src) = self.source_of(pos, t) {
                        let from = &gb[(pos * k + t) * c..(pos * k + t + 1) * c];
                        crate::simd::add_assign(&mut ob[src * c..(src + 1) * c], from);
                    }
                }
            }
        });
        out
    }

    /// Whether [`crate::dense`] and [`crate::dense_pair`] run this tap list on a zero-padded
    /// copy of the grid instead of im2col (unmasked, 2D, and padding adds little work).
    pub fn padded_route(&self) -> bool {
        crate::implicit::Padded::plan(self).is_some()
    }

    /// The same taps pointing the other way: tap t of cell p reads cell p - offset_t.
    /// Only for unmasked unfolds: a cell mask does not reverse.
    pub(crate) fn reversed(&self) -> Unfold {
        debug_assert!(self.mask.is_none());
        Unfold { height: self.height, width: self.width, taps: self.taps.iter().map(|&(dy, dx)| (-dy, -dx)).collect(), mask: None }
    }

    /// Applies the op with autograd on CPU; elsewhere the equivalent narrow + cat graph.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            return x.contiguous()?.apply_op1(self.clone());
        }
        self.apply_generic(x)
    }

    /// Device-agnostic formulation (pads and narrows), also the reference in tests.
    pub fn apply_generic(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (h, w) = (self.height, self.width);
        let grid = x.reshape((b, h, w, c))?;
        let (up, left) = self
            .taps
            .iter()
            .fold((0usize, 0usize), |(u, l), &(dy, dx)| (u.max((-dy).max(0) as usize), l.max((-dx).max(0) as usize)));
        let (down, right) = self
            .taps
            .iter()
            .fold((0usize, 0usize), |(d, r), &(dy, dx)| (d.max(dy.max(0) as usize), r.max(dx.max(0) as usize)));
        let padded = grid.pad_with_zeros(1, up, down)?.pad_with_zeros(2, left, right)?; // (B, H+.., W+.., C)
        let cols = self
            .taps
            .iter()
            .map(|&(dy, dx)| {
                padded
                    .narrow(1, (up as isize + dy) as usize, h)?
                    .narrow(2, (left as isize + dx) as usize, w)?
                    .reshape((b, n, c))
            })
            .collect::<Result<Vec<_>>>()?;
        let cols = Tensor::cat(&cols, 2)?; // (B, N, taps*C)
        match &self.mask {
            None => Ok(cols),
            Some(m) => {
                let k = self.taps.len();
                let m: Vec<f32> = m.iter().map(|&a| if a { 1.0 } else { 0.0 }).collect();
                let m = Tensor::from_vec(m, (1, n, k, 1), x.device())?.to_dtype(x.dtype())?;
                cols.reshape((b, n, k, c))?.broadcast_mul(&m)?.reshape((b, n, k * c))
            }
        }
    }
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, c) = self.check(l, 1)?;
        let cols = self.unfold_cpu(f32s(s, l, "unfold input")?, b, n, c);
        Ok((CpuStorage::F32(cols), Shape::from((b, n, self.taps.len() * c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Fold(self.clone()))?))
    }
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let u = &self.0;
        let k = u.taps.len();
        let (b, n, c) = u.check(l, k)?;
        let out = u.fold_cpu(f32s(s, l, "fold input")?, b, n, c);
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(self.0.clone())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn rand_t(shape: (usize, usize, usize), seed: u64) -> Result<Tensor> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1 * shape.2).map(|_| rng.random::<f32>() - 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    #[test]
    fn custom_op_equals_pad_and_narrow_in_values_and_gradients() -> Result<()> {
        let cases = [
            Unfold { height: 1, width: 9, taps: vec![(0, 0), (0, -1), (0, -2)], mask: None },
            Unfold { height: 1, width: 9, taps: vec![(0, -1), (0, -3), (0, -5), (0, -7)], mask: None },
            Unfold { height: 3, width: 4, taps: vec![(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0)], mask: None },
            Unfold { height: 4, width: 3, taps: vec![(-2, 2), (1, 0), (0, -3)], mask: None },
            // A locally masked 3x3 window: every cell keeps its own subset of taps.
            Unfold {
                height: 3,
                width: 4,
                taps: (-1..=1).flat_map(|dy| (-1..=1).map(move |dx| (dy, dx))).collect(),
                mask: Some((0..12 * 9).map(|i| (i * 7 + i / 9) % 3 != 0).collect()),
            },
        ];
        for u in cases {
            let x = Var::from_tensor(&rand_t((2, u.height * u.width, 3), 1)?)?;
            let w = rand_t((2, u.height * u.width, 3 * u.taps.len()), 2)?;
            let fast = u.apply(x.as_tensor())?;
            let slow = u.apply_generic(x.as_tensor())?;
            assert_eq!(fast.to_vec3::<f32>()?, slow.to_vec3::<f32>()?, "{u:?}");
            let gf = (&fast * &w)?.sum_all()?.backward()?.get(&x).expect("grad").to_vec3::<f32>()?;
            let gs = (&slow * &w)?.sum_all()?.backward()?.get(&x).expect("grad").to_vec3::<f32>()?;
            for (a, b) in gf.iter().flatten().flatten().zip(gs.iter().flatten().flatten()) {
                assert!((a - b).abs() < 1e-5, "{u:?}: {a} vs {b}");
            }
        }
        Ok(())
    }
}
