//! Counting the bytes a stream's peer has taken.
//!
//! [`Metered`] passes writes through and counts the bytes each one handed
//! to the stream, so that a watcher elsewhere can tell a peer that reads
//! slowly from one that stopped reading ([`Meter::bytes`] stands still). It
//! never changes, delays or fails a write.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// The count of bytes written through a [`Metered`] stream so far.
#[derive(Clone, Debug, Default)]
pub struct Meter(Arc<AtomicU64>);

impl Meter {
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// An [`AsyncWrite`] that counts what `inner` accepted into its [`Meter`].
pub struct Metered<W> {
    inner: W,
    meter: Meter,
}

impl<W> Metered<W> {
    pub fn new(inner: W) -> Self {
        Metered {
            inner,
            meter: Meter::default(),
        }
    }

    pub fn meter(&self) -> Meter {
        self.meter.clone()
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Metered<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let done = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = done {
            this.meter.0.fetch_add(n as u64, Ordering::Relaxed);
        }
        done
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_what_the_peer_was_given_and_stands_still_when_it_stops_reading() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Metered::new(a);
        let meter = w.meter();
        w.write_all(&[7; 1000]).await.unwrap();
        assert_eq!(meter.bytes(), 1000);
        // the pipe holds 1024 bytes: the rest waits for the peer
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(50), w.write_all(&[7; 100]))
                .await;
        assert!(blocked.is_err(), "the write should wait for the peer");
        assert_eq!(meter.bytes(), 1024);
        let mut got = vec![0; 1024];
        b.read_exact(&mut got).await.unwrap();
        w.write_all(&[7; 10]).await.unwrap();
        assert_eq!(meter.bytes(), 1034);
    }
}
