//! The datastore format layer: Proxmox-Backup-compatible on-disk formats.
//!
//! One file per on-disk format (blobs, chunk store, fixed and dynamic
//! indexes, manifest), the read-only [`datastore::Datastore`] on top of them,
//! and the writer side ([`import`]) used only by `restore-client`.
//! This layer reads and validates bytes; it never caches, never schedules
//! reads and never knows about RPC. Every malformed input becomes an
//! [`crate::error::Error`] naming the file or digest, never a panic.

pub mod atomic_file;
pub mod blob;
pub mod chunk_store;
pub mod datastore;
pub mod didx;
pub mod fidx;
pub mod file;
pub mod import;
pub mod index;
pub(crate) mod index_body;
pub mod manifest;

/// A chunk digest: SHA-256 of the chunk's decoded bytes.
pub type Digest = [u8; 32];

/// Decoded chunks never exceed this (the dynamic chunker's maximum).
pub const MAX_CHUNK_SIZE: usize = 16 << 20;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of a digest, as used in chunk file names and manifests.
pub fn digest_hex(d: &Digest) -> String {
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Parses 64 hex digits (either case) into a digest.
pub fn parse_digest_hex(s: &str) -> Option<Digest> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (out, pair) in d.iter_mut().zip(bytes.chunks_exact(2)) {
        let hi = hex_val(pair[0])?;
        let lo = hex_val(pair[1])?;
        *out = (hi << 4) | lo;
    }
    Some(d)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// SHA-256 of `data` (uses the CPU's SHA extensions when present).
pub fn sha256(data: &[u8]) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let mut d = [0u8; 32];
        for (i, b) in d.iter_mut().enumerate() {
            *b = (i * 37) as u8;
        }
        let s = digest_hex(&d);
        assert_eq!(s.len(), 64);
        assert_eq!(parse_digest_hex(&s), Some(d));
        assert_eq!(parse_digest_hex(&s.to_uppercase()), Some(d));
        assert_eq!(parse_digest_hex(&s[1..]), None);
        assert_eq!(parse_digest_hex(&format!("g{}", &s[1..])), None);
    }

    #[test]
    fn sha256_of_hello() {
        assert_eq!(
            digest_hex(&sha256(b"hello")),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
