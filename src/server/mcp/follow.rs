//! A command that outlives its `sandbox.exec` call: its output is pumped
//! and kept until `sandbox.exec_follow` reads it, and a restarted server
//! takes it back from its agent.

use super::*;

/// How long `sandbox.exec` waits for its command by default, and the most
/// any call waits.
pub(super) const DEFAULT_EXEC_WAIT_S: u64 = 300;
pub(super) const MAX_WAIT_S: u64 = 3600;
/// Execs of one sandbox that may run on after their call at once.
pub(super) const MAX_KEPT_EXECS: usize = 16;
/// A followed exec that has ended is forgotten this long after, if nobody
/// reads its end.
pub(super) const ENDED_KEPT: Duration = Duration::from_secs(600);

/// MCP execs that outlived their call, by exec id.
#[derive(Default, Clone)]
pub struct Running(Arc<Mutex<HashMap<String, Arc<Followed>>>>);

impl Running {
    /// Takes back an exec a restarted server adopted from its agent, by
    /// the label this server's predecessor gave it: it is followed on
    /// under the same exec id, from what no answer had taken yet.
    pub fn adopt(&self, hub: &Hub, d: crate::server::hub::DetachedExec, label: &str) {
        let l = match serde_json::from_str::<ExecLabel>(label) {
            Ok(l) if l.worker_id == d.worker_id => l,
            // Not ours, or about another worker: dropping it cancels it.
            _ => {
                tracing::warn!(worker_id = %d.worker_id, %label, "an adopted exec's label is not an MCP exec's: cancelled");
                return;
            }
        };
        // A label names an exec id: the agent gives it, so it never takes
        // the place of another exec that still runs (one that ended, say
        // when the node stayed away past the resume grace, is replaced).
        if self.runs(&l.exec_id) {
            tracing::warn!(exec_id = %l.exec_id, worker_id = %l.worker_id,
                "an adopted MCP exec's id belongs to a running exec: cancelled");
            return;
        }
        info!(exec_id = %l.exec_id, task_id = %l.task_id, worker_id = %l.worker_id,
            "adopted an MCP exec after a restart: it can be followed on");
        let run = Arc::new(Followed::new(l.clone(), Instant::now()));
        run.state.lock().unwrap().returned = true;
        run.pump(hub, d.session.output, None);
        self.insert(l.exec_id, run);
    }

    pub(super) fn insert(&self, id: String, run: Arc<Followed>) {
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

    pub(super) fn get(&self, id: &str) -> Option<Arc<Followed>> {
        self.0.lock().unwrap().get(id).cloned()
    }

    /// How many execs of `worker_id` kept after their call still run.
    pub(super) fn running_for(&self, worker_id: &str) -> usize {
        let m = self.0.lock().unwrap();
        m.values()
            .filter(|r| r.worker_id == worker_id && r.state.lock().unwrap().ended_at.is_none())
            .count()
    }

    /// Whether exec `id` is followed here and has not ended.
    fn runs(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|r| r.state.lock().unwrap().ended_at.is_none())
    }

    /// Whether exec `id` is followed here.
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.0.lock().unwrap().contains_key(id)
    }

    pub(super) fn remove(&self, id: &str) {
        self.0.lock().unwrap().remove(id);
    }
}

/// What an MCP exec's `exec` request carries as its label (kept by the
/// agent with the channel, listed in `hello.open`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct ExecLabel {
    #[serde(rename = "mcp_exec")]
    pub(super) exec_id: String,
    pub(super) task_id: String,
    pub(super) worker_id: String,
    pub(super) cap: usize,
}

impl ExecLabel {
    pub(super) fn encode(&self) -> String {
        serde_json::to_string(self).expect("a label serializes")
    }
}

/// Output read beyond the last answer that is acknowledged anyway, so the
/// command is never held up by a follower that does not come (half the
/// channel's window). Up to this much read since the last answer is still
/// the agent's to send again if the server restarts.
pub(super) const ACK_ANYWAY: u64 = crate::protocol::DEFAULT_WINDOW / 2;

/// One exec's output as its pump keeps it until it is read.
pub struct Followed {
    pub(super) task_id: String,
    pub(super) worker_id: String,
    cap: usize,
    t0: Instant,
    state: Mutex<FollowState>,
    changed: tokio::sync::Notify,
    /// Told when an answer took the output: the pump acknowledges it.
    answered: tokio::sync::Notify,
}

#[derive(Default)]
pub(super) struct FollowState {
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
    pub(super) fn new(label: ExecLabel, t0: Instant) -> Followed {
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
    pub(super) fn pump(
        self: &Arc<Self>,
        hub: &Hub,
        mut output: crate::server::hub::ChannelStream,
        progress: Option<Progress>,
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
                        if let Some(progress) = &progress
                            && !run.state.lock().unwrap().returned
                        {
                            seen += b.len();
                            let stream = if k == StreamKind::Stderr {
                                "stderr"
                            } else {
                                "stdout"
                            };
                            let message = format!("{stream}: {}", String::from_utf8_lossy(&b));
                            progress.send(seen as f64, message).await;
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
    pub(super) fn keep(&self, k: StreamKind, b: &[u8], read_to: u64) {
        let mut st = self.state.lock().unwrap();
        st.read_to = read_to;
        let buf = if k == StreamKind::Stderr {
            &mut st.err
        } else {
            &mut st.out
        };
        // An adopted exec's cap comes from the agent's label: bounded too.
        let cap = self.cap.min(super::MAX_OUTPUT_CAP);
        let room = (cap + 4).saturating_sub(buf.len());
        buf.extend_from_slice(&b[..b.len().min(room)]);
        if b.len() > room {
            st.truncated = true;
        }
    }

    pub(super) fn end(&self, exit_code: Option<i64>, error: Option<String>) {
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
    pub(super) async fn wait(&self, wait: Duration) -> Result<ExecResult, String> {
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

/// Where `sandbox.exec` sends output as it comes, when the client asked.
#[derive(Clone)]
pub enum Progress {
    /// The session's client, by the call's progress token.
    Client(rmcp::model::ProgressToken, rmcp::Peer<rmcp::RoleServer>),
    /// The replica whose session passed the call on: lines of the answer
    /// to its `/internal/v1/mcp/call`.
    Relay(tokio::sync::mpsc::Sender<serde_json::Value>),
}

impl Progress {
    /// Sends one notification. A client gone away is no reason to stop the
    /// command: a failed send is dropped.
    pub(super) async fn send(&self, seen: f64, message: String) {
        match self {
            Progress::Client(token, peer) => {
                let note = rmcp::model::ProgressNotificationParam::new(token.clone(), seen)
                    .with_message(message);
                let _ = peer.notify_progress(note).await;
            }
            Progress::Relay(tx) => {
                let line = serde_json::json!({ "progress": seen, "message": message });
                let _ = tx.send(line).await;
            }
        }
    }
}

/// `s` cut to at most `cap` bytes on a UTF-8 boundary (invalid bytes
/// replaced); whether anything was cut.
pub(super) fn capped(bytes: &[u8], cap: usize) -> (String, bool) {
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
