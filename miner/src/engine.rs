//! The inference engine interface: an opened prompt in, text pieces out through a [`TokenSink`].
//!
//! An engine may run on the worker's runtime (an `async fn` that awaits [`TokenSink::send`]) or on
//! threads of its own (a model server with its own runtime, fed through a channel): the sink is
//! `Clone + Send + 'static`, can be moved to another thread and fed there with
//! [`TokenSink::blocking_send`], and tells the engine when the worker no longer wants the output
//! ([`TokenSink::is_closed`], [`TokenSink::closed`]) so that generation can stop early.

use std::fmt;

use async_trait::async_trait;
use tokio::sync::mpsc;
use uuid::Uuid;
use veil_api::miner::{PromptPayload, ServedModel, TaskParams, Usage};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// `finish_reason` when generation ended naturally or on a stop sequence.
pub const FINISH_STOP: &str = "stop";
/// `finish_reason` when generation hit `max_tokens`.
pub const FINISH_LENGTH: &str = "length";

/// What an engine is asked to run. Owned, so that it can travel to an engine thread; the prompt
/// wipes its strings when dropped. Its `Debug` shows no content.
pub struct GenerateRequest {
    /// The task, for the engine's logs (never log the prompt).
    pub task_id: Uuid,
    /// The model the task asks for.
    pub model: String,
    /// The opened prompt.
    pub prompt: PromptPayload,
    /// Sampling parameters (`stop` from here and from the prompt both apply).
    pub params: TaskParams,
}

impl GenerateRequest {
    /// The stop sequences of the prompt and of the parameters together.
    pub fn stop_sequences(&self) -> impl Iterator<Item = &str> {
        self.prompt
            .stop
            .iter()
            .chain(self.params.stop.iter())
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

impl fmt::Debug for GenerateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateRequest")
            .field("task_id", &self.task_id)
            .field("model", &self.model)
            .field("messages", &self.prompt.messages.len())
            .field("has_prompt", &self.prompt.prompt.is_some())
            .field("max_tokens", &self.params.max_tokens)
            .field("stream", &self.params.stream)
            .finish_non_exhaustive()
    }
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Token counts.
    pub usage: Usage,
    /// `stop`, `length`, …
    pub finish_reason: String,
}

/// An inference engine. Object safe: the worker holds it as `Arc<dyn Engine>`.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The models this engine serves (sent at login).
    fn models(&self) -> Vec<ServedModel>;

    /// Runs one request, sending the generated text piece by piece into `sink`, in order.
    ///
    /// Return when done (or when [`TokenSink::send`] fails: the worker abandoned the task). The
    /// worker seals each piece as it arrives and, for a streaming caller, sends it on at once.
    async fn generate(&self, request: GenerateRequest, sink: TokenSink) -> Result<Generation>;
}

/// Where an engine puts generated text. Cheap to clone; pieces are wiped once sealed.
#[derive(Clone)]
pub struct TokenSink {
    tx: mpsc::Sender<Zeroizing<String>>,
}

impl fmt::Debug for TokenSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSink")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl TokenSink {
    /// Sends one piece of text (a token or a few), waiting while the consumer is behind.
    /// Fails with [`Error::SinkClosed`] once the consumer is gone: stop generating then.
    pub async fn send(&self, piece: impl Into<String>) -> Result<()> {
        self.tx
            .send(Zeroizing::new(piece.into()))
            .await
            .map_err(|_| Error::SinkClosed)
    }

    /// [`TokenSink::send`] for a thread outside the async runtime (an engine's own thread).
    /// Must not be called from within an async context.
    pub fn blocking_send(&self, piece: impl Into<String>) -> Result<()> {
        self.tx
            .blocking_send(Zeroizing::new(piece.into()))
            .map_err(|_| Error::SinkClosed)
    }

    /// Whether the consumer is gone (the task was abandoned).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves once the consumer is gone; an engine can `select!` on it to stop early.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The consuming end of a [`TokenSink`].
pub struct TokenReceiver {
    rx: mpsc::Receiver<Zeroizing<String>>,
}

impl fmt::Debug for TokenReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReceiver")
            .field("queued", &self.rx.len())
            .finish()
    }
}

impl TokenReceiver {
    /// The next piece, or `None` once every sink is dropped and the queue is empty.
    pub async fn recv(&mut self) -> Option<Zeroizing<String>> {
        self.rx.recv().await
    }

    /// A piece that is already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Zeroizing<String>> {
        self.rx.try_recv().ok()
    }
}

/// A sink and its receiver, with room for `capacity` queued pieces (at least 1).
pub fn token_channel(capacity: usize) -> (TokenSink, TokenReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (TokenSink { tx }, TokenReceiver { rx })
}
