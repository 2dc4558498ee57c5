//! A TCP proxy between agent and server that a test can cut (close every
//! connection), black-hole (stop forwarding without closing, one or both
//! directions; or only the connections open now, for good), freeze (stop
//! reading the connections open now, as a hung peer) and restore.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Which directions currently forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Agent to server.
    pub up: bool,
    /// Server to agent.
    pub down: bool,
}

pub struct Proxy {
    pub addr: SocketAddr,
    flow: watch::Sender<Flow>,
    cut: Mutex<CancellationToken>,
    /// When the agent side of a connection was closed by the agent.
    pub agent_closed: Arc<Mutex<Vec<Instant>>>,
    /// New connections are closed at once (the server looks down).
    refusing: std::sync::atomic::AtomicBool,
    /// Connections are numbered as accepted; those below this number are
    /// black-holed for good.
    next_conn: AtomicU64,
    dead_below: Arc<AtomicU64>,
    /// Connections below this number are no longer read at all.
    frozen_below: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Arc<Proxy> {
        Proxy::start_with(upstream, None).await
    }

    /// With `recv_buffer`, the client side of each connection has a fixed
    /// receive buffer of about that size (no autotuning): a client sending
    /// into a frozen connection soon finds its sends blocked.
    pub async fn start_with(upstream: SocketAddr, recv_buffer: Option<u32>) -> Arc<Proxy> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(128).unwrap();
        let (flow, _) = watch::channel(Flow {
            up: true,
            down: true,
        });
        let p = Arc::new(Proxy {
            addr: listener.local_addr().unwrap(),
            flow,
            cut: Mutex::new(CancellationToken::new()),
            agent_closed: Arc::default(),
            refusing: Default::default(),
            next_conn: AtomicU64::new(0),
            dead_below: Arc::default(),
            frozen_below: Arc::default(),
            stop: CancellationToken::new(),
        });
        let me = p.clone();
        tokio::spawn(async move {
            loop {
                let (down, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = me.stop.cancelled() => return,
                };
                if me.refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropping `down` closes it
                }
                let me = me.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let cut = me.cut.lock().unwrap().clone();
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let closed = me.agent_closed.clone();
                    let id = me.next_conn.fetch_add(1, Ordering::SeqCst);
                    let open = |up: bool| {
                        let (flow, dead_below) = (me.flow.subscribe(), me.dead_below.clone());
                        move || {
                            let f = *flow.borrow();
                            (if up { f.up } else { f.down })
                                && id >= dead_below.load(Ordering::SeqCst)
                        }
                    };
                    let frozen = || {
                        let f = me.frozen_below.clone();
                        move || id < f.load(Ordering::SeqCst)
                    };
                    let a = pump(dr, uw, open(true), frozen(), Some(closed));
                    let b = pump(ur, dw, open(false), frozen(), None);
                    tokio::select! {
                        _ = async { tokio::join!(a, b) } => {}
                        _ = cut.cancelled() => {} // dropping the halves closes both sockets
                    }
                });
            }
        });
        p
    }

    /// How many connections were accepted so far.
    #[allow(dead_code)]
    pub fn accepted(&self) -> u64 {
        self.next_conn.load(Ordering::SeqCst)
    }

    /// Closes every open connection (new ones are accepted as usual).
    pub fn cut(&self) {
        let old = std::mem::replace(&mut *self.cut.lock().unwrap(), CancellationToken::new());
        old.cancel();
    }

    /// While set, new connections are closed at once: with [`Proxy::cut`],
    /// the server is unreachable until this is cleared.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set_flow(&self, up: bool, down: bool) {
        self.flow.send_replace(Flow { up, down });
    }

    /// Stops forwarding both ways without closing anything.
    pub fn blackhole(&self) {
        self.set_flow(false, false);
    }

    pub fn restore(&self) {
        self.set_flow(true, true);
    }

    /// The connections open now stop forwarding for good, without closing
    /// (as when a network path dies silently); new ones work as usual.
    pub fn kill_open_silently(&self) {
        let n = self.next_conn.load(Ordering::SeqCst);
        self.dead_below.store(n, Ordering::SeqCst);
    }

    /// The connections open now are no longer read or forwarded, both
    /// ways, without closing (as a hung peer: its receive window closes, so
    /// a sender's writes block); new ones work as usual.
    pub fn freeze_open(&self) {
        let n = self.next_conn.load(Ordering::SeqCst);
        self.frozen_below.store(n, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    open: impl Fn() -> bool,
    frozen: impl Fn() -> bool,
    record_eof: Option<Arc<Mutex<Vec<Instant>>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if frozen() {
            // Held open, never read again, until the link is cut.
            return std::future::pending().await;
        }
        // While black-holed, what arrives is read and dropped, as on a dead
        // link; reading on also shows when the sender closes its end.
        let n: usize = from.read(&mut buf).await.unwrap_or_default();
        if n == 0 {
            if let Some(rec) = &record_eof {
                rec.lock().unwrap().push(Instant::now());
            }
            if open() {
                let _ = to.shutdown().await;
            } else {
                // A dead link carries no FIN either: keep the other side
                // waiting until the link is cut.
                std::future::pending::<()>().await;
            }
            return;
        }
        if !open() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A proxy of the Docker socket that a test can take away (the socket file
/// disappears, open connections drop) and bring back.
pub struct UnixProxy {
    pub path: std::path::PathBuf,
    target: std::path::PathBuf,
    running: Mutex<Option<CancellationToken>>,
}

impl UnixProxy {
    pub fn start(path: std::path::PathBuf, target: &str) -> Arc<UnixProxy> {
        let p = Arc::new(UnixProxy {
            path,
            target: target.into(),
            running: Mutex::new(None),
        });
        p.bring_back();
        p
    }

    /// Serves the socket again.
    pub fn bring_back(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).unwrap();
        let stop = CancellationToken::new();
        *self.running.lock().unwrap() = Some(stop.clone());
        let target = self.target.clone();
        tokio::spawn(async move {
            loop {
                let (mut down, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = stop.cancelled() => return,
                };
                let target = target.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::UnixStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
    }

    /// Removes the socket and drops every connection through it.
    pub fn take_away(&self) {
        if let Some(stop) = self.running.lock().unwrap().take() {
            stop.cancel();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for UnixProxy {
    fn drop(&mut self) {
        self.take_away();
    }
}
