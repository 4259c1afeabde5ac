//! Safe wrappers over the `gemm` crate for the fused ops: products of strided views of slices
//! (bounds checked before the unsafe call), accumulation in place, and products with a long
//! inner dimension split across threads.

use candle_core::{bail, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::Result;

/// A matrix view of a slice: element (i, j) at `off + i rs + j cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) off: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> View<'a> {
    pub(crate) fn new(data: &'a [f32], off: usize, rs: usize, cs: usize) -> Self {
        Self { data, off, rs, cs }
    }

    /// Whether every element of a (rows x cols) matrix lies inside the slice.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || self.off + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

pub(crate) fn parallelism() -> Parallelism {
    if crate::threads::single() {
        return Parallelism::None;
    }
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// dst (m x n, at `dst_off` with row stride `dst_rs`, unit column stride) = lhs (m x k) rhs
/// (k x n), or += when `accumulate`. Bounds are checked here, so callers stay safe code.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_off: usize,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    lhs: View,
    rhs: View,
    accumulate: bool,
    par: Parallelism,
) -> Result<()> {
    let out = View::new(dst, dst_off, dst_rs, 1);
    if !(out.fits(m, n) && lhs.fits(m, k) && rhs.fits(k, n)) {
        bail!("gemm view out of bounds ({m}x{k} by {k}x{n})");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[dst_off + r * dst_rs..dst_off + r * dst_rs + n].fill(0.0);
            }
        }
        return Ok(());
    }
    #[allow(unsafe_code)]
    // SAFETY: the three views were checked above to lie inside their slices for these m, n, k;
    // `dst` is borrowed mutably, so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_off),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.off),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.off),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Several products with a long k: dst[off_i .. off_i + m n] (row-major m x n) = lhs_i rhs_i,
/// each lhs_i (m x k), rhs_i (k x n). The k range is cut into fixed blocks (a few per thread,
/// at least 256 long); each block runs all the products single-threaded into its own buffer,
/// and the buffers are summed in block order, so the result does not depend on which thread
/// ran which block (deterministic for a given thread count). For weight gradients (small
/// outputs, long sums) this beats the gemm's own threading, which splits the small output.
/// Two blocks per thread rather than one: a worker that wakes up late still takes its share
/// (PERF.md, "Weight gradients").
pub(crate) fn gemm_long_k(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    prods: &[(usize, View, View)],
) -> Result<()> {
    let parts = (2 * candle_core::utils::get_num_threads()).clamp(1, k.max(1).div_ceil(256));
    if parts <= 1 {
        for &(off, lhs, rhs) in prods {
            gemm_into(dst, off, n, (m, n, k), lhs, rhs, false, parallelism())?;
        }
        return Ok(());
    }
    let per = k.div_ceil(parts);
    let len = dst.len();
    let p = crate::profile::scope("weight grad k-blocks");
    let partials = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (k0, k1) = (p * per, ((p + 1) * per).min(k));
            let mut out = vec![0f32; len];
            for &(off, lhs, rhs) in prods {
                let l = View { off: lhs.off + k0 * lhs.cs, ..lhs };
                let r = View { off: rhs.off + k0 * rhs.rs, ..rhs };
                gemm_into(&mut out, off, n, (m, n, k1.saturating_sub(k0)), l, r, false, Parallelism::None)?;
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?;
    drop(p);
    let _p = crate::profile::scope("weight grad sum");
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(i, d)| {
        let at = i * CHUNK;
        d.copy_from_slice(&partials[0][at..at + d.len()]);
        for p in &partials[1..] {
            crate::simd::add_assign(d, &p[at..at + d.len()]);
        }
    });
    Ok(())
}

/// dW (k x n, row-major) = cols^T dy for cols (rows x k) and dy (rows x n, contiguous): computed
/// as dW^T = dy^T cols (both operands row-major, the gemm's fast case) with
/// the long sums split by [`gemm_long_k`], then transposed into W's layout.
pub(crate) fn weight_grad(dy: &[f32], n: usize, cols: View, k: usize, rows: usize) -> Result<Vec<f32>> {
    weight_grad_sums(dy, n, cols, k, rows, true)
}

/// [`weight_grad`], with the long sums split into blocks (`split`) or in one product on this
/// thread: for callers whose own parts are fixed (`gated_stack`), whose sums then do not
/// depend on the thread count either. Unsplit, dW = cols^T dy is one product straight into
/// W's layout: for the gated stack's small products the transpose and its buffer cost more
/// than the operands' layout saves (PERF.md, "On an AVX-512 host").
pub(crate) fn weight_grad_sums(dy: &[f32], n: usize, cols: View, k: usize, rows: usize, split: bool) -> Result<Vec<f32>> {
    let _p = crate::profile::scope("weight grad");
    if !split {
        let mut dw = vec![0f32; k * n];
        let cols_t = View::new(cols.data, cols.off, cols.cs, cols.rs);
        gemm_into(&mut dw, 0, n, (k, n, rows), cols_t, View::new(dy, 0, n, 1), false, Parallelism::None)?;
        return Ok(dw);
    }
    let mut dwt = vec![0f32; n * k];
    gemm_long_k(&mut dwt, (n, k, rows), &[(0, View::new(dy, 0, 1, n), cols)])?;
    let mut dw = vec![0f32; k * n];
    dw.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        for (o, v) in row.iter_mut().enumerate() {
            *v = dwt[o * k + i];
        }
    });
    Ok(dw)
}

/// W' (C_in, taps C_out) from W (taps C_in, C_out) with tap-major rows: W'[c, t C_out + o] =
/// W[t C_in + c, o], the taps' weights side by side for multiplying before shifting.
pub(crate) fn taps_side_by_side(w: &[f32], taps: usize, cin: usize, cout: usize) -> Vec<f32> {
    swap_row_blocks(w, taps, cin, cout)
}

/// The inverse of [`taps_side_by_side`]: W (taps C_in, C_out) from W' (C_in, taps C_out).
pub(crate) fn taps_stacked(ws: &[f32], taps: usize, cin: usize, cout: usize) -> Vec<f32> {
    swap_row_blocks(ws, cin, taps, cout)
}

/// Rows of `len` values indexed (i, j) in an (a x b) grid, reordered to (j, i).
fn swap_row_blocks(src: &[f32], a: usize, b: usize, len: usize) -> Vec<f32> {
    let mut dst = vec![0f32; a * b * len];
    for i in 0..a {
        for j in 0..b {
            let from = &src[(i * b + j) * len..(i * b + j + 1) * len];
            dst[(j * a + i) * len..(j * a + i + 1) * len].copy_from_slice(from);
        }
    }
    dst
}

pub(crate) use crate::cpu_f32 as f32s;

/// Runs `f` on the f32 data of a contiguous CPU tensor.
pub(crate) fn with_f32<T>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    with_slices(&[t], what, |s| f(s[0]))
}

/// The f32 data of several CPU tensors at once, without copying contiguous ones.
pub(crate) fn with_slices<R>(ts: &[&Tensor], what: &str, f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let ts = ts.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(c) => f32s(c, l, what),
            _ => bail!("{what} must be on the CPU"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&slices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + 7 * seed) * 7919 % 613) as f32 - 306.0) / 300.0).collect()
    }

    /// (m x n) = lhs (m x k) rhs (k x n) by the triple loop, in f64.
    fn naive(m: usize, n: usize, k: usize, lhs: View, rhs: View) -> Vec<f64> {
        let at = |v: &View, i: usize, j: usize| v.data[v.off + i * v.rs + j * v.cs] as f64;
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|q| at(&lhs, i, q) * at(&rhs, q, j)).sum();
            }
        }
        out
    }

    /// Strided, offset and transposed views, accumulation, and the k split of the long
    /// products (with a k that does not divide evenly) against the triple loop.
    #[test]
    fn products_of_views_equal_the_triple_loop() -> Result<()> {
        let (m, n, k) = (37, 29, 1031);
        let a = vals(20 + m * k, 1);
        let b = vals(5 + k * n, 2);
        let lhs_t = View::new(&a, 20, 1, m); // (m x k) read from a column-major block
        let rhs = View::new(&b, 5, n, 1);
        let want = naive(m, n, k, lhs_t, rhs);
        let close = |got: &[f32], want: &[f64]| {
            got.iter().zip(want).all(|(g, w)| (*g as f64 - w).abs() < 1e-3 * (1.0 + w.abs()))
        };
        let mut long = vec![0f32; m * n];
        gemm_long_k(&mut long, (m, n, k), &[(0, lhs_t, rhs)])?;
        assert!(close(&long, &want), "gemm_long_k");
        // Into an offset destination with a wider row stride, then accumulated a second time.
        let mut dst = vec![0f32; 3 + m * (n + 4)];
        gemm_into(&mut dst, 3, n + 4, (m, n, k), lhs_t, rhs, false, parallelism())?;
        gemm_into(&mut dst, 3, n + 4, (m, n, k), lhs_t, rhs, true, parallelism())?;
        let rows: Vec<f32> = (0..m).flat_map(|i| dst[3 + i * (n + 4)..3 + i * (n + 4) + n].to_vec()).collect();
        let twice: Vec<f64> = want.iter().map(|w| 2.0 * w).collect();
        assert!(close(&rows, &twice), "gemm_into");
        // dW = cols^T dy (k x n, W's layout) for overlapping rows of cols, both routes.
        let (cells, kw, nw) = (301, 12, 7);
        let cols = View::new(&a, 3, 4, 1); // rows overlap: stride 4 < kw
        let dy = vals(cells * nw, 3);
        let want_dw = naive(kw, nw, cells, View::new(&a, 3, 1, 4), View::new(&dy, 0, nw, 1));
        for split in [true, false] {
            let dw = weight_grad_sums(&dy, nw, cols, kw, cells, split)?;
            assert!(close(&dw, &want_dw), "weight_grad_sums, split {split}");
        }
        // A view reaching past the slice is an error, not a read out of bounds.
        let short = View::new(&b, 6, n, 1);
        assert!(gemm_into(&mut long, 0, n, (m, n, k), lhs_t, short, false, Parallelism::None).is_err());
        Ok(())
    }
}
