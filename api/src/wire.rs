//! Fixed-size values in their protocol §1 text forms.
//!
//! Hashes and X25519 public keys are 32 bytes written as lowercase hex without a prefix; nonces
//! are 16 bytes, also lowercase hex; accounts are EIP-55 checksummed `0x` addresses, accepted in
//! any case. Parsing is strict about length and alphabet and says what was wrong.

use std::fmt;
use std::str::FromStr;

use alloy_primitives::Address;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a hex value did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    /// Wrong number of hex digits.
    #[error("expected {expected} hex digits, got {got}")]
    Length {
        /// Expected number of hex digits.
        expected: usize,
        /// Number of characters received.
        got: usize,
    },
    /// A character that is not a lowercase hex digit.
    #[error("expected lowercase hex digits without a 0x prefix")]
    Alphabet,
}

fn parse_lower_hex<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    if s.len() != 2 * N {
        return Err(HexError::Length {
            expected: 2 * N,
            got: s.len(),
        });
    }
    if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(HexError::Alphabet);
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| HexError::Alphabet)?;
    Ok(out)
}

macro_rules! hex_bytes {
    ($(#[$doc:meta])* $name:ident, $n:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; $n]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $n] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = HexError;
            fn from_str(s: &str) -> Result<Self, HexError> {
                parse_lower_hex::<$n>(s).map(Self)
            }
        }

        impl From<[u8; $n]> for $name {
            fn from(b: [u8; $n]) -> Self {
                Self(b)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some(format!("^[0-9a-f]{{{}}}$", 2 * $n)))
                    .description(Some(concat!(stringify!($n), " bytes, lowercase hex without a prefix")))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

hex_bytes!(
    /// 32 bytes as 64 lowercase hex digits: a SHA-256 hash or an X25519 public key.
    Hex32,
    32
);
hex_bytes!(
    /// 16 random bytes as 32 lowercase hex digits: the nonce of a signed message.
    Nonce,
    16
);

impl Nonce {
    /// A fresh random nonce.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("operating system random source");
        Self(b)
    }
}

/// Serde for an [`Address`] as an EIP-55 checksummed string; parsing accepts any case.
pub mod checksummed {
    use super::*;

    /// Serializes checksummed.
    pub fn serialize<S: Serializer>(a: &Address, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&a.to_checksum(None))
    }

    /// Parses `0x` + 40 hex digits in any case.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse_address(&s).map_err(serde::de::Error::custom)
    }
}

/// Parses an account address: `0x` followed by 40 hex digits, any case (protocol §1).
pub fn parse_address(s: &str) -> Result<Address, String> {
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| "expected 0x followed by 40 hex digits".to_string())?;
    if digits.len() != 40 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected 0x followed by 40 hex digits".into());
    }
    Address::from_str(s).map_err(|e| e.to_string())
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex32_round_trip_and_refusals() {
        let h = Hex32([0xab; 32]);
        let s = h.to_string();
        assert_eq!(s, "ab".repeat(32));
        assert_eq!(s.parse::<Hex32>().unwrap(), h);
        assert_eq!(
            "AB".repeat(32).parse::<Hex32>(),
            Err(HexError::Alphabet),
            "uppercase is not the canonical form"
        );
        assert_eq!(
            "ab".parse::<Hex32>(),
            Err(HexError::Length {
                expected: 64,
                got: 2
            })
        );
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<Hex32>(&json).unwrap(), h);
        assert!(serde_json::from_str::<Hex32>("\"0x00\"").is_err());
    }

    #[test]
    fn addresses_are_checksummed_out_and_any_case_in() {
        #[derive(Serialize, Deserialize)]
        struct W(#[serde(with = "checksummed")] Address);
        let lower = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";
        let w: W = serde_json::from_str(&format!("\"{lower}\"")).unwrap();
        assert_eq!(
            serde_json::to_string(&w).unwrap(),
            "\"0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266\""
        );
        assert!(parse_address("f39fd6e51aad88f6f4ce6ab8827279cfffb92266").is_err());
        assert!(parse_address("0x1234").is_err());
    }
}
