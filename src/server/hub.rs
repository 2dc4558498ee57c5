//! The embeddable control plane: a typed async [`Hub`] holding the node and
//! worker registries and one [`AgentLink`] per connected agent. The HTTP API
//! is a thin layer over it; other orchestrators can embed it directly.

use crate::mux::{ChannelReader, ChannelWriter, Channels, Inbound, OutTx, Outbound};
use crate::protocol::{
    Archive, ChannelClose, DEFAULT_WINDOW, ErrorBody, ErrorCode, Exec, Logs, Message, Remove,
    Request, Resize, Spawn, SpawnRequest, Stat, StatResult, Stop, StreamKind, TermSize,
    WorkerEvent, WorkerInfo, WorkerRef,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long the hub waits for an agent's reply to a request.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A node as the operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub node_id: String,
    /// `online`, `offline` or `draining`.
    pub status: String,
    pub draining: bool,
    pub workers: usize,
    /// RFC 3339 UTC time of the last traffic from the agent.
    pub last_seen: Option<String>,
    /// Why the node is offline, when it is.
    pub offline_reason: Option<String>,
    pub agent_version: Option<String>,
}

/// One connected agent: the outbound queue of its WebSocket, its pending
/// requests and its channels.
pub struct AgentLink {
    pub node_id: String,
    pub session_id: String,
    out: OutTx,
    pending: Mutex<HashMap<String, oneshot::Sender<Result<Value, ErrorBody>>>>,
    pub(crate) channels: Arc<Channels>,
    next_channel: AtomicU32,
    /// Cancelled when the connection ends.
    pub(crate) closed: CancellationToken,
    timeout: Duration,
}

impl AgentLink {
    pub(crate) fn new(node_id: String, session_id: String, out: OutTx) -> Arc<Self> {
        Arc::new(AgentLink {
            node_id,
            session_id,
            out,
            pending: Mutex::new(HashMap::new()),
            channels: Channels::new(),
            next_channel: AtomicU32::new(1),
            closed: CancellationToken::new(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// Queues a message for the agent; false if the connection is gone.
    pub(crate) fn send(&self, m: Message) -> bool {
        self.out.send(Outbound::msg(&m)).is_ok()
    }

    fn unavailable(&self) -> ErrorBody {
        ErrorBody::new(
            ErrorCode::Unavailable,
            format!("node {} disconnected", self.node_id),
        )
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&self, request: Request) -> Result<Value, ErrorBody> {
        let id = ulid::Ulid::new().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.clone(), tx);
        let kind = request.kind();
        if self
            .out
            .send(Outbound::msg(&Message::Request {
                id: id.clone(),
                request,
            }))
            .is_err()
        {
            self.pending.lock().unwrap().remove(&id);
            return Err(self.unavailable());
        }
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
        if let Some(tx) = self.pending.lock().unwrap().remove(id) {
            let _ = tx.send(r);
        }
    }

    /// The connection ended: fail everything in flight.
    pub(crate) fn shut(&self, reason: &str) {
        self.closed.cancel();
        let err = ErrorBody::new(
            ErrorCode::Unavailable,
            format!("node {} disconnected: {reason}", self.node_id),
        );
        for (_, tx) in self.pending.lock().unwrap().drain() {
            let _ = tx.send(Err(err.clone()));
        }
        self.channels.close_all(err);
    }

    fn open_channel(self: &Arc<Self>) -> (u32, ChannelWriter, ChannelStream) {
        loop {
            let id = self.next_channel.fetch_add(1, Ordering::Relaxed).max(1);
            if let Ok(h) = self.channels.open(id, DEFAULT_WINDOW, self.out.clone()) {
                let stream = ChannelStream {
                    channel: id,
                    reader: h.reader,
                    link: self.clone(),
                    done: false,
                };
                return (id, h.writer, stream);
            }
        }
    }

    /// Sends a request that opens a channel; on failure the channel is closed.
    async fn open_with(
        self: &Arc<Self>,
        make: impl FnOnce(u32) -> Request,
    ) -> Result<(u32, ChannelWriter, ChannelStream), ErrorBody> {
        let (id, writer, stream) = self.open_channel();
        // On failure `stream` drops here, which also tells the agent to
        // cancel (a timed-out request may still be running there).
        self.request(make(id)).await.map(|_| (id, writer, stream))
    }
}

/// What a channel yields to its consumer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Data(StreamKind, Bytes),
    /// The operation ended: exit code for exec, error if it failed.
    End {
        exit_code: Option<i64>,
        error: Option<ErrorBody>,
    },
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

    /// Next event; after `End` it returns `None`.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        if self.done {
            return None;
        }
        match self.reader.recv().await {
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
        if !self.done && self.link.channels.is_open(self.channel) {
            self.link.channels.remove(self.channel);
            let _ = self
                .link
                .out
                .send(Outbound::msg(&Message::ChannelClose(ChannelClose {
                    channel: self.channel,
                    exit_code: None,
                    error: None,
                })));
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

    /// Signals end of input.
    pub fn close(&self) {
        let _ = self
            .writer
            .send(&Message::ChannelEof(crate::protocol::ChannelEof {
                channel: self.channel,
            }));
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

/// Options of an exec.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecOptions {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub size: Option<TermSize>,
}

/// Options of a log request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LogOptions {
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub since: Option<i64>,
    #[serde(default)]
    pub tail: Option<u64>,
    #[serde(default)]
    pub timestamps: bool,
}

/// A running exec: its input and its output, usable from two tasks.
pub struct ExecSession {
    pub input: ChannelSink,
    pub output: ChannelStream,
}

struct NodeEntry {
    link: Option<Arc<AgentLink>>,
    draining: bool,
    last_seen: SystemTime,
    offline_reason: Option<String>,
    agent_version: Option<String>,
}

#[derive(Default)]
struct Registry {
    nodes: HashMap<String, NodeEntry>,
    /// The server's view of every worker, reconciled from agent inventories.
    workers: HashMap<String, WorkerInfo>,
}

/// The control plane, cheap to clone.
#[derive(Clone, Default)]
pub struct Hub {
    reg: Arc<Mutex<Registry>>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every node ever seen, sorted by id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let reg = self.reg.lock().unwrap();
        let mut v: Vec<NodeInfo> = reg
            .nodes
            .iter()
            .map(|(id, n)| {
                let status = match (&n.link, n.draining) {
                    (None, _) => "offline",
                    (Some(_), true) => "draining",
                    (Some(_), false) => "online",
                };
                NodeInfo {
                    node_id: id.clone(),
                    status: status.into(),
                    draining: n.draining,
                    workers: reg.workers.values().filter(|w| &w.node_id == id).count(),
                    last_seen: Some(rfc3339(n.last_seen)),
                    offline_reason: n.offline_reason.clone(),
                    agent_version: n.agent_version.clone(),
                }
            })
            .collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    pub fn node_info(&self, node_id: &str) -> Result<NodeInfo, ErrorBody> {
        self.nodes()
            .into_iter()
            .find(|n| n.node_id == node_id)
            .ok_or_else(|| ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}")))
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
        n.link.clone().ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "node {node_id} is offline{}",
                    n.offline_reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            )
        })
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
        reg.nodes
            .iter()
            .filter(|(_, n)| n.link.is_some() && !n.draining)
            .map(|(id, _)| {
                (
                    reg.workers.values().filter(|w| &w.node_id == id).count(),
                    id,
                )
            })
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
        let info: WorkerInfo = link
            .request_as(Request::Spawn(Spawn { worker_id, spec }))
            .await?;
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
        self.note_worker(worker_id, &r);
        r
    }

    fn note_worker(&self, worker_id: &str, r: &Result<WorkerInfo, ErrorBody>) {
        let mut reg = self.reg.lock().unwrap();
        match r {
            Ok(w) => {
                let subnet = reg.workers.get(worker_id).and_then(|o| o.subnet.clone());
                let mut w = w.clone();
                w.subnet = w.subnet.or(subnet);
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
        self.note_worker(worker_id, &r);
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
            .open_with(|channel| {
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
                    window: DEFAULT_WINDOW,
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
            .open_with(|channel| {
                Request::Logs(Logs {
                    channel,
                    worker_id: worker_id.into(),
                    follow: opts.follow,
                    since: opts.since,
                    tail: opts.tail,
                    timestamps: opts.timestamps,
                    window: DEFAULT_WINDOW,
                })
            })
            .await?;
        Ok(stream)
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
            .open_with(|channel| {
                Request::GetArchive(Archive {
                    channel,
                    worker_id: worker_id.into(),
                    path: path.into(),
                    window: DEFAULT_WINDOW,
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
        let (channel, writer, done) = link
            .open_with(|channel| {
                Request::PutArchive(Archive {
                    channel,
                    worker_id: worker_id.into(),
                    path: path.into(),
                    window: DEFAULT_WINDOW,
                })
            })
            .await?;
        Ok(ArchiveUpload {
            channel,
            writer,
            done,
            link,
        })
    }

    // ---- called by the agent connection ----

    pub(crate) fn attach(
        &self,
        link: Arc<AgentLink>,
        agent_version: &str,
        inventory: Option<Vec<WorkerInfo>>,
    ) {
        let mut reg = self.reg.lock().unwrap();
        let node_id = link.node_id.clone();
        let entry = reg.nodes.entry(node_id.clone()).or_insert(NodeEntry {
            link: None,
            draining: false,
            last_seen: SystemTime::now(),
            offline_reason: None,
            agent_version: None,
        });
        if let Some(old) = entry.link.replace(link) {
            old.shut("replaced by a new connection");
        }
        entry.last_seen = SystemTime::now();
        entry.offline_reason = None;
        entry.agent_version = Some(agent_version.to_string());
        // The agent's inventory, when it has one, is the truth about its node.
        if let Some(inventory) = inventory {
            reg.workers.retain(|_, w| w.node_id != node_id);
            for w in inventory {
                reg.workers.insert(w.worker_id.clone(), w);
            }
        }
    }

    pub(crate) fn detach(&self, link: &Arc<AgentLink>, reason: &str) {
        link.shut(reason);
        let mut reg = self.reg.lock().unwrap();
        if let Some(n) = reg.nodes.get_mut(&link.node_id)
            && n.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link))
        {
            n.link = None;
            n.offline_reason = Some(reason.to_string());
        }
    }

    pub(crate) fn seen(&self, node_id: &str) {
        if let Some(n) = self.reg.lock().unwrap().nodes.get_mut(node_id) {
            n.last_seen = SystemTime::now();
        }
    }

    pub(crate) fn on_worker_event(&self, node_id: &str, ev: WorkerEvent) {
        let mut reg = self.reg.lock().unwrap();
        if let Some(w) = reg.workers.get_mut(&ev.worker_id)
            && w.node_id == node_id
        {
            w.state = "exited".into();
            w.exit_code = ev.exit_code;
        }
    }

    /// Closes every agent connection (server shutdown).
    pub(crate) fn links(&self) -> Vec<Arc<AgentLink>> {
        self.reg
            .lock()
            .unwrap()
            .nodes
            .values()
            .filter_map(|n| n.link.clone())
            .collect()
    }
}

/// An archive being uploaded into a worker.
pub struct ArchiveUpload {
    channel: u32,
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
        let _ = self
            .writer
            .send(&Message::ChannelEof(crate::protocol::ChannelEof {
                channel: self.channel,
            }));
        loop {
            match self.done.next().await {
                Some(StreamEvent::End { error: Some(e), .. }) => return Err(e),
                Some(StreamEvent::End { .. }) => return Ok(()),
                Some(StreamEvent::Data(..)) => {}
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
