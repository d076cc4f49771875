//! Starting the router: data directory, keyring, database, blob store, first-start admin key,
//! background reaper, and serving (plain or TLS) with graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::serve::ListenerExt;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use veil_blobstore::BlobStore;
use veil_keys::Keyring;

use crate::acl::Acl;
use crate::api::admin::{CreateKeyRequest, create_api_key};
use crate::config::Config;
use crate::state::{AppState, KeyService, KeyringSource, now_ms};
use crate::store::{self, NewAuditEntry, Store};

/// Why the router could not start. Names the setting or resource at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Data directory.
    #[error("data_dir {path}: {message}")]
    DataDir {
        /// The directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// Keyring.
    #[error("keyring: {0}")]
    Keyring(String),
    /// Database.
    #[error("database_url: {0}")]
    Database(String),
    /// Blob store.
    #[error("blob_store: {0}")]
    BlobStore(String),
    /// Listening or TLS.
    #[error("listen: {0}")]
    Listen(String),
    /// The on-chain ACL (RPC endpoint, checkpoint file).
    #[error("acl_rpc_url: {0}")]
    Acl(String),
}

/// The process-wide Prometheus recorder (installed once; several routers in one test process
/// share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ])
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed by an embedding program; then ours
            // still renders, only without the other program's metrics.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

fn ensure_private_dir(path: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| StartError::DataDir {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
    }
    let meta = std::fs::metadata(path).map_err(|e| StartError::DataDir {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    if !meta.is_dir() {
        return Err(StartError::DataDir {
            path: path.display().to_string(),
            message: "not a directory".into(),
        });
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "data directory is accessible by group or others; consider chmod 700");
    }
    Ok(())
}

/// Loads the keyring and notes where it came from: `VEIL_KEYRING` (document or bare hex seed)
/// when set, read-only; else the secret file `keyring_file`, read-only and reloaded on change
/// (refused when others may read it); else the keyring file `keyring_path`, created with mode
/// 0600 on first start (refused when group or others may access it). Returns whether the file
/// was created.
pub fn load_keyring(cfg: &Config) -> Result<(KeyService, bool), StartError> {
    open_keyring(cfg, true)
}

/// As [`load_keyring`]; with `create` false a missing keyring file is an error instead of a new
/// keyring (the operator commands must never start a new keyring by mistake).
pub fn open_keyring(cfg: &Config, create: bool) -> Result<(KeyService, bool), StartError> {
    let env = Keyring::from_env("VEIL_KEYRING").map_err(|e| StartError::Keyring(e.to_string()))?;
    match (env, &cfg.keyring_file) {
        (Some(_), Some(_)) => Err(StartError::Keyring(
            "VEIL_KEYRING and keyring_file (VEIL_KEYRING_FILE, --keyring-secret-file) are both \
             set; use one"
                .into(),
        )),
        (Some(k), None) => Ok((KeyService::with_source(k, KeyringSource::Env), false)),
        (None, Some(path)) => {
            let k = Keyring::load_secret_file(path).map_err(|e| {
                StartError::Keyring(format!("keyring_file {}: {e}", path.display()))
            })?;
            let source = KeyringSource::SecretFile(path.clone());
            Ok((KeyService::with_source(k, source), false))
        }
        (None, None) => {
            let path = &cfg.keyring_path;
            let loaded = if create {
                Keyring::load_or_create(path)
            } else {
                Keyring::load(path).map(|k| (k, false))
            };
            let (k, created) =
                loaded.map_err(|e| StartError::Keyring(format!("{}: {e}", path.display())))?;
            let source = KeyringSource::File(path.clone());
            Ok((KeyService::with_source(k, source), created))
        }
    }
}

/// A started router's state, and the admin API key secret when this start created it.
#[derive(Debug)]
pub struct Started {
    /// The state.
    pub state: AppState,
    /// The admin key's secret, shown once on first start.
    pub admin_secret: Option<String>,
}

/// Prepares everything the router needs (no listening yet).
pub async fn prepare(cfg: Config) -> Result<Started, StartError> {
    prepare_with(cfg, None).await
}

/// As [`prepare`], with a blob store built by the caller (for credentials that do not fit in
/// a URL, or an object store of its own); `cfg.blob_store` is then only descriptive.
pub async fn prepare_with(cfg: Config, blobs: Option<BlobStore>) -> Result<Started, StartError> {
    let embedded_db = cfg.database_url.starts_with("sqlite:");
    let local_blobs = blobs.is_none()
        && (!cfg.blob_store.contains("://") || cfg.blob_store.starts_with("file://"));
    let acl_in_data_dir = cfg
        .acl
        .as_ref()
        .is_some_and(|a| a.checkpoint_path.starts_with(&cfg.data_dir));
    if embedded_db || local_blobs || acl_in_data_dir || cfg.keyring_path.starts_with(&cfg.data_dir)
    {
        ensure_private_dir(&cfg.data_dir)?;
    }
    let (keyring, created) = load_keyring(&cfg)?;
    if created {
        tracing::info!(path = %cfg.keyring_path.display(), "created a new keyring (mode 0600)");
    }
    let store: Arc<dyn Store> = store::open(&cfg.database_url)
        .await
        .map_err(|e| StartError::Database(e.to_string()))?;
    if local_blobs {
        let dir = cfg
            .blob_store
            .strip_prefix("file://")
            .unwrap_or(&cfg.blob_store);
        ensure_private_dir(std::path::Path::new(dir))?;
    }
    let blobs = match blobs {
        Some(b) => b,
        None => BlobStore::from_url(&cfg.blob_store)
            .map_err(|e| StartError::BlobStore(e.to_string()))?,
    };
    let acl = match &cfg.acl {
        Some(acl_cfg) => Some(Acl::open(acl_cfg.clone()).await.map_err(|e| {
            // Transport errors may quote the URL, whose path or query often holds an API key.
            let message = acl_cfg.redact(&e.to_string());
            StartError::Acl(format!("{}: {message}", acl_cfg.redacted_url()))
        })?),
        None => None,
    };
    let state = AppState::new(cfg, store, blobs, keyring, metrics_handle(), acl);
    let mut admin_secret = None;
    let n = state
        .store
        .count_api_keys()
        .await
        .map_err(|e| StartError::Database(e.to_string()))?;
    if n == 0 {
        let created = create_api_key(
            &state,
            "router",
            &CreateKeyRequest {
                owner: "admin".into(),
                admin: true,
                rate_per_minute: 0,
                max_concurrent: 0,
            },
        )
        .await
        .map_err(|e| StartError::Database(e.message))?;
        admin_secret = Some(created.secret);
    }
    let _ = state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: "router".into(),
            action: "router.start".into(),
            key_version: Some(state.keys.active_version()),
            detail: serde_json::json!({"version": env!("CARGO_PKG_VERSION")}),
            ..Default::default()
        })
        .await;
    Ok(Started {
        state,
        admin_secret,
    })
}

/// Background work: returns expired leases to the queue (or dead-letters them), fails tasks
/// past their deadline, prunes used nonces, deletes blobs by retention policy and blobs no
/// task names (the orphan sweep), and (when configured) follows the on-chain ACL and mirrors
/// it into the store. Runs until the returned handle is aborted.
pub fn spawn_background(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::join!(
            crate::acl::follow(state.clone()),
            crate::retention::sweeper(state.clone()),
            crate::orphans::sweeper(state.clone()),
            crate::key_lifecycle::watch_keyring(state.clone()),
            reaper(state)
        );
    })
}

async fn reaper(state: AppState) {
    let mut tick = tokio::time::interval(store::DEFAULT_REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        match state.store.reap(now_ms()).await {
            Ok(r) => {
                if !r.requeued.is_empty() {
                    metrics::counter!("veil_leases_expired_total")
                        .increment(r.requeued.len() as u64);
                }
                if !r.dead.is_empty() {
                    metrics::counter!("veil_tasks_dead_total").increment(r.dead.len() as u64);
                }
                for (action, ids) in [
                    ("lease.expire", &r.requeued),
                    ("task.dead", &r.dead),
                    ("task.deadline", &r.deadline_failed),
                ] {
                    for id in ids {
                        let _ = state
                            .store
                            .audit(&NewAuditEntry {
                                at_ms: now_ms(),
                                actor: "router".into(),
                                action: action.into(),
                                task_id: Some(*id),
                                detail: serde_json::json!({}),
                                ..Default::default()
                            })
                            .await;
                        tracing::info!(task_id = %id, action, "reaper");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reaper pass failed"),
        }
        if n.is_multiple_of(120) {
            if let Err(e) = state.store.prune_nonces(now_ms()).await {
                tracing::warn!(error = %e, "nonce pruning failed");
            }
            if let Err(e) = state.store.prune_read_tokens(now_ms()).await {
                tracing::warn!(error = %e, "read token pruning failed");
            }
            if let Err(e) = state.store.prune_rates(now_ms() * 1000).await {
                tracing::warn!(error = %e, "rate pruning failed");
            }
        }
    }
}

/// Serves `state` on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// within the configured grace period.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let grace = Duration::from_millis(state.cfg.shutdown_grace_ms);
    let tls = state.cfg.tls.clone();
    let background = spawn_background(state.clone());
    let app = crate::api::app(state);
    let result = match tls {
        None => {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            // Small writes (SSE events, streamed chunks) go out at once, not after the peer's
            // delayed ACK.
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
            });
            let server = axum::serve(listener, app).with_graceful_shutdown(async move {
                shutdown.await;
                let _ = tx.send(());
            });
            let server = std::pin::pin!(server.into_future());
            // Bound the drain: after the signal, in-flight requests get `grace` to finish.
            tokio::select! {
                r = server => r.map_err(|e| StartError::Listen(e.to_string())),
                _ = async { let _ = rx.await; tokio::time::sleep(grace).await; } => {
                    tracing::warn!("shutdown grace period over; dropping remaining connections");
                    Ok(())
                }
            }
        }
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
                .await
                .map_err(|e| {
                    StartError::Listen(format!("TLS {} / {}: {e}", cert.display(), key.display()))
                })?;
            let handle = axum_server::Handle::new();
            let h2 = handle.clone();
            tokio::spawn(async move {
                shutdown.await;
                h2.graceful_shutdown(Some(grace));
            });
            let std_listener = listener
                .into_std()
                .map_err(|e| StartError::Listen(e.to_string()))?;
            axum_server::from_tcp_rustls(std_listener, config)
                .map_err(|e| StartError::Listen(e.to_string()))?
                .map(|tls| tls.acceptor(axum_server::accept::NoDelayAcceptor::new()))
                .handle(handle)
                .serve(app.into_make_service())
                .await
                .map_err(|e| StartError::Listen(e.to_string()))
        }
    };
    background.abort();
    result
}

/// Binds the configured address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Listen(format!("{addr}: {e}")))
}
