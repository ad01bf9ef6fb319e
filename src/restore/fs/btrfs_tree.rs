//! The trees of a btrfs volume and the address space under them: the
//! superblock, the chunk map that lays the filesystem's logical addresses
//! onto the device (single, DUP, RAID1/1C3/1C4, RAID0 and RAID10 chunks),
//! verified tree nodes, and the search of a tree by key.
//!
//! On disk (btrfs's `btrfs_tree.h`; integers little-endian): the superblock
//! at byte 64 KiB, `_BHRfS_M` at its byte 64, with the chunks that hold the
//! chunk tree in its bootstrap array; every tree is a B-tree of `nodesize`
//! nodes, each with a 101-byte header (checksum, filesystem UUID, own
//! logical address, generation, owner, item count, level). Leaves hold
//! items keyed by (object id, type, offset); inner nodes hold (key, child
//! address, child generation).
//!
//! Owns: reading nodes and finding items. Must never write, never read a
//! node whose checksum, address, level or generation is not what its
//! parent says (a node that fails is read from its other copy where there
//! is one), never keep more than a bounded cache of nodes, and never know
//! what the items mean (that is [`super::btrfs`]'s).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::le::{le16, le32, le64};
use crate::restore::disk::{read_exact_at, Disk};
use crate::restore::fs::btrfs_csum::Csum;
use crate::restore::probe::uuid_of;

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

/// Item types this module reads: a subvolume's root, a chunk.
pub(super) const ROOT_ITEM: u8 = 132;
const CHUNK_ITEM: u8 = 228;

/// The object id of every chunk item.
const FIRST_CHUNK_TREE: u64 = 256;

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

/// Most chunks (block groups, usually 1 GiB of data each) one filesystem
/// may have here.
const MAX_CHUNKS: usize = 1 << 17;

/// A tree item's key, ordered as btrfs orders them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    pub objectid: u64,
    pub kind: u8,
    pub offset: u64,
}

impl Key {
    pub fn new(objectid: u64, kind: u8, offset: u64) -> Key {
        Key {
            objectid,
            kind,
            offset,
        }
    }

    pub fn parse(b: &[u8], at: usize) -> Key {
        Key::new(
            le64(b, at),
            b.get(at + 8).copied().unwrap_or(0),
            le64(b, at + 9),
        )
    }
}

/// What the superblock says.
#[derive(Debug)]
pub(super) struct Super {
    pub csum: Csum,
    /// the UUID every node carries (the metadata UUID where it differs)
    pub fsid: [u8; 16],
    pub generation: u64,
    pub root: u64,
    pub root_level: u8,
    pub chunk_root: u64,
    pub chunk_root_level: u8,
    pub log_root: u64,
    pub sectorsize: u64,
    pub nodesize: u64,
    pub num_devices: u64,
    pub devid: u64,
    /// the bootstrap chunks (the system chunks that hold the chunk tree)
    pub sys_chunks: Vec<u8>,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

pub(super) fn superblock(disk: &dyn Disk) -> Result<Super> {
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
    let uuid = uuid_of(&b[32..48]);
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

/// The volume's trees: what reads them, and what it keeps.
pub(super) struct Trees {
    disk: Arc<dyn Disk>,
    pub sb: Super,
    /// names the filesystem in error messages
    pub what: String,
    /// sorted by logical address
    chunks: Vec<Chunk>,
    nodes: HashMap<u64, Rc<Vec<u8>>>,
    node_order: VecDeque<u64>,
    /// subvolume id -> (root node address, level, generation)
    roots: HashMap<u64, (u64, u8, u64)>,
}

/// A tree's root: (node address, level, the generation it must have).
pub(super) type Root = (u64, u8, Option<u64>);

impl Trees {
    /// Reads the superblock and the chunk tree.
    pub fn open(disk: Arc<dyn Disk>) -> Result<Trees> {
        let sb = superblock(&*disk)?;
        let mut t = Trees {
            disk,
            sb,
            what: "btrfs filesystem".into(),
            chunks: Vec::new(),
            nodes: HashMap::new(),
            node_order: VecDeque::new(),
            roots: HashMap::new(),
        };
        t.load_chunks()?;
        Ok(t)
    }

    pub fn corrupt(&self, what: impl std::fmt::Display) -> Error {
        Error::corrupt(format!("{}: corrupt: {what}", self.what))
    }

    /// Whether every chunk has all of its bytes on this device (for
    /// mirrored chunks, one whole copy): whether a filesystem of several
    /// devices can be read whole from this one.
    pub fn whole_here(&self) -> bool {
        let ours = |s: &(u64, u64)| s.0 == self.sb.devid;
        self.chunks.iter().all(|c| {
            if c.profile & (RAID5 | RAID6) != 0 {
                false
            } else if c.profile & RAID10 != 0 {
                c.stripes
                    .chunks(c.sub_stripes.max(1) as usize)
                    .all(|set| set.iter().any(ours))
            } else if c.profile & RAID0 != 0 {
                c.stripes.iter().all(ours)
            } else {
                c.stripes.iter().any(ours)
            }
        })
    }

    /// The root tree's root (where the subvolumes' roots are found).
    pub fn root_tree(&self) -> Root {
        (self.sb.root, self.sb.root_level, Some(self.sb.generation))
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
    pub fn physical(&self, logical: u64, len: u64) -> Result<Vec<(u64, u64)>> {
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
    pub fn read_logical(&self, logical: u64, buf: &mut [u8]) -> Result<()> {
        self.read_copy(logical, buf, 0)
    }

    /// Reads `buf.len()` bytes at logical address `logical` from its
    /// `copy`th copy on this volume.
    pub fn read_copy(&self, logical: u64, buf: &mut [u8], copy: usize) -> Result<()> {
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
    pub fn scan(
        &mut self,
        root: Root,
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
        (at, level, generation): Root,
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
    pub fn item(&mut self, tree: u64, objectid: u64, kind: u8) -> Result<Option<(Key, Vec<u8>)>> {
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
    pub fn tree(&mut self, id: u64) -> Result<Root> {
        if let Some(&(at, level, generation)) = self.roots.get(&id) {
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
        if self.roots.len() >= 4096 {
            self.roots.clear();
        }
        self.roots.insert(id, (at, level, generation));
        Ok((at, level, Some(generation)))
    }
}
