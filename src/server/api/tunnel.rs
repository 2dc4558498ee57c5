//! The tunnel WebSocket: one TCP connection to a port of a worker.
//! Binary messages from the client are bytes for the worker; the server's
//! are data frames (a kind byte, then bytes). `stdin_eof` from the client
//! and `eof` from the server are half-closes; `exit` or `error` ends it. A
//! client that acknowledges output (`?acks=true`, then `ack` messages, as
//! an exec's) can lose its connection and re-attach
//! (`?attach=CHANNEL&offset=N`) without losing a byte either way.

use super::exec::{bounded, reattach, serve};
use super::*;
use crate::protocol::operator::TunnelInfo;

#[derive(Deserialize)]
pub(super) struct TunnelQuery {
    /// Re-attach to this tunnel channel instead of opening a connection.
    attach: Option<u32>,
    /// Output bytes the re-attaching client already has.
    #[serde(default)]
    offset: u64,
    /// The client acknowledges output and keeps its input until
    /// `stdin_ack`: the tunnel is kept for a re-attach when it goes.
    #[serde(default)]
    acks: bool,
}

pub(super) async fn tunnel_ws(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, port)): Path<(String, String)>,
    Query(q): Query<TunnelQuery>,
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
    if let Some(channel) = q.attach {
        // Refused before the upgrade, so the client can retry on 404.
        if let Err(e) = app.hub.can_attach(&id, channel, caller.reattaches_as()) {
            return error_response(e);
        }
        return bounded(ws).on_upgrade(move |socket| async move {
            let (mut tx, rx) = socket.split();
            match reattach(&app, &caller, &id, channel, q.offset, &mut tx).await {
                Ok(d) => serve(app, d, true, q.offset, tx, rx).await,
                Err(e) => {
                    let _ = tx.send(end_message(None, Some(e))).await;
                    close(tx, rx, std::future::pending()).await;
                }
            }
        });
    }
    // Connected before the upgrade: a refusal is an HTTP error with its code.
    let conn = app.tunnels.connect(&id, port);
    match app.hub.tunnel(&id, port).await {
        Ok(mut t) => {
            t.output.report_eof();
            if q.acks {
                t.output.set_manual_ack();
            }
            let mut d = DetachedExec::new(&id, t);
            d.state.tunnel = Some(conn);
            d.state.owner = Some(caller.name.clone());
            bounded(ws).on_upgrade(move |socket| {
                let (tx, rx) = socket.split();
                serve(app, d, q.acks, 0, tx, rx)
            })
        }
        Err(e) => error_response(e),
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
