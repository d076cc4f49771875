//! Key lifecycle end to end with a real miner: a rotation made by another process (the
//! operator CLI's code path) reaches the serving router, new `/api/v2` completions use the new
//! version, results sealed under the old one still open; the rewrap job moves them, after which
//! the old version is retired and destroyed without losing anything; a result left under a
//! retired version refuses with a clear code.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;
use veil_miner::InstantEngine;
use veil_tests::harness::{TestRouter, miner};

fn chat(content: &str) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "seed": 3})
}

async fn complete(router: &TestRouter, key: &str, content: &str) -> (Uuid, String, u64) {
    let (s, v) = router
        .post(key, "/api/v2/completions", &chat(content))
        .await;
    assert_eq!(s, 200, "{v}");
    (
        v["veil"]["task_id"].as_str().unwrap().parse().unwrap(),
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v["veil"]["key_version"].as_u64().unwrap(),
    )
}

async fn fetch(router: &TestRouter, key: &str, id: Uuid) -> (u16, Value) {
    router.get(key, &format!("/api/v2/tasks/{id}")).await
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_rewrap_retire_destroy_with_a_real_miner() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TestRouter::settings(dir.path());
    // Keep prompts after delivery, so that both blobs of a task are there to move.
    settings.retention_prompt_on_delivery = Some(false);
    let router = TestRouter::start(settings).await;
    let (worker, _) = miner(&router.url, InstantEngine::new(["tiny"]));
    let key = router.admin().to_string();

    let (old, old_text, v) = complete(&router, &key, "sealed under the first key").await;
    assert_eq!(v, 1);

    // Another process rotates (the `veil-router keys rotate` code path on the same files).
    let operator = veil_router::key_lifecycle::operator_state(router.state.cfg.clone())
        .await
        .unwrap();
    veil_router::key_lifecycle::rotate(&operator, "operator")
        .await
        .unwrap();
    wait_for("the router to reload the keyring", async || {
        router.get(&key, "/api/admin/keys").await.1["active"] == 2
    })
    .await;

    let (new, new_text, v) = complete(&router, &key, "sealed under the second key").await;
    assert_eq!(v, 2, "new completions use the new version");
    let (s, a) = fetch(&router, &key, old).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["choices"][0]["message"]["content"], old_text.as_str());
    assert_eq!(a["veil"]["key_version"], 1, "old results still open");

    // The rewrap job moves the old task's blobs to version 2; its answer is unchanged.
    let (s, r) = router
        .post(&key, "/api/admin/keys/rewrap", &json!({}))
        .await;
    assert_eq!(s, 202, "{r}");
    wait_for("the rewrap to finish", async || {
        let (_, p) = router.get(&key, "/api/admin/keys/rewrap").await;
        p["running"] == false && p["finished_at_ms"].is_u64()
    })
    .await;
    let (_, p) = router.get(&key, "/api/admin/keys/rewrap").await;
    assert_eq!(
        (p["done"].as_u64(), p["remaining"].as_u64()),
        (Some(1), Some(0)),
        "{p}"
    );
    assert_eq!(
        router.state.store.get_task(old).await.unwrap().key_version,
        2
    );
    let (s, a) = fetch(&router, &key, old).await;
    assert_eq!(
        (s, a["veil"]["key_version"].as_u64()),
        (200, Some(2)),
        "{a}"
    );
    assert_eq!(a["choices"][0]["message"]["content"], old_text.as_str());

    // Version 1 now holds nothing: retire and destroy it, confirming the count of zero.
    let (s, r) = router
        .post(&key, "/api/admin/keys/retire", &json!({"up_to": 1}))
        .await;
    assert_eq!((s, r["affected_blobs"].as_u64()), (200, Some(0)), "{r}");
    let (s, e) = router
        .post(&key, "/api/admin/keys/destroy", &json!({"version": 1}))
        .await;
    assert_eq!((s, e["affected_blobs"].as_u64()), (409, Some(0)), "{e}");
    let (s, r) = router
        .post(
            &key,
            "/api/admin/keys/destroy",
            &json!({"version": 1, "confirm_blobs": 0}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    for (id, text) in [(old, &old_text), (new, &new_text)] {
        let (s, a) = fetch(&router, &key, id).await;
        assert_eq!(s, 200, "{a}");
        assert_eq!(a["choices"][0]["message"]["content"], text.as_str());
    }

    // Rotate again and retire without a rewrap: the version-2 results refuse, with the code.
    let (s, _) = router
        .post(&key, "/api/admin/keys/rotate", &json!({}))
        .await;
    assert_eq!(s, 200);
    let (_, _, v) = complete(&router, &key, "sealed under the third key").await;
    assert_eq!(v, 3);
    let (s, r) = router
        .post(&key, "/api/admin/keys/retire", &json!({"up_to": 2}))
        .await;
    assert_eq!((s, r["affected_blobs"].as_u64()), (200, Some(4)), "{r}");
    let (s, e) = fetch(&router, &key, new).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (403, Some("key_version_retired")),
        "{e}"
    );

    for action in [
        "keyring.rotate",
        "keyring.reload",
        "keyring.rewrap.task",
        "keyring.retire",
        "keyring.destroy",
    ] {
        assert!(!router.audit(action).await.is_empty(), "{action} audited");
    }
    worker.shutdown().await.unwrap();
    router.stop().await;
}
