//! softmax over the last dimension as one custom op with a hand-written backward:
//!
//!   y_i = exp(x_i - max x) / sum_j exp(x_j - max x),   dx_i = y_i (dy_i - sum_j dy_j y_j).
//!
//! -inf inputs (masked attention scores) give exactly 0, so a masked entry contributes nothing
//! to a product with y; every row needs one finite entry. candle's `softmax_last_dim` has no
//! backward and its composed `softmax` is five nodes whose backwards each make a gradient the
//! size of the input; here each direction is one parallel pass over the rows with the
//! vectorisable exp of [`crate::fastmath`].

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::fastmath::exp as exp32;
use crate::gemm::f32s;
use crate::Result;

/// Values per parallel task (whole rows).
const CHUNK: usize = 1 << 14;

#[derive(Debug, Clone, Copy)]
struct Softmax;

/// (y, dy) -> dx.
#[derive(Debug, Clone, Copy)]
struct SoftmaxGrad;

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn softmax_rows(out: &mut [f32], x: &[f32], c: usize) {
    for (o, xr) in out.chunks_mut(c).zip(x.chunks(c)) {
        let max = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f32;
        for (y, &v) in o.iter_mut().zip(xr) {
            // fastmath's exp saturates at exp(-87.3) > 0: a masked (-inf) entry is set to 0.
            let e = if v == f32::NEG_INFINITY { 0.0 } else { exp32(v - max) };
            *y = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        for y in o.iter_mut() {
            *y *= inv;
        }
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn softmax_grad_rows(out: &mut [f32], y: &[f32], dy: &[f32], c: usize) {
    for ((o, yr), gr) in out.chunks_mut(c).zip(y.chunks(c)).zip(dy.chunks(c)) {
        let dot: f32 = yr.iter().zip(gr).map(|(&a, &b)| a * b).sum();
        for ((d, &yv), &g) in o.iter_mut().zip(yr).zip(gr) {
            *d = yv * (g - dot);
        }
    }
}

/// Rows per task for rows of `c` values.
fn chunk(c: usize) -> usize {
    (CHUNK / c.max(1)).max(1) * c.max(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax_last_dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "softmax input")?;
        let c = *l.shape().dims().last().unwrap_or(&0);
        if c == 0 {
            bail!("softmax: empty last dimension in {:?}", l.shape());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(chunk(c)).zip(x.par_chunks(chunk(c))).for_each(|(o, xi)| softmax_rows(o, xi, c));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!("softmax_grad: gradient {:?} for output {:?}", l2.shape(), l1.shape());
        }
        let (y, g) = (f32s(s1, l1, "softmax_grad output")?, f32s(s2, l2, "softmax_grad gradient")?);
        let c = *l1.shape().dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(chunk(c))
            .zip(y.par_chunks(chunk(c)).zip(g.par_chunks(chunk(c))))
            .for_each(|(o, (yi, gi))| softmax_grad_rows(o, yi, gi, c));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// softmax over the last dimension, with a backward. Fused on CPU for f32; candle's composed
/// `softmax` elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Softmax);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_equals_composed_ops_in_values_and_gradients_and_masks_exactly() -> Result<()> {
        let dev = Device::Cpu;
        // 2 x 300 rows of 40 with a causal-style mask: row r keeps its first (r mod 40) + 1 entries.
        let x = (Tensor::randn(0f32, 1.0, (2, 300, 40), &dev)? * 4.0)?;
        let keep: Vec<u8> = (0..2 * 300 * 40).map(|i| u8::from(i % 40 <= (i / 40) % 40)).collect();
        let keep = Tensor::from_vec(keep, (2, 300, 40), &dev)?;
        let ninf = Tensor::new(f32::NEG_INFINITY, &dev)?.broadcast_as((2, 300, 40))?;
        let x = Var::from_tensor(&x)?;
        let masked = keep.where_cond(x.as_tensor(), &ninf)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 300, 40), &dev)?;
        let fast = softmax_last_dim(&masked)?;
        let slow = candle_nn::ops::softmax(&masked, D::Minus1)?;
        let diff =
            |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&fast, &slow)? < 1e-6, "values differ by {}", diff(&fast, &slow)?);
        // Masked entries are exactly 0.
        let zeros = keep.where_cond(&Tensor::zeros((2, 300, 40), DType::F32, &dev)?, &fast)?;
        assert_eq!(zeros.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let gf = (&fast * &probe)?.sum_all()?.backward()?;
        let gs = (&slow * &probe)?.sum_all()?.backward()?;
        let d = diff(gf.get(&x).expect("grad"), gs.get(&x).expect("grad"))?;
        assert!(d < 1e-5, "gradient differs by {d}");
        Ok(())
    }
}
