#![doc = include_str!("../README.md")]

mod config;
mod durable;
mod error;
mod read;
mod store;
mod urn;
mod write;

pub use config::{
    AzureConfig, Backend, DEFAULT_AZURE_PROVIDER, DEFAULT_FS_BUCKET, DEFAULT_GCS_PROVIDER,
    DEFAULT_MAX_GET_SIZE, DEFAULT_MEM_BUCKET, DEFAULT_PART_SIZE, DEFAULT_S3_PROVIDER,
    DEFAULT_UPLOAD_CONCURRENCY, GcsConfig, LOCAL_PROVIDER, MAX_PART_SIZE, MAX_UPLOAD_CONCURRENCY,
    MIN_CLOUD_PART_SIZE, MIN_LOCAL_PART_SIZE, S3Config, S3Credentials, StoreConfig,
};
pub use error::{Error, Result};
pub use read::{BlobStream, OpenedStream};
pub use store::{BlobMeta, BlobName, BlobRef, BlobStore, MAX_PRESIGN_TTL, PresignMethod, StoreId};
pub use urn::{
    MAX_FILE_NAME_LEN, MAX_NAME_LEN, MAX_SEGMENT_LEN, StorageType, URN_PREFIX, Urn, UrnComponent,
    UrnParts, UrnVersion,
};
pub use write::BlobWriter;

/// The `object_store` crate this store is built on, for callers that bring their own
/// implementation ([`BlobStore::with_object_store`]).
pub use object_store;
