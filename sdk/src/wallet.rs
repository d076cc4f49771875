//! Loading a wallet (an alloy signer) to sign the client's EIP-712 messages.
//!
//! [`crate::Client`] takes any [`alloy::signers::Signer`]: the local signers loaded here, or a
//! hardware wallet (Ledger, Trezor) or a cloud KMS signer from alloy's own crates, which go
//! through the same trait. Nothing here logs or prints a key; errors never quote one.

use std::path::Path;

use alloy::primitives::B256;
use alloy::signers::local::{MnemonicBuilder, PrivateKeySigner, coins_bip39::English};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// A wallet from a raw secp256k1 private key: 64 hex characters, with or without `0x`
/// (surrounding whitespace ignored). For development; prefer a keystore.
pub fn from_private_key_hex(text: &str) -> Result<PrivateKeySigner> {
    let text = text.trim();
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Wallet(
            "a private key is 64 hex characters (optionally 0x-prefixed)".into(),
        ));
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(digits, bytes.as_mut())
        .map_err(|_| Error::Wallet("a private key is 64 hex characters".into()))?;
    PrivateKeySigner::from_bytes(&B256::from(*bytes))
        .map_err(|_| Error::Wallet("not a valid secp256k1 private key".into()))
}

/// A wallet from a file holding a raw private key in hex (see [`from_private_key_hex`]).
pub fn from_private_key_file(path: &Path) -> Result<PrivateKeySigner> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            Error::Wallet(format!("cannot read the key file {}: {e}", path.display()))
        })?);
    from_private_key_hex(&text)
}

/// A wallet from an encrypted JSON keystore (Web3 Secret Storage, as geth, foundry's `cast
/// wallet` and MetaMask exports write it).
pub fn from_keystore(path: &Path, password: &[u8]) -> Result<PrivateKeySigner> {
    if !path.is_file() {
        return Err(Error::Wallet(format!(
            "no keystore file at {}",
            path.display()
        )));
    }
    PrivateKeySigner::decrypt_keystore(path, password).map_err(|_| {
        Error::Wallet(format!(
            "cannot decrypt {}: wrong password, or not an encrypted JSON keystore",
            path.display()
        ))
    })
}

/// A wallet from a BIP-39 English mnemonic, at account `index` of the standard Ethereum path
/// `m/44'/60'/0'/0/{index}`.
pub fn from_mnemonic(phrase: &str, index: u32) -> Result<PrivateKeySigner> {
    MnemonicBuilder::<English>::default()
        .phrase(phrase.trim())
        .index(index)
        .map_err(|_| Error::Wallet("invalid derivation index".into()))?
        .build()
        .map_err(|_| Error::Wallet("not a valid BIP-39 English mnemonic".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANVIL0_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const ANVIL0: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
    const MNEMONIC: &str = "test test test test test test test test test test test junk";

    #[test]
    fn private_key_in_any_form() {
        for text in [
            ANVIL0_KEY.to_string(),
            format!("0x{ANVIL0_KEY}\n"),
            ANVIL0_KEY.to_uppercase(),
        ] {
            let w = from_private_key_hex(&text).unwrap();
            assert_eq!(w.address().to_checksum(None), ANVIL0);
        }
        let e = from_private_key_hex("12ab").unwrap_err().to_string();
        assert!(!e.contains("12ab"), "{e}");
        assert!(from_private_key_hex(&"00".repeat(32)).is_err());
    }

    #[test]
    fn mnemonic_gives_the_standard_accounts() {
        let w = from_mnemonic(MNEMONIC, 0).unwrap();
        assert_eq!(w.address().to_checksum(None), ANVIL0);
        let w1 = from_mnemonic(MNEMONIC, 1).unwrap();
        assert_eq!(
            w1.address().to_checksum(None),
            "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
        );
        assert!(from_mnemonic("not a mnemonic", 0).is_err());
    }

    #[test]
    fn keystore_round_trip_and_wrong_password() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = alloy::signers::k256::elliptic_curve::rand_core::OsRng;
        let (signer, name) = PrivateKeySigner::encrypt_keystore(
            dir.path(),
            &mut rng,
            hex::decode(ANVIL0_KEY).unwrap(),
            "pw",
            None,
        )
        .unwrap();
        let path = dir.path().join(name);
        let w = from_keystore(&path, b"pw").unwrap();
        assert_eq!(w.address(), signer.address());
        let e = from_keystore(&path, b"nope").unwrap_err().to_string();
        assert!(e.contains("wrong password"), "{e}");
        assert!(from_keystore(&dir.path().join("missing"), b"pw").is_err());
    }
}
