//! The checksums btrfs puts on its superblock and tree nodes: CRC32C (the
//! default), XXH64, SHA-256 and BLAKE2b-256, chosen at `mkfs` time.
//!
//! A block's checksum covers everything after its first 32 bytes and is
//! stored at its start, little-endian where it is a number. Owns computing
//! them; must never decide what a block holds.

use sha2::Digest as _;

use crate::le::le64;
use crate::restore::fs::ext_raw::crc32c;

/// How metadata blocks are checksummed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Csum {
    Crc32c,
    XxHash64,
    Sha256,
    Blake2b,
}

impl Csum {
    /// The checksum type the superblock names (its `csum_type`).
    pub fn from_type(t: u16) -> Option<Csum> {
        Some(match t {
            0 => Csum::Crc32c,
            1 => Csum::XxHash64,
            2 => Csum::Sha256,
            3 => Csum::Blake2b,
            _ => return None,
        })
    }

    /// The checksum of `data` as btrfs stores it (at most 32 bytes).
    pub fn of(self, data: &[u8]) -> Vec<u8> {
        match self {
            Csum::Crc32c => (!crc32c(!0, data)).to_le_bytes().to_vec(),
            Csum::XxHash64 => xxh64(data).to_le_bytes().to_vec(),
            Csum::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Csum::Blake2b => blake2b_256(data).to_vec(),
        }
    }

    /// Bytes of one checksum.
    pub fn size(self) -> usize {
        match self {
            Csum::Crc32c => 4,
            Csum::XxHash64 => 8,
            Csum::Sha256 | Csum::Blake2b => 32,
        }
    }

    /// Whether `data` has the checksum `want` (as stored, [`Self::size`]
    /// bytes).
    pub fn matches(self, data: &[u8], want: &[u8]) -> bool {
        match self {
            Csum::Crc32c => want == (!crc32c(!0, data)).to_le_bytes(),
            _ => want == self.of(data),
        }
    }

    /// Whether the block `b` (a superblock or node) carries its checksum
    /// in its first bytes, over everything after the first 32.
    pub fn ok(self, b: &[u8]) -> bool {
        let sum = self.of(b.get(32..).unwrap_or_default());
        b.get(..sum.len()) == Some(&sum[..])
    }
}

/// XXH64 with seed 0.
pub fn xxh64(data: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    const P4: u64 = 0x85EB_CA77_C2B2_AE63;
    const P5: u64 = 0x27D4_EB2F_1656_67C5;
    let round = |acc: u64, lane: u64| {
        acc.wrapping_add(lane.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    };
    let merge = |acc: u64, v: u64| (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4);
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
        while rest.len() >= 32 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = round(*lane, le64(rest, i * 8));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
        h
    } else {
        P5
    };
    h = h.wrapping_add(data.len() as u64);
    while rest.len() >= 8 {
        h = (h ^ round(0, le64(rest, 0)))
            .rotate_left(27)
            .wrapping_mul(P1)
            .wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        let word = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        h = (h ^ u64::from(word).wrapping_mul(P1))
            .rotate_left(23)
            .wrapping_mul(P2)
            .wrapping_add(P3);
        rest = &rest[4..];
    }
    for &byte in rest {
        h = (h ^ u64::from(byte).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// BLAKE2b's initial state (SHA-512's) and its message schedule (RFC 7693).
const B2_IV: [u64; 8] = [
    0x6a09_e667_f3bc_c908,
    0xbb67_ae85_84ca_a73b,
    0x3c6e_f372_fe94_f82b,
    0xa54f_f53a_5f1d_36f1,
    0x510e_527f_ade6_82d1,
    0x9b05_688c_2b3e_6c1f,
    0x1f83_d9ab_fb41_bd6b,
    0x5be0_cd19_137e_2179,
];
const B2_SIGMA: [[usize; 16]; 10] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
];

/// BLAKE2b with a 32-byte digest and no key.
pub fn blake2b_256(data: &[u8]) -> [u8; 32] {
    let mut h = B2_IV;
    h[0] ^= 0x0101_0000 ^ 32;
    let blocks = data.len().div_ceil(128).max(1);
    for (i, block) in (0..blocks).map(|i| (i, data.get(i * 128..).unwrap_or_default())) {
        let last = i + 1 == blocks;
        let mut m = [0u64; 16];
        let mut buf = [0u8; 128];
        let n = block.len().min(128);
        buf[..n].copy_from_slice(&block[..n]);
        for (j, word) in m.iter_mut().enumerate() {
            *word = le64(&buf, j * 8);
        }
        let counted = (i * 128 + n) as u128;
        compress(&mut h, &m, counted, last);
    }
    let mut out = [0u8; 32];
    for (i, word) in h.iter().take(4).enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    out
}

fn compress(h: &mut [u64; 8], m: &[u64; 16], counted: u128, last: bool) {
    let mut v = [0u64; 16];
    v[..8].copy_from_slice(h);
    v[8..].copy_from_slice(&B2_IV);
    v[12] ^= counted as u64;
    v[13] ^= (counted >> 64) as u64;
    if last {
        v[14] = !v[14];
    }
    let g = |v: &mut [u64; 16], (a, b, c, d): (usize, usize, usize, usize), x: u64, y: u64| {
        v[a] = v[a].wrapping_add(v[b]).wrapping_add(x);
        v[d] = (v[d] ^ v[a]).rotate_right(32);
        v[c] = v[c].wrapping_add(v[d]);
        v[b] = (v[b] ^ v[c]).rotate_right(24);
        v[a] = v[a].wrapping_add(v[b]).wrapping_add(y);
        v[d] = (v[d] ^ v[a]).rotate_right(16);
        v[c] = v[c].wrapping_add(v[d]);
        v[b] = (v[b] ^ v[c]).rotate_right(63);
    };
    for round in 0..12 {
        let s = &B2_SIGMA[round % 10];
        g(&mut v, (0, 4, 8, 12), m[s[0]], m[s[1]]);
        g(&mut v, (1, 5, 9, 13), m[s[2]], m[s[3]]);
        g(&mut v, (2, 6, 10, 14), m[s[4]], m[s[5]]);
        g(&mut v, (3, 7, 11, 15), m[s[6]], m[s[7]]);
        g(&mut v, (0, 5, 10, 15), m[s[8]], m[s[9]]);
        g(&mut v, (1, 6, 11, 12), m[s[10]], m[s[11]]);
        g(&mut v, (2, 7, 8, 13), m[s[12]], m[s[13]]);
        g(&mut v, (3, 4, 9, 14), m[s[14]], m[s[15]]);
    }
    for i in 0..8 {
        h[i] ^= v[i] ^ v[i + 8];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Digests `b2sum -l 256` printed for the same input.
    #[test]
    fn blake2b_256_matches_b2sum() {
        let pattern: Vec<u8> = (0..512).map(|i| i as u8).collect();
        for (data, want) in [
            (
                &b""[..],
                "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8",
            ),
            (
                b"abc",
                "bddd813c634239723171ef3fee98579b94964e3bb1cb3e427262c8c068d52319",
            ),
            (
                &[b'x'; 1000],
                "ab75119ede14ef06ebf31f745fb655ed006cccfe8054c635308a557f7c9beaba",
            ),
            (
                &pattern,
                "540b20132d8aeae54057cb69c24f95d26a1c472cc700dd450defe9bb796d4f14",
            ),
        ] {
            assert_eq!(hex(&blake2b_256(data)), want, "{} bytes", data.len());
        }
    }

    /// XXH64 of nothing is its published check value; longer inputs (the
    /// 32-byte lanes) are checked by reading `mkfs.btrfs --csum xxhash`
    /// images (tests/fs_images.rs).
    #[test]
    fn xxh64_of_nothing() {
        assert_eq!(xxh64(b""), 0xEF46_DB37_51D8_E999);
    }
}
