//! The `/api/v3` client end to end, against an in-process router and an in-process
//! instant-engine miner: completions plain and streamed, reconnecting from a second client,
//! task and result, key rotation and retirement, a tampered result, a wrong wallet, a closed
//! session; and the retry policy against a scripted HTTP server.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::signers::local::PrivateKeySigner;
use futures::StreamExt;
use serde_json::{Value, json};
use support::{Env, MODEL, expected, expected_with_stop, file_with_hash};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use veil_sdk::{
    Client, Completion, CompletionRequest, Error, Session, SessionKind, SessionOptions,
};
use veil_testkit::{files_containing, files_under};

fn request(content: &str, max_tokens: u32, seed: u64) -> CompletionRequest {
    CompletionRequest::user(MODEL, content)
        .max_tokens(max_tokens)
        .seed(seed)
}

/// The verified answer to `request(content, max_tokens, seed)` in `session`.
async fn complete(
    client: &Client,
    session: &Session,
    content: &str,
    max_tokens: u32,
    seed: u64,
) -> Completion {
    client
        .complete(session, &request(content, max_tokens, seed))
        .await
        .unwrap()
}

/// A fresh wallet, a client of `env` signing with it, and a session it opened.
async fn open_session(env: &Env) -> (PrivateKeySigner, Client, Session) {
    let wallet = PrivateKeySigner::random();
    let client = env.client(&wallet);
    let session = client.open_session(SessionOptions::new()).await.unwrap();
    (wallet, client, session)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completion_and_stream_give_the_same_verified_text() {
    let env = Env::start().await;
    let wallet = PrivateKeySigner::random();
    let client = env.client(&wallet);

    let cfg = client.config().await.unwrap();
    assert_eq!(cfg.protocol_version, 1);
    assert_eq!(cfg.active_key_version, 1);

    let session = client
        .open_session(SessionOptions::new().kind(SessionKind::Dedicated))
        .await
        .unwrap();
    let info = session.info();
    assert_eq!(info.owner, wallet.address().to_checksum(None));
    assert_eq!(info.kind, "dedicated");
    assert!(session.token_expires_at().is_some());

    let canary = "canary-7f3a9c the secret prompt text";
    let want = expected(&env.engine, canary, 12, 7);
    let c = complete(&client, &session, canary, 12, 7).await;
    assert_eq!(c.text.as_str(), want);
    assert_eq!(c.miner, env.miner_address);
    assert_eq!(c.key_version, 1);
    assert_eq!(c.session_id, session.id());
    assert_eq!(c.model, MODEL);
    assert_eq!(c.usage.completion_tokens, 12);
    assert_eq!(c.finish_reason, "length");
    assert!(
        !format!("{c:?}").contains(&want),
        "Debug shows no plaintext"
    );

    let mut stream = client
        .complete_stream(&session, &request(canary, 12, 7))
        .await
        .unwrap();
    let task_id = stream.task_id();
    assert_ne!(task_id, c.task_id);
    let mut deltas = Vec::new();
    while let Some(d) = stream.next().await {
        deltas.push(d.unwrap());
    }
    assert_eq!(deltas.concat(), want);
    assert!(deltas.len() > 1, "streamed in pieces: {}", deltas.len());
    let summary = stream.summary().expect("verified summary");
    assert_eq!(summary.task_id, task_id);
    assert_eq!(summary.miner, env.miner_address);
    assert_eq!(summary.result_hash.to_string().len(), 64);

    // A stop sequence travels sealed in the prompt (the router refuses it in the clear) and
    // still ends the output.
    let stopped = client
        .complete(&session, &request(canary, 12, 7).stop(" "))
        .await
        .unwrap();
    assert_eq!(stopped.finish_reason, "stop");
    assert_eq!(
        stopped.text.as_str(),
        expected_with_stop(&env.engine, canary, 12, 7, " ")
    );
    assert!(!stopped.text.is_empty() && !stopped.text.contains(' '));

    // No prompt or result text at rest anywhere in the router's data directory (a blob that
    // retention deletes while this looks is gone either way).
    assert!(!files_under(env.dir.path()).is_empty());
    for needle in [&b"canary-7f3a9c"[..], want.as_bytes()] {
        let found = files_containing(env.dir.path(), needle);
        assert!(found.is_empty(), "{found:?}");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_client_resumes_the_session_and_reads_tasks() {
    let env = Env::start().await;
    let wallet = PrivateKeySigner::random();
    let first = env.client(&wallet);
    let session = first
        .open_session(SessionOptions::new().ttl(Duration::from_secs(3600)))
        .await
        .unwrap();
    let c = complete(&first, &session, "resume me", 6, 1).await;

    // Another process with the same wallet.
    let second = env.client(&wallet);
    let resumed = second.resume_session(session.id()).await.unwrap();
    assert_eq!(resumed.id(), session.id());
    assert_eq!(resumed.cached_key_versions(), vec![1]);
    assert!(resumed.info().expires_at_ms.is_some());
    let info = second.session(session.id()).await.unwrap();
    assert_eq!(info.owner, wallet.address().to_checksum(None));

    let task = second.task(&resumed, c.task_id).await.unwrap();
    assert_eq!(task.state, "completed");
    let r = task.result.as_ref().unwrap();
    assert_eq!(r.signed.message.result_hash, c.result_hash);

    let again = second.result(&resumed, c.task_id).await.unwrap();
    assert_eq!(again.text.as_str(), c.text.as_str());
    assert_eq!(again.miner, c.miner);

    // A task that does not exist (or is not this session's).
    let missing = second
        .task(&resumed, uuid::Uuid::now_v7())
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::NotFound { .. }), "{missing}");

    // Submit without waiting, then wait and read.
    let t = second
        .submit(&resumed, &request("later", 4, 2))
        .await
        .unwrap();
    let done = second.wait(&resumed, t.task_id).await.unwrap();
    assert_eq!(done.state, "completed");
    let later = second.result(&resumed, t.task_id).await.unwrap();
    assert_eq!(later.text.as_str(), expected(&env.engine, "later", 4, 2));

    // Closing: no new tasks.
    second.close_session(&resumed).await.unwrap();
    assert!(resumed.info().closed_at_ms.is_some());
    assert!(resumed.cached_key_versions().is_empty());
    let err = first
        .complete(&session, &request("too late", 4, 2))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SessionClosed), "{err}");
    let err = env.client(&wallet).resume_session(session.id()).await;
    assert!(matches!(err, Err(Error::SessionClosed)), "{err:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_keeps_old_results_readable_and_retirement_refuses_them() {
    let env = Env::start().await;
    let (wallet, client, session) = open_session(&env).await;
    let old = complete(&client, &session, "before rotation", 5, 3).await;
    assert_eq!(old.key_version, 1);

    let (st, v) = env.admin_post("/api/admin/keys/rotate", &json!({})).await;
    assert_eq!(st, 200, "{v}");

    // The client's cached config still says version 1: the router answers key_version_stale
    // and the client reseals once under version 2.
    let new = complete(&client, &session, "after rotation", 5, 3).await;
    assert_eq!(new.key_version, 2);
    assert_eq!(
        new.text.as_str(),
        expected(&env.engine, "after rotation", 5, 3)
    );

    // A fresh client fetches K_session of version 1 for the old result.
    let fresh = env.client(&wallet);
    let s = fresh.resume_session(session.id()).await.unwrap();
    assert_eq!(s.cached_key_versions(), vec![2]);
    let reread = fresh.result(&s, old.task_id).await.unwrap();
    assert_eq!(reread.text.as_str(), old.text.as_str());
    assert_eq!(reread.key_version, 1);
    assert_eq!(s.cached_key_versions(), vec![1, 2]);

    let (st, v) = env
        .admin_post("/api/admin/keys/retire", &json!({"up_to": 1}))
        .await;
    assert_eq!(st, 200, "{v}");
    let later = env.client(&wallet);
    let s = later.resume_session(session.id()).await.unwrap();
    let err = later.result(&s, old.task_id).await.unwrap_err();
    assert!(
        matches!(err, Error::KeyVersionRetired { version: Some(1) }),
        "{err}"
    );
    assert!(err.to_string().contains("operator"), "{err}");
    // The new result still opens.
    let ok = later.result(&s, new.task_id).await.unwrap();
    assert_eq!(ok.text.as_str(), new.text.as_str());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_result_is_an_integrity_error() {
    let env = Env::start().await;
    let (_, client, session) = open_session(&env).await;
    let c = complete(&client, &session, "tamper with my answer", 8, 4).await;
    let path = file_with_hash(&env.blob_dir(), &c.result_hash.to_string())
        .expect("the result blob is stored");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let err = client.result(&session, c.task_id).await.unwrap_err();
    assert!(matches!(err, Error::Integrity(_)), "{err}");
    assert_eq!(err.code(), "integrity");
    // Left as it is.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_wallet_is_not_the_owner() {
    let env = Env::start().await;
    let (_owner, _client, session) = open_session(&env).await;

    let stranger = env.client(&PrivateKeySigner::random());
    let err = stranger.resume_session(session.id()).await.unwrap_err();
    assert!(matches!(err, Error::NotOwner { .. }), "{err}");
    assert!(err.to_string().contains("wallet that opened it"), "{err}");

    // An unknown session.
    let err = stranger
        .resume_session(uuid::Uuid::now_v7())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompts_go_through_presigned_urls_when_the_store_signs_them() {
    let (store, _server) = support::s3_store();
    let env = Env::start_with(Some(store)).await;
    let wallet = PrivateKeySigner::random();
    let client = env.client(&wallet);
    assert!(client.config().await.unwrap().presigned_urls);
    let session = client.open_session(SessionOptions::new()).await.unwrap();
    let c = complete(&client, &session, "straight to the bucket", 5, 8).await;
    assert_eq!(
        c.text.as_str(),
        expected(&env.engine, "straight to the bucket", 5, 8)
    );
    let actions = env.audit_actions().await;
    assert!(actions.iter().any(|a| a == "blob.presign"), "{actions:?}");
    assert!(!actions.iter().any(|a| a == "prompt.upload"), "{actions:?}");

    // Turned off in the builder: through the router.
    let direct = Client::builder(&env.url)
        .signer(wallet.clone())
        .presigned_uploads(false)
        .build()
        .unwrap();
    let s = direct.resume_session(session.id()).await.unwrap();
    let d = complete(&direct, &s, "through the router", 5, 8).await;
    assert_eq!(
        d.text.as_str(),
        expected(&env.engine, "through the router", 5, 8)
    );
    let actions = env.audit_actions().await;
    assert!(actions.iter().any(|a| a == "prompt.upload"), "{actions:?}");
    env.stop().await;
}

// ---- retries, against a scripted server ----

/// A tiny HTTP/1.1 server that answers each request with the next scripted response and
/// records the request bodies.
async fn scripted(responses: Vec<String>) -> (String, Arc<Mutex<Vec<(Instant, String)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for resp in responses {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then the body by Content-Length.
            loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = String::from_utf8_lossy(&buf[end + 4..]).to_string();
                    log.lock().unwrap().push((Instant::now(), body));
                    break;
                }
            }
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    });
    (url, seen)
}

fn http(status: &str, headers: &[&str], body: &str) -> String {
    let mut s = format!(
        "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.push_str(body);
    s
}

/// A client of a scripted server: `retries` retries, 10 ms apart at first.
fn scripted_client(url: &str, wallet: PrivateKeySigner, retries: usize) -> Client {
    Client::builder(url)
        .signer(wallet)
        .retries(retries, Duration::from_millis(10))
        .build()
        .unwrap()
}

fn config_json() -> String {
    json!({
        "protocol_version": 1,
        "domain": {"chainId": 31337, "verifyingContract": "0x0000000000000000000000000000000000000000"},
        "active_key_version": 1,
        "min_decrypt_version": 1,
        "max_blob_bytes": 1 << 20,
        "presigned_urls": false
    })
    .to_string()
}

#[tokio::test]
async fn transient_failures_are_retried_and_retry_after_is_honoured() {
    let busy =
        r#"{"error":{"code":"rate_limited","message":"slow down","type":"rate_limit_error"}}"#;
    let (url, seen) = scripted(vec![
        http("503 Service Unavailable", &[], "{}"),
        http("429 Too Many Requests", &["retry-after: 1"], busy),
        http("200 OK", &[], &config_json()),
    ])
    .await;
    let client = scripted_client(&url, PrivateKeySigner::random(), 3);
    let started = Instant::now();
    let cfg = client.config().await.unwrap();
    assert_eq!(cfg.active_key_version, 1);
    let times: Vec<Instant> = seen.lock().unwrap().iter().map(|(t, _)| *t).collect();
    assert_eq!(times.len(), 3);
    assert!(
        times[2] - times[1] >= Duration::from_millis(950),
        "Retry-After: 1 was honoured ({:?})",
        times[2] - times[1]
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Out of retries: the last error says what to do.
    let (url, _) = scripted(vec![
        http("429 Too Many Requests", &["retry-after: 1"], busy),
        http("429 Too Many Requests", &["retry-after: 1"], busy),
    ])
    .await;
    let client = scripted_client(&url, PrivateKeySigner::random(), 1);
    let err = client.config().await.unwrap_err();
    assert!(
        matches!(err, Error::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(1)),
        "{err}"
    );

    // Not transient: no retry.
    let (url, seen) = scripted(vec![http(
        "400 Bad Request",
        &[],
        r#"{"error":{"code":"invalid_request","message":"no","type":"invalid_request_error","param":"x"}}"#,
    )])
    .await;
    let client = scripted_client(&url, PrivateKeySigner::random(), 3);
    let err = client.config().await.unwrap_err();
    assert!(matches!(err, Error::Api { status: 400, .. }), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_signed_request_is_re_signed_with_a_fresh_nonce_after_a_5xx() {
    let wallet = PrivateKeySigner::random();
    let (url, seen) = scripted(vec![
        http("200 OK", &[], &config_json()),
        http("502 Bad Gateway", &[], "{}"),
        http("503 Service Unavailable", &[], "{}"),
    ])
    .await;
    let client = scripted_client(&url, wallet, 1);
    let err = client
        .open_session(SessionOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Api { status: 503, .. }), "{err}");
    let bodies: Vec<Value> = seen
        .lock()
        .unwrap()
        .iter()
        .skip(1)
        .map(|(_, b)| serde_json::from_str(b).unwrap())
        .collect();
    assert_eq!(bodies.len(), 2, "retried once");
    let (a, b) = (&bodies[0]["open"], &bodies[1]["open"]);
    assert_eq!(a["message"]["sessionId"], b["message"]["sessionId"]);
    assert_ne!(a["message"]["nonce"], b["message"]["nonce"], "fresh nonce");
    assert_ne!(a["signature"], b["signature"]);
}
