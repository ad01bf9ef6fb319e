//! Chunk store layout: `<store>/.chunks/<first 2 digest bytes as 4 hex>/<64 hex>`,
//! each file one DataBlob. This module maps digests to paths and reads raw
//! chunk files whole; it never writes (the importer does) and never caches.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::store::{blob, digest_hex, Digest, MAX_CHUNK_SIZE};

/// Largest chunk file we read: a full-size chunk stored uncompressed plus
/// the (encrypted) header, with slack for zstd framing.
pub const MAX_CHUNK_FILE_SIZE: u64 = MAX_CHUNK_SIZE as u64 + 64 * 1024;

/// A datastore's chunk directory.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    chunk_dir: PathBuf,
}

impl ChunkStore {
    /// Opens the chunk store of the datastore at `store_dir` (its `.chunks`
    /// directory must exist). Read-only: creates nothing.
    pub fn open(store_dir: &Path) -> Result<Self> {
        let chunk_dir = store_dir.join(".chunks");
        match std::fs::metadata(&chunk_dir) {
            Ok(m) if m.is_dir() => Ok(ChunkStore { chunk_dir }),
            Ok(_) => Err(Error::new(
                ErrorKind::NotADirectory,
                format!("{}: not a directory", chunk_dir.display()),
            )),
            Err(e) => Err(Error::new(
                if e.kind() == std::io::ErrorKind::NotFound {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::Io
                },
                format!(
                    "{}: not a datastore ({}: {e})",
                    store_dir.display(),
                    chunk_dir.display()
                ),
            )),
        }
    }

    /// The `.chunks` directory.
    pub fn chunk_dir(&self) -> &Path {
        &self.chunk_dir
    }

    /// Where the chunk with digest `d` lives.
    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = digest_hex(d);
        let mut p = self.chunk_dir.join(&hex[..4]);
        p.push(hex);
        p
    }

    /// Reads the raw chunk file of `d` whole. A missing file is `NotFound`
    /// naming the digest; a file over [`MAX_CHUNK_FILE_SIZE`] is `Corrupt`.
    pub fn read_raw(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.chunk_path(d);
        let named = |e: std::io::Error| {
            let mut err = Error::io(format!("chunk {} ({})", digest_hex(d), path.display()), &e);
            if err.kind == ErrorKind::NotFound {
                err.message = format!("chunk {} missing ({})", digest_hex(d), path.display());
            }
            err
        };
        let file = super::file::open_regular(&path).map_err(named)?;
        let len = file.metadata().map_err(named)?.len();
        if len > MAX_CHUNK_FILE_SIZE {
            return Err(Error::corrupt(format!(
                "chunk {}: file of {len} bytes is over the limit of {MAX_CHUNK_FILE_SIZE}",
                digest_hex(d)
            )));
        }
        let mut raw = Vec::with_capacity(len as usize);
        file.take(MAX_CHUNK_FILE_SIZE + 1)
            .read_to_end(&mut raw)
            .map_err(named)?;
        if raw.len() as u64 > MAX_CHUNK_FILE_SIZE {
            return Err(Error::corrupt(format!(
                "chunk {}: file grew over the limit of {MAX_CHUNK_FILE_SIZE}",
                digest_hex(d)
            )));
        }
        Ok(raw)
    }

    /// Reads and decodes chunk `d`, checking CRC, size (at most `max_size`)
    /// and digest. A simple path for verify and tests; the agent's pool has its own.
    pub fn read_chunk(&self, d: &Digest, max_size: usize) -> Result<Vec<u8>> {
        let raw = self.read_raw(d)?;
        blob::decode(&raw, Some(d), max_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sha256;

    #[test]
    fn hello_chunk_path_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".chunks")).unwrap();
        let cs = ChunkStore::open(dir.path()).unwrap();
        let p = cs.chunk_path(&sha256(b"hello"));
        assert_eq!(
            p.strip_prefix(dir.path()).unwrap(),
            Path::new(
                ".chunks/2cf2/2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
            )
        );
    }

    #[test]
    fn reads_checks_and_reports_missing_chunks() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ChunkStore::open(dir.path()).unwrap_err().kind,
            ErrorKind::NotFound
        );
        std::fs::create_dir_all(dir.path().join(".chunks/2cf2")).unwrap();
        let cs = ChunkStore::open(dir.path()).unwrap();
        let d = sha256(b"hello");
        let err = cs.read_chunk(&d, MAX_CHUNK_SIZE).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.message.contains(&digest_hex(&d)), "{}", err.message);
        std::fs::write(cs.chunk_path(&d), blob::encode(b"hello", true)).unwrap();
        assert_eq!(cs.read_chunk(&d, MAX_CHUNK_SIZE).unwrap(), b"hello");
        // The content of another digest's file is corrupt for this one.
        let other = sha256(b"other");
        std::fs::create_dir_all(cs.chunk_path(&other).parent().unwrap()).unwrap();
        std::fs::write(cs.chunk_path(&other), blob::encode(b"hello", true)).unwrap();
        let err = cs.read_chunk(&other, MAX_CHUNK_SIZE).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        assert!(err.message.contains(&digest_hex(&other)));
    }
}
