//! Exclusive prefix sums along the sequence: y[:, d] = sum_{j<d} x[:, j] for x (B, D, H), the
//! running hidden pre-activation of NADE (Larochelle & Murray 2011, eq. 3: a_d = c +
//! W_{.,<d} x_{<d}) in O(B D H). Candle's `cumsum` is a product with a (D, D) triangle,
//! O(B D^2 H). The backward is the reverse exclusive sum: dx[:, j] = sum_{d>j} dy[:, d].

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// y[b, d, :] = sum_{j < d} x[b, j, :] (zeros at d = 0), or the sum over j > d when `reverse`.
#[derive(Debug, Clone, Copy)]
struct PrefixSum {
    reverse: bool,
}

fn prefix_cpu(x: &[f32], (d, h): (usize, usize), reverse: bool) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut((d * h).max(1)).zip(x.par_chunks((d * h).max(1))).for_each(|(yb, xb)| {
        let mut acc = vec![0f32; h];
        let steps: Box<dyn Iterator<Item = usize>> = if reverse { Box::new((0..d).rev()) } else { Box::new(0..d) };
        for t in steps {
            yb[t * h..(t + 1) * h].copy_from_slice(&acc);
            for (a, v) in acc.iter_mut().zip(&xb[t * h..(t + 1) * h]) {
                *a += v;
            }
        }
    });
    y
}

impl CustomOp1 for PrefixSum {
    fn name(&self) -> &'static str {
        "exclusive_prefix_sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, d, h) = l.shape().dims3()?;
        let x = crate::cpu_f32(s, l, "prefix sum: input")?;
        Ok((CpuStorage::F32(prefix_cpu(x, (d, h), self.reverse)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = PrefixSum { reverse: !self.reverse };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// The (D, D) matrix T with T[d, j] = 1 where j < d (or j > d when `reverse`).
fn triangle(d: usize, reverse: bool, like: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = (0..d * d).map(|i| f32::from(if reverse { i % d > i / d } else { i % d < i / d })).collect();
    Tensor::from_vec(v, (d, d), like.device())?.to_dtype(like.dtype())
}

/// Exclusive prefix sum along dimension 1 of x (B, D, H): y[:, d] = sum_{j<d} x[:, j].
/// One O(B D H) op on the CPU (f32); elsewhere a product with a triangle of ones.
pub fn exclusive_cumsum(x: &Tensor) -> Result<Tensor> {
    let (b, d, _) = x.dims3()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(PrefixSum { reverse: false });
    }
    if d == 0 {
        bail!("exclusive_cumsum: empty sequence");
    }
    triangle(d, false, x)?.unsqueeze(0)?.broadcast_as((b, d, d))?.contiguous()?.matmul(&x.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against the product with a triangle of ones, in values and in the input's gradient.
    #[test]
    fn prefix_sum_equals_the_triangle_product_in_values_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (b, d, h) in [(1, 1, 1), (2, 5, 3), (3, 17, 8)] {
            let v: Vec<f32> = (0..b * d * h).map(|i| ((i * 7919 % 613) as f32 - 306.0) / 100.0).collect();
            let x = Var::from_tensor(&Tensor::from_vec(v, (b, d, h), &dev)?)?;
            let probe: Vec<f32> = (0..b * d * h).map(|i| (i % 11) as f32 - 5.0).collect();
            let probe = Tensor::from_vec(probe, (b, d, h), &dev)?;
            let fast = exclusive_cumsum(x.as_tensor())?;
            let tri = triangle(d, false, x.as_tensor())?.unsqueeze(0)?.broadcast_as((b, d, d))?.contiguous()?;
            let slow = tri.matmul(x.as_tensor())?;
            let diff = |a: &Tensor, c: &Tensor| -> Result<f32> { (a - c)?.abs()?.flatten_all()?.max(0)?.to_scalar() };
            assert!(diff(&fast, &slow)? < 1e-4, "values ({b}, {d}, {h})");
            // Row 0 is zero, row 1 is x[:, 0].
            assert_eq!(fast.narrow(1, 0, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
            let gf = (&fast * &probe)?.sum_all()?.backward()?;
            let gs = (&slow * &probe)?.sum_all()?.backward()?;
            assert!(diff(gf.get(&x).expect("grad"), gs.get(&x).expect("grad"))? < 1e-4, "gradient ({b}, {d}, {h})");
        }
        Ok(())
    }
}
