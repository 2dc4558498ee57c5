//! Accepting and serving connections, plain or TLS, within limits: a
//! deadline for the TLS handshake and for every request head, a cap on
//! connections that have not authenticated yet, a cap on all connections,
//! and a graceful drain on shutdown.
//!
//! A connection is *pending* from accept until one of its requests passes
//! authentication (operator token, node token or registration key). A
//! pending connection costs an attacker nothing but a socket, so when the
//! limits are reached the oldest pending connection is closed to make room:
//! a real client, which sends its request head at once, gets in, while idle
//! or trickling sockets (slowloris) are the ones that go. A pending
//! connection whose request is being handled (its head arrived: it is no
//! slowloris) is not closed: in a reconnect storm of thousands that would
//! throw away work half done, over and over; a new connection is refused
//! instead when every pending one is being handled. Authenticated
//! connections (agents, operators) are never closed for the limits; a new
//! connection is refused when every open connection has authenticated
//! and the total cap is reached.

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{Instrument, debug, debug_span, info, warn};

/// How long a client has to finish the TLS handshake: a few round trips
/// for a real client; 10 s allows for a slow, lossy link.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After shutdown, how long a connection's request in flight has to finish
/// before the connection is dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Open files kept back from the open-file limit for what is not a client
/// connection: the listener, state files, standard streams, the runtime's
/// own descriptors, and connections already closed for the limits whose
/// tasks have not run yet.
const FD_RESERVE: u64 = 64;

/// After a failed `accept` that is not about one connection (out of
/// descriptors, out of memory), how long to wait before the next: short,
/// because a descriptor freed by a closing connection should be used soon.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// At most one warning this often about connections closed or refused for
/// the limits: under attack, one line per connection would flood the log.
const SHED_WARN_EVERY: Duration = Duration::from_secs(10);

/// What the accept loop enforces (from [`super::ServerConfig`], the total
/// cap fitted to the open-file limit).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub header_read_timeout: Duration,
    pub max_pending: usize,
    pub max_connections: usize,
}

impl Limits {
    /// The configured limits, with the total cap lowered, if need be, to fit
    /// `open_files` (the soft limit in effect; `None`: unlimited).
    pub fn fit(
        header_read_timeout: Duration,
        max_pending: usize,
        max_connections: usize,
        open_files: Option<u64>,
    ) -> Limits {
        let fits = open_files
            .map(|n| usize::try_from(n.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX))
            .unwrap_or(usize::MAX);
        let max_connections = max_connections.clamp(1, fits.max(1));
        Limits {
            header_read_timeout,
            max_pending: max_pending.clamp(1, max_connections),
            max_connections,
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit, once;
/// returns the soft limit in effect (`None`: unlimited). Every connection
/// holds a descriptor, and the usual soft default (1,024) is what let about
/// 1,100 idle connections stop the server; the hard limit is what the
/// administrator allows. Process-wide: later calls return the first result.
pub fn raise_open_file_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let now = getrlimit(Resource::Nofile);
        // An unlimited hard limit is not a value Linux accepts for the soft
        // one (it stops at fs.nr_open, 1,048,576 by default).
        let target = now.maximum.unwrap_or(1 << 20);
        let current = now.current?;
        if current >= target {
            return Some(current);
        }
        let raised = Rlimit {
            current: Some(target),
            maximum: now.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                info!(from = current, to = target, "raised the open-file limit");
                Some(target)
            }
            Err(e) => {
                warn!(limit = current, error = %e, "cannot raise the open-file limit");
                Some(current)
            }
        }
    })
}

/// Counts connections against the limits and picks which to close.
pub(super) struct Gate {
    limits: Limits,
    /// Connections accepted and not closed yet, upgraded ones included.
    open: AtomicUsize,
    /// Pending connections in accept order.
    pending: Mutex<BTreeMap<u64, Pending>>,
    /// Connections closed or refused for the limits, for the next warning.
    shed: Mutex<Shed>,
}

/// A connection that has not authenticated yet.
struct Pending {
    /// Closes it.
    close: CancellationToken,
    /// Since when a request of it is being handled, if one is.
    busy: Option<Instant>,
}

/// How long a request being handled keeps its unauthenticated connection
/// from being closed to make room: long enough for a registration or an
/// upgrade waiting on the database, short enough that requests which
/// never finish (a body announced and never sent) cannot hold every
/// pending slot.
const BUSY_GRACE: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Shed {
    evicted: u64,
    refused: u64,
    warned: Option<Instant>,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            open: AtomicUsize::new(0),
            pending: Mutex::new(BTreeMap::new()),
            shed: Mutex::new(Shed::default()),
        })
    }

    /// Admits a new connection: its slot (held for as long as its socket is
    /// open) and the token that closes it while it is pending. Closes the
    /// oldest idle pending connection to make room; `None` (refuse it) when
    /// a limit is reached and no pending connection is idle.
    /// Called by the accept loop alone, so ids grow with accept order.
    fn admit(self: &Arc<Self>, id: u64) -> Option<(Slot, CancellationToken)> {
        let mut pending = self.pending.lock().unwrap();
        let full = self.open.load(Ordering::Relaxed) >= self.limits.max_connections
            || pending.len() >= self.limits.max_pending;
        if full {
            // The evicted connection's descriptor is freed when its task
            // runs: until then the total is over by one (FD_RESERVE).
            if !Self::evict(&mut pending) {
                drop(pending);
                self.note_shed(false);
                return None;
            }
            self.note_shed(true);
        }
        let close = CancellationToken::new();
        pending.insert(
            id,
            Pending {
                close: close.clone(),
                busy: None,
            },
        );
        self.open.fetch_add(1, Ordering::Relaxed);
        let admission = Admission {
            gate: self.clone(),
            id,
        };
        Some((Slot(admission), close))
    }

    /// Closes the oldest pending connection that no request of is being
    /// handled (or has been for [`BUSY_GRACE`]); false if there is none.
    fn evict(pending: &mut BTreeMap<u64, Pending>) -> bool {
        let idle = |p: &Pending| p.busy.is_none_or(|t| t.elapsed() >= BUSY_GRACE);
        let Some(id) = pending.iter().find(|(_, p)| idle(p)).map(|(id, _)| *id) else {
            return false;
        };
        if let Some(p) = pending.remove(&id) {
            p.close.cancel();
        }
        true
    }

    /// Out of descriptors: closes the oldest pending connection to free one.
    fn evict_for_descriptor(&self) {
        if Self::evict(&mut self.pending.lock().unwrap()) {
            self.note_shed(true);
        }
    }

    fn note_shed(&self, evicted: bool) {
        debug!(evicted, "connection limits reached");
        let mut shed = self.shed.lock().unwrap();
        if evicted {
            shed.evicted += 1;
        } else {
            shed.refused += 1;
        }
        if shed.warned.is_none_or(|t| t.elapsed() >= SHED_WARN_EVERY) {
            warn!(
                closed_unauthenticated = shed.evicted,
                refused = shed.refused,
                max_pending_connections = self.limits.max_pending,
                max_connections = self.limits.max_connections,
                "connection limits reached: closing the oldest unauthenticated connections, \
                 refusing new ones when all have authenticated"
            );
            *shed = Shed {
                warned: Some(Instant::now()),
                ..Shed::default()
            };
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (
            self.open.load(Ordering::Relaxed),
            self.pending.lock().unwrap().len(),
        )
    }
}

/// A connection's standing with the limits, in its requests' extensions:
/// the handler that accepts its credentials calls
/// [`Admission::authenticated`], after which it is no longer closed to make
/// room.
#[derive(Clone)]
pub(crate) struct Admission {
    gate: Arc<Gate>,
    id: u64,
}

impl Admission {
    pub(crate) fn authenticated(&self) {
        self.leave_pending();
    }

    /// The token that closes the connection to make room, while it is
    /// pending: work that outlives the request (an upgraded connection's
    /// splice) must end with it, or the slot's socket would live on.
    pub(crate) fn closing(&self) -> Option<CancellationToken> {
        let pending = self.gate.pending.lock().unwrap();
        pending.get(&self.id).map(|p| p.close.clone())
    }

    /// Lets the connection be closed to make room although a request of it
    /// is being handled: one that waits on a party outside the server (a
    /// worker's port behind a preview) is not the server's to protect.
    pub(crate) fn evictable(&self) {
        self.set_busy(false);
    }

    /// Marks a request of the connection as being handled until the guard
    /// is dropped: meanwhile the connection, if pending, is not closed to
    /// make room.
    fn handling(&self) -> Handling {
        self.set_busy(true);
        Handling(self.clone())
    }

    fn set_busy(&self, busy: bool) {
        if let Some(p) = self.gate.pending.lock().unwrap().get_mut(&self.id) {
            p.busy = busy.then(Instant::now);
        }
    }

    fn leave_pending(&self) {
        self.gate.pending.lock().unwrap().remove(&self.id);
    }
}

/// A request being handled (see [`Admission::handling`]).
struct Handling(Admission);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.set_busy(false);
    }
}

/// Marks the connection of a request whose credentials were accepted.
pub(crate) fn authenticated(extensions: &axum::http::Extensions) {
    if let Some(a) = extensions.get::<Admission>() {
        a.authenticated();
    }
}

/// One open connection in the count; dropped with its socket.
struct Slot(Admission);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.leave_pending();
        self.0.gate.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that holds its [`Slot`]: an upgraded connection, which lives on
/// in its WebSocket task after hyper lets go of it, still counts.
struct Counted<S> {
    io: S,
    _slot: Slot,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What every connection task shares.
struct Shared {
    app: Router,
    http: http1::Builder,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Cancelled after shutdown: connections finish their request in
    /// flight, then close.
    drain: CancellationToken,
}

/// Accepts on `listener` until `shutdown`, serving `app` (HTTP/1.1 and
/// WebSocket upgrades; HTTPS with `tls`) on a task per connection in
/// `tracker`. Connections close gracefully when `drain` is cancelled.
pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    limits: Limits,
    tracker: &TaskTracker,
    drain: CancellationToken,
    shutdown: &CancellationToken,
) {
    let mut http = http1::Builder::new();
    // HTTP/1.1 only: the agent link and the operator API need nothing more,
    // and leaving HTTP/2 out keeps it out of every binary. The header-read
    // timeout also bounds a keep-alive connection's idle time: hyper starts
    // it whenever the connection waits for a request head.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let shared = Arc::new(Shared {
        app,
        http,
        tls: tls.map(tokio_rustls::TlsAcceptor::from),
        drain,
    });
    let gate = Gate::new(limits);
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if let Some(pause) = accept_failed(&gate, &e) {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
                continue;
            }
        };
        next_id += 1;
        let Some((slot, close)) = gate.admit(next_id) else {
            continue; // dropping `tcp` refuses it
        };
        // Small control messages must not wait for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        let span = debug_span!("connection", %peer);
        tracker.spawn(serve_tcp(tcp, slot, close, shared.clone()).instrument(span));
    }
}

/// Logs a failed `accept`; returns how long to pause before the next.
fn accept_failed(gate: &Gate, e: &io::Error) -> Option<Duration> {
    use io::ErrorKind::*;
    // One connection's trouble: go on at once.
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        debug!(error = %e, "accept failed");
        return None;
    }
    let errno = e.raw_os_error();
    if errno == Some(rustix::io::Errno::MFILE.raw_os_error())
        || errno == Some(rustix::io::Errno::NFILE.raw_os_error())
    {
        gate.evict_for_descriptor();
    }
    warn!(error = %e, "accept failed");
    Some(ACCEPT_ERROR_PAUSE)
}

/// One connection: the TLS handshake if any, then HTTP until the client
/// leaves, an upgrade takes the socket, the limits close it (`close`), or
/// the server drains.
async fn serve_tcp(
    tcp: tokio::net::TcpStream,
    slot: Slot,
    close: CancellationToken,
    shared: Arc<Shared>,
) {
    let Some(acceptor) = shared.tls.clone() else {
        return serve_http(tcp, slot, close, shared).await;
    };
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let stream = tokio::select! {
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}");
                return;
            }
        },
        _ = close.cancelled() => return,
        _ = shared.drain.cancelled() => return,
    };
    serve_http(stream, slot, close, shared).await
}

async fn serve_http<S>(io: S, slot: Slot, close: CancellationToken, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let admission = slot.0.clone();
    let app = shared.app.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let handling = admission.handling();
        req.extensions_mut().insert(admission.clone());
        let response = app.clone().call(req);
        async move {
            let r = response.await;
            drop(handling);
            r
        }
    });
    let io = TokioIo::new(Counted { io, _slot: slot });
    let conn = shared.http.serve_connection(io, svc).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "connection ended");
            }
        }
        _ = close.cancelled() => debug!("closed to make room: not authenticated"),
        _ = shared.drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pending: usize, max_connections: usize) -> Limits {
        Limits::fit(Duration::from_secs(1), max_pending, max_connections, None)
    }

    #[test]
    fn oldest_pending_connection_makes_room() {
        let gate = Gate::new(limits(2, 10));
        let (a, close_a) = gate.admit(1).unwrap();
        let (_b, close_b) = gate.admit(2).unwrap();
        let (_c, close_c) = gate.admit(3).unwrap();
        assert!(close_a.is_cancelled());
        assert!(!close_b.is_cancelled() && !close_c.is_cancelled());
        assert_eq!(gate.counts(), (3, 2));
        drop(a); // its task ran and dropped the socket
        assert_eq!(gate.counts(), (2, 2));
    }

    #[test]
    fn a_pending_connection_whose_request_is_handled_is_kept() {
        let gate = Gate::new(limits(2, 10));
        let (a, close_a) = gate.admit(1).unwrap();
        let (b, close_b) = gate.admit(2).unwrap();
        let busy_a = a.0.handling();
        // Full: the idle one goes, not the older one being handled.
        let (c, close_c) = gate.admit(3).unwrap();
        assert!(close_b.is_cancelled() && !close_a.is_cancelled());
        drop(b);
        // Full, and every pending one is being handled: refused.
        let busy_c = c.0.handling();
        assert!(gate.admit(4).is_none());
        assert!(!close_a.is_cancelled() && !close_c.is_cancelled());
        // Handled and still not authenticated: it may go again.
        drop(busy_a);
        assert!(gate.admit(5).is_some());
        assert!(close_a.is_cancelled() && !close_c.is_cancelled());
        drop(busy_c);
    }

    #[test]
    fn a_request_that_never_ends_keeps_its_connection_only_so_long() {
        let gate = Gate::new(limits(2, 10));
        let (a, close_a) = gate.admit(1).unwrap();
        let (b, close_b) = gate.admit(2).unwrap();
        let (_busy_a, _busy_b) = (a.0.handling(), b.0.handling());
        assert!(gate.admit(3).is_none(), "both handled: refused");
        // The older one has been handled for longer than the grace (a
        // body announced and never sent): it makes room.
        gate.pending.lock().unwrap().get_mut(&1).unwrap().busy = Some(Instant::now() - BUSY_GRACE);
        assert!(gate.admit(3).is_some());
        assert!(close_a.is_cancelled() && !close_b.is_cancelled());
    }

    #[test]
    fn authenticated_connections_are_kept_and_the_total_is_capped() {
        let gate = Gate::new(limits(5, 2));
        let (a, close_a) = gate.admit(1).unwrap();
        a.0.authenticated();
        let (b, close_b) = gate.admit(2).unwrap();
        // Full: the pending one goes, the authenticated one stays.
        let (c, _) = gate.admit(3).unwrap();
        assert!(close_b.is_cancelled() && !close_a.is_cancelled());
        drop(b);
        c.0.authenticated();
        // Full, and everyone authenticated: refused.
        assert!(gate.admit(4).is_none());
        assert_eq!(gate.counts(), (2, 0));
        drop(c);
        assert!(gate.admit(5).is_some());
    }

    #[test]
    fn total_fits_the_open_file_limit() {
        let l = Limits::fit(Duration::from_secs(1), 512, 16_384, Some(1024));
        assert_eq!(l.max_connections, 1024 - FD_RESERVE as usize);
        assert_eq!(l.max_pending, 512);
        let l = Limits::fit(Duration::from_secs(1), 512, 100, Some(1 << 20));
        assert_eq!((l.max_connections, l.max_pending), (100, 100));
        let l = Limits::fit(Duration::from_secs(1), 0, 0, Some(10));
        assert_eq!((l.max_connections, l.max_pending), (1, 1));
    }
}
