//! LZX as Windows' system compression (see [`super::wof`]) and WIM use it:
//! chunks of 32 KiB, each decoded on its own (a 32 KiB window, code lengths
//! and repeated offsets starting afresh), with the x86 call translation
//! (E8) always undone afterwards.
//!
//! Owns decoding one chunk: blocks (verbatim, aligned offset or stored),
//! each with its size (one bit for the default 32 KiB, else 16 bits), Huffman
//! code lengths sent as differences through a pretree, matches of 2 bytes
//! on with three repeated offsets. The bit stream is that of
//! [`super::xpress`]: 16-bit little-endian words read from the high bit
//! down. Knows nothing of files; never reads or writes outside its
//! buffers; input that runs short reads as zero bits; what cannot be
//! decoded is an error.

use super::xpress::{Bits, Code};

/// The chunk (and window) size.
const WINDOW: usize = 32 << 10;
/// Offset slots of a 32 KiB window.
const OFFSET_SLOTS: usize = 30;
/// Main code symbols: literals, then 8 length headers per offset slot.
const MAIN_SYMBOLS: usize = 256 + 8 * OFFSET_SLOTS;
/// Length code symbols.
const LENGTH_SYMBOLS: usize = 249;
/// Pretree symbols.
const PRE_SYMBOLS: usize = 20;
/// Aligned offset symbols.
const ALIGNED_SYMBOLS: usize = 8;
/// Shortest match.
const MIN_MATCH: usize = 2;
/// Offsets are sent 2 more than they are (0..2 name the repeated ones).
const OFFSET_ADJUSTMENT: usize = 2;
/// The file size the E8 translation assumes in WIM and WOF.
const E8_FILE_SIZE: i32 = 12_000_000;

/// The smallest formatted offset of each slot, and its extra bits.
fn slot(s: usize) -> (usize, u32) {
    if s < 4 {
        return (s, 0);
    }
    let extra = (s as u32 - 2) / 2;
    ((2 + (s & 1)) << extra, extra)
}

/// Decodes one chunk of `input` into all of `out` (at most 32 KiB).
pub fn decompress(input: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    if out.len() > WINDOW {
        return Err("an LZX chunk larger than its window");
    }
    let mut bits = Bits::new(input);
    let mut main_lens = [0u8; MAIN_SYMBOLS];
    let mut length_lens = [0u8; LENGTH_SYMBOLS];
    let mut recent = [1usize; 3];
    let mut pos = 0;
    while pos < out.len() {
        bits.ensure(4);
        let kind = bits.pop(3);
        let size = if bits.pop(1) == 1 {
            WINDOW
        } else {
            bits.ensure(16);
            bits.pop(16) as usize
        };
        if size == 0 || size > out.len() - pos {
            return Err("an LZX block larger than its chunk");
        }
        let end = pos + size;
        match kind {
            1 | 2 => {
                let aligned = if kind == 2 {
                    let mut lens = [0u8; ALIGNED_SYMBOLS];
                    for l in &mut lens {
                        bits.ensure(3);
                        *l = bits.pop(3) as u8;
                    }
                    Some(Code::new(&lens).ok_or("an LZX aligned offset code is no prefix code")?)
                } else {
                    None
                };
                read_lens(&mut bits, &mut main_lens[..256])?;
                read_lens(&mut bits, &mut main_lens[256..])?;
                read_lens(&mut bits, &mut length_lens)?;
                let main = Code::new(&main_lens).ok_or("an LZX main code is no prefix code")?;
                let length = if length_lens.iter().all(|&l| l == 0) {
                    None
                } else {
                    Some(Code::new(&length_lens).ok_or("an LZX length code is no prefix code")?)
                };
                while pos < end {
                    let sym = main.decode(&mut bits).ok_or("LZX bits that are no code")?;
                    if sym < 256 {
                        out[pos] = sym as u8;
                        pos += 1;
                        continue;
                    }
                    let sym = sym - 256;
                    let (offset_slot, mut len) = (sym >> 3, sym & 7);
                    if len == 7 {
                        let code = length
                            .as_ref()
                            .ok_or("an LZX match without a length code")?;
                        len += code.decode(&mut bits).ok_or("LZX bits that are no code")?;
                    }
                    len += MIN_MATCH;
                    let offset = if offset_slot < 3 {
                        // the offset used moves to the front
                        recent.swap(offset_slot, 0);
                        recent[0]
                    } else {
                        let (base, extra) = slot(offset_slot);
                        let formatted = match &aligned {
                            Some(code) if extra >= 3 => {
                                bits.ensure(extra - 3);
                                let high = bits.pop(extra - 3) as usize;
                                let low =
                                    code.decode(&mut bits).ok_or("LZX bits that are no code")?;
                                base + (high << 3) + low
                            }
                            _ => {
                                bits.ensure(extra);
                                base + bits.pop(extra) as usize
                            }
                        };
                        let offset = formatted - OFFSET_ADJUSTMENT;
                        recent = [offset, recent[0], recent[1]];
                        offset
                    };
                    if offset == 0 || offset > pos || len > out.len() - pos {
                        return Err("an LZX match reaches outside its chunk");
                    }
                    for i in pos..pos + len {
                        out[i] = out[i - offset];
                    }
                    pos += len;
                }
                if pos != end {
                    return Err("an LZX match runs past its block");
                }
            }
            3 => {
                // stored: aligned to a word, the repeated offsets, the bytes
                // and a pad byte after an odd count
                bits.align();
                for r in &mut recent {
                    *r = bits.word32().ok_or("an LZX stored block cut short")? as usize;
                }
                let data = bits.bytes(size).ok_or("an LZX stored block cut short")?;
                out[pos..end].copy_from_slice(data);
                if size % 2 == 1 {
                    bits.bytes(1);
                }
                pos = end;
            }
            _ => return Err("an LZX block of an unknown type"),
        }
    }
    undo_e8(out);
    Ok(())
}

/// Reads code lengths through a pretree: each new length is sent as its
/// difference from the old one (mod 17), with runs of zeros and of equal
/// lengths.
fn read_lens(bits: &mut Bits<'_>, lens: &mut [u8]) -> Result<(), &'static str> {
    let mut pre_lens = [0u8; PRE_SYMBOLS];
    for l in &mut pre_lens {
        bits.ensure(4);
        *l = bits.pop(4) as u8;
    }
    let pre = Code::new(&pre_lens).ok_or("an LZX pretree is no prefix code")?;
    let mut i = 0;
    while i < lens.len() {
        let sym = pre.decode(bits).ok_or("LZX bits that are no code")?;
        let (run, value) = match sym {
            0..=16 => (1, (17 + lens[i] as usize - sym) % 17),
            17 => {
                bits.ensure(4);
                (4 + bits.pop(4) as usize, 0)
            }
            18 => {
                bits.ensure(5);
                (20 + bits.pop(5) as usize, 0)
            }
            _ => {
                bits.ensure(1);
                let run = 4 + bits.pop(1) as usize;
                let sym = pre.decode(bits).ok_or("LZX bits that are no code")?;
                if sym > 17 {
                    return Err("an LZX code length run of no length");
                }
                (run, (17 + lens[i] as usize - sym) % 17)
            }
        };
        let end = (i + run).min(lens.len());
        lens[i..end].fill(value as u8);
        i = end;
    }
    Ok(())
}

/// Turns the absolute targets the encoder wrote after each 0xE8 byte (an
/// x86 call) back into the relative ones they were.
fn undo_e8(data: &mut [u8]) {
    if data.len() <= 10 {
        return;
    }
    let mut i = 0;
    while i < data.len() - 10 {
        if data[i] == 0xE8 {
            let at = i as i32;
            let field = &mut data[i + 1..i + 5];
            let abs = i32::from_le_bytes([field[0], field[1], field[2], field[3]]);
            let rel = if abs >= 0 {
                (abs < E8_FILE_SIZE).then(|| abs - at)
            } else {
                (abs >= -at).then(|| abs + E8_FILE_SIZE)
            };
            if let Some(rel) = rel {
                field.copy_from_slice(&rel.to_le_bytes());
            }
            i += 5;
        } else {
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_slots_follow_the_format() {
        let want = [
            (0, 0),
            (1, 0),
            (2, 0),
            (3, 0),
            (4, 1),
            (6, 1),
            (8, 2),
            (12, 2),
            (16, 3),
            (24, 3),
        ];
        for (s, w) in want.iter().enumerate() {
            assert_eq!(slot(s), *w, "slot {s}");
        }
        assert_eq!(slot(29), (24576, 13));
    }

    #[test]
    fn e8_targets_are_made_relative_again() {
        let mut d = vec![0u8; 32];
        d[3] = 0xE8;
        d[4..8].copy_from_slice(&100i32.to_le_bytes());
        d[20] = 0xE8;
        d[21..25].copy_from_slice(&(-5i32).to_le_bytes());
        undo_e8(&mut d);
        assert_eq!(i32::from_le_bytes(d[4..8].try_into().unwrap()), 97);
        assert_eq!(
            i32::from_le_bytes(d[21..25].try_into().unwrap()),
            E8_FILE_SIZE - 5
        );
    }

    /// Random chunks decode or fail, never panic.
    #[test]
    fn random_chunks_never_panic() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..3000 {
            let input: Vec<u8> = (0..(x % 700))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut out = vec![0u8; (x % 40_000) as usize];
            let _ = decompress(&input, &mut out);
        }
    }
}
