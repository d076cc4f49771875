//! `veil complete`: one private completion, sealed on this machine.

use std::io::{Read, Write};

use alloy::primitives::Address;
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use uuid::Uuid;
use veil_api::wire::Hex32;
use zeroize::Zeroizing;

use super::config::{CallerArgs, sdk_error};
use super::input::{parse_session_id, read_to_end_zeroizing};
use super::session::{SessionKindArg, parse_address};
use super::task::{completion_output, json_line};
use super::{CliError, Output};
use crate::{Client, CompletionRequest, Session, SessionOptions, StreamSummary, Usage};

#[derive(Args, Debug)]
pub(crate) struct CompleteArgs {
    #[command(flatten)]
    caller: CallerArgs,
    /// The session to use; without it a new session is opened for this completion and closed
    /// after it (unless --keep-session)
    #[arg(long, value_name = "SESSION", value_parser = parse_session_id)]
    session: Option<Uuid>,
    /// Model name (or VEIL_MODEL, or `model` in --config)
    #[arg(long, env = "VEIL_MODEL", hide_env_values = true, value_name = "MODEL")]
    model: Option<String>,
    /// Upper bound on generated tokens
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=32768))]
    max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2
    #[arg(long, value_name = "T")]
    temperature: Option<f32>,
    /// Nucleus sampling, in (0, 1]
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Sampling seed
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// A stop sequence (repeatable); sealed with the prompt, never sent in the clear
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// A system message before the prompt
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Send the prompt as a plain completion prompt rather than a user chat message
    #[arg(long)]
    plain: bool,
    /// Print the text as the miner generates it
    #[arg(long)]
    stream: bool,
    /// Keep the session this command opens (its id is in the --json output)
    #[arg(long, conflicts_with = "session")]
    keep_session: bool,
    /// Kind of the session this command opens
    #[arg(long, value_name = "dedicated|pooled", conflicts_with = "session",
          value_parser = clap::value_parser!(SessionKindArg))]
    kind: Option<SessionKindArg>,
    /// A miner allowed to serve the session this command opens (repeatable)
    #[arg(long = "allow-miner", value_name = "ADDRESS", conflicts_with = "session",
          value_parser = parse_address)]
    allow_miners: Vec<Address>,
    /// The prompt; read from stdin when absent or `-` (prefer stdin: arguments are visible to
    /// other users of this machine)
    #[arg(value_name = "PROMPT")]
    prompt: Option<String>,
}

pub(crate) fn execute(
    args: CompleteArgs,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> Result<Output, CliError> {
    let settings = args.caller.resolve()?;
    let model = args
        .model
        .clone()
        .or(settings.model.clone())
        .ok_or_else(|| {
            CliError::usage(
                "--model",
                "required (or set VEIL_MODEL, or `model` in --config)",
            )
        })?;
    let prompt = read_prompt(args.prompt.as_deref(), stdin)?;
    let mut request = if args.plain {
        CompletionRequest::prompt(model, prompt.as_str())
    } else {
        CompletionRequest::user(model, prompt.as_str())
    };
    drop(prompt);
    if let Some(s) = &args.system {
        request = request.system(s.as_str());
    }
    request.max_tokens = args.max_tokens;
    request.temperature = args.temperature;
    request.top_p = args.top_p;
    request.seed = args.seed;
    request.stop = args.stop.clone();

    let json = settings.json;
    settings.block_on(async |client| {
        let (session, opened) = match args.session {
            Some(id) => (client.resume_session(id).await.map_err(sdk_error)?, false),
            None => {
                let mut opts = SessionOptions::new();
                if let Some(k) = args.kind {
                    opts = opts.kind(k.0);
                }
                opts.allowed_miners = args.allow_miners.clone();
                (client.open_session(opts).await.map_err(sdk_error)?, true)
            }
        };
        let result = if args.stream {
            stream(client, &session, &request, json, stdout).await
        } else {
            client
                .complete(&session, &request)
                .await
                .map(|c| completion_output(&c, json))
                .map_err(sdk_error)
        };
        if opened && !args.keep_session {
            // Best effort: the completion's outcome is what this command reports.
            if let Err(e) = client.close_session(&session).await {
                tracing::debug!(code = e.code(), "closing the one-off session failed");
            }
        }
        result
    })
}

/// The prompt from the argument, or from stdin (one trailing newline dropped).
fn read_prompt(arg: Option<&str>, stdin: &mut dyn Read) -> Result<Zeroizing<String>, CliError> {
    let text = match arg {
        Some(p) if p != "-" => Zeroizing::new(p.to_string()),
        _ => {
            let bytes = read_to_end_zeroizing(stdin)
                .map_err(|e| CliError::failed("stdin", format!("cannot read the prompt: {e}")))?;
            let s = std::str::from_utf8(&bytes)
                .map_err(|_| CliError::usage("stdin", "the prompt is not UTF-8 text"))?;
            let s = s
                .strip_suffix("\r\n")
                .or_else(|| s.strip_suffix('\n'))
                .unwrap_or(s);
            Zeroizing::new(s.to_string())
        }
    };
    if text.trim().is_empty() {
        return Err(CliError::usage(
            "PROMPT",
            "the prompt is empty (give it as an argument or on stdin)",
        ));
    }
    Ok(text)
}

#[derive(Serialize)]
struct Delta<'a> {
    delta: &'a str,
}

#[derive(Serialize)]
struct Done {
    done: bool,
    task_id: Uuid,
    session_id: Uuid,
    miner: String,
    usage: Usage,
    finish_reason: String,
    key_version: u32,
    result_hash: Hex32,
}

impl From<StreamSummary> for Done {
    fn from(s: StreamSummary) -> Self {
        Self {
            done: true,
            task_id: s.task_id,
            session_id: s.session_id,
            miner: s.miner.to_checksum(None),
            usage: s.usage,
            finish_reason: s.finish_reason,
            key_version: s.key_version,
            result_hash: s.result_hash,
        }
    }
}

/// Writes the text as it arrives (JSON: one `{"delta": …}` line per piece, then a `{"done":
/// true, …}` line). A failure mid-way leaves what was written and reports the error.
async fn stream(
    client: &Client,
    session: &Session,
    request: &CompletionRequest,
    json: bool,
    stdout: &mut dyn Write,
) -> Result<Output, CliError> {
    let mut s = client
        .complete_stream(session, request)
        .await
        .map_err(sdk_error)?;
    let write = |out: &mut dyn Write, bytes: &[u8]| {
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| CliError::failed("stdout", e.to_string()))
    };
    let mut ends_with_newline = true;
    while let Some(delta) = s.next().await {
        let delta = Zeroizing::new(delta.map_err(sdk_error)?);
        if json {
            write(stdout, &json_line(&Delta { delta: &delta }, delta.len()))?;
        } else if !delta.is_empty() {
            write(stdout, delta.as_bytes())?;
            ends_with_newline = delta.ends_with('\n');
        }
    }
    let summary = s
        .summary()
        .ok_or_else(|| CliError::failed("task", "the stream ended without a verified result"))?;
    if json {
        return Ok(json_line(&Done::from(summary), 0));
    }
    Ok(Zeroizing::new(if ends_with_newline {
        Vec::new()
    } else {
        b"\n".to_vec()
    }))
}
