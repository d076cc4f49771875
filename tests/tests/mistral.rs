//! Real inference: the `veil-miner` command with the mistral.rs engine, serving a generated
//! random-weight model, behind a real router. What `/api/v2/completions` answers is compared with
//! what the same model gives when mistral.rs is called directly in this process, and with what
//! the generated model guarantees on its own (one printable ASCII byte per generated token, one
//! token per prompt byte), so a wrong usage count or a lost token shows.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use veil_api::miner::{ChatMessage, PromptPayload, ServedModel, TaskParams};
use veil_miner::mistral::{MistralEngine, MistralModel, MistralOptions};
use veil_miner::tiny::{self, Preset};
use veil_miner::{Engine, GenerateRequest, token_channel};
use veil_testkit::files_containing;
use veil_tests::harness::{TestRouter, http, logs};
use veil_tests::miner_command::{self, DEV_ADDRESS};

const CANARY: &str = "CANARY-mistral-5d1e0b77c2";

fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-model");
    tiny::generate(&path, Preset::Tiny, 11).unwrap();
    path
}

/// mistral.rs called directly on the same model: text, prompt tokens, completion tokens.
async fn direct(engine: &MistralEngine, content: &str, params: TaskParams) -> (String, u32, u32) {
    let (sink, mut rx) = token_channel(64);
    let request = GenerateRequest {
        task_id: uuid::Uuid::now_v7(),
        model: "tiny".into(),
        prompt: PromptPayload {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: content.into(),
            }],
            prompt: None,
            stop: Vec::new(),
        },
        params,
    };
    let run = engine.generate(request, sink);
    let collect = async {
        let mut text = String::new();
        while let Some(piece) = rx.recv().await {
            text.push_str(&piece);
        }
        text
    };
    let (generation, text) = tokio::join!(run, collect);
    let g = generation.unwrap();
    (text, g.usage.prompt_tokens, g.usage.completion_tokens)
}

fn chat(content: &str, session: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "session_id": session,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// The streamed deltas of an OpenAI SSE answer, with when each arrived.
async fn stream(router: &TestRouter, key: &str, body: &Value) -> Vec<(Duration, String)> {
    let started = Instant::now();
    let res = http()
        .post(format!("{}/api/v2/completions", router.url))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut bytes = res.bytes_stream();
    let mut buf = String::new();
    let mut deltas = Vec::new();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str()
                && !t.is_empty()
            {
                deltas.push((started.elapsed(), t.to_string()));
            }
        }
    }
    deltas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v2_completions_run_mistralrs_and_match_it_called_directly() {
    let logs = logs();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let router_dir = dir.path().join("router");
    let router = TestRouter::start(TestRouter::settings(&router_dir)).await;
    let key = router.admin().to_string();
    let miner_dir = dir.path().join("miner");
    let (stop, join) = miner_command::start_engine(&router.url, &miner_dir, "mistralrs", &model);
    let session = router
        .private_session(&key, &[DEV_ADDRESS.to_string()])
        .await;

    let reference = MistralEngine::load(
        vec![MistralModel {
            served: ServedModel {
                name: "tiny".into(),
                sha256: None,
            },
            path: model.clone(),
        }],
        &MistralOptions {
            device: veil_miner::config::Device::Cpu,
            max_seqs: 1,
            cache_dir: dir.path().join("reference-cache"),
        },
    )
    .await
    .unwrap();

    let content = format!("Tell me about {CANARY}, please.");
    let greedy = TaskParams {
        max_tokens: Some(24),
        temperature: Some(0.0),
        ..TaskParams::default()
    };
    let (want, want_prompt, want_completion) = direct(&reference, &content, greedy.clone()).await;

    // Not streamed.
    let (s, v) = router
        .post(
            &key,
            "/api/v2/completions",
            &chat(
                &content,
                &session,
                json!({"max_tokens": 24, "temperature": 0}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text, want, "Veil answers what mistral.rs answers");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["veil"]["miner"], DEV_ADDRESS);
    // The generated model emits one printable ASCII byte per token, and its tokenizer has one
    // token per byte: the counts follow from the texts alone.
    assert_eq!(text.len(), 24);
    assert!(text.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{text:?}");
    let templated = format!("<|user|>\n{content}\n<|assistant|>\n");
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert_eq!(v["usage"]["prompt_tokens"], 1 + templated.len());
    assert_eq!(v["usage"]["total_tokens"], 1 + templated.len() + 24);
    assert_eq!(
        (want_prompt, want_completion),
        (1 + templated.len() as u32, 24)
    );

    // Streamed: the same text, delivered in many chunks as the tokens come.
    let deltas = stream(
        &router,
        &key,
        &chat(
            &content,
            &session,
            json!({"max_tokens": 24, "temperature": 0, "stream": true}),
        ),
    )
    .await;
    let joined: String = deltas.iter().map(|d| d.1.as_str()).collect();
    assert_eq!(joined, want);
    assert!(deltas.len() >= 4, "{} chunks", deltas.len());
    assert!(deltas.first().unwrap().0 < deltas.last().unwrap().0);

    // A longer stream: the first tokens arrive while the rest are still being generated.
    let long = stream(
        &router,
        &key,
        &chat(
            "stream a long answer",
            &session,
            json!({"max_tokens": 400, "temperature": 0, "stream": true}),
        ),
    )
    .await;
    assert_eq!(long.iter().map(|d| d.1.len()).sum::<usize>(), 400);
    assert!(long.len() >= 20, "{} chunks", long.len());

    // Stop sequences: the answer ends before the first occurrence.
    let stop_seq = &want[8..11];
    let cut = want.find(stop_seq).unwrap();
    let (s, v) = router
        .post(
            &key,
            "/api/v2/completions",
            &chat(
                &content,
                &session,
                json!({"max_tokens": 24, "temperature": 0, "stop": [stop_seq]}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], &want[..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // A seed makes sampling repeatable; another seed samples another text.
    let sampled = |seed: u64| {
        chat(
            &content,
            &session,
            json!({"max_tokens": 32, "temperature": 1.0, "top_p": 0.95, "seed": seed}),
        )
    };
    let mut texts = Vec::new();
    for seed in [5, 5, 6] {
        let (s, v) = router
            .post(&key, "/api/v2/completions", &sampled(seed))
            .await;
        assert_eq!(s, 200, "{v}");
        texts.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(texts[0], texts[1], "same seed, same text");
    assert_ne!(texts[0], texts[2], "another seed, another text");
    let (direct_seeded, _, _) = direct(
        &reference,
        &content,
        TaskParams {
            max_tokens: Some(32),
            temperature: Some(1.0),
            top_p: Some(0.95),
            seed: Some(5),
            ..TaskParams::default()
        },
    )
    .await;
    assert_eq!(texts[0], direct_seeded);

    // A legacy completion prompt (no chat template).
    let (s, v) = router
        .post(
            &key,
            "/api/v2/completions",
            &json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 10,
                    "temperature": 0, "session_id": session}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 10, "{v}");

    stop.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(60), join)
        .await
        .expect("stops within the grace period")
        .unwrap()
        .expect("a graceful stop is not an error")
        .expect("serve returns its summary");
    assert_eq!(summary.completed, 8, "{summary:?}");
    router.stop().await;
    drop(reference);

    // The canary never reached the router's data dir, the miner's files or any log line; the
    // positive control shows the logs did capture the miner's work.
    assert!(files_containing(&router_dir, CANARY.as_bytes()).is_empty());
    assert!(files_containing(&miner_dir, CANARY.as_bytes()).is_empty());
    assert!(files_containing(dir.path(), CANARY.as_bytes()).is_empty());
    let captured = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(captured.contains("model loaded"), "logs were captured");
    assert!(!captured.contains(CANARY), "the canary reached a log line");
    assert!(
        !captured.contains(&want),
        "generated text reached a log line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_changed_on_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let pinned = veil_miner::model::model_sha256(&model, &mut |_, _| {})
        .unwrap()
        .to_string();
    // The operator pinned the model; then one weight changed on the miner's disk.
    let weights = model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();

    let mut settings = TestRouter::settings(&dir.path().join("router"));
    settings.pinned_models = Some(vec![format!("tiny={pinned}")]);
    let router = TestRouter::start(settings).await;
    let (_stop, join) =
        miner_command::start_engine(&router.url, &dir.path().join("miner"), "mistralrs", &model);
    let err = tokio::time::timeout(Duration::from_secs(60), join)
        .await
        .expect("the refusal is fatal, not retried")
        .unwrap()
        .expect_err("no lease for a model whose files changed");
    assert_eq!(err.code(), "model_hash_mismatch", "{err}");
    assert!(err.to_string().contains("tiny"), "{err}");
    assert!(router.audit("task.lease").await.is_empty());
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_broken_models_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let router = TestRouter::start(TestRouter::settings(&dir.path().join("router"))).await;

    let missing = dir.path().join("no-such-model");
    let (_s, join) =
        miner_command::start_engine(&router.url, &dir.path().join("m1"), "mistralrs", &missing);
    let err = join.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("no-such-model") && err.contains("no such file"),
        "{err}"
    );

    // A directory that holds a model's config but broken weights.
    let broken = tiny_model(dir.path());
    std::fs::write(broken.join("model.safetensors"), b"not safetensors").unwrap();
    let (_s, join) =
        miner_command::start_engine(&router.url, &dir.path().join("m2"), "mistralrs", &broken);
    let err = join.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("tiny-model") && err.contains("could not load"),
        "{err}"
    );
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_model_loads_and_generates_through_its_own_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("gguf-model");
    tiny::generate_as(&model_dir, Preset::Tiny, 11, tiny::Format::Gguf).unwrap();
    let files: Vec<_> = std::fs::read_dir(&model_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, ["model.gguf"], "one self-contained file");

    // Served by file path and by its directory.
    for path in [model_dir.join("model.gguf"), model_dir.clone()] {
        let engine = MistralEngine::load(
            vec![MistralModel {
                served: ServedModel {
                    name: "tiny".into(),
                    sha256: None,
                },
                path,
            }],
            &MistralOptions {
                device: veil_miner::config::Device::Cpu,
                max_seqs: 1,
                cache_dir: dir.path().join("cache"),
            },
        )
        .await
        .unwrap();
        let content = "hello from a gguf file";
        let (text, prompt_tokens, completion_tokens) = direct(
            &engine,
            content,
            TaskParams {
                max_tokens: Some(12),
                temperature: Some(0.0),
                ..TaskParams::default()
            },
        )
        .await;
        assert_eq!(text.len(), 12, "{text:?}");
        assert!(text.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{text:?}");
        assert_eq!(completion_tokens, 12);
        // The tokenizer and chat template came from the file's metadata.
        let templated = format!("<|user|>\n{content}\n<|assistant|>\n");
        assert_eq!(prompt_tokens as usize, 1 + templated.len());
    }
}
