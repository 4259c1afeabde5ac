//! Distribution augmentation (Jun et al. 2020, "Distribution Augmentation for Generative
//! Modeling", §3, eq. 2): each training image x is replaced by t(x) for a transform t drawn
//! per image, and the model learns p(t(x) | t), with t given to the network as a one-hot
//! conditioning vector (a bias per layer, van den Oord et al. 2016, eq. 4). Validation, test,
//! the saved weights and sampling use p(x | identity): an exact likelihood of the data as it
//! is, which the transformed images regularise through the shared weights; or, with
//! [`AugmentEval::Mixture`], the exact mixture over the transforms that permute pixels
//! ([`crate::TransformMixture`]).

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use arm_core::{Arm, Conditional, Conditioned, SampleOutput, Sampler};
use arm_data::augment::{apply, Transform};
use serde::{Deserialize, Serialize};

use crate::TransformMixture;

/// What a model trained with distribution augmentation is evaluated and sampled as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AugmentEval {
    /// p(x | identity).
    #[default]
    Identity,
    /// sum_k pi_k p(t_k(x) | t_k) over the identity and the trained transforms that permute
    /// pixels, pi_k the share of training images drawn with t_k, renormalised.
    Mixture,
}

/// Separates the sampler's draws of mixture members from the sampling noise.
const MEMBER_SALT: u64 = 0x6d_656d_6265_7273;

/// An ARM trained with distribution augmentation.
pub struct DistAug {
    /// The network conditioned on the identity, or the transform mixture: what is evaluated,
    /// saved and sampled.
    eval: Arm,
    /// The mixture's members (`eval`'s network), when evaluated as one.
    mixture: Option<TransformMixture>,
    net: Arc<dyn Conditional>,
    /// Source map of every conditioning class; class 0 is the identity.
    maps: Vec<Vec<Option<usize>>>,
    prob: f64,
    seed: u64,
    rng: Mutex<ChaCha8Rng>,
}

/// The one-hot conditioning vector of the identity, (1, classes).
pub fn identity_condition(classes: usize, device: &candle_core::Device) -> Result<Tensor> {
    one_hot(0, classes, device)
}

/// The one-hot conditioning vector of class `k`, (1, classes).
pub(crate) fn one_hot(k: usize, classes: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mut h = vec![0f32; classes];
    h[k] = 1.0;
    Tensor::from_vec(h, (1, classes), device)
}

impl DistAug {
    /// `net` must read a conditioning vector of width `transforms.len() + 1`; `arm` gives the
    /// head, levels, shape and ordering (its own network is replaced). `prob`: the probability
    /// that a training image is transformed.
    pub fn new(
        arm: &Arm,
        net: Arc<dyn Conditional>,
        transforms: &[Transform],
        prob: f64,
        seed: u64,
        eval: AugmentEval,
    ) -> Result<Self> {
        let classes = transforms.len() + 1;
        if net.cond_dim() != classes {
            candle_core::bail!(
                "distribution augmentation: the network reads a conditioning vector of width {}, expected {classes} \
                 (the identity and {} transforms)",
                net.cond_dim(),
                transforms.len()
            );
        }
        let (h, w) = arm.shape();
        let mut maps = vec![Transform::Identity.source_map(h, w)];
        for t in transforms {
            if !t.fits(h, w) {
                candle_core::bail!("distribution augmentation: {t:?} needs a square image, the data is {h}x{w}");
            }
            maps.push(t.source_map(h, w));
        }
        let (eval, mixture) = match eval {
            AugmentEval::Identity => {
                let fixed = Conditioned::new(net.clone(), identity_condition(classes, arm.device())?)?;
                (arm.rebind(Box::new(fixed))?, None)
            }
            AugmentEval::Mixture => {
                if arm.ordering() != arm_core::Ordering::Raster {
                    let order = arm.ordering();
                    candle_core::bail!("the transform mixture reads images in raster order, the model's is {order:?}");
                }
                let all: Vec<Transform> =
                    std::iter::once(Transform::Identity).chain(transforms.iter().copied()).collect();
                let n = transforms.len() as f64;
                let shares: Vec<f64> = (0..all.len()).map(|k| if k == 0 { 1.0 - prob } else { prob / n }).collect();
                let mix = TransformMixture::new(net.clone(), &all, &shares, h, w)?;
                if mix.len() < 2 {
                    candle_core::bail!(
                        "a transform mixture needs a transform that permutes pixels (flips, transpose, rotations)"
                    );
                }
                (arm.rebind(Box::new(mix.clone()))?, Some(mix))
            }
        };
        Ok(Self { eval, mixture, net, maps, prob, seed, rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) })
    }

    /// Draws images with `noise` (B, D, Q) as [`Arm::sample`] does. A mixture draws each
    /// image's member from its weights with `seed` (the same for every sampler), samples t(x)
    /// from that member's conditional and maps it back to x.
    pub fn sample(&self, noise: &Tensor, seed: u64, sampler: Sampler) -> Result<SampleOutput> {
        let Some(mix) = &self.mixture else { return self.eval.sample(noise, sampler) };
        let (b, d, _) = noise.dims3()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ MEMBER_SALT);
        let pick: Vec<usize> = (0..b)
            .map(|_| {
                let u = rng.random::<f64>();
                let mut acc = 0.0;
                mix.weights().iter().position(|w| {
                    acc += w;
                    u < acc
                })
                .unwrap_or(mix.len() - 1)
            })
            .collect();
        let mut rows = vec![Tensor::zeros((1, d), candle_core::DType::F32, noise.device())?; b];
        let (mut iterations, mut calls) = (0, 0.0);
        for m in 0..mix.len() {
            let idx: Vec<u32> = (0..b as u32).filter(|&i| pick[i as usize] == m).collect();
            if idx.is_empty() {
                continue;
            }
            let (h, gather_out) = mix.member(m);
            let mut arm = self.eval.rebind(Box::new(Conditioned::new(self.net.clone(), h.clone())?))?;
            if m == 0 {
                // A forecaster fitted to the model (`runner sample --offsets`) is the identity's.
                arm.set_forecaster(self.eval.forecaster().cloned());
            }
            let sel = Tensor::new(idx.as_slice(), noise.device())?;
            let out = arm.sample(&noise.index_select(&sel, 0)?, sampler)?;
            let images = match gather_out {
                Some(g) => out.images.index_select(g, 1)?,
                None => out.images,
            };
            for (j, &i) in idx.iter().enumerate() {
                rows[i as usize] = images.narrow(0, j, 1)?;
            }
            iterations = iterations.max(out.iterations);
            calls += out.calls * idx.len() as f64 / b as f64;
        }
        Ok(SampleOutput { images: Tensor::cat(&rows, 0)?, iterations, calls })
    }

    /// The model at the identity.
    pub fn arm(&self) -> &Arm {
        &self.eval
    }
    pub fn arm_mut(&mut self) -> &mut Arm {
        &mut self.eval
    }
    pub fn into_arm(self) -> Arm {
        self.eval
    }

    /// Transforms a batch (B, D) of images: the transformed images and their one-hot classes,
    /// drawn from the model's stream.
    pub fn augment(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, d) = x.dims2()?;
        let pixels = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let classes = self.maps.len();
        let (mut out, mut onehot) = (Vec::with_capacity(b * d), vec![0f32; b * classes]);
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        for (i, image) in pixels.chunks(d).enumerate() {
            let c = if rng.random::<f64>() < self.prob { rng.random_range(1..classes) } else { 0 };
            apply(&self.maps[c], image, &mut out);
            onehot[i * classes + c] = 1.0;
        }
        Ok((Tensor::from_vec(out, (b, d), x.device())?, Tensor::from_vec(onehot, (b, classes), x.device())?))
    }

    /// Mean NLL per image of `x` (levels, image layout) under p(x | h), h: (B, classes).
    pub fn nll_given(&self, x: &Tensor, h: &Tensor, train: bool) -> Result<Tensor> {
        self.eval.rebind(Box::new(Conditioned::new(self.net.clone(), h.clone())?))?.nll(x, train)
    }
}

impl crate::Model for DistAug {
    fn device(&self) -> &candle_core::Device {
        self.eval.device()
    }
    fn begin_epoch(&self, epoch: usize) {
        self.net.begin_epoch(epoch);
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch as u64);
    }
    fn loss(&self, x: &Tensor, _epoch: usize) -> Result<Tensor> {
        let (xt, h) = self.augment(x)?;
        self.nll_given(&xt, &h, true)
    }
    fn eval_log_prob(&self, x: &Tensor) -> Result<Tensor> {
        self.eval.log_prob(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Model;
    use arm_core::Ordering;
    use candle_core::Device;
    use candle_nn::VarMap;

    const LEVELS: usize = 3;

    /// A gated PixelCNN over h x w images reading a one-hot transform, trained with `groups`.
    fn model(h: usize, w: usize, groups: &[&str], prob: f64) -> (DistAug, VarMap) {
        model_as(h, w, groups, prob, AugmentEval::Identity)
    }

    fn model_as(h: usize, w: usize, groups: &[&str], prob: f64, eval: AugmentEval) -> (DistAug, VarMap) {
        let transforms: Vec<Transform> = groups.iter().flat_map(|g| Transform::group(g).unwrap()).collect();
        let map = VarMap::new();
        let head = arm_core::heads::build("categorical", &toml::Table::new(), LEVELS).unwrap();
        let ctx = arm_backends::BuildCtx {
            vb: arm_core::seeded_var_builder(&map, 7, &Device::Cpu),
            device: Device::Cpu,
            height: h,
            width: w,
            num_params: head.num_params(),
            levels: LEVELS,
            seed: 7,
            order: None,
            cond_dim: transforms.len() + 1,
        };
        let table: toml::Table = toml::from_str("channels = 4\nlayers = 2").unwrap();
        let net: Arc<dyn Conditional> =
            Arc::from(arm_backends::plugin("gated_pixelcnn").unwrap().build(&table, ctx).unwrap());
        let h1 = identity_condition(transforms.len() + 1, &Device::Cpu).unwrap();
        let shell = Arm::new(Box::new(Conditioned::new(net.clone(), h1).unwrap()), head, LEVELS, (h, w), Ordering::Raster)
            .unwrap();
        (DistAug::new(&shell, net, &transforms, prob, 11, eval).unwrap(), map)
    }

    /// Moves every weight off its initial value so the conditioning maps are not special.
    fn perturb(map: &VarMap) {
        for (i, v) in map.all_vars().iter().enumerate() {
            let noise = random_images(1, v.elem_count(), 100 + i as u64).affine(0.05, -0.05).unwrap();
            v.set(&(v.as_tensor() + noise.reshape(v.shape()).unwrap()).unwrap()).unwrap();
        }
    }

    /// All 3^4 images of 2x2, (81, 4).
    fn all_2x2() -> Tensor {
        let all: Vec<f32> = (0..81).flat_map(|k: usize| (0..4).map(move |p| ((k / 3usize.pow(p)) % 3) as f32)).collect();
        Tensor::from_vec(all, (81, 4), &Device::Cpu).unwrap()
    }

    fn random_images(n: usize, d: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(0..LEVELS) as f32).collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
    }

    /// Every image is its transform's image, the classes are one-hot, about `prob` of the
    /// images are transformed, every transform is drawn, and an epoch's draws repeat.
    #[test]
    fn draws_are_the_transforms_they_name() {
        let groups = ["shifts", "flips", "transpose", "rotations"];
        let (m, _map) = model(3, 3, &groups, 0.3);
        let (n, d) = (3000, 9);
        let x = random_images(n, d, 1);
        m.begin_epoch(4);
        let (xt, h) = m.augment(&x).unwrap();
        let (xv, xtv, hv) = (x.to_vec2::<f32>().unwrap(), xt.to_vec2::<f32>().unwrap(), h.to_vec2::<f32>().unwrap());
        let all: Vec<Transform> = groups.iter().flat_map(|g| Transform::group(g).unwrap()).collect();
        let mut counts = vec![0usize; all.len() + 1];
        for i in 0..n {
            assert_eq!(hv[i].iter().sum::<f32>(), 1.0);
            let c = hv[i].iter().position(|&v| v == 1.0).unwrap();
            counts[c] += 1;
            let t = if c == 0 { Transform::Identity } else { all[c - 1] };
            let mut want = Vec::new();
            arm_data::augment::apply(&t.source_map(3, 3), &xv[i], &mut want);
            assert_eq!(xtv[i], want, "image {i}, class {c}");
        }
        let moved = (n - counts[0]) as f64 / n as f64;
        assert!((moved - 0.3).abs() < 5.0 * (0.3f64 * 0.7 / n as f64).sqrt(), "{moved}");
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        m.begin_epoch(4);
        assert_eq!(m.augment(&x).unwrap().1.to_vec2::<f32>().unwrap(), hv, "a resumed epoch draws the same");
        m.begin_epoch(5);
        assert_ne!(m.augment(&x).unwrap().1.to_vec2::<f32>().unwrap(), hv, "another epoch draws anew");
    }

    /// p(x | t) sums to one over all 3^4 images of 2x2 for the identity and for a transform,
    /// and the two differ: the network reads t.
    #[test]
    fn each_conditional_sums_to_one_and_reads_the_transform() {
        let (m, map) = model(2, 2, &["rotations"], 0.5);
        perturb(&map);
        let x = all_2x2();
        let lp_id = m.eval_log_prob(&x).unwrap().to_vec1::<f32>().unwrap();
        let mut h = vec![0f32; 81 * 4];
        for i in 0..81 {
            h[i * 4 + 2] = 1.0; // rot180
        }
        let h = Tensor::from_vec(h, (81, 4), &Device::Cpu).unwrap();
        let nll_rot = m.nll_given(&x, &h, false).unwrap().to_scalar::<f32>().unwrap();
        let cond = Conditioned::new(m.net.clone(), h.narrow(0, 0, 1).unwrap()).unwrap();
        let lp_rot = m.arm().rebind(Box::new(cond)).unwrap().log_prob(&x).unwrap().to_vec1::<f32>().unwrap();
        for lp in [&lp_id, &lp_rot] {
            let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
            assert!((total - 1.0).abs() < 1e-4, "{total}");
        }
        let mean_rot = -lp_rot.iter().map(|&l| l as f64).sum::<f64>() / 81.0;
        assert!((mean_rot - nll_rot as f64).abs() < 1e-4, "{mean_rot} vs {nll_rot}");
        let gap = lp_id.iter().zip(&lp_rot).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(gap > 1e-3, "the transform's conditioning changes nothing: {gap}");
    }

    /// The training loss is the mean NLL of each drawn image under its own transform's
    /// conditional, computed image by image.
    #[test]
    fn loss_is_the_mean_nll_of_the_drawn_pairs() {
        let (m, _map) = model(3, 3, &["shifts", "flips"], 0.5);
        let x = random_images(24, 9, 2);
        m.begin_epoch(2);
        let (xt, h) = m.augment(&x).unwrap();
        m.begin_epoch(2);
        let loss = m.loss(&x, 2).unwrap().to_scalar::<f32>().unwrap() as f64;
        let mut sum = 0.0;
        for i in 0..24 {
            let cond = Conditioned::new(m.net.clone(), h.narrow(0, i, 1).unwrap()).unwrap();
            let arm = m.arm().rebind(Box::new(cond)).unwrap();
            sum -= arm.log_prob(&xt.narrow(0, i, 1).unwrap()).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        }
        assert!((loss - sum / 24.0).abs() < 1e-4, "{loss} vs {}", sum / 24.0);
    }

    /// Member k of the mixture is p(t_k(x) | t_k), computed by transforming the images and
    /// conditioning on t_k (the training path); the members are the identity and the
    /// permutations only, weighted by how often training drew them (identity 1 - prob, each of
    /// the 13 transforms prob / 13); the mixture is the log of their weighted probability and
    /// sums to one over all 2x2 images.
    #[test]
    fn the_mixture_members_are_the_transformed_conditionals() {
        let groups = ["shifts", "flips", "rotations"];
        let (m, map) = model_as(2, 2, &groups, 0.5, AugmentEval::Mixture);
        perturb(&map);
        let x = all_2x2();
        let arm = m.arm();
        // Identity, FlipH, FlipV, Rot90, Rot180, Rot270: conditioning classes 0 and 9..=13.
        assert_eq!(arm.conditional().members(), (6, 6));
        let classes = [0, 9, 10, 11, 12, 13];
        let all: Vec<Transform> = groups.iter().flat_map(|g| Transform::group(g).unwrap()).collect();
        let mut per_member = Vec::new();
        for (k, &c) in classes.iter().enumerate() {
            let t = if c == 0 { Transform::Identity } else { all[c - 1] };
            let xv = x.to_vec2::<f32>().unwrap();
            let mut moved = Vec::new();
            for img in &xv {
                apply(&t.source_map(2, 2), img, &mut moved);
            }
            let xt = Tensor::from_vec(moved, (81, 4), &Device::Cpu).unwrap();
            let mut h = vec![0f32; all.len() + 1];
            h[c] = 1.0;
            let h = Tensor::from_vec(h, (1, all.len() + 1), &Device::Cpu).unwrap();
            let direct = arm
                .rebind(Box::new(Conditioned::new(m.net.clone(), h).unwrap()))
                .unwrap()
                .log_prob(&xt)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let member = arm.log_prob_member(&x, k).unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in direct.iter().zip(&member) {
                assert!((a - b).abs() < 1e-4, "member {k} ({t:?}): {a} vs {b}");
            }
            let total: f64 = member.iter().map(|&l| (l as f64).exp()).sum();
            assert!((total - 1.0).abs() < 1e-4, "member {k}: {total}");
            per_member.push(member);
        }
        let mix = m.eval_log_prob(&x).unwrap().to_vec1::<f32>().unwrap();
        // prob 0.5: the identity 0.5, each transform 0.5 / 13; five of them are members.
        let w = [0.5, 0.5 / 13.0, 0.5 / 13.0, 0.5 / 13.0, 0.5 / 13.0, 0.5 / 13.0];
        let total_w: f64 = w.iter().sum();
        for (i, &l) in mix.iter().enumerate() {
            let mean: f64 = per_member.iter().zip(w).map(|(p, w)| w / total_w * (p[i] as f64).exp()).sum::<f64>();
            assert!((l as f64 - mean.ln()).abs() < 1e-4, "image {i}: {l} vs {}", mean.ln());
        }
        let total: f64 = mix.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
        let gap = per_member[0].iter().zip(&mix).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(gap > 1e-3, "the mixture equals its identity member: {gap}");
    }

    /// Sampling the mixture: every sampler gives the same images for a seed, each image is
    /// its drawn member's sample mapped back, and more than one member is drawn.
    #[test]
    fn the_mixture_samples_each_image_from_its_drawn_member() {
        let (m, map) = model_as(3, 3, &["rotations"], 0.5, AugmentEval::Mixture);
        perturb(&map);
        let n = 24;
        let noise = Tensor::from_vec(
            random_images(1, n * 9, 5).to_vec2::<f32>().unwrap()[0].iter().map(|v| (v + 0.5) / 3.0).collect(),
            (n, 9, 1),
            &Device::Cpu,
        )
        .unwrap();
        let naive = m.sample(&noise, 3, Sampler::Naive).unwrap().images.to_vec2::<f32>().unwrap();
        let cached = m.sample(&noise, 3, Sampler::Cached).unwrap().images.to_vec2::<f32>().unwrap();
        assert_eq!(naive, cached);
        let all = Transform::group("rotations").unwrap();
        let mut members_seen = std::collections::BTreeSet::new();
        for i in 0..n {
            let row = noise.narrow(0, i, 1).unwrap();
            // Which member's sample, mapped back, is this image?
            let hits: Vec<usize> = (0..4)
                .filter(|&k| {
                    let mut h = vec![0f32; 4];
                    h[k] = 1.0;
                    let h = Tensor::from_vec(h, (1, 4), &Device::Cpu).unwrap();
                    let arm = m.arm().rebind(Box::new(Conditioned::new(m.net.clone(), h).unwrap())).unwrap();
                    let xt = arm.sample(&row, Sampler::Naive).unwrap().images.to_vec2::<f32>().unwrap().remove(0);
                    let t = if k == 0 { Transform::Identity } else { all[k - 1] };
                    // t(x) = xt, so x is xt read through t's inverse: x[src[p]] = xt[p].
                    let mut x = vec![0f32; 9];
                    for (p, s) in t.source_map(3, 3).into_iter().enumerate() {
                        x[s.unwrap()] = xt[p];
                    }
                    x == naive[i]
                })
                .collect();
            assert!(!hits.is_empty(), "image {i} is no member's sample");
            members_seen.insert(hits[0]);
        }
        assert!(members_seen.len() > 1, "{members_seen:?}");
    }

    /// The conformance checks every plugin passes, on the mixture: each member causal in its
    /// own order (a quarter turn walks the image by columns), every member and the mixture
    /// summing to one, the stepper equal to the forward pass.
    #[test]
    fn the_mixture_passes_the_conformance_checks() {
        use arm_backends::conformance;
        let (m, map) = model_as(3, 3, &["flips", "transpose", "rotations"], 0.6, AugmentEval::Mixture);
        perturb(&map);
        assert_eq!(m.arm().conditional().members(), (7, 7));
        conformance::causality(m.arm().conditional(), 3, false, false).unwrap();
        conformance::stepper_matches_forward(m.arm().conditional()).unwrap();
        let (m, map) = model_as(2, 2, &["flips", "transpose", "rotations"], 0.6, AugmentEval::Mixture);
        perturb(&map);
        conformance::sums_to_one(m.arm()).unwrap();
    }
}
