//! Building blocks shared by the plugins: channels-last causal convolution as im2col + one
//! matmul, a linear layer with PyTorch's default initialisation, seeded dropout, LeakyReLU.
//!
//! Causal Conv1d (van den Oord et al. 2016, WaveNet, §2.1): output d sees inputs
//! d - shift - t * dilation for taps t = 0..k. Option A (shift 1) cannot see position d itself
//! and is used for the first layer; option B (shift 0) can, and is used after it.
//! Convolutions are im2col over the k taps times one (k * C_in, C_out) weight matrix, with the
//! bias and activation, as the single op of [`crate::dense`]: candle's gemm is much faster than
//! its conv kernels, and one op keeps candle's per-node gradient bookkeeping out of the step.

pub mod conv2d;

use std::sync::Mutex;

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use arm_core::Result;

/// PyTorch's default for Linear and Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
fn torch_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// y = x W + b over the last dimension; x (..., in) -> (..., out).
#[derive(Debug, Clone)]
pub struct Linear {
    w: Tensor, // (in, out)
    b: Tensor, // (out,)
}

pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    let init = torch_uniform(inp);
    Ok(Linear { w: vb.get_with_hints((inp, out), "weight", init)?, b: vb.get_with_hints(out, "bias", init)? })
}

impl Linear {
    /// (W, b).
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.w, &self.b)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, None, None)
    }

    /// ReLU(x W + b), one op.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, None, Some(0.0))
    }
}

/// The output head of the 2D plugins: ReLU, 1x1, ReLU, 1x1; (..., C) -> (..., P).
pub fn relu_head(head: &[Linear; 2], h: &Tensor) -> Result<Tensor> {
    let h = head[0].forward_relu(&h.relu()?)?; // (..., C), the second ReLU inside the op
    head[1].forward(&h) // (..., P)
}

/// Zero-pads `x` (B, D, C) with `front` positions at the start of the sequence.
pub fn pad_front(x: &Tensor, front: usize) -> Result<Tensor> {
    if front == 0 {
        return Ok(x.clone());
    }
    let (b, _, c) = x.dims3()?;
    let z = Tensor::zeros((b, front, c), x.dtype(), x.device())?;
    Tensor::cat(&[&z, x], 1)
}

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
    w: Tensor, // (k * C_in, C_out), tap-major rows
    b: Tensor, // (C_out,)
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

    /// The taps as an unfold: tap t reads position d - shift - t*dilation (zeros before the start).
    fn unfold(&self, d: usize) -> arm_kernels::Unfold {
        let taps = (0..self.kernel).map(|t| (0isize, -((self.shift + t * self.dilation) as isize))).collect();
        arm_kernels::Unfold { height: 1, width: d, taps }
    }

    /// (B, D, C_in) -> (B, D, C_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, Some(&self.unfold(x.dim(1)?)), None)
    }

    /// LeakyReLU(conv(x)), one fused op.
    pub fn forward_leaky(&self, x: &Tensor, slope: f64) -> Result<Tensor> {
        arm_kernels::dense(x, &self.w, &self.b, Some(&self.unfold(x.dim(1)?)), Some(slope))
    }

    /// The same layer on time-major activations (see [`crate::timeconv`]): h is
    /// (pad_in + D, B, C_in) with `pad_in` >= [`Self::reach`] zero steps in front; the result is
    /// (pad_out + D, B, C_out), LeakyReLU'd when `slope` is given. CPU and f32 only.
    pub fn forward_time_major(&self, h: &Tensor, pad_in: usize, pad_out: usize, slope: Option<f64>) -> Result<Tensor> {
        let shifts = (0..self.kernel).map(|t| self.shift + t * self.dilation).collect();
        let op = arm_kernels::TimeConv::new(shifts, pad_in, pad_out, slope);
        arm_kernels::time_conv(&op, h, &self.w, &self.b)
    }

    /// Whether [`Self::forward_time_major`] can run on `x`.
    pub fn time_major_ok(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && [x.dtype(), self.w.dtype(), self.b.dtype()].iter().all(|&d| d == DType::F32)
    }

    /// One output position from its k inputs, oldest last: taps[t] = input at d - shift - t*dil
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

/// LeakyReLU as max(x, slope x), valid for slope in [0, 1].
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    x.maximum(&x.affine(slope, 0.0)?)
}

/// Inverted dropout whose masks come from a seeded stream (candle's CPU RNG cannot be
/// seeded), so training runs are reproducible.
#[derive(Debug)]
pub struct Dropout {
    p: f64,
    seed: u64,
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        let seed = seed ^ 0xD80F_0u64;
        Self { p, seed, rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) }
    }

    /// Restarts the mask stream at `epoch` (one ChaCha8 stream per epoch).
    pub fn begin_epoch(&self, epoch: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch as u64);
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = rng;
    }

    /// Whether [`Self::forward_t`] changes anything (training with p > 0).
    pub fn active(&self, train: bool) -> bool {
        train && self.p > 0.0
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let n = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..n).map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
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
                    let back = conv.shift + t * conv.dilation;
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
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

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
}
