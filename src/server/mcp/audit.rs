//! Every call is logged and appended to the audit trail with its task,
//! caller and outcome.

use super::*;

/// What a tool's result tells the audit trail.
pub(super) trait Audited {
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

impl Audited for NodeList {}
impl Audited for NodeSummary {
    fn node(&self) -> Option<&str> {
        Some(&self.node_id)
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
pub(super) fn caller(scope: Option<&Scope>) -> String {
    match scope {
        Some(Scope::Operator(c)) => c.name.clone(),
        Some(Scope::Token(t)) => format!("mcp-token:{}", t.id),
        None => "unauthorized".into(),
    }
}

/// What the audit trail records of a call besides its outcome.
pub(super) struct Call<'a, A: Serialize> {
    pub(super) tool: &'static str,
    pub(super) args: &'a A,
    pub(super) task_id: &'a str,
    pub(super) job_id: Option<&'a str>,
    pub(super) worker_id: Option<&'a str>,
}

impl<'a, A: Serialize> Call<'a, A> {
    pub(super) fn new(tool: &'static str, args: &'a A, task_id: &'a str) -> Self {
        Call {
            tool,
            args,
            task_id,
            job_id: None,
            worker_id: None,
        }
    }

    /// The call names its sandbox by `worker_id`.
    pub(super) fn worker(mut self, worker_id: &'a str) -> Self {
        self.worker_id = Some(worker_id);
        self
    }
}

impl Tools {
    /// A tool's call for the caller of `parts`: made here, or at the
    /// replica that holds `target`; audited here either way.
    pub(super) async fn call<A: Serialize, T: Audited + serde::de::DeserializeOwned>(
        &self,
        parts: &Parts,
        call: Call<'_, A>,
        target: Target<'_>,
        here: impl AsyncFnOnce(&Scope) -> Result<T, String>,
    ) -> Out<T> {
        let (tool, args) = (call.tool, call.args);
        self.run(scope_of(parts), call, async |scope| {
            let here = async || here(scope).await;
            self.routed(Some(parts), tool, args, target, here).await
        })
        .await
    }

    /// Runs a tool's work for an authorized caller, then logs the call and
    /// appends it to the audit trail.
    pub(super) async fn run<A: Serialize, T: Audited>(
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
        let mut r = self.record(scope.as_ref(), &call, tool, worker_id);
        r.duration_ms = started.elapsed().as_millis() as u64;
        match &outcome {
            Ok(v) => {
                r.outcome = "ok".into();
                if let Some(n) = v.node() {
                    r.node_id = Some(n.to_string());
                    self.fill_org(&mut r);
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
        self.append(r);
        outcome.map(Json)
    }

    /// What every record of `call` says: who, which task, job, sandbox,
    /// node and organization, and a digest of the arguments.
    fn record<A: Serialize>(
        &self,
        scope: Option<&Scope>,
        call: &Call<'_, A>,
        tool: &str,
        worker_id: Option<&str>,
    ) -> crate::server::audit::AuditRecord {
        let mut r = crate::server::audit::AuditRecord::new(&caller(scope), &format!("mcp:{tool}"));
        // Node tools name no task.
        r.task_id = Some(call.task_id.to_string()).filter(|t| !t.is_empty());
        r.job_id = call.job_id.map(String::from);
        r.worker_id = worker_id.map(String::from);
        r.node_id = worker_id
            .zip(scope)
            .and_then(|(w, s)| self.visible_worker(s, w))
            .map(|w| w.node_id);
        r.org = scope.and_then(Scope::org);
        r.args_digest =
            crate::server::audit::digest(&serde_json::to_value(call.args).unwrap_or_default());
        self.fill_org(&mut r);
        r
    }

    /// Records a `sandbox.exec` as its command starts, where it starts
    /// (`mcp:sandbox.exec_start`): the call's own record is made when it
    /// ends, and a command goes on if the session's replica dies before.
    pub(super) fn audit_exec_start<A: Serialize>(
        &self,
        scope: &Scope,
        call: Call<'_, A>,
        node_id: &str,
        exec_id: &str,
    ) {
        let mut r = self.record(Some(scope), &call, "sandbox.exec_start", call.worker_id);
        r.node_id = Some(node_id.to_string());
        self.fill_org(&mut r);
        r.outcome = format!("started: exec {exec_id}");
        self.append(r);
    }

    /// Records a call whose arguments did not parse, so its tool never ran:
    /// who made it, for which task if that much was given, and why.
    pub(super) fn audit_unparsed(
        &self,
        parts: Option<&Parts>,
        tool: &str,
        args: &serde_json::Value,
        why: &str,
    ) {
        let scope = parts.and_then(scope_of);
        let mut r =
            crate::server::audit::AuditRecord::new(&caller(scope.as_ref()), &format!("mcp:{tool}"));
        r.task_id = args["task_id"].as_str().map(String::from);
        r.org = scope.as_ref().and_then(Scope::org);
        r.args_digest = crate::server::audit::digest(args);
        r.outcome = format!("invalid_request: {why}");
        info!(tool, error = %why, "mcp call refused: its arguments do not parse");
        self.append(r);
    }

    /// The admin's calls (and those of its MCP tokens) belong to the
    /// organization of the node they acted on, so its audit shows them.
    fn fill_org(&self, r: &mut crate::server::audit::AuditRecord) {
        if r.org.is_none() {
            r.org = r
                .node_id
                .as_deref()
                .and_then(|n| self.app.store.node_identity(n))
                .map(|i| i.org);
        }
    }

    fn append(&self, r: crate::server::audit::AuditRecord) {
        let (store, r) = (self.app.store.clone(), r.bounded());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.append_audit(&r) {
                tracing::error!(error = %e, "could not append to the audit trail");
            }
        });
    }
}
