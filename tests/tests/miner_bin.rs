//! The `veil-miner` command (its library entry point `veil_miner::cli::run`, run in-process so
//! that this crate need not build another crate's binary) against a real router: it hashes its
//! model file, reports the hash at login, serves completions with the instant engine and stops
//! gracefully; a router pinning another hash for the model gives it no lease.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use veil_miner::InstantEngine;
use veil_tests::harness::{TestRouter, expected_chat};
use veil_tests::miner_command::{self, DEV_ADDRESS};

fn model_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, b"GGUF tiny model bytes for the miner test").unwrap();
    path
}

fn file_hash(path: &Path) -> String {
    veil_miner::model::model_sha256(path, &mut |_, _| {})
        .unwrap()
        .to_string()
}

fn chat(content: &str) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "seed": 3})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn miner_command_serves_completions_with_a_pinned_model_hash() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(dir.path());
    let hash = file_hash(&model);
    let mut settings = TestRouter::settings(&dir.path().join("router"));
    settings.pinned_models = Some(vec![format!("tiny={hash}")]);
    let router = TestRouter::start(settings).await;
    let key = router.admin().to_string();
    let miner_dir = dir.path().join("miner");
    let (stop, join) = miner_command::start(&router.url, &miner_dir, &model);

    for prompt in ["hello miner", "second prompt here"] {
        let (s, v) = router
            .post(&key, "/api/v2/completions", &chat(prompt))
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            expected_chat(&InstantEngine::new(["tiny"]), prompt, 8, 3, false)
        );
        assert_eq!(v["veil"]["miner"], DEV_ADDRESS);
    }

    // The login reported the model's hash; the identity file was created private.
    let logins = router.audit("miner.login").await;
    assert_eq!(logins[0]["detail"]["models"][0]["sha256"], hash.as_str());
    let identity = miner_dir.join("identity.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&identity).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        logins[0]["detail"]["recipient"],
        veil_miner::identity::load(&identity)
            .unwrap()
            .public()
            .to_string()
    );

    stop.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), join)
        .await
        .expect("stops within the grace period")
        .unwrap()
        .expect("a graceful stop is not an error")
        .expect("serve returns its summary");
    assert_eq!(summary.completed, 2, "{summary:?}");
    assert_eq!(summary.leased, 2, "{summary:?}");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn router_refuses_leases_when_the_model_hash_differs_from_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(dir.path());
    let pinned = file_hash(&model);
    // The operator pinned the model, then a byte of the file changed on the miner.
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&model, bytes).unwrap();
    assert_ne!(file_hash(&model), pinned);

    let mut settings = TestRouter::settings(&dir.path().join("router"));
    settings.pinned_models = Some(vec![format!("tiny={pinned}")]);
    let router = TestRouter::start(settings).await;
    let (_stop, join) = miner_command::start(&router.url, &dir.path().join("miner"), &model);

    let err = tokio::time::timeout(Duration::from_secs(30), join)
        .await
        .expect("the refusal is fatal, not retried")
        .unwrap()
        .expect_err("no lease for a model whose hash differs");
    assert_eq!(err.status(), Some(403), "{err}");
    assert_eq!(err.code(), "model_hash_mismatch", "{err}");
    assert!(err.to_string().contains("tiny"), "{err}");

    // It did log in (with the changed hash), and no task was leased to it.
    let logins = router.audit("miner.login").await;
    assert_eq!(logins.len(), 1);
    assert_ne!(logins[0]["detail"]["models"][0]["sha256"], pinned.as_str());
    assert!(router.audit("task.lease").await.is_empty());
    router.stop().await;
}
