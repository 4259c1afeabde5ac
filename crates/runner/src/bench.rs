//! `runner bench train`: seconds per training step (forward, backward, optimiser), FLOPs
//! counted, achieved GFLOP/s and a matmul peak measured in the same run, evaluation
//! throughput and peak memory. The peak is a 1024^3 matmul timed after every training step
//! (the best of three back-to-back, median over the steps), so a machine whose load drifts
//! during the run slows both sides of the ratio.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;

use arm_train::{Adamax, ParamsAdamax};

use crate::config::{DataConfig, ModelConfig, RunConfig, SampleConfig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// An (m x k) @ (k x n) f32 matmul to time.
struct Matmul {
    a: Tensor,
    b: Tensor,
}

impl Matmul {
    fn new(m: usize, k: usize, n: usize, dev: &Device) -> Result<Self> {
        let mm = Self { a: Tensor::randn(0f32, 1.0, (m, k), dev)?, b: Tensor::randn(0f32, 1.0, (k, n), dev)? };
        drop(mm.a.matmul(&mm.b)?); // warm-up
        Ok(mm)
    }

    /// GFLOP/s of one product.
    fn gflops(&self) -> Result<f64> {
        let t0 = Instant::now();
        let c = self.a.matmul(&self.b)?;
        c.device().synchronize()?;
        let t = t0.elapsed().as_secs_f64();
        Ok(2.0 * (self.a.elem_count() * self.b.dim(1)?) as f64 / t / 1e9)
    }

    /// Median GFLOP/s of `reps` products.
    fn median_gflops(&self, reps: usize) -> Result<f64> {
        Ok(median((0..reps).map(|_| self.gflops()).collect::<Result<Vec<_>>>()?))
    }
}

/// GFLOP/s of an (m x k) @ (k x n) f32 matmul, median of `reps`.
pub fn matmul_gflops(m: usize, k: usize, n: usize, reps: usize, dev: &Device) -> Result<f64> {
    Matmul::new(m, k, n, dev)?.median_gflops(reps)
}

/// Median milliseconds per step and calls per step of every phase recorded by the fused ops.
fn print_phases(steps: &[Vec<(&'static str, f64, u64)>]) {
    let mut names: Vec<&str> = steps.iter().flatten().map(|p| p.0).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let of = |f: &dyn Fn(&(&str, f64, u64)) -> f64| {
            median(steps.iter().map(|s| s.iter().find(|p| p.0 == name).map_or(0.0, f)).collect())
        };
        println!("    {name:<28} {:>8.2} ms/step {:>4} calls", 1e3 * of(&|p| p.1), of(&|p| p.2 as f64));
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Forward matmul FLOPs per image: the plugin's own count when it has one (dense masked
/// networks apply each weight once per image, attention adds score products), else every
/// weight matrix (every variable of rank >= 2) applied once at every pixel, as in the
/// convolutional plugins: 2 D sum(weights). Element-wise work (biases, activations, gates) is
/// not counted.
pub fn forward_flops_per_image(arm: &arm_core::Arm, map: &candle_nn::VarMap) -> f64 {
    if let Some(f) = arm.conditional().flops_per_image() {
        return f;
    }
    let weights: usize = map.all_vars().iter().filter(|v| v.rank() >= 2).map(|v| v.elem_count()).sum();
    2.0 * arm.dims() as f64 * weights as f64
}

pub struct Case {
    pub label: String,
    pub cfg: RunConfig,
}

fn case(label: &str, data: &str, backend: &str, set: &[(&str, toml::Value)]) -> Case {
    let mut plugin = arm_backends::plugin(backend).map(|p| p.defaults()).unwrap_or_default();
    for (k, v) in set {
        plugin.insert((*k).into(), v.clone());
    }
    Case {
        label: label.into(),
        cfg: RunConfig {
            name: "bench".into(),
            seed: 0,
            data: DataConfig { name: data.into(), ordering: Default::default(), ..Default::default() },
            model: ModelConfig {
                backend: backend.into(),
                head: "categorical".into(),
                plugin,
                head_table: Default::default(),
                vae: None,
            },
            train: Default::default(),
            sample: SampleConfig::default(),
            grid: vec![],
        },
    }
}

impl Case {
    /// The same case in another pixel ordering (2D plugins: locally masked convolutions).
    fn ordered(mut self, ordering: &str) -> Case {
        self.cfg.data.ordering = ordering.parse().unwrap_or_default();
        self
    }
}

/// The reference network (batch 64, 64 pixels, 256 channels, kernel 7, 4 layers) and a gated
/// PixelCNN with 128 channels.
pub fn default_cases() -> Vec<Case> {
    vec![
        case("causal_conv1d 256ch k7 x4 (reference)", "digits", "causal_conv1d", &[]),
        case("gated_pixelcnn 128ch x5 k3", "digits", "gated_pixelcnn", &[("channels", toml::Value::Integer(128))]),
        case("pixelcnnpp 64f x2 2 levels", "digits", "pixelcnnpp", &[]),
        case("pixelcnnpp 128f x2 2 levels", "digits", "pixelcnnpp", &[("nr_filters", toml::Value::Integer(128))]),
        case("pixelsnail 64f 2 blocks 2 heads", "digits", "pixelsnail", &[]),
        case("pixelsnail 64f 2 blocks 28x28 binary", "mnist10k-binary", "pixelsnail", &[]),
        case("fvsbn", "digits", "fvsbn", &[]),
        case("nade 500 hidden", "digits", "nade", &[]),
        case("made 500 hidden", "digits", "made", &[]),
        case("fvsbn 28x28 binary", "mnist10k-binary", "fvsbn", &[]),
        case("nade 500 hidden 28x28 binary", "mnist10k-binary", "nade", &[]),
        case("made 500 hidden 28x28 binary", "mnist10k-binary", "made", &[]),
        case("gated_pixelcnn 64ch x5 k3 zigzag (LMConv)", "digits", "gated_pixelcnn", &[]).ordered("zigzag"),
        case("gated_pixelcnn 32ch x6 k3 28x28 binary", "mnist10k-binary", "gated_pixelcnn", &[
            ("channels", toml::Value::Integer(32)),
            ("layers", toml::Value::Integer(6)),
        ]),
        case("causal_conv1d 64ch k7 x4 28x28 binary", "mnist10k-binary", "causal_conv1d", &[
            ("channels", toml::Value::Integer(64)),
        ]),
        case("transformer 128w x4 4h", "digits", "transformer", &[]),
        case("transformer 64w x2 2h 28x28 binary", "mnist10k-binary", "transformer", &[
            ("width", toml::Value::Integer(64)),
            ("depth", toml::Value::Integer(2)),
            ("heads", toml::Value::Integer(2)),
        ]),
    ]
}

pub fn bench_train(cases: &[Case], steps: usize, profile: bool, dev: &Device) -> Result<()> {
    let batch = 64;
    let square = Matmul::new(1024, 1024, 1024, dev)?;
    let peak_sq = square.median_gflops(10)?;
    let peak_conv = matmul_gflops(batch * 64, 7 * 256, 256, 10, dev)?;
    println!("matmul now: 1024x1024x1024 {peak_sq:.1} GFLOP/s; 4096x1792x256 {peak_conv:.1} GFLOP/s");
    println!();
    println!(
        "{:<42} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "model", "step s", "fwd s", "bwd s", "opt s", "GFLOP/step", "GFLOP/s", "peak", "% peak", "eval im/s", "rss MiB"
    );
    for case in cases {
        let (arm, map, data) = crate::run::build(&case.cfg, dev)?;
        let fwd_flops = forward_flops_per_image(&arm, &map) * batch as f64;
        let mut opt = Adamax::new(map.all_vars(), ParamsAdamax::default())?;
        let idx: Vec<usize> = (0..batch).collect();
        let x = data.train.batch(&idx, dev)?;
        let (mut tf, mut tb, mut to, mut ts, mut peaks) = (vec![], vec![], vec![], vec![], vec![]);
        let mut phases = Vec::new();
        for i in 0..steps + 2 {
            // The two warm-up steps are neither timed nor profiled.
            arm_kernels::profile::enable(profile && i >= 2);
            // On a pool worker, as the trainer runs its steps.
            let (t0, t1, t2, t3) = arm_train::in_pool(dev, || -> Result<_> {
                let t0 = Instant::now();
                let loss = arm.nll(&x, true)?;
                let _ = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                let t1 = Instant::now();
                let grads = loss.backward()?;
                dev.synchronize()?;
                let t2 = Instant::now();
                opt.step(&grads)?;
                dev.synchronize()?;
                let t3 = Instant::now();
                Ok((t0, t1, t2, t3))
            })?;
            arm_kernels::profile::enable(false);
            if i >= 2 {
                phases.push(arm_kernels::profile::totals());
                tf.push((t1 - t0).as_secs_f64());
                tb.push((t2 - t1).as_secs_f64());
                to.push((t3 - t2).as_secs_f64());
                ts.push((t3 - t0).as_secs_f64());
                // The fastest of three back-to-back products: the first after a step runs cold
                // (slower; see PERF.md), which would flatter the ratio.
                peaks
                    .push((0..3).map(|_| square.gflops()).collect::<Result<Vec<_>>>()?.into_iter().fold(0.0, f64::max));
            }
        }
        let step = median(ts);
        let peak = median(peaks);
        // Training = forward + backward (grad w.r.t. inputs and weights): 3x the forward FLOPs.
        let gflops = 3.0 * fwd_flops / step / 1e9;
        let t0 = Instant::now();
        let chunk = case.cfg.train.eval_chunk(data.dims());
        let n_eval = arm_train::evaluate(&arm, &data.val, chunk).map(|_| data.val.n)?;
        let eval_ips = n_eval as f64 / t0.elapsed().as_secs_f64();
        println!(
            "{:<42} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>10.2} {:>9.1} {:>9.1} {:>7.1}% {:>9.0} {:>9.0}",
            case.label,
            step,
            median(tf),
            median(tb),
            median(to),
            3.0 * fwd_flops / 1e9,
            gflops,
            peak,
            100.0 * gflops / peak,
            eval_ips,
            peak_rss_mib()
        );
        if profile {
            print_phases(&phases);
        }
    }
    println!();
    println!("peak: GFLOP/s of a 1024^3 matmul after each step (best of 3, median over steps).");
    if profile {
        println!("phases (--profile): median over the steps; a phase includes those named after it (`dense bwd`");
        println!("includes `dense bwd dW`), and ops outside the fused ones (candle's) are not listed.");
    }
    Ok(())
}
