//! The pool's shared state: cache, single-flight table and dispatch queue,
//! all under one lock so that "is it cached, is it being read, queue it" is
//! one atomic step.
//!
//! Owns the bookkeeping only: it never does I/O (workers do, in
//! `worker.rs`) and never blocks beyond the short state lock, so tokio tasks
//! may call into it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};

use std::path::PathBuf;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::cache::ChunkCache;
use super::load::{Load, Position};
use super::{ChunkData, ChunkKey};
use crate::error::Result;

/// Why a chunk is being read. Demand reads are dispatched before
/// read-ahead; within a class, in inode order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Class {
    Demand = 0,
    Readahead = 1,
}

/// How a waiting reader is woken: async readers await a tokio oneshot,
/// blocking readers (filesystem threads) sleep on a std channel.
pub(super) enum Waiter {
    Async(oneshot::Sender<Result<ChunkData>>),
    Blocking(mpsc::SyncSender<Result<ChunkData>>),
}

/// Which kind of [`Waiter`] a reader wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WaitKind {
    Async,
    Blocking,
}

/// The receiving end of a [`Waiter`].
pub(super) enum Wakeup {
    Async(oneshot::Receiver<Result<ChunkData>>),
    Blocking(mpsc::Receiver<Result<ChunkData>>),
}

impl Waiter {
    fn new(kind: WaitKind) -> (Waiter, Wakeup) {
        match kind {
            WaitKind::Async => {
                let (tx, rx) = oneshot::channel();
                (Waiter::Async(tx), Wakeup::Async(rx))
            }
            WaitKind::Blocking => {
                let (tx, rx) = mpsc::sync_channel(1);
                (Waiter::Blocking(tx), Wakeup::Blocking(rx))
            }
        }
    }

    fn send(self, result: Result<ChunkData>) {
        // A waiter that gave up (dropped its receiver) is fine.
        match self {
            Waiter::Async(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Blocking(tx) => {
                let _ = tx.try_send(result);
            }
        }
    }
}

/// A chunk being read (or queued to be), with everyone waiting for it.
struct Flight {
    /// Taken by the worker that reads it; `None` once started.
    load: Option<Load>,
    waiters: Vec<Waiter>,
    class: Class,
    /// Set when the flight has entered the ordered queue.
    position: Option<(u64, u64)>,
    /// Its chunk file was already handed out as a read-ahead hint.
    hinted: bool,
    /// Dispatched in request order rather than chunk-file order (reads
    /// announced in the order they will be needed).
    in_order: bool,
}

/// A load taken by a worker, with the chunk file to hint next.
pub(super) struct Job {
    pub key: ChunkKey,
    pub load: Load,
    pub hint: Option<PathBuf>,
}

/// A new flight not yet placed in the ordered queue: its chunk file still
/// has to be stat'ed, which workers do, never the caller.
pub(super) struct Unplaced {
    pub key: ChunkKey,
    pub seq: u64,
    pub position: Position,
}

/// An entry of the dispatch queue; the smallest is taken first.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Queued {
    class: Class,
    position: (u64, u64),
    seq: u64,
    key: ChunkKey,
}

#[derive(Default)]
pub(super) struct Counters {
    pub hits: u64,
    pub misses: u64,
    pub readahead_hits: u64,
    pub reads: u64,
    pub zero_reads: u64,
}

pub(super) struct State {
    pub cache: ChunkCache,
    flights: HashMap<ChunkKey, Flight>,
    inbox: Vec<Unplaced>,
    /// A worker is placing a batch taken from the inbox (it stats chunk
    /// files without the lock). Others wait for it: a later batch placed
    /// first would be dispatched before the earlier one.
    placing: bool,
    heap: BinaryHeap<Reverse<Queued>>,
    next_seq: u64,
    /// Flights not yet started.
    pub queued: usize,
    /// Read-ahead flights not yet started.
    queued_readahead: usize,
    pub counters: Counters,
    shutdown: bool,
    /// Tests stop dispatch to line reads up in the queue.
    #[cfg(test)]
    pub paused: bool,
    /// Tests check the dispatch order.
    #[cfg(test)]
    pub dispatched: Vec<ChunkKey>,
}

/// What a reader gets for a chunk.
pub(super) enum Lookup {
    Ready(ChunkData),
    Wait(Wakeup),
}

/// The state plus the condition variable idle workers sleep on.
pub(super) struct Shared {
    state: Mutex<State>,
    work: Condvar,
    /// Most read-ahead flights that may wait in the queue at once.
    readahead_queue_limit: usize,
}

impl Shared {
    pub fn new(cache_bytes: usize, readahead_queue_limit: usize) -> Self {
        Shared {
            state: Mutex::new(State {
                cache: ChunkCache::new(cache_bytes),
                flights: HashMap::new(),
                inbox: Vec::new(),
                placing: false,
                heap: BinaryHeap::new(),
                next_seq: 0,
                queued: 0,
                queued_readahead: 0,
                counters: Counters::default(),
                shutdown: false,
                #[cfg(test)]
                paused: false,
                #[cfg(test)]
                dispatched: Vec::new(),
            }),
            work: Condvar::new(),
            readahead_queue_limit,
        }
    }

    /// The state lock. A panic while holding it cannot leave the state
    /// inconsistent in a way that matters more than stopping service, so a
    /// poisoned lock is simply taken over.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader needs chunk `key`: from the cache, by joining a read in
    /// flight, or by queueing a new read built by `load`.
    pub fn demand(&self, key: ChunkKey, load: impl FnOnce() -> Load, wait: WaitKind) -> Lookup {
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Some(hit) = st.cache.get(&key) {
            st.counters.hits += 1;
            if hit.first_use_of_prefetch {
                st.counters.readahead_hits += 1;
            }
            return Lookup::Ready(hit.data);
        }
        st.counters.misses += 1;
        let (tx, rx) = Waiter::new(wait);
        if let Some(flight) = st.flights.get_mut(&key) {
            if flight.class == Class::Readahead {
                // Read-ahead got there first: upgrade it to a demand read.
                st.counters.readahead_hits += 1;
                flight.class = Class::Demand;
                if flight.load.is_some() {
                    st.queued_readahead -= 1;
                    if let Some(position) = flight.position {
                        let seq = st.next_seq;
                        st.next_seq += 1;
                        st.heap.push(Reverse(Queued {
                            class: Class::Demand,
                            position,
                            seq,
                            key,
                        }));
                        self.work.notify_one();
                    }
                }
            }
            flight.waiters.push(tx);
            return Lookup::Wait(rx);
        }
        st.start_flight(key, load(), Class::Demand, vec![tx]);
        drop(guard);
        self.work.notify_one();
        Lookup::Wait(rx)
    }

    /// Read-ahead wants chunk `key` in the cache. Does nothing when it is
    /// cached (keeps it fresh), already in flight, or when the read-ahead
    /// queue is full.
    pub fn prefetch(&self, key: ChunkKey, load: impl FnOnce() -> Load) {
        self.prefetch_as(key, load, false);
    }

    /// [`prefetch`](Self::prefetch) for reads announced in the order they
    /// will be needed: such reads are dispatched in the order requested
    /// (before other read-ahead), not in chunk-file order.
    pub fn prefetch_in_order(&self, key: ChunkKey, load: impl FnOnce() -> Load) {
        self.prefetch_as(key, load, true);
    }

    fn prefetch_as(&self, key: ChunkKey, load: impl FnOnce() -> Load, in_order: bool) {
        let mut st = self.lock();
        if st.cache.touch(&key)
            || st.flights.contains_key(&key)
            || st.queued_readahead >= self.readahead_queue_limit
        {
            return;
        }
        st.start_flight(key, load(), Class::Readahead, Vec::new());
        if let Some(flight) = st.flights.get_mut(&key) {
            flight.in_order = in_order;
        }
        drop(st);
        self.work.notify_one();
    }

    /// Counts a read served from the shared all-zero buffer.
    pub fn count_zero_read(&self) {
        self.lock().counters.zero_reads += 1;
    }

    /// Takes the next load to run, in dispatch order; `None` once the pool
    /// shuts down. Called by workers only: it stats chunk files.
    pub fn next_load(&self) -> Option<Job> {
        let mut guard = self.lock();
        loop {
            if guard.shutdown {
                return None;
            }
            if !guard.is_paused() && !guard.placing {
                if !guard.inbox.is_empty() {
                    let batch = std::mem::take(&mut guard.inbox);
                    guard.placing = true;
                    drop(guard);
                    let placed: Vec<(ChunkKey, u64, (u64, u64))> = batch
                        .into_iter()
                        .map(|u| (u.key, u.seq, u.position.resolve()))
                        .collect();
                    guard = self.lock();
                    guard.place(placed);
                    guard.placing = false;
                    self.work.notify_all();
                    continue;
                }
                let st = &mut *guard;
                if let Some(Reverse(next)) = st.heap.pop() {
                    let Some(flight) = st.flights.get_mut(&next.key) else {
                        continue; // stale entry of a finished flight
                    };
                    let Some(load) = flight.load.take() else {
                        continue; // stale entry of an upgraded flight
                    };
                    st.queued -= 1;
                    if flight.class == Class::Readahead {
                        st.queued_readahead -= 1;
                    }
                    st.counters.reads += 1;
                    #[cfg(test)]
                    st.dispatched.push(next.key);
                    let hint = st.hint_next();
                    return Some(Job {
                        key: next.key,
                        load,
                        hint,
                    });
                }
            }
            guard = self.work.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Delivers the outcome of a load to its waiters and caches good data.
    /// Errors are never cached.
    pub fn finish(&self, key: ChunkKey, result: Result<ChunkData>) {
        let mut st = self.lock();
        let Some(flight) = st.flights.remove(&key) else {
            return;
        };
        let evicted = match &result {
            Ok(data) => st
                .cache
                .insert(key, data.clone(), flight.class == Class::Readahead),
            Err(_) => Vec::new(),
        };
        drop(st);
        for waiter in flight.waiters {
            waiter.send(result.clone());
        }
        drop(evicted);
    }

    /// Stops the workers; queued flights are dropped, which wakes their
    /// waiters with an error.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        st.flights.clear();
        drop(st);
        self.work.notify_all();
    }

    #[cfg(test)]
    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        self.work.notify_all();
    }
}

impl State {
    fn start_flight(&mut self, key: ChunkKey, load: Load, class: Class, waiters: Vec<Waiter>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inbox.push(Unplaced {
            key,
            seq,
            position: load.position(),
        });
        self.flights.insert(
            key,
            Flight {
                load: Some(load),
                waiters,
                class,
                position: None,
                hinted: false,
                in_order: false,
            },
        );
        self.queued += 1;
        if class == Class::Readahead {
            self.queued_readahead += 1;
        }
    }

    /// The chunk file that will be read next, if not hinted yet: the
    /// worker asks the kernel to start reading it while it works on the
    /// current one, so disk reads overlap decoding.
    fn hint_next(&mut self) -> Option<PathBuf> {
        while let Some(Reverse(next)) = self.heap.peek() {
            match self.flights.get_mut(&next.key) {
                Some(flight) if flight.load.is_some() => {
                    if std::mem::replace(&mut flight.hinted, true) {
                        return None;
                    }
                    return match &flight.load {
                        Some(Load::Chunk { path, .. }) => Some(path.clone()),
                        _ => None,
                    };
                }
                _ => {
                    self.heap.pop(); // stale entry
                }
            }
        }
        None
    }

    /// Moves stat'ed flights into the ordered queue.
    fn place(&mut self, placed: Vec<(ChunkKey, u64, (u64, u64))>) {
        for (key, seq, position) in placed {
            let Some(flight) = self.flights.get_mut(&key) else {
                continue;
            };
            if flight.load.is_none() || flight.position.is_some() {
                continue;
            }
            // (0, 0) sorts before every chunk file: in-order flights go by seq
            let position = if flight.in_order { (0, 0) } else { position };
            flight.position = Some(position);
            self.heap.push(Reverse(Queued {
                class: flight.class,
                position,
                seq,
                key,
            }));
        }
    }

    #[cfg(test)]
    fn is_paused(&self) -> bool {
        self.paused
    }

    #[cfg(not(test))]
    fn is_paused(&self) -> bool {
        false
    }
}
