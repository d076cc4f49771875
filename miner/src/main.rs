//! `veil-miner`: parses the command line and runs the miner (see `veil_miner::cli`).

use std::process::ExitCode;

use clap::Parser;
use veil_miner::config::{Cli, Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // mistral.rs resolves (and creates) a Hugging Face home when it loads a model: `HF_HOME`, else
    // `~/.cache/huggingface`. Models are only ever read from local paths, but keep even that empty
    // directory inside the miner's own data dir. Set before the runtime starts any thread.
    if std::env::var_os("HF_HOME").is_none()
        && let Ok(settings) = Settings::resolve(&cli)
        && let Ok(dir) = std::path::absolute(settings.data_dir().join("cache").join("huggingface"))
    {
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("HF_HOME", dir) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veil-miner: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(veil_miner::cli::main(cli))
}
