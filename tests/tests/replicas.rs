//! Two router replicas on one PostgreSQL database and one S3 bucket: tasks submitted to either
//! are served by miners connected to either, each exactly once.

use std::time::Duration;

use serde_json::json;
use veil_blobstore::{BlobStore, S3Config, S3Credentials, StoreConfig};
use veil_miner::InstantEngine;
use veil_router::config::Settings;
use veil_testkit::S3Server;
use veil_testkit::postgres::TestDatabase;
use veil_tests::harness::{TestRouter, miner};

fn s3_store(server: &S3Server, bucket: &str) -> BlobStore {
    BlobStore::from_config(&StoreConfig::s3(
        S3Config::new(bucket)
            .with_provider("moto")
            .with_endpoint(server.endpoint())
            .with_allow_http(true)
            .with_path_style(true)
            .with_region(S3Server::REGION)
            .with_credentials(S3Credentials::new(
                server.access_key_id(),
                server.secret_access_key(),
            )),
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_postgres_and_bucket_serve_each_task_once() {
    let db = TestDatabase::create().await;
    let s3 = S3Server::shared();
    let bucket = s3.new_bucket("veil-replicas");
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    let settings = |name: &str| Settings {
        data_dir: Some(dir.path().join(name)),
        database_url: Some(db.url().to_string()),
        blob_store: Some(format!("s3://{bucket}")),
        keyring_path: Some(keyring.clone()),
        lease_ttl_ms: Some(2_000),
        completion_timeout_ms: Some(60_000),
        ..Settings::default()
    };
    let a = TestRouter::start_with(settings("a"), Some(s3_store(&s3, &bucket))).await;
    let b = TestRouter::start_with(settings("b"), Some(s3_store(&s3, &bucket))).await;
    let key = a.admin().to_string();
    assert!(
        b.admin.is_none(),
        "the second replica finds the admin key in the shared database"
    );

    // One miner on each replica.
    let (ma, _) = miner(&a.url, InstantEngine::new(["tiny"]));
    let (mb, _) = miner(&b.url, InstantEngine::new(["tiny"]));

    let mut calls = Vec::new();
    for i in 0..24 {
        let r = if i % 2 == 0 { &a } else { &b };
        let key = key.clone();
        let stream = i % 3 == 0;
        calls.push(async move {
            let body = json!({"model": "tiny", "messages": [{"role": "user", "content": format!("job {i}")}], "max_tokens": 6, "stream": stream});
            if stream {
                let resp = veil_tests::harness::http()
                    .post(format!("{}/api/v2/completions", r.url))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                let text = resp.text().await.unwrap();
                assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                assert!(!text.contains("\"error\""), "{text}");
                None
            } else {
                let (s, v) = r.post(&key, "/api/v2/completions", &body).await;
                assert_eq!(s, 200, "{v}");
                Some(v["veil"]["task_id"].as_str().unwrap().to_string())
            }
        });
    }
    let ids: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(ids.len(), 16);

    tokio::time::sleep(Duration::from_millis(200)).await;
    let sa = ma.shutdown().await.unwrap();
    let sb = mb.shutdown().await.unwrap();
    assert_eq!(sa.completed + sb.completed, 24, "{sa:?} {sb:?}");
    assert_eq!(sa.duplicates + sb.duplicates, 0);
    assert!(
        sa.completed > 0 && sb.completed > 0,
        "both replicas' miners served: {sa:?} {sb:?}"
    );
    // Every task has exactly one completion in the shared audit log.
    let done = a.audit("task.complete").await;
    assert_eq!(done.len(), 24);
    let mut seen: Vec<_> = done
        .iter()
        .map(|e| e["task_id"].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 24);
    // The audit chain written by both replicas verifies.
    let (s, v) = b.get(&key, "/api/admin/audit/verify").await;
    assert_eq!((s, v["ok"].as_bool()), (200, Some(true)), "{v}");
    a.stop().await;
    b.stop().await;
    db.drop_database().await;
}

/// A key's rate holds across replicas: its requests per minute are counted in the shared
/// database, whichever replica answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keys_rate_is_shared_by_the_replicas() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    let settings = |name: &str| Settings {
        data_dir: Some(dir.path().join(name)),
        database_url: Some(db.url().to_string()),
        keyring_path: Some(keyring.clone()),
        ..Settings::default()
    };
    let a = TestRouter::start_with(settings("a"), Some(BlobStore::memory())).await;
    let b = TestRouter::start_with(settings("b"), Some(BlobStore::memory())).await;
    let (s, created) = a
        .post(
            a.admin(),
            "/api/admin/api-keys",
            &json!({"owner": "metered", "rate_per_minute": 4}),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let key = created["secret"].as_str().unwrap().to_string();

    // Four requests, alternating replicas: the key's burst.
    for i in 0..4 {
        let r = if i % 2 == 0 { &a } else { &b };
        let (s, v) = r.get(&key, "/api/v2/models").await;
        assert_eq!(s, 200, "request {i}: {v}");
    }
    // The fifth is refused by either replica, with the wait (a quarter of a minute at most).
    for r in [&a, &b] {
        let resp = veil_tests::harness::http()
            .get(format!("{}/api/v2/models", r.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        let wait: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=15).contains(&wait), "Retry-After {wait}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    }
    // Another key is not affected.
    let (s, v) = b.get(a.admin(), "/api/v2/models").await;
    assert_eq!(s, 200, "{v}");
}
