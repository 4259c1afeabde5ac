//! Distribution augmentation (Jun et al. 2020, "Distribution Augmentation for Generative
//! Modeling", §3, eq. 2): each training image x is replaced by t(x) for a transform t drawn
//! per image, and the model learns p(t(x) | t), with t given to the network as a one-hot
//! conditioning vector (a bias per layer, van den Oord et al. 2016, eq. 4). Validation, test,
//! the saved weights and sampling use p(x | identity): an exact likelihood of the data as it
//! is, which the transformed images regularise through the shared weights.

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use arm_core::{Arm, Conditional, Conditioned};
use arm_data::augment::{apply, Transform};

/// An ARM trained with distribution augmentation.
pub struct DistAug {
    /// The network conditioned on the identity: what is evaluated, saved and sampled.
    eval: Arm,
    net: Arc<dyn Conditional>,
    /// Source map of every conditioning class; class 0 is the identity.
    maps: Vec<Vec<Option<usize>>>,
    prob: f64,
    seed: u64,
    rng: Mutex<ChaCha8Rng>,
}

/// The one-hot conditioning vector of the identity, (1, classes).
pub fn identity_condition(classes: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mut h = vec![0f32; classes];
    h[0] = 1.0;
    Tensor::from_vec(h, (1, classes), device)
}

impl DistAug {
    /// `net` must read a conditioning vector of width `transforms.len() + 1`; `arm` gives the
    /// head, levels, shape and ordering (its own network is replaced). `prob`: the probability
    /// that a training image is transformed.
    pub fn new(arm: &Arm, net: Arc<dyn Conditional>, transforms: &[Transform], prob: f64, seed: u64) -> Result<Self> {
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
        let fixed = Conditioned::new(net.clone(), identity_condition(classes, arm.device())?)?;
        let eval = arm.rebind(Box::new(fixed))?;
        Ok(Self { eval, net, maps, prob, seed, rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) })
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
        (DistAug::new(&shell, net, &transforms, prob, 11).unwrap(), map)
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
        // Move every weight off its initial value so the conditioning maps are not special.
        for (i, v) in map.all_vars().iter().enumerate() {
            let noise = random_images(1, v.elem_count(), 100 + i as u64).affine(0.05, -0.05).unwrap();
            v.set(&(v.as_tensor() + noise.reshape(v.shape()).unwrap()).unwrap()).unwrap();
        }
        let all: Vec<f32> = (0..81).flat_map(|k: usize| (0..4).map(move |p| ((k / 3usize.pow(p)) % 3) as f32)).collect();
        let x = Tensor::from_vec(all, (81, 4), &Device::Cpu).unwrap();
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
}
