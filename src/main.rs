//! `runner`: train, sweep, report and compare autoregressive image models.
//! A thin main: parse, dispatch, print the error chain on one line, exit non-zero
//! (2 for bad input, 1 for failures while running).

mod commands;
mod config;
mod plots;
mod run;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Bad input (config, files, flags): exit status 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for BadInput {}

pub fn bad_input(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(BadInput(e.to_string()))
}

#[derive(Parser)]
#[command(name = "runner", version, about = "Train, sweep and compare autoregressive image models")]
pub struct Cli {
    /// Results folder.
    #[arg(long, global = true, default_value = "results", env = "RUNNER_RESULTS")]
    results: PathBuf,
    /// Device: cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one run of an experiment file (the first seed unless --seed).
    Train {
        file: PathBuf,
        /// Override a key: --set train.lr=0.002 (value read as TOML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Which of the file's seeds (or any seed) to train.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// List every conditional plugin and head with its config keys and defaults.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            if e.downcast_ref::<BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
