//! Test utilities shared by every Veil crate.
//!
//! Tests that need a real service start a throwaway instance of it (or take its address from the
//! environment) and never skip: if the service cannot be had, the test fails with a message that
//! says how to install it.
//!
//! * [`free_port`]: a TCP port on 127.0.0.1 that nothing listens on.
//! * [`unique_name`]: a lowercase name (bucket, database, …) unique to this run.
//! * [`S3Server`]: an S3-compatible server on loopback (`moto_server`, or the one named by
//!   `VEIL_TEST_S3_ENDPOINT`), with bucket creation and clean shutdown on drop.
//! * [`postgres`]: a fresh PostgreSQL database per test on the server named by
//!   `VEIL_TEST_DATABASE_URL` (async, with sqlx).
//! * [`files_under`] and [`contains`]: every file a test left in a directory, and whether some
//!   bytes hold a needle (for checks that a secret never reached a disk or a wire).
//!
//! Everything else here is synchronous `std` code, so it can be used from plain, async and
//! benchmark code alike.

pub mod postgres;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and releasing it, so another process could take it before
/// the caller binds it; the server spawners here retry on that (rare) race.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("cannot bind a TCP socket on 127.0.0.1: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("cannot read the address of a bound socket: {e}"))
        .port()
}

/// A name unique to this process and call, made of `[a-z0-9-]`, that starts with `prefix`.
///
/// Suitable as an S3 bucket name when `prefix` is short, lowercase and starts with a letter
/// (the result is at most `prefix.len() + 30` characters).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Every regular file under `dir`, recursively (none where `dir` cannot be read).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether `needle` (not empty) occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The files under `dir` whose bytes contain `needle`. A file that vanishes between the listing
/// and the read (a blob deleted by retention, SQLite's -wal/-shm files) holds nothing.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| contains(&b, needle)))
        .collect()
}

/// An S3-compatible server on loopback for tests.
///
/// [`S3Server::start`] uses the server named by the environment variable
/// [`S3Server::ENDPOINT_ENV`] (`VEIL_TEST_S3_ENDPOINT`, e.g. `http://127.0.0.1:9000`) when it is
/// set, and otherwise spawns `moto_server` (PyPI `moto[server]`) from `PATH` on a free port, waits
/// until it answers, and kills it when dropped. If `moto_server` is not installed it panics with
/// instructions: tests that need S3 fail, they never skip.
///
/// The server accepts any credentials; use [`S3Server::ACCESS_KEY_ID`],
/// [`S3Server::SECRET_ACCESS_KEY`] and [`S3Server::REGION`] (or, for an external server, the
/// values of `VEIL_TEST_S3_ACCESS_KEY_ID` / `VEIL_TEST_S3_SECRET_ACCESS_KEY`, see
/// [`S3Server::access_key_id`]). Clients must use path-style requests and allow plain HTTP.
#[derive(Debug)]
pub struct S3Server {
    endpoint: String,
    addr: SocketAddr,
    child: Option<Child>,
    log: Option<PathBuf>,
}

/// Buckets are created with an unsigned `PUT /bucket`, which moto and s3s-fs accept. An external
/// server that insists on signed requests (MinIO, AWS) needs `VEIL_TEST_S3_BUCKET` instead.
impl S3Server {
    /// Environment variable naming an already running S3-compatible server to use instead of
    /// spawning one, e.g. `http://127.0.0.1:9000`.
    pub const ENDPOINT_ENV: &'static str = "VEIL_TEST_S3_ENDPOINT";
    /// Environment variable naming an existing bucket on the external server; when it is set,
    /// [`S3Server::new_bucket`] hands out that bucket instead of creating one.
    pub const BUCKET_ENV: &'static str = "VEIL_TEST_S3_BUCKET";
    /// Access key id for the spawned server (it accepts any).
    pub const ACCESS_KEY_ID: &'static str = "veil-test";
    /// Secret access key for the spawned server (it accepts any).
    pub const SECRET_ACCESS_KEY: &'static str = "veil-test-secret";
    /// Region to configure clients with.
    pub const REGION: &'static str = "us-east-1";

    /// Uses `VEIL_TEST_S3_ENDPOINT` or spawns `moto_server`; panics with a clear message when
    /// neither works.
    pub fn start() -> Self {
        match std::env::var(Self::ENDPOINT_ENV) {
            Ok(endpoint) if !endpoint.trim().is_empty() => Self::external(endpoint.trim()),
            _ => Self::spawn_moto(),
        }
    }

    /// One server shared by all tests of this process that hold the returned `Arc`.
    ///
    /// The server is started on first use and stopped when the last holder drops it (a later
    /// call starts a new one), so no process outlives the tests. Tests should each work in their
    /// own bucket ([`S3Server::new_bucket`]).
    pub fn shared() -> Arc<Self> {
        static SHARED: Mutex<Weak<S3Server>> = Mutex::new(Weak::new());
        let mut slot = SHARED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(Self::start());
        *slot = Arc::downgrade(&server);
        server
    }

    /// The endpoint URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether this server was spawned here (as opposed to taken from the environment).
    pub fn is_spawned(&self) -> bool {
        self.child.is_some()
    }

    /// The access key id clients should use.
    pub fn access_key_id(&self) -> String {
        self.credential("VEIL_TEST_S3_ACCESS_KEY_ID", Self::ACCESS_KEY_ID)
    }

    /// The secret access key clients should use.
    pub fn secret_access_key(&self) -> String {
        self.credential("VEIL_TEST_S3_SECRET_ACCESS_KEY", Self::SECRET_ACCESS_KEY)
    }

    fn credential(&self, var: &str, default: &str) -> String {
        if self.is_spawned() {
            return default.to_owned();
        }
        std::env::var(var).unwrap_or_else(|_| default.to_owned())
    }

    /// Creates `bucket` with an unsigned `PUT /bucket`; panics if the server refuses.
    pub fn create_bucket(&self, bucket: &str) {
        let status = http_request(self.addr, "PUT", &format!("/{bucket}")).unwrap_or_else(|e| {
            panic!(
                "S3 server at {}: creating bucket {bucket}: {e}",
                self.endpoint
            )
        });
        assert!(
            (200..300).contains(&status),
            "S3 server at {} refused to create bucket {bucket}: HTTP {status} \
             (a server that wants signed requests needs {} set to an existing bucket)",
            self.endpoint,
            Self::BUCKET_ENV,
        );
    }

    /// A fresh, empty bucket for one test, named after `prefix` (lowercase, starting with a
    /// letter, at most 30 characters); or the bucket named by `VEIL_TEST_S3_BUCKET` when an
    /// external server is in use and that variable is set.
    pub fn new_bucket(&self, prefix: &str) -> String {
        if !self.is_spawned()
            && let Ok(bucket) = std::env::var(Self::BUCKET_ENV)
            && !bucket.trim().is_empty()
        {
            return bucket.trim().to_owned();
        }
        let bucket = unique_name(prefix);
        self.create_bucket(&bucket);
        bucket
    }

    fn external(endpoint: &str) -> Self {
        let authority = endpoint
            .strip_prefix("http://")
            .unwrap_or_else(|| {
                panic!(
                    "{} must be an http:// URL, got {endpoint:?}",
                    Self::ENDPOINT_ENV
                )
            })
            .trim_end_matches('/');
        let addr = authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("{}: cannot resolve {authority:?}", Self::ENDPOINT_ENV));
        if let Err(e) = http_request(addr, "GET", "/") {
            panic!(
                "{} = {endpoint}: no S3-compatible server answers there: {e}",
                Self::ENDPOINT_ENV
            );
        }
        Self {
            endpoint: format!("http://{authority}"),
            addr,
            child: None,
            log: None,
        }
    }

    fn spawn_moto() -> Self {
        const ATTEMPTS: usize = 3;
        let mut last_failure = String::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let log_path = std::env::temp_dir().join(format!("{}.log", unique_name("moto")));
            let log = File::create(&log_path).unwrap_or_else(|e| {
                panic!(
                    "cannot create the moto_server log file {}: {e}",
                    log_path.display()
                )
            });
            let log_err = log
                .try_clone()
                .unwrap_or_else(|e| panic!("cannot duplicate a file handle: {e}"));
            let spawned = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let _ = std::fs::remove_file(&log_path);
                    panic!(
                        "moto_server was not found on PATH. The S3 tests need an S3-compatible \
                         server and never skip: install one with `pip install 'moto[server]'` \
                         (Python 3), or point {} at a running S3-compatible server \
                         (e.g. http://127.0.0.1:9000).",
                        Self::ENDPOINT_ENV
                    );
                }
                Err(e) => panic!("cannot spawn moto_server: {e}"),
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut server = Self {
                endpoint: format!("http://127.0.0.1:{port}"),
                addr,
                child: Some(child),
                log: Some(log_path),
            };
            match server.wait_ready(Duration::from_secs(60)) {
                Ok(()) => return server,
                Err(failure) => last_failure = failure, // dropping `server` kills it
            }
        }
        panic!("moto_server did not start after {ATTEMPTS} attempts: {last_failure}");
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "it exited with {status}; log:\n{}",
                    self.log_tail()
                ));
            }
            if http_request(self.addr, "GET", "/").is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "it did not answer on {} within {timeout:?}; log:\n{}",
                    self.endpoint,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_owned()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(log) = self.log.take() {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// Sends one bodyless HTTP/1.1 request and returns the response status.
///
/// Hand-rolled on purpose: this crate needs exactly one unauthenticated request with no body,
/// and an HTTP client crate would add an async runtime or TLS stack to every crate's tests.
fn http_request(addr: SocketAddr, method: &str, path: &str) -> io::Result<u16> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    // Drain the rest so the server is not cut off mid-response.
    let _ = io::copy(&mut stream, &mut io::sink());
    let _ = stream.shutdown(Shutdown::Both);
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).expect("port was free");
    }

    #[test]
    fn unique_names_differ_and_are_bucket_safe() {
        let a = unique_name("veil");
        let b = unique_name("veil");
        assert_ne!(a, b);
        for name in [a, b] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
                "{name}"
            );
        }
    }

    #[test]
    fn s3_server_starts_creates_buckets_and_stops() {
        let server = S3Server::start();
        let bucket = server.new_bucket("testkit");
        // Creating the bucket a second time is answered (moto says 200 or 409), proving it exists.
        let status = http_request(server.addr, "GET", &format!("/{bucket}")).expect("GET bucket");
        assert_eq!(status, 200, "bucket listing");
        let missing = http_request(server.addr, "GET", "/no-such-bucket-here").expect("GET");
        assert_eq!(missing, 404, "a missing bucket is not found");
        if server.is_spawned() {
            let addr = server.addr;
            drop(server);
            assert!(
                http_request(addr, "GET", "/").is_err(),
                "server stopped on drop"
            );
        }
    }

    #[test]
    fn shared_server_is_reused_while_held() {
        let a = S3Server::shared();
        let b = S3Server::shared();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
