//! `GET /api/v2/deployment`: what a user of this deployment may want to check before trusting
//! it, read from the running system: which privacy contract (if any) decides who may decrypt,
//! where sealed blobs are stored and for how long, how keys are issued and rotated. Public and
//! cacheable; nothing in it is secret (no seed, no credential, no RPC URL).

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::state::AppState;
use crate::store::RetentionPolicy;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(deployment))
}

/// How long caches may keep the answer, in seconds.
const MAX_AGE_SECS: u32 = 60;

/// SHA-256 (hex) of the ACL contract's ABI: the `abi` array of the committed compiler artifact,
/// serialized compactly with object keys sorted. `jq -cjS .abi contracts/artifacts/VeilAcl.json |
/// sha256sum` reproduces it.
pub fn acl_abi_sha256() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let artifact: Value = serde_json::from_str(veil_contracts::ARTIFACT_JSON)
            .expect("the committed artifact is JSON");
        let abi = artifact.get("abi").cloned().unwrap_or(Value::Null);
        // serde_json's map keeps keys sorted (no `preserve_order`), so this is canonical.
        let bytes = serde_json::to_vec(&abi).expect("JSON serializes");
        hex::encode(Sha256::digest(bytes))
    })
}

/// The deployment's public facts.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deployment {
    /// Wire protocol version (protocol.md).
    pub protocol_version: u32,
    /// This router's version.
    pub router_version: &'static str,
    /// Who decides which miners may decrypt a session's prompts.
    #[schema(value_type = Object)]
    pub acl: Value,
    /// Where sealed blobs are stored.
    #[schema(value_type = Object)]
    pub storage: Value,
    /// Retention of sealed blobs.
    #[schema(value_type = Object)]
    pub retention: Value,
    /// Key versions and who may get which key.
    #[schema(value_type = Object)]
    pub keys: Value,
    /// Where prompts are sealed on each API.
    #[schema(value_type = Object)]
    pub sealing: Value,
}

fn acl_facts(state: &AppState) -> Value {
    let chain_id = state.cfg.domain.chain_id;
    match &state.acl {
        Some(acl) => {
            let c = acl.config();
            json!({
                "mode": "contract",
                "chain_id": chain_id,
                "contract": c.contract.to_checksum(None),
                "contract_abi_sha256": acl_abi_sha256(),
                "confirmations": c.confirmations,
                "max_staleness_ms": c.max_staleness.as_millis() as u64,
                "fresh": acl.is_fresh(),
                "verify_miner_keys": c.verify_miner_keys,
                "precedence": "sessions registered on chain take the contract's allowlist; other sessions are router-managed",
            })
        }
        None => json!({
            "mode": "router-managed",
            "chain_id": chain_id,
            "contract": null,
            "static_allowlist": state.cfg.static_allowed_miners,
        }),
    }
}

fn storage_facts(state: &AppState) -> Value {
    let id = state.blobs.id();
    json!({
        "type": id.storage_type.as_str(),
        "provider": id.provider,
        "bucket": id.bucket,
        "encryption": "every blob is sealed (AES-256-GCM, chunked, protocol §3) before it is stored",
    })
}

fn retention_facts(state: &AppState) -> Value {
    let d: &RetentionPolicy = &state.cfg.default_retention;
    json!({
        "default": d,
        "session_close": "deletes every blob of the session's finished tasks",
        "per_session": "owners may set their own policy (PUT /api/v2/sessions/{id}/policy)",
        "sweep_interval_ms": state.cfg.retention_sweep_interval_ms,
        "deletions_audited": true,
        "unnamed_blobs": match state.cfg.orphan_sweep_interval_secs {
            0 => json!({"swept": false}),
            every => json!({
                "swept": true,
                "sweep_interval_secs": every,
                "grace_secs": state.cfg.orphan_grace_secs,
                "what": "blobs no task names (uploads never submitted, results that lost to another) are deleted once older than the grace period",
            }),
        },
    })
}

fn key_facts(state: &AppState) -> Value {
    let versions = state.keys.versions();
    let active = state.keys.active_version();
    let active_since = versions
        .iter()
        .find(|v| v.version == active)
        .map(|v| v.created_at);
    let min_decrypt = versions
        .iter()
        .filter(|v| {
            matches!(
                v.state,
                veil_keys::KeyState::Active | veil_keys::KeyState::DecryptOnly
            )
        })
        .map(|v| v.version)
        .min();
    json!({
        "active_version": active,
        "active_since": active_since,
        "min_decrypt_version": min_decrypt,
        "versions": versions,
        "derivation": "HKDF-SHA256 from versioned seeds: K_session per session, K_task per task (protocol §2)",
        "issuance": {
            "session_key": "only to the session owner, wrapped to an X25519 key of its signed request",
            "task_key": "only to the miner holding the task's lease while it is valid and allowed for the session (or to the session owner), wrapped to its X25519 key",
            "router": "derives a task key in memory to seal /api/v2 prompts and open their results, for one request",
        },
        "audited": true,
    })
}

/// Public facts about this deployment: protocol and router version, the ACL contract (chain id,
/// address, ABI hash) or router-managed allowlists, the storage provider and bucket, default
/// retention, key issuance policy, active key version and when it became active.
#[utoipa::path(get, path = "/api/v2/deployment", tag = "v2",
    responses((status = 200, body = Deployment)))]
async fn deployment(State(state): State<AppState>) -> Response {
    let body = Deployment {
        protocol_version: 1,
        router_version: env!("CARGO_PKG_VERSION"),
        acl: acl_facts(&state),
        storage: storage_facts(&state),
        retention: retention_facts(&state),
        keys: key_facts(&state),
        sealing: json!({
            "v2": "at the router's edge; the plaintext stays in router memory for one request only",
            "client_only_sessions": "refuse /api/v2: their prompts must be sealed by the caller",
        }),
    };
    (
        [(
            header::CACHE_CONTROL,
            format!("public, max-age={MAX_AGE_SECS}"),
        )],
        axum::Json(body),
    )
        .into_response()
}
