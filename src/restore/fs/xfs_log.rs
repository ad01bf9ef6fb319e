//! Whether an XFS log needs recovery, read from the log alone.
//!
//! Owns: finding the log's head (where the cycle number stamped in every
//! 512-byte log block drops back to the previous pass), reading the last
//! record's header before it, and walking the records from the tail it
//! names when that record is no clean unmount, to see whether they hold
//! anything but the covering transactions of an idle or frozen
//! filesystem. Must never replay anything, never read more than a bounded
//! number of log blocks, and never trust a length it has not checked; the
//! log's items are read in little-endian order (the machines whose
//! backups this reads).

use crate::error::{Error, Result};
use crate::le::{be32, be64, le16, le32, le64};
use crate::restore::disk::{read_exact_at, Disk};
use crate::restore::fs::ext_raw::crc32c;

/// A log record header's first word.
const LOG_MAGIC: u32 = 0xFEED_BABE;
/// Most 512-byte log blocks searched back from the head for the last
/// record's header: a record holds at most 256 KiB after its headers.
const LOG_SEARCH_BLOCKS: u64 = 1024;
/// Most records walked from the tail looking for more than the log's
/// covering transactions (there are two of those).
const LOG_COVER_RECORDS: u32 = 16;
/// Largest record taken for a covering one: the largest record (a log
/// stripe unit of 256 KiB pads every record to it).
const LOG_COVER_BYTES: usize = 256 << 10;
/// Data blocks whose stamped first words one header block keeps.
const CYCLE_WORDS: usize = 64;
/// Operation header flags: a transaction's start and commit, a region
/// continued in the next record and its rest in this one, a transaction's
/// last operation, an unmount record.
pub(super) const START_TRANS: u8 = 0x01;
pub(super) const COMMIT_TRANS: u8 = 0x02;
pub(super) const CONTINUE_TRANS: u8 = 0x04;
pub(super) const WAS_CONT_TRANS: u8 = 0x08;
pub(super) const END_TRANS: u8 = 0x10;
pub(super) const UNMOUNT_TRANS: u8 = 0x20;
/// Operation header client ids: transactions, and the log's own records.
pub(super) const CLIENT_TRANSACTION: u8 = 0x69;
pub(super) const CLIENT_LOG: u8 = 0xaa;
/// A transaction header's magic ("TRAN"), and the type of a buffer's log
/// item: the log's items are in the writing machine's byte order, little
/// endian on the machines this reads (a big-endian guest's log is taken
/// for one that needs recovery).
pub(super) const TRANS_MAGIC: u32 = 0x5452_414e;
pub(super) const ITEM_BUF: u16 = 0x123c;

/// The internal log: `blocks` 512-byte blocks from byte `start` of `disk`,
/// a circular buffer of records.
pub(super) struct Log<'a> {
    pub disk: &'a dyn Disk,
    pub start: u64,
    pub blocks: u64,
}

/// Where the live part of a log lies.
pub(super) struct Ends {
    /// the first block the next record would take
    pub head: u64,
    /// the first block of the oldest record recovery would read
    pub tail: u64,
    /// the cycle that record was written in
    pub tail_cycle: u32,
    /// the last record is a clean unmount ending at the head
    pub unmounted: bool,
}

/// One log record, its data blocks' first words put back.
pub(super) struct Record {
    /// cycle << 32 | block, as its header says
    pub lsn: u64,
    /// operations in its data
    pub ops: u32,
    /// its data, `h_len` bytes
    pub data: Vec<u8>,
    /// the block after it
    pub next: u64,
    /// whether its CRC32c (of a version 5 filesystem's log) holds; `None`
    /// when the header has none or it was not checked
    pub crc_ok: Option<bool>,
}

/// One operation of a record, as its 12-byte header says.
pub(super) struct Op {
    pub tid: u32,
    pub client: u8,
    pub flags: u8,
    /// where its payload starts in the record's data
    pub at: usize,
}

impl Record {
    /// Its operations in order, each with its payload; `None` in place of
    /// one whose header or payload runs past the data, and nothing after.
    pub fn ops(&self) -> impl Iterator<Item = Option<(Op, &[u8])>> + '_ {
        let (mut pos, mut broken) = (0usize, false);
        (0..self.ops).map_while(move |_| {
            if broken {
                return None;
            }
            let op = self.data.get(pos..pos + 12).and_then(|h| {
                let len = be32(h, 4) as usize;
                let payload = self.data.get(pos + 12..pos + 12 + len)?;
                let op = Op {
                    tid: be32(h, 0),
                    client: h[8],
                    flags: h[9],
                    at: pos + 12,
                };
                pos += 12 + len;
                Some((op, payload))
            });
            broken = op.is_none();
            Some(op)
        })
    }
}

impl Log<'_> {
    fn block(&self, i: u64) -> Result<[u8; 512]> {
        let mut b = [0u8; 512];
        read_exact_at(
            self.disk,
            self.start + i % self.blocks * 512,
            &mut b,
            "XFS log",
        )?;
        Ok(b)
    }

    /// `out.len() / 512` blocks from block `at`, wrapping at the log's end.
    fn blocks_at(&self, at: u64, out: &mut [u8]) -> Result<()> {
        let at = at % self.blocks;
        let first = (((self.blocks - at) * 512) as usize).min(out.len());
        let (a, b) = out.split_at_mut(first);
        read_exact_at(self.disk, self.start + at * 512, a, "XFS log")?;
        if !b.is_empty() {
            read_exact_at(self.disk, self.start, b, "XFS log")?;
        }
        Ok(())
    }

    /// Finds the head (where the cycle stamped in every block drops back
    /// to the previous pass, or the log's start when every block is of one
    /// pass), the last record before it and the tail that record names.
    pub fn ends(&self) -> Result<Ends> {
        let blocks = self.blocks;
        let cycle = |b: &[u8; 512]| {
            if be32(b, 0) == LOG_MAGIC {
                be32(b, 4)
            } else {
                be32(b, 0)
            }
        };
        let last = cycle(&self.block(blocks - 1)?);
        let head = if cycle(&self.block(0)?) == last {
            0
        } else {
            // block 0 is of the newer pass, the last block of the older one
            let (mut lo, mut hi) = (0, blocks - 1);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if cycle(&self.block(mid)?) == last {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            hi
        };
        for back in 1..=LOG_SEARCH_BLOCKS.min(blocks) {
            let at = (head + blocks - back) % blocks;
            let b = self.block(at)?;
            if be32(&b, 0) != LOG_MAGIC {
                continue;
            }
            let ops = be32(&b, 40);
            let (headers, data) = record_blocks(&b);
            let end = (at + headers + data) % blocks;
            let first_op = self.block(at + headers)?;
            let unmount = ops == 1 && first_op[9] & UNMOUNT_TRANS != 0;
            return Ok(Ends {
                head,
                tail: (be64(&b, 24) & 0xffff_ffff) % blocks,
                tail_cycle: (be64(&b, 24) >> 32) as u32,
                unmounted: unmount && end == head,
            });
        }
        Err(Error::corrupt("no log record before its head"))
    }

    /// The record whose header is at block `at`, of at most `max` bytes of
    /// data, its CRC checked when `verify`; `None` when there is no record
    /// header there or its lengths are not sane.
    pub fn record(&self, at: u64, max: usize, verify: bool) -> Result<Option<Record>> {
        let h = self.block(at)?;
        let (len, ops, size) = (be32(&h, 12) as usize, be32(&h, 40), be32(&h, 320) as usize);
        if be32(&h, 0) != LOG_MAGIC || len > max || size > max {
            return Ok(None);
        }
        let (headers, data_blocks) = record_blocks(&h);
        if headers + data_blocks > self.blocks {
            return Ok(None);
        }
        let (headers, data_blocks) = (headers as usize, data_blocks as usize);
        // Each data block's first word was stamped with the cycle; the
        // header keeps it for the first 64 blocks, the extended headers
        // (see `record_blocks`) for the rest.
        let mut raw = vec![0u8; (headers + data_blocks) * 512];
        self.blocks_at(at, &mut raw)?;
        let (hdrs, data) = raw.split_at(headers * 512);
        let crc_ok = (verify && le32(&h, 32) != 0).then(|| record_crc_ok(hdrs, data, len));
        let mut out = data.to_vec();
        for (i, block) in out.chunks_exact_mut(512).enumerate() {
            let (k, j) = (i / CYCLE_WORDS, i % CYCLE_WORDS);
            let Some(word) = hdrs.get(512 * k + if k == 0 { 44 } else { 4 } + 4 * j..) else {
                return Ok(None);
            };
            block[..4].copy_from_slice(&word[..4]);
        }
        out.truncate(len);
        Ok(Some(Record {
            lsn: be64(&h, 16),
            ops,
            data: out,
            next: (at + (headers + data_blocks) as u64) % self.blocks,
            crc_ok,
        }))
    }
}

/// Whether a record's CRC32c holds, as 64-bit machines lay out its header
/// (328 bytes) or as 32-bit ones do (324).
fn record_crc_ok(headers: &[u8], data: &[u8], len: usize) -> bool {
    let data = &data[..len.min(data.len())];
    [328, 324]
        .iter()
        .any(|&n| record_crc(headers, data, n) == le32(headers, 32))
}

/// A record's CRC32c (stored little-endian): it covers the first `header`
/// bytes of its header (the CRC field zeroed), each extended header's 260
/// bytes and its data as written (stamped).
pub(super) fn record_crc(headers: &[u8], data: &[u8], header: usize) -> u32 {
    let c = crc32c(!0, &headers[..32]);
    let c = crc32c(c, &[0; 4]);
    let mut c = crc32c(c, &headers[36..header]);
    for ext in headers.chunks_exact(512).skip(1) {
        c = crc32c(c, &ext[..260]);
    }
    !crc32c(c, data)
}

/// Whether the log of `blocks` 512-byte blocks at byte `start` holds
/// changes that recovery would replay: its last record is not an unmount
/// record ending at the head, and the records from its tail are more than
/// covering transactions.
pub(super) fn needs_recovery(disk: &dyn Disk, start: u64, blocks: u64) -> Result<bool> {
    let log = Log {
        disk,
        start,
        blocks,
    };
    let ends = log.ends()?;
    if ends.unmounted {
        return Ok(false);
    }
    // A log that was idle (or frozen, as a backup with a guest agent
    // freezes it) is "covered": the records from its tail on hold only
    // rewrites of the superblock, which recovery would leave as it is.
    Ok(!covered(&log, ends.tail, ends.head)?)
}

/// The header blocks and data blocks of the record whose header is `h`:
/// version 2 logs whose buffers (so records) may pass 32 KiB have as many
/// extended header blocks as the buffer size needs, as the kernel counts
/// them.
fn record_blocks(h: &[u8; 512]) -> (u64, u64) {
    let (version, len, size) = (be32(h, 8), be32(h, 12), be32(h, 320));
    let headers = if version & 2 != 0 && size > 512 * CYCLE_WORDS as u32 {
        u64::from(size.div_ceil(512 * CYCLE_WORDS as u32))
    } else {
        1
    };
    (headers, u64::from(len).div_ceil(512))
}

/// Whether every record from block `tail` to `head` holds only whole
/// transactions that rewrite the superblock (the log's covering
/// transactions), and nothing else.
fn covered(log: &Log, tail: u64, head: u64) -> Result<bool> {
    let mut at = tail;
    for _ in 0..LOG_COVER_RECORDS {
        if at == head {
            return Ok(true);
        }
        // Covering records are small, but padded to the log's sector or
        // stripe unit.
        let Some(rec) = log.record(at, LOG_COVER_BYTES, false)? else {
            return Ok(false);
        };
        let mut regions_left = 0u32;
        for op in rec.ops() {
            let Some((Op { flags, .. }, payload)) = op else {
                return Ok(false);
            };
            let n = payload.len();
            if flags & (CONTINUE_TRANS | WAS_CONT_TRANS) != 0 {
                return Ok(false);
            }
            if n == 0 || flags & UNMOUNT_TRANS != 0 {
                // a transaction's start or commit, an unmount record
            } else if regions_left > 0 {
                regions_left -= 1;
            } else if n == 16 && le32(payload, 0) == TRANS_MAGIC {
                // a transaction header
            } else if n >= 16
                && le16(payload, 0) == ITEM_BUF
                && le64(payload, 8) == 0
                && (1..=64).contains(&le16(payload, 6))
            {
                // the superblock's buffer (disk address 0, its sector: one
                // 512-byte block, or up to 64 with larger sectors): its
                // other regions follow
                regions_left = u32::from(le16(payload, 2)).saturating_sub(1);
            } else {
                return Ok(false);
            }
        }
        at = rec.next;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::disk::MemDisk;

    const BLOCKS: u64 = 64;

    /// A log of [`BLOCKS`] 512-byte blocks, each stamped with `cycles[i]`.
    fn log(cycles: impl Fn(u64) -> u32) -> Vec<u8> {
        let mut l = vec![0u8; BLOCKS as usize * 512];
        for i in 0..BLOCKS {
            let at = i as usize * 512;
            l[at..at + 4].copy_from_slice(&cycles(i).to_be_bytes());
        }
        l
    }

    /// Writes a record at block `at` (its data wrapping to the log's start
    /// as the kernel writes it: one cycle later): a header of `cycle`, then
    /// `data` blocks whose first operation has `flags`.
    fn record(l: &mut [u8], at: u64, cycle: u32, ops: u32, data: u64, flags: u8) {
        let h = at as usize * 512;
        l[h..h + 4].copy_from_slice(&LOG_MAGIC.to_be_bytes());
        l[h + 4..h + 8].copy_from_slice(&cycle.to_be_bytes());
        l[h + 8..h + 12].copy_from_slice(&2u32.to_be_bytes());
        l[h + 12..h + 16].copy_from_slice(&(data as u32 * 512).to_be_bytes());
        l[h + 40..h + 44].copy_from_slice(&ops.to_be_bytes());
        l[h + 320..h + 324].copy_from_slice(&32768u32.to_be_bytes());
        for k in 1..=data {
            let b = (at + k) % BLOCKS;
            let c = if at + k >= BLOCKS { cycle + 1 } else { cycle };
            let d = b as usize * 512;
            l[d..d + 4].copy_from_slice(&c.to_be_bytes());
            l[d + 9] = if k == 1 { flags } else { 0 };
        }
    }

    fn dirty(l: Vec<u8>) -> Result<bool> {
        needs_recovery(&MemDisk(l), 0, BLOCKS)
    }

    #[test]
    fn a_log_is_clean_only_when_its_last_record_is_an_unmount_at_the_head() {
        // as mkfs leaves it: an unmount record, then blocks never written
        let mut l = log(|i| u32::from(i < 2));
        record(&mut l, 0, 1, 1, 1, UNMOUNT_TRANS);
        assert!(!dirty(l.clone()).unwrap());
        // a transaction after it (logging a directory block)
        ops_record(&mut l, 2, 1, 2, &buffer_transaction(64, 8));
        assert!(dirty(l.clone()).unwrap());
        // and an unmount record after that
        for i in 4..6 {
            l[i * 512..i * 512 + 4].copy_from_slice(&1u32.to_be_bytes());
        }
        record(&mut l, 4, 1, 1, 1, UNMOUNT_TRANS);
        assert!(!dirty(l.clone()).unwrap());
        // an unmount flag on a record of several operations is no unmount
        // (and the log's tail is before the transaction)
        record(&mut l, 4, 1, 2, 1, UNMOUNT_TRANS);
        assert!(dirty(l).unwrap());
    }

    #[test]
    fn the_head_is_found_where_the_cycle_drops_and_across_the_log_end() {
        // second pass up to block 40, the first pass's blocks after it
        let mut l = log(|i| if i < 40 { 2 } else { 1 });
        record(&mut l, 38, 2, 1, 1, UNMOUNT_TRANS);
        assert!(!dirty(l.clone()).unwrap());
        ops_record(&mut l, 38, 2, 38, &buffer_transaction(64, 8));
        assert!(dirty(l).unwrap(), "the unmount record is not the last");
        // every block of one pass: the head is block 0
        let mut l = log(|_| 3);
        record(&mut l, BLOCKS - 2, 3, 1, 1, UNMOUNT_TRANS);
        assert!(!dirty(l).unwrap());
        // a record whose data wraps to the start, one cycle on
        let mut l = log(|i| if i < 1 { 4 } else { 3 });
        record(&mut l, BLOCKS - 1, 3, 1, 1, UNMOUNT_TRANS);
        assert!(!dirty(l.clone()).unwrap());
        record(&mut l, BLOCKS - 1, 3, 5, 1, 0x01);
        assert!(dirty(l).unwrap());
    }

    /// Writes a one-block record at block `at` of `cycle` whose tail is
    /// block `tail`, holding `ops` (flags, payload), as the kernel stamps
    /// it: the data block's first word moved into the header.
    fn ops_record(l: &mut [u8], at: u64, cycle: u32, tail: u64, ops: &[(u8, Vec<u8>)]) {
        padded_record(l, at, cycle, tail, ops, 1, 1);
    }

    /// [`ops_record`] padded to `blocks` blocks of data, as a log with
    /// 4 KiB sectors or a stripe unit writes its records, after `headers`
    /// header blocks (a version 2 log's buffer of `headers` x 32 KiB: the
    /// stamped first words of data blocks 64 on go into the extended
    /// headers).
    fn padded_record(
        l: &mut [u8],
        at: u64,
        cycle: u32,
        tail: u64,
        ops: &[(u8, Vec<u8>)],
        blocks: usize,
        headers: usize,
    ) {
        let mut data = Vec::new();
        for (flags, payload) in ops {
            data.extend_from_slice(&7u32.to_be_bytes());
            data.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            data.extend_from_slice(&[0x69, *flags, 0, 0]);
            data.extend_from_slice(payload);
        }
        assert!(data.len() <= 512 * blocks && blocks <= 64 * headers);
        data.resize(512 * blocks, 0);
        record(l, at, cycle, ops.len() as u32, 0, 0);
        let h = at as usize * 512;
        l[h + 12..h + 16].copy_from_slice(&(data.len() as u32).to_be_bytes());
        l[h + 24..h + 32].copy_from_slice(&(u64::from(cycle) << 32 | tail).to_be_bytes());
        l[h + 320..h + 324].copy_from_slice(&(headers as u32 * 32768).to_be_bytes());
        for (i, block) in data.chunks_exact_mut(512).enumerate() {
            let word = h + 512 * (i / 64) + if i < 64 { 44 } else { 4 } + 4 * (i % 64);
            l[word..word + 4].copy_from_slice(&block[..4]);
            block[..4].copy_from_slice(&cycle.to_be_bytes());
            let d = h + 512 * (headers + i);
            l[d..d + 512].copy_from_slice(block);
        }
    }

    /// A transaction logging one buffer of `blocks` blocks at disk address
    /// `daddr`.
    fn buffer_transaction(daddr: u64, blocks: u16) -> Vec<(u8, Vec<u8>)> {
        let mut trans = TRANS_MAGIC.to_le_bytes().to_vec();
        trans.extend_from_slice(&[0; 12]);
        let mut format = ITEM_BUF.to_le_bytes().to_vec();
        format.extend_from_slice(&2u16.to_le_bytes());
        format.extend_from_slice(&0u16.to_le_bytes());
        format.extend_from_slice(&blocks.to_le_bytes());
        format.extend_from_slice(&daddr.to_le_bytes());
        format.extend_from_slice(&[0; 8]);
        vec![
            (0x01, vec![]),
            (0, trans),
            (0, format),
            (0, b"XFSB".repeat(32)),
            (0x02, vec![]),
        ]
    }

    #[test]
    fn a_covered_log_is_clean_and_more_than_the_superblock_is_not() {
        // as an idle or frozen filesystem leaves it: two transactions
        // rewriting the superblock from the tail to the head
        let mut l = log(|i| u32::from(i < 14));
        ops_record(&mut l, 10, 1, 10, &buffer_transaction(0, 1));
        ops_record(&mut l, 12, 1, 10, &buffer_transaction(0, 1));
        assert!(!dirty(l.clone()).unwrap());
        // any other buffer in them needs recovery
        let mut other = l.clone();
        ops_record(&mut other, 10, 1, 10, &buffer_transaction(64, 8));
        assert!(dirty(other).unwrap());
        // and so does anything logged before the tail moved on
        let mut earlier = l.clone();
        ops_record(&mut earlier, 8, 1, 8, &buffer_transaction(64, 8));
        ops_record(&mut earlier, 12, 1, 8, &buffer_transaction(0, 1));
        assert!(dirty(earlier).unwrap());
        // padded to 4 KiB sectors, the superblock's buffer a whole sector:
        // still covering
        let mut padded = log(|i| u32::from(i < 26));
        padded_record(&mut padded, 10, 1, 10, &buffer_transaction(0, 8), 7, 1);
        padded_record(&mut padded, 18, 1, 10, &buffer_transaction(0, 8), 7, 1);
        assert!(!dirty(padded.clone()).unwrap());
        padded_record(&mut padded, 18, 1, 10, &buffer_transaction(64, 8), 7, 1);
        assert!(dirty(padded).unwrap());
        // padded to a 64 KiB stripe unit, in a log of 64 KiB buffers: two
        // header blocks, the second keeping data blocks 64 on
        let mut big = vec![0u8; 5 * BLOCKS as usize * 512];
        for i in 0..256 {
            big[i * 512..i * 512 + 4].copy_from_slice(&1u32.to_be_bytes());
        }
        let dirty_big = |l: Vec<u8>| needs_recovery(&MemDisk(l), 0, 5 * BLOCKS);
        padded_record(&mut big, 0, 1, 0, &buffer_transaction(0, 1), 126, 2);
        padded_record(&mut big, 128, 1, 0, &buffer_transaction(0, 1), 126, 2);
        assert!(!dirty_big(big.clone()).unwrap());
        padded_record(&mut big, 128, 1, 0, &buffer_transaction(64, 8), 126, 2);
        assert!(dirty_big(big).unwrap());
        // a region split over two records is not a covering transaction
        let mut split = buffer_transaction(0, 1);
        split[3].0 = 0x04;
        ops_record(&mut l, 12, 1, 10, &split);
        assert!(dirty(l).unwrap());
    }

    /// Logs of random cycles, headers and operations (lengths, counts
    /// and flags of any value) give an answer or an error, never a panic
    /// or a read outside the log.
    #[test]
    fn random_logs_never_panic() {
        let mut next = crate::testing::xorshift(0x9E37_79B9_7F4A_7C15u64);
        let mut seen = [0; 3];
        for _ in 0..3000 {
            let split = next() % BLOCKS;
            let mut l = log(|i| if i < split { 2 } else { 1 });
            for _ in 0..next() % 6 {
                let at = next() % BLOCKS;
                let ops = (0..next() % 6)
                    .map(|_| {
                        let n = (next() % 40) as usize;
                        let payload = (0..n).map(|_| next() as u8).collect();
                        (next() as u8, payload)
                    })
                    .collect::<Vec<_>>();
                if at + 1 < BLOCKS {
                    ops_record(&mut l, at, 1 + (next() % 2) as u32, next() % BLOCKS, &ops);
                }
                // and bytes anywhere, the header's lengths included
                let i = (next() % (BLOCKS * 512)) as usize;
                l[i] = next() as u8;
            }
            match dirty(l) {
                Ok(true) => seen[0] += 1,
                Ok(false) => seen[1] += 1,
                Err(_) => seen[2] += 1,
            }
        }
        // every answer came up
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }

    #[test]
    fn a_log_without_a_record_cannot_be_checked() {
        assert!(dirty(log(|i| u32::from(i < 10))).is_err());
        assert!(dirty(vec![0u8; 100]).is_err(), "a log cut short");
    }
}
