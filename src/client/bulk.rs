//! Bulk transfers: file contents through pipelined `fs.read` calls and
//! archive streams through `stream.read`, handed to a sink in order. The
//! reads ask for `"encoding": "raw"` (the data follows each answer's line,
//! taken by the transport, see `lines`); base64 `data` from an agent that
//! sends it anyway is decoded too.
//!
//! Several reads are kept in flight so that a transfer is bound by the agent's
//! throughput, not by round trips.

use std::future::Future;
use std::pin::Pin;

use futures_util::stream::{FuturesOrdered, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{ClientError, Result};
use super::session::Session;

/// Bytes asked for by one read call.
pub const READ_CHUNK: u64 = 4 << 20;
/// Read calls kept in flight.
pub const READ_DEPTH: usize = 4;

/// One file (or directory) inside a volume of an archive of a snapshot. The
/// path is bytes: names that are not UTF-8 travel as `path_b64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    pub snapshot: String,
    pub archive: String,
    pub volume: String,
    pub path: Vec<u8>,
}

impl FileRef {
    /// The params naming this file, as every `fs.*` method takes them.
    pub fn params(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("snapshot".into(), self.snapshot.clone().into());
        m.insert("archive".into(), self.archive.clone().into());
        m.insert("volume".into(), self.volume.clone().into());
        match std::str::from_utf8(&self.path) {
            Ok(p) => m.insert("path".into(), p.into()),
            Err(_) => m.insert(
                "path_b64".into(),
                base64_simd::STANDARD.encode_to_string(&self.path).into(),
            ),
        };
        m
    }

    /// `params()` plus more members.
    pub fn params_with(&self, more: Value) -> Value {
        let mut m = self.params();
        if let Value::Object(extra) = more {
            m.extend(extra);
        }
        Value::Object(m)
    }

    /// The path for messages (invalid UTF-8 shown lossily).
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    /// The entry `name` inside this directory.
    pub fn child(&self, name: &[u8]) -> FileRef {
        let mut path = self.path.clone();
        if !path.ends_with(b"/") {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        FileRef {
            path,
            ..self.clone()
        }
    }
}

#[derive(Deserialize)]
struct ReadResult {
    offset: u64,
    length: u64,
    eof: bool,
    /// base64; empty when the data came raw and is in `slot`
    #[serde(default)]
    data: String,
    /// Set when the transport already decoded `data` or took the raw data
    /// after the line (see `lines`).
    slot: Option<u64>,
}

#[derive(Deserialize)]
struct StreamResult {
    offset: u64,
    #[serde(default)]
    data: String,
    eof: bool,
    slot: Option<u64>,
}

/// The payload of a bulk answer: from its slot, or decoded here.
fn payload(session: &Session, slot: Option<u64>, data: &str, what: &str) -> Result<Vec<u8>> {
    match slot {
        Some(s) => session.take_bulk(s, what),
        None => decode(data, what),
    }
}

fn decode(data: &str, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    crate::base64::decode_append(data.as_bytes(), &mut out)
        .map_err(|e| ClientError::local(format!("bad data from the agent for {what}: {e}")))?;
    Ok(out)
}

type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<(u64, u64, ReadResult)>> + Send + 'a>>;

/// Reads `size` bytes of `file` (as given by `fs.stat`) and passes them to
/// `sink` in order; returns the number of bytes delivered. The agent answers
/// every read whole up to the end of the file, so an answer that ends early
/// (a short read, or the end of the file before `size`) is an error: a
/// backup's file does not change size, and one that seemed to pass for the
/// whole file (and abandoned reads in flight, whose answers were still
/// taken in).
pub async fn read_file(
    session: &Session,
    file: &FileRef,
    size: u64,
    sink: &mut (dyn FnMut(&[u8]) -> Result<()> + Send),
) -> Result<u64> {
    let issue = |offset: u64| -> ReadFuture<'_> {
        let length = READ_CHUNK.min(size - offset);
        Box::pin(async move {
            let params = file.params_with(serde_json::json!({
                "offset": offset, "length": length, "encoding": "raw"
            }));
            let r: ReadResult = session.call("fs.read", params).await?;
            Ok((offset, length, r))
        })
    };
    // Futures do nothing until polled: the set polls every read in flight
    // (each sends its request on its first poll) and yields them in order,
    // so the agent works on all of them while the oldest is handled here.
    let mut in_flight: FuturesOrdered<ReadFuture<'_>> = FuturesOrdered::new();
    let mut next = 0u64;
    let mut done = 0u64;
    loop {
        while in_flight.len() < READ_DEPTH && next < size {
            in_flight.push_back(issue(next));
            next += READ_CHUNK.min(size - next);
        }
        let Some(oldest) = in_flight.next().await else {
            return Ok(done);
        };
        let (offset, asked, r) = oldest?;
        if r.offset != offset {
            return Err(ClientError::local(format!(
                "fs.read of {} at {offset}: the agent answered for offset {}",
                file.display(),
                r.offset
            )));
        }
        let bytes = payload(session, r.slot, &r.data, &file.display())?;
        if bytes.len() as u64 != r.length {
            return Err(ClientError::local(format!(
                "fs.read of {} at {offset}: length {} does not match its {} data bytes",
                file.display(),
                r.length,
                bytes.len()
            )));
        }
        if r.length != asked {
            let end = if r.eof {
                ", and the end of the file"
            } else {
                ""
            };
            return Err(ClientError::local(format!(
                "fs.read of {} at {offset}: the agent answered {} bytes{end} where {asked} \
                 were asked for (the file's size is {size})",
                file.display(),
                r.length
            )));
        }
        sink(&bytes)?;
        session.spare_buffers().give(bytes);
        done += r.length;
        if r.eof && done < size {
            return Err(ClientError::local(format!(
                "fs.read of {}: the file ended at {done} of its {size} bytes",
                file.display()
            )));
        }
    }
}

/// Pulls stream `stream` (from `fs.extract`) to its end, handing each piece
/// to `sink` (owned: a sink that passes pieces on to another thread need not
/// copy them), and returns the number of bytes. Reads are pipelined like file
/// reads: each names the stream offset it starts at, so the agent serves
/// them in order and each returns a full [`READ_CHUNK`] until the end. The
/// stream is closed on failure.
pub async fn read_stream(
    session: &Session,
    stream: &Value,
    sink: &mut (dyn FnMut(Vec<u8>) -> Result<()> + Send),
) -> Result<u64> {
    type StreamFuture<'a> = Pin<Box<dyn Future<Output = Result<(u64, StreamResult)>> + Send + 'a>>;
    let issue = |offset: u64| -> StreamFuture<'_> {
        Box::pin(async move {
            let params = serde_json::json!({
                "stream": stream, "offset": offset, "length": READ_CHUNK, "encoding": "raw"
            });
            let r: StreamResult = session.call("stream.read", params).await?;
            Ok((offset, r))
        })
    };
    let mut done = 0u64;
    let result = async {
        // polled together, yielded in order (see read_file)
        let mut in_flight: FuturesOrdered<StreamFuture<'_>> = FuturesOrdered::new();
        let mut next = 0u64;
        // A short read that did not end the stream: the agent's stream
        // failed after those bytes, and the next read must bring the error.
        let mut short: Option<(u64, u64)> = None;
        loop {
            while in_flight.len() < READ_DEPTH && (short.is_none() || in_flight.is_empty()) {
                in_flight.push_back(issue(next));
                next += READ_CHUNK;
            }
            let Some(oldest) = in_flight.next().await else {
                return Ok(done);
            };
            let (asked, r) = oldest?;
            if let Some((at, got)) = short {
                return Err(ClientError::local(format!(
                    "stream.read at {at}: {got} bytes before the end of the stream"
                )));
            }
            let bytes = payload(session, r.slot, &r.data, "stream")?;
            if r.offset != asked || asked != done {
                return Err(ClientError::local(format!(
                    "stream.read at {asked}: the agent answered for offset {}",
                    r.offset
                )));
            }
            let got = bytes.len() as u64;
            sink(bytes)?;
            done += got;
            if r.eof {
                // the reads beyond the end are answered empty; not awaited
                return Ok(done);
            }
            if got < READ_CHUNK {
                short = Some((asked, got));
            }
        }
    }
    .await;
    if result.is_err() {
        // Courtesy only: the command has failed already, and an agent that
        // does not answer must not hold it up for the request timeout.
        let close = session
            .call::<serde_json::Value>("stream.close", serde_json::json!({ "stream": stream }));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), close).await;
    }
    result
}
