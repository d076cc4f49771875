//! One conformance suite for every [`Store`] backend.
//!
//! Each test is an async function taking the store under test (`Arc<dyn Store>`) and its
//! [`Backend`] (for a second store on the same database and for raw SQL); the `suite!` macro
//! instantiates every one of them for SQLite (a temporary file) and PostgreSQL (a fresh database
//! per test on the server of `VEIL_TEST_DATABASE_URL`; the tests fail when it is unset: run
//! `scripts/test.sh`). Times are explicit Unix milliseconds, never the wall clock.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use uuid::Uuid;
use veil_router::store::{
    AllowlistSource, AuditEntry, BlobKind, CompleteOutcome, DeletionReason, LeaseQuery, LeasedTask,
    NewApiKey, NewAuditEntry, NewMinerSession, NewSession, NewTask, PrivacySetting, QueueDepth,
    ReadTokenRecord, Result, RetentionPolicy, SealingPolicy, Session, SessionKind, Store,
    StoreError, StoreEvent, Task, TaskParams, TaskResultRecord, TaskState, audit_hash, open,
    verify_audit_chain,
};
use veil_router::store::{
    KeyVersionUsage, MovedBlob, NewRewrap, RewrapState, RewrapSwitch, SealedBy,
};
use veil_testkit::postgres::TestDatabase;

const T0: i64 = 1_700_000_000_000;
const TTL: i64 = 30_000;
const MINER_A: &str = "0x1111111111111111111111111111111111111111";
const MINER_B: &str = "0x2222222222222222222222222222222222222222";
const MINER_C: &str = "0x3333333333333333333333333333333333333333";
const MODEL: &str = "llama-3.1-8b";
/// Upper bound on one test, so that a lock-up fails instead of hanging the run.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

// --- backends -------------------------------------------------------------------------------

/// The database behind a store under test.
#[derive(Debug)]
enum Db {
    Sqlite { _dir: tempfile::TempDir },
    Postgres(TestDatabase),
}

/// A store under test and the database it lives in.
#[derive(Debug)]
struct Backend {
    store: Arc<dyn Store>,
    url: String,
    db: Db,
}

impl Backend {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("veil.db").display());
        let store = open_twice(&url).await;
        Self {
            store,
            url,
            db: Db::Sqlite { _dir: dir },
        }
    }

    async fn postgres() -> Self {
        let db = TestDatabase::create().await;
        let url = db.url().to_owned();
        let store = open_twice(&url).await;
        Self {
            store,
            url,
            db: Db::Postgres(db),
        }
    }

    /// A second store on the same database: another replica (PostgreSQL) or another process
    /// on the same file (SQLite).
    async fn replica(&self) -> Arc<dyn Store> {
        open(&self.url).await.expect("open a second store")
    }

    /// Runs SQL behind the store's back, through a connection of its own.
    async fn exec(&self, sql: &'static str) -> u64 {
        match &self.db {
            Db::Sqlite { .. } => {
                let pool = sqlx::SqlitePool::connect(&self.url).await.expect("connect");
                let n = sqlx::query(sql).execute(&pool).await.expect(sql);
                pool.close().await;
                n.rows_affected()
            }
            Db::Postgres(_) => {
                let pool = sqlx::PgPool::connect(&self.url).await.expect("connect");
                let n = sqlx::query(sql).execute(&pool).await.expect(sql);
                pool.close().await;
                n.rows_affected()
            }
        }
    }

    fn is_postgres(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    async fn finish(self) {
        drop(self.store);
        if let Db::Postgres(db) = self.db {
            db.drop_database().await;
        }
    }
}

/// Opens the database from two stores at once, so that every test starts with two concurrent
/// migrations of a fresh schema; keeps one.
async fn open_twice(url: &str) -> Arc<dyn Store> {
    let (a, b) = tokio::join!(open(url), open(url));
    let a = a.expect("open store");
    b.expect("open store concurrently");
    a.migrate().await.expect("migrating again is a no-op");
    a
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let b = super::Backend::sqlite().await;
                    tokio::time::timeout(super::TEST_TIMEOUT, super::$name(b.store.clone(), &b))
                        .await
                        .expect("test timed out");
                    b.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let b = super::Backend::postgres().await;
                    tokio::time::timeout(super::TEST_TIMEOUT, super::$name(b.store.clone(), &b))
                        .await
                        .expect("test timed out");
                    b.finish().await;
                }
            )*
        }
    };
}

suite!(
    migrate_and_ping,
    sessions_create_get_list,
    privacy_and_close,
    api_keys,
    miner_sessions_and_served_models,
    nonces,
    read_tokens,
    rates_admit_a_burst_then_space_requests,
    enqueue_and_get,
    get_tasks_reads_many_at_once,
    enqueue_refuses_closed_and_expired_sessions,
    lease_is_fair_across_sessions,
    lease_is_fifo_within_a_session,
    lease_filters_by_model,
    private_session_allowlist,
    stale_acl_skips_contract_sessions,
    closed_and_expired_sessions_are_not_leased,
    close_session_cancels_open_tasks,
    deadlines,
    lease_expiry_reap_and_release,
    max_attempts_makes_a_task_dead,
    release_requeues,
    fail_is_final,
    lease_holder_checks,
    complete_is_idempotent,
    late_result_after_lapse_is_accepted,
    cancel,
    events_reach_subscribers,
    audit_chain,
    audit_tampering_is_detected,
    retention_policy_round_trips,
    retention_due_deletions,
    retention_rules_each_name_a_blob_once,
    retention_follows_every_end_of_a_task_and_policy_changes,
    key_lifecycle_usage_candidates_and_rewrap_journal,
    audit_appends_stay_linear_under_concurrency,
    concurrent_leasing_leases_every_task_once,
);

/// Tests of PostgreSQL replicas waking each other (SQLite events are in-process only).
mod postgres_replicas {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_cross_replicas() {
        let b = Backend::postgres().await;
        tokio::time::timeout(TEST_TIMEOUT, events_cross_replicas_(b.store.clone(), &b))
            .await
            .expect("test timed out");
        b.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_survive_a_dropped_listen_connection() {
        let b = Backend::postgres().await;
        tokio::time::timeout(TEST_TIMEOUT, listener_reconnects(b.store.clone(), &b))
            .await
            .expect("test timed out");
        b.finish().await;
    }
}

/// What only the SQLite backend has: a private file, and an in-memory mode.
mod sqlite_only {
    use super::*;

    #[cfg(unix)]
    #[tokio::test]
    async fn database_file_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.db");
        let store = open(&format!("sqlite://{}", path.display())).await.unwrap();
        session(&store, public()).await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "database file mode {mode:o}");
        for suffix in ["-wal", "-shm"] {
            let side = dir.path().join(format!("fresh.db{suffix}"));
            if let Ok(m) = std::fs::metadata(&side) {
                let mode = m.permissions().mode() & 0o777;
                assert_eq!(mode & 0o077, 0, "{suffix} file mode {mode:o}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn in_memory_database_keeps_its_data() {
        let s = open("sqlite::memory:").await.unwrap();
        let sess = session(&s, public()).await;
        let mut handles = vec![];
        for i in 0..20 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                s.enqueue(&new_task(sess.id, MODEL, T0 + i)).await.unwrap()
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.queue_depth().await.unwrap().queued, 20);
        assert_eq!(s.get_session(sess.id).await.unwrap(), sess);
    }
}

// --- helpers --------------------------------------------------------------------------------

fn public() -> PrivacySetting {
    PrivacySetting {
        private: false,
        allowed_miners: vec![],
        source: AllowlistSource::Router,
    }
}

fn private(miners: &[&str]) -> PrivacySetting {
    PrivacySetting {
        private: true,
        allowed_miners: miners.iter().map(|m| m.to_string()).collect(),
        source: AllowlistSource::Router,
    }
}

fn new_session(owner: &str, privacy: PrivacySetting, at: i64) -> NewSession {
    NewSession {
        id: Uuid::now_v7(),
        owner: owner.into(),
        kind: SessionKind::Dedicated,
        privacy,
        created_at_ms: at,
        expires_at_ms: None,
        retention: RetentionPolicy::default(),
        sealing: SealingPolicy::Any,
    }
}

async fn session(s: &Arc<dyn Store>, privacy: PrivacySetting) -> Session {
    s.create_session(&new_session("key:owner", privacy, T0))
        .await
        .expect("create session")
}

fn new_task(session_id: Uuid, model: &str, at: i64) -> NewTask {
    NewTask {
        id: Uuid::now_v7(),
        session_id,
        prompt_urn: format!("urn:veil:blob:{}", Uuid::new_v4()),
        prompt_hash: [7u8; 32],
        prompt_scope: 2,
        key_version: 3,
        model: model.into(),
        params: TaskParams {
            max_tokens: Some(64),
            temperature: Some(0.5),
            stream: true,
            ..TaskParams::default()
        },
        max_attempts: 3,
        created_at_ms: at,
        deadline_ms: None,
        submitted_by: "key:owner".into(),
        sealed_by: SealedBy::Router,
    }
}

async fn enqueue(s: &Arc<dyn Store>, session_id: Uuid) -> Task {
    s.enqueue(&new_task(session_id, MODEL, T0))
        .await
        .expect("enqueue")
}

fn query(miner: &str, models: &[&str], now_ms: i64, ttl_ms: i64) -> LeaseQuery {
    LeaseQuery {
        miner: miner.into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        now_ms,
        ttl_ms,
        lease_id: Uuid::now_v7(),
        skip_contract_sessions: false,
    }
}

async fn lease(s: &Arc<dyn Store>, miner: &str, now_ms: i64) -> Option<LeasedTask> {
    s.lease(&query(miner, &[MODEL], now_ms, TTL))
        .await
        .expect("lease")
}

async fn lease_one(s: &Arc<dyn Store>, miner: &str, now_ms: i64) -> LeasedTask {
    lease(s, miner, now_ms).await.expect("a task to lease")
}

fn result(miner: &str, n: u8) -> TaskResultRecord {
    TaskResultRecord {
        result_urn: format!("urn:veil:blob:result-{n}"),
        result_hash: [n; 32],
        result_size: 1000 + u64::from(n),
        miner: miner.into(),
        signature: vec![n; 65],
        prompt_tokens: 11,
        completion_tokens: 22,
        finish_reason: "stop".into(),
    }
}

#[track_caller]
fn expect_conflict<T: Debug>(r: Result<T>, want: &str) {
    match r {
        Err(StoreError::Conflict { code, .. }) if code == want => {}
        other => panic!("expected Conflict({want}), got {other:?}"),
    }
}

#[track_caller]
fn expect_not_found<T: Debug>(r: Result<T>, want: &str) {
    match r {
        Err(StoreError::NotFound { what }) if what == want => {}
        other => panic!("expected NotFound({want}), got {other:?}"),
    }
}

#[track_caller]
fn expect_exists<T: Debug>(r: Result<T>, want: &str) {
    match r {
        Err(StoreError::AlreadyExists { what }) if what == want => {}
        other => panic!("expected AlreadyExists({want}), got {other:?}"),
    }
}

/// Waits (up to 10 s) for an event matching `pred`; panics otherwise.
async fn wait_for(rx: &mut broadcast::Receiver<StoreEvent>, pred: impl Fn(&StoreEvent) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if pred(&e) => return,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event channel closed: {e}"),
            Err(_) => panic!("no matching event within 10 s"),
        }
    }
}

/// Events already delivered to `rx`.
fn drain(rx: &mut broadcast::Receiver<StoreEvent>) -> Vec<StoreEvent> {
    let mut out = vec![];
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

fn available(model: &str) -> StoreEvent {
    StoreEvent::TaskAvailable {
        model: model.into(),
    }
}

fn finished(task_id: Uuid) -> StoreEvent {
    StoreEvent::TaskFinished { task_id }
}

// --- the suite ------------------------------------------------------------------------------

async fn migrate_and_ping(s: Arc<dyn Store>, b: &Backend) {
    s.migrate().await.expect("migrate is idempotent");
    s.ping().await.expect("ping");
    let other = b.replica().await;
    other.ping().await.expect("ping from a second store");
    assert_eq!(s.count_api_keys().await.unwrap(), 0, "fresh database");
    assert_eq!(s.queue_depth().await.unwrap(), Default::default());
}

async fn sessions_create_get_list(s: Arc<dyn Store>, _b: &Backend) {
    let mut ids = vec![];
    for i in 0..3 {
        let n = new_session("key:one", private(&[MINER_A, MINER_B]), T0 + i);
        let created = s.create_session(&n).await.unwrap();
        assert_eq!(created.id, n.id);
        assert_eq!(created.owner, "key:one");
        assert_eq!(created.kind, SessionKind::Dedicated);
        assert_eq!(created.privacy, n.privacy);
        assert_eq!(created.created_at_ms, T0 + i);
        assert_eq!(created.closed_at_ms, None);
        assert_eq!(s.get_session(n.id).await.unwrap(), created);
        ids.push(n.id);
    }
    let mut pooled = new_session("0xAbCd000000000000000000000000000000000001", public(), T0);
    pooled.kind = SessionKind::Pooled;
    pooled.expires_at_ms = Some(T0 + 1000);
    pooled.privacy.source = AllowlistSource::Contract;
    let other = s.create_session(&pooled).await.unwrap();
    assert_eq!(other.kind, SessionKind::Pooled);
    assert_eq!(other.expires_at_ms, Some(T0 + 1000));
    assert_eq!(other.privacy.source, AllowlistSource::Contract);

    expect_exists(s.create_session(&pooled).await, "session");
    expect_not_found(s.get_session(Uuid::now_v7()).await, "session");

    let listed: Vec<Uuid> = s
        .list_sessions("key:one", 10, None)
        .await
        .unwrap()
        .iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(listed, vec![ids[2], ids[1], ids[0]], "newest first");
    let page: Vec<Uuid> = s
        .list_sessions("key:one", 2, None)
        .await
        .unwrap()
        .iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(page, vec![ids[2], ids[1]]);
    let next = s.list_sessions("key:one", 2, Some(ids[1])).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, ids[0]);
    assert_eq!(
        next[0].privacy.allowed_miners,
        vec![MINER_A.to_string(), MINER_B.to_string()],
        "listed sessions carry their allowlist, in order"
    );
    let theirs = s
        .list_sessions("0xAbCd000000000000000000000000000000000001", 10, None)
        .await
        .unwrap();
    assert_eq!(theirs, vec![other]);
    assert!(
        s.list_sessions("nobody", 10, None)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn privacy_and_close(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let p = PrivacySetting {
        private: true,
        allowed_miners: vec![MINER_C.into(), MINER_A.into()],
        source: AllowlistSource::Static,
    };
    let updated = s.set_privacy(sess.id, &p).await.unwrap();
    assert_eq!(updated.privacy, p);
    assert_eq!(s.get_session(sess.id).await.unwrap().privacy, p);
    let back = s.set_privacy(sess.id, &public()).await.unwrap();
    assert_eq!(back.privacy, public());
    expect_not_found(s.set_privacy(Uuid::now_v7(), &p).await, "session");

    assert_eq!(s.close_session(sess.id, T0 + 10).await.unwrap(), 0);
    let closed = s.get_session(sess.id).await.unwrap();
    assert_eq!(closed.closed_at_ms, Some(T0 + 10));
    assert!(!closed.is_open(T0 + 11));
    assert_eq!(
        s.close_session(sess.id, T0 + 20).await.unwrap(),
        0,
        "closing a closed session is a no-op"
    );
    assert_eq!(
        s.get_session(sess.id).await.unwrap().closed_at_ms,
        Some(T0 + 10)
    );
    expect_conflict(s.set_privacy(sess.id, &p).await, "session_closed");
    expect_not_found(s.close_session(Uuid::now_v7(), T0).await, "session");
}

fn new_key(owner: &str, hash: u8, admin: bool, at: i64) -> NewApiKey {
    NewApiKey {
        id: Uuid::now_v7(),
        owner: owner.into(),
        hash: [hash; 32],
        prefix: format!("vk_{hash:02x}"),
        admin,
        rate_per_minute: 600,
        max_concurrent: 8,
        created_at_ms: at,
    }
}

async fn api_keys(s: Arc<dyn Store>, _b: &Backend) {
    assert_eq!(s.count_api_keys().await.unwrap(), 0);
    let k1 = new_key("admin", 1, true, T0);
    let k2 = new_key("team-a", 2, false, T0 + 1);
    let a = s.create_api_key(&k1).await.unwrap();
    assert_eq!(a.id, k1.id);
    assert_eq!(a.owner, "admin");
    assert_eq!(a.prefix, "vk_01");
    assert!(a.admin);
    assert_eq!((a.rate_per_minute, a.max_concurrent), (600, 8));
    assert_eq!((a.default_session, a.revoked_at_ms), (None, None));
    assert_eq!(a.created_at_ms, T0);
    let b2 = s.create_api_key(&k2).await.unwrap();
    assert!(!b2.admin);

    expect_exists(s.create_api_key(&k1).await, "api_key");
    let mut same_hash = new_key("x", 1, false, T0);
    same_hash.id = Uuid::now_v7();
    expect_exists(s.create_api_key(&same_hash).await, "api_key");
    assert_eq!(s.count_api_keys().await.unwrap(), 2);

    assert_eq!(s.api_key_by_hash(&[1; 32]).await.unwrap(), a);
    assert_eq!(s.api_key_by_hash(&[2; 32]).await.unwrap(), b2);
    expect_not_found(s.api_key_by_hash(&[9; 32]).await, "api_key");
    assert_eq!(
        s.list_api_keys().await.unwrap(),
        vec![a.clone(), b2.clone()]
    );

    let revoked = s.revoke_api_key(k2.id, T0 + 5).await.unwrap();
    assert_eq!(revoked.revoked_at_ms, Some(T0 + 5));
    let again = s.revoke_api_key(k2.id, T0 + 9).await.unwrap();
    assert_eq!(again.revoked_at_ms, Some(T0 + 5), "revoking is idempotent");
    assert_eq!(
        s.api_key_by_hash(&[2; 32]).await.unwrap().revoked_at_ms,
        Some(T0 + 5),
        "revoked keys are still found, with revoked_at"
    );
    expect_not_found(s.revoke_api_key(Uuid::now_v7(), T0).await, "api_key");
    assert_eq!(s.count_api_keys().await.unwrap(), 2);

    let sess = session(&s, public()).await;
    s.set_default_session(k1.id, sess.id).await.unwrap();
    assert_eq!(
        s.api_key_by_hash(&[1; 32]).await.unwrap().default_session,
        Some(sess.id)
    );
    expect_not_found(
        s.set_default_session(k1.id, Uuid::now_v7()).await,
        "session",
    );
    expect_not_found(
        s.set_default_session(Uuid::now_v7(), sess.id).await,
        "api_key",
    );
}

async fn miner_sessions_and_served_models(s: Arc<dyn Store>, _b: &Backend) {
    let m1 = NewMinerSession {
        token_hash: [1; 32],
        miner: MINER_A.into(),
        recipient: [0xaa; 32],
        models: vec![
            ("mistral-7b".into(), Some("ab".repeat(32))),
            (MODEL.into(), None),
        ],
        created_at_ms: T0,
        expires_at_ms: T0 + 100,
    };
    let m2 = NewMinerSession {
        token_hash: [2; 32],
        miner: MINER_B.into(),
        recipient: [0xbb; 32],
        models: vec![("qwen-2".into(), None), (MODEL.into(), None)],
        created_at_ms: T0,
        expires_at_ms: T0 + 50,
    };
    s.create_miner_session(&m1).await.unwrap();
    s.create_miner_session(&m2).await.unwrap();
    expect_exists(s.create_miner_session(&m1).await, "miner_session");

    assert_eq!(s.miner_session(&[1; 32], T0).await.unwrap(), m1);
    assert_eq!(s.miner_session(&[2; 32], T0 + 49).await.unwrap(), m2);
    expect_not_found(s.miner_session(&[2; 32], T0 + 50).await, "miner_session");
    expect_not_found(s.miner_session(&[3; 32], T0).await, "miner_session");

    assert_eq!(
        s.served_models(T0).await.unwrap(),
        vec![MODEL.to_string(), "mistral-7b".into(), "qwen-2".into()],
        "deduplicated and sorted"
    );
    assert_eq!(
        s.served_models(T0 + 60).await.unwrap(),
        vec![MODEL.to_string(), "mistral-7b".into()],
        "expired miner sessions serve nothing"
    );
    assert!(s.served_models(T0 + 100).await.unwrap().is_empty());
}

async fn nonces(s: Arc<dyn Store>, _b: &Backend) {
    let (n1, n2) = ([1u8; 16], [2u8; 16]);
    s.use_nonce(MINER_A, &n1, T0 + 10).await.unwrap();
    expect_exists(s.use_nonce(MINER_A, &n1, T0 + 10).await, "nonce");
    expect_exists(s.use_nonce(MINER_A, &n1, T0 + 999).await, "nonce");
    s.use_nonce(MINER_B, &n1, T0 + 10)
        .await
        .expect("nonces are per signer");
    s.use_nonce(MINER_A, &n2, T0 + 100).await.unwrap();
    assert_eq!(s.prune_nonces(T0 + 10).await.unwrap(), 0, "not yet expired");
    assert_eq!(s.prune_nonces(T0 + 50).await.unwrap(), 2);
    s.use_nonce(MINER_A, &n1, T0 + 200)
        .await
        .expect("a pruned pair is forgotten");
    expect_exists(s.use_nonce(MINER_A, &n2, T0 + 100).await, "nonce");
}

fn read_token(hash: u8, owner: &str, session_id: Uuid, expires_at_ms: i64) -> ReadTokenRecord {
    ReadTokenRecord {
        token_hash: [hash; 32],
        owner: owner.into(),
        session_id,
        created_at_ms: T0,
        expires_at_ms,
    }
}

async fn read_tokens(s: Arc<dyn Store>, b: &Backend) {
    let sess = session(&s, public()).await;
    let t1 = read_token(1, MINER_A, sess.id, T0 + 100);
    s.create_read_token(&t1).await.unwrap();
    s.create_read_token(&read_token(2, MINER_A, sess.id, T0 + 1_000))
        .await
        .unwrap();
    assert_eq!(s.read_token(&[1; 32], T0 + 99).await.unwrap(), t1);
    expect_not_found(s.read_token(&[1; 32], T0 + 100).await, "read_token");
    expect_not_found(s.read_token(&[9; 32], T0).await, "read_token");
    expect_exists(
        s.create_read_token(&read_token(1, MINER_B, sess.id, T0 + 5_000))
            .await,
        "read_token",
    );
    expect_not_found(
        s.create_read_token(&read_token(3, MINER_A, Uuid::now_v7(), T0 + 100))
            .await,
        "session",
    );
    // Another replica sees the same tokens.
    let r = b.replica().await;
    assert_eq!(r.read_token(&[1; 32], T0).await.unwrap(), t1);
    assert_eq!(
        s.prune_read_tokens(T0 + 99).await.unwrap(),
        0,
        "not yet expired"
    );
    assert_eq!(s.prune_read_tokens(T0 + 100).await.unwrap(), 1);
    expect_not_found(r.read_token(&[1; 32], T0).await, "read_token");
    assert_eq!(
        s.read_token(&[2; 32], T0 + 999)
            .await
            .unwrap()
            .expires_at_ms,
        T0 + 1_000
    );
}

async fn rates_admit_a_burst_then_space_requests(s: Arc<dyn Store>, b: &Backend) {
    let replica = b.replica().await;
    const T: i64 = 20_000_000; // three a minute, in microseconds
    let now = T0 * 1000;
    let caller = Uuid::now_v7();
    // A burst of three at once, taken through either store.
    assert_eq!(s.take_rate(caller, now, T, 3).await.unwrap(), None);
    assert_eq!(replica.take_rate(caller, now, T, 3).await.unwrap(), None);
    assert_eq!(s.take_rate(caller, now, T, 3).await.unwrap(), None);
    // Then one per interval; a refusal says how long to wait and changes nothing.
    assert_eq!(replica.take_rate(caller, now, T, 3).await.unwrap(), Some(T));
    assert_eq!(
        s.take_rate(caller, now + T / 2, T, 3).await.unwrap(),
        Some(T / 2)
    );
    assert_eq!(
        replica.take_rate(caller, now + T, T, 3).await.unwrap(),
        None
    );
    assert_eq!(s.take_rate(caller, now + T, T, 3).await.unwrap(), Some(T));
    // Callers are counted apart.
    let other = Uuid::now_v7();
    assert_eq!(s.take_rate(other, now, T, 1).await.unwrap(), None);
    assert_eq!(s.take_rate(other, now, T, 1).await.unwrap(), Some(T));
    // A caller is forgotten once back at its full quota, and starts from it again.
    assert_eq!(s.prune_rates(now + T).await.unwrap(), 0);
    assert_eq!(s.prune_rates(now + 2 * T).await.unwrap(), 1);
    assert_eq!(s.take_rate(other, now + 2 * T, T, 1).await.unwrap(), None);
    // One interval on, the busy caller has one request again, not more.
    assert_eq!(s.take_rate(caller, now + 2 * T, T, 3).await.unwrap(), None);
    assert_eq!(
        s.take_rate(caller, now + 2 * T, T, 3).await.unwrap(),
        Some(T)
    );

    // Twenty requests at one instant through two stores at once: exactly the burst of ten.
    let busy = Uuid::now_v7();
    let mut takes = vec![];
    for i in 0..20 {
        let store = if i % 2 == 0 {
            s.clone()
        } else {
            replica.clone()
        };
        takes.push(tokio::spawn(async move {
            store.take_rate(busy, now, T, 10).await.unwrap()
        }));
    }
    let mut admitted = 0;
    for t in takes {
        if t.await.unwrap().is_none() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
}

async fn enqueue_and_get(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let mut n = new_task(sess.id, MODEL, T0 + 1);
    n.deadline_ms = Some(T0 + 60_000);
    n.params.stop = vec!["\n\n".into()];
    n.params.seed = Some(42);
    let t = s.enqueue(&n).await.unwrap();
    assert_eq!(t.id, n.id);
    assert_eq!(t.session_id, sess.id);
    assert_eq!(t.prompt_urn, n.prompt_urn);
    assert_eq!(t.prompt_hash, n.prompt_hash);
    assert_eq!(t.prompt_scope, 2);
    assert_eq!(t.key_version, 3);
    assert_eq!(t.model, MODEL);
    assert_eq!(t.params, n.params);
    assert_eq!(t.state, TaskState::Queued);
    assert_eq!((t.attempts, t.max_attempts), (0, 3));
    assert_eq!(t.created_at_ms, T0 + 1);
    assert_eq!(t.deadline_ms, Some(T0 + 60_000));
    assert_eq!(t.submitted_by, "key:owner");
    assert_eq!((t.lease_id, t.leased_by.as_deref()), (None, None));
    assert_eq!(t.lease_expires_at_ms, None);
    assert_eq!(t.result, None);
    assert_eq!((t.error_code.as_deref(), t.finished_at_ms), (None, None));
    assert_eq!(s.get_task(n.id).await.unwrap(), t);

    expect_exists(s.enqueue(&n).await, "task");
    expect_not_found(
        s.enqueue(&new_task(Uuid::now_v7(), MODEL, T0)).await,
        "session",
    );
    expect_not_found(s.get_task(Uuid::now_v7()).await, "task");
    enqueue(&s, sess.id).await;
    let depth = s.queue_depth().await.unwrap();
    assert_eq!((depth.queued, depth.leased), (2, 0));
}

async fn get_tasks_reads_many_at_once(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let done = completed(&s, sess.id, 1, T0).await;
    let mut ids = vec![done.id];
    for _ in 0..299 {
        ids.push(enqueue(&s, sess.id).await.id);
    }
    let unknown = Uuid::now_v7();
    // Unknown ids are left out, duplicates give their task once, order does not matter.
    let mut asked = ids.clone();
    asked.push(unknown);
    asked.push(ids[7]);
    asked.reverse();
    let mut got = s.get_tasks(&asked).await.unwrap();
    got.sort_by_key(|t| t.id);
    let mut want = vec![];
    for id in &ids {
        want.push(s.get_task(*id).await.unwrap());
    }
    want.sort_by_key(|t| t.id);
    assert_eq!(got.len(), 300);
    assert_eq!(
        got, want,
        "each task as get_task reads it, the completed one with its result"
    );
    assert!(got.iter().any(|t| t.result.is_some()));
    assert!(s.get_tasks(&[]).await.unwrap().is_empty());
    assert!(s.get_tasks(&[unknown]).await.unwrap().is_empty());
}

async fn enqueue_refuses_closed_and_expired_sessions(s: Arc<dyn Store>, _b: &Backend) {
    let mut n = new_session("key:owner", public(), T0);
    n.expires_at_ms = Some(T0 + 100);
    let expiring = s.create_session(&n).await.unwrap();
    s.enqueue(&new_task(expiring.id, MODEL, T0 + 99))
        .await
        .expect("open until it expires");
    expect_conflict(
        s.enqueue(&new_task(expiring.id, MODEL, T0 + 100)).await,
        "session_closed",
    );
    let closed = session(&s, public()).await;
    s.close_session(closed.id, T0).await.unwrap();
    expect_conflict(
        s.enqueue(&new_task(closed.id, MODEL, T0 + 1)).await,
        "session_closed",
    );
}

async fn lease_is_fair_across_sessions(s: Arc<dyn Store>, _b: &Backend) {
    let a = session(&s, public()).await;
    let b = session(&s, public()).await;
    for i in 0..10 {
        s.enqueue(&new_task(a.id, MODEL, T0 + i)).await.unwrap();
    }
    let lone = s.enqueue(&new_task(b.id, MODEL, T0 + 20)).await.unwrap();
    let first = lease_one(&s, MINER_A, T0 + 100).await;
    let second = lease_one(&s, MINER_A, T0 + 100).await;
    assert!(
        first.task.id == lone.id || second.task.id == lone.id,
        "session B's only task is leased within the first two, not after A's ten"
    );
    let mut rest = 0;
    while let Some(l) = lease(&s, MINER_A, T0 + 100).await {
        assert_eq!(l.task.session_id, a.id);
        rest += 1;
    }
    assert_eq!(rest, 9);
}

async fn lease_is_fifo_within_a_session(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let mut ids = vec![];
    for _ in 0..6 {
        // Same timestamp and random (unordered) ids: only the queue's own order can tell.
        let mut n = new_task(sess.id, MODEL, T0);
        n.id = Uuid::new_v4();
        s.enqueue(&n).await.unwrap();
        ids.push(n.id);
    }
    let mut leased = vec![];
    while let Some(l) = lease(&s, MINER_A, T0 + 1).await {
        assert_eq!(l.attempt, 1);
        leased.push(l.task.id);
    }
    assert_eq!(leased, ids);
}

async fn lease_filters_by_model(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let x = s.enqueue(&new_task(sess.id, "model-x", T0)).await.unwrap();
    let y = s.enqueue(&new_task(sess.id, "model-y", T0)).await.unwrap();
    let none = s
        .lease(&query(MINER_A, &["model-z"], T0, TTL))
        .await
        .unwrap();
    assert!(none.is_none());
    let empty = s.lease(&query(MINER_A, &[], T0, TTL)).await.unwrap();
    assert!(empty.is_none(), "a miner serving no model gets nothing");
    let got = s
        .lease(&query(MINER_A, &["model-z", "model-y"], T0, TTL))
        .await
        .unwrap()
        .expect("model-y task");
    assert_eq!(got.task.id, y.id);
    assert!(
        s.lease(&query(MINER_A, &["model-y"], T0, TTL))
            .await
            .unwrap()
            .is_none()
    );
    let got = s
        .lease(&query(MINER_B, &["model-x"], T0, TTL))
        .await
        .unwrap()
        .expect("model-x task");
    assert_eq!(got.task.id, x.id);
}

async fn private_session_allowlist(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, private(&[MINER_C, MINER_A])).await;
    let t = enqueue(&s, sess.id).await;
    assert!(
        lease(&s, MINER_B, T0).await.is_none(),
        "a miner not on the allowlist gets nothing"
    );
    let got = lease_one(&s, MINER_A, T0).await;
    assert_eq!(got.task.id, t.id);
    assert_eq!(got.task.leased_by.as_deref(), Some(MINER_A));

    // Public again: anyone may serve it.
    s.set_privacy(sess.id, &public()).await.unwrap();
    let t2 = enqueue(&s, sess.id).await;
    assert_eq!(lease_one(&s, MINER_B, T0).await.task.id, t2.id);
    // Private with nobody allowed: nobody gets it.
    s.set_privacy(sess.id, &private(&[])).await.unwrap();
    enqueue(&s, sess.id).await;
    assert!(lease(&s, MINER_A, T0).await.is_none());
    assert!(lease(&s, MINER_B, T0).await.is_none());
}

async fn stale_acl_skips_contract_sessions(s: Arc<dyn Store>, _b: &Backend) {
    let contract = PrivacySetting {
        source: AllowlistSource::Contract,
        ..private(&[MINER_A])
    };
    let on_chain = session(&s, contract).await;
    let pub_sess = session(&s, public()).await;
    let router_private = session(&s, private(&[MINER_A])).await;
    let t_chain = enqueue(&s, on_chain.id).await;
    let t_pub = enqueue(&s, pub_sess.id).await;
    let t_router = enqueue(&s, router_private.id).await;

    // Stale: the contract-backed session is skipped; the others are served.
    let stale = |miner: &str| {
        let mut q = query(miner, &[MODEL], T0, TTL);
        q.skip_contract_sessions = true;
        q
    };
    let mut got = vec![];
    while let Some(l) = s.lease(&stale(MINER_A)).await.unwrap() {
        got.push(l.task.id);
    }
    got.sort();
    let mut want = vec![t_pub.id, t_router.id];
    want.sort();
    assert_eq!(got, want, "everything but the contract-backed session");
    assert_eq!(
        s.get_task(t_chain.id).await.unwrap().state,
        TaskState::Queued
    );

    // Fresh again: its allowlist applies as for any private session.
    assert!(
        lease(&s, MINER_B, T0).await.is_none(),
        "not on its allowlist"
    );
    assert_eq!(lease_one(&s, MINER_A, T0).await.task.id, t_chain.id);
}

async fn closed_and_expired_sessions_are_not_leased(s: Arc<dyn Store>, _b: &Backend) {
    let mut n = new_session("key:owner", public(), T0);
    n.expires_at_ms = Some(T0 + 100);
    let expiring = s.create_session(&n).await.unwrap();
    let t1 = enqueue(&s, expiring.id).await;
    let _t2 = enqueue(&s, expiring.id).await;
    assert_eq!(lease_one(&s, MINER_A, T0 + 99).await.task.id, t1.id);
    assert!(
        lease(&s, MINER_A, T0 + 100).await.is_none(),
        "tasks of an expired session are not leased"
    );

    let closed = session(&s, public()).await;
    enqueue(&s, closed.id).await;
    s.close_session(closed.id, T0 + 1).await.unwrap();
    assert!(lease(&s, MINER_A, T0 + 200).await.is_none());
}

async fn close_session_cancels_open_tasks(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let other = session(&s, public()).await;
    let done = enqueue(&s, sess.id).await;
    let dl = lease_one(&s, MINER_C, T0).await;
    assert_eq!(dl.task.id, done.id);
    s.complete(dl.lease_id, MINER_C, &result(MINER_C, 1), T0)
        .await
        .unwrap();
    let leased = enqueue(&s, sess.id).await;
    let l = lease_one(&s, MINER_A, T0).await;
    assert_eq!(l.task.id, leased.id);
    let queued = enqueue(&s, sess.id).await;
    let untouched = enqueue(&s, other.id).await;

    let mut rx = s.subscribe();
    assert_eq!(s.close_session(sess.id, T0 + 5).await.unwrap(), 2);
    let mut events = drain(&mut rx);
    events.sort_by_key(|e| format!("{e:?}"));
    let mut want = vec![finished(leased.id), finished(queued.id)];
    want.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(events, want, "one TaskFinished per cancelled task");
    for id in [leased.id, queued.id] {
        let t = s.get_task(id).await.unwrap();
        assert_eq!(t.state, TaskState::Cancelled);
        assert_eq!(t.error_code.as_deref(), Some("session_closed"));
        assert_eq!(t.finished_at_ms, Some(T0 + 5));
    }
    assert_eq!(
        s.get_task(done.id).await.unwrap().state,
        TaskState::Completed,
        "a completed task stays completed"
    );
    assert_eq!(
        s.get_task(untouched.id).await.unwrap().state,
        TaskState::Queued,
        "other sessions are not touched"
    );
    expect_conflict(
        s.complete(l.lease_id, MINER_A, &result(MINER_A, 2), T0 + 6)
            .await,
        "task_final",
    );
    assert_eq!(s.close_session(sess.id, T0 + 6).await.unwrap(), 0);
}

async fn deadlines(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let mut n = new_task(sess.id, MODEL, T0);
    n.deadline_ms = Some(T0 + 100);
    let leased = s.enqueue(&n).await.unwrap();
    let mut n = new_task(sess.id, MODEL, T0);
    n.deadline_ms = Some(T0 + 100);
    let queued = s.enqueue(&n).await.unwrap();
    let mut n = new_task(sess.id, MODEL, T0);
    n.deadline_ms = Some(T0 + 10_000);
    let later = s.enqueue(&n).await.unwrap();
    let free = enqueue(&s, sess.id).await;

    let l = s
        .lease(&query(MINER_A, &[MODEL], T0 + 10, 1_000_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.task.id, leased.id);
    // At the deadline, `queued` is no longer leasable; `later` is.
    let next = lease_one(&s, MINER_A, T0 + 100).await;
    assert_eq!(next.task.id, later.id);
    s.release(next.lease_id, MINER_A, T0 + 100).await.unwrap();

    let mut rx = s.subscribe();
    let report = s.reap(T0 + 100).await.unwrap();
    let mut failed = report.deadline_failed.clone();
    failed.sort();
    let mut want = vec![leased.id, queued.id];
    want.sort();
    assert_eq!(
        failed, want,
        "queued and leased tasks past their deadline fail"
    );
    assert!(report.requeued.is_empty() && report.dead.is_empty());
    for id in [leased.id, queued.id] {
        let t = s.get_task(id).await.unwrap();
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.error_code.as_deref(), Some("deadline_exceeded"));
        assert_eq!(t.finished_at_ms, Some(T0 + 100));
    }
    assert_eq!(drain(&mut rx).len(), 2, "a TaskFinished each");
    assert_eq!(s.get_task(later.id).await.unwrap().state, TaskState::Queued);
    assert_eq!(s.get_task(free.id).await.unwrap().state, TaskState::Queued);
    expect_conflict(
        s.heartbeat(l.lease_id, MINER_A, T0 + 101, TTL).await,
        "lease_not_held",
    );
    assert_eq!(s.reap(T0 + 100).await.unwrap(), Default::default());
}

async fn lease_expiry_reap_and_release(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let t = enqueue(&s, sess.id).await;
    let l1 = s
        .lease(&query(MINER_A, &[MODEL], T0, 1000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l1.attempt, 1);
    assert_eq!(l1.lease_expires_at_ms, T0 + 1000);
    assert_eq!(l1.task.state, TaskState::Leased);
    assert_eq!(l1.task.attempts, 1);
    assert_eq!(l1.task.lease_id, Some(l1.lease_id));
    assert_eq!(l1.task.leased_by.as_deref(), Some(MINER_A));
    assert_eq!(l1.task.lease_expires_at_ms, Some(T0 + 1000));
    assert_eq!(s.queue_depth().await.unwrap().leased, 1);

    assert_eq!(
        s.heartbeat(l1.lease_id, MINER_A, T0 + 500, 1000)
            .await
            .unwrap(),
        T0 + 1500
    );
    let active = s
        .active_lease(l1.lease_id, MINER_A, T0 + 1400)
        .await
        .unwrap();
    assert_eq!(active.lease_expires_at_ms, T0 + 1500);
    assert_eq!(active.task.lease_expires_at_ms, Some(T0 + 1500));
    assert_eq!(s.reap(T0 + 1499).await.unwrap(), Default::default());

    let mut rx = s.subscribe();
    let report = s.reap(T0 + 1500).await.unwrap();
    assert_eq!(report.requeued, vec![t.id]);
    assert!(report.dead.is_empty() && report.deadline_failed.is_empty());
    assert_eq!(drain(&mut rx), vec![available(MODEL)]);
    assert_eq!(s.get_task(t.id).await.unwrap().state, TaskState::Queued);
    expect_conflict(
        s.heartbeat(l1.lease_id, MINER_A, T0 + 1600, 1000).await,
        "lease_expired",
    );

    let l2 = lease_one(&s, MINER_B, T0 + 1600).await;
    assert_eq!(l2.task.id, t.id);
    assert_eq!(l2.attempt, 2);
    assert_eq!(l2.task.attempts, 2);
    assert_ne!(l2.lease_id, l1.lease_id);
    expect_conflict(
        s.heartbeat(l1.lease_id, MINER_A, T0 + 1700, 1000).await,
        "lease_not_held",
    );
    expect_conflict(
        s.active_lease(l1.lease_id, MINER_A, T0 + 1700).await,
        "lease_not_held",
    );
    let old = s.lease_record(l1.lease_id, MINER_A).await.unwrap();
    assert_eq!((old.task_id, old.attempt), (t.id, 1));
    assert_eq!(old.miner, MINER_A);
    assert_eq!(old.expires_at_ms, T0 + 1500);
    let cur = s
        .active_lease(l2.lease_id, MINER_B, T0 + 1700)
        .await
        .unwrap();
    assert_eq!(cur.attempt, 2);
    assert_eq!(cur.task.leased_by.as_deref(), Some(MINER_B));
}

async fn max_attempts_makes_a_task_dead(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let mut n = new_task(sess.id, MODEL, T0);
    n.max_attempts = 2;
    let t = s.enqueue(&n).await.unwrap();
    let l1 = lease_one(&s, MINER_A, T0).await;
    assert_eq!(s.reap(T0 + TTL).await.unwrap().requeued, vec![t.id]);
    let l2 = lease_one(&s, MINER_A, T0 + TTL).await;
    assert_eq!((l1.attempt, l2.attempt), (1, 2));
    let mut rx = s.subscribe();
    let report = s.reap(T0 + 2 * TTL).await.unwrap();
    assert_eq!(report.dead, vec![t.id]);
    assert!(report.requeued.is_empty());
    assert_eq!(drain(&mut rx), vec![finished(t.id)]);
    let dead = s.get_task(t.id).await.unwrap();
    assert_eq!(dead.state, TaskState::Dead);
    assert_eq!(dead.error_code.as_deref(), Some("max_attempts"));
    assert_eq!(dead.finished_at_ms, Some(T0 + 2 * TTL));
    assert!(lease(&s, MINER_A, T0 + 2 * TTL).await.is_none());
    expect_conflict(
        s.complete(l2.lease_id, MINER_A, &result(MINER_A, 1), T0 + 2 * TTL)
            .await,
        "task_final",
    );
}

async fn release_requeues(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let t = enqueue(&s, sess.id).await;
    let l = lease_one(&s, MINER_A, T0).await;
    expect_conflict(s.release(l.lease_id, MINER_B, T0).await, "lease_not_held");
    expect_not_found(s.release(Uuid::now_v7(), MINER_A, T0).await, "lease");

    let mut rx = s.subscribe();
    s.release(l.lease_id, MINER_A, T0 + 10).await.unwrap();
    assert_eq!(drain(&mut rx), vec![available(MODEL)]);
    let q = s.get_task(t.id).await.unwrap();
    assert_eq!(q.state, TaskState::Queued);
    assert_eq!(q.attempts, 0, "a released attempt does not count");
    assert_eq!(q.lease_expires_at_ms, None);
    expect_conflict(
        s.heartbeat(l.lease_id, MINER_A, T0 + 11, TTL).await,
        "lease_not_held",
    );
    expect_conflict(
        s.release(l.lease_id, MINER_A, T0 + 11).await,
        "lease_not_held",
    );
    let again = lease_one(&s, MINER_B, T0 + 20).await;
    assert_eq!(again.task.id, t.id);
    assert_eq!(again.attempt, 1);
}

async fn fail_is_final(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let t = enqueue(&s, sess.id).await;
    let l = lease_one(&s, MINER_A, T0).await;
    expect_conflict(
        s.fail(l.lease_id, MINER_B, "bad_prompt", "x", T0).await,
        "lease_not_held",
    );
    let mut rx = s.subscribe();
    s.fail(
        l.lease_id,
        MINER_A,
        "prompt_unreadable",
        "hash mismatch",
        T0 + 5,
    )
    .await
    .unwrap();
    assert_eq!(drain(&mut rx), vec![finished(t.id)]);
    let f = s.get_task(t.id).await.unwrap();
    assert_eq!(f.state, TaskState::Failed);
    assert_eq!(f.error_code.as_deref(), Some("prompt_unreadable"));
    assert_eq!(f.error_message.as_deref(), Some("hash mismatch"));
    assert_eq!(f.finished_at_ms, Some(T0 + 5));
    expect_conflict(
        s.fail(l.lease_id, MINER_A, "again", "", T0 + 6).await,
        "lease_not_held",
    );
    expect_conflict(
        s.complete(l.lease_id, MINER_A, &result(MINER_A, 1), T0 + 6)
            .await,
        "task_final",
    );
    assert!(lease(&s, MINER_A, T0 + 7).await.is_none());
}

async fn lease_holder_checks(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    enqueue(&s, sess.id).await;
    let l = s
        .lease(&query(MINER_A, &[MODEL], T0, 1000))
        .await
        .unwrap()
        .unwrap();
    expect_conflict(
        s.heartbeat(l.lease_id, MINER_B, T0 + 1, 1000).await,
        "lease_not_held",
    );
    expect_conflict(
        s.active_lease(l.lease_id, MINER_B, T0 + 1).await,
        "lease_not_held",
    );
    expect_conflict(s.lease_record(l.lease_id, MINER_B).await, "lease_not_held");
    expect_not_found(
        s.heartbeat(Uuid::now_v7(), MINER_A, T0, 1000).await,
        "lease",
    );
    expect_not_found(s.active_lease(Uuid::now_v7(), MINER_A, T0).await, "lease");
    expect_not_found(s.lease_record(Uuid::now_v7(), MINER_A).await, "lease");

    let a = s.active_lease(l.lease_id, MINER_A, T0 + 999).await.unwrap();
    assert_eq!(a, l, "the active lease is what lease() returned");
    expect_conflict(
        s.active_lease(l.lease_id, MINER_A, T0 + 1000).await,
        "lease_expired",
    );
    expect_conflict(
        s.heartbeat(l.lease_id, MINER_A, T0 + 1000, 1000).await,
        "lease_expired",
    );
    // A lapsed lease stays lapsed, even before the reaper has run.
    expect_conflict(
        s.release(l.lease_id, MINER_A, T0 + 1000).await,
        "lease_expired",
    );
    let rec = s.lease_record(l.lease_id, MINER_A).await.unwrap();
    assert_eq!(rec.lease_id, l.lease_id);
    assert_eq!(rec.task_id, l.task.id);
    assert_eq!(rec.attempt, 1);
}

async fn complete_is_idempotent(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let t = enqueue(&s, sess.id).await;
    let l = lease_one(&s, MINER_A, T0).await;
    let mut rx = s.subscribe();
    let first = result(MINER_A, 1);
    let done = match s.complete(l.lease_id, MINER_A, &first, T0 + 5).await {
        Ok(CompleteOutcome::Accepted(task)) => task,
        other => panic!("expected Accepted, got {other:?}"),
    };
    assert_eq!(drain(&mut rx), vec![finished(t.id)]);
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.result.as_ref(), Some(&first));
    assert_eq!(done.finished_at_ms, Some(T0 + 5));
    assert_eq!(s.get_task(t.id).await.unwrap(), done);

    match s
        .complete(l.lease_id, MINER_A, &result(MINER_A, 2), T0 + 6)
        .await
    {
        Ok(CompleteOutcome::Duplicate(task)) => assert_eq!(task, done, "nothing changed"),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert!(drain(&mut rx).is_empty());
    assert_eq!(s.get_task(t.id).await.unwrap().result, Some(first));
    expect_conflict(
        s.complete(l.lease_id, MINER_B, &result(MINER_B, 3), T0 + 6)
            .await,
        "lease_not_held",
    );
    expect_not_found(
        s.complete(Uuid::now_v7(), MINER_A, &result(MINER_A, 3), T0 + 6)
            .await,
        "lease",
    );
    expect_conflict(
        s.heartbeat(l.lease_id, MINER_A, T0 + 7, TTL).await,
        "lease_not_held",
    );
    let depth = s.queue_depth().await.unwrap();
    assert_eq!((depth.queued, depth.leased), (0, 0));
}

async fn late_result_after_lapse_is_accepted(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    // Lapsed, reaped and leased again to another miner: the late result still wins.
    let t = enqueue(&s, sess.id).await;
    let la = s
        .lease(&query(MINER_A, &[MODEL], T0, 1000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.reap(T0 + 2000).await.unwrap().requeued, vec![t.id]);
    let lb = lease_one(&s, MINER_B, T0 + 2100).await;
    assert_eq!(lb.task.id, t.id);
    let ra = result(MINER_A, 1);
    match s.complete(la.lease_id, MINER_A, &ra, T0 + 2200).await {
        Ok(CompleteOutcome::Accepted(task)) => assert_eq!(task.result, Some(ra.clone())),
        other => panic!("expected the late result to be accepted, got {other:?}"),
    }
    match s
        .complete(lb.lease_id, MINER_B, &result(MINER_B, 2), T0 + 2300)
        .await
    {
        Ok(CompleteOutcome::Duplicate(task)) => assert_eq!(task.result, Some(ra)),
        other => panic!("expected Duplicate, got {other:?}"),
    }

    // Lapsed and not reaped yet.
    let t2 = enqueue(&s, sess.id).await;
    let l2 = lease_one(&s, MINER_A, T0 + 3000).await;
    assert_eq!(l2.task.id, t2.id);
    let accepted = s
        .complete(
            l2.lease_id,
            MINER_A,
            &result(MINER_A, 3),
            T0 + 3000 + 10 * TTL,
        )
        .await
        .unwrap();
    assert!(matches!(accepted, CompleteOutcome::Accepted(_)));
    assert_eq!(s.get_task(t2.id).await.unwrap().state, TaskState::Completed);
    // Nothing left to reap.
    assert_eq!(s.reap(T0 + 100 * TTL).await.unwrap(), Default::default());
}

async fn cancel(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let leased = enqueue(&s, sess.id).await;
    let l = lease_one(&s, MINER_A, T0).await;
    let queued = enqueue(&s, sess.id).await;
    assert_eq!(
        s.queue_depth().await.unwrap(),
        QueueDepth {
            queued: 1,
            leased: 1
        }
    );

    let mut rx = s.subscribe();
    let c = s.cancel(queued.id, T0 + 1).await.unwrap();
    assert_eq!(c.state, TaskState::Cancelled);
    assert_eq!(c.finished_at_ms, Some(T0 + 1));
    assert!(c.error_code.is_some());
    let again = s.cancel(queued.id, T0 + 2).await.unwrap();
    assert_eq!(again, c, "cancelling a cancelled task changes nothing");
    let c2 = s.cancel(leased.id, T0 + 3).await.unwrap();
    assert_eq!(c2.state, TaskState::Cancelled);
    assert_eq!(
        drain(&mut rx)
            .into_iter()
            .filter(|e| matches!(e, StoreEvent::TaskFinished { .. }))
            .count(),
        2
    );
    expect_conflict(
        s.complete(l.lease_id, MINER_A, &result(MINER_A, 1), T0 + 4)
            .await,
        "task_final",
    );
    expect_conflict(
        s.heartbeat(l.lease_id, MINER_A, T0 + 4, TTL).await,
        "lease_not_held",
    );
    assert_eq!(s.queue_depth().await.unwrap(), Default::default());
    assert!(lease(&s, MINER_A, T0 + 5).await.is_none());

    let done = enqueue(&s, sess.id).await;
    let dl = lease_one(&s, MINER_A, T0 + 6).await;
    s.complete(dl.lease_id, MINER_A, &result(MINER_A, 2), T0 + 7)
        .await
        .unwrap();
    expect_conflict(s.cancel(done.id, T0 + 8).await, "task_final");
    expect_not_found(s.cancel(Uuid::now_v7(), T0).await, "task");
}

async fn events_reach_subscribers(s: Arc<dyn Store>, _b: &Backend) {
    let mut rx = s.subscribe();
    let sess = session(&s, public()).await;
    let t = s.enqueue(&new_task(sess.id, "model-e", T0)).await.unwrap();
    wait_for(&mut rx, |e| *e == available("model-e")).await;
    s.cancel(t.id, T0 + 1).await.unwrap();
    wait_for(&mut rx, |e| *e == finished(t.id)).await;
}

fn audit_entry(i: i64) -> NewAuditEntry {
    NewAuditEntry {
        at_ms: T0 + i,
        actor: if i % 2 == 0 {
            "router".into()
        } else {
            format!("key:{}", Uuid::from_u128(i as u128))
        },
        action: "task.enqueue".into(),
        session_id: (i % 3 != 0).then(|| Uuid::from_u128(1000 + i as u128)),
        task_id: (i % 2 == 0).then(|| Uuid::from_u128(2000 + i as u128)),
        miner: (i % 4 == 1).then(|| MINER_A.to_string()),
        key_version: (i % 3 == 1).then_some(i as u32),
        // Keys deliberately unsorted and nested.
        detail: serde_json::json!({
            "zeta": i,
            "alpha": { "y": [1, 2, {"b": true, "a": null}], "x": "prompt_hash:ab12" },
            "mid": format!("{i:04}"),
        }),
    }
}

async fn audit_chain(s: Arc<dyn Store>, _b: &Backend) {
    assert_eq!(verify_audit_chain(s.as_ref()).await.unwrap(), 0);
    let mut written: Vec<AuditEntry> = vec![];
    for i in 0..5 {
        let e = s.audit(&audit_entry(i)).await.unwrap();
        assert_eq!(e.seq, i + 1);
        assert_eq!(e.entry, audit_entry(i));
        let prev = written.last().map_or([0u8; 32], |p| p.hash);
        assert_eq!(e.prev_hash, prev);
        assert_eq!(e.hash, audit_hash(e.seq, &e.entry, &e.prev_hash));
        written.push(e);
    }
    let empty = s
        .audit(&NewAuditEntry {
            at_ms: T0,
            actor: "operator".into(),
            action: "router.start".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(empty.seq, 6);
    written.push(empty);

    assert_eq!(s.audit_entries(0, 100).await.unwrap(), written);
    assert_eq!(s.audit_entries(0, 2).await.unwrap(), written[..2].to_vec());
    assert_eq!(s.audit_entries(2, 3).await.unwrap(), written[2..5].to_vec());
    assert!(s.audit_entries(6, 10).await.unwrap().is_empty());
    assert_eq!(verify_audit_chain(s.as_ref()).await.unwrap(), 6);
}

async fn audit_tampering_is_detected(s: Arc<dyn Store>, b: &Backend) {
    for i in 0..4 {
        s.audit(&audit_entry(i)).await.unwrap();
    }
    assert_eq!(verify_audit_chain(s.as_ref()).await.unwrap(), 4);
    let n = b
        .exec(r#"UPDATE audit_log SET detail = '{"zeta":99}' WHERE seq = 3"#)
        .await;
    assert_eq!(n, 1);
    match verify_audit_chain(s.as_ref()).await {
        Err(StoreError::AuditChain { seq: 3, .. }) => {}
        other => panic!("expected the chain to break at seq 3, got {other:?}"),
    }
}

async fn audit_appends_stay_linear_under_concurrency(s: Arc<dyn Store>, b: &Backend) {
    let replica = b.replica().await;
    // Ten finished tasks whose prompt deletions append their entries inside the deletion's own
    // transaction, on the other store, while the appends below run.
    let sess = session(&s, public()).await;
    let mut done = vec![];
    for n in 0..10u8 {
        done.push(completed(&s, sess.id, n, T0).await);
    }
    let started = Instant::now();
    let mut tasks = vec![];
    let deleter = replica.clone();
    tasks.push(tokio::spawn(async move {
        for t in done {
            let e = NewAuditEntry {
                at_ms: T0 + 10_000 + i64::from(t.attempts),
                actor: "router".into(),
                action: "blob.delete".into(),
                task_id: Some(t.id),
                ..Default::default()
            };
            assert!(
                deleter
                    .record_deletion(t.id, BlobKind::Prompt, &t.prompt_urn, T0 + 1, &e)
                    .await
                    .unwrap()
            );
        }
    }));
    for w in 0..6i64 {
        let store = if w % 2 == 0 {
            s.clone()
        } else {
            replica.clone()
        };
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                // Concurrent appends may share a transaction; each gets its own entry back.
                let e = store.audit(&audit_entry(w * 100 + i)).await.unwrap();
                assert_eq!(e.entry, audit_entry(w * 100 + i));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "{}: 120 audit appends from 6 writers on 2 stores in {:?}",
        if b.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        },
        started.elapsed()
    );
    assert_eq!(verify_audit_chain(s.as_ref()).await.unwrap(), 130);
    let seqs: Vec<i64> = s
        .audit_entries(0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=130).collect::<Vec<_>>());
    let all = s.audit_entries(0, 1000).await.unwrap();
    assert_eq!(
        all.iter()
            .filter(|e| e.entry.action == "blob.delete")
            .count(),
        10
    );
    let mut written: Vec<i64> = all
        .iter()
        .filter(|e| e.entry.action != "blob.delete")
        .map(|e| e.entry.at_ms)
        .collect();
    written.sort_unstable();
    let mut expected: Vec<i64> = (0..6)
        .flat_map(|w| (0..20).map(move |i| T0 + w * 100 + i))
        .collect();
    expected.sort_unstable();
    assert_eq!(written, expected, "every append stored exactly once");
}

async fn concurrent_leasing_leases_every_task_once(s: Arc<dyn Store>, b: &Backend) {
    const TASKS: usize = 200;
    const LEASERS: usize = 8;
    let replica = b.replica().await;
    let mut sessions = vec![];
    for _ in 0..5 {
        sessions.push(session(&s, public()).await.id);
    }
    let mut enqueued = HashSet::new();
    for i in 0..TASKS {
        let store = if i % 2 == 0 { &s } else { &replica };
        let t = store
            .enqueue(&new_task(sessions[i % sessions.len()], MODEL, T0))
            .await
            .unwrap();
        enqueued.insert(t.id);
    }

    let started = Instant::now();
    let mut leasers = vec![];
    for w in 0..LEASERS {
        let store = if w % 2 == 0 {
            s.clone()
        } else {
            replica.clone()
        };
        leasers.push(tokio::spawn(async move {
            let miner = format!("0x{w:040x}");
            let mut got = vec![];
            while let Some(l) = store
                .lease(&query(&miner, &[MODEL], T0 + 1, TTL))
                .await
                .expect("lease")
            {
                assert_eq!(l.task.leased_by.as_deref(), Some(miner.as_str()));
                got.push((l.task.id, l.lease_id, l.attempt));
            }
            got
        }));
    }
    let mut leased = vec![];
    let mut per_leaser = vec![];
    for l in leasers {
        let got = l.await.unwrap();
        per_leaser.push(got.len());
        leased.extend(got);
    }
    let elapsed = started.elapsed();
    println!(
        "{}: {TASKS} tasks leased by {LEASERS} concurrent leasers on 2 stores in {elapsed:?} \
         (per leaser: {per_leaser:?})",
        if b.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        },
    );
    assert_eq!(leased.len(), TASKS, "every task leased, none twice");
    let ids: HashSet<Uuid> = leased.iter().map(|(t, _, _)| *t).collect();
    assert_eq!(ids, enqueued, "exactly the enqueued tasks");
    assert!(leased.iter().all(|(_, _, attempt)| *attempt == 1));
    let lease_ids: HashSet<Uuid> = leased.iter().map(|(_, l, _)| *l).collect();
    assert_eq!(lease_ids.len(), TASKS);
    let depth = s.queue_depth().await.unwrap();
    assert_eq!((depth.queued, depth.leased), (0, TASKS as u64));
}

async fn events_cross_replicas_(a: Arc<dyn Store>, b: &Backend) {
    let replica = b.replica().await;
    let mut on_b = replica.subscribe();
    let mut on_a = a.subscribe();
    let mut all_on_a = a.subscribe();
    let mut enqueues = 0;
    // The listener of a fresh store may still be connecting: retry the first enqueue's wake-up.
    let sess = session(&a, public()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = a.enqueue(&new_task(sess.id, "model-r", T0)).await.unwrap();
        enqueues += 1;
        let got = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                if let Ok(e) = on_b.recv().await
                    && e == available("model-r")
                {
                    return;
                }
            }
        })
        .await;
        if got.is_ok() {
            // And TaskFinished the other way round: a change on B wakes A.
            replica.cancel(t.id, T0 + 1).await.unwrap();
            wait_for(&mut on_a, |e| *e == finished(t.id)).await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica B never saw replica A's TaskAvailable"
        );
    }
    // A replica does not see its own events twice (local publish + its own NOTIFY).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let own = drain(&mut all_on_a);
    let availables = own.iter().filter(|e| **e == available("model-r")).count();
    assert_eq!(
        availables, enqueues,
        "one TaskAvailable per enqueue on the same replica"
    );
}

async fn listener_reconnects(a: Arc<dyn Store>, b: &Backend) {
    let replica = b.replica().await;
    let mut on_b = replica.subscribe();
    let sess = session(&a, public()).await;
    // Make sure B listens, then cut every LISTEN connection of this database.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        a.enqueue(&new_task(sess.id, "model-w", T0)).await.unwrap();
        let ok = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                if let Ok(e) = on_b.recv().await
                    && e == available("model-w")
                {
                    return;
                }
            }
        })
        .await
        .is_ok();
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "replica B never listened");
    }
    let killed = b
        .exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .await;
    assert!(killed >= 1, "terminated the listeners' connections");
    let _ = drain(&mut on_b);
    a.enqueue(&new_task(sess.id, "model-after", T0))
        .await
        .unwrap();
    wait_for(&mut on_b, |e| *e == available("model-after")).await;
}

// --- retention ------------------------------------------------------------------------------

async fn retention_policy_round_trips(s: Arc<dyn Store>, _b: &Backend) {
    let policy = RetentionPolicy {
        delete_prompt_on_delivery: true,
        prompt_ttl_secs: Some(90),
        result_ttl_secs: Some(3600),
        delete_result_on_fetch: false,
    };
    let mut n = new_session("key:owner", public(), T0);
    n.retention = policy;
    n.sealing = SealingPolicy::ClientOnly;
    let created = s.create_session(&n).await.unwrap();
    assert_eq!(created.retention, policy);
    assert_eq!(created.sealing, SealingPolicy::ClientOnly);
    assert_eq!(s.get_session(n.id).await.unwrap(), created);

    let other = RetentionPolicy {
        delete_result_on_fetch: true,
        ..RetentionPolicy::default()
    };
    let updated = s
        .set_session_policy(n.id, &other, SealingPolicy::Any)
        .await
        .unwrap();
    assert_eq!(updated.retention, other);
    assert_eq!(updated.sealing, SealingPolicy::Any);
    assert_eq!(s.get_session(n.id).await.unwrap(), updated);

    s.close_session(n.id, T0 + 1).await.unwrap();
    expect_conflict(
        s.set_session_policy(n.id, &policy, SealingPolicy::Any)
            .await,
        "session_closed",
    );
    expect_not_found(
        s.set_session_policy(Uuid::now_v7(), &policy, SealingPolicy::Any)
            .await,
        "session",
    );
}

/// Completes a fresh task of `session_id` at `at` and returns it.
async fn completed(s: &Arc<dyn Store>, session_id: Uuid, n: u8, at: i64) -> Task {
    let t = s.enqueue(&new_task(session_id, MODEL, at)).await.unwrap();
    let l = lease_one(s, MINER_A, at).await;
    assert_eq!(l.task.id, t.id);
    match s
        .complete(l.lease_id, MINER_A, &result(MINER_A, n), at + 10)
        .await
    {
        Ok(CompleteOutcome::Accepted(task)) => task,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

/// Blobs become due however their task ends (failed by its miner, cancelled, past its
/// deadline, dead after too many attempts, completed), and when a session that kept its blobs
/// gets a retention rule; a running task's blobs never are.
async fn retention_follows_every_end_of_a_task_and_policy_changes(s: Arc<dyn Store>, _b: &Backend) {
    let mut np = new_session("key:owner", public(), T0);
    np.retention = RetentionPolicy {
        delete_prompt_on_delivery: false,
        prompt_ttl_secs: Some(60),
        result_ttl_secs: None,
        delete_result_on_fetch: false,
    };
    let p = s.create_session(&np).await.unwrap();
    // Failed by its miner.
    let failed = enqueue(&s, p.id).await;
    let l = lease_one(&s, MINER_A, T0).await;
    assert_eq!(l.task.id, failed.id);
    s.fail(l.lease_id, MINER_A, "engine_error", "boom", T0 + 1)
        .await
        .unwrap();
    // Cancelled.
    let cancelled = enqueue(&s, p.id).await;
    s.cancel(cancelled.id, T0 + 2).await.unwrap();
    // Dead: its only attempt's lease lapsed.
    let mut n = new_task(p.id, MODEL, T0);
    n.max_attempts = 1;
    let dead = s.enqueue(&n).await.unwrap();
    let l = lease_one(&s, MINER_A, T0).await;
    assert_eq!(l.task.id, dead.id);
    // Past its deadline.
    let mut n = new_task(p.id, MODEL, T0);
    n.deadline_ms = Some(T0 + 5);
    let late = s.enqueue(&n).await.unwrap();
    let report = s.reap(T0 + TTL).await.unwrap();
    assert_eq!(report.deadline_failed, vec![late.id]);
    assert_eq!(report.dead, vec![dead.id]);
    // Still running: never due.
    let running = enqueue(&s, p.id).await;

    let prompts = |due: Vec<veil_router::store::DueDeletion>| {
        let mut ids: Vec<Uuid> = due
            .into_iter()
            .inspect(|d| assert_eq!((d.kind, d.reason), (BlobKind::Prompt, DeletionReason::Ttl)))
            .map(|d| d.task_id)
            .collect();
        ids.sort();
        ids
    };
    assert!(s.due_deletions(T0 + 59_999, 100).await.unwrap().is_empty());
    let mut want = vec![failed.id, cancelled.id, late.id, dead.id];
    want.sort();
    assert_eq!(
        prompts(s.due_deletions(T0 + 60_000, 100).await.unwrap()),
        want
    );
    assert_eq!(
        s.get_task(running.id).await.unwrap().state,
        TaskState::Queued
    );

    // A session that kept everything gets a result TTL: its completed task's result is due a
    // minute after the task ended, its prompt (still kept) never.
    let k = session(&s, public()).await;
    let done = completed(&s, k.id, 1, T0).await;
    assert!(
        s.due_deletions(T0 + 10_000_000, 100)
            .await
            .unwrap()
            .iter()
            .all(|d| d.session_id != k.id)
    );
    let policy = RetentionPolicy {
        delete_prompt_on_delivery: false,
        prompt_ttl_secs: None,
        result_ttl_secs: Some(60),
        delete_result_on_fetch: false,
    };
    s.set_session_policy(k.id, &policy, SealingPolicy::Any)
        .await
        .unwrap();
    let of_k = |due: Vec<veil_router::store::DueDeletion>| {
        due.into_iter()
            .filter(|d| d.session_id == k.id)
            .map(|d| (d.task_id, d.kind, d.reason))
            .collect::<Vec<_>>()
    };
    assert!(of_k(s.due_deletions(T0 + 10 + 59_999, 100).await.unwrap()).is_empty());
    assert_eq!(
        of_k(s.due_deletions(T0 + 10 + 60_000, 100).await.unwrap()),
        vec![(done.id, BlobKind::Result, DeletionReason::Ttl)]
    );
    // And back to keeping everything: nothing of it is due any more.
    s.set_session_policy(k.id, &RetentionPolicy::default(), SealingPolicy::Any)
        .await
        .unwrap();
    assert!(of_k(s.due_deletions(T0 + 10_000_000, 100).await.unwrap()).is_empty());
}

/// Prompt TTLs, deletion on fetch, and a blob due under two rules (delivered and past its
/// TTL), which is named once, as delivered.
async fn retention_rules_each_name_a_blob_once(s: Arc<dyn Store>, _b: &Backend) {
    // C: everything on delivery and after 60 s. D: prompts after 60 s, results kept.
    let mut nc = new_session("key:owner", public(), T0);
    nc.retention = RetentionPolicy {
        delete_prompt_on_delivery: true,
        prompt_ttl_secs: Some(60),
        result_ttl_secs: Some(60),
        delete_result_on_fetch: true,
    };
    let mut nd = new_session("key:owner", public(), T0);
    nd.retention = RetentionPolicy {
        delete_prompt_on_delivery: false,
        prompt_ttl_secs: Some(60),
        result_ttl_secs: None,
        delete_result_on_fetch: false,
    };
    let c = s.create_session(&nc).await.unwrap();
    let d = s.create_session(&nd).await.unwrap();
    let tc = completed(&s, c.id, 1, T0).await;
    let td = completed(&s, d.id, 2, T0).await;
    let due_at = |now: i64| {
        let s = Arc::clone(&s);
        async move {
            let mut due: Vec<_> = s
                .due_deletions(now, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|d| (d.task_id, d.kind, d.reason))
                .collect();
            due.sort_by_key(|k| (k.0 == tc.id, k.1 as u8));
            due
        }
    };
    assert!(due_at(T0 + 59_999).await.is_empty());
    // The prompt TTL counts from the task's creation (T0), the result TTL from its end (T0 + 10).
    assert_eq!(
        due_at(T0 + 60_000).await,
        [
            (td.id, BlobKind::Prompt, DeletionReason::Ttl),
            (tc.id, BlobKind::Prompt, DeletionReason::Ttl),
        ]
    );
    assert_eq!(
        due_at(T0 + 60_010).await,
        [
            (td.id, BlobKind::Prompt, DeletionReason::Ttl),
            (tc.id, BlobKind::Prompt, DeletionReason::Ttl),
            (tc.id, BlobKind::Result, DeletionReason::Ttl),
        ]
    );
    assert!(s.mark_delivered(tc.id, T0 + 20).await.unwrap());
    assert!(s.mark_delivered(td.id, T0 + 20).await.unwrap());
    // Long past every TTL: C's blobs once each, as delivered; D's result is kept.
    assert_eq!(
        due_at(T0 + 10_000_000).await,
        [
            (td.id, BlobKind::Prompt, DeletionReason::Ttl),
            (tc.id, BlobKind::Prompt, DeletionReason::Delivered),
            (tc.id, BlobKind::Result, DeletionReason::Delivered),
        ]
    );
}

async fn retention_due_deletions(s: Arc<dyn Store>, _b: &Backend) {
    // Session A: prompt on delivery, result after 60 s. Session B: keeps everything.
    let mut na = new_session("key:owner", public(), T0);
    na.retention = RetentionPolicy {
        delete_prompt_on_delivery: true,
        prompt_ttl_secs: None,
        result_ttl_secs: Some(60),
        delete_result_on_fetch: false,
    };
    let a = s.create_session(&na).await.unwrap();
    let b = session(&s, public()).await;
    let ta = completed(&s, a.id, 1, T0).await;
    let tb = completed(&s, b.id, 2, T0).await;
    // A queued task is never due, whatever its session's policy.
    let queued = enqueue(&s, a.id).await;

    assert!(
        s.due_deletions(T0 + 1000, 100).await.unwrap().is_empty(),
        "nothing delivered yet"
    );
    assert!(s.mark_delivered(ta.id, T0 + 20).await.unwrap());
    assert!(
        !s.mark_delivered(ta.id, T0 + 30).await.unwrap(),
        "first delivery only"
    );
    assert!(
        !s.mark_delivered(queued.id, T0 + 30).await.unwrap(),
        "no result to deliver"
    );
    assert_eq!(
        s.get_task(ta.id).await.unwrap().delivered_at_ms,
        Some(T0 + 20)
    );

    let due = s.due_deletions(T0 + 1000, 100).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].task_id, ta.id);
    assert_eq!(due[0].session_id, a.id);
    assert_eq!(due[0].kind, BlobKind::Prompt);
    assert_eq!(due[0].reason, DeletionReason::Delivered);
    assert_eq!(due[0].urn, ta.prompt_urn);
    assert_eq!(due[0].hash, ta.prompt_hash);
    assert_eq!(due[0].key_version, ta.key_version);

    let audit = NewAuditEntry {
        at_ms: T0 + 1000,
        actor: "router".into(),
        action: "blob.delete".into(),
        task_id: Some(ta.id),
        detail: serde_json::json!({"blob": "prompt"}),
        ..Default::default()
    };
    assert!(
        s.record_deletion(ta.id, BlobKind::Prompt, &ta.prompt_urn, T0 + 1000, &audit)
            .await
            .unwrap()
    );
    assert!(
        !s.record_deletion(ta.id, BlobKind::Prompt, &ta.prompt_urn, T0 + 1001, &audit)
            .await
            .unwrap(),
        "a second sweeper records nothing"
    );
    let entries = s.audit_entries(0, 100).await.unwrap();
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.entry.action == "blob.delete")
            .count(),
        1
    );
    assert_eq!(
        s.get_task(ta.id).await.unwrap().prompt_deleted_at_ms,
        Some(T0 + 1000)
    );
    assert!(s.due_deletions(T0 + 1000, 100).await.unwrap().is_empty());

    // The result TTL counts from the end of the task (T0 + 10).
    assert!(
        s.due_deletions(T0 + 10 + 59_999, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let due = s.due_deletions(T0 + 10 + 60_000, 100).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(
        (due[0].kind, due[0].reason),
        (BlobKind::Result, DeletionReason::Ttl)
    );
    assert_eq!(due[0].hash, ta.result.as_ref().unwrap().result_hash);
    assert!(
        !s.record_deletion(
            ta.id,
            BlobKind::Result,
            "urn:veil:blob:moved",
            T0 + 70_000,
            &audit
        )
        .await
        .unwrap(),
        "a task switched to another blob (rewrap) records nothing"
    );
    assert!(
        s.record_deletion(
            ta.id,
            BlobKind::Result,
            &ta.result.as_ref().unwrap().result_urn,
            T0 + 70_000,
            &audit,
        )
        .await
        .unwrap()
    );
    assert!(
        s.due_deletions(T0 + 100_000_000, 100)
            .await
            .unwrap()
            .is_empty(),
        "B keeps its blobs"
    );

    // Closing B makes every blob of its finished tasks due; the limit is honoured.
    s.close_session(b.id, T0 + 200).await.unwrap();
    let due = s.due_deletions(T0 + 300, 100).await.unwrap();
    let mut kinds: Vec<_> = due.iter().map(|d| (d.task_id, d.kind, d.reason)).collect();
    kinds.sort_by_key(|k| k.1 as u8);
    assert_eq!(
        kinds,
        vec![
            (tb.id, BlobKind::Prompt, DeletionReason::SessionClosed),
            (tb.id, BlobKind::Result, DeletionReason::SessionClosed),
        ]
    );
    assert_eq!(s.due_deletions(T0 + 300, 1).await.unwrap().len(), 1);
    // The queued task of A stays out until it finishes (closing A cancels it).
    s.close_session(a.id, T0 + 400).await.unwrap();
    let due = s.due_deletions(T0 + 500, 100).await.unwrap();
    assert!(
        due.iter()
            .any(|d| d.task_id == queued.id && d.kind == BlobKind::Prompt)
    );
    assert!(
        !due.iter()
            .any(|d| d.task_id == queued.id && d.kind == BlobKind::Result)
    );
    verify_audit_chain(s.as_ref()).await.unwrap();
}

// --- key lifecycle --------------------------------------------------------------------------

/// A finished task under `version`, sealed by `by`, completed with result `n` (or failed).
async fn finished_under(
    s: &Arc<dyn Store>,
    session_id: Uuid,
    version: u32,
    by: SealedBy,
    n: Option<u8>,
) -> Task {
    let mut nt = new_task(session_id, MODEL, T0);
    nt.key_version = version;
    nt.sealed_by = by;
    let t = s.enqueue(&nt).await.unwrap();
    assert_eq!((t.key_version, t.sealed_by), (version, by));
    let l = lease_one(s, MINER_A, T0).await;
    assert_eq!(l.task.id, t.id);
    match n {
        Some(n) => match s
            .complete(l.lease_id, MINER_A, &result(MINER_A, n), T0 + 10)
            .await
        {
            Ok(CompleteOutcome::Accepted(task)) => task,
            other => panic!("expected Accepted, got {other:?}"),
        },
        None => {
            s.fail(l.lease_id, MINER_A, "prompt_tampered", "bad blob", T0 + 10)
                .await
                .unwrap();
            s.get_task(t.id).await.unwrap()
        }
    }
}

fn moved(old_urn: &str, n: u8) -> MovedBlob {
    MovedBlob {
        old_urn: old_urn.into(),
        urn: format!("urn:veil:blob:rewrapped-{n}"),
        hash: [0xa0 + n; 32],
        size: 500 + u64::from(n),
    }
}

async fn key_lifecycle_usage_candidates_and_rewrap_journal(s: Arc<dyn Store>, _b: &Backend) {
    let sess = session(&s, public()).await;
    let a = finished_under(&s, sess.id, 1, SealedBy::Router, Some(1)).await;
    let b = finished_under(&s, sess.id, 1, SealedBy::Router, None).await; // failed: prompt only
    let c = finished_under(&s, sess.id, 1, SealedBy::Client, Some(2)).await;
    let d = finished_under(&s, sess.id, 2, SealedBy::Router, Some(3)).await;
    let e = finished_under(&s, sess.id, 1, SealedBy::Router, Some(4)).await;
    let mut queued = new_task(sess.id, MODEL, T0);
    queued.key_version = 1;
    let queued = s.enqueue(&queued).await.unwrap();
    assert_eq!(s.get_task(c.id).await.unwrap().sealed_by, SealedBy::Client);

    // Usage counts stored blobs only: e's prompt was deleted by retention.
    let audit = NewAuditEntry {
        at_ms: T0,
        actor: "router".into(),
        action: "blob.delete".into(),
        ..Default::default()
    };
    assert!(
        s.record_deletion(e.id, BlobKind::Prompt, &e.prompt_urn, T0 + 20, &audit)
            .await
            .unwrap()
    );
    let e = s.get_task(e.id).await.unwrap();
    let usage = s.key_version_usage().await.unwrap();
    assert_eq!(
        usage,
        vec![
            KeyVersionUsage {
                key_version: 1,
                tasks: 5,
                prompt_blobs: 4,
                result_blobs: 3
            },
            KeyVersionUsage {
                key_version: 2,
                tasks: 1,
                prompt_blobs: 1,
                result_blobs: 1
            },
        ]
    );
    assert_eq!(usage[0].blobs(), 7);

    // Candidates for a rewrap to 2: finished, router-sealed, under 1..2, a blob still stored.
    let mut want = vec![a.id, b.id, e.id];
    want.sort();
    let all: Vec<Uuid> = s
        .rewrap_candidates(1, 2, Uuid::nil(), 100)
        .await
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(all, want);
    assert_eq!(s.count_rewrap_candidates(1, 2).await.unwrap(), 3);
    let first = s.rewrap_candidates(1, 2, Uuid::nil(), 2).await.unwrap();
    let rest = s.rewrap_candidates(1, 2, first[1].id, 2).await.unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(rest.iter().map(|t| t.id).collect::<Vec<_>>(), want[2..]);
    assert_eq!(
        s.count_rewrap_candidates(2, 2).await.unwrap(),
        0,
        "retired versions excluded"
    );
    assert_eq!(
        s.count_rewrap_candidates(1, 3).await.unwrap(),
        4,
        "d moves to 3"
    );
    assert!(
        !s.rewrap_candidates(1, 3, Uuid::nil(), 100)
            .await
            .unwrap()
            .iter()
            .any(|t| t.id == c.id || t.id == queued.id)
    );

    // The journal: begin, name the new blobs, switch.
    let row = NewRewrap {
        id: Uuid::now_v7(),
        task_id: a.id,
        old_version: 1,
        new_version: 2,
        started_at_ms: T0 + 30,
    };
    s.rewrap_begin(&row).await.unwrap();
    assert!(
        s.rewrap_record_blob(row.id, BlobKind::Prompt, "urn:veil:blob:rewrapped-1")
            .await
            .unwrap()
    );
    assert!(
        s.rewrap_record_blob(row.id, BlobKind::Result, "urn:veil:blob:rewrapped-2")
            .await
            .unwrap()
    );
    let j = s.rewrap_journal().await.unwrap();
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].state, RewrapState::Pending);
    assert_eq!(
        j[0].blobs_to_delete(),
        vec!["urn:veil:blob:rewrapped-1", "urn:veil:blob:rewrapped-2"]
    );
    let sw = RewrapSwitch {
        rewrap_id: row.id,
        expected: a.clone(),
        new_version: 2,
        prompt: Some(moved(&a.prompt_urn, 1)),
        result: Some(moved(&a.result.as_ref().unwrap().result_urn, 2)),
    };
    let switch_audit = NewAuditEntry {
        at_ms: T0 + 40,
        actor: "operator".into(),
        action: "keyring.rewrap.task".into(),
        task_id: Some(a.id),
        key_version: Some(2),
        detail: serde_json::json!({"old_version": 1}),
        ..Default::default()
    };
    assert!(s.rewrap_switch(&sw, &switch_audit).await.unwrap());
    let now = s.get_task(a.id).await.unwrap();
    assert_eq!(now.key_version, 2);
    assert_eq!(now.prompt_urn, "urn:veil:blob:rewrapped-1");
    assert_eq!(now.prompt_hash, [0xa1; 32]);
    let r = now.result.as_ref().unwrap();
    assert_eq!(
        (r.result_urn.as_str(), r.result_hash, r.result_size),
        ("urn:veil:blob:rewrapped-2", [0xa2; 32], 502)
    );
    assert_eq!(
        r.signature,
        a.result.as_ref().unwrap().signature,
        "everything else is kept"
    );
    assert_eq!((now.state, now.finished_at_ms), (a.state, a.finished_at_ms));
    let j = s.rewrap_abandon(row.id).await.unwrap().unwrap();
    assert_eq!(
        j.state,
        RewrapState::Switched,
        "a switched row is never abandoned"
    );
    assert_eq!(
        j.blobs_to_delete(),
        vec![
            a.prompt_urn.as_str(),
            a.result.as_ref().unwrap().result_urn.as_str()
        ]
    );
    let entries = s.audit_entries(0, 100).await.unwrap();
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.entry.action == "keyring.rewrap.task")
            .count(),
        1
    );
    // Switching again (same row, or a stale view of the task) changes nothing.
    assert!(!s.rewrap_switch(&sw, &switch_audit).await.unwrap());
    s.rewrap_forget(row.id).await.unwrap();
    s.rewrap_forget(row.id).await.unwrap();
    assert!(s.rewrap_journal().await.unwrap().is_empty());
    assert!(s.rewrap_abandon(row.id).await.unwrap().is_none());

    // A task that changed since it was read is not switched; the row is abandoned.
    let row2 = NewRewrap {
        id: Uuid::now_v7(),
        task_id: a.id,
        old_version: 1,
        new_version: 2,
        started_at_ms: T0 + 50,
    };
    s.rewrap_begin(&row2).await.unwrap();
    let stale = RewrapSwitch {
        rewrap_id: row2.id,
        ..sw.clone()
    };
    assert!(!s.rewrap_switch(&stale, &switch_audit).await.unwrap());
    assert_eq!(
        s.rewrap_abandon(row2.id).await.unwrap().unwrap().state,
        RewrapState::Abandoned
    );
    assert_eq!(s.get_task(a.id).await.unwrap(), now);

    // Retention deleting a blob in the meantime also stops the switch (e's result here).
    let row3 = NewRewrap {
        id: Uuid::now_v7(),
        task_id: e.id,
        old_version: 1,
        new_version: 2,
        started_at_ms: T0 + 60,
    };
    s.rewrap_begin(&row3).await.unwrap();
    assert!(
        s.record_deletion(
            e.id,
            BlobKind::Result,
            &e.result.as_ref().unwrap().result_urn,
            T0 + 61,
            &audit,
        )
        .await
        .unwrap()
    );
    let sw_e = RewrapSwitch {
        rewrap_id: row3.id,
        expected: e.clone(),
        new_version: 2,
        prompt: None,
        result: Some(moved(&e.result.as_ref().unwrap().result_urn, 5)),
    };
    assert!(!s.rewrap_switch(&sw_e, &switch_audit).await.unwrap());
    assert_eq!(s.get_task(e.id).await.unwrap().key_version, 1);

    // An abandoned row refuses new blobs; a prompt-only switch keeps the missing result.
    let row4 = NewRewrap {
        id: Uuid::now_v7(),
        task_id: b.id,
        old_version: 1,
        new_version: 2,
        started_at_ms: T0 + 70,
    };
    s.rewrap_begin(&row4).await.unwrap();
    assert!(
        s.rewrap_record_blob(row4.id, BlobKind::Prompt, "urn:veil:blob:rewrapped-7")
            .await
            .unwrap()
    );
    let sw_b = RewrapSwitch {
        rewrap_id: row4.id,
        expected: b.clone(),
        new_version: 2,
        prompt: Some(moved(&b.prompt_urn, 7)),
        result: None,
    };
    assert!(s.rewrap_switch(&sw_b, &switch_audit).await.unwrap());
    let b_now = s.get_task(b.id).await.unwrap();
    assert_eq!(
        (b_now.key_version, b_now.result.is_none(), b_now.state),
        (2, true, TaskState::Failed)
    );
    let row5 = NewRewrap {
        id: Uuid::now_v7(),
        task_id: d.id,
        old_version: 2,
        new_version: 3,
        started_at_ms: T0 + 80,
    };
    s.rewrap_begin(&row5).await.unwrap();
    assert_eq!(
        s.rewrap_abandon(row5.id).await.unwrap().unwrap().state,
        RewrapState::Abandoned
    );
    assert!(
        !s.rewrap_record_blob(row5.id, BlobKind::Prompt, "urn:veil:blob:late")
            .await
            .unwrap()
    );
    let j = s.rewrap_journal().await.unwrap();
    assert_eq!(
        j.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![row2.id, row3.id, row4.id, row5.id],
        "oldest first"
    );
    assert_eq!(
        s.count_rewrap_candidates(1, 2).await.unwrap(),
        0,
        "a, b moved; e has nothing left"
    );
    verify_audit_chain(s.as_ref()).await.unwrap();
}
