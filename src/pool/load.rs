//! Loading one chunk: the only I/O the pool does.
//!
//! A chunk file is read whole in one read call, decoded and verified against
//! its digest; a raw-image pseudo-chunk is one positioned read. This module
//! never caches, never touches pool state and never runs on a tokio thread
//! (pool workers only).

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::store::file::open_regular;
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
    /// for compressed payloads.
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

/// Reads a chunk file whole in one read call and decodes it, checking
/// magic, size limit and digest (the digest stands in for the CRC).
///
/// The read (`readv`) puts the blob header into a small buffer and the
/// payload after it. A payload of exactly the chunk's size is stored
/// uncompressed (compression is kept only when it is smaller): it goes
/// straight into a vector of its size, not zeroed first, which becomes
/// the chunk's data without a copy. A smaller one goes into `raw`, which
/// the worker keeps from chunk to chunk (its pages stay mapped) and which
/// never grows past the largest accepted chunk file, and is decompressed
/// from there (or copied out, for a short uncompressed chunk).
pub(super) fn read_chunk_file(
    path: &Path,
    digest: &Digest,
    max_size: usize,
    raw: &mut Vec<u8>,
) -> Result<Vec<u8>> {
    let what = || format!("chunk {} ({})", digest_hex(digest), path.display());
    let file = open_regular(path).map_err(|e| {
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
    let mut head = [0u8; blob::HEADER_SIZE];
    let Some(payload_len) = len.checked_sub(head.len()) else {
        return Err(Error::corrupt(format!(
            "{}: truncated blob ({len} bytes)",
            what()
        )));
    };
    // An exact-size payload is the uncompressed data: read into a vector
    // of its own, it is kept as it is.
    let mut own = Vec::new();
    let exact = payload_len == max_size;
    let buf = if exact { &mut own } else { raw };
    read_whole(&file, &mut head, buf, payload_len).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::corrupt(format!("{}: file shrank while being read", what()))
        } else {
            Error::io(what(), &e)
        }
    })?;
    let header = blob::parse_header(&head, Some(digest))?;
    let payload = if exact {
        Cow::Owned(std::mem::take(buf))
    } else {
        Cow::Borrowed(&buf[..])
    };
    blob::decode_payload(&header, payload, Some(digest), max_size)
}

/// Reads `head.len()` bytes of `file` into `head` and the `len` bytes after
/// them into the empty vector `data`, from the file's position, in one
/// `readv` call (more only if the kernel returns less). `data`'s spare
/// capacity is not zeroed first.
fn read_whole(file: &File, head: &mut [u8], data: &mut Vec<u8>, len: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    data.clear();
    data.reserve_exact(len);
    let mut head_done = 0;
    while head_done < head.len() || data.len() < len {
        let rest = head.get_mut(head_done..).unwrap_or_default();
        let done = data.len();
        let spare = data.spare_capacity_mut();
        let iov = [
            libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            },
            libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len().min(len - done),
            },
        ];
        // SAFETY: each iovec points at memory of its length that this
        // function may write: the rest of `head`, and spare capacity of
        // `data`. The kernel writes at most that much to each.
        let n = unsafe { libc::readv(file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = n as usize;
        let into_head = n.min(iov[0].iov_len);
        head_done += into_head;
        // SAFETY: the kernel initialised `n - into_head` (at most
        // `iov[1].iov_len`) bytes right after the initialised part.
        unsafe { data.set_len(done + (n - into_head)) };
    }
    Ok(())
}

/// Asks the kernel to start reading a chunk file into the page cache
/// (asynchronously), so that the disk works while this worker decodes.
/// Best effort: any failure is ignored (the real read reports errors).
pub(super) fn hint_will_read(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(file) = open_regular(path) {
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is
        // valid for the lifetime of `file`.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
        }
    }
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
    forget_cached(&image.file, start, len);
    Ok(buf)
}

/// Asks the kernel to drop its page cache of what was just read: the pool
/// keeps the bytes it needs, and a second copy in the 128 MiB VM left its
/// kernel so short of memory that, with two extractions at once, vsock
/// writes of the agent failed (ENOMEM) in 4 runs of 4. Advice
/// only; chunk files (shared over 9p without a page cache in the VM, warm
/// in the host's cache for benchmarks) are left alone.
pub(super) fn forget_cached(file: &File, start: u64, len: usize) {
    use std::os::unix::io::AsRawFd;
    if let (Ok(start), Ok(len)) = (libc::off_t::try_from(start), libc::off_t::try_from(len)) {
        // SAFETY: an advisory syscall on an open descriptor; no pointers.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), start, len, libc::POSIX_FADV_DONTNEED) };
    }
}
