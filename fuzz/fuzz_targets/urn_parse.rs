//! URN parsing of arbitrary text: never panics; whatever parses formats back
//! to the same string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_blobstore::Urn;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(urn) = s.parse::<Urn>() {
            assert_eq!(urn.to_string(), s);
        }
    }
});
