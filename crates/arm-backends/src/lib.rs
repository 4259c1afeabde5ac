//! Conditional plugins (one file each), their registry and shared layers.

pub mod causal_conv1d;
pub mod conv2d;
pub mod dense;
mod fastmath;
pub mod fused;
pub mod gated_pixelcnn;
mod kernels;
pub mod layers;
pub mod markov;
pub mod mlp;
pub mod pixelcnn;
mod registry;
pub mod rnn;
mod simd;
pub mod timeconv;
pub mod unfold;

pub use registry::{invalid, plugin, plugin_names, registry, BuildCtx, Plugin, PluginConfig, PluginError};
