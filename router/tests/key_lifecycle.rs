//! Key lifecycle through the admin API, the key service and the operator CLI: rotation keeps
//! old results readable, retirement and destruction make them refuse with clear codes (after a
//! confirmed count), rewrap moves every router-sealed blob and survives being stopped at any
//! step, read-only keyrings refuse changes, keyring files others can read refuse to start, and
//! only admin keys reach any of it. Tasks are completed through the store with results sealed
//! under their task keys, as a miner would (the cross-crate test with real miners is
//! `tests/tests/key_lifecycle.rs`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;
use veil_blobstore::Urn;
use veil_keys::{BlobParams, KeyId, Keyring, Purpose};
use veil_router::config::{Config, Settings};
use veil_router::key_lifecycle::{self, RewrapOptions, RewrapStep};
use veil_router::state::{KeyService, KeyringSource};
use veil_router::store::{
    CompleteOutcome, LeaseQuery, NewTask, RewrapState, SealedBy, Task, TaskParams,
    TaskResultRecord, TaskState,
};
use veil_router::{AppState, server};
use veil_testkit::files_under;

const MINER: &str = "0x1111111111111111111111111111111111111111";
const MODEL: &str = "tiny";

/// A prepared router (not serving: requests go through the app in-process, no background work).
struct Env {
    dir: tempfile::TempDir,
    state: AppState,
    admin: String,
    session: Uuid,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        Self::with_settings(dir, |_| {}).await
    }

    async fn with_settings(dir: tempfile::TempDir, f: impl FnOnce(&mut Settings)) -> Env {
        let mut s = Settings {
            data_dir: Some(dir.path().to_path_buf()),
            ..Settings::default()
        };
        f(&mut s);
        let started = server::prepare(Config::from_settings(s).unwrap())
            .await
            .expect("router prepares");
        let admin = started.admin_secret.expect("first start");
        let mut env = Env {
            dir,
            state: started.state,
            admin,
            session: Uuid::nil(),
        };
        let (st, v) = env
            .call(
                "POST",
                "/api/v2/sessions",
                &env.admin.clone(),
                Some(json!({})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        env.session = v["id"].as_str().unwrap().parse().unwrap();
        env
    }

    fn keyring_path(&self) -> PathBuf {
        self.dir.path().join("keyring.json")
    }

    fn blob_dir(&self) -> PathBuf {
        self.dir.path().join("blobs")
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        call(&self.state, method, path, key, body).await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, &self.admin, body).await
    }

    /// A finished v2 task under the active key version: prompt sealed as `/api/v2` does,
    /// result sealed under the task key as a miner does (`None`: the task fails instead).
    async fn task(&self, prompt: &[u8], result: Option<&[u8]>) -> Task {
        self.task_sealed_by(prompt, result, SealedBy::Router).await
    }

    async fn task_sealed_by(&self, prompt: &[u8], result: Option<&[u8]>, by: SealedBy) -> Task {
        let st = &self.state;
        let id = Uuid::now_v7();
        let v = st.keys.active_version();
        let k = st.keys.task_key(v, &self.session, &id).unwrap();
        let kid = KeyId::task(v, self.session, id);
        let sealed = veil_keys::seal(&k, &BlobParams::new(kid, Purpose::Prompt), prompt).unwrap();
        let blob = st.blobs.put(sealed).await.unwrap();
        let now = veil_router::state::now_ms();
        st.store
            .enqueue(&NewTask {
                id,
                session_id: self.session,
                prompt_urn: blob.urn.to_string(),
                prompt_hash: blob.sha256,
                prompt_scope: 2,
                key_version: v,
                model: MODEL.into(),
                params: TaskParams::default(),
                max_attempts: 3,
                created_at_ms: now,
                deadline_ms: None,
                submitted_by: "test".into(),
                sealed_by: by,
            })
            .await
            .unwrap();
        let lease = st
            .store
            .lease(&LeaseQuery {
                miner: MINER.into(),
                models: vec![MODEL.into()],
                now_ms: now,
                ttl_ms: 30_000,
                lease_id: Uuid::now_v7(),
                skip_contract_sessions: false,
            })
            .await
            .unwrap()
            .expect("the task leases");
        assert_eq!(lease.task.id, id);
        let Some(result) = result else {
            st.store
                .fail(lease.lease_id, MINER, "engine_error", "no result", now + 1)
                .await
                .unwrap();
            return st.store.get_task(id).await.unwrap();
        };
        // A streamed result: closed early every 1000 bytes, as a miner flushes tokens.
        let mut sealer =
            veil_keys::Sealer::new(&k, &BlobParams::new(kid, Purpose::Result)).unwrap();
        let mut out = Vec::new();
        for piece in result.chunks(1000) {
            sealer.update(piece, &mut out).unwrap();
            sealer.flush(&mut out).unwrap();
        }
        sealer.finish(&mut out).unwrap();
        let rblob = st.blobs.put(out).await.unwrap();
        let rec = TaskResultRecord {
            result_urn: rblob.urn.to_string(),
            result_hash: rblob.sha256,
            result_size: rblob.size,
            miner: MINER.into(),
            signature: vec![7; 65],
            prompt_tokens: 1,
            completion_tokens: 1,
            finish_reason: "stop".into(),
        };
        match st
            .store
            .complete(lease.lease_id, MINER, &rec, now + 1)
            .await
            .unwrap()
        {
            CompleteOutcome::Accepted(t) => t,
            other => panic!("{other:?}"),
        }
    }

    /// `GET /api/v2/tasks/{id}`: status and the answer text (or the error code).
    async fn answer(&self, id: Uuid) -> (StatusCode, String) {
        let (st, v) = self
            .call(
                "GET",
                &format!("/api/v2/tasks/{id}"),
                &self.admin.clone(),
                None,
            )
            .await;
        if st == StatusCode::OK {
            (
                st,
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        } else {
            (
                st,
                v["error"]["code"].as_str().unwrap_or_default().to_string(),
            )
        }
    }

    /// Opens a stored blob under the task's current key version.
    async fn open(&self, urn: &str, hash: &[u8; 32], t: &Task) -> Vec<u8> {
        let k = self
            .state
            .keys
            .task_key(t.key_version, &t.session_id, &t.id)
            .unwrap();
        let blob = self
            .state
            .blobs
            .get(&urn.parse::<Urn>().unwrap(), hash)
            .await
            .unwrap();
        let opened = veil_keys::open(&k, &blob).unwrap();
        assert_eq!(opened.header.key.key_version, t.key_version);
        opened.plaintext.into_zeroizing().to_vec()
    }

    async fn gone(&self, urn: &str) -> bool {
        matches!(
            self.state.blobs.head(&urn.parse::<Urn>().unwrap()).await,
            Err(veil_blobstore::Error::NotFound { .. })
        )
    }

    /// Blob files on disk, and the blobs the database references (not deleted).
    async fn blob_counts(&self, tasks: &[Uuid]) -> (usize, usize) {
        let files = files_under(&self.blob_dir()).len();
        let mut referenced = 0;
        for id in tasks {
            let t = self.state.store.get_task(*id).await.unwrap();
            referenced += usize::from(t.prompt_deleted_at_ms.is_none());
            referenced += usize::from(t.result.is_some() && t.result_deleted_at_ms.is_none());
        }
        (files, referenced)
    }

    async fn audit(&self, action: &str) -> Vec<Value> {
        let (st, v) = self.admin("GET", "/api/admin/audit?limit=1000", None).await;
        assert_eq!(st, StatusCode::OK);
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .cloned()
            .collect()
    }

    /// A non-admin API key.
    async fn user_key(&self) -> String {
        let (st, v) = self
            .admin(
                "POST",
                "/api/admin/api-keys",
                Some(json!({"owner": "someone"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["secret"].as_str().unwrap().to_string()
    }
}

async fn call(
    state: &AppState,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"));
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let resp = veil_router::app(state.clone())
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The hex seeds in a keyring file (to check they never leave it).
fn seeds(path: &Path) -> Vec<String> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["seed"].as_str().map(str::to_string))
        .collect()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_retire_destroy_through_the_admin_api() {
    let env = Env::new().await;
    let t1 = env.task(b"first prompt", Some(b"first answer")).await;
    assert_eq!(t1.key_version, 1);
    let v1_seed = seeds(&env.keyring_path()).remove(0);

    let (st, s) = env.admin("GET", "/api/admin/keys", None).await;
    assert_eq!(st, StatusCode::OK, "{s}");
    assert_eq!(
        (s["source"].as_str(), s["read_only"].as_bool()),
        (Some("file"), Some(false))
    );
    assert_eq!(
        (s["active"].as_u64(), s["min_decrypt"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(s["versions"][0]["state"], "active");
    assert_eq!(s["versions"][0]["prompt_blobs"], 1);
    assert_eq!(s["versions"][0]["result_blobs"], 1);
    assert!(s["versions"][0]["created_at"].as_u64().unwrap() > 1_700_000_000);

    // Rotate: new tasks use version 2, the old result still opens.
    let (st, r) = env.admin("POST", "/api/admin/keys/rotate", None).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["version"], 2);
    assert_eq!(r["status"]["active"], 2);
    assert_eq!(r["status"]["versions"][0]["state"], "decrypt_only");
    assert_eq!(
        r["status"]["versions"][0]["superseded_at"],
        r["status"]["versions"][1]["created_at"]
    );
    let t2 = env.task(b"second prompt", Some(b"second answer")).await;
    assert_eq!(t2.key_version, 2);
    assert_eq!(
        env.answer(t1.id).await,
        (StatusCode::OK, "first answer".into())
    );
    assert_eq!(
        env.answer(t2.id).await,
        (StatusCode::OK, "second answer".into())
    );
    assert_eq!(
        Keyring::load(env.keyring_path()).unwrap().active(),
        2,
        "the file is the truth"
    );

    // Refusals, each with its code and field.
    let (st, e) = env
        .admin("POST", "/api/admin/keys/retire", Some(json!({"up_to": 2})))
        .await;
    assert_eq!(
        (st, code(&e), e["error"]["param"].as_str()),
        (StatusCode::CONFLICT, "key_version_active", Some("up_to"))
    );
    let (st, e) = env
        .admin("POST", "/api/admin/keys/retire", Some(json!({"up_to": 0})))
        .await;
    assert_eq!(
        (st, e["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("up_to"))
    );
    let (st, e) = env
        .admin(
            "POST",
            "/api/admin/keys/retire",
            Some(json!({"up_to": "one"})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("up_to"))
    );
    let (st, e) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(
        (st, code(&e), e["error"]["param"].as_str()),
        (
            StatusCode::CONFLICT,
            "key_version_not_retired",
            Some("version")
        )
    );
    let (st, e) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 2, "confirm_blobs": 0})),
        )
        .await;
    assert_eq!((st, code(&e)), (StatusCode::CONFLICT, "key_version_active"));
    let (st, e) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 9})),
        )
        .await;
    assert_eq!(
        (st, code(&e)),
        (StatusCode::NOT_FOUND, "unknown_key_version")
    );

    // Retire: version 1's blobs refuse with a clear code; version 2's still open.
    let (st, r) = env
        .admin("POST", "/api/admin/keys/retire", Some(json!({"up_to": 1})))
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(
        (r["affected_blobs"].as_u64(), r["unchanged"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(r["status"]["versions"][0]["state"], "retired");
    assert_eq!(
        env.answer(t1.id).await,
        (StatusCode::FORBIDDEN, "key_version_retired".into())
    );
    assert_eq!(
        env.answer(t2.id).await,
        (StatusCode::OK, "second answer".into())
    );
    let (_, r) = env
        .admin("POST", "/api/admin/keys/retire", Some(json!({"up_to": 1})))
        .await;
    assert_eq!(r["unchanged"], true, "idempotent");

    // Destroy: the count first, then only with that count.
    let (st, e) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    assert_eq!(
        (code(&e), e["error"]["param"].as_str()),
        ("confirmation_required", Some("confirm_blobs"))
    );
    assert_eq!(
        (e["affected_blobs"].as_u64(), e["tasks"].as_u64()),
        (Some(2), Some(1))
    );
    let (st, e) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1, "confirm_blobs": 3})),
        )
        .await;
    assert_eq!(
        (st, code(&e), e["affected_blobs"].as_u64()),
        (StatusCode::CONFLICT, "confirmation_required", Some(2))
    );
    assert!(
        seeds(&env.keyring_path()).contains(&v1_seed),
        "nothing destroyed yet"
    );
    let (st, r) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1, "confirm_blobs": 2})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(
        (
            r["affected_blobs"].as_u64(),
            r["status"]["versions"][0]["state"].as_str()
        ),
        (Some(2), Some("destroyed"))
    );
    assert_eq!(
        env.answer(t1.id).await,
        (StatusCode::FORBIDDEN, "key_version_destroyed".into())
    );
    assert_eq!(
        env.answer(t2.id).await,
        (StatusCode::OK, "second answer".into())
    );
    assert!(
        !seeds(&env.keyring_path()).contains(&v1_seed),
        "the seed is gone from the file"
    );
    let (st, r) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(
        (st, r["unchanged"].as_bool()),
        (StatusCode::OK, Some(true)),
        "idempotent"
    );

    // Audited with metadata only; no answer and no audit entry carries a seed.
    for (action, n) in [
        ("keyring.rotate", 1),
        ("keyring.retire", 2),
        ("keyring.destroy", 2),
    ] {
        let entries = env.audit(action).await;
        assert_eq!(entries.len(), n, "{action}");
        assert!(entries[0]["actor"].as_str().unwrap().starts_with("key:"));
    }
    assert_eq!(
        env.audit("keyring.destroy").await[0]["detail"]["affected_blobs"],
        2
    );
    let (_, all) = env.admin("GET", "/api/admin/audit?limit=1000", None).await;
    let (_, status) = env.admin("GET", "/api/admin/keys", None).await;
    for seed in seeds(&env.keyring_path()).iter().chain([&v1_seed]) {
        assert!(!all.to_string().contains(seed.as_str()));
        assert!(!status.to_string().contains(seed.as_str()));
    }
    let (st, v) = env.admin("GET", "/api/admin/audit/verify", None).await;
    assert_eq!((st, v["ok"].as_bool()), (StatusCode::OK, Some(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_counts_only_blobs_still_stored() {
    let env = Env::new().await;
    let a = env.task(b"a", Some(b"A")).await;
    env.task(b"b", None).await;
    env.admin("POST", "/api/admin/keys/rotate", None).await;
    env.admin("POST", "/api/admin/keys/retire", Some(json!({"up_to": 1})))
        .await;
    let (_, e) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(e["affected_blobs"], 3);
    // Retention deleted a's result meanwhile: the confirmed count is stale.
    let audit = veil_router::store::NewAuditEntry {
        action: "blob.delete".into(),
        ..Default::default()
    };
    let kind = veil_router::store::BlobKind::Result;
    assert!(
        env.state
            .store
            .record_deletion(
                a.id,
                kind,
                &a.result.as_ref().unwrap().result_urn,
                1,
                &audit
            )
            .await
            .unwrap()
    );
    let (st, e) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1, "confirm_blobs": 3})),
        )
        .await;
    assert_eq!(
        (st, code(&e), e["affected_blobs"].as_u64()),
        (StatusCode::CONFLICT, "confirmation_required", Some(2))
    );
    let (st, _) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1, "confirm_blobs": 2})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_keys_reach_the_key_api() {
    let env = Env::new().await;
    let user = env.user_key().await;
    for (method, path, body) in [
        ("GET", "/api/admin/keys", None),
        ("POST", "/api/admin/keys/rotate", None),
        ("POST", "/api/admin/keys/retire", Some(json!({"up_to": 1}))),
        (
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1, "confirm_blobs": 0})),
        ),
        ("GET", "/api/admin/keys/rewrap", None),
        ("POST", "/api/admin/keys/rewrap", None),
    ] {
        let (st, e) = env.call(method, path, &user, body.clone()).await;
        assert_eq!(
            (st, code(&e)),
            (StatusCode::FORBIDDEN, "admin_required"),
            "{method} {path}"
        );
        let (st, _) = env.call(method, path, "vk_not_a_key", body).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    assert_eq!(
        Keyring::load(env.keyring_path()).unwrap().active(),
        1,
        "nothing changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_router_picks_up_changes_made_by_another_process() {
    let env = Env::new().await;
    let cfg = env.state.cfg.clone();
    // The operator CLI's view: same keyring file and database, another key service.
    let cli = key_lifecycle::operator_state(cfg.clone()).await.unwrap();
    key_lifecycle::rotate(&cli, "operator").await.unwrap();
    assert_eq!(env.state.keys.active_version(), 1, "not yet seen");
    let watcher = tokio::spawn(key_lifecycle::watch_keyring(env.state.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while env.state.keys.active_version() != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the router never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while env.audit("keyring.reload").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload was not audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The router's own later change, read back on the next tick, is not a reload to report.
    key_lifecycle::rotate(&env.state, "admin").await.unwrap();
    tokio::time::sleep(key_lifecycle::KEYRING_RELOAD_INTERVAL * 2).await;
    assert_eq!(env.audit("keyring.reload").await.len(), 1);
    assert_eq!(env.state.keys.active_version(), 3);
    assert!(cli.keys.reload_if_changed().await.unwrap());
    assert_eq!(cli.keys.active_version(), 3);
    // And the other way round: the router's change reaches the CLI's service on reload.
    key_lifecycle::retire(&env.state, "admin", 1).await.unwrap();
    assert!(cli.keys.reload_if_changed().await.unwrap());
    assert_eq!(cli.keys.snapshot().1, 2);
    assert!(
        !cli.keys.reload_if_changed().await.unwrap(),
        "unchanged file, no reload"
    );
    // A broken file keeps the last good keyring.
    let path = env.keyring_path();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(cli.keys.reload_if_changed().await.is_err());
    assert_eq!(cli.keys.snapshot().0, 3);
    assert!(
        !cli.keys.reload_if_changed().await.unwrap(),
        "reported once per change"
    );
    watcher.abort();
    // The operator CLI never creates a keyring.
    let mut missing = cfg;
    missing.keyring_path = env.dir.path().join("nope.json");
    assert!(key_lifecycle::operator_state(missing).await.is_err());
    assert!(!env.dir.path().join("nope.json").exists());
}

fn write_secret(path: &Path, ring: &Keyring, mode: u32) {
    // As a secret volume updates: a new file swapped in.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, ring.to_json().as_bytes()).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_file_and_memory_keyrings_are_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret-keyring.json");
    let mut ring = Keyring::generate().unwrap();
    write_secret(&secret, &ring, 0o440);
    let path = secret.clone();
    let env = Env::with_settings(dir, move |s| s.keyring_file = Some(path)).await;
    assert!(
        !env.keyring_path().exists(),
        "no keyring file is created beside a secret file"
    );
    let (_, s) = env.admin("GET", "/api/admin/keys", None).await;
    assert_eq!(
        (s["source"].as_str(), s["read_only"].as_bool()),
        (Some("secret_file"), Some(true))
    );
    for (path, body) in [
        ("/api/admin/keys/rotate", None),
        ("/api/admin/keys/retire", Some(json!({"up_to": 1}))),
        (
            "/api/admin/keys/destroy",
            Some(json!({"version": 1, "confirm_blobs": 0})),
        ),
    ] {
        let (st, e) = env.admin("POST", path, body).await;
        if path.ends_with("destroy") {
            // Refused before: version 1 is active.
            assert_eq!(code(&e), "key_version_active", "{e}");
            continue;
        }
        assert_eq!(
            (st, code(&e)),
            (StatusCode::CONFLICT, "keyring_read_only"),
            "{path}: {e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().contains("secret"),
            "{e}"
        );
    }
    // The secret manager rotates: the router reloads it.
    ring.rotate().unwrap();
    write_secret(&secret, &ring, 0o440);
    assert!(env.state.keys.reload_if_changed().await.unwrap());
    assert_eq!(env.state.keys.active_version(), 2);
    // A secret others can read is not taken.
    ring.rotate().unwrap();
    write_secret(&secret, &ring, 0o444);
    assert!(env.state.keys.reload_if_changed().await.is_err());
    assert_eq!(env.state.keys.active_version(), 2);

    // Memory (embedding programs) and the environment variable refuse the same way.
    for source in [KeyringSource::Memory, KeyringSource::Env] {
        let keys = KeyService::with_source(Keyring::generate().unwrap(), source.clone());
        let st = AppState::new(
            env.state.cfg.clone(),
            env.state.store.clone(),
            env.state.blobs.clone(),
            keys,
            server::metrics_handle(),
            None,
        );
        let (status, e) = call(&st, "POST", "/api/admin/keys/rotate", &env.admin, None).await;
        assert_eq!(
            (status, code(&e)),
            (StatusCode::CONFLICT, "keyring_read_only"),
            "{source:?}"
        );
        let (_, s) = call(&st, "GET", "/api/admin/keys", &env.admin, None).await;
        assert_eq!(s["read_only"], true);
    }
}

#[tokio::test]
async fn keyring_files_others_can_read_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::embedded(dir.path());
    server::prepare(cfg.clone()).await.unwrap();
    let path = dir.path().join("keyring.json");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = server::prepare(cfg.clone()).await.unwrap_err();
    assert!(matches!(e, server::StartError::Keyring(_)), "{e}");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(
        server::prepare(cfg.clone()).await.is_err(),
        "group access is refused too"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    server::prepare(cfg).await.unwrap();

    // A secret file: group read is fine, others are not.
    let secret = dir.path().join("secret");
    write_secret(&secret, &Keyring::generate().unwrap(), 0o640);
    let with_secret = |p: &Path| {
        Config::from_settings(Settings {
            data_dir: Some(dir.path().to_path_buf()),
            keyring_file: Some(p.to_path_buf()),
            ..Settings::default()
        })
        .unwrap()
    };
    server::prepare(with_secret(&secret)).await.unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o604)).unwrap();
    let e = server::prepare(with_secret(&secret)).await.unwrap_err();
    assert!(e.to_string().contains("keyring_file"), "{e}");
}

/// A task as created, with its prompt and (when it completed) its result plaintext.
type Sealed = (Task, Vec<u8>, Option<Vec<u8>>);

/// Everything a rewrap must leave: each router-sealed finished task under `version` with
/// its blobs opening to the same plaintext, old blobs gone, no blob file unaccounted for, and
/// an empty journal.
async fn check_moved(env: &Env, before: &[Sealed], version: u32, all: &[Uuid]) {
    for (old, prompt, result) in before {
        let t = env.state.store.get_task(old.id).await.unwrap();
        assert_eq!(t.key_version, version, "task {}", t.id);
        assert_ne!(t.prompt_urn, old.prompt_urn);
        assert!(env.gone(&old.prompt_urn).await, "old prompt blob deleted");
        assert_eq!(&env.open(&t.prompt_urn, &t.prompt_hash, &t).await, prompt);
        match (result, &t.result, &old.result) {
            (Some(text), Some(r), Some(o)) => {
                assert_ne!(r.result_urn, o.result_urn);
                assert!(env.gone(&o.result_urn).await, "old result blob deleted");
                assert_eq!(&env.open(&r.result_urn, &r.result_hash, &t).await, text);
                assert_eq!(
                    r.result_size,
                    env.state
                        .blobs
                        .head(&r.result_urn.parse().unwrap())
                        .await
                        .unwrap()
                        .size
                );
                let (st, answer) = env.answer(t.id).await;
                assert_eq!((st, answer.as_bytes()), (StatusCode::OK, text.as_slice()));
            }
            (None, None, None) => assert_eq!(t.state, TaskState::Failed),
            other => panic!("{other:?}"),
        }
    }
    let (files, referenced) = env.blob_counts(all).await;
    assert_eq!(files, referenced, "no orphaned or missing blob files");
    assert!(env.state.store.rewrap_journal().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_every_router_sealed_blob_and_nothing_else() {
    let env = Env::new().await;
    let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut before = Vec::new();
    for (p, r) in [
        (b"p1".to_vec(), Some(b"r1".to_vec())),
        (b"p2".to_vec(), Some(big.clone())), // several envelope chunks
        (big.clone(), Some(Vec::new())),     // empty result
        (b"p4".to_vec(), None),              // failed: a prompt only
    ] {
        let t = env.task(&p, r.as_deref()).await;
        before.push((t, p, r));
    }
    let client = env
        .task_sealed_by(b"client", Some(b"sealed by the client"), SealedBy::Client)
        .await;
    let q = env.task(b"q", Some(b"q")).await;
    before.push((q, b"q".to_vec(), Some(b"q".to_vec())));
    // A queued task is not finished: never moved.
    let queued_id = {
        let id = Uuid::now_v7();
        let v = env.state.keys.active_version();
        let k = env.state.keys.task_key(v, &env.session, &id).unwrap();
        let params = BlobParams::new(KeyId::task(v, env.session, id), Purpose::Prompt);
        let sealed = veil_keys::seal(&k, &params, b"queued").unwrap();
        let blob = env.state.blobs.put(sealed).await.unwrap();
        env.state
            .store
            .enqueue(&NewTask {
                id,
                session_id: env.session,
                prompt_urn: blob.urn.to_string(),
                prompt_hash: blob.sha256,
                prompt_scope: 2,
                key_version: v,
                model: "other-model".into(),
                params: TaskParams::default(),
                max_attempts: 3,
                created_at_ms: veil_router::state::now_ms(),
                deadline_ms: None,
                submitted_by: "test".into(),
                sealed_by: SealedBy::Router,
            })
            .await
            .unwrap();
        id
    };
    let mut all: Vec<Uuid> = before.iter().map(|b| b.0.id).collect();
    all.extend([client.id, queued_id]);

    let (_, p) = env.admin("GET", "/api/admin/keys/rewrap", None).await;
    assert_eq!(
        (p["remaining"].as_u64(), p["running"].as_bool()),
        (Some(0), Some(false)),
        "nothing older than the active version"
    );
    env.admin("POST", "/api/admin/keys/rotate", None).await;
    let (_, p) = env.admin("GET", "/api/admin/keys/rewrap", None).await;
    assert_eq!(
        (p["remaining"].as_u64(), p["target_version"].as_u64()),
        (Some(5), Some(2))
    );

    let (st, p) = env
        .admin("POST", "/api/admin/keys/rewrap", Some(json!({"batch": 2})))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{p}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let p = loop {
        let (_, p) = env.admin("GET", "/api/admin/keys/rewrap", None).await;
        if p["running"] == false && p["finished_at_ms"].is_u64() {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rewrap did not finish: {p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (
            p["done"].as_u64(),
            p["failed"].as_u64(),
            p["skipped"].as_u64(),
            p["remaining"].as_u64()
        ),
        (Some(5), Some(0), Some(0), Some(0)),
        "{p}"
    );
    check_moved(&env, &before, 2, &all).await;

    // The client-sealed and the queued task are untouched.
    let c = env.state.store.get_task(client.id).await.unwrap();
    assert_eq!(c, client);
    assert_eq!(env.open(&c.prompt_urn, &c.prompt_hash, &c).await, b"client");
    let q = env.state.store.get_task(queued_id).await.unwrap();
    assert_eq!((q.key_version, q.state), (1, TaskState::Queued));

    // Audited per task with the old and new hashes.
    let entries = env.audit("keyring.rewrap.task").await;
    assert_eq!(entries.len(), 5);
    let first = entries
        .iter()
        .find(|e| e["task_id"] == json!(before[0].0.id))
        .unwrap();
    assert_eq!(first["detail"]["old_version"], 1);
    assert_eq!(
        first["detail"]["prompt"]["old_hash"],
        hex::encode(before[0].0.prompt_hash)
    );
    assert_eq!(
        env.audit("keyring.rewrap.finish").await[0]["detail"]["done"],
        5
    );

    // Now version 1 can go: only the client-sealed and the queued task's blobs are affected.
    env.admin("POST", "/api/admin/keys/retire", Some(json!({"up_to": 1})))
        .await;
    let (_, e) = env
        .admin(
            "POST",
            "/api/admin/keys/destroy",
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(e["affected_blobs"], 3, "{e}");
    for (t, _, r) in &before {
        if let Some(text) = r {
            assert_eq!(
                env.answer(t.id).await,
                (StatusCode::OK, String::from_utf8(text.clone()).unwrap())
            );
        }
    }
    // Running it again finds nothing to do.
    let again = key_lifecycle::rewrap(&env.state, &RewrapOptions::new("operator"), &|_| {})
        .await
        .unwrap();
    assert_eq!((again.done, again.remaining), (0, 0));
}

async fn crash_and_resume(step: RewrapStep) {
    let env = Env::new().await;
    let mut before = Vec::new();
    for i in 0..3u8 {
        let p = vec![b'p', i];
        let r = vec![b'r', i];
        before.push((env.task(&p, Some(&r)).await, p, Some(r)));
    }
    let all: Vec<Uuid> = before.iter().map(|b| b.0.id).collect();
    key_lifecycle::rotate(&env.state, "operator").await.unwrap();

    let mut opts = RewrapOptions::new("operator");
    opts.crash_at = Some((1, step));
    let err = key_lifecycle::rewrap(&env.state, &opts, &|_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code, "internal_error");
    let journal = env.state.store.rewrap_journal().await.unwrap();
    assert_eq!(
        journal.len(),
        1,
        "{step:?}: the interrupted task's row stays"
    );
    let want = if step == RewrapStep::Switched {
        RewrapState::Switched
    } else {
        RewrapState::Pending
    };
    assert_eq!(journal[0].state, want);
    let (files, referenced) = env.blob_counts(&all).await;
    match step {
        RewrapStep::Journaled => assert_eq!(files, referenced),
        // New blobs written but not referenced / old blobs no longer referenced.
        RewrapStep::BlobsWritten | RewrapStep::Switched => assert_eq!(files, referenced + 2),
    }
    // Every blob still opens in the meantime: no window where a task has none.
    for id in &all {
        let t = env.state.store.get_task(*id).await.unwrap();
        env.open(&t.prompt_urn, &t.prompt_hash, &t).await;
        let r = t.result.as_ref().unwrap();
        env.open(&r.result_urn, &r.result_hash, &t).await;
    }
    assert!(
        !env.state.rewrap.progress().running,
        "the stop released the job"
    );

    let p = key_lifecycle::rewrap(&env.state, &RewrapOptions::new("operator"), &|_| {})
        .await
        .unwrap();
    assert_eq!(p.recovered, 1);
    assert_eq!((p.failed, p.remaining), (0, 0), "{p:?}");
    check_moved(&env, &before, 2, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_resumes_after_a_stop_once_journaled() {
    crash_and_resume(RewrapStep::Journaled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_resumes_after_a_stop_with_new_blobs_written() {
    crash_and_resume(RewrapStep::BlobsWritten).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_resumes_after_a_stop_once_switched() {
    crash_and_resume(RewrapStep::Switched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_aborted_midway_is_finished_by_the_next_run() {
    let env = Env::new().await;
    let mut before = Vec::new();
    for i in 0..30u32 {
        let p = format!("prompt {i}").into_bytes();
        let r = format!("result {i}").repeat(500).into_bytes();
        before.push((env.task(&p, Some(&r)).await, p, Some(r)));
    }
    let all: Vec<Uuid> = before.iter().map(|b| b.0.id).collect();
    key_lifecycle::rotate(&env.state, "operator").await.unwrap();
    let st = env.state.clone();
    let job = tokio::spawn(async move {
        key_lifecycle::rewrap(&st, &RewrapOptions::new("operator"), &|_| {}).await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.state.rewrap.progress().done < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            env.state.rewrap.progress()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    job.abort();
    let _ = job.await;
    // A crashed process's writes end with it. An aborted task's do not: a blob write already
    // handed to a blocking thread (the final rename of an upload) still lands. Wait until the
    // blob directory is quiet, as a new process would start only after the old one had ended.
    let mut last = files_under(&env.blob_dir());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = files_under(&env.blob_dir());
        if now == last {
            break;
        }
        last = now;
    }
    let p = env.state.rewrap.progress();
    assert!(!p.running && p.done < 30, "{p:?}");
    let p = key_lifecycle::rewrap(&env.state, &RewrapOptions::new("operator"), &|_| {})
        .await
        .unwrap();
    assert_eq!((p.failed, p.remaining), (0, 0), "{p:?}");
    check_moved(&env, &before, 2, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rewrap_in_the_same_router_is_refused() {
    let env = Env::new().await;
    for i in 0..20u32 {
        env.task(format!("p{i}").as_bytes(), Some(&vec![b'x'; 100_000]))
            .await;
    }
    key_lifecycle::rotate(&env.state, "operator").await.unwrap();
    let (st, _) = env.admin("POST", "/api/admin/keys/rewrap", None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, e) = env.admin("POST", "/api/admin/keys/rewrap", None).await;
    // Either still running (refused) or already done; never two at once.
    if env.state.rewrap.progress().running {
        assert_eq!((st, code(&e)), (StatusCode::CONFLICT, "rewrap_running"));
    }
    let (st, e) = env
        .admin("POST", "/api/admin/keys/rewrap", Some(json!({"batch": 0})))
        .await;
    assert_eq!(
        (st, e["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("batch"))
    );
    let (st, e) = env
        .admin(
            "POST",
            "/api/admin/keys/rewrap",
            Some(json!({"batches": 1})),
        )
        .await;
    assert_eq!((st, code(&e)), (StatusCode::BAD_REQUEST, "invalid_request"));
}

// --- the operator CLI (the real binary) ------------------------------------------------------

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_veil-router"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("VEIL_KEYRING")
        .env_remove("VEIL_KEYRING_FILE")
        .env_remove("VEIL_CONFIG")
        .env("VEIL_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run veil-router")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_keys_commands() {
    let env = Env::new().await;
    let t = env.task(b"p", Some(b"r")).await;
    let d = env.dir.path();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    let o = cli(d, &["keys", "rotate"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("version 2 is active"), "{}", text(&o));
    let o = cli(d, &["keys", "rewrap", "--batch", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("1 task(s) moved to version 2"),
        "{}",
        text(&o)
    );
    assert_eq!(env.state.store.get_task(t.id).await.unwrap().key_version, 2);
    let o = cli(d, &["keys", "retire", "--up-to", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    // Without a terminal and without --yes, destroy refuses after showing the count.
    let o = cli(d, &["keys", "destroy", "--version", "1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("0 stored blob(s)"), "{}", text(&o));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    assert_eq!(
        Keyring::load(env.keyring_path()).unwrap().versions()[0].state,
        veil_keys::KeyState::Retired
    );
    let o = cli(d, &["keys", "destroy", "--version", "1", "--yes"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cli(d, &["keys", "status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("destroyed"), "{}", text(&o));
    let o = cli(d, &["keys", "status", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            v["keys"]["active"].as_u64(),
            v["keys"]["min_decrypt"].as_u64()
        ),
        (Some(2), Some(2))
    );
    for seed in seeds(&env.keyring_path()) {
        assert!(!text(&o).contains(&seed));
    }
    let o = cli(d, &["keys", "retire", "--up-to", "2"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("key_version_active"), "{}", text(&o));
    // Read-only keyring from the environment: refused, with what to do instead.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_veil-router"))
        .arg("--data-dir")
        .arg(d)
        .args(["keys", "rotate"])
        .env("VEIL_KEYRING", "ab".repeat(32))
        .env_remove("VEIL_KEYRING_FILE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("keyring_read_only"), "{}", text(&o));
    assert!(text(&o).contains("VEIL_KEYRING"), "{}", text(&o));
    assert!(!text(&o).contains(&"ab".repeat(32)));
    let audit = env.audit("keyring.rotate").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["actor"], "operator");
}
