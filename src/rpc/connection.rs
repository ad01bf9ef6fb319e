//! One connection: the authentication phase (strictly one message at a time),
//! then concurrent dispatch with at most `max_in_flight` requests running,
//! and a single writer task so that response lines never interleave.

use futures_util::StreamExt;
use jsonrpsee::{ConnectionId, Extensions};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;

use super::codes::{
    AUTH_FAILED, AUTH_REQUIRED, INVALID_PARAMS, INVALID_REQUEST, LIMIT_REACHED, SHUTTING_DOWN,
};
use super::envelope::{
    error_line, error_object_line, parse_message, parse_request, result_head, result_line, Id,
    Message,
};
use super::router::{Body, Call, Hold, Outcome, Trailer, AUTHENTICATE, RAW_IN_BATCH};
use super::server::Inner;
use crate::transport::listener::Stream;
use crate::transport::{Frame, LineDecoder, Meter, Metered, ShortageRetry};

/// The result of a successful `authenticate`.
const AUTH_RESULT: &str = concat!(
    "{\"protocol\":1,\"agent\":\"restore-agent\",\"version\":\"",
    env!("CARGO_PKG_VERSION"),
    "\"}"
);

/// One response: `head`, then `body` (a result too large to copy again, or
/// produced while it is written), then `tail`, the newline the writer adds,
/// and the `trailer`'s bytes if the result has any.
struct Outgoing {
    head: Vec<u8>,
    body: Body,
    tail: &'static [u8],
    trailer: Option<Box<dyn Trailer>>,
    hold: Option<Box<dyn Hold>>,
}

/// Bytes that batch answers not yet written may take, over all
/// connections. A batch is answered in one line, built whole (it cannot be
/// streamed like a single bulk read's answer, whose share of the read
/// budget is held until it is written), so without this bound a batch of
/// 64 base64 reads of 16 MiB would build a 1.4 GB line.
pub(super) const BATCH_ANSWER_BYTES: usize = 8 << 20;

const BATCH_ANSWER_FULL: &str = "limit reached: batch answers not yet written may take 8 MiB \
     over all connections; send this request on its own";

/// What a batch answer holds of [`BATCH_ANSWER_BYTES`]. Nobody waits for
/// it: a batch answer that does not fit is refused at once.
struct BatchRoom {
    _permits: Vec<OwnedSemaphorePermit>,
}

impl Hold for BatchRoom {
    fn wanted(&self) -> bool {
        false
    }
}

/// Capacity of the buffer a connection's writer produces streamed result
/// parts into (reused for every part of every response).
const PART_BUFFER: usize = 256 << 10;

impl Outgoing {
    fn line(line: Vec<u8>) -> Outgoing {
        Outgoing {
            head: line,
            body: Body::Bytes(Vec::new()),
            tail: b"",
            trailer: None,
            hold: None,
        }
    }

    fn reply(id: &Id, outcome: Outcome) -> Outgoing {
        match outcome {
            Outcome::Result(r) => Outgoing {
                head: result_head(id),
                body: r.json,
                tail: b"}",
                trailer: r.trailer,
                hold: r.hold,
            },
            Outcome::Error(err) => Outgoing::line(error_object_line(id, &err)),
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut v = self.head;
        v.extend_from_slice(&self.body.into_bytes());
        v.extend_from_slice(self.tail);
        v
    }
}

type Frames = FramedRead<tokio::io::ReadHalf<Box<dyn Stream>>, LineDecoder>;
type Sender = mpsc::Sender<Outgoing>;

struct Conn {
    id: ConnectionId,
    ext: Extensions,
    inner: Arc<Inner>,
}

pub(super) async fn serve(inner: Arc<Inner>, stream: Box<dyn Stream>, id: usize) {
    let (rd, wr) = tokio::io::split(stream);
    let mut frames =
        FramedRead::with_capacity(rd, LineDecoder::new(inner.cfg.max_request_bytes), 64 << 10);
    let (tx, rx) = mpsc::channel(inner.cfg.max_in_flight);
    let wr = ShortageRetry::new(wr, format!("conn {id}"));
    let stall_timeout = inner.cfg.stall_timeout;
    let mut writer = tokio::spawn(write_lines(wr, rx, id, stall_timeout));
    let mut ext = Extensions::new();
    ext.insert(ConnectionId(id));
    let conn = Arc::new(Conn {
        id: ConnectionId(id),
        ext,
        inner,
    });

    if authenticate(&conn, &mut frames, &tx).await {
        serve_requests(&conn, &mut frames, &tx).await;
    }
    drop(tx);
    // A client that does not read its responses cannot hold up a shutdown.
    let shutdown = conn.inner.shared.shutdown_token().clone();
    let grace = conn.inner.cfg.shutdown_grace;
    tokio::select! {
        _ = &mut writer => {}
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => writer.abort(),
    }
}

/// The gate: the first message must be a successful `authenticate` request.
/// Returns whether it was; on any failure one error line is sent and the
/// connection is to be closed.
async fn authenticate(conn: &Conn, frames: &mut Frames, tx: &Sender) -> bool {
    let cfg = &conn.inner.cfg;
    let shutdown = conn.inner.shared.shutdown_token();
    let frame = tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = tokio::time::sleep(cfg.auth_timeout) => {
            log::info!("conn {}: not authenticated within {:?}, closing", conn.id.0, cfg.auth_timeout);
            return false;
        }
        f = frames.next() => f,
    };
    let line = match frame {
        Some(Ok(Frame::Line(line))) => line,
        Some(Ok(Frame::TooLong)) => {
            let _ = tx.send(Outgoing::line(auth_required(&Id::null()))).await;
            return false;
        }
        None | Some(Err(_)) => return false,
    };
    let (reply, ok) = check_authenticate(conn, &line).await;
    let _ = tx.send(Outgoing::line(reply)).await;
    ok
}

fn auth_required(id: &Id) -> Vec<u8> {
    error_line(id, AUTH_REQUIRED, "authentication required")
}

async fn check_authenticate(conn: &Conn, line: &[u8]) -> (Vec<u8>, bool) {
    let raw = match parse_message(line) {
        Ok(Message::Single(raw)) => raw,
        Ok(Message::Batch(_)) | Err(_) => return (auth_required(&Id::null()), false),
    };
    let req = match parse_request(raw) {
        Ok(req) => req,
        Err(rejection) => return (auth_required(&rejection.id), false),
    };
    let Some(id) = req.id else {
        return (auth_required(&Id::null()), false);
    };
    if req.method != AUTHENTICATE {
        return (auth_required(&id), false);
    }
    let Some(ticket) = ticket_param(req.params) else {
        let err = jsonrpsee::types::ErrorObjectOwned::owned(
            INVALID_PARAMS,
            "Invalid params",
            Some("expected {\"ticket\": string} or [string]"),
        );
        return (
            Outgoing::reply(&id, Outcome::error(err)).into_bytes(),
            false,
        );
    };
    if conn.inner.ticket.matches(ticket.as_bytes()) {
        log::info!("conn {}: authenticated", conn.id.0);
        conn.inner.shared.touch();
        conn.inner.shared.count_request();
        (result_line(&id, AUTH_RESULT), true)
    } else {
        log::warn!("conn {}: authentication failed (wrong ticket)", conn.id.0);
        tokio::time::sleep(conn.inner.cfg.auth_fail_delay).await;
        (error_line(&id, AUTH_FAILED, "authentication failed"), false)
    }
}

/// The ticket from `{"ticket": "..."}` or `["..."]`.
fn ticket_param(params: Option<&RawValue>) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TicketParams {
        Named { ticket: String },
        Positional((String,)),
    }
    match serde_json::from_str(params?.get()).ok()? {
        TicketParams::Named { ticket } | TicketParams::Positional((ticket,)) => Some(ticket),
    }
}

/// After authentication: read lines while fewer than `max_in_flight`
/// requests run, answer each from its own task, stop on EOF or shutdown, and
/// give in-flight requests the grace period to finish.
async fn serve_requests(conn: &Arc<Conn>, frames: &mut Frames, tx: &Sender) {
    let cfg = &conn.inner.cfg;
    let shutdown = conn.inner.shared.shutdown_token();
    let slots = Arc::new(Semaphore::new(cfg.max_in_flight));
    // A writer that failed has closed the receiving end: answers can no
    // longer reach the client, so reading on would only hold the connection
    // open without serving it. One future for the whole loop: it registers
    // with the channel once, not twice per request.
    let writer_gone = tx.closed();
    tokio::pin!(writer_gone);
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = &mut writer_gone => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let frame = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = &mut writer_gone => break,
            f = frames.next() => f,
        };
        match frame {
            Some(Ok(Frame::Line(line))) => {
                tokio::spawn(answer(conn.clone(), line, tx.clone(), permit));
            }
            Some(Ok(Frame::TooLong)) => {
                let line = error_line(
                    &Id::null(),
                    INVALID_REQUEST,
                    "Invalid Request: line too long",
                );
                if tx.send(Outgoing::line(line)).await.is_err() {
                    break;
                }
            }
            None | Some(Err(_)) => break,
        }
    }
    if shutdown.is_cancelled() {
        refuse_buffered(frames, tx).await;
    }
    let all = u32::try_from(cfg.max_in_flight).unwrap_or(u32::MAX);
    let grace = if shutdown.is_cancelled() {
        cfg.shutdown_grace
    } else {
        Duration::MAX
    };
    let _ = tokio::time::timeout(grace, slots.acquire_many(all)).await;
}

/// Answers the requests a client had already sent when the shutdown began
/// (complete lines still in the read buffer) with -32004, instead of
/// dropping them unanswered. Nothing more is read from the socket.
async fn refuse_buffered(frames: &mut Frames, tx: &Sender) {
    use tokio_util::codec::Decoder;
    let mut buffered = std::mem::take(frames.read_buffer_mut());
    while let Ok(Some(Frame::Line(line))) = frames.decoder_mut().decode(&mut buffered) {
        let id = match parse_message(&line) {
            Ok(Message::Single(raw)) => match parse_request(raw) {
                Ok(req) => req.id,
                Err(r) => Some(r.id),
            },
            Ok(Message::Batch(_)) | Err(_) => Some(Id::null()),
        };
        if let Some(id) = id {
            let line = error_line(&id, SHUTTING_DOWN, "shutting down");
            if tx.send(Outgoing::line(line)).await.is_err() {
                return;
            }
        }
    }
}

async fn answer(conn: Arc<Conn>, line: bytes::BytesMut, tx: Sender, permit: OwnedSemaphorePermit) {
    if let Some(out) = respond(&conn, &line).await {
        let _ = tx.send(out).await;
    }
    drop(permit);
}

async fn respond(conn: &Conn, line: &[u8]) -> Option<Outgoing> {
    let items = match parse_message(line) {
        Err(r) => return Some(Outgoing::line(error_line(&r.id, r.code, r.message))),
        Ok(Message::Single(raw)) => return respond_one(conn, raw, false).await,
        Ok(Message::Batch(items)) => items,
    };
    if items.is_empty() {
        return Some(Outgoing::line(error_line(
            &Id::null(),
            INVALID_REQUEST,
            "Invalid Request: empty batch",
        )));
    }
    if items.len() > conn.inner.cfg.max_batch {
        let msg = "Invalid Request: batch longer than --max-batch";
        return Some(Outgoing::line(error_line(
            &Id::null(),
            INVALID_REQUEST,
            msg,
        )));
    }
    let mut out = Vec::new();
    let mut held = Vec::new();
    for raw in items {
        let Some(reply) = respond_one(conn, raw, true).await else {
            continue;
        };
        let mut bytes = reply.into_bytes();
        let room = u32::try_from(bytes.len()).ok().and_then(|n| {
            conn.inner
                .batch_answers
                .clone()
                .try_acquire_many_owned(n)
                .ok()
        });
        match room {
            Some(permit) => held.push(permit),
            None => bytes = error_line(&id_of(raw), LIMIT_REACHED, BATCH_ANSWER_FULL),
        }
        out.push(if out.is_empty() { b'[' } else { b',' });
        out.extend_from_slice(&bytes);
    }
    if out.is_empty() {
        return None;
    }
    out.push(b']');
    let mut line = Outgoing::line(out);
    line.hold = Some(Box::new(BatchRoom { _permits: held }));
    Some(line)
}

/// The id of a batch item that was answered: its request's, or the one its
/// rejection names.
fn id_of(raw: &RawValue) -> Id {
    match parse_request(raw) {
        Ok(req) => req.id.unwrap_or_else(Id::null),
        Err(r) => r.id,
    }
}

/// Answers one request; `in_batch`: its answer goes into a batch's one
/// line, which cannot carry bytes after it.
async fn respond_one(conn: &Conn, raw: &RawValue, in_batch: bool) -> Option<Outgoing> {
    let req = match parse_request(raw) {
        Ok(req) => req,
        Err(r) => return Some(Outgoing::line(error_line(&r.id, r.code, r.message))),
    };
    let shared = &conn.inner.shared;
    shared.count_request();
    if req.method == AUTHENTICATE {
        // Already authenticated: the same answer again.
        return req
            .id
            .map(|id| Outgoing::line(result_line(&id, AUTH_RESULT)));
    }
    let router = &conn.inner.router;
    if router.resets_watchdog(&req.method, req.params) {
        shared.touch();
    }
    let call = Call {
        conn: conn.id,
        in_batch,
    };
    let outcome = router.call(&req.method, req.params, call, &conn.ext).await;
    let id = req.id?;
    // A raw method refuses raw data in a batch before it runs (see `Call`);
    // should one not, its answer still cannot go into the batch's line.
    if in_batch && matches!(&outcome, Outcome::Result(r) if r.trailer.is_some()) {
        return Some(Outgoing::line(error_line(
            &id,
            INVALID_PARAMS,
            RAW_IN_BATCH,
        )));
    }
    Some(Outgoing::reply(&id, outcome))
}

/// Writes the answers in the order they come; on a write error it logs it
/// and returns, dropping `rx`, which ends the connection (see
/// `serve_requests`). So it does when the client takes none of an answer
/// for `stall_timeout` while others wait for what the answer holds.
async fn write_lines<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Outgoing>,
    id: usize,
    stall_timeout: Option<Duration>,
) {
    let wr = Metered::new(wr);
    let meter = wr.meter();
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    let mut part = Vec::new();
    while let Some(out) = rx.recv().await {
        let Outgoing {
            head,
            mut body,
            tail,
            mut trailer,
            hold,
        } = out;
        let written = async {
            w.write_all(&head).await?;
            match &mut body {
                Body::Bytes(b) => w.write_all(b).await?,
                Body::Parts(src) => {
                    part.reserve(PART_BUFFER);
                    loop {
                        part.clear();
                        let more = src.next_part(&mut part);
                        w.write_all(&part).await?;
                        if !more {
                            break;
                        }
                    }
                }
            }
            w.write_all(tail).await?;
            w.write_all(b"\n").await?;
            if let Some(trailer) = &mut trailer {
                while let Some(bytes) = trailer.next_bytes() {
                    w.write_all(bytes).await?;
                }
            }
            // Coalesce: flush only when no other response is waiting.
            if rx.is_empty() {
                w.flush().await?;
            }
            std::io::Result::Ok(())
        };
        let stalled = stalled(&meter, hold.as_deref(), stall_timeout);
        tokio::select! {
            done = written => if let Err(e) = done {
                log_write_error(id, &e);
                return;
            },
            () = stalled => {
                log::warn!(
                    "conn {id}: the client took none of an answer for {} s while other \
                     requests waited for the memory it holds; closing the connection",
                    stall_timeout.unwrap_or_default().as_secs_f64()
                );
                return;
            }
        }
        drop(hold);
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// Ends when the client has taken nothing for `timeout` (the bytes of
/// `meter` stood still) while `hold` is wanted; never without a hold or a
/// timeout. Checked a few times per timeout, so a stall is seen within 1.25
/// timeouts of its start.
async fn stalled(meter: &Meter, hold: Option<&dyn Hold>, timeout: Option<Duration>) {
    let (Some(hold), Some(timeout)) = (hold, timeout) else {
        return std::future::pending().await;
    };
    let tick = (timeout / 4).max(Duration::from_millis(10));
    let mut seen = meter.bytes();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = meter.bytes();
        if now != seen {
            (seen, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= timeout && hold.wanted() {
            return;
        }
    }
}

/// A client that closes its connection while answers are still on their way
/// is ordinary; any other write error is worth a warning.
fn log_write_error(id: usize, e: &std::io::Error) {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    if matches!(e.kind(), BrokenPipe | ConnectionReset) {
        log::debug!("conn {id}: the client stopped reading ({e}); closing");
    } else {
        log::warn!("conn {id}: writing an answer failed: {e}; closing the connection");
    }
}
