//! The router's state behind one trait, [`Store`], with an SQLite implementation (the embedded
//! default) and a PostgreSQL one (for several replicas). Both pass the same conformance suite
//! (`tests/store_conformance.rs`).
//!
//! Nothing stored here is secret or plaintext: sessions, privacy settings, task *references*
//! (URNs, hashes, key versions), leases, hashed API keys and miner tokens, used nonces and the
//! hash-chained audit log.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use uuid::Uuid;

mod conns;
mod group;
mod lifecycle;
mod lite;
mod model;
mod postgres;
mod sql;
mod sqlite;

pub use lifecycle::{
    KeyVersionUsage, MovedBlob, NewRewrap, RewrapJournal, RewrapState, RewrapSwitch, SealedBy,
};
pub use model::*;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The thing asked for does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked up, e.g. `session`, `task`, `lease`.
        what: &'static str,
    },
    /// The operation conflicts with the current state (e.g. closed session, lease not held).
    #[error("{code}: {message}")]
    Conflict {
        /// Stable machine code, e.g. `session_closed`, `lease_not_held`, `lease_expired`.
        code: &'static str,
        /// Explanation (metadata only).
        message: String,
    },
    /// A row with this identity already exists.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What, e.g. `session`, `task`, `nonce`.
        what: &'static str,
    },
    /// The database failed or is unreachable.
    #[error("database: {0}")]
    Database(String),
    /// The audit chain does not verify.
    #[error("audit chain broken at seq {seq}: {reason}")]
    AuditChain {
        /// First entry that fails.
        seq: i64,
        /// What failed.
        reason: String,
    },
}

/// `Result` with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Events a store publishes so that waiting requests and long-polling miners wake up at once,
/// on this replica and on the others (PostgreSQL `LISTEN/NOTIFY`; in-process for SQLite).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A task became available for leasing (new, released or re-queued) for this model.
    TaskAvailable {
        /// Its model.
        model: String,
    },
    /// A task reached a final state or got a result.
    TaskFinished {
        /// The task.
        task_id: Uuid,
    },
}

/// Everything the router keeps. Implementations must be safe for several router replicas on
/// one database: every state change is one transaction, leases are exclusive, result
/// submission is idempotent, and the audit chain stays linear.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Creates or migrates the schema. Idempotent; safe to run from several replicas at once.
    async fn migrate(&self) -> Result<()>;
    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<()>;
    /// Subscribes to [`StoreEvent`]s.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;

    // --- sessions -----------------------------------------------------------------------
    /// Inserts a new session with its privacy settings. `AlreadyExists` if the id is taken.
    async fn create_session(&self, s: &NewSession) -> Result<Session>;
    /// One session.
    async fn get_session(&self, id: Uuid) -> Result<Session>;
    /// Sessions of an owner, newest first, at most `limit`, before `before` (pagination).
    async fn list_sessions(
        &self,
        owner: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<Session>>;
    /// Replaces the privacy settings. `Conflict(session_closed)` once closed.
    async fn set_privacy(&self, id: Uuid, p: &PrivacySetting) -> Result<Session>;
    /// Closes a session and cancels its queued and leased tasks (reason `session_closed`).
    /// Returns the number of tasks cancelled. Closing a closed session is a no-op returning 0.
    async fn close_session(&self, id: Uuid, now_ms: i64) -> Result<u64>;

    // --- API keys -------------------------------------------------------------------------
    /// Stores a new key (only its hash).
    async fn create_api_key(&self, k: &NewApiKey) -> Result<ApiKey>;
    /// Looks a key up by the SHA-256 of its secret; revoked keys are returned with `revoked_at`.
    async fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<ApiKey>;
    /// All keys (no secrets exist to show).
    async fn list_api_keys(&self) -> Result<Vec<ApiKey>>;
    /// Revokes a key. Idempotent.
    async fn revoke_api_key(&self, id: Uuid, now_ms: i64) -> Result<ApiKey>;
    /// Sets the key's default session.
    async fn set_default_session(&self, key_id: Uuid, session_id: Uuid) -> Result<()>;
    /// Number of keys, to know whether first start must create the admin key.
    async fn count_api_keys(&self) -> Result<u64>;

    // --- miners ---------------------------------------------------------------------------
    /// Stores a miner session (token stored hashed).
    async fn create_miner_session(&self, m: &NewMinerSession) -> Result<()>;
    /// Looks a miner session up by token hash; `NotFound` when unknown or expired at `now_ms`.
    async fn miner_session(&self, token_hash: &[u8; 32], now_ms: i64) -> Result<MinerSession>;
    /// Models served by miner sessions valid at `now_ms`, deduplicated, sorted.
    async fn served_models(&self, now_ms: i64) -> Result<Vec<String>>;

    // --- replay protection ------------------------------------------------------------------
    /// Records `(signer, nonce)`; `AlreadyExists { what: "nonce" }` if it was used before.
    /// `expires_at_ms` lets old pairs be pruned (the signature's own expiry makes them useless).
    async fn use_nonce(&self, signer: &str, nonce: &[u8; 16], expires_at_ms: i64) -> Result<()>;
    /// Removes pairs whose message expired before `now_ms`. Returns how many.
    async fn prune_nonces(&self, now_ms: i64) -> Result<u64>;

    // --- v3 read tokens -----------------------------------------------------------------------
    /// Stores a read token (its hash only). `AlreadyExists { what: "read_token" }` when the hash
    /// is taken; `NotFound { what: "session" }` when the session does not exist.
    async fn create_read_token(&self, t: &ReadTokenRecord) -> Result<()>;
    /// Looks a read token up by the SHA-256 of its text; `NotFound { what: "read_token" }` when
    /// unknown or expired at `now_ms` (a token expiring at `now_ms` is refused).
    async fn read_token(&self, token_hash: &[u8; 32], now_ms: i64) -> Result<ReadTokenRecord>;
    /// Removes tokens expired at `now_ms`. Returns how many.
    async fn prune_read_tokens(&self, now_ms: i64) -> Result<u64>;

    // --- per-caller request rates ---------------------------------------------------------------
    /// Whether several router processes share this store (PostgreSQL): per-caller request
    /// rates are then kept here ([`Store::take_rate`]) instead of in each process.
    fn shared(&self) -> bool {
        false
    }
    /// Takes one request from `caller`'s rate by the generic cell rate algorithm: requests
    /// `interval_us` apart on average, bursts of up to `burst` at once. Admitted (`None`) when
    /// the caller's theoretical arrival time for its next request, or `now_us` if later, is at
    /// most `(burst - 1) * interval_us` ahead of `now_us`; that time then moves on by
    /// `interval_us`. Refused otherwise, changing nothing: `Some(microseconds to wait)`. Atomic
    /// across replicas.
    async fn take_rate(
        &self,
        caller: Uuid,
        now_us: i64,
        interval_us: i64,
        burst: u32,
    ) -> Result<Option<i64>>;
    /// Forgets callers whose theoretical arrival time is before `now_us` (back at their full
    /// quota, so forgetting changes nothing for them). Returns how many.
    async fn prune_rates(&self, now_us: i64) -> Result<u64>;

    // --- tasks and the queue ----------------------------------------------------------------
    /// Queues a task (state `queued`). `Conflict(session_closed)` for a closed or expired
    /// session; `AlreadyExists` for a duplicate id. Publishes `TaskAvailable`.
    async fn enqueue(&self, t: &NewTask) -> Result<Task>;
    /// One task.
    async fn get_task(&self, id: Uuid) -> Result<Task>;
    /// The tasks of `ids` that exist, in no particular order, read together (one statement on
    /// PostgreSQL). Unknown ids are left out; a duplicate id gives its task once.
    async fn get_tasks(&self, ids: &[Uuid]) -> Result<Vec<Task>>;
    /// Leases the next task for `miner`, atomically: only `queued` tasks whose model is in
    /// `models`, whose deadline has not passed, and whose session is open and either public or
    /// lists `miner` among its allowed miners, skipping contract-backed sessions when
    /// `skip_contract_sessions` is set. Fair across sessions (the session served least
    /// recently goes first), FIFO within a session. Increments `attempts`.
    async fn lease(&self, req: &LeaseQuery) -> Result<Option<LeasedTask>>;
    /// Extends a lease held by `miner`; `Conflict(lease_not_held | lease_expired)` otherwise.
    async fn heartbeat(&self, lease_id: Uuid, miner: &str, now_ms: i64, ttl_ms: i64)
    -> Result<i64>;
    /// The lease and its task, checking that `miner` holds it and it is valid at `now_ms`.
    async fn active_lease(&self, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<LeasedTask>;
    /// A lease record regardless of validity (for late result submission), if `miner` held it.
    async fn lease_record(&self, lease_id: Uuid, miner: &str) -> Result<LeaseRecord>;
    /// A lease record regardless of validity, if `miner` held it, and its task as it is now,
    /// read together.
    async fn held_lease(&self, lease_id: Uuid, miner: &str) -> Result<(LeaseRecord, Task)>;
    /// Gives a lease back: the task is queued again (attempt not counted as failed).
    async fn release(&self, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<()>;
    /// Fails the task of a lease for good (`failed`, with code and message).
    async fn fail(
        &self,
        lease_id: Uuid,
        miner: &str,
        code: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<()>;
    /// Records a result. The first valid result wins: if the task already has one, returns
    /// `Duplicate` with the stored result and changes nothing. A result for a cancelled, failed
    /// or dead task is `Conflict(task_final)`.
    async fn complete(
        &self,
        lease_id: Uuid,
        miner: &str,
        r: &TaskResultRecord,
        now_ms: i64,
    ) -> Result<CompleteOutcome>;
    /// Cancels a queued or leased task.
    async fn cancel(&self, id: Uuid, now_ms: i64) -> Result<Task>;
    /// Returns expired leases' tasks to the queue, or marks them `dead` once `attempts` reached
    /// `max_attempts`; marks tasks past their deadline `failed` (`deadline_exceeded`).
    async fn reap(&self, now_ms: i64) -> Result<ReapReport>;
    /// Counts of tasks by state, for metrics.
    async fn queue_depth(&self) -> Result<QueueDepth>;

    // --- retention ----------------------------------------------------------------------------
    /// Replaces an open session's retention and sealing policy (`session_closed` otherwise).
    async fn set_session_policy(
        &self,
        id: Uuid,
        retention: &RetentionPolicy,
        sealing: SealingPolicy,
    ) -> Result<Session>;
    /// Records that a completed task's result reached its caller. Only the first delivery is
    /// recorded; returns whether this call recorded it.
    async fn mark_delivered(&self, task_id: Uuid, now_ms: i64) -> Result<bool>;
    /// Blobs of finished tasks that their session's retention policy (or its close) says must
    /// be deleted at `now_ms`, at most `limit`.
    async fn due_deletions(&self, now_ms: i64, limit: u32) -> Result<Vec<DueDeletion>>;
    /// Records a blob as deleted and appends `audit` in the same transaction, unless it was
    /// already recorded (by another replica's sweeper) or the task no longer refers to `urn`
    /// (a rewrap switched it to a new blob, which stays due); returns whether this call
    /// recorded it.
    async fn record_deletion(
        &self,
        task_id: Uuid,
        kind: BlobKind,
        urn: &str,
        now_ms: i64,
        audit: &NewAuditEntry,
    ) -> Result<bool>;

    // --- key lifecycle ------------------------------------------------------------------------
    /// Per key version in use: its tasks and their prompt and result blobs still stored (not
    /// deleted by retention), by version.
    async fn key_version_usage(&self) -> Result<Vec<KeyVersionUsage>>;
    /// Tasks whose blobs a rewrap to `target` moves: finished, sealed by the router, under a
    /// version in `min_version..target`, with a blob still stored. In id order, after `after`
    /// (`Uuid::nil()` to start), at most `limit`.
    async fn rewrap_candidates(
        &self,
        min_version: u32,
        target: u32,
        after: Uuid,
        limit: u32,
    ) -> Result<Vec<Task>>;
    /// How many tasks [`Store::rewrap_candidates`] would return in all.
    async fn count_rewrap_candidates(&self, min_version: u32, target: u32) -> Result<u64>;
    /// Writes a pending journal row, before any new blob of the task is written.
    async fn rewrap_begin(&self, r: &NewRewrap) -> Result<()>;
    /// Names a new blob of a pending row (before the blob can become visible). `false` when
    /// the row is no longer pending (another job abandoned it): the blob must not be written.
    async fn rewrap_record_blob(&self, id: Uuid, kind: BlobKind, urn: &str) -> Result<bool>;
    /// In one transaction: if the row is pending and the task is still as `s.expected` says,
    /// points the task at the new blobs and the new version, marks the row switched and appends
    /// `audit`; otherwise marks the row abandoned. Returns whether the task was switched.
    async fn rewrap_switch(&self, s: &RewrapSwitch, audit: &NewAuditEntry) -> Result<bool>;
    /// Abandons a pending row (a switched one stays switched); returns the row as it now is,
    /// `None` if it is gone.
    async fn rewrap_abandon(&self, id: Uuid) -> Result<Option<RewrapJournal>>;
    /// Every journal row, oldest first.
    async fn rewrap_journal(&self) -> Result<Vec<RewrapJournal>>;
    /// Removes a journal row once its blobs to delete are gone. Idempotent.
    async fn rewrap_forget(&self, id: Uuid) -> Result<()>;

    // --- audit ------------------------------------------------------------------------------
    /// Appends an entry to the hash chain and returns it with its seq and hash.
    async fn audit(&self, e: &NewAuditEntry) -> Result<AuditEntry>;
    /// Entries with `seq > after`, oldest first, at most `limit`.
    async fn audit_entries(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>>;
}

/// Re-checks the whole audit chain of a store, page by page. Returns the number of entries.
pub async fn verify_audit_chain(store: &dyn Store) -> Result<u64> {
    let mut prev = [0u8; 32];
    let mut after = 0i64;
    let mut n = 0u64;
    loop {
        let page = store.audit_entries(after, 1000).await?;
        if page.is_empty() {
            return Ok(n);
        }
        for e in page {
            if e.prev_hash != prev {
                return Err(StoreError::AuditChain {
                    seq: e.seq,
                    reason: "prev_hash does not match the previous entry".into(),
                });
            }
            let expect = e.compute_hash();
            if e.hash != expect {
                return Err(StoreError::AuditChain {
                    seq: e.seq,
                    reason: "hash does not match the entry's contents".into(),
                });
            }
            prev = e.hash;
            after = e.seq;
            n += 1;
        }
    }
}

/// Opens the store named by a database URL: `sqlite://PATH` (created if missing) or
/// `postgres://…`, and runs migrations.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>> {
    let store: std::sync::Arc<dyn Store> = if url.starts_with("sqlite:") {
        std::sync::Arc::new(SqliteStore::connect(url).await?)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        std::sync::Arc::new(PgStore::connect(url).await?)
    } else {
        return Err(StoreError::Database(
            "database URL must start with sqlite:// or postgres://".into(),
        ));
    };
    store.migrate().await?;
    Ok(store)
}

/// Default time a reaper waits between passes.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_millis(500);
