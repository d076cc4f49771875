//! `veil acl` against a real anvil spawned on loopback: every command, wallets from a keystore and
//! from the dev-key variable, decoded refusals, and the CLI's output contract.

use std::path::{Path, PathBuf};

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::signers::local::PrivateKeySigner;
use serde_json::Value;

/// The anvil binary: `$VEIL_ANVIL`, or the one `npm ci` puts under `contracts/node_modules`.
fn anvil_path() -> PathBuf {
    if let Some(path) = std::env::var_os("VEIL_ANVIL") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
    assert!(
        path.is_file(),
        "anvil not found at {}: run scripts/test.sh, or `npm ci` in contracts/, or set VEIL_ANVIL",
        path.display()
    );
    path
}

fn anvil(chain_id: u64) -> AnvilInstance {
    let mut last = None;
    for _ in 0..10 {
        match Anvil::at(anvil_path())
            .host("127.0.0.1")
            .port(veil_testkit::free_port())
            .chain_id(chain_id)
            .try_spawn()
        {
            Ok(a) => return a,
            Err(e) => last = Some(e),
        }
    }
    panic!("anvil did not start: {last:?}");
}

fn key_hex(anvil: &AnvilInstance, i: usize) -> String {
    hex::encode(anvil.keys()[i].to_bytes())
}

fn addr(anvil: &AnvilInstance, i: usize) -> String {
    anvil.addresses()[i].to_checksum(None)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `veil acl …` with a clean VEIL_* environment plus `env`.
fn veil(anvil: &AnvilInstance, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_veil"));
    for var in [
        "VEIL_RPC_URL",
        "VEIL_ACL_CONTRACT",
        "VEIL_KEYSTORE",
        "VEIL_KEYSTORE_PASSWORD",
        "VEIL_DEV_PRIVATE_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("VEIL_RPC_URL", anvil.endpoint());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.arg("acl").args(args).output().expect("veil runs");
    Run {
        code: out.status.code().expect("exit status"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Asserts success with one line of JSON on stdout and nothing on stderr.
fn ok(anvil: &AnvilInstance, env: &[(&str, &str)], args: &[&str]) -> Value {
    let run = veil(anvil, env, args);
    assert_eq!(run.code, 0, "veil acl {args:?} failed: {}", run.stderr);
    assert!(run.stderr.is_empty(), "stderr: {}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    serde_json::from_str(&run.stdout).expect("JSON")
}

/// Asserts failure with `code`, empty stdout and one `veil: error:` line, returned.
fn fails(anvil: &AnvilInstance, env: &[(&str, &str)], args: &[&str], code: i32) -> String {
    let run = veil(anvil, env, args);
    assert_eq!(
        run.code, code,
        "veil acl {args:?}: {}{}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.is_empty(), "stdout: {}", run.stdout);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.starts_with("veil: error: "), "{}", run.stderr);
    run.stderr.trim_end().to_string()
}

/// `--contract ADDRESS` followed by `rest`.
fn with_contract<'a>(contract: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--contract", contract];
    args.extend_from_slice(rest);
    args
}

fn assert_tx(v: &Value) {
    let hash = v["tx_hash"].as_str().expect("tx_hash");
    assert!(hash.starts_with("0x") && hash.len() == 66, "{hash}");
    assert!(v["block"].as_u64().unwrap() > 0);
    assert!(v["gas_used"].as_u64().unwrap() > 21_000);
}

#[test]
fn every_command_with_the_dev_key() {
    let anvil = anvil(31337);
    let k0 = key_hex(&anvil, 0);
    let admin = [("VEIL_DEV_PRIVATE_KEY", k0.as_str())];
    let deployed = ok(&anvil, &admin, &["deploy"]);
    assert_tx(&deployed);
    assert_eq!(deployed["chain_id"], 31337);
    assert_eq!(deployed["deployer"], addr(&anvil, 0));
    let contract = deployed["contract"].as_str().unwrap().to_string();

    let (a1, miner, owner2) = (addr(&anvil, 1), addr(&anvil, 7), addr(&anvil, 4));
    let x1 = "11".repeat(32);
    let x2 = "22".repeat(32);
    let session = "0190b5d4-3c2e-7a01-8f00-1234567890ab";

    assert_tx(&ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["admin", "add", &a1]),
    ));
    let admins = ok(&anvil, &[], &with_contract(&contract, &["show", "admins"]));
    assert_eq!(admins["admins"].as_array().unwrap().len(), 2);
    assert_tx(&ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["admin", "remove", &a1]),
    ));

    let v = ok(
        &anvil,
        &admin,
        &with_contract(
            &contract,
            &[
                "miner",
                "register",
                &miner,
                "--x25519",
                &x1,
                "--metadata-uri",
                "ipfs://m",
            ],
        ),
    );
    assert_tx(&v);
    assert_eq!(v["from"], addr(&anvil, 0));
    // The miner rotates its own key.
    let k7 = key_hex(&anvil, 7);
    ok(
        &anvil,
        &[("VEIL_DEV_PRIVATE_KEY", k7.as_str())],
        &with_contract(&contract, &["miner", "rotate-key", "--x25519", &x2]),
    );
    let m = ok(&anvil, &[], &with_contract(&contract, &["show", &miner]));
    assert_eq!(m["registered"], true);
    assert_eq!(m["active"], true);
    assert_eq!(m["x25519"], x2);
    assert_eq!(m["metadata_uri"], "ipfs://m");

    ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["session", "register", session]),
    );
    ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["allow", session, &miner]),
    );
    let list = ok(&anvil, &[], &with_contract(&contract, &["list", session]));
    assert_eq!(list["miners"][0]["miner"], miner);
    assert_eq!(list["miners"][0]["allowed"], true);
    let s = ok(&anvil, &[], &with_contract(&contract, &["show", session]));
    assert_eq!(s["owner"], addr(&anvil, 0));
    assert_eq!(s["allowed_count"], 1);
    ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["revoke", session, &miner]),
    );
    assert_eq!(
        ok(&anvil, &[], &with_contract(&contract, &["list", session]))["miners"],
        Value::Array(vec![])
    );

    // Batches.
    let m8 = addr(&anvil, 8);
    ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["miner", "register", &m8, "--x25519", &x1]),
    );
    ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["allow", session, &miner, &m8]),
    );
    assert_eq!(
        ok(&anvil, &[], &with_contract(&contract, &["show", session]))["allowed_count"],
        2
    );
    ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["revoke", session, &miner, &m8]),
    );

    ok(
        &anvil,
        &admin,
        &with_contract(&contract, &["miner", "deactivate", &miner]),
    );
    assert_eq!(
        ok(&anvil, &[], &with_contract(&contract, &["show", &miner]))["active"],
        false
    );

    ok(
        &anvil,
        &admin,
        &with_contract(
            &contract,
            &["session", "transfer", session, "--to", &owner2],
        ),
    );
    let k4 = key_hex(&anvil, 4);
    ok(
        &anvil,
        &[("VEIL_DEV_PRIVATE_KEY", k4.as_str())],
        &with_contract(&contract, &["session", "close", session]),
    );
    let s = ok(&anvil, &[], &with_contract(&contract, &["show", session]));
    assert_eq!(s["closed"], true);
    assert_eq!(s["owner"], owner2);
    let unknown = ok(
        &anvil,
        &[],
        &with_contract(&contract, &["show", "0190b5d4-3c2e-7a01-8f00-000000000000"]),
    );
    assert_eq!(unknown["registered"], false);

    // Confirmations: anvil mines only on demand, so a second block must come from elsewhere.
    let env = [
        ("VEIL_DEV_PRIVATE_KEY", k0.as_str()),
        ("VEIL_ACL_CONTRACT", contract.as_str()),
    ];
    let line = fails(
        &anvil,
        &env,
        &[
            "--confirmations",
            "2",
            "--timeout",
            "2",
            "session",
            "register",
            "0190b5d4-3c2e-7a01-8f00-000000000001",
        ],
        1,
    );
    assert!(line.starts_with("veil: error: transaction: 0x"), "{line}");
    assert!(line.contains("not 2 blocks deep within 2s"), "{line}");
    let url = anvil.endpoint_url();
    let miner_thread = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use alloy::providers::Provider;
            let p = veil_contracts::http_provider(url);
            let _: serde_json::Value = p
                .raw_request("anvil_mine".into(), (alloy::primitives::U256::from(1),))
                .await
                .unwrap();
        });
    });
    let v = ok(
        &anvil,
        &env,
        &[
            "--confirmations",
            "2",
            "session",
            "register",
            "0190b5d4-3c2e-7a01-8f00-000000000002",
        ],
    );
    miner_thread.join().unwrap();
    assert_eq!(v["confirmations"], 2);
}

#[test]
fn refusals_are_decoded_and_do_not_disturb_the_next_transaction() {
    let anvil = anvil(31337);
    let k0 = key_hex(&anvil, 0);
    let k5 = key_hex(&anvil, 5);
    let admin = [("VEIL_DEV_PRIVATE_KEY", k0.as_str())];
    let stranger = [("VEIL_DEV_PRIVATE_KEY", k5.as_str())];
    let contract = ok(&anvil, &admin, &["deploy"])["contract"]
        .as_str()
        .unwrap()
        .to_string();
    let s5 = addr(&anvil, 5);

    let line = fails(
        &anvil,
        &stranger,
        &with_contract(&contract, &["admin", "add", &s5]),
        1,
    );
    assert_eq!(
        line,
        format!(
            "veil: error: contract: refused by the contract: {s5} is not an admin of the contract"
        )
    );
    // The same wallet's next transaction goes through.
    ok(
        &anvil,
        &stranger,
        &with_contract(
            &contract,
            &[
                "session",
                "register",
                "0190b5d4-3c2e-7a01-8f00-0000000000aa",
            ],
        ),
    );
    let line = fails(
        &anvil,
        &admin,
        &with_contract(
            &contract,
            &[
                "session",
                "register",
                "0190b5d4-3c2e-7a01-8f00-0000000000aa",
            ],
        ),
        1,
    );
    assert!(line.contains("is already registered"), "{line}");
    let line = fails(
        &anvil,
        &admin,
        &with_contract(&contract, &["admin", "remove", &addr(&anvil, 0)]),
        1,
    );
    assert!(line.contains("last admin"), "{line}");
    let line = fails(
        &anvil,
        &admin,
        &with_contract(
            &contract,
            &["allow", "0190b5d4-3c2e-7a01-8f00-0000000000aa", &s5],
        ),
        1,
    );
    assert!(line.contains("is not a registered miner"), "{line}");
}

#[test]
fn usage_errors_name_the_flag_and_never_echo_secrets() {
    let anvil = anvil(31337);
    let k0 = key_hex(&anvil, 0);
    let admin = [("VEIL_DEV_PRIVATE_KEY", k0.as_str())];

    let line = fails(&anvil, &[], &["deploy"], 2);
    assert!(line.contains("--keystore: a wallet is required"), "{line}");
    let line = fails(&anvil, &admin, &["admin", "add", &addr(&anvil, 1)], 2);
    assert!(line.contains("--contract: required"), "{line}");
    let line = fails(&anvil, &admin, &["admin", "add", "0x1234"], 2);
    assert!(line.contains("expected an address"), "{line}");
    let line = fails(&anvil, &admin, &["session", "register", "nope"], 2);
    assert!(line.contains("expected a hyphenated UUID"), "{line}");

    let bad_key = format!("{}zz", &k0[..62]);
    let line = fails(
        &anvil,
        &[("VEIL_DEV_PRIVATE_KEY", bad_key.as_str())],
        &["deploy"],
        2,
    );
    assert!(line.contains("VEIL_DEV_PRIVATE_KEY"), "{line}");
    assert!(!line.contains(&k0[..62]), "the key is not echoed: {line}");

    let line = fails(
        &anvil,
        &admin,
        &[
            "--contract",
            &addr(&anvil, 3),
            "miner",
            "register",
            &addr(&anvil, 3),
            "--x25519",
            "abcd",
        ],
        2,
    );
    assert!(
        line.contains("--x25519: expected 64 hex characters"),
        "{line}"
    );

    // Nothing listens there: a clear RPC error, with status 1.
    let dead = format!(
        "http://127.0.0.1:{}/secret-api-key",
        veil_testkit::free_port()
    );
    let line = fails(
        &anvil,
        &admin,
        &[
            "--rpc-url",
            &dead,
            "--contract",
            &addr(&anvil, 3),
            "admin",
            "add",
            &addr(&anvil, 1),
        ],
        1,
    );
    assert!(line.contains("--rpc-url"), "{line}");
    assert!(
        !line.contains("secret-api-key"),
        "the URL path is redacted: {line}"
    );
}

#[test]
fn the_dev_key_is_refused_on_other_chains() {
    let anvil = anvil(5);
    let k0 = key_hex(&anvil, 0);
    let admin = [("VEIL_DEV_PRIVATE_KEY", k0.as_str())];
    let line = fails(&anvil, &admin, &["deploy"], 2);
    assert!(line.contains("local dev chains"), "{line}");
    assert!(line.contains("chain is 5"), "{line}");
    let v = ok(&anvil, &admin, &["--allow-dev-key-on-any-chain", "deploy"]);
    assert_eq!(v["chain_id"], 5);
}

#[test]
fn a_keystore_wallet_signs_with_its_password() {
    let anvil = anvil(31337);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = alloy::signers::k256::elliptic_curve::rand_core::OsRng;
    let secret = anvil.keys()[0].to_bytes();
    let (signer, _) = PrivateKeySigner::encrypt_keystore(
        dir.path(),
        &mut rng,
        secret,
        "correct horse",
        Some("admin.json"),
    )
    .unwrap();
    assert_eq!(signer.address(), anvil.addresses()[0]);
    let keystore = dir.path().join("admin.json");
    let keystore = keystore.to_str().unwrap();

    let v = ok(
        &anvil,
        &[("VEIL_KEYSTORE_PASSWORD", "correct horse")],
        &["--keystore", keystore, "deploy"],
    );
    assert_eq!(v["deployer"], addr(&anvil, 0));

    let line = fails(
        &anvil,
        &[("VEIL_KEYSTORE_PASSWORD", "wrong horse")],
        &["--keystore", keystore, "deploy"],
        2,
    );
    assert!(line.contains("--keystore: cannot decrypt"), "{line}");
    assert!(!line.contains("wrong horse"), "{line}");

    // Without a password and without a terminal the command refuses rather than hangs.
    let line = fails(&anvil, &[], &["--keystore", keystore, "deploy"], 2);
    assert!(line.contains("--keystore: no password"), "{line}");

    // Both wallets at once is ambiguous.
    let k0 = key_hex(&anvil, 0);
    let line = fails(
        &anvil,
        &[
            ("VEIL_KEYSTORE_PASSWORD", "correct horse"),
            ("VEIL_DEV_PRIVATE_KEY", k0.as_str()),
        ],
        &["--keystore", keystore, "deploy"],
        2,
    );
    assert!(line.contains("use one wallet"), "{line}");
}
