//! The worker against a small in-process stand-in for the router's miner API: it checks every
//! signature, wraps real task keys, serves real sealed prompts and records what the miner sends.
//! The real router is exercised by the end-to-end suite in the top-level `tests/`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy_primitives::Address;
use alloy_signer_local::PrivateKeySigner;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use veil_api::eip712::{Domain, KeyRequest, MinerLogin, Signed};
use veil_api::miner::{
    BlobReceipt, ChatMessage, CompleteRequest, CompleteResponse, HeartbeatResponse, Lease,
    LeaseRequest, LoginRequest, LoginResponse, MinerConfig, PromptPayload, ReleaseRequest,
    TaskParams, WrappedKey,
};
use veil_api::routes;
use veil_api::wire::Hex32;
use veil_api::{ErrorBody, ErrorDetail};
use veil_keys::{BlobParams, KeyId, Opener, Purpose, SecretKey, X25519Public, X25519Secret};
use veil_miner::{Error, InstantEngine, MinerClient, RunSummary, Worker};

const CHAIN: u64 = 31337;

fn domain() -> Domain {
    Domain::without_contract(CHAIN)
}

fn now() -> u64 {
    veil_miner::sign::unix_now()
}

struct Task {
    lease: Lease,
    key: SecretKey,
    blob: Vec<u8>,
    prompt: PromptPayload,
}

#[derive(Default)]
struct Uploaded {
    blob: Vec<u8>,
    /// Arrival time of every body piece.
    pieces: Vec<Instant>,
}

#[derive(Default)]
struct MockState {
    queue: VecDeque<Lease>,
    tasks: HashMap<Uuid, Task>,
    miner: Option<(Address, X25519Public)>,
    tokens: Vec<String>,
    logins: u32,
    /// Answer the next N lease calls with 401.
    unauthorized_leases: u32,
    /// Heartbeats of these leases answer 409 lease_expired.
    expired: Vec<Uuid>,
    heartbeats: u32,
    uploads: HashMap<Uuid, Uploaded>,
    completed: Vec<(Uuid, CompleteRequest)>,
    released: Vec<(Uuid, String)>,
    failed: Vec<(Uuid, String)>,
    /// Lease requests in flight now, and the most seen at once.
    polling: u32,
    max_polling: u32,
}

#[derive(Clone, Default)]
struct Mock(Arc<Mutex<MockState>>);

fn err(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: code.replace('_', " "),
                kind: "invalid_request_error".into(),
                param: None,
            },
        }),
    )
        .into_response()
}

impl Mock {
    fn state(&self) -> std::sync::MutexGuard<'_, MockState> {
        self.0.lock().unwrap()
    }

    /// Queues a task whose prompt is sealed as the router would seal it.
    fn add_task(&self, text: &str, params: TaskParams, tamper: bool) -> Uuid {
        let (session_id, task_id) = (Uuid::now_v7(), Uuid::now_v7());
        let key = SecretKey::generate().unwrap();
        let prompt = PromptPayload {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: text.into(),
            }],
            prompt: None,
            stop: vec![],
        };
        let plaintext = serde_json::to_vec(&prompt).unwrap();
        let bp = BlobParams::new(KeyId::task(1, session_id, task_id), Purpose::Prompt);
        let mut blob = veil_keys::seal(&key, &bp, &plaintext).unwrap();
        let prompt_hash: [u8; 32] = Sha256::digest(&blob).into();
        if tamper {
            // Flip a ciphertext bit and keep the advertised hash consistent with the bytes
            // served, so that only the AEAD can notice.
            let last = blob.len() - 1;
            blob[last] ^= 1;
        }
        let prompt_hash = if tamper {
            Sha256::digest(&blob).into()
        } else {
            prompt_hash
        };
        let lease = Lease {
            lease_id: Uuid::now_v7(),
            task_id,
            session_id,
            prompt_urn: format!("urn:blob:v1:mem:local:prompts:{task_id}"),
            prompt_hash: Hex32(prompt_hash),
            key_version: 1,
            prompt_scope: 2,
            model: "instant".into(),
            params,
            attempt: 1,
            lease_expires_at_ms: 0,
            lease_ttl_ms: 3_000,
        };
        let mut s = self.state();
        s.queue.push_back(lease.clone());
        s.tasks.insert(
            lease.lease_id,
            Task {
                lease,
                key,
                blob,
                prompt,
            },
        );
        task_id
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let got = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        got.is_some_and(|t| self.state().tokens.last() == Some(&t))
    }

    fn lease_for(&self, id: &str) -> Option<Lease> {
        let id: Uuid = id.parse().ok()?;
        self.state().tasks.get(&id).map(|t| t.lease.clone())
    }
}

async fn config() -> Json<MinerConfig> {
    Json(MinerConfig {
        protocol_version: 1,
        domain: domain(),
        lease_ttl_ms: 3_000,
        max_wait_ms: 1_000,
    })
}

async fn login(State(m): State<Mock>, Json(req): Json<LoginRequest>) -> Response {
    let signed: &Signed<MinerLogin> = &req.login;
    let Ok(addr) = signed.verify(&domain(), now()) else {
        return err(StatusCode::UNAUTHORIZED, "bad_signature");
    };
    assert_eq!(req.models[0].name, "instant");
    let mut s = m.state();
    s.logins += 1;
    let token = format!("token-{}", s.logins);
    s.tokens.push(token.clone());
    s.miner = Some((addr, X25519Public::from_bytes(signed.message.recipient.0)));
    Json(LoginResponse {
        token,
        miner: addr.to_checksum(None),
        expires_at: now() + 3600,
    })
    .into_response()
}

async fn lease(
    State(m): State<Mock>,
    headers: HeaderMap,
    Json(req): Json<LeaseRequest>,
) -> Response {
    {
        let mut s = m.state();
        if s.unauthorized_leases > 0 {
            s.unauthorized_leases -= 1;
            return err(StatusCode::UNAUTHORIZED, "token_expired");
        }
    }
    if !m.authorized(&headers) {
        return err(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    assert!(req.wait_ms <= 1_000);
    {
        let mut s = m.state();
        s.polling += 1;
        s.max_polling = s.max_polling.max(s.polling);
    }
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms.min(200));
    let answer = loop {
        if let Some(l) = m.state().queue.pop_front() {
            break Json(l).into_response();
        }
        if Instant::now() >= deadline {
            break StatusCode::NO_CONTENT.into_response();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    m.state().polling -= 1;
    answer
}

async fn heartbeat(State(m): State<Mock>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !m.authorized(&headers) {
        return err(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let Some(lease) = m.lease_for(&id) else {
        return err(StatusCode::NOT_FOUND, "lease_not_found");
    };
    let mut s = m.state();
    s.heartbeats += 1;
    if s.expired.contains(&lease.lease_id) {
        return err(StatusCode::CONFLICT, "lease_expired");
    }
    Json(HeartbeatResponse {
        lease_expires_at_ms: 0,
    })
    .into_response()
}

async fn key(
    State(m): State<Mock>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(req): Json<Signed<KeyRequest>>,
) -> Response {
    if !m.authorized(&headers) {
        return err(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let Some(lease) = m.lease_for(&id) else {
        return err(StatusCode::NOT_FOUND, "lease_not_found");
    };
    let s = m.state();
    let (miner, recipient) = s.miner.unwrap();
    match req.verify(&domain(), now()) {
        Ok(a) if a == miner => {}
        _ => return err(StatusCode::FORBIDDEN, "bad_signature"),
    }
    let msg = &req.message;
    if msg.scope != 2
        || msg.task_id != lease.task_id
        || msg.session_id != lease.session_id
        || msg.key_version != lease.key_version
        || msg.recipient.0 != *recipient.as_bytes()
    {
        return err(StatusCode::FORBIDDEN, "not_allowed");
    }
    let task = &s.tasks[&lease.lease_id];
    let id = KeyId::task(1, lease.session_id, lease.task_id);
    let wrapped = veil_keys::wrap_key(&recipient, &task.key, &id).unwrap();
    Json(WrappedKey {
        wrapped: hex::encode(wrapped),
        key_version: 1,
        scope: 2,
    })
    .into_response()
}

async fn prompt(State(m): State<Mock>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !m.authorized(&headers) {
        return err(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let id: Uuid = id.parse().unwrap();
    let blob = m.state().tasks[&id].blob.clone();
    blob.into_response()
}

async fn result(
    State(m): State<Mock>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    if !m.authorized(&headers) {
        return err(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let Some(lease) = m.lease_for(&id) else {
        return err(StatusCode::NOT_FOUND, "lease_not_found");
    };
    let mut stream = body.into_data_stream();
    let mut up = Uploaded::default();
    while let Some(piece) = stream.next().await {
        let Ok(piece) = piece else {
            return err(StatusCode::BAD_REQUEST, "body_aborted");
        };
        up.pieces.push(Instant::now());
        up.blob.extend_from_slice(&piece);
    }
    let sha256: [u8; 32] = Sha256::digest(&up.blob).into();
    let size = up.blob.len() as u64;
    m.state().uploads.insert(lease.lease_id, up);
    Json(BlobReceipt {
        urn: format!("urn:blob:v1:mem:local:results:{}", lease.task_id),
        sha256: Hex32(sha256),
        size,
    })
    .into_response()
}

async fn complete(
    State(m): State<Mock>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(req): Json<CompleteRequest>,
) -> Response {
    if !m.authorized(&headers) {
        return err(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let Some(lease) = m.lease_for(&id) else {
        return err(StatusCode::NOT_FOUND, "lease_not_found");
    };
    let mut s = m.state();
    let (miner, _) = s.miner.unwrap();
    assert_eq!(req.result.recover(&domain()).unwrap(), miner);
    let hash = req.result.message.result_hash;
    s.completed.push((lease.lease_id, req));
    Json(CompleteResponse {
        status: "accepted".into(),
        result_hash: hash,
    })
    .into_response()
}

async fn release(
    State(m): State<Mock>,
    Path(id): Path<String>,
    Json(req): Json<ReleaseRequest>,
) -> StatusCode {
    let id: Uuid = id.parse().unwrap();
    m.state().released.push((id, req.reason));
    StatusCode::NO_CONTENT
}

async fn fail(
    State(m): State<Mock>,
    Path(id): Path<String>,
    Json(req): Json<ReleaseRequest>,
) -> StatusCode {
    let id: Uuid = id.parse().unwrap();
    m.state().failed.push((id, req.reason));
    StatusCode::NO_CONTENT
}

async fn start_mock() -> (Mock, String) {
    let mock = Mock::default();
    let app = axum::Router::new()
        .route(routes::MINER_CONFIG, get(config))
        .route(routes::MINER_LOGIN, post(login))
        .route(routes::MINER_LEASE, post(lease))
        .route(routes::MINER_HEARTBEAT, post(heartbeat))
        .route(routes::MINER_KEY, post(key))
        .route(routes::MINER_PROMPT, get(prompt))
        .route(routes::MINER_RESULT, put(result))
        .route(routes::MINER_COMPLETE, post(complete))
        .route(routes::MINER_RELEASE, post(release))
        .route(routes::MINER_FAIL, post(fail))
        .with_state(mock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (mock, url)
}

fn worker(url: &str, wallet: PrivateKeySigner, engine: InstantEngine) -> veil_miner::WorkerBuilder {
    Worker::builder()
        .router_url(url)
        .wallet(wallet)
        .identity(X25519Secret::generate().unwrap())
        .engine(engine)
        .lease_wait(Duration::from_millis(500))
        .retry(Duration::from_millis(10), Duration::from_millis(50), 3)
}

/// Waits until `done` holds for the mock's state.
async fn wait_for(m: &Mock, done: impl Fn(&MockState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&m.state()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the worker"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn open_result(m: &Mock, lease_id: Uuid) -> (String, usize) {
    let s = m.state();
    let task = &s.tasks[&lease_id];
    let up = &s.uploads[&lease_id];
    let mut opener = Opener::new(&task.key);
    let chunks = opener.push(&up.blob).unwrap();
    let header = opener.finish().unwrap();
    assert_eq!(
        header.key,
        KeyId::task(1, task.lease.session_id, task.lease.task_id)
    );
    assert_eq!(header.purpose, Purpose::Result);
    let text: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    (String::from_utf8(text).unwrap(), chunks.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_tasks_concurrently_with_signed_results() -> anyhow::Result<()> {
    let (m, url) = start_mock().await;
    let engine = InstantEngine::default().with_token_delay(Duration::from_millis(5));
    for i in 0..5 {
        m.add_task(&format!("prompt number {i}"), TaskParams::default(), false);
    }
    let wallet = PrivateKeySigner::random();
    let address = wallet.address();
    let handle = worker(&url, wallet, engine.clone())
        .concurrency(3)
        .expected_chain_id(CHAIN)
        .build()?
        .spawn();
    wait_for(&m, |s| s.completed.len() == 5).await;
    let summary = handle.shutdown().await?;
    assert_eq!(
        summary,
        RunSummary {
            leased: 5,
            completed: 5,
            steps: summary.steps,
            ..RunSummary::default()
        }
    );
    // Every completed task's steps were timed.
    assert_eq!(summary.steps.tasks, 5);
    assert!(summary.steps.generate_us > 0 && summary.steps.key_us > 0);

    let completed = m.state().completed.clone();
    for (lease_id, req) in completed {
        let (text, _) = open_result(&m, lease_id);
        let s = m.state();
        let task = &s.tasks[&lease_id];
        assert_eq!(
            text,
            engine
                .expected_text(&task.prompt, &task.lease.params)
                .as_str()
        );
        let msg = &req.result.message;
        assert_eq!(req.result.recover(&domain())?, address);
        assert_eq!(msg.task_id, task.lease.task_id);
        assert_eq!(msg.prompt_hash, task.lease.prompt_hash);
        let uploaded: [u8; 32] = Sha256::digest(&s.uploads[&lease_id].blob).into();
        assert_eq!(msg.result_hash.0, uploaded);
        assert_eq!(req.usage.completion_tokens, 16);
        assert_eq!(req.usage.prompt_tokens, 3);
        assert_eq!(req.finish_reason, "length");
    }
    assert!(m.state().released.is_empty() && m.state().failed.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_lease_pollers_in_flight_within_free_slots() -> anyhow::Result<()> {
    // Three pollers for eight slots: three lease requests at once, never more.
    let (m, url) = start_mock().await;
    let handle = worker(&url, PrivateKeySigner::random(), InstantEngine::default())
        .concurrency(8)
        .lease_pollers(3)
        .build()?
        .spawn();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(m.state().max_polling, 3);
    // Tasks still complete with several pollers.
    for i in 0..6 {
        m.add_task(&format!("prompt {i}"), TaskParams::default(), false);
    }
    wait_for(&m, |s| s.completed.len() == 6).await;
    assert_eq!(handle.shutdown().await?.completed, 6);

    // Pollers never exceed the free slots: two slots, default pollers (4).
    let (m, url) = start_mock().await;
    let handle = worker(&url, PrivateKeySigner::random(), InstantEngine::default())
        .concurrency(2)
        .build()?
        .spawn();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(m.state().max_polling, 2);
    handle.shutdown().await?;

    // Zero pollers is a configuration error.
    let e = worker(&url, PrivateKeySigner::random(), InstantEngine::default())
        .lease_pollers(0)
        .build()
        .expect_err("zero pollers");
    assert!(e.to_string().contains("lease_pollers"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_one_sealed_frame_per_token_as_generated() -> anyhow::Result<()> {
    let (m, url) = start_mock().await;
    let engine = InstantEngine::default().with_token_delay(Duration::from_millis(40));
    let params = TaskParams {
        max_tokens: Some(8),
        stream: true,
        ..TaskParams::default()
    };
    m.add_task("stream this please", params, false);
    let handle = worker(&url, PrivateKeySigner::random(), engine)
        .build()?
        .spawn();
    wait_for(&m, |s| s.completed.len() == 1).await;
    handle.shutdown().await?;

    let lease_id = m.state().completed[0].0;
    let (_, chunks) = open_result(&m, lease_id);
    // One chunk per token plus the empty last chunk.
    assert_eq!(chunks, 9);
    let s = m.state();
    let pieces = &s.uploads[&lease_id].pieces;
    // The body arrived in pieces while the engine ran, not in one go at the end.
    assert!(pieces.len() >= 5, "{} body pieces", pieces.len());
    let spread = *pieces.last().unwrap() - pieces[0];
    assert!(spread >= Duration::from_millis(200), "{spread:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_prompt_fails_the_task() -> anyhow::Result<()> {
    let (m, url) = start_mock().await;
    m.add_task("poisoned", TaskParams::default(), true);
    let handle = worker(&url, PrivateKeySigner::random(), InstantEngine::default())
        .build()?
        .spawn();
    wait_for(&m, |s| !s.failed.is_empty()).await;
    let summary = handle.shutdown().await?;
    assert_eq!(summary.failed, 1);
    let s = m.state();
    assert_eq!(s.failed[0].1, "prompt_tampered");
    assert!(s.completed.is_empty() && s.uploads.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_error_releases_the_task() -> anyhow::Result<()> {
    let (m, url) = start_mock().await;
    m.add_task("this will break", TaskParams::default(), false);
    let engine = InstantEngine::default().with_failure_after(4);
    let handle = worker(&url, PrivateKeySigner::random(), engine)
        .build()?
        .spawn();
    wait_for(&m, |s| !s.released.is_empty()).await;
    let summary = handle.shutdown().await?;
    assert_eq!(summary.released, 1);
    let s = m.state();
    assert_eq!(s.released[0].1, "engine_error");
    assert!(s.completed.is_empty());
    // The upload was abandoned before a last frame: nothing was stored.
    assert!(s.uploads.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_stops_the_work() -> anyhow::Result<()> {
    let (m, url) = start_mock().await;
    m.add_task("slow one", TaskParams::default(), false);
    let lease_id = m.state().queue[0].lease_id;
    m.state().expired.push(lease_id);
    let engine = InstantEngine::default().with_token_delay(Duration::from_millis(100));
    let handle = worker(&url, PrivateKeySigner::random(), engine)
        .heartbeat_interval(Duration::from_millis(50))
        .build()?
        .spawn();
    wait_for(&m, |s| s.heartbeats > 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let summary = handle.shutdown().await?;
    assert_eq!(summary.lost, 1);
    let s = m.state();
    assert!(s.completed.is_empty() && s.released.is_empty() && s.failed.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_goes_silent() -> anyhow::Result<()> {
    let (m, url) = start_mock().await;
    m.add_task("killed mid-lease", TaskParams::default(), false);
    let engine = InstantEngine::default().with_token_delay(Duration::from_millis(200));
    let handle = worker(&url, PrivateKeySigner::random(), engine)
        .heartbeat_interval(Duration::from_millis(20))
        .build()?
        .spawn();
    wait_for(&m, |s| s.heartbeats >= 2).await;
    handle.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let beats = m.state().heartbeats;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No more heartbeats (the lease will lapse), and nothing was completed or released.
    let s = m.state();
    assert_eq!(s.heartbeats, beats);
    assert!(s.completed.is_empty() && s.released.is_empty() && s.failed.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_again_on_401() -> anyhow::Result<()> {
    let (m, url) = start_mock().await;
    m.state().unauthorized_leases = 1;
    m.add_task("after a new login", TaskParams::default(), false);
    let handle = worker(&url, PrivateKeySigner::random(), InstantEngine::default())
        .build()?
        .spawn();
    wait_for(&m, |s| s.completed.len() == 1).await;
    handle.shutdown().await?;
    assert_eq!(m.state().logins, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_tasks_past_the_grace_period() -> anyhow::Result<()> {
    let (m, url) = start_mock().await;
    m.add_task("never finishes in time", TaskParams::default(), false);
    let engine = InstantEngine::default().with_token_delay(Duration::from_secs(1));
    let handle = worker(&url, PrivateKeySigner::random(), engine)
        .grace_period(Duration::from_millis(100))
        .build()?
        .spawn();
    wait_for(&m, |s| s.queue.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let summary = handle.shutdown().await?;
    assert_eq!(summary.released, 1);
    assert_eq!(m.state().released[0].1, "shutdown");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_router_on_another_chain() -> anyhow::Result<()> {
    let (_m, url) = start_mock().await;
    let err = worker(&url, PrivateKeySigner::random(), InstantEngine::default())
        .expected_chain_id(1)
        .build()?
        .run(std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ChainMismatch {
                expected: 1,
                got: CHAIN
            }
        ),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_error_codes() -> anyhow::Result<()> {
    let (_m, url) = start_mock().await;
    let client = MinerClient::new(&url)?;
    // No login: the router's 401 comes back with its code.
    let e = client
        .lease(&LeaseRequest {
            wait_ms: 0,
            models: None,
        })
        .await
        .unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    assert_eq!(e.code(), "unauthorized");
    assert_eq!(e.status(), Some(401));
    Ok(())
}
