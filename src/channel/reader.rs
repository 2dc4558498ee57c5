//! The receiving side of a channel: data in order, credit granted as it
//! is consumed (or acknowledged).

use super::Inbound;
use crate::conn::Link;
use crate::protocol::{Message, Window};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// What a reader has acknowledged and granted, shared with the registry:
/// a resume repeats the latest grant, since one made while disconnected
/// (or after the state sent in the handshake) never reached the peer.
#[derive(Debug, Default)]
pub(super) struct Grant {
    pub(super) acked: AtomicU64,
    pub(super) limit: AtomicU64,
}

impl Grant {
    pub(super) fn new(acked: u64, limit: u64) -> Arc<Self> {
        Arc::new(Grant {
            acked: AtomicU64::new(acked),
            limit: AtomicU64::new(limit),
        })
    }

    /// The latest grant as a window message.
    pub(super) fn window(&self, channel: u32) -> Window {
        // Limit first: a grant in between repeats a newer acked, never an
        // older limit with it.
        let limit = self.limit.load(Ordering::Acquire);
        Window {
            channel,
            acked: self.acked.load(Ordering::Acquire),
            limit,
        }
    }
}

/// Receives one direction of a channel and grants credit as it is consumed
/// (or, in manual mode, as the final consumer acknowledges it).
pub struct ChannelReader {
    pub(super) channel: u32,
    pub(super) rx: mpsc::UnboundedReceiver<Inbound>,
    pub(super) consumed: u64,
    /// Acknowledged so far; the peer may drop its copy up to here.
    pub(super) acked: u64,
    /// Credit follows [`ChannelReader::ack`] instead of consumption.
    pub(super) manual: bool,
    pub(super) window: u64,
    pub(super) grant: Arc<Grant>,
    pub(super) link: Arc<Link>,
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
            if !self.manual {
                self.ack(self.consumed);
            }
        }
        Some(item)
    }

    /// Bytes handed out so far (the position in the channel's sequence).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Credit follows [`ChannelReader::ack`] from now on: the peer keeps
    /// (and can replay) everything not acknowledged, and sends at most one
    /// window beyond it.
    pub fn set_manual_ack(&mut self) {
        self.manual = true;
    }

    /// Acknowledges bytes up to `offset` (at most what was handed out).
    pub fn ack(&mut self, offset: u64) {
        self.ack_with(offset, false)
    }

    /// As [`ChannelReader::ack`], and the peer hears of it at once (it may
    /// then forget what it kept to send again), not only once half the
    /// window is used.
    pub fn ack_now(&mut self, offset: u64) {
        self.ack_with(offset, true)
    }

    fn ack_with(&mut self, offset: u64, now: bool) {
        let offset = offset.min(self.consumed);
        if offset <= self.acked {
            return;
        }
        self.acked = self.acked.max(offset);
        self.grant.acked.store(self.acked, Ordering::Release);
        let granted = self.grant.limit.load(Ordering::Acquire);
        // Re-grant once half the window is used: few window messages, no stall.
        if now || granted.saturating_sub(self.acked) <= self.window / 2 {
            let limit = self.acked.saturating_add(self.window);
            self.grant.limit.store(limit, Ordering::Release);
            self.link.send_msg(&Message::Window(Window {
                channel: self.channel,
                acked: self.acked,
                limit,
            }));
        }
    }
}
