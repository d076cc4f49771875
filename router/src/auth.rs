//! Callers: API-key holders (`Authorization: Bearer vk_…`) and logged-in miners
//! (`Authorization: Bearer vm_…`). Secrets are looked up by their SHA-256 only.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::limits::Permit;
use crate::state::{AppState, now_ms};
use crate::store::{ApiKey, MinerSession, StoreError};

/// Prefix of API key secrets.
pub const API_KEY_PREFIX: &str = "vk_";
/// Prefix of miner bearer tokens.
pub const MINER_TOKEN_PREFIX: &str = "vm_";

/// A fresh secret with `prefix` and 32 random bytes, and its SHA-256.
pub fn new_secret(prefix: &str) -> (zeroize::Zeroizing<String>, [u8; 32]) {
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(raw.as_mut()).expect("operating system random source");
    let secret = zeroize::Zeroizing::new(format!("{prefix}{}", hex::encode(raw.as_ref())));
    let hash = Sha256::digest(secret.as_bytes()).into();
    (secret, hash)
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized("missing_credentials", "send Authorization: Bearer <key>")
                .param("Authorization")
        })?
        .to_str()
        .map_err(|_| {
            ApiError::unauthorized("invalid_credentials", "malformed Authorization header")
        })?;
    value.strip_prefix("Bearer ").map(str::trim).ok_or_else(|| {
        ApiError::unauthorized(
            "invalid_credentials",
            "expected Authorization: Bearer <key>",
        )
        .param("Authorization")
    })
}

/// An authenticated API-key caller, admitted by its limits.
#[derive(Debug)]
pub struct Caller {
    /// The key.
    pub key: ApiKey,
    /// Held until the request (and its stream) ends.
    pub permit: Permit,
}

impl Caller {
    /// The owner string used for sessions and tasks.
    pub fn owner(&self) -> String {
        self.key.owner.clone()
    }
    /// The actor string used in the audit log.
    pub fn actor(&self) -> String {
        format!("key:{}", self.key.id)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if !token.starts_with(API_KEY_PREFIX) {
            return Err(ApiError::unauthorized("invalid_api_key", "unknown API key"));
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let key = match state.store.api_key_by_hash(&hash).await {
            Ok(k) => k,
            Err(StoreError::NotFound { .. }) => {
                return Err(ApiError::unauthorized("invalid_api_key", "unknown API key"));
            }
            Err(e) => return Err(e.into()),
        };
        if key.revoked_at_ms.is_some() {
            return Err(ApiError::unauthorized(
                "api_key_revoked",
                "this API key was revoked",
            ));
        }
        let permit = state.limits.admit(&key)?;
        Ok(Caller { key, permit })
    }
}

/// An API-key caller with admin rights.
#[derive(Debug)]
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.key.admin {
            return Err(ApiError::forbidden(
                "admin_required",
                "this endpoint needs an admin API key",
            ));
        }
        Ok(Admin(caller))
    }
}

/// A logged-in miner.
#[derive(Debug)]
pub struct Miner(pub MinerSession);

impl FromRequestParts<AppState> for Miner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if !token.starts_with(MINER_TOKEN_PREFIX) {
            return Err(ApiError::unauthorized(
                "invalid_token",
                "unknown miner token",
            ));
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        match state.store.miner_session(&hash, now_ms()).await {
            Ok(m) => Ok(Miner(m)),
            Err(StoreError::NotFound { .. }) => Err(ApiError::unauthorized(
                "token_expired",
                "unknown or expired miner token; log in again",
            )),
            Err(e) => Err(e.into()),
        }
    }
}
