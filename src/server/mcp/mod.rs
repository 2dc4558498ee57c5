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
/// The most `max_output_bytes` may ask for: what a call keeps is held in
/// the server's memory until it is answered.
pub const MAX_OUTPUT_CAP: usize = 16 * 1024 * 1024;
/// Largest file `sandbox.get_file` / `put_file` carry (larger: the HTTP
/// archive route).
pub const MAX_FILE: usize = 4 * 1024 * 1024;

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

mod audit;
mod follow;
mod route;
mod types;
mod work;
use audit::Call;
use follow::*;
pub use follow::{Progress, Running};
use route::Target;
pub use route::{CALLER, RemoteCall};
pub use types::*;

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
            .map(|token| Progress::Client(token, ctx.peer.clone()));
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
            let there = progress.clone();
            self.routed_with(parts, "sandbox.exec", &a, target, there, async || {
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
        let call = Call::new("sandbox.exec_follow", &a, &a.task_id);
        self.call(&parts, call, Target::Exec(&a.exec_id), async |scope| {
            self.follow_inner(scope, &a).await
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
        let call = Call::new("sandbox.put_file", &a, &a.task_id).worker(&a.worker_id);
        self.call(&parts, call, Target::Worker(&a.worker_id), async |scope| {
            self.put_inner(scope, &a).await
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
        let call = Call::new("sandbox.get_file", &a, &a.task_id).worker(&a.worker_id);
        self.call(&parts, call, Target::Worker(&a.worker_id), async |scope| {
            self.get_inner(scope, &a).await
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
        let call = Call::new("sandbox.stream_logs", &a, &a.task_id).worker(&a.worker_id);
        self.call(&parts, call, Target::Worker(&a.worker_id), async |scope| {
            self.logs_inner(scope, &a).await
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
        let call = Call::new("sandbox.destroy", &a, &a.task_id).worker(&a.worker_id);
        self.call(&parts, call, Target::Worker(&a.worker_id), async |scope| {
            self.destroy_inner(scope, &a).await
        })
        .await
    }

    #[tool(
        name = "node.list",
        description = "The allowed nodes, their status and capabilities."
    )]
    async fn node_list(&self, Extension(parts): Extension<Parts>) -> Out<NodeList> {
        let call = Call::new("node.list", &(), "");
        self.run(scope_of(&parts), call, async |scope| {
            let nodes = self.nodes_everywhere(scope, &parts).await;
            Ok(NodeList { nodes })
        })
        .await
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
        let call = Call::new("node.get", &a, "");
        self.call(&parts, call, Target::Node(&a.node_id), async |scope| {
            self.node_get_inner(scope, &a)
        })
        .await
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
