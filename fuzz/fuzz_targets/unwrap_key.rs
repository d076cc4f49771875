//! Unwrapping arbitrary bytes never panics and never succeeds by accident.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_keys::{KeyId, Uuid, X25519Secret, unwrap_key};

fuzz_target!(|data: &[u8]| {
    let secret = X25519Secret::from_bytes([0x77; 32]);
    let id = KeyId::task(1, Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]));
    assert!(unwrap_key(&secret, data, &id).is_err());
});
