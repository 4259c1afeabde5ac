//! The runner's library target: the experiment-file loader (and the data configs it checks), so
//! that tests can call it in-process (tests/bad_input.rs fuzzes it with thousands of inputs).
//! The `runner` binary uses these modules from here. Keep them free of the binary's modules
//! (`crate::store`, `crate::run`, ...): anything they need must live in this target too.

pub mod config;
pub mod data;
