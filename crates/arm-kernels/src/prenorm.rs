//! The two residual sublayers of a pre-norm Transformer block (Radford et al. 2019, GPT-2,
//! §2.3; Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture", the
//! Pre-LN block of Fig. 1b), each as one op with a hand-written backward:
//!
//!   attention:  y = h + m . (A(z W_qkv + b_qkv) W_o + b_o),   z = LN(h)
//!   MLP:        y = h + m . (GELU(z W_1 + b_1) W_2 + b_2),     z = LN(h)
//!
//! with A the multi-head attention of [`crate::attention`] on the packed [Q | K | V] and m the
//! dropout mask (1 without dropout). Backward, with g = m . dy:
//!
//!   db_2 = colsum g,  dW_2 = a^T g,  da = g W_2^T,  du = A'(da) or GELU'(u) . da,
//!   db_1 = colsum du,  dW_1 = z^T du,  dz = du W_1^T,  dh = dy + LN'(dz).
//!
//! Why one op: candle's backward zero-fills and adds a gradient for every input of every node.
//! Composed, a block is ten nodes whose inputs add up to fourteen times the residual stream
//! (the (rows, 3C) projection and the (rows, 4C) hidden layer among them); here only dh and
//! the weights' gradients reach candle. The op has three inputs, so a sublayer's weights come
//! as two flat tensors, [gamma, beta, W_1, b_1] and [W_2, b_2], concatenated by
//! [`prenorm_residual`] (a copy of the weights, small beside the activations).

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::attention::{packed_forward, packed_gradient};
use crate::dense::{bias_act, column_sums};
use crate::gemm::{f32s, gemm_into, parallelism, weight_grad, with_slices, View};
use crate::{AttnMask, Result};

/// What sits between the two products.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sublayer {
    /// Multi-head attention on the first product's (rows, 3C) output, `heads` heads.
    Attention { heads: usize, scale: f64, mask: AttnMask },
    /// GELU on the first product's (rows, hidden) output.
    Mlp,
}

/// A sublayer's weights: LN (gamma, beta: (C,)), W_1 (C, F_1), b_1 (F_1,), W_2 (F_2, C),
/// b_2 (C,); F_1 = 3C and F_2 = C for attention, F_1 = F_2 = hidden for the MLP.
#[derive(Debug, Clone, Copy)]
pub struct PreNormWeights<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub w1: &'a Tensor,
    pub b1: &'a Tensor,
    pub w2: &'a Tensor,
    pub b2: &'a Tensor,
}

/// Activations the forward keeps for the backward: z = LN(h), the first product's output
/// (attention: qkv) or the GELU's slopes (MLP), and the input of the second product.
#[derive(Debug, Default)]
struct Saved {
    z: Vec<f32>,
    mid: Vec<f32>,
    act: Vec<f32>,
}

#[derive(Debug, Clone)]
struct PreNorm {
    kind: Sublayer,
    eps: f32,
    /// (rows, C) dropout mask, already scaled by 1 / (1 - p).
    drop: Option<Arc<Vec<f32>>>,
    keep: bool,
    saved: Arc<Mutex<Saved>>,
}

/// Sizes: rows (B T), B, T, C, F_1, F_2.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    n: usize,
    b: usize,
    t: usize,
    c: usize,
    f1: usize,
    f2: usize,
}

/// y (n x m) = x (n x k) w (k x m), or with `wt` w^T where w is stored (m x k).
fn product(x: &[f32], w: &[f32], (n, k, m): (usize, usize, usize), wt: bool) -> Result<Vec<f32>> {
    let mut y = vec![0f32; n * m];
    let rhs = if wt { View::new(w, 0, 1, k) } else { View::new(w, 0, m, 1) };
    gemm_into(&mut y, 0, m, (n, m, k), View::new(x, 0, k, 1), rhs, false, parallelism())?;
    Ok(y)
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("prenorm: poisoned activation store".into())
}

impl PreNorm {
    fn sizes(&self, lh: &Layout, l1: &Layout, l2: &Layout) -> Result<Sizes> {
        let (b, t, c) = lh.shape().dims3()?;
        let (p1, p2) = (l1.shape().elem_count(), l2.shape().elem_count());
        // p1 = 2C + (C + 1) F_1, p2 = (F_2 + 1) C.
        let f1 = p1.checked_sub(2 * c).filter(|r| c > 0 && r % (c + 1) == 0).map(|r| r / (c + 1));
        let f2 = p2.checked_sub(c).filter(|r| c > 0 && r % c == 0).map(|r| r / c);
        let (Some(f1), Some(f2)) = (f1, f2) else {
            bail!("prenorm: weights of {p1} and {p2} values for a residual stream of {c}");
        };
        let ok = match self.kind {
            Sublayer::Attention { heads, .. } => f1 == 3 * c && f2 == c && heads > 0 && c % heads == 0,
            Sublayer::Mlp => f1 == f2,
        };
        if !ok {
            bail!("prenorm: {:?} with C = {c}, F_1 = {f1}, F_2 = {f2}", self.kind);
        }
        if self.drop.as_ref().is_some_and(|m| m.len() != b * t * c) {
            bail!("prenorm: dropout mask for another shape than ({b}, {t}, {c})");
        }
        Ok(Sizes { n: b * t, b, t, c, f1, f2 })
    }

    /// (gamma, beta, W_1, b_1) and (W_2, b_2) out of the flat weights.
    fn split<'a>(s: Sizes, p1: &'a [f32], p2: &'a [f32]) -> ([&'a [f32]; 4], [&'a [f32]; 2]) {
        let (gamma, rest) = p1.split_at(s.c);
        let (beta, rest) = rest.split_at(s.c);
        let (w1, b1) = rest.split_at(s.c * s.f1);
        let (w2, b2) = p2.split_at(s.f2 * s.c);
        ([gamma, beta, w1, b1], [w2, b2])
    }
}

impl CustomOp3 for PreNorm {
    fn name(&self) -> &'static str {
        "prenorm_residual"
    }

    fn cpu_fwd(
        &self,
        sh: &CpuStorage,
        lh: &Layout,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope("prenorm fwd");
        let s = self.sizes(lh, l1, l2)?;
        let h = f32s(sh, lh, "prenorm: h")?;
        let ([gamma, beta, w1, b1], [w2, b2]) =
            Self::split(s, f32s(s1, l1, "prenorm: weights")?, f32s(s2, l2, "prenorm: weights")?);
        let z = crate::layernorm::normalize(h, gamma, beta, self.eps);
        let mut u = product(&z, w1, (s.n, s.c, s.f1), false)?;
        bias_act(&mut u, b1, None);
        let (mid, act) = match self.kind {
            Sublayer::Attention { heads, scale, mask } => {
                let a = packed_forward(&u, (s.b, s.t, s.c), heads, scale as f32, mask)?;
                (u, a)
            }
            // The slopes only when a backward will read them.
            Sublayer::Mlp if self.keep => {
                let (g, slopes) = crate::gelu::values_and_slopes(&u);
                (slopes, g)
            }
            Sublayer::Mlp => (Vec::new(), crate::gelu::values(&u)),
        };
        let mut y = product(&act, w2, (s.n, s.f2, s.c), false)?;
        bias_act(&mut y, b2, None);
        let drop = self.drop.as_deref().map(|m| m.as_slice());
        y.par_chunks_mut(1 << 14).zip(h.par_chunks(1 << 14)).enumerate().for_each(|(i, (yc, hc))| match drop {
            Some(m) => yc.iter_mut().zip(hc).zip(&m[i << 14..]).for_each(|((y, &h), &m)| *y = h + m * *y),
            None => yc.iter_mut().zip(hc).for_each(|(y, &h)| *y += h),
        });
        if self.keep {
            *self.saved.lock().map_err(poisoned)? = Saved { z, mid, act };
        }
        Ok((CpuStorage::F32(y), lh.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("prenorm bwd");
        let s = self.sizes(h.layout(), p1.layout(), p2.layout())?;
        let saved = self.saved.lock().map_err(poisoned)?;
        if saved.z.len() != s.n * s.c {
            bail!("prenorm: the forward's activations were not kept for the backward");
        }
        let (dh, dp1, dp2) =
            with_slices(&[h, p1, p2, dy], "prenorm", |v| self.backward(s, &saved, v[0], (v[1], v[2]), v[3]))?;
        let dev = h.device();
        Ok((
            Some(Tensor::from_vec(dh, h.shape(), dev)?),
            Some(Tensor::from_vec(dp1, p1.shape(), dev)?),
            Some(Tensor::from_vec(dp2, p2.shape(), dev)?),
        ))
    }
}

impl PreNorm {
    fn backward(
        &self,
        s: Sizes,
        saved: &Saved,
        h: &[f32],
        (p1, p2): (&[f32], &[f32]),
        dy: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let ([gamma, _, w1, _], [w2, _]) = Self::split(s, p1, p2);
        let g: std::borrow::Cow<[f32]> = match self.drop.as_deref() {
            Some(m) => dy.iter().zip(m.iter()).map(|(d, m)| d * m).collect::<Vec<f32>>().into(),
            None => dy.into(),
        };
        let mut dp2 = weight_grad(&g, s.c, View::new(&saved.act, 0, s.f2, 1), s.f2, s.n)?; // dW_2 (F_2, C)
        dp2.extend(column_sums(&g, s.c)); // db_2
        let da = product(&g, w2, (s.n, s.c, s.f2), true)?; // g W_2^T: (rows, F_2)
        let du = match self.kind {
            Sublayer::Attention { heads, scale, mask } => {
                packed_gradient(&saved.mid, &saved.act, &da, (s.b, s.t, s.c), heads, scale as f32, mask)?
            }
            Sublayer::Mlp => da.iter().zip(&saved.mid).map(|(d, k)| d * k).collect(),
        };
        let dw1 = weight_grad(&du, s.f1, View::new(&saved.z, 0, s.c, 1), s.c, s.n)?; // (C, F_1)
        let db1 = column_sums(&du, s.f1);
        let dz = product(&du, w1, (s.n, s.f1, s.c), true)?; // du W_1^T: (rows, C)
        let mut dh = vec![0f32; s.n * s.c];
        let mut dp1 = vec![0f32; 2 * s.c];
        crate::layernorm::gradient_into(&mut dh, &mut dp1, h, gamma, &dz, self.eps);
        dh.par_chunks_mut(1 << 14).zip(dy.par_chunks(1 << 14)).for_each(|(a, b)| crate::simd::add_assign(a, b));
        dp1.extend(dw1);
        dp1.extend(db1);
        Ok((dh, dp1, dp2))
    }
}

/// h + m . sublayer(LN(h)) over h (B, T, C): one op on CPU for f32 (see the module header),
/// composed from the other fused ops elsewhere. `drop`: the dropout mask of h's shape, scaled.
pub fn prenorm_residual(
    h: &Tensor,
    w: PreNormWeights,
    kind: Sublayer,
    eps: f64,
    drop: Option<&Tensor>,
) -> Result<Tensor> {
    let params = [w.gamma, w.beta, w.w1, w.b1, w.w2, w.b2];
    let fused = h.device().is_cpu() && h.dtype() == DType::F32 && params.iter().all(|t| t.dtype() == DType::F32);
    if !fused {
        return prenorm_composed(h, w, kind, eps, drop);
    }
    let flat = |ts: &[&Tensor]| -> Result<Tensor> {
        Tensor::cat(&ts.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0)
    };
    let (p1, p2) = (flat(&params[..4])?, flat(&params[4..])?);
    let drop = drop.map(|m| m.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?.map(Arc::new);
    let keep = h.track_op() || p1.track_op() || p2.track_op();
    let op = PreNorm { kind, eps: eps as f32, drop, keep, saved: Arc::default() };
    h.contiguous()?.apply_op3(&p1, &p2, op)
}

/// The same from the other fused ops: the reference of the tests and the path off the CPU.
pub fn prenorm_composed(
    h: &Tensor,
    w: PreNormWeights,
    kind: Sublayer,
    eps: f64,
    drop: Option<&Tensor>,
) -> Result<Tensor> {
    let z = crate::layer_norm(h, w.gamma, w.beta, eps)?;
    let branch = match kind {
        Sublayer::Attention { heads, scale, mask } => {
            let qkv = crate::dense(&z, w.w1, w.b1, None, None)?;
            crate::dense(&crate::attention_packed(&qkv, heads, scale, mask)?, w.w2, w.b2, None, None)?
        }
        Sublayer::Mlp => crate::dense(&crate::dense_gelu(&z, w.w1, w.b1)?, w.w2, w.b2, None, None)?,
    };
    let branch = match drop {
        Some(m) => branch.mul(m)?,
        None => branch,
    };
    h + branch
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    fn var(shape: &[usize], scale: f64, dev: &Device) -> Result<Var> {
        Var::from_tensor(&(Tensor::randn(0f32, 1.0, shape, dev)? * scale)?)
    }

    /// Both sublayers, with and without a dropout mask, against the composed ops in values and
    /// in the gradients of h and of all six weights; twice (the kept activations are read,
    /// not consumed); without gradients the values are the same.
    #[test]
    fn fused_sublayers_equal_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (b, t, c, heads, hidden) in [(2, 5, 6, 3, 8), (3, 70, 8, 2, 16)] {
            let scale = 1.0 / ((c / heads) as f64).sqrt();
            for kind in [Sublayer::Attention { heads, scale, mask: AttnMask::Causal }, Sublayer::Mlp] {
                let (f1, f2) = match kind {
                    Sublayer::Attention { .. } => (3 * c, c),
                    Sublayer::Mlp => (hidden, hidden),
                };
                let h = var(&[b, t, c], 1.0, &dev)?;
                let gamma = Var::from_tensor(&(Tensor::randn(0f32, 0.1, c, &dev)? + 1.0)?)?;
                let beta = var(&[c], 0.1, &dev)?;
                let (w1, b1) = (var(&[c, f1], 0.5, &dev)?, var(&[f1], 0.1, &dev)?);
                let (w2, b2) = (var(&[f2, c], 0.5, &dev)?, var(&[c], 0.1, &dev)?);
                let w = PreNormWeights {
                    gamma: gamma.as_tensor(),
                    beta: beta.as_tensor(),
                    w1: w1.as_tensor(),
                    b1: b1.as_tensor(),
                    w2: w2.as_tensor(),
                    b2: b2.as_tensor(),
                };
                let mask =
                    Tensor::randn(0f32, 1.0, (b, t, c), &dev)?.ge(0.0)?.to_dtype(DType::F32)?.affine(2.0, 0.0)?;
                let probe = Tensor::randn(0f32, 1.0, (b, t, c), &dev)?;
                for drop in [None, Some(&mask)] {
                    let what = format!("{kind:?} ({b}, {t}, {c}) dropout {}", drop.is_some());
                    let fused = prenorm_residual(h.as_tensor(), w, kind, 1e-5, drop)?;
                    let plain = prenorm_composed(h.as_tensor(), w, kind, 1e-5, drop)?;
                    assert!(max_diff(&fused, &plain)? < 1e-5, "{what}: values differ by {}", max_diff(&fused, &plain)?);
                    let gp = (&plain * &probe)?.sum_all()?.backward()?;
                    for pass in 0..2 {
                        let gf = (&fused * &probe)?.sum_all()?.backward()?;
                        for (v, name) in [
                            (&h, "h"),
                            (&gamma, "gamma"),
                            (&beta, "beta"),
                            (&w1, "W1"),
                            (&b1, "b1"),
                            (&w2, "W2"),
                            (&b2, "b2"),
                        ] {
                            let d = max_diff(gf.get(v).expect("grad"), gp.get(v).expect("grad"))?;
                            assert!(d < 1e-4, "{what} pass {pass}: d{name} differs by {d}");
                        }
                    }
                    let detached = PreNormWeights {
                        gamma: &w.gamma.detach(),
                        beta: &w.beta.detach(),
                        w1: &w.w1.detach(),
                        b1: &w.b1.detach(),
                        w2: &w.w2.detach(),
                        b2: &w.b2.detach(),
                    };
                    let no_grad = prenorm_residual(&h.as_tensor().detach(), detached, kind, 1e-5, drop)?;
                    assert_eq!(max_diff(&no_grad, &fused)?, 0.0, "{what}: without gradients");
                }
            }
        }
        Ok(())
    }

    /// Mismatched weights are an error, not a panic.
    #[test]
    fn mismatched_weights_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev);
        let (h, g, w1, b1, w2, b2) = (t(&[1, 3, 4])?, t(&[4])?, t(&[4, 10])?, t(&[10])?, t(&[4, 4])?, t(&[4])?);
        let w = PreNormWeights { gamma: &g, beta: &g, w1: &w1, b1: &b1, w2: &w2, b2: &b2 };
        let kind = Sublayer::Attention { heads: 2, scale: 1.0, mask: AttnMask::Causal };
        let e = prenorm_residual(&h, w, kind, 1e-5, None).expect_err("W_1 of 10 columns for 3C = 12");
        assert!(e.to_string().contains("prenorm"), "{e}");
        Ok(())
    }
}
