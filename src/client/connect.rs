//! Opening a byte stream to an agent for each kind of connect address.
//!
//! Only `hybrid:` retries (the guest may not be listening yet when the VMM's
//! socket already accepts); the others fail at once so that "no agent" is
//! reported quickly.

use std::io;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::addr::ConnectAddr;
use super::error::{ClientError, Result};

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// An open byte stream to an agent, and the process behind it for `exec:`.
pub struct Stream {
    pub reader: BoxRead,
    pub writer: BoxWrite,
    pub child: Option<Child>,
}

/// Longest `OK ...` reply line accepted in the hybrid handshake.
const HYBRID_REPLY_MAX: usize = 256;

/// Pause between hybrid connection attempts.
const HYBRID_RETRY: Duration = Duration::from_millis(100);

pub async fn open(addr: &ConnectAddr, timeout: Duration) -> Result<Stream> {
    let deadline = Instant::now() + timeout;
    let fail = |e: io::Error| ClientError::connection(format!("cannot connect to {addr}: {e}"));
    match addr {
        ConnectAddr::Unix(path) => {
            let s = within(deadline, UnixStream::connect(path))
                .await
                .map_err(fail)?;
            Ok(split(s))
        }
        ConnectAddr::Tcp(hostport) => {
            let s = within(deadline, TcpStream::connect(hostport.as_str()))
                .await
                .map_err(fail)?;
            // Small request lines must not wait for Nagle.
            let _ = s.set_nodelay(true);
            Ok(split(s))
        }
        ConnectAddr::Vsock { cid, port } => {
            let addr = tokio_vsock::VsockAddr::new(*cid, *port);
            let s = within(deadline, tokio_vsock::VsockStream::connect(addr))
                .await
                .map_err(fail)?;
            Ok(split(s))
        }
        ConnectAddr::Hybrid { path, port } => loop {
            let err = match within(deadline, hybrid_handshake(path, *port)).await {
                Ok(s) => return Ok(split(s)),
                Err(e) => e,
            };
            if Instant::now() + HYBRID_RETRY >= deadline {
                return Err(fail(err));
            }
            tokio::time::sleep(HYBRID_RETRY).await;
        },
        ConnectAddr::Exec(words) => spawn(words).map_err(|e| {
            ClientError::connection(format!(
                "cannot run `{}`: {e}",
                words.first().map(String::as_str).unwrap_or("")
            ))
        }),
    }
}

/// `fut`, failing with `TimedOut` at `deadline`.
async fn within<T>(
    deadline: Instant,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "timed out (--connect-timeout)",
        )),
    }
}

fn split<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> Stream {
    let (r, w) = tokio::io::split(s);
    Stream {
        reader: Box::new(r),
        writer: Box::new(w),
        child: None,
    }
}

/// `CONNECT PORT\n`, then one reply line that must start with `OK `. The reply
/// is read byte by byte so that nothing after it is consumed here.
async fn hybrid_handshake(path: &std::path::Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(path).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if s.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "hybrid vsock: connection closed before the OK reply",
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= HYBRID_REPLY_MAX {
            return Err(io::Error::other("hybrid vsock: reply line too long"));
        }
        line.push(byte[0]);
    }
    if line.starts_with(b"OK ") {
        Ok(s)
    } else {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "hybrid vsock: refused: {}",
                String::from_utf8_lossy(&line).trim_end()
            ),
        ))
    }
}

fn spawn(words: &[String]) -> io::Result<Stream> {
    let Some((program, args)) = words.split_first() else {
        return Err(io::Error::other("empty command"));
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(io::Error::other("child has no stdin/stdout pipe"));
    };
    Ok(Stream {
        reader: Box::new(stdout),
        writer: Box::new(stdin),
        child: Some(child),
    })
}
