//! The server: accept loops over every listener, connection accounting, the
//! idle watchdog and graceful shutdown.

use jsonrpsee::ConnectionId;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::Ticket;
use super::codes::LIMIT_REACHED;
use super::connection;
use super::envelope::{error_line, Id};
use super::router::Router;
use crate::transport::Listener;

/// Limits and timeouts of the protocol, from the command line.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub auth_timeout: Duration,
    pub auth_fail_delay: Duration,
    pub max_connections: usize,
    pub max_request_bytes: usize,
    pub max_batch: usize,
    /// Requests running at once on one connection; beyond it the connection
    /// is not read (backpressure).
    pub max_in_flight: usize,
    /// How long shutdown waits for in-flight requests and pending writes.
    pub shutdown_grace: Duration,
    /// A connection that takes none of a response for this long while
    /// others wait for what the response holds (see `router::Hold`) is
    /// closed; `None`: never.
    pub stall_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            auth_timeout: Duration::from_secs(10),
            auth_fail_delay: Duration::from_millis(500),
            max_connections: 64,
            max_request_bytes: 1 << 20,
            max_batch: 64,
            max_in_flight: 32,
            shutdown_grace: Duration::from_secs(5),
            stall_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Server state that method handlers may read or act on: counters, the idle
/// watchdog, and the shutdown switch.
pub struct Shared {
    started: Instant,
    shutdown: CancellationToken,
    idle_timeout: Option<Duration>,
    /// Milliseconds since `started` of the last watchdog-resetting request.
    last_activity_ms: AtomicU64,
    /// Holds on the watchdog (open streams).
    holds: AtomicUsize,
    connections: AtomicUsize,
    connections_total: AtomicU64,
    requests_served: AtomicU64,
}

/// A snapshot of the server counters, for `status`.
#[derive(serde::Serialize)]
pub struct ServerStats {
    pub uptime_s: f64,
    pub connections: usize,
    pub connections_total: u64,
    pub requests_served: u64,
    pub idle_timeout_s: u64,
    pub idle_remaining_s: Option<f64>,
}

/// Keeps the idle watchdog from firing while it lives.
pub struct WatchdogHold(Arc<Shared>);

impl Drop for WatchdogHold {
    fn drop(&mut self) {
        self.0.touch();
        self.0.holds.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// `idle_timeout` of `None` disables the watchdog.
    pub fn new(idle_timeout: Option<Duration>) -> Arc<Shared> {
        Arc::new(Shared {
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            idle_timeout,
            last_activity_ms: AtomicU64::new(0),
            holds: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            connections_total: AtomicU64::new(0),
            requests_served: AtomicU64::new(0),
        })
    }

    /// Starts a graceful shutdown (idempotent).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub(super) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Resets the idle watchdog.
    pub fn touch(&self) {
        self.last_activity_ms
            .store(self.now_ms(), Ordering::Release);
    }

    pub fn hold_watchdog(self: &Arc<Self>) -> WatchdogHold {
        self.holds.fetch_add(1, Ordering::AcqRel);
        WatchdogHold(self.clone())
    }

    /// Time left before the watchdog fires; `None` when it is off.
    pub fn idle_remaining(&self) -> Option<Duration> {
        let timeout = self.idle_timeout?;
        if self.holds.load(Ordering::Acquire) > 0 {
            return Some(timeout);
        }
        let idle = self
            .now_ms()
            .saturating_sub(self.last_activity_ms.load(Ordering::Acquire));
        Some(timeout.saturating_sub(Duration::from_millis(idle)))
    }

    pub(super) fn count_request(&self) {
        self.requests_served.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats {
            uptime_s: self.started.elapsed().as_secs_f64(),
            connections: self.connections.load(Ordering::Relaxed),
            connections_total: self.connections_total.load(Ordering::Relaxed),
            requests_served: self.requests_served.load(Ordering::Relaxed),
            idle_timeout_s: self.idle_timeout.map_or(0, |t| t.as_secs()),
            idle_remaining_s: self.idle_remaining().map(|d| d.as_secs_f64()),
        }
    }
}

/// Everything a connection needs, shared by all of them.
pub(super) struct Inner {
    pub cfg: ServerConfig,
    pub shared: Arc<Shared>,
    pub router: Router,
    pub ticket: Ticket,
    /// Bytes that batch answers not yet written may take, all connections
    /// together (see `connection::BATCH_ANSWER_BYTES`).
    pub batch_answers: Arc<tokio::sync::Semaphore>,
    next_conn_id: AtomicUsize,
}

pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    pub fn new(cfg: ServerConfig, ticket: Ticket, shared: Arc<Shared>, router: Router) -> Server {
        Server {
            inner: Arc::new(Inner {
                cfg,
                shared,
                router,
                ticket,
                batch_answers: Arc::new(tokio::sync::Semaphore::new(
                    super::connection::BATCH_ANSWER_BYTES,
                )),
                next_conn_id: AtomicUsize::new(1),
            }),
        }
    }

    /// Serves every listener until shutdown, then waits (at most the grace
    /// period, plus a second for the writers) for connections to finish.
    pub async fn run(self, listeners: Vec<Listener>) {
        let tracker = TaskTracker::new();
        let shared = self.inner.shared.clone();
        for listener in listeners {
            tracker.spawn(accept_loop(self.inner.clone(), listener, tracker.clone()));
        }
        tokio::spawn(watchdog(shared.clone()));
        shared.shutdown_token().cancelled().await;
        log::info!("shutting down");
        tracker.close();
        let limit = self.inner.cfg.shutdown_grace + Duration::from_secs(1);
        if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
            log::warn!("connections still open after {limit:?}; exiting anyway");
        }
    }
}

async fn accept_loop(inner: Arc<Inner>, mut listener: Listener, tracker: TaskTracker) {
    let shutdown = inner.shared.shutdown_token().clone();
    let is_stdio = matches!(listener, Listener::Stdio { .. });
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let conn = match accepted {
            Ok(Some(conn)) => conn,
            Ok(None) => break,
            Err(e) => {
                // Per-connection failures (e.g. a peer resetting before accept
                // completes, or fd exhaustion) must not end the listener.
                log::warn!("{}: accept failed: {e}", listener.local_addr());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = &inner.shared;
        if shared.connections.load(Ordering::Acquire) >= inner.cfg.max_connections {
            log::warn!(
                "refusing connection from {}: {} connections open",
                conn.peer,
                inner.cfg.max_connections
            );
            tracker.spawn(refuse(conn.stream));
            continue;
        }
        shared.connections.fetch_add(1, Ordering::AcqRel);
        shared.connections_total.fetch_add(1, Ordering::Relaxed);
        let id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
        log::info!("conn {id}: open from {}", conn.peer);
        let inner2 = inner.clone();
        let peer = conn.peer;
        let session = async move {
            connection::serve(inner2.clone(), conn.stream, id).await;
            inner2.shared.connections.fetch_sub(1, Ordering::AcqRel);
            inner2.router.connection_closed(ConnectionId(id));
            log::info!("conn {id}: closed ({peer})");
        };
        if is_stdio {
            // The stdio session is the agent's whole life.
            session.await;
            inner.shared.shutdown();
            break;
        }
        tracker.spawn(session);
    }
    drop(listener);
}

async fn refuse(mut stream: Box<dyn crate::transport::listener::Stream>) {
    let mut line = error_line(&Id::null(), LIMIT_REACHED, "too many connections");
    line.push(b'\n');
    let write = async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}

async fn watchdog(shared: Arc<Shared>) {
    let token = shared.shutdown_token().clone();
    loop {
        let Some(left) = shared.idle_remaining() else {
            return;
        };
        if left.is_zero() {
            log::info!(
                "no request for {} s: shutting down",
                shared.idle_timeout.map_or(0, |t| t.as_secs())
            );
            shared.shutdown();
            return;
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(left) => {}
        }
    }
}
