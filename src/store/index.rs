//! The chunk-index abstraction shared by fixed (`.fidx`) and dynamic
//! (`.didx`) indexes: which digest covers which byte range of an archive.
//! Implementations are validated on open, so these methods never fail;
//! this module does no I/O.

use std::ops::Range;

use crate::store::Digest;

/// A validated, immutable map from archive byte ranges to chunk digests.
pub trait ChunkIndex: Send + Sync + std::fmt::Debug {
    /// Archive size in bytes.
    fn size(&self) -> u64;
    /// Number of chunks.
    fn chunk_count(&self) -> usize;
    /// Byte range of chunk `i` (`i < chunk_count()`, else an empty range at the end).
    fn chunk_range(&self, i: usize) -> Range<u64>;
    /// Digest of chunk `i` (`i < chunk_count()`).
    fn chunk_digest(&self, i: usize) -> &Digest;
    /// The chunk holding byte `offset`; None at or past the end.
    fn chunk_at(&self, offset: u64) -> Option<usize>;
    /// `Some(chunk_size)` for fixed indexes (every chunk but the last has
    /// this size, which makes the all-zero chunk recognisable), None for dynamic.
    fn fixed_chunk_size(&self) -> Option<u64>;
    /// Bytes the index holds in memory (its digests and offsets).
    fn memory_bytes(&self) -> usize;
}

/// Size of the fixed and dynamic index headers.
pub const INDEX_HEADER_SIZE: usize = 4096;

/// Largest index file we load (a 16 TiB image at 4 MiB chunks needs 128 MiB).
pub const MAX_INDEX_FILE_SIZE: u64 = 256 << 20;

/// Opens the index file at `path` for [`read_header`]: the file and its
/// length, refusing files over [`MAX_INDEX_FILE_SIZE`] so a huge or hostile
/// file cannot exhaust memory.
pub(crate) fn open_index_file(
    path: &std::path::Path,
) -> crate::error::Result<(std::fs::File, u64)> {
    use crate::error::Error;
    let file = super::file::open_regular(path).map_err(|e| Error::io(path.display(), &e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path.display(), &e))?
        .len();
    if len > MAX_INDEX_FILE_SIZE {
        return Err(Error::unsupported(format!(
            "{}: index file of {len} bytes is over the limit of {MAX_INDEX_FILE_SIZE}",
            path.display()
        )));
    }
    Ok((file, len))
}

/// Reads the 4096-byte header of an index of `len` bytes from `r` and
/// checks its magic; returns it, the raw header and the body's length.
/// The caller reads the body straight into what it keeps (no copy of the
/// whole file), then calls [`check_end`].
pub(crate) fn read_header(
    r: &mut dyn std::io::Read,
    len: u64,
    magic: &[u8; 8],
    kind: &str,
    name: &str,
) -> crate::error::Result<(IndexHeader, Box<[u8; INDEX_HEADER_SIZE]>, u64)> {
    use crate::error::Error;
    let Some(body_len) = len.checked_sub(INDEX_HEADER_SIZE as u64) else {
        return Err(Error::corrupt(format!(
            "{name}: truncated {kind} index header ({len} of {INDEX_HEADER_SIZE} bytes)"
        )));
    };
    let mut raw = Box::new([0u8; INDEX_HEADER_SIZE]);
    r.read_exact(&mut raw[..])
        .map_err(|e| Error::io(name, &e))?;
    let header = IndexHeader::parse(&raw, magic, kind, name)?;
    Ok((header, raw, body_len))
}

/// Reads exactly `buf.len()` bytes of an index body.
pub(crate) fn read_body(
    r: &mut dyn std::io::Read,
    buf: &mut [u8],
    name: &str,
) -> crate::error::Result<()> {
    r.read_exact(buf)
        .map_err(|e| crate::error::Error::io(name, &e))
}

/// Checks that nothing follows the body just read (the file did not grow
/// since its length was taken).
pub(crate) fn check_end(r: &mut dyn std::io::Read, name: &str) -> crate::error::Result<()> {
    let mut more = [0u8; 1];
    match r.read(&mut more) {
        Ok(0) => Ok(()),
        Ok(_) => Err(crate::error::Error::corrupt(format!(
            "{name}: the index file grew while it was read"
        ))),
        Err(e) => Err(crate::error::Error::io(name, &e)),
    }
}

/// The header fields common to both index kinds (offsets 0..64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    pub magic: [u8; 8],
    pub uuid: [u8; 16],
    pub ctime: i64,
    pub index_csum: Digest,
}

impl IndexHeader {
    /// The common fields of a 4096-byte index `header`; checks the magic.
    /// `name` names the file in errors.
    pub(crate) fn parse(
        header: &[u8; INDEX_HEADER_SIZE],
        magic: &[u8; 8],
        kind: &str,
        name: &str,
    ) -> crate::error::Result<IndexHeader> {
        use crate::error::Error;
        let mut h = IndexHeader {
            magic: [0; 8],
            uuid: [0; 16],
            ctime: 0,
            index_csum: [0; 32],
        };
        h.magic.copy_from_slice(&header[0..8]);
        if &h.magic != magic {
            return Err(Error::corrupt(format!(
                "{name}: not a {kind} index (wrong magic)"
            )));
        }
        h.uuid.copy_from_slice(&header[8..24]);
        let mut ctime = [0u8; 8];
        ctime.copy_from_slice(&header[24..32]);
        h.ctime = i64::from_le_bytes(ctime);
        h.index_csum.copy_from_slice(&header[32..64]);
        Ok(h)
    }

    /// The first 64 header bytes, followed by zeros up to 4096 bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; INDEX_HEADER_SIZE];
        out[0..8].copy_from_slice(&self.magic);
        out[8..24].copy_from_slice(&self.uuid);
        out[24..32].copy_from_slice(&self.ctime.to_le_bytes());
        out[32..64].copy_from_slice(&self.index_csum);
        out
    }
}

/// A fresh random index uuid (from the kernel's random source, falling back
/// to a hash of time and pid: uniqueness, not secrecy, is what matters).
pub fn new_uuid() -> [u8; 16] {
    use std::io::Read;
    let mut uuid = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut uuid))
        .is_ok();
    if !ok {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = format!("{now}-{}", std::process::id());
        uuid.copy_from_slice(&crate::store::sha256(seed.as_bytes())[..16]);
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

/// Seconds since the epoch, for index ctimes.
pub fn now_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Returned by `chunk_digest` for an out-of-range index: no chunk file has
/// this name in practice, so a caller bug reads as a missing chunk, never as data.
pub(crate) static NO_DIGEST: Digest = [0u8; 32];
