//! What the SQLite and PostgreSQL stores share: row types (both schemas use the same column
//! names and compatible types, so one `FromRow` derive serves both), conversions to the model
//! types, the lease checks and the mapping of database errors.

use uuid::Uuid;

use super::{
    AllowlistSource, ApiKey, AuditEntry, BlobKind, DeletionReason, DueDeletion, LeaseRecord,
    LeasedTask, MinerSession, NewAuditEntry, PrivacySetting, QueueDepth, ReadTokenRecord,
    ReapReport, Result, RetentionPolicy, SealingPolicy, Session, SessionKind, StoreError,
    StoreEvent, Task, TaskResultRecord, TaskState,
};

/// A stored TTL in milliseconds as whole seconds (the API's unit).
fn ms_to_secs(v: Option<i64>, what: &'static str) -> Result<Option<u64>> {
    v.map(|ms| u64::try_from(ms / 1000).map_err(|_| corrupt(what)))
        .transpose()
}

/// Columns of `tasks` in the order of [`TaskRow`].
macro_rules! task_columns {
    () => {
        "id, session_id, prompt_urn, prompt_hash, prompt_scope, key_version, model, params, \
         state, attempts, max_attempts, created_at_ms, deadline_ms, submitted_by, lease_id, \
         leased_by, lease_expires_at_ms, result_urn, result_hash, result_size, result_miner, \
         result_signature, prompt_tokens, completion_tokens, finish_reason, error_code, \
         error_message, finished_at_ms, delivered_at_ms, prompt_deleted_at_ms, \
         result_deleted_at_ms, sealed_by"
    };
}
pub(super) use task_columns;

/// Columns of `sessions` in the order of [`SessionRow`].
macro_rules! session_columns {
    () => {
        "id, owner, kind, private, allowlist_source, created_at_ms, expires_at_ms, closed_at_ms, \
         prompt_on_delivery, prompt_ttl_ms, result_ttl_ms, result_on_fetch, sealing"
    };
}
pub(super) use session_columns;

/// Columns of `api_keys` in the order of [`ApiKeyRow`].
macro_rules! api_key_columns {
    () => {
        "id, owner, prefix, admin, rate_per_minute, max_concurrent, default_session, \
         created_at_ms, revoked_at_ms"
    };
}
pub(super) use api_key_columns;

/// Columns of `audit_log` in the order of [`AuditRow`].
macro_rules! audit_columns {
    () => {
        "seq, at_ms, actor, action, session_id, task_id, miner, key_version, detail, prev_hash, \
         hash"
    };
}
pub(super) use audit_columns;

/// When a task's prompt blob is due for deletion under its session's rules, as a scalar
/// subquery on the row being updated (`tasks`), with `$delivered` standing for its delivery
/// time: NULL while the task runs or when no rule applies; the close time in a closed session;
/// the delivery time where the session deletes prompts on delivery; else creation plus the
/// session's prompt TTL. Close and delivery are recorded at the moment they happen, so either
/// makes the blob due at once, whatever the TTL. Migration `0006` backfills the same
/// expression.
macro_rules! prompt_due {
    ($delivered:literal) => {
        concat!(
            "(SELECT CASE \
               WHEN tasks.state NOT IN ('completed', 'failed', 'dead', 'cancelled') THEN NULL \
               WHEN s.closed_at_ms IS NOT NULL THEN s.closed_at_ms \
               WHEN s.prompt_on_delivery AND ",
            $delivered,
            " IS NOT NULL THEN ",
            $delivered,
            " WHEN s.prompt_ttl_ms IS NOT NULL THEN tasks.created_at_ms + s.prompt_ttl_ms \
             END FROM sessions s WHERE s.id = tasks.session_id)"
        )
    };
}

/// [`prompt_due`] for the result blob: NULL without a result; TTL counted from the task's end.
macro_rules! result_due {
    ($delivered:literal) => {
        concat!(
            "(SELECT CASE \
               WHEN tasks.state NOT IN ('completed', 'failed', 'dead', 'cancelled') \
                 OR tasks.result_urn IS NULL THEN NULL \
               WHEN s.closed_at_ms IS NOT NULL THEN s.closed_at_ms \
               WHEN s.result_on_fetch AND ",
            $delivered,
            " IS NOT NULL THEN ",
            $delivered,
            " WHEN s.result_ttl_ms IS NOT NULL THEN tasks.finished_at_ms + s.result_ttl_ms \
             END FROM sessions s WHERE s.id = tasks.session_id)"
        )
    };
}

macro_rules! refresh_due {
    ($selector:literal) => {
        concat!(
            "UPDATE tasks SET prompt_due_at_ms = ",
            prompt_due!("tasks.delivered_at_ms"),
            ", result_due_at_ms = ",
            result_due!("tasks.delivered_at_ms"),
            " WHERE ",
            $selector
        )
    };
}

/// Recomputes when task `$1`'s blobs are due; run in the transaction that ended the task.
pub(super) const REFRESH_DUE_OF_TASK: &str = refresh_due!("id = $1");
/// Recomputes when the blobs of session `$1`'s ended tasks are due (a running task has none);
/// run in the transaction that closed the session or changed its retention.
pub(super) const REFRESH_DUE_OF_SESSION: &str =
    refresh_due!("session_id = $1 AND state IN ('completed', 'failed', 'dead', 'cancelled')");

/// Blobs due for deletion at `$1`, at most `$2`: prompt and result blobs whose due time (kept
/// in the task row, [`prompt_due`], [`result_due`]) has come and that are not deleted yet. Same
/// text for both backends.
///
/// Each half reads one range of a partial index on its due time (`tasks_prompt_due`,
/// `tasks_result_due`), and looks up the session of each blob found (a scalar subquery, so that
/// no planner turns it into a scan of every session): a pass costs what is due, whatever the
/// number of sessions and of kept blobs. The reason is the rule that applies now, in the order
/// the due time takes them.
pub(super) const DUE_DELETIONS: &str = "\
    SELECT t.id, t.session_id, 'prompt' AS kind, t.prompt_urn AS urn, t.prompt_hash AS hash, \
            t.key_version, \
            (SELECT CASE WHEN s.closed_at_ms IS NOT NULL THEN 'session_closed' \
                         WHEN s.prompt_on_delivery AND t.delivered_at_ms IS NOT NULL \
                           THEN 'delivered' \
                         ELSE 'ttl' END \
             FROM sessions s WHERE s.id = t.session_id) AS reason \
     FROM tasks t \
     WHERE t.prompt_due_at_ms IS NOT NULL AND t.prompt_due_at_ms <= $1 \
       AND t.prompt_deleted_at_ms IS NULL \
     UNION ALL \
     SELECT t.id, t.session_id, 'result', t.result_urn, t.result_hash, t.key_version, \
            (SELECT CASE WHEN s.closed_at_ms IS NOT NULL THEN 'session_closed' \
                         WHEN s.result_on_fetch AND t.delivered_at_ms IS NOT NULL \
                           THEN 'delivered' \
                         ELSE 'ttl' END \
             FROM sessions s WHERE s.id = t.session_id) \
     FROM tasks t \
     WHERE t.result_due_at_ms IS NOT NULL AND t.result_due_at_ms <= $1 \
       AND t.result_deleted_at_ms IS NULL AND t.result_urn IS NOT NULL \
     LIMIT $2";

/// The statement of a migration that fills in the due times of existing tasks.
#[cfg(test)]
pub(super) fn backfill(migration: &str) -> String {
    migration
        .split(';')
        .map(str::trim)
        .map(|st| {
            st.lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .find(|st| st.trim_start().starts_with("UPDATE tasks SET"))
        .expect("the migration fills in due times")
}

/// Checks the due times the plan tests' data got from migration `0006`'s backfill: `sessions`
/// sessions with day-long prompt and result TTLs, each with 50 tasks created and finished at
/// 1,000,001 ms onwards, none delivered.
#[cfg(test)]
pub(super) async fn assert_backfilled_due_times(store: &dyn super::Store, sessions: usize) {
    assert!(
        store
            .due_deletions(2_000_000, 256)
            .await
            .unwrap()
            .is_empty()
    );
    // A day after the tenth task of each session ended: ten prompts and ten results each.
    let due = store
        .due_deletions(1_000_010 + 86_400_000, 100_000)
        .await
        .unwrap();
    assert_eq!(due.len(), sessions * 20);
    assert!(due.iter().all(|d| d.reason == DeletionReason::Ttl));
}

/// Records the first delivery of a completed task's result.
/// The due times are recomputed in the same statement, with `$2` as the delivery time.
pub(super) const MARK_DELIVERED: &str = concat!(
    "UPDATE tasks SET delivered_at_ms = $2, prompt_due_at_ms = ",
    prompt_due!("$2"),
    ", result_due_at_ms = ",
    result_due!("$2"),
    " WHERE id = $1 AND delivered_at_ms IS NULL AND result_urn IS NOT NULL"
);

macro_rules! mark_prompt_deleted {
    () => {
        "UPDATE tasks SET prompt_deleted_at_ms = $2 \
         WHERE id = $1 AND prompt_deleted_at_ms IS NULL AND prompt_urn = $3"
    };
}
macro_rules! mark_result_deleted {
    () => {
        "UPDATE tasks SET result_deleted_at_ms = $2 \
         WHERE id = $1 AND result_deleted_at_ms IS NULL AND result_urn = $3"
    };
}

/// Records a blob's deletion unless already recorded or the task has moved on to another blob;
/// `$1` task, `$2` time, `$3` the URN deleted.
pub(super) fn mark_deleted_sql(kind: BlobKind) -> &'static str {
    match kind {
        BlobKind::Prompt => mark_prompt_deleted!(),
        BlobKind::Result => mark_result_deleted!(),
    }
}

/// Replaces a session's retention and sealing policy.
pub(super) const SET_SESSION_POLICY: &str = "UPDATE sessions SET prompt_on_delivery = $2, \
    prompt_ttl_ms = $3, result_ttl_ms = $4, result_on_fetch = $5, sealing = $6 WHERE id = $1";

#[derive(Debug, sqlx::FromRow)]
pub(super) struct DueRow {
    id: Uuid,
    session_id: Uuid,
    kind: String,
    urn: String,
    hash: Vec<u8>,
    key_version: i64,
    reason: String,
}

impl DueRow {
    pub(super) fn into_due(self) -> Result<DueDeletion> {
        Ok(DueDeletion {
            task_id: self.id,
            session_id: self.session_id,
            kind: match self.kind.as_str() {
                "prompt" => BlobKind::Prompt,
                "result" => BlobKind::Result,
                _ => return Err(corrupt("due deletion kind")),
            },
            urn: self.urn,
            hash: hash32(&self.hash, "tasks blob hash")?,
            key_version: to_u32(self.key_version, "tasks.key_version")?,
            reason: match self.reason.as_str() {
                "session_closed" => DeletionReason::SessionClosed,
                "delivered" => DeletionReason::Delivered,
                "ttl" => DeletionReason::Ttl,
                _ => return Err(corrupt("due deletion reason")),
            },
        })
    }
}

/// Code and message of a task cancelled by its session's close.
pub(super) const SESSION_CLOSED: (&str, &str) = ("session_closed", "the session was closed");
/// Code and message of a task cancelled by its caller.
pub(super) const CANCELLED: (&str, &str) = ("cancelled", "cancelled by the caller");
/// Code and message of a task past its deadline.
pub(super) const DEADLINE_EXCEEDED: (&str, &str) = (
    "deadline_exceeded",
    "the task was not completed before its deadline",
);
/// Code and message of a task that ran out of attempts.
pub(super) const MAX_ATTEMPTS: (&str, &str) = (
    "max_attempts",
    "every allowed attempt's lease lapsed without a result",
);

#[derive(Debug, sqlx::FromRow)]
pub(super) struct SessionRow {
    id: Uuid,
    owner: String,
    kind: String,
    private: bool,
    allowlist_source: String,
    created_at_ms: i64,
    expires_at_ms: Option<i64>,
    closed_at_ms: Option<i64>,
    prompt_on_delivery: bool,
    prompt_ttl_ms: Option<i64>,
    result_ttl_ms: Option<i64>,
    result_on_fetch: bool,
    sealing: String,
}

impl SessionRow {
    pub(super) fn into_session(self, allowed_miners: Vec<String>) -> Result<Session> {
        Ok(Session {
            id: self.id,
            owner: self.owner,
            kind: SessionKind::parse(&self.kind).ok_or_else(|| corrupt("sessions.kind"))?,
            privacy: PrivacySetting {
                private: self.private,
                allowed_miners,
                source: AllowlistSource::parse(&self.allowlist_source)
                    .ok_or_else(|| corrupt("sessions.allowlist_source"))?,
            },
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            closed_at_ms: self.closed_at_ms,
            retention: RetentionPolicy {
                delete_prompt_on_delivery: self.prompt_on_delivery,
                prompt_ttl_secs: ms_to_secs(self.prompt_ttl_ms, "sessions.prompt_ttl_ms")?,
                result_ttl_secs: ms_to_secs(self.result_ttl_ms, "sessions.result_ttl_ms")?,
                delete_result_on_fetch: self.result_on_fetch,
            },
            sealing: SealingPolicy::parse(&self.sealing)
                .ok_or_else(|| corrupt("sessions.sealing"))?,
        })
    }

    /// Open at `now_ms`: not closed and not expired.
    pub(super) fn is_open(&self, now_ms: i64) -> bool {
        self.closed_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| now_ms < e)
    }

    pub(super) fn id(&self) -> Uuid {
        self.id
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed_at_ms.is_some()
    }
}

/// A session row with its allowed miners as a JSON array in list order (a `miners` column),
/// so that a session is read in one statement.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct SessionMinersRow {
    #[sqlx(flatten)]
    session: SessionRow,
    miners: String,
}

impl SessionMinersRow {
    pub(super) fn into_session(self) -> Result<Session> {
        let miners: Vec<String> =
            serde_json::from_str(&self.miners).map_err(|_| corrupt("session_miners"))?;
        self.session.into_session(miners)
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct TaskRow {
    id: Uuid,
    session_id: Uuid,
    prompt_urn: String,
    prompt_hash: Vec<u8>,
    prompt_scope: i64,
    key_version: i64,
    model: String,
    params: String,
    state: String,
    attempts: i64,
    max_attempts: i64,
    created_at_ms: i64,
    deadline_ms: Option<i64>,
    submitted_by: String,
    lease_id: Option<Uuid>,
    leased_by: Option<String>,
    lease_expires_at_ms: Option<i64>,
    result_urn: Option<String>,
    result_hash: Option<Vec<u8>>,
    result_size: Option<i64>,
    result_miner: Option<String>,
    result_signature: Option<Vec<u8>>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    finish_reason: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    finished_at_ms: Option<i64>,
    delivered_at_ms: Option<i64>,
    prompt_deleted_at_ms: Option<i64>,
    result_deleted_at_ms: Option<i64>,
    sealed_by: String,
}

impl TaskRow {
    pub(super) fn into_task(self) -> Result<Task> {
        let result = match self.result_urn {
            None => None,
            Some(result_urn) => Some(TaskResultRecord {
                result_urn,
                result_hash: hash32(
                    self.result_hash.as_deref().unwrap_or_default(),
                    "tasks.result_hash",
                )?,
                result_size: u64::try_from(self.result_size.unwrap_or(-1))
                    .map_err(|_| corrupt("tasks.result_size"))?,
                miner: self
                    .result_miner
                    .ok_or_else(|| corrupt("tasks.result_miner"))?,
                signature: self.result_signature.unwrap_or_default(),
                prompt_tokens: to_u32(self.prompt_tokens.unwrap_or(0), "tasks.prompt_tokens")?,
                completion_tokens: to_u32(
                    self.completion_tokens.unwrap_or(0),
                    "tasks.completion_tokens",
                )?,
                finish_reason: self.finish_reason.unwrap_or_default(),
            }),
        };
        Ok(Task {
            id: self.id,
            session_id: self.session_id,
            prompt_urn: self.prompt_urn,
            prompt_hash: hash32(&self.prompt_hash, "tasks.prompt_hash")?,
            prompt_scope: u8::try_from(self.prompt_scope)
                .map_err(|_| corrupt("tasks.prompt_scope"))?,
            key_version: to_u32(self.key_version, "tasks.key_version")?,
            model: self.model,
            params: serde_json::from_str(&self.params).map_err(|_| corrupt("tasks.params"))?,
            state: TaskState::parse(&self.state).ok_or_else(|| corrupt("tasks.state"))?,
            attempts: to_u32(self.attempts, "tasks.attempts")?,
            max_attempts: to_u32(self.max_attempts, "tasks.max_attempts")?,
            created_at_ms: self.created_at_ms,
            deadline_ms: self.deadline_ms,
            submitted_by: self.submitted_by,
            lease_id: self.lease_id,
            leased_by: self.leased_by,
            lease_expires_at_ms: self.lease_expires_at_ms,
            result,
            error_code: self.error_code,
            error_message: self.error_message,
            finished_at_ms: self.finished_at_ms,
            delivered_at_ms: self.delivered_at_ms,
            prompt_deleted_at_ms: self.prompt_deleted_at_ms,
            result_deleted_at_ms: self.result_deleted_at_ms,
            sealed_by: super::SealedBy::parse(&self.sealed_by)
                .ok_or_else(|| corrupt("tasks.sealed_by"))?,
        })
    }
}

/// A lease and its task in one statement, for both backends: the lease's columns are renamed
/// (`l_…`) because `tasks` has columns of the same names.
macro_rules! lease_with_task {
    () => {
        "SELECT l.lease_id AS l_lease_id, l.task_id AS l_task_id, l.miner AS l_miner, \
         l.attempt AS l_attempt, l.expires_at_ms AS l_expires_at_ms, \
         t.id, t.session_id, t.prompt_urn, t.prompt_hash, t.prompt_scope, t.key_version, \
         t.model, t.params, t.state, t.attempts, t.max_attempts, t.created_at_ms, \
         t.deadline_ms, t.submitted_by, t.lease_id, t.leased_by, t.lease_expires_at_ms, \
         t.result_urn, t.result_hash, t.result_size, t.result_miner, t.result_signature, \
         t.prompt_tokens, t.completion_tokens, t.finish_reason, t.error_code, \
         t.error_message, t.finished_at_ms, t.delivered_at_ms, t.prompt_deleted_at_ms, \
         t.result_deleted_at_ms, t.sealed_by \
         FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.lease_id = $1"
    };
}

pub(super) const LEASE_WITH_TASK: &str = lease_with_task!();

/// A row of [`LEASE_WITH_TASK`].
#[derive(Debug, sqlx::FromRow)]
pub(super) struct LeaseTaskRow {
    l_lease_id: Uuid,
    l_task_id: Uuid,
    l_miner: String,
    l_attempt: i64,
    l_expires_at_ms: i64,
    #[sqlx(flatten)]
    task: TaskRow,
}

impl LeaseTaskRow {
    pub(super) fn split(self) -> Result<(LeaseRow, Task)> {
        let lease = LeaseRow {
            lease_id: self.l_lease_id,
            task_id: self.l_task_id,
            miner: self.l_miner,
            attempt: self.l_attempt,
            expires_at_ms: self.l_expires_at_ms,
        };
        Ok((lease, self.task.into_task()?))
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct LeaseRow {
    pub(super) lease_id: Uuid,
    pub(super) task_id: Uuid,
    pub(super) miner: String,
    pub(super) attempt: i64,
    pub(super) expires_at_ms: i64,
}

impl LeaseRow {
    pub(super) fn record(&self) -> Result<LeaseRecord> {
        Ok(LeaseRecord {
            lease_id: self.lease_id,
            task_id: self.task_id,
            miner: self.miner.clone(),
            attempt: to_u32(self.attempt, "leases.attempt")?,
            expires_at_ms: self.expires_at_ms,
        })
    }

    /// `lease_not_held` unless `miner` holds (or held) this lease.
    pub(super) fn check_holder(&self, miner: &str) -> Result<()> {
        if self.miner == miner {
            Ok(())
        } else {
            Err(conflict(
                "lease_not_held",
                "the lease is held by another miner",
            ))
        }
    }

    /// Checks that `miner` holds this lease, that it is still the task's current lease and that
    /// it is valid at `now_ms`.
    pub(super) fn check_active(&self, task: &Task, miner: &str, now_ms: i64) -> Result<()> {
        self.check_holder(miner)?;
        if task.lease_id != Some(self.lease_id) {
            return Err(conflict(
                "lease_not_held",
                "the task has been leased again since",
            ));
        }
        let expires = match task.state {
            TaskState::Leased => task.lease_expires_at_ms.unwrap_or(self.expires_at_ms),
            _ => self.expires_at_ms,
        };
        if expires <= now_ms {
            return Err(conflict("lease_expired", "the lease has lapsed"));
        }
        if task.state != TaskState::Leased {
            return Err(conflict(
                "lease_not_held",
                format!("the task is {}", task.state.as_str()),
            ));
        }
        Ok(())
    }

    pub(super) fn leased_task(&self, task: Task) -> Result<LeasedTask> {
        Ok(LeasedTask {
            lease_id: self.lease_id,
            lease_expires_at_ms: task.lease_expires_at_ms.unwrap_or(self.expires_at_ms),
            attempt: to_u32(self.attempt, "leases.attempt")?,
            task,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct ApiKeyRow {
    id: Uuid,
    owner: String,
    prefix: String,
    admin: bool,
    rate_per_minute: i64,
    max_concurrent: i64,
    default_session: Option<Uuid>,
    created_at_ms: i64,
    revoked_at_ms: Option<i64>,
}

impl ApiKeyRow {
    pub(super) fn into_api_key(self) -> Result<ApiKey> {
        Ok(ApiKey {
            id: self.id,
            owner: self.owner,
            prefix: self.prefix,
            admin: self.admin,
            rate_per_minute: to_u32(self.rate_per_minute, "api_keys.rate_per_minute")?,
            max_concurrent: to_u32(self.max_concurrent, "api_keys.max_concurrent")?,
            default_session: self.default_session,
            created_at_ms: self.created_at_ms,
            revoked_at_ms: self.revoked_at_ms,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct MinerSessionRow {
    token_hash: Vec<u8>,
    miner: String,
    recipient: Vec<u8>,
    models: String,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl MinerSessionRow {
    pub(super) fn into_miner_session(self) -> Result<MinerSession> {
        Ok(MinerSession {
            token_hash: hash32(&self.token_hash, "miner_sessions.token_hash")?,
            miner: self.miner,
            recipient: hash32(&self.recipient, "miner_sessions.recipient")?,
            models: parse_models(&self.models)?,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        })
    }
}

/// Inserts a read token, only if its session exists (`$3`); the same text for both backends.
pub(super) const INSERT_READ_TOKEN: &str = "\
    INSERT INTO read_tokens (token_hash, owner, session_id, created_at_ms, expires_at_ms) \
    SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $3)";

/// A read token valid at `$2`, by hash (`$1`).
pub(super) const SELECT_READ_TOKEN: &str = "\
    SELECT token_hash, owner, session_id, created_at_ms, expires_at_ms \
    FROM read_tokens WHERE token_hash = $1 AND expires_at_ms > $2";

/// Deletes the read tokens expired at `$1`.
pub(super) const PRUNE_READ_TOKENS: &str = "DELETE FROM read_tokens WHERE expires_at_ms <= $1";

/// Callers back at their full quota.
pub(super) const PRUNE_RATES: &str = "DELETE FROM rate_limits WHERE tat_us < $1";

/// How far ahead of now a caller's theoretical arrival time may be for a request to be
/// admitted: `burst - 1` intervals.
pub(super) fn rate_tolerance(interval_us: i64, burst: u32) -> i64 {
    interval_us.saturating_mul(i64::from(burst.max(1)) - 1)
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct ReadTokenRow {
    token_hash: Vec<u8>,
    owner: String,
    session_id: Uuid,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl ReadTokenRow {
    pub(super) fn into_record(self) -> Result<ReadTokenRecord> {
        Ok(ReadTokenRecord {
            token_hash: hash32(&self.token_hash, "read_tokens.token_hash")?,
            owner: self.owner,
            session_id: self.session_id,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        })
    }
}

/// A miner session's models as stored (JSON `[[name, sha256 hex or null], …]`).
pub(super) fn models_json(models: &[(String, Option<String>)]) -> Result<String> {
    serde_json::to_string(models).map_err(|_| StoreError::Database("encoding models".into()))
}

pub(super) fn parse_models(json: &str) -> Result<Vec<(String, Option<String>)>> {
    serde_json::from_str(json).map_err(|_| corrupt("miner_sessions.models"))
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct AuditRow {
    seq: i64,
    at_ms: i64,
    actor: String,
    action: String,
    session_id: Option<Uuid>,
    task_id: Option<Uuid>,
    miner: Option<String>,
    key_version: Option<i64>,
    detail: String,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

impl AuditRow {
    pub(super) fn into_entry(self) -> Result<AuditEntry> {
        Ok(AuditEntry {
            seq: self.seq,
            entry: NewAuditEntry {
                at_ms: self.at_ms,
                actor: self.actor,
                action: self.action,
                session_id: self.session_id,
                task_id: self.task_id,
                miner: self.miner,
                key_version: self
                    .key_version
                    .map(|v| to_u32(v, "audit_log.key_version"))
                    .transpose()?,
                detail: serde_json::from_str(&self.detail)
                    .map_err(|_| corrupt("audit_log.detail"))?,
            },
            prev_hash: hash32(&self.prev_hash, "audit_log.prev_hash")?,
            hash: hash32(&self.hash, "audit_log.hash")?,
        })
    }
}

/// The (seq, hash) of the last audit entry, if any.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct AuditHead {
    pub(super) seq: i64,
    pub(super) hash: Vec<u8>,
}

/// Builds the next audit entry after `head`.
pub(super) fn next_audit_entry(head: Option<AuditHead>, e: &NewAuditEntry) -> Result<AuditEntry> {
    let (seq, prev_hash) = match head {
        None => (1, [0u8; 32]),
        Some(h) => (h.seq + 1, hash32(&h.hash, "audit_log.hash")?),
    };
    Ok(AuditEntry {
        seq,
        entry: e.clone(),
        prev_hash,
        hash: super::audit_hash(seq, e, &prev_hash),
    })
}

/// Chains `entries` after `head`, in order: the entries as they will be stored, and the detail
/// text of each.
pub(super) fn chain_audit_entries(
    mut head: Option<AuditHead>,
    entries: &[NewAuditEntry],
) -> Result<(Vec<AuditEntry>, Vec<String>)> {
    let mut out = Vec::with_capacity(entries.len());
    let mut details = Vec::with_capacity(entries.len());
    for e in entries {
        let entry = next_audit_entry(head.take(), e)?;
        head = Some(AuditHead {
            seq: entry.seq,
            hash: entry.hash.to_vec(),
        });
        details.push(detail_json(e)?);
        out.push(entry);
    }
    Ok((out, details))
}

/// The audit detail as stored: JSON text, returned verbatim by both backends.
pub(super) fn detail_json(e: &NewAuditEntry) -> Result<String> {
    serde_json::to_string(&e.detail).map_err(|_| StoreError::Database("encoding detail".into()))
}

/// Task parameters as stored.
pub(super) fn params_json(p: &super::TaskParams) -> Result<String> {
    serde_json::to_string(p).map_err(|_| StoreError::Database("encoding params".into()))
}

/// Deduplicated, sorted model names of miner sessions' model lists.
pub(super) fn served_models(rows: Vec<String>) -> Result<Vec<String>> {
    let mut out = std::collections::BTreeSet::new();
    for json in rows {
        out.extend(parse_models(&json)?.into_iter().map(|(name, _)| name));
    }
    Ok(out.into_iter().collect())
}

/// The report of a reaper pass and the events it publishes, from the ids of tasks failed for
/// their deadline and `(id, new state, model)` of tasks whose lease lapsed.
pub(super) fn reap_outcome(
    deadline_failed: Vec<Uuid>,
    expired: Vec<(Uuid, String, String)>,
) -> (ReapReport, Vec<StoreEvent>) {
    let mut events: Vec<StoreEvent> = deadline_failed
        .iter()
        .map(|&task_id| StoreEvent::TaskFinished { task_id })
        .collect();
    let mut report = ReapReport {
        deadline_failed,
        ..ReapReport::default()
    };
    for (task_id, state, model) in expired {
        if state == TaskState::Dead.as_str() {
            report.dead.push(task_id);
            events.push(StoreEvent::TaskFinished { task_id });
        } else {
            report.requeued.push(task_id);
            events.push(StoreEvent::TaskAvailable { model });
        }
    }
    (report, events)
}

/// Queue depth from `(state, count)` rows.
pub(super) fn queue_depth(rows: Vec<(String, i64)>) -> QueueDepth {
    let mut depth = QueueDepth::default();
    for (state, n) in rows {
        let n = n.max(0) as u64;
        match TaskState::parse(&state) {
            Some(TaskState::Queued) => depth.queued = n,
            Some(TaskState::Leased) => depth.leased = n,
            _ => {}
        }
    }
    depth
}

pub(super) fn conflict(code: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Conflict {
        code,
        message: message.into(),
    }
}

pub(super) fn session_closed() -> StoreError {
    conflict("session_closed", "the session is closed or expired")
}

pub(super) fn task_final(state: TaskState) -> StoreError {
    conflict("task_final", format!("the task is {}", state.as_str()))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Database(format!("stored value out of range: {what}"))
}

fn hash32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| corrupt(what))
}

fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| corrupt(what))
}

/// A `u64` as a database integer.
pub(super) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Database(format!("value out of range: {what}")))
}

/// Maps a database error. The message names the failure, never bound values: SQLSTATE or
/// SQLite code and the constraint, if any. The driver's text goes to the log at debug level.
pub(super) fn db_err(e: sqlx::Error) -> StoreError {
    tracing::debug!(error = %e, "database error");
    match &e {
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            match d.constraint() {
                Some(c) => StoreError::Database(format!("database error {code} ({c})")),
                None => StoreError::Database(format!("database error {code}")),
            }
        }
        sqlx::Error::PoolTimedOut => {
            StoreError::Database("timed out waiting for a connection".into())
        }
        sqlx::Error::PoolClosed => StoreError::Database("the connection pool is closed".into()),
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
            StoreError::Database("the database is unreachable".into())
        }
        sqlx::Error::RowNotFound => StoreError::Database("row not found".into()),
        _ => StoreError::Database("database driver error".into()),
    }
}

/// Maps an insert's error: a unique violation means `what` exists already.
pub(super) fn insert_err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::AlreadyExists { what },
        _ => db_err(e),
    }
}

/// `NotFound { what }` for a missing row.
pub(super) fn found<T>(row: Option<T>, what: &'static str) -> Result<T> {
    row.ok_or(StoreError::NotFound { what })
}

// --- rows as the SQLite store reads them --------------------------------------------------------

use super::lite::{FromRow, named_row};

named_row!(DueRow {
    id,
    session_id,
    kind,
    urn,
    hash,
    key_version,
    reason
});
named_row!(SessionRow {
    id,
    owner,
    kind,
    private,
    allowlist_source,
    created_at_ms,
    expires_at_ms,
    closed_at_ms,
    prompt_on_delivery,
    prompt_ttl_ms,
    result_ttl_ms,
    result_on_fetch,
    sealing,
});
named_row!(TaskRow {
    id,
    session_id,
    prompt_urn,
    prompt_hash,
    prompt_scope,
    key_version,
    model,
    params,
    state,
    attempts,
    max_attempts,
    created_at_ms,
    deadline_ms,
    submitted_by,
    lease_id,
    leased_by,
    lease_expires_at_ms,
    result_urn,
    result_hash,
    result_size,
    result_miner,
    result_signature,
    prompt_tokens,
    completion_tokens,
    finish_reason,
    error_code,
    error_message,
    finished_at_ms,
    delivered_at_ms,
    prompt_deleted_at_ms,
    result_deleted_at_ms,
    sealed_by,
});
named_row!(LeaseRow {
    lease_id,
    task_id,
    miner,
    attempt,
    expires_at_ms
});
named_row!(ApiKeyRow {
    id,
    owner,
    prefix,
    admin,
    rate_per_minute,
    max_concurrent,
    default_session,
    created_at_ms,
    revoked_at_ms,
});
named_row!(MinerSessionRow {
    token_hash,
    miner,
    recipient,
    models,
    created_at_ms,
    expires_at_ms
});
named_row!(ReadTokenRow {
    token_hash,
    owner,
    session_id,
    created_at_ms,
    expires_at_ms
});
named_row!(AuditRow {
    seq,
    at_ms,
    actor,
    action,
    session_id,
    task_id,
    miner,
    key_version,
    detail,
    prev_hash,
    hash,
});
named_row!(AuditHead { seq, hash });

/// Columns of a [`SessionRow`].
const SESSION_COLUMNS: usize = 13;

impl FromRow for SessionMinersRow {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            session: SessionRow::from_row(r)?,
            miners: r.get(SESSION_COLUMNS)?,
        })
    }
}

impl FromRow for LeaseTaskRow {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            l_lease_id: r.get("l_lease_id")?,
            l_task_id: r.get("l_task_id")?,
            l_miner: r.get("l_miner")?,
            l_attempt: r.get("l_attempt")?,
            l_expires_at_ms: r.get("l_expires_at_ms")?,
            task: TaskRow::from_row_at(r, 5)?,
        })
    }
}
