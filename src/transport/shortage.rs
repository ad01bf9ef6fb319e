//! Writes that wait out a momentary shortage of kernel memory.
//!
//! A socket write can fail with `ENOMEM` or `ENOBUFS` when the kernel cannot
//! allocate its buffer for the bytes: Linux 6.1's virtio-vsock copies each
//! packet of up to 64 KiB into one `kmalloc` block, an order-4 allocation
//! that fails, without the OOM killer stepping in, when the memory of a
//! small VM is fragmented. Nothing was sent and the connection is fine; the
//! same write succeeds once the kernel has reclaimed or compacted memory.
//! [`ShortageRetry`] retries such writes with a growing pause, up to a time
//! limit, and passes every other error on at once. It must never retry an
//! error after which the stream is broken, or hide one for longer than the
//! limit.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use tokio::time::Sleep;

/// How long one shortage may last before the write fails after all.
const SHORTAGE_LIMIT: Duration = Duration::from_secs(60);

/// The first pause; each further one doubles, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Whether `e` says the kernel lacked memory for the write, and nothing else.
fn is_shortage(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::ENOBUFS))
}

/// An [`AsyncWrite`] that retries writes failing with [`is_shortage`] errors
/// (see the module documentation). `label` names the stream in the log.
pub struct ShortageRetry<W> {
    inner: W,
    label: String,
    limit: Duration,
    /// The current shortage: when it began, its retries, the pause running.
    shortage: Option<Shortage>,
}

struct Shortage {
    since: Instant,
    retries: u32,
    pause: Pin<Box<Sleep>>,
}

impl<W> ShortageRetry<W> {
    pub fn new(inner: W, label: String) -> Self {
        Self::with_limit(inner, label, SHORTAGE_LIMIT)
    }

    /// With a shortage limit of its own (tests).
    pub fn with_limit(inner: W, label: String, limit: Duration) -> Self {
        ShortageRetry {
            inner,
            label,
            limit,
            shortage: None,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ShortageRetry<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if let Some(s) = &mut this.shortage {
                ready!(s.pause.as_mut().poll(cx));
            }
            match ready!(Pin::new(&mut this.inner).poll_write(cx, buf)) {
                Err(e) if is_shortage(&e) => this.note_shortage(e)?,
                done => {
                    if let Some(s) = this.shortage.take() {
                        log::info!(
                            "{}: the shortage ended after {} retries in {} ms",
                            this.label,
                            s.retries,
                            s.since.elapsed().as_millis()
                        );
                    }
                    return Poll::Ready(done);
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<W> ShortageRetry<W> {
    /// Starts or extends the shortage `e` reports and arms the next pause;
    /// `Err(e)` once the shortage has lasted longer than the limit.
    fn note_shortage(&mut self, e: io::Error) -> io::Result<()> {
        let s = match &mut self.shortage {
            Some(s) => s,
            None => {
                log::warn!(
                    "{}: write failed: {e}; the kernel is short of memory, retrying for up to {} s",
                    self.label,
                    self.limit.as_secs()
                );
                self.shortage.insert(Shortage {
                    since: Instant::now(),
                    retries: 0,
                    pause: Box::pin(tokio::time::sleep(Duration::ZERO)),
                })
            }
        };
        if s.since.elapsed() >= self.limit {
            self.shortage = None;
            return Err(e);
        }
        let pause = FIRST_PAUSE
            .saturating_mul(1 << s.retries.min(16))
            .min(MAX_PAUSE);
        s.retries += 1;
        s.pause.as_mut().reset(tokio::time::Instant::now() + pause);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A sink that fails its first `failures` writes with `errno`, and takes
    /// at most 3 bytes per write after that.
    struct Flaky {
        failures: usize,
        errno: i32,
        got: Vec<u8>,
    }

    impl AsyncWrite for Flaky {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.failures > 0 {
                self.failures -= 1;
                return Poll::Ready(Err(io::Error::from_raw_os_error(self.errno)));
            }
            let n = buf.len().min(3);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn flaky(failures: usize, errno: i32) -> Flaky {
        Flaky {
            failures,
            errno,
            got: Vec::new(),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_shortage_is_waited_out_and_every_byte_arrives_once() {
        runtime().block_on(async {
            for errno in [libc::ENOMEM, libc::ENOBUFS] {
                let mut w = ShortageRetry::new(flaky(6, errno), "test".into());
                w.write_all(b"hello, world").await.expect("written");
                assert_eq!(w.inner.got, b"hello, world");
                assert!(w.shortage.is_none());
            }
        });
    }

    #[test]
    fn a_shortage_longer_than_the_limit_fails_the_write() {
        runtime().block_on(async {
            let limit = Duration::from_millis(50);
            let mut w =
                ShortageRetry::with_limit(flaky(usize::MAX, libc::ENOMEM), "t".into(), limit);
            let started = Instant::now();
            let err = w.write_all(b"x").await.expect_err("fails");
            assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
            assert!(started.elapsed() >= limit);
            assert!(w.inner.got.is_empty());
        });
    }

    #[test]
    fn other_errors_fail_at_once() {
        runtime().block_on(async {
            let mut w = ShortageRetry::new(flaky(1, libc::EPIPE), "t".into());
            let err = w.write_all(b"x").await.expect_err("fails");
            assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
            assert_eq!(w.inner.failures, 0, "tried exactly once");
        });
    }
}
