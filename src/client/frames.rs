//! Framing of the agent's answers on the client side: lines, and bulk
//! answers whose base64 payload is decoded while it arrives, or whose raw
//! payload follows their line (`"encoding":"raw"`).
//!
//! A bulk answer (`image.read`, `fs.read`, `stream.read`) is one line of up to
//! 22 MiB, nearly all of it base64. Buffering the whole line, scanning it for
//! its newline and for the end of the payload, then decoding it reads every
//! byte three times from memory. [`ResponseDecoder`] instead recognises a bulk
//! answer by its head (the bytes before `"data":"`), decodes the payload
//! straight from the read buffer piece by piece as it arrives (while those
//! bytes are still in the CPU cache), and keeps only the line without its
//! payload. The read buffer never holds more than one read's worth of it.
//!
//! A raw answer (`{"offset","length","eof","encoding":"raw"}`) is a short
//! line followed by exactly `length` bytes of data, which are moved into the
//! payload as they arrive; they are never searched for newlines, so they
//! can hold any bytes.
//!
//! It is sans-IO: callers feed it the bytes they read, so the async
//! transport and synchronous programs (benchmarks, tests) share it. It never
//! trusts the payload: a bad character, padding in the middle, or a line that
//! ends inside the payload make the payload an error, never data.

use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::transport::LineDecoder;

/// The error payload of a raw answer whose connection ended before all
/// of its data came: the agent went away, the data is not bad.
pub const CONNECTION_ENDED: &str = "the connection ended inside the answer's data";

/// Longest answer line a client accepts: a 16 MiB read is about 22.4 MiB
/// of base64.
pub const MAX_RESPONSE_LINE: usize = 64 << 20;
/// Most JSON values an answer line other than a bulk one may hold, counted
/// by [`json_values_over`]. The largest the agent sends, a listing page, is
/// about 1 MiB of JSON, so far fewer; parsed, a value takes tens of bytes,
/// so this bounds what one line costs the client whatever the agent sends
/// (60 MB of `[0,0,...]`, 30 million values, took the client to 1 GiB).
pub const MAX_RESPONSE_VALUES: usize = 1 << 20;
/// Bytes to read from the stream at a time: bulk payloads are decoded from
/// the read buffer while they are still in the CPU cache.
pub const READ_BUFFER: usize = 256 << 10;

/// What precedes a bulk payload.
const DATA_KEY: &[u8] = b"\"data\":\"";
/// What marks a raw answer, whose payload follows its line.
const RAW_KEY: &[u8] = b"\"encoding\":\"raw\"";
/// How far into a line `"data":"` may start for the line to be taken as a
/// bulk answer (the agent writes a short head before the payload).
const HEAD_MAX: usize = 512;
/// Longest part of a bulk answer after its payload.
const TAIL_MAX: usize = 512;
/// Payload bytes reserved up front at most, whatever the head announces.
const PREALLOC_MAX: usize = 16 << 20;

/// Payload buffers that callers are done with, for the next bulk answers
/// to decode into. A fresh 4 MiB buffer is memory the kernel has to map
/// and zero page by page; a payload that travels to another thread and is
/// freed there is seldom reused by the allocator (`restore-client extract
/// -o` of a 1.5 GB tree took 75,000-140,000 page faults). Clones share the
/// spares; at most [`MAX_SPARE_BUFFERS`] are kept.
#[derive(Clone, Default)]
pub struct SpareBuffers(Arc<Mutex<Vec<Vec<u8>>>>);

/// Spare payload buffers kept at most: as many as reads in flight.
pub const MAX_SPARE_BUFFERS: usize = 4;

impl SpareBuffers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic while holding the lock leaves a plain list behind.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands back a payload buffer (its contents are dropped).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        buf.clear();
        let mut spares = self.lock();
        if spares.len() < MAX_SPARE_BUFFERS {
            spares.push(buf);
        }
    }

    /// An empty buffer of at least `capacity` bytes: a spare if one is
    /// large enough, else a new one.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let spare = {
            let mut spares = self.lock();
            let fit = spares.iter().position(|b| b.capacity() >= capacity);
            fit.map(|i| spares.swap_remove(i))
        };
        spare.unwrap_or_else(|| Vec::with_capacity(capacity))
    }
}

/// One answer from the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// A line without its terminator (never empty or whitespace-only).
    Line(BytesMut),
    /// A line longer than the limit (its rest is discarded).
    TooLong,
    /// A bulk answer for an id the caller asked about.
    Bulk(BulkAnswer),
}

/// A bulk answer with its payload decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct BulkAnswer {
    pub id: u64,
    /// The line without its payload up to where more members may go: up
    /// to and including `"data":""`, or `"encoding":"raw"`.
    before: Vec<u8>,
    /// The rest of the line.
    after: Vec<u8>,
    /// The decoded payload, or why it is not usable.
    pub payload: Result<Vec<u8>, String>,
}

impl BulkAnswer {
    /// The answer without its payload (an empty `data`) and with `extra`
    /// members (e.g. `"slot":7`) after `data` or `encoding`: what a JSON
    /// parser may read instead of the whole answer.
    pub fn line_with(&self, extra: &str) -> Vec<u8> {
        let mut line = Vec::with_capacity(self.before.len() + extra.len() + self.after.len() + 1);
        line.extend_from_slice(&self.before);
        if !extra.is_empty() {
            line.push(b',');
            line.extend_from_slice(extra.as_bytes());
        }
        line.extend_from_slice(&self.after);
        line
    }
}

#[derive(Deserialize)]
struct Head {
    id: u64,
    result: HeadResult,
}

/// The members of a raw answer's line that frame its payload.
#[derive(Deserialize)]
struct RawHead {
    id: Option<u64>,
    result: RawHeadResult,
}

#[derive(Deserialize)]
struct RawHeadResult {
    length: u64,
    encoding: String,
}

#[derive(Deserialize)]
struct HeadResult {
    length: Option<u64>,
    /// Only there to require a `data` member at this level.
    #[allow(dead_code)]
    data: IgnoredAny,
}

/// Splits the agent's byte stream into [`Response`]s.
pub struct ResponseDecoder {
    max_line: usize,
    state: State,
    spares: SpareBuffers,
}

enum State {
    /// At the start of a line.
    Start,
    /// Inside a line that is not a bulk answer; searched up to `scanned`.
    Line { scanned: usize },
    /// Inside an over-long line: dropping bytes up to its newline.
    Discard,
    /// Inside a bulk answer's payload.
    Payload(Box<Bulk>),
    /// After a bulk answer's payload, up to its newline.
    Tail(Box<Bulk>),
    /// Inside a raw answer's payload, with this many bytes still to come.
    Raw(Box<Bulk>, usize),
    /// Dropping this many bytes of a raw payload nobody asked for.
    Skip(u64),
}

struct Bulk {
    id: u64,
    /// The line up to where more members may go (see [`BulkAnswer`]).
    before: Vec<u8>,
    out: Vec<u8>,
    /// Characters of a 4-character group cut off by the end of a read.
    carry: [u8; 4],
    carried: usize,
    /// The last group decoded was padded: nothing may follow it.
    padded: bool,
    /// Bytes of the line so far (for the line limit).
    len: usize,
    error: Option<String>,
    /// The line after the payload (base64) or after `"encoding":"raw"`.
    tail: Vec<u8>,
}

impl Bulk {
    fn new(id: u64, before: Vec<u8>, announced: Option<u64>, spares: &SpareBuffers) -> Box<Bulk> {
        let capacity = announced
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
            .min(PREALLOC_MAX);
        Box::new(Bulk {
            id,
            len: before.len(),
            before,
            out: spares.take(capacity),
            carry: [0; 4],
            carried: 0,
            padded: false,
            error: None,
            tail: Vec::new(),
        })
    }

    /// Decodes the base64 characters `chars` (part of the payload).
    fn feed(&mut self, mut chars: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if self.carried > 0 {
            let take = (4 - self.carried).min(chars.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&chars[..take]);
            self.carried += take;
            chars = &chars[take..];
            if self.carried < 4 {
                return;
            }
            let group = self.carry;
            self.carried = 0;
            self.decode(&group);
        }
        let whole = chars.len() / 4 * 4;
        self.decode(&chars[..whole]);
        let rest = &chars[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }

    /// Decodes whole 4-character groups.
    fn decode(&mut self, groups: &[u8]) {
        if groups.is_empty() || self.error.is_some() {
            return;
        }
        if self.padded {
            self.error = Some("base64 data goes on after its padding".into());
            return;
        }
        match crate::base64::decode_append(groups, &mut self.out) {
            Ok(()) => self.padded = groups.last() == Some(&b'='),
            Err(e) => self.error = Some(format!("bad data: {e}")),
        }
    }

    /// The payload ended at its closing quote.
    fn finish(&mut self) {
        if self.carried > 0 && self.error.is_none() {
            self.error = Some("base64 data is not a whole number of groups".into());
        }
    }

    fn answer(self) -> BulkAnswer {
        let b = self;
        BulkAnswer {
            id: b.id,
            before: b.before,
            after: b.tail,
            payload: match b.error {
                Some(e) => Err(e),
                None => Ok(b.out),
            },
        }
    }
}

impl ResponseDecoder {
    /// `max_line` is the longest accepted line, terminator excluded.
    pub fn new(max_line: usize) -> Self {
        ResponseDecoder {
            max_line,
            state: State::Start,
            spares: SpareBuffers::default(),
        }
    }

    /// Payloads are decoded into buffers from `spares` when it has them.
    pub fn with_spares(mut self, spares: SpareBuffers) -> Self {
        self.spares = spares;
        self
    }

    /// Takes the next answer out of `buf` (consuming what it decodes), or
    /// `None` when more bytes are needed. A line whose head shows a result
    /// with a `data` member at `"data":"`, for an id `wanted` accepts, comes
    /// out as [`Response::Bulk`].
    pub fn decode(&mut self, buf: &mut BytesMut, wanted: &dyn Fn(u64) -> bool) -> Option<Response> {
        loop {
            match std::mem::replace(&mut self.state, State::Start) {
                State::Start => {
                    if buf.is_empty() {
                        return None;
                    }
                    if let Some(bulk) = self.bulk_head(buf, wanted) {
                        self.state = State::Payload(bulk);
                        continue;
                    }
                    let window = HEAD_MAX + DATA_KEY.len();
                    if buf.len() < window && memchr::memchr(b'\n', buf).is_none() {
                        // Too little of the line to tell yet.
                        return None;
                    }
                    self.state = State::Line { scanned: 0 };
                }
                State::Line { scanned } => match memchr::memchr(b'\n', &buf[scanned..]) {
                    Some(i) => {
                        let end = scanned + i;
                        let mut line = buf.split_to(end + 1);
                        line.truncate(end);
                        let content = end - usize::from(line.last() == Some(&b'\r'));
                        if content > self.max_line {
                            return Some(Response::TooLong);
                        }
                        if let Some(line) = LineDecoder::finish_line(line) {
                            if let Some(r) = self.after_line(line, wanted) {
                                return Some(r);
                            }
                        }
                    }
                    None if buf.len() > self.max_line + 1 => {
                        buf.clear();
                        self.state = State::Discard;
                        return Some(Response::TooLong);
                    }
                    None => {
                        self.state = State::Line { scanned: buf.len() };
                        return None;
                    }
                },
                State::Discard => match memchr::memchr(b'\n', buf) {
                    Some(i) => buf.advance(i + 1),
                    None => {
                        buf.clear();
                        self.state = State::Discard;
                        return None;
                    }
                },
                State::Payload(mut bulk) => {
                    let stop = memchr::memchr2(b'"', b'\n', buf);
                    let piece = stop.unwrap_or(buf.len());
                    bulk.len += piece;
                    if bulk.len > self.max_line {
                        buf.advance(piece);
                        self.state = State::Discard;
                        return Some(Response::TooLong);
                    }
                    bulk.feed(&buf[..piece]);
                    buf.advance(piece);
                    match stop.map(|_| buf[0]) {
                        Some(b'"') => {
                            buf.advance(1);
                            bulk.finish();
                            self.state = State::Tail(bulk);
                        }
                        Some(_) => {
                            // The line ended inside the payload.
                            buf.advance(1);
                            bulk.error = Some("the answer ends inside its data".into());
                            bulk.tail = b"}}".to_vec();
                            return Some(Response::Bulk((*bulk).answer()));
                        }
                        None => {
                            self.state = State::Payload(bulk);
                            return None;
                        }
                    }
                }
                State::Tail(mut bulk) => {
                    let newline = memchr::memchr(b'\n', buf);
                    let piece = newline.unwrap_or(buf.len());
                    if bulk.tail.len() + piece > TAIL_MAX {
                        buf.advance(piece);
                        self.state = State::Discard;
                        return Some(Response::TooLong);
                    }
                    bulk.tail.extend_from_slice(&buf[..piece]);
                    buf.advance(piece);
                    if newline.is_none() {
                        self.state = State::Tail(bulk);
                        return None;
                    }
                    buf.advance(1);
                    if bulk.tail.last() == Some(&b'\r') {
                        bulk.tail.pop();
                    }
                    return Some(Response::Bulk((*bulk).answer()));
                }
                State::Raw(mut bulk, left) => {
                    let n = left.min(buf.len());
                    bulk.out.extend_from_slice(&buf[..n]);
                    buf.advance(n);
                    if n == left {
                        return Some(Response::Bulk((*bulk).answer()));
                    }
                    self.state = State::Raw(bulk, left - n);
                    return None;
                }
                State::Skip(left) => {
                    let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    buf.advance(n);
                    let left = left - n as u64;
                    if left > 0 {
                        self.state = State::Skip(left);
                        return None;
                    }
                }
            }
        }
    }

    /// Inside a raw payload: its buffer and how many bytes it still lacks,
    /// so that a caller whose read buffer is empty can read them straight
    /// into it (one copy fewer) and count them off.
    pub fn raw_payload_mut(&mut self) -> Option<(&mut Vec<u8>, &mut usize)> {
        match &mut self.state {
            State::Raw(bulk, left) if bulk.error.is_none() => Some((&mut bulk.out, left)),
            _ => None,
        }
    }

    /// The stream ended after what `buf` holds: a last line without its
    /// `\n` still counts, and an answer cut off inside its payload comes out
    /// with an error payload.
    pub fn end_of_stream(&mut self, buf: &mut BytesMut) {
        let at_start = self.at_start();
        match &mut self.state {
            State::Raw(bulk, left) => {
                bulk.out.extend_from_slice(buf);
                buf.clear();
                bulk.error = Some(CONNECTION_ENDED.into());
                *left = 0;
            }
            State::Skip(_) => {
                buf.clear();
                self.state = State::Start;
            }
            _ if !buf.is_empty() || !at_start => buf.extend_from_slice(b"\n"),
            _ => {}
        }
    }

    /// A whole line that is not a base64 bulk answer: a raw answer's line
    /// (its payload follows: `None`, the state says what comes), or any
    /// other line.
    fn after_line(&mut self, line: BytesMut, wanted: &dyn Fn(u64) -> bool) -> Option<Response> {
        let Some(head) = raw_head(&line) else {
            return Some(Response::Line(line));
        };
        let (before, after) = line.split_at(head.marker_end);
        let Some(id) = head.id.filter(|&id| wanted(id)) else {
            // Not asked for: the line as it is, its data dropped.
            self.state = State::Skip(head.length);
            return Some(Response::Line(line));
        };
        match usize::try_from(head.length) {
            Ok(left) if left <= self.max_line => {
                let mut bulk = Bulk::new(id, before.to_vec(), Some(head.length), &self.spares);
                bulk.tail = after.to_vec();
                self.state = State::Raw(bulk, left);
                None
            }
            _ => {
                // Stay in step with the stream whatever happens to the answer.
                self.state = State::Skip(head.length);
                let length = head.length;
                Some(Response::Bulk(BulkAnswer {
                    id,
                    before: before.to_vec(),
                    after: after.to_vec(),
                    payload: Err(format!(
                        "the answer announces {length} bytes of data, more than the limit of {}",
                        self.max_line
                    )),
                }))
            }
        }
    }

    /// Whether the decoder is between answers (nothing of one is held).
    pub fn at_start(&self) -> bool {
        matches!(self.state, State::Start)
    }

    /// At the start of a line: the bulk answer it begins, when its head is
    /// complete in `buf`, names a wanted id and has the payload's key at the
    /// level of the result's members; the head is then taken out of `buf`.
    fn bulk_head(&self, buf: &mut BytesMut, wanted: &dyn Fn(u64) -> bool) -> Option<Box<Bulk>> {
        let window = &buf[..buf.len().min(HEAD_MAX + DATA_KEY.len())];
        let window = match memchr::memchr(b'\n', window) {
            Some(nl) => &window[..nl],
            None => window,
        };
        let end = memchr::memmem::find(window, DATA_KEY)? + DATA_KEY.len();
        // The head closed with an empty payload: valid JSON exactly when the
        // key is a member of the result object.
        let mut probe = Vec::with_capacity(end + 3);
        probe.extend_from_slice(&window[..end]);
        probe.extend_from_slice(b"\"}}");
        let head: Head = serde_json::from_slice(&probe).ok()?;
        if !wanted(head.id) {
            return None;
        }
        // `"data":"` becomes `"data":""`: the line without its payload.
        probe.truncate(end);
        probe.push(b'"');
        buf.advance(end);
        Some(Bulk::new(head.id, probe, head.result.length, &self.spares))
    }
}

/// What frames a raw answer's payload.
struct RawFrame {
    id: Option<u64>,
    /// Data bytes after the line.
    length: u64,
    /// Where `"encoding":"raw"` ends in the line.
    marker_end: usize,
}

/// The frame of a raw answer's line; `None` for any other line. Such a line
/// is short; it is parsed only if it has the marker.
fn raw_head(line: &[u8]) -> Option<RawFrame> {
    if line.len() > HEAD_MAX + TAIL_MAX {
        return None;
    }
    let marker_end = memchr::memmem::find(line, RAW_KEY)? + RAW_KEY.len();
    let head: RawHead = serde_json::from_slice(line).ok()?;
    (head.result.encoding == "raw").then_some(RawFrame {
        id: head.id,
        length: head.result.length,
        marker_end,
    })
}

/// Whether the JSON text `line` holds more than `max` values, counted from
/// above by its commas, colons and opening brackets outside strings (a
/// value has at least one of them before or after it, but the first). A
/// pass over the bytes that allocates nothing, for before a line is parsed.
pub fn json_values_over(line: &[u8], max: usize) -> bool {
    let mut count = 0usize;
    let mut rest = line;
    while let Some((&b, after)) = rest.split_first() {
        rest = after;
        match b {
            b',' | b':' | b'[' | b'{' => {
                count += 1;
                if count > max {
                    return true;
                }
            }
            // a string: up to its closing quote, escapes skipped whole
            b'"' => loop {
                let Some(i) = memchr::memchr2(b'"', b'\\', rest) else {
                    return false;
                };
                let quote = rest[i] == b'"';
                rest = rest
                    .get(i + if quote { 1 } else { 2 }..)
                    .unwrap_or_default();
                if quote {
                    break;
                }
            },
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn json_values_are_counted_outside_strings_only() {
        let over = |text: &str, max| json_values_over(text.as_bytes(), max);
        assert!(!over(r#"{"a":[1,2,3]}"#, 5) && over(r#"{"a":[1,2,3]}"#, 4));
        // commas, colons and brackets inside strings, escaped quotes too
        let quoted = r#"{"k,:[{":"v\",[{:\\",:"w"}"#;
        assert!(!over(quoted, 4) && over(quoted, 3));
        assert!(!over(
            &format!(r#"{{"data":"{}"}}"#, "A,".repeat(100_000)),
            2
        ));
        let zeros = format!("[{}0]", "0,".repeat(1000));
        assert!(!over(&zeros, 1001) && over(&zeros, 1000));
        // an unterminated string or a trailing backslash ends the count
        assert!(!over(r#"[1,"abc"#, 2) && !over("[\"\\", 1));
    }

    /// Feeds `input` in pieces of `step` bytes; every id is wanted.
    fn decode_all(input: &[u8], step: usize) -> Vec<Response> {
        decode_with(input, step, MAX, &|_| true)
    }

    /// Feeds `input` in pieces of `step` bytes to a decoder with line limit
    /// `max_line` that wants the ids `wanted` accepts.
    fn decode_with(
        input: &[u8],
        step: usize,
        max_line: usize,
        wanted: &dyn Fn(u64) -> bool,
    ) -> Vec<Response> {
        let mut dec = ResponseDecoder::new(max_line);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(r) = dec.decode(&mut buf, wanted) {
                out.push(r);
            }
        }
        out
    }

    fn bulk_line(id: u64, data: &[u8]) -> Vec<u8> {
        format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"offset\":0,\"length\":{},\"eof\":true,\"data\":\"{}\"}}}}\n",
            data.len(),
            base64_simd::STANDARD.encode_to_string(data)
        )
        .into_bytes()
    }

    fn payload(r: &Response) -> &Result<Vec<u8>, String> {
        match r {
            Response::Bulk(b) => &b.payload,
            other => panic!("not a bulk answer: {other:?}"),
        }
    }

    #[test]
    fn payloads_decode_whatever_the_read_sizes() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let mut input = Vec::new();
        for n in [0, 1, 2, 3, 4, 5, 1000, 99_999, 100_000] {
            input.extend_from_slice(&bulk_line(n as u64, &data[..n]));
        }
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":99,\"result\":{}}\n");
        for step in [1, 2, 3, 5, 7, 64, 4096, 65_536, input.len()] {
            let got = decode_all(&input, step);
            assert_eq!(got.len(), 10, "step {step}");
            for (r, n) in got.iter().zip([0, 1, 2, 3, 4, 5, 1000, 99_999, 100_000]) {
                assert_eq!(
                    payload(r).as_deref(),
                    Ok(&data[..n]),
                    "step {step}, {n} bytes"
                );
            }
            assert_eq!(
                got[9],
                Response::Line(BytesMut::from(
                    &b"{\"jsonrpc\":\"2.0\",\"id\":99,\"result\":{}}"[..]
                ))
            );
        }
    }

    #[test]
    fn the_line_without_its_payload_keeps_every_other_member() {
        let line = b"{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"offset\":4,\"data\":\"YWJj\",\"eof\":false}}\r\n";
        let got = decode_all(line, 3);
        let [Response::Bulk(b)] = &got[..] else {
            panic!("{got:?}");
        };
        assert_eq!(b.id, 7);
        assert_eq!(b.payload.as_deref(), Ok(&b"abc"[..]));
        assert_eq!(
            b.line_with("\"slot\":7"),
            b"{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"offset\":4,\"data\":\"\",\"slot\":7,\"eof\":false}}"
        );
    }

    #[test]
    fn bad_payloads_are_errors_never_data() {
        let head =
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"length\":3,\"eof\":true,\"data\":\"";
        for (body, why) in [
            ("YW*j\"}}\n", "invalid base64"),
            ("YQ==YWJj\"}}\n", "base64"),
            ("YWJ\"}}\n", "whole number"),
            ("YW\\u0041\"}}\n", "invalid base64"),
            ("YWJj\n", "ends inside"),
        ] {
            let line = format!("{head}{body}{{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":1}}\n");
            for step in [1, 4, 1000] {
                let got = decode_all(line.as_bytes(), step);
                assert_eq!(got.len(), 2, "{body} step {step}: {got:?}");
                let err = payload(&got[0]).as_ref().expect_err(body);
                assert!(err.contains(why), "{body}: {err}");
                assert!(matches!(&got[1], Response::Line(_)), "{body}");
            }
        }
    }

    #[test]
    fn only_result_members_of_wanted_ids_are_bulk() {
        let lines: [&[u8]; 4] = [
            // an error whose data is a string
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":1,\"message\":\"m\",\"data\":\"YWJj\"}}\n",
            // data one level deeper
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"x\":{\"data\":\"YWJj\"}}}\n",
            // the key inside a string
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"m\":\"\\\"data\\\":\\\"YWJj\"}}\n",
            // no id before the payload
            b"{\"jsonrpc\":\"2.0\",\"result\":{\"data\":\"YWJj\"},\"id\":1}\n",
        ];
        for line in lines {
            let got = decode_all(line, 5);
            let want = &line[..line.len() - 1];
            assert_eq!(got, vec![Response::Line(BytesMut::from(want))]);
        }
        // A bulk-shaped answer for an id nobody waits for is a plain line.
        let line = bulk_line(5, b"abc");
        let mut dec = ResponseDecoder::new(MAX);
        let mut buf = BytesMut::from(&line[..]);
        let got = dec.decode(&mut buf, &|id| id != 5);
        assert_eq!(
            got,
            Some(Response::Line(BytesMut::from(&line[..line.len() - 1])))
        );
    }

    fn raw_answer(id: u64, data: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"offset\":0,\"length\":{},\"eof\":false,\"encoding\":\"raw\"}}}}\n",
            data.len()
        )
        .into_bytes();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn raw_payloads_follow_their_line_whatever_bytes_they_hold() {
        // newlines, quotes, a whole answer line and invalid UTF-8 as data
        let mut data = b"\n\"x\"\n".to_vec();
        data.extend_from_slice(&bulk_line(9, b"not an answer"));
        data.extend((0..5000u32).map(|i| (i * 7 % 256) as u8));
        let mut input = Vec::new();
        for n in [0, 1, 4, 200, data.len()] {
            input.extend_from_slice(&raw_answer(n as u64, &data[..n]));
        }
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":99,\"result\":{}}\n");
        for step in [1, 2, 7, 100, 4096, input.len()] {
            let got = decode_all(&input, step);
            assert_eq!(got.len(), 6, "step {step}: {got:?}");
            for (r, n) in got.iter().zip([0, 1, 4, 200, data.len()]) {
                assert_eq!(
                    payload(r).as_deref(),
                    Ok(&data[..n]),
                    "step {step}, {n} bytes"
                );
            }
            assert!(matches!(&got[5], Response::Line(l) if l.ends_with(b"{}}")));
        }
        let got = decode_all(&raw_answer(3, b"abc"), 2);
        let [Response::Bulk(b)] = &got[..] else {
            panic!("{got:?}");
        };
        assert_eq!(
            b.line_with("\"slot\":3"),
            b"{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"offset\":0,\"length\":3,\"eof\":false,\"encoding\":\"raw\",\"slot\":3}}"
        );
    }

    #[test]
    fn raw_payloads_nobody_asked_for_or_too_long_are_skipped() {
        // answer lines are about 90 bytes, the limit 120, the data 200
        let data: Vec<u8> = b"12\n45\n78\n".repeat(20);
        let mut input = raw_answer(5, &data);
        input.extend_from_slice(&raw_answer(6, &data));
        input.extend_from_slice(&raw_answer(7, b"ok"));
        for step in [1, 3, input.len()] {
            let got = decode_with(&input, step, 120, &|id| id != 5);
            assert_eq!(got.len(), 3, "step {step}: {got:?}");
            // not wanted: the line as it is, its data dropped
            assert!(matches!(&got[0], Response::Line(l) if l.ends_with(b"\"raw\"}}")));
            // 200 bytes over a limit of 120: an error, its data dropped
            let err = payload(&got[1]).as_ref().expect_err("over the limit");
            assert!(err.contains("more than the limit"), "{err}");
            assert_eq!(payload(&got[2]).as_deref(), Ok(&b"ok"[..]));
        }
    }

    #[test]
    fn a_raw_payload_cut_off_by_the_end_of_the_stream_is_an_error() {
        let input = raw_answer(1, b"abcdef");
        let mut dec = ResponseDecoder::new(MAX);
        let mut buf = BytesMut::from(&input[..input.len() - 2]);
        assert_eq!(dec.decode(&mut buf, &|_| true), None);
        dec.end_of_stream(&mut buf);
        let got = dec.decode(&mut buf, &|_| true).expect("an answer");
        let err = payload(&got).as_ref().expect_err("cut off");
        assert_eq!(err, CONNECTION_ENDED);
        assert!(dec.at_start() && buf.is_empty());
    }

    #[test]
    fn raw_payloads_can_be_read_straight_into_their_buffer() {
        let input = raw_answer(1, b"0123456789");
        let line_end = input.iter().position(|&b| b == b'\n').expect("line") + 1;
        let mut dec = ResponseDecoder::new(MAX);
        let mut buf = BytesMut::from(&input[..line_end + 3]);
        assert_eq!(dec.decode(&mut buf, &|_| true), None);
        assert!(buf.is_empty(), "the first data bytes went into the payload");
        let (payload_buf, left) = dec.raw_payload_mut().expect("inside a raw payload");
        assert_eq!(*left, 7);
        payload_buf.extend_from_slice(&input[line_end + 3..]);
        *left = 0;
        let got = dec.decode(&mut buf, &|_| true).expect("the answer");
        assert_eq!(payload(&got).as_deref(), Ok(&b"0123456789"[..]));
        assert!(dec.raw_payload_mut().is_none());
    }

    #[test]
    fn over_long_answers_are_reported_and_skipped() {
        let data = vec![7u8; 3000];
        let mut input = bulk_line(1, &data);
        input.extend_from_slice(&[b'x'; 5000]);
        input.push(b'\n');
        input.extend_from_slice(&bulk_line(2, b"ok"));
        for step in [1, 100, input.len()] {
            let got = decode_with(&input, step, 2000, &|_| true);
            assert_eq!(got.len(), 3, "step {step}");
            assert_eq!(got[0], Response::TooLong);
            assert_eq!(got[1], Response::TooLong);
            assert_eq!(payload(&got[2]).as_deref(), Ok(&b"ok"[..]));
        }
    }

    #[test]
    fn payloads_decode_into_spare_buffers_handed_back() {
        let spares = SpareBuffers::default();
        let mut dec = ResponseDecoder::new(MAX).with_spares(spares.clone());
        let data = vec![5u8; 3000];
        let mut buf = BytesMut::from(&bulk_line(1, &data)[..]);
        let Some(Response::Bulk(first)) = dec.decode(&mut buf, &|_| true) else {
            panic!("no bulk answer");
        };
        let first = first.payload.unwrap();
        assert_eq!(first, data);
        let ptr = first.as_ptr();
        spares.give(first);
        let mut buf = BytesMut::from(&bulk_line(2, b"again")[..]);
        let Some(Response::Bulk(second)) = dec.decode(&mut buf, &|_| true) else {
            panic!("no bulk answer");
        };
        let second = second.payload.unwrap();
        assert_eq!(second, b"again");
        assert_eq!(second.as_ptr(), ptr, "the spare buffer was used");
        // Only so many spares are kept.
        for _ in 0..10 {
            spares.give(Vec::with_capacity(16));
        }
        assert_eq!(spares.lock().len(), MAX_SPARE_BUFFERS);
    }

    #[test]
    fn blank_lines_and_short_lines_pass_as_lines() {
        let got = decode_all(b"\n \r\n{\"a\":1}\r\n{}\n", 1);
        assert_eq!(
            got,
            vec![
                Response::Line(BytesMut::from(&b"{\"a\":1}"[..])),
                Response::Line(BytesMut::from(&b"{}"[..]))
            ]
        );
    }
}
