//! Fused CPU ops of the ARM lab, each a candle custom op with a hand-written backward and an
//! equivalence test against the composed candle ops it replaces:
//! - [`dense`], [`dense_gated`], [`dense_pair`]: act(unfold(x) W + b), the gate of the layer
//!   that reads it, and two products summed, as one op each; on large 2D grids the unfold is
//!   replaced by products on a zero-padded copy of the grid (`implicit`: no im2col);
//! - [`time_conv`]: causal Conv1d on time-major activations, gemms on shifted views;
//! - [`Unfold`] / [`Fold`]: im2col over a tap list and its adjoint;
//! - [`gate`]: tanh(a) * sigmoid(b), the gated PixelCNN's unit; [`gated_stack`]: its layers as one op;
//! - [`gelu`]: the Transformer MLP's activation (tanh form);
//! - [`layer_norm`]: layer normalisation over the last dimension;
//! - [`softmax_last_dim`]: softmax over the last dimension (exact zeros for -inf);
//! - [`exclusive_cumsum`], [`running_sigmoid`]: prefix sums along a sequence, and NADE's hidden
//!   units sigmoid(c + sum_{j<d} x_j w_j) as one op;
//! - gemm on strided views, element-wise loops per SIMD level, vectorisable exp / tanh /
//!   sigmoid, and a profiler of named phases ([`profile`]);
//! - [`on_own_threads`]: independent parts of a loop of small calls, one thread each.
//!
//! This crate knows nothing of plugins or models: layers (`arm-backends`) call it, plugins
//! call layers. Off the CPU (or for other dtypes) every op composes candle's own ops.

mod cumsum;
mod attention;
mod celu;
mod dense;
mod fastmath;
mod gate;
mod gated_stack;
mod gelu;
mod layernorm;
mod prenorm;
mod gemm;
mod implicit;
pub mod profile;
mod running;
mod scratch;
mod simd;
mod softmax;
mod threads;
mod timeconv;
mod unfold;

pub use attention::{attention, attention_composed, attention_heads, attention_packed, AttnMask};
pub use celu::{concat_elu, concat_elu_masked, glu, glu_residual};
pub use cumsum::exclusive_cumsum;
pub use dense::{dense, dense_gated, dense_gelu, dense_pair};
pub use gate::gate;
pub use gated_stack::{gated_stack, gated_stack_composed, GatedLayer};
pub use gelu::gelu;
pub use layernorm::layer_norm;
pub use prenorm::{prenorm_composed, prenorm_residual, PreNormWeights, Sublayer};
pub use running::running_sigmoid;
pub use softmax::softmax_last_dim;
pub use threads::{on_own_threads, own_threads};
pub use timeconv::{time_conv, TimeConv};
pub use unfold::{Fold, Unfold};

/// Result type of the kernels: candle's error carries shape and op context.
pub type Result<T> = candle_core::Result<T>;

/// The f32 data of a contiguous CPU storage, for custom ops; `what` names it in the error.
pub fn cpu_f32<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, z))) => Ok(&v[a..z]),
        _ => candle_core::bail!("{what} must be contiguous f32"),
    }
}

/// [`cpu_f32`] for an op that writes in place.
pub fn cpu_f32_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, z))) => Ok(&mut v[a..z]),
        _ => candle_core::bail!("{what} must be contiguous f32"),
    }
}

/// LeakyReLU as max(x, slope x), valid for slope in [0, 1]: the composed form the fused ops
/// fall back to off the CPU.
pub fn leaky_relu(x: &candle_core::Tensor, slope: f64) -> Result<candle_core::Tensor> {
    x.maximum(&x.affine(slope, 0.0)?)
}
