//! The VAE's properties: its decoder, conditioned on any latent, is an ARM that passes the
//! conformance checks; the ELBO never exceeds the importance-weighted bound, which tightens
//! with more samples on a trained model; the training loss follows its formula (KL warm-up,
//! free bits); the ARM prior is a normalised density; every sampler gives the same images.

use std::sync::Arc;

use arm_backends::{conformance, BuildCtx};
use arm_core::{heads, Arm, Conditional, Conditioned, Head, Ordering, Sampler};
use arm_vae::{Decoder, EncoderKind, PriorKind, Vae, VaeConfig};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

type R<T> = Result<T, Box<dyn std::error::Error>>;

const DEV: Device = Device::Cpu;

fn head(name: &str, k: usize) -> R<Box<dyn Head>> {
    let t = heads::resolve(name, &toml::Table::new(), k).map_err(|e| e.to_string())?;
    Ok(heads::build(name, &t, k).map_err(|e| e.to_string())?)
}

fn latents(n: usize, z: usize, seed: u64) -> R<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * z).map(|_| rng.random::<f32>() - 0.5).collect();
    Ok(Tensor::from_vec(v, (n, z), &DEV)?)
}

/// The decoders: the factorized one and every test config of every plugin that reads a latent.
fn decoders(z: usize, (h, w): (usize, usize), (np, k): (usize, usize)) -> R<Vec<(String, Arc<dyn Conditional>)>> {
    let map = VarMap::new();
    let ctx = conformance::test_ctx(&map, 3, (h, w), (np, k));
    let mut out: Vec<(String, Arc<dyn Conditional>)> =
        vec![("factorized".into(), Arc::new(arm_vae::factorized(z, 8, (h * w, np), ctx.vb.pp("f"))?))];
    for p in arm_backends::registry().into_iter().filter(|p| p.conditioning) {
        for mut cfg in p.test_configs() {
            // Eight channels at least: in the tiniest configs a latent's biases can push every
            // channel below the head's ReLU, and the liveness checks then see a constant.
            if let Some(c) = cfg.get("channels").and_then(toml::Value::as_integer) {
                cfg.insert("channels".into(), toml::Value::Integer(c.max(8)));
            }
            // A map per network: the configs share variable names.
            let c = BuildCtx { cond_dim: z, ..conformance::test_ctx(&VarMap::new(), 3, (h, w), (np, k)) };
            out.push((format!("{} {cfg:?}", p.name), Arc::from(p.build(&cfg, c)?)));
        }
    }
    assert!(out.len() > 1, "no plugin reads a latent");
    Ok(out)
}

/// For several latents z, p(x|z) is an ARM of x: causal (plugins), normalised over every
/// image of a tiny shape for every head, its stepper equals its forward pass, and every
/// sampler draws the same images.
#[test]
fn the_decoder_passes_the_conformance_checks_for_every_latent() -> R<()> {
    let zdim = 3;
    for seed in 0..3 {
        let z = latents(1, zdim, 100 + seed)?;
        for (name, net) in decoders(zdim, (3, 4), (4, conformance::LEVELS))? {
            let c = Conditioned::new(net.clone(), z.clone())?;
            if name != "factorized" {
                conformance::causality(&c, 4, true, true).map_err(|e| format!("{name} z{seed}: {e}"))?;
            }
            conformance::stepper_matches_forward(&c).map_err(|e| format!("{name} z{seed}: {e}"))?;
        }
        let k = 3;
        for head_name in arm_core::head_names() {
            let hd = head(head_name, k)?;
            if !hd.likelihood() {
                continue;
            }
            for (name, net) in decoders(zdim, (2, 2), (hd.num_params(), k))? {
                let arm = Arm::new(
                    Box::new(Conditioned::new(net, z.clone())?),
                    head(head_name, k)?,
                    k,
                    (2, 2),
                    Ordering::Raster,
                )?;
                conformance::sums_to_one(&arm).map_err(|e| format!("{name} {head_name} z{seed}: {e}"))?;
            }
            for (name, net) in decoders(zdim, (3, 4), (head(head_name, 4)?.num_params(), 4))? {
                let arm = Arm::new(
                    Box::new(Conditioned::new(net, z.clone())?),
                    head(head_name, 4)?,
                    4,
                    (3, 4),
                    Ordering::Raster,
                )?;
                conformance::samplers_agree(&arm, 5).map_err(|e| format!("{name} {head_name} z{seed}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// One latent per image gives each image the rows that its latent alone gives it (forward and
/// cached stepper), and another latent other rows: the decoder reads z.
#[test]
fn per_image_latents_match_one_latent_at_a_time() -> R<()> {
    let zdim = 3;
    let z = latents(2, zdim, 7)?;
    let x = conformance::random_levels(2, 12, conformance::LEVELS, 8, &DEV)?.affine(0.25, 0.0)?;
    for (name, net) in decoders(zdim, (3, 4), (4, conformance::LEVELS))? {
        let both = net.forward_cond(&x, &z, false)?; // (2, D, P)
        for i in 0..2 {
            let one = net.forward_cond(&x.narrow(0, i, 1)?, &z.narrow(0, i, 1)?, false)?;
            let d = (both.narrow(0, i, 1)? - &one)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "{name}: image {i} differs by {d}");
        }
        let other = net.forward_cond(&x, &latents(2, zdim, 9)?, false)?;
        let d = (&both - &other)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d > 1e-4, "{name}: another latent, the same outputs");
        conformance::stepper_matches_forward(&Conditioned::new(net.clone(), latents(3, zdim, 10)?)?)
            .map_err(|e| format!("{name} with per-image latents: {e}"))?;
    }
    Ok(())
}

fn digits_vae(cfg: &VaeConfig, decoder: &str, seed: u64) -> R<(Vae, VarMap, arm_data::Dataset)> {
    let data = arm_data::digits()?;
    let map = VarMap::new();
    let hd = head("categorical", data.levels)?;
    let ctx = BuildCtx {
        vb: arm_core::seeded_var_builder(&map, seed, &DEV),
        device: DEV,
        height: data.height,
        width: data.width,
        num_params: hd.num_params(),
        levels: data.levels,
        seed,
        order: None,
        cond_dim: 0,
    };
    let plugin = arm_backends::plugin(decoder).ok();
    let table = plugin.as_ref().map(|p| {
        let mut t = p.test_configs().remove(0);
        t.insert("channels".into(), toml::Value::Integer(8));
        t
    });
    let dec = match (&plugin, &table) {
        (Some(p), Some(t)) => Decoder::Plugin(p, t),
        _ => Decoder::Factorized,
    };
    let vae = arm_vae::build(cfg, dec, hd, ctx)?;
    Ok((vae, map, data))
}

/// On a small VAE (MLP and conv encoders) trained for a few epochs: per image the ELBO of S draws never exceeds the
/// importance-weighted bound of the same draws, S = 1 gives the same figure twice, and the
/// mean bound rises with S (Burda et al. 2016, Theorem 1).
#[test]
fn the_importance_weighted_bound_is_above_the_elbo_and_tightens() -> R<()> {
    for encoder in [EncoderKind::Mlp, EncoderKind::Conv] {
        let cfg = VaeConfig { latent: 4, hidden: 64, encoder, conv_channels: 8, ..Default::default() };
        let (vae, map, data) = digits_vae(&cfg, "factorized", 1)?;
        let tc = arm_train::TrainConfig { max_epochs: 8, patience: 8, lr: 3e-3, ..Default::default() };
        let out = arm_train::train(&vae, &map, &data, &tc, 1, &mut |_| arm_train::Control::Continue)?;
        let first = out.history[0].val_nll;
        assert!(out.best_val_nll < first - 5.0, "{encoder:?}: -ELBO {first} -> {}", out.best_val_nll);
        let x = data.test.batch(&(0..40).collect::<Vec<_>>(), &DEV)?;
        let mut means = Vec::new();
        for s in [1, 10, 100] {
            let arm_vae::Bounds { elbo, iw, kl } = vae.bounds(&x, s)?;
            assert!(kl.iter().all(|k| k.is_finite()));
            for (e, w) in elbo.iter().zip(&iw) {
                if s == 1 {
                    assert!((e - w).abs() < 1e-9, "one sample: ELBO {e}, IW {w}");
                }
                assert!(e <= &(w + 1e-9), "{encoder:?} S = {s}: ELBO {e} above IW {w}");
            }
            means.push(iw.iter().sum::<f64>() / iw.len() as f64);
        }
        assert!(means[0] < means[1] && means[1] < means[2], "{encoder:?}: IW bound did not tighten: {means:?}");
        // Evaluation draws depend on the images only: the same figure twice.
        let (a, b) = (vae.elbo(&x)?, vae.elbo(&x)?);
        assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
    }
    Ok(())
}

/// The training loss is -log p(x|z) + beta KL with beta = epoch / warm-up, and with free bits
/// -log p(x|z) + sum_j max(lambda, KL_j): four losses of one draw, solved for -log p(x|z) and
/// KL and checked against each other.
#[test]
fn the_training_loss_weights_and_floors_the_kl_term() -> R<()> {
    use arm_train::Model;
    let base = VaeConfig { latent: 3, hidden: 16, kl_warmup_epochs: 4, ..Default::default() };
    let loss = |cfg: &VaeConfig, epoch: usize| -> R<f64> {
        let (vae, _, data) = digits_vae(cfg, "factorized", 5)?;
        let x = data.train.batch(&[0, 1, 2, 3, 4], &DEV)?;
        vae.begin_epoch(epoch);
        Ok(vae.loss(&x, epoch)?.to_scalar::<f32>()? as f64)
    };
    // The draws depend on (seed, epoch): compare losses within one epoch, varying the warm-up.
    let at = |warmup: usize, free_bits: f64| VaeConfig { kl_warmup_epochs: warmup, free_bits, ..base.clone() };
    let full = loss(&at(0, 0.0), 2)?; // rec + KL
    let half = loss(&at(4, 0.0), 2)?; // rec + KL / 2
    let quarter = loss(&at(8, 0.0), 2)?; // rec + KL / 4
    let kl = 2.0 * (full - half);
    assert!(kl > 0.0, "KL {kl}");
    assert!((quarter - (full - 0.75 * kl)).abs() < 1e-3 * full.abs(), "{full} {half} {quarter}");
    // lambda = 50 nats per dimension is far above this KL: the term is 3 x 50.
    let floored = loss(&at(0, 50.0), 2)?;
    assert!((floored - (full - kl + 150.0)).abs() < 1e-3 * full.abs(), "{floored} vs {}", full - kl + 150.0);
    Ok(())
}

/// The ARM prior (MADE with a Gaussian mixture per dimension) is a density over R^2: it
/// integrates to one on a grid; a prior that let z_1 see z_2 would not.
#[test]
fn the_arm_prior_integrates_to_one() -> R<()> {
    let cfg = VaeConfig { latent: 2, hidden: 8, prior: PriorKind::Arm, prior_components: 2, ..Default::default() };
    let (vae, _, _) = digits_vae(&cfg, "factorized", 2)?;
    let (lo, hi, n) = (-10.0f64, 10.0f64, 401);
    let step = (hi - lo) / (n - 1) as f64;
    let pts: Vec<f32> =
        (0..n * n).flat_map(|i| [(lo + (i / n) as f64 * step) as f32, (lo + (i % n) as f64 * step) as f32]).collect();
    let z = Tensor::from_vec(pts, (n * n, 2), &DEV)?;
    let total = vae.prior_log_density(&z, false)?.sum(1)?.exp()?.sum_all()?.to_scalar::<f32>()? as f64 * step * step;
    assert!((total - 1.0).abs() < 2e-3, "{total}");
    Ok(())
}

/// A VAE with a PixelCNN decoder and an ARM prior draws the same images with the naive, cached
/// and Jacobi samplers for one seed, and refuses the predictive one.
#[test]
fn every_sampler_draws_the_same_vae_images() -> R<()> {
    let cfg = VaeConfig { latent: 3, hidden: 16, prior: PriorKind::Arm, ..Default::default() };
    let (vae, _, _) = digits_vae(&cfg, "gated_pixelcnn", 4)?;
    let imgs = |s| -> R<Vec<Vec<f32>>> { Ok(vae.sample(3, 11, s)?.images.to_vec2::<f32>()?) };
    let naive = imgs(Sampler::Naive)?;
    assert_eq!(naive, imgs(Sampler::Cached)?);
    assert_eq!(naive, imgs(Sampler::Jacobi)?);
    assert_ne!(naive, vae.sample(3, 12, Sampler::Naive)?.images.to_vec2::<f32>()?, "another seed, the same images");
    assert!(vae.sample(3, 11, Sampler::Predictive).is_err());
    Ok(())
}
