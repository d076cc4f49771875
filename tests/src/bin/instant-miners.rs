//! Runs miners with the deterministic instant engine against a router, until Ctrl-C or SIGTERM.
//!
//! Used by `scripts/bench-router.sh` to load the router without any inference cost:
//!
//! ```text
//! instant-miners --router http://127.0.0.1:8080 --miners 2 --concurrency 64 --model veil-instant
//! ```
//!
//! Each miner has a fresh wallet and X25519 identity. On stop it prints, per miner, what it did.

use std::time::Duration;

use alloy_signer_local::PrivateKeySigner;
use anyhow::{Context, bail};

struct Args {
    router: String,
    miners: usize,
    concurrency: usize,
    models: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        router: String::new(),
        miners: 1,
        concurrency: 32,
        models: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--router" => args.router = value()?,
            "--miners" => args.miners = value()?.parse().context("--miners")?,
            "--concurrency" => args.concurrency = value()?.parse().context("--concurrency")?,
            "--model" => args.models.push(value()?),
            "-h" | "--help" => {
                println!(
                    "usage: instant-miners --router URL [--miners N] [--concurrency N] [--model NAME]..."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.router.is_empty() {
        bail!("--router is required");
    }
    if args.miners == 0 || args.concurrency == 0 {
        bail!("--miners and --concurrency must be at least 1");
    }
    if args.models.is_empty() {
        args.models.push("veil-instant".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = parse_args()?;
    let mut handles = Vec::new();
    for _ in 0..args.miners {
        let worker = veil_miner::Worker::builder()
            .router_url(args.router.clone())
            .wallet(PrivateKeySigner::random())
            .identity(veil_keys::X25519Secret::generate()?)
            .engine(veil_miner::InstantEngine::new(args.models.clone()))
            .concurrency(args.concurrency)
            .lease_wait(Duration::from_secs(5))
            .build()?;
        eprintln!("miner {} serving {:?}", worker.address(), args.models);
        handles.push(worker.spawn());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    for h in handles {
        let s = h.shutdown().await?;
        eprintln!(
            "miner stopped: leased {} completed {} duplicates {} failed {} released {} lost {} errored {}",
            s.leased, s.completed, s.duplicates, s.failed, s.released, s.lost, s.errored
        );
    }
    Ok(())
}
