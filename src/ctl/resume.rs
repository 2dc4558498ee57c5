//! What `ctl exec` and `ctl port-forward` share: a WebSocket session whose
//! output the client acknowledges and whose input it keeps until the agent
//! has it, so that a lost connection is opened again (`?attach=CHANNEL&
//! offset=N`) and carries on without losing or repeating a byte.

use super::ws::*;
use super::{Client, CtlError};
use crate::protocol::operator::{ASSUMED_STDIN_WINDOW, ClientMsg, ServerMsg};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Where a session's output goes.
pub(super) trait Output {
    /// One data frame: a kind byte, then bytes.
    async fn frame(&mut self, frame: &[u8]) -> Result<(), CtlError>;
    /// The other end sends no more data (a tunnel's half-close).
    async fn eof(&mut self) {}
}

pub(super) fn stdin_eof() -> WsMessage {
    WsMessage::text(ClientMsg::StdinEof.encode())
}

fn is_stdin_eof(m: &WsMessage) -> bool {
    matches!(m, WsMessage::Text(t) if serde_json::from_str::<ClientMsg>(t.as_str()).ok() == Some(ClientMsg::StdinEof))
}

/// Serves the session on `ws` (its first message, if any, already sent) and
/// on re-attached connections after it, until its end. Input comes from
/// `input`; output goes to `out`. If `out` fails (its reader went away),
/// the server is told to cancel and the error returned.
pub(super) async fn resumable(
    client: &Client,
    path: &str,
    mut ws: Ws,
    input: &mut tokio::sync::mpsc::Receiver<WsMessage>,
    out: &mut impl Output,
) -> Result<End, CtlError> {
    let mut progress = Progress::default();
    loop {
        let (mut tx, mut rx) = ws.split();
        match session(&mut tx, &mut rx, input, out, &mut progress).await {
            Ok(Some(end)) => return Ok(end),
            Ok(None) => {}
            Err(e) => {
                let cancel = WsMessage::text(ClientMsg::Cancel.encode());
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), tx.send(cancel)).await;
                return Err(e);
            }
        }
        // The connection dropped mid-session: re-attach where we stopped.
        // What is left of it is closed first: the server keeps the session
        // for a re-attach only once it sees this connection gone.
        drop((tx, rx));
        let Some(channel) = progress.channel else {
            return Err(CtlError::Local(
                "connection lost before the session started".into(),
            ));
        };
        let deadline = std::time::Instant::now() + REATTACH_FOR;
        ws = loop {
            let q = [
                ("attach", channel.to_string()),
                ("offset", progress.received.to_string()),
            ];
            match open(client, path, &q).await {
                Ok(ws) => break ws,
                Err(e) if std::time::Instant::now() < deadline && reattachable(&e) => {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        };
        progress.acked = progress.received;
        progress.reattaching = true;
    }
}

/// Output is acknowledged every this many bytes.
const ACK_EVERY: u64 = 64 * 1024;

/// Stdin kept until the agent has it (at most this much; reading stdin
/// waits beyond).
const STDIN_KEEP: u64 = 8 * 1024 * 1024;

/// Where a client stands in an exec's output and input.
#[derive(Default)]
struct Progress {
    channel: Option<u32>,
    /// Output bytes received (stdout and stderr together).
    received: u64,
    acked: u64,
    /// Stdin sent and not yet acknowledged by the agent (`stdin_ack`), from
    /// offset `stdin_base` on: resent after a re-attach.
    stdin: std::collections::VecDeque<bytes::Bytes>,
    stdin_base: u64,
    stdin_kept: u64,
    /// We sent `stdin_eof` (sent again after a re-attach).
    stdin_eof: bool,
    /// The server reports stdin progress (`stdin_offset`, `stdin_ack`);
    /// without it nothing is kept.
    untracked: bool,
    /// Re-attached, `started` not seen yet: new input waits, so that it
    /// goes after what is sent again.
    reattaching: bool,
    /// The server pings; this long without a message means the connection
    /// is dead even if it has not failed (`idle_timeout_secs`).
    idle_timeout: Option<std::time::Duration>,
    /// Input the server takes beyond `stdin_ack` while reading on
    /// (`stdin_window`).
    stdin_window: Option<u64>,
}

impl Progress {
    /// How much input may be out unacknowledged: within the server's
    /// window, so that it never stops reading (acknowledgements of output
    /// travel behind the input; a process echoing its input would wait on
    /// them forever), and within what is kept for a re-attach.
    fn stdin_limit(&self) -> u64 {
        self.stdin_window
            .unwrap_or(ASSUMED_STDIN_WINDOW)
            .min(STDIN_KEEP)
    }

    /// Notes an input message on its way out.
    fn keep(&mut self, m: &WsMessage) {
        match m {
            WsMessage::Binary(b) if !self.untracked => {
                self.stdin_kept += b.len() as u64;
                self.stdin.push_back(b.clone());
            }
            m if is_stdin_eof(m) => self.stdin_eof = true,
            _ => {}
        }
    }

    /// The agent has stdin up to `offset`: forget it.
    fn stdin_acked(&mut self, offset: u64) {
        while let Some(front) = self.stdin.front_mut() {
            let end = self.stdin_base + front.len() as u64;
            if end <= offset {
                self.stdin_base = end;
                self.stdin_kept -= front.len() as u64;
                self.stdin.pop_front();
            } else {
                let skip = offset.saturating_sub(self.stdin_base) as usize;
                let _ = front.split_to(skip);
                self.stdin_base += skip as u64;
                self.stdin_kept -= skip as u64;
                break;
            }
        }
    }

    /// What to send again to a server that has stdin up to `offset`.
    fn stdin_from(&self, offset: u64) -> Vec<WsMessage> {
        if offset < self.stdin_base {
            eprintln!(
                "tether: input bytes {} to {} were lost",
                offset, self.stdin_base
            );
        }
        let mut v = Vec::new();
        let mut at = self.stdin_base;
        for b in &self.stdin {
            let end = at + b.len() as u64;
            if end > offset {
                let skip = offset.saturating_sub(at) as usize;
                v.push(WsMessage::Binary(b.slice(skip..)));
            }
            at = end;
        }
        if self.stdin_eof {
            v.push(stdin_eof());
        }
        v
    }
}

/// Serves one connection of an exec: output to stdout/stderr with
/// acknowledgements, input from the local tasks. `None` when the connection
/// dropped before the end.
async fn session(
    tx: &mut futures_util::stream::SplitSink<Ws, WsMessage>,
    rx: &mut futures_util::stream::SplitStream<Ws>,
    input: &mut tokio::sync::mpsc::Receiver<WsMessage>,
    sink: &mut impl Output,
    progress: &mut Progress,
) -> Result<Option<End>, CtlError> {
    // Messages go out in order from a queue, sent beside the loop: a send
    // that cannot complete (a peer that stopped reading, its buffers full)
    // must not stop the loop reading output, nor noticing the silence. The
    // queue holds at most STDIN_QUEUE bytes of input (acks are few).
    let (out, mut queue) = tokio::sync::mpsc::unbounded_channel::<WsMessage>();
    let queued = std::sync::atomic::AtomicU64::new(0);
    let drained = tokio::sync::Notify::new();
    let sender = async {
        while let Some(m) = queue.recv().await {
            let n = input_len(&m);
            if tx.send(m).await.is_err() {
                return;
            }
            if n > 0 {
                queued.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
                drained.notify_one();
            }
        }
    };
    tokio::pin!(sender);
    let send = |m: WsMessage| {
        queued.fetch_add(input_len(&m), std::sync::atomic::Ordering::Relaxed);
        let _ = out.send(m);
    };
    let mut input_open = true;
    let mut last_heard = std::time::Instant::now();
    let mut check = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let room = queued.load(std::sync::atomic::Ordering::Relaxed) < STDIN_QUEUE;
        tokio::select! {
            // The queue lives as long as the loop: this ends only when a
            // send failed.
            _ = &mut sender => return Ok(None),
            // Input waits for room in the queue: look again once some went.
            _ = drained.notified(), if !room => {}
            _ = check.tick(), if progress.idle_timeout.is_some() => {
                if progress.idle_timeout.is_some_and(|t| last_heard.elapsed() > t) {
                    return Ok(None); // silently dead: re-attach on a new one
                }
            }
            m = rx.next() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(_)) | None => return Ok(None),
                };
                last_heard = std::time::Instant::now();
                match m {
                    WsMessage::Binary(b) if !b.is_empty() => {
                        sink.frame(&b).await?;
                        // Offsets count every byte of the channel, gap markers too.
                        progress.received += b.len() as u64 - 1;
                        if progress.received - progress.acked >= ACK_EVERY {
                            let ack = ClientMsg::Ack { offset: progress.received };
                            send(WsMessage::text(ack.encode()));
                            progress.acked = progress.received;
                        }
                        // Time spent writing (a slow reader of our stdout)
                        // is not silence of the server.
                        last_heard = std::time::Instant::now();
                    }
                    WsMessage::Text(t) => match server_msg(t.as_str()) {
                        ServerMsg::Started(st) => {
                            let again = progress.channel.is_some();
                            progress.reattaching = false;
                            progress.channel = st.channel;
                            progress.idle_timeout =
                                Some(std::time::Duration::from_secs(st.idle_timeout_secs));
                            progress.stdin_window = st.stdin_window;
                            match st.stdin_offset {
                                // Re-attached: send what the server lacks.
                                Some(have) if again => {
                                    for m in progress.stdin_from(have) {
                                        send(m);
                                    }
                                }
                                Some(_) => {}
                                None => {
                                    progress.untracked = true;
                                    progress.stdin.clear();
                                    progress.stdin_kept = 0;
                                }
                            }
                        }
                        ServerMsg::StdinAck { offset } => progress.stdin_acked(offset),
                        ServerMsg::Gap { from, to } => {
                            eprintln!("tether: output bytes {from} to {to} were lost")
                        }
                        ServerMsg::Eof => sink.eof().await,
                        ServerMsg::Unknown => {}
                        end @ (ServerMsg::Exit { .. } | ServerMsg::Error { .. }) => {
                            return Ok(end_of(end));
                        }
                    },
                    WsMessage::Close(_) => return Ok(None),
                    _ => {}
                }
            }
            m = input.recv(), if input_open && room && !progress.reattaching && progress.stdin_kept < progress.stdin_limit() => match m {
                Some(m) => {
                    // Kept before sending: if the connection drops now, it
                    // goes again after the re-attach.
                    progress.keep(&m);
                    send(m);
                }
                None => input_open = false,
            },
        }
    }
}

/// Input bytes queued for sending beyond which reading stdin waits.
const STDIN_QUEUE: u64 = 256 * 1024;

/// The input bytes a message carries (what [`STDIN_QUEUE`] counts).
fn input_len(m: &WsMessage) -> u64 {
    match m {
        WsMessage::Binary(b) => b.len() as u64,
        _ => 0,
    }
}
