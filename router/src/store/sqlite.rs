//! The embedded store: one SQLite file in WAL mode.
//!
//! Every state change runs in a `BEGIN IMMEDIATE` transaction (or is a single statement), which
//! takes SQLite's single write lock up front, so leases are exclusive and the audit chain
//! linear. Within a process, writers go through one connection and queue for it in order
//! without blocking a thread (SQLite's own busy handler waits by sleeping), and writes queued
//! behind each other share one commit (group commit, see [`super::conns`]); reads use a few
//! connections of their own and run in parallel with the writer (WAL). Statements run in place
//! on the task that needs them (see [`super::lite`] and [`super::conns`]): on a warm connection
//! they take microseconds, less than a hand-off to a driver thread and back. The write-ahead
//! log is checkpointed in the background. Other processes on the same file (the operator's
//! CLI) wait on the busy timeout. Events are published in-process, after the commit.
//! Migrations are sqlx's, shared with the PostgreSQL store.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use sqlx::ConnectOptions;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::lite::{db_err, insert_err, is_busy, query, query_as, query_scalar};
use super::sql::{
    self, ApiKeyRow, AuditHead, AuditRow, LeaseRow, MinerSessionRow, ReadTokenRow, SessionRow,
    TaskRow, api_key_columns, audit_columns, found, session_columns, task_columns,
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

/// How long a write waits for the write lock held by another process (another store on the
/// same file, or the operator's CLI) before giving up; the wait is asynchronous (see
/// [`Conns::begin`]). Within a process, writers queue for the one write connection instead.
/// Readers (which in WAL mode wait only in rare cases) and migrations wait as long in SQLite's
/// busy handler.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Read connections per store (WAL readers run in parallel with the writer).
const READERS: usize = 4;
/// Buffered events per subscriber before it lags.
const EVENT_CAPACITY: usize = 1024;
/// Prepared statements kept per connection (the store has a few dozen).
const STATEMENT_CACHE: usize = 128;
/// How often the write-ahead log is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// The largest the write-ahead log file stays once a checkpoint lets it start over.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

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
    /// Where sqlx's migrator finds the database.
    migrate_url: Arc<SqliteConnectOptions>,
    /// The background checkpointer, stopped with the last clone of the store.
    _checkpoints: Option<Arc<Checkpoints>>,
}

/// Copies the write-ahead log back into the database file now and then, on a connection and a
/// thread of its own. Writers wait for it (asynchronously, for the write connection): with
/// writers running, the log would never be wholly copied, and a log that is never wholly copied
/// never starts over (the next writer after a whole copy starts it over). Readers are not held
/// up. SQLite would otherwise run checkpoints inside whichever commit crosses its threshold, on
/// the thread of the request that made it.
#[derive(Debug)]
struct Checkpoints(tokio::task::JoinHandle<()>);

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Checkpoints {
    fn start(conn: Connection, writer: Arc<Conns>) -> Option<Arc<Self>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let conn = Arc::new(std::sync::Mutex::new(conn));
        let task = rt.spawn(async move {
            loop {
                tokio::time::sleep(CHECKPOINT_EVERY).await;
                let Ok(paused) = writer.take().await else {
                    continue;
                };
                let c = Arc::clone(&conn);
                let done = tokio::task::spawn_blocking(move || {
                    let c = c.lock().unwrap_or_else(|p| p.into_inner());
                    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                })
                .await;
                drop(paused);
                if let Ok(Err(e)) = done {
                    tracing::debug!(error = %e, "WAL checkpoint");
                }
            }
        });
        Some(Arc::new(Self(task)))
    }
}

/// How commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Each commit syncs the log before it returns, so that whatever the router has
    /// acknowledged (a queued task, a result, a used nonce) survives a power loss, as on
    /// PostgreSQL. Group commit (see `conns`) shares one sync among the writes queued behind
    /// each other.
    Full,
    /// Commits append to the log without a sync (it is synced at each checkpoint): a power loss
    /// can lose the last commits, never corrupt the file. The default.
    Normal,
}

/// Takes the store's own `synchronous` parameter (`full` or `normal`) out of a database URL,
/// since sqlx refuses parameters it does not know.
fn take_synchronous(url: &str) -> Result<(String, Durability)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Durability::Normal));
    };
    let mut durability = Durability::Normal;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("synchronous", v)) => {
                durability = match v.to_ascii_lowercase().as_str() {
                    "full" => Durability::Full,
                    "normal" => Durability::Normal,
                    _ => {
                        return Err(StoreError::Database(format!(
                            "invalid SQLite database URL: `synchronous` is `full` or `normal`, not {v:?}"
                        )));
                    }
                }
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, durability))
}

/// Sets a connection up: foreign keys, the busy timeout, the statement cache and, on a file
/// (`durability` is given), WAL with checkpoints left to [`Checkpoints`].
fn configure(c: &Connection, durability: Option<Durability>) -> rusqlite::Result<()> {
    c.busy_timeout(BUSY_TIMEOUT)?;
    c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    c.execute_batch("PRAGMA foreign_keys = ON")?;
    if let Some(durability) = durability {
        c.execute_batch(match durability {
            Durability::Full => "PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0",
            Durability::Normal => "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0",
        })?;
        c.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens `sqlite://PATH` (the file is created, mode 0600, if missing) or `sqlite::memory:`.
    /// Call [`Store::migrate`] before use ([`super::open`] does).
    ///
    /// By default commits are not synced (the log is synced at each checkpoint): a power loss
    /// can lose the last acknowledged writes, never corrupt the file. `?synchronous=full` syncs
    /// every commit before it is answered.
    pub async fn connect(url: &str) -> Result<Self> {
        let (url, durability) = take_synchronous(url)?;
        let url = url.as_str();
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::Database("invalid SQLite database URL".into()))?;
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if in_memory {
            // One named in-memory database that sqlx's migrator can reach as well; it lives as
            // long as the store's one connection.
            let name = format!(
                "file:veil-memory-{}?mode=memory&cache=shared",
                Uuid::new_v4()
            );
            let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let c = Connection::open_with_flags(&name, flags).map_err(db_err)?;
            configure(&c, None).map_err(db_err)?;
            let conns = Arc::new(Conns::new(vec![c]));
            let migrate_url = SqliteConnectOptions::new()
                .filename(&name)
                .shared_cache(true)
                .foreign_keys(true);
            return Ok(Self {
                readers: conns.clone(),
                writer: conns,
                audits: Arc::default(),
                events: broadcast::channel(EVENT_CAPACITY).0,
                migrate_url: Arc::new(migrate_url),
                _checkpoints: None,
            });
        }
        let path = opts.get_filename().to_path_buf();
        create_private_file(&path)?;
        let open = || -> rusqlite::Result<Connection> {
            let c = Connection::open(&path)?;
            configure(&c, Some(durability))?;
            Ok(c)
        };
        // Switching a new file to WAL needs a moment alone with it; when another process
        // (or store) opens it at the same time, SQLite answers "busy" without waiting.
        let mut tries = 0u32;
        let writer = loop {
            match open().and_then(|c| {
                c.pragma_update(None, "journal_mode", "WAL")?;
                Ok(c)
            }) {
                Ok(c) => break c,
                Err(e) if is_busy(&e) && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(tries))).await;
                }
                Err(e) => return Err(db_err(e)),
            }
        };
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(open().map_err(db_err)?);
        }
        // `BEGIN IMMEDIATE` on the writer answers "busy" at once, and the store waits for the
        // lock without holding a thread.
        writer.busy_timeout(Duration::ZERO).map_err(db_err)?;
        let writer = Arc::new(Conns::with_group_commit(writer));
        let checkpoints = {
            let c = open().map_err(db_err)?;
            Checkpoints::start(c, Arc::clone(&writer))
        };
        let migrate_url = opts
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        Ok(Self {
            readers: Arc::new(Conns::new(readers)),
            writer,
            audits: Arc::default(),
            events: broadcast::channel(EVENT_CAPACITY).0,
            migrate_url: Arc::new(migrate_url),
            _checkpoints: checkpoints,
        })
    }

    /// A read connection (WAL readers run in parallel with the writer).
    async fn read(&self) -> Result<Conn> {
        self.readers.take().await
    }

    /// A write transaction holding SQLite's write lock from its first statement.
    async fn write(&self) -> Result<Tx> {
        self.writer.begin(BUSY_TIMEOUT).await
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
                tx.rollback();
                Err(e)
            }
        }
    }

    /// Commits, then publishes `events`.
    async fn commit_with(&self, tx: Tx, events: Vec<StoreEvent>) -> Result<()> {
        tx.commit().await?;
        for e in events {
            // An error only means that nobody is subscribed.
            let _ = self.events.send(e);
        }
        Ok(())
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

fn session_row(c: &Connection, id: Uuid) -> Result<SessionRow> {
    let row = query_as::<SessionRow>(concat!(
        "SELECT ",
        session_columns!(),
        " FROM sessions WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(c)
    .map_err(db_err)?;
    found(row, "session")
}

fn load_session(c: &Connection, row: SessionRow) -> Result<Session> {
    let miners: Vec<String> =
        query_scalar("SELECT miner FROM session_miners WHERE session_id = $1 ORDER BY position")
            .bind(row.id())
            .fetch_all(c)
            .map_err(db_err)?;
    row.into_session(miners)
}

fn insert_miners(c: &Connection, id: Uuid, p: &PrivacySetting) -> Result<()> {
    for (i, miner) in p.allowed_miners.iter().enumerate() {
        query("INSERT INTO session_miners (session_id, position, miner) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(i as i64)
            .bind(miner)
            .execute(c)
            .map_err(db_err)?;
    }
    Ok(())
}

fn task_row(c: &Connection, id: Uuid) -> Result<Task> {
    let row = query_as::<TaskRow>(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(c)
    .map_err(db_err)?;
    found(row, "task")?.into_task()
}

/// A lease and its task, in one statement.
fn lease_with_task(c: &Connection, lease_id: Uuid) -> Result<(LeaseRow, Task)> {
    let row = query_as::<sql::LeaseTaskRow>(sql::LEASE_WITH_TASK)
        .bind(lease_id)
        .fetch_optional(c)
        .map_err(db_err)?;
    found(row, "lease")?.split()
}

/// The lease, its task, checked to be held by `miner` and valid at `now_ms`.
fn active(c: &Connection, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<(LeaseRow, Task)> {
    let (lease, task) = lease_with_task(c, lease_id)?;
    lease.check_holder(miner)?;
    lease.check_active(&task, miner, now_ms)?;
    Ok((lease, task))
}

fn finish(
    c: &Connection,
    id: Uuid,
    state: TaskState,
    (code, message): (&str, &str),
    now_ms: i64,
) -> Result<Task> {
    let row = query_as::<TaskRow>(concat!(
        "UPDATE tasks SET state = $2, error_code = $3, error_message = $4, finished_at_ms = $5, \
         lease_expires_at_ms = NULL WHERE id = $1 RETURNING ",
        task_columns!()
    ))
    .bind(id)
    .bind(state.as_str())
    .bind(code)
    .bind(message)
    .bind(now_ms)
    .fetch_one(c)
    .map_err(db_err)?;
    refresh_due(c, sql::REFRESH_DUE_OF_TASK, id)?;
    row.into_task()
}

/// Recomputes when the blobs of a task ([`sql::REFRESH_DUE_OF_TASK`]) or of a session's tasks
/// ([`sql::REFRESH_DUE_OF_SESSION`]) are due for deletion, in the caller's transaction.
fn refresh_due(c: &Connection, statement: &'static str, id: Uuid) -> Result<()> {
    query(statement).bind(id).execute(c).map_err(db_err)?;
    Ok(())
}

/// Appends `e` to the audit hash chain inside the caller's transaction, so that it commits
/// with the change it records or not at all.
pub(super) fn append_audit(c: &Connection, e: &NewAuditEntry) -> Result<AuditEntry> {
    let mut out = append_audits(c, std::slice::from_ref(e))?;
    out.pop()
        .ok_or_else(|| StoreError::Database("audit entry not written".into()))
}

/// Appends `entries` to the audit hash chain inside the caller's transaction, in order.
pub(super) fn append_audits(c: &Connection, entries: &[NewAuditEntry]) -> Result<Vec<AuditEntry>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let head: Option<AuditHead> =
        query_as::<AuditHead>("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(c)
            .map_err(db_err)?;
    let (out, details) = sql::chain_audit_entries(head, entries)?;
    for (a, detail) in out.iter().zip(&details) {
        query(
            "INSERT INTO audit_log (seq, at_ms, actor, action, session_id, task_id, miner, \
             key_version, detail, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(a.seq)
        .bind(a.entry.at_ms)
        .bind(a.entry.actor.as_str())
        .bind(a.entry.action.as_str())
        .bind(a.entry.session_id)
        .bind(a.entry.task_id)
        .bind(a.entry.miner.as_deref())
        .bind(a.entry.key_version.map(i64::from))
        .bind(detail.as_str())
        .bind(&a.prev_hash[..])
        .bind(&a.hash[..])
        .execute(c)
        .map_err(insert_err("audit_entry"))?;
    }
    Ok(out)
}

/// Ends a transaction after its body: commits it when the body returns `(value, true)`, rolls
/// it back when it returns `(value, false)` (nothing to keep) or an error.
async fn end<T>(tx: Tx, r: Result<(T, bool)>) -> Result<T> {
    match r {
        Ok((value, true)) => {
            tx.commit().await?;
            Ok(value)
        }
        Ok((value, false)) => {
            tx.rollback();
            Ok(value)
        }
        Err(e) => {
            tx.rollback();
            Err(e)
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        // sqlx's migrator, on a connection of its own for the time it runs. SQLite has no
        // advisory locks: two processes migrating one file at once can collide on the first
        // run. The loser retries and then finds the migrations applied.
        let mut tries = 0;
        loop {
            let run = async {
                let mut c = self
                    .migrate_url
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                // sqlx's `Acquire` bound on a borrowed connection cannot be met inside a
                // `Send` future, so the migrator runs to completion on a blocking thread (once,
                // at start-up; the connection's own thread does the work).
                tokio::task::spawn_blocking(move || {
                    futures::executor::block_on(MIGRATOR.run(&mut c)).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            };
            match run.await {
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
        query("SELECT 1")
            .execute(&*self.read().await?)
            .map_err(db_err)?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    // --- sessions ---------------------------------------------------------------------------

    async fn create_session(&self, s: &NewSession) -> Result<Session> {
        let tx = self.write().await?;
        let r = (|| {
            query(
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
            .execute(&tx)
            .map_err(insert_err("session"))?;
            insert_miners(&tx, s.id, &s.privacy)?;
            let row = session_row(&tx, s.id)?;
            let session = load_session(&tx, row)?;
            Ok((session, Vec::new()))
        })();
        self.settle(tx, r).await
    }

    async fn get_session(&self, id: Uuid) -> Result<Session> {
        let row = query_as::<sql::SessionMinersRow>(concat!(
            "SELECT ",
            session_columns!(),
            ", (SELECT json_group_array(m.miner ORDER BY m.position) FROM session_miners m \
             WHERE m.session_id = sessions.id) AS miners FROM sessions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&*self.read().await?)
        .map_err(db_err)?;
        found(row, "session")?.into_session()
    }

    async fn list_sessions(
        &self,
        owner: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<Session>> {
        let conn = self.read().await?;
        let rows = query_as::<SessionRow>(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE owner = $1 AND ($2 IS NULL OR (created_at_ms, id) < \
             (SELECT created_at_ms, id FROM sessions WHERE id = $2)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $3"
        ))
        .bind(owner)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&conn)
        .map_err(db_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(load_session(&conn, row)?);
        }
        Ok(out)
    }

    async fn set_privacy(&self, id: Uuid, p: &PrivacySetting) -> Result<Session> {
        let tx = self.write().await?;
        let r = (|| {
            if session_row(&tx, id)?.is_closed() {
                return Err(sql::session_closed());
            }
            query("UPDATE sessions SET private = $2, allowlist_source = $3 WHERE id = $1")
                .bind(id)
                .bind(p.private)
                .bind(p.source.as_str())
                .execute(&tx)
                .map_err(db_err)?;
            query("DELETE FROM session_miners WHERE session_id = $1")
                .bind(id)
                .execute(&tx)
                .map_err(db_err)?;
            insert_miners(&tx, id, p)?;
            let row = session_row(&tx, id)?;
            let session = load_session(&tx, row)?;
            Ok((session, Vec::new()))
        })();
        self.settle(tx, r).await
    }

    async fn close_session(&self, id: Uuid, now_ms: i64) -> Result<u64> {
        let tx = self.write().await?;
        let r = (|| {
            if session_row(&tx, id)?.is_closed() {
                return Ok((0, Vec::new()));
            }
            query("UPDATE sessions SET closed_at_ms = $2 WHERE id = $1")
                .bind(id)
                .bind(now_ms)
                .execute(&tx)
                .map_err(db_err)?;
            let (code, message) = sql::SESSION_CLOSED;
            let cancelled: Vec<Uuid> = query_scalar(
                "UPDATE tasks SET state = 'cancelled', error_code = $2, error_message = $3, \
                 finished_at_ms = $4, lease_expires_at_ms = NULL \
                 WHERE session_id = $1 AND state IN ('queued', 'leased') RETURNING id",
            )
            .bind(id)
            .bind(code)
            .bind(message)
            .bind(now_ms)
            .fetch_all(&tx)
            .map_err(db_err)?;
            refresh_due(&tx, sql::REFRESH_DUE_OF_SESSION, id)?;
            let n = cancelled.len() as u64;
            let events = cancelled
                .into_iter()
                .map(|task_id| StoreEvent::TaskFinished { task_id })
                .collect();
            Ok((n, events))
        })();
        self.settle(tx, r).await
    }

    // --- API keys ---------------------------------------------------------------------------

    async fn create_api_key(&self, k: &NewApiKey) -> Result<ApiKey> {
        let tx = self.write().await?;
        let row = query_as::<ApiKeyRow>(concat!(
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
        .fetch_one(&tx)
        .map_err(insert_err("api_key"))?;
        tx.commit().await?;
        row.into_api_key()
    }

    async fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<ApiKey> {
        let row = query_as::<ApiKeyRow>(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE hash = $1"
        ))
        .bind(&hash[..])
        .fetch_optional(&*self.read().await?)
        .map_err(db_err)?;
        found(row, "api_key")?.into_api_key()
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        query_as::<ApiKeyRow>(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys ORDER BY created_at_ms, id"
        ))
        .fetch_all(&*self.read().await?)
        .map_err(db_err)?
        .into_iter()
        .map(ApiKeyRow::into_api_key)
        .collect()
    }

    async fn revoke_api_key(&self, id: Uuid, now_ms: i64) -> Result<ApiKey> {
        let tx = self.write().await?;
        let row = query_as::<ApiKeyRow>(concat!(
            "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1 \
             RETURNING ",
            api_key_columns!()
        ))
        .bind(id)
        .bind(now_ms)
        .fetch_optional(&tx)
        .map_err(db_err)?;
        tx.commit().await?;
        found(row, "api_key")?.into_api_key()
    }

    async fn set_default_session(&self, key_id: Uuid, session_id: Uuid) -> Result<()> {
        let tx = self.write().await?;
        let r = (|| {
            session_row(&tx, session_id)?;
            let done = query("UPDATE api_keys SET default_session = $2 WHERE id = $1")
                .bind(key_id)
                .bind(session_id)
                .execute(&tx)
                .map_err(db_err)?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound { what: "api_key" });
            }
            Ok(((), Vec::new()))
        })();
        self.settle(tx, r).await
    }

    async fn count_api_keys(&self) -> Result<u64> {
        let n: i64 = query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&*self.read().await?)
            .map_err(db_err)?;
        Ok(n.max(0) as u64)
    }

    // --- miners -----------------------------------------------------------------------------

    async fn create_miner_session(&self, m: &NewMinerSession) -> Result<()> {
        let tx = self.write().await?;
        query(
            "INSERT INTO miner_sessions (token_hash, miner, recipient, models, created_at_ms, \
             expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&m.token_hash[..])
        .bind(&m.miner)
        .bind(&m.recipient[..])
        .bind(sql::models_json(&m.models)?)
        .bind(m.created_at_ms)
        .bind(m.expires_at_ms)
        .execute(&tx)
        .map_err(insert_err("miner_session"))?;
        tx.commit().await?;
        Ok(())
    }

    async fn miner_session(&self, token_hash: &[u8; 32], now_ms: i64) -> Result<MinerSession> {
        let row = query_as::<MinerSessionRow>(
            "SELECT token_hash, miner, recipient, models, created_at_ms, expires_at_ms \
             FROM miner_sessions WHERE token_hash = $1 AND expires_at_ms > $2",
        )
        .bind(&token_hash[..])
        .bind(now_ms)
        .fetch_optional(&*self.read().await?)
        .map_err(db_err)?;
        found(row, "miner_session")?.into_miner_session()
    }

    async fn served_models(&self, now_ms: i64) -> Result<Vec<String>> {
        let rows: Vec<String> =
            query_scalar("SELECT models FROM miner_sessions WHERE expires_at_ms > $1")
                .bind(now_ms)
                .fetch_all(&*self.read().await?)
                .map_err(db_err)?;
        sql::served_models(rows)
    }

    // --- replay protection ------------------------------------------------------------------

    async fn use_nonce(&self, signer: &str, nonce: &[u8; 16], expires_at_ms: i64) -> Result<()> {
        let tx = self.write().await?;
        let done = query(
            "INSERT INTO nonces (signer, nonce, expires_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (signer, nonce) DO NOTHING",
        )
        .bind(signer)
        .bind(&nonce[..])
        .bind(expires_at_ms)
        .execute(&tx)
        .map_err(db_err)?;
        tx.commit().await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists { what: "nonce" });
        }
        Ok(())
    }

    async fn prune_nonces(&self, now_ms: i64) -> Result<u64> {
        let tx = self.write().await?;
        let done = query("DELETE FROM nonces WHERE expires_at_ms < $1")
            .bind(now_ms)
            .execute(&tx)
            .map_err(db_err)?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    // --- v3 read tokens -----------------------------------------------------------------------

    async fn create_read_token(&self, t: &ReadTokenRecord) -> Result<()> {
        let tx = self.write().await?;
        let done = query(sql::INSERT_READ_TOKEN)
            .bind(&t.token_hash[..])
            .bind(&t.owner)
            .bind(t.session_id)
            .bind(t.created_at_ms)
            .bind(t.expires_at_ms)
            .execute(&tx)
            .map_err(insert_err("read_token"))?;
        tx.commit().await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: "session" });
        }
        Ok(())
    }

    async fn read_token(&self, token_hash: &[u8; 32], now_ms: i64) -> Result<ReadTokenRecord> {
        let row = query_as::<ReadTokenRow>(sql::SELECT_READ_TOKEN)
            .bind(&token_hash[..])
            .bind(now_ms)
            .fetch_optional(&*self.read().await?)
            .map_err(db_err)?;
        found(row, "read_token")?.into_record()
    }

    async fn prune_read_tokens(&self, now_ms: i64) -> Result<u64> {
        let tx = self.write().await?;
        let done = query(sql::PRUNE_READ_TOKENS)
            .bind(now_ms)
            .execute(&tx)
            .map_err(db_err)?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    // --- per-caller request rates ---------------------------------------------------------------

    async fn take_rate(
        &self,
        caller: Uuid,
        now_us: i64,
        interval_us: i64,
        burst: u32,
    ) -> Result<Option<i64>> {
        let tolerance = sql::rate_tolerance(interval_us, burst);
        let tx = self.write().await?;
        let tat = query_scalar::<i64>("SELECT tat_us FROM rate_limits WHERE caller = $1")
            .bind(caller)
            .fetch_optional(&tx)
            .map_err(db_err)?;
        let start = tat.map_or(now_us, |t| t.max(now_us));
        if start - tolerance > now_us {
            // Refused: nothing to write (the transaction is rolled back when dropped).
            return Ok(Some(start - tolerance - now_us));
        }
        query(
            "INSERT INTO rate_limits (caller, tat_us) VALUES ($1, $2) \
             ON CONFLICT (caller) DO UPDATE SET tat_us = excluded.tat_us",
        )
        .bind(caller)
        .bind(start + interval_us)
        .execute(&tx)
        .map_err(db_err)?;
        tx.commit().await?;
        Ok(None)
    }

    async fn prune_rates(&self, now_us: i64) -> Result<u64> {
        let tx = self.write().await?;
        let done = query(sql::PRUNE_RATES)
            .bind(now_us)
            .execute(&tx)
            .map_err(db_err)?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    // --- tasks and the queue ----------------------------------------------------------------

    async fn enqueue(&self, t: &NewTask) -> Result<Task> {
        // One statement: the task goes in only while its session is open at `created_at_ms`.
        let tx = self.write().await?;
        let row = query_as::<TaskRow>(concat!(
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
        .fetch_optional(&tx)
        .map_err(insert_err("task"))?;
        tx.commit().await?;
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
        let row = query_as::<TaskRow>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&*self.read().await?)
        .map_err(db_err)?;
        found(row, "task")?.into_task()
    }

    async fn get_tasks(&self, ids: &[Uuid]) -> Result<Vec<Task>> {
        // Statements run in place here (no round trip each): one per id, on one connection.
        let conn = self.read().await?;
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) {
                continue;
            }
            match task_row(&conn, id) {
                Ok(t) => out.push(t),
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
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
        let any: Option<Uuid> = query_scalar(LEASE_CANDIDATE)
            .bind(&models)
            .bind(req.now_ms)
            .bind(&req.miner)
            .bind(req.skip_contract_sessions)
            .fetch_optional(&*self.read().await?)
            .map_err(db_err)?;
        if any.is_none() {
            return Ok(None);
        }
        let tx = self.write().await?;
        let expires = req.now_ms.saturating_add(req.ttl_ms);
        let r = (|| {
            let leased = query_as::<TaskRow>(concat!(
                "UPDATE tasks SET state = 'leased', attempts = attempts + 1, \
                 lease_id = $5, leased_by = $3, lease_expires_at_ms = $6 \
                 WHERE state = 'queued' AND id = (",
                lease_candidate!(),
                ") RETURNING ",
                task_columns!()
            ))
            .bind(models.as_str())
            .bind(req.now_ms)
            .bind(req.miner.as_str())
            .bind(req.skip_contract_sessions)
            .bind(req.lease_id)
            .bind(expires)
            .fetch_optional(&tx)
            .map_err(db_err)?;
            let Some(row) = leased else {
                // Taken meanwhile: nothing changed.
                return Ok((None, false));
            };
            let task = row.into_task()?;
            query(
                "INSERT INTO leases (lease_id, task_id, miner, attempt, created_at_ms, \
                 expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(req.lease_id)
            .bind(task.id)
            .bind(req.miner.as_str())
            .bind(i64::from(task.attempts))
            .bind(req.now_ms)
            .bind(expires)
            .execute(&tx)
            .map_err(insert_err("lease"))?;
            query(
                "INSERT INTO session_service (session_id, last_served) VALUES ($1, \
                 (SELECT COALESCE(MAX(last_served), 0) + 1 FROM session_service)) \
                 ON CONFLICT (session_id) DO UPDATE SET last_served = excluded.last_served",
            )
            .bind(task.session_id)
            .execute(&tx)
            .map_err(db_err)?;
            let leased = LeasedTask {
                lease_id: req.lease_id,
                lease_expires_at_ms: expires,
                attempt: task.attempts,
                task,
            };
            Ok((Some(leased), true))
        })();
        end(tx, r).await
    }

    async fn heartbeat(
        &self,
        lease_id: Uuid,
        miner: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<i64> {
        let tx = self.write().await?;
        let r = (|| {
            let (lease, task) = active(&tx, lease_id, miner, now_ms)?;
            let expires = now_ms.saturating_add(ttl_ms);
            query("UPDATE tasks SET lease_expires_at_ms = $2 WHERE id = $1")
                .bind(task.id)
                .bind(expires)
                .execute(&tx)
                .map_err(db_err)?;
            query("UPDATE leases SET expires_at_ms = $2 WHERE lease_id = $1")
                .bind(lease.lease_id)
                .bind(expires)
                .execute(&tx)
                .map_err(db_err)?;
            Ok((expires, Vec::new()))
        })();
        self.settle(tx, r).await
    }

    async fn active_lease(&self, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<LeasedTask> {
        // One statement: lease and task are seen together without a transaction.
        let (lease, task) = lease_with_task(&*self.read().await?, lease_id)?;
        lease.check_holder(miner)?;
        lease.check_active(&task, miner, now_ms)?;
        lease.leased_task(task)
    }

    async fn lease_record(&self, lease_id: Uuid, miner: &str) -> Result<LeaseRecord> {
        let row = query_as::<LeaseRow>(
            "SELECT lease_id, task_id, miner, attempt, expires_at_ms FROM leases \
             WHERE lease_id = $1",
        )
        .bind(lease_id)
        .fetch_optional(&*self.read().await?)
        .map_err(db_err)?;
        let lease = found(row, "lease")?;
        lease.check_holder(miner)?;
        lease.record()
    }

    async fn held_lease(&self, lease_id: Uuid, miner: &str) -> Result<(LeaseRecord, Task)> {
        let (lease, task) = lease_with_task(&*self.read().await?, lease_id)?;
        lease.check_holder(miner)?;
        Ok((lease.record()?, task))
    }

    async fn release(&self, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<()> {
        let tx = self.write().await?;
        let r = (|| {
            let (_, task) = active(&tx, lease_id, miner, now_ms)?;
            // A released attempt does not count against `max_attempts`.
            query(
                "UPDATE tasks SET state = 'queued', attempts = MAX(attempts - 1, 0), \
                 lease_expires_at_ms = NULL WHERE id = $1",
            )
            .bind(task.id)
            .execute(&tx)
            .map_err(db_err)?;
            let event = StoreEvent::TaskAvailable { model: task.model };
            Ok(((), vec![event]))
        })();
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
        let tx = self.write().await?;
        let r = (|| {
            let (_, task) = active(&tx, lease_id, miner, now_ms)?;
            finish(&tx, task.id, TaskState::Failed, (code, message), now_ms)?;
            let event = StoreEvent::TaskFinished { task_id: task.id };
            Ok(((), vec![event]))
        })();
        self.settle(tx, r).await
    }

    async fn complete(
        &self,
        lease_id: Uuid,
        miner: &str,
        r: &TaskResultRecord,
        now_ms: i64,
    ) -> Result<CompleteOutcome> {
        let tx = self.write().await?;
        let r = (|| {
            let (lease, task) = lease_with_task(&tx, lease_id)?;
            lease.check_holder(miner)?;
            if task.result.is_some() {
                return Ok((CompleteOutcome::Duplicate(task), false));
            }
            if task.state.is_final() {
                return Err(sql::task_final(task.state));
            }
            // Queued or leased, by this lease or a later one: the first result wins, including a
            // late one from a lease that lapsed.
            let row = query_as::<TaskRow>(concat!(
                "UPDATE tasks SET state = 'completed', result_urn = $2, result_hash = $3, \
                 result_size = $4, result_miner = $5, result_signature = $6, prompt_tokens = $7, \
                 completion_tokens = $8, finish_reason = $9, finished_at_ms = $10, \
                 lease_expires_at_ms = NULL WHERE id = $1 RETURNING ",
                task_columns!()
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
            .fetch_optional(&tx)
            .map_err(db_err)?;
            let row = found(row, "task")?;
            refresh_due(&tx, sql::REFRESH_DUE_OF_TASK, task.id)?;
            Ok((CompleteOutcome::Accepted(row.into_task()?), true))
        })();
        let outcome = end(tx, r).await?;
        if let CompleteOutcome::Accepted(task) = &outcome {
            let _ = self
                .events
                .send(StoreEvent::TaskFinished { task_id: task.id });
        }
        Ok(outcome)
    }

    async fn cancel(&self, id: Uuid, now_ms: i64) -> Result<Task> {
        let tx = self.write().await?;
        let r = (|| {
            let task = task_row(&tx, id)?;
            match task.state {
                TaskState::Cancelled => return Ok((task, Vec::new())),
                s if s.is_final() => return Err(sql::task_final(s)),
                _ => {}
            }
            let task = finish(&tx, id, TaskState::Cancelled, sql::CANCELLED, now_ms)?;
            let event = StoreEvent::TaskFinished { task_id: id };
            Ok((task, vec![event]))
        })();
        self.settle(tx, r).await
    }

    async fn reap(&self, now_ms: i64) -> Result<ReapReport> {
        let tx = self.write().await?;
        let r = (|| {
            let (code, message) = sql::DEADLINE_EXCEEDED;
            let deadline_failed: Vec<Uuid> = query_scalar(
                "UPDATE tasks SET state = 'failed', error_code = $2, error_message = $3, \
                 finished_at_ms = $1, lease_expires_at_ms = NULL \
                 WHERE state IN ('queued', 'leased') AND deadline_ms IS NOT NULL \
                 AND deadline_ms <= $1 RETURNING id",
            )
            .bind(now_ms)
            .bind(code)
            .bind(message)
            .fetch_all(&tx)
            .map_err(db_err)?;
            let (code, message) = sql::MAX_ATTEMPTS;
            let expired: Vec<(Uuid, String, String)> = query_as(
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
            .fetch_all(&tx)
            .map_err(db_err)?;
            let (report, events) = sql::reap_outcome(deadline_failed, expired);
            for &id in report.deadline_failed.iter().chain(&report.dead) {
                refresh_due(&tx, sql::REFRESH_DUE_OF_TASK, id)?;
            }
            Ok((report, events))
        })();
        self.settle(tx, r).await
    }

    async fn queue_depth(&self) -> Result<QueueDepth> {
        let rows: Vec<(String, i64)> = query_as(
            "SELECT state, COUNT(*) FROM tasks WHERE state IN ('queued', 'leased') GROUP BY state",
        )
        .fetch_all(&*self.read().await?)
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
        let tx = self.write().await?;
        let r = (|| {
            if session_row(&tx, id)?.is_closed() {
                return Err(sql::session_closed());
            }
            query(sql::SET_SESSION_POLICY)
                .bind(id)
                .bind(retention.delete_prompt_on_delivery)
                .bind(retention.prompt_ttl_ms())
                .bind(retention.result_ttl_ms())
                .bind(retention.delete_result_on_fetch)
                .bind(sealing.as_str())
                .execute(&tx)
                .map_err(db_err)?;
            refresh_due(&tx, sql::REFRESH_DUE_OF_SESSION, id)?;
            let row = session_row(&tx, id)?;
            let session = load_session(&tx, row)?;
            Ok((session, Vec::new()))
        })();
        self.settle(tx, r).await
    }

    async fn mark_delivered(&self, task_id: Uuid, now_ms: i64) -> Result<bool> {
        let tx = self.write().await?;
        let done = query(sql::MARK_DELIVERED)
            .bind(task_id)
            .bind(now_ms)
            .execute(&tx)
            .map_err(db_err)?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn due_deletions(&self, now_ms: i64, limit: u32) -> Result<Vec<DueDeletion>> {
        query_as::<sql::DueRow>(sql::DUE_DELETIONS)
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(&*self.read().await?)
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
        let tx = self.write().await?;
        let r = (|| {
            let done = query(sql::mark_deleted_sql(kind))
                .bind(task_id)
                .bind(now_ms)
                .bind(urn)
                .execute(&tx)
                .map_err(db_err)?;
            if done.rows_affected() != 1 {
                return Ok((false, false));
            }
            append_audit(&tx, audit)?;
            Ok((true, true))
        })();
        end(tx, r).await
    }

    // --- key lifecycle ------------------------------------------------------------------------

    async fn key_version_usage(&self) -> Result<Vec<super::KeyVersionUsage>> {
        query_as::<lifecycle::UsageRow>(lifecycle::KEY_VERSION_USAGE)
            .fetch_all(&*self.read().await?)
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
        query_as::<TaskRow>(lifecycle::REWRAP_CANDIDATES)
            .bind(i64::from(min_version))
            .bind(i64::from(target))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&*self.read().await?)
            .map_err(db_err)?
            .into_iter()
            .map(TaskRow::into_task)
            .collect()
    }

    async fn count_rewrap_candidates(&self, min_version: u32, target: u32) -> Result<u64> {
        let n: i64 = query_scalar(lifecycle::COUNT_REWRAP_CANDIDATES)
            .bind(i64::from(min_version))
            .bind(i64::from(target))
            .fetch_one(&*self.read().await?)
            .map_err(db_err)?;
        Ok(n.max(0) as u64)
    }

    async fn rewrap_begin(&self, r: &super::NewRewrap) -> Result<()> {
        let tx = self.write().await?;
        let res = query(lifecycle::REWRAP_BEGIN)
            .bind(r.id)
            .bind(r.task_id)
            .bind(i64::from(r.old_version))
            .bind(i64::from(r.new_version))
            .bind(r.started_at_ms)
            .execute(&tx)
            .map_err(insert_err("rewrap"))
            .map(|_| ((), Vec::new()));
        self.settle(tx, res).await
    }

    async fn rewrap_record_blob(&self, id: Uuid, kind: BlobKind, urn: &str) -> Result<bool> {
        let tx = self.write().await?;
        let res = query(lifecycle::rewrap_record_sql(kind))
            .bind(id)
            .bind(urn)
            .execute(&tx)
            .map_err(db_err)
            .map(|done| (done.rows_affected() == 1, Vec::new()));
        self.settle(tx, res).await
    }

    async fn rewrap_switch(&self, s: &super::RewrapSwitch, audit: &NewAuditEntry) -> Result<bool> {
        let binds = lifecycle::SwitchBinds::new(s)?;
        let tx = self.write().await?;
        let r = (|| {
            // The row first: a switch and an abandon of the same row are serialised on it.
            let state: Option<String> = query_scalar(REWRAP_STATE)
                .bind(s.rewrap_id)
                .fetch_optional(&tx)
                .map_err(db_err)?;
            if state.as_deref() != Some("pending") {
                return Ok((false, Vec::new()));
            }
            let done = lifecycle::bind_switch!(query(lifecycle::REWRAP_SWITCH_TASK), binds)
                .execute(&tx)
                .map_err(db_err)?;
            if done.rows_affected() != 1 {
                query(lifecycle::REWRAP_ABANDON)
                    .bind(s.rewrap_id)
                    .execute(&tx)
                    .map_err(db_err)?;
                return Ok((false, Vec::new()));
            }
            let (old_prompt, old_result, new_prompt, new_result) = lifecycle::SwitchBinds::moved(s);
            query(lifecycle::REWRAP_MARK_SWITCHED)
                .bind(s.rewrap_id)
                .bind(old_prompt)
                .bind(old_result)
                .bind(new_prompt)
                .bind(new_result)
                .execute(&tx)
                .map_err(db_err)?;
            append_audit(&tx, audit)?;
            Ok((true, Vec::new()))
        })();
        self.settle(tx, r).await
    }

    async fn rewrap_abandon(&self, id: Uuid) -> Result<Option<super::RewrapJournal>> {
        let tx = self.write().await?;
        let r = (|| {
            query(lifecycle::REWRAP_ABANDON)
                .bind(id)
                .execute(&tx)
                .map_err(db_err)?;
            let row = query_as::<lifecycle::RewrapRow>(lifecycle::REWRAP_ROW)
                .bind(id)
                .fetch_optional(&tx)
                .map_err(db_err)?;
            Ok((
                row.map(lifecycle::RewrapRow::into_journal).transpose()?,
                Vec::new(),
            ))
        })();
        self.settle(tx, r).await
    }

    async fn rewrap_journal(&self) -> Result<Vec<super::RewrapJournal>> {
        query_as::<lifecycle::RewrapRow>(lifecycle::REWRAP_JOURNAL)
            .fetch_all(&*self.read().await?)
            .map_err(db_err)?
            .into_iter()
            .map(lifecycle::RewrapRow::into_journal)
            .collect()
    }

    async fn rewrap_forget(&self, id: Uuid) -> Result<()> {
        let tx = self.write().await?;
        let res = query(lifecycle::REWRAP_FORGET)
            .bind(id)
            .execute(&tx)
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
                    let tx = store.write().await?;
                    let r = append_audits(&tx, &batch).map(|entries| (entries, true));
                    end(tx, r).await
                }
            })
            .await
    }

    async fn audit_entries(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>> {
        query_as::<AuditRow>(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&*self.read().await?)
        .map_err(db_err)?
        .into_iter()
        .map(AuditRow::into_entry)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated store on a file in a fresh directory.
    async fn file_store() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("veil.db");
        let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        (dir, path, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_reach_the_database_file_through_background_checkpoints() {
        // The connections leave checkpoints to the store's own task: without it, committed
        // pages would stay in the write-ahead log for as long as the store is open.
        let (dir, path, store) = file_store().await;
        store.use_nonce("0xabc", &[7; 16], i64::MAX).await.unwrap();
        let copy = dir.path().join("copy.db");
        for _ in 0..100 {
            tokio::time::sleep(CHECKPOINT_EVERY).await;
            // The database file alone, without its log.
            std::fs::copy(&path, &copy).unwrap();
            let c = Connection::open(&copy).unwrap();
            let n: rusqlite::Result<i64> =
                c.query_row("SELECT COUNT(*) FROM nonces", [], |r| r.get(0));
            if n == Ok(1) {
                return;
            }
        }
        panic!("the nonce never reached the database file");
    }

    #[tokio::test]
    async fn the_retention_sweep_reads_only_ranges_of_due_times() {
        let (_dir, _path, store) = file_store().await;
        let c = store.read().await.unwrap();
        let mut st = c
            .prepare(&format!("EXPLAIN QUERY PLAN {}", sql::DUE_DELETIONS))
            .unwrap();
        let plan: Vec<String> = st
            .query_map(rusqlite::params![1_i64, 100_i64], |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let plan = plan.join("\n");
        // Each half reads one range of its due-time index, and each blob's session by its key:
        // never a scan of a table or of a whole index, nothing read per session.
        let reads: Vec<&str> = plan
            .lines()
            .filter(|l| l.contains("SCAN") || l.contains("SEARCH"))
            .collect();
        assert_eq!(reads.len(), 4, "{plan}");
        for l in &reads {
            assert!(
                l.starts_with("SEARCH t USING INDEX tasks_prompt_due (prompt_due_at_ms>? AND prompt_due_at_ms<?)")
                    || l.starts_with("SEARCH t USING INDEX tasks_result_due (result_due_at_ms>? AND result_due_at_ms<?)")
                    || l.starts_with("SEARCH s USING INDEX sqlite_autoindex_sessions_1 (id=?)"),
                "{l}\n{plan}"
            );
        }
        drop(st);
        drop(c);

        // Tasks that ended before migration 0006 get their due times from it: 20 sessions
        // with TTLs (half deleting results on fetch), 50 finished tasks each, none delivered.
        {
            let w = store.writer.take().await.unwrap();
            w.execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20) \
                 INSERT INTO sessions (id, owner, kind, private, allowlist_source, \
                   created_at_ms, prompt_on_delivery, prompt_ttl_ms, result_ttl_ms, \
                   result_on_fetch) \
                 SELECT randomblob(16), 'o', 'pooled', 0, 'router', 0, 1, 86400000, 86400000, \
                   i % 2 FROM n; \
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) \
                 INSERT INTO tasks (id, session_id, prompt_urn, prompt_hash, prompt_scope, \
                   key_version, model, params, state, attempts, max_attempts, created_at_ms, \
                   submitted_by, result_urn, result_hash, result_size, finished_at_ms) \
                 SELECT randomblob(16), s.id, 'urn:p', zeroblob(32), 2, 1, 'm', '{}', \
                   'completed', 1, 3, 1000000 + i, 'o', 'urn:r', zeroblob(32), 1, 1000000 + i \
                 FROM sessions s, n;",
            )
            .unwrap();
            w.execute_batch(&sql::backfill(include_str!(
                "../../migrations/sqlite/0006_retention_due_times.sql"
            )))
            .unwrap();
        }
        sql::assert_backfilled_due_times(&store, 20).await;
    }

    #[tokio::test]
    async fn commits_are_synced_when_the_url_says_synchronous_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("veil.db");
        let synchronous = |store: SqliteStore| async move {
            let w = store.writer.take().await.unwrap();
            w.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
                .unwrap()
        };
        let url = format!("sqlite://{}", path.display());
        // 2 is FULL, 1 NORMAL.
        let store = SqliteStore::connect(&url).await.unwrap();
        assert_eq!(synchronous(store).await, 1);
        let store = SqliteStore::connect(&format!("{url}?synchronous=full"))
            .await
            .unwrap();
        assert_eq!(synchronous(store).await, 2);
        // With sqlx's own parameters beside it.
        let store = SqliteStore::connect(&format!("{url}?mode=rwc&synchronous=NORMAL"))
            .await
            .unwrap();
        assert_eq!(synchronous(store).await, 1);
        let store = SqliteStore::connect(&format!("{url}?synchronous=full&mode=rwc"))
            .await
            .unwrap();
        assert_eq!(synchronous(store).await, 2);
        let e = SqliteStore::connect(&format!("{url}?synchronous=off"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("`synchronous`"), "{e}");
    }

    // A current-thread runtime: a write that waited in SQLite's busy handler would stop the
    // ticks below for as long as it waited.
    #[tokio::test]
    async fn a_write_waits_for_another_process_lock_without_holding_the_thread() {
        let (_dir, path, store) = file_store().await;
        // Another connection, standing in for another process, holds the write lock a while.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let hold = Duration::from_millis(400);
        let release = std::thread::spawn(move || {
            std::thread::sleep(hold);
            other.execute_batch("COMMIT").unwrap();
        });
        let started = std::time::Instant::now();
        let write = tokio::spawn({
            let store = store.clone();
            async move { store.use_nonce("0xabc", &[1; 16], i64::MAX).await }
        });
        let mut ticks = 0;
        while !write.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ticks += 1;
        }
        write.await.unwrap().unwrap();
        release.join().unwrap();
        assert!(started.elapsed() >= hold, "the write waited for the lock");
        assert!(
            ticks >= 10,
            "the thread ran other tasks meanwhile ({ticks} ticks)"
        );
    }
}
