//! `/api/v3` end to end in-process: a simulated wallet client (signing with alloy, sealing with
//! veil-keys) and a simulated miner (the miner API driven by hand), against a router started with
//! a temporary data directory. The happy path runs on SQLite and on PostgreSQL; refusals are
//! checked for status, code and the field named.
//!
//! Every request the router receives goes through a recording layer, so the tests can show that
//! the prompt's plaintext (a canary string) never reaches the router, nor its data directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use alloy_signer_local::PrivateKeySigner;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use base64::Engine as _;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower::ServiceExt;
use uuid::Uuid;
use veil_api::Domain;
use veil_api::eip712::{
    KeyRequest, Message, MinerLogin, OpenSession, Signed, SubmitTask, TaskResult,
};
use veil_api::miner::{
    ChatMessage, CompleteRequest, Lease, LoginRequest, PromptPayload, ServedModel, Usage,
};
use veil_api::v3::{KeyResponse, OpenSessionResponse, PresignedUrl, StreamEvent, V3Config, V3Task};
use veil_api::wire::{Hex32, Nonce, unix_now};
use veil_blobstore::{BlobStore, S3Config, S3Credentials, StoreConfig};
use veil_keys::{BlobParams, KeyId, Purpose, SecretKey, X25519Secret};
use veil_router::config::{Config, Settings};
use veil_router::store::{AuditEntry, ReadTokenRecord, verify_audit_chain};
use veil_router::{AppState, server};
use veil_testkit::postgres::TestDatabase;
use veil_testkit::{S3Server, contains, files_under};

const MODEL: &str = "tiny-model";
/// Appears only inside the sealed prompt: never in anything the router receives or stores.
const CANARY: &str = "CANARY-7f3a9c-the-secret-prompt-text";
const RESULT_TEXT: &str = "The answer, streamed in pieces, is forty-two.";

// --- a router with a recording layer -----------------------------------------------------------

struct Env {
    dir: tempfile::TempDir,
    state: AppState,
    admin: String,
    /// Every request line, header and body the router received.
    seen: Arc<Mutex<Vec<u8>>>,
    /// Sign every message with eth-account (an independent wallet library) instead of alloy.
    eth_account: bool,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    bytes: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }
}

impl Env {
    async fn new() -> Env {
        Self::with(|_| {}).await
    }

    async fn with(f: impl FnOnce(&mut Settings)) -> Env {
        Self::with_blobs(f, None).await
    }

    async fn with_blobs(f: impl FnOnce(&mut Settings), blobs: Option<BlobStore>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings {
            data_dir: Some(dir.path().to_path_buf()),
            ..Settings::default()
        };
        f(&mut s);
        let started = server::prepare_with(Config::from_settings(s).unwrap(), blobs)
            .await
            .expect("router prepares");
        Env {
            dir,
            state: started.state,
            admin: started.admin_secret.expect("first start"),
            seen: Arc::default(),
            eth_account: false,
        }
    }

    fn domain(&self) -> Domain {
        self.state.cfg.domain
    }

    fn blob_dir(&self) -> PathBuf {
        self.dir.path().join("blobs")
    }

    fn app(&self) -> axum::Router {
        let seen = self.seen.clone();
        veil_router::app(self.state.clone()).layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let seen = seen.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    {
                        let mut seen = seen.lock().unwrap();
                        seen.extend_from_slice(
                            format!("{} {}\n", parts.method, parts.uri).as_bytes(),
                        );
                        for (k, v) in &parts.headers {
                            seen.extend_from_slice(k.as_str().as_bytes());
                            seen.extend_from_slice(v.as_bytes());
                        }
                    }
                    // Recorded as it streams, so that uploads keep their pieces.
                    let body = Body::from_stream(body.into_data_stream().inspect(move |c| {
                        if let Ok(b) = c {
                            seen.lock().unwrap().extend_from_slice(b);
                        }
                    }));
                    next.run(Request::from_parts(parts, body)).await
                }
            },
        ))
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: Body,
    ) -> axum::response::Response {
        let mut req = axum::http::Request::builder().method(method).uri(path);
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.app().oneshot(req.body(body).unwrap()).await.unwrap()
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Reply {
        let resp = self.send(method, path, bearer, headers, body).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            bytes,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (headers, body): (&[(&str, &str)], Body) = match body {
            Some(b) => (
                &[("content-type", "application/json")],
                Body::from(b.to_string()),
            ),
            None => (&[], Body::empty()),
        };
        let r = self.raw(method, path, bearer, headers, body).await;
        (r.status, r.json())
    }

    /// `method path` with `bearer`, answered 200: the JSON body.
    async fn ok(&self, method: &str, path: &str, bearer: &str, body: Option<Value>) -> Value {
        answer(
            self.call(method, path, Some(bearer), body).await,
            StatusCode::OK,
        )
    }

    /// `GET path` with an empty body, as it answers.
    async fn get(&self, path: &str, bearer: &str) -> Reply {
        self.raw("GET", path, Some(bearer), &[], Body::empty())
            .await
    }

    /// Files of the data directory that contain `needle`.
    fn files_containing(&self, needle: &[u8]) -> Vec<PathBuf> {
        veil_testkit::files_containing(self.dir.path(), needle)
    }

    fn received(&self, needle: &[u8]) -> bool {
        contains(&self.seen.lock().unwrap(), needle)
    }

    /// Whether the task's result counts as delivered.
    async fn delivered(&self, task: Uuid) -> bool {
        let t = self.state.store.get_task(task).await.unwrap();
        t.delivered_at_ms.is_some()
    }

    /// The audit entries of `action`, oldest first.
    async fn audited(&self, action: &str) -> Vec<AuditEntry> {
        let entries = self.state.store.audit_entries(0, 1000).await.unwrap();
        entries
            .into_iter()
            .filter(|e| e.entry.action == action)
            .collect()
    }

    /// How many blob files the data directory holds.
    fn blob_count(&self) -> usize {
        files_under(&self.blob_dir()).len()
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

fn param(v: &Value) -> &str {
    v["error"]["param"].as_str().unwrap_or_default()
}

/// The body of an answer that must have `status`, as a `T`.
#[track_caller]
fn answer<T: DeserializeOwned>((st, v): (StatusCode, Value), status: StatusCode) -> T {
    assert_eq!(st, status, "{v}");
    serde_json::from_value(v).unwrap()
}

/// Asserts a 400 `invalid_request`, whichever field it names.
#[track_caller]
fn invalid_request(got: &(StatusCode, Value)) {
    assert_eq!(
        (got.0, code(&got.1)),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{}",
        got.1
    );
}

/// Asserts a refusal's status, code and field.
#[track_caller]
fn refused(got: &(StatusCode, Value), status: StatusCode, want_code: &str, want_param: &str) {
    assert_eq!(
        (got.0, code(&got.1), param(&got.1)),
        (status, want_code, want_param),
        "{}",
        got.1
    );
}

fn sign<M: Message>(env: &Env, m: M, wallet: &PrivateKeySigner) -> Signed<M> {
    if env.eth_account {
        return eth_account_sign(m, &env.domain(), wallet);
    }
    Signed::sign_sync(m, &env.domain(), wallet).unwrap()
}

/// `m` signed by eth-account from PyPI (the script of veil-api's EIP-712 compatibility test,
/// which transcribes the §6 types from the spec), with `wallet`'s private key.
fn eth_account_sign<M: Message>(m: M, domain: &Domain, wallet: &PrivateKeySigner) -> Signed<M> {
    use std::io::Write as _;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/tests/eth_account/sign_verify.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let request = json!({"cases": [{
        "primaryType": M::NAME,
        "domain": {"chainId": domain.chain_id, "verifyingContract": domain.verifying_contract.to_checksum(None)},
        "message": m,
        "privateKey": format!("0x{}", hex::encode(wallet.to_bytes())),
    }]});
    let mut child = std::process::Command::new(&python)
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{python} must run (scripts/test.sh installs eth-account): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "eth-account signing failed (scripts/test.sh installs eth-account): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["results"][0];
    assert_eq!(r["address"], wallet.address().to_checksum(None));
    serde_json::from_value(json!({"message": m, "signature": r["signature"]})).unwrap()
}

fn soon() -> u64 {
    unix_now() + 120
}

/// An expiry already past and one too far ahead, with the codes they are refused with.
fn bad_expiries() -> [(u64, &'static str); 2] {
    [
        (unix_now() - 1, "signature_expired"),
        (unix_now() + 3600, "signature_expiry_too_far"),
    ]
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

// --- a simulated wallet client -----------------------------------------------------------------

struct Client {
    wallet: PrivateKeySigner,
    x: X25519Secret,
    session: Uuid,
    token: String,
}

impl Client {
    fn address(&self) -> String {
        self.wallet.address().to_checksum(None)
    }

    fn recipient(&self) -> Hex32 {
        recipient(&self.x)
    }
}

/// The `recipient` field for an X25519 key.
fn recipient(x: &X25519Secret) -> Hex32 {
    Hex32(*x.public().as_bytes())
}

fn open_msg(session: Uuid) -> OpenSession {
    OpenSession {
        session_id: session,
        kind: 1,
        expires_at: soon(),
        nonce: Nonce::random(),
    }
}

async fn open(env: &Env, miners: &[String]) -> Client {
    let wallet = PrivateKeySigner::random();
    let session = Uuid::now_v7();
    let body = json!({"open": sign(env, open_msg(session), &wallet), "allowed_miners": miners});
    let got = env.call("POST", "/api/v3/sessions", None, Some(body)).await;
    let r: OpenSessionResponse = answer(got, StatusCode::CREATED);
    assert_eq!(r.session.session_id, session);
    assert_eq!(r.session.owner, wallet.address().to_checksum(None));
    assert!(r.token.token.starts_with("vst_"));
    let now = unix_now();
    assert!(r.token.expires_at > now && r.token.expires_at <= now + 3600);
    Client {
        wallet,
        x: X25519Secret::generate().unwrap(),
        session,
        token: r.token.token,
    }
}

/// `POST /api/v3/sessions` of `m`, signed by `wallet`.
async fn open_signed(env: &Env, m: OpenSession, wallet: &PrivateKeySigner) -> (StatusCode, Value) {
    let body = json!({"open": sign(env, m, wallet)});
    env.call("POST", "/api/v3/sessions", None, Some(body)).await
}

fn key_msg(session: Uuid, task: Uuid, scope: u8, version: u32, recipient: Hex32) -> KeyRequest {
    KeyRequest {
        session_id: session,
        task_id: task,
        scope,
        key_version: version,
        recipient,
        expires_at: soon(),
        nonce: Nonce::random(),
    }
}

/// `POST /api/v3/keys` of a signed request.
async fn post_key(env: &Env, signed: &Signed<KeyRequest>) -> (StatusCode, Value) {
    env.call("POST", "/api/v3/keys", None, Some(json!(signed)))
        .await
}

/// `POST /api/v3/keys` of `m`, signed by `wallet`.
async fn ask_key(env: &Env, m: KeyRequest, wallet: &PrivateKeySigner) -> (StatusCode, Value) {
    post_key(env, &sign(env, m, wallet)).await
}

/// `K_session` of the client's session (scope 1), unwrapped; the answer's token replaces the
/// client's.
async fn session_key(env: &Env, c: &mut Client) -> SecretKey {
    let m = key_msg(c.session, Uuid::nil(), 1, 1, c.recipient());
    let r: KeyResponse = answer(ask_key(env, m, &c.wallet).await, StatusCode::OK);
    assert_eq!((r.scope, r.key_version), (1, 1));
    c.token = r.token.expect("a scope 1 answer carries a token").token;
    veil_keys::unwrap_key(
        &c.x,
        &hex::decode(&r.wrapped).unwrap(),
        &KeyId::session(1, c.session),
    )
    .unwrap()
}

fn payload() -> Vec<u8> {
    serde_json::to_vec(&PromptPayload {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: format!("Tell me about {CANARY}."),
        }],
        prompt: None,
        stop: vec!["\n\nEND".into()],
    })
    .unwrap()
}

fn seal_prompt(k: &SecretKey, id: KeyId) -> Vec<u8> {
    veil_keys::seal(k, &BlobParams::new(id, Purpose::Prompt), &payload()).unwrap()
}

/// The prompt of `task`, sealed under its `K_task` of key `version`, derived from `k_session`.
fn task_prompt(k_session: &SecretKey, version: u32, c: &Client, task: Uuid) -> Vec<u8> {
    let k_task = veil_keys::derive_task_key(k_session, &task);
    seal_prompt(&k_task, KeyId::task(version, c.session, task))
}

async fn upload(
    env: &Env,
    c: &Client,
    task: Uuid,
    blob: Vec<u8>,
    sha: &str,
) -> (StatusCode, Value) {
    let path = format!("/api/v3/sessions/{}/tasks/{task}/prompt", c.session);
    upload_at(env, &path, c, blob, sha).await
}

/// `PUT path` of a prompt blob with the client's token and `sha` as its `x-veil-sha256`.
async fn upload_at(
    env: &Env,
    path: &str,
    c: &Client,
    blob: Vec<u8>,
    sha: &str,
) -> (StatusCode, Value) {
    let headers = [
        ("content-type", "application/octet-stream"),
        ("x-veil-sha256", sha),
    ];
    let r = env
        .raw("PUT", path, Some(&c.token), &headers, Body::from(blob))
        .await;
    (r.status, r.json())
}

/// Uploads `blob`, with its own SHA-256, as the prompt of `task`: stored, and the receipt
/// names its hash and size. Returns the hash and the URN.
async fn upload_ok(env: &Env, c: &Client, task: Uuid, blob: Vec<u8>) -> ([u8; 32], String) {
    let hash = sha256(&blob);
    let size = blob.len();
    let (st, receipt) = upload(env, c, task, blob, &hex::encode(hash)).await;
    assert_eq!(st, StatusCode::CREATED, "{receipt}");
    assert_eq!(receipt["sha256"], json!(hex::encode(hash)));
    assert_eq!(receipt["size"], json!(size));
    (hash, receipt["urn"].as_str().unwrap().to_string())
}

/// Uploads `blob`, with its own SHA-256, as the prompt of `task`, and asserts the refusal.
async fn upload_refused(
    env: &Env,
    c: &Client,
    task: Uuid,
    blob: Vec<u8>,
    status: StatusCode,
    want_code: &str,
    want_param: &str,
) {
    let sha = hex::encode(sha256(&blob));
    let got = upload(env, c, task, blob, &sha).await;
    refused(&got, status, want_code, want_param);
}

fn submit_msg(c: &Client, task: Uuid, hash: [u8; 32], urn: &str) -> SubmitTask {
    SubmitTask {
        session_id: c.session,
        task_id: task,
        prompt_hash: Hex32(hash),
        prompt_urn: urn.into(),
        model: MODEL.into(),
        expires_at: soon(),
        nonce: Nonce::random(),
    }
}

async fn submit(env: &Env, body: Value) -> (StatusCode, Value) {
    env.call("POST", "/api/v3/completions", None, Some(body))
        .await
}

/// `POST /api/v3/completions` of `m`, signed by `wallet`, with no parameters.
async fn submit_signed(env: &Env, m: SubmitTask, wallet: &PrivateKeySigner) -> (StatusCode, Value) {
    submit(env, json!({"task": sign(env, m, wallet)})).await
}

/// A sealed, uploaded and submitted task: its id, `K_task` and the submit answer.
async fn queued_task(env: &Env, c: &Client, k_session: &SecretKey) -> (Uuid, SecretKey, V3Task) {
    queued_task_with(env, c, k_session, true).await
}

async fn queued_task_with(
    env: &Env,
    c: &Client,
    k_session: &SecretKey,
    stream: bool,
) -> (Uuid, SecretKey, V3Task) {
    let task = Uuid::now_v7();
    let k_task = veil_keys::derive_task_key(k_session, &task);
    let (hash, urn) = upload_ok(env, c, task, task_prompt(k_session, 1, c, task)).await;
    let body = json!({"task": sign(env, submit_msg(c, task, hash, &urn), &c.wallet),
                      "params": {"max_tokens": 32, "temperature": 0.5, "stream": stream}});
    let t: V3Task = answer(submit(env, body).await, StatusCode::ACCEPTED);
    assert_eq!(
        (t.task_id, t.session_id, t.state.as_str()),
        (task, c.session, "queued")
    );
    assert_eq!(
        (t.key_version, t.prompt_hash, t.model.as_str()),
        (1, Hex32(hash), MODEL)
    );
    (task, k_task, t)
}

// --- a simulated miner -------------------------------------------------------------------------

struct SimMiner {
    wallet: PrivateKeySigner,
    x: X25519Secret,
    token: String,
}

impl SimMiner {
    fn address(&self) -> String {
        self.wallet.address().to_checksum(None)
    }
}

fn login_msg(x: &X25519Secret) -> MinerLogin {
    MinerLogin {
        recipient: recipient(x),
        expires_at: soon(),
        nonce: Nonce::random(),
    }
}

fn login_body(env: &Env, login: Signed<MinerLogin>) -> Value {
    let _ = env;
    json!(LoginRequest {
        login,
        models: vec![ServedModel {
            name: MODEL.into(),
            sha256: None,
        }],
    })
}

async fn miner_login(env: &Env, wallet: PrivateKeySigner) -> SimMiner {
    let x = X25519Secret::generate().unwrap();
    let body = login_body(env, sign(env, login_msg(&x), &wallet));
    let (st, v) = env.call("POST", "/api/miner/login", None, Some(body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    SimMiner {
        wallet,
        x,
        token: v["token"].as_str().unwrap().into(),
    }
}

async fn lease(env: &Env, m: &SimMiner) -> Lease {
    let body = json!({"wait_ms": 5000});
    let got = env
        .call("POST", "/api/miner/lease", Some(&m.token), Some(body))
        .await;
    answer(got, StatusCode::OK)
}

/// The miner's side of a leased task: the task key through `/api/v3/keys`, the prompt (opened
/// and checked), the result sealed in pieces and uploaded, and the signed `TaskResult`. Returns
/// the stored result blob.
async fn run_task(env: &Env, m: &SimMiner, l: &Lease) -> Vec<u8> {
    assert_eq!((l.prompt_scope, l.key_version), (2, 1));
    let km = key_msg(l.session_id, l.task_id, 2, 1, recipient(&m.x));
    let r: KeyResponse = answer(ask_key(env, km, &m.wallet).await, StatusCode::OK);
    assert!(r.token.is_none(), "miners get no read token");
    let kid = KeyId::task(1, l.session_id, l.task_id);
    let k = veil_keys::unwrap_key(&m.x, &hex::decode(&r.wrapped).unwrap(), &kid).unwrap();

    let prompt = env
        .get(
            &format!("/api/miner/leases/{}/prompt", l.lease_id),
            &m.token,
        )
        .await;
    assert_eq!(prompt.status, StatusCode::OK);
    let opened = veil_keys::open(&k, &prompt.bytes).unwrap();
    let p: PromptPayload = serde_json::from_slice(&opened.plaintext.into_zeroizing()).unwrap();
    assert!(
        p.messages[0].content.contains(CANARY),
        "the miner reads the prompt"
    );
    assert_eq!(p.stop, vec!["\n\nEND".to_string()]);

    // Sealed and uploaded a flushed chunk at a time, as a streaming miner does.
    let mut sealer = veil_keys::Sealer::new(&k, &BlobParams::new(kid, Purpose::Result)).unwrap();
    let mut pieces = Vec::new();
    for piece in RESULT_TEXT.as_bytes().chunks(7) {
        let mut out = Vec::new();
        sealer.update(piece, &mut out).unwrap();
        sealer.flush(&mut out).unwrap();
        pieces.push(Bytes::from(out));
    }
    let mut last = Vec::new();
    sealer.finish(&mut last).unwrap();
    pieces.push(Bytes::from(last));
    let out: Vec<u8> = pieces.concat();
    let body = Body::from_stream(futures::stream::iter(
        pieces.into_iter().map(Ok::<_, std::io::Error>),
    ));
    let up = env
        .raw(
            "PUT",
            &format!("/api/miner/leases/{}/result", l.lease_id),
            Some(&m.token),
            &[("content-type", "application/octet-stream")],
            body,
        )
        .await;
    assert_eq!(up.status, StatusCode::CREATED);
    let receipt = up.json();
    let urn = receipt["urn"].as_str().unwrap().to_string();
    let (st, v) = complete(env, m, l, sha256(&out), &urn).await;
    assert_eq!(
        (st, v["status"].as_str()),
        (StatusCode::OK, Some("accepted")),
        "{v}"
    );
    out
}

/// Submits a signed `TaskResult` naming `result_hash` and `result_urn` for the lease.
async fn complete(
    env: &Env,
    m: &SimMiner,
    l: &Lease,
    result_hash: [u8; 32],
    result_urn: &str,
) -> (StatusCode, Value) {
    let tr = TaskResult {
        session_id: l.session_id,
        task_id: l.task_id,
        prompt_hash: l.prompt_hash,
        result_hash: Hex32(result_hash),
        result_urn: result_urn.into(),
    };
    let body = json!(CompleteRequest {
        result: sign(env, tr, &m.wallet),
        usage: Usage {
            prompt_tokens: 5,
            completion_tokens: 9,
        },
        finish_reason: "stop".into(),
    });
    env.call(
        "POST",
        &format!("/api/miner/leases/{}/complete", l.lease_id),
        Some(&m.token),
        Some(body),
    )
    .await
}

/// Asserts that a sealed result opens with `k_task` to the text the simulated miner sealed.
#[track_caller]
fn assert_result_text(k_task: &SecretKey, sealed: &[u8]) {
    let opened = veil_keys::open(k_task, sealed).unwrap();
    assert_eq!(
        opened.plaintext.into_zeroizing().as_slice(),
        RESULT_TEXT.as_bytes()
    );
}

/// SSE events of a body: (name, data JSON).
fn sse_events(body: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(body).unwrap().replace("\r\n", "\n");
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut name = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((name, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

/// The bytes after the last `start`, and the `done` task; checks that every event's data is a
/// tagged [`StreamEvent`] named as its event.
fn reassemble(events: &[(String, Value)]) -> (Vec<u8>, V3Task, usize) {
    let mut bytes = Vec::new();
    let mut done = None;
    let mut starts = 0;
    assert!(
        events.iter().all(|(n, _)| n != "error"),
        "an error event: {events:?}"
    );
    for (name, data) in events {
        let e: StreamEvent = serde_json::from_value(data.clone()).unwrap();
        assert_eq!(data["event"].as_str(), Some(name.as_str()));
        match e {
            StreamEvent::Start { attempt } => {
                assert!(attempt >= 1);
                starts += 1;
                bytes.clear();
            }
            StreamEvent::Bytes { b64 } => bytes.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            ),
            StreamEvent::Done { task } => done = Some(task),
        }
    }
    (bytes, done.expect("a done event"), starts)
}

/// The events of `GET /api/v3/tasks/{task}/stream`, read to its end.
async fn stream_events(env: &Env, token: &str, task: Uuid) -> Vec<(String, Value)> {
    let r = env
        .get(&format!("/api/v3/tasks/{task}/stream"), token)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    sse_events(&r.bytes)
}

/// Counts the `bytes` events.
fn bytes_events(events: &[(String, Value)]) -> usize {
    events.iter().filter(|(n, _)| n == "bytes").count()
}

/// A stream with no relay to replay sends the stored blob, in one `bytes` event.
async fn streams_stored_blob(env: &Env, token: &str, task: Uuid, stored: &[u8]) {
    let events = stream_events(env, token, task).await;
    let (bytes, _, starts) = reassemble(&events);
    assert_eq!(
        (bytes.as_slice(), starts, bytes_events(&events)),
        (stored, 1, 1)
    );
}

// --- the happy path ----------------------------------------------------------------------------

async fn happy_path(env: &Env) {
    let got = env.call("GET", "/api/v3/config", None, None).await;
    let cfg: V3Config = answer(got, StatusCode::OK);
    assert_eq!(
        (
            cfg.protocol_version,
            cfg.active_key_version,
            cfg.min_decrypt_version
        ),
        (1, 1, 1)
    );
    assert_eq!(cfg.domain, env.domain());
    assert!(!cfg.presigned_urls, "a local directory cannot sign URLs");

    let miner_wallet = PrivateKeySigner::random();
    let miner_addr = miner_wallet.address().to_checksum(None);
    let mut c = open(env, &[miner_addr.to_lowercase()]).await;
    let s = env
        .ok(
            "GET",
            &format!("/api/v3/sessions/{}", c.session),
            &c.token,
            None,
        )
        .await;
    assert_eq!(s["allowed_miners"], json!([miner_addr]));
    assert_eq!(
        (s["private"].as_bool(), s["allowlist_source"].as_str()),
        (Some(true), Some("router"))
    );
    assert_eq!(s["kind"], json!("dedicated"));

    let k_session = session_key(env, &mut c).await;
    let (task, k_task, _) = queued_task(env, &c, &k_session).await;
    assert_eq!(
        k_task.expose_secret(),
        env.state
            .keys
            .task_key(1, &c.session, &task)
            .unwrap()
            .expose_secret(),
        "the client derives the router's K_task"
    );

    // The owner may also ask for the task key directly (no token then).
    let m = key_msg(c.session, task, 2, 1, c.recipient());
    let (st, v) = ask_key(env, m, &c.wallet).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v.get("token").is_none(), "{v}");

    // Not completed yet.
    let (st, v) = env
        .call(
            "GET",
            &format!("/api/v3/tasks/{task}/result"),
            Some(&c.token),
            None,
        )
        .await;
    refused(
        &(st, v),
        StatusCode::CONFLICT,
        "task_not_completed",
        "task_id",
    );

    // Stream from before the miner starts: the relayed bytes form the stored blob.
    let resp = env
        .send(
            "GET",
            &format!("/api/v3/tasks/{task}/stream"),
            Some(&c.token),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let live = tokio::spawn(async move {
        axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
    });

    let miner = miner_login(env, miner_wallet).await;
    let l = lease(env, &miner).await;
    assert_eq!((l.task_id, l.session_id), (task, c.session));
    let stored = run_task(env, &miner, &l).await;

    let path = format!("/api/v3/tasks/{task}?wait_ms=5000");
    let t: V3Task = answer(
        env.call("GET", &path, Some(&c.token), None).await,
        StatusCode::OK,
    );
    assert_eq!(t.state, "completed");
    assert!(t.error.is_none());
    let r = t.result.clone().expect("a completed task has a result");
    assert_eq!(
        r.signed.recover(&env.domain()).unwrap().to_checksum(None),
        miner.address(),
        "the TaskResult signature recovers the miner"
    );
    assert_eq!(r.miner, miner.address());
    assert_eq!(
        (
            r.signed.message.session_id,
            r.signed.message.task_id,
            r.signed.message.prompt_hash
        ),
        (c.session, task, t.prompt_hash)
    );
    assert_eq!(r.signed.message.result_hash, Hex32(sha256(&stored)));
    assert_eq!(
        (r.size, r.finish_reason.as_str(), r.deleted),
        (stored.len() as u64, "stop", false)
    );
    assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (5, 9));

    // The sealed result, through the router, opens with the client's own K_task.
    let got = env
        .get(&format!("/api/v3/tasks/{task}/result"), &c.token)
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes.as_ref(), stored.as_slice());
    assert_eq!(
        got.headers["x-veil-sha256"].to_str().unwrap(),
        hex::encode(sha256(&stored))
    );
    assert_result_text(&k_task, &got.bytes);
    assert!(
        env.delivered(task).await,
        "a full download counts as a delivery"
    );

    // The live stream: one start (the relayed upload), its bytes, done.
    let body = tokio::time::timeout(std::time::Duration::from_secs(30), live)
        .await
        .expect("the stream ends after done")
        .unwrap();
    let events = sse_events(&body);
    let (bytes, done, starts) = reassemble(&events);
    assert_eq!(
        bytes, stored,
        "the relayed events reassemble into the stored blob"
    );
    assert_eq!(starts, 1, "relayed, not re-sent from storage: {events:?}");
    assert_eq!(done.state, "completed");
    assert_eq!(done.result.unwrap().signed, r.signed);
    assert_eq!(events.last().unwrap().0, "done");

    // A stream opened after the fact sends the stored blob.
    let (bytes, done, starts) = reassemble(&stream_events(env, &c.token, task).await);
    assert_eq!((bytes, starts), (stored.clone(), 1));
    assert_eq!(done.task_id, task);

    // No presigned URLs on a local directory.
    for path in [
        format!("/api/v3/tasks/{task}/result/presign"),
        format!(
            "/api/v3/sessions/{}/tasks/{}/prompt/presign",
            c.session,
            Uuid::now_v7()
        ),
    ] {
        let got = env.call("POST", &path, Some(&c.token), None).await;
        refused(&got, StatusCode::NOT_IMPLEMENTED, "presign_unsupported", "");
    }

    // The audit log tells the story, with metadata only, and its chain verifies.
    let entries = env.state.store.audit_entries(0, 1000).await.unwrap();
    let find = |action: &str, actor: &str| {
        entries
            .iter()
            .filter(|e| e.entry.action == action && e.entry.actor == actor)
            .count()
    };
    assert_eq!(find("session.create", &c.address()), 1);
    assert_eq!(
        find("key.release", &c.address()),
        2,
        "K_session and the owner's K_task"
    );
    assert_eq!(find("key.release", &miner.address()), 1);
    assert_eq!(find("task.enqueue", &c.address()), 1);
    assert_eq!(find("prompt.upload", &c.address()), 1);
    let enqueue = entries
        .iter()
        .find(|e| e.entry.action == "task.enqueue")
        .unwrap();
    assert_eq!(enqueue.entry.detail["api"], json!("v3"));
    verify_audit_chain(env.state.store.as_ref()).await.unwrap();

    // Keys existed in the router only inside the wrap step: one derivation per released key,
    // and for its own use only the one this test asked for above to compare the client's K_task
    // (the router itself opened and sealed nothing).
    let releases = entries
        .iter()
        .filter(|e| e.entry.action == "key.release")
        .count() as u64;
    assert_eq!(
        env.state.keys.derivations(),
        veil_router::state::KeyDerivations {
            own_use: 1,
            for_wrap: releases
        }
    );

    // Close: the session answers closed and takes no more tasks.
    let close = format!("/api/v3/sessions/{}/close", c.session);
    let v = env.ok("POST", &close, &c.token, None).await;
    assert!(v["closed_at_ms"].as_i64().is_some(), "{v}");
    let m = key_msg(c.session, Uuid::nil(), 1, 1, c.recipient());
    let got = ask_key(env, m, &c.wallet).await;
    refused(
        &got,
        StatusCode::CONFLICT,
        "session_closed",
        "message.sessionId",
    );

    // The prompt's plaintext reached neither the router nor its disk.
    assert!(
        !env.received(CANARY.as_bytes()),
        "the canary reached the router"
    );
    assert!(env.received(b"/api/v3/completions"), "the recorder records");
    assert_eq!(
        env.files_containing(CANARY.as_bytes()),
        Vec::<PathBuf>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_on_sqlite() {
    let env = Env::new().await;
    happy_path(&env).await;
}

/// Every message of the flow (OpenSession, KeyRequest of both scopes, SubmitTask, MinerLogin,
/// TaskResult) signed by eth-account rather than by our own code: the router accepts them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_with_eth_account_signatures() {
    let mut env = Env::new().await;
    env.eth_account = true;
    happy_path(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_on_postgres() {
    let db = TestDatabase::create().await;
    let url = db.url().to_owned();
    let env = Env::with(|s| s.database_url = Some(url)).await;
    happy_path(&env).await;
    drop(env);
    db.drop_database().await;
}

// --- refusals ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_messages_are_refused_when_replayed_expired_or_far_ahead() {
    let env = Env::new().await;

    // OpenSession.
    let wallet = PrivateKeySigner::random();
    let session = Uuid::now_v7();
    let body = json!({"open": sign(&env, open_msg(session), &wallet)});
    let (st, v) = env
        .call("POST", "/api/v3/sessions", None, Some(body.clone()))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let token = v["token"]["token"].as_str().unwrap().to_string();
    let got = env.call("POST", "/api/v3/sessions", None, Some(body)).await;
    refused(
        &got,
        StatusCode::CONFLICT,
        "replayed_nonce",
        "open.message.nonce",
    );
    let mut opens = vec![(
        open_msg(session),
        StatusCode::CONFLICT,
        "session_exists",
        "open.message.sessionId",
    )];
    for (exp, code) in bad_expiries() {
        let m = OpenSession {
            expires_at: exp,
            ..open_msg(Uuid::now_v7())
        };
        opens.push((m, StatusCode::UNAUTHORIZED, code, "open.message.expiresAt"));
    }
    opens.extend([
        (
            OpenSession {
                kind: 3,
                ..open_msg(Uuid::now_v7())
            },
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "open.message.kind",
        ),
        (
            open_msg(Uuid::nil()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "open.message.sessionId",
        ),
    ]);
    for (m, status, code, field) in opens {
        refused(&open_signed(&env, m, &wallet).await, status, code, field);
    }
    let mut bad = sign(&env, open_msg(Uuid::now_v7()), &wallet);
    bad.signature.0[64] = 9;
    let got = env
        .call("POST", "/api/v3/sessions", None, Some(json!({"open": bad})))
        .await;
    refused(
        &got,
        StatusCode::UNAUTHORIZED,
        "bad_signature",
        "open.signature",
    );
    let got = env
        .call(
            "POST",
            "/api/v3/sessions",
            None,
            Some(json!({"open": sign(&env, open_msg(Uuid::now_v7()), &wallet), "allowed_miners": ["0x12"]})),
        )
        .await;
    refused(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "allowed_miners[0]",
    );

    // KeyRequest.
    let x = X25519Secret::generate().unwrap();
    let recipient = recipient(&x);
    let signed = sign(
        &env,
        key_msg(session, Uuid::nil(), 1, 1, recipient),
        &wallet,
    );
    let (st, v) = post_key(&env, &signed).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let got = post_key(&env, &signed).await;
    refused(
        &got,
        StatusCode::CONFLICT,
        "replayed_nonce",
        "message.nonce",
    );
    let mut requests = Vec::new();
    for (exp, code) in bad_expiries() {
        let m = KeyRequest {
            expires_at: exp,
            ..key_msg(session, Uuid::nil(), 1, 1, recipient)
        };
        requests.push((m, StatusCode::UNAUTHORIZED, code, "message.expiresAt"));
    }
    requests.extend([
        (
            key_msg(session, Uuid::nil(), 3, 1, recipient),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "message.scope",
        ),
        (
            key_msg(session, Uuid::now_v7(), 1, 1, recipient),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "message.taskId",
        ),
        (
            key_msg(session, Uuid::nil(), 2, 1, recipient),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "message.taskId",
        ),
        (
            key_msg(session, Uuid::nil(), 1, 9, recipient),
            StatusCode::BAD_REQUEST,
            "unknown_key_version",
            "message.keyVersion",
        ),
        (
            key_msg(Uuid::now_v7(), Uuid::nil(), 1, 1, recipient),
            StatusCode::NOT_FOUND,
            "not_found",
            "message.sessionId",
        ),
    ]);
    for (m, status, code, field) in requests {
        refused(&ask_key(&env, m, &wallet).await, status, code, field);
    }

    // SubmitTask: a literal replay names the task that exists by then; the same nonce under
    // another message is a replayed nonce.
    let mut c = Client {
        wallet,
        x,
        session,
        token,
    };
    let k_session = session_key(&env, &mut c).await;
    let mut submitted = Vec::new();
    let mut first = None;
    for _ in 0..2 {
        let task = Uuid::now_v7();
        let (hash, urn) = upload_ok(&env, &c, task, task_prompt(&k_session, 1, &c, task)).await;
        let m = submit_msg(&c, task, hash, &urn);
        if first.is_none() {
            let body = json!({"task": sign(&env, m.clone(), &c.wallet)});
            let (st, v) = submit(&env, body.clone()).await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
            let got = submit(&env, body).await;
            refused(
                &got,
                StatusCode::CONFLICT,
                "task_exists",
                "task.message.taskId",
            );
            first = Some(m.nonce);
        }
        submitted.push(m);
    }
    let second = submitted.pop().unwrap();
    let reused = SubmitTask {
        nonce: first.unwrap(),
        ..second.clone()
    };
    let got = submit_signed(&env, reused, &c.wallet).await;
    refused(
        &got,
        StatusCode::CONFLICT,
        "replayed_nonce",
        "task.message.nonce",
    );
    let (task2, hash, urn) = (
        second.task_id,
        second.prompt_hash.0,
        second.prompt_urn.clone(),
    );
    let urn = urn.as_str();
    for (exp, code) in bad_expiries() {
        let m = SubmitTask {
            expires_at: exp,
            ..submit_msg(&c, task2, hash, urn)
        };
        let got = submit_signed(&env, m, &c.wallet).await;
        refused(
            &got,
            StatusCode::UNAUTHORIZED,
            code,
            "task.message.expiresAt",
        );
    }
    // And the task still goes in with a fresh nonce.
    let got = submit_signed(&env, submit_msg(&c, task2, hash, urn), &c.wallet).await;
    assert_eq!(got.0, StatusCode::ACCEPTED, "{}", got.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miner_login_and_key_request_replays_are_refused() {
    let env = Env::new().await;
    let mut c = open(&env, &[]).await;
    let k_session = session_key(&env, &mut c).await;
    let (task, _, _) = queued_task(&env, &c, &k_session).await;

    let wallet = PrivateKeySigner::random();
    let x = X25519Secret::generate().unwrap();
    let login = sign(&env, login_msg(&x), &wallet);
    let (st, v) = env
        .call(
            "POST",
            "/api/miner/login",
            None,
            Some(login_body(&env, login.clone())),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let got = env
        .call(
            "POST",
            "/api/miner/login",
            None,
            Some(login_body(&env, login)),
        )
        .await;
    refused(
        &got,
        StatusCode::CONFLICT,
        "replayed_nonce",
        "login.message.nonce",
    );
    let m = SimMiner {
        wallet,
        x,
        token: v["token"].as_str().unwrap().into(),
    };
    let l = lease(&env, &m).await;
    assert_eq!(l.task_id, task);
    let signed = sign(
        &env,
        key_msg(c.session, task, 2, 1, recipient(&m.x)),
        &m.wallet,
    );
    let path = format!("/api/miner/leases/{}/key", l.lease_id);
    let (st, v) = env
        .call("POST", &path, Some(&m.token), Some(json!(signed)))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // A replay, on the lease's path, and through /api/v3/keys too.
    for (path, bearer) in [
        (path.as_str(), Some(m.token.as_str())),
        ("/api/v3/keys", None),
    ] {
        let got = env.call("POST", path, bearer, Some(json!(signed))).await;
        refused(
            &got,
            StatusCode::CONFLICT,
            "replayed_nonce",
            "message.nonce",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_wallets_get_no_keys_and_submit_nothing() {
    let env = Env::new().await;
    let allowed = PrivateKeySigner::random();
    let mut c = open(&env, &[allowed.address().to_checksum(None)]).await;
    let k_session = session_key(&env, &mut c).await;
    let (task, _, _) = queued_task(&env, &c, &k_session).await;
    let t = env.state.store.get_task(task).await.unwrap();

    let stranger = PrivateKeySigner::random();
    let x = X25519Secret::generate().unwrap();
    let r = recipient(&x);
    let got = ask_key(&env, key_msg(c.session, Uuid::nil(), 1, 1, r), &stranger).await;
    refused(&got, StatusCode::FORBIDDEN, "not_owner", "signature");
    // Scope 2 by someone holding no lease, and by the allowed miner before it leased the task.
    for wallet in [&stranger, &allowed] {
        let got = ask_key(&env, key_msg(c.session, task, 2, 1, r), wallet).await;
        refused(&got, StatusCode::FORBIDDEN, "not_allowed", "signature");
    }
    let denials = env.audited("key.deny").await;
    assert_eq!(denials.len(), 3, "every refusal is audited");
    assert_eq!(denials[0].entry.actor, stranger.address().to_checksum(None));
    assert_eq!(denials[0].entry.detail["code"], json!("not_owner"));

    // A miner that is not on the private session's list leases nothing and gets no key.
    let outsider = miner_login(&env, PrivateKeySigner::random()).await;
    let (st, _) = env
        .call(
            "POST",
            "/api/miner/lease",
            Some(&outsider.token),
            Some(json!({"wait_ms": 0})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    let stranger_task = submit_msg(&c, Uuid::now_v7(), t.prompt_hash, &t.prompt_urn);
    let got = submit_signed(&env, stranger_task, &stranger).await;
    refused(&got, StatusCode::FORBIDDEN, "not_owner", "task.signature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_with_bad_headers_or_hashes_leave_nothing_behind() {
    let env = Env::new().await;
    let mut c = open(&env, &[]).await;
    let k_session = session_key(&env, &mut c).await;
    let blobs_before = env.blob_count();
    let task = Uuid::now_v7();
    let k_task = veil_keys::derive_task_key(&k_session, &task);
    let other = Uuid::now_v7();

    let cases: Vec<(Vec<u8>, StatusCode, &str, &str)> = vec![
        // Sealed for another task.
        (
            seal_prompt(
                &veil_keys::derive_task_key(&k_session, &other),
                KeyId::task(1, c.session, other),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body.header",
        ),
        // Under the session key (scope 1).
        (
            seal_prompt(&k_session, KeyId::session(1, c.session)),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body.header",
        ),
        // A result, not a prompt.
        (
            veil_keys::seal(
                &k_task,
                &BlobParams::new(KeyId::task(1, c.session, task), Purpose::Result),
                b"x",
            )
            .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body.header",
        ),
        // Under a key version other than the active one.
        (
            seal_prompt(
                &SecretKey::generate().unwrap(),
                KeyId::task(7, c.session, task),
            ),
            StatusCode::CONFLICT,
            "key_version_stale",
            "body.header",
        ),
        // Not a sealed blob at all.
        (
            format!(
                "plain text, padded to more than a header's length {}",
                "x".repeat(120)
            )
            .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body.header",
        ),
        // Shorter than a header.
        (
            b"VEIL".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body",
        ),
    ];
    for (blob, status, code, field) in cases {
        upload_refused(&env, &c, task, blob, status, code, field).await;
    }

    // A good blob whose hash is not the one given.
    let blob = seal_prompt(&k_task, KeyId::task(1, c.session, task));
    let got = upload(&env, &c, task, blob.clone(), &"ab".repeat(32)).await;
    refused(
        &got,
        StatusCode::BAD_REQUEST,
        "hash_mismatch",
        "x-veil-sha256",
    );
    for bad in ["", "AB".repeat(32).as_str(), "abc"] {
        let got = upload(&env, &c, task, blob.clone(), bad).await;
        refused(
            &got,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "x-veil-sha256",
        );
    }
    assert_eq!(
        env.blob_count(),
        blobs_before,
        "no refused upload left a blob"
    );

    // Nil or malformed task ids, another session's path.
    let sha = hex::encode(sha256(&blob));
    for (path, status, code, field) in [
        (
            format!(
                "/api/v3/sessions/{}/tasks/{}/prompt",
                c.session,
                Uuid::nil()
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "task_id",
        ),
        (
            format!("/api/v3/sessions/{}/tasks/{task}/prompt", Uuid::now_v7()),
            StatusCode::NOT_FOUND,
            "not_found",
            "session_id",
        ),
    ] {
        let got = upload_at(&env, &path, &c, blob.clone(), &sha).await;
        refused(&got, status, code, field);
    }

    // The good upload goes through; submitting with a hash that is not the blob's is refused.
    let (_, urn) = upload_ok(&env, &c, task, blob.clone()).await;
    let body =
        |m: SubmitTask, params: Value| json!({"task": sign(&env, m, &c.wallet), "params": params});
    let hash = sha256(&blob);
    // A URN of this store where nothing is; one of another store; no URN at all.
    let missing = format!("{}/nothing-here.veil", urn.rsplit_once('/').unwrap().0);
    let foreign = "urn:blob:v1:s3:aws:elsewhere:a/b.veil";
    let mut submissions = vec![
        (
            submit_msg(&c, task, [3; 32], &urn),
            json!({}),
            "hash_mismatch",
            "task.message.promptHash",
        ),
        (
            submit_msg(&c, task, hash, &missing),
            json!({}),
            "prompt_missing",
            "task.message.promptUrn",
        ),
        (
            submit_msg(&c, task, hash, foreign),
            json!({}),
            "invalid_request",
            "task.message.promptUrn",
        ),
        (
            submit_msg(&c, task, hash, "not a urn"),
            json!({}),
            "invalid_request",
            "task.message.promptUrn",
        ),
        // The blob names this task: submitting it under another id is a header fault.
        (
            submit_msg(&c, Uuid::now_v7(), hash, &urn),
            json!({}),
            "invalid_request",
            "task.message.promptUrn",
        ),
    ];
    // Parameters.
    for (params, field) in [
        (json!({"stop": ["secret stop"]}), "params.stop"),
        (json!({"max_tokens": 0}), "params.max_tokens"),
        (json!({"temperature": 3.0}), "params.temperature"),
        (json!({"top_p": 0.0}), "params.top_p"),
    ] {
        submissions.push((
            submit_msg(&c, task, hash, &urn),
            params,
            "invalid_request",
            field,
        ));
    }
    let long = SubmitTask {
        model: "m".repeat(129),
        ..submit_msg(&c, task, hash, &urn)
    };
    submissions.push((long, json!({}), "invalid_request", "task.message.model"));
    for (m, params, want_code, field) in submissions {
        let got = submit(&env, body(m, params)).await;
        refused(&got, StatusCode::BAD_REQUEST, want_code, field);
    }
    // Unknown fields, at the top and inside.
    let mut extra = body(submit_msg(&c, task, hash, &urn), json!({}));
    extra["priority"] = json!(1);
    let got = submit(&env, extra).await;
    invalid_request(&got);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("priority"),
        "{}",
        got.1
    );
    let logit_bias = json!({"logit_bias": {}});
    let got = submit(&env, body(submit_msg(&c, task, hash, &urn), logit_bias)).await;
    invalid_request(&got);
    assert!(param(&got.1).starts_with("params"), "{}", got.1);
    let open_extra = json!({"open": sign(&env, open_msg(Uuid::now_v7()), &c.wallet), "note": "x"});
    let got = env
        .call("POST", "/api/v3/sessions", None, Some(open_extra))
        .await;
    invalid_request(&got);
    // The task was never queued by any of these.
    assert!(env.state.store.get_task(task).await.is_err());
    let got = submit(&env, body(submit_msg(&c, task, hash, &urn), json!({}))).await;
    assert_eq!(got.0, StatusCode::ACCEPTED, "{}", got.1);
    // Its id is taken now, for uploads too.
    let got = upload(&env, &c, task, blob, &sha).await;
    refused(&got, StatusCode::CONFLICT, "task_exists", "task_id");
    assert!(!env.received(CANARY.as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_uploads_are_refused() {
    let env = Env::with(|s| s.max_blob_bytes = Some(4096)).await;
    let mut c = open(&env, &[]).await;
    let k_session = session_key(&env, &mut c).await;
    let task = Uuid::now_v7();
    let k_task = veil_keys::derive_task_key(&k_session, &task);
    let big = vec![b'a'; 10_000];
    let blob = veil_keys::seal(
        &k_task,
        &BlobParams::new(KeyId::task(1, c.session, task), Purpose::Prompt),
        &big,
    )
    .unwrap();
    let before = env.blob_count();
    upload_refused(
        &env,
        &c,
        task,
        blob,
        StatusCode::PAYLOAD_TOO_LARGE,
        "blob_too_large",
        "body",
    )
    .await;
    assert_eq!(env.blob_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_tokens_open_their_own_session_only() {
    let env = Env::new().await;
    let mut a = open(&env, &[]).await;
    let k_session = session_key(&env, &mut a).await;
    let (task, _, _) = queued_task(&env, &a, &k_session).await;
    let b = open(&env, &[]).await;

    let task_path = format!("/api/v3/tasks/{task}");
    env.ok("GET", &task_path, &a.token, None).await;
    for bearer in [None, Some("vst_0123"), Some("vk_not-a-read-token")] {
        let got = env.call("GET", &task_path, bearer, None).await;
        refused(
            &got,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "Authorization",
        );
    }
    // An expired token.
    let expired = "vst_expired-token-for-the-test";
    env.state
        .store
        .create_read_token(&ReadTokenRecord {
            token_hash: sha256(expired.as_bytes()),
            owner: a.address(),
            session_id: a.session,
            created_at_ms: veil_router::state::now_ms() - 10_000,
            expires_at_ms: veil_router::state::now_ms() - 1,
        })
        .await
        .unwrap();
    let got = env.call("GET", &task_path, Some(expired), None).await;
    refused(
        &got,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
        "Authorization",
    );

    // Another session's token sees neither the task nor the session.
    for path in [
        task_path.clone(),
        format!("{task_path}/result"),
        format!("{task_path}/stream"),
    ] {
        let got = env.call("GET", &path, Some(&b.token), None).await;
        refused(&got, StatusCode::NOT_FOUND, "not_found", "task_id");
    }
    let got = env
        .call(
            "GET",
            &format!("/api/v3/tasks/{}", Uuid::now_v7()),
            Some(&b.token),
            None,
        )
        .await;
    refused(&got, StatusCode::NOT_FOUND, "not_found", "task_id");
    for (method, path) in [
        ("GET", format!("/api/v3/sessions/{}", a.session)),
        ("POST", format!("/api/v3/sessions/{}/close", a.session)),
    ] {
        let got = env.call(method, &path, Some(&b.token), None).await;
        refused(&got, StatusCode::NOT_FOUND, "not_found", "session_id");
    }
    assert!(
        env.state
            .store
            .get_session(a.session)
            .await
            .unwrap()
            .closed_at_ms
            .is_none()
    );

    let got = env
        .call(
            "GET",
            &format!("{task_path}?wait_ms=60001"),
            Some(&a.token),
            None,
        )
        .await;
    refused(&got, StatusCode::BAD_REQUEST, "invalid_request", "wait_ms");
    // A short long-poll of a queued task answers it queued.
    let (st, v) = env
        .call(
            "GET",
            &format!("{task_path}?wait_ms=50"),
            Some(&a.token),
            None,
        )
        .await;
    assert_eq!(
        (st, v["state"].as_str()),
        (StatusCode::OK, Some("queued")),
        "{v}"
    );

    // Closing cancels the queued task; the token still reads it.
    let close = format!("/api/v3/sessions/{}/close", a.session);
    env.ok("POST", &close, &a.token, None).await;
    let (st, v) = env.call("GET", &task_path, Some(&a.token), None).await;
    assert_eq!(
        (st, v["state"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );
    assert!(v["error"]["code"].as_str().is_some(), "{v}");
    // A cancelled task's stream ends with done at once.
    let events = stream_events(&env, &a.token, task).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "done");
    let got = env
        .call("GET", &format!("{task_path}/result"), Some(&a.token), None)
        .await;
    refused(&got, StatusCode::CONFLICT, "task_not_completed", "task_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_follow_the_active_key_version() {
    let env = Env::new().await;
    let mut c = open(&env, &[]).await;
    let k1 = session_key(&env, &mut c).await;
    // Sealed and uploaded under version 1, not yet submitted.
    let task = Uuid::now_v7();
    let (hash, urn) = upload_ok(&env, &c, task, task_prompt(&k1, 1, &c, task)).await;

    env.ok("POST", "/api/admin/keys/rotate", &env.admin, None)
        .await;
    let (_, cfg) = env.call("GET", "/api/v3/config", None, None).await;
    assert_eq!(cfg["active_key_version"], json!(2));

    // The version 1 prompt is stale now, at submission and at upload.
    let got = submit_signed(&env, submit_msg(&c, task, hash, &urn), &c.wallet).await;
    refused(
        &got,
        StatusCode::CONFLICT,
        "key_version_stale",
        "task.message.promptUrn",
    );
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("version 2")
    );
    let other = Uuid::now_v7();
    upload_refused(
        &env,
        &c,
        other,
        task_prompt(&k1, 1, &c, other),
        StatusCode::CONFLICT,
        "key_version_stale",
        "body.header",
    )
    .await;

    // Under version 2 it goes through.
    let m = key_msg(c.session, Uuid::nil(), 1, 2, c.recipient());
    let (st, v) = ask_key(&env, m, &c.wallet).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let k2 = veil_keys::unwrap_key(
        &c.x,
        &hex::decode(v["wrapped"].as_str().unwrap()).unwrap(),
        &KeyId::session(2, c.session),
    )
    .unwrap();
    let (hash, urn) = upload_ok(&env, &c, task, task_prompt(&k2, 2, &c, task)).await;
    let (st, v) = submit_signed(&env, submit_msg(&c, task, hash, &urn), &c.wallet).await;
    assert_eq!(
        (st, v["key_version"].as_u64()),
        (StatusCode::ACCEPTED, Some(2)),
        "{v}"
    );

    // Retired, then destroyed: version 1 keys are refused with their codes.
    let retire = json!({"up_to": 1});
    env.ok("POST", "/api/admin/keys/retire", &env.admin, Some(retire))
        .await;
    let v1_key = || key_msg(c.session, Uuid::nil(), 1, 1, c.recipient());
    let got = ask_key(&env, v1_key(), &c.wallet).await;
    refused(
        &got,
        StatusCode::FORBIDDEN,
        "key_version_retired",
        "message.keyVersion",
    );
    let (st, v) = env
        .call(
            "POST",
            "/api/admin/keys/destroy",
            Some(&env.admin),
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    let n = v["affected_blobs"].as_u64().unwrap();
    let confirmed = json!({"version": 1, "confirm_blobs": n});
    env.ok(
        "POST",
        "/api/admin/keys/destroy",
        &env.admin,
        Some(confirmed),
    )
    .await;
    let got = ask_key(&env, v1_key(), &c.wallet).await;
    refused(
        &got,
        StatusCode::FORBIDDEN,
        "key_version_destroyed",
        "message.keyVersion",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_after_a_fast_miner_still_gets_the_relayed_pieces() {
    let env = Env::new().await;
    let mut c = open(&env, &[]).await;
    let k_session = session_key(&env, &mut c).await;
    let miner = miner_login(&env, PrivateKeySigner::random()).await;

    // A streaming task: the router subscribed when it queued the task, so the stream opened
    // after the miner finished still replays the upload piece by piece.
    let (task, k_task, _) = queued_task_with(&env, &c, &k_session, true).await;
    let l = lease(&env, &miner).await;
    assert!(l.params.stream);
    let stored = run_task(&env, &miner, &l).await;
    let events = stream_events(&env, &c.token, task).await;
    let (bytes, done, starts) = reassemble(&events);
    assert_eq!((bytes.as_slice(), starts), (stored.as_slice(), 1));
    assert!(
        bytes_events(&events) > 2,
        "one event per uploaded piece: {events:?}"
    );
    assert_eq!(done.state, "completed");
    assert_result_text(&k_task, &bytes);
    // The first stream took the subscription: a second one gets the stored blob.
    streams_stored_blob(&env, &c.token, task, &stored).await;

    // A task queued without `stream` has no relay waiting: the stored blob, in one piece.
    let (task, _, _) = queued_task_with(&env, &c, &k_session, false).await;
    let l = lease(&env, &miner).await;
    assert!(!l.params.stream);
    let stored = run_task(&env, &miner, &l).await;
    streams_stored_blob(&env, &c.token, task, &stored).await;
}

/// A `TaskResult` is accepted only for the blob its lease uploaded: a hash other than the
/// uploaded bytes', or another task's result blob, is refused and leaves the task open; the
/// right one is then accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_result_must_name_its_own_uploaded_blob() {
    let env = Env::new().await;
    let mut c = open(&env, &[]).await;
    let k_session = session_key(&env, &mut c).await;
    let miner = miner_login(&env, PrivateKeySigner::random()).await;
    let (first, _, _) = queued_task(&env, &c, &k_session).await;
    let l1 = lease(&env, &miner).await;
    let stored = run_task(&env, &miner, &l1).await;
    let other_urn = env
        .state
        .store
        .get_task(first)
        .await
        .unwrap()
        .result
        .unwrap()
        .result_urn;

    let (task, k_task, _) = queued_task(&env, &c, &k_session).await;
    let l = lease(&env, &miner).await;
    assert_eq!(l.task_id, task);
    let kid = KeyId::task(1, l.session_id, l.task_id);
    let sealed = veil_keys::seal(
        &k_task,
        &BlobParams::new(kid, Purpose::Result),
        RESULT_TEXT.as_bytes(),
    )
    .unwrap();
    let up = env
        .raw(
            "PUT",
            &format!("/api/miner/leases/{}/result", l.lease_id),
            Some(&miner.token),
            &[("content-type", "application/octet-stream")],
            Body::from(sealed.clone()),
        )
        .await;
    assert_eq!(up.status, StatusCode::CREATED);
    let urn = up.json()["urn"].as_str().unwrap().to_string();

    let got = complete(&env, &miner, &l, sha256(b"not these bytes"), &urn).await;
    refused(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "blob_hash_mismatch",
        "result.message.resultHash",
    );
    let got = complete(&env, &miner, &l, sha256(&stored), &other_urn).await;
    refused(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "result.message.resultUrn",
    );
    let t = env.state.store.get_task(task).await.unwrap();
    assert_eq!((t.state.as_str(), t.result.is_none()), ("leased", true));

    let (st, v) = complete(&env, &miner, &l, sha256(&sealed), &urn).await;
    assert_eq!(
        (st, v["status"].as_str()),
        (StatusCode::OK, Some("accepted")),
        "{v}"
    );
    let t = env.state.store.get_task(task).await.unwrap();
    let r = t.result.expect("completed");
    assert_eq!(
        (r.result_urn.as_str(), r.result_hash),
        (urn.as_str(), sha256(&sealed))
    );
}

/// A plain HTTP/1.1 request to a presigned URL of the loopback S3 server (the router's tests
/// have no HTTP client): the status and the body.
async fn http(method: &str, url: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("a plain http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..split]).to_lowercase();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = resp[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 4 + n..];
        }
        body = out;
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_upload_and_download_on_s3() {
    let s3 = S3Server::shared();
    let bucket = s3.new_bucket("veil-v3");
    let blobs = BlobStore::from_config(&StoreConfig::s3(
        S3Config::new(bucket)
            .with_provider("moto")
            .with_endpoint(s3.endpoint())
            .with_allow_http(true)
            .with_path_style(true)
            .with_region(S3Server::REGION)
            .with_credentials(S3Credentials::new(
                s3.access_key_id(),
                s3.secret_access_key(),
            )),
    ))
    .unwrap();
    let env = Env::with_blobs(|_| {}, Some(blobs)).await;
    let (_, cfg) = env.call("GET", "/api/v3/config", None, None).await;
    assert_eq!(cfg["presigned_urls"], json!(true), "{cfg}");

    let mut c = open(&env, &[]).await;
    let k_session = session_key(&env, &mut c).await;
    let presign = |task: Uuid| {
        let path = format!("/api/v3/sessions/{}/tasks/{task}/prompt/presign", c.session);
        let token = c.token.clone();
        let env = &env;
        async move {
            let got = env.call("POST", &path, Some(&token), None).await;
            let p: PresignedUrl = answer(got, StatusCode::OK);
            assert_eq!(p.method, "PUT");
            assert!(p.expires_at > unix_now() && p.expires_at <= unix_now() + 600);
            // Named as the router names this task's blobs, so the orphan sweep knows whose
            // it is if the task is never submitted.
            let name = p.urn.parse::<veil_blobstore::Urn>().unwrap();
            assert!(
                name.file_name()
                    .starts_with(&format!("{}/{task}/prompt-", c.session)),
                "{}",
                p.urn
            );
            p
        }
    };

    // A blob uploaded straight to the store is checked when the task is submitted: here one
    // under the session key.
    let task = Uuid::now_v7();
    let p = presign(task).await;
    let wrong = seal_prompt(&k_session, KeyId::session(1, c.session));
    assert_eq!(http("PUT", &p.url, &wrong).await.0, 200);
    let got = submit_signed(
        &env,
        submit_msg(&c, task, sha256(&wrong), &p.urn),
        &c.wallet,
    )
    .await;
    refused(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "task.message.promptUrn",
    );

    // A good one goes through and a miner serves it.
    let p = presign(task).await;
    let k_task = veil_keys::derive_task_key(&k_session, &task);
    let blob = seal_prompt(&k_task, KeyId::task(1, c.session, task));
    assert_eq!(http("PUT", &p.url, &blob).await.0, 200);
    let got = submit_signed(&env, submit_msg(&c, task, [9; 32], &p.urn), &c.wallet).await;
    refused(
        &got,
        StatusCode::BAD_REQUEST,
        "hash_mismatch",
        "task.message.promptHash",
    );
    let m = submit_msg(&c, task, sha256(&blob), &p.urn);
    let (st, v) = submit_signed(&env, m, &c.wallet).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let miner = miner_login(&env, PrivateKeySigner::random()).await;
    let l = lease(&env, &miner).await;
    let stored = run_task(&env, &miner, &l).await;

    let path = format!("/api/v3/tasks/{task}/result/presign");
    let got = env.call("POST", &path, Some(&c.token), None).await;
    let p: PresignedUrl = answer(got, StatusCode::OK);
    assert_eq!(p.method, "GET");
    let (status, got) = http("GET", &p.url, b"").await;
    assert_eq!((status, got), (200, stored.clone()));
    assert_result_text(&k_task, &stored);
    assert!(env.delivered(task).await);
    assert_eq!(env.audited("blob.presign").await.len(), 3);
    assert!(!env.received(CANARY.as_bytes()));
}
