//! Direct reading of ext2/3/4 on-disk structures: superblock, group
//! descriptors, inodes, extent trees, block maps and directory blocks.
//!
//! ext4-view (used for validation) exposes neither inode numbers nor link
//! counts, which listings and hardlink detection need, and it cannot read a
//! sparse file on a block-mapped (ext2/3) inode whose indirect pointer is a
//! hole; this module lists whole directories (names, inodes, symlink
//! targets), verifying the crc32c of directory blocks and inodes, and maps
//! and reads file data, also data kept in the inode itself (inline_data).
//! Owns: decoding those structures with every length and offset checked,
//! and the list of incompatible features it reads (others are refused by
//! name); group descriptors in place or in meta groups.
//! Must never write, and never trust an on-disk count for an allocation.
//! It reads the disk it is given as is: to see a journal's transactions, it
//! is given [`super::ext_journal::Recovered`].

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::le::{le16, le32};
use crate::restore::disk::{read_exact_at, Disk};
use crate::restore::fs::budget::Charge;
use crate::restore::fs::ext_xattr;
use crate::restore::fs::xattr::XattrList;
use crate::restore::fs::{epoch_nanos, Device, Extent, Xattr};

const EXT4_EXTENTS_FL: u32 = 0x80000;
const EXT4_INLINE_DATA_FL: u32 = 0x1000_0000;
const EXT4_ENCRYPT_FL: u32 = 0x800;
const EXT4_CASEFOLD_FL: u32 = 0x4000_0000;
/// Nanoseconds in a second.
const NANOS: u32 = 1_000_000_000;
/// The inode holds the value of an extended attribute (ea_inode).
const EXT4_EA_INODE_FL: u32 = 0x20_0000;
const INCOMPAT_64BIT: u32 = 0x80;
/// Group descriptors lie in "meta groups": the descriptor block of each
/// run of groups it describes sits at the start of the run's first group.
const INCOMPAT_META_BG: u32 = 0x10;
/// Incompatible features read here that ext4-view refuses: meta_bg,
/// multiple mount protection (a block of its own, nothing to read), EA in
/// inodes, large directories, inline data, casefolded names (they change
/// only how the kernel hashes and compares names; directories are read
/// whole here, and names match exactly first, then case-insensitively).
const INCOMPAT_BEYOND_EXT4_VIEW: u32 =
    0x10 | 0x100 | 0x400 | 0x4000 | INCOMPAT_INLINE_DATA | INCOMPAT_CASEFOLD;
/// Directories may be flagged to compare names without case.
const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// Small files and directories may be kept in their inode: the 60 bytes of
/// `i_block`, then the value of the inode's `system.data` attribute.
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
/// Directory entries carry the file type. Without it (ext2 of the 1990s)
/// ext4-view refuses the filesystem; here the type comes from the inode
/// anyway, and the name length's high byte is 0 for every name of at most
/// 255 bytes.
const INCOMPAT_FILETYPE: u32 = 0x2;
/// Incompatible features nothing here reads: compression, an external
/// journal device's own superblock, Lustre's directory data.
const INCOMPAT_UNREAD: u32 = 0x1 | INCOMPAT_JOURNAL_DEV | 0x1000;
/// The volume is another filesystem's external journal, not a filesystem.
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
/// Incompatible features read here: filetype, needs recovery, meta_bg,
/// extents, 64bit, MMP, flex_bg, EA in inodes, checksum seed, large
/// directories, inline data, encryption (its files refused one by one),
/// casefold.
const INCOMPAT_READ: u32 = 0x2
    | 0x4
    | 0x10
    | 0x40
    | 0x80
    | 0x100
    | 0x200
    | 0x400
    | 0x2000
    | 0x4000
    | INCOMPAT_INLINE_DATA
    | 0x10000
    | INCOMPAT_CASEFOLD;
/// Backup superblocks only in groups 0, 1 and powers of 3, 5 and 7.
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
/// Backup superblocks only in the two groups the superblock names.
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
/// The checksum seed is stored in the superblock (else derived from the UUID).
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
/// Metadata blocks and inodes carry crc32c checksums.
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// Allocation in clusters of several blocks: a group's bitmap counts
/// clusters, so it spans more blocks than its bitmap has bits.
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const EXT4_INDEX_FL: u32 = 0x1000;
/// Size of the classic inode; larger inodes have an "extra" part.
const GOOD_OLD_INODE_SIZE: usize = 128;
/// Bytes of `i_block`, the first part of inline data.
const INLINE_HEAD: u64 = 60;
/// What the extended attributes kept in an inode's extra space start with.
const XATTR_MAGIC: u32 = 0xEA02_0000;
/// The attribute name index of `system.` names.
const XATTR_INDEX_SYSTEM: u8 = 7;
/// Longest symlink target read (PATH_MAX).
const MAX_LINK_TARGET: u64 = 4096;
/// Longest symlink target stored in the inode itself.
const MAX_INLINE_LINK: u64 = 59;
/// The journal holds transactions not yet written to their home blocks.
const INCOMPAT_RECOVER: u32 = 0x4;
/// The filesystem has a journal.
const COMPAT_HAS_JOURNAL: u32 = 0x4;
/// Bytes of cached metadata blocks (512 blocks of 4 KiB), per open
/// filesystem (the agent keeps up to 8 open): a bound by count would let
/// 64 KiB blocks take 128 MiB. A miss costs a copy out of the chunk cache.
const BLOCK_CACHE_BYTES: u64 = 2 << 20;
/// Most runs one window of a file's block map holds (1.5 MiB): a file in
/// more pieces is mapped a window at a time, so that its map takes no more
/// memory than this however fragmented the file is.
const WINDOW_RUNS: usize = 1 << 16;
/// Most block groups: 128 TiB in groups of 128 MiB (4 KiB blocks). Each
/// group's inode table location is held in memory (8 bytes a group, 8 MiB
/// at this bound); ext4-view, which holds about 130 bytes a group while
/// opening, is not loaded past [`VIEW_MAX_GROUPS`]. The descriptors of a
/// superblock with small groups must still fit the volume.
const MAX_GROUPS: u64 = 1 << 20;
/// Most block groups of a filesystem ext4-view is loaded for (8 TiB in
/// groups of 128 MiB; 9 MiB of its memory while opening).
pub const VIEW_MAX_GROUPS: usize = 1 << 16;
/// Bytes of group descriptors read at a time.
const GDT_PIECE_BYTES: u64 = 64 << 10;
/// Largest directory read (bytes).
const MAX_DIR_SIZE: u64 = 1 << 32;
/// Most entries listed from one directory.
const MAX_DIR_ENTRIES: usize = 4 << 20;
/// Most extent tree nodes visited while mapping one window of a file (a
/// valid tree needs a few hundred for a window's runs).
const MAX_EXTENT_NODES: usize = 1 << 16;

/// A decoded inode.
#[derive(Clone, Debug)]
pub struct Inode {
    pub number: u32,
    pub size: u64,
    pub links: u16,
    pub flags: u32,
    pub block: [u8; 60],
    /// type and permission bits
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// seconds since the epoch, with the extra epoch bits when present
    pub mtime: i64,
    /// nanoseconds past `mtime`, from the extra field when present
    pub mtime_ns: u32,
    /// creation time (nanoseconds since the epoch; 0 in small inodes)
    pub born: u64,
    pub generation: u32,
    /// where the data is, when the inode keeps it itself (inline_data)
    pub inline: Option<InlineData>,
}

/// Where an inode with inline data keeps it, as byte ranges of the volume:
/// the 60 bytes of `i_block`, then the value of its `system.data` extended
/// attribute (empty without one). A directory's starts with its parent's
/// inode number (4 bytes), then entries, which go on in the tail.
#[derive(Clone, Debug)]
pub struct InlineData {
    head: u64,
    tail: Range<u64>,
}

impl InlineData {
    fn len(&self) -> u64 {
        INLINE_HEAD + (self.tail.end - self.tail.start)
    }
}

impl Inode {
    pub fn uses_extents(&self) -> bool {
        self.flags & EXT4_EXTENTS_FL != 0
    }
    pub fn is_encrypted(&self) -> bool {
        self.flags & EXT4_ENCRYPT_FL != 0
    }
    /// Whether this directory's names compare without case (casefold).
    pub fn is_casefolded(&self) -> bool {
        self.flags & EXT4_CASEFOLD_FL != 0
    }
    /// A device inode's number: in `i_block`'s first word in the old
    /// 8-bit major and minor form, else in its second in Linux's 32-bit
    /// form (the kernel reads it so).
    pub fn device(&self) -> Device {
        let old = le32(&self.block, 0);
        if old != 0 {
            Device {
                major: (old >> 8) & 0xFF,
                minor: old & 0xFF,
            }
        } else {
            Device::from_linux(le32(&self.block, 4))
        }
    }
}

/// A contiguous piece of a file: `len` blocks at logical block `logical`
/// stored at physical block `physical`; `physical == 0` reads as zeros.
#[derive(Clone, Copy, Debug)]
struct Run {
    logical: u64,
    physical: u64,
    len: u64,
}

/// The runs of one file's logical blocks `[start, end)`, in logical order;
/// the blocks between them are holes.
struct RunWindow {
    start: u64,
    end: u64,
    runs: Vec<Run>,
}

/// The runs of a window, collected while a block map or extent tree is
/// walked in logical order.
struct Collect {
    inode: u32,
    /// the first logical block of the window: runs that end before it are
    /// passed over
    from: u64,
    runs: Vec<Run>,
    /// where the window ends, once it holds [`WINDOW_RUNS`] runs
    full_at: Option<u64>,
}

impl Collect {
    fn new(inode: u32, from: u64) -> Collect {
        Collect {
            inode,
            from,
            runs: Vec::new(),
            full_at: None,
        }
    }

    fn full(&self) -> bool {
        self.full_at.is_some()
    }

    /// Adds the next run in logical order, merged into the last one when
    /// both are contiguous. Runs that overlap or go backwards are corrupt:
    /// the window would not say what lies where.
    fn push(&mut self, run: Run) -> Result<()> {
        if self.full() || run.logical.saturating_add(run.len) <= self.from {
            return Ok(());
        }
        if let Some(last) = self.runs.last_mut() {
            let last_end = last.logical.saturating_add(last.len);
            if run.logical < last_end {
                return Err(bad(format!(
                    "inode {}: the block map names logical block {} twice",
                    self.inode, run.logical
                )));
            }
            if last.physical != 0
                && last_end == run.logical
                && last.physical.saturating_add(last.len) == run.physical
            {
                last.len += run.len;
                return Ok(());
            }
        }
        if self.runs.len() >= WINDOW_RUNS {
            self.full_at = Some(run.logical);
            return Ok(());
        }
        self.runs.push(run);
        Ok(())
    }
}

/// The state of mapping one block-mapped (ext2/3) file.
struct BlockMapWalk {
    /// blocks the file's size covers; pointers past it are not read
    nblocks: u64,
    /// the logical block the next pointer maps
    logical: u64,
    runs: Collect,
    /// Indirect blocks already read. A file uses each one once; a corrupt
    /// map that points back at one would otherwise be walked again and
    /// again (up to 2^30 pointers under one triple-indirect block).
    seen: HashSet<u64>,
}

/// Where byte ranges on the volume overlap, if they do (sorts them): a
/// file or directory owns its blocks, so a map naming one twice is
/// corrupt.
pub fn reused_at(ranges: &mut [Range<u64>]) -> Option<u64> {
    ranges.sort_unstable_by_key(|r| r.start);
    ranges
        .windows(2)
        .find(|w| w[1].start < w[0].end)
        .map(|w| w[1].start)
}

/// Appends `e`, merging it into the last extent when they are contiguous.
fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    match (out.last_mut(), e) {
        (Some(Extent::Zero { len }), Extent::Zero { len: more }) => *len += more,
        (
            Some(Extent::Disk { offset, len }),
            Extent::Disk {
                offset: at,
                len: more,
            },
        ) if *offset + *len == at => *len += more,
        _ => out.push(e),
    }
}

pub struct ExtRaw {
    disk: Arc<dyn Disk>,
    /// crc32c seed of metadata checksums, when the filesystem has them
    csum_seed: Option<u32>,
    /// whether the journal must be replayed to see the current state
    needs_recovery: bool,
    /// the filesystem has features this reads and ext4-view refuses
    beyond_ext4_view: bool,
    /// ext4-view would see another size: the superblock has a high half of
    /// the block count without the 64bit feature, which the kernel (and
    /// this reader) ignores and ext4-view does not
    ext4_view_misreads: bool,
    /// the inode holding the journal, if it is in this filesystem
    journal_inode: Option<u32>,
    /// the attribute block's number has 48 bits (the 64bit feature)
    wide_file_acl: bool,
    block_size: u64,
    blocks_count: u64,
    inodes_per_group: u32,
    inode_size: u64,
    inode_tables: Vec<u64>,
    cache: HashMap<u64, Rc<Vec<u8>>>,
    runs_cache: Option<(u32, Rc<RunWindow>)>,
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("ext filesystem: {msg}"))
}

/// What [`ExtRaw::list_dir`] calls for each entry: its name (handed over),
/// its inode number and the inode, or why the inode could not be read (a
/// damaged inode must not hide its siblings), and the listing's charge.
pub type ListedEntry<'a> = dyn FnMut(Vec<u8>, u32, Result<&Inode>, &mut Charge) -> Result<()> + 'a;

impl ExtRaw {
    pub fn open(disk: Arc<dyn Disk>) -> Result<ExtRaw> {
        let mut sb = vec![0u8; 1024];
        read_exact_at(&*disk, 1024, &mut sb, "ext superblock")?;
        if le16(&sb, 0x38) != 0xEF53 {
            return Err(bad("bad superblock magic"));
        }
        let log = le32(&sb, 0x18);
        if log > 6 {
            return Err(bad(format!("block size 2^(10+{log}) is invalid")));
        }
        let block_size = 1024u64 << log;
        let incompat = le32(&sb, 0x60);
        if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            return Err(Error::unsupported(
                "ext journal device: the external journal of another ext filesystem, \
                 which holds no files",
            ));
        }
        let unread = incompat & (INCOMPAT_UNREAD | !INCOMPAT_READ);
        if unread != 0 {
            let names: Vec<String> = (0..32)
                .map(|bit| 1u32 << bit)
                .filter(|b| unread & b != 0)
                .map(|b| match b {
                    0x1 => "compression".to_string(),
                    0x8 => "journal_dev".to_string(),
                    0x1000 => "dirdata".to_string(),
                    _ => format!("{b:#x}"),
                })
                .collect();
            return Err(Error::unsupported(format!(
                "ext filesystem: the incompatible features {} are not supported",
                names.join(", ")
            )));
        }
        let (compat, ro_compat) = (le32(&sb, 0x5C), le32(&sb, 0x64));
        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 && crc32c(!0, &sb[..0x3FC]) != le32(&sb, 0x3FC)
        {
            return Err(bad("superblock checksum mismatch"));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut blocks_count = u64::from(le32(&sb, 0x04));
        if is64 {
            blocks_count |= u64::from(le32(&sb, 0x150)) << 32;
        }
        let first_data_block = u64::from(le32(&sb, 0x14));
        let blocks_per_group = u64::from(le32(&sb, 0x20));
        let inodes_per_group = le32(&sb, 0x28);
        let rev = le32(&sb, 0x4C);
        let inode_size = if rev == 0 {
            128
        } else {
            u64::from(le16(&sb, 0x58))
        };
        let desc_size = if is64 {
            u64::from(le16(&sb, 0xFE)).max(32)
        } else {
            32
        };
        // a group's block bitmap is one block, of a bit per cluster
        let bitmap_bits = if ro_compat & RO_COMPAT_BIGALLOC != 0 {
            u64::from(le32(&sb, 0x24))
        } else {
            blocks_per_group
        };
        if blocks_per_group == 0
            || bitmap_bits == 0
            || bitmap_bits > 8 * block_size
            || blocks_per_group % bitmap_bits != 0
            || inodes_per_group == 0
            || !(128..=block_size).contains(&inode_size)
            || desc_size > 1024
        {
            return Err(bad("superblock geometry is invalid"));
        }
        if blocks_count.saturating_mul(block_size) > disk.size().saturating_mul(4).max(1 << 40) {
            return Err(bad(format!(
                "superblock claims {blocks_count} blocks, far more than the volume holds"
            )));
        }
        let groups = blocks_count
            .saturating_sub(first_data_block)
            .div_ceil(blocks_per_group);
        if groups > MAX_GROUPS {
            return Err(Error::unsupported(format!(
                "ext filesystem: {groups} block groups, more than the {MAX_GROUPS} read here \
                 (their descriptors are held in memory)"
            )));
        }
        let gdt_bytes = groups.saturating_mul(desc_size);
        if gdt_bytes > disk.size() {
            return Err(bad("group descriptor table larger than the volume"));
        }
        // Read in pieces: only the inode table locations are kept, and the
        // table itself can be 64 MiB (65,536 descriptors of 1,024 bytes).
        // A piece is at most one descriptor block where meta groups place
        // the blocks apart.
        // the block after the superblock's (byte 1024): block 2 with 1 KiB
        // blocks also where the first data block is 0, as bigalloc has it
        let gdt_start = (1024 / block_size + 1) * block_size;
        let per_block = block_size / desc_size;
        let first_meta = if incompat & INCOMPAT_META_BG != 0 {
            u64::from(le32(&sb, 0x104))
        } else {
            u64::MAX
        };
        let backups = (le32(&sb, 0x24C), le32(&sb, 0x250));
        let has_super = |g: u64| {
            if compat & COMPAT_SPARSE_SUPER2 != 0 {
                g == 0 || g == u64::from(backups.0) || g == u64::from(backups.1)
            } else if ro_compat & RO_COMPAT_SPARSE_SUPER != 0 {
                g <= 1 || [3u64, 5, 7].iter().any(|&b| is_power_of(g, b))
            } else {
                true
            }
        };
        let per_piece = (GDT_PIECE_BYTES / desc_size).max(1);
        let mut piece = vec![0u8; (per_piece * desc_size) as usize];
        let mut inode_tables = Vec::with_capacity(groups as usize);
        let mut group = 0;
        while group < groups {
            let desc_block = group / per_block;
            let (at, most) = if desc_block < first_meta {
                let most = (first_meta.saturating_mul(per_block)).min(groups) - group;
                (gdt_start + group * desc_size, most)
            } else {
                // the meta group's first group holds its descriptor block,
                // after that group's superblock backup if it has one
                let first = desc_block * per_block;
                let mut block = first_data_block + first * blocks_per_group;
                if has_super(first) {
                    block += 1;
                }
                if block_size == 1024 && desc_block == 0 && first_data_block == 0 {
                    block += 1;
                }
                let at = block * block_size + (group - first) * desc_size;
                (at, first + per_block - group)
            };
            let n = per_piece.min(groups - group).min(most.max(1));
            let piece = piece
                .get_mut(..(n * desc_size) as usize)
                .unwrap_or_default();
            read_exact_at(&*disk, at, piece, "ext group descriptors")?;
            for d in piece.chunks_exact(desc_size as usize) {
                let mut t = u64::from(le32(d, 0x08));
                if desc_size >= 64 {
                    t |= u64::from(le32(d, 0x28)) << 32;
                }
                inode_tables.push(t);
            }
            group += n;
        }
        let csum_seed = (ro_compat & RO_COMPAT_METADATA_CSUM != 0).then(|| {
            if incompat & INCOMPAT_CSUM_SEED != 0 {
                le32(&sb, 0x270)
            } else {
                crc32c(!0, sb.get(0x68..0x78).unwrap_or_default())
            }
        });
        Ok(ExtRaw {
            disk,
            csum_seed,
            needs_recovery: incompat & INCOMPAT_RECOVER != 0,
            beyond_ext4_view: incompat & INCOMPAT_BEYOND_EXT4_VIEW != 0
                || incompat & INCOMPAT_FILETYPE == 0,
            ext4_view_misreads: !is64 && le32(&sb, 0x150) != 0,
            journal_inode: (compat & COMPAT_HAS_JOURNAL != 0)
                .then(|| le32(&sb, 0xE0))
                .filter(|&n| n != 0),
            wide_file_acl: incompat & INCOMPAT_64BIT != 0,
            block_size,
            blocks_count,
            inodes_per_group,
            inode_size,
            inode_tables,
            cache: HashMap::new(),
            runs_cache: None,
        })
    }

    /// Whether the filesystem has features read here that ext4-view
    /// refuses (meta_bg, MMP, EA in inodes, large directories, inline
    /// data, casefold), or lacks one it requires (file types in directory
    /// entries).
    pub fn reads_what_ext4_view_refuses(&self) -> bool {
        self.beyond_ext4_view
    }

    /// Whether ext4-view would take the filesystem for another size than
    /// the kernel does (and, from a damaged block count, set out to hold
    /// descriptors for billions of groups: tens of GiB).
    pub fn ext4_view_misreads(&self) -> bool {
        self.ext4_view_misreads
    }

    /// How many block groups the filesystem has.
    pub fn groups(&self) -> usize {
        self.inode_tables.len()
    }

    fn block(&mut self, n: u64) -> Result<Rc<Vec<u8>>> {
        if let Some(b) = self.cache.get(&n) {
            return Ok(b.clone());
        }
        if n == 0 || n >= self.blocks_count {
            return Err(bad(format!("block number {n} out of range")));
        }
        let mut buf = vec![0u8; self.block_size as usize];
        read_exact_at(
            &*self.disk,
            n * self.block_size,
            &mut buf,
            "ext metadata block",
        )?;
        if self.cache.len() as u64 >= BLOCK_CACHE_BYTES / self.block_size {
            self.cache.clear();
        }
        let b = Rc::new(buf);
        self.cache.insert(n, b.clone());
        Ok(b)
    }

    /// Byte offset of inode `number` in the volume.
    fn inode_location(&self, number: u32) -> Result<u64> {
        let idx = number.checked_sub(1).ok_or_else(|| bad("inode number 0"))?;
        let group = (idx / self.inodes_per_group) as usize;
        let table = *self
            .inode_tables
            .get(group)
            .ok_or_else(|| bad(format!("inode {number} is beyond the last block group")))?;
        table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add(u64::from(idx % self.inodes_per_group) * self.inode_size))
            .ok_or_else(|| bad(format!("inode {number}: inode table location out of range")))
    }

    /// Where inode `number` is: its byte in the volume, the block holding
    /// it and its range there.
    fn inode_bytes(&mut self, number: u32) -> Result<(u64, Rc<Vec<u8>>, Range<usize>)> {
        let byte = self.inode_location(number)?;
        let blk = self.block(byte / self.block_size)?;
        let off = (byte % self.block_size) as usize;
        let at = off..off + self.inode_size as usize;
        if blk.get(at.clone()).is_none() {
            return Err(bad(format!("inode {number} crosses a block")));
        }
        Ok((byte, blk, at))
    }

    pub fn inode(&mut self, number: u32) -> Result<Inode> {
        self.read_inode(number, false)
    }

    /// Inode `number`, its crc32c checked when the filesystem has metadata
    /// checksums.
    pub fn checked_inode(&mut self, number: u32) -> Result<Inode> {
        self.read_inode(number, true)
    }

    /// Reads and decodes inode `number`; with `verify`, checks its crc32c
    /// when the filesystem has metadata checksums.
    fn read_inode(&mut self, number: u32, verify: bool) -> Result<Inode> {
        let (byte, blk, at) = self.inode_bytes(number)?;
        let raw = &blk[at];
        let generation = le32(raw, 0x64);
        if let (true, Some(seed)) = (verify, self.csum_seed) {
            check_inode_csum(raw, number, generation, seed)?;
        }
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[0x28..0x28 + 60]);
        // the extra part of a large inode holds what i_extra_isize covers
        let extra = if raw.len() > GOOD_OLD_INODE_SIZE {
            GOOD_OLD_INODE_SIZE + usize::from(le16(raw, 0x80))
        } else {
            GOOD_OLD_INODE_SIZE
        };
        let mut mtime = i64::from(le32(raw, 0x10) as i32);
        let mut mtime_ns = 0;
        if extra >= 0x8C {
            let extra_time = le32(raw, 0x88);
            mtime += i64::from(extra_time & 3) << 32;
            // 30 bits hold more than a second: past it the field is damage
            mtime_ns = Some(extra_time >> 2).filter(|&ns| ns < NANOS).unwrap_or(0);
        }
        // i_crtime and its extra word, when the extra part reaches them
        let born = if extra >= 0x98 {
            let extra_time = le32(raw, 0x94);
            let secs = i64::from(le32(raw, 0x90) as i32) + (i64::from(extra_time & 3) << 32);
            epoch_nanos(secs, (extra_time >> 2).min(NANOS - 1))
        } else {
            0
        };
        let flags = le32(raw, 0x20);
        let inline = (flags & EXT4_INLINE_DATA_FL != 0).then(|| {
            let tail = inline_tail(raw, extra).unwrap_or(0..0);
            InlineData {
                head: byte + 0x28,
                tail: byte + tail.start as u64..byte + tail.end as u64,
            }
        });
        Ok(Inode {
            number,
            size: u64::from(le32(raw, 0x04)) | (u64::from(le32(raw, 0x6C)) << 32),
            links: le16(raw, 0x1A),
            flags,
            block,
            mode: le16(raw, 0x00),
            uid: u32::from(le16(raw, 0x02)) | (u32::from(le16(raw, 0x78)) << 16),
            gid: u32::from(le16(raw, 0x18)) | (u32::from(le16(raw, 0x7A)) << 16),
            mtime,
            mtime_ns,
            born,
            generation,
            inline,
        })
    }

    /// The window of a file's block map that starts at logical block
    /// `from`: up to [`WINDOW_RUNS`] runs.
    fn runs(&mut self, ino: &Inode, from: u64) -> Result<Rc<RunWindow>> {
        if let Some((n, w)) = &self.runs_cache {
            if *n == ino.number && w.start <= from && from < w.end {
                return Ok(w.clone());
            }
        }
        if ino.inline.is_some() {
            // its data has no blocks: `map` and `list_dir` read it apart
            return Err(bad(format!(
                "inode {}: inline data has no block map",
                ino.number
            )));
        }
        let nblocks = ino.size.div_ceil(self.block_size);
        let runs = if ino.uses_extents() {
            let mut collect = Collect::new(ino.number, from);
            let mut seen = HashSet::new();
            self.extent_node(&ino.block, 0, u64::MAX, &mut collect, &mut seen)?;
            collect
        } else {
            let mut walk = BlockMapWalk {
                nblocks,
                logical: 0,
                runs: Collect::new(ino.number, from),
                seen: HashSet::new(),
            };
            for i in 0..15 {
                if walk.logical >= nblocks || walk.runs.full() {
                    break;
                }
                let p = u64::from(le32(&ino.block, i * 4));
                self.map_level(&mut walk, p, i.saturating_sub(11))?;
            }
            walk.runs
        };
        let w = Rc::new(RunWindow {
            start: from,
            end: runs.full_at.unwrap_or(u64::MAX),
            runs: runs.runs,
        });
        self.runs_cache = Some((ino.number, w.clone()));
        Ok(w)
    }

    /// Maps a block-map pointer at `level` (0 direct, 1..3 indirect),
    /// advancing `walk.logical` over the blocks it covers. A zero pointer
    /// is a hole covering the whole subtree.
    fn map_level(&mut self, walk: &mut BlockMapWalk, ptr: u64, level: usize) -> Result<()> {
        let per = self.block_size / 4;
        let span = per.saturating_pow(level as u32);
        let inode = walk.runs.inode;
        // a hole, or blocks before the window: nothing to read
        if ptr == 0 || walk.logical.saturating_add(span) <= walk.runs.from {
            walk.logical = walk.logical.saturating_add(span);
            return Ok(());
        }
        if level == 0 {
            if ptr >= self.blocks_count {
                return Err(bad(format!(
                    "inode {inode}: block pointer {ptr} out of range"
                )));
            }
            let run = Run {
                logical: walk.logical,
                physical: ptr,
                len: 1,
            };
            walk.runs.push(run)?;
            walk.logical += 1;
            return Ok(());
        }
        if !walk.seen.insert(ptr) {
            return Err(bad(format!(
                "inode {inode}: indirect block {ptr} is used twice"
            )));
        }
        let blk = self.block(ptr)?;
        for i in 0..per as usize {
            if walk.logical >= walk.nblocks || walk.runs.full() {
                break;
            }
            let p = u64::from(le32(&blk, i * 4));
            self.map_level(walk, p, level - 1)?;
        }
        Ok(())
    }

    /// Collects the runs of an extent tree node (the root lives in the
    /// inode) that `runs` wants; the node covers logical blocks below
    /// `limit`, and of its children only those reaching the window are read
    /// (the lookup the kernel makes). `seen` holds the tree blocks already
    /// read: a tree uses each block once, and a corrupt index that points
    /// back at one would otherwise multiply the work at every level.
    fn extent_node(
        &mut self,
        node: &[u8],
        depth: u32,
        limit: u64,
        runs: &mut Collect,
        seen: &mut HashSet<u64>,
    ) -> Result<()> {
        let inode = runs.inode;
        if seen.len() >= MAX_EXTENT_NODES {
            return Err(bad(format!("inode {inode}: extent tree too large")));
        }
        if le16(node, 0) != 0xF30A {
            return Err(bad(format!("inode {inode}: bad extent header")));
        }
        let entries = usize::from(le16(node, 2));
        let tree_depth = le16(node, 6);
        if depth > 5 || tree_depth > 5 || 12 + entries * 12 > node.len() {
            return Err(bad(format!("inode {inode}: bad extent tree")));
        }
        let key = |i: usize| u64::from(le32(node, 12 + i * 12));
        for i in 0..entries {
            if runs.full() {
                break;
            }
            let e = &node[12 + i * 12..24 + i * 12];
            if tree_depth == 0 {
                let logical = u64::from(le32(e, 0));
                let mut len = u64::from(le16(e, 4));
                if len == 0 {
                    // the kernel refuses it too; read on, its blocks
                    // would silently read as a hole
                    return Err(bad(format!("inode {inode}: extent of length 0")));
                }
                let uninit = len > 32768;
                if uninit {
                    len -= 32768;
                }
                let physical = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
                if physical.saturating_add(len) > self.blocks_count {
                    return Err(bad(format!("inode {inode}: extent out of range")));
                }
                let physical = if uninit { 0 } else { physical };
                runs.push(Run {
                    logical,
                    physical,
                    len,
                })?;
            } else {
                let end = if i + 1 < entries { key(i + 1) } else { limit };
                if end <= runs.from {
                    continue;
                }
                let child = (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4));
                if !seen.insert(child) {
                    return Err(bad(format!(
                        "inode {inode}: extent tree block {child} is used twice"
                    )));
                }
                let blk = self.block(child)?;
                self.extent_node(&blk, depth + 1, end, runs, seen)?;
            }
        }
        Ok(())
    }

    /// The inode holding the journal, if the journal is in this filesystem.
    pub fn journal_inode(&self) -> Option<u32> {
        self.journal_inode
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Whether the superblock says the journal needs replaying; when it does
    /// not, the on-disk blocks are the current state.
    pub fn needs_recovery(&self) -> bool {
        self.needs_recovery
    }

    /// The largest size a file's block map can address: 2^32 blocks with
    /// extents, the direct and 1-3 times indirect blocks without.
    fn max_file_size(&self, ino: &Inode) -> u64 {
        let bs = self.block_size;
        let blocks = if ino.uses_extents() {
            1 << 32
        } else {
            let per = bs / 4;
            12 + per + per * per + per * per * per
        };
        blocks * bs
    }

    /// Where `[offset, offset + len)` of a file (clamped at its size) lies
    /// on the volume: byte ranges in file order, holes and unwritten extents
    /// as [`Extent::Zero`]. Adjacent pieces are merged.
    pub fn map(&mut self, ino: &Inode, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if ino.is_encrypted() {
            return Err(Error::unsupported(format!(
                "inode {}: encrypted files are not supported",
                ino.number
            )));
        }
        let most = self.max_file_size(ino);
        if ino.size > most {
            // its reads would stream zeros for years: a corrupt size
            return Err(bad(format!(
                "inode {}: size {} is more than its block map can address ({most} bytes)",
                ino.number, ino.size
            )));
        }
        if offset >= ino.size {
            return Ok(Vec::new());
        }
        let end = offset + len.min(ino.size - offset);
        if let Some(inline) = &ino.inline {
            return inline_extents(ino, inline, offset, end);
        }
        let bs = self.block_size;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let w = self.runs(ino, pos / bs)?;
            // the bytes this window says all of; it starts at or before `pos`
            let w_end = w.end.saturating_mul(bs).min(end);
            let first_block = pos / bs;
            let start_idx = w.runs.partition_point(|r| r.logical + r.len <= first_block);
            for r in &w.runs[start_idx..] {
                let rs = r.logical.saturating_mul(bs);
                let re = r.logical.saturating_add(r.len).saturating_mul(bs);
                if rs >= w_end {
                    break;
                }
                let s = rs.max(pos);
                let e = re.min(w_end);
                if s >= e || r.physical == 0 {
                    continue;
                }
                if s > pos {
                    push_extent(&mut out, Extent::Zero { len: s - pos });
                }
                let at = r
                    .physical
                    .checked_mul(bs)
                    .and_then(|p| p.checked_add(s - rs))
                    .ok_or_else(|| {
                        bad(format!("inode {}: block number out of range", ino.number))
                    })?;
                push_extent(
                    &mut out,
                    Extent::Disk {
                        offset: at,
                        len: e - s,
                    },
                );
                pos = e;
            }
            if pos < w_end {
                push_extent(&mut out, Extent::Zero { len: w_end - pos });
                pos = w_end;
            }
        }
        Ok(out)
    }

    /// Reads file data at `offset` (holes and unwritten extents read as
    /// zeros); short only at end of file.
    pub fn read(&mut self, ino: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0usize;
        for extent in self.map(ino, offset, buf.len() as u64)? {
            let n = extent.bytes() as usize;
            let Some(dst) = buf.get_mut(done..done + n) else {
                return Err(bad(format!(
                    "inode {}: block map overruns the read",
                    ino.number
                )));
            };
            match extent {
                Extent::Zero { .. } => dst.fill(0),
                Extent::Disk { offset, .. } => {
                    read_exact_at(&*self.disk, offset, dst, "ext file data")?
                }
            }
            done += n;
        }
        Ok(done)
    }

    /// Calls `each(name, number, inode, charge)` for the entries of directory `dir`
    /// (without `.` and `..`), in inode order, from one pass over the
    /// directory's blocks and one read of each inode; directory blocks and
    /// inodes are checked against their checksums when the filesystem has
    /// them. The chunks holding the directory blocks, then those holding
    /// the inodes, are announced to the disk ahead of the reads so they load
    /// in parallel. Only the names are held meanwhile (counted in
    /// `charge`); each is handed over, not copied.
    /// On-disk state only: for use while the journal is clean.
    pub fn list_dir(
        &mut self,
        dir: u32,
        charge: &mut Charge,
        each: &mut ListedEntry<'_>,
    ) -> Result<()> {
        let dir = self.read_inode(dir, true)?;
        if dir.is_encrypted() {
            return Err(Error::unsupported(format!(
                "directory inode {}: encrypted directories are not supported",
                dir.number
            )));
        }
        if dir.size > MAX_DIR_SIZE {
            return Err(bad(format!("directory inode {} is too large", dir.number)));
        }
        let mut names = Vec::new();
        match dir.inline.clone() {
            Some(inline) => self.inline_dir_names(&dir, &inline, charge, &mut names)?,
            None => self.block_dir_names(&dir, charge, &mut names)?,
        }
        // inodes in table order: each inode table block is read once
        let bs = self.block_size;
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_unstable_by_key(|&i| names[i].1);
        let mut tables: Vec<Range<u64>> = Vec::new();
        for &i in &order {
            let at = self.inode_location(names[i].1)?;
            let blk = at / bs * bs;
            match tables.last_mut() {
                Some(last) if last.end >= blk => last.end = last.end.max(blk + bs),
                _ => tables.push(blk..blk + bs),
            }
        }
        self.disk.will_read(&tables);
        for &i in &order {
            let number = names[i].1;
            let ino = self.read_inode(number, true);
            each(
                std::mem::take(&mut names[i].0),
                number,
                ino.as_ref().map_err(Error::clone),
                charge,
            )?;
        }
        Ok(())
    }

    /// Adds the names of directory `dir`'s blocks to `names`.
    fn block_dir_names(
        &mut self,
        dir: &Inode,
        charge: &mut Charge,
        names: &mut Vec<(Vec<u8>, u32)>,
    ) -> Result<()> {
        let bs = self.block_size;
        let nblocks = dir.size.div_ceil(bs);
        // the directory's runs within its size, window by window, each
        // clipped to start in its own window
        let mut runs: Vec<Run> = Vec::new();
        let mut from = 0;
        while from < nblocks {
            let w = self.runs(dir, from)?;
            for r in w.runs.iter().filter(|r| r.physical != 0) {
                let start = r.logical.max(from);
                let end = r.logical.saturating_add(r.len).min(nblocks);
                if start >= end {
                    continue;
                }
                charge.add(std::mem::size_of::<Run>() + std::mem::size_of::<Range<u64>>())?;
                runs.push(Run {
                    logical: start,
                    physical: r.physical + (start - r.logical),
                    len: end - start,
                });
            }
            from = w.end;
        }
        let blocks_of = |r: &Run| r.physical * bs..(r.physical + r.len) * bs;
        let mut blocks: Vec<Range<u64>> = runs.iter().map(blocks_of).collect();
        self.disk.will_read(&blocks);
        // A directory owns its blocks. A corrupt map that names one block
        // many times would list its entries as often: 341 entries per 4 KiB
        // block, about 400 bytes each once listed.
        if let Some(at) = reused_at(&mut blocks) {
            return Err(bad(format!(
                "directory inode {}: block {} is used twice",
                dir.number,
                at / bs
            )));
        }
        let mut block = vec![0u8; bs as usize];
        for r in &runs {
            for k in 0..r.len {
                let logical = r.logical + k;
                read_exact_at(
                    &*self.disk,
                    (r.physical + k) * bs,
                    &mut block,
                    "ext directory block",
                )?;
                self.check_dir_block(dir, logical, &block)?;
                parse_dir_block(&block, dir.number, logical, &mut |name, ino| {
                    add_name(names, dir.number, name, ino, charge)
                })?;
            }
        }
        Ok(())
    }

    /// Adds the names of directory `dir`, kept in its inode, to `names`:
    /// entries after the parent's inode number in `i_block`, then in the
    /// attribute value that goes on from there. Neither part has a
    /// checksum of its own; the inode's covers `i_block`.
    fn inline_dir_names(
        &mut self,
        dir: &Inode,
        inline: &InlineData,
        charge: &mut Charge,
        names: &mut Vec<(Vec<u8>, u32)>,
    ) -> Result<()> {
        let mut tail = vec![0u8; (inline.tail.end - inline.tail.start) as usize];
        read_exact_at(
            &*self.disk,
            inline.tail.start,
            &mut tail,
            "ext inline directory",
        )?;
        for (part, region) in [(0, &dir.block[4..]), (1, &tail[..])] {
            parse_dir_block(region, dir.number, part, &mut |name, ino| {
                add_name(names, dir.number, name, ino, charge)
            })?;
        }
        Ok(())
    }

    /// Checks a directory block's checksum (leaf blocks end in a checksum
    /// entry; htree index blocks are left to the structural checks).
    fn check_dir_block(&self, dir: &Inode, logical: u64, block: &[u8]) -> Result<()> {
        let Some(seed) = self.csum_seed else {
            return Ok(());
        };
        let n = block.len();
        // An index block is told by its place (the root is block 0) or its
        // fake entry spanning the block, not by its end: the kernel makes
        // the root out of the directory's first leaf block and leaves that
        // block's checksum entry header where the index tail's reserved
        // word now is, so the root's last 12 bytes look like a leaf's.
        let htree = dir.flags & EXT4_INDEX_FL != 0;
        let index_node = logical == 0 || (le32(block, 0) == 0 && usize::from(le16(block, 4)) == n);
        if htree && index_node {
            return Ok(());
        }
        let tail = n.checked_sub(12).and_then(|t| block.get(t..));
        let has_tail =
            tail.is_some_and(|t| le32(t, 0) == 0 && le16(t, 4) == 12 && t[6] == 0 && t[7] == 0xDE);
        if !has_tail {
            return Err(bad(format!(
                "directory inode {}: block {logical} has no checksum",
                dir.number
            )));
        }
        let mut c = crc32c(seed, &dir.number.to_le_bytes());
        c = crc32c(c, &dir.generation.to_le_bytes());
        c = crc32c(c, &block[..n - 12]);
        if c != le32(block, n - 4) {
            return Err(bad(format!(
                "directory inode {}: checksum mismatch in block {logical}",
                dir.number
            )));
        }
        Ok(())
    }

    /// The extended attributes of inode `number` as Linux lists them: those
    /// in its extra space, then those in its attribute block (checked for
    /// its magic, its single block and, with metadata checksums, its
    /// crc32c), values kept in inodes of their own read from there.
    pub fn xattrs(&mut self, number: u32) -> Result<Vec<Xattr>> {
        let what = || format!("inode {number}");
        let mut list = XattrList::new(format!("ext filesystem: inode {number}"));
        let (_, blk, at) = self.inode_bytes(number)?;
        let raw = &blk[at];
        let mut file_acl = u64::from(le32(raw, 0x68));
        if self.wide_file_acl {
            file_acl |= u64::from(le16(raw, 0x76)) << 32;
        }
        if raw.len() > GOOD_OLD_INODE_SIZE {
            let ibody = GOOD_OLD_INODE_SIZE + usize::from(le16(raw, 0x80));
            if raw
                .get(ibody..ibody + 4)
                .is_some_and(|m| le32(m, 0) == XATTR_MAGIC)
            {
                let table = &raw[ibody + 4..];
                let found = ext_xattr::entries(table, 0, 0, &what)?;
                self.take_xattrs(found, &mut list, &what)?;
            }
        }
        if file_acl != 0 {
            let block = self.block(file_acl)?;
            let header_ok = le32(&block, 0) == ext_xattr::MAGIC && le32(&block, 8) == 1;
            if !header_ok {
                return Err(bad(format!(
                    "inode {number}: attribute block {file_acl} has no attribute header"
                )));
            }
            if let Some(seed) = self.csum_seed {
                let at = ext_xattr::BLOCK_CSUM_AT;
                let mut c = crc32c(seed, &file_acl.to_le_bytes());
                c = crc32c(c, &block[..at]);
                c = crc32c(c, &[0; 4]);
                c = crc32c(c, &block[at + 4..]);
                if c != le32(&block, at) {
                    return Err(bad(format!(
                        "inode {number}: checksum mismatch in attribute block {file_acl}"
                    )));
                }
            }
            let found = ext_xattr::entries(&block, ext_xattr::BLOCK_HEADER, 0, &what)?;
            self.take_xattrs(found, &mut list, &what)?;
        }
        Ok(list.finish())
    }

    /// Adds the entries of one attribute table to `list`.
    fn take_xattrs(
        &mut self,
        found: Vec<ext_xattr::RawEntry<'_>>,
        list: &mut XattrList,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        for e in found {
            let raw = match e.value {
                ext_xattr::Value::Here(v) => v.to_vec(),
                ext_xattr::Value::Inode { number, size } => {
                    list.reserve(e.name.len() + size as usize)?;
                    let ino = self.checked_inode(number)?;
                    if ino.flags & EXT4_EA_INODE_FL == 0 || ino.size != u64::from(size) {
                        return Err(bad(format!(
                            "{}: the value of {} is not attribute inode {number}",
                            what(),
                            String::from_utf8_lossy(&e.name)
                        )));
                    }
                    let mut v = vec![0; size as usize];
                    let n = self.read(&ino, 0, &mut v)?;
                    if n != v.len() {
                        return Err(bad(format!(
                            "{}: attribute inode {number} ends early",
                            what()
                        )));
                    }
                    v
                }
            };
            let value = ext_xattr::linux_value(&e, raw, what)?;
            list.push(e.name, value)?;
        }
        Ok(())
    }

    /// The target of symlink `ino`, raw bytes.
    pub fn link_target(&mut self, ino: &Inode) -> Result<Vec<u8>> {
        let n = ino.number;
        if ino.size == 0 || ino.size > MAX_LINK_TARGET {
            return Err(bad(format!(
                "symlink inode {n}: target length {} is invalid",
                ino.size
            )));
        }
        let target = if ino.size <= MAX_INLINE_LINK {
            ino.block[..ino.size as usize].to_vec()
        } else {
            let mut buf = vec![0u8; ino.size as usize];
            let got = self.read(ino, 0, &mut buf)?;
            buf.truncate(got);
            buf
        };
        if target.len() as u64 != ino.size || target.contains(&0) {
            return Err(bad(format!("symlink inode {n}: malformed target")));
        }
        Ok(target)
    }
}

/// The value of the `system.data` attribute among those kept in the
/// inode's extra space (which starts at `ibody`), as a byte range of `raw`;
/// `None` when there is none or the attributes are malformed (the file's
/// size then says whether data is missing).
fn inline_tail(raw: &[u8], ibody: usize) -> Option<Range<usize>> {
    if le32(raw.get(ibody..ibody + 4)?, 0) != XATTR_MAGIC {
        return None;
    }
    // value offsets count from the first entry
    let first = ibody + 4;
    let mut at = first;
    loop {
        let head = raw.get(at..at + 16)?;
        if le32(head, 0) == 0 {
            return None;
        }
        let name_len = usize::from(head[0]);
        let name = raw.get(at + 16..at + 16 + name_len)?;
        if head[1] == XATTR_INDEX_SYSTEM && name == b"data" {
            // a value in an inode of its own (ea_inode) is not inline data
            if le32(head, 4) != 0 {
                return None;
            }
            let start = first.checked_add(usize::from(le16(head, 2)))?;
            let end = start.checked_add(le32(head, 8) as usize)?;
            return (end <= raw.len()).then_some(start..end);
        }
        at += (16 + name_len + 3) & !3;
    }
}

/// The extents of bytes `[offset, end)` of a file kept in its inode.
fn inline_extents(ino: &Inode, inline: &InlineData, offset: u64, end: u64) -> Result<Vec<Extent>> {
    if ino.size > inline.len() {
        return Err(bad(format!(
            "inode {}: size {} is more than its inline data ({} bytes)",
            ino.number,
            ino.size,
            inline.len()
        )));
    }
    let mut out = Vec::new();
    if offset < INLINE_HEAD {
        let len = end.min(INLINE_HEAD) - offset;
        out.push(Extent::Disk {
            offset: inline.head + offset,
            len,
        });
    }
    if end > INLINE_HEAD {
        let from = offset.max(INLINE_HEAD) - INLINE_HEAD;
        out.push(Extent::Disk {
            offset: inline.tail.start + from,
            len: end - INLINE_HEAD - from,
        });
    }
    Ok(out)
}

/// Whether `n` is a power of `base` (1 counts: `base`^0).
fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

/// Adds a directory entry to `names`, leaving out `.` and `..`, counting it
/// in `charge` and against [`MAX_DIR_ENTRIES`].
fn add_name(
    names: &mut Vec<(Vec<u8>, u32)>,
    dir: u32,
    name: &[u8],
    ino: u32,
    charge: &mut Charge,
) -> Result<()> {
    if name == b"." || name == b".." {
        return Ok(());
    }
    if names.len() >= MAX_DIR_ENTRIES {
        return Err(bad(format!("directory inode {dir}: too many entries")));
    }
    // the name, its place in `names` and in `order`
    charge.add(
        std::mem::size_of::<(Vec<u8>, u32)>() + std::mem::size_of::<usize>() + name.len() + 16,
    )?;
    names.push((name.to_vec(), ino));
    Ok(())
}

/// Calls `each(name, inode)` for every used entry of one directory block;
/// a malformed entry is an error naming the directory and block.
fn parse_dir_block(
    block: &[u8],
    dir: u32,
    logical: u64,
    each: &mut dyn FnMut(&[u8], u32) -> Result<()>,
) -> Result<()> {
    let bs = block.len();
    let mut off = 0usize;
    while off + 8 <= bs {
        let ino = le32(block, off);
        let rec_len = usize::from(le16(block, off + 4));
        let rec_len = if rec_len == 0 && bs >= 65536 {
            65536
        } else {
            rec_len
        };
        let name_len = usize::from(block[off + 6]);
        if rec_len < 8 || off + rec_len > bs || (ino != 0 && 8 + name_len > rec_len) {
            return Err(bad(format!(
                "directory inode {dir}: garbage entry in block {logical} at offset {off}"
            )));
        }
        if ino != 0 {
            each(&block[off + 8..off + 8 + name_len], ino)?;
        }
        off += rec_len;
    }
    Ok(())
}

/// Checks an inode's crc32c (seeded with the filesystem seed, the inode
/// number and generation; the checksum fields count as zeros). The high
/// half exists only when the inode's extra part covers it.
fn check_inode_csum(raw: &[u8], number: u32, generation: u32, seed: u32) -> Result<()> {
    const LO: usize = 0x7C;
    const HI: usize = 0x82;
    if raw.len() < GOOD_OLD_INODE_SIZE {
        return Err(bad(format!("inode {number} is truncated")));
    }
    let has_hi = raw.len() > GOOD_OLD_INODE_SIZE
        && GOOD_OLD_INODE_SIZE + usize::from(le16(raw, 0x80)) >= HI + 2
        && raw.len() >= HI + 2;
    let mut c = crc32c(seed, &number.to_le_bytes());
    c = crc32c(c, &generation.to_le_bytes());
    c = crc32c(c, &raw[..LO]);
    c = crc32c(c, &[0, 0]);
    let (stored, computed) = if has_hi {
        c = crc32c(c, &raw[LO + 2..HI]);
        c = crc32c(c, &[0, 0]);
        c = crc32c(c, &raw[HI + 2..]);
        (
            u32::from(le16(raw, LO)) | (u32::from(le16(raw, HI)) << 16),
            c,
        )
    } else {
        c = crc32c(c, &raw[LO + 2..]);
        (u32::from(le16(raw, LO)), c & 0xFFFF)
    };
    if stored != computed {
        return Err(bad(format!("inode {number}: checksum mismatch")));
    }
    Ok(())
}

/// Slice-by-8 tables of crc32c (Castagnoli, reflected).
const CRC32C_TABLES: [[u32; 256]; 8] = crc32c_tables();

const fn crc32c_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            let prev = t[j - 1][i];
            t[j][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

/// crc32c as ext4 and JBD2 compute it: the register starts at `seed` and
/// is returned as is (no final inversion).
pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    let t = &CRC32C_TABLES;
    let mut c = seed;
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let lo = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        c = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][b[4] as usize]
            ^ t[2][b[5] as usize]
            ^ t[1][b[6] as usize]
            ^ t[0][b[7] as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xFF) as usize];
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::disk::FileDisk;

    /// A 256-byte inode whose extra space (after 32 extra bytes) holds
    /// `user.x` = "ab" and `system.data` = `tail`, laid out as ext4 does:
    /// entries from the front, values from the back.
    fn inode_with_tail(tail: &[u8]) -> Vec<u8> {
        let mut raw = vec![0u8; 256];
        raw[0x80..0x82].copy_from_slice(&32u16.to_le_bytes());
        let ibody = 128 + 32;
        raw[ibody..ibody + 4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        let first = ibody + 4;
        let values_end = raw.len() - first;
        let entry =
            |raw: &mut Vec<u8>, at: usize, index: u8, name: &[u8], offs: usize, len: usize| {
                raw[at] = name.len() as u8;
                raw[at + 1] = index;
                raw[at + 2..at + 4].copy_from_slice(&(offs as u16).to_le_bytes());
                raw[at + 8..at + 12].copy_from_slice(&(len as u32).to_le_bytes());
                raw[at + 16..at + 16 + name.len()].copy_from_slice(name);
            };
        let x_offs = values_end - 4;
        entry(&mut raw, first, 1, b"x", x_offs, 2);
        raw[first + x_offs..first + x_offs + 2].copy_from_slice(b"ab");
        let data_offs = x_offs - tail.len().next_multiple_of(4);
        entry(
            &mut raw,
            first + 20,
            XATTR_INDEX_SYSTEM,
            b"data",
            data_offs,
            tail.len(),
        );
        raw[first + data_offs..first + data_offs + tail.len()].copy_from_slice(tail);
        raw
    }

    #[test]
    fn inline_data_tail_is_found_among_other_attributes() {
        let raw = inode_with_tail(b"the rest of the file");
        let r = inline_tail(&raw, 160).unwrap();
        assert_eq!(&raw[r], b"the rest of the file");
        // no attributes, or a value past the inode: no tail
        assert_eq!(inline_tail(&vec![0u8; 256], 160), None);
        let mut past = raw.clone();
        past[164 + 20 + 8..164 + 20 + 12].copy_from_slice(&200u32.to_le_bytes());
        assert_eq!(inline_tail(&past, 160), None);
        // in an inode of its own (ea_inode): not inline data
        let mut ea = raw.clone();
        ea[164 + 20 + 4] = 9;
        assert_eq!(inline_tail(&ea, 160), None);
        // damage anywhere never reads outside the inode
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..5000 {
            let mut d = raw.clone();
            for _ in 0..3 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                d[160 + (rng as usize % 96)] = (rng >> 32) as u8;
            }
            if let Some(r) = inline_tail(&d, 160) {
                assert!(r.start <= r.end && r.end <= d.len());
            }
        }
    }

    #[test]
    fn inline_extents_cover_the_block_area_then_the_tail() {
        let ino = |size: u64| Inode {
            number: 12,
            size,
            links: 1,
            flags: EXT4_INLINE_DATA_FL,
            block: [0; 60],
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_ns: 0,
            born: 0,
            generation: 0,
            inline: None,
        };
        let inline = InlineData {
            head: 1000,
            tail: 5000..5100,
        };
        let disk = |offset, len| Extent::Disk { offset, len };
        let got = inline_extents(&ino(150), &inline, 10, 150).unwrap();
        assert_eq!(got, [disk(1010, 50), disk(5000, 90)]);
        let got = inline_extents(&ino(150), &inline, 70, 80).unwrap();
        assert_eq!(got, [disk(5010, 10)]);
        let got = inline_extents(&ino(30), &inline, 0, 30).unwrap();
        assert_eq!(got, [disk(1000, 30)]);
        // a size past what the inode holds is corrupt, not zeros
        assert!(inline_extents(&ino(161), &inline, 0, 161).is_err());
    }

    #[test]
    fn cached_metadata_blocks_stay_within_their_bytes_whatever_the_block_size() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ext4-64k.img");
        // 64 KiB blocks, inodes of 256 bytes: mke2fs makes 65,280 of them,
        // 255 blocks (16 MiB) of inode table
        let made = std::process::Command::new("mke2fs")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "65536", "-I", "256", "-N", "65000",
            ])
            .arg(&img)
            .arg("1G")
            .output();
        if !made.is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: mke2fs could not make a 64 KiB-block image");
            return;
        }
        let disk: Arc<dyn Disk> = Arc::new(FileDisk::open(&img).unwrap());
        let mut raw = ExtRaw::open(disk).unwrap();
        assert_eq!(raw.block_size, 65536);
        // one inode of every inode table block
        let per_block = (raw.block_size / raw.inode_size) as u32;
        let inodes = raw.inodes_per_group * raw.inode_tables.len() as u32;
        let mut read = 0;
        for number in (1..=inodes).step_by(per_block as usize) {
            raw.inode(number).unwrap();
            read += 1;
            let cached: u64 = raw.cache.values().map(|b| b.len() as u64).sum();
            assert!(cached <= BLOCK_CACHE_BYTES, "{cached} bytes cached");
        }
        assert!(read >= 250, "{read} inode table blocks read");
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C of "123456789" with init and final xor !0 is 0xE3069283
        assert_eq!(crc32c(!0, b"123456789") ^ !0, 0xE306_9283);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = crc32c(0x1234_5678, &data);
        let split = crc32c(crc32c(0x1234_5678, &data[..333]), &data[333..]);
        assert_eq!(whole, split);
    }
}
