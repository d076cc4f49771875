//! Key wrapping to an X25519 recipient (protocol §4).

use std::{fmt, str::FromStr};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{AeadInOut, Nonce, Tag},
};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::{
    Error, KeyId, Result, SecretKey,
    kdf::{hkdf32, lp},
    secret::{parse_hex32, random_bytes},
};

/// Length of a wrapped key: `E (32) || ciphertext (32) || tag (16)`.
pub const WRAPPED_LEN: usize = 80;
const LABEL_WRAP: &[u8] = b"veil/v1/wrap";
/// Length of the wrap context `scope || BE32(version) || session_id || task_id`.
pub const WRAP_CTX_LEN: usize = 37;

/// An X25519 secret key (a recipient's identity) and its public key, computed
/// once. The secret is zeroized on drop and never printed.
pub struct X25519Secret(StaticSecret, X25519Public);

impl X25519Secret {
    /// A fresh key pair's secret, from the operating system's CSPRNG.
    pub fn generate() -> Result<Self> {
        Ok(Self::from_bytes(*random_bytes::<32>()?))
    }

    /// Wraps 32 secret bytes (clamped by X25519 when used).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = X25519Public(PublicKey::from(&secret).to_bytes());
        Self(secret, public)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Result<Self> {
        Ok(Self::from_bytes(*parse_hex32("x25519 secret", text)?))
    }

    /// The matching public key.
    pub fn public(&self) -> X25519Public {
        self.1
    }

    /// The secret bytes, in a buffer zeroized on drop.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }
}

impl fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("X25519Secret(..)")
    }
}

/// An X25519 public key. Its text form is 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct X25519Public([u8; 32]);

impl X25519Public {
    /// Wraps 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for X25519Public {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "X25519Public({self})")
    }
}

impl fmt::Display for X25519Public {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for X25519Public {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(Self(*parse_hex32("x25519 public key", s)?))
    }
}

/// `ctx = scope || BE32(key_version) || session_id || task_id (zero for session scope)`.
fn context(id: &KeyId) -> [u8; WRAP_CTX_LEN] {
    let mut ctx = [0u8; WRAP_CTX_LEN];
    ctx[0] = id.scope().as_byte();
    ctx[1..5].copy_from_slice(&id.key_version.to_be_bytes());
    ctx[5..21].copy_from_slice(id.session_id.as_bytes());
    ctx[21..37].copy_from_slice(&id.task_id_bytes());
    ctx
}

/// `K_wrap = HKDF(E || R, ss, lp("veil/v1/wrap") || lp(ctx), 32)` and its AEAD.
fn wrap_cipher(ephemeral: &[u8; 32], recipient: &[u8; 32], ss: &[u8; 32], ctx: &[u8]) -> Aes256Gcm {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let mut info = Vec::with_capacity(2 + LABEL_WRAP.len() + 2 + ctx.len());
    lp(&mut info, LABEL_WRAP);
    lp(&mut info, ctx);
    let k_wrap = hkdf32(&salt, ss, &info);
    Aes256Gcm::new_from_slice(k_wrap.expose_secret()).expect("32-byte key")
}

fn wrap_with(
    e: StaticSecret,
    recipient: &X25519Public,
    key: &SecretKey,
    id: &KeyId,
) -> Result<[u8; WRAPPED_LEN]> {
    let r = PublicKey::from(recipient.0);
    let ss = e.diffie_hellman(&r);
    if !ss.was_contributory() {
        return Err(Error::NonContributory);
    }
    let ephemeral_pub = PublicKey::from(&e).to_bytes();
    let ctx = context(id);
    let cipher = wrap_cipher(&ephemeral_pub, &recipient.0, ss.as_bytes(), &ctx);
    let mut out = [0u8; WRAPPED_LEN];
    out[..32].copy_from_slice(&ephemeral_pub);
    out[32..64].copy_from_slice(key.expose_secret());
    let tag = cipher
        .encrypt_inout_detached(
            &Nonce::<Aes256Gcm>::default(),
            &ctx,
            (&mut out[32..64]).into(),
        )
        .expect("32-byte message");
    out[64..].copy_from_slice(&tag);
    Ok(out)
}

/// Wraps `key` (whose identity is `id`) to `recipient`, with a fresh ephemeral
/// key pair. Refuses a low-order recipient key.
pub fn wrap_key(
    recipient: &X25519Public,
    key: &SecretKey,
    id: &KeyId,
) -> Result<[u8; WRAPPED_LEN]> {
    let e = StaticSecret::from(*random_bytes::<32>()?);
    wrap_with(e, recipient, key, id)
}

/// Unwraps an 80-byte wrapped key with the recipient's secret; `id` must be the
/// identity the key was wrapped for.
pub fn unwrap_key(secret: &X25519Secret, wrapped: &[u8], id: &KeyId) -> Result<SecretKey> {
    let wrapped: &[u8; WRAPPED_LEN] = wrapped
        .try_into()
        .map_err(|_| Error::BadWrappedLength(wrapped.len()))?;
    let e_pub: [u8; 32] = wrapped[..32].try_into().expect("32 bytes");
    let ss = secret.0.diffie_hellman(&PublicKey::from(e_pub));
    if !ss.was_contributory() {
        return Err(Error::NonContributory);
    }
    let ctx = context(id);
    let cipher = wrap_cipher(&e_pub, secret.1.as_bytes(), ss.as_bytes(), &ctx);
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&wrapped[32..64]);
    let tag = Tag::<Aes256Gcm>::try_from(&wrapped[64..]).expect("16-byte tag");
    cipher
        .decrypt_inout_detached(
            &Nonce::<Aes256Gcm>::default(),
            &ctx,
            key.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| Error::Unwrap)?;
    Ok(SecretKey::from_bytes(*key))
}

/// Vectors only: wrap with a given ephemeral secret.
#[cfg(feature = "vectors")]
pub(crate) fn wrap_with_ephemeral(
    ephemeral_secret: [u8; 32],
    recipient: &X25519Public,
    key: &SecretKey,
    id: &KeyId,
) -> Result<[u8; WRAPPED_LEN]> {
    wrap_with(StaticSecret::from(ephemeral_secret), recipient, key, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn id() -> KeyId {
        KeyId::task(3, Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]))
    }

    #[test]
    fn round_trip_and_context_binding() {
        let r = X25519Secret::generate().unwrap();
        let k = SecretKey::generate().unwrap();
        let w = wrap_key(&r.public(), &k, &id()).unwrap();
        assert_eq!(
            unwrap_key(&r, &w, &id()).unwrap().expose_secret(),
            k.expose_secret()
        );
        // Fresh ephemeral key per wrap.
        assert_ne!(w, wrap_key(&r.public(), &k, &id()).unwrap());

        let mut other = id();
        other.key_version = 4;
        assert!(matches!(unwrap_key(&r, &w, &other), Err(Error::Unwrap)));
        let session = KeyId::session(3, Uuid::from_bytes([1; 16]));
        assert!(matches!(unwrap_key(&r, &w, &session), Err(Error::Unwrap)));
        let stranger = X25519Secret::generate().unwrap();
        assert!(matches!(
            unwrap_key(&stranger, &w, &id()),
            Err(Error::Unwrap)
        ));
        for i in 0..WRAPPED_LEN {
            let mut t = w;
            t[i] ^= 1;
            assert!(
                unwrap_key(&r, &t, &id()).is_err(),
                "flip at byte {i} accepted"
            );
        }
        assert!(matches!(
            unwrap_key(&r, &w[..79], &id()),
            Err(Error::BadWrappedLength(79))
        ));
    }

    #[test]
    fn refuses_low_order_points() {
        let k = SecretKey::generate().unwrap();
        // Identity and a point of order 8 on curve25519.
        let low_order: [[u8; 32]; 2] = [
            [0; 32],
            hex::decode("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
                .unwrap()
                .try_into()
                .unwrap(),
        ];
        for p in low_order {
            assert!(matches!(
                wrap_key(&X25519Public::from_bytes(p), &k, &id()),
                Err(Error::NonContributory)
            ));
            let mut w = [0u8; WRAPPED_LEN];
            w[..32].copy_from_slice(&p);
            let r = X25519Secret::generate().unwrap();
            assert!(matches!(
                unwrap_key(&r, &w, &id()),
                Err(Error::NonContributory)
            ));
        }
    }

    #[test]
    fn rfc7748_known_answer() {
        // RFC 7748 §6.1 Diffie-Hellman test vector.
        let a = X25519Secret::from_hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        )
        .unwrap();
        assert_eq!(
            a.public().to_string(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let b: X25519Public = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
            .parse()
            .unwrap();
        let ss = a.0.diffie_hellman(&PublicKey::from(*b.as_bytes()));
        assert_eq!(
            hex::encode(ss.as_bytes()),
            "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
        );
    }

    #[test]
    fn context_layout() {
        let c = context(&id());
        assert_eq!(c[0], 2);
        assert_eq!(&c[1..5], &[0, 0, 0, 3]);
        assert_eq!(&c[5..21], &[1; 16]);
        assert_eq!(&c[21..], &[2; 16]);
        let c = context(&KeyId::session(1, Uuid::from_bytes([1; 16])));
        assert_eq!(c[0], 1);
        assert_eq!(&c[21..], &[0; 16]);
    }
}
