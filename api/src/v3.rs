//! JSON bodies of `/api/v3`: wallet-signed, client-sealed private inference.
//!
//! The caller seals its prompt on its own machine; the router only ever sees references
//! (URNs, hashes, ids, key versions), non-secret sampling parameters and signatures.
//!
//! Flow:
//! 1. `POST /api/v3/sessions` with a signed `OpenSession` ([`OpenSessionRequest`]) →
//!    [`OpenSessionResponse`]: the session and a read token bound to the owner and the session.
//! 2. `POST /api/v3/keys` with a signed `KeyRequest` (scope 1, by the owner) → [`KeyResponse`]:
//!    `K_session` wrapped to the caller's X25519 key (protocol §4), and a fresh read token.
//! 3. The caller derives `K_task` locally, seals the prompt ([`crate::miner::PromptPayload`] as
//!    JSON, task scope, purpose prompt) and uploads it: `PUT …/tasks/{task_id}/prompt` with the
//!    blob's SHA-256 in [`PROMPT_SHA256_HEADER`], or to a presigned URL from `POST …/prompt/presign`.
//! 4. `POST /api/v3/completions` with a signed `SubmitTask` ([`SubmitTaskRequest`]) → [`V3Task`].
//! 5. `GET /api/v3/tasks/{task_id}` (long poll with `wait_ms`) until final, or
//!    `GET …/stream` for the sealed result bytes as the miner produces them ([`StreamEvent`]);
//!    `GET …/result` for the sealed result blob. The caller verifies the miner's signed
//!    `TaskResult`, the blob hash and the AEAD, then opens it.
//!
//! Read endpoints take `Authorization: Bearer <token>` from step 1 or 2. The prompt upload answers
//! 201 with a [`crate::miner::BlobReceipt`]. Ids are chosen by the client: an id already in use is
//! 409 `session_exists` / `task_exists`.
//!
//! Besides the [`StreamEvent`]s, a stream that fails ends with an `error` event whose data is an
//! [`crate::ErrorBody`] (e.g. code `timeout` when the router's completion timeout runs out).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::eip712::{Domain, KeyRequest, OpenSession, Signed, SubmitTask, TaskResult};
use crate::miner::{TaskParams, Usage};
use crate::wire::Hex32;

/// Header carrying the expected SHA-256 (lowercase hex) of an uploaded prompt blob.
pub const PROMPT_SHA256_HEADER: &str = "x-veil-sha256";

/// Prefix of a v3 read token.
pub const TOKEN_PREFIX: &str = "vst_";

/// `GET /api/v3/config`: what a client needs to sign and seal for this deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct V3Config {
    /// Protocol version (1).
    pub protocol_version: u32,
    /// EIP-712 domain of this deployment.
    #[schema(value_type = Object)]
    pub domain: Domain,
    /// The key version new prompts must be sealed under.
    pub active_key_version: u32,
    /// Versions below this are retired and refuse to derive.
    pub min_decrypt_version: u32,
    /// Largest blob the router accepts, in bytes.
    pub max_blob_bytes: u64,
    /// Whether `POST …/prompt/presign` and `POST …/result/presign` are available (object stores
    /// that sign URLs: S3, GCS, Azure).
    pub presigned_urls: bool,
}

/// `POST /api/v3/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenSessionRequest {
    /// The signed `OpenSession`; its signer becomes the session's owner.
    #[schema(value_type = Object)]
    pub open: Signed<OpenSession>,
    /// Session lifetime in seconds (default: no expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Miners allowed to serve the session (checksummed or any-case `0x` addresses). A non-empty
    /// list makes the session private with a router-managed allowlist; empty uses the router's
    /// default (its static allowlist, if it has one). A session registered on the ACL contract
    /// takes the contract's list instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_miners: Vec<String>,
}

/// A v3 session as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct V3Session {
    /// Id (chosen by the client in `OpenSession`).
    pub session_id: Uuid,
    /// Checksummed owner address (the `OpenSession` signer).
    pub owner: String,
    /// `dedicated` or `pooled`.
    pub kind: String,
    /// Whether only allowed miners serve it.
    pub private: bool,
    /// Checksummed allowed miners.
    pub allowed_miners: Vec<String>,
    /// Where the allowlist comes from: `router`, `static` or `contract`.
    pub allowlist_source: String,
    /// Creation, Unix milliseconds.
    pub created_at_ms: i64,
    /// Expiry, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// Close time, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at_ms: Option<i64>,
}

/// A read token for the owner's v3 endpoints of one session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReadToken {
    /// `vst_…`: send as `Authorization: Bearer …`.
    pub token: String,
    /// Unix seconds after which it is refused (one hour at most, never past the session).
    pub expires_at: u64,
}

impl std::fmt::Debug for ReadToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Answer to `POST /api/v3/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OpenSessionResponse {
    /// The new session.
    pub session: V3Session,
    /// Read token for this session.
    pub token: ReadToken,
}

/// `POST /api/v3/keys`: a signed `KeyRequest`.
pub type KeyRequestBody = Signed<KeyRequest>;

/// Answer to `POST /api/v3/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyResponse {
    /// 80 bytes, lowercase hex: `E || AES-256-GCM(K_wrap, key)` (protocol §4).
    pub wrapped: String,
    /// Key version of the wrapped key.
    pub key_version: u32,
    /// 1 session key, 2 task key.
    pub scope: u8,
    /// A fresh read token for the session: always present in the answer to the owner's
    /// session-scope request, absent for task keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<ReadToken>,
}

/// Answer to `POST …/prompt/presign` and `POST …/result/presign`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PresignedUrl {
    /// `PUT` for uploads, `GET` for downloads.
    pub method: String,
    /// The signed URL; it grants access to this one object only, until `expires_at`.
    pub url: String,
    /// The blob's URN (for an upload: the URN to name in `SubmitTask.promptUrn`).
    pub urn: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// `POST /api/v3/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitTaskRequest {
    /// The signed `SubmitTask`, by the session owner.
    #[schema(value_type = Object)]
    pub task: Signed<SubmitTask>,
    /// Non-secret sampling parameters. Stop sequences can reveal content: put them in the sealed
    /// prompt, never here (`params.stop` is refused).
    #[serde(default)]
    pub params: TaskParams,
}

/// A v3 task's state and, once completed, its result references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct V3Task {
    /// Id.
    pub task_id: Uuid,
    /// Session.
    pub session_id: Uuid,
    /// `queued`, `leased`, `completed`, `failed`, `dead` or `cancelled`.
    pub state: String,
    /// Model.
    pub model: String,
    /// Key version of the prompt and the result.
    pub key_version: u32,
    /// The sealed prompt.
    pub prompt_urn: String,
    /// Its SHA-256.
    pub prompt_hash: Hex32,
    /// Attempts so far.
    pub attempts: u32,
    /// Creation, Unix milliseconds.
    pub created_at_ms: i64,
    /// Why a failed, dead or cancelled task ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskFailure>,
    /// The result, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<V3Result>,
}

/// Why a task ended without a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskFailure {
    /// Stable code, e.g. `prompt_unreadable`, `deadline`, `attempts_exhausted`, `cancelled`.
    pub code: String,
    /// Explanation (metadata only).
    pub message: String,
}

/// A completed task's result references, with the miner's signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct V3Result {
    /// The miner's signed `TaskResult`. Verify it: its signer must be `miner`, and its ids,
    /// prompt hash, result hash and URN must be the task's.
    #[schema(value_type = Object)]
    pub signed: Signed<TaskResult>,
    /// Checksummed address of the miner.
    pub miner: String,
    /// Size of the sealed result blob.
    pub size: u64,
    /// Token counts.
    pub usage: Usage,
    /// `stop`, `length`, …
    pub finish_reason: String,
    /// Whether the result blob was already deleted under the session's retention policy.
    #[serde(default)]
    pub deleted: bool,
}

/// One event of `GET /api/v3/tasks/{task_id}/stream` (SSE; the event name is the variant, the
/// data its JSON). The router relays the miner's sealed bytes without opening them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
// One event is built, serialized and dropped at a time: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum StreamEvent {
    /// A miner started uploading a result: discard any bytes of an earlier attempt.
    Start {
        /// Attempt number.
        attempt: u32,
    },
    /// The next sealed bytes of the result blob, in order (standard base64).
    Bytes {
        /// Base64 of the bytes.
        b64: String,
    },
    /// The task is final; for a completed task `task.result` names the blob the bytes formed.
    Done {
        /// The final task.
        task: V3Task,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_token_debug_is_redacted() {
        let t = ReadToken {
            token: "vst_secret".into(),
            expires_at: 5,
        };
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn stream_event_json_is_tagged() {
        let e = StreamEvent::Bytes { b64: "AAE=".into() };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"event": "bytes", "b64": "AAE="})
        );
    }
}
