//! `ctl logs`: a worker's log stream, followed across lost connections.

use super::{Client, CtlError};
use crate::protocol::StreamKind;
use crate::protocol::operator::{LogOptions, ServerMsg};
use futures_util::StreamExt;
use std::io::Write;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::ws::*;

/// Prints a worker's logs; with `follow`, until the worker stops or Ctrl-C.
pub async fn logs(client: &Client, worker: &str, opts: LogOptions) -> Result<(), CtlError> {
    logs_as(client, worker, opts, None).await
}

/// Prints a worker's logs, each line after `prefix` if one is given (as
/// `docker compose logs` names the service).
pub async fn logs_as(
    client: &Client,
    worker: &str,
    opts: LogOptions,
    prefix: Option<String>,
) -> Result<(), CtlError> {
    let path = format!("{}/logs", super::worker_path(worker));
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
    if !opts.follow && prefix.is_none() {
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
    let mut lines = LineFollower::new(opts.timestamps, prefix);
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
    /// Printed before each line.
    prefix: Option<String>,
    /// Timestamp of the newest line printed.
    last: Option<std::time::SystemTime>,
    /// Partial line per stream (stdout, stderr).
    partial: [Vec<u8>; 2],
    /// The server pings; this long without a message means the connection
    /// is dead (`idle_timeout_secs` of its `started`).
    idle_timeout: Option<std::time::Duration>,
}

/// The longest unfinished line kept while waiting for its end; a longer
/// one is printed in pieces of this size, so that a worker writing without
/// newlines cannot grow `ctl`'s memory.
const MAX_PARTIAL_LINE: usize = 1024 * 1024;

/// Appends `bytes` to the unfinished line `partial` and takes out what is
/// ready to print: each complete line, and the unfinished one once it
/// reaches [`MAX_PARTIAL_LINE`]. Only the new bytes are searched.
fn split_lines(partial: &mut Vec<u8>, bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut from = partial.len();
    partial.extend_from_slice(bytes);
    let mut ready = Vec::new();
    while let Some(pos) = partial[from..].iter().position(|&c| c == b'\n') {
        ready.push(partial.drain(..=from + pos).collect());
        from = 0;
    }
    if partial.len() >= MAX_PARTIAL_LINE {
        ready.push(std::mem::take(partial));
    }
    ready
}

impl LineFollower {
    fn new(show: bool, prefix: Option<String>) -> Self {
        LineFollower {
            show,
            prefix,
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
                    for line in split_lines(&mut self.partial[idx], &b[1..]) {
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
        let mut whole = self.prefix.clone().unwrap_or_default().into_bytes();
        whole.extend_from_slice(out);
        w.write_all(&whole)
            .and_then(|_| w.flush())
            .map_err(|e| CtlError::Local(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_where_they_end_and_a_line_without_end_is_bounded() {
        let mut partial = Vec::new();
        assert!(split_lines(&mut partial, b"T1 he").is_empty());
        assert_eq!(
            split_lines(&mut partial, b"llo\nT2 a\nT3 b"),
            vec![b"T1 hello\n".to_vec(), b"T2 a\n".to_vec()]
        );
        assert_eq!(partial, b"T3 b");
        assert_eq!(split_lines(&mut partial, b"\n"), vec![b"T3 b\n".to_vec()]);
        assert!(partial.is_empty());
        // A worker that never writes a newline: 64 MiB arrive, and what is
        // kept never exceeds the bound; every byte is handed on once.
        let piece = vec![b'y'; 16 * 1024];
        let mut out = 0;
        for _ in 0..4096 {
            out += split_lines(&mut partial, &piece)
                .iter()
                .map(Vec::len)
                .sum::<usize>();
            assert!(partial.len() < MAX_PARTIAL_LINE);
        }
        assert_eq!(out + partial.len(), 64 * 1024 * 1024);
    }
}
