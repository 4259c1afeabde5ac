//! Causal multi-head self-attention (Vaswani et al. 2017, "Attention Is All You Need", §3.2,
//! eq. 1, with the decoder's mask of §3.2.3):
//!
//!   [Q, K, V] = x W_qkv + b_qkv,   head_i = softmax(Q_i K_i^T / sqrt(d_k) + M) V_i,
//!   y = [head_1, ..., head_H] W_o + b_o,   M_ij = -inf where j > i, else 0,
//!
//! so position i attends to positions <= i. The whole-sequence `forward` computes all heads
//! in batched matmuls; `step` is the cached evaluation of one new position: it computes q, k
//! and v for that position only, appends k and v to a [`KvCache`] and attends over the cache,
//! O(t) for the t-th position instead of a full pass.
//!
//! The scores, mask, softmax and weighted sum are one fused op of `arm-kernels` with its
//! backward ([`arm_kernels::attention`]). Left out: attention dropout (the plugins drop the
//! layer's output instead) and relative position terms.

use arm_kernels::{attention_heads, attention_packed, softmax_last_dim, AttnMask, PreNormWeights, Sublayer};
use candle_core::Tensor;
use candle_nn::VarBuilder;

use arm_core::Result;

use super::{linear, LayerNorm, Linear};

#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    qkv: Linear,  // (C, 3C): the three projections in one product
    proj: Linear, // (C, C): W_o
    heads: usize,
    width: usize,
    /// Whether the causal mask is applied; false only in tests that show the conformance
    /// checks catch a network that looks ahead.
    causal: bool,
}

/// Keys and values of the positions evaluated so far, one per layer: (B, H, t, d_k) each.
/// With a capacity they are written in place into buffers of that many positions (no copy of
/// the past per step); without, each append concatenates.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache that holds up to `positions` positions in preallocated buffers.
    pub fn with_capacity(positions: usize) -> Self {
        KvCache { capacity: positions, ..Default::default() }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one position's keys and values (B, H, 1, d_k) and returns the whole cache.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.len < self.capacity {
            let buffer = |new: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = new.dims4()?;
                Tensor::zeros((b, h, self.capacity, d), new.dtype(), new.device())
            };
            if self.k.is_none() {
                self.k = Some(buffer(&k)?);
                self.v = Some(buffer(&v)?);
            }
            let (kb, vb) = (self.k.as_ref(), self.v.as_ref());
            let (kb, vb) = kb.zip(vb).ok_or_else(|| candle_core::Error::Msg("kv cache: no buffers".into()))?;
            kb.slice_set(&k, 2, self.len)?;
            vb.slice_set(&v, 2, self.len)?;
            self.len += 1;
            return Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?));
        }
        if self.capacity > 0 {
            candle_core::bail!("kv cache: full ({} positions)", self.capacity);
        }
        let cat = |old: &Option<Tensor>, new: Tensor| match old {
            Some(o) => Tensor::cat(&[o, &new], 2),
            None => Ok(new),
        };
        let (k, v) = (cat(&self.k, k)?, cat(&self.v, v)?);
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        self.len += 1;
        Ok((k, v))
    }
}

/// H heads over `width` features (width divisible by heads).
pub fn causal_self_attention(width: usize, heads: usize, vb: VarBuilder) -> Result<CausalSelfAttention> {
    if heads == 0 || !width.is_multiple_of(heads) {
        candle_core::bail!("attention: {heads} heads do not divide width {width}");
    }
    Ok(CausalSelfAttention {
        qkv: linear(width, 3 * width, vb.pp("qkv"))?,
        proj: linear(width, width, vb.pp("proj"))?,
        heads,
        width,
        causal: true,
    })
}

impl CausalSelfAttention {
    /// The same layer without its causal mask: every position attends to every position.
    /// Only for tests that show the conformance checks catch it.
    pub fn without_causal_mask(mut self) -> Self {
        self.causal = false;
        self
    }

    fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    fn mask(&self) -> AttnMask {
        if self.causal {
            AttnMask::Causal
        } else {
            AttnMask::None
        }
    }

    /// 1 / sqrt(d_k).
    fn scale(&self) -> f64 {
        1.0 / (self.head_dim() as f64).sqrt()
    }

    /// (B, T, 3C) -> q, k, v as (B, H, T, d_k) each.
    fn split(&self, qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = qkv.dims3()?;
        let (c, h, dk) = (self.width, self.heads, self.head_dim());
        let part = |i: usize| qkv.narrow(2, i * c, c)?.reshape((b, t, h, dk))?.transpose(1, 2)?.contiguous();
        Ok((part(0)?, part(1)?, part(2)?))
    }

    /// (B, H, T, d_k) -> (B, T, C), heads side by side.
    fn merge(&self, y: &Tensor) -> Result<Tensor> {
        let (b, _, t, _) = y.dims4()?;
        y.transpose(1, 2)?.reshape((b, t, self.width))
    }

    /// x (B, T, C) -> (B, T, C); output row i depends on input rows <= i. The attention is
    /// the fused op of `arm-kernels` on the projection's output as it is (heads are strides,
    /// not copies; blocks of query rows, so the (B, H, T, T) scores never exist whole).
    pub fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let y = attention_packed(&self.qkv.forward(x)?, self.heads, self.scale(), self.mask())?; // (B, T, C)
        self.proj.forward(&y) // (B, T, C)
    }

    /// h + drop . forward(LN(h)) for h (B, T, C): a pre-norm residual sublayer as one op
    /// (`drop`: the dropout mask of h's shape, scaled).
    pub fn prenorm_residual(&self, h: &Tensor, ln: &LayerNorm, drop: Option<&Tensor>) -> Result<Tensor> {
        let (gamma, beta) = ln.params();
        let (qkv, proj) = (&self.qkv, &self.proj);
        let w = PreNormWeights { gamma, beta, w1: &qkv.w, b1: &qkv.b, w2: &proj.w, b2: &proj.b };
        let kind = Sublayer::Attention { heads: self.heads, scale: self.scale(), mask: self.mask() };
        arm_kernels::prenorm_residual(h, w, kind, ln.eps(), drop)
    }

    /// One new position: x (B, C) -> (B, C), attending over the cache and itself; appends the
    /// position's keys and values to `cache`.
    pub fn step(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (q, k, v) = self.split(&self.qkv.forward(&x.unsqueeze(1)?)?)?; // (B, H, 1, d_k) each

        // Detached: sampling needs no gradient, and the cache must not keep every step's graph.
        let (k, v) = cache.append(k.detach(), v.detach())?; // (B, H, t, d_k)
        let att = (q.detach() * self.scale())?.matmul(&k.t()?)?; // (B, H, 1, t): no mask, the cache holds the past
        let att = softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // (B, H, 1, d_k)
        self.proj.forward(&self.merge(&y)?.reshape((b, self.width))?) // (B, C)
    }

    /// Matrix-product FLOPs of a training `forward` over T positions: the projections
    /// (2 T C 4C) and the score and weighted-sum products over all T x T pairs (2 x 2 T^2 C;
    /// the composed ops compute the masked half too).
    pub fn flops(&self, t: usize) -> f64 {
        let (t, c) = (t as f64, self.width as f64);
        2.0 * t * c * 4.0 * c + 4.0 * t * t * c
    }
}

/// Multi-head attention in which position i attends to positions j < i only (PixelSNAIL,
/// Chen et al. 2018, §2.2: its keys and values are computed from the input pixel too, so a
/// query must not see its own position). q, k: (B, N, H d_k), v: (B, N, H d_v) ->
/// (B, N, H d_v); row 0 has no keys and is zero. `strict = false` (tests only) lets i see i.
pub fn strict_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, strict: bool) -> Result<Tensor> {
    let ck = q.dim(2)?;
    let mask = if strict { AttnMask::Strict } else { AttnMask::Causal };
    attention_heads(q, k, v, heads, 1.0 / ((ck / heads) as f64).sqrt(), mask) // (B, N, H d_v)
}

/// One query of [`strict_causal_attention`]: q (B, H d_k) against the earlier positions' keys
/// k (B, H, t, d_k) and values v (B, H, t, d_v), t >= 1: (B, H d_v).
pub fn strict_causal_attention_step(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, heads, t, dk) = k.dims4()?;
    let dv = v.dim(3)?;
    if t == 0 {
        candle_core::bail!("attention step: no keys (the first position has no attention output)");
    }
    let q = (q.reshape((b, heads, 1, dk))? * (1.0 / (dk as f64).sqrt()))?;
    let y = softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(v)?; // (B, H, 1, d_v)
    y.reshape((b, heads * dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arm_core::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// The cached step reproduces the whole-sequence rows, and a row does not move when later
    /// rows change (with the mask) but does without it.
    #[test]
    fn step_matches_forward_and_the_mask_hides_the_future() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let attn = causal_self_attention(6, 3, seeded_var_builder(&map, 1, &dev))?;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 6), &dev)?;
        let full = attn.forward(&x, false)?; // (2, 5, 6)
        for mut cache in [KvCache::default(), KvCache::with_capacity(5)] {
            for t in 0..5 {
                let row = attn.step(&x.narrow(1, t, 1)?.squeeze(1)?, &mut cache)?;
                let want = full.narrow(1, t, 1)?.squeeze(1)?;
                let diff = (row - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "position {t}: {diff}");
            }
            assert_eq!(cache.len(), 5);
        }
        // Training (whole, with gradients) gives the same rows.
        let diff = (attn.forward(&x, true)? - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "train vs eval: {diff}");
        // Change the last position: rows 0..4 stay with the mask, move without it.
        let x2 = Tensor::cat(&[x.narrow(1, 0, 4)?, (x.narrow(1, 4, 1)? + 1.0)?], 1)?;
        let first = |a: &CausalSelfAttention, x: &Tensor| a.forward(x, false)?.narrow(1, 0, 4);
        let moved = |a: &CausalSelfAttention| -> Result<f32> {
            (first(a, &x2)? - first(a, &x)?)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert_eq!(moved(&attn)?, 0.0);
        assert!(moved(&attn.clone().without_causal_mask())? > 0.0);
        Ok(())
    }

    /// Strict attention by hand on one head: row 1 sees key 0 only (its value), row 2 the
    /// softmax of its two scores over values 0 and 1; row 0 is zero. The step gives the same.
    #[test]
    fn strict_attention_by_hand_and_step() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::new(&[[[1f32], [2.0], [1.0]]], &dev)?; // (1, 3, 1)
        let k = Tensor::new(&[[[0f32], [1.0], [5.0]]], &dev)?;
        let v = Tensor::new(&[[[10f32, 1.0], [20.0, 2.0], [30.0, 3.0]]], &dev)?;
        let y = strict_causal_attention(&q, &k, &v, 1, true)?.to_vec3::<f32>()?;
        // Row 2: scores (0, 1), weights (1, e) / (1 + e).
        let e = 1f32.exp();
        let want = [[0.0, 0.0], [10.0, 1.0], [(10.0 + 20.0 * e) / (1.0 + e), (1.0 + 2.0 * e) / (1.0 + e)]];
        for (row, w) in y[0].iter().zip(want) {
            assert!((row[0] - w[0]).abs() < 1e-5 && (row[1] - w[1]).abs() < 1e-5, "{y:?}");
        }
        let q2 = q.narrow(1, 2, 1)?.squeeze(1)?;
        let heads = |t: &Tensor| t.narrow(1, 0, 2)?.unsqueeze(1); // (1, 1, 2, d)
        let step = strict_causal_attention_step(&q2, &heads(&k)?, &heads(&v)?)?.to_vec2::<f32>()?;
        assert!((step[0][0] - want[2][0]).abs() < 1e-5 && (step[0][1] - want[2][1]).abs() < 1e-5);
        Ok(())
    }
}
