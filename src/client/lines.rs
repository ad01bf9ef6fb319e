//! The jsonrpsee client transport over one line-framed byte stream, with a
//! fast path for bulk responses.
//!
//! Responses are handed to jsonrpsee as raw bytes (it parses them itself). A
//! multi-megabyte `fs.read`/`stream.read`/`image.read` answer would be
//! scanned and copied three times on that path (once for the envelope, once
//! into the result type, once by the caller), so the receiver handles those
//! itself: [`ResponseDecoder`] decodes the base64 payload while it arrives,
//! the payload is kept in [`BulkSlots`] under the request id, and jsonrpsee
//! gets the answer without its payload and with a `slot` member naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use jsonrpsee::core::client::{ReceivedMessage, TransportReceiverT, TransportSenderT};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connect::{BoxRead, BoxWrite};
use super::frames::{
    json_values_over, Response, ResponseDecoder, SpareBuffers, MAX_RESPONSE_LINE,
    MAX_RESPONSE_VALUES, READ_BUFFER,
};

/// Methods whose result carries a base64 `data` payload.
const BULK_METHODS: [&str; 3] = ["fs.read", "stream.read", "image.read"];

/// Decoded payloads kept for requests nobody waits for any more (a caller
/// that gave up on a pipelined read) are dropped beyond this many.
const MAX_PARKED: usize = 64;

/// A decoded bulk payload, or why the agent's data could not be decoded.
pub type Payload = Result<Vec<u8>, String>;

/// Decoded bulk payloads by request id, and the ids of bulk requests in flight.
#[derive(Clone, Default)]
pub struct BulkSlots {
    inner: Arc<Mutex<SlotState>>,
}

#[derive(Default)]
struct SlotState {
    pending: BTreeSet<u64>,
    ready: BTreeMap<u64, Payload>,
}

impl BulkSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // A panic while holding the lock leaves plain maps behind: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The payload of the response to request `slot`, once.
    pub fn take(&self, slot: u64) -> Option<Payload> {
        self.lock().ready.remove(&slot)
    }
}

pub struct LineSender {
    writer: BoxWrite,
    slots: BulkSlots,
}

pub struct LineReceiver {
    reader: BoxRead,
    buf: BytesMut,
    decoder: ResponseDecoder,
    eof: bool,
    slots: BulkSlots,
}

/// The transport's two halves, its slots for decoded payloads, and the
/// spare buffers that payloads are decoded into.
pub fn transport(
    reader: BoxRead,
    writer: BoxWrite,
) -> (LineSender, LineReceiver, BulkSlots, SpareBuffers) {
    let slots = BulkSlots::default();
    let spares = SpareBuffers::default();
    (
        LineSender {
            writer,
            slots: slots.clone(),
        },
        LineReceiver {
            reader,
            buf: BytesMut::with_capacity(READ_BUFFER),
            decoder: ResponseDecoder::new(MAX_RESPONSE_LINE).with_spares(spares.clone()),
            eof: false,
            slots: slots.clone(),
        },
        slots,
        spares,
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

/// An error the agent sent with id `null`: about no request it could name,
/// e.g. `-32600` for a request line over its `--max-request-bytes`.
/// jsonrpsee would call it an answer to no pending call and drop it, and
/// the request would wait out its timeout; the client shows it instead.
fn connection_error(line: &[u8]) -> Option<io::Error> {
    #[derive(Deserialize)]
    struct NullIdError<'a> {
        id: Option<u64>,
        #[serde(borrow)]
        error: ErrorHead<'a>,
    }
    #[derive(Deserialize)]
    struct ErrorHead<'a> {
        code: i64,
        #[serde(borrow)]
        message: std::borrow::Cow<'a, str>,
    }
    // the agent writes the id near the front; other lines (a page of
    // 10,000 entries) are not parsed twice
    let head = line.get(..64).unwrap_or(line);
    if !head.windows(9).any(|w| w == b"\"id\":null") {
        return None;
    }
    let e = serde_json::from_slice::<NullIdError>(line).ok()?;
    if e.id.is_some() {
        return None;
    }
    Some(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the agent answered with an error that names no request: {} ({})",
            e.error.message, e.error.code
        ),
    ))
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
    /// The next answer decoded from what has been read, if there is one.
    fn next_response(&mut self) -> Option<Response> {
        let slots = self.slots.clone();
        let wanted = move |id: u64| slots.lock().pending.contains(&id);
        self.decoder.decode(&mut self.buf, &wanted)
    }

    /// What jsonrpsee gets for `response`.
    fn hand_over(&self, response: Response) -> io::Result<Vec<u8>> {
        match response {
            Response::Line(line) => {
                if let Some(refusal) = connection_error(&line) {
                    return Err(refusal);
                }
                if json_values_over(&line, MAX_RESPONSE_VALUES) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("response line holds more than {MAX_RESPONSE_VALUES} JSON values"),
                    ));
                }
                // An error answer (or anything else) ends a pending bulk request too.
                let mut slots = self.slots.lock();
                if !slots.pending.is_empty() {
                    if let Ok(head) = serde_json::from_slice::<ResponseHead>(&line) {
                        slots.pending.remove(&head.id);
                    }
                }
                Ok(line.to_vec())
            }
            Response::Bulk(answer) => {
                let line = answer.line_with(&format!("\"slot\":{}", answer.id));
                let mut slots = self.slots.lock();
                slots.pending.remove(&answer.id);
                slots.ready.insert(answer.id, answer.payload);
                while slots.ready.len() > MAX_PARKED {
                    slots.ready.pop_first();
                }
                Ok(line)
            }
            Response::TooLong => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("response line longer than {MAX_RESPONSE_LINE} bytes"),
            )),
        }
    }
}

impl TransportReceiverT for LineReceiver {
    type Error = io::Error;

    async fn receive(&mut self) -> io::Result<ReceivedMessage> {
        loop {
            if let Some(response) = self.next_response() {
                return self.hand_over(response).map(ReceivedMessage::Bytes);
            }
            if self.eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection",
                ));
            }
            // Raw data goes straight into its payload buffer.
            let raw = if self.buf.is_empty() {
                self.decoder.raw_payload_mut()
            } else {
                None
            };
            let n = match raw {
                Some((payload, left)) => {
                    let n = self.reader.read_buf(&mut payload.limit(*left)).await?;
                    *left -= n;
                    n
                }
                None => {
                    self.buf.reserve(READ_BUFFER);
                    self.reader.read_buf(&mut self.buf).await?
                }
            };
            if n == 0 {
                self.eof = true;
                self.decoder.end_of_stream(&mut self.buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::connection_error;

    #[test]
    fn only_errors_without_an_id_are_about_the_connection() {
        let too_long = br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid Request: line too long"}}"#;
        let e = connection_error(too_long).expect("an error naming no request");
        let text = e.to_string();
        assert!(
            text.contains("line too long") && text.contains("-32600"),
            "{text}"
        );
        for line in [
            &br#"{"jsonrpc":"2.0","id":7,"error":{"code":1001,"message":"not found"}}"#[..],
            br#"{"jsonrpc":"2.0","id":null,"result":"pong"}"#,
            br#"{"jsonrpc":"2.0","id":8,"result":{"error":{"code":1,"message":"x"}}}"#,
            b"not json",
        ] {
            assert!(
                connection_error(line).is_none(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
