//! The one op behind every linear layer and convolution of the plugins:
//! y = act(unfold(x) W + b), with `unfold` (im2col over a tap list, see [`crate::unfold`])
//! optional and `act` an optional LeakyReLU, as a single candle custom op on CPU.
//!
//! Why one op: candle's backward zero-fills and adds every gradient it stores, once per graph
//! node, and its bias gradient is a strided reduction. Composed from unfold, reshape, matmul,
//! broadcast_add and LeakyReLU, a convolution leaves five or more nodes, two of them holding the
//! (rows, taps * C_in) column gradient, the largest tensor of the layer. Here the backward
//! computes dW = (dy^T cols)^T, dx = fold(dy W^T) and db = column sums of dy itself, and only
//! the gradients of x, W and b reach the store. Elsewhere (other devices, dtypes) the same
//! function composes candle ops.

use candle_core::backend::BackendStorage;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, Var, D};
use rayon::prelude::*;

use crate::Result;

use crate::gemm::{f32s, gemm_into, parallelism, taps_side_by_side, weight_grad, with_f32, View};
use crate::implicit::Padded;
use crate::unfold::{Fold, Unfold};

/// y = act(unfold(x) W + b). x: (B, N, C_in) with an unfold, else (..., C_in); W: (taps * C_in,
/// C_out) or (C_in, C_out); b: (C_out,). y: x's shape with the last dimension C_out.
/// `leaky`: LeakyReLU slope in [0, 1], 0 being ReLU (its backward reads the output's sign:
/// positive exactly where the pre-activation is).
pub fn dense(x: &Tensor, w: &Tensor, b: &Tensor, unfold: Option<&Unfold>, leaky: Option<f64>) -> Result<Tensor> {
    let cout = w.dim(1)?;
    let fused = x.device().is_cpu()
        && [x.dtype(), w.dtype(), b.dtype()].iter().all(|&d| d == DType::F32)
        && leaky.is_none_or(|s| (0.0..=1.0).contains(&s));
    if fused {
        let op = Dense::new(unfold, x.dim(D::Minus1)?, cout, leaky);
        return x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op);
    }
    let cols = match unfold {
        Some(u) => u.apply_generic(x)?,
        None => x.clone(),
    };
    let kc = cols.dim(cols.rank() - 1)?;
    let y = cols.reshape((cols.elem_count() / kc.max(1), kc))?.matmul(w)?.broadcast_add(b)?;
    let y = match leaky {
        Some(s) => crate::leaky_relu(&y, s)?,
        None => y,
    };
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = cout;
    }
    y.reshape(out_dims)
}

#[derive(Clone)]
struct Dense {
    unfold: Option<Unfold>,
    /// With an unfold: y = fold'(x W') instead of unfold(x) W, where W' (C_in, taps*C_out)
    /// holds the same weights tap by tap and fold' sums tap t's block of the row the tap
    /// reads (the fold of the reversed taps). Same FLOPs; the (rows, taps*C) intermediate has
    /// C = C_out instead of C_in, and the matmul has a wider output, which the gemm runs
    /// closer to its peak (PERF.md, "Narrow outputs").
    out_side: bool,
    /// With an unmasked unfold on a large enough grid: no im2col, products on the padded grid
    /// ([`Padded`], PERF.md "Padded grids").
    padded: Option<Arc<Padded>>,
    slope: Option<f32>,
    /// GELU instead of the LeakyReLU ([`dense_gelu`]).
    gelu: Option<Arc<GeluSlopes>>,
}

/// gelu'(u) at the pre-activations of a [`dense_gelu`], kept by the forward for the backward
/// when a gradient will be asked for (the derivative needs the input, not the output; keeping
/// it saves the backward a tanh per element).
#[derive(Debug, Default)]
struct GeluSlopes {
    keep: bool,
    slopes: Mutex<Vec<f32>>,
}

const CHUNK: usize = 1 << 14;

impl Dense {
    /// The op for an input with `cin` channels. Fewer output than input channels with an
    /// unfold: multiply first, shift the k narrower results.
    fn new(unfold: Option<&Unfold>, cin: usize, cout: usize, leaky: Option<f64>) -> Self {
        // A cell mask belongs to the reading cell, so the reversed fold cannot carry it.
        let out_side = unfold.is_some_and(|u| u.mask.is_none()) && cout < cin;
        let padded = if out_side { None } else { unfold.and_then(Padded::plan).map(Arc::new) };
        Dense { unfold: unfold.cloned(), out_side, padded, slope: leaky.map(|s| s as f32), gelu: None }
    }

    /// (rows, C_in of the matmul) for an input of shape `dims`.
    fn rows_k(&self, dims: &[usize]) -> (usize, usize) {
        let cin = *dims.last().unwrap_or(&0);
        let rows = dims.iter().product::<usize>() / cin.max(1);
        (rows, cin * self.unfold.as_ref().map_or(1, |u| u.taps.len()))
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "dense"
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
        let dims = l1.shape().dims();
        let (rows, k) = self.rows_k(dims);
        let (wk, cout) = l2.shape().dims2()?;
        if wk != k {
            bail!("dense: weight has {wk} rows, the input gives {k}");
        }
        if l3.shape().dims1()? != cout {
            bail!("dense: bias of {} for {cout} outputs", l3.shape().dims1()?);
        }
        let _p = crate::profile::scope("dense fwd");
        let x = f32s(s1, l1, "dense: input")?;
        let bias = f32s(s3, l3, "dense: bias")?;
        let mm = |lhs: &CpuStorage, ll: &Layout| lhs.matmul(s2, (1, rows, cout, k), ll, l2);
        let y = match (&self.unfold, &self.padded) {
            (Some(_), Some(p)) => {
                let (b, _, cin) = l1.shape().dims3()?;
                CpuStorage::F32(p.forward(x, f32s(s2, l2, "dense: weight")?, b, cin, cout, parallelism())?)
            }
            (Some(u), None) if self.out_side => {
                let (b, n, cin) = l1.shape().dims3()?;
                let taps = u.taps.len();
                let wcat = taps_side_by_side(f32s(s2, l2, "dense: weight")?, taps, cin, cout);
                let lx = Layout::contiguous_with_offset((rows, cin), l1.start_offset());
                let z = s1.matmul(
                    &CpuStorage::F32(wcat),
                    (1, rows, taps * cout, cin),
                    &lx,
                    &Layout::contiguous((cin, taps * cout)),
                )?;
                let CpuStorage::F32(z) = z else { bail!("dense: matmul returned another dtype") };
                CpuStorage::F32(u.reversed().fold_cpu(&z, b, n, cout))
            }
            (Some(u), None) => {
                let (b, n, c) = l1.shape().dims3()?;
                let cols = CpuStorage::F32(u.unfold_cpu(x, b, n, c));
                mm(&cols, &Layout::contiguous((rows, k)))?
            }
            (None, _) => mm(s1, &Layout::contiguous_with_offset((rows, k), l1.start_offset()))?,
        };
        let CpuStorage::F32(mut y) = y else { bail!("dense: matmul returned another dtype") };
        bias_act(&mut y, bias, self.slope);
        if let Some(g) = &self.gelu {
            let _p = crate::profile::scope("dense fwd gelu");
            if g.keep {
                let (values, slopes) = crate::gelu::values_and_slopes(&y);
                y = values;
                *g.slopes.lock().map_err(|_| candle_core::Error::Msg("dense: poisoned GELU cache".into()))? = slopes;
            } else {
                y = crate::gelu::values(&y);
            }
        }
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = cout;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("dense bwd");
        let (rows, k) = self.rows_k(x.dims());
        let cout = w.dim(1)?;
        let dy = dy.contiguous()?.reshape((rows, cout))?;
        // Through the activation: its sign is the output's (slope > 0).
        let dz = match (self.slope, &self.gelu) {
            (Some(s), _) => dy.apply_op2_no_bwd(&res.contiguous()?.reshape((rows, cout))?, &LeakyGrad(s))?,
            (None, Some(g)) => {
                let slopes = g.slopes.lock().map_err(|_| candle_core::Error::Msg("dense: poisoned GELU cache".into()))?;
                if slopes.len() != rows * cout {
                    bail!("dense: the GELU's slopes were not kept for the backward");
                }
                let dz = with_f32(&dy, "gradient", |gv| Ok(gv.iter().zip(slopes.iter()).map(|(g, k)| g * k).collect()))?;
                Tensor::from_vec(dz, (rows, cout), dy.device())?
            }
            (None, None) => dy,
        };
        let db = if b.track_op() { Some(dz.apply_op1_no_bwd(&ColumnSum)?) } else { None };
        if let Some(p) = &self.padded {
            let (bsz, _, cin) = x.dims3()?;
            let (dx, dw) = with_f32(x, "input", |xv| {
                with_f32(w, "weight", |wv| {
                    with_f32(&dz, "gradient", |g| {
                        p.backward(xv, wv, g, (bsz, cin, cout), x.track_op(), w.track_op(), parallelism())
                    })
                })
            })?;
            let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), x.device())).transpose()?;
            let dw = dw.map(|v| Tensor::from_vec(v, w.shape(), w.device())).transpose()?;
            return Ok((dx, dw, db));
        }
        if let (Some(u), true) = (&self.unfold, self.out_side) {
            let (bsz, n, cin) = x.dims3()?;
            let taps = u.taps.len();
            // dZ: the gradient of x W', tap t's block of row q being dy at the row reading q.
            let dzz = dz.reshape((bsz, n, cout))?.apply_op1(u.reversed())?.reshape((rows, taps * cout))?;
            let dw = if w.track_op() {
                // (dZ^T x) is (taps*C_out, C_in) = W'^T; back to W's (taps*C_in, C_out) layout.
                let wt = dzz.t()?.matmul(&x.reshape((rows, cin))?)?;
                Some(wt.reshape((taps, cout, cin))?.transpose(1, 2)?.reshape((taps * cin, cout))?)
            } else {
                None
            };
            let dx = if x.track_op() {
                let wcat = w.reshape((taps, cin, cout))?.transpose(0, 1)?.reshape((cin, taps * cout))?;
                Some(dzz.matmul(&wcat.t()?)?.reshape(x.shape())?)
            } else {
                None
            };
            return Ok((dx, dw, db));
        }
        let dw = if w.track_op() {
            let _p = crate::profile::scope("dense bwd dW");
            let p = crate::profile::scope("dense bwd dW cols");
            // The columns are unfolded again rather than kept from the forward pass: they are
            // taps x larger than x, and rebuilding them from x beats reading them back from
            // memory (PERF.md, "Unfold again").
            let cols = match &self.unfold {
                Some(u) => x.contiguous()?.apply_op1_no_bwd(u)?.reshape((rows, k))?,
                None => x.reshape((rows, k))?,
            };
            drop(p);
            let dz = dz.contiguous()?;
            let dw = with_f32(&cols, "columns", |c| {
                with_f32(&dz, "gradient", |z| weight_grad(z, cout, View::new(c, 0, k, 1), k, rows))
            })?;
            Some(Tensor::from_vec(dw, (k, cout), x.device())?)
        } else {
            None
        };
        let dx = if x.track_op() {
            let _p = crate::profile::scope("dense bwd dx");
            let p = crate::profile::scope("dense bwd dx gemm");
            let dcols = dz.matmul(&w.t()?)?; // (rows, k)
            drop(p);
            Some(match &self.unfold {
                Some(u) => {
                    let (bsz, n, _) = x.dims3()?;
                    dcols.reshape((bsz, n, k))?.apply_op1(Fold(u.clone()))?
                }
                None => dcols.reshape(x.shape())?,
            })
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// GELU(x W + b) over the last dimension as one op (the Transformer's MLP): no separate
/// GELU node, whose backward made candle zero-fill and add a gradient of the widest tensor of
/// the block. x: (..., C_in), W: (C_in, C_out), b: (C_out,). CPU and f32; elsewhere composed.
pub fn dense_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fused = x.device().is_cpu() && [x.dtype(), w.dtype(), b.dtype()].iter().all(|&d| d == DType::F32);
    if !fused {
        return crate::gelu(&dense(x, w, b, None, None)?);
    }
    let keep = [x, w, b].iter().any(|t| t.track_op());
    let mut op = Dense::new(None, x.dim(D::Minus1)?, w.dim(1)?, None);
    op.gelu = Some(Arc::new(GeluSlopes { keep, slopes: Mutex::new(Vec::new()) }));
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// y = unfold(x1) W1 + x2 W2 + b1 + b2 as one op (the gated PixelCNN's horizontal convolution
/// plus the 1x1 map of the vertical pre-activations), with the weights as one tensor
/// [W1; b1 + b2; W2]: y starts as the bias rows and both products accumulate into it. One op
/// instead of two and a sum: the sum's backward alone made candle zero-fill and add two
/// gradients of the output's size. x1: (B, N, C1), x2: (B, N, C2), W1: (taps C1, C_out),
/// W2: (C2, C_out). CPU and f32; elsewhere the composed ops.
pub fn dense_pair(
    x1: &Tensor,
    u: &Unfold,
    w1: &Tensor,
    b1: &Tensor,
    x2: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> Result<Tensor> {
    let f32s = [x1, w1, b1, x2, w2, b2].iter().all(|t| t.dtype() == DType::F32);
    if !(x1.device().is_cpu() && f32s) {
        return dense(x1, w1, b1, Some(u), None)? + dense(x2, w2, b2, None, None)?;
    }
    let w = Tensor::cat(&[w1, &(b1 + b2)?.unsqueeze(0)?, w2], 0)?;
    x1.contiguous()?.apply_op3(&x2.contiguous()?, &w.contiguous()?, Pair(u.clone(), Padded::plan(u).map(Arc::new)))
}

/// The op of [`dense_pair`]: (x1, x2, [W1; b; W2]).
#[derive(Clone)]
struct Pair(Unfold, Option<Arc<Padded>>);

/// Sizes of a [`Pair`] call: images, cells, channels of x1 and x2, outputs.
#[derive(Clone, Copy)]
struct PairDims {
    b: usize,
    n: usize,
    c1: usize,
    c2: usize,
    cout: usize,
}

impl Pair {
    fn dims(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<PairDims> {
        let (b, n, c1) = l1.shape().dims3()?;
        let (b2, n2, c2) = l2.shape().dims3()?;
        let (kk, cout) = l3.shape().dims2()?;
        if (b2, n2) != (b, n) || kk != self.0.taps.len() * c1 + 1 + c2 {
            bail!("dense_pair: inputs {:?} and {:?} with weights {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        Ok(PairDims { b, n, c1, c2, cout })
    }

    fn forward(&self, x1: &[f32], x2: &[f32], w: &[f32], d: PairDims) -> Result<Vec<f32>> {
        let _p = crate::profile::scope("pair fwd");
        let (rows, k1, par) = (d.b * d.n, self.0.taps.len() * d.c1, parallelism());
        // The output starts as the bias rows: a bias row in the weights and a column of ones
        // would make the product's k odd (257 for 128 channels), which the gemm runs slower.
        let bias = &w[k1 * d.cout..(k1 + 1) * d.cout];
        let w2 = View::new(w, (k1 + 1) * d.cout, d.cout, 1);
        let mut y = match &self.1 {
            Some(p) => {
                let mut y = p.forward(x1, &w[..k1 * d.cout], d.b, d.c1, d.cout, par)?;
                bias_act(&mut y, bias, None);
                y
            }
            None => {
                let cols = self.0.unfold_cpu(x1, d.b, d.n, d.c1);
                let mut y = vec![0f32; rows * d.cout];
                y.par_chunks_mut(d.cout.max(1)).for_each(|row| row.copy_from_slice(bias));
                let w1 = View::new(w, 0, d.cout, 1);
                gemm_into(&mut y, 0, d.cout, (rows, d.cout, k1), View::new(&cols, 0, k1, 1), w1, true, par)?;
                y
            }
        };
        gemm_into(&mut y, 0, d.cout, (rows, d.cout, d.c2), View::new(x2, 0, d.c2, 1), w2, true, par)?;
        Ok(y)
    }

    /// (dx1, dx2, dW) from dy.
    fn backward(
        &self,
        x1: &[f32],
        x2: &[f32],
        w: &[f32],
        g: &[f32],
        d: PairDims,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let _p = crate::profile::scope("pair bwd");
        let (rows, k1, par) = (d.b * d.n, self.0.taps.len() * d.c1, parallelism());
        if let Some(p) = &self.1 {
            let (dx1, dw1) = p.backward(x1, &w[..k1 * d.cout], g, (d.b, d.c1, d.cout), true, true, par)?;
            let mut dw = dw1.ok_or_else(|| candle_core::Error::Msg("dense_pair: no weight gradient".into()))?;
            dw.extend(column_sums(g, d.cout));
            dw.extend(weight_grad(g, d.cout, View::new(x2, 0, d.c2, 1), d.c2, rows)?);
            let mut dx2 = vec![0f32; rows * d.c2];
            let w2t = View::new(w, (k1 + 1) * d.cout, 1, d.cout);
            gemm_into(&mut dx2, 0, d.c2, (rows, d.c2, d.cout), View::new(g, 0, d.cout, 1), w2t, false, par)?;
            let dx1 = dx1.ok_or_else(|| candle_core::Error::Msg("dense_pair: no input gradient".into()))?;
            return Ok((dx1, dx2, dw));
        }
        // dW = [cols; 1; x2]^T dy: two products and the bias's column sums.
        let p = crate::profile::scope("pair bwd dW");
        let cols = self.0.unfold_cpu(x1, d.b, d.n, d.c1); // again: cheaper than keeping them, as in `dense`
        let mut dw = weight_grad(g, d.cout, View::new(&cols, 0, k1, 1), k1, rows)?;
        dw.extend(column_sums(g, d.cout));
        dw.extend(weight_grad(g, d.cout, View::new(x2, 0, d.c2, 1), d.c2, rows)?);
        drop(p);
        let _p = crate::profile::scope("pair bwd dx");
        // dx1 = fold(dy W1^T), dx2 = dy W2^T.
        let dy = View::new(g, 0, d.cout, 1);
        let mut dcols = vec![0f32; rows * k1];
        gemm_into(&mut dcols, 0, k1, (rows, k1, d.cout), dy, View::new(w, 0, 1, d.cout), false, par)?;
        let mut dx2 = vec![0f32; rows * d.c2];
        gemm_into(&mut dx2, 0, d.c2, (rows, d.c2, d.cout), dy, View::new(w, (k1 + 1) * d.cout, 1, d.cout), false, par)?;
        Ok((self.0.fold_cpu(&dcols, d.b, d.n, d.c1), dx2, dw))
    }
}

impl CustomOp3 for Pair {
    fn name(&self) -> &'static str {
        "dense_pair"
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
        let d = self.dims(l1, l2, l3)?;
        let y = self.forward(
            f32s(s1, l1, "dense: input")?,
            f32s(s2, l2, "dense: second input")?,
            f32s(s3, l3, "dense: weight")?,
            d,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.n, d.cout))))
    }

    fn bwd(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x1, x2, w, dy) = (x1.contiguous()?, x2.contiguous()?, w.contiguous()?, dy.contiguous()?);
        let d = self.dims(x1.layout(), x2.layout(), w.layout())?;
        let (dx1, dx2, dw) = with_f32(&x1, "input", |a| {
            with_f32(&x2, "second input", |b| {
                with_f32(&w, "weight", |wv| with_f32(&dy, "gradient", |g| self.backward(a, b, wv, g, d)))
            })
        })?;
        let dev = x1.device();
        let grad = |keep: bool, v: Vec<f32>, t: &Tensor| {
            if keep {
                Tensor::from_vec(v, t.shape(), dev).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok((grad(x1.track_op(), dx1, &x1)?, grad(x2.track_op(), dx2, &x2)?, grad(w.track_op(), dw, &w)?))
    }
}

/// y = gate(a) W + b with an optional unfold of gate(a), where gate is the gated PixelCNN's
/// tanh(a[.., :C]) sigmoid(a[.., C:]) ([`crate::gate::gate`]): the gate as the first step of
/// the layer that reads it, so its (rows, C) output never becomes a graph node (whose gradient
/// candle would zero-fill and add). CPU and f32; elsewhere gate then [`dense`].
pub fn dense_gated(a: &Tensor, w: &Tensor, b: &Tensor, unfold: Option<&Unfold>) -> Result<Tensor> {
    let cpu_f32 = a.device().is_cpu() && [a.dtype(), w.dtype(), b.dtype()].iter().all(|&d| d == DType::F32);
    if !cpu_f32 {
        return dense(&crate::gate::gate(a)?, w, b, unfold, None);
    }
    let inner = Dense::new(unfold, a.dim(D::Minus1)? / 2, w.dim(1)?, None);
    a.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, GatedDense { inner, kept: Default::default() })
}

/// The op of [`dense_gated`]: the gate, then [`Dense`] on its output (kept for the backward).
#[derive(Clone)]
struct GatedDense {
    inner: Dense,
    kept: Arc<Mutex<Option<Var>>>,
}

impl CustomOp3 for GatedDense {
    fn name(&self) -> &'static str {
        "dense_gated"
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
        let mut dims = l1.shape().dims().to_vec();
        let c2 = dims.last().copied().unwrap_or(0);
        if c2 % 2 != 0 {
            bail!("dense_gated: {c2} channels, expected an even number");
        }
        if let Some(last) = dims.last_mut() {
            *last = c2 / 2;
        }
        let p = crate::profile::scope("gated fwd gate");
        let g = crate::gate::gate_cpu(f32s(s1, l1, "dense: input")?, c2 / 2);
        drop(p);
        // A variable, so that the inner backward computes the gradient of the gate's output.
        let g = Var::from_vec(g, dims, &candle_core::Device::Cpu)?;
        let out = {
            let (st, l) = g.as_tensor().storage_and_layout();
            let candle_core::Storage::Cpu(gs) = &*st else { bail!("dense_gated: expected CPU storage") };
            self.inner.cpu_fwd(gs, l, s2, l2, s3, l3)?
        };
        if let Ok(mut slot) = self.kept.lock() {
            *slot = Some(g);
        }
        Ok(out)
    }

    fn bwd(
        &self,
        a: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = match self.kept.lock().ok().and_then(|mut s| s.take()) {
            Some(g) => g,
            None => Var::from_tensor(&crate::gate::gate(&a.detach())?)?, // a second backward
        };
        let (dg, dw, db) = self.inner.bwd(g.as_tensor(), w, b, res, dy)?;
        let da = match dg {
            Some(dg) if a.track_op() => {
                let _p = crate::profile::scope("gated bwd gate");
                Some(a.contiguous()?.apply_op2_no_bwd(&dg.contiguous()?, &crate::gate::GateGrad)?)
            }
            _ => None,
        };
        Ok((da, dw, db))
    }
}

/// y = act(y + b) row by row, in parallel; act = LeakyReLU(slope) as max(z, slope z) (slope
/// in [0, 1]) or the identity. Written without branches: a data-dependent branch here ran at
/// a tenth of the speed of the vectorised loop on the reference network's first layer.
pub(crate) fn bias_act(y: &mut [f32], bias: &[f32], slope: Option<f32>) {
    let c = bias.len().max(1);
    let rows_per_chunk = (CHUNK / c).max(1);
    y.par_chunks_mut(rows_per_chunk * c).for_each(|chunk| crate::simd::bias_act_rows(chunk, bias, slope));
}

/// dz = g where the output is positive, g * slope elsewhere: one pass over (g, y).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeakyGrad(pub(crate) f32);

impl candle_core::CustomOp2 for LeakyGrad {
    fn name(&self) -> &'static str {
        "leaky_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, y) = (f32s(s1, l1, "dense: gradient")?, f32s(s2, l2, "dense: output")?);
        if g.len() != y.len() {
            bail!("leaky_grad: {} gradients for {} outputs", g.len(), y.len());
        }
        let slope = self.0;
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(|(o, (gi, yi))| crate::simd::leaky_grad(o, gi, yi, slope));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Sum over the rows of (N, C): candle reduces a non-last dimension element by element with
/// strided indexing, which is slow for bias gradients (PERF.md, "Bias gradients").
/// Partial sums over fixed row blocks, added in block order: deterministic for any thread count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ColumnSum;

const SUM_ROWS: usize = 256;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column_sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c) = l.shape().dims2()?;
        let z = f32s(s, l, "dense: column_sum input")?;
        Ok((CpuStorage::F32(column_sums(z, c)), Shape::from(c)))
    }
}

/// [`ColumnSum`] of a row-major (N, c) slice.
pub(crate) fn column_sums(z: &[f32], c: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = z
        .par_chunks(SUM_ROWS * c.max(1))
        .map(|block| {
            let mut acc = vec![0f32; c];
            crate::simd::add_rows(&mut acc, block);
            acc
        })
        .collect();
    let mut out = vec![0f32; c];
    for p in &partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + 3 * seed) * 7919 % 613) as f32 - 306.0) / 300.0).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The fused op against the composed candle ops (the fallback path), in values and in the
    /// gradients of x, W and b, with and without unfold and activation.
    #[test]
    fn fused_equals_composed_ops_in_values_and_all_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let unfolds = [
            None,
            Some(Unfold { height: 1, width: 9, taps: vec![(0, 0), (0, -1), (0, -2)], mask: None }),
            Some(Unfold { height: 1, width: 11, taps: vec![(0, -1), (0, -3), (0, -5), (0, -7)], mask: None }),
            Some(Unfold { height: 3, width: 4, taps: vec![(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0)], mask: None }),
            // Locally masked (LMConv): each cell its own subset of a 3x3 window.
            Some(Unfold {
                height: 3,
                width: 4,
                taps: (-1..=1).flat_map(|dy| (-1..=1).map(move |dx| (dy, dx))).collect(),
                mask: Some((0..12 * 9).map(|i| (i * 5 + i / 9) % 4 != 0).collect()),
            }),
            // Large enough for the padded route (no im2col), with a run of taps and a lone one.
            Some(padded_route()),
        ];
        for u in &unfolds {
            for leaky in [None, Some(0.0), Some(0.01), Some(1.0)] {
                // C_out > C_in and C_out < C_in: both sides of the unfold.
                for (cin, cout) in [(3, 4), (5, 2)] {
                    let (bsz, n) = (2, u.as_ref().map_or(5, |u| u.height * u.width));
                    let k = cin * u.as_ref().map_or(1, |u| u.taps.len());
                    let x = Var::from_tensor(&Tensor::from_vec(vals(bsz * n * cin, 1), (bsz, n, cin), &dev)?)?;
                    let w = Var::from_tensor(&Tensor::from_vec(vals(k * cout, 2), (k, cout), &dev)?)?;
                    let b = Var::from_tensor(&Tensor::from_vec(vals(cout, 3), cout, &dev)?)?;
                    let probe = Tensor::from_vec(vals(bsz * n * cout, 4), (bsz, n, cout), &dev)?;
                    let fused = dense(x.as_tensor(), w.as_tensor(), b.as_tensor(), u.as_ref(), leaky)?;
                    let cols = match u {
                        Some(u) => u.apply_generic(x.as_tensor())?,
                        None => x.as_tensor().clone(),
                    };
                    let z = cols.reshape((bsz * n, k))?.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
                    let plain = match leaky {
                        Some(s) => crate::leaky_relu(&z, s)?,
                        None => z,
                    }
                    .reshape((bsz, n, cout))?;
                    let what = format!("{u:?} leaky {leaky:?} {cin}->{cout}");
                    assert_eq!(fused.dims(), plain.dims(), "{what}");
                    assert!(max_diff(&fused, &plain)? < 1e-5, "{what}: values");
                    let gf = (&fused * &probe)?.sum_all()?.backward()?;
                    let gp = (&plain * &probe)?.sum_all()?.backward()?;
                    for (v, name) in [(&x, "dx"), (&w, "dW"), (&b, "db")] {
                        let d = max_diff(gf.get(v).expect("grad"), gp.get(v).expect("grad"))?;
                        assert!(d < 1e-5, "{what}: {name} differs by {d}");
                    }
                    // A second backward through the same graph gives the same gradient.
                    let again = (&fused * &probe)?.sum_all()?.backward()?;
                    assert!(max_diff(again.get(&w).expect("grad"), gp.get(&w).expect("grad"))? < 1e-5, "{what}");
                }
            }
        }
        Ok(())
    }

    /// A 12x14 grid with the gated PixelCNN's vertical taps minus one: [`Padded::plan`] takes
    /// the padded route for it.
    fn padded_route() -> Unfold {
        let u = Unfold { height: 12, width: 14, taps: vec![(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1)], mask: None };
        assert!(Padded::plan(&u).is_some(), "the test grid must take the padded route");
        u
    }

    /// The paired product against the two `dense` calls and their sum (the composed path), in
    /// values and in the gradients of both inputs, both weights and both biases; on a small grid
    /// (im2col) and on one that takes the padded route.
    #[test]
    fn pair_equals_two_products_and_their_sum() -> Result<()> {
        for u in [Unfold { height: 3, width: 4, taps: vec![(0, -1), (0, 0), (-1, 1)], mask: None }, padded_route()] {
            pair_case(&u)?;
        }
        Ok(())
    }

    fn pair_case(u: &Unfold) -> Result<()> {
        let dev = Device::Cpu;
        let taps = u.taps.len();
        let (bsz, n, c1, c2, cout) = (2, u.height * u.width, 3, 5, 4);
        let var = |len: usize, seed: usize, shape: &[usize]| -> Result<Var> {
            Var::from_tensor(&Tensor::from_vec(vals(len, seed), shape, &dev)?)
        };
        let x1 = var(bsz * n * c1, 1, &[bsz, n, c1])?;
        let x2 = var(bsz * n * c2, 2, &[bsz, n, c2])?;
        let w1 = var(taps * c1 * cout, 3, &[taps * c1, cout])?;
        let w2 = var(c2 * cout, 4, &[c2, cout])?;
        let b1 = var(cout, 5, &[cout])?;
        let b2 = var(cout, 6, &[cout])?;
        let probe = Tensor::from_vec(vals(bsz * n * cout, 7), (bsz, n, cout), &dev)?;
        let (t1, t2) = (x1.as_tensor(), x2.as_tensor());
        let fused = dense_pair(t1, u, w1.as_tensor(), b1.as_tensor(), t2, w2.as_tensor(), b2.as_tensor())?;
        let cols = u.apply_generic(t1)?.reshape((bsz * n, taps * c1))?;
        let plain = (cols.matmul(w1.as_tensor())?.broadcast_add(b1.as_tensor())?
            + t2.reshape((bsz * n, c2))?.matmul(w2.as_tensor())?.broadcast_add(b2.as_tensor())?)?
        .reshape((bsz, n, cout))?;
        assert!(max_diff(&fused, &plain)? < 1e-5, "values");
        let gf = (&fused * &probe)?.sum_all()?.backward()?;
        let gp = (&plain * &probe)?.sum_all()?.backward()?;
        for (v, name) in [(&x1, "dx1"), (&x2, "dx2"), (&w1, "dW1"), (&w2, "dW2"), (&b1, "db1"), (&b2, "db2")] {
            let d = max_diff(gf.get(v).expect("grad"), gp.get(v).expect("grad"))?;
            assert!(d < 1e-5, "{u:?}: {name} differs by {d}");
        }
        Ok(())
    }

    /// The gate inside the op against the gate op followed by `dense`, with and without an
    /// unfold (and an output narrower than the input: the output-side route), in values and in
    /// the gradients of the pre-activations, W and b, over two backward passes.
    #[test]
    fn gated_equals_gate_then_dense() -> Result<()> {
        let dev = Device::Cpu;
        let unfolds = [
            None,
            Some(Unfold { height: 3, width: 4, taps: vec![(-1, -1), (-1, 0), (0, -1)], mask: None }),
            Some(padded_route()),
        ];
        for u in &unfolds {
            for (c, cout) in [(3, 4), (5, 2)] {
                let (bsz, n) = (2, u.as_ref().map_or(12, |u| u.height * u.width));
                let k = c * u.as_ref().map_or(1, |u| u.taps.len());
                let a = Var::from_tensor(&Tensor::from_vec(vals(bsz * n * 2 * c, 1), (bsz, n, 2 * c), &dev)?)?;
                let w = Var::from_tensor(&Tensor::from_vec(vals(k * cout, 2), (k, cout), &dev)?)?;
                let b = Var::from_tensor(&Tensor::from_vec(vals(cout, 3), cout, &dev)?)?;
                let probe = Tensor::from_vec(vals(bsz * n * cout, 4), (bsz, n, cout), &dev)?;
                let fused = dense_gated(a.as_tensor(), w.as_tensor(), b.as_tensor(), u.as_ref())?;
                let plain = dense(&crate::gate::gate(a.as_tensor())?, w.as_tensor(), b.as_tensor(), u.as_ref(), None)?;
                let what = format!("{u:?} {c}->{cout}");
                assert!(max_diff(&fused, &plain)? < 1e-5, "{what}: values");
                let gp = (&plain * &probe)?.sum_all()?.backward()?;
                for pass in 0..2 {
                    let gf = (&fused * &probe)?.sum_all()?.backward()?;
                    for (v, name) in [(&a, "da"), (&w, "dW"), (&b, "db")] {
                        let d = max_diff(gf.get(v).expect("grad"), gp.get(v).expect("grad"))?;
                        assert!(d < 1e-5, "{what} pass {pass}: {name} differs by {d}");
                    }
                }
            }
        }
        Ok(())
    }

    /// GELU inside the op against dense then the GELU op, in values and in the gradients of
    /// x, W and b (twice: the kept pre-activations are read, not consumed); without gradients
    /// nothing is kept and the values are the same.
    #[test]
    fn gelu_inside_equals_dense_then_gelu() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, c, cout) in [(7, 3, 5), (40, 16, 64)] {
            let x = Var::from_tensor(&Tensor::from_vec(vals(rows * c, 1), (1, rows, c), &dev)?.affine(3.0, 0.0)?)?;
            let w = Var::from_tensor(&Tensor::from_vec(vals(c * cout, 2), (c, cout), &dev)?)?;
            let b = Var::from_tensor(&Tensor::from_vec(vals(cout, 3), cout, &dev)?)?;
            let probe = Tensor::from_vec(vals(rows * cout, 4), (1, rows, cout), &dev)?;
            let fused = dense_gelu(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
            let plain = crate::gelu(&dense(x.as_tensor(), w.as_tensor(), b.as_tensor(), None, None)?)?;
            assert!(max_diff(&fused, &plain)? < 1e-6, "{rows}x{c}->{cout}: values");
            let gp = (&plain * &probe)?.sum_all()?.backward()?;
            for pass in 0..2 {
                let gf = (&fused * &probe)?.sum_all()?.backward()?;
                for (v, name) in [(&x, "dx"), (&w, "dW"), (&b, "db")] {
                    let d = max_diff(gf.get(v).expect("grad"), gp.get(v).expect("grad"))?;
                    assert!(d < 1e-5, "{rows}x{c}->{cout} pass {pass}: {name} differs by {d}");
                }
            }
            let detached = dense_gelu(&x.as_tensor().detach(), &w.as_tensor().detach(), &b.as_tensor().detach())?;
            assert_eq!(max_diff(&detached, &fused)?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn hand_computed_values() -> Result<()> {
        // x = [[1, 2]], W = [[1, -1], [2, 0.5]], b = [-6, 0]: xW + b = [5 - 6, 0 + 0] = [-1, 0].
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0]], &dev)?;
        let w = Tensor::new(&[[1f32, -1.0], [2.0, 0.5]], &dev)?;
        let b = Tensor::new(&[-6f32, 0.0], &dev)?;
        assert_eq!(dense(&x, &w, &b, None, None)?.to_vec2::<f32>()?, vec![vec![-1.0, 0.0]]);
        assert_eq!(dense(&x, &w, &b, None, Some(0.1))?.to_vec2::<f32>()?, vec![vec![-0.1, 0.0]]);
        Ok(())
    }

    #[test]
    fn column_sum_equals_candle_sum_over_rows() -> Result<()> {
        for (n, c) in [(1, 1), (3, 5), (700, 3), (513, 64)] {
            let z = Tensor::from_vec(vals(n * c, 5), (n, c), &Device::Cpu)?;
            let fast = z.apply_op1_no_bwd(&ColumnSum)?.to_vec1::<f32>()?;
            let slow = z.sum(0)?.to_vec1::<f32>()?;
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{n}x{c}: {a} vs {b}");
            }
        }
        Ok(())
    }
}
