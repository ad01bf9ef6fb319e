//! Bulk read responses: `{"offset","length","eof","data"}` made of the
//! pieces of data they return (ranges of the pool's chunk buffers, runs of
//! zeros), base64-encoded (`crate::base64`) part by part while the
//! connection writes them, so a response never sits in memory whole; or,
//! for a client that asked for `"encoding": "raw"`, `{"offset","length",
//! "eof","encoding":"raw"}` with the pieces sent as they are right after the
//! line. And the memory budget that bounds the data responses hold until
//! they are written: shared by all connections, each of which may hold no
//! more than its share of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::ConnectionId;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::pool::ChunkSlice;
use crate::rpc::{self, raw_in_batch, BodySource, Call, RawResult, Trailer};

/// How a read's data travels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// base64 in the answer's `data` member: plain JSON, what a person at
    /// `socat` can read.
    #[default]
    Base64,
    /// the bytes themselves, `length` of them right after the answer's
    /// newline: a quarter fewer bytes and no encoding on either side, for
    /// clients that frame the data themselves.
    Raw,
}

/// Largest `length` one read may ask for.
pub const MAX_READ: u64 = 16 << 20;

/// Data bytes that responses not yet written may hold, over all
/// connections: keeps the agent inside a small VM however many reads are
/// pipelined.
const BUDGET_BYTES: usize = 12 << 20;

/// What one connection's unwritten responses may hold of [`BUDGET_BYTES`]:
/// two 4 MiB reads in flight, and a client that stops reading (a paused
/// `restore-client cat | less`) leaves the rest to the others.
const CONNECTION_BYTES: usize = 8 << 20;

/// Input bytes encoded per written part (a multiple of 3): 256 KiB of base64.
const PART_INPUT: usize = 192 << 10;

/// Refuses data after the answer line inside a batch, before the read does
/// anything (see [`Call`]).
pub fn refuse_raw_in_batch(call: Call, encoding: Encoding) -> Result<(), ErrorObjectOwned> {
    if call.in_batch && encoding == Encoding::Raw {
        return Err(raw_in_batch());
    }
    Ok(())
}

/// The memory budget of unwritten data responses: the whole of it, and
/// each connection's share.
#[derive(Clone)]
pub struct Budget {
    all: Arc<Semaphore>,
    shares: Arc<Mutex<HashMap<usize, Arc<Semaphore>>>>,
    /// Reads waiting for room in the whole budget (not in their own
    /// connection's share): while there are any, a client that stopped
    /// reading is cut off (see `rpc::Hold`).
    waiting: Arc<AtomicUsize>,
}

/// What a response holds of the budget until it is written.
pub struct Hold {
    _share: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
    waiting: Arc<AtomicUsize>,
}

impl rpc::Hold for Hold {
    fn wanted(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }
}

/// Counts a read as waiting for the whole budget while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            all: Arc::new(Semaphore::new(BUDGET_BYTES)),
            shares: Arc::default(),
            waiting: Arc::default(),
        }
    }
}

impl Budget {
    /// Waits until `bytes` (capped at a connection's share) are free in
    /// the share of `conn` and then in the whole budget; the share first,
    /// so that a connection's queued reads wait on it alone.
    pub async fn reserve(&self, conn: ConnectionId, bytes: usize) -> Option<Hold> {
        let n = u32::try_from(bytes.min(CONNECTION_BYTES)).unwrap_or(u32::MAX);
        let share = {
            let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
            shares
                .entry(conn.0)
                .or_insert_with(|| Arc::new(Semaphore::new(CONNECTION_BYTES)))
                .clone()
        };
        let share = share.acquire_many_owned(n).await.ok()?;
        let all = match self.all.clone().try_acquire_many_owned(n) {
            Ok(all) => all,
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {
                let _waiting = Waiting::new(&self.waiting);
                self.all.clone().acquire_many_owned(n).await.ok()?
            }
        };
        Some(Hold {
            _share: share,
            _all: all,
            waiting: self.waiting.clone(),
        })
    }

    /// Forgets the share of a closed connection (its responses still hold
    /// theirs until they are dropped).
    pub fn connection_closed(&self, conn: ConnectionId) {
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        shares.remove(&conn.0);
    }
}

/// Zero bytes that [`Piece::Zeros`] point into.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A piece of the data a read returns.
pub enum Piece {
    /// a range of a chunk buffer of the pool
    Chunk(ChunkSlice),
    /// this many zero bytes, at most 64 KiB (see [`push_zeros`])
    Zeros(usize),
    /// bytes of its own: a filesystem's read where it cannot say where
    /// the bytes lie, or copies of chunk slices past the pinning limit
    Owned(Vec<u8>),
    /// a block of an archive stream's output
    Stream(Bytes),
}

impl Piece {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Chunk(c) => c.as_slice(),
            Piece::Zeros(n) => &ZEROS[..(*n).min(ZEROS.len())],
            Piece::Owned(v) => v,
            Piece::Stream(b) => b,
        }
    }
}

/// Most distinct chunk buffers the pieces of one response keep alive. A
/// badly fragmented file can have its next extent in a new chunk every few
/// KiB; holding every one of them until the response is written would pin
/// far more memory than the cache is allowed (a 16 MiB read of 4 KiB
/// extents could pin 4096 chunks of 4 MiB). Slices of further chunks are
/// copied instead, so a response holds at most this many chunks plus its
/// own length.
const MAX_PINNED_CHUNKS: usize = 4;

/// The pieces of one response as they are gathered, referencing at most
/// [`MAX_PINNED_CHUNKS`] chunk buffers.
#[derive(Default)]
pub struct PieceList {
    pieces: Vec<Piece>,
    /// The chunk buffers referenced so far, by address.
    pinned: Vec<usize>,
}

impl PieceList {
    /// Appends a slice: by reference while few chunks are pinned, else as
    /// a copy (merged into the previous copy when there is one).
    pub fn push_slice(&mut self, slice: ChunkSlice) {
        let id = Arc::as_ptr(&slice.chunk) as usize;
        let known = self.pinned.contains(&id);
        if known || self.pinned.len() < MAX_PINNED_CHUNKS {
            if !known {
                self.pinned.push(id);
            }
            self.pieces.push(Piece::Chunk(slice));
            return;
        }
        match self.pieces.last_mut() {
            Some(Piece::Owned(v)) => v.extend_from_slice(slice.as_slice()),
            _ => self.pieces.push(Piece::Owned(slice.as_slice().to_vec())),
        }
    }

    /// Appends `len` zero bytes.
    pub fn push_zeros(&mut self, len: u64) {
        push_zeros(&mut self.pieces, len);
    }

    pub fn into_pieces(self) -> Vec<Piece> {
        self.pieces
    }
}

/// Appends `len` zero bytes as pieces.
pub fn push_zeros(pieces: &mut Vec<Piece>, len: u64) {
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        pieces.push(Piece::Zeros(n as usize));
        left -= n;
    }
}

/// The result object of a read of `pieces` at `offset`.
pub fn read_result(
    offset: u64,
    eof: bool,
    pieces: Vec<Piece>,
    hold: Option<Hold>,
    encoding: Encoding,
) -> RawResult {
    if encoding == Encoding::Raw {
        return raw(offset, eof, pieces, hold);
    }
    let len = data_len(&pieces);
    let head = format!("{{\"offset\":{offset},\"length\":{len},\"eof\":{eof},\"data\":\"");
    streamed(head.into_bytes(), pieces, b"\"}".to_vec(), hold)
}

/// The result object of a `stream.read` of `data` at stream `offset`.
pub fn stream_result(
    offset: u64,
    eof: bool,
    data: Vec<Bytes>,
    hold: Option<Hold>,
    encoding: Encoding,
) -> RawResult {
    let pieces: Vec<Piece> = data.into_iter().map(Piece::Stream).collect();
    if encoding == Encoding::Raw {
        return raw(offset, eof, pieces, hold);
    }
    let tail = format!("\",\"eof\":{eof}}}");
    streamed(
        format!("{{\"offset\":{offset},\"data\":\"").into_bytes(),
        pieces,
        tail.into_bytes(),
        hold,
    )
}

fn data_len(pieces: &[Piece]) -> usize {
    pieces.iter().map(|p| p.as_slice().len()).sum()
}

/// The raw answer to a read of `pieces` at `offset` (of a file, an image or
/// a stream alike): its line says how many bytes follow, the pieces follow
/// as they are.
fn raw(offset: u64, eof: bool, pieces: Vec<Piece>, hold: Option<Hold>) -> RawResult {
    let len = data_len(&pieces);
    let json =
        format!("{{\"offset\":{offset},\"length\":{len},\"eof\":{eof},\"encoding\":\"raw\"}}");
    let result =
        RawResult::new(json.into_bytes()).with_trailer(Box::new(RawPieces { pieces, index: 0 }));
    match hold {
        Some(permit) => result.holding(permit),
        None => result,
    }
}

/// The pieces of a raw answer, one after the other.
struct RawPieces {
    pieces: Vec<Piece>,
    index: usize,
}

impl Trailer for RawPieces {
    fn next_bytes(&mut self) -> Option<&[u8]> {
        let piece = self.pieces.get(self.index)?;
        self.index += 1;
        Some(piece.as_slice())
    }
}

fn streamed(head: Vec<u8>, pieces: Vec<Piece>, tail: Vec<u8>, hold: Option<Hold>) -> RawResult {
    let result = RawResult::streamed(Box::new(Encoder {
        head: Some(head),
        pieces,
        index: 0,
        pos: 0,
        carry: [0; 3],
        carried: 0,
        tail: Some(tail),
    }));
    match hold {
        Some(permit) => result.holding(permit),
        None => result,
    }
}

/// `head`, the standard padded base64 of the concatenated pieces, `tail`,
/// produced a part at a time. A piece's 1 or 2 trailing bytes are carried
/// into the next so that the output is one continuous encoding.
struct Encoder {
    head: Option<Vec<u8>>,
    pieces: Vec<Piece>,
    /// next input byte: `pieces[index].as_slice()[pos]`
    index: usize,
    pos: usize,
    carry: [u8; 3],
    carried: usize,
    tail: Option<Vec<u8>>,
}

impl BodySource for Encoder {
    fn next_part(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(tail) = self.tail.as_ref() else {
            return false;
        };
        if let Some(head) = self.head.take() {
            out.extend_from_slice(&head);
        }
        let mut room = PART_INPUT;
        while room >= 3 {
            let Some(piece) = self.pieces.get(self.index) else {
                break;
            };
            let data = piece.as_slice();
            let rest = data.get(self.pos..).unwrap_or_default();
            if self.carried > 0 {
                let take = (3 - self.carried).min(rest.len());
                self.carry[self.carried..self.carried + take].copy_from_slice(&rest[..take]);
                self.carried += take;
                self.pos += take;
                if self.carried == 3 {
                    crate::base64::encode_append(&self.carry, out);
                    self.carried = 0;
                    room -= 3;
                }
            } else {
                let whole = rest.len().min(room) / 3 * 3;
                crate::base64::encode_append(&rest[..whole], out);
                self.pos += whole;
                room -= whole;
                let left = &rest[whole..];
                if left.len() < 3 {
                    self.carry[..left.len()].copy_from_slice(left);
                    self.carried = left.len();
                    self.pos += left.len();
                }
            }
            if self.pos >= data.len() {
                self.index += 1;
                self.pos = 0;
            }
        }
        if self.index < self.pieces.len() {
            return true;
        }
        crate::base64::encode_append(&self.carry[..self.carried], out);
        self.carried = 0;
        out.extend_from_slice(tail);
        self.tail = None;
        // the data is no longer needed: let it go before the line is sent
        self.pieces = Vec::new();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::ChunkData;
    use crate::rpc::Body;

    fn text(r: RawResult) -> Vec<u8> {
        r.json.into_bytes()
    }

    #[test]
    fn pieces_encode_like_the_whole() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let n = data.len();
        for cuts in [
            vec![],
            vec![1],
            vec![2, 3],
            vec![1, 2, 4, 999],
            vec![500, 500, 501],
            vec![PART_INPUT - 1, PART_INPUT + 1, 2 * PART_INPUT + 2],
            vec![1, n - 1],
        ] {
            let mut pieces = Vec::new();
            let mut start = 0;
            for &c in &cuts {
                pieces.push(Piece::Owned(data[start..c].to_vec()));
                start = c;
            }
            pieces.push(Piece::Owned(data[start..].to_vec()));
            let got = text(read_result(7, true, pieces, None, Encoding::Base64));
            let want = format!(
                "{{\"offset\":7,\"length\":{n},\"eof\":true,\"data\":\"{}\"}}",
                base64_simd::STANDARD.encode_to_string(&data)
            );
            assert!(got == want.as_bytes(), "{cuts:?}");
        }
    }

    #[test]
    fn a_response_pins_few_chunks_and_copies_the_rest() {
        let chunks: Vec<ChunkData> = (0..10u8).map(|i| Arc::new(vec![i; 4096])).collect();
        let mut list = PieceList::default();
        let mut want = Vec::new();
        // two slices of each chunk, like two extents of a fragmented file
        for c in chunks.iter().chain(chunks.iter()) {
            let slice = ChunkSlice {
                chunk: c.clone(),
                range: 100..300,
            };
            want.extend_from_slice(slice.as_slice());
            list.push_slice(slice);
        }
        list.push_zeros(5);
        want.extend_from_slice(&[0; 5]);
        let pieces = list.into_pieces();
        let held = chunks.iter().filter(|c| Arc::strong_count(c) > 1).count();
        assert_eq!(held, MAX_PINNED_CHUNKS, "chunk buffers kept alive");
        let got: Vec<u8> = pieces.iter().flat_map(|p| p.as_slice().to_vec()).collect();
        assert_eq!(got, want);
        let text = text(read_result(0, true, pieces, None, Encoding::Base64));
        let b64 = base64_simd::STANDARD.encode_to_string(&want);
        assert!(text.ends_with(format!("\"data\":\"{b64}\"}}").as_bytes()));
    }

    #[test]
    fn parts_are_bounded_and_the_last_says_so() {
        let mut pieces = Vec::new();
        push_zeros(&mut pieces, 1_000_001);
        assert_eq!(pieces.len(), 16);
        let Body::Parts(mut src) = read_result(0, false, pieces, None, Encoding::Base64).json
        else {
            panic!("a read result is streamed");
        };
        let mut total = 0;
        let mut parts = 0;
        loop {
            let mut out = Vec::new();
            let more = src.next_part(&mut out);
            assert!(
                out.len() <= PART_INPUT / 3 * 4 + 64,
                "part of {}",
                out.len()
            );
            total += out.len();
            parts += 1;
            if !more {
                break;
            }
        }
        assert_eq!(parts, 1_000_001usize.div_ceil(PART_INPUT));
        let mut after = Vec::new();
        assert!(!src.next_part(&mut after) && after.is_empty());
        let frame = r#"{"offset":0,"length":1000001,"eof":false,"data":""}"#.len();
        assert_eq!(total, 1_000_001usize.div_ceil(3) * 4 + frame);
    }

    #[test]
    fn empty_reads_and_stream_results() {
        let got = text(read_result(5, true, Vec::new(), None, Encoding::Base64));
        assert_eq!(got, br#"{"offset":5,"length":0,"eof":true,"data":""}"#);
        let got = text(stream_result(
            9,
            false,
            vec![Bytes::from_static(b"hi!!")],
            None,
            Encoding::Base64,
        ));
        assert_eq!(got, br#"{"offset":9,"data":"aGkhIQ==","eof":false}"#);
    }
}
