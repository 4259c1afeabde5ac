//! Polyak averaging of the weights (Polyak & Juditsky 1992), as PixelCNN++ evaluates with
//! (Salimans et al. 2017, §3, decay 0.9995): after every optimiser step
//! e <- decay e + (1 - decay) w, starting from the initial weights (no bias correction, as
//! TensorFlow's `ExponentialMovingAverage`).

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

use arm_kernels::{cpu_f32, cpu_f32_mut};

/// The averages of `vars`, in their order.
pub struct Ema {
    decay: f64,
    vars: Vec<Var>,
    avg: Vec<Tensor>,
}

impl Ema {
    pub fn new(vars: Vec<Var>, decay: f64) -> candle_core::Result<Self> {
        let avg = vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { decay, vars, avg })
    }

    /// One averaging step, after an optimiser step.
    pub fn update(&mut self) -> candle_core::Result<()> {
        let d = self.decay;
        for (e, v) in self.avg.iter_mut().zip(&self.vars) {
            let w = v.as_tensor();
            let fused =
                w.device().is_cpu() && e.dtype() == DType::F32 && w.dtype() == DType::F32 && e.is_contiguous();
            if fused {
                e.inplace_op2(&w.contiguous()?, &Average { decay: d as f32 })?;
            } else {
                *e = ((&*e * d)? + (w * (1.0 - d))?)?.detach();
            }
        }
        Ok(())
    }

    /// The averages, in the variables' order.
    pub fn averages(&self) -> &[Tensor] {
        &self.avg
    }

    /// Replaces the averages (from a checkpoint), checking their shapes.
    pub fn set(&mut self, avg: Vec<Tensor>) -> candle_core::Result<()> {
        if avg.len() != self.vars.len() {
            candle_core::bail!("ema: {} averages for {} variables", avg.len(), self.vars.len());
        }
        for (a, v) in avg.iter().zip(&self.vars) {
            if a.shape() != v.shape() {
                candle_core::bail!("ema: average of shape {:?} for a variable of shape {:?}", a.shape(), v.shape());
            }
        }
        self.avg = avg
            .into_iter()
            .zip(&self.vars)
            .map(|(a, v)| a.to_dtype(v.dtype())?.to_device(v.device())?.copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(())
    }
}

/// e = decay e + (1 - decay) w, in place.
struct Average {
    decay: f32,
}

impl InplaceOp2 for Average {
    fn name(&self) -> &'static str {
        "ema_update"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (e, w) = (cpu_f32_mut(s1, l1, "ema average")?, cpu_f32(s2, l2, "ema weight")?);
        let d = self.decay;
        e.par_chunks_mut(1 << 14).zip(w.par_chunks(1 << 14)).for_each(|(e, w)| {
            e.iter_mut().zip(w).for_each(|(e, &w)| *e = d * *e + (1.0 - d) * w);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three steps by hand: w goes 1 -> 3 -> 0 -> 2 after steps; with decay 0.5,
    /// e = 1 -> 0.5*1 + 0.5*3 = 2 -> 0.5*2 + 0 = 1 -> 0.5*1 + 0.5*2 = 1.5.
    #[test]
    fn averages_equal_a_hand_computed_average() -> candle_core::Result<()> {
        let w = Var::from_tensor(&Tensor::new(&[1f32, -4.0], &Device::Cpu)?)?;
        let mut ema = Ema::new(vec![w.clone()], 0.5)?;
        let w64 = Var::from_tensor(&Tensor::new(&[1f64, -4.0], &Device::Cpu)?)?; // the composed path
        let mut ema64 = Ema::new(vec![w64.clone()], 0.5)?;
        for (a, b) in [(3.0, 0.0), (0.0, 8.0), (2.0, -2.0)] {
            w.set(&Tensor::new(&[a as f32, b as f32], &Device::Cpu)?)?;
            w64.set(&Tensor::new(&[a, b], &Device::Cpu)?)?;
            ema.update()?;
            ema64.update()?;
        }
        // Second entry: -4 -> -2 -> 3 -> 0.5.
        assert_eq!(ema.averages()[0].to_vec1::<f32>()?, vec![1.5, 0.5]);
        assert_eq!(ema64.averages()[0].to_vec1::<f64>()?, vec![1.5, 0.5]);
        Ok(())
    }
}
