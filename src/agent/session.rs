//! One connection to the server: the WebSocket handshake, `hello`/`welcome`,
//! then one loop that reads frames, writes the outbound queue, sends
//! heartbeats and watches for shutdown.

use super::{AgentConfig, AgentError, Ctx, commands};
use crate::conn::{Close, End, Heartbeat, Incoming, Outbound, PingWhen};
use crate::protocol::{
    self, AGENT_CONNECT_PATH, ErrorBody, ErrorCode, Hello, MAX_WS_MESSAGE, Message,
    PROTOCOL_VERSION, SUBPROTOCOL, Welcome,
};
use futures_util::{SinkExt, Stream, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{
    self, Message as WsMessage, client::IntoClientRequest, protocol::WebSocketConfig,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

pub(super) enum ConnectError {
    Unauthorized,
    Other(String),
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) fn ws_config() -> WebSocketConfig {
    // One connection per agent: a read buffer that holds a whole frame
    // (uploads and stdin arrive in 64 KiB frames) costs little here.
    WebSocketConfig::default()
        .read_buffer_size(80 * 1024)
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE))
}

/// Opens the agent WebSocket with the node JWT.
pub(super) async fn connect(
    cfg: &AgentConfig,
    jwt: &str,
    key: &super::identity::NodeKey,
) -> Result<Ws, ConnectError> {
    let mut url = cfg
        .server
        .join(AGENT_CONNECT_PATH)
        .map_err(|e| ConnectError::Other(e.to_string()))?;
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme)
        .map_err(|_| ConnectError::Other("bad scheme".into()))?;
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Other(e.to_string()))?;
    let h = req.headers_mut();
    h.insert(
        "authorization",
        format!("Bearer {jwt}")
            .parse()
            .map_err(|_| ConnectError::Unauthorized)?,
    );
    h.insert(
        "sec-websocket-protocol",
        SUBPROTOCOL.parse().expect("valid header"),
    );
    h.insert(
        crate::protocol::PROOF_HEADER,
        key.proof(crate::protocol::ProofPurpose::Connect, &cfg.node_id)
            .parse()
            .expect("a proof is a valid header value"),
    );
    // A handshake into a black hole must not hang the agent forever.
    let handshake = tokio_tungstenite::connect_async_tls_with_config(
        req,
        Some(ws_config()),
        true,
        Some(tokio_tungstenite::Connector::Rustls(Arc::new(
            cfg.tls().map_err(|e| ConnectError::Other(e.to_string()))?,
        ))),
    );
    let connected = tokio::time::timeout(cfg.heartbeat_timeout, handshake)
        .await
        .map_err(|_| {
            ConnectError::Other(format!(
                "no WebSocket handshake within {} s",
                cfg.heartbeat_timeout.as_secs()
            ))
        })?;
    match connected {
        Ok((ws, resp)) => {
            let proto = resp
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok());
            if proto != Some(SUBPROTOCOL) {
                return Err(ConnectError::Other(format!(
                    "server did not accept subprotocol {SUBPROTOCOL} (got {proto:?})"
                )));
            }
            Ok(ws)
        }
        Err(tungstenite::Error::Http(resp)) if resp.status() == 401 => {
            Err(ConnectError::Unauthorized)
        }
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err(ConnectError::Other(format!(
                "HTTP {}: {body}",
                resp.status()
            )))
        }
        Err(e) => Err(ConnectError::Other(crate::error_chain(&e))),
    }
}

pub(crate) fn to_ws(o: Outbound) -> WsMessage {
    match o {
        Outbound::Text(t) => WsMessage::text(t),
        Outbound::Binary(b) => WsMessage::Binary(b),
        Outbound::Ping => WsMessage::Ping(Default::default()),
        Outbound::Close(code, reason) => {
            WsMessage::Close(Some(tungstenite::protocol::CloseFrame {
                code: code.into(),
                reason: reason.into(),
            }))
        }
    }
}

async fn next_text<S>(ws: &mut S) -> Result<String, AgentError>
where
    S: Stream<Item = Result<WsMessage, tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) => return Ok(t.to_string()),
            Some(Ok(WsMessage::Close(f))) => {
                return Err(AgentError::ConnectionLost(format!(
                    "closed by server: {f:?}"
                )));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(AgentError::ConnectionLost(e.to_string())),
            None => return Err(AgentError::ConnectionLost("closed during handshake".into())),
        }
    }
}

/// Serves one connection until it breaks (error) or shutdown (Ok).
pub(super) async fn serve(
    mut ws: Ws,
    cfg: &AgentConfig,
    ctx: Arc<Ctx>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let inventory =
        match crate::docker::containers::list(&ctx.engine.docker, &ctx.engine.node_id).await {
            Ok(list) => Some(list),
            Err(e) => {
                warn!(error = %e, "could not list workers for the inventory");
                None
            }
        };
    let report = super::health::capability_report(&ctx).await;
    ctx.node.reported(&report);
    let hello = Message::Hello(Hello {
        versions: vec![PROTOCOL_VERSION],
        node_id: cfg.node_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        inventory,
        channels: ctx.upstream.channels.states(),
        // Execs (their channels are tagged with the worker), including
        // those that ended while we were away: their close is still due.
        open: ctx
            .upstream
            .channels
            .outbound()
            .into_iter()
            .filter_map(|s| {
                Some(protocol::OpenChannel {
                    channel: s.channel,
                    worker_id: s.tag?.to_string(),
                    from: s.from,
                    sent: s.sent,
                    label: s.label.map(|l| l.to_string()),
                })
            })
            .collect(),
        config_version: ctx.node.config_version(),
        capabilities: Some(report),
    });
    ws.send(WsMessage::text(hello.encode()))
        .await
        .map_err(|e| AgentError::ConnectionLost(e.to_string()))?;
    let text = tokio::time::timeout(Duration::from_secs(15), next_text(&mut ws))
        .await
        .map_err(|_| AgentError::ConnectionLost("no welcome within 15 s".into()))??;
    let welcome: Welcome = match Message::decode(&text) {
        Ok(Message::Welcome(w)) => w,
        Ok(Message::Error { error, .. }) if error.code == ErrorCode::Unauthorized => {
            return Err(AgentError::Unauthorized(error.to_string()));
        }
        Ok(Message::Error { error, .. }) => {
            return Err(AgentError::ConnectionLost(error.to_string()));
        }
        other => {
            return Err(AgentError::ConnectionLost(format!(
                "expected welcome, got {other:?}"
            )));
        }
    };
    let span = info_span!("session", node_id = %cfg.node_id, session_id = %welcome.session_id);
    info!(parent: &span, "connected to server");
    // Both sides use the server's heartbeat settings; the server's pings
    // keep the link alive, this end pings only when it hears nothing.
    let beat = Heartbeat {
        interval: Duration::from_secs(welcome.heartbeat_interval_secs.max(1)),
        timeout: Duration::from_secs(welcome.heartbeat_timeout_secs.max(2)),
        ping: PingWhen::Silent,
    };
    run_loop(ws, beat, ctx, shutdown, welcome.channels)
        .instrument(span)
        .await
}

/// The agent's side of the connection: requests go to their handlers,
/// frames to their channels.
struct AgentPeer<'a> {
    ctx: &'a Arc<Ctx>,
}

impl crate::conn::Peer for AgentPeer<'_> {
    fn on_text(&mut self, text: &str) {
        on_text(text, self.ctx);
    }

    fn on_binary(&mut self, data: bytes::Bytes) {
        if let Err(error) = self.ctx.upstream.channels.on_binary(data) {
            warn!(%error, "bad frame from server");
        }
    }
}

fn incoming(
    m: Result<WsMessage, tungstenite::Error>,
) -> Result<Incoming<tungstenite::Utf8Bytes>, tungstenite::Error> {
    Ok(match m? {
        WsMessage::Text(t) => Incoming::Text(t),
        WsMessage::Binary(b) => Incoming::Binary(b),
        WsMessage::Close(f) => {
            Incoming::Close(f.map(|f| Close::new(f.code.into(), f.reason.as_str())))
        }
        _ => Incoming::Control, // tungstenite answers pings itself
    })
}

async fn run_loop(
    ws: Ws,
    beat: Heartbeat,
    ctx: Arc<Ctx>,
    shutdown: &CancellationToken,
    peer_channels: Vec<protocol::ChannelState>,
) -> Result<(), AgentError> {
    let (sink, stream) = ws.split();
    let (out, out_rx) = mpsc::unbounded_channel::<Outbound>();
    let session_end = CancellationToken::new();

    // The writer owns the sink, so a slow socket never stops the reader.
    let writer = tokio::spawn(crate::conn::write_loop(sink, out_rx, to_ws));
    // Replay what the server missed, then carry new traffic on this link.
    let resumed = ctx
        .upstream
        .channels
        .resume(&peer_channels, |_| false, out.clone());
    for ch in &resumed.lost {
        ctx.execs.ended(*ch);
    }
    if !peer_channels.is_empty() || !resumed.lost.is_empty() {
        info!(
            resumed = peer_channels.len(),
            lost = resumed.lost.len(),
            "channels resumed"
        );
    }
    let health = tokio::spawn(super::health::watch_docker(
        ctx.clone(),
        session_end.clone(),
    ));
    let stop = async {
        shutdown.cancelled().await;
        Close::new(Close::GOING_AWAY, "agent shutting down")
    };
    let end = crate::conn::run(
        stream.map(incoming),
        &out,
        Some(beat),
        &mut AgentPeer { ctx: &ctx },
        stop,
    )
    .await;
    session_end.cancel();
    // It holds no resources of its own: stopping it mid-probe is safe.
    health.abort();
    // Channels stay open: their work goes on and resumes on the next link.
    ctx.upstream.link.set(None);
    drop(out);
    let result = match end {
        End::Local(_) => Ok(()),
        End::Remote(Some(c)) if c.code == Close::GOING_AWAY => Err(AgentError::ServerGoingAway(
            format!("server closed the connection ({}: {})", c.code, c.reason),
        )),
        other => Err(AgentError::ConnectionLost(other.to_string())),
    };
    if result.is_ok() {
        // Let the close frame go out.
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    } else {
        writer.abort();
    }
    result
}

fn on_text(text: &str, ctx: &Arc<Ctx>) {
    let channels = &ctx.upstream.channels;
    let out = &ctx.upstream.link;
    let limit = ctx.node.request_limit();
    if text.len() > limit {
        // Answer the request itself, so the server does not wait for a reply.
        let e = Message::oversized(
            text,
            format!(
                "control message of {} bytes exceeds the node's max_request_bytes ({limit})",
                text.len()
            ),
        );
        let _ = out.send(Outbound::msg(&Message::Error {
            id: e.id,
            error: e.error,
        }));
        return;
    }
    let msg = match Message::decode(text) {
        Ok(m) => m,
        Err(e) => {
            debug!(error = %e.error, "bad message from server");
            let _ = out.send(Outbound::msg(&Message::Error {
                id: e.id,
                error: e.error,
            }));
            return;
        }
    };
    match msg {
        Message::Request { id, request } => commands::dispatch(id, request, ctx.clone()),
        Message::Window(w) => channels.on_window(w),
        Message::ChannelEof(c) => channels.on_eof(c.channel),
        Message::ChannelClose(c) => {
            // Server cancels: readers see the close (an upload aborts rather
            // than ending cleanly), writers and tasks stop.
            channels.on_close(protocol::ChannelClose {
                channel: c.channel,
                exit_code: None,
                error: Some(c.error.unwrap_or_else(|| {
                    ErrorBody::new(ErrorCode::Unavailable, "cancelled by the server")
                })),
            });
        }
        Message::Unknown { kind, id } => {
            let _ = out.send(Outbound::msg(&Message::error(
                id,
                ErrorCode::Unsupported,
                format!("unknown message type {kind:?}"),
            )));
        }
        Message::Error { id, error } => warn!(?id, %error, "server reported an error"),
        Message::Token(t) => {
            // Never logged; used for the next connection and kept 0600 for
            // the next start (written off this thread: it syncs to disk).
            *ctx.upstream.refreshed_token.lock().unwrap() = Some(t.node_jwt.clone());
            info!(expires_at = %t.expires_at, "node token refreshed");
            let path = ctx.upstream.token_path.clone();
            ctx.spawn(async move {
                if let Err(e) = crate::private_file::store(path, t.node_jwt).await {
                    warn!(error = %e, "could not store the refreshed node token");
                }
            });
        }
        other => {
            let _ = out.send(Outbound::msg(&Message::error(
                None,
                ErrorCode::InvalidRequest,
                format!("unexpected message from server: {}", other.encode()),
            )));
        }
    }
}
