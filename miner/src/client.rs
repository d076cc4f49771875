//! [`MinerClient`]: one method per miner endpoint, nothing more. It neither retries nor
//! re-authenticates (the [`crate::Worker`] does), so tests can use it to act like any miner,
//! misbehaving ones included.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;
use veil_api::eip712::{KeyRequest, Signed};
use veil_api::miner::{
    BlobReceipt, CompleteRequest, CompleteResponse, HeartbeatResponse, Lease, LeaseRequest,
    LoginRequest, LoginResponse, MinerConfig, ReleaseRequest, WrappedKey,
};
use veil_api::{ErrorBody, routes};

use crate::{Error, Result};

/// Default limit on the size of a sealed prompt blob.
pub const DEFAULT_MAX_PROMPT_BYTES: u64 = 64 * 1024 * 1024;

/// Time allowed for an ordinary (non-long-poll, non-streaming) request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Slack on top of `wait_ms` for a long poll.
const LONG_POLL_SLACK: Duration = Duration::from_secs(15);

/// Installs rustls' ring crypto provider as the process default, unless one is installed.
/// reqwest is built without a provider of its own; every client constructor calls this.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A thin client of the router's miner API. Cheap to clone; clones share the bearer token.
#[derive(Clone)]
pub struct MinerClient {
    http: reqwest::Client,
    base: Arc<str>,
    token: Arc<RwLock<Option<String>>>,
    max_prompt_bytes: u64,
}

impl fmt::Debug for MinerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MinerClient")
            .field("base", &self.base)
            .field("logged_in", &self.token().is_some())
            .finish_non_exhaustive()
    }
}

impl MinerClient {
    /// A client for the router at `base_url` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base_url: &str) -> Result<Self> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()?;
        Self::with_http(base_url, http)
    }

    /// A client using a prepared `reqwest::Client` (custom roots, proxies, timeouts).
    pub fn with_http(base_url: &str, http: reqwest::Client) -> Result<Self> {
        let base = base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Config(format!(
                "router URL must start with http:// or https://, got {base:?}"
            )));
        }
        Ok(Self {
            http,
            base: base.into(),
            token: Arc::new(RwLock::new(None)),
            max_prompt_bytes: DEFAULT_MAX_PROMPT_BYTES,
        })
    }

    /// Refuses prompt blobs larger than `limit` bytes.
    pub fn with_max_prompt_bytes(mut self, limit: u64) -> Self {
        self.max_prompt_bytes = limit;
        self
    }

    /// The router's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The current bearer token.
    pub fn token(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets (or clears) the bearer token.
    pub fn set_token(&self, token: Option<String>) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn lease_url(&self, template: &str, lease_id: Uuid) -> String {
        self.url(&routes::fill(template, "lease_id", &lease_id.to_string()))
    }

    fn request(&self, method: Method, url: String) -> RequestBuilder {
        let rb = self.http.request(method, url);
        match self.token() {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// `GET /api/miner/config`.
    pub async fn config(&self) -> Result<MinerConfig> {
        let resp = self
            .http
            .get(self.url(routes::MINER_CONFIG))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        json(routes::MINER_CONFIG, resp).await
    }

    /// `POST /api/miner/login`; on success the token is kept for later calls.
    pub async fn login(&self, body: &LoginRequest) -> Result<LoginResponse> {
        let resp = self
            .http
            .post(self.url(routes::MINER_LOGIN))
            .timeout(REQUEST_TIMEOUT)
            .json(body)
            .send()
            .await?;
        let login: LoginResponse = json(routes::MINER_LOGIN, resp).await?;
        self.set_token(Some(login.token.clone()));
        Ok(login)
    }

    /// `POST /api/miner/lease`: a lease, or `None` when nothing came within `wait_ms`.
    pub async fn lease(&self, body: &LeaseRequest) -> Result<Option<Lease>> {
        let resp = self
            .request(Method::POST, self.url(routes::MINER_LEASE))
            .timeout(Duration::from_millis(body.wait_ms) + LONG_POLL_SLACK)
            .json(body)
            .send()
            .await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        json(routes::MINER_LEASE, resp).await.map(Some)
    }

    /// `POST /api/miner/leases/{lease_id}/heartbeat`.
    pub async fn heartbeat(&self, lease_id: Uuid) -> Result<HeartbeatResponse> {
        let resp = self
            .request(
                Method::POST,
                self.lease_url(routes::MINER_HEARTBEAT, lease_id),
            )
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        json(routes::MINER_HEARTBEAT, resp).await
    }

    /// `POST /api/miner/leases/{lease_id}/key` with a signed `KeyRequest`.
    pub async fn key(&self, lease_id: Uuid, body: &Signed<KeyRequest>) -> Result<WrappedKey> {
        self.post_json(routes::MINER_KEY, lease_id, body).await
    }

    /// `GET /api/miner/leases/{lease_id}/prompt`: the sealed prompt blob, as is (the caller
    /// checks its hash and opens it).
    pub async fn prompt(&self, lease_id: Uuid) -> Result<Bytes> {
        let resp = self
            .request(Method::GET, self.lease_url(routes::MINER_PROMPT, lease_id))
            .timeout(REQUEST_TIMEOUT * 4)
            .send()
            .await?;
        let resp = check(resp).await?;
        let limit = self.max_prompt_bytes;
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(Error::PromptTooLarge { limit });
        }
        let mut body = Vec::with_capacity(resp.content_length().unwrap_or(0) as usize);
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(Error::PromptTooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.into())
    }

    /// `PUT /api/miner/leases/{lease_id}/result`: uploads the sealed result. Pass a streaming
    /// body (`reqwest::Body::wrap_stream`) to send frames as they are sealed.
    pub async fn put_result(
        &self,
        lease_id: Uuid,
        body: impl Into<reqwest::Body>,
    ) -> Result<BlobReceipt> {
        let resp = self
            .request(Method::PUT, self.lease_url(routes::MINER_RESULT, lease_id))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await?;
        json(routes::MINER_RESULT, resp).await
    }

    /// `POST /api/miner/leases/{lease_id}/complete` with the signed `TaskResult`.
    pub async fn complete(
        &self,
        lease_id: Uuid,
        body: &CompleteRequest,
    ) -> Result<CompleteResponse> {
        self.post_json(routes::MINER_COMPLETE, lease_id, body).await
    }

    /// `POST /api/miner/leases/{lease_id}/release`: the task goes back to the queue.
    pub async fn release(&self, lease_id: Uuid, reason: &str) -> Result<()> {
        self.post_empty(routes::MINER_RELEASE, lease_id, reason)
            .await
    }

    /// `POST /api/miner/leases/{lease_id}/fail`: the task fails for good.
    pub async fn fail(&self, lease_id: Uuid, reason: &str) -> Result<()> {
        self.post_empty(routes::MINER_FAIL, lease_id, reason).await
    }

    async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        template: &'static str,
        lease_id: Uuid,
        body: &B,
    ) -> Result<T> {
        let resp = self
            .request(Method::POST, self.lease_url(template, lease_id))
            .timeout(REQUEST_TIMEOUT)
            .json(body)
            .send()
            .await?;
        json(template, resp).await
    }

    async fn post_empty(&self, template: &'static str, lease_id: Uuid, reason: &str) -> Result<()> {
        let resp = self
            .request(Method::POST, self.lease_url(template, lease_id))
            .timeout(REQUEST_TIMEOUT)
            .json(&ReleaseRequest {
                reason: reason.to_string(),
            })
            .send()
            .await?;
        check(resp).await.map(drop)
    }
}

/// Turns an error status into [`Error::Api`], reading the `ErrorBody` when there is one.
async fn check(resp: Response) -> Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    Err(match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => Error::Api {
            status: status.as_u16(),
            code: body.error.code,
            message: body.error.message,
        },
        Err(_) => Error::Api {
            status: status.as_u16(),
            code: format!("http_{}", status.as_u16()),
            message: status
                .canonical_reason()
                .unwrap_or("unexpected status")
                .to_string(),
        },
    })
}

async fn json<T: DeserializeOwned>(endpoint: &'static str, resp: Response) -> Result<T> {
    let resp = check(resp).await?;
    let bytes = resp.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
        endpoint,
        detail: e.to_string(),
    })
}
