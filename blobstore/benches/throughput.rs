//! Put / get throughput of sealed blobs (64 KiB, 1 MiB, 16 MiB) on memory, the local
//! filesystem and an S3-compatible server on loopback.
//!
//! `cargo bench -p veil-blobstore --bench throughput [-- --quick]`
//!
//! `VEIL_BENCH_BACKENDS` picks backends (default `mem,fs,s3`); `VEIL_BENCH_SIZES` the plaintext
//! sizes (default `64KiB,1MiB,16MiB`). The S3 server is `VEIL_TEST_S3_ENDPOINT` or a spawned
//! `moto_server` (a Python server: its figures measure the client path and moto, not S3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use veil_blobstore::{BlobStore, S3Config, S3Credentials, StoreConfig};
use veil_keys::{BlobParams, KeyId, Purpose, SecretKey, Uuid};
use veil_testkit::S3Server;

mod common;
use common::{env_list, parse_size};

struct Backend {
    name: &'static str,
    store: BlobStore,
    _dir: Option<tempfile::TempDir>,
    _server: Option<Arc<S3Server>>,
}

fn backends() -> Vec<Backend> {
    let mut out = Vec::new();
    for name in env_list("VEIL_BENCH_BACKENDS", "mem,fs,s3") {
        out.push(match name.as_str() {
            "mem" => Backend {
                name: "mem",
                store: BlobStore::memory(),
                _dir: None,
                _server: None,
            },
            "fs" => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = BlobStore::from_config(&StoreConfig::fs(dir.path())).expect("fs store");
                Backend {
                    name: "fs",
                    store,
                    _dir: Some(dir),
                    _server: None,
                }
            }
            "s3" => {
                let server = S3Server::shared();
                let bucket = server.new_bucket("veil-bench");
                let config = StoreConfig::s3(
                    S3Config::new(bucket)
                        .with_provider("moto")
                        .with_endpoint(server.endpoint())
                        .with_allow_http(true)
                        .with_region(S3Server::REGION)
                        .with_credentials(S3Credentials::new(
                            server.access_key_id(),
                            server.secret_access_key(),
                        )),
                );
                Backend {
                    name: "s3",
                    store: BlobStore::from_config(&config).expect("s3 store"),
                    _dir: None,
                    _server: Some(server),
                }
            }
            other => panic!("unknown backend {other:?} in VEIL_BENCH_BACKENDS (mem, fs, s3)"),
        });
    }
    out
}

fn sealed_blob(plaintext_len: usize) -> Bytes {
    let key = SecretKey::from_bytes([5; 32]);
    let params = BlobParams::new(
        KeyId::task(1, Uuid::now_v7(), Uuid::now_v7()),
        Purpose::Prompt,
    );
    let plaintext: Vec<u8> = (0..plaintext_len).map(|i| (i % 251) as u8).collect();
    Bytes::from(veil_keys::seal(&key, &params, &plaintext).expect("seal"))
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sizes = env_list("VEIL_BENCH_SIZES", "64KiB,1MiB,16MiB");
    for backend in backends() {
        let store = &backend.store;
        let mut group = c.benchmark_group(format!("blobstore/{}", backend.name));
        if backend.name == "s3" {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(10));
        } else {
            group
                .sample_size(20)
                .measurement_time(Duration::from_secs(5));
        }
        for label in &sizes {
            let blob = sealed_blob(parse_size(label) as usize);
            group.throughput(Throughput::Bytes(blob.len() as u64));

            // Each iteration writes a new blob (names are never reused); the delete that keeps
            // the store small is not timed.
            group.bench_function(BenchmarkId::new("put", label), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut timed = Duration::ZERO;
                        for _ in 0..iters {
                            let start = Instant::now();
                            let r = store.put(blob.clone()).await.expect("put");
                            timed += start.elapsed();
                            store.delete(&r.urn).await.expect("delete");
                        }
                        timed
                    })
                })
            });

            let r = rt.block_on(store.put(blob.clone())).expect("put");
            group.bench_function(BenchmarkId::new("get", label), |b| {
                b.iter(|| rt.block_on(store.get(&r.urn, &r.sha256)).expect("get"))
            });
            group.bench_function(BenchmarkId::new("get_stream", label), |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut stream = store.get_stream(&r.urn, &r.sha256).await.expect("get");
                        let mut n = 0usize;
                        while let Some(item) = stream.next().await {
                            n += item.expect("verified").len();
                        }
                        n
                    })
                })
            });
            rt.block_on(store.delete(&r.urn)).expect("delete");
        }
        group.finish();
    }
}

criterion_group!(benches, throughput);
criterion_main!(benches);
