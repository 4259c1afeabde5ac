//! Causal Conv1d (van den Oord et al. 2016, WaveNet, §2.1): output d sees inputs
//! d - shift - t * dilation for taps t = 0..k. Option A (shift 1) cannot see position d itself
//! and is used for the first layer; option B (shift 0) can, and is used after it.
//!
//! A layer is one fused op of `arm-kernels`: on the CPU, activations of a [`CausalConvStack`]
//! are kept time-major, (reach + D, B, C) with zero steps in front, so every tap is a gemm on a
//! shifted view ([`arm_kernels::time_conv`]); elsewhere a layer is im2col over its taps and one
//! matmul ([`arm_kernels::dense`]). Both layouts give the same values (tested below).
//! The stack's `step` computes one position from cached layer inputs (Paine et al. 2016, "Fast
//! WaveNet generation"): one k-tap product per layer instead of a full pass.

use std::collections::VecDeque;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use arm_core::Result;
use arm_kernels::Unfold;

use super::linear::torch_uniform;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CausalMode {
    /// Cannot see the current position (first layer).
    A,
    /// Sees the current position.
    B,
}

/// Channels-last causal Conv1d: (B, D, C_in) -> (B, D, C_out).
#[derive(Debug, Clone)]
pub struct CausalConv1d {
    pub(crate) w: Tensor, // (k * C_in, C_out), tap-major rows
    pub(crate) b: Tensor, // (C_out,)
    kernel: usize,
    dilation: usize,
    shift: usize,
}

pub fn causal_conv1d(
    cin: usize,
    cout: usize,
    kernel: usize,
    dilation: usize,
    mode: CausalMode,
    vb: VarBuilder,
) -> Result<CausalConv1d> {
    let init = torch_uniform(cin * kernel);
    Ok(CausalConv1d {
        w: vb.get_with_hints((kernel * cin, cout), "weight", init)?,
        b: vb.get_with_hints(cout, "bias", init)?,
        kernel,
        dilation,
        shift: usize::from(mode == CausalMode::A),
    })
}

impl CausalConv1d {
    /// Farthest look-back: how many earlier positions the output at d can reach.
    pub fn reach(&self) -> usize {
        self.shift + (self.kernel - 1) * self.dilation
    }

    /// How far back tap t reads.
    fn back(&self, t: usize) -> usize {
        self.shift + t * self.dilation
    }

    /// The taps as an unfold: tap t reads position d - back(t) (zeros before the start).
    fn unfold(&self, d: usize) -> Unfold {
        let taps = (0..self.kernel).map(|t| (0isize, -(self.back(t) as isize))).collect();
        Unfold { height: 1, width: d, taps, mask: None }
    }

    /// (B, D, C_in) -> (B, D, C_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, Some(&self.unfold(x.dim(1)?)), None)
    }

    /// LeakyReLU(conv(x)), one fused op.
    pub fn forward_leaky(&self, x: &Tensor, slope: f64) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, Some(&self.unfold(x.dim(1)?)), Some(slope))
    }

    /// The same layer on time-major activations: h is (pad_in + D, B, C_in) with `pad_in` >=
    /// [`Self::reach`] zero steps in front; the result is (pad_out + D, B, C_out), LeakyReLU'd
    /// when `slope` is given. CPU and f32 only.
    pub fn forward_time_major(&self, h: &Tensor, pad_in: usize, pad_out: usize, slope: Option<f64>) -> Result<Tensor> {
        let shifts = (0..self.kernel).map(|t| self.back(t)).collect();
        let op = arm_kernels::TimeConv::new(shifts, pad_in, pad_out, slope);
        arm_kernels::time_conv(&op, h, &self.w, &self.b)
    }

    /// Whether [`Self::forward_time_major`] can run on `x`.
    pub fn time_major_ok(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && [x.dtype(), self.w.dtype(), self.b.dtype()].iter().all(|&d| d == DType::F32)
    }

    /// One output position from its k inputs, oldest last: taps[t] = input at d - back(t)
    /// (zeros before the start). taps: (B, k*C) -> (B, C_out).
    pub fn forward_taps(&self, taps: &Tensor) -> Result<Tensor> {
        taps.matmul(&self.w)?.broadcast_add(&self.b)
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }
    pub fn dilation(&self) -> usize {
        self.dilation
    }
    pub fn shift(&self) -> usize {
        self.shift
    }
}

/// Causal convolutions in sequence, LeakyReLU between them: h_1 = a(conv_1(x)),
/// h_l = a(conv_l(h_{l-1})), y = conv_L(h_{L-1}); the first layer is option A, the rest
/// option B, so y at d depends on x_<d only.
#[derive(Debug, Clone)]
pub struct CausalConvStack {
    layers: Vec<CausalConv1d>,
    slope: f64,
}

/// `dilations.len()` layers: C_in -> hidden -> ... -> hidden -> C_out, kernel k each, under
/// `vb.pp("layers.{i}")`.
pub fn causal_conv_stack(
    (cin, hidden, cout): (usize, usize, usize),
    kernel: usize,
    dilations: &[usize],
    slope: f64,
    vb: VarBuilder,
) -> Result<CausalConvStack> {
    let n = dilations.len();
    if n == 0 {
        candle_core::bail!("causal_conv_stack: no layers");
    }
    let mut layers = Vec::with_capacity(n);
    for (i, &dil) in dilations.iter().enumerate() {
        let (c_in, c_out) = (if i == 0 { cin } else { hidden }, if i + 1 == n { cout } else { hidden });
        let mode = if i == 0 { CausalMode::A } else { CausalMode::B };
        layers.push(causal_conv1d(c_in, c_out, kernel, dil, mode, vb.pp(format!("layers.{i}")))?);
    }
    Ok(CausalConvStack { layers, slope })
}

impl CausalConvStack {
    /// x (B, D) one channel per position -> (B, D, C_out); `between` is applied to every
    /// hidden activation (dropout).
    pub fn forward(&self, x: &Tensor, between: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if self.layers.iter().all(|l| l.time_major_ok(x)) {
            return self.forward_time_major(x, between);
        }
        self.forward_batch_major(x, between)
    }

    /// The CPU path: activations kept time-major, (reach + D, B, C) with the next layer's
    /// reach of zero steps in front, so every layer is gemms on shifted views. Transposed
    /// once on the way in (B x D values) and out (B x D x C_out).
    fn forward_time_major(&self, x: &Tensor, between: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let reach: Vec<usize> = self.layers.iter().map(|l| l.reach()).collect();
        let mut h = x.t()?.contiguous()?.unsqueeze(2)?.pad_with_zeros(0, reach[0], 0)?; // (r0 + D, B, 1)
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            if i < last {
                h = layer.forward_time_major(&h, reach[i], reach[i + 1], Some(self.slope))?;
                h = between(&h)?;
            } else {
                h = layer.forward_time_major(&h, reach[i], 0, None)?; // (D, B, C_out)
            }
        }
        h.transpose(0, 1)?.contiguous() // (B, D, C_out)
    }

    /// The device-agnostic path: (B, D, C) activations, im2col convolutions.
    fn forward_batch_major(&self, x: &Tensor, between: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mut h = x.unsqueeze(2)?; // (B, D, 1)
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = if i < last { between(&layer.forward_leaky(&h, self.slope)?)? } else { layer.forward(&h)? };
        }
        Ok(h) // (B, D, C_out)
    }

    /// An empty cache for generating `batch` sequences one position at a time.
    pub fn cache(&self, batch: usize) -> ConvCache {
        // Each layer keeps the inputs its furthest tap still reads, no more: a cache that kept
        // every position grew by a cell per layer and step, and the allocator then served
        // each step's temporaries from fresh pages (PERF.md, "Huge pages").
        let keep = self.layers.iter().map(|c| (0..c.kernel).map(|t| c.back(t)).max().unwrap_or(0) + 1).collect();
        ConvCache { batch, pos: 0, inputs: vec![VecDeque::new(); self.layers.len()], base: vec![0; self.layers.len()], keep }
    }

    /// The output at the cache's position, (B, C_out), from every layer's cached inputs; the
    /// hidden layers' outputs at this position are cached for later positions. Call once per
    /// position, before [`ConvCache::push`].
    pub fn step(&self, cache: &mut ConvCache) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let dev = self.layers[0].w.device();
        for (l, layer) in self.layers.iter().enumerate() {
            let cin = if l == 0 { 1 } else { cache.inputs[l].front().map_or(0, |t| t.dim(1).unwrap_or(0)) };
            let zero = Tensor::zeros((cache.batch, cin.max(1)), DType::F32, dev)?;
            let taps = (0..layer.kernel())
                .map(|t| match cache.pos.checked_sub(layer.back(t)) {
                    Some(j) => cache.inputs[l][j - cache.base[l]].clone(),
                    None => zero.clone(),
                })
                .collect::<Vec<_>>();
            let o = layer.forward_taps(&Tensor::cat(&taps, 1)?)?; // (B, C_out)
            if l < last {
                cache.keep_input(l + 1, arm_kernels::leaky_relu(&o, self.slope)?);
            } else {
                return Ok(o);
            }
        }
        candle_core::bail!("causal_conv_stack: no layers")
    }
}

/// Cached generation state of a [`CausalConvStack`]: `inputs[l][d - base[l]]` is layer l's
/// input at position d, (B, C_l), for the last `keep[l]` positions.
pub struct ConvCache {
    batch: usize,
    pos: usize,
    inputs: Vec<VecDeque<Tensor>>,
    base: Vec<usize>,
    keep: Vec<usize>,
}

impl ConvCache {
    /// Feeds the value chosen at the current position, (B,) or (B, 1), and moves on.
    pub fn push(&mut self, x_d: &Tensor) -> Result<()> {
        self.keep_input(0, x_d.reshape((self.batch, 1))?);
        self.pos += 1;
        Ok(())
    }

    fn keep_input(&mut self, l: usize, x: Tensor) {
        self.inputs[l].push_back(x);
        while self.inputs[l].len() > self.keep[l] {
            self.inputs[l].pop_front();
            self.base[l] += 1;
        }
    }
}

/// Straightforward reference for tests: a loop over positions and taps.
pub fn causal_conv1d_reference(conv: &CausalConv1d, x: &Tensor) -> Result<Tensor> {
    let (b, d, c) = x.dims3()?;
    let xv = x.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let w = conv.w.to_vec2::<f32>()?; // (k*C, Cout)
    let bias = conv.b.to_vec1::<f32>()?;
    let cout = bias.len();
    let mut out = vec![0f32; b * d * cout];
    for bi in 0..b {
        for di in 0..d {
            for o in 0..cout {
                let mut acc = bias[o];
                for t in 0..conv.kernel {
                    let back = conv.back(t);
                    if back > di {
                        continue;
                    }
                    for ci in 0..c {
                        acc += xv[bi][di - back][ci] * w[t * c + ci][o];
                    }
                }
                out[(bi * d + di) * cout + o] = acc;
            }
        }
    }
    Tensor::from_vec(out, (b, d, cout), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arm_kernels::leaky_relu;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Zero-pads `x` (B, D, C) with `front` positions at the start of the sequence.
    fn pad_front(x: &Tensor, front: usize) -> Result<Tensor> {
        if front == 0 {
            return Ok(x.clone());
        }
        let (b, _, c) = x.dims3()?;
        let z = Tensor::zeros((b, front, c), x.dtype(), x.device())?;
        Tensor::cat(&[&z, x], 1)
    }

    fn rand_input(b: usize, d: usize, c: usize, seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..b * d * c).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, (b, d, c), &Device::Cpu)
    }

    /// (kernel, dilation, mode) of the convolution tests.
    const CASES: [(usize, usize, CausalMode); 5] = [
        (1, 1, CausalMode::B),
        (2, 1, CausalMode::A),
        (3, 2, CausalMode::B),
        (7, 1, CausalMode::A),
        (3, 4, CausalMode::A),
    ];

    #[test]
    fn im2col_conv_equals_the_loop_in_values_and_gradients() -> Result<()> {
        for (k, dil, mode) in CASES {
            let map = VarMap::new();
            let vb = arm_core::seeded_var_builder(&map, 3, &Device::Cpu);
            let conv = causal_conv1d(3, 4, k, dil, mode, vb)?;
            let x = Var::from_tensor(&rand_input(2, 10, 3, 5)?)?;
            let fast = conv.forward(x.as_tensor())?;
            let slow = causal_conv1d_reference(&conv, x.as_tensor())?;
            let diff = (&fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "k={k} dil={dil}: max diff {diff}");
            // Gradient w.r.t. the input against finite differences of the reference.
            let grads = fast.sqr()?.sum_all()?.backward()?;
            let g = grads.get(&x).expect("input gradient").to_vec3::<f32>()?;
            let xv = x.as_tensor().to_vec3::<f32>()?;
            let loss = |xv: &Vec<Vec<Vec<f32>>>| -> Result<f64> {
                let flat: Vec<f32> = xv.iter().flatten().flatten().copied().collect();
                let t = Tensor::from_vec(flat, (2, 10, 3), &Device::Cpu)?;
                causal_conv1d_reference(&conv, &t)?.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
            };
            for (bi, di, ci) in [(0, 0, 0), (1, 9, 2), (0, 4, 1)] {
                let eps = 1e-2f32;
                let mut up = xv.clone();
                up[bi][di][ci] += eps;
                let mut dn = xv.clone();
                dn[bi][di][ci] -= eps;
                let num = (loss(&up)? - loss(&dn)?) / (2.0 * eps as f64);
                let ana = g[bi][di][ci] as f64;
                assert!((num - ana).abs() < 1e-2 * (1.0 + ana.abs()), "grad k={k}: {num} vs {ana}");
            }
        }
        Ok(())
    }

    /// The convolution composed from candle ops (pad, narrow, matmul per tap), differentiable
    /// by candle's own autograd: the straightforward implementation the fused op must equal.
    fn composed(conv: &CausalConv1d, x: &Tensor, leaky: Option<f64>) -> Result<Tensor> {
        let (b, d, c) = x.dims3()?;
        let mut acc = conv.b.unsqueeze(0)?.unsqueeze(0)?.broadcast_as((b, d, conv.w.dim(1)?))?.contiguous()?;
        for t in 0..conv.kernel {
            let back = conv.shift + t * conv.dilation;
            let wt = conv.w.narrow(0, t * c, c)?; // (C_in, C_out)
            let shifted = pad_front(x, back)?.narrow(1, 0, d)?; // x at d - back, zeros before
            acc = (acc + shifted.reshape((b * d, c))?.matmul(&wt)?.reshape((b, d, conv.w.dim(1)?))?)?;
        }
        match leaky {
            Some(s) => leaky_relu(&acc, s),
            None => Ok(acc),
        }
    }

    #[test]
    fn fused_conv_equals_composed_ops_in_values_and_all_gradients() -> Result<()> {
        for (k, dil, mode) in CASES {
            // Wider and narrower outputs: both formulations of the fused op.
            for (cin, cout) in [(3, 4), (6, 2)] {
                for leaky in [None, Some(0.01)] {
                    let map = VarMap::new();
                    let vb = arm_core::seeded_var_builder(&map, 7, &Device::Cpu);
                    let conv = causal_conv1d(cin, cout, k, dil, mode, vb)?;
                    let x = Var::from_tensor(&rand_input(2, 12, cin, 8)?)?;
                    let probe = rand_input(2, 12, cout, 9)?;
                    let fast = match leaky {
                        Some(s) => conv.forward_leaky(x.as_tensor(), s)?,
                        None => conv.forward(x.as_tensor())?,
                    };
                    let slow = composed(&conv, x.as_tensor(), leaky)?;
                    let what = format!("k={k} dil={dil} {mode:?} {cin}->{cout} leaky={leaky:?}");
                    let max = |a: &Tensor, b: &Tensor| -> Result<f32> {
                        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
                    };
                    assert!(max(&fast, &slow)? < 1e-5, "{what}: values");
                    let gf = (&fast * &probe)?.sum_all()?.backward()?;
                    let gs = (&slow * &probe)?.sum_all()?.backward()?;
                    let (w, b) = (&conv.w, &conv.b);
                    for (v, name) in [(x.as_tensor(), "dx"), (w, "dW"), (b, "db")] {
                        let d = max(gf.get(v).expect("grad"), gs.get(v).expect("grad"))?;
                        assert!(d < 1e-4, "{what}: {name} differs by {d}");
                    }
                }
            }
        }
        Ok(())
    }

    /// The time-major layer (all three routes: unfold, per-tap views, output side) against
    /// the composed ops, in values, in the zero padding it writes and in all gradients.
    #[test]
    fn time_major_conv_equals_composed_ops_in_values_and_all_gradients() -> Result<()> {
        let max = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        for (k, dil, mode) in CASES {
            for (cin, cout) in [(3, 4), (6, 2), (64, 70), (70, 5)] {
                for leaky in [None, Some(0.01)] {
                    let map = VarMap::new();
                    let vb = arm_core::seeded_var_builder(&map, 11, &Device::Cpu);
                    let conv = causal_conv1d(cin, cout, k, dil, mode, vb)?;
                    let (bsz, d) = (3, 12);
                    let x = Var::from_tensor(&rand_input(bsz, d, cin, 12)?)?;
                    let probe = rand_input(bsz, d, cout, 13)?;
                    // One more padding step than needed, and 2 steps in front of the output.
                    let pad_in = conv.reach() + 1;
                    let xt = x.as_tensor().transpose(0, 1)?.contiguous()?.pad_with_zeros(0, pad_in, 0)?;
                    let out = conv.forward_time_major(&xt, pad_in, 2, leaky)?;
                    let what = format!("k={k} dil={dil} {mode:?} {cin}->{cout} leaky={leaky:?}");
                    assert_eq!(out.dims(), &[2 + d, bsz, cout], "{what}");
                    assert_eq!(out.narrow(0, 0, 2)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0, "{what}: padding");
                    let fast = out.narrow(0, 2, d)?.transpose(0, 1)?;
                    let slow = composed(&conv, x.as_tensor(), leaky)?;
                    assert!(max(&fast, &slow)? < 1e-4, "{what}: values differ by {}", max(&fast, &slow)?);
                    let gf = (&fast * &probe)?.sum_all()?.backward()?;
                    let gs = (&slow * &probe)?.sum_all()?.backward()?;
                    for (v, name) in [(x.as_tensor(), "dx"), (&conv.w, "dW"), (&conv.b, "db")] {
                        let diff = max(gf.get(v).expect("grad"), gs.get(v).expect("grad"))?;
                        assert!(diff < 1e-4, "{what}: {name} differs by {diff}");
                    }
                    // A second backward through the same graph (the kept columns were taken).
                    let again = (&fast * &probe)?.sum_all()?.backward()?;
                    assert!(max(again.get(&conv.w).expect("grad"), gs.get(&conv.w).expect("grad"))? < 1e-4, "{what}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn option_a_excludes_the_current_position() -> Result<()> {
        let map = VarMap::new();
        let vb = arm_core::seeded_var_builder(&map, 1, &Device::Cpu);
        let a = causal_conv1d(1, 2, 3, 1, CausalMode::A, vb.pp("a"))?;
        let b = causal_conv1d(1, 2, 3, 1, CausalMode::B, vb.pp("b"))?;
        let x = rand_input(1, 6, 1, 0)?;
        let mut bumped = x.to_vec3::<f32>()?;
        bumped[0][3][0] += 1.0;
        let flat: Vec<f32> = bumped.into_iter().flatten().flatten().collect();
        let x2 = Tensor::from_vec(flat, (1, 6, 1), &Device::Cpu)?;
        let changed = |conv: &CausalConv1d| -> Result<Vec<bool>> {
            let d = (conv.forward(&x)? - conv.forward(&x2)?)?.abs()?.sum(2)?.squeeze(0)?.to_vec1::<f32>()?;
            Ok(d.iter().map(|v| *v > 0.0).collect())
        };
        // Kernel 3: A sees d-1..d-3, B sees d..d-2.
        assert_eq!(changed(&a)?, vec![false, false, false, false, true, true]);
        assert_eq!(changed(&b)?, vec![false, false, false, true, true, true]);
        Ok(())
    }

    /// The CPU's time-major stack against the device-agnostic batch-major one (each layer of
    /// which is tested against a loop and composed ops above), in values and in the gradients
    /// of every weight: narrow (unfold), wide (per-tap) and output-side layers, dilations,
    /// both modes.
    #[test]
    fn time_major_stack_equals_batch_major_in_values_and_gradients() -> Result<()> {
        let cfgs: [(usize, usize, &[usize], f64); 5] =
            [(5, 2, &[1], 0.1), (5, 3, &[1, 1], 0.1), (5, 2, &[1, 2, 4], 0.1), (5, 3, &[2, 1, 3], 0.1), (70, 3, &[1, 2, 1], 0.01)];
        for (i, (channels, kernel, dils, slope)) in cfgs.into_iter().enumerate() {
            let (b, d, p) = (3, 12, 4);
            let map = VarMap::new();
            let vb = arm_core::seeded_var_builder(&map, 5 + i as u64, &Device::Cpu);
            let stack = causal_conv_stack((1, channels, p), kernel, dils, slope, vb)?;
            let x = Tensor::from_vec(
                (0..b * d).map(|j| ((j * 7) % 17) as f32 / 16.0).collect::<Vec<_>>(),
                (b, d),
                &Device::Cpu,
            )?;
            let probe = Tensor::from_vec(
                (0..b * d * p).map(|j| ((j * 5) % 11) as f32 - 5.0).collect::<Vec<_>>(),
                (b, d, p),
                &Device::Cpu,
            )?;
            let same = |h: &Tensor| -> Result<Tensor> { Ok(h.clone()) };
            let fast = stack.forward_time_major(&x, same)?;
            let slow = stack.forward_batch_major(&x, same)?;
            let max =
                |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
            let what = format!("{channels} ch, k {kernel}, dilations {dils:?}");
            assert!(max(&fast, &slow)? < 1e-4, "{what}: values differ by {}", max(&fast, &slow)?);
            let gf = (&fast * &probe)?.sum_all()?.backward()?;
            let gs = (&slow * &probe)?.sum_all()?.backward()?;
            for v in map.all_vars() {
                let diff = max(gf.get(&v).expect("grad"), gs.get(&v).expect("grad"))?;
                assert!(diff < 1e-4, "{what}: a gradient of shape {:?} differs by {diff}", v.dims());
            }
            // The step-by-step path reproduces every row of the forward pass.
            let mut cache = stack.cache(b);
            for pos in 0..d {
                let row = stack.step(&mut cache)?;
                let diff = max(&row, &slow.narrow(1, pos, 1)?.squeeze(1)?)?;
                assert!(diff < 1e-5, "{what}: step {pos} differs by {diff}");
                cache.push(&x.narrow(1, pos, 1)?)?;
                // Only what the furthest tap of each layer still reads is held.
                for (l, inputs) in cache.inputs.iter().enumerate() {
                    let reach = (0..kernel).map(|t| stack.layers[l].back(t)).max().unwrap_or(0) + 1;
                    assert!(inputs.len() <= reach.min(pos + 1), "{what}: layer {l} holds {} at step {pos}", inputs.len());
                }
            }
        }
        Ok(())
    }
}
