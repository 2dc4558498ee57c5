//! The agent WebSocket endpoint: authenticates the upgrade with the node JWT,
//! runs the handshake and one read loop per agent.

use super::AppState;
use super::conn::Admission;
use super::hub::AgentLink;
use crate::conn::{Close, End, Incoming, Outbound};
use crate::protocol::{
    ErrorBody, ErrorCode, MAX_WS_MESSAGE, Message, PROTOCOL_VERSION, SUBPROTOCOL, Welcome,
};
use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span, warn};

pub(super) async fn connect(
    State(app): State<Arc<AppState>>,
    admission: Option<Extension<Admission>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (node_id, token_exp, binding, fresh) = match authenticate(&app, &headers).await {
        Ok((c, fresh)) => (c.node_id, c.exp, c.binding, fresh),
        Err(e) => {
            warn!(error = %e, "agent connection refused");
            return super::api::error_response(e);
        }
    };
    let offered = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL));
    if !offered {
        return super::api::error_response(ErrorBody::new(
            ErrorCode::Unsupported,
            format!("the agent must offer WebSocket subprotocol {SUBPROTOCOL}"),
        ));
    }
    if let Some(Extension(a)) = admission {
        a.authenticated();
    }
    // An idle agent should cost little: a small read buffer that grows
    // only when a large message arrives.
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(8 * 1024)
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| {
            let span = info_span!("agent", %node_id);
            session(app, node_id, token_exp, binding, fresh, socket).instrument(span)
        })
        .into_response()
}

/// A connection must show a valid token whose identity binding is still
/// current (not forgotten, not re-bound), and a fresh proof made with the
/// node's bound key: a copied token alone is not enough. The proof is
/// verified here; what remains is to record it with the other replicas.
async fn authenticate(
    app: &Arc<AppState>,
    headers: &HeaderMap,
) -> Result<(super::auth::NodeClaims, Option<super::FreshProof>), ErrorBody> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    let token = super::auth::bearer(auth)
        .ok_or_else(|| ErrorBody::new(ErrorCode::Unauthorized, "missing node token"))?;
    let claims = app.signer.verify(token)?;
    let bound = |i: &crate::server::store::NodeIdentity| {
        super::auth::secret_eq(&i.binding, &claims.binding)
    };
    let mut identity = app.store.node_identity(&claims.node_id).filter(bound);
    if identity.is_none() {
        // Another replica may have bound the node a moment ago: its
        // notification can trail the agent, so ask the store itself. Only
        // a token with a good signature gets this far.
        let (store, node) = (app.store.clone(), claims.node_id.clone());
        identity = tokio::task::spawn_blocking(move || store.refresh_node(&node))
            .await
            .ok()
            .flatten()
            .filter(bound);
    }
    let identity = identity.ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::Unauthorized,
            format!(
                "node token of {} was revoked (node removed or bound to another key)",
                claims.node_id
            ),
        )
    })?;
    let proof = headers
        .get(crate::protocol::PROOF_HEADER)
        .and_then(|v| v.to_str().ok());
    let fresh = app.verify_proof(
        &claims.node_id,
        &identity.public_key,
        crate::protocol::ProofPurpose::Connect,
        proof,
    )?;
    Ok((claims, fresh))
}

fn to_ws(o: Outbound) -> WsMessage {
    match o {
        Outbound::Text(t) => WsMessage::Text(t.into()),
        Outbound::Binary(b) => WsMessage::Binary(b),
        Outbound::Ping => WsMessage::Ping(Default::default()),
        Outbound::Close(code, reason) => WsMessage::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })),
    }
}

/// One agent connection. `binding` is the identity binding its token was
/// issued under: once an operator forgets the node it no longer holds, and
/// the connection ends (checked before the node joins the registry and at
/// every heartbeat tick).
async fn session(
    app: Arc<AppState>,
    node_id: String,
    token_exp: u64,
    binding: String,
    fresh: Option<super::FreshProof>,
    socket: WebSocket,
) {
    let (mut sink, mut stream) = socket.split();
    // Handshake: the first message must be a hello for the token's node.
    // Meanwhile the proof is recorded with the other replicas (a database
    // round trip kept out of the upgrade); nothing of the node's is touched
    // before both are in.
    let (first, recorded) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(15), stream.next()),
        app.record_proof(&node_id, fresh),
    );
    if let Err(e) = recorded {
        warn!(error = %e.message, "agent connection refused");
        let _ = sink
            .send(WsMessage::Close(Some(CloseFrame {
                code: 1008,
                reason: e.message.into(),
            })))
            .await;
        return;
    }
    let hello = match first {
        Ok(Some(Ok(WsMessage::Text(t)))) => Message::decode(t.as_str()),
        _ => {
            warn!("no hello within 15 s");
            return;
        }
    };
    let refuse = |code, msg: String| Message::error(None, code, msg).encode();
    let hello = match hello {
        Ok(Message::Hello(h)) => h,
        other => {
            let m = refuse(
                ErrorCode::InvalidRequest,
                format!("expected hello, got {other:?}"),
            );
            let _ = sink.send(WsMessage::Text(m.into())).await;
            return;
        }
    };
    if hello.node_id != node_id {
        let m = refuse(
            ErrorCode::Unauthorized,
            format!("token is for node {node_id}, hello says {}", hello.node_id),
        );
        let _ = sink.send(WsMessage::Text(m.into())).await;
        return;
    }
    if !hello.versions.contains(&PROTOCOL_VERSION) {
        let m = refuse(
            ErrorCode::Unsupported,
            format!(
                "protocol versions {:?} not supported; this server speaks {PROTOCOL_VERSION}",
                hello.versions
            ),
        );
        let _ = sink.send(WsMessage::Text(m.into())).await;
        return;
    }

    if !app.store.is_current(&node_id, &binding) {
        let _ = sink
            .send(WsMessage::Close(Some(CloseFrame {
                code: 1008,
                reason: REMOVED.into(),
            })))
            .await;
        info!("node removed during the handshake");
        return;
    }
    let link = app.hub.node_link(&node_id);
    let org = app.store.node_identity(&node_id).map(|i| i.org);
    if let Some(org) = &org {
        app.hub.set_node_org(&node_id, org);
    }
    // Execs the agent runs that this server does not know (it restarted):
    // adopt them, so their clients can re-attach. Only execs of workers the
    // node may claim as its own, and a bounded number of them: each one
    // holds a stream (and, for an MCP exec, its kept output) here.
    let agent_received: std::collections::HashMap<u32, u64> = hello
        .channels
        .iter()
        .map(|s| (s.channel, s.received))
        .collect();
    let inventory = hello
        .inventory
        .map(|i| recorded_deployments_only(app.store.as_ref(), &node_id, i));
    let listed = inventory
        .as_ref()
        .map(|i| app.hub.claimable_ids(&node_id, i));
    // Without an inventory (the agent could not list its containers), a
    // worker the registry gives another node is not this one's, and one it
    // does not know (the server restarted) must carry an id as spawned.
    let its_own = |worker_id: &str| match &listed {
        Some(l) => l.contains(worker_id),
        None => match app.hub.worker(worker_id) {
            Ok(w) => w.node_id == node_id,
            Err(_) => crate::server::hub::spawned_id(worker_id),
        },
    };
    let (mut adopted, mut refused) = (0, 0);
    for open in &hello.open {
        if link.channels.is_open(open.channel) {
            continue;
        }
        if adopted == MAX_ADOPTED_EXECS || !its_own(&open.worker_id) {
            refused += 1;
            continue;
        }
        adopted += 1;
        let rx = agent_received.get(&open.channel).copied().unwrap_or(0);
        app.hub.adopt_exec(&link, open, rx, app.cfg.attach_grace);
    }
    if refused > 0 {
        warn!(
            refused,
            adopted, "execs in the hello not adopted: not this node's workers, or too many"
        );
    }
    let session_id = ulid::Ulid::new().to_string();
    let welcome = Message::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        session_id: session_id.clone(),
        heartbeat_interval_secs: app.cfg.heartbeat_interval.as_secs(),
        heartbeat_timeout_secs: app.cfg.heartbeat_timeout.as_secs(),
        channels: link.channels.states(),
    });
    if sink
        .send(WsMessage::Text(welcome.encode().into()))
        .await
        .is_err()
    {
        return;
    }
    let (out, out_rx) = mpsc::unbounded_channel::<Outbound>();
    let writer = tokio::spawn(crate::conn::write_loop(sink, out_rx, to_ws));
    // Replay what the agent missed and send unanswered requests again.
    let (ended, generation) = link.connect(&hello.channels, out.clone());
    // What is wanted on the node as the store has it now (another replica
    // may have set it since this one started).
    if let (Some(desired), Some(org)) = (app.store.desired_config(&node_id), &org) {
        app.hub.restore_desired_config(&node_id, org, desired);
    }
    app.hub.attach(
        &node_id,
        &hello.agent_version,
        inventory,
        hello.config_version,
    );
    if let Some(report) = hello.capabilities {
        app.hub.on_capabilities(&node_id, report);
    }
    info!(%session_id, resumed = hello.channels.len(), "agent online");
    if let Some(r) = &app.replica {
        r.changed.notify_one();
    }

    // No timer here: the server's one heartbeat task pings this agent and
    // ends the connection if it falls silent (`heartbeat`).
    let mut peer = ServerPeer {
        app: &app,
        link: &link,
        binding: &binding,
        token_exp,
        checked: std::time::Instant::now(),
    };
    let stop = async {
        tokio::select! {
            _ = app.shutdown.cancelled() => Close::new(Close::GOING_AWAY, "server shutting down"),
            _ = ended.cancelled() => link.end_reason(),
        }
    };
    let end = crate::conn::run(stream.map(incoming), &out, None, &mut peer, stop).await;
    let reason = match end {
        End::Local(c) => c.reason,
        End::Remote(Some(c)) => format!("agent closed the connection ({}: {})", c.code, c.reason),
        End::Remote(None) => "agent closed the connection".into(),
        End::Lost(why) => format!("connection lost: {why}"),
        End::Silent(d) => format!("no heartbeat for {} s", d.as_secs()),
    };
    info!(%reason, "agent offline");
    app.hub.detach(&link, generation, &reason);
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

const REMOVED: &str = "node removed by an operator";

/// Most execs one hello has the server adopt (each holds a stream here; an
/// MCP exec, its kept output). Beyond it the agent ends them.
const MAX_ADOPTED_EXECS: usize = 4096;

/// The server's side of one agent connection.
struct ServerPeer<'a> {
    app: &'a AppState,
    link: &'a Arc<AgentLink>,
    binding: &'a str,
    /// When the node token this connection last got expires (Unix s).
    token_exp: u64,
    /// When the binding and the token were last looked at.
    checked: std::time::Instant,
}

impl ServerPeer<'_> {
    /// Once per heartbeat interval of traffic (the agent answers every
    /// ping): the node still bound to this key, and its token renewed over
    /// the live link when a third of its lifetime is left.
    fn check(&mut self) -> Option<Close> {
        let node_id = self.link.node_id.as_str();
        if !self.app.store.is_current(node_id, self.binding) {
            return Some(Close::new(Close::POLICY, REMOVED));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if now + self.app.signer.ttl().as_secs() / 3 >= self.token_exp {
            let (jwt, exp) = self.app.signer.issue(node_id, self.binding);
            self.token_exp = exp
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            self.link
                .send(Message::Token(crate::protocol::TokenRefresh {
                    node_jwt: jwt,
                    expires_at: humantime::format_rfc3339_seconds(exp).to_string(),
                }));
            info!("node token refreshed");
        }
        None
    }
}

impl crate::conn::Peer for ServerPeer<'_> {
    fn on_text(&mut self, text: &str) {
        on_text(self.app, self.link, text);
    }

    fn on_binary(&mut self, data: bytes::Bytes) {
        if let Err(error) = self.link.channels.on_binary(data) {
            warn!(%error, "bad frame from agent");
        }
    }

    fn on_traffic(&mut self) -> Option<Close> {
        self.link.seen();
        if self.checked.elapsed() < self.app.cfg.heartbeat_interval {
            return None;
        }
        self.checked = std::time::Instant::now();
        self.check()
    }
}

fn incoming(
    m: Result<WsMessage, axum::Error>,
) -> Result<Incoming<axum::extract::ws::Utf8Bytes>, axum::Error> {
    Ok(match m? {
        WsMessage::Text(t) => Incoming::Text(t),
        WsMessage::Binary(b) => Incoming::Binary(b),
        WsMessage::Close(f) => Incoming::Close(f.map(|f| Close::new(f.code, f.reason.as_str()))),
        _ => Incoming::Control,
    })
}

fn on_text(app: &AppState, link: &Arc<AgentLink>, text: &str) {
    let msg = match Message::decode(text) {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e.error, "bad message from agent");
            // A reply too large to take still ends its request now.
            if e.error.code == ErrorCode::TooLarge
                && let Some(id) = &e.id
            {
                link.on_reply(id, Err(e.error.clone()));
            }
            let _ = link.send(Message::Error {
                id: e.id,
                error: e.error,
            });
            return;
        }
    };
    match msg {
        Message::Result { id, payload } => link.on_reply(&id, Ok(payload)),
        Message::Error {
            id: Some(id),
            error,
        } => link.on_reply(&id, Err(error)),
        Message::Error { id: None, error } => warn!(%error, "agent reported an error"),
        Message::Window(w) => link.channels.on_window(w),
        Message::ChannelEof(c) => link.channels.on_eof(c.channel),
        Message::ChannelClose(c) => {
            link.channels.on_close(c);
        }
        Message::WorkerEvent(ev) => app.hub.on_worker_event(&link.node_id, ev),
        Message::NodeStatus(st) => app.hub.on_node_status(&link.node_id, st),
        Message::Capabilities(report) => app.hub.on_capabilities(&link.node_id, report),
        Message::ConfigPoll(p) => app.hub.on_config_poll(&link.node_id, p.config_version),
        Message::Unknown { kind, id } => {
            let _ = link.send(Message::error(
                id,
                ErrorCode::Unsupported,
                format!(
                    "unknown message type {:?}",
                    kind.chars().take(64).collect::<String>()
                ),
            ));
        }
        other => {
            // Its kind, not its text: an answer never carries back what a
            // node sent (up to 1 MiB a message) to a peer that may not be
            // reading.
            let kind = match &other {
                Message::Hello(_) => "hello",
                Message::Welcome(_) => "welcome",
                Message::Token(_) => "token",
                Message::Request { request, .. } => request.kind(),
                _ => "message",
            };
            let _ = link.send(Message::error(
                None,
                ErrorCode::InvalidRequest,
                format!("unexpected message from agent: {kind}"),
            ));
        }
    }
}

/// `inventory` without the services of deployments that the store records
/// on another node that still exists: a deployment's name is the node's it
/// was made on (`deploy up`), not whichever node reports it first after a
/// restart.
fn recorded_deployments_only(
    store: &dyn super::store::Store,
    node_id: &str,
    inventory: Vec<crate::protocol::WorkerInfo>,
) -> Vec<crate::protocol::WorkerInfo> {
    inventory
        .into_iter()
        .filter(|w| {
            let Some(d) = &w.deployment else {
                return true;
            };
            match store.deployment_node(d) {
                Some(at) if at != node_id && store.node_identity(&at).is_some() => {
                    tracing::warn!(
                        %node_id,
                        worker_id = %w.worker_id,
                        deployment = %d,
                        made_on = %at,
                        "inventory claim refused: the deployment was made on another node"
                    );
                    false
                }
                _ => true,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::{SqliteStore, Store};

    fn service(node: &str, deployment: &str) -> crate::protocol::WorkerInfo {
        serde_json::from_value(serde_json::json!({
            "worker_id": format!("{deployment}_web"), "node_id": node, "image": "i",
            "container_id": "c", "network": "n", "state": "running",
            "created_at": "2026-01-01T00:00:00Z", "deployment": deployment, "service": "web",
        }))
        .unwrap()
    }

    /// After a restart the registry is empty: the first node to report a
    /// deployment's name must not take it from the node it was made on.
    #[test]
    fn a_hello_claims_only_deployments_made_on_its_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.bind_node("owner", "aa", "default").unwrap();
        store.bind_node("thief", "bb", "default").unwrap();
        store.set_deployment_node("prod", Some("owner")).unwrap();
        let claims = |node: &str| {
            let inv = vec![service(node, "prod"), service(node, "other")];
            recorded_deployments_only(&store, node, inv)
                .into_iter()
                .map(|w| w.worker_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(claims("thief"), ["other_web"]);
        assert_eq!(claims("owner"), ["prod_web", "other_web"]);
        // Kept across a restart of the store.
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.deployment_node("prod").as_deref(), Some("owner"));
        // Its node forgotten, the name is free again (and its record gone).
        store.forget_node("owner").unwrap();
        assert_eq!(store.deployment_node("prod"), None);
        let inv = vec![service("thief", "prod")];
        assert_eq!(recorded_deployments_only(&store, "thief", inv).len(), 1);
        // Taken down: no record.
        store.set_deployment_node("x", Some("thief")).unwrap();
        store.set_deployment_node("x", None).unwrap();
        assert_eq!(store.deployment_node("x"), None);
    }
}
