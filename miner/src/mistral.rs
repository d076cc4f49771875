//! The mistral.rs engine: local safetensors (Hugging Face layout) and GGUF models, the model's
//! own chat template, sampling parameters from the task, and token streaming into the sealer.
//!
//! Each model runs in a mistral.rs engine, which lives on a thread and runtime of its own and is
//! fed through a channel; [`MistralEngine::generate`] sends it one request and relays the tokens
//! it answers with into the worker's [`TokenSink`] as they come, so sealed result chunks flow
//! while generation runs.
//!
//! Privacy: the prompt is handed to mistral.rs in memory only; its prefix cache is turned off so
//! that no earlier prompt's state outlives its task; errors from mistral.rs are reported by kind,
//! never by message (a message could quote the input). Buffers inside mistral.rs (the rendered
//! prompt, token ids, the decoded text) are its own and are freed, not wiped, when the request
//! ends.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use mistralrs::core::RequestMessage;
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, Model, NormalRequest, Request,
    RequestLike, Response, SamplingParams, StopTokens, Tensor, TextMessageRole, TextMessages,
    TextModelBuilder, TokenSource,
};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use tokio::sync::mpsc;
use tracing::info;
use veil_api::miner::{ServedModel, Usage};
use zeroize::{Zeroize, Zeroizing};

use crate::config::Device;
use crate::engine::{Engine, FINISH_LENGTH, FINISH_STOP, GenerateRequest, Generation, TokenSink};
use crate::{Error, Result};

/// `max_tokens` when the task does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// How the mistral.rs engine runs its models.
#[derive(Debug, Clone)]
pub struct MistralOptions {
    /// Where the models run.
    pub device: Device,
    /// Sequences a model runs at once (the miner's concurrency).
    pub max_seqs: usize,
    /// A cache directory for mistral.rs (it keeps no prompt there; models load from local paths
    /// and nothing is downloaded).
    pub cache_dir: PathBuf,
}

/// A model to load: its name, its files, and the digest reported at login.
#[derive(Debug, Clone)]
pub struct MistralModel {
    /// Reported at login (name and SHA-256 of the files).
    pub served: ServedModel,
    /// A directory in the Hugging Face layout (`config.json`, `*.safetensors`, `tokenizer.json`,
    /// `tokenizer_config.json` with a `chat_template`), or a `.gguf` file (tokenizer and chat
    /// template from its metadata), or a directory holding exactly one `.gguf` file.
    pub path: PathBuf,
}

/// The mistral.rs engine (see the module docs).
pub struct MistralEngine {
    served: Vec<ServedModel>,
    models: HashMap<String, Arc<Model>>,
}

impl fmt::Debug for MistralEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MistralEngine")
            .field("models", &self.served)
            .finish()
    }
}

/// The format of a model on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// A Hugging Face directory.
    Safetensors(PathBuf),
    /// A GGUF file: its directory and file name.
    Gguf(PathBuf, String),
}

fn model_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Model {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

fn layout(path: &Path) -> Result<Layout> {
    let meta = std::fs::metadata(path).map_err(|e| {
        model_err(
            path,
            match e.kind() {
                std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                _ => e.to_string(),
            },
        )
    })?;
    let is_gguf = |p: &Path| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    };
    let split = |file: &Path| -> Result<Layout> {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| model_err(file, "file name is not UTF-8"))?;
        Ok(Layout::Gguf(dir.to_path_buf(), name.to_string()))
    };
    if meta.is_file() {
        if is_gguf(path) {
            return split(path);
        }
        return Err(model_err(
            path,
            "not a model: expected a .gguf file or a directory with config.json and *.safetensors",
        ));
    }
    if path.join("config.json").is_file() {
        let has_weights = std::fs::read_dir(path)
            .map_err(|e| model_err(path, e.to_string()))?
            .filter_map(|e| e.ok())
            .any(|e| {
                e.path()
                    .extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
            });
        if !has_weights {
            return Err(model_err(path, "config.json but no *.safetensors file"));
        }
        if !path.join("tokenizer.json").is_file() {
            return Err(model_err(path, "no tokenizer.json"));
        }
        return Ok(Layout::Safetensors(path.to_path_buf()));
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| model_err(path, e.to_string()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_gguf(p))
        .collect();
    match ggufs.as_slice() {
        [one] => split(one),
        [] => Err(model_err(
            path,
            "not a model: no config.json (with *.safetensors) and no .gguf file",
        )),
        _ => Err(model_err(
            path,
            "several .gguf files: name the one to serve (NAME=PATH/FILE.gguf)",
        )),
    }
}

impl MistralEngine {
    /// Loads every model (mistral.rs shows its progress on a terminal). Fails with the model and
    /// path at fault when one does not load.
    pub async fn load(models: Vec<MistralModel>, opts: &MistralOptions) -> Result<Self> {
        if models.is_empty() {
            return Err(Error::Config(
                "the mistralrs engine needs at least one --model NAME=PATH".into(),
            ));
        }
        std::fs::create_dir_all(&opts.cache_dir)
            .map_err(|e| model_err(&opts.cache_dir, e.to_string()))?;
        let mut loaded = HashMap::new();
        let mut served = Vec::new();
        for m in models {
            let started = Instant::now();
            let layout = layout(&m.path)?;
            let device = match opts.device {
                Device::Cpu => None,
                Device::Cuda => {
                    let d = mistralrs::best_device(false)
                        .map_err(|e| Error::Config(format!("device cuda: {e}")))?;
                    if !d.is_cuda() {
                        return Err(Error::Config(
                            "device cuda: no CUDA device, or this build lacks the `cuda` feature"
                                .into(),
                        ));
                    }
                    Some(d)
                }
            };
            let max_seqs = opts.max_seqs.max(1);
            let built = match &layout {
                Layout::Safetensors(dir) => {
                    let mut b = TextModelBuilder::new(dir.display().to_string())
                        .with_token_source(TokenSource::None)
                        .with_prefix_cache_n(None)
                        .with_max_num_seqs(max_seqs)
                        .from_hf_cache_path(opts.cache_dir.clone());
                    b = match device {
                        Some(d) => b.with_device(d),
                        None => b.with_force_cpu(),
                    };
                    b.build().await
                }
                Layout::Gguf(dir, file) => {
                    let mut b =
                        GgufModelBuilder::new(dir.display().to_string(), vec![file.clone()])
                            .with_token_source(TokenSource::None)
                            .with_prefix_cache_n(None)
                            .with_max_num_seqs(max_seqs);
                    b = match device {
                        Some(d) => b.with_device(d),
                        None => b.with_force_cpu(),
                    };
                    b.build().await
                }
            };
            // A load error names files and formats, never prompts: it is safe to show.
            let model = built
                .map_err(|e| model_err(&m.path, format!("mistral.rs could not load it: {e:#}")))?;
            info!(
                model = %m.served.name,
                path = %m.path.display(),
                format = match layout { Layout::Safetensors(_) => "safetensors", Layout::Gguf(..) => "gguf" },
                ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            if loaded
                .insert(m.served.name.clone(), Arc::new(model))
                .is_some()
            {
                return Err(Error::Config(format!(
                    "model {} is listed twice",
                    m.served.name
                )));
            }
            served.push(m.served);
        }
        Ok(Self {
            served,
            models: loaded,
        })
    }

    /// The loaded mistral.rs model serving `name`, e.g. to call it directly in a benchmark.
    pub fn model(&self, name: &str) -> Option<Arc<Model>> {
        self.models.get(name).cloned()
    }
}

/// Counts the tokens of a request as mistral.rs samples them: the first call sees the whole
/// prompt as context, and there is one call per generated token.
#[derive(Default)]
struct TokenCounter {
    counts: Mutex<(usize, usize)>,
}

impl TokenCounter {
    fn usage(&self) -> Usage {
        let (prompt, completion) = *self.counts.lock().unwrap_or_else(|p| p.into_inner());
        Usage {
            prompt_tokens: u32::try_from(prompt).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(completion).unwrap_or(u32::MAX),
        }
    }
}

impl CustomLogitsProcessor for TokenCounter {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.1 == 0 {
            c.0 = context.len();
        }
        c.1 += 1;
        Ok(logits.clone())
    }
}

/// Temperature and nucleus sampling from a per-request ChaCha8 stream seeded with the task's
/// `seed`, so that a seeded request gives the same text every time (mistral.rs's own sampler
/// draws from one generator shared by all requests). It picks the token and masks every other,
/// and the engine's greedy step then takes it.
struct SeededSampler {
    temperature: f32,
    top_p: f32,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededSampler {
    fn new(seed: u64, temperature: f32, top_p: Option<f32>) -> Self {
        Self {
            temperature,
            top_p: top_p.filter(|p| *p > 0.0 && *p < 1.0).unwrap_or(1.0),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// The index drawn from `logits`.
    fn pick(&self, logits: &[f32]) -> usize {
        let max = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| (i, ((l - max) / self.temperature).exp()))
            .collect();
        if probs.is_empty() {
            return 0;
        }
        // Most likely first; ties by index so the order is total and repeatable.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p.1 / total;
                if acc >= self.top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let u = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
        };
        let mut target = u * total;
        for (i, p) in &probs {
            if target < *p {
                return *i;
            }
            target -= p;
        }
        probs[probs.len() - 1].0
    }
}

impl CustomLogitsProcessor for SeededSampler {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> mistralrs::Result<Tensor> {
        let values: Vec<f32> = logits.to_dtype(mistralrs::DType::F32)?.to_vec1()?;
        let chosen = self.pick(&values);
        let mut masked = vec![f32::NEG_INFINITY; values.len()];
        masked[chosen] = 0.0;
        Tensor::from_vec(masked, values.len(), logits.device())
    }
}

fn role(name: &str) -> TextMessageRole {
    match name {
        "user" => TextMessageRole::User,
        "assistant" => TextMessageRole::Assistant,
        "system" => TextMessageRole::System,
        "tool" => TextMessageRole::Tool,
        other => TextMessageRole::Custom(other.to_string()),
    }
}

/// What mistral.rs is asked: the messages (chat template applied by mistral.rs) or the plain
/// prompt, and the sampling parameters.
fn build_request(
    request: &GenerateRequest,
    counter: Arc<TokenCounter>,
    tx: mpsc::Sender<Response>,
) -> Result<Request> {
    let messages = if !request.prompt.messages.is_empty() {
        let mut chat = TextMessages::new();
        for m in &request.prompt.messages {
            chat = chat.add_message(role(&m.role), &m.content);
        }
        chat.take_messages()
    } else if let Some(text) = &request.prompt.prompt {
        RequestMessage::Completion {
            text: text.clone(),
            echo_prompt: false,
            best_of: None,
        }
    } else {
        return Err(Error::Engine(
            "the prompt holds neither messages nor a prompt".into(),
        ));
    };
    let p = &request.params;
    let mut processors: Vec<Arc<dyn CustomLogitsProcessor>> = Vec::new();
    let temperature = p.temperature.filter(|t| *t > 0.0);
    let mut sampling = match (temperature, p.seed) {
        (None, _) => SamplingParams::deterministic(),
        (Some(t), Some(seed)) => {
            processors.push(Arc::new(SeededSampler::new(seed, t, p.top_p)));
            SamplingParams::deterministic()
        }
        (Some(t), None) => {
            let mut s = SamplingParams::neutral();
            s.temperature = Some(f64::from(t));
            s.top_p = p.top_p.map(f64::from);
            s
        }
    };
    // Counted last, after any sampler, once per sampled token.
    processors.push(counter);
    sampling.max_len = Some(p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize);
    let stops: Vec<String> = request.stop_sequences().map(str::to_string).collect();
    if !stops.is_empty() {
        sampling.stop_toks = Some(StopTokens::Seqs(stops));
    }
    Ok(Request::Normal(Box::new(NormalRequest {
        messages,
        sampling_params: sampling,
        response: tx,
        return_logprobs: false,
        is_streaming: true,
        id: 0,
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: Some(processors),
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    })))
}

/// Applies stop sequences to streamed text: mistral.rs notices a stop sequence only after its
/// text has been streamed, so the engine holds back any tail that could begin one and cuts the
/// text before the first occurrence. The held text is plaintext and is wiped.
struct StopFilter {
    stops: Vec<String>,
    pending: Zeroizing<String>,
}

impl StopFilter {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: Zeroizing::new(String::new()),
        }
    }

    /// Takes a piece; returns the text that can go out now, and whether a stop sequence ended
    /// the answer.
    fn push(&mut self, piece: &str) -> (Zeroizing<String>, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = Zeroizing::new(self.pending[..at].to_string());
            self.pending.zeroize();
            self.pending.clear();
            return (out, true);
        }
        // The longest tail of the pending text that is the start of a stop sequence.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = Zeroizing::new(self.pending[..cut].to_string());
        let rest = Zeroizing::new(self.pending[cut..].to_string());
        self.pending.zeroize();
        self.pending.clear();
        self.pending.push_str(&rest);
        (out, false)
    }

    /// What is still held when generation ends without a stop sequence.
    fn finish(&mut self) -> Zeroizing<String> {
        std::mem::replace(&mut self.pending, Zeroizing::new(String::new()))
    }
}

fn finish(reason: &str) -> String {
    match reason {
        "stop" | "eos" => FINISH_STOP.to_string(),
        "length" => FINISH_LENGTH.to_string(),
        other => other.to_string(),
    }
}

/// Passes `text` through the stop filter into the sink; true when a stop sequence ended it.
async fn emit(sink: &TokenSink, stops: &mut StopFilter, text: &str) -> Result<bool> {
    let (out, stopped) = stops.push(text);
    if !out.is_empty() {
        sink.send(out.as_str()).await?;
    }
    Ok(stopped)
}

#[async_trait]
impl Engine for MistralEngine {
    fn models(&self) -> Vec<ServedModel> {
        self.served.clone()
    }

    async fn generate(&self, request: GenerateRequest, sink: TokenSink) -> Result<Generation> {
        let model = self
            .models
            .get(&request.model)
            .ok_or_else(|| Error::Unservable(format!("model {} is not loaded", request.model)))?;
        let counter = Arc::new(TokenCounter::default());
        let (tx, mut rx) = mpsc::channel(64);
        let req = build_request(&request, counter.clone(), tx)?;
        let mut stops = StopFilter::new(request.stop_sequences().map(str::to_string).collect());
        drop(request);
        model
            .inner()
            .get_sender(None)
            .map_err(|e| Error::Engine(format!("mistral.rs is not running: {e}")))?
            .send(req)
            .await
            .map_err(|_| Error::Engine("mistral.rs stopped".into()))?;

        let mut reported: Option<Usage> = None;
        let mut finish_reason: Option<String> = None;
        while finish_reason.is_none() {
            let response = tokio::select! {
                r = rx.recv() => r,
                // The worker gave the task up: dropping the receiver stops the sequence.
                _ = sink.closed() => return Err(Error::SinkClosed),
            };
            let Some(response) = response else {
                return Err(Error::Engine(
                    "mistral.rs ended the request without finishing it".into(),
                ));
            };
            match response {
                Response::Chunk(chunk) => {
                    if let Some(u) = chunk.usage {
                        reported = Some(Usage {
                            prompt_tokens: u32::try_from(u.prompt_tokens).unwrap_or(u32::MAX),
                            completion_tokens: u32::try_from(u.completion_tokens)
                                .unwrap_or(u32::MAX),
                        });
                    }
                    for choice in chunk.choices {
                        if let Some(text) = choice.delta.content.map(Zeroizing::new)
                            && emit(&sink, &mut stops, &text).await?
                        {
                            finish_reason = Some(FINISH_STOP.to_string());
                            break;
                        }
                        if let Some(r) = choice.finish_reason {
                            finish_reason = Some(finish(&r));
                        }
                    }
                }
                Response::CompletionChunk(chunk) => {
                    for choice in chunk.choices {
                        let text = Zeroizing::new(choice.text);
                        if emit(&sink, &mut stops, &text).await? {
                            finish_reason = Some(FINISH_STOP.to_string());
                            break;
                        }
                        if let Some(r) = choice.finish_reason {
                            finish_reason = Some(finish(&r));
                        }
                    }
                }
                // Kinds only: the messages could quote the input.
                Response::ValidationError(_) => {
                    return Err(Error::Engine(
                        "mistral.rs refused the request (validation error: e.g. the prompt is longer than the model's context)".into(),
                    ));
                }
                Response::InternalError(_) => {
                    return Err(Error::Engine("mistral.rs internal error".into()));
                }
                Response::ModelError(..) | Response::CompletionModelError(..) => {
                    return Err(Error::Engine(
                        "mistral.rs model error during generation".into(),
                    ));
                }
                Response::Done(_) | Response::CompletionDone(_) => {
                    return Err(Error::Engine(
                        "mistral.rs answered a streaming request without streaming".into(),
                    ));
                }
                _ => {
                    return Err(Error::Engine(
                        "mistral.rs answered with an unexpected kind".into(),
                    ));
                }
            }
        }
        // Dropping the receiver (here, or on a stop sequence above) ends the sequence in mistral.rs.
        drop(rx);
        let tail = stops.finish();
        if !tail.is_empty() {
            sink.send(tail.as_str()).await?;
        }
        Ok(Generation {
            usage: reported.unwrap_or_else(|| counter.usage()),
            finish_reason: finish_reason.unwrap_or_else(|| FINISH_STOP.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_api::miner::TaskParams;

    #[test]
    fn seeded_sampling_repeats_and_respects_top_p() {
        let logits = [1.0f32, 2.0, 3.0, 0.5, f32::NEG_INFINITY, 2.5];
        let draw = |seed| {
            let s = SeededSampler::new(seed, 1.0, None);
            (0..64).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7), "same seed, same draws");
        assert_ne!(draw(7), draw(8), "another seed, other draws");
        assert!(!draw(7).contains(&4), "a masked token is never drawn");
        let many = draw(7);
        assert!(many.iter().collect::<std::collections::HashSet<_>>().len() > 2);

        // top_p small enough keeps only the most likely token.
        let s = SeededSampler::new(1, 1.0, Some(0.01));
        assert!((0..32).all(|_| s.pick(&logits) == 2));
        // A tiny temperature is almost greedy.
        let s = SeededSampler::new(1, 1e-3, None);
        assert!((0..32).all(|_| s.pick(&logits) == 2));
    }

    fn generate_request(messages: bool, params: TaskParams) -> GenerateRequest {
        use veil_api::miner::{ChatMessage, PromptPayload};
        GenerateRequest {
            task_id: uuid::Uuid::now_v7(),
            model: "m".into(),
            prompt: PromptPayload {
                messages: if messages {
                    vec![ChatMessage {
                        role: "user".into(),
                        content: "hi".into(),
                    }]
                } else {
                    Vec::new()
                },
                prompt: (!messages).then(|| "once".to_string()),
                stop: vec!["END".into(), String::new()],
            },
            params,
        }
    }

    fn normal(r: Request) -> NormalRequest {
        match r {
            Request::Normal(n) => *n,
            _ => panic!("not a normal request"),
        }
    }

    #[test]
    fn task_parameters_map_onto_mistralrs_sampling() {
        let (tx, _rx) = mpsc::channel(1);
        let counter = Arc::new(TokenCounter::default());

        // No temperature: greedy, the default length, stop sequences from the sealed prompt
        // and the parameters (empty ones dropped), streaming, the counter only.
        let params = TaskParams {
            stop: vec!["STOP".into()],
            ..TaskParams::default()
        };
        let n = normal(
            build_request(&generate_request(true, params), counter.clone(), tx.clone()).unwrap(),
        );
        assert_eq!(n.sampling_params.top_k, Some(1));
        assert_eq!(n.sampling_params.temperature, None);
        assert_eq!(n.sampling_params.max_len, Some(DEFAULT_MAX_TOKENS as usize));
        match n.sampling_params.stop_toks {
            Some(StopTokens::Seqs(s)) => assert_eq!(s, ["END", "STOP"]),
            other => panic!("{other:?}"),
        }
        assert!(n.is_streaming);
        assert_eq!(n.logits_processors.as_ref().map(Vec::len), Some(1));
        assert!(
            matches!(n.messages, RequestMessage::Chat { ref messages, .. } if messages.len() == 1)
        );
        assert!(n.suffix.is_none() && n.tools.is_none() && n.web_search_options.is_none());

        // Temperature without a seed: mistral.rs samples.
        let params = TaskParams {
            temperature: Some(0.7),
            top_p: Some(0.9),
            max_tokens: Some(5),
            ..TaskParams::default()
        };
        let n = normal(
            build_request(
                &generate_request(false, params),
                counter.clone(),
                tx.clone(),
            )
            .unwrap(),
        );
        assert!((n.sampling_params.temperature.unwrap() - 0.7).abs() < 1e-6);
        assert!((n.sampling_params.top_p.unwrap() - 0.9).abs() < 1e-6);
        assert_eq!(n.sampling_params.top_k, None);
        assert_eq!(n.sampling_params.max_len, Some(5));
        assert!(
            matches!(n.messages, RequestMessage::Completion { ref text, echo_prompt: false, .. } if text == "once")
        );

        // Temperature and a seed: our seeded sampler picks, mistral.rs takes its pick.
        let params = TaskParams {
            temperature: Some(0.7),
            seed: Some(9),
            ..TaskParams::default()
        };
        let n = normal(
            build_request(&generate_request(true, params), counter.clone(), tx.clone()).unwrap(),
        );
        assert_eq!(n.sampling_params.top_k, Some(1));
        assert_eq!(n.logits_processors.as_ref().map(Vec::len), Some(2));

        // A prompt with neither messages nor text is refused.
        let mut empty = generate_request(true, TaskParams::default());
        empty.prompt.messages.clear();
        assert!(build_request(&empty, counter, tx).is_err());
    }

    #[test]
    fn stop_sequences_cut_streamed_text_before_their_first_occurrence() {
        let run = |stops: &[&str], pieces: &[&str]| {
            let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
            let mut out = Vec::new();
            for p in pieces {
                let (text, stopped) = f.push(p);
                out.push(text.to_string());
                if stopped {
                    return (out, true);
                }
            }
            out.push(f.finish().to_string());
            (out, false)
        };
        // A stop sequence split over pieces: the start is held back, then cut.
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxy"]),
            (vec!["ab".into(), "c".into(), "".into(), "".into()], true)
        );
        // A false start is released once it cannot begin the stop sequence any more.
        assert_eq!(
            run(&["END"], &["aE", "Nb", "c"]),
            (vec!["a".into(), "ENb".into(), "c".into(), "".into()], false)
        );
        // The earliest of several stop sequences wins.
        assert_eq!(run(&["zz", "b"], &["abczz"]), (vec!["a".into()], true));
        // No stop sequences: everything goes out at once.
        assert_eq!(run(&[], &["a", "b"]).0.concat(), "ab");
        // Multi-byte characters are never split.
        assert_eq!(
            run(&["éx"], &["aé", "y"]),
            (vec!["a".into(), "éy".into(), "".into()], false)
        );
    }

    #[test]
    fn layouts_are_recognised_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = layout(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(missing.contains("no such file"), "{missing}");
        let empty = layout(dir.path()).unwrap_err().to_string();
        assert!(empty.contains("not a model"), "{empty}");
        std::fs::write(dir.path().join("m.gguf"), b"GGUF").unwrap();
        assert_eq!(
            layout(dir.path()).unwrap(),
            Layout::Gguf(dir.path().to_path_buf(), "m.gguf".into())
        );
        std::fs::write(dir.path().join("n.gguf"), b"GGUF").unwrap();
        let two = layout(dir.path()).unwrap_err().to_string();
        assert!(two.contains("several .gguf"), "{two}");
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let no_weights = layout(dir.path()).unwrap_err().to_string();
        assert!(no_weights.contains("safetensors"), "{no_weights}");
        let txt = dir.path().join("x.txt");
        std::fs::write(&txt, b"x").unwrap();
        assert!(
            layout(&txt)
                .unwrap_err()
                .to_string()
                .contains("not a model")
        );
    }
}
