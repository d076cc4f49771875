//! One conformance suite, run against every backend: memory, a temporary directory, and an
//! S3-compatible server on loopback (`VEIL_TEST_S3_ENDPOINT`, or `moto_server` spawned from
//! `PATH`; without either the S3 tests fail, they never skip).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use veil_blobstore::{
    BlobRef, BlobStore, Error, S3Config, S3Credentials, StorageType, StoreConfig, Urn,
};
use veil_keys::{BlobParams, KeyId, Purpose, Sealer, SecretKey, Uuid};
use veil_testkit::S3Server;

/// The smallest part size S3 accepts; every backend uses it so that the multipart path is
/// exercised with blobs of a few MiB.
const PART: usize = 5 * 1024 * 1024;

struct Fixture {
    store: BlobStore,
    config: StoreConfig,
    /// The directory of a filesystem store, to look for stray files.
    root: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
    _server: Option<Arc<S3Server>>,
}

fn fixture_mem() -> Fixture {
    let config = StoreConfig::memory().with_part_size(PART);
    Fixture {
        store: BlobStore::from_config(&config).unwrap(),
        config,
        root: None,
        _dir: None,
        _server: None,
    }
}

fn fixture_fs() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet: the store creates it.
    let root = dir.path().join("blobs-root");
    let config = StoreConfig::fs(&root).with_part_size(PART);
    Fixture {
        store: BlobStore::from_config(&config).unwrap(),
        config,
        root: Some(root),
        _dir: Some(dir),
        _server: None,
    }
}

fn fixture_s3() -> Fixture {
    let server = S3Server::shared();
    let bucket = server.new_bucket("veil-conf");
    let config = StoreConfig::s3(
        S3Config::new(bucket)
            .with_provider("moto")
            .with_endpoint(server.endpoint())
            .with_allow_http(true)
            .with_path_style(true)
            .with_region(S3Server::REGION)
            .with_credentials(S3Credentials::new(
                server.access_key_id(),
                server.secret_access_key(),
            )),
    )
    .with_part_size(PART);
    Fixture {
        store: BlobStore::from_config(&config).unwrap(),
        config,
        root: None,
        _dir: None,
        _server: Some(server),
    }
}

fn key() -> SecretKey {
    SecretKey::from_bytes([0x42; 32])
}

fn session_params(purpose: Purpose) -> BlobParams {
    BlobParams::new(KeyId::session(3, Uuid::now_v7()), purpose)
}

fn task_params() -> BlobParams {
    BlobParams::new(
        KeyId::task(3, Uuid::now_v7(), Uuid::now_v7()),
        Purpose::Result,
    )
}

fn plaintext(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn sealed(len: usize, seed: u8) -> (Vec<u8>, Vec<u8>) {
    let pt = plaintext(len, seed);
    let blob = veil_keys::seal(&key(), &session_params(Purpose::Prompt), &pt).unwrap();
    (pt, blob)
}

/// Seals `len` bytes of plaintext and writes them through a `BlobWriter` in odd-sized pieces,
/// returning the plaintext, the whole blob (for comparison) and the reference.
async fn stream_put(store: &BlobStore, len: usize) -> (Vec<u8>, Vec<u8>, BlobRef) {
    let pt = plaintext(len, 9);
    let mut sealer = Sealer::new(&key(), &task_params()).unwrap();
    let mut writer = store.writer();
    let mut whole = Vec::new();
    let mut out = Vec::new();
    for piece in pt.chunks(777_777) {
        sealer.update(piece, &mut out).unwrap();
        writer.write(&out).await.unwrap();
        whole.extend_from_slice(&out);
        out.clear();
    }
    sealer.finish(&mut out).unwrap();
    writer.write(&out).await.unwrap();
    whole.extend_from_slice(&out);
    let blob_ref = writer.finish().await.unwrap();
    (pt, whole, blob_ref)
}

async fn object_count(f: &Fixture) -> usize {
    let listed: Vec<_> = f
        .store
        .object_store()
        .list(None)
        .try_collect()
        .await
        .unwrap();
    listed.len()
}

/// Every regular file under a filesystem store's root (staging files included).
fn files_on_disk(f: &Fixture) -> Vec<PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(root) = &f.root {
        walk(root, &mut out);
    }
    out
}

async fn assert_nothing_stored(f: &Fixture) {
    assert_eq!(object_count(f).await, 0, "no object may remain");
    assert_eq!(
        files_on_disk(f),
        Vec::<PathBuf>::new(),
        "no file may remain"
    );
}

/// Replaces the stored object behind `urn` with `bytes`, bypassing the store's checks.
async fn overwrite_raw(f: &Fixture, urn: &Urn, bytes: Vec<u8>) {
    let path = ObjectPath::parse(urn.file_name()).unwrap();
    f.store
        .object_store()
        .put(&path, PutPayload::from(bytes))
        .await
        .unwrap();
}

/// Collects a stream's bytes and errors, asserting that nothing comes after an error.
async fn drain<S, T>(mut stream: S) -> (Vec<u8>, Vec<Error>)
where
    S: futures::Stream<Item = Result<T, Error>> + Unpin,
    T: AsRef<[u8]>,
{
    let mut data = Vec::new();
    let mut errors = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(piece) => {
                assert!(errors.is_empty(), "data after an error");
                data.extend_from_slice(piece.as_ref());
            }
            Err(e) => errors.push(e),
        }
    }
    (data, errors)
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

async fn round_trip_of_several_sizes(f: &Fixture) {
    // Empty plaintext (header + one empty frame), small, several chunks, just over a part.
    for len in [0, 1, 1000, 65_536 * 3 + 5, PART + 4096] {
        let (pt, blob) = sealed(len, len as u8);
        let blob_ref = f.store.put(blob.clone()).await.unwrap();
        assert_eq!(blob_ref.size, blob.len() as u64, "len {len}");
        assert_eq!(blob_ref.sha256, sha(&blob), "len {len}");
        assert!(f.store.owns(&blob_ref.urn));
        assert_eq!(
            blob_ref.urn.to_string().parse::<Urn>().unwrap(),
            blob_ref.urn
        );
        let got = f.store.get(&blob_ref.urn, &blob_ref.sha256).await.unwrap();
        assert!(got == blob, "bytes differ for len {len}");
        let opened = veil_keys::open(&key(), &got).unwrap();
        assert!(*opened.plaintext == pt, "plaintext differs for len {len}");
    }
}

async fn urns_carry_the_store_identity_and_a_derived_name(f: &Fixture) {
    let id = f.config.store_id();
    let session_scoped = session_params(Purpose::Attachment);
    let blob = veil_keys::seal(&key(), &session_scoped, b"x").unwrap();
    let r = f.store.put(blob).await.unwrap();
    assert_eq!(r.urn.storage_type(), id.storage_type);
    assert_eq!(r.urn.provider(), id.provider);
    assert_eq!(r.urn.bucket(), id.bucket);
    let session = session_scoped.key.session_id.hyphenated().to_string();
    let prefix = format!("{session}/session/attachment-");
    assert!(r.urn.file_name().starts_with(&prefix), "{}", r.urn);
    assert!(r.urn.file_name().ends_with(".veil"), "{}", r.urn);

    let task_scoped = task_params();
    let blob = veil_keys::seal(&key(), &task_scoped, b"y").unwrap();
    let r = f.store.put(blob).await.unwrap();
    let expected = format!(
        "{}/{}/result-",
        task_scoped.key.session_id.hyphenated(),
        task_scoped.key.task_id.unwrap().hyphenated()
    );
    assert!(r.urn.file_name().starts_with(&expected), "{}", r.urn);

    // The same bytes twice are two blobs: nothing is ever overwritten.
    let (_, blob) = sealed(10, 1);
    let a = f.store.put(blob.clone()).await.unwrap();
    let b = f.store.put(blob).await.unwrap();
    assert_ne!(a.urn, b.urn);
    assert_eq!(a.sha256, b.sha256);
    f.store.get(&a.urn, &a.sha256).await.unwrap();
    f.store.get(&b.urn, &b.sha256).await.unwrap();
}

async fn prefixed_store_names_blobs_under_its_prefix(f: &Fixture) {
    let config = f.config.clone().with_prefix("tenant-a/v1");
    let store = BlobStore::with_object_store(&config, f.store.object_store().clone()).unwrap();
    let (_, blob) = sealed(100, 2);
    let r = store.put(blob.clone()).await.unwrap();
    assert!(r.urn.file_name().starts_with("tenant-a/v1/"), "{}", r.urn);
    assert_eq!(store.get(&r.urn, &r.sha256).await.unwrap(), blob);
    // URNs are absolute within the bucket: the unprefixed store reads it too.
    assert_eq!(f.store.get(&r.urn, &r.sha256).await.unwrap(), blob);
}

async fn listing_names_every_blob_under_the_prefix_and_names_read_back(f: &Fixture) {
    let config = f.config.clone().with_prefix("tenant-l/v1");
    let store = BlobStore::with_object_store(&config, f.store.object_store().clone()).unwrap();
    let before = SystemTime::now() - Duration::from_secs(5);
    let session_scoped = session_params(Purpose::Prompt);
    let task_scoped = task_params();
    let a = store
        .put(veil_keys::seal(&key(), &session_scoped, b"a").unwrap())
        .await
        .unwrap();
    let b = store
        .put(veil_keys::seal(&key(), &task_scoped, b"b").unwrap())
        .await
        .unwrap();
    // Outside the prefix: not listed, and not a name of this store's layout.
    let (_, other) = sealed(10, 4);
    let outside = f.store.put(other).await.unwrap();
    // Inside the prefix but not a name the store gives: listed, no layout.
    let odd = store.id().urn("tenant-l/v1/notes/readme.txt").unwrap();
    store
        .object_store()
        .put(
            &ObjectPath::from(odd.file_name()),
            PutPayload::from_static(b"x"),
        )
        .await
        .unwrap();

    let mut listed: Vec<_> = store.list().try_collect().await.unwrap();
    listed.sort_by_key(|m| m.urn.to_string());
    let mut expected = vec![a.urn.clone(), b.urn.clone(), odd.clone()];
    expected.sort_by_key(|u| u.to_string());
    assert_eq!(
        listed.iter().map(|m| m.urn.clone()).collect::<Vec<_>>(),
        expected
    );
    for m in &listed {
        assert!(m.last_modified >= before, "{m:?}");
        let size = if m.urn == a.urn {
            a.size
        } else if m.urn == b.urn {
            b.size
        } else {
            1
        };
        assert_eq!(m.size, size, "{m:?}");
    }

    assert_eq!(
        store.name_of(&a.urn),
        Some(veil_blobstore::BlobName {
            session_id: session_scoped.key.session_id,
            task_id: None,
            purpose: Purpose::Prompt,
        })
    );
    assert_eq!(
        store.name_of(&b.urn),
        Some(veil_blobstore::BlobName {
            session_id: task_scoped.key.session_id,
            task_id: task_scoped.key.task_id,
            purpose: Purpose::Result,
        })
    );
    assert_eq!(store.name_of(&odd), None);
    // The unprefixed store's name is outside this store's prefix.
    assert_eq!(store.name_of(&outside.urn), None);
    assert!(f.store.name_of(&outside.urn).is_some());
    // Fresh URNs laid out for a key read back the same way.
    let fresh = store
        .fresh_urn_for(&task_scoped.key, Purpose::Attachment)
        .unwrap();
    assert_eq!(
        store.name_of(&fresh).map(|n| (n.task_id, n.purpose)),
        Some((task_scoped.key.task_id, Purpose::Attachment))
    );
    // Near misses of the layout are not names of it.
    let session = task_scoped.key.session_id.hyphenated().to_string();
    let task = task_scoped.key.task_id.unwrap().hyphenated().to_string();
    let id = Uuid::now_v7().hyphenated().to_string();
    for name in [
        format!("{session}/{task}/result-{id}.bin"),
        format!("{session}/{task}/secret-{id}.veil"),
        format!("{session}/{task}/result-{}.veil", id.to_uppercase()),
        format!("{session}/{task}/result-{}.veil", id.replace('-', "")),
        format!("{session}/tasks/result-{id}.veil"),
        format!("{session}/{task}/x/result-{id}.veil"),
        format!("{task}/result-{id}.veil"),
    ] {
        let urn = store.id().urn(format!("tenant-l/v1/{name}")).unwrap();
        assert_eq!(store.name_of(&urn), None, "{name}");
    }
    // Another store's URN has no name here, even with the same path.
    let foreign = Urn::new(
        StorageType::Mem,
        "elsewhere",
        "other",
        a.urn.file_name().to_string(),
    )
    .unwrap();
    assert_eq!(store.name_of(&foreign), None);
}

async fn wrong_hash_is_refused_with_no_bytes(f: &Fixture) {
    let (_, blob) = sealed(5000, 3);
    let r = f.store.put(blob).await.unwrap();
    let mut wrong = r.sha256;
    wrong[31] ^= 1;
    let err = f.store.get(&r.urn, &wrong).await.unwrap_err();
    assert!(
        matches!(err, Error::HashMismatch { ref urn } if *urn == r.urn),
        "{err:?}"
    );
    assert_eq!(err.kind_code(), "hash_mismatch");
    let (_, errors) = drain(f.store.get_stream(&r.urn, &wrong).await.unwrap()).await;
    assert!(
        matches!(errors.as_slice(), [Error::HashMismatch { .. }]),
        "{errors:?}"
    );
    // The blob itself is untouched.
    f.store.get(&r.urn, &r.sha256).await.unwrap();
}

async fn tampered_object_is_refused(f: &Fixture) {
    let (_, blob) = sealed(20_000, 4);
    let r = f.store.put(blob.clone()).await.unwrap();

    // One flipped bit in the body.
    let mut tampered = blob.clone();
    tampered[5000] ^= 0x01;
    overwrite_raw(f, &r.urn, tampered).await;
    let err = f.store.get(&r.urn, &r.sha256).await.unwrap_err();
    assert!(matches!(err, Error::HashMismatch { .. }), "{err:?}");
    let (_, errors) = drain(f.store.get_stream(&r.urn, &r.sha256).await.unwrap()).await;
    assert!(
        matches!(errors.as_slice(), [Error::HashMismatch { .. }]),
        "{errors:?}"
    );

    // Truncated, and extended.
    overwrite_raw(f, &r.urn, blob[..blob.len() - 1].to_vec()).await;
    assert!(matches!(
        f.store.get(&r.urn, &r.sha256).await,
        Err(Error::HashMismatch { .. })
    ));
    let mut longer = blob.clone();
    longer.push(0);
    overwrite_raw(f, &r.urn, longer).await;
    assert!(matches!(
        f.store.get(&r.urn, &r.sha256).await,
        Err(Error::HashMismatch { .. })
    ));
}

async fn urns_of_other_stores_are_refused(f: &Fixture) {
    let (_, blob) = sealed(10, 5);
    let r = f.store.put(blob).await.unwrap();
    let u = &r.urn;
    let other_type = if u.storage_type() == StorageType::Mem {
        StorageType::Fs
    } else {
        StorageType::Mem
    };
    let foreign = [
        Urn::new(other_type, u.provider(), u.bucket(), u.file_name()).unwrap(),
        Urn::new(
            u.storage_type(),
            "other-provider",
            u.bucket(),
            u.file_name(),
        )
        .unwrap(),
        Urn::new(
            u.storage_type(),
            u.provider(),
            "other-bucket",
            u.file_name(),
        )
        .unwrap(),
    ];
    for urn in &foreign {
        assert!(!f.store.owns(urn));
        let check = |res: Result<(), Error>| match res {
            Err(Error::ForeignUrn { urn: got, store }) => {
                assert_eq!(&got, urn);
                assert_eq!(store, f.config.store_id());
            }
            other => panic!("{urn}: expected ForeignUrn, got {other:?}"),
        };
        check(f.store.get(urn, &r.sha256).await.map(drop));
        check(f.store.get_stream(urn, &r.sha256).await.map(drop));
        check(f.store.open_stream(urn, &r.sha256, &key()).await.map(drop));
        check(f.store.head(urn).await.map(drop));
        check(f.store.delete(urn).await);
    }
    // The real one is still there.
    f.store.get(&r.urn, &r.sha256).await.unwrap();
}

async fn unsealed_bytes_are_refused_and_nothing_is_stored(f: &Fixture) {
    let (_, blob) = sealed(100, 6);
    let mut bad_frame = blob.clone();
    bad_frame[108..112].copy_from_slice(&0x8000_0001u32.to_be_bytes()); // last frame of 1 byte
    let mut empty_non_final = blob.clone();
    empty_non_final[108..112].copy_from_slice(&16u32.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        (
            "plaintext",
            b"this is a plaintext prompt that must never be stored".repeat(10),
        ),
        ("bad magic", {
            let mut b = blob.clone();
            b[0] = b'X';
            b
        }),
        ("bad format", {
            let mut b = blob.clone();
            b[4] = 2;
            b
        }),
        ("header only", blob[..108].to_vec()),
        ("header and half a frame length", blob[..110].to_vec()),
        ("bad first frame length", bad_frame),
        ("empty non-final first frame", empty_non_final),
        ("large plaintext", vec![b'a'; PART + 1]),
    ];
    for (what, bytes) in cases {
        let err = f.store.put(bytes.clone()).await.unwrap_err();
        assert!(matches!(err, Error::NotSealed { .. }), "{what}: {err:?}");
        assert_eq!(err.kind_code(), "not_sealed");
        assert!(
            !err.to_string().contains("plaintext prompt"),
            "no input in errors: {err}"
        );
        // Through the streaming paths too, in small pieces.
        let pieces: Vec<Result<Bytes, std::io::Error>> = bytes
            .chunks(7)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let err = f
            .store
            .put_stream(futures::stream::iter(pieces))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::NotSealed { .. }),
            "{what} (stream): {err:?}"
        );
    }
    // A writer refuses as soon as the preamble is in, and is closed afterwards.
    let mut writer = f.store.writer();
    let err = writer.write(&[0u8; 200]).await.unwrap_err();
    assert!(matches!(err, Error::NotSealed { .. }), "{err:?}");
    assert!(matches!(
        writer.write(&blob).await,
        Err(Error::WriterFailed)
    ));
    assert!(matches!(writer.finish().await, Err(Error::WriterFailed)));
    assert_nothing_stored(f).await;
}

async fn missing_blobs_are_not_found(f: &Fixture) {
    let urn = f.config.store_id().urn("no/such/blob.veil").unwrap();
    let is_not_found = |e: Error| matches!(e, Error::NotFound { urn: ref u } if *u == urn);
    assert!(is_not_found(f.store.get(&urn, &[0; 32]).await.unwrap_err()));
    assert!(is_not_found(
        f.store.get_stream(&urn, &[0; 32]).await.unwrap_err()
    ));
    assert!(is_not_found(
        f.store
            .open_stream(&urn, &[0; 32], &key())
            .await
            .unwrap_err()
    ));
    assert!(is_not_found(f.store.head(&urn).await.unwrap_err()));
    assert_eq!(
        f.store.head(&urn).await.unwrap_err().kind_code(),
        "not_found"
    );
}

async fn head_reports_size_and_time(f: &Fixture) {
    let before = SystemTime::now() - Duration::from_secs(60);
    let (_, blob) = sealed(3000, 7);
    let r = f.store.put(blob.clone()).await.unwrap();
    let meta = f.store.head(&r.urn).await.unwrap();
    assert_eq!(meta.urn, r.urn);
    assert_eq!(meta.size, blob.len() as u64);
    assert!(meta.last_modified >= before, "{:?}", meta.last_modified);
    assert!(meta.last_modified <= SystemTime::now() + Duration::from_secs(60));
}

async fn delete_is_idempotent(f: &Fixture) {
    let (_, blob) = sealed(10, 8);
    let r = f.store.put(blob).await.unwrap();
    f.store.delete(&r.urn).await.unwrap();
    if let Some(root) = &f.root {
        // The directories the blob's name made on a filesystem go with their last blob.
        let left: Vec<_> = std::fs::read_dir(root).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    assert!(matches!(
        f.store.get(&r.urn, &r.sha256).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        f.store.head(&r.urn).await,
        Err(Error::NotFound { .. })
    ));
    f.store.delete(&r.urn).await.unwrap();
    let never = f.config.store_id().urn("never/existed.veil").unwrap();
    f.store.delete(&never).await.unwrap();
}

async fn streaming_put_and_get_of_a_multi_mib_blob(f: &Fixture) {
    let len = 2 * PART + 1_234_567; // three parts
    let (pt, whole, r) = stream_put(&f.store, len).await;
    assert_eq!(r.size, whole.len() as u64);
    assert_eq!(r.sha256, sha(&whole));
    assert_eq!(f.store.head(&r.urn).await.unwrap().size, r.size);

    let stream = f.store.get_stream(&r.urn, &r.sha256).await.unwrap();
    assert_eq!(stream.size(), r.size);
    let (data, errors) = drain(stream).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(data == whole, "streamed bytes differ");

    let (opened, errors) = drain(
        f.store
            .open_stream(&r.urn, &r.sha256, &key())
            .await
            .unwrap(),
    )
    .await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(opened == pt, "plaintext differs");

    assert!(f.store.get(&r.urn, &r.sha256).await.unwrap() == whole);

    // `put_stream` from a stream of `Bytes`, the same blob's bytes in 1 MiB pieces.
    let pieces: Vec<Result<Bytes, std::io::Error>> = whole
        .chunks(1 << 20)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let r2 = f
        .store
        .put_stream(futures::stream::iter(pieces))
        .await
        .unwrap();
    assert_ne!(r2.urn, r.urn);
    assert_eq!((r2.sha256, r2.size), (r.sha256, r.size));

    // A big `put` (not streamed by the caller) takes the multipart path too.
    let r3 = f.store.put(whole.clone()).await.unwrap();
    assert_eq!((r3.sha256, r3.size), (r.sha256, r.size));
    assert!(f.store.get(&r3.urn, &r3.sha256).await.unwrap() == whole);
}

async fn small_streamed_blobs_and_tiny_pieces(f: &Fixture) {
    let (_, blob) = sealed(500, 10);
    let mut writer = f.store.writer();
    assert!(writer.urn().is_none());
    for byte in &blob {
        writer.write(std::slice::from_ref(byte)).await.unwrap();
    }
    let expected_urn = writer
        .urn()
        .cloned()
        .expect("URN known once the header is in");
    assert_eq!(writer.size(), blob.len() as u64);
    let r = writer.finish().await.unwrap();
    assert_eq!(r.urn, expected_urn);
    assert_eq!(r.sha256, sha(&blob));
    assert_eq!(f.store.get(&r.urn, &r.sha256).await.unwrap(), blob);
    // An empty stream is not a blob.
    let empty: Vec<Result<Bytes, std::io::Error>> = Vec::new();
    assert!(matches!(
        f.store.put_stream(futures::stream::iter(empty)).await,
        Err(Error::NotSealed { .. })
    ));
}

async fn streaming_get_of_a_tampered_object_ends_in_an_error(f: &Fixture) {
    let (pt, whole, r) = stream_put(&f.store, PART + 300_000).await;

    // A flipped bit in the middle: the byte stream delivers everything, then the hash error.
    let mut tampered = whole.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x80;
    overwrite_raw(f, &r.urn, tampered).await;
    let (data, errors) = drain(f.store.get_stream(&r.urn, &r.sha256).await.unwrap()).await;
    assert_eq!(data.len(), whole.len(), "all bytes flowed (unverified)");
    assert!(
        matches!(errors.as_slice(), [Error::HashMismatch { .. }]),
        "{errors:?}"
    );
    // The opened stream stops at the tampered chunk: AEAD fails before the hash is known.
    let (opened, errors) = drain(
        f.store
            .open_stream(&r.urn, &r.sha256, &key())
            .await
            .unwrap(),
    )
    .await;
    assert!(
        matches!(errors.as_slice(), [Error::Open { .. }]),
        "{errors:?}"
    );
    assert!(opened.len() < mid, "only chunks before the tampered one");
    assert!(pt.starts_with(&opened), "released plaintext is genuine");

    // Another valid blob under the same key in its place: every chunk authenticates, but the
    // hash does not match, so the final chunk is withheld and the stream ends in an error.
    let (_, other, _) = stream_put(&f.store, PART + 300_000).await;
    overwrite_raw(f, &r.urn, other).await;
    let (opened, errors) = drain(
        f.store
            .open_stream(&r.urn, &r.sha256, &key())
            .await
            .unwrap(),
    )
    .await;
    assert!(
        matches!(errors.as_slice(), [Error::HashMismatch { .. }]),
        "{errors:?}"
    );
    assert!(opened.len() < pt.len(), "the final chunk is withheld");

    // A wrong key is an opening error, with nothing released.
    overwrite_raw(f, &r.urn, whole).await;
    let wrong_key = SecretKey::from_bytes([0x43; 32]);
    let (opened, errors) = drain(
        f.store
            .open_stream(&r.urn, &r.sha256, &wrong_key)
            .await
            .unwrap(),
    )
    .await;
    assert!(opened.is_empty());
    assert!(
        matches!(errors.as_slice(), [Error::Open { .. }]),
        "{errors:?}"
    );
}

async fn failed_and_abandoned_uploads_leave_nothing(f: &Fixture) {
    let (_, blob) = sealed(2 * PART, 11);
    // The source fails after more than one part has gone out.
    let mut pieces: Vec<Result<Bytes, std::io::Error>> = blob
        .chunks(1 << 20)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    pieces.push(Err(std::io::Error::other("disk on fire")));
    let err = f
        .store
        .put_stream(futures::stream::iter(pieces))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Source { .. }), "{err:?}");
    assert_eq!(err.kind_code(), "source_failed");

    // Explicit abort after a multipart upload started.
    let mut writer = f.store.writer();
    writer.write(&blob[..PART + 10]).await.unwrap();
    writer.abort().await.unwrap();

    // A writer dropped mid-upload aborts in the background.
    let mut writer = f.store.writer();
    writer.write(&blob[..PART + 10]).await.unwrap();
    drop(writer);
    let mut waited = Duration::ZERO;
    while (object_count(f).await > 0 || !files_on_disk(f).is_empty())
        && waited < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    assert_nothing_stored(f).await;
}

async fn whole_reads_are_bounded(f: &Fixture) {
    let (_, blob) = sealed(5000, 12);
    let r = f.store.put(blob.clone()).await.unwrap();
    let limited = f.config.clone().with_max_get_size(4096);
    let store = BlobStore::with_object_store(&limited, f.store.object_store().clone()).unwrap();
    match store.get(&r.urn, &r.sha256).await {
        Err(Error::TooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (blob.len() as u64, 4096))
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Streaming is not limited.
    let (data, errors) = drain(store.get_stream(&r.urn, &r.sha256).await.unwrap()).await;
    assert!(errors.is_empty() && data == blob);
}

async fn concurrent_puts(f: &Fixture) {
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let store = f.store.clone();
        tasks.push(tokio::spawn(async move {
            let (_, blob) = sealed(10_000 + usize::from(i) * 1000, i);
            let r = store.put(blob.clone()).await.unwrap();
            (r, blob)
        }));
    }
    // Two large streamed ones at the same time.
    let big = {
        let a = f.store.clone();
        let b = f.store.clone();
        tokio::spawn(async move {
            tokio::join!(stream_put(&a, PART + 1000), stream_put(&b, PART + 2000))
        })
    };
    let mut urns = std::collections::HashSet::new();
    for task in tasks {
        let (r, blob) = task.await.unwrap();
        assert!(urns.insert(r.urn.clone()), "URNs are unique");
        assert_eq!(f.store.get(&r.urn, &r.sha256).await.unwrap(), blob);
    }
    let ((_, wa, ra), (_, wb, rb)) = big.await.unwrap();
    assert!(f.store.get(&ra.urn, &ra.sha256).await.unwrap() == wa);
    assert!(f.store.get(&rb.urn, &rb.sha256).await.unwrap() == wb);
    assert_eq!(object_count(f).await, 18);
}

// ---------------------------------------------------------------------------------------------
// Every case against every backend
// ---------------------------------------------------------------------------------------------

macro_rules! conformance {
    ($backend:ident, $fixture:path; $($case:ident),+ $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let fixture = $fixture();
                    super::$case(&fixture).await;
                }
            )+
        }
    };
}

macro_rules! all_backends {
    ($($case:ident),+ $(,)?) => {
        conformance!(mem, super::fixture_mem; $($case),+);
        conformance!(fs, super::fixture_fs; $($case),+);
        conformance!(s3, super::fixture_s3; $($case),+);
    };
}

all_backends!(
    round_trip_of_several_sizes,
    urns_carry_the_store_identity_and_a_derived_name,
    prefixed_store_names_blobs_under_its_prefix,
    listing_names_every_blob_under_the_prefix_and_names_read_back,
    wrong_hash_is_refused_with_no_bytes,
    tampered_object_is_refused,
    urns_of_other_stores_are_refused,
    unsealed_bytes_are_refused_and_nothing_is_stored,
    missing_blobs_are_not_found,
    head_reports_size_and_time,
    delete_is_idempotent,
    streaming_put_and_get_of_a_multi_mib_blob,
    small_streamed_blobs_and_tiny_pieces,
    streaming_get_of_a_tampered_object_ends_in_an_error,
    failed_and_abandoned_uploads_leave_nothing,
    whole_reads_are_bounded,
    concurrent_puts,
);

/// A put into a local directory returns only after a flush of the filesystem that started
/// after its file was in place; concurrent puts share flushes (the grouping itself is tested
/// deterministically in the crate). Linux 5.8 or later, where flushes are grouped by default.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_puts_wait_for_a_shared_flush() {
    let f = fixture_fs();
    let flushes = || {
        f.store
            .grouped_flushes()
            .expect("flushes are grouped by default")
    };
    let before = flushes();
    let (_, blob) = sealed(2_000, 1);
    f.store.put(blob).await.unwrap();
    assert_eq!(flushes(), before + 1, "a lone put waits for its own flush");
    let (_, _, big) = stream_put(&f.store, PART + 1000).await;
    assert_eq!(
        flushes(),
        before + 2,
        "so does a multipart upload, once, at its end"
    );
    assert_eq!(f.store.head(&big.urn).await.unwrap().size, big.size);

    let start = flushes();
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let store = f.store.clone();
        tasks.push(tokio::spawn(async move {
            let (_, blob) = sealed(1_000, i);
            let r = store.put(blob.clone()).await.unwrap();
            assert_eq!(store.get(&r.urn, &r.sha256).await.unwrap(), blob);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let shared = flushes() - start;
    assert!((1..=32).contains(&shared), "{shared} flushes for 32 puts");
    println!("32 concurrent puts shared {shared} flushes");

    // The flushing is the object store's own: a store built around it flushes too.
    let reused = BlobStore::with_object_store(&f.config, f.store.object_store().clone()).unwrap();
    let before = flushes();
    let (_, blob) = sealed(700, 3);
    reused.put(blob).await.unwrap();
    assert_eq!(
        flushes(),
        before + 1,
        "writes through the shared object store are flushed"
    );

    // Each put flushed by the object store itself, or not at all, when asked.
    for query in ["group_fsync=false", "fsync=false"] {
        let root = f.root.as_ref().unwrap().join(query.replace('=', "-"));
        let url = format!("file://{}?{query}", root.display());
        let store = BlobStore::from_url(&url).unwrap();
        assert_eq!(store.grouped_flushes(), None, "{query}");
        let (_, blob) = sealed(500, 2);
        let r = store.put(blob.clone()).await.unwrap();
        assert_eq!(store.get(&r.urn, &r.sha256).await.unwrap(), blob);
    }
}
