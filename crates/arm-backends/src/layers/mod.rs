//! Layers: the types the plugins compose. Each holds its weights (created through the
//! plugin's `VarBuilder`, so seeds, checkpoints and the optimiser see them) and has a
//! `forward` over whole sequences or images and, where a plugin samples step by step, a `step`
//! (or `forward_at`) for one position. Layers call the fused ops of `arm-kernels`; plugins
//! never do.

pub mod attention;
pub mod conv1d;
pub mod conv2d;
pub mod draws;
mod dropout;
pub mod gated;
pub mod grid;
mod linear;
mod masked;
mod norm;
pub mod recurrent;
mod window;

pub use arm_kernels::{gelu, leaky_relu, running_sigmoid};
pub use attention::{
    causal_self_attention, strict_causal_attention, strict_causal_attention_step, CausalSelfAttention, KvCache,
};
pub use conv1d::{causal_conv1d, causal_conv_stack, CausalConv1d, CausalConvStack, CausalMode, ConvCache};
pub use conv2d::{local_conv2d, local_mask, masked_conv2d, tap_conv2d, window_taps, Mask, TapConv2d};
pub use draws::MemberDraws;
pub use dropout::Dropout;
pub use gated::{gated_block, CondBias, GatedBlock, Vertical};
pub use linear::{linear, output_mlp, Linear, OutputMlp};
pub use masked::{masked_linear, MaskedLinear};
pub use norm::{layer_norm, LayerNorm};
pub use recurrent::{cell, Cell, CellKind, State};
pub use window::{window, Window};
