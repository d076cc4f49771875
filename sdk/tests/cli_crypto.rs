//! `veil crypto …` end to end, checked against an independent implementation of the spec.

mod common;

use common::{fails, h, h32, ok, ok_line, reference, veil, write_file};
use uuid::Uuid;

const SESSION: &str = "0190b5d4-3c2e-7a01-8f00-1234567890ab";
const TASK: &str = "0190b5d4-3c2f-7b02-9a00-00000000a001";
const SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// Known answers computed outside Rust (Python's hmac/hashlib HKDF) from the spec's formulas.
const KAT: &[(&str, &str, &str, &str, &str)] = &[
    (
        SEED,
        SESSION,
        TASK,
        "0c241791d240bd5e019970d34f88d2893e821aed99c3a8d81fa2e982aa01e650",
        "8a2ca29779544764b8941bea83fc40f469ba7f331335efbcd3448ec7bd9fbab5",
    ),
    (
        "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "9ed10fbe1fb6b2d77aec693554751a8b983b12fe2f7a0f1209cafaeb776ec5ae",
        "9eb9aec3230f7c83678ff9eea8434fbe977e492278d4aff4aead3fb936036b88",
    ),
];

fn uuid(text: &str) -> Uuid {
    Uuid::parse_str(text).unwrap()
}

fn k_session_hex() -> String {
    ok_line(
        &["crypto", "derive", "--seed-hex", SEED, "--session", SESSION],
        b"",
    )
}

fn k_task_hex() -> String {
    k_task_from(SEED)
}

/// K_task of SESSION/TASK derived from `seed` (64 hex characters).
fn k_task_from(seed: &str) -> String {
    ok_line(
        &[
            "crypto",
            "derive",
            "--seed-hex",
            seed,
            "--session",
            SESSION,
            "--task",
            TASK,
        ],
        b"",
    )
}

// ---------------------------------------------------------------- derive

#[test]
fn derive_matches_known_answers() {
    for &(seed, session, task, k_session, k_task) in KAT {
        let got = ok_line(
            &["crypto", "derive", "--seed-hex", seed, "--session", session],
            b"",
        );
        assert_eq!(got, k_session);
        let got = ok_line(
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
        assert_eq!(got, k_task);
    }
}

#[test]
fn derive_matches_an_independent_hkdf() {
    let ids = [
        (
            "11".repeat(32),
            "01890a5d-ac96-774b-bcce-b302099a8057",
            "01890a5d-ac96-774b-bcce-b302099a8058",
        ),
        (
            "a5".repeat(32),
            "ffffffff-0000-7000-8000-000000000001",
            "00000000-0000-0000-0000-000000000001",
        ),
        (
            hex::encode([7u8; 32]),
            "123e4567-e89b-12d3-a456-426614174000",
            "123e4567-e89b-12d3-a456-426614174001",
        ),
    ];
    for (seed, session, task) in &ids {
        let k_session = reference::k_session(&h32(seed), &uuid(session));
        let k_task = reference::k_task(&k_session, &uuid(task));
        let got = ok_line(
            &["crypto", "derive", "--seed-hex", seed, "--session", session],
            b"",
        );
        assert_eq!(got, hex::encode(k_session));
        let got = ok_line(
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
        assert_eq!(got, hex::encode(k_task));
    }
}

#[test]
fn derive_accepts_any_case_and_seed_files() {
    let expected = KAT[0].3;
    let upper = ok_line(
        &[
            "crypto",
            "derive",
            "--seed-hex",
            &SEED.to_uppercase(),
            "--session",
            &SESSION.to_uppercase(),
        ],
        b"",
    );
    assert_eq!(upper, expected);

    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "seed",
        &format!("\n  {}  \r\n", SEED.to_uppercase()),
    );
    let from_file = ok_line(
        &[
            "crypto",
            "derive",
            "--seed-file",
            &file,
            "--session",
            SESSION,
        ],
        b"",
    );
    assert_eq!(from_file, expected);
}

// ---------------------------------------------------------------- seal / open

fn seal_args<'a>(key: &'a str, scope: &'a str, exp: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec![
        "crypto",
        "seal",
        "--key-hex",
        key,
        "--scope",
        scope,
        "--purpose",
        "result",
        "--key-version",
        "7",
        "--session",
        SESSION,
    ];
    if scope == "task" {
        args.extend(["--task", TASK]);
    }
    if let Some(exp) = exp {
        args.extend(["--chunk-exp", exp]);
    }
    args
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

#[test]
fn seal_then_open_round_trips_across_sizes_and_chunk_exponents() {
    let k_task = k_task_hex();
    let key = h32(&k_task);
    for exp in [10u8, 12, 16] {
        let c = 1usize << exp;
        for len in [0, 1, c - 1, c, c + 1, 3 * c, 3 * c + 17, 70_000] {
            let data = plaintext(len);
            let exp_text = exp.to_string();
            let blob = ok(&seal_args(&k_task, "task", Some(&exp_text)), &data);

            // Layout, checked by the independent opener.
            let (header, sizes, opened) = reference::open(&key, &blob)
                .unwrap_or_else(|| panic!("reference open, e={exp} len={len}"));
            assert_eq!(opened, data, "e={exp} len={len}");
            assert_eq!(
                header,
                reference::Header {
                    scope: 2,
                    purpose: 2,
                    chunk_exp: exp,
                    key_version: 7,
                    session: uuid(SESSION),
                    task: uuid(TASK),
                }
            );
            // Full chunks and a shorter (possibly empty) last one.
            let mut expected_sizes = vec![c; len / c];
            expected_sizes.push(len % c);
            assert_eq!(sizes, expected_sizes, "e={exp} len={len}");

            // And the CLI opens it again.
            assert_eq!(ok(&["crypto", "open", "--key-hex", &k_task], &blob), data);
        }
    }
}

#[test]
fn session_scope_blobs_have_a_zero_task_id_and_the_default_exponent() {
    let k_session = k_session_hex();
    let data = plaintext(100_000);
    let blob = ok(&seal_args(&k_session, "session", None), &data);
    let (header, sizes, opened) = reference::open(&h32(&k_session), &blob).expect("opens");
    assert_eq!(opened, data);
    assert_eq!(header.scope, 1);
    assert_eq!(header.task, Uuid::nil());
    assert_eq!(header.chunk_exp, 16);
    assert_eq!(sizes, vec![65536, 100_000 - 65536]);
    assert_eq!(
        ok(
            &["crypto", "open", "--key-hex", &k_session.to_uppercase()],
            &blob
        ),
        data
    );
}

#[test]
fn each_purpose_is_written_to_the_header() {
    let k_session = k_session_hex();
    for (purpose, byte) in [("prompt", 1u8), ("result", 2), ("attachment", 3)] {
        let mut args = seal_args(&k_session, "session", None);
        let at = args.iter().position(|a| *a == "result").unwrap();
        args[at] = purpose;
        let blob = ok(&args, b"x");
        assert_eq!(blob[6], byte, "{purpose}");
    }
}

#[test]
fn two_seals_of_the_same_input_differ_by_salt() {
    let k = k_session_hex();
    let a = ok(&seal_args(&k, "session", None), b"same");
    let b = ok(&seal_args(&k, "session", None), b"same");
    assert_eq!(a.len(), b.len());
    assert_ne!(a[44..76], b[44..76], "fresh salt per blob");
}

#[test]
fn key_files_work_for_seal_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let k = k_task_hex();
    let file = write_file(dir.path(), "k_task", &format!("{k}\n"));
    let mut args = seal_args(&k, "task", None);
    args[2] = "--key-file";
    args[3] = &file;
    let blob = ok(&args, b"from a file");
    assert_eq!(
        ok(&["crypto", "open", "--key-file", &file], &blob),
        b"from a file"
    );
}

#[test]
fn open_refuses_every_tampering_with_nothing_on_stdout() {
    let k = k_task_hex();
    let data = plaintext(3000);
    let blob = ok(&seal_args(&k, "task", Some("10")), &data);
    let open = ["crypto", "open", "--key-hex", &k];

    // 3000 bytes in chunks of 1024: frames of 1024, 1024 and 952 bytes of plaintext.
    let frame_starts = [108usize, 108 + 4 + 1040, 108 + 2 * (4 + 1040)];
    assert_eq!(blob.len(), frame_starts[2] + 4 + 952 + 16);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Flip one bit in every header byte, every frame-length word, and a spread of body bytes.
    let mut positions: Vec<usize> = (0..108).collect();
    for start in frame_starts {
        positions.extend(start..start + 4);
        positions.extend([start + 4, start + 4 + 500, start + 4 + 940]);
    }
    for pos in positions {
        let mut b = blob.clone();
        b[pos] ^= 0x01;
        cases.push((format!("bit flip at {pos}"), b));
    }
    let mut flag_flipped = blob.clone();
    flag_flipped[108] ^= 0x80; // first frame claims to be the last
    cases.push(("last flag set early".into(), flag_flipped));
    cases.push(("empty input".into(), Vec::new()));
    cases.push(("short header".into(), blob[..107].to_vec()));
    cases.push(("header only".into(), blob[..108].to_vec()));
    cases.push((
        "truncated before the last frame".into(),
        blob[..blob.len() - 1].to_vec(),
    ));
    cases.push((
        "last frame dropped".into(),
        blob[..frame_starts[2]].to_vec(),
    ));
    cases.push((
        "cut inside a length word".into(),
        blob[..frame_starts[1] + 2].to_vec(),
    ));
    let mut trailing = blob.clone();
    trailing.push(0);
    cases.push(("trailing byte".into(), trailing));
    // Frames 0 and 1 swapped.
    let f0 = blob[frame_starts[0]..frame_starts[1]].to_vec();
    let f1 = blob[frame_starts[1]..frame_starts[2]].to_vec();
    let mut swapped = blob[..108].to_vec();
    swapped.extend(&f1);
    swapped.extend(&f0);
    swapped.extend(&blob[frame_starts[2]..]);
    cases.push(("frames reordered".into(), swapped));

    for (what, bad) in cases {
        assert!(
            reference::open(&h32(&k), &bad).is_none(),
            "{what}: the reference opened it"
        );
        let line = fails(&open, &bad, 1);
        assert!(
            line.starts_with("veil: error: stdin: blob refused ["),
            "{what}: {line}"
        );
    }

    // The untouched blob still opens.
    assert_eq!(ok(&open, &blob), data);
}

#[test]
fn open_with_the_wrong_key_reports_wrong_key() {
    let blob = ok(&seal_args(&k_task_hex(), "task", None), b"secret words");
    let line = fails(&["crypto", "open", "--key-hex", &k_session_hex()], &blob, 1);
    assert!(line.contains("[wrong_key]"), "{line}");
    assert!(!line.contains("secret words"));
}

// ---------------------------------------------------------------- wrap / unwrap / keygen

fn keygen() -> (String, String) {
    let line = ok_line(&["crypto", "x25519-keygen"], b"");
    let json: serde_json::Value = serde_json::from_str(&line).expect("keygen prints JSON");
    let obj = json.as_object().expect("a JSON object");
    assert_eq!(obj.len(), 2, "{line}");
    let secret = obj["secret"].as_str().unwrap().to_string();
    let public = obj["public"].as_str().unwrap().to_string();
    for v in [&secret, &public] {
        assert_eq!(v.len(), 64);
        assert!(
            v.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{v}"
        );
    }
    (secret, public)
}

fn ctx_args<'a>(
    scope: &'a str,
    version: &'a str,
    session: &'a str,
    task: Option<&'a str>,
) -> Vec<&'a str> {
    let mut args = vec![
        "--scope",
        scope,
        "--key-version",
        version,
        "--session",
        session,
    ];
    if let Some(task) = task {
        args.extend(["--task", task]);
    }
    args
}

fn wrap(recipient: &str, key: &str, ctx: &[&str]) -> String {
    let mut args = vec!["crypto", "wrap", "--recipient", recipient, "--key-hex", key];
    args.extend(ctx);
    ok_line(&args, b"")
}

fn unwrap_args<'a>(secret: &'a str, wrapped: &'a str, ctx: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "crypto",
        "unwrap",
        "--secret-hex",
        secret,
        "--wrapped",
        wrapped,
    ];
    args.extend(ctx);
    args
}

#[test]
fn keygen_public_key_belongs_to_its_secret() {
    let (secret, public) = keygen();
    assert_eq!(public, hex::encode(reference::x25519_public(&h32(&secret))));
    let (secret2, _) = keygen();
    assert_ne!(secret, secret2);
}

#[test]
fn wrap_then_unwrap_round_trips_for_both_scopes() {
    let (secret, public) = keygen();
    let cases = [
        (k_session_hex(), ctx_args("session", "1", SESSION, None)),
        (
            k_task_hex(),
            ctx_args("task", "4294967295", SESSION, Some(TASK)),
        ),
    ];
    for (key, ctx) in cases {
        let wrapped = wrap(&public, &key, &ctx);
        assert_eq!(wrapped.len(), 160);
        assert_eq!(ok_line(&unwrap_args(&secret, &wrapped, &ctx), b""), key);
        // Upper-case hex and UUIDs are accepted too.
        let (secret_uc, wrapped_uc, session_uc) = (
            secret.to_uppercase(),
            wrapped.to_uppercase(),
            SESSION.to_uppercase(),
        );
        let task_uc = TASK.to_uppercase();
        let upper_ctx: Vec<&str> = ctx
            .iter()
            .map(|a| match *a {
                SESSION => session_uc.as_str(),
                TASK => task_uc.as_str(),
                other => other,
            })
            .collect();
        assert_eq!(
            ok_line(&unwrap_args(&secret_uc, &wrapped_uc, &upper_ctx), b""),
            key
        );
    }
}

#[test]
fn wrap_interoperates_with_an_independent_implementation() {
    let (secret, public) = keygen();
    let key = k_task_hex();
    let ctx = reference::wrap_ctx(2, 3, &uuid(SESSION), Some(&uuid(TASK)));

    // CLI wraps, the reference unwraps.
    let wrapped = wrap(&public, &key, &ctx_args("task", "3", SESSION, Some(TASK)));
    let unwrapped =
        reference::unwrap(&h32(&secret), &h(&wrapped), &ctx).expect("reference unwraps");
    assert_eq!(hex::encode(unwrapped), key);

    // The reference wraps, the CLI unwraps.
    let wrapped = reference::wrap([0x42; 32], &h32(&public), &h32(&key), &ctx);
    let got = ok_line(
        &unwrap_args(
            &secret,
            &hex::encode(&wrapped),
            &ctx_args("task", "3", SESSION, Some(TASK)),
        ),
        b"",
    );
    assert_eq!(got, key);
}

#[test]
fn secret_files_work_for_wrap_and_unwrap() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = keygen();
    let key = k_session_hex();
    let key_file = write_file(dir.path(), "key", &key);
    let secret_file = write_file(dir.path(), "secret", &format!("{secret}\n"));
    let ctx = ctx_args("session", "2", SESSION, None);
    let mut args = vec![
        "crypto",
        "wrap",
        "--recipient",
        &public,
        "--key-file",
        &key_file,
    ];
    args.extend(&ctx);
    let wrapped = ok_line(&args, b"");
    let mut args = vec![
        "crypto",
        "unwrap",
        "--secret-file",
        &secret_file,
        "--wrapped",
        &wrapped,
    ];
    args.extend(&ctx);
    assert_eq!(ok_line(&args, b""), key);
}

#[test]
fn unwrap_with_the_wrong_context_or_secret_fails() {
    let (secret, public) = keygen();
    let (other_secret, _) = keygen();
    let key = k_task_hex();
    let good = ctx_args("task", "5", SESSION, Some(TASK));
    let wrapped = wrap(&public, &key, &good);
    assert_eq!(ok_line(&unwrap_args(&secret, &wrapped, &good), b""), key);

    let other_task = "0190b5d4-3c2f-7b02-9a00-00000000a002";
    let other_session = "0190b5d4-3c2e-7a01-8f00-1234567890ac";
    let wrong_contexts = [
        ctx_args("task", "6", SESSION, Some(TASK)),
        ctx_args("task", "5", other_session, Some(TASK)),
        ctx_args("task", "5", SESSION, Some(other_task)),
        ctx_args("session", "5", SESSION, None),
    ];
    for ctx in &wrong_contexts {
        let line = fails(&unwrap_args(&secret, &wrapped, ctx), b"", 1);
        assert!(
            line.starts_with("veil: error: --wrapped: cannot unwrap [unwrap]"),
            "{line}"
        );
        assert!(!line.contains(&key) && !line.contains(&secret), "{line}");
    }
    let line = fails(&unwrap_args(&other_secret, &wrapped, &good), b"", 1);
    assert!(line.contains("--wrapped"), "{line}");

    // A tampered wrapped key.
    let mut bytes = h(&wrapped);
    bytes[50] ^= 1;
    let tampered = hex::encode(bytes);
    fails(&unwrap_args(&secret, &tampered, &good), b"", 1);
}

#[test]
fn wrap_refuses_a_low_order_recipient() {
    let zero = "00".repeat(32);
    let mut args = vec!["crypto", "wrap", "--recipient", &zero];
    let key = k_session_hex();
    args.extend(["--key-hex", &key]);
    args.extend(ctx_args("session", "1", SESSION, None));
    let line = fails(&args, b"", 1);
    assert!(line.starts_with("veil: error: --recipient: "), "{line}");
}

// ---------------------------------------------------------------- bad input

/// Every malformed command line fails with status 2, one stderr line naming the field, an empty
/// stdout, and never the secret it was given.
#[test]
fn bad_inputs_fail_with_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let key = k_task_hex();
    let short = "0123456789";
    let not_hex = format!("{}zz", "ab".repeat(31));
    let long = "ab".repeat(33);
    let (secret, public) = keygen();
    let wrapped = wrap(&public, &key, &ctx_args("task", "1", SESSION, Some(TASK)));
    let bad_file = write_file(dir.path(), "bad", "not a key\n");
    let missing_file = dir.path().join("missing").to_str().unwrap().to_string();
    let nil = Uuid::nil().to_string();

    let seal = |extra: &[&str], drop: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = vec![
            "crypto",
            "seal",
            "--key-hex",
            &key,
            "--scope",
            "task",
            "--purpose",
            "prompt",
            "--key-version",
            "1",
            "--session",
            SESSION,
            "--task",
            TASK,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        for flag in drop {
            let at = args.iter().position(|a| a == flag).unwrap();
            args.drain(at..at + 2);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let derive = |seed: &str| -> Vec<String> {
        ["crypto", "derive", "--seed-hex", seed, "--session", SESSION]
            .map(String::from)
            .to_vec()
    };
    let unwrap = |secret: &str, wrapped: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "crypto",
            "unwrap",
            "--secret-hex",
            secret,
            "--wrapped",
            wrapped,
        ]
        .map(String::from)
        .to_vec();
        a.extend(
            ctx_args("task", "1", SESSION, Some(TASK))
                .into_iter()
                .map(String::from),
        );
        a
    };

    // (args, the start of the message after "veil: error: ", a secret that must not show)
    let cases: Vec<(Vec<String>, &str, Option<&str>)> = vec![
        (
            derive(short),
            "--seed-hex: expected 64 hex characters, got 10",
            Some(short),
        ),
        (
            derive(&not_hex),
            "--seed-hex: expected 64 hex characters, found a non-hex",
            Some(&not_hex),
        ),
        (
            derive(&long),
            "--seed-hex: expected 64 hex characters, got 66",
            Some(&long),
        ),
        (
            derive(""),
            "--seed-hex: expected 64 hex characters, got 0",
            None,
        ),
        (
            [
                "crypto",
                "derive",
                "--seed-hex",
                SEED,
                "--session",
                "not-a-uuid",
            ]
            .map(String::from)
            .to_vec(),
            "--session: invalid value 'not-a-uuid'",
            Some(SEED),
        ),
        (
            [
                "crypto",
                "derive",
                "--seed-hex",
                SEED,
                "--session",
                SESSION,
                "--task",
                &nil,
            ]
            .map(String::from)
            .to_vec(),
            "--task: invalid value",
            Some(SEED),
        ),
        (
            ["crypto", "derive", "--session", SESSION]
                .map(String::from)
                .to_vec(),
            "the following required arguments were not provided",
            None,
        ),
        (
            [
                "crypto",
                "derive",
                "--seed-file",
                &bad_file,
                "--session",
                SESSION,
            ]
            .map(String::from)
            .to_vec(),
            "--seed-file: expected 64 hex characters",
            None,
        ),
        (
            [
                "crypto",
                "derive",
                "--seed-file",
                &missing_file,
                "--session",
                SESSION,
            ]
            .map(String::from)
            .to_vec(),
            "--seed-file: cannot read",
            None,
        ),
        (
            seal(&[], &["--task"]),
            "--task: required with --scope task",
            Some(&key),
        ),
        (
            {
                let mut a = seal(&[], &["--scope"]);
                a.extend(["--scope".into(), "session".into()]);
                a
            },
            "--task: not allowed with --scope session",
            Some(&key),
        ),
        (
            seal(&[], &["--key-hex"]),
            "the following required arguments were not provided",
            None,
        ),
        (
            seal(&["--key-file", &bad_file], &[]),
            "the argument '--key-hex <HEX>' cannot be used with",
            Some(&key),
        ),
        (
            seal(&["--key-hex", short], &["--key-hex"]),
            "--key-hex: expected 64 hex characters, got 10",
            Some(short),
        ),
        (
            seal(&["--chunk-exp", "9"], &[]),
            "--chunk-exp: invalid value '9'",
            Some(&key),
        ),
        (
            seal(&["--chunk-exp", "25"], &[]),
            "--chunk-exp: invalid value '25'",
            Some(&key),
        ),
        (
            seal(&["--purpose", "secret"], &["--purpose"]),
            "--purpose: invalid value 'secret'",
            Some(&key),
        ),
        (
            seal(&["--scope", "both"], &["--scope"]),
            "--scope: invalid value 'both'",
            Some(&key),
        ),
        (
            seal(&["--key-version", "-1"], &["--key-version"]),
            "--key-version: invalid value '-1'",
            Some(&key),
        ),
        (
            seal(&["--key-version", "4294967296"], &["--key-version"]),
            "--key-version: invalid value",
            Some(&key),
        ),
        (
            seal(
                &["--session", "0190b5d43c2e7a018f001234567890ab"],
                &["--session"],
            ),
            "--session: invalid value",
            Some(&key),
        ),
        (
            seal(&["--task", "xyz"], &["--task"]),
            "--task: invalid value 'xyz'",
            Some(&key),
        ),
        (
            ["crypto", "open"].map(String::from).to_vec(),
            "the following required arguments were not provided",
            None,
        ),
        (
            ["crypto", "open", "--key-hex", &not_hex]
                .map(String::from)
                .to_vec(),
            "--key-hex: expected 64 hex characters, found a non-hex character at position 63",
            Some(&not_hex),
        ),
        (
            ["crypto", "open", "--key-file", &missing_file]
                .map(String::from)
                .to_vec(),
            "--key-file: cannot read",
            None,
        ),
        (
            unwrap(&secret, &wrapped[..158]),
            "--wrapped: expected 160 hex characters, got 158",
            Some(&secret),
        ),
        (
            unwrap(short, &wrapped),
            "--secret-hex: expected 64 hex characters, got 10",
            Some(short),
        ),
        (
            {
                let mut a = unwrap(&secret, &wrapped);
                a.extend(["--secret-file".into(), bad_file.clone()]);
                a
            },
            "the argument '--secret-hex <HEX>' cannot be used with",
            Some(&secret),
        ),
        (
            {
                let mut a: Vec<String> =
                    ["crypto", "wrap", "--recipient", short, "--key-hex", &key]
                        .map(String::from)
                        .to_vec();
                a.extend(
                    ctx_args("session", "1", SESSION, None)
                        .into_iter()
                        .map(String::from),
                );
                a
            },
            "--recipient: expected 64 hex characters, got 10",
            Some(&key),
        ),
        (
            {
                let mut a: Vec<String> =
                    ["crypto", "wrap", "--recipient", &public, "--key-hex", &key]
                        .map(String::from)
                        .to_vec();
                a.extend(
                    ctx_args("task", "1", SESSION, None)
                        .into_iter()
                        .map(String::from),
                );
                a
            },
            "--task: required with --scope task",
            Some(&key),
        ),
        (
            ["crypto", "derive", &key, "--session", SESSION]
                .map(String::from)
                .to_vec(),
            "unexpected positional argument",
            Some(&key),
        ),
        (
            ["crypto", "frobnicate"].map(String::from).to_vec(),
            "unrecognized subcommand 'frobnicate'",
            None,
        ),
        (
            ["crypto"].map(String::from).to_vec(),
            "a subcommand is required",
            None,
        ),
        (Vec::new(), "a subcommand is required", None),
    ];

    for (args, expected, secret) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let line = fails(&args, b"some stdin", 2);
        let message = line.strip_prefix("veil: error: ").unwrap();
        assert!(
            message.starts_with(expected),
            "veil {args:?}\n  got:      {message}\n  expected: {expected}…"
        );
        if let Some(secret) = secret {
            assert!(
                !line.contains(secret),
                "veil {args:?} echoed a secret: {line}"
            );
            assert!(
                !line.contains(&secret.to_uppercase()),
                "veil {args:?} echoed a secret: {line}"
            );
        }
    }
}

#[test]
fn help_explains_every_command() {
    let top = String::from_utf8(ok(&["--help"], b"")).unwrap();
    assert!(
        top.contains("crypto") && top.contains("urn") && top.contains("Exit status"),
        "{top}"
    );
    for (cmd, must) in [
        (
            "derive",
            &[
                "--seed-hex",
                "--seed-file",
                "--session",
                "--task",
                "veil/kdf/v1",
            ][..],
        ),
        (
            "seal",
            &[
                "--key-hex",
                "--key-file",
                "--scope",
                "--purpose",
                "--key-version",
                "--chunk-exp",
                "attachment",
            ],
        ),
        ("open", &["--key-hex", "--key-file", "wrong key"]),
        ("wrap", &["--recipient", "--key-hex", "--scope", "80-byte"]),
        (
            "unwrap",
            &["--secret-hex", "--secret-file", "--wrapped", "context"],
        ),
        ("x25519-keygen", &["secret", "public"]),
    ] {
        let help = String::from_utf8(ok(&["crypto", cmd, "--help"], b"")).unwrap();
        for word in must {
            assert!(
                help.contains(word),
                "`veil crypto {cmd} --help` does not mention {word}:\n{help}"
            );
        }
        assert!(help.contains("Exit status"), "{help}");
    }
    let version = ok_line(&["--version"], b"");
    assert!(version.starts_with("veil "), "{version}");
}

#[test]
fn seal_reads_all_of_a_large_stdin() {
    let k = k_session_hex();
    let data = plaintext(1 << 20 | 12345);
    let blob = ok(&seal_args(&k, "session", Some("14")), &data);
    let run = veil(&["crypto", "open", "--key-hex", &k], &blob);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, data);
}

// ---------------------------------------------------------------- rewrap

/// K_task of SESSION/TASK derived from a seed of one repeated byte.
fn k_task_of(seed_byte: u8) -> String {
    k_task_from(&hex::encode([seed_byte; 32]))
}

/// `veil crypto rewrap` from the key `old` to the key `new` of version `version`.
fn rewrap_args<'a>(old: &'a str, new: &'a str, version: &'a str) -> [&'a str; 8] {
    [
        "crypto",
        "rewrap",
        "--key-hex",
        old,
        "--new-key-hex",
        new,
        "--new-key-version",
        version,
    ]
}

#[test]
fn rewrap_moves_a_blob_to_the_new_version_and_keeps_the_rest() {
    let (old, new) = (k_task_of(1), k_task_of(2));
    let data = plaintext(5000);
    let blob = ok(&seal_args(&old, "task", Some("10")), &data);
    let moved = ok(&rewrap_args(&old, &new, "8"), &blob);
    let (header, sizes, opened) =
        reference::open(&h32(&new), &moved).expect("the independent opener opens the new blob");
    assert_eq!(opened, data);
    assert_eq!(
        header,
        reference::Header {
            scope: 2,
            purpose: 2,
            chunk_exp: 10,
            key_version: 8,
            session: uuid(SESSION),
            task: uuid(TASK),
        }
    );
    assert_eq!(sizes.len(), 5, "same chunking");
    assert!(
        reference::open(&h32(&old), &moved).is_none(),
        "the old key no longer opens it"
    );

    // A wrong old key, a tampered blob and the same version are refused, with nothing written.
    let err = fails(&rewrap_args(&new, &new, "9"), &blob, 1);
    assert!(err.contains("[wrong_key]"), "{err}");
    let mut tampered = blob.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    fails(&rewrap_args(&old, &new, "8"), &tampered, 1);
    let err = fails(&rewrap_args(&old, &new, "7"), &blob, 2);
    assert!(err.contains("--new-key-version"), "{err}");
}
