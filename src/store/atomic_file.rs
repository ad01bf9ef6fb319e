//! Atomic file replacement for the writer side (importer): write a temp
//! file next to the target, then rename it over the target, so readers see
//! either the old file or the complete new one. Never used by readers.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temp path in the same directory as `path`, unique within this machine
/// (pid + counter), ending in `.tmp` so leftovers are recognisable.
fn temp_path(path: &Path) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Atomically replaces `path` with `bytes`; `sync` also fsyncs the data
/// before the rename (for indexes and manifests, not for every chunk).
pub fn write(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path.display(), &e)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        super::write(&p, b"one", false).unwrap();
        super::write(&p, b"two", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = super::write(&dir.path().join("missing/f"), b"x", false).unwrap_err();
        assert!(err.message.contains("missing/f"), "{}", err.message);
    }
}
