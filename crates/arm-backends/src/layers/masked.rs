//! Masked fully connected layers (Germain et al. 2015, "MADE: Masked Autoencoder for
//! Distribution Estimation", eq. 10-11): y = x (W . M) + b with a fixed 0/1 mask M per
//! *member*, so one set of weights serves several connectivity patterns (MADE's mask
//! ensembles). Masked-out weights get a zero gradient (the product with M is part of the
//! graph), so they never matter whatever their value.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use arm_core::Result;

use super::linear::torch_uniform;

#[derive(Debug, Clone)]
pub struct MaskedLinear {
    w: Tensor,          // (in, out)
    b: Tensor,          // (out,)
    masks: Vec<Tensor>, // one (in, out) 0/1 mask per member
}

/// A layer from `inp` to `out` features with the given masks, each `inp * out` values in
/// row-major (in, out) order, 1 where the weight exists.
pub fn masked_linear(inp: usize, out: usize, masks: &[Vec<f32>], vb: VarBuilder) -> Result<MaskedLinear> {
    if masks.is_empty() || masks.iter().any(|m| m.len() != inp * out) {
        candle_core::bail!("masked_linear: every mask must have {inp} x {out} entries");
    }
    let init = torch_uniform(inp);
    let w = vb.get_with_hints((inp, out), "weight", init)?;
    let b = vb.get_with_hints(out, "bias", init)?;
    let masks = masks.iter().map(|m| Tensor::from_slice(m, (inp, out), w.device())).collect::<Result<Vec<_>>>()?;
    Ok(MaskedLinear { w, b, masks })
}

impl MaskedLinear {
    /// W . M of member `m`, (in, out).
    fn weight(&self, m: usize) -> Result<Tensor> {
        let mask = self.masks.get(m).ok_or_else(|| candle_core::Error::Msg(format!("no mask {m}")))?;
        self.w.mul(mask)
    }

    /// x (..., in) -> (..., out) through member `m`'s connectivity; ReLU'd when `relu`.
    pub fn forward(&self, x: &Tensor, m: usize, relu: bool) -> Result<Tensor> {
        arm_kernels::dense(x, &self.weight(m)?, &self.b, None, relu.then_some(0.0))
    }

    /// Output columns [first, first + n) only: x (B, in) -> (B, n), for a stepper that needs
    /// the parameters of one variable.
    pub fn forward_columns(&self, x: &Tensor, m: usize, first: usize, n: usize) -> Result<Tensor> {
        let w = self.weight(m)?.narrow(1, first, n)?; // (in, n)
        x.matmul(&w)?.broadcast_add(&self.b.narrow(0, first, n)?)
    }

    /// acc + x_j (W . M)[j, :] for acc (B, out) and x_j (B,): the pre-activations after input j
    /// arrives, for steppers that add one input at a time.
    pub fn add_input(&self, acc: &Tensor, x_j: &Tensor, j: usize, m: usize) -> Result<Tensor> {
        let row = self.weight(m)?.narrow(0, j, 1)?; // (1, out)
        acc + x_j.unsqueeze(1)?.broadcast_mul(&row)?
    }

    /// The bias broadcast to `batch` rows: the pre-activations before any input, (B, out).
    pub fn bias_rows(&self, batch: usize) -> Result<Tensor> {
        self.b.unsqueeze(0)?.broadcast_as((batch, self.b.dim(0)?))?.contiguous()
    }

    pub fn out_features(&self) -> usize {
        self.w.dims().get(1).copied().unwrap_or(0)
    }

    /// Members (masks) of the layer.
    pub fn members(&self) -> usize {
        self.masks.len()
    }

    /// Whether weight (i, o) exists in member `m`.
    pub fn connected(&self, m: usize, i: usize, o: usize) -> Result<bool> {
        let mask = self.masks.get(m).ok_or_else(|| candle_core::Error::Msg(format!("no mask {m}")))?;
        Ok(mask.get(i)?.get(o)?.to_scalar::<f32>()? != 0.0)
    }

    /// Test hook: connects weight (i, o) of member `m` (to break a mask on purpose).
    #[doc(hidden)]
    pub fn force_connect(&mut self, m: usize, i: usize, o: usize) -> Result<()> {
        let (inp, out) = self.w.dims2()?;
        let mut v = self.masks[m].flatten_all()?.to_vec1::<f32>()?;
        v[i * out + o] = 1.0;
        self.masks[m] = Tensor::from_vec(v, (inp, out), self.w.device())?;
        Ok(())
    }
}
