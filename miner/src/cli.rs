//! The `veil-miner` command: loads the wallet and the identity, hashes the models, and runs a
//! [`Worker`] until SIGINT or SIGTERM. [`run`] is the whole command without the process around it
//! (logs, signals, exit status), so that tests can run it in-process.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use alloy_signer::Signer;
use alloy_signer_local::PrivateKeySigner;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use veil_api::miner::ServedModel;
use veil_keys::X25519Secret;
use zeroize::Zeroizing;

use crate::config::{
    Cli, Command, Config, EngineKind, KEYSTORE_PASSWORD_ENV, LogFormat, ModelSpec, Settings,
    WalletSource, err,
};
use crate::engine::Engine;
use crate::model::model_sha256;
use crate::{Error, InstantEngine, Result, RunSummary, Worker, identity};

/// Exit status of a configuration error (a bad setting, wallet or identity file).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status of any other fatal error (login refused, wrong chain, unreadable model, …).
pub const EXIT_FATAL: u8 = 1;

/// The process: logs, signals, the one-line summary and the exit status around [`run`].
pub async fn main(cli: Cli) -> ExitCode {
    let format = match Settings::resolve(&cli) {
        Ok(s) => s.log_format.unwrap_or_default(),
        Err(e) => return fail(&Error::Settings(e)),
    };
    init_logs(format);
    match run(cli, |name| std::env::var(name).ok(), shutdown_signal()).await {
        Ok(Some(summary)) => {
            println!("{}", summary_line(&summary));
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &Error) -> ExitCode {
    eprintln!("veil-miner: error: {e}");
    ExitCode::from(match e {
        Error::Settings(_) => EXIT_CONFIG,
        _ => EXIT_FATAL,
    })
}

/// `veil-miner stopped: leased N, completed N, …`.
pub fn summary_line(s: &RunSummary) -> String {
    format!(
        "veil-miner stopped: leased {}, completed {}, duplicates {}, failed {}, released {}, lost {}, errored {}",
        s.leased, s.completed, s.duplicates, s.failed, s.released, s.lost, s.errored
    )
}

/// Logs on stderr, filtered by `VEIL_LOG` (default `info`).
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Runs the command. `env` reads an environment variable (the keystore password, the dev key);
/// `shutdown` stops a running miner gracefully. Returns the summary of a miner that ran, `None`
/// for the other subcommands (which print their answer on stdout).
pub async fn run<E, F>(cli: Cli, env: E, shutdown: F) -> Result<Option<RunSummary>>
where
    E: Fn(&str) -> Option<String>,
    F: Future<Output = ()>,
{
    match cli.command.clone().unwrap_or(Command::Serve) {
        Command::HashModel { path } => {
            let label = path.display().to_string();
            let hash = hash_blocking(label, path).await?;
            println!("{hash}");
            Ok(None)
        }
        Command::TinyModel {
            out,
            preset,
            seed,
            format,
        } => {
            let started = Instant::now();
            let dir = out.clone();
            let g = tokio::task::spawn_blocking(move || {
                crate::tiny::generate_as(&dir, preset, seed, format)
            })
            .await
            .map_err(|e| Error::Crashed(e.to_string()))??;
            println!(
                "wrote a random-weight model to {} ({} parameters, {:.1} MiB of weights, {} ms)",
                out.display(),
                g.parameters,
                g.weight_bytes as f64 / f64::from(1u32 << 20),
                started.elapsed().as_millis()
            );
            Ok(None)
        }
        Command::ShowIdentity => {
            let path = Settings::resolve(&cli)?.identity_file();
            let (identity, _) = identity::load_or_create(&path)?;
            println!("{}", identity.public());
            Ok(None)
        }
        Command::PrintConfig => {
            println!("{:#?}", Config::resolve(&cli)?);
            Ok(None)
        }
        Command::Serve => serve(Config::resolve(&cli)?, env, shutdown).await.map(Some),
    }
}

async fn serve<E, F>(cfg: Config, env: E, shutdown: F) -> Result<RunSummary>
where
    E: Fn(&str) -> Option<String>,
    F: Future<Output = ()>,
{
    let wallet: Arc<dyn Signer + Send + Sync> = Arc::new(load_wallet(&cfg.wallet, &env)?);
    drop(env);
    let (identity, created) = identity::load_or_create(&cfg.identity_file)?;
    info!(
        path = %cfg.identity_file.display(),
        recipient = %identity.public(),
        created,
        "X25519 identity"
    );
    let models = hash_models(&cfg.models).await?;
    let engine: Arc<dyn Engine> =
        match cfg.engine {
            EngineKind::Instant => Arc::new(InstantEngine::serving(models)),
            #[cfg(feature = "mistralrs")]
            EngineKind::Mistralrs => {
                let specs = cfg.models.iter().zip(models).map(|(spec, served)| {
                    crate::mistral::MistralModel {
                        served,
                        path: spec.path.clone().unwrap_or_default(),
                    }
                });
                let opts = crate::mistral::MistralOptions {
                    device: cfg.device,
                    max_seqs: cfg.concurrency,
                    cache_dir: cfg.data_dir.join("cache"),
                };
                Arc::new(crate::mistral::MistralEngine::load(specs.collect(), &opts).await?)
            }
            #[cfg(not(feature = "mistralrs"))]
            EngineKind::Mistralrs => {
                return Err(Error::Config(
                    "this build has no mistral.rs (built without the `mistralrs` feature)".into(),
                ));
            }
        };
    info!(
        miner = %wallet.address(),
        engine = %cfg.engine,
        device = ?cfg.device,
        routers = ?cfg.router_urls,
        models = ?engine.models().iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        concurrency = cfg.concurrency,
        "veil-miner starting"
    );

    let stop = CancellationToken::new();
    let work = async {
        let last = cfg.router_urls.len() - 1;
        for (i, url) in cfg.router_urls.iter().enumerate() {
            let mut builder = Worker::builder()
                .router_url(url.clone())
                .wallet_arc(wallet.clone())
                .identity(X25519Secret::from_bytes(*identity.to_bytes()))
                .engine_arc(engine.clone())
                .concurrency(cfg.concurrency)
                .lease_pollers(cfg.lease_pollers)
                .lease_wait(cfg.lease_wait)
                .grace_period(cfg.shutdown_grace);
            if let Some(chain) = cfg.chain_id {
                builder = builder.expected_chain_id(chain);
            }
            info!(router = %url, "connecting");
            match builder.build()?.run(stop.clone().cancelled_owned()).await {
                Err(e) if e.is_transient() && i < last && !stop.is_cancelled() => {
                    warn!(router = %url, code = e.code(), error = %e, "router unreachable; trying the next one");
                }
                other => return other,
            }
        }
        Err(Error::Config("no router URL".into()))
    };
    tokio::pin!(work);
    tokio::pin!(shutdown);
    tokio::select! {
        r = &mut work => r,
        _ = &mut shutdown => {
            info!(grace_ms = cfg.shutdown_grace.as_millis() as u64, "stopping: no more leases; finishing in-flight tasks");
            stop.cancel();
            work.await
        }
    }
}

/// The wallet: an encrypted keystore, or a raw key from the environment (dev chains only; the
/// configuration already holds the miner to one).
fn load_wallet(
    source: &WalletSource,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PrivateKeySigner> {
    match source {
        WalletSource::Keystore(path) => {
            if !path.is_file() {
                return Err(err("keystore", format!("{}: no such file", path.display())).into());
            }
            let password = match env(KEYSTORE_PASSWORD_ENV) {
                Some(p) => Zeroizing::new(p),
                // Prompt only when a person is there to answer; the prompt and the answer go
                // through the terminal, not stdout or stderr.
                None if std::io::stdin().is_terminal() => Zeroizing::new(
                    rpassword::prompt_password(format!("Password for {}: ", path.display()))
                        .map_err(|e| err("keystore", format!("cannot read the password: {e}")))?,
                ),
                None => {
                    return Err(err(
                        "keystore",
                        format!("no password: set {KEYSTORE_PASSWORD_ENV} or run on a terminal"),
                    )
                    .into());
                }
            };
            PrivateKeySigner::decrypt_keystore(path, password.as_bytes()).map_err(|_| {
                err(
                    "keystore",
                    format!(
                        "{}: cannot decrypt: wrong password, or not an encrypted JSON keystore",
                        path.display()
                    ),
                )
                .into()
            })
        }
        WalletSource::DevKeyEnv(name) => {
            let value = Zeroizing::new(env(name).ok_or_else(|| {
                err(
                    "dev_key_env",
                    format!("environment variable {name} is not set"),
                )
            })?);
            let text = value.trim();
            let text = text.strip_prefix("0x").unwrap_or(text);
            let mut bytes = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(text, &mut bytes[..]).map_err(|_| {
                err(
                    "dev_key_env",
                    format!("{name}: expected 64 hex characters (a secp256k1 private key)"),
                )
            })?;
            PrivateKeySigner::from_bytes(&B256::from(*bytes)).map_err(|_| {
                err(
                    "dev_key_env",
                    format!("{name}: not a valid secp256k1 private key"),
                )
                .into()
            })
        }
    }
}

/// Hashes every served model that has files (a bare name, instant engine only, has none).
async fn hash_models(specs: &[ModelSpec]) -> Result<Vec<ServedModel>> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let sha256 = match &spec.path {
            None => None,
            Some(path) => {
                let started = Instant::now();
                let hash = hash_blocking(spec.name.clone(), path.clone())
                    .await
                    .map_err(|e| err("models", format!("{}: {e}", spec.name)))?;
                info!(
                    model = %spec.name,
                    path = %path.display(),
                    sha256 = %hash,
                    ms = started.elapsed().as_millis() as u64,
                    "model hashed"
                );
                Some(hash)
            }
        };
        out.push(ServedModel {
            name: spec.name.clone(),
            sha256,
        });
    }
    Ok(out)
}

/// [`model_sha256`] on a blocking thread, with progress on stderr when it is a terminal.
async fn hash_blocking(label: String, path: std::path::PathBuf) -> Result<veil_api::wire::Hex32> {
    tokio::task::spawn_blocking(move || {
        let mut progress = TermProgress::new(label);
        let r = model_sha256(&path, &mut |d, t| progress.update(d, t));
        progress.finish();
        r
    })
    .await
    .map_err(|e| Error::Crashed(e.to_string()))?
}

/// One self-rewriting line on stderr (when it is a terminal): `hashing NAME: 512/4096 MiB (12%)`.
/// A dependency would bring little over these few lines.
struct TermProgress {
    label: String,
    enabled: bool,
    last: Option<Instant>,
}

impl TermProgress {
    fn new(label: String) -> Self {
        Self {
            label,
            enabled: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.enabled
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100) && done < total)
        {
            return;
        }
        self.last = Some(Instant::now());
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[2Khashing {}: {:.1}/{:.1} MiB ({pct}%)",
            self.label,
            mib(done),
            mib(total)
        );
        let _ = e.flush();
    }

    fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}
