//! The keyring: versioned seeds with `active` and `min_decrypt` pointers
//! (protocol §2), persisted as one JSON file written atomically with mode 0600.

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{Error, Result, SecretKey, Seed, derive_session_key, derive_task_key};

/// The `format` field of a keyring document.
pub const KEYRING_FORMAT: &str = "veil-keyring/1";

/// Where a key version stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// The version new encryptions use.
    Active,
    /// Older than active but at or above `min_decrypt`: still opens blobs.
    DecryptOnly,
    /// Below `min_decrypt`: refuses to derive, seed still kept.
    Retired,
    /// Seed deleted: everything sealed under it is unreadable.
    Destroyed,
}

/// Public facts about one key version (never the seed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyVersionInfo {
    /// The version number.
    pub version: u32,
    /// Its state.
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// When it was retired, Unix seconds.
    pub retired_at: Option<u64>,
    /// When its seed was destroyed, Unix seconds.
    pub destroyed_at: Option<u64>,
}

struct Version {
    seed: Option<Seed>,
    created_at: u64,
    retired_at: Option<u64>,
    destroyed_at: Option<u64>,
}

/// Versioned seeds with `active` and `min_decrypt`. Its `Debug` shows versions only.
pub struct Keyring {
    versions: BTreeMap<u32, Version>,
    active: u32,
    min_decrypt: u32,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("min_decrypt", &self.min_decrypt)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Hex of a seed inside the file document; zeroized on drop.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(transparent)]
struct SeedHex(String);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVersion {
    version: u32,
    created_at: u64,
    #[serde(default)]
    retired_at: Option<u64>,
    #[serde(default)]
    destroyed_at: Option<u64>,
    seed: Option<SeedHex>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    format: String,
    active: u32,
    min_decrypt: u32,
    versions: Vec<FileVersion>,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |source| Error::KeyringIo { op, path, source }
}

impl Keyring {
    /// A new keyring with one random seed, version 1, active.
    pub fn generate() -> Result<Keyring> {
        Ok(Self::from_seed(Seed::generate()?))
    }

    /// A keyring holding one given seed as version 1.
    pub fn from_seed(seed: Seed) -> Keyring {
        let mut versions = BTreeMap::new();
        versions.insert(
            1,
            Version {
                seed: Some(seed),
                created_at: now(),
                retired_at: None,
                destroyed_at: None,
            },
        );
        Keyring {
            versions,
            active: 1,
            min_decrypt: 1,
        }
    }

    /// The version new encryptions use.
    pub fn active(&self) -> u32 {
        self.active
    }

    /// Versions below this are retired.
    pub fn min_decrypt(&self) -> u32 {
        self.min_decrypt
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> Vec<KeyVersionInfo> {
        self.versions
            .iter()
            .map(|(&version, v)| KeyVersionInfo {
                version,
                state: self.state_of(version, v),
                created_at: v.created_at,
                retired_at: v.retired_at,
                destroyed_at: v.destroyed_at,
            })
            .collect()
    }

    fn state_of(&self, version: u32, v: &Version) -> KeyState {
        if v.seed.is_none() {
            KeyState::Destroyed
        } else if version < self.min_decrypt {
            KeyState::Retired
        } else if version == self.active {
            KeyState::Active
        } else {
            KeyState::DecryptOnly
        }
    }

    /// Adds version `latest + 1` with a fresh seed and makes it active.
    pub fn rotate(&mut self) -> Result<u32> {
        let latest = *self.versions.keys().next_back().expect("never empty");
        let next = latest
            .checked_add(1)
            .ok_or_else(|| Error::KeyringState("key versions exhausted".into()))?;
        self.versions.insert(
            next,
            Version {
                seed: Some(Seed::generate()?),
                created_at: now(),
                retired_at: None,
                destroyed_at: None,
            },
        );
        self.active = next;
        Ok(next)
    }

    /// Retires every version up to and including `up_to` (raises `min_decrypt`
    /// to `up_to + 1`). The active version cannot be retired.
    pub fn retire(&mut self, up_to: u32) -> Result<()> {
        if up_to >= self.active {
            return Err(Error::KeyringState(format!(
                "cannot retire version {up_to}: the active version is {}; rotate first",
                self.active
            )));
        }
        if up_to < self.min_decrypt {
            return Ok(()); // already retired: idempotent
        }
        let t = now();
        for (_, v) in self.versions.range_mut(self.min_decrypt..=up_to) {
            v.retired_at.get_or_insert(t);
        }
        self.min_decrypt = up_to + 1;
        Ok(())
    }

    /// Destroys a retired version's seed: every blob sealed under it becomes
    /// unreadable. Idempotent for an already destroyed version.
    pub fn destroy(&mut self, version: u32) -> Result<()> {
        let min = self.min_decrypt;
        let v = self
            .versions
            .get_mut(&version)
            .ok_or(Error::UnknownVersion(version))?;
        if version >= min {
            return Err(Error::KeyringState(format!(
                "cannot destroy version {version}: retire it first (min_decrypt is {min})"
            )));
        }
        if v.seed.take().is_some() {
            v.destroyed_at = Some(now());
        }
        Ok(())
    }

    fn seed(&self, version: u32) -> Result<&Seed> {
        let v = self
            .versions
            .get(&version)
            .ok_or(Error::UnknownVersion(version))?;
        let seed = v.seed.as_ref().ok_or(Error::Destroyed(version))?;
        if version < self.min_decrypt {
            return Err(Error::Retired(version));
        }
        Ok(seed)
    }

    /// `K_session` of `session_id` under seed `version`.
    pub fn session_key(&self, version: u32, session_id: &Uuid) -> Result<SecretKey> {
        Ok(derive_session_key(self.seed(version)?, session_id))
    }

    /// `K_task` of `task_id` in `session_id` under seed `version`.
    pub fn task_key(&self, version: u32, session_id: &Uuid, task_id: &Uuid) -> Result<SecretKey> {
        Ok(derive_task_key(
            &self.session_key(version, session_id)?,
            task_id,
        ))
    }

    // ---- persistence ----

    /// Parses a keyring document (JSON), or a bare 64-hex-character seed, which
    /// becomes version 1.
    pub fn from_json(text: &str) -> Result<Keyring> {
        let trimmed = text.trim();
        if trimmed.len() == 64 && trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Self::from_seed(Seed::from_hex(trimmed)?));
        }
        let doc: FileDoc =
            // serde_json's message may quote the offending value, which could be a seed: only
            // its position is reported.
            serde_json::from_str(text).map_err(|e| {
                Error::KeyringFormat(format!(
                    "not a keyring document ({:?} error at line {}, column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ))
            })?;
        if doc.format != KEYRING_FORMAT {
            return Err(Error::KeyringFormat(format!(
                "format is {:?}, expected {KEYRING_FORMAT:?}",
                doc.format
            )));
        }
        let mut versions = BTreeMap::new();
        for fv in &doc.versions {
            if fv.version == 0 {
                return Err(Error::KeyringFormat("versions start at 1".into()));
            }
            let seed = match &fv.seed {
                Some(h) => Some(Seed::from_hex(&h.0).map_err(|_| {
                    Error::KeyringFormat(format!(
                        "version {}: seed is not 64 hex characters",
                        fv.version
                    ))
                })?),
                None => None,
            };
            if seed.is_none() && fv.destroyed_at.is_none() {
                return Err(Error::KeyringFormat(format!(
                    "version {}: no seed and not marked destroyed",
                    fv.version
                )));
            }
            let dup = versions.insert(
                fv.version,
                Version {
                    seed,
                    created_at: fv.created_at,
                    retired_at: fv.retired_at,
                    destroyed_at: fv.destroyed_at,
                },
            );
            if dup.is_some() {
                return Err(Error::KeyringFormat(format!(
                    "version {} listed twice",
                    fv.version
                )));
            }
        }
        let ring = Keyring {
            versions,
            active: doc.active,
            min_decrypt: doc.min_decrypt,
        };
        match ring.versions.get(&ring.active) {
            Some(v) if v.seed.is_some() => {}
            _ => {
                return Err(Error::KeyringFormat(format!(
                    "active version {} has no seed",
                    ring.active
                )));
            }
        }
        if ring.min_decrypt == 0 || ring.min_decrypt > ring.active {
            return Err(Error::KeyringFormat(format!(
                "min_decrypt {} must be between 1 and active ({})",
                ring.min_decrypt, ring.active
            )));
        }
        if let Some((v, _)) = ring
            .versions
            .iter()
            .find(|(v, x)| **v >= ring.min_decrypt && x.seed.is_none())
        {
            return Err(Error::KeyringFormat(format!(
                "version {v} is destroyed but not retired"
            )));
        }
        Ok(ring)
    }

    /// The keyring document (JSON, with seeds), in a buffer zeroized on drop.
    pub fn to_json(&self) -> Zeroizing<String> {
        let doc = FileDoc {
            format: KEYRING_FORMAT.into(),
            active: self.active,
            min_decrypt: self.min_decrypt,
            versions: self
                .versions
                .iter()
                .map(|(&version, v)| FileVersion {
                    version,
                    created_at: v.created_at,
                    retired_at: v.retired_at,
                    destroyed_at: v.destroyed_at,
                    seed: v
                        .seed
                        .as_ref()
                        .map(|s| SeedHex(String::from(s.to_hex().as_str()))),
                })
                .collect(),
        };
        let mut buf = Zeroizing::new(Vec::with_capacity(256 + 128 * self.versions.len()));
        serde_json::to_writer_pretty(&mut *buf, &doc).expect("serializing to memory");
        buf.push(b'\n');
        Zeroizing::new(String::from_utf8(std::mem::take(&mut *buf)).expect("JSON is UTF-8"))
    }

    /// Loads a keyring file, refusing one that group or others can access.
    pub fn load(path: impl AsRef<Path>) -> Result<Keyring> {
        Self::load_checked(path.as_ref(), 0o077)
    }

    /// Loads a read-only keyring file mounted from a secret manager (a keyring document or a
    /// bare hex seed). Symbolic links are followed (secret volumes swap them on update). Group
    /// read access is allowed (secret volumes often grant it to the service's group); a file
    /// that others can access is refused.
    pub fn load_secret_file(path: impl AsRef<Path>) -> Result<Keyring> {
        Self::load_checked(path.as_ref(), 0o007)
    }

    /// Loads `path`, refusing a non-regular file and any permission bit in `forbidden`.
    fn load_checked(path: &Path, forbidden: u32) -> Result<Keyring> {
        let meta = fs::metadata(path).map_err(io_err("reading", path))?;
        if !meta.is_file() {
            return Err(Error::KeyringState(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & forbidden != 0 {
            return Err(Error::KeyringPermissions {
                path: path.display().to_string(),
                mode,
            });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io_err("reading", path))?);
        Self::from_json(&text)
    }

    /// The lock file that serialises changes to the keyring file at `path`: `.NAME.lock` in
    /// the same directory. The keyring file itself is replaced on every save, so it cannot
    /// carry the lock.
    pub fn lock_path(path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keyring".into());
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        dir.join(format!(".{name}.lock"))
    }

    /// Changes the keyring file at `path` safely against other processes doing the same (the
    /// router's replicas, the operator CLI): takes an exclusive lock on
    /// [`lock_path`](Self::lock_path) (waiting for it), loads the file as it is now, applies
    /// `f`, saves the result atomically (mode 0600), and releases the lock. Returns the saved
    /// keyring and `f`'s value. When `f` fails nothing is written.
    ///
    /// The file must exist: a missing keyring is an error here, never silently replaced by a
    /// new one (that would orphan everything sealed under the old seeds).
    pub fn update_file<T, E>(
        path: impl AsRef<Path>,
        f: impl FnOnce(&mut Keyring) -> std::result::Result<T, E>,
    ) -> std::result::Result<(Keyring, T), E>
    where
        E: From<Error>,
    {
        let path = path.as_ref();
        let lock_path = Self::lock_path(path);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("opening the lock file", &lock_path))?;
        // Released when `lock` is closed, also on every error path below.
        lock.lock()
            .map_err(io_err("locking the lock file", &lock_path))?;
        let mut ring = Self::load(path)?;
        let value = f(&mut ring)?;
        ring.save(path)?;
        drop(lock);
        Ok((ring, value))
    }

    /// Loads the keyring at `path`, or generates one and saves it there if the
    /// file does not exist. Returns whether it was created.
    pub fn load_or_create(path: impl AsRef<Path>) -> Result<(Keyring, bool)> {
        let path = path.as_ref();
        match fs::symlink_metadata(path) {
            Ok(_) => Ok((Self::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let ring = Self::generate()?;
                ring.save(path)?;
                Ok((ring, true))
            }
            Err(e) => Err(io_err("reading", path)(e)),
        }
    }

    /// Reads a keyring from environment variable `var`: a keyring document or a
    /// bare hex seed. `None` if the variable is unset.
    pub fn from_env(var: &str) -> Result<Option<Keyring>> {
        Self::from_env_value(var, std::env::var(var))
    }

    fn from_env_value(
        var: &str,
        value: std::result::Result<String, std::env::VarError>,
    ) -> Result<Option<Keyring>> {
        match value {
            Ok(v) => {
                let v = Zeroizing::new(v);
                Self::from_json(&v).map(Some).map_err(|e| match e {
                    Error::KeyringFormat(m) => {
                        Error::KeyringFormat(format!("environment variable {var}: {m}"))
                    }
                    other => other,
                })
            }
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::KeyringFormat(format!(
                "environment variable {var} is not valid UTF-8"
            ))),
        }
    }

    /// Writes the keyring to `path` atomically: a temporary file (mode 0600) in
    /// the same directory, synced, then renamed over `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io_err("creating directory for", path))?;
        let name = path
            .file_name()
            .ok_or_else(|| Error::KeyringState(format!("{} is not a file path", path.display())))?;
        let suffix = hex::encode(*crate::secret::random_bytes::<8>()?);
        let tmp = dir.join(format!(".{}.{suffix}.tmp", name.to_string_lossy()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("creating", &tmp))?;
            f.write_all(self.to_json().as_bytes())
                .map_err(io_err("writing", &tmp))?;
            f.sync_all().map_err(io_err("syncing", &tmp))?;
            fs::rename(&tmp, path).map_err(io_err("replacing", path))?;
            // Make the rename durable.
            if let Ok(d) = fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        let mut ring = Keyring::generate().unwrap();
        let sid = Uuid::now_v7();
        let tid = Uuid::now_v7();
        let k1 = ring.task_key(1, &sid, &tid).unwrap();
        assert_eq!(ring.rotate().unwrap(), 2);
        assert_eq!(ring.active(), 2);
        assert_eq!(
            ring.task_key(1, &sid, &tid).unwrap().expose_secret(),
            k1.expose_secret()
        );
        assert_ne!(
            ring.task_key(2, &sid, &tid).unwrap().expose_secret(),
            k1.expose_secret()
        );
        assert!(matches!(
            ring.session_key(3, &sid),
            Err(Error::UnknownVersion(3))
        ));

        assert!(matches!(ring.retire(2), Err(Error::KeyringState(_))));
        assert!(matches!(ring.destroy(1), Err(Error::KeyringState(_))));
        ring.retire(1).unwrap();
        ring.retire(1).unwrap();
        assert_eq!(ring.min_decrypt(), 2);
        assert!(matches!(ring.session_key(1, &sid), Err(Error::Retired(1))));
        ring.destroy(1).unwrap();
        ring.destroy(1).unwrap();
        assert!(matches!(
            ring.session_key(1, &sid),
            Err(Error::Destroyed(1))
        ));
        let states: Vec<_> = ring.versions().iter().map(|v| v.state).collect();
        assert_eq!(states, [KeyState::Destroyed, KeyState::Active]);
        assert_eq!(ring.rotate().unwrap(), 3);
        let states: Vec<_> = ring.versions().iter().map(|v| v.state).collect();
        assert_eq!(
            states,
            [KeyState::Destroyed, KeyState::DecryptOnly, KeyState::Active]
        );
    }

    #[test]
    fn json_round_trip_keeps_everything() {
        let mut ring = Keyring::generate().unwrap();
        ring.rotate().unwrap();
        ring.rotate().unwrap();
        ring.retire(1).unwrap();
        ring.destroy(1).unwrap();
        let sid = Uuid::now_v7();
        let text = ring.to_json();
        let back = Keyring::from_json(&text).unwrap();
        assert_eq!(back.versions(), ring.versions());
        assert_eq!((back.active(), back.min_decrypt()), (3, 2));
        for v in 2..=3 {
            assert_eq!(
                back.session_key(v, &sid).unwrap().expose_secret(),
                ring.session_key(v, &sid).unwrap().expose_secret()
            );
        }
        assert!(!format!("{back:?}").contains(&text[60..70]));
    }

    #[test]
    fn bare_seed_and_bad_documents() {
        let ring = Keyring::from_json(&"0f".repeat(32)).unwrap();
        assert_eq!(ring.active(), 1);
        assert_eq!(
            ring.session_key(1, &Uuid::nil()).unwrap().expose_secret(),
            derive_session_key(&Seed::from_bytes([0x0f; 32]), &Uuid::nil()).expose_secret()
        );
        for bad in [
            "{",
            r#"{"format":"other","active":1,"min_decrypt":1,"versions":[]}"#,
            r#"{"format":"veil-keyring/1","active":1,"min_decrypt":1,"versions":[]}"#,
            r#"{"format":"veil-keyring/1","active":1,"min_decrypt":2,"versions":[{"version":1,"created_at":0,"seed":"00000000000000000000000000000000000000000000000000000000000000ff"}]}"#,
            r#"{"format":"veil-keyring/1","active":1,"min_decrypt":1,"versions":[{"version":1,"created_at":0,"seed":"abc"}]}"#,
            r#"{"format":"veil-keyring/1","active":1,"min_decrypt":1,"versions":[{"version":1,"created_at":0,"seed":null}]}"#,
        ] {
            let err = Keyring::from_json(bad).unwrap_err();
            assert!(matches!(err, Error::KeyringFormat(_)), "{bad}: {err}");
            assert!(!err.to_string().contains("00000000ff"));
        }
    }

    #[test]
    fn file_is_atomic_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/keyring.json");
        let (ring, created) = Keyring::load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = Keyring::load_or_create(&path).unwrap();
        assert!(!created);
        let sid = Uuid::now_v7();
        assert_eq!(
            again.session_key(1, &sid).unwrap().expose_secret(),
            ring.session_key(1, &sid).unwrap().expose_secret()
        );
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("keyring.json")]);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Keyring::load(&path),
            Err(Error::KeyringPermissions { mode: 0o644, .. })
        ));
    }

    #[test]
    fn update_file_serialises_writers_and_keeps_the_file_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        assert!(
            matches!(
                Keyring::update_file(&path, |r| r.rotate()),
                Err(Error::KeyringIo { .. })
            ),
            "a missing keyring is not created by a change"
        );
        let (ring, _) = Keyring::load_or_create(&path).unwrap();
        let sid = Uuid::now_v7();
        let k1 = ring.session_key(1, &sid).unwrap();

        // Eight writers at once, each rotating once from what is on disk: none is lost.
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || Keyring::update_file(&path, |r| r.rotate()).unwrap().1)
            })
            .collect();
        let mut got: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        got.sort();
        assert_eq!(got, (2..=9).collect::<Vec<_>>());
        let back = Keyring::load(&path).unwrap();
        assert_eq!(back.active(), 9);
        assert_eq!(
            back.session_key(1, &sid).unwrap().expose_secret(),
            k1.expose_secret(),
            "older seeds are kept"
        );
        for p in [&path, &Keyring::lock_path(&path)] {
            let mode = fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }

        // A failing change writes nothing.
        let before = fs::read(&path).unwrap();
        let err = Keyring::update_file(&path, |r| r.retire(9)).unwrap_err();
        assert!(matches!(err, Error::KeyringState(_)), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);

        // The saved document is what the closure produced.
        let (saved, ()) = Keyring::update_file(&path, |r| r.retire(3)).unwrap();
        assert_eq!(saved.min_decrypt(), 4);
        assert_eq!(Keyring::load(&path).unwrap().versions(), saved.versions());
    }

    #[test]
    fn secret_files_allow_group_read_but_not_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, "ab".repeat(32)).unwrap();
        for (mode, ok) in [
            (0o400, true),
            (0o440, true),
            (0o640, true),
            (0o644, false),
            (0o604, false),
        ] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let r = Keyring::load_secret_file(&path);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if !ok {
                assert!(matches!(r, Err(Error::KeyringPermissions { .. })));
            }
        }
        // The writable keyring file allows neither.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            Keyring::load(&path),
            Err(Error::KeyringPermissions { mode: 0o640, .. })
        ));
        // A symbolic link (as secret volumes use) is followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(Keyring::load_secret_file(&link).unwrap().active(), 1);
        // A directory is not a keyring.
        assert!(Keyring::load_secret_file(dir.path()).is_err());
    }

    #[test]
    fn from_env_reads_document_or_seed() {
        let var = "VEIL_KEYS_TEST_UNSET_VARIABLE";
        assert!(Keyring::from_env(var).unwrap().is_none());
        let ring = Keyring::generate().unwrap();
        let parsed = Keyring::from_env_value(var, Ok(ring.to_json().to_string()))
            .unwrap()
            .unwrap();
        assert_eq!(parsed.versions(), ring.versions());
        let seeded = Keyring::from_env_value(var, Ok("ab".repeat(32)))
            .unwrap()
            .unwrap();
        assert_eq!(seeded.active(), 1);
        let err = Keyring::from_env_value(var, Ok("nope".into())).unwrap_err();
        assert!(err.to_string().contains(var), "{err}");
    }

    #[test]
    fn a_malformed_document_error_never_quotes_its_values() {
        let seed = "ab".repeat(32);
        let text = format!(
            "{{\"format\":\"veil-keyring/1\",\"active\":\"{seed}\",\"min_decrypt\":1,\"versions\":[]}}"
        );
        let e = Keyring::from_json(&text).expect_err("active must be a number");
        let msg = e.to_string();
        assert!(msg.contains("line 1"), "{msg}");
        assert!(!msg.contains(&seed[..16]), "{msg}");
    }
}
