//! Listeners for every transport, yielding byte streams with a printable peer.
//!
//! A Unix socket is created with mode 0600 (the umask is narrowed around
//! `bind`), replaces a stale socket file, refuses to replace a live socket or a
//! file that is not a socket, and is removed when the listener is dropped.

use super::addr::ListenAddr;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_vsock::{VsockAddr, VsockListener};

/// A bidirectional byte stream from any transport.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// An accepted connection.
pub struct Connection {
    pub stream: Box<dyn Stream>,
    /// Who is on the other end, for the log: `vsock 3:1025`, `unix`, `tcp 127.0.0.1:4242`, `stdio`.
    pub peer: String,
}

pub enum Listener {
    Vsock(VsockListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
    /// Serves exactly one connection on stdin/stdout.
    Stdio {
        taken: bool,
    },
}

impl Listener {
    /// Binds `addr`. Must be called inside a tokio runtime.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Vsock { cid, port } => Ok(Listener::Vsock(VsockListener::bind(
                VsockAddr::new(*cid, *port),
            )?)),
            ListenAddr::Unix(path) => bind_unix(path.clone()),
            ListenAddr::Tcp(hostport) => {
                Ok(Listener::Tcp(TcpListener::bind(hostport.as_str()).await?))
            }
            ListenAddr::Stdio => Ok(Listener::Stdio { taken: false }),
        }
    }

    /// The bound address as `--listen` would name it (with the real port or CID).
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Vsock(l) => match l.local_addr() {
                Ok(a) => format!("vsock:{}:{}", a.cid(), a.port()),
                Err(_) => "vsock:?".into(),
            },
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
            Listener::Stdio { .. } => "stdio".into(),
        }
    }

    /// Waits for the next connection. `Ok(None)` means this listener has no
    /// more to give (stdio after its one session).
    pub async fn accept(&mut self) -> io::Result<Option<Connection>> {
        match self {
            Listener::Vsock(l) => {
                let (stream, peer) = l.accept().await?;
                Ok(Some(Connection {
                    stream: Box::new(stream),
                    peer: format!("vsock {}:{}", peer.cid(), peer.port()),
                }))
            }
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred() {
                    Ok(c) => format!("unix pid={} uid={}", c.pid().unwrap_or(0), c.uid()),
                    Err(_) => "unix".into(),
                };
                Ok(Some(Connection {
                    stream: Box::new(stream),
                    peer,
                }))
            }
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Some(Connection {
                    stream: Box::new(stream),
                    peer: format!("tcp {peer}"),
                }))
            }
            Listener::Stdio { taken } if !*taken => {
                *taken = true;
                let stream = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
                Ok(Some(Connection {
                    stream: Box::new(stream),
                    peer: "stdio".into(),
                }))
            }
            Listener::Stdio { .. } => Ok(None),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_unix(path: PathBuf) -> io::Result<Listener> {
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ));
            }
            std::fs::remove_file(&path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: umask only swaps the process file-mode mask; the old mask is
    // restored right after bind, so the socket is created as 0600.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&path);
    unsafe { libc::umask(old) };
    Ok(Listener::Unix {
        listener: bound?,
        path,
    })
}
