//! End to end through the router and real workers: v2 completions (plain and streamed),
//! private-session allowlists, a miner killed mid-lease, a duplicate result that loses, a
//! tampered prompt blob, and the canary check over the data directory and the captured logs.

use std::time::Duration;

use serde_json::{Value, json};
use veil_miner::InstantEngine;
use veil_tests::harness::{
    TestRouter, contains, expected_chat, files_containing, files_under, http, logs, miner,
};

fn expected_e2e(engine: &InstantEngine, content: &str, max_tokens: u32, stream: bool) -> String {
    expected_chat(engine, content, max_tokens, 7, stream)
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "seed": 7})
}

/// Reads an SSE response into its `data:` payloads.
async fn sse(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v2_completion_plain_and_streamed() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let router = TestRouter::start(TestRouter::settings(dir.path())).await;
    let engine = InstantEngine::new(["tiny"]).with_token_delay(Duration::from_millis(20));
    let (worker, miner_addr) = miner(&router.url, engine.clone());
    let key = router.admin().to_string();

    let (s, v) = router
        .post(&key, "/api/v2/completions", &chat("hello there", 12))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_e2e(&engine, "hello there", 12, false)
    );
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    assert_eq!(v["usage"]["total_tokens"], 14);
    assert_eq!(v["veil"]["miner"], miner_addr.as_str());
    assert_eq!(v["veil"]["key_version"], 1);
    assert_eq!(v["veil"]["result_hash"].as_str().unwrap().len(), 64);

    // Models of connected miners.
    let (s, m) = router.get(&key, "/api/v2/models").await;
    assert_eq!(s, 200);
    assert_eq!(m["data"][0]["id"], "tiny");

    // Streamed: several content chunks that add up to the same text, then [DONE].
    let mut body = chat("hello there", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = http()
        .post(format!("{}/api/v2/completions", router.url))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = String::new();
    let mut content_chunks = 0;
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str()
            && !c.is_empty()
        {
            content_chunks += 1;
            text.push_str(c);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(text, expected_e2e(&engine, "hello there", 12, true));
    assert!(
        content_chunks >= 3,
        "tokens arrive incrementally, got {content_chunks} chunks"
    );
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(usage.unwrap()["completion_tokens"], 12);

    // Bad input names the field.
    let (s, v) = router
        .post(
            &key,
            "/api/v2/completions",
            &json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "messages[0].role");
    let (s, v) = router
        .post(
            &key,
            "/api/v2/completions",
            &json!({"model": "tiny", "messages": [], "max_tokens": 5}),
        )
        .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("messages")));

    let summary = worker.shutdown().await.unwrap();
    assert_eq!(summary.completed, 2);
    // v2 seals and opens at the edge: per completion, K_task is derived once for the router's
    // own use (it seals the prompt and opens the result with it) and once to wrap for the miner.
    let d = router.state.keys.derivations();
    assert_eq!((d.own_use, d.for_wrap), (2, 2), "{d:?}");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_session_reaches_only_allowed_miner() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let router = TestRouter::start(TestRouter::settings(dir.path())).await;
    let key = router.admin().to_string();
    let (a, a_addr) = miner(&router.url, InstantEngine::new(["tiny"]));
    let (b, b_addr) = miner(&router.url, InstantEngine::new(["tiny"]));
    let session = router
        .private_session(&key, std::slice::from_ref(&a_addr))
        .await;

    let mut calls = Vec::new();
    for i in 0..8 {
        let mut body = chat(&format!("task {i}"), 4);
        body["session_id"] = json!(session);
        body["routing_preferences"] = json!({"privacy_level": "private"});
        let r = &router;
        let key = key.clone();
        calls.push(async move { r.post(&key, "/api/v2/completions", &body).await });
    }
    for (s, v) in futures::future::join_all(calls).await {
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["veil"]["miner"], a_addr.as_str());
    }

    // B steals one of A's lease ids: refused, with a clear code, and audited.
    let lease_id = router.audit("task.lease").await[0]["detail"]["lease_id"]
        .as_str()
        .unwrap()
        .to_string();
    let stealer = logged_in_client(&router).await;
    let task_id = router.audit("task.lease").await[0]["task_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let fake = veil_api::miner::Lease {
        lease_id: lease_id.parse().unwrap(),
        task_id,
        session_id: session.parse().unwrap(),
        prompt_urn: String::new(),
        prompt_hash: Default::default(),
        key_version: 1,
        prompt_scope: 2,
        model: "tiny".into(),
        params: Default::default(),
        attempt: 1,
        lease_expires_at_ms: 0,
        lease_ttl_ms: 0,
    };
    let req = veil_miner::sign::sign_key_request(
        &stealer.wallet,
        &stealer.domain,
        &fake,
        &stealer.x.public(),
    )
    .await
    .unwrap();
    let err = stealer.client.key(fake.lease_id, &req).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert_eq!(err.code(), "lease_not_held", "{err}");
    assert!(!router.audit("key.deny").await.is_empty());

    let sa = a.shutdown().await.unwrap();
    let sb = b.shutdown().await.unwrap();
    assert_eq!(sa.completed, 8);
    assert_eq!(sb.leased, 0, "the unlisted miner leased nothing: {sb:?}");
    let released = router.audit("key.release").await;
    assert_eq!(released.len(), 8);
    assert!(released.iter().all(|e| e["miner"] == a_addr.as_str()));
    let _ = b_addr;
    router.stop().await;
}

/// A raw miner client logged in for `tiny` under a fresh wallet and X25519 key.
struct LoggedIn {
    client: veil_miner::MinerClient,
    address: String,
    wallet: alloy_signer_local::PrivateKeySigner,
    x: veil_keys::X25519Secret,
    domain: veil_api::eip712::Domain,
}

async fn logged_in_client(router: &TestRouter) -> LoggedIn {
    let client = veil_miner::MinerClient::new(&router.url).unwrap();
    let (wallet, address) = veil_tests::harness::wallet();
    let x = veil_keys::X25519Secret::generate().unwrap();
    let domain = client.config().await.unwrap().domain;
    let login = veil_miner::sign::sign_login(&wallet, &domain, &x.public())
        .await
        .unwrap();
    let resp = client
        .login(&veil_api::miner::LoginRequest {
            login,
            models: vec![veil_api::miner::ServedModel {
                name: "tiny".into(),
                sha256: None,
            }],
        })
        .await
        .unwrap();
    client.set_token(Some(resp.token));
    LoggedIn {
        client,
        address,
        wallet,
        x,
        domain,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_task_reaches_an_allowed_miner_waiting_behind_an_unlisted_one() {
    // A new task wakes one waiting lease poll, the longest-waiting. Here that is the poll of a
    // miner the session does not allow: it finds nothing and must pass the wake on to the
    // allowed miner's poll, whose wait (shorter than the router's one-second re-look) would
    // otherwise end empty.
    let dir = tempfile::tempdir().unwrap();
    let router = TestRouter::start(TestRouter::settings(dir.path())).await;
    let key = router.admin().to_string();
    let a = logged_in_client(&router).await;
    let a_addr = a.address.clone();
    let b = logged_in_client(&router).await.client;
    let a = a.client;
    let session = router
        .private_session(&key, std::slice::from_ref(&a_addr))
        .await;

    let b_poll = tokio::spawn(async move {
        b.lease(&veil_api::miner::LeaseRequest {
            wait_ms: 1_500,
            models: None,
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a_poll = tokio::spawn(async move {
        a.lease(&veil_api::miner::LeaseRequest {
            wait_ms: 900,
            models: None,
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut body = chat("for the allowed miner", 4);
    body["session_id"] = json!(session);
    let url = router.url.clone();
    let call = tokio::spawn(async move {
        http()
            .post(format!("{url}/api/v2/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
    });
    let lease = a_poll
        .await
        .unwrap()
        .unwrap()
        .expect("the allowed miner's poll got the task before its wait ended");
    assert_eq!(lease.session_id.to_string(), session);
    let b_got = b_poll.await.unwrap().unwrap();
    assert!(b_got.is_none(), "the unlisted miner leased {b_got:?}");
    call.abort();
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn miner_killed_mid_lease_task_completes_once_elsewhere() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TestRouter::settings(dir.path());
    settings.lease_ttl_ms = Some(1_000);
    let router = TestRouter::start(settings).await;
    let key = router.admin().to_string();
    // A is slow: 40 tokens at 100 ms each.
    let (a, a_addr) = miner(
        &router.url,
        InstantEngine::new(["tiny"]).with_token_delay(Duration::from_millis(100)),
    );
    let r = &router;
    let call = async move {
        r.post(&key, "/api/v2/completions", &chat("long job", 40))
            .await
    };
    let killer = async {
        // Wait until A holds the lease, then kill it without a goodbye.
        for _ in 0..100 {
            if !router.audit("key.release").await.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.kill();
        miner(&router.url, InstantEngine::new(["tiny"]))
    };
    let ((s, v), (b, b_addr)) = tokio::join!(call, killer);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["veil"]["miner"],
        b_addr.as_str(),
        "served by the second miner, not {a_addr}"
    );
    let task_id: uuid::Uuid = v["veil"]["task_id"].as_str().unwrap().parse().unwrap();
    let t = router.state.store.get_task(task_id).await.unwrap();
    assert_eq!(t.attempts, 2);
    assert_eq!(t.result.as_ref().unwrap().miner, b_addr);
    assert_eq!(
        router.audit("task.complete").await.len(),
        1,
        "completed exactly once"
    );
    assert!(
        router
            .audit("lease.expire")
            .await
            .iter()
            .any(|e| e["task_id"] == task_id.to_string())
    );
    b.shutdown().await.unwrap();
    router.stop().await;
}

/// Gets the task key for `lease`, seals `text` as its result and uploads it.
async fn upload_result(
    m: &LoggedIn,
    lease: &veil_api::miner::Lease,
    text: &str,
) -> veil_api::miner::BlobReceipt {
    let req = veil_miner::sign::sign_key_request(&m.wallet, &m.domain, lease, &m.x.public())
        .await
        .unwrap();
    let wrapped = m.client.key(lease.lease_id, &req).await.unwrap();
    let id = veil_miner::sign::task_key_id(lease);
    let key = veil_keys::unwrap_key(&m.x, &hex::decode(&wrapped.wrapped).unwrap(), &id).unwrap();
    let params = veil_keys::BlobParams::new(id, veil_keys::Purpose::Result);
    let sealed = veil_keys::seal(&key, &params, text.as_bytes()).unwrap();
    m.client.put_result(lease.lease_id, sealed).await.unwrap()
}

async fn submit_result(
    m: &LoggedIn,
    lease: &veil_api::miner::Lease,
    receipt: &veil_api::miner::BlobReceipt,
) -> String {
    let result = veil_miner::sign::sign_task_result(&m.wallet, &m.domain, lease, receipt)
        .await
        .unwrap();
    let body = veil_api::miner::CompleteRequest {
        result,
        usage: veil_api::miner::Usage {
            prompt_tokens: 1,
            completion_tokens: 1,
        },
        finish_reason: "stop".into(),
    };
    m.client
        .complete(lease.lease_id, &body)
        .await
        .unwrap()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_result_that_loses_leaves_no_blob_behind() {
    // At-least-once delivery: A's lease lapses, B gets the task, both upload a result. B's is
    // submitted first and stands; A's, submitted late, is answered "duplicate", and its blob,
    // which no task names, is deleted (and the deletion audited).
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TestRouter::settings(dir.path());
    settings.lease_ttl_ms = Some(300);
    let router = TestRouter::start(settings).await;
    let key = router.admin().to_string();
    let a = logged_in_client(&router).await;
    let b = logged_in_client(&router).await;
    let url = router.url.clone();
    let call = tokio::spawn(async move {
        http()
            .post(format!("{url}/api/v2/completions"))
            .bearer_auth(key)
            .json(&chat("twice", 4))
            .send()
            .await
    });
    let poll = veil_api::miner::LeaseRequest {
        wait_ms: 5_000,
        models: None,
    };
    let la = a
        .client
        .lease(&poll)
        .await
        .unwrap()
        .expect("A leases the task");
    let ra = upload_result(&a, &la, "from A").await;
    // A sends no heartbeat: its lease lapses and the task goes to B.
    let lb = b
        .client
        .lease(&poll)
        .await
        .unwrap()
        .expect("B leases it next");
    assert_eq!(lb.task_id, la.task_id);
    let rb = upload_result(&b, &lb, "from B").await;
    assert_ne!(ra.urn, rb.urn);

    assert_eq!(submit_result(&b, &lb, &rb).await, "accepted");
    assert_eq!(submit_result(&a, &la, &ra).await, "duplicate");
    // Submitting the standing result again deletes nothing.
    assert_eq!(submit_result(&b, &lb, &rb).await, "duplicate");

    let blobs = &router.state.blobs;
    let gone = blobs.get(&ra.urn.parse().unwrap(), &ra.sha256.0).await;
    assert!(
        matches!(gone, Err(veil_blobstore::Error::NotFound { .. })),
        "the losing result's blob is deleted: {:?}",
        gone.map(|b| b.len())
    );
    blobs
        .get(&rb.urn.parse().unwrap(), &rb.sha256.0)
        .await
        .expect("the standing result's blob stays");
    let t = router.state.store.get_task(la.task_id).await.unwrap();
    assert_eq!(t.result.unwrap().result_urn, rb.urn);
    let deletions = router.audit("blob.delete").await;
    assert_eq!(deletions.len(), 1, "{deletions:?}");
    assert_eq!(deletions[0]["detail"]["reason"], "duplicate");
    assert_eq!(deletions[0]["detail"]["urn"], ra.urn.as_str());
    call.abort();
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_prompt_blob_fails_clearly_and_is_left_untouched() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let router = TestRouter::start(TestRouter::settings(dir.path())).await;
    let key = router.admin().to_string();
    let r = &router;
    let k2 = key.clone();
    let call = async move {
        r.post(&k2, "/api/v2/completions", &chat("tamper me", 4))
            .await
    };
    let tamper = async {
        // Find the queued task's blob on disk and flip its last byte, then start a miner.
        let mut blob = None;
        for _ in 0..100 {
            let found: Vec<_> = files_under(&dir.path().join("blobs"))
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "veil"))
                .collect();
            if let Some(p) = found.first() {
                blob = Some(p.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let path = blob.expect("prompt blob written");
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (w, _) = miner(&router.url, InstantEngine::new(["tiny"]));
        (path, bytes, w)
    };
    let ((s, v), (path, tampered, w)) = tokio::join!(call, tamper);
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["code"], "prompt_tampered");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        tampered,
        "the stored blob is left as it was found"
    );
    let summary = w.shutdown().await.unwrap();
    assert_eq!(summary.completed, 0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canary_prompt_leaves_no_trace_at_rest_or_in_logs() {
    let logs = logs();
    let canary = format!("CANARY-{}-do-not-store", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let router = TestRouter::start(TestRouter::settings(dir.path())).await;
    let key = router.admin().to_string();
    let (w, _) = miner(
        &router.url,
        InstantEngine::new(["tiny"]).with_token_delay(Duration::from_millis(5)),
    );
    let (s, v) = router
        .post(
            &key,
            "/api/v2/completions",
            &chat(&format!("secret: {canary}"), 8),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mut body = chat(&canary, 8);
    body["stream"] = json!(true);
    let resp = http()
        .post(format!("{}/api/v2/completions", router.url))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let ev = sse(resp).await;
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    // A malformed body that carries the canary in the wrong field.
    let (s, _) = router
        .post(
            &key,
            "/api/v2/completions",
            &json!({"model": "tiny", "messages": canary}),
        )
        .await;
    assert_eq!(s, 400);
    w.shutdown().await.unwrap();
    router.stop().await;

    let files = files_under(dir.path());
    assert!(
        files
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "veil")),
        "blobs were written"
    );
    assert!(
        files.iter().any(|p| p.to_string_lossy().ends_with(".db")),
        "the database is there"
    );
    assert_eq!(
        files_containing(dir.path(), canary.as_bytes()),
        Vec::<std::path::PathBuf>::new(),
        "canary at rest"
    );
    let captured = logs.lock().unwrap().clone();
    assert!(
        captured.len() > 1000,
        "logs were captured ({} bytes)",
        captured.len()
    );
    assert!(
        !contains(&captured, canary.as_bytes()),
        "canary found in the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn official_openai_python_client_gets_a_completion_and_a_stream() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let router = TestRouter::start(TestRouter::settings(dir.path())).await;
    let engine = InstantEngine::new(["tiny"]).with_token_delay(Duration::from_millis(10));
    let (w, _) = miner(&router.url, engine.clone());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_client.py");
    let base = format!("{}/api/v2", router.url);
    let key = router.admin().to_string();
    let out =
        tokio::process::Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
            .arg(&script)
            .args([base.as_str(), key.as_str(), "tiny"])
            .output()
            .await
            .expect("python3 runs");
    assert!(
        out.status.success(),
        "the openai client failed (the test command installs it from PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = expected_e2e(&engine, "hello from the openai client", 10, false);
    assert_eq!(v["text"], want.as_str());
    assert_eq!(v["completion_tokens"], 10);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(
        v["stream_text"],
        expected_e2e(&engine, "hello from the openai client", 10, true).as_str()
    );
    assert!(v["stream_chunks"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["stream_finish"], "length");
    w.shutdown().await.unwrap();
    router.stop().await;
}
