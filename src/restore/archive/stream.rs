//! A bounded in-memory byte pipe from a blocking producer thread to an async
//! consumer.
//!
//! The producer writes through [`StreamWriter`] (an `std::io::Write` that
//! blocks while the buffer is full) and ends the stream through a
//! [`StreamCloser`]: `finish` for a complete stream, `fail` for an error. If
//! every producer handle is dropped without either (an early return, a
//! panic), the consumer gets an error, so a broken producer can never look
//! like a complete, short stream. Dropping the [`StreamReader`] makes the
//! producer's next write fail with `BrokenPipe`, so it stops. This module
//! knows nothing about archives or what the bytes mean.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Creates a stream buffering at most `capacity` bytes (at least 1).
pub fn byte_stream(capacity: usize) -> (StreamWriter, StreamReader) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: VecDeque::new(),
            capacity: capacity.max(1),
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
    buf: VecDeque<u8>,
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
    /// Reported to the consumer once it asks; taken on the first report.
    Failed(Option<io::Error>),
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
            if matches!(end, End::Failed(_)) {
                st.buf = VecDeque::new();
            }
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
            self.end(End::Failed(Some(io::Error::other(
                "the archive producer stopped before finishing the stream",
            ))));
        }
    }
}

/// The producer's end: a blocking `Write`.
pub struct StreamWriter {
    shared: Arc<Shared>,
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
}

impl Write for StreamWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
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
            let room = st.capacity.saturating_sub(st.buf.len());
            if room > 0 {
                let n = room.min(data.len());
                st.buf.extend(data.get(..n).unwrap_or(&[]));
                drop(st);
                self.shared.data.notify_one();
                return Ok(n);
            }
            st = self
                .shared
                .space
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
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

    /// Fails the stream: the consumer's next read returns `err` (buffered data
    /// is dropped: the stream is unusable anyway).
    pub fn fail(self, err: io::Error) {
        self.shared.end(End::Failed(Some(err)));
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
            End::Finished => st.buf.is_empty(),
            End::Failed(_) => true,
        }
    }

    /// Waits until data is buffered, the stream finished, or it failed; then
    /// returns up to `max` bytes and whether the stream is complete after
    /// them (`true` comes with the last data when possible). A failed stream
    /// returns its error (once; later reads report that it failed).
    pub async fn read(&mut self, max: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        let eof = self.read_append(&mut out, max).await?;
        Ok((out, eof))
    }

    /// [`read`](Self::read), appending the bytes to `out`: a caller that
    /// collects several reads into one buffer reserves it once.
    pub async fn read_append(&mut self, out: &mut Vec<u8>, max: usize) -> io::Result<bool> {
        loop {
            {
                let mut st = self.shared.lock();
                if let End::Failed(err) = &mut st.end {
                    return Err(err
                        .take()
                        .unwrap_or_else(|| io::Error::other("the stream failed earlier")));
                }
                let finished = matches!(st.end, End::Finished);
                if !st.buf.is_empty() || finished || max == 0 {
                    let n = max.min(st.buf.len());
                    out.reserve(n);
                    let (a, b) = st.buf.as_slices();
                    let from_a = n.min(a.len());
                    out.extend_from_slice(a.get(..from_a).unwrap_or(&[]));
                    out.extend_from_slice(b.get(..n - from_a).unwrap_or(&[]));
                    st.buf.drain(..n);
                    let eof = finished && st.buf.is_empty();
                    drop(st);
                    self.shared.space.notify_all();
                    return Ok(eof);
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
        let err = rt.block_on(r.read(100)).unwrap_err();
        assert!(err.to_string().contains("disk block unreadable"), "{err}");
        assert!(rt.block_on(r.read(100)).is_err());
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
