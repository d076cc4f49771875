//! Group durability for a local filesystem store.
//!
//! A put into a local directory is durable once the file's bytes, its inode and the directory
//! entries leading to it are on stable storage. Flushing them one put at a time costs a file
//! `fsync` and one or two directory `fsync`s per blob, each a cache flush of the device, and
//! under load those flushes are most of what a put costs. Here ([`Flushed`]), writes put and
//! rename their files without flushing and then wait for one `syncfs(2)` of the whole
//! filesystem that started after their rename: whoever finds no flush running starts one for
//! everybody who is waiting at that moment, and the writes that arrive meanwhile share the
//! next one. A write still returns only once it is durable, or with the flush's error.
//!
//! `syncfs` reports write-back errors only since Linux 5.8, so the grouping is used only on
//! Linux 5.8 or later; elsewhere the object store flushes each write itself (see
//! [`supported`]).

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};

/// One flush of everything written so far (`syncfs` on the store's directory, or a stand-in in
/// tests).
pub(crate) type FlushFn = dyn Fn() -> io::Result<()> + Send + Sync + 'static;

/// Puts waiting for the same flush.
#[derive(Default)]
struct Batch {
    /// Set once the flush covering this batch has ended.
    result: OnceLock<Result<(), Arc<io::Error>>>,
}

/// Flushes shared by concurrent puts.
pub(crate) struct GroupSync {
    flush: Arc<FlushFn>,
    /// The batch new waiters join; replaced when a flush for it starts.
    open: Mutex<Arc<Batch>>,
    /// Held while a flush runs (one at a time).
    running: tokio::sync::Mutex<()>,
    /// Flushes started, for tests and statistics.
    flushes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for GroupSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSync")
            .field("flushes", &self.flushes())
            .finish_non_exhaustive()
    }
}

impl GroupSync {
    /// Groups calls to `flush`.
    pub(crate) fn new(flush: Arc<FlushFn>) -> Self {
        Self {
            flush,
            open: Mutex::default(),
            running: tokio::sync::Mutex::new(()),
            flushes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Flushes of the filesystem holding `dir`, grouped.
    #[cfg(target_os = "linux")]
    pub(crate) fn syncfs(dir: &std::path::Path) -> io::Result<Self> {
        let dir = std::fs::File::open(dir)?;
        Ok(Self::new(Arc::new(move || {
            rustix::fs::syncfs(&dir).map_err(io::Error::from)
        })))
    }

    /// Flushes started so far.
    pub(crate) fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns once everything this caller wrote before the call is durable: after a flush
    /// that started after the call, or with that flush's error.
    pub(crate) async fn sync(&self) -> io::Result<()> {
        let batch = Arc::clone(&self.lock_open());
        let _running = self.running.lock().await;
        // A flush that covered this batch ran while we waited for our turn.
        if let Some(r) = batch.result.get() {
            return unshare(r);
        }
        // Close the batch (later callers wait for the next flush). It may be closed already
        // if the caller that closed it gave up before its flush ended: flush anyway, the flush
        // starting now covers everything written before this call.
        {
            let mut open = self.lock_open();
            if Arc::ptr_eq(&open, &batch) {
                *open = Arc::new(Batch::default());
            }
        }
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let flush = Arc::clone(&self.flush);
        // On a blocking thread: a flush waits for the device. If this caller is dropped the
        // flush still ends, and the waiters of the batch run their own.
        let r = match tokio::task::spawn_blocking(move || flush()).await {
            Ok(r) => r.map_err(Arc::new),
            Err(e) => Err(Arc::new(io::Error::other(format!(
                "flush task failed: {e}"
            )))),
        };
        let _ = batch.result.set(r.clone());
        unshare(&r)
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, Arc<Batch>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `fs` (which must not flush on its own) whose writes return once a grouped flush of the
/// filesystem holding `root` has made them durable, and the flusher.
#[cfg(target_os = "linux")]
pub(crate) fn flushed(
    fs: LocalFileSystem,
    root: &std::path::Path,
) -> io::Result<(Arc<dyn ObjectStore>, Arc<GroupSync>)> {
    let sync = Arc::new(GroupSync::syncfs(root)?);
    let store = Flushed {
        inner: fs.with_fsync(false),
        sync: Arc::clone(&sync),
    };
    Ok((Arc::new(store), sync))
}

/// Never called where flushes are not grouped ([`supported`] is false there).
#[cfg(not(target_os = "linux"))]
pub(crate) fn flushed(
    _fs: LocalFileSystem,
    _root: &std::path::Path,
) -> io::Result<(Arc<dyn ObjectStore>, Arc<GroupSync>)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "grouped flushes need Linux 5.8 or later",
    ))
}

/// A local filesystem whose writes (puts, completed multipart uploads, copies, renames)
/// return once durable, by flushes shared with concurrent writes.
#[derive(Debug)]
pub(crate) struct Flushed {
    inner: LocalFileSystem,
    sync: Arc<GroupSync>,
}

impl std::fmt::Display for Flushed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (grouped flushes)", self.inner)
    }
}

/// Waits for a flush covering what was just written at `location`.
async fn flush(sync: &GroupSync, location: &Path) -> object_store::Result<()> {
    sync.sync().await.map_err(|e| object_store::Error::Generic {
        store: "LocalFileSystem",
        source: format!("flushing {location} to disk: {e}").into(),
    })
}

#[async_trait]
impl ObjectStore for Flushed {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let r = self.inner.put_opts(location, payload, opts).await?;
        flush(&self.sync, location).await?;
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FlushedUpload {
            inner,
            sync: Arc::clone(&self.sync),
            location: location.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<bytes::Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        flush(&self.sync, to).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await?;
        flush(&self.sync, to).await
    }
}

/// A multipart upload that returns from `complete` once the object is durable.
#[derive(Debug)]
struct FlushedUpload {
    inner: Box<dyn MultipartUpload>,
    sync: Arc<GroupSync>,
    location: Path,
}

#[async_trait]
impl MultipartUpload for FlushedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let r = self.inner.complete().await?;
        flush(&self.sync, &self.location).await?;
        Ok(r)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

/// A shared result, as this caller's own (the error keeps its kind and message).
fn unshare(r: &Result<(), Arc<io::Error>>) -> io::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

/// Whether grouped flushes are durable here: Linux 5.8 or later, where `syncfs` reports the
/// write-back errors of the filesystem (earlier kernels return success regardless).
pub(crate) fn supported() -> bool {
    #[cfg(target_os = "linux")]
    {
        let uname = rustix::system::uname();
        kernel_at_least(&uname.release().to_string_lossy(), (5, 8))
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Whether a kernel release string (`6.1.0-18-amd64`) is at least `min` (major, minor).
fn kernel_at_least(release: &str, min: (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= min,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("5.8.0", (5, 8)));
        assert!(kernel_at_least("6.1.0-18-amd64", (5, 8)));
        assert!(kernel_at_least(
            "5.10.102.1-microsoft-standard-WSL2",
            (5, 8)
        ));
        assert!(!kernel_at_least("5.4.0-150-generic", (5, 8)));
        assert!(!kernel_at_least("4.19.0", (5, 8)));
        assert!(!kernel_at_least("", (5, 8)));
        assert!(!kernel_at_least("garbage", (5, 8)));
    }

    /// A flush that blocks until the test lets it end, one message per flush.
    fn gated(results: Vec<io::Result<()>>) -> (Arc<GroupSync>, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        let results = Mutex::new(results.into_iter());
        let flush = move || {
            rx.lock()
                .unwrap()
                .recv()
                .expect("the test lets the flush end");
            results.lock().unwrap().next().unwrap_or(Ok(()))
        };
        (Arc::new(GroupSync::new(Arc::new(flush))), tx)
    }

    /// A caller of `g.sync()` on a task of its own.
    fn spawn_sync(g: &Arc<GroupSync>) -> tokio::task::JoinHandle<io::Result<()>> {
        let g = Arc::clone(g);
        tokio::spawn(async move { g.sync().await })
    }

    async fn until(what: impl Fn() -> bool) {
        for _ in 0..2000 {
            if what() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("condition not reached");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_that_arrive_during_a_flush_share_the_next_one() {
        let (g, gate) = gated(vec![]);
        let first = spawn_sync(&g);
        until(|| g.flushes() == 1).await;
        // Nine more arrive while the first flush runs: none of them is covered by it.
        let done = Arc::new(AtomicUsize::new(0));
        let mut rest = vec![];
        for _ in 0..9 {
            let (g, done) = (Arc::clone(&g), Arc::clone(&done));
            rest.push(tokio::spawn(async move {
                let r = g.sync().await;
                done.fetch_add(1, Ordering::SeqCst);
                r
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "nobody returns before a flush ends"
        );
        gate.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "the first flush started before the others called: it does not cover them"
        );
        until(|| g.flushes() == 2).await;
        gate.send(()).unwrap();
        for r in rest {
            r.await.unwrap().unwrap();
        }
        assert_eq!(g.flushes(), 2, "nine waiters, one flush");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_fails_everyone_it_covered_and_the_next_one_is_tried_afresh() {
        let (g, gate) = gated(vec![Ok(()), Err(io::Error::other("device gone")), Ok(())]);
        let first = spawn_sync(&g);
        until(|| g.flushes() == 1).await;
        let mut covered = vec![];
        for _ in 0..3 {
            covered.push(spawn_sync(&g));
        }
        // Let the three join the open batch before the first flush ends.
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.send(()).unwrap();
        first.await.unwrap().unwrap();
        until(|| g.flushes() == 2).await;
        gate.send(()).unwrap();
        for r in covered {
            let e = r.await.unwrap().unwrap_err();
            assert!(e.to_string().contains("device gone"), "{e}");
        }
        let later = spawn_sync(&g);
        until(|| g.flushes() == 3).await;
        gate.send(()).unwrap();
        later.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_flush_themselves_when_the_caller_flushing_for_them_gives_up() {
        let (g, gate) = gated(vec![]);
        let first = spawn_sync(&g);
        until(|| g.flushes() == 1).await;
        let second = spawn_sync(&g);
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.send(()).unwrap();
        first.await.unwrap().unwrap();
        // The second caller closes its batch and starts the second flush; a third joins the
        // next batch, and the second caller is then dropped mid-flush.
        until(|| g.flushes() == 2).await;
        let third = spawn_sync(&g);
        tokio::time::sleep(Duration::from_millis(50)).await;
        second.abort();
        let _ = second.await;
        gate.send(()).unwrap();
        // The third one's batch was never flushed: it runs its own flush.
        until(|| g.flushes() == 3).await;
        gate.send(()).unwrap();
        third.await.unwrap().unwrap();
    }
}
