//! The plugin traits: a `Conditional` gives the parameters of p(x_d | x_<d) for every position
//! d in one pass (the factorisation of Larochelle & Murray 2011, eq. 1), and its `Stepper`
//! evaluates it one position at a time for sampling; plus the naive stepper, which recomputes
//! the whole pass at each position.

use candle_core::{Device, Tensor};

use crate::Result;

/// Maps a sequence of pixels to per-pixel head parameters. Row d of the output may depend only
/// on inputs x[..d] (strictly earlier positions of the sequence the `Arm` hands over, which is
/// already permuted into the model's ordering and scaled to [0, 1]).
pub trait Conditional: Send + Sync {
    /// x: (B, D) inputs in [0, 1]. Returns (B, D, P) with P = head.num_params().
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// Sequence length D the network was built for.
    fn seq_len(&self) -> usize;

    /// Device the parameters live on.
    fn device(&self) -> &Device;

    /// Called by the trainer before each epoch. Plugins with random training-time behaviour
    /// (dropout) re-seed it from (seed, epoch), so a run resumed at an epoch draws the same
    /// masks as an uninterrupted one.
    fn begin_epoch(&self, _epoch: usize) {}

    /// Incremental evaluation for sampling. The default recomputes the whole forward pass at
    /// each step: correct for any plugin, quadratic in D. Fast plugins override it with caches.
    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        Ok(Box::new(NaiveStepper::new(self, batch)?))
    }

    /// Width of the conditioning vector h the network was built to read (0: none). A network
    /// that reads one adds a linear map of h as a bias to every layer, the same at every
    /// position (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
    /// Decoders", eq. 4), so it stays autoregressive in x for every h.
    fn cond_dim(&self) -> usize {
        0
    }

    /// `forward_t` given h: (B, cond_dim), or (1, cond_dim) for one h shared by the batch.
    fn forward_cond(&self, _x: &Tensor, _h: &Tensor, _train: bool) -> Result<Tensor> {
        candle_core::bail!("this network takes no conditioning input")
    }

    /// The cached stepper given h; None: the caller recomputes the conditioned pass per step.
    fn stepper_cond(&self, _batch: usize, _h: &Tensor) -> Result<Option<Box<dyn Stepper + '_>>> {
        Ok(None)
    }

    /// Members of the ensemble this network defines with shared weights (MADE's connectivity
    /// masks): p(x) = mean_m p_m(x) over the first `n` members, or their weighted mean
    /// ([`Self::member_weights`]). Member 0 is `forward_t` in
    /// evaluation mode, autoregressive in sequence order; the others may follow other orders
    /// ([`Self::member_order`]). Returns (members evaluated by default, members available).
    fn members(&self) -> (usize, usize) {
        (1, 1)
    }

    /// Mixture weights of the members, one per available member (they need not sum to one:
    /// an ensemble of the first n renormalises its n). None: equal weights.
    fn member_weights(&self) -> Option<Vec<f64>> {
        None
    }

    /// Evaluation-mode forward pass of member `m` (< the available members), (B, D, P).
    fn forward_member(&self, x: &Tensor, m: usize) -> Result<Tensor> {
        if m != 0 {
            candle_core::bail!("member {m}: this network has one member");
        }
        self.forward_t(x, false)
    }

    /// The order in which member `m` is autoregressive: order[i] = the sequence position of its
    /// i-th variable, so row order[i] depends on inputs order[..i] only. None: sequence order.
    fn member_order(&self, _m: usize) -> Option<Vec<usize>> {
        None
    }

    /// Matrix-product FLOPs of one forward pass per image, when the network knows them (for
    /// `runner bench`); None lets the caller assume every weight matrix is applied at every
    /// position (true of convolutions and weight-shared layers).
    fn flops_per_image(&self) -> Option<f64> {
        None
    }
}

/// One-pixel-at-a-time evaluation of a conditional.
pub trait Stepper {
    /// (B, P) parameters for the next position.
    fn params(&mut self) -> Result<Tensor>;
    /// Feeds the value chosen for that position, (B,), scaled like `forward_t` inputs.
    fn push(&mut self, x_d: &Tensor) -> Result<()>;
}

/// Full forward pass per step over a buffer whose unfilled positions are zero.
pub struct NaiveStepper<'a, C: Conditional + ?Sized> {
    cond: &'a C,
    batch: usize,
    pos: usize,
    buf: Vec<f32>, // (B, D) row-major
}

impl<'a, C: Conditional + ?Sized> NaiveStepper<'a, C> {
    pub fn new(cond: &'a C, batch: usize) -> Result<Self> {
        let d = cond.seq_len();
        Ok(Self { cond, batch, pos: 0, buf: vec![0.0; batch * d] })
    }
}

impl<C: Conditional + ?Sized> Stepper for NaiveStepper<'_, C> {
    fn params(&mut self) -> Result<Tensor> {
        let d = self.cond.seq_len();
        if self.pos >= d {
            candle_core::bail!("stepper: all {d} positions are already filled");
        }
        let x = Tensor::from_slice(&self.buf, (self.batch, d), self.cond.device())?;
        let out = self.cond.forward_t(&x, false)?; // (B, D, P)
        out.narrow(1, self.pos, 1)?.squeeze(1) // (B, P)
    }

    fn push(&mut self, x_d: &Tensor) -> Result<()> {
        let d = self.cond.seq_len();
        let vals = x_d.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        if vals.len() != self.batch {
            candle_core::bail!("stepper: pushed {} values, batch is {}", vals.len(), self.batch);
        }
        for (b, v) in vals.into_iter().enumerate() {
            self.buf[b * d + self.pos] = v;
        }
        self.pos += 1;
        Ok(())
    }
}

/// A conditional network with its conditioning vector fixed: an ordinary `Conditional` of x
/// alone, so the samplers, the `Arm` and the conformance checks take it as they are.
#[derive(Clone)]
pub struct Conditioned {
    net: std::sync::Arc<dyn Conditional>,
    /// (B, cond_dim) or (1, cond_dim).
    h: Tensor,
}

impl Conditioned {
    pub fn new(net: std::sync::Arc<dyn Conditional>, h: Tensor) -> Result<Self> {
        let (_, c) = h.dims2()?;
        if c != net.cond_dim() || c == 0 {
            candle_core::bail!("conditioning vector of width {c}: the network reads {}", net.cond_dim());
        }
        Ok(Self { net, h })
    }
}

impl Conditional for Conditioned {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.net.forward_cond(x, &self.h, train)
    }
    fn seq_len(&self) -> usize {
        self.net.seq_len()
    }
    fn device(&self) -> &Device {
        self.net.device()
    }
    fn begin_epoch(&self, epoch: usize) {
        self.net.begin_epoch(epoch);
    }
    fn stepper(&self, batch: usize) -> Result<Box<dyn Stepper + '_>> {
        match self.net.stepper_cond(batch, &self.h)? {
            Some(st) => Ok(st),
            None => Ok(Box::new(NaiveStepper::new(self, batch)?)),
        }
    }
    fn flops_per_image(&self) -> Option<f64> {
        self.net.flops_per_image()
    }
}
