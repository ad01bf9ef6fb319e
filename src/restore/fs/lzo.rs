//! LZO1X, as btrfs stores LZO-compressed extents.
//!
//! An extent is a little-endian 32-bit total length (itself included),
//! then segments: each a 32-bit length and that many bytes of one LZO1X
//! stream, which decodes to at most one sector. A segment's length never
//! straddles a sector: when fewer than 4 bytes are left in one, the next
//! length starts at the next sector.
//!
//! An LZO1X stream is instructions, each a copy of earlier output (a
//! distance and a length) followed by 0 to 3 literal bytes, or a run of 4
//! or more literals; what an opcode below 16 means depends on how many
//! literals came just before it (the state). Lengths that do not fit their
//! opcode continue in bytes: each zero adds 255, the first non-zero one
//! ends them. The instruction of distance 16384 ends the stream (linux's
//! `Documentation/staging/lzo.rst` describes it).
//!
//! This module only decodes bytes handed to it, never trusting them: a
//! copy from before a segment's start, a segment that decodes past its
//! sector, or a stream without its end is an error, never made-up data.

/// Bytes of a length field.
const LEN: usize = 4;

/// Decodes a btrfs LZO extent `src` whose segments decode to at most
/// `sector` bytes each, into at most `limit` bytes.
pub fn decompress_extent(src: &[u8], sector: usize, limit: usize) -> Result<Vec<u8>, &'static str> {
    let le = |at: usize| -> Result<usize, &'static str> {
        src.get(at..at + LEN)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("a length past the extent's end")
    };
    let total = le(0)?;
    if total > src.len() || total < LEN {
        return Err("a total length past the extent");
    }
    let mut out = Vec::new();
    let mut at = LEN;
    while at < total && out.len() < limit {
        let seg = le(at)?;
        at += LEN;
        let data = at
            .checked_add(seg)
            .filter(|&end| end <= total)
            .and_then(|end| src.get(at..end))
            .ok_or("a segment past the extent's end")?;
        decompress(data, &mut out, sector)?;
        at += seg;
        let left = sector - at % sector;
        if left < LEN {
            at += left;
        }
    }
    out.truncate(limit);
    Ok(out)
}

/// Appends what the LZO1X stream `src` decodes to (at most `most` bytes)
/// to `out`; copies reach no further back than the stream's own output.
pub fn decompress(src: &[u8], out: &mut Vec<u8>, most: usize) -> Result<(), &'static str> {
    let base = out.len();
    let mut d = Decoder { src, at: 0 };
    // literals copied by the previous instruction: 0, 1-3, or 4 for a run
    let mut state = 0usize;
    let first = d.peek()?;
    if first > 17 {
        d.at += 1;
        let n = usize::from(first - 17);
        d.literals(out, n, base + most)?;
        state = n.min(4);
    }
    loop {
        let op = d.byte()?;
        let (dist, len, next);
        match op {
            0..=15 if state == 0 => {
                let n = 3 + if op == 0 {
                    15 + d.long()?
                } else {
                    usize::from(op)
                };
                d.literals(out, n, base + most)?;
                state = 4;
                continue;
            }
            0..=15 => {
                let h = usize::from(d.byte()?);
                let low = usize::from(op >> 2 & 3);
                if state == 4 {
                    (dist, len) = ((h << 2) + low + 2049, 3);
                } else {
                    (dist, len) = ((h << 2) + low + 1, 2);
                }
                next = usize::from(op & 3);
            }
            16..=31 => {
                let l = usize::from(op & 7);
                let len_ = 2 + if l == 0 { 7 + d.long()? } else { l };
                let word = d.word()?;
                let far = 16384 + (usize::from(op & 8) << 11) + (word >> 2);
                if far == 16384 {
                    return if len_ == 3 {
                        Ok(())
                    } else {
                        Err("a bad end of stream")
                    };
                }
                (dist, len, next) = (far, len_, word & 3);
            }
            32..=63 => {
                let l = usize::from(op & 31);
                len = 2 + if l == 0 { 31 + d.long()? } else { l };
                let word = d.word()?;
                (dist, next) = ((word >> 2) + 1, word & 3);
            }
            64..=127 => {
                let h = usize::from(d.byte()?);
                len = 3 + usize::from(op >> 5 & 1);
                dist = (h << 3) + usize::from(op >> 2 & 7) + 1;
                next = usize::from(op & 3);
            }
            128..=255 => {
                let h = usize::from(d.byte()?);
                len = 5 + usize::from(op >> 5 & 3);
                dist = (h << 3) + usize::from(op >> 2 & 7) + 1;
                next = usize::from(op & 3);
            }
        }
        if dist > out.len() - base {
            return Err("a copy from before the stream's start");
        }
        if out.len() + len > base + most {
            return Err("a stream that decodes past its sector");
        }
        let from = out.len() - dist;
        // a copy may overlap what it makes: byte by byte
        for i in 0..len {
            let b = out[from + i];
            out.push(b);
        }
        d.literals(out, next, base + most)?;
        state = next;
    }
}

struct Decoder<'a> {
    src: &'a [u8],
    at: usize,
}

impl Decoder<'_> {
    fn peek(&self) -> Result<u8, &'static str> {
        self.src.get(self.at).copied().ok_or("a stream cut short")
    }

    fn byte(&mut self) -> Result<u8, &'static str> {
        let b = self.peek()?;
        self.at += 1;
        Ok(b)
    }

    fn word(&mut self) -> Result<usize, &'static str> {
        let lo = self.byte()?;
        let hi = self.byte()?;
        Ok(usize::from(u16::from_le_bytes([lo, hi])))
    }

    /// The rest of a length that did not fit its opcode: 255 for each zero
    /// byte, then the first non-zero one.
    fn long(&mut self) -> Result<usize, &'static str> {
        let mut n = 0usize;
        loop {
            match self.byte()? {
                0 => n = n.checked_add(255).ok_or("a length past any stream")?,
                b => return Ok(n + usize::from(b)),
            }
        }
    }

    fn literals(&mut self, out: &mut Vec<u8>, n: usize, end: usize) -> Result<(), &'static str> {
        if out.len() + n > end {
            return Err("a stream that decodes past its sector");
        }
        let lit = self
            .src
            .get(self.at..self.at + n)
            .ok_or("literals past the stream's end")?;
        out.extend_from_slice(lit);
        self.at += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `lzop -1` (LZO1X-1) made of the text [`text`] makes: one
    /// block of its file, as btrfs keeps one segment.
    const LZOP_BLOCK: &[&str] = &[
        "000b6c696e652030206f6620736f6d6520746578742c20726570656174656498012811000a910531200bb100",
        "32200bb10033200bb10034200bb10035200bb10036200bb10037200bb10038200bb10039200bb10031200d08",
        "07200c0d0731200c110731200c150731200c190731200c1d0731200c210731200c250731200c290731200c2d",
        "0732200c2d0732200c2d0732200c2d0732200c2d0732200c2d0732200c2d0732200c2d0732200c2d0732200c",
        "2d0732200c2d0733200c2d0733200c2d0733200c2d0733200c2d0733200c2d0733200c2d0733200c2c07200c",
        "0005200cfc04200df804200b3416200cf004200cec04200ce804200c140c200c100c200c0c0c200000000000",
        "0000726c1a0e20746578742c2072657065617465642074110000",
    ];

    fn lzop_block() -> Vec<u8> {
        let hex: String = LZOP_BLOCK.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn text() -> Vec<u8> {
        let all: String = (0..200)
            .map(|i| format!("line {} of some text, repeated text text text\n", i % 37))
            .collect();
        all.as_bytes()[..4096].to_vec()
    }

    /// A stream of `n` literals only (a long literal run, then the end).
    fn literal_stream(n: usize, byte: u8) -> Vec<u8> {
        assert!(n >= 18);
        let mut s = vec![0u8];
        let mut rest = n - 18;
        while rest >= 255 {
            s.push(0);
            rest -= 255;
        }
        // a zero would continue the length: this one ends it
        assert!(rest > 0, "pick another length");
        s.push(rest as u8);
        s.extend(std::iter::repeat_n(byte, n));
        s.extend([0x11, 0, 0]);
        s
    }

    #[test]
    fn decodes_what_lzop_made() {
        let mut out = b"before".to_vec();
        decompress(&lzop_block(), &mut out, 4096).unwrap();
        assert_eq!(&out[..6], b"before");
        assert_eq!(out[6..], text());
        // one byte less room is an error, not a short sector
        let mut out = Vec::new();
        assert!(decompress(&lzop_block(), &mut out, 4095).is_err());
    }

    #[test]
    fn segment_lengths_never_straddle_a_sector() {
        let sector = 4096;
        // the first segment ends 2 bytes before the sector's end: the
        // second's length starts on the next sector
        let first = literal_stream(4066, b'a');
        let second = lzop_block();
        assert_eq!(8 + first.len(), sector - 2);
        let mut ext = Vec::new();
        ext.extend([0u8; 4]);
        ext.extend((first.len() as u32).to_le_bytes());
        ext.extend(&first);
        ext.extend([0u8; 2]);
        ext.extend((second.len() as u32).to_le_bytes());
        ext.extend(&second);
        let total = ext.len() as u32;
        ext[..4].copy_from_slice(&total.to_le_bytes());
        let out = decompress_extent(&ext, sector, 1 << 20).unwrap();
        let mut want = vec![b'a'; 4066];
        want.extend(text());
        assert_eq!(out, want);
        // a limit cuts the output, as a file extent's size does
        assert_eq!(decompress_extent(&ext, sector, 700).unwrap(), want[..700]);
        // a total past the extent, and a segment past the total
        let mut bad = ext.clone();
        bad[..4].copy_from_slice(&(total + 1).to_le_bytes());
        assert!(decompress_extent(&bad, sector, 1 << 20).is_err());
        let mut bad = ext.clone();
        bad[..4].copy_from_slice(&(total - 1).to_le_bytes());
        assert!(decompress_extent(&bad, sector, 1 << 20).is_err());
    }

    /// Damaged and random streams decode or fail, never panic, and never
    /// make more than a sector.
    #[test]
    fn damaged_streams_fail_cleanly() {
        let clean = lzop_block();
        let mut next = crate::testing::xorshift(0x1234_5678_9abc_def1);
        let mut ok = 0;
        for round in 0..20_000 {
            let src: Vec<u8> = if round % 2 == 0 {
                let mut s = clean.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % s.len() as u64) as usize;
                    s[at] = next() as u8;
                }
                s.truncate(s.len() - (next() % 3) as usize);
                s
            } else {
                (0..next() % 64).map(|_| next() as u8).collect()
            };
            let mut out = Vec::new();
            if decompress(&src, &mut out, 4096).is_ok() {
                ok += 1;
            }
            assert!(out.len() <= 4096);
        }
        assert!(ok < 20_000);
    }
}
