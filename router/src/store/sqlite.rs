//! The embedded store: one SQLite file in WAL mode.
//!
//! Every state change runs in a `BEGIN IMMEDIATE` transaction (or is a single statement), which
//! takes SQLite's single write lock up front, so leases are exclusive and the audit chain
//! linear. Within a process, writers go through one dedicated connection and queue for it in
//! order (SQLite's own busy handler waits by sleeping, which wastes most of the time under
//! load); reads use a few connections of their own and run in parallel with the writer (WAL).
//! The connections are held here rather than in sqlx's pool (see [`super::conns`]), and the
//! busiest transactions send `BEGIN` and `COMMIT` together with their first and last
//! statements: every round trip to a connection's thread counts under load. Other processes on
//! the same file still queue on the busy timeout. Events are published in-process, after the
//! commit.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Sqlite};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::sql::{
    self, ApiKeyRow, AuditHead, AuditRow, LeaseRow, MinerSessionRow, ReadTokenRow, SessionRow,
    TaskRow, api_key_columns, audit_columns, db_err, found, insert_err, session_columns,
    task_columns,
};
use super::{
    ApiKey, AuditEntry, BlobKind, CompleteOutcome, DueDeletion, LeaseQuery, LeaseRecord,
    LeasedTask, MinerSession, NewApiKey, NewAuditEntry, NewMinerSession, NewSession, NewTask,
    PrivacySetting, QueueDepth, ReadTokenRecord, ReapReport, Result, RetentionPolicy,
    SealingPolicy, Session, Store, StoreError, StoreEvent, Task, TaskResultRecord, TaskState,
};

use super::conns::{Conn, Conns, WriteTx};
use super::group::AuditGroup;
use super::lifecycle;

/// The state of a rewrap journal row, locked until the transaction ends (where the backend
/// locks rows; SQLite's write transactions are exclusive anyway).
const REWRAP_STATE: &str = "SELECT state FROM key_rewraps WHERE id = $1";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The next task a miner may lease: least recently served session first (never served = 0),
/// then FIFO by `seq`. Binds: models (JSON array), now, miner, skip contract sessions.
macro_rules! lease_candidate {
    () => {
        "SELECT t.id FROM tasks t \
            JOIN sessions s ON s.id = t.session_id \
            LEFT JOIN session_service ss ON ss.session_id = t.session_id \
            WHERE t.state = 'queued' \
              AND t.model IN (SELECT value FROM json_each($1)) \
              AND (t.deadline_ms IS NULL OR t.deadline_ms > $2) \
              AND s.closed_at_ms IS NULL \
              AND (s.expires_at_ms IS NULL OR s.expires_at_ms > $2) \
              AND (NOT s.private OR EXISTS (SELECT 1 FROM session_miners m \
                   WHERE m.session_id = s.id AND m.miner = $3)) \
              AND NOT ($4 AND s.allowlist_source = 'contract') \
            ORDER BY COALESCE(ss.last_served, 0), t.seq LIMIT 1"
    };
}
const LEASE_CANDIDATE: &str = lease_candidate!();

/// How long a writer waits for the write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Read connections per store (WAL readers run in parallel with the writer).
const READERS: usize = 4;
/// Buffered events per subscriber before it lags.
const EVENT_CAPACITY: usize = 1024;

/// [`Store`] on an SQLite database file (or in memory, for tests).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads (the same connection as `writer` for an in-memory database).
    readers: Arc<Conns>,
    /// Writes: one connection, so in-process writers queue in order instead of on the lock.
    writer: Arc<Conns>,
    /// Audit appends waiting to share a transaction.
    audits: Arc<AuditGroup>,
    events: broadcast::Sender<StoreEvent>,
}

impl SqliteStore {
    /// Opens `sqlite://PATH` (the file is created, mode 0600, if missing) or `sqlite::memory:`.
    /// Call [`Store::migrate`] before use ([`super::open`] does).
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::Database("invalid SQLite database URL".into()))?
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let (readers, writer) = if in_memory {
            // An in-memory database lives as long as its one connection.
            let conns = Arc::new(Conns::new(vec![opts.connect().await.map_err(db_err)?]));
            (conns.clone(), conns)
        } else {
            create_private_file(opts.get_filename())?;
            let opts = opts
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                // Checkpoint every 64 MiB of WAL instead of 4 MiB: a busy queue rewrites the
                // same few pages, and each checkpoint copies (and syncs) them once.
                .pragma("wal_autocheckpoint", "16384");
            // Switching a new file to WAL needs a moment alone with it; when another process
            // (or store) opens it at the same time, SQLite answers "busy" without waiting.
            let mut tries = 0u32;
            let writer = loop {
                match opts.connect().await {
                    Ok(conn) => break conn,
                    Err(e) if is_busy(&e) && tries < 20 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(10 * u64::from(tries))).await;
                    }
                    Err(e) => return Err(db_err(e)),
                }
            };
            let mut readers = Vec::with_capacity(READERS);
            for _ in 0..READERS {
                readers.push(opts.connect().await.map_err(db_err)?);
            }
            (
                Arc::new(Conns::new(readers)),
                Arc::new(Conns::new(vec![writer])),
            )
        };
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(Self {
            readers,
            writer,
            audits: Arc::default(),
            events,
        })
    }

    /// A read connection (WAL readers run in parallel with the writer).
    async fn read(&self) -> Result<Conn> {
        self.readers.take().await
    }

    /// A write transaction holding SQLite's write lock from its first statement.
    async fn write(&self) -> Result<Tx> {
        self.writer.begin("BEGIN IMMEDIATE").await
    }

    /// Ends a transaction: commits it and publishes the events of a successful body, or rolls
    /// it back at once after an error.
    async fn settle<T>(&self, tx: Tx, r: Result<(T, Vec<StoreEvent>)>) -> Result<T> {
        match r {
            Ok((value, events)) => {
                self.commit_with(tx, events).await?;
                Ok(value)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    /// Commits, then publishes `events`.
    async fn commit_with(&self, tx: Tx, events: Vec<StoreEvent>) -> Result<()> {
        commit(tx).await?;
        for e in events {
            // An error only means that nobody is subscribed.
            let _ = self.events.send(e);
        }
        Ok(())
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED, with or without an extended code.
fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

/// Creates the database file with mode 0600 if it does not exist yet (SQLite gives its `-wal`
/// and `-shm` files the same mode).
fn create_private_file(path: &Path) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Database(format!(
            "cannot create the database file {}: {e}",
            path.display()
        ))),
    }
}

type Tx = WriteTx;

async fn session_row(tx: &mut Tx, id: Uuid) -> Result<SessionRow> {
    let row = sqlx::query_as::<_, SessionRow>(concat!(
        "SELECT ",
        session_columns!(),
        " FROM sessions WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_err)?;
    found(row, "session")
}

async fn load_session<'e, E>(ex: E, row: SessionRow) -> Result<Session>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let miners: Vec<String> = sqlx::query_scalar(
        "SELECT miner FROM session_miners WHERE session_id = $1 ORDER BY position",
    )
    .bind(row.id())
    .fetch_all(ex)
    .await
    .map_err(db_err)?;
    row.into_session(miners)
}

async fn insert_miners(tx: &mut Tx, id: Uuid, p: &PrivacySetting) -> Result<()> {
    for (i, miner) in p.allowed_miners.iter().enumerate() {
        sqlx::query("INSERT INTO session_miners (session_id, position, miner) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(i as i64)
            .bind(miner)
            .execute(&mut **tx)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

async fn task_row(tx: &mut Tx, id: Uuid) -> Result<Task> {
    let row = sqlx::query_as::<_, TaskRow>(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_err)?;
    found(row, "task")?.into_task()
}

/// A lease and its task, in one statement.
async fn lease_with_task<'e, E>(ex: E, lease_id: Uuid) -> Result<(LeaseRow, Task)>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let row = sqlx::query_as::<_, sql::LeaseTaskRow>(sql::LEASE_WITH_TASK)
        .bind(lease_id)
        .fetch_optional(ex)
        .await
        .map_err(db_err)?;
    found(row, "lease")?.split()
}

/// The lease, its task, checked to be held by `miner` and valid at `now_ms`.
async fn active(tx: &mut Tx, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<(LeaseRow, Task)> {
    let (lease, task) = lease_with_task(&mut **tx, lease_id).await?;
    lease.check_holder(miner)?;
    lease.check_active(&task, miner, now_ms)?;
    Ok((lease, task))
}

async fn finish(
    tx: &mut Tx,
    id: Uuid,
    state: TaskState,
    (code, message): (&str, &str),
    now_ms: i64,
) -> Result<Task> {
    let row = sqlx::query_as::<_, TaskRow>(concat!(
        "UPDATE tasks SET state = $2, error_code = $3, error_message = $4, finished_at_ms = $5, \
         lease_expires_at_ms = NULL WHERE id = $1 RETURNING ",
        task_columns!()
    ))
    .bind(id)
    .bind(state.as_str())
    .bind(code)
    .bind(message)
    .bind(now_ms)
    .fetch_one(&mut **tx)
    .await
    .map_err(db_err)?;
    row.into_task()
}

/// Appends `e` to the audit hash chain inside `tx`, so that it commits with the change it
/// records or not at all.
pub(super) async fn append_audit(tx: &mut Tx, e: &NewAuditEntry) -> Result<AuditEntry> {
    let mut out = append_audits(tx, std::slice::from_ref(e), AuditTx::Inside).await?;
    out.pop()
        .ok_or_else(|| StoreError::Database("audit entry not written".into()))
}

/// How [`append_audits`] fits into its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AuditTx {
    /// Inside a transaction the caller ends.
    Inside,
    /// Its statements also end the transaction: the insert is followed by `COMMIT`.
    Commits,
    /// The transaction was begun deferred ([`Conns::begin_deferred`]): its statements begin it
    /// (`BEGIN IMMEDIATE` before the first) and commit it. One round trip each.
    BeginsAndCommits,
}

/// Appends `entries` to the audit hash chain inside `tx`, in order, with one insert.
pub(super) async fn append_audits(
    tx: &mut Tx,
    entries: &[NewAuditEntry],
    how: AuditTx,
) -> Result<Vec<AuditEntry>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    const HEAD: &str = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1";
    let head: Option<AuditHead> = if how == AuditTx::BeginsAndCommits {
        sqlx::query_as(concat!(
            "BEGIN IMMEDIATE; ",
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        ))
        // All rows, so that every statement runs.
        .fetch_all(&mut **tx)
        .await
        .map_err(db_err)?
        .into_iter()
        .next()
    } else {
        sqlx::query_as(HEAD)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_err)?
    };
    let (out, details) = sql::chain_audit_entries(head, entries)?;
    let mut insert = sqlx::QueryBuilder::<Sqlite>::new(
        "INSERT INTO audit_log (seq, at_ms, actor, action, session_id, task_id, miner, \
         key_version, detail, prev_hash, hash) ",
    );
    insert.push_values(out.iter().zip(&details), |mut row, (a, detail)| {
        row.push_bind(a.seq)
            .push_bind(a.entry.at_ms)
            .push_bind(a.entry.actor.as_str())
            .push_bind(a.entry.action.as_str())
            .push_bind(a.entry.session_id)
            .push_bind(a.entry.task_id)
            .push_bind(a.entry.miner.as_deref())
            .push_bind(a.entry.key_version.map(i64::from))
            .push_bind(detail.as_str())
            .push_bind(&a.prev_hash[..])
            .push_bind(&a.hash[..]);
    });
    if how != AuditTx::Inside {
        insert.push("; COMMIT");
    }
    insert
        .build()
        .execute(&mut **tx)
        .await
        .map_err(insert_err("audit_entry"))?;
    Ok(out)
}

/// Runs the migrations on `conn`. sqlx's `Acquire` bound on a borrowed connection cannot be
/// met inside a `Send` future, so they run to completion on a blocking thread of their own
/// (once, at start-up; the connection's own thread does the work).
async fn run_migrations(mut conn: Conn) -> std::result::Result<(), String> {
    tokio::task::spawn_blocking(move || {
        futures::executor::block_on(MIGRATOR.run(&mut *conn)).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn commit(tx: Tx) -> Result<()> {
    tx.commit().await
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        // SQLite has no advisory locks: two processes migrating one file at once can collide
        // on the first run. The loser retries and then finds the migrations applied.
        let mut tries = 0;
        loop {
            match run_migrations(self.writer.take().await?).await {
                Ok(()) => return Ok(()),
                Err(_) if tries < 3 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => return Err(StoreError::Database(format!("migration failed: {e}"))),
            }
        }
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.read().await?)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    // --- sessions ---------------------------------------------------------------------------

    async fn create_session(&self, s: &NewSession) -> Result<Session> {
        let mut tx = self.write().await?;
        let r = async {
            sqlx::query(
                "INSERT INTO sessions (id, owner, kind, private, allowlist_source, created_at_ms, \
                 expires_at_ms, prompt_on_delivery, prompt_ttl_ms, result_ttl_ms, \
                 result_on_fetch, sealing) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(s.id)
            .bind(&s.owner)
            .bind(s.kind.as_str())
            .bind(s.privacy.private)
            .bind(s.privacy.source.as_str())
            .bind(s.created_at_ms)
            .bind(s.expires_at_ms)
            .bind(s.retention.delete_prompt_on_delivery)
            .bind(s.retention.prompt_ttl_ms())
            .bind(s.retention.result_ttl_ms())
            .bind(s.retention.delete_result_on_fetch)
            .bind(s.sealing.as_str())
            .execute(&mut *tx)
            .await
            .map_err(insert_err("session"))?;
            insert_miners(&mut tx, s.id, &s.privacy).await?;
            let row = session_row(&mut tx, s.id).await?;
            let session = load_session(&mut *tx, row).await?;
            Ok((session, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn get_session(&self, id: Uuid) -> Result<Session> {
        let row = sqlx::query_as::<_, sql::SessionMinersRow>(concat!(
            "SELECT ",
            session_columns!(),
            ", (SELECT json_group_array(m.miner ORDER BY m.position) FROM session_miners m \
             WHERE m.session_id = sessions.id) AS miners FROM sessions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.read().await?)
        .await
        .map_err(db_err)?;
        found(row, "session")?.into_session()
    }

    async fn list_sessions(
        &self,
        owner: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<Session>> {
        let mut conn = self.read().await?;
        let rows = sqlx::query_as::<_, SessionRow>(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE owner = $1 AND ($2 IS NULL OR (created_at_ms, id) < \
             (SELECT created_at_ms, id FROM sessions WHERE id = $2)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $3"
        ))
        .bind(owner)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(load_session(&mut *conn, row).await?);
        }
        Ok(out)
    }

    async fn set_privacy(&self, id: Uuid, p: &PrivacySetting) -> Result<Session> {
        let mut tx = self.write().await?;
        let r = async {
            if session_row(&mut tx, id).await?.is_closed() {
                return Err(sql::session_closed());
            }
            sqlx::query("UPDATE sessions SET private = $2, allowlist_source = $3 WHERE id = $1")
                .bind(id)
                .bind(p.private)
                .bind(p.source.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            sqlx::query("DELETE FROM session_miners WHERE session_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            insert_miners(&mut tx, id, p).await?;
            let row = session_row(&mut tx, id).await?;
            let session = load_session(&mut *tx, row).await?;
            Ok((session, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn close_session(&self, id: Uuid, now_ms: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let r = async {
            if session_row(&mut tx, id).await?.is_closed() {
                return Ok((0, Vec::new()));
            }
            sqlx::query("UPDATE sessions SET closed_at_ms = $2 WHERE id = $1")
                .bind(id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            let (code, message) = sql::SESSION_CLOSED;
            let cancelled: Vec<Uuid> = sqlx::query_scalar(
                "UPDATE tasks SET state = 'cancelled', error_code = $2, error_message = $3, \
                 finished_at_ms = $4, lease_expires_at_ms = NULL \
                 WHERE session_id = $1 AND state IN ('queued', 'leased') RETURNING id",
            )
            .bind(id)
            .bind(code)
            .bind(message)
            .bind(now_ms)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            let n = cancelled.len() as u64;
            let events = cancelled
                .into_iter()
                .map(|task_id| StoreEvent::TaskFinished { task_id })
                .collect();
            Ok((n, events))
        }
        .await;
        self.settle(tx, r).await
    }

    // --- API keys ---------------------------------------------------------------------------

    async fn create_api_key(&self, k: &NewApiKey) -> Result<ApiKey> {
        let row = sqlx::query_as::<_, ApiKeyRow>(concat!(
            "INSERT INTO api_keys (id, owner, hash, prefix, admin, rate_per_minute, \
             max_concurrent, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING ",
            api_key_columns!()
        ))
        .bind(k.id)
        .bind(&k.owner)
        .bind(&k.hash[..])
        .bind(&k.prefix)
        .bind(k.admin)
        .bind(i64::from(k.rate_per_minute))
        .bind(i64::from(k.max_concurrent))
        .bind(k.created_at_ms)
        .fetch_one(&mut *self.writer.take().await?)
        .await
        .map_err(insert_err("api_key"))?;
        row.into_api_key()
    }

    async fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<ApiKey> {
        let row = sqlx::query_as::<_, ApiKeyRow>(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE hash = $1"
        ))
        .bind(&hash[..])
        .fetch_optional(&mut *self.read().await?)
        .await
        .map_err(db_err)?;
        found(row, "api_key")?.into_api_key()
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        sqlx::query_as::<_, ApiKeyRow>(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys ORDER BY created_at_ms, id"
        ))
        .fetch_all(&mut *self.read().await?)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(ApiKeyRow::into_api_key)
        .collect()
    }

    async fn revoke_api_key(&self, id: Uuid, now_ms: i64) -> Result<ApiKey> {
        let row = sqlx::query_as::<_, ApiKeyRow>(concat!(
            "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1 \
             RETURNING ",
            api_key_columns!()
        ))
        .bind(id)
        .bind(now_ms)
        .fetch_optional(&mut *self.writer.take().await?)
        .await
        .map_err(db_err)?;
        found(row, "api_key")?.into_api_key()
    }

    async fn set_default_session(&self, key_id: Uuid, session_id: Uuid) -> Result<()> {
        let mut tx = self.write().await?;
        let r = async {
            session_row(&mut tx, session_id).await?;
            let done = sqlx::query("UPDATE api_keys SET default_session = $2 WHERE id = $1")
                .bind(key_id)
                .bind(session_id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound { what: "api_key" });
            }
            Ok(((), Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn count_api_keys(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&mut *self.read().await?)
            .await
            .map_err(db_err)?;
        Ok(n.max(0) as u64)
    }

    // --- miners -----------------------------------------------------------------------------

    async fn create_miner_session(&self, m: &NewMinerSession) -> Result<()> {
        sqlx::query(
            "INSERT INTO miner_sessions (token_hash, miner, recipient, models, created_at_ms, \
             expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&m.token_hash[..])
        .bind(&m.miner)
        .bind(&m.recipient[..])
        .bind(sql::models_json(&m.models)?)
        .bind(m.created_at_ms)
        .bind(m.expires_at_ms)
        .execute(&mut *self.writer.take().await?)
        .await
        .map_err(insert_err("miner_session"))?;
        Ok(())
    }

    async fn miner_session(&self, token_hash: &[u8; 32], now_ms: i64) -> Result<MinerSession> {
        let row = sqlx::query_as::<_, MinerSessionRow>(
            "SELECT token_hash, miner, recipient, models, created_at_ms, expires_at_ms \
             FROM miner_sessions WHERE token_hash = $1 AND expires_at_ms > $2",
        )
        .bind(&token_hash[..])
        .bind(now_ms)
        .fetch_optional(&mut *self.read().await?)
        .await
        .map_err(db_err)?;
        found(row, "miner_session")?.into_miner_session()
    }

    async fn served_models(&self, now_ms: i64) -> Result<Vec<String>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT models FROM miner_sessions WHERE expires_at_ms > $1")
                .bind(now_ms)
                .fetch_all(&mut *self.read().await?)
                .await
                .map_err(db_err)?;
        sql::served_models(rows)
    }

    // --- replay protection ------------------------------------------------------------------

    async fn use_nonce(&self, signer: &str, nonce: &[u8; 16], expires_at_ms: i64) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO nonces (signer, nonce, expires_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (signer, nonce) DO NOTHING",
        )
        .bind(signer)
        .bind(&nonce[..])
        .bind(expires_at_ms)
        .execute(&mut *self.writer.take().await?)
        .await
        .map_err(db_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists { what: "nonce" });
        }
        Ok(())
    }

    async fn prune_nonces(&self, now_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM nonces WHERE expires_at_ms < $1")
            .bind(now_ms)
            .execute(&mut *self.writer.take().await?)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    // --- v3 read tokens -----------------------------------------------------------------------

    async fn create_read_token(&self, t: &ReadTokenRecord) -> Result<()> {
        let done = sqlx::query(sql::INSERT_READ_TOKEN)
            .bind(&t.token_hash[..])
            .bind(&t.owner)
            .bind(t.session_id)
            .bind(t.created_at_ms)
            .bind(t.expires_at_ms)
            .execute(&mut *self.writer.take().await?)
            .await
            .map_err(insert_err("read_token"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: "session" });
        }
        Ok(())
    }

    async fn read_token(&self, token_hash: &[u8; 32], now_ms: i64) -> Result<ReadTokenRecord> {
        let row = sqlx::query_as::<_, ReadTokenRow>(sql::SELECT_READ_TOKEN)
            .bind(&token_hash[..])
            .bind(now_ms)
            .fetch_optional(&mut *self.read().await?)
            .await
            .map_err(db_err)?;
        found(row, "read_token")?.into_record()
    }

    async fn prune_read_tokens(&self, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(sql::PRUNE_READ_TOKENS)
            .bind(now_ms)
            .execute(&mut *self.writer.take().await?)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    // --- tasks and the queue ----------------------------------------------------------------

    async fn enqueue(&self, t: &NewTask) -> Result<Task> {
        // One statement, so its own transaction: the task goes in only while its session is
        // open at `created_at_ms`.
        let row = sqlx::query_as::<_, TaskRow>(concat!(
            "INSERT INTO tasks (id, session_id, prompt_urn, prompt_hash, prompt_scope, \
             key_version, model, params, state, attempts, max_attempts, created_at_ms, \
             deadline_ms, submitted_by, sealed_by) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, 'queued', 0, $9, $10, $11, $12, $13 \
             FROM sessions WHERE id = $2 AND closed_at_ms IS NULL \
             AND (expires_at_ms IS NULL OR $10 < expires_at_ms) \
             RETURNING ",
            task_columns!()
        ))
        .bind(t.id)
        .bind(t.session_id)
        .bind(&t.prompt_urn)
        .bind(&t.prompt_hash[..])
        .bind(i64::from(t.prompt_scope))
        .bind(i64::from(t.key_version))
        .bind(&t.model)
        .bind(sql::params_json(&t.params)?)
        .bind(i64::from(t.max_attempts))
        .bind(t.created_at_ms)
        .bind(t.deadline_ms)
        .bind(&t.submitted_by)
        .bind(t.sealed_by.as_str())
        .fetch_optional(&mut *self.writer.take().await?)
        .await
        .map_err(insert_err("task"))?;
        let Some(row) = row else {
            // Nothing inserted: say why.
            self.get_session(t.session_id).await?;
            return Err(sql::session_closed());
        };
        let task = row.into_task()?;
        let _ = self.events.send(StoreEvent::TaskAvailable {
            model: task.model.clone(),
        });
        Ok(task)
    }

    async fn get_task(&self, id: Uuid) -> Result<Task> {
        let row = sqlx::query_as::<_, TaskRow>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.read().await?)
        .await
        .map_err(db_err)?;
        found(row, "task")?.into_task()
    }

    async fn lease(&self, req: &LeaseQuery) -> Result<Option<LeasedTask>> {
        if req.models.is_empty() {
            return Ok(None);
        }
        let models = serde_json::to_string(&req.models)
            .map_err(|_| StoreError::Database("encoding models".into()))?;
        // Look first on a read connection, in parallel with the writer: most polls of an idle
        // or drained queue find nothing and need not queue for the write lock. A task queued
        // after this read announces itself with an event, which makes the poller look again.
        let any: Option<Uuid> = sqlx::query_scalar(LEASE_CANDIDATE)
            .bind(&models)
            .bind(req.now_ms)
            .bind(&req.miner)
            .bind(req.skip_contract_sessions)
            .fetch_optional(&mut *self.read().await?)
            .await
            .map_err(db_err)?;
        if any.is_none() {
            return Ok(None);
        }
        // One round trip to the writer's thread: take the write lock, record the lease of the
        // candidate, mark its task leased, note the session as served, commit. When another
        // poll took the candidate meanwhile, every statement finds nothing and the empty
        // transaction commits.
        let mut tx = self.writer.begin_deferred().await?;
        let expires = req.now_ms.saturating_add(req.ttl_ms);
        let r = async {
            let leased = sqlx::query_as::<_, TaskRow>(concat!(
                "BEGIN IMMEDIATE; \
                 INSERT INTO leases (lease_id, task_id, miner, attempt, created_at_ms, \
                 expires_at_ms) SELECT $5, id, $3, attempts + 1, $2, $6 FROM tasks \
                 WHERE id = (",
                lease_candidate!(),
                "); \
                 UPDATE tasks SET state = 'leased', attempts = attempts + 1, \
                 lease_id = $5, leased_by = $3, lease_expires_at_ms = $6 \
                 WHERE state = 'queued' AND id = (SELECT task_id FROM leases WHERE lease_id = $5) \
                 RETURNING ",
                task_columns!(),
                "; \
                 INSERT INTO session_service (session_id, last_served) \
                 SELECT t.session_id, (SELECT COALESCE(MAX(last_served), 0) + 1 FROM session_service) \
                 FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.lease_id = $5 \
                 ON CONFLICT (session_id) DO UPDATE SET last_served = excluded.last_served; \
                 COMMIT"
            ))
            .bind(&models)
            .bind(req.now_ms)
            .bind(&req.miner)
            .bind(req.skip_contract_sessions)
            .bind(req.lease_id)
            .bind(expires)
            // All rows, so that every statement runs.
            .fetch_all(&mut *tx)
            .await
            .map_err(insert_err("lease"))?;
            let Some(row) = leased.into_iter().next() else {
                // Taken meanwhile: nothing changed.
                return Ok((None, true));
            };
            let task = row.into_task()?;
            let leased = LeasedTask {
                lease_id: req.lease_id,
                lease_expires_at_ms: expires,
                attempt: task.attempts,
                task,
            };
            Ok((Some(leased), true))
        }
        .await;
        tx.end(r).await
    }

    async fn heartbeat(
        &self,
        lease_id: Uuid,
        miner: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<i64> {
        let mut tx = self.write().await?;
        let r = async {
            let (lease, task) = active(&mut tx, lease_id, miner, now_ms).await?;
            let expires = now_ms.saturating_add(ttl_ms);
            sqlx::query("UPDATE tasks SET lease_expires_at_ms = $2 WHERE id = $1")
                .bind(task.id)
                .bind(expires)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            sqlx::query("UPDATE leases SET expires_at_ms = $2 WHERE lease_id = $1")
                .bind(lease.lease_id)
                .bind(expires)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            Ok((expires, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn active_lease(&self, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<LeasedTask> {
        // One statement: lease and task are seen together without a transaction.
        let (lease, task) = lease_with_task(&mut *self.read().await?, lease_id).await?;
        lease.check_holder(miner)?;
        lease.check_active(&task, miner, now_ms)?;
        lease.leased_task(task)
    }

    async fn lease_record(&self, lease_id: Uuid, miner: &str) -> Result<LeaseRecord> {
        let row = sqlx::query_as::<_, LeaseRow>(
            "SELECT lease_id, task_id, miner, attempt, expires_at_ms FROM leases \
             WHERE lease_id = $1",
        )
        .bind(lease_id)
        .fetch_optional(&mut *self.read().await?)
        .await
        .map_err(db_err)?;
        let lease = found(row, "lease")?;
        lease.check_holder(miner)?;
        lease.record()
    }

    async fn held_lease(&self, lease_id: Uuid, miner: &str) -> Result<(LeaseRecord, Task)> {
        let (lease, task) = lease_with_task(&mut *self.read().await?, lease_id).await?;
        lease.check_holder(miner)?;
        Ok((lease.record()?, task))
    }

    async fn release(&self, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<()> {
        let mut tx = self.write().await?;
        let r = async {
            let (_, task) = active(&mut tx, lease_id, miner, now_ms).await?;
            // A released attempt does not count against `max_attempts`.
            sqlx::query(
                "UPDATE tasks SET state = 'queued', attempts = MAX(attempts - 1, 0), \
                 lease_expires_at_ms = NULL WHERE id = $1",
            )
            .bind(task.id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            let event = StoreEvent::TaskAvailable { model: task.model };
            Ok(((), vec![event]))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn fail(
        &self,
        lease_id: Uuid,
        miner: &str,
        code: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        let r = async {
            let (_, task) = active(&mut tx, lease_id, miner, now_ms).await?;
            finish(&mut tx, task.id, TaskState::Failed, (code, message), now_ms).await?;
            let event = StoreEvent::TaskFinished { task_id: task.id };
            Ok(((), vec![event]))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn complete(
        &self,
        lease_id: Uuid,
        miner: &str,
        r: &TaskResultRecord,
        now_ms: i64,
    ) -> Result<CompleteOutcome> {
        // The usual case in one round trip to the writer's thread: the lease is this miner's
        // and its task has no result and is not final, so the result is recorded at once.
        let mut tx = self.writer.begin_deferred().await?;
        let quick = async {
            let row = sqlx::query_as::<_, TaskRow>(concat!(
                "BEGIN IMMEDIATE; \
                 UPDATE tasks SET state = 'completed', result_urn = $3, result_hash = $4, \
                 result_size = $5, result_miner = $6, result_signature = $7, prompt_tokens = $8, \
                 completion_tokens = $9, finish_reason = $10, finished_at_ms = $11, \
                 lease_expires_at_ms = NULL \
                 WHERE id = (SELECT task_id FROM leases WHERE lease_id = $1 AND miner = $2) \
                 AND result_urn IS NULL AND state IN ('queued', 'leased') RETURNING ",
                task_columns!(),
                "; COMMIT"
            ))
            .bind(lease_id)
            .bind(miner)
            .bind(&r.result_urn)
            .bind(&r.result_hash[..])
            .bind(sql::to_i64(r.result_size, "result_size")?)
            .bind(&r.miner)
            .bind(&r.signature)
            .bind(i64::from(r.prompt_tokens))
            .bind(i64::from(r.completion_tokens))
            .bind(&r.finish_reason)
            .bind(now_ms)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            Ok((row.into_iter().next(), true))
        }
        .await;
        if let Some(row) = tx.end(quick).await? {
            let task = row.into_task()?;
            let _ = self
                .events
                .send(StoreEvent::TaskFinished { task_id: task.id });
            return Ok(CompleteOutcome::Accepted(task));
        }
        // Otherwise, two round trips: take the write lock and read the lease with its task to
        // tell why (another miner's lease, a duplicate, a final task), then record the result
        // if it may still be (a state that changed between the two) and commit.
        let mut tx = self.writer.begin_deferred().await?;
        let r = async {
            let row = sqlx::query_as::<_, sql::LeaseTaskRow>(concat!(
                "BEGIN IMMEDIATE; ",
                sql::lease_with_task!()
            ))
            .bind(lease_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?
            .into_iter()
            .next();
            let (lease, task) = found(row, "lease")?.split()?;
            lease.check_holder(miner)?;
            if task.result.is_some() {
                return Ok((CompleteOutcome::Duplicate(task), false));
            }
            if task.state.is_final() {
                return Err(sql::task_final(task.state));
            }
            // Queued or leased, by this lease or a later one: the first result wins, including a
            // late one from a lease that lapsed.
            let row = sqlx::query_as::<_, TaskRow>(concat!(
                "UPDATE tasks SET state = 'completed', result_urn = $2, result_hash = $3, \
                 result_size = $4, result_miner = $5, result_signature = $6, prompt_tokens = $7, \
                 completion_tokens = $8, finish_reason = $9, finished_at_ms = $10, \
                 lease_expires_at_ms = NULL WHERE id = $1 RETURNING ",
                task_columns!(),
                "; COMMIT"
            ))
            .bind(task.id)
            .bind(&r.result_urn)
            .bind(&r.result_hash[..])
            .bind(sql::to_i64(r.result_size, "result_size")?)
            .bind(&r.miner)
            .bind(&r.signature)
            .bind(i64::from(r.prompt_tokens))
            .bind(i64::from(r.completion_tokens))
            .bind(&r.finish_reason)
            .bind(now_ms)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            let row = found(row.into_iter().next(), "task")?;
            Ok((CompleteOutcome::Accepted(row.into_task()?), true))
        }
        .await;
        let outcome = tx.end(r).await?;
        if let CompleteOutcome::Accepted(task) = &outcome {
            let _ = self
                .events
                .send(StoreEvent::TaskFinished { task_id: task.id });
        }
        Ok(outcome)
    }

    async fn cancel(&self, id: Uuid, now_ms: i64) -> Result<Task> {
        let mut tx = self.write().await?;
        let r = async {
            let task = task_row(&mut tx, id).await?;
            match task.state {
                TaskState::Cancelled => return Ok((task, Vec::new())),
                s if s.is_final() => return Err(sql::task_final(s)),
                _ => {}
            }
            let task = finish(&mut tx, id, TaskState::Cancelled, sql::CANCELLED, now_ms).await?;
            let event = StoreEvent::TaskFinished { task_id: id };
            Ok((task, vec![event]))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn reap(&self, now_ms: i64) -> Result<ReapReport> {
        let mut tx = self.write().await?;
        let r = async {
            let (code, message) = sql::DEADLINE_EXCEEDED;
            let deadline_failed: Vec<Uuid> = sqlx::query_scalar(
                "UPDATE tasks SET state = 'failed', error_code = $2, error_message = $3, \
                 finished_at_ms = $1, lease_expires_at_ms = NULL \
                 WHERE state IN ('queued', 'leased') AND deadline_ms IS NOT NULL \
                 AND deadline_ms <= $1 RETURNING id",
            )
            .bind(now_ms)
            .bind(code)
            .bind(message)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            let (code, message) = sql::MAX_ATTEMPTS;
            let expired: Vec<(Uuid, String, String)> = sqlx::query_as(
                "UPDATE tasks SET \
                   state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END, \
                   error_code = CASE WHEN attempts >= max_attempts THEN $2 ELSE error_code END, \
                   error_message = \
                     CASE WHEN attempts >= max_attempts THEN $3 ELSE error_message END, \
                   finished_at_ms = \
                     CASE WHEN attempts >= max_attempts THEN $1 ELSE finished_at_ms END, \
                   lease_expires_at_ms = NULL \
                 WHERE state = 'leased' AND lease_expires_at_ms <= $1 RETURNING id, state, model",
            )
            .bind(now_ms)
            .bind(code)
            .bind(message)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            let (report, events) = sql::reap_outcome(deadline_failed, expired);
            Ok((report, events))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn queue_depth(&self) -> Result<QueueDepth> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, COUNT(*) FROM tasks WHERE state IN ('queued', 'leased') GROUP BY state",
        )
        .fetch_all(&mut *self.read().await?)
        .await
        .map_err(db_err)?;
        Ok(sql::queue_depth(rows))
    }

    // --- retention ----------------------------------------------------------------------------

    async fn set_session_policy(
        &self,
        id: Uuid,
        retention: &RetentionPolicy,
        sealing: SealingPolicy,
    ) -> Result<Session> {
        let mut tx = self.write().await?;
        let r = async {
            if session_row(&mut tx, id).await?.is_closed() {
                return Err(sql::session_closed());
            }
            sqlx::query(sql::SET_SESSION_POLICY)
                .bind(id)
                .bind(retention.delete_prompt_on_delivery)
                .bind(retention.prompt_ttl_ms())
                .bind(retention.result_ttl_ms())
                .bind(retention.delete_result_on_fetch)
                .bind(sealing.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            let row = session_row(&mut tx, id).await?;
            let session = load_session(&mut *tx, row).await?;
            Ok((session, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn mark_delivered(&self, task_id: Uuid, now_ms: i64) -> Result<bool> {
        // One statement: its own transaction.
        let done = sqlx::query(sql::MARK_DELIVERED)
            .bind(task_id)
            .bind(now_ms)
            .execute(&mut *self.writer.take().await?)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn due_deletions(&self, now_ms: i64, limit: u32) -> Result<Vec<DueDeletion>> {
        sqlx::query_as::<_, sql::DueRow>(sql::DUE_DELETIONS)
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(&mut *self.read().await?)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(sql::DueRow::into_due)
            .collect()
    }

    async fn record_deletion(
        &self,
        task_id: Uuid,
        kind: BlobKind,
        urn: &str,
        now_ms: i64,
        audit: &NewAuditEntry,
    ) -> Result<bool> {
        // Three round trips: take the write lock and record the deletion; read the audit
        // chain's head; append and commit.
        let mut tx = self.writer.begin_deferred().await?;
        let r = async {
            let recorded: Vec<Uuid> = sqlx::query_scalar(sql::begin_mark_deleted_sql(kind))
                .bind(task_id)
                .bind(now_ms)
                .bind(urn)
                // All rows, so that every statement runs.
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
            if recorded.len() != 1 {
                return Ok((false, false));
            }
            append_audits(&mut tx, std::slice::from_ref(audit), AuditTx::Commits).await?;
            Ok((true, true))
        }
        .await;
        tx.end(r).await
    }

    // --- key lifecycle ------------------------------------------------------------------------

    async fn key_version_usage(&self) -> Result<Vec<super::KeyVersionUsage>> {
        sqlx::query_as::<_, lifecycle::UsageRow>(lifecycle::KEY_VERSION_USAGE)
            .fetch_all(&mut *self.read().await?)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(lifecycle::UsageRow::into_usage)
            .collect()
    }

    async fn rewrap_candidates(
        &self,
        min_version: u32,
        target: u32,
        after: Uuid,
        limit: u32,
    ) -> Result<Vec<Task>> {
        sqlx::query_as::<_, TaskRow>(lifecycle::REWRAP_CANDIDATES)
            .bind(i64::from(min_version))
            .bind(i64::from(target))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&mut *self.read().await?)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(TaskRow::into_task)
            .collect()
    }

    async fn count_rewrap_candidates(&self, min_version: u32, target: u32) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(lifecycle::COUNT_REWRAP_CANDIDATES)
            .bind(i64::from(min_version))
            .bind(i64::from(target))
            .fetch_one(&mut *self.read().await?)
            .await
            .map_err(db_err)?;
        Ok(n.max(0) as u64)
    }

    async fn rewrap_begin(&self, r: &super::NewRewrap) -> Result<()> {
        let mut tx = self.write().await?;
        let res = sqlx::query(lifecycle::REWRAP_BEGIN)
            .bind(r.id)
            .bind(r.task_id)
            .bind(i64::from(r.old_version))
            .bind(i64::from(r.new_version))
            .bind(r.started_at_ms)
            .execute(&mut *tx)
            .await
            .map_err(insert_err("rewrap"))
            .map(|_| ((), Vec::new()));
        self.settle(tx, res).await
    }

    async fn rewrap_record_blob(&self, id: Uuid, kind: BlobKind, urn: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let res = sqlx::query(lifecycle::rewrap_record_sql(kind))
            .bind(id)
            .bind(urn)
            .execute(&mut *tx)
            .await
            .map_err(db_err)
            .map(|done| (done.rows_affected() == 1, Vec::new()));
        self.settle(tx, res).await
    }

    async fn rewrap_switch(&self, s: &super::RewrapSwitch, audit: &NewAuditEntry) -> Result<bool> {
        let binds = lifecycle::SwitchBinds::new(s)?;
        let mut tx = self.write().await?;
        let r = async {
            // The row first: a switch and an abandon of the same row are serialised on it.
            let state: Option<String> = sqlx::query_scalar(REWRAP_STATE)
                .bind(s.rewrap_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
            if state.as_deref() != Some("pending") {
                return Ok((false, Vec::new()));
            }
            let done = lifecycle::bind_switch!(sqlx::query(lifecycle::REWRAP_SWITCH_TASK), binds)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            if done.rows_affected() != 1 {
                sqlx::query(lifecycle::REWRAP_ABANDON)
                    .bind(s.rewrap_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                return Ok((false, Vec::new()));
            }
            let (old_prompt, old_result, new_prompt, new_result) = lifecycle::SwitchBinds::moved(s);
            sqlx::query(lifecycle::REWRAP_MARK_SWITCHED)
                .bind(s.rewrap_id)
                .bind(old_prompt)
                .bind(old_result)
                .bind(new_prompt)
                .bind(new_result)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            append_audit(&mut tx, audit).await?;
            Ok((true, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn rewrap_abandon(&self, id: Uuid) -> Result<Option<super::RewrapJournal>> {
        let mut tx = self.write().await?;
        let r = async {
            sqlx::query(lifecycle::REWRAP_ABANDON)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            let row = sqlx::query_as::<_, lifecycle::RewrapRow>(lifecycle::REWRAP_ROW)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
            Ok((
                row.map(lifecycle::RewrapRow::into_journal).transpose()?,
                Vec::new(),
            ))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn rewrap_journal(&self) -> Result<Vec<super::RewrapJournal>> {
        sqlx::query_as::<_, lifecycle::RewrapRow>(lifecycle::REWRAP_JOURNAL)
            .fetch_all(&mut *self.read().await?)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(lifecycle::RewrapRow::into_journal)
            .collect()
    }

    async fn rewrap_forget(&self, id: Uuid) -> Result<()> {
        let mut tx = self.write().await?;
        let res = sqlx::query(lifecycle::REWRAP_FORGET)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)
            .map(|_| ((), Vec::new()));
        self.settle(tx, res).await
    }

    // --- audit ------------------------------------------------------------------------------

    async fn audit(&self, e: &NewAuditEntry) -> Result<AuditEntry> {
        // Concurrent appends share one transaction (see `group`).
        self.audits
            .append(e, |batch| {
                let store = self.clone();
                async move {
                    let mut tx = store.writer.begin_deferred().await?;
                    let r = append_audits(&mut tx, &batch, AuditTx::BeginsAndCommits)
                        .await
                        .map(|entries| (entries, true));
                    tx.end(r).await
                }
            })
            .await
    }

    async fn audit_entries(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>> {
        sqlx::query_as::<_, AuditRow>(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.read().await?)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(AuditRow::into_entry)
        .collect()
    }
}
