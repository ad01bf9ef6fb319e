//! Writing a restored file so that its all-zero blocks become holes: a
//! sparse file in the backup (a VM disk image, a database file) comes back
//! sparse instead of filling the disk with zeros, as `cp --sparse` or
//! `rsync -S` would restore it. The content is the same byte for byte.
//!
//! Only for a file this restore has just created, empty: a skipped block
//! reads as zeros only in a file that never held anything there.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Holes are made of whole blocks of this size, at multiples of it.
const BLOCK: u64 = 4096;

/// A new, empty file written front to back.
pub(crate) struct SparseFile {
    file: File,
    /// Where the next byte goes: the file's length once finished.
    pos: u64,
    /// Bytes up to here are on disk (written, or the file's own end).
    end: u64,
}

impl SparseFile {
    pub(crate) fn new(file: File) -> SparseFile {
        SparseFile {
            file,
            pos: 0,
            end: 0,
        }
    }

    /// Appends `data`. Each run of non-zero data is one positioned write;
    /// whole zero blocks at block boundaries are skipped. Zeros that do not
    /// fill a whole block (also where a block is split between two calls)
    /// are written.
    pub(crate) fn write(&mut self, data: &[u8]) -> io::Result<()> {
        // `data[run..at]` is the run not written yet.
        let (mut run, mut at) = (0usize, 0usize);
        while at < data.len() {
            // Up to the file's next block boundary.
            let to_boundary = BLOCK - (self.pos + at as u64) % BLOCK;
            let piece = (data.len() - at).min(to_boundary as usize);
            if piece as u64 == BLOCK && is_zero(&data[at..at + piece]) {
                self.write_at(&data[run..at], run)?;
                run = at + piece;
            }
            at += piece;
        }
        self.write_at(&data[run..], run)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    /// Moves on to `pos` (at or past the current position): what lies
    /// between stays a hole.
    pub(crate) fn skip_to(&mut self, pos: u64) -> io::Result<()> {
        if pos < self.pos {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "sparse data regions out of order",
            ));
        }
        self.pos = pos;
        Ok(())
    }

    /// Writes `bytes` at `at` bytes past the current position.
    fn write_at(&mut self, bytes: &[u8], at: usize) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let offset = self.pos + at as u64;
        self.file.write_all_at(bytes, offset)?;
        self.end = offset + bytes.len() as u64;
        Ok(())
    }

    /// Gives the file its full length (a trailing hole has no bytes
    /// written) and returns it.
    pub(crate) fn finish(self) -> io::Result<File> {
        if self.pos > self.end {
            self.file.set_len(self.pos)?;
        }
        Ok(self.file)
    }
}

/// Whether a block is all zeros. Data is rarely zero: its first bytes
/// settle most blocks; the rest is one pass the compiler vectorises.
fn is_zero(block: &[u8]) -> bool {
    let head = block.len().min(16);
    block[..head].iter().all(|&b| b == 0) && block.iter().fold(0u8, |acc, &b| acc | b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A file of `blocks` blocks, each zero or not as `pattern` says, with
    /// an odd tail.
    fn content(pattern: &[bool], tail: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, &data) in pattern.iter().enumerate() {
            let fill = if data { (i % 250) as u8 + 1 } else { 0 };
            v.extend(std::iter::repeat_n(fill, BLOCK as usize));
        }
        v.extend(std::iter::repeat_n(7u8, tail));
        v
    }

    fn write_in_pieces(data: &[u8], piece: usize) -> (Vec<u8>, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut f = SparseFile::new(File::create(&path).expect("create"));
        for p in data.chunks(piece.max(1)) {
            f.write(p).expect("write");
        }
        let file = f.finish().expect("finish");
        let allocated = file.metadata().expect("stat").blocks() * 512;
        (std::fs::read(&path).expect("read"), allocated)
    }

    #[test]
    fn the_content_is_the_same_for_any_pieces() {
        let patterns: [&[bool]; 5] = [
            &[true, false, false, true, false, true],
            &[false, false, false, false],
            &[true, true, true],
            &[false, true, false],
            &[],
        ];
        for pattern in patterns {
            for tail in [0, 1, 4095] {
                let data = content(pattern, tail);
                for piece in [1, 100, 4095, 4096, 4097, 10_000, 1 << 20] {
                    let (got, _) = write_in_pieces(&data, piece);
                    assert_eq!(got.len(), data.len(), "{pattern:?} {tail} {piece}");
                    assert!(got == data, "{pattern:?} tail {tail} piece {piece}");
                }
            }
        }
    }

    #[test]
    fn zero_blocks_become_holes() {
        // 1 MiB of data, 64 MiB of zeros, 1 MiB of data, 16 MiB of zeros.
        let blocks = |n: u64, data: bool| vec![data; (n / BLOCK) as usize];
        let pattern = [
            blocks(1 << 20, true),
            blocks(64 << 20, false),
            blocks(1 << 20, true),
            blocks(16 << 20, false),
        ]
        .concat();
        let data = content(&pattern, 0);
        let (got, allocated) = write_in_pieces(&data, 4 << 20);
        assert!(got == data);
        // The filesystem under the temp dir may allocate a little more than
        // the 2 MiB of data, never the zeros.
        assert!(allocated < 8 << 20, "{allocated} bytes allocated");
    }
}
