//! XPRESS Huffman (LZ77 and Huffman codes, Microsoft's MS-XCA), in which
//! Windows' system compression (see [`super::wof`]) stores files in chunks
//! of 4, 8 or 16 KiB.
//!
//! Owns decoding one chunk: a table of 512 four-bit code lengths, then a
//! stream of 16-bit little-endian words read from the high bit down, with
//! the bytes of long match lengths taken from the input between them (the
//! encoder places them where the decoder reaches them, so the order of
//! refills below is part of the format). Knows nothing of files; never
//! reads or writes outside the buffers it is given. Input that runs short
//! reads as zero bits, as Windows' decoder does; what cannot be decoded
//! (a code that is not a prefix code, a match before the start) is an
//! error. Its bit stream and canonical codes serve [`super::lzx`] too.

/// Symbols: 256 literals, then 256 matches (4 bits of length, 4 of offset).
const SYMBOLS: usize = 512;
/// Longest code.
const MAX_CODE_LEN: usize = 15;
/// Shortest match.
const MIN_MATCH: usize = 3;

/// A canonical Huffman code of at most 512 symbols (also LZX's): how many
/// codes each length has, and the symbols in code order (by length, then
/// by value).
pub(super) struct Code {
    counts: [u16; MAX_CODE_LEN + 1],
    symbols: [u16; SYMBOLS],
}

impl Code {
    /// The code of `lens` (0: the symbol is not used); `None` when more
    /// codes are given than lengths allow, or lengths are out of range.
    pub(super) fn new(lens: &[u8]) -> Option<Code> {
        if lens.len() > SYMBOLS {
            return None;
        }
        let mut counts = [0u16; MAX_CODE_LEN + 1];
        for &l in lens {
            *counts.get_mut(usize::from(l))? += 1;
        }
        let mut left: i32 = 1;
        for &count in &counts[1..] {
            left = (left << 1) - i32::from(count);
            if left < 0 {
                return None;
            }
        }
        let mut next = [0u16; MAX_CODE_LEN + 2];
        for len in 1..=MAX_CODE_LEN {
            next[len + 1] = next[len] + counts[len];
        }
        let mut symbols = [0u16; SYMBOLS];
        for (symbol, &l) in lens.iter().enumerate() {
            if l != 0 {
                let at = &mut next[usize::from(l)];
                symbols[usize::from(*at)] = symbol as u16;
                *at += 1;
            }
        }
        counts[0] = 0;
        Some(Code { counts, symbols })
    }

    /// The next symbol, bit by bit from the shortest codes on; `None` where
    /// the bits are no code of this (incomplete) code.
    pub(super) fn decode(&self, bits: &mut Bits<'_>) -> Option<usize> {
        bits.ensure(MAX_CODE_LEN as u32);
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..=MAX_CODE_LEN {
            code |= bits.pop(1) as i32;
            let count = i32::from(self.counts[len]);
            if code - first < count {
                return Some(usize::from(self.symbols[(index + code - first) as usize]));
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        None
    }
}

/// A bit stream of 16-bit little-endian words read from the high bit
/// down, with bytes of the input itself taken between them.
pub(super) struct Bits<'a> {
    data: &'a [u8],
    next: usize,
    /// bits not yet taken, from bit 31 down
    buf: u32,
    left: u32,
}

impl<'a> Bits<'a> {
    pub(super) fn new(data: &'a [u8]) -> Bits<'a> {
        Bits {
            data,
            next: 0,
            buf: 0,
            left: 0,
        }
    }

    /// Makes at least `n` (at most 16) bits available, taking one more
    /// 16-bit word when fewer are; past the input, zeros.
    pub(super) fn ensure(&mut self, n: u32) {
        if self.left < n {
            if let Some(w) = self.data.get(self.next..self.next + 2) {
                self.buf |= u32::from(u16::from_le_bytes([w[0], w[1]])) << (16 - self.left);
                self.next += 2;
            }
            self.left += 16;
        }
    }

    /// Takes `n` bits made available by [`Bits::ensure`].
    pub(super) fn pop(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.buf >> (32 - n);
        self.buf = self.buf.checked_shl(n).unwrap_or(0);
        self.left = self.left.saturating_sub(n);
        v
    }

    /// The next byte of the input itself (0 past its end).
    fn byte(&mut self) -> usize {
        match self.data.get(self.next) {
            Some(&b) => {
                self.next += 1;
                usize::from(b)
            }
            None => 0,
        }
    }

    /// Drops the bits held, after taking a whole word when none are (LZX's
    /// stored blocks start on the next word, 1 to 16 bits on).
    pub(super) fn align(&mut self) {
        self.ensure(1);
        self.buf = 0;
        self.left = 0;
    }

    /// The next 32-bit little-endian number of the input itself.
    pub(super) fn word32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next `n` bytes of the input itself.
    pub(super) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.data.get(self.next..self.next.checked_add(n)?)?;
        self.next += n;
        Some(b)
    }

    /// The next 16-bit little-endian number of the input itself.
    fn word(&mut self) -> usize {
        match self.data.get(self.next..self.next + 2) {
            Some(w) => {
                self.next += 2;
                usize::from(u16::from_le_bytes([w[0], w[1]]))
            }
            None => 0,
        }
    }
}

/// Decodes one chunk of `input` into all of `out` (the chunk's size).
pub fn decompress(input: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    let Some((table, stream)) = input.split_at_checked(SYMBOLS / 2) else {
        return Err("an XPRESS chunk shorter than its code table");
    };
    let mut lens = [0u8; SYMBOLS];
    for (i, &b) in table.iter().enumerate() {
        lens[2 * i] = b & 0xF;
        lens[2 * i + 1] = b >> 4;
    }
    let code = Code::new(&lens).ok_or("an XPRESS chunk's code table is no prefix code")?;
    let mut bits = Bits::new(stream);
    let mut pos = 0;
    while pos < out.len() {
        let symbol = code
            .decode(&mut bits)
            .ok_or("an XPRESS chunk holds bits that are no code")?;
        if symbol < 256 {
            out[pos] = symbol as u8;
            pos += 1;
            continue;
        }
        let mut length = symbol & 0xF;
        let offset_bits = ((symbol >> 4) & 0xF) as u32;
        bits.ensure(16);
        let offset = (1usize << offset_bits) | bits.pop(offset_bits) as usize;
        if length == 0xF {
            length += bits.byte();
            if length == 0xF + 0xFF {
                length = bits.word();
            }
        }
        length += MIN_MATCH;
        if offset > pos || length > out.len() - pos {
            return Err("an XPRESS match reaches outside its chunk");
        }
        // byte by byte: a match may overlap what it writes
        for i in pos..pos + length {
            out[i] = out[i - offset];
        }
        pos += length;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk whose code gives symbols 0..300 (every literal, matches of
    /// offsets below 8) 9-bit codes, the code of a symbol being its value
    /// (an incomplete code), followed by `codes` packed from the high bit
    /// of 16-bit words, then `extra` bytes.
    fn chunk(codes: &[(u32, u32)], extra: &[u8]) -> Vec<u8> {
        let mut c = vec![0u8; 256];
        for s in 0..300 {
            c[s / 2] |= 9 << (4 * (s % 2));
        }
        let mut words: Vec<u16> = Vec::new();
        let (mut acc, mut n) = (0u32, 0u32);
        for &(value, len) in codes {
            acc = (acc << len) | value;
            n += len;
            while n >= 16 {
                words.push((acc >> (n - 16)) as u16);
                n -= 16;
            }
        }
        if n > 0 {
            words.push((acc << (16 - n)) as u16);
        }
        for w in words {
            c.extend_from_slice(&w.to_le_bytes());
        }
        c.extend_from_slice(extra);
        c
    }

    #[test]
    fn literals_and_an_overlapping_match_decode() {
        // 9-bit codes are the symbols in order: 'a' 'b', then a match of
        // offset 2 (symbol 256 + 16 * 1 + length 1, offset bit 0), 4 bytes
        let input = chunk(
            &[
                (b'a'.into(), 9),
                (b'b'.into(), 9),
                (256 + 16 + 1, 9),
                (0, 1),
            ],
            &[],
        );
        let mut out = [0u8; 6];
        decompress(&input, &mut out).unwrap();
        assert_eq!(&out, b"ababab");
    }

    /// Random chunks (random code tables, random streams) decode or fail,
    /// never panic or write past the chunk.
    #[test]
    fn random_chunks_never_panic() {
        let mut next = crate::testing::xorshift(0x2545_F491_4F6C_DD1Du64);
        let mut decoded = 0;
        for round in 0..3000 {
            // half of them with a valid code: the one of `chunk`
            let mut input = if round % 2 == 0 {
                chunk(&[], &[])
            } else {
                (0..256).map(|_| next() as u8).collect()
            };
            let extra = (next() % 600) as usize;
            input.extend((0..extra).map(|_| next() as u8));
            let mut out = vec![0u8; (next() % 5000) as usize];
            decoded += usize::from(decompress(&input, &mut out).is_ok());
        }
        assert!(decoded > 0);
    }

    #[test]
    fn bad_chunks_are_errors() {
        let mut out = [0u8; 8];
        assert!(decompress(&[0u8; 100], &mut out).is_err(), "no code table");
        // over-subscribed: 512 codes of 1 bit
        assert!(decompress(&[0x11u8; 256], &mut out).is_err());
        // a match before the chunk's start
        let input = chunk(&[(256 + 16 + 1, 9), (0, 1)], &[]);
        assert!(decompress(&input, &mut out).is_err());
        // bits that are no code of an incomplete code (all ones)
        let mut input = chunk(&[], &[]);
        input.extend_from_slice(&[0xFF; 8]);
        assert!(decompress(&input, &mut out).is_err());
    }
}
