//! The `veil` command-line tool.
//!
//! The binary only calls [`main`]; everything else lives here so that the commands can be
//! driven from tests through [`run`] and new command groups can be added beside `crypto` and
//! `urn`.
//!
//! Output contract, for every command: on success the result goes to stdout (nothing on
//! stderr); on failure stdout stays empty and stderr gets exactly one line,
//! `veil: error: <field>: <what is wrong>`, that names the flag, argument or stream at fault and
//! never contains a secret. Output is buffered and written only once the command has
//! succeeded — with one exception: `veil complete --stream` writes the text as it is generated,
//! so a failure mid-way leaves the text received so far (every piece of it authenticated) on
//! stdout before the error line.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, Parser, Subcommand};
use zeroize::Zeroizing;

mod acl;
mod complete;
mod config;
mod crypto;
mod input;
mod session;
mod task;
mod urn;
mod wallet;

/// Exit status of a command that succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status when the arguments were well formed but the operation failed: a blob or wrapped
/// key that does not authenticate, an invalid URN, an unreadable stdin or unwritable stdout.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status for a usage error: a missing, unknown or conflicting flag, or a flag value (or
/// the file it names) that does not parse. Nothing was attempted.
pub const EXIT_USAGE: u8 = 2;

/// The exit-status paragraph shown at the end of every `--help`.
const EXIT_STATUS_HELP: &str = "\
Exit status: 0 on success; 1 when the input was well formed but refused (a blob or wrapped key \
that does not authenticate, an invalid URN, a refusal by the router or the chain, a result that \
fails its checks) or stdin/stdout failed; 2 for a usage error (a \
missing, unknown or conflicting flag, or a flag value that does not parse). On any failure \
stdout is empty (but for text `veil complete --stream` already printed) and stderr holds one \
line: `veil: error: <field>: <reason>`.";

/// Why a command failed. Each variant renders as the single line printed after `veil: error: `.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The command line is wrong; reported by the argument parser itself.
    #[error("{0}")]
    Syntax(String),
    /// A flag's value, or the file it names, is wrong or inconsistent with another flag.
    #[error("{field}: {message}")]
    Usage {
        /// The flag or argument at fault, e.g. `--key-hex`.
        field: &'static str,
        /// What is wrong with it; never contains a secret.
        message: String,
    },
    /// The input was well formed but refused, or the operation failed.
    #[error("{field}: {message}")]
    Failed {
        /// The flag, argument or stream at fault, e.g. `stdin` or `--wrapped`.
        field: &'static str,
        /// What went wrong; never contains a secret.
        message: String,
    },
}

impl CliError {
    pub(crate) fn usage(field: &'static str, message: impl Into<String>) -> Self {
        Self::Usage {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn failed(field: &'static str, message: impl Into<String>) -> Self {
        Self::Failed {
            field,
            message: message.into(),
        }
    }

    /// The process exit status for this error ([`EXIT_USAGE`] or [`EXIT_FAILURE`]).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Syntax(_) | Self::Usage { .. } => EXIT_USAGE,
            Self::Failed { .. } => EXIT_FAILURE,
        }
    }
}

/// What a successful command writes to stdout. Zeroized on drop: it may be a key or plaintext.
pub(crate) type Output = Zeroizing<Vec<u8>>;

#[derive(Parser)]
#[command(
    name = "veil",
    version,
    about = "Veil command-line tool: private completions, sessions, the ACL contract, protocol interop",
    long_about = "Veil command-line tool.\n\n\
        `session`, `complete` and `task` run private completions through a router's /api/v3: \
        the prompt is sealed on this machine, requests are signed by your wallet, and results are \
        verified and opened here (see docs/sdk.md). `acl` manages the on-chain ACL contract. \
        The `crypto` and `urn` commands expose the Veil protocol v1 primitives (key derivation, \
        the blob envelope, key wrapping, blob URNs) one step at a time, so that an implementation \
        in another language can check itself byte for byte against this one. See docs/protocol.md.",
    after_help = EXIT_STATUS_HELP,
    propagate_version = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open, show and close private sessions owned by your wallet (/api/v3)
    #[command(after_help = EXIT_STATUS_HELP)]
    Session(session::SessionArgs),
    /// Run one private completion: sealed here, signed by your wallet, verified and opened here
    #[command(after_help = EXIT_STATUS_HELP)]
    Complete(complete::CompleteArgs),
    /// Show a task of one of your sessions, or fetch and open its result
    #[command(after_help = EXIT_STATUS_HELP)]
    Task(task::TaskArgs),
    /// Key derivation, blob sealing and opening, key wrapping (protocol sections 2-4)
    #[command(subcommand, after_help = EXIT_STATUS_HELP)]
    Crypto(crypto::CryptoCommand),
    /// Blob URNs (protocol section 5)
    #[command(subcommand, after_help = EXIT_STATUS_HELP)]
    Urn(urn::UrnCommand),
    /// The on-chain ACL contract: deploy, admins, miners, sessions, allowlists
    #[command(after_help = EXIT_STATUS_HELP)]
    Acl(acl::AclArgs),
}

/// The clap command tree of `veil`, e.g. for generating shell completions or manual pages.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Runs `veil` as a process: real arguments and standard streams, exit status returned.
pub fn main() -> ExitCode {
    let code = run(
        std::env::args_os(),
        &mut io::stdin().lock(),
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    );
    ExitCode::from(code)
}

/// Runs `veil` with the given arguments (the first is the program name) and streams, and returns
/// the exit status: [`EXIT_OK`], [`EXIT_FAILURE`] or [`EXIT_USAGE`].
pub fn run<I, T>(
    args: I,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let result = match Cli::try_parse_from(args) {
        Ok(cli) => execute(cli, stdin, stdout),
        // `--help` and `--version` arrive as "errors" that belong on stdout.
        Err(err) if !err.use_stderr() => Ok(Zeroizing::new(err.render().to_string().into_bytes())),
        Err(err) => Err(CliError::Syntax(clap_error_line(&err))),
    };
    let result = result.and_then(|out| {
        stdout
            .write_all(&out)
            .and_then(|()| stdout.flush())
            .map_err(|e| CliError::failed("stdout", e.to_string()))
    });
    match result {
        Ok(()) => EXIT_OK,
        Err(err) => {
            // If stderr itself is gone there is nowhere left to report to; the status still says it.
            let _ = writeln!(stderr, "veil: error: {}", one_line(&err.to_string()));
            err.exit_code()
        }
    }
}

fn execute(cli: Cli, stdin: &mut dyn Read, stdout: &mut dyn Write) -> Result<Output, CliError> {
    match cli.command {
        Command::Session(args) => session::execute(args),
        Command::Complete(args) => complete::execute(args, stdin, stdout),
        Command::Task(args) => task::execute(args),
        Command::Crypto(cmd) => crypto::execute(cmd, stdin),
        Command::Urn(cmd) => urn::execute(cmd),
        Command::Acl(args) => acl::execute(args),
    }
}

/// Collapses any line breaks so that an error is always exactly one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Turns a clap error into one line in the `<field>: <reason>` style of our own errors, without
/// echoing anything that might be a secret.
fn clap_error_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    // Clap's message is the paragraph before the first blank line; usage and tips follow it.
    let paragraph = rendered.split("\n\n").next().unwrap_or_default();
    let mut line = one_line(paragraph.strip_prefix("error:").unwrap_or(paragraph));

    let context = |kind| match err.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    match err.kind() {
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            if let (Some(arg), Some(value)) = (
                context(ContextKind::InvalidArg),
                context(ContextKind::InvalidValue),
            ) {
                let flag = arg.split_whitespace().next().unwrap_or(arg);
                let reason = if let Some(source) = std::error::Error::source(err) {
                    source.to_string()
                } else if let Some(ContextValue::Strings(valid)) = err.get(ContextKind::ValidValue)
                {
                    format!("expected one of {}", valid.join(", "))
                } else {
                    String::new()
                };
                line = if value.is_empty() {
                    format!("{flag}: a value is required")
                } else {
                    format!("{flag}: invalid value '{}': {reason}", shorten(value))
                };
            }
        }
        ErrorKind::UnknownArgument => {
            // A stray positional argument may well be a secret pasted in the wrong place.
            if let Some(arg) = context(ContextKind::InvalidArg) {
                line = if arg.starts_with('-') {
                    let name = arg.split('=').next().unwrap_or(arg);
                    format!("unexpected argument '{name}'")
                } else {
                    "unexpected positional argument (not shown, in case it is a secret)".to_string()
                };
            }
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            line = "a subcommand is required".to_string();
        }
        _ => {}
    }
    match help_hint(err, &rendered) {
        Some(path) => format!("{line} (see '{path} --help')"),
        None => line,
    }
}

/// The command path (`veil crypto seal`) from the usage line of a clap error.
fn help_hint(err: &clap::Error, rendered: &str) -> Option<String> {
    let usage = match err.get(ContextKind::Usage) {
        Some(ContextValue::StyledStr(s)) => s.to_string(),
        _ => rendered
            .lines()
            .find(|l| l.trim_start().starts_with("Usage:"))?
            .to_string(),
    };
    let usage = usage.trim().strip_prefix("Usage:")?;
    let words: Vec<&str> = usage
        .split_whitespace()
        .take_while(|w| {
            w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !w.starts_with('-')
        })
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

fn shorten(value: &str) -> String {
    const MAX: usize = 64;
    if value.chars().count() <= MAX {
        value.to_string()
    } else {
        let head: String = value.chars().take(MAX).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str], stdin: &[u8]) -> (u8, Vec<u8>, String) {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut input = stdin;
        let code = run(
            std::iter::once("veil").chain(args.iter().copied()),
            &mut input,
            &mut out,
            &mut err,
        );
        (code, out, String::from_utf8(err).unwrap())
    }

    #[test]
    fn clap_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn help_goes_to_stdout_with_status_zero() {
        let (code, out, err) = run_args(&["crypto", "seal", "--help"], b"");
        assert_eq!(code, EXIT_OK);
        assert!(err.is_empty());
        let help = String::from_utf8(out).unwrap();
        assert!(help.contains("--chunk-exp"), "{help}");
        assert!(help.contains("Exit status"), "{help}");
    }

    #[test]
    fn missing_subcommand_is_one_line() {
        let (code, out, err) = run_args(&[], b"");
        assert_eq!(code, EXIT_USAGE);
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("veil: error: "), "{err}");
    }

    #[test]
    fn missing_required_flags_are_listed_on_one_line() {
        let (code, out, err) = run_args(&["crypto", "derive", "--seed-hex", "00"], b"");
        assert_eq!(code, EXIT_USAGE);
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--session"), "{err}");
        assert!(err.contains("(see 'veil crypto derive --help')"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_flag() {
        let (code, _, err) = run_args(
            &["crypto", "derive", "--seed-hex", "00", "--session", "nope"],
            b"",
        );
        assert_eq!(code, EXIT_USAGE);
        assert!(
            err.starts_with(
                "veil: error: --session: invalid value 'nope': expected a hyphenated UUID"
            ),
            "{err}"
        );
    }

    #[test]
    fn stray_positionals_are_not_echoed() {
        let secret = "ab".repeat(32);
        let (code, _, err) = run_args(&["crypto", "x25519-keygen", &secret], b"");
        assert_eq!(code, EXIT_USAGE);
        assert!(!err.contains(&secret), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
