//! The committed vectors file is exactly what the generator produces.

use std::path::Path;

#[test]
fn committed_vectors_match_the_generator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let committed = std::fs::read_to_string(root.join(veil_tests::vectors::VECTORS_PATH))
        .expect("read the committed vectors file");
    let fresh = veil_tests::vectors::generate_json().expect("generate vectors");
    assert!(
        committed == fresh,
        "keys/tests/vectors/protocol-v1.json is stale: regenerate it with \
         `cargo run -p veil-tests --bin gen-vectors > keys/tests/vectors/protocol-v1.json` \
         and review the diff"
    );
}
