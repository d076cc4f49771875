//! Inference benchmark: the same mistral.rs model, in the same process and run, called directly
//! through mistral.rs's own API and through Veil (`/api/v2/completions` on a router on loopback:
//! edge sealing, blob store, queue, lease, wrapped task key, prompt opening, sealed streamed
//! result, signed completion, result opening). Requests alternate between the two paths, one at
//! a time, so both see the same machine state.
//!
//! For each preset it prints, per path and mode (streamed or not), the median time to first
//! token (streamed), the median latency, and tokens per second (completion tokens over the whole
//! request), then the gaps; for the tiny model, where inference is nearly free, the absolute time
//! Veil adds per request broken down by step (router steps from its `/metrics` histograms, miner
//! steps from the worker's timings).
//!
//! Run: `cargo bench --bench inference` (add `-- --quick` for a short run).
//! Environment: `VEIL_BENCH_PRESETS` (default "tiny small"), `VEIL_BENCH_RUNS` (requests per
//! path and mode; default 40 for tiny, 8 for small), `VEIL_BENCH_TOKENS` (default 128).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_signer_local::PrivateKeySigner;
use futures::StreamExt;
use mistralrs::{RequestBuilder, Response, TextMessageRole};
use serde_json::{Value, json};
use veil_api::miner::ServedModel;
use veil_keys::X25519Secret;
use veil_miner::mistral::{MistralEngine, MistralModel, MistralOptions};
use veil_miner::tiny::{self, Preset};
use veil_miner::{Engine, Worker};
use veil_tests::harness::{TestRouter, http};

const PROMPT: &str = "Write a short story about a lighthouse keeper who finds a sealed letter.";

#[derive(Default)]
struct Samples {
    ttft: Vec<f64>,
    total: Vec<f64>,
    tps: Vec<f64>,
}

impl Samples {
    fn push(&mut self, ttft: Option<Duration>, total: Duration, tokens: u64) {
        if let Some(t) = ttft {
            self.ttft.push(t.as_secs_f64() * 1e3);
        }
        self.total.push(total.as_secs_f64() * 1e3);
        self.tps.push(tokens as f64 / total.as_secs_f64());
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn request(tokens: usize) -> RequestBuilder {
    RequestBuilder::new()
        .add_message(TextMessageRole::User, PROMPT)
        .set_deterministic_sampler()
        .set_sampler_max_len(tokens)
}

/// mistral.rs directly: (time to first token, total, completion tokens, text).
async fn direct(
    model: &mistralrs::Model,
    tokens: usize,
    stream: bool,
) -> (Option<Duration>, Duration, u64, String) {
    let started = Instant::now();
    if !stream {
        let r = model.send_chat_request(request(tokens)).await.unwrap();
        let text = r.choices[0].message.content.clone().unwrap_or_default();
        return (
            None,
            started.elapsed(),
            r.usage.completion_tokens as u64,
            text,
        );
    }
    let mut s = model.stream_chat_request(request(tokens)).await.unwrap();
    let mut first = None;
    let mut text = String::new();
    let mut completion = 0;
    while let Some(r) = s.next().await {
        match r {
            Response::Chunk(c) => {
                for ch in &c.choices {
                    if let Some(t) = ch.delta.content.as_deref().filter(|t| !t.is_empty()) {
                        first.get_or_insert_with(|| started.elapsed());
                        text.push_str(t);
                    }
                }
                if let Some(u) = &c.usage {
                    completion = u.completion_tokens as u64;
                }
                if c.choices.iter().any(|ch| ch.finish_reason.is_some()) {
                    break;
                }
            }
            _ => panic!("mistral.rs answered an error or an unexpected kind"),
        }
    }
    if completion == 0 {
        // No usage on the stream: the generated model emits one byte per token.
        completion = text.len() as u64;
    }
    (first, started.elapsed(), completion, text)
}

/// Through Veil: (time to first token, total, completion tokens, text).
async fn veil(
    url: &str,
    key: &str,
    tokens: usize,
    stream: bool,
) -> (Option<Duration>, Duration, u64, String) {
    let body = json!({
        "model": "bench",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let res = http()
        .post(format!("{url}/api/v2/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    if res.status() != 200 {
        panic!("{}: {}", res.status(), res.text().await.unwrap_or_default());
    }
    if !stream {
        let v: Value = res.json().await.unwrap();
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let n = v["usage"]["completion_tokens"].as_u64().unwrap();
        return (None, started.elapsed(), n, text);
    }
    let mut bytes = res.bytes_stream();
    let mut buf = String::new();
    let mut first = None;
    let mut text = String::new();
    let mut completion = 0;
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
            if let Some(t) = v["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|t| !t.is_empty())
            {
                first.get_or_insert_with(|| started.elapsed());
                text.push_str(t);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                completion = n;
            }
        }
    }
    (first, started.elapsed(), completion, text)
}

/// Sums and counts of the router's step histograms.
async fn router_steps(url: &str) -> BTreeMap<String, (f64, f64)> {
    let text = http()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        for (suffix, slot) in [("_sum{", 0), ("_count{", 1)] {
            let Some(rest) = line.strip_prefix(&format!("veil_router_step_seconds{suffix}")) else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let Some(step) = labels
                .split(',')
                .find_map(|l| l.strip_prefix("step=\""))
                .map(|s| s.trim_end_matches('"'))
            else {
                continue;
            };
            let e = out.entry(step.to_string()).or_default();
            let v: f64 = value.trim().parse().unwrap_or(0.0);
            if slot == 0 {
                e.0 = v;
            } else {
                e.1 = v;
            }
        }
    }
    out
}

async fn bench(preset: Preset, runs: usize, tokens: usize) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let t = Instant::now();
    let g = tiny::generate(&model_dir, preset, 1).unwrap();
    println!(
        "\n## {preset:?} model: {:.1} M parameters, {:.0} MiB of f32 weights (generated in {:.1} s)",
        g.parameters as f64 / 1e6,
        g.weight_bytes as f64 / f64::from(1u32 << 20),
        t.elapsed().as_secs_f64()
    );

    let engine = Arc::new(
        MistralEngine::load(
            vec![MistralModel {
                served: ServedModel {
                    name: "bench".into(),
                    sha256: None,
                },
                path: model_dir,
            }],
            &MistralOptions {
                device: veil_miner::config::Device::Cpu,
                max_seqs: 1,
                cache_dir: dir.path().join("cache"),
            },
        )
        .await
        .unwrap(),
    );
    let model = engine.model("bench").unwrap();

    let mut settings = TestRouter::settings(&dir.path().join("router"));
    // Large models on a CPU take a while per request.
    settings.completion_timeout_ms = Some(600_000);
    settings.lease_ttl_ms = Some(30_000);
    let router = TestRouter::start(settings).await;
    let key = router.admin().to_string();
    let worker = Worker::builder()
        .router_url(router.url.clone())
        .wallet(PrivateKeySigner::random())
        .identity(X25519Secret::generate().unwrap())
        .engine_arc(engine.clone() as Arc<dyn Engine>)
        .concurrency(1)
        .lease_pollers(1)
        .lease_wait(Duration::from_secs(10))
        .build()
        .unwrap()
        .spawn();

    // Warm up both paths (first requests allocate caches and connections).
    for stream in [false, true] {
        direct(&model, tokens, stream).await;
        veil(&router.url, &key, tokens, stream).await;
    }

    let before = router_steps(&router.url).await;
    let mut samples: BTreeMap<(&str, bool), Samples> = BTreeMap::new();
    let mut veil_requests = 0u64;
    for i in 0..runs {
        for stream in [false, true] {
            // Alternate which path goes first.
            let order = if i % 2 == 0 {
                ["direct", "veil"]
            } else {
                ["veil", "direct"]
            };
            let mut texts = Vec::new();
            for path in order {
                let (ttft, total, n, text) = if path == "direct" {
                    direct(&model, tokens, stream).await
                } else {
                    veil_requests += 1;
                    veil(&router.url, &key, tokens, stream).await
                };
                assert_eq!(n as usize, tokens, "{path} generated {n} tokens");
                samples
                    .entry((path, stream))
                    .or_default()
                    .push(ttft, total, n);
                texts.push(text);
            }
            assert_eq!(texts[0], texts[1], "both paths generate the same text");
        }
    }
    let after = router_steps(&router.url).await;
    let summary = worker.shutdown().await.unwrap();
    router.stop().await;

    println!(
        "\n{runs} requests per path and mode, {tokens} tokens each, greedy, one at a time; medians.\n"
    );
    println!("| mode | path | time to first token (ms) | latency (ms) | tokens/s |");
    println!("|---|---|---:|---:|---:|");
    for stream in [false, true] {
        for path in ["direct", "veil"] {
            let s = &samples[&(path, stream)];
            let ttft = if stream {
                format!("{:.2}", median(&s.ttft))
            } else {
                "–".into()
            };
            println!(
                "| {} | {} | {ttft} | {:.2} | {:.1} |",
                if stream { "streamed" } else { "not streamed" },
                if path == "direct" {
                    "mistral.rs directly"
                } else {
                    "through Veil"
                },
                median(&s.total),
                median(&s.tps)
            );
        }
    }
    println!();
    for stream in [false, true] {
        let d = &samples[&("direct", stream)];
        let v = &samples[&("veil", stream)];
        let gap_tps = (median(&d.tps) - median(&v.tps)) / median(&d.tps) * 100.0;
        let added = median(&v.total) - median(&d.total);
        let mode = if stream { "streamed" } else { "not streamed" };
        if stream {
            println!(
                "- {mode}: tokens/s gap {gap_tps:.2}%, time-to-first-token gap {:.2} ms, added latency {added:.2} ms",
                median(&v.ttft) - median(&d.ttft)
            );
        } else {
            println!("- {mode}: tokens/s gap {gap_tps:.2}%, added latency {added:.2} ms");
        }
    }

    // Where Veil's time goes (means per request over the measured runs).
    println!("\nVeil's steps, mean per request:\n");
    println!("| where | step | ms |");
    println!("|---|---|---:|");
    for step in [
        "seal",
        "blob_put",
        "enqueue",
        "queue_wait",
        "lease",
        "result_get",
        "result_open",
        "total",
    ] {
        let (s1, c1) = after.get(step).copied().unwrap_or_default();
        let (s0, c0) = before.get(step).copied().unwrap_or_default();
        if c1 > c0 {
            println!("| router | {step} | {:.3} |", (s1 - s0) / (c1 - c0) * 1e3);
        }
    }
    let per = |us: u64| us as f64 / summary.steps.tasks.max(1) as f64 / 1e3;
    println!(
        "| miner | task key (sign, request, unwrap) | {:.3} |",
        per(summary.steps.key_us)
    );
    println!(
        "| miner | prompt (fetched during the key request; what is left, then open) | {:.3} |",
        per(summary.steps.prompt_us)
    );
    println!(
        "| miner | generate + seal + upload result | {:.3} |",
        per(summary.steps.generate_us)
    );
    println!(
        "| miner | sign + submit result | {:.3} |",
        per(summary.steps.submit_us)
    );
    println!(
        "\n(miner means over {} tasks, warm-up included; the router's `total` is its whole handling of a \
         request, queue wait and inference included; {veil_requests} measured requests)",
        summary.steps.tasks
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let presets = std::env::var("VEIL_BENCH_PRESETS").unwrap_or_else(|_| "tiny small".into());
    let tokens: usize = std::env::var("VEIL_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    veil_miner::install_crypto_provider();
    for name in presets.split_whitespace() {
        let preset = match name {
            "tiny" => Preset::Tiny,
            "small" => Preset::Small,
            other => panic!("unknown preset {other}"),
        };
        let default_runs = match (preset, quick) {
            (_, true) => 3,
            (Preset::Tiny, false) => 40,
            (Preset::Small, false) => 8,
        };
        let runs = std::env::var("VEIL_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_runs);
        runtime.block_on(bench(preset, runs, tokens));
    }
}
