//! Model integrity: the SHA-256 a miner reports for each model it serves, and that a router can
//! pin (`pinned_models NAME=HASH`).
//!
//! - A model that is one file: the SHA-256 of the file (`sha256sum FILE`).
//! - A model that is a directory: the SHA-256 of its manifest, the output of `sha256sum` over
//!   every regular file under it (symbolic links followed), sorted by relative path in byte
//!   order: one line `HEX  RELPATH\n` per file, `HEX` the file's SHA-256 in lowercase and
//!   `RELPATH` its path relative to the directory with `/` separators. Reproduce it with:
//!
//!   ```text
//!   cd MODEL_DIR && find -L . -type f -printf '%P\0' | LC_ALL=C sort -z \
//!       | xargs -0 sha256sum -- | sha256sum
//!   ```
//!
//! Files are streamed, never read whole. File names must be UTF-8 without a newline or a
//! backslash (which `sha256sum` would escape).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use veil_api::wire::Hex32;

use crate::{Error, Result};

/// Read buffer size.
const CHUNK: usize = 1 << 20;

/// Progress of a hash: bytes done out of the total.
pub trait Progress {
    /// Called after each chunk.
    fn update(&mut self, done: u64, total: u64);
}

impl<F: FnMut(u64, u64)> Progress for F {
    fn update(&mut self, done: u64, total: u64) {
        self(done, total)
    }
}

fn model_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Model {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

fn io_err(path: &Path, e: &std::io::Error) -> Error {
    let detail = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied (not readable)".to_string(),
        _ => e.to_string(),
    };
    model_err(path, detail)
}

/// The SHA-256 of the model at `path` (a file or a directory), as described in the module docs.
pub fn model_sha256(path: &Path, progress: &mut dyn Progress) -> Result<Hex32> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, &e))?;
    if meta.is_file() {
        let total = meta.len();
        let digest = file_sha256(path, &mut |n| progress.update(n, total))?;
        return Ok(Hex32(digest));
    }
    if !meta.is_dir() {
        return Err(model_err(path, "neither a file nor a directory"));
    }
    let files = list_files(path)?;
    if files.is_empty() {
        return Err(model_err(path, "the directory holds no file"));
    }
    let total = files.iter().map(|f| f.2).sum::<u64>();
    let mut base = 0u64;
    let mut manifest = Sha256::new();
    for (rel, abs, len) in &files {
        let digest = file_sha256(abs, &mut |n| progress.update(base + n, total))?;
        base += len;
        manifest.update(format!("{}  {rel}\n", hex::encode(digest)).as_bytes());
    }
    Ok(Hex32(manifest.finalize().into()))
}

/// Streams one file through SHA-256, reporting bytes read.
fn file_sha256(path: &Path, progress: &mut dyn FnMut(u64)) -> Result<[u8; 32]> {
    let mut f = fs::File::open(path).map_err(|e| io_err(path, &e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, &e)),
        };
        h.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(h.finalize().into())
}

/// Every regular file under `root` (following symbolic links): relative path, path, length,
/// sorted by relative path in byte order.
fn list_files(root: &Path) -> Result<Vec<(String, PathBuf, u64)>> {
    let mut out = Vec::new();
    // (directory, its relative path, the canonical directories above it, for loop detection)
    let mut stack: Vec<(PathBuf, String, Vec<PathBuf>)> =
        vec![(root.to_path_buf(), String::new(), Vec::new())];
    while let Some((dir, rel, mut ancestors)) = stack.pop() {
        let canonical = fs::canonicalize(&dir).map_err(|e| io_err(&dir, &e))?;
        if ancestors.contains(&canonical) {
            return Err(model_err(&dir, "symbolic link loop"));
        }
        ancestors.push(canonical);
        let entries = fs::read_dir(&dir).map_err(|e| io_err(&dir, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&dir, &e))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(model_err(&path, "file name is not UTF-8"));
            };
            if name.contains(['\n', '\\']) {
                return Err(model_err(&path, "file name holds a newline or a backslash"));
            }
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::metadata(&path).map_err(|e| io_err(&path, &e))?;
            if meta.is_dir() {
                stack.push((path, child_rel, ancestors.clone()));
            } else if meta.is_file() {
                out.push((child_rel, path, meta.len()));
            }
        }
    }
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn file_and_directory_digests() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("m");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("b.bin"), b"bee").unwrap();
        fs::write(root.join("sub/a.txt"), b"a").unwrap();
        fs::write(root.join("A.json"), b"{}").unwrap();

        let one = model_sha256(&root.join("b.bin"), &mut |_, _| {}).unwrap();
        assert_eq!(one.to_string(), sha(b"bee"));

        // Byte order: "A.json" < "b.bin" < "sub/a.txt".
        let manifest = format!(
            "{}  A.json\n{}  b.bin\n{}  sub/a.txt\n",
            sha(b"{}"),
            sha(b"bee"),
            sha(b"a")
        );
        let mut seen = (0, 0);
        let all = model_sha256(&root, &mut |d, t| seen = (d, t)).unwrap();
        assert_eq!(all.to_string(), sha(manifest.as_bytes()));
        assert_eq!(seen, (6, 6), "progress ends at the total");

        fs::write(root.join("sub/a.txt"), b"b").unwrap();
        assert_ne!(model_sha256(&root, &mut |_, _| {}).unwrap(), all);
    }

    #[test]
    fn missing_and_empty_models_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.gguf");
        let e = model_sha256(&missing, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("nope.gguf"), "{e}");
        assert!(e.to_string().contains("no such file"), "{e}");
        let e = model_sha256(dir.path(), &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("no file"), "{e}");
    }
}
