//! Presigned URLs: uploads and downloads through URLs signed by an S3 store, against the
//! S3-compatible server on loopback (`VEIL_TEST_S3_ENDPOINT`, or `moto_server` spawned from
//! `PATH`; without either these tests fail, they never skip); and the refusals of stores that
//! cannot sign. (moto does not check signatures, so what is signed is checked by the unit
//! tests in `src/store.rs`: the object path and the expiry.)

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use veil_blobstore::{
    BlobStore, Error, MAX_PRESIGN_TTL, PresignMethod, S3Config, S3Credentials, StoreConfig, Urn,
};
use veil_keys::{BlobParams, KeyId, Purpose, SecretKey, Uuid};
use veil_testkit::S3Server;

const TTL: Duration = Duration::from_secs(300);

fn s3_store(prefix: Option<&str>) -> (BlobStore, Arc<S3Server>) {
    let server = S3Server::shared();
    let bucket = server.new_bucket("veil-presign");
    let mut config = StoreConfig::s3(
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
    );
    if let Some(prefix) = prefix {
        config = config.with_prefix(prefix);
    }
    (BlobStore::from_config(&config).unwrap(), server)
}

fn key() -> SecretKey {
    SecretKey::from_bytes([0x5a; 32])
}

fn sealed(len: usize) -> (Vec<u8>, Vec<u8>, BlobParams) {
    let pt: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(37)).collect();
    let params = BlobParams::new(
        KeyId::task(1, Uuid::now_v7(), Uuid::now_v7()),
        Purpose::Prompt,
    );
    let blob = veil_keys::seal(&key(), &params, &pt).unwrap();
    (pt, blob, params)
}

fn http() -> reqwest::Client {
    // reqwest is built without a TLS crypto provider; the server is plain HTTP, but building a
    // client still wants one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn upload(url: &url::Url, body: Vec<u8>) -> reqwest::StatusCode {
    http()
        .put(url.as_str())
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
}

async fn download(url: &url::Url) -> (reqwest::StatusCode, Vec<u8>) {
    let resp = http().get(url.as_str()).send().await.unwrap();
    let status = resp.status();
    (status, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn presigned_put_then_get_round_trips_through_the_store() {
    for prefix in [None, Some("tenant-a/uploads")] {
        let (store, _server) = s3_store(prefix);
        assert!(store.can_presign());
        let (pt, blob, _) = sealed(70_000);
        let sha: [u8; 32] = Sha256::digest(&blob).into();

        let urn = store.fresh_urn().unwrap();
        let put_url = store.presign(PresignMethod::Put, &urn, TTL).await.unwrap();
        assert!(put_url.as_str().contains("X-Amz-Signature="), "{put_url}");
        let status = upload(&put_url, blob.clone()).await;
        assert!(status.is_success(), "presigned PUT: HTTP {status}");

        // The store reads the uploaded object at the URN: same path, prefix included.
        let got = store.get(&urn, &sha).await.unwrap();
        assert_eq!(got, blob, "prefix {prefix:?}");
        assert_eq!(store.head(&urn).await.unwrap().size, blob.len() as u64);
        let mut opened = Vec::new();
        let mut stream = store.open_stream(&urn, &sha, &key()).await.unwrap();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            opened.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(opened, pt);

        // A presigned GET downloads the same bytes.
        let get_url = store.presign(PresignMethod::Get, &urn, TTL).await.unwrap();
        let (status, bytes) = download(&get_url).await;
        assert!(status.is_success(), "presigned GET: HTTP {status}");
        assert_eq!(bytes, blob);
    }
}

#[tokio::test]
async fn presigned_get_downloads_a_blob_stored_by_put() {
    let (store, _server) = s3_store(Some("p"));
    let (_, blob, params) = sealed(1000);
    let blob_ref = store.put(blob.clone()).await.unwrap();
    let url = store
        .presign(PresignMethod::Get, &blob_ref.urn, TTL)
        .await
        .unwrap();
    let (status, bytes) = download(&url).await;
    assert!(status.is_success(), "HTTP {status}");
    assert_eq!(bytes, blob);

    // A URL for a fresh URN laid out like put's names is accepted by the server too.
    let urn = store.fresh_urn_for(&params.key, params.purpose).unwrap();
    let session = params.key.session_id.hyphenated().to_string();
    assert!(
        urn.file_name().starts_with(&format!("p/{session}/")),
        "{urn}"
    );
    let put_url = store.presign(PresignMethod::Put, &urn, TTL).await.unwrap();
    assert!(upload(&put_url, blob.clone()).await.is_success());
    assert_eq!(store.get(&urn, &blob_ref.sha256).await.unwrap(), blob);

    // A GET URL for a URN nothing was uploaded to finds nothing.
    let missing = store.fresh_urn().unwrap();
    let url = store
        .presign(PresignMethod::Get, &missing, TTL)
        .await
        .unwrap();
    assert_eq!(download(&url).await.0, reqwest::StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn memory_and_filesystem_stores_cannot_presign() {
    let dir = tempfile::tempdir().unwrap();
    let stores = [
        BlobStore::memory(),
        BlobStore::from_config(&StoreConfig::fs(dir.path().join("blobs"))).unwrap(),
    ];
    for store in stores {
        assert!(!store.can_presign(), "{store:?}");
        let urn = store.fresh_urn().unwrap();
        for method in [PresignMethod::Put, PresignMethod::Get] {
            let err = store.presign(method, &urn, TTL).await.unwrap_err();
            assert!(
                matches!(&err, Error::PresignUnsupported { store: id } if id == store.id()),
                "{err:?}"
            );
            assert_eq!(err.kind_code(), "presign_unsupported");
        }
    }
}

#[tokio::test]
async fn urns_of_other_stores_are_refused() {
    let (store, _server) = s3_store(None);
    let mine = store.fresh_urn().unwrap();
    let other_bucket: Urn = format!("urn:blob:v1:s3:moto:elsewhere:{}", mine.file_name())
        .parse()
        .unwrap();
    let other_provider: Urn = format!("urn:blob:v1:s3:aws:{}:{}", mine.bucket(), mine.file_name())
        .parse()
        .unwrap();
    let other_kind = BlobStore::memory().fresh_urn().unwrap();
    for urn in [other_bucket, other_provider, other_kind] {
        for method in [PresignMethod::Put, PresignMethod::Get] {
            let err = store.presign(method, &urn, TTL).await.unwrap_err();
            assert!(matches!(&err, Error::ForeignUrn { .. }), "{urn}: {err:?}");
            assert_eq!(err.kind_code(), "foreign_urn");
        }
    }
}

#[tokio::test]
async fn lifetimes_over_seven_days_are_refused() {
    let (store, _server) = s3_store(None);
    let urn = store.fresh_urn().unwrap();
    store
        .presign(PresignMethod::Get, &urn, MAX_PRESIGN_TTL)
        .await
        .unwrap();
    for ttl in [Duration::ZERO, MAX_PRESIGN_TTL + Duration::from_secs(1)] {
        let err = store
            .presign(PresignMethod::Put, &urn, ttl)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidTtl { .. }), "{ttl:?}: {err:?}");
    }
}

#[tokio::test]
async fn fresh_urns_are_distinct_and_owned_by_the_store() {
    let (s3, _server) = s3_store(Some("fresh/prefix"));
    let dir = tempfile::tempdir().unwrap();
    let fs = BlobStore::from_config(&StoreConfig::fs(dir.path()).with_prefix("x")).unwrap();
    for (store, prefix) in [(s3, "fresh/prefix/"), (fs, "x/"), (BlobStore::memory(), "")] {
        let urns: Vec<Urn> = (0..500).map(|_| store.fresh_urn().unwrap()).collect();
        let distinct: HashSet<&Urn> = urns.iter().collect();
        assert_eq!(distinct.len(), urns.len());
        for urn in &urns {
            assert!(store.owns(urn), "{urn}");
            let name = urn
                .file_name()
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{urn} lacks prefix {prefix:?}"));
            let uuid = name.strip_suffix(".veil").unwrap();
            assert_eq!(Uuid::parse_str(uuid).unwrap().get_version_num(), 7, "{urn}");
        }
        // UUIDv7 names sort by creation time.
        let names: Vec<&str> = urns.iter().map(Urn::file_name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }
}
