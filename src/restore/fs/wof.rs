//! Windows' system compression ("Compact OS", the WOF filter's file
//! provider): a file whose reparse point names the provider and a format
//! keeps its data compressed in its `WofCompressedData` stream, its unnamed
//! stream being sparse with the file's size.
//!
//! Owns: reading that reparse point, and finding a chunk in the stream.
//! The stream is a table of the chunks' end offsets (after the first
//! chunk; 4 bytes each, 8 for files of 4 GiB or more, counted from the
//! table's end), then the chunks, each the file's next `chunk_size` bytes
//! (the last: what remains), stored as they are when compressing did not
//! make them smaller. Reads go through the caller; this module only does
//! the arithmetic and checks every offset against the stream.

use crate::error::{Error, Result};

/// The reparse tag of the WOF filter.
const TAG_WOF: u32 = 0x8000_0017;
/// The WOF provider of system-compressed files.
const PROVIDER_FILE: u32 = 2;

/// How a system-compressed file is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// XPRESS Huffman in chunks of this many bytes (4, 8 or 16 KiB)
    Xpress(u32),
    /// LZX in 32 KiB chunks
    Lzx,
}

impl Format {
    /// The uncompressed bytes of each chunk.
    pub fn chunk_size(self) -> u64 {
        match self {
            Format::Xpress(n) => u64::from(n),
            Format::Lzx => 32 << 10,
        }
    }
}

/// The format of a system-compressed file from its reparse data; `None`
/// for any other reparse point.
pub fn format_of(reparse: &[u8]) -> Option<Format> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            reparse.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    // tag, data length and reserved; WOF version and provider; the file
    // provider's version and format
    if word(0)? != TAG_WOF || word(8)? != 1 || word(12)? != PROVIDER_FILE || word(16)? != 1 {
        return None;
    }
    Some(match word(20)? {
        0 => Format::Xpress(4 << 10),
        1 => Format::Lzx,
        2 => Format::Xpress(8 << 10),
        3 => Format::Xpress(16 << 10),
        _ => return None,
    })
}

/// Where chunk `index` of a file of `size` bytes lies in its compressed
/// stream of `stored` bytes, and how many bytes it decodes to: (offset in
/// the stream, stored length, decoded length). `read(offset, buf)` reads
/// the stream.
pub fn chunk(
    format: Format,
    size: u64,
    stored: u64,
    index: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<(u64, u64, u64)> {
    let bad = |why: &str| Error::corrupt(format!("system-compressed data: {why}"));
    let chunk_size = format.chunk_size();
    let chunks = size.div_ceil(chunk_size);
    if index >= chunks {
        return Err(bad("a chunk past the end of the file"));
    }
    let entry: u64 = if size > u64::from(u32::MAX) { 8 } else { 4 };
    let table = (chunks - 1) * entry;
    let mut end_of = |i: u64| -> Result<u64> {
        if i + 1 == chunks {
            return Ok(stored);
        }
        let mut b = [0u8; 8];
        let b = &mut b[..entry as usize];
        read(i * entry, b)?;
        let mut word = [0u8; 8];
        word[..b.len()].copy_from_slice(b);
        table
            .checked_add(u64::from_le_bytes(word))
            .ok_or_else(|| bad("a chunk offset out of range"))
    };
    let start = if index == 0 {
        table
    } else {
        end_of(index - 1)?
    };
    let end = end_of(index)?;
    let decoded = chunk_size.min(size - index * chunk_size);
    if start > end || end > stored || end - start > decoded {
        return Err(bad("the chunk table does not fit the stream"));
    }
    Ok((start, end - start, decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reparse(format: u32) -> Vec<u8> {
        let mut d = TAG_WOF.to_le_bytes().to_vec();
        // data length 16 and reserved; WOF version, provider; file
        // provider version, format
        for w in [16u32, 1, 2, 1, format] {
            d.extend_from_slice(&w.to_le_bytes());
        }
        d
    }

    #[test]
    fn formats_are_read_from_the_reparse_point() {
        assert_eq!(format_of(&reparse(0)), Some(Format::Xpress(4096)));
        assert_eq!(format_of(&reparse(1)), Some(Format::Lzx));
        assert_eq!(format_of(&reparse(3)), Some(Format::Xpress(16384)));
        assert_eq!(format_of(&reparse(4)), None);
        let mut wim = reparse(0);
        wim[12] = 1; // the WIM provider (WIMBoot), not system compression
        assert_eq!(format_of(&wim), None);
        assert_eq!(format_of(&reparse(0)[..20]), None);
    }

    #[test]
    fn chunks_are_found_through_the_table() {
        // 3 chunks of a 10,000-byte file: table of 2 entries (8 bytes),
        // then chunks of 100, 4096 (stored) and 50 bytes
        let stream: Vec<u8> = [100u32, 4196]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut read = |at: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&stream[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let f = Format::Xpress(4096);
        let stored = 8 + 4246;
        assert_eq!(
            chunk(f, 10_000, stored, 0, &mut read).unwrap(),
            (8, 100, 4096)
        );
        assert_eq!(
            chunk(f, 10_000, stored, 1, &mut read).unwrap(),
            (108, 4096, 4096)
        );
        assert_eq!(
            chunk(f, 10_000, stored, 2, &mut read).unwrap(),
            (4204, 50, 1808)
        );
        assert!(chunk(f, 10_000, stored, 3, &mut read).is_err());
        // a stream shorter than the table says
        assert!(chunk(f, 10_000, 4000, 1, &mut read).is_err());
    }
}
