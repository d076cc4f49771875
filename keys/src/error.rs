//! The one error type of this crate.

/// Everything that can go wrong in `veil-keys`.
///
/// Envelope and wrap failures each have their own variant so that callers and
/// tests can tell them apart; the AEAD failure itself ([`Error::Decrypt`],
/// [`Error::Unwrap`]) deliberately carries no detail. No variant ever holds
/// key material or plaintext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- envelope header (protocol §3) ----
    /// Fewer than 108 bytes where a header was expected.
    #[error("envelope: header is shorter than 108 bytes")]
    ShortHeader,
    /// The first four bytes are not `VEIL`.
    #[error("envelope: bad magic (not a Veil blob)")]
    BadMagic,
    /// The format byte is not 0x01.
    #[error("envelope: unsupported format {0:#04x}")]
    UnsupportedFormat(u8),
    /// The scope byte is neither 0x01 (session) nor 0x02 (task).
    #[error("envelope: bad scope {0:#04x}")]
    BadScope(u8),
    /// The task id is zero for a task-scoped blob, or non-zero for a session-scoped one.
    #[error("envelope: scope and task id disagree")]
    ScopeTaskIdMismatch,
    /// The purpose byte is not 0x01, 0x02 or 0x03.
    #[error("envelope: bad purpose {0:#04x}")]
    BadPurpose(u8),
    /// The chunk exponent is outside 10..=24.
    #[error("envelope: chunk exponent {0} outside 10..=24")]
    BadChunkExponent(u8),
    /// The key commitment does not match: the blob was sealed under another key.
    #[error("envelope: wrong key (key commitment mismatch)")]
    WrongKey,

    // ---- envelope body ----
    /// A frame length below 16 or above C + 16.
    #[error("envelope: frame {index} has invalid length {len}")]
    BadFrameLength {
        /// Index of the offending frame.
        index: u64,
        /// Its declared ciphertext length.
        len: u32,
    },
    /// A non-last frame carrying an empty chunk.
    #[error("envelope: frame {index} is an empty non-final chunk")]
    EmptyNonFinalChunk {
        /// Index of the offending frame.
        index: u64,
    },
    /// A chunk failed authentication (tampered, reordered, re-framed or wrong flag).
    #[error("envelope: decryption failed")]
    Decrypt,
    /// The input ended before the last frame.
    #[error("envelope: truncated (no last frame)")]
    Truncated,
    /// Bytes follow the last frame.
    #[error("envelope: trailing bytes after the last frame")]
    TrailingData,
    /// More than 2^32 chunks.
    #[error("envelope: too many chunks")]
    TooManyChunks,
    /// A streaming opener or sealer was used again after it failed or finished.
    #[error("envelope: stream already failed or finished")]
    Poisoned,

    // ---- key wrap (protocol §4) ----
    /// The X25519 exchange produced the all-zero secret (low-order point).
    #[error("wrap: non-contributory X25519 exchange (low-order public key)")]
    NonContributory,
    /// A wrapped key that is not 80 bytes long.
    #[error("wrap: wrapped key must be 80 bytes, got {0}")]
    BadWrappedLength(usize),
    /// The wrapped key failed authentication (wrong recipient or context, or tampered).
    #[error("wrap: unwrap failed")]
    Unwrap,

    // ---- keys and keyring ----
    /// A key, seed or X25519 value of the wrong length.
    #[error("{field}: expected 32 bytes, got {len}")]
    BadKeyLength {
        /// Which value was wrong.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// Text that should be hex is not, or has the wrong length.
    #[error("{field}: expected {expected} hex characters")]
    BadHex {
        /// Which value was wrong.
        field: &'static str,
        /// How many hex characters were expected.
        expected: usize,
    },
    /// The keyring has no such version.
    #[error("keyring: unknown key version {0}")]
    UnknownVersion(u32),
    /// The version is below `min_decrypt`.
    #[error("keyring: key version {0} is retired")]
    Retired(u32),
    /// The version's seed was destroyed.
    #[error("keyring: key version {0} was destroyed")]
    Destroyed(u32),
    /// A keyring operation that is not allowed in the current state.
    #[error("keyring: {0}")]
    KeyringState(String),
    /// The keyring document is malformed.
    #[error("keyring: malformed keyring: {0}")]
    KeyringFormat(String),
    /// Reading or writing the keyring file failed.
    #[error("keyring: {op} {path}: {source}")]
    KeyringIo {
        /// What was being done.
        op: &'static str,
        /// The file concerned.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The keyring file is readable or writable by other users.
    #[error(
        "keyring: {path} has mode {mode:o}; it must not be accessible to group or others (chmod 600)"
    )]
    KeyringPermissions {
        /// The file concerned.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The operating system's random number generator failed.
    #[error("random number generator failed")]
    Rng,
}

impl Error {
    /// A stable, machine-readable code for this error (snake_case).
    pub fn code(&self) -> &'static str {
        match self {
            Error::ShortHeader => "short_header",
            Error::BadMagic => "bad_magic",
            Error::UnsupportedFormat(_) => "unsupported_format",
            Error::BadScope(_) => "bad_scope",
            Error::ScopeTaskIdMismatch => "scope_task_id_mismatch",
            Error::BadPurpose(_) => "bad_purpose",
            Error::BadChunkExponent(_) => "bad_chunk_exponent",
            Error::WrongKey => "wrong_key",
            Error::BadFrameLength { .. } => "bad_frame_length",
            Error::EmptyNonFinalChunk { .. } => "empty_non_final_chunk",
            Error::Decrypt => "decrypt",
            Error::Truncated => "truncated",
            Error::TrailingData => "trailing_data",
            Error::TooManyChunks => "too_many_chunks",
            Error::Poisoned => "poisoned",
            Error::NonContributory => "non_contributory",
            Error::BadWrappedLength(_) => "bad_wrapped_length",
            Error::Unwrap => "unwrap",
            Error::BadKeyLength { .. } => "bad_key_length",
            Error::BadHex { .. } => "bad_hex",
            Error::UnknownVersion(_) => "unknown_key_version",
            Error::Retired(_) => "key_version_retired",
            Error::Destroyed(_) => "key_version_destroyed",
            Error::KeyringState(_) => "keyring_state",
            Error::KeyringFormat(_) => "keyring_format",
            Error::KeyringIo { .. } => "keyring_io",
            Error::KeyringPermissions { .. } => "keyring_permissions",
            Error::Rng => "rng",
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
