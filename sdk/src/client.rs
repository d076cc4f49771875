//! [`Client`]: wallet-signed, client-sealed private inference over a router's `/api/v3`.
//!
//! The flow (see `veil_api::v3` for the wire shapes):
//!
//! 1. [`Client::config`] reads the deployment's EIP-712 domain and active key version.
//! 2. [`Client::open_session`] signs an `OpenSession` and keeps the session's read token.
//! 3. [`Client::session_key`] signs a session-scope `KeyRequest` for an X25519 key generated on
//!    this machine and unwraps `K_session` (protocol §4); task keys are derived locally (§2).
//! 4. [`Client::complete`] seals the prompt under `K_task`, uploads it, signs a `SubmitTask`,
//!    waits for the task, verifies the miner's signed `TaskResult`, the result blob's SHA-256 and
//!    its AEAD, and opens it. [`Client::complete_stream`] yields the text as it is produced.
//!
//! The router only ever sees ids, hashes, URNs, key versions, sampling parameters and
//! signatures. Transient failures are retried with exponential backoff (see
//! [`ClientBuilder::retries`]); a signed request is sent again with the same signature only when
//! the previous attempt certainly did not reach the router (the connection was refused), and is
//! re-signed with a fresh nonce otherwise.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use alloy::signers::Signer;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::{RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use veil_api::eip712::{KeyRequest, Message, OpenSession, Signed, SubmitTask};
use veil_api::miner::PromptPayload;
use veil_api::v3::{
    KeyResponse, OpenSessionRequest, OpenSessionResponse, PROMPT_SHA256_HEADER, PresignedUrl,
    ReadToken, SubmitTaskRequest, V3Config, V3Result, V3Session, V3Task,
};
use veil_api::wire::{Hex32, Nonce, parse_address, unix_now};
use veil_api::{Domain, ErrorBody, routes};
use veil_keys::{
    BlobParams, Header, KeyId, Plaintext, Purpose, Scope, SecretKey, X25519Secret, derive_task_key,
    unwrap_key,
};
use zeroize::Zeroizing;

use crate::completion::{Completion, CompletionRequest};
use crate::session::{Session, SessionOptions};
use crate::stream::CompletionStream;
use crate::{Error, Result};

/// Any alloy signer, shared: a local key, a keystore, a mnemonic, a hardware wallet, a KMS.
pub type DynSigner = Arc<dyn Signer + Send + Sync>;

/// How far ahead signed messages expire (the router refuses more than 300 s).
pub const MESSAGE_TTL_SECS: u64 = 120;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_COMPLETION_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_RETRIES: usize = 3;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A `Retry-After` longer than this is not waited for: the caller gets `RateLimited`.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Longest single long poll of a task.
const POLL_WAIT: Duration = Duration::from_secs(20);
/// Slack on top of `wait_ms` for a long poll's HTTP timeout.
const LONG_POLL_SLACK: Duration = Duration::from_secs(15);
/// A read token this close to its expiry is renewed before use.
const TOKEN_MARGIN_SECS: u64 = 60;

pub(crate) const EP_CONFIG: &str = "GET /api/v3/config";
pub(crate) const EP_SESSIONS: &str = "POST /api/v3/sessions";
pub(crate) const EP_SESSION: &str = "GET /api/v3/sessions/{session_id}";
pub(crate) const EP_CLOSE: &str = "POST /api/v3/sessions/{session_id}/close";
pub(crate) const EP_KEYS: &str = "POST /api/v3/keys";
pub(crate) const EP_PROMPT: &str = "PUT /api/v3/sessions/{session_id}/tasks/{task_id}/prompt";
pub(crate) const EP_PRESIGN: &str = "POST …/prompt/presign";
pub(crate) const EP_PRESIGNED_PUT: &str = "PUT <presigned URL>";
pub(crate) const EP_COMPLETIONS: &str = "POST /api/v3/completions";
pub(crate) const EP_TASK: &str = "GET /api/v3/tasks/{task_id}";
pub(crate) const EP_RESULT: &str = "GET /api/v3/tasks/{task_id}/result";
pub(crate) const EP_STREAM: &str = "GET /api/v3/tasks/{task_id}/stream";

/// Builds a [`Client`]. See [`Client::builder`].
pub struct ClientBuilder {
    url: String,
    signer: Option<DynSigner>,
    timeout: Duration,
    completion_timeout: Duration,
    retries: usize,
    backoff: Duration,
    presigned_uploads: bool,
    http: Option<reqwest::Client>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &redact_url(&self.url))
            .field("signer", &self.signer.as_ref().map(|s| s.address()))
            .field("timeout", &self.timeout)
            .field("completion_timeout", &self.completion_timeout)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("presigned_uploads", &self.presigned_uploads)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// The wallet that signs: any alloy signer (local key, keystore, mnemonic, Ledger, Trezor,
    /// AWS/GCP KMS, …).
    pub fn signer<S>(mut self, signer: S) -> Self
    where
        S: Signer + Send + Sync + 'static,
    {
        self.signer = Some(Arc::new(signer));
        self
    }

    /// The wallet that signs, already shared.
    pub fn shared_signer(mut self, signer: DynSigner) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Time allowed for one ordinary request (default 30 s). Long polls and uploads get more.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long [`Client::complete`] and [`Client::complete_stream`] wait for a task to finish
    /// (default 300 s); then they fail with [`Error::Timeout`] and the task can be fetched later.
    pub fn completion_timeout(mut self, timeout: Duration) -> Self {
        self.completion_timeout = timeout;
        self
    }

    /// Retries after a transient failure (connection errors, timeouts, 429, 502, 503, 504): at
    /// most `max` more attempts, waiting `base_backoff`, then twice as long each time (with
    /// jitter, at most 10 s), or as long as a 429's `Retry-After` asks. Default: 3, 250 ms.
    /// `max = 0` turns retries off.
    pub fn retries(mut self, max: usize, base_backoff: Duration) -> Self {
        self.retries = max;
        self.backoff = base_backoff;
        self
    }

    /// Whether to upload prompts straight to object storage through presigned URLs when the
    /// router offers them (default: yes). Off, every upload goes through the router.
    pub fn presigned_uploads(mut self, allow: bool) -> Self {
        self.presigned_uploads = allow;
        self
    }

    /// A prepared `reqwest::Client` (custom roots, proxies). Per-request timeouts still apply.
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// Builds the client. Fails without a signer or with a URL that is not http(s).
    pub fn build(self) -> Result<Client> {
        let base = self.url.trim().trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| Error::Invalid(format!("router URL {}: {e}", redact_url(&base))))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Invalid(format!(
                "router URL must start with http:// or https://, got {}",
                redact_url(&base)
            )));
        }
        let signer = self
            .signer
            .ok_or_else(|| Error::Wallet("a signer is required (ClientBuilder::signer)".into()))?;
        let http = match self.http {
            Some(h) => h,
            None => {
                install_crypto_provider();
                reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .tcp_nodelay(true)
                    .build()
                    .map_err(|e| Error::Invalid(format!("HTTP client: {e}")))?
            }
        };
        let address = signer.address();
        Ok(Client {
            inner: Arc::new(ClientInner {
                http,
                base,
                signer,
                address,
                timeout: self.timeout,
                completion_timeout: self.completion_timeout,
                retries: self.retries,
                backoff: self.backoff,
                presigned_uploads: self.presigned_uploads,
                config: RwLock::new(None),
                sessions: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// Installs rustls' ring provider as the process default unless one is installed (reqwest is
/// built without a provider of its own).
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Scheme, host and port only: a URL's path or query may carry credentials.
pub(crate) fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let mut s = format!("{}://{}", u.scheme(), u.host_str().unwrap_or(""));
            if let Some(p) = u.port() {
                s.push_str(&format!(":{p}"));
            }
            s
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

struct ClientInner {
    http: reqwest::Client,
    base: String,
    signer: DynSigner,
    address: Address,
    timeout: Duration,
    completion_timeout: Duration,
    retries: usize,
    backoff: Duration,
    presigned_uploads: bool,
    config: RwLock<Option<V3Config>>,
    sessions: Mutex<HashMap<Uuid, Session>>,
}

/// A client of a router's `/api/v3`, signing with one wallet. Cheap to clone; clones share the
/// configuration, the known sessions and their keys.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("router", &redact_url(&self.inner.base))
            .field("wallet", &self.inner.address)
            .field("sessions", &lock(&self.inner.sessions).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one attempt of a request came to.
pub(crate) enum Outcome {
    /// A successful (2xx) answer.
    Response(Response),
    /// A transient failure, already waited out: send again. `reached` says whether the request
    /// may have reached the router (then a signed request must be re-signed).
    Retry { reached: bool },
}

/// The retry budget of one call.
pub(crate) struct Retrier {
    backoff: ExponentialBackoff,
}

impl Retrier {
    /// Sends `rb`; on a transient failure with budget left, waits and says to retry.
    pub(crate) async fn attempt(
        &mut self,
        rb: RequestBuilder,
        endpoint: &'static str,
    ) -> Result<Outcome> {
        let (err, retry_after, reached) = match rb.send().await {
            Ok(resp) if resp.status().is_success() => return Ok(Outcome::Response(resp)),
            Ok(resp) => {
                let status = resp.status().as_u16();
                if !matches!(status, 429 | 502..=504) {
                    return Err(api_error(endpoint, resp).await);
                }
                let ra = retry_after(&resp);
                (api_error(endpoint, resp).await, ra, true)
            }
            Err(e) => {
                let retryable = e.is_connect() || e.is_timeout() || e.is_request();
                let reached = !e.is_connect();
                let err = transport(e);
                if !retryable {
                    return Err(err);
                }
                (err, None, reached)
            }
        };
        let Some(delay) = self.backoff.next() else {
            return Err(err);
        };
        let delay = match retry_after {
            Some(ra) if ra > MAX_RETRY_AFTER => return Err(err),
            Some(ra) => ra.max(delay),
            None => delay,
        };
        tracing::debug!(
            endpoint,
            code = err.code(),
            delay_ms = delay.as_millis() as u64,
            "retrying"
        );
        tokio::time::sleep(delay).await;
        Ok(Outcome::Retry { reached })
    }
}

fn retry_after(resp: &Response) -> Option<Duration> {
    resp.headers()
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// A transport error as text, without the URL (a presigned URL's query is a credential).
pub(crate) fn transport(e: reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut msg = kind.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    Error::Transport(msg)
}

/// The error of a non-2xx answer, from its `ErrorBody` when it has one.
pub(crate) async fn api_error(endpoint: &'static str, resp: Response) -> Error {
    let status = resp.status();
    let ra = retry_after(&resp);
    let body = resp.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) => Error::from_api(
            status.as_u16(),
            &b.error.code,
            &b.error.message,
            b.error.param,
            ra,
        ),
        Err(_) if status.as_u16() == 429 => Error::RateLimited { retry_after: ra },
        Err(_) => {
            let reason = status.canonical_reason().unwrap_or("unexpected status");
            let message = if status.as_u16() == 404 || status.as_u16() == 405 {
                format!("{reason} at {endpoint} (does this router serve /api/v3?)")
            } else {
                format!("{reason} at {endpoint}")
            };
            Error::Api {
                status: status.as_u16(),
                code: format!("http_{}", status.as_u16()),
                message,
                param: None,
            }
        }
    }
}

/// Parses a successful answer's JSON body.
pub(crate) async fn json<T: DeserializeOwned>(endpoint: &'static str, resp: Response) -> Result<T> {
    let bytes = resp.bytes().await.map_err(transport)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
        endpoint,
        detail: e.to_string(),
    })
}

pub(crate) fn sha256(bytes: &[u8]) -> Hex32 {
    Hex32(Sha256::digest(bytes).into())
}

/// The answer to a prompt upload through the router.
#[derive(Deserialize)]
struct UploadReceipt {
    urn: String,
    #[serde(default)]
    sha256: Option<Hex32>,
}

/// A task submitted by this client, with what it sealed.
pub(crate) struct Submitted {
    pub(crate) task: V3Task,
    pub(crate) prompt_hash: Hex32,
}

/// Whether a task state is final.
pub(crate) fn is_final(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "dead" | "cancelled")
}

/// The result of a final task, or why there is none.
pub(crate) fn final_result(task: &V3Task) -> Result<&V3Result> {
    match task.state.as_str() {
        "completed" => match &task.result {
            Some(r) if r.deleted => Err(Error::ResultDeleted {
                message: format!("the result of task {} was deleted", task.task_id),
            }),
            Some(r) => Ok(r),
            None => Err(Error::Protocol {
                endpoint: EP_TASK,
                detail: "a completed task without a result".into(),
            }),
        },
        "failed" | "dead" | "cancelled" => {
            let (code, message) = match &task.error {
                Some(f) => (f.code.clone(), f.message.clone()),
                None => (task.state.clone(), format!("the task is {}", task.state)),
            };
            Err(Error::TaskFailed {
                task_id: task.task_id,
                code,
                message,
            })
        }
        other => Err(Error::Pending {
            task_id: task.task_id,
            state: other.to_string(),
        }),
    }
}

/// Checks the miner's signed `TaskResult` of a completed task: the signature recovers the
/// task's miner, the miner is one the session allows when it is private, and the message names
/// this session, this task and its prompt. Returns the miner's address.
pub(crate) fn verify_task_result(
    domain: &Domain,
    session: &V3Session,
    task: &V3Task,
    result: &V3Result,
    expected_prompt_hash: Option<Hex32>,
) -> Result<Address> {
    let session_id = session.session_id;
    let miner = parse_address(&result.miner).map_err(|e| Error::Protocol {
        endpoint: EP_TASK,
        detail: format!("result.miner: {e}"),
    })?;
    let signer = result
        .signed
        .recover(domain)
        .map_err(|e| Error::Integrity(format!("the miner's TaskResult signature: {e}")))?;
    if signer != miner {
        return Err(Error::Integrity(format!(
            "the TaskResult is signed by {signer}, not by the task's miner {miner}"
        )));
    }
    if session.private && !session.allowed_miners.contains(&signer.to_checksum(None)) {
        return Err(Error::Integrity(format!(
            "the TaskResult is signed by {signer}, which this private session does not allow"
        )));
    }
    let m = &result.signed.message;
    if task.session_id != session_id || m.session_id != session_id {
        return Err(Error::Integrity(
            "the signed TaskResult names another session".into(),
        ));
    }
    if m.task_id != task.task_id {
        return Err(Error::Integrity(
            "the signed TaskResult names another task".into(),
        ));
    }
    if m.prompt_hash != task.prompt_hash {
        return Err(Error::Integrity(
            "the signed TaskResult names another prompt than the task's".into(),
        ));
    }
    if let Some(h) = expected_prompt_hash
        && h != task.prompt_hash
    {
        return Err(Error::Integrity(
            "the task's prompt is not the one this client sealed".into(),
        ));
    }
    Ok(miner)
}

/// Checks that a result blob's header is this task's result.
pub(crate) fn check_result_header(header: &Header, session_id: Uuid, task_id: Uuid) -> Result<()> {
    if header.key.scope() != Scope::Task
        || header.key.session_id != session_id
        || header.key.task_id != Some(task_id)
        || header.purpose != Purpose::Result
    {
        return Err(Error::Integrity(
            "the result blob's header is not this task's result".into(),
        ));
    }
    Ok(())
}

/// Checks that the router answered with the task asked about.
fn check_task(
    task: &V3Task,
    session_id: Uuid,
    task_id: Uuid,
    endpoint: &'static str,
) -> Result<()> {
    if task.task_id != task_id || task.session_id != session_id {
        return Err(Error::Protocol {
            endpoint,
            detail: "the router answered with another task".into(),
        });
    }
    Ok(())
}

/// The read token a session-scope key request issued to the session's owner.
fn owner_token(token: Option<ReadToken>) -> Result<ReadToken> {
    token.ok_or_else(|| Error::Protocol {
        endpoint: EP_KEYS,
        detail: "no read token was issued to the session's owner".into(),
    })
}

/// `io::Write` into a wiping buffer, so that the serialized prompt leaves no copies behind.
struct PlaintextWriter<'a>(&'a mut Plaintext);

impl io::Write for PlaintextWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The prompt payload as JSON, in a buffer wiped on drop.
fn encode_payload(payload: &PromptPayload) -> Result<Plaintext> {
    let text_len: usize = payload
        .messages
        .iter()
        .map(|m| m.role.len() + m.content.len() + 32)
        .chain(payload.prompt.iter().map(|p| p.len() + 16))
        .chain(payload.stop.iter().map(|s| s.len() + 4))
        .sum();
    // JSON escapes at most triple a byte's length; extend_from_slice wipes on growth anyway.
    let mut buf = Plaintext::with_capacity(text_len * 3 + 64);
    serde_json::to_writer(PlaintextWriter(&mut buf), payload)
        .map_err(|e| Error::Invalid(format!("cannot encode the prompt: {e}")))?;
    Ok(buf)
}

impl Client {
    /// Starts building a client of the router at `router_url` (e.g. `https://router.example`).
    pub fn builder(router_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: router_url.into(),
            signer: None,
            timeout: DEFAULT_TIMEOUT,
            completion_timeout: DEFAULT_COMPLETION_TIMEOUT,
            retries: DEFAULT_RETRIES,
            backoff: DEFAULT_BACKOFF,
            presigned_uploads: true,
            http: None,
        }
    }

    /// The wallet address that signs this client's messages.
    pub fn address(&self) -> Address {
        self.inner.address
    }

    /// The router's base URL.
    pub fn router_url(&self) -> &str {
        &self.inner.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.inner.base, path)
    }

    /// The URL of `route` with its `{name}` parameter filled with `id`.
    pub(crate) fn url_with(&self, route: &str, name: &str, id: Uuid) -> String {
        self.url(&routes::fill(route, name, &id.to_string()))
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub(crate) fn retrier(&self) -> Retrier {
        Retrier {
            backoff: ExponentialBuilder::new()
                .with_min_delay(self.inner.backoff)
                .with_max_delay(MAX_BACKOFF)
                .with_max_times(self.inner.retries)
                .with_jitter()
                .build(),
        }
    }

    /// Sends an unsigned request, retrying transient failures.
    async fn send(
        &self,
        endpoint: &'static str,
        make: impl Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let mut retrier = self.retrier();
        loop {
            if let Outcome::Response(r) = retrier.attempt(make(), endpoint).await? {
                return Ok(r);
            }
        }
    }

    /// Sends a signed request, retrying transient failures: the same signed body again when the
    /// previous attempt certainly did not reach the router, a body from `sign` (a fresh nonce)
    /// otherwise. Also says whether an earlier attempt may have reached the router: then an
    /// `…_exists` refusal means that attempt was applied and only its answer was lost.
    async fn send_signed<B, Fut>(
        &self,
        endpoint: &'static str,
        url: &str,
        mut sign: impl FnMut() -> Fut,
    ) -> (Result<Response>, bool)
    where
        B: Serialize,
        Fut: Future<Output = Result<B>>,
    {
        let mut retrier = self.retrier();
        let mut body: Option<B> = None;
        let (mut resign, mut ambiguous) = (false, false);
        loop {
            if body.is_none() || resign {
                match sign().await {
                    Ok(b) => body = Some(b),
                    Err(e) => return (Err(e), ambiguous),
                }
            }
            let rb = self
                .inner
                .http
                .post(url)
                .timeout(self.inner.timeout)
                .json(body.as_ref().expect("signed above"));
            match retrier.attempt(rb, endpoint).await {
                Ok(Outcome::Response(r)) => return (Ok(r), ambiguous),
                Ok(Outcome::Retry { reached }) => {
                    resign = reached;
                    ambiguous |= reached;
                }
                Err(e) => return (Err(e), ambiguous),
            }
        }
    }

    async fn sign<M: Message>(&self, message: M, domain: &Domain) -> Result<Signed<M>> {
        Signed::sign(message, domain, &*self.inner.signer)
            .await
            .map_err(|e| Error::Wallet(format!("signing {} failed: {e}", M::NAME)))
    }

    fn register(&self, session: &Session) {
        lock(&self.inner.sessions).insert(session.id(), session.clone());
    }

    fn known(&self, session_id: Uuid) -> Option<Session> {
        lock(&self.inner.sessions).get(&session_id).cloned()
    }

    // ---- configuration ----

    /// `GET /api/v3/config`: the deployment's EIP-712 domain, active key version and limits.
    /// The answer is cached for signing; this call always asks the router again.
    pub async fn config(&self) -> Result<V3Config> {
        let url = self.url(routes::V3_CONFIG);
        let resp = self
            .send(EP_CONFIG, || {
                self.inner.http.get(&url).timeout(self.inner.timeout)
            })
            .await?;
        let cfg: V3Config = json(EP_CONFIG, resp).await?;
        if cfg.protocol_version != 1 {
            return Err(Error::Protocol {
                endpoint: EP_CONFIG,
                detail: format!(
                    "protocol version {} (this client speaks 1)",
                    cfg.protocol_version
                ),
            });
        }
        *self.inner.config.write().unwrap_or_else(|e| e.into_inner()) = Some(cfg.clone());
        Ok(cfg)
    }

    pub(crate) async fn cached_config(&self) -> Result<V3Config> {
        let cached = self
            .inner
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match cached {
            Some(c) => Ok(c),
            None => self.config().await,
        }
    }

    // ---- sessions ----

    /// Opens a session owned by this wallet: signs an `OpenSession` with a fresh UUIDv7 session
    /// id and nonce, and keeps the read token the router answers with.
    pub async fn open_session(&self, opts: SessionOptions) -> Result<Session> {
        let cfg = self.cached_config().await?;
        let session_id = Uuid::now_v7();
        let ttl_secs = opts.ttl.map(|d| d.as_secs().max(1));
        let allowed: Vec<String> = opts
            .allowed_miners
            .iter()
            .map(|a| a.to_checksum(None))
            .collect();
        let url = self.url(routes::V3_SESSIONS);
        let (kind, domain, allowed) = (opts.kind.as_byte(), &cfg.domain, &allowed);
        let sign = move || {
            let msg = OpenSession {
                session_id,
                kind,
                expires_at: unix_now() + MESSAGE_TTL_SECS,
                nonce: Nonce::random(),
            };
            async move {
                Ok(OpenSessionRequest {
                    open: self.sign(msg, domain).await?,
                    ttl_secs,
                    allowed_miners: allowed.clone(),
                })
            }
        };
        let resp = match self.send_signed(EP_SESSIONS, &url, sign).await {
            (Ok(r), _) => r,
            // An earlier attempt got through but its answer was lost: take the session over.
            (Err(Error::Api { code, .. }), true) if code == "session_exists" => {
                return self.resume_session(session_id).await;
            }
            (Err(e), _) => return Err(e),
        };
        let opened: OpenSessionResponse = json(EP_SESSIONS, resp).await?;
        self.check_session(&opened.session, session_id, EP_SESSIONS)?;
        let session = Session::new(opened.session, Some(opened.token));
        self.register(&session);
        tracing::debug!(session_id = %session_id, "session opened");
        Ok(session)
    }

    fn check_session(&self, s: &V3Session, id: Uuid, endpoint: &'static str) -> Result<()> {
        if s.session_id != id {
            return Err(Error::Protocol {
                endpoint,
                detail: "the router answered with another session".into(),
            });
        }
        match parse_address(&s.owner) {
            Ok(owner) if owner == self.inner.address => Ok(()),
            Ok(owner) => Err(Error::NotOwner {
                message: format!("the session is owned by {owner}"),
            }),
            Err(e) => Err(Error::Protocol {
                endpoint,
                detail: format!("session.owner: {e}"),
            }),
        }
    }

    /// Reconnects to a session this wallet owns (opened by another process, or before a
    /// restart): a session-scope `KeyRequest` yields a read token and the session key.
    pub async fn resume_session(&self, session_id: Uuid) -> Result<Session> {
        let cfg = self.cached_config().await?;
        let version = cfg.active_key_version;
        let (key, token) = self
            .request_session_key(session_id, version, &cfg.domain)
            .await?;
        let token = owner_token(token)?;
        let info = self.fetch_session(session_id, &token.token).await?;
        self.check_session(&info, session_id, EP_SESSION)?;
        let session = Session::new(info, Some(token));
        session.cache_key(version, key);
        self.register(&session);
        Ok(session)
    }

    async fn fetch_session(&self, session_id: Uuid, token: &str) -> Result<V3Session> {
        let url = self.url_with(routes::V3_SESSION, "session_id", session_id);
        let resp = self
            .send(EP_SESSION, || {
                self.inner
                    .http
                    .get(&url)
                    .timeout(self.inner.timeout)
                    .bearer_auth(token)
            })
            .await?;
        json(EP_SESSION, resp).await
    }

    /// The session's current description (resuming it first when this client does not know it).
    pub async fn session(&self, session_id: Uuid) -> Result<V3Session> {
        let session = match self.known(session_id) {
            Some(s) => s,
            None => return Ok(self.resume_session(session_id).await?.info()),
        };
        let url = self.url_with(routes::V3_SESSION, "session_id", session_id);
        let resp = self
            .authed(&session, EP_SESSION, || {
                self.inner.http.get(&url).timeout(self.inner.timeout)
            })
            .await?;
        let info: V3Session = json(EP_SESSION, resp).await?;
        self.check_session(&info, session_id, EP_SESSION)?;
        session.set_info(info.clone());
        Ok(info)
    }

    /// Closes the session: no new tasks, and its keys are no longer released. The keys this
    /// client cached for it are dropped.
    pub async fn close_session(&self, session: &Session) -> Result<()> {
        let url = self.url_with(routes::V3_SESSION_CLOSE, "session_id", session.id());
        let resp = self
            .authed(session, EP_CLOSE, || {
                self.inner.http.post(&url).timeout(self.inner.timeout)
            })
            .await?;
        if let Ok(bytes) = resp.bytes().await
            && let Ok(info) = serde_json::from_slice::<V3Session>(&bytes)
        {
            session.set_info(info);
        }
        session.forget_keys();
        lock(&self.inner.sessions).remove(&session.id());
        Ok(())
    }

    /// Forgets a session this client knows (its token and cached keys are dropped once no
    /// `Session` handle holds them any more). The session stays open on the router.
    pub fn forget_session(&self, session_id: Uuid) {
        lock(&self.inner.sessions).remove(&session_id);
    }

    // ---- keys and tokens ----

    /// `K_session` of `version` for the session: from the in-memory cache, or through a signed
    /// session-scope `KeyRequest` wrapped to a fresh X25519 key of this client. Also renews the
    /// session's read token when the router issues one.
    pub async fn session_key(&self, session: &Session, version: u32) -> Result<SecretKey> {
        if let Some(k) = session.cached_key(version) {
            return Ok(k);
        }
        let cfg = self.cached_config().await?;
        let (key, token) = self
            .request_session_key(session.id(), version, &cfg.domain)
            .await?;
        if let Some(t) = token {
            session.set_token(t);
        }
        session.cache_key(version, key.clone());
        Ok(key)
    }

    async fn request_session_key(
        &self,
        session_id: Uuid,
        version: u32,
        domain: &Domain,
    ) -> Result<(SecretKey, Option<ReadToken>)> {
        let secret = X25519Secret::generate()?;
        let recipient = Hex32(*secret.public().as_bytes());
        let url = self.url(routes::V3_KEYS);
        let sign = move || {
            let msg = KeyRequest {
                session_id,
                task_id: Uuid::nil(),
                scope: Scope::Session.as_byte(),
                key_version: version,
                recipient,
                expires_at: unix_now() + MESSAGE_TTL_SECS,
                nonce: Nonce::random(),
            };
            self.sign(msg, domain)
        };
        let resp = self.send_signed(EP_KEYS, &url, sign).await.0?;
        let kr: KeyResponse = json(EP_KEYS, resp).await?;
        if kr.scope != Scope::Session.as_byte() || kr.key_version != version {
            return Err(Error::Protocol {
                endpoint: EP_KEYS,
                detail: format!(
                    "asked for the scope-1 key of version {version}, got scope {} version {}",
                    kr.scope, kr.key_version
                ),
            });
        }
        let wrapped = hex::decode(&kr.wrapped).map_err(|_| Error::Protocol {
            endpoint: EP_KEYS,
            detail: "`wrapped` is not hex".into(),
        })?;
        let key =
            unwrap_key(&secret, &wrapped, &KeyId::session(version, session_id)).map_err(|e| {
                Error::Integrity(format!(
                    "the wrapped session key does not open [{}]",
                    e.code()
                ))
            })?;
        tracing::debug!(session_id = %session_id, key_version = version, "session key unwrapped");
        Ok((key, kr.token))
    }

    /// A read token valid for at least a minute more.
    async fn bearer(&self, session: &Session) -> Result<String> {
        if let Some(t) = session.token()
            && t.expires_at > unix_now() + TOKEN_MARGIN_SECS
        {
            return Ok(t.token);
        }
        self.renew_token(session).await
    }

    async fn renew_token(&self, session: &Session) -> Result<String> {
        let cfg = self.cached_config().await?;
        let version = cfg.active_key_version;
        let (key, token) = self
            .request_session_key(session.id(), version, &cfg.domain)
            .await?;
        session.cache_key(version, key);
        let token = owner_token(token)?;
        session.set_token(token.clone());
        Ok(token.token)
    }

    /// Sends a request with the session's read token, renewing the token once when the router
    /// says it expired.
    pub(crate) async fn authed(
        &self,
        session: &Session,
        endpoint: &'static str,
        make: impl Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let token = self.bearer(session).await?;
        match self.send(endpoint, || make().bearer_auth(&token)).await {
            Err(Error::Api {
                status: 401, code, ..
            }) if code == "token_expired" || code == "invalid_token" => {
                session.clear_token();
                let token = self.renew_token(session).await?;
                self.send(endpoint, || make().bearer_auth(&token)).await
            }
            other => other,
        }
    }

    // ---- tasks ----

    /// Seals the request's prompt, uploads it and submits the task without waiting for it.
    /// Follow with [`Client::wait`] and [`Client::result`].
    pub async fn submit(&self, session: &Session, request: &CompletionRequest) -> Result<V3Task> {
        Ok(self.submit_inner(session, request, false).await?.task)
    }

    pub(crate) async fn submit_inner(
        &self,
        session: &Session,
        request: &CompletionRequest,
        stream: bool,
    ) -> Result<Submitted> {
        request.validate()?;
        let plaintext = encode_payload(&request.payload())?;
        let mut cfg = self.cached_config().await?;
        match self
            .submit_once(session, request, &plaintext, stream, &cfg)
            .await
        {
            Err(Error::KeyVersionStale { .. }) => {
                // Rotated since the config was read: read it again and reseal once.
                tracing::debug!("key version stale; resealing under the new active version");
                cfg = self.config().await?;
                self.submit_once(session, request, &plaintext, stream, &cfg)
                    .await
            }
            other => other,
        }
    }

    async fn submit_once(
        &self,
        session: &Session,
        request: &CompletionRequest,
        plaintext: &[u8],
        stream: bool,
        cfg: &V3Config,
    ) -> Result<Submitted> {
        let version = cfg.active_key_version;
        let session_id = session.id();
        let k_session = self.session_key(session, version).await?;
        let task_id = Uuid::now_v7();
        let k_task = derive_task_key(&k_session, &task_id);
        let params = BlobParams::new(KeyId::task(version, session_id, task_id), Purpose::Prompt);
        let blob = veil_keys::seal(&k_task, &params, plaintext)?;
        drop(k_task);
        if blob.len() as u64 > cfg.max_blob_bytes {
            return Err(Error::Invalid(format!(
                "the sealed prompt is {} bytes; this router accepts at most {}",
                blob.len(),
                cfg.max_blob_bytes
            )));
        }
        let prompt_hash = sha256(&blob);
        let prompt_urn = self
            .upload_prompt(
                session,
                task_id,
                Bytes::from(blob),
                prompt_hash,
                cfg.presigned_urls,
            )
            .await?;

        let params = request.params(stream);
        let url = self.url(routes::V3_COMPLETIONS);
        let (domain, prompt_urn, model, params) =
            (&cfg.domain, &prompt_urn, &request.model, &params);
        let sign = move || {
            let msg = SubmitTask {
                session_id,
                task_id,
                prompt_hash,
                prompt_urn: prompt_urn.clone(),
                model: model.clone(),
                expires_at: unix_now() + MESSAGE_TTL_SECS,
                nonce: Nonce::random(),
            };
            async move {
                Ok(SubmitTaskRequest {
                    task: self.sign(msg, domain).await?,
                    params: params.clone(),
                })
            }
        };
        let task: V3Task = match self.send_signed(EP_COMPLETIONS, &url, sign).await {
            (Ok(r), _) => json(EP_COMPLETIONS, r).await?,
            // An earlier attempt got through but its answer was lost.
            (Err(Error::Api { code, .. }), true) if code == "task_exists" => {
                self.task(session, task_id).await?
            }
            (Err(e), _) => return Err(e),
        };
        check_task(&task, session_id, task_id, EP_COMPLETIONS)?;
        if task.prompt_hash != prompt_hash {
            return Err(Error::Integrity(
                "the router's task names another prompt than the one this client sealed".into(),
            ));
        }
        tracing::debug!(session_id = %session_id, task_id = %task_id, key_version = version,
            prompt_hash = %prompt_hash, "task submitted");
        Ok(Submitted { task, prompt_hash })
    }

    async fn upload_prompt(
        &self,
        session: &Session,
        task_id: Uuid,
        blob: Bytes,
        hash: Hex32,
        presigned_available: bool,
    ) -> Result<String> {
        let path = routes::fill(
            &routes::fill(routes::V3_PROMPT, "session_id", &session.id().to_string()),
            "task_id",
            &task_id.to_string(),
        );
        // Uploads get time in proportion to their size: 30 s plus a second per MiB.
        let timeout = self.inner.timeout + Duration::from_secs(blob.len() as u64 / (1 << 20));
        if presigned_available && self.inner.presigned_uploads {
            let presign_url = self.url(&format!("{path}/presign"));
            let resp = self
                .authed(session, EP_PRESIGN, || {
                    self.inner
                        .http
                        .post(&presign_url)
                        .timeout(self.inner.timeout)
                })
                .await?;
            let presigned: PresignedUrl = json(EP_PRESIGN, resp).await?;
            self.send(EP_PRESIGNED_PUT, || {
                self.inner
                    .http
                    .put(&presigned.url)
                    .timeout(timeout)
                    .body(blob.clone())
            })
            .await?;
            return Ok(presigned.urn);
        }
        let url = self.url(&path);
        let resp = self
            .authed(session, EP_PROMPT, || {
                self.inner
                    .http
                    .put(&url)
                    .timeout(timeout)
                    .header(PROMPT_SHA256_HEADER, hash.to_string())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(blob.clone())
            })
            .await?;
        let receipt: UploadReceipt = json(EP_PROMPT, resp).await?;
        if receipt.sha256.is_some_and(|h| h != hash) {
            return Err(Error::Integrity(
                "the router stored a prompt blob with another hash".into(),
            ));
        }
        Ok(receipt.urn)
    }

    /// The task's state and, once completed, its result references (no waiting).
    pub async fn task(&self, session: &Session, task_id: Uuid) -> Result<V3Task> {
        self.get_task(session, task_id, None).await
    }

    async fn get_task(
        &self,
        session: &Session,
        task_id: Uuid,
        wait: Option<Duration>,
    ) -> Result<V3Task> {
        let mut url = self.url_with(routes::V3_TASK, "task_id", task_id);
        let timeout = match wait {
            Some(w) => {
                url.push_str(&format!("?wait_ms={}", w.as_millis()));
                w + LONG_POLL_SLACK
            }
            None => self.inner.timeout,
        };
        let resp = self
            .authed(session, EP_TASK, || {
                self.inner.http.get(&url).timeout(timeout)
            })
            .await?;
        let task: V3Task = json(EP_TASK, resp).await?;
        check_task(&task, session.id(), task_id, EP_TASK)?;
        Ok(task)
    }

    /// Waits (long-polling) until the task is final, for at most the completion timeout.
    pub async fn wait(&self, session: &Session, task_id: Uuid) -> Result<V3Task> {
        self.wait_until(
            session,
            task_id,
            Instant::now() + self.inner.completion_timeout,
        )
        .await
    }

    pub(crate) async fn wait_until(
        &self,
        session: &Session,
        task_id: Uuid,
        deadline: Instant,
    ) -> Result<V3Task> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout { task_id });
            }
            let wait = (deadline - now).min(POLL_WAIT);
            let task = self.get_task(session, task_id, Some(wait)).await?;
            if is_final(&task.state) {
                return Ok(task);
            }
            // A router that answers at once instead of holding the poll is not hammered.
            if now.elapsed() < Duration::from_millis(200) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    /// Fetches, verifies and opens the result of a completed task: the miner's signed
    /// `TaskResult`, the blob's SHA-256 and its AEAD are checked first. A result sealed under an
    /// older key version opens as long as that version is not retired.
    pub async fn result(&self, session: &Session, task_id: Uuid) -> Result<Completion> {
        let task = self.task(session, task_id).await?;
        self.open_result(session, &task, None).await
    }

    pub(crate) async fn open_result(
        &self,
        session: &Session,
        task: &V3Task,
        expected_prompt_hash: Option<Hex32>,
    ) -> Result<Completion> {
        let cfg = self.cached_config().await?;
        let result = final_result(task)?;
        let miner = verify_task_result(
            &cfg.domain,
            &session.info(),
            task,
            result,
            expected_prompt_hash,
        )?;
        let blob = self
            .download_result(session, task.task_id, result.size)
            .await?;
        if sha256(&blob) != result.signed.message.result_hash {
            return Err(Error::Integrity(
                "the result blob's SHA-256 is not the miner's signed resultHash".into(),
            ));
        }
        let header = Header::parse(&blob).map_err(|e| {
            Error::Integrity(format!(
                "the result blob's header is invalid [{}]",
                e.code()
            ))
        })?;
        check_result_header(&header, session.id(), task.task_id)?;
        let k_session = self.session_key(session, header.key.key_version).await?;
        let k_task = derive_task_key(&k_session, &task.task_id);
        let opened = veil_keys::open(&k_task, &blob).map_err(|e| {
            Error::Integrity(format!("the result blob does not open [{}]", e.code()))
        })?;
        let bytes = opened.plaintext.into_zeroizing();
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Error::Integrity("the result is not UTF-8 text".into()))?;
        Ok(Completion {
            text: Zeroizing::new(text.to_string()),
            task_id: task.task_id,
            session_id: task.session_id,
            model: task.model.clone(),
            miner,
            usage: result.usage,
            finish_reason: result.finish_reason.clone(),
            key_version: header.key.key_version,
            result_hash: result.signed.message.result_hash,
        })
    }

    async fn download_result(
        &self,
        session: &Session,
        task_id: Uuid,
        size: u64,
    ) -> Result<Vec<u8>> {
        let url = self.url_with(routes::V3_TASK_RESULT, "task_id", task_id);
        let timeout = self.inner.timeout + Duration::from_secs(size / (1 << 20));
        let resp = self
            .authed(session, EP_RESULT, || {
                self.inner.http.get(&url).timeout(timeout)
            })
            .await?;
        // Never read more than the task announced.
        let mut blob = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 26));
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(transport)?;
            if (blob.len() + chunk.len()) as u64 > size {
                return Err(Error::Integrity(
                    "the result blob is larger than the task announced".into(),
                ));
            }
            blob.extend_from_slice(&chunk);
        }
        Ok(blob)
    }

    /// Seals and submits a completion, waits for it and returns the verified, opened result.
    ///
    /// If the router answers `key_version_stale` (the key was rotated since the config was
    /// read), the config and session key are fetched again and the prompt is resealed once.
    pub async fn complete(
        &self,
        session: &Session,
        request: &CompletionRequest,
    ) -> Result<Completion> {
        let deadline = Instant::now() + self.inner.completion_timeout;
        let submitted = self.submit_inner(session, request, false).await?;
        let task = self
            .wait_until(session, submitted.task.task_id, deadline)
            .await?;
        self.open_result(session, &task, Some(submitted.prompt_hash))
            .await
    }

    /// Seals and submits a completion and streams its text as the miner produces it: each item
    /// is the text of one authenticated chunk. At the end the miner's signature and the hash of
    /// every byte received are checked; a failure is the stream's last item.
    pub async fn complete_stream(
        &self,
        session: &Session,
        request: &CompletionRequest,
    ) -> Result<CompletionStream> {
        let deadline = Instant::now() + self.inner.completion_timeout;
        let submitted = self.submit_inner(session, request, true).await?;
        CompletionStream::open(
            self.clone(),
            session.clone(),
            submitted.task,
            Some(submitted.prompt_hash),
            deadline,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::local::PrivateKeySigner;
    use veil_api::eip712::TaskResult;
    use veil_api::miner::{ChatMessage, Usage};

    fn task_with(result: V3Result, session_id: Uuid, task_id: Uuid) -> V3Task {
        V3Task {
            task_id,
            session_id,
            state: "completed".into(),
            model: "tiny".into(),
            key_version: 1,
            prompt_urn: "urn:blob:v1:fs:local:b:p".into(),
            prompt_hash: Hex32([1; 32]),
            attempts: 1,
            created_at_ms: 0,
            error: None,
            result: Some(result),
        }
    }

    fn signed_result(
        miner: &PrivateKeySigner,
        domain: &Domain,
        session_id: Uuid,
        task_id: Uuid,
    ) -> V3Result {
        let msg = TaskResult {
            session_id,
            task_id,
            prompt_hash: Hex32([1; 32]),
            result_hash: Hex32([2; 32]),
            result_urn: "urn:blob:v1:fs:local:b:r".into(),
        };
        V3Result {
            signed: Signed::sign_sync(msg, domain, miner).unwrap(),
            miner: miner.address().to_checksum(None),
            size: 10,
            usage: Usage::default(),
            finish_reason: "stop".into(),
            deleted: false,
        }
    }

    #[test]
    fn task_result_verification() {
        let domain = Domain::without_contract(31337);
        let miner = PrivateKeySigner::random();
        let (s, t) = (Uuid::now_v7(), Uuid::now_v7());
        let r = signed_result(&miner, &domain, s, t);
        let task = task_with(r.clone(), s, t);
        let info = |id: Uuid, private: bool, allowed: Vec<String>| V3Session {
            session_id: id,
            owner: PrivateKeySigner::random().address().to_checksum(None),
            kind: "dedicated".into(),
            private,
            allowed_miners: allowed,
            allowlist_source: "router".into(),
            created_at_ms: 0,
            expires_at_ms: None,
            closed_at_ms: None,
        };
        let public = info(s, false, vec![]);
        assert_eq!(
            verify_task_result(&domain, &public, &task, &r, Some(Hex32([1; 32]))).unwrap(),
            miner.address()
        );
        // Another session, another expected prompt, another domain, another miner: refused.
        assert!(matches!(
            verify_task_result(
                &domain,
                &info(Uuid::now_v7(), false, vec![]),
                &task,
                &r,
                None
            ),
            Err(Error::Integrity(_))
        ));
        assert!(matches!(
            verify_task_result(&domain, &public, &task, &r, Some(Hex32([9; 32]))),
            Err(Error::Integrity(_))
        ));
        assert!(matches!(
            verify_task_result(&Domain::without_contract(1), &public, &task, &r, None),
            Err(Error::Integrity(_))
        ));
        let mut other = r.clone();
        other.miner = PrivateKeySigner::random().address().to_checksum(None);
        assert!(matches!(
            verify_task_result(&domain, &public, &task, &other, None),
            Err(Error::Integrity(_))
        ));
        // A result signed for another task.
        let foreign = signed_result(&miner, &domain, s, Uuid::now_v7());
        assert!(matches!(
            verify_task_result(&domain, &public, &task, &foreign, None),
            Err(Error::Integrity(_))
        ));
        // A tampered message no longer recovers the miner.
        let mut tampered = r.clone();
        tampered.signed.message.result_hash = Hex32([3; 32]);
        assert!(matches!(
            verify_task_result(&domain, &public, &task, &tampered, None),
            Err(Error::Integrity(_))
        ));
        // A private session: its allowed miner passes, a miner it does not list is refused.
        let allowed = info(s, true, vec![miner.address().to_checksum(None)]);
        assert_eq!(
            verify_task_result(&domain, &allowed, &task, &r, None).unwrap(),
            miner.address()
        );
        let others = info(
            s,
            true,
            vec![PrivateKeySigner::random().address().to_checksum(None)],
        );
        assert!(matches!(
            verify_task_result(&domain, &others, &task, &r, None),
            Err(Error::Integrity(m)) if m.contains("does not allow")
        ));
    }

    #[test]
    fn final_states() {
        let domain = Domain::without_contract(31337);
        let miner = PrivateKeySigner::random();
        let (s, t) = (Uuid::now_v7(), Uuid::now_v7());
        let mut task = task_with(signed_result(&miner, &domain, s, t), s, t);
        assert!(final_result(&task).is_ok());
        task.result.as_mut().unwrap().deleted = true;
        assert!(matches!(
            final_result(&task),
            Err(Error::ResultDeleted { .. })
        ));
        task.state = "leased".into();
        assert!(matches!(final_result(&task), Err(Error::Pending { .. })));
        task.state = "dead".into();
        task.error = Some(veil_api::v3::TaskFailure {
            code: "attempts_exhausted".into(),
            message: "3 attempts".into(),
        });
        assert!(
            matches!(final_result(&task), Err(Error::TaskFailed { code, .. }) if code == "attempts_exhausted")
        );
    }

    #[test]
    fn payload_encoding_round_trips() {
        let p = PromptPayload {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "héllo \"quoted\" \u{1}".repeat(50),
            }],
            prompt: None,
            stop: vec!["\n\n".into()],
        };
        let buf = encode_payload(&p).unwrap();
        let back: PromptPayload = serde_json::from_slice(&buf).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn builder_refuses_bad_input_and_debug_is_clean() {
        let w = PrivateKeySigner::random();
        assert!(matches!(
            Client::builder("ftp://x").signer(w.clone()).build(),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            Client::builder("http://127.0.0.1:1").build(),
            Err(Error::Wallet(_))
        ));
        let c = Client::builder("https://user:pw@router.example/secret?k=v")
            .signer(w)
            .build()
            .unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("secret") && !d.contains("pw"), "{d}");
        assert!(d.contains("https://router.example"), "{d}");
    }

    #[test]
    fn header_check() {
        let (s, t) = (Uuid::now_v7(), Uuid::now_v7());
        let key = SecretKey::from_bytes([7; 32]);
        let blob = veil_keys::seal(
            &key,
            &BlobParams::new(KeyId::task(1, s, t), Purpose::Result),
            b"x",
        )
        .unwrap();
        let h = Header::parse(&blob).unwrap();
        assert!(check_result_header(&h, s, t).is_ok());
        assert!(check_result_header(&h, s, Uuid::now_v7()).is_err());
        let prompt = veil_keys::seal(
            &key,
            &BlobParams::new(KeyId::task(1, s, t), Purpose::Prompt),
            b"x",
        )
        .unwrap();
        assert!(check_result_header(&Header::parse(&prompt).unwrap(), s, t).is_err());
    }
}
