//! Envelope seal/open throughput as a fraction of raw single-shot AES-256-GCM
//! on the same bytes, measured interleaved (raw, envelope, raw, envelope, …) and
//! reported as the best round of each, so that noise from other processes on the
//! machine does not land on one side only.
//!
//! Opening returns a `Plaintext`, which is wiped when dropped. The "open" ratio
//! compares it with raw decryption whose output is wiped the same way (same
//! bytes, same buffer policy: the format's own cost); the last column compares
//! it with raw decryption whose output is simply freed.
//!
//! `cargo bench -p veil-keys --bench envelope_vs_raw` (set `VEIL_BENCH_ROUNDS`
//! to trade time for stability; default 100; a tenth of it for 64 MiB).

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{Aead, Nonce},
};
use veil_keys::{BlobParams, KeyId, Plaintext, Purpose, SecretKey, Uuid, open, seal};

fn best<F: FnMut()>(best: &mut Duration, iters: u32, mut f: F) {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    *best = (*best).min(t.elapsed() / iters);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` / criterion-style discovery
    }
    let rounds: u32 = std::env::var("VEIL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let key = SecretKey::from_bytes([7; 32]);
    let raw = Aes256Gcm::new_from_slice(&[9; 32]).unwrap();
    let nonce = Nonce::<Aes256Gcm>::from([1u8; 12]);
    let params = BlobParams::new(
        KeyId::task(1, Uuid::now_v7(), Uuid::now_v7()),
        Purpose::Prompt,
    );
    println!(
        "{:>7} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>10} {:>6}",
        "size",
        "raw seal",
        "env seal",
        "ratio",
        "raw open",
        "env open",
        "ratio",
        "raw, no wipe",
        "ratio"
    );
    for (size, name) in [
        (1usize << 10, "1KiB"),
        (64 << 10, "64KiB"),
        (1 << 20, "1MiB"),
        (64 << 20, "64MiB"),
    ] {
        let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let raw_ct = raw.encrypt(&nonce, data.as_slice()).unwrap();
        let blob = seal(&key, &params, &data).unwrap();
        // About 4 MiB of work per measurement; many short rounds, best kept.
        let iters = ((4usize << 20) / size).clamp(1, 4096) as u32;
        let rounds = if size >= 16 << 20 {
            rounds.div_ceil(8)
        } else {
            rounds
        };
        let mut t = [Duration::MAX; 5];
        for _ in 0..rounds {
            best(&mut t[0], iters, || {
                drop(black_box(
                    raw.encrypt(&nonce, black_box(data.as_slice())).unwrap(),
                ))
            });
            best(&mut t[1], iters, || {
                drop(black_box(seal(&key, &params, black_box(&data)).unwrap()))
            });
            best(&mut t[2], iters, || {
                drop(black_box(
                    raw.decrypt(&nonce, black_box(raw_ct.as_slice())).unwrap(),
                ))
            });
            best(&mut t[3], iters, || {
                drop(black_box(open(&key, black_box(&blob)).unwrap()))
            });
            best(&mut t[4], iters, || {
                drop(black_box(Plaintext::from(
                    raw.decrypt(&nonce, black_box(raw_ct.as_slice())).unwrap(),
                )))
            });
        }
        let mibs = |d: Duration| size as f64 / d.as_secs_f64() / (1 << 20) as f64;
        println!(
            "{:>7} | {:>6.0} MiB/s {:>6.0} MiB/s {:>5.1}% | {:>6.0} MiB/s {:>6.0} MiB/s {:>5.1}% | {:>6.0} MiB/s {:>5.1}%",
            name,
            mibs(t[0]),
            mibs(t[1]),
            100.0 * mibs(t[1]) / mibs(t[0]),
            mibs(t[4]),
            mibs(t[3]),
            100.0 * mibs(t[3]) / mibs(t[4]),
            mibs(t[2]),
            100.0 * mibs(t[3]) / mibs(t[2]),
        );
    }
}
