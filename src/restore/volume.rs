//! Volumes of a disk image: partitions of its GPT or MBR table (including
//! logical partitions), or the whole disk when it holds a filesystem and no
//! table.
//!
//! Owns: reading partition tables, naming volumes (`part/N`, `raw`), and
//! describing each with the filesystem probe. Must never walk a filesystem.

use std::io::{Seek, SeekFrom};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::restore::disk::{read_exact_at, Disk, DiskCursor, Slice};
use crate::restore::probe::{probe, Probe};

/// One entry of `volume.list`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub volume: String,
    /// "partition" or "raw"
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
    pub start: u64,
    pub size: u64,
    /// "gpt", "mbr" or null
    pub table: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub type_guid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mbr_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub fs: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub supported: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A partition as a table describes it.
struct Partition {
    number: u32,
    start: u64,
    size: u64,
    table: &'static str,
    type_guid: Option<String>,
    mbr_type: Option<u8>,
    name: Option<String>,
}

/// GPT type GUIDs are stored mixed-endian; this prints them the usual way.
fn guid_string(g: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    )
}

/// MBR types of extended-partition containers (not volumes themselves).
fn is_extended(sys: u8) -> bool {
    matches!(sys, 0x05 | 0x0f | 0x85)
}

/// Most GPT partition entries accepted (the usual table has 128).
const MAX_GPT_ENTRIES: u32 = 16384;
/// Most partitions of one disk, Linux's limit (DISK_MAX_PARTS): each is
/// probed and listed, and a crafted table can name tens of thousands (an
/// EBR chain of one sector per logical partition).
const MAX_PARTITIONS: usize = 256;

fn too_many_partitions(or: &str) -> Error {
    Error::unsupported(format!(
        "partition table: more than {MAX_PARTITIONS} partitions (Linux's limit){or}"
    ))
}

/// Follows the chain of extended boot records from the one at sector
/// `ext` (the extended partition's start) without keeping them, so that
/// mbrman, which reads a chain whole, never meets one longer than
/// [`MAX_PARTITIONS`]. A chain that leaves the disk or lacks a signature
/// is mbrman's to report.
fn check_ebr_chain(disk: &Arc<dyn Disk>, ext: u64) -> Result<()> {
    let mut ebr = [0u8; 512];
    let mut at = ext;
    for _ in 0..=MAX_PARTITIONS {
        let Some(byte) = at.checked_mul(512).filter(|b| b + 512 <= disk.size()) else {
            return Ok(());
        };
        read_exact_at(&**disk, byte, &mut ebr, "extended boot record").map_err(|e| {
            // as when mbrman cannot read it
            Error::new(e.kind, format!("partition table: {}", e.message))
        })?;
        if ebr[510..512] != [0x55, 0xAA] {
            return Ok(());
        }
        // the second entry links to the next record, relative to `ext`
        let next = &ebr[446 + 16..446 + 32];
        let start = u64::from(u32::from_le_bytes([next[8], next[9], next[10], next[11]]));
        if next[4] == 0 || start == 0 {
            return Ok(());
        }
        at = ext + start;
    }
    Err(too_many_partitions(
        ", or a chain of extended boot records that loops",
    ))
}

/// Refuses a GPT header at byte `at` (if one is there) whose entry count
/// or size would make the table parser read and allocate without bound.
fn check_gpt_header(disk: &Arc<dyn Disk>, at: u64) -> Result<()> {
    let mut h = [0u8; 92];
    if at.saturating_add(92) > disk.size()
        || read_exact_at(&**disk, at, &mut h, "GPT header").is_err()
    {
        return Ok(());
    }
    if &h[..8] != b"EFI PART" {
        return Ok(());
    }
    let entries = u32::from_le_bytes([h[80], h[81], h[82], h[83]]);
    let entry_size = u32::from_le_bytes([h[84], h[85], h[86], h[87]]);
    if entries > MAX_GPT_ENTRIES || !(128..=4096).contains(&entry_size) {
        return Err(Error::corrupt(format!(
            "GPT header at byte {at}: {entries} entries of {entry_size} bytes is not a sane partition table"
        )));
    }
    Ok(())
}

/// What one copy (primary or backup) of a GPT gave.
enum GptCopy {
    Found(Vec<gptman::GPTPartitionEntry>),
    /// no "EFI PART" signature there
    Absent,
    /// a header that does not parse or whose checksums fail
    Bad,
}

/// Reads the GPT copy whose header is at byte `at`, for `sector_size`.
fn read_gpt_copy(disk: &Arc<dyn Disk>, at: u64, sector_size: u64) -> Result<GptCopy> {
    check_gpt_header(disk, at)?;
    let mut cur = DiskCursor::new(disk.clone());
    let read = catch(|| {
        cur.seek(SeekFrom::Start(at))?;
        let header = gptman::GPTHeader::read_from(&mut cur)?;
        header.read_partitions(&mut cur, sector_size)
    });
    Ok(match read {
        Ok(Ok(parts)) => GptCopy::Found(parts),
        Ok(Err(gptman::Error::InvalidSignature)) => GptCopy::Absent,
        _ => GptCopy::Bad,
    })
}

/// The GPT of `disk` as (sector size, entries in table order), the way
/// gptman's `GPT::find_from` finds it: the primary header, the backup
/// header at the end of the disk only when the primary is unusable, with
/// 512-byte sectors and then 4096-byte ones when neither copy has a
/// signature. Each header is checked by [`check_gpt_header`] before the
/// parser reads it. Reading the backup only when needed matters: it lies
/// in the disk's last chunk, which every volume open would otherwise load.
fn read_gpt(disk: &Arc<dyn Disk>) -> Result<Option<(u64, Vec<gptman::GPTPartitionEntry>)>> {
    let size = disk.size();
    for ss in [512u64, 4096] {
        let primary = read_gpt_copy(disk, ss, ss)?;
        if let GptCopy::Found(parts) = primary {
            return Ok(Some((ss, parts)));
        }
        let backup = if size < ss {
            GptCopy::Absent
        } else {
            read_gpt_copy(disk, (size / ss - 1) * ss, ss)?
        };
        match (primary, backup) {
            (_, GptCopy::Found(parts)) => return Ok(Some((ss, parts))),
            (GptCopy::Absent, GptCopy::Absent) => continue,
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// The partitions of `disk`, or `None` when it has no partition table.
fn partitions(disk: &Arc<dyn Disk>) -> Result<Option<Vec<Partition>>> {
    if let Some((ss, entries)) = read_gpt(disk)? {
        let mut out = Vec::new();
        for (i, p) in entries.iter().enumerate() {
            if !p.is_used() || p.ending_lba < p.starting_lba {
                continue;
            }
            if out.len() == MAX_PARTITIONS {
                return Err(too_many_partitions(""));
            }
            let name = p.partition_name.as_str().trim_end_matches('\0').to_string();
            out.push(Partition {
                number: i as u32 + 1,
                start: p.starting_lba.saturating_mul(ss),
                size: (p.ending_lba - p.starting_lba)
                    .saturating_add(1)
                    .saturating_mul(ss),
                table: "gpt",
                type_guid: Some(guid_string(&p.partition_type_guid)),
                mbr_type: None,
                name: (!name.is_empty()).then_some(name),
            });
        }
        return Ok(Some(out));
    }
    // A FAT or NTFS boot sector also ends in 55 AA: a filesystem at sector 0
    // means an unpartitioned disk, not an MBR.
    if probe(disk)?.fs.is_some() {
        return Ok(None);
    }
    let mut sig = [0u8; 2];
    if disk.size() < 512 {
        return Ok(None);
    }
    read_exact_at(&**disk, 510, &mut sig, "master boot record")?;
    if sig != [0x55, 0xAA] {
        return Ok(None);
    }
    let mut table = [0u8; 64];
    read_exact_at(&**disk, 446, &mut table, "master boot record")?;
    for entry in table.chunks_exact(16) {
        if is_extended(entry[4]) {
            let start = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
            check_ebr_chain(disk, u64::from(start))?;
        }
    }
    let mut cur = DiskCursor::new(disk.clone());
    let mbr = catch(|| mbrman::MBR::read_from(&mut cur, 512))?;
    if let Some(e) = cur.take_error() {
        // an unreadable extended boot record is not an absent one
        return Err(Error::new(
            e.kind,
            format!("partition table: {}", e.message),
        ));
    }
    // the MBR is there: when something behind it is broken (an extended
    // boot record without its signature, a link past the disk), that is
    // not a disk without partitions
    let mbr = mbr.map_err(|e| Error::corrupt(format!("partition table: {e}")))?;
    // mbrman takes an extended partition whose first boot record is not
    // one for an empty one
    for (_, p) in mbr.iter() {
        if p.is_used() && is_extended(p.sys) {
            let mut sig = [0u8; 2];
            let at = u64::from(p.starting_lba) * 512 + 510;
            if at + 2 <= disk.size() {
                read_exact_at(&**disk, at, &mut sig, "extended boot record")?;
                if sig != [0x55, 0xAA] {
                    return Err(Error::corrupt(
                        "partition table: the extended partition's first boot record has no signature",
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (n, p) in mbr.iter() {
        if !p.is_used() || is_extended(p.sys) {
            continue;
        }
        out.push(Partition {
            number: n as u32,
            start: u64::from(p.starting_lba) * 512,
            size: u64::from(p.sectors) * 512,
            table: "mbr",
            type_guid: None,
            mbr_type: Some(p.sys),
            name: None,
        });
    }
    Ok(Some(out))
}

/// Runs a table parser; a panic on a garbage table is a corrupt table.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| Error::corrupt("partition table parser failed on a malformed table"))
}

fn describe(
    p: Probe,
) -> (
    Option<&'static str>,
    Option<String>,
    Option<String>,
    bool,
    Option<String>,
) {
    let supported = p.fs.is_some() && p.unsupported.is_none();
    let reason = if supported {
        None
    } else {
        Some(
            p.unsupported
                .map(|e| e.message)
                .unwrap_or_else(|| "unknown filesystem".into()),
        )
    };
    (p.fs.map(|k| k.name()), p.label, p.uuid, supported, reason)
}

/// Lists the volumes of a disk image.
pub fn list_volumes(disk: Arc<dyn Disk>) -> Result<Vec<VolumeInfo>> {
    let Some(parts) = partitions(&disk)? else {
        let (fs, label, uuid, supported, reason) = describe(probe(&disk)?);
        return Ok(vec![VolumeInfo {
            volume: "raw".into(),
            kind: "raw",
            number: None,
            start: 0,
            size: disk.size(),
            table: None,
            type_guid: None,
            mbr_type: None,
            name: None,
            fs,
            label,
            uuid,
            supported,
            reason,
        }]);
    };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        // what the volume's reads can reach: the table's extent clipped to
        // the disk (a truncated image, a corrupt entry)
        let window = Slice::new(disk.clone(), p.start, p.size);
        let (start, size) = (window.start(), window.size());
        let slice: Arc<dyn Disk> = Arc::new(window);
        let probed = match probe(&slice) {
            Ok(pr) => pr,
            Err(e) => Probe {
                unsupported: Some(Error::new(
                    e.kind,
                    format!("cannot read the partition: {e}"),
                )),
                ..Probe::default()
            },
        };
        let (fs, label, uuid, supported, reason) = describe(probed);
        out.push(VolumeInfo {
            volume: format!("part/{}", p.number),
            kind: "partition",
            number: Some(p.number),
            start,
            size,
            table: Some(p.table),
            type_guid: p.type_guid,
            mbr_type: p.mbr_type,
            name: p.name,
            fs,
            label,
            uuid,
            supported,
            reason,
        });
    }
    Ok(out)
}

/// The disk window of a volume: the partition's [`Slice`] for `part/N`,
/// the whole disk for `raw`.
pub fn open_volume(disk: Arc<dyn Disk>, volume: &str) -> Result<Arc<dyn Disk>> {
    if volume == "raw" {
        return Ok(disk);
    }
    let (start, size) = volume_window(&disk, volume)?;
    Ok(Arc::new(Slice::new(disk, start, size)))
}

/// Where volume `part/N` or `raw` lies on the disk: (start, size) in bytes.
pub fn volume_window(disk: &Arc<dyn Disk>, volume: &str) -> Result<(u64, u64)> {
    if volume == "raw" {
        return Ok((0, disk.size()));
    }
    let number: u32 = volume
        .strip_prefix("part/")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Error::not_found(format!(
                "volume {volume:?}: not a volume name (part/N or raw)"
            ))
        })?;
    let parts = partitions(disk)?.unwrap_or_default();
    let p = parts
        .into_iter()
        .find(|p| p.number == number)
        .ok_or_else(|| Error::not_found(format!("volume {volume}: no such partition")))?;
    Ok((p.start, p.size))
}
