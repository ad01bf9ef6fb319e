//! Method handlers: what each protocol method does, in terms of the layers
//! below (`restore`, `pool`, `store`) and the server state from `rpc`.
//!
//! Handlers validate their params and map failures to the pinned error codes;
//! they must never touch framing, ids or authentication.

mod bulk;
mod core;
mod data;
mod fs;
mod streams;

use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::{ConnectionId, RpcModule};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::pool::ArchiveReader;
use crate::restore::backups::Backups;
use crate::rpc::codes::app_error;
use crate::rpc::{Router, Shared};

/// Archive readers one connection keeps open (each remembers where the
/// connection last read, for read-ahead).
const READERS_PER_CONNECTION: usize = 8;
/// Bytes of indexes a connection's readers may keep in memory besides its
/// most recent one's: each reader keeps its archive's index, and eight of
/// 1 TiB disks (8 MiB each) would not fit a 128 MiB VM. (Indexes of 1 MiB
/// or more are mapped, and count nothing here: see `store::index_body`.)
const READER_INDEX_BYTES: usize = 16 << 20;

/// A connection's reader of one archive and when it was last used.
type Readers = HashMap<(usize, String, String), (u64, ArchiveReader)>;

/// What every handler can reach.
pub struct Agent {
    pub shared: Arc<Shared>,
    pub backups: Backups,
    budget: bulk::Budget,
    streams: streams::Streams,
    readers: Mutex<Readers>,
    /// uses of readers so far, to order them by recency
    reader_uses: std::sync::atomic::AtomicU64,
}

impl Agent {
    pub fn new(shared: Arc<Shared>, backups: Backups) -> Agent {
        Agent {
            shared,
            backups,
            budget: bulk::Budget::default(),
            streams: streams::Streams::default(),
            readers: Mutex::new(HashMap::new()),
            reader_uses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// At most `total` extraction streams open at once, all connections
    /// together (the agent's `--max-streams`).
    pub fn with_max_streams(mut self, total: usize) -> Agent {
        self.streams = streams::Streams::new(total);
        self
    }

    /// This connection's reader of an archive, opened on first use.
    fn reader(
        &self,
        conn: ConnectionId,
        snapshot: &str,
        archive: &str,
    ) -> Result<ArchiveReader, ErrorObjectOwned> {
        let key = (conn.0, snapshot.to_string(), archive.to_string());
        let now = self
            .reader_uses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((used, r)) = self.lock_readers().get_mut(&key) {
            *used = now;
            return Ok(r.clone());
        }
        let reader = self
            .backups
            .open_archive(snapshot, archive)
            .map_err(app_error)?;
        let mut readers = self.lock_readers();
        readers.insert(key, (now, reader.clone()));
        // the most recent first; the newest stays however large its index
        let mut mine: Vec<_> = readers
            .iter()
            .filter(|(k, _)| k.0 == conn.0)
            .map(|(k, (used, r))| (*used, r.index_bytes(), k.clone()))
            .collect();
        mine.sort_unstable_by_key(|m| std::cmp::Reverse(m.0));
        let mut kept = 0usize;
        for (i, (_, bytes, k)) in mine.into_iter().enumerate() {
            if i > 0 {
                kept = kept.saturating_add(bytes);
                if i >= READERS_PER_CONNECTION || kept > READER_INDEX_BYTES {
                    readers.remove(&k);
                }
            }
        }
        Ok(reader)
    }

    fn lock_readers(&self) -> std::sync::MutexGuard<'_, Readers> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connection_closed(&self, conn: ConnectionId) {
        self.lock_readers().retain(|k, _| k.0 != conn.0);
        self.streams.connection_closed(conn);
        self.budget.connection_closed(conn);
    }
}

/// Builds the router holding every method of the protocol.
pub fn router(agent: Agent) -> Router {
    let agent = Arc::new(agent);
    let mut module = RpcModule::new(agent.clone());
    core::register(&mut module);
    data::register(&mut module);
    fs::register(&mut module);
    let mut router = Router::new(module);
    core::register_rules(&mut router);
    data::register_raw(&mut router, agent.clone());
    fs::register_raw(&mut router, agent.clone());
    router.on_connection_closed(move |conn| agent.connection_closed(conn));
    router
}

/// Registration cannot fail for distinct static names; a clash is a bug in
/// this module, caught by every test that starts the agent.
fn must<T, E: std::fmt::Debug>(r: Result<T, E>) {
    if let Err(e) = r {
        panic!("method registration: {e:?}");
    }
}
