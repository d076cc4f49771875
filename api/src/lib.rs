//! Wire types shared by the Veil router, miners and clients.
//!
//! - [`eip712`]: the wallet-signed messages of protocol §6, their EIP-712 hashing, signing and
//!   signer recovery, and the JSON form in which they travel (`{"message": …, "signature": "0x…"}`).
//! - [`wire`]: hex-encoded fixed-size values (hashes, X25519 keys, nonces) and checksummed addresses
//!   in their protocol §1 text forms.
//! - [`miner`]: the JSON bodies of the miner API.
//! - [`error`]: the error body every Veil HTTP endpoint answers with.
//! - [`v3`]: the JSON bodies of `/api/v3` (wallet-signed, client-sealed).
//! - [`routes`]: the HTTP paths, so that servers and clients cannot drift apart.
//!
//! Nothing here holds a secret: keys cross the wire only wrapped (protocol §4).

pub mod eip712;
pub mod error;
pub mod miner;
pub mod routes;
pub mod v3;
pub mod wire;

pub use eip712::{Domain, Signed, VerifyError};
pub use error::{ErrorBody, ErrorDetail};
