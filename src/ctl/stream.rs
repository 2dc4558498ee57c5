//! `ctl exec` and `ctl logs`: WebSocket sessions with the server, stdout and
//! stderr kept apart, stdin and terminal resizes forwarded.

use super::{Client, CtlError};
use crate::protocol::operator::{
    self, ASSUMED_STDIN_WINDOW, ClientMsg, ExecOptions, LogOptions, ServerMsg,
};
use crate::protocol::{ErrorBody, StreamKind, TermSize};
use futures_util::{SinkExt, StreamExt};
use std::io::{IsTerminal, Write};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::{Message as WsMessage, client::IntoClientRequest};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(super) async fn open(
    client: &Client,
    path: &str,
    query: &[(&str, String)],
) -> Result<Ws, CtlError> {
    crate::init_crypto();
    let mut url = client.url(path);
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    let _ = url.set_scheme(scheme);
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    }
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| CtlError::Local(e.to_string()))?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", client.token())
            .parse()
            .map_err(|_| CtlError::Local("token is not a valid header".into()))?,
    );
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        true,
        Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
            crate::tls_client_config(),
        ))),
    );
    // A dead network path would leave the connection waiting for good.
    let Ok(connected) = tokio::time::timeout(CONNECT_TIMEOUT, connect).await else {
        return Err(CtlError::Connect {
            url: client.url("/").to_string(),
            reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        });
    };
    match connected {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            let err = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| serde_json::from_value::<ErrorBody>(v["error"].clone()).ok());
            Err(match err {
                Some(e) => CtlError::Api(e),
                None => CtlError::Local(format!("HTTP {}", resp.status())),
            })
        }
        Err(e) => Err(CtlError::Connect {
            url: client.url("/").to_string(),
            reason: crate::error_chain(&e),
        }),
    }
}

/// Restores the terminal when dropped.
struct RawMode(bool);

impl RawMode {
    fn enable(on: bool) -> RawMode {
        RawMode(on && crossterm::terminal::enable_raw_mode().is_ok())
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if self.0 {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }
}

fn term_size() -> Option<TermSize> {
    crossterm::terminal::size()
        .ok()
        .map(|(cols, rows)| TermSize { cols, rows })
}

/// What ends a stream session.
enum End {
    Exit(Option<i64>),
    Error(ErrorBody),
}

/// Writes one output message (a kind byte, then bytes) where it belongs; a
/// gap marker (8-byte count) becomes a warning on stderr.
fn write_output(
    b: &[u8],
    stdout: &mut std::io::Stdout,
    stderr: &mut std::io::Stderr,
) -> Result<(), CtlError> {
    let Some((kind, data)) = operator::parse_data_frame(b) else {
        return Ok(());
    };
    let w: &mut dyn Write = match kind {
        Some(StreamKind::Gap) => {
            let n = <[u8; 8]>::try_from(data).map(u64::from_be_bytes);
            let n = n.map_or_else(|_| "some".to_string(), |n| n.to_string());
            let _ = stdout.flush();
            eprintln!(
                "tether: {n} bytes of output were lost here (the node's spool was full while the server was unreachable)"
            );
            return Ok(());
        }
        Some(StreamKind::Stderr) => stderr,
        _ => stdout,
    };
    w.write_all(data)
        .and_then(|_| w.flush())
        .map_err(|e| CtlError::Local(e.to_string()))
}

/// A text message from the server; one that does not parse is a protocol
/// error, reported as the end of the stream.
fn server_msg(text: &str) -> ServerMsg {
    serde_json::from_str(text).unwrap_or_else(|e| ServerMsg::Error {
        error: ErrorBody::new(
            crate::protocol::ErrorCode::Internal,
            format!("unreadable message from the server ({e}): {text}"),
        ),
    })
}

/// The end a final server message stands for, if it is one.
fn end_of(m: ServerMsg) -> Option<End> {
    match m {
        ServerMsg::Exit { exit_code } => Some(End::Exit(exit_code)),
        ServerMsg::Error { error } => Some(End::Error(error)),
        _ => None,
    }
}

/// Input message that closes the process' stdin.
fn stdin_eof() -> WsMessage {
    WsMessage::text(ClientMsg::StdinEof.encode())
}

fn is_stdin_eof(m: &WsMessage) -> bool {
    matches!(m, WsMessage::Text(t) if serde_json::from_str::<ClientMsg>(t.as_str()).ok() == Some(ClientMsg::StdinEof))
}

/// Writes output frames to stdout/stderr until the server's final message.
async fn drain_output(rx: &mut futures_util::stream::SplitStream<Ws>) -> Result<End, CtlError> {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(m) = rx.next().await {
        match m.map_err(|e| CtlError::Local(format!("connection lost: {e}")))? {
            WsMessage::Binary(b) if !b.is_empty() => write_output(&b, &mut stdout, &mut stderr)?,
            WsMessage::Text(t) => {
                if let Some(end) = end_of(server_msg(t.as_str())) {
                    return Ok(end);
                }
            }
            WsMessage::Close(_) => break,
            _ => {}
        }
    }
    Err(CtlError::Local(
        "connection closed before the command finished".into(),
    ))
}

/// Runs a command in a worker; returns its exit code.
pub async fn exec(
    client: &Client,
    worker: &str,
    cmd: Vec<String>,
    interactive: bool,
    tty: bool,
    timeout_secs: Option<u64>,
) -> Result<i64, CtlError> {
    let mut ws = open(client, &format!("/api/v1/workers/{worker}/exec"), &[]).await?;
    let tty = tty && std::io::stdout().is_terminal();
    let opts = ExecOptions {
        cmd,
        tty,
        stdin: interactive,
        size: if tty { term_size() } else { None },
        timeout_secs,
        client_acks: true,
        ..Default::default()
    };
    ws.send(WsMessage::text(
        serde_json::to_string(&opts).expect("serializes"),
    ))
    .await
    .map_err(|e| CtlError::Local(e.to_string()))?;
    let _raw = RawMode::enable(tty && interactive && std::io::stdin().is_terminal());
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel::<WsMessage>(16);
    if interactive {
        let t = ctl_tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = t.send(stdin_eof()).await;
                        break;
                    }
                    Ok(n) => {
                        if t.send(WsMessage::Binary(bytes::Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
    }
    if tty {
        let t = ctl_tx.clone();
        tokio::spawn(async move {
            let Ok(mut sig) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while sig.recv().await.is_some() {
                if let Some(s) = term_size() {
                    let m = ClientMsg::Resize {
                        cols: s.cols,
                        rows: s.rows,
                    };
                    if t.send(WsMessage::text(m.encode())).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
    drop(ctl_tx);
    let path = format!("/api/v1/workers/{worker}/exec");
    let mut progress = Progress::default();
    loop {
        let (mut tx, mut rx) = ws.split();
        match session(&mut tx, &mut rx, &mut ctl_rx, &mut progress).await? {
            Some(End::Exit(code)) => return Ok(code.unwrap_or(-1)),
            // Like timeout(1): the command was killed at its limit.
            Some(End::Error(e)) if e.code == crate::protocol::ErrorCode::Timeout => {
                eprintln!("tether: {e}");
                return Ok(124);
            }
            Some(End::Error(e)) => return Err(CtlError::Api(e)),
            None => {}
        }
        // The connection dropped mid-command: re-attach where we stopped.
        // What is left of it is closed first: the server keeps the exec for
        // a re-attach only once it sees this connection gone.
        drop((tx, rx));
        let Some(channel) = progress.channel else {
            return Err(CtlError::Local(
                "connection lost before the command started".into(),
            ));
        };
        let deadline = std::time::Instant::now() + REATTACH_FOR;
        ws = loop {
            let q = [
                ("attach", channel.to_string()),
                ("offset", progress.received.to_string()),
            ];
            match open(client, &path, &q).await {
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

/// How long opening a WebSocket may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long `ctl exec` keeps trying to re-attach after losing its connection.
const REATTACH_FOR: std::time::Duration = std::time::Duration::from_secs(60);
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

fn reattachable(e: &CtlError) -> bool {
    match e {
        CtlError::Connect { .. } => true,
        CtlError::Api(b) => matches!(
            b.code,
            crate::protocol::ErrorCode::NotFound | crate::protocol::ErrorCode::Unavailable
        ),
        CtlError::Local(_) | CtlError::Extract(_) => false,
    }
}

/// Serves one connection of an exec: output to stdout/stderr with
/// acknowledgements, input from the local tasks. `None` when the connection
/// dropped before the end.
async fn session(
    tx: &mut futures_util::stream::SplitSink<Ws, WsMessage>,
    rx: &mut futures_util::stream::SplitStream<Ws>,
    input: &mut tokio::sync::mpsc::Receiver<WsMessage>,
    progress: &mut Progress,
) -> Result<Option<End>, CtlError> {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
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
                        write_output(&b, &mut stdout, &mut stderr)?;
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
                        ServerMsg::Eof | ServerMsg::Unknown => {}
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

/// Prints a worker's logs; with `follow`, until the worker stops or Ctrl-C.
pub async fn logs(client: &Client, worker: &str, opts: LogOptions) -> Result<(), CtlError> {
    let path = format!("/api/v1/workers/{worker}/logs");
    let query = |opts: &LogOptions| {
        let mut q = vec![
            ("follow", opts.follow.to_string()),
            ("timestamps", opts.timestamps.to_string()),
        ];
        if let Some(s) = opts.since {
            q.push(("since", s.to_string()));
        }
        if let Some(t) = opts.tail {
            q.push(("tail", t.to_string()));
        }
        q
    };
    if !opts.follow {
        let ws = open(client, &path, &query(&opts)).await?;
        let (_tx, mut rx) = ws.split();
        return match drain_output(&mut rx).await? {
            End::Exit(_) => Ok(()),
            End::Error(e) => Err(CtlError::Api(e)),
        };
    }
    // Following: ask for timestamps, so that after a lost connection (a
    // server restart) the stream is taken up again right after the last
    // whole line printed; lines at or before it are not printed twice.
    let mut lines = LineFollower::new(opts.timestamps);
    let mut ask = LogOptions {
        timestamps: true,
        ..opts.clone()
    };
    let mut lost: Option<std::time::Instant> = None;
    loop {
        let ws = match open(client, &path, &query(&ask)).await {
            Ok(ws) => ws,
            Err(e) if lost.is_some_and(|t| t.elapsed() < REATTACH_FOR) && reattachable(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (_tx, mut rx) = ws.split();
        let before = lines.last;
        match lines.follow(&mut rx).await? {
            Some(End::Exit(_)) => return Ok(()),
            // A restarted server may not know the worker yet (its agent is
            // still reconnecting): like a lost connection, once under way.
            Some(End::Error(e)) => {
                let under_way = lost.is_some() || lines.last.is_some();
                let since = *lost.get_or_insert_with(std::time::Instant::now);
                let e = CtlError::Api(e);
                if !(under_way && reattachable(&e) && since.elapsed() < REATTACH_FOR) {
                    return Err(e);
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            // Lost: the 60 s to come back count from the last progress.
            None if lines.last != before => lost = Some(std::time::Instant::now()),
            None => {
                lost.get_or_insert_with(std::time::Instant::now);
            }
        }
        // Take up again right after the last line printed.
        if let Some(t) = lines.last {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            ask.since = Some(secs as i64);
            ask.tail = None;
        }
    }
}

/// Splits followed log output (with Docker's timestamps) into lines,
/// remembers the newest printed, and skips what was printed before.
struct LineFollower {
    /// Print the timestamps (the user asked for them).
    show: bool,
    /// Timestamp of the newest line printed.
    last: Option<std::time::SystemTime>,
    /// Partial line per stream (stdout, stderr).
    partial: [Vec<u8>; 2],
    /// The server pings; this long without a message means the connection
    /// is dead (`idle_timeout_secs` of its `started`).
    idle_timeout: Option<std::time::Duration>,
}

impl LineFollower {
    fn new(show: bool) -> Self {
        LineFollower {
            show,
            last: None,
            partial: [Vec::new(), Vec::new()],
            idle_timeout: None,
        }
    }

    /// Prints until the server's final message (`Some`) or a lost
    /// connection (`None`; a partial line is dropped, it comes again whole).
    async fn follow(
        &mut self,
        rx: &mut futures_util::stream::SplitStream<Ws>,
    ) -> Result<Option<End>, CtlError> {
        let mut stdout = std::io::stdout();
        let mut stderr = std::io::stderr();
        let end = loop {
            let next = match self.idle_timeout {
                Some(t) => tokio::time::timeout(t, rx.next()).await.unwrap_or(None),
                None => rx.next().await,
            };
            let m = match next {
                Some(Ok(m)) => m,
                Some(Err(_)) | None => break None,
            };
            match m {
                WsMessage::Binary(b) if !b.is_empty() => {
                    let idx = match StreamKind::from_u8(b[0]) {
                        Some(StreamKind::Stderr) => 1,
                        Some(StreamKind::Gap) => {
                            write_output(&b, &mut stdout, &mut stderr)?;
                            continue;
                        }
                        _ => 0,
                    };
                    self.partial[idx].extend_from_slice(&b[1..]);
                    while let Some(pos) = self.partial[idx].iter().position(|&c| c == b'\n') {
                        let line: Vec<u8> = self.partial[idx].drain(..=pos).collect();
                        let w: &mut dyn Write = if idx == 1 { &mut stderr } else { &mut stdout };
                        self.print(&line, w)?;
                    }
                }
                WsMessage::Text(t) => match server_msg(t.as_str()) {
                    ServerMsg::Started(st) => {
                        self.idle_timeout =
                            Some(std::time::Duration::from_secs(st.idle_timeout_secs));
                    }
                    ServerMsg::Exit { exit_code } => break Some(End::Exit(exit_code)),
                    ServerMsg::Error { error } => break Some(End::Error(error)),
                    _ => {}
                },
                WsMessage::Close(_) => break None,
                _ => {}
            }
        };
        if matches!(end, Some(End::Exit(_))) {
            // The stream ended: a last line without a newline is complete.
            for idx in 0..2 {
                let line = std::mem::take(&mut self.partial[idx]);
                if !line.is_empty() {
                    let w: &mut dyn Write = if idx == 1 { &mut stderr } else { &mut stdout };
                    self.print(&line, w)?;
                }
            }
        } else {
            self.partial = [Vec::new(), Vec::new()];
        }
        Ok(end)
    }

    /// Prints one `TIMESTAMP TEXT` line unless it was printed before.
    fn print(&mut self, line: &[u8], w: &mut dyn Write) -> Result<(), CtlError> {
        let (ts, text) = match line.iter().position(|&c| c == b' ') {
            Some(sp) => (
                std::str::from_utf8(&line[..sp])
                    .ok()
                    .and_then(|s| humantime::parse_rfc3339_weak(s).ok()),
                &line[sp + 1..],
            ),
            None => (None, line),
        };
        if let (Some(ts), Some(last)) = (ts, self.last)
            && ts <= last
        {
            return Ok(()); // printed before the connection was lost
        }
        if ts.is_some() {
            self.last = ts;
        }
        let out = if self.show || ts.is_none() {
            line
        } else {
            text
        };
        w.write_all(out)
            .and_then(|_| w.flush())
            .map_err(|e| CtlError::Local(e.to_string()))
    }
}
