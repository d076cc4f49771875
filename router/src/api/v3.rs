//! `/api/v3`: wallet-signed, client-sealed private inference.
//!
//! The caller signs `OpenSession`, `KeyRequest` and `SubmitTask` with its wallet (protocol §6)
//! and seals its prompt on its own machine. The router handles references only: ids, URNs,
//! hashes, key versions, non-secret sampling parameters and signatures. It never opens a blob
//! here and holds no plaintext at all (protocol §7.1).
//!
//! **Where keys exist in memory.** Only in `POST /api/v3/keys`, inside the key service's wrap
//! step ([`crate::state::KeyService::wrap_session_key`] and
//! [`crate::state::KeyService::wrap_task_key`]): `K_session` or `K_task` is derived from the
//! keyring, wrapped to the recipient's X25519 key (protocol §4) and dropped — zeroized — before
//! the wrap function returns, after every authorization check has passed and the nonce has been
//! spent. No handler of this module derives a key for its own use, opens a blob or holds a key
//! across an `await`.
//!
//! **Read tokens.** `vst_` + 32 random bytes (hex). Only their SHA-256 is stored; the token text
//! exists in memory only while the answer that carries it is built. A token opens the read
//! endpoints of one session for its owner, for an hour at most and never past the session.
//!
//! Logs name ids, hashes, sizes and key versions only: never tokens, keys, signatures, presigned
//! URLs or blob bytes.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;
use veil_api::eip712::{
    KIND_DEDICATED, KIND_POOLED, KeyRequest, Message, Sig65, Signed, TaskResult,
};
use veil_api::miner::{BlobReceipt, TaskParams, Usage};
use veil_api::v3::{
    KeyResponse, OpenSessionRequest, OpenSessionResponse, PROMPT_SHA256_HEADER, PresignedUrl,
    ReadToken, StreamEvent, SubmitTaskRequest, TOKEN_PREFIX, TaskFailure, V3Config, V3Result,
    V3Session, V3Task,
};
use veil_api::wire::{Hex32, unix_now};
use veil_blobstore::{PresignMethod, Urn};
use veil_keys::{Header, KeyId, Purpose, Scope, X25519Public};

use super::admin::parse_uuid;
use super::miner::{blob_error, read_head, store_sealed};
use super::v2::{
    check_sampling, default_privacy, delivered, parse_miners, result_deleted, task_deadline,
};
use crate::auth::new_secret;
use crate::error::{ApiError, ApiResult, Json};
use crate::limits::Permit;
use crate::state::{AppState, RelayMsg, RelaySubscription, now_ms};
use crate::store::{
    AllowlistSource, ApiKey, NewAuditEntry, NewSession, NewTask, PrivacySetting, ReadTokenRecord,
    SealedBy, SealingPolicy, Session, SessionKind, StoreError, Task, TaskState,
};

/// Longest `wait_ms` of `GET /api/v3/tasks/{task_id}`.
pub const MAX_WAIT_MS: u64 = 60_000;
/// Longest life of a read token.
pub const TOKEN_TTL_MS: i64 = 3_600_000;
/// Life of a presigned URL.
pub const PRESIGN_TTL: Duration = Duration::from_secs(600);
/// Requests per minute per wallet (the API-key default).
const OWNER_RATE_PER_MINUTE: u32 = 600;
/// Concurrent requests per wallet (the API-key default).
const OWNER_MAX_CONCURRENT: u32 = 64;
/// Largest piece of a stored result sent as one `bytes` event.
const STREAM_PIECE: usize = 64 * 1024;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(config))
        .routes(routes!(open_session))
        .routes(routes!(get_session))
        .routes(routes!(close_session))
        .routes(routes!(keys))
        .routes(routes!(prompt_presign))
        .routes(routes!(completions))
        .routes(routes!(task))
        .routes(routes!(result))
        .routes(routes!(result_presign))
        .routes(routes!(stream))
        .merge(
            // Prompt uploads are streamed and bounded by `max_blob_bytes` in the handler.
            OpenApiRouter::new()
                .routes(routes!(upload_prompt))
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

// ---------------------------------------------------------------------------------------------
// Callers: wallets (by signature) and read-token holders

/// Admits one request of `owner` (a checksummed address) by the per-caller limits, with the
/// API-key defaults: 429 with `Retry-After` beyond them.
async fn admit(state: &AppState, owner: &str) -> ApiResult<Permit> {
    // The limiter is keyed by an id; a wallet's is derived from its address.
    let digest = Sha256::digest(format!("veil/v3/owner/{owner}").as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    state
        .limits
        .admit(&ApiKey {
            id: Uuid::from_bytes(id),
            owner: owner.to_string(),
            prefix: String::new(),
            admin: false,
            rate_per_minute: OWNER_RATE_PER_MINUTE,
            max_concurrent: OWNER_MAX_CONCURRENT,
            default_session: None,
            created_at_ms: 0,
            revoked_at_ms: None,
        })
        .await
}

/// The owner of one session, by a read token (`Authorization: Bearer vst_…`), admitted by the
/// owner's limits.
#[derive(Debug)]
pub struct Reader {
    /// Checksummed owner address.
    pub owner: String,
    /// The one session the token opens.
    pub session_id: Uuid,
    /// Held until the request (and its stream) ends.
    pub permit: Permit,
}

fn invalid_token() -> ApiError {
    ApiError::unauthorized(
        "invalid_token",
        "send Authorization: Bearer vst_… with a read token of this session (from POST \
         /api/v3/sessions or a scope 1 POST /api/v3/keys); this one is missing, unknown or \
         expired",
    )
    .param("Authorization")
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| t.starts_with(TOKEN_PREFIX))
            .ok_or_else(invalid_token)?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let rec = match state.store.read_token(&hash, now_ms()).await {
            Ok(r) => r,
            Err(StoreError::NotFound { .. }) => return Err(invalid_token()),
            Err(e) => return Err(e.into()),
        };
        let permit = admit(state, &rec.owner).await?;
        Ok(Reader {
            owner: rec.owner,
            session_id: rec.session_id,
            permit,
        })
    }
}

/// Issues a read token of `session` to its owner: one hour at most, never past the session.
async fn issue_token(state: &AppState, session: &Session) -> ApiResult<ReadToken> {
    let (token, token_hash) = new_secret(TOKEN_PREFIX);
    let now = now_ms();
    let expires_at_ms = session
        .expires_at_ms
        .map_or(now + TOKEN_TTL_MS, |e| e.min(now + TOKEN_TTL_MS));
    state
        .store
        .create_read_token(&ReadTokenRecord {
            token_hash,
            owner: session.owner.clone(),
            session_id: session.id,
            created_at_ms: now,
            expires_at_ms,
        })
        .await?;
    Ok(ReadToken {
        token: token.to_string(),
        expires_at: (expires_at_ms / 1000).max(0) as u64,
    })
}

/// The checksummed signer of a signed message, admitted by its limits. A verification failure
/// names its field under `prefix`, where the message is nested (`open.`, `task.`, or none).
async fn signed_by<M: Message>(
    state: &AppState,
    signed: &Signed<M>,
    prefix: &str,
) -> ApiResult<(String, Permit)> {
    let signer = signed
        .verify(&state.cfg.domain, unix_now())
        .map_err(|e| {
            let mut e = ApiError::from(e);
            if let Some(p) = e.param.take() {
                e.param = Some(format!("{prefix}{p}"));
            }
            e
        })?
        .to_checksum(None);
    let permit = admit(state, &signer).await?;
    Ok((signer, permit))
}

/// Spends a signed message's `(signer, nonce)` pair, kept until the message expires; a spent
/// pair is answered 409 `replayed_nonce` naming `param`.
async fn spend_nonce(
    state: &AppState,
    signer: &str,
    nonce: &[u8; 16],
    expires_at: u64,
    param: &str,
) -> ApiResult<()> {
    state
        .store
        .use_nonce(signer, nonce, (expires_at as i64) * 1000)
        .await
        .map_err(|e| {
            let mut e = ApiError::from(e);
            if e.code == "replayed_nonce" {
                e.param = Some(param.into());
            }
            e
        })
}

async fn audit(state: &AppState, e: NewAuditEntry) -> ApiResult<()> {
    state.store.audit(&e).await?;
    Ok(())
}

fn not_found(what: &str, param: &str) -> ApiError {
    ApiError::not_found(what).param(param)
}

/// The token's session, reconciled with the chain; 404 for any other session (existence is
/// not revealed).
async fn reader_session(state: &AppState, reader: &Reader, id: Uuid) -> ApiResult<Session> {
    if id != reader.session_id {
        return Err(not_found("session", "session_id"));
    }
    match state.store.get_session(id).await {
        Ok(s) if s.owner == reader.owner => crate::acl::reconcile(state, s).await,
        Ok(_) | Err(StoreError::NotFound { .. }) => Err(not_found("session", "session_id")),
        Err(e) => Err(e.into()),
    }
}

/// A task of the token's session; 404 for any other task (existence is not revealed).
async fn reader_task(state: &AppState, reader: &Reader, id: Uuid) -> ApiResult<Task> {
    match state.store.get_task(id).await {
        Ok(t) if t.session_id == reader.session_id => Ok(t),
        Ok(_) | Err(StoreError::NotFound { .. }) => Err(not_found("task", "task_id")),
        Err(e) => Err(e.into()),
    }
}

/// The session a signed message names, as stored; 404 naming `param` when there is none.
async fn named_session(state: &AppState, id: Uuid, param: &str) -> ApiResult<Session> {
    match state.store.get_session(id).await {
        Err(StoreError::NotFound { .. }) => Err(not_found("session", param)),
        other => Ok(other?),
    }
}

fn session_closed(param: &str) -> ApiError {
    ApiError::conflict("session_closed", "the session is closed or expired").param(param)
}

/// 409 `session_closed`, naming `param`, unless the session is open.
fn check_open(session: &Session, param: &str) -> ApiResult<()> {
    if session.is_open(now_ms()) {
        Ok(())
    } else {
        Err(session_closed(param))
    }
}

/// The token's session and the task id of a `…/sessions/{session_id}/tasks/{task_id}/…` path.
async fn session_task_path(
    state: &AppState,
    reader: &Reader,
    (session_id, task_id): &(String, String),
) -> ApiResult<(Session, Uuid)> {
    let session_id = parse_uuid("session_id", session_id)?;
    let task_id = parse_uuid("task_id", task_id)?;
    let session = reader_session(state, reader, session_id).await?;
    Ok((session, task_id))
}

/// 409 `task_exists` when a task with this id exists (in any session).
async fn check_new_task_id(state: &AppState, id: Uuid, param: &str) -> ApiResult<()> {
    if id.is_nil() {
        return Err(ApiError::invalid(
            param,
            "the task id must not be the nil UUID",
        ));
    }
    match state.store.get_task(id).await {
        Ok(_) => Err(task_exists(param)),
        Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn task_exists(param: &str) -> ApiError {
    ApiError::conflict(
        "task_exists",
        "a task with this id already exists; pick a new id",
    )
    .param(param)
}

// ---------------------------------------------------------------------------------------------
// Views

fn session_view(s: &Session) -> V3Session {
    V3Session {
        session_id: s.id,
        owner: s.owner.clone(),
        kind: s.kind.as_str().into(),
        private: s.privacy.private,
        allowed_miners: s.privacy.allowed_miners.clone(),
        allowlist_source: s.privacy.source.as_str().into(),
        created_at_ms: s.created_at_ms,
        expires_at_ms: s.expires_at_ms,
        closed_at_ms: s.closed_at_ms,
    }
}

/// Why a failed, dead or cancelled task ended: the stored code, or one by state.
fn task_failure(t: &Task) -> TaskFailure {
    let code = t.error_code.clone().unwrap_or_else(|| {
        match t.state {
            TaskState::Dead => "task_dead",
            TaskState::Cancelled => "task_cancelled",
            _ => "task_failed",
        }
        .into()
    });
    let why = t
        .error_message
        .clone()
        .or(t.error_code.clone())
        .unwrap_or_default();
    TaskFailure {
        code,
        message: format!("task {} {}: {}", t.id, t.state.as_str(), why),
    }
}

/// The task as its owner sees it; a completed task's result carries the miner's signed
/// `TaskResult`, rebuilt from the stored record.
fn task_view(t: &Task) -> ApiResult<V3Task> {
    let error = matches!(
        t.state,
        TaskState::Failed | TaskState::Dead | TaskState::Cancelled
    )
    .then(|| task_failure(t));
    let result = match (t.state, &t.result) {
        (TaskState::Completed, Some(r)) => {
            let signature: [u8; 65] = r.signature.as_slice().try_into().map_err(|_| {
                ApiError::internal("reading a task result", "stored signature is not 65 bytes")
            })?;
            Some(V3Result {
                signed: Signed {
                    message: TaskResult {
                        session_id: t.session_id,
                        task_id: t.id,
                        prompt_hash: Hex32(t.prompt_hash),
                        result_hash: Hex32(r.result_hash),
                        result_urn: r.result_urn.clone(),
                    },
                    signature: Sig65(signature),
                },
                miner: r.miner.clone(),
                size: r.result_size,
                usage: Usage {
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.completion_tokens,
                },
                finish_reason: r.finish_reason.clone(),
                deleted: t.result_deleted_at_ms.is_some(),
            })
        }
        _ => None,
    };
    Ok(V3Task {
        task_id: t.id,
        session_id: t.session_id,
        state: t.state.as_str().into(),
        model: t.model.clone(),
        key_version: t.key_version,
        prompt_urn: t.prompt_urn.clone(),
        prompt_hash: Hex32(t.prompt_hash),
        attempts: t.attempts,
        created_at_ms: t.created_at_ms,
        error,
        result,
    })
}

// ---------------------------------------------------------------------------------------------
// Config and sessions

/// What a client needs to sign and seal for this deployment.
#[utoipa::path(get, path = "/api/v3/config", tag = "v3", responses((status = 200, body = V3Config)))]
async fn config(State(state): State<AppState>) -> Json<V3Config> {
    let (active, min_decrypt, _) = state.keys.snapshot();
    Json(V3Config {
        protocol_version: 1,
        domain: state.cfg.domain,
        active_key_version: active,
        min_decrypt_version: min_decrypt,
        max_blob_bytes: state.cfg.max_blob_bytes,
        presigned_urls: state.blobs.can_presign(),
    })
}

/// Open a session with a signed `OpenSession`; its signer becomes the owner. The answer holds
/// a read token for the session.
#[utoipa::path(post, path = "/api/v3/sessions", tag = "v3", request_body = OpenSessionRequest,
    responses((status = 201, body = OpenSessionResponse),
              (status = 400, body = veil_api::ErrorBody),
              (status = 401, description = "signature_expired, signature_expiry_too_far, bad_signature", body = veil_api::ErrorBody),
              (status = 409, description = "replayed_nonce, session_exists", body = veil_api::ErrorBody),
              (status = 429, body = veil_api::ErrorBody)))]
async fn open_session(
    State(state): State<AppState>,
    Json(req): Json<OpenSessionRequest>,
) -> ApiResult<(StatusCode, Json<OpenSessionResponse>)> {
    let (signer, _permit) = signed_by(&state, &req.open, "open.").await?;
    let msg = &req.open.message;
    let kind = match msg.kind {
        KIND_DEDICATED => SessionKind::Dedicated,
        KIND_POOLED => SessionKind::Pooled,
        _ => {
            return Err(ApiError::invalid(
                "open.message.kind",
                "kind is 1 (dedicated) or 2 (pooled)",
            ));
        }
    };
    if msg.session_id.is_nil() {
        return Err(ApiError::invalid(
            "open.message.sessionId",
            "the session id must not be the nil UUID",
        ));
    }
    if let Some(t) = req.ttl_secs
        && (t == 0 || t > 365 * 24 * 3600)
    {
        return Err(ApiError::invalid(
            "ttl_secs",
            "ttl_secs must be between 1 and one year",
        ));
    }
    let privacy = if req.allowed_miners.is_empty() {
        default_privacy(&state)
    } else {
        PrivacySetting {
            private: true,
            allowed_miners: parse_miners("allowed_miners", &req.allowed_miners)?,
            source: AllowlistSource::Router,
        }
    };
    spend_nonce(
        &state,
        &signer,
        &msg.nonce.0,
        msg.expires_at,
        "open.message.nonce",
    )
    .await?;
    let exists = || {
        ApiError::conflict("session_exists", "a session with this id already exists")
            .param("open.message.sessionId")
    };
    match state.store.get_session(msg.session_id).await {
        Ok(_) => return Err(exists()),
        Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let now = now_ms();
    let s = state
        .store
        .create_session(&NewSession {
            id: msg.session_id,
            owner: signer.clone(),
            kind,
            privacy,
            created_at_ms: now,
            expires_at_ms: req.ttl_secs.map(|t| now + (t as i64) * 1000),
            retention: state.cfg.default_retention,
            sealing: SealingPolicy::ClientOnly,
        })
        .await
        .map_err(|e| match e {
            StoreError::AlreadyExists { .. } => exists(),
            other => other.into(),
        })?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now,
            actor: signer.clone(),
            action: "session.create".into(),
            session_id: Some(s.id),
            detail: json!({"api": "v3", "kind": s.kind, "private": s.privacy.private, "allowed_miners": s.privacy.allowed_miners, "source": s.privacy.source, "retention": s.retention, "sealing": s.sealing}),
            ..Default::default()
        },
    )
    .await?;
    // A session registered on chain takes the chain's allowlist.
    let s = crate::acl::reconcile(&state, s).await?;
    let token = issue_token(&state, &s).await?;
    tracing::info!(session_id = %s.id, owner = %signer, kind = s.kind.as_str(), "v3 session opened");
    Ok((
        StatusCode::CREATED,
        Json(OpenSessionResponse {
            session: session_view(&s),
            token,
        }),
    ))
}

/// The token's session.
#[utoipa::path(get, path = "/api/v3/sessions/{session_id}", tag = "v3", security(("read_token" = [])),
    params(("session_id" = Uuid, Path,)),
    responses((status = 200, body = V3Session), (status = 401, body = veil_api::ErrorBody), (status = 404, body = veil_api::ErrorBody)))]
async fn get_session(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
) -> ApiResult<Json<V3Session>> {
    let id = parse_uuid("session_id", &id)?;
    let s = reader_session(&state, &reader, id).await?;
    Ok(Json(session_view(&s)))
}

/// Close the token's session: its queued and leased tasks are cancelled and its blobs deleted
/// by the retention sweeper. Answers the closed session.
#[utoipa::path(post, path = "/api/v3/sessions/{session_id}/close", tag = "v3", security(("read_token" = [])),
    params(("session_id" = Uuid, Path,)),
    responses((status = 200, body = V3Session), (status = 401, body = veil_api::ErrorBody), (status = 404, body = veil_api::ErrorBody)))]
async fn close_session(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
) -> ApiResult<Json<V3Session>> {
    let id = parse_uuid("session_id", &id)?;
    reader_session(&state, &reader, id).await?;
    let cancelled = state.store.close_session(id, now_ms()).await?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now_ms(),
            actor: reader.owner.clone(),
            action: "session.close".into(),
            session_id: Some(id),
            detail: json!({"api": "v3", "cancelled_tasks": cancelled}),
            ..Default::default()
        },
    )
    .await?;
    // Closing deletes the session's blobs: let the sweeper start now.
    state.retention_wake.notify_one();
    let s = state.store.get_session(id).await?;
    Ok(Json(session_view(&s)))
}

// ---------------------------------------------------------------------------------------------
// Keys

/// Refuses a key request: audited as `key.deny`, counted, answered with `status`.
#[allow(clippy::too_many_arguments)]
async fn deny(
    state: &AppState,
    signer: &str,
    msg: &KeyRequest,
    status: StatusCode,
    code: &'static str,
    message: String,
    param: &str,
    retry_after: Option<u64>,
) -> ApiError {
    metrics::counter!("veil_acl_denials_total", "code" => code).increment(1);
    let _ = state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: signer.to_string(),
            action: "key.deny".into(),
            session_id: Some(msg.session_id),
            task_id: (!msg.task_id.is_nil()).then_some(msg.task_id),
            key_version: Some(msg.key_version),
            detail: json!({"api": "v3", "scope": msg.scope, "code": code}),
            ..Default::default()
        })
        .await;
    tracing::warn!(signer, session_id = %msg.session_id, task_id = %msg.task_id, scope = msg.scope, code, "v3 key request refused");
    let mut e = ApiError::new(status, code, message).param(param);
    e.retry_after = retry_after;
    e
}

/// Refuses a key version that cannot be derived: unknown (400), retired or destroyed (403).
fn check_key_version(state: &AppState, version: u32) -> ApiResult<()> {
    let (_, min_decrypt, versions) = state.keys.snapshot();
    let field = "message.keyVersion";
    let Some(info) = versions.iter().find(|v| v.version == version) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_key_version",
            format!("the keyring has no key version {version}"),
        )
        .param(field));
    };
    if info.state == veil_keys::KeyState::Destroyed {
        return Err(ApiError::forbidden(
            "key_version_destroyed",
            format!("key version {version} was destroyed"),
        )
        .param(field));
    }
    if version < min_decrypt || info.state == veil_keys::KeyState::Retired {
        return Err(ApiError::forbidden(
            "key_version_retired",
            format!("key version {version} is retired"),
        )
        .param(field));
    }
    Ok(())
}

/// A wrap failure with the key-version field named as this request names it.
fn wrap_error(mut e: ApiError) -> ApiError {
    if e.param.as_deref() == Some("key_version") {
        e.param = Some("message.keyVersion".into());
        if e.code == "unknown_key_version" {
            e.status = StatusCode::BAD_REQUEST;
        }
    }
    e
}

/// A key for a signed `KeyRequest`, wrapped to its `recipient`: `K_session` (scope 1) for the
/// session owner, with a fresh read token; `K_task` (scope 2) for the owner, or for the miner
/// that holds an active lease of the task and is allowed for the session.
#[utoipa::path(post, path = "/api/v3/keys", tag = "v3", request_body = Signed<KeyRequest>,
    responses((status = 200, body = KeyResponse),
              (status = 400, description = "unknown_key_version and malformed requests", body = veil_api::ErrorBody),
              (status = 401, description = "signature_expired, signature_expiry_too_far, bad_signature", body = veil_api::ErrorBody),
              (status = 403, description = "not_owner, not_allowed, key_version_retired, key_version_destroyed", body = veil_api::ErrorBody),
              (status = 404, body = veil_api::ErrorBody),
              (status = 409, description = "replayed_nonce, session_closed", body = veil_api::ErrorBody),
              (status = 503, description = "acl_stale", body = veil_api::ErrorBody)))]
async fn keys(
    State(state): State<AppState>,
    Json(req): Json<Signed<KeyRequest>>,
) -> ApiResult<Json<KeyResponse>> {
    let (signer, _permit) = signed_by(&state, &req, "").await?;
    let msg = &req.message;
    let scope = match msg.scope {
        1 => Scope::Session,
        2 => Scope::Task,
        _ => {
            return Err(ApiError::invalid(
                "message.scope",
                "scope is 1 (session key) or 2 (task key)",
            ));
        }
    };
    match (scope, msg.task_id.is_nil()) {
        (Scope::Session, false) => {
            return Err(ApiError::invalid(
                "message.taskId",
                "a session key request (scope 1) names the nil task id",
            ));
        }
        (Scope::Task, true) => {
            return Err(ApiError::invalid(
                "message.taskId",
                "a task key request (scope 2) names its task",
            ));
        }
        _ => {}
    }
    let session = named_session(&state, msg.session_id, "message.sessionId").await?;
    let session = crate::acl::reconcile(&state, session).await?;
    check_open(&session, "message.sessionId")?;
    check_key_version(&state, msg.key_version)?;
    let is_owner = signer == session.owner;
    let recipient = X25519Public::from_bytes(msg.recipient.0);
    let miner_release = match scope {
        Scope::Session => {
            if !is_owner {
                return Err(deny(
                    &state,
                    &signer,
                    msg,
                    StatusCode::FORBIDDEN,
                    "not_owner",
                    "only the session owner gets the session key".into(),
                    "signature",
                    None,
                )
                .await);
            }
            false
        }
        Scope::Task if is_owner => false,
        Scope::Task => {
            // Anyone but the owner: the miner holding an active lease of the task, allowed for
            // the session now.
            let not_allowed = "only the session owner or the miner holding the task's lease \
                               gets a task key";
            let task = match state.store.get_task(msg.task_id).await {
                Ok(t) if t.session_id == session.id => Some(t),
                Ok(_) | Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let holds_lease = task.as_ref().is_some_and(|t| {
                t.state == TaskState::Leased
                    && t.leased_by.as_deref() == Some(signer.as_str())
                    && t.lease_expires_at_ms.is_some_and(|e| e > now_ms())
            });
            let Some(task) = task.filter(|_| holds_lease) else {
                return Err(deny(
                    &state,
                    &signer,
                    msg,
                    StatusCode::FORBIDDEN,
                    "not_allowed",
                    not_allowed.into(),
                    "signature",
                    None,
                )
                .await);
            };
            if msg.key_version != task.key_version {
                return Err(deny(
                    &state,
                    &signer,
                    msg,
                    StatusCode::FORBIDDEN,
                    "key_version_mismatch",
                    format!("the task is sealed under key version {}", task.key_version),
                    "message.keyVersion",
                    None,
                )
                .await);
            }
            // The privacy allowlist, or for contract-backed sessions the live view of the chain.
            if let Err(r) = crate::acl::may_receive_key(&state, &session, &signer, &msg.recipient.0)
            {
                return Err(deny(
                    &state,
                    &signer,
                    msg,
                    r.status,
                    r.code,
                    r.message,
                    "message.sessionId",
                    r.retry_after,
                )
                .await);
            }
            true
        }
    };
    spend_nonce(
        &state,
        &signer,
        &msg.nonce.0,
        msg.expires_at,
        "message.nonce",
    )
    .await?;
    // The only place a key exists in this module: derived, wrapped and zeroized inside.
    let wrapped = match scope {
        Scope::Session => state
            .keys
            .wrap_session_key(msg.key_version, &session.id, &recipient),
        Scope::Task => {
            state
                .keys
                .wrap_task_key(msg.key_version, &session.id, &msg.task_id, &recipient)
        }
    }
    .map_err(wrap_error)?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now_ms(),
            actor: signer.clone(),
            action: "key.release".into(),
            session_id: Some(session.id),
            task_id: (scope == Scope::Task).then_some(msg.task_id),
            miner: miner_release.then(|| signer.clone()),
            key_version: Some(msg.key_version),
            detail: json!({"api": "v3", "scope": msg.scope, "recipient": msg.recipient}),
        },
    )
    .await?;
    let label = if scope == Scope::Session {
        "session"
    } else {
        "task"
    };
    metrics::counter!("veil_keys_released_total", "scope" => label).increment(1);
    tracing::info!(session_id = %session.id, task_id = %msg.task_id, scope = msg.scope, key_version = msg.key_version, "v3 key released");
    let token = if scope == Scope::Session {
        Some(issue_token(&state, &session).await?)
    } else {
        None
    };
    Ok(Json(KeyResponse {
        wrapped: hex::encode(wrapped),
        key_version: msg.key_version,
        scope: msg.scope,
        token,
    }))
}

// ---------------------------------------------------------------------------------------------
// Prompt uploads

/// The expected SHA-256 from [`PROMPT_SHA256_HEADER`]: 64 lowercase hex digits.
fn expected_sha256(headers: &HeaderMap) -> ApiResult<[u8; 32]> {
    let bad = || {
        ApiError::invalid(
            PROMPT_SHA256_HEADER,
            format!("{PROMPT_SHA256_HEADER} must be the blob's SHA-256 as 64 lowercase hex digits"),
        )
    };
    let v = headers
        .get(PROMPT_SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(bad)?;
    if v.len() != 64
        || !v
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(v, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// Checks a client-sealed prompt's header: task scope, purpose prompt, this session and task,
/// and the active key version (409 `key_version_stale` otherwise). Faults name `field`.
fn check_prompt_header(
    h: &Header,
    session_id: Uuid,
    task_id: Uuid,
    active: u32,
    field: &str,
) -> ApiResult<()> {
    if h.scope() != Scope::Task {
        return Err(ApiError::invalid(
            field,
            "prompts are sealed under the task key (scope 2)",
        ));
    }
    if h.purpose != Purpose::Prompt {
        return Err(ApiError::invalid(
            field,
            "the blob's purpose must be prompt (1)",
        ));
    }
    if h.key.session_id != session_id || h.key.task_id != Some(task_id) {
        return Err(ApiError::invalid(
            field,
            "the header names another session or task",
        ));
    }
    if h.key.key_version != active {
        return Err(ApiError::conflict(
            "key_version_stale",
            format!(
                "prompts must be sealed under the active key version {active}; this one is \
                 under version {}",
                h.key.key_version
            ),
        )
        .param(field));
    }
    Ok(())
}

fn hash_mismatch(param: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "hash_mismatch",
        "the blob's SHA-256 is not the one given; nothing was kept",
    )
    .param(param)
}

/// A blob-store failure while a prompt is stored: a body that is not a sealed blob is the
/// caller's fault.
fn prompt_store_error(e: veil_blobstore::Error) -> ApiError {
    match e {
        veil_blobstore::Error::NotSealed { source } => {
            ApiError::invalid("body", format!("not a sealed blob: {}", source.code()))
        }
        other => blob_error("storing the prompt", other),
    }
}

/// Upload a client-sealed prompt (task scope, purpose prompt, this session and task, the
/// active key version) with its SHA-256 in `x-veil-sha256`. The header is checked as it
/// arrives and the hash before the blob is kept; a refused upload leaves nothing stored.
#[utoipa::path(put, path = "/api/v3/sessions/{session_id}/tasks/{task_id}/prompt", tag = "v3", security(("read_token" = [])),
    params(("session_id" = Uuid, Path,), ("task_id" = Uuid, Path,),
           ("x-veil-sha256" = String, Header, description = "SHA-256 of the whole blob, 64 lowercase hex digits")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the sealed prompt blob"),
    responses((status = 201, body = BlobReceipt),
              (status = 400, description = "body.header faults, hash_mismatch, a bad x-veil-sha256", body = veil_api::ErrorBody),
              (status = 401, body = veil_api::ErrorBody), (status = 404, body = veil_api::ErrorBody),
              (status = 409, description = "session_closed, task_exists, key_version_stale", body = veil_api::ErrorBody),
              (status = 413, body = veil_api::ErrorBody)))]
async fn upload_prompt(
    State(state): State<AppState>,
    reader: Reader,
    Path(path): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<BlobReceipt>)> {
    let (session, task_id) = session_task_path(&state, &reader, &path).await?;
    let session_id = session.id;
    let expected = expected_sha256(&headers)?;
    check_open(&session, "session_id")?;
    check_new_task_id(&state, task_id, "task_id").await?;
    let active = state.keys.active_version();
    // The header is checked as it arrives and the hash before the blob becomes visible; on
    // any refusal the upload is aborted, so nothing is stored.
    let receipt = store_sealed(
        &state,
        body,
        "storing the prompt",
        |h| check_prompt_header(h, session_id, task_id, active, "body.header"),
        None,
        |ours| {
            if ours == &expected {
                Ok(())
            } else {
                Err(hash_mismatch(PROMPT_SHA256_HEADER))
            }
        },
        prompt_store_error,
    )
    .await?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now_ms(),
            actor: reader.owner.clone(),
            action: "prompt.upload".into(),
            session_id: Some(session_id),
            task_id: Some(task_id),
            key_version: Some(active),
            detail: json!({"api": "v3", "urn": receipt.urn, "sha256": receipt.sha256, "size": receipt.size}),
            ..Default::default()
        },
    )
    .await?;
    tracing::info!(%session_id, %task_id, size = receipt.size, key_version = active, "v3 prompt stored");
    Ok((StatusCode::CREATED, Json(receipt)))
}

fn presign_error(e: veil_blobstore::Error) -> ApiError {
    match e {
        veil_blobstore::Error::PresignUnsupported { .. } => presign_unsupported(),
        other => blob_error("presigning a URL", other),
    }
}

fn presign_unsupported() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "presign_unsupported",
        "this router's blob store cannot sign URLs; upload and download through the router",
    )
}

/// 501 `presign_unsupported` unless the blob store can sign URLs.
fn check_presign(state: &AppState) -> ApiResult<()> {
    if state.blobs.can_presign() {
        Ok(())
    } else {
        Err(presign_unsupported())
    }
}

/// A presigned URL to `method` the blob of `urn`, for [`PRESIGN_TTL`]. Audited as
/// `blob.presign` of `purpose` (`prompt`, `result`), by the actor and for the ids of `entry`.
async fn presigned_url(
    state: &AppState,
    method: PresignMethod,
    urn: &Urn,
    purpose: &str,
    entry: NewAuditEntry,
) -> ApiResult<PresignedUrl> {
    let url = state
        .blobs
        .presign(method, urn, PRESIGN_TTL)
        .await
        .map_err(presign_error)?;
    let expires_at = unix_now() + PRESIGN_TTL.as_secs();
    let method = match method {
        PresignMethod::Put => "PUT",
        PresignMethod::Get => "GET",
    };
    audit(
        state,
        NewAuditEntry {
            at_ms: now_ms(),
            action: "blob.presign".into(),
            detail: json!({"api": "v3", "method": method, "purpose": purpose, "urn": urn.to_string(), "expires_at": expires_at}),
            ..entry
        },
    )
    .await?;
    Ok(PresignedUrl {
        method: method.into(),
        url: url.to_string(),
        urn: urn.to_string(),
        expires_at,
    })
}

/// A presigned `PUT` URL for a prompt blob (10 minutes), with the URN to name in
/// `SubmitTask.promptUrn`. What arrives there is checked when the task is submitted.
#[utoipa::path(post, path = "/api/v3/sessions/{session_id}/tasks/{task_id}/prompt/presign", tag = "v3", security(("read_token" = [])),
    params(("session_id" = Uuid, Path,), ("task_id" = Uuid, Path,)),
    responses((status = 200, body = PresignedUrl),
              (status = 401, body = veil_api::ErrorBody), (status = 404, body = veil_api::ErrorBody),
              (status = 409, description = "session_closed, task_exists", body = veil_api::ErrorBody),
              (status = 501, description = "presign_unsupported", body = veil_api::ErrorBody)))]
async fn prompt_presign(
    State(state): State<AppState>,
    reader: Reader,
    Path(path): Path<(String, String)>,
) -> ApiResult<Json<PresignedUrl>> {
    let (session, task_id) = session_task_path(&state, &reader, &path).await?;
    check_open(&session, "session_id")?;
    check_new_task_id(&state, task_id, "task_id").await?;
    check_presign(&state)?;
    // Named as the router names the blobs it stores for this task, so that the orphan sweep
    // can tell whose it is (a prompt never submitted is swept after the grace period).
    let key = KeyId::task(state.keys.active_version(), session.id, task_id);
    let urn = state
        .blobs
        .fresh_urn_for(&key, Purpose::Prompt)
        .map_err(presign_error)?;
    let entry = NewAuditEntry {
        actor: reader.owner.clone(),
        session_id: Some(session.id),
        task_id: Some(task_id),
        ..Default::default()
    };
    let presigned = presigned_url(&state, PresignMethod::Put, &urn, "prompt", entry).await?;
    Ok(Json(presigned))
}

// ---------------------------------------------------------------------------------------------
// Completions

/// Checks the non-secret sampling parameters as `/api/v2` does; stop sequences are refused
/// (they travel sealed, in the prompt).
fn validate_params(p: &TaskParams) -> ApiResult<TaskParams> {
    if !p.stop.is_empty() {
        return Err(ApiError::invalid(
            "params.stop",
            "stop sequences can reveal content: put them in the sealed prompt, not here",
        ));
    }
    let max_tokens = p.max_tokens.unwrap_or(256);
    check_sampling(
        "params.",
        (max_tokens, "max_tokens"),
        p.temperature,
        p.top_p,
    )?;
    Ok(TaskParams {
        max_tokens: Some(max_tokens),
        ..p.clone()
    })
}

/// Reads a stored prompt through its hash check, in bounded memory, and returns its header.
async fn read_prompt_header(state: &AppState, urn: &Urn, hash: &[u8; 32]) -> ApiResult<Header> {
    let urn_field = "task.message.promptUrn";
    let stream = match state.blobs.get_stream(urn, hash).await {
        Ok(s) => s,
        Err(veil_blobstore::Error::NotFound { .. }) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "prompt_missing",
                "no blob at promptUrn: upload the sealed prompt first",
            )
            .param(urn_field));
        }
        Err(e) => return Err(blob_error("reading the prompt blob", e).param(urn_field)),
    };
    let limit = state.cfg.max_blob_bytes;
    if stream.size() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "blob_too_large",
            format!("sealed blobs are at most {limit} bytes"),
        )
        .param(urn_field));
    }
    let head = read_head(stream, |e| match e {
        veil_blobstore::Error::HashMismatch { .. } => ApiError::new(
            StatusCode::BAD_REQUEST,
            "hash_mismatch",
            "the blob at promptUrn does not match promptHash",
        )
        .param("task.message.promptHash"),
        e => blob_error("reading the prompt blob", e).param(urn_field),
    })
    .await?;
    Header::parse(&head).map_err(|e| {
        ApiError::invalid(
            urn_field,
            format!("the blob at promptUrn is not a sealed blob: {}", e.code()),
        )
    })
}

/// Submit a task with a signed `SubmitTask` (references only). The prompt blob is read back
/// through its hash and its header checked before the task is queued.
#[utoipa::path(post, path = "/api/v3/completions", tag = "v3", request_body = SubmitTaskRequest,
    responses((status = 202, body = V3Task),
              (status = 400, description = "invalid params, prompt_missing, hash_mismatch, header faults", body = veil_api::ErrorBody),
              (status = 401, description = "signature_expired, signature_expiry_too_far, bad_signature", body = veil_api::ErrorBody),
              (status = 403, description = "not_owner", body = veil_api::ErrorBody),
              (status = 404, body = veil_api::ErrorBody),
              (status = 409, description = "replayed_nonce, session_closed, task_exists, key_version_stale", body = veil_api::ErrorBody),
              (status = 429, body = veil_api::ErrorBody),
              (status = 503, description = "acl_stale", body = veil_api::ErrorBody)))]
async fn completions(
    State(state): State<AppState>,
    Json(req): Json<SubmitTaskRequest>,
) -> ApiResult<(StatusCode, Json<V3Task>)> {
    let (signer, _permit) = signed_by(&state, &req.task, "task.").await?;
    let msg = &req.task.message;
    let session = named_session(&state, msg.session_id, "task.message.sessionId").await?;
    if session.owner != signer {
        return Err(
            ApiError::forbidden("not_owner", "only the session owner submits tasks to it")
                .param("task.signature"),
        );
    }
    let session = crate::acl::reconcile(&state, session).await?;
    check_open(&session, "task.message.sessionId")?;
    crate::acl::check_new_task(&state, &session)?;
    let params = validate_params(&req.params)?;
    if msg.model.trim().is_empty()
        || msg.model.chars().count() > 128
        || msg.model.chars().any(|c| c.is_control())
    {
        return Err(ApiError::invalid(
            "task.message.model",
            "model names are 1 to 128 printable characters",
        ));
    }
    let urn: Urn = msg.prompt_urn.parse().map_err(|e: veil_blobstore::Error| {
        ApiError::invalid("task.message.promptUrn", e.to_string())
    })?;
    if !state.blobs.owns(&urn) {
        return Err(ApiError::invalid(
            "task.message.promptUrn",
            "the URN names another blob store than this router's",
        ));
    }
    check_new_task_id(&state, msg.task_id, "task.message.taskId").await?;
    let active = state.keys.active_version();
    let h = read_prompt_header(&state, &urn, &msg.prompt_hash.0).await?;
    check_prompt_header(
        &h,
        session.id,
        msg.task_id,
        active,
        "task.message.promptUrn",
    )?;
    spend_nonce(
        &state,
        &signer,
        &msg.nonce.0,
        msg.expires_at,
        "task.message.nonce",
    )
    .await?;
    // A streaming caller opens its stream right after this answer: subscribe before the task
    // can be leased, so that a fast miner's upload is not missed.
    let relay = params.stream.then(|| state.relay.subscribe(msg.task_id));
    let now = now_ms();
    let task = state
        .store
        .enqueue(&NewTask {
            id: msg.task_id,
            session_id: session.id,
            prompt_urn: msg.prompt_urn.clone(),
            prompt_hash: msg.prompt_hash.0,
            prompt_scope: Scope::Task.as_byte(),
            key_version: h.key.key_version,
            model: msg.model.clone(),
            params,
            max_attempts: state.cfg.max_attempts,
            created_at_ms: now,
            deadline_ms: Some(task_deadline(&state, &session, now)),
            submitted_by: signer.clone(),
            sealed_by: SealedBy::Client,
        })
        .await
        .map_err(|e| match e {
            StoreError::AlreadyExists { .. } => task_exists("task.message.taskId"),
            StoreError::Conflict {
                code: "session_closed",
                ..
            } => session_closed("task.message.sessionId"),
            other => other.into(),
        })?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now,
            actor: signer.clone(),
            action: "task.enqueue".into(),
            session_id: Some(session.id),
            task_id: Some(task.id),
            key_version: Some(task.key_version),
            detail: json!({"api": "v3", "prompt_urn": task.prompt_urn, "prompt_hash": hex::encode(task.prompt_hash), "model": task.model}),
            ..Default::default()
        },
    )
    .await?;
    if let Some(relay) = relay {
        hold_stream(task.id, relay);
    }
    tracing::info!(task_id = %task.id, session_id = %session.id, key_version = task.key_version, model = %task.model, "v3 task queued");
    Ok((StatusCode::ACCEPTED, Json(task_view(&task)?)))
}

// ---------------------------------------------------------------------------------------------
// Tasks and results

/// `?wait_ms=`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct WaitQuery {
    /// Long-poll until the task is final, at most this many milliseconds (at most 60000).
    #[serde(default)]
    #[param(value_type = Option<u64>)]
    pub wait_ms: Option<String>,
}

/// A task's state; once completed, its result references and the miner's signed
/// `TaskResult`. `wait_ms` long-polls until the task is final.
#[utoipa::path(get, path = "/api/v3/tasks/{task_id}", tag = "v3", security(("read_token" = [])),
    params(("task_id" = Uuid, Path,), WaitQuery),
    responses((status = 200, body = V3Task), (status = 400, body = veil_api::ErrorBody),
              (status = 401, body = veil_api::ErrorBody), (status = 404, body = veil_api::ErrorBody)))]
async fn task(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<V3Task>> {
    let id = parse_uuid("task_id", &id)?;
    let wait_ms = match q.wait_ms.as_deref() {
        None => 0,
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|w| *w <= MAX_WAIT_MS)
            .ok_or_else(|| {
                ApiError::invalid(
                    "wait_ms",
                    format!("wait_ms is a number of milliseconds, at most {MAX_WAIT_MS}"),
                )
            })?,
    };
    let events = state.finished.watch(id);
    let mut t = reader_task(&state, &reader, id).await?;
    if wait_ms > 0 && !t.state.is_final() {
        t = match super::v2::wait_final(
            &state,
            id,
            events,
            Duration::from_millis(wait_ms),
            Some(t.clone()),
        )
        .await?
        {
            Some(done) => done,
            None => state.store.get_task(id).await?,
        };
    }
    Ok(Json(task_view(&t)?))
}

/// The completed task's stored result, or why there is none to read.
fn readable_result(t: &Task) -> ApiResult<(&crate::store::TaskResultRecord, Urn)> {
    let r = match (t.state, &t.result) {
        (TaskState::Completed, Some(r)) => r,
        _ => {
            return Err(ApiError::conflict(
                "task_not_completed",
                format!("task {} is {}, not completed", t.id, t.state.as_str()),
            )
            .param("task_id"));
        }
    };
    if t.result_deleted_at_ms.is_some() {
        return Err(result_deleted(t));
    }
    let urn: Urn = r
        .result_urn
        .parse()
        .map_err(|e| ApiError::internal("parsing a result URN", e))?;
    Ok((r, urn))
}

/// The sealed result blob, streamed through its hash check (a mismatch breaks the response
/// off). The delivery is recorded once the whole blob went out.
#[utoipa::path(get, path = "/api/v3/tasks/{task_id}/result", tag = "v3", security(("read_token" = [])),
    params(("task_id" = Uuid, Path,)),
    responses((status = 200, description = "the sealed result blob", content_type = "application/octet-stream"),
              (status = 401, body = veil_api::ErrorBody), (status = 404, body = veil_api::ErrorBody),
              (status = 409, description = "task_not_completed", body = veil_api::ErrorBody),
              (status = 410, description = "result_deleted", body = veil_api::ErrorBody)))]
async fn result(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = parse_uuid("task_id", &id)?;
    let t = reader_task(&state, &reader, id).await?;
    let (r, urn) = readable_result(&t)?;
    let hash = r.result_hash;
    let blob = state
        .blobs
        .get_stream(&urn, &hash)
        .await
        .map_err(|e| blob_error("reading the result", e))?;
    let size = blob.size();
    let permit = reader.permit;
    let body = futures::stream::unfold(Some((blob, state, t, permit)), |st| async move {
        let (mut blob, state, t, permit) = st?;
        match blob.next().await {
            Some(Ok(b)) => Some((Ok(b), Some((blob, state, t, permit)))),
            Some(Err(e)) => {
                tracing::warn!(task_id = %t.id, error = %e, "result blob failed its check while streaming");
                Some((Err(std::io::Error::other(e.kind_code())), None))
            }
            None => {
                delivered(&state, &t).await;
                None
            }
        }
    });
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(&hex::encode(hash)) {
        h.insert(HeaderName::from_static("x-veil-sha256"), v);
    }
    Ok(resp)
}

/// A presigned `GET` URL for the sealed result blob (10 minutes). Counts as a delivery.
#[utoipa::path(post, path = "/api/v3/tasks/{task_id}/result/presign", tag = "v3", security(("read_token" = [])),
    params(("task_id" = Uuid, Path,)),
    responses((status = 200, body = PresignedUrl),
              (status = 401, body = veil_api::ErrorBody), (status = 404, body = veil_api::ErrorBody),
              (status = 409, description = "task_not_completed", body = veil_api::ErrorBody),
              (status = 410, description = "result_deleted", body = veil_api::ErrorBody),
              (status = 501, description = "presign_unsupported", body = veil_api::ErrorBody)))]
async fn result_presign(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
) -> ApiResult<Json<PresignedUrl>> {
    let id = parse_uuid("task_id", &id)?;
    let t = reader_task(&state, &reader, id).await?;
    let (_, urn) = readable_result(&t)?;
    check_presign(&state)?;
    let entry = NewAuditEntry {
        actor: reader.owner.clone(),
        session_id: Some(t.session_id),
        task_id: Some(t.id),
        key_version: Some(t.key_version),
        ..Default::default()
    };
    let presigned = presigned_url(&state, PresignMethod::Get, &urn, "result", entry).await?;
    delivered(&state, &t).await;
    Ok(Json(presigned))
}

// ---------------------------------------------------------------------------------------------
// Streaming

type Tx = futures::channel::mpsc::Sender<Result<Event, Infallible>>;

/// How long a relay subscription taken when a streaming task is queued waits for its stream.
const PENDING_STREAM_GRACE: Duration = Duration::from_secs(30);

/// Relay subscriptions taken when a task with `params.stream` is queued, before any miner can
/// lease it, so that a stream opened right after the submission still gets every relayed byte
/// when a fast miner has already started uploading (as `/api/v2` subscribes before it queues).
/// The first `GET …/stream` of the task claims its subscription; an unclaimed one is dropped
/// after [`PENDING_STREAM_GRACE`]. Keyed by task id (unique), so one map serves every router
/// state of the process.
static PENDING_STREAMS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<Uuid, RelaySubscription>>,
> = std::sync::LazyLock::new(Default::default);

fn pending_streams()
-> std::sync::MutexGuard<'static, std::collections::HashMap<Uuid, RelaySubscription>> {
    PENDING_STREAMS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds `sub` for the task's first stream, for [`PENDING_STREAM_GRACE`].
fn hold_stream(task_id: Uuid, sub: RelaySubscription) {
    pending_streams().insert(task_id, sub);
    tokio::spawn(async move {
        tokio::time::sleep(PENDING_STREAM_GRACE).await;
        drop(take_stream(task_id));
    });
}

/// The subscription taken when the task was queued, if it is still waiting.
fn take_stream(task_id: Uuid) -> Option<RelaySubscription> {
    pending_streams().remove(&task_id)
}

/// Sends one event; false once the client is gone.
async fn send(out: &mut Tx, e: &StreamEvent) -> bool {
    let name = match e {
        StreamEvent::Start { .. } => "start",
        StreamEvent::Bytes { .. } => "bytes",
        StreamEvent::Done { .. } => "done",
    };
    let data = match serde_json::to_string(e) {
        Ok(d) => d,
        Err(_) => return false,
    };
    out.send(Ok(Event::default().event(name).data(data)))
        .await
        .is_ok()
}

fn b64(bytes: &[u8]) -> StreamEvent {
    StreamEvent::Bytes {
        b64: base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

/// Server-sent events of the sealed result as the miner uploads it, unopened: `start`
/// (discard what came before), `bytes` (standard base64) and `done` (the final task). The
/// `data` of each event is the JSON of [`StreamEvent`], tagged. When the relayed bytes are not
/// a complete copy of the stored result (the upload ran on another replica, or was retried),
/// the stored blob follows a new `start`. On an error an `error` event carries the error body
/// and the stream ends without `done`.
#[utoipa::path(get, path = "/api/v3/tasks/{task_id}/stream", tag = "v3", security(("read_token" = [])),
    params(("task_id" = Uuid, Path,)),
    responses((status = 200, description = "text/event-stream of start, bytes and done events", content_type = "text/event-stream"),
              (status = 401, body = veil_api::ErrorBody), (status = 404, body = veil_api::ErrorBody)))]
async fn stream(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = parse_uuid("task_id", &id)?;
    // Subscribe before looking at the task, so that no frame or event is missed; the
    // subscription taken when the task was queued, if any, has seen more.
    let relay = state.relay.subscribe(id);
    let events = state.finished.watch(id);
    let task = reader_task(&state, &reader, id).await?;
    let relay = take_stream(id).unwrap_or(relay);
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Event, Infallible>>(64);
    let timeout = Duration::from_millis(state.cfg.completion_timeout_ms);
    let permit = reader.permit;
    tokio::spawn(async move {
        let _permit = permit;
        let mut out = tx;
        if let Err(e) = drive_stream(&state, &task, relay, events, timeout, &mut out).await {
            tracing::warn!(task_id = %task.id, code = e.code, "v3 stream ended with an error");
            let body = json!({"error": {"code": e.code, "message": e.message, "type": "server_error", "param": e.param}});
            let _ = out
                .send(Ok(Event::default().event("error").data(body.to_string())))
                .await;
        }
    });
    Ok(Sse::new(rx)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// What the stream has relayed of the current upload attempt.
#[derive(Default)]
struct Relayed {
    /// A `start` went out for the upload being relayed, and every byte of it since.
    open: bool,
    /// Any `start` went out.
    started: bool,
    /// The relayed upload ended (`End`) with every byte forwarded: its hash.
    complete: Option<[u8; 32]>,
    hasher: Sha256,
}

impl Relayed {
    /// Handles one relay message; false once the client is gone.
    async fn on(&mut self, state: &AppState, task_id: Uuid, msg: RelayMsg, out: &mut Tx) -> bool {
        match msg {
            RelayMsg::Start { .. } => {
                let attempt = match state.store.get_task(task_id).await {
                    Ok(t) => t.attempts,
                    Err(_) => 0,
                };
                self.open = true;
                self.started = true;
                self.complete = None;
                self.hasher = Sha256::new();
                send(out, &StreamEvent::Start { attempt }).await
            }
            RelayMsg::Bytes(b) if self.open => {
                self.hasher.update(&b);
                for piece in b.chunks(STREAM_PIECE) {
                    if !send(out, &b64(piece)).await {
                        return false;
                    }
                }
                true
            }
            // Joined in the middle of an upload: its start was missed, so the stored blob will
            // be sent instead.
            RelayMsg::Bytes(_) => true,
            RelayMsg::End => {
                if self.open {
                    self.complete = Some(std::mem::take(&mut self.hasher).finalize().into());
                }
                self.open = false;
                true
            }
            RelayMsg::Abort => {
                self.open = false;
                self.complete = None;
                true
            }
        }
    }

    /// Bytes were missed (the subscriber lagged, or the relay closed).
    fn broken(&mut self) {
        self.open = false;
        self.complete = None;
    }
}

/// Forwards what the relay already holds, without waiting; false once the client is gone.
async fn drain_relay(
    state: &AppState,
    task_id: Uuid,
    relay: &mut RelaySubscription,
    relay_open: &mut bool,
    relayed: &mut Relayed,
    out: &mut Tx,
) -> bool {
    while *relay_open {
        match relay.rx.try_recv() {
            Ok(m) => {
                if !relayed.on(state, task_id, m, out).await {
                    return false;
                }
            }
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Lagged(_)) => relayed.broken(),
            Err(TryRecvError::Closed) => {
                relayed.broken();
                *relay_open = false;
            }
        }
    }
    true
}

async fn drive_stream(
    state: &AppState,
    task: &Task,
    mut relay: RelaySubscription,
    mut events: crate::state::FinishWatch,
    timeout: Duration,
    out: &mut Tx,
) -> ApiResult<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut relayed = Relayed::default();
    let mut relay_open = true;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut t = task.clone();
    loop {
        if t.state.is_final() {
            // Take what the relay already holds (the upload ends before the result is
            // submitted), then finish.
            if !drain_relay(
                state,
                task.id,
                &mut relay,
                &mut relay_open,
                &mut relayed,
                out,
            )
            .await
            {
                return Ok(());
            }
            return finish_stream(state, &t, &relayed, out).await;
        }
        let check = tokio::select! {
            msg = relay.rx.recv(), if relay_open => {
                match msg {
                    Ok(m) => {
                        if !relayed.on(state, task.id, m, out).await {
                            return Ok(());
                        }
                    }
                    Err(RecvError::Lagged(_)) => relayed.broken(),
                    Err(RecvError::Closed) => {
                        relayed.broken();
                        relay_open = false;
                    }
                }
                false
            }
            _ = events.ended() => true,
            _ = poll.tick() => true,
            _ = tokio::time::sleep_until(deadline) => {
                // Not final in time: end without `done`; the client polls the task instead.
                tracing::debug!(task_id = %task.id, "v3 stream reached its time limit");
                return Ok(());
            }
        };
        if check {
            t = state.store.get_task(task.id).await?;
        }
    }
}

/// Ends the stream of a final task: the stored result when the relayed bytes are not a complete
/// copy of it, then `done`.
async fn finish_stream(
    state: &AppState,
    done: &Task,
    relayed: &Relayed,
    out: &mut Tx,
) -> ApiResult<()> {
    let view = task_view(done)?;
    // Opens the bytes of the attempt that stands (or tells the client to drop what it got).
    let start = StreamEvent::Start {
        attempt: done.attempts,
    };
    let mut delivered_blob = false;
    if let (TaskState::Completed, Some(r)) = (done.state, &done.result) {
        if relayed.complete == Some(r.result_hash) && !relayed.open {
            delivered_blob = true;
        } else if done.result_deleted_at_ms.is_none() {
            let urn: Urn = r
                .result_urn
                .parse()
                .map_err(|e| ApiError::internal("parsing a result URN", e))?;
            let mut blob = state
                .blobs
                .get_stream(&urn, &r.result_hash)
                .await
                .map_err(|e| blob_error("reading the result", e))?;
            if !send(out, &start).await {
                return Ok(());
            }
            while let Some(chunk) = blob.next().await {
                let chunk: Bytes = chunk.map_err(|e| blob_error("reading the result", e))?;
                for piece in chunk.chunks(STREAM_PIECE) {
                    if !send(out, &b64(piece)).await {
                        return Ok(());
                    }
                }
            }
            delivered_blob = true;
        } else if relayed.started {
            // Bytes of an attempt that did not stand went out and the stored result is gone:
            // tell the client to drop them.
            if !send(out, &start).await {
                return Ok(());
            }
        }
    }
    if send(out, &StreamEvent::Done { task: view }).await && delivered_blob {
        delivered(state, done).await;
    }
    Ok(())
}
