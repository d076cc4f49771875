//! The ACL contract against a real EVM dev chain (anvil, spawned on loopback by the tests):
//! deployment, every function, every refusal decoded to its custom error, every event.

mod common;

use std::time::Duration;

use alloy::primitives::{Address, B256, FixedBytes, U256};
use alloy::providers::Provider;
use common::*;
use veil_contracts::VeilAcl::{self, VeilAclErrors as E, VeilAclEvents as Ev};
use veil_contracts::{AclContract, Error, deploy};

const TIMEOUT: Duration = Duration::from_secs(30);

fn sid(n: u8) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[0] = 0x01;
    id[15] = n;
    id
}

fn key(n: u8) -> [u8; 32] {
    [n; 32]
}

struct Fixture {
    anvil: alloy::node_bindings::AnvilInstance,
    address: Address,
    /// Dev account 0: the deployer and first admin.
    admin: AclContract,
    admin_addr: Address,
}

async fn fixture() -> Fixture {
    let anvil = anvil();
    let (provider, admin_addr) = wallet(&anvil, 0);
    let d = deploy(&provider, vec![], 1, TIMEOUT).await.expect("deploy");
    let admin = AclContract::new(d.address, provider);
    Fixture {
        address: d.address,
        anvil,
        admin,
        admin_addr,
    }
}

impl Fixture {
    fn as_account(&self, i: usize) -> (AclContract, Address) {
        let (provider, address) = wallet(&self.anvil, i);
        (AclContract::new(self.address, provider), address)
    }
}

#[tokio::test]
async fn deploy_matches_the_artifact_and_makes_the_deployer_admin() {
    let f = fixture().await;
    let provider = f.admin.instance().provider();
    let code = provider.get_code_at(f.address).await.unwrap();
    let artifact: serde_json::Value = serde_json::from_str(veil_contracts::ARTIFACT_JSON).unwrap();
    let deployed = artifact["deployedBytecode"].as_str().unwrap();
    assert_eq!(
        format!("{code}"),
        deployed,
        "on-chain code differs from the artifact"
    );
    assert_eq!(f.admin.admins().await.unwrap(), vec![f.admin_addr]);
    assert!(f.admin.is_admin(f.admin_addr).await.unwrap());

    // The constructor's event.
    let receipt_events = {
        let block = provider
            .get_block_by_number(1u64.into())
            .await
            .unwrap()
            .unwrap();
        let tx = block.transactions.hashes().next().unwrap();
        events(provider, tx).await
    };
    assert!(
        matches!(&receipt_events[..], [Ev::AdminAdded(e)] if e.admin == f.admin_addr && e.by == f.admin_addr),
        "{receipt_events:?}"
    );
}

#[tokio::test]
async fn deploy_with_explicit_admins_and_refusals_in_the_constructor() {
    let anvil = anvil();
    let (provider, deployer) = wallet(&anvil, 0);
    let a = anvil.addresses()[1];
    let b = anvil.addresses()[2];
    let d = deploy(&provider, vec![a, b], 1, TIMEOUT).await.unwrap();
    let acl = AclContract::new(d.address, provider.clone());
    let mut admins = acl.admins().await.unwrap();
    admins.sort();
    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(admins, expected);
    assert!(!acl.is_admin(deployer).await.unwrap());

    let err = refusal(deploy(&provider, vec![Address::ZERO], 1, TIMEOUT).await);
    assert!(matches!(err, E::ZeroAddress(_)), "{err:?}");
    let err = refusal(deploy(&provider, vec![a, a], 1, TIMEOUT).await);
    assert!(
        matches!(&err, E::AlreadyAdmin(e) if e.account == a),
        "{err:?}"
    );
}

#[tokio::test]
async fn admins_add_and_remove_with_events_and_refusals() {
    let f = fixture().await;
    let (stranger, stranger_addr) = f.as_account(5);
    let second = f.anvil.addresses()[1];
    let provider = f.admin.instance().provider().clone();

    // addAdmin
    let tx = ok(f.admin.add_admin(second).await);
    assert!(tx.gas_used > 21_000);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::AdminAdded(e)] if e.admin == second && e.by == f.admin_addr),
        "{ev:?}"
    );
    assert!(f.admin.is_admin(second).await.unwrap());

    let err = refusal(stranger.add_admin(stranger_addr).await);
    assert!(
        matches!(&err, E::NotAdmin(e) if e.caller == stranger_addr),
        "{err:?}"
    );
    let err = refusal(f.admin.add_admin(Address::ZERO).await);
    assert!(matches!(err, E::ZeroAddress(_)), "{err:?}");
    let err = refusal(f.admin.add_admin(second).await);
    assert!(
        matches!(&err, E::AlreadyAdmin(e) if e.account == second),
        "{err:?}"
    );

    // removeAdmin
    let err = refusal(stranger.remove_admin(second).await);
    assert!(
        matches!(&err, E::NotAdmin(e) if e.caller == stranger_addr),
        "{err:?}"
    );
    let err = refusal(f.admin.remove_admin(stranger_addr).await);
    assert!(
        matches!(&err, E::NotAnAdmin(e) if e.account == stranger_addr),
        "{err:?}"
    );
    // An admin may remove itself while another admin is left.
    let tx = ok(f.admin.remove_admin(f.admin_addr).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::AdminRemoved(e)] if e.admin == f.admin_addr && e.by == f.admin_addr),
        "{ev:?}"
    );
    assert_eq!(f.admin.admins().await.unwrap(), vec![second]);
    // Never zero admins.
    let (second_acl, _) = f.as_account(1);
    let err = refusal(second_acl.remove_admin(second).await);
    assert!(
        matches!(&err, E::LastAdmin(e) if e.account == second),
        "{err:?}"
    );
    let message = Error::Refused(err).to_string();
    assert!(message.contains("last admin"), "{message}");
    // The former admin has lost its rights.
    let err = refusal(f.admin.add_admin(stranger_addr).await);
    assert!(
        matches!(&err, E::NotAdmin(e) if e.caller == f.admin_addr),
        "{err:?}"
    );
}

#[tokio::test]
async fn miner_registry_with_events_and_refusals() {
    let f = fixture().await;
    let provider = f.admin.instance().provider().clone();
    let (miner_acl, miner) = f.as_account(3);
    let (stranger, stranger_addr) = f.as_account(5);

    // registerMiner
    let err = refusal(stranger.register_miner(miner, key(1), "ipfs://m").await);
    assert!(
        matches!(&err, E::NotAdmin(e) if e.caller == stranger_addr),
        "{err:?}"
    );
    let err = refusal(f.admin.register_miner(Address::ZERO, key(1), "x").await);
    assert!(matches!(err, E::ZeroAddress(_)), "{err:?}");
    let err = refusal(f.admin.register_miner(miner, [0; 32], "x").await);
    assert!(matches!(err, E::ZeroX25519Key(_)), "{err:?}");
    assert_eq!(f.admin.miner(miner).await.unwrap(), None);

    let tx = ok(f
        .admin
        .register_miner(miner, key(1), "https://miner.example/m1")
        .await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::MinerRegistered(e)]
            if e.miner == miner && e.x25519 == B256::from(key(1))
                && e.metadataUri == "https://miner.example/m1" && e.by == f.admin_addr),
        "{ev:?}"
    );
    let info = f.admin.miner(miner).await.unwrap().unwrap();
    assert_eq!(info.x25519, key(1));
    assert!(info.active);
    assert_eq!(info.metadata_uri, "https://miner.example/m1");
    let err = refusal(f.admin.register_miner(miner, key(2), "x").await);
    assert!(
        matches!(&err, E::MinerAlreadyActive(e) if e.miner == miner),
        "{err:?}"
    );

    // rotateMinerKey: only the miner itself, and only while active.
    let err = refusal(stranger.rotate_miner_key(key(9)).await);
    assert!(
        matches!(&err, E::UnknownMiner(e) if e.miner == stranger_addr),
        "{err:?}"
    );
    let err = refusal(miner_acl.rotate_miner_key([0; 32]).await);
    assert!(matches!(err, E::ZeroX25519Key(_)), "{err:?}");
    let tx = ok(miner_acl.rotate_miner_key(key(2)).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::MinerKeyRotated(e)]
            if e.miner == miner && e.oldX25519 == B256::from(key(1)) && e.newX25519 == B256::from(key(2))),
        "{ev:?}"
    );
    assert_eq!(f.admin.miner(miner).await.unwrap().unwrap().x25519, key(2));

    // deactivateMiner
    let err = refusal(stranger.deactivate_miner(miner).await);
    assert!(
        matches!(&err, E::NotAdmin(e) if e.caller == stranger_addr),
        "{err:?}"
    );
    let err = refusal(f.admin.deactivate_miner(stranger_addr).await);
    assert!(
        matches!(&err, E::UnknownMiner(e) if e.miner == stranger_addr),
        "{err:?}"
    );
    let tx = ok(f.admin.deactivate_miner(miner).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::MinerDeactivated(e)] if e.miner == miner && e.by == f.admin_addr),
        "{ev:?}"
    );
    assert!(!f.admin.miner(miner).await.unwrap().unwrap().active);
    let err = refusal(f.admin.deactivate_miner(miner).await);
    assert!(
        matches!(&err, E::MinerNotActive(e) if e.miner == miner),
        "{err:?}"
    );
    let err = refusal(miner_acl.rotate_miner_key(key(3)).await);
    assert!(
        matches!(&err, E::MinerNotActive(e) if e.miner == miner),
        "{err:?}"
    );

    // Re-registering a deactivated miner reactivates it with the new key and metadata.
    ok(f.admin.register_miner(miner, key(4), "ipfs://m2").await);
    let info = f.admin.miner(miner).await.unwrap().unwrap();
    assert_eq!(
        (info.x25519, info.active, info.metadata_uri.as_str()),
        (key(4), true, "ipfs://m2")
    );
    let count = f.admin.instance().minerCount().call().await.unwrap();
    assert_eq!(
        count,
        U256::from(1),
        "re-registration must not list the miner twice"
    );
}

#[tokio::test]
async fn sessions_register_transfer_close_with_events_and_refusals() {
    let f = fixture().await;
    let provider = f.admin.instance().provider().clone();
    let (owner, owner_addr) = f.as_account(4);
    let (other, other_addr) = f.as_account(6);
    let s = sid(1);

    let err = refusal(owner.register_session([0u8; 16]).await);
    assert!(matches!(err, E::ZeroSessionId(_)), "{err:?}");
    let tx = ok(owner.register_session(s).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::SessionRegistered(e)] if e.sessionId == FixedBytes(s) && e.owner == owner_addr),
        "{ev:?}"
    );
    assert_eq!(owner.session_owner(s).await.unwrap(), Some(owner_addr));
    assert_eq!(owner.session_owner(sid(99)).await.unwrap(), None);
    let err = refusal(other.register_session(s).await);
    assert!(
        matches!(&err, E::SessionAlreadyRegistered(e) if e.sessionId == FixedBytes(s)),
        "{err:?}"
    );
    let message = Error::Refused(err).to_string();
    assert!(
        message.contains(&uuid::Uuid::from_bytes(s).to_string()),
        "the session id is shown as a UUID: {message}"
    );

    // transferSession: owner only (an admin is not enough), never to zero, known sessions only.
    let err = refusal(f.admin.transfer_session(s, other_addr).await);
    assert!(
        matches!(&err, E::NotSessionOwner(e) if e.sessionId == FixedBytes(s) && e.caller == f.admin_addr),
        "{err:?}"
    );
    let err = refusal(owner.transfer_session(s, Address::ZERO).await);
    assert!(matches!(err, E::ZeroAddress(_)), "{err:?}");
    let err = refusal(owner.transfer_session(sid(2), other_addr).await);
    assert!(
        matches!(&err, E::UnknownSession(e) if e.sessionId == FixedBytes(sid(2))),
        "{err:?}"
    );
    let tx = ok(owner.transfer_session(s, other_addr).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::SessionTransferred(e)]
            if e.sessionId == FixedBytes(s) && e.from == owner_addr && e.to == other_addr),
        "{ev:?}"
    );
    assert_eq!(owner.session_owner(s).await.unwrap(), Some(other_addr));

    // closeSession: owner only.
    let err = refusal(owner.close_session(s).await);
    assert!(
        matches!(&err, E::NotSessionOwner(e) if e.caller == owner_addr),
        "{err:?}"
    );
    let err = refusal(owner.close_session(sid(3)).await);
    assert!(matches!(err, E::UnknownSession(_)), "{err:?}");
    let tx = ok(other.close_session(s).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::SessionClosed(e)] if e.sessionId == FixedBytes(s) && e.by == other_addr),
        "{ev:?}"
    );
    let info = other.session(s).await.unwrap().unwrap();
    assert!(info.closed);
    assert_eq!(info.owner, other_addr);

    // A closed session refuses everything and its id is never reused.
    let err = refusal(other.close_session(s).await);
    assert!(
        matches!(&err, E::SessionIsClosed(e) if e.sessionId == FixedBytes(s)),
        "{err:?}"
    );
    let err = refusal(other.transfer_session(s, owner_addr).await);
    assert!(matches!(err, E::SessionIsClosed(_)), "{err:?}");
    let err = refusal(other.register_session(s).await);
    assert!(matches!(err, E::SessionAlreadyRegistered(_)), "{err:?}");
}

#[tokio::test]
async fn allow_and_revoke_one_and_batch_with_events_and_refusals() {
    let f = fixture().await;
    let provider = f.admin.instance().provider().clone();
    let (owner, owner_addr) = f.as_account(4);
    let (stranger, stranger_addr) = f.as_account(6);
    let m1 = f.anvil.addresses()[7];
    let m2 = f.anvil.addresses()[8];
    let m3 = f.anvil.addresses()[9];
    let unregistered = Address::repeat_byte(0x42);
    for (i, m) in [m1, m2, m3].into_iter().enumerate() {
        ok(f.admin.register_miner(m, key(i as u8 + 1), "").await);
    }
    let s = sid(7);
    ok(owner.register_session(s).await);

    // Who may allow: the owner or an admin; anyone else is refused.
    let err = refusal(stranger.allow_miner(s, m1).await);
    assert!(
        matches!(&err, E::NotSessionOwnerOrAdmin(e) if e.sessionId == FixedBytes(s) && e.caller == stranger_addr),
        "{err:?}"
    );
    let err = refusal(stranger.allow_miner(sid(8), m1).await);
    assert!(matches!(err, E::UnknownSession(_)), "{err:?}");
    let err = refusal(owner.allow_miner(s, unregistered).await);
    assert!(
        matches!(&err, E::UnknownMiner(e) if e.miner == unregistered),
        "{err:?}"
    );

    let tx = ok(owner.allow_miner(s, m1).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::MinerAllowed(e)] if e.sessionId == FixedBytes(s) && e.miner == m1 && e.by == owner_addr),
        "{ev:?}"
    );
    assert!(owner.is_allowed(s, m1).await.unwrap());
    assert!(!owner.is_allowed(s, m2).await.unwrap());
    let err = refusal(f.admin.allow_miner(s, m1).await);
    assert!(
        matches!(&err, E::MinerAlreadyAllowed(e) if e.sessionId == FixedBytes(s) && e.miner == m1),
        "{err:?}"
    );

    // Batch: all or nothing.
    let err = refusal(owner.allow_miners(s, vec![]).await);
    assert!(matches!(err, E::EmptyBatch(_)), "{err:?}");
    let err = refusal(owner.allow_miners(s, vec![m2, m1]).await);
    assert!(
        matches!(&err, E::MinerAlreadyAllowed(e) if e.miner == m1),
        "{err:?}"
    );
    assert!(
        !owner.is_allowed(s, m2).await.unwrap(),
        "a refused batch changes nothing"
    );
    let err = refusal(owner.allow_miners(s, vec![m2, m2]).await);
    assert!(
        matches!(&err, E::MinerAlreadyAllowed(e) if e.miner == m2),
        "{err:?}"
    );
    let tx = ok(f.admin.allow_miners(s, vec![m2, m3]).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::MinerAllowed(a), Ev::MinerAllowed(b)]
            if a.miner == m2 && b.miner == m3 && a.by == f.admin_addr),
        "{ev:?}"
    );
    let mut all = owner
        .session(s)
        .await
        .unwrap()
        .unwrap()
        .allowed
        .into_iter()
        .collect::<Vec<_>>();
    all.sort();
    let mut expected = vec![m1, m2, m3];
    expected.sort();
    assert_eq!(all, expected);

    // Pagination of the allowlist.
    let page = owner.allowed_miners_page(s, 0, 2).await.unwrap();
    assert_eq!(page.len(), 2);
    let rest = owner.allowed_miners_page(s, 2, 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert!(owner.allowed_miners_page(s, 3, 2).await.unwrap().is_empty());
    let mut joined = [page, rest].concat();
    joined.sort();
    assert_eq!(joined, expected);
    let err = refusal(owner.allowed_miners_page(s, 0, 0).await);
    assert!(matches!(err, E::ZeroLimit(_)), "{err:?}");

    // A deactivated miner stays listed but is not allowed; allowing it is refused.
    ok(f.admin.deactivate_miner(m3).await);
    assert!(!owner.is_allowed(s, m3).await.unwrap());
    let s2 = sid(9);
    ok(owner.register_session(s2).await);
    let err = refusal(owner.allow_miner(s2, m3).await);
    assert!(
        matches!(&err, E::MinerNotActive(e) if e.miner == m3),
        "{err:?}"
    );

    // Revoke.
    let err = refusal(stranger.revoke_miner(s, m1).await);
    assert!(matches!(err, E::NotSessionOwnerOrAdmin(_)), "{err:?}");
    let err = refusal(owner.revoke_miner(s2, m1).await);
    assert!(
        matches!(&err, E::MinerNotAllowed(e) if e.sessionId == FixedBytes(s2) && e.miner == m1),
        "{err:?}"
    );
    let tx = ok(owner.revoke_miner(s, m1).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::MinerRevoked(e)] if e.sessionId == FixedBytes(s) && e.miner == m1 && e.by == owner_addr),
        "{ev:?}"
    );
    assert!(!owner.is_allowed(s, m1).await.unwrap());
    let err = refusal(owner.revoke_miners(s, vec![]).await);
    assert!(matches!(err, E::EmptyBatch(_)), "{err:?}");
    let err = refusal(owner.revoke_miners(s, vec![m2, m1]).await);
    assert!(
        matches!(&err, E::MinerNotAllowed(e) if e.miner == m1),
        "{err:?}"
    );
    assert!(
        owner.is_allowed(s, m2).await.unwrap(),
        "a refused batch changes nothing"
    );
    let tx = ok(f.admin.revoke_miners(s, vec![m2, m3]).await);
    let ev = events(&provider, tx.tx_hash).await;
    assert!(
        matches!(&ev[..], [Ev::MinerRevoked(a), Ev::MinerRevoked(b)] if a.miner == m2 && b.miner == m3),
        "{ev:?}"
    );
    assert_eq!(
        owner
            .instance()
            .allowedMinerCount(FixedBytes(s))
            .call()
            .await
            .unwrap(),
        U256::ZERO
    );

    // Closed sessions allow nobody and refuse allow/revoke.
    ok(owner.allow_miner(s, m1).await);
    ok(owner.close_session(s).await);
    assert!(!owner.is_allowed(s, m1).await.unwrap());
    let err = refusal(f.admin.allow_miner(s, m2).await);
    assert!(
        matches!(&err, E::SessionIsClosed(e) if e.sessionId == FixedBytes(s)),
        "{err:?}"
    );
    let err = refusal(f.admin.revoke_miner(s, m1).await);
    assert!(matches!(err, E::SessionIsClosed(_)), "{err:?}");
}

#[tokio::test]
async fn enumeration_views_page_through_sessions_and_miners() {
    let f = fixture().await;
    let (owner, owner_addr) = f.as_account(4);
    for n in 1..=5 {
        ok(owner.register_session(sid(n)).await);
    }
    let m = f.anvil.addresses()[7];
    ok(f.admin.register_miner(m, key(1), "u").await);
    let acl = f.admin.instance();
    assert_eq!(acl.sessionCount().call().await.unwrap(), U256::from(5));
    let page = acl
        .sessionsPage(U256::from(3), U256::from(10))
        .call()
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0].id, FixedBytes(sid(4)));
    assert_eq!(page[1].owner, owner_addr);
    assert!(
        acl.sessionsPage(U256::from(5), U256::from(1))
            .call()
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        acl.minersPage(U256::ZERO, U256::from(1))
            .call()
            .await
            .unwrap(),
        vec![m]
    );
    for call in [
        acl.minersPage(U256::ZERO, U256::ZERO)
            .call()
            .await
            .map(|_| ()),
        acl.sessionsPage(U256::ZERO, U256::ZERO)
            .call()
            .await
            .map(|_| ()),
    ] {
        let err = call.expect_err("limit 0 is refused");
        assert!(
            matches!(err.as_decoded_interface_error::<E>(), Some(E::ZeroLimit(_))),
            "{err}"
        );
    }
}

/// alloy's default cached nonce manager burns a nonce when a send fails at gas estimation; the
/// providers here fetch the nonce per transaction, so a refusal never blocks the next one.
#[tokio::test]
async fn a_refused_transaction_does_not_disturb_the_next_one() {
    let f = fixture().await;
    let provider = f.admin.instance().provider().clone();
    let before = provider.get_transaction_count(f.admin_addr).await.unwrap();
    for round in 0..3u8 {
        let err = refusal(f.admin.add_admin(f.admin_addr).await);
        assert!(matches!(err, E::AlreadyAdmin(_)), "{err:?}");
        let tx = ok(f.admin.register_session(sid(round + 1)).await);
        assert!(tx.block_number > 0);
    }
    let after = provider.get_transaction_count(f.admin_addr).await.unwrap();
    assert_eq!(
        after,
        before + 3,
        "exactly the successful transactions used nonces"
    );
}

/// A transaction that passes gas estimation but reverts when mined (another transaction got in
/// first) is reported with its hash and the decoded reason, replayed from its block.
#[tokio::test]
async fn a_revert_on_chain_is_replayed_and_decoded() {
    let f = fixture().await;
    let provider = f.admin.instance().provider().clone();
    // Stop automining so that two transactions land in one block.
    let _: serde_json::Value = provider
        .raw_request("evm_setAutomine".into(), (false,))
        .await
        .unwrap();
    let (other, _) = f.as_account(2);
    let s = sid(1);
    let first = f.admin.clone();
    let a = tokio::spawn(async move { first.register_session(s).await });
    // Let the first transaction reach the pool (its estimate ran against the old state).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = tokio::spawn(async move {
        // Give it a fixed gas limit so it is not refused at estimation.
        let call = other.instance().registerSession(FixedBytes(s)).gas(200_000);
        other.submit(call).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    mine(&provider, 1).await;
    let results = [a.await.unwrap(), b.await.unwrap()];
    // The block holds both; whichever came first won, the other reverted on chain.
    let (wins, losses): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
    assert_eq!(
        wins.len(),
        1,
        "exactly one registration succeeds: {wins:?} {losses:?}"
    );
    match losses.into_iter().next().unwrap() {
        Err(Error::Reverted { tx_hash, reason }) => {
            assert_ne!(tx_hash, B256::ZERO);
            assert!(reason.contains("already registered"), "{reason}");
        }
        other => panic!("expected an on-chain revert, got {other:?}"),
    }
    let _: serde_json::Value = provider
        .raw_request("evm_setAutomine".into(), (true,))
        .await
        .unwrap();
}

#[tokio::test]
async fn readable_messages_name_the_culprit() {
    let f = fixture().await;
    let (stranger, stranger_addr) = f.as_account(5);
    let err = stranger.add_admin(stranger_addr).await.unwrap_err();
    let text = err.to_string();
    assert_eq!(
        text,
        format!("refused by the contract: {stranger_addr} is not an admin of the contract")
    );
    assert!(err.refusal().is_some());
    // Binding names line up with the Solidity errors.
    let _ = VeilAcl::NotAdmin {
        caller: stranger_addr,
    };
}

#[test]
fn the_committed_artifact_is_what_the_pinned_compiler_produces() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let solc = std::path::Path::new(dir).join("node_modules/solc");
    assert!(
        solc.is_dir(),
        "solc is not installed: run scripts/test.sh, or `npm ci` in contracts/"
    );
    let out = std::process::Command::new("node")
        .args(["scripts/compile.mjs", "--check"])
        .current_dir(dir)
        .output()
        .expect("node runs (Node.js is needed to build the contract)");
    assert!(
        out.status.success(),
        "artifact check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
