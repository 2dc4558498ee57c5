//! What a hub caller holds of a channel: the output stream, the input sink
//! and the pair of them a two-way channel (an exec, a tunnel) has.

use super::*;

/// What a channel yields to its consumer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Data(StreamKind, Bytes),
    /// This many output bytes are missing here: the agent's spool was full
    /// while the server was unreachable (never silent).
    Gap(u64),
    /// The agent sends no more data (only after [`ChannelStream::report_eof`];
    /// a tunnel's half-close).
    Eof,
    /// The operation ended: exit code for exec, error if it failed.
    End {
        exit_code: Option<i64>,
        error: Option<ErrorBody>,
    },
}

impl StreamEvent {
    /// Data and gap events as they travel in a channel (a gap as its 8-byte
    /// big-endian count), or the end's exit code and error.
    pub fn into_frame(self) -> Result<(StreamKind, Bytes), (Option<i64>, Option<ErrorBody>)> {
        match self {
            StreamEvent::Data(k, b) => Ok((k, b)),
            StreamEvent::Gap(n) => Ok((StreamKind::Gap, Bytes::copy_from_slice(&n.to_be_bytes()))),
            // Only a tunnel asks for it; as a frame it carries nothing.
            StreamEvent::Eof => Ok((StreamKind::Data, Bytes::new())),
            StreamEvent::End { exit_code, error } => Err((exit_code, error)),
        }
    }
}

/// The receiving side of a channel (exec output, logs, a downloaded archive).
/// Reading grants the agent credit; not reading stalls this channel only.
/// Dropping it before the end cancels the operation on the agent.
pub struct ChannelStream {
    pub(super) channel: u32,
    pub(super) reader: ChannelReader,
    pub(super) link: Arc<AgentLink>,
    pub(super) done: bool,
    /// Whether the agent's end of data is an event ([`StreamEvent::Eof`]).
    pub(super) eof_events: bool,
}

impl ChannelStream {
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// The node the channel runs on.
    pub fn node_id(&self) -> &str {
        &self.link.node_id
    }

    /// Bytes handed out so far: the offset just past the last data event.
    pub fn position(&self) -> u64 {
        self.reader.consumed()
    }

    /// From now on credit follows [`ChannelStream::ack`]: the agent keeps
    /// what is not acknowledged, so a consumer that reconnects (or a new
    /// server) can have it again.
    pub fn set_manual_ack(&mut self) {
        self.reader.set_manual_ack();
    }

    /// From now on the agent's end of data is reported as
    /// [`StreamEvent::Eof`] (a tunnel passes half-closes on).
    pub fn report_eof(&mut self) {
        self.eof_events = true;
    }

    /// The final consumer has everything up to `offset`.
    pub fn ack(&mut self, offset: u64) {
        self.reader.ack(offset);
    }

    /// As [`ChannelStream::ack`], told to the agent at once: it forgets
    /// what it kept to send again (a restarted server would get it again).
    pub fn ack_now(&mut self, offset: u64) {
        self.reader.ack_now(offset);
    }

    /// Next event; after `End` it returns `None`.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        if self.done {
            return None;
        }
        loop {
            return match self.reader.recv().await {
                Some(Inbound::Data(StreamKind::Gap, b)) if b.len() == 8 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&b);
                    Some(StreamEvent::Gap(u64::from_be_bytes(n)))
                }
                Some(Inbound::Data(k, b)) => Some(StreamEvent::Data(k, b)),
                Some(Inbound::Close(ChannelClose {
                    exit_code, error, ..
                })) => {
                    self.done = true;
                    Some(StreamEvent::End { exit_code, error })
                }
                Some(Inbound::Eof) if self.eof_events => Some(StreamEvent::Eof),
                Some(Inbound::Eof) => continue,
                None => {
                    self.done = true;
                    Some(StreamEvent::End {
                        exit_code: None,
                        error: Some(self.link.unavailable()),
                    })
                }
            };
        }
    }
}

impl Drop for ChannelStream {
    fn drop(&mut self) {
        if !self.done {
            // Cancels the operation on the agent (replayed after a reconnect).
            self.link.channels.close(ChannelClose {
                channel: self.channel,
                exit_code: None,
                error: None,
            });
        }
    }
}

/// The sending side of a channel: stdin of an exec, or an uploaded archive.
pub struct ChannelSink {
    pub(super) channel: u32,
    pub(super) writer: ChannelWriter,
    pub(super) link: Arc<AgentLink>,
}

impl ChannelSink {
    /// Sends bytes, waiting for the agent's credit.
    pub async fn write(&mut self, data: Bytes) -> Result<(), ErrorBody> {
        self.writer
            .write(StreamKind::Stdin, data)
            .await
            .map_err(|_| self.link.unavailable())
    }

    /// Input bytes taken so far (sent to the agent or queued for it).
    pub fn offset(&self) -> u64 {
        self.writer.offset()
    }

    /// How far the agent has acknowledged the input.
    pub fn progress(&self) -> crate::channel::WriterProgress {
        self.writer.progress()
    }

    /// Signals end of input.
    pub fn close(&self) {
        self.writer.eof();
    }

    pub async fn resize(&self, size: TermSize) -> Result<(), ErrorBody> {
        self.link
            .request(Request::Resize(Resize {
                channel: self.channel,
                size,
            }))
            .await
            .map(|_| ())
    }
}

/// A channel both ways (an exec, a tunnel): its input and its output,
/// usable from two tasks.
pub struct Duplex {
    pub input: ChannelSink,
    pub output: ChannelStream,
}
