//! Core of the autoregressive-model lab: the `Conditional`, `Stepper` and `Head` traits, the
//! likelihood heads, pixel orderings, seeded parameter initialisation and the `Arm` that ties a
//! conditional to a head (NLL in nats per image, bits per dimension, exact samplers).
//!
//! An ARM factorises p(x) = prod_d p(x_d | x_<d) (Larochelle & Murray 2011, eq. 1; Tomczak,
//! "Deep Generative Modeling", ch. 2). Models here know nothing about files or the CLI.

mod arm;
pub mod heads;
mod init;
mod ordering;
mod predictive;
mod traits;

pub use arm::{bits_per_dim, Arm, SampleOutput, Sampler};
pub use heads::{categorical::Categorical, head_names, Head, HeadConfigError, HeadProblem};
pub use init::{seeded_var_builder, SeededInit};
pub use ordering::{gather_index, invert, Ordering};
pub use predictive::{FitOptions, FitReport, Forecaster};
pub use traits::{Conditional, Conditioned, NaiveStepper, Stepper};

/// Result type of the core: candle's error carries shape and op context.
pub type Result<T> = candle_core::Result<T>;
