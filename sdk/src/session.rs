//! A v3 session as the client holds it: its description, its read token and its session keys.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use alloy::primitives::Address;
use uuid::Uuid;
use veil_api::eip712::{KIND_DEDICATED, KIND_POOLED};
use veil_api::v3::{ReadToken, V3Session};
use veil_keys::SecretKey;

/// Dedicated (one caller's private sessions) or pooled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SessionKind {
    /// A dedicated session (`OpenSession.kind` 0x01).
    #[default]
    Dedicated,
    /// A pooled session (`OpenSession.kind` 0x02).
    Pooled,
}

impl SessionKind {
    /// The `OpenSession.kind` byte.
    pub fn as_byte(self) -> u8 {
        match self {
            SessionKind::Dedicated => KIND_DEDICATED,
            SessionKind::Pooled => KIND_POOLED,
        }
    }

    /// `dedicated` or `pooled`, as the router writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Dedicated => "dedicated",
            SessionKind::Pooled => "pooled",
        }
    }
}

impl fmt::Display for SessionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dedicated" => Ok(SessionKind::Dedicated),
            "pooled" => Ok(SessionKind::Pooled),
            _ => Err("expected `dedicated` or `pooled`".into()),
        }
    }
}

/// How to open a session ([`crate::Client::open_session`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Dedicated (default) or pooled.
    pub kind: SessionKind,
    /// Lifetime; `None` for no expiry.
    pub ttl: Option<Duration>,
    /// Miners allowed to serve the session. A non-empty list makes it private with a
    /// router-managed allowlist; empty takes the router's default.
    pub allowed_miners: Vec<Address>,
}

impl SessionOptions {
    /// Defaults: dedicated, no expiry, the router's default allowlist.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the kind.
    pub fn kind(mut self, kind: SessionKind) -> Self {
        self.kind = kind;
        self
    }

    /// Sets the lifetime (whole seconds are sent).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Allows one more miner (making the session private).
    pub fn allow_miner(mut self, miner: Address) -> Self {
        self.allowed_miners.push(miner);
        self
    }
}

/// Session keys by key version, held in memory only. Dropping the cache (or a key leaving it)
/// zeroizes the key; its `Debug` names the versions only.
#[derive(Default)]
pub(crate) struct KeyCache(HashMap<u32, SecretKey>);

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut versions: Vec<_> = self.0.keys().copied().collect();
        versions.sort_unstable();
        f.debug_struct("KeyCache")
            .field("versions", &versions)
            .finish()
    }
}

pub(crate) struct SessionInner {
    pub(crate) id: Uuid,
    pub(crate) info: Mutex<V3Session>,
    pub(crate) token: Mutex<Option<ReadToken>>,
    pub(crate) keys: Mutex<KeyCache>,
}

/// A handle on an open v3 session: cheap to clone, clones share the token and the key cache.
///
/// It holds the session's read token and the session keys (`K_session`, one per key version)
/// the client fetched, in memory only; task keys are derived from them locally. `Debug` shows
/// neither.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Arc<SessionInner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    pub(crate) fn new(info: V3Session, token: Option<ReadToken>) -> Self {
        Self {
            inner: Arc::new(SessionInner {
                id: info.session_id,
                info: Mutex::new(info),
                token: Mutex::new(token),
                keys: Mutex::new(KeyCache::default()),
            }),
        }
    }

    /// The session id.
    pub fn id(&self) -> Uuid {
        self.inner.id
    }

    /// The session as the router last described it.
    pub fn info(&self) -> V3Session {
        lock(&self.inner.info).clone()
    }

    /// Unix seconds at which the current read token lapses (the client renews it by itself).
    pub fn token_expires_at(&self) -> Option<u64> {
        lock(&self.inner.token).as_ref().map(|t| t.expires_at)
    }

    /// The key versions whose session key is cached.
    pub fn cached_key_versions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = lock(&self.inner.keys).0.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Drops (and zeroizes) every cached session key; they are fetched again when needed.
    pub fn forget_keys(&self) {
        lock(&self.inner.keys).0.clear();
    }

    pub(crate) fn set_info(&self, info: V3Session) {
        *lock(&self.inner.info) = info;
    }

    pub(crate) fn token(&self) -> Option<ReadToken> {
        lock(&self.inner.token).clone()
    }

    pub(crate) fn set_token(&self, token: ReadToken) {
        *lock(&self.inner.token) = Some(token);
    }

    pub(crate) fn clear_token(&self) {
        *lock(&self.inner.token) = None;
    }

    pub(crate) fn cached_key(&self, version: u32) -> Option<SecretKey> {
        lock(&self.inner.keys).0.get(&version).cloned()
    }

    pub(crate) fn cache_key(&self, version: u32, key: SecretKey) {
        lock(&self.inner.keys).0.insert(version, key);
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.info();
        f.debug_struct("Session")
            .field("id", &self.inner.id)
            .field("owner", &info.owner)
            .field("kind", &info.kind)
            .field("private", &info.private)
            .field("token_expires_at", &self.token_expires_at())
            .field("keys", &*lock(&self.inner.keys))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> V3Session {
        V3Session {
            session_id: Uuid::nil(),
            owner: "0x0000000000000000000000000000000000000001".into(),
            kind: "dedicated".into(),
            private: false,
            allowed_miners: vec![],
            allowlist_source: "router".into(),
            created_at_ms: 0,
            expires_at_ms: None,
            closed_at_ms: None,
        }
    }

    #[test]
    fn debug_shows_no_key_or_token() {
        let s = Session::new(
            info(),
            Some(ReadToken {
                token: "vst_supersecret".into(),
                expires_at: 9,
            }),
        );
        s.cache_key(3, SecretKey::from_bytes([0xab; 32]));
        let d = format!("{s:?}");
        assert!(!d.contains("supersecret"), "{d}");
        assert!(!d.to_lowercase().contains("abab"), "{d}");
        assert!(!d.contains("171"), "{d}"); // 0xab as decimal
        assert!(d.contains("versions: [3]"), "{d}");
        assert_eq!(s.cached_key_versions(), vec![3]);
        s.forget_keys();
        assert!(s.cached_key(3).is_none());
    }

    #[test]
    fn kinds_parse() {
        assert_eq!(
            "pooled".parse::<SessionKind>().unwrap(),
            SessionKind::Pooled
        );
        assert_eq!(SessionKind::Dedicated.as_byte(), 1);
        assert!("other".parse::<SessionKind>().is_err());
    }
}
