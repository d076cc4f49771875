//! `veil task show|result`: a task of a v3 session, and its verified, opened result.

use clap::{Args, Subcommand};
use serde::Serialize;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::config::{CallerArgs, sdk_error, utc};
use super::input::{parse_session_id, parse_task_id};
use super::{CliError, EXIT_STATUS_HELP, Output};
use veil_api::wire::Hex32;

use crate::{Completion, Usage, V3Task};

#[derive(Args, Debug)]
pub(crate) struct TaskArgs {
    #[command(flatten)]
    caller: CallerArgs,
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Subcommand, Debug)]
enum TaskCommand {
    /// A task's state and, once completed, its miner, usage and result hash
    #[command(after_help = EXIT_STATUS_HELP)]
    Show {
        /// The task's session
        #[arg(long, value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
        /// The task id
        #[arg(value_name = "TASK", value_parser = parse_task_id)]
        task: Uuid,
    },
    /// A completed task's text: the miner's signature, the blob's hash and its AEAD are checked
    /// before anything is printed
    #[command(after_help = EXIT_STATUS_HELP)]
    Result {
        /// The task's session
        #[arg(long, value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
        /// The task id
        #[arg(value_name = "TASK", value_parser = parse_task_id)]
        task: Uuid,
    },
}

pub(crate) fn execute(args: TaskArgs) -> Result<Output, CliError> {
    let settings = args.caller.resolve()?;
    let json = settings.json;
    settings.block_on(async |client| match args.command {
        TaskCommand::Show { session, task } => {
            let s = client.resume_session(session).await.map_err(sdk_error)?;
            let t = client.task(&s, task).await.map_err(sdk_error)?;
            if json {
                let mut line = serde_json::to_vec(&t).expect("a task serializes");
                line.push(b'\n');
                Ok(Zeroizing::new(line))
            } else {
                Ok(Zeroizing::new(task_text(&t).into_bytes()))
            }
        }
        TaskCommand::Result { session, task } => {
            let s = client.resume_session(session).await.map_err(sdk_error)?;
            let c = client.result(&s, task).await.map_err(sdk_error)?;
            Ok(completion_output(&c, json))
        }
    })
}

fn task_text(t: &V3Task) -> String {
    let mut out = format!("task {}\n", t.task_id);
    out.push_str(&format!("  session   {}\n", t.session_id));
    out.push_str(&format!("  state     {}\n", t.state));
    out.push_str(&format!("  model     {}\n", t.model));
    out.push_str(&format!("  key       version {}\n", t.key_version));
    out.push_str(&format!("  attempts  {}\n", t.attempts));
    out.push_str(&format!("  created   {}\n", utc(t.created_at_ms)));
    out.push_str(&format!("  prompt    sha256 {}\n", t.prompt_hash));
    if let Some(e) = &t.error {
        out.push_str(&format!("  error     [{}] {}\n", e.code, e.message));
    }
    if let Some(r) = &t.result {
        out.push_str(&format!("  miner     {}\n", r.miner));
        out.push_str(&format!(
            "  usage     {} prompt + {} completion tokens\n",
            r.usage.prompt_tokens, r.usage.completion_tokens
        ));
        out.push_str(&format!("  finish    {}\n", r.finish_reason));
        out.push_str(&format!(
            "  result    sha256 {}, {} bytes{}\n",
            r.signed.message.result_hash,
            r.size,
            if r.deleted { " (deleted)" } else { "" }
        ));
    }
    out
}

/// A completion as its text (with a final newline), or as one line of JSON.
pub(crate) fn completion_output(c: &Completion, json: bool) -> Output {
    if json {
        return json_line(&CompletionJson::new(c, Some(c.text.as_str())), c.text.len());
    }
    let mut out = Zeroizing::new(Vec::with_capacity(c.text.len() + 1));
    out.extend_from_slice(c.text.as_bytes());
    if !c.text.ends_with('\n') {
        out.push(b'\n');
    }
    out
}

/// The JSON form of a completion (with its text when given).
#[derive(Serialize)]
pub(crate) struct CompletionJson<'a> {
    task_id: Uuid,
    session_id: Uuid,
    model: &'a str,
    miner: String,
    usage: Usage,
    finish_reason: &'a str,
    key_version: u32,
    result_hash: Hex32,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

impl<'a> CompletionJson<'a> {
    pub(crate) fn new(c: &'a Completion, text: Option<&'a str>) -> Self {
        Self {
            task_id: c.task_id,
            session_id: c.session_id,
            model: &c.model,
            miner: c.miner.to_checksum(None),
            usage: c.usage,
            finish_reason: &c.finish_reason,
            key_version: c.key_version,
            result_hash: c.result_hash,
            text,
        }
    }
}

/// One line of JSON in a zeroizing buffer sized so that it never reallocates (JSON escaping at
/// most sextuples a byte), since it may hold plaintext.
pub(crate) fn json_line<T: Serialize>(value: &T, text_len: usize) -> Output {
    let mut out = Zeroizing::new(Vec::with_capacity(text_len * 6 + 4096));
    serde_json::to_writer(&mut *out, value).expect("JSON serializes");
    out.push(b'\n');
    out
}
