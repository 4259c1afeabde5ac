//! Recurrent cells, written out on [`Linear`] so that every weight comes from the seeded
//! `VarBuilder`. Gate pre-activations are split along the last dimension:
//! - plain (Elman) RNN (Tomczak, "Deep Generative Modeling", eq. 2.7):
//!   h' = tanh(W_i x + b_i + W_h h + b_h);
//! - GRU (Cho et al. 2014, eq. 5-8, in PyTorch's form with r applied to W_hn h + b_hn):
//!   r = s(W_ir x + W_hr h), z = s(W_iz x + W_hz h), n = tanh(W_in x + r * (W_hn h)),
//!   h' = (1 - z) * n + z * h; order (r, z, n);
//! - LSTM (Hochreiter & Schmidhuber 1997; Graves 2013, eq. 7-11 without peepholes):
//!   (i, f, g, o) = W_i x + W_h h, c' = s(f) c + s(i) tanh(g), h' = s(o) tanh(c').

use candle_core::{DType, Device, Tensor};
use candle_nn::ops::sigmoid;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use arm_core::Result;

use super::{linear, Linear};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellKind {
    Tanh,
    Gru,
    Lstm,
}

impl CellKind {
    /// Pre-activations per state unit.
    fn gates(self) -> usize {
        match self {
            CellKind::Tanh => 1,
            CellKind::Gru => 3,
            CellKind::Lstm => 4,
        }
    }
}

/// One recurrent layer: input projection W_i x + b_i and recurrent projection W_h h + b_h.
pub struct Cell {
    kind: CellKind,
    hidden: usize,
    wi: Linear, // (in, G*H)
    wh: Linear, // (H, G*H)
}

/// A layer's recurrent state: h, and c for the LSTM.
#[derive(Clone)]
pub struct State {
    pub h: Tensor,     // (B, H)
    c: Option<Tensor>, // (B, H)
}

/// A cell of `kind` reading `inp` features into a state of `hidden` units.
pub fn cell(kind: CellKind, inp: usize, hidden: usize, vb: VarBuilder) -> Result<Cell> {
    let g = kind.gates();
    Ok(Cell {
        kind,
        hidden,
        wi: linear(inp, g * hidden, vb.pp("input"))?,
        wh: linear(hidden, g * hidden, vb.pp("hidden"))?,
    })
}

impl Cell {
    pub fn zero_state(&self, batch: usize, device: &Device) -> Result<State> {
        let z = Tensor::zeros((batch, self.hidden), DType::F32, device)?;
        let c = (self.kind == CellKind::Lstm).then(|| z.clone());
        Ok(State { h: z, c })
    }

    /// The next state from input x, (B, in), and state s.
    pub fn forward(&self, x: &Tensor, s: &State) -> Result<State> {
        let hd = self.hidden;
        let gx = self.wi.forward(x)?; // (B, G*H)
        let gh = self.wh.forward(&s.h)?; // (B, G*H)
        match self.kind {
            CellKind::Tanh => Ok(State { h: (gx + gh)?.tanh()?, c: None }),
            CellKind::Gru => {
                let rz = sigmoid(&(gx.narrow(1, 0, 2 * hd)? + gh.narrow(1, 0, 2 * hd)?)?)?; // (B, 2H)
                let (r, z) = (rz.narrow(1, 0, hd)?, rz.narrow(1, hd, hd)?);
                let n = (gx.narrow(1, 2 * hd, hd)? + r.mul(&gh.narrow(1, 2 * hd, hd)?)?)?.tanh()?; // (B, H)
                // h' = n + z * (h - n), the same as (1 - z) n + z h with one op fewer.
                let h = (&n + z.mul(&(&s.h - &n)?)?)?;
                Ok(State { h, c: None })
            }
            CellKind::Lstm => {
                let c = s.c.as_ref().ok_or_else(|| candle_core::Error::Msg("lstm state without c".into()))?;
                let g = (gx + gh)?; // (B, 4H)
                let ifo = sigmoid(&Tensor::cat(&[g.narrow(1, 0, 2 * hd)?, g.narrow(1, 3 * hd, hd)?], 1)?)?; // (B, 3H)
                let (i, f, o) = (ifo.narrow(1, 0, hd)?, ifo.narrow(1, hd, hd)?, ifo.narrow(1, 2 * hd, hd)?);
                let c = (f.mul(c)? + i.mul(&g.narrow(1, 2 * hd, hd)?.tanh()?)?)?; // (B, H)
                let h = o.mul(&c.tanh()?)?; // (B, H)
                Ok(State { h, c: Some(c) })
            }
        }
    }
}
