//! Router configuration: command-line flags, each with an environment fallback, and an optional
//! TOML file (`--config`, `VEIL_CONFIG`). Precedence: flag > environment > file > default.
//! Every setting works unset: the embedded default is one process with SQLite, local blobs and
//! a keyring it creates, all under the data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

/// `veil-router` command line.
#[derive(Debug, Clone, Parser, Default)]
#[command(
    name = "veil-router",
    version,
    about = "Veil router: private LLM inference over sealed blobs"
)]
pub struct Cli {
    /// TOML configuration file; any key may also be given as a flag or environment variable.
    #[arg(long, env = "VEIL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    /// Subcommand (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Operator subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Run the router (the default).
    Serve,
    /// Re-check the hash chain of the audit log and report the number of entries.
    AuditVerify,
    /// Create an API key and print its secret once.
    CreateApiKey {
        /// Owner label.
        #[arg(long)]
        owner: String,
        /// Give it admin rights.
        #[arg(long)]
        admin: bool,
        /// Requests per minute (0 = unlimited).
        #[arg(long, default_value_t = 600)]
        rate_per_minute: u32,
        /// Concurrent requests (0 = unlimited).
        #[arg(long, default_value_t = 64)]
        max_concurrent: u32,
    },
    /// Print the effective configuration (no secrets exist in it) and exit.
    PrintConfig,
    /// Print the OpenAPI document (the copy in docs/openapi.json is made with this).
    Openapi,
    /// Key lifecycle: status, rotate, retire, destroy, rewrap. Works on the configured keyring
    /// file and database directly (a running router picks changes up within seconds).
    Keys {
        /// What to do.
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// `veil-router keys …`. Nothing printed includes a seed.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Versions, their state, times and stored blob counts.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a new key version and make it active.
    Rotate,
    /// Retire every version up to and including N: their blobs stop opening.
    Retire {
        /// Highest version to retire (below the active one).
        #[arg(long)]
        up_to: u32,
    },
    /// Destroy a retired version's seed: its blobs become unreadable for good. Shows the
    /// number of stored blobs affected and asks for confirmation.
    Destroy {
        /// The version.
        #[arg(long)]
        version: u32,
        /// Do not ask (required without a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Re-seal router-sealed blobs of older versions under the active one. Resumable.
    Rewrap {
        /// Tasks per batch.
        #[arg(long, default_value_t = crate::key_lifecycle::DEFAULT_REWRAP_BATCH)]
        batch: u32,
    },
}

/// Settings that can come from flags, the environment or the TOML file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Settings {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "VEIL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the embedded database, blobs and keyring [default: ./veil-data].
    #[arg(long, env = "VEIL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: `sqlite://PATH` or `postgres://…` [default: sqlite in the data dir].
    #[arg(long, env = "VEIL_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Blob store: a local directory, `file://`, `s3://bucket`, `gs://bucket`, `az://container`,
    /// `mem://` [default: `blobs/` in the data dir].
    #[arg(long, env = "VEIL_BLOB_STORE")]
    pub blob_store: Option<String>,
    /// Keyring file (mode 0600, created on first start) [default: `keyring.json` in the data dir].
    /// `VEIL_KEYRING` (the keyring document or a bare hex seed) takes precedence when set.
    #[arg(long, env = "VEIL_KEYRING_PATH")]
    pub keyring_path: Option<PathBuf>,
    /// Read-only keyring file mounted from a secret manager (a keyring document or a bare hex
    /// seed; readable by owner and group at most), used instead of `keyring_path` and reloaded
    /// when it changes. Key changes are then made to the secret, not through the router.
    #[arg(long = "keyring-secret-file", env = "VEIL_KEYRING_FILE")]
    pub keyring_file: Option<PathBuf>,
    /// TLS certificate chain (PEM), to serve HTTPS without a proxy in front.
    #[arg(long, env = "VEIL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "VEIL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log format: `pretty` or `json` [default: pretty].
    #[arg(long, env = "VEIL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Chain id of the EIP-712 domain [default: 31337].
    #[arg(long, env = "VEIL_CHAIN_ID")]
    pub chain_id: Option<u64>,
    /// ACL contract address of the EIP-712 domain [default: zero address, router-managed ACL].
    #[arg(long, env = "VEIL_ACL_CONTRACT")]
    pub acl_contract: Option<String>,
    /// Largest request body in bytes [default: 4 MiB]. Blob uploads have their own limit.
    #[arg(long, env = "VEIL_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest sealed blob accepted in an upload, in bytes [default: 64 MiB].
    #[arg(long, env = "VEIL_MAX_BLOB_BYTES")]
    pub max_blob_bytes: Option<u64>,
    /// Timeout for ordinary requests, in ms [default: 30000]. Completions use `completion_timeout_ms`.
    #[arg(long, env = "VEIL_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// How long `/api/v2/completions` waits for a result before answering 504 with the task id,
    /// in ms [default: 120000].
    #[arg(long, env = "VEIL_COMPLETION_TIMEOUT_MS")]
    pub completion_timeout_ms: Option<u64>,
    /// Lease length per grant or heartbeat, in ms [default: 30000].
    #[arg(long, env = "VEIL_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Attempts before a task is dead [default: 3].
    #[arg(long, env = "VEIL_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Task deadline after submission, in ms [default: 600000].
    #[arg(long, env = "VEIL_TASK_DEADLINE_MS")]
    pub task_deadline_ms: Option<u64>,
    /// Miner token lifetime, in seconds (at most 3600) [default: 3600].
    #[arg(long, env = "VEIL_MINER_TOKEN_TTL_SECS")]
    pub miner_token_ttl_secs: Option<u64>,
    /// Static allowlist: miners allowed for new private sessions of any owner, comma-separated
    /// checksummed or lowercase addresses. Sessions created with it have source `static`.
    #[arg(long, env = "VEIL_STATIC_ALLOWED_MINERS", value_delimiter = ',')]
    pub static_allowed_miners: Option<Vec<String>>,
    /// Pinned model hashes: `name=sha256hex`, comma-separated; miners serving a pinned model with
    /// another hash get no leases for it.
    #[arg(long, env = "VEIL_PINNED_MODELS", value_delimiter = ',')]
    pub pinned_models: Option<Vec<String>>,
    /// Graceful shutdown: how long to let in-flight requests finish, in ms [default: 10000].
    #[arg(long, env = "VEIL_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// JSON-RPC endpoint (`http(s)://` or `ws(s)://`) of the chain the ACL contract
    /// (`acl_contract`) lives on. Setting it makes the contract the allowlist of every session
    /// registered on chain [default: none, no on-chain ACL].
    #[arg(long, env = "VEIL_ACL_RPC_URL")]
    pub acl_rpc_url: Option<String>,
    /// Blocks below the chain head before an ACL change is applied [default: 2].
    #[arg(long, env = "VEIL_ACL_CONFIRMATIONS")]
    pub acl_confirmations: Option<u64>,
    /// How often the router polls the chain for ACL changes, in ms [default: 2000].
    #[arg(long, env = "VEIL_ACL_POLL_INTERVAL_MS")]
    pub acl_poll_interval_ms: Option<u64>,
    /// Staleness bound, in ms: when the router's copy of the ACL is older than this, sessions
    /// registered on chain fail closed (no new tasks, leases or keys) [default: 30000].
    #[arg(long, env = "VEIL_ACL_MAX_STALENESS_MS")]
    pub acl_max_staleness_ms: Option<u64>,
    /// Where the ACL reader keeps its checkpoint between runs [default: `acl-checkpoint.json`
    /// in the data dir].
    #[arg(long, env = "VEIL_ACL_CHECKPOINT_PATH")]
    pub acl_checkpoint_path: Option<PathBuf>,
    /// Refuse a miner login whose X25519 key is not the one registered on chain for the miner
    /// (or whose miner is not registered, or deactivated) [default: false].
    #[arg(long, env = "VEIL_ACL_VERIFY_MINER_KEYS", num_args = 0..=1, default_missing_value = "true")]
    pub acl_verify_miner_keys: Option<bool>,
    /// Default retention for new sessions: delete a task's prompt blob once its result has been
    /// delivered [default: true].
    #[arg(long, env = "VEIL_RETENTION_PROMPT_ON_DELIVERY", num_args = 0..=1, default_missing_value = "true")]
    pub retention_prompt_on_delivery: Option<bool>,
    /// Default retention for new sessions: delete a prompt blob this many seconds after its task
    /// was created; 0 keeps it [default: 86400].
    #[arg(long, env = "VEIL_RETENTION_PROMPT_TTL_SECS")]
    pub retention_prompt_ttl_secs: Option<u64>,
    /// Default retention for new sessions: delete a result blob this many seconds after its task
    /// finished; 0 keeps it [default: 86400].
    #[arg(long, env = "VEIL_RETENTION_RESULT_TTL_SECS")]
    pub retention_result_ttl_secs: Option<u64>,
    /// Default retention for new sessions: delete a result blob once it has been delivered
    /// (the first fetch) [default: false].
    #[arg(long, env = "VEIL_RETENTION_RESULT_ON_FETCH", num_args = 0..=1, default_missing_value = "true")]
    pub retention_result_on_fetch: Option<bool>,
    /// How often the retention sweeper looks for blobs to delete, in ms [default: 5000].
    #[arg(long, env = "VEIL_RETENTION_SWEEP_INTERVAL_MS")]
    pub retention_sweep_interval_ms: Option<u64>,
    /// How often the orphan sweep lists the blob store for blobs that no task names (a prompt
    /// uploaded for a task never submitted, a result that lost to another), in seconds; 0 turns
    /// it off [default: 3600].
    #[arg(long, env = "VEIL_ORPHAN_SWEEP_INTERVAL_SECS")]
    pub orphan_sweep_interval_secs: Option<u64>,
    /// How old an unnamed blob must be before the orphan sweep deletes it, in seconds; a
    /// prompt uploaded through `/api/v3` must be submitted within this time [default: 86400,
    /// at least 3600].
    #[arg(long, env = "VEIL_ORPHAN_GRACE_SECS")]
    pub orphan_grace_secs: Option<u64>,
}

/// Default age below which the orphan sweep leaves an unnamed blob alone: a day.
pub const DEFAULT_ORPHAN_GRACE_SECS: u64 = 86_400;
/// Shortest orphan grace accepted: an hour, well beyond the time between storing a blob and
/// naming it in a task (milliseconds at the edge, a presigned upload's ten minutes).
pub const MIN_ORPHAN_GRACE_SECS: u64 = 3_600;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Fully resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Database URL.
    pub database_url: String,
    /// Blob store URL or path.
    pub blob_store: String,
    /// Keyring file.
    pub keyring_path: PathBuf,
    /// Read-only keyring file from a secret manager, used instead of `keyring_path`.
    pub keyring_file: Option<PathBuf>,
    /// TLS (cert, key).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Log format.
    pub log_format: LogFormat,
    /// EIP-712 domain.
    pub domain: veil_api::Domain,
    /// Body limit.
    pub max_body_bytes: usize,
    /// Blob upload limit.
    pub max_blob_bytes: u64,
    /// Request timeout.
    pub request_timeout_ms: u64,
    /// Completion wait.
    pub completion_timeout_ms: u64,
    /// Lease TTL.
    pub lease_ttl_ms: u64,
    /// Attempts.
    pub max_attempts: u32,
    /// Task deadline.
    pub task_deadline_ms: u64,
    /// Miner token TTL.
    pub miner_token_ttl_secs: u64,
    /// Static allowlist (checksummed).
    pub static_allowed_miners: Vec<String>,
    /// Pinned model hashes.
    pub pinned_models: Vec<(String, String)>,
    /// Shutdown grace.
    pub shutdown_grace_ms: u64,
    /// The on-chain ACL, when configured.
    pub acl: Option<AclConfig>,
    /// Retention policy of new sessions that do not name one.
    pub default_retention: crate::store::RetentionPolicy,
    /// Retention sweeper period.
    pub retention_sweep_interval_ms: u64,
    /// Orphan sweep period in seconds; 0: off.
    pub orphan_sweep_interval_secs: u64,
    /// Age in seconds below which the orphan sweep leaves an unnamed blob alone.
    pub orphan_grace_secs: u64,
}

/// How the router follows the on-chain ACL contract. `Debug` shows the RPC URL redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct AclConfig {
    /// JSON-RPC endpoint. It may hold an API key: it is never logged, and
    /// [`AclConfig::redacted_url`] is what is shown.
    pub rpc_url: String,
    /// The contract (the same address as the EIP-712 domain's `verifyingContract`).
    pub contract: alloy_primitives::Address,
    /// Blocks below the head before a change is applied.
    pub confirmations: u64,
    /// Poll interval.
    pub poll_interval: std::time::Duration,
    /// Past this age the view is stale and contract-backed sessions fail closed.
    pub max_staleness: std::time::Duration,
    /// Checkpoint file.
    pub checkpoint_path: PathBuf,
    /// Check miners' login keys against the chain.
    pub verify_miner_keys: bool,
}

impl std::fmt::Debug for AclConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclConfig")
            .field("rpc_url", &self.redacted_url())
            .field("contract", &self.contract)
            .field("confirmations", &self.confirmations)
            .field("poll_interval", &self.poll_interval)
            .field("max_staleness", &self.max_staleness)
            .field("checkpoint_path", &self.checkpoint_path)
            .field("verify_miner_keys", &self.verify_miner_keys)
            .finish()
    }
}

impl AclConfig {
    /// The RPC URL without its path, query or credentials (which often carry an API key).
    pub fn redacted_url(&self) -> String {
        redact_url(&self.rpc_url)
    }

    /// `text` with the RPC URL replaced by [`Self::redacted_url`] (transport errors quote it).
    pub fn redact(&self, text: &str) -> String {
        let full = self.rpc_url.trim_end_matches('/');
        let shown = self.redacted_url();
        if full.len() > shown.len() {
            text.replace(full, &shown)
        } else {
            text.to_string()
        }
    }
}

/// `scheme://host[:port]` of a URL, or `<unparsable URL>`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable URL>".into();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    format!("{scheme}://{host}")
}

/// The on-chain ACL settings, or `None` when no RPC URL is set (the other `acl_*` settings are
/// then refused, so that a half-configured ACL is noticed rather than silently ignored).
fn acl_config(
    s: &Settings,
    contract: alloy_primitives::Address,
    data_dir: &Path,
) -> Result<Option<AclConfig>, ConfigError> {
    let Some(rpc_url) = s
        .acl_rpc_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        let set = [
            ("acl_confirmations", s.acl_confirmations.is_some()),
            ("acl_poll_interval_ms", s.acl_poll_interval_ms.is_some()),
            ("acl_max_staleness_ms", s.acl_max_staleness_ms.is_some()),
            ("acl_checkpoint_path", s.acl_checkpoint_path.is_some()),
            ("acl_verify_miner_keys", s.acl_verify_miner_keys.is_some()),
        ];
        if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
            return Err(err(
                name,
                "needs acl_rpc_url (the on-chain ACL is not configured)",
            ));
        }
        return Ok(None);
    };
    let scheme = rpc_url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("http" | "https" | "ws" | "wss")) {
        return Err(err(
            "acl_rpc_url",
            format!(
                "{}: must start with http://, https://, ws:// or wss://",
                redact_url(rpc_url)
            ),
        ));
    }
    if contract.is_zero() {
        return Err(err(
            "acl_contract",
            "the ACL contract address is required with acl_rpc_url",
        ));
    }
    let confirmations = s.acl_confirmations.unwrap_or(2);
    if confirmations > 1_000 {
        return Err(err("acl_confirmations", "must be at most 1000"));
    }
    let poll_ms = s.acl_poll_interval_ms.unwrap_or(2_000);
    if !(10..=3_600_000).contains(&poll_ms) {
        return Err(err(
            "acl_poll_interval_ms",
            "must be between 10 and 3600000",
        ));
    }
    let staleness_ms = s.acl_max_staleness_ms.unwrap_or(30_000);
    if staleness_ms <= poll_ms {
        return Err(err(
            "acl_max_staleness_ms",
            format!(
                "must be larger than acl_poll_interval_ms ({poll_ms}), or the ACL is stale \
                 between two polls; a few poll intervals is usual"
            ),
        ));
    }
    Ok(Some(AclConfig {
        rpc_url: rpc_url.to_string(),
        contract,
        confirmations,
        poll_interval: std::time::Duration::from_millis(poll_ms),
        max_staleness: std::time::Duration::from_millis(staleness_ms),
        checkpoint_path: s
            .acl_checkpoint_path
            .clone()
            .unwrap_or_else(|| data_dir.join("acl-checkpoint.json")),
        verify_miner_keys: s.acl_verify_miner_keys.unwrap_or(false),
    }))
}

/// A configuration error, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("config: {setting}: {message}")]
pub struct ConfigError {
    /// The setting, e.g. `listen` or `--config`.
    pub setting: String,
    /// What is wrong.
    pub message: String,
}

fn err(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.into(),
        message: message.into(),
    }
}

impl Settings {
    /// Fills unset values from `file`.
    fn or(self, file: Settings) -> Settings {
        macro_rules! pick { ($($f:ident),*) => { Settings { $($f: self.$f.or(file.$f)),* } } }
        pick!(
            listen,
            data_dir,
            database_url,
            blob_store,
            keyring_path,
            keyring_file,
            tls_cert,
            tls_key,
            log_format,
            chain_id,
            acl_contract,
            max_body_bytes,
            max_blob_bytes,
            request_timeout_ms,
            completion_timeout_ms,
            lease_ttl_ms,
            max_attempts,
            task_deadline_ms,
            miner_token_ttl_secs,
            static_allowed_miners,
            pinned_models,
            shutdown_grace_ms,
            acl_rpc_url,
            acl_confirmations,
            acl_poll_interval_ms,
            acl_max_staleness_ms,
            acl_checkpoint_path,
            acl_verify_miner_keys,
            retention_prompt_on_delivery,
            retention_prompt_ttl_secs,
            retention_result_ttl_secs,
            retention_result_on_fetch,
            retention_sweep_interval_ms,
            orphan_sweep_interval_secs,
            orphan_grace_secs
        )
    }
}

impl Config {
    /// Resolves flags/environment (already parsed into `cli`) and the optional TOML file.
    pub fn resolve(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
                let shown = path.display();
                let de = toml::Deserializer::parse(&text)
                    .map_err(|e| err("--config", format!("{shown}: {}", e.message())))?;
                // The path of the key at fault, which a bad value's message alone does not name.
                serde_path_to_error::deserialize::<_, Settings>(de).map_err(|e| {
                    let key = e.path().to_string();
                    let message = e.inner().message().to_string();
                    match key.as_str() {
                        "." | "" => err("--config", format!("{shown}: {message}")),
                        _ => err("--config", format!("{shown}: {key}: {message}")),
                    }
                })?
            }
            None => Settings::default(),
        };
        Self::from_settings(cli.settings.clone().or(file))
    }

    /// Resolves settings, applying defaults and validating.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let data_dir = s
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("veil-data"));
        let contract = match s.acl_contract.as_deref() {
            None | Some("") => alloy_primitives::Address::ZERO,
            Some(a) => veil_api::wire::parse_address(a).map_err(|e| err("acl_contract", e))?,
        };
        let acl = acl_config(&s, contract, &data_dir)?;
        let database_url = s
            .database_url
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("veil.db").display()));
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(err(
                "database_url",
                "must start with sqlite:// or postgres://",
            ));
        }
        let blob_store = s
            .blob_store
            .unwrap_or_else(|| data_dir.join("blobs").display().to_string());
        let keyring_path = s
            .keyring_path
            .unwrap_or_else(|| data_dir.join("keyring.json"));
        let tls = match (s.tls_cert, s.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(err("tls_cert", "tls_cert and tls_key go together")),
        };
        let miner_token_ttl_secs = s.miner_token_ttl_secs.unwrap_or(3600);
        if miner_token_ttl_secs == 0 || miner_token_ttl_secs > 3600 {
            return Err(err(
                "miner_token_ttl_secs",
                "must be between 1 and 3600 (protocol §6: one hour at most)",
            ));
        }
        let lease_ttl_ms = s.lease_ttl_ms.unwrap_or(30_000);
        if lease_ttl_ms < 100 {
            return Err(err("lease_ttl_ms", "must be at least 100"));
        }
        let max_attempts = s.max_attempts.unwrap_or(3);
        if max_attempts == 0 {
            return Err(err("max_attempts", "must be at least 1"));
        }
        let mut static_allowed_miners = Vec::new();
        for m in s.static_allowed_miners.unwrap_or_default() {
            let m = m.trim();
            if m.is_empty() {
                continue;
            }
            let a = veil_api::wire::parse_address(m)
                .map_err(|e| err("static_allowed_miners", format!("{m}: {e}")))?;
            static_allowed_miners.push(a.to_checksum(None));
        }
        let mut pinned_models = Vec::new();
        for p in s.pinned_models.unwrap_or_default() {
            let (name, hash) = p
                .split_once('=')
                .ok_or_else(|| err("pinned_models", format!("{p}: expected name=sha256hex")))?;
            hash.parse::<veil_api::wire::Hex32>()
                .map_err(|e| err("pinned_models", format!("{name}: {e}")))?;
            pinned_models.push((name.to_string(), hash.to_string()));
        }
        let ttl = |field: &str, v: Option<u64>| -> Result<Option<u64>, ConfigError> {
            match v.unwrap_or(86_400) {
                0 => Ok(None),
                t if t > crate::store::MAX_RETENTION_SECS => Err(err(
                    field,
                    format!("must be at most {}", crate::store::MAX_RETENTION_SECS),
                )),
                t => Ok(Some(t)),
            }
        };
        let default_retention = crate::store::RetentionPolicy {
            delete_prompt_on_delivery: s.retention_prompt_on_delivery.unwrap_or(true),
            prompt_ttl_secs: ttl("retention_prompt_ttl_secs", s.retention_prompt_ttl_secs)?,
            result_ttl_secs: ttl("retention_result_ttl_secs", s.retention_result_ttl_secs)?,
            delete_result_on_fetch: s.retention_result_on_fetch.unwrap_or(false),
        };
        let retention_sweep_interval_ms = s.retention_sweep_interval_ms.unwrap_or(5000);
        if retention_sweep_interval_ms < 100 {
            return Err(err("retention_sweep_interval_ms", "must be at least 100"));
        }
        let orphan_grace_secs = s.orphan_grace_secs.unwrap_or(DEFAULT_ORPHAN_GRACE_SECS);
        if orphan_grace_secs < MIN_ORPHAN_GRACE_SECS {
            return Err(err(
                "orphan_grace_secs",
                format!("must be at least {MIN_ORPHAN_GRACE_SECS}"),
            ));
        }
        Ok(Config {
            listen: s
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir,
            database_url,
            blob_store,
            keyring_path,
            keyring_file: s.keyring_file.filter(|p| !p.as_os_str().is_empty()),
            tls,
            log_format: s.log_format.unwrap_or_default(),
            domain: veil_api::Domain {
                chain_id: s.chain_id.unwrap_or(31337),
                verifying_contract: contract,
            },
            max_body_bytes: s.max_body_bytes.unwrap_or(4 << 20),
            max_blob_bytes: s.max_blob_bytes.unwrap_or(64 << 20),
            request_timeout_ms: s.request_timeout_ms.unwrap_or(30_000),
            completion_timeout_ms: s.completion_timeout_ms.unwrap_or(120_000),
            lease_ttl_ms,
            max_attempts,
            task_deadline_ms: s.task_deadline_ms.unwrap_or(600_000),
            miner_token_ttl_secs,
            static_allowed_miners,
            pinned_models,
            shutdown_grace_ms: s.shutdown_grace_ms.unwrap_or(10_000),
            acl,
            default_retention,
            retention_sweep_interval_ms,
            orphan_sweep_interval_secs: s.orphan_sweep_interval_secs.unwrap_or(3600),
            orphan_grace_secs,
        })
    }

    /// A configuration for tests and embedding: everything under `data_dir`, defaults otherwise.
    pub fn embedded(data_dir: &Path) -> Config {
        Self::from_settings(Settings {
            data_dir: Some(data_dir.to_path_buf()),
            ..Settings::default()
        })
        .expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("router.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nlease_ttl_ms = 5000\nchain_id = 1\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "veil-router",
            "--config",
            file.to_str().unwrap(),
            "--lease-ttl-ms",
            "7000",
        ])
        .unwrap();
        let c = Config::resolve(&cli).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.lease_ttl_ms, 7000, "flag wins over file");
        assert_eq!(c.domain.chain_id, 1);
        assert!(c.database_url.starts_with("sqlite://"));
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("router.toml");
        std::fs::write(&file, "listn = \"x\"\n").unwrap();
        let cli = Cli::try_parse_from(["veil-router", "--config", file.to_str().unwrap()]).unwrap();
        let e = Config::resolve(&cli).unwrap_err();
        assert_eq!(e.setting, "--config");
        assert!(e.message.contains("listn"), "{e}");
        // A value of the wrong type names its key too.
        std::fs::write(&file, "lease_ttl_ms = \"soon\"\n").unwrap();
        let e = Config::resolve(&cli).unwrap_err();
        assert_eq!(e.setting, "--config");
        assert!(e.message.contains("lease_ttl_ms: "), "{e}");

        let e = Config::from_settings(Settings {
            miner_token_ttl_secs: Some(7200),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "miner_token_ttl_secs");
        let e = Config::from_settings(Settings {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "database_url");
        let e = Config::from_settings(Settings {
            static_allowed_miners: Some(vec!["0x12".into()]),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "static_allowed_miners");
        let e = Config::from_settings(Settings {
            orphan_grace_secs: Some(MIN_ORPHAN_GRACE_SECS - 1),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "orphan_grace_secs");
        assert!(e.message.contains("at least 3600"), "{e}");
    }

    const CONTRACT: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";

    fn acl(f: impl FnOnce(&mut Settings)) -> Result<Config, ConfigError> {
        let mut s = Settings {
            data_dir: Some(PathBuf::from("/srv/veil")),
            acl_contract: Some(CONTRACT.into()),
            acl_rpc_url: Some("https://rpc.example.org/v2/SECRETKEY?x=1".into()),
            ..Default::default()
        };
        f(&mut s);
        Config::from_settings(s)
    }

    #[test]
    fn acl_settings_resolve_with_defaults() {
        assert_eq!(
            Config::from_settings(Settings::default()).unwrap().acl,
            None
        );
        let c = acl(|_| {}).unwrap().acl.unwrap();
        assert_eq!(c.contract.to_checksum(None), CONTRACT);
        assert_eq!(c.confirmations, 2);
        assert_eq!(c.poll_interval.as_millis(), 2000);
        assert_eq!(c.max_staleness.as_millis(), 30_000);
        assert_eq!(
            c.checkpoint_path,
            PathBuf::from("/srv/veil/acl-checkpoint.json")
        );
        assert!(!c.verify_miner_keys);
        assert_eq!(c.redacted_url(), "https://rpc.example.org");
        assert!(
            !format!("{c:?}").contains("SECRETKEY"),
            "print-config shows no API key"
        );
        assert_eq!(
            c.redact("error sending request for url (https://rpc.example.org/v2/SECRETKEY?x=1)"),
            "error sending request for url (https://rpc.example.org)"
        );

        let cli = Cli::try_parse_from([
            "veil-router",
            "--acl-contract",
            CONTRACT,
            "--acl-rpc-url",
            "ws://127.0.0.1:8545",
            "--acl-confirmations",
            "0",
            "--acl-verify-miner-keys",
        ])
        .unwrap();
        let c = Config::resolve(&cli).unwrap().acl.unwrap();
        assert_eq!(c.confirmations, 0);
        assert!(c.verify_miner_keys);
    }

    #[test]
    fn bad_acl_settings_name_the_setting() {
        let setting = |f: fn(&mut Settings)| acl(f).unwrap_err().setting;
        assert_eq!(setting(|s| s.acl_contract = None), "acl_contract");
        assert_eq!(
            setting(|s| s.acl_rpc_url = Some("ftp://rpc.example.org".into())),
            "acl_rpc_url"
        );
        assert_eq!(
            setting(|s| s.acl_max_staleness_ms = Some(1_000)),
            "acl_max_staleness_ms",
            "not above the 2 s poll interval"
        );
        assert_eq!(
            setting(|s| s.acl_poll_interval_ms = Some(0)),
            "acl_poll_interval_ms"
        );
        assert_eq!(
            setting(|s| s.acl_confirmations = Some(100_000)),
            "acl_confirmations"
        );
        assert_eq!(
            setting(|s| {
                s.acl_rpc_url = None;
                s.acl_verify_miner_keys = Some(true);
            }),
            "acl_verify_miner_keys",
            "an ACL setting without the RPC URL is refused"
        );
        // The API key in the URL's path never reaches an error message.
        let e =
            acl(|s| s.acl_rpc_url = Some("gopher://rpc.example.org/SECRETKEY".into())).unwrap_err();
        assert!(!e.to_string().contains("SECRETKEY"), "{e}");
    }

    #[test]
    fn keyring_secret_file_and_keys_commands_parse() {
        let cli = Cli::try_parse_from([
            "veil-router",
            "--keyring-secret-file",
            "/run/secrets/keyring",
            "keys",
            "destroy",
            "--version",
            "3",
            "--yes",
        ])
        .unwrap();
        let c = Config::resolve(&cli).unwrap();
        assert_eq!(c.keyring_file, Some(PathBuf::from("/run/secrets/keyring")));
        match cli.command {
            Some(Command::Keys {
                command:
                    KeysCommand::Destroy {
                        version: 3,
                        yes: true,
                    },
            }) => {}
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["veil-router", "keys", "rewrap"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Keys {
                command: KeysCommand::Rewrap { batch: 100 }
            })
        ));
        assert!(Cli::try_parse_from(["veil-router", "keys", "retire"]).is_err());
        // The TOML key, and an empty value meaning unset.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("router.toml");
        std::fs::write(&file, "keyring_file = \"/srv/keyring\"\n").unwrap();
        let cli = Cli::try_parse_from(["veil-router", "--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(
            Config::resolve(&cli).unwrap().keyring_file,
            Some(PathBuf::from("/srv/keyring"))
        );
        let c = Config::from_settings(Settings {
            keyring_file: Some(PathBuf::new()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.keyring_file, None);
    }
}
