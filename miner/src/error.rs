//! The one error type of this crate.

use std::time::Duration;

/// Everything that can go wrong in `veil-miner`.
///
/// No variant ever holds key material, prompt or result plaintext: only ids, codes, sizes,
/// hashes and the router's own (sanitized) error messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The router answered with an error status and (usually) an `ErrorBody`.
    #[error("router answered {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The stable machine code of the `ErrorBody`, or `http_<status>` when there was none.
        code: String,
        /// The router's message.
        message: String,
    },
    /// The request did not get an answer (connect, timeout, broken body).
    #[error("http transport: {0}")]
    Transport(#[from] reqwest::Error),
    /// The router answered 2xx with a body this client does not understand.
    #[error("unexpected answer from {endpoint}: {detail}")]
    Protocol {
        /// The endpoint.
        endpoint: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Signing with the wallet failed.
    #[error("wallet signing failed: {0}")]
    Sign(#[from] alloy_signer::Error),
    /// A key or envelope operation failed (unwrap, seal).
    #[error("crypto: {0}")]
    Keys(#[from] veil_keys::Error),
    /// The sealed prompt did not authenticate: wrong hash, bad AEAD, or a header that does not
    /// belong to the leased task. The task is failed for good.
    #[error("prompt blob does not authenticate ({0})")]
    PromptTampered(&'static str),
    /// The prompt opened but its plaintext is not a valid `PromptPayload` (no detail: it could
    /// quote the plaintext).
    #[error("prompt payload is not valid JSON of the expected shape")]
    PromptInvalid,
    /// The prompt is larger than the configured limit.
    #[error("prompt blob exceeds {limit} bytes")]
    PromptTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The lease names a model this miner does not serve.
    #[error("lease not servable: {0}")]
    Unservable(String),
    /// The prompt is sealed under a key a miner never gets (session scope): nobody can run it.
    #[error("prompt sealed with scope {0}; miners only ever hold task keys (scope 2)")]
    UnsupportedPromptScope(u8),
    /// The inference engine failed.
    #[error("engine: {0}")]
    Engine(String),
    /// The engine's token sink was closed: the task was abandoned (lease lost, shutdown).
    #[error("token sink closed")]
    SinkClosed,
    /// The router's receipt for the uploaded result differs from what was sent.
    #[error("result receipt mismatch: {0}")]
    ReceiptMismatch(String),
    /// The deployment signs for another chain than the one this miner expects.
    #[error("router domain is chain {got}, expected chain {expected}")]
    ChainMismatch {
        /// The chain id the miner was configured with.
        expected: u64,
        /// The chain id of the router's EIP-712 domain.
        got: u64,
    },
    /// The router speaks another protocol version.
    #[error("router speaks protocol version {0}, this miner speaks 1")]
    ProtocolVersion(u32),
    /// Bad miner configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The heartbeat lost the lease (`lease_expired` / `lease_not_held`).
    #[error("lease lost ({0})")]
    LeaseLost(String),
    /// Internal marker: the request got 401 and the worker logged in again; retry it.
    #[error("re-authenticated, retry")]
    Reauthenticated,
    /// The worker's task panicked or was aborted.
    #[error("worker ended abnormally: {0}")]
    Crashed(String),
    /// The grace period ended with the task still running.
    #[error("grace period of {0:?} ran out")]
    GraceExpired(Duration),
    /// A setting of the `veil-miner` command is wrong (it names the setting).
    #[error(transparent)]
    Settings(#[from] crate::config::ConfigError),
    /// A model's files are missing or unreadable.
    #[error("model {path}: {detail}")]
    Model {
        /// The file or directory at fault.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

impl Error {
    /// A stable, machine-readable code for this error (used as release/fail reasons and in logs).
    pub fn code(&self) -> &str {
        match self {
            Error::Api { code, .. } => code,
            Error::Transport(_) => "transport",
            Error::Protocol { .. } => "protocol",
            Error::Sign(_) => "sign_failed",
            Error::Keys(e) => match e {
                veil_keys::Error::Unwrap
                | veil_keys::Error::BadWrappedLength(_)
                | veil_keys::Error::NonContributory => "key_unwrap_failed",
                _ => "crypto",
            },
            Error::PromptTampered(_) => "prompt_tampered",
            Error::PromptInvalid => "prompt_invalid",
            Error::PromptTooLarge { .. } => "prompt_too_large",
            Error::Unservable(_) => "model_not_served",
            Error::UnsupportedPromptScope(_) => "unsupported_prompt_scope",
            Error::Engine(_) => "engine_error",
            Error::SinkClosed => "sink_closed",
            Error::ReceiptMismatch(_) => "receipt_mismatch",
            Error::ChainMismatch { .. } => "chain_mismatch",
            Error::ProtocolVersion(_) => "protocol_version",
            Error::Config(_) => "config",
            Error::LeaseLost(_) => "lease_lost",
            Error::Reauthenticated => "reauthenticated",
            Error::Crashed(_) => "worker_crashed",
            Error::GraceExpired(_) => "shutdown",
            Error::Settings(_) => "config",
            Error::Model { .. } => "model_unreadable",
        }
    }

    /// The HTTP status of a router error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            Error::Transport(e) => e.status().map(|s| s.as_u16()),
            _ => None,
        }
    }

    /// Worth retrying as is: transport failures, 408, 429 and 5xx answers.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport(e) => !e.is_builder() && !e.is_decode(),
            Error::Api { status, .. } => matches!(status, 408 | 425 | 429 | 500..=599),
            Error::Reauthenticated => true,
            _ => false,
        }
    }

    /// The bearer token is missing, invalid or expired: log in again.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Error::Api { status: 401, .. })
    }

    /// The lease is gone (`409 lease_expired` / `lease_not_held`, or the heartbeat said so):
    /// stop working on the task; it went elsewhere.
    pub fn is_lease_lost(&self) -> bool {
        match self {
            Error::LeaseLost(_) => true,
            Error::Api { status, code, .. } => {
                *status == 409 && (code == "lease_expired" || code == "lease_not_held")
            }
            _ => false,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
