//! A real EVM dev chain (anvil) on loopback for the end-to-end tests of the on-chain ACL: it
//! mines blocks on an interval, keeps its state in a file, and can be stopped and started again
//! on the same port with the same chain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::Address;
use alloy::providers::{DynProvider, Provider};
use alloy::signers::local::PrivateKeySigner;
use veil_contracts::{AclContract, http_provider, wallet_provider};

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
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contracts/node_modules/@foundry-rs")
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

/// An anvil (chain id 31337) on a fixed loopback port that mines a block every `block_time`
/// and keeps its state in `state_file`: [`DevChain::stop`] shuts it down (SIGTERM, so it
/// writes the state), [`DevChain::start`] brings the same chain back on the same port.
#[derive(Debug)]
pub struct DevChain {
    port: u16,
    block_time: Duration,
    state_file: PathBuf,
    instance: Option<AnvilInstance>,
    keys: Vec<PrivateKeySigner>,
}

impl DevChain {
    /// A fresh chain on a free port, its state kept in `dir`.
    pub fn new(dir: &Path, block_time: Duration) -> DevChain {
        let mut chain = DevChain {
            port: veil_testkit::free_port(),
            block_time,
            state_file: dir.join("anvil-state.json"),
            instance: None,
            keys: Vec::new(),
        };
        chain.start();
        chain
    }

    /// Starts anvil (again), loading the state file when it exists.
    pub fn start(&mut self) {
        assert!(self.instance.is_none(), "anvil is already running");
        let block_time = format!("{}", self.block_time.as_secs_f64());
        let state = self.state_file.display().to_string();
        let mut last = None;
        // The port may still be in the kernel's hands for a moment after a stop.
        for _ in 0..50 {
            match Anvil::at(anvil_path())
                .host("127.0.0.1")
                .port(self.port)
                .chain_id(31337)
                .args(["--block-time", &block_time, "--state", &state])
                .try_spawn()
            {
                Ok(instance) => {
                    self.keys = instance
                        .keys()
                        .iter()
                        .map(|k| PrivateKeySigner::from(k.clone()))
                        .collect();
                    self.instance = Some(instance);
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!("anvil did not start on port {}: {last:?}", self.port);
    }

    /// Shuts anvil down gracefully (it writes its state file on the way out).
    pub fn stop(&mut self) {
        drop(self.instance.take().expect("anvil is running"));
        assert!(
            self.state_file.is_file(),
            "anvil wrote no state file at {}",
            self.state_file.display()
        );
    }

    /// `http://127.0.0.1:PORT` (the same across restarts).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A read-only provider.
    pub fn provider(&self) -> DynProvider {
        http_provider(self.url().parse().expect("loopback URL"))
    }

    /// The signer of dev account `i`.
    pub fn signer(&self, i: usize) -> PrivateKeySigner {
        self.keys[i].clone()
    }

    /// Dev account `i`'s address.
    pub fn address(&self, i: usize) -> Address {
        self.keys[i].address()
    }

    /// The ACL contract at `contract`, used as dev account `i`.
    pub fn acl_as(&self, contract: Address, i: usize) -> AclContract {
        AclContract::new(
            contract,
            wallet_provider(self.url().parse().expect("loopback URL"), self.signer(i)),
        )
        .with_timeout(Duration::from_secs(30))
    }

    /// Deploys the ACL contract as dev account `i` (its first admin).
    pub async fn deploy(&self, i: usize) -> Address {
        let provider = wallet_provider(self.url().parse().expect("loopback URL"), self.signer(i));
        veil_contracts::deploy(&provider, vec![], 1, Duration::from_secs(30))
            .await
            .expect("deploy the ACL contract")
            .address
    }

    /// The chain head.
    pub async fn head(&self) -> u64 {
        self.provider()
            .get_block_number()
            .await
            .expect("eth_blockNumber")
    }
}
