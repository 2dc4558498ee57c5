//! `tether ctl`: the operator's client of the server's HTTP API, with
//! docker-CLI habits (exit codes passed through, `cp SRC DST`, `--json`).

mod cp;
pub mod deploy;
mod exec;
pub mod extract;
mod forward;
mod logs;
pub mod orgs;
mod resume;
mod ws;

pub use cp::{CpTarget, copy};
pub use exec::exec;
pub use forward::{Forward, port_forward};
pub use logs::logs;

use crate::protocol::operator::{NodeInfo, PreviewInfo, PreviewRequest, TunnelInfo};
use crate::protocol::{ErrorBody, ErrorCode, SpawnRequest, WorkerInfo};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use std::fmt::Write as _;

/// The API path of a worker: `NAME/SERVICE` names a deployment's service.
pub(crate) fn worker_path(worker: &str) -> String {
    format!("/api/v1/workers/{}", crate::protocol::worker_ref(worker))
}

/// A failed ctl command: the server's error, or a local one.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Api(ErrorBody),
    #[error("cannot reach the server at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{0}")]
    Local(String),
    /// A download refused or failed while unpacking.
    #[error(transparent)]
    Extract(#[from] extract::ExtractError),
}

impl CtlError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CtlError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Talks to one server with one operator token.
#[derive(Clone)]
pub struct Client {
    base: url::Url,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: url::Url, token: String) -> Self {
        Client {
            base,
            token,
            http: crate::http_client(),
        }
    }

    pub(crate) fn url(&self, path: &str) -> url::Url {
        self.base.join(path).expect("API paths are valid")
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    pub(crate) async fn send(&self, rb: RequestBuilder) -> Result<Response, CtlError> {
        let resp = rb.send().await.map_err(|e| CtlError::Connect {
            url: self.base.to_string(),
            reason: crate::error_chain(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = match read_limited(resp, MAX_ERROR_BODY).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => e,
        };
        let body = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| serde_json::from_value::<ErrorBody>(v["error"].clone()).ok());
        Err(CtlError::Api(body.unwrap_or_else(|| {
            ErrorBody::new(ErrorCode::Internal, format!("HTTP {status}: {text}"))
        })))
    }

    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
    ) -> Result<T, CtlError> {
        let body = read_limited(self.send(rb).await?, MAX_REPLY_BODY)
            .await
            .map_err(|e| CtlError::Local(format!("bad reply from server: {e}")))?;
        serde_json::from_slice(&body)
            .map_err(|e| CtlError::Local(format!("bad reply from server: {e}")))
    }

    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, CtlError> {
        #[derive(serde::Deserialize)]
        struct R {
            nodes: Vec<NodeInfo>,
        }
        Ok(self
            .json::<R>(self.request(Method::GET, "/api/v1/nodes"))
            .await?
            .nodes)
    }

    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, CtlError> {
        #[derive(serde::Deserialize)]
        struct R {
            workers: Vec<WorkerInfo>,
        }
        Ok(self
            .json::<R>(self.request(Method::GET, "/api/v1/workers"))
            .await?
            .workers)
    }

    pub async fn inspect(&self, worker: &str) -> Result<WorkerInfo, CtlError> {
        self.json(self.request(Method::GET, &worker_path(worker)))
            .await
    }

    pub async fn spawn(&self, req: &SpawnRequest) -> Result<WorkerInfo, CtlError> {
        self.json(self.request(Method::POST, "/api/v1/workers").json(req))
            .await
    }

    pub async fn stop(&self, worker: &str) -> Result<WorkerInfo, CtlError> {
        self.json(self.request(Method::POST, &format!("{}/stop", worker_path(worker))))
            .await
    }

    pub async fn remove(&self, worker: &str, force: bool) -> Result<(), CtlError> {
        let rb = self
            .request(Method::DELETE, &worker_path(worker))
            .query(&[("force", force)]);
        self.send(rb).await.map(|_| ())
    }

    pub async fn node(&self, node: &str) -> Result<crate::server::hub::NodeDetail, CtlError> {
        self.json(self.request(Method::GET, &format!("/api/v1/nodes/{node}")))
            .await
    }

    /// Forgets a node: its key binding and tokens are void, its connection
    /// closes, and its id may register again.
    pub async fn forget_node(&self, node: &str) -> Result<(), CtlError> {
        self.send(self.request(Method::DELETE, &format!("/api/v1/nodes/{node}")))
            .await
            .map(|_| ())
    }

    /// Pushes a node configuration; returns the agent's acknowledgement.
    pub async fn push_config(
        &self,
        node: &str,
        cfg: &crate::protocol::NodeConfig,
    ) -> Result<crate::protocol::ConfigAck, CtlError> {
        self.json(
            self.request(Method::PUT, &format!("/api/v1/nodes/{node}/config"))
                .json(cfg),
        )
        .await
    }

    /// Issues a preview URL for `port` of `worker`; `url` is filled in
    /// (host-based when the server has a preview domain, else path-based on
    /// this server's address).
    pub async fn preview_url(
        &self,
        worker: &str,
        port: u16,
        ttl: std::time::Duration,
    ) -> Result<PreviewInfo, CtlError> {
        let req = PreviewRequest {
            port,
            ttl_secs: Some(ttl.as_secs()),
        };
        let mut info: PreviewInfo = self
            .json(
                self.request(Method::POST, &format!("{}/previews", worker_path(worker)))
                    .json(&req),
            )
            .await?;
        if info.url.is_none() {
            info.url = info.path.as_deref().map(|p| self.url(p).to_string());
        }
        Ok(info)
    }

    pub async fn previews(&self) -> Result<Vec<PreviewInfo>, CtlError> {
        self.json(self.request(Method::GET, "/api/v1/previews"))
            .await
    }

    pub async fn revoke_preview(&self, id: &str) -> Result<(), CtlError> {
        self.send(self.request(Method::DELETE, &format!("/api/v1/previews/{id}")))
            .await
            .map(|_| ())
    }

    /// Audit records, oldest first, of a task or worker if given.
    pub async fn audit(
        &self,
        task: Option<&str>,
        worker: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, CtlError> {
        let mut q = Vec::new();
        if let Some(t) = task {
            q.push(("task", t));
        }
        if let Some(w) = worker {
            q.push(("worker", w));
        }
        let v: serde_json::Value = self
            .json(self.request(Method::GET, "/api/v1/audit").query(&q))
            .await?;
        Ok(v["records"].as_array().cloned().unwrap_or_default())
    }

    /// The nodes whose tools the MCP endpoint exposes.
    pub async fn mcp_nodes(&self) -> Result<Vec<String>, CtlError> {
        let v: serde_json::Value = self
            .json(self.request(Method::GET, "/api/v1/mcp/nodes"))
            .await?;
        Ok(mcp_node_list(&v))
    }

    /// Puts `node` on the MCP allowlist (or takes it off); the list after.
    pub async fn mcp_allow(&self, node: &str, allow: bool) -> Result<Vec<String>, CtlError> {
        let method = if allow { Method::PUT } else { Method::DELETE };
        let v: serde_json::Value = self
            .json(self.request(method, &format!("/api/v1/mcp/nodes/{node}")))
            .await?;
        Ok(mcp_node_list(&v))
    }

    /// Creates an MCP token: `{id, token, nodes, task_prefix, created_at}`.
    pub async fn mcp_token_create(
        &self,
        nodes: &[String],
        task_prefix: Option<&str>,
    ) -> Result<serde_json::Value, CtlError> {
        let body = serde_json::json!({"nodes": nodes, "task_prefix": task_prefix});
        self.json(self.request(Method::POST, "/api/v1/mcp/tokens").json(&body))
            .await
    }

    pub async fn mcp_tokens(&self) -> Result<Vec<serde_json::Value>, CtlError> {
        self.json(self.request(Method::GET, "/api/v1/mcp/tokens"))
            .await
    }

    pub async fn mcp_token_revoke(&self, id: &str) -> Result<(), CtlError> {
        self.send(self.request(Method::DELETE, &format!("/api/v1/mcp/tokens/{id}")))
            .await
            .map(|_| ())
    }

    pub async fn tunnels(&self) -> Result<Vec<TunnelInfo>, CtlError> {
        self.json(self.request(Method::GET, "/api/v1/tunnels"))
            .await
    }

    pub async fn close_tunnel(&self, id: &str) -> Result<(), CtlError> {
        self.send(self.request(Method::DELETE, &format!("/api/v1/tunnels/{id}")))
            .await
            .map(|_| ())
    }

    pub async fn drain(&self, node: &str, drain: bool) -> Result<NodeInfo, CtlError> {
        let verb = if drain { "drain" } else { "undrain" };
        self.json(self.request(Method::POST, &format!("/api/v1/nodes/{node}/{verb}")))
            .await
    }
}

/// The most of an API reply `ctl` reads (the longest, a node list or the
/// audit trail of a large fleet, is a few MB), and of an error's body: a
/// server cannot make `ctl` hold more.
const MAX_REPLY_BODY: usize = 64 << 20;
const MAX_ERROR_BODY: usize = 64 << 10;

/// A reply's body, refused beyond `max` bytes.
pub(crate) async fn read_limited(mut resp: Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| crate::error_chain(&e))? {
        if body.len() + chunk.len() > max {
            return Err(format!("the reply is larger than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `s` with every control character (C0, DEL, C1) shown as `?`: what a
/// node or worker reports is printed to an operator's terminal, where an
/// escape sequence could rewrite the screen, retitle the window or fake
/// other rows.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// `ctl nodes` as a table.
pub fn format_nodes(nodes: &[NodeInfo]) -> String {
    let mut s = format!(
        "{:<24} {:<9} {:<12} {:>7}  {:<22} {}\n",
        "NODE", "STATUS", "ORG", "WORKERS", "LAST SEEN", "REASON"
    );
    for n in nodes {
        let _ = writeln!(
            s,
            "{:<24} {:<9} {:<12} {:>7}  {:<22} {}",
            printable(&n.node_id),
            n.status,
            printable(n.org.as_deref().unwrap_or("-")),
            n.workers,
            printable(n.last_seen.as_deref().unwrap_or("-")),
            printable(n.offline_reason.as_deref().unwrap_or(""))
        );
    }
    s
}

/// `ctl ps` as a table.
pub fn format_workers(workers: &[WorkerInfo]) -> String {
    let mut s = format!(
        "{:<28} {:<16} {:<28} {:<10} {:<16} {}\n",
        "WORKER", "NODE", "IMAGE", "STATE", "IP", "TASK"
    );
    for w in workers {
        let _ = writeln!(
            s,
            "{:<28} {:<16} {:<28} {:<10} {:<16} {}",
            printable(&w.worker_id),
            printable(&w.node_id),
            printable(&w.image),
            w.state,
            printable(w.ip.as_deref().unwrap_or("-")),
            printable(w.task_id.as_deref().unwrap_or("-"))
        );
    }
    s
}

/// `ctl tunnels` as a table.
pub fn format_tunnels(tunnels: &[TunnelInfo]) -> String {
    let mut s = format!(
        "{:<34} {:<28} {:>5} {:>11} {:>12} {:>12}  {}\n",
        "TUNNEL", "WORKER", "PORT", "CONNECTIONS", "BYTES IN", "BYTES OUT", "SINCE"
    );
    for t in tunnels {
        let _ = writeln!(
            s,
            "{:<34} {:<28} {:>5} {:>11} {:>12} {:>12}  {}",
            printable(&t.id),
            printable(&t.worker_id),
            t.port,
            t.connections,
            t.bytes_to_worker,
            t.bytes_from_worker,
            printable(&t.since)
        );
    }
    s
}

/// Audit records as a table.
pub fn format_audit(records: &[serde_json::Value]) -> String {
    let mut out = String::from("TIME\tCALLER\tOPERATION\tTASK\tWORKER\tOUTCOME\tEXIT\tBYTES\tMS\n");
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => printable(s).into_owned(),
        other => printable(&other.to_string()).into_owned(),
    };
    for r in records {
        out += &format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            s(&r["time"]),
            s(&r["caller"]),
            s(&r["operation"]),
            s(&r["task_id"]),
            s(&r["worker_id"]),
            s(&r["outcome"]),
            s(&r["exit_code"]),
            s(&r["bytes"]),
            s(&r["duration_ms"]),
        );
    }
    out
}

fn mcp_node_list(v: &serde_json::Value) -> Vec<String> {
    v["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `ctl previews` as a table.
pub fn format_previews(previews: &[PreviewInfo]) -> String {
    let mut s = format!(
        "{:<28} {:<28} {:>5}  {}\n",
        "PREVIEW", "WORKER", "PORT", "EXPIRES"
    );
    for p in previews {
        let _ = writeln!(
            s,
            "{:<28} {:<28} {:>5}  {}",
            printable(&p.id),
            printable(&p.worker_id),
            p.port,
            printable(&p.expires_at)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a hostile node reports reaches the operator's terminal only as
    /// text: no escape sequence (clear screen, window title, cursor moves)
    /// survives the tables.
    #[test]
    fn tables_show_control_characters_as_question_marks() {
        let w: WorkerInfo = serde_json::from_value(json!({
            "worker_id": "w1", "node_id": "n\u{1b}[2J", "image": "img\u{1b}]0;owned\u{7}",
            "container_id": "c", "network": "net", "state": "running",
            "task_id": "t\u{9b}1A", "created_at": "2026-01-01T00:00:00Z",
        }))
        .unwrap();
        let n: NodeInfo = serde_json::from_value(json!({
            "node_id": "n\r\n-fake row-", "status": "online", "draining": false, "workers": 1,
            "last_seen": null, "offline_reason": "x\u{7f}", "agent_version": null,
        }))
        .unwrap();
        let audit = vec![json!({"caller": "a\u{1b}c", "operation": "op"})];
        for table in [
            format_workers(&[w]),
            format_nodes(&[n]),
            format_audit(&audit),
        ] {
            let body = table.trim_end_matches('\n');
            assert!(
                !body
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t'),
                "{table:?}"
            );
            assert_eq!(table.lines().count(), 2, "{table:?}");
        }
        assert!(format_workers(&[]).contains("WORKER"));
        assert_eq!(printable("img\u{1b}]0;x\u{7}"), "img?]0;x?");
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
    }
}
