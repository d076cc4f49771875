//! Admin API: API keys and the audit log.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::auth::{API_KEY_PREFIX, Admin, new_secret};
use crate::error::{ApiError, ApiResult, Json};
use crate::state::{AppState, now_ms};
use crate::store::{ApiKey, NewApiKey, NewAuditEntry, verify_audit_chain};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(audit_log))
        .routes(routes!(audit_verify))
}

/// `POST /api/admin/api-keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// Owner label (sessions are owned by it). Must not start with `0x` (reserved for wallets).
    pub owner: String,
    /// Admin rights.
    #[serde(default)]
    pub admin: bool,
    /// Requests per minute; 0 = unlimited. Default 600.
    #[serde(default = "default_rate")]
    pub rate_per_minute: u32,
    /// Concurrent requests; 0 = unlimited. Default 64.
    #[serde(default = "default_concurrency")]
    pub max_concurrent: u32,
}

fn default_rate() -> u32 {
    600
}
fn default_concurrency() -> u32 {
    64
}

/// A new key and its secret, shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The key's record.
    pub key: ApiKey,
    /// The secret (`vk_…`); only its hash is stored, so it cannot be shown again.
    pub secret: String,
}

/// Validates and creates a key; used by the API, the CLI and first start.
pub async fn create_api_key(
    state: &AppState,
    actor: &str,
    req: &CreateKeyRequest,
) -> ApiResult<CreatedKey> {
    let owner = req.owner.trim();
    if owner.is_empty() || owner.len() > 128 {
        return Err(ApiError::invalid(
            "owner",
            "owner must be 1 to 128 characters",
        ));
    }
    if owner.starts_with("0x") {
        return Err(ApiError::invalid(
            "owner",
            "owner labels starting with 0x are reserved for wallet owners",
        ));
    }
    if owner.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid(
            "owner",
            "owner must not contain control characters",
        ));
    }
    let (secret, hash) = new_secret(API_KEY_PREFIX);
    let new = NewApiKey {
        id: Uuid::now_v7(),
        owner: owner.to_string(),
        hash,
        prefix: secret[..API_KEY_PREFIX.len() + 6].to_string(),
        admin: req.admin,
        rate_per_minute: req.rate_per_minute,
        max_concurrent: req.max_concurrent,
        created_at_ms: now_ms(),
    };
    let key = state.store.create_api_key(&new).await?;
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: actor.to_string(),
            action: "api_key.create".into(),
            detail: serde_json::json!({"key_id": key.id, "owner": key.owner, "admin": key.admin}),
            ..Default::default()
        })
        .await?;
    Ok(CreatedKey {
        key,
        secret: secret.to_string(),
    })
}

/// Create an API key for an owner. The secret is in this answer only.
#[utoipa::path(post, path = "/api/admin/api-keys", tag = "admin", security(("api_key" = [])),
    request_body = CreateKeyRequest,
    responses((status = 201, body = CreatedKey), (status = 400, body = veil_api::ErrorBody), (status = 403, body = veil_api::ErrorBody)))]
async fn create_key(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Json(req): Json<CreateKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let created = create_api_key(&state, &admin.actor(), &req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// List API keys (never secrets).
#[utoipa::path(get, path = "/api/admin/api-keys", tag = "admin", security(("api_key" = [])),
    responses((status = 200, body = Vec<ApiKey>)))]
async fn list_keys(State(state): State<AppState>, _admin: Admin) -> ApiResult<Json<Vec<ApiKey>>> {
    Ok(Json(state.store.list_api_keys().await?))
}

/// Revoke an API key (idempotent).
#[utoipa::path(delete, path = "/api/admin/api-keys/{key_id}", tag = "admin", security(("api_key" = [])),
    params(("key_id" = Uuid, Path, description = "key id")),
    responses((status = 200, body = ApiKey), (status = 404, body = veil_api::ErrorBody)))]
async fn revoke_key(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(key_id): Path<String>,
) -> ApiResult<Json<ApiKey>> {
    let id = parse_uuid("key_id", &key_id)?;
    let key = state.store.revoke_api_key(id, now_ms()).await?;
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: admin.actor(),
            action: "api_key.revoke".into(),
            detail: serde_json::json!({"key_id": id}),
            ..Default::default()
        })
        .await?;
    Ok(Json(key))
}

/// Paging through the audit log.
#[derive(Debug, Deserialize, IntoParams)]
pub struct AuditQuery {
    /// Entries after this seq (default 0).
    #[serde(default)]
    pub after: i64,
    /// At most this many (default 100, max 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Read the audit log (metadata only), oldest first.
#[utoipa::path(get, path = "/api/admin/audit", tag = "admin", security(("api_key" = [])),
    params(AuditQuery),
    responses((status = 200, description = "entries with seq, prev_hash and hash", body = Object)))]
async fn audit_log(
    State(state): State<AppState>,
    _admin: Admin,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::invalid(
            "limit",
            "limit must be between 1 and 1000",
        ));
    }
    let entries = state.store.audit_entries(q.after, limit).await?;
    Ok(Json(serde_json::json!({ "entries": entries })))
}

/// Re-check the audit hash chain.
#[utoipa::path(get, path = "/api/admin/audit/verify", tag = "admin", security(("api_key" = [])),
    responses((status = 200, description = "{\"ok\": true, \"entries\": n}", body = Object),
              (status = 409, description = "chain broken", body = veil_api::ErrorBody)))]
async fn audit_verify(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<Json<serde_json::Value>> {
    match verify_audit_chain(state.store.as_ref()).await {
        Ok(n) => Ok(Json(serde_json::json!({"ok": true, "entries": n}))),
        Err(crate::store::StoreError::AuditChain { seq, reason }) => Err(ApiError::conflict(
            "audit_chain_broken",
            format!("audit chain broken at seq {seq}: {reason}"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Parses a UUID path or body field, naming it on failure.
pub fn parse_uuid(field: &str, s: &str) -> ApiResult<Uuid> {
    let u = Uuid::parse_str(s)
        .map_err(|_| ApiError::invalid(field, format!("{field} must be a UUID")))?;
    if u.hyphenated().to_string() != s {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be a canonical lowercase hyphenated UUID"),
        ));
    }
    Ok(u)
}
