//! `[model.vae]`: the latent space, the encoder, the prior and the ELBO's options.

use serde::{Deserialize, Serialize};

/// The prior p(z).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorKind {
    /// N(0, I).
    Standard,
    /// An autoregressive prior: a 1D plugin over the latent dimensions with a mixture of
    /// Gaussians per dimension.
    Arm,
}

/// The encoder q(z|x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// Two ReLU layers of `hidden` units.
    #[default]
    Mlp,
    /// Two 3x3 ReLU convolutions (`conv_channels`, then twice as many at stride 2), then a
    /// ReLU layer of `hidden` units.
    Conv,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_conv_channels() -> usize {
    16
}

fn is_default_conv_channels(v: &usize) -> bool {
    *v == default_conv_channels()
}

/// The 1D plugins an ARM prior can be: they read real-valued inputs (the others embed levels).
pub const PRIOR_BACKENDS: &[&str] = &["made", "mlp", "causal_conv1d", "rnn"];

/// The decoder that is not a plugin: every pixel independent given z.
pub const FACTORIZED: &str = "factorized";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeConfig {
    /// Latent dimensions.
    pub latent: usize,
    /// Width of the encoder's two hidden layers (and of the factorized decoder's one).
    pub hidden: usize,
    // Keys added after the first VAE runs: written only when set, so those runs keep their ids.
    #[serde(skip_serializing_if = "is_default")]
    pub encoder: EncoderKind,
    /// Channels of the conv encoder's first convolution.
    #[serde(skip_serializing_if = "is_default_conv_channels", default = "default_conv_channels")]
    pub conv_channels: usize,
    pub prior: PriorKind,
    /// The ARM prior's network (one of [`PRIOR_BACKENDS`]).
    pub prior_backend: String,
    /// Its settings (the plugin's keys; defaults fill the rest).
    pub prior_net: toml::Table,
    /// Gaussians per latent dimension of the ARM prior.
    pub prior_components: usize,
    /// Free bits (Kingma et al. 2016, eq. 15): nats per latent dimension below which the KL
    /// term of the training loss is held constant; 0 turns it off.
    pub free_bits: f64,
    /// Epochs over which the KL weight of the training loss grows linearly to 1 (KL warm-up,
    /// Sønderby et al. 2016); 0: weight 1 from the start.
    pub kl_warmup_epochs: usize,
    /// Samples per test image of the importance-weighted bound (Burda et al. 2016).
    pub iw_samples: usize,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            latent: 16,
            hidden: 256,
            encoder: EncoderKind::Mlp,
            conv_channels: default_conv_channels(),
            prior: PriorKind::Standard,
            prior_backend: "made".into(),
            prior_net: toml::Table::new(),
            prior_components: 4,
            free_bits: 0.0,
            kl_warmup_epochs: 0,
            iw_samples: 256,
        }
    }
}

/// A `[model.vae]` value out of range: its key (relative to the table) and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct VaeConfigError {
    pub key: String,
    pub msg: String,
}

fn bad(key: &str, msg: impl Into<String>) -> VaeConfigError {
    VaeConfigError { key: key.into(), msg: msg.into() }
}

impl VaeConfig {
    /// Checks every value and resolves the prior network's table (the keys are the plugin's).
    pub fn validate(&mut self) -> Result<(), VaeConfigError> {
        if self.latent == 0 {
            return Err(bad("latent", "must be at least 1, got 0"));
        }
        if self.hidden == 0 {
            return Err(bad("hidden", "must be at least 1, got 0"));
        }
        if self.conv_channels == 0 {
            return Err(bad("conv_channels", "must be at least 1, got 0"));
        }
        if self.prior_components == 0 {
            return Err(bad("prior_components", "must be at least 1, got 0"));
        }
        if !(self.free_bits >= 0.0 && self.free_bits.is_finite()) {
            return Err(bad("free_bits", format!("must be a finite number >= 0, got {}", self.free_bits)));
        }
        if self.iw_samples == 0 {
            return Err(bad("iw_samples", "must be at least 1, got 0"));
        }
        if !PRIOR_BACKENDS.contains(&self.prior_backend.as_str()) {
            return Err(bad(
                "prior_backend",
                format!("expected one of {}, got {:?}", PRIOR_BACKENDS.join(", "), self.prior_backend),
            ));
        }
        let plugin = arm_backends::plugin(&self.prior_backend).map_err(|e| bad("prior_backend", e.to_string()))?;
        self.prior_net = plugin.resolve(&self.prior_net, 1, self.latent).map_err(|e| match e {
            arm_backends::PluginError::Invalid { key, msg } if key.is_empty() => bad("prior_net", msg),
            arm_backends::PluginError::Invalid { key, msg } => bad(&format!("prior_net.{key}"), msg),
            other => bad("prior_net", other.to_string()),
        })?;
        Ok(())
    }

    /// The KL weight of the training loss in `epoch` (1-based).
    pub fn kl_weight(&self, epoch: usize) -> f64 {
        match self.kl_warmup_epochs {
            0 => 1.0,
            w => (epoch as f64 / w as f64).min(1.0),
        }
    }
}

/// One-line help per key for `runner list`.
pub const KEY_DOCS: &[(&str, &str)] = &[
    ("latent", "latent dimensions"),
    ("hidden", "width of the encoder's hidden layers (and the factorized decoder's)"),
    ("encoder", "\"mlp\" (the default: two ReLU layers) or \"conv\" (3x3 convolutions, the second at stride 2)"),
    ("conv_channels", "the conv encoder's first channels, twice as many in the second (default 16)"),
    ("prior", "\"standard\" N(0, I) or \"arm\" (a 1D plugin with a Gaussian mixture per dimension)"),
    ("prior_backend", "the ARM prior's plugin: made, mlp, causal_conv1d or rnn"),
    ("prior_net", "the prior plugin's own keys, as a table"),
    ("prior_components", "Gaussians per latent dimension of the ARM prior"),
    ("free_bits", "nats per latent dimension below which the KL term is held (0: off)"),
    ("kl_warmup_epochs", "epochs over which the KL weight grows linearly to 1 (0: off)"),
    ("iw_samples", "samples per test image of the importance-weighted bound"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        let err = |c: VaeConfig| {
            let mut c = c;
            c.validate().err().map(|e| e.to_string())
        };
        assert_eq!(err(VaeConfig::default()), None);
        assert_eq!(
            err(VaeConfig { latent: 0, ..Default::default() }).as_deref(),
            Some("latent: must be at least 1, got 0")
        );
        let m = err(VaeConfig { prior_backend: "transformer".into(), ..Default::default() }).unwrap_or_default();
        assert!(m.starts_with("prior_backend: expected one of made"), "{m}");
        let mut net = toml::Table::new();
        net.insert("hidden".into(), toml::Value::Integer(3));
        let m = err(VaeConfig { prior_net: net, ..Default::default() }).unwrap_or_default();
        assert!(m.starts_with("prior_net.hidden"), "{m}");
        assert!(err(VaeConfig { free_bits: -0.5, ..Default::default() }).unwrap_or_default().starts_with("free_bits"));
    }

    #[test]
    fn kl_weight_warms_up_linearly() {
        let c = VaeConfig { kl_warmup_epochs: 4, ..Default::default() };
        let w: Vec<f64> = (1..=6).map(|e| c.kl_weight(e)).collect();
        assert_eq!(w, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(VaeConfig::default().kl_weight(1), 1.0);
    }
}
