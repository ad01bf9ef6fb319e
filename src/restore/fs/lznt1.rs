//! LZNT1, the compression of NTFS compressed files.
//!
//! A compressed file is stored in compression units (16 clusters). A unit
//! that compressed well holds a run of chunks: each a 2-byte header (its
//! size less one in the low 12 bits, bit 15 set when compressed) and up to
//! 4 KiB of data, which decodes to 4 KiB of the file (a chunk that decodes
//! to less is padded with zeros); a header of 0 ends the unit early. A
//! compressed chunk is groups of a flag byte and eight items, a literal
//! byte for each clear bit and a 2-byte back-reference for each set one,
//! whose split between offset and length bits depends on how far into the
//! chunk it is. This module only decodes bytes handed to it, never trusting
//! them: a reference before the chunk's start, or a unit that decodes past
//! its size, is an error, never made-up data.

/// Bytes one chunk decodes to.
const CHUNK: usize = 4096;

/// Decodes the compressed unit `src` into `out` (cleared first), which
/// ends up `unit` bytes long: chunks past the data's end, and the rest of
/// a chunk that decodes short, are zeros.
pub fn decompress_unit(src: &[u8], unit: usize, out: &mut Vec<u8>) -> Result<(), &'static str> {
    out.clear();
    let mut rest = src;
    while out.len() < unit {
        let Some((&lo, after)) = rest.split_first() else {
            break;
        };
        let Some((&hi, after)) = after.split_first() else {
            break;
        };
        let header = u16::from_le_bytes([lo, hi]);
        if header == 0 {
            break;
        }
        let size = usize::from(header & 0x0FFF) + 1;
        let data = after.get(..size).ok_or("a chunk runs past its unit")?;
        rest = &after[size..];
        let start = out.len();
        if header & 0x8000 == 0 {
            out.extend_from_slice(data);
        } else {
            decompress_chunk(data, out, start)?;
        }
        if out.len() - start > CHUNK {
            return Err("a chunk decodes to more than 4 KiB");
        }
        out.resize(start + CHUNK, 0);
    }
    if out.len() > unit {
        // the last chunk's padding may pass a short unit's end; data may not
        if out
            .get(unit..)
            .is_some_and(|tail| tail.iter().any(|&b| b != 0))
        {
            return Err("the data decodes past its compression unit");
        }
        out.truncate(unit);
    }
    out.resize(unit, 0);
    Ok(())
}

/// Decodes one compressed chunk onto `out`, whose chunk began at `start`.
fn decompress_chunk(data: &[u8], out: &mut Vec<u8>, start: usize) -> Result<(), &'static str> {
    let mut i = 0;
    while i < data.len() {
        let flags = data[i];
        i += 1;
        for bit in 0..8 {
            if i >= data.len() {
                return Ok(());
            }
            if flags & (1 << bit) == 0 {
                out.push(data[i]);
                i += 1;
                continue;
            }
            let token = data.get(i..i + 2).ok_or("a back-reference is cut off")?;
            let token = u16::from_le_bytes([token[0], token[1]]);
            i += 2;
            let pos = out.len() - start;
            if pos == 0 {
                return Err("a back-reference at the start of a chunk");
            }
            // the further into the chunk, the more bits the offset takes
            let mut length_bits = 12u32;
            let mut p = pos - 1;
            while p >= 0x10 {
                length_bits -= 1;
                p >>= 1;
            }
            let offset = usize::from(token >> length_bits) + 1;
            let length = usize::from(token & ((1u16 << length_bits) - 1)) + 3;
            if offset > pos {
                return Err("a back-reference before the start of its chunk");
            }
            if pos + length > CHUNK {
                return Err("a back-reference past the end of its chunk");
            }
            // byte by byte: the copy may overlap what it writes
            for _ in 0..length {
                let b = out[out.len() - offset];
                out.push(b);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compressed chunk: header, then its items.
    fn chunk(items: &[u8]) -> Vec<u8> {
        let header = 0xB000 | (items.len() as u16 - 1);
        let mut v = header.to_le_bytes().to_vec();
        v.extend_from_slice(items);
        v
    }

    #[test]
    fn literals_and_overlapping_references_decode() {
        // "abc", then a reference 3 back and 6 long: "abcabcabc"
        let unit = chunk(&[0b0000_1000, b'a', b'b', b'c', 0x03, 0x20]);
        let mut out = Vec::new();
        decompress_unit(&unit, CHUNK, &mut out).unwrap();
        assert_eq!(&out[..9], b"abcabcabc");
        assert!(out[9..].iter().all(|&b| b == 0) && out.len() == CHUNK);
    }

    #[test]
    fn stored_chunks_and_an_early_end_are_padded() {
        let mut unit = (0x3000u16 | (CHUNK as u16 - 1)).to_le_bytes().to_vec();
        unit.extend(std::iter::repeat_n(7u8, CHUNK));
        unit.extend_from_slice(&[0, 0]);
        let mut out = Vec::new();
        decompress_unit(&unit, 4 * CHUNK, &mut out).unwrap();
        assert_eq!(out.len(), 4 * CHUNK);
        assert!(out[..CHUNK].iter().all(|&b| b == 7));
        assert!(out[CHUNK..].iter().all(|&b| b == 0));
    }

    #[test]
    fn damaged_data_is_an_error() {
        let mut out = Vec::new();
        // a reference first, one past the start, a cut-off token, a chunk
        // longer than the unit
        for bad in [
            chunk(&[0b0000_0001, 0x00, 0x00]),
            chunk(&[0b0000_0010, b'a', 0x00, 0x10]),
            chunk(&[0b0000_0010, b'a', 0x00]),
        ] {
            assert!(decompress_unit(&bad, CHUNK, &mut out).is_err(), "{bad:?}");
        }
        let mut long = chunk(&[0, b'a']);
        long[0] = 0xFF;
        assert!(decompress_unit(&long, CHUNK, &mut out).is_err());
    }

    /// Whatever the bytes, a unit decodes to its size or to an error.
    #[test]
    fn random_bytes_never_panic() {
        let mut next = crate::testing::xorshift(0x9E37_79B9_7F4A_7C15);
        let mut out = Vec::new();
        for round in 0..2000 {
            let len = 1 + round % 5000;
            let src: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if decompress_unit(&src, 4 * CHUNK, &mut out).is_ok() {
                assert_eq!(out.len(), 4 * CHUNK);
            }
        }
    }
}
