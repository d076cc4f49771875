//! Per-API-key limits: requests per minute (a GCRA limiter from `governor`) and concurrent
//! requests (a semaphore). Both are answered with 429 and `Retry-After`.
//!
//! Limits are kept per router process: with N replicas behind a load balancer a key can reach
//! up to N times its rate. A shared limiter would need a shared counter store; see docs.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::error::ApiError;
use crate::store::ApiKey;

struct KeyLimits {
    rate_per_minute: u32,
    max_concurrent: u32,
    rate: Option<DefaultDirectRateLimiter>,
    concurrent: Option<Arc<Semaphore>>,
}

/// All keys' limiters, created on first use and rebuilt when a key's limits change.
#[derive(Default)]
pub struct Limits {
    keys: Mutex<HashMap<Uuid, Arc<KeyLimits>>>,
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
    fn for_key(&self, key: &ApiKey) -> Arc<KeyLimits> {
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = map.get(&key.id)
            && l.rate_per_minute == key.rate_per_minute
            && l.max_concurrent == key.max_concurrent
        {
            return l.clone();
        }
        let l = Arc::new(KeyLimits {
            rate_per_minute: key.rate_per_minute,
            max_concurrent: key.max_concurrent,
            rate: NonZeroU32::new(key.rate_per_minute)
                .map(|n| DefaultDirectRateLimiter::direct(Quota::per_minute(n))),
            concurrent: (key.max_concurrent > 0)
                .then(|| Arc::new(Semaphore::new(key.max_concurrent as usize))),
        });
        map.insert(key.id, l.clone());
        l
    }

    /// Admits one request for `key` or answers 429 with `Retry-After`.
    pub fn admit(&self, key: &ApiKey) -> Result<Permit, ApiError> {
        let l = self.for_key(key);
        let concurrent = match &l.concurrent {
            Some(sem) => Some(sem.clone().try_acquire_owned().map_err(|_| {
                metrics::counter!("veil_rate_limited_total", "limit" => "concurrency").increment(1);
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_concurrent_requests",
                    format!(
                        "this API key allows {} concurrent requests; retry when one finishes",
                        l.max_concurrent
                    ),
                );
                e.retry_after = Some(1);
                e
            })?),
            None => None,
        };
        if let Some(rate) = &l.rate
            && let Err(not_until) = rate.check()
        {
            metrics::counter!("veil_rate_limited_total", "limit" => "rate").increment(1);
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this API key allows {} requests per minute",
                    l.rate_per_minute
                ),
            );
            e.retry_after = Some(wait.as_secs().max(1));
            return Err(e);
        }
        Ok(Permit {
            _concurrent: concurrent,
        })
    }
}
