//! Standard, padded base64 (RFC 4648 §4) for bulk payloads.
//!
//! This module owns the codec used for bulk data (file and image contents
//! carried inside JSON-RPC messages). At 1+ GB/s of bulk data, base64 is a
//! measurable part of the CPU time, and `base64-simd` tops out at AVX2. On
//! x86_64 CPUs with AVX-512 VBMI this module runs a 64-byte-wide kernel (the
//! Muła/Lemire approach) over the bulk of the input and hands the short rest
//! to `base64_simd::STANDARD`; everywhere else both functions are exactly
//! `base64_simd::STANDARD`.
//!
//! The output and the set of accepted inputs are the same as
//! `base64_simd::STANDARD`'s: canonical padding only (`=` only as the final
//! one or two characters of a length-multiple-of-4 text, and the unused bits
//! of the final group must be zero), no whitespace, no URL-safe alphabet.
//!
//! Invariant: [`decode_append`] never returns data for invalid input. On any
//! error `out` is truncated back to the length it had before the call.

use std::fmt;

/// Why [`decode_append`] rejected its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    reason: Reason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// The input length is not a multiple of 4.
    Length,
    /// A byte outside the standard alphabet, misplaced or excess `=`, or
    /// non-zero unused bits in the final group.
    Invalid,
}

impl DecodeError {
    const LENGTH: Self = DecodeError {
        reason: Reason::Length,
    };
    const INVALID: Self = DecodeError {
        reason: Reason::Invalid,
    };
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.reason {
            Reason::Length => "invalid base64: length is not a multiple of 4",
            Reason::Invalid => "invalid base64: bad character or padding",
        })
    }
}

impl std::error::Error for DecodeError {}

/// Appends the padded standard base64 of `src` to `out`.
///
/// Panics only if the output would not fit in a `Vec` (capacity overflow).
pub fn encode_append(src: &[u8], out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if vbmi::available() {
        // SAFETY: `available()` has confirmed that the CPU supports every
        // target feature the kernel is compiled for.
        unsafe { vbmi::encode_append(src, out) };
        return;
    }
    encode_fallback(src, out);
}

/// Appends the bytes that the padded standard base64 text `src` decodes to.
///
/// `src.len()` must be a multiple of 4, `=` may only be the final one or two
/// characters, and any byte outside the standard alphabet (whitespace,
/// URL-safe `-`/`_`, non-ASCII) is an error. On error nothing is appended:
/// `out` is truncated back to the length it had before the call.
pub fn decode_append(src: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    if !src.len().is_multiple_of(4) {
        return Err(DecodeError::LENGTH);
    }
    #[cfg(target_arch = "x86_64")]
    if vbmi::available() {
        // SAFETY: as in `encode_append`; the length precondition of
        // `vbmi::decode_append` was checked above.
        return unsafe { vbmi::decode_append(src, out) };
    }
    decode_fallback(src, out)
}

/// The portable path: exactly `base64_simd::STANDARD`.
fn encode_fallback(src: &[u8], out: &mut Vec<u8>) {
    base64_simd::STANDARD.encode_append(src, out);
}

/// The portable path: exactly `base64_simd::STANDARD`, errors mapped, and
/// `out` restored on error.
fn decode_fallback(src: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let old_len = out.len();
    base64_simd::STANDARD.decode_append(src, out).map_err(|_| {
        // base64-simd only sets the length on success; truncating again is a
        // cheap guarantee of the "never data on error" invariant.
        out.truncate(old_len);
        if src.len().is_multiple_of(4) {
            DecodeError::INVALID
        } else {
            DecodeError::LENGTH
        }
    })
}

// The AVX-512 intrinsics and feature names are stable since Rust 1.89, the
// crate's `rust-version`.
#[cfg(target_arch = "x86_64")]
mod vbmi {
    use super::{decode_fallback, DecodeError};
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    const ALPHABET: [u8; 64] = *b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// ASCII -> 6-bit value, 0x80 for every byte outside the alphabet
    /// (including `=`). Indexed by the low 7 bits of an input byte; bytes
    /// >= 0x80 are rejected separately.
    const DECODE_LUT: [u8; 128] = {
        let mut t = [0x80u8; 128];
        let mut i = 0;
        while i < 64 {
            t[ALPHABET[i] as usize] = i as u8;
            i += 1;
        }
        t
    };

    /// Encode: spread 16 groups of 3 bytes `b0 b1 b2` into 16 dword lanes
    /// holding `b1 b0 b2 b1`, so that every 6-bit field is contiguous.
    const ENCODE_SPREAD: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut j = 0;
        while j < 16 {
            let b = 3 * j as u8;
            t[4 * j] = b + 1;
            t[4 * j + 1] = b;
            t[4 * j + 2] = b + 2;
            t[4 * j + 3] = b + 1;
            j += 1;
        }
        t
    };

    /// Encode: per 64-bit lane (two dword groups), the bit offsets of the
    /// four 6-bit fields of each group, in output order.
    const ENCODE_SHIFTS: i64 = 0x3036_242a_1016_040a;

    /// Decode: after packing, dword lane `j` holds the 24 decoded bits in its
    /// low three bytes, most significant first in the output; gather them.
    const DECODE_PACK: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut j = 0;
        while j < 16 {
            let b = 4 * j as u8;
            t[3 * j] = b + 2;
            t[3 * j + 1] = b + 1;
            t[3 * j + 2] = b;
            j += 1;
        }
        t
    };

    const LOW48: __mmask64 = (1 << 48) - 1;

    /// Whether the CPU has AVX-512 F, BW and VBMI. Detected once, then cached
    /// (0 = not yet checked, 1 = no, 2 = yes).
    pub(super) fn available() -> bool {
        static STATE: AtomicU8 = AtomicU8::new(0);
        match STATE.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => {
                let yes = is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vbmi");
                STATE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
        }
    }

    /// Loads 64 bytes from a 64-byte table.
    ///
    /// # Safety
    /// AVX-512F must be available (always true for the callers below).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_table(t: &[u8; 64]) -> __m512i {
        // SAFETY: `t` is 64 readable bytes; the load is unaligned.
        unsafe { _mm512_loadu_si512(t.as_ptr().cast()) }
    }

    /// `encode_append` for VBMI CPUs: whole 48-byte blocks here, the rest
    /// through base64-simd.
    ///
    /// # Safety
    /// The CPU must support avx512f, avx512bw and avx512vbmi.
    pub(super) unsafe fn encode_append(src: &[u8], out: &mut Vec<u8>) {
        // A slice holds at most isize::MAX bytes, so this cannot overflow
        // usize; `reserve` panics if it exceeds isize::MAX.
        let total = src.len().div_ceil(3) * 4;
        out.reserve(total);
        let blocks = src.len() / 48;
        let old_len = out.len();
        // SAFETY: the CPU features are the caller's precondition. `reserve`
        // made room for `total >= blocks * 64` bytes past `old_len`, which is
        // exactly what `encode_blocks` writes, so every byte up to the new
        // length is initialised before `set_len`.
        unsafe {
            encode_blocks(src, blocks, out.as_mut_ptr().add(old_len));
            out.set_len(old_len + blocks * 64);
        }
        // The vector part consumed a multiple of 3 bytes, so appending the
        // encoding of the rest yields the encoding of the whole.
        super::encode_fallback(&src[blocks * 48..], out);
    }

    /// Encodes `blocks` 48-byte blocks of `src` to `64 * blocks` bytes at
    /// `dst`.
    ///
    /// # Safety
    /// CPU features as above; `blocks * 48 <= src.len()`; `dst` is valid for
    /// `blocks * 64` bytes of writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn encode_blocks(src: &[u8], blocks: usize, dst: *mut u8) {
        let spread = unsafe { load_table(&ENCODE_SPREAD) };
        let alphabet = unsafe { load_table(&ALPHABET) };
        let shifts = _mm512_set1_epi64(ENCODE_SHIFTS);
        let encode = |v: __m512i| {
            let groups = _mm512_permutexvar_epi8(spread, v);
            // Each output byte gets 8 bits starting at its field; the lookup
            // below only uses the low 6 of them.
            let fields = _mm512_multishift_epi64_epi8(shifts, groups);
            _mm512_permutexvar_epi8(fields, alphabet)
        };
        let s = src.as_ptr();
        let mut k = 0;
        // Full 64-byte loads while they stay inside `src` ...
        while k < blocks && k * 48 + 64 <= src.len() {
            // SAFETY: bytes `48k .. 48k + 64` are inside `src` (checked just
            // above); `dst` has room for block `k` (caller's precondition).
            unsafe {
                let v = _mm512_loadu_si512(s.add(k * 48).cast());
                _mm512_storeu_si512(dst.add(k * 64).cast(), encode(v));
            }
            k += 1;
        }
        // ... then masked 48-byte loads for the last block or two, which
        // never touch memory past the end of `src`.
        while k < blocks {
            // SAFETY: only the 48 bytes `48k .. 48k + 48` are read, all
            // inside `src` as `k < blocks <= src.len() / 48`; masked-off
            // lanes do not access memory.
            unsafe {
                let v = _mm512_maskz_loadu_epi8(LOW48, s.add(k * 48).cast());
                _mm512_storeu_si512(dst.add(k * 64).cast(), encode(v));
            }
            k += 1;
        }
    }

    /// `decode_append` for VBMI CPUs: 64-char blocks here, never the final
    /// 4-char group (it may hold padding), the rest through base64-simd.
    ///
    /// # Safety
    /// The CPU must support avx512f, avx512bw and avx512vbmi, and
    /// `src.len()` must be a multiple of 4.
    pub(super) unsafe fn decode_append(src: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        // Largest `blocks` with `64 * blocks + 4 <= src.len()`.
        let blocks = src.len().saturating_sub(4) / 64;
        let old_len = out.len();
        if blocks > 0 {
            out.reserve(src.len() / 4 * 3);
            // SAFETY: CPU features are the caller's precondition. The spare
            // capacity is at least `src.len() / 4 * 3 >= 48 * blocks + 3`
            // bytes, which covers what `decode_blocks` writes. The length is
            // only extended if every block was valid, i.e. all `48 * blocks`
            // bytes were written.
            let ok = unsafe { decode_blocks(src, blocks, out.as_mut_ptr().add(old_len)) };
            if !ok {
                return Err(DecodeError::INVALID);
            }
            // SAFETY: see above.
            unsafe { out.set_len(old_len + blocks * 48) };
        }
        decode_fallback(&src[blocks * 64..], out).inspect_err(|_| out.truncate(old_len))
    }

    /// Decodes `blocks` 64-char blocks of `src` to `48 * blocks` bytes at
    /// `dst`. Returns false, with unspecified bytes at `dst`, if any char is
    /// outside the standard alphabet (including `=`).
    ///
    /// # Safety
    /// CPU features as above; `blocks * 64 <= src.len()`; `dst` is valid for
    /// `blocks * 48` bytes of writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn decode_blocks(src: &[u8], blocks: usize, dst: *mut u8) -> bool {
        let lut_lo = unsafe { _mm512_loadu_si512(DECODE_LUT.as_ptr().cast()) };
        let lut_hi = unsafe { _mm512_loadu_si512(DECODE_LUT.as_ptr().add(64).cast()) };
        let pack = unsafe { load_table(&DECODE_PACK) };
        let ab = _mm512_set1_epi32(0x0140_0140);
        let abcd = _mm512_set1_epi32(0x0001_1000);
        let s = src.as_ptr();
        for k in 0..blocks {
            // SAFETY: bytes `64k .. 64k + 64` are inside `src` (caller's
            // precondition).
            let v = unsafe { _mm512_loadu_si512(s.add(k * 64).cast()) };
            // Index by the low 7 bits; invalid chars map to 0x80, and input
            // bytes >= 0x80 keep their top bit in the OR.
            let sextets = _mm512_permutex2var_epi8(lut_lo, v, lut_hi);
            if _mm512_movepi8_mask(_mm512_or_si512(sextets, v)) != 0 {
                return false;
            }
            // a b c d (6 bits each) -> 16-bit (a<<6|b), (c<<6|d) ->
            // 32-bit (a<<18|b<<12|c<<6|d), then gather 3 bytes per dword.
            let pairs = _mm512_maddubs_epi16(sextets, ab);
            let words = _mm512_madd_epi16(pairs, abcd);
            let bytes = _mm512_permutexvar_epi8(pack, words);
            // SAFETY: `dst` has room for `48 * blocks` bytes. Every block but
            // the last may write 64 bytes (its 16 excess bytes land where the
            // next block writes); the last writes exactly its 48.
            unsafe {
                if k + 1 < blocks {
                    _mm512_storeu_si512(dst.add(k * 48).cast(), bytes);
                } else {
                    _mm512_mask_storeu_epi8(dst.add(k * 48).cast(), LOW48, bytes);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift64).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut next = crate::testing::xorshift(seed | 1);
        (0..len).map(|_| (next() >> 24) as u8).collect()
    }

    fn reference_encode(src: &[u8]) -> Vec<u8> {
        base64_simd::STANDARD.encode_type(src)
    }

    /// Every codec under test: (name, encode, decode). The VBMI entries are
    /// present only when the CPU supports them.
    type Enc = fn(&[u8], &mut Vec<u8>);
    type Dec = fn(&[u8], &mut Vec<u8>) -> Result<(), DecodeError>;
    fn codecs() -> Vec<(&'static str, Enc, Dec)> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut v: Vec<(&'static str, Enc, Dec)> = vec![
            ("public", encode_append, decode_append),
            ("fallback", encode_fallback, decode_fallback),
        ];
        #[cfg(target_arch = "x86_64")]
        if vbmi::available() {
            // SAFETY (both closures): the CPU features were checked above.
            v.push((
                "vbmi",
                |s, o| unsafe { vbmi::encode_append(s, o) },
                |s, o| {
                    if s.len() % 4 != 0 {
                        return Err(DecodeError::LENGTH);
                    }
                    unsafe { vbmi::decode_append(s, o) }
                },
            ));
        } else {
            println!("note: CPU lacks AVX-512 VBMI; only the fallback path is tested");
        }
        #[cfg(not(target_arch = "x86_64"))]
        println!("note: not x86_64; only the fallback path is tested");
        v
    }

    fn lengths() -> Vec<usize> {
        let mut v: Vec<usize> = (0..=400).collect();
        v.extend([(1 << 20) + 1, (1 << 20) + 2, 1 << 20]);
        v
    }

    /// Encode equals base64-simd and decode round-trips, appending after a
    /// non-empty prefix, for every codec.
    fn check_roundtrip(src: &[u8]) {
        let want = reference_encode(src);
        for (name, enc, dec) in codecs() {
            let mut out = b"prefix".to_vec();
            enc(src, &mut out);
            assert_eq!(&out[..6], b"prefix", "{name} len {}", src.len());
            assert!(out[6..] == want[..], "{name} encode len {}", src.len());
            let mut back = b"xy".to_vec();
            dec(&want, &mut back).unwrap_or_else(|e| panic!("{name} len {}: {e}", src.len()));
            assert_eq!(&back[..2], b"xy");
            assert!(back[2..] == *src, "{name} decode len {}", src.len());
        }
    }

    #[test]
    fn encode_decode_match_base64_simd_all_lengths() {
        for len in lengths() {
            check_roundtrip(&noise(len, len as u64 + 7));
        }
    }

    #[test]
    fn encode_decode_every_alignment() {
        let buf = noise(64 + 1000, 99);
        for off in 0..64 {
            for len in [0, 1, 47, 48, 49, 95, 96, 97, 200, 257, 300, 1000] {
                check_roundtrip(&buf[off..off + len]);
            }
        }
        // And the encoded text at every offset for decode.
        let data = noise(600, 5);
        let text = reference_encode(&data);
        let mut shifted = vec![b'A'; 64 + text.len()];
        for off in 0..64 {
            shifted[off..off + text.len()].copy_from_slice(&text);
            for (name, _, dec) in codecs() {
                let mut out = Vec::new();
                dec(&shifted[off..off + text.len()], &mut out).unwrap();
                assert!(out == data, "{name} offset {off}");
            }
        }
    }

    #[test]
    fn decode_equals_base64_simd_on_all_ones_and_edges() {
        // All 64 symbols in every position of a long text.
        let text: Vec<u8> = (0..256)
            .map(|i| base64_simd::STANDARD.charset()[i % 64])
            .collect();
        let want = base64_simd::STANDARD.decode_to_vec(&text).unwrap();
        for (name, _, dec) in codecs() {
            let mut out = Vec::new();
            dec(&text, &mut out).unwrap();
            assert_eq!(out, want, "{name}");
        }
    }

    fn is_alphabet(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
    }

    #[test]
    fn every_invalid_byte_at_every_position_is_an_error() {
        let data = noise(99, 3); // 132 chars, no padding
        let text = reference_encode(&data);
        assert_eq!(text.len(), 132);
        let padded = reference_encode(&noise(100, 4)); // 136 chars, "=="
        for bad in (0..=255u8).filter(|&b| !is_alphabet(b)) {
            for base in [&text, &padded] {
                for pos in 0..base.len() {
                    let mut t = base.clone();
                    t[pos] = bad;
                    // '=' in one of the last two places may form valid
                    // padding (e.g. "...xA" -> "...xA=" is canonical when the
                    // freed bits are zero): that case must match base64-simd,
                    // and is covered by `padding_rules_match_base64_simd`.
                    if bad == b'=' && pos + 2 >= base.len() {
                        let want = base64_simd::STANDARD.decode_to_vec(&t).ok();
                        for (name, _, dec) in codecs() {
                            let mut out = Vec::new();
                            let r = dec(&t, &mut out).ok().map(|()| out);
                            assert_eq!(r, want, "{name} '=' at {pos} of {}", base.len());
                        }
                        continue;
                    }
                    assert!(base64_simd::STANDARD.decode_to_vec(&t).is_err());
                    for (name, _, dec) in codecs() {
                        let mut out = b"keep".to_vec();
                        let r = dec(&t, &mut out);
                        assert_eq!(
                            r,
                            Err(DecodeError::INVALID),
                            "{name} byte {bad:#x} at {pos}"
                        );
                        assert_eq!(out, b"keep", "{name} returned data");
                    }
                }
            }
        }
    }

    #[test]
    fn invalid_in_a_late_block_returns_no_data() {
        // Many valid vector blocks followed by one bad one, and a bad tail.
        let text = reference_encode(&noise(48 * 40, 11));
        for pos in [64 * 20 + 5, text.len() - 70, text.len() - 2] {
            let mut t = text.clone();
            t[pos] = b'*';
            for (name, _, dec) in codecs() {
                let mut out = vec![1, 2, 3];
                assert_eq!(dec(&t, &mut out), Err(DecodeError::INVALID), "{name}");
                assert_eq!(out, [1, 2, 3], "{name}");
            }
        }
    }

    #[test]
    fn padding_rules_match_base64_simd() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"", Some(b"")),
            (b"YQ==", Some(b"a")),
            (b"YWI=", Some(b"ab")),
            (b"YWJj", Some(b"abc")),
            (b"YQ=", None),
            (b"Y===", None),
            (b"====", None),
            (b"YQ==YWJj", None),
            (b"YWJ", None),
            (b"YR==", None), // non-canonical trailing bits
            (b"YWJ=", None), // non-canonical trailing bits
            (b"YQ", None),
            (b"YQ==\n", None),
            (b"Y=Q=", None),
        ];
        for &(input, want) in cases {
            let reference = base64_simd::STANDARD.decode_to_vec(input).ok();
            assert_eq!(reference.as_deref(), want, "base64-simd on {input:?}");
            for (name, _, dec) in codecs() {
                let mut out = Vec::new();
                let r = dec(input, &mut out);
                assert_eq!(r.is_ok(), want.is_some(), "{name} on {input:?}");
                if let Some(w) = want {
                    assert_eq!(out, w, "{name} on {input:?}");
                } else {
                    assert!(out.is_empty(), "{name} on {input:?}");
                    let length = input.len() % 4 != 0;
                    let kind = if length {
                        DecodeError::LENGTH
                    } else {
                        DecodeError::INVALID
                    };
                    assert_eq!(r, Err(kind), "{name} on {input:?}");
                }
            }
        }
        // Padding in a long input: valid only at the very end.
        let long = reference_encode(&noise(301, 8)); // ends "=="
        let mut t = long.clone();
        t.extend_from_slice(b"YWJj");
        for (name, _, dec) in codecs() {
            let mut out = Vec::new();
            dec(&long, &mut out).unwrap();
            assert_eq!(dec(&t, &mut out), Err(DecodeError::INVALID), "{name}");
        }
    }

    #[test]
    fn error_display() {
        assert!(DecodeError::LENGTH.to_string().contains("multiple of 4"));
        assert!(DecodeError::INVALID.to_string().contains("invalid base64"));
    }

    /// Throw-away throughput check:
    /// `cargo test --release --lib base64 -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput() {
        use std::time::Instant;
        let data = noise(4 << 20, 1);
        let text = reference_encode(&data);
        let rounds = 200;
        for (name, enc, dec) in codecs() {
            let mut out = Vec::with_capacity(text.len());
            let t = Instant::now();
            for _ in 0..rounds {
                out.clear();
                enc(std::hint::black_box(&data), &mut out);
            }
            let enc_s = t.elapsed().as_secs_f64();
            assert!(out == text);
            let mut back = Vec::with_capacity(data.len());
            let t = Instant::now();
            for _ in 0..rounds {
                back.clear();
                dec(std::hint::black_box(&text), &mut back).unwrap();
            }
            let dec_s = t.elapsed().as_secs_f64();
            assert!(back == data);
            let gb = (data.len() * rounds) as f64 / 1e9;
            println!(
                "{name:>8}: encode {:.2} GB/s, decode {:.2} GB/s (binary bytes per second, 4 MiB)",
                gb / enc_s,
                gb / dec_s
            );
        }
    }
}
