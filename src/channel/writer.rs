//! The sending side of a channel: frames within the peer's credit, kept
//! for replay until acknowledged.

use super::ChannelGone;
use crate::conn::{Link, Outbound};
use crate::protocol::{ChannelClose, ChannelEof, Frame, MAX_FRAME_PAYLOAD, Message, StreamKind};
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The sending side of a channel, replayable.
#[derive(Default)]
pub(super) struct TxState {
    /// Sent frames not yet acknowledged, in offset order.
    pub(super) unacked: VecDeque<Frame>,
    /// Bytes sent so far.
    pub(super) sent: u64,
    /// We sent `channel_eof` (replayed after the data).
    pub(super) eof: bool,
    /// We sent `channel_close` (replayed after the data).
    pub(super) close: Option<ChannelClose>,
}

impl TxState {
    pub(super) fn trim(&mut self, acked: u64) {
        while let Some(f) = self.unacked.front() {
            if f.offset + f.payload.len() as u64 <= acked {
                self.unacked.pop_front();
            } else {
                break;
            }
        }
    }

    /// Re-sends everything from `from` on, then the eof and close if any.
    pub(super) fn replay(&self, channel: u32, from: u64, link: &Link) {
        for f in &self.unacked {
            let end = f.offset + f.payload.len() as u64;
            if end <= from {
                continue;
            }
            let skip = from.saturating_sub(f.offset) as usize;
            let frame = Frame {
                channel,
                stream: f.stream,
                offset: f.offset + skip as u64,
                payload: f.payload.slice(skip..),
            };
            link.send(Outbound::Binary(frame.encode()));
        }
        if self.eof {
            link.send_msg(&Message::ChannelEof(ChannelEof { channel }));
        }
        if let Some(c) = &self.close {
            link.send_msg(&Message::ChannelClose(c.clone()));
        }
    }
}

/// Sends one direction of a channel, within the peer's credit.
pub struct ChannelWriter {
    pub(super) channel: u32,
    pub(super) limit: watch::Receiver<u64>,
    pub(super) tx: Arc<Mutex<TxState>>,
    pub(super) link: Arc<Link>,
}

impl ChannelWriter {
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// Bytes sent so far.
    pub fn offset(&self) -> u64 {
        self.tx.lock().unwrap().sent
    }

    /// Sends `data`, split into frames, waiting for credit as needed (also
    /// while disconnected). Fails once the channel is gone.
    pub async fn write(&mut self, stream: StreamKind, mut data: Bytes) -> Result<(), ChannelGone> {
        while !data.is_empty() {
            self.credit(1).await?;
            self.send_available(stream, &mut data);
        }
        Ok(())
    }

    /// Credit left: bytes that may be sent now.
    pub fn available(&self) -> u64 {
        let limit = *self.limit.borrow();
        limit.saturating_sub(self.offset())
    }

    /// Waits until at least `need` bytes of credit are available (also
    /// while disconnected). Cancel-safe. Fails once the channel is gone.
    pub async fn credit(&mut self, need: u64) -> Result<(), ChannelGone> {
        // `wait_for` still succeeds on the last value after the channel is
        // gone: check for that first.
        if self.limit.has_changed().is_err() {
            return Err(ChannelGone(self.channel));
        }
        // Only this writer moves `sent`: it cannot change while we wait.
        let sent = self.offset();
        self.limit
            .wait_for(|l| l.saturating_sub(sent) >= need)
            .await
            .map(|_| ())
            .map_err(|_| ChannelGone(self.channel))
    }

    /// Sends as much of `data` as the credit allows, without waiting, and
    /// leaves the rest in `data`. Returns the bytes sent.
    pub fn send_available(&mut self, stream: StreamKind, data: &mut Bytes) -> usize {
        let mut total = 0;
        loop {
            let n = data
                .len()
                .min(self.available() as usize)
                .min(MAX_FRAME_PAYLOAD);
            if n == 0 {
                return total;
            }
            // Under the lock, so a resume's replay cannot interleave.
            let mut tx = self.tx.lock().unwrap();
            let frame = Frame {
                channel: self.channel,
                stream,
                offset: tx.sent,
                payload: data.split_to(n),
            };
            self.link.send(Outbound::Binary(frame.encode()));
            tx.sent += n as u64;
            tx.unacked.push_back(frame);
            total += n;
        }
    }

    /// Signals end of data (replayed after a reconnect if need be).
    pub fn eof(&self) {
        let mut tx = self.tx.lock().unwrap();
        if !tx.eof {
            tx.eof = true;
            self.link.send_msg(&Message::ChannelEof(ChannelEof {
                channel: self.channel,
            }));
        }
    }

    /// A handle that tells how far the peer has acknowledged this writer's
    /// data, usable after the writer moved elsewhere.
    pub fn progress(&self) -> WriterProgress {
        WriterProgress(self.tx.clone())
    }

    /// Bytes sent but not yet acknowledged (what a resume would replay).
    pub fn unacked(&self) -> u64 {
        self.tx
            .lock()
            .unwrap()
            .unacked
            .iter()
            .map(|f| f.payload.len() as u64)
            .sum()
    }
}

/// How far the peer has acknowledged a [`ChannelWriter`]'s data.
#[derive(Clone)]
pub struct WriterProgress(Arc<Mutex<TxState>>);

impl WriterProgress {
    /// Every byte before this offset was acknowledged by the peer (a lower
    /// bound: frames are forgotten whole).
    pub fn acked(&self) -> u64 {
        let tx = self.0.lock().unwrap();
        tx.unacked.front().map(|f| f.offset).unwrap_or(tx.sent)
    }
}
