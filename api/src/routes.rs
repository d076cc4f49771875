//! HTTP paths of the router, shared by the server and its clients.

/// Liveness.
pub const HEALTHZ: &str = "/healthz";
/// Readiness (database, blob store and keyring reachable).
pub const READYZ: &str = "/readyz";
/// Prometheus metrics.
pub const METRICS: &str = "/metrics";
/// The OpenAPI document.
pub const OPENAPI: &str = "/openapi.json";

/// OpenAI-compatible chat completions (and legacy `prompt`).
pub const V2_COMPLETIONS: &str = "/api/v2/completions";
/// Alias used by OpenAI clients that append `/chat/completions` to their base URL.
pub const V2_CHAT_COMPLETIONS: &str = "/api/v2/chat/completions";
/// Models served by connected miners.
pub const V2_MODELS: &str = "/api/v2/models";
/// A task's status and, once done, its answer.
pub const V2_TASK: &str = "/api/v2/tasks/{task_id}";
/// Sessions of the caller.
pub const V2_SESSIONS: &str = "/api/v2/sessions";
/// One session.
pub const V2_SESSION: &str = "/api/v2/sessions/{session_id}";
/// Close a session.
pub const V2_SESSION_CLOSE: &str = "/api/v2/sessions/{session_id}/close";
/// A session's privacy settings.
pub const V2_SESSION_PRIVACY: &str = "/api/v2/sessions/{session_id}/privacy";
/// A session's retention and sealing policy.
pub const V2_SESSION_POLICY: &str = "/api/v2/sessions/{session_id}/policy";
/// Public facts about this deployment (contract, storage, retention, key policy).
pub const V2_DEPLOYMENT: &str = "/api/v2/deployment";

/// Admin: API keys.
pub const ADMIN_API_KEYS: &str = "/api/admin/api-keys";
/// Admin: revoke an API key.
pub const ADMIN_API_KEY: &str = "/api/admin/api-keys/{key_id}";
/// Admin: the audit log.
pub const ADMIN_AUDIT: &str = "/api/admin/audit";
/// Admin: verify the audit chain.
pub const ADMIN_AUDIT_VERIFY: &str = "/api/admin/audit/verify";
/// Admin: key status (versions, active, min-decrypt, times, blob counts; never seeds).
pub const ADMIN_KEYS: &str = "/api/admin/keys";
/// Admin: rotate to a new key version.
pub const ADMIN_KEYS_ROTATE: &str = "/api/admin/keys/rotate";
/// Admin: retire key versions up to one (`{"up_to": N}`).
pub const ADMIN_KEYS_RETIRE: &str = "/api/admin/keys/retire";
/// Admin: destroy a retired key version (`{"version": N, "confirm_blobs": M}`).
pub const ADMIN_KEYS_DESTROY: &str = "/api/admin/keys/destroy";
/// Admin: the rewrap job (GET progress, POST start).
pub const ADMIN_KEYS_REWRAP: &str = "/api/admin/keys/rewrap";

/// Miner: the deployment parameters a miner needs before logging in ([`crate::miner::MinerConfig`]).
pub const MINER_CONFIG: &str = "/api/miner/config";
/// Miner: log in with a signed `MinerLogin`.
pub const MINER_LOGIN: &str = "/api/miner/login";
/// Miner: long-poll for a lease.
pub const MINER_LEASE: &str = "/api/miner/lease";
/// Miner: extend a lease.
pub const MINER_HEARTBEAT: &str = "/api/miner/leases/{lease_id}/heartbeat";
/// Miner: give a lease back.
pub const MINER_RELEASE: &str = "/api/miner/leases/{lease_id}/release";
/// Miner: fail the task for good (e.g. the prompt blob does not authenticate).
pub const MINER_FAIL: &str = "/api/miner/leases/{lease_id}/fail";
/// Miner: the task key, wrapped, for a signed `KeyRequest`.
pub const MINER_KEY: &str = "/api/miner/leases/{lease_id}/key";
/// Miner: the sealed prompt blob.
pub const MINER_PROMPT: &str = "/api/miner/leases/{lease_id}/prompt";
/// Miner: upload the sealed result (streamed as it is produced).
pub const MINER_RESULT: &str = "/api/miner/leases/{lease_id}/result";
/// Miner: submit the signed `TaskResult`.
pub const MINER_COMPLETE: &str = "/api/miner/leases/{lease_id}/complete";

/// Fills `{name}` in a route template.
pub fn fill(template: &str, name: &str, value: &str) -> String {
    template.replace(&format!("{{{name}}}"), value)
}

/// v3: deployment parameters for wallet-signing, client-sealing callers.
pub const V3_CONFIG: &str = "/api/v3/config";
/// v3: open a session with a signed `OpenSession`.
pub const V3_SESSIONS: &str = "/api/v3/sessions";
/// v3: one session (read token).
pub const V3_SESSION: &str = "/api/v3/sessions/{session_id}";
/// v3: close a session (read token of its owner).
pub const V3_SESSION_CLOSE: &str = "/api/v3/sessions/{session_id}/close";
/// v3: a wrapped key for a signed `KeyRequest`.
pub const V3_KEYS: &str = "/api/v3/keys";
/// v3: upload a client-sealed prompt blob through the router.
pub const V3_PROMPT: &str = "/api/v3/sessions/{session_id}/tasks/{task_id}/prompt";
/// v3: a presigned upload URL for a prompt blob.
pub const V3_PROMPT_PRESIGN: &str = "/api/v3/sessions/{session_id}/tasks/{task_id}/prompt/presign";
/// v3: submit a task with a signed `SubmitTask` (references only).
pub const V3_COMPLETIONS: &str = "/api/v3/completions";
/// v3: a task's state and result references (`?wait_ms=` long-polls until final).
pub const V3_TASK: &str = "/api/v3/tasks/{task_id}";
/// v3: the sealed result blob.
pub const V3_TASK_RESULT: &str = "/api/v3/tasks/{task_id}/result";
/// v3: a presigned download URL for the sealed result blob.
pub const V3_TASK_RESULT_PRESIGN: &str = "/api/v3/tasks/{task_id}/result/presign";
/// v3: SSE of the sealed result bytes as the miner produces them.
pub const V3_TASK_STREAM: &str = "/api/v3/tasks/{task_id}/stream";
