//! A bounded in-memory byte pipe from a blocking producer thread to an async
//! consumer.
//!
//! The producer writes through [`StreamWriter`] (an `std::io::Write` that
//! blocks while the buffer is full), which gathers bytes into blocks of its
//! own and hands each full block over whole; the consumer takes blocks (or
//! the front of one) as shared [`Bytes`], so bytes are copied once on their
//! way through, into the block. A file's data can be read straight into the
//! block ([`StreamWriter::write_from`]). A block the consumer is done with
//! goes back to the producer to be filled again: a new one would have to be
//! zeroed before a read may fill it (a memset of every byte streamed). The producer ends the stream through a
//! [`StreamCloser`]: `finish` for a complete stream, `fail` for an error. If
//! every producer handle is dropped without either (an early return, a
//! panic), the consumer gets an error, so a broken producer can never look
//! like a complete, short stream. Dropping the [`StreamReader`] makes the
//! producer's next write fail with `BrokenPipe`, so it stops. This module
//! knows nothing about archives or what the bytes mean.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use bytes::{Buf, Bytes};
use tokio::sync::Notify;

use crate::error::{Error, ErrorKind};

/// Bytes the producer gathers before handing them to the consumer (the
/// stream's capacity, if smaller, caps it).
const BLOCK: usize = 256 << 10;

/// Most blocks a stream keeps for reuse once the consumer is done with
/// them; more are freed.
const SPARE_BLOCKS: usize = 2;

/// Creates a stream buffering at most `capacity` bytes (at least 1): the
/// blocks handed over and not read yet, plus the block being filled.
pub fn byte_stream(capacity: usize) -> (StreamWriter, StreamReader) {
    let capacity = capacity.max(1);
    let block = BLOCK.min(capacity.div_ceil(2));
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: VecDeque::new(),
            len: 0,
            capacity: capacity - block,
            end: End::Open,
            producers: 1,
            reader_gone: false,
        }),
        space: Condvar::new(),
        data: Notify::new(),
    });
    (
        StreamWriter {
            shared: shared.clone(),
            block: Vec::new(),
            filled: 0,
            block_size: block,
            spare: Arc::default(),
        },
        StreamReader { shared },
    )
}

struct Shared {
    state: Mutex<State>,
    /// Signalled to the producer when the consumer took data or went away.
    space: Condvar,
    /// Signalled to the consumer when data arrived or the stream ended.
    data: Notify,
}

struct State {
    /// Blocks handed over and not read yet (the first maybe partly read).
    buf: VecDeque<Bytes>,
    /// Bytes in `buf`.
    len: usize,
    /// Most bytes `buf` holds, beyond one block that may always go in.
    capacity: usize,
    end: End,
    /// Live producer handles (writer and closers); when the last one goes
    /// while the stream is still open, the stream fails.
    producers: usize,
    reader_gone: bool,
}

enum End {
    Open,
    Finished,
    /// Reported to every read once the bytes handed over before the
    /// failure are read (they are whole archive members, up to the one
    /// that failed): with several reads in flight, the one that happens to
    /// look first is not always the one whose answer the client shows.
    Failed(Error),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` inconsistent
        // (every update is a single assignment or a buffer operation), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end(&self, end: End) {
        let mut st = self.lock();
        if matches!(st.end, End::Open) {
            st.end = end;
        }
        drop(st);
        self.data.notify_one();
        self.space.notify_all();
    }

    fn release_producer(&self) {
        let mut st = self.lock();
        st.producers = st.producers.saturating_sub(1);
        let last = st.producers == 0;
        drop(st);
        if last {
            self.end(End::Failed(Error::new(
                ErrorKind::Io,
                "the archive producer stopped before finishing the stream",
            )));
        }
    }
}

/// The producer's end: a blocking `Write`.
pub struct StreamWriter {
    shared: Arc<Shared>,
    /// The block being filled (`block_size` bytes, all initialised, or
    /// empty until the first write), handed over when it is full and more
    /// bytes come, or on `flush`.
    block: Vec<u8>,
    /// Bytes of `block` written so far.
    filled: usize,
    block_size: usize,
    /// Blocks the consumer is done with (see [`Block`]).
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// A handed-over block as the consumer holds it (through [`Bytes`]): when
/// its last reference goes, its buffer returns to the writer's spares, if
/// the writer is still there and keeps fewer than [`SPARE_BLOCKS`].
struct Block {
    buf: Vec<u8>,
    len: usize,
    spare: Weak<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Block {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(spare) = self.spare.upgrade() {
            let mut spare = spare.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < SPARE_BLOCKS {
                spare.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

impl StreamWriter {
    /// A handle that ends the stream; keep it outside whatever consumes the
    /// writer (e.g. an archive writer) to finish or fail the stream after.
    pub fn closer(&self) -> StreamCloser {
        self.shared.lock().producers += 1;
        StreamCloser {
            shared: self.shared.clone(),
        }
    }

    /// The room left in the block being filled, handing the block over
    /// first when it is full (waiting while the stream is full).
    fn room(&mut self) -> io::Result<&mut [u8]> {
        if self.filled >= self.block_size {
            self.hand_over()?;
        }
        if self.block.is_empty() {
            let reused = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
            self.block = reused.unwrap_or_else(|| vec![0; self.block_size]);
        }
        Ok(self.block.get_mut(self.filled..).unwrap_or_default())
    }

    /// Reads up to `max` bytes of `src` straight into the stream (no buffer
    /// in between) and passes them to `seen`; returns how many (0: `src`
    /// ended, or `max` was 0). Blocks while the stream is full.
    pub fn write_from(
        &mut self,
        src: &mut dyn Read,
        max: usize,
        seen: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let room = self.room()?;
        let want = max.min(room.len());
        let room = room.get_mut(..want).unwrap_or_default();
        let n = src.read(room)?.min(want);
        seen(room.get(..n).unwrap_or_default());
        self.filled += n;
        Ok(n)
    }

    /// Hands the block being filled to the consumer, waiting while the
    /// stream is full.
    fn hand_over(&mut self) -> io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let mut st = self.shared.lock();
        loop {
            if st.reader_gone {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the stream's reader was closed",
                ));
            }
            if !matches!(st.end, End::Open) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the stream was already ended",
                ));
            }
            if st.len == 0 || st.len + self.filled <= st.capacity {
                let len = std::mem::take(&mut self.filled);
                let block = if len < self.block_size / 4 {
                    // a flush of a few bytes: a copy of them, so that the
                    // stream never holds many mostly empty blocks
                    Bytes::copy_from_slice(self.block.get(..len).unwrap_or_default())
                } else {
                    Bytes::from_owner(Block {
                        buf: std::mem::take(&mut self.block),
                        len,
                        spare: Arc::downgrade(&self.spare),
                    })
                };
                st.len += block.len();
                st.buf.push_back(block);
                drop(st);
                self.shared.data.notify_one();
                return Ok(());
            }
            st = self
                .shared
                .space
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Write for StreamWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let room = self.room()?;
            let n = rest.len().min(room.len());
            let (now, later) = rest.split_at(n);
            if let Some(dst) = room.get_mut(..n) {
                dst.copy_from_slice(now);
            }
            self.filled += n;
            rest = later;
        }
        Ok(data.len())
    }

    /// Hands over what is gathered so far.
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        // Whatever was written reaches the consumer even if nobody flushed;
        // the stream is complete only when a closer says so.
        let _ = self.hand_over();
        self.shared.release_producer();
    }
}

/// Ends the stream: completely (`finish`) or with an error (`fail`).
pub struct StreamCloser {
    shared: Arc<Shared>,
}

impl StreamCloser {
    /// Marks the stream complete: the consumer reads what is buffered, then
    /// end of stream.
    pub fn finish(self) {
        self.shared.end(End::Finished);
    }

    /// Fails the stream: the consumer reads what was handed over before,
    /// then `err`, from every read. An [`Error`] inside `err` is kept as
    /// it is, so its code (and the member it names) reaches the client.
    pub fn fail(self, err: io::Error) {
        let err = match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
            Some(app) => app.clone(),
            None => Error::new(ErrorKind::Io, format!("stream failed: {err}")),
        };
        self.shared.end(End::Failed(err));
    }
}

impl Drop for StreamCloser {
    fn drop(&mut self) {
        self.shared.release_producer();
    }
}

/// The consumer's end.
pub struct StreamReader {
    shared: Arc<Shared>,
}

impl StreamReader {
    /// Whether reading goes no further: the archive is complete and all of
    /// it was read, or the producer failed.
    pub fn ended(&self) -> bool {
        let st = self.shared.lock();
        match st.end {
            End::Open => false,
            End::Finished | End::Failed(_) => st.buf.is_empty(),
        }
    }

    /// Waits until data is buffered, the stream finished, or it failed; then
    /// returns up to `max` bytes and whether the stream is complete after
    /// them (`true` comes with the last data when possible). A failed stream
    /// returns what it buffered before the failure, then its error, to
    /// every read.
    pub async fn read(&mut self, max: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut pieces = Vec::new();
        let (n, eof) = self.read_pieces(&mut pieces, max).await?;
        let mut out = Vec::with_capacity(n);
        for piece in &pieces {
            out.extend_from_slice(piece);
        }
        Ok((out, eof))
    }

    /// [`read`](Self::read), appending the bytes to `out` as the blocks the
    /// producer filled (without copying them); returns how many bytes and
    /// whether the stream is complete after them.
    pub async fn read_pieces(
        &mut self,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> io::Result<(usize, bool)> {
        loop {
            {
                let mut st = self.shared.lock();
                if let End::Failed(err) = &st.end {
                    if st.buf.is_empty() {
                        return Err(io::Error::other(err.clone()));
                    }
                }
                let finished = matches!(st.end, End::Finished);
                if !st.buf.is_empty() || finished || max == 0 {
                    let mut taken = 0;
                    while taken < max {
                        let Some(front) = st.buf.front_mut() else {
                            break;
                        };
                        let want = max - taken;
                        let piece = if front.len() <= want {
                            st.buf.pop_front().unwrap_or_default()
                        } else {
                            let piece = front.slice(..want);
                            front.advance(want);
                            piece
                        };
                        taken += piece.len();
                        out.push(piece);
                    }
                    st.len -= taken;
                    let eof = finished && st.buf.is_empty();
                    drop(st);
                    self.shared.space.notify_all();
                    return Ok((taken, eof));
                }
            }
            // A notification sent between the check above and this await is
            // kept as a permit by `notify_one`, so no wakeup is lost.
            self.shared.data.notified().await;
        }
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.shared.lock().reader_gone = true;
        self.shared.space.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn bytes_arrive_in_order_and_end_with_eof() {
        let (mut w, mut r) = byte_stream(7);
        let closer = w.closer();
        let producer = std::thread::spawn(move || {
            for i in 0..1000u32 {
                w.write_all(&i.to_le_bytes()).unwrap();
            }
            drop(w);
            closer.finish();
        });
        let got = runtime().block_on(async {
            let mut got = Vec::new();
            loop {
                let (data, eof) = r.read(5).await.unwrap();
                assert!(data.len() <= 5);
                got.extend(data);
                if eof {
                    break;
                }
            }
            got
        });
        producer.join().unwrap();
        let want: Vec<u8> = (0..1000u32).flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_writer_waits_while_the_stream_holds_its_capacity() {
        let (mut w, mut r) = byte_stream(64);
        let closer = w.closer();
        w.write_all(&[7u8; 64]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let producer = std::thread::spawn(move || {
            w.write_all(&[8u8; 40]).unwrap();
            tx.send(()).unwrap();
            w.flush().unwrap();
            drop(w);
            closer.finish();
        });
        // 64 bytes held: the next block cannot go in until some are read.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        let rt = runtime();
        let mut got = Vec::new();
        loop {
            let (data, eof) = rt.block_on(r.read(100)).unwrap();
            got.extend(data);
            if eof {
                break;
            }
        }
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        producer.join().unwrap();
        let mut want = vec![7u8; 64];
        want.extend([8u8; 40]);
        assert_eq!(got, want);
    }

    #[test]
    fn blocks_the_consumer_is_done_with_are_filled_again() {
        // capacity 1 MiB: blocks of 256 KiB
        let (mut w, mut r) = byte_stream(1 << 20);
        let rt = runtime();
        let block = 256 << 10;
        let mut first = Vec::new();
        w.write_all(&vec![1u8; block]).unwrap();
        w.write_all(&[2u8]).unwrap(); // hands the first block over
        rt.block_on(r.read_pieces(&mut first, block)).unwrap();
        assert_eq!(first.len(), 1, "one block");
        let (at, len) = (first[0].as_ptr(), first[0].len());
        assert!(len == block && first[0].iter().all(|&b| b == 1));
        // a slice of it still held: not free yet
        let kept = first[0].slice(10..20);
        drop(first);
        w.write_all(&vec![3u8; block]).unwrap(); // hands the second over
        let mut second = Vec::new();
        rt.block_on(r.read_pieces(&mut second, block)).unwrap();
        assert!(
            second[0].as_ptr() != at,
            "a block still referenced was reused"
        );
        assert!(kept.iter().all(|&b| b == 1), "the held slice changed");
        drop(kept);
        // now free: the block begun next (the fourth) fills the first
        // one's buffer again
        w.write_all(&vec![4u8; 2 * block]).unwrap(); // hands 3 and 4 over
        let mut more = Vec::new();
        rt.block_on(r.read_pieces(&mut more, 2 * block)).unwrap();
        assert_eq!(more.len(), 2, "two blocks");
        assert!(more[0].as_ptr() != at, "the third block");
        assert_eq!(more[1].as_ptr(), at, "the free block was not reused");
        let mut want = vec![2u8];
        want.extend(vec![3u8; block - 1]);
        assert!(second[0][..] == want[..], "second block");
        let mut want = vec![3u8];
        want.extend(vec![4u8; block - 1]);
        assert!(more[0][..] == want[..], "third block");
        assert!(more[1].iter().all(|&b| b == 4), "fourth block");
    }

    #[test]
    fn data_read_straight_into_the_stream_arrives_whole_and_is_seen() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut w, mut r) = byte_stream(100_000);
        let closer = w.closer();
        let source = data.clone();
        let producer = std::thread::spawn(move || {
            let mut src = &source[..];
            let mut seen = 0usize;
            w.write_all(b"head").unwrap();
            loop {
                let n = w
                    .write_from(&mut src, 77_777, &mut |b| seen += b.len())
                    .unwrap();
                if n == 0 {
                    break;
                }
            }
            drop(w);
            closer.finish();
            seen
        });
        let got = runtime().block_on(async {
            let mut got = Vec::new();
            loop {
                let mut pieces = Vec::new();
                let (n, eof) = r.read_pieces(&mut pieces, 300_000).await.unwrap();
                assert!(n <= 300_000);
                assert_eq!(n, pieces.iter().map(|p| p.len()).sum::<usize>());
                for p in pieces {
                    got.extend_from_slice(&p);
                }
                if eof {
                    return got;
                }
            }
        });
        assert_eq!(producer.join().unwrap(), data.len());
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..], &data[..]);
    }

    #[test]
    fn bytes_written_without_a_flush_still_arrive() {
        let (mut w, mut r) = byte_stream(1 << 20);
        let closer = w.closer();
        w.write_all(b"not flushed").unwrap();
        drop(w);
        closer.finish();
        let got = runtime().block_on(r.read(100)).unwrap();
        assert_eq!(got, (b"not flushed".to_vec(), true));
    }

    #[test]
    fn dropping_the_reader_breaks_the_writer() {
        let (mut w, r) = byte_stream(4);
        w.write_all(b"1234").unwrap();
        let producer = std::thread::spawn(move || w.write_all(b"5678"));
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(r);
        let err = producer.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_failure_reaches_the_reader_as_an_error() {
        let (mut w, mut r) = byte_stream(64);
        let closer = w.closer();
        w.write_all(b"partial").unwrap();
        closer.fail(io::Error::other("disk block unreadable"));
        let rt = runtime();
        // every read gets the error (several may be in flight)
        for _ in 0..2 {
            let err = rt.block_on(r.read(100)).unwrap_err();
            assert!(err.to_string().contains("disk block unreadable"), "{err}");
        }
        // what was handed over before the failure comes first
        let (mut w, mut r) = byte_stream(64);
        let closer = w.closer();
        w.write_all(b"whole members").unwrap();
        w.flush().unwrap();
        closer.fail(io::Error::other("disk block unreadable"));
        assert!(!r.ended());
        let (data, eof) = rt.block_on(r.read(100)).unwrap();
        assert_eq!((data.as_slice(), eof), (b"whole members".as_slice(), false));
        assert!(r.ended());
        for _ in 0..2 {
            let err = rt.block_on(r.read(100)).unwrap_err();
            assert!(err.to_string().contains("disk block unreadable"), "{err}");
        }
        // an application error inside keeps its kind
        let (w, mut r) = byte_stream(64);
        let corrupt = Error::corrupt("/f: file data ends at 4096 of 9999 bytes");
        w.closer().fail(io::Error::other(corrupt.clone()));
        for _ in 0..2 {
            let err = rt.block_on(r.read(100)).unwrap_err();
            let inner = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
            assert_eq!(inner, Some(&corrupt), "{err}");
        }
    }

    #[test]
    fn a_producer_gone_without_finishing_is_an_error() {
        let (w, mut r) = byte_stream(64);
        let closer = w.closer();
        drop(w);
        drop(closer);
        let err = runtime().block_on(r.read(100)).unwrap_err();
        assert!(err.to_string().contains("before finishing"), "{err}");
    }

    #[test]
    fn finish_with_data_buffered_delivers_it_then_eof() {
        let (mut w, mut r) = byte_stream(64);
        let closer = w.closer();
        w.write_all(b"abcdef").unwrap();
        drop(w);
        closer.finish();
        let rt = runtime();
        assert_eq!(rt.block_on(r.read(4)).unwrap(), (b"abcd".to_vec(), false));
        assert_eq!(rt.block_on(r.read(4)).unwrap(), (b"ef".to_vec(), true));
        assert_eq!(rt.block_on(r.read(4)).unwrap(), (Vec::new(), true));
    }
}
