//! Networks over image grids of several resolutions, written as a list of nodes and evaluated
//! two ways from the same list: whole grids at once (training, evaluation), and one cell at a
//! time, each cell as soon as every pixel it depends on has been sampled (the cached stepper).
//! PixelCNN++ (Salimans et al. 2017, §2.3-2.4, Fig. 2) is such a network: two streams of
//! shifted convolutions that go down in resolution with stride-2 convolutions and back up with
//! stride-2 transposed convolutions, with skip connections between the passes.
//!
//! Grids are channels-last (B, h*w, C) at their own resolution. A convolution is a tap list, as
//! in [`super::conv2d`], plus a resampling that says which input cell tap (dy, dx) of output
//! cell (r, c) reads:
//! - `Same`: (r + dy, c + dx);
//! - `Down2` (stride 2): (2r + dy, 2c + dx) of the finer grid; the coarse grid is ceil(h/2) x
//!   ceil(w/2), so any size works;
//! - `Up2` (stride-2 transposed convolution): the transposed convolution equals a convolution
//!   over the coarse grid spread onto the fine one with zeros between (coarse cell (i, j) at
//!   fine (2i, 2j)), so tap (dy, dx) reads coarse cell ((r + dy) / 2, (c + dx) / 2) when both
//!   are even, and zero otherwise.
//!
//! Every tap exists only where it reads a cell, so the stepper can tell when a cell is final:
//! its "ready" count (how many pixels must be known) is the largest over the cells it reads,
//! and a pixel p makes p + 1 of them known.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use arm_core::{Conditional, Result, Stepper};
use arm_kernels::{concat_elu, concat_elu_masked, glu_residual, Unfold};

use super::linear::torch_uniform;
use super::conv2d::local_mask;
use super::{linear, Dropout, Linear};

pub type NodeId = usize;

/// How a convolution's output grid relates to its input grid (module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Same,
    Down2,
    /// To the given finer grid (h, w), which must halve (rounding up) to the input grid.
    Up2((usize, usize)),
}

/// A convolution between grids over a tap list: (B, n_in, C_in) -> (B, n_out, C_out).
pub struct GridConv {
    w: Tensor, // (taps * C_in, C_out), tap-major rows
    b: Tensor, // (C_out,)
    taps: Vec<(isize, isize)>,
    resample: Resample,
    from: (usize, usize),
    to: (usize, usize),
    /// Same resolution: the fused im2col of the kernels crate.
    unfold: Option<Unfold>,
    /// Resampled: for every (output cell, tap), the input cell read, or n_in for a zero.
    index: Option<Tensor>,
}

fn inside((h, w): (usize, usize), r: isize, c: isize) -> Option<usize> {
    (r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w).then(|| r as usize * w + c as usize)
}

impl GridConv {
    fn new(
        cin: usize,
        cout: usize,
        taps: Vec<(isize, isize)>,
        resample: Resample,
        from: (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        if taps.is_empty() {
            candle_core::bail!("grid conv: no taps");
        }
        let to = match resample {
            Resample::Same => from,
            Resample::Down2 => (from.0.div_ceil(2), from.1.div_ceil(2)),
            Resample::Up2(to) => {
                if (to.0.div_ceil(2), to.1.div_ceil(2)) != from {
                    candle_core::bail!("grid conv: {to:?} does not halve to {from:?}");
                }
                to
            }
        };
        let init = torch_uniform(taps.len() * cin);
        let w = vb.get_with_hints((taps.len() * cin, cout), "weight", init)?;
        let b = vb.get_with_hints(cout, "bias", init)?;
        let mut conv = GridConv { w, b, taps, resample, from, to, unfold: None, index: None };
        if resample == Resample::Same {
            conv.unfold = Some(Unfold { height: from.0, width: from.1, taps: conv.taps.clone(), mask: None });
        } else {
            let n_in = from.0 * from.1;
            let index: Vec<u32> = (0..to.0 * to.1)
                .flat_map(|pos| conv.taps.iter().map(move |&tap| (pos, tap)))
                .map(|(pos, tap)| conv.source(pos, tap).unwrap_or(n_in) as u32)
                .collect();
            conv.index = Some(Tensor::new(index, vb.device())?);
        }
        Ok(conv)
    }

    /// Input cell read by `tap` of output cell `pos`; None for a zero.
    pub fn source(&self, pos: usize, (dy, dx): (isize, isize)) -> Option<usize> {
        let (r0, c0) = ((pos / self.to.1) as isize, (pos % self.to.1) as isize);
        let (r, c) = (r0 + dy, c0 + dx);
        match self.resample {
            Resample::Same => inside(self.from, r, c),
            Resample::Down2 => inside(self.from, 2 * r0 + dy, 2 * c0 + dx),
            Resample::Up2(_) if r % 2 == 0 && c % 2 == 0 => inside(self.from, r / 2, c / 2),
            Resample::Up2(_) => None,
        }
    }

    /// Whole grids: (B, n_in, C_in) -> (B, n_out, C_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(u) = &self.unfold {
            return arm_kernels::dense(x, &self.w, &self.b, Some(u), None);
        }
        let index = self.index.as_ref().ok_or_else(|| candle_core::Error::Msg("grid conv: no index".into()))?;
        let (b, _, c) = x.dims3()?;
        let padded = Tensor::cat(&[x, &Tensor::zeros((b, 1, c), x.dtype(), x.device())?], 1)?;
        let cols = padded.index_select(index, 1)?; // (B, n_out * taps, C_in)
        let cols = cols.reshape((b, self.to.0 * self.to.1, self.taps.len() * c))?;
        arm_kernels::dense(&cols, &self.w, &self.b, None, None) // (B, n_out, C_out)
    }

    /// forward(x) + lin(a) as one product, a: (B, n_out, C_a); same resolution only.
    fn forward_with(&self, x: &Tensor, a: &Tensor, lin: &Linear) -> Result<Tensor> {
        match &self.unfold {
            Some(u) => arm_kernels::dense_pair(x, u, &self.w, &self.b, a, &lin.w, &lin.b),
            None => self.forward(x)? + lin.forward(a)?,
        }
    }

    /// One output cell from the input cells computed so far, (B, C_out).
    fn forward_cell(&self, pos: usize, cells: &[Option<Tensor>], zero: &Tensor) -> Result<Tensor> {
        let cols = self
            .taps
            .iter()
            .map(|&tap| match self.source(pos, tap) {
                None => Ok(zero.clone()),
                Some(src) => cells[src].clone().ok_or_else(|| {
                    candle_core::Error::Msg(format!("tap {tap:?} of cell {pos} reads uncomputed cell {src}"))
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        arm_kernels::dense(&Tensor::cat(&cols, 1)?, &self.w, &self.b, None, None)
    }

    fn cin(&self) -> usize {
        self.w.dim(0).unwrap_or(0) / self.taps.len()
    }

    fn flops(&self) -> f64 {
        let (k, n) = (self.w.elem_count() as f64, (self.to.0 * self.to.1) as f64);
        2.0 * k * n
    }
}

enum Op {
    /// The image, one cell per pixel: (2x - 1, 1), the constant channel telling the
    /// convolutions where the image ends (PixelCNN++ pads its input with ones the same way).
    Input,
    Conv(NodeId, GridConv),
    /// conv(x) + nin(a) as one product (same resolution).
    ConvNin(NodeId, GridConv, NodeId, Linear),
    Nin(NodeId, Linear),
    ConcatElu(NodeId),
    /// dropout(concat_elu(x)), one op in training.
    ConcatEluDropout(NodeId),
    Elu(NodeId),
    /// x + glu(a).
    GluResidual(NodeId, NodeId),
    Concat(NodeId, NodeId),
    /// Fixed coordinates per cell: ((r - h/2) / h, (c - w/2) / w) (PixelSNAIL's background).
    Background,
    /// Multi-head attention of query cell p over key / value cells j < p (raster order).
    Attention { q: NodeId, k: NodeId, v: NodeId, heads: usize, strict: bool },
}

struct Node {
    op: Op,
    grid: (usize, usize),
    channels: usize,
    /// For a convolution of a network that reads a conditioning vector c: the map V with
    /// V c added to every cell (the conditional PixelCNN's bias, van den Oord et al. 2016, eq. 4).
    cond: Option<Linear>,
}

/// The node list; nodes only read earlier nodes, the last one is the output.
pub struct GridNet {
    nodes: Vec<Node>,
    dropout: Dropout,
    image: (usize, usize),
    /// Rank of every pixel when the convolutions are locally masked (another order than
    /// raster, Jain et al. 2020); None for the shifted raster-order kernels.
    local: Option<Arc<[usize]>>,
    /// The attention's gathers into and out of that order, built on the first forward pass.
    local_gathers: OnceLock<(Tensor, Tensor)>,
    /// Width of the conditioning vector every later convolution reads (0: none).
    cond_dim: usize,
}

impl GridNet {
    /// A network for (h, w) images; node 0 is the input. `dropout` acts inside every `concat_elu_dropout` node.
    pub fn new(image: (usize, usize), dropout: Dropout) -> Self {
        GridNet {
            nodes: vec![Node { op: Op::Input, grid: image, channels: 2, cond: None }],
            dropout,
            image,
            local: None,
            local_gathers: OnceLock::new(),
            cond_dim: 0,
        }
    }

    /// Every later convolution adds a linear map of a conditioning vector of `cond_dim`
    /// entries (0: none) to its output.
    pub fn conditioned(mut self, cond_dim: usize) -> Self {
        self.cond_dim = cond_dim;
        self
    }

    pub fn cond_dim(&self) -> usize {
        self.cond_dim
    }

    /// The conditioning map of a new convolution with `cout` outputs, when the network reads one.
    fn cond_map(&self, cout: usize, vb: &VarBuilder) -> Result<Option<Linear>> {
        match self.cond_dim {
            0 => Ok(None),
            n => Ok(Some(linear(n, cout, vb.pp("cond"))?)),
        }
    }

    /// Every later convolution locally masked for the ordering of `rank` (None: as given):
    /// each tap kept where it reads an earlier pixel, or (except on the input) the location
    /// itself. Only same-resolution convolutions can be masked this way.
    pub fn locally_masked(mut self, rank: Option<Arc<[usize]>>) -> Self {
        self.local = rank;
        self
    }

    /// Masks a new same-resolution convolution reading node `x`, when locally masked.
    fn mask(&self, x: NodeId, conv: &mut GridConv) -> Result<()> {
        let Some(rank) = &self.local else { return Ok(()) };
        let Some(u) = conv.unfold.as_mut() else {
            candle_core::bail!("a locally masked network has no down- or up-sampling");
        };
        u.mask = Some(local_mask(rank, self.image, &u.taps, x == Self::INPUT));
        Ok(())
    }

    /// (perm, rank) as index tensors: cells into the local ordering and back.
    fn local_gathers(&self, rank: &[usize], dev: &Device) -> Result<(Tensor, Tensor)> {
        if let Some(g) = self.local_gathers.get() {
            return Ok(g.clone());
        }
        let index = |p: &[usize]| Tensor::new(p.iter().map(|&j| j as u32).collect::<Vec<_>>(), dev);
        let g = (index(&arm_core::invert(rank))?, index(rank)?);
        Ok(self.local_gathers.get_or_init(|| g).clone())
    }

    pub const INPUT: NodeId = 0;

    fn push(&mut self, op: Op, grid: (usize, usize), channels: usize) -> NodeId {
        self.nodes.push(Node { op, grid, channels, cond: None });
        self.nodes.len() - 1
    }

    fn push_conditioned(&mut self, op: Op, grid: (usize, usize), channels: usize, cond: Option<Linear>) -> NodeId {
        self.nodes.push(Node { op, grid, channels, cond });
        self.nodes.len() - 1
    }

    pub fn grid(&self, x: NodeId) -> (usize, usize) {
        self.nodes[x].grid
    }

    pub fn channels(&self, x: NodeId) -> usize {
        self.nodes[x].channels
    }

    pub fn conv(&mut self, x: NodeId, taps: &[(isize, isize)], resample: Resample, cout: usize, vb: VarBuilder) -> Result<NodeId> {
        let cond = self.cond_map(cout, &vb)?;
        let mut conv = GridConv::new(self.nodes[x].channels, cout, taps.to_vec(), resample, self.nodes[x].grid, vb)?;
        self.mask(x, &mut conv)?;
        let grid = conv.to;
        Ok(self.push_conditioned(Op::Conv(x, conv), grid, cout, cond))
    }

    /// conv(x) + nin(a) at x's resolution, one product.
    pub fn conv_nin(&mut self, x: NodeId, taps: &[(isize, isize)], cout: usize, a: NodeId, vb: VarBuilder) -> Result<NodeId> {
        self.same_grid(x, a)?;
        let mut conv = GridConv::new(self.nodes[x].channels, cout, taps.to_vec(), Resample::Same, self.nodes[x].grid, vb.pp("conv"))?;
        self.mask(x, &mut conv)?;
        let lin = linear(self.nodes[a].channels, cout, vb.pp("nin"))?;
        let cond = self.cond_map(cout, &vb)?;
        Ok(self.push_conditioned(Op::ConvNin(x, conv, a, lin), self.nodes[x].grid, cout, cond))
    }

    /// x + glu(a), a with twice x's channels.
    pub fn glu_residual(&mut self, x: NodeId, a: NodeId) -> Result<NodeId> {
        self.same_grid(x, a)?;
        if 2 * self.nodes[x].channels != self.nodes[a].channels {
            candle_core::bail!("grid net: gating {} channels into {}", self.nodes[a].channels, self.nodes[x].channels);
        }
        Ok(self.push(Op::GluResidual(x, a), self.nodes[x].grid, self.nodes[x].channels))
    }

    /// 1x1 convolution ("network in network").
    pub fn nin(&mut self, x: NodeId, cout: usize, vb: VarBuilder) -> Result<NodeId> {
        let lin = linear(self.nodes[x].channels, cout, vb)?;
        Ok(self.push(Op::Nin(x, lin), self.nodes[x].grid, cout))
    }

    pub fn concat_elu(&mut self, x: NodeId) -> NodeId {
        self.push(Op::ConcatElu(x), self.nodes[x].grid, 2 * self.nodes[x].channels)
    }

    pub fn concat_elu_dropout(&mut self, x: NodeId) -> NodeId {
        self.push(Op::ConcatEluDropout(x), self.nodes[x].grid, 2 * self.nodes[x].channels)
    }

    pub fn elu(&mut self, x: NodeId) -> NodeId {
        self.push(Op::Elu(x), self.nodes[x].grid, self.nodes[x].channels)
    }

    fn same_grid(&self, a: NodeId, b: NodeId) -> Result<()> {
        if self.nodes[a].grid != self.nodes[b].grid {
            candle_core::bail!("grid net: nodes {a} and {b} are on {:?} and {:?}", self.nodes[a].grid, self.nodes[b].grid);
        }
        Ok(())
    }

    pub fn concat(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.same_grid(a, b)?;
        Ok(self.push(Op::Concat(a, b), self.nodes[a].grid, self.nodes[a].channels + self.nodes[b].channels))
    }

    /// PixelSNAIL's background channels at the input's resolution.
    pub fn background(&mut self) -> NodeId {
        self.push(Op::Background, self.image, 2)
    }

    /// Strictly causal multi-head attention (`layers::strict_causal_attention`); `strict =
    /// false` lets a cell see its own key (for tests that show the checks catch it).
    pub fn attention(&mut self, q: NodeId, k: NodeId, v: NodeId, heads: usize, strict: bool) -> Result<NodeId> {
        self.same_grid(q, k)?;
        self.same_grid(q, v)?;
        let (ck, cv) = (self.nodes[k].channels, self.nodes[v].channels);
        if heads == 0 || self.nodes[q].channels != ck || ck % heads != 0 || cv % heads != 0 {
            candle_core::bail!("grid net: attention with {heads} heads over {ck} key and {cv} value channels");
        }
        Ok(self.push(Op::Attention { q, k, v, heads, strict }, self.nodes[q].grid, cv))
    }

    fn background_cells(&self, device: &Device) -> Result<Tensor> {
        let (h, w) = self.image;
        let v: Vec<f32> = (0..h * w)
            .flat_map(|p| [((p / w) as f32 - h as f32 / 2.0) / h as f32, ((p % w) as f32 - w as f32 / 2.0) / w as f32])
            .collect();
        Tensor::from_vec(v, (1, h * w, 2), device)
    }

    pub fn begin_epoch(&self, epoch: usize) {
        self.dropout.begin_epoch(epoch);
    }

    /// x: (B, h*w) pixels in [0, 1] -> the last node, (B, h*w, C).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.cond_dim > 0 {
            candle_core::bail!("grid net: built to read a conditioning vector of width {}", self.cond_dim);
        }
        self.forward_cond(x, None, train)
    }

    /// `forward_t` with conditioning vectors c, (B or 1, cond_dim), for a conditioned network.
    pub fn forward_cond(&self, x: &Tensor, c: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let mut vals: Vec<Tensor> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let v = match &node.op {
                Op::Input => input_cells(&x.unsqueeze(2)?)?,
                Op::Conv(a, conv) => conv.forward(&vals[*a])?,
                Op::ConvNin(x, conv, a, lin) => conv.forward_with(&vals[*x], &vals[*a], lin)?,
                Op::Nin(a, lin) => lin.forward(&vals[*a])?,
                Op::ConcatElu(a) => concat_elu(&vals[*a])?,
                Op::ConcatEluDropout(a) if self.dropout.active(train) => {
                    let x = &vals[*a];
                    let (b, n, c) = x.dims3()?;
                    concat_elu_masked(x, &self.dropout.mask(&(b, n, 2 * c).into(), x.device())?)?
                }
                Op::ConcatEluDropout(a) => concat_elu(&vals[*a])?,
                Op::Elu(a) => vals[*a].elu(1.0)?,
                Op::GluResidual(x, a) => glu_residual(&vals[*x], &vals[*a])?,
                Op::Concat(a, b) => Tensor::cat(&[&vals[*a], &vals[*b]], D::Minus1)?,
                Op::Background => self.background_cells(x.device())?.broadcast_as((x.dim(0)?, x.dim(1)?, 2))?.contiguous()?,
                Op::Attention { q, k, v, heads, strict } => match &self.local {
                    None => super::strict_causal_attention(&vals[*q], &vals[*k], &vals[*v], *heads, *strict)?,
                    // Another ordering: the cells in that order, causal attention, back. The
                    // mask is then rank[key] < rank[query], the ordering's own.
                    Some(rank) => {
                        let (perm, rank) = self.local_gathers(rank, x.device())?;
                        let [q, k, v] = [q, k, v].map(|n| vals[*n].index_select(&perm, 1));
                        super::strict_causal_attention(&q?, &k?, &v?, *heads, *strict)?.index_select(&rank, 1)?
                    }
                },
            };
            let v = match (&node.cond, c) {
                (Some(map), Some(c)) => v.broadcast_add(&map.forward(c)?.unsqueeze(1)?)?, // + (Bc, 1, C)
                (Some(_), None) => candle_core::bail!("grid net: a conditioned network needs its conditioning vector"),
                _ => v,
            };
            vals.push(v);
        }
        vals.pop().ok_or_else(|| candle_core::Error::Msg("grid net: no nodes".into()))
    }

    /// Matrix-product FLOPs of one forward pass per image.
    pub fn flops_per_image(&self) -> f64 {
        let n = |id: NodeId| (self.nodes[id].grid.0 * self.nodes[id].grid.1) as f64;
        self.nodes
            .iter()
            .enumerate()
            .map(|(id, node)| match &node.op {
                Op::Conv(_, conv) => conv.flops(),
                Op::ConvNin(_, conv, _, lin) => conv.flops() + 2.0 * lin.w.elem_count() as f64 * n(id),
                Op::Nin(_, lin) => 2.0 * lin.w.elem_count() as f64 * n(id),
                // Scores and weighted sums over all N x N pairs (the masked half is computed too).
                Op::Attention { k, v, .. } => {
                    2.0 * n(id) * n(id) * (self.nodes[*k].channels + self.nodes[*v].channels) as f64
                }
                _ => 0.0,
            })
            .sum()
    }

    /// For every node and cell, how many pixels (in raster order) must be known to compute it.
    pub fn ready(&self) -> Vec<Vec<usize>> {
        let mut ready: Vec<Vec<usize>> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let cells = node.grid.0 * node.grid.1;
            let r = match &node.op {
                Op::Input => (1..=cells).collect(),
                Op::Conv(a, conv) => (0..cells)
                    .map(|pos| conv.taps.iter().filter_map(|&t| conv.source(pos, t)).map(|s| ready[*a][s]).max().unwrap_or(0))
                    .collect(),
                Op::ConvNin(x, conv, a, _) => (0..cells)
                    .map(|pos| {
                        let from_x = conv.taps.iter().filter_map(|&t| conv.source(pos, t)).map(|s| ready[*x][s]).max();
                        from_x.unwrap_or(0).max(ready[*a][pos])
                    })
                    .collect(),
                Op::Background => vec![0; cells],
                Op::Attention { q, k, v, strict, .. } => {
                    let mut seen = 0; // pixels needed by the keys and values before cell p
                    (0..cells)
                        .map(|p| {
                            let own = if *strict { 0 } else { ready[*k][p].max(ready[*v][p]) };
                            let r = ready[*q][p].max(seen).max(own);
                            seen = seen.max(ready[*k][p]).max(ready[*v][p]);
                            r
                        })
                        .collect()
                }
                Op::Concat(a, b) | Op::GluResidual(a, b) => ready[*a].iter().zip(&ready[*b]).map(|(x, y)| *x.max(y)).collect(),
                Op::Nin(a, _) | Op::ConcatElu(a) | Op::ConcatEluDropout(a) | Op::Elu(a) => ready[*a].clone(),
            };
            ready.push(r);
        }
        ready
    }

    /// The cells (node, cell) that cell q of node m reads.
    fn reads(&self, m: NodeId, q: usize) -> Vec<(NodeId, usize)> {
        let taps = |x: NodeId, conv: &GridConv| -> Vec<(NodeId, usize)> {
            conv.taps.iter().filter_map(|&t| conv.source(q, t)).map(|s| (x, s)).collect()
        };
        match &self.nodes[m].op {
            Op::Input | Op::Background => vec![],
            Op::Conv(x, conv) => taps(*x, conv),
            Op::ConvNin(x, conv, a, _) => {
                let mut r = taps(*x, conv);
                r.push((*a, q));
                r
            }
            Op::Nin(a, _) | Op::ConcatElu(a) | Op::ConcatEluDropout(a) | Op::Elu(a) => {
                vec![(*a, q)]
            }
            Op::Concat(a, b) | Op::GluResidual(a, b) => vec![(*a, q), (*b, q)],
            Op::Attention { q: qn, k, v, strict, .. } => {
                let keys = if *strict { q } else { q + 1 };
                let mut r = vec![(*qn, q)];
                r.extend((0..keys).flat_map(|j| [(*k, j), (*v, j)]));
                r
            }
        }
    }

    /// For every node and cell, the last step at which the stepper reads it (a cell with ready
    /// count r is computed at step r; the output's cell p is read at step p); usize::MAX for
    /// cells never read.
    fn last_read(&self, ready: &[Vec<usize>]) -> Vec<Vec<usize>> {
        let mut last: Vec<Vec<Option<usize>>> = ready.iter().map(|r| vec![None; r.len()]).collect();
        for (m, rm) in ready.iter().enumerate() {
            for (q, &step) in rm.iter().enumerate() {
                for (n, c) in self.reads(m, q) {
                    let slot = &mut last[n][c];
                    *slot = Some(slot.map_or(step, |s| s.max(step)));
                }
            }
        }
        if let Some(out) = last.last_mut() {
            for (p, slot) in out.iter_mut().enumerate() {
                *slot = Some(slot.map_or(p, |s| s.max(p)));
            }
        }
        last.into_iter().map(|l| l.into_iter().map(|s| s.unwrap_or(usize::MAX)).collect()).collect()
    }

    /// The cached stepper (module header): every cell of every node is computed once, and
    /// dropped after the last step that reads it, so the cache holds a band of rows per layer
    /// (all of them for attention keys and values).
    pub fn stepper(&self, batch: usize, device: &Device) -> Result<Box<dyn Stepper + '_>> {
        Ok(Box::new(GridStepper::new(self, batch, device, None)?))
    }

    /// The cached stepper of a conditioned network for conditioning vectors c (B or 1, cond_dim).
    pub fn stepper_cond(&self, batch: usize, device: &Device, c: &Tensor) -> Result<Box<dyn Stepper + '_>> {
        Ok(Box::new(GridStepper::new(self, batch, device, Some(c))?))
    }
}

impl<'a> GridStepper<'a> {
    fn new(net: &'a GridNet, batch: usize, device: &Device, c: Option<&Tensor>) -> Result<Self> {
        let ready = net.ready();
        let d = net.image.0 * net.image.1;
        let out = ready.last().ok_or_else(|| candle_core::Error::Msg("grid net: no nodes".into()))?;
        if let Some(p) = (0..d).find(|&p| out[p] > p) {
            candle_core::bail!("grid net: output cell {p} needs {} pixels (not causal)", out[p]);
        }
        let sorted = |r: &Vec<usize>| {
            let mut cells: Vec<usize> = (0..r.len()).collect();
            cells.sort_by_key(|&c| r[c]);
            cells
        };
        let order = ready.iter().map(sorted).collect();
        let last_read = net.last_read(&ready);
        let drop_order = last_read.iter().map(sorted).collect();
        // Every conditioned node's bias V c, (B or 1, C), once for the whole sample.
        let cond_bias = net
            .nodes
            .iter()
            .map(|n| match (&n.cond, c) {
                (Some(map), Some(c)) => map.forward(c).map(Some),
                (Some(_), None) => candle_core::bail!("grid net: a conditioned network needs its conditioning vector"),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GridStepper {
            cond_bias,
            net,
            batch,
            device: device.clone(),
            pos: 0,
            pixels: Vec::with_capacity(d),
            cells: net.nodes.iter().map(|n| vec![None; n.grid.0 * n.grid.1]).collect(),
            next: vec![0; net.nodes.len()],
            dropped: vec![0; net.nodes.len()],
            ready,
            order,
            last_read,
            drop_order,
            zeros: HashMap::new(),
            kv: HashMap::new(),
            out: None,
        })
    }
}

/// A [`GridNet`] as a `Conditional` over (B, h*w) images in raster order, with its cached
/// stepper.
pub struct GridConditional {
    net: GridNet,
    name: &'static str,
    device: Device,
}

impl GridConditional {
    pub fn new(name: &'static str, net: GridNet, device: Device) -> Self {
        GridConditional { net, name, device }
    }
}

impl Conditional for GridConditional {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.seq_len() {
            candle_core::bail!("{}: input has {d} pixels, built for {}", self.name, self.seq_len());
        }
        self.net.forward_t(x, train) // (B, D, P)
    }

    fn cond_dim(&self) -> usize {
        self.net.cond_dim
    }

    fn forward_cond(&self, x: &Tensor, c: &Tensor, train: bool) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.seq_len() || self.net.cond_dim == 0 || c.dim(1)? != self.net.cond_dim {
            candle_core::bail!("{}: {d} pixels and a conditioning vector of width {}", self.name, c.dim(1)?);
        }
        self.net.forward_cond(x, Some(c), train) // (B, D, P)
    }

    fn stepper_cond(&self, batch: usize, c: &Tensor) -> Result<Option<Box<dyn Stepper + '_>>> {
        if self.net.local.is_some() {
            return Ok(None);
        }
        Ok(Some(self.net.stepper_cond(batch, &self.device, c)?))
    }

    fn seq_len(&self) -> usize {
        self.net.image.0 * self.net.image.1
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn begin_epoch(&self, epoch: usize) {
        self.net.begin_epoch(epoch);
    }

    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        if self.net.local.is_some() {
            return Ok(Box::new(arm_core::NaiveStepper::new(self, batch)?));
        }
        self.net.stepper(batch, &self.device)
    }

    fn flops_per_image(&self) -> Option<f64> {
        Some(self.net.flops_per_image())
    }
}

/// Builds a [`GridNet`] from named layers: weights are named `conv.N`, `nin.N`, `conv_nin.N` in
/// the order the layers are added, so a network's checkpoints depend only on its structure.
pub struct GridBuilder<'a> {
    pub g: GridNet,
    vb: VarBuilder<'a>,
    n: usize,
}

impl<'a> GridBuilder<'a> {
    pub fn new(g: GridNet, vb: VarBuilder<'a>) -> Self {
        GridBuilder { g, vb, n: 0 }
    }

    pub fn finish(self) -> GridNet {
        self.g
    }

    fn name(&mut self, what: &str) -> VarBuilder<'a> {
        self.n += 1;
        self.vb.pp(format!("{what}.{}", self.n))
    }

    pub fn conv(&mut self, x: NodeId, taps: &[(isize, isize)], resample: Resample, cout: usize) -> Result<NodeId> {
        let vb = self.name("conv");
        self.g.conv(x, taps, resample, cout, vb)
    }

    pub fn nin(&mut self, x: NodeId, cout: usize) -> Result<NodeId> {
        let vb = self.name("nin");
        self.g.nin(x, cout, vb)
    }

    /// PixelCNN++'s gated ResNet block over `taps` (Salimans et al. 2017, §2.5 of the code
    /// release), with as many channels as v:
    ///   v + glu(conv(dropout(celu(conv(celu(v)) + nin(celu(a))))))
    /// with celu = concat_elu and glu([p, q]) = p sigmoid(q); `a` is an optional auxiliary input.
    pub fn gated_resnet(&mut self, v: NodeId, a: Option<NodeId>, taps: &[(isize, isize)]) -> Result<NodeId> {
        let f = self.g.channels(v);
        let cv = self.g.concat_elu(v);
        let c1 = match a {
            None => self.conv(cv, taps, Resample::Same, f)?,
            Some(a) => {
                let ca = self.g.concat_elu(a);
                let vb = self.name("conv_nin");
                self.g.conv_nin(cv, taps, f, ca, vb)?
            }
        };
        let c1 = self.g.concat_elu_dropout(c1);
        let c2 = self.conv(c1, taps, Resample::Same, 2 * f)?;
        self.g.glu_residual(v, c2)
    }
}

/// (B, N, 1) pixels in [0, 1] -> (B, N, 2) cells (2x - 1, 1).
fn input_cells(x: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[&x.affine(2.0, -1.0)?, &x.ones_like()?], D::Minus1)
}

struct GridStepper<'a> {
    net: &'a GridNet,
    batch: usize,
    device: Device,
    pos: usize,
    pixels: Vec<Tensor>, // (B, 1) each
    /// cells[node][cell]: (B, C) once computed.
    cells: Vec<Vec<Option<Tensor>>>,
    /// next[node]: how many cells of `order[node]` are computed.
    next: Vec<usize>,
    ready: Vec<Vec<usize>>,
    order: Vec<Vec<usize>>,
    /// last_read[node][cell]: the last step that reads the cell; drop_order sorts cells by it
    /// and dropped[node] counts those released.
    last_read: Vec<Vec<usize>>,
    drop_order: Vec<Vec<usize>>,
    dropped: Vec<usize>,
    zeros: HashMap<usize, Tensor>,
    /// Per attention node: key and value buffers (B, H, h*w, d) and how many cells they hold.
    kv: HashMap<NodeId, (Tensor, Tensor, usize)>,
    out: Option<Tensor>,
    /// Per node: the conditioning bias its cells add, (B or 1, C).
    cond_bias: Vec<Option<Tensor>>,
}

impl GridStepper<'_> {
    /// Keys and values of cells 0..n of an attention node's inputs, (B, H, n, d) each: views
    /// of buffers sized for every pixel, filled in place as cells arrive (no copy of the past).
    fn kv_cache(&mut self, id: NodeId, (k, v): (NodeId, NodeId), heads: usize, n: usize) -> Result<(Tensor, Tensor)> {
        if !self.kv.contains_key(&id) {
            let cells = self.net.image.0 * self.net.image.1;
            let buffer = |node: NodeId| {
                let c = self.net.nodes[node].channels;
                Tensor::zeros((self.batch, heads, cells, c / heads), DType::F32, &self.device)
            };
            self.kv.insert(id, (buffer(k)?, buffer(v)?, 0));
        }
        let have = self.kv.get(&id).map_or(0, |e| e.2);
        for j in have..n {
            let (kj, vj) = (self.cell(k, j)?.clone(), self.cell(v, j)?.clone());
            let entry = self.kv.get_mut(&id).ok_or_else(|| candle_core::Error::Msg("stepper: no attention cache".into()))?;
            for (buf, cell) in [(&entry.0, kj), (&entry.1, vj)] {
                let d = buf.dim(3)?;
                buf.slice_set(&cell.reshape((self.batch, heads, 1, d))?, 2, j)?;
            }
            entry.2 = j + 1;
        }
        let (kc, vc, _) = self.kv.get(&id).ok_or_else(|| candle_core::Error::Msg("stepper: no attention cache".into()))?;
        Ok((kc.narrow(2, 0, n)?, vc.narrow(2, 0, n)?)) // a cell computed out of order reads fewer
    }

    fn zero(&mut self, channels: usize) -> Result<Tensor> {
        if let Some(z) = self.zeros.get(&channels) {
            return Ok(z.clone());
        }
        let z = Tensor::zeros((self.batch, channels), DType::F32, &self.device)?;
        self.zeros.insert(channels, z.clone());
        Ok(z)
    }

    fn cell(&self, node: NodeId, q: usize) -> Result<&Tensor> {
        self.cells[node][q]
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("stepper: cell {q} of node {node} not computed yet")))
    }

    fn compute(&mut self, id: NodeId, q: usize) -> Result<Tensor> {
        let net = self.net;
        match &net.nodes[id].op {
            Op::Input => input_cells(&self.pixels[q].unsqueeze(1)?)?.squeeze(1),
            Op::Conv(a, conv) => {
                let zero = self.zero(conv.cin())?;
                conv.forward_cell(q, &self.cells[*a], &zero)
            }
            Op::ConvNin(x, conv, a, lin) => {
                let zero = self.zero(conv.cin())?;
                conv.forward_cell(q, &self.cells[*x], &zero)? + lin.forward(self.cell(*a, q)?)?
            }
            Op::Nin(a, lin) => lin.forward(self.cell(*a, q)?),
            Op::ConcatElu(a) | Op::ConcatEluDropout(a) => concat_elu(self.cell(*a, q)?), // evaluation mode
            Op::Elu(a) => self.cell(*a, q)?.elu(1.0),
            Op::GluResidual(x, a) => glu_residual(self.cell(*x, q)?, self.cell(*a, q)?),
            Op::Concat(a, b) => Tensor::cat(&[self.cell(*a, q)?, self.cell(*b, q)?], 1),
            Op::Background => {
                let cell = net.background_cells(&self.device)?.narrow(1, q, 1)?.squeeze(1)?; // (1, 2)
                cell.broadcast_as((self.batch, 2))?.contiguous()
            }
            Op::Attention { q: qn, k, v, heads, strict } => {
                let keys = if *strict { q } else { q + 1 };
                if keys == 0 {
                    return self.zero(net.nodes[*v].channels);
                }
                let (kc, vc) = self.kv_cache(id, (*k, *v), *heads, keys)?;
                super::strict_causal_attention_step(self.cell(*qn, q)?, &kc, &vc)
            }
        }
    }
}

impl Stepper for GridStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if let Some(o) = &self.out {
            return Ok(o.clone());
        }
        let d = self.net.image.0 * self.net.image.1;
        if self.pos >= d {
            candle_core::bail!("stepper: all {d} positions are already filled");
        }
        for id in 0..self.net.nodes.len() {
            while let Some(&q) = self.order[id].get(self.next[id]) {
                if self.ready[id][q] > self.pos {
                    break;
                }
                let v = self.compute(id, q)?;
                let v = match &self.cond_bias[id] {
                    Some(b) => v.broadcast_add(b)?,
                    None => v,
                };
                self.cells[id][q] = Some(v);
                self.next[id] += 1;
            }
        }
        let last = self.net.nodes.len() - 1;
        let o = self.cell(last, self.pos)?.clone();
        for id in 0..self.net.nodes.len() {
            while let Some(&q) = self.drop_order[id].get(self.dropped[id]) {
                if self.last_read[id][q] > self.pos {
                    break;
                }
                self.cells[id][q] = None;
                self.dropped[id] += 1;
            }
        }
        self.out = Some(o.clone());
        Ok(o)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        if self.out.is_none() {
            self.params()?;
        }
        self.pixels.push(x_d.to_dtype(DType::F32)?.reshape((self.batch, 1))?);
        self.out = None;
        self.pos += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arm_core::seeded_var_builder;
    use candle_nn::VarMap;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_t(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The grid conv's kernel as a (C_out, C_in, kh, kw) tensor, tap (dy, dx) at (ky, kx) =
    /// (dy - dy0, dx - dx0) for taps listed over a full kh x kw window starting at (dy0, dx0).
    fn kernel(conv: &GridConv, cin: usize, (kh, kw): (usize, usize), at: impl Fn(isize, isize) -> (usize, usize)) -> Result<Tensor> {
        let w = conv.w.to_vec2::<f32>()?;
        let cout = w[0].len();
        let mut k = vec![0f32; cout * cin * kh * kw];
        for (t, &(dy, dx)) in conv.taps.iter().enumerate() {
            let (ky, kx) = at(dy, dx);
            for o in 0..cout {
                for ci in 0..cin {
                    k[((o * cin + ci) * kh + ky) * kw + kx] = w[t * cin + ci][o];
                }
            }
        }
        Tensor::from_vec(k, (cout, cin, kh, kw), &Device::Cpu)
    }

    fn nchw(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
    }

    fn channels_last(y: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = y.dims4()?;
        y.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
    }

    const DOWN: [(isize, isize); 6] = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1)];

    /// Stride 2 is PixelCNN++'s down-shifted convolution: pad one row on top and one column
    /// each side, then a 2x3 convolution with stride 2 (candle's conv2d as the reference).
    #[test]
    fn down2_equals_a_padded_strided_convolution() -> Result<()> {
        for (h, w) in [(4, 6), (5, 3), (8, 8)] {
            let (cin, cout) = (3, 2);
            let map = VarMap::new();
            let conv = GridConv::new(cin, cout, DOWN.to_vec(), Resample::Down2, (h, w), seeded_var_builder(&map, 1, &Device::Cpu))?;
            let x = rand_t(&[2, h * w, cin], 2)?;
            let k = kernel(&conv, cin, (2, 3), |dy, dx| ((dy + 1) as usize, (dx + 1) as usize))?;
            let padded = nchw(&x, (h, w))?.pad_with_zeros(2, 1, 0)?.pad_with_zeros(3, 1, 1)?;
            let want = channels_last(&padded.conv2d(&k, 0, 2, 1, 1)?)?.broadcast_add(&conv.b)?;
            let got = conv.forward(&x)?;
            assert_eq!(got.dims(), want.dims(), "{h}x{w}");
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{h}x{w}: {diff}");
        }
        Ok(())
    }

    /// Up2 is PixelCNN++'s down-shifted transposed convolution: a 2x3 transposed convolution with
    /// stride 2, cropped to rows [0, 2h) and columns [1, 2w + 1) (candle's conv_transpose2d as the
    /// reference); tap (dy, dx) is kernel cell (-dy, 1 - dx).
    #[test]
    fn up2_equals_a_cropped_transposed_convolution() -> Result<()> {
        for (h, w) in [(2, 3), (4, 4)] {
            let (cin, cout) = (2, 3);
            let map = VarMap::new();
            let to = (2 * h, 2 * w);
            let conv = GridConv::new(cin, cout, DOWN.to_vec(), Resample::Up2(to), (h, w), seeded_var_builder(&map, 4, &Device::Cpu))?;
            let x = rand_t(&[2, h * w, cin], 5)?;
            // conv_transpose2d wants (C_in, C_out, kh, kw).
            let k = kernel(&conv, cin, (2, 3), |dy, dx| ((-dy) as usize, (1 - dx) as usize))?;
            let k = k.permute((1, 0, 2, 3))?.contiguous()?;
            let full = nchw(&x, (h, w))?.conv_transpose2d(&k, 0, 0, 2, 1)?; // (B, C_out, 2h, 2w + 1)
            let want = channels_last(&full.narrow(2, 0, 2 * h)?.narrow(3, 1, 2 * w)?)?.broadcast_add(&conv.b)?;
            let got = conv.forward(&x)?;
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{h}x{w}: {diff}");
        }
        Ok(())
    }

    /// The stepper of a small two-level network reproduces its forward rows, and holds only a
    /// band of rows per layer: at most 3 rows of 8 cells (24 of 64) of any full-resolution node
    /// at any step, instead of every cell it ever computed.
    #[test]
    fn stepper_matches_forward_and_drops_cells_it_no_longer_needs() -> Result<()> {
        const ABOVE: [(isize, isize); 3] = [(-1, -1), (-1, 0), (-1, 1)];
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 2, &Device::Cpu);
        let mut g = GridNet::new((8, 8), Dropout::new(0.0, 0));
        let a = g.conv(GridNet::INPUT, &ABOVE, Resample::Same, 3, vb.pp("a"))?; // rows above only
        let a = g.concat_elu(a);
        let down = g.conv(a, &DOWN, Resample::Down2, 4, vb.pp("down"))?;
        let up = g.conv(down, &DOWN, Resample::Up2((8, 8)), 6, vb.pp("up"))?;
        let b = g.conv(a, &DOWN, Resample::Same, 3, vb.pp("b"))?;
        let b = g.glu_residual(b, up)?;
        g.nin(b, 2, vb.pp("out"))?;
        let x = rand_t(&[2, 64], 3)?.affine(0.5, 0.5)?;
        let full = g.forward_t(&x, false)?;
        let mut st = GridStepper::new(&g, 2, &Device::Cpu, None)?;
        let mut most = 0;
        for p in 0..64 {
            let got = st.params()?;
            let diff = (got - full.narrow(1, p, 1)?.squeeze(1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "position {p}: {diff}");
            st.push(&x.narrow(1, p, 1)?.squeeze(1)?)?;
            let live = st.cells.iter().filter(|c| c.len() == 64).map(|c| c.iter().filter(|x| x.is_some()).count()).max();
            most = most.max(live.unwrap_or(0));
        }
        assert!(most <= 24, "{most} cells held at once");
        Ok(())
    }

    /// Gradients of the gathered (resampled) convolution match central differences.
    #[test]
    fn resampled_convolutions_have_the_right_input_gradient() -> Result<()> {
        for resample in [Resample::Down2, Resample::Up2((6, 4))] {
            let from = if resample == Resample::Down2 { (5, 4) } else { (3, 2) };
            let map = VarMap::new();
            let conv = GridConv::new(2, 2, DOWN.to_vec(), resample, from, seeded_var_builder(&map, 6, &Device::Cpu))?;
            let x = candle_core::Var::from_tensor(&rand_t(&[1, from.0 * from.1, 2], 7)?)?;
            let loss = |t: &Tensor| -> Result<f64> { conv.forward(t)?.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>() };
            let g = conv.forward(x.as_tensor())?.sqr()?.sum_all()?.backward()?;
            let g = g.get(&x).expect("gradient").flatten_all()?.to_vec1::<f32>()?;
            let xv = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for i in 0..xv.len() {
                let shifted = |e: f32| -> Result<f64> {
                    let mut v = xv.clone();
                    v[i] += e;
                    loss(&Tensor::from_vec(v, x.shape(), &Device::Cpu)?)
                };
                let num = (shifted(1e-2)? - shifted(-1e-2)?) / 2e-2;
                assert!((num - g[i] as f64).abs() < 1e-2 * (1.0 + num.abs()), "{resample:?} input {i}: {num} vs {}", g[i]);
            }
        }
        Ok(())
    }
}
