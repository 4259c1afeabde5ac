//! `rnn`: a recurrent ARM (Tomczak, "Deep Generative Modeling", §2.2.2 "Long-range memory
//! through RNNs"; van den Oord et al. 2016, "Pixel Recurrent Neural Networks", §2): the state
//! h_d = cell(x_{d-1}, h_{d-1}) summarises x_<d, and the parameters of x_d are a linear map
//! of h_d. Position 0 reads a zero input and a zero state, so its parameters are learned
//! constants (the biases). The cells (plain tanh, GRU, LSTM) are written out in
//! `layers/recurrent.rs`.
//!
//! Layers are stacked (dropout between them and before the output layer, training only). The
//! cached stepper keeps each layer's state: one cell step per pixel. Left out: the row and
//! diagonal LSTMs of PixelRNN (this one reads the sequence, not the 2D image).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use arm_core::{Conditional, Stepper};
type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

pub use crate::layers::CellKind;
use crate::layers::{cell, linear, Cell, Dropout, Linear, State};
use crate::registry::{invalid, BuildCtx, PluginConfig, PluginError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RnnConfig {
    /// Recurrent cell: "tanh" (the plain RNN of eq. 2.7), "gru" or "lstm".
    pub cell: CellKind,
    /// State size of each layer.
    pub hidden: usize,
    /// Stacked recurrent layers.
    pub layers: usize,
    /// Dropout probability on each layer's outputs (training only).
    pub dropout: f64,
}

impl Default for RnnConfig {
    fn default() -> Self {
        Self { cell: CellKind::Gru, hidden: 256, layers: 1, dropout: 0.0 }
    }
}

impl PluginConfig for RnnConfig {
    const NAME: &'static str = "rnn";
    const SUMMARY: &'static str = "recurrent ARM (plain tanh RNN, GRU or LSTM) over the pixel sequence";

    fn validate(&self, _h: usize, _w: usize) -> Result<(), PluginError> {
        if self.hidden == 0 {
            return Err(invalid("hidden", "must be at least 1, got 0"));
        }
        if self.layers == 0 {
            return Err(invalid("layers", "must be at least 1, got 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    fn build(&self, ctx: BuildCtx) -> Result<Box<dyn Conditional>, PluginError> {
        let cells = (0..self.layers)
            .map(|l| {
                let inp = if l == 0 { 1 } else { self.hidden };
                cell(self.cell, inp, self.hidden, ctx.vb.pp(format!("layers.{l}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(RnnNet {
            cells,
            out: linear(self.hidden, ctx.num_params, ctx.vb.pp("out"))?,
            dropout: Dropout::new(self.dropout, ctx.seed),
            dims: ctx.dims(),
            device: ctx.device,
        }))
    }

    fn test_configs() -> Vec<Self> {
        let c = |cell, hidden, layers| Self { cell, hidden, layers, dropout: 0.0 };
        vec![
            c(CellKind::Gru, 4, 1),
            c(CellKind::Lstm, 3, 1),
            c(CellKind::Gru, 3, 2),
            c(CellKind::Lstm, 4, 2),
            c(CellKind::Tanh, 4, 1),
            c(CellKind::Tanh, 3, 2),
        ]
    }

    fn key_docs() -> &'static [(&'static str, &'static str)] {
        &[
            ("cell", "recurrent cell: \"tanh\" (plain RNN, eq. 2.7), \"gru\" or \"lstm\""),
            ("hidden", "state size of each layer"),
            ("layers", "stacked recurrent layers"),
            ("dropout", "dropout on each layer's outputs"),
        ]
    }
}

pub struct RnnNet {
    cells: Vec<Cell>,
    out: Linear,
    dropout: Dropout,
    dims: usize,
    device: Device,
}

impl Conditional for RnnNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, d) = x.dims2()?;
        if d != self.dims {
            candle_core::bail!("rnn: input has {d} positions, built for {}", self.dims);
        }
        // Position t reads x_{t-1}; position 0 reads zero. Steps are kept as separate tensors:
        // slicing one (B, D, .) tensor that needs a gradient at every step would make the
        // backward pass build and sum D full-size gradients (quadratic in D).
        let zero = Tensor::zeros((b, 1), DType::F32, &self.device)?;
        let mut seq = (0..d)
            .map(|t| if t == 0 { Ok(zero.clone()) } else { x.narrow(1, t - 1, 1) })
            .collect::<Result<Vec<_>>>()?; // D x (B, 1)
        for cell in &self.cells {
            let mut s = cell.zero_state(b, &self.device)?;
            let mut hs = Vec::with_capacity(d);
            for inp in &seq {
                s = cell.forward(inp, &s)?; // (B, H)
                hs.push(self.dropout.forward_t(&s.h, train)?);
            }
            seq = hs;
        }
        let seq = Tensor::stack(&seq, 1)?; // (B, D, H)
        self.out.forward(&seq) // (B, D, P)
    }

    fn seq_len(&self) -> usize {
        self.dims
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn begin_epoch(&self, epoch: usize) {
        self.dropout.begin_epoch(epoch);
    }

    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        let states = self.cells.iter().map(|c| c.zero_state(batch, &self.device)).collect::<Result<Vec<_>>>()?;
        let input = Tensor::zeros((batch, 1), DType::F32, &self.device)?;
        Ok(Box::new(RnnStepper { net: self, batch, pos: 0, states, input, next: None }))
    }
}

/// Cached generation: each layer's state after position pos-1 and the input of position pos
/// (x_{pos-1}); `next` holds the states and parameters of position pos once computed.
struct RnnStepper<'a> {
    net: &'a RnnNet,
    batch: usize,
    pos: usize,
    states: Vec<State>,
    input: Tensor, // (B, 1)
    next: Option<(Vec<State>, Tensor)>,
}

impl Stepper for RnnStepper<'_> {
    fn params(&mut self) -> Result<Tensor> {
        if let Some((_, p)) = &self.next {
            return Ok(p.clone());
        }
        if self.pos >= self.net.dims {
            candle_core::bail!("stepper: all {} positions are already filled", self.net.dims);
        }
        let mut inp = self.input.clone();
        let mut states = Vec::with_capacity(self.states.len());
        for (cell, s) in self.net.cells.iter().zip(&self.states) {
            let s = cell.forward(&inp, s)?;
            inp = s.h.clone(); // (B, H)
            states.push(s);
        }
        let p = self.net.out.forward(&inp)?; // (B, P)
        self.next = Some((states, p.clone()));
        Ok(p)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        if self.next.is_none() {
            self.params()?; // the state must advance past this position before its input changes
        }
        if let Some((states, _)) = self.next.take() {
            self.states = states;
        }
        self.input = x_d.to_dtype(DType::F32)?.reshape((self.batch, 1))?;
        self.pos += 1;
        Ok(())
    }
}
