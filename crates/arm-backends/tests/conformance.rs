//! The conformance suite of DESIGN.md §4, run for every registered plugin and each of its test
//! configs: causality by perturbation, exact normalisation over every image of a tiny shape,
//! stepper equivalence, sampler equivalence, save/load round trip and seed determinism. The
//! checks themselves are `arm_backends::conformance` (plugins' own tests run them on networks
//! broken on purpose). Registering a plugin enrols it here; nothing in this file names a plugin.

use arm_backends::{conformance, registry, BuildCtx, Plugin};
use arm_core::{head_names, heads, seeded_var_builder, Arm, Conditional, Head, Ordering};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;

type R<T> = Result<T, Box<dyn std::error::Error>>;

const DEV: Device = Device::Cpu;

/// Levels of the inputs the checks feed the networks that have no head (causality, stepper).
const LEVELS: usize = conformance::LEVELS;

fn build(
    p: &Plugin,
    cfg: &toml::Table,
    (h, w): (usize, usize),
    (np, levels): (usize, usize),
    seed: u64,
) -> R<(Box<dyn Conditional>, VarMap)> {
    let map = VarMap::new();
    let ctx = BuildCtx {
        vb: seeded_var_builder(&map, seed, &DEV),
        device: DEV.clone(),
        height: h,
        width: w,
        num_params: np,
        levels,
        seed,
    };
    Ok((p.build(cfg, ctx)?, map))
}

/// Shapes each plugin is tested on: 2D plugins need a real image; 1D ones also get a ragged one.
fn shapes(p: &Plugin) -> Vec<(usize, usize)> {
    if p.is_2d {
        vec![(3, 4)]
    } else {
        vec![(3, 4), (1, 7)]
    }
}

/// Every registered head with its default settings, for K levels.
fn every_head(name: &str, k: usize) -> R<Box<dyn Head>> {
    let table = heads::resolve(name, &toml::Table::new(), k).map_err(|e| format!("{name}: {e}"))?;
    Ok(heads::build(name, &table, k).map_err(|e| format!("{name}: {e}"))?)
}

fn random_levels(b: usize, d: usize, k: usize, seed: u64) -> Tensor {
    conformance::random_levels(b, d, k, seed, &DEV).expect("tensor")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> R<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn each_case(mut f: impl FnMut(&Plugin, &toml::Table, (usize, usize)) -> R<()>) -> R<()> {
    for p in registry() {
        for cfg in p.test_configs() {
            for shape in shapes(&p) {
                f(&p, &cfg, shape).map_err(|e| format!("plugin {} config {cfg:?} shape {shape:?}: {e}", p.name))?;
            }
        }
    }
    Ok(())
}

#[test]
fn causality_by_perturbation() -> R<()> {
    each_case(|p, cfg, (h, w)| {
        let (net, _) = build(p, cfg, (h, w), (3, LEVELS), 1)?;
        Ok(conformance::causality(net.as_ref(), w, p.is_2d, p.sees_predecessor)?)
    })
}

#[test]
fn probabilities_sum_to_one_over_every_image() -> R<()> {
    // D = 4 pixels, K = 3 levels: 81 images, for every member of an ensemble and the ensemble.
    for p in registry() {
        for cfg in p.test_configs() {
            for (h, w) in [(2, 2), (1, 4)].into_iter().filter(|s| !p.is_2d || s.0 > 1) {
                let orderings: &[Ordering] =
                    if p.is_2d { &[Ordering::Raster] } else { &[Ordering::Raster, Ordering::Snake] };
                for &ord in orderings {
                    let k = 3;
                    for head_name in head_names() {
                        let head = every_head(head_name, k)?;
                        let (net, _) = build(&p, &cfg, (h, w), (head.num_params(), k), 2)?;
                        let arm = Arm::new(net, head, k, (h, w), ord)?;
                        conformance::sums_to_one(&arm)
                            .map_err(|e| format!("{} {cfg:?} {ord:?} {head_name}: {e}", p.name))?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn stepper_matches_forward_rows() -> R<()> {
    each_case(|p, cfg, (h, w)| {
        let (net, _) = build(p, cfg, (h, w), (4, LEVELS), 3)?;
        Ok(conformance::stepper_matches_forward(net.as_ref())?)
    })
}

#[test]
fn samplers_agree_for_the_same_noise() -> R<()> {
    each_case(|p, cfg, (h, w)| {
        let k = 4;
        for head_name in head_names() {
            let head = every_head(head_name, k)?;
            let (net, _) = build(p, cfg, (h, w), (head.num_params(), k), 4)?;
            let ord = if p.is_2d { Ordering::Raster } else { Ordering::Snake };
            let arm = Arm::new(net, head, k, (h, w), ord)?;
            conformance::samplers_agree(&arm, 5).map_err(|e| format!("{head_name}: {e}"))?;
        }
        Ok(())
    })
}

#[test]
fn save_load_round_trip_and_seed_determinism() -> R<()> {
    each_case(|p, cfg, (h, w)| {
        let d = h * w;
        let x = random_levels(2, d, LEVELS, 13).affine(1.0 / (LEVELS - 1) as f64, 0.0)?;
        let (a, map_a) = build(p, cfg, (h, w), (3, LEVELS), 21)?;
        let (b, mut map_b) = build(p, cfg, (h, w), (3, LEVELS), 21)?;
        let (c, _) = build(p, cfg, (h, w), (3, LEVELS), 22)?;
        let (ya, yb, yc) = (a.forward_t(&x, false)?, b.forward_t(&x, false)?, c.forward_t(&x, false)?);
        assert_eq!(max_abs_diff(&ya, &yb)?, 0.0, "same seed, different outputs");
        assert!(max_abs_diff(&ya, &yc)? > 0.0, "different seeds, same outputs");
        // Scramble b's weights, then load a's file into it. (The same seed: structure a plugin
        // derives from the seed, such as MADE's masks, is rebuilt from the run's config.)
        for v in map_b.all_vars() {
            v.set(&v.as_tensor().affine(-0.5, 0.1)?)?;
        }
        assert!(max_abs_diff(&ya, &b.forward_t(&x, false)?)? > 0.0, "scrambled weights, same outputs");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.safetensors");
        map_a.save(&path)?;
        map_b.load(&path)?;
        assert_eq!(max_abs_diff(&ya, &b.forward_t(&x, false)?)?, 0.0, "loaded weights differ");
        Ok(())
    })
}

#[test]
fn every_plugin_has_test_configs_that_resolve() -> R<()> {
    for p in registry() {
        assert!(!p.test_configs().is_empty(), "{} has no test configs", p.name);
        let d = p.defaults();
        assert_eq!(p.resolve(&toml::Table::new(), 8, 8)?, d, "{}: empty table resolves to defaults", p.name);
        for cfg in p.test_configs() {
            p.resolve(&cfg, 3, 4)?;
        }
        let mut bad = toml::Table::new();
        bad.insert("no_such_key".into(), toml::Value::Integer(1));
        let err = p.resolve(&bad, 8, 8).expect_err("unknown key accepted").to_string();
        assert!(err.contains("no_such_key"), "{}: {err}", p.name);
    }
    Ok(())
}
