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

/// Bytes read from the start of a volume to recognise it.
const HEAD_LEN: usize = 68 * 1024;

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

fn uuid_of(b: &[u8]) -> Option<String> {
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

/// Recognises the filesystem at the start of `disk`.
pub fn probe(disk: &Arc<dyn Disk>) -> Result<Probe> {
    let len = (disk.size().min(HEAD_LEN as u64)) as usize;
    let mut head = vec![0u8; len];
    read_exact_at(&**disk, 0, &mut head, "volume start")?;
    Ok(probe_head(disk, &head))
}

fn unknown(what: &str) -> Probe {
    Probe {
        unsupported: Some(Error::unsupported(format!("{what} is not supported"))),
        ..Probe::default()
    }
}

fn probe_head(disk: &Arc<dyn Disk>, head: &[u8]) -> Probe {
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
        return crate::restore::fs::xfs::probe(disk.clone());
    }
    if has(head, 0x10040, b"_BHRfS_M") {
        return unknown("btrfs");
    }
    if has(head, 4086, b"SWAPSPACE2") || has(head, 4086, b"SWAP-SPACE") {
        return unknown("swap space");
    }
    if has(head, 0, b"LUKS\xba\xbe") {
        return unknown("LUKS encryption");
    }
    if has(head, 512, b"LABELONE") && has(head, 512 + 24, b"LVM2 001") {
        return unknown("LVM2 physical volume");
    }
    if has(head, 0x8001, b"CD001") {
        return unknown("iso9660");
    }
    if has(head, 3, b"EXFAT   ") {
        return unknown("exfat");
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

/// The label of a FAT/NTFS-style fixed field, for the fs modules.
pub(crate) fn fixed_label(bytes: &[u8]) -> Option<String> {
    label_of(bytes)
}
