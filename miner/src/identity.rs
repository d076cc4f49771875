//! The miner's X25519 identity file: 64 lowercase hex characters and a newline, mode 0600,
//! created on first start and refused when group or others can access it (the same rule as the
//! router's keyring).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use veil_keys::X25519Secret;
use zeroize::Zeroizing;

use crate::config::{ConfigError, err};

const SETTING: &str = "identity_file";

/// Loads the identity at `path`, or creates one there if the file does not exist. Returns
/// whether it was created.
pub fn load_or_create(path: &Path) -> Result<(X25519Secret, bool), ConfigError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok((load(path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match create(path)? {
            Some(secret) => Ok((secret, true)),
            // Another process created it meanwhile: use that one.
            None => Ok((load(path)?, false)),
        },
        Err(e) => Err(err(SETTING, format!("{}: {e}", path.display()))),
    }
}

/// Loads an identity file, refusing one that group or others can access.
pub fn load(path: &Path) -> Result<X25519Secret, ConfigError> {
    let shown = path.display();
    let meta = fs::metadata(path).map_err(|e| err(SETTING, format!("{shown}: {e}")))?;
    if !meta.is_file() {
        return Err(err(SETTING, format!("{shown}: not a file")));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(
            SETTING,
            format!(
                "{shown} has mode {mode:o}; it must not be accessible to group or others (chmod 600)"
            ),
        ));
    }
    let text = Zeroizing::new(
        fs::read_to_string(path).map_err(|e| err(SETTING, format!("{shown}: {e}")))?,
    );
    X25519Secret::from_hex(text.trim()).map_err(|_| {
        err(
            SETTING,
            format!("{shown}: expected 64 hex characters (an X25519 secret key)"),
        )
    })
}

/// Writes a fresh identity to `path` without ever replacing an existing file: a temporary file
/// (mode 0600) in the same directory, synced, then linked to `path`. `None` when `path` appeared
/// meanwhile.
fn create(path: &Path) -> Result<Option<X25519Secret>, ConfigError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        err(SETTING, format!("{what} {}: {e}", p.display()))
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io("creating directory", &dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| err(SETTING, format!("{} is not a file path", path.display())))?;
    let secret = X25519Secret::generate().map_err(|e| err(SETTING, e.to_string()))?;
    let suffix = hex::encode(&secret.public().as_bytes()[..8]);
    let tmp = dir.join(format!(".{}.{suffix}.tmp", name.to_string_lossy()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("creating", &tmp, e))?;
        let mut text = Zeroizing::new(hex::encode(*secret.to_bytes()));
        text.push('\n');
        f.write_all(text.as_bytes())
            .map_err(|e| io("writing", &tmp, e))?;
        f.sync_all().map_err(|e| io("syncing", &tmp, e))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(io("creating", path, e)),
        }
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(Some(()))
    })();
    let _ = fs::remove_file(&tmp);
    Ok(result?.map(|()| secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_private_then_reused_and_refused_when_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/identity.key");
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_dir(dir.path().join("data")).unwrap().count(),
            1,
            "no temporary file left"
        );
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public(), b.public());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_or_create(&path).unwrap_err();
        assert_eq!(e.setting, "identity_file");
        assert!(e.message.contains("640"), "{e}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not hex\n").unwrap();
        let e = load(&path).unwrap_err();
        assert!(
            !e.message.contains("not hex"),
            "the content is never quoted: {e}"
        );
    }
}
