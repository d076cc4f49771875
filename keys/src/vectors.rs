//! Deterministic sealing and wrapping, for producing the protocol test vectors
//! only (cargo feature `vectors`). Production code never takes salts or
//! ephemeral secrets from callers.

use crate::{BlobParams, KeyId, Result, SecretKey, X25519Public, wrap::WRAPPED_LEN};

/// Seals `chunks` (explicit boundaries; the last one is the last chunk) with a given salt.
pub fn seal_with_salt(
    key: &SecretKey,
    params: &BlobParams,
    salt: [u8; 32],
    chunks: &[&[u8]],
) -> Result<Vec<u8>> {
    crate::envelope::seal_with_salt(key, params, salt, chunks)
}

/// Wraps `key` to `recipient` with a given ephemeral secret.
pub fn wrap_with_ephemeral(
    ephemeral_secret: [u8; 32],
    recipient: &X25519Public,
    key: &SecretKey,
    id: &KeyId,
) -> Result<[u8; WRAPPED_LEN]> {
    crate::wrap::wrap_with_ephemeral(ephemeral_secret, recipient, key, id)
}
