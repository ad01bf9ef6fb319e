//! DataBlob: the container of every chunk file, manifest and `.blob` archive.
//!
//! Layout: 8-byte magic, CRC32 (IEEE, little-endian) of the bytes after the
//! header, then the payload (raw or one zstd frame). Encrypted blobs carry a
//! 44-byte header (IV and AES-GCM tag) and are refused as unsupported.
//! This module also holds the other format magics so all seven live together.
//! It owns encoding and decoding only: no file I/O, no caching.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Cursor;

use crate::error::{Error, ErrorKind, Result};
use crate::store::{digest_hex, sha256, Digest};

/// `sha256("Proxmox Backup uncompressed blob v1.0")[..8]`
pub const UNCOMPRESSED_BLOB_MAGIC: [u8; 8] = [66, 171, 56, 7, 190, 131, 112, 161];
/// `sha256("Proxmox Backup zstd compressed blob v1.0")[..8]`
pub const COMPRESSED_BLOB_MAGIC: [u8; 8] = [49, 185, 88, 66, 111, 182, 163, 127];
/// `sha256("Proxmox Backup encrypted blob v1.0")[..8]`
pub const ENCRYPTED_BLOB_MAGIC: [u8; 8] = [123, 103, 133, 190, 34, 45, 76, 240];
/// `sha256("Proxmox Backup zstd compressed encrypted blob v1.0")[..8]`
pub const ENCR_COMPR_BLOB_MAGIC: [u8; 8] = [230, 89, 27, 191, 11, 191, 216, 11];
/// `sha256("Proxmox Backup fixed sized chunk index v1.0")[..8]`
pub const FIXED_INDEX_MAGIC: [u8; 8] = [47, 127, 65, 237, 145, 253, 15, 205];
/// `sha256("Proxmox Backup dynamic sized chunk index v1.0")[..8]`
pub const DYNAMIC_INDEX_MAGIC: [u8; 8] = [28, 145, 78, 165, 25, 186, 179, 205];
/// `sha256("Proxmox Backup Catalog file v1.0")[..8]`
pub const CATALOG_MAGIC: [u8; 8] = [145, 253, 96, 249, 196, 103, 88, 213];

/// Header of a plain or compressed blob: magic + CRC32.
pub const HEADER_SIZE: usize = 12;
/// Header of an encrypted blob: magic + CRC32 + IV + tag.
pub const ENCRYPTED_HEADER_SIZE: usize = 44;

/// zstd level used for every blob we write (what Proxmox Backup uses).
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    // Contexts are reused per thread: creating one costs allocations that
    // would otherwise dominate small decodes on the hot path.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

fn what(expected: Option<&Digest>) -> String {
    match expected {
        Some(d) => format!("chunk {}", digest_hex(d)),
        None => "blob".to_string(),
    }
}

/// What a blob's 12-byte header says of its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The payload is one zstd frame (else the data itself).
    pub compressed: bool,
    /// CRC32 of the payload.
    pub crc: u32,
}

/// Parses the header at the start of `raw` (at least [`HEADER_SIZE`] bytes
/// of it; `expected` names the chunk in messages). Encrypted blobs are
/// unsupported, anything else unknown is corrupt.
pub fn parse_header(raw: &[u8], expected: Option<&Digest>) -> Result<Header> {
    let magic: [u8; 8] = match raw.get(..8).and_then(|m| m.try_into().ok()) {
        Some(m) => m,
        None => {
            return Err(Error::corrupt(format!(
                "{}: truncated blob ({} bytes)",
                what(expected),
                raw.len()
            )))
        }
    };
    let compressed = match magic {
        UNCOMPRESSED_BLOB_MAGIC => false,
        COMPRESSED_BLOB_MAGIC => true,
        ENCRYPTED_BLOB_MAGIC | ENCR_COMPR_BLOB_MAGIC => {
            return Err(Error::unsupported(format!(
                "{}: encrypted blobs are not supported",
                what(expected)
            )))
        }
        _ => {
            return Err(Error::corrupt(format!(
                "{}: wrong blob magic {}",
                what(expected),
                hex8(&magic)
            )))
        }
    };
    match raw.get(8..HEADER_SIZE) {
        Some(&[a, b, c, d]) => Ok(Header {
            compressed,
            crc: u32::from_le_bytes([a, b, c, d]),
        }),
        _ => Err(Error::corrupt(format!(
            "{}: truncated blob header",
            what(expected)
        ))),
    }
}

/// Decodes a DataBlob with every check: magic, CRC, decompression (never
/// producing more than `max_size` bytes, whatever the frame claims) and,
/// when `expected` is given, SHA-256 of the result. For `store verify`,
/// which must report any damage, and for blobs without a digest.
pub fn decode(raw: &[u8], expected: Option<&Digest>, max_size: usize) -> Result<Vec<u8>> {
    let header = parse_header(raw, expected)?;
    let payload = raw.get(HEADER_SIZE..).unwrap_or_default();
    check_crc(&header, payload, expected)?;
    decode_checked(&header, Cow::Borrowed(payload), expected, max_size)
}

/// The read path's decode of a blob whose header was parsed apart from its
/// payload (the bytes after the header). With `expected`, only the digest
/// of the decoded data is checked, as Proxmox Backup's chunk readers do: it
/// is the stronger check and covers the payload as well (damaged bytes
/// decode to other data, or fail to decode), so the CRC would only cost a
/// pass over the data. Without it, the CRC is checked. An owned
/// uncompressed payload becomes the data as it is, without a copy.
pub fn decode_payload(
    header: &Header,
    payload: Cow<'_, [u8]>,
    expected: Option<&Digest>,
    max_size: usize,
) -> Result<Vec<u8>> {
    if expected.is_none() {
        check_crc(header, &payload, expected)?;
    }
    decode_checked(header, payload, expected, max_size)
}

fn check_crc(header: &Header, payload: &[u8], expected: Option<&Digest>) -> Result<()> {
    let crc = crc32fast::hash(payload);
    if crc != header.crc {
        return Err(Error::corrupt(format!(
            "{}: CRC mismatch (stored {:08x}, computed {crc:08x})",
            what(expected),
            header.crc
        )));
    }
    Ok(())
}

/// Decompresses (bounded by `max_size`) and checks the digest when given.
fn decode_checked(
    header: &Header,
    payload: Cow<'_, [u8]>,
    expected: Option<&Digest>,
    max_size: usize,
) -> Result<Vec<u8>> {
    let data = if header.compressed {
        decompress_zstd(&payload, max_size).map_err(|e| {
            Error::corrupt(format!("{}: zstd payload: {}", what(expected), e.message))
        })?
    } else {
        if payload.len() > max_size {
            return Err(Error::corrupt(format!(
                "{}: {} bytes exceed the limit of {max_size}",
                what(expected),
                payload.len()
            )));
        }
        payload.into_owned()
    };
    if let Some(expected) = expected {
        let actual = sha256(&data);
        if &actual != expected {
            return Err(Error::corrupt(format!(
                "chunk {}: digest mismatch (data hashes to {})",
                digest_hex(expected),
                digest_hex(&actual)
            )));
        }
    }
    Ok(data)
}

/// Bounded zstd decode into one allocation: the frame's content size when
/// it records one (and it fits), else `max_size` capacity shrunk afterwards.
/// Uses this thread's decompression context, so that a decode of a small
/// payload (a blob, a btrfs extent) costs no context of its own.
pub fn decompress_zstd(payload: &[u8], max_size: usize) -> Result<Vec<u8>> {
    let capacity = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) => {
            if n > max_size as u64 {
                return Err(Error::corrupt(format!(
                    "frame claims {n} bytes, over the limit of {max_size}"
                )));
            }
            // A multi-frame payload may hold more than the first frame says;
            // zstd then reports a too-small buffer, which is an error below.
            n as usize
        }
        Ok(None) => max_size,
        Err(_) => return Err(Error::corrupt("invalid zstd frame header")),
    };
    let mut out = Vec::with_capacity(capacity);
    DECOMPRESSOR.with(|cell| -> Result<()> {
        let mut slot = cell.borrow_mut();
        let dec = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| Error::new(ErrorKind::Io, format!("zstd context: {e}")))?,
            ),
        };
        dec.decompress_to_buffer(payload, &mut out)
            .map_err(|e| Error::corrupt(e.to_string()))?;
        Ok(())
    })?;
    // Unknown-size frames got max_size of (mostly untouched) capacity; give
    // the unused tail back so cached chunks cost what they hold.
    if out.capacity() - out.len() > 64 << 10 {
        out.shrink_to_fit();
    }
    Ok(out)
}

/// Encodes `data` as a DataBlob; with `compress`, zstd level 1, falling back
/// to an uncompressed blob when compression does not make it smaller.
pub fn encode(data: &[u8], compress: bool) -> Vec<u8> {
    if compress && !data.is_empty() {
        if let Some(blob) = encode_compressed(data) {
            return blob;
        }
    }
    let mut out = Vec::with_capacity(HEADER_SIZE + data.len());
    out.extend_from_slice(&UNCOMPRESSED_BLOB_MAGIC);
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// The compressed blob, or None when it would not be smaller than the data.
fn encode_compressed(data: &[u8]) -> Option<Vec<u8>> {
    // Room for header + (len - 1) payload bytes: if zstd needs more it fails
    // and the data is stored uncompressed.
    let mut out = Vec::with_capacity(HEADER_SIZE + data.len() - 1);
    out.extend_from_slice(&COMPRESSED_BLOB_MAGIC);
    out.extend_from_slice(&[0u8; 4]);
    let written = COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let comp = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?),
        };
        let mut cursor = Cursor::new(&mut out);
        cursor.set_position(HEADER_SIZE as u64);
        comp.compress_to_buffer(data, &mut cursor).ok()
    })?;
    if written >= data.len() || out.len() != HEADER_SIZE + written {
        return None;
    }
    let crc = crc32fast::hash(&out[HEADER_SIZE..]);
    out[8..HEADER_SIZE].copy_from_slice(&crc.to_le_bytes());
    Some(out)
}

fn hex8(m: &[u8; 8]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MAX_CHUNK_SIZE;

    fn magic_of(s: &str) -> [u8; 8] {
        let d = sha256(s.as_bytes());
        d[..8].try_into().unwrap()
    }

    #[test]
    fn the_seven_magics_are_pinned() {
        let cases: [(&[u8; 8], &str, &str); 7] = [
            (
                &UNCOMPRESSED_BLOB_MAGIC,
                "Proxmox Backup uncompressed blob v1.0",
                "42ab3807be8370a1",
            ),
            (
                &COMPRESSED_BLOB_MAGIC,
                "Proxmox Backup zstd compressed blob v1.0",
                "31b958426fb6a37f",
            ),
            (
                &ENCRYPTED_BLOB_MAGIC,
                "Proxmox Backup encrypted blob v1.0",
                "7b6785be222d4cf0",
            ),
            (
                &ENCR_COMPR_BLOB_MAGIC,
                "Proxmox Backup zstd compressed encrypted blob v1.0",
                "e6591bbf0bbfd80b",
            ),
            (
                &FIXED_INDEX_MAGIC,
                "Proxmox Backup fixed sized chunk index v1.0",
                "2f7f41ed91fd0fcd",
            ),
            (
                &DYNAMIC_INDEX_MAGIC,
                "Proxmox Backup dynamic sized chunk index v1.0",
                "1c914ea519bab3cd",
            ),
            (
                &CATALOG_MAGIC,
                "Proxmox Backup Catalog file v1.0",
                "91fd60f9c46758d5",
            ),
        ];
        for (constant, source, hex) in cases {
            assert_eq!(*constant, magic_of(source), "{source}");
            assert_eq!(hex8(constant), hex, "{source}");
        }
    }

    #[test]
    fn plain_blob_of_hello_is_byte_exact() {
        let blob = encode(b"hello", false);
        let expected = [
            0x42, 0xab, 0x38, 0x07, 0xbe, 0x83, 0x70, 0xa1, 0x86, 0xa6, 0x10, 0x36, b'h', b'e',
            b'l', b'l', b'o',
        ];
        assert_eq!(blob, expected);
        // Compression cannot shrink 5 bytes, so the compressed path stores it plain.
        assert_eq!(encode(b"hello", true), expected);
        let digest = sha256(b"hello");
        assert_eq!(
            decode(&blob, Some(&digest), MAX_CHUNK_SIZE).unwrap(),
            b"hello"
        );
    }

    fn test_chunk() -> Vec<u8> {
        (0..100_000u32).map(|i| (i % 255) as u8).collect()
    }

    #[test]
    fn test_chunk_digest_is_pinned() {
        // Proxmox Backup's tests/blob_writer.rs TEST_DIGEST_PLAIN.
        assert_eq!(
            digest_hex(&sha256(&test_chunk())),
            "539a60c3a7cc268ecce082c9184702bc829bb106a2643dee26db3ff0bf8457ee"
        );
    }

    #[test]
    fn round_trips_plain_and_zstd() {
        let data = test_chunk();
        let digest = sha256(&data);
        let plain = encode(&data, false);
        assert_eq!(plain[..8], UNCOMPRESSED_BLOB_MAGIC);
        assert_eq!(plain.len(), HEADER_SIZE + data.len());
        assert_eq!(decode(&plain, Some(&digest), MAX_CHUNK_SIZE).unwrap(), data);

        let zstd = encode(&data, true);
        assert_eq!(zstd[..8], COMPRESSED_BLOB_MAGIC);
        assert!(zstd.len() < data.len() / 10, "compressed to {}", zstd.len());
        assert_eq!(decode(&zstd, Some(&digest), MAX_CHUNK_SIZE).unwrap(), data);
        // Exactly enough room is fine; one byte less is corruption.
        assert_eq!(decode(&zstd, None, data.len()).unwrap(), data);
        assert_eq!(
            decode(&zstd, None, data.len() - 1).unwrap_err().kind,
            ErrorKind::Corrupt
        );
        assert_eq!(
            decode(&plain, None, data.len() - 1).unwrap_err().kind,
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn decodes_streamed_frames_without_content_size() {
        // Proxmox Backup writes streaming frames that record no content size.
        let data = test_chunk();
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        for piece in data.chunks(4096) {
            std::io::Write::write_all(&mut enc, piece).unwrap();
        }
        let frame = enc.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&frame).ok(),
            Some(None)
        );
        let mut blob = COMPRESSED_BLOB_MAGIC.to_vec();
        blob.extend_from_slice(&crc32fast::hash(&frame).to_le_bytes());
        blob.extend_from_slice(&frame);
        let out = decode(&blob, Some(&sha256(&data)), MAX_CHUNK_SIZE).unwrap();
        assert_eq!(out, data);
        assert!(out.capacity() < data.len() + (64 << 10));
        assert_eq!(
            decode(&blob, None, 99_999).unwrap_err().kind,
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn incompressible_data_is_stored_plain() {
        let mut next = crate::testing::xorshift(0x1234_5678_9abc_def0);
        let data: Vec<u8> = (0..65536).map(|_| next() as u8).collect();
        let blob = encode(&data, true);
        assert_eq!(blob[..8], UNCOMPRESSED_BLOB_MAGIC);
        assert_eq!(decode(&blob, None, MAX_CHUNK_SIZE).unwrap(), data);
    }

    #[test]
    fn empty_data_round_trips() {
        let blob = encode(b"", true);
        assert_eq!(blob.len(), HEADER_SIZE);
        assert_eq!(decode(&blob, Some(&sha256(b"")), 0).unwrap(), b"");
    }

    #[test]
    fn read_path_relies_on_the_digest() {
        let data = test_chunk();
        let digest = sha256(&data);
        for compress in [false, true] {
            let blob = encode(&data, compress);
            let payload = |b: &[u8]| b[HEADER_SIZE..].to_vec();
            // A damaged CRC field alone: the data is intact and is
            // returned; verify's decode still reports the damage.
            let mut bad_crc = blob.clone();
            bad_crc[9] ^= 0x40;
            let header = parse_header(&bad_crc, Some(&digest)).unwrap();
            let got = decode_payload(
                &header,
                Cow::Owned(payload(&bad_crc)),
                Some(&digest),
                MAX_CHUNK_SIZE,
            )
            .unwrap();
            assert_eq!(got, data);
            assert_eq!(
                decode(&bad_crc, Some(&digest), MAX_CHUNK_SIZE)
                    .unwrap_err()
                    .kind,
                ErrorKind::Corrupt
            );
            // Without a digest the CRC is what catches it.
            assert_eq!(
                decode_payload(&header, Cow::Owned(payload(&bad_crc)), None, MAX_CHUNK_SIZE)
                    .unwrap_err()
                    .kind,
                ErrorKind::Corrupt
            );
            // A damaged payload byte never comes back as wrong data: an
            // uncompressed one always fails; a compressed one fails or (a
            // byte the frame does not need) still decodes to the data.
            for at in HEADER_SIZE..blob.len() {
                let mut bad = blob.clone();
                bad[at] ^= 0x10;
                let header = parse_header(&bad, Some(&digest)).unwrap();
                match decode_payload(
                    &header,
                    Cow::Owned(payload(&bad)),
                    Some(&digest),
                    MAX_CHUNK_SIZE,
                ) {
                    Err(e) => assert_eq!(e.kind, ErrorKind::Corrupt, "{compress} {at}"),
                    Ok(got) => assert!(compress && got == data, "{compress} {at}"),
                }
                if !compress && at > HEADER_SIZE + 4096 {
                    break;
                }
            }
        }
    }

    #[test]
    fn corruption_is_detected_and_names_the_digest() {
        let data = test_chunk();
        let digest = sha256(&data);
        for compress in [false, true] {
            let blob = encode(&data, compress);
            // A flipped payload byte fails the CRC.
            let mut bad = blob.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            let err = decode(&bad, Some(&digest), MAX_CHUNK_SIZE).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Corrupt);
            assert!(
                err.message.contains(&digest_hex(&digest)),
                "{}",
                err.message
            );
            // A flipped CRC byte too.
            let mut bad = blob.clone();
            bad[9] ^= 0x40;
            assert_eq!(
                decode(&bad, Some(&digest), MAX_CHUNK_SIZE)
                    .unwrap_err()
                    .kind,
                ErrorKind::Corrupt
            );
            // Wrong magic.
            let mut bad = blob.clone();
            bad[0] ^= 1;
            let err = decode(&bad, Some(&digest), MAX_CHUNK_SIZE).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Corrupt);
            assert!(err.message.contains("magic"), "{}", err.message);
            // Valid blob, wrong digest.
            let other = sha256(b"other");
            let err = decode(&blob, Some(&other), MAX_CHUNK_SIZE).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Corrupt);
            assert!(err.message.contains(&digest_hex(&other)), "{}", err.message);
            // Truncated.
            for len in [0, 7, 8, 11] {
                assert_eq!(
                    decode(&blob[..len], None, MAX_CHUNK_SIZE).unwrap_err().kind,
                    ErrorKind::Corrupt
                );
            }
        }
    }

    #[test]
    fn garbage_zstd_with_valid_crc_is_corrupt() {
        let payload = b"\x28\xb5\x2f\xfd this is not really zstd";
        let mut blob = COMPRESSED_BLOB_MAGIC.to_vec();
        blob.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        blob.extend_from_slice(payload);
        assert_eq!(
            decode(&blob, None, MAX_CHUNK_SIZE).unwrap_err().kind,
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn frame_lying_about_its_size_is_refused_without_allocating_it() {
        // A frame header claiming 1 TiB of content (8-byte content size field).
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xc0, 0x00];
        frame.extend_from_slice(&(1u64 << 40).to_le_bytes());
        frame.extend_from_slice(&[0u8; 16]);
        let mut blob = COMPRESSED_BLOB_MAGIC.to_vec();
        blob.extend_from_slice(&crc32fast::hash(&frame).to_le_bytes());
        blob.extend_from_slice(&frame);
        let err = decode(&blob, None, MAX_CHUNK_SIZE).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        assert!(err.message.contains("claims"), "{}", err.message);

        // A frame that records its size: exactly the limit works, one less does not.
        let data = vec![7u8; 1000];
        let mut comp = zstd::bulk::Compressor::new(1).unwrap();
        comp.set_pledged_src_size(Some(data.len() as u64)).unwrap();
        let frame = comp.compress(&data).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&frame).ok(),
            Some(Some(1000))
        );
        let mut blob = COMPRESSED_BLOB_MAGIC.to_vec();
        blob.extend_from_slice(&crc32fast::hash(&frame).to_le_bytes());
        blob.extend_from_slice(&frame);
        assert_eq!(
            decode(&blob, None, 999).unwrap_err().kind,
            ErrorKind::Corrupt
        );
        assert_eq!(decode(&blob, None, 1000).unwrap(), data);
    }

    #[test]
    fn encrypted_blobs_are_unsupported() {
        for magic in [ENCRYPTED_BLOB_MAGIC, ENCR_COMPR_BLOB_MAGIC] {
            let mut blob = magic.to_vec();
            blob.extend_from_slice(&[0u8; 36 + 100]);
            let digest = sha256(b"x");
            let err = decode(&blob, Some(&digest), MAX_CHUNK_SIZE).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Unsupported);
            assert_eq!(err.kind.code(), 1005);
            assert!(err.message.contains(&digest_hex(&digest)));
        }
    }
}
