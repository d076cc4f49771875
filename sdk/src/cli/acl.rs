//! `veil acl …`: the on-chain ACL contract, for its admins, session owners and miners.
//!
//! Every transaction is signed by a wallet from an encrypted JSON keystore (`--keystore`, password
//! from `VEIL_KEYSTORE_PASSWORD` or a prompt on the terminal) or, on local dev chains only, a raw
//! private key from `VEIL_DEV_PRIVATE_KEY`. A command prints one line of JSON once its
//! transaction is confirmed: the transaction hash, block and gas used. Refusals by the contract
//! are decoded into a readable sentence.

use std::io::IsTerminal;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::providers::{DynProvider, Provider};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::http::reqwest::Url;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use uuid::Uuid;
use veil_contracts::{AclContract, TxOutcome, http_provider, wallet_provider};
use zeroize::Zeroizing;

use super::input::{decode_hex, parse_session_id};
use super::{CliError, EXIT_STATUS_HELP, Output};

/// Environment variable holding a raw private key (hex) for local dev chains.
const DEV_KEY_ENV: &str = "VEIL_DEV_PRIVATE_KEY";
/// Environment variable holding the keystore's password.
const PASSWORD_ENV: &str = "VEIL_KEYSTORE_PASSWORD";
/// Chain ids of local dev chains (anvil and hardhat use 31337, ganache 1337).
const DEV_CHAIN_IDS: [u64; 2] = [31337, 1337];

#[derive(Args)]
pub(crate) struct AclArgs {
    /// JSON-RPC endpoint of the chain, e.g. http://127.0.0.1:8545
    #[arg(
        long,
        global = true,
        env = "VEIL_RPC_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    rpc_url: Option<Url>,
    /// Address of the ACL contract
    #[arg(
        long,
        global = true,
        env = "VEIL_ACL_CONTRACT",
        value_name = "ADDRESS",
        value_parser = parse_address
    )]
    contract: Option<Address>,
    /// Encrypted JSON keystore of the signing wallet (password from VEIL_KEYSTORE_PASSWORD, or
    /// asked for on the terminal)
    #[arg(long, global = true, env = "VEIL_KEYSTORE", value_name = "FILE")]
    keystore: Option<std::path::PathBuf>,
    /// Blocks a transaction must be deep before the command returns (1 = included)
    #[arg(long, global = true, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    confirmations: u64,
    /// Seconds to wait for the confirmations
    #[arg(long, global = true, default_value_t = 120, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Accept VEIL_DEV_PRIVATE_KEY on a chain that is not a local dev chain (31337, 1337)
    #[arg(long, global = true)]
    allow_dev_key_on_any_chain: bool,
    #[command(subcommand)]
    command: AclCommand,
}

#[derive(Subcommand)]
enum AclCommand {
    /// Deploy a new ACL contract; the signer (or the --admin accounts) become its admins
    #[command(after_help = EXIT_STATUS_HELP)]
    Deploy {
        /// A first admin (repeatable); the signer alone when none is given
        #[arg(long = "admin", value_name = "ADDRESS", value_parser = parse_address)]
        admins: Vec<Address>,
    },
    /// Add or remove admins (admins only; the last admin cannot be removed)
    #[command(subcommand, after_help = EXIT_STATUS_HELP)]
    Admin(AdminCommand),
    /// The miner registry: register, deactivate (admins), rotate a miner's own key
    #[command(subcommand, after_help = EXIT_STATUS_HELP)]
    Miner(MinerCommand),
    /// Register, transfer or close a session (its owner)
    #[command(subcommand, after_help = EXIT_STATUS_HELP)]
    Session(SessionCommand),
    /// Allow one or more registered, active miners for a session (owner or admin)
    #[command(after_help = EXIT_STATUS_HELP)]
    Allow {
        /// The session id (a UUID)
        #[arg(value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
        /// The miners' addresses; several are allowed in one transaction, all or nothing
        #[arg(value_name = "MINER", required = true, value_parser = parse_address)]
        miners: Vec<Address>,
    },
    /// Revoke one or more miners from a session (owner or admin)
    #[command(after_help = EXIT_STATUS_HELP)]
    Revoke {
        /// The session id (a UUID)
        #[arg(value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
        /// The miners' addresses; several are revoked in one transaction, all or nothing
        #[arg(value_name = "MINER", required = true, value_parser = parse_address)]
        miners: Vec<Address>,
    },
    /// List a session's allowlist, with whether each miner is allowed now (no wallet needed)
    #[command(after_help = EXIT_STATUS_HELP)]
    List {
        /// The session id (a UUID)
        #[arg(value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
    },
    /// Show a session (given a UUID), a miner (given an address) or the admins (given `admins`)
    #[command(after_help = EXIT_STATUS_HELP)]
    Show {
        /// A session id, a miner address, or the word `admins`
        #[arg(value_name = "SESSION|MINER|admins", value_parser = parse_target)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Make an account an admin
    #[command(after_help = EXIT_STATUS_HELP)]
    Add {
        #[arg(value_name = "ADDRESS", value_parser = parse_address)]
        account: Address,
    },
    /// Remove an admin (possibly yourself, never the last one)
    #[command(after_help = EXIT_STATUS_HELP)]
    Remove {
        #[arg(value_name = "ADDRESS", value_parser = parse_address)]
        account: Address,
    },
}

#[derive(Subcommand)]
enum MinerCommand {
    /// Register a miner (or re-register a deactivated one) with its X25519 key (admins only)
    #[command(after_help = EXIT_STATUS_HELP)]
    Register {
        /// The miner's wallet address
        #[arg(value_name = "ADDRESS", value_parser = parse_address)]
        miner: Address,
        /// The miner's X25519 public key: 64 hex characters
        #[arg(long, value_name = "HEX")]
        x25519: String,
        /// Where the operator describes the miner
        #[arg(long, value_name = "URI", default_value = "")]
        metadata_uri: String,
    },
    /// Deactivate a miner: it is then allowed for no session (admins only)
    #[command(after_help = EXIT_STATUS_HELP)]
    Deactivate {
        #[arg(value_name = "ADDRESS", value_parser = parse_address)]
        miner: Address,
    },
    /// Replace the signer's own X25519 key (the signer must be a registered, active miner)
    #[command(after_help = EXIT_STATUS_HELP)]
    RotateKey {
        /// The new X25519 public key: 64 hex characters
        #[arg(long, value_name = "HEX")]
        x25519: String,
    },
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Register a session with the signer as its owner
    #[command(after_help = EXIT_STATUS_HELP)]
    Register {
        #[arg(value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
    },
    /// Hand a session to a new owner (its owner only)
    #[command(after_help = EXIT_STATUS_HELP)]
    Transfer {
        #[arg(value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
        /// The new owner
        #[arg(long, value_name = "ADDRESS", value_parser = parse_address)]
        to: Address,
    },
    /// Close a session for good (its owner only)
    #[command(after_help = EXIT_STATUS_HELP)]
    Close {
        #[arg(value_name = "SESSION", value_parser = parse_session_id)]
        session: Uuid,
    },
}

#[derive(Clone, Debug)]
enum Target {
    Session(Uuid),
    Miner(Address),
    Admins,
}

fn parse_address(text: &str) -> Result<Address, String> {
    const EXPECTED: &str = "expected an address: 0x followed by 40 hex characters";
    if text.len() != 42 || !(text.starts_with("0x") || text.starts_with("0X")) {
        return Err(EXPECTED.into());
    }
    text.parse().map_err(|_| EXPECTED.into())
}

fn parse_target(text: &str) -> Result<Target, String> {
    if text == "admins" {
        Ok(Target::Admins)
    } else if text.starts_with("0x") || text.starts_with("0X") {
        parse_address(text).map(Target::Miner)
    } else {
        parse_session_id(text)
            .map(Target::Session)
            .map_err(|_| "expected a session id (UUID), a miner address (0x…) or `admins`".into())
    }
}

pub(crate) fn execute(args: AclArgs) -> Result<Output, CliError> {
    // Reqwest is built without a default TLS crypto provider; https endpoints need one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed("runtime", e.to_string()))?;
    let rpc = args
        .rpc_url
        .clone()
        .ok_or_else(|| CliError::usage("--rpc-url", "required (or set VEIL_RPC_URL)"))?;
    let redact = Redactor::new(&rpc);
    let value = runtime
        .block_on(run(args, rpc))
        .map_err(|e| redact.error(e))?;
    let mut line = serde_json::to_vec(&value)
        .map_err(|e| CliError::failed("stdout", format!("cannot encode as JSON: {e}")))?;
    line.push(b'\n');
    Ok(Zeroizing::new(line))
}

async fn run(args: AclArgs, rpc: Url) -> Result<Value, CliError> {
    let timeout = Duration::from_secs(args.timeout);
    let contract_addr = || {
        args.contract
            .ok_or_else(|| CliError::usage("--contract", "required (or set VEIL_ACL_CONTRACT)"))
    };
    match &args.command {
        AclCommand::List { session } => {
            let acl = AclContract::new(contract_addr()?, http_provider(rpc));
            return list(&acl, *session).await;
        }
        AclCommand::Show { target } => {
            let acl = AclContract::new(contract_addr()?, http_provider(rpc));
            return show(&acl, target).await;
        }
        _ => {}
    }

    let (provider, signer) = signing_provider(&args, rpc).await?;
    if let AclCommand::Deploy { admins } = &args.command {
        let d = veil_contracts::deploy(&provider, admins.clone(), args.confirmations, timeout)
            .await
            .map_err(tx_error)?;
        let chain_id = provider.get_chain_id().await.map_err(rpc_error)?;
        let mut out = tx_json(&d.tx, args.confirmations);
        out["contract"] = json!(d.address.to_checksum(None));
        out["chain_id"] = json!(chain_id);
        out["deployer"] = json!(signer.to_checksum(None));
        return Ok(out);
    }

    let acl = AclContract::new(contract_addr()?, provider)
        .with_confirmations(args.confirmations)
        .with_timeout(timeout);
    let outcome = match &args.command {
        AclCommand::Admin(AdminCommand::Add { account }) => acl.add_admin(*account).await,
        AclCommand::Admin(AdminCommand::Remove { account }) => acl.remove_admin(*account).await,
        AclCommand::Miner(MinerCommand::Register {
            miner,
            x25519,
            metadata_uri,
        }) => {
            let key = decode_hex::<32>("--x25519", x25519)?;
            acl.register_miner(*miner, *key, metadata_uri).await
        }
        AclCommand::Miner(MinerCommand::Deactivate { miner }) => acl.deactivate_miner(*miner).await,
        AclCommand::Miner(MinerCommand::RotateKey { x25519 }) => {
            let key = decode_hex::<32>("--x25519", x25519)?;
            acl.rotate_miner_key(*key).await
        }
        AclCommand::Session(SessionCommand::Register { session }) => {
            acl.register_session(*session).await
        }
        AclCommand::Session(SessionCommand::Transfer { session, to }) => {
            acl.transfer_session(*session, *to).await
        }
        AclCommand::Session(SessionCommand::Close { session }) => acl.close_session(*session).await,
        AclCommand::Allow { session, miners } => match miners.as_slice() {
            [one] => acl.allow_miner(*session, *one).await,
            many => acl.allow_miners(*session, many.to_vec()).await,
        },
        AclCommand::Revoke { session, miners } => match miners.as_slice() {
            [one] => acl.revoke_miner(*session, *one).await,
            many => acl.revoke_miners(*session, many.to_vec()).await,
        },
        AclCommand::Deploy { .. } | AclCommand::List { .. } | AclCommand::Show { .. } => {
            unreachable!("handled above")
        }
    };
    let outcome = outcome.map_err(tx_error)?;
    let mut out = tx_json(&outcome, args.confirmations);
    out["from"] = json!(signer.to_checksum(None));
    Ok(out)
}

fn tx_json(tx: &TxOutcome, confirmations: u64) -> Value {
    json!({
        "tx_hash": tx.tx_hash.to_string(),
        "block": tx.block_number,
        "gas_used": tx.gas_used,
        "confirmations": confirmations,
    })
}

async fn list(acl: &AclContract, session: Uuid) -> Result<Value, CliError> {
    let info = acl.session(session).await.map_err(read_error)?;
    let Some(info) = info else {
        return Err(CliError::failed(
            "SESSION",
            format!("session {session} is not registered on the contract"),
        ));
    };
    let mut miners = Vec::with_capacity(info.allowed.len());
    for miner in &info.allowed {
        let m = acl.miner(*miner).await.map_err(read_error)?;
        let active = m.is_some_and(|m| m.active);
        miners.push(json!({
            "miner": miner.to_checksum(None),
            "active": active,
            "allowed": active && !info.closed,
        }));
    }
    Ok(json!({
        "session": session.to_string(),
        "closed": info.closed,
        "miners": miners,
    }))
}

async fn show(acl: &AclContract, target: &Target) -> Result<Value, CliError> {
    Ok(match target {
        Target::Admins => {
            let admins = acl.admins().await.map_err(read_error)?;
            json!({ "admins": admins.iter().map(|a| a.to_checksum(None)).collect::<Vec<_>>() })
        }
        Target::Session(id) => match acl.session(*id).await.map_err(read_error)? {
            None => json!({ "session": id.to_string(), "registered": false }),
            Some(s) => json!({
                "session": id.to_string(),
                "registered": true,
                "owner": s.owner.to_checksum(None),
                "closed": s.closed,
                "allowed_count": s.allowed.len(),
            }),
        },
        Target::Miner(addr) => match acl.miner(*addr).await.map_err(read_error)? {
            None => json!({ "miner": addr.to_checksum(None), "registered": false }),
            Some(m) => json!({
                "miner": addr.to_checksum(None),
                "registered": true,
                "active": m.active,
                "x25519": hex::encode(m.x25519),
                "metadata_uri": m.metadata_uri,
            }),
        },
    })
}

/// The wallet: a keystore, or the dev key from the environment on a dev chain.
async fn signing_provider(args: &AclArgs, rpc: Url) -> Result<(DynProvider, Address), CliError> {
    let dev_key = std::env::var(DEV_KEY_ENV)
        .ok()
        .filter(|k| !k.is_empty())
        .map(Zeroizing::new);
    let signer = match (&args.keystore, dev_key) {
        (Some(_), Some(_)) => {
            return Err(CliError::usage(
                "--keystore",
                format!("both --keystore and {DEV_KEY_ENV} are set; use one wallet"),
            ));
        }
        (Some(path), None) => {
            let password = match std::env::var(PASSWORD_ENV) {
                Ok(p) => Zeroizing::new(p),
                // Prompt only when a person is there to answer (stdin is a terminal); the
                // prompt and the answer go through the terminal, not stdout or stderr.
                Err(_) if std::io::stdin().is_terminal() => Zeroizing::new(
                    rpassword::prompt_password(format!("Password for {}: ", path.display()))
                        .map_err(|e| {
                            CliError::usage("--keystore", format!("cannot read the password: {e}"))
                        })?,
                ),
                Err(_) => {
                    return Err(CliError::usage(
                        "--keystore",
                        format!("no password: set {PASSWORD_ENV} or run on a terminal"),
                    ));
                }
            };
            if !path.is_file() {
                return Err(CliError::usage("--keystore", "no such file"));
            }
            PrivateKeySigner::decrypt_keystore(path, password.as_bytes()).map_err(|_| {
                CliError::usage(
                    "--keystore",
                    "cannot decrypt: wrong password, or not an encrypted JSON keystore",
                )
            })?
        }
        (None, Some(key)) => {
            let hex_key = key.strip_prefix("0x").unwrap_or(&key);
            let bytes = decode_hex::<32>(DEV_KEY_ENV, hex_key)?;
            let signer = PrivateKeySigner::from_bytes(&B256::from(*bytes))
                .map_err(|_| CliError::usage(DEV_KEY_ENV, "not a valid secp256k1 private key"))?;
            let chain_id = http_provider(rpc.clone())
                .get_chain_id()
                .await
                .map_err(rpc_error)?;
            if !DEV_CHAIN_IDS.contains(&chain_id) && !args.allow_dev_key_on_any_chain {
                return Err(CliError::usage(
                    DEV_KEY_ENV,
                    format!(
                        "a raw private key is for local dev chains (31337, 1337) only, and this \
                         chain is {chain_id}; use --keystore (or --allow-dev-key-on-any-chain)"
                    ),
                ));
            }
            signer
        }
        (None, None) => {
            return Err(CliError::usage(
                "--keystore",
                format!(
                    "a wallet is required: --keystore FILE, or {DEV_KEY_ENV} on a local dev chain"
                ),
            ));
        }
    };
    let address = signer.address();
    Ok((wallet_provider(rpc, signer), address))
}

fn rpc_error(e: impl std::fmt::Display) -> CliError {
    CliError::failed("--rpc-url", e.to_string())
}

fn read_error(e: veil_contracts::Error) -> CliError {
    match e {
        veil_contracts::Error::Refused(_) => CliError::failed("contract", e.to_string()),
        other => rpc_error(other),
    }
}

fn tx_error(e: veil_contracts::Error) -> CliError {
    use veil_contracts::Error as E;
    match e {
        E::Refused(_) => CliError::failed("contract", e.to_string()),
        E::Reverted { tx_hash, reason } => {
            CliError::failed("transaction", format!("{tx_hash} reverted: {reason}"))
        }
        E::Unconfirmed { tx_hash, message } => {
            CliError::failed("transaction", format!("{tx_hash}: {message}"))
        }
        other => rpc_error(other),
    }
}

/// Replaces the RPC URL in messages by its scheme, host and port: a hosted endpoint's path or
/// query often carries an API key.
struct Redactor {
    full: String,
    shown: String,
}

impl Redactor {
    fn new(url: &Url) -> Self {
        let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
        if let Some(port) = url.port() {
            shown.push_str(&format!(":{port}"));
        }
        Self {
            full: url.to_string(),
            shown,
        }
    }

    fn error(&self, e: CliError) -> CliError {
        match e {
            CliError::Failed { field, message } => CliError::Failed {
                field,
                message: self.text(message),
            },
            CliError::Usage { field, message } => CliError::Usage {
                field,
                message: self.text(message),
            },
            other => other,
        }
    }

    fn text(&self, message: String) -> String {
        let trimmed = self.full.trim_end_matches('/');
        if trimmed.len() > self.shown.len() {
            message.replace(trimmed, &self.shown)
        } else {
            message
        }
    }
}
