//! What a caller asks for and what it gets back.

use std::fmt;

use alloy::primitives::Address;
use uuid::Uuid;
use veil_api::miner::{ChatMessage, PromptPayload, TaskParams, Usage};
use veil_api::wire::Hex32;
use zeroize::{Zeroize, Zeroizing};

use crate::{Error, Result};

/// A completion request: chat messages or a plain prompt, the model, and sampling parameters.
///
/// The messages, the prompt and the stop sequences are sealed on this machine (they go into the
/// sealed prompt, never into the clear parameters); they are wiped when the request is dropped
/// and never appear in `Debug` output.
#[derive(Clone)]
pub struct CompletionRequest {
    /// Model name, as the miners serve it.
    pub model: String,
    /// Chat messages (empty for a plain completion).
    pub messages: Vec<ChatMessage>,
    /// A plain completion prompt.
    pub prompt: Option<String>,
    /// Upper bound on generated tokens.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Stop sequences (sealed with the prompt).
    pub stop: Vec<String>,
    /// Sampling seed.
    pub seed: Option<u64>,
}

impl CompletionRequest {
    fn empty(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            messages: Vec::new(),
            prompt: None,
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            seed: None,
        }
    }

    /// A chat completion with the given messages.
    pub fn chat(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        let mut r = Self::empty(model);
        r.messages = messages;
        r
    }

    /// A chat completion with one user message.
    pub fn user(model: impl Into<String>, content: impl Into<String>) -> Self {
        Self::chat(model, vec![message("user", content)])
    }

    /// A plain (legacy `prompt`) completion.
    pub fn prompt(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        let mut r = Self::empty(model);
        r.prompt = Some(prompt.into());
        r
    }

    /// Puts a system message first.
    pub fn system(mut self, content: impl Into<String>) -> Self {
        self.messages.insert(0, message("system", content));
        self
    }

    /// Appends a message.
    pub fn push_message(mut self, role: impl Into<String>, content: impl Into<String>) -> Self {
        self.messages.push(message(role, content));
        self
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Sets the temperature.
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = Some(t);
        self
    }

    /// Sets `top_p`.
    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = Some(p);
        self
    }

    /// Adds a stop sequence.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.model.trim().is_empty() {
            return Err(Error::Invalid("a model name is required".into()));
        }
        if self.messages.is_empty() && self.prompt.is_none() {
            return Err(Error::Invalid(
                "a completion needs messages or a prompt".into(),
            ));
        }
        Ok(())
    }

    /// The plaintext that is sealed: messages, prompt and stop sequences.
    pub(crate) fn payload(&self) -> PromptPayload {
        PromptPayload {
            messages: self.messages.clone(),
            prompt: self.prompt.clone(),
            stop: self.stop.clone(),
        }
    }

    /// The clear parameters: never the stop sequences.
    pub(crate) fn params(&self, stream: bool) -> TaskParams {
        TaskParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: Vec::new(),
            seed: self.seed,
            stream,
        }
    }
}

fn message(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

impl Drop for CompletionRequest {
    fn drop(&mut self) {
        // Messages wipe themselves.
        self.prompt.zeroize();
        self.stop.zeroize();
    }
}

impl fmt::Debug for CompletionRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionRequest")
            .field("model", &self.model)
            .field("messages", &self.messages.len())
            .field("prompt", &self.prompt.as_ref().map(|_| "<sealed>"))
            .field("stop", &self.stop.len())
            .field("max_tokens", &self.max_tokens)
            .field("temperature", &self.temperature)
            .field("top_p", &self.top_p)
            .field("seed", &self.seed)
            .finish()
    }
}

/// A finished, verified completion: the miner's signature, the result's hash and its AEAD all
/// checked before the text was opened.
#[non_exhaustive]
pub struct Completion {
    /// The generated text (wiped when dropped).
    pub text: Zeroizing<String>,
    /// The task.
    pub task_id: Uuid,
    /// Its session.
    pub session_id: Uuid,
    /// The model that ran.
    pub model: String,
    /// The miner that ran it (it signed the result).
    pub miner: Address,
    /// Token counts.
    pub usage: Usage,
    /// `stop`, `length`, …
    pub finish_reason: String,
    /// Key version the result was sealed under.
    pub key_version: u32,
    /// SHA-256 of the sealed result blob.
    pub result_hash: Hex32,
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("text_len", &self.text.len())
            .field("task_id", &self.task_id)
            .field("session_id", &self.session_id)
            .field("model", &self.model)
            .field("miner", &self.miner)
            .field("usage", &self.usage)
            .field("finish_reason", &self.finish_reason)
            .field("key_version", &self.key_version)
            .field("result_hash", &self.result_hash)
            .finish()
    }
}

/// What a finished stream verified: everything of a [`Completion`] but the text, which went out
/// as deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The task.
    pub task_id: Uuid,
    /// Its session.
    pub session_id: Uuid,
    /// The miner that ran it (it signed the result).
    pub miner: Address,
    /// Token counts.
    pub usage: Usage,
    /// `stop`, `length`, …
    pub finish_reason: String,
    /// Key version the result was sealed under.
    pub key_version: u32,
    /// SHA-256 of the sealed result blob.
    pub result_hash: Hex32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_goes_into_the_sealed_payload_not_the_params() {
        let r = CompletionRequest::user("tiny", "hi")
            .system("be brief")
            .stop("END")
            .max_tokens(5)
            .seed(3);
        let p = r.payload();
        assert_eq!(p.stop, vec!["END".to_string()]);
        assert_eq!(p.messages[0].role, "system");
        assert_eq!(p.messages[1].content, "hi");
        let params = r.params(true);
        assert!(params.stop.is_empty());
        assert_eq!(params.max_tokens, Some(5));
        assert!(params.stream);
    }

    #[test]
    fn debug_hides_the_prompt() {
        let r = CompletionRequest::prompt("tiny", "my secret prompt").stop("secret stop");
        let d = format!("{r:?}");
        assert!(!d.contains("secret"), "{d}");
        let r = CompletionRequest::user("tiny", "my secret chat");
        assert!(!format!("{r:?}").contains("secret"));
    }

    #[test]
    fn validation() {
        assert!(CompletionRequest::chat("tiny", vec![]).validate().is_err());
        assert!(CompletionRequest::user(" ", "x").validate().is_err());
        assert!(CompletionRequest::prompt("tiny", "").validate().is_ok());
    }
}
