//! Per-caller limits (an API key, or a wallet on `/api/v3`): requests per minute (a GCRA limiter
//! from `governor`) and concurrent requests (a semaphore). Both are answered with 429 and
//! `Retry-After`.
//!
//! Limiters are created on first use. Since anyone can make new wallets, the table is swept when
//! it grows: a limiter idle for a minute with no request in flight is back at its full quota, so
//! dropping it changes nothing for its caller.
//!
//! On a store that several router processes share (PostgreSQL), the rate is kept in the store
//! (`Store::take_rate`, the same algorithm), so that a key's rate holds across replicas: one
//! more round trip per request. The concurrency limit is kept per process: with N replicas a
//! caller can have up to N times its concurrent requests in flight.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::error::ApiError;
use crate::store::{ApiKey, Store};

struct KeyLimits {
    rate_per_minute: u32,
    max_concurrent: u32,
    rate: Option<DefaultDirectRateLimiter>,
    concurrent: Option<Arc<Semaphore>>,
    /// Milliseconds after [`Limits::epoch`] of the last admission.
    last_used_ms: AtomicU64,
}

impl KeyLimits {
    /// No request in flight and none admitted for a minute: the limiter is at its full quota.
    fn is_idle(&self, now_ms: u64) -> bool {
        let in_flight = self
            .concurrent
            .as_ref()
            .is_some_and(|s| s.available_permits() < self.max_concurrent as usize);
        !in_flight
            && now_ms.saturating_sub(self.last_used_ms.load(Ordering::Relaxed))
                >= IDLE_AFTER.as_millis() as u64
    }
}

/// A limiter unused this long is at its full quota again (quotas are per minute).
const IDLE_AFTER: Duration = Duration::from_secs(60);
/// The table is swept of idle limiters once it holds more than this many.
const SWEEP_ABOVE: usize = 10_000;

/// All callers' limiters, created on first use and rebuilt when a caller's limits change.
pub struct Limits {
    table: Mutex<Table>,
    epoch: Instant,
    /// Where rates are kept when replicas share the store.
    shared: Option<Arc<dyn Store>>,
}

struct Table {
    keys: HashMap<Uuid, Arc<KeyLimits>>,
    /// Sweep when the table grows past this (doubles when a sweep frees too little).
    sweep_at: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(None)
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Limits(..)")
    }
}

/// Held for the duration of a request (and of its response stream).
#[derive(Debug)]
pub struct Permit {
    _concurrent: Option<OwnedSemaphorePermit>,
}

impl Limits {
    /// Limits with rates kept in this process, or in `shared` (a store replicas share).
    pub fn new(shared: Option<Arc<dyn Store>>) -> Self {
        Self {
            table: Mutex::new(Table {
                keys: HashMap::new(),
                sweep_at: SWEEP_ABOVE,
            }),
            epoch: Instant::now(),
            shared,
        }
    }

    /// Limits for the router's store: rates in the store when replicas share it.
    pub fn for_store(store: &Arc<dyn Store>) -> Self {
        Self::new(store.shared().then(|| Arc::clone(store)))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn for_key(&self, key: &ApiKey) -> Arc<KeyLimits> {
        self.for_key_at(key, self.now_ms())
    }

    fn for_key_at(&self, key: &ApiKey, now: u64) -> Arc<KeyLimits> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = table.keys.get(&key.id)
            && l.rate_per_minute == key.rate_per_minute
            && l.max_concurrent == key.max_concurrent
        {
            l.last_used_ms.store(now, Ordering::Relaxed);
            return l.clone();
        }
        let l = Arc::new(KeyLimits {
            rate_per_minute: key.rate_per_minute,
            max_concurrent: key.max_concurrent,
            rate: NonZeroU32::new(key.rate_per_minute)
                .filter(|_| self.shared.is_none())
                .map(|n| DefaultDirectRateLimiter::direct(Quota::per_minute(n))),
            concurrent: (key.max_concurrent > 0)
                .then(|| Arc::new(Semaphore::new(key.max_concurrent as usize))),
            last_used_ms: AtomicU64::new(now),
        });
        table.keys.insert(key.id, l.clone());
        if table.keys.len() > table.sweep_at {
            table.keys.retain(|_, l| !l.is_idle(now));
            table.sweep_at = SWEEP_ABOVE.max(2 * table.keys.len());
        }
        l
    }

    /// Number of limiters held (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .len()
    }

    /// Whether no limiter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits one request for `key` or answers 429 with `Retry-After`. Fails closed: when the
    /// shared store cannot be asked, the request is refused with the store's error.
    pub async fn admit(&self, key: &ApiKey) -> Result<Permit, ApiError> {
        let l = self.for_key(key);
        let concurrent = match &l.concurrent {
            Some(sem) => Some(sem.clone().try_acquire_owned().map_err(|_| {
                metrics::counter!("veil_rate_limited_total", "limit" => "concurrency").increment(1);
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_concurrent_requests",
                    format!(
                        "this caller (API key or wallet) allows {} concurrent requests; retry when one finishes",
                        l.max_concurrent
                    ),
                );
                e.retry_after = Some(1);
                e
            })?),
            None => None,
        };
        let wait = match (&self.shared, &l.rate) {
            (Some(store), _) if l.rate_per_minute > 0 => {
                let n = i64::from(l.rate_per_minute);
                // Rounded up, so that no more than the rate goes through in a minute.
                let interval_us = (60_000_000 + n - 1) / n;
                store
                    .take_rate(key.id, unix_us(), interval_us, l.rate_per_minute)
                    .await?
                    .map(|us| Duration::from_micros(us.unsigned_abs()))
            }
            (None, Some(rate)) => rate
                .check()
                .err()
                .map(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
            _ => None,
        };
        if let Some(wait) = wait {
            metrics::counter!("veil_rate_limited_total", "limit" => "rate").increment(1);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this caller (API key or wallet) allows {} requests per minute",
                    l.rate_per_minute
                ),
            );
            // Whole seconds, rounded up, at least one.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            e.retry_after = Some(secs.max(1));
            return Err(e);
        }
        Ok(Permit {
            _concurrent: concurrent,
        })
    }
}

/// Microseconds since the Unix epoch (the clock replicas share).
fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(i: u32) -> ApiKey {
        ApiKey {
            id: Uuid::from_u128(u128::from(i) + 1),
            owner: format!("key:{i}"),
            prefix: String::new(),
            admin: false,
            rate_per_minute: 600,
            max_concurrent: 4,
            default_session: None,
            created_at_ms: 0,
            revoked_at_ms: None,
        }
    }

    #[test]
    fn idle_limiters_are_swept_when_the_table_grows() {
        let limits = Limits::default();
        for i in 0..SWEEP_ABOVE as u32 {
            limits.for_key_at(&caller(i), 0);
        }
        assert_eq!(limits.len(), SWEEP_ABOVE, "no sweep below the bound");
        // One caller still has a request in flight, one was admitted recently.
        let busy = limits.for_key_at(&caller(0), 0);
        let _in_flight = busy
            .concurrent
            .clone()
            .unwrap()
            .try_acquire_owned()
            .unwrap();
        limits.for_key_at(&caller(1), 30_000);
        // The next new caller, a minute later, triggers the sweep.
        limits.for_key_at(&caller(SWEEP_ABOVE as u32), 60_000);
        assert_eq!(limits.len(), 3, "busy, recent and new callers stay");
    }

    #[tokio::test]
    async fn a_spent_quota_is_answered_429_with_retry_after() {
        let limits = Limits::default();
        let key = ApiKey {
            rate_per_minute: 1,
            ..caller(7)
        };
        limits.admit(&key).await.unwrap();
        let e = limits.admit(&key).await.unwrap_err();
        assert_eq!(e.code, "rate_limited");
        assert!(e.retry_after.unwrap() >= 1);
    }
}
