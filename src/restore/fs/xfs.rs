//! XFS, read in userspace: the superblock, inodes (v2 and the v5 v3 inode
//! with its CRC), data forks in all three formats (local, extent list,
//! B+tree of extents), directories in every format (short form in the
//! inode; single-block, leaf and node directories through their data
//! blocks), symbolic links (inline and remote), holes and unwritten extents
//! (read as zeros).
//!
//! On disk (XFS's `xfs_format.h`; integers big-endian): the superblock at
//! byte 0 (`XFSB`); inode `n` lies in allocation group `n >> (agblklog +
//! inopblog)`, block `(n >> inopblog) & (2^agblklog - 1)` of it, slot
//! `n & (2^inopblog - 1)`; a filesystem block number is `agno << agblklog |
//! agbno`. An extent record is 128 bits: unwritten flag (1), file offset
//! (54), block (52), length (21). v5 metadata blocks carry a CRC32c (stored
//! little-endian, computed with the field zeroed) and their owner.
//!
//! Extended attributes (the attribute fork) are decoded in
//! [`super::xfs_attr`]; this module hands it the fork and its blocks.
//!
//! Owns: mapping XFS structures to the [`Backend`] interface. Must never
//! write, never follow a block number it has not checked against the
//! filesystem's size, and never hold more than a bounded number of extents
//! or directory bytes (the listing budget is charged for what it builds).
//! Not read (refused with 1005): realtime files and filesystems marked as
//! needing repair. Whether the log needs recovery is checked
//! ([`super::xfs_log`]); a log that needs it (a backup of a running machine
//! taken without a freeze) is replayed in memory ([`super::xfs_replay`]),
//! and the filesystem read as the kernel would mount it. Where that cannot
//! be done (an external log, a damaged log, one whose changes pass the
//! replay's memory), the volume's warning says so and the metadata is read
//! as it is (as `mount -o norecovery` would).

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::le::{be16, be32, be64};
use crate::restore::disk::{read_exact_at, Disk};
use crate::restore::fs::budget::Charge;
use crate::restore::fs::ext_raw::crc32c;
use crate::restore::fs::tree::{child_bytes, link_bytes, Backend, Child};
use crate::restore::fs::xattr::{Xattr, XattrList};
use crate::restore::fs::{epoch_nanos, Device, EntryType, Extent, Meta};
use crate::restore::fs::{xfs_attr, xfs_log, xfs_replay};
use crate::restore::probe::{FsKind, Probe};

const SB_MAGIC: &[u8; 4] = b"XFSB";
const INODE_MAGIC: &[u8; 2] = b"IN";
/// Directory data lives below this byte offset of a directory (leaf and
/// free-space index blocks above it).
const DIR_LEAF_OFFSET: u64 = 32 << 30;
/// Most extents one file may have here (16 bytes each in memory).
const MAX_EXTENTS: usize = 1 << 20;
/// Most B+tree blocks one extent map may span.
const MAX_BTREE_BLOCKS: usize = 1 << 16;
/// Deepest extent B+tree (XFS's own bound is 9 levels): the walk recurses
/// once per level.
const MAX_BTREE_LEVELS: u16 = 9;
/// Longest symlink target XFS allows.
const MAX_LINK: u64 = 1024;
/// A v5 remote symlink extent's header (magic, offset, bytes, CRC, UUID,
/// owner, block, LSN).
const SYMLINK_HEADER: u64 = 56;
/// Incompatible features this reader knows: ftype, sparse inodes, meta
/// UUID, big timestamps, large extent counters.
const INCOMPAT_KNOWN: u32 = 0x1 | 0x2 | 0x4 | 0x8 | INCOMPAT_NREXT64;
const INCOMPAT_NEEDSREPAIR: u32 = 0x10;
const INCOMPAT_META_UUID: u32 = 0x4;
const INCOMPAT_NREXT64: u32 = 0x20;
/// v4 `features2` bit: directory entries carry the file type.
const FEATURES2_FTYPE: u32 = 0x200;
const DIFLAG_REALTIME: u16 = 0x1;
const DIFLAG2_BIGTIME: u64 = 0x8;
/// The inode counts its data fork's extents in 64 bits at byte 24 (the
/// v3 padding) instead of 32 at byte 76.
const DIFLAG2_NREXT64: u64 = 0x10;
/// Seconds between 1901-12-13T20:45:52Z (big timestamps' zero) and 1970.
const BIGTIME_EPOCH_OFFSET: i64 = 1 << 31;

/// Whether a v5 metadata buffer's CRC32c (little-endian at `at`, computed
/// over the buffer with that field zeroed) is right.
pub(super) fn crc_ok(buf: &[u8], at: usize) -> bool {
    let Some(stored) = buf.get(at..at + 4) else {
        return false;
    };
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let c = crc32c(!0, &buf[..at]);
    let c = crc32c(c, &[0; 4]);
    !crc32c(c, &buf[at + 4..]) == stored
}

/// What the superblock says.
#[derive(Clone, Debug)]
struct Geometry {
    block: u64,
    agblocks: u64,
    agcount: u64,
    agblklog: u32,
    inopblog: u32,
    inode_size: u64,
    dir_block: u64,
    root: u64,
    v5: bool,
    ftype: bool,
    /// inodes may count their extents in 64 bits (`nrext64`)
    nrext64: bool,
    dblocks: u64,
    /// the internal log: (byte offset, 512-byte blocks); `None` when it is
    /// on another device
    log: Option<(u64, u64)>,
    /// the UUID v5 metadata is stamped with
    meta_uuid: [u8; 16],
    /// filesystem blocks of one inode cluster buffer
    cluster_blocks: u64,
}

impl Geometry {
    fn replay_facts(&self) -> xfs_replay::Facts {
        xfs_replay::Facts {
            v5: self.v5,
            block: self.block,
            agblocks: self.agblocks,
            agblklog: self.agblklog,
            agcount: self.agcount,
            inopblog: self.inopblog,
            inode_size: self.inode_size,
            sectors: self.dblocks.saturating_mul(self.block / 512),
            meta_uuid: self.meta_uuid,
            cluster_blocks: self.cluster_blocks,
        }
    }
}

/// Reads and checks the superblock at the start of `disk`.
fn geometry(disk: &dyn Disk) -> Result<(Geometry, Option<String>, Option<String>)> {
    let mut sb = vec![0u8; 512];
    read_exact_at(disk, 0, &mut sb, "XFS superblock")?;
    let corrupt = |what: &str| Error::corrupt(format!("XFS superblock: {what}"));
    if &sb[..4] != SB_MAGIC {
        return Err(corrupt("no XFSB magic"));
    }
    // the checksum covers the superblock's whole sector
    let sector = usize::from(be16(&sb, 102));
    if !(512..=32768).contains(&sector) || !sector.is_power_of_two() {
        return Err(corrupt("its sector size is not sane"));
    }
    if sector > sb.len() {
        sb.resize(sector, 0);
        read_exact_at(disk, 0, &mut sb, "XFS superblock")?;
    }
    let version = be16(&sb, 100) & 0xf;
    let v5 = version == 5;
    if !(4..=5).contains(&version) {
        return Err(Error::unsupported(format!(
            "XFS filesystem of version {version} is not supported"
        )));
    }
    if v5 && !crc_ok(&sb, 224) {
        return Err(corrupt("its checksum fails"));
    }
    let incompat = if v5 { be32(&sb, 216) } else { 0 };
    if incompat & INCOMPAT_NEEDSREPAIR != 0 {
        return Err(Error::unsupported(
            "XFS filesystem marked as needing repair (xfs_repair) is not read",
        ));
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(Error::unsupported(format!(
            "XFS incompatible features {:#x} are not supported",
            incompat & !INCOMPAT_KNOWN
        )));
    }
    let (blocklog, inodelog, inopblog, agblklog) = (sb[120], sb[122], sb[123], sb[124]);
    let block = u64::from(be32(&sb, 4));
    let inode_size = u64::from(be16(&sb, 104));
    let dirblklog = sb[192];
    let sane = (9..=16).contains(&blocklog)
        && block == 1 << blocklog
        && (8..=11).contains(&inodelog)
        && inode_size == 1 << inodelog
        && u32::from(inopblog) + u32::from(inodelog) == u32::from(blocklog)
        && (1..=31).contains(&agblklog)
        && u32::from(blocklog) + u32::from(dirblklog) <= 16;
    if !sane {
        return Err(corrupt("its geometry is not sane"));
    }
    let agblocks = u64::from(be32(&sb, 84));
    let agcount = u64::from(be32(&sb, 88));
    let dblocks = be64(&sb, 8);
    if agblocks == 0
        || agblocks > 1 << agblklog
        || agcount == 0
        || dblocks > agblocks.saturating_mul(agcount)
    {
        return Err(corrupt("its allocation groups do not add up"));
    }
    let features2 = be32(&sb, 200);
    let mut meta_uuid = [0u8; 16];
    let at = if incompat & INCOMPAT_META_UUID != 0 {
        248
    } else {
        32
    };
    meta_uuid.copy_from_slice(&sb[at..at + 16]);
    // The kernel's inode cluster: 8 KiB, scaled with the inode size on v5
    // filesystems whose inode chunk alignment allows it.
    let mut cluster = 8192u64;
    if v5 && (cluster * (inode_size / 256)) >> blocklog <= u64::from(be32(&sb, 180)) {
        cluster *= inode_size / 256;
    }
    let log = match (be64(&sb, 48), u64::from(be32(&sb, 96))) {
        (0, _) => None,
        (start, blocks) => {
            let (agno, agbno) = (start >> agblklog, start & ((1 << agblklog) - 1));
            // (agno below agcount keeps the block number below 2^63)
            let linear = (agno < agcount).then(|| agno * agblocks + agbno);
            match linear.filter(|l| blocks >= 2 && l.saturating_add(blocks) <= dblocks) {
                Some(l) => Some((
                    l.checked_mul(block)
                        .ok_or_else(|| corrupt("its log lies outside it"))?,
                    blocks * (block / 512),
                )),
                None => return Err(corrupt("its log lies outside it")),
            }
        }
    };
    let geo = Geometry {
        block,
        agblocks,
        agcount,
        agblklog: u32::from(agblklog),
        inopblog: u32::from(inopblog),
        inode_size,
        dir_block: block << dirblklog,
        root: be64(&sb, 56),
        v5,
        ftype: if v5 {
            incompat & 0x1 != 0
        } else {
            features2 & FEATURES2_FTYPE != 0
        },
        nrext64: incompat & INCOMPAT_NREXT64 != 0,
        dblocks,
        log,
        meta_uuid,
        cluster_blocks: (cluster >> blocklog).max(1),
    };
    let name = &sb[108..120];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let label = (end > 0).then(|| String::from_utf8_lossy(&name[..end]).into_owned());
    let u = &sb[32..48];
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex(&u[..4]),
        hex(&u[4..6]),
        hex(&u[6..8]),
        hex(&u[8..10]),
        hex(&u[10..])
    );
    Ok((geo, label, Some(uuid)))
}

/// The volume as the reader should read it, with its geometry: with the
/// log's changes replayed in memory when it needs recovery; and what a user
/// must know before trusting what is read (nothing when the log was clean
/// or replayed).
fn recover(disk: Arc<dyn Disk>, geo: Geometry) -> (Arc<dyn Disk>, Geometry, Option<String>) {
    const NOT_REPLAYED: &str = "what the system changed shortly before the backup may \
        be missing or old (read as with mount -o norecovery)";
    let Some((start, blocks)) = geo.log else {
        let w = format!(
            "the XFS log is on another device, which the agent does not have: if it needs \
            recovery, that is not done, and {NOT_REPLAYED}"
        );
        return (disk, geo, Some(w));
    };
    let failed = match xfs_log::needs_recovery(&*disk, start, blocks) {
        Ok(false) => return (disk, geo, None),
        Err(e) => {
            let w = format!(
                "the XFS log could not be checked ({}): if it needs recovery, that is not \
                done, and {NOT_REPLAYED}",
                e.message
            );
            return (disk, geo, Some(w));
        }
        Ok(true) => match xfs_replay::replay(disk.clone(), (start, blocks), &geo.replay_facts()) {
            Ok(r) => {
                let transactions = r.transactions;
                let replayed: Arc<dyn Disk> = Arc::new(r);
                // growing the filesystem is logged too
                match geometry(&*replayed) {
                    Ok((new, _, _)) => {
                        log::debug!("XFS log replayed: {transactions} transactions");
                        return (replayed, new, None);
                    }
                    Err(e) => e,
                }
            }
            Err(e) => e,
        },
    };
    let w = format!(
        "the XFS log needs recovery, which failed here ({}): {NOT_REPLAYED}",
        failed.message
    );
    (disk, geo, Some(w))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the probe says of an XFS volume; with its warning when `warn`
/// (whether its log needs a recovery that cannot be done, which takes the
/// recovery).
pub fn probe(disk: Arc<dyn Disk>, warn: bool) -> Probe {
    match geometry(&*disk) {
        Ok((geo, label, uuid)) => Probe {
            fs: Some(FsKind::Xfs),
            label,
            uuid,
            unsupported: None,
            warning: if warn { recover(disk, geo).2 } else { None },
        },
        Err(e) => Probe {
            fs: Some(FsKind::Xfs),
            unsupported: Some(e),
            ..Probe::default()
        },
    }
}

/// One extent of a file: `count` blocks from file block `off` at
/// filesystem (linear) block `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    off: u64,
    start: u64,
    count: u64,
    unwritten: bool,
}

/// An inode as this reader needs it.
struct Inode {
    number: u64,
    mode: u16,
    format: u8,
    uid: u32,
    gid: u32,
    nlink: u64,
    mtime: i64,
    mtime_ns: u32,
    /// di_crtime of v3 inodes, in nanoseconds since the epoch (0 in v2)
    born: u64,
    size: u64,
    nextents: u64,
    flags: u16,
    /// the data fork's bytes
    fork: Vec<u8>,
    /// the attribute fork's format (1 local, 2 extents, 3 B+tree), its
    /// extent count and its bytes (empty when the inode has none)
    aformat: u8,
    anextents: u64,
    afork: Vec<u8>,
}

impl Inode {
    fn kind(&self) -> EntryType {
        EntryType::from_unix_mode(u32::from(self.mode)).unwrap_or(EntryType::File)
    }

    /// A device inode's number: the first word of its data fork, in the
    /// System V form XFS keeps (14-bit major, 18-bit minor; Linux keeps 9
    /// bits of the major).
    fn device(&self) -> Device {
        let dev = self.fork.get(..4).map_or(0, |b| be32(b, 0));
        Device {
            major: (dev >> 18) & 0x1FF,
            minor: dev & 0x3_FFFF,
        }
    }

    fn meta(&self) -> Meta {
        let kind = self.kind();
        Meta {
            kind,
            size: if matches!(kind, EntryType::File | EntryType::Dir | EntryType::Symlink) {
                self.size
            } else {
                0
            },
            mode: u32::from(self.mode) & 0o7777,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            mtime_ns: self.mtime_ns,
            born: self.born,
            inode: self.number,
            nlink: self.nlink,
            rdev: matches!(kind, EntryType::Char | EntryType::Block).then(|| self.device()),
        }
    }
}

pub struct XfsBackend {
    disk: Arc<dyn Disk>,
    geo: Geometry,
    what: String,
    /// The last file read and its extents: a file is read in many pieces,
    /// and a B+tree of extents would otherwise be walked again for each.
    last: Option<(Rc<Inode>, Rc<Vec<Run>>)>,
}

impl XfsBackend {
    pub fn open(disk: Arc<dyn Disk>) -> Result<XfsBackend> {
        let (geo, _, _) = geometry(&*disk)?;
        let (disk, geo, warning) = recover(disk, geo);
        let block_bytes = geo.dblocks.saturating_mul(geo.block);
        if block_bytes > disk.size() {
            return Err(Error::corrupt(format!(
                "XFS filesystem of {block_bytes} bytes on a volume of {}: truncated",
                disk.size()
            )));
        }
        let b = XfsBackend {
            disk,
            geo,
            what: "XFS filesystem".into(),
            last: None,
        };
        let root = b.inode(b.geo.root)?;
        if root.kind() != EntryType::Dir {
            return Err(b.corrupt("its root is not a directory"));
        }
        if let Some(w) = warning {
            log::warn!("{w}");
        }
        Ok(b)
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> Error {
        Error::corrupt(format!("{}: corrupt: {what}", self.what))
    }

    /// Byte offset of filesystem block `fsb` (`agno << agblklog | agbno`),
    /// checked to lie in the filesystem with `count` blocks after it.
    fn block_at(&self, fsb: u64, count: u64) -> Result<u64> {
        let g = &self.geo;
        let (agno, agbno) = (fsb >> g.agblklog, fsb & ((1 << g.agblklog) - 1));
        let linear = agno
            .checked_mul(g.agblocks)
            .and_then(|b| b.checked_add(agbno))
            .filter(|_| agno < g.agcount && agbno.saturating_add(count) <= g.agblocks)
            .filter(|&b| b.checked_add(count).is_some_and(|end| end <= g.dblocks))
            .ok_or_else(|| self.corrupt(format!("block {fsb} (+{count}) is outside it")))?;
        Ok(linear * g.block)
    }

    fn read_block(&self, fsb: u64, len: u64) -> Result<Vec<u8>> {
        let at = self.block_at(fsb, len.div_ceil(self.geo.block))?;
        let mut buf = vec![0u8; len as usize];
        read_exact_at(&*self.disk, at, &mut buf, &self.what)?;
        Ok(buf)
    }

    fn inode(&self, number: u64) -> Result<Inode> {
        let g = &self.geo;
        let slot = number & ((1 << g.inopblog) - 1);
        let fsb = number >> g.inopblog;
        let bad = || self.corrupt(format!("inode {number} is outside it"));
        if fsb >> g.agblklog >= g.agcount {
            return Err(bad());
        }
        let at = self
            .block_at(fsb, 1)
            .map_err(|_| bad())?
            .checked_add(slot * g.inode_size)
            .ok_or_else(bad)?;
        let mut b = vec![0u8; g.inode_size as usize];
        read_exact_at(&*self.disk, at, &mut b, &self.what)?;
        let bad = |why: &str| self.corrupt(format!("inode {number}: {why}"));
        if &b[..2] != INODE_MAGIC {
            return Err(bad("no inode magic"));
        }
        let version = b[4];
        let core = match version {
            1 | 2 if !g.v5 => 100,
            3 if g.v5 => 176,
            _ => return Err(bad("unexpected inode version")),
        };
        if version == 3 {
            if !crc_ok(&b, 100) {
                return Err(bad("its checksum fails"));
            }
            if be64(&b, 152) != number {
                return Err(bad("it says it is another inode"));
            }
        }
        let forkoff = usize::from(b[82]) * 8;
        let end = if forkoff == 0 {
            b.len()
        } else {
            core + forkoff
        };
        if end > b.len() {
            return Err(bad("its attribute fork starts past its end"));
        }
        let flags2 = if version == 3 { be64(&b, 120) } else { 0 };
        let (mtime, mtime_ns) = if flags2 & DIFLAG2_BIGTIME != 0 {
            let ns = be64(&b, 40);
            (
                (ns / 1_000_000_000) as i64 - BIGTIME_EPOCH_OFFSET,
                (ns % 1_000_000_000) as u32,
            )
        } else {
            let ns = be32(&b, 44);
            (
                i64::from(be32(&b, 40) as i32),
                if ns < 1_000_000_000 { ns } else { 0 },
            )
        };
        let born = match version {
            3 if flags2 & DIFLAG2_BIGTIME != 0 => {
                let ns = be64(&b, 144);
                epoch_nanos(
                    (ns / 1_000_000_000) as i64 - BIGTIME_EPOCH_OFFSET,
                    (ns % 1_000_000_000) as u32,
                )
            }
            3 => epoch_nanos(
                i64::from(be32(&b, 144) as i32),
                be32(&b, 148).min(999_999_999),
            ),
            _ => 0,
        };
        // (with large extent counters, the attribute fork's count takes the
        // 32 bits at 76 the data fork's leaves)
        let (nextents, anextents) = if flags2 & DIFLAG2_NREXT64 == 0 {
            (u64::from(be32(&b, 76)), u64::from(be16(&b, 80)))
        } else if self.geo.nrext64 {
            (be64(&b, 24), u64::from(be32(&b, 76)))
        } else {
            return Err(bad("large extent counters on a filesystem without them"));
        };
        Ok(Inode {
            number,
            mode: be16(&b, 2),
            format: b[5],
            uid: be32(&b, 8),
            gid: be32(&b, 12),
            nlink: if version == 1 {
                u64::from(be16(&b, 6))
            } else {
                u64::from(be32(&b, 16))
            },
            mtime,
            mtime_ns,
            born,
            size: be64(&b, 56),
            nextents,
            flags: be16(&b, 90),
            fork: b[core..end].to_vec(),
            aformat: b[83],
            anextents,
            afork: if forkoff == 0 {
                Vec::new()
            } else {
                b[end..].to_vec()
            },
        })
    }

    /// The extents of `ino`'s data fork, in file order.
    fn runs(&self, ino: &Inode) -> Result<Vec<Run>> {
        self.fork_runs(ino.number, ino.format, ino.nextents, &ino.fork)
    }

    /// The extents of a fork of inode `number` (its `format`, extent
    /// count and bytes), in file order: the data fork's or the attribute
    /// fork's, which are kept alike.
    fn fork_runs(&self, number: u64, format: u8, nextents: u64, fork: &[u8]) -> Result<Vec<Run>> {
        let bad = |why: &str| self.corrupt(format!("inode {number}: {why}"));
        let mut runs = Vec::new();
        match format {
            2 => {
                let n = usize::try_from(nextents).unwrap_or(usize::MAX);
                if n.saturating_mul(16) > fork.len() {
                    return Err(bad("more extents than its fork holds"));
                }
                for rec in fork.chunks_exact(16).take(n) {
                    runs.push(self.run(rec)?);
                }
            }
            3 => {
                // the root: level, record count, keys, then pointers from
                // the middle of the fork on
                let (level, count) = (be16(fork, 0), usize::from(be16(fork, 2)));
                let max = (fork.len().saturating_sub(4)) / 16;
                if level == 0 || level > MAX_BTREE_LEVELS || count == 0 || count > max {
                    return Err(bad("its extent tree's root is not valid"));
                }
                let mut seen = HashSet::new();
                for i in 0..count {
                    let ptr = be64(fork, 4 + max * 8 + i * 8);
                    self.btree(ptr, level - 1, number, &mut seen, &mut runs)?;
                }
            }
            _ => return Err(bad("its data is not in extents")),
        }
        runs.sort_by_key(|r| r.off);
        for w in runs.windows(2) {
            if w[0].off + w[0].count > w[1].off {
                return Err(bad("its extents overlap"));
            }
        }
        Ok(runs)
    }

    /// A 128-bit extent record, its block checked.
    fn run(&self, rec: &[u8]) -> Result<Run> {
        let (hi, lo) = (be64(rec, 0), be64(rec, 8));
        let run = Run {
            unwritten: hi >> 63 != 0,
            off: (hi >> 9) & ((1 << 54) - 1),
            start: ((hi & 0x1ff) << 43) | (lo >> 21),
            count: lo & ((1 << 21) - 1),
        };
        if run.count == 0 {
            return Err(self.corrupt("an extent of no blocks"));
        }
        // file offsets end below 2^63 bytes (so these products never wrap)
        let end = (run.off + run.count).checked_mul(self.geo.block);
        if end.is_none_or(|e| e > i64::MAX as u64) {
            return Err(self.corrupt("an extent past the largest file"));
        }
        self.block_at(run.start, run.count)?;
        Ok(run)
    }

    /// Collects the extent records under B+tree block `fsb` of `level`.
    fn btree(
        &self,
        fsb: u64,
        level: u16,
        owner: u64,
        seen: &mut HashSet<u64>,
        runs: &mut Vec<Run>,
    ) -> Result<()> {
        let bad = |why: &str| self.corrupt(format!("inode {owner}: its extent tree {why}"));
        if !seen.insert(fsb) || seen.len() > MAX_BTREE_BLOCKS {
            return Err(bad("loops or is too large"));
        }
        let b = self.read_block(fsb, self.geo.block)?;
        let (magic, hdr): (&[u8], usize) = if self.geo.v5 {
            (b"BMA3", 72)
        } else {
            (b"BMAP", 24)
        };
        if &b[..4] != magic || be16(&b, 4) != level {
            return Err(bad("has a block that is not one of it"));
        }
        if self.geo.v5 && (!crc_ok(&b, 64) || be64(&b, 56) != owner) {
            return Err(bad("has a block whose checksum or owner is wrong"));
        }
        let count = usize::from(be16(&b, 6));
        let max = (b.len() - hdr) / 16;
        if count == 0 || count > max {
            return Err(bad("has a block of a bad record count"));
        }
        for i in 0..count {
            if level == 0 {
                if runs.len() >= MAX_EXTENTS {
                    return Err(Error::unsupported(format!(
                        "{}: inode {owner} has more than {MAX_EXTENTS} extents",
                        self.what
                    )));
                }
                runs.push(self.run(&b[hdr + i * 16..hdr + i * 16 + 16])?);
            } else {
                let ptr = be64(&b, hdr + max * 8 + i * 8);
                self.btree(ptr, level - 1, owner, seen, runs)?;
            }
        }
        Ok(())
    }

    /// Block `dablk` of an attribute fork mapped by `runs`, and its disk
    /// address in 512-byte sectors (which v5 blocks record); `None` in a
    /// hole.
    fn attr_block(&self, runs: &[Run], dablk: u64) -> Result<Option<(Vec<u8>, u64)>> {
        let i = runs.partition_point(|r| r.off + r.count <= dablk);
        let Some(run) = runs.get(i).filter(|r| r.off <= dablk && !r.unwritten) else {
            return Ok(None);
        };
        let fsb = run.start + (dablk - run.off);
        let daddr = self.block_at(fsb, 1)? / 512;
        Ok(Some((self.read_block(fsb, self.geo.block)?, daddr)))
    }

    /// A file's inode and extents, from the last read when it is the same.
    fn file(&mut self, number: u64) -> Result<(Rc<Inode>, Rc<Vec<Run>>)> {
        if let Some((ino, runs)) = &self.last {
            if ino.number == number {
                return Ok((ino.clone(), runs.clone()));
            }
        }
        let ino = Rc::new(self.inode(number)?);
        if ino.flags & DIFLAG_REALTIME != 0 {
            return Err(Error::unsupported(format!(
                "{}: files on a realtime device are not supported",
                self.what
            )));
        }
        let runs = Rc::new(match ino.format {
            2 | 3 => self.runs(&ino)?,
            _ => Vec::new(),
        });
        self.last = Some((ino.clone(), runs.clone()));
        Ok((ino, runs))
    }

    /// Where `[offset, offset + len)` of a file lies (clamped at its size).
    fn extents_of(&self, ino: &Inode, runs: &[Run], offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(ino.size);
        let mut out = Vec::new();
        if offset >= end {
            return Ok(out);
        }
        if !matches!(ino.format, 2 | 3) {
            return Err(self.corrupt(format!("inode {}: its data is not in extents", ino.number)));
        }
        let block = self.geo.block;
        let mut pos = offset;
        let first = runs.partition_point(|r| (r.off + r.count) * block <= offset);
        for &run in runs.get(first..).unwrap_or_default() {
            let (from, to) = (run.off * block, (run.off + run.count) * block);
            if to <= pos {
                continue;
            }
            if from >= end {
                break;
            }
            if from > pos {
                out.push(Extent::Zero { len: from - pos });
                pos = from;
            }
            let n = to.min(end) - pos;
            out.push(if run.unwritten {
                Extent::Zero { len: n }
            } else {
                Extent::Disk {
                    offset: self.block_at(run.start, run.count)? + (pos - from),
                    len: n,
                }
            });
            pos += n;
        }
        if pos < end {
            out.push(Extent::Zero { len: end - pos });
        }
        Ok(out)
    }

    /// A symlink's target.
    fn link_target(&self, ino: &Inode) -> Result<Vec<u8>> {
        if ino.size == 0 || ino.size > MAX_LINK {
            return Err(self.corrupt(format!(
                "symlink inode {} has a target of {} bytes",
                ino.number, ino.size
            )));
        }
        let len = ino.size as usize;
        if ino.format == 1 {
            return ino
                .fork
                .get(..len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| self.corrupt(format!("symlink inode {}: short", ino.number)));
        }
        let mut out = Vec::with_capacity(len);
        let bad = |why: &str| self.corrupt(format!("symlink inode {}: {why}", ino.number));
        // v5 heads every extent of a remote target (not every block) with
        // its own header, and the header's CRC covers the whole extent:
        // the kernel writes and reads the target by extent
        let head = if self.geo.v5 { SYMLINK_HEADER } else { 0 };
        let most = (len as u64).div_ceil(self.geo.block - head);
        for run in self.runs(ino)? {
            if run.count > most {
                return Err(bad("an extent larger than its target"));
            }
            let b = self.read_block(run.start, run.count * self.geo.block)?;
            let room = b.len() - head as usize;
            let n = room.min(len - out.len());
            if self.geo.v5
                && (&b[..4] != b"XSLM"
                    || !crc_ok(&b, 12)
                    || be32(&b, 4) as usize != out.len()
                    || be32(&b, 8) as usize != n
                    || be64(&b, 32) != ino.number)
            {
                return Err(bad("a bad remote block"));
            }
            out.extend_from_slice(&b[head as usize..head as usize + n]);
            if out.len() == len {
                return Ok(out);
            }
        }
        Err(self.corrupt(format!("symlink inode {}: target cut short", ino.number)))
    }

    /// The (name, inode) pairs of a directory, `.` and `..` left out.
    fn entries(&self, dir: &Inode, charge: &mut Charge) -> Result<Vec<(Vec<u8>, u64)>> {
        let bad = |why: &str| self.corrupt(format!("directory inode {}: {why}", dir.number));
        let mut out = Vec::new();
        if dir.format == 1 {
            // short form: count, count of 8-byte numbers, the parent, then
            // entries of name length, offset, name, [type], number
            let f = &dir.fork;
            let (count, wide) = (
                usize::from(f.first().copied().unwrap_or(0)),
                f.get(1) != Some(&0),
            );
            let ino_len = if wide { 8 } else { 4 };
            let mut pos = 2 + ino_len;
            for _ in 0..count {
                let n = usize::from(*f.get(pos).ok_or_else(|| bad("short form cut short"))?);
                let name = f
                    .get(pos + 3..pos + 3 + n)
                    .ok_or_else(|| bad("short form cut short"))?;
                let at = pos + 3 + n + usize::from(self.geo.ftype);
                let ino = if wide {
                    be64(f, at)
                } else {
                    u64::from(be32(f, at))
                };
                if at + ino_len > f.len() || n == 0 {
                    return Err(bad("a bad short-form entry"));
                }
                charge.add(child_bytes::<u64>(n, 0))?;
                out.push((name.to_vec(), ino));
                pos = at + ino_len;
            }
            return Ok(out);
        }
        let dblock = self.geo.dir_block;
        let per = dblock / self.geo.block;
        for run in self.runs(dir)? {
            // data blocks only: leaf and free index blocks lie above
            let first = run.off * self.geo.block;
            if first >= DIR_LEAF_OFFSET {
                break;
            }
            if run.unwritten || run.off % per != 0 || run.count % per != 0 {
                return Err(bad("a directory extent is not whole directory blocks"));
            }
            for k in 0..run.count / per {
                charge.add(dblock as usize)?;
                let b = self.read_block(run.start + k * per, dblock)?;
                self.dir_block(&b, dir.number, charge, &mut out)?;
            }
        }
        Ok(out)
    }

    /// The entries of one directory data block (or the single block of a
    /// block directory).
    fn dir_block(
        &self,
        b: &[u8],
        owner: u64,
        charge: &mut Charge,
        out: &mut Vec<(Vec<u8>, u64)>,
    ) -> Result<()> {
        let bad = |why: &str| self.corrupt(format!("directory inode {owner}: {why}"));
        let magic = &b[..4];
        let (single, hdr) = match (magic, self.geo.v5) {
            (b"XD2B", false) => (true, 16),
            (b"XD2D", false) => (false, 16),
            (b"XDB3", true) => (true, 64),
            (b"XDD3", true) => (false, 64),
            _ => return Err(bad("a block that is not a directory block")),
        };
        if self.geo.v5 && (!crc_ok(b, 4) || be64(b, 40) != owner) {
            return Err(bad("a directory block whose checksum or owner is wrong"));
        }
        let end = if single {
            // the block ends in its leaf entries and a tail of their count
            let count = be32(b, b.len() - 8) as usize;
            count
                .checked_mul(8)
                .and_then(|l| b.len().checked_sub(8 + l))
                .filter(|&e| e >= hdr)
                .ok_or_else(|| bad("a block directory's tail is not valid"))?
        } else {
            b.len()
        };
        let mut pos = hdr;
        while pos < end {
            if be16(b, pos) == 0xffff {
                let len = usize::from(be16(b, pos + 2));
                if len < 8 || len % 8 != 0 {
                    return Err(bad("a free space of a bad length"));
                }
                pos += len;
                continue;
            }
            let ino = be64(b, pos);
            let n = usize::from(*b.get(pos + 8).ok_or_else(|| bad("an entry cut short"))?);
            let name = b
                .get(pos + 9..pos + 9 + n)
                .filter(|_| n > 0)
                .ok_or_else(|| bad("an entry cut short"))?;
            let len = (8 + 1 + n + usize::from(self.geo.ftype) + 2).next_multiple_of(8);
            if pos + len > end {
                return Err(bad("an entry runs past its block"));
            }
            if name != b"." && name != b".." {
                charge.add(child_bytes::<u64>(n, 0))?;
                out.push((name.to_vec(), ino));
            }
            pos += len;
        }
        Ok(())
    }
}

impl Backend for XfsBackend {
    type Node = u64;

    fn root(&mut self) -> Result<Child<u64>> {
        let ino = self.inode(self.geo.root)?;
        Ok(Child {
            name: Vec::new(),
            node: ino.number,
            meta: ino.meta(),
            link: None,
            damaged: None,
        })
    }

    fn read_dir(
        &mut self,
        dir: &u64,
        _path: &[u8],
        charge: &mut Charge,
    ) -> Result<Vec<Child<u64>>> {
        let dir = self.inode(*dir)?;
        if dir.kind() != EntryType::Dir {
            return Err(self.corrupt(format!("inode {} is not a directory", dir.number)));
        }
        let mut out = Vec::new();
        for (name, number) in self.entries(&dir, charge)? {
            let ino = match self.inode(number) {
                Ok(ino) => ino,
                Err(e) => {
                    // listed apart, failing whoever uses it
                    out.push(Child::damaged(name, number, number, e));
                    continue;
                }
            };
            let mut link = None;
            if ino.kind() == EntryType::Symlink {
                match self.link_target(&ino) {
                    Ok(t) => {
                        charge.add(link_bytes(t.len()))?;
                        link = Some(t);
                    }
                    Err(e) => {
                        out.push(Child::damaged(name, number, number, e));
                        continue;
                    }
                }
            }
            out.push(Child {
                name,
                node: number,
                meta: ino.meta(),
                link,
                damaged: None,
            });
        }
        Ok(out)
    }

    fn read_at(&mut self, node: &u64, _path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (ino, runs) = self.file(*node)?;
        let mut done = 0usize;
        for e in self.extents_of(&ino, &runs, offset, buf.len() as u64)? {
            let n = e.bytes() as usize;
            let part = &mut buf[done..done + n];
            match e {
                Extent::Zero { .. } => part.fill(0),
                Extent::Disk { offset, .. } => {
                    read_exact_at(&*self.disk, offset, part, &self.what)?
                }
            }
            done += n;
        }
        Ok(done)
    }

    fn map_at(&mut self, node: &u64, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        let (ino, runs) = self.file(*node)?;
        self.extents_of(&ino, &runs, offset, len).map(Some)
    }

    fn xattrs(&mut self, node: &u64, _path: &[u8]) -> Result<Vec<Xattr>> {
        let ino = self.inode(*node)?;
        let mut list = XattrList::new(format!("{}: inode {}", self.what, ino.number));
        let fork = xfs_attr::Fork {
            what: &self.what,
            inode: ino.number,
            v5: self.geo.v5,
            block: self.geo.block,
        };
        match ino.aformat {
            _ if ino.afork.is_empty() => {}
            1 => fork.shortform(&ino.afork, &mut list)?,
            2 | 3 => {
                let runs = self.fork_runs(ino.number, ino.aformat, ino.anextents, &ino.afork)?;
                // (no extents: every attribute was removed)
                if !runs.is_empty() {
                    fork.blocks(&mut |dablk| self.attr_block(&runs, dablk), &mut list)?;
                }
            }
            f => {
                return Err(self.corrupt(format!(
                    "inode {}: an attribute fork of format {f}",
                    ino.number
                )))
            }
        }
        Ok(list.finish())
    }

    fn what(&self) -> &str {
        &self.what
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::disk::MemDisk;

    /// A v4 superblock: `blocklog`-sized blocks, `agcount` groups of
    /// 2^`agblklog` blocks, `dblocks` in all, the log at block `log_start`.
    fn superblock(
        blocklog: u8,
        agblklog: u8,
        agcount: u32,
        dblocks: u64,
        log_start: u64,
    ) -> Vec<u8> {
        let mut sb = vec![0u8; 512];
        sb[..4].copy_from_slice(SB_MAGIC);
        sb[4..8].copy_from_slice(&(1u32 << blocklog).to_be_bytes());
        sb[8..16].copy_from_slice(&dblocks.to_be_bytes());
        sb[48..56].copy_from_slice(&log_start.to_be_bytes());
        sb[84..88].copy_from_slice(&(1u32 << agblklog).to_be_bytes());
        sb[88..92].copy_from_slice(&agcount.to_be_bytes());
        sb[96..100].copy_from_slice(&512u32.to_be_bytes());
        sb[100..102].copy_from_slice(&4u16.to_be_bytes());
        sb[102..104].copy_from_slice(&512u16.to_be_bytes());
        sb[104..106].copy_from_slice(&256u16.to_be_bytes());
        (sb[120], sb[122], sb[123], sb[124]) = (blocklog, 8, blocklog - 8, agblklog);
        sb
    }

    #[test]
    fn the_log_must_lie_inside_the_filesystem() {
        let geo = |sb: Vec<u8>| geometry(&MemDisk(sb)).map(|(g, _, _)| g.log);
        // group 1, block 16: 4 KiB blocks, 65,536 to a group
        let inside = superblock(12, 16, 4, 4 << 16, (1 << 16) | 16);
        assert_eq!(
            geo(inside).unwrap(),
            Some((((1 << 16) + 16) * 4096, 512 * 8))
        );
        assert!(
            geo(superblock(12, 16, 4, 4 << 16, 5 << 16)).is_err(),
            "group 5 of 4"
        );
        assert!(
            geo(superblock(12, 16, 4, 4 << 16, (3 << 16) | 65_500)).is_err(),
            "past the end"
        );
        // a block number whose byte offset does not fit 64 bits
        let huge = superblock(16, 31, u32::MAX, (1 << 62) + (1 << 20), 1 << 62);
        assert!(geo(huge).is_err());
    }
}
