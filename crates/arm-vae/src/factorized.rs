//! The factorized decoder p(x|z) = prod_d p(x_d | z): an MLP from the latent to every pixel's
//! head parameters, the decoder of the original VAE (Kingma & Welling 2014, App. C.1). It
//! reads no pixel, so it is autoregressive in any order; as a `Conditional` it only takes a
//! conditioning vector.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use arm_backends::layers::{linear, Linear};
use arm_core::{Conditional, Result, Stepper};

pub struct Factorized {
    hidden: Linear, // Z -> H
    out: Linear,    // H -> D * P
    dims: usize,
    params: usize,
    latent: usize,
    device: Device,
}

pub fn factorized(latent: usize, hidden: usize, (dims, params): (usize, usize), vb: VarBuilder) -> Result<Factorized> {
    Ok(Factorized {
        hidden: linear(latent, hidden, vb.pp("hidden"))?,
        out: linear(hidden, dims * params, vb.pp("out"))?,
        dims,
        params,
        latent,
        device: vb.device().clone(),
    })
}

impl Factorized {
    /// (B or 1, Z) -> (B, D, P) for a batch of `b` images.
    fn params_of(&self, z: &Tensor, b: usize) -> Result<Tensor> {
        let out = self.out.forward(&self.hidden.forward_relu(z)?)?; // (Bz, D * P)
        let out = out.reshape((out.dim(0)?, self.dims, self.params))?; // (Bz, D, P)
        match out.dim(0)? {
            n if n == b => Ok(out),
            1 => out.broadcast_as((b, self.dims, self.params))?.contiguous(),
            n => candle_core::bail!("factorized decoder: {n} latents for {b} images"),
        }
    }
}

impl Conditional for Factorized {
    fn forward_t(&self, _x: &Tensor, _train: bool) -> Result<Tensor> {
        candle_core::bail!("factorized decoder: needs a latent (forward_cond)")
    }
    fn seq_len(&self) -> usize {
        self.dims
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn cond_dim(&self) -> usize {
        self.latent
    }
    fn forward_cond(&self, x: &Tensor, z: &Tensor, _train: bool) -> Result<Tensor> {
        self.params_of(z, x.dim(0)?)
    }
    fn stepper_cond(&self, batch: usize, z: &Tensor) -> Result<Option<Box<dyn Stepper + '_>>> {
        Ok(Some(Box::new(AllAtOnce { out: self.params_of(z, batch)?, pos: 0 })))
    }
}

/// Every pixel's parameters are known before the first: the stepper reads them off.
struct AllAtOnce {
    out: Tensor, // (B, D, P)
    pos: usize,
}

impl Stepper for AllAtOnce {
    fn params(&mut self) -> Result<Tensor> {
        if self.pos >= self.out.dim(1)? {
            candle_core::bail!("stepper: all {} positions are already filled", self.pos);
        }
        self.out.narrow(1, self.pos, 1)?.squeeze(1)
    }
    fn push(&mut self, _x_d: &Tensor) -> Result<()> {
        self.pos += 1;
        Ok(())
    }
}
