#![doc = include_str!("../README.md")]

mod bindings;
mod client;
mod error;
mod reader;
mod state;

pub use bindings::{ARTIFACT_JSON, VeilAcl};
pub use client::{
    AclContract, Deployment, TxOutcome, connect, deploy, http_provider, wallet_provider,
};
pub use error::{Error, Result, describe_refusal};
pub use reader::{AclDecision, AclFollower, AclReader, AclView, ReaderConfig, SyncReport};
pub use state::{Checkpoint, MinerInfo, SessionInfo, SessionKey};

/// Re-exported so that callers name the same types as this crate without depending on alloy.
pub use alloy::primitives::{Address, B256};
