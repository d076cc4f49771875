//! `veil-router`: parses the configuration and runs the router (see the crate docs).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use veil_router::config::{Cli, Command, Config, LogFormat};
use veil_router::server;

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn shutdown_signal() {
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
    tracing::info!("shutting down: draining in-flight requests");
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::resolve(&cli)?;
    init_logs(cfg.log_format);
    match cli.command.clone().unwrap_or(Command::Serve) {
        Command::Openapi => {
            println!("{}", veil_router::openapi().to_pretty_json()?);
            Ok(())
        }
        Command::Keys { command } => {
            veil_router::key_lifecycle::run_cli(cfg, command).await?;
            Ok(())
        }
        Command::PrintConfig => {
            println!("{cfg:#?}");
            Ok(())
        }
        Command::AuditVerify => {
            let store = veil_router::store::open(&cfg.database_url).await?;
            match veil_router::store::verify_audit_chain(store.as_ref()).await {
                Ok(n) => {
                    println!("audit chain ok: {n} entries");
                    Ok(())
                }
                Err(e) => anyhow::bail!("{e}"),
            }
        }
        Command::CreateApiKey {
            owner,
            admin,
            rate_per_minute,
            max_concurrent,
        } => {
            let started = server::prepare(cfg).await?;
            if let Some(s) = started.admin_secret {
                println!("admin API key (shown once): {s}");
            }
            let created = veil_router::api::admin::create_api_key(
                &started.state,
                "operator",
                &veil_router::api::admin::CreateKeyRequest {
                    owner,
                    admin,
                    rate_per_minute,
                    max_concurrent,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", created.secret);
            Ok(())
        }
        Command::Serve => {
            let listener = server::bind(cfg.listen).await?;
            let started = server::prepare(cfg).await?;
            let addr = listener.local_addr()?;
            if let Some(secret) = &started.admin_secret {
                // Printed once on stdout (never logged); only its hash is stored.
                println!("First start: admin API key (shown once, store it now): {secret}");
            }
            let scheme = if started.state.cfg.tls.is_some() {
                "https"
            } else {
                "http"
            };
            tracing::info!(%addr, "veil-router listening on {scheme}://{addr}");
            server::serve(started.state, listener, shutdown_signal()).await?;
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil-router: error: {e}");
            ExitCode::FAILURE
        }
    }
}
