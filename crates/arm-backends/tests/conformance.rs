//! The conformance suite of DESIGN.md §4, run for every registered plugin and each of its test
//! configs: causality by perturbation, exact normalisation over every image of a tiny shape,
//! stepper equivalence, sampler equivalence, save/load round trip and seed determinism.
//! Registering a plugin enrols it here; nothing in this file names a plugin.

use arm_backends::{registry, BuildCtx, Plugin};
use arm_core::{build_head, head_names, resolve_head, seeded_var_builder, Arm, Conditional, Head, Ordering, Sampler};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type R<T> = Result<T, Box<dyn std::error::Error>>;

const DEV: Device = Device::Cpu;

fn build(
    p: &Plugin,
    cfg: &toml::Table,
    (h, w): (usize, usize),
    np: usize,
    seed: u64,
) -> R<(Box<dyn Conditional>, VarMap)> {
    let map = VarMap::new();
    let ctx = BuildCtx {
        vb: seeded_var_builder(&map, seed, &DEV),
        device: DEV.clone(),
        height: h,
        width: w,
        num_params: np,
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
    let table = resolve_head(name, &toml::Table::new(), k).map_err(|(key, m)| format!("{name}.{key}: {m}"))?;
    Ok(build_head(name, &table, k).map_err(|(key, m)| format!("{name}.{key}: {m}"))?)
}

fn random_levels(b: usize, d: usize, k: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..b * d).map(|_| rng.random_range(0..k) as f32).collect();
    Tensor::from_vec(v, (b, d), &DEV).expect("tensor")
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
        let d = h * w;
        let (net, _) = build(p, cfg, (h, w), 3, 1)?;
        let x = random_levels(2, d, 5, 7).affine(0.25, 0.0)?;
        let base = net.forward_t(&x, false)?; // (B, D, P)
        for j in 0..d {
            let mut v = x.to_vec2::<f32>()?;
            v[0][j] += 0.7;
            v[1][j] -= 0.9;
            let xj = Tensor::new(v, &DEV)?;
            let out = net.forward_t(&xj, false)?;
            let diff = (&out - &base)?.abs()?.sum(2)?.sum(0)?.to_vec1::<f32>()?; // (D,)
            for (row, dv) in diff.iter().enumerate() {
                if row <= j && *dv != 0.0 {
                    return Err(format!("output row {row} changed when input {j} changed").into());
                }
            }
            // A network that ignored its inputs would pass the check above.
            let same_row = (j + 1) % w != 0;
            if j + 1 < d && (!p.is_2d || same_row) && diff[j + 1] == 0.0 {
                return Err(format!("row {} does not see its predecessor {j}", j + 1).into());
            }
        }
        Ok(())
    })
}

#[test]
fn probabilities_sum_to_one_over_every_image() -> R<()> {
    // D = 4 pixels, K = 3 levels: 81 images.
    for p in registry() {
        for cfg in p.test_configs() {
            for (h, w) in [(2, 2), (1, 4)].into_iter().filter(|s| !p.is_2d || s.0 > 1) {
                let orderings: &[Ordering] =
                    if p.is_2d { &[Ordering::Raster] } else { &[Ordering::Raster, Ordering::Snake] };
                for &ord in orderings {
                    let k = 3;
                    for head_name in head_names() {
                        let head = every_head(head_name, k)?;
                        let (net, _) = build(&p, &cfg, (h, w), head.num_params(), 2)?;
                        let arm = Arm::new(net, head, k, (h, w), ord)?;
                        let all: Vec<f32> =
                            (0..81usize).flat_map(|i| (0..4).map(move |j| ((i / 3usize.pow(j)) % 3) as f32)).collect();
                        let x = Tensor::from_vec(all, (81, 4), &DEV)?;
                        let total = arm.log_prob(&x)?.exp()?.sum_all()?.to_scalar::<f32>()?;
                        assert!((total - 1.0).abs() < 1e-4, "{} {cfg:?} {ord:?} {head_name}: sum p = {total}", p.name);
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
        let d = h * w;
        let (net, _) = build(p, cfg, (h, w), 4, 3)?;
        let x = random_levels(3, d, 5, 11).affine(0.25, 0.0)?;
        let full = net.forward_t(&x, false)?; // (B, D, P)
        let mut st = net.stepper(3)?;
        for i in 0..d {
            let got = st.params()?;
            let want = full.narrow(1, i, 1)?.squeeze(1)?;
            let diff = max_abs_diff(&got, &want)?;
            if diff > 1e-5 {
                return Err(format!("position {i}: stepper differs by {diff}").into());
            }
            st.push(&x.narrow(1, i, 1)?.squeeze(1)?)?;
        }
        Ok(())
    })
}

#[test]
fn samplers_agree_for_the_same_noise() -> R<()> {
    each_case(|p, cfg, (h, w)| {
        let d = h * w;
        let k = 4;
        for head_name in head_names() {
            let head = every_head(head_name, k)?;
            let (net, _) = build(p, cfg, (h, w), head.num_params(), 4)?;
            let ord = if p.is_2d { Ordering::Raster } else { Ordering::Snake };
            let arm = Arm::new(net, head, k, (h, w), ord)?;
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let noise: Vec<f32> = (0..6 * d * arm.head().noise_dim()).map(|_| rng.random::<f32>()).collect();
            let noise = Tensor::from_vec(noise, (6, d, arm.head().noise_dim()), &DEV)?;
            let naive = arm.sample(&noise, Sampler::Naive)?.images.to_vec2::<f32>()?;
            let cached = arm.sample(&noise, Sampler::Cached)?.images.to_vec2::<f32>()?;
            let jac = arm.sample(&noise, Sampler::Jacobi)?;
            assert_eq!(naive, cached, "naive vs cached");
            assert_eq!(naive, jac.images.to_vec2::<f32>()?, "naive vs jacobi ({head_name})");
            assert!(jac.iterations <= d);
        }
        Ok(())
    })
}

#[test]
fn save_load_round_trip_and_seed_determinism() -> R<()> {
    each_case(|p, cfg, (h, w)| {
        let d = h * w;
        let x = random_levels(2, d, 5, 13).affine(0.25, 0.0)?;
        let (a, map_a) = build(p, cfg, (h, w), 3, 21)?;
        let (b, _) = build(p, cfg, (h, w), 3, 21)?;
        let (c, mut map_c) = build(p, cfg, (h, w), 3, 22)?;
        let (ya, yb, yc) = (a.forward_t(&x, false)?, b.forward_t(&x, false)?, c.forward_t(&x, false)?);
        assert_eq!(max_abs_diff(&ya, &yb)?, 0.0, "same seed, different outputs");
        assert!(max_abs_diff(&ya, &yc)? > 0.0, "different seeds, same outputs");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.safetensors");
        map_a.save(&path)?;
        map_c.load(&path)?;
        assert_eq!(max_abs_diff(&ya, &c.forward_t(&x, false)?)?, 0.0, "loaded weights differ");
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
