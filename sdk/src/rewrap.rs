//! Re-sealing a client-sealed blob under a new key version.
//!
//! The router rewraps the blobs it sealed itself (`/api/v2`). Blobs sealed on the caller's
//! machine (`/api/v3`) are the owner's: the owner opens each under the old version's key and
//! seals it again under the new version's key, keeping its session, task, purpose and chunk
//! size. The plaintext exists only in a zeroizing buffer for the duration of the call.

use veil_keys::{BlobParams, Header, KeyId, SecretKey, Zeroizing};

/// Why a blob could not be rewrapped.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    /// The blob does not open under the old key (wrong key, tampered, truncated, …).
    #[error("the blob does not open under the old key [{code}]: {source}")]
    Open {
        /// Stable code of the failure, e.g. `wrong_key`.
        code: &'static str,
        /// The envelope error.
        source: veil_keys::Error,
    },
    /// Sealing under the new key failed.
    #[error("sealing under the new key failed [{code}]: {source}")]
    Seal {
        /// Stable code of the failure.
        code: &'static str,
        /// The envelope error.
        source: veil_keys::Error,
    },
    /// The new version is the blob's version already.
    #[error("the blob is already sealed under key version {0}")]
    SameVersion(u32),
}

/// Opens `blob` with `old_key` and seals its plaintext with `new_key` under `new_version`,
/// with the same session, task, purpose and chunk exponent. Returns the new blob and the old
/// header.
pub fn rewrap_blob(
    old_key: &SecretKey,
    new_key: &SecretKey,
    new_version: u32,
    blob: &[u8],
) -> Result<(Vec<u8>, Header), RewrapError> {
    let opened = veil_keys::open(old_key, blob).map_err(|e| RewrapError::Open {
        code: e.code(),
        source: e,
    })?;
    let header = opened.header;
    if header.key.key_version == new_version {
        return Err(RewrapError::SameVersion(new_version));
    }
    let plaintext: Zeroizing<Vec<u8>> = opened.plaintext.into_zeroizing();
    let key_id = KeyId {
        key_version: new_version,
        ..header.key
    };
    let params = BlobParams::new(key_id, header.purpose)
        .with_chunk_exp(header.chunk_exp)
        .map_err(|e| RewrapError::Seal {
            code: e.code(),
            source: e,
        })?;
    let sealed = veil_keys::seal(new_key, &params, &plaintext).map_err(|e| RewrapError::Seal {
        code: e.code(),
        source: e,
    })?;
    Ok((sealed, header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_keys::{Purpose, Seed, Uuid};

    fn task_key(seed: u8, session: &Uuid, task: &Uuid) -> SecretKey {
        let s = veil_keys::derive_session_key(&Seed::from_bytes([seed; 32]), session);
        veil_keys::derive_task_key(&s, task)
    }

    #[test]
    fn rewrapped_blob_opens_under_the_new_version_only() {
        let (session, task) = (Uuid::now_v7(), Uuid::now_v7());
        let (k1, k2) = (task_key(1, &session, &task), task_key(2, &session, &task));
        let params = BlobParams::new(KeyId::task(1, session, task), Purpose::Result)
            .with_chunk_exp(10)
            .unwrap();
        let text = vec![42u8; 5000];
        let old = veil_keys::seal(&k1, &params, &text).unwrap();

        let (new, old_header) = rewrap_blob(&k1, &k2, 2, &old).unwrap();
        assert_eq!(old_header.key.key_version, 1);
        let opened = veil_keys::open(&k2, &new).unwrap();
        assert_eq!(opened.header.key, KeyId::task(2, session, task));
        assert_eq!(opened.header.purpose, Purpose::Result);
        assert_eq!(opened.header.chunk_exp, 10);
        assert_eq!(&opened.plaintext.into_zeroizing()[..], &text[..]);
        assert!(
            veil_keys::open(&k1, &new).is_err(),
            "the old key no longer opens it"
        );

        // Wrong old key, tampered blob and a no-op version are refused.
        assert!(matches!(
            rewrap_blob(&k2, &k2, 3, &old),
            Err(RewrapError::Open {
                code: "wrong_key",
                ..
            })
        ));
        let mut tampered = old.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(
            rewrap_blob(&k1, &k2, 2, &tampered),
            Err(RewrapError::Open { .. })
        ));
        assert!(matches!(
            rewrap_blob(&k1, &k2, 1, &old),
            Err(RewrapError::SameVersion(1))
        ));
    }
}
