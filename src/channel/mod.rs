//! Channel multiplexing with per-channel credit-based flow control and
//! resumption across reconnects, shared by the agent and the server.
//!
//! Each end keeps a [`Channels`] registry that outlives any one connection;
//! the connection itself is a swappable [`Link`]. A [`ChannelWriter`] sends
//! binary frames only up to the `limit` the peer granted (waiting otherwise),
//! so a channel whose reader stalls stops its writer and nothing else. Every
//! frame stays in the writer's replay buffer until the peer acknowledges it
//! (`window.acked`); since credit is `acked + window`, that buffer never
//! exceeds one window. After a reconnect both ends exchange, per channel, the
//! bytes they have received ([`ChannelState`]) and each replays the rest, so
//! the reader gets every byte exactly once, in order.

mod reader;
mod writer;

pub use reader::ChannelReader;
use writer::TxState;
pub use writer::{ChannelWriter, WriterProgress};

use crate::conn::{Link, OutTx};
use crate::protocol::{
    ChannelClose, ChannelState, ErrorBody, ErrorCode, Frame, MAX_FRAME_PAYLOAD, Message,
    StreamKind, Window,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Largest window a peer may ask for (bounds what one channel may buffer).
pub const MAX_WINDOW: u64 = 16 * 1024 * 1024;
/// Received payloads shorter than this are copied out of the connection's
/// read buffer (see [`Channels::on_frame`]).
const COPY_BELOW: usize = 16 * 1024;

/// Smallest window: room for one gap marker (an 8-byte count).
pub const MIN_WINDOW: u64 = 8;

/// What a channel's reader receives.
#[derive(Debug)]
pub enum Inbound {
    Data(StreamKind, Bytes),
    /// The peer will send no more data on this channel.
    Eof,
    /// The peer closed the channel (exit code or error).
    Close(ChannelClose),
}

#[derive(Debug, thiserror::Error)]
#[error("channel {0} is closed")]
pub struct ChannelGone(pub u32);

/// Where our side of a channel stands (see [`Channels::outbound`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendState {
    pub channel: u32,
    /// The lowest offset we can still send again.
    pub from: u64,
    pub sent: u64,
    pub tag: Option<Arc<str>>,
    /// The opening request's label, kept for the peer (`hello.open`).
    pub label: Option<Arc<str>>,
}

struct Entry {
    /// Where inbound data for this channel goes.
    inbox: mpsc::UnboundedSender<Inbound>,
    /// Bytes received so far (next expected offset).
    received: u64,
    /// What we acknowledged and the highest offset we allowed the peer to
    /// send, shared with the reader.
    grant: Arc<reader::Grant>,
    /// Credit the peer granted to our writer.
    credit: watch::Sender<u64>,
    /// Our outbound side, shared with the writer.
    tx: Arc<Mutex<TxState>>,
    /// Cancelled when the channel closes for any reason.
    cancel: CancellationToken,
    /// What the channel carries (for an exec: its worker), for as long as
    /// the channel lives: until the peer has its close.
    tag: Option<Arc<str>>,
    label: Option<Arc<str>>,
    /// The peer's end of data was delivered: a repeated `channel_eof` is
    /// dropped, so a peer cannot fill the inbox with them (nothing else
    /// bounds it; data is bounded by the grant).
    eof: bool,
}

/// The channels of one peer, across its connections. A mutex rather than an
/// owner task: every operation is a short map update, called from the read
/// loop and from channel tasks.
pub struct Channels {
    map: Mutex<HashMap<u32, Entry>>,
    link: Arc<Link>,
}

/// The three handles of an open channel.
pub struct ChannelHandles {
    pub writer: ChannelWriter,
    pub reader: ChannelReader,
    pub cancel: CancellationToken,
}

/// Channels that the peer did not know when a connection resumed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Still running here but unknown to the peer: they were cancelled.
    pub lost: Vec<u32>,
}

impl Channels {
    pub fn new(link: Arc<Link>) -> Self {
        Channels {
            map: Mutex::new(HashMap::new()),
            link,
        }
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Opens `id` with `window` bytes of credit in both directions.
    pub fn open(&self, id: u32, window: u64) -> Result<ChannelHandles, ErrorBody> {
        self.open_at(id, window, 0, 0)
    }

    /// Opens `id` as if `received` bytes had already come in and `sent`
    /// bytes had gone out (adopting a channel after a restart).
    pub fn open_at(
        &self,
        id: u32,
        window: u64,
        received: u64,
        sent: u64,
    ) -> Result<ChannelHandles, ErrorBody> {
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "channel {id}: window must be between {MIN_WINDOW} and {MAX_WINDOW} bytes, got {window}"
                ),
            ));
        }
        let mut map = self.map.lock().unwrap();
        if map.contains_key(&id) {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!("channel {id} is already open"),
            ));
        }
        let (inbox, rx) = mpsc::unbounded_channel();
        let grant = reader::Grant::new(received, received + window);
        let (credit, credit_rx) = watch::channel(sent + window);
        let tx = Arc::new(Mutex::new(TxState {
            sent,
            ..TxState::default()
        }));
        let cancel = CancellationToken::new();
        map.insert(
            id,
            Entry {
                inbox,
                received,
                grant: grant.clone(),
                credit,
                tx: tx.clone(),
                cancel: cancel.clone(),
                tag: None,
                label: None,
                eof: false,
            },
        );
        Ok(ChannelHandles {
            writer: ChannelWriter {
                channel: id,
                limit: credit_rx,
                tx,
                link: self.link.clone(),
            },
            reader: ChannelReader {
                channel: id,
                rx,
                consumed: received,
                acked: received,
                manual: false,
                window,
                grant,
                link: self.link.clone(),
            },
            cancel: cancel.clone(),
        })
    }

    pub fn is_open(&self, id: u32) -> bool {
        self.map.lock().unwrap().contains_key(&id)
    }

    /// Routes an inbound data frame. Data we already have (a replay
    /// overlapping what arrived before a cut) is dropped; a gap or an overrun
    /// is a protocol error: the caller closes the channel with it.
    pub fn on_frame(&self, frame: Frame) -> Result<(), ErrorBody> {
        let mut map = self.map.lock().unwrap();
        let Some(e) = map.get_mut(&frame.channel) else {
            // Data racing a close is normal; drop it.
            return Ok(());
        };
        let Some(end) = frame.offset.checked_add(frame.payload.len() as u64) else {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "channel {}: frame offset {} overflows",
                    frame.channel, frame.offset
                ),
            ));
        };
        if end <= e.received {
            return Ok(()); // duplicate
        }
        if frame.offset > e.received {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "channel {}: frame at offset {} but {} bytes received so far",
                    frame.channel, frame.offset, e.received
                ),
            ));
        }
        let granted = e.grant.limit.load(Ordering::Acquire);
        if end > granted {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "channel {}: sent up to offset {end} beyond the granted limit {granted}",
                    frame.channel
                ),
            ));
        }
        let skip = (e.received - frame.offset) as usize;
        e.received = end;
        // A payload is a slice of the connection's read buffer; a small one
        // waiting in a stalled channel would keep that whole buffer (and
        // every other channel's bytes in it) alive: small ones are copied.
        let payload = frame.payload.slice(skip..);
        let payload = if payload.len() < COPY_BELOW {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        let _ = e.inbox.send(Inbound::Data(frame.stream, payload));
        Ok(())
    }

    /// The peer acknowledged `w.acked` and allows up to `w.limit`. A limit
    /// is taken only up to [`MAX_WINDOW`] past what the peer acknowledged
    /// (at most what we sent): what we keep for a replay stays bounded
    /// whatever limit a peer names.
    pub fn on_window(&self, w: Window) {
        if let Some(e) = self.map.lock().unwrap().get(&w.channel) {
            let mut tx = e.tx.lock().unwrap();
            tx.trim(w.acked);
            raise_credit(&e.credit, w.limit, w.acked.min(tx.sent));
        }
    }

    /// The peer's end of data, delivered once.
    pub fn on_eof(&self, id: u32) {
        if let Some(e) = self.map.lock().unwrap().get_mut(&id)
            && !std::mem::replace(&mut e.eof, true)
        {
            let _ = e.inbox.send(Inbound::Eof);
        }
    }

    /// The peer closed the channel: deliver the close and forget it. Answers
    /// with a close of our own unless we had sent one, so the peer can
    /// forget the channel too. Returns whether the channel was open.
    pub fn on_close(&self, close: ChannelClose) -> bool {
        let Some(e) = self.map.lock().unwrap().remove(&close.channel) else {
            return false;
        };
        let ours = e.tx.lock().unwrap().close.is_some();
        if !ours {
            self.link.send_msg(&Message::ChannelClose(ChannelClose {
                channel: close.channel,
                exit_code: None,
                error: None,
            }));
        }
        let _ = e.inbox.send(Inbound::Close(close));
        e.cancel.cancel();
        true
    }

    /// Closes a channel from our side: tells the peer (replayed if the
    /// connection drops first) and stops local tasks. The entry stays until
    /// the peer's answering close, so the close survives a reconnect.
    pub fn close(&self, close: ChannelClose) {
        let map = self.map.lock().unwrap();
        if let Some(e) = map.get(&close.channel) {
            let mut tx = e.tx.lock().unwrap();
            if tx.close.is_none() {
                self.link.send_msg(&Message::ChannelClose(close.clone()));
                tx.close = Some(close);
            }
            e.cancel.cancel();
        }
    }

    /// A binary message from the peer: a frame for its channel. A frame
    /// that cannot be taken (malformed, too large, beyond the credit given)
    /// ends its channel on both ends with the error: the local reader sees
    /// it and the peer gets a `channel_close` carrying it. One for no open
    /// channel gets a connection-level `error`. Returns the error, if any.
    pub fn on_binary(&self, data: Bytes) -> Result<(), ErrorBody> {
        let channel = Frame::peek_channel(&data);
        let result = Frame::decode(data, MAX_FRAME_PAYLOAD)
            .map_err(|e| {
                let code = match e {
                    crate::protocol::FrameError::TooLarge { .. } => ErrorCode::TooLarge,
                    _ => ErrorCode::InvalidRequest,
                };
                ErrorBody::new(code, e.to_string())
            })
            .and_then(|f| self.on_frame(f));
        let Err(error) = result else {
            return Ok(());
        };
        let entry = channel.and_then(|c| self.map.lock().unwrap().remove(&c).map(|e| (c, e)));
        match entry {
            Some((channel, e)) => {
                let close = ChannelClose {
                    channel,
                    exit_code: None,
                    error: Some(error.clone()),
                };
                self.link.send_msg(&Message::ChannelClose(close.clone()));
                let _ = e.inbox.send(Inbound::Close(close));
                e.cancel.cancel();
            }
            None => {
                self.link.send_msg(&Message::Error {
                    id: None,
                    error: error.clone(),
                });
            }
        }
        Err(error)
    }

    /// Forgets a channel without telling the peer.
    pub fn remove(&self, id: u32) {
        if let Some(e) = self.map.lock().unwrap().remove(&id) {
            e.cancel.cancel();
        }
    }

    /// Every channel ends with `error` (the peer is gone for good).
    pub fn close_all(&self, error: ErrorBody) {
        for (id, e) in self.map.lock().unwrap().drain() {
            let _ = e.inbox.send(Inbound::Close(ChannelClose {
                channel: id,
                exit_code: None,
                error: Some(error.clone()),
            }));
            e.cancel.cancel();
        }
    }

    /// Notes what a channel carries, and the label its opener gave it
    /// ([`Channels::outbound`] reports both).
    pub fn set_tag(&self, id: u32, tag: &str, label: Option<&str>) {
        if let Some(e) = self.map.lock().unwrap().get_mut(&id) {
            e.tag = Some(tag.into());
            e.label = label.map(Into::into);
        }
    }

    /// For each channel, the lowest offset we can still replay (everything
    /// before it was acknowledged), the bytes sent so far and its tag.
    pub fn outbound(&self) -> Vec<SendState> {
        let map = self.map.lock().unwrap();
        let mut v: Vec<SendState> = map
            .iter()
            .map(|(id, e)| {
                let tx = e.tx.lock().unwrap();
                SendState {
                    channel: *id,
                    from: tx.unacked.front().map(|f| f.offset).unwrap_or(tx.sent),
                    sent: tx.sent,
                    tag: e.tag.clone(),
                    label: e.label.clone(),
                }
            })
            .collect();
        v.sort_unstable_by_key(|s| s.channel);
        v
    }

    /// What we have received on each channel: sent to the peer on reconnect.
    pub fn states(&self) -> Vec<ChannelState> {
        let mut v: Vec<ChannelState> = self
            .map
            .lock()
            .unwrap()
            .iter()
            .map(|(id, e)| ChannelState {
                channel: *id,
                received: e.received,
                limit: e.grant.limit.load(Ordering::Acquire),
            })
            .collect();
        v.sort_by_key(|s| s.channel);
        v
    }

    /// Resumes on a new connection `out`: for each channel the peer still
    /// has, replays what it has not received and takes its credit; channels
    /// it does not know are ended (`keep` exempts channels whose opening
    /// request is still in flight). The link switches to `out` while every
    /// writer is held, so no new frame overtakes the replay.
    pub fn resume(&self, peer: &[ChannelState], keep: impl Fn(u32) -> bool, out: OutTx) -> Resumed {
        let peer: HashMap<u32, &ChannelState> = peer.iter().map(|s| (s.channel, s)).collect();
        let mut map = self.map.lock().unwrap();
        let txs: Vec<(u32, Arc<Mutex<TxState>>)> =
            map.iter().map(|(id, e)| (*id, e.tx.clone())).collect();
        let guards: Vec<_> = txs.iter().map(|(id, t)| (*id, t.lock().unwrap())).collect();
        self.link.set(Some(out));
        let mut gone = Vec::new();
        let mut lost = Vec::new();
        for (id, tx) in &guards {
            let e = &map[id];
            match peer.get(id) {
                Some(s) => {
                    tx.replay(*id, s.received, &self.link);
                    // Our latest grant: read after the switch, so one made
                    // since our handshake state either shows here or goes
                    // out on this link itself.
                    self.link.send_msg(&Message::Window(e.grant.window(*id)));
                    raise_credit(&e.credit, s.limit, s.received.min(tx.sent));
                }
                None if keep(*id) => {}
                None => {
                    gone.push(*id);
                    // Closed on our side already: the peer simply forgot it.
                    if tx.close.is_none() {
                        lost.push(*id);
                        let _ = e.inbox.send(Inbound::Close(ChannelClose {
                            channel: *id,
                            exit_code: None,
                            error: Some(ErrorBody::new(
                                ErrorCode::Unavailable,
                                "the peer lost this channel (it restarted)",
                            )),
                        }));
                    }
                }
            }
        }
        drop(guards);
        for id in gone {
            if let Some(e) = map.remove(&id) {
                e.cancel.cancel();
            }
        }
        lost.sort_unstable();
        Resumed { lost }
    }
}

/// Raises our writer's credit to the peer's `limit`, never more than
/// [`MAX_WINDOW`] past `base` (what the peer has, by its own word).
fn raise_credit(credit: &watch::Sender<u64>, limit: u64, base: u64) {
    let limit = limit.min(base.saturating_add(MAX_WINDOW));
    credit.send_if_modified(|l| {
        let raise = limit > *l;
        if raise {
            *l = limit;
        }
        raise
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Outbound;
    use crate::protocol::ChannelEof;

    fn frame(channel: u32, offset: u64, n: usize) -> Frame {
        Frame {
            channel,
            stream: StreamKind::Stdout,
            offset,
            payload: Bytes::from(vec![b'x'; n]),
        }
    }

    fn connected() -> (Channels, mpsc::UnboundedReceiver<Outbound>) {
        let (out, rx) = mpsc::unbounded_channel();
        let link = Link::new();
        link.set(Some(out));
        (Channels::new(link), rx)
    }

    #[tokio::test]
    async fn a_bad_frame_ends_its_channel_with_the_error_on_both_ends() {
        let (ch, mut out_rx) = connected();
        let mut h = ch.open(3, 8).unwrap();
        // Beyond the 8 bytes of credit granted.
        let err = ch.on_binary(frame(3, 0, 10).encode()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        // The peer is told, with the error.
        let Some(Outbound::Text(t)) = out_rx.recv().await else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["type"], "channel_close");
        assert_eq!(v["payload"]["channel"], 3);
        assert_eq!(v["payload"]["error"]["code"], "invalid_request");
        // The local reader sees the same error, and the work is cancelled.
        match h.reader.recv().await {
            Some(Inbound::Close(c)) => assert_eq!(c.error, Some(err)),
            other => panic!("{other:?}"),
        }
        assert!(h.cancel.is_cancelled());
        assert!(!ch.is_open(3));
        // A bad frame for no open channel is a connection-level error.
        ch.on_binary(Bytes::from_static(b"\x00\x00")).unwrap_err();
        let Some(Outbound::Text(t)) = out_rx.recv().await else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["type"], "error");
        assert!(v["id"].is_null(), "{v}");
    }

    #[tokio::test]
    async fn writer_stops_at_credit_and_resumes_on_window() {
        let (ch, mut out_rx) = connected();
        let mut h = ch.open(1, 10).unwrap();
        let task = tokio::spawn(async move {
            h.writer
                .write(StreamKind::Stdout, Bytes::from(vec![1u8; 25]))
                .await
                .unwrap();
            h.writer.offset()
        });
        // Only 10 bytes may go before credit arrives.
        let Some(Outbound::Binary(b)) = out_rx.recv().await else {
            panic!()
        };
        assert_eq!(b.len(), 13 + 10);
        tokio::task::yield_now().await;
        assert!(out_rx.try_recv().is_err(), "writer must wait for credit");
        ch.on_window(Window {
            channel: 1,
            acked: 10,
            limit: 40,
        });
        let Some(Outbound::Binary(b)) = out_rx.recv().await else {
            panic!()
        };
        assert_eq!(Frame::decode(b, 1 << 20).unwrap().offset, 10);
        assert_eq!(task.await.unwrap(), 25);
    }

    #[tokio::test]
    async fn reader_grants_duplicates_dropped_and_overrun_refused() {
        let (ch, mut out_rx) = connected();
        let mut h = ch.open(2, 8).unwrap();
        ch.on_frame(frame(2, 0, 5)).unwrap();
        // A replay of what we have is dropped, a gap and an overrun are errors.
        ch.on_frame(frame(2, 0, 5)).unwrap();
        assert!(ch.on_frame(frame(2, 9, 1)).is_err());
        assert!(ch.on_frame(frame(2, 5, 4)).is_err());
        let Some(Inbound::Data(_, b)) = h.reader.recv().await else {
            panic!()
        };
        assert_eq!(b.len(), 5);
        // 5 of 8 consumed: more than half used, a window goes out.
        let Some(Outbound::Text(t)) = out_rx.recv().await else {
            panic!()
        };
        assert_eq!(
            Message::decode(&t).unwrap(),
            Message::Window(Window {
                channel: 2,
                acked: 5,
                limit: 13
            })
        );
        // Overlapping replay: only the new part is delivered.
        ch.on_frame(frame(2, 3, 6)).unwrap();
        let Some(Inbound::Data(_, b)) = h.reader.recv().await else {
            panic!()
        };
        assert_eq!(b.len(), 4);
        assert_eq!(
            ch.states(),
            vec![ChannelState {
                channel: 2,
                received: 9,
                limit: 17
            }]
        );
    }

    #[tokio::test]
    async fn resume_replays_exactly_what_the_peer_missed() {
        let (ch, mut out_rx) = connected();
        let mut h = ch.open(3, 100).unwrap();
        h.writer
            .write(StreamKind::Stdout, Bytes::from(vec![7u8; 30]))
            .await
            .unwrap();
        h.writer.eof();
        ch.on_window(Window {
            channel: 3,
            acked: 10,
            limit: 110,
        });
        assert_eq!(h.writer.unacked(), 30, "the one frame reaches past 10");
        while out_rx.try_recv().is_ok() {}
        // Reconnect: the peer got 20 bytes.
        let (out2, mut rx2) = mpsc::unbounded_channel();
        let r = ch.resume(
            &[ChannelState {
                channel: 3,
                received: 20,
                limit: 120,
            }],
            |_| false,
            out2,
        );
        assert_eq!(r, Resumed::default());
        let Some(Outbound::Binary(b)) = rx2.recv().await else {
            panic!()
        };
        let f = Frame::decode(b, 1 << 20).unwrap();
        assert_eq!((f.offset, f.payload.len()), (20, 10));
        let Some(Outbound::Text(t)) = rx2.recv().await else {
            panic!()
        };
        assert_eq!(
            Message::decode(&t).unwrap(),
            Message::ChannelEof(ChannelEof { channel: 3 })
        );
        assert_eq!(*h.writer.limit.borrow(), 120);
    }

    #[tokio::test]
    async fn resume_ends_channels_the_peer_lost() {
        let (ch, _rx) = connected();
        let mut a = ch.open(4, 10).unwrap();
        let _b = ch.open(5, 10).unwrap();
        let (out2, _rx2) = mpsc::unbounded_channel();
        let r = ch.resume(&[], |id| id == 5, out2);
        assert_eq!(r.lost, vec![4]);
        assert!(matches!(a.reader.recv().await, Some(Inbound::Close(c)) if c.error.is_some()));
        assert!(a.cancel.is_cancelled());
        assert!(ch.is_open(5));
    }

    #[tokio::test]
    async fn writes_while_disconnected_wait_in_the_replay_buffer() {
        let link = Link::new();
        let ch = Channels::new(link.clone());
        let mut h = ch.open(6, 100).unwrap();
        h.writer
            .write(StreamKind::Stderr, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let (out, mut rx) = mpsc::unbounded_channel();
        ch.resume(
            &[ChannelState {
                channel: 6,
                received: 0,
                limit: 100,
            }],
            |_| false,
            out,
        );
        let Some(Outbound::Binary(b)) = rx.recv().await else {
            panic!()
        };
        let f = Frame::decode(b, 1 << 20).unwrap();
        assert_eq!(
            (f.stream, &f.payload[..]),
            (StreamKind::Stderr, &b"hello"[..])
        );
    }

    /// The consumer reads on while the link is down: the grant it makes is
    /// newer than the state the handshake carried, and it must still reach
    /// the peer, or the peer's writer waits for credit already given.
    #[tokio::test]
    async fn a_grant_made_while_disconnected_reaches_the_peer_on_resume() {
        let (ch, _old) = connected();
        let mut h = ch.open(4, 100).unwrap();
        for offset in [0, 30, 60] {
            ch.on_frame(frame(4, offset, 30)).unwrap();
        }
        // The link drops; the handshake state is taken (limit 100)...
        ch.link().set(None);
        let handshake = ch.states();
        assert_eq!(handshake[0].limit, 100);
        // ...then the consumer takes what was already delivered: a grant
        // to 160 that no connection carries.
        for _ in 0..3 {
            assert!(matches!(h.reader.recv().await, Some(Inbound::Data(..))));
        }
        let (out, mut rx) = mpsc::unbounded_channel();
        ch.resume(
            &[ChannelState {
                channel: 4,
                received: 0,
                limit: 100,
            }],
            |_| false,
            out,
        );
        let Ok(Outbound::Text(t)) = rx.try_recv() else {
            panic!("a window after the resume")
        };
        match Message::decode(&t).unwrap() {
            Message::Window(w) => assert_eq!(
                (w.channel, w.acked, w.limit),
                (4, 90, 160),
                "the latest grant"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_repeated_eof_is_delivered_once() {
        let (ch, _rx) = connected();
        let mut h = ch.open(7, MIN_WINDOW).unwrap();
        for _ in 0..1000 {
            ch.on_eof(7);
        }
        ch.on_close(ChannelClose {
            channel: 7,
            exit_code: Some(0),
            error: None,
        });
        assert!(matches!(h.reader.recv().await, Some(Inbound::Eof)));
        assert!(matches!(h.reader.recv().await, Some(Inbound::Close(_))));
    }

    #[tokio::test]
    async fn a_peer_cannot_grant_more_than_a_window_past_its_acknowledgement() {
        let (ch, _rx) = connected();
        let h = ch.open(7, MIN_WINDOW).unwrap();
        ch.on_window(Window {
            channel: 7,
            acked: 0,
            limit: u64::MAX,
        });
        assert_eq!(*h.writer.limit.borrow(), MAX_WINDOW);
        // An acknowledgement beyond what was sent counts as what was sent.
        ch.on_window(Window {
            channel: 7,
            acked: 1 << 40,
            limit: u64::MAX,
        });
        assert_eq!(*h.writer.limit.borrow(), MAX_WINDOW);
    }

    #[tokio::test]
    async fn close_all_ends_readers_and_writers() {
        let (ch, _rx) = connected();
        let mut h = ch.open(7, MIN_WINDOW).unwrap();
        ch.close_all(ErrorBody::new(ErrorCode::Unavailable, "gone"));
        assert!(matches!(h.reader.recv().await, Some(Inbound::Close(c)) if c.error.is_some()));
        assert!(
            h.writer
                .write(StreamKind::Stdout, Bytes::from_static(b"a"))
                .await
                .is_err()
        );
        assert!(h.cancel.is_cancelled());
    }

    proptest::proptest! {
        /// Arbitrary frames and windows: no panic, nothing beyond the granted
        /// limit is accepted, and what is delivered is exactly what was
        /// accepted, in order.
        #[test]
        fn frames_and_windows_keep_the_invariants(
            ops in proptest::collection::vec((0u64..200, 0usize..80, proptest::bool::ANY), 0..60)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let (ch, _rx) = connected();
                let mut h = ch.open(1, 64).unwrap();
                let mut accepted = 0u64;
                for (offset, len, is_window) in ops {
                    if is_window {
                        ch.on_window(Window { channel: 1, acked: offset, limit: offset + len as u64 });
                        continue;
                    }
                    let before = ch.states()[0].received;
                    if ch.on_frame(frame(1, offset, len)).is_ok() {
                        let after = ch.states()[0].received;
                        proptest::prop_assert!(after >= before);
                        accepted = after;
                    }
                    let s = ch.states()[0];
                    proptest::prop_assert!(s.received <= s.limit);
                }
                let mut delivered = 0u64;
                while let Ok(Some(Inbound::Data(_, b))) =
                    tokio::time::timeout(std::time::Duration::from_millis(1), h.reader.recv()).await
                {
                    delivered += b.len() as u64;
                }
                proptest::prop_assert_eq!(delivered, accepted);
                Ok(())
            })?;
        }
    }
}
