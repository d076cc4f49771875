//! Generated random-weight models (`veil-miner tiny-model`): a Llama-architecture model in the
//! Hugging Face layout (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json` with a chat template, `generation_config.json`) that mistral.rs loads
//! from a local directory, for tests, demos and benchmarks where no real weights can be had.
//!
//! The text it produces is gibberish by design, but everything else is real: tokenization, the
//! chat template, the forward pass, sampling and streaming.
//!
//! Choices that make it easy to test against:
//! - The tokenizer is byte-level BPE without merges: every byte of the input is one token, so any
//!   text (any UTF-8) tokenizes, and a count of tokens is a count of bytes.
//! - Only the 95 printable ASCII characters (space to `~`) can be generated: the output rows of
//!   every other token, end-of-sequence included, are zero, so their logit is always 0 while the
//!   printable rows are random with a spread large enough that the best of them is above 0 (the
//!   chance that all 95 are below is 2^-95). Greedy output is therefore printable ASCII, one
//!   character per token, and runs until `max_tokens` or a stop sequence.
//! - The weights come from a seeded ChaCha8 stream: the same preset and seed give the same files
//!   byte for byte (and so the same model hash).

use std::fs;
use std::io::Write;
use std::path::Path;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use crate::{Error, Result};

/// Shape of a generated model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Hidden size.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// MLP inner size.
    pub intermediate: usize,
}

/// The generated shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Hidden 64, 2 layers, 4 heads (2 KV heads): about 0.1 M parameters, loads in milliseconds.
    /// For tests and the demo.
    Tiny,
    /// GPT-2-small shape (hidden 768, 12 layers, 12 heads, MLP 3072): about 113 M parameters
    /// (453 MB of f32). For benchmarks.
    Small,
}

impl Preset {
    /// The shape of this preset.
    pub fn shape(self) -> Shape {
        match self {
            Preset::Tiny => Shape {
                hidden: 64,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                intermediate: 128,
            },
            Preset::Small => Shape {
                hidden: 768,
                layers: 12,
                heads: 12,
                kv_heads: 12,
                intermediate: 3072,
            },
        }
    }
}

/// Byte tokens 0..=255, then these.
pub const BOS_ID: u32 = 256;
/// End of sequence.
pub const EOS_ID: u32 = 257;
/// Vocabulary size: 256 byte tokens and the two specials.
pub const VOCAB: usize = 258;
const BOS: &str = "<s>";
const EOS: &str = "</s>";

/// The chat template: `<s>` then, per message, `<|role|>\ncontent\n`, then `<|assistant|>\n` when a
/// generation prompt is asked for.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Parameters in the model.
    pub parameters: u64,
    /// Bytes of `model.safetensors`.
    pub weight_bytes: u64,
}

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// A Hugging Face directory: `config.json`, `model.safetensors`, tokenizer files.
    #[default]
    Safetensors,
    /// One `model.gguf` file (f32 tensors) holding the tokenizer and the chat template in its
    /// metadata, in an otherwise empty directory.
    #[cfg(feature = "mistralrs")]
    Gguf,
}

/// Writes a random-weight model of `preset` into `out` as safetensors (created if missing;
/// existing model files there are replaced, other files are left alone).
pub fn generate(out: &Path, preset: Preset, seed: u64) -> Result<Generated> {
    generate_as(out, preset, seed, Format::Safetensors)
}

/// [`generate`] in the given format. The weights are the same in both formats for a preset and
/// seed.
pub fn generate_as(out: &Path, preset: Preset, seed: u64, format: Format) -> Result<Generated> {
    let s = preset.shape();
    if !s.hidden.is_multiple_of(s.heads) || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(Error::Config(format!(
            "tiny-model: inconsistent shape {s:?}"
        )));
    }
    let io = |what: &str, e: std::io::Error| Error::Model {
        path: out.join(what).display().to_string(),
        detail: e.to_string(),
    };
    fs::create_dir_all(out).map_err(|e| io("", e))?;

    let head_dim = s.hidden / s.heads;
    let kv = s.kv_heads * head_dim;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    // Linear layers: uniform with standard deviation 0.02, as GPT-2 initialises them.
    let linear = |name: String, rows: usize, cols: usize, rng: &mut ChaCha8Rng| {
        (name, vec![rows, cols], uniform(rng, rows * cols, 0.02))
    };
    tensors.push(linear(
        "model.embed_tokens.weight".into(),
        VOCAB,
        s.hidden,
        &mut rng,
    ));
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        tensors.push(linear(
            format!("{p}.self_attn.q_proj.weight"),
            s.hidden,
            s.hidden,
            &mut rng,
        ));
        tensors.push(linear(
            format!("{p}.self_attn.k_proj.weight"),
            kv,
            s.hidden,
            &mut rng,
        ));
        tensors.push(linear(
            format!("{p}.self_attn.v_proj.weight"),
            kv,
            s.hidden,
            &mut rng,
        ));
        tensors.push(linear(
            format!("{p}.self_attn.o_proj.weight"),
            s.hidden,
            s.hidden,
            &mut rng,
        ));
        tensors.push(linear(
            format!("{p}.mlp.gate_proj.weight"),
            s.intermediate,
            s.hidden,
            &mut rng,
        ));
        tensors.push(linear(
            format!("{p}.mlp.up_proj.weight"),
            s.intermediate,
            s.hidden,
            &mut rng,
        ));
        tensors.push(linear(
            format!("{p}.mlp.down_proj.weight"),
            s.hidden,
            s.intermediate,
            &mut rng,
        ));
        tensors.push((
            format!("{p}.input_layernorm.weight"),
            vec![s.hidden],
            ones(s.hidden),
        ));
        tensors.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![s.hidden],
            ones(s.hidden),
        ));
    }
    tensors.push(("model.norm.weight".into(), vec![s.hidden], ones(s.hidden)));
    // The output layer: printable ASCII rows random with a spread of about 4 logits (the final
    // norm makes the hidden state's length about sqrt(hidden)), every other row zero.
    let spread = 4.0 / (s.hidden as f32).sqrt();
    let mut head = Vec::with_capacity(VOCAB * s.hidden);
    for token in 0..VOCAB {
        if (0x20..=0x7e).contains(&token) {
            head.extend_from_slice(&uniform(&mut rng, s.hidden, spread));
        } else {
            head.extend(std::iter::repeat_n(0f32, s.hidden));
        }
    }
    tensors.push(("lm_head.weight".into(), vec![VOCAB, s.hidden], head));

    let parameters = tensors
        .iter()
        .map(|(_, shape, _)| shape.iter().product::<usize>() as u64)
        .sum();
    let weights = match format {
        Format::Safetensors => {
            let weights = out.join("model.safetensors");
            write_safetensors(&weights, &tensors)?;
            weights
        }
        #[cfg(feature = "mistralrs")]
        Format::Gguf => {
            let weights = out.join("model.gguf");
            gguf::write(&weights, s, &tensors)?;
            drop(tensors);
            return Ok(Generated {
                parameters,
                weight_bytes: fs::metadata(&weights)
                    .map_err(|e| io("model.gguf", e))?
                    .len(),
            });
        }
    };
    drop(tensors);

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": false,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    });
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": false,
        "add_eos_token": false,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    });
    let generation_config = json!({
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    });
    let readme = format!(
        "# Random-weight test model\n\nGenerated by `veil-miner tiny-model --preset {} --seed {seed}`: \
         a Llama-architecture model with random weights ({parameters} parameters). Its output is \
         meaningless; it exists to exercise loading, tokenization, the chat template, inference, \
         sampling and streaming without downloading weights.\n",
        match preset {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        }
    );
    let files = [
        ("config.json", pretty(&config)),
        ("tokenizer.json", pretty(&tokenizer_json())),
        ("tokenizer_config.json", pretty(&tokenizer_config)),
        ("generation_config.json", pretty(&generation_config)),
        ("README.md", readme),
    ];
    for (name, text) in files {
        write_file(&out.join(name), text.as_bytes()).map_err(|e| io(name, e))?;
    }
    let weight_bytes = fs::metadata(&weights)
        .map_err(|e| io("model.safetensors", e))?
        .len();
    Ok(Generated {
        parameters,
        weight_bytes,
    })
}

fn pretty(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialize");
    s.push('\n');
    s
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// `n` values drawn uniformly with standard deviation `std`.
fn uniform(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let a = std * 3f32.sqrt();
    (0..n)
        .map(|_| {
            // 24 random bits → [0, 1) exactly representable in f32.
            let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
            (2.0 * u - 1.0) * a
        })
        .collect()
}

fn ones(n: usize) -> Vec<f32> {
    vec![1.0; n]
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.as_str(), v))
                .map_err(|e| Error::Config(format!("tiny-model: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::Model {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// The GGUF form: llama.cpp's tensor names and metadata keys, f32 tensors, and the tokenizer as
/// `tokenizer.ggml.*` (a `gpt2` byte-level BPE) with the chat template.
#[cfg(feature = "mistralrs")]
mod gguf {
    use std::path::Path;

    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::{BOS, BOS_ID, CHAT_TEMPLATE, EOS, EOS_ID, Shape, VOCAB, byte_char};
    use crate::{Error, Result};

    /// llama.cpp's name for a Hugging Face tensor name.
    fn name(hf: &str) -> String {
        if let Some(rest) = hf.strip_prefix("model.layers.") {
            let (layer, tail) = rest.split_once('.').expect("model.layers.N.…");
            let part = match tail {
                "self_attn.q_proj.weight" => "attn_q",
                "self_attn.k_proj.weight" => "attn_k",
                "self_attn.v_proj.weight" => "attn_v",
                "self_attn.o_proj.weight" => "attn_output",
                "mlp.gate_proj.weight" => "ffn_gate",
                "mlp.up_proj.weight" => "ffn_up",
                "mlp.down_proj.weight" => "ffn_down",
                "input_layernorm.weight" => "attn_norm",
                "post_attention_layernorm.weight" => "ffn_norm",
                other => unreachable!("no GGUF name for {other}"),
            };
            return format!("blk.{layer}.{part}.weight");
        }
        match hf {
            "model.embed_tokens.weight" => "token_embd.weight",
            "model.norm.weight" => "output_norm.weight",
            "lm_head.weight" => "output.weight",
            other => unreachable!("no GGUF name for {other}"),
        }
        .to_string()
    }

    pub(super) fn write(
        path: &Path,
        s: Shape,
        tensors: &[(String, Vec<usize>, Vec<f32>)],
    ) -> Result<()> {
        let fail = |e: candle_core::Error| Error::Model {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        let mut qtensors = Vec::with_capacity(tensors.len());
        for (hf, shape, data) in tensors {
            let t = Tensor::from_slice(data, shape.as_slice(), &Device::Cpu).map_err(fail)?;
            qtensors.push((
                name(hf),
                QTensor::quantize(&t, GgmlDType::F32).map_err(fail)?,
            ));
        }
        let mut tokens: Vec<Value> = (0..=255u8)
            .map(|b| Value::String(byte_char(b).to_string()))
            .collect();
        tokens.push(Value::String(BOS.into()));
        tokens.push(Value::String(EOS.into()));
        debug_assert_eq!(tokens.len(), VOCAB);
        // 1 normal, 3 control.
        let mut types: Vec<Value> = vec![Value::I32(1); 256];
        types.extend([Value::I32(3), Value::I32(3)]);
        let u32v = |v: usize| Value::U32(v as u32);
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String("veil-tiny-model".into())),
            ("llama.context_length", u32v(4096)),
            ("llama.embedding_length", u32v(s.hidden)),
            ("llama.feed_forward_length", u32v(s.intermediate)),
            ("llama.block_count", u32v(s.layers)),
            ("llama.attention.head_count", u32v(s.heads)),
            ("llama.attention.head_count_kv", u32v(s.kv_heads)),
            ("llama.rope.dimension_count", u32v(s.hidden / s.heads)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", Value::Array(Vec::new())),
            ("tokenizer.ggml.bos_token_id", Value::U32(BOS_ID)),
            ("tokenizer.ggml.eos_token_id", Value::U32(EOS_ID)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            (
                "tokenizer.chat_template",
                Value::String(CHAT_TEMPLATE.into()),
            ),
        ];
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let file = std::fs::File::create(path).map_err(|e| Error::Model {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let mut w = std::io::BufWriter::new(file);
        gguf_file::write(&mut w, &md, &ts).map_err(fail)?;
        let file = w.into_inner().map_err(|e| Error::Model {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        file.sync_all().map_err(|e| Error::Model {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
    }
}

/// GPT-2's byte → printable character map, which byte-level BPE vocabularies are written in.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return char::from(b);
    }
    // The other bytes take the code points from 256 on, in byte order.
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("below the surrogates")
}

/// A byte-level BPE tokenizer (`tokenizers` format) with one token per byte and no merges.
fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
        .map(|b| (byte_char(b).to_string(), json!(b)))
        .collect();
    let special = |id: u32, content: &str| {
        json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        })
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BOS_ID, BOS), special(EOS_ID, EOS)],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_matches_gpt2() {
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), '\u{120}'); // "Ġ"
        assert_eq!(byte_char(b'\n'), '\u{10a}'); // "Ċ"
        assert_eq!(byte_char(0), '\u{100}');
        assert_eq!(byte_char(0x7f), '\u{121}');
        assert_eq!(byte_char(0xad), '\u{143}');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(all.len(), 256, "the map is one to one");
    }

    #[test]
    fn generation_is_reproducible_and_shaped() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let g = generate(&a, Preset::Tiny, 7).unwrap();
        generate(&b, Preset::Tiny, 7).unwrap();
        let s = Preset::Tiny.shape();
        let per_layer = 2 * s.hidden * s.hidden
            + 2 * s.hidden * (s.hidden / s.heads * s.kv_heads)
            + 3 * s.hidden * s.intermediate
            + 2 * s.hidden;
        assert_eq!(
            g.parameters as usize,
            2 * VOCAB * s.hidden + s.layers * per_layer + s.hidden
        );
        for f in ["model.safetensors", "config.json", "tokenizer.json"] {
            assert_eq!(
                fs::read(a.join(f)).unwrap(),
                fs::read(b.join(f)).unwrap(),
                "{f}"
            );
        }
        let c = dir.path().join("c");
        generate(&c, Preset::Tiny, 8).unwrap();
        assert_ne!(
            fs::read(a.join("model.safetensors")).unwrap(),
            fs::read(c.join("model.safetensors")).unwrap()
        );
        let st = fs::read(a.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let head = st.tensor("lm_head.weight").unwrap();
        assert_eq!(head.shape(), &[VOCAB, s.hidden]);
        let row = |t: usize| &head.data()[t * s.hidden * 4..(t + 1) * s.hidden * 4];
        assert!(row(EOS_ID as usize).iter().all(|&x| x == 0));
        assert!(row(b'\n' as usize).iter().all(|&x| x == 0));
        assert!(row(b'a' as usize).iter().any(|&x| x != 0));
        let tok: serde_json::Value =
            serde_json::from_slice(&fs::read(a.join("tokenizer.json")).unwrap()).unwrap();
        assert_eq!(tok["model"]["vocab"].as_object().unwrap().len(), 256);
    }
}
