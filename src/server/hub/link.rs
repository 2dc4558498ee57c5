//! One node's link: its connection across reconnects, requests awaiting a
//! reply, and the channels opened to it.

use super::*;

/// How long the hub waits for an agent's reply to a request.
pub(super) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Hands out heartbeat sweep slots round-robin.
pub(super) static NEXT_PULSE_SLOT: AtomicU32 = AtomicU32::new(0);

/// One node's link to the hub, across its connections: the current
/// connection (if any), requests awaiting a reply and open channels. Both
/// survive a reconnect: unanswered requests are sent again (the agent answers
/// a repeated id from its cache) and channels resume where they stopped.
pub struct AgentLink {
    pub node_id: String,
    pub(super) link: Arc<Link>,
    pub(super) pending: Mutex<HashMap<String, Pending>>,
    pub(crate) channels: Channels,
    /// Channels whose opening request has no reply yet: a resume must not
    /// end them just because the agent does not have them yet.
    pub(super) opening: Mutex<HashSet<u32>>,
    pub(super) next_channel: AtomicU32,
    /// Cancelled when the current connection must end (replaced, or the
    /// server shuts down); renewed for each connection.
    pub(super) conn: Mutex<CancellationToken>,
    /// Counts connections, so a grace timer knows whether the node came back.
    pub(super) generation: AtomicU64,
    /// An operator removed the node: its connection ends and stays ended.
    pub(super) revoked: std::sync::atomic::AtomicBool,
    pub(super) timeout: Duration,
    /// Milliseconds from `born` to the last traffic from the agent: noted
    /// on every message without taking the registry lock every node shares.
    pub(super) last_seen_ms: AtomicU64,
    pub(super) born: tokio::time::Instant,
    /// Why the current connection is being ended here, if a reason was
    /// given (set under `conn`'s lock, with the cancellation).
    pub(super) ending: Mutex<Option<Close>>,
    /// Which slice of the heartbeat sweep this node is in.
    pub(crate) pulse_slot: u32,
}

pub(super) struct Pending {
    /// The encoded request, sent again after a reconnect.
    pub(super) text: String,
    pub(super) tx: oneshot::Sender<Result<Value, ErrorBody>>,
}

impl AgentLink {
    pub(crate) fn new(node_id: String) -> Arc<Self> {
        let link = Link::new();
        Arc::new(AgentLink {
            node_id,
            channels: Channels::new(link.clone()),
            link,
            pending: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashSet::new()),
            next_channel: AtomicU32::new(1),
            conn: Mutex::new(CancellationToken::new()),
            generation: AtomicU64::new(0),
            revoked: Default::default(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            last_seen_ms: AtomicU64::new(0),
            born: tokio::time::Instant::now(),
            ending: Mutex::new(None),
            pulse_slot: NEXT_PULSE_SLOT.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Ends the current connection, which closes with `close`.
    pub(crate) fn end_connection(&self, close: Close) {
        let conn = self.conn.lock().unwrap();
        *self.ending.lock().unwrap() = Some(close);
        conn.cancel();
    }

    /// Why the current connection was ended here: the given reason, the
    /// node's removal, or a newer connection of the node.
    pub(crate) fn end_reason(&self) -> Close {
        if self.is_revoked() {
            return Close::new(Close::POLICY, "node removed by an operator");
        }
        self.ending.lock().unwrap().clone().unwrap_or_else(|| {
            Close::new(Close::NORMAL, "replaced by a newer connection of this node")
        })
    }

    /// Traffic from the agent just arrived.
    pub(crate) fn seen(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the agent was last heard (since the link was made, if
    /// never).
    pub(crate) fn silence(&self) -> Duration {
        self.born.elapsed().saturating_sub(Duration::from_millis(
            self.last_seen_ms.load(Ordering::Relaxed),
        ))
    }

    /// Wall-clock time of the last traffic from the agent.
    pub(super) fn last_seen(&self) -> SystemTime {
        SystemTime::now() - self.silence()
    }

    /// The current connection, for writing to it.
    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Queues a message for the agent; false if it is not connected.
    pub(crate) fn send(&self, m: Message) -> bool {
        self.link.send_msg(&m)
    }

    pub(super) fn unavailable(&self) -> ErrorBody {
        ErrorBody::new(
            ErrorCode::Unavailable,
            format!("node {} disconnected", self.node_id),
        )
    }

    /// Starts a connection: ends the previous one, resumes channels on `out`
    /// from the agent's `states`, and sends unanswered requests again.
    /// Returns the token that ends this connection and its generation.
    pub(crate) fn connect(&self, states: &[ChannelState], out: OutTx) -> (CancellationToken, u64) {
        let token = CancellationToken::new();
        {
            let mut conn = self.conn.lock().unwrap();
            *self.ending.lock().unwrap() = None;
            std::mem::replace(&mut *conn, token.clone()).cancel();
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let opening = self.opening.lock().unwrap().clone();
        let resumed = self
            .channels
            .resume(states, |id| opening.contains(&id), out);
        if !resumed.lost.is_empty() {
            tracing::warn!(node_id = %self.node_id, lost = ?resumed.lost, "agent lost channels (restarted?)");
        }
        for p in self.pending.lock().unwrap().values() {
            self.link.send(Outbound::Text(p.text.clone()));
        }
        (token, generation)
    }

    /// Ends the current connection for good (the node was removed).
    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
        self.conn.lock().unwrap().cancel();
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// The connection of `generation` ended; channels and requests wait.
    pub(crate) fn disconnect(&self, generation: u64) {
        if self.generation.load(Ordering::SeqCst) == generation {
            self.link.set(None);
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.link.is_connected()
    }

    /// The node did not come back in time: fail everything in flight.
    pub(crate) fn expire(&self, reason: &str) {
        let err = ErrorBody::new(
            ErrorCode::Unavailable,
            format!("node {} is offline: {reason}", self.node_id),
        );
        for (_, p) in self.pending.lock().unwrap().drain() {
            let _ = p.tx.send(Err(err.clone()));
        }
        self.channels.close_all(err);
    }

    /// Sends a request and waits for its reply, across reconnects.
    pub async fn request(&self, request: Request) -> Result<Value, ErrorBody> {
        let id = ulid::Ulid::new().to_string();
        let (tx, rx) = oneshot::channel();
        let kind = request.kind();
        let text = Message::Request {
            id: id.clone(),
            request,
        }
        .encode();
        self.pending.lock().unwrap().insert(
            id.clone(),
            Pending {
                text: text.clone(),
                tx,
            },
        );
        self.link.send(Outbound::Text(text));
        // A spawn may pull an image (up to 300 s on the agent); a
        // deployment pulls several and waits for health checks.
        let limit = match kind {
            "spawn" => self.timeout + Duration::from_secs(300),
            "deploy_apply" => self.timeout + Duration::from_secs(900),
            _ => self.timeout,
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

    pub(super) async fn request_as<T: serde::de::DeserializeOwned>(
        &self,
        request: Request,
    ) -> Result<T, ErrorBody> {
        let v = self.request(request).await?;
        serde_json::from_value(v)
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("bad reply from agent: {e}")))
    }

    pub(crate) fn on_reply(&self, id: &str, r: Result<Value, ErrorBody>) {
        if let Some(p) = self.pending.lock().unwrap().remove(id) {
            let _ = p.tx.send(r);
        }
    }

    pub(super) fn open_channel(
        self: &Arc<Self>,
        window: u64,
    ) -> Result<(u32, ChannelWriter, ChannelStream), ErrorBody> {
        // Skip ids still in use (after a wrap, or adopted from the agent);
        // any other refusal (a bad window) is final.
        const TRIES: usize = 1024;
        for _ in 0..TRIES {
            let id = self.next_channel.fetch_add(1, Ordering::Relaxed).max(1);
            match self.channels.open(id, window) {
                Ok(h) => {
                    let stream = ChannelStream {
                        channel: id,
                        reader: h.reader,
                        link: self.clone(),
                        done: false,
                        eof_events: false,
                    };
                    return Ok((id, h.writer, stream));
                }
                Err(e) if e.code == ErrorCode::Conflict => {}
                Err(e) => return Err(e),
            }
        }
        Err(ErrorBody::new(
            ErrorCode::Unavailable,
            format!("no free channel id in {TRIES} tries"),
        ))
    }

    /// Sends a request that opens a channel with `window` bytes of credit
    /// each way (both ends must start from the same window: `make` gets the
    /// channel id and the window to put in the request); on failure the
    /// channel is closed.
    pub(super) async fn open_with(
        self: &Arc<Self>,
        window: u64,
        make: impl FnOnce(u32, u64) -> Request,
    ) -> Result<(u32, ChannelWriter, ChannelStream), ErrorBody> {
        let (id, writer, stream) = self.open_channel(window)?;
        self.opening.lock().unwrap().insert(id);
        let r = self.request(make(id, window)).await;
        self.opening.lock().unwrap().remove(&id);
        match r {
            Ok(_) => Ok((id, writer, stream)),
            // The agent answered with an error: it has no such channel.
            Err(e) if e.code != ErrorCode::Timeout && e.code != ErrorCode::Unavailable => {
                let mut stream = stream;
                stream.done = true;
                self.channels.remove(id);
                Err(e)
            }
            // Timed out or cut off: dropping `stream` tells the agent to
            // cancel, in case the request still runs there.
            Err(e) => Err(e),
        }
    }
}
