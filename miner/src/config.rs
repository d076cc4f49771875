//! `veil-miner` configuration: command-line flags, each with an environment fallback, and an
//! optional TOML file (`--config`, `VEIL_MINER_CONFIG`). Precedence: flag > environment > file >
//! default. Secrets never live here: the keystore password and the dev key are read from the
//! environment (or a prompt) when the miner starts, so `print-config` has nothing to hide.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Environment variable holding the keystore's password (asked for on a terminal otherwise).
pub const KEYSTORE_PASSWORD_ENV: &str = "VEIL_MINER_KEYSTORE_PASSWORD";
/// Chain ids of local dev chains (anvil and hardhat use 31337, ganache 1337).
pub const DEV_CHAIN_IDS: [u64; 2] = [31337, 1337];

/// `veil-miner` command line.
#[derive(Debug, Clone, Parser, Default)]
#[command(
    name = "veil-miner",
    version,
    about = "Veil miner: leases sealed tasks from a router, runs them on a local engine and seals the results"
)]
pub struct Cli {
    /// TOML configuration file; any key may also be given as a flag or environment variable.
    #[arg(long, env = "VEIL_MINER_CONFIG")]
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
    /// Run the miner (the default).
    Serve,
    /// Print the effective configuration and exit (it holds no secret: passwords and keys are
    /// read from the environment or a prompt at start).
    PrintConfig,
    /// Print the SHA-256 of a model (a file, or a directory: see docs/miner.md), the value to pin
    /// in the router with `pinned_models NAME=HASH`.
    HashModel {
        /// The model file or directory.
        path: PathBuf,
    },
    /// Write a random-weight model that mistral.rs loads (Llama architecture, byte-level
    /// tokenizer, chat template), for tests, demos and benchmarks without downloads. Its output
    /// is gibberish by design.
    TinyModel {
        /// Directory to write the model into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Shape: `tiny` (about 0.1 M parameters) or `small` (GPT-2-small shape, about 113 M).
        #[arg(long, value_enum, default_value = "tiny")]
        preset: crate::tiny::Preset,
        /// Seed of the weights: the same preset and seed give the same files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `safetensors` (a Hugging Face directory) or `gguf` (one file with the tokenizer in
        /// its metadata).
        #[arg(long, value_enum, default_value = "safetensors")]
        format: crate::tiny::Format,
    },
    /// Print the X25519 public key of the identity file (creating the file if it does not exist
    /// yet), e.g. to register the miner in the on-chain ACL.
    ShowIdentity,
}

/// Settings that can come from flags, the environment or the TOML file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Settings {
    /// Router base URL, e.g. http://127.0.0.1:8080. Repeat (or comma-separate) for failover: the
    /// first that answers at start is used; when it cannot be reached, the next one is tried.
    #[arg(
        long = "router-url",
        env = "VEIL_MINER_ROUTER_URL",
        value_delimiter = ','
    )]
    pub router_url: Option<Vec<String>>,
    /// Directory for the identity file [default: ./veil-miner-data].
    #[arg(long, env = "VEIL_MINER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// X25519 identity file: task keys are wrapped to it. Created on first start with mode 0600;
    /// refused when group or others can read it [default: identity.key in the data dir].
    #[arg(long, env = "VEIL_MINER_IDENTITY_FILE")]
    pub identity_file: Option<PathBuf>,
    /// Wallet: an encrypted JSON keystore. Its password comes from VEIL_MINER_KEYSTORE_PASSWORD,
    /// or is asked for on the terminal.
    #[arg(long, env = "VEIL_MINER_KEYSTORE")]
    pub keystore: Option<PathBuf>,
    /// Wallet for local dev chains only (31337, 1337): the NAME of an environment variable that
    /// holds a raw hex private key. Never use it with a real wallet; use --keystore.
    #[arg(long, env = "VEIL_MINER_DEV_KEY_ENV", value_name = "NAME")]
    pub dev_key_env: Option<String>,
    /// Chain id the router's EIP-712 domain must have; a router on another chain is refused
    /// [default: any chain with --keystore, 31337 with --dev-key-env].
    #[arg(long, env = "VEIL_MINER_CHAIN_ID")]
    pub chain_id: Option<u64>,
    /// A model to serve: NAME=PATH, PATH a model file or directory (hashed at start). Repeat (or
    /// comma-separate) for several. A bare NAME (no files) is accepted by the instant engine only.
    #[arg(
        long = "model",
        env = "VEIL_MINER_MODELS",
        value_delimiter = ',',
        value_name = "NAME=PATH"
    )]
    pub models: Option<Vec<String>>,
    /// Inference engine: `mistralrs` runs the models with mistral.rs [default: mistralrs];
    /// `instant` is the deterministic protocol test engine (no model: it answers with words
    /// derived from a hash of the prompt), used for load tests and local checks.
    #[arg(long, env = "VEIL_MINER_ENGINE")]
    pub engine: Option<EngineKind>,
    /// Device to run the model on: `cpu` or `cuda` (builds with the `cuda` feature) [default: cpu].
    #[arg(long, env = "VEIL_MINER_DEVICE")]
    pub device: Option<String>,
    /// Tasks run at the same time [default: 1].
    #[arg(long, env = "VEIL_MINER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Lease requests in flight at once, never more than `concurrency` [default: 4].
    #[arg(long, env = "VEIL_MINER_LEASE_POLLERS")]
    pub lease_pollers: Option<usize>,
    /// How long one lease long-poll waits, in ms (the router caps it) [default: 20000].
    #[arg(long, env = "VEIL_MINER_LEASE_WAIT_MS")]
    pub lease_wait_ms: Option<u64>,
    /// Graceful stop (SIGINT, SIGTERM): how long in-flight tasks may run on before their leases
    /// are released, in ms [default: 30000].
    #[arg(long, env = "VEIL_MINER_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Log format: `pretty` or `json` [default: pretty].
    #[arg(long, env = "VEIL_MINER_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

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

/// The inference engines of this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// The deterministic protocol test engine ([`crate::InstantEngine`]).
    Instant,
    /// mistral.rs (builds with the `mistralrs` feature, on by default).
    Mistralrs,
}

/// Where the wallet comes from. Holds no secret, only where to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalletSource {
    /// An encrypted JSON keystore file.
    Keystore(PathBuf),
    /// The name of an environment variable holding a raw private key (local dev chains only).
    DevKeyEnv(String),
}

/// A model to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The name callers ask for.
    pub name: String,
    /// Its file or directory; `None` for a bare name (instant engine only).
    pub path: Option<PathBuf>,
}

/// Fully resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Router base URLs, in failover order.
    pub router_urls: Vec<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// X25519 identity file.
    pub identity_file: PathBuf,
    /// Wallet source.
    pub wallet: WalletSource,
    /// Chain the router must be on, if any.
    pub chain_id: Option<u64>,
    /// Models to serve.
    pub models: Vec<ModelSpec>,
    /// Engine.
    pub engine: EngineKind,
    /// Device.
    pub device: Device,
    /// Concurrent tasks.
    pub concurrency: usize,
    /// Concurrent lease requests.
    pub lease_pollers: usize,
    /// One lease long-poll.
    pub lease_wait: Duration,
    /// Graceful stop.
    pub shutdown_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
}

/// Devices of this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU.
    Cpu,
    /// The first NVIDIA GPU (builds with the `cuda` feature).
    Cuda,
}

/// A configuration error, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("config: {setting}: {message}")]
pub struct ConfigError {
    /// The setting, e.g. `router_url` or `--config`.
    pub setting: String,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn err(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.into(),
        message: message.into(),
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineKind::Instant => f.write_str("instant"),
            EngineKind::Mistralrs => f.write_str("mistralrs"),
        }
    }
}

impl Settings {
    /// Fills unset values from `file`.
    fn or(self, file: Settings) -> Settings {
        macro_rules! pick { ($($f:ident),*) => { Settings { $($f: self.$f.or(file.$f)),* } } }
        pick!(
            router_url,
            data_dir,
            identity_file,
            keystore,
            dev_key_env,
            chain_id,
            models,
            engine,
            device,
            concurrency,
            lease_pollers,
            lease_wait_ms,
            shutdown_grace_ms,
            log_format
        )
    }

    /// Flags and environment (already parsed into `cli`) over the optional TOML file.
    pub fn resolve(cli: &Cli) -> Result<Settings, ConfigError> {
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
        Ok(cli.settings.clone().or(file))
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("veil-miner-data"))
    }

    /// The identity file.
    pub fn identity_file(&self) -> PathBuf {
        self.identity_file
            .clone()
            .unwrap_or_else(|| self.data_dir().join("identity.key"))
    }
}

impl Config {
    /// Resolves flags/environment (already parsed into `cli`) and the optional TOML file.
    pub fn resolve(cli: &Cli) -> Result<Config, ConfigError> {
        Self::from_settings(Settings::resolve(cli)?)
    }

    /// Resolves settings, applying defaults and validating.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let mut router_urls = Vec::new();
        for u in s.router_url.clone().unwrap_or_default() {
            let u = u.trim().trim_end_matches('/');
            if u.is_empty() {
                continue;
            }
            check_url(u)?;
            if !router_urls.iter().any(|x| x == u) {
                router_urls.push(u.to_string());
            }
        }
        if router_urls.is_empty() {
            return Err(err(
                "router_url",
                "at least one router URL is required (--router-url http://HOST:PORT)",
            ));
        }

        let engine = match s.engine {
            Some(EngineKind::Mistralrs) | None if cfg!(feature = "mistralrs") => {
                EngineKind::Mistralrs
            }
            Some(EngineKind::Mistralrs) => {
                return Err(err(
                    "engine",
                    "this build has no mistral.rs (built without the `mistralrs` feature)",
                ));
            }
            None => {
                return Err(err(
                    "engine",
                    "required: this build has only `instant` (built without the `mistralrs` feature)",
                ));
            }
            Some(EngineKind::Instant) => EngineKind::Instant,
        };
        let device = match s.device.as_deref().map(str::trim) {
            None | Some("cpu") => Device::Cpu,
            Some("cuda") if cfg!(feature = "cuda") && engine == EngineKind::Mistralrs => {
                Device::Cuda
            }
            Some("cuda") if engine == EngineKind::Instant => {
                return Err(err("device", "the instant engine runs on `cpu` only"));
            }
            Some("cuda") => {
                return Err(err(
                    "device",
                    "this build has no CUDA support: build with `--features cuda`",
                ));
            }
            Some(other) => {
                return Err(err(
                    "device",
                    format!("{other:?}: expected `cpu` or `cuda`"),
                ));
            }
        };

        let dev_key_env = s
            .dev_key_env
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty());
        let wallet = match (&s.keystore, dev_key_env) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "keystore",
                    "both keystore and dev_key_env are set; use one wallet",
                ));
            }
            (Some(path), None) => WalletSource::Keystore(path.clone()),
            (None, Some(name)) => {
                if name.contains('=') || name.contains('\0') {
                    return Err(err(
                        "dev_key_env",
                        "expected the NAME of an environment variable, not a key",
                    ));
                }
                WalletSource::DevKeyEnv(name.to_string())
            }
            (None, None) => {
                return Err(err(
                    "keystore",
                    "a wallet is required: --keystore FILE, or --dev-key-env NAME on a local dev chain",
                ));
            }
        };
        let chain_id = match (&wallet, s.chain_id) {
            (WalletSource::DevKeyEnv(_), None) => Some(DEV_CHAIN_IDS[0]),
            (WalletSource::DevKeyEnv(_), Some(c)) if !DEV_CHAIN_IDS.contains(&c) => {
                return Err(err(
                    "dev_key_env",
                    format!(
                        "a raw private key is for local dev chains (31337, 1337) only, and \
                         chain_id is {c}; use --keystore"
                    ),
                ));
            }
            (_, c) => c,
        };

        let mut models: Vec<ModelSpec> = Vec::new();
        for m in s.models.clone().unwrap_or_default() {
            let m = m.trim();
            if m.is_empty() {
                continue;
            }
            let (name, path) = match m.split_once('=') {
                Some((n, p)) => (n.trim(), Some(p.trim())),
                None => (m, None),
            };
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(err(
                    "models",
                    format!("{m:?}: model names are 1 to 128 printable characters"),
                ));
            }
            let path = match path {
                Some("") => return Err(err("models", format!("{name}: empty path"))),
                Some(p) => Some(PathBuf::from(p)),
                None if engine == EngineKind::Instant => None,
                None => return Err(err("models", format!("{name}: expected NAME=PATH"))),
            };
            if models.iter().any(|x| x.name == name) {
                return Err(err("models", format!("{name}: listed twice")));
            }
            models.push(ModelSpec {
                name: name.to_string(),
                path,
            });
        }
        if models.is_empty() {
            return Err(err(
                "models",
                "at least one model is required (--model NAME=PATH)",
            ));
        }
        if models.len() > 64 {
            return Err(err("models", "a miner serves at most 64 models"));
        }

        let concurrency = s.concurrency.unwrap_or(1);
        if !(1..=4096).contains(&concurrency) {
            return Err(err("concurrency", "must be between 1 and 4096"));
        }
        let lease_pollers = s.lease_pollers.unwrap_or(4);
        if !(1..=256).contains(&lease_pollers) {
            return Err(err("lease_pollers", "must be between 1 and 256"));
        }
        let lease_wait_ms = s.lease_wait_ms.unwrap_or(20_000);
        if !(100..=600_000).contains(&lease_wait_ms) {
            return Err(err("lease_wait_ms", "must be between 100 and 600000"));
        }
        let shutdown_grace_ms = s.shutdown_grace_ms.unwrap_or(30_000);
        if shutdown_grace_ms > 3_600_000 {
            return Err(err("shutdown_grace_ms", "must be at most 3600000"));
        }
        Ok(Config {
            router_urls,
            data_dir: s.data_dir(),
            identity_file: s.identity_file(),
            wallet,
            chain_id,
            models,
            engine,
            device,
            concurrency,
            lease_pollers,
            lease_wait: Duration::from_millis(lease_wait_ms),
            shutdown_grace: Duration::from_millis(shutdown_grace_ms),
            log_format: s.log_format.unwrap_or_default(),
        })
    }
}

/// An `http(s)://host[:port][/path]` URL without credentials, query or fragment.
fn check_url(u: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| err("router_url", format!("{}: {why}", shown(u)));
    let Some((scheme, rest)) = u.split_once("://") else {
        return Err(bad("must start with http:// or https://"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(bad("must start with http:// or https://"));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains('@') || rest.contains(['?', '#']) {
        return Err(bad("credentials, query or fragment are not allowed"));
    }
    Ok(())
}

/// `scheme://host[:port]` of a URL, for messages (never credentials or paths).
fn shown(u: &str) -> String {
    match u.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            format!("{scheme}://{}", authority.rsplit('@').next().unwrap_or(""))
        }
        None => "<not a URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Settings {
        Settings {
            router_url: Some(vec!["http://127.0.0.1:8080/".into()]),
            dev_key_env: Some("DEV_KEY".into()),
            engine: Some(EngineKind::Instant),
            models: Some(vec!["tiny=/srv/models/tiny.gguf".into()]),
            ..Settings::default()
        }
    }

    fn setting(f: impl FnOnce(&mut Settings)) -> String {
        let mut s = base();
        f(&mut s);
        Config::from_settings(s).unwrap_err().setting
    }

    #[test]
    fn defaults_fill_the_rest() {
        let c = Config::from_settings(base()).unwrap();
        assert_eq!(c.router_urls, ["http://127.0.0.1:8080"]);
        assert_eq!(
            c.identity_file,
            PathBuf::from("veil-miner-data/identity.key")
        );
        assert_eq!(c.chain_id, Some(31337), "a dev key implies a dev chain");
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.lease_pollers, 4);
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.device, Device::Cpu);
        assert_eq!(
            c.models,
            [ModelSpec {
                name: "tiny".into(),
                path: Some("/srv/models/tiny.gguf".into())
            }]
        );
    }

    #[test]
    fn flags_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("miner.toml");
        std::fs::write(
            &file,
            "router_url = [\"http://a:1\", \"http://b:2\"]\nconcurrency = 3\nengine = \"instant\"\n\
             models = [\"m\"]\nkeystore = \"/k.json\"\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "veil-miner",
            "--config",
            file.to_str().unwrap(),
            "--concurrency",
            "5",
        ])
        .unwrap();
        let c = Config::resolve(&cli).unwrap();
        assert_eq!(c.router_urls, ["http://a:1", "http://b:2"]);
        assert_eq!(c.concurrency, 5, "flag wins over file");
        assert_eq!(c.wallet, WalletSource::Keystore("/k.json".into()));
        assert_eq!(c.chain_id, None);
        assert_eq!(
            c.models[0].path, None,
            "a bare name with the instant engine"
        );
    }

    #[test]
    fn bad_settings_name_the_setting() {
        assert_eq!(setting(|s| s.router_url = None), "router_url");
        assert_eq!(
            setting(|s| s.router_url = Some(vec!["ftp://x".into()])),
            "router_url"
        );
        if !cfg!(feature = "mistralrs") {
            assert_eq!(setting(|s| s.engine = None), "engine");
        }
        assert_eq!(setting(|s| s.device = Some("cuda".into())), "device");
        assert_eq!(setting(|s| s.dev_key_env = None), "keystore");
        assert_eq!(
            setting(|s| s.keystore = Some("/k.json".into())),
            "keystore",
            "two wallets"
        );
        assert_eq!(setting(|s| s.chain_id = Some(1)), "dev_key_env");
        assert_eq!(setting(|s| s.models = None), "models");
        assert_eq!(
            setting(|s| s.models = Some(vec!["a=/x".into(), "a=/y".into()])),
            "models"
        );
        assert_eq!(setting(|s| s.models = Some(vec!["=/x".into()])), "models");
        assert_eq!(setting(|s| s.concurrency = Some(0)), "concurrency");
        assert_eq!(setting(|s| s.lease_pollers = Some(0)), "lease_pollers");
        assert_eq!(setting(|s| s.lease_wait_ms = Some(1)), "lease_wait_ms");
        let e = Config::from_settings(Settings {
            router_url: Some(vec!["https://user:SECRET@host/".into()]),
            ..base()
        })
        .unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
    }
}
