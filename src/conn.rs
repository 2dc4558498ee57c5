//! One agent-server connection, the same on both ends: a writer task that
//! owns the WebSocket's sink and drains an outbound queue, a read loop that
//! hands each message to that end's [`Peer`], the heartbeat (a ping when it
//! is due, the end after [`Heartbeat::timeout`] of silence) and the close.
//! The WebSocket library stays outside: each end maps its messages to
//! [`Incoming`] and back from [`Outbound`], so this loop is tested without a
//! network or Docker.
//!
//! The [`Link`] is how the rest of the program writes to the current
//! connection; it outlives connections (channels resume on the next one).

use crate::protocol::Message;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Something to write on the WebSocket; the connection task turns it into a
/// frame of its WebSocket library.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(String),
    Binary(Bytes),
    /// A WebSocket ping (heartbeat).
    Ping,
    /// Close the WebSocket with this code and reason, then stop writing.
    Close(u16, String),
}

impl Outbound {
    pub fn msg(m: &Message) -> Outbound {
        Outbound::Text(m.encode())
    }
}

/// Queue feeding one connection's writer. Unbounded on purpose: data frames
/// are bounded by channel credit, control messages are small and few.
pub type OutTx = mpsc::UnboundedSender<Outbound>;

/// Writes a connection's queue to its WebSocket until the queue ends or a
/// close goes out. Messages already queued are fed together and flushed
/// once: one write for a burst of frames, not one per frame.
pub async fn write_loop<S, M>(
    mut sink: S,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    to_ws: impl Fn(Outbound) -> M,
) where
    S: futures_util::Sink<M> + Unpin,
{
    use futures_util::SinkExt;
    /// Most messages fed before a flush (bounds the burst in the buffer).
    const BURST: usize = 32;
    'run: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut fed = 0;
        while let Some(o) = next.take() {
            let closing = matches!(o, Outbound::Close(..));
            if sink.feed(to_ws(o)).await.is_err() || closing {
                break 'run;
            }
            fed += 1;
            if fed < BURST {
                next = rx.try_recv().ok();
            }
        }
        if sink.flush().await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// The current connection, if any. Sends while disconnected are dropped:
/// channel data and closes are replayed on resume, replies are re-requested.
pub struct Link {
    out: RwLock<Option<OutTx>>,
    /// Whether a connection is set, for tasks that act on a disconnect.
    up: watch::Sender<bool>,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            out: RwLock::new(None),
            up: watch::channel(false).0,
        }
    }
}

impl Link {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Follows whether a connection is set.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    pub fn send(&self, o: Outbound) -> bool {
        match &*self.out.read().unwrap() {
            Some(tx) => tx.send(o).is_ok(),
            None => false,
        }
    }

    pub fn send_msg(&self, m: &Message) -> bool {
        self.send(Outbound::msg(m))
    }

    pub fn set(&self, out: Option<OutTx>) {
        let up = out.is_some();
        *self.out.write().unwrap() = out;
        self.up.send_replace(up);
    }

    pub fn is_connected(&self) -> bool {
        self.out
            .read()
            .unwrap()
            .as_ref()
            .is_some_and(|t| !t.is_closed())
    }
}

/// What came in on the WebSocket, whatever the library.
#[derive(Debug)]
pub enum Incoming<T> {
    Text(T),
    Binary(Bytes),
    /// The peer's close frame (code and reason, if it gave them).
    Close(Option<Close>),
    /// A ping or pong: traffic, nothing to handle (the library answers
    /// pings).
    Control,
}

/// A close code and reason (RFC 6455 §7.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    pub fn new(code: u16, reason: impl Into<String>) -> Close {
        Close {
            code,
            reason: reason.into(),
        }
    }

    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// A policy says no (the node was removed).
    pub const POLICY: u16 = 1008;
}

/// When to ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingWhen {
    /// At every tick (the server: its pings are every connection's pulse).
    EveryTick,
    /// Only after a whole interval without a word from the peer (the agent:
    /// a server that pings keeps it from ever sending one; a silent server
    /// still hears from it).
    Silent,
}

/// Heartbeat settings of one connection. The server chooses them and tells
/// the agent in `welcome` (§9.1).
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    pub interval: Duration,
    /// Silence longer than this ends the connection.
    pub timeout: Duration,
    pub ping: PingWhen,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// This end closed it (shutdown, replaced, revoked), with this close.
    Local(Close),
    /// The peer sent a close frame.
    Remote(Option<Close>),
    /// The transport failed or ended without a close frame.
    Lost(String),
    /// Nothing arrived for longer than the heartbeat timeout.
    Silent(Duration),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Local(c) => write!(f, "closed here ({}: {})", c.code, c.reason),
            End::Remote(Some(c)) => {
                write!(f, "peer closed the connection ({}: {})", c.code, c.reason)
            }
            End::Remote(None) => f.write_str("peer closed the connection"),
            End::Lost(why) => write!(f, "connection lost: {why}"),
            End::Silent(d) => write!(f, "no traffic from the peer for {} s", d.as_secs()),
        }
    }
}

/// One end's handling of what arrives.
pub trait Peer {
    fn on_text(&mut self, text: &str);
    fn on_binary(&mut self, data: Bytes);
    /// Anything arrived (before it is handled); a close ends the
    /// connection with it.
    fn on_traffic(&mut self) -> Option<Close> {
        None
    }
    /// At each heartbeat tick, before the ping; a close ends the
    /// connection with it.
    fn on_tick(&mut self) -> Option<Close> {
        None
    }
}

/// Reads `stream` into `peer` and keeps the heartbeat (if this connection
/// has its own: the server keeps all of its connections' in one task) until
/// the connection ends; `stop` resolving closes it from this end. Pings and
/// closes go out through `out` (the queue of this connection's writer).
pub async fn run<S, T, E, P>(
    mut stream: S,
    out: &OutTx,
    beat: Option<Heartbeat>,
    peer: &mut P,
    stop: impl Future<Output = Close>,
) -> End
where
    S: Stream<Item = Result<Incoming<T>, E>> + Unpin,
    T: std::ops::Deref<Target = str>,
    E: std::fmt::Display,
    P: Peer,
{
    tokio::pin!(stop);
    // Without a heartbeat of its own the tick never fires (its branch is
    // disabled); the period is then only a placeholder.
    let period = beat.map_or(Duration::from_secs(3600), |b| b.interval);
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    let end = loop {
        tokio::select! {
            msg = stream.next() => {
                last_rx = Instant::now();
                if let Some(close) = peer.on_traffic() {
                    break End::Local(close);
                }
                match msg {
                    Some(Ok(Incoming::Text(t))) => peer.on_text(&t),
                    Some(Ok(Incoming::Binary(b))) => peer.on_binary(b),
                    Some(Ok(Incoming::Control)) => {}
                    Some(Ok(Incoming::Close(c))) => break End::Remote(c),
                    Some(Err(e)) => break End::Lost(e.to_string()),
                    None => break End::Lost("connection closed".into()),
                }
            }
            _ = tick.tick(), if beat.is_some() => {
                let Some(beat) = beat else { continue };
                let silent = last_rx.elapsed();
                if silent > beat.timeout {
                    break End::Silent(silent);
                }
                if let Some(close) = peer.on_tick() {
                    break End::Local(close);
                }
                if beat.ping == PingWhen::EveryTick || silent >= beat.interval {
                    let _ = out.send(Outbound::Ping);
                }
            }
            close = &mut stop => break End::Local(close),
        }
    };
    if let End::Local(c) = &end {
        let _ = out.send(Outbound::Close(c.code, c.reason.clone()));
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        texts: Vec<String>,
        binaries: Vec<Bytes>,
        ticks: usize,
        close_at_tick: Option<usize>,
    }

    impl Peer for Recorder {
        fn on_text(&mut self, text: &str) {
            self.texts.push(text.to_string());
        }
        fn on_binary(&mut self, data: Bytes) {
            self.binaries.push(data);
        }
        fn on_tick(&mut self) -> Option<Close> {
            self.ticks += 1;
            (Some(self.ticks) == self.close_at_tick).then(|| Close::new(Close::POLICY, "removed"))
        }
    }

    type Feed = mpsc::UnboundedSender<Result<Incoming<String>, String>>;

    fn feed() -> (
        Feed,
        tokio_stream_shim::Rx<Result<Incoming<String>, String>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, tokio_stream_shim::Rx(rx))
    }

    /// An mpsc receiver as a stream (no tokio-stream dependency for this).
    mod tokio_stream_shim {
        pub struct Rx<T>(pub tokio::sync::mpsc::UnboundedReceiver<T>);
        impl<T> futures_util::Stream for Rx<T> {
            type Item = T;
            fn poll_next(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<T>> {
                self.0.poll_recv(cx)
            }
        }
    }

    fn beat(ping: PingWhen) -> Heartbeat {
        Heartbeat {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            ping,
        }
    }

    fn pings(rx: &mut mpsc::UnboundedReceiver<Outbound>) -> usize {
        let mut n = 0;
        while let Ok(o) = rx.try_recv() {
            if matches!(o, Outbound::Ping) {
                n += 1;
            }
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn messages_reach_the_peer_and_a_remote_close_ends_it() {
        let (tx, stream) = feed();
        let (out, _rx) = mpsc::unbounded_channel();
        let mut peer = Recorder::default();
        tx.send(Ok(Incoming::Text("hello".into()))).unwrap();
        tx.send(Ok(Incoming::Binary(Bytes::from_static(b"\x01"))))
            .unwrap();
        tx.send(Ok(Incoming::Close(Some(Close::new(1001, "bye")))))
            .unwrap();
        let end = run(
            stream,
            &out,
            Some(beat(PingWhen::EveryTick)),
            &mut peer,
            std::future::pending(),
        )
        .await;
        assert_eq!(end, End::Remote(Some(Close::new(1001, "bye"))));
        assert_eq!(peer.texts, ["hello"]);
        assert_eq!(peer.binaries.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_past_the_timeout_ends_it_within_one_interval() {
        let (_tx, stream) = feed();
        let (out, mut rx) = mpsc::unbounded_channel();
        let mut peer = Recorder::default();
        let t0 = Instant::now();
        let end = run(
            stream,
            &out,
            Some(beat(PingWhen::EveryTick)),
            &mut peer,
            std::future::pending(),
        )
        .await;
        assert!(
            matches!(end, End::Silent(d) if d > Duration::from_secs(30)),
            "{end:?}"
        );
        // Detected at the first tick past the timeout: 40 s, not later.
        assert_eq!(t0.elapsed(), Duration::from_secs(40));
        assert_eq!(pings(&mut rx), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_hears_pings_never_pings_back() {
        let (tx, stream) = feed();
        let (out, mut rx) = mpsc::unbounded_channel();
        let mut peer = Recorder::default();
        // The other end pings every 10 s (phase-shifted): this end, which
        // pings only when silent, must send none in 95 s.
        let pinger = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            loop {
                if tx.send(Ok(Incoming::Control)).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        let stop = async {
            tokio::time::sleep(Duration::from_secs(95)).await;
            Close::new(Close::GOING_AWAY, "shutting down")
        };
        let end = run(stream, &out, Some(beat(PingWhen::Silent)), &mut peer, stop).await;
        pinger.abort();
        assert_eq!(end, End::Local(Close::new(1001, "shutting down")));
        let mut sent = Vec::new();
        while let Ok(o) = rx.try_recv() {
            sent.push(o);
        }
        assert!(
            !sent.iter().any(|o| matches!(o, Outbound::Ping)),
            "pinged though it heard the peer: {sent:?}"
        );
        assert!(matches!(sent.last(), Some(Outbound::Close(1001, _))));
        assert_eq!(peer.ticks, 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_pinged_by_either_policy() {
        for ping in [PingWhen::Silent, PingWhen::EveryTick] {
            let (_tx, stream) = feed();
            let (out, mut rx) = mpsc::unbounded_channel();
            let stop = async {
                tokio::time::sleep(Duration::from_secs(25)).await;
                Close::new(1000, "done")
            };
            run(
                stream,
                &out,
                Some(beat(ping)),
                &mut Recorder::default(),
                stop,
            )
            .await;
            assert_eq!(pings(&mut rx), 2, "{ping:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_heartbeat_of_its_own_it_never_pings_nor_times_out() {
        let (_tx, stream) = feed();
        let (out, mut rx) = mpsc::unbounded_channel();
        let stop = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Close::new(1000, "done")
        };
        let end = run(stream, &out, None, &mut Recorder::default(), stop).await;
        assert_eq!(end, End::Local(Close::new(1000, "done")));
        assert_eq!(pings(&mut rx), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_can_close_the_connection() {
        let (_tx, stream) = feed();
        let (out, mut rx) = mpsc::unbounded_channel();
        let mut peer = Recorder {
            close_at_tick: Some(2),
            ..Default::default()
        };
        let end = run(
            stream,
            &out,
            Some(beat(PingWhen::EveryTick)),
            &mut peer,
            std::future::pending(),
        )
        .await;
        assert_eq!(end, End::Local(Close::new(1008, "removed")));
        let last = std::iter::from_fn(|| rx.try_recv().ok()).last();
        assert!(matches!(last, Some(Outbound::Close(1008, _))));
    }
}
