//! End to end with the on-chain ACL: a real dev chain (anvil, a block every 500 ms), the ACL
//! contract, a router following it, and miners.
//!
//! - A session registered on chain takes its allowlist from the contract, over the router's own
//!   list: the allowed miner gets all of its tasks, another gets none and is refused its key.
//! - Revoking the miner on chain stops dispatch and key release to it; the time and the blocks
//!   it takes are measured and printed (`-- --nocapture`).
//! - With the chain gone past the staleness bound, the contract-backed session fails closed
//!   (new tasks, leases and keys refused) while a public session keeps working; with the chain
//!   back, tasks flow again without restarting the router.
//! - With key verification on, a miner logs in only with the X25519 key registered on chain.

use std::future::Future;
use std::time::{Duration, Instant};

use alloy_signer_local::PrivateKeySigner;
use serde_json::{Value, json};
use uuid::Uuid;
use veil_api::miner::{Lease, LeaseRequest, LoginRequest, ServedModel, WrappedKey};
use veil_contracts::{AclDecision, Address};
use veil_keys::X25519Secret;
use veil_miner::{InstantEngine, MinerClient, WorkerHandle, sign};
use veil_router::AppState;
use veil_router::store::AllowlistSource;
use veil_tests::chain::DevChain;
use veil_tests::harness::{TestRouter, http, miner_as};

const BLOCK_TIME: Duration = Duration::from_millis(500);
const CONFIRMATIONS: u64 = 1;
const POLL: Duration = Duration::from_millis(100);
const MAX_STALENESS: Duration = Duration::from_millis(1_500);

/// A miner's wallet and X25519 identity.
struct Identity {
    wallet: PrivateKeySigner,
    x25519: X25519Secret,
}

impl Identity {
    fn new() -> Self {
        Self {
            wallet: PrivateKeySigner::random(),
            x25519: X25519Secret::generate().unwrap(),
        }
    }

    fn address(&self) -> Address {
        self.wallet.address()
    }

    fn checksum(&self) -> String {
        self.address().to_checksum(None)
    }

    fn public(&self) -> [u8; 32] {
        *self.x25519.public().as_bytes()
    }

    fn x25519(&self) -> X25519Secret {
        X25519Secret::from_bytes(*self.x25519.to_bytes())
    }

    /// A worker serving `tiny` under this identity.
    fn worker(&self, router: &TestRouter) -> WorkerHandle {
        miner_as(
            &router.url,
            InstantEngine::new(["tiny"]),
            self.wallet.clone(),
            self.x25519(),
        )
    }
}

/// A miner driven step by step.
#[derive(Debug)]
struct RawMiner {
    client: MinerClient,
    wallet: PrivateKeySigner,
    x25519: X25519Secret,
    domain: veil_api::Domain,
}

impl RawMiner {
    async fn login(
        router: &TestRouter,
        who: &Identity,
        x25519: X25519Secret,
        models: &[&str],
    ) -> Result<RawMiner, veil_miner::Error> {
        let client = MinerClient::new(&router.url).unwrap();
        let domain = router.state.cfg.domain;
        let login = sign::sign_login(&who.wallet, &domain, &x25519.public()).await?;
        let models = models
            .iter()
            .map(|m| ServedModel {
                name: m.to_string(),
                sha256: None,
            })
            .collect();
        client.login(&LoginRequest { login, models }).await?;
        Ok(RawMiner {
            client,
            wallet: who.wallet.clone(),
            x25519,
            domain,
        })
    }

    async fn lease(&self, wait_ms: u64) -> Option<Lease> {
        self.client
            .lease(&LeaseRequest {
                wait_ms,
                models: None,
            })
            .await
            .expect("lease call")
    }

    async fn key(&self, lease: &Lease) -> Result<WrappedKey, veil_miner::Error> {
        let req = sign::sign_key_request(&self.wallet, &self.domain, lease, &self.x25519.public())
            .await?;
        self.client.key(lease.lease_id, &req).await
    }

    async fn release(&self, lease: &Lease) {
        self.client
            .release(lease.lease_id, "test")
            .await
            .expect("release");
    }
}

#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, veil_miner::Error>, status: u16, code: &str) {
    match r {
        Err(e) if e.status() == Some(status) && e.code() == code => {}
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

/// A v2 completion on `session` (model `model`); returns status and body.
async fn complete(
    url: String,
    key: String,
    session: String,
    model: &str,
    text: &str,
) -> (u16, Value) {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
        "session_id": session,
    });
    let r = http()
        .post(format!("{url}/api/v2/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn spawn_complete(
    router: &TestRouter,
    key: &str,
    session: &str,
    model: &'static str,
    text: &'static str,
) -> tokio::task::JoinHandle<(u16, Value)> {
    tokio::spawn(complete(
        router.url.clone(),
        key.to_string(),
        session.to_string(),
        model,
        text,
    ))
}

/// Polls `cond` every 10 ms until it holds; returns how long that took. Panics after `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

async fn stored_source(state: &AppState, id: Uuid) -> (AllowlistSource, Vec<String>) {
    let s = state.store.get_session(id).await.unwrap();
    let mut miners = s.privacy.allowed_miners;
    miners.sort();
    (s.privacy.source, miners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contract_allowlist_revoke_fail_closed_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let mut chain = DevChain::new(dir.path(), BLOCK_TIME);
    let contract = chain.deploy(0).await;
    let admin = chain.acl_as(contract, 0);
    let owner = chain.acl_as(contract, 1);
    let (a, b, stranger) = (Identity::new(), Identity::new(), Identity::new());
    admin
        .register_miner(a.address(), a.public(), "https://miners.example/a")
        .await
        .unwrap();
    admin
        .register_miner(b.address(), b.public(), "https://miners.example/b")
        .await
        .unwrap();

    let mut settings = TestRouter::settings(&dir.path().join("router"));
    settings.chain_id = Some(31337);
    settings.acl_contract = Some(contract.to_string());
    settings.acl_rpc_url = Some(chain.url());
    settings.acl_confirmations = Some(CONFIRMATIONS);
    settings.acl_poll_interval_ms = Some(POLL.as_millis() as u64);
    settings.acl_max_staleness_ms = Some(MAX_STALENESS.as_millis() as u64);
    settings.acl_verify_miner_keys = Some(true);
    settings.lease_ttl_ms = Some(10_000);
    let router = TestRouter::start(settings).await;
    let state = router.state.clone();
    let acl = state.acl.as_ref().expect("the ACL is configured");
    eventually(
        "the router sees both registrations",
        Duration::from_secs(20),
        || async {
            acl.is_fresh()
                && acl.view().miner(a.address()).is_some()
                && acl.view().miner(b.address()).is_some()
        },
    )
    .await;
    let key = router.admin().to_string();

    // --- Logins are checked against the keys registered on chain.
    refused(
        RawMiner::login(&router, &a, X25519Secret::generate().unwrap(), &["tiny"]).await,
        403,
        "miner_key_mismatch",
    );
    refused(
        RawMiner::login(&router, &stranger, stranger.x25519(), &["tiny"]).await,
        403,
        "miner_not_registered",
    );
    let denied = router.audit("miner.login.deny").await;
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0]["detail"]["code"], "miner_key_mismatch");

    // --- A router-managed private session allowing B; B leases its first task.
    let sid = router.private_session(&key, &[b.checksum()]).await;
    let sid_uuid: Uuid = sid.parse().unwrap();
    let first = spawn_complete(&router, &key, &sid, "tiny", "first");
    let raw_b = RawMiner::login(&router, &b, b.x25519(), &["tiny"])
        .await
        .unwrap();
    let lease_b = raw_b.lease(5_000).await.expect("B is on the router's list");
    assert_eq!(lease_b.session_id, sid_uuid);

    // The owner registers the session on chain and allows A only: the contract takes over.
    owner.register_session(sid_uuid).await.unwrap();
    owner.allow_miner(sid_uuid, a.address()).await.unwrap();
    eventually(
        "the session takes its allowlist from the contract",
        Duration::from_secs(10),
        || async {
            stored_source(&state, sid_uuid).await == (AllowlistSource::Contract, vec![a.checksum()])
        },
    )
    .await;
    let (s, v) = router.get(&key, &format!("/api/v2/sessions/{sid}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["privacy"],
        json!({"private": true, "allowed_miners": [a.checksum()], "source": "contract"})
    );
    let r = http()
        .put(format!("{}/api/v2/sessions/{sid}/privacy", router.url))
        .bearer_auth(&key)
        .json(&json!({"private": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "allowlist_managed_elsewhere", "{v}");
    let mirrored = router.audit("session.privacy").await;
    assert!(
        mirrored
            .iter()
            .any(|e| e["actor"] == "contract" && e["session_id"] == sid.as_str()),
        "the takeover is audited: {mirrored:?}"
    );

    // B still holds its lease, but the contract decides key release now.
    refused(raw_b.key(&lease_b).await, 403, "not_allowed");
    raw_b.release(&lease_b).await;

    // Both miners at work: every task of the session goes to A.
    let worker_a = a.worker(&router);
    let worker_b = b.worker(&router);
    let mut jobs = vec![first];
    for _ in 0..6 {
        jobs.push(spawn_complete(&router, &key, &sid, "tiny", "more"));
    }
    for job in jobs {
        let (s, v) = job.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["veil"]["miner"], a.checksum().as_str());
    }
    let b_leases = router
        .audit("task.lease")
        .await
        .into_iter()
        .filter(|e| e["session_id"] == sid.as_str() && e["miner"] == b.checksum().as_str())
        .count();
    assert_eq!(
        b_leases, 1,
        "B's only lease of the session is the one before the contract"
    );

    // --- Revoke A on chain while a hand-driven A holds a lease of the session.
    worker_a.shutdown().await.unwrap();
    let raw_a = RawMiner::login(&router, &a, a.x25519(), &["tiny"])
        .await
        .unwrap();
    let pending = spawn_complete(&router, &key, &sid, "tiny", "after the revoke");
    let lease_a = raw_a.lease(5_000).await.expect("A is allowed");
    assert_eq!(lease_a.session_id, sid_uuid);

    let sent = Instant::now();
    let revoke = owner.revoke_miner(sid_uuid, a.address()).await.unwrap();
    let receipt_after = sent.elapsed();
    let mut key_stop = None;
    let mut lease_stop = None;
    while key_stop.is_none() || lease_stop.is_none() {
        assert!(
            sent.elapsed() < Duration::from_secs(30),
            "the revoke was not seen"
        );
        if key_stop.is_none()
            && acl.view().decide(sid_uuid, a.address(), MAX_STALENESS) == AclDecision::Denied
        {
            key_stop = Some((sent.elapsed(), chain.head().await));
        }
        if lease_stop.is_none() && stored_source(&state, sid_uuid).await.1.is_empty() {
            lease_stop = Some((sent.elapsed(), chain.head().await));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (key_t, key_head) = key_stop.unwrap();
    let (lease_t, lease_head) = lease_stop.unwrap();
    println!(
        "revoke -> stop (block time {BLOCK_TIME:?}, {CONFIRMATIONS} confirmation(s), poll \
         {POLL:?}): revoke mined in block {}, receipt {receipt_after:?} after sending; key \
         release stopped {key_t:?} after sending at head {key_head} ({} blocks after the \
         revoke's block); dispatch stopped {lease_t:?} after sending at head {lease_head} ({} \
         blocks after)",
        revoke.block_number,
        key_head - revoke.block_number,
        lease_head - revoke.block_number,
    );
    // The bound: the confirmations, plus a block for a poll that straddles one.
    assert!(key_head - revoke.block_number <= CONFIRMATIONS + 1);
    assert!(lease_head - revoke.block_number <= CONFIRMATIONS + 1);

    // A is refused the key of the lease it holds, and gets no task of the session any more.
    refused(raw_a.key(&lease_a).await, 403, "not_allowed");
    raw_a.release(&lease_a).await;
    assert!(
        raw_a.lease(1_500).await.is_none(),
        "a revoked miner gets nothing"
    );
    // The task waits for an allowed miner: allowing B on chain lets B's worker serve it.
    owner.allow_miner(sid_uuid, b.address()).await.unwrap();
    let (s, v) = pending.await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["veil"]["miner"], b.checksum().as_str());

    // --- The chain goes away while a hand-driven B holds a lease of the session.
    let (s, v) = router
        .post(&key, "/api/v2/sessions", &json!({"private": false}))
        .await;
    assert_eq!(s, 201, "{v}");
    let public_sid = v["id"].as_str().unwrap().to_string();
    let raw_b2 = RawMiner::login(&router, &b, b.x25519(), &["tiny-2"])
        .await
        .unwrap();
    let held = spawn_complete(&router, &key, &sid, "tiny-2", "held over the outage");
    let lease_held = raw_b2.lease(5_000).await.expect("B is allowed");

    let stopped = Instant::now();
    chain.stop();
    eventually(
        "the ACL view goes stale",
        Duration::from_secs(10),
        || async { !acl.is_fresh() },
    )
    .await;
    println!(
        "chain stopped -> contract-backed sessions fail closed {:?} after the stop began (bound \
         {MAX_STALENESS:?} after the last successful poll)",
        stopped.elapsed()
    );
    let (s, v) = complete(
        router.url.clone(),
        key.clone(),
        sid.clone(),
        "tiny",
        "refused",
    )
    .await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "acl_stale");
    assert_eq!(v["error"]["param"], "session_id");
    refused(raw_b2.key(&lease_held).await, 503, "acl_stale");
    raw_b2.release(&lease_held).await;
    assert!(
        raw_b2.lease(1_000).await.is_none(),
        "no lease of a contract-backed session while stale"
    );
    let (s, v) = complete(
        router.url.clone(),
        key.clone(),
        public_sid.clone(),
        "tiny",
        "public",
    )
    .await;
    assert_eq!(s, 200, "a public session keeps working: {v}");
    assert_eq!(v["veil"]["miner"], b.checksum().as_str());
    let (s, metrics) = router.get(&key, "/metrics").await;
    assert_eq!(s, 200);
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(metrics.contains("veil_router_acl_fresh 0"), "{metrics}");
    assert!(metrics.contains("veil_router_acl_staleness_seconds"));

    // --- The chain comes back: the same router serves the session again.
    let restarted = Instant::now();
    chain.start();
    eventually(
        "the ACL view is fresh again",
        Duration::from_secs(20),
        || async { acl.is_fresh() },
    )
    .await;
    println!(
        "chain restarted -> fresh again {:?} after the start began (anvil's own start included)",
        restarted.elapsed()
    );
    let again = raw_b2
        .lease(5_000)
        .await
        .expect("the held task is leased again");
    assert_eq!(again.task_id, lease_held.task_id);
    raw_b2.key(&again).await.expect("keys are released again");
    raw_b2.release(&again).await;
    held.abort();
    let (s, v) = complete(router.url.clone(), key.clone(), sid.clone(), "tiny", "back").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["veil"]["miner"], b.checksum().as_str());
    assert!(!router.audit("acl.stale").await.is_empty());
    // Transitions are audited by the mirror loop on its next tick (every poll interval), which
    // may come after the completion above.
    eventually(
        "the recovery is audited",
        Duration::from_secs(5),
        || async { router.audit("acl.fresh").await.len() >= 2 },
    )
    .await;

    worker_b.shutdown().await.unwrap();
    router.stop().await;
}
