//! An in-process router on a loopback port and an in-process instant-engine miner, for the
//! `/api/v3` client and CLI tests.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use veil_api::miner::{ChatMessage, PromptPayload, TaskParams};
use veil_miner::{InstantEngine, WorkerHandle};
use veil_router::config::{Config, Settings};
use veil_testkit::files_under;

/// The model the test miner serves.
pub const MODEL: &str = "tiny";

/// A router serving on loopback and one miner working for it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub admin: String,
    pub engine: InstantEngine,
    pub miner_address: Address,
    miner: Option<WorkerHandle>,
    stop: Option<oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl Env {
    /// A router with embedded defaults in a temporary directory, and a miner.
    pub async fn start() -> Env {
        Self::start_with(None).await
    }

    /// The same, with blobs in `blobs` (e.g. an S3 store that presigns URLs).
    pub async fn start_with(blobs: Option<veil_blobstore::BlobStore>) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings {
            data_dir: Some(dir.path().to_path_buf()),
            lease_ttl_ms: Some(2_000),
            completion_timeout_ms: Some(30_000),
            shutdown_grace_ms: Some(500),
            ..Settings::default()
        };
        let cfg = Config::from_settings(settings).expect("valid test settings");
        let started = veil_router::server::prepare_with(cfg, blobs)
            .await
            .expect("router starts");
        let admin = started.admin_secret.clone().expect("first start");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(async move {
            let _ = veil_router::server::serve(started.state, listener, async move {
                let _ = rx.await;
            })
            .await;
        });
        let engine = InstantEngine::new([MODEL]).with_token_delay(Duration::from_millis(5));
        let wallet = PrivateKeySigner::random();
        let miner_address = wallet.address();
        let miner = veil_miner::Worker::builder()
            .router_url(&url)
            .wallet(wallet)
            .identity(veil_keys::X25519Secret::generate().expect("rng"))
            .engine(engine.clone())
            .concurrency(2)
            .lease_wait(Duration::from_secs(2))
            .heartbeat_interval(Duration::from_millis(300))
            .build()
            .expect("worker")
            .spawn();
        Env {
            dir,
            url,
            admin,
            engine,
            miner_address,
            miner: Some(miner),
            stop: Some(tx),
            join: Some(join),
        }
    }

    /// Where the router keeps its blobs.
    pub fn blob_dir(&self) -> PathBuf {
        self.dir.path().join("blobs")
    }

    /// A client of this router signing with `wallet`, with short retries.
    pub fn client(&self, wallet: &PrivateKeySigner) -> veil_sdk::Client {
        veil_sdk::Client::builder(&self.url)
            .signer(wallet.clone())
            .retries(2, Duration::from_millis(50))
            .completion_timeout(Duration::from_secs(60))
            .build()
            .expect("client")
    }

    /// The actions of the audit log, oldest first.
    pub async fn audit_actions(&self) -> Vec<String> {
        let r = reqwest::Client::new()
            .get(format!("{}/api/admin/audit?limit=1000", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("audit request");
        let v: Value = r.json().await.expect("audit JSON");
        let mut actions: Vec<String> = v["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["action"].as_str().unwrap_or_default().to_string())
            .collect();
        actions.reverse();
        actions
    }

    /// POSTs JSON with the admin key; returns status and body.
    pub async fn admin_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("{}{}", self.url, path))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .expect("admin request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Stops the miner and the router.
    pub async fn stop(mut self) {
        if let Some(m) = self.miner.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), m.shutdown()).await;
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), j).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(m) = self.miner.take() {
            m.kill();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// What the instant engine answers to one user message with these parameters.
pub fn expected(engine: &InstantEngine, content: &str, max_tokens: u32, seed: u64) -> String {
    expected_with(engine, content, max_tokens, seed, vec![])
}

/// The same, with one stop sequence sealed in the prompt.
pub fn expected_with_stop(
    engine: &InstantEngine,
    content: &str,
    max_tokens: u32,
    seed: u64,
    stop: &str,
) -> String {
    expected_with(engine, content, max_tokens, seed, vec![stop.to_string()])
}

fn expected_with(
    engine: &InstantEngine,
    content: &str,
    max_tokens: u32,
    seed: u64,
    stop: Vec<String>,
) -> String {
    let payload = PromptPayload {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
        }],
        prompt: None,
        stop,
    };
    let params = TaskParams {
        max_tokens: Some(max_tokens),
        seed: Some(seed),
        ..TaskParams::default()
    };
    engine.expected_text(&payload, &params).to_string()
}

/// The stored file whose SHA-256 is `hash` (lowercase hex).
pub fn file_with_hash(dir: &Path, hash: &str) -> Option<PathBuf> {
    files_under(dir).into_iter().find(|p| {
        std::fs::read(p)
            .map(|b| hex::encode(Sha256::digest(&b)) == hash)
            .unwrap_or(false)
    })
}

/// A blob store in a fresh bucket of the test S3 server (it presigns URLs), and the server.
pub fn s3_store() -> (
    veil_blobstore::BlobStore,
    std::sync::Arc<veil_testkit::S3Server>,
) {
    use veil_blobstore::{S3Config, S3Credentials, StoreConfig};
    let server = veil_testkit::S3Server::shared();
    let bucket = server.new_bucket("veil-sdk");
    let config = StoreConfig::s3(
        S3Config::new(bucket)
            .with_provider("moto")
            .with_endpoint(server.endpoint())
            .with_allow_http(true)
            .with_path_style(true)
            .with_region(veil_testkit::S3Server::REGION)
            .with_credentials(S3Credentials::new(
                server.access_key_id(),
                server.secret_access_key(),
            )),
    );
    let store = veil_blobstore::BlobStore::from_config(&config).expect("S3 store");
    (store, server)
}
