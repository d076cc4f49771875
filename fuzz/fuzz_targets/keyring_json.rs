//! Keyring documents: parsing arbitrary text never panics, and an accepted
//! keyring survives a save/parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_keys::Keyring;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(ring) = Keyring::from_json(s) {
            let again = Keyring::from_json(&ring.to_json()).expect("round trip");
            assert_eq!(again.versions(), ring.versions());
        }
    }
});
