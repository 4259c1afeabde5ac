//! Causal Conv1d (WaveNet, van den Oord et al. 2016, §2.1) on time-major activations, as
//! gemms over shifted views: no im2col, no col2im.
//!
//! Activations are stored (P + T, B, C): time-major, with P zero time steps in front. Row
//! r = t B + b holds position t of image b, so "the input k steps back" is the same matrix
//! offset by k B rows for every image, and a tap is a gemm on a view of the input:
//! y = b + sum_j X[shifted by s_j] W_j (the first tap writes, the others accumulate in place).
//! The padding steps make early positions read zeros. The backward is the same shape:
//! dX = sum_j dZ[shifted forward by s_j] W_j^T (dZ has zero steps behind it) and
//! dW_j = X[shifted by s_j]^T dZ. Per-tap products run at the rate of one (rows, k C_in) x
//! (k C_in, C_out) product, and no im2col copy (k times the input) or col2im is made
//! (PERF.md, "Time-major convolution").
//!
//! Layers with few channels take another route: a narrow input (the first layer, C_in = 1) is
//! unfolded into its k C_in columns (small) and multiplied once; a narrow output (the last
//! layer, C_out = P < C_in) multiplies first, Z = X W' with W' = [W_0 .. W_{k-1}] side by side,
//! and sums the shifted blocks of Z (k C_out wide).

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

use crate::gemm::{f32s, gemm_into, gemm_long_k, parallelism, taps_side_by_side, taps_stacked, with_f32, View};

/// How a layer's product is arranged (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// One gemm per tap on shifted views.
    Taps,
    /// Unfold the (narrow) input into k C_in columns, one gemm.
    Unfold,
    /// Multiply by W' first, then sum the shifted k C_out-wide blocks.
    OutSide,
}

/// One causal Conv1d layer on time-major activations: x (pad_in + T, B, C_in) with zero
/// padding steps -> y (pad_out + T, B, C_out), y = act(conv(x) + b), pad steps of y zero.
/// W is (k C_in, C_out) with tap-major rows (tap j, channel c at row j C_in + c) and tap j
/// reads position t - shifts[j]; `pad_in` must cover the largest shift.
#[derive(Clone)]
pub struct TimeConv {
    pub shifts: Vec<usize>,
    pub pad_in: usize,
    pub pad_out: usize,
    /// LeakyReLU slope in (0, 1], or none for a linear output.
    pub slope: Option<f32>,
    /// The unfolded columns of the forward pass ([`Route::Unfold`]), kept for dW.
    cols: Arc<Mutex<Option<Vec<f32>>>>,
}

/// Sizes of one call: T steps, B images, channels in and out.
#[derive(Debug, Clone, Copy)]
struct Dims {
    t: usize,
    b: usize,
    cin: usize,
    cout: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.t * self.b
    }
}

const ROWS_PER_TASK: usize = 64;

impl TimeConv {
    pub fn new(shifts: Vec<usize>, pad_in: usize, pad_out: usize, slope: Option<f64>) -> Self {
        Self { shifts, pad_in, pad_out, slope: slope.map(|s| s as f32), cols: Default::default() }
    }

    fn max_shift(&self) -> usize {
        self.shifts.iter().copied().max().unwrap_or(0)
    }

    fn route(&self, d: Dims) -> Route {
        if d.cout < d.cin {
            Route::OutSide
        } else if d.cin >= 64 {
            Route::Taps
        } else {
            Route::Unfold
        }
    }

    fn dims(&self, x: &Layout, w: &Layout) -> Result<Dims> {
        let (p, b, cin) = x.shape().dims3()?;
        let (wk, cout) = w.shape().dims2()?;
        if p < self.pad_in || self.pad_in < self.max_shift() {
            bail!("timeconv: input of {p} steps with {} padding, shifts up to {}", self.pad_in, self.max_shift());
        }
        if wk != self.shifts.len() * cin {
            bail!(
                "timeconv: weight has {wk} rows, {} taps of {cin} channels need {}",
                self.shifts.len(),
                self.shifts.len() * cin
            );
        }
        Ok(Dims { t: p - self.pad_in, b, cin, cout })
    }

    /// The k C_in columns of the input's T B positions (row r, tap j, channel c).
    fn unfold(&self, x: &[f32], d: Dims) -> Vec<f32> {
        let k = self.shifts.len();
        let mut cols = vec![0f32; d.rows() * k * d.cin];
        cols.par_chunks_mut(ROWS_PER_TASK * k * d.cin).enumerate().for_each(|(i, chunk)| {
            for (q, row) in chunk.chunks_mut(k * d.cin).enumerate() {
                let r = i * ROWS_PER_TASK + q;
                for (j, &s) in self.shifts.iter().enumerate() {
                    let src = (r + (self.pad_in - s) * d.b) * d.cin;
                    row[j * d.cin..(j + 1) * d.cin].copy_from_slice(&x[src..src + d.cin]);
                }
            }
        });
        cols
    }

    fn forward(&self, x: &[f32], w: &[f32], bias: &[f32], d: Dims) -> Result<Vec<f32>> {
        let _p = crate::profile::scope("timeconv fwd");
        let (m, k, par) = (d.rows(), self.shifts.len(), parallelism());
        let out_off = self.pad_out * d.b * d.cout;
        let mut y = vec![0f32; out_off + m * d.cout];
        match self.route(d) {
            Route::Taps => {
                for (j, &s) in self.shifts.iter().enumerate() {
                    let lhs = View::new(x, (self.pad_in - s) * d.b * d.cin, d.cin, 1);
                    let rhs = View::new(w, j * d.cin * d.cout, d.cout, 1);
                    gemm_into(&mut y, out_off, d.cout, (m, d.cout, d.cin), lhs, rhs, j > 0, par)?;
                }
            }
            Route::Unfold => {
                let cols = self.unfold(x, d);
                let (lhs, rhs) = (View::new(&cols, 0, k * d.cin, 1), View::new(w, 0, d.cout, 1));
                gemm_into(&mut y, out_off, d.cout, (m, d.cout, k * d.cin), lhs, rhs, false, par)?;
                if let Ok(mut slot) = self.cols.lock() {
                    *slot = Some(cols);
                }
            }
            Route::OutSide => {
                let ws = taps_side_by_side(w, k, d.cin, d.cout);
                let mut z = vec![0f32; m * k * d.cout];
                let lhs = View::new(x, self.pad_in * d.b * d.cin, d.cin, 1);
                gemm_into(
                    &mut z,
                    0,
                    k * d.cout,
                    (m, k * d.cout, d.cin),
                    lhs,
                    View::new(&ws, 0, k * d.cout, 1),
                    false,
                    par,
                )?;
                // y[r] = sum_j Z[r - s_j B, block j].
                y[out_off..].par_chunks_mut(ROWS_PER_TASK * d.cout).enumerate().for_each(|(i, chunk)| {
                    for (q, row) in chunk.chunks_mut(d.cout).enumerate() {
                        let r = i * ROWS_PER_TASK + q;
                        for (j, &s) in self.shifts.iter().enumerate() {
                            if let Some(src) = r.checked_sub(s * d.b) {
                                let from = &z[src * k * d.cout + j * d.cout..src * k * d.cout + (j + 1) * d.cout];
                                crate::simd::add_assign(row, from);
                            }
                        }
                    }
                });
            }
        }
        crate::dense::bias_act(&mut y[out_off..], bias, self.slope);
        Ok(y)
    }

    /// dZ (through the activation, whose sign is the output's for a positive slope) with
    /// `tail` zero steps after it, and db = its column sums (fixed row blocks, block order).
    fn dz_and_db(&self, dy: &[f32], y: &[f32], d: Dims, tail: usize) -> (Vec<f32>, Vec<f32>) {
        let off = self.pad_out * d.b * d.cout;
        let (m, n) = (d.rows(), d.cout);
        let mut dz = vec![0f32; (m + tail * d.b) * n];
        let slope = self.slope;
        let partials: Vec<Vec<f32>> = dz[..m * n]
            .par_chunks_mut(ROWS_PER_TASK * 4 * n)
            .enumerate()
            .map(|(i, chunk)| {
                let base = off + i * ROWS_PER_TASK * 4 * n;
                let mut acc = vec![0f32; n];
                for (q, row) in chunk.chunks_mut(n).enumerate() {
                    let at = base + q * n;
                    let (g, yy) = (&dy[at..at + n], &y[at..at + n]);
                    match slope {
                        Some(s) => crate::simd::leaky_grad(row, g, yy, s),
                        None => row.copy_from_slice(g),
                    }
                    crate::simd::add_assign(&mut acc, row);
                }
                acc
            })
            .collect();
        let mut db = vec![0f32; n];
        for p in &partials {
            for (a, v) in db.iter_mut().zip(p) {
                *a += v;
            }
        }
        (dz, db)
    }

    /// (dx, dW, db) for x, W, the output y and its gradient dy.
    fn backward(&self, x: &[f32], w: &[f32], y: &[f32], dy: &[f32], d: Dims, need_dx: bool) -> Result<Grads> {
        let _p = crate::profile::scope("timeconv bwd");
        let (m, k, par) = (d.rows(), self.shifts.len(), parallelism());
        let x_off = self.pad_in * d.b * d.cin;
        let mut dw = vec![0f32; k * d.cin * d.cout];
        let mut dx = if need_dx { Some(vec![0f32; x_off + m * d.cin]) } else { None };
        let route = self.route(d);
        let tail = if route == Route::Taps { self.max_shift() } else { 0 };
        let p = crate::profile::scope("timeconv bwd dz");
        let (dz, db) = self.dz_and_db(dy, y, d, tail);
        drop(p);
        let _r = crate::profile::scope(match route {
            Route::Taps => "timeconv bwd taps",
            Route::Unfold => "timeconv bwd unfold",
            Route::OutSide => "timeconv bwd outside",
        });
        match route {
            Route::Taps => {
                let p = crate::profile::scope("timeconv bwd taps dW");
                // dW_j = X_j^T dZ, X_j = the input shifted by s_j.
                let prods: Vec<_> = (self.shifts.iter().enumerate())
                    .map(|(j, &s)| {
                        let xt = View::new(x, (self.pad_in - s) * d.b * d.cin, 1, d.cin);
                        (j * d.cin * d.cout, xt, View::new(&dz, 0, d.cout, 1))
                    })
                    .collect();
                gemm_long_k(&mut dw, (d.cin, d.cout, m), &prods)?;
                drop(p);
                for (j, &s) in self.shifts.iter().enumerate() {
                    if let Some(dx) = dx.as_mut() {
                        // dX += dZ (shifted forward by s_j) W_j^T.
                        let lhs = View::new(&dz, s * d.b * d.cout, d.cout, 1);
                        let wt = View::new(w, j * d.cin * d.cout, 1, d.cout);
                        gemm_into(dx, x_off, d.cin, (m, d.cin, d.cout), lhs, wt, j > 0, par)?;
                    }
                }
            }
            Route::Unfold => {
                let kept = self.cols.lock().ok().and_then(|mut s| s.take());
                let cols = kept.unwrap_or_else(|| self.unfold(x, d));
                let kc = k * d.cin;
                gemm_long_k(
                    &mut dw,
                    (kc, d.cout, m),
                    &[(0, View::new(&cols, 0, 1, kc), View::new(&dz, 0, d.cout, 1))],
                )?;
                if let Some(dx) = dx.as_mut() {
                    let mut dcols = vec![0f32; m * kc];
                    gemm_into(
                        &mut dcols,
                        0,
                        kc,
                        (m, kc, d.cout),
                        View::new(&dz, 0, d.cout, 1),
                        View::new(w, 0, 1, d.cout),
                        false,
                        par,
                    )?;
                    // The adjoint of the unfold, serial over taps so writes never overlap.
                    for (j, &s) in self.shifts.iter().enumerate() {
                        let base = (self.pad_in - s) * d.b * d.cin;
                        dx[base..base + m * d.cin]
                            .par_chunks_mut(d.cin)
                            .zip(dcols.par_chunks(kc))
                            .for_each(|(o, row)| crate::simd::add_assign(o, &row[j * d.cin..(j + 1) * d.cin]));
                    }
                    dx[..x_off].fill(0.0);
                }
            }
            Route::OutSide => {
                // dZ' [r, block j] = dZ [r + s_j B] (zero past the end): the gradient of Z.
                let kn = k * d.cout;
                let mut dzs = vec![0f32; m * kn];
                dzs.par_chunks_mut(ROWS_PER_TASK * kn).enumerate().for_each(|(i, chunk)| {
                    for (q, row) in chunk.chunks_mut(kn).enumerate() {
                        let r = i * ROWS_PER_TASK + q;
                        for (j, &s) in self.shifts.iter().enumerate() {
                            let src = r + s * d.b;
                            if src < m {
                                row[j * d.cout..(j + 1) * d.cout]
                                    .copy_from_slice(&dz[src * d.cout..(src + 1) * d.cout]);
                            }
                        }
                    }
                });
                let xs = View::new(x, x_off, d.cin, 1);
                let mut dws = vec![0f32; d.cin * kn];
                gemm_long_k(
                    &mut dws,
                    (d.cin, kn, m),
                    &[(0, View { rs: 1, cs: d.cin, ..xs }, View::new(&dzs, 0, kn, 1))],
                )?;
                dw = taps_stacked(&dws, k, d.cin, d.cout);
                if let Some(dx) = dx.as_mut() {
                    let ws = taps_side_by_side(w, k, d.cin, d.cout);
                    gemm_into(
                        dx,
                        x_off,
                        d.cin,
                        (m, d.cin, kn),
                        View::new(&dzs, 0, kn, 1),
                        View::new(&ws, 0, 1, kn),
                        false,
                        par,
                    )?;
                }
            }
        }
        Ok(Grads { dx, dw, db })
    }
}

struct Grads {
    dx: Option<Vec<f32>>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

impl CustomOp3 for TimeConv {
    fn name(&self) -> &'static str {
        "timeconv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1, l2)?;
        let bias = f32s(s3, l3, "bias")?;
        if bias.len() != d.cout {
            bail!("timeconv: bias of {} for {} outputs", bias.len(), d.cout);
        }
        let y = self.forward(f32s(s1, l1, "input")?, f32s(s2, l2, "weight")?, bias, d)?;
        Ok((CpuStorage::F32(y), Shape::from((self.pad_out + d.t, d.b, d.cout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        let d = self.dims(x.layout(), w.layout())?;
        let g = with_f32(&x, "input", |xs| {
            with_f32(&w, "weight", |ws| {
                with_f32(res, "output", |ys| {
                    with_f32(dy, "gradient", |gs| self.backward(xs, ws, ys, gs, d, x.track_op()))
                })
            })
        })?;
        let dev = x.device();
        let dx = g.dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        let dw = if w.track_op() { Some(Tensor::from_vec(g.dw, w.shape(), dev)?) } else { None };
        let db = if b.track_op() { Some(Tensor::from_vec(g.db, b.shape(), dev)?) } else { None };
        Ok((dx, dw, db))
    }
}

/// Applies `op` to x (pad_in + T, B, C_in), W and b on the CPU (f32).
pub fn time_conv(op: &TimeConv, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = TimeConv { cols: Default::default(), ..op.clone() }; // this call's own column store
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}
