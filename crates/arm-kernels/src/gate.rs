//! The gated unit of the gated PixelCNN (van den Oord et al. 2016, "Conditional Image
//! Generation with PixelCNN Decoders", eq. 2) as a custom candle op with a hand-written
//! backward. Linear layers and convolutions with their bias and LeakyReLU are one op in
//! [`crate::dense`].

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

use crate::gemm::f32s;

const CHUNK: usize = 1 << 14;

/// Gated unit of the gated PixelCNN (van den Oord et al. 2016, eq. 2): a (N, 2C) -> tanh(a[:, :C])
/// * sigmoid(a[:, C:]). As candle ops (two narrows, tanh, sigmoid, mul) the backward pads each
/// half back to 2C with zeros and adds: about ten passes; here one each way.
#[derive(Debug, Clone, Copy)]
struct Gate;

/// d/da of the gate from (a, g): one pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GateGrad;

use crate::fastmath::{gate as gate32, gate_parts};
use multiversion::target::selected_target;

/// (rows, 2C) of an input of shape `dims` (..., 2C).
fn rows_c2(dims: &[usize]) -> Result<(usize, usize)> {
    let c2 = *dims.last().unwrap_or(&0);
    if c2 == 0 || c2 % 2 != 0 {
        bail!("gate: {c2} channels, expected an even number");
    }
    Ok((dims.iter().product::<usize>() / c2, c2))
}

/// tanh(f) sigmoid(g) for rows [f | g] of 2c values. Compiled once per SIMD level and chosen
/// at run time: the crate is built for baseline x86-64, whose loops are only 4 wide.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn gate_rows(out: &mut [f32], a: &[f32], c: usize) {
    const FMA: bool = selected_target!().supports_feature_str("fma");
    for (orow, arow) in out.chunks_mut(c.max(1)).zip(a.chunks(2 * c.max(1))) {
        let (f, g) = arow.split_at(c);
        for ((y, &ff), &gg) in orow.iter_mut().zip(f).zip(g) {
            *y = gate32::<FMA>(ff, gg);
        }
    }
}

/// d/d[f | g] of tanh(f) sigmoid(g) from (tanh f, sigmoid g) and the output gradient.
#[inline(always)]
fn derivative((t, sg): (f32, f32), gr: f32) -> (f32, f32) {
    (gr * sg * (1.0 - t * t), gr * t * sg * (1.0 - sg))
}

/// The gradient of [`gate_rows`] with respect to [f | g], given the output gradient.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn gate_grad_rows(out: &mut [f32], a: &[f32], grad: &[f32], c: usize) {
    const FMA: bool = selected_target!().supports_feature_str("fma");
    let c2 = 2 * c.max(1);
    for ((orow, arow), grow) in out.chunks_mut(c2).zip(a.chunks(c2)).zip(grad.chunks(c.max(1))) {
        let (df, dg) = orow.split_at_mut(c);
        let (f, gt) = arow.split_at(c);
        // Zipped iterators (no index bounds checks), so the loop vectorises.
        for ((df, dg), ((&f, &gt), &gr)) in df.iter_mut().zip(dg.iter_mut()).zip(f.iter().zip(gt).zip(grow)) {
            (*df, *dg) = derivative(gate_parts::<FMA>(f, gt), gr);
        }
    }
}

/// [`gate_rows`] of a + bias (2C, every row), in place of each row [f | g] of `a` leaving
/// [f + b_f | g + b_g], or with `parts` [tanh | sigmoid] of those, from which
/// [`grad_from_parts_rows`] takes the derivative without a transcendental function.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn bias_gate_rows(out: &mut [f32], a: &mut [f32], bias: &[f32], c: usize, parts: bool) {
    const FMA: bool = selected_target!().supports_feature_str("fma");
    let (bf, bg) = bias.split_at(c);
    for (orow, arow) in out.chunks_mut(c.max(1)).zip(a.chunks_mut(2 * c.max(1))) {
        let (f, g) = arow.split_at_mut(c);
        for (((y, f), g), (&b1, &b2)) in orow.iter_mut().zip(f).zip(g).zip(bf.iter().zip(bg)) {
            let (pre_f, pre_g) = (*f + b1, *g + b2);
            let (t, sg) = gate_parts::<FMA>(pre_f, pre_g);
            (*f, *g) = if parts { (t, sg) } else { (pre_f, pre_g) };
            *y = t * sg;
        }
    }
}

/// [`gate_grad_rows`] from rows [tanh f | sigmoid g] (as [`bias_gate_rows`] leaves them).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn grad_from_parts_rows(out: &mut [f32], parts: &[f32], grad: &[f32], c: usize) {
    let c2 = 2 * c.max(1);
    for ((orow, prow), grow) in out.chunks_mut(c2).zip(parts.chunks(c2)).zip(grad.chunks(c.max(1))) {
        let (df, dg) = orow.split_at_mut(c);
        let (t, sg) = prow.split_at(c);
        for ((df, dg), ((&t, &sg), &gr)) in df.iter_mut().zip(dg.iter_mut()).zip(t.iter().zip(sg).zip(grow)) {
            (*df, *dg) = derivative((t, sg), gr);
        }
    }
}

impl CustomOp1 for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c2) = rows_c2(l.shape().dims())?;
        let c = c2 / 2;
        let out = gate_cpu(f32s(s, l, "gate input")?, c);
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = c;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, a: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(a.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GateGrad)?))
    }
}

impl CustomOp2 for GateGrad {
    fn name(&self) -> &'static str {
        "gate_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c2) = rows_c2(l1.shape().dims())?;
        let c = c2 / 2;
        if l2.shape().elem_count() != n * c {
            bail!("gate_grad: gradient {:?} for input {:?}", l2.shape(), l1.shape());
        }
        let (a, g) = (f32s(s1, l1, "gate_grad input")?, f32s(s2, l2, "gate_grad input")?);
        Ok((CpuStorage::F32(gate_grad_cpu(a, g, c)), l1.shape().clone()))
    }
}

/// d/da of the gate for a contiguous (rows, 2C) input `a` and output gradient `g` (rows, C).
pub(crate) fn gate_grad_cpu(a: &[f32], g: &[f32], c: usize) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    gate_grad_into(&mut out, a, g, c);
    out
}

/// [`gate_grad_cpu`] into `out`, of a's length.
pub(crate) fn gate_grad_into(out: &mut [f32], a: &[f32], g: &[f32], c: usize) {
    let c2 = 2 * c;
    let rows_per_chunk = (CHUNK / c2.max(1)).max(1);
    out.par_chunks_mut(rows_per_chunk * c2.max(1))
        .zip(a.par_chunks(rows_per_chunk * c2.max(1)).zip(g.par_chunks(rows_per_chunk * c.max(1))))
        .for_each(|(o, (ai, gi))| gate_grad_rows(o, ai, gi, c));
}

/// tanh(a[:, :C]) sigmoid(a[:, C:]) of a contiguous (rows, 2C) slice, in parallel.
pub(crate) fn gate_cpu(a: &[f32], c: usize) -> Vec<f32> {
    let mut out = vec![0f32; a.len() / (2 * c).max(1) * c];
    gate_into(&mut out, a, c);
    out
}

/// [`gate_cpu`] into `out`, of half a's length.
pub(crate) fn gate_into(out: &mut [f32], a: &[f32], c: usize) {
    let c2 = 2 * c;
    let rows_per_chunk = (CHUNK / c2.max(1)).max(1);
    out.par_chunks_mut(rows_per_chunk * c.max(1))
        .zip(a.par_chunks(rows_per_chunk * c2.max(1)))
        .for_each(|(o, ai)| gate_rows(o, ai, c));
}

/// out = gate(a + bias) with a + bias left in `a`, or with `parts` [tanh | sigmoid] of it for
/// [`gate_grad_from_parts_into`]: the bias and the kept values cost no pass of their own.
pub(crate) fn bias_gate_into(out: &mut [f32], a: &mut [f32], bias: &[f32], c: usize, parts: bool) {
    let rows_per_chunk = (CHUNK / (2 * c).max(1)).max(1);
    out.par_chunks_mut(rows_per_chunk * c.max(1))
        .zip(a.par_chunks_mut(rows_per_chunk * 2 * c.max(1)))
        .for_each(|(o, ai)| bias_gate_rows(o, ai, bias, c, parts));
}

/// tanh(f) sigmoid(g) from rows [tanh f | sigmoid g] (as [`bias_gate_rows`] leaves them): the
/// same product, so the same bits as the gate it made.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn gate_from_parts_rows(out: &mut [f32], parts: &[f32], c: usize) {
    for (orow, prow) in out.chunks_mut(c.max(1)).zip(parts.chunks(2 * c.max(1))) {
        let (t, sg) = prow.split_at(c);
        for (y, (&t, &sg)) in orow.iter_mut().zip(t.iter().zip(sg)) {
            *y = t * sg;
        }
    }
}

/// [`gate_from_parts_rows`] over rows of 2C parts into rows of C.
pub(crate) fn gate_from_parts_into(out: &mut [f32], parts: &[f32], c: usize) {
    let rows_per_chunk = (CHUNK / (2 * c).max(1)).max(1);
    out.par_chunks_mut(rows_per_chunk * c.max(1))
        .zip(parts.par_chunks(rows_per_chunk * 2 * c.max(1)))
        .for_each(|(o, p)| gate_from_parts_rows(o, p, c));
}

/// [`gate_grad_into`] from the parts [tanh f | sigmoid g] instead of a: the same values.
pub(crate) fn gate_grad_from_parts_into(out: &mut [f32], parts: &[f32], g: &[f32], c: usize) {
    let rows_per_chunk = (CHUNK / (2 * c).max(1)).max(1);
    out.par_chunks_mut(rows_per_chunk * 2 * c.max(1))
        .zip(parts.par_chunks(rows_per_chunk * 2 * c.max(1)).zip(g.par_chunks(rows_per_chunk * c.max(1))))
        .for_each(|(o, (pi, gi))| grad_from_parts_rows(o, pi, gi, c));
}

/// The gated unit over the last dimension: (..., 2C) -> (..., C). Fused on CPU for f32.
pub fn gate(a: &Tensor) -> Result<Tensor> {
    let last = a.rank() - 1;
    let c2 = a.dim(last)?;
    if c2 % 2 != 0 {
        bail!("gate: {c2} channels is not even");
    }
    let c = c2 / 2;
    if a.device().is_cpu() && a.dtype() == DType::F32 {
        return a.contiguous()?.apply_op1(Gate);
    }
    a.narrow(last, 0, c)?.tanh()?.mul(&candle_nn::ops::sigmoid(&a.narrow(last, c, c)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gate_equals_candle_ops_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let vals = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i + seed) * 7919 % 613) as f32 - 306.0) / 80.0).collect()
        };
        let (n, c) = (37, 6);
        let z = Var::from_tensor(&Tensor::from_vec(vals(n * 2 * c, 1), (n, 2 * c), &dev)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(vals(2 * c, 2), 2 * c, &dev)?)?;
        let probe = Tensor::from_vec(vals(n * c, 3), (n, c), &dev)?;
        let pre = z.as_tensor().broadcast_add(b.as_tensor())?;
        let fast = gate(&pre)?;
        let slow = pre.narrow(1, 0, c)?.tanh()?.mul(&candle_nn::ops::sigmoid(&pre.narrow(1, c, c)?)?)?;
        let diff =
            |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&fast, &slow)? < 1e-6);
        let gf = (&fast * &probe)?.sum_all()?.backward()?;
        let gs = (&slow * &probe)?.sum_all()?.backward()?;
        for v in [&z, &b] {
            let d = diff(gf.get(v).expect("grad"), gs.get(v).expect("grad"))?;
            assert!(d < 1e-5, "gradient differs by {d}");
        }
        // Hand value: a = (0.5 | 0.0), g = 1: y = tanh(0.5)/2, dy/da_f = (1 - tanh^2)/2, dy/da_g = tanh/4.
        let a = Var::from_tensor(&Tensor::new(&[[0.5f32, 0.0]], &dev)?)?;
        let y = gate(a.as_tensor())?;
        let t = 0.5f32.tanh();
        assert!((y.to_vec2::<f32>()?[0][0] - t / 2.0).abs() < 1e-7);
        let da = y.sum_all()?.backward()?.get(&a).expect("grad").to_vec2::<f32>()?;
        assert!((da[0][0] - (1.0 - t * t) / 2.0).abs() < 1e-7 && (da[0][1] - t / 4.0).abs() < 1e-7);
        // With a bias: the gate of a + bias, a + bias left behind, or [tanh | sigmoid] of it
        // from which the gradient is the gradient from a + bias, bit for bit (both take it from
        // the same parts).
        let (rows, c) = (53, 7);
        let (a, bias, g) = (vals(rows * 2 * c, 5), vals(2 * c, 7), vals(rows * c, 6));
        let biased: Vec<f32> = a.iter().enumerate().map(|(i, v)| v + bias[i % (2 * c)]).collect();
        let want = gate_cpu(&biased, c);
        let (mut sum, mut parts) = (a.clone(), a.clone());
        let (mut y, mut y_parts) = (vec![0f32; rows * c], vec![0f32; rows * c]);
        bias_gate_into(&mut y, &mut sum, &bias, c, false);
        bias_gate_into(&mut y_parts, &mut parts, &bias, c, true);
        assert_eq!(sum, biased);
        assert_eq!(y, y_parts);
        for (i, (got, want)) in y.iter().zip(&want).enumerate() {
            let close = (got - want).abs() <= 2.0 * f32::EPSILON * want.abs();
            assert!(close, "row {} col {}: {got} vs {want}", i / c, i % c);
        }
        let (r, k) = (17, 3);
        assert!((parts[r * 2 * c + k] - biased[r * 2 * c + k].tanh()).abs() < 1e-6, "tanh part");
        let sig = 1.0 / (1.0 + (-biased[r * 2 * c + c + k]).exp());
        assert!((parts[r * 2 * c + c + k] - sig).abs() < 1e-6, "sigmoid part");
        let mut from_parts = vec![0f32; rows * 2 * c];
        gate_grad_from_parts_into(&mut from_parts, &parts, &g, c);
        assert_eq!(from_parts, gate_grad_cpu(&biased, &g, c));
        // Rank 3 input is handled over its last dimension.
        let y3 = gate(&Tensor::from_vec(vals(2 * 3 * 4, 4), (2, 3, 4), &dev)?)?;
        assert_eq!(y3.dims(), &[2, 3, 2]);
        Ok(())
    }
}
