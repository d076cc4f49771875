//! Admin API: key lifecycle (status, rotate, retire, destroy, rewrap). Admin API key required;
//! every change is audited. See [`crate::key_lifecycle`].

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Admin;
use crate::error::{ApiResult, Json, parse_json};
use crate::key_lifecycle::{
    self as lifecycle, DestroyOutcome, KeyChange, KeyStatus, RewrapOptions, RewrapProgress,
};
use crate::state::AppState;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(key_status))
        .routes(routes!(rotate))
        .routes(routes!(retire))
        .routes(routes!(destroy))
        .routes(routes!(rewrap_progress, rewrap_start))
}

/// Key status: versions, their state (`active`, `decrypt_only`, `retired`, `destroyed`), the
/// `active` and `min_decrypt` pointers, creation, rotation, retirement and destruction times,
/// and the stored blobs under each version. Never a seed.
#[utoipa::path(get, path = "/api/admin/keys", tag = "admin", security(("api_key" = [])),
    responses((status = 200, body = KeyStatus), (status = 403, body = veil_api::ErrorBody)))]
async fn key_status(State(state): State<AppState>, _admin: Admin) -> ApiResult<Json<KeyStatus>> {
    Ok(Json(lifecycle::status(&state).await?))
}

/// Rotate: add a key version with a fresh seed and make it active. Older versions still open
/// their blobs; `POST /api/admin/keys/rewrap` moves router-sealed blobs to the new version.
#[utoipa::path(post, path = "/api/admin/keys/rotate", tag = "admin", security(("api_key" = [])),
    responses((status = 200, body = KeyChange),
              (status = 409, description = "keyring_read_only: the keyring comes from VEIL_KEYRING or a secret file", body = veil_api::ErrorBody)))]
async fn rotate(State(state): State<AppState>, Admin(admin): Admin) -> ApiResult<Json<KeyChange>> {
    Ok(Json(lifecycle::rotate(&state, &admin.actor()).await?))
}

/// `POST /api/admin/keys/retire`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    /// Retire every version up to and including this one (below the active version).
    pub up_to: u32,
}

/// Retire key versions up to `up_to`: they refuse to derive keys, so blobs sealed under them
/// no longer open (`key_version_retired`). Idempotent.
#[utoipa::path(post, path = "/api/admin/keys/retire", tag = "admin", security(("api_key" = [])),
    request_body = RetireRequest,
    responses((status = 200, body = KeyChange),
              (status = 400, body = veil_api::ErrorBody),
              (status = 409, description = "key_version_active (rotate first) or keyring_read_only", body = veil_api::ErrorBody)))]
async fn retire(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Json(req): Json<RetireRequest>,
) -> ApiResult<Json<KeyChange>> {
    Ok(Json(
        lifecycle::retire(&state, &admin.actor(), req.up_to).await?,
    ))
}

/// `POST /api/admin/keys/destroy`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DestroyRequest {
    /// The retired version to destroy.
    pub version: u32,
    /// The number of stored blobs the caller agrees to make unreadable: the `affected_blobs`
    /// of a previous answer. Without it, or when it differs from the count now, nothing is
    /// destroyed and the answer is 409 `confirmation_required` with the count.
    #[serde(default)]
    pub confirm_blobs: Option<u64>,
}

/// The 409 answer to an unconfirmed destroy: the usual error body plus what it would affect.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfirmationRequired {
    /// `confirmation_required`, naming `confirm_blobs`.
    pub error: veil_api::ErrorDetail,
    /// The version.
    pub version: u32,
    /// Stored blobs sealed under it; send this as `confirm_blobs` to destroy.
    pub affected_blobs: u64,
    /// Tasks sealed under it.
    pub tasks: u64,
}

/// Destroy a retired key version's seed (crypto-shredding): every blob sealed under it becomes
/// unreadable for good. Send once without `confirm_blobs` to learn the number of stored blobs it
/// affects (409 `confirmation_required`, `affected_blobs`), then again with that number.
#[utoipa::path(post, path = "/api/admin/keys/destroy", tag = "admin", security(("api_key" = [])),
    request_body = DestroyRequest,
    responses((status = 200, body = KeyChange),
              (status = 404, description = "unknown_key_version", body = veil_api::ErrorBody),
              (status = 409, description = "confirmation_required (with affected_blobs), key_version_not_retired, key_version_active or keyring_read_only", body = ConfirmationRequired)))]
async fn destroy(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Json(req): Json<DestroyRequest>,
) -> ApiResult<Response> {
    match lifecycle::destroy(&state, &admin.actor(), req.version, req.confirm_blobs).await? {
        DestroyOutcome::Destroyed(change) => Ok(Json(change).into_response()),
        DestroyOutcome::ConfirmationRequired(impact) => {
            let message = match req.confirm_blobs {
                None => format!(
                    "destroying key version {} makes {} stored blob(s) unreadable for good; send \
                     confirm_blobs: {} to proceed",
                    impact.version, impact.affected_blobs, impact.affected_blobs
                ),
                Some(n) => format!(
                    "confirm_blobs is {n} but key version {} now affects {} stored blob(s); \
                     nothing was destroyed",
                    impact.version, impact.affected_blobs
                ),
            };
            let body = ConfirmationRequired {
                error: veil_api::ErrorDetail {
                    code: "confirmation_required".into(),
                    message,
                    kind: "invalid_request_error".into(),
                    param: Some("confirm_blobs".into()),
                },
                version: impact.version,
                affected_blobs: impact.affected_blobs,
                tasks: impact.tasks,
            };
            Ok((StatusCode::CONFLICT, axum::Json(body)).into_response())
        }
    }
}

/// Progress of this router's rewrap job (`remaining` is counted in the database now, so it
/// also reflects jobs run elsewhere).
#[utoipa::path(get, path = "/api/admin/keys/rewrap", tag = "admin", security(("api_key" = [])),
    responses((status = 200, body = RewrapProgress)))]
async fn rewrap_progress(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<Json<RewrapProgress>> {
    Ok(Json(lifecycle::rewrap_progress(&state).await?))
}

/// `POST /api/admin/keys/rewrap` (the body is optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewrapRequest {
    /// Tasks per batch (1 to 10000, default 100).
    #[serde(default)]
    pub batch: Option<u32>,
}

/// Start the rewrap job in the background: router-sealed blobs (`/api/v2` prompts and results)
/// of finished tasks under older, still decryptable versions are re-sealed under the active
/// version, task by task (new blob, switch of the task's references, deletion of the old blob).
/// Resumable: a run finishes what an interrupted one left. One job at a time per router.
#[utoipa::path(post, path = "/api/admin/keys/rewrap", tag = "admin", security(("api_key" = [])),
    request_body(content = Option<RewrapRequest>, content_type = "application/json"),
    responses((status = 202, body = RewrapProgress),
              (status = 409, description = "rewrap_running", body = veil_api::ErrorBody)))]
async fn rewrap_start(
    State(state): State<AppState>,
    Admin(admin): Admin,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<RewrapProgress>)> {
    let req: RewrapRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RewrapRequest::default()
    } else {
        parse_json(&body)?
    };
    let mut opts = RewrapOptions::new(admin.actor());
    if let Some(b) = req.batch {
        opts.batch = b;
    }
    let progress = lifecycle::start_rewrap(&state, opts).await?;
    Ok((StatusCode::ACCEPTED, Json(progress)))
}
