//! A VAE with pluggable prior and decoder (Kingma & Welling 2014; Tomczak, "Deep Generative
//! Modeling", ch. 4): an encoder q(z|x) = N(mu(x), diag sigma^2(x)), a prior p(z) that is
//! N(0, I) or an ARM over the latent dimensions with a Gaussian mixture per dimension (the
//! chapter's "ARM prior"), and a decoder p(x|z) that is factorized or any conditioning plugin
//! of the lab (a PixelCNN decoder: PixelVAE, Gulrajani et al. 2017), which reads z as a bias
//! per layer.
//!
//! Training maximises the ELBO, E_q[log p(x|z)] - KL(q(z|x) || p(z)) (eq. 3 of Kingma &
//! Welling), with one reparameterised draw z = mu + sigma eps per image, the KL in closed form
//! for the standard prior and as log q(z|x) - log p(z) otherwise, optional KL warm-up and free
//! bits. Evaluation gives the ELBO and the importance-weighted bound of Burda et al. 2016
//! (eq. 8), log (1/S) sum_s p(x, z_s) / q(z_s|x) with z_s ~ q: both lower bounds of log p(x);
//! the second tightens as S grows. Every draw comes from a seeded stream: training draws from
//! (seed, epoch), evaluation from the images themselves, so results are reproducible.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use arm_backends::layers::{linear, Linear};
use arm_backends::{BuildCtx, Plugin, PluginError};
use arm_core::{Arm, Conditional, Conditioned, Head, Ordering, Result, SampleOutput, Sampler};

use crate::config::{EncoderKind, PriorKind, VaeConfig, VaeConfigError};
use crate::factorized::factorized;
use crate::gaussian::{box_muller, diagonal_log_density, standard_kl, standard_log_density, Mixture};

/// The decoder p(x|z).
pub enum Decoder<'a> {
    Factorized,
    /// A plugin that reads a conditioning vector, with its resolved table.
    Plugin(&'a Plugin, &'a toml::Table),
}

#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// A `[model.vae]` key.
    #[error("vae.{0}")]
    Config(VaeConfigError),
    /// The decoder plugin's table (key relative to it) or the plugin itself (empty key).
    #[error("{0}")]
    Decoder(PluginError),
    #[error("building the VAE: {0}")]
    Build(#[from] candle_core::Error),
}

enum Prior {
    Standard,
    Arm { net: Box<dyn Conditional>, mixture: Mixture },
}

/// q(z|x): x -> two ReLU layers -> (mu, log sigma^2).
enum Encoder {
    Mlp {
        l1: Linear,  // D -> H
        l2: Linear,  // H -> H
        out: Linear, // H -> 2Z
    },
    Conv {
        c1: candle_nn::Conv2d, // 1 -> C, 3x3, same size
        c2: candle_nn::Conv2d, // C -> 2C, 3x3, stride 2
        fc: Linear,            // 2C * ceil(H/2) * ceil(W/2) -> H
        out: Linear,           // H -> 2Z
        shape: (usize, usize),
    },
}

impl Encoder {
    fn new(cfg: &VaeConfig, (h, w): (usize, usize), vb: candle_nn::VarBuilder) -> Result<Self> {
        let (hid, z) = (cfg.hidden, cfg.latent);
        Ok(match cfg.encoder {
            EncoderKind::Mlp => Encoder::Mlp {
                l1: linear(h * w, hid, vb.pp("0"))?,
                l2: linear(hid, hid, vb.pp("1"))?,
                out: linear(hid, 2 * z, vb.pp("2"))?,
            },
            EncoderKind::Conv => {
                let c = cfg.conv_channels;
                let same = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
                let down = candle_nn::Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
                Encoder::Conv {
                    c1: candle_nn::conv2d(1, c, 3, same, vb.pp("c1"))?,
                    c2: candle_nn::conv2d(c, 2 * c, 3, down, vb.pp("c2"))?,
                    fc: linear(2 * c * h.div_ceil(2) * w.div_ceil(2), hid, vb.pp("fc"))?,
                    out: linear(hid, 2 * z, vb.pp("out"))?,
                    shape: (h, w),
                }
            }
        })
    }

    /// x (B, D) in [0, 1] -> (B, 2Z).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        match self {
            Encoder::Mlp { l1, l2, out } => out.forward(&l2.forward_relu(&l1.forward_relu(x)?)?),
            Encoder::Conv { c1, c2, fc, out, shape } => {
                let b = x.dim(0)?;
                let img = x.reshape((b, 1, shape.0, shape.1))?; // (B, 1, H, W)
                let h = c2.forward(&c1.forward(&img)?.relu()?)?.relu()?; // (B, 2C, H/2, W/2)
                out.forward(&fc.forward_relu(&h.flatten_from(1)?)?)
            }
        }
    }
}

pub struct Vae {
    cfg: VaeConfig,
    encoder: Encoder,
    prior: Prior,
    decoder: Arc<dyn Conditional>,
    /// The decoder's head, levels, shape and order, over a placeholder latent (see `rebind`).
    template: Arm,
    seed: u64,
    /// Training draws of eps, re-seeded from (seed, epoch) at every epoch.
    rng: Mutex<ChaCha8Rng>,
    device: Device,
}

/// Log-variances are clamped to [-12, 8]: a variance of e^-12 already pins z, and the
/// exponential of a larger log-variance would overflow the reparameterised draw.
const LOG_VAR_RANGE: (f64, f64) = (-12.0, 8.0);

/// Builds a VAE for the images of `ctx` (its `vb` is the root of the variables: encoder,
/// prior and decoder live under their own prefixes). `head` is the decoder's pixel head.
pub fn build(
    cfg: &VaeConfig,
    decoder: Decoder,
    head: Box<dyn Head>,
    ctx: BuildCtx,
) -> std::result::Result<Vae, VaeError> {
    let mut cfg = cfg.clone();
    cfg.validate().map_err(VaeError::Config)?;
    let (d, z, hid) = (ctx.dims(), cfg.latent, cfg.hidden);
    let vb = &ctx.vb;
    let encoder = Encoder::new(&cfg, (ctx.height, ctx.width), vb.pp("encoder"))?;
    let prior = match cfg.prior {
        PriorKind::Standard => Prior::Standard,
        PriorKind::Arm => {
            let mixture = Mixture { components: cfg.prior_components };
            let plugin = arm_backends::plugin(&cfg.prior_backend)
                .map_err(|e| VaeError::Config(VaeConfigError { key: "prior_backend".into(), msg: e.to_string() }))?;
            let pctx = BuildCtx {
                vb: vb.pp("prior"),
                device: ctx.device.clone(),
                height: 1,
                width: z,
                num_params: mixture.num_params(),
                levels: 2,
                seed: ctx.seed,
                order: None,
                cond_dim: 0,
            };
            let net = plugin
                .build(&cfg.prior_net, pctx)
                .map_err(|e| VaeError::Config(VaeConfigError { key: "prior_net".into(), msg: e.to_string() }))?;
            Prior::Arm { net, mixture }
        }
    };
    let np = head.num_params();
    let decoder: Arc<dyn Conditional> = match decoder {
        Decoder::Factorized => Arc::new(factorized(z, hid, (d, np), vb.pp("decoder"))?),
        Decoder::Plugin(plugin, table) => {
            if !plugin.conditioning {
                let takes: Vec<&str> =
                    arm_backends::registry().iter().filter(|p| p.conditioning).map(|p| p.name).collect();
                let msg =
                    format!("cannot be a VAE decoder: it reads no latent (decoders: factorized, {})", takes.join(", "));
                return Err(VaeError::Decoder(arm_backends::invalid("", msg)));
            }
            let dctx = BuildCtx { vb: vb.pp("decoder"), cond_dim: z, num_params: np, ..ctx.with_order(None) };
            Arc::from(plugin.build(table, dctx).map_err(VaeError::Decoder)?)
        }
    };
    let placeholder = Tensor::zeros((1, z), DType::F32, &ctx.device)?;
    let template = Arm::new(
        Box::new(Conditioned::new(decoder.clone(), placeholder)?),
        head,
        ctx.levels,
        (ctx.height, ctx.width),
        Ordering::Raster,
    )?;
    let rng = Mutex::new(ChaCha8Rng::seed_from_u64(ctx.seed));
    Ok(Vae { cfg, encoder, prior, decoder, template, seed: ctx.seed, rng, device: ctx.device })
}

/// `n` standard normal draws from `rng` (Box-Muller).
fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| box_muller(rng.random::<f64>(), rng.random::<f64>()) as f32).collect()
}

/// A seed from the bits of a batch of images: evaluation draws depend on the images only.
fn seed_of(x: &Tensor, salt: u64) -> Result<u64> {
    let v = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    // FNV-1a over the values' bits.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ salt;
    for f in v {
        h = (h ^ f.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
    }
    Ok(h)
}

/// log-mean-exp of a slice, in f64.
fn log_mean_exp(v: &[f64]) -> f64 {
    let top = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !top.is_finite() {
        return top;
    }
    top + (v.iter().map(|x| (x - top).exp()).sum::<f64>() / v.len() as f64).ln()
}

/// Evaluation figures per image (nats): see [`Vae::bounds`].
#[derive(Debug, Clone, Default)]
pub struct Bounds {
    pub elbo: Vec<f64>,
    pub iw: Vec<f64>,
    pub kl: Vec<f64>,
}

/// The ELBO's pieces for a batch, per image.
struct Terms {
    /// log p(x|z), (B,).
    rec: Tensor,
    /// log q(z|x) - log p(z) per dimension at the draw, (B, Z).
    kl_draw: Tensor,
    /// KL(q || p) per dimension in closed form, for the standard prior, (B, Z).
    kl_closed: Option<Tensor>,
}

impl Vae {
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }
    pub fn head(&self) -> &dyn Head {
        self.template.head()
    }
    pub fn levels(&self) -> usize {
        self.template.levels()
    }
    pub fn shape(&self) -> (usize, usize) {
        self.template.shape()
    }
    pub fn dims(&self) -> usize {
        self.template.dims()
    }
    pub fn latent(&self) -> usize {
        self.cfg.latent
    }
    pub fn decoder(&self) -> &Arc<dyn Conditional> {
        &self.decoder
    }

    /// The decoder p(x|z) as an ARM of x for latents z, (B, Z) or (1, Z).
    pub fn decoder_arm(&self, z: &Tensor) -> Result<Arm> {
        self.template.rebind(Box::new(Conditioned::new(self.decoder.clone(), z.clone())?))
    }

    /// (mu, log sigma^2) of q(z|x), each (B, Z), for levels x (B, D).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = (self.levels() - 1) as f64;
        let xs = x.to_dtype(DType::F32)?.affine(1.0 / k, 0.0)?;
        let out = self.encoder.forward(&xs)?; // (B, 2Z)
        let z = self.cfg.latent;
        let log_var = out.narrow(1, z, z)?.clamp(LOG_VAR_RANGE.0, LOG_VAR_RANGE.1)?;
        Ok((out.narrow(1, 0, z)?, log_var))
    }

    /// log p(z) per dimension, (B, Z) (for the ARM prior, log p(z_j | z_<j)).
    pub fn prior_log_density(&self, z: &Tensor, train: bool) -> Result<Tensor> {
        match &self.prior {
            Prior::Standard => standard_log_density(z),
            Prior::Arm { net, mixture } => mixture.log_prob(&net.forward_t(z, train)?, z),
        }
    }

    /// The ELBO's terms at z = mu + sigma eps, eps (B, Z).
    fn terms(&self, x: &Tensor, eps: &Tensor, train: bool) -> Result<Terms> {
        let (mu, log_var) = self.encode(x)?;
        let z = (&mu + log_var.affine(0.5, 0.0)?.exp()?.mul(eps)?)?; // (B, Z)
        let kl_draw = (diagonal_log_density(eps, &log_var)? - self.prior_log_density(&z, train)?)?;
        let kl_closed = match self.prior {
            Prior::Standard => Some(standard_kl(&mu, &log_var)?),
            Prior::Arm { .. } => None,
        };
        let rec = self.decoder_arm(&z)?.log_prob_pixels(x, train)?.sum(1)?; // (B,)
        Ok(Terms { rec, kl_draw, kl_closed })
    }

    fn eps(&self, rng: &mut ChaCha8Rng, rows: usize) -> Result<Tensor> {
        Tensor::from_vec(normals(rng, rows * self.cfg.latent), (rows, self.cfg.latent), &self.device)
    }

    /// The training loss of a batch: minus the ELBO with the KL term weighted by the warm-up
    /// of `epoch` and, with free bits, each dimension's batch-mean KL held at no less than
    /// `free_bits` nats (Kingma et al. 2016, eq. 15, one group per dimension).
    pub fn training_loss(&self, x: &Tensor, epoch: usize) -> Result<Tensor> {
        let eps = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.eps(&mut rng, x.dim(0)?)?
        };
        let t = self.terms(x, &eps, true)?;
        let kl = t.kl_closed.unwrap_or(t.kl_draw); // (B, Z)
        let kl = if self.cfg.free_bits > 0.0 {
            kl.mean(0)?.maximum(self.cfg.free_bits)?.sum_all()?
        } else {
            kl.sum(1)?.mean(0)?
        };
        kl.affine(self.cfg.kl_weight(epoch), 0.0)? - t.rec.mean(0)?
    }

    /// (B,) the ELBO per image from one draw (the KL in closed form for the standard prior).
    pub fn elbo(&self, x: &Tensor) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed_of(x, self.seed)?);
        let t = self.terms(x, &self.eps(&mut rng, x.dim(0)?)?, false)?;
        t.rec - t.kl_closed.unwrap_or(t.kl_draw).sum(1)?
    }

    /// Per image of x (B, D): the ELBO and the importance-weighted bound from the same
    /// `samples` draws of q(z|x) (the mean and the log-mean-exp of log p(x, z_s) - log q(z_s|x),
    /// so the first never exceeds the second), and the KL term of that ELBO (the mean of
    /// log q(z_s|x) - log p(z_s)), in nats.
    pub fn bounds(&self, x: &Tensor, samples: usize) -> Result<Bounds> {
        let b = x.dim(0)?;
        if samples == 0 {
            candle_core::bail!("importance-weighted bound: at least one sample");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed_of(x, self.seed ^ samples as u64)?);
        // Rows of (image, sample) pairs, a pass of at most 1024 at a time.
        let rows: Vec<u32> = (0..b as u32).flat_map(|i| std::iter::repeat_n(i, samples)).collect();
        let (mut log_w, mut kl) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
        for chunk in rows.chunks(1024) {
            let idx = Tensor::from_slice(chunk, chunk.len(), x.device())?;
            let xr = x.index_select(&idx, 0)?; // (n, D)
            let t = self.terms(&xr, &self.eps(&mut rng, chunk.len())?, false)?;
            let k = t.kl_draw.sum(1)?; // (n,)
            log_w.extend((t.rec - &k)?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            kl.extend(k.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        Ok(Bounds {
            elbo: log_w.chunks(samples).map(mean).collect(),
            iw: log_w.chunks(samples).map(log_mean_exp).collect(),
            kl: kl.chunks(samples).map(mean).collect(),
        })
    }

    /// `n` latents from the prior, (n, Z), from `rng`.
    pub fn sample_prior(&self, n: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let z = self.cfg.latent;
        match &self.prior {
            Prior::Standard => Tensor::from_vec(normals(rng, n * z), (n, z), &self.device),
            Prior::Arm { net, mixture } => {
                let mut st = net.stepper(n)?;
                let mut cols = Vec::with_capacity(z);
                for _ in 0..z {
                    let u: Vec<f32> = (0..3 * n).map(|_| rng.random::<f32>()).collect();
                    let zj = mixture.sample(&st.params()?, &Tensor::from_vec(u, (n, 3), &self.device)?)?; // (n,)
                    st.push(&zj)?;
                    cols.push(zj);
                }
                Tensor::stack(&cols, 1) // (n, Z)
            }
        }
    }

    /// `n` images from z ~ p(z), x ~ p(x|z), all noise from `seed`. The cached sampler runs one
    /// stepper for the batch (its latents are per image); predictive sampling is refused (it
    /// evaluates the decoder on subsets of the batch).
    pub fn sample(&self, n: usize, seed: u64, sampler: Sampler) -> Result<SampleOutput> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let z = self.sample_prior(n, &mut rng)?;
        let (d, q) = (self.dims(), self.head().noise_dim());
        let noise: Vec<f32> = (0..n * d * q).map(|_| rng.random::<f32>()).collect();
        let noise = Tensor::from_vec(noise, (n, d, q), &self.device)?;
        let arm = self.decoder_arm(&z)?;
        match sampler {
            Sampler::Predictive => candle_core::bail!("predictive sampling of a VAE: use naive, cached or jacobi"),
            Sampler::Cached => {
                Ok(SampleOutput { images: arm.sample_cached_in(&noise, 1)?, iterations: d, calls: d as f64 })
            }
            s => arm.sample(&noise, s),
        }
    }
}

impl arm_train::Model for Vae {
    fn device(&self) -> &Device {
        &self.device
    }
    fn begin_epoch(&self, epoch: usize) {
        self.decoder.begin_epoch(epoch);
        if let Prior::Arm { net, .. } = &self.prior {
            net.begin_epoch(epoch);
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch as u64);
    }
    fn loss(&self, x: &Tensor, epoch: usize) -> Result<Tensor> {
        self.training_loss(x, epoch)
    }
    fn eval_log_prob(&self, x: &Tensor) -> Result<Tensor> {
        self.elbo(x)
    }
}
