//! The conformance suite of DESIGN.md §4, run for every registered plugin and each of its test
//! configs: causality by perturbation, exact normalisation over every image of a tiny shape,
//! stepper equivalence, sampler equivalence, save/load round trip and seed determinism. The
//! checks themselves are `arm_backends::conformance` (plugins' own tests run them on networks
//! broken on purpose). Registering a plugin enrols it here; nothing in this file names a plugin.

use arm_backends::{conformance, registry, Plugin};
use arm_core::{head_names, heads, Arm, Conditional, Head, Ordering};
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
    let ctx = conformance::test_ctx(&map, seed, (h, w), (np, levels));
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
                        // The quantile head has no likelihood to sum: its log_prob is a loss.
                        if !head.likelihood() {
                            continue;
                        }
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

/// Orderings every `any_order` plugin is checked in: each kind alone, and an order-agnostic
/// set of three (member 0, the sampling order, is not raster).
fn ordering_sets() -> Vec<Vec<Ordering>> {
    let mut sets: Vec<Vec<Ordering>> = Ordering::EXAMPLES.iter().map(|&o| vec![o]).collect();
    sets.push(vec![Ordering::Random(3)]);
    sets.push(vec![Ordering::Zigzag, Ordering::Raster, Ordering::Random(5)]);
    sets
}

fn build_ordered(
    p: &Plugin,
    cfg: &toml::Table,
    (h, w): (usize, usize),
    (np, levels): (usize, usize),
    orderings: &[Ordering],
) -> R<Box<dyn Conditional>> {
    build_ordered_seed(p, cfg, (h, w), (np, levels), orderings, 6)
}

fn build_ordered_seed(
    p: &Plugin,
    cfg: &toml::Table,
    (h, w): (usize, usize),
    (np, levels): (usize, usize),
    orderings: &[Ordering],
    seed: u64,
) -> R<Box<dyn Conditional>> {
    let map = VarMap::new();
    let ctx = conformance::test_ctx(&map, seed, (h, w), (np, levels));
    Ok(p.build_ordered(cfg, ctx, orderings, orderings.len())?)
}

/// The configs of `p` that can take another order than raster (PixelCNN++ needs one level).
fn ordered_configs(p: &Plugin) -> Vec<toml::Table> {
    let odd = [Ordering::Zigzag];
    p.test_configs().into_iter().filter(|c| p.check_orderings(c, &odd).is_ok()).collect()
}

/// Every plugin x ordering: causality by perturbation in every member's order, exact sums,
/// stepper = forward and identical samplers; 2D plugins on a 3x4 image, so orderings differ.
#[test]
fn every_plugin_in_every_ordering() -> R<()> {
    let mut covered = Vec::new();
    for p in registry().into_iter().filter(|p| p.any_order) {
        let configs = ordered_configs(&p);
        assert!(!configs.is_empty(), "{}: no test config takes another ordering", p.name);
        covered.push(p.name);
        for cfg in configs {
            for set in ordering_sets() {
                let what = format!("{} {cfg:?} {set:?}", p.name);
                let (h, w) = (3, 4);
                let net = build_ordered(&p, &cfg, (h, w), (3, LEVELS), &set)?;
                if arm_backends::ordered::needs_wrapper(p.is_2d, &set) {
                    assert_eq!(net.members().1, set.len(), "{what}");
                }
                // 2D liveness in sequence positions has no rows to speak of; see the test below.
                // Tiny random networks can be dead (every ReLU off): the liveness half may try
                // other seeds, a causality violation fails at once.
                let sees = p.sees_predecessor && !p.is_2d;
                let mut live = Err(String::new());
                for seed in 6..12 {
                    let net = build_ordered_seed(&p, &cfg, (h, w), (3, LEVELS), &set, seed)?;
                    live = conformance::causality(net.as_ref(), w, false, sees);
                    match &live {
                        Err(e) if e.contains("changed when") => return Err(format!("{what} seed {seed}: {e}").into()),
                        Err(_) => continue,
                        Ok(()) => break,
                    }
                }
                live.map_err(|e| format!("{what}: {e} (seeds 6-11)"))?;
                conformance::stepper_matches_forward(net.as_ref()).map_err(|e| format!("{what}: {e}"))?;
                let k = 3;
                for head_name in head_names() {
                    let head = every_head(head_name, k)?;
                    if head.likelihood() {
                        let net = build_ordered(&p, &cfg, (2, 2), (head.num_params(), k), &set)?;
                        let arm = Arm::new(net, head, k, (2, 2), set[0])?;
                        conformance::sums_to_one(&arm).map_err(|e| format!("{what} {head_name} sums: {e}"))?;
                    }
                    let head = every_head(head_name, k)?;
                    let net = build_ordered(&p, &cfg, (h, w), (head.num_params(), k), &set)?;
                    let arm = Arm::new(net, head, k, (h, w), set[0])?;
                    conformance::samplers_agree(&arm, 5).map_err(|e| format!("{what} {head_name} samplers: {e}"))?;
                }
            }
        }
    }
    for name in ["pixelcnn", "gated_pixelcnn", "pixelcnnpp", "pixelsnail", "causal_conv1d", "transformer"] {
        assert!(covered.contains(&name), "{name} is not checked in every ordering");
    }
    Ok(())
}

/// Locally masked 2D networks see their image neighbours: the output at each pixel changes with
/// each of its 4-neighbours that comes earlier in the ordering (the first layer's window
/// covers them), and never with a later pixel (causality above).
#[test]
fn locally_masked_networks_see_their_earlier_neighbours() -> R<()> {
    let (h, w) = (3, 4);
    for p in registry().into_iter().filter(|p| p.is_2d && p.any_order) {
        for cfg in ordered_configs(&p) {
            for o in [Ordering::Zigzag, Ordering::Hilbert, Ordering::Columns, Ordering::Random(9)] {
                let rank = o.rank(h, w);
                // (later pixel, earlier neighbour) pairs; tiny random networks can have a dead
                // pixel (every ReLU off), so a pair counts as seen if any of 6 seeds sees it.
                let mut unseen: Vec<(usize, usize)> = Vec::new();
                for j in 0..h * w {
                    let (r, c) = (j / w, j % w);
                    for (rr, cc) in [(r + 1, c), (r, c + 1), (r.wrapping_sub(1), c), (r, c.wrapping_sub(1))] {
                        if rr < h && cc < w && rank[rr * w + cc] > rank[j] {
                            unseen.push((rr * w + cc, j));
                        }
                    }
                }
                for seed in 1..7 {
                    let net = build_ordered_seed(&p, &cfg, (h, w), (3, LEVELS), &[o], seed)?;
                    let x = random_levels(1, h * w, LEVELS, 17 + seed);
                    let scale = 1.0 / (LEVELS - 1) as f64;
                    let base = net.forward_t(&x.affine(scale, 0.0)?, false)?;
                    for j in 0..h * w {
                        let mut v = x.to_vec2::<f32>()?;
                        v[0][rank[j]] = ((v[0][rank[j]] as usize + 2) % LEVELS) as f32; // image pixel j
                        let out = net.forward_t(&Tensor::new(v, &DEV)?.affine(scale, 0.0)?, false)?;
                        let diff = (&out - &base)?.abs()?.sum(2)?.squeeze(0)?.to_vec1::<f32>()?; // by sequence position
                        unseen.retain(|&(q, from)| from != j || diff[rank[q]] == 0.0);
                    }
                }
                if let Some((q, j)) = unseen.first() {
                    return Err(
                        format!("{} {cfg:?} {o}: pixel {q} does not see its earlier neighbour {j}", p.name).into()
                    );
                }
            }
        }
    }
    Ok(())
}
