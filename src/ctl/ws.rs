//! What `ctl exec`, `ctl logs` and `ctl port-forward` share: opening an
//! operator WebSocket, reading the server's messages, and when a lost
//! connection is worth opening again.

use super::{Client, CtlError};
use crate::protocol::operator::{self, ServerMsg};
use crate::protocol::{ErrorBody, StreamKind};
use futures_util::StreamExt;
use std::io::Write;
use tokio_tungstenite::tungstenite::{Message as WsMessage, client::IntoClientRequest};

pub(super) type Ws =
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

/// What ends a stream session.
pub(super) enum End {
    Exit(Option<i64>),
    Error(ErrorBody),
}

/// Writes one output message (a kind byte, then bytes) where it belongs; a
/// gap marker (8-byte count) becomes a warning on stderr.
pub(super) fn write_output(
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
pub(super) fn server_msg(text: &str) -> ServerMsg {
    serde_json::from_str(text).unwrap_or_else(|e| ServerMsg::Error {
        error: ErrorBody::new(
            crate::protocol::ErrorCode::Internal,
            format!("unreadable message from the server ({e}): {text}"),
        ),
    })
}

/// The end a final server message stands for, if it is one.
pub(super) fn end_of(m: ServerMsg) -> Option<End> {
    match m {
        ServerMsg::Exit { exit_code } => Some(End::Exit(exit_code)),
        ServerMsg::Error { error } => Some(End::Error(error)),
        _ => None,
    }
}

/// Input message that closes the process' stdin.
pub(super) async fn drain_output(
    rx: &mut futures_util::stream::SplitStream<Ws>,
) -> Result<End, CtlError> {
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

/// How long opening a WebSocket may take.
pub(super) const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long `ctl exec` keeps trying to re-attach after losing its connection.
pub(super) const REATTACH_FOR: std::time::Duration = std::time::Duration::from_secs(60);
pub(super) fn reattachable(e: &CtlError) -> bool {
    match e {
        CtlError::Connect { .. } => true,
        CtlError::Api(b) => matches!(
            b.code,
            crate::protocol::ErrorCode::NotFound | crate::protocol::ErrorCode::Unavailable
        ),
        CtlError::Local(_) | CtlError::Extract(_) => false,
    }
}
