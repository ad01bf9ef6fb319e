//! btrfs, read in userspace: the superblock, the chunk tree that maps the
//! filesystem's logical addresses to the device, the root tree of
//! subvolumes, and each subvolume's tree of inodes, directory entries and
//! file extents (inline, regular, preallocated, holes; zstd, zlib and
//! LZO compressed).
//!
//! On disk (btrfs's `ctree.h`/`btrfs_tree.h`; integers little-endian): the
//! superblock at byte 64 KiB (`_BHRfS_M` at its byte 64); every tree is a
//! B-tree of `nodesize` nodes, each with a 101-byte header (checksum,
//! filesystem UUID, own logical address, generation, owner, item count,
//! level). Leaves hold items keyed by (object id, type, offset); inner
//! nodes hold (key, child address, child generation). A directory's
//! entries are its `DIR_INDEX` items; an entry that names a subvolume leads
//! to inode 256 of that subvolume's tree, found through the root tree.
//!
//! The volume shows the top-level subvolume (id 5), so every subvolume and
//! snapshot is reached through the directories it is linked in, as
//! `mount -o subvolid=5` shows them; a subvolume nested in a snapshot reads
//! as the empty directory the kernel shows there.
//!
//! File data is checked against the checksum tree as it is read, as the
//! kernel does: a sector whose checksum fails makes the read an error (the
//! kernel's EIO), never data; files without checksums (`chattr +C`) are
//! read as they are. So such data is never mapped for the API to read
//! straight from the volume ([`Backend::map_at`] says `None`), and only
//! its holes are told ([`Backend::layout_at`]).
//!
//! Owns: mapping btrfs structures to the [`Backend`] interface. Must never
//! write, never read a node whose checksum, address, level or generation
//! is not what its parent says (a node that fails is read from its other
//! copy where there is one), and never hold more than a bounded cache
//! of nodes (directories are charged to the listing budget as they are
//! listed). Not read (refused with 1005): RAID5/6 chunks, extents on
//! another device of a multi-device filesystem, encrypted extents, the
//! extent tree v2 and the raid stripe tree. A log tree (writes `fsync`ed after the last commit) is not
//! replayed: the volume's warning says so.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::le::{le16, le32, le64};
use crate::restore::disk::{read_exact_at, Disk};
use crate::restore::fs::btrfs_csum::Csum;
use crate::restore::fs::budget::Charge;
use crate::restore::fs::lzo;
use crate::restore::fs::tree::{child_bytes, link_bytes, Backend, Child};
use crate::restore::fs::{Device, EntryType, Extent, Meta};
use crate::restore::probe::{FsKind, Probe};

/// Where the (primary) superblock lies, and its size.
const SUPER_AT: u64 = 64 << 10;
const SUPER_LEN: usize = 4096;
const MAGIC: &[u8; 8] = b"_BHRfS_M";
/// A node's header; leaf items (key, data offset, data size) and inner
/// node pointers (key, child address, child generation) follow it.
const HEADER: usize = 101;
const LEAF_ITEM: usize = 25;
const KEY_PTR: usize = 33;
/// Deepest tree btrfs makes (levels 0 to 7).
const MAX_LEVEL: u8 = 7;
/// The superblock's bootstrap chunk array holds at most this many bytes.
const SYS_CHUNK_ARRAY: usize = 2048;

// item types
const INODE_ITEM: u8 = 1;
const DIR_INDEX: u8 = 96;
const EXTENT_DATA: u8 = 108;
const ROOT_ITEM: u8 = 132;
const ROOT_REF: u8 = 156;
const EXTENT_CSUM: u8 = 128;
const CHUNK_ITEM: u8 = 228;

/// Object ids: the top-level subvolume, the chunk items' owner, every
/// subvolume's root directory, and the empty directory the kernel shows
/// for a subvolume that is not linked where an entry names it.
const FS_TREE: u64 = 5;
const FIRST_CHUNK_TREE: u64 = 256;
const ROOT_DIR: u64 = 256;
const EMPTY_SUBVOL_DIR: u64 = 2;
/// The tree of data checksums, and the object id of its items (-10).
const CSUM_TREE: u64 = 7;
const EXTENT_CSUM_OBJECTID: u64 = 0u64.wrapping_sub(10);
/// An inode flag: its data has no checksums (`chattr +C`, `nodatasum`).
const INODE_NODATASUM: u64 = 1;
/// Most extents one range of a file may have: a range is at most 256 MiB
/// (the tree's map window), 65,536 extents of 4 KiB sectors; more is a
/// corrupt tree (and would hold megabytes of memory).
const MAX_RANGE_EXTENTS: usize = 1 << 17;
/// Bytes of file data read and checked at a time.
const VERIFY_WINDOW: usize = 1 << 20;

// chunk profile bits
const RAID0: u64 = 1 << 3;
const RAID10: u64 = 1 << 6;
const RAID5: u64 = 1 << 7;
const RAID6: u64 = 1 << 8;

/// Incompatible features this reader knows: mixed backrefs, a default
/// subvolume, mixed block groups, LZO and zstd compression, big metadata,
/// extended inode refs, RAID5/6 (its chunks are refused one by one), skinny
/// metadata, no holes, metadata UUID, RAID1C3/4, zoned, simple quotas.
const KNOWN_INCOMPAT: u64 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | 0x10
    | 0x20
    | 0x40
    | 0x80
    | 0x100
    | 0x200
    | 0x400
    | 0x800
    | 0x1000
    | 0x10000;
const INCOMPAT_METADATA_UUID: u64 = 0x400;

/// Bytes of verified nodes kept: a directory of 10,000 entries looks up
/// each child's inode from the tree's root, and the nodes above the leaves
/// are the same for all of them.
const NODE_CACHE_BYTES: usize = 4 << 20;
/// Largest extent btrfs compresses (128 KiB of data), with room for a
/// compressed form that came out larger than its data.
const MAX_COMPRESSED: u64 = 256 << 10;
const MAX_RAM_BYTES: u64 = 128 << 10;
/// Longest symlink target Linux allows.
const MAX_LINK: u64 = 4095;
/// Most chunks (block groups, usually 1 GiB of data each) one filesystem
/// may have here.
const MAX_CHUNKS: usize = 1 << 17;

/// A tree item's key, ordered as btrfs orders them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    objectid: u64,
    kind: u8,
    offset: u64,
}

impl Key {
    fn new(objectid: u64, kind: u8, offset: u64) -> Key {
        Key {
            objectid,
            kind,
            offset,
        }
    }

    fn parse(b: &[u8], at: usize) -> Key {
        Key::new(
            le64(b, at),
            b.get(at + 8).copied().unwrap_or(0),
            le64(b, at + 9),
        )
    }
}

/// What the superblock says.
#[derive(Debug)]
struct Super {
    csum: Csum,
    /// the UUID every node carries (the metadata UUID where it differs)
    fsid: [u8; 16],
    generation: u64,
    root: u64,
    root_level: u8,
    chunk_root: u64,
    chunk_root_level: u8,
    log_root: u64,
    sectorsize: u64,
    nodesize: u64,
    num_devices: u64,
    devid: u64,
    /// the bootstrap chunks (the system chunks that hold the chunk tree)
    sys_chunks: Vec<u8>,
    label: Option<String>,
    uuid: Option<String>,
}

fn superblock(disk: &dyn Disk) -> Result<Super> {
    let mut b = vec![0u8; SUPER_LEN];
    read_exact_at(disk, SUPER_AT, &mut b, "btrfs superblock")?;
    let bad = |why: String| Error::corrupt(format!("btrfs superblock: {why}"));
    if &b[64..72] != MAGIC {
        return Err(bad("no magic".into()));
    }
    let csum = le16(&b, 196);
    let csum = Csum::from_type(csum).ok_or_else(|| bad(format!("unknown checksum type {csum}")))?;
    if !csum.ok(&b) {
        return Err(bad("checksum mismatch".into()));
    }
    if le64(&b, 48) != SUPER_AT {
        return Err(bad("it does not lie where it says".into()));
    }
    let incompat = le64(&b, 188);
    if incompat & !KNOWN_INCOMPAT != 0 {
        return Err(Error::unsupported(format!(
            "btrfs with incompatible features {:#x} (extent tree v2, raid stripe tree or newer) \
             is not supported",
            incompat & !KNOWN_INCOMPAT
        )));
    }
    let sectorsize = u64::from(le32(&b, 144));
    let nodesize = u64::from(le32(&b, 148));
    let pow2 = |v: u64, lo: u64| v.is_power_of_two() && (lo..=65536).contains(&v);
    if !pow2(sectorsize, 4096) || !pow2(nodesize, sectorsize) {
        return Err(bad(format!(
            "sector size {sectorsize} and node size {nodesize}"
        )));
    }
    let sys_len = le32(&b, 160) as usize;
    if sys_len > SYS_CHUNK_ARRAY {
        return Err(bad(format!("bootstrap chunk array of {sys_len} bytes")));
    }
    let mut fsid = [0u8; 16];
    let at = if incompat & INCOMPAT_METADATA_UUID != 0 {
        571
    } else {
        32
    };
    fsid.copy_from_slice(&b[at..at + 16]);
    let label = {
        let raw = &b[299..555];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let s = String::from_utf8_lossy(&raw[..end]).into_owned();
        (!s.is_empty()).then_some(s)
    };
    let uuid = {
        let h: String = b[32..48].iter().map(|x| format!("{x:02x}")).collect();
        Some(format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ))
    };
    Ok(Super {
        csum,
        fsid,
        generation: le64(&b, 72),
        root: le64(&b, 80),
        root_level: b[198],
        chunk_root: le64(&b, 88),
        chunk_root_level: b[199],
        log_root: le64(&b, 96),
        sectorsize,
        nodesize,
        num_devices: le64(&b, 136),
        devid: le64(&b, 201),
        sys_chunks: b[811..811 + sys_len].to_vec(),
        label,
        uuid,
    })
}

/// What the volume's listing must say of this filesystem besides what it
/// holds.
fn warning(sb: &Super) -> Option<String> {
    let mut w = Vec::new();
    if sb.num_devices > 1 {
        w.push(format!(
            "this btrfs spans {} devices and this volume is one of them: what lies on the \
             others cannot be read",
            sb.num_devices
        ));
    }
    if sb.log_root != 0 {
        w.push(
            "this btrfs has a log tree (writes fsync'ed after its last commit, as a backup of \
             a running machine taken without a freeze has), which is not replayed: those \
             writes are missing, as after `mount -o nologreplay`"
                .to_string(),
        );
    }
    (!w.is_empty()).then(|| w.join("; "))
}

/// What the probe says of a btrfs volume.
pub fn probe(disk: Arc<dyn Disk>) -> Probe {
    match superblock(&*disk) {
        Ok(sb) => Probe {
            fs: Some(FsKind::Btrfs),
            warning: warning(&sb),
            label: sb.label,
            uuid: sb.uuid,
            unsupported: None,
        },
        Err(e) => Probe {
            fs: Some(FsKind::Btrfs),
            unsupported: Some(e),
            ..Probe::default()
        },
    }
}

/// One chunk: `length` bytes of logical addresses from `logical`, laid on
/// its stripes by its profile.
#[derive(Clone, Debug)]
struct Chunk {
    logical: u64,
    length: u64,
    stripe_len: u64,
    profile: u64,
    sub_stripes: u64,
    /// (device id, byte offset on that device)
    stripes: Vec<(u64, u64)>,
}

/// Parses the chunk item at the start of `b`; `None` when it is short or
/// makes no sense.
fn parse_chunk(logical: u64, b: &[u8]) -> Option<(Chunk, usize)> {
    let n = usize::from(le16(b, 44));
    let size = 48 + 32 * n;
    if n == 0 || b.len() < size {
        return None;
    }
    let chunk = Chunk {
        logical,
        length: le64(b, 0),
        stripe_len: le64(b, 16),
        profile: le64(b, 24),
        sub_stripes: u64::from(le16(b, 46)),
        stripes: (0..n)
            .map(|i| (le64(b, 48 + 32 * i), le64(b, 56 + 32 * i)))
            .collect(),
    };
    let striped = chunk.profile & (RAID0 | RAID10) != 0;
    let sane = chunk.length > 0
        && logical.checked_add(chunk.length).is_some()
        && (!striped || chunk.stripe_len.is_power_of_two())
        && (chunk.profile & RAID10 == 0
            || (chunk.sub_stripes > 0 && n as u64 >= chunk.sub_stripes));
    sane.then_some((chunk, size))
}

/// The volume's directories and files are nodes of a subvolume's tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    tree: u64,
    ino: u64,
}

/// An inode item as this reader needs it.
#[derive(Clone, Copy, Debug)]
struct Inode {
    size: u64,
    nlink: u32,
    uid: u32,
    gid: u32,
    mode: u32,
    rdev: u64,
    flags: u64,
    mtime: i64,
}

impl Inode {
    fn parse(b: &[u8]) -> Option<Inode> {
        (b.len() >= 160).then(|| Inode {
            size: le64(b, 16),
            nlink: le32(b, 40),
            uid: le32(b, 44),
            gid: le32(b, 48),
            mode: le32(b, 52),
            rdev: le64(b, 56),
            flags: le64(b, 64),
            mtime: le64(b, 136) as i64,
        })
    }

    fn kind(&self) -> EntryType {
        EntryType::from_unix_mode(self.mode).unwrap_or(EntryType::File)
    }

    fn meta(&self, ino: u64) -> Meta {
        let kind = self.kind();
        Meta {
            kind,
            size: if matches!(kind, EntryType::File | EntryType::Symlink) {
                self.size
            } else {
                0
            },
            mode: self.mode & 0o7777,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            inode: ino,
            nlink: u64::from(self.nlink),
            // the kernel's own dev_t: 12-bit major above a 20-bit minor
            rdev: matches!(kind, EntryType::Char | EntryType::Block).then(|| Device {
                major: ((self.rdev >> 20) & 0xFFF) as u32,
                minor: (self.rdev & 0xF_FFFF) as u32,
            }),
        }
    }
}

/// One file extent item, as far as a read needs it.
#[derive(Clone, Debug)]
enum FileExtent {
    /// data kept in the item itself, maybe compressed
    Inline { compression: u8, data: Vec<u8> },
    /// `num` bytes from byte `offset` of the (decoded) extent at logical
    /// `disk`, which takes `disk_len` bytes on disk; `disk == 0` is a hole
    Regular {
        compression: u8,
        disk: u64,
        disk_len: u64,
        ram: u64,
        offset: u64,
        num: u64,
    },
    /// allocated, never written: reads as zeros
    Prealloc { num: u64 },
}

const COMPRESS_NONE: u8 = 0;
const COMPRESS_ZLIB: u8 = 1;
const COMPRESS_LZO: u8 = 2;
const COMPRESS_ZSTD: u8 = 3;

pub struct BtrfsBackend {
    disk: Arc<dyn Disk>,
    sb: Super,
    what: String,
    /// sorted by logical address
    chunks: Vec<Chunk>,
    nodes: HashMap<u64, Rc<Vec<u8>>>,
    node_order: VecDeque<u64>,
    /// subvolume id -> (root node address, level, generation)
    trees: HashMap<u64, (u64, u8, u64)>,
    /// the last compressed extent decoded (its logical address and data):
    /// a file is read in pieces smaller than one
    decoded: Option<(u64, Rc<Vec<u8>>)>,
}

impl BtrfsBackend {
    pub fn open(disk: Arc<dyn Disk>) -> Result<BtrfsBackend> {
        let sb = superblock(&*disk)?;
        let mut b = BtrfsBackend {
            disk,
            what: "btrfs filesystem".into(),
            chunks: Vec::new(),
            nodes: HashMap::new(),
            node_order: VecDeque::new(),
            trees: HashMap::new(),
            decoded: None,
            sb,
        };
        b.load_chunks()?;
        let top = b.inode(Node {
            tree: FS_TREE,
            ino: ROOT_DIR,
        })?;
        if top.kind() != EntryType::Dir {
            return Err(b.corrupt("its root is not a directory"));
        }
        if let Some(w) = warning(&b.sb) {
            log::warn!("{w}");
        }
        Ok(b)
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> Error {
        Error::corrupt(format!("{}: corrupt: {what}", self.what))
    }

    /// Reads the bootstrap chunks from the superblock, then every chunk
    /// from the chunk tree.
    fn load_chunks(&mut self) -> Result<()> {
        let sys = std::mem::take(&mut self.sb.sys_chunks);
        let mut at = 0;
        while at < sys.len() {
            let key = Key::parse(&sys, at);
            let Some((chunk, size)) = sys
                .get(at + 17..)
                .and_then(|b| parse_chunk(key.offset, b))
                .filter(|_| key.kind == CHUNK_ITEM)
            else {
                return Err(self.corrupt("a bad chunk in the superblock's bootstrap array"));
            };
            self.chunks.push(chunk);
            at += 17 + size;
        }
        self.sort_chunks()?;
        let mut chunks = Vec::new();
        let root = (self.sb.chunk_root, self.sb.chunk_root_level, None);
        let lo = Key::new(FIRST_CHUNK_TREE, CHUNK_ITEM, 0);
        let hi = Key::new(FIRST_CHUNK_TREE, CHUNK_ITEM, u64::MAX);
        let mut bad = None;
        self.scan(root, lo, hi, false, &mut |key, item| {
            match parse_chunk(key.offset, item) {
                Some((chunk, _)) if chunks.len() < MAX_CHUNKS => chunks.push(chunk),
                Some(_) => bad = Some("more chunks than this reader holds"),
                None => bad = Some("a bad chunk item"),
            }
            Ok(bad.is_none())
        })?;
        if let Some(why) = bad {
            return Err(self.corrupt(why));
        }
        self.chunks = chunks;
        self.sort_chunks()
    }

    fn sort_chunks(&mut self) -> Result<()> {
        self.chunks.sort_by_key(|c| c.logical);
        for w in self.chunks.windows(2) {
            if w[0].logical + w[0].length > w[1].logical {
                return Err(self.corrupt(format!(
                    "chunks at {} and {} overlap",
                    w[0].logical, w[1].logical
                )));
            }
        }
        Ok(())
    }

    /// Where the `len` bytes at logical address `logical` lie on this
    /// volume, as (byte offset, length) pieces in order.
    fn physical(&self, logical: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.copy_at(logical, len, 0)
    }

    /// [`Self::physical`] for the `copy`th copy on this volume of mirrored
    /// chunks (DUP keeps two copies on one device); past the last one, an
    /// error.
    fn copy_at(&self, logical: u64, len: u64, copy: usize) -> Result<Vec<(u64, u64)>> {
        let i = self.chunks.partition_point(|c| c.logical <= logical);
        let chunk = i
            .checked_sub(1)
            .map(|i| &self.chunks[i])
            .filter(|c| logical.saturating_add(len) <= c.logical + c.length)
            .ok_or_else(|| {
                self.corrupt(format!("logical bytes {logical} (+{len}) lie in no chunk"))
            })?;
        if chunk.profile & (RAID5 | RAID6) != 0 {
            return Err(Error::unsupported(format!(
                "{}: RAID5/6 chunks are not read",
                self.what
            )));
        }
        let ours = |&(dev, _): &(u64, u64)| dev == self.sb.devid;
        let elsewhere = || {
            Error::unsupported(format!(
                "{}: logical bytes {logical} lie on another device of this filesystem",
                self.what
            ))
        };
        let mut out = Vec::new();
        let mut off = logical - chunk.logical;
        let mut left = len;
        while left > 0 {
            let (at, n) = if chunk.profile & (RAID0 | RAID10) == 0 {
                // single, DUP, RAID1, RAID1C3/4: every stripe is a whole copy
                let &(_, start) = chunk
                    .stripes
                    .iter()
                    .filter(|s| ours(s))
                    .nth(copy)
                    .ok_or_else(elsewhere)?;
                (start.checked_add(off), left)
            } else {
                let sl = chunk.stripe_len;
                let (nr, within) = (off / sl, off % sl);
                let n = left.min(sl - within);
                let stripes = chunk.stripes.len() as u64;
                let (set, row, width) = if chunk.profile & RAID10 != 0 {
                    let sets = stripes / chunk.sub_stripes;
                    (nr % sets * chunk.sub_stripes, nr / sets, chunk.sub_stripes)
                } else {
                    (nr % stripes, nr / stripes, 1)
                };
                let copies = &chunk.stripes[set as usize..(set + width) as usize];
                let &(_, start) = copies
                    .iter()
                    .filter(|s| ours(s))
                    .nth(copy)
                    .ok_or_else(elsewhere)?;
                let at = row
                    .checked_mul(sl)
                    .and_then(|r| r.checked_add(within))
                    .and_then(|r| r.checked_add(start));
                (at, n)
            };
            let at = at
                .filter(|a| a.checked_add(n).is_some_and(|end| end <= self.disk.size()))
                .ok_or_else(|| {
                    self.corrupt(format!(
                        "logical bytes {logical} (+{len}) lie past the volume's end"
                    ))
                })?;
            out.push((at, n));
            off += n;
            left -= n;
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes at logical address `logical`.
    fn read_logical(&self, logical: u64, buf: &mut [u8]) -> Result<()> {
        self.read_copy(logical, buf, 0)
    }

    /// Reads `buf.len()` bytes at logical address `logical` from its
    /// `copy`th copy on this volume.
    fn read_copy(&self, logical: u64, buf: &mut [u8], copy: usize) -> Result<()> {
        let mut done = 0usize;
        for (at, n) in self.copy_at(logical, buf.len() as u64, copy)? {
            let n = n as usize;
            read_exact_at(&*self.disk, at, &mut buf[done..done + n], &self.what)?;
            done += n;
        }
        Ok(())
    }

    /// The node at `logical`, checked: its checksum, its address, the
    /// filesystem it belongs to, its `level`, and the `generation` its
    /// parent gives it.
    fn node(&mut self, logical: u64, level: u8, generation: Option<u64>) -> Result<Rc<Vec<u8>>> {
        if let Some(n) = self.nodes.get(&logical) {
            let n = n.clone();
            return self.check_node(logical, &n, level, generation).map(|()| n);
        }
        // a copy that fails its checks gives way to the next one (DUP and
        // RAID1 metadata), as the kernel's reads do
        let mut first_error = None;
        let mut copy = 0;
        let n = loop {
            let mut b = vec![0u8; self.sb.nodesize as usize];
            let read = match self.read_copy(logical, &mut b, copy) {
                Err(e) if copy > 0 => return Err(first_error.unwrap_or(e)),
                read => read,
            };
            let checked = read.and_then(|()| {
                if !self.sb.csum.ok(&b) {
                    return Err(self.corrupt(format!("tree node at {logical}: checksum mismatch")));
                }
                if le64(&b, 48) != logical || b[32..48] != self.sb.fsid {
                    return Err(
                        self.corrupt(format!("tree node at {logical}: it belongs elsewhere"))
                    );
                }
                self.check_node(logical, &b, level, generation)
            });
            match checked {
                Ok(()) => break Rc::new(b),
                Err(e) => {
                    first_error.get_or_insert(e);
                    copy += 1;
                }
            }
        };
        let keep = (NODE_CACHE_BYTES / self.sb.nodesize as usize).max(8);
        while self.node_order.len() >= keep {
            if let Some(old) = self.node_order.pop_front() {
                self.nodes.remove(&old);
            }
        }
        self.nodes.insert(logical, n.clone());
        self.node_order.push_back(logical);
        Ok(n)
    }

    fn check_node(&self, logical: u64, b: &[u8], level: u8, generation: Option<u64>) -> Result<()> {
        let items = le32(b, 96) as usize;
        let each = if level == 0 { LEAF_ITEM } else { KEY_PTR };
        if b[100] != level {
            return Err(self.corrupt(format!(
                "tree node at {logical} is at level {}, its parent says {level}",
                b[100]
            )));
        }
        if generation.is_some_and(|g| g != le64(b, 80)) {
            return Err(self.corrupt(format!(
                "tree node at {logical} is of generation {}, its parent says {}",
                le64(b, 80),
                generation.unwrap_or(0)
            )));
        }
        if HEADER + items * each > b.len() {
            return Err(self.corrupt(format!("tree node at {logical} holds too many items")));
        }
        Ok(())
    }

    /// Calls `f` with the key and data of every item whose key lies in
    /// `lo..=hi`, in key order, while it returns true. With `from_below`,
    /// the last item before `lo` comes first (an extent that starts before
    /// a read and reaches into it). `root` is (address, level, generation).
    fn scan(
        &mut self,
        root: (u64, u8, Option<u64>),
        lo: Key,
        hi: Key,
        from_below: bool,
        f: &mut dyn FnMut(Key, &[u8]) -> Result<bool>,
    ) -> Result<()> {
        if root.1 > MAX_LEVEL {
            return Err(self.corrupt(format!("a tree of level {}", root.1)));
        }
        self.scan_node(root, lo, hi, from_below, f).map(|_| ())
    }

    /// [`Self::scan`] under one node; false once `f` or the range is done.
    fn scan_node(
        &mut self,
        (at, level, generation): (u64, u8, Option<u64>),
        lo: Key,
        hi: Key,
        from_below: bool,
        f: &mut dyn FnMut(Key, &[u8]) -> Result<bool>,
    ) -> Result<bool> {
        let node = self.node(at, level, generation)?;
        let items = le32(&node, 96) as usize;
        if level == 0 {
            let key = |i: usize| Key::parse(&node, HEADER + i * LEAF_ITEM);
            let mut i = (0..items).position(|i| key(i) >= lo).unwrap_or(items);
            if from_below && i > 0 && (i == items || key(i) > lo) {
                i -= 1;
            }
            for i in i..items {
                let k = key(i);
                if k > hi {
                    return Ok(false);
                }
                let ptr = HEADER + i * LEAF_ITEM;
                let (off, size) = (
                    le32(&node, ptr + 17) as usize,
                    le32(&node, ptr + 21) as usize,
                );
                let data = HEADER
                    .checked_add(off)
                    .and_then(|s| Some(s..s.checked_add(size)?))
                    .and_then(|r| node.get(r))
                    .ok_or_else(|| {
                        self.corrupt(format!("tree node at {at}: an item outside it"))
                    })?;
                if !f(k, data)? {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        let ptr = |i: usize| HEADER + i * KEY_PTR;
        let first = (0..items)
            .rposition(|i| Key::parse(&node, ptr(i)) <= lo)
            .unwrap_or(0);
        for i in first..items {
            if Key::parse(&node, ptr(i)) > hi {
                return Ok(false);
            }
            let child = (
                le64(&node, ptr(i) + 17),
                level - 1,
                Some(le64(&node, ptr(i) + 25)),
            );
            if !self.scan_node(child, lo, hi, from_below && i == first, f)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The first item of key `objectid`/`kind` in `tree`.
    fn item(&mut self, tree: u64, objectid: u64, kind: u8) -> Result<Option<(Key, Vec<u8>)>> {
        let root = self.tree(tree)?;
        let mut found = None;
        let lo = Key::new(objectid, kind, 0);
        let hi = Key::new(objectid, kind, u64::MAX);
        self.scan(root, lo, hi, false, &mut |k, d| {
            found = Some((k, d.to_vec()));
            Ok(false)
        })?;
        Ok(found)
    }

    /// The root node (address, level, generation) of subvolume `id`.
    fn tree(&mut self, id: u64) -> Result<(u64, u8, Option<u64>)> {
        if let Some(&(at, level, generation)) = self.trees.get(&id) {
            return Ok((at, level, Some(generation)));
        }
        let root = (self.sb.root, self.sb.root_level, Some(self.sb.generation));
        let mut found = None;
        let lo = Key::new(id, ROOT_ITEM, 0);
        let hi = Key::new(id, ROOT_ITEM, u64::MAX);
        self.scan(root, lo, hi, false, &mut |_, d| {
            // a snapshot's item is keyed by its creation transaction: the
            // last one is the tree's
            found = Some(d.to_vec());
            Ok(true)
        })?;
        let item =
            found.ok_or_else(|| Error::not_found(format!("{}: no subvolume {id}", self.what)))?;
        if item.len() < 239 {
            return Err(self.corrupt(format!("subvolume {id}: short root item")));
        }
        let (at, level, generation) = (le64(&item, 176), item[238], le64(&item, 160));
        if level > MAX_LEVEL {
            return Err(self.corrupt(format!("subvolume {id}: a tree of level {level}")));
        }
        if self.trees.len() >= 4096 {
            self.trees.clear();
        }
        self.trees.insert(id, (at, level, generation));
        Ok((at, level, Some(generation)))
    }

    fn inode(&mut self, node: Node) -> Result<Inode> {
        if node.ino == EMPTY_SUBVOL_DIR {
            return Ok(Inode {
                size: 0,
                nlink: 1,
                uid: 0,
                gid: 0,
                mode: 0o040755,
                rdev: 0,
                flags: 0,
                mtime: 0,
            });
        }
        let (_, item) = self.item(node.tree, node.ino, INODE_ITEM)?.ok_or_else(|| {
            self.corrupt(format!("subvolume {}: no inode {}", node.tree, node.ino))
        })?;
        Inode::parse(&item).ok_or_else(|| {
            self.corrupt(format!(
                "subvolume {}: inode {} is short",
                node.tree, node.ino
            ))
        })
    }

    /// Whether subvolume `child` is linked as `name` in directory `dir` of
    /// subvolume `parent` (its root backref says so): a snapshot keeps the
    /// entries of the subvolumes nested in what it copied, which lead
    /// nowhere there.
    fn linked(&mut self, parent: u64, dir: u64, name: &[u8], child: u64) -> Result<bool> {
        let root = (self.sb.root, self.sb.root_level, Some(self.sb.generation));
        let mut linked = false;
        let key = Key::new(parent, ROOT_REF, child);
        self.scan(root, key, key, false, &mut |_, d| {
            let len = usize::from(le16(d, 16));
            linked = le64(d, 0) == dir && d.get(18..18 + len) == Some(name);
            Ok(false)
        })?;
        Ok(linked)
    }

    /// The entries of directory `dir`: (name, node).
    fn entries(&mut self, dir: Node, charge: &mut Charge) -> Result<Vec<(Vec<u8>, Node)>> {
        if dir.ino == EMPTY_SUBVOL_DIR {
            return Ok(Vec::new());
        }
        let root = self.tree(dir.tree)?;
        let mut out = Vec::new();
        let mut failed = None;
        let lo = Key::new(dir.ino, DIR_INDEX, 0);
        let hi = Key::new(dir.ino, DIR_INDEX, u64::MAX);
        self.scan(root, lo, hi, false, &mut |_, d| {
            let loc = Key::parse(d, 0);
            let len = usize::from(le16(d, 27));
            let Some(name) = d.get(30..30 + len).filter(|n| !n.is_empty()) else {
                failed = Some(format!("directory {}: a bad entry", dir.ino));
                return Ok(false);
            };
            charge.add(child_bytes::<Node>(name.len(), 0))?;
            out.push((name.to_vec(), loc));
            Ok(true)
        })?;
        if let Some(why) = failed {
            return Err(self.corrupt(format!("subvolume {}: {why}", dir.tree)));
        }
        let mut nodes = Vec::with_capacity(out.len());
        for (name, loc) in out {
            let node = if loc.kind == ROOT_ITEM {
                if self.linked(dir.tree, dir.ino, &name, loc.objectid)? {
                    Node {
                        tree: loc.objectid,
                        ino: ROOT_DIR,
                    }
                } else {
                    Node {
                        tree: dir.tree,
                        ino: EMPTY_SUBVOL_DIR,
                    }
                }
            } else {
                Node {
                    tree: dir.tree,
                    ino: loc.objectid,
                }
            };
            nodes.push((name, node));
        }
        Ok(nodes)
    }

    /// The extents of `node` that reach into `offset..end`, with the file
    /// offset each starts at, in file order.
    fn extents(&mut self, node: Node, offset: u64, end: u64) -> Result<Vec<(u64, FileExtent)>> {
        let root = self.tree(node.tree)?;
        let mut out = Vec::new();
        let mut bad = None;
        let lo = Key::new(node.ino, EXTENT_DATA, offset);
        let hi = Key::new(node.ino, EXTENT_DATA, end.saturating_sub(1));
        self.scan(root, lo, hi, true, &mut |k, d| {
            if k.objectid != node.ino || k.kind != EXTENT_DATA {
                return Ok(true);
            }
            let (compression, encryption, encoding, kind) =
                (d.get(16), d.get(17), le16(d, 18), d.get(20));
            let (Some(&compression), Some(&0), 0, Some(&kind)) =
                (compression, encryption, encoding, kind)
            else {
                bad = Some(if d.len() < 21 {
                    "a short extent item"
                } else {
                    "an encrypted or encoded extent"
                });
                return Ok(false);
            };
            let e = match kind {
                0 => FileExtent::Inline {
                    compression,
                    data: d[21..].to_vec(),
                },
                1 | 2 if d.len() >= 53 => {
                    let num = le64(d, 45);
                    if kind == 2 {
                        FileExtent::Prealloc { num }
                    } else {
                        FileExtent::Regular {
                            compression,
                            disk: le64(d, 21),
                            disk_len: le64(d, 29),
                            ram: le64(d, 8),
                            offset: le64(d, 37),
                            num,
                        }
                    }
                }
                _ => {
                    bad = Some("an extent item of unknown type");
                    return Ok(false);
                }
            };
            if out.len() == MAX_RANGE_EXTENTS {
                bad = Some("more extents in one range than its sectors");
                return Ok(false);
            }
            out.push((k.offset, e));
            Ok(true)
        })?;
        if let Some(why) = bad {
            let e = self.corrupt(format!("subvolume {} inode {}: {why}", node.tree, node.ino));
            return Err(if why.starts_with("an encrypted") {
                Error::unsupported(e.message)
            } else {
                e
            });
        }
        Ok(out)
    }

    /// The decoded bytes of a compressed extent stored as `data`, at most
    /// `ram` of them.
    fn decompress(&self, compression: u8, data: &[u8], ram: u64) -> Result<Vec<u8>> {
        let ram = ram.min(MAX_RAM_BYTES) as usize;
        let bad = |why: String| self.corrupt(format!("a compressed extent: {why}"));
        match compression {
            COMPRESS_ZSTD => {
                // the frame is followed by the zeros that pad it to a sector
                let len = zstd::zstd_safe::find_frame_compressed_size(data)
                    .map_err(|c| bad(zstd::zstd_safe::get_error_name(c).to_string()))?;
                let mut out = Vec::with_capacity(ram);
                zstd::bulk::Decompressor::new()
                    .and_then(|mut d| d.decompress_to_buffer(&data[..len], &mut out))
                    .map_err(|e| bad(e.to_string()))?;
                Ok(out)
            }
            COMPRESS_ZLIB => miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(data, ram)
                .map_err(|e| bad(format!("{:?}", e.status))),
            COMPRESS_LZO => lzo::decompress_extent(data, self.sb.sectorsize as usize, ram)
                .map_err(|why| bad(why.to_string())),
            c => Err(bad(format!("unknown compression {c}"))),
        }
    }

    /// Fills `buf` with the file's bytes from `offset` (within its size);
    /// with `checked`, data whose checksums fail is an error, never data.
    fn read_range(&mut self, node: Node, checked: bool, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        buf.fill(0);
        for (start, e) in self.extents(node, offset, end)? {
            match e {
                FileExtent::Prealloc { .. } => {}
                FileExtent::Regular { disk: 0, .. } => {}
                FileExtent::Inline { compression, data } => {
                    let data = if compression == COMPRESS_NONE {
                        data
                    } else {
                        self.decompress(compression, &data, MAX_RAM_BYTES)?
                    };
                    copy_part(buf, offset, start, &data);
                }
                FileExtent::Regular {
                    compression,
                    disk,
                    disk_len,
                    ram,
                    offset: within,
                    num,
                } => {
                    let from = offset.max(start);
                    let to = end.min(start.saturating_add(num));
                    if from >= to {
                        continue;
                    }
                    let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                    let at = within.saturating_add(from - start);
                    if compression == COMPRESS_NONE {
                        let logical = disk
                            .checked_add(at)
                            .ok_or_else(|| self.corrupt("an extent past the address space"))?;
                        if checked {
                            self.read_checked(logical, dst)?;
                        } else {
                            self.read_logical(logical, dst)?;
                        }
                        continue;
                    }
                    let data = self.decoded_extent(compression, disk, disk_len, ram, checked)?;
                    let src = data
                        .get(at as usize..at as usize + dst.len())
                        .ok_or_else(|| {
                            self.corrupt(format!(
                                "subvolume {} inode {}: a compressed extent shorter than its \
                                 file extent",
                                node.tree, node.ino
                            ))
                        })?;
                    dst.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// The decoded data of the compressed extent at logical `disk`.
    fn decoded_extent(
        &mut self,
        compression: u8,
        disk: u64,
        disk_len: u64,
        ram: u64,
        checked: bool,
    ) -> Result<Rc<Vec<u8>>> {
        if let Some((at, data)) = &self.decoded {
            if *at == disk {
                return Ok(data.clone());
            }
        }
        if disk_len == 0 || disk_len > MAX_COMPRESSED || ram > MAX_RAM_BYTES {
            return Err(self.corrupt(format!(
                "a compressed extent of {disk_len} bytes holding {ram}"
            )));
        }
        let mut raw = vec![0u8; disk_len as usize];
        self.read_logical(disk, &mut raw)?;
        if checked {
            self.verify(disk, &raw)?;
        }
        let data = Rc::new(self.decompress(compression, &raw, ram)?);
        self.decoded = Some((disk, data.clone()));
        Ok(data)
    }

    /// Reads `buf.len()` bytes of file data at logical address `logical`,
    /// a window of whole sectors at a time, each checked against its
    /// checksum.
    fn read_checked(&mut self, logical: u64, buf: &mut [u8]) -> Result<()> {
        let sector = self.sb.sectorsize;
        let mut window = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let at = logical + done as u64;
            let start = at - at % sector;
            let n = (buf.len() - done).min(VERIFY_WINDOW);
            let end = (at + n as u64).div_ceil(sector) * sector;
            window.resize((end - start) as usize, 0);
            self.read_logical(start, &mut window)?;
            self.verify(start, &window)?;
            let skip = (at - start) as usize;
            buf[done..done + n].copy_from_slice(&window[skip..skip + n]);
            done += n;
        }
        Ok(())
    }

    /// Checks the whole sectors `data` read at logical address `logical`
    /// against the checksum tree, as the kernel's reads do. A sector the
    /// tree has no checksum for is taken as it is.
    fn verify(&mut self, logical: u64, data: &[u8]) -> Result<()> {
        let (sector, size) = (self.sb.sectorsize, self.sb.csum.size());
        let end = logical + data.len() as u64;
        let root = self.tree(CSUM_TREE)?;
        let csum = self.sb.csum;
        let mut bad = None;
        let lo = Key::new(EXTENT_CSUM_OBJECTID, EXTENT_CSUM, logical);
        let hi = Key::new(EXTENT_CSUM_OBJECTID, EXTENT_CSUM, end - 1);
        self.scan(root, lo, hi, true, &mut |k, sums| {
            if k.objectid != EXTENT_CSUM_OBJECTID || k.kind != EXTENT_CSUM {
                return Ok(true);
            }
            for (i, want) in sums.chunks_exact(size).enumerate() {
                let Some(at) = (i as u64)
                    .checked_mul(sector)
                    .and_then(|o| o.checked_add(k.offset))
                    .filter(|&at| at >= logical && at < end)
                else {
                    continue;
                };
                let from = (at - logical) as usize;
                let Some(bytes) = data.get(from..from + sector as usize) else {
                    continue;
                };
                if !csum.matches(bytes, want) {
                    bad = Some(at);
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        match bad {
            Some(at) => {
                Err(self.corrupt(format!("the data at logical byte {at} fails its checksum")))
            }
            None => Ok(()),
        }
    }

    fn link_target(&mut self, node: Node, ino: &Inode) -> Result<Vec<u8>> {
        if ino.size == 0 || ino.size > MAX_LINK {
            return Err(self.corrupt(format!(
                "symlink inode {} has a target of {} bytes",
                node.ino, ino.size
            )));
        }
        let mut t = vec![0u8; ino.size as usize];
        self.read_range(node, false, 0, &mut t)?;
        Ok(t)
    }
}

/// Copies the part of `data` (file bytes from `start`) that falls in
/// `buf` (file bytes from `offset`).
fn copy_part(buf: &mut [u8], offset: u64, start: u64, data: &[u8]) {
    let end = offset + buf.len() as u64;
    let from = offset.max(start);
    let to = end.min(start.saturating_add(data.len() as u64));
    if from < to {
        buf[(from - offset) as usize..(to - offset) as usize]
            .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
    }
}

impl Backend for BtrfsBackend {
    type Node = Node;

    fn root(&mut self) -> Result<Child<Node>> {
        let node = Node {
            tree: FS_TREE,
            ino: ROOT_DIR,
        };
        let ino = self.inode(node)?;
        Ok(Child {
            name: Vec::new(),
            node,
            meta: ino.meta(node.ino),
            link: None,
            damaged: None,
        })
    }

    fn read_dir(
        &mut self,
        dir: &Node,
        _path: &[u8],
        charge: &mut Charge,
    ) -> Result<Vec<Child<Node>>> {
        let this = self.inode(*dir)?;
        if this.kind() != EntryType::Dir {
            return Err(self.corrupt(format!("inode {} is not a directory", dir.ino)));
        }
        let mut out = Vec::new();
        for (name, node) in self.entries(*dir, charge)? {
            let ino = match self.inode(node) {
                Ok(ino) if node.ino == EMPTY_SUBVOL_DIR => Inode {
                    mtime: this.mtime,
                    ..ino
                },
                Ok(ino) => ino,
                Err(e) => {
                    out.push(Child::damaged(name, node, node.ino, e));
                    continue;
                }
            };
            let mut link = None;
            if ino.kind() == EntryType::Symlink {
                match self.link_target(node, &ino) {
                    Ok(t) => {
                        charge.add(link_bytes(t.len()))?;
                        link = Some(t);
                    }
                    Err(e) => {
                        out.push(Child::damaged(name, node, node.ino, e));
                        continue;
                    }
                }
            }
            out.push(Child {
                name,
                node,
                meta: ino.meta(node.ino),
                link,
                damaged: None,
            });
        }
        Ok(out)
    }

    fn read_at(&mut self, node: &Node, _path: &[u8], offset: u64, buf: &mut [u8]) -> Result<usize> {
        let ino = self.inode(*node)?;
        let n = ino.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let checked = ino.flags & INODE_NODATASUM == 0;
        self.read_range(*node, checked, offset, &mut buf[..n])?;
        Ok(n)
    }

    fn map_at(&mut self, node: &Node, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        // data with checksums is read through `read_at`, which checks them
        let checked = self.inode(*node)?.flags & INODE_NODATASUM == 0;
        let map = self.layout_at(node, offset, len)?;
        let data = |m: &Vec<Extent>| m.iter().any(|e| matches!(e, Extent::Disk { .. }));
        Ok(map.filter(|m| !(checked && data(m))))
    }

    fn layout_at(&mut self, node: &Node, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = offset;
        for (start, e) in self.extents(*node, offset, end)? {
            let num = match &e {
                FileExtent::Inline { .. } => return Ok(None),
                FileExtent::Regular {
                    compression, disk, ..
                } if *compression != COMPRESS_NONE && *disk != 0 => return Ok(None),
                FileExtent::Regular { num, .. } | FileExtent::Prealloc { num } => *num,
            };
            let from = pos.max(start);
            let to = end.min(start.saturating_add(num));
            if from >= to {
                continue;
            }
            if from > pos {
                out.push(Extent::Zero { len: from - pos });
            }
            match e {
                FileExtent::Regular {
                    disk,
                    offset: within,
                    ..
                } if disk != 0 => {
                    let logical = disk
                        .checked_add(within)
                        .and_then(|l| l.checked_add(from - start))
                        .ok_or_else(|| self.corrupt("an extent past the address space"))?;
                    for (at, n) in self.physical(logical, to - from)? {
                        out.push(Extent::Disk { offset: at, len: n });
                    }
                }
                _ => out.push(Extent::Zero { len: to - from }),
            }
            pos = to;
        }
        if pos < end {
            out.push(Extent::Zero { len: end - pos });
        }
        Ok(Some(out))
    }

    fn inode_scope(&self, node: &Node) -> Option<u64> {
        (node.ino != EMPTY_SUBVOL_DIR).then_some(node.tree)
    }

    fn what(&self) -> &str {
        &self.what
    }
}
