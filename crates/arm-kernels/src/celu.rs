//! The element-wise units of PixelCNN++'s gated ResNet (Salimans et al. 2017, §2.5 and its
//! code release), as custom ops with hand-written backwards:
//!
//!   concat_elu(x) = [elu(x), elu(-x)]          (..., C) -> (..., 2C)
//!     d/dx = g_1 elu'(x) - g_2 elu'(-x),  elu'(y) = 1 for y > 0, e^y otherwise
//!   glu([a, b]) = a sigmoid(b)                 (..., 2C) -> (..., C)
//!     d/da = g s,  d/db = g a s (1 - s),  s = sigmoid(b)
//!   glu_residual(x, [a, b]) = x + glu([a, b])  (the block's residual sum in the same pass)
//!   concat_elu_masked(x, m) = concat_elu(x) m  (dropout's mask applied in the same pass)
//!
//! Composed from candle ops, concat_elu is a negation, a concatenation and an ELU (whose
//! backward builds five more nodes), and the gate two narrows, a sigmoid and a product whose
//! backward pads each half back with zeros: about ten passes over the activations each way.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::fastmath::{exp as exp32, sigmoid as sigmoid32};
use crate::gemm::f32s;
use crate::Result;

const CHUNK: usize = 1 << 14;

#[derive(Debug, Clone, Copy)]
struct ConcatElu;

#[derive(Debug, Clone, Copy)]
struct ConcatEluGrad;

#[derive(Debug, Clone, Copy)]
struct Glu;

#[derive(Debug, Clone, Copy)]
struct GluGrad;

/// concat_elu(x) * mask: dropout on the unit's output in the same pass.
#[derive(Debug, Clone, Copy)]
struct ConcatEluMasked;

/// x + glu(a): the gated ResNet's residual sum inside the gate's pass.
#[derive(Debug, Clone, Copy)]
struct GluResidual;

#[inline(always)]
fn elu(y: f32) -> f32 {
    if y > 0.0 {
        y
    } else {
        exp32(y) - 1.0
    }
}

#[inline(always)]
fn elu_grad(y: f32) -> f32 {
    if y > 0.0 {
        1.0
    } else {
        exp32(y)
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn concat_elu_rows(out: &mut [f32], x: &[f32], c: usize) {
    for (orow, xrow) in out.chunks_mut(2 * c).zip(x.chunks(c)) {
        let (pos, neg) = orow.split_at_mut(c);
        for ((p, n), &v) in pos.iter_mut().zip(neg.iter_mut()).zip(xrow) {
            *p = elu(v);
            *n = elu(-v);
        }
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn concat_elu_grad_rows(out: &mut [f32], x: &[f32], g: &[f32], c: usize) {
    for ((orow, xrow), grow) in out.chunks_mut(c).zip(x.chunks(c)).zip(g.chunks(2 * c)) {
        let (g1, g2) = grow.split_at(c);
        for ((d, &v), (&a, &b)) in orow.iter_mut().zip(xrow).zip(g1.iter().zip(g2)) {
            *d = a * elu_grad(v) - b * elu_grad(-v);
        }
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn glu_rows(out: &mut [f32], x: &[f32], c: usize) {
    for (orow, xrow) in out.chunks_mut(c).zip(x.chunks(2 * c)) {
        let (a, b) = xrow.split_at(c);
        for (y, (&a, &b)) in orow.iter_mut().zip(a.iter().zip(b)) {
            *y = a * sigmoid32(b);
        }
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn glu_residual_rows(out: &mut [f32], x: &[f32], a: &[f32], c: usize) {
    for ((orow, xrow), arow) in out.chunks_mut(c).zip(x.chunks(c)).zip(a.chunks(2 * c)) {
        let (p, q) = arow.split_at(c);
        for ((y, &x), (&p, &q)) in orow.iter_mut().zip(xrow).zip(p.iter().zip(q)) {
            *y = x + p * sigmoid32(q);
        }
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn glu_grad_rows(out: &mut [f32], x: &[f32], g: &[f32], c: usize) {
    for ((orow, xrow), grow) in out.chunks_mut(2 * c).zip(x.chunks(2 * c)).zip(g.chunks(c)) {
        let (da, db) = orow.split_at_mut(c);
        let (a, b) = xrow.split_at(c);
        for ((da, db), ((&a, &b), &g)) in da.iter_mut().zip(db.iter_mut()).zip(a.iter().zip(b).zip(grow)) {
            let s = sigmoid32(b);
            *da = g * s;
            *db = g * a * s * (1.0 - s);
        }
    }
}

/// (rows, last dimension) of a shape.
fn rows(shape: &Shape) -> (usize, usize) {
    let c = *shape.dims().last().unwrap_or(&1);
    (shape.elem_count() / c.max(1), c)
}

fn with_last(shape: &Shape, c: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = c;
    }
    Shape::from(dims)
}

/// Runs `f(out_rows, in_rows)` over blocks of whole rows in parallel.
fn map_rows(x: &[f32], (n, cin): (usize, usize), cout: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; n * cout];
    let per = (CHUNK / cin.max(cout).max(1)).max(1);
    out.par_chunks_mut(per * cout.max(1)).zip(x.par_chunks(per * cin.max(1))).for_each(|(o, i)| f(o, i));
    out
}

/// Same, with a gradient of `cg` values per row.
fn map_rows2(
    x: &[f32],
    g: &[f32],
    (n, cin): (usize, usize),
    (cg, cout): (usize, usize),
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; n * cout];
    let per = (CHUNK / cin.max(cout).max(1)).max(1);
    out.par_chunks_mut(per * cout.max(1))
        .zip(x.par_chunks(per * cin.max(1)).zip(g.par_chunks(per * cg.max(1))))
        .for_each(|(o, (i, gi))| f(o, i, gi));
    out
}

impl CustomOp1 for ConcatElu {
    fn name(&self) -> &'static str {
        "concat_elu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = rows(l.shape());
        let out = map_rows(f32s(s, l, "concat_elu input")?, (n, c), 2 * c, |o, i| concat_elu_rows(o, i, c));
        Ok((CpuStorage::F32(out), with_last(l.shape(), 2 * c)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ConcatEluGrad)?))
    }
}

impl CustomOp2 for ConcatEluGrad {
    fn name(&self) -> &'static str {
        "concat_elu_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = rows(l1.shape());
        if l2.shape().elem_count() != 2 * n * c {
            bail!("concat_elu_grad: gradient {:?} for input {:?}", l2.shape(), l1.shape());
        }
        let (x, g) = (f32s(s1, l1, "concat_elu_grad input")?, f32s(s2, l2, "concat_elu_grad gradient")?);
        let out = map_rows2(x, g, (n, c), (2 * c, c), |o, i, gi| concat_elu_grad_rows(o, i, gi, c));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

impl CustomOp1 for Glu {
    fn name(&self) -> &'static str {
        "glu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c2) = rows(l.shape());
        let c = c2 / 2;
        let out = map_rows(f32s(s, l, "glu input")?, (n, c2), c, |o, i| glu_rows(o, i, c));
        Ok((CpuStorage::F32(out), with_last(l.shape(), c)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GluGrad)?))
    }
}

impl CustomOp2 for GluGrad {
    fn name(&self) -> &'static str {
        "glu_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c2) = rows(l1.shape());
        let c = c2 / 2;
        if l2.shape().elem_count() != n * c {
            bail!("glu_grad: gradient {:?} for input {:?}", l2.shape(), l1.shape());
        }
        let (x, g) = (f32s(s1, l1, "glu_grad input")?, f32s(s2, l2, "glu_grad gradient")?);
        let out = map_rows2(x, g, (n, c2), (c, c2), |o, i, gi| glu_grad_rows(o, i, gi, c));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

impl CustomOp2 for ConcatEluMasked {
    fn name(&self) -> &'static str {
        "concat_elu_masked"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = rows(l1.shape());
        let out_shape = with_last(l1.shape(), 2 * c);
        if l2.shape() != &out_shape {
            bail!("concat_elu_masked: mask {:?} for input {:?}", l2.shape(), l1.shape());
        }
        let (x, m) = (f32s(s1, l1, "concat_elu_masked input")?, f32s(s2, l2, "concat_elu_masked mask")?);
        let out = map_rows2(x, m, (n, c), (2 * c, 2 * c), |o, xi, mi| {
            concat_elu_rows(o, xi, c);
            o.iter_mut().zip(mi).for_each(|(y, &m)| *y *= m);
        });
        Ok((CpuStorage::F32(out), out_shape))
    }

    fn bwd(&self, x: &Tensor, mask: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = (grad * mask)?;
        Ok((Some(x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &ConcatEluGrad)?), None))
    }
}

impl CustomOp2 for GluResidual {
    fn name(&self) -> &'static str {
        "glu_residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = rows(l1.shape());
        if l2.shape() != &with_last(l1.shape(), 2 * c) {
            bail!("glu_residual: gate input {:?} for residual {:?}", l2.shape(), l1.shape());
        }
        let (x, a) = (f32s(s1, l1, "glu_residual input")?, f32s(s2, l2, "glu_residual gate input")?);
        let out = map_rows2(x, a, (n, c), (2 * c, c), |o, xi, ai| glu_residual_rows(o, xi, ai, c));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, a: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let da = a.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GluGrad)?;
        Ok((Some(grad.clone()), Some(da)))
    }
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// elu([x, -x]) over the last dimension: (..., C) -> (..., 2C). Fused on CPU for f32.
pub fn concat_elu(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        return x.contiguous()?.apply_op1(ConcatElu);
    }
    Tensor::cat(&[x, &x.neg()?], D::Minus1)?.elu(1.0)
}

/// a sigmoid(b) for [a, b] the two halves of the last dimension: (..., 2C) -> (..., C).
pub fn glu(x: &Tensor) -> Result<Tensor> {
    let c2 = x.dim(D::Minus1)?;
    if c2 % 2 != 0 {
        bail!("glu: {c2} channels is not even");
    }
    if fused(x) {
        return x.contiguous()?.apply_op1(Glu);
    }
    let c = c2 / 2;
    x.narrow(D::Minus1, 0, c)? * candle_nn::ops::sigmoid(&x.narrow(D::Minus1, c, c)?)?
}

/// concat_elu(x) * mask, the mask (..., 2C) holding 0 or 1 / (1 - p): dropout after the unit.
pub fn concat_elu_masked(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if fused(x) && fused(mask) {
        return x.contiguous()?.apply_op2(&mask.contiguous()?, ConcatEluMasked);
    }
    concat_elu(x)? * mask
}

/// x + glu(a), x: (..., C), a: (..., 2C): the gated ResNet's output in one pass.
pub fn glu_residual(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    if fused(x) && fused(a) {
        return x.contiguous()?.apply_op2(&a.contiguous()?, GluResidual);
    }
    x + glu(a)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Both ops against candle's composed ops, in values and gradients, over [-6, 6] (both
    /// branches of the ELU) on a 3-d input; rows longer than one parallel chunk included.
    #[test]
    fn fused_units_equal_candle_ops_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (b, n, c) in [(2, 5, 6), (3, 700, 16)] {
            let vals: Vec<f32> = (0..b * n * 2 * c).map(|i| ((i * 7919 % 1201) as f32 - 600.0) / 100.0).collect();
            let x = Var::from_tensor(&Tensor::from_vec(vals, (b, n, 2 * c), &dev)?)?;
            let xt = x.as_tensor();
            let slow_celu = Tensor::cat(&[xt, &xt.neg()?], 2)?.elu(1.0)?;
            let slow_glu = (xt.narrow(2, 0, c)? * candle_nn::ops::sigmoid(&xt.narrow(2, c, c)?)?)?;
            // The residual input is the first half of x itself, so its gradient adds to the gate's.
            let half = xt.narrow(2, c, c)?;
            let slow_res = (&half + &slow_glu)?;
            let fast_res = glu_residual(&half, xt)?;
            let mask = Tensor::from_vec(
                (0..b * n * 4 * c).map(|i| if i % 3 == 0 { 0f32 } else { 1.5 }).collect(),
                (b, n, 4 * c),
                &dev,
            )?;
            let slow_masked = (&slow_celu * &mask)?;
            let fast_masked = concat_elu_masked(xt, &mask)?;
            for (fast, slow) in [
                (concat_elu(xt)?, slow_celu),
                (glu(xt)?, slow_glu),
                (fast_res, slow_res),
                (fast_masked, slow_masked),
            ] {
                assert_eq!(fast.dims(), slow.dims());
                assert!(diff(&fast, &slow)? < 1e-6, "values differ by {}", diff(&fast, &slow)?);
                let probe = Tensor::randn(0f32, 1.0, fast.shape(), &dev)?;
                let gf = (&fast * &probe)?.sum_all()?.backward()?;
                let gs = (&slow * &probe)?.sum_all()?.backward()?;
                let d = diff(gf.get(&x).expect("grad"), gs.get(&x).expect("grad"))?;
                assert!(d < 1e-5, "gradient differs by {d}");
            }
        }
        Ok(())
    }

    /// Hand values: concat_elu(1, -1) = (1, e^-1 - 1 | e^-1 - 1, 1); glu(2 | 0) = 2 sigmoid(0) = 1.
    #[test]
    fn hand_values() -> Result<()> {
        let dev = Device::Cpu;
        let y = concat_elu(&Tensor::new(&[[1f32, -1.0]], &dev)?)?.to_vec2::<f32>()?;
        let m = (-1f32).exp() - 1.0;
        for (got, want) in y[0].iter().zip([1.0, m, m, 1.0]) {
            assert!((got - want).abs() < 1e-7, "{y:?}");
        }
        let a = Var::from_tensor(&Tensor::new(&[[2f32, 0.0]], &dev)?)?;
        let g = glu(a.as_tensor())?;
        assert!((g.to_vec2::<f32>()?[0][0] - 1.0).abs() < 1e-7);
        // d/da = sigmoid(0) = 1/2, d/db = 2 * 1/4 = 1/2.
        let da = g.sum_all()?.backward()?.get(&a).expect("grad").to_vec2::<f32>()?;
        assert!((da[0][0] - 0.5).abs() < 1e-7 && (da[0][1] - 0.5).abs() < 1e-7, "{da:?}");
        Ok(())
    }
}
