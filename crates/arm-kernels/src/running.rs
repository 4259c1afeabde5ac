//! h[b, d, :] = sigmoid(c + sum_{j<d} x[b, j] w[j, :]) for x (B, D), w (D, H), c (H): the hidden
//! units of NADE (Larochelle & Murray 2011, eq. 3), whose pre-activation is a running sum of
//! one rank-1 update per earlier input, as one op with its backward, O(B D H) each way.
//! Composed from candle ops the products x_j w_j, their prefix sum, the bias and the sigmoid
//! are four (B, D, H) graph nodes, and the backward of the broadcasts reduces the batch
//! dimension of a (B, D, H) gradient with strided indexing.
//!
//! Backward, with a = the pre-activations and da = dh h (1 - h): r_j = sum_{d>j} da_d (a
//! running sum from the end), dx[b, j] = r_j . w_j, dw_j = sum_b x[b, j] r_j and
//! dc = sum_{b,d} da_d; the r are kept per image for dw, summed over images in order (no
//! dependence on the thread count).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fastmath::sigmoid;
use crate::gemm::with_f32;
use crate::Result;

#[derive(Debug, Clone, Copy)]
struct RunningSigmoid;

/// (B, D, H) of the inputs, checked.
fn dims(x: &Layout, w: &Layout, c: &Layout) -> Result<(usize, usize, usize)> {
    let (b, d) = x.shape().dims2()?;
    let (d2, h) = w.shape().dims2()?;
    let h2 = c.shape().dims1()?;
    if d2 != d || h2 != h {
        candle_core::bail!("running_sigmoid: x (B, {d}), w ({d2}, {h}), c ({h2}) do not fit");
    }
    Ok((b, d, h))
}

/// One image: ob (D, H) = sigmoid of the running sums, starting from c. Compiled per SIMD level
/// (the crate targets baseline x86-64).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn forward_image(ob: &mut [f32], xb: &[f32], w: &[f32], c: &[f32]) {
    let h = c.len();
    let mut acc = c.to_vec();
    for (t, &xv) in xb.iter().enumerate() {
        for (o, &a) in ob[t * h..(t + 1) * h].iter_mut().zip(&acc) {
            *o = sigmoid(a);
        }
        for (a, &wv) in acc.iter_mut().zip(&w[t * h..(t + 1) * h]) {
            *a += xv * wv;
        }
    }
}

fn forward(x: &[f32], w: &[f32], c: &[f32], (_, d, h): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; x.len() * h];
    out.par_chunks_mut((d * h).max(1)).zip(x.par_chunks(d.max(1))).for_each(|(ob, xb)| forward_image(ob, xb, w, c));
    out
}

/// One image from the end: r_t = sum_{d>t} da_d; dxb[t] = r_t . w_t and dw_t += x_t r_t;
/// returns sum_d da_d. Compiled per SIMD level.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn backward_image(dxb: &mut [f32], dw: &mut [f32], xb: &[f32], w: &[f32], hs: &[f32], g: &[f32]) -> Vec<f32> {
    let h = w.len() / xb.len().max(1);
    let mut r = vec![0f32; h];
    for t in (0..xb.len()).rev() {
        let row = t * h..(t + 1) * h;
        dxb[t] = r.iter().zip(&w[row.clone()]).map(|(a, b)| a * b).sum();
        let xv = xb[t];
        dw[row.clone()].iter_mut().zip(&r).for_each(|(o, &rv)| *o += xv * rv);
        for ((rv, &hv), &gv) in r.iter_mut().zip(&hs[row.clone()]).zip(&g[row]) {
            *rv += gv * hv * (1.0 - hv);
        }
    }
    r
}

/// (dx, dw, dc) from x, w, the output h and its gradient g. Images are taken in fixed blocks,
/// each with its own dw and dc, summed in block order: the result does not depend on which
/// thread ran which block.
fn backward(x: &[f32], w: &[f32], hs: &[f32], g: &[f32], (b, d, h): (usize, usize, usize)) -> [Vec<f32>; 3] {
    let block = b.div_ceil(2 * rayon::current_num_threads().max(1)).max(1);
    let mut dx = vec![0f32; b * d];
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut((block * d).max(1))
        .enumerate()
        .map(|(k, dxs)| {
            let (mut dw, mut dc) = (vec![0f32; d * h], vec![0f32; h]);
            for (i, dxb) in dxs.chunks_mut(d.max(1)).enumerate() {
                let bi = k * block + i;
                let img = bi * d * h..(bi + 1) * d * h;
                let xb = &x[bi * d..(bi + 1) * d];
                let tot = backward_image(dxb, &mut dw, xb, w, &hs[img.clone()], &g[img]);
                dc.iter_mut().zip(&tot).for_each(|(o, v)| *o += v);
            }
            (dw, dc)
        })
        .collect();
    let (mut dw, mut dc) = (vec![0f32; d * h], vec![0f32; h]);
    for (pw, pc) in &partial {
        crate::simd::add_assign(&mut dw, pw);
        crate::simd::add_assign(&mut dc, pc);
    }
    [dx, dw, dc]
}

impl CustomOp3 for RunningSigmoid {
    fn name(&self) -> &'static str {
        "running_sigmoid"
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
        let dm = dims(l1, l2, l3)?;
        let (x, w, c) = (crate::cpu_f32(s1, l1, "x")?, crate::cpu_f32(s2, l2, "w")?, crate::cpu_f32(s3, l3, "c")?);
        let _p = crate::profile::scope("running_sigmoid fwd");
        Ok((CpuStorage::F32(forward(x, w, c, dm)), Shape::from(dm)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("running_sigmoid bwd");
        let (b, d) = x.dims2()?;
        let h = w.dim(1)?;
        let [dx, dw, dc] = with_f32(x, "x", |xs| {
            with_f32(w, "w", |ws| {
                with_f32(res, "output", |hs| with_f32(grad, "gradient", |g| Ok(backward(xs, ws, hs, g, (b, d, h)))))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (b, d), dev)?),
            Some(Tensor::from_vec(dw, (d, h), dev)?),
            Some(Tensor::from_vec(dc, h, dev)?),
        ))
    }
}

/// The composed form: the path off the CPU and the reference of the tests.
fn composed(x: &Tensor, w: &Tensor, c: &Tensor) -> Result<Tensor> {
    let xw = x.unsqueeze(2)?.broadcast_mul(&w.unsqueeze(0)?)?; // (B, D, H): x_j w_j
    candle_nn::ops::sigmoid(&crate::exclusive_cumsum(&xw)?.broadcast_add(c)?)
}

/// h[b, d, :] = sigmoid(c + sum_{j<d} x[b, j] w[j, :]): x (B, D), w (D, H), c (H) -> (B, D, H).
pub fn running_sigmoid(x: &Tensor, w: &Tensor, c: &Tensor) -> Result<Tensor> {
    let cpu = x.device().is_cpu() && [x.dtype(), w.dtype(), c.dtype()].iter().all(|&t| t == DType::F32);
    if cpu {
        return x.contiguous()?.apply_op3(&w.contiguous()?, &c.contiguous()?, RunningSigmoid);
    }
    composed(x, w, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_equals_composed_ops_in_values_and_all_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let vals = |n: usize, s: usize| -> Vec<f32> {
            (0..n).map(|i| (((i + 5 * s) * 7919 % 613) as f32 - 306.0) / 200.0).collect()
        };
        for (b, d, h) in [(1, 1, 1), (2, 5, 3), (3, 12, 17)] {
            let x = Var::from_tensor(&Tensor::from_vec(vals(b * d, 1), (b, d), &dev)?)?;
            let w = Var::from_tensor(&Tensor::from_vec(vals(d * h, 2), (d, h), &dev)?)?;
            let c = Var::from_tensor(&Tensor::from_vec(vals(h, 3), h, &dev)?)?;
            let probe = Tensor::from_vec(vals(b * d * h, 4), (b, d, h), &dev)?;
            let fast = running_sigmoid(x.as_tensor(), w.as_tensor(), c.as_tensor())?;
            let slow = composed(x.as_tensor(), w.as_tensor(), c.as_tensor())?;
            let diff = |p: &Tensor, q: &Tensor| -> Result<f32> { (p - q)?.abs()?.flatten_all()?.max(0)?.to_scalar() };
            assert!(diff(&fast, &slow)? < 1e-6, "values ({b}, {d}, {h})");
            // Position 0 sees nothing: sigmoid(c).
            let first = fast.narrow(1, 0, 1)?.squeeze(1)?; // (B, H)
            let want = candle_nn::ops::sigmoid(c.as_tensor())?.unsqueeze(0)?.broadcast_as((b, h))?;
            assert!(diff(&first, &want)? < 1e-6);
            let gf = (&fast * &probe)?.sum_all()?.backward()?;
            let gs = (&slow * &probe)?.sum_all()?.backward()?;
            for (v, name) in [(&x, "dx"), (&w, "dw"), (&c, "dc")] {
                let e = diff(gf.get(v).expect("grad"), gs.get(v).expect("grad"))?;
                assert!(e < 1e-5, "{name} ({b}, {d}, {h}) differs by {e}");
            }
        }
        Ok(())
    }
}
