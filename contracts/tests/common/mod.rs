//! Shared test code: a real anvil on loopback, dev wallets, event decoding.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, B256};
use alloy::providers::{DynProvider, Provider};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEventInterface;
use veil_contracts::VeilAcl::{VeilAclErrors, VeilAclEvents};
use veil_contracts::{AclContract, Error, TxOutcome, wallet_provider};

/// The anvil binary: `$VEIL_ANVIL`, or the one `npm ci` puts under `contracts/node_modules`.
/// Panics (the test fails, it never skips) when neither is there.
pub fn anvil_path() -> PathBuf {
    if let Some(path) = std::env::var_os("VEIL_ANVIL") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "VEIL_ANVIL={} is not a file; unset it or point it at an anvil binary",
            path.display()
        );
        return path;
    }
    let platform = match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => "linux-amd64",
        ("linux", "aarch64") => "linux-arm64",
        ("macos", "x86_64") => "darwin-amd64",
        ("macos", "aarch64") => "darwin-arm64",
        (os, arch) => panic!("no anvil package for {os}/{arch}; set VEIL_ANVIL"),
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("node_modules/@foundry-rs")
        .join(format!("anvil-{platform}"))
        .join("bin/anvil");
    assert!(
        path.is_file(),
        "anvil not found at {}: run scripts/test.sh, or `npm ci` in contracts/ \
         (or source scripts/lib/evm.sh and call setup_evm_tools), or set VEIL_ANVIL",
        path.display()
    );
    path
}

/// A fresh anvil (chain id 31337) on a free loopback port, killed on drop.
pub fn anvil() -> AnvilInstance {
    anvil_with(&[])
}

/// Like [`anvil`], with extra command-line arguments.
pub fn anvil_with(args: &[&str]) -> AnvilInstance {
    anvil_on(veil_testkit::free_port(), args)
}

/// An anvil on a given port (retrying briefly if the port is still being released).
pub fn anvil_on(port: u16, args: &[&str]) -> AnvilInstance {
    let mut last = None;
    for _ in 0..20 {
        match Anvil::at(anvil_path())
            .host("127.0.0.1")
            .port(port)
            .chain_id(31337)
            .args(args.iter().copied())
            .try_spawn()
        {
            Ok(instance) => return instance,
            Err(e) => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }
    panic!("anvil did not start on port {port}: {last:?}");
}

/// The signer of anvil's `i`-th dev account.
pub fn signer(anvil: &AnvilInstance, i: usize) -> PrivateKeySigner {
    PrivateKeySigner::from(anvil.keys()[i].clone())
}

/// A provider signing as dev account `i`, and that account's address.
pub fn wallet(anvil: &AnvilInstance, i: usize) -> (DynProvider, Address) {
    let signer = signer(anvil, i);
    let address = signer.address();
    (wallet_provider(anvil.endpoint_url(), signer), address)
}

/// The contract at `address`, used as dev account `i`.
pub fn acl_as(anvil: &AnvilInstance, address: Address, i: usize) -> AclContract {
    AclContract::new(address, wallet(anvil, i).0)
}

/// The events a transaction emitted, decoded.
pub async fn events(provider: &DynProvider, tx: B256) -> Vec<VeilAclEvents> {
    let receipt = provider
        .get_transaction_receipt(tx)
        .await
        .expect("receipt query")
        .expect("receipt exists");
    receipt
        .inner
        .logs()
        .iter()
        .map(|l| VeilAclEvents::decode_raw_log(l.topics(), &l.data().data).expect("known event"))
        .collect()
}

/// The custom error a refused call was decoded to; panics on anything else.
pub fn refusal<T: std::fmt::Debug>(result: Result<T, Error>) -> VeilAclErrors {
    match result {
        Err(Error::Refused(e)) => e,
        other => panic!("expected a decoded refusal, got {other:?}"),
    }
}

/// Outcome of a call that must succeed.
pub fn ok(result: Result<TxOutcome, Error>) -> TxOutcome {
    result.unwrap_or_else(|e| panic!("transaction failed: {e}"))
}

/// Mines `n` empty blocks.
pub async fn mine(provider: &DynProvider, n: u64) {
    let _: serde_json::Value = provider
        .raw_request("anvil_mine".into(), (alloy::primitives::U256::from(n),))
        .await
        .expect("anvil_mine");
}
