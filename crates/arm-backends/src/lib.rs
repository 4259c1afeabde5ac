//! Conditional plugins (one file each under `plugins/`), the layers they are made of
//! (`layers/`), and the registry that maps a name in an experiment file to a plugin.
//! Plugins compose layers; layers call the fused ops of `arm-kernels`.

pub mod conformance;
pub mod layers;
pub mod ordered;
pub mod plugins;
mod registry;

pub use registry::{invalid, plugin, plugin_names, registry, BuildCtx, Plugin, PluginConfig, PluginError};
