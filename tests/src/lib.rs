//! Cross-crate end-to-end tests of Veil live in `tests/`; this library holds
//! what they share, starting with the protocol v1 test-vector generator.

pub mod chain;
pub mod harness;
pub mod miner_command;
pub mod proxy;
pub mod vectors;
