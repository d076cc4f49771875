#![doc = include_str!("../README.md")]

pub mod acl;
pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod key_lifecycle;
pub mod lease_polls;
pub mod limits;
pub mod orphans;
pub mod retention;
pub mod server;
pub mod state;
pub mod store;

pub use api::{app, openapi};
pub use config::Config;
pub use state::AppState;
