//! Dynamic index (`.didx`, pxar archives and catalogs): a 4096-byte header
//! (magic, uuid, ctime, index_csum) followed by 40-byte entries
//! `{end offset u64 LE (exclusive, cumulative), digest}`; index_csum is
//! SHA-256 over the entries as stored. Validated on open (offsets strictly
//! increasing, no chunk over 16 MiB); `write` is for writers/tests only.

use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::store::blob::DYNAMIC_INDEX_MAGIC;
use crate::store::index::{ChunkIndex, IndexHeader, NO_DIGEST};
use crate::store::index_body::{self, Body};
use crate::store::{atomic_file, digest_hex, sha256, Digest, MAX_CHUNK_SIZE};

const ENTRY_SIZE: usize = 40;

/// A validated dynamic-size chunk index.
#[derive(Debug, Clone)]
pub struct DynamicIndex {
    name: String,
    header: IndexHeader,
    /// The 40-byte entries: exclusive end offset of the chunk (u64 LE,
    /// strictly increasing) and its digest.
    body: Body,
}

/// The end offset of an entry.
fn end_of(entry: &[u8; ENTRY_SIZE]) -> u64 {
    let mut e = [0u8; 8];
    e.copy_from_slice(&entry[..8]);
    u64::from_le_bytes(e)
}

impl DynamicIndex {
    /// Reads and validates the index file at `path` (mapped, if large).
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let (header, _, body) = index_body::load(path, &DYNAMIC_INDEX_MAGIC, "dynamic", &name)?;
        Self::check(header, body, &name)
    }

    /// Validates an index held in memory; `name` names it in errors.
    pub fn parse(bytes: &[u8], name: &str) -> Result<Self> {
        let (header, _, body) = index_body::split(bytes, &DYNAMIC_INDEX_MAGIC, "dynamic", name)?;
        Self::check(header, body, name)
    }

    /// Validates the entries: whole, their checksum, their offsets.
    fn check(header: IndexHeader, body: Body, name: &str) -> Result<Self> {
        let body_len = body.bytes().len();
        if !body_len.is_multiple_of(ENTRY_SIZE) {
            return Err(Error::corrupt(format!(
                "{name}: body of {body_len} bytes is not a whole number of {ENTRY_SIZE}-byte entries"
            )));
        }
        let csum = sha256(body.bytes());
        if csum != header.index_csum {
            return Err(Error::corrupt(format!(
                "{name}: index checksum mismatch (header {}, entries hash to {})",
                digest_hex(&header.index_csum),
                digest_hex(&csum)
            )));
        }
        let idx = DynamicIndex {
            name: name.to_string(),
            header,
            body,
        };
        let mut prev = 0u64;
        for (i, entry) in idx.entries().iter().enumerate() {
            let end = end_of(entry);
            check_chunk(name, i, prev, end)?;
            prev = end;
        }
        Ok(idx)
    }

    fn entries(&self) -> &[[u8; ENTRY_SIZE]] {
        self.body.bytes().as_chunks::<ENTRY_SIZE>().0
    }

    /// Builds an index from `(end offset, digest)` entries.
    pub fn new(name: &str, entries: &[(u64, Digest)], uuid: [u8; 16], ctime: i64) -> Result<Self> {
        let mut prev = 0;
        for (i, (end, _)) in entries.iter().enumerate() {
            check_chunk(name, i, prev, *end)?;
            prev = *end;
        }
        let mut body = Vec::with_capacity(entries.len() * ENTRY_SIZE);
        for (end, d) in entries {
            body.extend_from_slice(&end.to_le_bytes());
            body.extend_from_slice(d);
        }
        Ok(DynamicIndex {
            name: name.to_string(),
            header: IndexHeader {
                magic: DYNAMIC_INDEX_MAGIC,
                uuid,
                ctime,
                index_csum: sha256(&body),
            },
            body: Body::Owned(body),
        })
    }

    /// The file bytes of this index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header.encode();
        out.extend_from_slice(self.body.bytes());
        out
    }

    /// Writes the index atomically (temp file + rename, fsynced).
    pub fn write(&self, path: &Path) -> Result<()> {
        atomic_file::write(path, &self.encode(), true)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// SHA-256 over the entries, as stored in the header and the manifest.
    pub fn index_csum(&self) -> &Digest {
        &self.header.index_csum
    }
    pub fn uuid(&self) -> &[u8; 16] {
        &self.header.uuid
    }
    pub fn ctime(&self) -> i64 {
        self.header.ctime
    }
}

fn check_chunk(name: &str, i: usize, prev: u64, end: u64) -> Result<()> {
    if end <= prev {
        return Err(Error::corrupt(format!(
            "{name}: entry {i} ends at {end}, not after the previous end {prev} \
             (offsets must be strictly increasing)"
        )));
    }
    if end - prev > MAX_CHUNK_SIZE as u64 {
        return Err(Error::corrupt(format!(
            "{name}: entry {i} is a chunk of {} bytes, over the limit of {MAX_CHUNK_SIZE}",
            end - prev
        )));
    }
    Ok(())
}

impl ChunkIndex for DynamicIndex {
    fn size(&self) -> u64 {
        self.entries().last().map_or(0, end_of)
    }
    fn chunk_count(&self) -> usize {
        self.entries().len()
    }
    fn chunk_range(&self, i: usize) -> Range<u64> {
        let size = self.size();
        let entries = self.entries();
        let start = match i.checked_sub(1) {
            None => 0,
            Some(p) => entries.get(p).map_or(size, end_of),
        };
        let end = entries.get(i).map_or(size, end_of);
        start..end
    }
    fn chunk_digest(&self, i: usize) -> &Digest {
        self.entries()
            .get(i)
            .and_then(|e| e[8..].try_into().ok())
            .unwrap_or(&NO_DIGEST)
    }
    fn chunk_at(&self, offset: u64) -> Option<usize> {
        let entries = self.entries();
        let i = entries.partition_point(|e| end_of(e) <= offset);
        (i < entries.len()).then_some(i)
    }
    fn fixed_chunk_size(&self) -> Option<u64> {
        None
    }
    fn memory_bytes(&self) -> usize {
        self.body.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn sample() -> DynamicIndex {
        let entries = [
            (100, sha256(b"a")),
            (1_000_000, sha256(b"b")),
            (1_000_001, sha256(b"c")),
        ];
        DynamicIndex::new("t.didx", &entries, [1; 16], 42).unwrap()
    }

    #[test]
    fn round_trip_and_lookup() {
        let bytes = sample().encode();
        assert_eq!(bytes.len(), 4096 + 3 * 40);
        assert_eq!(bytes[..8], DYNAMIC_INDEX_MAGIC);
        // The checksum covers end_le || digest for each entry.
        let mut manual = Vec::new();
        for (end, d) in [(100u64, b"a"), (1_000_000, b"b"), (1_000_001, b"c")] {
            manual.extend_from_slice(&end.to_le_bytes());
            manual.extend_from_slice(&sha256(d));
        }
        assert_eq!(bytes[32..64], sha256(&manual));
        let idx = DynamicIndex::parse(&bytes, "t.didx").unwrap();
        assert_eq!(idx.size(), 1_000_001);
        assert_eq!(idx.chunk_count(), 3);
        assert_eq!(idx.chunk_range(0), 0..100);
        assert_eq!(idx.chunk_range(1), 100..1_000_000);
        assert_eq!(idx.chunk_range(2), 1_000_000..1_000_001);
        assert_eq!(idx.chunk_range(3), 1_000_001..1_000_001);
        assert_eq!(idx.chunk_at(0), Some(0));
        assert_eq!(idx.chunk_at(99), Some(0));
        assert_eq!(idx.chunk_at(100), Some(1));
        assert_eq!(idx.chunk_at(999_999), Some(1));
        assert_eq!(idx.chunk_at(1_000_000), Some(2));
        assert_eq!(idx.chunk_at(1_000_001), None);
        assert_eq!(idx.chunk_digest(1), &sha256(b"b"));
        assert_eq!(idx.fixed_chunk_size(), None);
        assert_eq!(idx.ctime(), 42);
    }

    #[test]
    fn write_and_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.pxar.didx");
        sample().write(&p).unwrap();
        assert_eq!(DynamicIndex::open(&p).unwrap().chunk_count(), 3);
        let empty = DynamicIndex::new("e", &[], [0; 16], 0).unwrap();
        let back = DynamicIndex::parse(&empty.encode(), "e").unwrap();
        assert_eq!((back.size(), back.chunk_at(0)), (0, None));
    }

    fn expect_corrupt(bytes: &[u8], needle: &str) {
        let err = DynamicIndex::parse(bytes, "bad.didx").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt, "{}", err.message);
        assert!(err.message.contains("bad.didx"), "{}", err.message);
        assert!(err.message.contains(needle), "{}", err.message);
    }

    /// Rewrites the header checksum so only the intended defect remains.
    fn fix_csum(bytes: &mut [u8]) {
        let csum = sha256(&bytes[4096..]);
        bytes[32..64].copy_from_slice(&csum);
    }

    #[test]
    fn bad_inputs_are_corrupt_and_name_the_file() {
        let good = sample().encode();
        expect_corrupt(&good[..4095], "truncated");
        expect_corrupt(&good[..good.len() - 1], "entries");
        let mut bad = good.clone();
        bad[..8].copy_from_slice(&crate::store::blob::FIXED_INDEX_MAGIC);
        expect_corrupt(&bad, "magic");
        let mut bad = good.clone();
        bad[4096 + 20] ^= 1;
        expect_corrupt(&bad, "checksum");
        // Non-monotonic offsets: the second entry ends before the first.
        let mut bad = good.clone();
        bad[4096 + 40..4096 + 48].copy_from_slice(&50u64.to_le_bytes());
        fix_csum(&mut bad);
        expect_corrupt(&bad, "strictly increasing");
        // An empty chunk (equal offsets).
        let mut bad = good.clone();
        bad[4096 + 40..4096 + 48].copy_from_slice(&100u64.to_le_bytes());
        fix_csum(&mut bad);
        expect_corrupt(&bad, "strictly increasing");
        // A first chunk ending at 0.
        let mut bad = good.clone();
        bad[4096..4096 + 8].copy_from_slice(&0u64.to_le_bytes());
        fix_csum(&mut bad);
        expect_corrupt(&bad, "strictly increasing");
        // A chunk over 16 MiB.
        let mut bad = good.clone();
        bad[4096 + 40..4096 + 48].copy_from_slice(&(100 + (16u64 << 20) + 1).to_le_bytes());
        bad[4096 + 80..4096 + 88].copy_from_slice(&(200 + (16u64 << 20)).to_le_bytes());
        fix_csum(&mut bad);
        expect_corrupt(&bad, "over the limit");
    }
}
