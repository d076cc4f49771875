#![doc = include_str!("../README.md")]

pub mod cli;
mod client;
mod completion;
mod error;
pub mod rewrap;
mod session;
mod sse;
mod stream;
pub mod wallet;

pub use client::{Client, ClientBuilder, DynSigner, MESSAGE_TTL_SECS};
pub use completion::{Completion, CompletionRequest, StreamSummary};
pub use error::{Error, Result};
pub use session::{Session, SessionKind, SessionOptions};
pub use stream::CompletionStream;
/// Re-exported so callers name wire types with the same crate version.
pub use veil_api;
pub use veil_api::miner::{ChatMessage, Usage};
pub use veil_api::v3::{V3Config, V3Session, V3Task};
