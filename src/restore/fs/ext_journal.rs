//! Recovery of an ext3/4 journal (JBD2) without writing anything.
//!
//! A filesystem whose superblock says the journal needs recovery (a backup
//! of a running machine, taken without a freeze) is only consistent once
//! the journal's committed transactions are written to their home blocks.
//! Here they never are: [`recover`] walks the log once and keeps, for each
//! block that recovery would write, where in the journal its copy lies.
//! [`Recovered`] is a [`Disk`] that reads the volume through that map and
//! shows the superblock without its "needs recovery" flag, so ext4-view and
//! `ext_raw` read the recovered filesystem as a clean one.
//!
//! The rules are the kernel's (fs/jbd2/recovery.c, which e2fsck shares):
//! the log starts at the journal superblock's start block and sequence,
//! runs around the end of the circular log area, and ends at the first
//! block that is not the next one of the expected transaction; a
//! transaction counts once its commit block is read (and its checksum,
//! version 1, 2 or 3, holds); a copy logged by transaction S is not
//! replayed when a transaction S' >= S revokes its block; of the copies
//! left, the newest wins; an escaped copy (one whose first word was the
//! journal's magic number) gets that word back. Where the kernel's recovery
//! fails, or the kernel would not mount the filesystem, the volume is
//! corrupt (1004): a copy to be replayed that fails its checksum; a commit,
//! descriptor or revocation block that fails its checksum in a transaction
//! whose commit is not older than the one before (an older one marks a
//! stale end of the log; with asynchronous commits the scan goes on, and
//! only the transactions before the last failed commit are replayed, unless
//! version 1 checksums meet another commit); a revocation block longer than
//! its block; a copy meant for a block of the journal itself; a read-only
//! journal feature (the kernel knows none). (ext4-view 1.0 replays
//! by itself, but stops at the end of the journal file instead of wrapping
//! around, which returned stale data; it refuses escaped copies, and honours
//! a revocation only within its own transaction.)
//! Owns: JBD2's on-disk structures (big-endian) and the bounds of a
//! recovery. Must never write.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::le::{be16, be32};
use crate::restore::disk::{read_exact_at, Disk};
use crate::restore::fs::ext_raw::{crc32c, reused_at, ExtRaw};
use crate::restore::fs::Extent;

/// JBD2 block header magic, also the word an escaped copy starts with.
const JBD2_MAGIC: u32 = 0xC03B_3998;
const DESCRIPTOR_BLOCK: u32 = 1;
const COMMIT_BLOCK: u32 = 2;
const SUPERBLOCK_V1: u32 = 3;
const SUPERBLOCK_V2: u32 = 4;
const REVOKE_BLOCK: u32 = 5;
/// Journal features (incompat) this recovery knows.
const FEATURE_REVOKE: u32 = 0x1;
const FEATURE_64BIT: u32 = 0x2;
const FEATURE_ASYNC_COMMIT: u32 = 0x4;
const FEATURE_CSUM_V2: u32 = 0x8;
const FEATURE_CSUM_V3: u32 = 0x10;
/// `s_checksum_type` of checksums v2/v3.
const CRC32C_CHKSUM: u8 = 4;
const KNOWN_FEATURES: u32 =
    FEATURE_REVOKE | FEATURE_64BIT | FEATURE_ASYNC_COMMIT | FEATURE_CSUM_V2 | FEATURE_CSUM_V3;
/// Journal feature (compat): version 1 checksums.
const COMPAT_CHECKSUM: u32 = 0x1;
/// A version 1 commit checksum: its type (crc32) and size.
const CRC32_CHKSUM: u8 = 1;
const CRC32_CHKSUM_SIZE: u8 = 4;
/// Descriptor tag flags.
const TAG_ESCAPED: u32 = 0x1;
const TAG_SAME_UUID: u32 = 0x2;
const TAG_LAST: u32 = 0x8;
/// The filesystem superblock: where it lies, and its fields changed here.
const SUPERBLOCK: Range<u64> = 1024..2048;
const SB_INCOMPAT: usize = 0x60;
const SB_RO_COMPAT: usize = 0x64;
const SB_CHECKSUM: usize = 0x3FC;
const INCOMPAT_RECOVER: u32 = 0x4;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// Longest journal recovered (blocks): mke2fs makes journals of at most
/// 1 GiB, 2^18 blocks of 4 KiB or 2^20 of 1 KiB.
pub const MAX_JOURNAL_BLOCKS: u64 = 1 << 20;
/// Most revocations one transaction may hold before its commit.
pub const MAX_PENDING_REVOKES: u64 = 1 << 18;
/// Most blocks revoked in the whole log (a map entry each).
pub const MAX_REVOKED_BLOCKS: usize = 1 << 18;
/// Most block copies in the whole log (24 bytes each while recovering; a
/// real journal of 2^18 blocks holds fewer).
pub const MAX_REPLAYED_BLOCKS: usize = 1 << 18;
/// Journal blocks mapped at a time while finding where they lie.
const MAP_STEP: u64 = 1 << 16;

fn too_large(what: String) -> Error {
    Error::unsupported(format!(
        "ext filesystem: the journal needs replaying, and {what}"
    ))
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("ext filesystem: journal: {what}"))
}

/// CRC-32 as the kernel's `crc32_be` computes it (polynomial 0x04C11DB7,
/// most significant bit first, no inversion), for version 1 checksums.
fn crc32_be(mut crc: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = (i as u32) << 24;
            let mut k = 0;
            while k < 8 {
                c = if c & 0x8000_0000 != 0 {
                    (c << 1) ^ 0x04C1_1DB7
                } else {
                    c << 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    for &b in data {
        crc = (crc << 8) ^ TABLE[((crc >> 24) ^ u32::from(b)) as usize];
    }
    crc
}

/// Whether transaction `a` comes after `b` (sequence numbers wrap).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The newest copy of a block that recovery writes: where it lies in the
/// volume, and whether its first word is the escaped magic number.
#[derive(Clone, Copy, Debug)]
struct Copy {
    block: u64,
    from: u64,
    escaped: bool,
}

/// A volume as recovery would leave it: reads of replayed blocks come from
/// their journal copies, and the superblock reads without "needs recovery"
/// (its checksum made again).
pub struct Recovered {
    inner: Arc<dyn Disk>,
    block_size: u64,
    /// sorted by block
    copies: Vec<Copy>,
    superblock: Vec<u8>,
}

impl Recovered {
    fn new(inner: Arc<dyn Disk>, block_size: u64, mut copies: Vec<Copy>) -> Result<Recovered> {
        copies.sort_unstable_by_key(|c| c.block);
        let mut r = Recovered {
            inner,
            block_size,
            copies,
            superblock: Vec::new(),
        };
        let mut sb = vec![0u8; 1024];
        let got = r.read_replayed(SUPERBLOCK.start, &mut sb)?;
        if got != sb.len() {
            return Err(Error::corrupt("ext filesystem: superblock unreadable"));
        }
        let incompat = crate::le::le32(&sb, SB_INCOMPAT) & !INCOMPAT_RECOVER;
        sb[SB_INCOMPAT..SB_INCOMPAT + 4].copy_from_slice(&incompat.to_le_bytes());
        if crate::le::le32(&sb, SB_RO_COMPAT) & RO_COMPAT_METADATA_CSUM != 0 {
            let c = crc32c(!0, &sb[..SB_CHECKSUM]);
            sb[SB_CHECKSUM..].copy_from_slice(&c.to_le_bytes());
        }
        r.superblock = sb;
        Ok(r)
    }

    /// Blocks recovery writes (for tests and logs).
    pub fn replayed_blocks(&self) -> usize {
        self.copies.len()
    }

    /// Whether reading `extents` (volume byte ranges) goes through a
    /// replayed block or the superblock: those must be read here, not
    /// straight from the volume.
    pub fn touches(&self, extents: &[Extent]) -> bool {
        extents.iter().any(|e| match *e {
            Extent::Disk { offset, len } if len > 0 => {
                let end = offset.saturating_add(len);
                let (first, last) = (offset / self.block_size, (end - 1) / self.block_size);
                let i = self.copies.partition_point(|c| c.block < first);
                let replayed = self.copies.get(i).is_some_and(|c| c.block <= last);
                replayed || (offset < SUPERBLOCK.end && end > SUPERBLOCK.start)
            }
            _ => false,
        })
    }

    /// Reads through the map, without the superblock's change.
    fn read_replayed(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let bs = self.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| Error::corrupt("ext filesystem: read offset overflows"))?;
            let block = pos / bs;
            let i = self.copies.partition_point(|c| c.block < block);
            let rest = buf.len() - done;
            match self.copies.get(i) {
                Some(c) if c.block == block => {
                    let within = pos % bs;
                    let k = rest.min((bs - within) as usize);
                    let dst = &mut buf[done..done + k];
                    read_exact_at(&*self.inner, c.from + within, dst, "ext journal copy")?;
                    if c.escaped && within < 4 {
                        let magic = JBD2_MAGIC.to_be_bytes();
                        let w = within as usize;
                        let n = (4 - w).min(k);
                        dst[..n].copy_from_slice(&magic[w..w + n]);
                    }
                    done += k;
                }
                next => {
                    // up to the next replayed block, straight from the volume
                    let limit = next.map_or(u64::MAX, |c| c.block.saturating_mul(bs));
                    let k = rest.min(usize::try_from(limit - pos).unwrap_or(usize::MAX));
                    let got = self.inner.read_at(pos, &mut buf[done..done + k])?;
                    if got == 0 {
                        break;
                    }
                    done += got;
                }
            }
        }
        Ok(done)
    }
}

impl Disk for Recovered {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let n = self.read_replayed(offset, buf)?;
        let end = offset.saturating_add(n as u64);
        let (from, to) = (offset.max(SUPERBLOCK.start), end.min(SUPERBLOCK.end));
        if from < to {
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let src = (from - SUPERBLOCK.start) as usize..(to - SUPERBLOCK.start) as usize;
            dst.copy_from_slice(&self.superblock[src]);
        }
        Ok(n)
    }

    fn will_read(&self, ranges: &[Range<u64>]) {
        self.inner.will_read(ranges)
    }
}

/// Where the journal's blocks lie in the volume.
struct Log<'a> {
    disk: &'a dyn Disk,
    block_size: u64,
    /// (first journal block, volume offset, blocks), in journal order
    runs: Vec<(u64, u64, u64)>,
}

impl Log<'_> {
    fn offset(&self, n: u64) -> Result<u64> {
        let i = self.runs.partition_point(|r| r.0 <= n);
        match i.checked_sub(1).and_then(|i| self.runs.get(i)) {
            Some(&(first, at, len)) if n - first < len => Ok(at + (n - first) * self.block_size),
            _ => Err(corrupt(format!("block {n} of the journal is a hole"))),
        }
    }

    fn read(&self, n: u64, block: &mut [u8]) -> Result<()> {
        read_exact_at(self.disk, self.offset(n)?, block, "ext journal block")
    }
}

/// One block copy in a transaction's descriptor.
#[derive(Clone, Copy)]
struct Tag {
    block: u64,
    /// journal block holding the copy
    at: u64,
    sequence: u32,
    checksum: u32,
    escaped: bool,
}

/// The journal's format, from its superblock.
struct Format {
    /// first and end (exclusive) journal block of the circular log
    first: u64,
    last: u64,
    tag_bytes: usize,
    is64: bool,
    csum_v2: bool,
    csum_v3: bool,
    /// version 1 checksums (compat feature): a crc32 of each transaction's
    /// descriptor and data blocks in its commit block
    csum_v1: bool,
    async_commit: bool,
    /// crc32c seed of the journal's checksums (from its UUID)
    seed: u32,
}

impl Format {
    fn checksums(&self) -> bool {
        self.csum_v2 || self.csum_v3
    }

    /// The checksum at the end of a descriptor or revocation block holds.
    fn tail_ok(&self, block: &[u8]) -> bool {
        if !self.checksums() {
            return true;
        }
        self.holds(block, block.len() - 4)
    }

    /// The block's checksum (big-endian at `at`, zero while summed) holds.
    fn holds(&self, block: &[u8], at: usize) -> bool {
        sum_holds(self.seed, block, at)
    }

    /// The next block of the circular log.
    fn next(&self, n: u64) -> u64 {
        if n + 1 >= self.last {
            self.first
        } else {
            n + 1
        }
    }
}

/// Whether the crc32c of `bytes` from `seed`, summed with its own field (big
/// endian at `at`) zero, is that field: how JBD2 checksums its superblock and
/// its descriptor, revocation and commit blocks.
fn sum_holds(seed: u32, bytes: &[u8], at: usize) -> bool {
    let mut c = crc32c(seed, &bytes[..at]);
    c = crc32c(c, &[0; 4]);
    c = crc32c(c, &bytes[at + 4..]);
    c == be32(bytes, at)
}

/// Maps the journal inode's blocks to where they lie; a journal whose
/// blocks overlap is corrupt.
fn journal_runs(
    raw: &mut ExtRaw,
    journal: &crate::restore::fs::ext_raw::Inode,
    blocks: u64,
) -> Result<Vec<(u64, u64, u64)>> {
    let bs = raw.block_size();
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    let mut cursor = 0u64;
    for from in (0..blocks).step_by(MAP_STEP as usize) {
        let len = MAP_STEP.min(blocks - from) * bs;
        for e in raw.map(journal, from * bs, len)? {
            match e {
                Extent::Disk { offset, len } => {
                    let n = len / bs;
                    match runs.last_mut() {
                        Some(r) if r.0 + r.2 == cursor && r.1 + r.2 * bs == offset => r.2 += n,
                        _ => runs.push((cursor, offset, n)),
                    }
                    cursor += n;
                }
                Extent::Zero { len } => cursor += len / bs,
            }
        }
    }
    let mut places: Vec<Range<u64>> = runs.iter().map(|&(_, at, n)| at..at + n * bs).collect();
    if let Some(at) = reused_at(&mut places) {
        return Err(corrupt(format!("the block at byte {at} is used twice")));
    }
    Ok(runs)
}

/// Reads the journal superblock: the log's format, start and sequence, or
/// `None` when the log is empty (nothing to replay).
fn read_format(log: &Log, blocks: u64) -> Result<Option<(Format, u64, u32)>> {
    let bs = log.block_size as usize;
    let mut sb = vec![0u8; bs];
    log.read(0, &mut sb)?;
    let kind = be32(&sb, 4);
    if be32(&sb, 0) != JBD2_MAGIC || !matches!(kind, SUPERBLOCK_V1 | SUPERBLOCK_V2) {
        return Err(corrupt("bad superblock magic"));
    }
    if u64::from(be32(&sb, 0x0C)) != log.block_size {
        return Err(Error::unsupported(format!(
            "ext filesystem: the journal's block size {} differs from the filesystem's",
            be32(&sb, 0x0C)
        )));
    }
    let features = if kind == SUPERBLOCK_V2 {
        be32(&sb, 0x28)
    } else {
        0
    };
    if features & !KNOWN_FEATURES != 0 {
        return Err(Error::unsupported(format!(
            "ext filesystem: the journal needs replaying and has features {:#x} this \
             reader does not know (fast commits?)",
            features & !KNOWN_FEATURES
        )));
    }
    let (csum_v2, csum_v3) = (
        features & FEATURE_CSUM_V2 != 0,
        features & FEATURE_CSUM_V3 != 0,
    );
    // as the kernel loads a journal: no read-only features (it knows none),
    // one checksum version, and crc32c
    let ro_compat = if kind == SUPERBLOCK_V2 {
        be32(&sb, 0x2C)
    } else {
        0
    };
    if ro_compat != 0 {
        return Err(Error::unsupported(format!(
            "ext filesystem: the journal needs replaying and has read-only features \
             {ro_compat:#x} this reader does not know"
        )));
    }
    let csum_v1 = kind == SUPERBLOCK_V2 && be32(&sb, 0x24) & COMPAT_CHECKSUM != 0;
    if csum_v1 && (csum_v2 || csum_v3) {
        return Err(corrupt(
            "checksums of version 1 and a later version are both set",
        ));
    }
    if csum_v2 && csum_v3 {
        return Err(corrupt("both checksum versions 2 and 3 are set"));
    }
    if (csum_v2 || csum_v3) && sb.get(0x50) != Some(&CRC32C_CHKSUM) {
        return Err(Error::unsupported(format!(
            "ext filesystem: the journal's checksum type {:?} is not crc32c",
            sb.get(0x50)
        )));
    }
    let seed = crc32c(!0, &sb[0x30..0x40]);
    let format = Format {
        first: u64::from(be32(&sb, 0x14)),
        last: u64::from(be32(&sb, 0x10)),
        tag_bytes: if csum_v3 {
            16
        } else {
            8 + if features & FEATURE_64BIT != 0 { 4 } else { 0 } + if csum_v2 { 2 } else { 0 }
        },
        is64: features & FEATURE_64BIT != 0,
        csum_v2,
        csum_v3,
        csum_v1,
        async_commit: features & FEATURE_ASYNC_COMMIT != 0,
        seed,
    };
    if format.checksums() && !sum_holds(!0, &sb[..1024.min(bs)], 0xFC) {
        return Err(corrupt("superblock checksum mismatch"));
    }
    let start = u64::from(be32(&sb, 0x1C));
    if start == 0 {
        return Ok(None);
    }
    let (first, last) = (format.first, format.last);
    if first == 0 || first >= last || last > blocks || start < first || start >= last {
        return Err(corrupt(format!(
            "log bounds {first}..{last} and start {start} do not fit its {blocks} blocks"
        )));
    }
    Ok(Some((format, start, be32(&sb, 0x18))))
}

/// What one walk of the log found: the copies of committed transactions in
/// log order, and the newest transaction revoking each block.
#[derive(Default)]
struct Walk {
    tags: Vec<Tag>,
    revoked: HashMap<u64, u32>,
    /// With asynchronous commits: the last transaction whose commit failed
    /// its checksum (the kernel replays only the transactions before it).
    failed_async: Option<u32>,
}

/// Walks the log once, from `start` at `sequence`, as recovery's scan does,
/// up to transaction `stop` (not included) if given.
fn walk(log: &Log, f: &Format, start: u64, mut sequence: u32, stop: Option<u32>) -> Result<Walk> {
    let damaged = |sequence: u32, what: &str| {
        corrupt(format!(
            "transaction {sequence} has a {what} that fails its checksum, and its commit \
             is not older than the one before (the kernel would not mount this)"
        ))
    };
    let bs = log.block_size as usize;
    let tail = if f.checksums() { 4 } else { 0 };
    let revoke_entry = if f.is64 { 8 } else { 4 };
    let length = f.last - f.first;
    let mut block = vec![0u8; bs];
    let mut found = Walk::default();
    // the transaction being read, until its commit
    let (mut tags, mut revokes) = (Vec::new(), Vec::new());
    // a block of it failed its checksum: what, if one did; a revocation
    // block longer than a block
    let mut unsure: Option<&str> = None;
    let mut overlong_revoke = false;
    let mut last_commit_time = 0u64;
    // version 1: the crc32 of the transaction's descriptors and copies
    let mut crc_v1 = !0u32;
    let mut data = vec![0u8; bs];
    let (mut at, mut walked) = (start, 0u64);
    'log: while walked < length && stop != Some(sequence) {
        log.read(at, &mut block)?;
        if be32(&block, 0) != JBD2_MAGIC || be32(&block, 8) != sequence {
            break;
        }
        let mut step = 1u64;
        match be32(&block, 4) {
            DESCRIPTOR_BLOCK => {
                if !f.tail_ok(&block) {
                    // stale or damaged: the commit's time tells
                    unsure = Some("descriptor block");
                }
                if f.csum_v1 && unsure.is_none() {
                    crc_v1 = crc32_be(crc_v1, &block);
                }
                let mut data_at = at;
                let mut p = 12;
                while p + f.tag_bytes <= bs - tail {
                    let (flags, checksum, high) = if f.csum_v3 {
                        (
                            be32(&block, p + 4),
                            be32(&block, p + 12),
                            be32(&block, p + 8),
                        )
                    } else {
                        let high = if f.is64 { be32(&block, p + 8) } else { 0 };
                        (
                            u32::from(be16(&block, p + 6)),
                            u32::from(be16(&block, p + 4)),
                            high,
                        )
                    };
                    let high = if f.is64 { u64::from(high) << 32 } else { 0 };
                    step += 1;
                    if walked + step > length {
                        // the copies would run past one lap of the log
                        break 'log;
                    }
                    data_at = f.next(data_at);
                    if f.csum_v1 && unsure.is_none() {
                        log.read(data_at, &mut data)?;
                        crc_v1 = crc32_be(crc_v1, &data);
                    }
                    if found.tags.len() + tags.len() >= MAX_REPLAYED_BLOCKS {
                        return Err(too_large(format!(
                            "more than {MAX_REPLAYED_BLOCKS} blocks to copy"
                        )));
                    }
                    tags.push(Tag {
                        block: u64::from(be32(&block, p)) | high,
                        at: data_at,
                        sequence,
                        checksum,
                        escaped: flags & TAG_ESCAPED != 0,
                    });
                    p += f.tag_bytes;
                    if flags & TAG_SAME_UUID == 0 {
                        p += 16;
                    }
                    if flags & TAG_LAST != 0 {
                        break;
                    }
                }
            }
            COMMIT_BLOCK => {
                let time = u64::from(be32(&block, 0x30)) << 32 | u64::from(be32(&block, 0x34));
                if let Some(what) = unsure {
                    if time >= last_commit_time {
                        return Err(damaged(sequence, what));
                    }
                    // a stale block of an earlier lap: the log ends
                    break;
                }
                let failed_commit = |sequence: u32| {
                    corrupt(format!(
                        "the commit block of transaction {sequence} fails its checksum (the \
                         kernel would not mount this)"
                    ))
                };
                if let (true, Some(failed)) = (f.csum_v1, found.failed_async) {
                    // version 1 sums go no further than a failed commit
                    return Err(failed_commit(failed));
                }
                let v1_ok = !f.csum_v1 || {
                    let (kind, size, sum) = (block[12], block[13], be32(&block, 16));
                    (kind == CRC32_CHKSUM && size == CRC32_CHKSUM_SIZE && sum == crc_v1)
                        || (kind == 0 && size == 0 && sum == 0)
                };
                if !v1_ok || (f.checksums() && !f.holds(&block, 16)) {
                    if time < last_commit_time {
                        // a stale commit of an earlier lap: the log ends
                        break;
                    }
                    if !f.async_commit {
                        return Err(failed_commit(sequence));
                    }
                    // Asynchronous commits may leave one torn: the scan goes
                    // on, and only the transactions before the last such
                    // one are replayed (see `recover`).
                    found.failed_async = Some(sequence);
                } else {
                    crc_v1 = !0;
                }
                if overlong_revoke {
                    return Err(corrupt(format!(
                        "a revocation block of transaction {sequence} is longer than a block"
                    )));
                }
                last_commit_time = time;
                found.tags.append(&mut tags);
                for b in revokes.drain(..) {
                    let r = found.revoked.entry(b).or_insert(sequence);
                    if after(sequence, *r) {
                        *r = sequence;
                    }
                }
                if found.revoked.len() > MAX_REVOKED_BLOCKS {
                    return Err(too_large(format!(
                        "it revokes more than {MAX_REVOKED_BLOCKS} blocks"
                    )));
                }
                sequence = sequence.wrapping_add(1);
            }
            REVOKE_BLOCK => {
                let used = be32(&block, 12) as usize;
                if !f.tail_ok(&block) {
                    unsure = Some("revocation block");
                } else if used > bs - tail {
                    overlong_revoke = true;
                } else {
                    if (revokes.len() + (used.saturating_sub(16)) / revoke_entry) as u64
                        > MAX_PENDING_REVOKES
                    {
                        return Err(too_large(format!(
                            "more than {MAX_PENDING_REVOKES} revoked blocks wait for one commit"
                        )));
                    }
                    let mut e = 16;
                    while e + revoke_entry <= used {
                        let b = if f.is64 {
                            u64::from(be32(&block, e)) << 32 | u64::from(be32(&block, e + 4))
                        } else {
                            u64::from(be32(&block, e))
                        };
                        revokes.push(b);
                        e += revoke_entry;
                    }
                }
            }
            _ => break,
        }
        walked += step;
        for _ in 0..step {
            at = f.next(at);
        }
    }
    Ok(found)
}

/// The recovered view of the filesystem `raw` reads from `disk`, or `None`
/// when its journal needs no recovery.
pub fn recover(raw: &mut ExtRaw, disk: &Arc<dyn Disk>) -> Result<Option<Recovered>> {
    if !raw.needs_recovery() {
        return Ok(None);
    }
    let Some(number) = raw.journal_inode() else {
        return Err(Error::unsupported(
            "ext filesystem: the journal needs replaying, and it is on another device",
        ));
    };
    let journal = raw.inode(number)?;
    let bs = raw.block_size();
    let blocks = journal.size / bs;
    if blocks > MAX_JOURNAL_BLOCKS {
        return Err(too_large(format!(
            "its {blocks} blocks are more than the {MAX_JOURNAL_BLOCKS} replayed"
        )));
    }
    let log = Log {
        disk: &**disk,
        block_size: bs,
        runs: journal_runs(raw, &journal, blocks)?,
    };
    let Some((format, start, sequence)) = read_format(&log, blocks)? else {
        return Recovered::new(disk.clone(), bs, Vec::new()).map(Some);
    };
    let mut walk = walk(&log, &format, start, sequence, None)?;
    if let Some(end) = walk.failed_async {
        // the transactions before the last failed asynchronous commit
        walk = self::walk(&log, &format, start, sequence, Some(end))?;
    }
    // where the journal lies, to refuse copies meant for its own blocks
    let mut journal_bytes: Vec<Range<u64>> =
        log.runs.iter().map(|&(_, at, n)| at..at + n * bs).collect();
    journal_bytes.sort_unstable_by_key(|r| r.start);
    // the newest copy of each block that no later revocation covers; every
    // copy replayed is checked, as the kernel's recovery checks them
    let mut newest: HashMap<u64, Tag> = HashMap::new();
    let mut data = vec![0u8; bs as usize];
    for t in walk.tags {
        if walk
            .revoked
            .get(&t.block)
            .is_some_and(|&r| !after(t.sequence, r))
        {
            continue;
        }
        // Bounded by the volume, not by the old superblock's count: a
        // filesystem grown online has its new blocks' copies in the journal.
        let within = t.block.checked_mul(bs).and_then(|at| at.checked_add(bs));
        if within.is_none_or(|end| end > disk.size()) {
            return Err(corrupt(format!(
                "transaction {} copies block {}, beyond the volume's {} bytes",
                t.sequence,
                t.block,
                disk.size()
            )));
        }
        // The kernel writes copies home as it goes, so a copy meant for a
        // block of the journal would change what it reads next: only a
        // crafted journal does that.
        let at = t.block * bs;
        let i = journal_bytes.partition_point(|r| r.end <= at);
        if journal_bytes.get(i).is_some_and(|r| r.start <= at) {
            return Err(corrupt(format!(
                "transaction {} copies block {}, a block of the journal itself",
                t.sequence, t.block
            )));
        }
        if format.checksums() {
            log.read(t.at, &mut data)?;
            let c = crc32c(crc32c(format.seed, &t.sequence.to_be_bytes()), &data);
            let ok = if format.csum_v3 {
                c == t.checksum
            } else {
                c & 0xFFFF == t.checksum
            };
            if !ok {
                return Err(corrupt(format!(
                    "the copy of block {} in transaction {} fails its checksum",
                    t.block, t.sequence
                )));
            }
        }
        newest.insert(t.block, t);
    }
    let mut copies = Vec::with_capacity(newest.len());
    for t in newest.into_values() {
        copies.push(Copy {
            block: t.block,
            from: log.offset(t.at)?,
            escaped: t.escaped,
        });
    }
    Recovered::new(disk.clone(), bs, copies).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::disk::MemDisk as Mem;

    #[test]
    fn reads_cross_replayed_blocks_escapes_and_the_superblock() {
        // 1 KiB blocks: block 1 is the superblock; block 5's copy lies in
        // block 9 (escaped), block 6's in block 10.
        let mut img: Vec<u8> = (0..12 * 1024).map(|i| (i / 1024) as u8).collect();
        img[1024 + SB_INCOMPAT] = (INCOMPAT_RECOVER | 0x40) as u8;
        img[9 * 1024..9 * 1024 + 4].fill(0);
        let copies = vec![
            Copy {
                block: 6,
                from: 10 * 1024,
                escaped: false,
            },
            Copy {
                block: 5,
                from: 9 * 1024,
                escaped: true,
            },
        ];
        let r = Recovered::new(Arc::new(Mem(img.clone())), 1024, copies).unwrap();
        let mut want = img.clone();
        want[1024 + SB_INCOMPAT] = 0x40;
        want.copy_within(9 * 1024..11 * 1024, 5 * 1024);
        want[5 * 1024..5 * 1024 + 4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        // every window, from every offset, in pieces of awkward sizes
        for (from, len) in [
            (0, 12 * 1024),
            (1030, 5000),
            (5 * 1024 + 2, 3),
            (6000, 1),
            (5118, 2000),
        ] {
            let mut buf = vec![0u8; len];
            assert_eq!(r.read_at(from as u64, &mut buf).unwrap(), len);
            assert!(buf == want[from..from + len], "at {from} (+{len})");
        }
        // short only at the end
        let mut buf = vec![0u8; 100];
        assert_eq!(r.read_at(12 * 1024 - 10, &mut buf).unwrap(), 10);
        let touched = |offset, len| r.touches(&[Extent::Disk { offset, len }]);
        assert!(touched(6 * 1024 + 1023, 1) && touched(4 * 1024, 1025) && touched(1500, 1));
        assert!(!touched(7 * 1024, 4096) && !touched(2048, 3072) && !touched(0, 1024));
    }

    #[test]
    fn sequence_numbers_compare_across_their_wrap() {
        assert!(after(1, 0) && after(0, u32::MAX) && !after(5, 5) && !after(u32::MAX, 0));
    }
}
