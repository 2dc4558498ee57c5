//! Channel multiplexing with per-channel credit-based flow control, shared by
//! the agent and the server.
//!
//! Each end keeps a [`Channels`] registry. A [`ChannelWriter`] sends binary
//! frames only up to the `limit` the peer granted (waiting otherwise), so a
//! channel whose reader stalls stops its writer and nothing else. A
//! [`ChannelReader`] hands data to its consumer and grants new credit as the
//! consumer takes it, so the data queued for a channel never exceeds its
//! window.

use crate::protocol::{
    ChannelClose, ErrorBody, ErrorCode, Frame, MAX_FRAME_PAYLOAD, Message, StreamKind, Window,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Largest window a peer may ask for (bounds what one channel may queue).
pub const MAX_WINDOW: u64 = 16 * 1024 * 1024;

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

/// Queue feeding the connection's writer. Unbounded on purpose: data frames
/// are bounded by channel credit, control messages are small and few.
pub type OutTx = mpsc::UnboundedSender<Outbound>;

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

struct Entry {
    /// Where inbound data for this channel goes.
    inbox: mpsc::UnboundedSender<Inbound>,
    /// Bytes received so far (next expected offset).
    received: u64,
    /// Highest offset we allowed the peer to send, shared with the reader.
    granted: Arc<AtomicU64>,
    /// Credit the peer granted to our writer.
    credit: watch::Sender<u64>,
    /// Cancelled when the channel closes for any reason.
    cancel: CancellationToken,
}

/// The channels of one connection. A mutex rather than an owner task: every
/// operation is a short map update, called from the connection's read loop and
/// from channel tasks.
#[derive(Default)]
pub struct Channels {
    map: Mutex<HashMap<u32, Entry>>,
}

/// The three handles of an open channel.
pub struct ChannelHandles {
    pub writer: ChannelWriter,
    pub reader: ChannelReader,
    pub cancel: CancellationToken,
}

impl Channels {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Opens `id` with `window` bytes of credit in both directions.
    pub fn open(&self, id: u32, window: u64, out: OutTx) -> Result<ChannelHandles, ErrorBody> {
        if !(1..=MAX_WINDOW).contains(&window) {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "channel {id}: window must be between 1 and {MAX_WINDOW} bytes, got {window}"
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
        let granted = Arc::new(AtomicU64::new(window));
        let (credit, credit_rx) = watch::channel(window);
        let cancel = CancellationToken::new();
        map.insert(
            id,
            Entry {
                inbox,
                received: 0,
                granted: granted.clone(),
                credit,
                cancel: cancel.clone(),
            },
        );
        Ok(ChannelHandles {
            writer: ChannelWriter {
                channel: id,
                offset: 0,
                limit: credit_rx,
                out: out.clone(),
            },
            reader: ChannelReader {
                channel: id,
                rx,
                consumed: 0,
                window,
                granted,
                out,
            },
            cancel: cancel.clone(),
        })
    }

    pub fn is_open(&self, id: u32) -> bool {
        self.map.lock().unwrap().contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Routes an inbound data frame. An error means the peer broke the
    /// protocol on this channel; the caller closes the channel with it.
    pub fn on_frame(&self, frame: Frame) -> Result<(), ErrorBody> {
        let mut map = self.map.lock().unwrap();
        let Some(e) = map.get_mut(&frame.channel) else {
            // Data racing a close is normal; drop it.
            return Ok(());
        };
        if frame.offset != e.received {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "channel {}: frame at offset {} but {} bytes received so far",
                    frame.channel, frame.offset, e.received
                ),
            ));
        }
        let end = e.received + frame.payload.len() as u64;
        let granted = e.granted.load(Ordering::Acquire);
        if end > granted {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "channel {}: sent up to offset {end} beyond the granted limit {granted}",
                    frame.channel
                ),
            ));
        }
        e.received = end;
        let _ = e.inbox.send(Inbound::Data(frame.stream, frame.payload));
        Ok(())
    }

    pub fn on_window(&self, w: Window) {
        if let Some(e) = self.map.lock().unwrap().get(&w.channel) {
            e.credit.send_if_modified(|l| {
                let raise = w.limit > *l;
                if raise {
                    *l = w.limit;
                }
                raise
            });
        }
    }

    pub fn on_eof(&self, id: u32) {
        if let Some(e) = self.map.lock().unwrap().get(&id) {
            let _ = e.inbox.send(Inbound::Eof);
        }
    }

    /// The peer closed the channel: deliver the close and forget it.
    pub fn on_close(&self, close: ChannelClose) {
        if let Some(e) = self.map.lock().unwrap().remove(&close.channel) {
            let _ = e.inbox.send(Inbound::Close(close));
            e.cancel.cancel();
        }
    }

    /// Forgets a channel we closed ourselves; wakes its writer and tasks.
    pub fn remove(&self, id: u32) {
        if let Some(e) = self.map.lock().unwrap().remove(&id) {
            e.cancel.cancel();
        }
    }

    /// The connection is gone: every channel ends with `error`.
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
}

/// Sends one direction of a channel, within the peer's credit.
pub struct ChannelWriter {
    channel: u32,
    offset: u64,
    limit: watch::Receiver<u64>,
    out: OutTx,
}

impl ChannelWriter {
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// Bytes sent so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Sends `data`, split into frames, waiting for credit as needed. Fails
    /// once the channel or the connection is gone.
    pub async fn write(&mut self, stream: StreamKind, mut data: Bytes) -> Result<(), ChannelGone> {
        while !data.is_empty() {
            // `wait_for` still succeeds on the last value after the channel
            // is gone: check for that first.
            if self.limit.has_changed().is_err() {
                return Err(ChannelGone(self.channel));
            }
            let sent = self.offset;
            let limit = *self
                .limit
                .wait_for(|l| *l > sent)
                .await
                .map_err(|_| ChannelGone(self.channel))?;
            let n = data
                .len()
                .min((limit - sent) as usize)
                .min(MAX_FRAME_PAYLOAD);
            let frame = Frame {
                channel: self.channel,
                stream,
                offset: sent,
                payload: data.split_to(n),
            };
            self.out
                .send(Outbound::Binary(frame.encode()))
                .map_err(|_| ChannelGone(self.channel))?;
            self.offset += n as u64;
        }
        Ok(())
    }

    /// Queues a control message for the same connection (keeps ordering with data).
    pub fn send(&self, m: &Message) -> Result<(), ChannelGone> {
        self.out
            .send(Outbound::msg(m))
            .map_err(|_| ChannelGone(self.channel))
    }
}

/// Receives one direction of a channel and grants credit as it is consumed.
pub struct ChannelReader {
    channel: u32,
    rx: mpsc::UnboundedReceiver<Inbound>,
    consumed: u64,
    window: u64,
    granted: Arc<AtomicU64>,
    out: OutTx,
}

impl ChannelReader {
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// Next event; `None` once the channel is gone without a close.
    pub async fn recv(&mut self) -> Option<Inbound> {
        let item = self.rx.recv().await?;
        if let Inbound::Data(_, ref b) = item {
            self.consumed += b.len() as u64;
            let granted = self.granted.load(Ordering::Acquire);
            // Re-grant once half the window is used: few window messages, no stall.
            if granted - self.consumed <= self.window / 2 {
                let limit = self.consumed.saturating_add(self.window);
                self.granted.store(limit, Ordering::Release);
                let _ = self.out.send(Outbound::msg(&Message::Window(Window {
                    channel: self.channel,
                    acked: self.consumed,
                    limit,
                })));
            }
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(channel: u32, offset: u64, n: usize) -> Frame {
        Frame {
            channel,
            stream: StreamKind::Stdout,
            offset,
            payload: Bytes::from(vec![b'x'; n]),
        }
    }

    #[tokio::test]
    async fn writer_stops_at_credit_and_resumes_on_window() {
        let (out, mut out_rx) = mpsc::unbounded_channel();
        let ch = Channels::new();
        let mut h = ch.open(1, 10, out).unwrap();
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
    async fn reader_grants_and_overrun_is_refused() {
        let (out, mut out_rx) = mpsc::unbounded_channel();
        let ch = Channels::new();
        let mut h = ch.open(2, 8, out).unwrap();
        ch.on_frame(frame(2, 0, 5)).unwrap();
        // Out-of-order offset and overrun are protocol errors.
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
        ch.on_frame(frame(2, 5, 8)).unwrap();
    }

    #[tokio::test]
    async fn close_all_ends_readers_and_writers() {
        let (out, _out_rx) = mpsc::unbounded_channel();
        let ch = Channels::new();
        let mut h = ch.open(3, 1, out).unwrap();
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
}
