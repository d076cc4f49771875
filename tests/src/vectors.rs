//! The protocol v1 test vectors (`keys/tests/vectors/protocol-v1.json`).
//!
//! Inputs are fixed; "random" values (seeds, salts, ephemeral secrets) are
//! `SHA-256(label)` so the file is reproducible. Deterministic salts and
//! ephemeral secrets come from `veil_keys::vectors`, which exists for this
//! generator only.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use veil_blobstore::Urn;
use veil_keys::{
    BlobParams, KeyId, Purpose, Scope, SecretKey, Seed, Uuid, X25519Secret, derive_session_key,
    derive_task_key, vectors,
};

/// Where the committed file lives, relative to the workspace root.
pub const VECTORS_PATH: &str = "keys/tests/vectors/protocol-v1.json";

fn det(label: &str) -> [u8; 32] {
    Sha256::digest(format!("veil/test-vectors/v1/{label}").as_bytes()).into()
}

fn det_bytes(label: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u32;
    while out.len() < len {
        out.extend_from_slice(&det(&format!("{label}/{i}")));
        i += 1;
    }
    out.truncate(len);
    out
}

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).expect("fixed UUID")
}

fn opt_uuid(u: Option<Uuid>) -> Value {
    u.map_or(Value::Null, |u| Value::String(u.hyphenated().to_string()))
}

fn kdf_vectors() -> Vec<Value> {
    let cases = [
        (
            "kdf/0",
            "0190f3a0-5b1e-7c2d-8e4f-a1b2c3d4e5f6",
            "0190f3a0-5b1e-7c2d-8e4f-a1b2c3d4e5f7",
        ),
        (
            "kdf/1",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
        ),
        (
            "kdf/2",
            "6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "018f4e6a-0000-7000-8000-000000000001",
        ),
    ];
    cases
        .iter()
        .map(|(label, sid, tid)| {
            let seed = Seed::from_bytes(det(label));
            let (sid, tid) = (uuid(sid), uuid(tid));
            let ks = derive_session_key(&seed, &sid);
            let kt = derive_task_key(&ks, &tid);
            json!({
                "seed": hex::encode(seed.expose_secret()),
                "session_id": sid.hyphenated().to_string(),
                "task_id": tid.hyphenated().to_string(),
                "k_session": hex::encode(ks.expose_secret()),
                "k_task": hex::encode(kt.expose_secret()),
            })
        })
        .collect()
}

struct EnvCase {
    label: &'static str,
    scope: Scope,
    purpose: Purpose,
    key_version: u32,
    chunk_exp: u8,
    chunks: Vec<Vec<u8>>,
}

const SESSION: &str = "0190f3a0-5b1e-7c2d-8e4f-a1b2c3d4e5f6";
const TASK: &str = "0190f3a0-5b1e-7c2d-8e4f-a1b2c3d4e5f7";

fn key_id(scope: Scope, version: u32) -> KeyId {
    match scope {
        Scope::Session => KeyId::session(version, uuid(SESSION)),
        Scope::Task => KeyId::task(version, uuid(SESSION), uuid(TASK)),
    }
}

/// Whole-buffer chunking: full chunks and a last one of `len % C` bytes.
fn whole(label: &str, len: usize, exp: u8) -> Vec<Vec<u8>> {
    let data = det_bytes(label, len);
    let c = 1usize << exp;
    let mut chunks: Vec<Vec<u8>> = data.chunks(c).map(<[u8]>::to_vec).collect();
    if len.is_multiple_of(c) {
        chunks.push(Vec::new());
    }
    chunks
}

fn env_cases() -> Vec<EnvCase> {
    use Purpose::*;
    use Scope::*;
    let c = |label, scope, purpose, key_version, chunk_exp, chunks| EnvCase {
        label,
        scope,
        purpose,
        key_version,
        chunk_exp,
        chunks,
    };
    let toks = |ts: &[&str]| ts.iter().map(|t| t.as_bytes().to_vec()).collect::<Vec<_>>();
    vec![
        c("empty/session", Session, Prompt, 1, 16, vec![vec![]]),
        c("empty/task", Task, Result, 1, 16, vec![vec![]]),
        c(
            "one-byte/task",
            Task,
            Prompt,
            1,
            10,
            whole("one-byte", 1, 10),
        ),
        c(
            "one-byte/session-attachment",
            Session,
            Attachment,
            7,
            16,
            whole("one-byte-att", 1, 16),
        ),
        c(
            "exact-one-chunk",
            Task,
            Prompt,
            2,
            10,
            whole("exact-1", 1024, 10),
        ),
        c(
            "exact-three-chunks",
            Session,
            Prompt,
            2,
            10,
            whole("exact-3", 3072, 10),
        ),
        c(
            "several-chunks-and-tail",
            Task,
            Result,
            3,
            10,
            whole("several", 4 * 1024 + 321, 10),
        ),
        c(
            "default-chunk-size",
            Task,
            Prompt,
            1,
            16,
            whole("default", 70_000, 16),
        ),
        c(
            "largest-exponent",
            Session,
            Attachment,
            1,
            24,
            whole("e24", 100, 24),
        ),
        c(
            "last-chunk-full",
            Task,
            Result,
            1,
            10,
            vec![det_bytes("last-full", 1024)],
        ),
        c(
            "streamed-tokens",
            Task,
            Result,
            5,
            16,
            toks(&["Hel", "lo", ",", " wor", "ld", "!"]),
        ),
        c(
            "streamed-tokens-empty-last",
            Task,
            Result,
            5,
            10,
            toks(&["The", " answer", " is", " 42", ""]),
        ),
        c("streamed-mixed", Session, Result, 0xfffffffe, 10, {
            let mut v = vec![
                det_bytes("mixed-0", 1024),
                b"x".to_vec(),
                det_bytes("mixed-2", 1000),
            ];
            v.push(det_bytes("mixed-3", 17));
            v
        }),
    ]
}

struct Sealed {
    key: SecretKey,
    blob: Vec<u8>,
}

fn seal_case(case: &EnvCase) -> Result<Sealed> {
    let key = SecretKey::from_bytes(det(&format!("env-key/{}", case.label)));
    let params = BlobParams::new(key_id(case.scope, case.key_version), case.purpose)
        .with_chunk_exp(case.chunk_exp)?;
    let chunks: Vec<&[u8]> = case.chunks.iter().map(Vec::as_slice).collect();
    let blob =
        vectors::seal_with_salt(&key, &params, det(&format!("salt/{}", case.label)), &chunks)?;
    Ok(Sealed { key, blob })
}

fn envelope_vectors(cases: &[EnvCase]) -> Result<Vec<Value>> {
    cases
        .iter()
        .map(|case| {
            let s = seal_case(case)?;
            let id = key_id(case.scope, case.key_version);
            Ok(json!({
                "key": hex::encode(s.key.expose_secret()),
                "scope": case.scope.as_str(),
                "purpose": case.purpose.as_str(),
                "key_version": case.key_version,
                "session_id": id.session_id.hyphenated().to_string(),
                "task_id": opt_uuid(id.task_id),
                "chunk_exp": case.chunk_exp,
                "salt": hex::encode(det(&format!("salt/{}", case.label))),
                "chunks": case.chunks.iter().map(hex::encode).collect::<Vec<_>>(),
                "blob": hex::encode(&s.blob),
            }))
        })
        .collect()
}

/// Frame boundaries of a valid blob: (start, end) of each frame.
fn frames(blob: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = veil_keys::HEADER_LEN;
    while at < blob.len() {
        let word = u32::from_be_bytes(blob[at..at + 4].try_into().expect("4 bytes"));
        let end = at + 4 + (word & 0x7fff_ffff) as usize;
        out.push((at, end));
        at = end;
    }
    out
}

fn invalid_vectors(cases: &[EnvCase]) -> Result<Vec<Value>> {
    let find = |label: &str| -> Result<Sealed> {
        seal_case(cases.iter().find(|c| c.label == label).context("case")?)
    };
    let three = find("several-chunks-and-tail")?; // 5 frames, task scope, e = 10
    let toks = find("streamed-tokens")?; // 6 frames, e = 16
    let empty = find("empty/session")?;
    let b = &three.blob;
    let f = frames(b);
    let mut out: Vec<(String, &SecretKey, Vec<u8>)> = Vec::new();
    let mut add = |reason: &str, key: &'static str, blob: Vec<u8>| {
        out.push((
            reason.to_string(),
            if key == "three" {
                &three.key
            } else if key == "toks" {
                &toks.key
            } else {
                &empty.key
            },
            blob,
        ));
    };
    let with = |i: usize, v: u8| {
        let mut x = b.clone();
        x[i] = v;
        x
    };
    // Header faults.
    add("short_header", "three", b[..107].to_vec());
    add("short_header", "three", Vec::new());
    add("bad_magic", "three", with(0, b'W'));
    add("unsupported_format", "three", with(4, 0x02));
    add("bad_scope", "three", with(5, 0x03));
    add("bad_scope", "three", with(5, 0x00));
    add("scope_task_id_mismatch", "three", with(5, 0x01)); // session scope, non-zero task id
    add("scope_task_id_mismatch", "empty", {
        let mut x = empty.blob.clone();
        x[5] = 0x02; // task scope, zero task id
        x
    });
    add("bad_purpose", "three", with(6, 0x00));
    add("bad_purpose", "three", with(6, 0x04));
    add("bad_chunk_exponent", "three", with(7, 9));
    add("bad_chunk_exponent", "three", with(7, 25));
    add("wrong_key", "three", with(50, b[50] ^ 0x01)); // salt changed: commitment fails
    add("wrong_key", "three", with(100, b[100] ^ 0x80)); // commitment changed
    add("wrong_key", "toks", b.clone()); // another key entirely
    // The header is the AAD of every chunk: changing an authenticated field fails the tag.
    add("decrypt", "three", with(11, b[11] ^ 0x01)); // key version
    add("decrypt", "three", with(12, b[12] ^ 0x01)); // session id
    add("decrypt", "three", with(7, 11)); // chunk exponent 10 -> 11 (frames still fit)
    // Frame faults.
    let set_word =
        |x: &mut Vec<u8>, at: usize, word: u32| x[at..at + 4].copy_from_slice(&word.to_be_bytes());
    add("bad_frame_length", "three", {
        let mut x = b.clone();
        set_word(&mut x, f[0].0, 15);
        x
    });
    add("bad_frame_length", "three", {
        let mut x = b.clone();
        set_word(&mut x, f[0].0, 1024 + 17);
        x
    });
    add("bad_frame_length", "three", {
        let mut x = b.clone();
        set_word(&mut x, f[4].0, 0x8000_0000 | 15);
        x
    });
    add("empty_non_final_chunk", "toks", {
        // An empty non-last frame inserted before the last frame.
        let t = &toks.blob;
        let ft = frames(t);
        let mut x = t[..ft[5].0].to_vec();
        x.extend_from_slice(&16u32.to_be_bytes());
        x.extend_from_slice(&[0u8; 16]);
        x.extend_from_slice(&t[ft[5].0..]);
        x
    });
    add("decrypt", "three", with(f[1].0 + 10, b[f[1].0 + 10] ^ 0x04)); // ciphertext bit
    add("decrypt", "three", with(f[2].1 - 1, b[f[2].1 - 1] ^ 0x80)); // tag bit
    add("decrypt", "three", {
        // Last flag set on frame 0: changes the nonce.
        let mut x = b.clone();
        x[f[0].0] |= 0x80;
        x
    });
    add("decrypt", "three", {
        // Last flag cleared on the last frame.
        let mut x = b.clone();
        x[f[4].0] &= 0x7f;
        x
    });
    add("decrypt", "three", {
        // Frames 1 and 2 swapped.
        let mut x = b[..f[1].0].to_vec();
        x.extend_from_slice(&b[f[2].0..f[2].1]);
        x.extend_from_slice(&b[f[1].0..f[1].1]);
        x.extend_from_slice(&b[f[3].0..]);
        x
    });
    add("decrypt", "three", {
        // Frame 1 duplicated.
        let mut x = b[..f[2].0].to_vec();
        x.extend_from_slice(&b[f[1].0..f[1].1]);
        x.extend_from_slice(&b[f[2].0..]);
        x
    });
    add("decrypt", "toks", {
        // A streamed frame re-framed: tokens 1 and 2 merged under one length word.
        let t = &toks.blob;
        let ft = frames(t);
        let mut x = t[..ft[1].0].to_vec();
        let merged = (ft[1].1 - ft[1].0 - 4) + (ft[2].1 - ft[2].0 - 4);
        x.extend_from_slice(&(merged as u32).to_be_bytes());
        x.extend_from_slice(&t[ft[1].0 + 4..ft[1].1]);
        x.extend_from_slice(&t[ft[2].0 + 4..ft[2].1]);
        x.extend_from_slice(&t[ft[3].0..]);
        x
    });
    add("truncated", "three", b[..108].to_vec()); // header only
    add("truncated", "three", b[..f[4].0].to_vec()); // last frame dropped
    add("truncated", "three", b[..f[4].0 + 3].to_vec()); // cut inside a length word
    add("truncated", "three", b[..b.len() - 1].to_vec()); // cut inside the last frame
    add("trailing_data", "three", [b.as_slice(), &[0]].concat());
    add(
        "trailing_data",
        "three",
        [b.as_slice(), &b[f[4].0..f[4].1]].concat(),
    ); // last frame repeated
    Ok(out
        .into_iter()
        .map(|(reason, key, blob)| {
            json!({"key": hex::encode(key.expose_secret()), "blob": hex::encode(blob), "reason": reason})
        })
        .collect())
}

fn wrap_vectors() -> Result<Vec<Value>> {
    let cases = [
        ("wrap/session", Scope::Session, 1u32),
        ("wrap/task", Scope::Task, 4u32),
        ("wrap/task-high-version", Scope::Task, 0x8000_0001u32),
    ];
    cases
        .iter()
        .map(|(label, scope, version)| {
            let r = X25519Secret::from_bytes(det(&format!("{label}/recipient")));
            let e = det(&format!("{label}/ephemeral"));
            let key = SecretKey::from_bytes(det(&format!("{label}/key")));
            let id = key_id(*scope, *version);
            let wrapped = vectors::wrap_with_ephemeral(e, &r.public(), &key, &id)?;
            Ok(json!({
                "recipient_secret": hex::encode(*r.to_bytes()),
                "recipient_public": r.public().to_string(),
                "ephemeral_secret": hex::encode(e),
                "key": hex::encode(key.expose_secret()),
                "scope": scope.as_str(),
                "key_version": version,
                "session_id": id.session_id.hyphenated().to_string(),
                "task_id": opt_uuid(id.task_id),
                "wrapped": hex::encode(wrapped),
            }))
        })
        .collect()
}

fn urn_vectors() -> Result<Vec<Value>> {
    let long_segment = "a".repeat(255);
    let long_name = vec!["b".repeat(255); 4].join("/"); // 1023 bytes
    let too_long_name = format!("{long_name}xx");
    let valid = [
        "urn:blob:v1:s3:aws:veil-prod:0190f3a0-5b1e-7c2d-8e4f-a1b2c3d4e5f6/0190f3a0-5b1e-7c2d-8e4f-a1b2c3d4e5f7/prompt-0190f3a1-0000-7000-8000-000000000000.veil".to_string(),
        "urn:blob:v1:fs:local:blobs:a".to_string(),
        "urn:blob:v1:mem:local:mem:x/y/z".to_string(),
        "urn:blob:v1:gcs:google:my.bucket_1:Dir/File-Name.v2".to_string(),
        "urn:blob:v1:azure:azure:container:a..b/.hidden/..x".to_string(),
        "urn:blob:v1:s3:minio:b:file.txt".to_string(),
        format!("urn:blob:v1:s3:r2:{}:{long_segment}", "c".repeat(63)),
        format!("urn:blob:v1:s3:{}:b:{long_name}", "p".repeat(63)),
    ];
    let invalid = [
        String::new(),
        "urn:blob:v1:s3:aws:bucket".to_string(),
        "urn:blob:v2:s3:aws:bucket:file".to_string(),
        "URN:BLOB:v1:s3:aws:bucket:file".to_string(),
        "urn:blob:V1:s3:aws:bucket:file".to_string(),
        "urn:blob:v1:ftp:aws:bucket:file".to_string(),
        "urn:blob:v1:S3:aws:bucket:file".to_string(),
        "urn:blob:v1:s3::bucket:file".to_string(),
        "urn:blob:v1:s3:AWS:bucket:file".to_string(),
        "urn:blob:v1:s3:a_b:bucket:file".to_string(),
        format!("urn:blob:v1:s3:{}:bucket:file", "p".repeat(64)),
        "urn:blob:v1:s3:aws::file".to_string(),
        "urn:blob:v1:s3:aws:Bucket:file".to_string(),
        "urn:blob:v1:s3:aws:buck/et:file".to_string(),
        format!("urn:blob:v1:s3:aws:{}:file", "c".repeat(64)),
        "urn:blob:v1:s3:aws:bucket:".to_string(),
        "urn:blob:v1:s3:aws:bucket:a//b".to_string(),
        "urn:blob:v1:s3:aws:bucket:/a".to_string(),
        "urn:blob:v1:s3:aws:bucket:a/".to_string(),
        "urn:blob:v1:s3:aws:bucket:a/./b".to_string(),
        "urn:blob:v1:s3:aws:bucket:../a".to_string(),
        "urn:blob:v1:s3:aws:bucket:.".to_string(),
        "urn:blob:v1:s3:aws:bucket:a b".to_string(),
        "urn:blob:v1:s3:aws:bucket:a:b".to_string(),
        "urn:blob:v1:s3:aws:bucket:caf\u{e9}".to_string(),
        format!("urn:blob:v1:s3:aws:bucket:{}", "a".repeat(256)),
        format!("urn:blob:v1:s3:aws:bucket:{too_long_name}"),
        "urn:blob:v1:s3:aws:bucket:file\n".to_string(),
    ];
    let mut out = Vec::new();
    for u in valid.iter() {
        let parsed: Urn = u
            .parse()
            .with_context(|| format!("valid URN vector refused: {u}"))?;
        ensure!(parsed.to_string() == *u, "URN does not round-trip: {u}");
        out.push(json!({"urn": u, "valid": true, "parts": serde_json::to_value(parsed.parts())?}));
    }
    for u in invalid.iter() {
        ensure!(
            u.parse::<Urn>().is_err(),
            "invalid URN vector accepted: {u:?}"
        );
        out.push(json!({"urn": u, "valid": false, "parts": Value::Null}));
    }
    Ok(out)
}

/// Every vector, as one JSON document.
pub fn generate() -> Result<Value> {
    let cases = env_cases();
    Ok(json!({
        "kdf": kdf_vectors(),
        "envelope": envelope_vectors(&cases)?,
        "envelope_invalid": invalid_vectors(&cases)?,
        "wrap": wrap_vectors()?,
        "urn": urn_vectors()?,
    }))
}

/// The committed file's exact text.
pub fn generate_json() -> Result<String> {
    let mut s = serde_json::to_string_pretty(&generate()?)?;
    s.push('\n');
    Ok(s)
}
