//! Reading archive bytes through the pool: [`ArchiveReader`] turns byte
//! ranges into chunk requests, detects sequential access and drives
//! read-ahead, follows the read plans its callers announce
//! ([`ArchiveReader::plan_reads`]), and hands out zero-copy [`ChunkSlice`]s.
//!
//! It never reads chunk files itself (workers do) and never blocks a tokio
//! thread: async callers await a tokio oneshot; only `read_at_blocking`
//! sleeps, on a std channel, on its caller's thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::source::Source;
use super::state::{Lookup, WaitKind, Wakeup};
use super::{ChunkData, ChunkPool};
use crate::error::{Error, ErrorKind, Result};

/// Most chunks one [`ArchiveReader::plan_reads`] call announces; the rest
/// are read on demand.
pub const MAX_PLANNED_CHUNKS: usize = 4096;

/// Most chunks one read may span. A 16 MiB read spans at most 257 chunks of
/// a fixed index (64 KiB or more each) and about 17 of a dynamic index as
/// Proxmox Backup cuts them (1-16 MiB); a hostile dynamic index of 1-byte
/// chunks made one read plan millions of them, hundreds of MiB of requests.
pub const MAX_READ_CHUNKS: usize = 1024;

/// Longest range one `read_slices` call covers; longer requests are cut
/// short (callers loop), so one call never pins more than this in chunks.
pub const MAX_SLICES_BYTES: usize = 64 << 20;

/// A view of part of a decoded chunk.
#[derive(Clone, Debug)]
pub struct ChunkSlice {
    pub chunk: ChunkData,
    pub range: Range<usize>,
}

impl ChunkSlice {
    pub fn as_slice(&self) -> &[u8] {
        self.chunk.get(self.range.clone()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl AsRef<[u8]> for ChunkSlice {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Reads one archive (index or raw image). Clones share the
/// sequential-access state; every `ChunkPool::open_*` call makes a new one.
#[derive(Clone, Debug)]
pub struct ArchiveReader {
    inner: Arc<ReaderInner>,
}

#[derive(Debug)]
struct ReaderInner {
    pool: ChunkPool,
    source: Source,
    name: String,
    access: Mutex<Sequential>,
}

/// Sequential-access detection and the read-ahead window of one reader.
#[derive(Debug, Default)]
struct Sequential {
    /// Where the previous read ended.
    next_offset: Option<u64>,
    /// Last chunk the previous read touched.
    last_chunk: Option<usize>,
    /// Current read-ahead window in chunks (0: not sequential).
    window: usize,
    /// Chunks below this were already requested by read-ahead.
    ahead_end: usize,
    /// Chunks announced by [`ArchiveReader::plan_reads`].
    plan: Plan,
}

/// Chunks a caller announced it will read, loaded ahead a window at a time
/// as the reads arrive (in any order).
#[derive(Debug, Default)]
struct Plan {
    /// Announced chunks not requested yet, in the announced order; chunks
    /// read meanwhile are skipped when their turn comes.
    waiting: VecDeque<usize>,
    /// Every announced chunk and where it stands.
    chunks: HashMap<usize, Planned>,
    /// Chunks requested ahead and not read yet.
    requested: usize,
    /// Announced chunks not read yet.
    unread: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Planned {
    Waiting,
    Requested,
    Read,
}

impl Plan {
    /// A plan of `chunks`, in order, without repeats.
    fn new(chunks: Vec<usize>) -> Plan {
        Plan {
            unread: chunks.len(),
            chunks: chunks.iter().map(|&c| (c, Planned::Waiting)).collect(),
            waiting: chunks.into(),
            requested: 0,
        }
    }

    /// Records a read of chunks `first..=last`; returns whether it read
    /// announced chunks. Once every announced chunk was read, the first
    /// read elsewhere ends the plan.
    fn on_read(&mut self, (first, last): (usize, usize)) -> bool {
        if self.chunks.is_empty() {
            return false;
        }
        let mut planned = false;
        for c in first..=last {
            let Some(state) = self.chunks.get_mut(&c) else {
                continue;
            };
            planned = true;
            if *state == Planned::Requested {
                self.requested -= 1;
            }
            if *state != Planned::Read {
                self.unread -= 1;
            }
            *state = Planned::Read;
        }
        if !planned && self.unread == 0 {
            *self = Plan::default();
        }
        planned
    }

    /// The next chunks to request so that `window` are requested and not
    /// yet read.
    fn top_up(&mut self, window: usize) -> Vec<usize> {
        let mut out = Vec::new();
        while self.requested < window {
            let Some(c) = self.waiting.pop_front() else {
                break;
            };
            if let Some(state @ Planned::Waiting) = self.chunks.get_mut(&c) {
                *state = Planned::Requested;
                self.requested += 1;
                out.push(c);
            }
        }
        out
    }
}

impl Sequential {
    /// Records a read of chunks `first..=last` covering `[offset, end)`
    /// and returns the chunks to read ahead.
    fn on_read(
        &mut self,
        offset: u64,
        end: u64,
        (first, last): (usize, usize),
        max_window: usize,
        chunk_count: usize,
    ) -> Range<usize> {
        let sequential = self.next_offset == Some(offset)
            || self.last_chunk.and_then(|c| c.checked_add(1)) == Some(first);
        let entered_new_chunk = self.last_chunk != Some(last);
        self.next_offset = Some(end);
        self.last_chunk = Some(last);
        if !sequential || max_window == 0 {
            self.window = 0;
            self.ahead_end = 0;
            return 0..0;
        }
        if self.window == 0 {
            self.window = 2.min(max_window);
        } else if entered_new_chunk {
            self.window = self.window.saturating_mul(2).min(max_window);
        }
        let next = last.saturating_add(1);
        let from = next.max(self.ahead_end);
        let to = next.saturating_add(self.window).min(chunk_count);
        self.ahead_end = self.ahead_end.max(to);
        from..to.max(from)
    }
}

/// One chunk of a planned read: how to get it and which bytes of it.
pub(super) struct Part {
    chunk: usize,
    pub(super) lookup: Lookup,
    range: Range<usize>,
}

impl ArchiveReader {
    pub(super) fn new(pool: ChunkPool, source: Source, name: String) -> Self {
        ArchiveReader {
            inner: Arc::new(ReaderInner {
                pool,
                source,
                name,
                access: Mutex::new(Sequential::default()),
            }),
        }
    }

    /// Archive size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.source.size()
    }

    /// The name given when the archive was opened.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Bytes the archive's index holds in memory (about; 0 for a raw
    /// image, which has none).
    pub fn index_bytes(&self) -> usize {
        match &self.inner.source {
            Source::Index { index, .. } => index.memory_bytes(),
            Source::Raw(_) => 0,
        }
    }

    /// Zero-copy view of `[offset, offset+len)` clamped at EOF (and at
    /// [`MAX_SLICES_BYTES`]): the chunk buffers and the ranges inside them,
    /// in order. Empty at or past EOF.
    pub async fn read_slices(&self, offset: u64, len: usize) -> Result<Vec<ChunkSlice>> {
        let parts = self.plan(offset, len, WaitKind::Async)?;
        let mut slices = Vec::with_capacity(parts.len());
        for part in parts {
            let data = match part.lookup {
                Lookup::Ready(data) => data,
                Lookup::Wait(Wakeup::Async(rx)) => rx.await.map_err(|_| self.pool_stopped())??,
                Lookup::Wait(Wakeup::Blocking(rx)) => {
                    rx.recv().map_err(|_| self.pool_stopped())??
                }
            };
            slices.push(self.slice(part.chunk, data, part.range)?);
        }
        Ok(slices)
    }

    /// Copies `[offset, offset+buf.len())` into `buf`; returns the number
    /// of bytes copied, short only at EOF.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let slices = self
                .read_slices(offset.saturating_add(done as u64), buf.len() - done)
                .await?;
            if slices.is_empty() {
                break;
            }
            done = copy_slices(&slices, buf, done);
        }
        Ok(done)
    }

    /// [`read_at`](Self::read_at) for filesystem threads: blocks the
    /// calling thread. Must not be called on a tokio thread or a pool
    /// worker.
    pub fn read_at_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let parts = self.plan(
                offset.saturating_add(done as u64),
                buf.len() - done,
                WaitKind::Blocking,
            )?;
            if parts.is_empty() {
                break;
            }
            let mut slices = Vec::with_capacity(parts.len());
            for part in parts {
                let data = match part.lookup {
                    Lookup::Ready(data) => data,
                    Lookup::Wait(Wakeup::Blocking(rx)) => {
                        rx.recv().map_err(|_| self.pool_stopped())??
                    }
                    Lookup::Wait(Wakeup::Async(rx)) => {
                        rx.blocking_recv().map_err(|_| self.pool_stopped())??
                    }
                };
                slices.push(self.slice(part.chunk, data, part.range)?);
            }
            done = copy_slices(&slices, buf, done);
        }
        Ok(done)
    }

    /// Requests every chunk of `[offset, offset+len)` (clamped), then
    /// read-ahead if the access is sequential. Demand requests go first so
    /// they are dispatched before the read-ahead they trigger.
    pub(super) fn plan(&self, offset: u64, len: usize, wait: WaitKind) -> Result<Vec<Part>> {
        let source = &self.inner.source;
        let size = source.size();
        if len == 0 || offset >= size {
            return Ok(Vec::new());
        }
        let len = len.min(MAX_SLICES_BYTES) as u64;
        let end = offset.saturating_add(len).min(size);
        let first = self.chunk_at(offset)?;
        let last = self.chunk_at(end - 1)?;
        if last < first {
            return Err(self.corrupt_index(offset));
        }
        if last - first >= MAX_READ_CHUNKS {
            return Err(Error::unsupported(format!(
                "{}: {} bytes at offset {offset} lie in {} chunks, more than the \
                 {MAX_READ_CHUNKS} one read may span (chunks this small are no backup \
                 writer's)",
                self.inner.name,
                end - offset,
                last - first + 1
            )));
        }
        let shared = &self.inner.pool.shared;
        let mut parts = Vec::with_capacity(last - first + 1);
        let mut pos = offset;
        for i in first..=last {
            let chunk = source.chunk_range(i);
            if !chunk.contains(&pos) {
                return Err(self.corrupt_index(pos));
            }
            let lo = pos - chunk.start;
            pos = end.min(chunk.end);
            let hi = pos - chunk.start;
            let lookup = match source.zero_chunk(i) {
                Some(zeros) => {
                    shared.count_zero_read();
                    Lookup::Ready(zeros)
                }
                None => shared.demand(source.key(i), || source.load(i), wait),
            };
            parts.push(Part {
                chunk: i,
                lookup,
                range: lo as usize..hi as usize,
            });
        }
        if pos != end {
            return Err(self.corrupt_index(pos));
        }
        self.read_ahead(offset, end, first, last);
        Ok(parts)
    }

    /// Announces that `ranges` (byte ranges, clamped to the archive) will be
    /// read soon, roughly in this order: their chunks (at most
    /// [`MAX_PLANNED_CHUNKS`]) are loaded by the workers ahead of the
    /// reads, in parallel, a read-ahead window at a time, while reads of
    /// announced chunks take the place of sequential read-ahead. Read
    /// chunks age out of the cache like any other: callers announce
    /// metadata (directory blocks, inode tables), and the chunks holding it
    /// usually hold what is read next too (file data, the next directory's
    /// inodes). A later call replaces the plan. Only a hint: reads work the
    /// same without it.
    pub fn plan_reads(&self, ranges: &[Range<u64>]) {
        let source = &self.inner.source;
        let size = source.size();
        let count = source.chunk_count();
        // announced chunks, in the announced order
        let mut chunks: Vec<usize> = Vec::new();
        let mut seen: HashSet<usize> = HashSet::new();
        'ranges: for r in ranges {
            let end = r.end.min(size);
            if r.start >= end {
                continue;
            }
            let (Some(first), Some(last)) = (source.chunk_at(r.start), source.chunk_at(end - 1))
            else {
                continue;
            };
            for c in first..=last.min(count.saturating_sub(1)) {
                if seen.contains(&c) {
                    continue;
                }
                if chunks.len() >= MAX_PLANNED_CHUNKS {
                    break 'ranges;
                }
                seen.insert(c);
                chunks.push(c);
            }
        }
        let Some(&sample) = chunks.first() else {
            return;
        };
        // Two chunks per worker keep every worker busy without filling
        // the cache with chunks needed only later.
        let window = self
            .window(sample)
            .min(self.inner.pool.workers.saturating_mul(2));
        let ahead = {
            let mut access = self.inner.access.lock().unwrap_or_else(|p| p.into_inner());
            access.plan = Plan::new(chunks);
            access.plan.top_up(window)
        };
        self.prefetch(ahead, true);
    }

    /// The read-ahead window in chunks of the size of chunk `i`: at most
    /// half the cache, so that the other half keeps what readers are using
    /// (the chunks being read, filesystem metadata). With less room,
    /// read-ahead evicts chunks that are read again right after, e.g. the
    /// inode tables and the current data chunk of a tree extract.
    fn window(&self, i: usize) -> usize {
        let pool = &self.inner.pool;
        let chunk = self.inner.source.chunk_range(i);
        let chunk_len = usize::try_from(chunk.end.saturating_sub(chunk.start))
            .unwrap_or(usize::MAX)
            .max(1);
        pool.readahead.min(pool.cache_bytes / chunk_len / 2)
    }

    fn prefetch(&self, chunks: impl IntoIterator<Item = usize>, in_order: bool) {
        let source = &self.inner.source;
        let shared = &self.inner.pool.shared;
        for i in chunks {
            if source.zero_chunk(i).is_none() {
                if in_order {
                    shared.prefetch_in_order(source.key(i), || source.load(i));
                } else {
                    shared.prefetch(source.key(i), || source.load(i));
                }
            }
        }
    }

    fn read_ahead(&self, offset: u64, end: u64, first: usize, last: usize) {
        let max_window = self.window(last);
        let chunk_count = self.inner.source.chunk_count();
        let (ahead, planned) = {
            let mut access = self.inner.access.lock().unwrap_or_else(|p| p.into_inner());
            if access.plan.on_read((first, last)) {
                // an announced read: the plan knows what comes next
                access.next_offset = Some(end);
                access.last_chunk = Some(last);
                let window = max_window.min(self.inner.pool.workers.saturating_mul(2));
                (access.plan.top_up(window), true)
            } else {
                let range = access.on_read(offset, end, (first, last), max_window, chunk_count);
                (range.collect(), false)
            }
        };
        self.prefetch(ahead, planned);
    }

    fn chunk_at(&self, offset: u64) -> Result<usize> {
        let source = &self.inner.source;
        source
            .chunk_at(offset)
            .filter(|&i| i < source.chunk_count())
            .ok_or_else(|| self.corrupt_index(offset))
    }

    fn corrupt_index(&self, offset: u64) -> Error {
        Error::corrupt(format!(
            "{}: index has no consistent chunk for offset {offset}",
            self.inner.name
        ))
    }

    fn pool_stopped(&self) -> Error {
        Error::new(
            ErrorKind::Io,
            format!("{}: chunk pool stopped", self.inner.name),
        )
    }

    /// Checks a decoded chunk against the size the index gives it.
    fn slice(&self, i: usize, data: ChunkData, range: Range<usize>) -> Result<ChunkSlice> {
        let source = &self.inner.source;
        let chunk = source.chunk_range(i);
        let expected = chunk.end.saturating_sub(chunk.start);
        if data.len() as u64 != expected || range.end > data.len() {
            return Err(Error::corrupt(format!(
                "{} of {}: decoded to {} bytes, the index says {expected}",
                source.describe(i),
                self.inner.name,
                data.len()
            )));
        }
        Ok(ChunkSlice { chunk: data, range })
    }
}

/// Copies `slices` into `buf` from `done` on; returns the new fill level.
fn copy_slices(slices: &[ChunkSlice], buf: &mut [u8], mut done: usize) -> usize {
    for slice in slices {
        let bytes = slice.as_slice();
        let n = bytes.len().min(buf.len() - done);
        if let (Some(dst), Some(src)) = (buf.get_mut(done..done + n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::Sequential;

    #[test]
    fn window_starts_at_two_doubles_and_resets_on_jump() {
        let mut s = Sequential::default();
        let c = 4u64;
        assert_eq!(
            s.on_read(0, c, (0, 0), 8, 100),
            0..0,
            "first read is not sequential"
        );
        assert_eq!(s.on_read(c, 2 * c, (1, 1), 8, 100), 2..4);
        assert_eq!(s.on_read(2 * c, 3 * c, (2, 2), 8, 100), 4..7);
        assert_eq!(s.on_read(3 * c, 4 * c, (3, 3), 8, 100), 7..12);
        assert_eq!(s.on_read(4 * c, 5 * c, (4, 4), 8, 100), 12..13);
        // a jump resets; the next sequential read starts again at 2
        assert_eq!(s.on_read(50 * c, 51 * c, (50, 50), 8, 100), 0..0);
        assert_eq!(s.on_read(51 * c, 52 * c, (51, 51), 8, 100), 52..54);
        // clamped at the end of the index
        assert_eq!(s.on_read(52 * c, 53 * c, (52, 52), 8, 54), 54..54);
    }

    #[test]
    fn small_reads_inside_a_chunk_do_not_grow_the_window() {
        let mut s = Sequential::default();
        s.on_read(0, 1, (0, 0), 8, 100);
        assert_eq!(s.on_read(1, 2, (0, 0), 8, 100), 1..3);
        assert_eq!(s.on_read(2, 3, (0, 0), 8, 100), 3..3);
        assert_eq!(s.window, 2);
    }
}
