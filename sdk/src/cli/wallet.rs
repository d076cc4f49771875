//! The caller commands' wallet: an encrypted JSON keystore (password from
//! `VEIL_KEYSTORE_PASSWORD`, or asked for on the terminal), or for development a raw private key
//! from `--private-key-file` or `VEIL_PRIVATE_KEY`. Exactly one must be given. Keys and
//! passwords live in zeroizing buffers and never appear in output or errors.

use std::io::IsTerminal;
use std::path::Path;

use alloy::signers::local::PrivateKeySigner;
use zeroize::Zeroizing;

use super::CliError;
use crate::wallet;

/// Environment variable holding a raw private key (hex), for development.
pub(crate) const PRIVATE_KEY_ENV: &str = "VEIL_PRIVATE_KEY";
/// Environment variable holding the keystore's password.
pub(crate) const PASSWORD_ENV: &str = "VEIL_KEYSTORE_PASSWORD";

/// A loaded wallet.
pub(crate) struct Wallet(pub(crate) PrivateKeySigner);

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wallet({})", self.0.address())
    }
}

pub(crate) fn load_wallet(
    keystore: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<Wallet, CliError> {
    let env_key = std::env::var(PRIVATE_KEY_ENV)
        .ok()
        .filter(|k| !k.trim().is_empty())
        .map(Zeroizing::new);
    let given = usize::from(keystore.is_some())
        + usize::from(key_file.is_some())
        + usize::from(env_key.is_some());
    if given > 1 {
        return Err(CliError::usage(
            "--keystore",
            format!(
                "more than one wallet given (--keystore, --private-key-file, {PRIVATE_KEY_ENV}); \
                 use one"
            ),
        ));
    }
    if let Some(path) = keystore {
        let password = match std::env::var(PASSWORD_ENV) {
            Ok(p) => Zeroizing::new(p),
            // Prompt only when a person is there to answer; the prompt and the answer go through
            // the terminal, not stdout or stderr.
            Err(_) if std::io::stdin().is_terminal() => Zeroizing::new(
                rpassword::prompt_password(format!("Password for {}: ", path.display())).map_err(
                    |e| CliError::usage("--keystore", format!("cannot read the password: {e}")),
                )?,
            ),
            Err(_) => {
                return Err(CliError::usage(
                    "--keystore",
                    format!("no password: set {PASSWORD_ENV} or run on a terminal"),
                ));
            }
        };
        return wallet::from_keystore(path, password.as_bytes())
            .map(Wallet)
            .map_err(|e| CliError::usage("--keystore", strip(e)));
    }
    if let Some(path) = key_file {
        return wallet::from_private_key_file(path)
            .map(Wallet)
            .map_err(|e| CliError::usage("--private-key-file", strip(e)));
    }
    if let Some(key) = env_key {
        return wallet::from_private_key_hex(&key)
            .map(Wallet)
            .map_err(|e| CliError::usage(PRIVATE_KEY_ENV, strip(e)));
    }
    Err(CliError::usage(
        "--keystore",
        format!(
            "a wallet is required: --keystore FILE (or VEIL_KEYSTORE), or for development \
             --private-key-file FILE or {PRIVATE_KEY_ENV}"
        ),
    ))
}

/// The wallet error's text without its `wallet: ` prefix (the field names it already).
fn strip(e: crate::Error) -> String {
    let s = e.to_string();
    s.strip_prefix("wallet: ").unwrap_or(&s).to_string()
}
