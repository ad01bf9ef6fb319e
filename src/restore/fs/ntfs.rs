//! NTFS backend on the ntfs crate.
//!
//! The crate reads LZNT1-compressed and encrypted data as zero bytes without
//! an error, so every read checks the $DATA attribute's flags: compressed
//! data is decoded here (`lznt1`, unit by unit over the data runs),
//! encrypted files are refused (1005), and so are reparse points other than
//! links and system compression (deduplicated, cloud files); files that
//! Windows' system compression keeps in XPRESS or LZX chunks are decoded
//! (`wof`, `xpress`, `lzx`). Symbolic
//! links and junctions are symlinks (`ntfs_link`). NTFS has no Unix owners
//! or modes: uid/gid 0, mode 0755 (dirs) / 0644 (files, minus write bits
//! when read-only) / 0777 (links); inode is the
//! file record number. Metafiles (`$MFT`, ...) are not listed. Names match
//! exactly first, then case-insensitively, as on Windows. A file's data
//! runs map it to volume extents (sparse runs and the bytes past its valid
//! data length as zeros), so its reads come from the chunk pool and its
//! holes stay out of tar streams. The runs of a fragmented file are
//! gathered from every file record its attribute list names. Directory
//! index records smaller than a cluster are read here (`index_entries`):
//! their numbers count 512-byte blocks, which the crate takes for clusters.
//! Must never write.

use std::collections::HashSet;
use std::io::SeekFrom;
use std::sync::Arc;

use ntfs::attribute_value::NtfsAttributeValue;
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{
    NtfsAttributeList, NtfsFileAttributeFlags, NtfsFileNamespace, NtfsIndexAllocation,
    NtfsIndexRoot,
};
use ntfs::types::Vcn;
use ntfs::{
    Ntfs, NtfsAttribute, NtfsAttributeFlags, NtfsAttributeItem, NtfsAttributeType, NtfsError,
    NtfsFile, NtfsIndexNodeEntries, NtfsReadSeek,
};

use crate::error::{Error, ErrorKind, Result};
use crate::le::{le16, le32, le64};
use crate::restore::disk::{read_exact_at, Disk, DiskCursor};
use crate::restore::fs::budget::Charge;
use crate::restore::fs::tree::{child_bytes, Backend, Child};
use crate::restore::fs::{lznt1, lzx, ntfs_link, wof, xpress};
use crate::restore::fs::{Device, EntryType, Extent, Meta};
use crate::restore::probe::{FsKind, Probe};

const ROOT_RECORD: u64 = 5;
/// Records below this are NTFS metafiles.
const FIRST_USER_RECORD: u64 = 24;
/// Seconds between 1601-01-01 and 1970-01-01.
const NT_TO_UNIX: i64 = 11_644_473_600;
/// Most entries read from one directory index.
const MAX_DIR_ENTRIES: usize = 4 << 20;
/// Most data runs of one file kept (32 bytes each, 8 MiB at most): a
/// file in more pieces than this is refused.
const MAX_DATA_RUNS: usize = 1 << 18;
/// The name of a directory's file name index.
const DIR_INDEX: &str = "$I30";

fn map_err(what: &str, e: NtfsError) -> Error {
    if let NtfsError::Io(io) = &e {
        if let Some(ours) = io.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
            return Error::new(ours.kind, format!("{what}: {}", ours.message));
        }
        return Error::new(ErrorKind::Io, format!("{what}: {e}"));
    }
    Error::corrupt(format!("{what}: corrupt NTFS filesystem: {e}"))
}

/// Largest file record and index record read: Windows makes 1 KiB file
/// records (4 KiB on 4Kn disks) and 4 KiB index records. The ntfs crate
/// allocates one record of the size the boot sector or an index root
/// names, which can say 2 GiB.
const MAX_RECORD_SIZE: u64 = 64 << 10;

/// Checks the record sizes the boot sector names before the ntfs crate
/// allocates by them.
fn check_boot_sector(disk: &dyn Disk) -> Result<()> {
    let mut boot = [0u8; 512];
    read_exact_at(disk, 0, &mut boot, "NTFS boot sector")?;
    let sector = u64::from(le16(&boot, 0x0B));
    // below 0x80 a count of sectors, above it a power of two
    let cluster = match boot[0x0D] {
        n @ 0..=0x80 => u64::from(n) * sector,
        n => sector << (256 - u32::from(n)).min(31),
    };
    // a positive count of clusters, or a negative power of two in bytes
    let record_size = |raw: u8| match raw as i8 {
        n @ 0.. => (n as u64).saturating_mul(cluster),
        n => 1u64 << n.unsigned_abs().min(63),
    };
    for (what, at) in [("file record", 0x40), ("index record", 0x44)] {
        let size = record_size(boot[at]);
        if size > MAX_RECORD_SIZE {
            return Err(Error::corrupt(format!(
                "NTFS filesystem: corrupt boot sector: {size}-byte {what}s \
                 (at most {MAX_RECORD_SIZE} are read)"
            )));
        }
    }
    Ok(())
}

fn open_ntfs(cur: &mut DiskCursor, disk: &dyn Disk) -> Result<Ntfs> {
    check_boot_sector(disk)?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Ntfs::new(cur))) {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(map_err("NTFS filesystem", e)),
        Err(_) => Err(Error::corrupt(
            "NTFS filesystem: the reader failed on the boot sector: corrupt filesystem",
        )),
    }
}

/// Describes the NTFS filesystem on `disk`.
pub fn probe(disk: Arc<dyn Disk>) -> Probe {
    let mut cur = DiskCursor::new(disk.clone());
    let mut probe = Probe {
        fs: Some(FsKind::Ntfs),
        ..Probe::default()
    };
    match open_ntfs(&mut cur, &*disk) {
        Ok(ntfs) => {
            probe.uuid = Some(format!("{:016X}", ntfs.serial_number()));
            let name = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ntfs.volume_name(&mut cur)
                    .and_then(|r| r.ok())
                    .map(|n| n.name().to_string_lossy())
            }));
            probe.label = name.ok().flatten().filter(|n| !n.is_empty());
        }
        Err(e) => probe.unsupported = Some(e),
    }
    probe
}

fn unix_time(nt: u64) -> i64 {
    (nt / 10_000_000) as i64 - NT_TO_UNIX
}

/// The nanoseconds past [`unix_time`] of an NT time (100 ns units).
fn nanos(nt: u64) -> u32 {
    (nt % 10_000_000) as u32 * 100
}

pub struct NtfsBackend {
    ntfs: Ntfs,
    cur: DiskCursor,
    disk: Arc<dyn Disk>,
    /// the compression unit (LZNT1) or system-compression chunk (WOF)
    /// last decoded: (record, unit or chunk number, its bytes); a file is
    /// compressed one way or the other
    unit: Option<(u64, u64, Vec<u8>)>,
    /// the data runs of the file last read or mapped (record, runs; `None`
    /// when its data is not in runs), so that reading or mapping a file a
    /// piece at a time parses its run list once
    runs: Option<(u64, Option<Arc<DataRuns>>)>,
}

/// Where a file's data lies: its runs in file order (from every file
/// record holding a piece of them), its size, its valid data length (past
/// it, zeros) and whether it is compressed.
struct DataRuns {
    runs: Vec<Run>,
    size: u64,
    valid: u64,
    /// bytes of a compression unit, for compressed data
    compression_unit: Option<u64>,
}

/// A data run: `len` bytes of the file from `start`, at volume byte `disk`
/// (`None`: sparse, zeros).
#[derive(Clone, Copy)]
struct Run {
    start: u64,
    len: u64,
    disk: Option<u64>,
}

impl NtfsBackend {
    pub fn open(disk: Arc<dyn Disk>) -> Result<NtfsBackend> {
        let mut cur = DiskCursor::new(disk.clone());
        let ntfs = open_ntfs(&mut cur, &*disk)?;
        Ok(NtfsBackend {
            ntfs,
            cur,
            disk,
            unit: None,
            runs: None,
        })
    }

    /// The data runs of record `node`'s unnamed `$DATA`, or `None` where
    /// there are none (resident data, no data) or they are not to be read
    /// (encrypted files, reparse points: `read_at` says why).
    fn data_runs(&mut self, node: u64) -> Result<Option<Arc<DataRuns>>> {
        if let Some((record, runs)) = &self.runs {
            if *record == node {
                return Ok(runs.clone());
            }
        }
        let runs = self.read_data_runs(node)?.map(Arc::new);
        self.runs = Some((node, runs.clone()));
        Ok(runs)
    }

    /// Reads compressed data: each compression unit whose clusters are all
    /// stored is the data as it is, one without any is zeros, and one with
    /// fewer (the rest sparse) holds LZNT1 chunks. The unit last decoded is
    /// kept for the reads that follow.
    fn read_compressed(
        &mut self,
        node: u64,
        what: &str,
        data: &DataRuns,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let (Some(unit), size) = (data.compression_unit, data.size) else {
            return Ok(0);
        };
        if offset >= size {
            return Ok(0);
        }
        let want = buf.len().min((size - offset) as usize);
        let mut done = 0;
        while done < want {
            let pos = offset + done as u64;
            let index = pos / unit;
            let plain = self.decoded_unit(node, index, unit, data, what)?;
            let within = (pos - index * unit) as usize;
            let n = (want - done).min(plain.len() - within);
            buf[done..done + n].copy_from_slice(&plain[within..within + n]);
            done += n;
        }
        // past the valid data length, zeros
        let valid = data.valid.saturating_sub(offset).min(want as u64) as usize;
        buf[valid..want].fill(0);
        Ok(want)
    }

    /// The bytes of compression unit `index` (`unit` bytes), decoded.
    fn decoded_unit(
        &mut self,
        node: u64,
        index: u64,
        unit: u64,
        data: &DataRuns,
        what: &str,
    ) -> Result<&[u8]> {
        let cached = matches!(&self.unit, Some((n, i, _)) if *n == node && *i == index);
        if !cached {
            let plain = self.decode_unit(index, unit, data, what)?;
            self.unit = Some((node, index, plain));
        }
        Ok(self.unit.as_ref().map_or(&[][..], |(_, _, plain)| plain))
    }

    fn decode_unit(&self, index: u64, unit: u64, data: &DataRuns, what: &str) -> Result<Vec<u8>> {
        let corrupt =
            |why: &str| Error::corrupt(format!("{what}: corrupt NTFS compressed data: {why}"));
        let start = index * unit;
        let end = start + unit;
        let first = data.runs.partition_point(|r| r.start + r.len <= start);
        // the unit's stored clusters, which come before its sparse ones
        let mut stored = Vec::new();
        let mut hole = false;
        for run in data.runs.get(first..).unwrap_or_default() {
            if run.start >= end {
                break;
            }
            let (from, to) = (run.start.max(start), (run.start + run.len).min(end));
            match run.disk {
                Some(_) if hole => return Err(corrupt("stored clusters after a unit's hole")),
                Some(at) => {
                    let at = at
                        .checked_add(from - run.start)
                        .ok_or_else(|| corrupt("a run past 2^64"))?;
                    let len = (to - from) as usize;
                    let n = stored.len();
                    stored.resize(n + len, 0);
                    read_exact_at(&*self.disk, at, &mut stored[n..], "NTFS compressed data")?;
                }
                None => hole = true,
            }
        }
        let unit = unit as usize;
        if stored.len() == unit {
            return Ok(stored);
        }
        let mut plain = Vec::with_capacity(unit);
        if !stored.is_empty() {
            lznt1::decompress_unit(&stored, unit, &mut plain).map_err(corrupt)?;
        }
        plain.resize(unit, 0);
        Ok(plain)
    }

    fn read_data_runs(&mut self, node: u64) -> Result<Option<DataRuns>> {
        let what = format!("file record {node}");
        let corrupt = |why: &str| Error::corrupt(format!("{what}: corrupt NTFS filesystem: {why}"));
        let cur = &mut self.cur;
        let file = self.ntfs.file(cur, node).map_err(|e| map_err(&what, e))?;
        let info = file.info().map_err(|e| map_err(&what, e))?;
        let Some(item) = file.data(cur, "") else {
            return Ok(None);
        };
        let item = item.map_err(|e| map_err(&what, e))?;
        let attr = item.to_attribute().map_err(|e| map_err(&what, e))?;
        if attr.is_resident() || unreadable(info.file_attributes(), attr.flags()).is_some() {
            return Ok(None);
        }
        let compressed = attr.flags().contains(NtfsAttributeFlags::COMPRESSED);
        // One piece in the base record, or pieces in the records its
        // attribute list names: the crate joins pieces only when their
        // instance numbers match (ntfs-3g numbers each on its own), and
        // then hands over a later piece as the whole.
        let pieces = match data_pieces(&file, cur, &what)? {
            Some(pieces) if !pieces.is_empty() => pieces,
            _ => vec![(0, node, attr.instance())],
        };
        let cluster = u64::from(self.ntfs.cluster_size());
        let mut first: Option<DataHeader> = None;
        let mut runs = Vec::new();
        let mut start = 0u64;
        for (vcn, record, instance) in pieces {
            let piece_file = self.ntfs.file(cur, record).map_err(|e| map_err(&what, e))?;
            let piece = piece_file
                .attributes_raw()
                .map_while(std::result::Result::ok)
                .find(|a| {
                    a.ty().ok() == Some(NtfsAttributeType::Data)
                        && a.name_length() == 0
                        && a.instance() == instance
                })
                .ok_or_else(|| corrupt("a piece of its data is missing"))?;
            if piece.is_resident() {
                return Err(corrupt("a piece of its data is resident"));
            }
            let header = data_header(&self.ntfs, &*self.disk, &piece, &what)?;
            if header.lowest_vcn != vcn || vcn.checked_mul(cluster) != Some(start) {
                return Err(corrupt("the pieces of its data do not follow each other"));
            }
            first.get_or_insert(header);
            let NtfsAttributeValue::NonResident(value) =
                piece.value(cur).map_err(|e| map_err(&what, e))?
            else {
                return Err(corrupt("a piece of its data is not in runs"));
            };
            for run in value.data_runs() {
                let run = run.map_err(|e| map_err(&what, e))?;
                if runs.len() >= MAX_DATA_RUNS {
                    return Err(Error::unsupported(format!(
                        "{what}: NTFS data in more than {MAX_DATA_RUNS} runs is not supported"
                    )));
                }
                let len = run.allocated_size();
                runs.push(Run {
                    start,
                    len,
                    disk: run.data_position().value().map(|at| at.get()),
                });
                start = start
                    .checked_add(len)
                    .ok_or_else(|| corrupt("data runs past 2^64"))?;
            }
        }
        let header = first.ok_or_else(|| corrupt("no piece of its data"))?;
        check_size(&self.ntfs, header.size, &what)?;
        let compression_unit = if compressed {
            // Windows compresses with 16 clusters of at most 4 KiB
            match header.compression_unit {
                1..=8 if cluster <= 4096 => Some(cluster << header.compression_unit),
                _ => {
                    return Err(Error::unsupported(format!(
                        "{what}: compressed NTFS data of this layout is not supported"
                    )))
                }
            }
        } else {
            None
        };
        Ok(Some(DataRuns {
            runs,
            size: header.size,
            valid: header.valid,
            compression_unit,
        }))
    }
}

/// Where `[offset, offset + len)` of the data lies: its runs' clusters,
/// with sparse runs and whatever lies past the valid data length as zeros.
/// Runs that end early cover less.
fn extents_of(data: &DataRuns, offset: u64, len: u64, what: &str) -> Result<Vec<Extent>> {
    let end = offset.saturating_add(len);
    let first = data.runs.partition_point(|r| r.start + r.len <= offset);
    let mut extents = Vec::new();
    for run in data.runs.get(first..).unwrap_or_default() {
        if run.start >= end {
            break;
        }
        let (from, to) = (run.start.max(offset), (run.start + run.len).min(end));
        let on_disk = to.min(data.valid.max(from));
        if on_disk > from {
            let len = on_disk - from;
            extents.push(match run.disk {
                Some(at) => Extent::Disk {
                    offset: at.checked_add(from - run.start).ok_or_else(|| {
                        Error::corrupt(format!(
                            "{what}: corrupt NTFS filesystem: a data run past 2^64"
                        ))
                    })?,
                    len,
                },
                None => Extent::Zero { len },
            });
        }
        if to > on_disk {
            extents.push(Extent::Zero { len: to - on_disk });
        }
    }
    Ok(extents)
}

/// The pieces of a file's unnamed `$DATA` that its `$ATTRIBUTE_LIST` names
/// (lowest cluster, file record, attribute instance), in file order;
/// `None` when the file has no attribute list.
fn data_pieces(
    file: &NtfsFile<'_>,
    cur: &mut DiskCursor,
    what: &str,
) -> Result<Option<Vec<(u64, u64, u16)>>> {
    let Some(list) = file
        .attributes_raw()
        .map_while(std::result::Result::ok)
        .find(|a| a.ty().ok() == Some(NtfsAttributeType::AttributeList))
    else {
        return Ok(None);
    };
    let list = list
        .structured_value::<_, NtfsAttributeList>(cur)
        .map_err(|e| map_err(what, e))?;
    let mut entries = list.entries();
    let mut pieces = Vec::new();
    while let Some(entry) = entries.next(cur) {
        let entry = entry.map_err(|e| map_err(what, e))?;
        if entry.ty().ok() != Some(NtfsAttributeType::Data) || entry.name_length() != 0 {
            continue;
        }
        if pieces.len() >= MAX_DATA_RUNS {
            return Err(Error::corrupt(format!(
                "{what}: corrupt NTFS filesystem: an attribute list of more than \
                 {MAX_DATA_RUNS} pieces"
            )));
        }
        let vcn = u64::try_from(entry.lowest_vcn().value()).map_err(|_| {
            Error::corrupt(format!(
                "{what}: corrupt NTFS filesystem: a piece at a negative cluster"
            ))
        })?;
        let record = entry.base_file_reference().file_record_number();
        pieces.push((vcn, record, entry.instance()));
    }
    pieces.sort_unstable();
    Ok(Some(pieces))
}

/// What the header of a non-resident `$DATA` piece says beyond what the
/// crate tells.
#[derive(Clone, Copy)]
struct DataHeader {
    /// the first cluster of the file this piece maps
    lowest_vcn: u64,
    /// the data size (in the first piece only)
    size: u64,
    /// the valid data length (in the first piece only; see [`data_header`])
    valid: u64,
    /// clusters in a compression unit, as a power of 2 (0: not compressed)
    compression_unit: u16,
}

/// The header of a non-resident attribute as its file record holds it,
/// with the record's update sequence applied: the crate parses it but does
/// not tell the valid data length (Windows reads the bytes past it as
/// zeros, whatever the clusters hold: stale data of a preallocated or
/// extended file), the compression unit, or where a piece of data spread
/// over several file records begins.
fn data_header(
    ntfs: &Ntfs,
    disk: &dyn Disk,
    attribute: &NtfsAttribute<'_, '_>,
    what: &str,
) -> Result<DataHeader> {
    let unknown = || {
        Error::corrupt(format!(
            "{what}: corrupt NTFS filesystem: the file record of its data is unreadable"
        ))
    };
    let at = attribute.position().value().ok_or_else(unknown)?.get();
    let size = u64::from(ntfs.file_record_size());
    // the record holding the attribute starts at a sector boundary at
    // most one record before it
    let mut record = vec![0u8; size as usize];
    let mut start = at - at % 512;
    loop {
        if at - start >= size {
            return Err(unknown());
        }
        read_exact_at(disk, start, &mut record, "NTFS file record")?;
        if record.starts_with(b"FILE") && apply_fixups(&mut record) {
            break;
        }
        start = start.checked_sub(512).ok_or_else(unknown)?;
    }
    let off = (at - start) as usize;
    let header = record.get(off..off + 0x40).ok_or_else(unknown)?;
    // non-resident, and the data size the crate reads
    if header[8] != 1 || le64(header, 0x30) != attribute.value_length() {
        return Err(unknown());
    }
    Ok(DataHeader {
        lowest_vcn: le64(header, 0x10),
        size: le64(header, 0x30),
        valid: le64(header, 0x38),
        compression_unit: le16(header, 0x22),
    })
}

/// NTFS addresses 2^32 clusters of a file; past its valid data length a
/// larger size would read (or be mapped) as zeros for years.
fn check_size(ntfs: &Ntfs, size: u64, what: &str) -> Result<()> {
    let most = u64::from(ntfs.cluster_size()) << 32;
    if size > most {
        return Err(Error::corrupt(format!(
            "{what}: corrupt NTFS filesystem: size {size} is more than 2^32 clusters \
             ({most} bytes)"
        )));
    }
    Ok(())
}

/// Puts back the last two bytes of each sector of a file record, which the
/// update sequence replaced on disk; false when a sector does not carry
/// the sequence number (a torn or foreign record).
fn apply_fixups(record: &mut [u8]) -> bool {
    let (array, count) = (usize::from(le16(record, 4)), usize::from(le16(record, 6)));
    if count == 0 || array + 2 * count > record.len() || (count - 1) * 512 > record.len() {
        return false;
    }
    let usn = [record[array], record[array + 1]];
    for i in 1..count {
        let end = i * 512;
        if record[end - 2..end] != usn {
            return false;
        }
        let saved = [record[array + 2 * i], record[array + 2 * i + 1]];
        record[end - 2..end].copy_from_slice(&saved);
    }
    true
}

/// Why a file's data cannot be read correctly, if so, from the file's
/// flags and its unnamed `$DATA`'s. (Compressed data is decoded: see
/// `read_compressed`.)
fn unreadable(file: NtfsFileAttributeFlags, data: NtfsAttributeFlags) -> Option<&'static str> {
    if file.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
        return Some(
            "reparse points other than links and system compression (deduplicated, cloud \
             files) are not supported",
        );
    }
    if file.contains(NtfsFileAttributeFlags::ENCRYPTED)
        || data.contains(NtfsAttributeFlags::ENCRYPTED)
    {
        return Some("encrypted NTFS files are not supported");
    }
    None
}

/// The size of a file's data as its base record's unnamed non-resident
/// `$DATA` says: when the data is in pieces over several records, the
/// first piece is there, and the piece the crate's `data()` hands over
/// may be a later one, whose header says 0.
///
/// The walk stops at the first attribute that cannot be read: the crate's
/// iterator returns the same error again without moving on, so skipping
/// errors (`flatten`) spun forever on a record whose end marker was bad.
fn base_record_data_size(file: &NtfsFile<'_>) -> Option<u64> {
    file.attributes_raw().map_while(Result::ok).find_map(|a| {
        let data = a.ty().ok()? == NtfsAttributeType::Data;
        let unnamed = a.name_length() == 0;
        (data && unnamed && !a.is_resident()).then(|| a.value_length())
    })
}

/// A file's metadata, and its target when it is a symbolic link or
/// junction (a reparse point) or an Interix symlink (see `ntfs_link`).
fn meta_of(
    file: &NtfsFile<'_>,
    cur: &mut DiskCursor,
    record: u64,
    what: &str,
) -> Result<(Meta, Option<Vec<u8>>)> {
    let info = file.info().map_err(|e| map_err(what, e))?;
    let attrs = info.file_attributes();
    let special = special_of(file, cur, attrs);
    let (link, device) = match special {
        Some(Special::Link(target)) => (Some(target), None),
        Some(Special::Device(kind, number)) => (None, Some((kind, number))),
        None => (None, None),
    };
    let dir = file.is_directory() && link.is_none();
    let size = if let Some(target) = &link {
        target.len() as u64
    } else if dir || device.is_some() {
        0
    } else if let Some(size) = base_record_data_size(file) {
        size
    } else {
        match file.data(cur, "") {
            Some(Ok(item)) => item
                .to_attribute()
                .map_err(|e| map_err(what, e))?
                .value_length(),
            Some(Err(e)) => return Err(map_err(what, e)),
            None => 0,
        }
    };
    let (kind, mut mode) = match (&link, device, dir) {
        (Some(_), _, _) => (EntryType::Symlink, 0o777),
        (None, Some((kind, _)), _) => (kind, 0o644),
        (None, None, true) => (EntryType::Dir, 0o755),
        (None, None, false) => (EntryType::File, 0o644),
    };
    if link.is_none() && attrs.contains(NtfsFileAttributeFlags::READ_ONLY) {
        mode &= !0o222;
    }
    let meta = Meta {
        kind,
        size,
        mode,
        uid: 0,
        gid: 0,
        mtime: unix_time(info.modification_time().nt_timestamp()),
        mtime_ns: nanos(info.modification_time().nt_timestamp()),
        born: info
            .creation_time()
            .nt_timestamp()
            .saturating_sub(NT_TO_UNIX as u64 * 10_000_000)
            .saturating_mul(100),
        inode: record,
        nlink: u64::from(file.hard_link_count()).max(1),
        rdev: device.map(|(_, number)| number),
    };
    Ok((meta, link))
}

/// What a file stands for besides its data, if anything (see
/// [`special_of`]).
enum Special {
    /// a symbolic link or junction, or an Interix symlink: its target
    Link(Vec<u8>),
    /// an Interix device (as ntfs-3g writes Linux device nodes)
    Device(EntryType, Device),
}

/// Whether `file` is a symbolic link or junction, or an Interix symlink or
/// device (system files; ntfs-3g writes Linux symlinks and device nodes
/// so). Data that cannot be read or parsed leaves it what it is otherwise:
/// a directory, or a file whose reads are refused as a reparse point's.
fn special_of(
    file: &NtfsFile<'_>,
    cur: &mut DiskCursor,
    attrs: NtfsFileAttributeFlags,
) -> Option<Special> {
    if attrs.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
        let data = link_data(file, cur, NtfsAttributeType::ReparsePoint)?;
        return ntfs_link::reparse_target(&data).map(Special::Link);
    }
    if attrs.contains(NtfsFileAttributeFlags::SYSTEM) && !file.is_directory() {
        let data = link_data(file, cur, NtfsAttributeType::Data)?;
        if let Some((block, device)) = ntfs_link::interix_device(&data) {
            let kind = if block {
                EntryType::Block
            } else {
                EntryType::Char
            };
            return Some(Special::Device(kind, device));
        }
        return ntfs_link::interix_target(&data).map(Special::Link);
    }
    None
}

/// A system-compressed file being read (see [`wof`]).
struct Wof<'a> {
    node: u64,
    what: &'a str,
    format: wof::Format,
    /// the file's size (its sparse unnamed stream's)
    size: u64,
}

impl Wof<'_> {
    /// Reads the file at `offset` from its `WofCompressedData` stream, a
    /// chunk at a time; `cache` keeps the chunk last decoded.
    fn read(
        &self,
        file: &NtfsFile<'_>,
        cur: &mut DiskCursor,
        cache: &mut Option<(u64, u64, Vec<u8>)>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let what = self.what;
        let chunk_size = self.format.chunk_size();
        let decode = match self.format {
            wof::Format::Xpress(_) => xpress::decompress,
            wof::Format::Lzx => lzx::decompress,
        };
        if offset >= self.size {
            return Ok(0);
        }
        let item = named_attribute(file, cur, NtfsAttributeType::Data, WOF_STREAM)
            .map_err(|e| map_err(what, e))?
            .ok_or_else(|| Error::corrupt(format!("{what}: its compressed data is missing")))?;
        let attr = item.to_attribute().map_err(|e| map_err(what, e))?;
        let stored = attr.value_length();
        let mut value = attr.value(cur).map_err(|e| map_err(what, e))?;
        let mut read = |at: u64, b: &mut [u8]| -> Result<()> {
            value
                .seek(cur, SeekFrom::Start(at))
                .and_then(|_| value.read_exact(cur, b))
                .map_err(|e| map_err(what, e))
        };
        let want = buf.len().min((self.size - offset) as usize);
        let mut done = 0;
        while done < want {
            let at = offset + done as u64;
            let index = at / chunk_size;
            let cached = matches!(cache, Some((n, i, _)) if *n == self.node && *i == index);
            if !cached {
                let (start, len, decoded) =
                    wof::chunk(self.format, self.size, stored, index, &mut read)
                        .map_err(|e| Error::corrupt(format!("{what}: {}", e.message)))?;
                let mut packed = vec![0u8; len as usize];
                read(start, &mut packed)?;
                let out = if len == decoded {
                    packed
                } else {
                    let mut out = vec![0u8; decoded as usize];
                    decode(&packed, &mut out)
                        .map_err(|why| Error::corrupt(format!("{what}: {why}")))?;
                    out
                };
                *cache = Some((self.node, index, out));
            }
            let Some((_, _, chunk)) = cache.as_ref() else {
                break;
            };
            let from = (at - index * chunk_size) as usize;
            let n = chunk.len().saturating_sub(from).min(want - done);
            if n == 0 {
                break;
            }
            buf[done..done + n].copy_from_slice(&chunk[from..from + n]);
            done += n;
        }
        Ok(done)
    }
}

/// The stream holding a system-compressed file's data.
const WOF_STREAM: &str = "WofCompressedData";

/// Most bytes of a link's data that are read: a reparse point holds at most
/// 16 KiB, and an Interix link a target of at most 4096 UTF-16 units.
const MAX_LINK_DATA: u64 = 16 << 10;

/// The value of `file`'s unnamed attribute of type `ty`, if it holds at
/// most [`MAX_LINK_DATA`] bytes. ntfs-3g moves a long link's data out of a
/// 1 KiB base record, into an extension record (named by the base's
/// attribute list) or out of the records (non-resident).
fn link_data(file: &NtfsFile<'_>, cur: &mut DiskCursor, ty: NtfsAttributeType) -> Option<Vec<u8>> {
    let mut attributes = file.attributes();
    let item = loop {
        // the first attribute that cannot be read ends the search
        let item = attributes.next(cur)?.ok()?;
        let a = item.to_attribute().ok()?;
        if a.ty().ok() == Some(ty) && a.name_length() == 0 {
            break item;
        }
    };
    let attribute = item.to_attribute().ok()?;
    let len = attribute.value_length();
    if len > MAX_LINK_DATA {
        return None;
    }
    let mut value = attribute.value(cur).ok()?;
    let mut data = vec![0; len as usize];
    value.read_exact(cur, &mut data).ok()?;
    Some(data)
}

/// The attribute of type `ty` of a directory's file name index, if any.
fn index_attribute<'n, 'f>(
    file: &'f NtfsFile<'n>,
    cur: &mut DiskCursor,
    ty: NtfsAttributeType,
) -> std::result::Result<Option<NtfsAttributeItem<'n, 'f>>, NtfsError> {
    named_attribute(file, cur, ty, DIR_INDEX)
}

/// The attribute of type `ty` named exactly `name`, if any. (The crate's
/// own lookup of named streams compares names through the volume's upcase
/// table, which is not loaded.)
fn named_attribute<'n, 'f>(
    file: &'f NtfsFile<'n>,
    cur: &mut DiskCursor,
    ty: NtfsAttributeType,
    name: &str,
) -> std::result::Result<Option<NtfsAttributeItem<'n, 'f>>, NtfsError> {
    let mut attributes = file.attributes();
    while let Some(item) = attributes.next(cur) {
        let item = item?;
        let attribute = item.to_attribute()?;
        if attribute.ty()? == ty && attribute.name()? == name {
            return Ok(Some(item));
        }
    }
    Ok(None)
}

/// The names and file record numbers in a directory's index (any order;
/// DOS names and metafiles left out).
///
/// The index is a B-tree: an entry may name a subnode (an index record, by
/// VCN) holding the entries before it. The crate's own iterator descends
/// into every subnode it is given, so a corrupt entry naming its own record
/// made it descend forever inside one call, holding a copy of the record
/// per level until an allocation failed and aborted the agent. Here each
/// record is read at most once, one node at a time.
fn directory_names(
    file: &NtfsFile<'_>,
    cur: &mut DiskCursor,
    cluster: u64,
    what: &str,
    charge: &mut Charge,
) -> Result<Vec<(String, u64)>> {
    let err = |e| map_err(what, e);
    if !file.is_directory() {
        return Err(Error::new(
            ErrorKind::NotADirectory,
            format!("{what}: not a directory"),
        ));
    }
    let root_item = index_attribute(file, cur, NtfsAttributeType::IndexRoot)
        .map_err(err)?
        .ok_or_else(|| Error::corrupt(format!("{what}: corrupt NTFS filesystem: no index root")))?;
    let root_attribute = root_item.to_attribute().map_err(err)?;
    let root = root_attribute
        .resident_structured_value::<NtfsIndexRoot>()
        .map_err(err)?;
    let allocation_item = if root.is_large_index() {
        index_attribute(file, cur, NtfsAttributeType::IndexAllocation).map_err(err)?
    } else {
        None
    };
    let allocation_attribute = allocation_item
        .as_ref()
        .map(|item| item.to_attribute())
        .transpose()
        .map_err(err)?;
    let allocation = allocation_attribute
        .as_ref()
        .map(|a| a.structured_value::<_, NtfsIndexAllocation>(cur))
        .transpose()
        .map_err(err)?;
    let mut walk = IndexWalk {
        what,
        charge,
        names: Vec::new(),
        pending: Vec::new(),
        seen: HashSet::new(),
        entries: 0,
    };
    walk.node(root.entries().map_err(err)?)?;
    let record_size = root.index_record_size();
    if u64::from(record_size) > MAX_RECORD_SIZE {
        return Err(Error::corrupt(format!(
            "{what}: corrupt NTFS filesystem: {record_size}-byte index records \
             (at most {MAX_RECORD_SIZE} are read)"
        )));
    }
    // records smaller than a cluster are read here, from the allocation's
    // value (its data runs) made once
    let small_records = match &allocation_attribute {
        Some(a) if u64::from(record_size) < cluster => Some(a.value(cur).map_err(err)?),
        _ => None,
    };
    while let Some(vcn) = walk.pending.pop() {
        let Some(allocation) = &allocation else {
            return Err(Error::corrupt(format!(
                "{what}: corrupt NTFS filesystem: a subnode without an index allocation"
            )));
        };
        if let Some(value) = &small_records {
            let record = small_index_record(value.clone(), cur, vcn, record_size, what)?;
            for entry in index_entries(&record, what)? {
                walk.take(entry)?;
            }
            continue;
        }
        let record = allocation
            .record_from_vcn(cur, record_size, vcn)
            .map_err(err)?;
        walk.node(record.entries().map_err(err)?)?;
    }
    Ok(walk.names)
}

/// Index record `vcn` of a directory's index allocation (`value`) whose records are
/// smaller than a cluster (volumes of 8 KiB clusters and more; 64 KiB is
/// usual for data volumes): VCNs then count 512-byte blocks, as Windows,
/// ntfs-3g and Linux read them, and the ntfs crate takes them for
/// clusters, finding every subnode past the index's end. Read here,
/// update sequence applied, its own VCN checked.
fn small_index_record(
    mut value: NtfsAttributeValue<'_, '_>,
    cur: &mut DiskCursor,
    vcn: Vcn,
    record_size: u32,
    what: &str,
) -> Result<Vec<u8>> {
    let corrupt = |why: String| Error::corrupt(format!("{what}: corrupt NTFS filesystem: {why}"));
    let size = u64::from(record_size);
    let at = u64::try_from(vcn.value())
        .ok()
        .and_then(|v| v.checked_mul(512))
        .filter(|at| at.checked_add(size).is_some_and(|end| end <= value.len()))
        .ok_or_else(|| corrupt(format!("index record {} lies past its index", vcn.value())))?;
    value
        .seek(cur, SeekFrom::Start(at))
        .map_err(|e| map_err(what, e))?;
    let mut record = vec![0u8; size as usize];
    value
        .read_exact(cur, &mut record)
        .map_err(|e| map_err(what, e))?;
    if !record.starts_with(b"INDX") || !apply_fixups(&mut record) {
        return Err(corrupt(format!("index record {} is damaged", vcn.value())));
    }
    if le64(&record, 0x10) != at / 512 {
        return Err(corrupt(format!(
            "index record {} says it is record {}",
            vcn.value(),
            le64(&record, 0x10)
        )));
    }
    Ok(record)
}

/// One entry of a directory index record read by [`index_entries`].
struct RawIndexEntry {
    /// (name, its file record, whether it is a DOS 8.3 name); none for the
    /// node's last entry
    key: Option<(String, u64, bool)>,
    subnode: Option<Vcn>,
}

/// The entries of a directory index record (its node header at byte
/// 0x18), each checked to lie inside the node.
fn index_entries(record: &[u8], what: &str) -> Result<Vec<RawIndexEntry>> {
    let corrupt = || {
        Error::corrupt(format!(
            "{what}: corrupt NTFS filesystem: an index record's entries run past it"
        ))
    };
    const NODE: usize = 0x18;
    let first = NODE + le32(record, NODE) as usize;
    let end = (NODE + le32(record, NODE + 4) as usize).min(record.len());
    let mut out = Vec::new();
    let mut at = first;
    loop {
        let header = record.get(at..at + 16).ok_or_else(corrupt)?;
        let (len, key_len) = (usize::from(le16(header, 8)), usize::from(le16(header, 10)));
        let flags = le16(header, 12);
        if len < 16 || at + len > end {
            return Err(corrupt());
        }
        let entry = &record[at..at + len];
        let subnode = if flags & 1 != 0 {
            let vcn = le64(
                entry,
                len.checked_sub(8)
                    .filter(|&v| v >= 16)
                    .ok_or_else(corrupt)?,
            );
            Some(Vcn::from(i64::try_from(vcn).map_err(|_| corrupt())?))
        } else {
            None
        };
        let last = flags & 2 != 0;
        let key = if last {
            None
        } else {
            // a $FILE_NAME: the name's length at 0x40, namespace at 0x41,
            // UTF-16 from 0x42
            let key = entry.get(16..16 + key_len).ok_or_else(corrupt)?;
            let (chars, namespace) = match key.get(0x40..0x42) {
                Some(&[chars, namespace]) => (usize::from(chars), namespace),
                _ => return Err(corrupt()),
            };
            let name = key.get(0x42..0x42 + 2 * chars).ok_or_else(corrupt)?;
            let units: Vec<u16> = name
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let record = le64(entry, 0) & 0xFFFF_FFFF_FFFF;
            Some((String::from_utf16_lossy(&units), record, namespace == 2))
        };
        out.push(RawIndexEntry { key, subnode });
        if last {
            return Ok(out);
        }
        at += len;
    }
}

/// The state of reading one directory index.
struct IndexWalk<'w> {
    what: &'w str,
    /// counts `names`, which lives on beside the listing built from it
    charge: &'w mut Charge,
    names: Vec<(String, u64)>,
    /// subnodes named but not read yet
    pending: Vec<Vcn>,
    /// every subnode named so far: a B-tree names each once
    seen: HashSet<i64>,
    /// entries read, named or not
    entries: usize,
}

impl IndexWalk<'_> {
    /// Takes the names of one node's entries and notes its subnodes.
    fn node(&mut self, entries: NtfsIndexNodeEntries<'_, NtfsFileNameIndex>) -> Result<()> {
        let what = self.what;
        for e in entries {
            let e = e.map_err(|e| map_err(what, e))?;
            let subnode = e.subnode_vcn().transpose().map_err(|e| map_err(what, e))?;
            let key = match e.key() {
                None => None,
                Some(key) => {
                    let key = key.map_err(|e| map_err(what, e))?;
                    let dos = key.namespace() == NtfsFileNamespace::Dos;
                    let record = e.file_reference().file_record_number();
                    Some((key.name().to_string_lossy(), record, dos))
                }
            };
            self.take(RawIndexEntry { key, subnode })?;
        }
        Ok(())
    }

    /// Takes one entry's name (unless a DOS name or a metafile's) and
    /// notes its subnode.
    fn take(&mut self, entry: RawIndexEntry) -> Result<()> {
        let what = self.what;
        self.entries += 1;
        if self.entries > MAX_DIR_ENTRIES {
            return Err(Error::corrupt(format!(
                "{what}: too many directory entries"
            )));
        }
        if let Some(vcn) = entry.subnode {
            if !self.seen.insert(vcn.value()) {
                return Err(Error::corrupt(format!(
                    "{what}: corrupt NTFS filesystem: index record {} is named twice",
                    vcn.value()
                )));
            }
            self.pending.push(vcn);
        }
        let Some((name, record, dos)) = entry.key else {
            return Ok(());
        };
        if dos || (record < FIRST_USER_RECORD && (name.starts_with('$') || name == ".")) {
            return Ok(());
        }
        self.charge
            .add(std::mem::size_of::<(String, u64)>() + 2 * name.len() + 16)?;
        self.names.push((name, record));
        Ok(())
    }
}

impl Backend for NtfsBackend {
    type Node = u64;

    fn root(&mut self) -> Result<Child<u64>> {
        let what = "NTFS root directory";
        let file = self
            .ntfs
            .file(&mut self.cur, ROOT_RECORD)
            .map_err(|e| map_err(what, e))?;
        // the root is a directory, whatever its attributes say
        let (meta, _) = meta_of(&file, &mut self.cur, ROOT_RECORD, what)?;
        Ok(Child {
            name: Vec::new(),
            node: ROOT_RECORD,
            meta,
            link: None,
            damaged: None,
        })
    }

    fn read_dir(&mut self, dir: &u64, path: &[u8], charge: &mut Charge) -> Result<Vec<Child<u64>>> {
        let what = String::from_utf8_lossy(path).into_owned();
        let cur = &mut self.cur;
        let file = self.ntfs.file(cur, *dir).map_err(|e| map_err(&what, e))?;
        let cluster = u64::from(self.ntfs.cluster_size());
        let names = directory_names(&file, cur, cluster, &what, charge)?;
        let mut out = Vec::with_capacity(names.len());
        for (name, record) in names {
            // the path is put before it wherever the error is given
            let child_what = format!("file record {record}");
            let meta = self
                .ntfs
                .file(cur, record)
                .map_err(|e| map_err(&child_what, e))
                .and_then(|f| meta_of(&f, cur, record, &child_what));
            // A file record that cannot be read is listed apart, failing
            // whoever uses it; its siblings are listed as they are.
            let (meta, link) = match meta {
                Ok(read) => read,
                Err(e) => {
                    charge.add(child_bytes::<u64>(name.len(), 0))?;
                    out.push(Child::damaged(name.into_bytes(), record, record, e));
                    continue;
                }
            };
            charge.add(child_bytes::<u64>(
                name.len(),
                link.as_ref().map_or(0, Vec::len),
            ))?;
            out.push(Child {
                name: name.into_bytes(),
                node: record,
                meta,
                link,
                damaged: None,
            });
        }
        Ok(out)
    }

    fn read_at(&mut self, node: &u64, path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize> {
        let what = String::from_utf8_lossy(path).into_owned();
        let cur = &mut self.cur;
        let file = self.ntfs.file(cur, *node).map_err(|e| map_err(&what, e))?;
        let info = file.info().map_err(|e| map_err(&what, e))?;
        let item = match file.data(cur, "") {
            Some(r) => r.map_err(|e| map_err(&what, e))?,
            None => return Ok(0),
        };
        let attr = item.to_attribute().map_err(|e| map_err(&what, e))?;
        if info
            .file_attributes()
            .contains(NtfsFileAttributeFlags::REPARSE_POINT)
        {
            let reparse = link_data(&file, cur, NtfsAttributeType::ReparsePoint);
            if let Some(format) = reparse.and_then(|d| wof::format_of(&d)) {
                let size = base_record_data_size(&file).unwrap_or(attr.value_length());
                let wof = Wof {
                    node: *node,
                    what: &what,
                    format,
                    size,
                };
                return wof.read(&file, cur, &mut self.unit, offset, buf);
            }
        }
        if let Some(why) = unreadable(info.file_attributes(), attr.flags()) {
            return Err(Error::unsupported(format!("{what}: {why}")));
        }
        if attr.is_resident() {
            let data = match attr.value(cur).map_err(|e| map_err(&what, e))? {
                NtfsAttributeValue::Resident(value) => value.data(),
                _ => &[],
            };
            let from = data
                .get(offset.min(data.len() as u64) as usize..)
                .unwrap_or_default();
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            return Ok(n);
        }
        let data = self.data_runs(*node)?.ok_or_else(|| {
            Error::unsupported(format!("{what}: this NTFS file's data cannot be read"))
        })?;
        if data.compression_unit.is_some() {
            return self.read_compressed(*node, &what, &data, offset, buf);
        }
        if offset >= data.size {
            return Ok(0);
        }
        let want = buf.len().min((data.size - offset) as usize);
        let mut done = 0;
        for extent in extents_of(&data, offset, want as u64, &what)? {
            let len = extent.bytes() as usize;
            let part = &mut buf[done..done + len];
            match extent {
                Extent::Disk { offset, .. } => {
                    read_exact_at(&*self.disk, offset, part, "NTFS file data")?
                }
                Extent::Zero { .. } => part.fill(0),
            }
            done += len;
        }
        // runs that end before the size: the data ends there
        Ok(done)
    }

    /// The data runs of the file's unnamed `$DATA` over the range (see
    /// [`extents_of`]); `None` for resident or compressed data.
    fn map_at(&mut self, node: &u64, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        let Some(data) = self.data_runs(*node)? else {
            return Ok(None);
        };
        if data.compression_unit.is_some() {
            return Ok(None);
        }
        extents_of(&data, offset, len, &format!("file record {node}")).map(Some)
    }

    fn case_insensitive(&mut self, _dir: &Self::Node) -> bool {
        true
    }

    fn what(&self) -> &str {
        "NTFS filesystem"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index record's node of `names` (file records 100, 101, ...), the
    /// first entry naming subnode 8, then the last entry.
    fn record(names: &[&str]) -> Vec<u8> {
        let mut r = vec![0u8; 4096];
        r[..4].copy_from_slice(b"INDX");
        let mut at = 0x40;
        r[0x18..0x1C].copy_from_slice(&((at - 0x18) as u32).to_le_bytes());
        for (i, name) in names.iter().enumerate() {
            let units: Vec<u16> = name.encode_utf16().collect();
            let key_len = 0x42 + 2 * units.len();
            let sub = i == 0;
            let len = (16 + key_len).div_ceil(8) * 8 + if sub { 8 } else { 0 };
            r[at..at + 8].copy_from_slice(&(100 + i as u64).to_le_bytes());
            r[at + 8..at + 10].copy_from_slice(&(len as u16).to_le_bytes());
            r[at + 10..at + 12].copy_from_slice(&(key_len as u16).to_le_bytes());
            r[at + 12] = u8::from(sub);
            r[at + 16 + 0x40] = units.len() as u8;
            r[at + 16 + 0x41] = 1;
            for (k, u) in units.iter().enumerate() {
                let o = at + 16 + 0x42 + 2 * k;
                r[o..o + 2].copy_from_slice(&u.to_le_bytes());
            }
            if sub {
                r[at + len - 8..at + len].copy_from_slice(&8u64.to_le_bytes());
            }
            at += len;
        }
        // the last entry
        r[at + 8] = 16;
        r[at + 12] = 2;
        at += 16;
        r[0x1C..0x20].copy_from_slice(&((at - 0x18) as u32).to_le_bytes());
        r
    }

    #[test]
    fn index_entries_are_read_and_garbage_is_refused_without_panic() {
        let r = record(&["alpha", "beta.txt", "γάμμα"]);
        let entries = index_entries(&r, "t").unwrap();
        let keys: Vec<_> = entries.iter().map(|e| e.key.clone()).collect();
        assert_eq!(
            keys,
            [
                Some(("alpha".to_string(), 100, false)),
                Some(("beta.txt".to_string(), 101, false)),
                Some(("γάμμα".to_string(), 102, false)),
                None
            ]
        );
        assert_eq!(entries[0].subnode.map(|v| v.value()), Some(8));
        assert!(entries[1..].iter().all(|e| e.subnode.is_none()));
        // damaged copies: an error or entries, never a panic or a run
        // past the node
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5000 {
            let mut bad = r.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % 0x140) as usize;
                bad[at] = next() as u8;
            }
            if let Ok(entries) = index_entries(&bad, "t") {
                assert!(entries.len() <= 4096 / 16);
            }
        }
    }
}
