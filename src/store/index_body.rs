//! Where an open index's entries live: a large index file is mapped
//! read-only, a small one is read into memory.
//!
//! An index is kept for as long as its archive is read, and the largest
//! accepted (256 MiB: a 32 TiB disk in 4 MiB chunks) is twice the file-restore
//! VM's memory. Read into memory, one such index drove the agent past 200 MiB
//! (three at once past 400 MiB). Mapped, its pages belong to the page cache:
//! the kernel reads them as they are touched and drops them again under
//! pressure, so the agent's own memory does not grow with the index (as in
//! Proxmox Backup's index readers). The mapping is private and read-only. A
//! mapped file truncated while in use, or a page that cannot be read in again
//! (an I/O error on the datastore share), raises SIGBUS and ends the agent
//! instead of failing one request: the datastore's writers never change an
//! index file in place (they write a new one and rename it), so only damage
//! to the datastore while it is served does that. Indexes under 4 MiB are
//! read into memory and never fault.
//! Owns: the mapping's lifetime. Must never write.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::store::index::{
    check_end, open_index_file, read_body, read_header, IndexHeader, INDEX_HEADER_SIZE,
};

/// Index files of at least this many bytes (a 512 GiB disk in 4 MiB
/// chunks) are mapped, not read: smaller ones cost little memory, and a
/// read copy cannot fault (see the module doc).
const MAP_FROM: u64 = 4 << 20;

/// A private, read-only mapping of a whole file.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and never changed through this type; it
// is unmapped once, on drop.
unsafe impl Send for Mapping {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn of(file: &File, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a new mapping at an address the kernel picks, of `len`
        // bytes of an open file, read-only and private.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Mapping { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `of`, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The entries of an index (the file past its 4096-byte header).
#[derive(Clone)]
pub(crate) enum Body {
    Owned(Vec<u8>),
    Mapped(Arc<Mapping>),
}

impl Body {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Body::Owned(v) => v,
            Body::Mapped(m) => m.bytes().get(INDEX_HEADER_SIZE..).unwrap_or_default(),
        }
    }

    /// Bytes of the agent's own memory this body takes (a mapping's pages
    /// are the page cache's).
    pub(crate) fn memory_bytes(&self) -> usize {
        match self {
            Body::Owned(v) => v.len(),
            Body::Mapped(_) => 0,
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self {
            Body::Owned(_) => "in memory",
            Body::Mapped(_) => "mapped",
        };
        write!(f, "Body({} bytes, {how})", self.bytes().len())
    }
}

/// Opens the index file at `path` (a `kind` index with `magic`, `name` in
/// errors): its header, the raw header, and its body, mapped if large.
pub(crate) fn load(
    path: &Path,
    magic: &[u8; 8],
    kind: &str,
    name: &str,
) -> Result<(IndexHeader, Box<[u8; INDEX_HEADER_SIZE]>, Body)> {
    let (mut file, len) = open_index_file(path)?;
    if len >= MAP_FROM {
        let mapped = usize::try_from(len)
            .map_err(|_| Error::unsupported(format!("{name}: {len}-byte index")))
            .and_then(|len| Mapping::of(&file, len).map_err(|e| Error::io(name, &e)));
        match mapped {
            Ok(map) => {
                let (header, raw, _) = read_header(&mut map.bytes(), len, magic, kind, name)?;
                return Ok((header, raw, Body::Mapped(Arc::new(map))));
            }
            Err(e) => log::warn!("{}; reading it into memory instead", e.message),
        }
    }
    let (header, raw, body_len) = read_header(&mut file, len, magic, kind, name)?;
    let body_len = usize::try_from(body_len)
        .map_err(|_| Error::unsupported(format!("{name}: {len}-byte index")))?;
    let mut body = vec![0u8; body_len];
    read_body(&mut file, &mut body, name)?;
    check_end(&mut file, name)?;
    Ok((header, raw, Body::Owned(body)))
}

/// An index held in memory (`bytes`, the whole file), split as [`load`]
/// splits a file.
pub(crate) fn split(
    bytes: &[u8],
    magic: &[u8; 8],
    kind: &str,
    name: &str,
) -> Result<(IndexHeader, Box<[u8; INDEX_HEADER_SIZE]>, Body)> {
    let (header, raw, _) = read_header(&mut &bytes[..], bytes.len() as u64, magic, kind, name)?;
    let body = bytes.get(INDEX_HEADER_SIZE..).unwrap_or_default().to_vec();
    Ok((header, raw, Body::Owned(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_files_are_mapped_and_small_ones_read() {
        let dir = tempfile::tempdir().unwrap();
        let magic = *b"TESTIDX1";
        for (len, mapped) in [(4096 + 40, false), (MAP_FROM as usize + 8, true)] {
            let mut bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            bytes[..8].copy_from_slice(&magic);
            let p = dir.path().join(format!("i{len}"));
            std::fs::write(&p, &bytes).unwrap();
            let (header, raw, body) = load(&p, &magic, "test", "t").unwrap();
            assert_eq!(header.magic, magic);
            assert_eq!(&raw[..], &bytes[..4096]);
            assert!(body.bytes() == &bytes[4096..]);
            assert_eq!(matches!(body, Body::Mapped(_)), mapped, "{body:?}");
            assert_eq!(body.memory_bytes(), if mapped { 0 } else { 40 });
            let copy = body.clone();
            drop(body);
            assert!(
                copy.bytes() == &bytes[4096..],
                "a clone outlives the original"
            );
        }
        let short = dir.path().join("short");
        std::fs::write(&short, b"TESTIDX1").unwrap();
        assert!(load(&short, &magic, "test", "t").is_err());
    }
}
