//! The chunk read pool: every archive byte the agent serves is read through
//! it.
//!
//! A fixed set of worker threads reads chunk files whole (one read each),
//! decompresses and verifies SHA-256 (which covers what the blob's CRC
//! would, see `blob::decode_payload`); concurrent requests for
//! one chunk share a read; decoded chunks sit in a byte-bounded LRU cache
//! keyed by digest; sequential readers get read-ahead, and readers that
//! announce what they will read get it loaded ahead in parallel; the
//! all-zero chunk costs no I/O; queued reads are dispatched in inode order
//! (announced ones in the announced order). This follows
//! Proxmox Backup's large-chunk argument, MAX(ACS) = ACS / (AST + ACS/MRS):
//! few, large, sequential reads.
//!
//! The pool only reads: it never writes to a datastore or an image, and it
//! never does I/O on a tokio thread.

mod cache;
mod load;
mod reader;
mod source;
mod state;
mod worker;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub use load::RAW_CHUNK_SIZE;
pub use reader::{ArchiveReader, ChunkSlice, MAX_SLICES_BYTES};

use crate::error::{Error, ErrorKind, Result};
use crate::store::chunk_store::ChunkStore;
use crate::store::index::ChunkIndex;
use crate::store::{digest_hex, sha256, Digest, MAX_CHUNK_SIZE};
use load::RawImage;
use source::{Source, ZeroChunk};
use state::Shared;

/// A decoded chunk, shared by the cache and every reader holding it.
pub type ChunkData = Arc<Vec<u8>>;

/// Identifies a decoded chunk in the cache and the single-flight table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChunkKey {
    /// A datastore chunk: the same digest is the same data in any archive.
    Digest(Digest),
    /// Pseudo-chunk `chunk` of raw image `image` (an id per open).
    Raw { image: u64, chunk: u64 },
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkKey::Digest(d) => write!(f, "chunk {}", digest_hex(d)),
            ChunkKey::Raw { image, chunk } => write!(f, "image #{image} chunk {chunk}"),
        }
    }
}

/// Pool sizing.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Worker threads (default: number of cores).
    pub workers: usize,
    /// Cache capacity in bytes of decoded chunks (default 48 MiB).
    pub cache_bytes: usize,
    /// Largest read-ahead window in chunks (default 8; 0 disables it).
    pub readahead: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cache_bytes: 48 << 20,
            readahead: 8,
        }
    }
}

/// The `pool` section of `status` (plus the cache section).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PoolStats {
    pub workers: usize,
    /// Reads waiting for a worker.
    pub queued: usize,
    /// Chunk loads run by workers (file reads, or raw-image reads).
    pub reads: u64,
    /// Reads of the all-zero chunk served without I/O.
    pub zero_reads: u64,
    pub cache: CacheStats,
}

/// The `cache` section of `status`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    pub bytes: usize,
    pub capacity: usize,
    pub hits: u64,
    pub misses: u64,
    pub readahead_hits: u64,
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(0);

/// A handle to the pool; clones are cheap and share it. The workers stop
/// when the last handle (including those inside readers) is dropped.
#[derive(Clone)]
pub struct ChunkPool {
    /// Names this pool's worker threads.
    id: u64,
    shared: Arc<Shared>,
    workers: usize,
    cache_bytes: usize,
    readahead: usize,
    /// All-zero chunk per chunk size, computed once.
    zero_chunks: Arc<Mutex<HashMap<u64, ZeroChunk>>>,
    /// Cache identity of each raw image file, by (device, inode): readers
    /// of one image on different connections share its cached chunks.
    image_ids: Arc<Mutex<HashMap<(u64, u64), u64>>>,
    _stopper: Arc<Stopper>,
}

impl fmt::Debug for ChunkPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkPool")
            .field("id", &self.id)
            .field("workers", &self.workers)
            .field("cache_bytes", &self.cache_bytes)
            .field("readahead", &self.readahead)
            .finish()
    }
}

/// Shuts the workers down when the last pool handle goes away.
struct Stopper(Arc<Shared>);

impl Drop for Stopper {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl ChunkPool {
    /// Starts `cfg.workers` worker threads (at least one).
    pub fn new(cfg: PoolConfig) -> ChunkPool {
        let workers = cfg.workers.max(1);
        // Read-ahead never queues more than a full window per worker.
        let readahead_queue_limit = cfg.readahead.saturating_mul(workers.max(2));
        let shared = Arc::new(Shared::new(cfg.cache_bytes, readahead_queue_limit));
        let pool_id = NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed);
        let started = worker::spawn_workers(&shared, workers, pool_id).len();
        ChunkPool {
            id: pool_id,
            _stopper: Arc::new(Stopper(Arc::clone(&shared))),
            shared,
            workers: started,
            cache_bytes: cfg.cache_bytes,
            readahead: cfg.readahead,
            zero_chunks: Arc::new(Mutex::new(HashMap::new())),
            image_ids: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A reader over an index whose chunks live in `chunks`.
    pub fn open_index(
        &self,
        chunks: Arc<ChunkStore>,
        index: Arc<dyn ChunkIndex>,
        name: String,
    ) -> ArchiveReader {
        let zero = index
            .fixed_chunk_size()
            .filter(|&size| size > 0 && size <= MAX_CHUNK_SIZE as u64)
            .map(|size| self.zero_chunk(size));
        ArchiveReader::new(
            self.clone(),
            Source::Index {
                chunks,
                index,
                zero,
            },
            name,
        )
    }

    /// A reader over a raw image (file or block device), opened read-only
    /// and served as [`RAW_CHUNK_SIZE`] pseudo-chunks.
    fn image_id(&self, dev: u64, ino: u64) -> u64 {
        let mut ids = self.image_ids.lock().unwrap_or_else(|p| p.into_inner());
        let next = ids.len() as u64;
        *ids.entry((dev, ino)).or_insert(next)
    }

    pub fn open_raw_image(&self, path: &Path, name: String) -> Result<ArchiveReader> {
        let what = || format!("image {name} ({})", path.display());
        let mut file = File::open(path).map_err(|e| Error::io(what(), &e))?;
        let meta = file.metadata().map_err(|e| Error::io(what(), &e))?;
        if meta.is_dir() {
            return Err(Error::new(
                ErrorKind::IsADirectory,
                format!("{}: is a directory", what()),
            ));
        }
        // Block devices report size 0 in metadata; the end offset is right.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(what(), &e))?;
        let image = RawImage {
            file,
            size,
            id: self.image_id(meta.dev(), meta.ino()),
            name: name.clone(),
            inode: meta.ino(),
        };
        Ok(ArchiveReader::new(
            self.clone(),
            Source::Raw(Arc::new(image)),
            name,
        ))
    }

    /// Counters for `status`.
    pub fn stats(&self) -> PoolStats {
        let st = self.shared.lock();
        PoolStats {
            workers: self.workers,
            queued: st.queued,
            reads: st.counters.reads,
            zero_reads: st.counters.zero_reads,
            cache: CacheStats {
                bytes: st.cache.bytes(),
                capacity: st.cache.capacity(),
                hits: st.counters.hits,
                misses: st.counters.misses,
                readahead_hits: st.counters.readahead_hits,
            },
        }
    }

    /// The all-zero chunk of `size` bytes (digest computed once per size).
    fn zero_chunk(&self, size: u64) -> ZeroChunk {
        let mut known = self.zero_chunks.lock().unwrap_or_else(|p| p.into_inner());
        known
            .entry(size)
            .or_insert_with(|| {
                let data = vec![0u8; size as usize];
                ZeroChunk {
                    digest: sha256(&data),
                    data: Arc::new(data),
                }
            })
            .clone()
    }
}

#[cfg(test)]
mod tests;
