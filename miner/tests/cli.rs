//! The `veil-miner` binary: configuration errors, the identity file, `hash-model`, model errors,
//! and a graceful stop on SIGTERM against a small stand-in for the router's miner API. Serving
//! completions through a real router is tested in the top-level `tests/` (miner_bin.rs).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use veil_api::eip712::Domain;
use veil_api::miner::{LoginRequest, LoginResponse, MinerConfig};
use veil_api::routes;

const BIN: &str = env!("CARGO_BIN_EXE_veil-miner");
/// The first anvil account's well-known private key (a public dev key, never a real wallet).
const DEV_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// The binary with a clean environment (no `VEIL_MINER_*` of the caller's) and `args`.
fn miner(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DEV_KEY", DEV_KEY)
        .args(args)
        .stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    miner(args).output().expect("runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const BASE: [&str; 6] = [
    "--router-url",
    "http://127.0.0.1:9",
    "--dev-key-env",
    "DEV_KEY",
    "--engine",
    "instant",
];

fn with_base<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    BASE.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn config_errors_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--engine",
                "instant",
                "--dev-key-env",
                "DEV_KEY",
                "--model",
                "m",
            ],
            "router_url",
        ),
        (with_base(&["--model", "m", "--device", "cuda"]), "device"),
        (with_base(&[]), "models"),
        (
            with_base(&["--model", "m", "--concurrency", "0"]),
            "concurrency",
        ),
        (
            with_base(&["--model", "m", "--chain-id", "1"]),
            "dev_key_env",
        ),
        (
            vec![
                "--router-url",
                "http://127.0.0.1:9",
                "--engine",
                "instant",
                "--model",
                "m",
            ],
            "keystore",
        ),
    ];
    for (args, setting) in cases {
        let o = run(&[&args[..], &["print-config"]].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("config: {setting}: ")),
            "{args:?}: {}",
            stderr(&o)
        );
    }

    // Unknown keys and bad values in the file are refused, naming the key.
    let file = dir.path().join("miner.toml");
    for (text, word) in [
        ("router_urll = [\"http://x:1\"]\n", "router_urll"),
        ("concurrency = \"many\"\n", "concurrency"),
    ] {
        std::fs::write(&file, text).unwrap();
        let o = run(&["--config", file.to_str().unwrap(), "print-config"]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("config: --config: ") && e.contains(word), "{e}");
    }

    // A valid file: print-config shows the settings and no secret.
    std::fs::write(
        &file,
        "router_url = [\"http://127.0.0.1:9\", \"http://127.0.0.1:10\"]\nengine = \"instant\"\n\
         dev_key_env = \"DEV_KEY\"\nmodels = [\"m\"]\nconcurrency = 3\n",
    )
    .unwrap();
    let o = run(&["--config", file.to_str().unwrap(), "print-config"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("concurrency: 3") && out.contains("http://127.0.0.1:10"),
        "{out}"
    );
    assert!(out.contains("DevKeyEnv(\n        \"DEV_KEY\""), "{out}");
    assert!(!out.contains(DEV_KEY), "no secret in print-config: {out}");
}

#[test]
fn identity_file_is_created_private_reused_and_refused_when_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap(), "show-identity"];
    let first = run(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    let public = stdout(&first).trim().to_string();
    assert_eq!(public.len(), 64, "{public}");
    let path = data.join("identity.key");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let second = run(&args);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(
        stdout(&second).trim(),
        public,
        "the same identity on the second start"
    );

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = run(&args);
    assert_eq!(refused.status.code(), Some(2));
    let e = stderr(&refused);
    assert!(
        e.contains("config: identity_file: ") && e.contains("644"),
        "{e}"
    );

    // Serving refuses it too, before anything else happens.
    let o = run(&with_base(&[
        "--model",
        "m",
        "--identity-file",
        path.to_str().unwrap(),
    ]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("identity_file"), "{}", stderr(&o));
}

fn hash(path: &Path) -> String {
    let o = run(&["hash-model", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o).trim().to_string()
}

#[test]
fn hash_model_is_stable_reproducible_and_changes_with_a_byte() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model dir");
    std::fs::create_dir_all(model.join("tokenizer")).unwrap();
    std::fs::write(model.join("config.json"), b"{\"layers\": 2}").unwrap();
    std::fs::write(model.join("model.safetensors"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(model.join("tokenizer/vocab.txt"), b"a\nb\nc\n").unwrap();

    let h = hash(&model);
    assert_eq!(h.len(), 64);
    assert_eq!(hash(&model), h, "stable");

    // The documented recipe with standard tools gives the same digest.
    let shell = Command::new("sh")
        .arg("-c")
        .arg(
            "cd \"$1\" && find -L . -type f -printf '%P\\0' | LC_ALL=C sort -z \
             | xargs -0 sha256sum -- | sha256sum",
        )
        .arg("sh")
        .arg(&model)
        .output()
        .unwrap();
    assert!(shell.status.success());
    assert_eq!(stdout(&shell).split_whitespace().next(), Some(h.as_str()));

    // A single file hashes like sha256sum.
    let file = model.join("config.json");
    let shell = Command::new("sha256sum").arg(&file).output().unwrap();
    assert_eq!(
        stdout(&shell).split_whitespace().next(),
        Some(hash(&file).as_str())
    );

    // One byte changed anywhere changes the hash; so does a renamed file.
    let weights = model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[1 << 20] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let changed = hash(&model);
    assert_ne!(changed, h);
    std::fs::rename(model.join("config.json"), model.join("config2.json")).unwrap();
    assert_ne!(hash(&model), changed);
}

#[test]
fn missing_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.gguf");
    let o = run(&["hash-model", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("absent.gguf") && e.contains("no such file"),
        "{e}"
    );

    // Serving: refused at start, naming the model and its path, before any router is contacted.
    let data = dir.path().join("data");
    let o = run(&with_base(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--model",
        &format!("tiny={}", missing.display()),
    ]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("config: models: tiny: ")
            && e.contains("absent.gguf")
            && e.contains("no such file"),
        "{e}"
    );
}

/// A stand-in router: config, login (checking the signature) and empty long-polls.
async fn stand_in_router() -> String {
    fn domain() -> Domain {
        Domain::without_contract(31337)
    }
    async fn login(Json(req): Json<LoginRequest>) -> Response {
        let now = veil_miner::sign::unix_now();
        match req.login.verify(&domain(), now) {
            Ok(addr) => Json(LoginResponse {
                token: "token".into(),
                miner: addr.to_checksum(None),
                expires_at: now + 3600,
            })
            .into_response(),
            Err(_) => StatusCode::UNAUTHORIZED.into_response(),
        }
    }
    let app = axum::Router::new()
        .route(
            routes::MINER_CONFIG,
            get(|| async {
                Json(MinerConfig {
                    protocol_version: 1,
                    domain: domain(),
                    lease_ttl_ms: 3_000,
                    max_wait_ms: 1_000,
                })
            }),
        )
        .route(routes::MINER_LOGIN, post(login))
        .route(
            routes::MINER_LEASE,
            post(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                StatusCode::NO_CONTENT
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Reads `child`'s stderr until a line contains `needle` (60 s at most): whether it came, and
/// the lines read.
async fn wait_for_line(
    child: &mut std::process::Child,
    needle: &'static str,
) -> (bool, Vec<String>) {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    tokio::task::spawn_blocking(move || {
        let mut log = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
            let done = line.contains(needle);
            log.push(line);
            if done {
                return (true, log);
            }
        }
        (false, log)
    })
    .await
    .unwrap()
}

/// Stops `child` with SIGTERM and returns its output.
async fn terminate(child: std::process::Child) -> Output {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_with_a_summary() {
    let url = stand_in_router().await;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    std::fs::write(&model, b"tiny").unwrap();
    let data = dir.path().join("data");
    let mut child = miner(&[
        "--router-url",
        "http://127.0.0.1:9",
        "--router-url",
        &url,
        "--dev-key-env",
        "DEV_KEY",
        "--engine",
        "instant",
        "--model",
        &format!("tiny={}", model.display()),
        "--data-dir",
        data.to_str().unwrap(),
        "--lease-wait-ms",
        "500",
        "--log-format",
        "json",
    ])
    .env("VEIL_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();

    // Wait for the login (after the first, unreachable router was given up).
    let logged_in = wait_for_line(&mut child, "logged in").await;
    assert!(logged_in.0, "{}", logged_in.1.join("\n"));
    let log = logged_in.1.join("\n");
    assert!(log.contains("trying the next one"), "{log}");
    assert!(
        log.contains("\"sha256\""),
        "JSON logs carry the model hash: {log}"
    );
    assert!(!log.contains(DEV_KEY), "no secret in the logs");

    let out = terminate(child).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out).trim(),
        "veil-miner stopped: leased 0, completed 0, duplicates 0, failed 0, released 0, lost 0, errored 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keystore_wallet_logs_in_with_its_password_only() {
    let url = stand_in_router().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = alloy_signer::k256::elliptic_curve::rand_core::OsRng;
    let (signer, _) = alloy_signer_local::PrivateKeySigner::encrypt_keystore(
        dir.path(),
        &mut rng,
        [7u8; 32],
        "correct horse",
        Some("miner.json"),
    )
    .unwrap();
    let keystore = dir.path().join("miner.json");
    let data = dir.path().join("data");
    let args = [
        "--router-url",
        &url,
        "--keystore",
        keystore.to_str().unwrap(),
        "--engine",
        "instant",
        "--model",
        "m",
        "--data-dir",
        data.to_str().unwrap(),
    ];

    // A wrong password: refused before anything starts, the setting named, the password nowhere.
    let o = miner(&args)
        .env("VEIL_MINER_KEYSTORE_PASSWORD", "wrong horse")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("config: keystore: ") && e.contains("cannot decrypt"),
        "{e}"
    );
    assert!(!e.contains("horse"), "{e}");

    // No password and no terminal to ask on: refused, nothing waits for input.
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no password"), "{}", stderr(&o));

    // The right password: the miner logs in as the keystore's address.
    let mut child = miner(&args)
        .env("VEIL_MINER_KEYSTORE_PASSWORD", "correct horse")
        .env("VEIL_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (logged_in, log) = wait_for_line(&mut child, "logged in").await;
    let log = log.join("\n");
    assert!(logged_in, "{log}");
    assert!(
        log.contains(&signer.address().to_checksum(None)),
        "logged in as the keystore's address: {log}"
    );
    assert!(!log.contains("horse"), "no password in the logs: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "no terminal colours when stderr is not a terminal: {log:?}"
    );
    let out = terminate(child).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
