//! The ACL reader against a real anvil: following allow/revoke with confirmations, resuming from
//! its checkpoint file, reorganisations, staleness while the node is gone and recovery after.

mod common;

use std::time::Duration;

use alloy::primitives::Address;
use alloy::providers::{DynProvider, Provider};
use common::*;
use veil_contracts::{
    AclContract, AclDecision, AclReader, Error, ReaderConfig, connect, deploy, http_provider,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const FRESH: Duration = Duration::from_secs(60);

fn sid(n: u8) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[0] = 0x02;
    id[15] = n;
    id
}

struct Chain {
    anvil: alloy::node_bindings::AnvilInstance,
    admin: AclContract,
    provider: DynProvider,
    contract: Address,
    m1: Address,
    m2: Address,
}

/// Deploys, registers two miners and session `sid(1)` (owned by the admin).
async fn chain_with(args: &[&str]) -> Chain {
    let anvil = anvil_with(args);
    let (provider, _) = wallet(&anvil, 0);
    let d = deploy(&provider, vec![], 1, TIMEOUT).await.unwrap();
    let admin = AclContract::new(d.address, provider.clone());
    let m1 = anvil.addresses()[7];
    let m2 = anvil.addresses()[8];
    ok(admin.register_miner(m1, [1; 32], "ipfs://m1").await);
    ok(admin.register_miner(m2, [2; 32], "ipfs://m2").await);
    ok(admin.register_session(sid(1)).await);
    Chain {
        contract: d.address,
        anvil,
        admin,
        provider,
        m1,
        m2,
    }
}

async fn chain() -> Chain {
    chain_with(&[]).await
}

fn reader(c: &Chain, config: ReaderConfig) -> AclReader {
    AclReader::new(http_provider(c.anvil.endpoint_url()), config).unwrap()
}

async fn snapshot(p: &DynProvider) -> serde_json::Value {
    p.raw_request("evm_snapshot".into(), ()).await.unwrap()
}

async fn revert(p: &DynProvider, id: serde_json::Value) {
    let reverted: bool = p.raw_request("evm_revert".into(), (id,)).await.unwrap();
    assert!(reverted, "evm_revert");
}

#[tokio::test]
async fn follows_allow_and_revoke_after_the_configured_confirmations() {
    let c = chain().await;
    mine(&c.provider, 2).await;
    let mut r = reader(&c, ReaderConfig::new(c.contract).with_confirmations(2));
    let view = r.view();
    assert_eq!(view.staleness(), None);
    assert_eq!(
        view.decide(sid(1), c.m1, FRESH),
        AclDecision::Stale,
        "never synced"
    );

    let first = r.sync().await.unwrap();
    assert!(first.reloaded && !first.reorg);
    assert_eq!(first.checkpoint.block_number, first.head - 2);
    assert_eq!(view.is_allowed(sid(1), c.m1), Some(false));
    assert_eq!(view.is_allowed(sid(2), c.m1), None, "not on chain");
    assert_eq!(view.decide(sid(2), c.m1, FRESH), AclDecision::NotOnChain);
    assert_eq!(view.miner(c.m1).unwrap().x25519, [1; 32]);
    assert!(view.staleness().unwrap() < Duration::from_secs(5));

    let allowed = ok(c.admin.allow_miner(sid(1), c.m1).await);
    let report = r.sync().await.unwrap();
    assert_eq!(report.checkpoint.block_number, allowed.block_number - 2);
    assert_eq!(
        view.is_allowed(sid(1), c.m1),
        Some(false),
        "0 confirmations deep yet"
    );
    mine(&c.provider, 1).await;
    r.sync().await.unwrap();
    assert_eq!(
        view.is_allowed(sid(1), c.m1),
        Some(false),
        "1 block deep: not yet"
    );
    mine(&c.provider, 1).await;
    let report = r.sync().await.unwrap();
    assert_eq!(report.events, 1);
    assert!(!report.reloaded);
    assert_eq!(view.is_allowed(sid(1), c.m1), Some(true));
    assert_eq!(view.decide(sid(1), c.m1, FRESH), AclDecision::Allowed);
    assert_eq!(view.decide(sid(1), c.m2, FRESH), AclDecision::Denied);
    assert_eq!(view.allowed_miners(sid(1)), Some(vec![c.m1]));

    ok(c.admin.revoke_miner(sid(1), c.m1).await);
    mine(&c.provider, 2).await;
    r.sync().await.unwrap();
    assert_eq!(view.is_allowed(sid(1), c.m1), Some(false));
    assert_eq!(view.allowed_miners(sid(1)), Some(vec![]));
}

#[tokio::test]
async fn applies_every_kind_of_event_like_the_contract() {
    let c = chain().await;
    let mut r = reader(
        &c,
        ReaderConfig::new(c.contract)
            .with_confirmations(0)
            .with_max_log_range(1),
    );
    let view = r.view();
    r.sync().await.unwrap();

    let (owner, owner_addr) = wallet(&c.anvil, 4);
    let owner = AclContract::new(c.contract, owner);
    let (miner1, _) = wallet(&c.anvil, 7);
    let miner1 = AclContract::new(c.contract, miner1);
    let new_admin = c.anvil.addresses()[3];
    let new_owner = c.anvil.addresses()[5];

    ok(c.admin.add_admin(new_admin).await);
    ok(owner.register_session(sid(2)).await);
    ok(owner.allow_miners(sid(2), vec![c.m1, c.m2]).await);
    ok(miner1.rotate_miner_key([9; 32]).await);
    ok(c.admin.deactivate_miner(c.m2).await);
    ok(owner.transfer_session(sid(2), new_owner).await);
    ok(c.admin.register_session(sid(3)).await);
    ok(c.admin.allow_miner(sid(3), c.m1).await);
    ok(c.admin.close_session(sid(3)).await);
    ok(c.admin.remove_admin(new_admin).await);
    let report = r.sync().await.unwrap();
    assert_eq!(report.events, 11);

    assert!(!view.is_admin(new_admin));
    assert_eq!(view.admins().len(), 1);
    let s2 = view.session(sid(2)).unwrap();
    assert_eq!(s2.owner, new_owner);
    assert_ne!(s2.owner, owner_addr);
    assert_eq!(s2.allowed.len(), 2, "the deactivated miner stays listed");
    assert_eq!(view.is_allowed(sid(2), c.m1), Some(true));
    assert_eq!(view.is_allowed(sid(2), c.m2), Some(false), "deactivated");
    assert_eq!(view.allowed_miners(sid(2)), Some(vec![c.m1]));
    assert_eq!(view.miner(c.m1).unwrap().x25519, [9; 32]);
    assert!(!view.miner(c.m2).unwrap().active);
    assert!(view.session(sid(3)).unwrap().closed);
    assert_eq!(view.is_allowed(sid(3), c.m1), Some(false), "closed");
    let ids = view.session_ids();
    assert!(ids.contains(&sid(2)) && ids.contains(&sid(3)), "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");

    // The followed state equals a fresh load at the same block.
    let mut fresh = reader(&c, ReaderConfig::new(c.contract).with_confirmations(0));
    fresh.sync().await.unwrap();
    let fv = fresh.view();
    for s in [sid(1), sid(2), sid(3)] {
        assert_eq!(fv.session(s), view.session(s));
    }
    for m in [c.m1, c.m2] {
        assert_eq!(fv.miner(m), view.miner(m));
    }
    assert_eq!(fv.admins(), view.admins());
    // Session ids may be given as UUIDs.
    assert_eq!(
        view.is_allowed(uuid::Uuid::from_bytes(sid(2)), c.m1),
        Some(true)
    );
}

#[tokio::test]
async fn resumes_from_its_checkpoint_file_after_a_restart() {
    let c = chain().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acl.json");
    let config = ReaderConfig::new(c.contract)
        .with_confirmations(0)
        .with_checkpoint_path(&path);

    let mut r = reader(&c, config.clone());
    ok(c.admin.allow_miner(sid(1), c.m1).await);
    let first = r.sync().await.unwrap();
    assert!(first.reloaded);
    assert!(path.is_file(), "checkpoint written");
    assert!(
        !dir.path().join("acl.json.tmp").exists(),
        "no temporary file left"
    );
    drop(r);

    // While the reader is down the chain moves on.
    ok(c.admin.revoke_miner(sid(1), c.m1).await);
    ok(c.admin.allow_miner(sid(1), c.m2).await);

    let mut r = reader(&c, config.clone());
    let view = r.view();
    assert_eq!(
        view.checkpoint(),
        Some(first.checkpoint),
        "resumed, not reloaded"
    );
    assert_eq!(
        view.is_allowed(sid(1), c.m1),
        Some(true),
        "the persisted state"
    );
    assert_eq!(view.staleness(), None, "not fresh until synced");
    assert_eq!(view.decide(sid(1), c.m1, FRESH), AclDecision::Stale);
    let report = r.sync().await.unwrap();
    assert!(!report.reloaded, "followed the logs from the checkpoint");
    assert_eq!(report.events, 2);
    assert_eq!(view.is_allowed(sid(1), c.m1), Some(false));
    assert_eq!(view.is_allowed(sid(1), c.m2), Some(true));

    // A checkpoint of another contract is ignored.
    let other = ReaderConfig::new(Address::repeat_byte(7))
        .with_confirmations(0)
        .with_checkpoint_path(&path);
    let r = reader(&c, other);
    assert_eq!(r.view().checkpoint(), None);

    // So is a damaged one: the state is loaded from the chain instead.
    std::fs::write(&path, b"{not json").unwrap();
    let mut r = reader(&c, config);
    assert_eq!(r.view().checkpoint(), None);
    assert!(r.sync().await.unwrap().reloaded);
    assert_eq!(r.view().is_allowed(sid(1), c.m2), Some(true));
}

#[tokio::test]
async fn a_reorganisation_past_the_checkpoint_makes_it_reload() {
    let c = chain().await;
    let mut r = reader(&c, ReaderConfig::new(c.contract).with_confirmations(0));
    let view = r.view();
    r.sync().await.unwrap();

    let snap = snapshot(&c.provider).await;
    ok(c.admin.allow_miner(sid(1), c.m1).await);
    let before = r.sync().await.unwrap();
    assert_eq!(view.is_allowed(sid(1), c.m1), Some(true));

    // The block with the allow is replaced by one with a different transaction.
    revert(&c.provider, snap).await;
    ok(c.admin.allow_miner(sid(1), c.m2).await);
    mine(&c.provider, 1).await;
    let replaced = c
        .provider
        .get_block_by_number(before.checkpoint.block_number.into())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        replaced.header.hash, before.checkpoint.block_hash,
        "the chain forked"
    );

    let report = r.sync().await.unwrap();
    assert!(report.reorg && report.reloaded, "{report:?}");
    assert_eq!(
        view.is_allowed(sid(1), c.m1),
        Some(false),
        "the orphaned allow is gone"
    );
    assert_eq!(view.is_allowed(sid(1), c.m2), Some(true));
}

#[tokio::test]
async fn a_reorganisation_within_the_confirmations_never_reaches_the_view() {
    let c = chain().await;
    mine(&c.provider, 3).await;
    let mut r = reader(&c, ReaderConfig::new(c.contract).with_confirmations(2));
    let view = r.view();
    r.sync().await.unwrap();

    let snap = snapshot(&c.provider).await;
    ok(c.admin.allow_miner(sid(1), c.m1).await);
    r.sync().await.unwrap();
    assert_eq!(view.is_allowed(sid(1), c.m1), Some(false));
    revert(&c.provider, snap).await;
    mine(&c.provider, 3).await;
    let report = r.sync().await.unwrap();
    assert!(!report.reorg && !report.reloaded, "{report:?}");
    assert_eq!(
        view.is_allowed(sid(1), c.m1),
        Some(false),
        "the orphaned allow never showed"
    );
}

#[tokio::test]
async fn grows_stale_while_the_node_is_unreachable_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("anvil-state.json");
    let state_arg = state.to_str().unwrap().to_string();
    let c = chain_with(&["--state", &state_arg]).await;
    ok(c.admin.allow_miner(sid(1), c.m1).await);
    let port = c.anvil.port();
    let mut r = reader(
        &c,
        ReaderConfig::new(c.contract)
            .with_confirmations(0)
            .with_sync_timeout(Duration::from_secs(5)),
    );
    let view = r.view();
    r.sync().await.unwrap();
    assert!(view.is_fresh(Duration::from_secs(5)));

    // The node goes away (it saves its state on the way out).
    let Chain { anvil, .. } = c;
    drop(anvil);
    let err = r.sync().await.unwrap_err();
    assert!(matches!(err, Error::Rpc(_)), "{err:?}");
    let early = view.staleness().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(r.sync().await.is_err());
    let later = view.staleness().unwrap();
    assert!(
        later >= early + Duration::from_millis(400),
        "{early:?} -> {later:?}"
    );
    assert!(view.last_error().is_some());
    assert_eq!(
        view.is_allowed(sid(1), c.m1),
        Some(true),
        "the last state is kept"
    );
    assert_eq!(
        view.decide(sid(1), c.m1, Duration::from_millis(300)),
        AclDecision::Stale,
        "fails closed past the bound"
    );

    // A node comes back at the same address with the same chain.
    let anvil = anvil_on(port, &["--state", &state_arg]);
    r.sync().await.unwrap();
    assert!(view.staleness().unwrap() < Duration::from_secs(5));
    assert!(view.last_error().is_none());
    assert_eq!(view.decide(sid(1), c.m1, FRESH), AclDecision::Allowed);
    drop(anvil);
}

#[tokio::test]
async fn the_background_task_keeps_the_view_current() {
    let c = chain().await;
    let r = reader(
        &c,
        ReaderConfig::new(c.contract)
            .with_confirmations(0)
            .with_poll_interval(Duration::from_millis(100)),
    );
    let follower = r.spawn();
    let view = follower.view();
    let mut changes = view.changes();
    ok(c.admin.allow_miner(sid(1), c.m1).await);
    tokio::time::timeout(Duration::from_secs(15), async {
        while view.is_allowed(sid(1), c.m1) != Some(true) {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the follower picked up the allow");
    assert!(view.is_fresh(Duration::from_secs(5)));
    let reader = follower.stop().await.expect("task stopped cleanly");
    assert_eq!(reader.config().confirmations, 0);
}

#[tokio::test]
async fn a_wrong_contract_address_is_an_error_not_an_empty_view() {
    let c = chain().await;
    let mut r = reader(
        &c,
        ReaderConfig::new(Address::repeat_byte(0x11)).with_confirmations(0),
    );
    let err = r.sync().await.unwrap_err();
    assert!(matches!(err, Error::NoCode(_)), "{err:?}");
    assert_eq!(r.view().staleness(), None);
    assert_eq!(r.view().decide(sid(1), c.m1, FRESH), AclDecision::Stale);
}

#[tokio::test]
async fn follows_over_a_websocket_too() {
    let c = chain().await;
    let provider = connect(&c.anvil.ws_endpoint()).await.unwrap();
    let mut r = AclReader::new(
        provider,
        ReaderConfig::new(c.contract).with_confirmations(0),
    )
    .unwrap();
    r.sync().await.unwrap();
    ok(c.admin.allow_miner(sid(1), c.m2).await);
    assert_eq!(r.sync().await.unwrap().events, 1);
    assert_eq!(r.view().is_allowed(sid(1), c.m2), Some(true));
    let err = connect("ftp://127.0.0.1/").await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}
