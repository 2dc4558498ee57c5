//! Execs whose operator connection went away: kept for a re-attach within a
//! grace, handed from an old connection to a new one, adopted from an agent
//! after a server restart.

use super::attachments::{Attachments, Missing, OfWorker};
use super::*;

/// How long a re-attaching client waits for an older connection of its exec
/// to let go of it.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// What takes an adopted exec with a label: the hub, the exec, the label.
pub(super) type Adopter = Arc<dyn Fn(&Hub, DetachedExec, String) + Send + Sync>;

/// A client connection's hold on an exec ([`Hub::hold_exec`]).
pub struct HeldExec {
    pub(super) attach: Arc<Mutex<Attachments<DetachedExec>>>,
    pub(super) key: (String, u32),
    pub(super) generation: u64,
    pub(super) token: CancellationToken,
    /// Told when the hold ends, for a takeover waiting on it.
    pub(super) changed: Arc<tokio::sync::Notify>,
}

impl HeldExec {
    /// Cancelled when a newer connection takes the exec over.
    pub fn taken_over(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

impl Drop for HeldExec {
    fn drop(&mut self) {
        self.attach
            .lock()
            .unwrap()
            .release(&self.key, self.generation);
        self.changed.notify_waiters();
    }
}

/// An exec whose client went away, kept for the attach grace period so the
/// client can re-attach: its channel and what the client may still need.
pub struct DetachedExec {
    pub worker_id: String,
    pub session: Duplex,
    pub state: ClientState,
}

/// What an exec or tunnel keeps for its client across connections.
#[derive(Default)]
pub struct ClientState {
    /// What was sent but not acknowledged.
    pub relay: crate::server::relay::Relay,
    /// The exec's end (exit code, error), when it was sent to a client that
    /// then did not close its connection: it may not have arrived.
    pub end: Option<(Option<i64>, Option<ErrorBody>)>,
    /// A tunnel's worker side half-closed (said again after a re-attach).
    pub eof: bool,
    /// A tunnel's entry in the server's tunnel list, kept while detached.
    pub tunnel: Option<crate::server::tunnels::Connection>,
    /// The audit record its end completes (an API exec's: the caller, the
    /// worker, the arguments' digest) and when it started.
    pub audit: Option<(crate::server::audit::AuditRecord, std::time::Instant)>,
    /// Who started it (the API caller's name): only they (or the server's
    /// admin) re-attach to it. `None` when not known (adopted after a
    /// restart): any caller who sees the worker may.
    pub owner: Option<String>,
}

impl DetachedExec {
    /// A session no client has had yet.
    pub fn new(worker_id: &str, session: Duplex) -> DetachedExec {
        DetachedExec {
            worker_id: worker_id.to_string(),
            session,
            state: ClientState::default(),
        }
    }
}

impl OfWorker for DetachedExec {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }

    fn owner(&self) -> Option<&str> {
        self.state.owner.as_deref()
    }
}

/// Whether `who` (`None`: anyone) may take an exec `owner` started.
fn may_take(owner: Option<&str>, who: Option<&str>) -> bool {
    match (owner, who) {
        (Some(o), Some(w)) => o == w,
        _ => true,
    }
}

impl Hub {
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
        let generation = self.attach.lock().unwrap().detach(key.clone(), d);
        self.changed.notify_waiters();
        let attach = self.attach.clone();
        self.spawn_task(async move {
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
            let expired = attach.lock().unwrap().expire(&key, generation);
            if let Some(d) = &expired {
                tracing::info!(node_id = %key.0, channel = key.1, worker_id = %d.worker_id,
                    "nobody re-attached to the exec within the grace: cancelled");
            }
            drop(expired); // outside the lock: dropping cancels on the agent
        });
    }

    /// Whether an exec of `worker_id` on `channel` can be re-attached by
    /// `who` (a caller's name; `None`: anyone's exec): it waits detached,
    /// or a client connection holds it (which a re-attach takes over), and
    /// `who` started it or its starter is not known. Another's exec is
    /// `not_found`, as one that is not there.
    pub fn can_attach(
        &self,
        worker_id: &str,
        channel: u32,
        who: Option<&str>,
    ) -> Result<(), ErrorBody> {
        let w = self.worker(worker_id)?;
        let key = (w.node_id, channel);
        let table = self.attach.lock().unwrap();
        if table.attachable_by(&key, worker_id, |o| may_take(o, who)) {
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
    pub fn hold_exec(
        &self,
        worker_id: &str,
        node_id: &str,
        channel: u32,
        owner: Option<&str>,
    ) -> HeldExec {
        let token = CancellationToken::new();
        let key = (node_id.to_string(), channel);
        let generation =
            self.attach
                .lock()
                .unwrap()
                .hold(key.clone(), worker_id, owner, token.clone());
        HeldExec {
            attach: self.attach.clone(),
            key,
            generation,
            token,
            changed: self.changed.clone(),
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
        who: Option<&str>,
    ) -> Result<DetachedExec, ErrorBody> {
        // Judged before anything is taken over: another's live connection
        // is not even asked to let go.
        self.can_attach(worker_id, channel, who)?;
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        let key = (self.worker(worker_id)?.node_id, channel);
        loop {
            // Created before the attempt: a hand-back in between wakes it.
            let handed_back = self.changed.notified();
            let err = match self.attach_exec(worker_id, channel) {
                Ok(d) => return Ok(d),
                Err(e) => e,
            };
            let holder = self.attach.lock().unwrap().holder(&key, worker_id);
            match holder {
                Some(t) if tokio::time::Instant::now() < deadline => {
                    t.cancel();
                    let _ = tokio::time::timeout_at(deadline, handed_back).await;
                }
                _ => return Err(err),
            }
        }
    }

    /// Takes a detached exec of `worker_id` back for a re-attaching client.
    pub fn attach_exec(&self, worker_id: &str, channel: u32) -> Result<DetachedExec, ErrorBody> {
        let w = self.worker(worker_id)?;
        let taken = self
            .attach
            .lock()
            .unwrap()
            .take(&(w.node_id.clone(), channel), worker_id);
        match taken {
            Ok(d) => {
                tracing::info!(node_id = %w.node_id, channel, worker_id, "client re-attached to the exec");
                Ok(d)
            }
            Err(Missing::OtherWorker) => Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("exec channel {channel} is not an exec of {worker_id}"),
            )),
            Err(Missing::Nothing) => Err(ErrorBody::new(
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
            eof_events: false,
        };
        output.set_manual_ack();
        let session = Duplex {
            input: ChannelSink {
                channel: open.channel,
                writer: h.writer,
                link: link.clone(),
            },
            output,
        };
        let d = DetachedExec::new(&open.worker_id, session);
        let adopter = self.adopter.lock().unwrap().clone();
        match (&open.label, adopter) {
            // The server gave it a label: what made it takes it back.
            (Some(label), Some(adopt)) => adopt(self, d, label.clone()),
            _ => self.detach_exec(d, grace),
        }
    }

    /// Execs the agent still runs after a server restart whose `exec`
    /// request carried a label ([`ExecOptions::label`]) go to `adopt`
    /// instead of waiting for an operator to re-attach.
    pub fn on_labelled_exec(
        &self,
        adopt: impl Fn(&Hub, DetachedExec, String) + Send + Sync + 'static,
    ) {
        *self.adopter.lock().unwrap() = Some(Arc::new(adopt));
    }
}
