//! Checks the committed protocol v1 vectors against this implementation:
//! derivations, every envelope (whole-buffer and streamed in several slicings),
//! every invalid envelope with its reason, and every wrap.

use serde_json::Value;
use veil_keys::{
    Error, Header, KeyId, Opener, Purpose, Scope, SecretKey, Seed, Uuid, WRAPPED_LEN, X25519Public,
    X25519Secret, derive_session_key, derive_task_key, open, unwrap_key, vectors,
};

fn load() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/protocol-v1.json"
    ))
    .expect("vectors file");
    serde_json::from_str(&text).expect("vectors JSON")
}

fn hexv(v: &Value) -> Vec<u8> {
    let s = v.as_str().expect("hex string");
    assert_eq!(s, s.to_lowercase(), "hex must be lowercase");
    hex::decode(s).expect("hex")
}

fn key(v: &Value) -> SecretKey {
    SecretKey::from_slice(&hexv(v)).unwrap()
}

fn uuid(v: &Value) -> Option<Uuid> {
    v.as_str().map(|s| {
        let u = Uuid::parse_str(s).unwrap();
        assert_eq!(u.hyphenated().to_string(), s, "UUIDs must be canonical");
        u
    })
}

fn key_id(v: &Value) -> KeyId {
    let scope: Scope = v["scope"].as_str().unwrap().parse().unwrap();
    KeyId::from_scope(
        scope,
        v["key_version"].as_u64().unwrap() as u32,
        uuid(&v["session_id"]).unwrap(),
        uuid(&v["task_id"]),
    )
    .unwrap()
}

#[test]
fn kdf_vectors() {
    let doc = load();
    let list = doc["kdf"].as_array().unwrap();
    assert!(list.len() >= 3);
    for v in list {
        let seed = Seed::from_slice(&hexv(&v["seed"])).unwrap();
        let ks = derive_session_key(&seed, &uuid(&v["session_id"]).unwrap());
        assert_eq!(ks.expose_secret().as_slice(), hexv(&v["k_session"]));
        let kt = derive_task_key(&ks, &uuid(&v["task_id"]).unwrap());
        assert_eq!(kt.expose_secret().as_slice(), hexv(&v["k_task"]));
    }
}

#[test]
fn envelope_vectors_open_whole_and_streamed() {
    let doc = load();
    let list = doc["envelope"].as_array().unwrap();
    assert!(list.len() >= 10);
    let mut saw_exact_multiple = false;
    for v in list {
        let k = key(&v["key"]);
        let blob = hexv(&v["blob"]);
        let chunks: Vec<Vec<u8>> = v["chunks"].as_array().unwrap().iter().map(hexv).collect();
        let plaintext: Vec<u8> = chunks.concat();
        let id = key_id(v);
        let purpose: Purpose = v["purpose"].as_str().unwrap().parse().unwrap();
        let e = v["chunk_exp"].as_u64().unwrap() as u8;

        // The header says what the vector says.
        let h = Header::parse(&blob).unwrap();
        assert_eq!(h.key, id);
        assert_eq!(h.purpose, purpose);
        assert_eq!(h.chunk_exp, e);
        assert_eq!(h.salt.as_slice(), hexv(&v["salt"]));

        let opened = open(&k, &blob).unwrap();
        assert_eq!(&opened.plaintext[..], plaintext.as_slice());

        // Re-sealing with the same salt and chunk boundaries reproduces the blob.
        let params = veil_keys::BlobParams::new(id, purpose)
            .with_chunk_exp(e)
            .unwrap();
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let salt: [u8; 32] = hexv(&v["salt"]).try_into().unwrap();
        assert_eq!(
            vectors::seal_with_salt(&k, &params, salt, &refs).unwrap(),
            blob
        );

        // Streamed, in several slicings: the opener yields exactly the chunks.
        for step in [1usize, 3, 107, 108, 109, 1000, blob.len()] {
            let mut opener = Opener::new(&k);
            let mut got = Vec::new();
            for piece in blob.chunks(step.max(1)) {
                got.extend(opener.push(piece).unwrap().into_iter().map(|c| c.to_vec()));
            }
            assert!(opener.is_complete());
            opener.finish().unwrap();
            assert_eq!(got, chunks, "slicing {step}");
        }
        let c = 1usize << e;
        if !plaintext.is_empty()
            && plaintext.len().is_multiple_of(c)
            && chunks.last().unwrap().is_empty()
        {
            saw_exact_multiple = true;
        }
    }
    assert!(
        saw_exact_multiple,
        "vectors must cover an exact multiple of the chunk size"
    );
}

fn error_code(e: &Error) -> &'static str {
    e.code()
}

#[test]
fn invalid_envelope_vectors_fail_with_their_reason() {
    let doc = load();
    let list = doc["envelope_invalid"].as_array().unwrap();
    let mut reasons = std::collections::BTreeSet::new();
    for v in list {
        let k = key(&v["key"]);
        let blob = hexv(&v["blob"]);
        let reason = v["reason"].as_str().unwrap();
        reasons.insert(reason.to_string());
        let err = open(&k, &blob).expect_err(reason);
        assert_eq!(error_code(&err), reason, "whole-buffer open");

        // The streaming opener reaches the same verdict, fed in small pieces.
        let mut opener = Opener::new(&k);
        let mut verdict = None;
        for piece in blob.chunks(7) {
            if let Err(e) = opener.push(piece) {
                verdict = Some(e);
                break;
            }
        }
        let err = match verdict {
            Some(e) => e,
            None => opener.finish().expect_err(reason),
        };
        assert_eq!(error_code(&err), reason, "streaming open");
    }
    for r in [
        "short_header",
        "bad_magic",
        "unsupported_format",
        "bad_scope",
        "scope_task_id_mismatch",
        "bad_purpose",
        "bad_chunk_exponent",
        "wrong_key",
        "bad_frame_length",
        "empty_non_final_chunk",
        "decrypt",
        "truncated",
        "trailing_data",
    ] {
        assert!(reasons.contains(r), "no invalid vector for {r}");
    }
}

#[test]
fn wrap_vectors() {
    let doc = load();
    let list = doc["wrap"].as_array().unwrap();
    assert!(list.len() >= 2);
    for v in list {
        let secret = X25519Secret::from_bytes(hexv(&v["recipient_secret"]).try_into().unwrap());
        let public: X25519Public = v["recipient_public"].as_str().unwrap().parse().unwrap();
        assert_eq!(secret.public(), public);
        let id = key_id(v);
        let wrapped = hexv(&v["wrapped"]);
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        let k = unwrap_key(&secret, &wrapped, &id).unwrap();
        assert_eq!(k.expose_secret().as_slice(), hexv(&v["key"]));
        let eph: [u8; 32] = hexv(&v["ephemeral_secret"]).try_into().unwrap();
        assert_eq!(
            vectors::wrap_with_ephemeral(eph, &public, &k, &id)
                .unwrap()
                .as_slice(),
            wrapped
        );
    }
}
