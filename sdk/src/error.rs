//! The one error type of the client library.
//!
//! Every variant says what happened and what to do about it. The router's stable `error.code`
//! picks the variant ([`Error::from_api`]); codes without a variant of their own arrive as
//! [`Error::Api`]. No variant ever holds a key, a token, a signature or plaintext.

use std::time::Duration;

use uuid::Uuid;

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A signed message was refused as expired, or as expiring too far ahead.
    #[error(
        "the router refused a signature as expired or too far ahead ({message}); check this \
         machine's clock (NTP) and try again"
    )]
    SignatureExpired {
        /// The router's explanation.
        message: String,
    },
    /// The router already accepted a message with this (signer, nonce) pair.
    #[error(
        "the router already accepted this signed request (replayed nonce); sign a new one (the \
         client does so on retries; if this persists, another process may share the wallet and \
         its nonces)"
    )]
    ReplayedNonce,
    /// The wallet is not the session's owner.
    #[error(
        "this wallet is not the owner of the session ({message}); use the wallet that opened it"
    )]
    NotOwner {
        /// The router's explanation.
        message: String,
    },
    /// The wallet, or a miner, is not allowed to do this.
    #[error("not allowed ({message}); check the session's allowlist and the wallet in use")]
    NotAllowed {
        /// The router's explanation.
        message: String,
    },
    /// Too many requests; retried automatically until the retry budget ran out.
    #[error("rate limited by the router{}; wait and try again, or lower the request rate", retry_after_text(.retry_after))]
    RateLimited {
        /// How long the router asked to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The key version is retired: blobs sealed under it can no longer be opened.
    #[error(
        "key version {} is retired: blobs sealed under it can no longer be opened; ask the router \
         operator (they may still rewrap or restore it)", version_text(.version)
    )]
    KeyVersionRetired {
        /// The version, when known.
        version: Option<u32>,
    },
    /// The key version was destroyed: blobs sealed under it are unreadable for good.
    #[error(
        "key version {} was destroyed: blobs sealed under it are unreadable for good; ask the \
         router operator", version_text(.version)
    )]
    KeyVersionDestroyed {
        /// The version, when known.
        version: Option<u32>,
    },
    /// The prompt was sealed under a key version that is no longer the active one.
    #[error(
        "the prompt was sealed under a key version that is no longer active ({message}); fetch \
         the config again and reseal (complete() does this once by itself)"
    )]
    KeyVersionStale {
        /// The router's explanation.
        message: String,
    },
    /// The session is closed or expired.
    #[error("the session is closed or expired; open a new session")]
    SessionClosed,
    /// The session, task or blob does not exist (or is not visible to this wallet).
    #[error("not found ({message}); check the id and the wallet in use")]
    NotFound {
        /// The router's explanation.
        message: String,
    },
    /// The task did not finish in time. It may still finish.
    #[error(
        "task {task_id} did not finish in time; it may still complete: fetch it later with \
         `task()` / `veil task show`"
    )]
    Timeout {
        /// The task.
        task_id: Uuid,
    },
    /// The task has not finished yet.
    #[error("task {task_id} is still {state}; wait for it (`complete()` waits) or ask again later")]
    Pending {
        /// The task.
        task_id: Uuid,
        /// Its state: `queued` or `leased`.
        state: String,
    },
    /// The result was deleted under the session's retention policy.
    #[error(
        "the result was deleted under the session's retention policy ({message}); submit the \
         task again if you still need it"
    )]
    ResultDeleted {
        /// The router's explanation.
        message: String,
    },
    /// The task ended without a result.
    #[error("task {task_id} failed [{code}]: {message}")]
    TaskFailed {
        /// The task.
        task_id: Uuid,
        /// Stable code, e.g. `prompt_unreadable`, `deadline`, `attempts_exhausted`, `cancelled`.
        code: String,
        /// Explanation (metadata only).
        message: String,
    },
    /// The task was retried by another miner after part of its text had been streamed, and the
    /// new answer differs from what was streamed.
    #[error(
        "task {task_id} was retried after text had been streamed and its answer changed; discard \
         the streamed text and fetch the final answer with `result()` / `veil task result`"
    )]
    StreamRestarted {
        /// The task.
        task_id: Uuid,
    },
    /// A signature, hash or AEAD check failed: the data was tampered with or corrupted on the way
    /// or at rest. Nothing of it was used.
    #[error(
        "integrity check failed: {0}; nothing of it was used. Report this to the router operator"
    )]
    Integrity(String),
    /// The router could not be reached, or the connection failed.
    #[error("cannot reach the router: {0}; check the URL and the network, then try again")]
    Transport(String),
    /// Any other refusal by the router.
    #[error("the router answered {status} [{code}]: {message}{}", param_text(.param))]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable machine code.
        code: String,
        /// The router's explanation.
        message: String,
        /// The request field at fault.
        param: Option<String>,
    },
    /// The router's answer does not have the expected shape (version mismatch?).
    #[error("unexpected answer from {endpoint}: {detail}; is the router a compatible version?")]
    Protocol {
        /// The endpoint.
        endpoint: &'static str,
        /// What did not parse.
        detail: String,
    },
    /// The wallet could not be loaded or could not sign.
    #[error("wallet: {0}")]
    Wallet(String),
    /// The client or a request is misconfigured (bad URL, no prompt, …).
    #[error("invalid input: {0}")]
    Invalid(String),
}

fn retry_after_text(d: &Option<Duration>) -> String {
    d.map(|d| format!(" (retry after {} s)", d.as_secs().max(1)))
        .unwrap_or_default()
}

fn version_text(v: &Option<u32>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

fn param_text(p: &Option<String>) -> String {
    p.as_deref()
        .map(|p| format!(" (field `{p}`)"))
        .unwrap_or_default()
}

impl Error {
    /// A stable, machine-readable code for this error (snake_case). For [`Error::Api`] it is the
    /// router's own code.
    pub fn code(&self) -> &str {
        match self {
            Error::SignatureExpired { .. } => "signature_expired",
            Error::ReplayedNonce => "replayed_nonce",
            Error::NotOwner { .. } => "not_owner",
            Error::NotAllowed { .. } => "not_allowed",
            Error::RateLimited { .. } => "rate_limited",
            Error::KeyVersionRetired { .. } => "key_version_retired",
            Error::KeyVersionDestroyed { .. } => "key_version_destroyed",
            Error::KeyVersionStale { .. } => "key_version_stale",
            Error::SessionClosed => "session_closed",
            Error::NotFound { .. } => "not_found",
            Error::Timeout { .. } => "timeout",
            Error::Pending { .. } => "pending",
            Error::ResultDeleted { .. } => "result_deleted",
            Error::TaskFailed { .. } => "task_failed",
            Error::StreamRestarted { .. } => "stream_restarted",
            Error::Integrity(_) => "integrity",
            Error::Transport(_) => "transport",
            Error::Api { code, .. } => code,
            Error::Protocol { .. } => "protocol",
            Error::Wallet(_) => "wallet",
            Error::Invalid(_) => "invalid_input",
        }
    }

    /// Maps an error answer of the router (its status, `error.code`, `error.message`,
    /// `error.param` and `Retry-After`) to a variant.
    pub fn from_api(
        status: u16,
        code: &str,
        message: &str,
        param: Option<String>,
        retry_after: Option<Duration>,
    ) -> Error {
        let message = message.to_string();
        match code {
            "signature_expired" | "signature_expiry_too_far" => Error::SignatureExpired { message },
            "replayed_nonce" => Error::ReplayedNonce,
            "not_owner" | "not_session_owner" | "owner_mismatch" | "signer_mismatch" => {
                Error::NotOwner { message }
            }
            "not_allowed" | "scope_not_allowed" => Error::NotAllowed { message },
            "rate_limited" | "too_many_concurrent_requests" => Error::RateLimited { retry_after },
            "key_version_retired" => Error::KeyVersionRetired {
                version: version_in(&message),
            },
            "key_version_destroyed" => Error::KeyVersionDestroyed {
                version: version_in(&message),
            },
            "key_version_stale" => Error::KeyVersionStale { message },
            "session_closed" => Error::SessionClosed,
            "not_found" | "blob_not_found" | "session_not_found" | "task_not_found" => {
                Error::NotFound { message }
            }
            "result_deleted" => Error::ResultDeleted { message },
            "blob_hash_mismatch" => Error::Integrity(format!(
                "the router found the stored blob does not match its hash ({message})"
            )),
            _ => Error::Api {
                status,
                code: code.to_string(),
                message,
                param,
            },
        }
    }

    /// Whether retrying the same call later may succeed (rate limits, transport failures,
    /// timeouts, 502/503/504).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::RateLimited { .. } | Error::Transport(_) | Error::Timeout { .. } => true,
            Error::Api { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

/// The first number after "version" in a router message (`key version 3 is retired`).
fn version_in(message: &str) -> Option<u32> {
    let at = message.find("version")?;
    message[at + "version".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
}

impl From<veil_keys::Error> for Error {
    fn from(e: veil_keys::Error) -> Self {
        match e {
            veil_keys::Error::Retired(v) => Error::KeyVersionRetired { version: Some(v) },
            veil_keys::Error::Destroyed(v) => Error::KeyVersionDestroyed { version: Some(v) },
            veil_keys::Error::Rng => Error::Invalid("the operating system's RNG failed".into()),
            // Envelope and wrap failures: one opaque reason each (no oracle).
            other => Error::Integrity(format!("blob or key refused [{}]", other.code())),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(status: u16, code: &str, message: &str) -> Error {
        Error::from_api(status, code, message, None, None)
    }

    #[test]
    fn router_codes_map_to_variants() {
        assert!(matches!(
            map(401, "signature_expired", "x"),
            Error::SignatureExpired { .. }
        ));
        assert!(matches!(
            map(401, "signature_expiry_too_far", "x"),
            Error::SignatureExpired { .. }
        ));
        assert!(matches!(
            map(409, "replayed_nonce", "x"),
            Error::ReplayedNonce
        ));
        assert!(matches!(map(403, "not_owner", "x"), Error::NotOwner { .. }));
        assert!(matches!(
            map(403, "not_allowed", "x"),
            Error::NotAllowed { .. }
        ));
        assert!(matches!(
            map(
                403,
                "key_version_retired",
                "keyring: key version 3 is retired"
            ),
            Error::KeyVersionRetired { version: Some(3) }
        ));
        assert!(matches!(
            map(403, "key_version_destroyed", "gone"),
            Error::KeyVersionDestroyed { version: None }
        ));
        assert!(matches!(
            map(409, "key_version_stale", "x"),
            Error::KeyVersionStale { .. }
        ));
        assert!(matches!(
            map(409, "session_closed", "x"),
            Error::SessionClosed
        ));
        assert!(matches!(
            map(404, "not_found", "task not found"),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            map(410, "result_deleted", "x"),
            Error::ResultDeleted { .. }
        ));
        let e = Error::from_api(
            429,
            "rate_limited",
            "slow down",
            None,
            Some(Duration::from_secs(7)),
        );
        assert!(
            matches!(e, Error::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(7))
        );
        assert!(e.to_string().contains("retry after 7 s"), "{e}");
        let other = Error::from_api(
            400,
            "invalid_request",
            "bad",
            Some("params.stop".into()),
            None,
        );
        assert_eq!(other.code(), "invalid_request");
        assert!(other.to_string().contains("params.stop"), "{other}");
        assert!(matches!(other, Error::Api { status: 400, .. }));
    }

    #[test]
    fn messages_give_advice() {
        assert!(
            map(401, "signature_expired", "expired")
                .to_string()
                .contains("clock")
        );
        assert!(
            map(403, "key_version_retired", "v 2")
                .to_string()
                .contains("operator")
        );
        assert!(
            Error::Timeout {
                task_id: Uuid::nil()
            }
            .to_string()
            .contains("task()")
        );
    }

    #[test]
    fn transient_errors() {
        assert!(map(503, "unavailable", "x").is_transient());
        assert!(!map(500, "internal_error", "x").is_transient());
        assert!(Error::Transport("refused".into()).is_transient());
        assert!(!Error::Integrity("hash".into()).is_transient());
    }

    #[test]
    fn key_errors_are_opaque() {
        let e: Error = veil_keys::Error::Decrypt.into();
        assert!(matches!(e, Error::Integrity(_)));
        let e: Error = veil_keys::Error::Retired(2).into();
        assert!(matches!(e, Error::KeyVersionRetired { version: Some(2) }));
    }
}
