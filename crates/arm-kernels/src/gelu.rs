//! GELU in its tanh form (Hendrycks & Gimpel 2016, "Gaussian Error Linear Units", §2; the form
//! of GPT-2 and candle's `gelu`):
//!
//!   gelu(x) = x/2 (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3),
//!   gelu'(x) = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2),   t = tanh(u),
//!
//! as a custom op with a hand-written backward. candle's own `gelu` runs one scalar tanh per
//! element on one thread and its backward is a chain of a dozen element-wise ops; here each
//! direction is one parallel pass with the vectorisable tanh of [`crate::fastmath`].

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fastmath::tanh as tanh32;
use crate::gemm::f32s;
use crate::Result;

const CHUNK: usize = 1 << 14;
const S: f32 = 0.797_884_6; // sqrt(2/pi)
const A: f32 = 0.044_715;

#[derive(Debug, Clone, Copy)]
struct Gelu;

/// d/dx of GELU from (x, dy): one pass.
#[derive(Debug, Clone, Copy)]
struct GeluGrad;

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn gelu_chunk(out: &mut [f32], x: &[f32]) {
    for (y, &x) in out.iter_mut().zip(x) {
        let t = tanh32(S * (x + A * x * x * x));
        *y = 0.5 * x * (1.0 + t);
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn gelu_grad_chunk(out: &mut [f32], x: &[f32], g: &[f32]) {
    for ((d, &x), &g) in out.iter_mut().zip(x).zip(g) {
        let t = tanh32(S * (x + A * x * x * x));
        let du = S * (1.0 + 3.0 * A * x * x);
        *d = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn gelu_slope_chunk(out: &mut [f32], slope: &mut [f32], x: &[f32]) {
    for ((y, d), &x) in out.iter_mut().zip(slope.iter_mut()).zip(x) {
        let t = tanh32(S * (x + A * x * x * x));
        *y = 0.5 * x * (1.0 + t);
        *d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * S * (1.0 + 3.0 * A * x * x);
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(values(f32s(s, l, "gelu input")?)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("gelu_grad: gradient {:?} for input {:?}", l2.shape(), l1.shape());
        }
        let (x, g) = (f32s(s1, l1, "gelu_grad input")?, f32s(s2, l2, "gelu_grad gradient")?);
        Ok((CpuStorage::F32(gradient(x, g)), l1.shape().clone()))
    }
}

/// gelu(x), element-wise in parallel chunks.
pub(crate) fn values(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, xi)| gelu_chunk(o, xi));
    out
}

/// (gelu(x), gelu'(x)), element-wise in parallel chunks: one tanh per element for both.
pub(crate) fn values_and_slopes(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut out, mut slope) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    out.par_chunks_mut(CHUNK)
        .zip(slope.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((o, d), xi)| gelu_slope_chunk(o, d, xi));
    (out, slope)
}

/// g gelu'(x), element-wise in parallel chunks.
fn gradient(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(o, (xi, gi))| gelu_grad_chunk(o, xi, gi));
    out
}

/// GELU (tanh form), element-wise. Fused on CPU for f32; candle's `gelu` elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Gelu);
    }
    x.gelu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gelu_equals_candle_gelu_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // Values over [-8, 8], past the range where tanh saturates, on both sides of 0.
        let vals: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) / 2_500.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(vals, (200, 200), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (200, 200), &dev)?;
        let (fast, slow) = (gelu(x.as_tensor())?, x.as_tensor().gelu()?);
        let diff =
            |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&fast, &slow)? < 2e-6, "values differ by {}", diff(&fast, &slow)?);
        let gf = (&fast * &probe)?.sum_all()?.backward()?;
        let gs = (&slow * &probe)?.sum_all()?.backward()?;
        let d = diff(gf.get(&x).expect("grad"), gs.get(&x).expect("grad"))?;
        assert!(d < 1e-5, "gradient differs by {d}");
        // Hand values: gelu(0) = 0, gelu'(0) = 1/2; gelu(1) = (1 + tanh(sqrt(2/pi) 1.044715))/2.
        let a = Var::from_tensor(&Tensor::new(&[0f32, 1.0], &dev)?)?;
        let y = gelu(a.as_tensor())?.to_vec1::<f32>()?;
        // python: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715)) = 0.8411919906082768
        assert!(y[0] == 0.0 && (y[1] - 0.841_192).abs() < 1e-6, "{y:?}");
        let da = gelu(a.as_tensor())?.sum_all()?.backward()?.get(&a).expect("grad").to_vec1::<f32>()?;
        assert!((da[0] - 0.5).abs() < 1e-7, "{da:?}");
        Ok(())
    }
}
