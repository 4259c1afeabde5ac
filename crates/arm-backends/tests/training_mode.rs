//! Training-mode checks for every registered plugin and test config (nothing here names a
//! plugin): with dropout on, the NLL backpropagates to every parameter with finite gradients,
//! dropout changes the training forward and leaves the evaluation forward alone, and the same
//! seed gives the same dropout masks.

use arm_backends::{registry, BuildCtx, Plugin};
use arm_core::{seeded_var_builder, Arm, Categorical, Ordering};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type R<T> = Result<T, Box<dyn std::error::Error>>;

const LEVELS: usize = 4;
const SHAPE: (usize, usize) = (3, 4);

fn build_arm(p: &Plugin, cfg: &toml::Table, seed: u64) -> R<(Arm, VarMap)> {
    let map = VarMap::new();
    let (h, w) = SHAPE;
    let ctx = BuildCtx {
        vb: seeded_var_builder(&map, seed, &Device::Cpu),
        device: Device::Cpu,
        height: h,
        width: w,
        num_params: LEVELS,
        levels: LEVELS,
        seed,
        order: None,
        cond_dim: 0,
    };
    let net = p.build(cfg, ctx)?;
    Ok((Arm::new(net, Box::new(Categorical::new(LEVELS)), LEVELS, SHAPE, Ordering::Raster)?, map))
}

fn images(b: usize) -> R<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let d = SHAPE.0 * SHAPE.1;
    let v: Vec<f32> = (0..b * d).map(|_| rng.random_range(0..LEVELS) as f32).collect();
    Ok(Tensor::from_vec(v, (b, d), &Device::Cpu)?)
}

#[test]
fn every_parameter_gets_a_finite_gradient_with_dropout_on() -> R<()> {
    for p in registry() {
        for mut cfg in p.test_configs() {
            if p.defaults().contains_key("dropout") {
                cfg.insert("dropout".into(), toml::Value::Float(0.2));
            }
            let (arm, map) = build_arm(&p, &cfg, 5)?;
            let x = images(16)?;
            let grads = arm.nll(&x, true)?.backward()?;
            let vars = map.all_vars();
            assert!(!vars.is_empty(), "{} {cfg:?}: no parameters", p.name);
            for (i, v) in vars.iter().enumerate() {
                let g = grads
                    .get(v)
                    .ok_or_else(|| format!("{} {cfg:?}: parameter {i} {:?} gets no gradient", p.name, v.shape()))?;
                let g = g.flatten_all()?.to_vec1::<f32>()?;
                assert!(g.iter().all(|v| v.is_finite()), "{} {cfg:?}: non-finite gradient", p.name);
            }
        }
    }
    Ok(())
}

#[test]
fn dropout_acts_in_training_only_and_is_seeded() -> R<()> {
    for p in registry() {
        if !p.defaults().contains_key("dropout") {
            continue;
        }
        // A config may have no hidden activation to drop (one conv layer), so only require
        // that dropout acts for some config of each plugin.
        let mut acted = false;
        for mut cfg in p.test_configs() {
            cfg.insert("dropout".into(), toml::Value::Float(0.5));
            let x = images(8)?;
            let (a, _) = build_arm(&p, &cfg, 9)?;
            let (b, _) = build_arm(&p, &cfg, 9)?;
            let eval = |arm: &Arm| -> R<f32> { Ok(arm.nll(&x, false)?.to_scalar::<f32>()?) };
            let train = |arm: &Arm| -> R<f32> { Ok(arm.nll(&x, true)?.to_scalar::<f32>()?) };
            let e = eval(&a)?;
            assert_eq!(e, eval(&a)?, "{} {cfg:?}: evaluation is not deterministic", p.name);
            let (ta, tb) = (train(&a)?, train(&b)?);
            acted |= ta != e;
            assert_eq!(ta, tb, "{} {cfg:?}: same seed, different dropout masks", p.name);
        }
        assert!(acted, "{}: dropout changed nothing in training for any test config", p.name);
    }
    Ok(())
}
