//! The exec WebSocket (§12.6): start or re-attach, stdin and output with
//! acknowledgements, hand-back for a re-attach.

use super::*;
use crate::server::relay::{StdinQueue, already_had};

#[derive(Deserialize)]
pub(super) struct ExecQuery {
    /// Re-attach to this exec channel instead of starting a command.
    pub(super) attach: Option<u32>,
    /// Output bytes the re-attaching client already has.
    #[serde(default)]
    pub(super) offset: u64,
}

/// The largest message an operator's exec or tunnel WebSocket takes
/// (`ctl` sends input in pieces of at most 64 KiB). Input waits in the
/// server until the agent grants credit, so the size of a message bounds
/// what one connection can make the server hold beyond its window.
pub(super) const MAX_CLIENT_MESSAGE: usize = 1024 * 1024;

/// An operator's WebSocket, its messages bounded ([`MAX_CLIENT_MESSAGE`]).
pub(super) fn bounded(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
}

/// How long an exec's WebSocket may wait for its options.
const EXEC_OPTIONS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) async fn exec_ws(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<ExecQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    // Refuse a re-attach before upgrading, so the client can retry on 404.
    if let Some(channel) = q.attach
        && let Err(e) = app.hub.can_attach(&id, channel, caller.reattaches_as())
    {
        return error_response(e);
    }
    bounded(ws).on_upgrade(move |socket| exec_session(app, caller, id, q, socket))
}

/// Starts an exec (the client's first text message is the [`ExecOptions`])
/// or takes back a detached one (`?attach=CHANNEL&offset=N`), resending what
/// the client lacks.
pub(super) async fn open_exec(
    app: &AppState,
    caller: &Caller,
    worker_id: &str,
    q: &ExecQuery,
    tx: &mut WsTx,
    rx: &mut WsRx,
) -> Result<(DetachedExec, bool), ErrorBody> {
    if let Some(channel) = q.attach {
        return Ok((
            reattach(app, caller, worker_id, channel, q.offset, tx).await?,
            true,
        ));
    }
    // An authenticated connection is never closed to make room: one that
    // never says what to run must not hold its slot for ever.
    let first = tokio::time::timeout(EXEC_OPTIONS_TIMEOUT, rx.next()).await;
    let opts: ExecOptions = match first {
        Ok(Some(Ok(WsMessage::Text(t)))) => serde_json::from_str(t.as_str()).map_err(|e| {
            ErrorBody::new(ErrorCode::InvalidRequest, format!("bad exec options: {e}"))
        })?,
        Err(_) => {
            return Err(ErrorBody::new(
                ErrorCode::Timeout,
                format!("no exec options within {EXEC_OPTIONS_TIMEOUT:?}"),
            ));
        }
        _ => {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "expected the exec options first",
            ));
        }
    };
    let client_acks = opts.client_acks;
    let op = super::workers::WorkerOp::start(app, worker_id);
    let args = json!({"cmd": opts.cmd, "workdir": opts.workdir, "env": opts.env, "tty": opts.tty});
    let opened = app.hub.exec(worker_id, opts).await;
    let mut end = op.record(app, caller, "api:exec", &args, &opened);
    let mut session = opened?;
    if client_acks {
        session.output.set_manual_ack();
    }
    let mut d = DetachedExec::new(worker_id, session);
    d.state.owner = Some(caller.name.clone());
    // Its end is recorded too, with the exit code: `api:exec_end`.
    end.operation = "api:exec_end".into();
    d.state.audit = Some((end, std::time::Instant::now()));
    Ok((d, client_acks))
}

/// Takes back a detached exec or tunnel for a client that has its output
/// up to `offset`, resending what it lacks.
pub(super) async fn reattach(
    app: &AppState,
    caller: &Caller,
    worker_id: &str,
    channel: u32,
    offset: u64,
    tx: &mut WsTx,
) -> Result<DetachedExec, ErrorBody> {
    let mut d = app
        .hub
        .take_exec(worker_id, channel, caller.reattaches_as())
        .await?;
    // An exec adopted after a restart has no known starter: the first
    // operator to take it back (not the admin) becomes it.
    if d.state.owner.is_none() && !caller.is_admin() {
        d.state.owner = Some(caller.name.clone());
    }
    let resume = d.state.relay.resume(offset, d.session.output.position());
    if let Some((from, to)) = resume.gap {
        // Never silent: say exactly what is missing.
        let _ = tx.send(text(&ServerMsg::Gap { from, to })).await;
    }
    for (kind, b) in &resume.resend {
        if tx.send(data_frame(*kind, b)).await.is_err() {
            return Err(ErrorBody::new(ErrorCode::Unavailable, "client went away"));
        }
    }
    if d.state.eof && tx.send(text(&ServerMsg::Eof)).await.is_err() {
        return Err(ErrorBody::new(ErrorCode::Unavailable, "client went away"));
    }
    d.session.output.ack(resume.acked);
    Ok(d)
}

/// The exec WebSocket. After a `started` text naming the channel, binary
/// frames carry stdin (client) and output (server, kind-prefixed); the
/// server ends with an `exit` or `error` text. A client that acknowledges
/// output can lose its connection (or the server can restart) and re-attach
/// within the attach grace without losing a byte; otherwise leaving cancels
/// the exec.
pub(super) async fn exec_session(
    app: Arc<AppState>,
    caller: Caller,
    worker_id: String,
    q: ExecQuery,
    socket: WebSocket,
) {
    let (mut tx, mut rx) = socket.split();
    let (d, client_acks) = match open_exec(&app, &caller, &worker_id, &q, &mut tx, &mut rx).await {
        Ok(x) => x,
        Err(e) => {
            let _ = tx.send(end_message(None, Some(e))).await;
            close(tx, rx, std::future::pending()).await;
            return;
        }
    };
    // A client re-attaching ahead of what this server has (a new server
    // adopts from the agent's last acknowledged byte) skips what it has.
    let skip_until = if q.attach.is_some() { q.offset } else { 0 };
    serve(app, d, client_acks, skip_until, tx, rx).await
}

/// Serves an exec's or a tunnel's connection until its end or until the
/// client goes; a client that acknowledges output gets it kept for a
/// re-attach ([`hand_back`]).
pub(super) async fn serve(
    app: Arc<AppState>,
    d: DetachedExec,
    client_acks: bool,
    skip_until: u64,
    mut tx: WsTx,
    mut rx: WsRx,
) {
    let DetachedExec {
        worker_id,
        session,
        mut state,
    } = d;
    let closed = state.tunnel.as_ref().map(|t| t.closed());
    let closed_by_operator = async move {
        match closed {
            Some(c) => c.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(closed_by_operator);
    let Duplex { input, mut output } = session;
    // A newer connection of this client (it lost this one, perhaps without
    // the server noticing) takes the exec over: this one hands it back.
    let held = client_acks.then(|| {
        app.hub.hold_exec(
            &worker_id,
            output.node_id(),
            output.channel(),
            state.owner.as_deref(),
        )
    });
    let taken_over = async {
        match &held {
            Some(h) => h.taken_over().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(taken_over);
    // `stdin_offset`: input bytes this server has; a re-attaching client
    // sends what it has beyond (it keeps stdin until `stdin_ack` covers it).
    // The server pings every heartbeat interval, so a client that hears
    // nothing for `idle_timeout_secs` knows the connection is dead (it may
    // never fail on its own) and can re-attach.
    let started = ServerMsg::Started(Started {
        channel: Some(output.channel()),
        offset: Some(output.position()),
        stdin_offset: Some(input.offset()),
        idle_timeout_secs: app.cfg.heartbeat_timeout.as_secs(),
        stdin_window: Some(app.cfg.stdin_window as u64),
    });
    let mut keepalive = keepalive(&app);
    let stdin_progress = input.progress();
    // The latest `stdin_ack` this connection said: none yet, so that a
    // re-attached client hears what the agent already has (it may have
    // missed that ack, and keeps that input until it hears it).
    let mut stdin_acked = 0;
    // Input bytes this server has had: sent to the agent, or waiting.
    let mut stdin_in = input.offset();
    let mut ack_tick = tokio::time::interval(Duration::from_millis(20));
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let kept = |input, output, state| DetachedExec {
        worker_id: worker_id.clone(),
        session: Duplex { input, output },
        state,
    };
    if tx.send(text(&started)).await.is_err() {
        return hand_back(&app, kept(input, output, state), client_acks);
    }
    // Stdin is written by its own task, so waiting for stdin credit never
    // stops output (the process may need its output read to read input).
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(16);
    let stop = tokio_util::sync::CancellationToken::new();
    let stop_writing = stop.clone();
    let mut writer = tokio::spawn(async move {
        let mut input = input;
        let write_all = async {
            while let Some(item) = stdin_rx.recv().await {
                match item {
                    Some(b) => {
                        let _ = input.write(b).await;
                    }
                    None => input.close(),
                }
            }
        };
        // Stopping mid-write is safe: `input.offset()` counts what went
        // out, and a re-attaching client resends from there.
        tokio::select! {
            _ = stop_writing.cancelled() => {}
            _ = write_all => {}
        }
        input
    });
    let channel = output.channel();
    // Client messages are read on while stdin waits for the writer, so
    // that acknowledgements behind it get through (else a process that
    // echoes its input, blocked on output the client cannot acknowledge,
    // would never read more input). Input waits here, up to the stdin window:
    // a client that keeps what it sent beyond `stdin_ack` under that never
    // finds this server not reading; beyond it, reading stops.
    let mut stdin_buf = StdinQueue::new(app.cfg.stdin_window);
    let resizes = Resizes::default();
    let mut said_end = None;
    let mut cancelled = false;
    let ended = loop {
        // A re-attach after the end went out into a connection that did not
        // close: the client may lack only the end (and what `relay` held).
        if let Some((exit_code, error)) = state.end.take() {
            let sent = send_unless(
                &mut tx,
                end_message(exit_code, error.clone()),
                &mut taken_over,
            )
            .await;
            said_end = sent.then_some((exit_code, error));
            break sent;
        }
        tokio::select! {
            _ = &mut taken_over => {
                tracing::info!(%worker_id, channel, "a newer connection of the client takes the exec over");
                break false;
            }
            permit = stdin_tx.reserve(), if !stdin_buf.is_empty() => match permit {
                Ok(p) => p.send(stdin_buf.pop().flatten()),
                Err(_) => stdin_buf.clear(),
            },
            // Tell the client how much of its input the agent has, so it
            // can forget it (and resend the rest after a re-attach), and
            // send more.
            _ = ack_tick.tick(), if client_acks && stdin_acked < stdin_in => {
                let acked = stdin_progress.acked();
                if acked > stdin_acked {
                    stdin_acked = acked;
                    let m = text(&ServerMsg::StdinAck { offset: acked });
                    if !send_unless(&mut tx, m, &mut taken_over).await {
                        break false;
                    }
                }
            }
            _ = keepalive.tick() => {
                if !send_unless(&mut tx, WsMessage::Ping(Default::default()), &mut taken_over).await {
                    break false;
                }
            }
            _ = &mut closed_by_operator => {
                let error = ErrorBody::new(ErrorCode::Unavailable, "an operator closed the tunnel");
                let sent = send_unless(&mut tx, end_message(None, Some(error.clone())), &mut taken_over).await;
                if sent {
                    said_end = Some((None, Some(error)));
                } else {
                    state.end = Some((None, Some(error)));
                }
                break sent;
            }
            ev = output.next() => match ev.map(|ev| match ev {
                StreamEvent::Eof => None,
                ev => Some(ev.into_frame()),
            }) {
                // A tunnel's half-close, said once (and again on re-attach).
                Some(None) => {
                    state.eof = true;
                    if !send_unless(&mut tx, text(&ServerMsg::Eof), &mut taken_over).await {
                        break false;
                    }
                }
                Some(Some(Ok((k, b)))) => {
                    if let Some(t) = &state.tunnel {
                        t.from_worker(b.len());
                    }
                    let start = output.position() - b.len() as u64;
                    let skip = already_had(start, b.len(), skip_until);
                    if skip > 0 {
                        // The client has these already: they count as
                        // acknowledged, or credit could stall right here.
                        output.ack(start + skip as u64);
                    }
                    if skip == b.len() {
                        continue;
                    }
                    let b = b.slice(skip..);
                    if client_acks {
                        state.relay.sent(k, start + skip as u64, b.clone());
                    }
                    if !send_unless(&mut tx, data_frame(k, &b), &mut taken_over).await {
                        break false;
                    }
                }
                Some(Some(Err((exit_code, error)))) => {
                    if let Some((mut rec, t0)) = state.audit.take() {
                        rec.exit_code = exit_code;
                        rec.outcome = super::workers::outcome(error.as_ref());
                        rec.bytes = Some(output.position());
                        rec.duration_ms = t0.elapsed().as_millis() as u64;
                        super::workers::append_audit(&app, rec);
                    }
                    let sent = send_unless(&mut tx, end_message(exit_code, error.clone()), &mut taken_over).await;
                    if sent {
                        said_end = Some((exit_code, error));
                    } else {
                        state.end = Some((exit_code, error));
                    }
                    break sent;
                }
                None => break true,
            },
            m = rx.next(), if stdin_buf.has_room() => match m {
                Some(Ok(WsMessage::Binary(b))) => {
                    if let Some(t) = &state.tunnel {
                        t.to_worker(b.len());
                    }
                    stdin_in += b.len() as u64;
                    stdin_buf.data(b);
                }
                Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ClientMsg>(t.as_str()) {
                    Ok(ClientMsg::Resize { cols, rows }) => {
                        if resizes.want(TermSize { cols, rows }) {
                            let (hub, r) = (app.hub.clone(), resizes.clone());
                            let (w, ch) = (worker_id.clone(), channel);
                            app.hub.spawn_task(async move {
                                while let Some(size) = r.next() {
                                    let _ = hub.resize(&w, ch, size).await;
                                }
                            });
                        }
                    }
                    Ok(ClientMsg::StdinEof) => stdin_buf.eof(),
                    Ok(ClientMsg::Ack { offset }) => {
                        output.ack(offset);
                        state.relay.ack(offset);
                    }
                    Ok(ClientMsg::Cancel) => {
                        cancelled = true;
                        break false;
                    }
                    // Unknown or malformed: a newer client's, ignored.
                    Ok(ClientMsg::Unknown) | Err(_) => {}
                },
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break false,
                Some(Ok(_)) => {}
            },
        }
    };
    drop(stdin_tx);
    if cancelled {
        // Dropping the output cancels the exec or tunnel on the agent.
        writer.abort();
        return;
    }
    if ended {
        let Some(end) = said_end else {
            writer.abort();
            return; // the exec's stream ended without an end message
        };
        // A client that acknowledges output closes once it has the end; one
        // that does not (its connection may have died without a sign) can
        // re-attach and get the end again.
        if close(tx, rx, &mut taken_over).await || !client_acks {
            writer.abort();
            return;
        }
        stop.cancel();
        let Ok(input) = writer.await else { return };
        state.end = Some(end);
        return hand_back(&app, kept(input, output, state), client_acks);
    }
    // The client went away mid-command: give stdin a moment to drain, then
    // stop writing it (the agent may be away too: credit can take long). A
    // client that acknowledges output keeps its input until `stdin_ack` and
    // sends from `stdin_offset` again when it re-attaches, so nothing is lost.
    let input = match tokio::time::timeout(Duration::from_secs(2), &mut writer).await {
        Ok(Ok(input)) => input,
        Ok(Err(_)) => return,
        Err(_) => {
            stop.cancel();
            match writer.await {
                Ok(input) => input,
                Err(_) => return,
            }
        }
    };
    hand_back(&app, kept(input, output, state), client_acks);
}

/// Sends `m`; false if that failed or `stop` came first (a dead connection
/// may block a send for good: a takeover does not wait for it).
pub(super) async fn send_unless(
    tx: &mut WsTx,
    m: WsMessage,
    stop: impl std::future::Future<Output = ()>,
) -> bool {
    tokio::select! {
        r = tx.send(m) => r.is_ok(),
        _ = stop => false,
    }
}

/// Keeps a detached exec or tunnel for re-attachment, or drops it
/// (cancelling it on the agent) when its client cannot re-attach.
pub(super) fn hand_back(app: &AppState, d: DetachedExec, client_acks: bool) {
    if client_acks {
        app.hub.detach_exec(d, app.cfg.attach_grace);
    }
}

/// A session's terminal sizes on their way to the agent: one request at a
/// time, the newest size wins. A client that sends resizes faster than the
/// agent answers holds one waiting size, not a task and a request each.
#[derive(Default, Clone)]
struct Resizes(Arc<std::sync::Mutex<(Option<TermSize>, bool)>>);

impl Resizes {
    /// Notes the size wanted; true if the caller is to start the sender
    /// (none is running).
    fn want(&self, size: TermSize) -> bool {
        let mut g = self.0.lock().unwrap();
        g.0 = Some(size);
        !std::mem::replace(&mut g.1, true)
    }

    /// The size to send next; `None` (and the sender stops) when none is
    /// waiting.
    fn next(&self) -> Option<TermSize> {
        let mut g = self.0.lock().unwrap();
        let next = g.0.take();
        g.1 = next.is_some();
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizes_go_one_at_a_time_and_the_newest_wins() {
        let r = Resizes::default();
        let size = |cols| TermSize { cols, rows: 24 };
        assert!(r.want(size(80)), "the first starts a sender");
        for cols in 81..10_000 {
            assert!(!r.want(size(cols)), "one sender at a time");
        }
        assert_eq!(r.next(), Some(size(9_999)));
        assert_eq!(r.next(), None, "the sender stops");
        assert!(r.want(size(100)), "and a later one starts another");
        assert_eq!(r.next(), Some(size(100)));
    }
}
