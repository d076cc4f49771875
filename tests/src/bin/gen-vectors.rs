//! Writes the protocol v1 test vectors.
//!
//! ```text
//! cargo run -p veil-tests --bin gen-vectors > keys/tests/vectors/protocol-v1.json
//! ```
//!
//! The output is deterministic: every "random" input is derived from a label
//! with SHA-256, so running it again reproduces the committed file byte for byte
//! (a test checks that).

fn main() -> anyhow::Result<()> {
    let text = veil_tests::vectors::generate_json()?;
    print!("{text}");
    Ok(())
}
