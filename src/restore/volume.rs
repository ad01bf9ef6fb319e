//! Volumes of a disk image: partitions of its GPT or MBR table (including
//! logical partitions), or the whole disk when it holds a filesystem and no
//! table, and the logical volumes of LVM2 volume groups with a physical
//! volume on the disk (the others may be on the backup's other disks, its
//! siblings, which the caller opens).
//!
//! Owns: reading partition tables, finding physical volumes, naming volumes
//! (`part/N`, `raw`, `lvm/VG/LV`), where each lies on the disk ([`Layout`]),
//! and describing each with the filesystem probe. Must never walk a
//! filesystem.

use std::io::{Seek, SeekFrom};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::restore::disk::{read_exact_at, Disk, DiskCursor, Layout, Slice};
use crate::restore::lvm;
use crate::restore::probe::{has_filesystem, probe, Probe};

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
    /// what a user must know of a supported volume before trusting what
    /// is read from it
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// the LVM volume group of a physical volume or logical volume
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vg: Option<String>,
    /// the name of an LVM logical volume
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lv: Option<String>,
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

/// Whether a GPT header at byte `at` (if one is there) has an entry count
/// and size the table parser can be given: others would make it read and
/// allocate without bound.
fn gpt_header_is_sane(disk: &Arc<dyn Disk>, at: u64) -> bool {
    let mut h = [0u8; 92];
    if at.saturating_add(92) > disk.size()
        || read_exact_at(&**disk, at, &mut h, "GPT header").is_err()
        || &h[..8] != b"EFI PART"
    {
        return true;
    }
    let entries = u32::from_le_bytes([h[80], h[81], h[82], h[83]]);
    let entry_size = u32::from_le_bytes([h[84], h[85], h[86], h[87]]);
    let sane = entries <= MAX_GPT_ENTRIES && (128..=4096).contains(&entry_size);
    if !sane {
        log::warn!("GPT header at byte {at}: {entries} entries of {entry_size} bytes, not used");
    }
    sane
}

/// What one copy (primary or backup) of a GPT gave.
enum GptCopy {
    Found(Vec<gptman::GPTPartitionEntry>),
    /// no "EFI PART" signature there
    Absent,
    /// a header that does not parse or whose checksums fail
    Bad,
}

/// Reads the GPT copy whose header is at byte `at`, for `sector_size`; a
/// header of absurd geometry is a bad copy (as the kernel takes it, so that
/// the other copy is used), never handed to the parser.
fn read_gpt_copy(disk: &Arc<dyn Disk>, at: u64, sector_size: u64) -> Result<GptCopy> {
    if !gpt_header_is_sane(disk, at) {
        return Ok(GptCopy::Bad);
    }
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
/// signature. Each header is checked by [`gpt_header_is_sane`] before the
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
    if has_filesystem(disk)? {
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

/// A volume entry of `kind` described by what the probe found (or why
/// it found nothing readable); partition fields empty.
fn described(volume: String, kind: &'static str, start: u64, size: u64, p: Probe) -> VolumeInfo {
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
    VolumeInfo {
        volume,
        kind,
        number: None,
        start,
        size,
        table: None,
        type_guid: None,
        mbr_type: None,
        name: None,
        fs: p.fs.map(|k| k.name()),
        label: p.label,
        uuid: p.uuid,
        supported,
        reason,
        warning: p.warning,
        vg: None,
        lv: None,
    }
}

/// A probe that found why a volume cannot be read.
fn unreadable(kind: crate::error::ErrorKind, why: String) -> Probe {
    Probe {
        unsupported: Some(Error::new(kind, why)),
        ..Probe::default()
    }
}

/// The other disks of the backup a disk belongs to, with their names (its
/// other archives): asked for only when a volume group on the disk has a
/// physical volume that is not on it, and opened then.
pub type Siblings<'a> = &'a dyn Fn() -> Vec<(String, Arc<dyn Disk>)>;

/// Lists the volumes of a disk image on its own (a volume group with a
/// physical volume elsewhere cannot be read).
pub fn list_volumes(disk: Arc<dyn Disk>) -> Result<Vec<VolumeInfo>> {
    list_backup_volumes(disk, &Vec::new)
}

/// Lists the volumes of a disk image of a backup whose other disks are
/// `siblings`: a logical volume of a group over several of them is listed
/// with every disk that holds one of its physical volumes.
pub fn list_backup_volumes(disk: Arc<dyn Disk>, siblings: Siblings) -> Result<Vec<VolumeInfo>> {
    let mut out = Vec::new();
    // volumes without a filesystem, where a physical volume may be
    let mut bare = Vec::new();
    match partitions(&disk)? {
        None => {
            let whole = described("raw".into(), "raw", 0, disk.size(), probe(&disk)?);
            if whole.fs.is_none() {
                bare.push((0, (0, disk.size())));
            }
            out.push(whole);
        }
        Some(parts) => {
            for p in parts {
                // what the volume's reads can reach: the table's extent
                // clipped to the disk (a truncated image, a corrupt entry)
                let window = Slice::new(disk.clone(), p.start, p.size);
                let (start, size) = (window.start(), window.size());
                let slice: Arc<dyn Disk> = Arc::new(window);
                let probed = probe(&slice).unwrap_or_else(|e| {
                    unreadable(e.kind, format!("cannot read the partition: {e}"))
                });
                let volume = format!("part/{}", p.number);
                let entry = VolumeInfo {
                    number: Some(p.number),
                    table: Some(p.table),
                    type_guid: p.type_guid,
                    mbr_type: p.mbr_type,
                    name: p.name,
                    ..described(volume, "partition", start, size, probed)
                };
                if entry.fs.is_none() {
                    bare.push((out.len(), (start, size)));
                }
                out.push(entry);
            }
        }
    }
    let windows: Vec<(u64, u64)> = bare.iter().map(|b| b.1).collect();
    let Found { pvs, lvs, others } = logical_volumes(&disk, &windows, siblings);
    let mut disks = vec![disk.clone()];
    disks.extend(others.into_iter().map(|(_, d)| d));
    for (i, found) in pvs {
        let Some(entry) = bare.get(i).and_then(|b| out.get_mut(b.0)) else {
            continue;
        };
        entry.reason = Some(match found {
            Ok(vg) => {
                let why = format!(
                    "LVM physical volume of volume group {vg}: its logical volumes are \
                     the volumes lvm/{vg}/NAME"
                );
                entry.vg = Some(vg);
                why
            }
            Err(e) => format!("LVM physical volume: {}", e.message),
        });
    }
    for lv in lvs {
        let volume = format!("lvm/{}/{}", lv.vg, lv.name);
        let (start, probed) = match &lv.layout {
            Ok(layout) => (
                layout.start(),
                probe(&layout.open(&disks)).unwrap_or_else(|e| {
                    unreadable(e.kind, format!("cannot read the logical volume: {e}"))
                }),
            ),
            Err(e) => (0, unreadable(e.kind, e.message.clone())),
        };
        out.push(VolumeInfo {
            vg: Some(lv.vg),
            lv: Some(lv.name),
            ..described(volume, "lvm", start, lv.size, probed)
        });
    }
    Ok(out)
}

/// A logical volume found on a disk.
struct FoundLv {
    vg: String,
    name: String,
    size: u64,
    /// where it lies on the disk, or why it cannot be read
    layout: Result<Layout>,
}

/// The LVM physical volumes among `windows` (volumes of `disk` without a
/// filesystem): for each, its index in `windows` and its volume group's
/// name or why its metadata cannot be read; the logical volumes of those
/// groups, each group as the newest copy of its metadata (highest
/// `seqno`) describes it; and the sibling disks asked for, which the
/// logical volumes' layouts number from 1 (`disk` is 0). Siblings are asked
/// for only when a group has a physical volume that is not on `disk`.
fn logical_volumes(disk: &Arc<dyn Disk>, windows: &[(u64, u64)], siblings: Siblings) -> Found {
    let mut pvs = Vec::new();
    // (physical volume UUID, (disk, start, size)), and the groups read
    let mut places: Vec<(String, (usize, u64, u64))> = Vec::new();
    let mut groups: Vec<lvm::VolumeGroup> = Vec::new();
    for (i, &(start, size)) in windows.iter().enumerate() {
        let Some((uuid, group)) = physical_volume(disk, start, size) else {
            continue;
        };
        if let Some(uuid) = uuid {
            places.push((uuid, (0, start, size)));
        }
        match group {
            Ok(g) => {
                pvs.push((i, Ok(g.name.clone())));
                match groups.iter_mut().find(|o| o.id == g.id && o.name == g.name) {
                    Some(old) if old.seqno >= g.seqno => {}
                    Some(old) => *old = g,
                    None => groups.push(g),
                }
            }
            Err(e) => pvs.push((i, Err(e))),
        }
    }
    let elsewhere = groups.iter().any(|g| {
        g.pvs
            .iter()
            .any(|pv| !places.iter().any(|p| p.0 == pv.uuid))
    });
    let others = if elsewhere { siblings() } else { Vec::new() };
    for (n, (_, other)) in others.iter().enumerate() {
        // a sibling that cannot be read holds none of the missing ones
        for (start, size) in bare_windows(other).unwrap_or_default() {
            let Some((Some(uuid), group)) = physical_volume(other, start, size) else {
                continue;
            };
            places.push((uuid, (n + 1, start, size)));
            // only groups with a physical volume on `disk` are listed
            // here; a newer copy of their metadata is theirs wherever it is
            if let Ok(g) = group {
                if let Some(old) = groups.iter_mut().find(|o| o.id == g.id && o.name == g.name) {
                    if g.seqno > old.seqno {
                        *old = g;
                    }
                }
            }
        }
    }
    let mut lvs = Vec::new();
    for g in groups {
        for lv in &g.lvs {
            let layout = match &lv.layout {
                Ok(pieces) => lv_on_disks(&g, pieces, &places),
                Err(why) => Err(Error::unsupported(why.clone())),
            };
            lvs.push(FoundLv {
                vg: g.name.clone(),
                name: lv.name.clone(),
                size: lv.size,
                layout,
            });
        }
    }
    Found { pvs, lvs, others }
}

/// What [`logical_volumes`] found.
struct Found {
    /// physical volumes: index in the windows, and group name or error
    pvs: Vec<(usize, Result<String>)>,
    lvs: Vec<FoundLv>,
    /// the siblings asked for: disks 1, 2, ... of the layouts
    others: Vec<(String, Arc<dyn Disk>)>,
}

/// What the LVM label of window `[start, start + size)` of `disk` says, if
/// it has one: the physical volume's UUID (unless the label is unreadable)
/// and its volume group.
fn physical_volume(
    disk: &Arc<dyn Disk>,
    start: u64,
    size: u64,
) -> Option<(Option<String>, Result<lvm::VolumeGroup>)> {
    let slice = Slice::new(disk.clone(), start, size);
    // Sectors that cannot be read say nothing of a label: the volume stays
    // listed with the probe's own reason (it could not read them either),
    // not as a physical volume.
    let head = lvm::label_sectors(&slice).ok()?;
    let label = match lvm::find_label(&head) {
        Ok(Some(label)) => label,
        Ok(None) => return None,
        Err(e) => return Some((None, Err(e))),
    };
    let group =
        lvm::read_label_metadata(&slice, &label).and_then(|text| lvm::parse_volume_group(&text));
    Some((Some(label.uuid), group))
}

/// Where the pieces of a logical volume of `g` lie, given where its
/// physical volumes are (`places`: UUID and (disk, window)).
fn lv_on_disks(
    g: &lvm::VolumeGroup,
    pieces: &[lvm::Piece],
    places: &[(String, (usize, u64, u64))],
) -> Result<Layout> {
    let mut runs = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let pv = g.pvs.get(piece.pv).ok_or_else(|| {
            Error::corrupt(format!(
                "volume group {}: a piece on no physical volume",
                g.name
            ))
        })?;
        let Some((_, (disk, start, size))) = places.iter().find(|p| p.0 == pv.uuid) else {
            return Err(Error::not_found(format!(
                "volume group {} has a physical volume (UUID {}) on no disk of this backup",
                g.name, pv.uuid
            )));
        };
        if piece
            .offset
            .checked_add(piece.len)
            .is_none_or(|end| end > *size)
        {
            return Err(Error::corrupt(format!(
                "volume group {}: a logical volume's extents lie beyond the end of its \
                 physical volume ({size} bytes)",
                g.name
            )));
        }
        runs.push((*disk, start + piece.offset, piece.len));
    }
    Layout::from_runs(runs)
        .ok_or_else(|| Error::corrupt(format!("volume group {}: extents past 2^64", g.name)))
}

/// The disk window of a volume: the partition's [`Slice`] for `part/N`,
/// the whole disk for `raw`, the logical volume's runs for `lvm/VG/LV`
/// (of a group on this disk alone).
pub fn open_volume(disk: Arc<dyn Disk>, volume: &str) -> Result<Arc<dyn Disk>> {
    if volume == "raw" {
        return Ok(disk);
    }
    let placed = volume_layout(&disk, volume, &Vec::new)?;
    Ok(placed.layout.open(&[disk]))
}

/// Where a volume lies: its layout, and the sibling disks its runs use
/// (disk 1 of the layout is the first of them; disk 0 is the volume's own).
pub struct Placed {
    pub layout: Layout,
    pub siblings: Vec<(String, Arc<dyn Disk>)>,
}

/// Where volume `part/N`, `raw` or `lvm/VG/LV` of `disk` lies (for a
/// partition, clipped to the disk); a logical volume may lie on
/// `siblings` too.
pub fn volume_layout(disk: &Arc<dyn Disk>, volume: &str, siblings: Siblings) -> Result<Placed> {
    let alone = |layout| {
        Ok(Placed {
            layout,
            siblings: Vec::new(),
        })
    };
    if volume == "raw" {
        return alone(Layout::window(0, disk.size()));
    }
    if let Some(name) = volume.strip_prefix("lvm/") {
        return logical_volume_layout(disk, volume, name, siblings);
    }
    let number: u32 = volume
        .strip_prefix("part/")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Error::not_found(format!(
                "volume {volume:?}: not a volume name (part/N, lvm/VG/LV or raw)"
            ))
        })?;
    let parts = partitions(disk)?.unwrap_or_default();
    let p = parts
        .into_iter()
        .find(|p| p.number == number)
        .ok_or_else(|| Error::not_found(format!("volume {volume}: no such partition")))?;
    let window = Slice::new(disk.clone(), p.start, p.size);
    alone(Layout::window(window.start(), window.size()))
}

/// The windows of `disk` without a filesystem, where a physical volume may
/// be, as `list_volumes` finds them: the whole disk when it has neither a
/// partition table nor a filesystem, else its partitions that hold none.
fn bare_windows(disk: &Arc<dyn Disk>) -> Result<Vec<(u64, u64)>> {
    Ok(match partitions(disk)? {
        None if !has_filesystem(disk)? => vec![(0, disk.size())],
        None => Vec::new(),
        Some(parts) => parts
            .iter()
            .filter_map(|p| {
                let w = Slice::new(disk.clone(), p.start, p.size);
                let at = (w.start(), w.size());
                let w: Arc<dyn Disk> = Arc::new(w);
                has_filesystem(&w).map_or(true, |fs| !fs).then_some(at)
            })
            .collect(),
    })
}

/// The layout of logical volume `name` (`VG/LV`) of the disk, with the
/// siblings it lies on (renumbered: only those it uses are kept).
fn logical_volume_layout(
    disk: &Arc<dyn Disk>,
    volume: &str,
    name: &str,
    siblings: Siblings,
) -> Result<Placed> {
    let windows = bare_windows(disk)?;
    let Found { lvs, others, .. } = logical_volumes(disk, &windows, siblings);
    let lv = lvs
        .into_iter()
        .find(|lv| name.split_once('/') == Some((lv.vg.as_str(), lv.name.as_str())))
        .ok_or_else(|| Error::not_found(format!("volume {volume}: no such logical volume")))?;
    let layout = lv
        .layout
        .map_err(|e| Error::new(e.kind, format!("volume {volume}: {}", e.message)))?;
    // keep the siblings the runs use, numbered from 1 in the order given
    let mut kept = Vec::new();
    let mut number = vec![0usize; others.len() + 1];
    for (n, other) in others.into_iter().enumerate() {
        if layout.uses(n + 1) {
            kept.push(other);
            number[n + 1] = kept.len();
        }
    }
    let layout = layout.renumbered(&number);
    Ok(Placed {
        layout,
        siblings: kept,
    })
}
