//! JSON bodies of the miner API, and the plaintext formats inside prompt and result blobs.
//!
//! Flow: [`LoginRequest`] → bearer token; [`LeaseRequest`] → [`Lease`] (long poll);
//! heartbeat → [`HeartbeatResponse`]; a signed `KeyRequest` → [`WrappedKey`]; `GET` the sealed
//! prompt; `PUT` the sealed result (streamed) → [`BlobReceipt`]; [`CompleteRequest`] with the
//! signed `TaskResult` → [`CompleteResponse`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::eip712::{KeyRequest, MinerLogin, Signed, TaskResult};
use crate::wire::Hex32;

/// `GET /api/miner/config`: what a miner needs to sign for this deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MinerConfig {
    /// Protocol version (1).
    pub protocol_version: u32,
    /// EIP-712 domain of this deployment.
    #[schema(value_type = Object)]
    pub domain: crate::eip712::Domain,
    /// Lease length granted per heartbeat, in milliseconds.
    pub lease_ttl_ms: u64,
    /// Longest long-poll the router accepts, in milliseconds.
    pub max_wait_ms: u64,
}

/// A model a miner serves, with the SHA-256 of its files: for a single file its `sha256sum`; for
/// a directory the SHA-256 of the `sha256sum` manifest of its files sorted by relative path (the
/// operator guide, docs/miner.md, shows how to reproduce it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServedModel {
    /// The model name callers ask for.
    pub name: String,
    /// SHA-256 digest over the model's files, when the miner computed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Hex32>,
}

/// `POST /api/miner/login`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The signed `MinerLogin`.
    pub login: Signed<MinerLogin>,
    /// The models this miner serves.
    pub models: Vec<ServedModel>,
}

/// Answer to a login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoginResponse {
    /// Bearer token for the other miner endpoints.
    pub token: String,
    /// The miner's address, as recovered from the signature (checksummed).
    pub miner: String,
    /// Unix seconds after which the token is refused.
    pub expires_at: u64,
}

/// `POST /api/miner/lease`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// How long to wait for a task, in milliseconds (at most 30 000).
    #[serde(default)]
    pub wait_ms: u64,
    /// Restrict to these of the miner's models (default: all it logged in with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
}

/// Sampling parameters of a task. Not secret: they travel in the clear beside the references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskParams {
    /// Upper bound on generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Stop sequences. These are part of the request, so v2 keeps them inside the sealed prompt;
    /// this field stays empty there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Whether the caller streams: the miner then flushes a sealed chunk per token group.
    #[serde(default)]
    pub stream: bool,
}

/// A leased task: references only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    /// This lease (one per attempt).
    pub lease_id: Uuid,
    /// The task.
    pub task_id: Uuid,
    /// Its session.
    pub session_id: Uuid,
    /// Where the sealed prompt is.
    pub prompt_urn: String,
    /// SHA-256 of the sealed prompt.
    pub prompt_hash: Hex32,
    /// Key version the prompt is sealed under.
    pub key_version: u32,
    /// Envelope scope of the prompt blob: 1 session key (client-sealed), 2 task key.
    pub prompt_scope: u8,
    /// The model to run.
    pub model: String,
    /// Sampling parameters.
    pub params: TaskParams,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Unix milliseconds at which the lease lapses unless extended.
    pub lease_expires_at_ms: u64,
    /// Lease length the router grants per heartbeat, in milliseconds.
    pub lease_ttl_ms: u64,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    /// New expiry, Unix milliseconds.
    pub lease_expires_at_ms: u64,
}

/// `POST …/release` and `POST …/fail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// Why (metadata only; never payload).
    #[serde(default)]
    pub reason: String,
}

/// A key wrapped to the requester's X25519 key (protocol §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WrappedKey {
    /// 80 bytes, lowercase hex: `E || AES-256-GCM(K_wrap, key)`.
    pub wrapped: String,
    /// Key version of the wrapped key.
    pub key_version: u32,
    /// 1 session key, 2 task key.
    pub scope: u8,
}

/// The signed `KeyRequest` body of `POST …/key`.
pub type KeyRequestBody = Signed<KeyRequest>;

/// Where a stored blob is and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BlobReceipt {
    /// Its URN.
    pub urn: String,
    /// SHA-256 of the whole blob.
    pub sha256: Hex32,
    /// Size in bytes.
    pub size: u64,
}

/// Token counts, reported by the miner (metadata, not content).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// `POST …/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The signed `TaskResult`.
    pub result: Signed<TaskResult>,
    /// Token counts.
    pub usage: Usage,
    /// `stop`, `length`, …
    pub finish_reason: String,
}

/// Answer to a result submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompleteResponse {
    /// `accepted` for the first valid result, `duplicate` when the task already had one.
    pub status: String,
    /// The result that stands (the first one).
    pub result_hash: Hex32,
}

/// The plaintext inside a prompt blob (JSON, UTF-8). The router (v2) or the client (v3) writes
/// it; only the miner reads it. Its strings are wiped when it is dropped.
#[derive(
    Debug, Clone, PartialEq, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop,
)]
#[serde(deny_unknown_fields)]
pub struct PromptPayload {
    /// Chat messages; empty for a plain completion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ChatMessage>,
    /// A plain completion prompt (legacy `prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Stop sequences (they can reveal content, so they travel sealed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

/// One chat message. Its strings are wiped when it is dropped.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    zeroize::Zeroize,
    zeroize::ZeroizeOnDrop,
)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// Its text.
    pub content: String,
}

// A result blob's plaintext is the generated UTF-8 text; each sealed chunk is the text produced
// since the previous flush, so a streaming reader can emit one delta per authenticated chunk.
