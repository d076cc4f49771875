//! `veil urn …`: blob URNs (protocol section 5).

use clap::Subcommand;
use veil_blobstore::Urn;
use zeroize::Zeroizing;

use super::{CliError, EXIT_STATUS_HELP, Output};

#[derive(Subcommand)]
pub(crate) enum UrnCommand {
    /// Check a blob URN and print its components as JSON
    #[command(
        long_about = "Check a blob URN, urn:blob:{version}:{storage_type}:{provider}:{bucket}:{file_name}, \
            against the protocol's rules and print its components as one line of JSON: \
            {\"version\":…,\"storage_type\":…,\"provider\":…,\"bucket\":…,\"file_name\":…}.\n\n\
            An invalid URN exits with status 1 and one line on stderr that names the component at \
            fault. A URN that parses also formats back to exactly the same string.",
        after_help = EXIT_STATUS_HELP
    )]
    Parse {
        /// The URN to check, e.g. urn:blob:v1:s3:aws:my-bucket:sessions/prompt.blob
        #[arg(value_name = "URN")]
        urn: String,
    },
}

pub(crate) fn execute(cmd: UrnCommand) -> Result<Output, CliError> {
    match cmd {
        UrnCommand::Parse { urn } => parse(&urn),
    }
}

fn parse(text: &str) -> Result<Output, CliError> {
    let urn: Urn = text
        .parse()
        .map_err(|e: veil_blobstore::Error| CliError::failed("URN", e.to_string()))?;
    // `UrnParts` serializes as {"version","storage_type","provider","bucket","file_name"}.
    let mut line = serde_json::to_vec(&urn.parts())
        .map_err(|e| CliError::failed("URN", format!("cannot encode as JSON: {e}")))?;
    line.push(b'\n');
    Ok(Zeroizing::new(line))
}
