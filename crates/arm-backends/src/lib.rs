//! Conditional plugins (one file each), their registry and shared layers.

pub mod causal_conv1d;
pub mod layers;
mod registry;
pub mod unfold;

pub use registry::{invalid, plugin, plugin_names, registry, BuildCtx, Plugin, PluginConfig, PluginError};
