//! `veil session`, `veil complete` and `veil task` as a subprocess, against a router and a
//! miner running in this test process.

mod support;

use std::path::Path;

use alloy::signers::local::PrivateKeySigner;
use serde_json::Value;
use support::{Env, expected};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `veil` with a clean VEIL_* environment plus `env`, off the async runtime.
async fn veil(env: &[(&str, &str)], args: &[&str], stdin: &str) -> Run {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_string();
    tokio::task::spawn_blocking(move || {
        let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_veil"));
        for (k, _) in std::env::vars() {
            if k.starts_with("VEIL_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd
            .args(&args)
            .write_stdin(stdin)
            .output()
            .expect("veil runs");
        Run {
            code: out.status.code().expect("exit status"),
            stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
            stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
        }
    })
    .await
    .unwrap()
}

/// Runs `veil` with `parts` one after the other, then `base` (the router and the wallet).
async fn veil_as(base: &[&str], parts: &[&[&str]], stdin: &str) -> Run {
    veil(&[], &[parts, &[base]].concat().concat(), stdin).await
}

fn ok(run: &Run) -> &str {
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert!(run.stderr.is_empty(), "stderr: {}", run.stderr);
    &run.stdout
}

fn fails(run: &Run, code: i32) -> &str {
    assert_eq!(
        run.code, code,
        "stdout: {} stderr: {}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.is_empty(), "stdout: {}", run.stdout);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.starts_with("veil: error: "), "{}", run.stderr);
    &run.stderr
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn key_file(dir: &Path, wallet: &PrivateKeySigner) -> String {
    let path = dir.join("wallet.key");
    std::fs::write(&path, format!("0x{}\n", hex::encode(wallet.to_bytes()))).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_completions_and_tasks_from_the_command_line() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let wallet = PrivateKeySigner::random();
    let secret_hex = hex::encode(wallet.to_bytes());
    let key = key_file(dir.path(), &wallet);
    let base = [
        "--router",
        env.url.as_str(),
        "--private-key-file",
        key.as_str(),
    ];
    let mut all_output = String::new();

    // session open (JSON), then show (text and JSON).
    let r = veil_as(
        &base,
        &[&["session", "open", "--ttl", "3600", "--json"]],
        "",
    )
    .await;
    let opened = json(ok(&r));
    all_output.push_str(&r.stdout);
    let sid = opened["session_id"].as_str().unwrap().to_string();
    assert_eq!(opened["owner"], wallet.address().to_checksum(None));
    assert_eq!(opened["kind"], "dedicated");
    assert!(opened["expires_at_ms"].is_i64());

    let r = veil_as(&base, &[&["session", "show", &sid]], "").await;
    let text = ok(&r).to_string();
    all_output.push_str(&text);
    assert!(text.starts_with(&format!("session {sid}\n")), "{text}");
    assert!(text.contains("owner"), "{text}");

    // complete --json with the prompt as an argument.
    let complete = [
        "complete",
        "--session",
        &sid,
        "--model",
        "tiny",
        "--max-tokens",
        "6",
        "--seed",
        "3",
    ];
    let r = veil_as(&base, &[&complete, &["--json", "hello cli"]], "").await;
    let done = json(ok(&r));
    all_output.push_str(&r.stdout);
    let want = expected(&env.engine, "hello cli", 6, 3);
    assert_eq!(done["text"], want.as_str());
    assert_eq!(done["session_id"], sid.as_str());
    assert_eq!(done["miner"], env.miner_address.to_checksum(None));
    assert_eq!(done["key_version"], 1);
    assert_eq!(done["usage"]["completion_tokens"], 6);
    let task_id = done["task_id"].as_str().unwrap().to_string();

    // The prompt from stdin, streamed, as text: the same answer.
    let r = veil_as(&base, &[&complete, &["--stream"]], "hello cli\n").await;
    assert_eq!(ok(&r), format!("{want}\n"));

    // Streamed as JSON lines: deltas, then the verified summary.
    let r = veil_as(
        &base,
        &[&complete, &["--stream", "--json", "-"]],
        "hello cli",
    )
    .await;
    let lines: Vec<Value> = ok(&r).lines().map(json).collect();
    let (last, deltas) = lines.split_last().unwrap();
    let text: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, want);
    assert_eq!(last["done"], true);
    assert_eq!(last["miner"], env.miner_address.to_checksum(None));

    // task show and task result.
    let task = ["--session", &sid, &task_id];
    let r = veil_as(&base, &[&["task", "show"], &task, &["--json"]], "").await;
    let t = json(ok(&r));
    all_output.push_str(&r.stdout);
    assert_eq!(t["state"], "completed");
    assert_eq!(t["task_id"], task_id.as_str());

    let r = veil_as(&base, &[&["task", "show"], &task], "").await;
    let text = ok(&r).to_string();
    assert!(text.contains("state     completed"), "{text}");
    assert!(
        text.contains(&env.miner_address.to_checksum(None)),
        "{text}"
    );

    let r = veil_as(&base, &[&["task", "result"], &task], "").await;
    assert_eq!(ok(&r), format!("{want}\n"));

    // Another wallet (from VEIL_PRIVATE_KEY) is not the owner.
    let stranger = hex::encode(PrivateKeySigner::random().to_bytes());
    let r = veil(
        &[("VEIL_PRIVATE_KEY", stranger.as_str())],
        &["session", "show", &sid, "--router", &env.url],
        "",
    )
    .await;
    let line = fails(&r, 1);
    assert!(
        line.starts_with("veil: error: wallet: [not_owner]"),
        "{line}"
    );
    assert!(!line.contains(&stranger), "{line}");

    // session close, then the session refuses.
    let r = veil_as(&base, &[&["session", "close", &sid, "--json"]], "").await;
    let closed = json(ok(&r));
    assert!(closed["closed_at_ms"].is_i64(), "{closed}");
    let r = veil_as(&base, &[&["session", "show", &sid]], "").await;
    let line = fails(&r, 1);
    assert!(
        line.starts_with("veil: error: session: [session_closed]"),
        "{line}"
    );

    // Nothing printed ever holds the wallet's key or a read token.
    assert!(!all_output.contains(&secret_hex));
    assert!(!all_output.contains("vst_"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_off_completion_from_a_config_file() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let wallet = PrivateKeySigner::random();
    let key = key_file(dir.path(), &wallet);
    let config = dir.path().join("veil.toml");
    std::fs::write(
        &config,
        format!(
            "router = \"{}\"\nprivate_key_file = \"{key}\"\nmodel = \"tiny\"\n",
            env.url
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    // Without --session: a session is opened for the completion and closed after it.
    let env_config = [("VEIL_CONFIG", config)];
    let complete = ["complete", "--max-tokens", "5", "--seed", "9"];
    let r = veil(
        &env_config,
        &[&complete[..], &["--json", "one off"]].concat(),
        "",
    )
    .await;
    let done = json(ok(&r));
    assert_eq!(
        done["text"],
        expected(&env.engine, "one off", 5, 9).as_str()
    );
    let sid = done["session_id"].as_str().unwrap();
    let r = veil(&[], &["session", "show", sid, "--config", config], "").await;
    let line = fails(&r, 1);
    assert!(line.contains("[session_closed]"), "{line}");

    // Text output by default; --keep-session keeps it open.
    let r = veil(
        &env_config,
        &[&complete[..], &["--keep-session", "one off"]].concat(),
        "",
    )
    .await;
    assert_eq!(
        ok(&r),
        format!("{}\n", expected(&env.engine, "one off", 5, 9))
    );

    // Usage errors: no router, no wallet, no prompt, two wallets.
    let r = veil(&[], &["complete", "--model", "tiny", "x"], "").await;
    assert!(fails(&r, 2).contains("--router"), "{}", r.stderr);
    let r = veil(
        &[],
        &["complete", "--router", &env.url, "--model", "tiny", "x"],
        "",
    )
    .await;
    assert!(
        fails(&r, 2).contains("a wallet is required"),
        "{}",
        r.stderr
    );
    let r = veil(&env_config, &["complete"], "\n").await;
    assert!(fails(&r, 2).contains("the prompt is empty"), "{}", r.stderr);
    let r = veil(
        &[
            ("VEIL_CONFIG", config),
            ("VEIL_PRIVATE_KEY", &hex::encode(wallet.to_bytes())),
        ],
        &["complete", "--private-key-file", &key, "x"],
        "",
    )
    .await;
    assert!(
        fails(&r, 2).contains("more than one wallet"),
        "{}",
        r.stderr
    );
    env.stop().await;
}
