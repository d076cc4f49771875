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
    /// Per-caller rate and concurrency limits (rates in the store when replicas share it).
    pub limits: Limits,
    /// Miner sessions already read from the store.
    pub miner_sessions: crate::auth::MinerSessionCache,
    /// In-process relay of sealed result frames to streaming callers.
    pub relay: Relay,
    /// Wakes the requests waiting for a task's end, and only them.
    pub finished: Finished,
    /// Waiting lease polls, woken one per new task.
    pub lease_polls: crate::lease_polls::LeasePolls,
    /// Results stored through this replica, awaiting their `TaskResult`.
    pub stored_results: StoredResults,
    /// Prometheus exposition.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The on-chain ACL, when configured.
    pub acl: Option<crate::acl::Acl>,
    /// Wakes the retention sweeper early (a session closed, a result delivered).
    pub retention_wake: tokio::sync::Notify,
    /// This process's rewrap job (one at a time) and its progress.
    pub rewrap: crate::key_lifecycle::RewrapTracker,
}

impl AppState {
    /// Wraps the parts. `keys` is a [`KeyService`] that knows where its keyring comes from, or
    /// a bare [`Keyring`] (held in memory, read-only).
    pub fn new(
        cfg: Config,
        store: Arc<dyn Store>,
        blobs: BlobStore,
        keys: impl Into<KeyService>,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
        acl: Option<crate::acl::Acl>,
    ) -> Self {
        let finished = Finished::start(store.subscribe());
        let lease_polls = crate::lease_polls::LeasePolls::start(store.subscribe());
        let limits = Limits::for_store(&store);
        Self(Arc::new(Inner {
            cfg,
            store,
            blobs,
            keys: keys.into(),
            limits,
            miner_sessions: Default::default(),
            relay: Relay::default(),
            finished,
            lease_polls,
            stored_results: StoredResults::default(),
            metrics,
            acl,
            retention_wake: tokio::sync::Notify::new(),
            rewrap: Default::default(),
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
///
/// The keyring **file** is the source of truth: a change ([`KeyService::update`]) locks the
/// file against other processes, reloads it, applies the change, saves it atomically (0600) and
/// only then replaces the copy in memory; [`KeyService::reload_if_changed`] picks up changes
/// made by another process (the operator CLI, another replica, a secret manager).
pub struct KeyService {
    keyring: RwLock<Keyring>,
    source: KeyringSource,
    /// The file's stamp when it was last read or written.
    stamp: Mutex<Option<FileStamp>>,
    /// The stamp of a file that failed to load, so a broken file is reported once per change.
    failed: Mutex<Option<FileStamp>>,
    /// Serialises this process's changes and reloads.
    writer: tokio::sync::Mutex<()>,
    /// Keys derived for the router's own use (v2 sealing and opening, rewrap).
    derived_own_use: std::sync::atomic::AtomicU64,
    /// Keys derived only to be wrapped to a recipient.
    derived_for_wrap: std::sync::atomic::AtomicU64,
}

/// How many keys the key service has derived since it started, by use. `/api/v3` never derives
/// a key for the router's own use: only to wrap it to a signed request's recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyDerivations {
    /// For the router's own use: sealing a v2 prompt, opening a v2 result, rewrapping a blob.
    pub own_use: u64,
    /// To be wrapped to a recipient and dropped (protocol §4).
    pub for_wrap: u64,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Where the key service's keyring comes from, and whether it may be changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyringSource {
    /// The router's own keyring file (mode 0600, `keyring_path`): changed under its lock file,
    /// reloaded when another process changes it.
    File(std::path::PathBuf),
    /// A file mounted from a secret manager (`keyring_file`): read-only, reloaded when the
    /// secret changes.
    SecretFile(std::path::PathBuf),
    /// The `VEIL_KEYRING` environment variable: read-only, fixed for the life of the process.
    Env,
    /// Handed over in memory by an embedding program: read-only.
    Memory,
}

impl KeyringSource {
    /// `file`, `secret_file`, `env` or `memory`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::SecretFile(_) => "secret_file",
            Self::Env => "env",
            Self::Memory => "memory",
        }
    }

    /// The file, for file sources.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Self::File(p) | Self::SecretFile(p) => Some(p),
            Self::Env | Self::Memory => None,
        }
    }

    /// Whether changes (rotate, retire, destroy) are refused.
    pub fn is_read_only(&self) -> bool {
        !matches!(self, Self::File(_))
    }

    /// The answer to a change of a read-only keyring, saying what to do instead.
    fn read_only_error(&self) -> ApiError {
        let how = match self {
            Self::File(_) => "",
            Self::SecretFile(_) => {
                "the keyring is a read-only file from a secret manager (keyring_file): make the \
                 change to the secret there (e.g. with `veil-router keys` on a writable copy); \
                 running routers reload it within seconds"
            }
            Self::Env => {
                "the keyring comes from the VEIL_KEYRING environment variable and is read-only: \
                 update the secret it is set from and restart the router"
            }
            Self::Memory => "the keyring was handed to the router in memory and is read-only",
        };
        ApiError::conflict("keyring_read_only", how)
    }
}

/// What a file's metadata says about its contents: a save replaces the file (a new inode, new
/// times) and a secret volume swaps a symbolic link, so every change shows here without
/// reading the secret again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn file_stamp(path: &std::path::Path) -> std::io::Result<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// An error while changing the keyring file: either the change's own answer or the keyring's.
struct KeyringChange(ApiError);

impl From<veil_keys::Error> for KeyringChange {
    fn from(e: veil_keys::Error) -> Self {
        KeyringChange(match e {
            veil_keys::Error::UnknownVersion(_) => {
                ApiError::new(axum::http::StatusCode::NOT_FOUND, e.code(), e.to_string())
            }
            veil_keys::Error::KeyringState(m) => ApiError::conflict("keyring_state", m),
            // File access, permissions, a malformed file: the detail goes to the log.
            other => ApiError::internal("changing the keyring file", other),
        })
    }
}

impl From<Keyring> for KeyService {
    fn from(keyring: Keyring) -> Self {
        KeyService::new(keyring)
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
    /// Takes ownership of a keyring held in memory only (read-only).
    pub fn new(keyring: Keyring) -> Self {
        Self::with_source(keyring, KeyringSource::Memory)
    }

    /// Takes ownership of a keyring loaded from `source`. The first
    /// [`reload_if_changed`](Self::reload_if_changed) reads a file source again, so that a
    /// change made between loading and now is not missed.
    pub fn with_source(keyring: Keyring, source: KeyringSource) -> Self {
        Self {
            keyring: RwLock::new(keyring),
            source,
            stamp: Mutex::new(None),
            failed: Mutex::new(None),
            writer: tokio::sync::Mutex::new(()),
            derived_own_use: Default::default(),
            derived_for_wrap: Default::default(),
        }
    }

    /// Keys derived since start, by use.
    pub fn derivations(&self) -> KeyDerivations {
        use std::sync::atomic::Ordering::Relaxed;
        KeyDerivations {
            own_use: self.derived_own_use.load(Relaxed),
            for_wrap: self.derived_for_wrap.load(Relaxed),
        }
    }

    fn count(&self, own_use: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let (counter, label) = if own_use {
            (&self.derived_own_use, "own_use")
        } else {
            (&self.derived_for_wrap, "wrap")
        };
        counter.fetch_add(1, Relaxed);
        metrics::counter!("veil_keys_derived_total", "use" => label).increment(1);
    }

    /// Where the keyring comes from.
    pub fn source(&self) -> &KeyringSource {
        &self.source
    }

    /// `active`, `min_decrypt` and the public facts of every version, read together.
    pub fn snapshot(&self) -> (u32, u32, Vec<veil_keys::KeyVersionInfo>) {
        let ring = self.read();
        (ring.active(), ring.min_decrypt(), ring.versions())
    }

    /// Changes the keyring: locks the keyring file against other processes, loads it as it is
    /// now, applies `f` (which sees the current file, so it must check its preconditions
    /// itself), saves it atomically with mode 0600, and then replaces the keyring in memory.
    /// Refused with `keyring_read_only` (409) unless the keyring is the router's own file.
    pub async fn update<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Keyring) -> Result<T, ApiError> + Send + 'static,
    {
        let path = match &self.source {
            KeyringSource::File(p) => p.clone(),
            other => return Err(other.read_only_error()),
        };
        let _one_at_a_time = self.writer.lock().await;
        let (ring, value) = tokio::task::spawn_blocking(move || {
            Keyring::update_file(&path, |r| f(r).map_err(KeyringChange))
        })
        .await
        .map_err(|e| ApiError::internal("changing the keyring file", e))?
        .map_err(|KeyringChange(e)| e)?;
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) = ring;
        // Another process may have saved right after this one released the lock: the next
        // reload reads the file again rather than trust a stamp taken now.
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(value)
    }

    /// Reloads the keyring if its file changed since it was last read here (or was written
    /// here since). Returns whether the keyring's public state (versions, their states and
    /// times, `active`, `min_decrypt`) changed. A file that cannot be loaded (missing,
    /// malformed, readable by others) leaves the keyring in memory as it was and is an error,
    /// reported once per change of the file. Keyrings not from a file never change.
    pub async fn reload_if_changed(&self) -> Result<bool, veil_keys::Error> {
        let (path, secret) = match &self.source {
            KeyringSource::File(p) => (p.clone(), false),
            KeyringSource::SecretFile(p) => (p.clone(), true),
            KeyringSource::Env | KeyringSource::Memory => return Ok(false),
        };
        let _one_at_a_time = self.writer.lock().await;
        let io = |source| veil_keys::Error::KeyringIo {
            op: "reading",
            path: path.display().to_string(),
            source,
        };
        let now = file_stamp(&path).map_err(io)?;
        if *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) == Some(now)
            || *self.failed.lock().unwrap_or_else(|p| p.into_inner()) == Some(now)
        {
            return Ok(false);
        }
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            if secret {
                Keyring::load_secret_file(&p)
            } else {
                Keyring::load(&p)
            }
        })
        .await
        .map_err(|e| veil_keys::Error::KeyringState(format!("reloading the keyring: {e}")))?;
        match loaded {
            Ok(ring) => {
                let mut current = self.keyring.write().unwrap_or_else(|p| p.into_inner());
                let changed = (current.active(), current.min_decrypt(), current.versions())
                    != (ring.active(), ring.min_decrypt(), ring.versions());
                *current = ring;
                drop(current);
                *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(changed)
            }
            Err(e) => {
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
                Err(e)
            }
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
        let key = self
            .read()
            .task_key(version, session, task)
            .map_err(key_error)?;
        self.count(true);
        Ok(key)
    }

    /// `K_task` wrapped to `recipient`. The derived key is dropped (zeroized) before returning.
    pub fn wrap_task_key(
        &self,
        version: u32,
        session: &Uuid,
        task: &Uuid,
        recipient: &X25519Public,
    ) -> Result<[u8; 80], ApiError> {
        let key = self
            .read()
            .task_key(version, session, task)
            .map_err(key_error)?;
        self.count(false);
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
        self.count(false);
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

/// Routes the store's `TaskFinished` events (this replica's and, on PostgreSQL, the others')
/// to the requests waiting for those tasks. Every waiting request used to receive every event
/// and look at its task id: with many requests open, each task's end woke all of them.
#[derive(Debug)]
pub struct Finished {
    watched: Arc<Mutex<HashMap<Uuid, tokio::sync::watch::Sender<u64>>>>,
    router: Option<tokio::task::JoinHandle<()>>,
}

impl Finished {
    /// Starts routing `events` (on the current runtime; without one, waiters are left to poll).
    pub fn start(mut events: broadcast::Receiver<crate::store::StoreEvent>) -> Self {
        let watched: Arc<Mutex<HashMap<Uuid, tokio::sync::watch::Sender<u64>>>> = Arc::default();
        let map = Arc::clone(&watched);
        let router = tokio::runtime::Handle::try_current().ok().map(|rt| {
            rt.spawn(async move {
                use broadcast::error::RecvError;
                loop {
                    let ids: Option<Uuid> = match events.recv().await {
                        Ok(crate::store::StoreEvent::TaskFinished { task_id }) => Some(task_id),
                        Ok(_) => continue,
                        // Events were missed: every waiter looks again.
                        Err(RecvError::Lagged(_)) => None,
                        Err(RecvError::Closed) => return,
                    };
                    let map = map.lock().unwrap_or_else(|p| p.into_inner());
                    match ids {
                        Some(id) => {
                            if let Some(tx) = map.get(&id) {
                                tx.send_modify(|n| *n += 1);
                            }
                        }
                        None => map.values().for_each(|tx| tx.send_modify(|n| *n += 1)),
                    }
                }
            })
        });
        Self { watched, router }
    }

    /// Watches `task` for its end. Take it before looking at the task, so that an end after
    /// the look is not missed.
    pub fn watch(&self, task: Uuid) -> FinishWatch {
        let mut map = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let rx = map
            .entry(task)
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe();
        FinishWatch {
            watched: Arc::clone(&self.watched),
            task,
            rx,
        }
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(t) = &self.router {
            t.abort();
        }
    }
}

/// One request's watch on a task's end; stops watching when dropped.
#[derive(Debug)]
pub struct FinishWatch {
    watched: Arc<Mutex<HashMap<Uuid, tokio::sync::watch::Sender<u64>>>>,
    task: Uuid,
    rx: tokio::sync::watch::Receiver<u64>,
}

impl FinishWatch {
    /// Resolves at the next sign that the task may have ended: its `TaskFinished` event, or
    /// events the router missed. (Never, should the router be gone: callers poll as well.)
    pub async fn ended(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for FinishWatch {
    fn drop(&mut self) {
        let mut map = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(&self.task) {
            // This watch still counts; remove the channel when it was the last one.
            if tx.receiver_count() <= 1 {
                map.remove(&self.task);
            }
        }
    }
}

/// A result blob this replica stored for a lease: what the complete handler would otherwise
/// read back from the blob store to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResult {
    pub urn: String,
    pub sha256: [u8; 32],
    pub size: u64,
}

/// Results stored through this replica, by lease, until their `TaskResult` arrives. The upload
/// computed the hash of every byte it stored and checked the envelope header against the
/// lease's task, so a `TaskResult` that names the same URN and hash needs no read-back. A
/// `TaskResult` sent to another replica, or after this one forgot (restart, overflow), is
/// checked against the blob store as before.
#[derive(Debug, Default)]
pub struct StoredResults {
    map: std::sync::Mutex<std::collections::HashMap<Uuid, StoredResult>>,
}

/// Leases remembered at most; a full table is emptied (its leases fall back to the read-back).
const STORED_RESULTS: usize = 4096;

impl StoredResults {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, StoredResult>> {
        // The map holds no invariant a panic could break.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the result stored for `lease_id` (a later upload on the same lease replaces it).
    pub fn insert(&self, lease_id: Uuid, r: StoredResult) {
        let mut map = self.lock();
        if map.len() >= STORED_RESULTS && !map.contains_key(&lease_id) {
            map.clear();
        }
        map.insert(lease_id, r);
    }

    /// The result stored for `lease_id`, forgotten as it is answered.
    pub fn take(&self, lease_id: &Uuid) -> Option<StoredResult> {
        self.lock().remove(lease_id)
    }
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

/// Capacity of a relay channel opened to keep a copy of a result (not streamed), in messages:
/// a copy that falls behind is given up and the result read from the store instead.
const CAPTURE_CAPACITY: usize = 64;

impl Relay {
    /// Subscribes to a task's result frames.
    pub fn subscribe(&self, task: Uuid) -> RelaySubscription {
        self.subscribe_with(task, RELAY_CAPACITY)
    }

    /// Subscribes to keep a copy of a task's sealed result as it is uploaded (see
    /// [`Captured`]).
    pub fn capture(&self, task: Uuid) -> RelaySubscription {
        self.subscribe_with(task, CAPTURE_CAPACITY)
    }

    fn subscribe_with(&self, task: Uuid, capacity: usize) -> RelaySubscription {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let rx = map
            .entry(task)
            .or_insert_with(|| broadcast::channel(capacity).0)
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

/// A copy of a task's sealed result, assembled from relay messages: the bytes of the last
/// upload attempt if it ended, nothing if a message was missed or the copy outgrew `limit`.
/// Whoever uses it still checks it against the task's result hash.
#[derive(Debug)]
pub struct Captured {
    bytes: Vec<u8>,
    ended: bool,
    broken: bool,
    limit: usize,
}

impl Captured {
    pub fn new(limit: usize) -> Self {
        Self {
            bytes: Vec::new(),
            ended: false,
            broken: false,
            limit,
        }
    }

    /// Takes in one relay message (or a receive error: something was missed).
    pub fn push(&mut self, msg: Result<RelayMsg, broadcast::error::RecvError>) {
        match msg {
            Ok(RelayMsg::Start { .. }) | Ok(RelayMsg::Abort) => {
                self.bytes.clear();
                self.ended = false;
            }
            Ok(RelayMsg::Bytes(b)) => {
                if self.bytes.len() + b.len() > self.limit {
                    self.broken = true;
                    self.bytes = Vec::new();
                } else if !self.broken {
                    self.bytes.extend_from_slice(&b);
                }
            }
            Ok(RelayMsg::End) => self.ended = true,
            Err(broadcast::error::RecvError::Lagged(_)) => self.broken = true,
            Err(broadcast::error::RecvError::Closed) => {}
        }
    }

    /// The whole blob of an upload that ended, if nothing was missed.
    pub fn into_blob(self) -> Option<Vec<u8>> {
        (self.ended && !self.broken).then_some(self.bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &'static [u8]) -> Result<RelayMsg, broadcast::error::RecvError> {
        Ok(RelayMsg::Bytes(bytes::Bytes::from_static(b)))
    }

    fn start() -> Result<RelayMsg, broadcast::error::RecvError> {
        Ok(RelayMsg::Start {
            lease_id: Uuid::now_v7(),
        })
    }

    #[test]
    fn a_captured_result_is_the_last_upload_that_ended() {
        let mut c = Captured::new(100);
        for m in [start(), bytes(b"first"), Ok(RelayMsg::Abort), start()] {
            c.push(m);
        }
        for m in [bytes(b"sec"), bytes(b"ond"), Ok(RelayMsg::End)] {
            c.push(m);
        }
        assert_eq!(c.into_blob().as_deref(), Some(&b"second"[..]));

        let mut c = Captured::new(100);
        c.push(start());
        c.push(bytes(b"unfinished"));
        assert_eq!(c.into_blob(), None, "no End: not a whole blob");
    }

    #[test]
    fn a_capture_that_missed_something_or_outgrew_its_limit_is_given_up() {
        let mut c = Captured::new(100);
        for m in [
            start(),
            bytes(b"a"),
            Err(broadcast::error::RecvError::Lagged(3)),
            bytes(b"b"),
            Ok(RelayMsg::End),
        ] {
            c.push(m);
        }
        assert_eq!(c.into_blob(), None);

        let mut c = Captured::new(4);
        for m in [start(), bytes(b"abc"), bytes(b"de"), Ok(RelayMsg::End)] {
            c.push(m);
        }
        assert_eq!(c.into_blob(), None);
    }

    #[tokio::test]
    async fn a_task_end_wakes_only_the_requests_watching_that_task() {
        use crate::store::StoreEvent;
        use std::time::Duration;
        let (tx, _) = broadcast::channel(4);
        let f = Finished::start(tx.subscribe());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (mut wa, mut wb) = (f.watch(a), f.watch(b));
        let mut wa2 = f.watch(a);
        tx.send(StoreEvent::TaskFinished { task_id: a }).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), wa.ended()).await;
        assert!(got.is_ok(), "a's watch wakes");
        assert!(
            tokio::time::timeout(Duration::from_secs(5), wa2.ended())
                .await
                .is_ok()
        );
        let other = tokio::time::timeout(Duration::from_millis(100), wb.ended()).await;
        assert!(other.is_err(), "b's watch stays asleep");

        // Missed events wake every watch.
        for _ in 0..8 {
            tx.send(StoreEvent::TaskAvailable { model: "m".into() })
                .unwrap();
        }
        tx.send(StoreEvent::TaskFinished {
            task_id: Uuid::now_v7(),
        })
        .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), wb.ended())
                .await
                .is_ok()
        );

        // Watches leave nothing behind.
        drop((wa, wa2, wb));
        assert!(f.watched.lock().unwrap().is_empty());
    }
}
