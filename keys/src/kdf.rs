//! Key derivation (protocol §2).

use hkdf::Hkdf;
use sha2::Sha256;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::{SecretKey, Seed};

/// The HKDF salt of every session and task key derivation.
pub const KDF_SALT: &[u8] = b"veil/kdf/v1";
pub(crate) const LABEL_SESSION: &[u8] = b"veil/v1/session";
pub(crate) const LABEL_TASK: &[u8] = b"veil/v1/task";

/// `lp(x) = BE16(len(x)) || x`, appended to `out`.
pub(crate) fn lp(out: &mut Vec<u8>, x: &[u8]) {
    let len =
        u16::try_from(x.len()).expect("lp() inputs are protocol labels and ids, far below 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(x);
}

/// HKDF-SHA256 extract-then-expand to 32 bytes.
pub(crate) fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> SecretKey {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(info, okm.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SecretKey::from_bytes(*okm)
}

fn labelled(label: &[u8], id: &Uuid) -> Vec<u8> {
    let mut info = Vec::with_capacity(2 + label.len() + 2 + 16);
    lp(&mut info, label);
    lp(&mut info, id.as_bytes());
    info
}

/// `K_session = HKDF("veil/kdf/v1", seed_v, lp("veil/v1/session") || lp(session_id), 32)`.
pub fn derive_session_key(seed: &Seed, session_id: &Uuid) -> SecretKey {
    hkdf32(
        KDF_SALT,
        seed.expose_secret(),
        &labelled(LABEL_SESSION, session_id),
    )
}

/// `K_task = HKDF("veil/kdf/v1", K_session, lp("veil/v1/task") || lp(task_id), 32)`.
pub fn derive_task_key(k_session: &SecretKey, task_id: &Uuid) -> SecretKey {
    hkdf32(
        KDF_SALT,
        k_session.expose_secret(),
        &labelled(LABEL_TASK, task_id),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 5869 Appendix A test cases 1-3 (SHA-256), through the same HKDF the
    /// derivations use.
    #[test]
    fn rfc5869_known_answers() {
        struct Case {
            ikm: Vec<u8>,
            salt: Vec<u8>,
            info: Vec<u8>,
            prk: &'static str,
            okm: &'static str,
        }
        let cases = [
            Case {
                ikm: vec![0x0b; 22],
                salt: h("000102030405060708090a0b0c"),
                info: h("f0f1f2f3f4f5f6f7f8f9"),
                prk: "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
                okm: "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
            },
            Case {
                ikm: (0x00..=0x4f).collect(),
                salt: (0x60..=0xaf).collect(),
                info: (0xb0..=0xff).collect(),
                prk: "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
                okm: "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87",
            },
            Case {
                ikm: vec![0x0b; 22],
                salt: vec![],
                info: vec![],
                prk: "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
                okm: "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
            },
        ];
        for c in cases {
            let (prk, hk) = Hkdf::<Sha256>::extract(Some(&c.salt), &c.ikm);
            assert_eq!(hex::encode(prk), c.prk);
            let mut okm = vec![0u8; c.okm.len() / 2];
            hk.expand(&c.info, &mut okm).unwrap();
            assert_eq!(hex::encode(&okm), c.okm);
        }
        // Our 32-byte helper is the prefix of the same expansion.
        let k = hkdf32(
            &h("000102030405060708090a0b0c"),
            &[0x0b; 22],
            &h("f0f1f2f3f4f5f6f7f8f9"),
        );
        assert_eq!(
            hex::encode(k.expose_secret()),
            &"3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
                [..64]
        );
    }

    #[test]
    fn info_layout_is_length_prefixed() {
        let id = Uuid::from_bytes([7; 16]);
        let info = labelled(LABEL_SESSION, &id);
        assert_eq!(&info[..2], &[0, 15]);
        assert_eq!(&info[2..17], b"veil/v1/session");
        assert_eq!(&info[17..19], &[0, 16]);
        assert_eq!(&info[19..], &[7; 16]);
    }

    #[test]
    fn derivation_matches_a_hand_built_hkdf() {
        let seed = Seed::from_bytes([0x11; 32]);
        let sid = Uuid::parse_str("0190a5b8-0000-7000-8000-000000000001").unwrap();
        let tid = Uuid::parse_str("0190a5b8-0000-7000-8000-000000000002").unwrap();
        let mut info = b"\x00\x0fveil/v1/session\x00\x10".to_vec();
        info.extend_from_slice(sid.as_bytes());
        let mut expect = [0u8; 32];
        Hkdf::<Sha256>::new(Some(b"veil/kdf/v1"), &[0x11; 32])
            .expand(&info, &mut expect)
            .unwrap();
        let ks = derive_session_key(&seed, &sid);
        assert_eq!(ks.expose_secret(), &expect);

        let mut info = b"\x00\x0cveil/v1/task\x00\x10".to_vec();
        info.extend_from_slice(tid.as_bytes());
        Hkdf::<Sha256>::new(Some(b"veil/kdf/v1"), &expect)
            .expand(&info, &mut expect)
            .unwrap();
        assert_eq!(derive_task_key(&ks, &tid).expose_secret(), &expect);
    }

    #[test]
    fn keys_are_separated_by_id_and_seed() {
        let seed = Seed::from_bytes([1; 32]);
        let a = Uuid::from_bytes([1; 16]);
        let b = Uuid::from_bytes([2; 16]);
        let ka = derive_session_key(&seed, &a);
        assert_ne!(
            ka.expose_secret(),
            derive_session_key(&seed, &b).expose_secret()
        );
        assert_ne!(
            ka.expose_secret(),
            derive_session_key(&Seed::from_bytes([2; 32]), &a).expose_secret()
        );
        assert_ne!(
            derive_task_key(&ka, &a).expose_secret(),
            derive_task_key(&ka, &b).expose_secret()
        );
    }
}
