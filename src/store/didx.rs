//! Dynamic index (`.didx`, pxar archives and catalogs): a 4096-byte header
//! (magic, uuid, ctime, index_csum) followed by 40-byte entries
//! `{end offset u64 LE (exclusive, cumulative), digest}`; index_csum is
//! SHA-256 over the entries as stored. Validated on open (offsets strictly
//! increasing, no chunk over 16 MiB); `write` is for writers/tests only.

use std::io::Read;
use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::store::blob::DYNAMIC_INDEX_MAGIC;
use crate::store::index::{
    check_end, open_index_file, read_body, read_header, ChunkIndex, IndexHeader, NO_DIGEST,
};
use crate::store::{atomic_file, digest_hex, sha256, Digest, MAX_CHUNK_SIZE};

const ENTRY_SIZE: usize = 40;
/// Entries read at a time while opening (64 KiB).
const PIECE_ENTRIES: usize = 1638;

/// A validated dynamic-size chunk index.
#[derive(Debug, Clone)]
pub struct DynamicIndex {
    name: String,
    header: IndexHeader,
    /// Exclusive end offset of each chunk, strictly increasing.
    ends: Vec<u64>,
    digests: Vec<Digest>,
}

impl DynamicIndex {
    /// Reads and validates the index file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let (mut file, len) = open_index_file(path)?;
        Self::read(&mut file, len, &path.display().to_string())
    }

    /// Validates an index held in memory; `name` names it in errors.
    pub fn parse(bytes: &[u8], name: &str) -> Result<Self> {
        Self::read(&mut &bytes[..], bytes.len() as u64, name)
    }

    /// Reads and validates an index of `len` bytes from `r`, the entries a
    /// piece at a time into the vectors kept, so that opening takes no
    /// more memory than the index keeps.
    fn read(r: &mut dyn Read, len: u64, name: &str) -> Result<Self> {
        use sha2::Digest as _;
        let (header, _, body_len) = read_header(r, len, &DYNAMIC_INDEX_MAGIC, "dynamic", name)?;
        if body_len % ENTRY_SIZE as u64 != 0 {
            return Err(Error::corrupt(format!(
                "{name}: body of {body_len} bytes is not a whole number of {ENTRY_SIZE}-byte entries"
            )));
        }
        let n = usize::try_from(body_len / ENTRY_SIZE as u64)
            .map_err(|_| Error::unsupported(format!("{name}: {body_len}-byte index")))?;
        let mut ends = Vec::with_capacity(n);
        let mut digests = Vec::with_capacity(n);
        let mut hasher = sha2::Sha256::new();
        let mut piece = vec![0u8; PIECE_ENTRIES * ENTRY_SIZE];
        while ends.len() < n {
            let k = PIECE_ENTRIES.min(n - ends.len());
            let piece = piece.get_mut(..k * ENTRY_SIZE).unwrap_or_default();
            read_body(r, piece, name)?;
            hasher.update(&*piece);
            for entry in piece.chunks_exact(ENTRY_SIZE) {
                let (end, digest) = entry.split_at(8);
                let mut e = [0u8; 8];
                e.copy_from_slice(end);
                let mut d = [0u8; 32];
                d.copy_from_slice(digest);
                ends.push(u64::from_le_bytes(e));
                digests.push(d);
            }
        }
        check_end(r, name)?;
        let csum: Digest = hasher.finalize().into();
        if csum != header.index_csum {
            return Err(Error::corrupt(format!(
                "{name}: index checksum mismatch (header {}, entries hash to {})",
                digest_hex(&header.index_csum),
                digest_hex(&csum)
            )));
        }
        let mut prev = 0u64;
        for (i, &end) in ends.iter().enumerate() {
            check_chunk(name, i, prev, end)?;
            prev = end;
        }
        Ok(DynamicIndex {
            name: name.to_string(),
            header,
            ends,
            digests,
        })
    }

    /// Builds an index from `(end offset, digest)` entries.
    pub fn new(name: &str, entries: &[(u64, Digest)], uuid: [u8; 16], ctime: i64) -> Result<Self> {
        let mut prev = 0;
        for (i, (end, _)) in entries.iter().enumerate() {
            check_chunk(name, i, prev, *end)?;
            prev = *end;
        }
        let mut idx = DynamicIndex {
            name: name.to_string(),
            header: IndexHeader {
                magic: DYNAMIC_INDEX_MAGIC,
                uuid,
                ctime,
                index_csum: [0; 32],
            },
            ends: entries.iter().map(|e| e.0).collect(),
            digests: entries.iter().map(|e| e.1).collect(),
        };
        idx.header.index_csum = sha256(&idx.body());
        Ok(idx)
    }

    fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.ends.len() * ENTRY_SIZE);
        for (end, d) in self.ends.iter().zip(&self.digests) {
            body.extend_from_slice(&end.to_le_bytes());
            body.extend_from_slice(d);
        }
        body
    }

    /// The file bytes of this index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header.encode();
        out.extend_from_slice(&self.body());
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
        self.ends.last().copied().unwrap_or(0)
    }
    fn chunk_count(&self) -> usize {
        self.ends.len()
    }
    fn chunk_range(&self, i: usize) -> Range<u64> {
        let size = self.size();
        let start = match i.checked_sub(1) {
            None => 0,
            Some(p) => self.ends.get(p).copied().unwrap_or(size),
        };
        let end = self.ends.get(i).copied().unwrap_or(size);
        start..end
    }
    fn chunk_digest(&self, i: usize) -> &Digest {
        self.digests.get(i).unwrap_or(&NO_DIGEST)
    }
    fn chunk_at(&self, offset: u64) -> Option<usize> {
        let i = self.ends.partition_point(|&end| end <= offset);
        (i < self.ends.len()).then_some(i)
    }
    fn fixed_chunk_size(&self) -> Option<u64> {
        None
    }
    fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(self.ends.as_slice()) + std::mem::size_of_val(self.digests.as_slice())
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
