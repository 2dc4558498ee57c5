//! The bookkeeping of an operator's exec stream, without I/O: the output a
//! client has not acknowledged yet (resent after a re-attach, or a gap
//! named exactly), output a re-attaching client already has, and the stdin
//! waiting for the agent's credit. `api/exec.rs` moves bytes; these decide
//! which ones.

use crate::protocol::StreamKind;
use bytes::Bytes;
use std::collections::VecDeque;

/// Output sent to a client that acknowledges it, kept until it does.
#[derive(Debug, Default)]
pub struct Relay {
    /// `(kind, offset of the first byte, bytes)`, in offset order.
    frames: VecDeque<(StreamKind, u64, Bytes)>,
}

/// What a client that re-attaches with some output gets first.
#[derive(Debug, PartialEq)]
pub struct Resume {
    /// Output it lacks that nobody has any more: `(from, to)`.
    pub gap: Option<(u64, u64)>,
    /// Output it lacks, to send again in order.
    pub resend: Vec<(StreamKind, Bytes)>,
    /// Everything below this offset is acknowledged.
    pub acked: u64,
}

impl Relay {
    /// Output sent at `offset`, to keep until acknowledged.
    pub fn sent(&mut self, kind: StreamKind, offset: u64, data: Bytes) {
        self.frames.push_back((kind, offset, data));
    }

    /// The client has everything below `offset`.
    pub fn ack(&mut self, offset: u64) {
        while self
            .frames
            .front()
            .is_some_and(|(_, off, b)| off + b.len() as u64 <= offset)
        {
            self.frames.pop_front();
        }
    }

    /// A client re-attaches having output up to `have`; `position` is the
    /// stream's offset (where kept output would begin if none is kept).
    pub fn resume(&mut self, have: u64, position: u64) -> Resume {
        let base = self.frames.front().map_or(position, |f| f.1);
        let gap = (have < base).then_some((have, base));
        self.ack(have);
        let resend = self
            .frames
            .iter()
            .map(|(kind, off, b)| {
                let skip = have.saturating_sub(*off) as usize;
                (*kind, b.slice(skip.min(b.len())..))
            })
            .collect();
        Resume {
            gap,
            resend,
            acked: have.max(base),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// How many bytes of a frame at `start` of `len` bytes a client that
/// already has everything below `have` must not get again.
pub fn already_had(start: u64, len: usize, have: u64) -> usize {
    have.saturating_sub(start).min(len as u64) as usize
}

/// Stdin from the client waiting for the agent's credit, bounded: beyond
/// `window` bytes the server stops reading the client (which keeps what it
/// sent until `stdin_ack`, so nothing is lost).
#[derive(Debug)]
pub struct StdinQueue {
    /// `None` is end of input.
    items: VecDeque<Option<Bytes>>,
    bytes: usize,
    window: usize,
}

impl StdinQueue {
    pub fn new(window: usize) -> Self {
        StdinQueue {
            items: VecDeque::new(),
            bytes: 0,
            window,
        }
    }

    /// Whether the client may be read: room for more input.
    pub fn has_room(&self) -> bool {
        self.bytes < self.window
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn data(&mut self, b: Bytes) {
        self.bytes += b.len();
        self.items.push_back(Some(b));
    }

    pub fn eof(&mut self) {
        self.items.push_back(None);
    }

    /// The next item for the agent (`None` inside: end of input).
    pub fn pop(&mut self) -> Option<Option<Bytes>> {
        let item = self.items.pop_front()?;
        self.bytes -= item.as_ref().map_or(0, |b| b.len());
        Some(item)
    }

    /// The agent will take no more: what waits is dropped.
    pub fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn relay_of(frames: &[(u64, &str)]) -> Relay {
        let mut r = Relay::default();
        for (off, s) in frames {
            r.sent(StreamKind::Stdout, *off, b(s));
        }
        r
    }

    #[test]
    fn acknowledged_output_is_forgotten_whole_frames_only() {
        let mut r = relay_of(&[(0, "abc"), (3, "def"), (6, "gh")]);
        r.ack(4); // inside the second frame: it stays
        let left = r.resume(4, 8);
        assert_eq!(
            left.resend,
            vec![(StreamKind::Stdout, b("ef")), (StreamKind::Stdout, b("gh"))]
        );
        assert_eq!(left.gap, None);
        assert_eq!(left.acked, 4);
        r.ack(8);
        assert!(r.is_empty());
    }

    #[test]
    fn a_client_behind_what_is_kept_is_told_the_exact_gap() {
        let mut r = relay_of(&[(10, "klm")]);
        let resume = r.resume(4, 13);
        assert_eq!(resume.gap, Some((4, 10)));
        assert_eq!(resume.resend, vec![(StreamKind::Stdout, b("klm"))]);
        assert_eq!(resume.acked, 10);
        // Nothing kept: the gap runs to the stream's position.
        let resume = Relay::default().resume(2, 7);
        assert_eq!(resume.gap, Some((2, 7)));
        assert!(resume.resend.is_empty());
        assert_eq!(resume.acked, 7);
    }

    #[test]
    fn a_client_with_everything_gets_nothing_again() {
        let mut r = relay_of(&[(0, "abc")]);
        let resume = r.resume(3, 3);
        assert_eq!(
            resume,
            Resume {
                gap: None,
                resend: vec![],
                acked: 3
            }
        );
        assert_eq!(already_had(0, 3, 3), 3);
        assert_eq!(already_had(2, 3, 3), 1);
        assert_eq!(already_had(5, 3, 3), 0);
    }

    #[test]
    fn stdin_is_bounded_by_its_window_and_keeps_order_and_eof() {
        let mut q = StdinQueue::new(4);
        assert!(q.has_room() && q.is_empty());
        q.data(b("ab"));
        assert!(q.has_room());
        q.data(b("cd"));
        assert!(!q.has_room(), "a full window stops reading the client");
        q.eof();
        assert_eq!(q.pop(), Some(Some(b("ab"))));
        assert!(q.has_room());
        assert_eq!(q.pop(), Some(Some(b("cd"))));
        assert_eq!(q.pop(), Some(None));
        assert_eq!(q.pop(), None);
        q.data(b("x"));
        q.clear();
        assert!(q.is_empty() && q.has_room());
    }
}
