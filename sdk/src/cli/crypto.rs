//! `veil crypto …`: protocol v1 key derivation, blob envelope and key wrapping, one step per
//! command, for checking other implementations against this one.

use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use uuid::Uuid;
use veil_keys::{
    BlobParams, DEFAULT_CHUNK_EXP, KeyId, MAX_CHUNK_EXP, MIN_CHUNK_EXP, Purpose, SecretKey, Seed,
    X25519Public, X25519Secret,
};
use zeroize::Zeroizing;

use super::input::{
    SecretText, decode_hex, parse_session_id, parse_task_id, read_to_end_zeroizing, secret_from,
};
use super::{CliError, EXIT_STATUS_HELP, Output};

#[derive(Subcommand)]
pub(crate) enum CryptoCommand {
    /// Derive K_session from a keyring seed, or K_task with --task (protocol section 2)
    #[command(
        long_about = "Derive a session key, or a task key, from a 32-byte keyring seed.\n\n\
            Prints K_session = HKDF-SHA256(salt \"veil/kdf/v1\", ikm seed, info \
            lp(\"veil/v1/session\") || lp(session_id), 32 bytes). With --task, prints \
            K_task = HKDF-SHA256(salt \"veil/kdf/v1\", ikm K_session, info lp(\"veil/v1/task\") || \
            lp(task_id), 32 bytes) instead. lp(x) is a 2-byte big-endian length followed by x; \
            ids enter as their 16 raw bytes. Output: 64 lowercase hex characters and a newline.",
        after_help = EXIT_STATUS_HELP
    )]
    Derive(DeriveArgs),

    /// Seal stdin into a blob envelope, written to stdout (protocol section 3)
    #[command(
        long_about = "Seal the plaintext read from stdin into one blob (envelope format 1) and write \
            the blob, as binary, to stdout.\n\n\
            The key is the K_session or K_task the blob is sealed under; --scope says which, and \
            must agree with --task (task scope needs it, session scope refuses it). --key-version, \
            --session and --task only fill the header (and bind it, as AEAD associated data); they \
            are not checked against the key. A fresh random salt is drawn for every blob, so two \
            seals of the same input differ; open them with `veil crypto open` to compare. The \
            plaintext is cut into full chunks of 2^E bytes and a shorter (possibly empty) last \
            chunk. Nothing is written unless sealing succeeds.",
        after_help = EXIT_STATUS_HELP
    )]
    Seal(SealArgs),

    /// Open a blob from stdin and write its plaintext to stdout (protocol section 3)
    #[command(
        long_about = "Open the blob read from stdin with the given K_session or K_task and write \
            its plaintext to stdout.\n\n\
            The whole blob is checked before a single byte is written: header fields, the key \
            commitment (a mismatch is reported as a wrong key), every frame length, every chunk's \
            AES-256-GCM tag with the nonce built from its index and last flag, and that nothing \
            follows the last frame. Any failure prints one line naming the reason (with its \
            stable code in brackets, e.g. [wrong_key]) and no plaintext at all.",
        after_help = EXIT_STATUS_HELP
    )]
    Open(OpenArgs),

    /// Re-seal a blob from stdin under a new key version, written to stdout (key rotation)
    #[command(
        long_about = "Open the blob read from stdin with its current key (--key-hex or --key-file) \
            and seal its plaintext again with the key of the new version (--new-key-hex or \
            --new-key-file) as version --new-key-version, keeping the blob's session, task, \
            purpose and chunk size. This is how an owner moves blobs it sealed itself to a new \
            key version after the router rotates its keyring: derive the old and new K_task \
            (or K_session) from the session keys of both versions, rewrap, upload the new blob, \
            then delete the old one. The old blob is checked whole before anything is written; \
            the plaintext never leaves memory.",
        after_help = EXIT_STATUS_HELP
    )]
    Rewrap(RewrapArgs),

    /// Wrap a key to an X25519 recipient; prints 80 bytes as hex (protocol section 4)
    #[command(
        long_about = "Wrap a 32-byte key (K_session or K_task) to a recipient's X25519 public key.\n\n\
            The context ctx = scope byte || BE32(key version) || session id || task id (zero for \
            session scope) is built from --scope, --key-version, --session and --task, and the \
            recipient must use the same values to unwrap. A fresh ephemeral key pair is drawn for \
            every wrap, so two wraps of the same key differ. Output: the 80-byte wrapped key \
            (ephemeral public key || AES-256-GCM ciphertext and tag) as 160 lowercase hex \
            characters and a newline.",
        after_help = EXIT_STATUS_HELP
    )]
    Wrap(WrapArgs),

    /// Unwrap an 80-byte wrapped key with an X25519 secret; prints the key as hex (protocol section 4)
    #[command(
        long_about = "Unwrap an 80-byte wrapped key with the recipient's X25519 secret key and \
            print the 32-byte key as 64 lowercase hex characters and a newline.\n\n\
            --scope, --key-version, --session and --task must be the values the key was wrapped \
            with: they form the context that is both mixed into the wrapping key and \
            authenticated, so any difference makes the unwrap fail (exit status 1).",
        after_help = EXIT_STATUS_HELP
    )]
    Unwrap(UnwrapArgs),

    /// Generate an X25519 key pair; prints JSON {"secret","public"}
    #[command(
        name = "x25519-keygen",
        long_about = "Generate a fresh X25519 key pair, for use as a key-wrap recipient, and print \
            it as one line of JSON: {\"secret\":\"<64 hex>\",\"public\":\"<64 hex>\"}. The secret \
            is printed in the clear: redirect it to a file with restrictive permissions.",
        after_help = EXIT_STATUS_HELP
    )]
    X25519Keygen,
}

/// Scope of a key: which key a blob is sealed under, or which key a wrap carries.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ScopeArg {
    /// The session key K_session (scope byte 0x01); takes no --task
    Session,
    /// A task key K_task (scope byte 0x02); requires --task
    Task,
}

/// What a blob holds (the purpose byte of the header).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PurposeArg {
    /// A prompt (0x01)
    Prompt,
    /// An inference result (0x02)
    Result,
    /// An attachment (0x03)
    Attachment,
}

impl From<PurposeArg> for Purpose {
    fn from(p: PurposeArg) -> Self {
        match p {
            PurposeArg::Prompt => Purpose::Prompt,
            PurposeArg::Result => Purpose::Result,
            PurposeArg::Attachment => Purpose::Attachment,
        }
    }
}

/// The 32-byte key a blob is sealed under or a wrap carries.
#[derive(Args)]
#[group(id = "key", required = true, multiple = false)]
pub(crate) struct KeySource {
    /// The key (K_session or K_task) as 64 hex characters
    #[arg(long = "key-hex", value_name = "HEX")]
    key_hex: Option<SecretText>,
    /// A file holding the key as 64 hex characters (surrounding whitespace ignored); keeps the key out of shell history
    #[arg(long = "key-file", value_name = "PATH")]
    key_file: Option<PathBuf>,
}

impl KeySource {
    fn key(&self) -> Result<SecretKey, CliError> {
        let bytes = secret_from::<32>(
            "--key-hex",
            self.key_hex.as_ref(),
            "--key-file",
            self.key_file.as_deref(),
        )?;
        Ok(SecretKey::from_bytes(*bytes))
    }
}

/// The keyring seed to derive from.
#[derive(Args)]
#[group(id = "seed", required = true, multiple = false)]
pub(crate) struct SeedSource {
    /// The 32-byte keyring seed as 64 hex characters
    #[arg(long = "seed-hex", value_name = "HEX")]
    seed_hex: Option<SecretText>,
    /// A file holding the seed as 64 hex characters (surrounding whitespace ignored)
    #[arg(long = "seed-file", value_name = "PATH")]
    seed_file: Option<PathBuf>,
}

/// The recipient's X25519 secret key.
#[derive(Args)]
#[group(id = "secret", required = true, multiple = false)]
pub(crate) struct X25519SecretSource {
    /// The recipient's X25519 secret key as 64 hex characters
    #[arg(long = "secret-hex", value_name = "HEX")]
    secret_hex: Option<SecretText>,
    /// A file holding the X25519 secret key as 64 hex characters (surrounding whitespace ignored)
    #[arg(long = "secret-file", value_name = "PATH")]
    secret_file: Option<PathBuf>,
}

/// Which key a blob or wrap is bound to: scope, key version, session and task.
#[derive(Args)]
pub(crate) struct KeyContext {
    /// Which key: `session` (K_session, no --task) or `task` (K_task, needs --task)
    #[arg(long, value_enum, value_name = "SCOPE")]
    scope: ScopeArg,
    /// The key version (the keyring seed version the key was derived from), 0 to 4294967295
    #[arg(long = "key-version", value_name = "N", allow_negative_numbers = true)]
    key_version: u32,
    /// The session id, a hyphenated UUID
    #[arg(long, value_name = "UUID", value_parser = parse_session_id)]
    session: Uuid,
    /// The task id, a hyphenated UUID other than the nil UUID; only with --scope task
    #[arg(long, value_name = "UUID", value_parser = parse_task_id)]
    task: Option<Uuid>,
}

impl KeyContext {
    fn key_id(&self) -> Result<KeyId, CliError> {
        match (self.scope, self.task) {
            (ScopeArg::Session, None) => Ok(KeyId::session(self.key_version, self.session)),
            (ScopeArg::Task, Some(task)) => Ok(KeyId::task(self.key_version, self.session, task)),
            (ScopeArg::Task, None) => Err(CliError::usage(
                "--task",
                "required with --scope task (a task key is bound to its task id)",
            )),
            (ScopeArg::Session, Some(_)) => Err(CliError::usage(
                "--task",
                "not allowed with --scope session (session scope has no task id); use --scope task",
            )),
        }
    }
}

#[derive(Args)]
pub(crate) struct DeriveArgs {
    #[command(flatten)]
    seed: SeedSource,
    /// The session id, a hyphenated UUID
    #[arg(long, value_name = "UUID", value_parser = parse_session_id)]
    session: Uuid,
    /// Derive this task's K_task (from the session's K_session) instead of K_session
    #[arg(long, value_name = "UUID", value_parser = parse_task_id)]
    task: Option<Uuid>,
}

#[derive(Args)]
pub(crate) struct SealArgs {
    #[command(flatten)]
    key: KeySource,
    #[command(flatten)]
    context: KeyContext,
    /// What the blob holds
    #[arg(long, value_enum, value_name = "PURPOSE")]
    purpose: PurposeArg,
    /// Chunk exponent E: chunks of 2^E bytes of plaintext, E from 10 to 24
    #[arg(
        long = "chunk-exp",
        value_name = "E",
        default_value_t = DEFAULT_CHUNK_EXP,
        value_parser = clap::value_parser!(u8).range(i64::from(MIN_CHUNK_EXP)..=i64::from(MAX_CHUNK_EXP))
    )]
    chunk_exp: u8,
}

#[derive(Args)]
pub(crate) struct OpenArgs {
    #[command(flatten)]
    key: KeySource,
}

/// The key of the new version.
#[derive(Args)]
#[group(id = "new_key", required = true, multiple = false)]
pub(crate) struct NewKeySource {
    /// The new version's key (K_session or K_task) as 64 hex characters
    #[arg(long = "new-key-hex", value_name = "HEX")]
    new_key_hex: Option<SecretText>,
    /// A file holding the new version's key as 64 hex characters (surrounding whitespace ignored)
    #[arg(long = "new-key-file", value_name = "PATH")]
    new_key_file: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct RewrapArgs {
    #[command(flatten)]
    key: KeySource,
    #[command(flatten)]
    new_key: NewKeySource,
    /// The key version the new key derives from, 0 to 4294967295
    #[arg(long = "new-key-version", value_name = "N")]
    new_key_version: u32,
}

#[derive(Args)]
pub(crate) struct WrapArgs {
    /// The recipient's X25519 public key, 64 hex characters
    #[arg(long, value_name = "HEX32")]
    recipient: String,
    #[command(flatten)]
    key: KeySource,
    #[command(flatten)]
    context: KeyContext,
}

#[derive(Args)]
pub(crate) struct UnwrapArgs {
    #[command(flatten)]
    secret: X25519SecretSource,
    /// The wrapped key: 80 bytes as 160 hex characters
    #[arg(long, value_name = "HEX80")]
    wrapped: String,
    #[command(flatten)]
    context: KeyContext,
}

pub(crate) fn execute(cmd: CryptoCommand, stdin: &mut dyn Read) -> Result<Output, CliError> {
    match cmd {
        CryptoCommand::Derive(args) => derive(&args),
        CryptoCommand::Seal(args) => seal(&args, stdin),
        CryptoCommand::Open(args) => open(&args, stdin),
        CryptoCommand::Rewrap(args) => rewrap(&args, stdin),
        CryptoCommand::Wrap(args) => wrap(&args),
        CryptoCommand::Unwrap(args) => unwrap(&args),
        CryptoCommand::X25519Keygen => x25519_keygen(),
    }
}

/// A key as one line of lowercase hex, in a zeroizing buffer.
fn key_line(key: &SecretKey) -> Output {
    let hex = key.to_hex();
    let mut out = Zeroizing::new(Vec::with_capacity(hex.len() + 1));
    out.extend_from_slice(hex.as_bytes());
    out.push(b'\n');
    out
}

fn derive(args: &DeriveArgs) -> Result<Output, CliError> {
    let seed = secret_from::<32>(
        "--seed-hex",
        args.seed.seed_hex.as_ref(),
        "--seed-file",
        args.seed.seed_file.as_deref(),
    )?;
    let k_session = veil_keys::derive_session_key(&Seed::from_bytes(*seed), &args.session);
    let key = match &args.task {
        None => k_session,
        Some(task) => veil_keys::derive_task_key(&k_session, task),
    };
    Ok(key_line(&key))
}

fn seal(args: &SealArgs, stdin: &mut dyn Read) -> Result<Output, CliError> {
    let key_id = args.context.key_id()?;
    let key = args.key.key()?;
    let params = BlobParams::new(key_id, args.purpose.into())
        .with_chunk_exp(args.chunk_exp)
        .map_err(|e| CliError::usage("--chunk-exp", e.to_string()))?;
    let plaintext = read_to_end_zeroizing(stdin)
        .map_err(|e| CliError::failed("stdin", format!("cannot read the plaintext: {e}")))?;
    let blob = veil_keys::seal(&key, &params, &plaintext)
        .map_err(|e| CliError::failed("stdin", format!("cannot seal [{}]: {e}", e.code())))?;
    Ok(Zeroizing::new(blob))
}

fn open(args: &OpenArgs, stdin: &mut dyn Read) -> Result<Output, CliError> {
    let key = args.key.key()?;
    let mut blob = Vec::new();
    stdin
        .read_to_end(&mut blob)
        .map_err(|e| CliError::failed("stdin", format!("cannot read the blob: {e}")))?;
    let opened = veil_keys::open(&key, &blob)
        .map_err(|e| CliError::failed("stdin", format!("blob refused [{}]: {e}", e.code())))?;
    Ok(opened.plaintext.into_zeroizing())
}

fn rewrap(args: &RewrapArgs, stdin: &mut dyn Read) -> Result<Output, CliError> {
    let old_key = args.key.key()?;
    let new_key = SecretKey::from_bytes(*secret_from::<32>(
        "--new-key-hex",
        args.new_key.new_key_hex.as_ref(),
        "--new-key-file",
        args.new_key.new_key_file.as_deref(),
    )?);
    let mut blob = Vec::new();
    stdin
        .read_to_end(&mut blob)
        .map_err(|e| CliError::failed("stdin", format!("cannot read the blob: {e}")))?;
    let (sealed, _) = crate::rewrap::rewrap_blob(&old_key, &new_key, args.new_key_version, &blob)
        .map_err(|e| match e {
        crate::rewrap::RewrapError::SameVersion(_) => {
            CliError::usage("--new-key-version", e.to_string())
        }
        crate::rewrap::RewrapError::Open { .. } => CliError::failed("stdin", e.to_string()),
        crate::rewrap::RewrapError::Seal { .. } => CliError::failed("--new-key-hex", e.to_string()),
    })?;
    Ok(Zeroizing::new(sealed))
}

fn wrap(args: &WrapArgs) -> Result<Output, CliError> {
    let recipient = X25519Public::from_bytes(*decode_hex::<32>("--recipient", &args.recipient)?);
    let key_id = args.context.key_id()?;
    let key = args.key.key()?;
    let wrapped = veil_keys::wrap_key(&recipient, &key, &key_id).map_err(|e| match e {
        veil_keys::Error::NonContributory => CliError::failed(
            "--recipient",
            format!("not a usable X25519 public key [{}]: {e}", e.code()),
        ),
        e => CliError::failed("wrap", format!("cannot wrap [{}]: {e}", e.code())),
    })?;
    let mut out = hex::encode(wrapped);
    out.push('\n');
    Ok(Zeroizing::new(out.into_bytes()))
}

fn unwrap(args: &UnwrapArgs) -> Result<Output, CliError> {
    let wrapped = decode_hex::<{ veil_keys::WRAPPED_LEN }>("--wrapped", &args.wrapped)?;
    let key_id = args.context.key_id()?;
    let secret = secret_from::<32>(
        "--secret-hex",
        args.secret.secret_hex.as_ref(),
        "--secret-file",
        args.secret.secret_file.as_deref(),
    )?;
    let secret = X25519Secret::from_bytes(*secret);
    let key = veil_keys::unwrap_key(&secret, wrapped.as_ref(), &key_id).map_err(|e| {
        let reason = match e {
            veil_keys::Error::NonContributory => "its ephemeral public key is a low-order point",
            _ => {
                "it does not authenticate with this secret key and context \
                 (--scope, --key-version, --session, --task)"
            }
        };
        CliError::failed(
            "--wrapped",
            format!("cannot unwrap [{}]: {reason}", e.code()),
        )
    })?;
    Ok(key_line(&key))
}

fn x25519_keygen() -> Result<Output, CliError> {
    let secret = X25519Secret::generate()
        .map_err(|e| CliError::failed("x25519-keygen", format!("[{}] {e}", e.code())))?;
    let public = secret.public();
    let secret_bytes = secret.to_bytes();
    // Sized up front so the buffer holding the secret never reallocates.
    let mut line = Zeroizing::new(String::with_capacity(32 + 4 * 32));
    line.push_str("{\"secret\":\"");
    for b in secret_bytes.iter() {
        let _ = write!(line, "{b:02x}");
    }
    let _ = writeln!(line, "\",\"public\":\"{public}\"}}");
    Ok(Zeroizing::new(line.as_bytes().to_vec()))
}
