//! Shared state of one router process, and the key service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;
use uuid::Uuid;
use veil_blobstore::BlobStore;
use veil_keys::{KeyId, Keyring, SecretKey, X25519Public};

use crate::config::Config;
use crate::error::ApiError;
use crate::limits::Limits;
use crate::store::Store;

/// Cheap-to-clone handle on everything a handler needs.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

/// The state itself.
#[derive(Debug)]
pub struct Inner {
    /// Resolved configuration.
    pub cfg: Config,
    /// Sessions, tasks, leases, keys, audit.
    pub store: Arc<dyn Store>,
    /// Sealed blobs.
    pub blobs: BlobStore,
    /// The key service.
    pub keys: KeyService,
    /// Per-API-key rate and concurrency limits.
    pub limits: Limits,
    /// In-process relay of sealed result frames to streaming callers.
    pub relay: Relay,
    /// Prometheus exposition.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The on-chain ACL, when configured.
    pub acl: Option<crate::acl::Acl>,
}

impl AppState {
    /// Wraps the parts.
    pub fn new(
        cfg: Config,
        store: Arc<dyn Store>,
        blobs: BlobStore,
        keyring: Keyring,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
        acl: Option<crate::acl::Acl>,
    ) -> Self {
        Self(Arc::new(Inner {
            cfg,
            store,
            blobs,
            keys: KeyService::new(keyring),
            limits: Limits::default(),
            relay: Relay::default(),
            metrics,
            acl,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The only holder of seeds. Derives `K_session`/`K_task` for one operation at a time and
/// hands keys out only wrapped (protocol §4); derived keys are zeroized when dropped.
pub struct KeyService {
    keyring: RwLock<Keyring>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyService(..)")
    }
}

fn key_error(e: veil_keys::Error) -> ApiError {
    match e {
        veil_keys::Error::UnknownVersion(_) => {
            ApiError::forbidden(e.code(), e.to_string()).param("key_version")
        }
        veil_keys::Error::Retired(_) | veil_keys::Error::Destroyed(_) => {
            ApiError::forbidden(e.code(), e.to_string()).param("key_version")
        }
        other => ApiError::internal("deriving a key", other),
    }
}

impl KeyService {
    /// Takes ownership of the keyring.
    pub fn new(keyring: Keyring) -> Self {
        Self {
            keyring: RwLock::new(keyring),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keyring> {
        self.keyring.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The version new encryptions use.
    pub fn active_version(&self) -> u32 {
        self.read().active()
    }

    /// `K_task` for one use inside the router (sealing a v2 prompt, opening a v2 result).
    pub fn task_key(
        &self,
        version: u32,
        session: &Uuid,
        task: &Uuid,
    ) -> Result<SecretKey, ApiError> {
        self.read()
            .task_key(version, session, task)
            .map_err(key_error)
    }

    /// `K_task` wrapped to `recipient`. The derived key is dropped (zeroized) before returning.
    pub fn wrap_task_key(
        &self,
        version: u32,
        session: &Uuid,
        task: &Uuid,
        recipient: &X25519Public,
    ) -> Result<[u8; 80], ApiError> {
        let key = self.task_key(version, session, task)?;
        veil_keys::wrap_key(recipient, &key, &KeyId::task(version, *session, *task))
            .map_err(|e| ApiError::forbidden(e.code(), e.to_string()).param("message.recipient"))
    }

    /// `K_session` wrapped to `recipient` (session owners only; checked by the caller).
    pub fn wrap_session_key(
        &self,
        version: u32,
        session: &Uuid,
        recipient: &X25519Public,
    ) -> Result<[u8; 80], ApiError> {
        let key = self
            .read()
            .session_key(version, session)
            .map_err(key_error)?;
        veil_keys::wrap_key(recipient, &key, &KeyId::session(version, *session))
            .map_err(|e| ApiError::forbidden(e.code(), e.to_string()).param("message.recipient"))
    }

    /// Public facts about the key versions.
    pub fn versions(&self) -> Vec<veil_keys::KeyVersionInfo> {
        self.read().versions()
    }
}

/// A message relayed from a miner's result upload to streaming callers on this replica.
#[derive(Debug, Clone)]
pub enum RelayMsg {
    /// A new upload attempt started (a re-leased task starts over).
    Start {
        /// The lease uploading.
        lease_id: Uuid,
    },
    /// Sealed bytes, in order.
    Bytes(bytes::Bytes),
    /// The upload finished and is stored.
    End,
    /// The upload failed; another attempt may follow.
    Abort,
}

/// Per-task broadcast channels of sealed result bytes. A caller subscribes before its task is
/// queued; the upload handler publishes if anyone listens. Callers on another replica, or that
/// fall behind, read the stored result once it is complete instead.
#[derive(Debug, Default)]
pub struct Relay {
    channels: Arc<Mutex<HashMap<Uuid, broadcast::Sender<RelayMsg>>>>,
}

/// Capacity of one task's relay channel, in messages.
const RELAY_CAPACITY: usize = 1024;

impl Relay {
    /// Subscribes to a task's result frames.
    pub fn subscribe(&self, task: Uuid) -> RelaySubscription {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let rx = map
            .entry(task)
            .or_insert_with(|| broadcast::channel(RELAY_CAPACITY).0)
            .subscribe();
        RelaySubscription {
            channels: self.channels.clone(),
            task,
            rx,
        }
    }

    /// The sender for a task, if someone listens.
    pub fn sender(&self, task: &Uuid) -> Option<broadcast::Sender<RelayMsg>> {
        let map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.get(task).cloned()
    }
}

/// A subscription; unsubscribes on drop.
#[derive(Debug)]
pub struct RelaySubscription {
    channels: Arc<Mutex<HashMap<Uuid, broadcast::Sender<RelayMsg>>>>,
    task: Uuid,
    /// The receiving end.
    pub rx: broadcast::Receiver<RelayMsg>,
}

impl Drop for RelaySubscription {
    fn drop(&mut self) {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(&self.task) {
            // This subscription still counts; remove the channel when it was the last one.
            if tx.receiver_count() <= 1 {
                map.remove(&self.task);
            }
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
