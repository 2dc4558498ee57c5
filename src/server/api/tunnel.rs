//! The tunnel WebSocket: one TCP connection to a port of a worker.
//! Binary messages from the client are bytes for the worker; the server's
//! are data frames (a kind byte, then bytes). `stdin_eof` from the client
//! and `eof` from the server are half-closes; `exit` or `error` ends it.

use super::*;
use crate::protocol::operator::TunnelInfo;
use crate::server::relay::StdinQueue;
use crate::server::tunnels::Connection;

/// What a tunnel lets wait from its client for the agent's credit.
const TUNNEL_INPUT_WINDOW: usize = 1024 * 1024;

pub(super) async fn tunnel_ws(
    State(app): State<Arc<AppState>>,
    Path((id, port)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> Response {
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            return error_response(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!("port must be 1 to 65535, got {port:?}"),
            ));
        }
    };
    // Connected before the upgrade: a refusal is an HTTP error with its code.
    let conn = app.tunnels.connect(&id, port);
    match app.hub.tunnel(&id, port).await {
        Ok(t) => ws.on_upgrade(move |socket| tunnel_session(app, t, conn, socket)),
        Err(e) => error_response(e),
    }
}

async fn tunnel_session(app: Arc<AppState>, t: Duplex, conn: Connection, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let Duplex {
        mut input,
        mut output,
    } = t;
    output.report_eof();
    if tx
        .send(text(&ServerMsg::Started(Started::default())))
        .await
        .is_err()
    {
        return;
    }
    let mut keepalive = keepalive(&app);
    // The client's bytes wait here for the agent's credit, so the client is
    // read on (and the worker's answer sent on) while a write waits.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(16);
    let writer = async move {
        while let Some(item) = in_rx.recv().await {
            match item {
                Some(b) => {
                    if input.write(b).await.is_err() {
                        break;
                    }
                }
                None => input.close(),
            }
        }
        // Never completes: the stream's end decides when the tunnel is over.
        std::future::pending::<()>().await;
    };
    tokio::pin!(writer);
    let mut waiting = StdinQueue::new(TUNNEL_INPUT_WINDOW);
    let end = loop {
        tokio::select! {
            _ = &mut writer => {}
            permit = in_tx.reserve(), if !waiting.is_empty() => match permit {
                Ok(p) => p.send(waiting.pop().flatten()),
                Err(_) => waiting.clear(),
            },
            _ = conn.closed() => break Some(end_message(None, Some(ErrorBody::new(
                ErrorCode::Unavailable,
                "an operator closed the tunnel",
            )))),
            _ = keepalive.tick() => {
                if tx.send(WsMessage::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            ev = output.next() => match ev {
                Some(StreamEvent::Data(_, b)) => {
                    conn.from_worker(b.len());
                    if tx.send(data_frame(StreamKind::Data, &b)).await.is_err() {
                        break None;
                    }
                }
                Some(StreamEvent::Eof) => {
                    if tx.send(text(&ServerMsg::Eof)).await.is_err() {
                        break None;
                    }
                }
                Some(StreamEvent::Gap(_)) => {}
                Some(StreamEvent::End { exit_code, error }) => break Some(end_message(exit_code, error)),
                None => break Some(end_message(None, None)),
            },
            m = rx.next(), if waiting.has_room() => match m {
                Some(Ok(WsMessage::Binary(b))) => {
                    conn.to_worker(b.len());
                    waiting.data(b)
                }
                Some(Ok(WsMessage::Text(t))) => {
                    if let Ok(ClientMsg::StdinEof) = serde_json::from_str::<ClientMsg>(t.as_str()) {
                        waiting.eof();
                    }
                }
                // The client left: the connection to the worker goes too.
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break None,
                Some(Ok(_)) => {}
            },
        }
    };
    // Dropping `output` before its end cancels the tunnel on the agent.
    drop(output);
    if let Some(m) = end
        && tx.send(m).await.is_ok()
    {
        close(tx, rx, std::future::pending()).await;
    }
}

/// `GET /api/v1/tunnels`: open tunnels with their connections and bytes.
pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Json<Vec<TunnelInfo>> {
    let mut open = app.tunnels.list();
    open.retain(|t| sees_worker(&app, &caller, &t.worker_id));
    Json(open)
}

/// `DELETE /api/v1/tunnels/{id}`: ends every connection of `WORKER:PORT`.
pub(super) async fn close_tunnel(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let worker = id.rsplit_once(':').map_or(id.as_str(), |(w, _)| w);
    if sees_worker(&app, &caller, worker) && app.tunnels.close(&id) {
        tracing::info!(tunnel = %id, "tunnel closed by an operator");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ErrorBody::new(ErrorCode::NotFound, format!("no open tunnel {id:?}")).into())
    }
}
