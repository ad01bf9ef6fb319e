//! Extraction streams: archives produced on a filesystem thread while the
//! client pulls them with `stream.read`. Each stream belongs to the
//! connection that opened it, is closed with it, and holds off the idle
//! watchdog while open. At most 8 per connection and 32 in all.

use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::ConnectionId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind};
use crate::restore::archive::StreamReader;
use crate::rpc::codes::{app_error, limit_reached};
use crate::rpc::server::WatchdogHold;

pub const PER_CONNECTION: usize = 8;
pub const TOTAL: usize = 32;

struct Slot {
    conn: usize,
    reader: Arc<tokio::sync::Mutex<StreamReader>>,
    _hold: WatchdogHold,
}

#[derive(Default)]
pub struct Streams {
    slots: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the limits before any work is started for a new stream.
    pub fn check_room(&self, conn: ConnectionId) -> Result<(), ErrorObjectOwned> {
        let slots = self.lock();
        if slots.len() >= TOTAL {
            return Err(limit_reached(format!(
                "too many open streams (at most {TOTAL})"
            )));
        }
        if slots.values().filter(|s| s.conn == conn.0).count() >= PER_CONNECTION {
            return Err(limit_reached(format!(
                "too many open streams on this connection (at most {PER_CONNECTION})"
            )));
        }
        Ok(())
    }

    pub fn insert(
        &self,
        conn: ConnectionId,
        reader: StreamReader,
        hold: WatchdogHold,
    ) -> Result<u64, ErrorObjectOwned> {
        self.check_room(conn)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(
            id,
            Slot {
                conn: conn.0,
                reader: Arc::new(tokio::sync::Mutex::new(reader)),
                _hold: hold,
            },
        );
        Ok(id)
    }

    pub fn get(
        &self,
        conn: ConnectionId,
        id: u64,
    ) -> Result<Arc<tokio::sync::Mutex<StreamReader>>, ErrorObjectOwned> {
        match self.lock().get(&id) {
            Some(slot) if slot.conn == conn.0 => Ok(slot.reader.clone()),
            _ => Err(unknown(id)),
        }
    }

    /// Closes a stream; its producer stops at its next write.
    pub fn close(&self, conn: ConnectionId, id: u64) -> Result<(), ErrorObjectOwned> {
        let mut slots = self.lock();
        match slots.get(&id) {
            Some(slot) if slot.conn == conn.0 => {
                slots.remove(&id);
                Ok(())
            }
            _ => Err(unknown(id)),
        }
    }

    pub fn open_count(&self) -> usize {
        self.lock().len()
    }

    pub fn connection_closed(&self, conn: ConnectionId) {
        self.lock().retain(|_, s| s.conn != conn.0);
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
