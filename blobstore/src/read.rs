//! Streaming reads: hash-checked byte streams and authenticated plaintext streams.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};
use object_store::{GetResult, GetResultPayload};
use sha2::{Digest, Sha256};
use veil_keys::{Opener, Plaintext, SecretKey};

use crate::error::{Error, Result};
use crate::urn::Urn;

/// Read size for blobs on the local filesystem (`object_store` would read 8 KiB at a time).
const FILE_READ_CHUNK: usize = 256 * 1024;

/// A blob's bytes as they arrive, hashed on the way; from [`BlobStore::get_stream`].
///
/// **Unverified until it ends.** After the last data item the stream either ends (the blob
/// matched the expected SHA-256) or yields one final `Err` ([`Error::HashMismatch`] or a
/// transport error) and then ends. Do not act on the data before seeing the end.
///
/// Memory use is bounded by one read chunk (256 KiB on the filesystem, the HTTP body chunk
/// size on cloud stores), whatever the blob's size.
///
/// [`BlobStore::get_stream`]: crate::BlobStore::get_stream
pub struct BlobStream {
    urn: Urn,
    size: u64,
    expected: [u8; 32],
    inner: BoxStream<'static, Result<Bytes>>,
    hasher: Sha256,
    seen: u64,
    done: bool,
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("urn", &self.urn)
            .field("size", &self.size)
            .field("seen", &self.seen)
            .field("done", &self.done)
            .finish()
    }
}

impl BlobStream {
    pub(crate) fn new(urn: Urn, expected: [u8; 32], result: GetResult) -> Self {
        let size = result.meta.size;
        let inner = match result.payload {
            GetResultPayload::File(file, _path) => file_stream(file, result.range.start, size),
            GetResultPayload::Stream(stream) => {
                let store_urn = urn.clone();
                stream
                    .map(move |item| item.map_err(|e| Error::backend("get", &store_urn, e)))
                    .boxed()
            }
        };
        Self {
            urn,
            size,
            expected,
            inner,
            hasher: Sha256::new(),
            seen: 0,
            done: false,
        }
    }

    /// The blob's URN.
    pub fn urn(&self) -> &Urn {
        &self.urn
    }

    /// The size the store reports for the blob (not yet verified).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes delivered so far.
    pub fn bytes_read(&self) -> u64 {
        self.seen
    }

    fn finish_with(&mut self, item: Option<Result<Bytes>>) -> Poll<Option<Result<Bytes>>> {
        self.done = true;
        Poll::Ready(item)
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => {
                self.hasher.update(&bytes);
                self.seen += bytes.len() as u64;
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => self.finish_with(Some(Err(e))),
            Poll::Ready(None) => {
                let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
                if digest == self.expected && self.seen == self.size {
                    self.finish_with(None)
                } else {
                    let urn = self.urn.clone();
                    self.finish_with(Some(Err(Error::HashMismatch { urn })))
                }
            }
        }
    }
}

/// Reads `len` bytes of `file` from `offset` in [`FILE_READ_CHUNK`] pieces on the blocking pool.
fn file_stream(file: File, offset: u64, len: u64) -> BoxStream<'static, Result<Bytes>> {
    let io_err = move |e: std::io::Error| Error::Backend {
        op: "get",
        source: object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        },
    };
    let join_err = |e: tokio::task::JoinError| Error::Backend {
        op: "get",
        source: object_store::Error::JoinError { source: e },
    };
    futures::stream::try_unfold(
        (Some(file), offset, len),
        move |(file, pos, remaining)| async move {
            let Some(mut file) = file else {
                return Ok(None);
            };
            if remaining == 0 {
                return Ok(None);
            }
            let want = remaining.min(FILE_READ_CHUNK as u64) as usize;
            let (file, buf) = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                file.seek(SeekFrom::Start(pos))?;
                let mut filled = 0;
                while filled < want {
                    match file.read(&mut buf[filled..])? {
                        0 => break, // shorter than the store said: the hash check catches it
                        n => filled += n,
                    }
                }
                buf.truncate(filled);
                Ok::<_, std::io::Error>((file, buf))
            })
            .await
            .map_err(join_err)?
            .map_err(io_err)?;
            if buf.is_empty() {
                return Ok(None);
            }
            let n = buf.len() as u64;
            Ok(Some((
                Bytes::from(buf),
                (Some(file), pos + n, remaining - n),
            )))
        },
    )
    .boxed()
}

/// Authenticated plaintext of a blob, chunk by chunk; from [`BlobStore::open_stream`].
///
/// Each item is one chunk's plaintext (in a buffer wiped on drop), released only after that
/// chunk authenticated. The blob's final chunk is held back until the whole blob has also
/// matched its expected SHA-256, so a stream that ends without an error has delivered the
/// complete, verified plaintext. Any failure ends the stream with one `Err`:
/// [`Error::Open`] (wrong key, tampered or truncated envelope), [`Error::HashMismatch`], or a
/// transport error. Memory use is bounded by one envelope chunk plus one read chunk.
///
/// [`BlobStore::open_stream`]: crate::BlobStore::open_stream
pub struct OpenedStream {
    blob: BlobStream,
    opener: Option<Opener>,
    ready: VecDeque<Plaintext>,
    held_last: Option<Plaintext>,
    done: bool,
}

impl fmt::Debug for OpenedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedStream")
            .field("blob", &self.blob)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl OpenedStream {
    pub(crate) fn new(blob: BlobStream, key: &SecretKey) -> Self {
        Self {
            blob,
            opener: Some(Opener::new(key)),
            ready: VecDeque::new(),
            held_last: None,
            done: false,
        }
    }

    /// The blob's URN.
    pub fn urn(&self) -> &Urn {
        self.blob.urn()
    }

    /// The envelope header, once it has been read and matched the key.
    pub fn header(&self) -> Option<&veil_keys::Header> {
        self.opener.as_ref().and_then(Opener::header)
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Plaintext>>> {
        self.done = true;
        self.ready.clear();
        self.held_last = None;
        self.opener = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Stream for OpenedStream {
    type Item = Result<Plaintext>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(chunk) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.blob.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => {
                    let this = &mut *self;
                    let Some(opener) = this.opener.as_mut() else {
                        return Poll::Ready(None);
                    };
                    match opener.push(&bytes) {
                        Ok(chunks) => {
                            this.ready.extend(chunks);
                            if opener.is_complete() && this.held_last.is_none() {
                                this.held_last = this.ready.pop_back();
                            }
                        }
                        Err(source) => {
                            let urn = this.blob.urn().clone();
                            return this.fail(Error::Open { urn, source });
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => return self.fail(e),
                Poll::Ready(None) => {
                    // The bytes matched the expected hash; the envelope must also be complete.
                    let finished = self.opener.take().map(Opener::finish);
                    match finished {
                        Some(Ok(_header)) => {
                            self.done = true;
                            return Poll::Ready(self.held_last.take().map(Ok));
                        }
                        Some(Err(source)) => {
                            let urn = self.blob.urn().clone();
                            return self.fail(Error::Open { urn, source });
                        }
                        None => return Poll::Ready(None),
                    }
                }
            }
        }
    }
}
