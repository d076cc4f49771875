//! [`CompletionStream`]: a completion's text as the miner produces it.
//!
//! The router relays the miner's sealed result bytes as server-sent events (`start`, `bytes`,
//! `done`; see `veil_api::v3::StreamEvent`) without being able to read them. The client feeds
//! them to a streaming opener under `K_task` and yields each chunk's text once that chunk has
//! authenticated; on `done` it checks the miner's signed `TaskResult` and that the SHA-256 of
//! every byte received is the signed result hash.
//!
//! If the event stream breaks off, or ends without relaying the bytes (the task had finished
//! before the stream connected), the client waits for the task and falls back to the stored
//! result, verified the same way, yielding whatever text the stream had not yet delivered.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::ACCEPT;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use veil_api::ErrorBody;
use veil_api::routes;
use veil_api::v3::{StreamEvent, V3Task};
use veil_api::wire::Hex32;
use veil_keys::{Opener, Plaintext, SecretKey, derive_task_key};

use crate::client::{
    Client, EP_STREAM, check_result_header, final_result, transport, verify_task_result,
};
use crate::completion::StreamSummary;
use crate::session::Session;
use crate::sse::{SseEvent, SseParser, Utf8Carry};
use crate::{Error, Result};

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A stream of text deltas (`Result<String>`) of one completion. Each delta is the text of a
/// sealed chunk that authenticated; the last item is an error if a check failed.
/// [`CompletionStream::summary`] holds the verified metadata once the stream has ended well.
pub struct CompletionStream {
    task_id: Uuid,
    session_id: Uuid,
    summary: Arc<Mutex<Option<StreamSummary>>>,
    inner: Pin<Box<dyn Stream<Item = Result<String>> + Send>>,
}

impl fmt::Debug for CompletionStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionStream")
            .field("task_id", &self.task_id)
            .field("session_id", &self.session_id)
            .field("finished", &self.summary().is_some())
            .finish_non_exhaustive()
    }
}

impl CompletionStream {
    /// The task being streamed.
    pub fn task_id(&self) -> Uuid {
        self.task_id
    }

    /// Its session.
    pub fn session_id(&self) -> Uuid {
        self.session_id
    }

    /// The miner, usage, finish reason and result hash, once the stream ended and everything
    /// verified; `None` before, or after a failure.
    pub fn summary(&self) -> Option<StreamSummary> {
        self.summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the whole stream into one string (wiped when dropped).
    pub async fn collect_text(mut self) -> Result<zeroize::Zeroizing<String>> {
        let mut text = zeroize::Zeroizing::new(String::new());
        while let Some(delta) = self.next().await {
            let delta = zeroize::Zeroizing::new(delta?);
            text.push_str(&delta);
        }
        Ok(text)
    }

    pub(crate) async fn open(
        client: Client,
        session: Session,
        task: V3Task,
        prompt_hash: Option<Hex32>,
        deadline: Instant,
    ) -> Result<CompletionStream> {
        let k_session = client.session_key(&session, task.key_version).await?;
        let k_task = derive_task_key(&k_session, &task.task_id);
        drop(k_session);
        let url = client.url_with(routes::V3_TASK_STREAM, "task_id", task.task_id);
        let timeout = deadline.saturating_duration_since(Instant::now());
        let resp = client
            .authed(&session, EP_STREAM, || {
                client
                    .http()
                    .get(&url)
                    .header(ACCEPT, "text/event-stream")
                    .timeout(timeout)
            })
            .await?;
        let summary = Arc::new(Mutex::new(None));
        let state = StreamState {
            task_id: task.task_id,
            session_id: session.id(),
            key_version: task.key_version,
            client,
            session,
            prompt_hash,
            opener: Opener::new(&k_task),
            k_task,
            body: Some(Box::pin(resp.bytes_stream())),
            parser: SseParser::new(),
            events: VecDeque::new(),
            received: 0,
            header_checked: false,
            hasher: Sha256::new(),
            carry: Utf8Carry::new(),
            emitted: Plaintext::default(),
            pos: 0,
            out: VecDeque::new(),
            error: None,
            finished: false,
            deadline,
            summary: summary.clone(),
        };
        let inner = futures::stream::unfold(state, |mut st| async move {
            let item = st.next_item().await?;
            Some((item, st))
        });
        Ok(CompletionStream {
            task_id: task.task_id,
            session_id: task.session_id,
            summary,
            inner: Box::pin(inner),
        })
    }
}

impl Stream for CompletionStream {
    type Item = Result<String>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct StreamState {
    task_id: Uuid,
    session_id: Uuid,
    key_version: u32,
    client: Client,
    session: Session,
    prompt_hash: Option<Hex32>,
    k_task: SecretKey,
    body: Option<ByteStream>,
    parser: SseParser,
    events: VecDeque<SseEvent>,
    /// Sealed bytes received in the current attempt.
    received: u64,
    opener: Opener,
    header_checked: bool,
    hasher: Sha256,
    carry: Utf8Carry,
    /// Every plaintext byte yielded so far (to check a restarted attempt against).
    emitted: Plaintext,
    /// How many plaintext bytes of the current attempt have been matched or yielded.
    pos: usize,
    out: VecDeque<String>,
    error: Option<Error>,
    finished: bool,
    deadline: Instant,
    summary: Arc<Mutex<Option<StreamSummary>>>,
}

impl StreamState {
    /// The next delta, then the error if there was one, then the end.
    async fn next_item(&mut self) -> Option<Result<String>> {
        loop {
            if let Some(text) = self.out.pop_front() {
                return Some(Ok(text));
            }
            if let Some(e) = self.error.take() {
                return Some(Err(e));
            }
            if self.finished {
                return None;
            }
            if let Err(e) = self.step().await {
                self.finished = true;
                self.body = None;
                self.error = Some(e);
            }
        }
    }

    async fn step(&mut self) -> Result<()> {
        if let Some(ev) = self.events.pop_front() {
            return self.on_event(ev).await;
        }
        let Some(body) = self.body.as_mut() else {
            return self.fallback().await;
        };
        match tokio::time::timeout_at(self.deadline.into(), body.next()).await {
            Err(_) => Err(Error::Timeout {
                task_id: self.task_id,
            }),
            Ok(Some(Ok(bytes))) => {
                let events = self.parser.push(&bytes).map_err(|e| Error::Protocol {
                    endpoint: EP_STREAM,
                    detail: e.to_string(),
                })?;
                self.events.extend(events);
                Ok(())
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(task_id = %self.task_id, error = %transport(e),
                    "result stream broke off; falling back to the stored result");
                self.body = None;
                Ok(())
            }
            Ok(None) => {
                self.body = None;
                Ok(())
            }
        }
    }

    async fn on_event(&mut self, ev: SseEvent) -> Result<()> {
        if ev.event == "error" {
            let body =
                serde_json::from_str::<ErrorBody>(&ev.data).map_err(|_| Error::Protocol {
                    endpoint: EP_STREAM,
                    detail: "an error event without an error body".into(),
                })?;
            if body.error.code == "timeout" {
                // The router stopped waiting before this client's deadline: keep waiting by
                // polling, then read the stored result.
                self.body = None;
                return Ok(());
            }
            return Err(Error::from_api(
                502,
                &body.error.code,
                &body.error.message,
                body.error.param,
                None,
            ));
        }
        if !matches!(ev.event.as_str(), "start" | "bytes" | "done") {
            return Ok(()); // keep-alives and events of later versions
        }
        match parse_event(&ev)? {
            StreamEvent::Start { attempt } => {
                tracing::debug!(task_id = %self.task_id, attempt, "result stream (re)started");
                self.opener = Opener::new(&self.k_task);
                self.hasher = Sha256::new();
                self.header_checked = false;
                self.received = 0;
                self.pos = 0;
                Ok(())
            }
            StreamEvent::Bytes { b64 } => {
                let data = BASE64.decode(b64.as_bytes()).map_err(|_| Error::Protocol {
                    endpoint: EP_STREAM,
                    detail: "a bytes event is not base64".into(),
                })?;
                self.received += data.len() as u64;
                self.hasher.update(&data);
                let chunks = self.opener.push(&data).map_err(|e| {
                    Error::Integrity(format!(
                        "a streamed result chunk does not authenticate [{}]",
                        e.code()
                    ))
                })?;
                if !self.header_checked
                    && let Some(h) = self.opener.header()
                {
                    check_result_header(h, self.session_id, self.task_id)?;
                    if h.key.key_version != self.key_version {
                        return Err(Error::Integrity(
                            "the streamed result is sealed under another key version".into(),
                        ));
                    }
                    self.header_checked = true;
                }
                for chunk in chunks {
                    self.emit(&chunk)?;
                }
                Ok(())
            }
            StreamEvent::Done { task } => self.on_done(task).await,
        }
    }

    /// Yields plaintext of the current attempt: bytes already yielded by an earlier attempt
    /// must match; only what lies beyond goes out.
    fn emit(&mut self, mut bytes: &[u8]) -> Result<()> {
        if self.pos < self.emitted.len() {
            let n = bytes.len().min(self.emitted.len() - self.pos);
            if bytes[..n] != self.emitted[self.pos..self.pos + n] {
                return Err(Error::StreamRestarted {
                    task_id: self.task_id,
                });
            }
            self.pos += n;
            bytes = &bytes[n..];
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.emitted.extend_from_slice(bytes);
        self.pos += bytes.len();
        let text = self
            .carry
            .push(bytes)
            .map_err(|_| Error::Integrity("the result is not UTF-8 text".into()))?;
        if !text.is_empty() {
            self.out.push_back(text);
        }
        Ok(())
    }

    fn finish_text(&mut self) -> Result<()> {
        if self.pos < self.emitted.len() {
            // The final answer is shorter than what was already streamed.
            return Err(Error::StreamRestarted {
                task_id: self.task_id,
            });
        }
        self.carry
            .finish()
            .map_err(|_| Error::Integrity("the result is not UTF-8 text".into()))
    }

    async fn on_done(&mut self, task: V3Task) -> Result<()> {
        if task.task_id != self.task_id || task.session_id != self.session_id {
            return Err(Error::Protocol {
                endpoint: EP_STREAM,
                detail: "the done event names another task".into(),
            });
        }
        let result = final_result(&task)?;
        if self.received == 0 {
            // Nothing was relayed (the task finished before the stream connected, or the
            // router does not relay this one): read the stored result instead.
            self.body = None;
            return self.fallback_with(task).await;
        }
        let cfg = self.client.cached_config().await?;
        let miner = verify_task_result(
            &cfg.domain,
            &self.session.info(),
            &task,
            result,
            self.prompt_hash,
        )?;
        let hash = Hex32(self.hasher.clone().finalize().into());
        if !self.opener.is_complete() || hash != result.signed.message.result_hash {
            return Err(Error::Integrity(
                "the streamed result bytes do not match the miner's signed resultHash".into(),
            ));
        }
        self.finish_text()?;
        *self.summary.lock().unwrap_or_else(|e| e.into_inner()) = Some(StreamSummary {
            task_id: task.task_id,
            session_id: task.session_id,
            miner,
            usage: result.usage,
            finish_reason: result.finish_reason.clone(),
            key_version: self.key_version,
            result_hash: result.signed.message.result_hash,
        });
        self.finished = true;
        self.body = None;
        Ok(())
    }

    /// The stream ended before `done`: wait for the task, then use its stored result.
    async fn fallback(&mut self) -> Result<()> {
        let task = self
            .client
            .wait_until(&self.session, self.task_id, self.deadline)
            .await?;
        self.fallback_with(task).await
    }

    async fn fallback_with(&mut self, task: V3Task) -> Result<()> {
        let c = self
            .client
            .open_result(&self.session, &task, self.prompt_hash)
            .await?;
        // The whole stored text, checked against what was already yielded.
        self.pos = 0;
        self.emit(c.text.as_bytes())?;
        self.finish_text()?;
        *self.summary.lock().unwrap_or_else(|e| e.into_inner()) = Some(StreamSummary {
            task_id: c.task_id,
            session_id: c.session_id,
            miner: c.miner,
            usage: c.usage,
            finish_reason: c.finish_reason.clone(),
            key_version: c.key_version,
            result_hash: c.result_hash,
        });
        self.finished = true;
        Ok(())
    }
}

/// An event's data as a [`StreamEvent`]: the data is the variant's JSON, with or without the
/// `event` tag (the SSE event name supplies it when absent).
fn parse_event(ev: &SseEvent) -> Result<StreamEvent> {
    let bad = |detail: String| Error::Protocol {
        endpoint: EP_STREAM,
        detail,
    };
    let mut value: serde_json::Value =
        serde_json::from_str(&ev.data).map_err(|e| bad(format!("{} event: {e}", ev.event)))?;
    if let Some(obj) = value.as_object_mut()
        && !obj.contains_key("event")
    {
        obj.insert("event".into(), serde_json::Value::String(ev.event.clone()));
    }
    serde_json::from_value(value).map_err(|e| bad(format!("{} event: {e}", ev.event)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_with_or_without_their_tag() {
        let tagged = SseEvent {
            event: "bytes".into(),
            data: r#"{"event":"bytes","b64":"AAE="}"#.into(),
        };
        let bare = SseEvent {
            event: "bytes".into(),
            data: r#"{"b64":"AAE="}"#.into(),
        };
        for ev in [tagged, bare] {
            assert_eq!(
                parse_event(&ev).unwrap(),
                StreamEvent::Bytes { b64: "AAE=".into() }
            );
        }
        let start = SseEvent {
            event: "start".into(),
            data: r#"{"attempt":2}"#.into(),
        };
        assert_eq!(
            parse_event(&start).unwrap(),
            StreamEvent::Start { attempt: 2 }
        );
        let bad = SseEvent {
            event: "bytes".into(),
            data: "nope".into(),
        };
        assert!(matches!(parse_event(&bad), Err(Error::Protocol { .. })));
    }
}
