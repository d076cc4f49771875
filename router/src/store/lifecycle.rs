//! Key lifecycle in the store: who sealed a task's blobs, blob counts per key version, and the
//! journal that makes the rewrap job resumable. Types, SQL text shared by both backends, and row
//! decoding; the transactions themselves are in `sqlite.rs` and `postgres.rs`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{BlobKind, Result, StoreError};

/// Who sealed a task's prompt (and so under whose control its keys are).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SealedBy {
    /// The router, at the edge (`/api/v2`): the rewrap job may re-seal its blobs.
    #[default]
    Router,
    /// The client (`/api/v3`): the router never re-seals its blobs.
    Client,
}

impl SealedBy {
    /// Text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Router => "router",
            Self::Client => "client",
        }
    }
    /// Parses the text form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "router" => Some(Self::Router),
            "client" => Some(Self::Client),
            _ => None,
        }
    }
}

/// How much is sealed under one key version: its tasks and the blobs of them still stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyVersionUsage {
    /// The key version.
    pub key_version: u32,
    /// Tasks under it.
    pub tasks: u64,
    /// Prompt blobs not deleted.
    pub prompt_blobs: u64,
    /// Result blobs not deleted.
    pub result_blobs: u64,
}

impl KeyVersionUsage {
    /// Prompt and result blobs together.
    pub fn blobs(&self) -> u64 {
        self.prompt_blobs + self.result_blobs
    }
}

/// Where a rewrap journal row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewrapState {
    /// New blobs are being written; the task still points at the old ones.
    Pending,
    /// The task points at the new blobs; the old ones are to be deleted.
    Switched,
    /// The switch will never happen; the new blobs are to be deleted.
    Abandoned,
}

impl RewrapState {
    /// Text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Switched => "switched",
            Self::Abandoned => "abandoned",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "switched" => Some(Self::Switched),
            "abandoned" => Some(Self::Abandoned),
            _ => None,
        }
    }
}

/// A new journal row, written before any new blob of the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRewrap {
    /// Row id.
    pub id: Uuid,
    /// The task.
    pub task_id: Uuid,
    /// Its key version now.
    pub old_version: u32,
    /// The version it moves to.
    pub new_version: u32,
    /// Now.
    pub started_at_ms: i64,
}

/// A journal row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapJournal {
    /// Row id.
    pub id: Uuid,
    /// The task.
    pub task_id: Uuid,
    /// Version before.
    pub old_version: u32,
    /// Version after.
    pub new_version: u32,
    /// Old prompt blob, once switched (when it was moved).
    pub old_prompt_urn: Option<String>,
    /// Old result blob, once switched (when it was moved).
    pub old_result_urn: Option<String>,
    /// New prompt blob, as soon as its URN is known.
    pub new_prompt_urn: Option<String>,
    /// New result blob, as soon as its URN is known.
    pub new_result_urn: Option<String>,
    /// State.
    pub state: RewrapState,
}

impl RewrapJournal {
    /// The blobs that must go for this row to be forgotten: the old ones once switched, the
    /// new ones otherwise.
    pub fn blobs_to_delete(&self) -> Vec<&str> {
        let (a, b) = match self.state {
            RewrapState::Switched => (&self.old_prompt_urn, &self.old_result_urn),
            RewrapState::Pending | RewrapState::Abandoned => {
                (&self.new_prompt_urn, &self.new_result_urn)
            }
        };
        a.iter().chain(b.iter()).map(String::as_str).collect()
    }
}

/// A re-sealed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedBlob {
    /// Its old URN.
    pub old_urn: String,
    /// Its new URN.
    pub urn: String,
    /// SHA-256 of the new blob.
    pub hash: [u8; 32],
    /// Size of the new blob.
    pub size: u64,
}

/// The compare-and-swap that points a task at its re-sealed blobs: applied only if the task is
/// still exactly as `expected` (same version, references and deletion marks, finished,
/// router-sealed) and the journal row is still pending.
#[derive(Debug, Clone, PartialEq)]
pub struct RewrapSwitch {
    /// Journal row.
    pub rewrap_id: Uuid,
    /// The task as read before re-sealing.
    pub expected: super::Task,
    /// The version it moves to.
    pub new_version: u32,
    /// The new prompt blob, when the prompt was moved.
    pub prompt: Option<MovedBlob>,
    /// The new result blob, when the result was moved.
    pub result: Option<MovedBlob>,
}

/// Blob counts per key version of blobs still stored.
pub(super) const KEY_VERSION_USAGE: &str = "\
    SELECT key_version, COUNT(*) AS tasks, \
           SUM(CASE WHEN prompt_deleted_at_ms IS NULL THEN 1 ELSE 0 END) AS prompt_blobs, \
           SUM(CASE WHEN result_urn IS NOT NULL AND result_deleted_at_ms IS NULL \
                    THEN 1 ELSE 0 END) AS result_blobs \
    FROM tasks GROUP BY key_version ORDER BY key_version";

/// Tasks a rewrap to `$2` moves: finished, router-sealed, under a version in `[$1, $2)`, with a
/// blob still stored.
macro_rules! rewrap_where {
    () => {
        " FROM tasks WHERE key_version >= $1 AND key_version < $2 \
          AND state IN ('completed', 'failed', 'dead', 'cancelled') AND sealed_by = 'router' \
          AND (prompt_deleted_at_ms IS NULL \
               OR (result_urn IS NOT NULL AND result_deleted_at_ms IS NULL))"
    };
}

/// Rewrap candidates after id `$3`, at most `$4`, in id order.
pub(super) const REWRAP_CANDIDATES: &str = concat!(
    "SELECT ",
    super::sql::task_columns!(),
    rewrap_where!(),
    " AND id > $3 ORDER BY id LIMIT $4"
);

/// Number of rewrap candidates.
pub(super) const COUNT_REWRAP_CANDIDATES: &str = concat!("SELECT COUNT(*)", rewrap_where!());

/// Inserts a pending journal row.
pub(super) const REWRAP_BEGIN: &str = "INSERT INTO key_rewraps \
    (id, task_id, old_version, new_version, state, started_at_ms) \
    VALUES ($1, $2, $3, $4, 'pending', $5)";

/// Names a new blob of a pending row.
pub(super) fn rewrap_record_sql(kind: BlobKind) -> &'static str {
    match kind {
        BlobKind::Prompt => {
            "UPDATE key_rewraps SET new_prompt_urn = $2 WHERE id = $1 AND state = 'pending'"
        }
        BlobKind::Result => {
            "UPDATE key_rewraps SET new_result_urn = $2 WHERE id = $1 AND state = 'pending'"
        }
    }
}

/// Points the task at its new blobs, if it is unchanged (null-safe comparisons).
pub(super) const REWRAP_SWITCH_TASK: &str = "UPDATE tasks SET key_version = $2, \
    prompt_urn = $3, prompt_hash = $4, result_urn = $5, result_hash = $6, result_size = $7 \
    WHERE id = $1 AND key_version = $8 AND prompt_urn = $9 AND prompt_hash = $10 \
      AND result_urn IS NOT DISTINCT FROM $11 AND result_hash IS NOT DISTINCT FROM $12 \
      AND prompt_deleted_at_ms IS NOT DISTINCT FROM $13 \
      AND result_deleted_at_ms IS NOT DISTINCT FROM $14 \
      AND state IN ('completed', 'failed', 'dead', 'cancelled') AND sealed_by = 'router'";

/// Marks a row switched, naming the old blobs to delete and the new ones now referenced.
pub(super) const REWRAP_MARK_SWITCHED: &str = "UPDATE key_rewraps SET state = 'switched', \
    old_prompt_urn = $2, old_result_urn = $3, new_prompt_urn = $4, new_result_urn = $5 \
    WHERE id = $1";

/// Abandons a pending row.
pub(super) const REWRAP_ABANDON: &str =
    "UPDATE key_rewraps SET state = 'abandoned' WHERE id = $1 AND state = 'pending'";

/// Columns of a journal row, in the order of [`RewrapRow`].
macro_rules! rewrap_columns {
    () => {
        "id, task_id, old_version, new_version, old_prompt_urn, old_result_urn, \
         new_prompt_urn, new_result_urn, state"
    };
}

/// One journal row.
pub(super) const REWRAP_ROW: &str = concat!(
    "SELECT ",
    rewrap_columns!(),
    " FROM key_rewraps WHERE id = $1"
);

/// Every journal row, oldest first.
pub(super) const REWRAP_JOURNAL: &str = concat!(
    "SELECT ",
    rewrap_columns!(),
    " FROM key_rewraps ORDER BY started_at_ms, id"
);

/// Removes a journal row.
pub(super) const REWRAP_FORGET: &str = "DELETE FROM key_rewraps WHERE id = $1";

fn corrupt(what: &str) -> StoreError {
    StoreError::Database(format!("stored value out of range: {what}"))
}

fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| corrupt(what))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(what))
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct UsageRow {
    key_version: i64,
    tasks: i64,
    prompt_blobs: i64,
    result_blobs: i64,
}

impl UsageRow {
    pub(super) fn into_usage(self) -> Result<KeyVersionUsage> {
        Ok(KeyVersionUsage {
            key_version: to_u32(self.key_version, "tasks.key_version")?,
            tasks: to_u64(self.tasks, "task count")?,
            prompt_blobs: to_u64(self.prompt_blobs, "prompt blob count")?,
            result_blobs: to_u64(self.result_blobs, "result blob count")?,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(super) struct RewrapRow {
    id: Uuid,
    task_id: Uuid,
    old_version: i64,
    new_version: i64,
    old_prompt_urn: Option<String>,
    old_result_urn: Option<String>,
    new_prompt_urn: Option<String>,
    new_result_urn: Option<String>,
    state: String,
}

impl RewrapRow {
    pub(super) fn into_journal(self) -> Result<RewrapJournal> {
        Ok(RewrapJournal {
            id: self.id,
            task_id: self.task_id,
            old_version: to_u32(self.old_version, "key_rewraps.old_version")?,
            new_version: to_u32(self.new_version, "key_rewraps.new_version")?,
            old_prompt_urn: self.old_prompt_urn,
            old_result_urn: self.old_result_urn,
            new_prompt_urn: self.new_prompt_urn,
            new_result_urn: self.new_result_urn,
            state: RewrapState::parse(&self.state).ok_or_else(|| corrupt("key_rewraps.state"))?,
        })
    }
}

/// The values bound to [`REWRAP_SWITCH_TASK`]: new references first, then the expected ones.
#[derive(Debug)]
pub(super) struct SwitchBinds {
    pub(super) id: Uuid,
    pub(super) new_version: i64,
    pub(super) prompt_urn: String,
    pub(super) prompt_hash: Vec<u8>,
    pub(super) result_urn: Option<String>,
    pub(super) result_hash: Option<Vec<u8>>,
    pub(super) result_size: Option<i64>,
    pub(super) old_version: i64,
    pub(super) old_prompt_urn: String,
    pub(super) old_prompt_hash: Vec<u8>,
    pub(super) old_result_urn: Option<String>,
    pub(super) old_result_hash: Option<Vec<u8>>,
    pub(super) prompt_deleted_at_ms: Option<i64>,
    pub(super) result_deleted_at_ms: Option<i64>,
}

impl SwitchBinds {
    pub(super) fn new(s: &RewrapSwitch) -> Result<Self> {
        let t = &s.expected;
        let (prompt_urn, prompt_hash) = match &s.prompt {
            Some(m) => (m.urn.clone(), m.hash.to_vec()),
            None => (t.prompt_urn.clone(), t.prompt_hash.to_vec()),
        };
        let old_result = t.result.as_ref();
        let (result_urn, result_hash, result_size) = match (&s.result, old_result) {
            (Some(m), _) => (Some(m.urn.clone()), Some(m.hash.to_vec()), Some(m.size)),
            (None, Some(r)) => (
                Some(r.result_urn.clone()),
                Some(r.result_hash.to_vec()),
                Some(r.result_size),
            ),
            (None, None) => (None, None, None),
        };
        Ok(Self {
            id: t.id,
            new_version: i64::from(s.new_version),
            prompt_urn,
            prompt_hash,
            result_urn,
            result_hash,
            result_size: result_size
                .map(|v| i64::try_from(v).map_err(|_| corrupt("result size")))
                .transpose()?,
            old_version: i64::from(t.key_version),
            old_prompt_urn: t.prompt_urn.clone(),
            old_prompt_hash: t.prompt_hash.to_vec(),
            old_result_urn: old_result.map(|r| r.result_urn.clone()),
            old_result_hash: old_result.map(|r| r.result_hash.to_vec()),
            prompt_deleted_at_ms: t.prompt_deleted_at_ms,
            result_deleted_at_ms: t.result_deleted_at_ms,
        })
    }

    /// The values of [`REWRAP_MARK_SWITCHED`] after the row id: old and new URNs of what moved.
    pub(super) fn moved(
        s: &RewrapSwitch,
    ) -> (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ) {
        (
            s.prompt.as_ref().map(|m| m.old_urn.clone()),
            s.result.as_ref().map(|m| m.old_urn.clone()),
            s.prompt.as_ref().map(|m| m.urn.clone()),
            s.result.as_ref().map(|m| m.urn.clone()),
        )
    }
}

/// Binds [`SwitchBinds`] to [`REWRAP_SWITCH_TASK`] for any backend.
macro_rules! bind_switch {
    ($q:expr, $b:expr) => {
        $q.bind($b.id)
            .bind($b.new_version)
            .bind(&$b.prompt_urn)
            .bind(&$b.prompt_hash)
            .bind(&$b.result_urn)
            .bind(&$b.result_hash)
            .bind($b.result_size)
            .bind($b.old_version)
            .bind(&$b.old_prompt_urn)
            .bind(&$b.old_prompt_hash)
            .bind(&$b.old_result_urn)
            .bind(&$b.old_result_hash)
            .bind($b.prompt_deleted_at_ms)
            .bind($b.result_deleted_at_ms)
    };
}
pub(super) use bind_switch;

super::lite::named_row!(UsageRow {
    key_version,
    tasks,
    prompt_blobs,
    result_blobs
});
super::lite::named_row!(RewrapRow {
    id,
    task_id,
    old_version,
    new_version,
    old_prompt_urn,
    old_result_urn,
    new_prompt_urn,
    new_result_urn,
    state,
});
