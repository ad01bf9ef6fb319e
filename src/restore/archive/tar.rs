//! POSIX.1-2001 (pax) tar writer.
//!
//! Every member gets a ustar header; whatever ustar cannot hold exactly (long
//! or non-ASCII names and link targets, sizes of 8 GiB and more, large
//! uid/gid, mtimes before 1970 or after 2242) also goes into a pax extended
//! header just before it, and the numeric ustar field then carries the GNU
//! base-256 form so readers without pax still see the right number. Names
//! are written as raw bytes, like GNU tar does, so names that are not UTF-8
//! round-trip unchanged.

use std::io::{self, Read};

use super::{check_entry, copy_data, invalid, ArchiveEntry, ArchiveWriter, EntryKind, FinishWrite};
use crate::restore::acl;

const BLOCK: usize = 512;

pub(crate) struct TarWriter {
    out: Box<dyn FinishWrite>,
}

impl TarWriter {
    pub(crate) fn new(out: Box<dyn FinishWrite>) -> Self {
        TarWriter { out }
    }

    fn write_padding(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][rem..])?;
        }
        Ok(())
    }
}

impl TarWriter {
    /// A file with holes as a GNU sparse 1.0 member: pax records name the
    /// file and its size, the header a stand-in under `GNUSparseFile.0/`
    /// (where tars that know no sparse files put the condensed data), and
    /// the data is the map of regions (decimal lines, padded to a block)
    /// followed by the regions' bytes.
    fn append_sparse(
        &mut self,
        entry: &ArchiveEntry,
        size: u64,
        regions: &[(u64, u64)],
        data: Option<&mut dyn Read>,
    ) -> io::Result<()> {
        let mut end = 0u64;
        for &(offset, len) in regions {
            match offset.checked_add(len) {
                Some(e) if offset >= end && e <= size => end = e,
                _ => return Err(invalid(&entry.path, "data regions out of order")),
            }
        }
        let mut map = format!("{}\n", regions.len() + 1);
        for (offset, len) in regions {
            map.push_str(&format!("{offset}\n{len}\n"));
        }
        // the end of the file, as GNU tar marks it
        map.push_str(&format!("{size}\n0\n"));
        let mut map = map.into_bytes();
        map.resize(map.len().div_ceil(BLOCK) * BLOCK, 0);
        let stored: u64 = regions.iter().map(|r| r.1).sum();
        let (dir, base) = match entry.path.iter().rposition(|&b| b == b'/') {
            Some(slash) => (&entry.path[..=slash], &entry.path[slash + 1..]),
            None => (&[][..], &entry.path[..]),
        };
        let condensed = ArchiveEntry {
            path: [dir, b"GNUSparseFile.0/", base].concat(),
            kind: EntryKind::File {
                size: map.len() as u64 + stored,
            },
            sparse: None,
            mtime_ns: 0,
            xattrs: Vec::new(),
            ..entry.clone()
        };
        let (header, mut pax) = build_header(&condensed);
        pax_record(&mut pax, "GNU.sparse.major", b"1");
        pax_record(&mut pax, "GNU.sparse.minor", b"0");
        pax_record(&mut pax, "GNU.sparse.name", &entry.path);
        pax_record(&mut pax, "GNU.sparse.realsize", size.to_string().as_bytes());
        let pax_header = pax_header_block(&entry.path, pax.len() as u64);
        self.out.write_all(&pax_header)?;
        self.out.write_all(&pax)?;
        self.write_padding(pax.len() as u64)?;
        self.out.write_all(&header)?;
        self.out.write_all(&map)?;
        copy_data(&entry.path, stored, data, &mut *self.out, |_| {})?;
        self.write_padding(stored)
    }
}

impl ArchiveWriter for TarWriter {
    fn append(&mut self, entry: &ArchiveEntry, data: Option<&mut dyn Read>) -> io::Result<()> {
        check_entry(entry)?;
        if let (EntryKind::File { size }, Some(regions)) = (&entry.kind, &entry.sparse) {
            return self.append_sparse(entry, *size, regions, data);
        }
        let (header, pax) = build_header(entry);
        if !pax.is_empty() {
            let pax_header = pax_header_block(&entry.path, pax.len() as u64);
            self.out.write_all(&pax_header)?;
            self.out.write_all(&pax)?;
            self.write_padding(pax.len() as u64)?;
        }
        self.out.write_all(&header)?;
        if let EntryKind::File { size } = entry.kind {
            copy_data(&entry.path, size, data, &mut *self.out, |_| {})?;
            self.write_padding(size)?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        self.out.finish()
    }
}

/// Field offsets and widths of the ustar header.
mod field {
    pub const NAME: (usize, usize) = (0, 100);
    pub const MODE: (usize, usize) = (100, 8);
    pub const UID: (usize, usize) = (108, 8);
    pub const GID: (usize, usize) = (116, 8);
    pub const SIZE: (usize, usize) = (124, 12);
    pub const MTIME: (usize, usize) = (136, 12);
    pub const CHKSUM: (usize, usize) = (148, 8);
    pub const TYPEFLAG: usize = 156;
    pub const LINKNAME: (usize, usize) = (157, 100);
    pub const MAGIC: (usize, usize) = (257, 8);
    pub const DEVMAJOR: (usize, usize) = (329, 8);
    pub const DEVMINOR: (usize, usize) = (337, 8);
    pub const PREFIX: (usize, usize) = (345, 155);
}

fn put(block: &mut [u8; BLOCK], (off, len): (usize, usize), bytes: &[u8]) {
    let n = bytes.len().min(len);
    if let (Some(dst), Some(src)) = (block.get_mut(off..off + n), bytes.get(..n)) {
        dst.copy_from_slice(src);
    }
}

/// Writes `value` as zero-padded octal with a terminating NUL if it fits;
/// returns false (writing nothing) if it does not.
fn put_octal(block: &mut [u8; BLOCK], (off, len): (usize, usize), value: u64) -> bool {
    let digits = len - 1;
    let text = format!("{value:0digits$o}");
    if text.len() > digits {
        return false;
    }
    put(block, (off, len), text.as_bytes());
    true
}

/// GNU base-256: the first byte has its top bit set, the rest is the
/// two's-complement big-endian value (0xff lead for negative numbers).
fn put_base256(block: &mut [u8; BLOCK], (off, len): (usize, usize), value: i64) {
    let mut bytes = vec![if value < 0 { 0xffu8 } else { 0 }; len];
    let be = value.to_be_bytes();
    let start = len.saturating_sub(be.len());
    if let Some(dst) = bytes.get_mut(start..) {
        dst.copy_from_slice(&be[be.len() - (len - start)..]);
    }
    if let Some(first) = bytes.first_mut() {
        *first |= 0x80;
    }
    put(block, (off, len), &bytes);
}

/// A numeric field: octal if it fits, else base-256 plus a pax record.
fn put_number(
    block: &mut [u8; BLOCK],
    pax: &mut Vec<u8>,
    field: (usize, usize),
    key: &str,
    value: i64,
) {
    if !put_field(block, field, value) {
        pax_record(pax, key, value.to_string().as_bytes());
    }
}

/// Puts `value` into a numeric field, in octal if it fits (returns true),
/// else in GNU base-256.
fn put_field(block: &mut [u8; BLOCK], field: (usize, usize), value: i64) -> bool {
    let fits = u64::try_from(value).is_ok_and(|v| put_octal(block, field, v));
    if !fits {
        put_base256(block, field, value);
    }
    fits
}

/// A time as pax writes it: seconds, a point, nine digits of fraction;
/// before 1970 the whole value is negative (-1.25 is 1.25 s before).
fn pax_time(secs: i64, nanos: u32) -> String {
    if secs < 0 && nanos > 0 {
        format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nanos)
    } else {
        format!("{secs}.{nanos:09}")
    }
}

/// Appends one pax record "LEN KEY=VALUE\n"; LEN counts the whole record,
/// its own digits included.
fn pax_record(pax: &mut Vec<u8>, key: impl AsRef<[u8]>, value: &[u8]) {
    let key = key.as_ref();
    let rest = 1 + key.len() + 1 + value.len() + 1;
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len = len.to_string().len() + rest;
    }
    pax.extend_from_slice(len.to_string().as_bytes());
    pax.push(b' ');
    pax.extend_from_slice(key);
    pax.push(b'=');
    pax.extend_from_slice(value);
    pax.push(b'\n');
}

/// Splits `name` into ustar (prefix, name) at a '/', if it can be held that
/// way; the name part must be non-empty.
fn split_ustar(name: &[u8]) -> Option<(&[u8], &[u8])> {
    if name.len() <= 100 {
        return Some((&[], name));
    }
    // The prefix is everything before some '/', at most 155 bytes; take the
    // longest such prefix so the name part is as short as possible.
    let limit = name.len().min(156);
    let slash = name.get(..limit)?.iter().rposition(|&b| b == b'/')?;
    let (prefix, rest) = (name.get(..slash)?, name.get(slash + 1..)?);
    (!prefix.is_empty() && !rest.is_empty() && rest.len() <= 100).then_some((prefix, rest))
}

/// The ustar header for `entry` and the pax records it needs (empty if none).
fn build_header(entry: &ArchiveEntry) -> ([u8; BLOCK], Vec<u8>) {
    let mut block = [0u8; BLOCK];
    let mut pax = Vec::new();

    let mut name = entry.path.clone();
    if entry.kind == EntryKind::Dir {
        name.push(b'/');
    }
    match split_ustar(&name).filter(|_| name.is_ascii()) {
        Some((prefix, rest)) => {
            put(&mut block, field::PREFIX, prefix);
            put(&mut block, field::NAME, rest);
        }
        None => {
            put(&mut block, field::NAME, &name);
            pax_record(&mut pax, "path", &name);
        }
    }

    let (typeflag, size, link) = match &entry.kind {
        EntryKind::File { size } => (b'0', *size, None),
        EntryKind::Hardlink { target } => (b'1', 0, Some(target)),
        EntryKind::Symlink { target } => (b'2', 0, Some(target)),
        EntryKind::Char { .. } => (b'3', 0, None),
        EntryKind::Block { .. } => (b'4', 0, None),
        EntryKind::Dir => (b'5', 0, None),
        EntryKind::Fifo => (b'6', 0, None),
    };
    block[field::TYPEFLAG] = typeflag;
    if let Some(link) = link {
        put(&mut block, field::LINKNAME, link);
        if link.len() > 100 || !link.is_ascii() {
            pax_record(&mut pax, "linkpath", link);
        }
    }

    put_octal(&mut block, field::MODE, u64::from(entry.mode & 0o7777));
    put_number(
        &mut block,
        &mut pax,
        field::UID,
        "uid",
        i64::from(entry.uid),
    );
    put_number(
        &mut block,
        &mut pax,
        field::GID,
        "gid",
        i64::from(entry.gid),
    );
    // Sizes above i64::MAX cannot occur for real files; clamp rather than wrap.
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    put_number(&mut block, &mut pax, field::SIZE, "size", size);
    if entry.mtime_ns == 0 {
        put_number(&mut block, &mut pax, field::MTIME, "mtime", entry.mtime);
    } else {
        // the seconds for readers without pax, the exact time in pax
        put_field(&mut block, field::MTIME, entry.mtime);
        let exact = pax_time(entry.mtime, entry.mtime_ns);
        pax_record(&mut pax, "mtime", exact.as_bytes());
    }
    if let EntryKind::Char { major, minor } | EntryKind::Block { major, minor } = entry.kind {
        // No pax keyword exists for device numbers; base-256 covers any u32.
        for (f, v) in [(field::DEVMAJOR, major), (field::DEVMINOR, minor)] {
            if !put_octal(&mut block, f, u64::from(v)) {
                put_base256(&mut block, f, i64::from(v));
            }
        }
    }
    for (name, value) in &entry.xattrs {
        // A pax key ends at its '=': a name holding one cannot be written
        // so that any reader takes it back whole.
        if !name.is_empty() && !name.contains(&b'=') && !name.contains(&0) {
            pax_record(&mut pax, [XATTR_KEY, name].concat(), value);
        }
        // GNU tar restores ACLs (`--acls`) from star's text records only,
        // never from their attributes
        let acl_key = match name.as_slice() {
            acl::ACCESS => "SCHILY.acl.access",
            acl::DEFAULT => "SCHILY.acl.default",
            _ => continue,
        };
        if let Some(text) = acl::text(value) {
            pax_record(&mut pax, acl_key, text.as_bytes());
        }
    }
    put(&mut block, field::MAGIC, b"ustar\x0000");
    set_checksum(&mut block);
    (block, pax)
}

/// The pax key prefix of extended attributes (star's, which GNU tar and
/// bsdtar read).
const XATTR_KEY: &[u8] = b"SCHILY.xattr.";

/// The 'x' header announcing `len` bytes of pax records for member `path`.
fn pax_header_block(path: &[u8], len: u64) -> [u8; BLOCK] {
    let mut block = [0u8; BLOCK];
    // Readers without pax support would extract the records as a file; name
    // it after the member (ASCII only) under PaxHeaders, as GNU tar does.
    let base = path.rsplit(|&b| b == b'/').next().unwrap_or(b"");
    let mut name = b"PaxHeaders/".to_vec();
    name.extend(
        base.iter()
            .map(|&b| if b.is_ascii_graphic() { b } else { b'_' })
            .take(100 - name.len()),
    );
    put(&mut block, field::NAME, &name);
    put_octal(&mut block, field::MODE, 0o644);
    put_octal(&mut block, field::UID, 0);
    put_octal(&mut block, field::GID, 0);
    if !put_octal(&mut block, field::SIZE, len) {
        put_base256(
            &mut block,
            field::SIZE,
            i64::try_from(len).unwrap_or(i64::MAX),
        );
    }
    put_octal(&mut block, field::MTIME, 0);
    block[field::TYPEFLAG] = b'x';
    put(&mut block, field::MAGIC, b"ustar\x0000");
    set_checksum(&mut block);
    block
}

fn set_checksum(block: &mut [u8; BLOCK]) {
    put(block, field::CHKSUM, b"        ");
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    put(block, field::CHKSUM, text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &[u8], kind: EntryKind) -> ArchiveEntry {
        ArchiveEntry {
            path: path.to_vec(),
            kind,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime: 1_700_000_000,
            sparse: None,
            mtime_ns: 0,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn pax_record_length_counts_itself() {
        for vlen in [
            0, 1, 5, 6, 7, 80, 85, 86, 90, 95, 96, 97, 98, 990, 995, 9990,
        ] {
            let mut pax = Vec::new();
            pax_record(&mut pax, "path", &vec![b'a'; vlen]);
            let text = String::from_utf8(pax.clone()).unwrap();
            let (len, _) = text.split_once(' ').unwrap();
            assert_eq!(
                len.parse::<usize>().unwrap(),
                pax.len(),
                "value length {vlen}"
            );
        }
    }

    #[test]
    fn nanoseconds_go_into_a_pax_mtime() {
        let mut e = entry(b"f", EntryKind::File { size: 0 });
        e.mtime = 1_700_000_000;
        e.mtime_ns = 5;
        let (block, pax) = build_header(&e);
        assert_eq!(
            String::from_utf8_lossy(&pax),
            "30 mtime=1700000000.000000005\n"
        );
        assert_eq!(
            &block[136..148],
            b"14524770400\0",
            "the seconds in ustar too"
        );
        assert_eq!(pax_time(-2, 750_000_000), "-1.250000000");
        assert_eq!(pax_time(-2, 0), "-2.000000000");
        e.mtime_ns = 0;
        assert!(build_header(&e).1.is_empty(), "whole seconds need no pax");
    }

    #[test]
    fn acls_also_go_as_text() {
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 5, u32::MAX),
            (8, 7, 50),
            (0x10, 6, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        assert_eq!(
            acl::text(&acl).unwrap(),
            "user::rw-,user:1000:r--,group::r-x,group:50:rwx,mask::rw-,other::---"
        );
        assert_eq!(acl::text(&acl[..acl.len() - 1]), None);
        let mut e = entry(b"f", EntryKind::File { size: 0 });
        e.xattrs = vec![
            (b"system.posix_acl_access".to_vec(), acl),
            (b"user.a=b".to_vec(), b"x".to_vec()),
        ];
        let (_, pax) = build_header(&e);
        let pax = String::from_utf8_lossy(&pax);
        assert!(
            pax.contains(" SCHILY.xattr.system.posix_acl_access="),
            "{pax}"
        );
        assert!(
            pax.contains(" SCHILY.acl.access=user::rw-,user:1000:r--,"),
            "{pax}"
        );
        assert!(
            !pax.contains("user.a"),
            "a name with '=' is left out: {pax}"
        );
    }

    #[test]
    fn short_ascii_entry_needs_no_pax() {
        let (block, pax) = build_header(&entry(b"a/b.txt", EntryKind::File { size: 5 }));
        assert!(pax.is_empty());
        assert_eq!(&block[..7], b"a/b.txt");
        assert_eq!(&block[124..136], b"00000000005\0");
    }

    #[test]
    fn long_path_splits_into_prefix_when_possible() {
        let path = [vec![b'd'; 120], b"/".to_vec(), vec![b'f'; 90]].concat();
        let (block, pax) = build_header(&entry(&path, EntryKind::File { size: 0 }));
        assert!(pax.is_empty());
        assert_eq!(&block[345..465], &path[..120]);
        assert_eq!(&block[..90], &path[121..]);
    }

    #[test]
    fn large_and_negative_numbers_go_to_pax_and_base256() {
        let mut e = entry(b"big", EntryKind::File { size: 10 << 30 });
        e.mtime = -86400;
        e.uid = 4_000_000_000;
        let (block, pax) = build_header(&e);
        let pax = String::from_utf8(pax).unwrap();
        assert!(pax.contains(" size=10737418240\n"), "{pax}");
        assert!(pax.contains(" mtime=-86400\n"), "{pax}");
        assert!(pax.contains(" uid=4000000000\n"), "{pax}");
        assert!(!pax.contains("gid="), "{pax}");
        assert_eq!(block[124], 0x80);
        assert_eq!(&block[128..136], &(10u64 << 30).to_be_bytes());
        assert_eq!(
            &block[136..148],
            &[0xff; 4]
                .iter()
                .chain(&(-86400i64).to_be_bytes())
                .copied()
                .collect::<Vec<_>>()[..]
        );
    }
}
