//! The scale-out store: PostgreSQL, shared by several router replicas.
//!
//! Leasing picks a row with `FOR UPDATE SKIP LOCKED`, so concurrent leasers on any replica take
//! different tasks without waiting for each other; other state changes lock the task row they
//! change. Lock order is always session row, then task rows, then `session_service`, so replicas
//! cannot deadlock. Appends to the audit chain are serialised by a transaction-scoped advisory
//! lock. Events go out with `NOTIFY` inside the transaction that causes them (so they are sent on
//! commit only) and are published on this replica at once; a background task `LISTEN`s and
//! re-publishes other replicas' events, reconnecting when its connection drops.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
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

use super::group::AuditGroup;
use super::lifecycle;

/// The state of a rewrap journal row, locked until the transaction ends (where the backend
/// locks rows; SQLite's write transactions are exclusive anyway).
const REWRAP_STATE: &str = "SELECT state FROM key_rewraps WHERE id = $1 FOR UPDATE";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per replica.
const MAX_CONNECTIONS: u32 = 16;
/// How long a request waits for a free connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Buffered events per subscriber before it lags.
const EVENT_CAPACITY: usize = 1024;
/// The `NOTIFY` channel of store events.
const CHANNEL: &str = "veil_store_events";
/// Advisory lock key serialising audit appends across replicas ("veilaudt").
const AUDIT_LOCK: i64 = 0x7665_696c_6175_6474;
/// Longest wait between attempts to re-establish the `LISTEN` connection.
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(5);

/// [`Store`] on PostgreSQL; several replicas may share one database.
#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Audit appends waiting to share a transaction.
    audits: Arc<AuditGroup>,
    events: broadcast::Sender<StoreEvent>,
    /// Tags this replica's notifications so that its listener skips them (they were published
    /// locally already).
    origin: Uuid,
    _listener: ListenerTask,
}

/// The `LISTEN` task; stopped when the store is dropped.
#[derive(Debug)]
struct ListenerTask(tokio::task::JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgStore {
    /// A lease and its task. Reads only: one statement sees both in one snapshot, without
    /// locks.
    async fn lease_with_task(&self, lease_id: Uuid) -> Result<(LeaseRow, Task)> {
        let row = sqlx::query_as::<_, sql::LeaseTaskRow>(sql::LEASE_WITH_TASK)
            .bind(lease_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        found(row, "lease")?.split()
    }

    /// Connects to `postgres://…` and starts listening for other replicas' events. Call
    /// [`Store::migrate`] before use ([`super::open`] does).
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No round trip to the server before each use: a connection that died while idle
            // fails its next statement (one failed request) and sqlx's check when it is given
            // back removes it from the pool.
            .test_before_acquire(false)
            .connect(url)
            .await
            .map_err(db_err)?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let origin = Uuid::new_v4();
        let listener = ListenerTask(tokio::spawn(listen(pool.clone(), events.clone(), origin)));
        Ok(Self {
            pool,
            audits: Arc::default(),
            events,
            origin,
            _listener: listener,
        })
    }

    async fn write(&self) -> Result<Tx> {
        self.pool.begin().await.map_err(db_err)
    }

    /// Ends a transaction: commits it and publishes the events of a successful body, or rolls
    /// it back at once after an error (a dropped transaction would keep its row locks until the
    /// pool gets round to resetting the connection, and leasers would skip those rows).
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

    /// Sends `events` to the other replicas (on commit) and commits, then publishes them here.
    async fn commit_with(&self, mut tx: Tx, events: Vec<StoreEvent>) -> Result<()> {
        if !events.is_empty() {
            let payloads: Vec<String> = events.iter().map(|e| encode(self.origin, e)).collect();
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(CHANNEL)
                .bind(payloads)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        commit(tx).await?;
        for e in events {
            // An error only means that nobody is subscribed here.
            let _ = self.events.send(e);
        }
        Ok(())
    }
}

/// An event as a `NOTIFY` payload: `{"o": origin, "available": model}` or
/// `{"o": origin, "finished": task id}`.
fn encode(origin: Uuid, e: &StoreEvent) -> String {
    match e {
        StoreEvent::TaskAvailable { model } => {
            serde_json::json!({ "o": origin, "available": model })
        }
        StoreEvent::TaskFinished { task_id } => {
            serde_json::json!({ "o": origin, "finished": task_id })
        }
    }
    .to_string()
}

fn decode(payload: &str) -> Option<(Uuid, StoreEvent)> {
    #[derive(serde::Deserialize)]
    struct Payload {
        o: Uuid,
        available: Option<String>,
        finished: Option<Uuid>,
    }
    let p: Payload = serde_json::from_str(payload).ok()?;
    let event = match (p.available, p.finished) {
        (Some(model), None) => StoreEvent::TaskAvailable { model },
        (None, Some(task_id)) => StoreEvent::TaskFinished { task_id },
        _ => return None,
    };
    Some((p.o, event))
}

/// Re-publishes other replicas' events until the store is dropped, reconnecting with backoff.
async fn listen(pool: PgPool, events: broadcast::Sender<StoreEvent>, origin: Uuid) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %db_err(e), "store events: cannot connect; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %db_err(e), "store events: LISTEN failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
            continue;
        }
        backoff = Duration::from_millis(100);
        if !first {
            catch_up(&pool, &events).await;
        }
        first = false;
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => match decode(n.payload()) {
                    Some((from, event)) if from != origin => {
                        let _ = events.send(event);
                    }
                    Some(_) => {}
                    None => tracing::debug!("store events: ignoring a malformed notification"),
                },
                // The connection dropped and the listener reconnected (it re-subscribes):
                // whatever was sent meanwhile is lost.
                Ok(None) => {
                    tracing::warn!("store events: connection lost; reconnected");
                    catch_up(&pool, &events).await;
                }
                Err(e) => {
                    tracing::warn!(error = %db_err(e), "store events: listener failed; reconnect");
                    break;
                }
            }
        }
    }
}

/// After a gap in listening, wakes this replica's waiters for every model that has queued
/// tasks, in case a `TaskAvailable` was missed. (Missed `TaskFinished` events are covered by
/// waiters' own timeouts.)
async fn catch_up(pool: &PgPool, events: &broadcast::Sender<StoreEvent>) {
    let models: Vec<String> =
        match sqlx::query_scalar("SELECT DISTINCT model FROM tasks WHERE state = 'queued'")
            .fetch_all(pool)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %db_err(e), "store events: catch-up query failed");
                return;
            }
        };
    for model in models {
        let _ = events.send(StoreEvent::TaskAvailable { model });
    }
}

type Tx = Transaction<'static, Postgres>;

/// The session row, locked against changes (`FOR UPDATE`) or only against closing while a
/// task is added (`FOR SHARE`).
async fn session_row(tx: &mut Tx, id: Uuid, exclusive: bool) -> Result<SessionRow> {
    let query = if exclusive {
        concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE id = $1 FOR UPDATE"
        )
    } else {
        concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE id = $1 FOR SHARE"
        )
    };
    let row = sqlx::query_as::<_, SessionRow>(query)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_err)?;
    found(row, "session")
}

/// A session row with its allowed miners in order, as a JSON array, read in one statement
/// (`… FROM sessions WHERE …`).
macro_rules! session_with_miners {
    () => {
        concat!(
            "SELECT ",
            session_columns!(),
            ", COALESCE((SELECT json_agg(m.miner ORDER BY m.position) FROM session_miners m \
             WHERE m.session_id = sessions.id), '[]')::text AS miners FROM sessions"
        )
    };
}

/// One session with its allowed miners, in one statement.
async fn load_session<'e, E>(ex: E, id: Uuid) -> Result<Session>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let row = sqlx::query_as::<_, sql::SessionMinersRow>(concat!(
        session_with_miners!(),
        " WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await
    .map_err(db_err)?;
    found(row, "session")?.into_session()
}

/// Stores the allowed miners in order, in one statement whatever their number.
async fn insert_miners(tx: &mut Tx, id: Uuid, p: &PrivacySetting) -> Result<()> {
    if p.allowed_miners.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO session_miners (session_id, position, miner) \
         SELECT $1, u.position - 1, u.miner FROM unnest($2::text[]) WITH ORDINALITY AS u(miner, position)",
    )
    .bind(id)
    .bind(&p.allowed_miners)
    .execute(&mut **tx)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// The task row, locked for update.
async fn task_row(tx: &mut Tx, id: Uuid) -> Result<Task> {
    let row = sqlx::query_as::<_, TaskRow>(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_err)?;
    found(row, "task")?.into_task()
}

async fn lease_row(tx: &mut Tx, lease_id: Uuid) -> Result<LeaseRow> {
    let row = sqlx::query_as::<_, LeaseRow>(
        "SELECT lease_id, task_id, miner, attempt, expires_at_ms FROM leases WHERE lease_id = $1",
    )
    .bind(lease_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_err)?;
    found(row, "lease")
}

/// The lease, its task, checked to be held by `miner` and valid at `now_ms`.
async fn active(tx: &mut Tx, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<(LeaseRow, Task)> {
    let lease = lease_row(tx, lease_id).await?;
    lease.check_holder(miner)?;
    let task = task_row(tx, lease.task_id).await?;
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
    refresh_due(tx, sql::REFRESH_DUE_OF_TASK, id).await?;
    row.into_task()
}

/// Recomputes when the blobs of a task ([`sql::REFRESH_DUE_OF_TASK`]) or of a session's tasks
/// ([`sql::REFRESH_DUE_OF_SESSION`]) are due for deletion, in the caller's transaction.
async fn refresh_due(tx: &mut Tx, statement: &'static str, id: Uuid) -> Result<()> {
    sqlx::query(statement)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Appends `e` to the audit hash chain inside `tx`, so that it commits with the change it
/// records or not at all.
pub(super) async fn append_audit(tx: &mut Tx, e: &NewAuditEntry) -> Result<AuditEntry> {
    let mut out = append_audits(tx, std::slice::from_ref(e)).await?;
    out.pop()
        .ok_or_else(|| StoreError::Database("audit entry not written".into()))
}

/// Appends `entries` to the audit hash chain inside `tx`, in order, with one insert.
pub(super) async fn append_audits(
    tx: &mut Tx,
    entries: &[NewAuditEntry],
) -> Result<Vec<AuditEntry>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    // One appender at a time across all replicas, until this transaction ends.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(AUDIT_LOCK)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
    let head: Option<AuditHead> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_err)?;
    let (out, details) = sql::chain_audit_entries(head, entries)?;
    let mut insert = sqlx::QueryBuilder::<Postgres>::new(
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
    insert
        .build()
        .execute(&mut **tx)
        .await
        .map_err(insert_err("audit_entry"))?;
    Ok(out)
}

async fn commit(tx: Tx) -> Result<()> {
    tx.commit().await.map_err(db_err)
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> Result<()> {
        // The migrator holds a PostgreSQL advisory lock while it runs, so replicas starting
        // together apply each migration once.
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
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
            let session = load_session(&mut *tx, s.id).await?;
            Ok((session, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn get_session(&self, id: Uuid) -> Result<Session> {
        load_session(&self.pool, id).await
    }

    async fn list_sessions(
        &self,
        owner: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<Session>> {
        sqlx::query_as::<_, sql::SessionMinersRow>(concat!(
            session_with_miners!(),
            " WHERE owner = $1 AND ($2 IS NULL OR (created_at_ms, id) < \
             (SELECT created_at_ms, id FROM sessions WHERE id = $2)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $3"
        ))
        .bind(owner)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(sql::SessionMinersRow::into_session)
        .collect()
    }

    async fn set_privacy(&self, id: Uuid, p: &PrivacySetting) -> Result<Session> {
        let mut tx = self.write().await?;
        let r = async {
            if session_row(&mut tx, id, true).await?.is_closed() {
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
            let session = load_session(&mut *tx, id).await?;
            Ok((session, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn close_session(&self, id: Uuid, now_ms: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let r = async {
            if session_row(&mut tx, id, true).await?.is_closed() {
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
            refresh_due(&mut tx, sql::REFRESH_DUE_OF_SESSION, id).await?;
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
        .fetch_one(&self.pool)
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
        .fetch_optional(&self.pool)
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
        .fetch_all(&self.pool)
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
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        found(row, "api_key")?.into_api_key()
    }

    async fn set_default_session(&self, key_id: Uuid, session_id: Uuid) -> Result<()> {
        let mut tx = self.write().await?;
        let r = async {
            session_row(&mut tx, session_id, false).await?;
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
            .fetch_one(&self.pool)
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
        .execute(&self.pool)
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
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        found(row, "miner_session")?.into_miner_session()
    }

    async fn served_models(&self, now_ms: i64) -> Result<Vec<String>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT models FROM miner_sessions WHERE expires_at_ms > $1")
                .bind(now_ms)
                .fetch_all(&self.pool)
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
        .execute(&self.pool)
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
            .execute(&self.pool)
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
            .execute(&self.pool)
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
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        found(row, "read_token")?.into_record()
    }

    async fn prune_read_tokens(&self, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(sql::PRUNE_READ_TOKENS)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    // --- per-caller request rates ---------------------------------------------------------------

    fn shared(&self) -> bool {
        true
    }

    async fn take_rate(
        &self,
        caller: Uuid,
        now_us: i64,
        interval_us: i64,
        burst: u32,
    ) -> Result<Option<i64>> {
        let tolerance = sql::rate_tolerance(interval_us, burst);
        // One statement: the upsert's condition is checked against the row as it is once
        // locked (concurrent requests of the caller on any replica queue on it); the time
        // read beside it only sizes the wait of a refusal.
        let (admitted, tat): (bool, Option<i64>) = sqlx::query_as(
            "WITH cur AS (SELECT tat_us FROM rate_limits WHERE caller = $1), \
             up AS (INSERT INTO rate_limits (caller, tat_us) VALUES ($1, $2 + $3) \
                    ON CONFLICT (caller) DO UPDATE \
                    SET tat_us = GREATEST(rate_limits.tat_us, $2) + $3 \
                    WHERE GREATEST(rate_limits.tat_us, $2) - $4 <= $2 \
                    RETURNING tat_us) \
             SELECT EXISTS (SELECT 1 FROM up), (SELECT tat_us FROM cur)",
        )
        .bind(caller)
        .bind(now_us)
        .bind(interval_us)
        .bind(tolerance)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        Ok((!admitted).then(|| {
            tat.map_or(interval_us, |t| t.max(now_us) - tolerance - now_us)
                .max(1)
        }))
    }

    async fn prune_rates(&self, now_us: i64) -> Result<u64> {
        let done = sqlx::query(sql::PRUNE_RATES)
            .bind(now_us)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    // --- tasks and the queue ----------------------------------------------------------------

    async fn enqueue(&self, t: &NewTask) -> Result<Task> {
        let mut tx = self.write().await?;
        let r = async {
            if !session_row(&mut tx, t.session_id, false)
                .await?
                .is_open(t.created_at_ms)
            {
                return Err(sql::session_closed());
            }
            let row = sqlx::query_as::<_, TaskRow>(concat!(
                "INSERT INTO tasks (id, session_id, prompt_urn, prompt_hash, prompt_scope, \
                 key_version, model, params, state, attempts, max_attempts, created_at_ms, \
                 deadline_ms, submitted_by, sealed_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', 0, $9, $10, $11, $12, $13) \
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
            .fetch_one(&mut *tx)
            .await
            .map_err(insert_err("task"))?;
            let task = row.into_task()?;
            let event = StoreEvent::TaskAvailable {
                model: task.model.clone(),
            };
            Ok((task, vec![event]))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn get_task(&self, id: Uuid) -> Result<Task> {
        let row = sqlx::query_as::<_, TaskRow>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        found(row, "task")?.into_task()
    }

    async fn get_tasks(&self, ids: &[Uuid]) -> Result<Vec<Task>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_as::<_, TaskRow>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(TaskRow::into_task)
        .collect()
    }

    async fn lease(&self, req: &LeaseQuery) -> Result<Option<LeasedTask>> {
        if req.models.is_empty() {
            return Ok(None);
        }
        let mut tx = self.write().await?;
        let r = async {
            // Least recently served session first (never served = 0), then FIFO by `seq`.
            let candidate: Option<Uuid> = sqlx::query_scalar(
                "SELECT t.id FROM tasks t \
                 JOIN sessions s ON s.id = t.session_id \
                 LEFT JOIN session_service ss ON ss.session_id = t.session_id \
                 WHERE t.state = 'queued' \
                   AND t.model = ANY($1) \
                   AND (t.deadline_ms IS NULL OR t.deadline_ms > $2) \
                   AND s.closed_at_ms IS NULL \
                   AND (s.expires_at_ms IS NULL OR s.expires_at_ms > $2) \
                   AND (NOT s.private OR EXISTS (SELECT 1 FROM session_miners m \
                        WHERE m.session_id = s.id AND m.miner = $3)) \
                   AND NOT ($4 AND s.allowlist_source = 'contract') \
                 ORDER BY COALESCE(ss.last_served, 0), t.seq LIMIT 1 \
                 FOR UPDATE OF t SKIP LOCKED",
            )
            .bind(&req.models)
            .bind(req.now_ms)
            .bind(&req.miner)
            .bind(req.skip_contract_sessions)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
            let Some(task_id) = candidate else {
                return Ok((None, Vec::new()));
            };
            let expires = req.now_ms.saturating_add(req.ttl_ms);
            let task = sqlx::query_as::<_, TaskRow>(concat!(
                "UPDATE tasks SET state = 'leased', attempts = attempts + 1, lease_id = $2, \
                 leased_by = $3, lease_expires_at_ms = $4 WHERE id = $1 AND state = 'queued' \
                 RETURNING ",
                task_columns!()
            ))
            .bind(task_id)
            .bind(req.lease_id)
            .bind(&req.miner)
            .bind(expires)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?
            .into_task()?;
            sqlx::query(
                "INSERT INTO leases (lease_id, task_id, miner, attempt, created_at_ms, \
                 expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(req.lease_id)
            .bind(task.id)
            .bind(&req.miner)
            .bind(i64::from(task.attempts))
            .bind(req.now_ms)
            .bind(expires)
            .execute(&mut *tx)
            .await
            .map_err(insert_err("lease"))?;
            sqlx::query(
                "INSERT INTO session_service (session_id, last_served) \
                 VALUES ($1, nextval('service_counter')) \
                 ON CONFLICT (session_id) DO UPDATE SET last_served = excluded.last_served",
            )
            .bind(task.session_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            let leased = LeasedTask {
                lease_id: req.lease_id,
                lease_expires_at_ms: expires,
                attempt: task.attempts,
                task,
            };
            Ok((Some(leased), Vec::new()))
        }
        .await;
        self.settle(tx, r).await
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
        let (lease, task) = self.lease_with_task(lease_id).await?;
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
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        let lease = found(row, "lease")?;
        lease.check_holder(miner)?;
        lease.record()
    }

    async fn held_lease(&self, lease_id: Uuid, miner: &str) -> Result<(LeaseRecord, Task)> {
        let (lease, task) = self.lease_with_task(lease_id).await?;
        lease.check_holder(miner)?;
        Ok((lease.record()?, task))
    }

    async fn release(&self, lease_id: Uuid, miner: &str, now_ms: i64) -> Result<()> {
        let mut tx = self.write().await?;
        let r = async {
            let (_, task) = active(&mut tx, lease_id, miner, now_ms).await?;
            // A released attempt does not count against `max_attempts`.
            sqlx::query(
                "UPDATE tasks SET state = 'queued', attempts = GREATEST(attempts - 1, 0), \
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
        let mut tx = self.write().await?;
        let r = async {
            let lease = lease_row(&mut tx, lease_id).await?;
            lease.check_holder(miner)?;
            let task = task_row(&mut tx, lease.task_id).await?;
            if task.result.is_some() {
                return Ok((CompleteOutcome::Duplicate(task), Vec::new()));
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
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            refresh_due(&mut tx, sql::REFRESH_DUE_OF_TASK, task.id).await?;
            let task = row.into_task()?;
            let event = StoreEvent::TaskFinished { task_id: task.id };
            Ok((CompleteOutcome::Accepted(task), vec![event]))
        }
        .await;
        self.settle(tx, r).await
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
                "WITH due AS (SELECT id FROM tasks WHERE state IN ('queued', 'leased') \
                   AND deadline_ms IS NOT NULL AND deadline_ms <= $1 FOR UPDATE SKIP LOCKED) \
                 UPDATE tasks t SET state = 'failed', error_code = $2, error_message = $3, \
                   finished_at_ms = $1, lease_expires_at_ms = NULL \
                 FROM due WHERE t.id = due.id RETURNING t.id",
            )
            .bind(now_ms)
            .bind(code)
            .bind(message)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            let (code, message) = sql::MAX_ATTEMPTS;
            let expired: Vec<(Uuid, String, String)> = sqlx::query_as(
                "WITH due AS (SELECT id FROM tasks WHERE state = 'leased' \
                   AND lease_expires_at_ms <= $1 FOR UPDATE SKIP LOCKED) \
                 UPDATE tasks t SET \
                   state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END, \
                   error_code = CASE WHEN attempts >= max_attempts THEN $2 ELSE error_code END, \
                   error_message = \
                     CASE WHEN attempts >= max_attempts THEN $3 ELSE error_message END, \
                   finished_at_ms = \
                     CASE WHEN attempts >= max_attempts THEN $1 ELSE finished_at_ms END, \
                   lease_expires_at_ms = NULL \
                 FROM due WHERE t.id = due.id RETURNING t.id, t.state, t.model",
            )
            .bind(now_ms)
            .bind(code)
            .bind(message)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            let (report, events) = sql::reap_outcome(deadline_failed, expired);
            for &id in report.deadline_failed.iter().chain(&report.dead) {
                refresh_due(&mut tx, sql::REFRESH_DUE_OF_TASK, id).await?;
            }
            Ok((report, events))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn queue_depth(&self) -> Result<QueueDepth> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, COUNT(*) FROM tasks WHERE state IN ('queued', 'leased') GROUP BY state",
        )
        .fetch_all(&self.pool)
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
            if session_row(&mut tx, id, true).await?.is_closed() {
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
            refresh_due(&mut tx, sql::REFRESH_DUE_OF_SESSION, id).await?;
            let session = load_session(&mut *tx, id).await?;
            Ok((session, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    async fn mark_delivered(&self, task_id: Uuid, now_ms: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        let r = sqlx::query(sql::MARK_DELIVERED)
            .bind(task_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(db_err)
            .map(|done| (done.rows_affected() == 1, Vec::new()));
        self.settle(tx, r).await
    }

    async fn due_deletions(&self, now_ms: i64, limit: u32) -> Result<Vec<DueDeletion>> {
        sqlx::query_as::<_, sql::DueRow>(sql::DUE_DELETIONS)
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
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
        let mut tx = self.write().await?;
        let r = async {
            let done = sqlx::query(sql::mark_deleted_sql(kind))
                .bind(task_id)
                .bind(now_ms)
                .bind(urn)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            if done.rows_affected() != 1 {
                return Ok((false, Vec::new()));
            }
            append_audit(&mut tx, audit).await?;
            Ok((true, Vec::new()))
        }
        .await;
        self.settle(tx, r).await
    }

    // --- key lifecycle ------------------------------------------------------------------------

    async fn key_version_usage(&self) -> Result<Vec<super::KeyVersionUsage>> {
        sqlx::query_as::<_, lifecycle::UsageRow>(lifecycle::KEY_VERSION_USAGE)
            .fetch_all(&self.pool)
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
            .fetch_all(&self.pool)
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
            .fetch_one(&self.pool)
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
            .fetch_all(&self.pool)
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
                let pool = self.pool.clone();
                async move {
                    let mut tx = pool.begin().await.map_err(db_err)?;
                    match append_audits(&mut tx, &batch).await {
                        Ok(entries) => {
                            commit(tx).await?;
                            Ok(entries)
                        }
                        Err(e) => {
                            let _ = tx.rollback().await;
                            Err(e)
                        }
                    }
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
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(AuditRow::into_entry)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use veil_testkit::postgres::TestDatabase;

    /// The reads of a table in a plan: (node type, index name, index condition), where a bitmap
    /// heap scan reports its bitmap index scan's index and condition.
    fn reads(node: &Value, table: &str, out: &mut Vec<(String, String, String)>) {
        let kind = node["Node Type"].as_str().unwrap_or_default();
        if node["Relation Name"] == table {
            let index = match kind {
                "Bitmap Heap Scan" => &node["Plans"][0],
                _ => node,
            };
            out.push((
                kind.to_owned(),
                index["Index Name"].as_str().unwrap_or_default().to_owned(),
                index["Index Cond"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            reads(child, table, out);
        }
    }

    #[tokio::test]
    async fn the_retention_sweep_reads_only_ranges_of_due_times() {
        let db = TestDatabase::create().await;
        let store = PgStore::connect(db.url()).await.unwrap();
        store.migrate().await.unwrap();
        // 2,000 sessions with every rule, 50 finished tasks each whose blobs are kept and not
        // yet due (due times a day ahead): a pass must read neither every session nor every
        // kept blob.
        sqlx::query(
            "INSERT INTO sessions (id, owner, kind, private, allowlist_source, created_at_ms, \
             prompt_on_delivery, prompt_ttl_ms, result_ttl_ms, result_on_fetch) \
             SELECT gen_random_uuid(), 'o', 'pooled', false, 'router', 0, true, 86400000, \
             86400000, g % 2 = 0 FROM generate_series(1, 2000) g",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO tasks (id, session_id, prompt_urn, prompt_hash, prompt_scope, \
             key_version, model, params, state, max_attempts, created_at_ms, submitted_by, \
             result_urn, result_hash, result_size, finished_at_ms) \
             SELECT gen_random_uuid(), s.id, 'urn:p', decode(repeat('00', 32), 'hex'), 2, 1, \
             'm', '{}', 'completed', 3, 1000000 + g, 'o', 'urn:r', \
             decode(repeat('00', 32), 'hex'), 1, 1000000 + g \
             FROM sessions s, generate_series(1, 50) g",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        // Due times as migration 0006 sets them for tasks that ended before it.
        sqlx::query(sqlx::AssertSqlSafe(sql::backfill(include_str!(
            "../../migrations/postgres/0006_retention_due_times.sql"
        ))))
        .execute(&store.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE").execute(&store.pool).await.unwrap();

        let mut c = store.pool.acquire().await.unwrap();
        // Test-only text built from constants.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PREPARE due (bigint, bigint) AS {}",
            sql::DUE_DELETIONS
        )))
        .execute(&mut *c)
        .await
        .unwrap();
        // The plan for these values, and the generic plan a cached statement may switch to.
        for mode in ["force_custom_plan", "force_generic_plan"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = {mode}")))
                .execute(&mut *c)
                .await
                .unwrap();
            let (plan,): (Value,) =
                sqlx::query_as("EXPLAIN (FORMAT JSON) EXECUTE due (2000000, 256)")
                    .fetch_one(&mut *c)
                    .await
                    .unwrap();
            let mut tasks = Vec::new();
            reads(&plan[0]["Plan"], "tasks", &mut tasks);
            let indexes: Vec<&str> = tasks.iter().map(|(_, i, _)| i.as_str()).collect();
            assert_eq!(
                indexes,
                ["tasks_prompt_due", "tasks_result_due"],
                "{mode}: {plan:#}"
            );
            for (kind, _, cond) in &tasks {
                assert!(
                    matches!(kind.as_str(), "Index Scan" | "Bitmap Heap Scan"),
                    "{mode}: {kind} on tasks: {plan:#}"
                );
                assert!(cond.contains("_due_at_ms <="), "{mode}: {cond}: {plan:#}");
            }
            let mut sessions = Vec::new();
            reads(&plan[0]["Plan"], "sessions", &mut sessions);
            assert_eq!(sessions.len(), 2, "{mode}: {plan:#}");
            for (kind, _, cond) in &sessions {
                assert!(
                    kind == "Index Scan" && cond.starts_with("(id = t"),
                    "{mode}: {kind} on sessions ({cond}): {plan:#}"
                );
            }
        }
        sql::assert_backfilled_due_times(&store, 2000).await;
        drop(c);
        drop(store);
        db.drop_database().await;
    }
}
