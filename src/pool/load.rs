//! Loading one chunk: the only I/O the pool does.
//!
//! A chunk file is read whole, in one read call, into a buffer of exactly its
//! size, then decoded and verified against its digest; a raw-image
//! pseudo-chunk is one positioned read. This module never caches, never
//! touches pool state and never runs on a tokio thread (pool workers only).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::store::{blob, digest_hex, Digest};

/// Size of the pseudo-chunks a raw image is served in.
pub const RAW_CHUNK_SIZE: u64 = 4 << 20;

/// Room for a blob header (plain 12, encrypted 44 bytes) and for a
/// compressed frame that came out a little larger than its data.
const BLOB_SLACK: u64 = 4096;

/// A raw image (file or block device) opened read-only.
#[derive(Debug)]
pub(crate) struct RawImage {
    pub file: File,
    pub size: u64,
    /// Distinguishes this image's pseudo-chunks in the cache.
    pub id: u64,
    pub name: String,
    pub inode: u64,
}

/// One chunk to read and decode.
#[derive(Debug)]
pub(super) enum Load {
    Chunk {
        path: PathBuf,
        digest: Digest,
        /// Decoded size limit: the index's size for this chunk, at most
        /// `MAX_CHUNK_SIZE`.
        max_size: usize,
    },
    Raw {
        image: Arc<RawImage>,
        chunk: u64,
    },
}

/// Where a load sits on disk, for dispatch in inode order.
#[derive(Debug)]
pub(super) enum Position {
    /// Not known yet: the worker stats this chunk file.
    Stat(PathBuf),
    /// (inode, byte offset inside it).
    Known(u64, u64),
}

impl Position {
    /// Resolves to (inode, offset). A chunk file that cannot be stat'ed
    /// sorts last; reading it reports the error.
    pub fn resolve(self) -> (u64, u64) {
        match self {
            Position::Stat(path) => (std::fs::metadata(path).map_or(u64::MAX, |m| m.ino()), 0),
            Position::Known(inode, offset) => (inode, offset),
        }
    }
}

impl Load {
    pub fn position(&self) -> Position {
        match self {
            Load::Chunk { path, .. } => Position::Stat(path.clone()),
            Load::Raw { image, chunk } => {
                Position::Known(image.inode, chunk.saturating_mul(RAW_CHUNK_SIZE))
            }
        }
    }

    /// Reads and decodes the chunk; `raw` is the worker's reusable buffer
    /// for chunk file contents.
    pub fn run(&self, raw: &mut Vec<u8>) -> Result<Vec<u8>> {
        match self {
            Load::Chunk {
                path,
                digest,
                max_size,
            } => read_chunk_file(path, digest, *max_size, raw),
            Load::Raw { image, chunk } => read_raw_chunk(image, *chunk),
        }
    }
}

/// Reads a chunk file in one read into a buffer of its exact size (found by
/// fstat) and decodes it, checking CRC, size limit and digest.
///
/// The buffer is a prefix of `raw`, which the worker keeps from chunk to
/// chunk: its pages stay mapped and are not zeroed again, which saves a
/// memset and a page fault per 4 KiB of every chunk. It never grows past
/// the largest accepted chunk file.
pub(super) fn read_chunk_file(
    path: &Path,
    digest: &Digest,
    max_size: usize,
    raw: &mut Vec<u8>,
) -> Result<Vec<u8>> {
    let what = || format!("chunk {} ({})", digest_hex(digest), path.display());
    let mut file = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::not_found(format!("{} missing", what()))
        } else {
            Error::io(what(), &e)
        }
    })?;
    let len = file.metadata().map_err(|e| Error::io(what(), &e))?.len();
    let limit = (max_size as u64).saturating_add(BLOB_SLACK);
    if len > limit {
        return Err(Error::corrupt(format!(
            "{}: file is {len} bytes, larger than any blob of a {max_size}-byte chunk",
            what()
        )));
    }
    let len = len as usize;
    if raw.len() < len {
        raw.resize(len, 0);
    }
    let buf = raw.get_mut(..len).unwrap_or_default();
    file.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::corrupt(format!("{}: file shrank while being read", what()))
        } else {
            Error::io(what(), &e)
        }
    })?;
    let hex = digest_hex(digest);
    blob::decode(buf, Some(digest), max_size).map_err(|mut e| {
        if !e.message.contains(&hex) {
            e.message = format!("chunk {hex}: {}", e.message);
        }
        e
    })
}

/// Reads pseudo-chunk `chunk` of a raw image (the last one may be short).
fn read_raw_chunk(image: &RawImage, chunk: u64) -> Result<Vec<u8>> {
    let start = chunk.saturating_mul(RAW_CHUNK_SIZE);
    let len = image.size.saturating_sub(start).min(RAW_CHUNK_SIZE) as usize;
    let mut buf = vec![0u8; len];
    image.file.read_exact_at(&mut buf, start).map_err(|e| {
        let what = format!("image {} at offset {start}", image.name);
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::new(
                crate::error::ErrorKind::Io,
                format!("{what}: image is shorter than when it was opened"),
            )
        } else {
            Error::io(what, &e)
        }
    })?;
    Ok(buf)
}
