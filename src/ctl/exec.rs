//! `ctl exec`: an exec's WebSocket session, stdout and stderr kept apart,
//! stdin and terminal resizes forwarded, re-attached byte-exact after a lost
//! connection.

use super::{Client, CtlError};
use crate::protocol::TermSize;
use crate::protocol::operator::{ClientMsg, ExecOptions};
use futures_util::SinkExt;
use std::io::IsTerminal;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::resume::{Output, resumable, stdin_eof};
use super::ws::*;

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

/// Writes output frames to stdout/stderr until the server's final message.
/// Runs a command in a worker; returns its exit code.
pub async fn exec(
    client: &Client,
    worker: &str,
    cmd: Vec<String>,
    interactive: bool,
    tty: bool,
    timeout_secs: Option<u64>,
) -> Result<i64, CtlError> {
    let mut ws = open(client, &format!("{}/exec", super::worker_path(worker)), &[]).await?;
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
    let path = format!("{}/exec", super::worker_path(worker));
    match resumable(client, &path, ws, &mut ctl_rx, &mut Terminal::default()).await? {
        End::Exit(code) => Ok(code.unwrap_or(-1)),
        // Like timeout(1): the command was killed at its limit.
        End::Error(e) if e.code == crate::protocol::ErrorCode::Timeout => {
            eprintln!("tether: {e}");
            Ok(124)
        }
        End::Error(e) => Err(CtlError::Api(e)),
    }
}

/// An exec's output goes to this process' stdout and stderr.
struct Terminal {
    stdout: std::io::Stdout,
    stderr: std::io::Stderr,
}

impl Default for Terminal {
    fn default() -> Self {
        Terminal {
            stdout: std::io::stdout(),
            stderr: std::io::stderr(),
        }
    }
}

impl Output for Terminal {
    async fn frame(&mut self, frame: &[u8]) -> Result<(), CtlError> {
        write_output(frame, &mut self.stdout, &mut self.stderr)
    }
}
