//! Filesystem detection by superblock magic.
//!
//! Owns: recognising which filesystem (if any) starts a volume, its label
//! and UUID, and whether this agent can read it (and if not, why).
//! Must never parse partition tables or walk a filesystem's tree.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::le::{le16, le32};
use crate::restore::disk::{read_exact_at, Disk};

/// The filesystems the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Vfat,
    Ntfs,
    Xfs,
    Btrfs,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Vfat => "vfat",
            FsKind::Ntfs => "ntfs",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
        }
    }
}

/// What a volume holds.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    pub fs: Option<FsKind>,
    pub label: Option<String>,
    pub uuid: Option<String>,
    /// Why the agent cannot read this volume: `Unsupported` for a
    /// filesystem or feature it does not read, `Corrupt` for a damaged one.
    pub unsupported: Option<Error>,
    /// What a user must know of a readable volume before trusting what is
    /// read from it.
    pub warning: Option<String>,
}

/// Bytes read from the start of a volume to recognise it: up to a ZFS
/// label's uberblocks.
const HEAD_LEN: usize = 256 * 1024;

/// What the agent recognises but does not read, so that a volume says
/// what it holds: (offset, magic, what).
const NOT_READ: &[(usize, &[u8], &str)] = &[
    (4086, b"SWAPSPACE2", "swap space"),
    (4086, b"SWAP-SPACE", "swap space"),
    (0, b"LUKS\xba\xbe", "LUKS encryption"),
    (3, b"-FVE-FS-", "BitLocker encryption"),
    (3, b"ReFS\0\0\0\0", "ReFS"),
    (0x8001, b"CD001", "iso9660"),
    (3, b"EXFAT   ", "exfat"),
    // superblock 1.2 and 1.1 (0.90 and 1.0 lie at the end of the device)
    (4096, &[0xfc, 0x4e, 0x2b, 0xa9], "a Linux MD RAID member"),
    (0, &[0xfc, 0x4e, 0x2b, 0xa9], "a Linux MD RAID member"),
    (
        4096 + 24,
        &[
            0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba,
            0x6d, 0x81,
        ],
        "bcache",
    ),
    (0, b"hsqs", "squashfs"),
    (1024, &[0x10, 0x20, 0xf5, 0xf2], "f2fs"),
    (32768, b"JFS1", "JFS"),
    (65536 + 52, b"ReIsErFs", "ReiserFS"),
    (65536 + 52, b"ReIsEr2Fs", "ReiserFS"),
    (65536 + 52, b"ReIsEr3Fs", "ReiserFS"),
];

/// Where a ZFS vdev label keeps its uberblocks (each at least 1 KiB), and
/// their magic in either byte order.
const ZFS_UBERBLOCKS: std::ops::Range<usize> = 128 * 1024..256 * 1024;
const ZFS_MAGIC: u64 = 0x00ba_b10c;

const EXT_MAGIC: u16 = 0xEF53;
// ext compat / incompat / ro_compat bits that tell ext3 and ext4 apart
const EXT_COMPAT_HAS_JOURNAL: u32 = 0x4;
const EXT_INCOMPAT_EXT4_ONLY: u32 = 0x40 | 0x80 | 0x200 | 0x400 | 0x4000 | 0x8000 | 0x10;
const EXT_RO_COMPAT_EXT4_ONLY: u32 = 0x8 | 0x10 | 0x20 | 0x40 | 0x400;

fn has(b: &[u8], at: usize, magic: &[u8]) -> bool {
    b.get(at..at + magic.len()) == Some(magic)
}

/// A label from fixed-size bytes: trailing NULs/spaces trimmed, empty is None.
fn label_of(bytes: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim_end_matches(['\0', ' ']).to_string();
    (!s.is_empty()).then_some(s)
}

/// A UUID's 16 bytes in their usual text form; `None` when all zero.
pub(crate) fn uuid_of(b: &[u8]) -> Option<String> {
    if b.len() != 16 || b.iter().all(|&x| x == 0) {
        return None;
    }
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    ))
}

/// Recognises the filesystem at the start of `disk`, with what a user must
/// know before trusting what is read from it.
pub fn probe(disk: &Arc<dyn Disk>) -> Result<Probe> {
    probe_at(disk, true)
}

/// [`probe`] without the warning, and so without its work (an XFS log's
/// recovery): for whoever only needs to know what the volume holds.
pub fn probe_kind(disk: &Arc<dyn Disk>) -> Result<Probe> {
    probe_at(disk, false)
}

/// Whether there is a filesystem at the start of `disk` (of any kind, read
/// or not).
pub fn has_filesystem(disk: &Arc<dyn Disk>) -> Result<bool> {
    Ok(probe_kind(disk)?.fs.is_some())
}

fn probe_at(disk: &Arc<dyn Disk>, warn: bool) -> Result<Probe> {
    let len = (disk.size().min(HEAD_LEN as u64)) as usize;
    let mut head = vec![0u8; len];
    read_exact_at(&**disk, 0, &mut head, "volume start")?;
    Ok(probe_head(disk, &head, warn))
}

fn unknown(what: &str) -> Probe {
    Probe {
        unsupported: Some(Error::unsupported(format!("{what} is not supported"))),
        ..Probe::default()
    }
}

fn probe_head(disk: &Arc<dyn Disk>, head: &[u8], warn: bool) -> Probe {
    if le16(head, 1024 + 56) == EXT_MAGIC {
        return probe_ext(disk, head);
    }
    if has(head, 3, b"NTFS    ") {
        return crate::restore::fs::ntfs::probe(disk.clone());
    }
    let boot_sig = has(head, 510, &[0x55, 0xAA]);
    if boot_sig
        && (has(head, 0x36, b"FAT12   ")
            || has(head, 0x36, b"FAT16   ")
            || has(head, 0x36, b"FAT     ")
            || has(head, 0x52, b"FAT32   "))
    {
        return crate::restore::fs::fat::probe(disk.clone(), head);
    }
    if has(head, 0, b"XFSB") {
        return crate::restore::fs::xfs::probe(disk.clone(), warn);
    }
    if has(head, 0x10040, b"_BHRfS_M") {
        return crate::restore::fs::btrfs::probe(disk.clone());
    }
    if has(head, 512, b"LABELONE") && has(head, 512 + 24, b"LVM2 001") {
        return unknown("LVM2 physical volume");
    }
    if let Some((_, _, what)) = NOT_READ.iter().find(|(at, magic, _)| has(head, *at, magic)) {
        return unknown(what);
    }
    let zfs = head
        .get(ZFS_UBERBLOCKS)
        .unwrap_or_default()
        .chunks_exact(1024)
        .any(|ub| {
            let magic: [u8; 8] = ub[..8].try_into().unwrap_or_default();
            u64::from_le_bytes(magic) == ZFS_MAGIC || u64::from_be_bytes(magic) == ZFS_MAGIC
        });
    if zfs {
        return unknown("a ZFS pool member");
    }
    Probe {
        unsupported: Some(Error::unsupported("no known filesystem found")),
        ..Probe::default()
    }
}

fn probe_ext(disk: &Arc<dyn Disk>, head: &[u8]) -> Probe {
    let sb = &head[1024.min(head.len())..];
    let compat = le32(sb, 0x5C);
    let incompat = le32(sb, 0x60);
    let ro_compat = le32(sb, 0x64);
    let kind = if incompat & EXT_INCOMPAT_EXT4_ONLY != 0 || ro_compat & EXT_RO_COMPAT_EXT4_ONLY != 0
    {
        FsKind::Ext4
    } else if compat & EXT_COMPAT_HAS_JOURNAL != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    };
    let unsupported = crate::restore::fs::ext::check_supported(disk.clone()).err();
    Probe {
        fs: Some(kind),
        label: sb.get(0x78..0x88).and_then(label_of),
        uuid: sb.get(0x68..0x78).and_then(uuid_of),
        unsupported,
        warning: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::disk::MemDisk;

    fn reason(head: Vec<u8>) -> String {
        let disk: Arc<dyn Disk> = Arc::new(MemDisk(head));
        let p = probe(&disk).unwrap();
        assert!(p.fs.is_none());
        p.unsupported.unwrap().message
    }

    /// What is not read says what it is (the tools that make most of these
    /// are not installed here, so the signatures are laid by hand, at the
    /// offsets blkid looks at).
    #[test]
    fn volumes_not_read_say_what_they_hold() {
        for &(at, magic, what) in NOT_READ {
            let mut head = vec![0u8; 1 << 20];
            head[at..at + magic.len()].copy_from_slice(magic);
            assert_eq!(reason(head), format!("{what} is not supported"));
        }
        for (slot, bytes) in [(0, ZFS_MAGIC.to_le_bytes()), (37, ZFS_MAGIC.to_be_bytes())] {
            let mut head = vec![0u8; 1 << 20];
            let at = ZFS_UBERBLOCKS.start + slot * 1024;
            head[at..at + 8].copy_from_slice(&bytes);
            assert_eq!(reason(head), "a ZFS pool member is not supported");
        }
        // the magic off a slot's start, and nothing at all
        let mut head = vec![0u8; 1 << 20];
        head[ZFS_UBERBLOCKS.start + 8..ZFS_UBERBLOCKS.start + 16]
            .copy_from_slice(&ZFS_MAGIC.to_le_bytes());
        assert_eq!(reason(head), "no known filesystem found");
        assert_eq!(reason(vec![0u8; 100]), "no known filesystem found");
    }
}
