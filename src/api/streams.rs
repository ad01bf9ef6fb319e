//! Extraction streams: archives produced on a filesystem thread while the
//! client pulls them with `stream.read`. Each stream belongs to the
//! connection that opened it, is closed with it, and holds off the idle
//! watchdog while open. At most 8 per connection; in all, `--max-streams`,
//! counting each from its opening until it is closed and its producer has
//! stopped: a producer runs a filesystem of its own, whose caches and
//! buffers take a few MiB, and a stream whose producer is done still holds
//! what it buffered.

use bytes::Bytes;
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::ConnectionId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, ErrorKind};
use crate::restore::archive::StreamReader;
use crate::rpc::codes::{app_error, invalid_params, limit_reached};
use crate::rpc::server::WatchdogHold;

/// Streams one connection may hold open.
pub const PER_CONNECTION: usize = 8;
/// Producers all connections together may run, unless told otherwise.
pub const DEFAULT_TOTAL: usize = 32;

/// How long a read with an `offset` waits for the reads before it.
const TURN_WAIT: Duration = Duration::from_secs(30);

struct Slot {
    conn: usize,
    stream: Arc<OpenStream>,
    _hold: WatchdogHold,
    /// the stream's share of `--max-streams`, also held by its producer
    _room: Arc<OwnedSemaphorePermit>,
}

/// An open stream: its reader and how far it has been read.
pub struct OpenStream {
    id: u64,
    cursor: tokio::sync::Mutex<Cursor>,
    /// woken whenever `position` moves, and when the stream is closed
    moved: Notify,
    /// closed by `stream.close` or with its connection
    closed: AtomicBool,
}

struct Cursor {
    reader: StreamReader,
    /// bytes of the archive returned so far
    position: u64,
}

impl OpenStream {
    /// Reads waiting for their turn end with 1008; reads under way finish.
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.moved.notify_waiters();
    }

    /// The next bytes of the archive, at most `max`: what is buffered (at
    /// least one byte unless the archive ended). With `at`, the read is
    /// served when the stream has been read up to `at` (reads pipelined by
    /// a client complete in offset order whatever order they arrive in)
    /// and returns exactly `max` bytes unless the archive ends first.
    /// `reserve` is awaited once it is this read's turn, so that reads
    /// waiting for their turn hold no share of the memory budget.
    /// Returns (offset, data as the stream's blocks, eof, reservation).
    pub async fn read<H>(
        &self,
        at: Option<u64>,
        max: usize,
        reserve: impl std::future::Future<Output = H>,
    ) -> Result<(u64, Vec<Bytes>, bool, H), ErrorObjectOwned> {
        let deadline = tokio::time::Instant::now() + TURN_WAIT;
        let mut cursor = loop {
            let moved = self.moved.notified();
            let cursor = self.cursor.lock().await;
            match at {
                Some(at) if at < cursor.position => {
                    return Err(invalid_params(format!(
                        "stream offset {at} was already read (the stream is at {})",
                        cursor.position
                    )))
                }
                // a read beyond the end gets the end (empty, eof) or the error
                Some(at) if at > cursor.position && !cursor.reader.ended() => {
                    drop(cursor);
                    if self.closed.load(Ordering::Relaxed) {
                        return Err(unknown(self.id));
                    }
                    if tokio::time::timeout_at(deadline, moved).await.is_err() {
                        return Err(invalid_params(format!(
                            "stream offset {at}: the reads before it did not arrive \
                             within {} s",
                            TURN_WAIT.as_secs()
                        )));
                    }
                }
                _ => break cursor,
            }
        };
        let hold = reserve.await;
        let offset = cursor.position;
        let mut data = Vec::new();
        // Reads that name their offset get `max` bytes unless the end comes
        // first; others get what is buffered.
        let mut len = 0;
        let eof = loop {
            let (more, end) = match cursor.reader.read_pieces(&mut data, max - len).await {
                Ok(got) => got,
                // The stream failed after these bytes: they go now (a short
                // read), the error with the next read.
                Err(_) if len > 0 => break false,
                Err(e) => return Err(stream_error(e)),
            };
            len += more;
            if at.is_none() || end || len >= max {
                break end;
            }
        };
        cursor.position += len as u64;
        drop(cursor);
        self.moved.notify_waiters();
        Ok((offset, data, eof, hold))
    }
}

pub struct Streams {
    slots: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
    /// One permit per stream that may be open. The stream and its producer
    /// share it: it is free again once the stream is closed and its
    /// producer has ended (the memory it holds is gone only then).
    producers: Arc<Semaphore>,
    total: usize,
}

impl Default for Streams {
    fn default() -> Self {
        Streams::new(DEFAULT_TOTAL)
    }
}

impl Streams {
    /// At most `total` producers at once (at least one).
    pub fn new(total: usize) -> Streams {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Streams {
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            producers: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The most streams open at once, all connections together.
    pub fn max(&self) -> usize {
        self.total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_connection(&self, conn: ConnectionId) -> Result<(), ErrorObjectOwned> {
        if self.lock().values().filter(|s| s.conn == conn.0).count() >= PER_CONNECTION {
            return Err(limit_reached(format!(
                "too many open streams on this connection (at most {PER_CONNECTION})"
            )));
        }
        Ok(())
    }

    /// Checks the limits before any work is started for a new stream, and
    /// takes its share of `--max-streams`, which the stream and its
    /// producer hold (see `producers`). Taking it here, at once, keeps
    /// requests that arrive together from all passing.
    pub fn check_room(
        &self,
        conn: ConnectionId,
    ) -> Result<Arc<OwnedSemaphorePermit>, ErrorObjectOwned> {
        self.check_connection(conn)?;
        let permit = self.producers.clone().try_acquire_owned().map_err(|_| {
            limit_reached(format!(
                "too many open streams (at most {}, --max-streams)",
                self.total
            ))
        })?;
        Ok(Arc::new(permit))
    }

    pub fn insert(
        &self,
        conn: ConnectionId,
        reader: StreamReader,
        hold: WatchdogHold,
        room: Arc<OwnedSemaphorePermit>,
    ) -> Result<u64, ErrorObjectOwned> {
        self.check_connection(conn)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(
            id,
            Slot {
                conn: conn.0,
                stream: Arc::new(OpenStream {
                    id,
                    cursor: tokio::sync::Mutex::new(Cursor {
                        reader,
                        position: 0,
                    }),
                    moved: Notify::new(),
                    closed: AtomicBool::new(false),
                }),
                _hold: hold,
                _room: room,
            },
        );
        Ok(id)
    }

    pub fn get(&self, conn: ConnectionId, id: u64) -> Result<Arc<OpenStream>, ErrorObjectOwned> {
        match self.lock().get(&id) {
            Some(slot) if slot.conn == conn.0 => Ok(slot.stream.clone()),
            _ => Err(unknown(id)),
        }
    }

    /// Closes a stream; its producer stops at its next write.
    pub fn close(&self, conn: ConnectionId, id: u64) -> Result<(), ErrorObjectOwned> {
        let mut slots = self.lock();
        if slots.get(&id).is_none_or(|slot| slot.conn != conn.0) {
            return Err(unknown(id));
        }
        if let Some(slot) = slots.remove(&id) {
            slot.stream.close();
        }
        Ok(())
    }

    pub fn open_count(&self) -> usize {
        self.lock().len()
    }

    /// Shares of `--max-streams` taken: open streams, and closed ones whose
    /// producer has not stopped yet (it stops at its next write, which may
    /// come only once its filesystem is open). A new stream is refused while
    /// this is at [`max`](Self::max).
    pub fn in_use(&self) -> usize {
        self.total
            .saturating_sub(self.producers.available_permits())
    }

    pub fn connection_closed(&self, conn: ConnectionId) {
        self.lock().retain(|_, s| {
            let keep = s.conn != conn.0;
            if !keep {
                s.stream.close();
            }
            keep
        });
    }
}

fn unknown(id: u64) -> ErrorObjectOwned {
    app_error(Error::new(
        ErrorKind::UnknownStream,
        format!("unknown stream {id}"),
    ))
}

/// A producer failure as the client sees it: the application error that
/// stopped the archive when there is one, else an I/O error.
pub fn stream_error(e: std::io::Error) -> ErrorObjectOwned {
    if let Some(app) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        return app_error(app.clone());
    }
    app_error(Error::new(
        ErrorKind::Io,
        format!("archive stream failed: {e}"),
    ))
}
