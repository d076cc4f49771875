//! Protocol §6 against an independent wallet library: `eth-account` from PyPI.
//!
//! For every message type of §6 (`KeyRequest` with scope 1 and with scope 2; `SubmitTask` and
//! `TaskResult` also with UTF-8 strings), under chain 31337 with a contract and under the
//! zero-address domain, `eth_account/sign_verify.py` (types transcribed
//! from the spec) signs the values chosen here and recovers the Rust side's signatures:
//!
//! 1. eth-account's signature, parsed into [`Signed<M>`], recovers eth-account's address here, and
//!    eth-account's digest, domain separator and struct hash equal ours;
//! 2. a signature from [`Signed::sign_sync`] recovers the Rust signer in eth-account;
//! 3. changing any one field of a message (here, or one field in eth-account) recovers someone else.
//!
//! The Python side runs with `python3` (`PYTHON` overrides). A missing eth-account fails the
//! test: `scripts/test.sh` installs it.

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use alloy_primitives::{Address, B256, address, keccak256};
use alloy_signer_local::PrivateKeySigner;
use alloy_sol_types::SolStruct;
use serde_json::{Value, json};
use uuid::Uuid;
use veil_api::eip712::{
    KIND_DEDICATED, KIND_POOLED, KeyRequest, Message, MinerLogin, OpenSession, SubmitTask,
    TaskResult,
};
use veil_api::wire::{Hex32, Nonce};
use veil_api::{Domain, Signed};

/// The eth-account release `scripts/test.sh` pins; keep the two in step.
const ETH_ACCOUNT_VERSION: &str = "0.14.0";

/// A message of any §6 type.
#[derive(Debug, Clone)]
enum AnyMessage {
    Open(OpenSession),
    Key(KeyRequest),
    Submit(SubmitTask),
    Result(TaskResult),
    Login(MinerLogin),
}

/// Runs `$body` with `$m` bound to the inner message, whatever its type.
macro_rules! each {
    ($any:expr, $m:ident => $body:expr) => {
        match $any {
            AnyMessage::Open($m) => $body,
            AnyMessage::Key($m) => $body,
            AnyMessage::Submit($m) => $body,
            AnyMessage::Result($m) => $body,
            AnyMessage::Login($m) => $body,
        }
    };
}

fn name_of<M: Message>(_: &M) -> &'static str {
    M::NAME
}

fn struct_hash_of<M: Message>(m: &M) -> B256 {
    m.to_sol().eip712_hash_struct()
}

fn rust_sign<M: Message>(m: &M, domain: &Domain, signer: &PrivateKeySigner) -> Value {
    let signed = Signed::sign_sync(m.clone(), domain, signer).expect("a local key signs");
    serde_json::to_value(signed.signature).unwrap()
}

/// Parses `{"message", "signature"}` into a [`Signed<M>`], then recovers and verifies it.
fn parse_and_recover<M: Message>(m: &M, domain: &Domain, signature: &Value) -> Address {
    let json = json!({"message": m, "signature": signature});
    let signed: Signed<M> = serde_json::from_value(json).expect("eth-account's signature parses");
    let recovered = signed
        .recover(domain)
        .expect("eth-account's signature is well formed");
    if let Some(expires_at) = m.expires_at() {
        let now = expires_at - 60;
        assert_eq!(signed.verify(domain, now).unwrap(), recovered);
    }
    recovered
}

impl AnyMessage {
    fn name(&self) -> &'static str {
        each!(self, m => name_of(m))
    }
    fn json(&self) -> Value {
        each!(self, m => serde_json::to_value(m).unwrap())
    }
    fn signing_hash(&self, domain: &Domain) -> B256 {
        each!(self, m => m.signing_hash(domain))
    }
    fn struct_hash(&self) -> B256 {
        each!(self, m => struct_hash_of(m))
    }
    fn sign(&self, domain: &Domain, signer: &PrivateKeySigner) -> Value {
        each!(self, m => rust_sign(m, domain, signer))
    }
    fn recover(&self, domain: &Domain, signature: &Value) -> Address {
        each!(self, m => parse_and_recover(m, domain, signature))
    }

    /// The message with each of its fields changed in turn, labelled by field.
    fn mutations(&self) -> Vec<(&'static str, AnyMessage)> {
        fn flip16(u: Uuid) -> Uuid {
            let mut b = *u.as_bytes();
            b[15] ^= 1;
            Uuid::from_bytes(b)
        }
        fn flip32(h: Hex32) -> Hex32 {
            let mut b = h.0;
            b[0] ^= 0x80;
            Hex32(b)
        }
        fn flip_nonce(n: Nonce) -> Nonce {
            let mut b = n.0;
            b[7] ^= 4;
            Nonce(b)
        }
        fn later(t: u64) -> u64 {
            if t == u64::MAX { t - 1 } else { t + 1 }
        }
        let mut out = Vec::new();
        macro_rules! change {
            ($variant:ident, $m:expr, $field:literal, |$x:ident| $edit:expr) => {{
                let mut $x = $m.clone();
                $edit;
                out.push(($field, AnyMessage::$variant($x)));
            }};
        }
        match self {
            AnyMessage::Open(m) => {
                change!(Open, m, "sessionId", |x| x.session_id =
                    flip16(x.session_id));
                change!(Open, m, "kind", |x| x.kind = 3 - x.kind);
                change!(Open, m, "expiresAt", |x| x.expires_at = later(x.expires_at));
                change!(Open, m, "nonce", |x| x.nonce = flip_nonce(x.nonce));
            }
            AnyMessage::Key(m) => {
                change!(Key, m, "sessionId", |x| x.session_id = flip16(x.session_id));
                change!(Key, m, "taskId", |x| x.task_id = flip16(x.task_id));
                change!(Key, m, "scope", |x| x.scope = 3 - x.scope);
                change!(Key, m, "keyVersion", |x| x.key_version ^= 1);
                change!(Key, m, "recipient", |x| x.recipient = flip32(x.recipient));
                change!(Key, m, "expiresAt", |x| x.expires_at = later(x.expires_at));
                change!(Key, m, "nonce", |x| x.nonce = flip_nonce(x.nonce));
            }
            AnyMessage::Submit(m) => {
                change!(Submit, m, "sessionId", |x| x.session_id =
                    flip16(x.session_id));
                change!(Submit, m, "taskId", |x| x.task_id = flip16(x.task_id));
                change!(Submit, m, "promptHash", |x| x.prompt_hash =
                    flip32(x.prompt_hash));
                change!(Submit, m, "promptUrn", |x| x.prompt_urn.push('x'));
                change!(Submit, m, "model", |x| x.model.push('x'));
                change!(Submit, m, "expiresAt", |x| x.expires_at =
                    later(x.expires_at));
                change!(Submit, m, "nonce", |x| x.nonce = flip_nonce(x.nonce));
                // The two strings swapped: each is hashed into its own slot.
                change!(Submit, m, "promptUrn<->model", |x| std::mem::swap(
                    &mut x.prompt_urn,
                    &mut x.model
                ));
            }
            AnyMessage::Result(m) => {
                change!(Result, m, "sessionId", |x| x.session_id =
                    flip16(x.session_id));
                change!(Result, m, "taskId", |x| x.task_id = flip16(x.task_id));
                change!(Result, m, "promptHash", |x| x.prompt_hash =
                    flip32(x.prompt_hash));
                change!(Result, m, "resultHash", |x| x.result_hash =
                    flip32(x.result_hash));
                change!(Result, m, "resultUrn", |x| x.result_urn.push('x'));
                // The two hashes swapped: each sits in its own slot.
                change!(Result, m, "promptHash<->resultHash", |x| std::mem::swap(
                    &mut x.prompt_hash,
                    &mut x.result_hash
                ));
            }
            AnyMessage::Login(m) => {
                change!(Login, m, "recipient", |x| x.recipient = flip32(x.recipient));
                change!(Login, m, "expiresAt", |x| x.expires_at =
                    later(x.expires_at));
                change!(Login, m, "nonce", |x| x.nonce = flip_nonce(x.nonce));
            }
        }
        out
    }
}

fn uuid(s: &str) -> Uuid {
    s.parse().unwrap()
}

fn hex32(s: &str) -> Hex32 {
    s.parse().unwrap()
}

fn nonce(s: &str) -> Nonce {
    s.parse().unwrap()
}

/// One or more messages of every §6 type, with edge values: the largest integers, the nil task id
/// of scope 1, an empty string, UTF-8 strings of several byte lengths.
fn messages() -> Vec<AnyMessage> {
    let session = uuid("0190b5d4-7c1e-7a3b-9f12-3c4d5e6f7a8b");
    let task = uuid("0190b5d4-8000-7abc-8def-0123456789ab");
    let recipient = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    let prompt_hash = hex32("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    let result_hash = hex32("5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef");
    vec![
        AnyMessage::Open(OpenSession {
            session_id: session,
            kind: KIND_DEDICATED,
            expires_at: 1_750_000_300,
            nonce: nonce("00112233445566778899aabbccddeeff"),
        }),
        AnyMessage::Open(OpenSession {
            session_id: uuid("ffffffff-ffff-ffff-ffff-ffffffffffff"),
            kind: KIND_POOLED,
            expires_at: u64::MAX,
            nonce: nonce("ffffffffffffffffffffffffffffffff"),
        }),
        AnyMessage::Key(KeyRequest {
            session_id: session,
            task_id: Uuid::nil(),
            scope: 1,
            key_version: 1,
            recipient,
            expires_at: 1_750_000_300,
            nonce: nonce("0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
        }),
        AnyMessage::Key(KeyRequest {
            session_id: session,
            task_id: task,
            scope: 2,
            key_version: u32::MAX,
            recipient,
            expires_at: u64::MAX,
            nonce: nonce("00000000000000000000000000000001"),
        }),
        AnyMessage::Submit(SubmitTask {
            session_id: session,
            task_id: task,
            prompt_hash,
            prompt_urn: "urn:blob:v1:s3:minio:veil-blobs:sessions/0190b5d4/prompt.blob".into(),
            model: "llama-3.1-8b-instruct".into(),
            expires_at: 1_750_000_300,
            nonce: nonce("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"),
        }),
        // UTF-8 (2-, 3- and 4-byte characters) pins string hashing to the UTF-8 bytes; an empty
        // promptUrn pins keccak256("").
        AnyMessage::Submit(SubmitTask {
            session_id: session,
            task_id: task,
            prompt_hash,
            prompt_urn: String::new(),
            model: "modèle-模型-🦙".into(),
            expires_at: 1_750_000_300,
            nonce: nonce("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf"),
        }),
        AnyMessage::Result(TaskResult {
            session_id: session,
            task_id: task,
            prompt_hash,
            result_hash,
            result_urn: "urn:blob:v1:s3:minio:veil-blobs:sessions/0190b5d4/result.blob".into(),
        }),
        AnyMessage::Result(TaskResult {
            session_id: session,
            task_id: task,
            prompt_hash,
            result_hash,
            result_urn: "urn:blob:v1:fs:local:résultats:Ünïcödé/😀".into(),
        }),
        AnyMessage::Login(MinerLogin {
            recipient,
            expires_at: 1_750_000_300,
            nonce: nonce("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf"),
        }),
    ]
}

fn domains() -> [Domain; 2] {
    [
        Domain {
            chain_id: 31337,
            verifying_contract: address!("5FbDB2315678afecb367f032d93F642f64180aa3"),
        },
        Domain::without_contract(31337),
    ]
}

struct Case {
    label: String,
    domain: Domain,
    message: AnyMessage,
    /// The key eth-account signs with.
    python_key: B256,
    /// The Rust side's signature over `message` under `domain`.
    rust_signature: Value,
    /// `message` with one field changed, sent for eth-account to recover `rust_signature` over.
    tampered: (&'static str, AnyMessage),
}

struct Run {
    cases: Vec<Case>,
    rust_signer: PrivateKeySigner,
    results: Vec<Value>,
}

fn rust_signer() -> PrivateKeySigner {
    PrivateKeySigner::from_bytes(&keccak256("veil eip712_eth_account rust signer")).unwrap()
}

fn build_cases(signer: &PrivateKeySigner) -> Vec<Case> {
    let mut cases = Vec::new();
    for domain in domains() {
        for message in messages() {
            let i = cases.len();
            let label = format!(
                "case {i}: {} under chain {} / {}",
                message.name(),
                domain.chain_id,
                domain.verifying_contract
            );
            let mutations = message.mutations();
            let tampered = mutations[i % mutations.len()].clone();
            cases.push(Case {
                label,
                domain,
                rust_signature: message.sign(&domain, signer),
                python_key: keccak256(format!("veil eip712_eth_account python wallet {i}")),
                message,
                tampered,
            });
        }
    }
    cases
}

/// Runs `sign_verify.py` once over every case; the three tests share the answer.
fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let rust_signer = rust_signer();
        let cases = build_cases(&rust_signer);
        let request = json!({
            "cases": cases.iter().map(|c| json!({
                "primaryType": c.message.name(),
                "domain": c.domain,
                "message": c.message.json(),
                "privateKey": alloy_primitives::hex::encode_prefixed(c.python_key),
                "rustSignature": c.rust_signature,
                "tamperedMessage": c.tampered.1.json(),
            })).collect::<Vec<_>>(),
        });
        let results = python(&request);
        Run {
            cases,
            rust_signer,
            results,
        }
    })
}

fn python(request: &Value) -> Vec<Value> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/eth_account/sign_verify.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let install = format!(
        "run scripts/test.sh, which installs it, or `{python} -m pip install eth-account=={ETH_ACCOUNT_VERSION}`"
    );
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{python}` ({e}); this test needs Python with eth-account: {install}"
            )
        });
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(&serde_json::to_vec(request).unwrap())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!("eth-account is not installed for `{python}`: {install}\n{stderr}");
    }
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stderr}",
        script.display(),
        out.status
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("the script writes JSON");
    eprintln!(
        "eth-account {} (scripts/test.sh pins {ETH_ACCOUNT_VERSION})",
        answer["ethAccountVersion"]
    );
    let results = answer["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), request["cases"].as_array().unwrap().len());
    results
}

fn hash(v: &Value) -> B256 {
    v.as_str().unwrap().parse().unwrap()
}

fn addr(v: &Value) -> Address {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn eth_account_signatures_recover_in_rust_and_its_hashes_match() {
    let run = run();
    for (case, r) in run.cases.iter().zip(&run.results) {
        let label = &case.label;
        let expected = PrivateKeySigner::from_bytes(&case.python_key)
            .unwrap()
            .address();
        assert_eq!(addr(&r["address"]), expected, "{label}: key to address");
        assert_eq!(
            hash(&r["domainSeparator"]),
            case.domain.to_eip712().separator(),
            "{label}: domain separator"
        );
        assert_eq!(
            hash(&r["structHash"]),
            case.message.struct_hash(),
            "{label}: hashStruct"
        );
        assert_eq!(
            hash(&r["digest"]),
            case.message.signing_hash(&case.domain),
            "{label}: digest"
        );
        assert_eq!(
            case.message.recover(&case.domain, &r["signature"]),
            expected,
            "{label}: recovering eth-account's signature"
        );
    }
}

#[test]
fn rust_signatures_recover_in_eth_account() {
    let run = run();
    let want = run.rust_signer.address();
    for (case, r) in run.cases.iter().zip(&run.results) {
        assert_eq!(addr(&r["recoveredRust"]), want, "{}", case.label);
        assert_ne!(
            addr(&r["recoveredTampered"]),
            want,
            "{}: eth-account recovered the Rust signer after {} changed",
            case.label,
            case.tampered.0
        );
    }
}

#[test]
fn a_changed_field_recovers_someone_else() {
    let run = run();
    let mut checked = 0;
    for (case, r) in run.cases.iter().zip(&run.results) {
        let signer = addr(&r["address"]);
        for (field, changed) in case.message.mutations() {
            let recovered = changed.recover(&case.domain, &r["signature"]);
            assert_ne!(recovered, signer, "{}: {field} changed", case.label);
            checked += 1;
        }
        // The same message under the other domain, and under another chain id.
        for other in domains()
            .into_iter()
            .chain([Domain {
                chain_id: 1,
                ..case.domain
            }])
            .filter(|d| *d != case.domain)
        {
            let recovered = case.message.recover(&other, &r["signature"]);
            assert_ne!(recovered, signer, "{}: under {other:?}", case.label);
        }
    }
    assert!(checked >= 50, "only {checked} mutations checked");
}
