//! Tap convolutions on 2D grids without im2col: the grid is copied once into a zero-padded
//! layout, and every run of taps on one row (dy fixed, dx consecutive) is one gemm whose left
//! operand is a view of overlapping rows of that copy.
//!
//! Padded layout: image b, row r, column c at cell `margin + (b hp + top + r) wp + c`, with
//! wp = W + side and hp = top + H + bottom; the `side` columns right of each row and the
//! top / bottom rows hold zeros. Tap (dy, dx) of a cell is then the cell `dy wp + dx` away for
//! every cell of every image: a read left of column 0 lands in the previous row's right pad,
//! one above row 0 in the top pad. Cells (r, c + dx) for a run of consecutive dx are
//! consecutive cells, so their C-vectors are one contiguous k C slice: a view with row
//! stride C (rows overlap) is the run's im2col, read in place by the gemm's packing.
//!
//! The products cover every cell between the first and the last real one, pads included
//! (hp wp / (H W) of the work: 1.07 for 28x28 with k = 3), so the layout is used only where
//! that ratio is small ([`Padded::plan`]); the results at pad cells are dropped.
//! Backward, with dy padded the same way (zeros at pads): dx = sum over runs of views of dy
//! shifted the other way times the run's W_t^T in reversed tap order; dW of a run = view^T dy.

use crate::gemm::{gemm_into, weight_grad_sums, View};
use crate::unfold::Unfold;
use crate::Result;
use gemm::Parallelism;
use rayon::prelude::*;

/// (dx, dW) of a padded product, each when asked for.
type InputAndWeightGrads = (Option<Vec<f32>>, Option<Vec<f32>>);

/// The padded layout of one unmasked tap list on an H x W grid (see the module header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Padded {
    h: usize,
    w: usize,
    top: usize,
    wp: usize,
    hp: usize,
    /// Zero cells before the first and after the last image: the largest |offset|.
    margin: usize,
    /// Runs of taps: (first tap, taps in the run, cell offset of the first tap).
    runs: Vec<(usize, usize, isize)>,
    taps: usize,
}

/// Work of the padded products over that of the real cells above which the im2col route is
/// kept (8x8 with k = 3 is 1.27-1.41; 28x28 is 1.07-1.11).
const MAX_PAD_RATIO: f64 = 1.2;

impl Padded {
    /// The layout for `u` where it pays: an unmasked 2D tap list whose padding adds at most
    /// [`MAX_PAD_RATIO`] of work. 1D grids (H = 1) keep their own routes.
    pub(crate) fn plan(u: &Unfold) -> Option<Padded> {
        let p = Self::new(u)?;
        let ratio = (p.hp * p.wp) as f64 / (p.h * p.w).max(1) as f64;
        (u.height > 1 && ratio <= MAX_PAD_RATIO).then_some(p)
    }

    /// The layout for any unmasked, non-empty tap list (no cost rule: tests use it on tiny grids).
    pub(crate) fn new(u: &Unfold) -> Option<Padded> {
        if u.mask.is_some() || u.taps.is_empty() || u.height == 0 || u.width == 0 {
            return None;
        }
        let top = u.taps.iter().map(|t| (-t.0).max(0) as usize).max().unwrap_or(0);
        let bottom = u.taps.iter().map(|t| t.0.max(0) as usize).max().unwrap_or(0);
        let side = u.taps.iter().map(|t| t.1.unsigned_abs()).max().unwrap_or(0);
        let (wp, hp) = (u.width + side, top + u.height + bottom);
        let off = |(dy, dx): (isize, isize)| dy * wp as isize + dx;
        let mut runs: Vec<(usize, usize, isize)> = Vec::new();
        for (t, &tap) in u.taps.iter().enumerate() {
            match runs.last_mut() {
                Some((first, len, o))
                    if u.taps[*first + *len - 1] == (tap.0, tap.1 - 1) && *o + *len as isize == off(tap) =>
                {
                    *len += 1
                }
                _ => runs.push((t, 1, off(tap))),
            }
        }
        let margin = u.taps.iter().map(|&t| off(t).unsigned_abs()).max().unwrap_or(0);
        Some(Padded { h: u.height, w: u.width, top, wp, hp, margin, runs, taps: u.taps.len() })
    }

    /// Cells of one image.
    pub(crate) fn cells(&self) -> usize {
        self.h * self.w
    }

    /// Taps of the convolution.
    pub(crate) fn taps(&self) -> usize {
        self.taps
    }

    /// Cells of the padded buffer of `b` images, margins included.
    pub(crate) fn len(&self, b: usize) -> usize {
        2 * self.margin + b * self.hp * self.wp
    }

    /// Buffer cell of image `bi`, row 0, column 0.
    fn origin(&self, bi: usize) -> usize {
        self.margin + (bi * self.hp + self.top) * self.wp
    }

    /// The cells the products compute: from the first real cell to the last, [p0, p1).
    pub(crate) fn span(&self, b: usize) -> (usize, usize) {
        (self.origin(0), self.origin(b - 1) + (self.h - 1) * self.wp + self.w)
    }

    /// (B, H*W, C) into the padded layout, zeros elsewhere.
    pub(crate) fn pad(&self, x: &[f32], b: usize, c: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.len(b) * c];
        let (first, _) = self.span(b);
        let img = self.hp * self.wp * c;
        // Image bi's real cells start at first + bi hp wp: chunk the buffer from `first`.
        out[first * c..].par_chunks_mut(img).zip(x.par_chunks(self.h * self.w * c)).for_each(|(o, xi)| {
            for r in 0..self.h {
                o[r * self.wp * c..(r * self.wp + self.w) * c]
                    .copy_from_slice(&xi[r * self.w * c..(r + 1) * self.w * c]);
            }
        });
        out
    }

    /// The real cells of `span`-relative rows `yp` (cells [p0, p1) of `c` values) as (B, H*W, C).
    pub(crate) fn unpad(&self, yp: &[f32], b: usize, c: usize) -> Vec<f32> {
        let mut out = vec![0f32; b * self.h * self.w * c];
        let img = self.hp * self.wp * c;
        out.par_chunks_mut(self.h * self.w * c).enumerate().for_each(|(bi, o)| {
            let src = &yp[bi * img..];
            for r in 0..self.h {
                o[r * self.w * c..(r + 1) * self.w * c]
                    .copy_from_slice(&src[r * self.wp * c..(r * self.wp + self.w) * c]);
            }
        });
        out
    }

    /// conv(x) without bias: x (B, H*W, C_in), W (taps C_in, C_out) tap-major -> (B, H*W, C_out).
    pub(crate) fn forward(
        &self,
        x: &[f32],
        w: &[f32],
        b: usize,
        cin: usize,
        cout: usize,
        par: Parallelism,
    ) -> Result<Vec<f32>> {
        let _p = crate::profile::scope("implicit fwd");
        if b == 0 || cin == 0 || cout == 0 {
            return Ok(vec![0f32; b * self.h * self.w * cout]);
        }
        let xp = self.pad(x, b, cin);
        let (p0, p1) = self.span(b);
        let mut yp = vec![0f32; (p1 - p0) * cout];
        self.forward_padded(&xp, w, (b, cin, cout), &mut yp, false, par)?;
        Ok(self.unpad(&yp, b, cout))
    }

    /// conv(x) of a padded buffer `xp` (zeros at pads) into `dst`, the `span` cells of C_out
    /// values (added to them when `acc`). b > 0.
    pub(crate) fn forward_padded(
        &self,
        xp: &[f32],
        w: &[f32],
        (b, cin, cout): (usize, usize, usize),
        dst: &mut [f32],
        acc: bool,
        par: Parallelism,
    ) -> Result<()> {
        let (p0, p1) = self.span(b);
        for (i, &(t, len, off)) in self.runs.iter().enumerate() {
            let lhs = View::new(xp, (p0 as isize + off) as usize * cin, cin, 1);
            let rhs = View::new(w, t * cin * cout, cout, 1);
            gemm_into(dst, 0, cout, (p1 - p0, cout, len * cin), lhs, rhs, acc || i > 0, par)?;
        }
        Ok(())
    }

    /// (dx, dW) of conv(x) from dy (B, H*W, C_out); each only when asked for.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        (b, cin, cout): (usize, usize, usize),
        want_dx: bool,
        want_dw: bool,
        par: Parallelism,
    ) -> Result<InputAndWeightGrads> {
        let _p = crate::profile::scope("implicit bwd");
        if b == 0 || cin == 0 || cout == 0 {
            let dx = want_dx.then(|| vec![0f32; b * self.h * self.w * cin]);
            return Ok((dx, want_dw.then(|| vec![0f32; self.taps * cin * cout])));
        }
        let dyp = self.pad(dy, b, cout);
        let xp = if want_dw { self.pad(x, b, cin) } else { Vec::new() };
        let wr = if want_dx { self.reversed_transposed(w, cin, cout) } else { Vec::new() };
        let (dxp, dw) = self.backward_padded(&xp, &wr, &dyp, (b, cin, cout), (want_dx, want_dw), true, par)?;
        let p0 = self.span(b).0;
        Ok((dxp.map(|d| self.unpad(&d[p0 * cin..], b, cin)), dw))
    }

    /// (dx, dW) of conv(x) on padded buffers: x and dy with zeros at pads; dx is a padded buffer
    /// whose pads hold what the products left there ([`Padded::zero_pads`] clears them). b > 0.
    /// `wr`: W as [`Padded::reversed_transposed`] lays it out (made once by a caller that
    /// runs many parts with the same weights; read only for dx).
    /// `split`: the weight gradients' sums as [`weight_grad_sums`] takes them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_padded(
        &self,
        xp: &[f32],
        wr: &[f32],
        dyp: &[f32],
        (b, cin, cout): (usize, usize, usize),
        (want_dx, want_dw): (bool, bool),
        split: bool,
        par: Parallelism,
    ) -> Result<InputAndWeightGrads> {
        let (p0, p1) = self.span(b);
        let dw = if want_dw {
            let mut dw = Vec::with_capacity(self.taps * cin * cout);
            for &(t, len, off) in &self.runs {
                debug_assert_eq!(dw.len(), t * cin * cout);
                let cols = View::new(xp, (p0 as isize + off) as usize * cin, cin, 1);
                dw.extend(weight_grad_sums(&dyp[p0 * cout..p1 * cout], cout, cols, len * cin, p1 - p0, split)?);
            }
            Some(dw)
        } else {
            None
        };
        let dx = if want_dx {
            // Run taps t..t+len read cells q + off + j; so cell q of dx gathers dy at
            // q - off - j: the view starting at q - off - (len - 1) meets the taps reversed.
            let mut dxp = vec![0f32; self.len(b) * cin];
            for (i, &(t, len, off)) in self.runs.iter().enumerate() {
                let start = p0 as isize - off - (len as isize - 1);
                let lhs = View::new(dyp, start as usize * cout, cout, 1);
                let rhs = View::new(wr, t * cout * cin, cin, 1);
                gemm_into(&mut dxp, p0 * cin, cin, (p1 - p0, cin, len * cout), lhs, rhs, i > 0, par)?;
            }
            Some(dxp)
        } else {
            None
        };
        Ok((dx, dw))
    }

    /// Zeros at every cell of a padded buffer (of `c` values per cell) that is not a cell of
    /// an image.
    pub(crate) fn zero_pads(&self, buf: &mut [f32], b: usize, c: usize) {
        let img = self.hp * self.wp * c;
        let (m, w) = (self.margin * c, self.w * c);
        buf[..m].fill(0.0);
        buf[m + b * img..].fill(0.0);
        buf[m..m + b * img].par_chunks_mut(img.max(1)).for_each(|im| {
            for (r, row) in im.chunks_mut(self.wp * c).enumerate() {
                if r < self.top || r >= self.top + self.h {
                    row.fill(0.0);
                } else {
                    row[w..].fill(0.0);
                }
            }
        });
    }

    /// One layout for several tap lists on the same grid: the largest pads of all, so that
    /// every list's products read and write the same buffers. None if their side pads differ
    /// (cell offsets depend on the padded width).
    pub(crate) fn aligned(ps: &[Padded]) -> Option<Vec<Padded>> {
        let first = ps.first()?;
        if ps.iter().any(|p| (p.h, p.w, p.wp) != (first.h, first.w, first.wp)) {
            return None;
        }
        let top = ps.iter().map(|p| p.top).max()?;
        let bottom = ps.iter().map(|p| p.hp - p.top - p.h).max()?;
        let margin = ps.iter().map(|p| p.margin).max()?;
        Some(ps.iter().map(|p| Padded { top, hp: top + p.h + bottom, margin, ..p.clone() }).collect())
    }

    /// Per run, the blocks W_t^T (C_out x C_in) of its taps in reversed order, run after run:
    /// block i of the run starting at tap t is W_{t + len - 1 - i}^T.
    pub(crate) fn reversed_transposed(&self, w: &[f32], cin: usize, cout: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.taps * cout * cin];
        for &(t, len, _) in &self.runs {
            for i in 0..len {
                let src = &w[(t + len - 1 - i) * cin * cout..(t + len - i) * cin * cout]; // (C_in, C_out)
                let dst = &mut out[(t + i) * cout * cin..(t + i + 1) * cout * cin]; // (C_out, C_in)
                for ci in 0..cin {
                    for o in 0..cout {
                        dst[o * cin + ci] = src[ci * cout + o];
                    }
                }
            }
        }
        out
    }

    /// Taps per run, for tests.
    #[cfg(test)]
    fn run_lengths(&self) -> Vec<usize> {
        self.runs.iter().map(|r| r.1).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::parallelism;

    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + 13 * seed) * 7919 % 613) as f32 - 306.0) / 300.0).collect()
    }

    /// conv by the definition: y[b, p, o] = sum_t sum_c x[b, src(p, t), c] W[t C + c, o], f64.
    fn direct(u: &Unfold, x: &[f32], w: &[f32], b: usize, cin: usize, cout: usize) -> Vec<f64> {
        let n = u.height * u.width;
        let mut y = vec![0f64; b * n * cout];
        for bi in 0..b {
            for p in 0..n {
                for t in 0..u.taps.len() {
                    let Some(q) = u.source_of(p, t) else { continue };
                    for c in 0..cin {
                        let xv = x[(bi * n + q) * cin + c] as f64;
                        for o in 0..cout {
                            y[(bi * n + p) * cout + o] += xv * w[(t * cin + c) * cout + o] as f64;
                        }
                    }
                }
            }
        }
        y
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
        }
    }

    /// Values, dx and dW against the definition, the adjoint identities
    /// <conv(x), dy> = <x, dx> and <conv_W(x), dy> = <W, dW>, for tap lists with runs,
    /// gaps, taps below and right, and the gated PixelCNN's stacks.
    #[test]
    fn padded_products_equal_the_definition_and_its_adjoints() -> Result<()> {
        let t = |v: &[(isize, isize)]| v.to_vec();
        let cases = [
            (3, 4, t(&[(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0)]), vec![3, 2]),
            (4, 3, t(&[(-2, 2), (1, 0), (0, -3)]), vec![1, 1, 1]),
            (5, 6, t(&[(-2, -1), (-2, 0), (-2, 1), (-1, -1), (-1, 0), (-1, 1)]), vec![3, 3]),
            (5, 6, t(&[(0, -1), (0, 0)]), vec![2]),
            (4, 5, t(&[(-1, -2), (-1, -1), (-1, 1), (0, 2), (1, 2), (1, 3)]), vec![2, 1, 1, 2]),
        ];
        let (b, cin, cout) = (3, 4, 5);
        for (h, w, taps, runs) in cases {
            let u = Unfold { height: h, width: w, taps, mask: None };
            let p = Padded::new(&u).expect("unmasked");
            assert_eq!(p.run_lengths(), runs, "{u:?}");
            let k = u.taps.len() * cin;
            let (x, wt, dy) = (vals(b * h * w * cin, 1), vals(k * cout, 2), vals(b * h * w * cout, 3));
            let y = p.forward(&x, &wt, b, cin, cout, parallelism())?;
            close(&y, &direct(&u, &x, &wt, b, cin, cout), "y");
            let (dx, dw) = p.backward(&x, &wt, &dy, (b, cin, cout), true, true, parallelism())?;
            let (dx, dw) = (dx.expect("dx"), dw.expect("dw"));
            // The gradient along unit vector e_i is <conv(e_i), dy>: conv is linear in x and in W.
            let dot = |a: &[f64], g: &[f32]| a.iter().zip(g).map(|(a, g)| a * *g as f64).sum::<f64>();
            let along_units = |n: usize, conv: &dyn Fn(&[f32]) -> Vec<f64>| -> Vec<f64> {
                (0..n)
                    .map(|i| {
                        let mut e = vec![0f32; n];
                        e[i] = 1.0;
                        dot(&conv(&e), &dy)
                    })
                    .collect()
            };
            close(&dx, &along_units(x.len(), &|e| direct(&u, e, &wt, b, cin, cout)), "dx");
            let want_dw = along_units(wt.len(), &|e| direct(&u, &x, e, b, cin, cout));
            close(&dw, &want_dw, "dW");
        }
        Ok(())
    }

    /// An empty batch gives empty outputs and zero weight gradients, not a panic.
    #[test]
    fn empty_batch() -> Result<()> {
        let u = Unfold { height: 3, width: 4, taps: vec![(-1, 0), (0, -1)], mask: None };
        let p = Padded::new(&u).expect("unmasked");
        assert!(p.forward(&[], &vals(2 * 3 * 5, 1), 0, 3, 5, parallelism())?.is_empty());
        let (dx, dw) = p.backward(&[], &vals(2 * 3 * 5, 1), &[], (0, 3, 5), true, true, parallelism())?;
        assert_eq!((dx.map(|v| v.len()), dw), (Some(0), Some(vec![0f32; 30])));
        Ok(())
    }

    /// The cost rule: 28x28 with the gated PixelCNN's taps takes the padded route, 8x8 and 1D
    /// grids and masked tap lists do not.
    #[test]
    fn plan_takes_the_padded_route_only_where_padding_is_cheap() {
        let vertical: Vec<(isize, isize)> = (-1..=0).flat_map(|dy| (-1..=1).map(move |dx| (dy, dx))).collect();
        let grid = |h, w| Unfold { height: h, width: w, taps: vertical.clone(), mask: None };
        assert!(Padded::plan(&grid(28, 28)).is_some());
        assert!(Padded::plan(&grid(8, 8)).is_none());
        assert!(Padded::plan(&Unfold { height: 1, width: 784, taps: vec![(0, -1), (0, 0)], mask: None }).is_none());
        let masked = Unfold { mask: Some(vec![true; 784 * 6].into()), ..grid(28, 28) };
        assert!(Padded::plan(&masked).is_none());
    }
}
