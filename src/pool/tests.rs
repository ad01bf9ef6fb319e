//! Pool tests on real chunk files in a temporary datastore.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::{Lookup, WaitKind, Wakeup};
use super::*;
use crate::error::ErrorKind;
use crate::store::blob;
use crate::store::fidx::FixedIndex;

const CS: u64 = 64 << 10;

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn text_bytes(len: usize) -> Vec<u8> {
    let line = b"The quick brown fox jumps over the lazy dog; restore-agent reads chunks.\n";
    line.iter().copied().cycle().take(len).collect()
}

/// Random chunks 0..6, text 6..11, all-zero 11..16, random 16..20, then a
/// short random last chunk.
fn mixed_image() -> Vec<u8> {
    let c = CS as usize;
    let mut img = random_bytes(1, 6 * c);
    img.extend(text_bytes(5 * c));
    img.extend(vec![0u8; 5 * c]);
    img.extend(random_bytes(2, 4 * c + 1234));
    img
}

/// A datastore holding `data` as a fixed index of `CS` chunks.
struct TestStore {
    _dir: tempfile::TempDir,
    chunks: Arc<ChunkStore>,
    index: Arc<FixedIndex>,
    data: Vec<u8>,
}

impl TestStore {
    fn new(data: Vec<u8>) -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".chunks")).unwrap();
        let chunks = Arc::new(ChunkStore::open(dir.path()).unwrap());
        let mut digests = Vec::new();
        for piece in data.chunks(CS as usize) {
            let digest = sha256(piece);
            let path = chunks.chunk_path(&digest);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            if !path.exists() {
                std::fs::write(&path, blob::encode(piece, true)).unwrap();
            }
            digests.push(digest);
        }
        let index =
            FixedIndex::new("test.img.fidx", data.len() as u64, CS, digests, [0; 16], 0).unwrap();
        TestStore {
            _dir: dir,
            chunks,
            index: Arc::new(index),
            data,
        }
    }

    fn reader(&self, pool: &ChunkPool) -> ArchiveReader {
        pool.open_index(
            Arc::clone(&self.chunks),
            self.index.clone(),
            "test.img.fidx".into(),
        )
    }

    fn chunk_path(&self, i: usize) -> PathBuf {
        self.chunks.chunk_path(self.index.chunk_digest(i))
    }

    fn chunk_count(&self) -> usize {
        self.index.chunk_count()
    }
}

fn pool(workers: usize, cache_bytes: usize, readahead: usize) -> ChunkPool {
    ChunkPool::new(PoolConfig {
        workers,
        cache_bytes,
        readahead,
    })
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Offsets and lengths around chunk boundaries, the short last chunk and EOF.
fn probes(size: u64) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    let lens = [
        0,
        1,
        7,
        4096,
        CS as usize - 1,
        CS as usize,
        CS as usize + 1,
        3 * CS as usize + 5,
    ];
    let mut offsets = vec![0, 1, size - 1, size, size + 10, size - 1234, size - 1235];
    for k in 1..(size / CS) {
        offsets.extend([k * CS - 1, k * CS, k * CS + 1]);
    }
    offsets.extend([12345, 6 * CS + 777, 11 * CS + 3, 15 * CS + CS / 2]);
    for (n, &off) in offsets.iter().enumerate() {
        for (m, &len) in lens.iter().enumerate() {
            if (n + m) % 3 == 0 || off >= size - 2 * CS {
                out.push((off, len));
            }
        }
    }
    out.push((0, size as usize));
    out.push((0, size as usize + 100));
    out
}

fn expected(data: &[u8], off: u64, len: usize) -> &[u8] {
    let start = (off as usize).min(data.len());
    let end = start.saturating_add(len).min(data.len());
    &data[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_equal_source_at_many_offsets_and_lengths() {
    let store = TestStore::new(mixed_image());
    let pool = pool(2, 1 << 20, 8);
    let reader = store.reader(&pool);
    assert_eq!(reader.size(), store.data.len() as u64);
    for (off, len) in probes(reader.size()) {
        let want = expected(&store.data, off, len);
        let mut buf = vec![0xa5u8; len];
        let n = reader.read_at(off, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], want, "read_at({off}, {len})");

        let slices = reader.read_slices(off, len).await.unwrap();
        let joined: Vec<u8> = slices.iter().flat_map(|s| s.as_slice().to_vec()).collect();
        assert_eq!(joined, want, "read_slices({off}, {len})");
        assert!(slices.iter().all(|s| !s.is_empty()));
    }
    // The blocking variant, from a plain thread.
    let store = Arc::new(store);
    let probes = probes(reader.size());
    let s = Arc::clone(&store);
    std::thread::spawn(move || {
        for (off, len) in probes {
            let mut buf = vec![0u8; len];
            let n = reader.read_at_blocking(off, &mut buf).unwrap();
            assert_eq!(
                &buf[..n],
                expected(&s.data, off, len),
                "blocking({off}, {len})"
            );
        }
    })
    .join()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_image_reads_equal_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut data = random_bytes(9, (RAW_CHUNK_SIZE as usize) + 12345);
    data[100..5000].fill(0);
    std::fs::write(&path, &data).unwrap();
    let pool = pool(2, 16 << 20, 8);
    let reader = pool.open_raw_image(&path, "disk".into()).unwrap();
    assert_eq!(reader.size(), data.len() as u64);
    let c = RAW_CHUNK_SIZE;
    let size = reader.size();
    for (off, len) in [
        (0, 10),
        (c - 3, 10),
        (c, 12345),
        (c, 12346),
        (size - 1, 5),
        (size, 5),
        (0, size as usize),
        (77, (c as usize) * 2),
    ] {
        let mut buf = vec![0u8; len];
        let n = reader.read_at(off, &mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            expected(&data, off, len),
            "raw read_at({off}, {len})"
        );
    }
    // Pseudo-chunks of two opens of one file are distinct cache entries
    // of the same content; both read right.
    let again = pool.open_raw_image(&path, "disk2".into()).unwrap();
    let mut buf = vec![0u8; 100];
    again.read_at(c + 1, &mut buf).await.unwrap();
    assert_eq!(&buf[..], &data[c as usize + 1..c as usize + 101]);

    let missing = pool.open_raw_image(&dir.path().join("nope"), "nope".into());
    assert_eq!(missing.unwrap_err().kind, ErrorKind::NotFound);
    let dir_err = pool.open_raw_image(dir.path(), "dir".into()).unwrap_err();
    assert_eq!(dir_err.kind, ErrorKind::IsADirectory);
}

/// Pages of the file at `path` that the kernel's page cache holds.
fn cached_pages(path: &std::path::Path) -> usize {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096;
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of `len` bytes of an open file,
    // only passed to mincore (never read through) and unmapped before the
    // file is closed; `resident` has one byte per page of it.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
        libc::munmap(map, len);
    }
    resident.iter().filter(|b| *b & 1 == 1).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_image_reads_leave_the_image_out_of_the_page_cache() {
    // The pool keeps what it read; a second copy in the kernel's page cache
    // only costs memory, and in the 128 MiB VM that pressure made the
    // guest kernel's vsock writes fail (ENOMEM) with two extractions at once.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let data = random_bytes(21, 3 * RAW_CHUNK_SIZE as usize + 4096);
    std::fs::write(&path, &data).unwrap();
    {
        let f = std::fs::File::open(&path).unwrap();
        f.sync_all().unwrap();
        super::load::forget_cached(&f, 0, 0); // 0: to the end of the file
    }
    if cached_pages(&path) > 0 {
        eprintln!("SKIPPED: this filesystem keeps file pages cached (tmpfs?)");
        return;
    }
    let pool = pool(2, 64 << 20, 8);
    let reader = pool.open_raw_image(&path, "disk".into()).unwrap();
    let mut buf = vec![0u8; data.len()];
    let n = reader.read_at(0, &mut buf).await.unwrap();
    assert!(n == data.len() && buf == data);
    let cached = cached_pages(&path);
    assert!(
        cached <= 64,
        "{cached} of {} pages of the image stay in the page cache",
        data.len() / 4096
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_one_chunk_share_one_read() {
    let store = TestStore::new(mixed_image());
    let pool = pool(2, 4 << 20, 0);
    let reader = store.reader(&pool);
    pool.shared.set_paused(true);
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let reader = reader.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1000];
                reader
                    .read_at(2 * CS + n * 100, &mut buf)
                    .await
                    .map(|_| buf)
            })
        })
        .collect();
    wait_until("8 readers waiting", || pool.stats().cache.misses == 8);
    assert_eq!(pool.stats().queued, 1, "one queued read for one digest");
    pool.shared.set_paused(false);
    for (n, task) in tasks.into_iter().enumerate() {
        let buf = task.await.unwrap().unwrap();
        assert_eq!(buf, expected(&store.data, 2 * CS + n as u64 * 100, 1000));
    }
    assert_eq!(pool.stats().reads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_every_waiter_and_are_not_cached() {
    let store = TestStore::new(mixed_image());
    let pool = pool(1, 4 << 20, 0);
    let reader = store.reader(&pool);
    let path = store.chunk_path(3);
    let mut raw = std::fs::read(&path).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0x40;
    std::fs::write(&path, &raw).unwrap();
    let hex = digest_hex(store.index.chunk_digest(3));

    pool.shared.set_paused(true);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.read_slices(3 * CS + 10, 10).await })
        })
        .collect();
    wait_until("4 readers waiting", || pool.stats().cache.misses == 4);
    pool.shared.set_paused(false);
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt);
        assert_eq!(err.kind.code(), 1004);
        assert!(err.message.contains(&hex), "{}", err.message);
    }
    assert_eq!(pool.stats().reads, 1);

    // Not cached: the next read reads the file again and fails again.
    let err = reader.read_slices(3 * CS, 1).await.unwrap_err();
    assert_eq!(err.kind.code(), 1004);
    assert_eq!(pool.stats().reads, 2);
    // A read spanning the bad chunk fails as a whole: never partial data.
    let mut buf = vec![0u8; 3 * CS as usize];
    assert_eq!(
        reader.read_at(2 * CS, &mut buf).await.unwrap_err().kind,
        ErrorKind::Corrupt
    );
    // Other chunks are fine.
    let mut buf = vec![0u8; 100];
    reader.read_at(4 * CS, &mut buf).await.unwrap();
    assert_eq!(buf, expected(&store.data, 4 * CS, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_file_shapes_are_1004() {
    let store = TestStore::new(mixed_image());
    let pool = pool(1, 4 << 20, 0);
    let reader = store.reader(&pool);
    // Another chunk's content under this digest's name, a truncated blob,
    // a file far larger than any blob of a 64 KiB chunk, and a file too
    // short for a blob header.
    std::fs::copy(store.chunk_path(1), store.chunk_path(0)).unwrap();
    let raw = std::fs::read(store.chunk_path(4)).unwrap();
    std::fs::write(store.chunk_path(4), &raw[..raw.len() / 2]).unwrap();
    std::fs::write(store.chunk_path(5), vec![1u8; 2 * CS as usize]).unwrap();
    // Shorter than a blob header.
    std::fs::write(store.chunk_path(6), &raw[..5]).unwrap();
    for i in [0u64, 4, 5, 6] {
        let err = reader.read_slices(i * CS, 1).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Corrupt, "chunk {i}: {}", err.message);
        let hex = digest_hex(store.index.chunk_digest(i as usize));
        assert!(err.message.contains(&hex), "{}", err.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_chunk_is_1001() {
    let store = TestStore::new(mixed_image());
    let pool = pool(1, 4 << 20, 0);
    let reader = store.reader(&pool);
    std::fs::remove_file(store.chunk_path(7)).unwrap();
    let err = reader.read_slices(7 * CS + 5, 5).await.unwrap_err();
    assert_eq!(err.kind.code(), 1001);
    assert!(err
        .message
        .contains(&digest_hex(store.index.chunk_digest(7))));
    let mut buf = vec![0u8; 10];
    assert_eq!(reader.read_at(6 * CS, &mut buf).await.unwrap(), 10);
    // Blocking readers on tokio's blocking threads get the same errors.
    let r = reader.clone();
    let err = tokio::task::spawn_blocking(move || r.read_at_blocking(7 * CS, &mut [0u8; 10]))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_chunk_is_served_without_io() {
    let store = TestStore::new(mixed_image());
    let pool = pool(1, 4 << 20, 8);
    let reader = store.reader(&pool);
    // Chunks 11..16 are all zeros and share one chunk file; remove it.
    let zero_path = store.chunk_path(11);
    assert_eq!(zero_path, store.chunk_path(15));
    std::fs::remove_file(&zero_path).unwrap();
    let mut buf = vec![1u8; 5 * CS as usize];
    let n = reader.read_at(11 * CS, &mut buf).await.unwrap();
    assert_eq!(n, buf.len());
    assert!(buf.iter().all(|&b| b == 0));
    let stats = pool.stats();
    assert_eq!(stats.reads, 0, "no chunk file read for zero chunks");
    assert_eq!(stats.zero_reads, 5);
    // Sequential reads through the zero run do not try to read ahead its file.
    for k in 11..16 {
        reader.read_slices(k * CS, CS as usize).await.unwrap();
    }
    wait_until("read-ahead done", || pool.stats().queued == 0);
    std::thread::sleep(Duration::from_millis(20));
    let zero_key = ChunkKey::Digest(*store.index.chunk_digest(11));
    let dispatched = pool.shared.lock().dispatched.clone();
    assert!(
        !dispatched.is_empty(),
        "read-ahead went on past the zero run"
    );
    assert!(
        !dispatched.contains(&zero_key),
        "read-ahead skips zero chunks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_bounded_in_bytes() {
    let store = TestStore::new(random_bytes(5, 12 * CS as usize));
    // three chunks and their bookkeeping fit, four do not
    let capacity = 3 * CS as usize + 1000;
    let pool = pool(2, capacity, 0);
    let reader = store.reader(&pool);
    for round in 0..2 {
        for i in 0..store.chunk_count() as u64 {
            reader.read_slices(i * CS, 10).await.unwrap();
            let stats = pool.stats();
            assert!(stats.cache.bytes <= capacity, "{stats:?}");
        }
        assert_eq!(
            pool.stats().reads,
            12 * (round + 1),
            "LRU evicted the old chunks"
        );
    }
    let bytes = pool.stats().cache.bytes;
    assert!((3 * CS as usize..=capacity).contains(&bytes), "{bytes}");
    // The most recent chunks are hits.
    let reads = pool.stats().reads;
    reader.read_slices(11 * CS, 10).await.unwrap();
    reader.read_slices(10 * CS, 10).await.unwrap();
    assert_eq!(pool.stats().reads, reads);
    assert!(pool.stats().cache.hits >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_larger_than_cache_is_not_cached() {
    let store = TestStore::new(random_bytes(6, 2 * CS as usize));
    let pool = pool(1, CS as usize / 2, 0);
    let reader = store.reader(&pool);
    for _ in 0..2 {
        let mut buf = vec![0u8; 100];
        reader.read_at(5, &mut buf).await.unwrap();
        assert_eq!(buf, expected(&store.data, 5, 100));
    }
    let stats = pool.stats();
    assert_eq!(stats.reads, 2);
    assert_eq!(stats.cache.bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_keyed_by_digest_across_archives() {
    let store = TestStore::new(mixed_image());
    let pool = pool(1, 4 << 20, 0);
    let a = store.reader(&pool);
    let b = store.reader(&pool);
    let mut buf = vec![0u8; 100];
    a.read_at(CS, &mut buf).await.unwrap();
    b.read_at(CS, &mut buf).await.unwrap();
    assert_eq!(pool.stats().reads, 1);
    assert_eq!(pool.stats().cache.hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_scan_is_read_ahead() {
    let store = TestStore::new(random_bytes(7, 40 * CS as usize));
    let pool = pool(2, 40 * CS as usize, 8);
    let reader = store.reader(&pool);
    let step = 16 << 10;
    let mut off = 0;
    while off < reader.size() {
        let slices = reader.read_slices(off, step).await.unwrap();
        let got: Vec<u8> = slices.iter().flat_map(|s| s.as_slice().to_vec()).collect();
        assert_eq!(got, expected(&store.data, off, step));
        off += step as u64;
    }
    let stats = pool.stats();
    assert!(stats.cache.readahead_hits >= 30, "{stats:?}");
    assert_eq!(stats.reads, 40, "every chunk read exactly once: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_access_is_not_read_ahead() {
    let store = TestStore::new(random_bytes(8, 40 * CS as usize));
    let pool = pool(2, 40 * CS as usize, 8);
    let reader = store.reader(&pool);
    // Never the next chunk, never where the previous read ended.
    let order = [17u64, 3, 29, 8, 36, 12, 0, 22, 5, 39, 14, 31, 26, 1, 19];
    for &i in &order {
        let mut buf = vec![0u8; 300];
        reader.read_at(i * CS + 100, &mut buf).await.unwrap();
        assert_eq!(buf, expected(&store.data, i * CS + 100, 300));
    }
    std::thread::sleep(Duration::from_millis(20));
    let stats = pool.stats();
    assert_eq!(stats.cache.readahead_hits, 0, "{stats:?}");
    assert_eq!(
        stats.reads,
        order.len() as u64,
        "no speculative reads: {stats:?}"
    );
}

/// Reads chunks 0..5 whole, in order, waits until the read-ahead they
/// started is done, and returns the chunk loads so far.
async fn loads_after_reading_five_chunks(store: &TestStore, pool: &ChunkPool) -> u64 {
    let reader = store.reader(pool);
    for i in 0..5 {
        reader.read_slices(i * CS, CS as usize).await.unwrap();
    }
    wait_until("read-ahead drained", || pool.stats().queued == 0);
    std::thread::sleep(Duration::from_millis(50));
    pool.stats().reads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_stops_when_the_reader_stops() {
    let store = TestStore::new(random_bytes(10, 40 * CS as usize));
    let pool = pool(2, 40 * CS as usize, 8);
    let reads = loads_after_reading_five_chunks(&store, &pool).await;
    // Chunks 0..5 plus at most one full window beyond them.
    assert!((6..=5 + 8).contains(&reads), "reads {reads}");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        pool.stats().reads,
        reads,
        "nothing more once the reader stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_takes_at_most_half_the_cache() {
    let store = TestStore::new(random_bytes(11, 40 * CS as usize));
    let pool = pool(2, 8 * CS as usize, 8);
    let reads = loads_after_reading_five_chunks(&store, &pool).await;
    // Chunks 0..5 plus a window of at most 4 (half of the 8-chunk cache).
    assert!((6..=5 + 4).contains(&reads), "reads {reads}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_reads_are_dispatched_in_inode_order() {
    let store = TestStore::new(random_bytes(11, 12 * CS as usize));
    let pool = pool(1, 16 << 20, 0);
    let reader = store.reader(&pool);
    let inode = |i: usize| std::fs::metadata(store.chunk_path(i)).unwrap().ino();
    // Request in descending inode order (so FIFO would be the reverse of
    // what we want), interleaved to avoid any sequential pattern.
    let mut chunks: Vec<usize> = (0..store.chunk_count()).collect();
    chunks.sort_by_key(|&i| std::cmp::Reverse(inode(i)));
    pool.shared.set_paused(true);
    let mut waits = Vec::new();
    for &i in &chunks {
        let mut parts = reader.plan(i as u64 * CS + 1, 1, WaitKind::Async).unwrap();
        let Lookup::Wait(Wakeup::Async(rx)) = parts.remove(0).lookup else {
            panic!("chunk {i} was not queued");
        };
        waits.push(rx);
    }
    assert_eq!(pool.stats().queued, chunks.len());
    pool.shared.set_paused(false);
    for rx in waits {
        rx.await.unwrap().unwrap();
    }
    let dispatched: Vec<u64> = pool
        .shared
        .lock()
        .dispatched
        .iter()
        .map(|key| {
            let i = (0..store.chunk_count())
                .find(|&i| ChunkKey::Digest(*store.index.chunk_digest(i)) == *key)
                .unwrap();
            inode(i)
        })
        .collect();
    let mut sorted = dispatched.clone();
    sorted.sort_unstable();
    assert_eq!(dispatched, sorted, "dispatch follows inode order");
    assert_eq!(dispatched.len(), chunks.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_joins_a_queued_read_ahead_and_counts_as_its_hit() {
    let store = TestStore::new(random_bytes(12, 10 * CS as usize));
    let pool = pool(1, 16 << 20, 8);
    let reader = store.reader(&pool);
    reader.read_slices(0, 10).await.unwrap();
    pool.shared.set_paused(true);
    // Sequential: chunk 1 is demanded, chunks 2 and 3 are read ahead.
    let first = reader.plan(CS, 10, WaitKind::Async).unwrap();
    assert_eq!(pool.stats().queued, 3);
    let second = reader.plan(2 * CS, 10, WaitKind::Async).unwrap();
    assert_eq!(pool.stats().cache.readahead_hits, 1);
    pool.shared.set_paused(false);
    for part in first.into_iter().chain(second) {
        if let Lookup::Wait(Wakeup::Async(rx)) = part.lookup {
            rx.await.unwrap().unwrap();
        }
    }
    // Chunk 2 was read once, for both.
    let dispatched = pool.shared.lock().dispatched.clone();
    let key2 = ChunkKey::Digest(*store.index.chunk_digest(2));
    assert_eq!(dispatched.iter().filter(|k| **k == key2).count(), 1);
}

#[test]
fn dropping_the_last_handle_stops_the_workers() {
    let store = TestStore::new(random_bytes(13, 2 * CS as usize));
    let pool = pool(2, 1 << 20, 0);
    let shared = Arc::downgrade(&pool.shared);
    let reader = store.reader(&pool);
    let mut buf = vec![0u8; 10];
    reader.read_at_blocking(0, &mut buf).unwrap();
    drop(pool);
    assert!(shared.upgrade().is_some(), "readers keep the pool alive");
    drop(reader);
    wait_until("workers exit", || shared.upgrade().is_none());
}

#[test]
fn stats_serialize_with_the_status_field_names() {
    let pool = pool(3, 1000, 2);
    let json = serde_json::to_value(pool.stats()).unwrap();
    assert_eq!(json["workers"], 3);
    assert_eq!(json["queued"], 0);
    assert_eq!(json["cache"]["capacity"], 1000);
    for field in ["bytes", "hits", "misses", "readahead_hits"] {
        assert_eq!(json["cache"][field], 0, "{field}");
    }
}

/// Writes `pieces` as chunk files of `store` and returns the didx entries.
fn write_dynamic(store: &TestStore, pieces: &[&[u8]]) -> Vec<(u64, Digest)> {
    let mut end = 0;
    pieces
        .iter()
        .map(|piece| {
            let digest = sha256(piece);
            let path = store.chunks.chunk_path(&digest);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, blob::encode(piece, true)).unwrap();
            end += piece.len() as u64;
            (end, digest)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_index_reads_equal_source() {
    use crate::store::didx::DynamicIndex;
    let store = TestStore::new(Vec::new());
    let data = mixed_image();
    let cuts = [
        0,
        1,
        1000,
        70_000,
        70_005,
        300_000,
        300_001,
        700_000,
        1_000_000,
        data.len(),
    ];
    let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
    let entries = write_dynamic(&store, &pieces);
    let index = Arc::new(DynamicIndex::new("root.pxar.didx", &entries, [0; 16], 0).unwrap());
    let pool = pool(2, 4 << 20, 8);
    let reader = pool.open_index(store.chunks.clone(), index, "root.pxar.didx".into());
    assert_eq!(reader.size(), data.len() as u64);
    let mut probes = Vec::new();
    for &c in &cuts {
        for off in [c.saturating_sub(1), c, c + 1] {
            for len in [1, 2, 999, 70_000, 400_000] {
                probes.push((off as u64, len));
            }
        }
    }
    probes.push((0, data.len()));
    for (off, len) in probes {
        let mut buf = vec![0u8; len];
        let n = reader.read_at(off, &mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            expected(&data, off, len),
            "didx read_at({off}, {len})"
        );
    }
    // Each distinct chunk was read once (the cache holds them all).
    assert_eq!(pool.stats().reads, pieces.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_decoding_to_more_than_its_index_range_is_1004() {
    use crate::store::didx::DynamicIndex;
    let store = TestStore::new(Vec::new());
    let big = random_bytes(20, 5000);
    let small = random_bytes(21, 100);
    let mut entries = write_dynamic(&store, &[&small, &big]);
    // The index claims the second chunk is 1000 bytes long.
    entries[1].0 = entries[0].0 + 1000;
    let index = Arc::new(DynamicIndex::new("lying.didx", &entries, [0; 16], 0).unwrap());
    let pool = pool(1, 1 << 20, 0);
    let reader = pool.open_index(store.chunks.clone(), index, "lying.didx".into());
    let err = reader.read_slices(200, 10).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Corrupt, "{}", err.message);
    assert!(
        err.message.contains(&digest_hex(&entries[1].1)),
        "{}",
        err.message
    );
    // The honest chunk still reads.
    let slices = reader.read_slices(0, 100).await.unwrap();
    assert_eq!(slices[0].as_slice(), &small[..]);
}

/// (read syscalls, bytes read) so far by the thread named `name`.
fn thread_reads(name: &str) -> (u64, u64) {
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let io = std::fs::read_to_string(task.join("io")).unwrap();
        let field = |key: &str| -> u64 {
            io.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().parse().unwrap())
                .unwrap()
        };
        return (field("syscr:"), field("rchar:"));
    }
    panic!("no thread named {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_file_is_read_in_one_read_call() {
    let store = TestStore::new(mixed_image());
    let pool = pool(1, 4 << 20, 0);
    let reader = store.reader(&pool);
    let worker = super::worker::worker_name(pool.id, 0);
    wait_until("worker started", || {
        std::fs::read_dir("/proc/self/task").unwrap().any(|t| {
            std::fs::read_to_string(t.unwrap().path().join("comm"))
                .is_ok_and(|c| c.trim_end() == worker)
        })
    });
    for i in [0usize, 7] {
        let file_len = std::fs::metadata(store.chunk_path(i)).unwrap().len();
        let (calls, bytes) = thread_reads(&worker);
        reader.read_slices(i as u64 * CS, 1).await.unwrap();
        let (calls2, bytes2) = thread_reads(&worker);
        assert_eq!(calls2 - calls, 1, "chunk {i}: one read syscall");
        assert_eq!(bytes2 - bytes, file_len, "chunk {i}: the whole file");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn async_reads_never_block_the_runtime_thread() {
    let store = TestStore::new(mixed_image());
    let pool = pool(1, 4 << 20, 0);
    let reader = store.reader(&pool);
    pool.shared.set_paused(true);
    // Safety net: a blocking implementation would hold the only runtime
    // thread until this resumes the pool.
    let shared = Arc::clone(&pool.shared);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = Arc::clone(&done);
    let net = std::thread::spawn(move || {
        let start = Instant::now();
        while !finished.load(std::sync::atomic::Ordering::Relaxed)
            && start.elapsed() < Duration::from_secs(3)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        shared.set_paused(false);
    });
    let read = tokio::spawn(async move { reader.read_slices(CS, 10).await });
    let start = Instant::now();
    let mut runtime_free_while_waiting = false;
    while start.elapsed() < Duration::from_secs(2) {
        tokio::task::yield_now().await;
        if pool.stats().queued == 1 && pool.shared.lock().paused {
            runtime_free_while_waiting = true;
            break;
        }
    }
    pool.shared.set_paused(false);
    let slices = read.await.unwrap().unwrap();
    assert_eq!(slices[0].as_slice(), expected(&store.data, CS, 10));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    net.join().unwrap();
    assert!(runtime_free_while_waiting, "the runtime thread was blocked");
}

#[test]
fn announced_reads_load_ahead_in_the_announced_order() {
    let store = TestStore::new(random_bytes(30, 12 * CS as usize));
    let pool = pool(2, 12 * CS as usize, 8);
    let reader = store.reader(&pool);
    let announced = [7usize, 2, 9, 4, 11, 0];
    let ranges: Vec<_> = announced
        .iter()
        .map(|&c| c as u64 * CS + 100..c as u64 * CS + 200)
        .collect();
    pool.shared.set_paused(true);
    reader.plan_reads(&ranges);
    // two chunks per worker are requested ahead
    assert_eq!(pool.stats().queued, 4);
    pool.shared.set_paused(false);
    for &c in &announced {
        let mut buf = vec![0u8; 100];
        reader
            .read_at_blocking(c as u64 * CS + 100, &mut buf)
            .unwrap();
        assert_eq!(buf, expected(&store.data, c as u64 * CS + 100, 100));
    }
    let stats = pool.stats();
    assert_eq!(stats.reads, announced.len() as u64, "{stats:?}");
    assert!(stats.cache.readahead_hits >= 4, "{stats:?}");
    let dispatched = pool.shared.lock().dispatched.clone();
    let order: Vec<ChunkKey> = announced
        .iter()
        .map(|&c| ChunkKey::Digest(*store.index.chunk_digest(c)))
        .collect();
    assert_eq!(dispatched, order, "dispatched in the announced order");
}

#[test]
fn announced_reads_replace_sequential_read_ahead_until_done() {
    let store = TestStore::new(random_bytes(31, 16 * CS as usize));
    let pool = pool(2, 16 * CS as usize, 8);
    let reader = store.reader(&pool);
    // chunks 2..=4 announced, then read sequentially in small steps
    reader.plan_reads(&[2 * CS..3 * CS, 3 * CS..5 * CS]);
    let mut off = 2 * CS;
    while off < 5 * CS {
        let mut buf = vec![0u8; 4096];
        reader.read_at_blocking(off, &mut buf).unwrap();
        off += 4096;
    }
    std::thread::sleep(Duration::from_millis(30));
    let stats = pool.stats();
    assert_eq!(stats.reads, 3, "nothing read beyond the plan: {stats:?}");
    // once the plan is done, sequential reads elsewhere are read ahead again
    let mut off = 8 * CS;
    while off < 11 * CS {
        let mut buf = vec![0u8; 4096];
        reader.read_at_blocking(off, &mut buf).unwrap();
        off += 4096;
    }
    wait_until("read-ahead past chunk 10", || pool.stats().reads > 6);
}

#[test]
fn announced_chunks_that_are_read_again_stay_cached() {
    // A tree walk announces a directory's blocks inside the data chunk it is
    // reading, then goes on reading that chunk: it must not be evicted first.
    let store = TestStore::new(random_bytes(32, 10 * CS as usize));
    let pool = pool(1, 4 * CS as usize, 0);
    let reader = store.reader(&pool);
    let mut buf = vec![0u8; 100];
    let mut read = |c: u64| {
        reader.read_at_blocking(c * CS + 100, &mut buf).unwrap();
        assert_eq!(buf, expected(&store.data, c * CS + 100, 100));
    };
    for c in [0, 5, 6] {
        read(c);
    }
    reader.plan_reads(std::slice::from_ref(&(100..200)));
    read(0);
    for c in [7, 8] {
        read(c);
    }
    let before = pool.stats().reads;
    assert_eq!(before, 5, "{:?}", pool.stats());
    // the 4-chunk cache made room by dropping chunk 5, used least recently
    read(0);
    assert_eq!(pool.stats().reads, before, "{:?}", pool.stats());
    read(5);
    assert_eq!(pool.stats().reads, before + 1);
}
