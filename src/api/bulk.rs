//! Bulk read responses: `{"offset","length","eof","data"}` built straight
//! from chunk buffers, base64-encoded with a SIMD encoder into the one buffer
//! that is written to the socket, and bounded by a memory budget shared by
//! all connections.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::rpc::RawResult;

/// Largest `length` one read may ask for.
pub const MAX_READ: u64 = 16 << 20;

/// Encoded response bytes allowed in flight at once, over all connections:
/// keeps the agent inside a small VM however many reads are pipelined.
const BUDGET_BYTES: usize = 8 << 20;

#[derive(Clone)]
pub struct Budget(Arc<Semaphore>);

impl Default for Budget {
    fn default() -> Self {
        Budget(Arc::new(Semaphore::new(BUDGET_BYTES)))
    }
}

impl Budget {
    /// Waits until `bytes` (capped at the whole budget) are free.
    pub async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(bytes.min(BUDGET_BYTES)).unwrap_or(u32::MAX);
        self.0.clone().acquire_many_owned(n).await.ok()
    }
}

/// Size of the response JSON for `len` data bytes (an upper bound).
pub fn response_size(len: usize) -> usize {
    len.div_ceil(3) * 4 + 96
}

/// Builds the result object of a read from the pieces of data it returns.
pub fn read_result<'a>(
    offset: u64,
    eof: bool,
    pieces: impl Iterator<Item = &'a [u8]> + Clone,
    hold: Option<OwnedSemaphorePermit>,
) -> RawResult {
    let len: usize = pieces.clone().map(<[u8]>::len).sum();
    let mut json = Vec::with_capacity(response_size(len));
    json.extend_from_slice(
        format!("{{\"offset\":{offset},\"length\":{len},\"eof\":{eof},\"data\":\"").as_bytes(),
    );
    encode_pieces(&mut json, pieces);
    json.extend_from_slice(b"\"}");
    let result = RawResult::new(json);
    match hold {
        Some(permit) => result.holding(permit),
        None => result,
    }
}

/// Builds the result object of a `stream.read`.
pub fn stream_result(eof: bool, data: &[u8], hold: Option<OwnedSemaphorePermit>) -> RawResult {
    let mut json = Vec::with_capacity(response_size(data.len()));
    json.extend_from_slice(b"{\"data\":\"");
    encode_pieces(&mut json, std::iter::once(data));
    json.extend_from_slice(format!("\",\"eof\":{eof}}}").as_bytes());
    let result = RawResult::new(json);
    match hold {
        Some(permit) => result.holding(permit),
        None => result,
    }
}

/// Appends the standard padded base64 of the concatenated pieces; a piece's
/// 1 or 2 trailing bytes are carried into the next so output is continuous.
fn encode_pieces<'a>(out: &mut Vec<u8>, pieces: impl Iterator<Item = &'a [u8]>) {
    let b64 = base64_simd::STANDARD;
    let mut carry = [0u8; 3];
    let mut carried = 0;
    for mut piece in pieces {
        if carried > 0 {
            let take = (3 - carried).min(piece.len());
            carry[carried..carried + take].copy_from_slice(&piece[..take]);
            carried += take;
            piece = &piece[take..];
            if carried < 3 {
                continue;
            }
            b64.encode_append(carry, out);
        }
        let whole = piece.len() / 3 * 3;
        b64.encode_append(&piece[..whole], out);
        let rest = &piece[whole..];
        carry[..rest.len()].copy_from_slice(rest);
        carried = rest.len();
    }
    b64.encode_append(&carry[..carried], out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_encode_like_the_whole() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        for cuts in [
            vec![],
            vec![1],
            vec![2, 3],
            vec![1, 2, 4, 999],
            vec![500, 500, 501],
        ] {
            let mut pieces = Vec::new();
            let mut start = 0;
            for &c in &cuts {
                pieces.push(&data[start..c]);
                start = c;
            }
            pieces.push(&data[start..]);
            let mut out = Vec::new();
            encode_pieces(&mut out, pieces.iter().copied());
            assert_eq!(
                out,
                base64_simd::STANDARD.encode_to_string(&data).into_bytes(),
                "{cuts:?}"
            );
        }
    }
}
