//! LVM2 physical volumes: the label, the metadata area, and the volume
//! group its text metadata describes, down to where each logical volume's
//! extents lie on the physical volumes.
//!
//! On disk (LVM2's `format_text` layout; all integers little-endian, all
//! sizes in metadata in 512-byte sectors whatever the disk's sector size):
//! - the label: in one of the first four sectors, `LABELONE`, the sector's
//!   own number (u64), a CRC (u32) of the rest of the sector from byte 20,
//!   the offset (u32) of the physical volume header, `LVM2 001`;
//! - the physical volume header: its UUID (32 characters), the device size
//!   (u64), then two lists of (offset, size) byte pairs, each ended by a
//!   zero pair: data areas, then metadata areas;
//! - a metadata area: a 512-byte header (CRC of its bytes 4-512, the magic
//!   ` LVM2 x[5A%r0N*>`, version 1, its own start and size) whose first
//!   location (offset from the area's start, size, CRC, flags) points at
//!   the current metadata text in the area's ring buffer, which wraps
//!   around to just after the header.
//!
//! The CRC is LVM's: CRC-32 (the IEEE polynomial, reflected) started at
//! 0xf597a6cf with no final inversion.
//!
//! Owns: reading and checking these structures and the volume group's
//! meaning (physical volumes, visible logical volumes, linear segments).
//! Must never write, never trust a size or count before it is checked
//! against what the disk and the metadata hold, and never know partitions.

use crate::error::{Error, Result};
use crate::restore::disk::{read_exact_at, Disk};
use crate::restore::lvm_text::{self, Section, Value};

const SECTOR: u64 = 512;
const LABEL_ID: &[u8; 8] = b"LABELONE";
const LABEL_TYPE: &[u8; 8] = b"LVM2 001";
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const MDA_HEADER: u64 = 512;
const INITIAL_CRC: u32 = 0xf597_a6cf;
/// Largest metadata text read (LVM's default metadata area is 1 MiB).
const MAX_METADATA: u64 = 16 << 20;
/// Most metadata areas, physical volumes, logical volumes and segments
/// taken from one label or volume group.
const MAX_AREAS: usize = 8;
const MAX_PVS: usize = 1024;
const MAX_LVS: usize = 4096;
const MAX_SEGMENTS: usize = 65536;

/// LVM's CRC of `data`.
pub fn crc(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(!INITIAL_CRC);
    h.update(data);
    !h.finalize()
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(b.get(at..at + 4).unwrap_or(&[0; 4]));
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(b.get(at..at + 8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(v)
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("LVM physical volume: {what}"))
}

/// What an LVM2 label says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The physical volume's UUID, 32 characters without dashes.
    pub uuid: String,
    /// Metadata areas: (byte offset, size).
    pub metadata_areas: Vec<(u64, u64)>,
}

/// The first sectors of `disk`, where an LVM2 label would be (see
/// [`find_label`]).
pub fn label_sectors(disk: &dyn Disk) -> Result<Vec<u8>> {
    let len = disk.size().min(4 * SECTOR);
    let mut head = vec![0u8; len as usize];
    read_exact_at(disk, 0, &mut head, "LVM label")?;
    Ok(head)
}

/// The LVM2 label in `head`, a disk's [`label_sectors`], if it has one.
pub fn find_label(head: &[u8]) -> Result<Option<Label>> {
    for (n, sector) in head.chunks_exact(SECTOR as usize).enumerate() {
        if sector.get(..8) != Some(&LABEL_ID[..]) {
            continue;
        }
        if le64(sector, 8) != n as u64 || sector.get(24..32) != Some(&LABEL_TYPE[..]) {
            continue;
        }
        if crc(&sector[20..]) != le32(sector, 16) {
            return Err(corrupt(format!(
                "the label in sector {n} fails its checksum"
            )));
        }
        let at = le32(sector, 20) as usize;
        // UUID, device size, and at least the two list ends
        if at < 32 || at + 32 + 8 + 32 > sector.len() {
            return Err(corrupt("the label's header offset is out of its sector"));
        }
        let uuid = &sector[at..at + 32];
        if !uuid.iter().all(|b| b.is_ascii_alphanumeric()) {
            return Err(corrupt("the label's UUID is not text"));
        }
        let mut pos = at + 40;
        let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
        for list in &mut lists {
            loop {
                if pos + 16 > sector.len() {
                    return Err(corrupt("the label's area lists do not end in its sector"));
                }
                let (offset, size) = (le64(sector, pos), le64(sector, pos + 8));
                pos += 16;
                if offset == 0 && size == 0 {
                    break;
                }
                if list.len() == MAX_AREAS {
                    return Err(corrupt("the label lists too many areas"));
                }
                list.push((offset, size));
            }
        }
        let [_, metadata_areas] = lists;
        return Ok(Some(Label {
            uuid: String::from_utf8_lossy(uuid).into_owned(),
            metadata_areas,
        }));
    }
    Ok(None)
}

/// The current metadata text of the physical volume's metadata area at
/// `area` (byte offset, size); `None` when the area holds none or is
/// marked ignored.
pub fn read_metadata(disk: &dyn Disk, area: (u64, u64)) -> Result<Option<Vec<u8>>> {
    let (start, size) = area;
    if size <= MDA_HEADER || start.checked_add(size).is_none_or(|e| e > disk.size()) {
        return Err(corrupt(format!(
            "metadata area at byte {start} (+{size}) is not on the disk"
        )));
    }
    let mut h = [0u8; MDA_HEADER as usize];
    read_exact_at(disk, start, &mut h, "LVM metadata area")?;
    if h[4..20] != MDA_MAGIC[..] {
        return Err(corrupt(format!("no metadata area header at byte {start}")));
    }
    if crc(&h[4..]) != le32(&h, 0) {
        return Err(corrupt(format!(
            "the metadata area header at byte {start} fails its checksum"
        )));
    }
    if le32(&h, 20) != 1 || le64(&h, 24) != start || le64(&h, 32) != size {
        return Err(corrupt(format!(
            "the metadata area header at byte {start} does not describe its area"
        )));
    }
    let (offset, len, sum, flags) = (le64(&h, 40), le64(&h, 48), le32(&h, 56), le32(&h, 60));
    if flags & 1 != 0 || len == 0 {
        return Ok(None);
    }
    let ring = size - MDA_HEADER;
    if offset < MDA_HEADER || offset >= size || len > ring || len > MAX_METADATA {
        return Err(corrupt(format!(
            "the metadata at byte {offset} (+{len}) of the area at byte {start} is out of it"
        )));
    }
    let mut text = vec![0u8; len as usize];
    let first = len.min(size - offset) as usize;
    read_exact_at(disk, start + offset, &mut text[..first], "LVM metadata")?;
    read_exact_at(disk, start + MDA_HEADER, &mut text[first..], "LVM metadata")?;
    if crc(&text) != sum {
        return Err(corrupt(format!(
            "the metadata text of the area at byte {start} fails its checksum"
        )));
    }
    Ok(Some(text))
}

/// The metadata text of the first of the label's areas that holds one.
pub fn read_label_metadata(disk: &dyn Disk, label: &Label) -> Result<Vec<u8>> {
    let mut failed = None;
    for &area in &label.metadata_areas {
        match read_metadata(disk, area) {
            Ok(Some(text)) => return Ok(text),
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
    }
    Err(failed.unwrap_or_else(|| corrupt("no metadata area holds the volume group's metadata")))
}

/// A volume group as its metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeGroup {
    pub name: String,
    pub id: String,
    pub seqno: u64,
    pub pvs: Vec<PhysicalVolume>,
    /// The visible logical volumes, in metadata order.
    pub lvs: Vec<LogicalVolume>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysicalVolume {
    /// The physical volume's UUID without dashes (as its label has it).
    pub uuid: String,
    /// Where its first extent starts, in bytes from its start.
    pub pe_start: u64,
    /// Bytes of its extents (count times extent size).
    pub pe_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalVolume {
    pub name: String,
    pub size: u64,
    /// Where its bytes lie, in order, or why they cannot be read.
    pub layout: std::result::Result<Vec<Piece>, String>,
}

/// A run of a logical volume's bytes on one physical volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index into [`VolumeGroup::pvs`].
    pub pv: usize,
    /// Byte offset on the physical volume.
    pub offset: u64,
    pub len: u64,
}

/// Whether `name` is a valid VG or LV name (LVM allows these bytes only;
/// volume ids are made of them, so no `/` may get in).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'.' | b'-'))
}

fn nonneg(section: &Section, key: &str, what: &str) -> Result<u64> {
    section
        .int(key)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| corrupt(format!("{what}: no valid {key}")))
}

/// Parses a volume group's metadata text.
pub fn parse_volume_group(text: &[u8]) -> Result<VolumeGroup> {
    let top = lvm_text::parse(text).map_err(|e| corrupt(format!("metadata text: {e}")))?;
    let mut groups = top.sections();
    let (name, vg) = groups
        .next()
        .ok_or_else(|| corrupt("the metadata names no volume group"))?;
    if groups.next().is_some() {
        return Err(corrupt("the metadata names more than one volume group"));
    }
    if !valid_name(name) {
        return Err(corrupt("the volume group's name is not valid"));
    }
    let what = format!("volume group {name}");
    let extent = nonneg(vg, "extent_size", &what)?
        .checked_mul(SECTOR)
        .filter(|&e| e > 0)
        .ok_or_else(|| corrupt(format!("{what}: bad extent_size")))?;
    let mut keys = Vec::new();
    let mut pvs = Vec::new();
    if let Some(section) = vg.section("physical_volumes") {
        for (key, pv) in section.sections() {
            if pvs.len() == MAX_PVS {
                return Err(corrupt(format!("{what}: too many physical volumes")));
            }
            let pv_what = format!("{what}, physical volume {key}");
            let uuid: String = pv
                .str("id")
                .ok_or_else(|| corrupt(format!("{pv_what}: no id")))?
                .chars()
                .filter(|&c| c != '-')
                .collect();
            let pe_start = nonneg(pv, "pe_start", &pv_what)?
                .checked_mul(SECTOR)
                .ok_or_else(|| corrupt(format!("{pv_what}: bad pe_start")))?;
            let pe_bytes = nonneg(pv, "pe_count", &pv_what)?
                .checked_mul(extent)
                .ok_or_else(|| corrupt(format!("{pv_what}: bad pe_count")))?;
            keys.push(key.to_string());
            pvs.push(PhysicalVolume {
                uuid,
                pe_start,
                pe_bytes,
            });
        }
    }
    let mut lvs = Vec::new();
    if let Some(section) = vg.section("logical_volumes") {
        // A classic snapshot is a visible LV whose (linear) extents hold the
        // copy-on-write store that a hidden LV's "snapshot" segment names
        // (`cow_store`, or `merging_store` while it merges): read as a
        // volume it would be the store, not the snapshot.
        let cow_stores: Vec<&str> = section
            .sections()
            .flat_map(|(_, lv)| lv.sections())
            .filter(|(_, seg)| seg.str("type") == Some("snapshot"))
            .filter_map(|(_, seg)| seg.str("cow_store").or(seg.str("merging_store")))
            .collect();
        for (lv_name, lv) in section.sections() {
            if !lv.has_flag("status", "VISIBLE") {
                continue;
            }
            if lvs.len() == MAX_LVS {
                return Err(corrupt(format!("{what}: too many logical volumes")));
            }
            if !valid_name(lv_name) {
                return Err(corrupt(format!(
                    "{what}: a logical volume's name is not valid"
                )));
            }
            let lv_what = format!("{what}, logical volume {lv_name}");
            let (size, mut layout) = lv_layout(lv, extent, &keys, &pvs, &lv_what)?;
            if cow_stores.contains(&lv_name) {
                layout = Err("LVM snapshots are not supported".to_string());
            }
            lvs.push(LogicalVolume {
                name: lv_name.to_string(),
                size,
                layout,
            });
        }
    }
    Ok(VolumeGroup {
        name: name.to_string(),
        id: vg.str("id").unwrap_or_default().to_string(),
        seqno: nonneg(vg, "seqno", &what)?,
        pvs,
        lvs,
    })
}

/// A logical volume's size and where its extents lie (or why that cannot
/// be said for a kind of segment this reader does not map). Corrupt
/// metadata is an error.
fn lv_layout(
    lv: &Section,
    extent: u64,
    keys: &[String],
    pvs: &[PhysicalVolume],
    what: &str,
) -> Result<(u64, std::result::Result<Vec<Piece>, String>)> {
    let mut segments: Vec<(u64, u64, &Section)> = Vec::new();
    for (key, seg) in lv.sections() {
        if !key.starts_with("segment") {
            continue;
        }
        if segments.len() == MAX_SEGMENTS {
            return Err(corrupt(format!("{what}: too many segments")));
        }
        let start = nonneg(seg, "start_extent", what)?;
        let count = nonneg(seg, "extent_count", what)?;
        segments.push((start, count, seg));
    }
    segments.sort_by_key(|s| s.0);
    let mut next = 0u64;
    let mut pieces = Vec::with_capacity(segments.len());
    let mut unsupported = None;
    for (start, count, seg) in segments {
        if start != next || count == 0 {
            return Err(corrupt(format!(
                "{what}: its segments do not follow each other"
            )));
        }
        next = start
            .checked_add(count)
            .ok_or_else(|| corrupt(format!("{what}: too many extents")))?;
        let kind = seg.str("type").unwrap_or_default();
        let stripes = seg.list("stripes").unwrap_or_default();
        let linear = kind == "striped" && seg.int("stripe_count") == Some(1) && stripes.len() == 2;
        if !linear {
            unsupported.get_or_insert_with(|| {
                if kind == "striped" {
                    "striped LVM logical volumes are not supported".to_string()
                } else {
                    format!("LVM logical volumes of segment type {kind:?} are not supported")
                }
            });
            continue;
        }
        let (Value::Str(key), Value::Int(first)) = (&stripes[0], &stripes[1]) else {
            return Err(corrupt(format!("{what}: a segment's stripe is not valid")));
        };
        let pv = keys
            .iter()
            .position(|k| k == key)
            .ok_or_else(|| corrupt(format!("{what}: a segment names an unknown {key}")))?;
        let bytes = |n: u64| n.checked_mul(extent);
        let (Some(offset), Some(len)) = (u64::try_from(*first).ok().and_then(bytes), bytes(count))
        else {
            return Err(corrupt(format!("{what}: a segment is out of range")));
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > pvs[pv].pe_bytes)
        {
            return Err(corrupt(format!(
                "{what}: a segment lies beyond the extents of {key}"
            )));
        }
        let offset = offset + pvs[pv].pe_start;
        match pieces.last_mut() {
            // the next extents of the same run: one piece
            Some(Piece {
                pv: p,
                offset: o,
                len: l,
            }) if *p == pv && *o + *l == offset => *l += len,
            _ => pieces.push(Piece { pv, offset, len }),
        }
    }
    let size = next
        .checked_mul(extent)
        .ok_or_else(|| corrupt(format!("{what}: too many extents")))?;
    Ok((size, unsupported.map_or(Ok(pieces), Err)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_crc_matches_lvm2s_own() {
        // values from LVM2's calc_crc (INITIAL_CRC, the 4-bit table loop)
        // computed independently
        assert_eq!(crc(b""), 0xf597_a6cf);
        assert_eq!(crc(b"LVM2"), 0x34ff_1083);
        assert_eq!(crc(b"123456789"), 0x4991_cf02);
    }

    fn vg(lvs: &str) -> String {
        format!(
            r#"vg0 {{ id = "abc" seqno = 7 extent_size = 8
physical_volumes {{
 pv0 {{ id = "aaaaaa-bbbb" pe_start = 2048 pe_count = 10 }}
 pv1 {{ id = "cccccc-dddd" pe_start = 8 pe_count = 4 }}
}}
logical_volumes {{ {lvs} }} }}"#
        )
    }

    fn seg(n: u32, start: u64, count: u64, pv: &str, pe: i64) -> String {
        format!(
            r#"segment{n} {{ start_extent = {start} extent_count = {count} type = "striped"
 stripe_count = 1 stripes = ["{pv}", {pe}] }}"#
        )
    }

    #[test]
    fn logical_volumes_map_to_their_extents() {
        let text = vg(&format!(
            r#"a {{ status = ["READ", "VISIBLE"] segment_count = 3 {} {} {} }}
               hidden {{ status = ["READ"] {} }}
               t {{ status = ["VISIBLE"] segment1 {{ start_extent = 0 extent_count = 1 type = "thin" }} }}
               snap {{ status = ["VISIBLE"] {} }}
               snapshot0 {{ status = ["READ"] segment1 {{ start_extent = 0 extent_count = 4
                 type = "snapshot" chunk_size = 8 origin = "a" cow_store = "snap" }} }}"#,
            seg(2, 2, 1, "pv1", 0),
            seg(1, 0, 2, "pv0", 3),
            seg(3, 3, 1, "pv1", 1),
            seg(1, 0, 1, "pv0", 0),
            seg(1, 0, 1, "pv0", 9),
        ));
        let g = parse_volume_group(text.as_bytes()).unwrap();
        assert_eq!((g.name.as_str(), g.seqno), ("vg0", 7));
        assert_eq!(g.pvs[0].uuid, "aaaaaabbbb");
        let names: Vec<&str> = g.lvs.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["a", "t", "snap"], "hidden LVs are not listed");
        let a = &g.lvs[0];
        assert_eq!(a.size, 4 * 4096);
        // extents 3-4 of pv0, then 0-1 of pv1 joined into one piece
        assert_eq!(
            a.layout,
            Ok(vec![
                Piece {
                    pv: 0,
                    offset: 2048 * 512 + 3 * 4096,
                    len: 2 * 4096
                },
                Piece {
                    pv: 1,
                    offset: 8 * 512,
                    len: 2 * 4096
                },
            ])
        );
        assert_eq!(
            g.lvs[1].layout,
            Err("LVM logical volumes of segment type \"thin\" are not supported".into())
        );
        assert_eq!(
            g.lvs[2].layout,
            Err("LVM snapshots are not supported".into()),
            "the snapshot's copy-on-write store is not read as a volume"
        );
    }

    #[test]
    fn corrupt_metadata_is_an_error() {
        let lv = |segs: &str| vg(&format!(r#"a {{ status = ["VISIBLE"] {segs} }}"#));
        let cases = [
            (lv(&seg(1, 1, 1, "pv0", 0)), "do not follow each other"),
            (lv(&seg(1, 0, 1, "pv9", 0)), "unknown pv9"),
            (lv(&seg(1, 0, 5, "pv1", 0)), "beyond the extents of pv1"),
            (lv(&seg(1, 0, 1, "pv0", -1)), "out of range"),
            (
                lv(&format!(
                    "{} {}",
                    seg(1, 0, 1, "pv0", 0),
                    seg(2, 0, 1, "pv0", 1)
                )),
                "do not follow each other",
            ),
            ("vg0 { seqno = 1 }".to_string(), "no valid extent_size"),
            ("".to_string(), "names no volume group"),
            ("a { } b { }".to_string(), "more than one volume group"),
            ("a/b { }".to_string(), "metadata text"),
            (vg(r#"x/y { status = ["VISIBLE"] }"#), "metadata text"),
        ];
        for (text, want) in cases {
            let err = parse_volume_group(text.as_bytes()).unwrap_err();
            assert!(err.message.contains(want), "{text}: {}", err.message);
        }
    }
}
