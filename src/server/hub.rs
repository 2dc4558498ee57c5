//! The embeddable control plane: a typed async [`Hub`] holding the node and
//! worker registries and one [`AgentLink`] per connected agent. The HTTP API
//! is a thin layer over it; other orchestrators can embed it directly.

use crate::conn::{Close, Link, OutTx, Outbound};
use crate::mux::{ChannelReader, ChannelWriter, Channels, Inbound};
pub use crate::protocol::operator::{ExecOptions, LogOptions, NodeInfo, NodeState};
use crate::protocol::{
    ARCHIVE_WINDOW, Archive, ChannelClose, ChannelState, DEFAULT_WINDOW, ErrorBody, ErrorCode,
    Exec, Logs, Message, Remove, Request, Resize, Spawn, SpawnRequest, Stat, StatResult, Stop,
    StreamKind, TermSize, WorkerEvent, WorkerInfo, WorkerRef,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long the hub waits for an agent's reply to a request.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Hands out heartbeat sweep slots round-robin.
static NEXT_PULSE_SLOT: AtomicU32 = AtomicU32::new(0);

/// How long a disconnected node's channels and requests wait for it.
pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(120);

/// A node with its capability report (`GET /api/v1/nodes/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub info: NodeInfo,
    /// The configuration version the agent has applied.
    pub config_version: Option<String>,
    pub last_config_ack: Option<crate::protocol::ConfigAck>,
    pub capabilities: Option<Value>,
    pub capability_hash: Option<String>,
}

/// One node's link to the hub, across its connections: the current
/// connection (if any), requests awaiting a reply and open channels. Both
/// survive a reconnect: unanswered requests are sent again (the agent answers
/// a repeated id from its cache) and channels resume where they stopped.
pub struct AgentLink {
    pub node_id: String,
    link: Arc<Link>,
    pending: Mutex<HashMap<String, Pending>>,
    pub(crate) channels: Channels,
    /// Channels whose opening request has no reply yet: a resume must not
    /// end them just because the agent does not have them yet.
    opening: Mutex<HashSet<u32>>,
    next_channel: AtomicU32,
    /// Cancelled when the current connection must end (replaced, or the
    /// server shuts down); renewed for each connection.
    conn: Mutex<CancellationToken>,
    /// Counts connections, so a grace timer knows whether the node came back.
    generation: AtomicU64,
    /// An operator removed the node: its connection ends and stays ended.
    revoked: std::sync::atomic::AtomicBool,
    timeout: Duration,
    /// Milliseconds from `born` to the last traffic from the agent: noted
    /// on every message without taking the registry lock every node shares.
    last_seen_ms: AtomicU64,
    born: tokio::time::Instant,
    /// Why the current connection is being ended here, if a reason was
    /// given (set under `conn`'s lock, with the cancellation).
    ending: Mutex<Option<Close>>,
    /// Which slice of the heartbeat sweep this node is in.
    pub(crate) pulse_slot: u32,
}

struct Pending {
    /// The encoded request, sent again after a reconnect.
    text: String,
    tx: oneshot::Sender<Result<Value, ErrorBody>>,
}

impl AgentLink {
    pub(crate) fn new(node_id: String) -> Arc<Self> {
        let link = Link::new();
        Arc::new(AgentLink {
            node_id,
            channels: Channels::new(link.clone()),
            link,
            pending: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashSet::new()),
            next_channel: AtomicU32::new(1),
            conn: Mutex::new(CancellationToken::new()),
            generation: AtomicU64::new(0),
            revoked: Default::default(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            last_seen_ms: AtomicU64::new(0),
            born: tokio::time::Instant::now(),
            ending: Mutex::new(None),
            pulse_slot: NEXT_PULSE_SLOT.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Ends the current connection, which closes with `close`.
    pub(crate) fn end_connection(&self, close: Close) {
        let conn = self.conn.lock().unwrap();
        *self.ending.lock().unwrap() = Some(close);
        conn.cancel();
    }

    /// Why the current connection was ended here: the given reason, the
    /// node's removal, or a newer connection of the node.
    pub(crate) fn end_reason(&self) -> Close {
        if self.is_revoked() {
            return Close::new(Close::POLICY, "node removed by an operator");
        }
        self.ending.lock().unwrap().clone().unwrap_or_else(|| {
            Close::new(Close::NORMAL, "replaced by a newer connection of this node")
        })
    }

    /// Traffic from the agent just arrived.
    pub(crate) fn seen(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the agent was last heard (since the link was made, if
    /// never).
    pub(crate) fn silence(&self) -> Duration {
        self.born.elapsed().saturating_sub(Duration::from_millis(
            self.last_seen_ms.load(Ordering::Relaxed),
        ))
    }

    /// Wall-clock time of the last traffic from the agent.
    fn last_seen(&self) -> SystemTime {
        SystemTime::now() - self.silence()
    }

    /// The current connection, for writing to it.
    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Queues a message for the agent; false if it is not connected.
    pub(crate) fn send(&self, m: Message) -> bool {
        self.link.send_msg(&m)
    }

    fn unavailable(&self) -> ErrorBody {
        ErrorBody::new(
            ErrorCode::Unavailable,
            format!("node {} disconnected", self.node_id),
        )
    }

    /// Starts a connection: ends the previous one, resumes channels on `out`
    /// from the agent's `states`, and sends unanswered requests again.
    /// Returns the token that ends this connection and its generation.
    pub(crate) fn connect(&self, states: &[ChannelState], out: OutTx) -> (CancellationToken, u64) {
        let token = CancellationToken::new();
        {
            let mut conn = self.conn.lock().unwrap();
            *self.ending.lock().unwrap() = None;
            std::mem::replace(&mut *conn, token.clone()).cancel();
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let opening = self.opening.lock().unwrap().clone();
        let resumed = self
            .channels
            .resume(states, |id| opening.contains(&id), out);
        if !resumed.lost.is_empty() {
            tracing::warn!(node_id = %self.node_id, lost = ?resumed.lost, "agent lost channels (restarted?)");
        }
        for p in self.pending.lock().unwrap().values() {
            self.link.send(Outbound::Text(p.text.clone()));
        }
        (token, generation)
    }

    /// Ends the current connection for good (the node was removed).
    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
        self.conn.lock().unwrap().cancel();
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// The connection of `generation` ended; channels and requests wait.
    pub(crate) fn disconnect(&self, generation: u64) {
        if self.generation.load(Ordering::SeqCst) == generation {
            self.link.set(None);
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.link.is_connected()
    }

    /// The node did not come back in time: fail everything in flight.
    pub(crate) fn expire(&self, reason: &str) {
        let err = ErrorBody::new(
            ErrorCode::Unavailable,
            format!("node {} is offline: {reason}", self.node_id),
        );
        for (_, p) in self.pending.lock().unwrap().drain() {
            let _ = p.tx.send(Err(err.clone()));
        }
        self.channels.close_all(err);
    }

    /// Sends a request and waits for its reply, across reconnects.
    pub async fn request(&self, request: Request) -> Result<Value, ErrorBody> {
        let id = ulid::Ulid::new().to_string();
        let (tx, rx) = oneshot::channel();
        let kind = request.kind();
        let text = Message::Request {
            id: id.clone(),
            request,
        }
        .encode();
        self.pending.lock().unwrap().insert(
            id.clone(),
            Pending {
                text: text.clone(),
                tx,
            },
        );
        self.link.send(Outbound::Text(text));
        // A spawn may pull an image (up to 300 s on the agent).
        let limit = if kind == "spawn" {
            self.timeout + Duration::from_secs(300)
        } else {
            self.timeout
        };
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.unavailable()),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(ErrorBody::new(
                    ErrorCode::Timeout,
                    format!(
                        "node {} did not answer `{kind}` within {} s",
                        self.node_id,
                        limit.as_secs()
                    ),
                ))
            }
        }
    }

    async fn request_as<T: serde::de::DeserializeOwned>(
        &self,
        request: Request,
    ) -> Result<T, ErrorBody> {
        let v = self.request(request).await?;
        serde_json::from_value(v)
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("bad reply from agent: {e}")))
    }

    pub(crate) fn on_reply(&self, id: &str, r: Result<Value, ErrorBody>) {
        if let Some(p) = self.pending.lock().unwrap().remove(id) {
            let _ = p.tx.send(r);
        }
    }

    fn open_channel(
        self: &Arc<Self>,
        window: u64,
    ) -> Result<(u32, ChannelWriter, ChannelStream), ErrorBody> {
        // Skip ids still in use (after a wrap, or adopted from the agent);
        // any other refusal (a bad window) is final.
        const TRIES: usize = 1024;
        for _ in 0..TRIES {
            let id = self.next_channel.fetch_add(1, Ordering::Relaxed).max(1);
            match self.channels.open(id, window) {
                Ok(h) => {
                    let stream = ChannelStream {
                        channel: id,
                        reader: h.reader,
                        link: self.clone(),
                        done: false,
                    };
                    return Ok((id, h.writer, stream));
                }
                Err(e) if e.code == ErrorCode::Conflict => {}
                Err(e) => return Err(e),
            }
        }
        Err(ErrorBody::new(
            ErrorCode::Unavailable,
            format!("no free channel id in {TRIES} tries"),
        ))
    }

    /// Sends a request that opens a channel with `window` bytes of credit
    /// each way (both ends must start from the same window: `make` gets the
    /// channel id and the window to put in the request); on failure the
    /// channel is closed.
    async fn open_with(
        self: &Arc<Self>,
        window: u64,
        make: impl FnOnce(u32, u64) -> Request,
    ) -> Result<(u32, ChannelWriter, ChannelStream), ErrorBody> {
        let (id, writer, stream) = self.open_channel(window)?;
        self.opening.lock().unwrap().insert(id);
        let r = self.request(make(id, window)).await;
        self.opening.lock().unwrap().remove(&id);
        match r {
            Ok(_) => Ok((id, writer, stream)),
            // The agent answered with an error: it has no such channel.
            Err(e) if e.code != ErrorCode::Timeout && e.code != ErrorCode::Unavailable => {
                let mut stream = stream;
                stream.done = true;
                self.channels.remove(id);
                Err(e)
            }
            // Timed out or cut off: dropping `stream` tells the agent to
            // cancel, in case the request still runs there.
            Err(e) => Err(e),
        }
    }
}

/// What a channel yields to its consumer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Data(StreamKind, Bytes),
    /// This many output bytes are missing here: the agent's spool was full
    /// while the server was unreachable (never silent).
    Gap(u64),
    /// The operation ended: exit code for exec, error if it failed.
    End {
        exit_code: Option<i64>,
        error: Option<ErrorBody>,
    },
}

impl StreamEvent {
    /// Data and gap events as they travel in a channel (a gap as its 8-byte
    /// big-endian count), or the end's exit code and error.
    pub fn into_frame(self) -> Result<(StreamKind, Bytes), (Option<i64>, Option<ErrorBody>)> {
        match self {
            StreamEvent::Data(k, b) => Ok((k, b)),
            StreamEvent::Gap(n) => Ok((StreamKind::Gap, Bytes::copy_from_slice(&n.to_be_bytes()))),
            StreamEvent::End { exit_code, error } => Err((exit_code, error)),
        }
    }
}

/// The receiving side of a channel (exec output, logs, a downloaded archive).
/// Reading grants the agent credit; not reading stalls this channel only.
/// Dropping it before the end cancels the operation on the agent.
pub struct ChannelStream {
    channel: u32,
    reader: ChannelReader,
    link: Arc<AgentLink>,
    done: bool,
}

impl ChannelStream {
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// The node the channel runs on.
    pub fn node_id(&self) -> &str {
        &self.link.node_id
    }

    /// Bytes handed out so far: the offset just past the last data event.
    pub fn position(&self) -> u64 {
        self.reader.consumed()
    }

    /// From now on credit follows [`ChannelStream::ack`]: the agent keeps
    /// what is not acknowledged, so a consumer that reconnects (or a new
    /// server) can have it again.
    pub fn set_manual_ack(&mut self) {
        self.reader.set_manual_ack();
    }

    /// The final consumer has everything up to `offset`.
    pub fn ack(&mut self, offset: u64) {
        self.reader.ack(offset);
    }

    /// Next event; after `End` it returns `None`.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        if self.done {
            return None;
        }
        match self.reader.recv().await {
            Some(Inbound::Data(StreamKind::Gap, b)) if b.len() == 8 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b);
                Some(StreamEvent::Gap(u64::from_be_bytes(n)))
            }
            Some(Inbound::Data(k, b)) => Some(StreamEvent::Data(k, b)),
            Some(Inbound::Close(ChannelClose {
                exit_code, error, ..
            })) => {
                self.done = true;
                Some(StreamEvent::End { exit_code, error })
            }
            Some(Inbound::Eof) => self.next_boxed().await,
            None => {
                self.done = true;
                Some(StreamEvent::End {
                    exit_code: None,
                    error: Some(self.link.unavailable()),
                })
            }
        }
    }

    fn next_boxed(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<StreamEvent>> + Send + '_>> {
        Box::pin(self.next())
    }
}

impl Drop for ChannelStream {
    fn drop(&mut self) {
        if !self.done {
            // Cancels the operation on the agent (replayed after a reconnect).
            self.link.channels.close(ChannelClose {
                channel: self.channel,
                exit_code: None,
                error: None,
            });
        }
    }
}

/// The sending side of a channel: stdin of an exec, or an uploaded archive.
pub struct ChannelSink {
    channel: u32,
    writer: ChannelWriter,
    link: Arc<AgentLink>,
}

impl ChannelSink {
    /// Sends bytes, waiting for the agent's credit.
    pub async fn write(&mut self, data: Bytes) -> Result<(), ErrorBody> {
        self.writer
            .write(StreamKind::Stdin, data)
            .await
            .map_err(|_| self.link.unavailable())
    }

    /// Input bytes taken so far (sent to the agent or queued for it).
    pub fn offset(&self) -> u64 {
        self.writer.offset()
    }

    /// How far the agent has acknowledged the input.
    pub fn progress(&self) -> crate::mux::WriterProgress {
        self.writer.progress()
    }

    /// Signals end of input.
    pub fn close(&self) {
        self.writer.eof();
    }

    pub async fn resize(&self, size: TermSize) -> Result<(), ErrorBody> {
        self.link
            .request(Request::Resize(Resize {
                channel: self.channel,
                size,
            }))
            .await
            .map(|_| ())
    }
}

/// How long a re-attaching client waits for an older connection of its exec
/// to let go of it.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// A client connection's hold on an exec ([`Hub::hold_exec`]).
pub struct HeldExec {
    reg: Arc<Mutex<Registry>>,
    key: (String, u32),
    generation: u64,
    token: CancellationToken,
}

impl HeldExec {
    /// Cancelled when a newer connection takes the exec over.
    pub fn taken_over(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

impl Drop for HeldExec {
    fn drop(&mut self) {
        let mut reg = self.reg.lock().unwrap();
        if reg
            .held
            .get(&self.key)
            .is_some_and(|(g, _, _)| *g == self.generation)
        {
            reg.held.remove(&self.key);
        }
    }
}

/// An exec whose client went away, kept for the attach grace period so the
/// client can re-attach (`relay` holds what was sent but not acknowledged).
pub struct DetachedExec {
    pub worker_id: String,
    pub session: ExecSession,
    pub relay: std::collections::VecDeque<(StreamKind, u64, Bytes)>,
    /// The exec's end (exit code, error), when it was sent to a client that
    /// then did not close its connection: it may not have arrived.
    pub end: Option<(Option<i64>, Option<ErrorBody>)>,
}

/// A running exec: its input and its output, usable from two tasks.
pub struct ExecSession {
    pub input: ChannelSink,
    pub output: ChannelStream,
}

struct NodeEntry {
    link: Arc<AgentLink>,
    /// An agent connection is up.
    online: bool,
    connected_since: Option<SystemTime>,
    /// Why the node cannot take work although connected (runtime down).
    degraded: Option<String>,
    /// The latest capability report and its hash.
    capabilities: Option<(Value, String)>,
    /// The configuration the orchestrator wants on this node.
    desired_config: Option<crate::protocol::NodeConfig>,
    /// What the agent reports as applied.
    config_version: Option<String>,
    last_config_ack: Option<crate::protocol::ConfigAck>,
    draining: bool,
    offline_reason: Option<String>,
    agent_version: Option<String>,
}

#[derive(Default)]
struct Registry {
    /// Execs waiting for their client to re-attach, by (node, channel), with
    /// the generation of their grace timer.
    detached: HashMap<(String, u32), (u64, DetachedExec)>,
    next_detach: u64,
    /// Execs a client connection holds, by (node, channel): their worker and
    /// the token that makes that connection hand the exec back.
    held: HashMap<(String, u32), (u64, String, CancellationToken)>,
    nodes: HashMap<String, NodeEntry>,
    /// The server's view of every worker, reconciled from agent inventories.
    workers: HashMap<String, WorkerInfo>,
}

impl Registry {
    /// The token of the client connection holding exec `key` of `worker_id`.
    fn holder(&self, key: &(String, u32), worker_id: &str) -> Option<&CancellationToken> {
        match self.held.get(key) {
            Some((_, w, t)) if w == worker_id => Some(t),
            _ => None,
        }
    }
}

/// The control plane, cheap to clone.
#[derive(Clone)]
pub struct Hub {
    reg: Arc<Mutex<Registry>>,
    /// How long a disconnected node's channels and requests wait for it.
    grace: Duration,
    /// Worker events as agents report them, for whoever follows them.
    events: tokio::sync::broadcast::Sender<(String, WorkerEvent)>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// Worker events a slow follower of [`Hub::worker_events`] may lag behind.
pub const WORKER_EVENT_BACKLOG: usize = 1024;

impl NodeEntry {
    fn info(&self, node_id: &str, workers: usize) -> NodeInfo {
        let status = match (self.online, self.degraded.is_some(), self.draining) {
            (false, _, _) => NodeState::Offline,
            (true, true, _) => NodeState::Degraded,
            (true, false, true) => NodeState::Draining,
            (true, false, false) => NodeState::Online,
        };
        NodeInfo {
            node_id: node_id.to_string(),
            status,
            draining: self.draining,
            workers,
            last_seen: Some(rfc3339(self.link.last_seen())),
            offline_reason: if self.online {
                self.degraded.clone()
            } else {
                self.offline_reason.clone()
            },
            agent_version: self.agent_version.clone(),
            connected_since: self
                .connected_since
                .filter(|_| self.online)
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
        }
    }
}

/// How many workers each node has, in one pass over the workers.
fn worker_counts(reg: &Registry) -> HashMap<&str, usize> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in reg.workers.values() {
        *counts.entry(w.node_id.as_str()).or_default() += 1;
    }
    counts
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Hub {
    pub fn new() -> Self {
        Hub::with_grace(DEFAULT_RESUME_GRACE)
    }

    /// A hub whose disconnected nodes get `grace` to come back before their
    /// channels and requests fail.
    pub fn with_grace(grace: Duration) -> Self {
        Hub {
            reg: Arc::default(),
            grace,
            events: tokio::sync::broadcast::channel(WORKER_EVENT_BACKLOG).0,
        }
    }

    /// The links of connected nodes in sweep slice `slot` of `slices`.
    pub(crate) fn connected_in_slice(&self, slot: u32, slices: u32) -> Vec<Arc<AgentLink>> {
        self.reg
            .lock()
            .unwrap()
            .nodes
            .values()
            .filter(|n| n.online && n.link.pulse_slot % slices == slot)
            .map(|n| n.link.clone())
            .collect()
    }

    /// Every node ever seen, sorted by id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let reg = self.reg.lock().unwrap();
        let counts = worker_counts(&reg);
        let mut v: Vec<NodeInfo> = reg
            .nodes
            .iter()
            .map(|(id, n)| n.info(id, counts.get(id.as_str()).copied().unwrap_or(0)))
            .collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    pub fn node_info(&self, node_id: &str) -> Result<NodeInfo, ErrorBody> {
        let reg = self.reg.lock().unwrap();
        let n = reg.nodes.get(node_id).ok_or_else(|| {
            ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}"))
        })?;
        let workers = reg
            .workers
            .values()
            .filter(|w| w.node_id == node_id)
            .count();
        Ok(n.info(node_id, workers))
    }

    /// Every worker, sorted by node then id.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let mut v: Vec<WorkerInfo> = self.reg.lock().unwrap().workers.values().cloned().collect();
        v.sort_by(|a, b| (&a.node_id, &a.worker_id).cmp(&(&b.node_id, &b.worker_id)));
        v
    }

    pub fn worker(&self, worker_id: &str) -> Result<WorkerInfo, ErrorBody> {
        self.reg
            .lock()
            .unwrap()
            .workers
            .get(worker_id)
            .cloned()
            .ok_or_else(|| {
                ErrorBody::new(ErrorCode::NotFound, format!("no such worker: {worker_id}"))
            })
    }

    fn link(&self, node_id: &str) -> Result<Arc<AgentLink>, ErrorBody> {
        let reg = self.reg.lock().unwrap();
        let n = reg.nodes.get(node_id).ok_or_else(|| {
            ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}"))
        })?;
        if !n.online {
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "node {node_id} is offline{}",
                    n.offline_reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(n.link.clone())
    }

    fn worker_link(&self, worker_id: &str) -> Result<Arc<AgentLink>, ErrorBody> {
        let w = self.worker(worker_id)?;
        self.link(&w.node_id)
    }

    pub fn set_draining(&self, node_id: &str, draining: bool) -> Result<NodeInfo, ErrorBody> {
        {
            let mut reg = self.reg.lock().unwrap();
            let n = reg.nodes.get_mut(node_id).ok_or_else(|| {
                ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}"))
            })?;
            n.draining = draining;
        }
        self.node_info(node_id)
    }

    /// Picks the online, non-draining node with the fewest workers.
    fn schedule(&self) -> Result<String, ErrorBody> {
        let reg = self.reg.lock().unwrap();
        let counts = worker_counts(&reg);
        reg.nodes
            .iter()
            .filter(|(_, n)| n.online && !n.draining && n.degraded.is_none())
            .map(|(id, _)| (counts.get(id.as_str()).copied().unwrap_or(0), id))
            .min()
            .map(|(_, id)| id.clone())
            .ok_or_else(|| {
                ErrorBody::new(ErrorCode::Unavailable, "no online node accepts new workers")
            })
    }

    /// Spawns a worker on `req.node_id` or on the least-loaded node.
    pub async fn spawn(&self, req: SpawnRequest) -> Result<WorkerInfo, ErrorBody> {
        let node_id = match &req.node_id {
            Some(n) => {
                let info = self.node_info(n)?;
                if info.draining {
                    return Err(ErrorBody::new(
                        ErrorCode::Conflict,
                        format!("node {n} is draining"),
                    ));
                }
                n.clone()
            }
            None => self.schedule()?,
        };
        let link = self.link(&node_id)?;
        let worker_id = ulid::Ulid::new().to_string().to_ascii_lowercase();
        let mut spec = req;
        spec.node_id = None;
        let mut info: WorkerInfo = link
            .request_as(Request::Spawn(Spawn {
                worker_id: worker_id.clone(),
                spec,
            }))
            .await?;
        // A node answers for the worker it was asked to make, on itself:
        // it cannot steer the registry to another node's worker.
        if info.worker_id != worker_id {
            return Err(ErrorBody::new(
                ErrorCode::Internal,
                format!(
                    "node {node_id} answered the spawn of {worker_id} with worker {}",
                    info.worker_id
                ),
            ));
        }
        info.node_id = node_id;
        self.reg
            .lock()
            .unwrap()
            .workers
            .insert(info.worker_id.clone(), info.clone());
        Ok(info)
    }

    /// Fresh state of a worker from its node.
    pub async fn inspect(&self, worker_id: &str) -> Result<WorkerInfo, ErrorBody> {
        let link = self.worker_link(worker_id)?;
        let r: Result<WorkerInfo, ErrorBody> = link
            .request_as(Request::Inspect(WorkerRef {
                worker_id: worker_id.into(),
            }))
            .await;
        self.note_worker(worker_id, &link.node_id, &r);
        r
    }

    /// Records what `node_id`, the worker's owner, answered about it; an
    /// answer about another worker changes nothing.
    fn note_worker(&self, worker_id: &str, node_id: &str, r: &Result<WorkerInfo, ErrorBody>) {
        let mut reg = self.reg.lock().unwrap();
        match r {
            Ok(w) if w.worker_id != worker_id => {
                tracing::warn!(%node_id, %worker_id, answered = %w.worker_id, "node answered for another worker");
            }
            Ok(w) => {
                let subnet = reg.workers.get(worker_id).and_then(|o| o.subnet.clone());
                let mut w = w.clone();
                w.subnet = w.subnet.or(subnet);
                w.node_id = node_id.to_string();
                reg.workers.insert(worker_id.into(), w);
            }
            Err(e) if e.code == ErrorCode::NotFound => {
                reg.workers.remove(worker_id);
            }
            Err(_) => {}
        }
    }

    pub async fn stop(
        &self,
        worker_id: &str,
        timeout_secs: Option<u32>,
    ) -> Result<WorkerInfo, ErrorBody> {
        let link = self.worker_link(worker_id)?;
        let r = link
            .request_as(Request::Stop(Stop {
                worker_id: worker_id.into(),
                timeout_secs,
            }))
            .await;
        self.note_worker(worker_id, &link.node_id, &r);
        r
    }

    /// Removes the worker's container and network.
    pub async fn remove(&self, worker_id: &str, force: bool) -> Result<(), ErrorBody> {
        let link = self.worker_link(worker_id)?;
        let r = link
            .request(Request::Remove(Remove {
                worker_id: worker_id.into(),
                force,
            }))
            .await;
        match r {
            Ok(_) => {
                self.reg.lock().unwrap().workers.remove(worker_id);
                Ok(())
            }
            Err(e) => {
                if e.code == ErrorCode::NotFound {
                    self.reg.lock().unwrap().workers.remove(worker_id);
                }
                Err(e)
            }
        }
    }

    /// Starts a process in a worker.
    pub async fn exec(&self, worker_id: &str, opts: ExecOptions) -> Result<ExecSession, ErrorBody> {
        if opts.cmd.is_empty() {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "exec needs a command",
            ));
        }
        let link = self.worker_link(worker_id)?;
        let (channel, writer, output) = link
            .open_with(DEFAULT_WINDOW, |channel, window| {
                Request::Exec(Exec {
                    channel,
                    worker_id: worker_id.into(),
                    cmd: opts.cmd,
                    env: opts.env,
                    workdir: opts.workdir,
                    user: opts.user,
                    tty: opts.tty,
                    stdin: opts.stdin,
                    size: opts.size,
                    timeout_secs: opts.timeout_secs,
                    window,
                })
            })
            .await?;
        Ok(ExecSession {
            input: ChannelSink {
                channel,
                writer,
                link,
            },
            output,
        })
    }

    /// Runs a command to completion and collects its output (convenience).
    pub async fn exec_collect(
        &self,
        worker_id: &str,
        cmd: &[&str],
    ) -> Result<(i64, Vec<u8>, Vec<u8>), ErrorBody> {
        let mut s = self
            .exec(
                worker_id,
                ExecOptions {
                    cmd: cmd.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                },
            )
            .await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(ev) = s.output.next().await {
            match ev {
                StreamEvent::Data(StreamKind::Stderr, b) => err.extend_from_slice(&b),
                StreamEvent::Data(_, b) => out.extend_from_slice(&b),
                StreamEvent::Gap(n) => {
                    return Err(ErrorBody::new(
                        ErrorCode::Unavailable,
                        format!("{n} bytes of output were lost while the node was unreachable"),
                    ));
                }
                StreamEvent::End { error: Some(e), .. } => return Err(e),
                StreamEvent::End { exit_code, .. } => {
                    return Ok((exit_code.unwrap_or(-1), out, err));
                }
            }
        }
        Err(ErrorBody::new(
            ErrorCode::Internal,
            "exec ended without an exit",
        ))
    }

    pub async fn logs(
        &self,
        worker_id: &str,
        opts: LogOptions,
    ) -> Result<ChannelStream, ErrorBody> {
        let link = self.worker_link(worker_id)?;
        let (_, _, stream) = link
            .open_with(DEFAULT_WINDOW, |channel, window| {
                Request::Logs(Logs {
                    channel,
                    worker_id: worker_id.into(),
                    follow: opts.follow,
                    since: opts.since,
                    tail: opts.tail,
                    timestamps: opts.timestamps,
                    window,
                })
            })
            .await?;
        Ok(stream)
    }

    /// Resizes the TTY of the exec on `channel`.
    pub async fn resize(
        &self,
        worker_id: &str,
        channel: u32,
        size: TermSize,
    ) -> Result<(), ErrorBody> {
        let link = self.worker_link(worker_id)?;
        link.request(Request::Resize(Resize { channel, size }))
            .await
            .map(|_| ())
    }

    pub async fn stat(&self, worker_id: &str, path: &str) -> Result<StatResult, ErrorBody> {
        let link = self.worker_link(worker_id)?;
        link.request_as(Request::Stat(Stat {
            worker_id: worker_id.into(),
            path: path.into(),
        }))
        .await
    }

    /// A tar stream of `path` in the worker.
    pub async fn get_archive(
        &self,
        worker_id: &str,
        path: &str,
    ) -> Result<ChannelStream, ErrorBody> {
        let link = self.worker_link(worker_id)?;
        let (_, _, stream) = link
            .open_with(ARCHIVE_WINDOW, |channel, window| {
                Request::GetArchive(Archive {
                    channel,
                    worker_id: worker_id.into(),
                    path: path.into(),
                    window,
                })
            })
            .await?;
        Ok(stream)
    }

    /// Extracts a tar stream into directory `path` of the worker. Returns the
    /// sink to write the archive into and the stream that reports the end.
    pub async fn put_archive(
        &self,
        worker_id: &str,
        path: &str,
    ) -> Result<ArchiveUpload, ErrorBody> {
        let link = self.worker_link(worker_id)?;
        let (_, writer, done) = link
            .open_with(ARCHIVE_WINDOW, |channel, window| {
                Request::PutArchive(Archive {
                    channel,
                    worker_id: worker_id.into(),
                    path: path.into(),
                    window,
                })
            })
            .await?;
        Ok(ArchiveUpload { writer, done, link })
    }

    // ---- called by the agent connection ----

    /// The node's link, created on first contact.
    pub(crate) fn node_link(&self, node_id: &str) -> Arc<AgentLink> {
        let mut reg = self.reg.lock().unwrap();
        reg.nodes
            .entry(node_id.to_string())
            .or_insert_with(|| NodeEntry {
                link: AgentLink::new(node_id.to_string()),
                online: false,
                connected_since: None,
                degraded: None,
                capabilities: None,
                desired_config: None,
                config_version: None,
                last_config_ack: None,
                draining: false,
                offline_reason: None,
                agent_version: None,
            })
            .link
            .clone()
    }

    /// A connection of the node is up (after [`AgentLink::connect`]).
    pub(crate) fn attach(
        &self,
        node_id: &str,
        agent_version: &str,
        inventory: Option<Vec<WorkerInfo>>,
        config_version: Option<String>,
    ) {
        let mut reg = self.reg.lock().unwrap();
        if let Some(entry) = reg.nodes.get_mut(node_id) {
            // A node behind the desired configuration gets it again.
            if let Some(desired) = &entry.desired_config
                && config_version
                    .as_deref()
                    .is_none_or(|v| v < desired.config_version.as_str())
            {
                let (hub, node, cfg) = (self.clone(), node_id.to_string(), desired.clone());
                tokio::spawn(async move {
                    if let Err(e) = hub.push_config(&node, cfg).await {
                        tracing::warn!(node_id = %node, error = %e, "configuration push on reconnect failed");
                    }
                });
            }
            entry.config_version = config_version;
            entry.online = true;
            entry.connected_since = Some(SystemTime::now());
            entry.degraded = None;
            entry.link.seen();
            entry.offline_reason = None;
            entry.agent_version = Some(agent_version.to_string());
        }
        // The agent's inventory, when it has one, is the truth about its
        // node, and about nothing else: a node may claim only workers that
        // carry its own label and that no other node owns.
        if let Some(inventory) = inventory {
            reg.workers.retain(|_, w| w.node_id != node_id);
            for w in inventory {
                let owner = reg.workers.get(&w.worker_id).map(|o| o.node_id.as_str());
                if w.node_id != node_id || owner.is_some_and(|o| o != node_id) {
                    tracing::warn!(
                        %node_id,
                        worker_id = %w.worker_id,
                        claimed_for = %w.node_id,
                        owner = owner.unwrap_or("-"),
                        "inventory claim refused: the worker is not this node's"
                    );
                    continue;
                }
                reg.workers.insert(w.worker_id.clone(), w);
            }
        }
    }

    /// Forgets a node (`tether ctl node rm`): its live connection closes at
    /// once, what waits on it fails, and its workers leave the registry.
    /// Tokens are voided by the caller through the store. True if the node
    /// was known.
    pub fn forget_node(&self, node_id: &str) -> bool {
        let entry = {
            let mut reg = self.reg.lock().unwrap();
            reg.workers.retain(|_, w| w.node_id != node_id);
            reg.detached.retain(|(n, _), _| n != node_id);
            reg.nodes.remove(node_id)
        };
        match entry {
            Some(e) => {
                e.link.revoke();
                e.link.expire("removed by an operator");
                true
            }
            None => false,
        }
    }

    /// The connection of `generation` ended. Channels and requests wait for
    /// the agent to come back; after the grace period they fail.
    pub(crate) fn detach(&self, link: &Arc<AgentLink>, generation: u64, reason: &str) {
        let node_id = link.node_id.as_str();
        let link = link.clone();
        link.disconnect(generation);
        if link.generation.load(Ordering::SeqCst) != generation {
            return; // a newer connection already took over
        }
        if let Some(n) = self.reg.lock().unwrap().nodes.get_mut(node_id)
            && Arc::ptr_eq(&n.link, &link)
        {
            n.online = false;
            n.offline_reason = Some(reason.to_string());
        }
        let grace = self.grace;
        let reason = reason.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if link.generation.load(Ordering::SeqCst) == generation && !link.is_connected() {
                link.expire(&reason);
            }
        });
    }

    pub(crate) fn on_capabilities(&self, node_id: &str, report: Value) {
        let hash = crate::protocol::capability_hash(&report);
        if let Some(n) = self.reg.lock().unwrap().nodes.get_mut(node_id) {
            n.capabilities = Some((report, hash));
        }
    }

    /// A node with its latest capability report.
    pub fn node_detail(&self, node_id: &str) -> Result<NodeDetail, ErrorBody> {
        let info = self.node_info(node_id)?;
        let reg = self.reg.lock().unwrap();
        let n = reg.nodes.get(node_id);
        let caps = n.and_then(|n| n.capabilities.clone());
        Ok(NodeDetail {
            info,
            config_version: n.and_then(|n| n.config_version.clone()),
            last_config_ack: n.and_then(|n| n.last_config_ack.clone()),
            capability_hash: caps.as_ref().map(|c| c.1.clone()),
            capabilities: caps.map(|c| c.0),
        })
    }

    /// Pushes configuration to a node and returns its acknowledgement. A
    /// missing `config_version` gets a fresh ULID. The configuration is kept
    /// and pushed again when the node reconnects with an older version.
    pub async fn push_config(
        &self,
        node_id: &str,
        mut cfg: crate::protocol::NodeConfig,
    ) -> Result<crate::protocol::ConfigAck, ErrorBody> {
        if cfg.config_version.is_empty() {
            cfg.config_version = ulid::Ulid::new().to_string();
        }
        self.node_info(node_id)?;
        {
            let mut reg = self.reg.lock().unwrap();
            if let Some(n) = reg.nodes.get_mut(node_id) {
                n.desired_config = Some(cfg.clone());
            }
        }
        let link = self.link(node_id)?;
        let ack: crate::protocol::ConfigAck = link.request_as(Request::Configure(cfg)).await?;
        let mut reg = self.reg.lock().unwrap();
        if let Some(n) = reg.nodes.get_mut(node_id) {
            if ack.status == "applied" {
                n.config_version = Some(ack.config_version.clone());
            }
            n.last_config_ack = Some(ack.clone());
        }
        Ok(ack)
    }

    /// Stages configuration for a node without pushing it: the node gets it
    /// when it polls (`updates.enable_dynamic_config`) or reconnects.
    pub fn set_desired_config(
        &self,
        node_id: &str,
        mut cfg: crate::protocol::NodeConfig,
    ) -> Result<String, ErrorBody> {
        if cfg.config_version.is_empty() {
            cfg.config_version = ulid::Ulid::new().to_string();
        }
        let mut reg = self.reg.lock().unwrap();
        let n = reg.nodes.get_mut(node_id).ok_or_else(|| {
            ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}"))
        })?;
        let version = cfg.config_version.clone();
        n.desired_config = Some(cfg);
        Ok(version)
    }

    /// A node asks for newer configuration: push it if there is some.
    pub(crate) fn on_config_poll(&self, node_id: &str, applied: Option<String>) {
        let desired = self
            .reg
            .lock()
            .unwrap()
            .nodes
            .get(node_id)
            .and_then(|n| n.desired_config.clone());
        if let Some(cfg) = desired
            && applied
                .as_deref()
                .is_none_or(|v| v < cfg.config_version.as_str())
        {
            let (hub, node) = (self.clone(), node_id.to_string());
            tokio::spawn(async move {
                if let Err(e) = hub.push_config(&node, cfg).await {
                    tracing::debug!(node_id = %node, error = %e, "configuration push on poll failed");
                }
            });
        }
    }

    pub(crate) fn on_node_status(&self, node_id: &str, st: crate::protocol::NodeStatus) {
        if let Some(n) = self.reg.lock().unwrap().nodes.get_mut(node_id) {
            n.degraded =
                (st.status != "ok").then(|| st.reason.unwrap_or_else(|| st.status.clone()));
        }
    }

    /// Follows worker events (`(node id, event)`) of workers this hub
    /// knows, as agents report them. A receiver that falls more than
    /// [`WORKER_EVENT_BACKLOG`] behind loses the oldest.
    pub fn worker_events(&self) -> tokio::sync::broadcast::Receiver<(String, WorkerEvent)> {
        self.events.subscribe()
    }

    pub(crate) fn on_worker_event(&self, node_id: &str, ev: WorkerEvent) {
        use crate::protocol::WorkerEventKind;
        {
            let mut reg = self.reg.lock().unwrap();
            if reg
                .workers
                .get(&ev.worker_id)
                .is_none_or(|w| w.node_id != node_id)
            {
                return;
            }
            match ev.event {
                WorkerEventKind::Timeout | WorkerEventKind::Removed => {
                    reg.workers.remove(&ev.worker_id);
                }
                WorkerEventKind::Exited | WorkerEventKind::OomKilled => {
                    if let Some(w) = reg.workers.get_mut(&ev.worker_id) {
                        w.state = "exited".into();
                        w.exit_code = ev.exit_code.or(w.exit_code);
                    }
                }
                WorkerEventKind::Unknown => {}
            }
        }
        let _ = self.events.send((node_id.to_string(), ev));
    }

    /// Keeps an exec whose client went away for `grace` of its agent being
    /// connected (the client can only resume while the agent is there; after
    /// a server restart or a cut the grace starts when the agent is back);
    /// dropped (and so cancelled, killing the process) if nobody re-attaches
    /// in time.
    pub fn detach_exec(&self, d: DetachedExec, grace: Duration) {
        let key = (
            d.session.output.node_id().to_string(),
            d.session.output.channel(),
        );
        let mut up = d.session.output.link.link.watch();
        let generation = {
            let mut reg = self.reg.lock().unwrap();
            reg.next_detach += 1;
            let g = reg.next_detach;
            reg.detached.insert(key.clone(), (g, d));
            g
        };
        let reg = self.reg.clone();
        tokio::spawn(async move {
            loop {
                // An error: the node's link is gone for good.
                if up.wait_for(|up| *up).await.is_err() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(grace) => break,
                    down = up.wait_for(|up| !*up) => if down.is_err() { break },
                }
            }
            let expired = {
                let mut r = reg.lock().unwrap();
                match r.detached.get(&key) {
                    Some((g, _)) if *g == generation => r.detached.remove(&key),
                    _ => None,
                }
            };
            if let Some((_, d)) = &expired {
                tracing::info!(node_id = %key.0, channel = key.1, worker_id = %d.worker_id,
                    "nobody re-attached to the exec within the grace: cancelled");
            }
            drop(expired); // outside the lock: dropping cancels on the agent
        });
    }

    /// Whether an exec of `worker_id` on `channel` can be re-attached: it
    /// waits detached, or a client connection holds it (which a re-attach
    /// takes over).
    pub fn can_attach(&self, worker_id: &str, channel: u32) -> Result<(), ErrorBody> {
        let w = self.worker(worker_id)?;
        let reg = self.reg.lock().unwrap();
        let key = (w.node_id, channel);
        let detached = matches!(reg.detached.get(&key), Some((_, d)) if d.worker_id == worker_id);
        if detached || reg.holder(&key, worker_id).is_some() {
            Ok(())
        } else {
            Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no exec channel {channel} waiting on worker {worker_id}"),
            ))
        }
    }

    /// Notes that a client connection holds the exec on `channel` of
    /// `worker_id` until the returned guard is dropped; its token is
    /// cancelled when a newer connection re-attaches: the older one must
    /// then hand the exec back (it may be dead without the server knowing:
    /// a half-open TCP connection looks alive for a long time).
    pub fn hold_exec(&self, worker_id: &str, node_id: &str, channel: u32) -> HeldExec {
        let token = CancellationToken::new();
        let key = (node_id.to_string(), channel);
        let generation = {
            let mut reg = self.reg.lock().unwrap();
            reg.next_detach += 1;
            let g = reg.next_detach;
            let old = reg
                .held
                .insert(key.clone(), (g, worker_id.to_string(), token.clone()));
            if let Some((_, _, t)) = old {
                t.cancel();
            }
            g
        };
        HeldExec {
            reg: self.reg.clone(),
            key,
            generation,
            token,
        }
    }

    /// Takes an exec of `worker_id` back for a re-attaching client: a
    /// detached one at once; one a connection still holds once that
    /// connection has let go of it (asked to, waited for up to
    /// [`TAKEOVER_WAIT`]).
    pub async fn take_exec(
        &self,
        worker_id: &str,
        channel: u32,
    ) -> Result<DetachedExec, ErrorBody> {
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        let key = (self.worker(worker_id)?.node_id, channel);
        loop {
            let err = match self.attach_exec(worker_id, channel) {
                Ok(d) => return Ok(d),
                Err(e) => e,
            };
            let holder = self.reg.lock().unwrap().holder(&key, worker_id).cloned();
            match holder {
                Some(t) if tokio::time::Instant::now() < deadline => {
                    t.cancel();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return Err(err),
            }
        }
    }

    /// Takes a detached exec of `worker_id` back for a re-attaching client.
    pub fn attach_exec(&self, worker_id: &str, channel: u32) -> Result<DetachedExec, ErrorBody> {
        let w = self.worker(worker_id)?;
        let mut reg = self.reg.lock().unwrap();
        match reg.detached.remove(&(w.node_id.clone(), channel)) {
            Some((_, d)) if d.worker_id == worker_id => {
                tracing::info!(node_id = %w.node_id, channel, worker_id, "client re-attached to the exec");
                Ok(d)
            }
            Some(other) => {
                reg.detached.insert((w.node_id, channel), other);
                Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("exec channel {channel} is not an exec of {worker_id}"),
                ))
            }
            None => Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!(
                    "no exec channel {channel} waiting on worker {worker_id} (it ended, or nobody re-attached in time)"
                ),
            )),
        }
    }

    /// Adopts an exec the agent still runs but this server does not know
    /// (the server restarted): it waits, detached, for its client.
    pub(crate) fn adopt_exec(
        &self,
        link: &Arc<AgentLink>,
        open: &crate::protocol::OpenChannel,
        agent_received: u64,
        grace: Duration,
    ) {
        let Ok(h) = link
            .channels
            .open_at(open.channel, DEFAULT_WINDOW, open.from, agent_received)
        else {
            tracing::warn!(node_id = %link.node_id, channel = open.channel, "exec the agent runs could not be adopted");
            return;
        };
        tracing::info!(node_id = %link.node_id, channel = open.channel, worker_id = %open.worker_id,
            from = open.from, "adopted an exec the agent runs: waiting for its client");
        link.next_channel
            .fetch_max(open.channel + 1, Ordering::SeqCst);
        let mut output = ChannelStream {
            channel: open.channel,
            reader: h.reader,
            link: link.clone(),
            done: false,
        };
        output.set_manual_ack();
        let d = DetachedExec {
            worker_id: open.worker_id.clone(),
            session: ExecSession {
                input: ChannelSink {
                    channel: open.channel,
                    writer: h.writer,
                    link: link.clone(),
                },
                output,
            },
            relay: Default::default(),
            end: None,
        };
        self.detach_exec(d, grace);
    }

    /// Whether any agent is connected.
    pub(crate) fn any_online(&self) -> bool {
        self.reg.lock().unwrap().nodes.values().any(|n| n.online)
    }
}

/// An archive being uploaded into a worker.
pub struct ArchiveUpload {
    writer: ChannelWriter,
    done: ChannelStream,
    link: Arc<AgentLink>,
}

impl ArchiveUpload {
    pub async fn write(&mut self, data: Bytes) -> Result<(), ErrorBody> {
        let gone = || ErrorBody::new(ErrorCode::Unavailable, "upload channel closed");
        self.writer
            .write(StreamKind::Data, data)
            .await
            .map_err(|_| gone())
    }

    /// Ends the archive and waits until the agent has extracted it.
    pub async fn finish(mut self) -> Result<(), ErrorBody> {
        self.writer.eof();
        loop {
            match self.done.next().await {
                Some(StreamEvent::End { error: Some(e), .. }) => return Err(e),
                Some(StreamEvent::End { .. }) => return Ok(()),
                Some(StreamEvent::Data(..) | StreamEvent::Gap(_)) => {}
                None => return Err(self.link.unavailable()),
            }
        }
    }

    /// Waits for the agent's verdict without sending more (it may have failed early).
    pub async fn error(&mut self) -> Option<ErrorBody> {
        match self.done.next().await {
            Some(StreamEvent::End { error, .. }) => error,
            _ => Some(self.link.unavailable()),
        }
    }
}
