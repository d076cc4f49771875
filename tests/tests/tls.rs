//! The router serving HTTPS itself (rustls), for deployments without a proxy in front.

use std::time::Duration;

use veil_router::config::{Config, Settings};
use veil_tests::harness::TestRouter;

struct Tls {
    cert_pem: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn self_signed(dir: &std::path::Path) -> Tls {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    std::fs::create_dir_all(dir).expect("dir");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let cert_pem = ck.cert.pem();
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    Tls {
        cert_pem,
        cert,
        key,
    }
}

fn client(root_pem: Option<&str>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(pem) = root_pem {
        b = b.tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).expect("pem")]);
    }
    b.build().expect("client")
}

async fn serve_tls(settings: Settings) -> (String, tokio::sync::oneshot::Sender<()>) {
    let cfg = Config::from_settings(settings).expect("settings");
    let started = veil_router::server::prepare(cfg).await.expect("prepare");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let r = veil_router::server::serve(started.state, listener, async move {
            let _ = rx.await;
        })
        .await;
        if let Err(e) = r {
            panic!("router stopped: {e}");
        }
    });
    (format!("localhost:{port}"), tx)
}

#[tokio::test]
async fn serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = self_signed(dir.path());
    let mut settings = TestRouter::settings(&dir.path().join("data"));
    settings.tls_cert = Some(tls.cert.clone());
    settings.tls_key = Some(tls.key.clone());
    let (host, stop) = serve_tls(settings).await;

    // A client that trusts the certificate gets answers over HTTPS, API included.
    let https = client(Some(&tls.cert_pem));
    let mut ok = None;
    for _ in 0..50 {
        match https.get(format!("https://{host}/healthz")).send().await {
            Ok(r) => {
                ok = Some(r.status());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(ok, Some(reqwest::StatusCode::OK));
    let r = https
        .get(format!("https://{host}/api/v2/models"))
        .send()
        .await
        .expect("https request");
    assert_eq!(r.status(), 401, "no API key: refused, over TLS");
    let models: serde_json::Value = https
        .get(format!("https://{host}/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    assert!(models["paths"]["/api/v2/completions"].is_object());

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = client(None)
        .get(format!("http://{host}/healthz"))
        .send()
        .await;
    assert!(
        plain.as_ref().map(|r| r.status() != 200).unwrap_or(true),
        "plain HTTP must not be served on the TLS port: {plain:?}"
    );

    // A client that does not trust the certificate is refused by its own TLS check.
    let untrusting = client(Some(&self_signed(&dir.path().join("other")).cert_pem));
    let e = untrusting
        .get(format!("https://{host}/healthz"))
        .send()
        .await
        .expect_err("an unknown certificate must fail the handshake");
    assert!(e.is_connect(), "{e:?}");
    let _ = stop.send(());
}

#[tokio::test]
async fn unreadable_certificate_is_a_clear_start_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = TestRouter::settings(&dir.path().join("data"));
    settings.tls_cert = Some(dir.path().join("missing-cert.pem"));
    settings.tls_key = Some(dir.path().join("missing-key.pem"));
    let cfg = Config::from_settings(settings).expect("settings");
    let started = veil_router::server::prepare(cfg).await.expect("prepare");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let e = veil_router::server::serve(started.state, listener, std::future::pending())
        .await
        .expect_err("a missing certificate must stop the start");
    let msg = e.to_string();
    assert!(msg.contains("missing-cert.pem"), "{msg}");
}
