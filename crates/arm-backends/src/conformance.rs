//! The properties every plugin must have (DESIGN.md §4), as functions that return an error
//! naming what broke, so that the conformance suite (`tests/conformance.rs`) runs them for
//! every registered plugin and a plugin's own tests can show that a broken network fails them
//! (a mask, a shift or a causal mask broken on purpose).
//!
//! Every member of a network's ensemble ([`Conditional::members`]) is checked in its own order
//! ([`Conditional::member_order`]).

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use arm_core::{Arm, Conditional, Forecaster, Sampler};

type R<T> = Result<T, String>;

/// Levels of the inputs that [`causality`] and [`stepper_matches_forward`] feed a network
/// (build it with `BuildCtx::levels` = this): inputs are level / (LEVELS - 1).
pub const LEVELS: usize = 5;
const STEP: f64 = 1.0 / (LEVELS - 1) as f64;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A CPU build context for a plugin's own tests: weights from `map`, seeded with `seed`, for
/// (h, w) images, p head parameters and k levels.
pub fn test_ctx(map: &candle_nn::VarMap, seed: u64, (h, w): (usize, usize), (p, k): (usize, usize)) -> crate::BuildCtx<'static> {
    crate::BuildCtx {
        vb: arm_core::seeded_var_builder(map, seed, &Device::Cpu),
        device: Device::Cpu,
        height: h,
        width: w,
        num_params: p,
        levels: k,
        seed,
        order: None,
        cond_dim: 0,
    }
}

/// (B, D) random levels 0..k, seeded.
pub fn random_levels(b: usize, d: usize, k: usize, seed: u64, dev: &Device) -> candle_core::Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..b * d).map(|_| rng.random_range(0..k) as f32).collect();
    Tensor::from_vec(v, (b, d), dev)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> R<f32> {
    (a - b).and_then(|t| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).map_err(err)
}

/// The order of member `m`, identity when the network names none.
fn order_of(net: &dyn Conditional, m: usize) -> Vec<usize> {
    net.member_order(m).unwrap_or_else(|| (0..net.seq_len()).collect())
}

/// Causality by perturbation, for every member in its own order: changing the input at
/// order[i] changes no output row order[..=i]. Liveness, so that a network that ignores its
/// inputs fails: with `sees_predecessor`, row order[i+1] changes with input order[i] (for 2D
/// networks, of `width`, only within an image row); otherwise some row changes with some input.
pub fn causality(net: &dyn Conditional, width: usize, is_2d: bool, sees_predecessor: bool) -> R<()> {
    let d = net.seq_len();
    let dev = net.device().clone();
    let x = random_levels(2, d, LEVELS, 7, &dev).and_then(|t| t.affine(STEP, 0.0)).map_err(err)?;
    let (_, members) = net.members();
    let eval0 = net.forward_t(&x, false).map_err(err)?;
    if max_abs_diff(&eval0, &net.forward_member(&x, 0).map_err(err)?)? != 0.0 {
        return Err("member 0 differs from the evaluation forward pass".into());
    }
    for m in 0..members {
        let order = order_of(net, m);
        let mut rank = vec![0; d];
        for (i, &j) in order.iter().enumerate() {
            rank[j] = i;
        }
        let base = net.forward_member(&x, m).map_err(err)?; // (B, D, P)
        let mut any = false;
        for (i, &j) in order.iter().enumerate() {
            // Another valid level in each image (inputs are level / (K - 1)).
            let mut v = x.to_vec2::<f32>().map_err(err)?;
            for (img, shift) in v.iter_mut().zip([2.0f32, 3.0]) {
                let level = (img[j] / STEP as f32).round();
                img[j] = ((level + shift) % LEVELS as f32) * STEP as f32;
            }
            let xj = Tensor::new(v, &dev).map_err(err)?;
            let out = net.forward_member(&xj, m).map_err(err)?;
            let diff = (&out - &base)
                .and_then(|t| t.abs()?.sum(2)?.sum(0)?.to_vec1::<f32>())
                .map_err(err)?; // (D,)
            for (row, dv) in diff.iter().enumerate() {
                if rank[row] <= i && *dv != 0.0 {
                    return Err(format!("member {m}: output row {row} changed when input {j} changed"));
                }
            }
            any |= diff.iter().any(|&v| v != 0.0);
            if sees_predecessor && i + 1 < d {
                let next = order[i + 1];
                let same_row = next / width == j / width;
                if (!is_2d || same_row) && diff[next] == 0.0 {
                    return Err(format!("member {m}: row {next} does not see its predecessor {j}"));
                }
            }
        }
        if d > 1 && !any {
            return Err(format!("member {m}: no output row depends on any input"));
        }
    }
    Ok(())
}

/// exp(log p(x)) summed over all K^D images is 1 (within 1e-4) for every member alone and for
/// the default ensemble; the Arm must have D pixels with K^D small.
pub fn sums_to_one(arm: &Arm) -> R<()> {
    let (d, k) = (arm.dims(), arm.levels());
    let n = k.pow(d as u32);
    let all: Vec<f32> = (0..n).flat_map(|i| (0..d).map(move |j| ((i / k.pow(j as u32)) % k) as f32)).collect();
    let x = Tensor::from_vec(all, (n, d), arm.device()).map_err(err)?;
    let total = |lp: candle_core::Result<Tensor>| -> R<f32> {
        lp.and_then(|t| t.exp()?.sum_all()?.to_scalar::<f32>()).map_err(err)
    };
    let (_, members) = arm.conditional().members();
    for m in 0..members {
        let s = total(arm.log_prob_member(&x, m))?;
        if (s - 1.0).abs() >= 1e-4 {
            return Err(format!("member {m}: sum of p over all {n} images = {s}"));
        }
    }
    let s = total(arm.log_prob(&x))?;
    if (s - 1.0).abs() >= 1e-4 {
        return Err(format!("ensemble: sum of p over all {n} images = {s}"));
    }
    Ok(())
}

/// The cached stepper's parameters equal the forward pass's rows at every position (1e-5).
pub fn stepper_matches_forward(net: &dyn Conditional) -> R<()> {
    let d = net.seq_len();
    let x = random_levels(3, d, LEVELS, 11, net.device()).and_then(|t| t.affine(STEP, 0.0)).map_err(err)?;
    let full = net.forward_t(&x, false).map_err(err)?; // (B, D, P)
    let mut st = net.stepper(3).map_err(err)?;
    for i in 0..d {
        let got = st.params().map_err(err)?;
        let want = full.narrow(1, i, 1).and_then(|t| t.squeeze(1)).map_err(err)?;
        let diff = max_abs_diff(&got, &want)?;
        if diff > 1e-5 {
            return Err(format!("position {i}: stepper differs by {diff}"));
        }
        st.push(&x.narrow(1, i, 1).and_then(|t| t.squeeze(1)).map_err(err)?).map_err(err)?;
    }
    Ok(())
}

/// Naive, cached (whole and in parts), Jacobi and predictive samplers return the same images
/// for the same noise (6 images).
pub fn samplers_agree(arm: &Arm, seed: u64) -> R<()> {
    let (d, q) = (arm.dims(), arm.head().noise_dim());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise: Vec<f32> = (0..6 * d * q).map(|_| rng.random::<f32>()).collect();
    let noise = Tensor::from_vec(noise, (6, d, q), arm.device()).map_err(err)?;
    let images = |s: Sampler| -> R<(Vec<Vec<f32>>, usize)> {
        let out = arm.sample(&noise, s).map_err(err)?;
        Ok((out.images.to_vec2::<f32>().map_err(err)?, out.iterations))
    };
    let (naive, _) = images(Sampler::Naive)?;
    let (cached, _) = images(Sampler::Cached)?;
    let (jacobi, it) = images(Sampler::Jacobi)?;
    if naive != cached {
        return Err("naive and cached samplers differ".into());
    }
    // Three parts of two images, whatever the thread count.
    let parts = arm.sample_cached_in(&noise, 3).map_err(err)?;
    if naive != parts.to_vec2::<f32>().map_err(err)? {
        return Err("the cached sampler differs when the batch is cut in three".into());
    }
    if naive != jacobi {
        return Err("naive and Jacobi samplers differ".into());
    }
    if it > d {
        return Err(format!("Jacobi took {it} iterations for {d} pixels"));
    }
    // Predictive sampling with fixed-point forecasts, then with a seeded random forecaster
    // (forecasts decide how many pixels a pass settles, never their values).
    let (width, p) = (arm.shape().1, arm.head().num_params());
    let offsets = 3.min(d - 1).max(1);
    let f = Forecaster::features(p, arm.levels(), width);
    let mut w = |n: usize| (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect::<Vec<_>>();
    let (fw, fb) = (w(offsets * f * p), w(offsets * p));
    let fc = Forecaster::from_weights(offsets, width, arm.levels(), p, fw, fb).map_err(err)?;
    for (what, fc) in [("fixed-point forecasts", None), ("a random forecaster", Some(&fc))] {
        let (imgs, calls) = arm.sample_predictive_with(&noise, fc).map_err(err)?;
        if naive != imgs.to_vec2::<f32>().map_err(err)? {
            return Err(format!("naive and predictive samplers ({what}) differ"));
        }
        if !(1.0..=d as f64).contains(&calls) {
            return Err(format!("predictive sampling ({what}) took {calls} calls per image for {d} pixels"));
        }
    }
    Ok(())
}
