//! The `veil-miner` command, run in-process through its library entry point
//! (`veil_miner::cli::run`) so that tests need not build another crate's binary.

use std::path::Path;

use clap::Parser;
use tokio::sync::oneshot;
use veil_miner::config::Cli;

/// The first anvil account's well-known private key (a public dev key, never a real wallet).
pub const DEV_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
/// Its address.
pub const DEV_ADDRESS: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";

/// A running `veil-miner serve`: send on `stop` for a graceful stop, then await `join`.
pub type MinerRun = (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<veil_miner::Result<Option<veil_miner::RunSummary>>>,
);

/// Starts `veil-miner` with the instant engine serving `model` as `tiny`, the dev key as its
/// wallet and `data_dir` for its identity file, against `router_url`.
pub fn start(router_url: &str, data_dir: &Path, model: &Path) -> MinerRun {
    start_engine(router_url, data_dir, "instant", model)
}

/// [`start`] with another engine (`instant` or `mistralrs`).
pub fn start_engine(router_url: &str, data_dir: &Path, engine: &str, model: &Path) -> MinerRun {
    let cli = Cli::try_parse_from([
        "veil-miner",
        "--router-url",
        router_url,
        "--dev-key-env",
        "TEST_MINER_KEY",
        "--engine",
        engine,
        "--model",
        &format!("tiny={}", model.display()),
        "--data-dir",
        data_dir.to_str().expect("a UTF-8 path"),
        "--concurrency",
        "2",
        "--lease-wait-ms",
        "1000",
        "--shutdown-grace-ms",
        "5000",
    ])
    .expect("valid command line");
    let env = |name: &str| (name == "TEST_MINER_KEY").then(|| DEV_KEY.to_string());
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(veil_miner::cli::run(cli, env, async move {
        let _ = stopped.await;
    }));
    (stop, join)
}
