//! Latent-variable models built from the lab's parts: a VAE whose prior can be an ARM over the
//! latent dimensions and whose decoder can be any plugin that reads a conditioning vector
//! (Tomczak, "Deep Generative Modeling", ch. 2.4 and ch. 4). See `vae.rs`.

mod config;
mod factorized;
pub mod gaussian;
mod vae;

pub use config::{EncoderKind, PriorKind, VaeConfig, VaeConfigError, FACTORIZED, KEY_DOCS, PRIOR_BACKENDS};
pub use factorized::{factorized, Factorized};
pub use vae::{build, Bounds, Decoder, Vae, VaeError};
