//! Envelope throughput beside raw single-shot AES-256-GCM on the same bytes,
//! key derivations per second and key wraps per second.
//!
//! `cargo bench -p veil-keys --bench crypto`

use std::hint::black_box;

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{Aead, Nonce},
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use veil_keys::{
    BlobParams, KeyId, Opener, Purpose, Sealer, SecretKey, Seed, Uuid, X25519Secret,
    derive_session_key, derive_task_key, open, seal, unwrap_key, wrap_key,
};

const SIZES: &[(usize, &str)] = &[
    (1 << 10, "1KiB"),
    (64 << 10, "64KiB"),
    (1 << 20, "1MiB"),
    (64 << 20, "64MiB"),
];

fn params() -> BlobParams {
    BlobParams::new(
        KeyId::task(1, Uuid::now_v7(), Uuid::now_v7()),
        Purpose::Prompt,
    )
}

fn envelope(c: &mut Criterion) {
    let key = SecretKey::from_bytes([7; 32]);
    let raw = Aes256Gcm::new_from_slice(&[9; 32]).unwrap();
    let nonce = Nonce::<Aes256Gcm>::from([1u8; 12]);
    let p = params();
    for &(size, name) in SIZES {
        let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let mut g = c.benchmark_group(format!("envelope/{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        if size >= 1 << 20 {
            g.sample_size(10);
        }
        g.bench_function(BenchmarkId::new("raw_aes256gcm_seal", name), |b| {
            b.iter(|| raw.encrypt(&nonce, black_box(data.as_slice())).unwrap())
        });
        g.bench_function(BenchmarkId::new("envelope_seal", name), |b| {
            b.iter(|| seal(&key, &p, black_box(&data)).unwrap())
        });
        let raw_ct = raw.encrypt(&nonce, data.as_slice()).unwrap();
        g.bench_function(BenchmarkId::new("raw_aes256gcm_open", name), |b| {
            b.iter(|| raw.decrypt(&nonce, black_box(raw_ct.as_slice())).unwrap())
        });
        let blob = seal(&key, &p, &data).unwrap();
        // Includes wiping the returned plaintext when it is dropped.
        g.bench_function(BenchmarkId::new("envelope_open", name), |b| {
            b.iter(|| open(&key, black_box(&blob)).unwrap())
        });
        g.bench_function(
            BenchmarkId::new("envelope_stream_open_64KiB_reads", name),
            |b| {
                b.iter(|| {
                    let mut o = Opener::new(&key);
                    let mut n = 0;
                    for piece in blob.chunks(64 << 10) {
                        n += o
                            .push(piece)
                            .unwrap()
                            .iter()
                            .map(|c| c.len())
                            .sum::<usize>();
                    }
                    o.finish().unwrap();
                    n
                })
            },
        );
        g.finish();
    }
}

fn streaming_tokens(c: &mut Criterion) {
    // A result streamed token by token, each token flushed as its own frame.
    let key = SecretKey::from_bytes([7; 32]);
    let p = params();
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal_and_flush_one_4_byte_token", |b| {
        let mut sealer = Sealer::new(&key, &p).unwrap();
        let mut out = Vec::with_capacity(1 << 20);
        b.iter(|| {
            out.clear();
            sealer.update(black_box(b"tok "), &mut out).unwrap();
            sealer.flush(&mut out).unwrap();
        })
    });
    g.finish();
}

fn keys(c: &mut Criterion) {
    let seed = Seed::from_bytes([3; 32]);
    let sid = Uuid::now_v7();
    let tid = Uuid::now_v7();
    let ks = derive_session_key(&seed, &sid);
    let mut g = c.benchmark_group("keys");
    g.throughput(Throughput::Elements(1));
    g.bench_function("derive_session_key", |b| {
        b.iter(|| derive_session_key(&seed, black_box(&sid)))
    });
    g.bench_function("derive_task_key", |b| {
        b.iter(|| derive_task_key(&ks, black_box(&tid)))
    });
    let r = X25519Secret::generate().unwrap();
    let id = KeyId::task(1, sid, tid);
    g.bench_function("wrap_key", |b| {
        b.iter(|| wrap_key(&r.public(), &ks, black_box(&id)).unwrap())
    });
    let w = wrap_key(&r.public(), &ks, &id).unwrap();
    g.bench_function("unwrap_key", |b| {
        b.iter(|| unwrap_key(&r, black_box(&w), &id).unwrap())
    });
    g.finish();
}

criterion_group!(benches, envelope, streaming_tokens, keys);
criterion_main!(benches);
