//! The gated layers of a gated PixelCNN (van den Oord et al. 2016, "Conditional Image
//! Generation with PixelCNN Decoders", §2.1-2.2, eq. 2 and Fig. 2) as one op with a
//! hand-written backward. Layer l, with gate(a) = tanh(a_f) . sigmoid(a_g) over a's halves:
//!
//!   v_l = W_v * g_{l-1} + b_v,              g_{l-1} = gate(v_{l-1})  (g_{-1} = x)
//!   u_l = W_h * h_{l-1} + v_l W_vh + b_h + b_vh                        (h_{-1} = x)
//!   h_l = [h_{l-1}] + gate(u_l) W_o + b_o   (the residual from the second layer on)
//!
//! with * the vertical and horizontal tap convolutions on zero-padded grids (`implicit`).
//! Backward, from dh = dL/dh_l and dv = dL/dv_l from layer l + 1's vertical convolution:
//!
//!   dW_o = gate(u)^T dh,  du = gate'(u) . (dh W_o^T),  dW_vh = v^T du,  db_h = db_vh = colsum du,
//!   dv += du W_vh^T,  db_v = colsum dv,  dh_{l-1} = dh + W_h^T * du,  dv_{l-1} = gate'(v_{l-1}) . (W_v^T * dv).
//!
//! Why one op: per layer, composed from the fused convolution ops, candle zero-fills and adds
//! five gradients of the layer's activations (v_l and h_l have two readers each, plus the
//! residual sum): about 200 MB of memory traffic per layer of the 28x28, 32-channel network.
//! Here only dx and the weights' gradients reach candle. The op has two inputs, so the
//! weights of every layer come as one flat tensor (a copy, small beside the activations).
//!
//! How it runs: every activation stays in one padded layout for all layers (no pad / unpad
//! per convolution), and the batch is cut into parts of [`PART_IMAGES`] images that one thread
//! takes through every layer (no product split between threads; a part's activations stay in
//! that core's cache). The parts' weight gradients are summed in part order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::dense::{bias_act, column_sums};
use crate::gate::{bias_gate_into, gate_from_parts_into, gate_grad_from_parts_into, gate_grad_into};
use crate::gemm::{f32s, gemm_into, parallelism, weight_grad_sums, with_slices, View};
use crate::implicit::Padded;
use crate::scratch;
use crate::{Result, Unfold};

/// One gated layer's convolutions and weights: W_v (taps_v C_in, 2C), W_h (taps_h C_in, 2C),
/// W_vh (2C, 2C), W_o (C, C), each with its bias. C_in is x's channels for the first layer
/// and C after.
#[derive(Debug, Clone, Copy)]
pub struct GatedLayer<'a> {
    pub vertical: &'a Unfold,
    pub wv: &'a Tensor,
    pub bv: &'a Tensor,
    pub horizontal: &'a Unfold,
    pub wh: &'a Tensor,
    pub bh: &'a Tensor,
    pub wvh: &'a Tensor,
    pub bvh: &'a Tensor,
    pub wo: &'a Tensor,
    pub bo: &'a Tensor,
}

impl GatedLayer<'_> {
    fn params(&self) -> [&Tensor; 8] {
        [self.wv, self.bv, self.wh, self.bh, self.wvh, self.bvh, self.wo, self.bo]
    }
}

/// h_L of the stack over x (B, H*W, C_x), or ReLU(h_L) with `relu` (the output layers' first
/// step, whose backward as a candle op takes several passes), as one op on CPU for f32 where
/// every convolution runs on a padded grid (large grids, unmasked taps). None where that route
/// does not apply: the caller then runs the layers one op each ([`gated_stack_composed`] is
/// the same).
pub fn gated_stack(x: &Tensor, layers: &[GatedLayer], relu: bool) -> Result<Option<Tensor>> {
    let params: Vec<&Tensor> = layers.iter().flat_map(|l| l.params()).collect();
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && params.iter().all(|t| t.dtype() == DType::F32);
    let plans = layers.iter().flat_map(|l| [l.vertical, l.horizontal]).map(Padded::plan).collect::<Option<Vec<_>>>();
    match plans.as_deref().and_then(Padded::aligned) {
        Some(plans) if cpu_f32 && !layers.is_empty() && x.dim(0)? > 0 => stack_op(x, layers, plans, relu).map(Some),
        _ => Ok(None),
    }
}

/// The op with given padded layouts, vertical and horizontal of each layer in turn (tests use
/// layouts on small grids, where `plan` declines).
fn stack_op(x: &Tensor, layers: &[GatedLayer], plans: Vec<Padded>, relu: bool) -> Result<Tensor> {
    let (_, _, cx) = x.dims3()?;
    let c = layers[0].wo.dim(0)?;
    for (l, layer) in layers.iter().enumerate() {
        let cin = if l == 0 { cx } else { c };
        let want = [
            vec![layer.vertical.taps.len() * cin, 2 * c],
            vec![2 * c],
            vec![layer.horizontal.taps.len() * cin, 2 * c],
            vec![2 * c],
            vec![2 * c, 2 * c],
            vec![2 * c],
            vec![c, c],
            vec![c],
        ];
        for (t, w) in layer.params().iter().zip(&want) {
            if t.dims() != w.as_slice() {
                bail!("gated_stack: layer {l} has a weight of shape {:?}, expected {w:?}", t.dims());
            }
        }
    }
    let flat =
        Tensor::cat(&layers.iter().flat_map(|l| l.params()).map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let keep = x.track_op() || flat.track_op();
    let plans = plans.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
    let op = Stack { plans: Arc::new(plans), c, relu, keep, saved: Arc::default() };
    x.contiguous()?.apply_op2(&flat, op)
}

/// A layer's activations, kept by the forward for the backward. Padded layout ([`Padded`],
/// the one all layers share): v_l and [tanh | sigmoid] of u_l's halves (2C per cell; the
/// backward needs u_l only through them, and remakes gate(u_l) from them with one multiply
/// rather than reading a kept copy back from memory) over the span of the products; gate(v_l)
/// and h_l (C per cell), the next layer's inputs, as whole padded buffers with zeros at pads.
#[derive(Debug, Default)]
struct Acts {
    v: Vec<f32>,
    gv: Vec<f32>,
    u: Vec<f32>,
    h: Vec<f32>,
}

impl Drop for Acts {
    fn drop(&mut self) {
        for buf in [&mut self.v, &mut self.gv, &mut self.u, &mut self.h] {
            scratch::give(std::mem::take(buf));
        }
    }
}

/// Per part of the batch ([`PART_IMAGES`] images), its layers' activations.
#[derive(Debug, Default)]
struct Saved {
    parts: Vec<Vec<Acts>>,
}

/// Images per part: the batch is cut into parts that run the whole stack on one thread each
/// (two parts at a time on two cores), so that a layer's products find its activations in
/// that core's cache and no product is split between threads.
const PART_IMAGES: usize = 1;

#[derive(Debug, Clone)]
struct Stack {
    /// (vertical, horizontal) padded layouts per layer, all of one geometry.
    plans: Arc<Vec<(Padded, Padded)>>,
    c: usize,
    /// The output through a ReLU.
    relu: bool,
    keep: bool,
    saved: Arc<Mutex<Saved>>,
}

/// One layer's weights out of the flat tensor.
struct Weights<'a> {
    wv: &'a [f32],
    bv: &'a [f32],
    wh: &'a [f32],
    bh: &'a [f32],
    wvh: &'a [f32],
    bvh: &'a [f32],
    wo: &'a [f32],
    bo: &'a [f32],
}

/// f(0), ..., f(n - 1): on one-thread pools side by side, or here in turn when this code
/// already runs on a pool of one thread (a sweep's job). The same results either way.
/// Each lane takes the next part not yet taken rather than a fixed share, so that a lane
/// slowed by another process does not leave the others waiting at the end.
fn each_part<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    if crate::threads::single() {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let lanes = crate::own_threads().min(n);
    let mut done: Vec<(usize, R)> = crate::on_own_threads(lanes, |_| {
        let taken = std::iter::from_fn(|| Some(next.fetch_add(1, Ordering::Relaxed)).filter(|&i| i < n));
        taken.map(|i| (i, f(i))).collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    done.sort_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, r)| r).collect()
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("gated_stack: poisoned activation store".into())
}

/// y (n x m) = x (n x k) w (k x m), or with `wt` w^T where w is stored (m x k); added to y
/// when `acc`.
fn product_into(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    (n, k, m): (usize, usize, usize),
    wt: bool,
    acc: bool,
) -> Result<()> {
    let rhs = if wt { View::new(w, 0, 1, k) } else { View::new(w, 0, m, 1) };
    gemm_into(y, 0, m, (n, m, k), View::new(x, 0, k, 1), rhs, acc, parallelism())
}

fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14).zip(b.par_chunks(1 << 14)).for_each(|(a, b)| crate::simd::add_assign(a, b));
}

impl Stack {
    /// Weight counts of each layer, for x with `cx` channels.
    fn sizes(&self, cx: usize) -> Vec<[usize; 8]> {
        let c = self.c;
        self.plans
            .iter()
            .enumerate()
            .map(|(l, (pv, ph))| {
                let cin = if l == 0 { cx } else { c };
                [pv.taps() * cin * 2 * c, 2 * c, ph.taps() * cin * 2 * c, 2 * c, 4 * c * c, 2 * c, c * c, c]
            })
            .collect()
    }

    fn split<'a>(&self, flat: &'a [f32], cx: usize) -> Result<Vec<Weights<'a>>> {
        let sizes = self.sizes(cx);
        let total: usize = sizes.iter().flatten().sum();
        if flat.len() != total {
            bail!("gated_stack: {} weights, the layers need {total}", flat.len());
        }
        let mut rest = flat;
        let mut take = |n: usize| {
            let (a, b) = rest.split_at(n);
            rest = b;
            a
        };
        Ok(sizes
            .iter()
            .map(|s| Weights {
                wv: take(s[0]),
                bv: take(s[1]),
                wh: take(s[2]),
                bh: take(s[3]),
                wvh: take(s[4]),
                bvh: take(s[5]),
                wo: take(s[6]),
                bo: take(s[7]),
            })
            .collect())
    }

    /// h_L (B, H*W, C) and the activations, from x (B, H*W, C_x), part by part.
    fn forward(&self, x: &[f32], (b, cx): (usize, usize), flat: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let weights = self.split(flat, cx)?;
        let per = PART_IMAGES * x.len() / b.max(1);
        let parts = each_part(b.div_ceil(PART_IMAGES), |i| {
            let xi = &x[i * per..((i + 1) * per).min(x.len())];
            self.forward_part(xi, (xi.len() / (per / PART_IMAGES), cx), &weights)
        });
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        // The parts' outputs side by side, copied in parallel (one thread would take ~1 ms).
        let out_per_image = self.plans[0].0.cells() * self.c;
        let mut h = vec![0f32; b * out_per_image];
        h.par_chunks_mut(PART_IMAGES * out_per_image).zip(&parts).for_each(|(d, (hi, _))| {
            if self.relu {
                d.iter_mut().zip(hi).for_each(|(d, v)| *d = v.max(0.0));
            } else {
                d.copy_from_slice(hi);
            }
        });
        let saved = Saved { parts: if self.keep { parts.into_iter().map(|(_, a)| a).collect() } else { Vec::new() } };
        Ok((h, saved))
    }

    /// (dx, d flat) from dy = dL/dh_L, (B, H*W, C), part by part; the parts' weight gradients
    /// are summed in part order (the same sums for any number of threads).
    fn backward(
        &self,
        x: &[f32],
        (b, cx): (usize, usize),
        flat: &[f32],
        (dy, out): (&[f32], Option<&[f32]>),
        saved: &Saved,
        want_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let weights = self.split(flat, cx)?;
        if out.is_some_and(|o| o.len() != dy.len()) {
            bail!("gated_stack: {} output gradients for {} outputs", dy.len(), out.map_or(0, <[f32]>::len));
        }
        // The convolutions' weights as their input gradients read them, made once for all parts
        // (none for the first layer when dx is not wanted).
        let reversed: Vec<(Vec<f32>, Vec<f32>)> = (weights.iter().zip(self.plans.iter()).enumerate())
            .map(|(l, (w, (pv, ph)))| match (l, want_dx) {
                (0, false) => (Vec::new(), Vec::new()),
                _ => {
                    let cin = if l == 0 { cx } else { self.c };
                    (pv.reversed_transposed(w.wv, cin, 2 * self.c), ph.reversed_transposed(w.wh, cin, 2 * self.c))
                }
            })
            .collect();
        let (px, py) = (PART_IMAGES * x.len() / b.max(1), PART_IMAGES * dy.len() / b.max(1));
        let parts = each_part(b.div_ceil(PART_IMAGES), |i| {
            let xi = &x[i * px..((i + 1) * px).min(x.len())];
            let part = i * py..((i + 1) * py).min(dy.len());
            let (dyi, outi) = (&dy[part.clone()], out.map(|o| &o[part]));
            let n = xi.len() / (px / PART_IMAGES);
            self.backward_part(xi, (n, cx), (&weights, &reversed), (dyi, outi), &saved.parts[i], want_dx)
        });
        let mut dx = want_dx.then(|| Vec::with_capacity(x.len()));
        let mut dws = Vec::with_capacity(parts.len());
        for part in parts {
            let (dxi, dwi) = part?;
            if let (Some(dx), Some(dxi)) = (dx.as_mut(), dxi) {
                dx.extend(dxi);
            }
            dws.push(dwi);
        }
        // Each value is the sum of the parts' in part order, whichever thread adds which chunk.
        let _p = crate::profile::scope("stack bwd sum parts");
        const CHUNK: usize = 1 << 12;
        let mut dw = vec![0f32; flat.len()];
        dw.par_chunks_mut(CHUNK).enumerate().for_each(|(k, d)| {
            for dwi in &dws {
                crate::simd::add_assign(d, &dwi[k * CHUNK..k * CHUNK + d.len()]);
            }
        });
        Ok((dx, dw))
    }

    /// The stack over b images.
    fn forward_part(&self, x: &[f32], (b, cx): (usize, usize), weights: &[Weights]) -> Result<(Vec<f32>, Vec<Acts>)> {
        let (c, par) = (self.c, parallelism());
        let _part = crate::profile::scope("stack fwd part");
        let grid = &self.plans[0].0;
        let (p0, p1) = grid.span(b);
        let (ns, full) = (p1 - p0, grid.len(b));
        let xp = grid.pad(x, b, cx);
        let mut acts: Vec<Acts> = Vec::with_capacity(weights.len());
        let mut gu = scratch::take(ns * c); // gate(u_l), read only by the layer's own product
        for (l, (w, (pv, ph))) in weights.iter().zip(self.plans.iter()).enumerate() {
            let cin = if l == 0 { cx } else { c };
            let (vin, hin) = match acts.last() {
                None => (&xp, &xp),
                Some(a) => (&a.gv, &a.h),
            };
            // The products first, each into a pooled buffer that its first run overwrites; the
            // biases join the passes over the results. v enters u's product without b_v, which
            // reaches u as b_v W_vh in u's bias.
            let s1 = p0 * c..p1 * c;
            let p = crate::profile::scope("stack fwd conv");
            let mut v = scratch::take(ns * 2 * c);
            pv.forward_padded(vin, w.wv, (b, cin, 2 * c), &mut v, false, par)?;
            let mut u = scratch::take(ns * 2 * c);
            ph.forward_padded(hin, w.wh, (b, cin, 2 * c), &mut u, false, par)?;
            drop(p);
            let p = crate::profile::scope("stack fwd rows");
            product_into(&mut u, &v, w.wvh, (ns, 2 * c, 2 * c), false, true)?;
            drop(p);
            let p = crate::profile::scope("stack fwd gate");
            let bu: Vec<f32> = (0..2 * c)
                .map(|j| w.bh[j] + w.bvh[j] + (0..2 * c).map(|i| w.bv[i] * w.wvh[i * 2 * c + j]).sum::<f32>())
                .collect();
            bias_gate_into(&mut gu, &mut u, &bu, c, self.keep);
            let mut gv = Vec::new();
            if l + 1 < weights.len() {
                gv = scratch::take(full * c);
                bias_gate_into(&mut gv[s1.clone()], &mut v, w.bv, c, false);
                grid.zero_pads(&mut gv, b, c);
            } else {
                bias_act(&mut v, w.bv, None);
            }
            drop(p);
            // h = [h_{l-1}] + gate(u) W_o + b_o.
            let p = crate::profile::scope("stack fwd rows");
            let mut h = scratch::take(full * c);
            product_into(&mut h[s1.clone()], &gu, w.wo, (ns, c, c), false, false)?;
            if l == 0 {
                bias_act(&mut h[s1.clone()], w.bo, None);
            } else {
                crate::simd::add_bias_rows(&mut h[s1.clone()], &hin[s1.clone()], w.bo);
            }
            grid.zero_pads(&mut h, b, c);
            drop(p);
            if !self.keep {
                acts.clear(); // only the newest layer is read again
            }
            acts.push(Acts { v, gv, u, h });
        }
        let Some(top) = acts.last_mut() else { bail!("gated_stack: no layers") };
        let h = grid.unpad(&top.h[p0 * c..], b, c);
        scratch::give(std::mem::take(&mut top.h)); // h_L is not read by the backward
        scratch::give(gu);
        Ok((h, acts))
    }

    /// (dx, d flat) of b images from dy = dL/dh_L, (b, H*W, C), and their activations.
    fn backward_part(
        &self,
        x: &[f32],
        (b, cx): (usize, usize),
        (weights, reversed): (&[Weights], &[(Vec<f32>, Vec<f32>)]),
        (dy, out): (&[f32], Option<&[f32]>),
        saved: &[Acts],
        want_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let (c, par) = (self.c, parallelism());
        let _part = crate::profile::scope("stack bwd part");
        let grid = &self.plans[0].0;
        let (p0, p1) = grid.span(b);
        let (ns, full) = (p1 - p0, grid.len(b));
        let (s1, s2) = (p0 * c..p1 * c, p0 * 2 * c..p1 * 2 * c);
        let xp = grid.pad(x, b, cx);
        let mut grads: Vec<Vec<f32>> = Vec::with_capacity(weights.len());
        // Gradients in the padded layout with zeros at pads, so that the products' sums over
        // the span see only the cells of the images.
        let mut dh = match out {
            Some(y) => {
                let mut g = scratch::take(dy.len());
                crate::simd::leaky_grad(&mut g, dy, y, 0.0);
                let dh = grid.pad(&g, b, c);
                scratch::give(g);
                dh
            }
            None => grid.pad(dy, b, c),
        };
        // Buffers reused by every layer: the products and gates rewrite the span in full, so
        // the cells outside it stay the zeros written here.
        let (mut gu, mut dgu) = (scratch::take(ns * c), scratch::take(ns * c));
        let (mut du, mut dv) = (scratch::take(full * 2 * c), scratch::take(full * 2 * c));
        for buf in [&mut du, &mut dv] {
            buf[..s2.start].fill(0.0);
            buf[s2.end..].fill(0.0);
        }
        let mut dx = None;
        let missing = || candle_core::Error::Msg("gated_stack: a gradient was not computed".into());
        for (l, (w, (pv, ph))) in weights.iter().zip(self.plans.iter()).enumerate().rev() {
            let cin = if l == 0 { cx } else { c };
            let a = &saved[l];
            let (vin, hin) = match l.checked_sub(1) {
                None => (&xp, &xp),
                Some(k) => (&saved[k].gv, &saved[k].h),
            };
            // h = [h_{l-1}] + gate(u) W_o + b_o.
            let p = crate::profile::scope("stack bwd rows");
            gate_from_parts_into(&mut gu, &a.u, c);
            let dwo = weight_grad_sums(&dh[s1.clone()], c, View::new(&gu, 0, c, 1), c, ns, false)?;
            let dbo = column_sums(&dh[s1.clone()], c);
            product_into(&mut dgu, &dh[s1.clone()], w.wo, (ns, c, c), true, false)?;
            drop(p);
            let p = crate::profile::scope("stack bwd gate");
            gate_grad_from_parts_into(&mut du[s2.clone()], &a.u, &dgu, c);
            drop(p);
            // u = W_h * h_{l-1} + v W_vh + b_h + b_vh.
            let p = crate::profile::scope("stack bwd rows");
            let dwvh = weight_grad_sums(&du[s2.clone()], 2 * c, View::new(&a.v, 0, 2 * c, 1), 2 * c, ns, false)?;
            let dbh = column_sums(&du[s2.clone()], 2 * c);
            // dv: from layer l + 1's vertical convolution (none above the top layer) plus du W_vh^T.
            let acc = l + 1 < weights.len();
            product_into(&mut dv[s2.clone()], &du[s2.clone()], w.wvh, (ns, 2 * c, 2 * c), true, acc)?;
            drop(p);
            let inputs = l > 0 || want_dx;
            let p = crate::profile::scope("stack bwd conv");
            let (wrv, wrh) = &reversed[l];
            let (dhin, dwh) = ph.backward_padded(hin, wrh, &du, (b, cin, 2 * c), (inputs, true), false, par)?;
            // v = W_v * g_{l-1} + b_v.
            let dbv = column_sums(&dv[s2.clone()], 2 * c);
            let (dvin, dwv) = pv.backward_padded(vin, wrv, &dv, (b, cin, 2 * c), (inputs, true), false, par)?;
            drop(p);
            let mut g = dwv.ok_or_else(missing)?;
            g.extend(dbv);
            g.extend(dwh.ok_or_else(missing)?);
            g.extend_from_slice(&dbh);
            g.extend(dwvh);
            g.extend(dbh);
            g.extend(dwo);
            g.extend(dbo);
            grads.push(g);
            if inputs {
                let _p = crate::profile::scope("stack bwd inputs");
                let (mut dhin, mut dvin) = (dhin.ok_or_else(missing)?, dvin.ok_or_else(missing)?);
                grid.zero_pads(&mut dhin, b, cin);
                grid.zero_pads(&mut dvin, b, cin);
                if l == 0 {
                    add_into(&mut dhin, &dvin); // both stacks read x
                    dx = Some(grid.unpad(&dhin[p0 * cx..], b, cx));
                } else {
                    add_into(&mut dhin, &dh); // the residual
                    dh = dhin;
                    // dv of layer l - 1, to which its own du W_vh^T adds.
                    gate_grad_into(&mut dv[s2.clone()], &saved[l - 1].v, &dvin[s1.clone()], c);
                }
            }
        }
        for buf in [gu, dgu, du, dv] {
            scratch::give(buf);
        }
        grads.reverse();
        Ok((dx, grads.concat()))
    }
}

impl CustomOp2 for Stack {
    fn name(&self) -> &'static str {
        "gated_stack"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope("stack fwd");
        let (b, n, cx) = lx.shape().dims3()?;
        let grid = &self.plans[0].0;
        if n != grid.cells() {
            bail!("gated_stack: input {:?}, built for {} cells", lx.shape(), grid.cells());
        }
        let (h, saved) =
            self.forward(f32s(sx, lx, "gated_stack: x")?, (b, cx), f32s(sw, lw, "gated_stack: weights")?)?;
        if self.keep {
            *self.saved.lock().map_err(poisoned)? = saved;
        }
        Ok((CpuStorage::F32(h), Shape::from((b, n, self.c))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("stack bwd");
        let (b, _, cx) = x.dims3()?;
        let saved = self.saved.lock().map_err(poisoned)?;
        if saved.parts.len() != b.div_ceil(PART_IMAGES) || saved.parts.iter().any(|p| p.len() != self.plans.len()) {
            bail!("gated_stack: the forward's activations were not kept for the backward");
        }
        let (dx, dw) = with_slices(&[x, w, dy, res], "gated_stack", |s| {
            // Through the ReLU (in each part): its output is positive exactly where h_L is.
            let out = self.relu.then_some(s[3]);
            self.backward(s[0], (b, cx), s[1], (s[2], out), &saved, x.track_op())
        })?;
        let dev = x.device();
        Ok((dx.map(|d| Tensor::from_vec(d, x.shape(), dev)).transpose()?, Some(Tensor::from_vec(dw, w.shape(), dev)?)))
    }
}

/// The same stack from the one-op-per-convolution kernels and candle's sum: the reference of
/// the tests.
pub fn gated_stack_composed(x: &Tensor, layers: &[GatedLayer], relu: bool) -> Result<Tensor> {
    let (mut v, mut h) = (x.clone(), x.clone());
    for (l, layer) in layers.iter().enumerate() {
        let vin = if l == 0 { v.clone() } else { crate::gate(&v)? };
        v = crate::dense(&vin, layer.wv, layer.bv, Some(layer.vertical), None)?;
        let u = (crate::dense(&h, layer.wh, layer.bh, Some(layer.horizontal), None)?
            + crate::dense(&v, layer.wvh, layer.bvh, None, None)?)?;
        let o = crate::dense(&crate::gate(&u)?, layer.wo, layer.bo, None, None)?;
        h = if l == 0 { o } else { (h + o)? };
    }
    if relu {
        h.relu()
    } else {
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn vals(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| scale * ((((i + 13 * seed) * 7919) % 613) as f32 - 306.0) / 306.0).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The gated PixelCNN's taps for kernel width 3: vertical (rows above; the first layer one
    /// row further up) and horizontal (up to the cell; the first layer left of it).
    fn taps(first: bool, grid: (usize, usize)) -> (Unfold, Unfold) {
        let v: Vec<(isize, isize)> = if first {
            (-2..=-1).flat_map(|dy| (-1..=1).map(move |dx| (dy, dx))).collect()
        } else {
            (-1..=0).flat_map(|dy| (-1..=1).map(move |dx| (dy, dx))).collect()
        };
        let h = if first { vec![(0, -1)] } else { vec![(0, -1), (0, 0)] };
        let u = |taps| Unfold { height: grid.0, width: grid.1, taps, mask: None };
        (u(v), u(h))
    }

    fn layer<'a>((uv, uh): &'a (Unfold, Unfold), p: &'a [Tensor; 8]) -> GatedLayer<'a> {
        GatedLayer {
            vertical: uv,
            wv: &p[0],
            bv: &p[1],
            horizontal: uh,
            wh: &p[2],
            bh: &p[3],
            wvh: &p[4],
            bvh: &p[5],
            wo: &p[6],
            bo: &p[7],
        }
    }

    /// Values and the gradients of x and of every weight of a three-layer stack against the
    /// composed ops, on a grid small enough that the composed convolutions use im2col (an
    /// independent route from the padded products of the fused op); the backward runs twice.
    #[test]
    fn fused_stack_equals_the_composed_layers() -> Result<()> {
        let dev = Device::Cpu;
        let (b, grid, cx, c, depth) = (2, (5, 6), 1, 3, 3);
        let n = grid.0 * grid.1;
        let units: Vec<(Unfold, Unfold)> = (0..depth).map(|l| taps(l == 0, grid)).collect();
        let mut vars = Vec::new();
        for (l, (uv, uh)) in units.iter().enumerate() {
            let cin = if l == 0 { cx } else { c };
            let shapes: [Vec<usize>; 8] = [
                vec![uv.taps.len() * cin, 2 * c],
                vec![2 * c],
                vec![uh.taps.len() * cin, 2 * c],
                vec![2 * c],
                vec![2 * c, 2 * c],
                vec![2 * c],
                vec![c, c],
                vec![c],
            ];
            for (i, s) in shapes.iter().enumerate() {
                let count = s.iter().product();
                vars.push(Var::from_vec(vals(count, 10 * l + i, 0.6), s.as_slice(), &dev)?);
            }
        }
        let make = |ts: &[Tensor]| -> Vec<(usize, [Tensor; 8])> {
            (0..depth).map(|l| (l, std::array::from_fn(|i| ts[8 * l + i].clone()))).collect()
        };
        let own = make(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
        let detached = make(&vars.iter().map(|v| v.as_tensor().detach()).collect::<Vec<_>>());
        fn view<'a>(units: &'a [(Unfold, Unfold)], ws: &'a [(usize, [Tensor; 8])]) -> Vec<GatedLayer<'a>> {
            ws.iter().map(|(l, p)| layer(&units[*l], p)).collect()
        }
        let layers = view(&units, &own);
        let x = Var::from_vec(vals(b * n * cx, 99, 1.0), (b, n, cx), &dev)?;
        // The composed ops take im2col here: the padded route is declined on this grid.
        assert!(gated_stack(x.as_tensor(), &layers, false)?.is_none());
        let plans = units.iter().flat_map(|(v, h)| [v, h]).map(Padded::new).collect::<Option<Vec<_>>>();
        let plans = Padded::aligned(&plans.expect("unmasked taps")).expect("one geometry");
        // With and without the ReLU on the output.
        for relu in [false, true] {
            let want = gated_stack_composed(x.as_tensor(), &layers, relu)?;
            let got = stack_op(x.as_tensor(), &layers, plans.clone(), relu)?;
            assert_eq!(got.dims(), &[b, n, c]);
            assert!(max_diff(&got, &want)? < 1e-5, "values differ by {}", max_diff(&got, &want)?);
            // A loss that weighs every output differently.
            let r = Tensor::from_vec(vals(b * n * c, 7, 1.0), (b, n, c), &dev)?;
            let g_want = (want * &r)?.sum_all()?.backward()?;
            for _ in 0..2 {
                let g_got = (stack_op(x.as_tensor(), &layers, plans.clone(), relu)? * &r)?.sum_all()?.backward()?;
                for (i, v) in std::iter::once(&x).chain(vars.iter()).enumerate() {
                    let (a, e) = (g_got.get(v).expect("gradient"), g_want.get(v).expect("gradient"));
                    let d = max_diff(a, e)?;
                    let scale = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert!(d <= 1e-4 * (1.0 + scale), "gradient {i} differs by {d} (scale {scale})");
                }
            }
            // Without gradients nothing is kept, and the values are the same.
            let plain = stack_op(&x.as_tensor().detach(), &view(&units, &detached), plans.clone(), relu)?;
            assert!(max_diff(&plain, &got)? < 1e-6);
            // On a pool of one thread (a sweep's job) the parts run in turn: the same bits.
            let pass = || -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
                let y = stack_op(x.as_tensor(), &layers, plans.clone(), relu)?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                let gs = vars.iter().map(|v| grads.get(v).expect("gradient").flatten_all()?.to_vec1::<f32>());
                Ok((y.flatten_all()?.to_vec1::<f32>()?, gs.collect::<Result<_>>()?))
            };
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(candle_core::Error::wrap)?;
            assert!(one.install(pass)? == pass()?, "results depend on the pool");
            // Pooled buffers hold what the last step left there: filled with NaN, the same bits.
            let before = pass()?;
            scratch::fill_pooled(f32::NAN);
            assert!(pass()? == before, "a pooled buffer was read before it was written");
        }
        Ok(())
    }

    /// Weights of the wrong shape are an error that names the layer, not a panic.
    #[test]
    fn mismatched_weights_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let (uv, uh) = taps(true, (30, 30));
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev);
        let (wv, b2, wh, wvh, wo, b1) = (z(&[6, 4])?, z(&[4])?, z(&[1, 4])?, z(&[4, 4])?, z(&[2, 3])?, z(&[2])?);
        let layer = GatedLayer {
            vertical: &uv,
            wv: &wv,
            bv: &b2,
            horizontal: &uh,
            wh: &wh,
            bh: &b2,
            wvh: &wvh,
            bvh: &b2,
            wo: &wo,
            bo: &b1,
        };
        let err = gated_stack(&z(&[1, 900, 1])?, &[layer], false).expect_err("W_o of the wrong shape");
        assert!(err.to_string().contains("layer 0"), "{err}");
        Ok(())
    }
}
