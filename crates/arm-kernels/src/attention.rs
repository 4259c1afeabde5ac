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

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::fastmath::exp as exp32;
use crate::gemm::{f32s, gemm_into, with_slices, View};
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
    heads: usize,
}

/// Sizes: batch, heads, T, d_k, d_v.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    t: usize,
    dk: usize,
    dv: usize,
}

/// Where an operand's rows live: element j of head h at position i of batch b is
/// `data[b T ld + i ld + col + h width + j]`. Heads side by side in rows of `ld` values, so the
/// split into heads and the merge back are strides of the products, not copies.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    col: usize,
    ld: usize,
    width: usize,
}

impl<'a> Operand<'a> {
    fn new(data: &'a [f32], col: usize, ld: usize, width: usize) -> Self {
        Operand { data, col, ld, width }
    }

    /// Offset of (batch b, head h, position 0).
    fn at(&self, b: usize, h: usize, t: usize) -> usize {
        b * t * self.ld + self.col + h * self.width
    }

    /// Rows r0.. of (b, h) as a matrix (r x width), or its transpose (width x r).
    fn rows(&self, b: usize, h: usize, t: usize, r0: usize) -> View<'a> {
        View::new(self.data, self.at(b, h, t) + r0 * self.ld, self.ld, 1)
    }

    fn rows_t(&self, b: usize, h: usize, t: usize, r0: usize) -> View<'a> {
        View::new(self.data, self.at(b, h, t) + r0 * self.ld, 1, self.ld)
    }
}

/// The q, k, v operands of one call.
#[derive(Clone, Copy)]
struct Qkv<'a> {
    q: Operand<'a>,
    k: Operand<'a>,
    v: Operand<'a>,
}

/// P for query rows r0..r0+r of (b, h): s q k^T over keys 0..n, masked, softmax per row; rows
/// with no visible key are all zero. `p` is (r x n) row-major.
fn probabilities(p: &mut [f32], x: Qkv, (b, h): (usize, usize), (r0, r, n): (usize, usize, usize), d: Dims, a: Attention) -> Result<()> {
    gemm_into(p, 0, n, (r, n, d.dk), x.q.rows(b, h, d.t, r0), x.k.rows_t(b, h, d.t, 0), false, Parallelism::None)?;
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
    // Lane-wise maxima and sums, so that the loops vectorise (a single running sum is a
    // sequential dependency the compiler may not reorder).
    const L: usize = 16;
    if row.is_empty() {
        return;
    }
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(m, &v)| *m = m.max(v));
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * s;
    let mut sums = [0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for c in &mut chunks {
        for (v, acc) in c.iter_mut().zip(&mut sums) {
            *v = exp32(*v * s - max);
            *acc += *v;
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp32(*v * s - max);
        sum += *v;
    }
    let inv = 1.0 / (sum + sums.iter().sum::<f32>());
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Keys any row of the block r0..r0+r can see.
fn keys(a: Attention, r0: usize, r: usize, t: usize) -> usize {
    a.mask.limit(r0 + r - 1, t).min(t)
}

/// The blocks (r0, r rows, n keys) of a T-row sequence that see at least one key.
fn blocks(a: Attention, t: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t)
        .step_by(ROWS)
        .map(move |r0| {
            let r = ROWS.min(t - r0);
            (r0, r, keys(a, r0, r, t))
        })
        .filter(|&(_, _, n)| n > 0)
}

/// Copies a (t x width) block into the columns col.. of rows of `ld` values.
fn put(dst: &mut [f32], col: usize, ld: usize, src: &[f32], width: usize) {
    for (row, s) in dst.chunks_mut(ld).zip(src.chunks(width.max(1))) {
        row[col..col + width].copy_from_slice(s);
    }
}

impl Attention {
    /// y (B, T, H d_v), heads side by side.
    fn forward(&self, x: Qkv, d: Dims) -> Result<Vec<f32>> {
        let ldy = d.h * d.dv;
        let mut y = vec![0f32; d.b * d.t * ldy];
        y.par_chunks_mut((d.t * ldy).max(1)).enumerate().try_for_each(|(b, yb)| -> Result<()> {
            let mut p = vec![0f32; ROWS * d.t];
            for h in 0..d.h {
                for (r0, r, n) in blocks(*self, d.t) {
                    probabilities(&mut p, x, (b, h), (r0, r, n), d, *self)?;
                    let pv = (View::new(&p, 0, n, 1), x.v.rows(b, h, d.t, 0));
                    gemm_into(yb, r0 * ldy + h * d.dv, ldy, (r, d.dv, n), pv.0, pv.1, false, Parallelism::None)?;
                }
            }
            Ok(())
        })?;
        Ok(y)
    }

    /// Gradients of one (batch, head) as contiguous (T x d) blocks, recomputing each block's
    /// probabilities; `y`, `dy` are the output and its gradient.
    fn backward_head(&self, x: Qkv, y: Operand, dy: Operand, (b, h): (usize, usize), d: Dims) -> Result<[Vec<f32>; 3]> {
        let (mut gq, mut gk, mut gv) = (vec![0f32; d.t * d.dk], vec![0f32; d.t * d.dk], vec![0f32; d.t * d.dv]);
        // D_i = rowsum(dY . Y).
        let (yo, go) = (y.at(b, h, d.t), dy.at(b, h, d.t));
        let dot: Vec<f32> = (0..d.t)
            .map(|i| {
                let (yr, gr) = (&y.data[yo + i * y.ld..][..d.dv], &dy.data[go + i * dy.ld..][..d.dv]);
                yr.iter().zip(gr).map(|(a, b)| a * b).sum()
            })
            .collect();
        let (mut p, mut ds) = (vec![0f32; ROWS * d.t], vec![0f32; ROWS * d.t]);
        let none = Parallelism::None;
        for (r0, r, n) in blocks(*self, d.t) {
            probabilities(&mut p, x, (b, h), (r0, r, n), d, *self)?;
            // dV[0..n] += P^T dY_blk.
            gemm_into(&mut gv, 0, d.dv, (n, d.dv, r), View::new(&p, 0, 1, n), dy.rows(b, h, d.t, r0), true, none)?;
            // dP = dY_blk V^T, then dS = s P (dP - D).
            gemm_into(&mut ds, 0, n, (r, n, d.dv), dy.rows(b, h, d.t, r0), x.v.rows_t(b, h, d.t, 0), false, none)?;
            for (ii, (dsr, pr)) in ds.chunks_mut(n).zip(p.chunks(n)).enumerate().take(r) {
                let di = dot[r0 + ii];
                dsr.iter_mut().zip(pr).for_each(|(g, &pv)| *g = self.scale * pv * (*g - di));
            }
            // dQ_blk = dS K, dK[0..n] += dS^T Q_blk.
            gemm_into(&mut gq, r0 * d.dk, d.dk, (r, d.dk, n), View::new(&ds, 0, n, 1), x.k.rows(b, h, d.t, 0), false, none)?;
            gemm_into(&mut gk, 0, d.dk, (n, d.dk, r), View::new(&ds, 0, 1, n), x.q.rows(b, h, d.t, r0), true, none)?;
        }
        Ok([gq, gk, gv])
    }
}

/// Three inputs (B, T, H d_k), (B, T, H d_k), (B, T, H d_v), heads side by side.
#[derive(Debug, Clone, Copy)]
struct Separate(Attention);

/// One input (B, T, 3C) = [Q | K | V] with C = H d, as a single projection gives it.
#[derive(Debug, Clone, Copy)]
struct Packed(Attention);


impl Separate {
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<Dims> {
        let h = self.0.heads;
        let (b, t, ck) = lq.shape().dims3()?;
        let (bv, tv, cv) = lv.shape().dims3()?;
        if lk.shape() != lq.shape() || (bv, tv) != (b, t) || h == 0 || ck % h != 0 || cv % h != 0 {
            bail!("attention: q {:?}, k {:?}, v {:?} for {h} heads", lq.shape(), lk.shape(), lv.shape());
        }
        Ok(Dims { b, h, t, dk: ck / h, dv: cv / h })
    }

    fn operands<'a>(d: Dims, q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Qkv<'a> {
        let (ck, cv) = (d.h * d.dk, d.h * d.dv);
        Qkv { q: Operand::new(q, 0, ck, d.dk), k: Operand::new(k, 0, ck, d.dk), v: Operand::new(v, 0, cv, d.dv) }
    }
}

impl CustomOp3 for Separate {
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
        let d = self.dims(lq, lk, lv)?;
        let (q, k, v) = (f32s(sq, lq, "attention q")?, f32s(sk, lk, "attention k")?, f32s(sv, lv, "attention v")?);
        let y = self.0.forward(Self::operands(d, q, k, v), d)?;
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.t, d.h * d.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.layout(), k.layout(), v.layout())?;
        let (ck, cv) = (d.h * d.dk, d.h * d.dv);
        let (mut gq, mut gk, mut gv) = (vec![0f32; d.b * d.t * ck], vec![0f32; d.b * d.t * ck], vec![0f32; d.b * d.t * cv]);
        with_slices(&[q, k, v, y, dy], "attention", |s| {
            let x = Self::operands(d, s[0], s[1], s[2]);
            let (yo, go) = (Operand::new(s[3], 0, cv, d.dv), Operand::new(s[4], 0, cv, d.dv));
            let rows = |c: usize| (d.t * c).max(1);
            gq.par_chunks_mut(rows(ck))
                .zip(gk.par_chunks_mut(rows(ck)))
                .zip(gv.par_chunks_mut(rows(cv)))
                .enumerate()
                .try_for_each(|(b, ((cq, ckk), cvv))| -> Result<()> {
                    for h in 0..d.h {
                        let [a, bb, c] = self.0.backward_head(x, yo, go, (b, h), d)?;
                        put(cq, h * d.dk, ck, &a, d.dk);
                        put(ckk, h * d.dk, ck, &bb, d.dk);
                        put(cvv, h * d.dv, cv, &c, d.dv);
                    }
                    Ok(())
                })
        })?;
        let dev = candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(gq, (d.b, d.t, ck), &dev)?),
            Some(Tensor::from_vec(gk, (d.b, d.t, ck), &dev)?),
            Some(Tensor::from_vec(gv, (d.b, d.t, cv), &dev)?),
        ))
    }
}

impl Packed {
    fn dims(&self, l: &Layout) -> Result<Dims> {
        let h = self.0.heads;
        let (b, t, c3) = l.shape().dims3()?;
        if h == 0 || c3 % (3 * h) != 0 {
            bail!("attention: packed q, k, v of shape {:?} for {h} heads (the last dimension must be 3 x heads x d)", l.shape());
        }
        let d = c3 / (3 * h);
        Ok(Dims { b, h, t, dk: d, dv: d })
    }

    fn operands(d: Dims, qkv: &[f32]) -> Qkv<'_> {
        let c = d.h * d.dk;
        let op = |col| Operand::new(qkv, col, 3 * c, d.dk);
        Qkv { q: op(0), k: op(c), v: op(2 * c) }
    }
}

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "attention_packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l)?;
        let y = self.0.forward(Self::operands(d, f32s(s, l, "attention qkv")?), d)?;
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.t, d.h * d.dv))))
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let d = self.dims(qkv.layout())?;
        let g = with_slices(&[qkv, y, dy], "attention", |s| self.gradient(d, s[0], s[1], s[2]))?;
        Ok(Some(Tensor::from_vec(g, (d.b, d.t, 3 * d.h * d.dk), &candle_core::Device::Cpu)?))
    }
}

impl Packed {
    /// d qkv (B, T, 3C) from qkv, the output y and its gradient dy (B, T, C).
    fn gradient(&self, d: Dims, qkv: &[f32], y: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let c = d.h * d.dk;
        let mut g = vec![0f32; d.b * d.t * 3 * c];
        let x = Self::operands(d, qkv);
        let (yo, go) = (Operand::new(y, 0, c, d.dv), Operand::new(dy, 0, c, d.dv));
        g.par_chunks_mut((d.t * 3 * c).max(1)).enumerate().try_for_each(|(b, gb)| -> Result<()> {
            for h in 0..d.h {
                let [a, bb, cc] = self.0.backward_head(x, yo, go, (b, h), d)?;
                put(gb, h * d.dk, 3 * c, &a, d.dk);
                put(gb, c + h * d.dk, 3 * c, &bb, d.dk);
                put(gb, 2 * c + h * d.dv, 3 * c, &cc, d.dv);
            }
            Ok(())
        })?;
        Ok(g)
    }
}

/// [`attention_packed`] on slices: qkv (B, T, 3C) -> y (B, T, C); `(b, t, c)` = (B, T, C).
pub(crate) fn packed_forward(qkv: &[f32], (b, t, c): (usize, usize, usize), heads: usize, scale: f32, mask: AttnMask) -> Result<Vec<f32>> {
    let op = Packed(Attention { scale, mask, heads });
    let d = op.dims(&Layout::contiguous((b, t, 3 * c)))?;
    if qkv.len() != b * t * 3 * c {
        bail!("attention: {} values for q, k, v of ({b}, {t}, 3 x {c})", qkv.len());
    }
    op.0.forward(Packed::operands(d, qkv), d)
}

/// The gradient of [`packed_forward`]: d qkv from qkv, y and dy.
pub(crate) fn packed_gradient(
    qkv: &[f32],
    y: &[f32],
    dy: &[f32],
    (b, t, c): (usize, usize, usize),
    heads: usize,
    scale: f32,
    mask: AttnMask,
) -> Result<Vec<f32>> {
    let op = Packed(Attention { scale, mask, heads });
    let d = op.dims(&Layout::contiguous((b, t, 3 * c)))?;
    if qkv.len() != b * t * 3 * c || y.len() != b * t * c || dy.len() != y.len() {
        bail!("attention: gradient of q, k, v of ({b}, {t}, 3 x {c}) with {} outputs", y.len());
    }
    op.gradient(d, qkv, y, dy)
}

fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// softmax(s q k^T + M) v over (B, H, T, d) tensors under `mask`. Fused on CPU for f32; the
/// composed candle ops elsewhere.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: AttnMask) -> Result<Tensor> {
    if cpu_f32(&[q, k, v]) {
        // (B, H, T, d) is (B H, T, d) with one head.
        let (b, h, t, dk) = q.dims4()?;
        let dv = v.dim(3)?;
        let flat = |x: &Tensor, d: usize| x.reshape((b * h, t, d));
        let op = Separate(Attention { scale: scale as f32, mask, heads: 1 });
        let y = flat(q, dk)?.contiguous()?.apply_op3(&flat(k, dk)?.contiguous()?, &flat(v, dv)?.contiguous()?, op)?;
        return y.reshape((b, h, t, dv));
    }
    attention_composed(q, k, v, scale, mask)
}

/// (B, T, H d) -> (B, H, T, d).
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, heads, c / heads))?.transpose(1, 2)?.contiguous()
}

/// (B, H, T, d) -> (B, T, H d).
fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = y.dims4()?;
    y.transpose(1, 2)?.reshape((b, t, h * d))
}

/// Multi-head attention with heads side by side: q, k (B, T, H d_k), v (B, T, H d_v) ->
/// (B, T, H d_v). On CPU the heads are strides of the products (no split or merge copies).
pub fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, mask: AttnMask) -> Result<Tensor> {
    if cpu_f32(&[q, k, v]) {
        let op = Separate(Attention { scale: scale as f32, mask, heads });
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let y = attention_composed(&split_heads(q, heads)?, &split_heads(k, heads)?, &split_heads(v, heads)?, scale, mask)?;
    merge_heads(&y)
}

/// Multi-head attention on one projection's output: qkv (B, T, 3C) = [Q | K | V], each of C =
/// H d columns with heads side by side -> (B, T, C). Its gradient is one (B, T, 3C) tensor.
pub fn attention_packed(qkv: &Tensor, heads: usize, scale: f64, mask: AttnMask) -> Result<Tensor> {
    if cpu_f32(&[qkv]) {
        let op = Packed(Attention { scale: scale as f32, mask, heads });
        return qkv.contiguous()?.apply_op1(op);
    }
    let c = qkv.dim(2)? / 3;
    let part = |i: usize| split_heads(&qkv.narrow(2, i * c, c)?, heads);
    merge_heads(&attention_composed(&part(0)?, &part(1)?, &part(2)?, scale, mask)?)
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

    /// Heads side by side and packed [Q | K | V] against the composed ops on split heads, in
    /// values and in every gradient (T below and above a block, d_k != d_v for side by side).
    #[test]
    fn heads_as_strides_equal_candle_ops_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let max_diff = |a: &Tensor, b: &Tensor| diff(a, b);
        for (b, h, t, dk, dv) in [(2, 3, 5, 2, 3), (3, 2, 70, 4, 4), (1, 1, 9, 3, 2)] {
            let scale = 1.0 / (dk as f64).sqrt();
            let probe = Tensor::randn(0f32, 1.0, (b, t, h * dv), &dev)?;
            for mask in [AttnMask::None, AttnMask::Causal, AttnMask::Strict] {
                // Side by side.
                let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h * dk), &dev)?)?;
                let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h * dk), &dev)?)?;
                let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h * dv), &dev)?)?;
                let fast = attention_heads(q.as_tensor(), k.as_tensor(), v.as_tensor(), h, scale, mask)?;
                let split = |x: &Var| split_heads(x.as_tensor(), h);
                let slow = merge_heads(&attention_composed(&split(&q)?, &split(&k)?, &split(&v)?, scale, mask)?)?;
                assert!(max_diff(&fast, &slow)? < 1e-5, "{mask:?} {b}x{h}x{t}: values");
                let gf = (&fast * &probe)?.sum_all()?.backward()?;
                let gs = (&slow * &probe)?.sum_all()?.backward()?;
                for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                    let dd = max_diff(gf.get(var).expect("grad"), gs.get(var).expect("grad"))?;
                    assert!(dd < 1e-4, "{mask:?} {b}x{h}x{t}: d{name} differs by {dd}");
                }
                if dk != dv {
                    continue;
                }
                // Packed.
                let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * h * dk), &dev)?)?;
                let fast = attention_packed(qkv.as_tensor(), h, scale, mask)?;
                let c = h * dk;
                let part = |i: usize| split_heads(&qkv.as_tensor().narrow(2, i * c, c)?, h);
                let slow = merge_heads(&attention_composed(&part(0)?, &part(1)?, &part(2)?, scale, mask)?)?;
                assert!(max_diff(&fast, &slow)? < 1e-5, "packed {mask:?} {b}x{h}x{t}: values");
                let gf = (&fast * &probe)?.sum_all()?.backward()?;
                let gs = (&slow * &probe)?.sum_all()?.backward()?;
                let dd = max_diff(gf.get(&qkv).expect("grad"), gs.get(&qkv).expect("grad"))?;
                assert!(dd < 1e-4, "packed {mask:?} {b}x{h}x{t}: dqkv differs by {dd}");
            }
        }
        // Heads that do not divide the width are an error, not a panic.
        let x = Tensor::zeros((1, 2, 9), DType::F32, &dev)?;
        assert!(attention_packed(&x, 2, 1.0, AttnMask::Causal).is_err());
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
