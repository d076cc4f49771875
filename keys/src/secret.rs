//! Secret value types: zeroized on drop, never printed, never serialized.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{Error, Result};

/// Fill `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>> {
    let mut out = Zeroizing::new([0u8; N]);
    getrandom::fill(out.as_mut()).map_err(|_| Error::Rng)?;
    Ok(out)
}

pub(crate) fn parse_hex32(field: &'static str, text: &str) -> Result<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    let text = text.trim();
    if text.len() != 64 {
        return Err(Error::BadHex {
            field,
            expected: 64,
        });
    }
    hex::decode_to_slice(text, out.as_mut()).map_err(|_| Error::BadHex {
        field,
        expected: 64,
    })?;
    Ok(out)
}

macro_rules! secret32 {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps 32 secret bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// Copies 32 secret bytes from a slice.
            pub fn from_slice(bytes: &[u8]) -> Result<Self> {
                let arr: [u8; 32] = bytes.try_into().map_err(|_| Error::BadKeyLength {
                    field: $field,
                    len: bytes.len(),
                })?;
                Ok(Self(arr))
            }

            /// Parses 64 hex characters (any case, surrounding whitespace ignored).
            pub fn from_hex(text: &str) -> Result<Self> {
                Ok(Self(*parse_hex32($field, text)?))
            }

            /// Fresh random bytes from the operating system.
            pub fn generate() -> Result<Self> {
                Ok(Self(*random_bytes::<32>()?))
            }

            /// The secret bytes. Keep the borrow short and never log them.
            pub fn expose_secret(&self) -> &[u8; 32] {
                &self.0
            }

            /// The secret as lowercase hex, in a buffer zeroized on drop.
            pub fn to_hex(&self) -> Zeroizing<String> {
                Zeroizing::new(hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
    };
}

secret32!(
    /// A 32-byte symmetric key: `K_session`, `K_task` or any derived key.
    SecretKey,
    "key"
);

secret32!(
    /// A 32-byte keyring seed (`seed_v` in protocol §2).
    Seed,
    "seed"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_bytes() {
        let k = SecretKey::from_bytes([0xab; 32]);
        let s = Seed::from_bytes([0xcd; 32]);
        assert_eq!(format!("{k:?}"), "SecretKey(..)");
        assert_eq!(format!("{s:?}"), "Seed(..)");
    }

    #[test]
    fn hex_parsing() {
        let k = SecretKey::from_hex(&"AB".repeat(32)).unwrap();
        assert_eq!(k.expose_secret(), &[0xab; 32]);
        assert_eq!(k.to_hex().as_str(), "ab".repeat(32));
        assert!(matches!(
            SecretKey::from_hex("abcd"),
            Err(Error::BadHex { field: "key", .. })
        ));
        assert!(matches!(
            Seed::from_hex(&"zz".repeat(32)),
            Err(Error::BadHex { field: "seed", .. })
        ));
        assert!(matches!(
            SecretKey::from_slice(&[1; 31]),
            Err(Error::BadKeyLength { len: 31, .. })
        ));
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            SecretKey::generate().unwrap().expose_secret(),
            SecretKey::generate().unwrap().expose_secret()
        );
    }
}
