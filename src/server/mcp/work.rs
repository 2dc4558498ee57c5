//! What each tool does at the replica that holds its sandbox or node.

use super::*;

impl Tools {
    /// `sandbox.create`: a sandbox without a node goes to the least-loaded
    /// online node the caller may use (at any replica), and the call is
    /// made at the replica that holds the node.
    pub(super) async fn create_routed(
        &self,
        scope: &Scope,
        parts: &Parts,
        a: &CreateArgs,
    ) -> Result<Sandbox, String> {
        Self::task_ok(scope, &a.task_id)?;
        let mut a = a.clone();
        let node = match a.node.clone() {
            Some(n) => n,
            None => {
                let nodes = self.nodes_everywhere(scope, parts).await;
                let least = nodes
                    .into_iter()
                    .filter(|n| n.status == NodeState::Online.as_str() && !n.draining)
                    .min_by_key(|n| n.workers)
                    .ok_or(NO_NODE)?;
                a.node = Some(least.node_id.clone());
                least.node_id
            }
        };
        self.routed(
            Some(parts),
            "sandbox.create",
            &a,
            Target::Node(&node),
            async || self.create_inner(scope, &a).await,
        )
        .await
    }

    pub(super) async fn create_inner(
        &self,
        scope: &Scope,
        a: &CreateArgs,
    ) -> Result<Sandbox, String> {
        Self::task_ok(scope, &a.task_id)?;
        // Placed by `create_routed`, which names the node.
        let node = a.node.clone().ok_or(NO_NODE)?;
        self.node_ok(scope, &node)?;
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

    pub(super) async fn exec_inner(
        &self,
        scope: &Scope,
        a: &ExecArgs,
        progress: Option<Progress>,
    ) -> Result<ExecResult, String> {
        let sandbox = self.sandbox_of(
            scope,
            &a.task_id,
            a.worker_id.as_deref(),
            a.job_id.as_deref(),
        )?;
        let (worker_id, node_id) = (sandbox.worker_id, sandbox.node_id);
        let cmd = match (&a.argv, &a.command) {
            (Some(argv), None) if !argv.is_empty() => argv.clone(),
            (None, Some(c)) => vec!["sh".into(), "-c".into(), c.clone()],
            _ => return Err("invalid_request: give argv or command (one of them)".into()),
        };
        let cap = a.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_CAP);
        if cap > MAX_OUTPUT_CAP {
            return Err(format!(
                "invalid_request: max_output_bytes is at most {MAX_OUTPUT_CAP} (16 MiB)"
            ));
        }
        // Each exec kept after its call holds up to twice its output cap in
        // this server: a sandbox has a bounded number of them.
        if self.app.mcp_execs.running_for(&worker_id) >= MAX_KEPT_EXECS {
            return Err(format!(
                "unavailable: {MAX_KEPT_EXECS} execs of sandbox {worker_id} run past their call; follow them to their end (sandbox.exec_follow) before starting more"
            ));
        }
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
        let call = Call {
            job_id: a.job_id.as_deref(),
            ..Call::new("sandbox.exec", a, &a.task_id).worker(&worker_id)
        };
        self.audit_exec_start(scope, call, &node_id, &label.exec_id);
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

    pub(super) async fn follow_inner(
        &self,
        scope: &Scope,
        a: &FollowArgs,
    ) -> Result<ExecResult, String> {
        Self::task_ok(scope, &a.task_id)?;
        let run = self
            .app
            .mcp_execs
            .get(&a.exec_id)
            .filter(|r| r.task_id == a.task_id)
            .ok_or_else(|| format!("not_found: no running exec {} of this task", a.exec_id))?;
        // The sandbox is still the task's (and within the token's nodes);
        // if not, the exec is no more this caller's than an unknown one.
        self.worker_of_task(scope, &a.task_id, &run.worker_id)
            .map_err(|_| format!("not_found: no running exec {} of this task", a.exec_id))?;
        let wait = Duration::from_secs(a.wait_s.unwrap_or(30).min(MAX_WAIT_S));
        let mut r = run.wait(wait).await?;
        if r.running {
            r.exec_id = Some(a.exec_id.clone());
        } else {
            self.app.mcp_execs.remove(&a.exec_id);
        }
        Ok(r)
    }

    pub(super) async fn destroy_inner(
        &self,
        scope: &Scope,
        a: &WorkerArgs,
    ) -> Result<Destroyed, String> {
        let w = self.worker_of_task(scope, &a.task_id, &a.worker_id)?;
        self.hub().remove(&a.worker_id, true).await.map_err(err)?;
        Ok(Destroyed {
            worker_id: a.worker_id.clone(),
            node_id: w.node_id,
            removed: true,
        })
    }

    pub(super) fn node_get_inner(
        &self,
        scope: &Scope,
        a: &NodeArgs,
    ) -> Result<NodeSummary, String> {
        self.node_ok(scope, &a.node_id)?;
        let n = self.hub().node_info(&a.node_id).map_err(err)?;
        Ok(self.summary(n))
    }

    pub(super) async fn logs_inner(&self, scope: &Scope, a: &LogsArgs) -> Result<Logs, String> {
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

    pub(super) async fn put_inner(
        &self,
        scope: &Scope,
        a: &PutFileArgs,
    ) -> Result<PutFileResult, String> {
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

    pub(super) async fn get_inner(
        &self,
        scope: &Scope,
        a: &GetFileArgs,
    ) -> Result<FileContent, String> {
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
