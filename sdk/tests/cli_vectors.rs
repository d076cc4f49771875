//! Runs `veil` over every entry of the committed protocol vectors
//! (`keys/tests/vectors/protocol-v1.json`), and checks each vector against the independent
//! implementation in `common::reference` as well.

mod common;

use common::{fails, h, h32, ok, ok_line, reference};
use serde_json::Value;
use uuid::Uuid;

fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../keys/tests/vectors/protocol-v1.json"
    );
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the committed vectors file {path} must exist: {e}"));
    serde_json::from_str(&text).expect("the vectors file is JSON")
}

fn section<'a>(v: &'a Value, name: &str) -> &'a [Value] {
    let entries = v[name]
        .as_array()
        .unwrap_or_else(|| panic!("vectors: `{name}` is not an array"));
    assert!(!entries.is_empty(), "vectors: `{name}` is empty");
    entries
}

fn s<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("vector field `{field}` is not a string: {v}"))
}

fn opt_s<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    match &v[field] {
        Value::Null => None,
        Value::String(text) => Some(text),
        other => panic!("vector field `{field}` is neither a string nor null: {other}"),
    }
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("vector field `{field}` is not a number: {v}"))
}

fn scope_byte(scope: &str) -> u8 {
    match scope {
        "session" => 1,
        "task" => 2,
        other => panic!("unknown scope {other:?}"),
    }
}

fn purpose_byte(purpose: &str) -> u8 {
    match purpose {
        "prompt" => 1,
        "result" => 2,
        "attachment" => 3,
        other => panic!("unknown purpose {other:?}"),
    }
}

/// `--scope S --key-version N --session U [--task T]` for a vector.
fn context_args(v: &Value) -> Vec<String> {
    let mut args = vec![
        "--scope".to_string(),
        s(v, "scope").to_string(),
        "--key-version".to_string(),
        n(v, "key_version").to_string(),
        "--session".to_string(),
        s(v, "session_id").to_string(),
    ];
    if let Some(task) = opt_s(v, "task_id") {
        args.extend(["--task".to_string(), task.to_string()]);
    }
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn kdf_vectors() {
    let v = vectors();
    for vec in section(&v, "kdf") {
        let (seed, session) = (s(vec, "seed"), s(vec, "session_id"));
        let k_session = ok_line(
            &["crypto", "derive", "--seed-hex", seed, "--session", session],
            b"",
        );
        assert_eq!(k_session, s(vec, "k_session"), "{vec}");
        let expected = reference::k_session(&h32(seed), &Uuid::parse_str(session).unwrap());
        assert_eq!(
            hex::encode(expected),
            k_session,
            "reference disagrees: {vec}"
        );

        if let Some(task) = opt_s(vec, "task_id") {
            let k_task = ok_line(
                &[
                    "crypto",
                    "derive",
                    "--seed-hex",
                    seed,
                    "--session",
                    session,
                    "--task",
                    task,
                ],
                b"",
            );
            assert_eq!(Some(k_task.as_str()), opt_s(vec, "k_task"), "{vec}");
            let expected = reference::k_task(&expected, &Uuid::parse_str(task).unwrap());
            assert_eq!(hex::encode(expected), k_task, "reference disagrees: {vec}");
        }
    }
}

#[test]
fn envelope_vectors_open_to_their_chunks() {
    let v = vectors();
    for vec in section(&v, "envelope") {
        let key = s(vec, "key");
        let blob = h(s(vec, "blob"));
        let chunks: Vec<Vec<u8>> = vec["chunks"]
            .as_array()
            .expect("chunks is an array")
            .iter()
            .map(|c| h(c.as_str().expect("chunk is hex")))
            .collect();
        let plaintext = chunks.concat();

        assert_eq!(
            ok(&["crypto", "open", "--key-hex", key], &blob),
            plaintext,
            "{vec}"
        );

        // The independent implementation agrees on the header, the chunking and the bytes.
        let header = reference::Header {
            scope: scope_byte(s(vec, "scope")),
            purpose: purpose_byte(s(vec, "purpose")),
            chunk_exp: u8::try_from(n(vec, "chunk_exp")).unwrap(),
            key_version: u32::try_from(n(vec, "key_version")).unwrap(),
            session: Uuid::parse_str(s(vec, "session_id")).unwrap(),
            task: opt_s(vec, "task_id").map_or(Uuid::nil(), |t| Uuid::parse_str(t).unwrap()),
        };
        let (got_header, sizes, opened) =
            reference::open(&h32(key), &blob).unwrap_or_else(|| panic!("reference refuses {vec}"));
        assert_eq!(got_header, header, "{vec}");
        assert_eq!(
            sizes,
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            "{vec}"
        );
        assert_eq!(opened, plaintext);
        let resealed = reference::seal(&h32(key), &header, &h32(s(vec, "salt")), &chunks);
        assert_eq!(
            hex::encode(resealed),
            s(vec, "blob"),
            "reference reseal differs: {vec}"
        );
    }
}

#[test]
fn envelope_invalid_vectors_are_refused_for_their_reason() {
    let v = vectors();
    for vec in section(&v, "envelope_invalid") {
        let key = s(vec, "key");
        let blob = h(s(vec, "blob"));
        let reason = s(vec, "reason");
        let line = fails(&["crypto", "open", "--key-hex", key], &blob, 1);
        assert!(
            line.starts_with(&format!("veil: error: stdin: blob refused [{reason}]")),
            "expected [{reason}], got: {line}"
        );
        assert!(
            reference::open(&h32(key), &blob).is_none(),
            "reference opens an invalid blob ({reason})"
        );
    }
}

#[test]
fn wrap_vectors_unwrap_to_their_key() {
    let v = vectors();
    for vec in section(&v, "wrap") {
        let secret = s(vec, "recipient_secret");
        let wrapped = s(vec, "wrapped");
        let mut args: Vec<String> = [
            "crypto",
            "unwrap",
            "--secret-hex",
            secret,
            "--wrapped",
            wrapped,
        ]
        .map(String::from)
        .to_vec();
        args.extend(context_args(vec));
        assert_eq!(ok_line(&strs(&args), b""), s(vec, "key"), "{vec}");

        // The recipient's public key, and the wrap itself, agree with the independent implementation.
        assert_eq!(
            hex::encode(reference::x25519_public(&h32(secret))),
            s(vec, "recipient_public")
        );
        let task = opt_s(vec, "task_id").map(|t| Uuid::parse_str(t).unwrap());
        let ctx = reference::wrap_ctx(
            scope_byte(s(vec, "scope")),
            u32::try_from(n(vec, "key_version")).unwrap(),
            &Uuid::parse_str(s(vec, "session_id")).unwrap(),
            task.as_ref(),
        );
        let rewrapped = reference::wrap(
            h32(s(vec, "ephemeral_secret")),
            &h32(s(vec, "recipient_public")),
            &h32(s(vec, "key")),
            &ctx,
        );
        assert_eq!(
            hex::encode(rewrapped),
            wrapped,
            "reference wrap differs: {vec}"
        );

        // A different key version must not unwrap.
        let mut wrong = args.clone();
        let at = wrong.iter().position(|a| a == "--key-version").unwrap() + 1;
        wrong[at] = (n(vec, "key_version") ^ 1).to_string();
        fails(&strs(&wrong), b"", 1);
    }
}

#[test]
fn urn_vectors_parse_as_stated() {
    let v = vectors();
    for vec in section(&v, "urn") {
        let urn = s(vec, "urn");
        let valid = vec["valid"].as_bool().expect("valid is a boolean");
        if valid {
            let line = ok_line(&["urn", "parse", urn], b"");
            let parts: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(parts, vec["parts"], "{urn}");
        } else {
            assert!(vec["parts"].is_null(), "{vec}");
            let line = fails(&["urn", "parse", urn], b"", 1);
            assert!(line.starts_with("veil: error: URN: "), "{line}");
        }
    }
}
