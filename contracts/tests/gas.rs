//! Gas used by every operation of the ACL contract, measured on anvil and printed as a markdown
//! table (`cargo test -p veil-contracts --test gas -- --nocapture`); the figures are recorded in
//! docs/contracts.md. The bounds asserted here are generous ceilings that catch a regression
//! (say, an unbounded loop), not the figures themselves.

mod common;

use std::time::Duration;

use alloy::primitives::Address;
use common::*;
use veil_contracts::{AclContract, deploy};

#[tokio::test]
async fn gas_per_operation() {
    let anvil = anvil();
    let (provider, _) = wallet(&anvil, 0);
    let d = deploy(&provider, vec![], 1, Duration::from_secs(30))
        .await
        .unwrap();
    let admin = AclContract::new(d.address, provider);
    let (miner_provider, miner) = wallet(&anvil, 7);
    let miner_acl = AclContract::new(d.address, miner_provider);
    let uri = "https://miners.example.org/veil/miner-0001.json";
    let session = [0x11u8; 16];
    let batch: Vec<Address> = (1..=10u8).map(Address::repeat_byte).collect();

    let mut rows: Vec<(String, u64, u64)> = vec![("deploy".into(), d.tx.gas_used, 2_500_000)];
    let mut row = |name: &str, gas: u64, ceiling: u64| rows.push((name.to_string(), gas, ceiling));

    row(
        "addAdmin",
        ok(admin.add_admin(anvil.addresses()[1]).await).gas_used,
        120_000,
    );
    row(
        "removeAdmin",
        ok(admin.remove_admin(anvil.addresses()[1]).await).gas_used,
        80_000,
    );
    row(
        "registerMiner (new, 48-byte URI)",
        ok(admin.register_miner(miner, [1; 32], uri).await).gas_used,
        250_000,
    );
    row(
        "rotateMinerKey (by the miner)",
        ok(miner_acl.rotate_miner_key([2; 32]).await).gas_used,
        60_000,
    );
    row(
        "deactivateMiner",
        ok(admin.deactivate_miner(miner).await).gas_used,
        60_000,
    );
    row(
        "registerMiner (re-register, same URI)",
        ok(admin.register_miner(miner, [3; 32], uri).await).gas_used,
        120_000,
    );
    for m in &batch {
        ok(admin.register_miner(*m, [4; 32], "").await);
    }
    row(
        "registerSession",
        ok(admin.register_session(session).await).gas_used,
        120_000,
    );
    row(
        "allowMiner (first miner)",
        ok(admin.allow_miner(session, miner).await).gas_used,
        150_000,
    );
    row(
        "allowMiners (batch of 10)",
        ok(admin.allow_miners(session, batch.clone()).await).gas_used,
        1_500_000,
    );
    row(
        "revokeMiner",
        ok(admin.revoke_miner(session, miner).await).gas_used,
        80_000,
    );
    row(
        "revokeMiners (batch of 10)",
        ok(admin.revoke_miners(session, batch.clone()).await).gas_used,
        500_000,
    );
    row(
        "transferSession",
        ok(admin.transfer_session(session, anvil.addresses()[2]).await).gas_used,
        60_000,
    );
    let (owner_provider, _) = wallet(&anvil, 2);
    let owner = AclContract::new(d.address, owner_provider);
    row(
        "closeSession",
        ok(owner.close_session(session).await).gas_used,
        60_000,
    );

    println!("| operation | gas used |");
    println!("|---|---:|");
    for (name, gas, _) in &rows {
        println!("| {name} | {gas} |");
    }
    for (name, gas, ceiling) in &rows {
        assert!(gas > &21_000, "{name}: {gas} is less than a plain transfer");
        assert!(
            gas <= ceiling,
            "{name}: {gas} gas exceeds the ceiling {ceiling}"
        );
    }
}
