//! Streaming open of a valid blob that the fuzzer mutates and slices: it never
//! panics and never releases more plaintext than the authenticated prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_keys::{BlobParams, KeyId, Opener, Purpose, SecretKey, Uuid, seal};

fuzz_target!(|input: (Vec<u8>, Vec<u16>, u16, u8)| {
    let (plaintext, cuts, flip_at, flip) = input;
    let key = SecretKey::from_bytes([0x33; 32]);
    let params = BlobParams::new(KeyId::session(1, Uuid::from_bytes([1; 16])), Purpose::Result)
        .with_chunk_exp(10)
        .expect("valid exponent");
    let mut blob = seal(&key, &params, &plaintext).expect("seal");
    let i = flip_at as usize % blob.len();
    blob[i] ^= flip;
    let mut opener = Opener::new(&key);
    let mut got = Vec::new();
    let mut rest = &blob[..];
    let mut failed = false;
    for c in cuts.iter().chain(std::iter::once(&u16::MAX)) {
        let n = (*c as usize).min(rest.len());
        match opener.push(&rest[..n]) {
            Ok(chunks) => chunks.iter().for_each(|c| got.extend_from_slice(c)),
            Err(_) => {
                failed = true;
                break;
            }
        }
        rest = &rest[n..];
        if rest.is_empty() {
            break;
        }
    }
    assert!(plaintext.starts_with(&got), "released bytes that were not sealed");
    if flip != 0 {
        assert!(failed || opener.finish().is_err(), "tampered blob accepted");
    }
});
