//! Retention and sealing policy end to end: blobs deleted on delivery, after a TTL, on first
//! fetch and on session close, each deletion audited with ids and hashes; a delivered result
//! unaffected by its prompt's deletion; `client_only` sessions refuse `/api/v2`; the owner's
//! privacy status; the public deployment description.

use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use uuid::Uuid;
use veil_blobstore::object_store::path::Path;
use veil_blobstore::object_store::{ObjectStoreExt, PutPayload};
use veil_keys::{BlobParams, KeyId, Purpose, SecretKey};
use veil_miner::InstantEngine;
use veil_router::orphans;
use veil_router::store::{NewRewrap, NewTask, SealedBy, Task};
use veil_tests::harness::{TestRouter, http, miner};

fn chat(session: &str, content: &str) -> Value {
    json!({"model": "tiny", "session_id": session,
           "messages": [{"role": "user", "content": content}], "max_tokens": 8})
}

async fn session(router: &TestRouter, key: &str, body: Value) -> String {
    let (s, v) = router.post(key, "/api/v2/sessions", &body).await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn complete(router: &TestRouter, key: &str, session: &str) -> (Uuid, String) {
    let (s, v) = router
        .post(
            key,
            "/api/v2/completions",
            &chat(session, "keep this short"),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["veil"]["task_id"].as_str().unwrap().parse().unwrap();
    (
        id,
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

async fn task(router: &TestRouter, id: Uuid) -> Task {
    router.state.store.get_task(id).await.unwrap()
}

async fn blob_exists(router: &TestRouter, urn: &str) -> bool {
    let urn: veil_blobstore::Urn = urn.parse().unwrap();
    match router.state.blobs.head(&urn).await {
        Ok(_) => true,
        Err(veil_blobstore::Error::NotFound { .. }) => false,
        Err(e) => panic!("head {urn}: {e}"),
    }
}

/// Waits until `pred` holds for the task, or fails after `limit`.
async fn wait_task(
    router: &TestRouter,
    id: Uuid,
    limit: Duration,
    pred: impl Fn(&Task) -> bool,
) -> Task {
    let start = Instant::now();
    loop {
        let t = task(router, id).await;
        if pred(&t) {
            return t;
        }
        assert!(
            start.elapsed() < limit,
            "condition not met in {limit:?}: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `blob.delete` audit entries of a task.
async fn deletions(router: &TestRouter, id: Uuid) -> Vec<Value> {
    router
        .audit("blob.delete")
        .await
        .into_iter()
        .filter(|e| e["task_id"] == id.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_blobs_on_schedule_and_audits_each_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TestRouter::settings(dir.path());
    settings.retention_sweep_interval_ms = Some(200);
    let router = TestRouter::start(settings).await;
    let (_worker, _miner) = miner(&router.url, InstantEngine::new(["tiny"]));
    let key = router.admin().to_string();

    // A: prompt deleted on delivery, result two seconds after the task finished.
    let a = session(
        &router,
        &key,
        json!({"retention": {"delete_prompt_on_delivery": true, "result_ttl_secs": 2}}),
    )
    .await;
    let (ta, text_a) = complete(&router, &key, &a).await;
    let t = wait_task(&router, ta, Duration::from_secs(5), |t| {
        t.prompt_deleted_at_ms.is_some()
    })
    .await;
    let result = t.result.clone().unwrap();
    assert!(t.delivered_at_ms.is_some());
    assert!(
        !blob_exists(&router, &t.prompt_urn).await,
        "prompt blob deleted"
    );
    assert!(
        blob_exists(&router, &result.result_urn).await,
        "result kept until its TTL"
    );
    let audit = deletions(&router, ta).await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["detail"]["blob"], "prompt");
    assert_eq!(audit[0]["detail"]["reason"], "delivered");
    assert_eq!(audit[0]["detail"]["hash"], hex::encode(t.prompt_hash));
    assert_eq!(audit[0]["session_id"], a);
    // The delivered result is unaffected: it still opens, with the same text.
    let (s, v) = router.get(&key, &format!("/api/v2/tasks/{ta}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], text_a.as_str());
    // Then its TTL passes.
    let finished = t.finished_at_ms.unwrap();
    let t = wait_task(&router, ta, Duration::from_secs(8), |t| {
        t.result_deleted_at_ms.is_some()
    })
    .await;
    assert!(
        t.result_deleted_at_ms.unwrap() >= finished + 2000,
        "not before the TTL"
    );
    assert!(!blob_exists(&router, &result.result_urn).await);
    let (s, v) = router.get(&key, &format!("/api/v2/tasks/{ta}")).await;
    assert_eq!(s, 410, "{v}");
    assert_eq!(v["error"]["code"], "result_deleted");
    let audit = deletions(&router, ta).await;
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[1]["detail"]["blob"], "result");
    assert_eq!(audit[1]["detail"]["reason"], "ttl");
    assert_eq!(audit[1]["detail"]["hash"], hex::encode(result.result_hash));

    // B: prompt TTL of one second, nothing on delivery; the result stays.
    let b = session(&router, &key, json!({"retention": {"prompt_ttl_secs": 1}})).await;
    let (tb, _) = complete(&router, &key, &b).await;
    let t = task(&router, tb).await;
    assert!(
        t.deadline_ms.unwrap() <= t.created_at_ms + 1000,
        "deadline brought forward to the prompt TTL"
    );
    let t = wait_task(&router, tb, Duration::from_secs(6), |t| {
        t.prompt_deleted_at_ms.is_some()
    })
    .await;
    assert!(t.prompt_deleted_at_ms.unwrap() >= t.created_at_ms + 1000);
    assert_eq!(deletions(&router, tb).await[0]["detail"]["reason"], "ttl");
    assert!(blob_exists(&router, &t.result.as_ref().unwrap().result_urn).await);
    assert_eq!(
        router.get(&key, &format!("/api/v2/tasks/{tb}")).await.0,
        200
    );

    // C: result deleted on first fetch (the completion's own answer).
    let c = session(
        &router,
        &key,
        json!({"retention": {"delete_result_on_fetch": true}}),
    )
    .await;
    let (tc, _) = complete(&router, &key, &c).await;
    let t = wait_task(&router, tc, Duration::from_secs(5), |t| {
        t.result_deleted_at_ms.is_some()
    })
    .await;
    assert!(
        t.prompt_deleted_at_ms.is_none(),
        "this policy keeps the prompt"
    );
    assert!(!blob_exists(&router, &t.result.as_ref().unwrap().result_urn).await);
    assert_eq!(
        router.get(&key, &format!("/api/v2/tasks/{tc}")).await.0,
        410
    );

    // D: keeps everything until the session is closed.
    let d = session(&router, &key, json!({"retention": {}})).await;
    let (td, _) = complete(&router, &key, &d).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(deletions(&router, td).await.is_empty(), "nothing due");
    let (s, v) = router
        .post(&key, &format!("/api/v2/sessions/{d}/close"), &json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    let t = wait_task(&router, td, Duration::from_secs(5), |t| {
        t.prompt_deleted_at_ms.is_some() && t.result_deleted_at_ms.is_some()
    })
    .await;
    assert!(!blob_exists(&router, &t.prompt_urn).await);
    assert!(!blob_exists(&router, &t.result.as_ref().unwrap().result_urn).await);
    let audit = deletions(&router, td).await;
    assert_eq!(audit.len(), 2);
    assert!(
        audit
            .iter()
            .all(|e| e["detail"]["reason"] == "session_closed")
    );

    // Every deletion is in the hash chain, which still verifies.
    let (s, v) = router.get(&key, "/api/admin/audit/verify").await;
    assert_eq!(s, 200, "{v}");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policies_privacy_status_and_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TestRouter::settings(dir.path());
    settings.retention_prompt_ttl_secs = Some(600);
    settings.retention_result_ttl_secs = Some(0);
    let router = TestRouter::start(settings).await;
    let key = router.admin().to_string();

    // Defaults come from the router's settings.
    let s1 = session(&router, &key, json!({})).await;
    let (s, v) = router.get(&key, &format!("/api/v2/sessions/{s1}")).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["retention"],
        json!({"delete_prompt_on_delivery": true, "prompt_ttl_secs": 600, "result_ttl_secs": null, "delete_result_on_fetch": false})
    );
    assert_eq!(v["sealing"], "any");

    // Bad policies name the field at fault.
    for (body, field) in [
        (
            json!({"retention": {"prompt_ttl_secs": 0}}),
            "retention.prompt_ttl_secs",
        ),
        (
            json!({"retention": {"result_ttl_secs": 10_000_000_000u64}}),
            "retention.result_ttl_secs",
        ),
    ] {
        let (s, v) = router.post(&key, "/api/v2/sessions", &body).await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    let (s, v) = router
        .post(
            &key,
            "/api/v2/sessions",
            &json!({"retention": {"keep": true}}),
        )
        .await;
    assert_eq!(s, 400, "unknown fields are refused: {v}");
    let (s, v) = router
        .post(&key, "/api/v2/sessions", &json!({"sealing": "sometimes"}))
        .await;
    assert_eq!(s, 400, "{v}");

    // client_only sessions refuse server-side sealing.
    let private = session(
        &router,
        &key,
        json!({"private": true, "allowed_miners": ["0x1111111111111111111111111111111111111111"], "sealing": "client_only"}),
    )
    .await;
    let (s, v) = router
        .post(&key, "/api/v2/completions", &chat(&private, "secret"))
        .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], "sealing_client_only");
    assert_eq!(v["error"]["param"], "session_id");
    assert!(
        router.state.store.queue_depth().await.unwrap().queued == 0,
        "nothing queued"
    );

    // The owner reads the privacy status; another caller cannot.
    let (s, p) = router
        .get(&key, &format!("/api/v2/sessions/{private}/privacy"))
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["private"], true);
    assert_eq!(
        p["allowed_miners"],
        json!(["0x1111111111111111111111111111111111111111"])
    );
    assert_eq!(p["source"], "router");
    assert_eq!(p["sealing"], "client_only");
    assert_eq!(p["retention"]["prompt_ttl_secs"], 600);
    assert_eq!(p["active_key_version"], 1);
    assert_eq!(p["open"], true);
    assert!(p["acl"].is_null());
    let (s, other) = router
        .post(
            &key,
            "/api/admin/api-keys",
            &json!({"owner": "someone-else"}),
        )
        .await;
    assert_eq!(s, 201, "{other}");
    let other_key = other["secret"].as_str().unwrap().to_string();
    let (s, _) = router
        .get(&other_key, &format!("/api/v2/sessions/{private}/privacy"))
        .await;
    assert_eq!(s, 404);

    // The owner changes the policy; the change is audited.
    let (s, v) = router
        .put(
            &key,
            &format!("/api/v2/sessions/{private}/policy"),
            &json!({"sealing": "any", "retention": {"delete_result_on_fetch": true}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["sealing"], "any");
    assert_eq!(v["retention"]["delete_result_on_fetch"], true);
    assert_eq!(v["retention"]["prompt_ttl_secs"], Value::Null);
    assert_eq!(router.audit("session.policy").await.len(), 1);

    // The public deployment description: no key needed, cacheable, nothing secret.
    let r = http()
        .get(format!("{}/api/v2/deployment", router.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "public, max-age=60");
    let text = r.text().await.unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["protocol_version"], 1);
    assert_eq!(d["router_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(d["acl"]["mode"], "router-managed");
    assert_eq!(d["acl"]["chain_id"], 31337);
    assert_eq!(d["storage"]["type"], "fs");
    assert_eq!(d["retention"]["default"]["prompt_ttl_secs"], 600);
    assert_eq!(d["retention"]["default"]["result_ttl_secs"], Value::Null);
    assert_eq!(d["retention"]["unnamed_blobs"]["swept"], true);
    assert_eq!(d["retention"]["unnamed_blobs"]["sweep_interval_secs"], 3600);
    assert_eq!(d["retention"]["unnamed_blobs"]["grace_secs"], 86_400);
    assert_eq!(d["keys"]["active_version"], 1);
    assert_eq!(d["keys"]["versions"][0]["state"], "active");
    assert!(d["keys"]["active_since"].as_u64().unwrap() > 1_700_000_000);
    assert!(
        d["keys"]["issuance"]["task_key"]
            .as_str()
            .unwrap()
            .contains("lease")
    );
    let keyring = std::fs::read_to_string(dir.path().join("keyring.json")).unwrap();
    let keyring: Value = serde_json::from_str(&keyring).unwrap();
    for seed in keyring_seeds(&keyring) {
        assert!(
            !text.contains(&seed),
            "no seed in the deployment description"
        );
    }
    router.stop().await;
}

/// Every long hex string in the keyring document (the seeds).
fn keyring_seeds(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Value::String(s) if s.len() >= 64 && s.chars().all(|c| c.is_ascii_hexdigit()) => {
            out.push(s.clone())
        }
        Value::Array(a) => a.iter().for_each(|x| out.extend(keyring_seeds(x))),
        Value::Object(o) => o.values().for_each(|x| out.extend(keyring_seeds(x))),
        _ => {}
    }
    out
}

/// The ACL contract's ABI hash is reproducible outside Rust: Python's json module, keys
/// sorted, compact separators, gives the same bytes as the documented `jq -cjS .abi`.
#[test]
fn acl_abi_hash_is_reproducible() {
    let artifact = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contracts/artifacts/VeilAcl.json"
    );
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib,json,sys; a=json.load(open(sys.argv[1]))['abi']; \
             print(hashlib.sha256(json.dumps(a,sort_keys=True,separators=(',',':')).encode()).hexdigest())",
            artifact,
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        python.trim(),
        veil_router::api::deployment::acl_abi_sha256()
    );
}

/// Stores a sealed blob under the router's name for `(session, task, purpose)`, as an upload
/// would; its content does not matter to the sweep.
async fn stray_blob(router: &TestRouter, session: Uuid, task: Uuid, purpose: Purpose) -> String {
    let params = BlobParams::new(KeyId::task(1, session, task), purpose);
    let blob = veil_keys::seal(&SecretKey::from_bytes([7; 32]), &params, b"stray").unwrap();
    router.state.blobs.put(blob).await.unwrap().urn.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_orphan_sweep_deletes_old_blobs_that_no_task_names_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let router = TestRouter::start(TestRouter::settings(dir.path())).await;
    let (_worker, _miner) = miner(&router.url, InstantEngine::new(["tiny"]));
    let key = router.admin().to_string();
    let s = session(&router, &key, json!({"retention": {}})).await;
    let sid: Uuid = s.parse().unwrap();

    // A completed task keeps its prompt and result; a losing result uploaded for it and a
    // prompt for a task never submitted are orphans.
    let (done, _) = complete(&router, &key, &s).await;
    let done_task = task(&router, done).await;
    let result_urn = done_task.result.clone().unwrap().result_urn;
    let loser = stray_blob(&router, sid, done, Purpose::Result).await;
    let never = Uuid::now_v7();
    let unsubmitted = stray_blob(&router, sid, never, Purpose::Prompt).await;

    // Kept: a blob under a task still queued (a result on its way), one under a completed task
    // whose key rewrap is under way, one whose name gives another session than its task's, one
    // under a session this router does not know, and an object that is not named as the
    // router names blobs.
    let queued = Uuid::now_v7();
    let prompt = stray_blob(&router, sid, queued, Purpose::Prompt).await;
    router
        .state
        .store
        .enqueue(&NewTask {
            id: queued,
            session_id: sid,
            prompt_urn: prompt.clone(),
            prompt_hash: [0; 32],
            prompt_scope: 2,
            key_version: 1,
            model: "nobody-serves-this".into(),
            params: Default::default(),
            max_attempts: 3,
            created_at_ms: veil_router::state::now_ms(),
            deadline_ms: None,
            submitted_by: "test".into(),
            sealed_by: SealedBy::Router,
        })
        .await
        .unwrap();
    let on_the_way = stray_blob(&router, sid, queued, Purpose::Result).await;
    let (rewrapped, _) = complete(&router, &key, &s).await;
    router
        .state
        .store
        .rewrap_begin(&NewRewrap {
            id: Uuid::now_v7(),
            task_id: rewrapped,
            old_version: 1,
            new_version: 2,
            started_at_ms: veil_router::state::now_ms(),
        })
        .await
        .unwrap();
    let mid_rewrap = stray_blob(&router, sid, rewrapped, Purpose::Result).await;
    let mismatched = stray_blob(&router, Uuid::now_v7(), done, Purpose::Result).await;
    // Named for a session this router does not know: another deployment's, in a shared bucket.
    let foreign = stray_blob(&router, Uuid::now_v7(), Uuid::now_v7(), Purpose::Prompt).await;
    let odd = router.state.blobs.id().urn("notes/readme.txt").unwrap();
    router
        .state
        .blobs
        .object_store()
        .put(
            &Path::from(odd.file_name()),
            PutPayload::from_static(b"not a blob"),
        )
        .await
        .unwrap();
    let odd = odd.to_string();

    let everything = [
        &done_task.prompt_urn,
        &result_urn,
        &loser,
        &unsubmitted,
        &prompt,
        &on_the_way,
        &mid_rewrap,
        &mismatched,
        &foreign,
        &odd,
    ];
    for urn in everything {
        assert!(blob_exists(&router, urn).await, "{urn}");
    }

    // Within the grace period nothing is touched.
    let report = orphans::sweep(&router.state, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(report.deleted, 0, "{report:?}");
    assert_eq!(report.young, report.listed, "{report:?}");
    for urn in everything {
        assert!(blob_exists(&router, urn).await, "{urn}");
    }

    // Past it, exactly the two orphans go, each audited.
    let later = SystemTime::now() + Duration::from_secs(2 * 86_400);
    let report = orphans::sweep(&router.state, later).await.unwrap();
    assert_eq!(report.deleted, 2, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.unrecognized, 1, "{report:?}");
    assert_eq!(report.foreign, 1, "{report:?}");
    assert!(!blob_exists(&router, &loser).await);
    assert!(!blob_exists(&router, &unsubmitted).await);
    for urn in everything
        .into_iter()
        .filter(|u| **u != loser && **u != unsubmitted)
    {
        assert!(blob_exists(&router, urn).await, "kept: {urn}");
    }
    let audit: Vec<Value> = router
        .audit("blob.delete")
        .await
        .into_iter()
        .filter(|e| e["detail"]["reason"] == "orphan")
        .collect();
    assert_eq!(audit.len(), 2, "{audit:?}");
    let by_urn = |urn: &str| {
        audit
            .iter()
            .find(|e| e["detail"]["urn"] == urn)
            .unwrap_or_else(|| panic!("no audit entry for {urn}: {audit:?}"))
            .clone()
    };
    let e = by_urn(&loser);
    assert_eq!(e["task_id"], done.to_string());
    assert_eq!(e["session_id"], s);
    assert_eq!(e["detail"]["blob"], "result");
    assert_eq!(e["detail"]["task"], "ended");
    let e = by_urn(&unsubmitted);
    assert_eq!(e["task_id"], never.to_string());
    assert_eq!(e["detail"]["blob"], "prompt");
    assert_eq!(e["detail"]["task"], "absent");

    // Once the queued task has ended, what it never named goes too; a second pass over the
    // rest deletes nothing more.
    router
        .state
        .store
        .cancel(queued, veil_router::state::now_ms())
        .await
        .unwrap();
    let report = orphans::sweep(&router.state, later).await.unwrap();
    assert_eq!(report.deleted, 1, "{report:?}");
    assert!(!blob_exists(&router, &on_the_way).await);
    assert!(
        blob_exists(&router, &prompt).await,
        "its prompt is still named"
    );
    let report = orphans::sweep(&router.state, later).await.unwrap();
    assert_eq!(report.deleted, 0, "{report:?}");
}
