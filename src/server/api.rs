//! The operator HTTP API (bearer operator token) and node registration
//! (bearer pre-shared key). Errors are `{"error": {"code", "message"}}` with
//! the HTTP status of the code.

use super::conn::Admission;
use super::hub::{
    ChannelSink, ChannelStream, DetachedExec, ExecOptions, ExecSession, LogOptions, StreamEvent,
};
use super::{AppState, auth};
use crate::protocol::operator::{self, ClientMsg, ServerMsg, Started};
use crate::protocol::{
    AGENT_CONNECT_PATH, Bootstrap, ErrorBody, ErrorCode, NodeAuth, Orchestrator, REGISTER_PATH,
    RegisterRequest, SpawnRequest, StreamKind, TermSize,
};
use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Maximum size of a JSON request body on the API.
const MAX_JSON_BODY: usize = 1024 * 1024;

pub(crate) fn error_response(e: ErrorBody) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!({ "error": e }))).into_response()
}

struct ApiError(ErrorBody);

impl From<ErrorBody> for ApiError {
    fn from(e: ErrorBody) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.0)
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub(super) fn router(state: Arc<AppState>) -> Router {
    let operator = Router::new()
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/nodes/{id}", get(node).delete(forget_node))
        .route("/api/v1/nodes/{id}/drain", post(drain))
        .route("/api/v1/nodes/{id}/undrain", post(undrain))
        .route("/api/v1/nodes/{id}/config", axum::routing::put(push_config))
        .route("/api/v1/workers", get(workers).post(spawn))
        .route("/api/v1/workers/{id}", get(worker).delete(remove))
        .route("/api/v1/workers/{id}/stop", post(stop))
        .route("/api/v1/workers/{id}/exec", get(exec_ws))
        .route("/api/v1/workers/{id}/logs", get(logs_ws))
        .route("/api/v1/workers/{id}/stat", get(stat))
        .route(
            "/api/v1/workers/{id}/archive",
            get(get_archive).put(put_archive),
        )
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_operator,
        ));
    Router::new()
        .merge(operator)
        .route(REGISTER_PATH, post(register))
        .route(AGENT_CONNECT_PATH, get(super::agent_ws::connect))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async {
            error_response(ErrorBody::new(ErrorCode::NotFound, "no such endpoint"))
        })
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn(close_refused_upgrades))
        .with_state(state)
}

/// A refused WebSocket upgrade (bad token, wrong subprotocol, no such
/// route) gets its error and then `Connection: close`: hyper closes the
/// connection after the response instead of keeping an unauthenticated
/// socket open for another request.
async fn close_refused_upgrades(req: Request, next: Next) -> Response {
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let mut resp = next.run(req).await;
    if upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Every refusal is a JSON error body, including axum's own rejections
/// (bad query strings, wrong method, a plain GET on a WebSocket route).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status.as_u16() {
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::PolicyDenied,
        404 => ErrorCode::NotFound,
        413 => ErrorCode::TooLarge,
        s if s < 500 => ErrorCode::InvalidRequest,
        _ => ErrorCode::Internal,
    };
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if text.is_empty() {
        status.to_string()
    } else {
        text
    };
    let mut r = error_response(ErrorBody::new(code, message));
    *r.status_mut() = status;
    r
}

async fn require_operator(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let given = auth::bearer(
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    );
    match given {
        Some(t) if auth::secret_eq(t, &app.admin_token) => {
            super::conn::authenticated(req.extensions());
            next.run(req).await
        }
        Some(_) => error_response(ErrorBody::new(
            ErrorCode::Unauthorized,
            "invalid operator token",
        )),
        None => error_response(ErrorBody::new(
            ErrorCode::Unauthorized,
            "missing operator token (Authorization: Bearer <token from admin.token>)",
        )),
    }
}

async fn register(
    State(app): State<Arc<AppState>>,
    admission: Option<Extension<Admission>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Bootstrap>> {
    let psk = auth::bearer(headers.get("authorization").and_then(|v| v.to_str().ok()));
    if !psk.is_some_and(|p| auth::secret_eq(p, &app.cfg.psk)) {
        return Err(
            ErrorBody::new(ErrorCode::Unauthorized, "wrong or missing registration key").into(),
        );
    }
    if let Some(Extension(a)) = admission {
        a.authenticated();
    }
    // Parsed here, after the key: any malformed body is a 400 the agent
    // knows to be permanent (§2.1), never a framework's 415 or 422.
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    let parsed = if json_type {
        serde_json::from_slice::<RegisterRequest>(&body).map_err(|e| e.to_string())
    } else {
        Err("Content-Type must be application/json".to_string())
    };
    let body = parsed.map_err(|why| {
        ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("body must be JSON {{\"node_id\", \"public_key\", \"proof\"}}: {why}"),
        )
    })?;
    if !crate::docker::valid_node_id(&body.node_id) {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            "node_id must be 1-64 characters of letters, digits, '-', '_' and '.', not starting with '.' or '-'",
        )
        .into());
    }
    // A bound id takes only its own key: another is refused before its
    // proof is even looked at. Then the proof, then the binding.
    if let Some(bound) = app.store.node_identity(&body.node_id)
        && !bound
            .public_key
            .eq_ignore_ascii_case(body.public_key.trim())
    {
        tracing::warn!(node_id = %body.node_id, "registration with another key refused");
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            super::store::StoreError::BoundElsewhere {
                node_id: body.node_id.clone(),
            }
            .to_string(),
        )
        .into());
    }
    app.check_proof(
        &body.node_id,
        &body.public_key,
        crate::protocol::ProofPurpose::Register,
        Some(&body.proof),
    )?;
    let store = app.store.clone();
    let (node, key) = (body.node_id.clone(), body.public_key.clone());
    let identity = tokio::task::spawn_blocking(move || store.bind_node(&node, &key))
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| match e {
            super::store::StoreError::BoundElsewhere { .. } => {
                tracing::warn!(node_id = %body.node_id, "registration with another key refused");
                ErrorBody::new(ErrorCode::Conflict, e.to_string())
            }
            e => ErrorBody::new(ErrorCode::Internal, e.to_string()),
        })?;
    let (node_jwt, exp) = app.signer.issue(&body.node_id, &identity.binding);
    tracing::info!(node_id = %body.node_id, key_id = %crate::protocol::key_id(&identity.public_key), "node registered");
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    Ok(Json(Bootstrap {
        version: 1,
        node_id: body.node_id,
        orchestrator: Orchestrator {
            base_url: format!(
                "{}://{host}",
                if app.cfg.tls.is_some() {
                    "https"
                } else {
                    "http"
                }
            ),
            connect_path: AGENT_CONNECT_PATH.into(),
        },
        auth: NodeAuth {
            node_jwt,
            expires_at: humantime::format_rfc3339_seconds(exp).to_string(),
        },
        config_version: None,
    }))
}

async fn nodes(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    Json(json!({ "nodes": app.hub.nodes() }))
}

async fn node(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.node_detail(&id)?))
}

/// `tether ctl node rm`: the node's key binding is forgotten (its tokens
/// are refused from now on), its connection closes at once, and the node id
/// may register again, with any key.
async fn forget_node(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let store = app.store.clone();
    let node = id.clone();
    let bound = tokio::task::spawn_blocking(move || store.forget_node(&node))
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
    let known = app.hub.forget_node(&id);
    app.proofs_seen.lock().unwrap().remove(&id);
    if !bound && !known {
        return Err(ErrorBody::new(ErrorCode::NotFound, format!("no such node: {id}")).into());
    }
    tracing::info!(node_id = %id, "node removed by an operator");
    Ok(StatusCode::NO_CONTENT)
}

async fn drain(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.set_draining(&id, true)?))
}

async fn undrain(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.set_draining(&id, false)?))
}

async fn push_config(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<crate::protocol::NodeConfig>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(cfg) = body.map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, e.body_text()))?;
    Ok(Json(app.hub.push_config(&id, cfg).await?))
}

async fn workers(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    Json(json!({ "workers": app.hub.workers() }))
}

async fn worker(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.inspect(&id).await?))
}

async fn spawn(
    State(app): State<Arc<AppState>>,
    body: Result<Json<SpawnRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(req) = body.map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::TooLarge
        } else {
            ErrorCode::InvalidRequest
        };
        ErrorBody::new(code, e.body_text())
    })?;
    let w = app.hub.spawn(req).await?;
    Ok((StatusCode::CREATED, Json(w)))
}

#[derive(Deserialize)]
struct StopQuery {
    timeout: Option<u32>,
}

async fn stop(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<StopQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.stop(&id, q.timeout).await?))
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult<impl IntoResponse> {
    app.hub.remove(&id, q.force).await?;
    Ok(Json(json!({ "worker_id": id, "removed": true })))
}

#[derive(Deserialize)]
struct PathQuery {
    path: String,
}

async fn stat(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.hub.stat(&id, &q.path).await?))
}

async fn get_archive(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let stream = app.hub.get_archive(&id, &q.path).await?;
    // Body pulls from the channel as the client reads: credit follows.
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        match s.next().await? {
            StreamEvent::Data(_, b) => Some((Ok(b), s)),
            StreamEvent::Gap(n) => Some((
                Err(std::io::Error::other(format!(
                    "{n} bytes of the archive were lost"
                ))),
                s,
            )),
            StreamEvent::End { error: Some(e), .. } => {
                Some((Err(std::io::Error::other(e.to_string())), s))
            }
            StreamEvent::End { .. } => None,
        }
    });
    Ok((
        [("content-type", "application/x-tar")],
        Body::from_stream(body),
    )
        .into_response())
}

async fn put_archive(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let mut up = app.hub.put_archive(&id, &q.path).await?;
    let mut data = body.into_data_stream();
    loop {
        tokio::select! {
            chunk = data.next() => match chunk {
                Some(Ok(b)) => {
                    if up.write(b).await.is_err() {
                        // The channel closed under us: report the agent's reason.
                        let e = up.error().await;
                        return Err(e.unwrap_or_else(|| ErrorBody::new(ErrorCode::Internal, "upload ended early")).into());
                    }
                }
                Some(Err(e)) => return Err(ErrorBody::new(ErrorCode::InvalidRequest, format!("upload interrupted: {e}")).into()),
                None => break,
            },
            // The agent may refuse midway (bad archive): stop sending then.
            err = up.error() => {
                return Err(err.unwrap_or_else(|| ErrorBody::new(ErrorCode::Internal, "upload ended early")).into());
            }
        }
    }
    up.finish().await?;
    Ok(Json(json!({ "worker_id": id, "path": q.path })))
}

/// A data frame for an operator WebSocket (§12: kind byte, then bytes).
fn data_frame(kind: StreamKind, b: &[u8]) -> WsMessage {
    WsMessage::Binary(operator::data_frame(kind, b))
}

fn text(m: &ServerMsg) -> WsMessage {
    WsMessage::Text(m.encode().into())
}

fn end_message(exit_code: Option<i64>, error: Option<ErrorBody>) -> WsMessage {
    text(&ServerMsg::end(exit_code, error))
}

#[derive(Deserialize)]
struct ExecQuery {
    /// Re-attach to this exec channel instead of starting a command.
    attach: Option<u32>,
    /// Output bytes the re-attaching client already has.
    #[serde(default)]
    offset: u64,
}

async fn exec_ws(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<ExecQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    // Refuse a re-attach before upgrading, so the client can retry on 404.
    if let Some(channel) = q.attach
        && let Err(e) = app.hub.can_attach(&id, channel)
    {
        return error_response(e);
    }
    ws.on_upgrade(move |socket| exec_session(app, id, q, socket))
}

type WsTx = futures_util::stream::SplitSink<WebSocket, WsMessage>;
type WsRx = futures_util::stream::SplitStream<WebSocket>;

/// Closes a WebSocket whose last message went out: reads on (and drops
/// what comes) until the client closes too, for up to 5 s or until `stop`.
/// Dropping the socket with the client's messages unread (acks, input sent
/// before it saw the end) would reset the connection, and a reset can
/// discard the final message before the client has read it. True if the
/// client closed (or its connection failed) in time.
async fn close(mut tx: WsTx, mut rx: WsRx, stop: impl std::future::Future<Output = ()>) -> bool {
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
fn keepalive(app: &AppState) -> tokio::time::Interval {
    let every = app.cfg.heartbeat_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// How long a client has to close after the end of its exec.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Starts an exec (the client's first text message is the [`ExecOptions`])
/// or takes back a detached one (`?attach=CHANNEL&offset=N`), resending what
/// the client lacks.
async fn open_exec(
    app: &AppState,
    worker_id: &str,
    q: &ExecQuery,
    tx: &mut WsTx,
    rx: &mut WsRx,
) -> Result<(DetachedExec, bool), ErrorBody> {
    if let Some(channel) = q.attach {
        let mut d = app.hub.take_exec(worker_id, channel).await?;
        let base = d
            .relay
            .front()
            .map(|r| r.1)
            .unwrap_or_else(|| d.session.output.position());
        if q.offset < base {
            // Never silent: say exactly what is missing.
            let gap = ServerMsg::Gap {
                from: q.offset,
                to: base,
            };
            let _ = tx.send(text(&gap)).await;
        }
        d.relay
            .retain(|(_, off, b)| off + b.len() as u64 > q.offset);
        for (kind, off, b) in &d.relay {
            let skip = q.offset.saturating_sub(*off) as usize;
            if tx.send(data_frame(*kind, &b[skip..])).await.is_err() {
                return Err(ErrorBody::new(ErrorCode::Unavailable, "client went away"));
            }
        }
        d.session.output.ack(q.offset.max(base));
        return Ok((d, true));
    }
    let opts: ExecOptions = match rx.next().await {
        Some(Ok(WsMessage::Text(t))) => serde_json::from_str(t.as_str()).map_err(|e| {
            ErrorBody::new(ErrorCode::InvalidRequest, format!("bad exec options: {e}"))
        })?,
        _ => {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "expected the exec options first",
            ));
        }
    };
    let client_acks = opts.client_acks;
    let mut session = app.hub.exec(worker_id, opts).await?;
    if client_acks {
        session.output.set_manual_ack();
    }
    Ok((
        DetachedExec {
            worker_id: worker_id.to_string(),
            session,
            relay: Default::default(),
            end: None,
        },
        client_acks,
    ))
}

/// The exec WebSocket. After a `started` text naming the channel, binary
/// frames carry stdin (client) and output (server, kind-prefixed); the
/// server ends with an `exit` or `error` text. A client that acknowledges
/// output can lose its connection (or the server can restart) and re-attach
/// within the attach grace without losing a byte; otherwise leaving cancels
/// the exec.
async fn exec_session(app: Arc<AppState>, worker_id: String, q: ExecQuery, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let (d, client_acks) = match open_exec(&app, &worker_id, &q, &mut tx, &mut rx).await {
        Ok(x) => x,
        Err(e) => {
            let _ = tx.send(end_message(None, Some(e))).await;
            close(tx, rx, std::future::pending()).await;
            return;
        }
    };
    let DetachedExec {
        worker_id,
        session,
        mut relay,
        end: mut known_end,
    } = d;
    let ExecSession { input, mut output } = session;
    // A newer connection of this client (it lost this one, perhaps without
    // the server noticing) takes the exec over: this one hands it back.
    let held = client_acks.then(|| {
        app.hub
            .hold_exec(&worker_id, output.node_id(), output.channel())
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
    let mut stdin_acked = stdin_progress.acked();
    // Input bytes this server has had: sent to the agent, or waiting.
    let mut stdin_in = input.offset();
    let mut ack_tick = tokio::time::interval(Duration::from_millis(20));
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if tx.send(text(&started)).await.is_err() {
        return hand_back(
            &app,
            worker_id,
            input,
            output,
            relay,
            client_acks,
            known_end,
        );
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
    // A client re-attaching ahead of what this server has (a new server
    // adopts from the agent's last acknowledged byte) skips what it has.
    let skip_until = if q.attach.is_some() { q.offset } else { 0 };
    // Client messages are read on while stdin waits for the writer, so
    // that acknowledgements behind it get through (else a process that
    // echoes its input, blocked on output the client cannot acknowledge,
    // would never read more input). Input waits here, up to the stdin window:
    // a client that keeps what it sent beyond `stdin_ack` under that never
    // finds this server not reading; beyond it, reading stops.
    let mut stdin_buf: std::collections::VecDeque<Option<bytes::Bytes>> = Default::default();
    let mut stdin_buffered = 0usize;
    let mut said_end = None;
    let ended = loop {
        // A re-attach after the end went out into a connection that did not
        // close: the client may lack only the end (and what `relay` held).
        if let Some((exit_code, error)) = known_end.take() {
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
                Ok(p) => {
                    let item = stdin_buf.pop_front().flatten();
                    stdin_buffered -= item.as_ref().map_or(0, |b| b.len());
                    p.send(item);
                }
                Err(_) => {
                    stdin_buf.clear();
                    stdin_buffered = 0;
                }
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
            ev = output.next() => match ev.map(StreamEvent::into_frame) {
                Some(Ok((k, b))) => {
                    let start = output.position() - b.len() as u64;
                    let skip = skip_until.saturating_sub(start).min(b.len() as u64) as usize;
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
                        relay.push_back((k, start + skip as u64, b.clone()));
                    }
                    if !send_unless(&mut tx, data_frame(k, &b), &mut taken_over).await {
                        break false;
                    }
                }
                Some(Err((exit_code, error))) => {
                    let sent = send_unless(&mut tx, end_message(exit_code, error.clone()), &mut taken_over).await;
                    if sent {
                        said_end = Some((exit_code, error));
                    } else {
                        known_end = Some((exit_code, error));
                    }
                    break sent;
                }
                None => break true,
            },
            m = rx.next(), if stdin_buffered < app.cfg.stdin_window => match m {
                Some(Ok(WsMessage::Binary(b))) => {
                    stdin_in += b.len() as u64;
                    stdin_buffered += b.len();
                    stdin_buf.push_back(Some(b));
                }
                Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ClientMsg>(t.as_str()) {
                    Ok(ClientMsg::Resize { cols, rows }) => {
                        let hub = app.hub.clone();
                        let (w, ch) = (worker_id.clone(), channel);
                        tokio::spawn(async move { hub.resize(&w, ch, TermSize { cols, rows }).await });
                    }
                    Ok(ClientMsg::StdinEof) => stdin_buf.push_back(None),
                    Ok(ClientMsg::Ack { offset }) => {
                        output.ack(offset);
                        while relay.front().is_some_and(|(_, off, b)| off + b.len() as u64 <= offset) {
                            relay.pop_front();
                        }
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
        return hand_back(
            &app,
            worker_id,
            input,
            output,
            relay,
            client_acks,
            Some(end),
        );
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
    hand_back(
        &app,
        worker_id,
        input,
        output,
        relay,
        client_acks,
        known_end,
    );
}

/// Sends `m`; false if that failed or `stop` came first (a dead connection
/// may block a send for good: a takeover does not wait for it).
async fn send_unless(
    tx: &mut WsTx,
    m: WsMessage,
    stop: impl std::future::Future<Output = ()>,
) -> bool {
    tokio::select! {
        r = tx.send(m) => r.is_ok(),
        _ = stop => false,
    }
}

/// Keeps a detached exec for re-attachment, or drops it (cancelling it on
/// the agent) when its client cannot re-attach.
fn hand_back(
    app: &AppState,
    worker_id: String,
    input: ChannelSink,
    output: ChannelStream,
    relay: std::collections::VecDeque<(StreamKind, u64, bytes::Bytes)>,
    client_acks: bool,
    end: Option<(Option<i64>, Option<ErrorBody>)>,
) {
    if client_acks {
        let d = DetachedExec {
            worker_id,
            session: ExecSession { input, output },
            relay,
            end,
        };
        app.hub.detach_exec(d, app.cfg.attach_grace);
    }
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    since: Option<i64>,
    tail: Option<u64>,
    #[serde(default)]
    timestamps: bool,
}

async fn logs_ws(
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
