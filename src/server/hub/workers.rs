//! Operations on workers: spawn, inspect, stop, remove, exec, logs, files.

use super::*;

impl Hub {
    /// A node named for new work must exist and not be draining.
    pub(super) fn check_not_draining(&self, node_id: &str) -> Result<(), ErrorBody> {
        if self.node_info(node_id)?.draining {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!("node {node_id} is draining"),
            ));
        }
        Ok(())
    }

    /// A node `scope` may name: another organization's is `not_found`,
    /// exactly as a node that does not exist.
    pub(super) fn check_node_in(&self, node_id: &str, scope: &OrgScope) -> Result<(), ErrorBody> {
        match self.node_org(node_id) {
            Some(org) if scope.admits(&org) => Ok(()),
            _ => Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no such node: {node_id}"),
            )),
        }
    }

    /// Spawns a worker on `req.node_id` or on the least-loaded node.
    pub async fn spawn(&self, req: SpawnRequest) -> Result<WorkerInfo, ErrorBody> {
        self.spawn_in(req, &OrgScope::All).await
    }

    /// Spawns a worker for a caller who sees `scope`: on `req.node_id` if
    /// it sees that node, else on the least-loaded node it sees (never on
    /// another organization's).
    pub async fn spawn_in(
        &self,
        req: SpawnRequest,
        scope: &OrgScope,
    ) -> Result<WorkerInfo, ErrorBody> {
        let node_id = match &req.node_id {
            Some(n) => {
                self.check_node_in(n, scope)?;
                self.check_not_draining(n)?;
                n.clone()
            }
            None => self.schedule(req.inference, scope)?,
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
        self.reg.lock().unwrap().workers.insert(info.clone());
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
                reg.workers.insert(w);
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
            Ok(v) => {
                let gone = self.reg.lock().unwrap().workers.remove(worker_id);
                // A job with inference: what its proxy carried, for the log.
                if let Some(u) = v.get("inference") {
                    let task_id = gone.as_ref().and_then(|w| w.task_id.clone());
                    let job_id = gone.as_ref().and_then(|w| w.job_id.clone());
                    tracing::info!(
                        %worker_id,
                        task_id = task_id.as_deref().unwrap_or(""),
                        job_id = job_id.as_deref().unwrap_or(""),
                        requests = u["requests"].as_u64().unwrap_or(0),
                        refused = u["refused"].as_u64().unwrap_or(0),
                        bytes_in = u["bytes_in"].as_u64().unwrap_or(0),
                        bytes_out = u["bytes_out"].as_u64().unwrap_or(0),
                        "inference usage of a removed job"
                    );
                }
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
    pub async fn exec(&self, worker_id: &str, opts: ExecOptions) -> Result<Duplex, ErrorBody> {
        if opts.cmd.is_empty() {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "exec needs a command",
            ));
        }
        self.open_duplex(worker_id, |channel, window| {
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
                label: opts.label,
            })
        })
        .await
    }

    /// Opens a TCP connection to `port` of the worker, dialled by its
    /// agent on the worker's own network: what is written to `input` reaches
    /// the worker's port, what it answers comes out of `output` (as `Data`),
    /// `input.close()` half-closes. Refused with `connection_refused` when
    /// nothing listens there, `host_unreachable` when the worker has no
    /// address the agent reaches.
    pub async fn tunnel(&self, worker_id: &str, port: u16) -> Result<Duplex, ErrorBody> {
        if port == 0 {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "port must be 1 to 65535",
            ));
        }
        self.open_duplex(worker_id, |channel, window| {
            Request::Tunnel(crate::protocol::Tunnel {
                channel,
                worker_id: worker_id.into(),
                port,
                window,
            })
        })
        .await
    }

    /// Opens a channel both ways on the worker's node: input to the agent,
    /// output from it (an exec, a tunnel).
    async fn open_duplex(
        &self,
        worker_id: &str,
        request: impl FnOnce(u32, u64) -> Request,
    ) -> Result<Duplex, ErrorBody> {
        let link = self.worker_link(worker_id)?;
        let (channel, writer, output) = link.open_with(DEFAULT_WINDOW, request).await?;
        Ok(Duplex {
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
                StreamEvent::Eof => {}
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
}

/// An archive being uploaded into a worker.
pub struct ArchiveUpload {
    pub(super) writer: ChannelWriter,
    pub(super) done: ChannelStream,
    pub(super) link: Arc<AgentLink>,
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
                Some(StreamEvent::Data(..) | StreamEvent::Gap(_) | StreamEvent::Eof) => {}
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
