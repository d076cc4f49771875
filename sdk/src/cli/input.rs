//! Reading and checking what the user hands the CLI: hex values, secrets from flags or files,
//! UUIDs and stdin. Every error names the flag (or stream) at fault and never repeats a secret.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use uuid::Uuid;
use zeroize::Zeroizing;

use super::CliError;

/// Secret text from the command line (a hex key, seed or X25519 secret).
///
/// Held in a buffer that is zeroized on drop, and never printed: `Debug` is redacted. Clap
/// and the process's own argument vector still hold copies we cannot reach, which is why every
/// secret flag has a `--…-file` twin.
#[derive(Clone)]
pub(crate) struct SecretText(Zeroizing<String>);

impl From<String> for SecretText {
    fn from(text: String) -> Self {
        Self(Zeroizing::new(text))
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText(..)")
    }
}

impl SecretText {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Decodes exactly `N` bytes from `2N` hex characters (either case) into a zeroizing buffer.
///
/// The message never quotes the text, only its length and the position of a bad character,
/// so it is safe for secrets.
pub(crate) fn decode_hex<const N: usize>(
    field: &'static str,
    text: &str,
) -> Result<Zeroizing<[u8; N]>, CliError> {
    let expected = 2 * N;
    if text.starts_with("0x") || text.starts_with("0X") {
        return Err(CliError::usage(
            field,
            format!("expected {expected} hex characters without a 0x prefix"),
        ));
    }
    let got = text.chars().count();
    if got != expected {
        return Err(CliError::usage(
            field,
            format!("expected {expected} hex characters, got {got}"),
        ));
    }
    if let Some(position) = text.bytes().position(|b| !b.is_ascii_hexdigit()) {
        return Err(CliError::usage(
            field,
            format!(
                "expected {expected} hex characters, found a non-hex character at position {}",
                position + 1
            ),
        ));
    }
    let mut out = Zeroizing::new([0u8; N]);
    hex::decode_to_slice(text, out.as_mut())
        .map_err(|_| CliError::usage(field, format!("expected {expected} hex characters")))?;
    Ok(out)
}

/// The most a secret file may hold: a 64-character hex value with generous room for whitespace.
const SECRET_FILE_LIMIT: usize = 4096;

/// Reads a file holding one hex value (surrounding whitespace ignored) and decodes it.
pub(crate) fn decode_hex_file<const N: usize>(
    field: &'static str,
    path: &Path,
) -> Result<Zeroizing<[u8; N]>, CliError> {
    let unreadable =
        |e: io::Error| CliError::usage(field, format!("cannot read {}: {e}", path.display()));
    let file = File::open(path).map_err(unreadable)?;
    // Capacity for the whole limit up front, so the buffer never moves and leaves copies behind.
    let mut bytes = Zeroizing::new(Vec::with_capacity(SECRET_FILE_LIMIT + 1));
    file.take(SECRET_FILE_LIMIT as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() > SECRET_FILE_LIMIT {
        return Err(CliError::usage(
            field,
            format!(
                "{} is larger than {SECRET_FILE_LIMIT} bytes; it must hold only {} hex characters",
                path.display(),
                2 * N
            ),
        ));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        CliError::usage(
            field,
            format!(
                "{} does not hold text; expected {} hex characters",
                path.display(),
                2 * N
            ),
        )
    })?;
    decode_hex(field, text.trim())
}

/// Resolves a secret given either inline (`--x-hex`) or in a file (`--x-file`); clap's
/// argument group has already made sure exactly one of them is present.
pub(crate) fn secret_from<const N: usize>(
    hex_flag: &'static str,
    hex: Option<&SecretText>,
    file_flag: &'static str,
    file: Option<&Path>,
) -> Result<Zeroizing<[u8; N]>, CliError> {
    match (hex, file) {
        (Some(text), None) => decode_hex(hex_flag, text.as_str()),
        (None, Some(path)) => decode_hex_file(file_flag, path),
        _ => Err(CliError::usage(
            hex_flag,
            format!("give exactly one of {hex_flag} and {file_flag}"),
        )),
    }
}

/// Clap value parser for a session id: a hyphenated UUID, either case.
pub(crate) fn parse_session_id(text: &str) -> Result<Uuid, String> {
    parse_uuid(text)
}

/// Clap value parser for a task id: a hyphenated UUID that is not the nil UUID, because an
/// all-zero task id is how the envelope and the wrap context mark session scope.
pub(crate) fn parse_task_id(text: &str) -> Result<Uuid, String> {
    let id = parse_uuid(text)?;
    if id.is_nil() {
        return Err("the nil UUID is not a task id (all-zero marks session scope)".into());
    }
    Ok(id)
}

fn parse_uuid(text: &str) -> Result<Uuid, String> {
    const EXPECTED: &str =
        "expected a hyphenated UUID such as 0190b5d4-3c2e-7a01-8f00-1234567890ab";
    if text.len() != 36 {
        return Err(EXPECTED.into());
    }
    Uuid::try_parse(text).map_err(|_| EXPECTED.into())
}

/// Reads a stream to its end into a buffer that is zeroized on drop, including every buffer it
/// outgrows on the way (a plain `read_to_end` would free those without clearing them).
pub(crate) fn read_to_end_zeroizing(reader: &mut dyn Read) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(64 * 1024));
    loop {
        if buf.len() == buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(buf.capacity() * 2));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        let filled = buf.len();
        let capacity = buf.capacity();
        buf.resize(capacity, 0);
        match reader.read(&mut buf[filled..]) {
            Ok(0) => {
                buf.truncate(filled);
                return Ok(buf);
            }
            Ok(n) => buf.truncate(filled + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(filled),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_of_any_case_decodes() {
        let lower = decode_hex::<2>("--x", "abcd").unwrap();
        let upper = decode_hex::<2>("--x", "ABCD").unwrap();
        assert_eq!(*lower, [0xab, 0xcd]);
        assert_eq!(*upper, [0xab, 0xcd]);
    }

    #[test]
    fn hex_errors_name_the_field_and_hide_the_value() {
        let err = decode_hex::<32>("--key-hex", "0123456789").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--key-hex: expected 64 hex characters, got 10"
        );
        let bad = format!("{}zz", "a".repeat(62));
        let err = decode_hex::<32>("--key-hex", &bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "--key-hex: expected 64 hex characters, found a non-hex character at position 63"
        );
        assert!(!err.contains(&bad));
        let err = decode_hex::<32>("--key-hex", &format!("0x{}", "a".repeat(64))).unwrap_err();
        assert!(err.to_string().contains("without a 0x prefix"));
    }

    #[test]
    fn uuids_must_be_hyphenated_and_task_ids_not_nil() {
        let id = "0190B5D4-3C2E-7A01-8F00-1234567890AB";
        assert_eq!(
            parse_session_id(id).unwrap().to_string(),
            id.to_ascii_lowercase()
        );
        assert!(parse_session_id("0190b5d43c2e7a018f001234567890ab").is_err());
        assert!(parse_session_id("not-a-uuid").is_err());
        assert!(parse_session_id(&Uuid::nil().to_string()).is_ok());
        assert!(parse_task_id(&Uuid::nil().to_string()).is_err());
    }

    #[test]
    fn secret_files_are_trimmed_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, format!("  {}\n\n", "AB".repeat(32))).unwrap();
        assert_eq!(
            *decode_hex_file::<32>("--key-file", &good).unwrap(),
            [0xab; 32]
        );

        let big = dir.path().join("big");
        std::fs::write(&big, " ".repeat(SECRET_FILE_LIMIT + 1)).unwrap();
        let err = decode_hex_file::<32>("--key-file", &big).unwrap_err();
        assert!(err.to_string().starts_with("--key-file: "), "{err}");

        let missing = dir.path().join("missing");
        let err = decode_hex_file::<32>("--key-file", &missing).unwrap_err();
        assert!(
            err.to_string().starts_with("--key-file: cannot read "),
            "{err}"
        );
    }

    #[test]
    fn zeroizing_reader_reads_everything() {
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let read = read_to_end_zeroizing(&mut &data[..]).unwrap();
        assert_eq!(&read[..], &data[..]);
        let empty = read_to_end_zeroizing(&mut &[][..]).unwrap();
        assert!(empty.is_empty());
    }
}
