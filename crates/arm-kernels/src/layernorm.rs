//! Layer normalisation over the last dimension (Ba et al. 2016, eq. 4) as one custom op with a
//! hand-written backward:
//!
//!   x^ = (x - mean(x)) r,   r = 1 / sqrt(var(x) + eps),   y = x^ gamma + beta,
//!   dx = r (gy - mean(gy) - x^ mean(gy x^)),   gy = dy gamma,
//!   dgamma = sum_rows dy x^,   dbeta = sum_rows dy.
//!
//! Composed from candle ops the forward is seven nodes and the backward of each zero-fills and
//! adds a gradient the size of x (the backward cost four times the forward); here each
//! direction is one parallel pass over the rows.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::gemm::f32s;
use crate::Result;

/// Rows per parallel task.
const ROWS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct LayerNorm {
    eps: f32,
}

/// (x, gamma, dy) -> [dx | dgamma | dbeta] packed in one flat tensor.
#[derive(Debug, Clone, Copy)]
struct LayerNormGrad {
    eps: f32,
}

/// Lanes of the row reductions: sums kept per lane so that the loops vectorise (one running
/// sum is a sequential dependency the compiler may not reorder).
const L: usize = 16;

/// sum_i f(x_i), in L lanes.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        acc.iter_mut().zip(c).for_each(|(a, &v)| *a += f(v));
    }
    chunks.remainder().iter().map(|&v| f(v)).sum::<f32>() + acc.iter().sum::<f32>()
}

/// Mean and 1 / sqrt(var + eps) of one row (biased variance).
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len().max(1) as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// (sum_i dy_i g_i, sum_i dy_i g_i x^_i) of one row, x^_i = (x_i - mean) r, in L lanes.
#[inline(always)]
fn grad_sums(x: &[f32], dy: &[f32], gamma: &[f32], mean: f32, r: f32) -> (f32, f32) {
    let (mut a, mut b) = ([0f32; L], [0f32; L]);
    let (xc, dc, gc) = (x.chunks_exact(L), dy.chunks_exact(L), gamma.chunks_exact(L));
    let tail = x.len() - xc.remainder().len();
    for ((xs, ds), gs) in xc.zip(dc).zip(gc) {
        for i in 0..L {
            let dg = ds[i] * gs[i];
            a[i] += dg;
            b[i] += dg * (xs[i] - mean) * r;
        }
    }
    let (mut sa, mut sb) = (a.iter().sum::<f32>(), b.iter().sum::<f32>());
    for i in tail..x.len() {
        let dg = dy[i] * gamma[i];
        sa += dg;
        sb += dg * (x[i] - mean) * r;
    }
    (sa, sb)
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn norm_rows(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let c = gamma.len().max(1);
    for (o, xr) in out.chunks_mut(c).zip(x.chunks(c)) {
        let (mean, r) = moments(xr, eps);
        for (((y, &v), &g), &b) in o.iter_mut().zip(xr).zip(gamma).zip(beta) {
            *y = (v - mean) * r * g + b;
        }
    }
}

/// dx of the rows in place in `dx`; dgamma and dbeta of these rows added to `dgb` (2C).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn grad_rows(dx: &mut [f32], dgb: &mut [f32], x: &[f32], gamma: &[f32], dy: &[f32], eps: f32) {
    let c = gamma.len().max(1);
    let (dgamma, dbeta) = dgb.split_at_mut(c);
    for ((dxr, xr), dyr) in dx.chunks_mut(c).zip(x.chunks(c)).zip(dy.chunks(c)) {
        let (mean, r) = moments(xr, eps);
        let (m_gy, m_gyx) = grad_sums(xr, dyr, gamma, mean, r);
        let (m_gy, m_gyx) = (m_gy / c as f32, m_gyx / c as f32);
        for (((((o, &v), &d), &g), dg), db) in
            dxr.iter_mut().zip(xr).zip(dyr).zip(gamma).zip(dgamma.iter_mut()).zip(dbeta.iter_mut())
        {
            let xh = (v - mean) * r;
            *o = r * (d * g - m_gy - xh * m_gyx);
            *dg += d * xh;
            *db += d;
        }
    }
}

/// The rows of x (row length = gamma's) normalised: x^ gamma + beta, in parallel blocks of rows.
pub(crate) fn normalize(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let c = gamma.len().max(1);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(ROWS * c).zip(x.par_chunks(ROWS * c)).for_each(|(o, xi)| norm_rows(o, xi, gamma, beta, eps));
    out
}

/// dx of [`normalize`] into `dx`, and [dgamma | dbeta] into `dgb` (2C), from x and dy.
pub(crate) fn gradient_into(dx: &mut [f32], dgb: &mut [f32], x: &[f32], gamma: &[f32], dy: &[f32], eps: f32) {
    let c = gamma.len().max(1);
    // Each task returns its rows' dgamma and dbeta; the partial sums are added in order.
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c).zip(dy.par_chunks(ROWS * c)))
        .map(|(o, (xi, di))| {
            let mut part = vec![0f32; 2 * c];
            grad_rows(o, &mut part, xi, gamma, di, eps);
            part
        })
        .collect();
    dgb.fill(0.0);
    for part in partials {
        for (acc, v) in dgb.iter_mut().zip(part) {
            *acc += v;
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
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
        let (x, gamma, beta) =
            (f32s(s1, l1, "layer_norm x")?, f32s(s2, l2, "layer_norm gamma")?, f32s(s3, l3, "layer_norm beta")?);
        let c = gamma.len();
        if c == 0 || beta.len() != c || x.len() % c != 0 {
            bail!("layer_norm: x {:?}, gamma {:?}, beta {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        Ok((CpuStorage::F32(normalize(x, gamma, beta, self.eps)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = gamma.elem_count();
        let n = x.elem_count();
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &gamma.contiguous()?,
            &grad.contiguous()?,
            &LayerNormGrad { eps: self.eps },
        )?; // (N C + 2 C,)
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, c)?.reshape(gamma.shape())?;
        let dbeta = packed.narrow(0, n + c, c)?.reshape(gamma.shape())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer_norm_grad"
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
        let (x, gamma, dy) = (
            f32s(s1, l1, "layer_norm_grad x")?,
            f32s(s2, l2, "layer_norm_grad gamma")?,
            f32s(s3, l3, "layer_norm_grad dy")?,
        );
        let c = gamma.len();
        if c == 0 || dy.len() != x.len() || x.len() % c != 0 {
            bail!("layer_norm_grad: x {:?}, gamma {:?}, dy {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let n = x.len();
        let mut out = vec![0f32; n + 2 * c];
        let (dx, dgb) = out.split_at_mut(n);
        gradient_into(dx, dgb, x, gamma, dy, self.eps);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

/// (x - mean) / sqrt(var + eps) * gamma + beta over the last dimension, gamma and beta (C,).
/// Fused on CPU for f32; composed candle ops elsewhere.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let cpu32 = x.device().is_cpu() && [x.dtype(), gamma.dtype(), beta.dtype()].iter().all(|&d| d == DType::F32);
    if cpu32 {
        return x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNorm { eps: eps as f32 });
    }
    composed(x, gamma, beta, eps)
}

/// The same with candle's ops.
fn composed(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)? as f64;
    let centred = x.broadcast_sub(&(x.sum_keepdim(D::Minus1)? / c)?)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / c)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(gamma)?.broadcast_add(beta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn layer_norm_equals_composed_ops_in_values_and_every_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // 3 x 70 rows of 12 (more than one parallel task), with offsets and scales per row.
        let x = (Tensor::randn(0f32, 1.0, (3, 70, 12), &dev)? * 3.0)?.broadcast_add(&Tensor::randn(
            0f32,
            2.0,
            (3, 70, 1),
            &dev,
        )?)?;
        let x = Var::from_tensor(&x)?;
        let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, 12, &dev)?)?;
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, 12, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 70, 12), &dev)?;
        let fast = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5)?;
        let slow = composed(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5)?;
        let diff =
            |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&fast, &slow)? < 1e-5, "values differ by {}", diff(&fast, &slow)?);
        let gf = (&fast * &probe)?.sum_all()?.backward()?;
        let gs = (&slow * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
            let d = diff(gf.get(v).expect("grad"), gs.get(v).expect("grad"))?;
            assert!(d < 1e-4, "d{name} differs by {d}");
        }
        Ok(())
    }
}
