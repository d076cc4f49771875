//! `veil session open|show|close`: v3 sessions owned by the wallet.

use std::time::Duration;

use alloy::primitives::Address;
use clap::{Args, Subcommand};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::config::{CallerArgs, sdk_error, utc};
use super::input::parse_session_id;
use super::{CliError, EXIT_STATUS_HELP, Output};
use crate::{SessionKind, SessionOptions, V3Session};

#[derive(Args, Debug)]
pub(crate) struct SessionArgs {
    #[command(flatten)]
    caller: CallerArgs,
    #[command(subcommand)]
    command: SessionCommand,
}

#[derive(Subcommand, Debug)]
enum SessionCommand {
    /// Open a session owned by the wallet (a signed OpenSession); prints its id
    #[command(after_help = EXIT_STATUS_HELP)]
    Open {
        /// Session kind
        #[arg(long, default_value = "dedicated", value_name = "dedicated|pooled",
              value_parser = clap::value_parser!(SessionKindArg))]
        kind: SessionKindArg,
        /// Lifetime in seconds (default: no expiry)
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
        ttl: Option<u64>,
        /// A miner allowed to serve the session (repeatable); any makes the session private
        #[arg(long = "allow-miner", value_name = "ADDRESS", value_parser = parse_address)]
        allow_miners: Vec<Address>,
    },
    /// Show a session of the wallet
    #[command(after_help = EXIT_STATUS_HELP)]
    Show {
        /// The session id
        #[arg(value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
    },
    /// Close a session of the wallet: no new tasks; its blobs are deleted
    #[command(after_help = EXIT_STATUS_HELP)]
    Close {
        /// The session id
        #[arg(value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
    },
}

/// `dedicated` or `pooled` on the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionKindArg(pub(crate) SessionKind);

impl std::str::FromStr for SessionKindArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(SessionKindArg)
    }
}

/// Clap value parser for a miner address: `0x` and 40 hex characters, any case.
pub(crate) fn parse_address(text: &str) -> Result<Address, String> {
    veil_api::wire::parse_address(text)
        .map_err(|_| "expected an address: 0x followed by 40 hex characters".into())
}

pub(crate) fn execute(args: SessionArgs) -> Result<Output, CliError> {
    let settings = args.caller.resolve()?;
    let json = settings.json;
    settings.block_on(async |client| match args.command {
        SessionCommand::Open {
            kind,
            ttl,
            allow_miners,
        } => {
            let mut opts = SessionOptions::new().kind(kind.0);
            if let Some(t) = ttl {
                opts = opts.ttl(Duration::from_secs(t));
            }
            opts.allowed_miners = allow_miners;
            let s = client.open_session(opts).await.map_err(sdk_error)?;
            Ok(render(&s.info(), json, "opened"))
        }
        SessionCommand::Show { session } => {
            let info = client.session(session).await.map_err(sdk_error)?;
            Ok(render(&info, json, ""))
        }
        SessionCommand::Close { session } => {
            let s = client.resume_session(session).await.map_err(sdk_error)?;
            client.close_session(&s).await.map_err(sdk_error)?;
            Ok(render(&s.info(), json, "closed"))
        }
    })
}

/// A session as one line of JSON, or as text.
pub(crate) fn render(s: &V3Session, json: bool, verb: &str) -> Output {
    if json {
        let mut line = serde_json::to_vec(s).expect("a session serializes");
        line.push(b'\n');
        return Zeroizing::new(line);
    }
    Zeroizing::new(session_text(s, verb).into_bytes())
}

pub(crate) fn session_text(s: &V3Session, verb: &str) -> String {
    let mut out = if verb.is_empty() {
        format!("session {}\n", s.session_id)
    } else {
        format!("session {} {verb}\n", s.session_id)
    };
    out.push_str(&format!("  owner     {}\n", s.owner));
    out.push_str(&format!("  kind      {}\n", s.kind));
    let privacy = if s.private {
        format!(
            "private: {} allowed miner(s), list from {}",
            s.allowed_miners.len(),
            s.allowlist_source
        )
    } else {
        "not private: any miner may serve it".to_string()
    };
    out.push_str(&format!("  privacy   {privacy}\n"));
    for m in &s.allowed_miners {
        out.push_str(&format!("            {m}\n"));
    }
    out.push_str(&format!("  created   {}\n", utc(s.created_at_ms)));
    out.push_str(&format!(
        "  expires   {}\n",
        s.expires_at_ms.map_or("never".to_string(), utc)
    ));
    if let Some(c) = s.closed_at_ms {
        out.push_str(&format!("  closed    {}\n", utc(c)));
    }
    out
}
