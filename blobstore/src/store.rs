//! [`BlobStore`]: sealed blobs on an object store, addressed by URN, checked by SHA-256.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use object_store::path::Path;
use object_store::signer::{Method, Signer};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;
use uuid::Uuid;
use veil_keys::{FRAME_LEN_LEN, HEADER_LEN, Header, KeyId, Purpose, SecretKey, TAG_LEN};

use crate::config::StoreConfig;
use crate::durable::GroupSync;
use crate::error::{Error, Result};
use crate::read::{BlobStream, OpenedStream};
use crate::urn::{StorageType, Urn, check_bucket, check_provider};
use crate::write::BlobWriter;

/// Bytes a blob must have before its header and first frame length can be checked.
pub(crate) const PREAMBLE_LEN: usize = HEADER_LEN + FRAME_LEN_LEN;

/// Longest lifetime of a presigned URL: 7 days, the S3 (SigV4) and GCS limit.
pub const MAX_PRESIGN_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// What a presigned URL ([`BlobStore::presign`]) lets its holder do with one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PresignMethod {
    /// Upload the object with an HTTP `PUT` of its bytes.
    Put,
    /// Download the object with an HTTP `GET`.
    Get,
}

impl PresignMethod {
    fn http(self) -> Method {
        match self {
            Self::Put => Method::PUT,
            Self::Get => Method::GET,
        }
    }
}

/// Which store a URN points into: storage type, provider and bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreId {
    /// Kind of storage.
    pub storage_type: StorageType,
    /// Provider name.
    pub provider: String,
    /// Bucket name.
    pub bucket: String,
}

impl StoreId {
    /// A store id, checked against the URN rules for provider and bucket.
    pub fn new(
        storage_type: StorageType,
        provider: impl Into<String>,
        bucket: impl Into<String>,
    ) -> Result<Self> {
        let (provider, bucket) = (provider.into(), bucket.into());
        check_provider(&provider)?;
        check_bucket(&bucket)?;
        Ok(Self {
            storage_type,
            provider,
            bucket,
        })
    }

    /// Whether `urn` points into this store.
    pub fn owns(&self, urn: &Urn) -> bool {
        urn.storage_type() == self.storage_type
            && urn.provider() == self.provider
            && urn.bucket() == self.bucket
    }

    /// The URN of `file_name` in this store.
    pub fn urn(&self, file_name: impl Into<String>) -> Result<Urn> {
        Urn::new(
            self.storage_type,
            self.provider.clone(),
            self.bucket.clone(),
            file_name,
        )
    }
}

impl fmt::Display for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.storage_type, self.provider, self.bucket)
    }
}

/// A reference to a stored blob: where it is, what it must hash to, and its size.
///
/// Serializes as `{"urn":"urn:blob:v1:…","sha256":"<64 lowercase hex>","size":123}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// Where the blob is.
    pub urn: Urn,
    /// SHA-256 of the whole blob (header and frames).
    #[serde(with = "hex32")]
    pub sha256: [u8; 32],
    /// Size of the blob in bytes.
    pub size: u64,
}

impl BlobRef {
    /// The hash as lowercase hex (its text form in the protocol).
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text.len() != 64 || text.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(D::Error::custom(
                "sha256 must be 64 lowercase hex characters",
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.as_bytes(), &mut out)
            .map_err(|_| D::Error::custom("sha256 must be 64 lowercase hex characters"))?;
        Ok(out)
    }
}

/// What [`BlobStore::head`] reports about a stored blob (without reading or checking it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    /// The blob's URN.
    pub urn: Urn,
    /// Stored size in bytes.
    pub size: u64,
    /// When the object was written.
    pub last_modified: SystemTime,
}

/// What a blob's name says about it, for names this store gives
/// (`{prefix/}{session_id}/{task_id | session}/{purpose}-{uuid v7}.veil`, see
/// [`BlobStore::fresh_urn_for`]); read back with [`BlobStore::name_of`]. A name says where a
/// blob was meant to belong; only its header (and the hash its referrer holds) says what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlobName {
    /// The session in the name.
    pub session_id: Uuid,
    /// The task in the name; `None` for a session-scope blob.
    pub task_id: Option<Uuid>,
    /// The purpose in the name.
    pub purpose: Purpose,
}

/// Sealed blobs on an object store.
///
/// * Writes accept only bytes that start with a valid v1 envelope header (protocol §3), so
///   nothing unsealed is stored by mistake, and never overwrite: each blob gets a fresh name
///   `{prefix/}{session_id}/{task_id | session}/{purpose}-{uuid v7}.veil`.
/// * Reads check that the URN belongs to this store and that the bytes hash to the SHA-256 the
///   caller expects; a mismatch is an error and yields no bytes.
///
/// Cheap to clone (an `Arc` inside); all methods take `&self` and can run concurrently.
/// Streaming puts need a Tokio runtime (parts upload on spawned tasks).
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    /// The same client as `store`, as a URL signer (S3, GCS, Azure opened from a configuration).
    signer: Option<Arc<dyn Signer>>,
    id: StoreId,
    prefix: Option<String>,
    part_size: usize,
    upload_concurrency: usize,
    max_get_size: u64,
    /// Where the object store's writes are flushed in groups (a local directory, see
    /// `durable`), its flusher, for [`BlobStore::grouped_flushes`].
    flushes: Option<Arc<GroupSync>>,
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStore")
            .field("id", &self.inner.id)
            .field("prefix", &self.inner.prefix)
            .field("store", &format_args!("{}", self.inner.store))
            .field("can_presign", &self.can_presign())
            .field("part_size", &self.inner.part_size)
            .field("upload_concurrency", &self.inner.upload_concurrency)
            .field("max_get_size", &self.inner.max_get_size)
            .field("grouped_flushes", &self.inner.flushes.is_some())
            .finish()
    }
}

impl BlobStore {
    /// Opens the store `config` describes. A filesystem store's directory is created; nothing
    /// touches the network (the first request does).
    pub fn from_config(config: &StoreConfig) -> Result<Self> {
        let (store, signer, flushes) = config.build_object_store()?;
        Self::build(config, store, signer, flushes)
    }

    /// Opens the store a URL describes ([`StoreConfig::from_url`]).
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_config(&StoreConfig::from_url(url)?)
    }

    /// A fresh, empty in-memory store (`urn:blob:v1:mem:local:mem:…`).
    pub fn memory() -> Self {
        Self::with_object_store(
            &StoreConfig::memory(),
            Arc::new(object_store::memory::InMemory::new()),
        )
        .expect("the default memory configuration is valid")
    }

    /// Uses `store` (any `object_store` implementation, e.g. one wrapped for metrics or
    /// throttling) with the URN identity and tuning of `config`; `config.backend` only supplies
    /// the storage type, provider and bucket. Such a store cannot presign URLs.
    pub fn with_object_store(config: &StoreConfig, store: Arc<dyn ObjectStore>) -> Result<Self> {
        Self::build(config, store, None, None)
    }

    fn build(
        config: &StoreConfig,
        store: Arc<dyn ObjectStore>,
        signer: Option<Arc<dyn Signer>>,
        flushes: Option<Arc<GroupSync>>,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                signer,
                id: config.store_id(),
                prefix: config.prefix.clone(),
                part_size: config.part_size,
                upload_concurrency: config.upload_concurrency,
                max_get_size: config.max_get_size,
                flushes,
            }),
        })
    }

    /// Storage type, provider and bucket of this store's URNs.
    pub fn id(&self) -> &StoreId {
        &self.inner.id
    }

    /// The underlying object store (for administration; writes through it bypass every check).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// Multipart part size; blobs up to this size are written with one conditional put.
    pub fn part_size(&self) -> usize {
        self.inner.part_size
    }

    /// Parts in flight at once during a streaming put.
    pub fn upload_concurrency(&self) -> usize {
        self.inner.upload_concurrency
    }

    /// Largest blob [`BlobStore::get`] reads into memory.
    pub fn max_get_size(&self) -> u64 {
        self.inner.max_get_size
    }

    /// Whether `urn` points into this store.
    pub fn owns(&self, urn: &Urn) -> bool {
        self.inner.id.owns(urn)
    }

    /// Stores a sealed blob held in memory and returns its reference.
    ///
    /// Refuses ([`Error::NotSealed`]) bytes that do not start with a valid v1 envelope header
    /// and a plausible first frame length. Blobs up to [`part_size`](Self::part_size) are written
    /// with one atomic create-if-absent put; larger ones go through a multipart upload (see
    /// [`BlobStore::writer`]).
    pub async fn put(&self, blob: impl Into<Bytes>) -> Result<BlobRef> {
        let blob: Bytes = blob.into();
        if blob.len() > self.inner.part_size {
            let mut writer = self.writer();
            writer.write_bytes(blob).await?;
            return writer.finish().await;
        }
        let header = check_sealed_start(&blob)?;
        let (urn, path) = self.new_location(&header)?;
        let sha256: [u8; 32] = Sha256::digest(&blob).into();
        let size = blob.len() as u64;
        self.put_create(&urn, &path, PutPayload::from_bytes(blob))
            .await?;
        Ok(BlobRef { urn, sha256, size })
    }

    /// A writer for a blob streamed in pieces, in bounded memory (about
    /// `(upload_concurrency + 1) * part_size`). See [`BlobWriter`].
    pub fn writer(&self) -> BlobWriter {
        BlobWriter::new(self.clone())
    }

    /// Stores a sealed blob from a stream of byte chunks, in bounded memory.
    ///
    /// If the stream yields an error the upload is aborted and [`Error::Source`] returned.
    /// To upload from an `AsyncRead`, wrap it in `tokio_util::io::ReaderStream`.
    pub async fn put_stream<S, E>(&self, stream: S) -> Result<BlobRef>
    where
        S: Stream<Item = std::result::Result<Bytes, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    {
        let mut stream = std::pin::pin!(stream);
        let mut writer = self.writer();
        while let Some(item) = stream.next().await {
            match item {
                Ok(bytes) => writer.write_bytes(bytes).await?,
                Err(e) => {
                    // The caller's error is the one to report; an abort failure is secondary.
                    let _ = writer.abort().await;
                    return Err(Error::Source { source: e.into() });
                }
            }
        }
        writer.finish().await
    }

    /// Starts reading the object behind `urn` (which must belong to this store).
    async fn fetch(&self, urn: &Urn) -> Result<object_store::GetResult> {
        let path = self.path_of(urn)?;
        self.inner
            .store
            .get(&path)
            .await
            .map_err(|e| Error::backend("get", urn, e))
    }

    /// Reads a whole blob and checks it against `expected_sha256`.
    ///
    /// Errors: [`Error::ForeignUrn`] if the URN names another store, [`Error::NotFound`],
    /// [`Error::TooLarge`] above [`max_get_size`](Self::max_get_size), [`Error::HashMismatch`]
    /// (and no bytes) if the stored bytes are not the expected ones.
    pub async fn get(&self, urn: &Urn, expected_sha256: &[u8; 32]) -> Result<Bytes> {
        let result = self.fetch(urn).await?;
        let size = result.meta.size;
        if size > self.inner.max_get_size {
            return Err(Error::TooLarge {
                urn: urn.clone(),
                size,
                limit: self.inner.max_get_size,
            });
        }
        let bytes = result
            .bytes()
            .await
            .map_err(|e| Error::backend("get", urn, e))?;
        let actual: [u8; 32] = Sha256::digest(&bytes).into();
        if actual != *expected_sha256 {
            return Err(Error::HashMismatch { urn: urn.clone() });
        }
        Ok(bytes)
    }

    /// Streams a blob in bounded memory, hashing it on the way.
    ///
    /// **The data is unverified until the stream ends.** The stream yields the stored bytes as
    /// they arrive; after the last of them it either ends (`None`: everything matched
    /// `expected_sha256`) or yields one final `Err` ([`Error::HashMismatch`], or a transport
    /// error) and then ends. Callers must not act on, forward or persist what they received
    /// before they have seen the end without an error. To get plaintext, prefer
    /// [`BlobStore::open_stream`], which only releases authenticated chunks.
    ///
    /// Errors before any byte flows ([`Error::ForeignUrn`], [`Error::NotFound`], …) are
    /// returned directly.
    pub async fn get_stream(&self, urn: &Urn, expected_sha256: &[u8; 32]) -> Result<BlobStream> {
        let result = self.fetch(urn).await?;
        Ok(BlobStream::new(urn.clone(), *expected_sha256, result))
    }

    /// Streams a blob and opens it with `key` (`K_session` or `K_task`, as the blob's scope
    /// says): yields plaintext chunks, each only after it authenticated (AES-256-GCM under the
    /// blob's committed key), and holds back the final chunk until the whole blob has also
    /// matched `expected_sha256`. A stream that ends without an error has therefore delivered
    /// the complete, verified plaintext; any failure (wrong key, tampering, truncation, hash
    /// mismatch) is one final `Err` after which nothing more is released.
    pub async fn open_stream(
        &self,
        urn: &Urn,
        expected_sha256: &[u8; 32],
        key: &SecretKey,
    ) -> Result<OpenedStream> {
        let blob = self.get_stream(urn, expected_sha256).await?;
        Ok(OpenedStream::new(blob, key))
    }

    /// Size and modification time of a stored blob (its bytes are neither read nor checked).
    pub async fn head(&self, urn: &Urn) -> Result<BlobMeta> {
        let path = self.path_of(urn)?;
        let meta = self
            .inner
            .store
            .head(&path)
            .await
            .map_err(|e| Error::backend("head", urn, e))?;
        Ok(BlobMeta {
            urn: urn.clone(),
            size: meta.size,
            last_modified: meta.last_modified.into(),
        })
    }

    /// Deletes a blob. Idempotent: deleting a blob that does not exist (any more) succeeds, so
    /// retries and concurrent cleanups are safe. A URN of another store is still refused.
    pub async fn delete(&self, urn: &Urn) -> Result<()> {
        let path = self.path_of(urn)?;
        match self.inner.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::backend("delete", urn, e)),
        }
    }

    /// Whether this store can sign URLs ([`BlobStore::presign`]): true for S3, GCS and Azure
    /// stores opened from a configuration, false for memory and filesystem stores and for stores
    /// opened with [`BlobStore::with_object_store`].
    pub fn can_presign(&self) -> bool {
        self.inner.signer.is_some()
    }

    /// A fresh URN in this store for a blob uploaded by someone else (e.g. through a presigned
    /// `PUT` URL): `{prefix/}{uuid v7}.veil`, a UUIDv7 file name under the configured prefix,
    /// like the names [`put`](Self::put) gives (74 random bits keep them from colliding).
    /// Nothing is written.
    pub fn fresh_urn(&self) -> Result<Urn> {
        self.urn_under_prefix(format!("{}.veil", Uuid::now_v7().hyphenated()))
    }

    /// A fresh URN laid out exactly as [`put`](Self::put) names a blob sealed under `key` for
    /// `purpose`: `{prefix/}{session_id}/{task_id | session}/{purpose}-{uuid v7}.veil`.
    /// Nothing is written.
    pub fn fresh_urn_for(&self, key: &KeyId, purpose: Purpose) -> Result<Urn> {
        let task = key
            .task_id
            .map_or_else(|| "session".to_owned(), |t| t.hyphenated().to_string());
        self.urn_under_prefix(format!(
            "{}/{task}/{purpose}-{}.veil",
            key.session_id.hyphenated(),
            Uuid::now_v7().hyphenated()
        ))
    }

    /// What the name of `urn` says (session, task, purpose) when it is laid out as this store
    /// names blobs, under its prefix; `None` for a URN of another store or any other name.
    /// Strict: ids must be lowercase hyphenated UUIDs, as [`fresh_urn_for`](Self::fresh_urn_for)
    /// writes them.
    pub fn name_of(&self, urn: &Urn) -> Option<BlobName> {
        if !self.owns(urn) {
            return None;
        }
        let mut rest = urn.file_name();
        if let Some(prefix) = &self.inner.prefix {
            rest = rest.strip_prefix(prefix.as_str())?.strip_prefix('/')?;
        }
        let mut parts = rest.split('/');
        let (session, task, file) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let strict_uuid = |text: &str| {
            let id = Uuid::try_parse(text).ok()?;
            (id.hyphenated().to_string() == text).then_some(id)
        };
        let session_id = strict_uuid(session)?;
        let task_id = match task {
            "session" => None,
            other => Some(strict_uuid(other)?),
        };
        let (purpose, id) = file.strip_suffix(".veil")?.split_once('-')?;
        strict_uuid(id)?;
        Some(BlobName {
            session_id,
            task_id,
            purpose: purpose.parse().ok()?,
        })
    }

    /// Every object under this store's prefix whose name is a valid URN file name, with its
    /// size and modification time, in no particular order. Objects are listed page by page as
    /// the stream is read (on S3, GCS and Azure one request per page of about 1,000), so memory
    /// stays bounded whatever the store's size. Uploads in progress are not listed (a local
    /// store's staging files, multipart uploads not yet completed). Names that cannot be URNs
    /// (no object this store writes has one) are skipped.
    pub fn list(&self) -> impl Stream<Item = Result<BlobMeta>> + Send + 'static {
        let prefix = self.inner.prefix.as_deref().map(Path::from);
        let id = self.inner.id.clone();
        self.inner
            .store
            .list(prefix.as_ref())
            .filter_map(move |item| {
                let out = match item {
                    Ok(meta) => id.urn(meta.location.as_ref()).ok().map(|urn| {
                        Ok(BlobMeta {
                            urn,
                            size: meta.size,
                            last_modified: meta.last_modified.into(),
                        })
                    }),
                    Err(e) => Some(Err(Error::Backend {
                        op: "list",
                        source: e,
                    })),
                };
                std::future::ready(out)
            })
    }

    fn urn_under_prefix(&self, name: String) -> Result<Urn> {
        let file_name = match &self.inner.prefix {
            Some(prefix) => format!("{prefix}/{name}"),
            None => name,
        };
        self.inner.id.urn(file_name)
    }

    /// A URL that lets its holder `PUT` (upload) or `GET` (download) exactly the object of
    /// `urn`, and nothing else, for `ttl` (1 s up to [`MAX_PRESIGN_TTL`], 7 days). The object
    /// path signed is the one [`get`](Self::get) and [`put`](Self::put) use for that URN.
    /// Signing is local (no request is made), except where credentials must first be fetched.
    ///
    /// An upload through such a URL bypasses this store's checks: the bytes are not checked to
    /// be a sealed blob, and an existing object is not protected from being overwritten while
    /// the URL is valid. Presign `PUT`s only for fresh URNs ([`fresh_urn`](Self::fresh_urn)),
    /// and check what arrived (e.g. [`get`](Self::get) or [`get_stream`](Self::get_stream)
    /// with the hash the uploader claims) before relying on it. On Azure the uploader must also
    /// send `x-ms-blob-type: BlockBlob`.
    ///
    /// Errors: [`Error::PresignUnsupported`] on a store that cannot sign
    /// ([`can_presign`](Self::can_presign) is false), [`Error::InvalidTtl`],
    /// [`Error::ForeignUrn`] for a URN of another store, [`Error::Backend`] (`presign`) if
    /// signing fails.
    pub async fn presign(&self, method: PresignMethod, urn: &Urn, ttl: Duration) -> Result<Url> {
        let Some(signer) = &self.inner.signer else {
            return Err(Error::PresignUnsupported {
                store: self.inner.id.clone(),
            });
        };
        check_presign_ttl(ttl)?;
        let path = self.path_of(urn)?;
        signer
            .signed_url(method.http(), &path, ttl)
            .await
            .map_err(|e| Error::backend("presign", urn, e))
    }

    /// Checks that `urn` is this store's and maps it to an object path.
    fn path_of(&self, urn: &Urn) -> Result<Path> {
        if !self.owns(urn) {
            return Err(Error::ForeignUrn {
                urn: urn.clone(),
                store: self.inner.id.clone(),
            });
        }
        // A URN file name is always a valid object path (a strict subset of its rules).
        Path::parse(urn.file_name()).map_err(|e| Error::Backend {
            op: "path",
            source: e.into(),
        })
    }

    /// A fresh URN and object path for a blob with this header.
    pub(crate) fn new_location(&self, header: &Header) -> Result<(Urn, Path)> {
        let urn = self.fresh_urn_for(&header.key, header.purpose)?;
        let path = self.path_of(&urn)?;
        Ok((urn, path))
    }

    /// One atomic create-if-absent put.
    pub(crate) async fn put_create(
        &self,
        urn: &Urn,
        path: &Path,
        payload: PutPayload,
    ) -> Result<()> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.inner.store.put_opts(path, payload, opts).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::Precondition { .. }) => {
                Err(Error::AlreadyExists { urn: urn.clone() })
            }
            Err(e) => Err(Error::backend("put", urn, e)),
        }
    }

    /// Flushes of the filesystem run so far for writes, where they are grouped (a local
    /// directory opened from a configuration with `fsync` and `group_fsync`, on Linux 5.8 or
    /// later); `None` where each write is flushed on its own, or not at all.
    pub fn grouped_flushes(&self) -> Option<u64> {
        self.inner.flushes.as_deref().map(GroupSync::flushes)
    }
}

/// Checks that a presigned URL lifetime is between 1 s and [`MAX_PRESIGN_TTL`].
fn check_presign_ttl(ttl: Duration) -> Result<()> {
    if ttl < Duration::from_secs(1) || ttl > MAX_PRESIGN_TTL {
        return Err(Error::InvalidTtl {
            ttl,
            max: MAX_PRESIGN_TTL,
        });
    }
    Ok(())
}

/// Checks that `start` (the first bytes of a blob, at least [`PREAMBLE_LEN`] of them unless the
/// blob is shorter) begins with a valid v1 header and a first frame length that the header
/// allows. Needs no key.
pub(crate) fn check_sealed_start(start: &[u8]) -> Result<Header> {
    let not_sealed = |source| Error::NotSealed { source };
    let header = Header::parse(start).map_err(not_sealed)?;
    let Some(word) = start.get(HEADER_LEN..PREAMBLE_LEN) else {
        return Err(not_sealed(veil_keys::Error::Truncated));
    };
    let word = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
    let last = word >> 31 == 1;
    let len = word & 0x7fff_ffff;
    let max = header.chunk_size() + TAG_LEN;
    if (len as usize) < TAG_LEN || len as usize > max {
        return Err(not_sealed(veil_keys::Error::BadFrameLength {
            index: 0,
            len,
        }));
    }
    if !last && len as usize == TAG_LEN {
        return Err(not_sealed(veil_keys::Error::EmptyNonFinalChunk {
            index: 0,
        }));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_refs_serialize_with_hex_hashes() {
        let r = BlobRef {
            urn: "urn:blob:v1:mem:local:mem:a/b.veil".parse().unwrap(),
            sha256: [0xab; 32],
            size: 128,
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "urn": "urn:blob:v1:mem:local:mem:a/b.veil",
                "sha256": "ab".repeat(32),
                "size": 128
            })
        );
        assert_eq!(r.sha256_hex(), "ab".repeat(32));
        assert_eq!(serde_json::from_value::<BlobRef>(json).unwrap(), r);
        for bad in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
            let v =
                serde_json::json!({"urn": "urn:blob:v1:mem:local:mem:a", "sha256": bad, "size": 1});
            assert!(serde_json::from_value::<BlobRef>(v).is_err());
        }
    }

    #[test]
    fn store_ids_own_their_urns_only() {
        let id = StoreId::new(StorageType::S3, "minio", "veil").unwrap();
        assert_eq!(id.to_string(), "s3:minio:veil");
        let urn = id.urn("x/y").unwrap();
        assert_eq!(urn.to_string(), "urn:blob:v1:s3:minio:veil:x/y");
        assert!(id.owns(&urn));
        for other in [
            "urn:blob:v1:gcs:minio:veil:x/y",
            "urn:blob:v1:s3:aws:veil:x/y",
            "urn:blob:v1:s3:minio:veil2:x/y",
        ] {
            assert!(!id.owns(&other.parse().unwrap()), "{other}");
        }
        assert!(StoreId::new(StorageType::S3, "MinIO", "veil").is_err());
        assert!(StoreId::new(StorageType::S3, "minio", "").is_err());
    }

    #[test]
    fn presign_ttls_are_bounded_to_seven_days() {
        for ok in [
            Duration::from_secs(1),
            Duration::from_secs(3600),
            MAX_PRESIGN_TTL,
        ] {
            check_presign_ttl(ok).unwrap();
        }
        for bad in [
            Duration::ZERO,
            Duration::from_millis(999),
            MAX_PRESIGN_TTL + Duration::from_secs(1),
            Duration::from_secs(30 * 24 * 3600),
        ] {
            let err = check_presign_ttl(bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidTtl { ttl, max } if ttl == bad && max == MAX_PRESIGN_TTL),
                "{bad:?}: {err:?}"
            );
            assert_eq!(err.kind_code(), "invalid_ttl");
        }
        assert_eq!(MAX_PRESIGN_TTL.as_secs(), 604_800);
    }

    /// Signing with static credentials is local, so an S3 store on an unreachable endpoint can
    /// show what is signed: the URN's whole file name (prefix included), for the TTL asked.
    #[tokio::test]
    async fn s3_presigns_the_object_path_of_the_urn() {
        use crate::config::{S3Config, S3Credentials};
        let config = StoreConfig::s3(
            S3Config::new("bkt")
                .with_provider("minio")
                .with_region("us-east-1")
                .with_endpoint("http://127.0.0.1:1")
                .with_allow_http(true)
                .with_path_style(true)
                .with_credentials(S3Credentials::new("id", "secret")),
        )
        .with_prefix("tenant/a");
        let store = BlobStore::from_config(&config).unwrap();
        assert!(store.can_presign());
        let urn = store.fresh_urn().unwrap();
        assert!(urn.file_name().starts_with("tenant/a/"), "{urn}");
        assert!(store.owns(&urn));
        for (method, ttl) in [
            (PresignMethod::Put, Duration::from_secs(900)),
            (PresignMethod::Get, MAX_PRESIGN_TTL),
        ] {
            let url = store.presign(method, &urn, ttl).await.unwrap();
            assert_eq!(url.path(), format!("/bkt/{}", urn.file_name()));
            let expires = url
                .query_pairs()
                .find(|(k, _)| k == "X-Amz-Expires")
                .map(|(_, v)| v.into_owned());
            assert_eq!(expires, Some(ttl.as_secs().to_string()));
        }
        let err = store
            .presign(
                PresignMethod::Get,
                &urn,
                MAX_PRESIGN_TTL + Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind_code(), "invalid_ttl");
        let foreign: Urn = "urn:blob:v1:s3:minio:other:tenant/a/x.veil"
            .parse()
            .unwrap();
        let err = store
            .presign(PresignMethod::Get, &foreign, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(err.kind_code(), "foreign_urn");
        // A store given its object store directly has no signer.
        let plain = BlobStore::with_object_store(&config, store.object_store().clone()).unwrap();
        assert!(!plain.can_presign());
    }

    #[test]
    fn the_preamble_check_needs_no_key() {
        use veil_keys::{BlobParams, KeyId, Purpose};
        let key = SecretKey::from_bytes([1; 32]);
        let params = BlobParams::new(KeyId::session(1, Uuid::now_v7()), Purpose::Prompt);
        let blob = veil_keys::seal(&key, &params, b"hi").unwrap();
        let header = check_sealed_start(&blob).unwrap();
        assert_eq!(header.key, params.key);
        assert!(matches!(
            check_sealed_start(&blob[..HEADER_LEN]),
            Err(Error::NotSealed {
                source: veil_keys::Error::Truncated
            })
        ));
        assert!(matches!(
            check_sealed_start(&blob[..10]),
            Err(Error::NotSealed {
                source: veil_keys::Error::ShortHeader
            })
        ));
        // Default chunk exponent 16: a frame holds at most 2^16 + 16 = 65 552 bytes.
        assert_eq!(header.chunk_size(), 65_536);
        let mut too_long = blob.clone();
        too_long[HEADER_LEN..PREAMBLE_LEN].copy_from_slice(&(65_552u32 + 1).to_be_bytes());
        assert!(matches!(
            check_sealed_start(&too_long),
            Err(Error::NotSealed {
                source: veil_keys::Error::BadFrameLength {
                    index: 0,
                    len: 65_553
                }
            })
        ));
        let mut at_max = blob;
        at_max[HEADER_LEN..PREAMBLE_LEN].copy_from_slice(&65_552u32.to_be_bytes());
        check_sealed_start(&at_max).unwrap();
    }
}
