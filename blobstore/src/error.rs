//! The crate's one error type.

use std::time::Duration;

use crate::store::StoreId;
use crate::urn::{Urn, UrnComponent};

/// `Result` with this crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
///
/// Messages name URNs, sizes and configuration fields; they never contain blob bytes,
/// plaintext or credentials. [`Error::kind_code`] gives a stable machine code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A URN (or a URN component in a configuration) breaks protocol §5.
    #[error("invalid blob URN: {component} {reason}")]
    InvalidUrn {
        /// The component at fault.
        component: UrnComponent,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A store configuration (URL or struct) is unusable.
    #[error("invalid blob store configuration: {field}: {reason}")]
    InvalidConfig {
        /// The setting at fault (`url`, `part_size`, `s3.endpoint`, …).
        field: String,
        /// What is wrong with it (never a credential's value).
        reason: String,
    },

    /// `put` was given bytes that do not start with a valid v1 envelope header, so they are not a
    /// sealed blob and are not stored.
    #[error("refusing to store bytes that are not a sealed Veil v1 blob: {source}")]
    NotSealed {
        /// Why the header was refused.
        #[source]
        source: veil_keys::Error,
    },

    /// The URN names another store (storage type, provider or bucket differ).
    #[error("blob {urn} is not in this store ({store})")]
    ForeignUrn {
        /// The URN asked for.
        urn: Urn,
        /// This store.
        store: StoreId,
    },

    /// No blob at that URN.
    #[error("blob {urn} not found")]
    NotFound {
        /// The URN asked for.
        urn: Urn,
    },

    /// A blob already exists at that URN; blobs are never overwritten.
    #[error("blob {urn} already exists")]
    AlreadyExists {
        /// The URN written to.
        urn: Urn,
    },

    /// The stored bytes do not hash to the expected SHA-256: the blob was altered or the
    /// reference is wrong. No bytes are returned.
    #[error("blob {urn} does not match its expected SHA-256 hash")]
    HashMismatch {
        /// The URN read.
        urn: Urn,
    },

    /// A whole-buffer read of a blob larger than the store's `max_get_size`.
    #[error(
        "blob {urn} is {size} bytes, over the {limit}-byte limit for whole-buffer reads; stream it instead"
    )]
    TooLarge {
        /// The URN read.
        urn: Urn,
        /// Its stored size.
        size: u64,
        /// The configured limit.
        limit: u64,
    },

    /// Opening (authenticating and decrypting) a fetched blob failed.
    #[error("cannot open blob {urn}: {source}")]
    Open {
        /// The URN read.
        urn: Urn,
        /// The envelope error (opaque for AEAD failures).
        #[source]
        source: veil_keys::Error,
    },

    /// The caller's byte stream given to a streaming put failed; the upload was aborted.
    #[error("the blob source failed: {source}")]
    Source {
        /// The caller's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A [`BlobWriter`](crate::BlobWriter) was used after an earlier error aborted its upload.
    #[error("the blob upload was already aborted by an earlier error")]
    WriterFailed,

    /// This store cannot sign URLs: memory and filesystem stores, and stores opened with
    /// [`BlobStore::with_object_store`](crate::BlobStore::with_object_store).
    #[error("blob store {store} cannot presign URLs")]
    PresignUnsupported {
        /// This store.
        store: StoreId,
    },

    /// A presigned URL lifetime outside 1 s ..= [`MAX_PRESIGN_TTL`](crate::MAX_PRESIGN_TTL).
    #[error("a presigned URL lifetime of {ttl:?} is out of range (1s to {max:?})")]
    InvalidTtl {
        /// The lifetime asked for.
        ttl: Duration,
        /// The longest lifetime allowed.
        max: Duration,
    },

    /// The object store failed.
    #[error("blob store {op} failed: {source}")]
    Backend {
        /// The operation (`put`, `get`, `head`, `delete`, `list`, `multipart`, `build`, `presign`).
        op: &'static str,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },
}

impl Error {
    /// A stable snake_case machine code for the kind of error (for API error bodies and metrics).
    pub fn kind_code(&self) -> &'static str {
        match self {
            Self::InvalidUrn { .. } => "invalid_urn",
            Self::InvalidConfig { .. } => "invalid_config",
            Self::NotSealed { .. } => "not_sealed",
            Self::ForeignUrn { .. } => "foreign_urn",
            Self::NotFound { .. } => "not_found",
            Self::AlreadyExists { .. } => "already_exists",
            Self::HashMismatch { .. } => "hash_mismatch",
            Self::TooLarge { .. } => "too_large",
            Self::Open { .. } => "open_failed",
            Self::Source { .. } => "source_failed",
            Self::WriterFailed => "writer_failed",
            Self::PresignUnsupported { .. } => "presign_unsupported",
            Self::InvalidTtl { .. } => "invalid_ttl",
            Self::Backend { .. } => "backend",
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Maps an object store error for an operation on `urn`.
    pub(crate) fn backend(op: &'static str, urn: &Urn, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => Self::NotFound { urn: urn.clone() },
            object_store::Error::AlreadyExists { .. } => Self::AlreadyExists { urn: urn.clone() },
            source => Self::Backend { op, source },
        }
    }
}
