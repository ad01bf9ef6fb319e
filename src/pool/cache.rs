//! The byte-bounded LRU cache of decoded chunks.
//!
//! Owns which decoded chunks stay in memory and in what order they leave.
//! It never does I/O and has no lock of its own: the pool's state lock
//! guards it. Evicted buffers are handed back to the caller so that they are
//! freed after that lock is released.

use std::collections::{BTreeMap, HashMap};

use super::{ChunkData, ChunkKey};

struct Entry {
    data: ChunkData,
    /// Position in `order`; larger is more recently used.
    tick: u64,
    /// Brought in by read-ahead and not yet read by anyone.
    prefetched: bool,
}

/// What a cached chunk is charged beyond its bytes: its map entries, the
/// shared buffer's header and the allocator's rounding. Without it, chunks
/// of a few bytes (a hostile dynamic index may cut them so) filled a 48 MiB
/// cache with millions of entries and hundreds of MiB of bookkeeping.
const ENTRY_OVERHEAD: usize = 256;

fn cost(data: &ChunkData) -> usize {
    data.len() + ENTRY_OVERHEAD
}

/// An LRU map from chunk key to decoded chunk whose total cost (payload and
/// [`ENTRY_OVERHEAD`] per chunk) stays at or below `capacity` bytes.
pub(super) struct ChunkCache {
    capacity: usize,
    bytes: usize,
    next_tick: u64,
    entries: HashMap<ChunkKey, Entry>,
    order: BTreeMap<u64, ChunkKey>,
}

/// A cache lookup that found the chunk.
pub(super) struct CacheHit {
    pub data: ChunkData,
    /// The chunk was brought in by read-ahead and this is its first use.
    pub first_use_of_prefetch: bool,
}

impl ChunkCache {
    pub fn new(capacity: usize) -> Self {
        ChunkCache {
            capacity,
            bytes: 0,
            next_tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Total cost of the cached chunks (their bytes and bookkeeping).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn bump(&mut self, key: &ChunkKey) -> Option<&mut Entry> {
        let tick = self.next_tick;
        let entry = self.entries.get_mut(key)?;
        self.next_tick += 1;
        self.order.remove(&entry.tick);
        self.order.insert(tick, *key);
        entry.tick = tick;
        Some(entry)
    }

    /// Looks a chunk up for a reader and marks it most recently used.
    pub fn get(&mut self, key: &ChunkKey) -> Option<CacheHit> {
        let entry = self.bump(key)?;
        let first_use_of_prefetch = std::mem::take(&mut entry.prefetched);
        Some(CacheHit {
            data: entry.data.clone(),
            first_use_of_prefetch,
        })
    }

    /// Marks a chunk most recently used without reading it (read-ahead
    /// found it already cached). Returns whether it is cached.
    pub fn touch(&mut self, key: &ChunkKey) -> bool {
        self.bump(key).is_some()
    }

    /// Adds a chunk, evicting least recently used ones until it fits.
    /// A chunk larger than the whole cache is not stored. Returns the
    /// evicted buffers (to be dropped outside the pool lock).
    pub fn insert(&mut self, key: ChunkKey, data: ChunkData, prefetched: bool) -> Vec<ChunkData> {
        let mut evicted = Vec::new();
        if let Some(old) = self.remove(&key) {
            evicted.push(old);
        }
        let len = cost(&data);
        if len > self.capacity {
            return evicted;
        }
        while self.bytes + len > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= cost(&entry.data);
                evicted.push(entry.data);
            }
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        self.order.insert(tick, key);
        self.bytes += len;
        self.entries.insert(
            key,
            Entry {
                data,
                tick,
                prefetched,
            },
        );
        evicted
    }

    fn remove(&mut self, key: &ChunkKey) -> Option<ChunkData> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.tick);
        self.bytes -= cost(&entry.data);
        Some(entry.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(n: u64) -> ChunkKey {
        ChunkKey::Raw { image: 0, chunk: n }
    }

    fn data(len: usize) -> ChunkData {
        Arc::new(vec![7u8; len])
    }

    /// Cost of a chunk of `len` bytes.
    const fn c(len: usize) -> usize {
        len + ENTRY_OVERHEAD
    }

    #[test]
    fn evicts_least_recently_used_to_stay_within_bytes() {
        let mut cache = ChunkCache::new(c(40) * 2 + 20);
        cache.insert(key(1), data(40), false);
        cache.insert(key(2), data(40), false);
        assert!(cache.get(&key(1)).is_some()); // 2 is now the oldest
        let evicted = cache.insert(key(3), data(40), false);
        assert_eq!(evicted.len(), 1);
        assert!(cache.get(&key(2)).is_none());
        assert!(cache.get(&key(1)).is_some());
        assert!(cache.get(&key(3)).is_some());
        assert_eq!(cache.bytes(), c(40) * 2);
    }

    #[test]
    fn chunk_larger_than_cache_is_not_stored() {
        let mut cache = ChunkCache::new(c(100));
        cache.insert(key(1), data(50), false);
        cache.insert(key(2), data(101), false);
        assert!(cache.get(&key(2)).is_none());
        assert!(
            cache.get(&key(1)).is_some(),
            "a too-large chunk must not flush the cache"
        );
        assert_eq!(cache.bytes(), c(50));
    }

    #[test]
    fn tiny_chunks_are_charged_their_bookkeeping() {
        let mut cache = ChunkCache::new(1 << 20);
        for n in 0..100_000 {
            cache.insert(key(n), data(1), false);
        }
        assert_eq!(cache.entries.len(), (1 << 20) / c(1));
        assert!(cache.bytes() <= 1 << 20);
    }

    #[test]
    fn prefetched_flag_reported_once() {
        let mut cache = ChunkCache::new(c(10));
        cache.insert(key(1), data(10), true);
        assert!(cache.touch(&key(1)));
        assert!(cache.get(&key(1)).is_some_and(|h| h.first_use_of_prefetch));
        assert!(cache.get(&key(1)).is_some_and(|h| !h.first_use_of_prefetch));
    }

    #[test]
    fn reinsert_replaces_without_double_counting() {
        let mut cache = ChunkCache::new(c(30) * 3);
        cache.insert(key(1), data(30), false);
        cache.insert(key(1), data(30), false);
        assert_eq!(cache.bytes(), c(30));
    }
}
