//! Fused element-wise ops for the hot path of convolutional plugins, as custom candle ops with
//! hand-written backward passes. candle composes LeakyReLU from max(x, a x), whose backward
//! builds equality masks and divides by their sum: about a dozen passes over the activations
//! per layer where one suffices.
//!
//! `bias_leaky_relu(z, b, slope)` = LeakyReLU(z + b) for z (N, C), b (C,). Its backward uses
//! the output's sign (equal to the pre-activation's for slope > 0): dz = g * (y > 0 ? 1 : slope),
//! db = sum over rows of dz.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use arm_core::Result;

use crate::layers::leaky_relu;

#[derive(Debug, Clone, Copy)]
struct BiasLeakyRelu {
    slope: f32,
}

/// dz from (grad, output): one pass.
#[derive(Debug, Clone, Copy)]
struct LeakyReluGrad {
    slope: f32,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { bail!("{op}: only f32 is supported") };
    let Some((a, z)) = l.contiguous_offsets() else { bail!("{op}: input must be contiguous") };
    Ok(&v[a..z])
}

const CHUNK: usize = 1 << 14;

impl CustomOp2 for BiasLeakyRelu {
    fn name(&self) -> &'static str {
        "bias_leaky_relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c) = l1.shape().dims2()?;
        if l2.shape().dims1()? != c {
            bail!("bias_leaky_relu: bias of {} for {c} channels", l2.shape().dims1()?);
        }
        let (z, b) = (slice(s1, l1, "bias_leaky_relu")?, slice(s2, l2, "bias_leaky_relu")?);
        let slope = self.slope;
        let mut out = vec![0f32; z.len()];
        // Chunks are whole rows, so the bias index is the column.
        let rows_per_chunk = (CHUNK / c).max(1);
        out.par_chunks_mut(rows_per_chunk * c).zip(z.par_chunks(rows_per_chunk * c)).for_each(|(o, zi)| {
            for (orow, zrow) in o.chunks_mut(c).zip(zi.chunks(c)) {
                for ((y, &x), &bb) in orow.iter_mut().zip(zrow).zip(b) {
                    let v = x + bb;
                    *y = if v > 0.0 { v } else { v * slope };
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _z: &Tensor, _b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = grad.contiguous()?.apply_op2_no_bwd(&res.contiguous()?, &LeakyReluGrad { slope: self.slope })?; // (N, C)
        let db = dz.apply_op1_no_bwd(&ColumnSum)?; // (C,)
        Ok((Some(dz), Some(db)))
    }
}

impl CustomOp2 for LeakyReluGrad {
    fn name(&self) -> &'static str {
        "leaky_relu_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, y) = (slice(s1, l1, "leaky_relu_grad")?, slice(s2, l2, "leaky_relu_grad")?);
        if g.len() != y.len() {
            bail!("leaky_relu_grad: {} gradients for {} outputs", g.len(), y.len());
        }
        let slope = self.slope;
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(y.par_chunks(CHUNK))).for_each(|(o, (gi, yi))| {
            for ((d, &gg), &yy) in o.iter_mut().zip(gi).zip(yi) {
                *d = if yy > 0.0 { gg } else { gg * slope };
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Sum over the rows of (N, C): candle reduces a non-last dimension element by element with
/// strided indexing (measured 4 ms per step of the reference network for its three biases).
/// Partial sums over fixed row blocks, added in block order: deterministic for any thread count.
#[derive(Debug, Clone, Copy)]
struct ColumnSum;

const SUM_ROWS: usize = 256;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column_sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c) = l.shape().dims2()?;
        let z = slice(s, l, "column_sum")?;
        let partials: Vec<Vec<f32>> = z
            .par_chunks(SUM_ROWS * c.max(1))
            .map(|block| {
                let mut acc = vec![0f32; c];
                for row in block.chunks(c.max(1)) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; c];
        for p in &partials {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

/// z + b for z (N, C), b (C,); backward: dz = g, db = column sums of g (see [`ColumnSum`]).
#[derive(Debug, Clone, Copy)]
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias_add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c) = l1.shape().dims2()?;
        if l2.shape().dims1()? != c {
            bail!("bias_add: bias of {} for {c} channels", l2.shape().dims1()?);
        }
        let (z, b) = (slice(s1, l1, "bias_add")?, slice(s2, l2, "bias_add")?);
        let mut out = z.to_vec();
        let rows_per_chunk = (CHUNK / c.max(1)).max(1);
        out.par_chunks_mut(rows_per_chunk * c.max(1)).for_each(|o| {
            for row in o.chunks_mut(c.max(1)) {
                for (y, &bb) in row.iter_mut().zip(b) {
                    *y += bb;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _z: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let db = grad.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(grad), Some(db)))
    }
}

/// z + b over the last dimension of z (..., C), b (C,): fused on CPU for f32, so the bias
/// gradient is a [`ColumnSum`] rather than candle's broadcast backward.
pub fn bias_add(z: &Tensor, b: &Tensor) -> Result<Tensor> {
    let c = b.dim(0)?;
    if z.device().is_cpu() && z.dtype() == DType::F32 && z.dim(z.rank() - 1)? == c {
        let rows = z.elem_count() / c.max(1);
        let y = z.contiguous()?.reshape((rows, c))?.apply_op2(&b.contiguous()?, BiasAdd)?;
        return y.reshape(z.shape());
    }
    z.broadcast_add(b)
}

/// Gated unit of the gated PixelCNN (van den Oord et al. 2016, eq. 2): a (N, 2C) -> tanh(a[:, :C])
/// * sigmoid(a[:, C:]). As candle ops (two narrows, tanh, sigmoid, mul) the backward pads each
/// half back to 2C with zeros and adds: about ten passes; here one each way.
#[derive(Debug, Clone, Copy)]
struct Gate;

/// d/da of the gate from (a, g): one pass.
#[derive(Debug, Clone, Copy)]
struct GateGrad;

fn sigmoid32(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp1 for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c2) = l.shape().dims2()?;
        if c2 % 2 != 0 {
            bail!("gate: {c2} channels is not even");
        }
        let c = c2 / 2;
        let a = slice(s, l, "gate")?;
        let mut out = vec![0f32; n * c];
        let rows_per_chunk = (CHUNK / c2.max(1)).max(1);
        out.par_chunks_mut(rows_per_chunk * c.max(1)).zip(a.par_chunks(rows_per_chunk * c2.max(1))).for_each(
            |(o, ai)| {
                for (orow, arow) in o.chunks_mut(c.max(1)).zip(ai.chunks(c2.max(1))) {
                    let (f, g) = arow.split_at(c);
                    for ((y, &ff), &gg) in orow.iter_mut().zip(f).zip(g) {
                        *y = ff.tanh() * sigmoid32(gg);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
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
        let (n, c2) = l1.shape().dims2()?;
        let c = c2 / 2;
        if l2.shape().dims2()? != (n, c) {
            bail!("gate_grad: gradient {:?} for input {:?}", l2.shape(), l1.shape());
        }
        let (a, g) = (slice(s1, l1, "gate_grad")?, slice(s2, l2, "gate_grad")?);
        let mut out = vec![0f32; n * c2];
        let rows_per_chunk = (CHUNK / c2.max(1)).max(1);
        out.par_chunks_mut(rows_per_chunk * c2.max(1))
            .zip(a.par_chunks(rows_per_chunk * c2.max(1)).zip(g.par_chunks(rows_per_chunk * c.max(1))))
            .for_each(|(o, (ai, gi))| {
                for ((orow, arow), grow) in o.chunks_mut(c2.max(1)).zip(ai.chunks(c2.max(1))).zip(gi.chunks(c.max(1))) {
                    let (df, dg) = orow.split_at_mut(c);
                    let (f, gt) = arow.split_at(c);
                    for i in 0..c {
                        let (t, sg) = (f[i].tanh(), sigmoid32(gt[i]));
                        df[i] = grow[i] * sg * (1.0 - t * t);
                        dg[i] = grow[i] * t * sg * (1.0 - sg);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
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
        let mut dims = a.dims().to_vec();
        dims[last] = c;
        let rows = a.elem_count() / c2.max(1);
        return a.contiguous()?.reshape((rows, c2))?.apply_op1(Gate)?.reshape(dims);
    }
    a.narrow(last, 0, c)?.tanh()?.mul(&candle_nn::ops::sigmoid(&a.narrow(last, c, c)?)?)
}

/// LeakyReLU(z + b): z (N, C), b (C,). Fused on CPU for f32 with slope in (0, 1]; the plain
/// composition elsewhere (a zero slope would make the output's sign ambiguous for the backward).
pub fn bias_leaky_relu(z: &Tensor, b: &Tensor, slope: f64) -> Result<Tensor> {
    if z.device().is_cpu() && z.dtype() == DType::F32 && slope > 0.0 && slope <= 1.0 {
        return z.contiguous()?.apply_op2(&b.contiguous()?, BiasLeakyRelu { slope: slope as f32 });
    }
    leaky_relu(&z.broadcast_add(b)?, slope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_equals_composed_in_values_and_gradients() -> Result<()> {
        let z = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0, 2.0], [-0.25, 0.1, -3.0]], &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.1f32, 0.2, -2.5], &Device::Cpu)?)?;
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.5, 4.0]], &Device::Cpu)?;
        let slope = 0.01;
        let fast = bias_leaky_relu(z.as_tensor(), b.as_tensor(), slope)?;
        let slow = leaky_relu(&z.as_tensor().broadcast_add(b.as_tensor())?, slope)?;
        assert_eq!(fast.to_vec2::<f32>()?, slow.to_vec2::<f32>()?);
        // python: y = z + b; dz = w * (y > 0 ? 1 : 0.01); db = dz.sum(0)
        let gf = (&fast * &w)?.sum_all()?.backward()?;
        let gs = (&slow * &w)?.sum_all()?.backward()?;
        for v in [&z, &b] {
            let (a, c) = (
                gf.get(v).expect("grad").flatten_all()?.to_vec1::<f32>()?,
                gs.get(v).expect("grad").flatten_all()?.to_vec1::<f32>()?,
            );
            for (x, y) in a.iter().zip(&c) {
                assert!((x - y).abs() < 1e-6, "{a:?} vs {c:?}");
            }
        }
        // Hand values for row 0: y = [0.6, -0.8, -0.5] -> dz = [1, 0.02, 0.03].
        let dz = gf.get(&z).expect("grad").to_vec2::<f32>()?;
        assert!((dz[0][0] - 1.0).abs() < 1e-7 && (dz[0][1] - 0.02).abs() < 1e-7 && (dz[0][2] - 0.03).abs() < 1e-7);
        Ok(())
    }

    #[test]
    fn column_sum_equals_candle_sum_over_rows() -> Result<()> {
        for (n, c) in [(1, 1), (3, 5), (700, 3), (513, 64)] {
            let v: Vec<f32> = (0..n * c).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let z = Tensor::from_vec(v, (n, c), &Device::Cpu)?;
            let fast = z.apply_op1_no_bwd(&ColumnSum)?.to_vec1::<f32>()?;
            let slow = z.sum(0)?.to_vec1::<f32>()?;
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{n}x{c}: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn bias_add_and_gate_equal_candle_ops_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let vals = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i + seed) * 7919 % 613) as f32 - 306.0) / 80.0).collect()
        };
        let (n, c) = (37, 6);
        let z = Var::from_tensor(&Tensor::from_vec(vals(n * 2 * c, 1), (n, 2 * c), &dev)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(vals(2 * c, 2), 2 * c, &dev)?)?;
        let probe = Tensor::from_vec(vals(n * c, 3), (n, c), &dev)?;
        let fast = gate(&bias_add(z.as_tensor(), b.as_tensor())?)?;
        let pre = z.as_tensor().broadcast_add(b.as_tensor())?;
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
        // Rank 3 input is handled over its last dimension.
        let y3 = gate(&Tensor::from_vec(vals(2 * 3 * 4, 4), (2, 3, 4), &dev)?)?;
        assert_eq!(y3.dims(), &[2, 3, 2]);
        Ok(())
    }
}
