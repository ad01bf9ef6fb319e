//! Streaming zip writer for outputs that cannot seek.
//!
//! Members are stored (not compressed). Each local header has flag bit 3 set:
//! the CRC-32 and sizes follow the data in a data descriptor. The central
//! directory at the end is built from small per-member records, kept already
//! serialized (about 80 bytes plus the name each) in blocks counted against
//! the agent's memory for listings (`--listing-mb`, shared with directory
//! listings), past which the archive fails rather than memory growing
//! without bound (a 128 MiB VM's 32 MiB hold some 250,000 members with
//! 50-byte paths). Members of 4 GiB and more
//! get zip64 fields, as do offsets past 4 GiB; more than 65535 members or a
//! large central directory add the zip64 end records. Each member records
//! "made by Unix" with its mode and file type in the external attributes,
//! its mtime in an extended-timestamp field (and as a DOS time), and its
//! uid/gid in an Info-ZIP Unix field. Names that are valid UTF-8 carry the
//! UTF-8 flag; other names are written as raw bytes. Zip has no hard links:
//! they are refused (see `Format::supports_hardlinks`).

use std::io::{self, Read, Write};

use super::{
    check_entry, copy_data, invalid, ArchiveEntry, ArchiveWriter, DirectWrite, EntryKind,
    FinishWrite,
};
use crate::calendar::civil_from_days;
use crate::restore::fs::{listing_limit, Charge};

const LOCAL_HEADER_SIG: u32 = 0x0403_4b50;
const DATA_DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const CENTRAL_HEADER_SIG: u32 = 0x0201_4b50;
const ZIP64_END_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const END_SIG: u32 = 0x0605_4b50;

const FLAG_DATA_DESCRIPTOR: u16 = 1 << 3;
const FLAG_UTF8: u16 = 1 << 11;
/// Version 4.5 (zip64); high byte 3 = Unix, whose external attributes carry
/// `st_mode` in their upper 16 bits.
const VERSION_MADE_BY: u16 = (3 << 8) | 45;
const VERSION_DEFAULT: u16 = 20;
const VERSION_ZIP64: u16 = 45;
const METHOD_STORED: u16 = 0;

const EXTRA_ZIP64: u16 = 0x0001;
const EXTRA_TIMESTAMP: u16 = 0x5455;
const EXTRA_UNIX_IDS: u16 = 0x7875;

const S_IFIFO: u32 = 0o010000;
const S_IFCHR: u32 = 0o020000;
const S_IFDIR: u32 = 0o040000;
const S_IFBLK: u32 = 0o060000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
/// MS-DOS directory attribute, set alongside the Unix mode for directories.
const DOS_DIRECTORY: u32 = 0x10;

/// Most memory the central directory may take besides the memory for
/// listings; a tree needing more must be extracted as tar.
pub(crate) const CENTRAL_LIMIT: usize = 256 << 20;
/// Bytes of the central directory allocated at a time: blocks, not one
/// buffer that doubles, so that it takes what it holds and no copy of it.
const CENTRAL_BLOCK: usize = 256 << 10;
/// Most bytes of a member's central record besides its name: 46 fixed, 28
/// of zip64 field, 9 of timestamp, 15 of Unix ids.
const CENTRAL_RECORD_EXTRA: usize = 46 + 28 + 9 + 15;

/// A u32 field that does not hold the value, which is in the zip64 field.
const U32_MAX: u32 = u32::MAX;
const U16_MAX: u16 = u16::MAX;

pub(crate) struct ZipWriter {
    out: Counting,
    /// The central directory, serialized as it will be written, in blocks
    /// of [`CENTRAL_BLOCK`].
    central: Vec<Vec<u8>>,
    /// bytes in `central`
    central_len: usize,
    central_limit: usize,
    /// the capacity of `central`, counted against the memory for listings
    charge: Charge,
    entries: u64,
}

impl ZipWriter {
    pub(crate) fn new(out: Box<dyn FinishWrite>) -> Self {
        Self::with_central_limit(out, CENTRAL_LIMIT)
    }

    fn with_central_limit(out: Box<dyn FinishWrite>, central_limit: usize) -> Self {
        ZipWriter {
            out: Counting {
                inner: out,
                written: 0,
            },
            central: Vec::new(),
            central_len: 0,
            central_limit,
            charge: Charge::new(),
            entries: 0,
        }
    }

    /// Makes room in the last block for a central record of up to `need`
    /// bytes, or refuses the member at `path` (the archive then fails).
    fn reserve_central(&mut self, need: usize, path: &[u8]) -> io::Result<()> {
        let room = self.central.last().map_or(0, |b| b.capacity() - b.len());
        if room >= need {
            return Ok(());
        }
        let block = CENTRAL_BLOCK.min(self.central_limit).max(need);
        let refused = if self.central_len + need > self.central_limit {
            Some(format!("past {} MiB", self.central_limit >> 20))
        } else if self.charge.add(block).is_err() {
            Some(format!(
                "past the {} MiB the agent keeps for listings (--listing-mb)",
                listing_limit().div_ceil(1 << 20)
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "zip central directory {why} at member {} ({} members): too many \
                     members for zip, extract as tar",
                    String::from_utf8_lossy(path),
                    self.entries
                ),
            ));
        }
        self.central.push(Vec::with_capacity(block));
        Ok(())
    }
}

/// Counts the bytes written, for member offsets.
struct Counting {
    inner: Box<dyn FinishWrite>,
    written: u64,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl DirectWrite for Counting {
    fn write_from(
        &mut self,
        src: &mut dyn Read,
        max: usize,
        seen: &mut dyn FnMut(&[u8]),
    ) -> Option<io::Result<usize>> {
        let n = self.inner.write_from(src, max, seen)?;
        if let Ok(n) = n {
            self.written += n as u64;
        }
        Some(n)
    }
}

fn le16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn le32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn le64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

impl ArchiveWriter for ZipWriter {
    fn append(&mut self, entry: &ArchiveEntry, data: Option<&mut dyn Read>) -> io::Result<()> {
        check_entry(entry)?;
        self.reserve_central(CENTRAL_RECORD_EXTRA + entry.path.len(), &entry.path)?;
        let perm = entry.mode & 0o7777;
        let (unix_mode, size, content): (u32, u64, Option<&[u8]>) = match &entry.kind {
            EntryKind::File { size } => (S_IFREG | perm, *size, None),
            EntryKind::Dir => (S_IFDIR | perm, 0, None),
            EntryKind::Symlink { target } => (S_IFLNK | perm, target.len() as u64, Some(target)),
            EntryKind::Hardlink { .. } => {
                return Err(invalid(&entry.path, "zip archives cannot hold hard links"))
            }
            EntryKind::Char { .. } => (S_IFCHR | perm, 0, None),
            EntryKind::Block { .. } => (S_IFBLK | perm, 0, None),
            EntryKind::Fifo => (S_IFIFO | perm, 0, None),
        };
        let mut name = entry.path.clone();
        if entry.kind == EntryKind::Dir {
            name.push(b'/');
        }
        let name_len = u16::try_from(name.len())
            .map_err(|_| invalid(&entry.path, "name longer than 65535 bytes"))?;
        let flags = FLAG_DATA_DESCRIPTOR
            | if std::str::from_utf8(&name).is_ok() {
                FLAG_UTF8
            } else {
                0
            };
        let (dos_time, dos_date) = dos_datetime(entry.mtime);
        // mtimes outside the 32-bit range of the timestamp field keep only the
        // (clamped) DOS time.
        let mtime32 = i32::try_from(entry.mtime).ok();
        let zip64_sizes = size >= u64::from(U32_MAX);
        let offset = self.out.written;

        // Local header.
        let mut h = Vec::with_capacity(30 + name.len() + 64);
        le32(&mut h, LOCAL_HEADER_SIG);
        le16(
            &mut h,
            if zip64_sizes {
                VERSION_ZIP64
            } else {
                VERSION_DEFAULT
            },
        );
        le16(&mut h, flags);
        le16(&mut h, METHOD_STORED);
        le16(&mut h, dos_time);
        le16(&mut h, dos_date);
        le32(&mut h, 0); // CRC-32, in the data descriptor
        let size_field = if zip64_sizes { U32_MAX } else { 0 };
        le32(&mut h, size_field);
        le32(&mut h, size_field);
        le16(&mut h, name_len);
        let mut extra = Vec::with_capacity(48);
        if zip64_sizes {
            le16(&mut extra, EXTRA_ZIP64);
            le16(&mut extra, 16);
            le64(&mut extra, 0);
            le64(&mut extra, 0);
        }
        push_common_extra(&mut extra, mtime32, entry.uid, entry.gid);
        le16(&mut h, extra.len() as u16);
        h.extend_from_slice(&name);
        h.extend_from_slice(&extra);
        self.out.write_all(&h)?;

        // Data and descriptor.
        let mut crc = crc32fast::Hasher::new();
        match content {
            Some(bytes) => {
                crc.update(bytes);
                self.out.write_all(bytes)?;
            }
            None if matches!(entry.kind, EntryKind::File { .. }) => {
                copy_data(&entry.path, size, data, &mut self.out, |b| crc.update(b))?
            }
            None => {}
        }
        let crc = crc.finalize();
        let mut d = Vec::with_capacity(24);
        le32(&mut d, DATA_DESCRIPTOR_SIG);
        le32(&mut d, crc);
        if zip64_sizes {
            le64(&mut d, size);
            le64(&mut d, size);
        } else {
            le32(&mut d, size as u32);
            le32(&mut d, size as u32);
        }
        self.out.write_all(&d)?;

        // Central directory record.
        let zip64_offset = offset >= u64::from(U32_MAX);
        let Some(c) = self.central.last_mut() else {
            return Err(io::Error::other("zip central directory: no block reserved"));
        };
        let before = c.len();
        le32(c, CENTRAL_HEADER_SIG);
        le16(c, VERSION_MADE_BY);
        le16(
            c,
            if zip64_sizes || zip64_offset {
                VERSION_ZIP64
            } else {
                VERSION_DEFAULT
            },
        );
        le16(c, flags);
        le16(c, METHOD_STORED);
        le16(c, dos_time);
        le16(c, dos_date);
        le32(c, crc);
        let size32 = if zip64_sizes { U32_MAX } else { size as u32 };
        le32(c, size32);
        le32(c, size32);
        le16(c, name_len);
        let mut extra = Vec::with_capacity(48);
        if zip64_sizes || zip64_offset {
            let n = 8 * (2 * usize::from(zip64_sizes) + usize::from(zip64_offset));
            le16(&mut extra, EXTRA_ZIP64);
            le16(&mut extra, n as u16);
            if zip64_sizes {
                le64(&mut extra, size);
                le64(&mut extra, size);
            }
            if zip64_offset {
                le64(&mut extra, offset);
            }
        }
        push_common_extra(&mut extra, mtime32, entry.uid, entry.gid);
        le16(c, extra.len() as u16);
        le16(c, 0); // comment length
        le16(c, 0); // disk number start
        le16(c, 0); // internal attributes
        let dos_attr = if entry.kind == EntryKind::Dir {
            DOS_DIRECTORY
        } else {
            0
        };
        le32(c, (unix_mode << 16) | dos_attr);
        le32(c, if zip64_offset { U32_MAX } else { offset as u32 });
        c.extend_from_slice(&name);
        c.extend_from_slice(&extra);
        self.central_len += c.len() - before;
        self.entries += 1;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        let cd_offset = self.out.written;
        let cd_size = self.central_len as u64;
        for block in std::mem::take(&mut self.central) {
            self.out.write_all(&block)?;
        }
        let need_zip64 = self.entries >= u64::from(U16_MAX)
            || cd_offset >= u64::from(U32_MAX)
            || cd_size >= u64::from(U32_MAX);
        let mut t = Vec::with_capacity(98);
        if need_zip64 {
            let zip64_end_offset = cd_offset + cd_size;
            le32(&mut t, ZIP64_END_SIG);
            le64(&mut t, 44); // size of the rest of this record
            le16(&mut t, VERSION_MADE_BY);
            le16(&mut t, VERSION_ZIP64);
            le32(&mut t, 0); // this disk
            le32(&mut t, 0); // disk with the central directory
            le64(&mut t, self.entries);
            le64(&mut t, self.entries);
            le64(&mut t, cd_size);
            le64(&mut t, cd_offset);
            le32(&mut t, ZIP64_LOCATOR_SIG);
            le32(&mut t, 0); // disk with the zip64 end record
            le64(&mut t, zip64_end_offset);
            le32(&mut t, 1); // total disks
        }
        let entries16 = u16::try_from(self.entries).unwrap_or(U16_MAX);
        le32(&mut t, END_SIG);
        le16(&mut t, 0);
        le16(&mut t, 0);
        le16(&mut t, entries16);
        le16(&mut t, entries16);
        le32(&mut t, u32::try_from(cd_size).unwrap_or(U32_MAX));
        le32(&mut t, u32::try_from(cd_offset).unwrap_or(U32_MAX));
        le16(&mut t, 0); // comment length
        self.out.write_all(&t)?;
        self.out.inner.finish()
    }
}

/// The extra fields every header carries: extended timestamp (mtime only)
/// and Info-ZIP Unix uid/gid.
fn push_common_extra(extra: &mut Vec<u8>, mtime: Option<i32>, uid: u32, gid: u32) {
    if let Some(mtime) = mtime {
        le16(extra, EXTRA_TIMESTAMP);
        le16(extra, 5);
        extra.push(1); // flags: modification time present
        extra.extend_from_slice(&mtime.to_le_bytes());
    }
    le16(extra, EXTRA_UNIX_IDS);
    le16(extra, 11);
    extra.push(1); // version
    extra.push(4);
    le32(extra, uid);
    extra.push(4);
    le32(extra, gid);
}

/// The DOS (time, date) of a Unix time, taken as UTC and clamped to the DOS
/// range 1980-01-01 .. 2107-12-31.
fn dos_datetime(mtime: i64) -> (u16, u16) {
    const MIN: i64 = 315_532_800; // 1980-01-01T00:00:00Z
    const MAX: i64 = 4_354_819_199; // 2107-12-31T23:59:59Z
    let t = mtime.clamp(MIN, MAX);
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let time = ((secs / 3600) << 11) | (((secs / 60) % 60) << 5) | ((secs % 60) / 2);
    let date = ((year - 1980) << 9) | (month << 5) | day;
    (time as u16, date as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sink;
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl DirectWrite for Sink {}
    impl FinishWrite for Sink {
        fn finish(self: Box<Self>) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn central_directory_memory_is_capped() {
        let mut w = ZipWriter::with_central_limit(Box::new(Sink), 10_000);
        let mut appended = 0;
        let err = loop {
            let entry = ArchiveEntry {
                path: format!("dir/file-{appended:06}").into_bytes(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                sparse: None,
                mtime_ns: 0,
                xattrs: Vec::new(),
            };
            match w.append(&entry, None) {
                Ok(()) => appended += 1,
                Err(e) => break e,
            }
        };
        assert!(w.central_len <= 10_000, "{}", w.central_len);
        assert!((50..200).contains(&appended), "{appended}");
        assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
        assert!(err.to_string().contains("extract as tar"), "{err}");
    }

    #[test]
    fn dos_time_is_clamped_and_encoded() {
        // 2024-02-29 13:45:30 UTC
        let (time, date) = dos_datetime(1_709_214_330);
        assert_eq!(time, (13 << 11) | (45 << 5) | 15);
        assert_eq!(date, ((2024 - 1980) << 9) | (2 << 5) | 29);
        assert_eq!(dos_datetime(-5), (0, (1 << 5) | 1));
        assert_eq!(dos_datetime(i64::MAX).1, (127 << 9) | (12 << 5) | 31);
    }
}
