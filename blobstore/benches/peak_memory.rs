//! Peak memory (VmHWM) and speed of a streaming put, a streaming get and a streaming open of
//! large sealed blobs, to show that memory stays bounded whatever the blob's size.
//!
//! `cargo bench -p veil-blobstore --bench peak_memory`
//!
//! * `VEIL_BENCH_SIZES` — plaintext sizes, default `128MiB,1GiB`.
//! * `VEIL_BENCH_BACKENDS` — `fs` (default) and/or `s3` (`VEIL_TEST_S3_ENDPOINT` or a spawned
//!   `moto_server`, which keeps every object in its own memory: keep S3 sizes modest).
//!
//! Each phase runs in its own process (this binary re-executed with `--phase`), so each peak is
//! that phase's alone. The blob is generated with `veil_keys::Sealer` on the fly from a 1 MiB
//! plaintext buffer and never held in memory as a whole.

use std::process::Command;
use std::time::Instant;

use futures::StreamExt;
use veil_blobstore::{BlobStore, Urn};
use veil_keys::{BlobParams, KeyId, Purpose, Sealer, SecretKey, Uuid};
use veil_testkit::S3Server;

mod common;
use common::{env_list, parse_size};

const KEY: [u8; 32] = [9; 32];
const PIECE: usize = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--phase") {
        let phase = args.get(i + 1).expect("--phase needs a value").clone();
        let rest: Vec<String> = args[i + 2..].to_vec();
        run_phase(&phase, &rest);
        return;
    }
    // `cargo bench` passes `--bench`; a name filter or `--list` is not meaningful here.
    if args.iter().any(|a| a == "--list") {
        println!("peak_memory: bench");
        return;
    }
    orchestrate();
}

/// Peak resident set size of this process so far, in KiB (Linux `/proc/self/status` VmHWM).
fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

struct Target {
    name: &'static str,
    url: String,
    env: Vec<(&'static str, String)>,
    _dir: Option<tempfile::TempDir>,
    _server: Option<S3Server>,
}

fn targets() -> Vec<Target> {
    env_list("VEIL_BENCH_BACKENDS", "fs")
        .into_iter()
        .map(|name| match name.as_str() {
            "fs" => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("file://{}", dir.path().display());
                Target {
                    name: "fs",
                    url,
                    env: Vec::new(),
                    _dir: Some(dir),
                    _server: None,
                }
            }
            "s3" => {
                let server = S3Server::start();
                let bucket = server.new_bucket("veil-peak");
                let url = format!(
                    "s3://{bucket}?endpoint={}&allow_http=true&region={}&provider=moto",
                    server.endpoint(),
                    S3Server::REGION
                );
                let env = vec![
                    ("AWS_ACCESS_KEY_ID", server.access_key_id()),
                    ("AWS_SECRET_ACCESS_KEY", server.secret_access_key()),
                ];
                Target {
                    name: "s3",
                    url,
                    env,
                    _dir: None,
                    _server: Some(server),
                }
            }
            other => panic!("unknown backend {other:?} in VEIL_BENCH_BACKENDS (fs, s3)"),
        })
        .collect()
}

/// One phase's figures, parsed from the child's `RESULT k=v …` line.
#[derive(Debug, Default)]
struct Figures {
    urn: String,
    sha256: String,
    bytes: u64,
    secs: f64,
    base_kib: u64,
    peak_kib: u64,
}

fn run_child(target: &Target, phase: &str, args: &[String]) -> Figures {
    let exe = std::env::current_exe().expect("current exe");
    let output = Command::new(exe)
        .arg("--phase")
        .arg(phase)
        .arg(&target.url)
        .args(args)
        .envs(target.env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("spawn phase");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "phase {phase} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("RESULT line");
    let mut f = Figures::default();
    for kv in line.split_whitespace() {
        let (k, v) = kv.split_once('=').expect("k=v");
        match k {
            "urn" => f.urn = v.to_owned(),
            "sha256" => f.sha256 = v.to_owned(),
            "bytes" => f.bytes = v.parse().expect("bytes"),
            "secs" => f.secs = v.parse().expect("secs"),
            "base_kib" => f.base_kib = v.parse().expect("base"),
            "peak_kib" => f.peak_kib = v.parse().expect("peak"),
            _ => {}
        }
    }
    f
}

fn orchestrate() {
    let sizes = env_list("VEIL_BENCH_SIZES", "128MiB,1GiB");
    println!(
        "{:<4} {:<10} {:<6} {:>12} {:>10} {:>10} {:>14} {:>14}",
        "be", "size", "phase", "bytes", "secs", "MiB/s", "base RSS MiB", "peak RSS MiB"
    );
    for target in targets() {
        for size in &sizes {
            let n = parse_size(size);
            let put = run_child(&target, "put", &[n.to_string()]);
            let get = run_child(&target, "get", &[put.urn.clone(), put.sha256.clone()]);
            let open = run_child(
                &target,
                "open",
                &[put.urn.clone(), put.sha256.clone(), n.to_string()],
            );
            for (phase, f) in [("put", &put), ("get", &get), ("open", &open)] {
                println!(
                    "{:<4} {:<10} {:<6} {:>12} {:>10.2} {:>10.1} {:>14.1} {:>14.1}",
                    target.name,
                    size,
                    phase,
                    f.bytes,
                    f.secs,
                    f.bytes as f64 / f.secs / 1048576.0,
                    f.base_kib as f64 / 1024.0,
                    f.peak_kib as f64 / 1024.0,
                );
            }
            run_child(&target, "delete", std::slice::from_ref(&put.urn));
        }
    }
}

fn run_phase(phase: &str, args: &[String]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let url = &args[0];
    let store = BlobStore::from_url(url).expect("store");
    let key = SecretKey::from_bytes(KEY);
    let base_kib = vm_hwm_kib();
    let start = Instant::now();
    let (urn, sha256, bytes) = rt.block_on(async {
        match phase {
            "put" => {
                let len: u64 = args[1].parse().expect("size");
                let params = BlobParams::new(
                    KeyId::task(1, Uuid::now_v7(), Uuid::now_v7()),
                    Purpose::Result,
                );
                let mut sealer = Sealer::new(&key, &params).expect("sealer");
                let plaintext: Vec<u8> = (0..PIECE).map(|i| (i % 251) as u8).collect();
                let mut out = Vec::with_capacity(2 * PIECE);
                let mut writer = store.writer();
                let mut left = len;
                while left > 0 {
                    let n = left.min(PIECE as u64) as usize;
                    sealer.update(&plaintext[..n], &mut out).expect("seal");
                    writer.write(&out).await.expect("write");
                    out.clear();
                    left -= n as u64;
                }
                sealer.finish(&mut out).expect("seal");
                writer.write(&out).await.expect("write");
                let r = writer.finish().await.expect("finish");
                (r.urn.to_string(), r.sha256_hex(), r.size)
            }
            "get" => {
                let urn: Urn = args[1].parse().expect("urn");
                let sha = hex32(&args[2]);
                let mut stream = store.get_stream(&urn, &sha).await.expect("get");
                let mut n = 0u64;
                while let Some(item) = stream.next().await {
                    n += item.expect("verified stream").len() as u64;
                }
                (args[1].clone(), args[2].clone(), n)
            }
            "open" => {
                let urn: Urn = args[1].parse().expect("urn");
                let sha = hex32(&args[2]);
                let expected: u64 = args[3].parse().expect("size");
                let mut stream = store.open_stream(&urn, &sha, &key).await.expect("open");
                let mut n = 0u64;
                while let Some(item) = stream.next().await {
                    n += item.expect("authenticated stream").len() as u64;
                }
                assert_eq!(n, expected, "plaintext length");
                (args[1].clone(), args[2].clone(), n)
            }
            "delete" => {
                let urn: Urn = args[1].parse().expect("urn");
                store.delete(&urn).await.expect("delete");
                (args[1].clone(), String::new(), 0)
            }
            other => panic!("unknown phase {other}"),
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT urn={urn} sha256={sha256} bytes={bytes} secs={secs:.3} base_kib={base_kib} peak_kib={}",
        vm_hwm_kib()
    );
}

fn hex32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).expect("64 hex characters");
    out
}
