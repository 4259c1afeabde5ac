//! One file per conditional plugin; each is registered with one line in `registry()`.

pub mod causal_conv1d;
pub mod fvsbn;
pub mod gated_pixelcnn;
pub mod made;
pub mod markov;
pub mod mlp;
pub mod nade;
pub mod pixelcnn;
pub mod pixelcnnpp;
pub mod pixelsnail;
pub mod rnn;
pub mod transformer;
