#![doc = include_str!("../README.md")]

mod envelope;
mod error;
mod kdf;
mod keyring;
mod secret;
mod wrap;

#[cfg(feature = "vectors")]
#[doc(hidden)]
pub mod vectors;

pub use envelope::{
    BlobParams, DEFAULT_CHUNK_EXP, FORMAT, FRAME_LEN_LEN, HEADER_LEN, Header, KeyId, MAGIC,
    MAX_CHUNK_EXP, MIN_CHUNK_EXP, Opened, Opener, Purpose, Scope, Sealer, TAG_LEN, open, seal,
};
pub use error::{Error, Result};
pub use kdf::{KDF_SALT, derive_session_key, derive_task_key};
pub use keyring::{KEYRING_FORMAT, KeyState, KeyVersionInfo, Keyring};
pub use secret::{Plaintext, SecretKey, Seed};
pub use wrap::{WRAP_CTX_LEN, WRAPPED_LEN, X25519Public, X25519Secret, unwrap_key, wrap_key};

/// Re-exported so callers name ids and zeroizing buffers with the same types.
pub use uuid::Uuid;
pub use zeroize::Zeroizing;
