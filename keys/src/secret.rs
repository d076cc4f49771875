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

/// Overwrites `buf` with zeros in a way the optimizer cannot remove.
///
/// `zeroize` writes byte by byte through volatile stores, which costs several
/// microseconds per 64 KiB chunk and would dominate opening a blob. Here the
/// buffer is cleared with an ordinary (vectorized) fill and then handed to an
/// optimization barrier that the compiler must assume reads it, so the stores
/// are observable and cannot be elided — the technique of BoringSSL's
/// `OPENSSL_cleanse`. Keys and other small secrets still use `zeroize`.
pub(crate) fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(&mut *buf);
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// Plaintext bytes (an opened prompt, result or chunk of one) that are wiped
/// when dropped, spare capacity included. Derefs to `[u8]`; its `Debug` shows
/// only the length.
#[derive(Default)]
pub struct Plaintext(Vec<u8>);

impl Plaintext {
    /// An empty buffer that can hold `capacity` bytes without reallocating
    /// (a reallocation would leave an unwiped copy behind).
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    /// Appends bytes. Grows the buffer only within its capacity without copies;
    /// beyond it, the old allocation is wiped before it is freed.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let needed = self.0.len() + data.len();
        if needed > self.0.capacity() {
            let mut bigger = Vec::with_capacity(needed.max(self.0.capacity() * 2));
            bigger.extend_from_slice(&self.0);
            let mut old = std::mem::replace(&mut self.0, bigger);
            wipe_vec(&mut old);
        }
        self.0.extend_from_slice(data);
    }

    /// Moves the bytes into a `zeroize::Zeroizing` vector.
    pub fn into_zeroizing(mut self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(std::mem::take(&mut self.0))
    }

    pub(crate) fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

fn wipe_vec(v: &mut Vec<u8>) {
    wipe(v);
    // Bytes past `len` (truncated tags, a chunk's unused room) may have held
    // data too; there are few of them, so the byte-wise wipe is fine.
    v.spare_capacity_mut().zeroize();
    v.clear();
}

impl Drop for Plaintext {
    fn drop(&mut self) {
        wipe_vec(&mut self.0);
    }
}

impl std::ops::Deref for Plaintext {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for Plaintext {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl AsRef<[u8]> for Plaintext {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Plaintext {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl PartialEq<[u8]> for Plaintext {
    fn eq(&self, other: &[u8]) -> bool {
        self.0 == other
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plaintext({} bytes)", self.0.len())
    }
}

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
    fn wipe_clears_every_byte_at_any_alignment() {
        let mut v = vec![0xffu8; 1000];
        for start in 0..17 {
            v.fill(0xff);
            wipe(&mut v[start..start + 500]);
            assert!(v[start..start + 500].iter().all(|&b| b == 0));
            assert!(v[..start].iter().all(|&b| b == 0xff));
            assert!(v[start + 500..].iter().all(|&b| b == 0xff));
        }
        let mut p = Plaintext::with_capacity(4);
        p.extend_from_slice(b"abcdefgh");
        p.extend_from_slice(b"ij");
        assert_eq!(&p[..], b"abcdefghij");
        assert_eq!(format!("{p:?}"), "Plaintext(10 bytes)");
        assert_eq!(&p.into_zeroizing()[..], b"abcdefghij");
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            SecretKey::generate().unwrap().expose_secret(),
            SecretKey::generate().unwrap().expose_secret()
        );
    }
}
