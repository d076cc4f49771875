//! The options every caller command (`session`, `complete`, `task`) shares: the router, the
//! wallet, an optional TOML file, the output format. Precedence: flag > environment > file.
//!
//! The file (`--config PATH` or `VEIL_CONFIG`; none by default) may hold:
//!
//! ```toml
//! router = "https://router.example"
//! keystore = "/home/me/.veil/wallet.json"   # or, for development: private_key_file = "…"
//! model = "tiny"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::CliError;
use super::wallet::{Wallet, load_wallet};
use crate::{Client, Error};

/// Options shared by the caller commands.
#[derive(Args, Debug, Clone)]
pub(crate) struct CallerArgs {
    /// Router base URL, e.g. https://router.example
    #[arg(
        long,
        global = true,
        env = "VEIL_ROUTER_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub(crate) router: Option<String>,
    /// Encrypted JSON keystore of the wallet (password from VEIL_KEYSTORE_PASSWORD, or asked for
    /// on the terminal)
    #[arg(
        long,
        global = true,
        env = "VEIL_KEYSTORE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub(crate) keystore: Option<PathBuf>,
    /// A file holding the wallet's raw private key in hex, for development (VEIL_PRIVATE_KEY
    /// holds the key itself)
    #[arg(
        long,
        global = true,
        env = "VEIL_PRIVATE_KEY_FILE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub(crate) private_key_file: Option<PathBuf>,
    /// TOML file with defaults: `router`, `keystore`, `private_key_file`, `model`
    #[arg(
        long,
        global = true,
        env = "VEIL_CONFIG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub(crate) config: Option<PathBuf>,
    /// Print JSON for scripts instead of text
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Seconds to wait for a task to finish
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) wait: u64,
}

/// The TOML configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) router: Option<String>,
    pub(crate) keystore: Option<PathBuf>,
    pub(crate) private_key_file: Option<PathBuf>,
    pub(crate) model: Option<String>,
}

/// The settings in effect: flags and environment over the file.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) router: String,
    pub(crate) keystore: Option<PathBuf>,
    pub(crate) private_key_file: Option<PathBuf>,
    pub(crate) model: Option<String>,
    pub(crate) json: bool,
    pub(crate) wait: Duration,
}

pub(crate) fn read_file_config(path: &Path) -> Result<FileConfig, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage("--config", format!("cannot read {}: {e}", path.display())))?;
    // toml's messages quote the offending line, which may hold a secret in the wrong place;
    // report the key path and position only.
    toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        // Keep the field names serde reports (in backticks); drop double-quoted values.
        let first = e.message().lines().next().unwrap_or("invalid TOML");
        let msg = first
            .split('"')
            .step_by(2)
            .collect::<Vec<_>>()
            .join("\"…\"");
        CliError::usage("--config", format!("{}{at}: {msg}", path.display()))
    })
}

impl CallerArgs {
    pub(crate) fn resolve(&self) -> Result<Resolved, CliError> {
        let file = match &self.config {
            Some(p) => read_file_config(p)?,
            None => FileConfig::default(),
        };
        let router = self.router.clone().or(file.router).ok_or_else(|| {
            CliError::usage(
                "--router",
                "required: the router's URL (or set VEIL_ROUTER_URL, or `router` in --config)",
            )
        })?;
        // A wallet named by flag or environment replaces the file's, whichever kind it is.
        let (keystore, private_key_file) =
            if self.keystore.is_some() || self.private_key_file.is_some() {
                (self.keystore.clone(), self.private_key_file.clone())
            } else {
                (file.keystore, file.private_key_file)
            };
        Ok(Resolved {
            router,
            keystore,
            private_key_file,
            model: file.model,
            json: self.json,
            wait: Duration::from_secs(self.wait),
        })
    }
}

impl Resolved {
    /// Loads the wallet and builds the client.
    pub(crate) fn client(&self) -> Result<Client, CliError> {
        let wallet = load_wallet(self.keystore.as_deref(), self.private_key_file.as_deref())?;
        let Wallet(signer) = wallet;
        Client::builder(&self.router)
            .signer(signer)
            .completion_timeout(self.wait)
            .build()
            .map_err(|e| match e {
                Error::Invalid(m) => CliError::usage("--router", m),
                other => sdk_error(other),
            })
    }

    /// Builds the client and runs a command's `work` with it on a current-thread runtime.
    pub(crate) fn block_on<T>(
        &self,
        work: impl AsyncFnOnce(&Client) -> Result<T, CliError>,
    ) -> Result<T, CliError> {
        let client = self.client()?;
        runtime()?.block_on(work(&client))
    }
}

/// A client error as one CLI error line: the part at fault, the stable code, and the advice.
pub(crate) fn sdk_error(e: Error) -> CliError {
    let field = match &e {
        Error::SignatureExpired { .. } => "clock",
        Error::NotOwner { .. }
        | Error::NotAllowed { .. }
        | Error::ReplayedNonce
        | Error::Wallet(_) => "wallet",
        Error::KeyVersionRetired { .. }
        | Error::KeyVersionDestroyed { .. }
        | Error::KeyVersionStale { .. } => "key",
        Error::SessionClosed => "session",
        Error::Timeout { .. }
        | Error::TaskFailed { .. }
        | Error::Pending { .. }
        | Error::StreamRestarted { .. }
        | Error::ResultDeleted { .. } => "task",
        Error::Integrity(_) => "result",
        Error::Invalid(_) => "input",
        _ => "router",
    };
    CliError::failed(field, format!("[{}] {e}", e.code()))
}

/// A current-thread runtime for one command.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed("runtime", e.to_string()))
}

/// Unix milliseconds as RFC 3339 UTC to the second (`2023-11-14T22:13:20Z`). Times before the
/// epoch show as the epoch; past the year 9999 (which RFC 3339 cannot write), as its last second.
pub(crate) fn utc(ms: i64) -> String {
    const LAST_RFC3339_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = u64::try_from(ms.div_euclid(1000)).unwrap_or(0);
    let at = std::time::UNIX_EPOCH + Duration::from_secs(secs.min(LAST_RFC3339_SECS));
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_798_761_599_000), "2026-12-31T23:59:59Z");
        assert_eq!(utc(1_798_761_599_999), "2026-12-31T23:59:59Z");
        assert_eq!(utc(-1), "1970-01-01T00:00:00Z");
        assert_eq!(utc(i64::MIN), "1970-01-01T00:00:00Z");
        assert_eq!(utc(i64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn config_file_values_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("veil.toml");
        std::fs::write(&good, "router = \"http://r\"\nmodel = \"tiny\"\n").unwrap();
        let c = read_file_config(&good).unwrap();
        assert_eq!(c.router.as_deref(), Some("http://r"));
        assert_eq!(c.model.as_deref(), Some("tiny"));

        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "router = \"http://r\"\nsecret_key = \"deadbeefsecret\"\n",
        )
        .unwrap();
        let e = read_file_config(&bad).unwrap_err().to_string();
        assert!(e.starts_with("--config: "), "{e}");
        assert!(!e.contains("deadbeefsecret"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("veil.toml");
        std::fs::write(
            &file,
            "router = \"http://file\"\nkeystore = \"/file/ks.json\"\n",
        )
        .unwrap();
        let args = CallerArgs {
            router: Some("http://flag".into()),
            keystore: None,
            private_key_file: Some("/flag/key".into()),
            config: Some(file),
            json: false,
            wait: 5,
        };
        let r = args.resolve().unwrap();
        assert_eq!(r.router, "http://flag");
        assert_eq!(r.keystore, None);
        assert_eq!(r.private_key_file.as_deref(), Some(Path::new("/flag/key")));
    }
}
