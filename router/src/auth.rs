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
        let permit = state.limits.admit(&key).await?;
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
        let now = now_ms();
        if let Some(m) = state.miner_sessions.get(&hash, now) {
            return Ok(Miner(m));
        }
        match state.store.miner_session(&hash, now).await {
            Ok(m) => {
                state.miner_sessions.insert(&m, now);
                Ok(Miner(m))
            }
            Err(StoreError::NotFound { .. }) => Err(ApiError::unauthorized(
                "token_expired",
                "unknown or expired miner token; log in again",
            )),
            Err(e) => Err(e.into()),
        }
    }
}

/// Miner sessions seen recently, by token hash. A miner session never changes once stored and
/// is never revoked before its expiry (a miner logs in again for a new one), so a cached session
/// is exactly what the store would answer until `expires_at_ms`; the cache saves a database read
/// on each of the five or so miner requests a task takes.
#[derive(Debug, Default)]
pub struct MinerSessionCache {
    map: std::sync::Mutex<std::collections::HashMap<[u8; 32], MinerSession>>,
}

/// Sessions kept at most; beyond this, expired ones are dropped, then the whole cache.
const MINER_SESSION_CACHE: usize = 4096;

impl MinerSessionCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], MinerSession>> {
        // The map holds no invariant a panic could break.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session of `token_hash`, if cached and not expired at `now_ms`.
    pub fn get(&self, token_hash: &[u8; 32], now_ms: i64) -> Option<MinerSession> {
        let mut map = self.lock();
        match map.get(token_hash) {
            Some(m) if m.expires_at_ms > now_ms => Some(m.clone()),
            Some(_) => {
                map.remove(token_hash);
                None
            }
            None => None,
        }
    }

    /// Remembers `m` (read from the store at `now_ms`).
    pub fn insert(&self, m: &MinerSession, now_ms: i64) {
        let mut map = self.lock();
        if map.len() >= MINER_SESSION_CACHE {
            map.retain(|_, s| s.expires_at_ms > now_ms);
            if map.len() >= MINER_SESSION_CACHE {
                map.clear();
            }
        }
        map.insert(m.token_hash, m.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(n: u8, expires_at_ms: i64) -> MinerSession {
        MinerSession {
            token_hash: [n; 32],
            miner: format!("0x{n:040x}"),
            recipient: [n; 32],
            models: vec![("m".into(), None)],
            created_at_ms: 0,
            expires_at_ms,
        }
    }

    #[test]
    fn a_cached_miner_session_is_answered_until_it_expires() {
        let c = MinerSessionCache::default();
        assert_eq!(c.get(&[1; 32], 0), None);
        c.insert(&session(1, 100), 0);
        assert_eq!(c.get(&[1; 32], 99), Some(session(1, 100)));
        assert_eq!(c.get(&[1; 32], 100), None, "expired at expires_at_ms");
        assert_eq!(c.get(&[1; 32], 50), None, "and dropped from the cache");
    }

    #[test]
    fn the_cache_stays_bounded_dropping_expired_sessions_first() {
        let c = MinerSessionCache::default();
        let fill = |expiring: bool| {
            for i in 0..MINER_SESSION_CACHE {
                let exp = if expiring && i % 2 == 0 { 10 } else { 1_000 };
                let mut s = session(0, exp);
                s.token_hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
                c.insert(&s, 0);
            }
            assert_eq!(c.lock().len(), MINER_SESSION_CACHE);
        };
        fill(true);
        c.insert(&session(200, 1_000), 500);
        assert_eq!(
            c.lock().len(),
            MINER_SESSION_CACHE / 2 + 1,
            "expired ones dropped"
        );
        c.lock().clear();
        fill(false);
        c.insert(&session(201, 1_000), 500);
        assert_eq!(c.lock().len(), 1, "full of live sessions: started afresh");
        assert!(c.get(&[201; 32], 500).is_some());
    }
}
