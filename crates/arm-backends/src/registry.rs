//! The plugin registry: a name -> typed, serde-defaulted config and constructor.
//!
//! Adding a plugin: write one file with a config struct implementing [`PluginConfig`] and add
//! one line to [`registry`]. Registering enrols the plugin in `runner list`, in experiment-file
//! validation and in the conformance suite (`tests/conformance.rs`).

use std::sync::Arc;

use candle_core::Device;
use candle_nn::VarBuilder;
use serde::{de::DeserializeOwned, Serialize};

use arm_core::{Conditional, Ordering};

/// What a plugin constructor gets besides its own config.
pub struct BuildCtx<'a> {
    pub vb: VarBuilder<'a>,
    pub device: Device,
    pub height: usize,
    pub width: usize,
    /// P: parameters per pixel the head needs.
    pub num_params: usize,
    /// K: levels of the data. Inputs arrive as level / (K - 1), so a plugin that embeds levels
    /// as tokens recovers them with round(x (K - 1)).
    pub levels: usize,
    /// Seed for anything random inside the model at training time (dropout masks).
    pub seed: u64,
    /// For 2D plugins with [`PluginConfig::LOCAL_MASKS`]: the rank of every image pixel
    /// (row-major) in the ordering the network must be autoregressive in, built as locally
    /// masked convolutions over the image layout. None: the raster-order network.
    pub order: Option<Arc<[usize]>>,
    /// Width of the conditioning vector h the network reads (0: none); only plugins with
    /// [`PluginConfig::CONDITIONING`] take one (`Conditional::forward_cond`).
    pub cond_dim: usize,
}

impl<'a> BuildCtx<'a> {
    pub fn dims(&self) -> usize {
        self.height * self.width
    }

    /// The same context (same variables) for the locally masked network of `rank`.
    pub fn with_order(&self, rank: Option<Arc<[usize]>>) -> BuildCtx<'a> {
        BuildCtx {
            vb: self.vb.clone(),
            device: self.device.clone(),
            height: self.height,
            width: self.width,
            num_params: self.num_params,
            levels: self.levels,
            seed: self.seed,
            order: rank,
            cond_dim: self.cond_dim,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("unknown backend {0:?}: expected one of {1}")]
    Unknown(String, String),
    /// `key` is relative to the plugin's table.
    #[error("{key}: {msg}")]
    Invalid { key: String, msg: String },
    #[error("building the model: {0}")]
    Build(#[from] candle_core::Error),
}

pub fn invalid(key: &str, msg: impl Into<String>) -> PluginError {
    PluginError::Invalid { key: key.to_string(), msg: msg.into() }
}

/// A plugin's config: serde with `deny_unknown_fields` and `default`, checked by `validate`.
pub trait PluginConfig: Serialize + DeserializeOwned + Default + 'static {
    const NAME: &'static str;
    const SUMMARY: &'static str;
    /// 2D plugins read the image as (H, W): raster order, or any order with `LOCAL_MASKS`.
    const IS_2D: bool = false;
    /// A 2D plugin that builds locally masked convolutions when `BuildCtx::order` is set
    /// (Jain et al. 2020), so it takes every ordering.
    const LOCAL_MASKS: bool = false;
    /// Whether every output row depends on the input just before it (the conformance suite's
    /// liveness check); false for networks whose connectivity is sparse by design (MADE's
    /// random degrees leave some pairs unconnected).
    const SEES_PREDECESSOR: bool = true;
    /// Whether the network can read a conditioning vector (`BuildCtx::cond_dim`), as the
    /// decoder p(x|z) of a VAE.
    const CONDITIONING: bool = false;
    /// Checks values against each other and the image shape; errors name the key.
    fn validate(&self, height: usize, width: usize) -> Result<(), PluginError>;
    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError>;
    /// Checks the values that a locally masked network (another order than raster) cannot
    /// take; errors name the key.
    fn validate_local(&self) -> Result<(), PluginError> {
        Ok(())
    }
    /// Small configs for the conformance suite (a few variants that cover its options).
    fn test_configs() -> Vec<Self>;
    /// One-line help per key for `runner list`.
    fn key_docs() -> &'static [(&'static str, &'static str)];
}

/// A registered plugin with its typed config erased behind TOML tables.
pub struct Plugin {
    pub name: &'static str,
    pub summary: &'static str,
    pub is_2d: bool,
    /// Takes every ordering (1D plugins, and 2D plugins with locally masked convolutions).
    pub any_order: bool,
    pub sees_predecessor: bool,
    /// Reads a conditioning vector (a VAE decoder).
    pub conditioning: bool,
    pub key_docs: &'static [(&'static str, &'static str)],
    defaults: fn() -> toml::Table,
    resolve: fn(&toml::Table, usize, usize) -> Result<toml::Table, PluginError>,
    build: fn(&toml::Table, BuildCtx) -> Result<Box<dyn Conditional>, PluginError>,
    validate_local: fn(&toml::Table) -> Result<(), PluginError>,
    test_configs: fn() -> Vec<toml::Table>,
}

fn to_table<C: Serialize>(c: &C) -> toml::Table {
    toml::Table::try_from(c).unwrap_or_default()
}

fn parse<C: PluginConfig>(t: &toml::Table) -> Result<C, PluginError> {
    let v = toml::Value::Table(t.clone());
    serde_path_to_error::deserialize::<_, C>(v).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { String::new() } else { path };
        PluginError::Invalid { key, msg: e.into_inner().message().trim().to_string() }
    })
}

fn resolve_with<C: PluginConfig>(t: &toml::Table, h: usize, w: usize) -> Result<toml::Table, PluginError> {
    let c: C = parse(t)?;
    c.validate(h, w)?;
    Ok(to_table(&c))
}

fn build_with<C: PluginConfig>(t: &toml::Table, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
    let c: C = parse(t)?;
    c.validate(ctx.height, ctx.width)?;
    if ctx.cond_dim > 0 && !C::CONDITIONING {
        return Err(invalid("", format!("{} reads no conditioning input", C::NAME)));
    }
    c.build(ctx)
}

impl Plugin {
    pub fn of<C: PluginConfig>() -> Self {
        Plugin {
            name: C::NAME,
            summary: C::SUMMARY,
            is_2d: C::IS_2D,
            any_order: !C::IS_2D || C::LOCAL_MASKS,
            sees_predecessor: C::SEES_PREDECESSOR,
            conditioning: C::CONDITIONING,
            key_docs: C::key_docs(),
            defaults: || to_table(&C::default()),
            resolve: resolve_with::<C>,
            build: build_with::<C>,
            validate_local: |t| parse::<C>(t)?.validate_local(),
            test_configs: || C::test_configs().iter().map(to_table).collect(),
        }
    }

    /// The full default config.
    pub fn defaults(&self) -> toml::Table {
        (self.defaults)()
    }

    /// Parses a (partial) table, fills defaults and validates it for an H x W image; returns the
    /// complete resolved table.
    pub fn resolve(&self, t: &toml::Table, height: usize, width: usize) -> Result<toml::Table, PluginError> {
        (self.resolve)(t, height, width)
    }

    pub fn build(&self, t: &toml::Table, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        (self.build)(t, ctx)
    }

    /// Checks that the plugin, with table `t`, can be autoregressive in `orderings` (the first
    /// is the sampling order; more than one: order-agnostic training). Errors name the key.
    pub fn check_orderings(&self, t: &toml::Table, orderings: &[Ordering]) -> Result<(), PluginError> {
        if crate::ordered::needs_wrapper(self.is_2d, orderings) {
            if !self.any_order {
                let names: Vec<String> = orderings.iter().map(|o| o.name()).collect();
                return Err(invalid(
                    "",
                    format!("a 2D plugin without locally masked convolutions takes only raster order, got [{}]", names.join(", ")),
                ));
            }
            if self.is_2d {
                (self.validate_local)(t)?;
            }
        }
        Ok(())
    }

    /// Builds the network for `orderings` (see [`crate::ordered`]): the plain network for one
    /// ordering of a 1D plugin (the `Arm` permutes) or raster order of a 2D one; otherwise the
    /// members that share its weights, one per ordering. `eval_orders` members are averaged at
    /// evaluation.
    pub fn build_ordered(
        &self,
        t: &toml::Table,
        ctx: BuildCtx,
        orderings: &[Ordering],
        eval_orders: usize,
    ) -> Result<Box<dyn Conditional>, PluginError> {
        self.check_orderings(t, orderings)?;
        if !crate::ordered::needs_wrapper(self.is_2d, orderings) {
            return self.build(t, ctx);
        }
        crate::ordered::build(self, t, ctx, orderings, eval_orders)
    }

    pub fn test_configs(&self) -> Vec<toml::Table> {
        (self.test_configs)()
    }
}

/// Every plugin, one line each.
pub fn registry() -> Vec<Plugin> {
    vec![
        Plugin::of::<crate::plugins::causal_conv1d::CausalConv1dConfig>(),
        Plugin::of::<crate::plugins::mlp::MlpConfig>(),
        Plugin::of::<crate::plugins::rnn::RnnConfig>(),
        Plugin::of::<crate::plugins::pixelcnn::PixelCnnConfig>(),
        Plugin::of::<crate::plugins::gated_pixelcnn::GatedPixelCnnConfig>(),
        Plugin::of::<crate::plugins::pixelcnnpp::PixelCnnPpConfig>(),
        Plugin::of::<crate::plugins::fvsbn::FvsbnConfig>(),
        Plugin::of::<crate::plugins::nade::NadeConfig>(),
        Plugin::of::<crate::plugins::made::MadeConfig>(),
        Plugin::of::<crate::plugins::transformer::TransformerConfig>(),
        Plugin::of::<crate::plugins::pixelsnail::PixelSnailConfig>(),
        Plugin::of::<crate::plugins::markov::MarkovConfig>(),
    ]
}

pub fn plugin_names() -> Vec<&'static str> {
    registry().iter().map(|p| p.name).collect()
}

/// Looks a plugin up by name.
pub fn plugin(name: &str) -> Result<Plugin, PluginError> {
    registry()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| PluginError::Unknown(name.to_string(), plugin_names().join(", ")))
}
