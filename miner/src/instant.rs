//! A deterministic engine without a model, for tests, benchmarks and demos.

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use veil_api::miner::{PromptPayload, ServedModel, TaskParams, Usage};
use zeroize::Zeroizing;

use crate::engine::{Engine, FINISH_LENGTH, FINISH_STOP, GenerateRequest, Generation, TokenSink};
use crate::{Error, Result};

/// The words the instant engine speaks.
const WORDS: &[&str] = &[
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "amber", "basil", "cedar", "dune",
    "ember", "fern", "glade", "harbor", "iris", "jade", "kelp", "lotus", "maple", "nectar", "opal",
    "pine", "quartz", "reed", "sage", "thyme", "umber", "vale", "willow", "yarrow", "zephyr",
    "acorn", "brook", "cliff", "delta", "field", "grove", "heath", "inlet", "knoll", "marsh",
    "ridge", "shore", "tide",
];

/// A deterministic engine: emits up to `max_tokens` (default 16) short words derived from a
/// SHA-256 of the prompt and the seed, one word per token (the first without, the others with a
/// leading space). Prompt tokens are the whitespace-separated words of the prompt's texts.
/// Stop sequences of the prompt and the parameters end the output before they would appear.
///
/// Optionally waits between tokens ([`InstantEngine::with_token_delay`]), to exercise streaming
/// and killing a miner mid-lease, and fails after some tokens
/// ([`InstantEngine::with_failure_after`]), to exercise the release path.
#[derive(Debug, Clone)]
pub struct InstantEngine {
    models: Vec<ServedModel>,
    default_max_tokens: u32,
    token_delay: Duration,
    fail_after: Option<u32>,
}

impl InstantEngine {
    /// `max_tokens` when the task does not say.
    pub const DEFAULT_MAX_TOKENS: u32 = 16;

    /// An engine serving the given model names (reported at login without a hash).
    pub fn new<I, S>(models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::serving(models.into_iter().map(|name| ServedModel {
            name: name.into(),
            sha256: None,
        }))
    }

    /// An engine serving the given models, reported at login as given (with the SHA-256 of
    /// their files, which a router that pins the model checks).
    pub fn serving<I>(models: I) -> Self
    where
        I: IntoIterator<Item = ServedModel>,
    {
        Self {
            models: models.into_iter().collect(),
            default_max_tokens: Self::DEFAULT_MAX_TOKENS,
            token_delay: Duration::ZERO,
            fail_after: None,
        }
    }

    /// Sets `max_tokens` for tasks that do not set one.
    pub fn with_default_max_tokens(mut self, n: u32) -> Self {
        self.default_max_tokens = n;
        self
    }

    /// Waits this long before each token.
    pub fn with_token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    /// Fails with [`Error::Engine`] once it has emitted `n` tokens (at the end when the output is
    /// shorter): every generation of this engine fails.
    pub fn with_failure_after(mut self, n: u32) -> Self {
        self.fail_after = Some(n);
        self
    }

    /// Prompt tokens: whitespace-separated words of every message and of the plain prompt.
    pub fn prompt_tokens(prompt: &PromptPayload) -> u32 {
        let words = prompt
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum::<usize>()
            + prompt
                .prompt
                .as_deref()
                .map_or(0, |p| p.split_whitespace().count());
        u32::try_from(words).unwrap_or(u32::MAX)
    }

    /// The pieces this engine emits for `prompt` and `params` (ignoring any injected failure),
    /// and how the generation ends. Deterministic: tests compute the expected result with it.
    pub fn plan(
        &self,
        prompt: &PromptPayload,
        params: &TaskParams,
    ) -> (Vec<Zeroizing<String>>, Generation) {
        let max_tokens = params.max_tokens.unwrap_or(self.default_max_tokens);
        let stops: Vec<&str> = prompt
            .stop
            .iter()
            .chain(params.stop.iter())
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();

        let mut base = Sha256::new();
        base.update(b"veil/instant-engine/v1");
        {
            let json = Zeroizing::new(serde_json::to_vec(prompt).unwrap_or_default());
            base.update((json.len() as u64).to_be_bytes());
            base.update(&json[..]);
        }
        base.update(params.seed.unwrap_or(0).to_be_bytes());

        let mut text = Zeroizing::new(String::new());
        let mut pieces = Vec::new();
        let mut finish_reason = FINISH_LENGTH;
        for i in 0..max_tokens {
            let mut h = base.clone();
            h.update(i.to_be_bytes());
            let d = h.finalize();
            let word = WORDS[usize::from(u16::from_be_bytes([d[0], d[1]])) % WORDS.len()];
            let piece = if i == 0 {
                word.to_string()
            } else {
                format!(" {word}")
            };
            let before = text.len();
            text.push_str(&piece);
            // The earliest stop sequence that now appears ends the output just before it.
            if let Some(at) = stops.iter().filter_map(|s| text.find(s)).min() {
                if at > before {
                    pieces.push(Zeroizing::new(text[before..at].to_string()));
                }
                finish_reason = FINISH_STOP;
                break;
            }
            pieces.push(Zeroizing::new(piece));
        }
        let generation = Generation {
            usage: Usage {
                prompt_tokens: Self::prompt_tokens(prompt),
                completion_tokens: u32::try_from(pieces.len()).unwrap_or(u32::MAX),
            },
            finish_reason: finish_reason.to_string(),
        };
        (pieces, generation)
    }

    /// The whole text [`InstantEngine::plan`] produces.
    pub fn expected_text(&self, prompt: &PromptPayload, params: &TaskParams) -> Zeroizing<String> {
        let (pieces, _) = self.plan(prompt, params);
        Zeroizing::new(pieces.iter().map(|p| p.as_str()).collect())
    }
}

impl Default for InstantEngine {
    /// Serves the model `instant`.
    fn default() -> Self {
        Self::new(["instant"])
    }
}

#[async_trait]
impl Engine for InstantEngine {
    fn models(&self) -> Vec<ServedModel> {
        self.models.clone()
    }

    async fn generate(&self, request: GenerateRequest, sink: TokenSink) -> Result<Generation> {
        let (pieces, generation) = self.plan(&request.prompt, &request.params);
        drop(request);
        for (i, piece) in pieces.into_iter().enumerate() {
            if self.fail_after.is_some_and(|n| i >= n as usize) {
                return Err(Error::Engine(format!("injected failure after {i} tokens")));
            }
            if !self.token_delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(self.token_delay) => {}
                    _ = sink.closed() => return Err(Error::SinkClosed),
                }
            }
            sink.send(piece.as_str()).await?;
        }
        if let Some(n) = self.fail_after {
            return Err(Error::Engine(format!("injected failure after {n} tokens")));
        }
        Ok(generation)
    }
}

#[cfg(test)]
mod tests {
    use veil_api::miner::ChatMessage;

    use super::*;
    use crate::engine::token_channel;

    fn chat(text: &str) -> PromptPayload {
        PromptPayload {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: text.into(),
            }],
            prompt: None,
            stop: vec![],
        }
    }

    async fn run(
        engine: &InstantEngine,
        prompt: PromptPayload,
        params: TaskParams,
    ) -> (String, Result<Generation>) {
        let (sink, mut rx) = token_channel(4);
        let req = GenerateRequest {
            task_id: uuid::Uuid::nil(),
            model: "instant".into(),
            prompt,
            params,
        };
        let collect = async {
            let mut out = String::new();
            while let Some(p) = rx.recv().await {
                out.push_str(&p);
            }
            out
        };
        let (res, text) = tokio::join!(engine.generate(req, sink), collect);
        (text, res)
    }

    #[tokio::test]
    async fn deterministic_and_seed_dependent() {
        let e = InstantEngine::default();
        let p = TaskParams::default();
        let (a, ga) = run(&e, chat("hello there world"), p.clone()).await;
        let (b, _) = run(&e, chat("hello there world"), p.clone()).await;
        assert_eq!(a, b);
        let ga = ga.unwrap();
        assert_eq!(ga.usage.prompt_tokens, 3);
        assert_eq!(ga.usage.completion_tokens, 16);
        assert_eq!(ga.finish_reason, "length");
        assert_eq!(a.split(' ').count(), 16);
        assert_eq!(a, e.expected_text(&chat("hello there world"), &p).as_str());

        let seeded = TaskParams {
            seed: Some(7),
            ..TaskParams::default()
        };
        let (c, _) = run(&e, chat("hello there world"), seeded).await;
        assert_ne!(a, c);
        let (d, _) = run(&e, chat("hello there planet"), p).await;
        assert_ne!(a, d);
    }

    #[tokio::test]
    async fn max_tokens_and_stop_sequences() {
        let e = InstantEngine::default();
        let params = TaskParams {
            max_tokens: Some(40),
            ..TaskParams::default()
        };
        let (full, g) = run(&e, chat("x"), params.clone()).await;
        assert_eq!(g.unwrap().usage.completion_tokens, 40);

        // Stop at the fifth word: the output is everything before it.
        let fifth: Vec<&str> = full.split(' ').collect();
        let stop = format!(" {}", fifth[4]);
        let cut = full.find(&stop).unwrap();
        // The prompt's own stop sequences change the prompt (and so the words): use the
        // parameters' here; both are honoured the same way.
        let stopping = TaskParams {
            stop: vec![stop],
            ..params.clone()
        };
        let (text, g) = run(&e, chat("x"), stopping).await;
        let g = g.unwrap();
        assert_eq!(text, full[..cut]);
        assert_eq!(g.finish_reason, "stop");

        // A stop sequence in the prompt counts too: a space stops after the first word.
        let mut prompt = chat("x");
        prompt.stop = vec![" ".into()];
        let (one, g) = run(&e, prompt, TaskParams::default()).await;
        assert!(!one.is_empty() && !one.contains(' '), "{one}");
        assert_eq!(g.unwrap().usage.completion_tokens, 1);

        let (none, g) = run(
            &e,
            chat("x"),
            TaskParams {
                max_tokens: Some(0),
                ..TaskParams::default()
            },
        )
        .await;
        assert_eq!(none, "");
        assert_eq!(g.unwrap().usage.completion_tokens, 0);
    }

    #[tokio::test]
    async fn injected_failure_and_closed_sink() {
        let e = InstantEngine::default().with_failure_after(3);
        let (text, g) = run(&e, chat("a b"), TaskParams::default()).await;
        assert!(matches!(g, Err(Error::Engine(_))));
        assert_eq!(text.split(' ').count(), 3);

        let e = InstantEngine::default().with_token_delay(Duration::from_millis(1));
        let (sink, rx) = token_channel(1);
        drop(rx);
        let req = GenerateRequest {
            task_id: uuid::Uuid::nil(),
            model: "instant".into(),
            prompt: chat("a"),
            params: TaskParams::default(),
        };
        assert!(matches!(
            e.generate(req, sink).await,
            Err(Error::SinkClosed)
        ));
    }

    #[test]
    fn prompt_tokens_count_words_of_all_texts() {
        let mut p = chat("one two\tthree\n four");
        p.prompt = Some("five six".into());
        assert_eq!(InstantEngine::prompt_tokens(&p), 6);
    }
}
