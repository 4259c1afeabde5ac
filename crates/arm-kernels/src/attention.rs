//! Masked scaled dot-product attention as one op with a hand-written backward (Vaswani et al.
//! 2017, §3.2.1, eq. 1; the blocked evaluation and the backward that recomputes the scores are
//! those of Dao et al. 2022, "FlashAttention", Alg. 1-2, on CPU):
//!
//!   S = s Q K^T + M,  P = softmax_rows(S),  Y = P V
//!   dV = P^T dY,  dP = dY V^T,  dS = P . (dP - rowsum(dY . Y)),  dQ = s dS K,  dK = s dS^T Q
//!
//! per (batch, head), with M = -inf outside the mask. Query rows go in blocks of [`ROWS`], each
//! against the keys its mask can reach, so at most ROWS x T scores exist per (batch, head) at a
//! time (the T x T matrix of a 28x28 image never does). The backward recomputes each block's
//! scores instead of keeping them.
//!
//! Masks: `Causal` (row i sees keys j <= i), `Strict` (j < i; row 0 sees nothing and is 0,
//! PixelSNAIL's attention, whose keys read the current pixel) and `None`.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::fastmath::exp as exp32;
use crate::gemm::{f32s, gemm_into, View};
use crate::Result;

/// Query rows per block.
pub const ROWS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnMask {
    None,
    Causal,
    Strict,
}

impl AttnMask {
    /// Keys visible to row i of a T-row sequence: 0..limit.
    fn limit(self, i: usize, t: usize) -> usize {
        match self {
            AttnMask::None => t,
            AttnMask::Causal => i + 1,
            AttnMask::Strict => i,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Attention {
    scale: f32,
    mask: AttnMask,
}

/// Sizes: (batch x heads, T, d_k, d_v).
#[derive(Debug, Clone, Copy)]
struct Dims {
    bh: usize,
    t: usize,
    dk: usize,
    dv: usize,
}

fn dims(lq: &Layout, lk: &Layout, lv: &Layout) -> Result<(Dims, Vec<usize>)> {
    let (b, h, t, dk) = lq.shape().dims4()?;
    let (bv, hv, tv, dv) = lv.shape().dims4()?;
    if lk.shape() != lq.shape() || (bv, hv, tv) != (b, h, t) {
        bail!("attention: q {:?}, k {:?}, v {:?}", lq.shape(), lk.shape(), lv.shape());
    }
    Ok((Dims { bh: b * h, t, dk, dv }, vec![b, h, t, dv]))
}

/// P for query rows r0..r0+r of one (batch, head): s q k^T over keys 0..n, masked, softmax
/// per row; rows with no visible key are all zero. `p` is (r x n) row-major.
fn probabilities(p: &mut [f32], q: &[f32], k: &[f32], (r0, r, n): (usize, usize, usize), d: Dims, a: Attention) -> Result<()> {
    gemm_into(p, 0, n, (r, n, d.dk), View::new(q, r0 * d.dk, d.dk, 1), View::new(k, 0, 1, d.dk), false, Parallelism::None)?;
    for (ii, row) in p.chunks_mut(n.max(1)).enumerate().take(r) {
        let lim = a.mask.limit(r0 + ii, d.t).min(n);
        let (seen, hidden) = row.split_at_mut(lim);
        hidden.fill(0.0);
        softmax_scaled(seen, a.scale);
    }
    Ok(())
}

/// row <- softmax(s row) in place (nothing for an empty row).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma+bmi1+bmi2+lzcnt+popcnt",
    "x86_64+avx2+fma",
    "x86_64+sse4.1"
))]
fn softmax_scaled(row: &mut [f32], s: f32) {
    if row.is_empty() {
        return;
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * s;
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = exp32(*v * s - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Keys any row of the block r0..r0+r can see.
fn keys(a: Attention, r0: usize, r: usize, t: usize) -> usize {
    a.mask.limit(r0 + r - 1, t).min(t)
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d, out_dims) = dims(lq, lk, lv)?;
        let (q, k, v) = (f32s(sq, lq, "attention q")?, f32s(sk, lk, "attention k")?, f32s(sv, lv, "attention v")?);
        let mut y = vec![0f32; d.bh * d.t * d.dv];
        y.par_chunks_mut((d.t * d.dv).max(1)).enumerate().try_for_each(|(i, yb)| -> Result<()> {
            let (qb, kb, vb) = (&q[i * d.t * d.dk..], &k[i * d.t * d.dk..], &v[i * d.t * d.dv..]);
            let mut p = vec![0f32; ROWS * d.t];
            for r0 in (0..d.t).step_by(ROWS) {
                let r = ROWS.min(d.t - r0);
                let n = keys(*self, r0, r, d.t);
                if n == 0 {
                    continue;
                }
                probabilities(&mut p, qb, kb, (r0, r, n), d, *self)?;
                gemm_into(yb, r0 * d.dv, d.dv, (r, d.dv, n), View::new(&p, 0, n, 1), View::new(vb, 0, d.dv, 1), false, Parallelism::None)?;
            }
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, y, dy) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, y.contiguous()?, dy.contiguous()?);
        let (b, h, t, dk) = q.dims4()?;
        let dv = v.dim(3)?;
        let d = Dims { bh: b * h, t, dk, dv };
        let flat = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
        let (q, k, v, y, dy) = (flat(&q)?, flat(&k)?, flat(&v)?, flat(&y)?, flat(&dy)?);
        // Per (batch, head): (dq, dk, dv) blocks.
        let grads = (0..d.bh)
            .into_par_iter()
            .map(|i| self.backward_head(i, d, (&q, &k, &v, &y, &dy)))
            .collect::<Result<Vec<_>>>()?;
        let (mut gq, mut gk, mut gv) = (Vec::with_capacity(q.len()), Vec::with_capacity(k.len()), Vec::with_capacity(v.len()));
        for (a, bb, c) in grads {
            gq.extend(a);
            gk.extend(bb);
            gv.extend(c);
        }
        let dev = candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(gq, (b, h, t, dk), &dev)?),
            Some(Tensor::from_vec(gk, (b, h, t, dk), &dev)?),
            Some(Tensor::from_vec(gv, (b, h, t, dv), &dev)?),
        ))
    }
}

type Slices<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

impl Attention {
    /// Gradients of one (batch, head), recomputing each block's probabilities.
    fn backward_head(&self, i: usize, d: Dims, (q, k, v, y, dy): Slices) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (qo, vo) = (i * d.t * d.dk, i * d.t * d.dv);
        let (qb, kb, vb) = (&q[qo..qo + d.t * d.dk], &k[qo..qo + d.t * d.dk], &v[vo..vo + d.t * d.dv]);
        let (yb, gb) = (&y[vo..vo + d.t * d.dv], &dy[vo..vo + d.t * d.dv]);
        let (mut gq, mut gk, mut gv) = (vec![0f32; d.t * d.dk], vec![0f32; d.t * d.dk], vec![0f32; d.t * d.dv]);
        // D_i = rowsum(dY . Y).
        let dot: Vec<f32> =
            gb.chunks(d.dv.max(1)).zip(yb.chunks(d.dv.max(1))).map(|(g, y)| g.iter().zip(y).map(|(a, b)| a * b).sum()).collect();
        let (mut p, mut ds) = (vec![0f32; ROWS * d.t], vec![0f32; ROWS * d.t]);
        for r0 in (0..d.t).step_by(ROWS) {
            let r = ROWS.min(d.t - r0);
            let n = keys(*self, r0, r, d.t);
            if n == 0 {
                continue;
            }
            probabilities(&mut p, qb, kb, (r0, r, n), d, *self)?;
            let none = Parallelism::None;
            // dV[0..n] += P^T dY_blk.
            gemm_into(&mut gv, 0, d.dv, (n, d.dv, r), View::new(&p, 0, 1, n), View::new(gb, r0 * d.dv, d.dv, 1), true, none)?;
            // dP = dY_blk V^T, then dS = s P (dP - D).
            gemm_into(&mut ds, 0, n, (r, n, d.dv), View::new(gb, r0 * d.dv, d.dv, 1), View::new(vb, 0, 1, d.dv), false, none)?;
            for (ii, (dsr, pr)) in ds.chunks_mut(n).zip(p.chunks(n)).enumerate().take(r) {
                let di = dot[r0 + ii];
                dsr.iter_mut().zip(pr).for_each(|(g, &pv)| *g = self.scale * pv * (*g - di));
            }
            // dQ_blk = dS K, dK[0..n] += dS^T Q_blk.
            gemm_into(&mut gq, r0 * d.dk, d.dk, (r, d.dk, n), View::new(&ds, 0, n, 1), View::new(kb, 0, d.dk, 1), false, none)?;
            gemm_into(&mut gk, 0, d.dk, (n, d.dk, r), View::new(&ds, 0, 1, n), View::new(qb, r0 * d.dk, d.dk, 1), true, none)?;
        }
        Ok((gq, gk, gv))
    }
}

/// softmax(s q k^T + M) v over (B, H, T, d) tensors under `mask`. Fused on CPU for f32; the
/// composed candle ops elsewhere.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: AttnMask) -> Result<Tensor> {
    let cpu_f32 = q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if cpu_f32 {
        let op = Attention { scale: scale as f32, mask };
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    attention_composed(q, k, v, scale, mask)
}

/// The same with candle's ops (the reference of the tests; the path off CPU).
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: AttnMask) -> Result<Tensor> {
    let t = q.dim(2)?;
    let att = (q.matmul(&k.t()?)? * scale)?;
    if mask == AttnMask::None {
        return crate::softmax_last_dim(&att)?.matmul(v);
    }
    // Rows with no visible key (row 0 under Strict) see every key and are zeroed after.
    let allowed: Vec<u8> =
        (0..t).flat_map(|i| (0..t).map(move |j| u8::from(j < mask.limit(i, t) || mask.limit(i, t) == 0))).collect();
    let allowed = Tensor::from_vec(allowed, (t, t), q.device())?.broadcast_as(att.shape())?;
    let ninf = Tensor::new(f32::NEG_INFINITY, q.device())?.to_dtype(att.dtype())?.broadcast_as(att.shape())?;
    let y = crate::softmax_last_dim(&allowed.where_cond(&att, &ninf)?)?.matmul(v)?;
    let rows: Vec<f32> = (0..t).map(|i| if mask.limit(i, t) == 0 { 0.0 } else { 1.0 }).collect();
    y.broadcast_mul(&Tensor::from_vec(rows, (1, 1, t, 1), q.device())?.to_dtype(y.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Values and the gradients of q, k and v against the composed ops, for every mask, with
    /// T below, at and above one block (and not a multiple of it) and d_k != d_v.
    #[test]
    fn fused_attention_equals_candle_ops_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, t, dk, dv) in [(2, 2, 5, 3, 4), (1, 3, 64, 8, 8), (2, 1, 150, 4, 6)] {
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, dk), &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, dk), &dev)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, dv), &dev)?)?;
            let probe = Tensor::randn(0f32, 1.0, (b, h, t, dv), &dev)?;
            let scale = 1.0 / (dk as f64).sqrt();
            for mask in [AttnMask::None, AttnMask::Causal, AttnMask::Strict] {
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let fast = attention(qt, kt, vt, scale, mask)?;
                let slow = attention_composed(qt, kt, vt, scale, mask)?;
                assert!(diff(&fast, &slow)? < 1e-5, "{mask:?} T={t}: values differ by {}", diff(&fast, &slow)?);
                let gf = (&fast * &probe)?.sum_all()?.backward()?;
                let gs = (&slow * &probe)?.sum_all()?.backward()?;
                for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                    let dd = diff(gf.get(var).expect("grad"), gs.get(var).expect("grad"))?;
                    assert!(dd < 1e-4, "{mask:?} T={t}: d{name} differs by {dd}");
                }
            }
        }
        Ok(())
    }

    /// By hand, one head, d = 1: row 1 under Causal averages v_0 and v_1 with weights
    /// softmax(q_1 k_0, q_1 k_1); under Strict row 0 is 0 and row 1 is v_0.
    #[test]
    fn hand_values() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::new(&[[[[0f32], [1.0]]]], &dev)?;
        let k = Tensor::new(&[[[[0f32], [2.0]]]], &dev)?;
        let v = Tensor::new(&[[[[3f32], [5.0]]]], &dev)?;
        let y = attention(&q, &k, &v, 1.0, AttnMask::Causal)?.flatten_all()?.to_vec1::<f32>()?;
        let w = 1.0 / (1.0 + 2f32.exp()); // weight of key 0 for row 1: scores (0, 2)
        assert!((y[0] - 3.0).abs() < 1e-6 && (y[1] - (3.0 * w + 5.0 * (1.0 - w))).abs() < 1e-5, "{y:?}");
        let y = attention(&q, &k, &v, 1.0, AttnMask::Strict)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![0.0, 3.0]);
        Ok(())
    }
}
