//! One MCP session reaches the nodes of every replica. A session lives at
//! one replica; a tool call that names what another replica holds (a
//! sandbox, a node, a followed exec) is made at that replica for the same
//! caller (`POST /internal/v1/mcp/call`, the replicas' key authorizing the
//! passing on and the caller's own token the call, judged there as at
//! `/mcp`), and its answer comes back as the tool's, after the progress
//! notifications it made on the way. The session's replica audits the
//! call; the holder does not again.

use super::*;
use crate::server::api::forward;
use crate::server::replicas::FORWARDED;
use serde::de::DeserializeOwned;

/// The header that carries the caller's own `Authorization` on a call
/// passed between replicas (theirs carries the replicas' key).
pub const CALLER: &str = "x-tether-caller";

/// A tool call passed to the replica that holds what it names. The answer
/// is lines of JSON: `{"progress": N, "message": M}` for each progress
/// notification (asked for by `progress`), then `{"ok": RESULT}` or
/// `{"error": "code: why"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoteCall {
    pub tool: String,
    pub arguments: serde_json::Value,
    #[serde(default)]
    pub progress: bool,
}

/// What a call acts on, to tell which replica holds it.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    Worker(&'a str),
    /// A sandbox named by its worker id, or by its task's job.
    Sandbox {
        task_id: &'a str,
        worker_id: Option<&'a str>,
        job_id: Option<&'a str>,
    },
    Node(&'a str),
    /// An exec followed where it was started.
    Exec(&'a str),
}

/// How long a replica waits for another's answer to a call: a command's
/// longest wait and a minute for `sandbox.exec`, a few seconds for a node's
/// state (a replica that does not answer must not hold up `node.list`),
/// five minutes for the rest (a sandbox made, a file of 4 MiB moved, logs
/// followed for a minute).
fn answer_within(tool: &str) -> Duration {
    match tool {
        "sandbox.exec" | "sandbox.exec_follow" => Duration::from_secs(MAX_WAIT_S + 60),
        "node.list" | "node.get" => Duration::from_secs(10),
        _ => Duration::from_secs(300),
    }
}

impl Tools {
    /// The other replica that holds what a call names, when this one does
    /// not and another does.
    async fn holder(
        &self,
        target: Target<'_>,
        org: Option<&str>,
    ) -> Result<Option<String>, String> {
        let Some(replica) = self.app.replica.as_ref() else {
            return Ok(None);
        };
        let app = &self.app;
        let query = match target {
            Target::Sandbox {
                worker_id: None,
                job_id: None,
                ..
            } => return Ok(None),
            Target::Worker(w)
            | Target::Sandbox {
                worker_id: Some(w), ..
            } => {
                if forward::holds_worker(app, w) {
                    return Ok(None);
                }
                vec![("worker", w)]
            }
            Target::Sandbox {
                task_id,
                job_id: Some(j),
                ..
            } => {
                let here = forward::holds_job(app, task_id, j, org);
                let mut query = vec![("task", task_id), ("job", j)];
                query.extend(org.map(|o| ("org", o)));
                let there = forward::holder_by(app, replica, &query).await;
                // A job names a sandbox only where it names one.
                if here && there.is_some() {
                    return Err(format!(
                        "invalid_request: job {j} has sandboxes at several replicas in task {task_id}: name the worker_id"
                    ));
                }
                return Ok(there);
            }
            Target::Node(n) => {
                if forward::holds_node(app, n) {
                    return Ok(None);
                }
                return Ok(forward::node_holder(app, replica, n).await);
            }
            Target::Exec(id) => {
                if self.app.mcp_execs.holds(id) {
                    return Ok(None);
                }
                vec![("mcp_exec", id)]
            }
        };
        Ok(forward::holder_by(app, replica, &query).await)
    }

    /// Runs `here` unless another replica holds what the call names: then
    /// the call is made there, for the same caller.
    pub(super) async fn routed<A: Serialize, T: DeserializeOwned>(
        &self,
        parts: Option<&Parts>,
        tool: &str,
        args: &A,
        target: Target<'_>,
        here: impl AsyncFnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        self.routed_with(parts, tool, args, target, None, here)
            .await
    }

    /// [`Tools::routed`], the progress notifications made where the call
    /// runs going to `progress`.
    pub(super) async fn routed_with<A: Serialize, T: DeserializeOwned>(
        &self,
        parts: Option<&Parts>,
        tool: &str,
        args: &A,
        target: Target<'_>,
        progress: Option<Progress>,
        here: impl AsyncFnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        let org = parts.and_then(scope_of).and_then(|s| s.org());
        match self.holder(target, org.as_deref()).await? {
            Some(url) => self.call_at(&url, parts, tool, args, progress).await,
            None => here().await,
        }
    }

    /// Makes `tool` at the replica at `url` for the caller of `parts`.
    async fn call_at<A: Serialize, T: DeserializeOwned>(
        &self,
        url: &str,
        parts: Option<&Parts>,
        tool: &str,
        args: &A,
        progress: Option<Progress>,
    ) -> Result<T, String> {
        let replica = self
            .app
            .replica
            .as_ref()
            .ok_or("internal: this server has no replicas")?;
        let caller = parts
            .and_then(|p| p.headers.get(axum::http::header::AUTHORIZATION))
            .ok_or(NO_SCOPE)?;
        let call = RemoteCall {
            tool: tool.to_string(),
            arguments: serde_json::to_value(args).map_err(|e| format!("internal: {e}"))?,
            progress: progress.is_some(),
        };
        let unavailable = |e: String| {
            tracing::warn!(replica = %url, error = %e, tool, "the replica that holds a call's target did not answer");
            format!("unavailable: the replica that holds this did not answer: {e}")
        };
        let r = replica
            .http
            .post(format!("{url}/internal/v1/mcp/call"))
            .bearer_auth(&replica.key)
            .header(CALLER, caller)
            .header(FORWARDED, &replica.id)
            .json(&call)
            .timeout(answer_within(tool))
            .send()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        let status = r.status();
        if !status.is_success() {
            // A refusal before the call: one JSON error.
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            let e = &v["error"];
            return Err(match (&e["code"], &e["message"]) {
                (serde_json::Value::String(c), m) => format!("{c}: {}", m.as_str().unwrap_or("")),
                _ => unavailable(format!("HTTP {status}")),
            });
        }
        let mut body = r.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let v: serde_json::Value =
                    serde_json::from_slice(&line).map_err(|e| unavailable(e.to_string()))?;
                if let Some(seen) = v.get("progress") {
                    if let Some(p) = &progress {
                        let message = v["message"].as_str().unwrap_or_default().to_string();
                        p.send(seen.as_f64().unwrap_or_default(), message).await;
                    }
                    continue;
                }
                if let Some(ok) = v.get("ok") {
                    return serde_json::from_value(ok.clone())
                        .map_err(|e| unavailable(e.to_string()));
                }
                return Err(v["error"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| unavailable(format!("an answer without a result: {v}"))));
            }
            match futures_util::StreamExt::next(&mut body).await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(unavailable(e.without_url().to_string())),
                None => return Err(unavailable("the answer ended before its result".into())),
            }
        }
    }

    /// A call another replica passed on: made here for `scope`, never
    /// passed on again.
    pub(crate) async fn call_here(
        &self,
        scope: &Scope,
        call: RemoteCall,
        progress: Option<Progress>,
    ) -> Result<serde_json::Value, String> {
        fn args<A: DeserializeOwned>(v: serde_json::Value) -> Result<A, String> {
            serde_json::from_value(v).map_err(|e| format!("invalid_request: {e}"))
        }
        fn out<T: Serialize>(r: Result<T, String>) -> Result<serde_json::Value, String> {
            r.and_then(|t| serde_json::to_value(t).map_err(|e| format!("internal: {e}")))
        }
        let v = call.arguments;
        match call.tool.as_str() {
            "sandbox.create" => out(self.create_inner(scope, &args(v)?).await),
            "sandbox.exec" => out(self.exec_inner(scope, &args(v)?, progress).await),
            "sandbox.exec_follow" => out(self.follow_inner(scope, &args(v)?).await),
            "sandbox.put_file" => out(self.put_inner(scope, &args(v)?).await),
            "sandbox.get_file" => out(self.get_inner(scope, &args(v)?).await),
            "sandbox.stream_logs" => out(self.logs_inner(scope, &args(v)?).await),
            "sandbox.destroy" => out(self.destroy_inner(scope, &args(v)?).await),
            "node.list" => out(Ok(NodeList {
                nodes: self.nodes_here(scope, true),
            })),
            "node.get" => out(self.node_get_inner(scope, &args(v)?)),
            t => Err(format!("invalid_request: no such tool: {t}")),
        }
    }

    /// The nodes the caller may use that this replica knows (only those it
    /// holds, if `held_only`).
    fn nodes_here(&self, scope: &Scope, held_only: bool) -> Vec<NodeSummary> {
        self.hub()
            .nodes()
            .into_iter()
            .filter(|n| !held_only || forward::holds_node(&self.app, &n.node_id))
            .filter(|n| self.node_ok(scope, &n.node_id).is_ok())
            .map(|n| self.summary(n))
            .collect()
    }

    /// Every node the caller may use, each as the replica that holds it
    /// sees it (by node id).
    pub(super) async fn nodes_everywhere(&self, scope: &Scope, parts: &Parts) -> Vec<NodeSummary> {
        let mine = self.nodes_here(scope, false);
        let Some(replica) = self.app.replica.as_ref() else {
            return mine;
        };
        let peers = forward::peers(&self.app, replica).await;
        let none = serde_json::json!({});
        let asks = peers.iter().map(|(_, url)| {
            self.call_at::<_, NodeList>(url, Some(parts), "node.list", &none, None)
        });
        let mut all: Vec<NodeSummary> = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .flat_map(|l| l.nodes)
            .collect();
        let theirs: std::collections::HashSet<String> =
            all.iter().map(|n| n.node_id.clone()).collect();
        all.extend(mine.into_iter().filter(|n| !theirs.contains(&n.node_id)));
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }
}
