//! EIP-712 signing and signer recovery (secp256k1) for the two messages every task costs: the
//! miner signs a `KeyRequest` and a `TaskResult`, the router recovers the signer of each.
//!
//! `cargo bench -p veil-api --bench signatures`

use std::hint::black_box;

use alloy_signer_local::PrivateKeySigner;
use criterion::{Criterion, criterion_group, criterion_main};
use uuid::Uuid;
use veil_api::eip712::{Domain, KeyRequest, Signed, TaskResult};
use veil_api::wire::{Hex32, Nonce};

fn key_request() -> KeyRequest {
    KeyRequest {
        session_id: Uuid::now_v7(),
        task_id: Uuid::now_v7(),
        scope: 2,
        key_version: 1,
        recipient: Hex32([7; 32]),
        expires_at: 4_000_000_000,
        nonce: Nonce([1; 16]),
    }
}

fn task_result() -> TaskResult {
    TaskResult {
        session_id: Uuid::now_v7(),
        task_id: Uuid::now_v7(),
        prompt_hash: Hex32([3; 32]),
        result_hash: Hex32([4; 32]),
        result_urn: "urn:veil:blob:v1:result:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            .into(),
    }
}

fn signatures(c: &mut Criterion) {
    let domain = Domain::without_contract(31337);
    let wallet = PrivateKeySigner::random();
    let mut g = c.benchmark_group("eip712");
    let kr = key_request();
    g.bench_function("sign KeyRequest", |b| {
        b.iter(|| Signed::sign_sync(black_box(kr.clone()), &domain, &wallet).unwrap())
    });
    let signed = Signed::sign_sync(kr, &domain, &wallet).unwrap();
    g.bench_function("recover KeyRequest", |b| {
        b.iter(|| black_box(&signed).recover(&domain).unwrap())
    });
    let tr = task_result();
    g.bench_function("sign TaskResult", |b| {
        b.iter(|| Signed::sign_sync(black_box(tr.clone()), &domain, &wallet).unwrap())
    });
    let signed = Signed::sign_sync(tr, &domain, &wallet).unwrap();
    g.bench_function("recover TaskResult", |b| {
        b.iter(|| black_box(&signed).recover(&domain).unwrap())
    });
    g.finish();
}

criterion_group!(benches, signatures);
criterion_main!(benches);
