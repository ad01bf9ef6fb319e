//! The jsonrpsee client transport over one line-framed byte stream, with a
//! fast path for bulk responses.
//!
//! Responses are handed to jsonrpsee as raw bytes (it parses them itself). A
//! multi-megabyte `fs.read`/`stream.read`/`image.read` answer would be
//! scanned and copied three times on that path (once for the envelope, once
//! into the result type, once by the caller), so the receiver handles those
//! itself: it parses the line once with borrowed strings, decodes the base64
//! payload straight into a buffer kept in [`BulkSlots`] under the request id,
//! and gives jsonrpsee a small line whose result names that slot.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use jsonrpsee::core::client::{ReceivedMessage, TransportReceiverT, TransportSenderT};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

use super::connect::{BoxRead, BoxWrite};
use crate::transport::{Frame, LineDecoder};

/// Longest response line accepted: a 16 MiB read is about 22.4 MiB of base64.
pub const MAX_RESPONSE_LINE: usize = 64 << 20;

/// Methods whose result carries a base64 `data` payload.
const BULK_METHODS: [&str; 3] = ["fs.read", "stream.read", "image.read"];

/// Decoded payloads kept for requests nobody waits for any more (a caller
/// that gave up on a pipelined read) are dropped beyond this many.
const MAX_PARKED: usize = 64;

/// Decoded bulk payloads by request id, and the ids of bulk requests in flight.
#[derive(Clone, Default)]
pub struct BulkSlots {
    inner: Arc<Mutex<SlotState>>,
}

#[derive(Default)]
struct SlotState {
    pending: BTreeSet<u64>,
    ready: BTreeMap<u64, Vec<u8>>,
}

impl BulkSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // A panic while holding the lock leaves plain maps behind: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The payload of the response to request `slot`, once.
    pub fn take(&self, slot: u64) -> Option<Vec<u8>> {
        self.lock().ready.remove(&slot)
    }
}

pub struct LineSender {
    writer: BoxWrite,
    slots: BulkSlots,
}

pub struct LineReceiver {
    frames: FramedRead<BoxRead, LineDecoder>,
    slots: BulkSlots,
}

pub fn transport(reader: BoxRead, writer: BoxWrite) -> (LineSender, LineReceiver, BulkSlots) {
    let frames = FramedRead::with_capacity(reader, LineDecoder::new(MAX_RESPONSE_LINE), 1 << 20);
    let slots = BulkSlots::default();
    (
        LineSender {
            writer,
            slots: slots.clone(),
        },
        LineReceiver {
            frames,
            slots: slots.clone(),
        },
        slots,
    )
}

#[derive(Deserialize)]
struct RequestHead<'a> {
    id: Option<u64>,
    #[serde(borrow)]
    method: &'a str,
}

#[derive(Deserialize)]
struct ResponseHead {
    id: u64,
}

#[derive(Deserialize)]
struct BulkResponse<'a> {
    id: u64,
    #[serde(borrow)]
    result: BulkResult<'a>,
}

#[derive(Deserialize)]
struct BulkResult<'a> {
    offset: Option<u64>,
    length: Option<u64>,
    eof: bool,
    #[serde(borrow)]
    data: &'a str,
}

/// Whether answers to `method` go through the bulk fast path.
pub fn is_bulk_method(method: &str) -> bool {
    BULK_METHODS.contains(&method)
}

impl TransportSenderT for LineSender {
    type Error = io::Error;

    async fn send(&mut self, msg: String) -> io::Result<()> {
        if msg.starts_with('{') {
            if let Ok(RequestHead {
                id: Some(id),
                method,
            }) = serde_json::from_str::<RequestHead>(&msg)
            {
                if is_bulk_method(method) {
                    self.slots.lock().pending.insert(id);
                }
            }
        }
        let mut line = msg.into_bytes();
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        self.writer.flush().await
    }

    async fn close(&mut self) -> io::Result<()> {
        self.writer.shutdown().await
    }
}

impl LineReceiver {
    /// The line jsonrpsee gets for `line`: the line itself, or for a bulk
    /// answer a small stand-in naming the slot its decoded payload is in.
    fn intercept(&self, line: &[u8]) -> Vec<u8> {
        if self.slots.lock().pending.is_empty() || !line.starts_with(b"{") {
            return line.to_vec();
        }
        // The JSON parser reads the answer without its payload (megabytes of
        // base64 it would only scan); when that does not work out, it reads
        // the whole line.
        let excised = excise_data(line);
        let parsed = match &excised {
            Some((rest, payload)) => serde_json::from_slice::<BulkResponse>(rest)
                .ok()
                .filter(|b| b.result.data.is_empty())
                .map(|b| (b, *payload)),
            None => None,
        };
        let parsed = parsed.or_else(|| {
            serde_json::from_slice::<BulkResponse>(line).ok().map(|b| {
                let payload = b.result.data.as_bytes();
                (b, payload)
            })
        });
        let Some((bulk, payload)) = parsed else {
            // An error answer (or anything else) ends a pending bulk request too.
            if let Ok(head) = serde_json::from_slice::<ResponseHead>(line) {
                self.slots.lock().pending.remove(&head.id);
            }
            return line.to_vec();
        };
        if !self.slots.lock().pending.remove(&bulk.id) {
            return line.to_vec();
        }
        let Ok(data) = base64_simd::STANDARD.decode_to_vec(payload) else {
            // Left for the caller to decode and report.
            return line.to_vec();
        };
        let r = &bulk.result;
        let mut result = serde_json::json!({ "eof": r.eof, "data": "", "slot": bulk.id });
        if let Some(o) = r.offset {
            result["offset"] = o.into();
        }
        if let Some(l) = r.length {
            result["length"] = l.into();
        }
        let stand_in = serde_json::json!({ "jsonrpc": "2.0", "id": bulk.id, "result": result });
        let mut slots = self.slots.lock();
        slots.ready.insert(bulk.id, data);
        while slots.ready.len() > MAX_PARKED {
            slots.ready.pop_first();
        }
        stand_in.to_string().into_bytes()
    }
}

/// Cuts the string value of the first `"data"` member out of a bulk answer:
/// the line with `"data":""` in its place, and the value. The value is
/// base64 (it holds no `"` or `\\`); the caller checks that by decoding it.
fn excise_data(line: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    const KEY: &[u8] = b"\"data\":\"";
    let head = &line[..line.len().min(512)];
    let start = memchr::memmem::find(head, KEY)? + KEY.len();
    let end = start + memchr::memchr(b'"', &line[start..])?;
    let mut rest = Vec::with_capacity(line.len() - (end - start));
    rest.extend_from_slice(&line[..start]);
    rest.extend_from_slice(&line[end..]);
    Some((rest, &line[start..end]))
}

impl TransportReceiverT for LineReceiver {
    type Error = io::Error;

    async fn receive(&mut self) -> io::Result<ReceivedMessage> {
        match self.frames.next().await {
            Some(Ok(Frame::Line(line))) => Ok(ReceivedMessage::Bytes(self.intercept(&line))),
            Some(Ok(Frame::TooLong)) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("response line longer than {MAX_RESPONSE_LINE} bytes"),
            )),
            Some(Err(e)) => Err(e),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_cut_out_of_a_bulk_answer() {
        let line = br#"{"jsonrpc":"2.0","id":7,"result":{"offset":0,"length":3,"eof":true,"data":"YWJj"}}"#;
        let (rest, payload) = excise_data(line).expect("a data member");
        assert_eq!(payload, b"YWJj");
        assert_eq!(
            rest,
            br#"{"jsonrpc":"2.0","id":7,"result":{"offset":0,"length":3,"eof":true,"data":""}}"#
        );
        // an escaped quote inside a message is not a member
        let err = br#"{"jsonrpc":"2.0","id":7,"error":{"code":1,"message":"\"data\":\"x"}}"#;
        assert!(excise_data(err).is_none());
        assert!(excise_data(b"{}").is_none());
    }
}
