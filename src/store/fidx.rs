//! Fixed index (`.fidx`, disk images): a 4096-byte header (magic, uuid,
//! ctime, index_csum = SHA-256 of the body, size, chunk_size) followed by
//! exactly ceil(size/chunk_size) 32-byte digests. Everything is validated
//! on open; `write` is for the importer only.

use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::store::blob::FIXED_INDEX_MAGIC;
use crate::store::index::{ChunkIndex, IndexHeader, INDEX_HEADER_SIZE, NO_DIGEST};
use crate::store::index_body::{self, Body};
use crate::store::{atomic_file, digest_hex, sha256, Digest};

/// Smallest chunk size we accept (Proxmox Backup clients allow 64 KiB..4 MiB).
pub const MIN_FIXED_CHUNK_SIZE: u64 = 64 << 10;
/// Largest chunk size we accept.
pub const MAX_FIXED_CHUNK_SIZE: u64 = crate::store::MAX_CHUNK_SIZE as u64;

/// A validated fixed-size chunk index.
#[derive(Debug, Clone)]
pub struct FixedIndex {
    name: String,
    header: IndexHeader,
    size: u64,
    chunk_size: u64,
    /// the 32-byte digests, one per chunk
    body: Body,
}

impl FixedIndex {
    /// Reads and validates the index file at `path` (mapped, if large).
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let (header, raw, body) = index_body::load(path, &FIXED_INDEX_MAGIC, "fixed", &name)?;
        Self::check(header, &raw, body, &name)
    }

    /// Validates an index held in memory; `name` names it in errors.
    pub fn parse(bytes: &[u8], name: &str) -> Result<Self> {
        let (header, raw, body) = index_body::split(bytes, &FIXED_INDEX_MAGIC, "fixed", name)?;
        Self::check(header, &raw, body, name)
    }

    /// Validates the geometry and the digests' checksum.
    fn check(
        header: IndexHeader,
        raw_header: &[u8; INDEX_HEADER_SIZE],
        body: Body,
        name: &str,
    ) -> Result<Self> {
        let size = u64_at(&raw_header[..], 64);
        let chunk_size = u64_at(&raw_header[..], 72);
        check_chunk_size(chunk_size).map_err(|m| Error::corrupt(format!("{name}: {m}")))?;
        let count = size.div_ceil(chunk_size);
        let body_len = body.bytes().len() as u64;
        if count.checked_mul(32) != Some(body_len) {
            return Err(Error::corrupt(format!(
                "{name}: body is {body_len} bytes, expected {count} digests for size {size} \
                 and chunk size {chunk_size}"
            )));
        }
        let csum = sha256(body.bytes());
        if csum != header.index_csum {
            return Err(Error::corrupt(format!(
                "{name}: index checksum mismatch (header {}, digests hash to {})",
                digest_hex(&header.index_csum),
                digest_hex(&csum)
            )));
        }
        Ok(FixedIndex {
            name: name.to_string(),
            header,
            size,
            chunk_size,
            body,
        })
    }

    /// Builds an index for the importer; `digests` must hold
    /// ceil(size/chunk_size) entries.
    pub fn new(
        name: &str,
        size: u64,
        chunk_size: u64,
        digests: Vec<Digest>,
        uuid: [u8; 16],
        ctime: i64,
    ) -> Result<Self> {
        check_chunk_size(chunk_size).map_err(|m| Error::corrupt(format!("{name}: {m}")))?;
        if size.div_ceil(chunk_size) != digests.len() as u64 {
            return Err(Error::corrupt(format!(
                "{name}: {} digests do not cover {size} bytes in chunks of {chunk_size}",
                digests.len()
            )));
        }
        let index_csum = sha256(digests.as_flattened());
        Ok(FixedIndex {
            name: name.to_string(),
            header: IndexHeader {
                magic: FIXED_INDEX_MAGIC,
                uuid,
                ctime,
                index_csum,
            },
            size,
            chunk_size,
            body: Body::Owned(digests.concat()),
        })
    }

    /// The file bytes of this index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header.encode();
        out[64..72].copy_from_slice(&self.size.to_le_bytes());
        out[72..80].copy_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(self.body.bytes());
        out
    }

    /// Writes the index atomically (temp file + rename, fsynced).
    pub fn write(&self, path: &Path) -> Result<()> {
        atomic_file::write(path, &self.encode(), true)
    }

    /// The file name (or path) this index was opened from.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// SHA-256 over all digests, as stored in the header and the manifest.
    pub fn index_csum(&self) -> &Digest {
        &self.header.index_csum
    }
    pub fn uuid(&self) -> &[u8; 16] {
        &self.header.uuid
    }
    pub fn ctime(&self) -> i64 {
        self.header.ctime
    }
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
    pub fn digests(&self) -> &[Digest] {
        self.body.bytes().as_chunks::<32>().0
    }
}

fn u64_at(header: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&header[at..at + 8]);
    u64::from_le_bytes(b)
}

fn check_chunk_size(chunk_size: u64) -> std::result::Result<(), String> {
    if !chunk_size.is_power_of_two()
        || !(MIN_FIXED_CHUNK_SIZE..=MAX_FIXED_CHUNK_SIZE).contains(&chunk_size)
    {
        return Err(format!(
            "invalid chunk size {chunk_size} (must be a power of two in 64 KiB..=16 MiB)"
        ));
    }
    Ok(())
}

impl ChunkIndex for FixedIndex {
    fn size(&self) -> u64 {
        self.size
    }
    fn chunk_count(&self) -> usize {
        self.digests().len()
    }
    fn chunk_range(&self, i: usize) -> Range<u64> {
        let start = (i as u64).saturating_mul(self.chunk_size).min(self.size);
        let end = start.saturating_add(self.chunk_size).min(self.size);
        start..end
    }
    fn chunk_digest(&self, i: usize) -> &Digest {
        self.digests().get(i).unwrap_or(&NO_DIGEST)
    }
    fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset < self.size {
            Some((offset / self.chunk_size) as usize)
        } else {
            None
        }
    }
    fn fixed_chunk_size(&self) -> Option<u64> {
        Some(self.chunk_size)
    }
    fn memory_bytes(&self) -> usize {
        self.body.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const CS: u64 = 64 << 10;

    fn sample(size: u64) -> FixedIndex {
        let n = size.div_ceil(CS) as usize;
        let digests = (0..n).map(|i| sha256(&i.to_le_bytes())).collect();
        FixedIndex::new("t.fidx", size, CS, digests, [7; 16], 1_700_000_000).unwrap()
    }

    #[test]
    fn round_trip_with_short_last_chunk() {
        let idx = sample(3 * CS + 100);
        let bytes = idx.encode();
        assert_eq!(bytes.len(), 4096 + 4 * 32);
        assert_eq!(bytes[..8], FIXED_INDEX_MAGIC);
        let back = FixedIndex::parse(&bytes, "t.fidx").unwrap();
        assert_eq!(back.size(), 3 * CS + 100);
        assert_eq!(back.chunk_count(), 4);
        assert_eq!(back.digests(), idx.digests());
        assert_eq!(back.index_csum(), idx.index_csum());
        assert_eq!(back.ctime(), 1_700_000_000);
        assert_eq!(back.uuid(), &[7; 16]);
        assert_eq!(back.chunk_range(0), 0..CS);
        assert_eq!(back.chunk_range(3), 3 * CS..3 * CS + 100);
        assert_eq!(back.chunk_at(0), Some(0));
        assert_eq!(back.chunk_at(CS - 1), Some(0));
        assert_eq!(back.chunk_at(CS), Some(1));
        assert_eq!(back.chunk_at(3 * CS + 99), Some(3));
        assert_eq!(back.chunk_at(3 * CS + 100), None);
        assert_eq!(back.fixed_chunk_size(), Some(CS));
        assert_eq!(back.chunk_digest(99), &NO_DIGEST);
    }

    #[test]
    fn empty_image_has_no_chunks() {
        let idx = sample(0);
        let back = FixedIndex::parse(&idx.encode(), "e").unwrap();
        assert_eq!(back.chunk_count(), 0);
        assert_eq!(back.chunk_at(0), None);
    }

    #[test]
    fn write_and_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("drive.img.fidx");
        let idx = sample(5 * CS);
        idx.write(&p).unwrap();
        let back = FixedIndex::open(&p).unwrap();
        assert_eq!(back.digests(), idx.digests());
        let err = FixedIndex::open(&dir.path().join("nope.fidx")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
    }

    fn expect_corrupt(bytes: &[u8], needle: &str) {
        let err = FixedIndex::parse(bytes, "bad.fidx").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt, "{}", err.message);
        assert!(err.message.contains("bad.fidx"), "{}", err.message);
        assert!(err.message.contains(needle), "{}", err.message);
    }

    #[test]
    fn bad_inputs_are_corrupt_and_name_the_file() {
        let good = sample(2 * CS + 1).encode();
        // Truncated header and truncated body.
        expect_corrupt(&good[..100], "truncated");
        expect_corrupt(&good[..good.len() - 1], "body");
        // Extra trailing bytes.
        let mut long = good.clone();
        long.push(0);
        expect_corrupt(&long, "body");
        // Wrong magic (a dynamic index is not a fixed one).
        let mut bad = good.clone();
        bad[..8].copy_from_slice(&crate::store::blob::DYNAMIC_INDEX_MAGIC);
        expect_corrupt(&bad, "magic");
        // Wrong checksum: a flipped digest byte.
        let mut bad = good.clone();
        bad[4096 + 5] ^= 1;
        expect_corrupt(&bad, "checksum");
        // Size that does not match the body.
        let mut bad = good.clone();
        bad[64..72].copy_from_slice(&(10 * CS).to_le_bytes());
        expect_corrupt(&bad, "body");
        // Insane chunk sizes.
        for cs in [0u64, 1000, 4096, 32 << 20, u64::MAX] {
            let mut bad = good.clone();
            bad[72..80].copy_from_slice(&cs.to_le_bytes());
            expect_corrupt(&bad, "chunk size");
        }
        // A size so large that the digest count overflows.
        let mut bad = good.clone();
        bad[64..72].copy_from_slice(&u64::MAX.to_le_bytes());
        expect_corrupt(&bad, "body");
    }
}
