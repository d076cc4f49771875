//! Engine → sealer → upload body: runs the engine, seals its pieces as they come and hands the
//! sealed bytes on at once. Plaintext lives only in the engine's pieces (wiped when dropped) and
//! in the sealer's pending chunk (wiped too); what leaves here is ciphertext.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use veil_keys::{BlobParams, Sealer, SecretKey};

use crate::engine::{Engine, GenerateRequest, Generation, TokenReceiver, token_channel};
use crate::{Error, Result};

/// Pieces an engine may queue ahead of the sealer.
const TOKEN_QUEUE: usize = 256;

/// What a sealed result came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Produced {
    /// SHA-256 of the whole blob.
    pub(crate) sha256: [u8; 32],
    /// Its size in bytes.
    pub(crate) size: u64,
    /// Frames written.
    pub(crate) frames: u64,
    /// How the engine finished.
    pub(crate) generation: Generation,
}

struct Out<'a> {
    tx: &'a mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    hasher: Sha256,
    size: u64,
}

impl Out<'_> {
    async fn send(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let bytes = Bytes::from(std::mem::take(&mut self.buf));
        self.hasher.update(&bytes);
        self.size += bytes.len() as u64;
        self.tx.send(bytes).await.map_err(|_| Error::Protocol {
            endpoint: veil_api::routes::MINER_RESULT,
            detail: "the result upload ended before the blob did".into(),
        })
    }
}

/// Seals everything already queued; with `stream`, closes the chunk so it can travel now.
fn seal_queued(
    sealer: &mut Sealer,
    tokens: &mut TokenReceiver,
    stream: bool,
    out: &mut Vec<u8>,
) -> Result<()> {
    while let Some(piece) = tokens.try_recv() {
        sealer.update(piece.as_bytes(), out)?;
    }
    if stream {
        sealer.flush(out)?;
    }
    Ok(())
}

/// Runs `request` on `engine` and seals its output under `key` with `params`, sending the blob's
/// bytes into `tx` as they are produced: the header first, then with `stream` one frame per piece
/// (or per group of pieces that queued up meanwhile), otherwise a frame per full chunk; the last
/// frame only once the engine succeeded. On an engine error no last frame is written, so what was
/// sent never opens as a whole blob.
pub(crate) async fn produce(
    engine: &dyn Engine,
    request: GenerateRequest,
    key: &SecretKey,
    params: &BlobParams,
    stream: bool,
    tx: &mpsc::Sender<Bytes>,
) -> Result<Produced> {
    let mut sealer = Sealer::new(key, params)?;
    let mut out = Out {
        tx,
        buf: Vec::new(),
        hasher: Sha256::new(),
        size: 0,
    };
    // The header goes out at once, so the reader can start relaying.
    sealer.flush(&mut out.buf)?;
    out.send().await?;

    let (sink, mut tokens) = token_channel(TOKEN_QUEUE);
    let generate = engine.generate(request, sink);
    tokio::pin!(generate);
    let mut finished: Option<Result<Generation>> = None;
    loop {
        tokio::select! {
            res = &mut generate, if finished.is_none() => {
                finished = Some(res);
                // Whatever it sent before returning is queued: seal it and stop.
                seal_queued(&mut sealer, &mut tokens, stream, &mut out.buf)?;
                out.send().await?;
                break;
            }
            piece = tokens.recv() => match piece {
                Some(piece) => {
                    sealer.update(piece.as_bytes(), &mut out.buf)?;
                    drop(piece);
                    seal_queued(&mut sealer, &mut tokens, stream, &mut out.buf)?;
                    out.send().await?;
                }
                // Every sink is gone; the engine is about to return.
                None => break,
            },
        }
    }
    let generation = match finished {
        Some(res) => res?,
        None => generate.await?,
    };
    let frames = sealer.frames_written() + 1;
    sealer.finish(&mut out.buf)?;
    out.send().await?;
    Ok(Produced {
        sha256: out.hasher.finalize().into(),
        size: out.size,
        frames,
        generation,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;
    use veil_api::miner::{ChatMessage, PromptPayload, TaskParams};
    use veil_keys::{KeyId, Opener, Purpose};

    use super::*;
    use crate::InstantEngine;

    fn request(params: TaskParams) -> GenerateRequest {
        GenerateRequest {
            task_id: Uuid::nil(),
            model: "instant".into(),
            prompt: PromptPayload {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "tell me a story".into(),
                }],
                prompt: None,
                stop: vec![],
            },
            params,
        }
    }

    async fn run(
        engine: &InstantEngine,
        params: TaskParams,
    ) -> (Vec<Bytes>, Result<Produced>, SecretKey, KeyId) {
        let key = SecretKey::generate().unwrap();
        let id = KeyId::task(2, Uuid::now_v7(), Uuid::now_v7());
        let bp = BlobParams::new(id, Purpose::Result);
        let stream = params.stream;
        let (tx, mut rx) = mpsc::channel(4);
        let collect = async {
            let mut v = Vec::new();
            while let Some(b) = rx.recv().await {
                v.push(b);
            }
            v
        };
        let producing = async {
            let r = produce(engine, request(params), &key, &bp, stream, &tx).await;
            drop(tx);
            r
        };
        let (res, parts) = tokio::join!(producing, collect);
        (parts, res, key, id)
    }

    #[tokio::test]
    async fn streamed_result_opens_chunk_by_chunk_one_token_each() {
        let engine = InstantEngine::default().with_token_delay(Duration::from_millis(2));
        let params = TaskParams {
            max_tokens: Some(12),
            stream: true,
            ..TaskParams::default()
        };
        let expected = engine.plan(&request(params.clone()).prompt, &params).0;
        let (parts, res, key, id) = run(&engine, params).await;
        let produced = res.unwrap();
        assert_eq!(produced.generation.usage.completion_tokens, 12);

        // The whole blob hashes to what was reported.
        let blob: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let h: [u8; 32] = Sha256::digest(&blob).into();
        assert_eq!(h, produced.sha256);
        assert_eq!(blob.len() as u64, produced.size);

        // First the bare header, then one frame per token, then the (empty) last frame.
        assert_eq!(parts[0].len(), veil_keys::HEADER_LEN);
        let mut opener = Opener::new(&key);
        let mut chunks = Vec::new();
        for part in &parts {
            for chunk in opener.push(part).unwrap() {
                chunks.push(String::from_utf8(chunk.to_vec()).unwrap());
            }
        }
        let header = opener.finish().unwrap();
        assert_eq!(header.key, id);
        assert_eq!(header.purpose, Purpose::Result);
        let tokens: Vec<&str> = expected.iter().map(|p| p.as_str()).collect();
        assert_eq!(chunks.len(), tokens.len() + 1);
        assert_eq!(&chunks[..tokens.len()], &tokens[..]);
        assert_eq!(chunks.last().unwrap(), "");

        let opened = veil_keys::open(&key, &blob).unwrap();
        assert_eq!(&opened.plaintext[..], tokens.concat().as_bytes());
    }

    #[tokio::test]
    async fn non_streamed_result_is_one_chunk() {
        let engine = InstantEngine::default();
        let params = TaskParams::default();
        let expected = engine.expected_text(&request(params.clone()).prompt, &params);
        let (parts, res, key, _) = run(&engine, params).await;
        res.unwrap();
        let blob: Vec<u8> = parts.concat();
        let mut opener = Opener::new(&key);
        let chunks = opener.push(&blob).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(&chunks[0][..], expected.as_bytes());
    }

    #[tokio::test]
    async fn engine_failure_writes_no_last_frame() {
        let engine = InstantEngine::default().with_failure_after(3);
        let params = TaskParams {
            stream: true,
            ..TaskParams::default()
        };
        let (parts, res, key, _) = run(&engine, params).await;
        assert!(matches!(res, Err(Error::Engine(_))));
        let blob: Vec<u8> = parts.concat();
        let mut opener = Opener::new(&key);
        // The three tokens made it out (in one or more chunks), but no last frame.
        let chunks = opener.push(&blob).unwrap();
        let text: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let expected = engine
            .plan(
                &request(TaskParams::default()).prompt,
                &TaskParams::default(),
            )
            .0;
        assert_eq!(
            text,
            expected[..3]
                .iter()
                .map(|p| p.as_str())
                .collect::<String>()
                .as_bytes()
        );
        assert!(matches!(opener.finish(), Err(veil_keys::Error::Truncated)));
        assert!(veil_keys::open(&key, &blob).is_err());
    }

    #[tokio::test]
    async fn closed_upload_stops_the_engine() {
        let engine = InstantEngine::default().with_token_delay(Duration::from_millis(1));
        let key = SecretKey::generate().unwrap();
        let bp = BlobParams::new(
            KeyId::task(1, Uuid::now_v7(), Uuid::now_v7()),
            Purpose::Result,
        );
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let params = TaskParams {
            stream: true,
            ..TaskParams::default()
        };
        let res = produce(&engine, request(params), &key, &bp, true, &tx).await;
        assert!(matches!(res, Err(Error::Protocol { .. })));
    }
}
