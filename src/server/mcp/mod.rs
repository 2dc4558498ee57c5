//! The MCP endpoint (`/mcp`, Streamable HTTP on the official SDK, `rmcp`):
//! AI agents drive sandboxes through the server, which is their only way to
//! a node. Only allow-listed nodes' tools are exposed; every call names a
//! task and is logged with it; a sandbox belongs to the task that made it
//! (docs/mcp.md).

use super::AppState;
use super::hub::{Hub, StreamEvent};
use crate::protocol::operator::{ExecOptions, NodeInfo, NodeState};
use crate::protocol::{ErrorBody, SpawnRequest, StreamKind};
use base64::Engine;
use bytes::Bytes;
use rmcp::handler::server::common::FromContextPart;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::Extension;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::{Json, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::info;

/// Output kept per stream of `sandbox.exec` by default.
pub const DEFAULT_OUTPUT_CAP: usize = 256 * 1024;
/// Largest file `sandbox.get_file` / `put_file` carry (larger: the HTTP
/// archive route).
pub const MAX_FILE: usize = 4 * 1024 * 1024;

/// A tool's arguments. Read as the SDK's `Parameters` are (an ill-typed
/// argument is a tool error, not a protocol error), but the error names the
/// argument: `argument "argv": invalid type: integer `5`, expected a
/// sequence`. The `#[tool]` macro finds the input schema by this name.
pub struct Parameters<P>(pub P);

impl<P: JsonSchema> JsonSchema for Parameters<P> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        P::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        P::json_schema(generator)
    }
}

impl<S, P: serde::de::DeserializeOwned> FromContextPart<ToolCallContext<'_, S>> for Parameters<P> {
    fn from_context_part(context: &mut ToolCallContext<'_, S>) -> Result<Self, rmcp::ErrorData> {
        let arguments = context.arguments.take().unwrap_or_default();
        serde_path_to_error::deserialize(serde_json::Value::Object(arguments))
            .map(Parameters)
            .map_err(|e| {
                let path = e.path().to_string();
                let what = if path == "." {
                    "the arguments".to_string()
                } else {
                    format!("argument {path:?}")
                };
                // The SDK turns errors with this prefix into tool errors.
                rmcp::ErrorData::invalid_params(
                    format!(
                        "failed to deserialize parameters: {what}: {}",
                        e.into_inner()
                    ),
                    None,
                )
            })
    }
}

const NO_SCOPE: &str = "unauthorized: no MCP authorization on this request";
const NO_NODE: &str = "unavailable: no node this caller may use on the MCP allowlist is online";

/// Who is calling: the operator, or an MCP token with its limits (set by
/// the endpoint's authorization, read by every tool).
#[derive(Debug, Clone)]
pub enum Scope {
    /// An operator token: the admin's, or an organization's.
    Operator(super::orgs::Caller),
    Token(super::store::McpToken),
}

impl Scope {
    /// Whether the caller may use `node` of organization `org` through MCP
    /// as far as its token goes (the allowlist is the caller's to check).
    pub(crate) fn may_use(&self, node: &str, org: &str) -> bool {
        self.orgs().admits(org)
            && match self {
                Scope::Operator(_) => true,
                Scope::Token(t) => t.nodes.is_empty() || t.nodes.iter().any(|n| n == node),
            }
    }

    /// The organizations whose nodes the caller may use.
    fn orgs(&self) -> super::OrgScope {
        match self {
            Scope::Operator(c) => c.scope.clone(),
            Scope::Token(t) => t
                .org
                .clone()
                .map_or(super::OrgScope::All, super::OrgScope::Org),
        }
    }

    /// The organization stamped on what the caller makes (none: admin).
    pub(crate) fn org(&self) -> Option<String> {
        match self.orgs() {
            super::OrgScope::All => None,
            super::OrgScope::Org(o) => Some(o),
        }
    }
}

mod route;
use route::Target;
pub use route::{CALLER, RemoteCall};

type Parts = axum::http::request::Parts;

fn scope_of(parts: &Parts) -> Option<Scope> {
    parts.extensions.get::<Scope>().cloned()
}

/// The tools, over one hub and store.
#[derive(Clone)]
pub struct Tools {
    app: Arc<AppState>,
    tool_router: ToolRouter<Self>,
}

type Out<T> = Result<Json<T>, String>;

fn err(e: ErrorBody) -> String {
    format!("{}: {}", e.code, e.message)
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateArgs {
    /// The task this sandbox serves (audited; every later call names it).
    pub task_id: String,
    pub job_id: Option<String>,
    pub image: String,
    /// The node to run on; by default the least-loaded allowed node.
    pub node: Option<String>,
    /// The main process (default: the image's).
    pub cmd: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
    /// Removed after this many seconds.
    pub timeout_s: Option<u64>,
    /// The node's inference backend on localhost:11434.
    pub inference: Option<bool>,
    /// `none`, `restricted` or `allowlist`.
    pub network_policy: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Sandbox {
    pub worker_id: String,
    pub node_id: String,
    pub state: String,
    pub ip: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ExecArgs {
    pub task_id: String,
    /// The sandbox: its `worker_id`, or the `job_id` it was created with
    /// (one of them).
    #[serde(default)]
    pub worker_id: Option<String>,
    #[serde(default)]
    pub job_id: Option<String>,
    /// The command as arguments (or `command`, run by `sh -c`).
    pub argv: Option<Vec<String>>,
    pub command: Option<String>,
    /// Text given on standard input.
    pub stdin: Option<String>,
    pub timeout_s: Option<u64>,
    pub env: Option<BTreeMap<String, String>>,
    pub workdir: Option<String>,
    /// Bytes kept per stream (default 256 KiB).
    pub max_output_bytes: Option<usize>,
    /// Seconds the call waits for the command to end (default 300, at most
    /// 3600). A command still running then goes on: the answer has
    /// `running: true` and an `exec_id` for `sandbox.exec_follow`.
    pub wait_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ExecResult {
    /// Set once the command has ended.
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    /// Output beyond the cap was dropped (cut on a UTF-8 boundary).
    pub truncated: bool,
    pub duration_ms: u64,
    /// The command outlived the wait and goes on.
    pub running: bool,
    /// Follow a running command with `sandbox.exec_follow`.
    pub exec_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct FollowArgs {
    pub task_id: String,
    /// From a `sandbox.exec` answer with `running: true`.
    pub exec_id: String,
    /// Seconds to wait for the command to end (default 30, at most 3600);
    /// the output since the last answer comes back either way.
    pub wait_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PutFileArgs {
    pub task_id: String,
    pub worker_id: String,
    /// Absolute path of the file in the sandbox.
    pub path: String,
    /// The content as text, or `content_base64`.
    pub content: Option<String>,
    pub content_base64: Option<String>,
    /// Permission bits, octal as a string (default "644").
    pub mode: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PutFileResult {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct GetFileArgs {
    pub task_id: String,
    pub worker_id: String,
    pub path: String,
    /// Refuse files larger than this (default and most: 4 MiB).
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct FileContent {
    pub path: String,
    pub size: u64,
    /// The content when it is UTF-8 text, else `content_base64`.
    pub content: Option<String>,
    pub content_base64: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct WorkerArgs {
    pub task_id: String,
    pub worker_id: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LogsArgs {
    pub task_id: String,
    pub worker_id: String,
    /// Only the last N lines.
    pub tail: Option<u64>,
    /// Only lines since this Unix time (seconds).
    pub since: Option<i64>,
    /// Also wait this many seconds for new lines (at most 60).
    pub follow_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LogLine {
    /// RFC 3339, from the engine.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Logs {
    pub lines: Vec<LogLine>,
    /// Lines past the output cap were dropped.
    pub truncated: bool,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Destroyed {
    pub worker_id: String,
    /// The node it ran on.
    pub node_id: String,
    pub removed: bool,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct NodeArgs {
    pub node_id: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeSummary>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct NodeSummary {
    pub node_id: String,
    pub status: String,
    pub workers: usize,
    /// New sandboxes are not placed on it.
    #[serde(default)]
    pub draining: bool,
    /// The node's inference backend runs and answers.
    pub inference: bool,
    /// The node's capability report, if it sent one.
    pub capabilities: Option<serde_json::Value>,
}

impl Tools {
    fn hub(&self) -> &Hub {
        &self.app.hub
    }

    fn allowed(&self, node_id: &str) -> bool {
        self.app.store.mcp_nodes().iter().any(|n| n == node_id)
    }

    /// Whether `scope` may use `node_id`: the allowlist, then the token's
    /// own nodes.
    fn node_ok(&self, scope: &Scope, node_id: &str) -> Result<(), String> {
        // Another organization's node does not exist for this caller.
        if !self
            .hub()
            .node_org(node_id)
            .is_some_and(|o| scope.orgs().admits(&o))
        {
            return Err(format!("not_found: no such node: {node_id}"));
        }
        if !self.allowed(node_id) {
            return Err(format!(
                "policy_denied: node {node_id} is not on the MCP allowlist (tether ctl mcp allow)"
            ));
        }
        if let Scope::Token(t) = scope
            && !t.nodes.is_empty()
            && !t.nodes.iter().any(|n| n == node_id)
        {
            return Err(format!(
                "policy_denied: this MCP token may not use node {node_id} (its nodes: {})",
                t.nodes.join(", ")
            ));
        }
        Ok(())
    }

    /// The worker, if it is on a node of an organization `scope` sees
    /// (another's is absent, its node unnamed).
    fn visible_worker(
        &self,
        scope: &Scope,
        worker_id: &str,
    ) -> Option<crate::protocol::WorkerInfo> {
        let w = self.hub().worker(worker_id).ok()?;
        let org = self.hub().node_org(&w.node_id)?;
        scope.orgs().admits(&org).then_some(w)
    }

    /// Whether `scope` may name `task_id`.
    fn task_ok(scope: &Scope, task_id: &str) -> Result<(), String> {
        if task_id.trim().is_empty() {
            return Err("invalid_request: task_id is required".into());
        }
        if let Scope::Token(t) = scope
            && let Some(p) = &t.task_prefix
            && !task_id.starts_with(p.as_str())
        {
            return Err(format!(
                "policy_denied: this MCP token's task ids start with {p:?}"
            ));
        }
        Ok(())
    }

    /// The sandbox a call names by `worker_id`, or by the `job_id` it was
    /// created with in the task (one sandbox of the job, else the call must
    /// name the worker).
    fn sandbox_of(
        &self,
        scope: &Scope,
        task_id: &str,
        worker_id: Option<&str>,
        job_id: Option<&str>,
    ) -> Result<crate::protocol::WorkerInfo, String> {
        let job = match (worker_id, job_id) {
            (Some(w), None) => return self.worker_of_task(scope, task_id, w),
            (None, Some(j)) => j,
            _ => return Err("invalid_request: give worker_id or job_id (one of them)".into()),
        };
        Self::task_ok(scope, task_id)?;
        let mut of_job: Vec<String> = self
            .hub()
            .workers()
            .into_iter()
            .filter(|w| w.task_id.as_deref() == Some(task_id) && w.job_id.as_deref() == Some(job))
            .filter(|w| self.visible_worker(scope, &w.worker_id).is_some())
            .map(|w| w.worker_id)
            .collect();
        match of_job.len() {
            0 => Err(format!(
                "not_found: no sandbox of job {job} in task {task_id}"
            )),
            1 => self.worker_of_task(scope, task_id, &of_job.remove(0)),
            n => Err(format!(
                "invalid_request: job {job} has {n} sandboxes in task {task_id}: name the worker_id"
            )),
        }
    }

    /// The worker, if the call's scope and task may use it.
    fn worker_of_task(
        &self,
        scope: &Scope,
        task_id: &str,
        worker_id: &str,
    ) -> Result<crate::protocol::WorkerInfo, String> {
        Self::task_ok(scope, task_id)?;
        let w = self
            .visible_worker(scope, worker_id)
            .ok_or_else(|| format!("not_found: no such worker: {worker_id}"))?;
        self.node_ok(scope, &w.node_id)?;
        if w.task_id.as_deref() != Some(task_id) {
            return Err(format!(
                "policy_denied: sandbox {worker_id} belongs to another task"
            ));
        }
        Ok(w)
    }

    fn summary(&self, n: NodeInfo) -> NodeSummary {
        let caps = self
            .hub()
            .node_detail(&n.node_id)
            .ok()
            .and_then(|d| d.capabilities);
        let inference = caps
            .as_ref()
            .is_some_and(crate::protocol::CapabilityReport::inference_ready);
        NodeSummary {
            status: n.status.to_string(),
            workers: n.workers,
            draining: n.draining,
            inference,
            capabilities: caps.and_then(|c| serde_json::to_value(c).ok()),
            node_id: n.node_id,
        }
    }
}

/// What a tool's result tells the audit trail.
trait Audited {
    /// The node, when the result names it (the worker may be gone).
    fn node(&self) -> Option<&str> {
        None
    }
    /// The worker, when the result names it (a sandbox just made).
    fn worker(&self) -> Option<&str> {
        None
    }
    fn exit_code(&self) -> Option<i64> {
        None
    }
    fn bytes(&self) -> Option<u64> {
        None
    }
}

impl Audited for Sandbox {
    fn node(&self) -> Option<&str> {
        Some(&self.node_id)
    }
    fn worker(&self) -> Option<&str> {
        Some(&self.worker_id)
    }
}
impl Audited for Destroyed {
    fn node(&self) -> Option<&str> {
        Some(&self.node_id)
    }
}
impl Audited for ExecResult {
    fn exit_code(&self) -> Option<i64> {
        self.exit_code
    }
    fn bytes(&self) -> Option<u64> {
        Some((self.stdout.len() + self.stderr.len()) as u64)
    }
}
impl Audited for PutFileResult {
    fn bytes(&self) -> Option<u64> {
        Some(self.size)
    }
}
impl Audited for FileContent {
    fn bytes(&self) -> Option<u64> {
        Some(self.size)
    }
}
impl Audited for Logs {
    fn bytes(&self) -> Option<u64> {
        Some(self.lines.iter().map(|l| l.line.len() as u64).sum())
    }
}

/// Who called, as the audit trail names it (a token by its id only).
fn caller(scope: Option<&Scope>) -> String {
    match scope {
        Some(Scope::Operator(c)) => c.name.clone(),
        Some(Scope::Token(t)) => format!("mcp-token:{}", t.id),
        None => "unauthorized".into(),
    }
}

/// What the audit trail records of a call besides its outcome.
struct Call<'a, A: Serialize> {
    tool: &'static str,
    args: &'a A,
    task_id: &'a str,
    job_id: Option<&'a str>,
    worker_id: Option<&'a str>,
}

impl Tools {
    /// Runs a tool's work for an authorized caller, then logs the call and
    /// appends it to the audit trail.
    async fn run<A: Serialize, T: Audited>(
        &self,
        scope: Option<Scope>,
        call: Call<'_, A>,
        work: impl AsyncFnOnce(&Scope) -> Result<T, String>,
    ) -> Out<T> {
        let started = Instant::now();
        let outcome = match &scope {
            Some(scope) => work(scope).await,
            None => Err(NO_SCOPE.to_string()),
        };
        let (tool, task_id) = (call.tool, call.task_id);
        let worker_id = call
            .worker_id
            .or_else(|| outcome.as_ref().ok().and_then(|v| v.worker()))
            .filter(|w| !w.is_empty());
        let mut r = super::audit::AuditRecord::new(&caller(scope.as_ref()), &format!("mcp:{tool}"));
        r.task_id = Some(task_id.to_string());
        r.job_id = call.job_id.map(String::from);
        r.worker_id = worker_id.map(String::from);
        r.node_id = worker_id
            .zip(scope.as_ref())
            .and_then(|(w, s)| self.visible_worker(s, w))
            .map(|w| w.node_id);
        r.org = scope.as_ref().and_then(Scope::org);
        r.args_digest = super::audit::digest(&serde_json::to_value(call.args).unwrap_or_default());
        r.duration_ms = started.elapsed().as_millis() as u64;
        match &outcome {
            Ok(v) => {
                r.outcome = "ok".into();
                if let Some(n) = v.node() {
                    r.node_id = Some(n.to_string());
                }
                r.exit_code = v.exit_code();
                r.bytes = v.bytes();
                info!(tool, task_id, worker_id, "mcp call");
            }
            Err(e) => {
                r.outcome = e.clone();
                info!(tool, task_id, worker_id, error = %e, "mcp call refused or failed");
            }
        }
        let store = self.app.store.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.append_audit(&r) {
                tracing::error!(error = %e, "could not append to the audit trail");
            }
        });
        outcome.map(Json)
    }
}

/// `s` cut to at most `cap` bytes on a UTF-8 boundary (invalid bytes
/// replaced); whether anything was cut.
/// How long `sandbox.exec` waits for its command by default, and the most
/// any call waits.
const DEFAULT_EXEC_WAIT_S: u64 = 300;
const MAX_WAIT_S: u64 = 3600;
/// A followed exec that has ended is forgotten this long after, if nobody
/// reads its end.
const ENDED_KEPT: Duration = Duration::from_secs(600);

/// MCP execs that outlived their call, by exec id.
#[derive(Default, Clone)]
pub struct Running(Arc<Mutex<HashMap<String, Arc<Followed>>>>);

impl Running {
    /// Takes back an exec a restarted server adopted from its agent, by
    /// the label this server's predecessor gave it: it is followed on
    /// under the same exec id, from what no answer had taken yet.
    pub fn adopt(&self, hub: &Hub, d: super::hub::DetachedExec, label: &str) {
        let l = match serde_json::from_str::<ExecLabel>(label) {
            Ok(l) if l.worker_id == d.worker_id => l,
            // Not ours, or about another worker: dropping it cancels it.
            _ => {
                tracing::warn!(worker_id = %d.worker_id, %label, "an adopted exec's label is not an MCP exec's: cancelled");
                return;
            }
        };
        info!(exec_id = %l.exec_id, task_id = %l.task_id, worker_id = %l.worker_id,
            "adopted an MCP exec after a restart: it can be followed on");
        let run = Arc::new(Followed::new(l.clone(), Instant::now()));
        run.state.lock().unwrap().returned = true;
        run.pump(hub, d.session.output, None);
        self.insert(l.exec_id, run);
    }

    fn insert(&self, id: String, run: Arc<Followed>) {
        let mut m = self.0.lock().unwrap();
        // Ended ones nobody came back for go.
        m.retain(|_, r| {
            r.state
                .lock()
                .unwrap()
                .ended_at
                .is_none_or(|t| t.elapsed() < ENDED_KEPT)
        });
        m.insert(id, run);
    }

    fn get(&self, id: &str) -> Option<Arc<Followed>> {
        self.0.lock().unwrap().get(id).cloned()
    }

    /// Whether exec `id` is followed here.
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.0.lock().unwrap().contains_key(id)
    }

    fn remove(&self, id: &str) {
        self.0.lock().unwrap().remove(id);
    }
}

/// What an MCP exec's `exec` request carries as its label (kept by the
/// agent with the channel, listed in `hello.open`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ExecLabel {
    #[serde(rename = "mcp_exec")]
    exec_id: String,
    task_id: String,
    worker_id: String,
    cap: usize,
}

impl ExecLabel {
    fn encode(&self) -> String {
        serde_json::to_string(self).expect("a label serializes")
    }
}

/// Output read beyond the last answer that is acknowledged anyway, so the
/// command is never held up by a follower that does not come (half the
/// channel's window). Up to this much read since the last answer is still
/// the agent's to send again if the server restarts.
const ACK_ANYWAY: u64 = crate::protocol::DEFAULT_WINDOW / 2;

/// One exec's output as its pump keeps it until it is read.
pub struct Followed {
    task_id: String,
    worker_id: String,
    cap: usize,
    t0: Instant,
    state: Mutex<FollowState>,
    changed: tokio::sync::Notify,
    /// Told when an answer took the output: the pump acknowledges it.
    answered: tokio::sync::Notify,
}

#[derive(Default)]
struct FollowState {
    out: Vec<u8>,
    err: Vec<u8>,
    truncated: bool,
    /// The first answer went out: no more progress notifications.
    returned: bool,
    ended: Option<Result<Option<i64>, String>>,
    ended_at: Option<Instant>,
    exec_id: Option<String>,
    /// The channel offset the output kept so far reaches.
    read_to: u64,
    /// What the latest answer took: the agent may forget it.
    answered_to: u64,
}

impl Followed {
    fn new(label: ExecLabel, t0: Instant) -> Followed {
        Followed {
            task_id: label.task_id,
            worker_id: label.worker_id,
            cap: label.cap,
            t0,
            state: Mutex::new(FollowState {
                exec_id: Some(label.exec_id),
                ..Default::default()
            }),
            changed: tokio::sync::Notify::new(),
            answered: tokio::sync::Notify::new(),
        }
    }

    /// Reads the exec's output into this one, in a task the hub tracks (it
    /// ends at shutdown). Output is acknowledged to the agent once an
    /// answer took it (or once [`ACK_ANYWAY`] waits), so a restarted server
    /// gets from the agent again what no answer has had yet.
    fn pump(
        self: &Arc<Self>,
        hub: &Hub,
        mut output: super::hub::ChannelStream,
        progress: Option<(rmcp::model::ProgressToken, rmcp::Peer<rmcp::RoleServer>)>,
    ) {
        output.set_manual_ack();
        let run = self.clone();
        hub.spawn_task(async move {
            let mut seen = 0usize;
            let mut acked = output.position();
            loop {
                let ev = tokio::select! {
                    _ = run.answered.notified() => {
                        let to = run.state.lock().unwrap().answered_to;
                        if to > acked {
                            output.ack_now(to);
                            acked = to;
                        }
                        continue;
                    }
                    ev = output.next() => ev,
                };
                match ev {
                    Some(StreamEvent::Data(k, b)) => {
                        if let Some((token, peer)) = &progress
                            && !run.state.lock().unwrap().returned
                        {
                            seen += b.len();
                            let stream = if k == StreamKind::Stderr {
                                "stderr"
                            } else {
                                "stdout"
                            };
                            let note = rmcp::model::ProgressNotificationParam::new(
                                token.clone(),
                                seen as f64,
                            )
                            .with_message(format!("{stream}: {}", String::from_utf8_lossy(&b)));
                            // A client gone away is no reason to stop the command.
                            let _ = peer.notify_progress(note).await;
                        }
                        run.keep(k, &b, output.position());
                        if output.position() - acked > ACK_ANYWAY {
                            acked = output.position();
                            output.ack(acked);
                        }
                    }
                    Some(StreamEvent::End { exit_code, error }) => {
                        run.end(exit_code, error.map(err));
                        return;
                    }
                    Some(StreamEvent::Gap(_) | StreamEvent::Eof) => {}
                    None => break,
                }
            }
            run.end(
                None,
                Some("unavailable: the command's output stream ended".into()),
            );
        });
    }

    /// Keeps output until it is read, at most the cap (a little beyond, so
    /// the cut lands on a character boundary) per stream.
    fn keep(&self, k: StreamKind, b: &[u8], read_to: u64) {
        let mut st = self.state.lock().unwrap();
        st.read_to = read_to;
        let buf = if k == StreamKind::Stderr {
            &mut st.err
        } else {
            &mut st.out
        };
        let room = (self.cap + 4).saturating_sub(buf.len());
        buf.extend_from_slice(&b[..b.len().min(room)]);
        if b.len() > room {
            st.truncated = true;
        }
    }

    fn end(&self, exit_code: Option<i64>, error: Option<String>) {
        let mut st = self.state.lock().unwrap();
        st.ended = Some(match error {
            Some(e) => Err(e),
            None => Ok(exit_code),
        });
        st.ended_at = Some(Instant::now());
        drop(st);
        self.changed.notify_waiters();
    }

    /// Waits up to `wait` for the end, then answers with the output kept
    /// since the last answer.
    async fn wait(&self, wait: Duration) -> Result<ExecResult, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if self.state.lock().unwrap().ended.is_some() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let mut st = self.state.lock().unwrap();
        st.returned = true;
        st.answered_to = st.read_to;
        self.answered.notify_one();
        let (out, errs): (Vec<u8>, Vec<u8>) =
            (std::mem::take(&mut st.out), std::mem::take(&mut st.err));
        let (stdout, t1) = capped(&out, self.cap);
        let (stderr, t2) = capped(&errs, self.cap);
        let truncated = std::mem::take(&mut st.truncated) || t1 || t2;
        let (running, exit_code) = match &st.ended {
            None => (true, None),
            Some(Ok(code)) => (false, *code),
            Some(Err(e)) => return Err(e.clone()),
        };
        let exec_id = running.then(|| st.exec_id.clone()).flatten();
        Ok(ExecResult {
            exit_code,
            stdout,
            stderr,
            truncated,
            duration_ms: self.t0.elapsed().as_millis() as u64,
            running,
            exec_id,
        })
    }
}

fn capped(bytes: &[u8], cap: usize) -> (String, bool) {
    let s = String::from_utf8_lossy(bytes);
    if s.len() <= cap {
        return (s.into_owned(), false);
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_string(), true)
}

#[tool_router(router = tool_router)]
impl Tools {
    pub(crate) fn new(app: Arc<AppState>) -> Self {
        Tools {
            app,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        name = "sandbox.create",
        description = "Start a sandbox (a worker container on its own network) for a task, on an allowed node."
    )]
    async fn create(
        &self,
        Parameters(a): Parameters<CreateArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Out<Sandbox> {
        let call = Call {
            tool: "sandbox.create",
            args: &a,
            task_id: &a.task_id,
            job_id: a.job_id.as_deref(),
            worker_id: None,
        };
        self.run(scope_of(&parts), call, async |scope| {
            self.create_routed(scope, &parts, &a).await
        })
        .await
    }

    #[tool(
        name = "sandbox.exec",
        description = "Run a command in a sandbox to its end; output capped per stream."
    )]
    async fn exec(
        &self,
        Parameters(a): Parameters<ExecArgs>,
        ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Out<ExecResult> {
        // Output as it comes, when the client asked for progress.
        let progress = ctx
            .meta
            .get_progress_token()
            .map(|token| (token, ctx.peer.clone()));
        let parts = ctx.extensions.get::<Parts>();
        let scope = parts.and_then(scope_of);
        let call = Call {
            tool: "sandbox.exec",
            args: &a,
            task_id: &a.task_id,
            job_id: a.job_id.as_deref(),
            worker_id: a.worker_id.as_deref(),
        };
        let target = Target::Sandbox {
            task_id: &a.task_id,
            worker_id: a.worker_id.as_deref(),
            job_id: a.job_id.as_deref(),
        };
        self.run(scope, call, async |scope| {
            self.routed(parts, "sandbox.exec", &a, target, async || {
                self.exec_inner(scope, &a, progress).await
            })
            .await
        })
        .await
    }

    #[tool(
        name = "sandbox.exec_follow",
        description = "Follow a command that outlived its sandbox.exec call: the output since the last answer, and its exit code once it ends."
    )]
    async fn exec_follow(
        &self,
        Parameters(a): Parameters<FollowArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Out<ExecResult> {
        let call = Call {
            tool: "sandbox.exec_follow",
            args: &a,
            task_id: &a.task_id,
            job_id: None,
            worker_id: None,
        };
        self.run(scope_of(&parts), call, async |scope| {
            let target = Target::Exec(&a.exec_id);
            self.routed(
                Some(&parts),
                "sandbox.exec_follow",
                &a,
                target,
                async || self.follow_inner(scope, &a).await,
            )
            .await
        })
        .await
    }

    #[tool(
        name = "sandbox.put_file",
        description = "Write a file into a sandbox (text or base64, at most 4 MiB; larger files: the HTTP archive route)."
    )]
    async fn put_file(
        &self,
        Parameters(a): Parameters<PutFileArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Out<PutFileResult> {
        let call = Call {
            tool: "sandbox.put_file",
            args: &a,
            task_id: &a.task_id,
            job_id: None,
            worker_id: Some(&a.worker_id),
        };
        self.run(scope_of(&parts), call, async |scope| {
            let target = Target::Worker(&a.worker_id);
            self.routed(Some(&parts), "sandbox.put_file", &a, target, async || {
                self.put_inner(scope, &a).await
            })
            .await
        })
        .await
    }

    #[tool(
        name = "sandbox.get_file",
        description = "Read a file from a sandbox (text, or base64 when not UTF-8; at most 4 MiB)."
    )]
    async fn get_file(
        &self,
        Parameters(a): Parameters<GetFileArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Out<FileContent> {
        let call = Call {
            tool: "sandbox.get_file",
            args: &a,
            task_id: &a.task_id,
            job_id: None,
            worker_id: Some(&a.worker_id),
        };
        self.run(scope_of(&parts), call, async |scope| {
            let target = Target::Worker(&a.worker_id);
            self.routed(Some(&parts), "sandbox.get_file", &a, target, async || {
                self.get_inner(scope, &a).await
            })
            .await
        })
        .await
    }

    #[tool(
        name = "sandbox.stream_logs",
        description = "A sandbox's main process output, line by line with time stamps; optionally waits for more."
    )]
    async fn stream_logs(
        &self,
        Parameters(a): Parameters<LogsArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Out<Logs> {
        let call = Call {
            tool: "sandbox.stream_logs",
            args: &a,
            task_id: &a.task_id,
            job_id: None,
            worker_id: Some(&a.worker_id),
        };
        self.run(scope_of(&parts), call, async |scope| {
            let target = Target::Worker(&a.worker_id);
            self.routed(
                Some(&parts),
                "sandbox.stream_logs",
                &a,
                target,
                async || self.logs_inner(scope, &a).await,
            )
            .await
        })
        .await
    }

    #[tool(
        name = "sandbox.destroy",
        description = "Remove a sandbox and its network."
    )]
    async fn destroy(
        &self,
        Parameters(a): Parameters<WorkerArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Out<Destroyed> {
        let call = Call {
            tool: "sandbox.destroy",
            args: &a,
            task_id: &a.task_id,
            job_id: None,
            worker_id: Some(&a.worker_id),
        };
        self.run(scope_of(&parts), call, async |scope| {
            let target = Target::Worker(&a.worker_id);
            self.routed(Some(&parts), "sandbox.destroy", &a, target, async || {
                self.destroy_inner(scope, &a).await
            })
            .await
        })
        .await
    }

    #[tool(
        name = "node.list",
        description = "The allowed nodes, their status and capabilities."
    )]
    async fn node_list(&self, Extension(parts): Extension<Parts>) -> Out<NodeList> {
        let scope = scope_of(&parts).ok_or(NO_SCOPE)?;
        let nodes = self.nodes_everywhere(&scope, &parts).await;
        Ok(Json(NodeList { nodes }))
    }

    #[tool(
        name = "node.get",
        description = "One allowed node: status, capabilities, whether inference runs."
    )]
    async fn node_get(
        &self,
        Parameters(a): Parameters<NodeArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Out<NodeSummary> {
        let scope = scope_of(&parts).ok_or(NO_SCOPE)?;
        let target = Target::Node(&a.node_id);
        let n = self
            .routed(Some(&parts), "node.get", &a, target, async || {
                self.node_get_inner(&scope, &a)
            })
            .await?;
        Ok(Json(n))
    }
}

impl Tools {
    /// `sandbox.create`: with replicas, a sandbox without a node goes to
    /// the least-loaded node the caller may use at any replica, and the
    /// call is made at the replica that holds the node.
    async fn create_routed(
        &self,
        scope: &Scope,
        parts: &Parts,
        a: &CreateArgs,
    ) -> Result<Sandbox, String> {
        Self::task_ok(scope, &a.task_id)?;
        let mut a = a.clone();
        if a.node.is_none() && self.app.replica.is_some() {
            let nodes = self.nodes_everywhere(scope, parts).await;
            let least = nodes
                .into_iter()
                .filter(|n| n.status == NodeState::Online.as_str() && !n.draining)
                .min_by_key(|n| n.workers)
                .ok_or(NO_NODE)?;
            a.node = Some(least.node_id);
        }
        let target = a.node.as_deref().map_or(Target::Here, Target::Node);
        self.routed(Some(parts), "sandbox.create", &a, target, async || {
            self.create_inner(scope, &a).await
        })
        .await
    }

    async fn create_inner(&self, scope: &Scope, a: &CreateArgs) -> Result<Sandbox, String> {
        Self::task_ok(scope, &a.task_id)?;
        let node = match &a.node {
            Some(n) => {
                self.node_ok(scope, n)?;
                n.clone()
            }
            // The least-loaded node this caller may use that is online.
            None => self
                .hub()
                .nodes()
                .into_iter()
                .filter(|n| {
                    n.status == NodeState::Online
                        && !n.draining
                        && self.node_ok(scope, &n.node_id).is_ok()
                })
                .min_by_key(|n| n.workers)
                .map(|n| n.node_id)
                .ok_or(NO_NODE)?,
        };
        let network_policy = a
            .network_policy
            .as_ref()
            .map(|p| serde_json::from_value(serde_json::Value::String(p.clone())))
            .transpose()
            .map_err(|_| "invalid_request: network_policy is none, restricted or allowlist")?;
        let req = SpawnRequest {
            image: a.image.clone(),
            cmd: a.cmd.clone().unwrap_or_default(),
            env: a.env.clone().unwrap_or_default(),
            node_id: Some(node),
            task_id: Some(a.task_id.clone()),
            job_id: a.job_id.clone(),
            timeout_secs: a.timeout_s,
            inference: a.inference.unwrap_or(false),
            network_policy,
            resources: crate::protocol::Resources {
                cpus: a.cpus,
                memory_mb: a.memory_mb,
                ..Default::default()
            },
            ..Default::default()
        };
        let w = self.hub().spawn(req).await.map_err(err)?;
        Ok(Sandbox {
            worker_id: w.worker_id,
            node_id: w.node_id,
            state: w.state.to_string(),
            ip: w.ip,
        })
    }

    async fn exec_inner(
        &self,
        scope: &Scope,
        a: &ExecArgs,
        progress: Option<(rmcp::model::ProgressToken, rmcp::Peer<rmcp::RoleServer>)>,
    ) -> Result<ExecResult, String> {
        let worker_id = self
            .sandbox_of(
                scope,
                &a.task_id,
                a.worker_id.as_deref(),
                a.job_id.as_deref(),
            )?
            .worker_id;
        let cmd = match (&a.argv, &a.command) {
            (Some(argv), None) if !argv.is_empty() => argv.clone(),
            (None, Some(c)) => vec!["sh".into(), "-c".into(), c.clone()],
            _ => return Err("invalid_request: give argv or command (one of them)".into()),
        };
        let cap = a.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_CAP);
        let t0 = Instant::now();
        // Kept by the agent with the exec: a restarted server takes the
        // exec back as this one, to be followed on (`adopt`).
        let label = ExecLabel {
            exec_id: ulid::Ulid::new().to_string().to_ascii_lowercase(),
            task_id: a.task_id.clone(),
            worker_id: worker_id.clone(),
            cap,
        };
        let mut d = self
            .hub()
            .exec(
                &worker_id,
                ExecOptions {
                    cmd,
                    env: a.env.clone().unwrap_or_default(),
                    workdir: a.workdir.clone(),
                    stdin: a.stdin.is_some(),
                    timeout_secs: a.timeout_s,
                    label: Some(label.encode()),
                    ..Default::default()
                },
            )
            .await
            .map_err(err)?;
        if let Some(text) = &a.stdin {
            d.input
                .write(Bytes::copy_from_slice(text.as_bytes()))
                .await
                .map_err(err)?;
            d.input.close();
        }
        // The output is pumped by a task of its own, so the command can
        // outlive this call and be followed.
        let run = Arc::new(Followed::new(label, t0));
        run.pump(self.hub(), d.output, progress);
        let wait = Duration::from_secs(a.wait_s.unwrap_or(DEFAULT_EXEC_WAIT_S).min(MAX_WAIT_S));
        let r = run.wait(wait).await?;
        if r.running {
            let id = r.exec_id.clone().expect("a running answer names its exec");
            self.app.mcp_execs.insert(id, run);
        }
        Ok(r)
    }

    async fn follow_inner(&self, scope: &Scope, a: &FollowArgs) -> Result<ExecResult, String> {
        Self::task_ok(scope, &a.task_id)?;
        let run = self
            .app
            .mcp_execs
            .get(&a.exec_id)
            .filter(|r| r.task_id == a.task_id)
            .ok_or_else(|| format!("not_found: no running exec {} of this task", a.exec_id))?;
        // The sandbox is still the task's (and within the token's nodes).
        self.worker_of_task(scope, &a.task_id, &run.worker_id)?;
        let wait = Duration::from_secs(a.wait_s.unwrap_or(30).min(MAX_WAIT_S));
        let mut r = run.wait(wait).await?;
        if r.running {
            r.exec_id = Some(a.exec_id.clone());
        } else {
            self.app.mcp_execs.remove(&a.exec_id);
        }
        Ok(r)
    }

    async fn destroy_inner(&self, scope: &Scope, a: &WorkerArgs) -> Result<Destroyed, String> {
        let w = self.worker_of_task(scope, &a.task_id, &a.worker_id)?;
        self.hub().remove(&a.worker_id, true).await.map_err(err)?;
        Ok(Destroyed {
            worker_id: a.worker_id.clone(),
            node_id: w.node_id,
            removed: true,
        })
    }

    fn node_get_inner(&self, scope: &Scope, a: &NodeArgs) -> Result<NodeSummary, String> {
        self.node_ok(scope, &a.node_id)?;
        let n = self.hub().node_info(&a.node_id).map_err(err)?;
        Ok(self.summary(n))
    }

    async fn logs_inner(&self, scope: &Scope, a: &LogsArgs) -> Result<Logs, String> {
        self.worker_of_task(scope, &a.task_id, &a.worker_id)?;
        let follow = a.follow_s.unwrap_or(0).min(60);
        let mut s = self
            .hub()
            .logs(
                &a.worker_id,
                crate::protocol::operator::LogOptions {
                    follow: follow > 0,
                    since: a.since,
                    tail: a.tail,
                    timestamps: true,
                },
            )
            .await
            .map_err(err)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(follow);
        let (mut out, mut errs) = (Vec::new(), Vec::new());
        let mut kept = 0usize;
        let mut truncated = false;
        loop {
            let ev = if follow > 0 {
                match tokio::time::timeout_at(deadline, s.next()).await {
                    Ok(ev) => ev,
                    Err(_) => break,
                }
            } else {
                s.next().await
            };
            match ev {
                Some(StreamEvent::Data(k, b)) => {
                    if kept + b.len() > DEFAULT_OUTPUT_CAP {
                        truncated = true;
                        continue;
                    }
                    kept += b.len();
                    let buf = if k == StreamKind::Stderr {
                        &mut errs
                    } else {
                        &mut out
                    };
                    buf.push(b);
                }
                Some(StreamEvent::End { error: Some(e), .. }) => return Err(err(e)),
                Some(StreamEvent::End { .. }) | None => break,
                Some(_) => {}
            }
        }
        let mut lines = Vec::new();
        for (stream, chunks) in [("stdout", out), ("stderr", errs)] {
            let text = String::from_utf8_lossy(&chunks.concat()).into_owned();
            for l in text.lines() {
                // The engine puts its RFC 3339 time first, then a space.
                let (time, line) = l.split_once(' ').unwrap_or(("", l));
                lines.push(LogLine {
                    time: time.to_string(),
                    stream: stream.to_string(),
                    line: line.to_string(),
                });
            }
        }
        lines.sort_by(|a, b| a.time.cmp(&b.time));
        Ok(Logs { lines, truncated })
    }

    async fn put_inner(&self, scope: &Scope, a: &PutFileArgs) -> Result<PutFileResult, String> {
        self.worker_of_task(scope, &a.task_id, &a.worker_id)?;
        let data = match (&a.content, &a.content_base64) {
            (Some(t), None) => t.as_bytes().to_vec(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| format!("invalid_request: content_base64: {e}"))?,
            _ => {
                return Err("invalid_request: give content or content_base64 (one of them)".into());
            }
        };
        if data.len() > MAX_FILE {
            return Err(format!(
                "too_large: {} bytes; at most {MAX_FILE} through MCP, larger files through PUT /api/v1/workers/{{id}}/archive",
                data.len()
            ));
        }
        let path = std::path::Path::new(&a.path);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err("invalid_request: path must name a file".into());
        };
        if !path.is_absolute() {
            return Err("invalid_request: path must be absolute".into());
        }
        let mode = u32::from_str_radix(a.mode.as_deref().unwrap_or("644"), 8)
            .map_err(|_| "invalid_request: mode is octal, e.g. \"755\"")?;
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(crate::protocol::now_millis() / 1000);
        h.set_cksum();
        tar.append_data(&mut h, name, data.as_slice())
            .map_err(|e| format!("internal: {e}"))?;
        let archive = tar.into_inner().map_err(|e| format!("internal: {e}"))?;
        let mut up = self
            .hub()
            .put_archive(&a.worker_id, &dir.to_string_lossy())
            .await
            .map_err(err)?;
        up.write(Bytes::from(archive)).await.map_err(err)?;
        up.finish().await.map_err(err)?;
        Ok(PutFileResult {
            path: a.path.clone(),
            size: data.len() as u64,
        })
    }

    async fn get_inner(&self, scope: &Scope, a: &GetFileArgs) -> Result<FileContent, String> {
        self.worker_of_task(scope, &a.task_id, &a.worker_id)?;
        let max = a.max_bytes.unwrap_or(MAX_FILE).min(MAX_FILE);
        let mut s = self
            .hub()
            .get_archive(&a.worker_id, &a.path)
            .await
            .map_err(err)?;
        // The archive: the file plus tar's headers and padding.
        let mut archive = Vec::new();
        while let Some(ev) = s.next().await {
            match ev {
                StreamEvent::Data(_, b) => {
                    archive.extend_from_slice(&b);
                    if archive.len() > max + 64 * 1024 {
                        return Err(format!(
                            "too_large: {} is over {max} bytes; read it through GET /api/v1/workers/{{id}}/archive",
                            a.path
                        ));
                    }
                }
                StreamEvent::End { error: Some(e), .. } => return Err(err(e)),
                StreamEvent::End { .. } => break,
                _ => {}
            }
        }
        let mut tar = tar::Archive::new(archive.as_slice());
        let mut entries = tar.entries().map_err(|e| format!("internal: {e}"))?;
        let Some(entry) = entries.next() else {
            return Err(format!("not_found: {}", a.path));
        };
        let mut e = entry.map_err(|e| format!("internal: {e}"))?;
        if e.header().entry_type() != tar::EntryType::Regular {
            return Err(format!("invalid_request: {} is not a regular file", a.path));
        }
        let size = e.header().size().unwrap_or(0);
        if size as usize > max {
            return Err(format!(
                "too_large: {} is {size} bytes, over {max}; read it through GET /api/v1/workers/{{id}}/archive",
                a.path
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        std::io::Read::read_to_end(&mut e, &mut data).map_err(|e| format!("internal: {e}"))?;
        let (content, content_base64) = match String::from_utf8(data) {
            Ok(t) => (Some(t), None),
            Err(e) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
            ),
        };
        Ok(FileContent {
            path: a.path.clone(),
            size,
            content,
            content_base64,
        })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {}

/// The `/mcp` service: Streamable HTTP, JSON answers where a tool needs no
/// stream, the server's own host names allowed.
pub(crate) fn service(
    app: Arc<AppState>,
    allowed_hosts: Vec<String>,
) -> rmcp::transport::streamable_http_server::StreamableHttpService<
    Tools,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let mut cfg = StreamableHttpServerConfig::default();
    cfg.json_response = true;
    cfg.cancellation_token = app.shutdown.child_token();
    // Loopback names (rmcp's default) and the server's own.
    cfg.allowed_hosts.extend(allowed_hosts);
    cfg.sse_keep_alive = Some(Duration::from_secs(15));
    let sessions = app.mcp_sessions.clone();
    StreamableHttpService::new(move || Ok(Tools::new(app.clone())), sessions, cfg)
}
