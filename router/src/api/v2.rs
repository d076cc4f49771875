//! `/api/v2`: OpenAI-compatible completions with server-side sealing, models, tasks and
//! sessions.
//!
//! The prompt is sealed under `K_task` as soon as the request is parsed; the request bytes and
//! parsed strings are wiped, and only the sealed blob's reference is queued. The result is
//! opened in memory to answer the caller and then dropped.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;
use veil_api::miner::{ChatMessage, PromptPayload, TaskParams};
use veil_blobstore::Urn;
use veil_keys::{BlobParams, Header, KeyId, Opener, Purpose, Scope, SecretKey};
use zeroize::Zeroize;

use super::admin::parse_uuid;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json, parse_json};
use crate::state::{AppState, RelayMsg, now_ms};
use crate::store::{
    AllowlistSource, NewAuditEntry, NewSession, NewTask, PrivacySetting, RetentionPolicy,
    SealingPolicy, Session, SessionKind, Task, TaskState,
};

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(completions))
        .routes(routes!(chat_completions))
        .routes(routes!(models))
        .routes(routes!(task))
        .routes(routes!(create_session, list_sessions))
        .routes(routes!(get_session))
        .routes(routes!(close_session))
        .routes(routes!(set_privacy, get_privacy))
        .routes(routes!(set_policy))
}

// ---------------------------------------------------------------------------------------------
// Request shapes

/// A chat message as OpenAI clients send it: `content` is a string or a list of text parts.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MessageIn {
    /// `system`, `user`, `assistant`, `developer` or `tool`.
    pub role: String,
    /// Text, or `[{"type":"text","text":…}]`.
    #[schema(value_type = Object)]
    pub content: ContentIn,
}

/// Message content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ContentIn {
    /// Plain text.
    Text(String),
    /// Content parts; only text parts are supported.
    Parts(Vec<PartIn>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct PartIn {
    /// Must be `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// `prompt` of the legacy completions shape: a string or a one-element list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    /// One prompt.
    One(String),
    /// A list (exactly one element supported).
    Many(Vec<String>),
}

/// `stop`: a string or a list of up to 4.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopIn {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Veil's routing preferences.
#[derive(Debug, Deserialize, Default, ToSchema)]
pub struct RoutingPreferences {
    /// `private` requires a private session (allowed miners only); `standard` accepts any.
    #[serde(default)]
    pub privacy_level: Option<String>,
}

/// An OpenAI chat-completions (or legacy completions) body, plus Veil's `session_id` and
/// `routing_preferences`. Unknown OpenAI fields are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// Model name, as listed by `GET /api/v2/models`.
    pub model: Option<String>,
    /// Chat messages.
    #[serde(default)]
    pub messages: Option<Vec<MessageIn>>,
    /// Legacy prompt.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub prompt: Option<PromptIn>,
    /// Upper bound on generated tokens (1 to 32768, default 256).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// 0 to 2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Up to 4 stop sequences.
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>)]
    pub stop: Option<StopIn>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Answer with server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Only 1 is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// Veil: the session to run in (default: the API key's default session).
    #[serde(default)]
    pub session_id: Option<String>,
    /// Veil: routing preferences.
    #[serde(default)]
    pub routing_preferences: Option<RoutingPreferences>,
}

impl Drop for CompletionRequest {
    fn drop(&mut self) {
        if let Some(ms) = &mut self.messages {
            for m in ms.iter_mut() {
                m.role.zeroize();
                match &mut m.content {
                    ContentIn::Text(t) => t.zeroize(),
                    ContentIn::Parts(ps) => {
                        for p in ps.iter_mut() {
                            if let Some(t) = &mut p.text {
                                t.zeroize();
                            }
                        }
                    }
                }
            }
        }
        match &mut self.prompt {
            Some(PromptIn::One(p)) => p.zeroize(),
            Some(PromptIn::Many(ps)) => ps.iter_mut().for_each(|p| p.zeroize()),
            None => {}
        }
        match &mut self.stop {
            Some(StopIn::One(s)) => s.zeroize(),
            Some(StopIn::Many(ss)) => ss.iter_mut().for_each(|s| s.zeroize()),
            None => {}
        }
    }
}

/// A validated request: the sealed-to-be payload and the clear parameters.
struct Validated {
    model: String,
    payload: PromptPayload,
    params: TaskParams,
    chat: bool,
    include_usage: bool,
    session_id: Option<Uuid>,
    want_private: bool,
}

fn validate(mut r: CompletionRequest) -> ApiResult<Validated> {
    let model = r
        .model
        .take()
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("model", "model is required"))?;
    if model.len() > 128 || model.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid(
            "model",
            "model names are 1 to 128 printable characters",
        ));
    }
    if let Some(n) = r.n
        && n != 1
    {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    let mut payload = PromptPayload {
        messages: Vec::new(),
        prompt: None,
        stop: Vec::new(),
    };
    let chat = match (&mut r.messages, &mut r.prompt) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "send either messages or prompt, not both",
            ));
        }
        (None, None) => return Err(ApiError::invalid("messages", "messages is required")),
        (Some(ms), None) => {
            if ms.is_empty() {
                return Err(ApiError::invalid("messages", "messages must not be empty"));
            }
            if ms.len() > 1024 {
                return Err(ApiError::invalid("messages", "at most 1024 messages"));
            }
            for (i, m) in ms.iter_mut().enumerate() {
                if !matches!(
                    m.role.as_str(),
                    "system" | "user" | "assistant" | "developer" | "tool"
                ) {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        "role must be system, user, assistant, developer or tool",
                    ));
                }
                let content = match &mut m.content {
                    ContentIn::Text(t) => std::mem::take(t),
                    ContentIn::Parts(parts) => {
                        let mut s = String::new();
                        for (j, p) in parts.iter_mut().enumerate() {
                            if p.kind != "text" {
                                s.zeroize();
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}].type"),
                                    "only text content parts are supported",
                                ));
                            }
                            if let Some(t) = &p.text {
                                s.push_str(t);
                            }
                        }
                        s
                    }
                };
                payload.messages.push(ChatMessage {
                    role: m.role.clone(),
                    content,
                });
            }
            true
        }
        (None, Some(p)) => {
            let text = match p {
                PromptIn::One(s) => std::mem::take(s),
                PromptIn::Many(v) if v.len() == 1 => std::mem::take(&mut v[0]),
                PromptIn::Many(_) => {
                    return Err(ApiError::invalid(
                        "prompt",
                        "exactly one prompt is supported",
                    ));
                }
            };
            payload.prompt = Some(text);
            false
        }
    };
    payload.stop = match &mut r.stop {
        None => Vec::new(),
        Some(StopIn::One(s)) => vec![std::mem::take(s)],
        Some(StopIn::Many(v)) => {
            if v.len() > 4 {
                return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
            }
            v.iter_mut().map(std::mem::take).collect()
        }
    };
    if payload.stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    let max_tokens = r.max_completion_tokens.or(r.max_tokens).unwrap_or(256);
    let max_field = if r.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    check_sampling("", (max_tokens, max_field), r.temperature, r.top_p)?;
    let session_id = r
        .session_id
        .as_deref()
        .map(|s| parse_uuid("session_id", s))
        .transpose()?;
    let want_private = match r
        .routing_preferences
        .as_ref()
        .and_then(|p| p.privacy_level.as_deref())
    {
        None | Some("standard") => false,
        Some("private") => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "routing_preferences.privacy_level",
                "privacy_level must be private or standard",
            ));
        }
    };
    let stream = r.stream.unwrap_or(false);
    Ok(Validated {
        model,
        payload,
        params: TaskParams {
            max_tokens: Some(max_tokens),
            temperature: r.temperature,
            top_p: r.top_p,
            stop: Vec::new(),
            seed: r.seed,
            stream,
        },
        chat,
        include_usage: r.stream_options.as_ref().is_some_and(|o| o.include_usage),
        session_id,
        want_private,
    })
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// Finds the caller's session for a request: the named one, or the key's default (created on
/// first use: private with the static allowlist when one is configured, else public).
async fn resolve_session(
    state: &AppState,
    caller: &Caller,
    id: Option<Uuid>,
) -> ApiResult<Session> {
    let now = now_ms();
    if let Some(id) = id {
        let s = owned_session(state, caller, id, "session_id").await?;
        if !s.is_open(now) {
            return Err(
                ApiError::conflict("session_closed", "the session is closed or expired")
                    .param("session_id"),
            );
        }
        return Ok(s);
    }
    if let Some(id) = caller.key.default_session
        && let Ok(s) = state.store.get_session(id).await
        && s.is_open(now)
    {
        return crate::acl::reconcile(state, s).await;
    }
    let s = new_session(
        state,
        caller,
        SessionKind::Dedicated,
        default_privacy(state),
        None,
        state.cfg.default_retention,
        SealingPolicy::Any,
    )
    .await?;
    state.store.set_default_session(caller.key.id, s.id).await?;
    Ok(s)
}

/// Checks the sampling parameters shared by `/api/v2` and `/api/v3`: `max_tokens` (with the
/// name of the field it came from) in 1..=32768, `temperature` in [0, 2], `top_p` in (0, 1].
/// Error fields are named with `prefix` in front (`params.` on v3).
pub(super) fn check_sampling(
    prefix: &str,
    (max_tokens, max_field): (u32, &str),
    temperature: Option<f32>,
    top_p: Option<f32>,
) -> ApiResult<()> {
    if !(1..=32768).contains(&max_tokens) {
        return Err(ApiError::invalid(
            &format!("{prefix}{max_field}"),
            "must be between 1 and 32768",
        ));
    }
    if let Some(t) = temperature
        && (!(0.0..=2.0).contains(&t) || t.is_nan())
    {
        return Err(ApiError::invalid(
            &format!("{prefix}temperature"),
            "temperature must be between 0 and 2",
        ));
    }
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid(
            &format!("{prefix}top_p"),
            "top_p must be in (0, 1]",
        ));
    }
    Ok(())
}

pub(super) fn default_privacy(state: &AppState) -> PrivacySetting {
    if state.cfg.static_allowed_miners.is_empty() {
        PrivacySetting {
            private: false,
            allowed_miners: Vec::new(),
            source: AllowlistSource::Router,
        }
    } else {
        PrivacySetting {
            private: true,
            allowed_miners: state.cfg.static_allowed_miners.clone(),
            source: AllowlistSource::Static,
        }
    }
}

async fn new_session(
    state: &AppState,
    caller: &Caller,
    kind: SessionKind,
    privacy: PrivacySetting,
    ttl_secs: Option<u64>,
    retention: RetentionPolicy,
    sealing: SealingPolicy,
) -> ApiResult<Session> {
    let now = now_ms();
    let s = state
        .store
        .create_session(&NewSession {
            id: Uuid::now_v7(),
            owner: caller.owner(),
            kind,
            privacy,
            created_at_ms: now,
            expires_at_ms: ttl_secs.map(|t| now + (t as i64) * 1000),
            retention,
            sealing,
        })
        .await?;
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now,
            actor: caller.actor(),
            action: "session.create".into(),
            session_id: Some(s.id),
            detail: json!({"kind": s.kind, "private": s.privacy.private, "allowed_miners": s.privacy.allowed_miners, "source": s.privacy.source, "retention": s.retention, "sealing": s.sealing}),
            ..Default::default()
        })
        .await?;
    Ok(s)
}

/// The session if the caller owns it; 404 otherwise (existence is not revealed).
async fn owned_session(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    field: &str,
) -> ApiResult<Session> {
    match state.store.get_session(id).await {
        // A session registered on chain since the last mirror pass takes the chain's
        // allowlist before anything else looks at it.
        Ok(s) if s.owner == caller.owner() => crate::acl::reconcile(state, s).await,
        Ok(_) | Err(crate::store::StoreError::NotFound { .. }) => {
            Err(ApiError::not_found("session").param(field))
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) fn parse_miners(field: &str, list: &[String]) -> ApiResult<Vec<String>> {
    if list.len() > 1000 {
        return Err(ApiError::invalid(field, "at most 1000 miners"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let a = veil_api::wire::parse_address(m)
            .map_err(|e| ApiError::invalid(&format!("{field}[{i}]"), e))?;
        let c = a.to_checksum(None);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// `POST /api/v2/sessions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// `dedicated` (default) or `pooled`.
    #[serde(default)]
    pub kind: Option<SessionKind>,
    /// Private sessions reach only their allowed miners (default false, or true with the
    /// static allowlist when the router has one).
    #[serde(default)]
    pub private: Option<bool>,
    /// Allowed miners (addresses).
    #[serde(default)]
    pub allowed_miners: Option<Vec<String>>,
    /// Lifetime in seconds (no new tasks after it).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Retention of the session's blobs; when given it replaces the router's default whole
    /// (fields left out are off) [default: the router's `retention_*` settings].
    #[serde(default)]
    pub retention: Option<RetentionPolicy>,
    /// `any` (default) or `client_only` (server-side sealing on `/api/v2` refused).
    #[serde(default)]
    pub sealing: Option<SealingPolicy>,
}

/// A session as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub owner: String,
    /// Kind.
    pub kind: SessionKind,
    /// Privacy settings (`PrivacySettingData`).
    pub privacy: PrivacySetting,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms.
    pub expires_at_ms: Option<i64>,
    /// Unix ms.
    pub closed_at_ms: Option<i64>,
    /// Retention of the session's blobs.
    pub retention: RetentionPolicy,
    /// Where its prompts may be sealed.
    pub sealing: SealingPolicy,
}

impl From<Session> for SessionView {
    fn from(s: Session) -> Self {
        SessionView {
            id: s.id,
            owner: s.owner,
            kind: s.kind,
            privacy: s.privacy,
            created_at_ms: s.created_at_ms,
            expires_at_ms: s.expires_at_ms,
            closed_at_ms: s.closed_at_ms,
            retention: s.retention,
            sealing: s.sealing,
        }
    }
}

/// Create a session.
#[utoipa::path(post, path = "/api/v2/sessions", tag = "sessions", security(("api_key" = [])),
    request_body = CreateSessionRequest,
    responses((status = 201, body = SessionView), (status = 400, body = veil_api::ErrorBody)))]
async fn create_session(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateSessionRequest>,
) -> ApiResult<(StatusCode, Json<SessionView>)> {
    if let Some(t) = req.ttl_secs
        && (t == 0 || t > 365 * 24 * 3600)
    {
        return Err(ApiError::invalid(
            "ttl_secs",
            "ttl_secs must be between 1 and one year",
        ));
    }
    let privacy = match (&req.private, &req.allowed_miners) {
        (None, None) => default_privacy(&state),
        _ => {
            let miners = parse_miners(
                "allowed_miners",
                req.allowed_miners.as_deref().unwrap_or(&[]),
            )?;
            let private = req.private.unwrap_or(true);
            PrivacySetting {
                private,
                allowed_miners: miners,
                source: AllowlistSource::Router,
            }
        }
    };
    let retention = req.retention.unwrap_or(state.cfg.default_retention);
    retention
        .validate()
        .map_err(|(field, msg)| ApiError::invalid(field, msg))?;
    let s = new_session(
        &state,
        &caller,
        req.kind.unwrap_or(SessionKind::Dedicated),
        privacy,
        req.ttl_secs,
        retention,
        req.sealing.unwrap_or_default(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(s.into())))
}

/// Paging through sessions.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// At most this many (default 50, max 500).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Sessions created before this one.
    #[serde(default)]
    pub before: Option<String>,
}

/// List the caller's sessions, newest first.
#[utoipa::path(get, path = "/api/v2/sessions", tag = "sessions", security(("api_key" = [])),
    params(ListQuery), responses((status = 200, body = Object)))]
async fn list_sessions(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > 500 {
        return Err(ApiError::invalid(
            "limit",
            "limit must be between 1 and 500",
        ));
    }
    let before = q
        .before
        .as_deref()
        .map(|b| parse_uuid("before", b))
        .transpose()?;
    let list = state
        .store
        .list_sessions(&caller.owner(), limit, before)
        .await?;
    let data: Vec<SessionView> = list.into_iter().map(Into::into).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// One session and its privacy status.
#[utoipa::path(get, path = "/api/v2/sessions/{session_id}", tag = "sessions", security(("api_key" = [])),
    params(("session_id" = Uuid, Path,)), responses((status = 200, body = SessionView), (status = 404, body = veil_api::ErrorBody)))]
async fn get_session(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    let id = parse_uuid("session_id", &id)?;
    Ok(Json(
        owned_session(&state, &caller, id, "session_id")
            .await?
            .into(),
    ))
}

/// Close a session; its queued and leased tasks are cancelled.
#[utoipa::path(post, path = "/api/v2/sessions/{session_id}/close", tag = "sessions", security(("api_key" = [])),
    params(("session_id" = Uuid, Path,)), responses((status = 200, body = Object), (status = 404, body = veil_api::ErrorBody)))]
async fn close_session(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_uuid("session_id", &id)?;
    owned_session(&state, &caller, id, "session_id").await?;
    let cancelled = state.store.close_session(id, now_ms()).await?;
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: caller.actor(),
            action: "session.close".into(),
            session_id: Some(id),
            detail: json!({"cancelled_tasks": cancelled}),
            ..Default::default()
        })
        .await?;
    // Closing deletes the session's blobs: let the sweeper start now.
    state.retention_wake.notify_one();
    Ok(Json(
        json!({"session_id": id, "closed": true, "cancelled_tasks": cancelled}),
    ))
}

/// `PUT /api/v2/sessions/{id}/privacy`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PrivacyRequest {
    /// Private or public.
    pub private: bool,
    /// Allowed miners (addresses).
    #[serde(default)]
    pub allowed_miners: Vec<String>,
}

/// Replace a router-managed session's privacy settings.
#[utoipa::path(put, path = "/api/v2/sessions/{session_id}/privacy", tag = "sessions", security(("api_key" = [])),
    params(("session_id" = Uuid, Path,)), request_body = PrivacyRequest,
    responses((status = 200, body = SessionView), (status = 409, body = veil_api::ErrorBody)))]
async fn set_privacy(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(req): Json<PrivacyRequest>,
) -> ApiResult<Json<SessionView>> {
    let id = parse_uuid("session_id", &id)?;
    let s = owned_session(&state, &caller, id, "session_id").await?;
    if s.privacy.source != AllowlistSource::Router {
        return Err(ApiError::conflict(
            "allowlist_managed_elsewhere",
            format!(
                "this session's allowlist comes from {}; change it there",
                s.privacy.source.as_str()
            ),
        ));
    }
    let miners = parse_miners("allowed_miners", &req.allowed_miners)?;
    let p = PrivacySetting {
        private: req.private,
        allowed_miners: miners,
        source: AllowlistSource::Router,
    };
    let s = state.store.set_privacy(id, &p).await?;
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: caller.actor(),
            action: "session.privacy".into(),
            session_id: Some(id),
            detail: json!({"private": p.private, "allowed_miners": p.allowed_miners}),
            ..Default::default()
        })
        .await?;
    Ok(Json(s.into()))
}

/// A session's privacy status as its owner reads it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PrivacyStatus {
    /// The session.
    pub session_id: Uuid,
    /// Private sessions reach only their allowed miners.
    pub private: bool,
    /// Checksummed addresses of the miners allowed to serve it (and to get its task keys).
    pub allowed_miners: Vec<String>,
    /// Where that list comes from: `router` (this API), `static` (router configuration) or
    /// `contract` (the on-chain ACL).
    pub source: AllowlistSource,
    /// For `contract`: the chain and the ACL contract the list is read from.
    #[schema(value_type = Option<Object>)]
    pub acl: Option<serde_json::Value>,
    /// Retention of its blobs.
    pub retention: RetentionPolicy,
    /// Where its prompts may be sealed.
    pub sealing: SealingPolicy,
    /// The key version new tasks are sealed under.
    pub active_key_version: u32,
    /// Open (not closed, not expired).
    pub open: bool,
}

/// The session's privacy status: private or public, allowed miners and the list's source,
/// retention and sealing policy.
#[utoipa::path(get, path = "/api/v2/sessions/{session_id}/privacy", tag = "sessions", security(("api_key" = [])),
    params(("session_id" = Uuid, Path,)),
    responses((status = 200, body = PrivacyStatus), (status = 404, body = veil_api::ErrorBody)))]
async fn get_privacy(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<PrivacyStatus>> {
    let id = parse_uuid("session_id", &id)?;
    let s = owned_session(&state, &caller, id, "session_id").await?;
    let acl = (s.privacy.source == AllowlistSource::Contract).then(|| {
        json!({
            "chain_id": state.cfg.domain.chain_id,
            "contract": state.cfg.domain.verifying_contract.to_checksum(None),
            "fresh": state.acl.as_ref().map(|a| a.is_fresh()),
        })
    });
    Ok(Json(PrivacyStatus {
        session_id: s.id,
        private: s.privacy.private,
        allowed_miners: s.privacy.allowed_miners.clone(),
        source: s.privacy.source,
        acl,
        retention: s.retention,
        sealing: s.sealing,
        active_key_version: state.keys.active_version(),
        open: s.is_open(now_ms()),
    }))
}

/// `PUT /api/v2/sessions/{id}/policy`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyRequest {
    /// New retention (replaces the current one whole); unchanged when left out.
    #[serde(default)]
    pub retention: Option<RetentionPolicy>,
    /// New sealing policy; unchanged when left out.
    #[serde(default)]
    pub sealing: Option<SealingPolicy>,
}

/// Change a session's retention or sealing policy. A shorter retention applies to blobs
/// already stored too.
#[utoipa::path(put, path = "/api/v2/sessions/{session_id}/policy", tag = "sessions", security(("api_key" = [])),
    params(("session_id" = Uuid, Path,)), request_body = PolicyRequest,
    responses((status = 200, body = SessionView), (status = 400, body = veil_api::ErrorBody),
              (status = 409, body = veil_api::ErrorBody)))]
async fn set_policy(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(req): Json<PolicyRequest>,
) -> ApiResult<Json<SessionView>> {
    let id = parse_uuid("session_id", &id)?;
    let s = owned_session(&state, &caller, id, "session_id").await?;
    let retention = req.retention.unwrap_or(s.retention);
    retention
        .validate()
        .map_err(|(field, msg)| ApiError::invalid(field, msg))?;
    let sealing = req.sealing.unwrap_or(s.sealing);
    let s = state
        .store
        .set_session_policy(id, &retention, sealing)
        .await?;
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: caller.actor(),
            action: "session.policy".into(),
            session_id: Some(id),
            detail: json!({"retention": retention, "sealing": sealing}),
            ..Default::default()
        })
        .await?;
    state.retention_wake.notify_one();
    Ok(Json(s.into()))
}

// ---------------------------------------------------------------------------------------------
// Completions

/// OpenAI-compatible chat completions (also accepts the legacy `prompt` shape).
#[utoipa::path(post, path = "/api/v2/completions", tag = "v2", security(("api_key" = [])),
    request_body = CompletionRequest,
    responses((status = 200, description = "chat.completion, or text/event-stream of chat.completion.chunk when stream is true", body = Object),
              (status = 400, body = veil_api::ErrorBody), (status = 401, body = veil_api::ErrorBody),
              (status = 429, body = veil_api::ErrorBody),
              (status = 503, description = "acl_stale: the session's allowlist comes from the ACL contract and the router's copy of it is too old", body = veil_api::ErrorBody),
              (status = 504, description = "no result in time; the task id is in the message and x-veil-task-id", body = veil_api::ErrorBody)))]
async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    complete_request(state, caller, headers, body).await
}

/// The same endpoint under the path OpenAI clients derive from a base URL.
#[utoipa::path(post, path = "/api/v2/chat/completions", tag = "v2", security(("api_key" = [])),
    request_body = CompletionRequest,
    responses((status = 200, description = "as /api/v2/completions", body = Object)))]
async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    complete_request(state, caller, headers, body).await
}

/// Wipes the request bytes once parsed, when nothing else shares them.
fn wipe(body: Bytes) {
    if let Ok(mut b) = body.try_into_mut() {
        b.as_mut().zeroize();
    }
}

async fn complete_request(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let json_ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_ct {
        wipe(body);
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ));
    }
    let parsed = parse_json::<CompletionRequest>(&body);
    wipe(body);
    let v = validate(parsed?)?;
    let t0 = std::time::Instant::now();
    let session = resolve_session(&state, &caller, v.session_id).await?;
    crate::acl::check_new_task(&state, &session)?;
    if session.sealing == SealingPolicy::ClientOnly {
        return Err(ApiError::forbidden(
            "sealing_client_only",
            "this session accepts only client-sealed prompts (sealing policy client_only); \
             use /api/v3 with a client that seals on its own machine",
        )
        .param("session_id"));
    }
    if v.want_private && !session.privacy.private {
        return Err(ApiError::invalid(
            "routing_preferences.privacy_level",
            "privacy_level private needs a private session; create one with allowed miners",
        )
        .param("routing_preferences.privacy_level"));
    }
    let task_id = Uuid::now_v7();
    let version = state.keys.active_version();
    let k_task = state.keys.task_key(version, &session.id, &task_id)?;

    // Seal at the edge, then drop the plaintext.
    let t_seal = std::time::Instant::now();
    let sealed = {
        let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(1024));
        serde_json::to_writer(&mut *plain, &v.payload)
            .map_err(|e| ApiError::internal("encoding the prompt", e))?;
        veil_keys::seal(
            &k_task,
            &BlobParams::new(KeyId::task(version, session.id, task_id), Purpose::Prompt),
            &plain,
        )
        .map_err(|e| ApiError::internal("sealing the prompt", e))?
    };
    drop(v.payload);
    metrics::histogram!("veil_router_step_seconds", "step" => "seal")
        .record(t_seal.elapsed().as_secs_f64());

    let t_put = std::time::Instant::now();
    let blob = state
        .blobs
        .put(sealed)
        .await
        .map_err(|e| super::miner::blob_error("storing the prompt", e))?;
    metrics::histogram!("veil_router_step_seconds", "step" => "blob_put")
        .record(t_put.elapsed().as_secs_f64());

    // Subscribe before queueing so no frame or event is missed.
    let relay = if v.params.stream {
        state.relay.subscribe(task_id)
    } else {
        // A copy of the result as the miner uploads it spares reading it back.
        state.relay.capture(task_id)
    };
    let events = state.finished.watch(task_id);
    let now = now_ms();
    let t_queue = std::time::Instant::now();
    let task = state
        .store
        .enqueue(&NewTask {
            id: task_id,
            session_id: session.id,
            prompt_urn: blob.urn.to_string(),
            prompt_hash: blob.sha256,
            prompt_scope: Scope::Task.as_byte(),
            key_version: version,
            model: v.model.clone(),
            params: v.params.clone(),
            max_attempts: state.cfg.max_attempts,
            created_at_ms: now,
            deadline_ms: Some(task_deadline(&state, &session, now)),
            submitted_by: caller.actor(),
            sealed_by: crate::store::SealedBy::Router,
        })
        .await?;
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now,
            actor: caller.actor(),
            action: "task.enqueue".into(),
            session_id: Some(session.id),
            task_id: Some(task_id),
            key_version: Some(version),
            detail: json!({"prompt_urn": task.prompt_urn, "prompt_hash": hex::encode(task.prompt_hash), "model": task.model, "api": "v2"}),
            ..Default::default()
        })
        .await?;
    metrics::histogram!("veil_router_step_seconds", "step" => "enqueue")
        .record(t_queue.elapsed().as_secs_f64());
    tracing::info!(%task_id, session_id = %session.id, key_version = version, model = %v.model, "task queued");

    let timeout = Duration::from_millis(state.cfg.completion_timeout_ms);
    let shape = Shape {
        chat: v.chat,
        model: v.model.clone(),
        include_usage: v.include_usage,
    };
    if v.params.stream {
        return Ok(stream_response(
            state, caller, task, k_task, relay, events, timeout, shape,
        ));
    }
    let mut relay = relay;
    let mut captured = crate::state::Captured::new(state.cfg.max_blob_bytes as usize);
    let done = {
        let copying = async {
            loop {
                let msg = relay.rx.recv().await;
                let closed = matches!(msg, Err(RecvError::Closed));
                captured.push(msg);
                if closed {
                    futures::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            done = wait_final(&state, task_id, events, timeout, Some(task)) => done?,
            _ = copying => unreachable!("copying never ends"),
        }
    };
    // What arrived before the task's end was seen.
    loop {
        match relay.rx.try_recv() {
            Ok(msg) => captured.push(Ok(msg)),
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                captured.push(Err(RecvError::Lagged(n)))
            }
            Err(_) => break,
        }
    }
    drop(relay);
    let Some(done) = done else {
        return Err(timeout_error(task_id));
    };
    let r = answer(&state, &done, &k_task, &shape, captured.into_blob()).await?;
    metrics::histogram!("veil_router_step_seconds", "step" => "total")
        .record(t0.elapsed().as_secs_f64());
    drop(caller);
    Ok(r)
}

/// The router's task deadline, brought forward to the session's prompt TTL so that a task
/// never waits past the deletion of its prompt.
pub(super) fn task_deadline(state: &AppState, session: &Session, now: i64) -> i64 {
    let d = now + state.cfg.task_deadline_ms as i64;
    match session.retention.prompt_ttl_ms() {
        Some(ttl) => d.min(now.saturating_add(ttl)),
        None => d,
    }
}

/// Records that a task's result reached its caller; the retention sweeper runs at once when
/// the session's policy deletes something on delivery.
pub(super) async fn delivered(state: &AppState, task: &Task) {
    match state.store.mark_delivered(task.id, now_ms()).await {
        Ok(true) => state.retention_wake.notify_one(),
        Ok(false) => {}
        Err(e) => tracing::warn!(task_id = %task.id, error = %e, "recording a delivery failed"),
    }
}

fn timeout_error(task_id: Uuid) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!("no result yet for task {task_id}; fetch it later at GET /api/v2/tasks/{task_id}"),
    );
    e.param = Some(format!("task_id={task_id}"));
    e
}

/// Waits until the task is final (on any replica), or `timeout`. `known` is the task as the
/// caller last read it after subscribing `events`, if it did (it is not read again until an
/// event or a poll says it may have changed).
pub(super) async fn wait_final(
    state: &AppState,
    task_id: Uuid,
    mut events: crate::state::FinishWatch,
    timeout: Duration,
    mut known: Option<Task>,
) -> ApiResult<Option<Task>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let t = match known.take() {
            Some(t) => t,
            None => state.store.get_task(task_id).await?,
        };
        if t.state.is_final() {
            return Ok(Some(t));
        }
        tokio::select! {
            _ = events.ended() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
        }
    }
}

struct Shape {
    chat: bool,
    model: String,
    include_usage: bool,
}

fn check_result_header(h: &Header, task: &Task) -> ApiResult<()> {
    if h.purpose != Purpose::Result
        || h.key.session_id != task.session_id
        || h.key.task_id != Some(task.id)
        || h.key.key_version != task.key_version
    {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "result_invalid",
            "the result blob's header does not match the task",
        ));
    }
    Ok(())
}

/// Reads and opens a completed task's result: hash, then AEAD. Returns the text.
async fn open_result(
    state: &AppState,
    task: &Task,
    k_task: &SecretKey,
    copy: Option<Vec<u8>>,
) -> ApiResult<zeroize::Zeroizing<String>> {
    let r = task
        .result
        .as_ref()
        .ok_or_else(|| ApiError::internal("reading a result", "completed task without a result"))?;
    let urn: Urn = r
        .result_urn
        .parse()
        .map_err(|e| ApiError::internal("parsing a result URN", e))?;
    let blob = match copy {
        // The copy relayed from the upload, byte for byte what was stored.
        Some(b) if <[u8; 32]>::from(Sha256::digest(&b)) == r.result_hash => bytes::Bytes::from(b),
        _ => {
            let t_get = std::time::Instant::now();
            let blob = state
                .blobs
                .get(&urn, &r.result_hash)
                .await
                .map_err(|e| super::miner::blob_error("reading the result", e))?;
            metrics::histogram!("veil_router_step_seconds", "step" => "result_get")
                .record(t_get.elapsed().as_secs_f64());
            blob
        }
    };
    let t = std::time::Instant::now();
    let opened = veil_keys::open(k_task, &blob).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "result_invalid",
            format!("the result blob does not open: {}", e.code()),
        )
    })?;
    check_result_header(&opened.header, task)?;
    let text = String::from_utf8(opened.plaintext.into_zeroizing().to_vec()).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "result_invalid",
            "the result is not UTF-8 text",
        )
    })?;
    metrics::histogram!("veil_router_step_seconds", "step" => "result_open")
        .record(t.elapsed().as_secs_f64());
    Ok(zeroize::Zeroizing::new(text))
}

pub(super) fn result_deleted(t: &Task) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "result_deleted",
        format!(
            "the result of task {} was deleted by the session's retention policy",
            t.id
        ),
    )
    .param("task_id")
}

fn task_error(t: &Task) -> ApiError {
    let code: &'static str = match t.state {
        TaskState::Dead => "task_dead",
        TaskState::Cancelled => "task_cancelled",
        _ => "task_failed",
    };
    let why = t
        .error_message
        .clone()
        .or(t.error_code.clone())
        .unwrap_or_default();
    let mut e = ApiError::new(
        StatusCode::BAD_GATEWAY,
        code,
        format!("task {} {}: {}", t.id, t.state.as_str(), why),
    );
    if t.error_code.as_deref() == Some("prompt_tampered") {
        e.code = "prompt_tampered";
        e.status = StatusCode::UNPROCESSABLE_ENTITY;
    }
    e
}

fn veil_object(task: &Task) -> serde_json::Value {
    let r = task.result.as_ref();
    json!({
        "task_id": task.id,
        "session_id": task.session_id,
        "miner": r.map(|r| r.miner.clone()),
        "key_version": task.key_version,
        "prompt_hash": hex::encode(task.prompt_hash),
        "result_hash": r.map(|r| hex::encode(r.result_hash)),
        "result_urn": r.map(|r| r.result_urn.clone()),
    })
}

async fn answer(
    state: &AppState,
    task: &Task,
    k_task: &SecretKey,
    shape: &Shape,
    copy: Option<Vec<u8>>,
) -> ApiResult<Response> {
    if task.state != TaskState::Completed {
        return Err(task_error(task));
    }
    if task.result_deleted_at_ms.is_some() {
        return Err(result_deleted(task));
    }
    let text = open_result(state, task, k_task, copy).await?;
    delivered(state, task).await;
    let r = task.result.as_ref().expect("completed");
    let created = task.created_at_ms / 1000;
    let usage = json!({"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "total_tokens": r.prompt_tokens + r.completion_tokens});
    let body = if shape.chat {
        json!({
            "id": format!("chatcmpl-{}", task.id.simple()),
            "object": "chat.completion",
            "created": created,
            "model": shape.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.as_str()}, "finish_reason": r.finish_reason, "logprobs": null}],
            "usage": usage,
            "veil": veil_object(task),
        })
    } else {
        json!({
            "id": format!("cmpl-{}", task.id.simple()),
            "object": "text_completion",
            "created": created,
            "model": shape.model,
            "choices": [{"index": 0, "text": text.as_str(), "finish_reason": r.finish_reason, "logprobs": null}],
            "usage": usage,
            "veil": veil_object(task),
        })
    };
    Ok(([("x-veil-task-id", task.id.to_string())], axum::Json(body)).into_response())
}

/// Keeps incomplete UTF-8 sequences between chunks.
#[derive(Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.0.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.0) {
            Ok(_) => self.0.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid bytes in the middle: replace them rather than stall the stream.
            Err(_) => {
                let s = String::from_utf8_lossy(&self.0).into_owned();
                self.0.zeroize();
                self.0.clear();
                return s;
            }
        };
        let rest = self.0.split_off(valid);

        String::from_utf8(std::mem::replace(&mut self.0, rest)).unwrap_or_default()
    }
}

impl Drop for Utf8Carry {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[allow(clippy::too_many_arguments)]
fn stream_response(
    state: AppState,
    caller: Caller,
    task: Task,
    k_task: SecretKey,
    relay: crate::state::RelaySubscription,
    events: crate::state::FinishWatch,
    timeout: Duration,
    shape: Shape,
) -> Response {
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    let task_id = task.id;
    tokio::spawn(async move {
        let _permit = caller.permit;
        let mut out = tx;
        let r = drive_stream(
            &state, &task, &k_task, relay, events, timeout, &shape, &mut out,
        )
        .await;
        if let Err(e) = r {
            let body = json!({"error": {"code": e.code, "message": e.message, "type": "server_error", "param": e.param}});
            let _ = out.send(Ok(Event::default().data(body.to_string()))).await;
        }
        let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
    });
    let mut resp = Sse::new(rx)
        .keep_alive(KeepAlive::default())
        .into_response();
    if let Ok(v) = task_id.to_string().parse() {
        resp.headers_mut().insert("x-veil-task-id", v);
    }
    resp
}

fn chunk_event(
    task: &Task,
    shape: &Shape,
    delta: serde_json::Value,
    finish: Option<&str>,
) -> Event {
    let created = task.created_at_ms / 1000;
    let body = if shape.chat {
        json!({"id": format!("chatcmpl-{}", task.id.simple()), "object": "chat.completion.chunk", "created": created, "model": shape.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
    } else {
        let text = delta.get("content").cloned().unwrap_or(json!(""));
        json!({"id": format!("cmpl-{}", task.id.simple()), "object": "text_completion", "created": created, "model": shape.model,
               "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}]})
    };
    Event::default().data(body.to_string())
}

type Tx = futures::channel::mpsc::Sender<Result<Event, std::convert::Infallible>>;

#[allow(clippy::too_many_arguments)]
async fn drive_stream(
    state: &AppState,
    task: &Task,
    k_task: &SecretKey,
    mut relay: crate::state::RelaySubscription,
    mut events: crate::state::FinishWatch,
    timeout: Duration,
    shape: &Shape,
    out: &mut Tx,
) -> ApiResult<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut opener = Opener::new(k_task);
    let mut hasher = Sha256::new();
    let mut emitted: usize = 0; // plaintext bytes sent to the caller
    let mut carry = Utf8Carry::default();
    let mut relay_ok = true; // the relayed bytes are a complete, in-order copy of one upload
    let mut relay_ended = false;
    let mut header_checked = false;
    let mut sent_role = false;
    let send = |out: &mut Tx, e: Event| {
        let mut out = out.clone();
        async move { out.send(Ok(e)).await.is_ok() }
    };
    if shape.chat {
        if !send(
            out,
            chunk_event(
                task,
                shape,
                json!({"role": "assistant", "content": ""}),
                None,
            ),
        )
        .await
        {
            return Ok(());
        }
        sent_role = true;
    }
    let _ = sent_role;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            msg = relay.rx.recv(), if relay_ok && !relay_ended => {
                match msg {
                    Ok(RelayMsg::Start { .. }) | Ok(RelayMsg::Abort) => {
                        if emitted > 0 {
                            // A new attempt after text went out: it cannot be spliced; finish
                            // from the stored result below if it matches, else report.
                            relay_ok = false;
                        } else {
                            opener = Opener::new(k_task);
                            hasher = Sha256::new();
                            header_checked = false;
                        }
                    }
                    Ok(RelayMsg::Bytes(b)) => {
                        hasher.update(&b);
                        let chunks = opener.push(&b).map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "result_invalid", format!("the result stream does not open: {}", e.code())))?;
                        if !header_checked
                            && let Some(h) = opener.header() {
                                check_result_header(h, task)?;
                                header_checked = true;
                            }
                        for c in chunks {
                            let text = carry.push(&c);
                            emitted += c.len();
                            if !text.is_empty() && !send(out, chunk_event(task, shape, json!({"content": text}), None)).await {
                                return Ok(());
                            }
                        }
                    }
                    Ok(RelayMsg::End) => relay_ended = true,
                    Err(_) => relay_ok = false,
                }
            }
            _ = events.ended() => {
                if let Some(done) = finished(state, task.id).await? {
                    return finish_stream(state, &done, k_task, shape, out, emitted, relay_ok && relay_ended, hasher.clone()).await;
                }
            }
            _ = poll.tick() => {
                if let Some(done) = finished(state, task.id).await? {
                    return finish_stream(state, &done, k_task, shape, out, emitted, relay_ok && relay_ended, hasher.clone()).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Err(timeout_error(task.id)),
        }
    }
}

async fn finished(state: &AppState, id: Uuid) -> ApiResult<Option<Task>> {
    let t = state.store.get_task(id).await?;
    Ok(t.state.is_final().then_some(t))
}

#[allow(clippy::too_many_arguments)]
async fn finish_stream(
    state: &AppState,
    done: &Task,
    k_task: &SecretKey,
    shape: &Shape,
    out: &mut Tx,
    emitted: usize,
    relay_complete: bool,
    hasher: Sha256,
) -> ApiResult<()> {
    if done.state != TaskState::Completed {
        return Err(task_error(done));
    }
    let r = done.result.as_ref().expect("completed");
    let relayed_hash: [u8; 32] = hasher.finalize().into();
    if !(relay_complete && relayed_hash == r.result_hash) && done.result_deleted_at_ms.is_some() {
        return Err(result_deleted(done));
    }
    if !(relay_complete && relayed_hash == r.result_hash) {
        // Frames came from another replica, were missed, or belong to an attempt that lost:
        // continue from the stored result, which is the one that stands.
        let text = open_result(state, done, k_task, None).await?;
        let bytes = text.as_bytes();
        if emitted > bytes.len() {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "stream_restarted",
                "the task was retried after text was streamed; fetch the final answer at GET /api/v2/tasks/{id}",
            ));
        }
        let rest = String::from_utf8_lossy(&bytes[emitted..]).into_owned();
        if !rest.is_empty() {
            let mut o = out.clone();
            let _ = o
                .send(Ok(chunk_event(done, shape, json!({"content": rest}), None)))
                .await;
        }
    }
    let mut o = out.clone();
    let _ = o
        .send(Ok(chunk_event(
            done,
            shape,
            json!({}),
            Some(&r.finish_reason),
        )))
        .await;
    let usage = json!({"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "total_tokens": r.prompt_tokens + r.completion_tokens});
    if shape.include_usage {
        let body = json!({"id": format!("chatcmpl-{}", done.id.simple()), "object": "chat.completion.chunk", "created": done.created_at_ms / 1000,
                          "model": shape.model, "choices": [], "usage": usage, "veil": veil_object(done)});
        let _ = o.send(Ok(Event::default().data(body.to_string()))).await;
    }
    delivered(state, done).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Models and tasks

/// Models served by miners connected now (OpenAI list format).
#[utoipa::path(get, path = "/api/v2/models", tag = "v2", security(("api_key" = [])),
    responses((status = 200, body = Object)))]
async fn models(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let names = state.store.served_models(now_ms()).await?;
    let data: Vec<_> = names
        .into_iter()
        .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "veil-miners"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// A task's status; once completed, the answer in the completions shape.
#[utoipa::path(get, path = "/api/v2/tasks/{task_id}", tag = "v2", security(("api_key" = [])),
    params(("task_id" = Uuid, Path,)),
    responses((status = 200, body = Object), (status = 404, body = veil_api::ErrorBody)))]
async fn task(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = parse_uuid("task_id", &id)?;
    let t = match state.store.get_task(id).await {
        Ok(t) => t,
        Err(crate::store::StoreError::NotFound { .. }) => {
            return Err(ApiError::not_found("task").param("task_id"));
        }
        Err(e) => return Err(e.into()),
    };
    let session = state.store.get_session(t.session_id).await?;
    if session.owner != caller.owner() {
        return Err(ApiError::not_found("task").param("task_id"));
    }
    if t.state == TaskState::Completed && t.prompt_scope == Scope::Task.as_byte() {
        let k = state.keys.task_key(t.key_version, &t.session_id, &t.id)?;
        let mut shape = Shape {
            chat: true,
            model: t.model.clone(),
            include_usage: false,
        };
        // Legacy-prompt tasks answer in the legacy shape; the shape is not stored, so the
        // chat shape is used for both (the text is the same).
        shape.chat = true;
        let mut r = answer(&state, &t, &k, &shape, None).await?;
        r.headers_mut()
            .insert("x-veil-task-state", "completed".parse().expect("ascii"));
        return Ok(r);
    }
    let mut body: HashMap<&str, serde_json::Value> = HashMap::new();
    body.insert("task_id", json!(t.id));
    body.insert("session_id", json!(t.session_id));
    body.insert("state", json!(t.state));
    body.insert("model", json!(t.model));
    body.insert("attempts", json!(t.attempts));
    body.insert("key_version", json!(t.key_version));
    body.insert("created_at_ms", json!(t.created_at_ms));
    if let Some(c) = &t.error_code {
        body.insert("error", json!({"code": c, "message": t.error_message}));
    }
    Ok(axum::Json(body).into_response())
}
