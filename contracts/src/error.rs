//! The crate's one error type, and readable messages for the contract's custom errors.

use std::path::PathBuf;

use alloy::primitives::{Address, B256, FixedBytes};

use crate::bindings::VeilAcl::VeilAclErrors;

/// Everything that can go wrong talking to the chain, reading the contract or keeping the
/// reader's checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The contract refused the call with one of its custom errors (decoded).
    #[error("refused by the contract: {}", describe_refusal(.0))]
    Refused(VeilAclErrors),
    /// A transaction was mined but reverted; `reason` is the decoded refusal when the call could
    /// be replayed, or what is known otherwise.
    #[error("transaction {tx_hash} reverted: {reason}")]
    Reverted {
        /// Hash of the reverted transaction.
        tx_hash: B256,
        /// Why it reverted, as far as it can be told.
        reason: String,
    },
    /// A transaction was sent but did not reach the required confirmations in time (or fell out of
    /// the chain while waiting).
    #[error("transaction {tx_hash}: {message}")]
    Unconfirmed {
        /// Hash of the transaction that was sent.
        tx_hash: B256,
        /// What happened while waiting.
        message: String,
    },
    /// The node or the transport failed (connection refused, timeout, malformed answer, a
    /// revert that is not one of the contract's custom errors).
    #[error("RPC: {0}")]
    Rpc(String),
    /// There is no contract code at the configured address (at the block read).
    #[error("no contract code at {0}")]
    NoCode(Address),
    /// The chain moved under a multi-step read (a reorganisation); the next sync retries.
    #[error("the chain reorganised during the read; retry")]
    ReorgDuringRead,
    /// The checkpoint file could not be read, parsed or written.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A configuration value is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<alloy::contract::Error> for Error {
    fn from(err: alloy::contract::Error) -> Self {
        match err.as_decoded_interface_error::<VeilAclErrors>() {
            Some(refusal) => Self::Refused(refusal),
            None => Self::Rpc(err.to_string()),
        }
    }
}

impl From<alloy::transports::TransportError> for Error {
    fn from(err: alloy::transports::TransportError) -> Self {
        alloy::contract::Error::from(err).into()
    }
}

impl From<alloy::providers::PendingTransactionError> for Error {
    fn from(err: alloy::providers::PendingTransactionError) -> Self {
        Self::Rpc(err.to_string())
    }
}

impl Error {
    /// The contract's custom error, when this is a refusal.
    pub fn refusal(&self) -> Option<&VeilAclErrors> {
        match self {
            Self::Refused(refusal) => Some(refusal),
            _ => None,
        }
    }
}

/// A session id in its protocol text form (a hyphenated lowercase UUID).
fn session(id: &FixedBytes<16>) -> uuid::Uuid {
    uuid::Uuid::from_bytes(id.0)
}

/// One readable sentence for each of the contract's custom errors.
pub fn describe_refusal(refusal: &VeilAclErrors) -> String {
    use VeilAclErrors as E;
    match refusal {
        E::NotAdmin(e) => format!("{} is not an admin of the contract", e.caller),
        E::NotSessionOwnerOrAdmin(e) => format!(
            "{} is neither the owner of session {} nor an admin",
            e.caller,
            session(&e.sessionId)
        ),
        E::NotSessionOwner(e) => format!(
            "{} is not the owner of session {}",
            e.caller,
            session(&e.sessionId)
        ),
        E::ZeroAddress(_) => "the zero address is not a valid account here".to_string(),
        E::AlreadyAdmin(e) => format!("{} is already an admin", e.account),
        E::NotAnAdmin(e) => format!("{} is not an admin", e.account),
        E::LastAdmin(e) => format!(
            "{} is the last admin and cannot be removed (add another admin first)",
            e.account
        ),
        E::ZeroX25519Key(_) => "the X25519 key must not be all zeros".to_string(),
        E::MinerAlreadyActive(e) => format!("miner {} is already registered and active", e.miner),
        E::UnknownMiner(e) => format!("{} is not a registered miner", e.miner),
        E::MinerNotActive(e) => format!("miner {} is deactivated", e.miner),
        E::ZeroSessionId(_) => "the session id must not be all zeros".to_string(),
        E::SessionAlreadyRegistered(e) => format!(
            "session {} is already registered (session ids are never reused)",
            session(&e.sessionId)
        ),
        E::UnknownSession(e) => format!("session {} is not registered", session(&e.sessionId)),
        E::SessionIsClosed(e) => format!("session {} is closed", session(&e.sessionId)),
        E::MinerAlreadyAllowed(e) => format!(
            "miner {} is already allowed for session {}",
            e.miner,
            session(&e.sessionId)
        ),
        E::MinerNotAllowed(e) => format!(
            "miner {} is not on the allowlist of session {}",
            e.miner,
            session(&e.sessionId)
        ),
        E::EmptyBatch(_) => "no miners were given".to_string(),
        E::ZeroLimit(_) => "a page limit must be at least 1".to_string(),
    }
}
