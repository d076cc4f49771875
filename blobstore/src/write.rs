//! Streaming (multipart) writes in bounded memory.

use std::fmt;
use std::mem;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, PutPayloadMut, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::{BlobRef, BlobStore, PREAMBLE_LEN, check_sealed_start};
use crate::urn::Urn;

/// Writes one sealed blob from pieces, in bounded memory; from [`BlobStore::writer`].
///
/// * The envelope header (and first frame length) is checked as soon as the first 112 bytes
///   arrive; nothing is sent before that, and bytes that are not a sealed blob are refused with
///   [`Error::NotSealed`].
/// * Up to [`BlobStore::part_size`] bytes are buffered. A blob that ends within that is written
///   with one atomic create-if-absent put on [`finish`](Self::finish). Beyond it a multipart
///   upload starts, with at most [`BlobStore::upload_concurrency`] parts in flight, so memory
///   stays at about `(upload_concurrency + 1) * part_size` whatever the blob's size.
/// * SHA-256 and size are computed on the way; [`finish`](Self::finish) returns the
///   [`BlobRef`].
/// * On any error the upload is aborted (uploaded parts are discarded and nothing becomes
///   visible) and the writer refuses further use ([`Error::WriterFailed`]). Dropping an
///   unfinished writer also aborts, on the current Tokio runtime.
///
/// Multipart uploads cannot be conditional, so a multipart blob relies on its fresh UUIDv7 name
/// (74 random bits plus a millisecond timestamp) never to collide, where a single put is
/// refused outright if the name exists.
///
/// ```
/// # async fn demo(store: veil_blobstore::BlobStore, key: veil_keys::SecretKey,
/// #              params: veil_keys::BlobParams) -> Result<(), Box<dyn std::error::Error>> {
/// let mut sealer = veil_keys::Sealer::new(&key, &params)?;
/// let mut writer = store.writer();
/// let mut out = Vec::new();
/// for piece in [b"streamed ".as_slice(), b"plaintext"] {
///     sealer.update(piece, &mut out)?;
///     writer.write(&out).await?;
///     out.clear();
/// }
/// sealer.finish(&mut out)?;
/// writer.write(&out).await?;
/// let blob_ref = writer.finish().await?;
/// # let _ = blob_ref; Ok(()) }
/// ```
pub struct BlobWriter {
    store: BlobStore,
    state: State,
    hasher: Sha256,
    size: u64,
}

enum State {
    /// At most the part size so far: everything is still in memory.
    Buffering {
        buf: PutPayloadMut,
        /// The first bytes, until the preamble is complete and checked.
        start: Vec<u8>,
        target: Option<(Urn, Path)>,
    },
    /// A multipart upload is under way.
    Uploading { urn: Urn, upload: WriteMultipart },
    /// Failed (upload aborted) or finished.
    Closed,
}

/// A piece of blob, borrowed or shared.
enum Piece<'a> {
    Slice(&'a [u8]),
    Shared(Bytes),
}

impl Piece<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Slice(s) => s,
            Piece::Shared(b) => b,
        }
    }
}

/// Block size for coalescing small copied writes.
const BLOCK_SIZE: usize = 64 * 1024;

impl fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (state, urn) = match &self.state {
            State::Buffering { target, .. } => ("buffering", target.as_ref().map(|t| &t.0)),
            State::Uploading { urn, .. } => ("uploading", Some(urn)),
            State::Closed => ("closed", None),
        };
        f.debug_struct("BlobWriter")
            .field("store", self.store.id())
            .field("state", &state)
            .field("urn", &urn)
            .field("size", &self.size)
            .finish()
    }
}

impl BlobWriter {
    pub(crate) fn new(store: BlobStore) -> Self {
        Self {
            store,
            state: State::Buffering {
                buf: PutPayloadMut::new().with_block_size(BLOCK_SIZE),
                start: Vec::with_capacity(PREAMBLE_LEN),
                target: None,
            },
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// The URN the blob will have, once its header has been seen.
    pub fn urn(&self) -> Option<&Urn> {
        match &self.state {
            State::Buffering { target, .. } => target.as_ref().map(|t| &t.0),
            State::Uploading { urn, .. } => Some(urn),
            State::Closed => None,
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends bytes (copied). Waits while the upload is at its concurrency limit.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.write_piece(Piece::Slice(data)).await
    }

    /// Appends bytes without copying them. Waits while the upload is at its concurrency limit.
    pub async fn write_bytes(&mut self, data: Bytes) -> Result<()> {
        self.write_piece(Piece::Shared(data)).await
    }

    async fn write_piece(&mut self, data: Piece<'_>) -> Result<()> {
        self.check_open()?;
        if data.as_slice().is_empty() {
            return Ok(());
        }
        match self.push(data).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.fail().await;
                Err(e)
            }
        }
    }

    /// Completes the upload and returns the blob's reference.
    pub async fn finish(mut self) -> Result<BlobRef> {
        self.check_open()?;
        let hasher = mem::take(&mut self.hasher);
        let size = self.size;
        let urn = match mem::replace(&mut self.state, State::Closed) {
            State::Buffering { buf, start, target } => {
                let Some((urn, path)) = target else {
                    // Fewer than PREAMBLE_LEN bytes in all: refused, with the reason.
                    check_sealed_start(&start)?;
                    return Err(Error::NotSealed {
                        source: veil_keys::Error::Truncated,
                    });
                };
                self.store.put_create(&urn, &path, buf.into()).await?;
                urn
            }
            State::Uploading { urn, upload } => {
                // `finish` aborts the upload itself when completing fails.
                upload
                    .finish()
                    .await
                    .map_err(|e| Error::backend("multipart", &urn, e))?;
                urn
            }
            State::Closed => return Err(Error::WriterFailed),
        };
        Ok(BlobRef {
            urn,
            sha256: hasher.finalize().into(),
            size,
        })
    }

    /// Abandons the blob: aborts a multipart upload under way (discarding uploaded parts).
    pub async fn abort(mut self) -> Result<()> {
        match mem::replace(&mut self.state, State::Closed) {
            State::Uploading { urn, upload } => upload
                .abort()
                .await
                .map_err(|e| Error::backend("multipart", &urn, e)),
            _ => Ok(()),
        }
    }

    fn check_open(&self) -> Result<()> {
        match self.state {
            State::Closed => Err(Error::WriterFailed),
            _ => Ok(()),
        }
    }

    async fn push(&mut self, data: Piece<'_>) -> Result<()> {
        self.hasher.update(data.as_slice());
        self.size += data.as_slice().len() as u64;
        let concurrency = self.store.upload_concurrency();
        match &mut self.state {
            State::Uploading { urn, upload } => {
                match data {
                    Piece::Slice(s) => upload.write(s),
                    Piece::Shared(b) => upload.put(b),
                }
                upload
                    .wait_for_capacity(concurrency)
                    .await
                    .map_err(|e| Error::backend("multipart", urn, e))
            }
            State::Buffering { buf, start, target } => {
                if target.is_none() {
                    let want = PREAMBLE_LEN - start.len();
                    let piece = data.as_slice();
                    start.extend_from_slice(&piece[..want.min(piece.len())]);
                    if start.len() == PREAMBLE_LEN {
                        let header = check_sealed_start(start)?;
                        *target = Some(self.store.new_location(&header)?);
                    }
                }
                match data {
                    Piece::Slice(s) => buf.extend_from_slice(s),
                    Piece::Shared(b) => buf.push(b),
                }
                if buf.content_length() <= self.store.part_size() {
                    return Ok(());
                }
                // Past the part size: switch to a multipart upload.
                let Some((urn, path)) = target.take() else {
                    unreachable!("the part size is larger than the preamble");
                };
                let buffered: PutPayload = mem::take(buf).into();
                let upload = self
                    .store
                    .object_store()
                    .put_multipart(&path)
                    .await
                    .map_err(|e| Error::backend("multipart", &urn, e))?;
                let mut upload =
                    WriteMultipart::new_with_chunk_size(upload, self.store.part_size());
                for piece in buffered {
                    upload.put(piece);
                }
                let waited = upload.wait_for_capacity(concurrency).await;
                // Even on failure the state must hold the upload, so that `fail` aborts it.
                self.state = State::Uploading {
                    urn: urn.clone(),
                    upload,
                };
                waited.map_err(|e| Error::backend("multipart", &urn, e))
            }
            State::Closed => Err(Error::WriterFailed),
        }
    }

    /// Aborts whatever is under way and closes the writer.
    async fn fail(&mut self) {
        if let State::Uploading { upload, .. } = mem::replace(&mut self.state, State::Closed) {
            // The error that brought us here is the one reported.
            let _ = upload.abort().await;
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let State::Uploading { upload, .. } = mem::replace(&mut self.state, State::Closed)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}
