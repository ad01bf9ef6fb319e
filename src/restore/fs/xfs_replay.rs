//! Recovery of an XFS log in memory, without writing anything.
//!
//! A filesystem copied while mounted (a backup of a running machine taken
//! without a freeze) keeps its newest metadata only in the log: XFS writes
//! a change to the log first and to its home block up to 30 s later, so a
//! directory made just before the backup may not be on disk at all.
//! [`replay`] does what mounting would: it walks the log's records from
//! tail to head, assembles the transactions they carry and, for each one
//! committed, applies its items to the blocks they name. The result is a
//! [`Replayed`] disk: the volume with the changed 512-byte sectors laid
//! over it, which the reader then reads as a clean filesystem.
//!
//! The rules are the kernel's (fs/xfs/xfs_log_recover.c and the
//! `*_item_recover.c` files), in its two passes: the first counts the
//! cancellations of freed buffers; the second replays each committed
//! transaction's items in the kernel's order (buffers and inode-chunk
//! creations, then inodes; within each, by their place on disk, which
//! changes nothing as a transaction names each block once; a buffer or
//! inode whose buffer is cancelled later in the log is not replayed, nor a
//! v5 buffer or inode whose own LSN is newer than the transaction). Buffer items copy their logged
//! 128-byte chunks; inode items turn the logged core (in the writing
//! machine's byte order: little-endian here) into the on-disk inode and
//! copy its forks (a B+tree root converted to its on-disk form); inode
//! creations initialise the chunk's inodes. v5 blocks get the
//! transaction's LSN and their CRC made right, as the kernel's write
//! verifiers do. Not replayed, as they change nothing this reader shows:
//! the unlinked-list updates of inode buffers, quota items, and intents
//! (freeing extents, reverse-map and reference-count updates; an
//! unfinished remap of a file's extents is the one that would show, and
//! is left as the log leaves it). An extent swap (`xfs_fsr`) that moved a
//! B+tree of extents to another inode has its blocks' owner changed, as
//! recovery does (the running kernel writes them unlogged). A record whose
//! CRC fails (a write torn by the copy), or that is missing or not the one
//! its place and cycle say (the copy caught a later log write but not an
//! earlier one), ends the log there; its transaction and later ones are not
//! replayed.
//!
//! Owns: XFS's log items and the bounds of a replay. Must never write to
//! the volume, never hold more than `memory_limit()` bytes of item formats
//! or (again) of replayed sectors, and never touch a block outside the
//! filesystem.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::le::{be16, be32, be64, le16, le32, le64};
use crate::restore::disk::{read_exact_at, Disk};
use crate::restore::fs::ext_raw::crc32c;
use crate::restore::fs::xfs_log::{
    Log, Op, CLIENT_LOG, CLIENT_TRANSACTION, COMMIT_TRANS, CONTINUE_TRANS, END_TRANS, ITEM_BUF,
    START_TRANS, TRANS_MAGIC, UNMOUNT_TRANS, WAS_CONT_TRANS,
};

/// Largest record read (a version 2 log's largest buffer).
const MAX_RECORD: usize = 256 << 10;
/// Largest buffer an item may name (512-byte blocks): a 64 KiB directory
/// block or inode cluster.
const MAX_BUFFER_BLOCKS: u64 = 128;
/// Most regions one item may have (the kernel's bound: half the 128-byte
/// chunks of the largest block, and its format).
const MAX_REGIONS: u16 = (65536 / 128 / 2 + 1) as u16;

/// Log item types (besides buffers', which `xfs_log` names).
const ITEM_INODE: u16 = 0x123b;
const ITEM_ICREATE: u16 = 0x123f;
/// Item types that change nothing this reader shows: extent-free intents
/// and done items (0x1236-0x1238, with the unlinked-list item), quota
/// items (0x123d-0x123e), and the reverse-map, reference-count, remap,
/// attribute and exchange intents and their done items (0x1240-0x124f).
fn ignored(kind: u16) -> bool {
    matches!(kind, 0x1236..=0x1238 | 0x123d..=0x123e | 0x1240..=0x124f)
}

/// Buffer item flags.
const BLF_INODE_BUF: u16 = 0x1;
const BLF_CANCEL: u16 = 0x2;
const BLF_DQUOT_BUF: u16 = 0x4 | 0x8 | 0x10;
/// A buffer item logs its buffer in chunks of this many bytes.
const CHUNK: usize = 128;

/// Inode item fields.
const ILOG_DDATA: u32 = 0x002;
const ILOG_DEXT: u32 = 0x004;
const ILOG_DBROOT: u32 = 0x008;
const ILOG_DEV: u32 = 0x010;
const ILOG_ADATA: u32 = 0x040;
const ILOG_AEXT: u32 = 0x080;
const ILOG_ABROOT: u32 = 0x100;
/// The data fork's extent B+tree changed hands (an extent swap).
const ILOG_DOWNER: u32 = 0x200;
/// Deepest extent B+tree.
const MAX_LEVELS: u16 = 9;
/// Most blocks of one swapped extent B+tree.
const MAX_SWAPPED_BLOCKS: usize = 1 << 16;
const ILOG_DFORK: u32 = ILOG_DDATA | ILOG_DEXT | ILOG_DBROOT;
const ILOG_AFORK: u32 = ILOG_ADATA | ILOG_AEXT | ILOG_ABROOT;
const DIFLAG2_BIGTIME: u64 = 0x8;

/// What a replay needs of the superblock.
#[derive(Clone, Debug)]
pub(super) struct Facts {
    pub v5: bool,
    pub block: u64,
    pub agblocks: u64,
    pub agblklog: u32,
    pub agcount: u64,
    pub inopblog: u32,
    pub inode_size: u64,
    /// 512-byte blocks of the filesystem
    pub sectors: u64,
    /// the UUID v5 metadata is stamped with
    pub meta_uuid: [u8; 16],
    /// filesystem blocks of one inode cluster buffer
    pub cluster_blocks: u64,
}

/// The volume as log recovery would leave it.
pub(super) struct Replayed {
    inner: Arc<dyn Disk>,
    /// changed sectors, by 512-byte block number
    sectors: BTreeMap<u64, Box<[u8]>>,
    /// inode chunks made anew (by inode-creation items), by first sector:
    /// their inodes are made on reading (a chunk is 32 KiB or more, and a
    /// burst of new files makes thousands), changed sectors laid over them
    chunks: BTreeMap<u64, Chunk>,
    inode_size: usize,
    meta_uuid: [u8; 16],
    /// committed transactions replayed
    pub transactions: u64,
}

/// An inode chunk made anew: its inodes are free, numbered from `first`.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    /// the sector after it
    end: u64,
    first: u64,
    generation: u32,
}

/// What one changed sector takes in memory, with its place in the map.
const SECTOR_COST: usize = 576;

impl Replayed {
    /// The buffer of `blocks` 512-byte blocks at `daddr`, as replayed so far.
    fn buffer(&self, daddr: u64, blocks: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; (blocks * 512) as usize];
        read_exact_at(self, daddr * 512, &mut b, "XFS log recovery")?;
        Ok(b)
    }

    /// Writes `new` (which was `old`) back at `daddr`: its sectors that
    /// changed.
    fn put(&mut self, daddr: u64, old: &[u8], new: &[u8]) -> Result<()> {
        for (i, (o, n)) in old.chunks(512).zip(new.chunks(512)).enumerate() {
            if o != n {
                self.sectors.insert(daddr + i as u64, n.into());
            }
        }
        if self.sectors.len() * SECTOR_COST > memory_limit() {
            return Err(too_large());
        }
        Ok(())
    }

    /// Makes the `sectors` from `daddr` a chunk of free inodes numbered
    /// from `first`, over whatever was replayed there before.
    fn make_chunk(&mut self, daddr: u64, sectors: u64, first: u64, generation: u32) {
        let end = daddr + sectors;
        let stale: Vec<u64> = self.sectors.range(daddr..end).map(|(&s, _)| s).collect();
        for s in stale {
            self.sectors.remove(&s);
        }
        let overlapping: Vec<u64> = self
            .chunks
            .range(..end)
            .rev()
            .take_while(|(_, c)| c.end > daddr)
            .map(|(&s, _)| s)
            .collect();
        for s in overlapping {
            self.chunks.remove(&s);
        }
        let chunk = Chunk {
            end,
            first,
            generation,
        };
        self.chunks.insert(daddr, chunk);
    }

    /// Whether the `len` bytes at `offset` (a buffer's, of at most 64 KiB)
    /// are all replaced by changed sectors or made chunks, so that the
    /// volume need not be read: a chunk cache smaller than the places a
    /// replay jumps between would read the same chunks again and again.
    fn replaced(&self, offset: u64, len: usize) -> bool {
        let Some(end) = offset.checked_add(len as u64) else {
            return false;
        };
        if len == 0 || len > 64 << 10 || end.div_ceil(512) * 512 > self.inner.size() {
            return false;
        }
        (offset / 512..end.div_ceil(512)).all(|s| {
            self.sectors.contains_key(&s)
                || self
                    .chunks
                    .range(..=s)
                    .next_back()
                    .is_some_and(|(_, c)| c.end > s)
        })
    }

    /// Lays the inodes of made chunks over `buf`, read at byte `offset`.
    fn fill_chunks(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        let isize = self.inode_size as u64;
        let chunks = self.chunks.range(..end.div_ceil(512)).rev();
        for (&start, c) in chunks.take_while(|(_, c)| c.end * 512 > offset) {
            let (from, to) = ((start * 512).max(offset), (c.end * 512).min(end));
            let mut at = from;
            while at < to {
                let i = (at - start * 512) / isize;
                let inode =
                    fresh_inode(c.first + i, c.generation, &self.meta_uuid, self.inode_size);
                let base = start * 512 + i * isize;
                let stop = (base + isize).min(to);
                buf[(at - offset) as usize..(stop - offset) as usize]
                    .copy_from_slice(&inode[(at - base) as usize..(stop - base) as usize]);
                at = stop;
            }
        }
    }
}

/// The most memory a replay may take for what it changes, and again for
/// the item formats it holds while assembling transactions: half of what
/// directory listings may take (`--listing-mb`: a quarter of the machine's
/// memory), at least 8 MiB and at most 64 MiB.
fn memory_limit() -> usize {
    (super::listing_limit() / 2).clamp(8 << 20, 64 << 20)
}

/// A free inode as a chunk's creation leaves it (v3: only v5 filesystems
/// log creations).
fn fresh_inode(number: u64, generation: u32, uuid: &[u8; 16], size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    d[..2].copy_from_slice(b"IN");
    d[4] = 3;
    d[92..96].copy_from_slice(&generation.to_be_bytes());
    d[96..100].copy_from_slice(&u32::MAX.to_be_bytes());
    d[152..160].copy_from_slice(&number.to_be_bytes());
    d[160..176].copy_from_slice(uuid);
    set_crc(&mut d, 100);
    d
}

impl Disk for Replayed {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let n = if self.replaced(offset, buf.len()) {
            buf.len()
        } else {
            self.inner.read_at(offset, buf)?
        };
        if n == 0 {
            return Ok(0);
        }
        let end = offset + n as u64;
        self.fill_chunks(offset, &mut buf[..n]);
        for (&s, data) in self.sectors.range(offset / 512..end.div_ceil(512)) {
            let (from, to) = ((s * 512).max(offset), (s * 512 + 512).min(end));
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - s * 512) as usize..(to - s * 512) as usize]);
        }
        Ok(n)
    }

    fn will_read(&self, ranges: &[Range<u64>]) {
        self.inner.will_read(ranges)
    }
}

/// Where a piece of a logged region lies: in the data of the record at
/// block `record`, `len` bytes from `offset`.
#[derive(Clone, Copy, Debug)]
struct Span {
    record: u64,
    offset: u32,
    len: u32,
}

/// One log item: its format (its first region, kept) and where its other
/// regions lie in the log (a region split over records has several
/// pieces): a checkpoint is one transaction of up to tens of MiB, which a
/// replay does not hold.
struct Item {
    total: u16,
    format: Vec<u8>,
    regions: Vec<Vec<Span>>,
}

impl Item {
    fn kind(&self) -> u16 {
        le16(&self.format, 0)
    }
}

/// A transaction being assembled.
struct Trans {
    /// the LSN of the record it started in
    lsn: u64,
    header: bool,
    items: Vec<Item>,
    /// bytes it holds (formats, and the places of other regions)
    bytes: usize,
}

/// Reads items' regions back from the log, keeping the last record read: a
/// transaction's regions are read in log order.
struct Regions<'a> {
    log: &'a Log<'a>,
    last: Option<(u64, Vec<u8>)>,
}

impl Regions<'_> {
    /// The regions of `t`'s items after their formats, read in log order;
    /// refused past `budget` bytes.
    fn load(&mut self, t: &Trans, budget: usize) -> Result<Vec<Vec<Vec<u8>>>> {
        let mut total = 0usize;
        let mut items = Vec::with_capacity(t.items.len());
        for item in &t.items {
            let mut regions = Vec::with_capacity(item.regions.len());
            for spans in &item.regions {
                total += spans.iter().map(|s| s.len as usize).sum::<usize>();
                if total > budget {
                    return Err(too_large());
                }
                let mut out = Vec::new();
                for span in spans {
                    out.extend_from_slice(self.piece(span)?);
                }
                regions.push(out);
            }
            items.push(regions);
        }
        Ok(items)
    }

    fn piece(&mut self, span: &Span) -> Result<&[u8]> {
        let changed = || Error::corrupt("XFS log: a record changed while read");
        if self.last.as_ref().is_none_or(|(at, _)| *at != span.record) {
            let rec = self
                .log
                .record(span.record, MAX_RECORD, false)?
                .ok_or_else(changed)?;
            self.last = Some((span.record, rec.data));
        }
        let data = self.last.as_ref().map_or(&[][..], |(_, d)| d);
        let (from, len) = (span.offset as usize, span.len as usize);
        data.get(from..from + len).ok_or_else(changed)
    }
}

/// A replay that would take more than [`memory_limit`].
fn too_large() -> Error {
    Error::unsupported(format!(
        "its changes take more than the {} MiB a replay may hold, half of --listing-mb",
        memory_limit() >> 20
    ))
}

/// Replays the log of `disk` (whose ends `log` finds) into a [`Replayed`]
/// view of it.
pub(super) fn replay(disk: Arc<dyn Disk>, log: (u64, u64), fs: &Facts) -> Result<Replayed> {
    let corrupt = |what: String| Error::corrupt(format!("XFS log: {what}"));
    let (start, blocks) = log;
    let log = Log {
        disk: &*disk,
        start,
        blocks,
    };
    let ends = log.ends()?;
    let (tail, head) = ((ends.tail, ends.tail_cycle), ends.head);
    // pass 1: the cancelled buffers, with how many times each is cancelled
    let mut cancels: HashMap<(u64, u64), u32> = HashMap::new();
    walk(&log, tail, head, fs, &mut |t, _| {
        for item in &t.items {
            if let Some(b) = BufFormat::of(item) {
                if b.flags & BLF_CANCEL != 0 {
                    *cancels.entry((b.daddr, b.blocks)).or_default() += 1;
                }
            }
        }
        Ok(())
    })?;
    // pass 2
    let mut r = Replayed {
        inner: disk.clone(),
        sectors: BTreeMap::new(),
        chunks: BTreeMap::new(),
        inode_size: fs.inode_size as usize,
        meta_uuid: fs.meta_uuid,
        transactions: 0,
    };
    walk(&log, tail, head, fs, &mut |t, regions| {
        let is_cancel = |i: &Item| BufFormat::of(i).is_some_and(|b| b.flags & BLF_CANCEL != 0);
        let budget = memory_limit().saturating_sub(r.sectors.len() * SECTOR_COST);
        let loaded = regions.load(&t, budget)?;
        // Buffers, inode chunks made anew and then inodes, each in the
        // order of their places on disk: a checkpoint logs each at most
        // once, and in log order they jump between allocation groups, which
        // a small chunk cache would read again and again.
        let mut items: Vec<(u64, &Item, &Vec<Vec<u8>>)> = t
            .items
            .iter()
            .zip(&loaded)
            .map(|(i, d)| (place(i, fs), i, d))
            .collect();
        items.sort_by_key(|(at, i, _)| (i.kind() == ITEM_INODE, *at));
        let c = Commit {
            lsn: t.lsn,
            fs,
            cancels: &cancels,
        };
        for &(_, item, data) in &items {
            match item.kind() {
                ITEM_BUF if !is_cancel(item) => replay_buffer(&mut r, item, data, &c)?,
                ITEM_ICREATE => replay_icreate(&mut r, item, &c)?,
                ITEM_BUF => {}
                ITEM_INODE => replay_inode(&mut r, item, data, &c)?,
                k if ignored(k) => {}
                k => return Err(corrupt(format!("an item of unknown type {k:#x}"))),
            }
        }
        for item in t.items.iter().filter(|i| is_cancel(i)) {
            if let Some(b) = BufFormat::of(item) {
                if let Some(n) = cancels.get_mut(&(b.daddr, b.blocks)) {
                    *n -= 1;
                    if *n == 0 {
                        cancels.remove(&(b.daddr, b.blocks));
                    }
                }
            }
        }
        r.transactions += 1;
        Ok(())
    })?;
    Ok(r)
}

/// Walks the records from `tail` (block, cycle) to `head`, handing each
/// committed transaction to `commit` in the order of their commits. The log
/// ends early where a record is missing, is not the one its place and
/// cycle say (blocks the copy caught before the kernel wrote them: its log
/// writes may finish out of order), or fails its CRC (a write torn by the
/// copy); the kernel puts the head there.
fn walk(
    log: &Log,
    tail: (u64, u32),
    head: u64,
    fs: &Facts,
    commit: &mut dyn FnMut(Trans, &mut Regions) -> Result<()>,
) -> Result<()> {
    let corrupt = |what: String| Error::corrupt(format!("XFS log: {what}"));
    let mut regions = Regions { log, last: None };
    let mut open: HashMap<u32, Trans> = HashMap::new();
    let mut held = 0usize;
    let (mut at, mut cycle) = tail;
    let mut walked = 0u64;
    while at != head {
        let rec = match log.record(at, MAX_RECORD, fs.v5)? {
            Some(r) if r.lsn == u64::from(cycle) << 32 | at => r,
            _ => {
                log::debug!(
                    "XFS log: no record of cycle {cycle} at block {at}; the log ends there"
                );
                break;
            }
        };
        // blocks walked can only pass the log's size on a log that loops
        walked += 1 + rec.data.len().div_ceil(512) as u64;
        if walked > log.blocks {
            return Err(corrupt("its records run past its head".into()));
        }
        if fs.v5 && rec.crc_ok != Some(true) {
            log::debug!("XFS log: record at block {at} fails its checksum; the log ends there");
            break;
        }
        for op in rec.ops() {
            let (
                Op {
                    tid,
                    client,
                    flags,
                    at: offset,
                },
                payload,
            ) = op.ok_or_else(|| corrupt(format!("record at block {at} is cut short")))?;
            let span = Span {
                record: at,
                offset: offset as u32,
                len: payload.len() as u32,
            };
            if client != CLIENT_TRANSACTION && client != CLIENT_LOG {
                return Err(corrupt(format!(
                    "an operation of unknown client {client:#x}"
                )));
            }
            let Some(t) = open.get_mut(&tid) else {
                if flags & START_TRANS != 0 {
                    let trans = Trans {
                        lsn: rec.lsn,
                        header: false,
                        items: Vec::new(),
                        bytes: 0,
                    };
                    open.insert(tid, trans);
                }
                // else: a transaction that started before the tail
                continue;
            };
            let mut flags = flags & !END_TRANS;
            if flags & WAS_CONT_TRANS != 0 {
                flags &= !CONTINUE_TRANS;
            }
            match flags {
                0 | CONTINUE_TRANS => {
                    let n = add_region(t, payload, span)?;
                    held += n;
                    t.bytes += n;
                }
                WAS_CONT_TRANS => {
                    let n = continue_region(t, payload, span);
                    held += n;
                    t.bytes += n;
                }
                COMMIT_TRANS | UNMOUNT_TRANS => {
                    if let Some(t) = open.remove(&tid) {
                        held -= t.bytes;
                        if flags == COMMIT_TRANS {
                            commit(t, &mut regions)?;
                        }
                    }
                }
                _ => return Err(corrupt(format!("an operation of flags {flags:#x}"))),
            }
            if held > memory_limit() {
                return Err(too_large());
            }
        }
        if rec.next <= at {
            cycle = cycle.wrapping_add(1);
        }
        at = rec.next;
    }
    Ok(())
}

/// Adds a region to transaction `t`: its header first, then items, each
/// of the number of regions its first (its format, kept) names; the others
/// are kept as where they lie. Returns the bytes it holds for it.
fn add_region(t: &mut Trans, payload: &[u8], span: Span) -> Result<usize> {
    let corrupt = |what: &str| Error::corrupt(format!("XFS log: {what}"));
    if payload.is_empty() {
        return Ok(0);
    }
    if !t.header {
        if payload.len() > 16 || (payload.len() >= 4 && le32(payload, 0) != TRANS_MAGIC) {
            return Err(corrupt("a transaction without its header"));
        }
        t.header = true;
        return Ok(0);
    }
    match t.items.last_mut() {
        Some(i) if i.regions.len() + 1 < usize::from(i.total) => {
            i.regions.push(vec![span]);
            Ok(std::mem::size_of::<Span>() * 2)
        }
        _ => {
            if payload.len() < 4 {
                return Err(corrupt("an item's format is cut short"));
            }
            let total = le16(payload, 2);
            if total == 0 || total > MAX_REGIONS {
                return Err(corrupt("an item of a bad region count"));
            }
            t.items.push(Item {
                total,
                format: payload.to_vec(),
                regions: Vec::new(),
            });
            Ok(payload.len() + std::mem::size_of::<Item>())
        }
    }
}

/// Adds the rest of a region split over two records to transaction `t`.
fn continue_region(t: &mut Trans, payload: &[u8], span: Span) -> usize {
    let Some(item) = t.items.last_mut() else {
        // the rest of the transaction's header
        return 0;
    };
    match item.regions.last_mut() {
        Some(spans) => {
            spans.push(span);
            std::mem::size_of::<Span>()
        }
        None => {
            item.format.extend_from_slice(payload);
            payload.len()
        }
    }
}

/// A buffer item's format.
struct BufFormat<'a> {
    flags: u16,
    blocks: u64,
    daddr: u64,
    map: &'a [u8],
}

impl BufFormat<'_> {
    fn of(item: &Item) -> Option<BufFormat<'_>> {
        let f = &item.format;
        if f.len() < 20 || le16(f, 0) != ITEM_BUF {
            return None;
        }
        let words = le32(f, 16) as usize;
        Some(BufFormat {
            flags: le16(f, 4),
            blocks: u64::from(le16(f, 6)),
            daddr: le64(f, 8),
            map: f.get(20..20 + words.checked_mul(4)?)?,
        })
    }
}

/// Where on the volume an item writes (its first byte; 0 for items that
/// write nothing, or whose format is bad).
fn place(item: &Item, fs: &Facts) -> u64 {
    let f = &item.format;
    match item.kind() {
        ITEM_BUF => BufFormat::of(item).map_or(0, |b| b.daddr.saturating_mul(512)),
        ITEM_INODE => InodeFormat::of(f).map_or(0, |i| i.byte()),
        ITEM_ICREATE if f.len() >= 12 => (u64::from(be32(f, 4)) * fs.agblocks)
            .saturating_add(u64::from(be32(f, 8)))
            .saturating_mul(fs.block),
        _ => 0,
    }
}

/// Whether the buffer at `daddr` of `blocks` is cancelled later in the log.
fn cancelled(cancels: &HashMap<(u64, u64), u32>, daddr: u64, blocks: u64) -> bool {
    cancels.contains_key(&(daddr, blocks))
}

/// Checks that a buffer lies inside the filesystem.
fn check_buffer(fs: &Facts, daddr: u64, blocks: u64) -> Result<()> {
    if blocks == 0 || blocks > MAX_BUFFER_BLOCKS || daddr.saturating_add(blocks) > fs.sectors {
        return Err(Error::corrupt(format!(
            "XFS log: a buffer of {blocks} blocks at {daddr} outside the filesystem"
        )));
    }
    Ok(())
}

/// What replaying one committed transaction's items needs besides them.
struct Commit<'a> {
    /// the transaction's LSN
    lsn: u64,
    fs: &'a Facts,
    cancels: &'a HashMap<(u64, u64), u32>,
}

fn replay_buffer(r: &mut Replayed, item: &Item, data: &[Vec<u8>], c: &Commit) -> Result<()> {
    let Commit { lsn, fs, cancels } = *c;
    let corrupt = |what: &str| Error::corrupt(format!("XFS log: a buffer item {what}"));
    let f = BufFormat::of(item).ok_or_else(|| corrupt("has a bad format"))?;
    // the unlinked lists of inode buffers and quota blocks are not read
    if cancelled(cancels, f.daddr, f.blocks) || f.flags & (BLF_INODE_BUF | BLF_DQUOT_BUF) != 0 {
        return Ok(());
    }
    check_buffer(fs, f.daddr, f.blocks)?;
    let old = r.buffer(f.daddr, f.blocks)?;
    if fs.v5 {
        if let Some(on_disk) = Stamp::of(&old).and_then(|s| s.lsn(&old, fs)) {
            if on_disk != 0 && on_disk > lsn {
                return Ok(());
            }
        }
    }
    let mut b = old.clone();
    let bit = |i: usize| f.map.get(i / 8).is_some_and(|w| w & (1 << (i % 8)) != 0);
    let bits = f.map.len() * 8;
    let (mut i, mut region) = (0usize, 1usize);
    while i < bits {
        if !bit(i) {
            i += 1;
            continue;
        }
        let mut n = 1;
        while i + n < bits && bit(i + n) {
            n += 1;
        }
        let data = data
            .get(region - 1)
            .ok_or_else(|| corrupt("has fewer regions than chunks"))?;
        // a run of chunks may be logged in more than one region
        let n = n.min(data.len() / CHUNK);
        let dst = b
            .get_mut(i * CHUNK..(i + n) * CHUNK)
            .ok_or_else(|| corrupt("runs past its buffer"))?;
        if n == 0 {
            return Err(corrupt("has a region shorter than a chunk"));
        }
        dst.copy_from_slice(&data[..n * CHUNK]);
        i += n;
        region += 1;
    }
    if fs.v5 {
        if let Some(s) = Stamp::of(&b) {
            s.apply(&mut b, lsn);
        }
    }
    r.put(f.daddr, &old, &b)
}

/// Where a v5 metadata block keeps its LSN, UUID and CRC, by its magic.
struct Stamp {
    lsn: usize,
    uuid: usize,
    crc: usize,
}

impl Stamp {
    fn of(b: &[u8]) -> Option<Stamp> {
        let s = |lsn, uuid, crc| Some(Stamp { lsn, uuid, crc });
        if b.len() < 512 {
            return None;
        }
        match &b[..4] {
            // short-form B+tree blocks: free space, inodes, reverse map,
            // reference counts
            b"AB3B" | b"AB3C" | b"IAB3" | b"FIB3" | b"RMB3" | b"R3FC" => s(24, 32, 52),
            b"BMA3" => s(32, 40, 64),
            b"XAGF" => s(208, 64, 216),
            b"XAGI" => s(320, 296, 312),
            b"XAFL" => s(24, 8, 32),
            b"XSLM" => s(48, 16, 12),
            b"XDB3" | b"XDD3" | b"XDF3" => s(16, 24, 4),
            b"XFSB" => s(240, 248, 224),
            // leaf and node blocks of directories and attributes
            _ => match be16(b, 8) {
                0x3df1 | 0x3dff | 0x3ebe | 0x3bee => s(24, 32, 12),
                _ => None,
            },
        }
    }

    /// The block's LSN, when its UUID says it is this filesystem's (the
    /// superblock's is its UUID, or its metadata UUID when it has one).
    fn lsn(&self, b: &[u8], fs: &Facts) -> Option<u64> {
        let ours = |at: usize| b.get(at..at + 16) == Some(&fs.meta_uuid[..]);
        (ours(self.uuid) || (&b[..4] == b"XFSB" && ours(32))).then(|| be64(b, self.lsn))
    }

    /// Stamps `lsn` and makes the CRC right, as the write verifier does.
    fn apply(&self, b: &mut [u8], lsn: u64) {
        b[self.lsn..self.lsn + 8].copy_from_slice(&lsn.to_be_bytes());
        set_crc(b, self.crc);
    }
}

/// Sets the CRC32c at `at` (little-endian, computed with the field zeroed).
fn set_crc(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let c = !crc32c(!0, b);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// Initialises the inode chunk an inode-creation item names, unless one of
/// its cluster buffers is cancelled.
fn replay_icreate(r: &mut Replayed, item: &Item, c: &Commit) -> Result<()> {
    let Commit { fs, cancels, .. } = *c;
    let corrupt = |what: &str| Error::corrupt(format!("XFS log: an inode creation {what}"));
    let f = &item.format;
    if f.len() < 28 {
        return Err(corrupt("is cut short"));
    }
    let (ag, agbno, count) = (u64::from(be32(f, 4)), u64::from(be32(f, 8)), be32(f, 12));
    let (isize, length, gen) = (u64::from(be32(f, 16)), u64::from(be32(f, 20)), be32(f, 24));
    let sane = ag < fs.agcount
        && agbno > 0
        && agbno < fs.agblocks
        && isize == fs.inode_size
        && length > 0
        && agbno + length <= fs.agblocks
        && u64::from(count) >> fs.inopblog == length
        && length % fs.cluster_blocks == 0;
    if !sane || !fs.v5 {
        return Err(corrupt("is not sane"));
    }
    let per_block = fs.block / 512;
    let cluster = fs.cluster_blocks * per_block;
    let daddr = |i: u64| (ag * fs.agblocks + agbno + i * fs.cluster_blocks) * per_block;
    let clusters = length / fs.cluster_blocks;
    if (0..clusters).any(|i| cancelled(cancels, daddr(i), cluster)) {
        return Ok(());
    }
    for i in 0..clusters {
        check_buffer(fs, daddr(i), cluster)?;
    }
    let first = (ag << (fs.agblklog + fs.inopblog)) | (agbno << fs.inopblog);
    r.make_chunk(daddr(0), clusters * cluster, first, gen);
    Ok(())
}

/// An inode item's format: which parts are logged, and where the inode is.
struct InodeFormat {
    fields: u32,
    asize: u16,
    dsize: u16,
    rdev: u32,
    /// its cluster buffer: first 512-byte block, blocks
    daddr: u64,
    blocks: u64,
    /// the inode's byte offset in that buffer
    offset: u32,
}

impl InodeFormat {
    /// The format as 64-bit machines lay it out, or packed as 32-bit ones
    /// do.
    fn of(f: &[u8]) -> Option<InodeFormat> {
        let (dev, at) = match f.len() {
            56 => (24, 40),
            52 => (20, 36),
            _ => return None,
        };
        Some(InodeFormat {
            fields: le32(f, 4),
            asize: le16(f, 8),
            dsize: le16(f, 10),
            rdev: le32(f, dev),
            daddr: le64(f, at),
            blocks: u64::from(le32(f, at + 8)),
            offset: le32(f, at + 12),
        })
    }

    /// The inode's byte offset on the volume (saturating, for ordering).
    fn byte(&self) -> u64 {
        self.daddr
            .saturating_mul(512)
            .saturating_add(u64::from(self.offset))
    }
}

/// Replays an inode item: the logged core and forks into the inode's slot.
fn replay_inode(r: &mut Replayed, item: &Item, data: &[Vec<u8>], c: &Commit) -> Result<()> {
    let Commit { lsn, fs, cancels } = *c;
    let corrupt = |what: &str| Error::corrupt(format!("XFS log: an inode item {what}"));
    let InodeFormat {
        fields,
        asize,
        dsize,
        rdev,
        daddr,
        blocks,
        offset,
    } = InodeFormat::of(&item.format).ok_or_else(|| corrupt("has a format of a bad size"))?;
    if cancelled(cancels, daddr, blocks) {
        return Ok(());
    }
    check_buffer(fs, daddr, blocks)?;
    if u64::from(offset) + fs.inode_size > blocks * 512 {
        return Err(corrupt("lies outside its buffer"));
    }
    // only the sectors of the inode's slot (its cluster holds 32 or more)
    let byte = daddr * 512 + u64::from(offset);
    let first = byte / 512;
    let old = r.buffer(first, (byte + fs.inode_size).div_ceil(512) - first)?;
    let mut b = old.clone();
    let at = (byte - first * 512) as usize;
    let dip = &mut b[at..at + fs.inode_size as usize];
    if &dip[..2] != b"IN" {
        return Err(corrupt("names a slot that is no inode"));
    }
    let log = &data.first().ok_or_else(|| corrupt("has no core"))?[..];
    if log.len() < 96 || le16(log, 0) != 0x494e {
        return Err(corrupt("has a bad core"));
    }
    let version = log[4];
    let core = if version >= 3 { 176 } else { 100 };
    let logged = if version >= 3 { 176 } else { 96 };
    if (version >= 3) != fs.v5 || log.len() < logged || dip.len() < core {
        return Err(corrupt("has a core of a bad version"));
    }
    if version >= 3 {
        let on_disk = be64(dip, 112);
        if on_disk != 0 && on_disk != u64::MAX && on_disk > lsn {
            return Ok(());
        }
    } else {
        let (logged, on_disk) = (le16(log, 30), be16(dip, 30));
        if logged < on_disk && !(on_disk == u16::MAX && logged < u16::MAX >> 1) {
            return Ok(());
        }
    }
    core_to_disk(log, dip, lsn);
    let mut next = 1;
    let fork = |dip: &mut [u8], at: usize, size: usize, src: &[u8], root: bool| -> Result<()> {
        let dst = dip
            .get_mut(at..at + size)
            .ok_or_else(|| corrupt("has a fork past its inode"))?;
        if root {
            broot_to_disk(src, dst, fs.v5).ok_or_else(|| corrupt("has a bad B+tree root"))
        } else {
            let n = src.len().min(dst.len());
            dst[..n].copy_from_slice(&src[..n]);
            Ok(())
        }
    };
    let forkoff = usize::from(dip[82]) * 8;
    let dfork = if forkoff == 0 {
        dip.len() - core
    } else {
        forkoff
    };
    if fields & ILOG_DEV != 0 {
        fork(dip, core, 4, &rdev.to_be_bytes(), false)?;
    } else if fields & ILOG_DFORK != 0 {
        let src = data.get(next).ok_or_else(|| corrupt("has no data fork"))?;
        let src = &src[..usize::from(dsize).min(src.len())];
        fork(dip, core, dfork, src, fields & ILOG_DBROOT != 0)?;
        next += 1;
    }
    if fields & ILOG_AFORK != 0 {
        let src = data
            .get(next)
            .ok_or_else(|| corrupt("has no attribute fork"))?;
        let src = &src[..usize::from(asize).min(src.len())];
        if forkoff == 0 {
            return Err(corrupt("has an attribute fork the inode has no room for"));
        }
        let size = dip.len().saturating_sub(core + forkoff);
        fork(dip, core + forkoff, size, src, fields & ILOG_ABROOT != 0)?;
    }
    // an extent swap (xfs_fsr) gave the inode the other file's extent
    // B+tree, whose blocks still name that file as their owner
    let swapped = (fields & ILOG_DOWNER != 0 && fields & ILOG_DBROOT != 0 && be16(dip, 2) != 0)
        .then(|| {
            dip.get(core..core + dfork)
                .map(|f| (f.to_vec(), be64(dip, 152)))
        })
        .flatten();
    if version >= 3 {
        set_crc(dip, 100);
    }
    r.put(first, &old, &b)?;
    match swapped {
        Some((root, owner)) if fs.v5 => change_owner(r, &root, owner, fs),
        _ => Ok(()),
    }
}

/// Makes `owner` the owner of every block of the extent B+tree whose
/// on-disk root (in an inode's fork) is `root`, as recovery of an extent
/// swap does; their CRCs made right.
fn change_owner(r: &mut Replayed, root: &[u8], owner: u64, fs: &Facts) -> Result<()> {
    let corrupt = |what: &str| Error::corrupt(format!("XFS log: an extent swap {what}"));
    let (level, count) = (be16(root, 0), usize::from(be16(root, 2)));
    let max = root.len().saturating_sub(4) / 16;
    if level == 0 || level > MAX_LEVELS || count > max {
        return Err(corrupt("names a bad B+tree root"));
    }
    let mut todo: Vec<(u64, u16)> = (0..count)
        .map(|i| (be64(root, 4 + max * 8 + i * 8), level - 1))
        .collect();
    let per_block = fs.block / 512;
    let mut seen = 0usize;
    while let Some((fsb, level)) = todo.pop() {
        seen += 1;
        let (agno, agbno) = (fsb >> fs.agblklog, fsb & ((1 << fs.agblklog) - 1));
        if seen > MAX_SWAPPED_BLOCKS || agno >= fs.agcount || agbno >= fs.agblocks {
            return Err(corrupt("names blocks outside the filesystem"));
        }
        let daddr = (agno * fs.agblocks + agbno) * per_block;
        check_buffer(fs, daddr, per_block)?;
        let old = r.buffer(daddr, per_block)?;
        if &old[..4] != b"BMA3" || be16(&old, 4) != level {
            return Err(corrupt("names a block that is not of its B+tree"));
        }
        let mut b = old.clone();
        b[56..64].copy_from_slice(&owner.to_be_bytes());
        set_crc(&mut b, 64);
        if level > 0 {
            let (count, max) = (usize::from(be16(&b, 6)), (b.len() - 72) / 16);
            if count > max {
                return Err(corrupt("names a block of a bad record count"));
            }
            todo.extend((0..count).map(|i| (be64(&b, 72 + max * 8 + i * 8), level - 1)));
        }
        r.put(daddr, &old, &b)?;
    }
    Ok(())
}

/// The fields of the inode core that v2 and v3 inodes share, as (offset,
/// bytes), a timestamp as 0 bytes: mode, version, format, the old link
/// count, owner, group, links, project, times, size, blocks, extent size and
/// counts, fork offset and format, DMAPI fields, flags, generation.
const CORE_FIELDS: [(usize, usize); 24] = [
    (0, 2),
    (2, 2),
    (4, 1),
    (5, 1),
    (6, 2),
    (8, 4),
    (12, 4),
    (16, 4),
    (20, 2),
    (22, 2),
    (32, 0),
    (40, 0),
    (48, 0),
    (56, 8),
    (64, 8),
    (72, 4),
    (76, 4),
    (80, 2),
    (82, 1),
    (83, 1),
    (84, 4),
    (88, 2),
    (90, 2),
    (92, 4),
];

/// Writes the logged inode core `log` (little-endian) over the on-disk
/// inode `dip` (big-endian): field by field at the same offsets, the
/// unlinked-list pointer left as it is on disk, a v3 inode's LSN set to the
/// transaction's.
fn core_to_disk(log: &[u8], dip: &mut [u8], lsn: u64) {
    let version = log[4];
    let flags2 = if version >= 3 { le64(log, 120) } else { 0 };
    let swap = |dip: &mut [u8], at: usize, n: usize| {
        for i in 0..n {
            dip[at + i] = log[at + n - 1 - i];
        }
    };
    // timestamps: 64-bit nanosecond counts, or seconds and nanoseconds
    let time = |dip: &mut [u8], at: usize| {
        if flags2 & DIFLAG2_BIGTIME != 0 {
            swap(dip, at, 8);
        } else {
            swap(dip, at, 4);
            swap(dip, at + 4, 4);
        }
    };
    for (at, n) in CORE_FIELDS {
        match n {
            0 => time(dip, at),
            n => swap(dip, at, n),
        }
    }
    if version >= 3 {
        // the 64-bit extent count, or padding
        swap(dip, 24, 8);
        swap(dip, 104, 8);
        dip[112..120].copy_from_slice(&lsn.to_be_bytes());
        swap(dip, 120, 8);
        swap(dip, 128, 4);
        dip[132..144].fill(0);
        time(dip, 144);
        swap(dip, 152, 8);
        dip[160..176].copy_from_slice(&log[160..176]);
    } else {
        // the flush counter, which recovery starts again from 0
        dip[24..32].fill(0);
    }
}

/// Converts a B+tree root as the kernel keeps it in memory (and logs it: a
/// long-form block header, then keys and pointers spaced for the logged
/// size) to the inode fork's on-disk form (level, record count, then keys
/// and pointers spaced for the fork's size).
fn broot_to_disk(src: &[u8], dst: &mut [u8], v5: bool) -> Option<()> {
    let header = if v5 { 72 } else { 24 };
    let from_max = src.len().checked_sub(header)? / 16;
    let to_max = dst.len().checked_sub(4)? / 16;
    let records = usize::from(be16(src, 6));
    if src.len() < 8 || records > from_max || records > to_max {
        return None;
    }
    dst.fill(0);
    dst[..4].copy_from_slice(&src[4..8]);
    let keys = &src[header..header + records * 8];
    let ptrs = &src[header + from_max * 8..header + from_max * 8 + records * 8];
    dst[4..4 + records * 8].copy_from_slice(keys);
    dst[4 + to_max * 8..4 + to_max * 8 + records * 8].copy_from_slice(ptrs);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::disk::MemDisk;
    use crate::restore::fs::xfs_log::record_crc;

    /// The filesystem's 512-byte blocks; the log's follow them.
    const FS_BLOCKS: u64 = 256;
    const LOG_BLOCKS: u64 = 64;

    fn facts(v5: bool) -> Facts {
        Facts {
            v5,
            block: 4096,
            agblocks: FS_BLOCKS / 8,
            agblklog: 5,
            agcount: 1,
            inopblog: 3,
            inode_size: 512,
            sectors: FS_BLOCKS,
            meta_uuid: [7; 16],
            cluster_blocks: 4,
        }
    }

    /// A volume being written: the filesystem's blocks, then its log,
    /// whose records are written one after another from block 0 in cycle 1.
    struct Volume {
        bytes: Vec<u8>,
        at: u64,
        v5: bool,
    }

    type Op = (u32, u8, Vec<u8>);

    impl Volume {
        fn new(v5: bool) -> Volume {
            Volume {
                bytes: vec![0; ((FS_BLOCKS + LOG_BLOCKS) * 512) as usize],
                at: 0,
                v5,
            }
        }

        /// Writes a record of `ops` (transaction id, flags, payload) at the
        /// head, as the kernel does: data blocks' first words moved into
        /// the header and replaced by the cycle, a CRC on v5.
        fn record(&mut self, ops: &[Op]) -> Range<usize> {
            let mut data = Vec::new();
            for (tid, flags, payload) in ops {
                data.extend_from_slice(&tid.to_be_bytes());
                data.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                data.extend_from_slice(&[CLIENT_TRANSACTION, *flags, 0, 0]);
                data.extend_from_slice(payload);
            }
            let len = data.len();
            data.resize(len.next_multiple_of(512).max(512), 0);
            let mut h = vec![0u8; 512];
            h[..4].copy_from_slice(&0xFEED_BABEu32.to_be_bytes());
            h[4..8].copy_from_slice(&1u32.to_be_bytes());
            h[8..12].copy_from_slice(&2u32.to_be_bytes());
            h[12..16].copy_from_slice(&(len as u32).to_be_bytes());
            h[16..24].copy_from_slice(&(1u64 << 32 | self.at).to_be_bytes());
            h[24..32].copy_from_slice(&(1u64 << 32).to_be_bytes());
            h[40..44].copy_from_slice(&(ops.len() as u32).to_be_bytes());
            h[320..324].copy_from_slice(&32768u32.to_be_bytes());
            for (i, block) in data.chunks_exact_mut(512).enumerate() {
                h[44 + 4 * i..48 + 4 * i].copy_from_slice(&block[..4]);
                block[..4].copy_from_slice(&1u32.to_be_bytes());
            }
            if self.v5 {
                let c = record_crc(&h, &data[..len], 328);
                h[32..36].copy_from_slice(&c.to_le_bytes());
            }
            let start = ((FS_BLOCKS + self.at) * 512) as usize;
            let end = start + 512 + data.len();
            self.bytes[start..start + 512].copy_from_slice(&h);
            self.bytes[start + 512..end].copy_from_slice(&data);
            self.at += 1 + data.len() as u64 / 512;
            start..end
        }

        fn replay(&self) -> Result<Replayed> {
            let disk: Arc<dyn Disk> = Arc::new(MemDisk(self.bytes.clone()));
            replay(disk, (FS_BLOCKS * 512, LOG_BLOCKS), &facts(self.v5))
        }
    }

    fn read(r: &Replayed, daddr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        read_exact_at(r, daddr * 512, &mut b, "test").unwrap();
        b
    }

    fn header() -> Vec<u8> {
        let mut h = TRANS_MAGIC.to_le_bytes().to_vec();
        h.resize(16, 0);
        h
    }

    /// A buffer item's regions: its format (`blocks` at `daddr`, `flags`)
    /// and, for each run of chunks, their bytes.
    fn buffer(daddr: u64, blocks: u16, flags: u16, runs: &[(usize, Vec<u8>)]) -> Vec<Vec<u8>> {
        let mut map = vec![0u8; 8];
        for (first, bytes) in runs {
            for c in *first..first + bytes.len() / CHUNK {
                map[c / 8] |= 1 << (c % 8);
            }
        }
        let mut f = ITEM_BUF.to_le_bytes().to_vec();
        f.extend_from_slice(&(1 + runs.len() as u16).to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&blocks.to_le_bytes());
        f.extend_from_slice(&daddr.to_le_bytes());
        f.extend_from_slice(&2u32.to_le_bytes());
        f.extend_from_slice(&map);
        let mut regions = vec![f];
        regions.extend(runs.iter().map(|(_, b)| b.clone()));
        regions
    }

    /// The operations of transaction `tid` carrying `items`, committed or
    /// not.
    fn transaction(tid: u32, items: &[Vec<Vec<u8>>], commit: bool) -> Vec<Op> {
        let mut ops = vec![(tid, START_TRANS, vec![]), (tid, 0, header())];
        for item in items {
            ops.extend(item.iter().map(|r| (tid, 0, r.clone())));
        }
        if commit {
            ops.push((tid, COMMIT_TRANS, vec![]));
        }
        ops
    }

    #[test]
    fn committed_buffers_are_laid_over_the_volume_and_uncommitted_ones_not() {
        let mut v = Volume::new(false);
        v.bytes[64 * 512..72 * 512].fill(0xEE);
        let item = buffer(64, 8, 0, &[(0, vec![1; 128]), (2, vec![2; 256])]);
        v.record(&transaction(1, &[item], true));
        let other = buffer(80, 8, 0, &[(0, vec![3; 128])]);
        v.record(&transaction(2, &[other], false));
        let r = v.replay().unwrap();
        assert_eq!(r.transactions, 1);
        let b = read(&r, 64, 4096);
        assert_eq!(&b[..128], &[1; 128]);
        assert_eq!(&b[128..256], &[0xEE; 128], "a chunk not logged");
        assert_eq!(&b[256..512], &[2; 256]);
        assert_eq!(&b[512..], &[0xEE; 3584][..]);
        assert_eq!(read(&r, 80, 128), vec![0; 128], "not committed");
        // reads across the changed sectors' edges
        let mut odd = vec![0u8; 300];
        read_exact_at(&r, 64 * 512 + 100, &mut odd, "test").unwrap();
        assert_eq!(&odd[..28], &[1; 28]);
        assert_eq!(&odd[28..156], &[0xEE; 128]);
        assert_eq!(&odd[156..], &[2; 144]);
    }

    #[test]
    fn a_region_split_over_two_records_is_joined() {
        let mut v = Volume::new(false);
        let item = buffer(64, 8, 0, &[(0, [vec![4; 200], vec![5; 184]].concat())]);
        let mut ops = transaction(1, &[item], true);
        let last = ops.remove(3);
        let commit = ops.pop().unwrap();
        let (a, b) = last.2.split_at(200);
        ops.push((1, CONTINUE_TRANS, a.to_vec()));
        v.record(&ops);
        v.record(&[(1, WAS_CONT_TRANS, b.to_vec()), commit]);
        let r = v.replay().unwrap();
        assert_eq!(read(&r, 64, 384), [vec![4; 200], vec![5; 184]].concat());
    }

    /// A record that is not the one its place says (one of an earlier
    /// pass over the log, left where the kernel's write had not landed when
    /// the copy was taken) ends the log: neither it nor what follows is
    /// replayed.
    #[test]
    fn a_record_out_of_place_ends_the_log() {
        let mut v = Volume::new(false);
        v.record(&transaction(
            1,
            &[buffer(64, 8, 0, &[(0, vec![1; 128])])],
            true,
        ));
        let stale = v.record(&transaction(
            2,
            &[buffer(72, 8, 0, &[(0, vec![2; 128])])],
            true,
        ));
        v.record(&transaction(
            3,
            &[buffer(80, 8, 0, &[(0, vec![3; 128])])],
            true,
        ));
        assert_eq!(v.replay().unwrap().transactions, 3);
        // written in the pass before
        v.bytes[stale.start + 16..stale.start + 20].copy_from_slice(&0u32.to_be_bytes());
        let r = v.replay().unwrap();
        assert_eq!(r.transactions, 1);
        assert_eq!(read(&r, 72, 128), vec![0; 128]);
        assert_eq!(read(&r, 80, 128), vec![0; 128]);
    }

    /// A buffer cancelled (freed) later in the log is not replayed before
    /// its last cancellation, and is after it (reused as metadata).
    #[test]
    fn cancelled_buffers_are_replayed_only_after_their_last_cancellation() {
        let mut v = Volume::new(false);
        v.bytes[64 * 512..65 * 512].fill(0xDA);
        v.record(&transaction(
            1,
            &[buffer(64, 8, 0, &[(0, vec![1; 128])])],
            true,
        ));
        v.record(&transaction(2, &[buffer(64, 8, BLF_CANCEL, &[])], true));
        v.record(&transaction(
            3,
            &[buffer(64, 8, 0, &[(1, vec![3; 128])])],
            true,
        ));
        let r = v.replay().unwrap();
        assert_eq!(read(&r, 64, 128), vec![0xDA; 128], "freed, then data");
        assert_eq!(read(&r, 64, 256)[128..], [3; 128]);
        // a cancellation of another length is another buffer
        let mut v = Volume::new(false);
        v.record(&transaction(
            1,
            &[buffer(64, 8, 0, &[(0, vec![1; 128])])],
            true,
        ));
        v.record(&transaction(2, &[buffer(64, 16, BLF_CANCEL, &[])], true));
        assert_eq!(read(&v.replay().unwrap(), 64, 128), vec![1; 128]);
    }

    /// The on-disk v2 inode `ino` slot at block 32, as mkfs leaves it.
    fn v2_inode_slot(v: &mut Volume, flushiter: u16) {
        let d = &mut v.bytes[32 * 512..33 * 512];
        d[..2].copy_from_slice(b"IN");
        d[4] = 2;
        d[30..32].copy_from_slice(&flushiter.to_be_bytes());
        d[96..100].copy_from_slice(&0x1234u32.to_be_bytes());
    }

    /// An inode item for the inode at block 32: its format, its core
    /// logged in little-endian order, and an extent list.
    fn inode_item(flushiter: u16, extents: &[u8]) -> Vec<Vec<u8>> {
        let mut f = vec![0u8; 56];
        f[..2].copy_from_slice(&ITEM_INODE.to_le_bytes());
        f[2..4].copy_from_slice(&3u16.to_le_bytes());
        f[4..8].copy_from_slice(&(1 | ILOG_DEXT).to_le_bytes());
        f[10..12].copy_from_slice(&(extents.len() as u16).to_le_bytes());
        f[40..48].copy_from_slice(&32u64.to_le_bytes());
        f[48..52].copy_from_slice(&8u32.to_le_bytes());
        let mut core = vec![0u8; 96];
        core[..2].copy_from_slice(&0x494eu16.to_le_bytes());
        core[2..4].copy_from_slice(&0o100644u16.to_le_bytes());
        core[4] = 2;
        core[5] = 2;
        core[8..12].copy_from_slice(&1000u32.to_le_bytes());
        core[16..20].copy_from_slice(&1u32.to_le_bytes());
        core[30..32].copy_from_slice(&flushiter.to_le_bytes());
        core[40..44].copy_from_slice(&1_700_000_000u32.to_le_bytes());
        core[56..64].copy_from_slice(&5000u64.to_le_bytes());
        core[76..80].copy_from_slice(&1u32.to_le_bytes());
        vec![f, core, extents.to_vec()]
    }

    #[test]
    fn an_inode_core_is_turned_to_disk_order_and_its_fork_copied() {
        let mut v = Volume::new(false);
        v2_inode_slot(&mut v, 0);
        let extent = [9u8; 16];
        v.record(&transaction(1, &[inode_item(3, &extent)], true));
        let r = v.replay().unwrap();
        let d = read(&r, 32, 512);
        assert_eq!(be16(&d, 2), 0o100644);
        assert_eq!((d[4], d[5]), (2, 2));
        assert_eq!(be32(&d, 8), 1000);
        assert_eq!(be32(&d, 16), 1);
        assert_eq!(be32(&d, 40), 1_700_000_000);
        assert_eq!(be64(&d, 56), 5000);
        assert_eq!(be32(&d, 76), 1);
        assert_eq!(be16(&d, 30), 0, "the flush counter starts again");
        assert_eq!(be32(&d, 96), 0x1234, "the unlinked pointer is the disk's");
        assert_eq!(&d[100..116], &extent);
        // an inode flushed after the logged change is left as it is
        let mut v = Volume::new(false);
        v2_inode_slot(&mut v, 5);
        v.record(&transaction(1, &[inode_item(3, &extent)], true));
        assert_eq!(be64(&read(&v.replay().unwrap(), 32, 512), 56), 0);
        // unless its counter wrapped
        let mut v = Volume::new(false);
        v2_inode_slot(&mut v, u16::MAX);
        v.record(&transaction(1, &[inode_item(3, &extent)], true));
        assert_eq!(be64(&read(&v.replay().unwrap(), 32, 512), 56), 5000);
        // a slot that is no inode is a corrupt log
        let mut v = Volume::new(false);
        v.record(&transaction(1, &[inode_item(3, &extent)], true));
        assert!(v.replay().is_err());
    }

    /// On v5, a record whose CRC fails ends the log (a write torn by the
    /// copy), and a replayed directory block gets the transaction's LSN and
    /// a right CRC; a block whose own LSN is newer is not replayed.
    #[test]
    fn v5_records_and_blocks_are_checked_and_stamped() {
        let block = |lsn: u64| {
            let mut b = vec![0u8; 4096];
            b[..4].copy_from_slice(b"XDD3");
            b[16..24].copy_from_slice(&lsn.to_be_bytes());
            b[24..40].copy_from_slice(&[7; 16]);
            b
        };
        let mut v = Volume::new(true);
        v.bytes[64 * 512..72 * 512].copy_from_slice(&block(0));
        let first = v.record(&transaction(
            1,
            &[buffer(64, 8, 0, &[(1, vec![1; 128])])],
            true,
        ));
        let second = v.record(&transaction(
            2,
            &[buffer(64, 8, 0, &[(2, vec![2; 128])])],
            true,
        ));
        let r = v.replay().unwrap();
        assert_eq!(r.transactions, 2);
        let b = read(&r, 64, 4096);
        assert_eq!((&b[128..256], &b[256..384]), (&[1; 128][..], &[2; 128][..]));
        assert_eq!(be64(&b, 16), 1 << 32 | 2, "the second record's LSN");
        let mut zeroed = b.clone();
        zeroed[4..8].fill(0);
        assert_eq!(le32(&b, 4), !crc32c(!0, &zeroed));
        // the second record torn
        let mut torn = Volume { ..v };
        torn.bytes[second.start + 512 + 100] ^= 1;
        let r = torn.replay().unwrap();
        assert_eq!(r.transactions, 1);
        assert_eq!(read(&r, 64, 384)[256..], [0; 128]);
        // a block written back after both
        let mut newer = Volume::new(true);
        newer.bytes[64 * 512..72 * 512].copy_from_slice(&block(2 << 32));
        newer.bytes[first.clone()].copy_from_slice(&torn.bytes[first]);
        newer.at = 2;
        newer.record(&transaction(
            2,
            &[buffer(64, 8, 0, &[(2, vec![2; 128])])],
            true,
        ));
        let r = newer.replay().unwrap();
        assert_eq!(read(&r, 64, 4096), block(2 << 32));
    }

    /// An inode creation item initialises its chunk's inodes (numbers,
    /// generation, UUID, CRC), which a later inode item then fills.
    #[test]
    fn an_inode_creation_initialises_its_chunk() {
        let mut v = Volume::new(true);
        v.bytes[16 * 512..96 * 512].fill(0x55);
        let mut f = ITEM_ICREATE.to_le_bytes().to_vec();
        f.extend_from_slice(&1u16.to_le_bytes());
        // AG 0, block 2, 64 inodes of 512 bytes in 8 blocks (two clusters)
        for x in [0u32, 2, 64, 512, 8, 0xABCD] {
            f.extend_from_slice(&x.to_be_bytes());
        }
        v.record(&transaction(1, &[vec![f]], true));
        let r = v.replay().unwrap();
        let chunk = read(&r, 16, 64 * 512);
        for (i, d) in chunk.chunks(512).enumerate() {
            assert_eq!(&d[..2], b"IN");
            assert_eq!(d[4], 3);
            assert_eq!(be32(d, 92), 0xABCD);
            assert_eq!(be32(d, 96), u32::MAX);
            assert_eq!(be64(d, 152), 16 + i as u64);
            assert_eq!(&d[160..176], &[7; 16]);
            let mut z = d.to_vec();
            z[100..104].fill(0);
            assert_eq!(le32(d, 100), !crc32c(!0, &z));
        }
        assert_eq!(read(&r, 80, 512), vec![0x55; 512], "past the chunk");

        // a new file's inode logged in the next transaction: its slot
        // (inode 18, the third of the chunk, in the cluster at block 16)
        // takes the core over the made inode
        let mut item = inode_item(0, &[6; 16]);
        item[0][40..48].copy_from_slice(&16u64.to_le_bytes());
        item[0][48..52].copy_from_slice(&32u32.to_le_bytes());
        item[0][52..56].copy_from_slice(&1024u32.to_le_bytes());
        let core = &mut item[1];
        core.resize(176, 0);
        core[4] = 3;
        core[152..160].copy_from_slice(&18u64.to_le_bytes());
        core[160..176].copy_from_slice(&[7; 16]);
        v.record(&transaction(2, &[item], true));
        let r = v.replay().unwrap();
        let d = read(&r, 18, 512);
        assert_eq!((be16(&d, 2), d[4], be64(&d, 56)), (0o100644, 3, 5000));
        assert_eq!(be64(&d, 152), 18);
        assert_eq!(be64(&d, 112), 1 << 32 | 2, "the transaction's LSN");
        assert_eq!(be32(&d, 96), u32::MAX, "the made inode's unlinked pointer");
        assert_eq!(&d[176..192], &[6; 16]);
        let mut z = d.clone();
        z[100..104].fill(0);
        assert_eq!(le32(&d, 100), !crc32c(!0, &z));
        // reads across the slot's edges see the made inodes around it
        let around = read(&r, 17, 3 * 512);
        assert_eq!(be64(&around, 152), 17);
        assert_eq!(&around[512..1024], &d[..]);
        assert_eq!(be64(&around[1024..], 152), 19);
    }

    /// An extent swap (xfs_fsr) logs the inode with its new B+tree root
    /// and asks recovery to make it the owner of that tree's blocks, which
    /// the reader checks: the block gets the inode as its owner and a right
    /// CRC, and the root is laid out as on disk.
    #[test]
    fn an_extent_swap_gives_the_tree_its_new_owner() {
        let mut v = Volume::new(true);
        let leaf = &mut v.bytes[160 * 512..168 * 512];
        leaf[..4].copy_from_slice(b"BMA3");
        leaf[6..8].copy_from_slice(&1u16.to_be_bytes());
        leaf[40..56].copy_from_slice(&[7; 16]);
        leaf[56..64].copy_from_slice(&999u64.to_be_bytes());
        set_crc(leaf, 64);
        let slot = &mut v.bytes[32 * 512..33 * 512];
        slot[..2].copy_from_slice(b"IN");
        slot[4] = 3;
        let mut item = inode_item(0, &[]);
        let fields = 1 | ILOG_DBROOT | ILOG_DOWNER;
        item[0][4..8].copy_from_slice(&fields.to_le_bytes());
        item[0][10..12].copy_from_slice(&104u16.to_le_bytes());
        let core = &mut item[1];
        core.resize(176, 0);
        core[4] = 3;
        core[5] = 3;
        core[152..160].copy_from_slice(&32u64.to_le_bytes());
        // the root as the kernel keeps it in memory: a long block header,
        // then room for two keys and two pointers
        let mut root = vec![0u8; 104];
        root[..4].copy_from_slice(b"BMA3");
        root[4..6].copy_from_slice(&1u16.to_be_bytes());
        root[6..8].copy_from_slice(&1u16.to_be_bytes());
        root[88..96].copy_from_slice(&20u64.to_be_bytes());
        item[2] = root;
        v.record(&transaction(1, &[item], true));
        let r = v.replay().unwrap();
        let b = read(&r, 160, 4096);
        assert_eq!(be64(&b, 56), 32, "the new owner");
        let mut z = b.clone();
        z[64..68].fill(0);
        assert_eq!(le32(&b, 64), !crc32c(!0, &z));
        let d = read(&r, 32, 512);
        assert_eq!((be16(&d, 176), be16(&d, 178)), (1, 1));
        assert_eq!(
            be64(&d, 176 + 4 + 20 * 8),
            20,
            "the pointer, spaced for the fork"
        );
        // a swap naming a block that is not of the tree is a corrupt log
        v.bytes[160 * 512] = b'X';
        assert!(v.replay().is_err());
    }

    /// Logs of damaged records and items (bytes anywhere, lengths and
    /// counts of any value) give a replay or an error, never a panic or a
    /// read or write outside the filesystem.
    #[test]
    fn damaged_logs_never_panic() {
        let mut next = crate::testing::xorshift(0x2545_F491_4F6C_DD1Du64);
        let mut base = Volume::new(false);
        v2_inode_slot(&mut base, 0);
        base.record(&transaction(
            1,
            &[buffer(64, 8, 0, &[(0, vec![1; 128])])],
            true,
        ));
        base.record(&transaction(2, &[inode_item(1, &[9; 16])], true));
        base.record(&transaction(3, &[buffer(64, 8, BLF_CANCEL, &[])], true));
        let log = (FS_BLOCKS * 512) as usize..((FS_BLOCKS + base.at) * 512) as usize;
        let mut seen = [0; 2];
        for _ in 0..3000 {
            let mut v = Volume {
                bytes: base.bytes.clone(),
                at: base.at,
                v5: false,
            };
            for _ in 0..1 + next() % 4 {
                let i = log.start + (next() % log.len() as u64) as usize;
                v.bytes[i] = next() as u8;
            }
            match v.replay() {
                Ok(r) => {
                    seen[0] += 1;
                    assert!(r.sectors.keys().all(|&s| s < FS_BLOCKS));
                    assert!(r.chunks.values().all(|c| c.end <= FS_BLOCKS));
                }
                Err(_) => seen[1] += 1,
            }
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }
}
