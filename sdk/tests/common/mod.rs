//! Shared code for the CLI tests: running `veil`, and a small independent implementation of
//! protocol v1 written straight from the spec with the RustCrypto primitives, so the CLI is
//! checked against the spec rather than against the crate it is built on.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;

/// What one run of `veil` produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `veil` with `args`, feeding `stdin`.
pub fn veil(args: &[&str], stdin: &[u8]) -> Run {
    let out = assert_cmd::Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(args)
        .write_stdin(stdin.to_vec())
        .output()
        .expect("veil runs");
    Run {
        code: out.status.code().expect("veil exits normally"),
        stdout: out.stdout,
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// Runs `veil`, asserts success with nothing on stderr, and returns stdout.
pub fn ok(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let run = veil(args, stdin);
    assert_eq!(run.code, 0, "veil {args:?} failed: {}", run.stderr);
    assert!(
        run.stderr.is_empty(),
        "veil {args:?} wrote to stderr: {}",
        run.stderr
    );
    run.stdout
}

/// Runs `veil`, asserts success, and returns stdout as one trimmed line of text.
pub fn ok_line(args: &[&str], stdin: &[u8]) -> String {
    let out = String::from_utf8(ok(args, stdin)).expect("stdout is UTF-8");
    assert!(
        out.ends_with('\n') && out.lines().count() == 1,
        "not one line: {out:?}"
    );
    out.trim_end().to_string()
}

/// Runs `veil`, asserts it failed with `code`, nothing on stdout and exactly one line on stderr
/// in the `veil: error: …` form, and returns that line.
pub fn fails(args: &[&str], stdin: &[u8], code: i32) -> String {
    let run = veil(args, stdin);
    assert_eq!(
        run.code, code,
        "veil {args:?}: expected exit status {code}, got {} (stderr: {})",
        run.code, run.stderr
    );
    assert!(
        run.stdout.is_empty(),
        "veil {args:?} failed but wrote {} bytes to stdout",
        run.stdout.len()
    );
    assert!(
        run.stderr.ends_with('\n') && run.stderr.lines().count() == 1,
        "veil {args:?}: expected one stderr line, got {:?}",
        run.stderr
    );
    assert!(run.stderr.starts_with("veil: error: "), "{:?}", run.stderr);
    run.stderr.trim_end().to_string()
}

pub fn h(text: &str) -> Vec<u8> {
    hex::decode(text).expect("valid hex in test data")
}

pub fn h32(text: &str) -> [u8; 32] {
    h(text).try_into().expect("32 bytes")
}

pub fn write_file(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write test file");
    path.to_str().expect("UTF-8 path").to_string()
}

/// Protocol v1 from the spec, independently of `veil-keys`.
pub mod reference {
    use aes_gcm::Aes256Gcm;
    use aes_gcm::aead::{Aead, KeyInit, Nonce, Payload};
    use hkdf::Hkdf;
    use sha2::Sha256;
    use uuid::Uuid;
    use x25519_dalek::{PublicKey, StaticSecret};

    pub const HEADER_LEN: usize = 108;

    pub fn lp(x: &[u8]) -> Vec<u8> {
        let mut out = (x.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(x);
        out
    }

    pub fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
        let mut okm = [0u8; 32];
        Hkdf::<Sha256>::new(Some(salt), ikm)
            .expand(info, &mut okm)
            .expect("32-byte output");
        okm
    }

    pub fn k_session(seed: &[u8; 32], session: &Uuid) -> [u8; 32] {
        let info = [lp(b"veil/v1/session"), lp(session.as_bytes())].concat();
        hkdf32(b"veil/kdf/v1", seed, &info)
    }

    pub fn k_task(k_session: &[u8; 32], task: &Uuid) -> [u8; 32] {
        let info = [lp(b"veil/v1/task"), lp(task.as_bytes())].concat();
        hkdf32(b"veil/kdf/v1", k_session, &info)
    }

    /// `K_enc` and the key commitment for a blob salt.
    pub fn blob_keys(key: &[u8; 32], salt: &[u8]) -> ([u8; 32], [u8; 32]) {
        let hk = Hkdf::<Sha256>::new(Some(salt), key);
        let mut k_enc = [0u8; 32];
        let mut commit = [0u8; 32];
        hk.expand(&lp(b"veil/v1/blob-key"), &mut k_enc).expect("32");
        hk.expand(&lp(b"veil/v1/blob-commit"), &mut commit)
            .expect("32");
        (k_enc, commit)
    }

    fn nonce(index: u32, last: bool) -> Nonce<Aes256Gcm> {
        let mut n = [0u8; 12];
        n[7..11].copy_from_slice(&index.to_be_bytes());
        n[11] = u8::from(last);
        n.into()
    }

    /// The header fields of a blob, as the spec lays them out.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Header {
        pub scope: u8,
        pub purpose: u8,
        pub chunk_exp: u8,
        pub key_version: u32,
        pub session: Uuid,
        pub task: Uuid,
    }

    /// Opens a blob by the spec. Returns the header, the plaintext length of every chunk and
    /// the plaintext, or `None` if anything at all is wrong.
    pub fn open(key: &[u8; 32], blob: &[u8]) -> Option<(Header, Vec<usize>, Vec<u8>)> {
        let header = blob.get(..HEADER_LEN)?;
        if &header[..4] != b"VEIL" || header[4] != 1 {
            return None;
        }
        let fields = Header {
            scope: header[5],
            purpose: header[6],
            chunk_exp: header[7],
            key_version: u32::from_be_bytes(header[8..12].try_into().ok()?),
            session: Uuid::from_slice(&header[12..28]).ok()?,
            task: Uuid::from_slice(&header[28..44]).ok()?,
        };
        let scope_ok = match fields.scope {
            1 => fields.task.is_nil(),
            2 => !fields.task.is_nil(),
            _ => false,
        };
        if !scope_ok || !(1..=3).contains(&fields.purpose) || !(10..=24).contains(&fields.chunk_exp)
        {
            return None;
        }
        let (k_enc, commit) = blob_keys(key, &header[44..76]);
        if commit[..] != header[76..108] {
            return None;
        }
        let c = 1usize << fields.chunk_exp;
        let cipher = Aes256Gcm::new_from_slice(&k_enc).ok()?;
        let mut rest = &blob[HEADER_LEN..];
        let mut plaintext = Vec::new();
        let mut sizes = Vec::new();
        for index in 0u32.. {
            let word = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
            let last = word >> 31 == 1;
            let len = (word & 0x7fff_ffff) as usize;
            if len < 16 || len > c + 16 || (!last && len == 16) {
                return None;
            }
            let ct = rest.get(4..4 + len)?;
            let chunk = cipher
                .decrypt(
                    &nonce(index, last),
                    Payload {
                        msg: ct,
                        aad: header,
                    },
                )
                .ok()?;
            sizes.push(chunk.len());
            plaintext.extend_from_slice(&chunk);
            rest = &rest[4 + len..];
            if last {
                return rest.is_empty().then_some((fields, sizes, plaintext));
            }
        }
        None
    }

    /// Seals explicit chunks (the last one last) with a given salt, by the spec.
    pub fn seal(key: &[u8; 32], header: &Header, salt: &[u8; 32], chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut blob = b"VEIL".to_vec();
        blob.extend([1, header.scope, header.purpose, header.chunk_exp]);
        blob.extend(header.key_version.to_be_bytes());
        blob.extend(header.session.as_bytes());
        blob.extend(header.task.as_bytes());
        blob.extend(salt);
        let (k_enc, commit) = blob_keys(key, salt);
        blob.extend(commit);
        let aad = blob.clone();
        let cipher = Aes256Gcm::new_from_slice(&k_enc).expect("32-byte key");
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let index = u32::try_from(i).expect("few chunks");
            let ct = cipher
                .encrypt(
                    &nonce(index, last),
                    Payload {
                        msg: chunk,
                        aad: &aad,
                    },
                )
                .expect("seal");
            let word = (u32::from(last) << 31) | u32::try_from(ct.len()).expect("small chunk");
            blob.extend(word.to_be_bytes());
            blob.extend(ct);
        }
        blob
    }

    /// The wrap context: scope || BE32(key version) || session id || task id.
    pub fn wrap_ctx(scope: u8, key_version: u32, session: &Uuid, task: Option<&Uuid>) -> Vec<u8> {
        let mut ctx = vec![scope];
        ctx.extend_from_slice(&key_version.to_be_bytes());
        ctx.extend_from_slice(session.as_bytes());
        ctx.extend_from_slice(task.map_or(&[0u8; 16], |t| t.as_bytes()));
        ctx
    }

    fn wrap_key_for(ss: &[u8; 32], e_pub: &[u8; 32], r_pub: &[u8; 32], ctx: &[u8]) -> [u8; 32] {
        let salt = [&e_pub[..], &r_pub[..]].concat();
        let info = [lp(b"veil/v1/wrap"), lp(ctx)].concat();
        hkdf32(&salt, ss, &info)
    }

    /// Wraps `key` to `recipient` with a given ephemeral secret.
    pub fn wrap(ephemeral: [u8; 32], recipient: &[u8; 32], key: &[u8; 32], ctx: &[u8]) -> Vec<u8> {
        let e = StaticSecret::from(ephemeral);
        let e_pub = PublicKey::from(&e);
        let ss = e.diffie_hellman(&PublicKey::from(*recipient));
        assert!(ss.was_contributory());
        let k_wrap = wrap_key_for(ss.as_bytes(), e_pub.as_bytes(), recipient, ctx);
        let cipher = Aes256Gcm::new_from_slice(&k_wrap).expect("32-byte key");
        let sealed = cipher
            .encrypt(&[0u8; 12].into(), Payload { msg: key, aad: ctx })
            .expect("seal");
        [&e_pub.as_bytes()[..], &sealed[..]].concat()
    }

    /// Unwraps an 80-byte wrapped key, or `None` if it does not authenticate.
    pub fn unwrap(secret: &[u8; 32], wrapped: &[u8], ctx: &[u8]) -> Option<[u8; 32]> {
        if wrapped.len() != 80 {
            return None;
        }
        let r = StaticSecret::from(*secret);
        let r_pub = PublicKey::from(&r);
        let e_pub: [u8; 32] = wrapped[..32].try_into().ok()?;
        let ss = r.diffie_hellman(&PublicKey::from(e_pub));
        if !ss.was_contributory() {
            return None;
        }
        let k_wrap = wrap_key_for(ss.as_bytes(), &e_pub, r_pub.as_bytes(), ctx);
        let cipher = Aes256Gcm::new_from_slice(&k_wrap).ok()?;
        let key = cipher
            .decrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: &wrapped[32..],
                    aad: ctx,
                },
            )
            .ok()?;
        key.try_into().ok()
    }

    /// The X25519 public key of a secret.
    pub fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
        PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
    }
}
