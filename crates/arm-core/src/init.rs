//! Seeded parameter initialisation. candle's CPU RNG cannot be seeded, so variables are drawn
//! here from a ChaCha8 stream (portable and stable across platforms and rand versions) in the
//! order the model asks for them: the same construction code and seed give the same weights.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// A `VarBuilder` backend that creates variables in a `VarMap` from a seeded stream.
pub struct SeededInit {
    map: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededInit {
    pub fn new(map: VarMap, seed: u64) -> Self {
        Self { map, rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) }
    }

    fn draw(&self, shape: &Shape, init: Init) -> Vec<f32> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
            (0..n).map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32).collect()
        };
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
            // Box-Muller; 1 - u keeps the log argument in (0, 1].
            (0..n)
                .map(|_| {
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random::<f64>();
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (mean + std * z) as f32
                })
                .collect()
        };
        match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Kaiming { dist, fan, non_linearity } => {
                let fan = match fan {
                    FanInOut::FanIn | FanInOut::FanOut => fan.for_shape(shape).max(1),
                };
                let std = non_linearity.gain() / (fan as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                }
            }
        }
    }
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("variable {name}: shape {:?}, asked for {s:?}", v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let values = self.draw(&s, h);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.map.data().lock().unwrap_or_else(|e| e.into_inner());
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.data().lock().unwrap_or_else(|e| e.into_inner()).contains_key(name)
    }
}

/// A `VarBuilder` whose new variables are drawn from `seed` and stored in `map`
/// (whose `all_vars` then feeds the optimiser and whose `save` writes safetensors).
pub fn seeded_var_builder(map: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededInit::new(map.clone(), seed)), DType::F32, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() -> Result<()> {
        let draw = |seed| -> Result<Vec<f32>> {
            let map = VarMap::new();
            let vb = seeded_var_builder(&map, seed, &Device::Cpu);
            let t = vb.get_with_hints((4, 5), "w", Init::Uniform { lo: -1.0, up: 1.0 })?;
            t.flatten_all()?.to_vec1::<f32>()
        };
        let (a, b, c) = (draw(7)?, draw(7)?, draw(8)?);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        Ok(())
    }
}
