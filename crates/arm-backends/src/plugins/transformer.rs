//! `transformer`: a decoder-only Transformer over the pixel sequence (Parmar et al. 2018,
//! "Image Transformer"; Chen et al. 2020, "Generative Pretraining from Pixels" (ImageGPT),
//! §2-3), with the pre-norm blocks of GPT-2 (Radford et al. 2019, §2.3):
//!
//!   t_0 = <start>,  t_d = level(x_{d-1})                       (inputs shifted by one)
//!   h^0_d = E[t_d] + P_d                                          (level + position embedding)
//!   a^l = h^{l-1} + Attn_l(LN(h^{l-1}))                           (causal multi-head attention)
//!   h^l = a^l + W2_l GELU(W1_l LN(a^l))                           (MLP, mlp_ratio x width)
//!   params_d = W_out LN(h^L_d) + b_out
//!
//! Row d reads t_0..t_d = (<start>, x_0, ..., x_{d-1}), so it sees pixels before d only.
//! Levels are tokens: round(x (K - 1)) indexes a learned table of K + 1 rows (the last is the
//! start token). Positions: a learned table of D rows (`positions = "learned"`), or a row table
//! and a column table added (`"row_col"`, row d / W and column d mod W of the sequence index,
//! which are the pixel's row and column in raster order). Dropout (training only) on the
//! embeddings and on each block's attention and MLP outputs before the residual sum.
//!
//! In training and evaluation each residual sublayer (LN, the products, attention or GELU,
//! dropout and the sum) is one op, `arm_kernels::prenorm_residual`.
//! The cached stepper keeps each layer's keys and values ([`KvCache`]): pixel d computes its
//! q, k, v only and attends over the d + 1 cached positions, O(d) per pixel.
//! Left out: attention dropout, ImageGPT's colour palette and the Image Transformer's local
//! 2D attention blocks (every position attends to the whole past here).

use arm_kernels::{PreNormWeights, Sublayer};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};

use crate::layers::{
    causal_self_attention, layer_norm, linear, CausalSelfAttention, Dropout, KvCache, LayerNorm, Linear,
};
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// One learned vector per sequence position (D rows).
    #[default]
    Learned,
    /// A learned row table (H rows) plus a learned column table (W rows).
    RowCol,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformerConfig {
    /// C: features per position (the residual stream).
    pub width: usize,
    /// Attention heads per block (must divide width).
    pub heads: usize,
    /// Blocks (attention + MLP).
    pub depth: usize,
    /// The MLP's hidden layer is mlp_ratio x width.
    pub mlp_ratio: usize,
    /// Dropout on the embeddings and each block's attention and MLP outputs (training only).
    pub dropout: f64,
    /// "learned" (a D-row table) or "row_col" (row and column tables added).
    pub positions: Positions,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self { width: 128, heads: 4, depth: 4, mlp_ratio: 4, dropout: 0.0, positions: Positions::Learned }
    }
}

impl PluginConfig for TransformerConfig {
    const NAME: &'static str = "transformer";
    const SUMMARY: &'static str = "decoder-only Transformer over pixels (ImageGPT style), KV-cached sampling";

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if self.width == 0 {
            return Err(invalid("width", "must be at least 1, got 0"));
        }
        if self.heads == 0 {
            return Err(invalid("heads", "must be at least 1, got 0"));
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(invalid("heads", format!("must divide width = {}, got {}", self.width, self.heads)));
        }
        if self.depth == 0 {
            return Err(invalid("depth", "must be at least 1, got 0"));
        }
        if self.mlp_ratio == 0 {
            return Err(invalid("mlp_ratio", "must be at least 1, got 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        Ok(Box::new(Transformer::new(self, &ctx, true)?))
    }

    fn test_configs() -> Vec<Self> {
        let c = |width, heads, depth, mlp_ratio, positions| Self {
            width,
            heads,
            depth,
            mlp_ratio,
            dropout: 0.0,
            positions,
        };
        vec![c(4, 2, 1, 2, Positions::Learned), c(6, 3, 2, 1, Positions::RowCol), c(4, 1, 2, 2, Positions::Learned)]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("width", "C: features per position"),
            ("heads", "attention heads per block (must divide width)"),
            ("depth", "pre-norm blocks (LayerNorm, causal attention, LayerNorm, MLP)"),
            ("mlp_ratio", "the MLP's hidden width is mlp_ratio x width"),
            ("dropout", "dropout on the embeddings and each block's outputs"),
            ("positions", "\"learned\" (a table of D positions) or \"row_col\" (row + column tables)"),
        ]
    }
}

/// GPT-2's initialisation of the embedding tables.
const EMBED_INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

/// Position embeddings: P_d for every d, or for one.
enum PositionTable {
    Learned(Tensor),                               // (D, C)
    RowCol { row: Tensor, col: Tensor, w: usize }, // (H, C), (W, C)
}

impl PositionTable {
    /// (D, C).
    fn all(&self, d: usize) -> Result<Tensor> {
        match self {
            PositionTable::Learned(t) => Ok(t.clone()),
            PositionTable::RowCol { row, col, w } => {
                let h = d / w;
                let rows = row.unsqueeze(1)?.broadcast_as((h, *w, row.dim(1)?))?; // (H, W, C)
                rows.broadcast_add(&col.unsqueeze(0)?)?.reshape((d, row.dim(1)?))
                // (D, C)
            }
        }
    }

    /// (1, C) for position d.
    fn at(&self, d: usize) -> Result<Tensor> {
        match self {
            PositionTable::Learned(t) => t.narrow(0, d, 1),
            PositionTable::RowCol { row, col, w } => row.narrow(0, d / w, 1)? + col.narrow(0, d % w, 1)?,
        }
    }
}

/// LN, attention, residual; LN, MLP, residual.
struct Block {
    ln1: LayerNorm,
    attn: CausalSelfAttention,
    ln2: LayerNorm,
    fc: Linear,   // (C, rC)
    proj: Linear, // (rC, C)
}

fn block(width: usize, heads: usize, ratio: usize, vb: VarBuilder) -> Result<Block> {
    Ok(Block {
        ln1: layer_norm(width, vb.pp("ln1"))?,
        attn: causal_self_attention(width, heads, vb.pp("attn"))?,
        ln2: layer_norm(width, vb.pp("ln2"))?,
        fc: linear(width, ratio * width, vb.pp("mlp.fc"))?,
        proj: linear(ratio * width, width, vb.pp("mlp.proj"))?,
    })
}

impl Block {
    /// W2 GELU(W1 h + b1) + b2, (..., C) -> (..., C); the GELU inside the first layer's op.
    fn mlp(&self, h: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.fc.forward_gelu(h)?)
    }

    /// h + drop . mlp(LN2(h)) for h (B, T, C), one op.
    fn mlp_residual(&self, h: &Tensor, drop: Option<&Tensor>) -> Result<Tensor> {
        let (gamma, beta) = self.ln2.params();
        let (fc, proj) = (&self.fc, &self.proj);
        let w = PreNormWeights { gamma, beta, w1: &fc.w, b1: &fc.b, w2: &proj.w, b2: &proj.b };
        arm_kernels::prenorm_residual(h, w, Sublayer::Mlp, self.ln2.eps(), drop)
    }
}

pub struct Transformer {
    tokens: Tensor, // (K + 1, C): level embeddings, row K the start token
    positions: PositionTable,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    out: Linear, // (C, P)
    dropout: Dropout,
    levels: usize,
    dims: usize,
    device: Device,
}

impl Transformer {
    /// `causal = false` drops every attention mask: only for tests that show the conformance
    /// checks catch a network that looks ahead.
    pub fn new(cfg: &TransformerConfig, ctx: &BuildCtx, causal: bool) -> Result<Transformer> {
        let (c, vb) = (cfg.width, &ctx.vb);
        let positions = match cfg.positions {
            Positions::Learned => PositionTable::Learned(vb.get_with_hints((ctx.dims(), c), "pos", EMBED_INIT)?),
            Positions::RowCol => PositionTable::RowCol {
                row: vb.get_with_hints((ctx.height, c), "pos_row", EMBED_INIT)?,
                col: vb.get_with_hints((ctx.width, c), "pos_col", EMBED_INIT)?,
                w: ctx.width,
            },
        };
        let blocks = (0..cfg.depth)
            .map(|l| {
                let mut b = block(c, cfg.heads, cfg.mlp_ratio, vb.pp(format!("blocks.{l}")))?;
                if !causal {
                    b.attn = b.attn.without_causal_mask();
                }
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer {
            tokens: vb.get_with_hints((ctx.levels + 1, c), "tokens", EMBED_INIT)?,
            positions,
            blocks,
            ln_f: layer_norm(c, vb.pp("ln_f"))?,
            out: linear(c, ctx.num_params, vb.pp("out"))?,
            dropout: Dropout::new(cfg.dropout, ctx.seed),
            levels: ctx.levels,
            dims: ctx.dims(),
            device: ctx.device.clone(),
        })
    }

    /// Inputs level / (K - 1) -> token ids round(x (K - 1)), clamped to the K levels; any shape.
    fn token_ids(&self, x: &Tensor) -> Result<Tensor> {
        let top = self.levels.saturating_sub(1) as f64;
        x.to_dtype(DType::F32)?.affine(top, 0.0)?.round()?.clamp(0.0, top)?.to_dtype(DType::U32)
    }

    /// E[t] for ids (N,) -> (N, C).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.tokens.index_select(ids, 0)
    }

    /// params for h (..., C) -> (..., P).
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.ln_f.forward(h)?)
    }
}

impl Conditional for Transformer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("transformer: input has {d} positions, built for {}", self.dims);
        }
        let start = Tensor::full(self.levels as u32, (b, 1), &self.device)?;
        let ids = if d > 1 { Tensor::cat(&[&start, &self.token_ids(&x.narrow(1, 0, d - 1)?)?], 1)? } else { start }; // (B, D): shifted by one
        let c = self.tokens.dim(1)?;
        let e = self.embed(&ids.flatten_all()?)?.reshape((b, d, c))?; // (B, D, C)
        let mut h = self.dropout.forward_t(&e.broadcast_add(&self.positions.all(d)?)?, train)?; // (B, D, C)
        // Each residual sublayer is one op (arm_kernels::prenorm_residual); the dropout masks
        // are drawn in the same order as by dropping each sublayer's output.
        let drop = |h: &Tensor| self.dropout.active(train).then(|| self.dropout.mask(h.shape(), h.device())).transpose();
        for blk in &self.blocks {
            h = blk.attn.prenorm_residual(&h, &blk.ln1, drop(&h)?.as_ref())?; // a^l = h + Attn(LN(h))
            h = blk.mlp_residual(&h, drop(&h)?.as_ref())?; // h^l = a^l + MLP(LN(a^l))
        }
        self.head(&h) // (B, D, P)
    }

    fn seq_len(&self) -> usize {
        self.dims
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn begin_epoch(&self, epoch: usize) {
        self.dropout.begin_epoch(epoch);
    }

    fn flops_per_image(&self) -> Option<f64> {
        let (d, c) = (self.dims as f64, self.tokens.dim(1).ok()? as f64);
        let p = self.out.out_features().ok()? as f64;
        let blocks: f64 = self
            .blocks
            .iter()
            .map(|b| b.attn.flops(self.dims) + 2.0 * 2.0 * d * c * b.fc.out_features().unwrap_or(0) as f64)
            .sum();
        Some(blocks + 2.0 * d * c * p)
    }

    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        Ok(Box::new(TransformerStepper {
            net: self,
            pos: 0,
            ids: Tensor::full(self.levels as u32, batch, &self.device)?,
            caches: vec![KvCache::with_capacity(self.dims); self.blocks.len()],
            next: None,
        }))
    }
}

/// Cached generation: every layer's keys and values of positions < pos, and the token of
/// position pos (the start token, then x_{pos-1}); `next` holds the parameters of position pos
/// once computed (its keys and values are then in the caches already).
struct TransformerStepper<'a> {
    net: &'a Transformer,
    pos: usize,
    ids: Tensor, // (B,) u32
    caches: Vec<KvCache>,
    next: Option<Tensor>,
}

impl Stepper for TransformerStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if let Some(p) = &self.next {
            return Ok(p.clone());
        }
        let net = self.net;
        if self.pos >= net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", net.dims);
        }
        let mut h = net.embed(&self.ids)?.broadcast_add(&net.positions.at(self.pos)?)?; // (B, C)
        for (blk, cache) in net.blocks.iter().zip(&mut self.caches) {
            h = (&h + blk.attn.step(&blk.ln1.forward(&h)?, cache)?)?; // (B, C)
            h = (&h + blk.mlp(&blk.ln2.forward(&h)?)?)?;
        }
        let p = net.head(&h)?; // (B, P)
        self.next = Some(p.clone());
        Ok(p)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        if self.next.is_none() {
            self.params()?; // this position's keys and values must enter the caches first
        }
        self.next = None;
        self.ids = self.net.token_ids(&x_d.flatten_all()?)?;
        self.pos += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use arm_core::{Arm, Categorical, Ordering};
    use candle_nn::VarMap;

    fn net(
        cfg: &TransformerConfig,
        (h, w): (usize, usize),
        (p, k): (usize, usize),
        causal: bool,
    ) -> Result<Transformer> {
        let ctx = conformance::test_ctx(&VarMap::new(), 3, (h, w), (p, k));
        Transformer::new(cfg, &ctx, causal)
    }

    fn small(positions: Positions) -> TransformerConfig {
        TransformerConfig { width: 8, heads: 2, depth: 2, mlp_ratio: 2, dropout: 0.0, positions }
    }

    /// The same network with its causal masks removed fails causality (an early row changes
    /// with a later input) and normalisation, while the masked one passes both.
    #[test]
    fn the_conformance_checks_catch_a_missing_causal_mask() -> Result<()> {
        for positions in [Positions::Learned, Positions::RowCol] {
            let cfg = small(positions);
            let good = net(&cfg, (2, 3), (3, conformance::LEVELS), true)?;
            conformance::causality(&good, 3, false, true).map_err(candle_core::Error::msg)?;
            let broken = net(&cfg, (2, 3), (3, conformance::LEVELS), false)?;
            let e = conformance::causality(&broken, 3, false, true).expect_err("a missing mask passed causality");
            assert!(e.contains("changed when input"), "{e}");
            let arm = |causal| -> Result<Arm> {
                let n = net(&cfg, (2, 2), (3, 3), causal)?;
                Arm::new(Box::new(n), Box::new(Categorical::new(3)), 3, (2, 2), Ordering::Raster)
            };
            conformance::sums_to_one(&arm(true)?).map_err(candle_core::Error::msg)?;
            assert!(conformance::sums_to_one(&arm(false)?).is_err(), "a missing mask still sums to one");
        }
        Ok(())
    }

    /// The stepper reproduces the forward rows on a larger image (the conformance suite's
    /// shapes are tiny), with several layers and both position tables.
    #[test]
    fn stepper_matches_forward_on_8x8() -> Result<()> {
        for positions in [Positions::Learned, Positions::RowCol] {
            let n = net(&small(positions), (8, 8), (4, conformance::LEVELS), true)?;
            conformance::stepper_matches_forward(&n).map_err(candle_core::Error::msg)?;
        }
        Ok(())
    }

    /// Row-column positions are row d / W plus column d mod W.
    #[test]
    fn row_col_positions_add_row_and_column() -> Result<()> {
        let row = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?; // H = 2, C = 1
        let col = Tensor::new(&[[10f32], [20.], [30.]], &Device::Cpu)?; // W = 3
        let t = PositionTable::RowCol { row, col, w: 3 };
        assert_eq!(t.all(6)?.flatten_all()?.to_vec1::<f32>()?, vec![11., 21., 31., 12., 22., 32.]);
        assert_eq!(t.at(4)?.flatten_all()?.to_vec1::<f32>()?, vec![22.]);
        Ok(())
    }

    /// Levels are tokens: inputs level / (K - 1) map back to their level, the start token is K.
    #[test]
    fn inputs_become_level_tokens() -> Result<()> {
        let n = net(&small(Positions::Learned), (1, 4), (2, 5), true)?;
        let x = Tensor::new(&[0f32, 0.25, 0.75, 1.0], &Device::Cpu)?;
        assert_eq!(n.token_ids(&x)?.to_vec1::<u32>()?, vec![0, 1, 3, 4]);
        Ok(())
    }
}
