//! Whole-buffer open of arbitrary bytes: never panics; anything accepted
//! re-opens identically through the streaming opener.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_keys::{Header, Opener, SecretKey, open};

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_bytes([0x5a; 32]);
    let _ = Header::parse(data);
    if let Ok(opened) = open(&key, data) {
        let mut opener = Opener::new(&key);
        let chunks = opener.push(data).expect("whole open accepted it");
        opener.finish().expect("complete");
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(joined.as_slice(), &opened.plaintext[..]);
    }
});
