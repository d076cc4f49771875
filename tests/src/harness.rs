//! In-process routers and miners for end-to-end tests.

use std::time::Duration;

use alloy_signer_local::PrivateKeySigner;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use veil_router::AppState;
use veil_router::config::{Config, Settings};

/// Every regular file under a directory, and whether some bytes hold a needle (the canary
/// checks); they live in `veil-testkit`, shared with the crates' own tests.
pub use veil_testkit::{contains, files_containing, files_under};

/// A router serving on a loopback port in this process.
#[derive(Debug)]
pub struct TestRouter {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Admin API key (created on first start), if this start created one.
    pub admin: Option<String>,
    /// Its state (for direct store checks).
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl TestRouter {
    /// Starts a router with `settings` (a data dir is required for embedded defaults).
    pub async fn start(settings: Settings) -> TestRouter {
        Self::start_with(settings, None).await
    }

    /// Starts a router with a blob store built by the caller.
    pub async fn start_with(
        settings: Settings,
        blobs: Option<veil_blobstore::BlobStore>,
    ) -> TestRouter {
        let cfg = Config::from_settings(settings).expect("valid test settings");
        let started = veil_router::server::prepare_with(cfg, blobs)
            .await
            .expect("router starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let state = started.state.clone();
        let join = tokio::spawn(async move {
            let _ = veil_router::server::serve(started.state, listener, async move {
                let _ = rx.await;
            })
            .await;
        });
        TestRouter {
            url,
            admin: started.admin_secret,
            state,
            stop: Some(tx),
            join: Some(join),
        }
    }

    /// Embedded defaults under `dir`, with fast leases for tests.
    pub fn settings(dir: &std::path::Path) -> Settings {
        Settings {
            data_dir: Some(dir.to_path_buf()),
            lease_ttl_ms: Some(2_000),
            completion_timeout_ms: Some(30_000),
            shutdown_grace_ms: Some(1_000),
            ..Settings::default()
        }
    }

    /// Stops serving and waits for the server task.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), j).await;
        }
    }

    /// The admin key (panics when this start did not create one).
    pub fn admin(&self) -> &str {
        self.admin
            .as_deref()
            .expect("first start created an admin key")
    }

    /// POSTs JSON with a bearer key; returns status and JSON body.
    pub async fn post(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, key, path, Some(body))
            .await
    }

    /// PUTs JSON with a bearer key; returns status and JSON body.
    pub async fn put(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, key, path, Some(body)).await
    }

    /// GETs with a bearer key.
    pub async fn get(&self, key: &str, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, key, path, None).await
    }

    /// Sends a request with a bearer key and an optional JSON body; returns status and the body
    /// as JSON (or as a string when it is not JSON).
    async fn call(
        &self,
        method: reqwest::Method,
        key: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut req = http()
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(key);
        if let Some(body) = body {
            req = req.json(body);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a private session allowing `miners`; returns its id.
    pub async fn private_session(&self, key: &str, miners: &[String]) -> String {
        let (s, v) = self
            .post(
                key,
                "/api/v2/sessions",
                &json!({"private": true, "allowed_miners": miners}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().expect("id").to_string()
    }

    /// The audit log entries with `action`.
    pub async fn audit(&self, action: &str) -> Vec<Value> {
        let (s, v) = self.get(self.admin(), "/api/admin/audit?limit=1000").await;
        assert_eq!(s, 200, "{v}");
        v["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["action"] == action)
            .cloned()
            .collect()
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A shared HTTP client.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// A miner with a fresh wallet and identity running `engine` against `router_url`.
pub fn miner(
    router_url: &str,
    engine: veil_miner::InstantEngine,
) -> (veil_miner::WorkerHandle, String) {
    let wallet = PrivateKeySigner::random();
    let address = wallet.address().to_checksum(None);
    let identity = veil_keys::X25519Secret::generate().expect("rng");
    (miner_as(router_url, engine, wallet, identity), address)
}

/// A miner with the given wallet and X25519 identity running `engine` against `router_url`.
pub fn miner_as(
    router_url: &str,
    engine: veil_miner::InstantEngine,
    wallet: PrivateKeySigner,
    identity: veil_keys::X25519Secret,
) -> veil_miner::WorkerHandle {
    let worker = veil_miner::Worker::builder()
        .router_url(router_url)
        .wallet(wallet)
        .identity(identity)
        .engine(engine)
        .concurrency(4)
        .lease_wait(Duration::from_secs(2))
        .heartbeat_interval(Duration::from_millis(300))
        .build()
        .expect("worker");
    worker.spawn()
}

/// A fresh wallet address and signer.
pub fn wallet() -> (PrivateKeySigner, String) {
    let w = PrivateKeySigner::random();
    let a = w.address().to_checksum(None);
    (w, a)
}

/// Every log line of this test process at debug level, captured for canary checks: the first
/// call installs the capturing subscriber, later calls return the same buffer.
pub fn logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b2 = buf.clone();
        let make = move || Capture(b2.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(make)
            .with_ansi(false)
            .try_init();
        buf
    })
    .clone()
}

struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What `engine` answers to one user message `content` with these parameters (the instant
/// engine is deterministic), as a test expects it back.
pub fn expected_chat(
    engine: &veil_miner::InstantEngine,
    content: &str,
    max_tokens: u32,
    seed: u64,
    stream: bool,
) -> String {
    let prompt = veil_api::miner::PromptPayload {
        messages: vec![veil_api::miner::ChatMessage {
            role: "user".into(),
            content: content.into(),
        }],
        prompt: None,
        stop: vec![],
    };
    let params = veil_api::miner::TaskParams {
        max_tokens: Some(max_tokens),
        seed: Some(seed),
        stream,
        ..Default::default()
    };
    engine.expected_text(&prompt, &params).to_string()
}
