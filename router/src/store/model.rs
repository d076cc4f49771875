//! Rows of the router's store. Times are Unix milliseconds (`i64`); addresses are
//! checksummed `0x…` strings; owners are `key:<api key id>` for API-key callers and the
//! checksummed wallet address for wallet callers.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Dedicated (one caller's tasks on its allowed miners) or pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// A session of its own.
    Dedicated,
    /// Shares pooled miners.
    Pooled,
}

impl SessionKind {
    /// Text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dedicated => "dedicated",
            Self::Pooled => "pooled",
        }
    }
    /// Parses the text form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dedicated" => Some(Self::Dedicated),
            "pooled" => Some(Self::Pooled),
            _ => None,
        }
    }
}

/// Where a session's allowlist comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AllowlistSource {
    /// Managed through the router's API.
    Router,
    /// From the router's configuration (file or environment).
    Static,
    /// From the on-chain ACL contract.
    Contract,
}

impl AllowlistSource {
    /// Text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Router => "router",
            Self::Static => "static",
            Self::Contract => "contract",
        }
    }
    /// Parses the text form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "router" => Some(Self::Router),
            "static" => Some(Self::Static),
            "contract" => Some(Self::Contract),
            _ => None,
        }
    }
}

/// `PrivacySettingData`: who may serve a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PrivacySetting {
    /// A private session's tasks reach only its allowed miners.
    pub private: bool,
    /// Checksummed miner addresses.
    pub allowed_miners: Vec<String>,
    /// Where the list comes from.
    pub source: AllowlistSource,
}

/// What happens to a session's sealed blobs once they have served their purpose. Each rule
/// that is set deletes the blob when it first applies; closing the session deletes every blob
/// of its finished tasks whatever the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Delete the prompt blob once the task's result has been delivered to the caller.
    #[serde(default)]
    pub delete_prompt_on_delivery: bool,
    /// Delete the prompt blob this many seconds after the task was created. A task still
    /// waiting for a miner then has its deadline at that time, so it never runs without its
    /// prompt.
    #[serde(default)]
    pub prompt_ttl_secs: Option<u64>,
    /// Delete the result blob this many seconds after the task finished.
    #[serde(default)]
    pub result_ttl_secs: Option<u64>,
    /// Delete the result blob once it has been delivered to the caller (the first fetch).
    #[serde(default)]
    pub delete_result_on_fetch: bool,
}

/// Longest retention TTL accepted: ten years.
pub const MAX_RETENTION_SECS: u64 = 10 * 365 * 24 * 3600;

impl RetentionPolicy {
    /// Checks the TTLs; the error names the field at fault.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        for (field, v) in [
            ("retention.prompt_ttl_secs", self.prompt_ttl_secs),
            ("retention.result_ttl_secs", self.result_ttl_secs),
        ] {
            if let Some(t) = v
                && (t == 0 || t > MAX_RETENTION_SECS)
            {
                return Err((
                    field,
                    format!("{field} must be between 1 and {MAX_RETENTION_SECS}"),
                ));
            }
        }
        Ok(())
    }

    /// The prompt TTL in milliseconds.
    pub fn prompt_ttl_ms(&self) -> Option<i64> {
        self.prompt_ttl_secs
            .map(|s| (s as i64).saturating_mul(1000))
    }

    /// The result TTL in milliseconds.
    pub fn result_ttl_ms(&self) -> Option<i64> {
        self.result_ttl_secs
            .map(|s| (s as i64).saturating_mul(1000))
    }
}

/// Where a session's prompts may be sealed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SealingPolicy {
    /// By the router at the edge (`/api/v2`) or by the client (`/api/v3`).
    #[default]
    Any,
    /// Only by the client: `/api/v2` (server-side sealing) is refused for the session.
    ClientOnly,
}

impl SealingPolicy {
    /// Text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::ClientOnly => "client_only",
        }
    }
    /// Parses the text form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "any" => Some(Self::Any),
            "client_only" => Some(Self::ClientOnly),
            _ => None,
        }
    }
}

/// Which blob of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobKind {
    /// The sealed prompt.
    Prompt,
    /// The sealed result.
    Result,
}

impl BlobKind {
    /// Text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::Result => "result",
        }
    }
}

/// Why the retention sweeper deletes a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionReason {
    /// The session was closed.
    SessionClosed,
    /// The result was delivered (`delete_prompt_on_delivery` / `delete_result_on_fetch`).
    Delivered,
    /// The blob's TTL passed.
    Ttl,
}

/// A blob the retention policy says must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDeletion {
    /// Its task.
    pub task_id: Uuid,
    /// The task's session.
    pub session_id: Uuid,
    /// Prompt or result.
    pub kind: BlobKind,
    /// The blob's URN.
    pub urn: String,
    /// SHA-256 of the blob.
    pub hash: [u8; 32],
    /// Key version it is sealed under.
    pub key_version: u32,
    /// Why it is due.
    pub reason: DeletionReason,
}

/// A new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// Its id (UUIDv7).
    pub id: Uuid,
    /// `key:<id>` or a checksummed address.
    pub owner: String,
    /// Kind.
    pub kind: SessionKind,
    /// Privacy.
    pub privacy: PrivacySetting,
    /// Creation time.
    pub created_at_ms: i64,
    /// After this, no new tasks (None = no TTL).
    pub expires_at_ms: Option<i64>,
    /// Retention of its blobs.
    pub retention: RetentionPolicy,
    /// Where its prompts may be sealed.
    pub sealing: SealingPolicy,
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub owner: String,
    /// Kind.
    pub kind: SessionKind,
    /// Privacy.
    pub privacy: PrivacySetting,
    /// Creation time.
    pub created_at_ms: i64,
    /// TTL end.
    pub expires_at_ms: Option<i64>,
    /// When closed.
    pub closed_at_ms: Option<i64>,
    /// Retention of its blobs.
    pub retention: RetentionPolicy,
    /// Where its prompts may be sealed.
    pub sealing: SealingPolicy,
}

impl Session {
    /// Open at `now_ms`: not closed, not expired.
    pub fn is_open(&self, now_ms: i64) -> bool {
        self.closed_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| now_ms < e)
    }
    /// May `miner` (checksummed) serve this session?
    pub fn allows(&self, miner: &str) -> bool {
        !self.privacy.private || self.privacy.allowed_miners.iter().any(|m| m == miner)
    }
}

/// A new API key (its secret is never stored; only SHA-256 of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    /// Id.
    pub id: Uuid,
    /// Who it belongs to (free text, e.g. a team or app name).
    pub owner: String,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// First characters of the secret, to recognise it in listings (`vk_ab12…`).
    pub prefix: String,
    /// May use admin endpoints.
    pub admin: bool,
    /// Requests per minute (0 = unlimited).
    pub rate_per_minute: u32,
    /// Concurrent requests (0 = unlimited).
    pub max_concurrent: u32,
    /// Creation time.
    pub created_at_ms: i64,
}

/// A stored API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKey {
    /// Id.
    pub id: Uuid,
    /// Owner label.
    pub owner: String,
    /// Recognisable prefix of the secret.
    pub prefix: String,
    /// Admin rights.
    pub admin: bool,
    /// Requests per minute (0 = unlimited).
    pub rate_per_minute: u32,
    /// Concurrent requests (0 = unlimited).
    pub max_concurrent: u32,
    /// The session used when a request names none.
    pub default_session: Option<Uuid>,
    /// Creation time.
    pub created_at_ms: i64,
    /// Revocation time.
    pub revoked_at_ms: Option<i64>,
}

/// A miner session after a valid `MinerLogin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMinerSession {
    /// SHA-256 of the bearer token.
    pub token_hash: [u8; 32],
    /// Checksummed miner address.
    pub miner: String,
    /// Its X25519 public key for this session.
    pub recipient: [u8; 32],
    /// Models it serves (name → optional SHA-256 hex).
    pub models: Vec<(String, Option<String>)>,
    /// Login time.
    pub created_at_ms: i64,
    /// Token expiry.
    pub expires_at_ms: i64,
}

/// A stored miner session.
pub type MinerSession = NewMinerSession;

/// A `/api/v3` read token: a bearer token of a session's owner that opens the read endpoints
/// of that one session. Only the SHA-256 of the token text is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadTokenRecord {
    /// SHA-256 of the token text (`vst_…`).
    pub token_hash: [u8; 32],
    /// Checksummed address of the session owner it was issued to.
    pub owner: String,
    /// The session it opens.
    pub session_id: Uuid,
    /// Issue time.
    pub created_at_ms: i64,
    /// Refused from this time on.
    pub expires_at_ms: i64,
}

/// Non-secret task parameters, stored as JSON.
pub type TaskParams = veil_api::miner::TaskParams;

/// A new task: references only.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Id.
    pub id: Uuid,
    /// Session.
    pub session_id: Uuid,
    /// Sealed prompt.
    pub prompt_urn: String,
    /// Its SHA-256.
    pub prompt_hash: [u8; 32],
    /// Envelope scope of the prompt (1 session key, 2 task key).
    pub prompt_scope: u8,
    /// Key version.
    pub key_version: u32,
    /// Model.
    pub model: String,
    /// Parameters.
    pub params: TaskParams,
    /// Attempts before the task is dead.
    pub max_attempts: u32,
    /// Creation time.
    pub created_at_ms: i64,
    /// Fail if not completed by then.
    pub deadline_ms: Option<i64>,
    /// Who submitted it (owner string or API key id), for the audit and for access checks.
    pub submitted_by: String,
    /// Who sealed its prompt: the router (`/api/v2`) or the client (`/api/v3`).
    pub sealed_by: super::SealedBy,
}

/// Task states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a miner.
    Queued,
    /// Leased by a miner.
    Leased,
    /// Has a result.
    Completed,
    /// Failed for good (bad prompt blob, deadline).
    Failed,
    /// Too many attempts.
    Dead,
    /// Cancelled (by the caller or a session close).
    Cancelled,
}

impl TaskState {
    /// Text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Leased => "leased",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }
    /// Parses the text form.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "leased" => Self::Leased,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "dead" => Self::Dead,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
    /// No further change will happen.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Dead | Self::Cancelled
        )
    }
}

/// A result as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResultRecord {
    /// Sealed result.
    pub result_urn: String,
    /// Its SHA-256.
    pub result_hash: [u8; 32],
    /// Its size.
    pub result_size: u64,
    /// Checksummed address of the miner that signed it.
    pub miner: String,
    /// The miner's 65-byte `TaskResult` signature.
    pub signature: Vec<u8>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Completion tokens.
    pub completion_tokens: u32,
    /// `stop`, `length`, …
    pub finish_reason: String,
}

/// A stored task.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Id.
    pub id: Uuid,
    /// Session.
    pub session_id: Uuid,
    /// Sealed prompt.
    pub prompt_urn: String,
    /// Its SHA-256.
    pub prompt_hash: [u8; 32],
    /// Prompt envelope scope.
    pub prompt_scope: u8,
    /// Key version.
    pub key_version: u32,
    /// Model.
    pub model: String,
    /// Parameters.
    pub params: TaskParams,
    /// State.
    pub state: TaskState,
    /// Attempts so far.
    pub attempts: u32,
    /// Attempt limit.
    pub max_attempts: u32,
    /// Creation.
    pub created_at_ms: i64,
    /// Deadline.
    pub deadline_ms: Option<i64>,
    /// Submitter.
    pub submitted_by: String,
    /// Current or last lease.
    pub lease_id: Option<Uuid>,
    /// Current or last lease holder.
    pub leased_by: Option<String>,
    /// Current lease expiry.
    pub lease_expires_at_ms: Option<i64>,
    /// The result, once completed.
    pub result: Option<TaskResultRecord>,
    /// Failure code (failed, dead, cancelled).
    pub error_code: Option<String>,
    /// Failure explanation.
    pub error_message: Option<String>,
    /// When it reached a final state.
    pub finished_at_ms: Option<i64>,
    /// When its result was first delivered to the caller.
    pub delivered_at_ms: Option<i64>,
    /// When the retention policy deleted its prompt blob.
    pub prompt_deleted_at_ms: Option<i64>,
    /// When the retention policy deleted its result blob.
    pub result_deleted_at_ms: Option<i64>,
    /// Who sealed its prompt (the rewrap job re-seals router-sealed blobs only).
    pub sealed_by: super::SealedBy,
}

/// Parameters of [`super::Store::lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseQuery {
    /// Checksummed miner address.
    pub miner: String,
    /// Models it serves.
    pub models: Vec<String>,
    /// Now.
    pub now_ms: i64,
    /// Lease length.
    pub ttl_ms: i64,
    /// The new lease's id.
    pub lease_id: Uuid,
    /// Skip sessions whose allowlist comes from the ACL contract (the router's copy of the
    /// chain is stale: they fail closed).
    pub skip_contract_sessions: bool,
}

/// A leased task.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedTask {
    /// The lease.
    pub lease_id: Uuid,
    /// Lease expiry.
    pub lease_expires_at_ms: i64,
    /// Attempt number of this lease.
    pub attempt: u32,
    /// The task.
    pub task: Task,
}

/// A lease, valid or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Lease id.
    pub lease_id: Uuid,
    /// Task.
    pub task_id: Uuid,
    /// Holder.
    pub miner: String,
    /// Attempt.
    pub attempt: u32,
    /// Expiry (last extended).
    pub expires_at_ms: i64,
}

/// Outcome of a result submission.
#[derive(Debug, Clone, PartialEq)]
pub enum CompleteOutcome {
    /// This result is the task's result.
    Accepted(Task),
    /// The task already had a result; nothing changed.
    Duplicate(Task),
}

/// What a reaper pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Leases that lapsed and whose tasks went back to the queue.
    pub requeued: Vec<Uuid>,
    /// Tasks that ran out of attempts.
    pub dead: Vec<Uuid>,
    /// Tasks past their deadline.
    pub deadline_failed: Vec<Uuid>,
}

/// Task counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Queued.
    pub queued: u64,
    /// Leased.
    pub leased: u64,
}

/// A new audit entry: metadata only.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NewAuditEntry {
    /// Time.
    pub at_ms: i64,
    /// Who: `key:<id>`, a checksummed address, `router`, `operator`.
    pub actor: String,
    /// What, e.g. `session.create`, `task.enqueue`, `key.release`, `key.deny`.
    pub action: String,
    /// Session concerned.
    pub session_id: Option<Uuid>,
    /// Task concerned.
    pub task_id: Option<Uuid>,
    /// Miner concerned.
    pub miner: Option<String>,
    /// Key version concerned.
    pub key_version: Option<u32>,
    /// Other metadata (hashes, codes), a JSON object; never content.
    pub detail: serde_json::Value,
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// The entry.
    #[serde(flatten)]
    pub entry: NewAuditEntry,
    /// Hash of the previous entry (zero for the first).
    #[serde(with = "hex_array")]
    pub prev_hash: [u8; 32],
    /// `SHA-256(prev_hash || canonical JSON of seq and entry)`.
    #[serde(with = "hex_array")]
    pub hash: [u8; 32],
}

impl AuditEntry {
    /// The hash this entry must have given its contents and `prev_hash`.
    pub fn compute_hash(&self) -> [u8; 32] {
        audit_hash(self.seq, &self.entry, &self.prev_hash)
    }
}

/// `SHA-256(prev_hash || JSON[seq, at_ms, actor, action, session_id, task_id, miner,
/// key_version, detail])`, with `detail` serialized with sorted keys so that every backend
/// (including PostgreSQL's `jsonb`, which reorders keys) hashes the same bytes.
pub fn audit_hash(seq: i64, e: &NewAuditEntry, prev_hash: &[u8; 32]) -> [u8; 32] {
    let canonical = serde_json::json!([
        seq,
        e.at_ms,
        e.actor,
        e.action,
        e.session_id.map(|u| u.to_string()),
        e.task_id.map(|u| u.to_string()),
        e.miner,
        e.key_version,
        sorted(&e.detail),
    ]);
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(canonical.to_string().as_bytes());
    h.finalize().into()
}

fn sorted(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            let mut out = serde_json::Map::new();
            for k in keys {
                out.insert(k.clone(), sorted(&m[k]));
            }
            serde_json::Value::Object(out)
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};
    pub(crate) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}
