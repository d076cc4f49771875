//! `veil-miner`: parses the command line and runs the miner (see `veil_miner::cli`).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    veil_miner::cli::main(veil_miner::config::Cli::parse()).await
}
