//! The blob envelope, format 1 (protocol §3): a 108-byte header followed by
//! framed AES-256-GCM chunks.

use std::{fmt, str::FromStr};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{AeadInOut, Nonce, Tag},
};
use hkdf::Hkdf;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::{Error, Plaintext, Result, SecretKey, kdf::lp, secret::random_bytes};

/// Length of the envelope header in bytes.
pub const HEADER_LEN: usize = 108;
/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Length of a frame's length word.
pub const FRAME_LEN_LEN: usize = 4;
/// Default chunk exponent: 64 KiB chunks.
pub const DEFAULT_CHUNK_EXP: u8 = 16;
/// Smallest allowed chunk exponent (1 KiB chunks).
pub const MIN_CHUNK_EXP: u8 = 10;
/// Largest allowed chunk exponent (16 MiB chunks).
pub const MAX_CHUNK_EXP: u8 = 24;
/// The four magic bytes at the start of every blob.
pub const MAGIC: [u8; 4] = *b"VEIL";
/// The envelope format this crate writes and reads.
pub const FORMAT: u8 = 0x01;

const LAST_FLAG: u32 = 1 << 31;
const MAX_CHUNKS: u64 = 1 << 32;
const LABEL_BLOB_KEY: &[u8] = b"veil/v1/blob-key";
const LABEL_BLOB_COMMIT: &[u8] = b"veil/v1/blob-commit";

macro_rules! byte_enum {
    ($(#[$doc:meta])* $name:ident, $err:ident, $what:literal, { $($(#[$vdoc:meta])* $variant:ident = $byte:literal, $text:literal;)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant = $byte,)+
        }

        impl $name {
            /// Every value, in byte order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire byte.
            pub fn as_byte(self) -> u8 {
                self as u8
            }

            /// Parses the wire byte.
            pub fn from_byte(b: u8) -> Result<Self> {
                match b {
                    $($byte => Ok($name::$variant),)+
                    other => Err(Error::$err(other)),
                }
            }

            /// The lowercase text name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        concat!("invalid ", $what, " {:?}: expected one of {}"),
                        other,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

byte_enum!(
    /// Which key a blob is sealed under (header byte 5).
    Scope, BadScope, "scope", {
        /// `K_session`: readable by the session owner.
        Session = 0x01, "session";
        /// `K_task`: readable by the session owner and the miner assigned to the task.
        Task = 0x02, "task";
    }
);

byte_enum!(
    /// What a blob holds (header byte 6).
    Purpose, BadPurpose, "purpose", {
        /// A prompt.
        Prompt = 0x01, "prompt";
        /// An inference result.
        Result = 0x02, "result";
        /// An attachment.
        Attachment = 0x03, "attachment";
    }
);

/// Identifies a session or task key: its seed version, session, and task (for task scope).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    /// Version of the keyring seed the key derives from.
    pub key_version: u32,
    /// The session.
    pub session_id: Uuid,
    /// The task, for a task key; `None` for a session key.
    pub task_id: Option<Uuid>,
}

impl KeyId {
    /// A session key's id.
    pub fn session(key_version: u32, session_id: Uuid) -> Self {
        Self {
            key_version,
            session_id,
            task_id: None,
        }
    }

    /// A task key's id.
    pub fn task(key_version: u32, session_id: Uuid, task_id: Uuid) -> Self {
        Self {
            key_version,
            session_id,
            task_id: Some(task_id),
        }
    }

    /// Builds an id from a scope and an optional task, refusing a disagreement
    /// (task scope needs a non-nil task id, session scope must have none).
    pub fn from_scope(
        scope: Scope,
        key_version: u32,
        session_id: Uuid,
        task_id: Option<Uuid>,
    ) -> Result<Self> {
        match (scope, task_id) {
            (Scope::Session, None) => Ok(Self::session(key_version, session_id)),
            (Scope::Task, Some(t)) if !t.is_nil() => Ok(Self::task(key_version, session_id, t)),
            _ => Err(Error::ScopeTaskIdMismatch),
        }
    }

    /// Session scope without a task id, task scope with one.
    pub fn scope(&self) -> Scope {
        if self.task_id.is_some() {
            Scope::Task
        } else {
            Scope::Session
        }
    }

    /// The task id as 16 bytes, zero for session scope.
    pub fn task_id_bytes(&self) -> [u8; 16] {
        self.task_id.map(|t| *t.as_bytes()).unwrap_or([0; 16])
    }
}

/// What a sealer needs besides the key: the key's id, the purpose and the chunk size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobParams {
    /// The key the blob is sealed under.
    pub key: KeyId,
    /// What the blob holds.
    pub purpose: Purpose,
    /// Chunk exponent e: chunks of 2^e bytes.
    pub chunk_exp: u8,
}

impl BlobParams {
    /// Parameters with the default 64 KiB chunks.
    pub fn new(key: KeyId, purpose: Purpose) -> Self {
        Self {
            key,
            purpose,
            chunk_exp: DEFAULT_CHUNK_EXP,
        }
    }

    /// Sets the chunk exponent, refusing one outside 10..=24.
    pub fn with_chunk_exp(mut self, chunk_exp: u8) -> Result<Self> {
        check_chunk_exp(chunk_exp)?;
        self.chunk_exp = chunk_exp;
        Ok(self)
    }
}

fn check_chunk_exp(e: u8) -> Result<()> {
    if (MIN_CHUNK_EXP..=MAX_CHUNK_EXP).contains(&e) {
        Ok(())
    } else {
        Err(Error::BadChunkExponent(e))
    }
}

/// A parsed envelope header. Parsing checks its structure but not the key: that
/// happens when a blob is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The key the blob claims to be sealed under.
    pub key: KeyId,
    /// What the blob holds.
    pub purpose: Purpose,
    /// Chunk exponent e.
    pub chunk_exp: u8,
    /// The blob's random salt.
    pub salt: [u8; 32],
    /// The key commitment.
    pub commitment: [u8; 32],
}

impl Header {
    /// Parses and checks the first 108 bytes of `bytes` (magic, format,
    /// scope/task-id agreement, purpose, chunk exponent). Bytes after the
    /// header are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let h: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(Error::ShortHeader)?;
        if h[0..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        if h[4] != FORMAT {
            return Err(Error::UnsupportedFormat(h[4]));
        }
        let scope = Scope::from_byte(h[5])?;
        let purpose = Purpose::from_byte(h[6])?;
        let chunk_exp = h[7];
        check_chunk_exp(chunk_exp)?;
        let key_version = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
        let session_id = Uuid::from_bytes(h[12..28].try_into().expect("16 bytes"));
        let task_raw: [u8; 16] = h[28..44].try_into().expect("16 bytes");
        let task_id = (task_raw != [0; 16]).then(|| Uuid::from_bytes(task_raw));
        let key = KeyId::from_scope(scope, key_version, session_id, task_id)?;
        Ok(Header {
            key,
            purpose,
            chunk_exp,
            salt: h[44..76].try_into().expect("32 bytes"),
            commitment: h[76..108].try_into().expect("32 bytes"),
        })
    }

    /// The 108 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = FORMAT;
        h[5] = self.key.scope().as_byte();
        h[6] = self.purpose.as_byte();
        h[7] = self.chunk_exp;
        h[8..12].copy_from_slice(&self.key.key_version.to_be_bytes());
        h[12..28].copy_from_slice(self.key.session_id.as_bytes());
        h[28..44].copy_from_slice(&self.key.task_id_bytes());
        h[44..76].copy_from_slice(&self.salt);
        h[76..108].copy_from_slice(&self.commitment);
        h
    }

    /// The key scope.
    pub fn scope(&self) -> Scope {
        self.key.scope()
    }

    /// The chunk size C = 2^e in bytes.
    pub fn chunk_size(&self) -> usize {
        1usize << self.chunk_exp
    }
}

/// The per-blob key schedule: `PRK = Extract(salt, K_scope)`, `K_enc`, `commit`.
fn blob_keys(key: &SecretKey, salt: &[u8; 32]) -> (Aes256Gcm, [u8; 32]) {
    let hk = Hkdf::<Sha256>::new(Some(salt), key.expose_secret());
    let mut info = Vec::with_capacity(32);
    let mut k_enc = Zeroizing::new([0u8; 32]);
    lp(&mut info, LABEL_BLOB_KEY);
    hk.expand(&info, k_enc.as_mut()).expect("valid length");
    info.clear();
    lp(&mut info, LABEL_BLOB_COMMIT);
    let mut commit = [0u8; 32];
    hk.expand(&info, &mut commit).expect("valid length");
    let cipher = Aes256Gcm::new_from_slice(k_enc.as_ref()).expect("32-byte key");
    (cipher, commit)
}

fn nonce(index: u64, last: bool) -> Nonce<Aes256Gcm> {
    let mut n = [0u8; 12];
    n[7..11].copy_from_slice(&(index as u32).to_be_bytes());
    n[11] = last as u8;
    Nonce::<Aes256Gcm>::from(n)
}

/// Shared framing state of the sealers.
struct FrameSealer {
    cipher: Aes256Gcm,
    header: [u8; HEADER_LEN],
    index: u64,
}

impl FrameSealer {
    /// Appends `frame_i` for `chunk` to `out`.
    fn seal_frame(&mut self, chunk: &[u8], last: bool, out: &mut Vec<u8>) -> Result<()> {
        if self.index >= MAX_CHUNKS {
            return Err(Error::TooManyChunks);
        }
        let ct_len = (chunk.len() + TAG_LEN) as u32;
        let word = if last { LAST_FLAG | ct_len } else { ct_len };
        out.reserve(FRAME_LEN_LEN + chunk.len() + TAG_LEN);
        out.extend_from_slice(&word.to_be_bytes());
        let start = out.len();
        out.extend_from_slice(chunk);
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &nonce(self.index, last),
                &self.header,
                (&mut out[start..]).into(),
            )
            .map_err(|_| Error::TooManyChunks)?;
        out.extend_from_slice(&tag);
        self.index += 1;
        Ok(())
    }
}

/// Shared frame-opening state of the openers.
struct FrameOpener {
    cipher: Aes256Gcm,
    header: [u8; HEADER_LEN],
    chunk_size: usize,
    index: u64,
}

impl FrameOpener {
    /// Checks the header against the key: derives the blob keys and compares
    /// the commitment in constant time.
    fn new(key: &SecretKey, header_bytes: &[u8]) -> Result<(Header, FrameOpener)> {
        let header = Header::parse(header_bytes)?;
        let (cipher, commit) = blob_keys(key, &header.salt);
        if !bool::from(commit.ct_eq(&header.commitment)) {
            return Err(Error::WrongKey);
        }
        let opener = FrameOpener {
            cipher,
            header: header.to_bytes(),
            chunk_size: header.chunk_size(),
            index: 0,
        };
        Ok((header, opener))
    }

    /// Validates a frame's length word; returns (last, ciphertext length).
    fn check_word(&self, word: u32) -> Result<(bool, usize)> {
        let last = word & LAST_FLAG != 0;
        let len = word & !LAST_FLAG;
        if self.index >= MAX_CHUNKS {
            return Err(Error::TooManyChunks);
        }
        if (len as usize) < TAG_LEN || len as usize > self.chunk_size + TAG_LEN {
            return Err(Error::BadFrameLength {
                index: self.index,
                len,
            });
        }
        if !last && len as usize == TAG_LEN {
            return Err(Error::EmptyNonFinalChunk { index: self.index });
        }
        Ok((last, len as usize))
    }

    /// Decrypts `ct_and_tag` in place; on success the slice's first
    /// `len - 16` bytes are the chunk's plaintext.
    fn open_in_place(&mut self, last: bool, ct_and_tag: &mut [u8]) -> Result<()> {
        let split = ct_and_tag.len() - TAG_LEN;
        let (ct, tag) = ct_and_tag.split_at_mut(split);
        let tag = Tag::<Aes256Gcm>::try_from(&*tag).expect("16-byte tag");
        self.cipher
            .decrypt_inout_detached(&nonce(self.index, last), &self.header, ct.into(), &tag)
            .map_err(|_| Error::Decrypt)?;
        self.index += 1;
        Ok(())
    }
}

/// The plaintext of a blob that opened, and its header.
pub struct Opened {
    /// The blob's header.
    pub header: Header,
    /// The plaintext, zeroized on drop.
    pub plaintext: Plaintext,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("header", &self.header)
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

/// Seals a whole buffer under `key`: full chunks of C bytes and a last chunk of
/// `len % C` bytes (empty when the length is a multiple of C), with a fresh
/// random salt.
pub fn seal(key: &SecretKey, params: &BlobParams, plaintext: &[u8]) -> Result<Vec<u8>> {
    let sealer = Sealer::new(key, params)?;
    let c = sealer.chunk_size;
    let n_frames = plaintext.len() / c + 1;
    let mut out =
        Vec::with_capacity(HEADER_LEN + plaintext.len() + n_frames * (FRAME_LEN_LEN + TAG_LEN));
    let mut frames = sealer.frames;
    out.extend_from_slice(&frames.header);
    // Straight from the caller's buffer: no intermediate plaintext copy.
    let full = plaintext.len() - plaintext.len() % c;
    for chunk in plaintext[..full].chunks_exact(c) {
        frames.seal_frame(chunk, false, &mut out)?;
    }
    frames.seal_frame(&plaintext[full..], true, &mut out)?;
    Ok(out)
}

/// Opens a whole blob: either every chunk authenticates and the whole plaintext
/// is returned, or an error and no plaintext at all.
pub fn open(key: &SecretKey, blob: &[u8]) -> Result<Opened> {
    let (header, mut fo) = FrameOpener::new(key, blob)?;
    let mut plaintext = Plaintext::with_capacity(blob.len().saturating_sub(HEADER_LEN));
    let buf = plaintext.vec_mut();
    let mut rest = &blob[HEADER_LEN..];
    loop {
        let Some((word, body)) = rest.split_first_chunk::<FRAME_LEN_LEN>() else {
            // Fewer than four bytes left before a last frame.
            return Err(Error::Truncated);
        };
        let (last, len) = fo.check_word(u32::from_be_bytes(*word))?;
        if body.len() < len {
            return Err(Error::Truncated);
        }
        let start = buf.len();
        buf.extend_from_slice(&body[..len]);
        fo.open_in_place(last, &mut buf[start..])?;
        buf.truncate(start + len - TAG_LEN);
        rest = &body[len..];
        if last {
            if !rest.is_empty() {
                return Err(Error::TrailingData);
            }
            return Ok(Opened { header, plaintext });
        }
    }
}

/// Incremental sealer for streams. Everything it writes, concatenated, is the
/// blob: the header is written with the first output.
///
/// Plaintext is buffered until a chunk fills (then a frame is written), or until
/// [`Sealer::flush`] closes the pending chunk early so it can travel at once;
/// [`Sealer::finish`] writes the last frame.
pub struct Sealer {
    frames: FrameSealer,
    header: Header,
    header_written: bool,
    chunk_size: usize,
    pending: Plaintext,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("header", &self.header)
            .field("chunks_written", &self.frames.index)
            .field("pending_len", &self.pending.len())
            .finish()
    }
}

impl Sealer {
    /// Starts a blob with a fresh random salt.
    pub fn new(key: &SecretKey, params: &BlobParams) -> Result<Sealer> {
        let salt = random_bytes::<32>()?;
        Self::with_salt(key, params, *salt)
    }

    pub(crate) fn with_salt(
        key: &SecretKey,
        params: &BlobParams,
        salt: [u8; 32],
    ) -> Result<Sealer> {
        check_chunk_exp(params.chunk_exp)?;
        let (cipher, commitment) = blob_keys(key, &salt);
        let header = Header {
            key: params.key,
            purpose: params.purpose,
            chunk_exp: params.chunk_exp,
            salt,
            commitment,
        };
        let chunk_size = header.chunk_size();
        Ok(Sealer {
            frames: FrameSealer {
                cipher,
                header: header.to_bytes(),
                index: 0,
            },
            header,
            header_written: false,
            chunk_size,
            pending: Plaintext::default(),
        })
    }

    /// The blob's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Number of frames written so far.
    pub fn frames_written(&self) -> u64 {
        self.frames.index
    }

    fn write_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_written {
            out.extend_from_slice(&self.frames.header);
            self.header_written = true;
        }
    }

    /// Feeds plaintext; writes a frame to `out` for every chunk that fills.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.write_header(out);
        let c = self.chunk_size;
        if !self.pending.is_empty() {
            let take = (c - self.pending.len()).min(data.len());
            self.pending.vec_mut().extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == c {
                let chunk = std::mem::take(self.pending.vec_mut());
                let res = self.frames.seal_frame(&chunk, false, out);
                *self.pending.vec_mut() = chunk;
                self.pending.vec_mut().clear();
                res?;
            }
        }
        // Whole chunks straight from the input, without going through `pending`.
        while data.len() >= c {
            let (chunk, rest) = data.split_at(c);
            self.frames.seal_frame(chunk, false, out)?;
            data = rest;
        }
        if !data.is_empty() {
            let pending = self.pending.vec_mut();
            if pending.capacity() < c {
                // Reserved once per stream, so the buffer never reallocates.
                pending.reserve_exact(c - pending.len());
            }
            pending.extend_from_slice(data);
        }
        Ok(())
    }

    /// Closes the pending chunk early (if it holds anything) as a non-last frame.
    pub fn flush(&mut self, out: &mut Vec<u8>) -> Result<()> {
        self.write_header(out);
        if !self.pending.is_empty() {
            let chunk = std::mem::take(self.pending.vec_mut());
            let res = self.frames.seal_frame(&chunk, false, out);
            *self.pending.vec_mut() = chunk;
            self.pending.vec_mut().clear();
            res?;
        }
        Ok(())
    }

    /// Writes the last frame, holding whatever is pending (possibly nothing).
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<()> {
        self.write_header(out);
        let chunk = std::mem::take(self.pending.vec_mut());
        let res = self.frames.seal_frame(&chunk, true, out);
        *self.pending.vec_mut() = chunk;
        res
    }

    /// Vectors only: seals the given chunks with explicit boundaries.
    #[cfg(feature = "vectors")]
    pub(crate) fn seal_chunks(mut self, chunks: &[&[u8]]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_header(&mut out);
        let n = chunks.len();
        assert!(n > 0, "a blob has at least one (last) chunk");
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == n;
            assert!(chunk.len() <= self.chunk_size, "chunk larger than C");
            assert!(last || !chunk.is_empty(), "empty non-last chunk");
            self.frames.seal_frame(chunk, last, &mut out)?;
        }
        Ok(out)
    }
}

enum OpenerState {
    Header(Vec<u8>),
    Frames(Box<FrameOpener>),
    Done,
    Failed,
}

/// Incremental opener for streams: feed ciphertext in any slicing; each chunk's
/// plaintext comes out only after that chunk authenticated.
///
/// After any error the opener is poisoned: it has released only chunks that
/// authenticated before the failure, and every later call fails.
pub struct Opener {
    key: SecretKey,
    state: OpenerState,
    header: Option<Header>,
    word: [u8; 4],
    word_have: usize,
    current: Option<(bool, usize, Plaintext)>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("header", &self.header)
            .field("complete", &self.is_complete())
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// An opener for a blob sealed under `key` (`K_session` or `K_task`, as the
    /// blob's scope says).
    pub fn new(key: &SecretKey) -> Opener {
        Opener {
            key: key.clone(),
            state: OpenerState::Header(Vec::with_capacity(HEADER_LEN)),
            header: None,
            word: [0; 4],
            word_have: 0,
            current: None,
        }
    }

    /// The header, once 108 bytes arrived and it checked out against the key.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// Whether the last frame has authenticated.
    pub fn is_complete(&self) -> bool {
        matches!(self.state, OpenerState::Done)
    }

    /// Feeds ciphertext; returns the plaintext of every chunk that completed and
    /// authenticated, in order.
    pub fn push(&mut self, input: &[u8]) -> Result<Vec<Plaintext>> {
        let mut out = Vec::new();
        match self.drive(input, &mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                self.state = OpenerState::Failed;
                self.current = None;
                Err(e)
            }
        }
    }

    fn drive(&mut self, mut input: &[u8], out: &mut Vec<Plaintext>) -> Result<()> {
        loop {
            match &mut self.state {
                OpenerState::Failed => return Err(Error::Poisoned),
                OpenerState::Done => {
                    return if input.is_empty() {
                        Ok(())
                    } else {
                        Err(Error::TrailingData)
                    };
                }
                OpenerState::Header(buf) => {
                    let take = (HEADER_LEN - buf.len()).min(input.len());
                    buf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if buf.len() < HEADER_LEN {
                        return Ok(());
                    }
                    let (header, fo) = FrameOpener::new(&self.key, buf)?;
                    self.header = Some(header);
                    self.state = OpenerState::Frames(Box::new(fo));
                }
                OpenerState::Frames(fo) => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let (last, len, buf) = match &mut self.current {
                        Some(cur) => (cur.0, cur.1, &mut cur.2),
                        None => {
                            let take = (4 - self.word_have).min(input.len());
                            self.word[self.word_have..self.word_have + take]
                                .copy_from_slice(&input[..take]);
                            self.word_have += take;
                            input = &input[take..];
                            if self.word_have < 4 {
                                return Ok(());
                            }
                            self.word_have = 0;
                            let (last, len) = fo.check_word(u32::from_be_bytes(self.word))?;
                            let cur =
                                self.current
                                    .insert((last, len, Plaintext::with_capacity(len)));
                            (cur.0, cur.1, &mut cur.2)
                        }
                    };
                    let take = (len - buf.len()).min(input.len());
                    buf.vec_mut().extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if buf.len() < len {
                        return Ok(());
                    }
                    let (_, _, mut chunk) = self.current.take().expect("current frame");
                    fo.open_in_place(last, &mut chunk)?;
                    chunk.vec_mut().truncate(len - TAG_LEN);
                    out.push(chunk);
                    if last {
                        self.state = OpenerState::Done;
                    }
                }
            }
        }
    }

    /// Ends the stream: refuses input that stopped before the last frame.
    pub fn finish(self) -> Result<Header> {
        match self.state {
            OpenerState::Done => Ok(self.header.expect("header parsed before frames")),
            OpenerState::Failed => Err(Error::Poisoned),
            OpenerState::Header(ref b) if b.len() < HEADER_LEN => Err(Error::ShortHeader),
            _ => Err(Error::Truncated),
        }
    }
}

/// Test-vector helpers: deterministic salts and explicit chunk boundaries.
#[cfg(feature = "vectors")]
pub(crate) fn seal_with_salt(
    key: &SecretKey,
    params: &BlobParams,
    salt: [u8; 32],
    chunks: &[&[u8]],
) -> Result<Vec<u8>> {
    Sealer::with_salt(key, params, salt)?.seal_chunks(chunks)
}
