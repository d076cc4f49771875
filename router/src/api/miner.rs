//! The miner protocol, server side: login with a signed `MinerLogin`, long-poll leases,
//! heartbeats, the task key for a signed `KeyRequest`, the sealed prompt, the sealed result
//! upload (relayed to streaming callers), and the signed `TaskResult`.
//!
//! A key is released only to the holder of a valid lease, for that lease's task, to the X25519
//! key the miner logged in with, when the session still allows the miner. Every release and
//! every refusal is audited.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;
use veil_api::eip712::{KeyRequest, Signed};
use veil_api::miner::*;
use veil_api::wire::{Hex32, unix_now};
use veil_blobstore::Urn;
use veil_keys::{Header, Purpose, Scope, X25519Public};

use super::admin::parse_uuid;
use crate::auth::{MINER_TOKEN_PREFIX, Miner, new_secret};
use crate::error::{ApiError, ApiResult, Json};
use crate::state::{AppState, RelayMsg, StoredResult, now_ms};
use crate::store::{
    CompleteOutcome, LeaseQuery, LeasedTask, NewAuditEntry, NewMinerSession, StoreError,
    TaskResultRecord,
};

/// Longest long-poll.
pub const MAX_WAIT_MS: u64 = 30_000;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(config))
        .routes(routes!(login))
        .routes(routes!(lease))
        .routes(routes!(heartbeat))
        .routes(routes!(release))
        .routes(routes!(fail))
        .routes(routes!(key))
        .routes(routes!(prompt))
        .routes(routes!(complete))
        .merge(
            // Result uploads are streamed and bounded by `max_blob_bytes` in the handler.
            OpenApiRouter::new()
                .routes(routes!(result))
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

/// What a miner needs before logging in.
#[utoipa::path(get, path = "/api/miner/config", tag = "miner", responses((status = 200, body = MinerConfig)))]
async fn config(State(state): State<AppState>) -> Json<MinerConfig> {
    Json(MinerConfig {
        protocol_version: 1,
        domain: state.cfg.domain,
        lease_ttl_ms: state.cfg.lease_ttl_ms,
        max_wait_ms: MAX_WAIT_MS,
    })
}

async fn audit(state: &AppState, e: NewAuditEntry) -> ApiResult<()> {
    state.store.audit(&e).await?;
    Ok(())
}

/// Log in with a signed `MinerLogin`; the answer is a bearer token bound to the recovered
/// address and the X25519 key in the message.
#[utoipa::path(post, path = "/api/miner/login", tag = "miner", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 401, body = veil_api::ErrorBody),
              (status = 403, description = "refused by the on-chain ACL (miner_not_registered, miner_deactivated, miner_key_mismatch)", body = veil_api::ErrorBody),
              (status = 409, body = veil_api::ErrorBody),
              (status = 503, description = "acl_stale: the router's copy of the on-chain ACL is too old to check the key", body = veil_api::ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    Json(req): Json<LoginRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let now = unix_now();
    let signer = req.login.verify(&state.cfg.domain, now).map_err(|e| {
        let mut e = ApiError::from(e);
        if let Some(p) = e.param.take() {
            e.param = Some(format!("login.{p}"));
        }
        e
    })?;
    if req.models.is_empty() || req.models.len() > 64 {
        return Err(ApiError::invalid("models", "a miner serves 1 to 64 models"));
    }
    for (i, m) in req.models.iter().enumerate() {
        if m.name.is_empty() || m.name.len() > 128 || m.name.chars().any(|c| c.is_control()) {
            return Err(ApiError::invalid(
                &format!("models[{i}].name"),
                "model names are 1 to 128 printable characters",
            ));
        }
    }
    let recipient = X25519Public::from_bytes(req.login.message.recipient.0);
    crate::acl::check_login(&state, signer, &req.login.message.recipient.0).await?;
    let miner = signer.to_checksum(None);
    state
        .store
        .use_nonce(
            &miner,
            &req.login.message.nonce.0,
            (req.login.message.expires_at as i64) * 1000,
        )
        .await
        .map_err(|e| {
            let mut e = ApiError::from(e);
            if e.code == "replayed_nonce" {
                e.param = Some("login.message.nonce".into());
            }
            e
        })?;
    let (token, token_hash) = new_secret(MINER_TOKEN_PREFIX);
    let expires_at = now + state.cfg.miner_token_ttl_secs;
    state
        .store
        .create_miner_session(&NewMinerSession {
            token_hash,
            miner: miner.clone(),
            recipient: *recipient.as_bytes(),
            models: req
                .models
                .iter()
                .map(|m| (m.name.clone(), m.sha256.map(|h| h.to_string())))
                .collect(),
            created_at_ms: now_ms(),
            expires_at_ms: (expires_at as i64) * 1000,
        })
        .await?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now_ms(),
            actor: miner.clone(),
            action: "miner.login".into(),
            miner: Some(miner.clone()),
            detail: json!({"recipient": recipient.to_string(), "models": req.models.iter().map(|m| json!({"name": m.name, "sha256": m.sha256})).collect::<Vec<_>>() }),
            ..Default::default()
        },
    )
    .await?;
    tracing::info!(miner = %miner, models = req.models.len(), "miner logged in");
    Ok(Json(LoginResponse {
        token: token.to_string(),
        miner,
        expires_at,
    }))
}

fn lease_json(state: &AppState, l: &LeasedTask) -> Lease {
    Lease {
        lease_id: l.lease_id,
        task_id: l.task.id,
        session_id: l.task.session_id,
        prompt_urn: l.task.prompt_urn.clone(),
        prompt_hash: Hex32(l.task.prompt_hash),
        key_version: l.task.key_version,
        prompt_scope: l.task.prompt_scope,
        model: l.task.model.clone(),
        params: l.task.params.clone(),
        attempt: l.attempt,
        lease_expires_at_ms: l.lease_expires_at_ms as u64,
        lease_ttl_ms: state.cfg.lease_ttl_ms,
    }
}

/// The models of this miner session it may lease for: those it asked for, minus models whose
/// pinned hash differs from the one it reported.
fn leasable_models(
    state: &AppState,
    m: &NewMinerSession,
    wanted: Option<&[String]>,
) -> ApiResult<Vec<String>> {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for (name, hash) in &m.models {
        if let Some(w) = wanted
            && !w.iter().any(|x| x == name)
        {
            continue;
        }
        let pinned = state.cfg.pinned_models.iter().find(|(n, _)| n == name);
        match pinned {
            Some((_, want)) if hash.as_deref() != Some(want.as_str()) => refused.push(name.clone()),
            _ => out.push(name.clone()),
        }
    }
    if out.is_empty() {
        if !refused.is_empty() {
            return Err(ApiError::forbidden(
                "model_hash_mismatch",
                format!(
                    "the router pins the hash of {}; the files this miner reported differ",
                    refused.join(", ")
                ),
            )
            .param("models"));
        }
        return Err(ApiError::invalid(
            "models",
            "none of these models were served at login",
        ));
    }
    Ok(out)
}

/// Long-poll for a task of the miner's models and allowed sessions.
#[utoipa::path(post, path = "/api/miner/lease", tag = "miner", security(("miner_token" = [])),
    request_body = LeaseRequest,
    responses((status = 200, body = Lease), (status = 204, description = "nothing within wait_ms"), (status = 403, body = veil_api::ErrorBody)))]
async fn lease(
    State(state): State<AppState>,
    Miner(m): Miner,
    Json(req): Json<LeaseRequest>,
) -> ApiResult<Response> {
    if req.wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid(
            "wait_ms",
            format!("wait_ms is at most {MAX_WAIT_MS}"),
        ));
    }
    let models = leasable_models(&state, &m, req.models.as_deref())?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms);
    let models: Arc<[String]> = models.into();
    // The wake that brought this poll back to the queue, if any.
    let mut woken_by = None;
    loop {
        // Queued before the look, so that a task arriving after it wakes this poll.
        let mut wait = state.lease_polls.wait(&m.miner, Arc::clone(&models));
        let q = LeaseQuery {
            miner: m.miner.clone(),
            models: models.to_vec(),
            now_ms: now_ms(),
            ttl_ms: state.cfg.lease_ttl_ms as i64,
            lease_id: Uuid::now_v7(),
            skip_contract_sessions: crate::acl::skip_contract_sessions(&state),
        };
        let t_lease = std::time::Instant::now();
        if let Some(l) = state.store.lease(&q).await? {
            drop(wait);
            metrics::counter!("veil_leases_granted_total").increment(1);
            // How long the task waited in the queue before this lease (first attempt only).
            if l.attempt == 1 {
                metrics::histogram!("veil_router_step_seconds", "step" => "queue_wait")
                    .record((q.now_ms - l.task.created_at_ms).max(0) as f64 / 1e3);
            }
            audit(
                &state,
                NewAuditEntry {
                    at_ms: now_ms(),
                    actor: m.miner.clone(),
                    action: "task.lease".into(),
                    session_id: Some(l.task.session_id),
                    task_id: Some(l.task.id),
                    miner: Some(m.miner.clone()),
                    key_version: Some(l.task.key_version),
                    detail: json!({"lease_id": l.lease_id, "attempt": l.attempt}),
                },
            )
            .await?;
            metrics::histogram!("veil_router_step_seconds", "step" => "lease")
                .record(t_lease.elapsed().as_secs_f64());
            return Ok(Json(lease_json(&state, &l)).into_response());
        }
        // Nothing for this miner: whatever woke this poll may be for another miner.
        if let Some(w) = woken_by.take() {
            state.lease_polls.pass_on(w, Some(&m.miner));
        }
        // Wait for a task of one of our models (any replica), or look again now and then in
        // case an event was missed.
        let poll = tokio::time::sleep(Duration::from_millis(1000));
        tokio::select! {
            w = wait.woken() => woken_by = Some(w),
            _ = poll => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
        if tokio::time::Instant::now() >= deadline {
            if let Some(w) = woken_by.take() {
                state.lease_polls.pass_on(w, None);
            }
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

fn lease_path(s: &str) -> ApiResult<Uuid> {
    parse_uuid("lease_id", s)
}

/// Extend a lease.
#[utoipa::path(post, path = "/api/miner/leases/{lease_id}/heartbeat", tag = "miner", security(("miner_token" = [])),
    params(("lease_id" = Uuid, Path,)),
    responses((status = 200, body = HeartbeatResponse), (status = 409, body = veil_api::ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    Miner(m): Miner,
    Path(id): Path<String>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let id = lease_path(&id)?;
    let exp = state
        .store
        .heartbeat(id, &m.miner, now_ms(), state.cfg.lease_ttl_ms as i64)
        .await?;
    Ok(Json(HeartbeatResponse {
        lease_expires_at_ms: exp as u64,
    }))
}

fn reason_of(req: &ReleaseRequest) -> ApiResult<String> {
    let r = req.reason.trim();
    if r.len() > 200 || r.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid(
            "reason",
            "reason is at most 200 printable characters",
        ));
    }
    Ok(r.to_string())
}

/// Give a lease back; the task is queued again.
#[utoipa::path(post, path = "/api/miner/leases/{lease_id}/release", tag = "miner", security(("miner_token" = [])),
    params(("lease_id" = Uuid, Path,)), request_body = ReleaseRequest,
    responses((status = 204), (status = 409, body = veil_api::ErrorBody)))]
async fn release(
    State(state): State<AppState>,
    Miner(m): Miner,
    Path(id): Path<String>,
    Json(req): Json<ReleaseRequest>,
) -> ApiResult<StatusCode> {
    let id = lease_path(&id)?;
    let reason = reason_of(&req)?;
    let rec = state.store.lease_record(id, &m.miner).await?;
    state.store.release(id, &m.miner, now_ms()).await?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now_ms(),
            actor: m.miner.clone(),
            action: "task.release".into(),
            task_id: Some(rec.task_id),
            miner: Some(m.miner.clone()),
            detail: json!({"lease_id": id, "reason": reason}),
            ..Default::default()
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Fail the task for good (for example: the prompt blob does not authenticate).
#[utoipa::path(post, path = "/api/miner/leases/{lease_id}/fail", tag = "miner", security(("miner_token" = [])),
    params(("lease_id" = Uuid, Path,)), request_body = ReleaseRequest,
    responses((status = 204), (status = 409, body = veil_api::ErrorBody)))]
async fn fail(
    State(state): State<AppState>,
    Miner(m): Miner,
    Path(id): Path<String>,
    Json(req): Json<ReleaseRequest>,
) -> ApiResult<StatusCode> {
    let id = lease_path(&id)?;
    let reason = reason_of(&req)?;
    let lt = state.store.active_lease(id, &m.miner, now_ms()).await?;
    let code = if reason.is_empty() {
        "miner_failed".to_string()
    } else {
        reason.clone()
    };
    let message = match code.as_str() {
        "prompt_tampered" => "the prompt blob did not authenticate (hash or AEAD check failed); the stored blob is unchanged".to_string(),
        other => format!("the miner failed the task: {other}"),
    };
    state
        .store
        .fail(id, &m.miner, &code, &message, now_ms())
        .await?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now_ms(),
            actor: m.miner.clone(),
            action: "task.fail".into(),
            session_id: Some(lt.task.session_id),
            task_id: Some(lt.task.id),
            miner: Some(m.miner.clone()),
            key_version: Some(lt.task.key_version),
            detail: json!({"lease_id": id, "code": code}),
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Denies a key request: audited, counted, answered 403.
async fn deny(
    state: &AppState,
    miner: &str,
    lease_id: Uuid,
    task: Option<&crate::store::Task>,
    code: &'static str,
    message: String,
    param: &str,
) -> ApiError {
    metrics::counter!("veil_acl_denials_total", "code" => code).increment(1);
    let _ = state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: miner.to_string(),
            action: "key.deny".into(),
            session_id: task.map(|t| t.session_id),
            task_id: task.map(|t| t.id),
            miner: Some(miner.to_string()),
            key_version: task.map(|t| t.key_version),
            detail: json!({"lease_id": lease_id, "code": code}),
        })
        .await;
    tracing::warn!(miner, %lease_id, code, "key request refused");
    ApiError::forbidden(code, message).param(param)
}

/// The task key, wrapped to the miner's login key, for a signed `KeyRequest` (task scope).
#[utoipa::path(post, path = "/api/miner/leases/{lease_id}/key", tag = "miner", security(("miner_token" = [])),
    params(("lease_id" = Uuid, Path,)), request_body = Signed<KeyRequest>,
    responses((status = 200, body = WrappedKey), (status = 401, body = veil_api::ErrorBody), (status = 403, body = veil_api::ErrorBody),
              (status = 503, description = "acl_stale: the session's allowlist comes from the contract and the router's copy of it is too old", body = veil_api::ErrorBody)))]
async fn key(
    State(state): State<AppState>,
    Miner(m): Miner,
    Path(id): Path<String>,
    Json(req): Json<Signed<KeyRequest>>,
) -> ApiResult<Json<WrappedKey>> {
    let lease_id = lease_path(&id)?;
    let signer = req.verify(&state.cfg.domain, unix_now())?.to_checksum(None);
    if signer != m.miner {
        return Err(deny(
            &state,
            &m.miner,
            lease_id,
            None,
            "signer_mismatch",
            "the KeyRequest is not signed by the logged-in miner".into(),
            "signature",
        )
        .await);
    }
    let lt = match state.store.active_lease(lease_id, &m.miner, now_ms()).await {
        Ok(lt) => lt,
        Err(StoreError::Conflict { code, message }) => {
            return Err(deny(&state, &m.miner, lease_id, None, code, message, "lease_id").await);
        }
        Err(StoreError::NotFound { .. }) => {
            return Err(deny(
                &state,
                &m.miner,
                lease_id,
                None,
                "lease_not_held",
                "no such lease for this miner".into(),
                "lease_id",
            )
            .await);
        }
        Err(e) => return Err(e.into()),
    };
    let t = &lt.task;
    let msg = &req.message;
    if msg.scope != Scope::Task.as_byte() {
        return Err(deny(
            &state,
            &m.miner,
            lease_id,
            Some(t),
            "scope_not_allowed",
            "miners get task keys only (scope 2)".into(),
            "message.scope",
        )
        .await);
    }
    if msg.session_id != t.session_id || msg.task_id != t.id {
        return Err(deny(
            &state,
            &m.miner,
            lease_id,
            Some(t),
            "not_assigned",
            "the KeyRequest names another task than this lease's".into(),
            "message.taskId",
        )
        .await);
    }
    if msg.key_version != t.key_version {
        return Err(deny(
            &state,
            &m.miner,
            lease_id,
            Some(t),
            "key_version_mismatch",
            format!("the task is sealed under key version {}", t.key_version),
            "message.keyVersion",
        )
        .await);
    }
    if msg.recipient.0 != m.recipient {
        return Err(deny(
            &state,
            &m.miner,
            lease_id,
            Some(t),
            "recipient_mismatch",
            "the recipient is not the X25519 key this miner logged in with".into(),
            "message.recipient",
        )
        .await);
    }
    // The allowlist may have changed since the lease was granted.
    let session = state.store.get_session(t.session_id).await?;
    if !session.is_open(now_ms()) {
        return Err(deny(
            &state,
            &m.miner,
            lease_id,
            Some(t),
            "session_closed",
            "the session is closed".into(),
            "message.sessionId",
        )
        .await);
    }
    // Contract-backed sessions are decided on the live view of the chain.
    if let Err(r) = crate::acl::may_receive_key(&state, &session, &m.miner, &m.recipient) {
        let mut e = deny(
            &state,
            &m.miner,
            lease_id,
            Some(t),
            r.code,
            r.message,
            "message.sessionId",
        )
        .await;
        e.status = r.status;
        e.retry_after = r.retry_after;
        return Err(e);
    }
    state
        .store
        .use_nonce(&m.miner, &msg.nonce.0, (msg.expires_at as i64) * 1000)
        .await?;
    let wrapped = state.keys.wrap_task_key(
        t.key_version,
        &t.session_id,
        &t.id,
        &X25519Public::from_bytes(m.recipient),
    )?;
    audit(
        &state,
        NewAuditEntry {
            at_ms: now_ms(),
            actor: m.miner.clone(),
            action: "key.release".into(),
            session_id: Some(t.session_id),
            task_id: Some(t.id),
            miner: Some(m.miner.clone()),
            key_version: Some(t.key_version),
            detail: json!({"lease_id": lease_id, "scope": 2, "recipient": msg.recipient}),
        },
    )
    .await?;
    metrics::counter!("veil_keys_released_total", "scope" => "task").increment(1);
    Ok(Json(WrappedKey {
        wrapped: hex::encode(wrapped),
        key_version: t.key_version,
        scope: 2,
    }))
}

/// The sealed prompt blob of the leased task (hash-checked as it is read).
#[utoipa::path(get, path = "/api/miner/leases/{lease_id}/prompt", tag = "miner", security(("miner_token" = [])),
    params(("lease_id" = Uuid, Path,)),
    responses((status = 200, description = "the sealed blob", content_type = "application/octet-stream"), (status = 409, body = veil_api::ErrorBody)))]
async fn prompt(
    State(state): State<AppState>,
    Miner(m): Miner,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let lease_id = lease_path(&id)?;
    let lt = state
        .store
        .active_lease(lease_id, &m.miner, now_ms())
        .await?;
    let urn: Urn = lt
        .task
        .prompt_urn
        .parse()
        .map_err(|e| ApiError::internal("parsing a stored prompt URN", e))?;
    // Prompts are small (bounded by the request body limit or the upload limit): read them
    // whole so that a hash mismatch is found before a byte goes out.
    let blob = match state.blobs.get(&urn, &lt.task.prompt_hash).await {
        Ok(b) => b,
        Err(veil_blobstore::Error::HashMismatch { .. }) => {
            let message = "the stored prompt blob does not match its hash (tampered or corrupted); the blob is left as it is";
            state
                .store
                .fail(lease_id, &m.miner, "prompt_tampered", message, now_ms())
                .await?;
            audit(
                &state,
                NewAuditEntry {
                    at_ms: now_ms(),
                    actor: "router".into(),
                    action: "task.fail".into(),
                    session_id: Some(lt.task.session_id),
                    task_id: Some(lt.task.id),
                    miner: Some(m.miner.clone()),
                    key_version: Some(lt.task.key_version),
                    detail: json!({"lease_id": lease_id, "code": "prompt_tampered", "expected_sha256": hex::encode(lt.task.prompt_hash)}),
                },
            )
            .await?;
            tracing::warn!(task_id = %lt.task.id, "prompt blob hash mismatch; task failed");
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "prompt_tampered",
                message,
            ));
        }
        Err(e) => return Err(blob_error("reading the prompt blob", e)),
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-veil-sha256"),
                hex::encode(lt.task.prompt_hash),
            ),
        ],
        blob,
    )
        .into_response())
}

pub(crate) fn blob_error(context: &str, e: veil_blobstore::Error) -> ApiError {
    match &e {
        veil_blobstore::Error::NotFound { .. } => ApiError::new(
            StatusCode::NOT_FOUND,
            "blob_not_found",
            "the blob does not exist (deleted or never written)",
        ),
        veil_blobstore::Error::HashMismatch { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "blob_hash_mismatch",
            "the stored blob does not match its hash; it is left as it is",
        ),
        _ => ApiError::internal(context, e),
    }
}

/// Checks a result header against the lease's task.
fn check_result_header(h: &Header, t: &crate::store::Task) -> ApiResult<()> {
    let field = "body.header";
    if h.purpose != Purpose::Result {
        return Err(ApiError::invalid(
            field,
            "the blob's purpose must be result (2)",
        ));
    }
    if h.scope() != Scope::Task {
        return Err(ApiError::invalid(
            field,
            "results are sealed under the task key (scope 2)",
        ));
    }
    if h.key.session_id != t.session_id || h.key.task_id != Some(t.id) {
        return Err(ApiError::invalid(
            field,
            "the header names another session or task",
        ));
    }
    if h.key.key_version != t.key_version {
        return Err(ApiError::invalid(
            field,
            format!("the header's key version must be {}", t.key_version),
        ));
    }
    Ok(())
}

/// Upload the sealed result, streamed as it is produced. Frames are relayed to callers
/// streaming on this replica; the blob is stored under a fresh URN.
#[utoipa::path(put, path = "/api/miner/leases/{lease_id}/result", tag = "miner", security(("miner_token" = [])),
    params(("lease_id" = Uuid, Path,)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the sealed result blob"),
    responses((status = 201, body = BlobReceipt), (status = 400, body = veil_api::ErrorBody), (status = 409, body = veil_api::ErrorBody), (status = 413, body = veil_api::ErrorBody)))]
async fn result(
    State(state): State<AppState>,
    Miner(m): Miner,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<BlobReceipt>)> {
    let lease_id = lease_path(&id)?;
    let (_, task) = state.store.held_lease(lease_id, &m.miner).await?;
    if task.state.is_final() {
        return Err(ApiError::conflict(
            "task_final",
            format!("the task is already {}", task.state.as_str()),
        ));
    }
    let relay = state.relay.sender(&task.id);
    if let Some(tx) = &relay {
        let _ = tx.send(RelayMsg::Start { lease_id });
    }
    let outcome = store_sealed(
        &state,
        body,
        "storing the result",
        |h| check_result_header(h, &task),
        relay.as_ref(),
        |_| Ok(()),
        |e| blob_error("storing the result", e),
    )
    .await;
    match outcome {
        Ok(receipt) => {
            if let Some(tx) = &relay {
                let _ = tx.send(RelayMsg::End);
            }
            state.stored_results.insert(
                lease_id,
                StoredResult {
                    urn: receipt.urn.clone(),
                    sha256: receipt.sha256.0,
                    size: receipt.size,
                },
            );
            audit(
                &state,
                NewAuditEntry {
                    at_ms: now_ms(),
                    actor: m.miner.clone(),
                    action: "result.upload".into(),
                    session_id: Some(task.session_id),
                    task_id: Some(task.id),
                    miner: Some(m.miner.clone()),
                    key_version: Some(task.key_version),
                    detail: json!({"lease_id": lease_id, "urn": receipt.urn, "sha256": receipt.sha256, "size": receipt.size}),
                },
            )
            .await?;
            Ok((StatusCode::CREATED, Json(receipt)))
        }
        Err(e) => {
            if let Some(tx) = &relay {
                let _ = tx.send(RelayMsg::Abort);
            }
            Err(e)
        }
    }
}

/// Streams an uploaded sealed blob into the blob store, in bounded memory, and answers its
/// receipt. The body may hold at most `max_blob_bytes` (413 `blob_too_large`); its envelope
/// header goes to `check_header` as soon as its 108 bytes have arrived; every piece goes on to
/// `relay` when there is one; the SHA-256 of the whole body goes to `check_hash` before the blob
/// is kept. Blob-store failures are answered by `store_error`, and `context` names the step in
/// internal errors. On any refusal the upload is aborted, so nothing is stored.
pub(super) async fn store_sealed(
    state: &AppState,
    body: Body,
    context: &str,
    mut check_header: impl FnMut(&Header) -> ApiResult<()>,
    relay: Option<&tokio::sync::broadcast::Sender<RelayMsg>>,
    check_hash: impl FnOnce(&[u8; 32]) -> ApiResult<()>,
    store_error: impl Fn(veil_blobstore::Error) -> ApiError,
) -> ApiResult<BlobReceipt> {
    let mut stream = body.into_data_stream();
    let mut writer = state.blobs.writer();
    let mut head = Vec::with_capacity(veil_keys::HEADER_LEN);
    let mut header_checked = false;
    let mut total: u64 = 0;
    let mut hasher = Sha256::new();
    let limit = state.cfg.max_blob_bytes;
    let res: ApiResult<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::invalid("body", format!("the upload was interrupted: {e}"))
            })?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "blob_too_large",
                    format!("sealed blobs are at most {limit} bytes"),
                )
                .param("body"));
            }
            if !header_checked {
                let need = veil_keys::HEADER_LEN - head.len();
                head.extend_from_slice(&chunk[..need.min(chunk.len())]);
                if head.len() == veil_keys::HEADER_LEN {
                    let h = Header::parse(&head).map_err(|e| {
                        ApiError::invalid(
                            "body.header",
                            format!("not a v1 envelope header: {}", e.code()),
                        )
                    })?;
                    check_header(&h)?;
                    header_checked = true;
                }
            }
            hasher.update(&chunk);
            if let Some(tx) = relay {
                let _ = tx.send(RelayMsg::Bytes(chunk.clone()));
            }
            writer.write_bytes(chunk).await.map_err(&store_error)?;
        }
        if !header_checked {
            return Err(ApiError::invalid(
                "body",
                "the upload ended before a complete 108-byte header",
            ));
        }
        Ok(())
    }
    .await;
    let ours: [u8; 32] = hasher.finalize().into();
    if let Err(e) = res.and_then(|()| check_hash(&ours)) {
        let _ = writer.abort().await;
        return Err(e);
    }
    let r = writer.finish().await.map_err(&store_error)?;
    if r.sha256 != ours {
        let _ = state.blobs.delete(&r.urn).await;
        return Err(ApiError::internal(
            context,
            "hash of the stored bytes differs from the received bytes",
        ));
    }
    Ok(BlobReceipt {
        urn: r.urn.to_string(),
        sha256: Hex32(r.sha256),
        size: r.size,
    })
}

/// The first [`HEADER_LEN`](veil_keys::HEADER_LEN) bytes of a stored blob (all of it when it
/// is shorter), read to the end through its hash check, in bounded memory. Failures are
/// answered by `error`.
pub(super) async fn read_head(
    mut stream: veil_blobstore::BlobStream,
    error: impl Fn(veil_blobstore::Error) -> ApiError,
) -> ApiResult<Vec<u8>> {
    let mut head = Vec::with_capacity(veil_keys::HEADER_LEN);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(&error)?;
        if head.len() < veil_keys::HEADER_LEN {
            let need = veil_keys::HEADER_LEN - head.len();
            head.extend_from_slice(&chunk[..need.min(chunk.len())]);
        }
    }
    Ok(head)
}

/// Submit the signed `TaskResult`. The first valid result wins; a duplicate is answered
/// `duplicate` and changes nothing.
#[utoipa::path(post, path = "/api/miner/leases/{lease_id}/complete", tag = "miner", security(("miner_token" = [])),
    params(("lease_id" = Uuid, Path,)), request_body = CompleteRequest,
    responses((status = 200, body = CompleteResponse), (status = 400, body = veil_api::ErrorBody), (status = 409, body = veil_api::ErrorBody)))]
async fn complete(
    State(state): State<AppState>,
    Miner(m): Miner,
    Path(id): Path<String>,
    Json(req): Json<CompleteRequest>,
) -> ApiResult<Json<CompleteResponse>> {
    let lease_id = lease_path(&id)?;
    let signer = req
        .result
        .recover(&state.cfg.domain)
        .map_err(|e| ApiError::from(e).param("result.signature"))?;
    let signer = signer.to_checksum(None);
    if signer != m.miner {
        return Err(ApiError::forbidden(
            "signer_mismatch",
            "the TaskResult is not signed by the logged-in miner",
        )
        .param("result.signature"));
    }
    let (_, task) = state.store.held_lease(lease_id, &m.miner).await?;
    let msg = &req.result.message;
    if msg.task_id != task.id || msg.session_id != task.session_id {
        return Err(ApiError::invalid(
            "result.message.taskId",
            "the TaskResult names another task than this lease's",
        ));
    }
    if msg.prompt_hash.0 != task.prompt_hash {
        return Err(ApiError::invalid(
            "result.message.promptHash",
            "promptHash differs from the task's prompt hash",
        ));
    }
    if req.finish_reason.is_empty()
        || req.finish_reason.len() > 32
        || !req
            .finish_reason
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ApiError::invalid(
            "finish_reason",
            "finish_reason is 1 to 32 characters of [A-Za-z0-9_]",
        ));
    }
    if let Some(done) = task.result.as_ref() {
        // Answer duplicates without reading the blob store.
        let stored_here = state
            .stored_results
            .take(&lease_id)
            .is_some_and(|r| r.urn == msg.result_urn);
        discard_losing_result(&state, &m.miner, lease_id, &task, stored_here, msg, done).await;
        return Ok(Json(CompleteResponse {
            status: "duplicate".into(),
            result_hash: Hex32(done.result_hash),
        }));
    }
    let urn: Urn = msg.result_urn.parse().map_err(|e: veil_blobstore::Error| {
        ApiError::invalid("result.message.resultUrn", e.to_string())
    })?;
    if !state.blobs.owns(&urn) {
        return Err(ApiError::invalid(
            "result.message.resultUrn",
            "the URN names another blob store than this router's",
        ));
    }
    let mut stored_here = false;
    let size = match state.stored_results.take(&lease_id) {
        // Stored through this replica for this lease: its hash and header were checked as it
        // was stored.
        Some(r) if r.urn == msg.result_urn && r.sha256 == msg.result_hash.0 => {
            stored_here = true;
            r.size
        }
        _ => {
            // Read the blob back through the hash check, and check its header, in bounded
            // memory.
            let check_error =
                |e| blob_error("checking the result blob", e).param("result.message.resultHash");
            let stream = state
                .blobs
                .get_stream(&urn, &msg.result_hash.0)
                .await
                .map_err(check_error)?;
            let size = stream.size();
            let head = read_head(stream, check_error).await?;
            let h = Header::parse(&head).map_err(|e| {
                ApiError::invalid(
                    "result.message.resultUrn",
                    format!("not a sealed blob: {}", e.code()),
                )
            })?;
            check_result_header(&h, &task).map_err(|e| e.param("result.message.resultUrn"))?;
            size
        }
    };
    let record = TaskResultRecord {
        result_urn: msg.result_urn.clone(),
        result_hash: msg.result_hash.0,
        result_size: size,
        miner: m.miner.clone(),
        signature: req.result.signature.0.to_vec(),
        prompt_tokens: req.usage.prompt_tokens,
        completion_tokens: req.usage.completion_tokens,
        finish_reason: req.finish_reason.clone(),
    };
    match state
        .store
        .complete(lease_id, &m.miner, &record, now_ms())
        .await?
    {
        CompleteOutcome::Accepted(t) => {
            audit(
                &state,
                NewAuditEntry {
                    at_ms: now_ms(),
                    actor: m.miner.clone(),
                    action: "task.complete".into(),
                    session_id: Some(t.session_id),
                    task_id: Some(t.id),
                    miner: Some(m.miner.clone()),
                    key_version: Some(t.key_version),
                    detail: json!({"lease_id": lease_id, "prompt_hash": msg.prompt_hash, "result_hash": msg.result_hash, "result_urn": msg.result_urn}),
                },
            )
            .await?;
            metrics::counter!("veil_tasks_completed_total").increment(1);
            Ok(Json(CompleteResponse {
                status: "accepted".into(),
                result_hash: msg.result_hash,
            }))
        }
        CompleteOutcome::Duplicate(t) => {
            if let Some(done) = t.result.as_ref() {
                discard_losing_result(&state, &m.miner, lease_id, &t, stored_here, msg, done).await;
            }
            let h = t.result.map(|r| r.result_hash).unwrap_or_default();
            Ok(Json(CompleteResponse {
                status: "duplicate".into(),
                result_hash: Hex32(h),
            }))
        }
    }
}

/// Deletes the blob of a result that lost to another one (a duplicate under at-least-once
/// delivery: a lapsed lease's miner finished after the task was re-leased), so that it does not
/// stay behind, named by no task, until nobody knows it is there. Only a blob this replica
/// stored for this very lease is deleted (`stored_here`: its URN was fresh for that upload and
/// its header was checked against the task), never one a `TaskResult` merely names, and never
/// the standing result's. The deletion is audited like the retention sweeper's (`blob.delete`,
/// reason `duplicate`); a failed one is logged, and the sealed blob stays behind.
async fn discard_losing_result(
    state: &AppState,
    miner: &str,
    lease_id: Uuid,
    task: &crate::store::Task,
    stored_here: bool,
    msg: &veil_api::eip712::TaskResult,
    standing: &crate::store::TaskResultRecord,
) {
    if !stored_here || msg.result_urn == standing.result_urn {
        return;
    }
    let Ok(urn) = msg.result_urn.parse::<Urn>() else {
        return;
    };
    if let Err(e) = state.blobs.delete(&urn).await {
        tracing::warn!(task_id = %task.id, %lease_id, error = %e, "deleting a losing result blob failed");
        return;
    }
    metrics::counter!("veil_retention_deletions_total", "kind" => "result", "reason" => "duplicate")
        .increment(1);
    // The audit log says where every blob went.
    let audited = audit(
        state,
        NewAuditEntry {
            at_ms: now_ms(),
            actor: "router".into(),
            action: "blob.delete".into(),
            session_id: Some(task.session_id),
            task_id: Some(task.id),
            miner: Some(miner.to_owned()),
            key_version: Some(task.key_version),
            detail: json!({
                "blob": "result",
                "reason": "duplicate",
                "urn": msg.result_urn,
                "hash": msg.result_hash,
                "lease_id": lease_id,
            }),
        },
    )
    .await;
    if audited.is_err() {
        tracing::warn!(task_id = %task.id, %lease_id, "a losing result blob was deleted, but its audit entry could not be written");
    }
}
