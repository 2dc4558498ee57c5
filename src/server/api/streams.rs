//! What the exec and logs WebSockets share (typed messages in
//! `protocol::operator`), and the logs WebSocket.

use super::*;

/// A data frame for an operator WebSocket (§12: kind byte, then bytes).
pub(super) fn data_frame(kind: StreamKind, b: &[u8]) -> WsMessage {
    WsMessage::Binary(operator::data_frame(kind, b))
}

pub(super) fn text(m: &ServerMsg) -> WsMessage {
    WsMessage::Text(m.encode().into())
}

pub(super) fn end_message(exit_code: Option<i64>, error: Option<ErrorBody>) -> WsMessage {
    text(&ServerMsg::end(exit_code, error))
}

pub(super) type WsTx = futures_util::stream::SplitSink<WebSocket, WsMessage>;
pub(super) type WsRx = futures_util::stream::SplitStream<WebSocket>;

/// Closes a WebSocket whose last message went out: reads on (and drops
/// what comes) until the client closes too, for up to 5 s or until `stop`.
/// Dropping the socket with the client's messages unread (acks, input sent
/// before it saw the end) would reset the connection, and a reset can
/// discard the final message before the client has read it. True if the
/// client closed (or its connection failed) in time.
pub(super) async fn close(
    mut tx: WsTx,
    mut rx: WsRx,
    stop: impl std::future::Future<Output = ()>,
) -> bool {
    let drained = async {
        let _ = tx.close().await;
        loop {
            match rx.next().await {
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::select! {
        r = tokio::time::timeout(CLOSE_WAIT, drained) => r.is_ok(),
        _ = stop => false,
    }
}

/// When an operator WebSocket pings its client: every heartbeat interval,
/// the first one interval from now. A client that hears nothing for
/// `idle_timeout_secs` (the heartbeat timeout) knows the connection died.
pub(super) fn keepalive(app: &AppState) -> tokio::time::Interval {
    let every = app.cfg.heartbeat_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// How long a client has to close after the end of its exec.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
pub(super) struct LogsQuery {
    #[serde(default)]
    pub(super) follow: bool,
    pub(super) since: Option<i64>,
    pub(super) tail: Option<u64>,
    #[serde(default)]
    pub(super) timestamps: bool,
}

pub(super) async fn logs_ws(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let opts = LogOptions {
        follow: q.follow,
        since: q.since,
        tail: q.tail,
        timestamps: q.timestamps,
    };
    ws.on_upgrade(move |socket| async move {
        let (mut tx, mut rx) = socket.split();
        let mut stream = match app.hub.logs(&id, opts).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(end_message(None, Some(e))).await;
                return;
            }
        };
        // Pings every heartbeat interval: a client that hears nothing for
        // `idle_timeout_secs` knows the connection died and can open anew.
        let started = ServerMsg::Started(Started {
            idle_timeout_secs: app.cfg.heartbeat_timeout.as_secs(),
            ..Default::default()
        });
        if tx.send(text(&started)).await.is_err() {
            return;
        }
        let mut keepalive = keepalive(&app);
        loop {
            tokio::select! {
                _ = keepalive.tick() => {
                    if tx.send(WsMessage::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
                ev = stream.next() => match ev.map(StreamEvent::into_frame) {
                    Some(Ok((k, b))) => {
                        if tx.send(data_frame(k, &b)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err((exit_code, error))) => {
                        let _ = tx.send(end_message(exit_code, error)).await;
                        break;
                    }
                    None => break,
                },
                m = rx.next() => if !matches!(m, Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) {
                    return; // client left: dropping the stream cancels it
                }
            }
        }
        let _ = tx.close().await;
    })
}
