#![doc = include_str!("../README.md")]

pub mod cli;
mod client;
pub mod config;
mod engine;
mod error;
pub mod identity;
mod instant;
#[cfg(feature = "mistralrs")]
pub mod mistral;
pub mod model;
mod pipeline;
pub mod sign;
pub mod tiny;
mod worker;

pub use client::{DEFAULT_MAX_PROMPT_BYTES, MinerClient, install_crypto_provider};
pub use engine::{
    Engine, FINISH_LENGTH, FINISH_STOP, GenerateRequest, Generation, TokenReceiver, TokenSink,
    token_channel,
};
pub use error::{Error, Result};
pub use instant::InstantEngine;
pub use worker::{
    PROTOCOL_VERSION, RunSummary, StepTimes, TaskOutcome, Worker, WorkerBuilder, WorkerHandle,
};

/// Re-exported so callers name wire types with the same crate version.
pub use veil_api;
