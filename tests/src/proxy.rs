//! A loopback TCP proxy that records every byte clients send to the router, so that a test can
//! show what the router received on the wire (request lines, headers and bodies, whatever the
//! HTTP framing), not only what its handlers chose to look at.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy in front of one upstream address.
#[derive(Debug)]
pub struct RecordingProxy {
    /// `http://127.0.0.1:PORT` of the proxy: point clients here.
    pub url: String,
    received: Arc<Mutex<Vec<u8>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    /// Starts a proxy forwarding to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> RecordingProxy {
        let target = upstream
            .strip_prefix("http://")
            .expect("plain http upstream")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = target.clone();
                let rec = rec.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&target).await {
                        pipe(client, server, rec).await;
                    }
                });
            }
        });
        RecordingProxy {
            url,
            received,
            accept,
        }
    }

    /// Everything clients have sent through the proxy so far.
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().expect("proxy buffer").clone()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies both directions until either side closes, recording client → server bytes.
async fn pipe(client: TcpStream, server: TcpStream, rec: Arc<Mutex<Vec<u8>>>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            rec.lock()
                .expect("proxy buffer")
                .extend_from_slice(&buf[..n]);
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}
