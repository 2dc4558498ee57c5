//! The reference control plane: registration, the agent WebSocket endpoint,
//! the node and worker registry ([`Hub`]) and the operator HTTP API.

mod agent_ws;
mod api;
pub mod audit;
pub mod auth;
pub mod compose;
mod conn;
mod heartbeat;
pub mod hub;
pub mod mcp;
pub mod orgs;
pub mod preview;
pub mod relay;
pub mod replicas;
pub mod store;
pub mod tunnels;

pub use conn::raise_open_file_limit;

pub use hub::{
    ChannelStream, DeploymentNames, DetachedExec, Duplex, ExecOptions, Hub, LogOptions, NodeInfo,
    OrgScope, StreamEvent, Unrecorded,
};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// Everything the server needs, already validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Registration pre-shared key.
    pub psk: String,
    /// Holds the operator token and the JWT signing key.
    pub state_dir: PathBuf,
    /// Lifetime of node JWTs.
    pub jwt_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// How long a disconnected node's channels and requests wait for it to
    /// reconnect and resume before they fail with `unavailable`.
    pub resume_grace: Duration,
    /// How long an exec whose client went away waits for it to re-attach
    /// before it is cancelled (and its process killed).
    pub attach_grace: Duration,
    /// Input an exec client may send beyond what the agent has acknowledged
    /// (`stdin_window` in the exec WebSocket's `started`): the server reads
    /// on while it holds less. Larger suits links with a long round trip.
    pub stdin_window: usize,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How long a client has to send a request head (request line and
    /// headers), counted from when the connection starts waiting for it:
    /// also how long a keep-alive connection may sit idle between requests.
    /// The connection is closed when it runs out.
    pub header_read_timeout: Duration,
    /// Most connections that have not yet made an authenticated request (in
    /// TLS handshake, sending their first request, or only unauthenticated
    /// ones so far). Beyond it the oldest such connection is closed.
    pub max_pending_connections: usize,
    /// Most connections in all. Lowered at start to fit the open-file limit;
    /// beyond it the oldest unauthenticated connection is closed, or, when
    /// every connection has authenticated, the new one is refused.
    pub max_connections: usize,
    /// Serve host-based previews, `{port}-{worker}.{domain}`; the domain may
    /// carry a `:port` for the URLs the server prints.
    pub preview_domain: Option<String>,
    /// `Host` names (or `host:port`) the MCP endpoint answers besides
    /// loopback ones (a guard against DNS rebinding).
    pub mcp_allowed_hosts: Vec<String>,
    /// Keep the server's state in this PostgreSQL database
    /// (`postgres://user:password@host/db`) instead of `state.db`, so
    /// replicas can share it.
    pub database: Option<String>,
    /// A PEM bundle trusted for the database's TLS certificate besides the
    /// web's roots (TLS when the URL says `sslmode=require`).
    pub database_ca: Option<PathBuf>,
    /// With a database: the URL other replicas reach this one at (default
    /// `http://` and the listen address, with 127.0.0.1 for an
    /// unspecified address).
    pub advertise_url: Option<String>,
    /// With a database: a PEM bundle trusted, besides the web's roots, for
    /// the certificates of replicas whose URL is `https://` (requests one
    /// replica passes to another go over TLS then).
    pub replica_ca: Option<PathBuf>,
    /// The configuration a node gets when it first registers (none wanted
    /// for it yet): kept as its desired configuration and pushed after its
    /// `welcome`, so a fleet comes up configured (an inference backend, say)
    /// with no push per node.
    pub node_config: Option<crate::protocol::NodeConfig>,
}

/// Default of [`ServerConfig::stdin_window`].
pub const DEFAULT_STDIN_WINDOW: usize = 2 * 1024 * 1024;

/// Default of [`ServerConfig::header_read_timeout`]. Clients send a request
/// head in one write, so it arrives within a round trip; 10 s allows for
/// retransmissions on a poor link, and is long enough that a client's
/// keep-alive connection survives the pause between two commands.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of [`ServerConfig::max_pending_connections`]. A real connection is
/// pending for a round trip or two, so 512 lets hundreds of agents reconnect
/// at once (after a restart), while idle sockets held by an attacker cost
/// at most 512 descriptors and their read buffers (8 KiB each).
pub const DEFAULT_MAX_PENDING_CONNECTIONS: usize = 512;

/// Default of [`ServerConfig::max_connections`]: thousands of nodes, each
/// one connection, with room for operators. Each costs a descriptor and
/// tens of KiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

impl ServerConfig {
    pub fn new(listen: SocketAddr, psk: String, state_dir: PathBuf) -> Self {
        ServerConfig {
            listen,
            psk,
            state_dir,
            jwt_ttl: Duration::from_secs(3600),
            // Two pings in a timeout, half-open links found within 30 s;
            // each idle agent costs the server a ping and a pong per
            // interval (docs/performance.md, idle CPU).
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(20),
            resume_grace: hub::DEFAULT_RESUME_GRACE,
            attach_grace: Duration::from_secs(10),
            stdin_window: DEFAULT_STDIN_WINDOW,
            tls: None,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_pending_connections: DEFAULT_MAX_PENDING_CONNECTIONS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            preview_domain: None,
            mcp_allowed_hosts: Vec::new(),
            database: None,
            database_ca: None,
            advertise_url: None,
            replica_ca: None,
            node_config: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Database(String),
}

/// Shared by every handler.
pub(crate) struct AppState {
    pub hub: Hub,
    pub cfg: ServerConfig,
    pub signer: auth::Signer,
    /// Durable state: node identities.
    pub store: Arc<dyn store::Store>,
    /// Proofs accepted per node within the skew window (`protocol::proof`),
    /// by their time and what they signed: a proof is good once, so a
    /// captured request cannot be replayed.
    #[allow(clippy::type_complexity)]
    pub proofs_seen: std::sync::Mutex<std::collections::HashMap<String, Vec<(u64, Vec<u8>)>>>,
    pub admin_token: String,
    /// Signs preview URLs.
    pub preview_key: preview::PreviewKey,
    /// Open tunnels, for operators to list and close.
    pub tunnels: tunnels::Tunnels,
    /// MCP execs that outlived their call (`sandbox.exec_follow`).
    pub mcp_execs: mcp::Running,
    /// The MCP sessions this replica serves (a request of another
    /// replica's session is passed to it).
    pub mcp_sessions:
        Arc<rmcp::transport::streamable_http_server::session::local::LocalSessionManager>,
    /// Who opened each of those sessions (the SHA-256 of the token): only
    /// that token is let into it.
    pub mcp_owners: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Cancelled on shutdown: agent sessions close with 1001.
    pub shutdown: CancellationToken,
    /// This replica, when the state is in a database other replicas share.
    pub replica: Option<replicas::Replica>,
    /// Reads of the store itself for operator tokens the copy lacks, in the
    /// current second: (second, count).
    token_reads: std::sync::Mutex<(u64, u32)>,
}

/// Most reads of the store itself, a second, for operator tokens a
/// replica's copy lacks: a token made a moment ago at another replica
/// works at once, and a flood of made-up tokens costs the database little.
const TOKEN_READS_PER_SECOND: u32 = 20;

impl AppState {
    /// The operator a bearer token names: the server's admin token, or an
    /// organization's token that is neither revoked nor expired.
    pub(crate) fn caller(&self, token: &str) -> Result<orgs::Caller, crate::protocol::ErrorBody> {
        use crate::protocol::{ErrorBody, ErrorCode};
        if auth::secret_eq(token, &self.admin_token) {
            return Ok(orgs::Caller::admin());
        }
        let invalid = || ErrorBody::new(ErrorCode::Unauthorized, "invalid operator token");
        let t = self
            .store
            .operator_token_by_hash(&orgs::secret_hash(token))
            .ok_or_else(invalid)?;
        if t.expired(preview::now_secs()) {
            return Err(ErrorBody::new(
                ErrorCode::Unauthorized,
                format!("operator token {} has expired", t.id),
            ));
        }
        Ok(orgs::Caller {
            scope: hub::OrgScope::Org(t.org),
            name: format!("token:{}", t.id),
        })
    }

    /// [`AppState::caller`], reading the store itself when its copy does
    /// not know an organization's token (one made a moment ago at another
    /// replica, whose notification has not arrived yet).
    pub(crate) async fn caller_fresh(
        self: &Arc<Self>,
        token: &str,
    ) -> Result<orgs::Caller, crate::protocol::ErrorBody> {
        let first = self.caller(token);
        if first.is_ok() || self.replica.is_none() || !token.starts_with(orgs::TOKEN_PREFIX) {
            return first;
        }
        let hash = orgs::secret_hash(token);
        if self.store.operator_token_by_hash(&hash).is_some() || !self.may_read_token() {
            return first; // known (expired), or too many reads this second
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.refresh_operator_token(&hash)).await;
        self.caller(token)
    }

    fn may_read_token(&self) -> bool {
        let now = preview::now_secs();
        let mut r = self.token_reads.lock().unwrap();
        if r.0 != now {
            *r = (now, 0);
        }
        r.1 += 1;
        r.1 <= TOKEN_READS_PER_SECOND
    }

    /// Checks a node's proof against `public_key` (the key bound to the
    /// node, or offered by a first registration) and refuses a proof seen
    /// before (a replayed request): [`AppState::verify_proof`], then
    /// [`AppState::record_proof`].
    pub(crate) async fn check_proof(
        &self,
        node_id: &str,
        public_key: &str,
        purpose: crate::protocol::ProofPurpose,
        proof: Option<&str>,
    ) -> Result<(), crate::protocol::ErrorBody> {
        let fresh = self.verify_proof(node_id, public_key, purpose, proof)?;
        self.record_proof(node_id, fresh).await
    }

    /// The part of [`AppState::check_proof`] that needs nothing but this
    /// replica: the signature, the time stamp, and this replica's memory of
    /// proofs. Only proofs that verify are remembered, so nobody without
    /// the key can make the node's own proofs look used. What it returns is
    /// for [`AppState::record_proof`].
    pub(crate) fn verify_proof(
        &self,
        node_id: &str,
        public_key: &str,
        purpose: crate::protocol::ProofPurpose,
        proof: Option<&str>,
    ) -> Result<Option<FreshProof>, crate::protocol::ErrorBody> {
        use crate::protocol::{ErrorBody, ErrorCode, MAX_PROOF_SKEW_MS};
        let proof = proof.ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::Unauthorized,
                format!("missing node proof ({})", crate::protocol::PROOF_HEADER),
            )
        })?;
        let now = crate::protocol::now_millis();
        let ms = crate::protocol::verify_proof(public_key, purpose, node_id, proof, now)
            .map_err(|e| ErrorBody::new(ErrorCode::Unauthorized, e.to_string()))?;
        // A proof is used once: what it signed (purpose, node, time), not
        // how it is written, since the same signature can be written in
        // more than one way (hex in either case) and a node signs one
        // proof per purpose and millisecond.
        let signed = crate::protocol::proof_message(purpose, node_id, ms);
        {
            let mut seen = self.proofs_seen.lock().unwrap();
            let list = seen.entry(node_id.to_string()).or_default();
            // A proof older than the skew allowance is refused anyway.
            list.retain(|(t, _)| t.abs_diff(now) <= 2 * MAX_PROOF_SKEW_MS);
            if list.iter().any(|(_, p)| *p == signed) {
                return Err(replayed());
            }
            list.push((ms, signed.clone()));
        }
        // Replicas: the proof must be new to every one of them, not only
        // to this one (a captured request sent to each in turn).
        Ok(self.replica.is_some().then(|| {
            use sha2::Digest;
            FreshProof {
                digest: hex::encode(sha2::Sha256::digest(&signed)),
                until_ms: ms.max(now) + 2 * MAX_PROOF_SKEW_MS,
            }
        }))
    }

    /// Records a verified proof with the other replicas; refused if one of
    /// them saw it first.
    pub(crate) async fn record_proof(
        &self,
        node_id: &str,
        fresh: Option<FreshProof>,
    ) -> Result<(), crate::protocol::ErrorBody> {
        let Some(fresh) = fresh else {
            return Ok(());
        };
        let recorded = tokio::time::timeout(
            PROOF_RECORD_TIMEOUT,
            self.store.use_proof(&fresh.digest, fresh.until_ms),
        )
        .await;
        match recorded {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(replayed()),
            // The database is away or stuck: this replica's own memory of
            // proofs still holds, and nodes can still connect.
            Ok(Err(e)) => {
                tracing::warn!(%node_id, error = %e, "could not record a node proof with the other replicas");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(%node_id, "the database did not record a node proof within {PROOF_RECORD_TIMEOUT:?}");
                Ok(())
            }
        }
    }
}

/// How long a connection waits for its proof to be recorded with the other
/// replicas before it goes on without (the agent waits 15 s for `welcome`).
const PROOF_RECORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A node proof this replica verified, to be recorded with the others.
pub(crate) struct FreshProof {
    digest: String,
    until_ms: u64,
}

fn replayed() -> crate::protocol::ErrorBody {
    crate::protocol::ErrorBody::new(
        crate::protocol::ErrorCode::Unauthorized,
        "the node proof was already used (replayed request?)",
    )
}

/// A bound server, not yet serving.
pub struct Server {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The configured limits, the total fitted to the open-file limit.
    limits: conn::Limits,
    state: Arc<AppState>,
}

impl Server {
    /// Binds the listener and loads (or creates) the operator token and the
    /// signing key under the state directory. Raises the process's soft
    /// limit on open files to its hard limit (once per process).
    pub async fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        let state_err = |path: PathBuf| move |source| ServerError::State { path, source };
        std::fs::create_dir_all(&cfg.state_dir).map_err(state_err(cfg.state_dir.clone()))?;
        let tls = match &cfg.tls {
            Some((cert, key)) => Some(Arc::new(
                crate::tls::server_config(cert, key).map_err(ServerError::Tls)?,
            )),
            None => None,
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let store: Arc<dyn store::Store> = match &cfg.database {
            Some(url) => Arc::new(
                store::PgStore::connect_with(url, cfg.database_ca.as_deref())
                    .map_err(|e| ServerError::Database(e.to_string()))?,
            ),
            None => Arc::new(store::SqliteStore::open(&cfg.state_dir).map_err(|e| {
                ServerError::State {
                    path: cfg.state_dir.join(store::DB_FILE),
                    source: std::io::Error::other(e),
                }
            })?),
        };
        // The admin token and the signing keys: replicas on one database
        // share them, so a node token or preview URL one issued works at
        // every other.
        let secret = |name: &str| {
            let s = store.clone();
            let name = name.to_string();
            async move {
                tokio::task::spawn_blocking(move || s.secret(&name, auth::random_secret(32)))
                    .await
                    .expect("the secret lookup does not panic")
                    .map_err(|e| ServerError::Database(e.to_string()))
            }
        };
        let admin_token = secret("admin.token").await?;
        let key = secret("jwt.key").await?;
        let preview_secret = secret("preview.key").await?;
        let replica = match cfg.database {
            Some(_) => {
                // Where the operator finds it, as with the single-machine store.
                let path = cfg.state_dir.join("admin.token");
                crate::private_file::write(&path, &admin_token).map_err(state_err(path))?;
                let local = listener.local_addr().map_err(|source| ServerError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
                let url = cfg.advertise_url.clone().unwrap_or_else(|| {
                    let ip = if local.ip().is_unspecified() {
                        std::net::IpAddr::from([127, 0, 0, 1])
                    } else {
                        local.ip()
                    };
                    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
                    format!("{scheme}://{}", std::net::SocketAddr::new(ip, local.port()))
                });
                let peers_tls = crate::tls_client_config_with(cfg.replica_ca.as_deref(), None)
                    .map_err(ServerError::Tls)?;
                Some(replicas::Replica::new(
                    url,
                    secret("replica.key").await?,
                    peers_tls,
                ))
            }
            None => None,
        };
        let limits = conn::Limits::fit(
            cfg.header_read_timeout,
            cfg.max_pending_connections,
            cfg.max_connections,
            raise_open_file_limit(),
        );
        if limits.max_connections < cfg.max_connections {
            tracing::warn!(
                max_connections = limits.max_connections,
                configured = cfg.max_connections,
                "max_connections lowered to fit the open-file limit"
            );
        }
        let hub = Hub::with_grace(cfg.resume_grace);
        for (node, desired) in store.desired_configs() {
            // A node with no binding (forgotten) gets its configuration
            // from the store when it registers and connects again.
            if let Some(identity) = store.node_identity(&node) {
                hub.restore_desired_config(&node, &identity.org, desired);
            }
        }
        let mcp_execs = mcp::Running::default();
        let adopted = mcp_execs.clone();
        hub.on_labelled_exec(move |hub, d, label| adopted.adopt(hub, d, &label));
        let state = Arc::new(AppState {
            hub,
            signer: auth::Signer::new(key.as_bytes(), cfg.jwt_ttl),
            store,
            proofs_seen: Default::default(),
            cfg,
            admin_token,
            preview_key: preview::PreviewKey::new(preview_secret.as_bytes()),
            tunnels: Default::default(),
            mcp_execs,
            mcp_sessions: Default::default(),
            mcp_owners: Default::default(),
            shutdown: CancellationToken::new(),
            replica,
            token_reads: Default::default(),
        });
        Ok(Server {
            listener,
            tls,
            limits,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn hub(&self) -> Hub {
        self.state.hub.clone()
    }

    pub fn admin_token(&self) -> &str {
        &self.state.admin_token
    }

    /// Exposes (or stops exposing) a node's tools on `/mcp`.
    pub fn allow_mcp_node(&self, node_id: &str, allowed: bool) -> Result<bool, ServerError> {
        self.state
            .store
            .set_mcp_node(node_id, allowed)
            .map_err(|e| ServerError::State {
                path: self.state.cfg.state_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })
    }

    /// Serves until `shutdown`; then stops accepting, tells agents to go
    /// (so they reconnect to the next instance), lets requests in flight
    /// finish and closes every connection it accepted.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let addr = self.local_addr();
        let app = api::router(self.state.clone());
        info!(
            %addr,
            tls = self.tls.is_some(),
            max_connections = self.limits.max_connections,
            max_pending_connections = self.limits.max_pending,
            header_read_timeout = ?self.limits.header_read_timeout,
            "server listening"
        );
        let connections = TaskTracker::new();
        let drain = CancellationToken::new();
        let heartbeats = CancellationToken::new();
        let leases = tokio::spawn(replicas::run(self.state.clone(), heartbeats.clone()));
        let pulse = tokio::spawn(heartbeat::run(
            self.state.hub.clone(),
            self.state.cfg.heartbeat_interval,
            self.state.cfg.heartbeat_timeout,
            heartbeats.clone(),
        ));
        conn::accept_loop(
            self.listener,
            self.tls,
            app,
            self.limits,
            &connections,
            drain.clone(),
            &shutdown,
        )
        .await;
        // Tell agents first so they reconnect to the next instance.
        self.state.shutdown.cancel();
        self.state.hub.all_offline(Duration::from_secs(5)).await;
        // Every connection task ends within its drain timeout.
        drain.cancel();
        connections.close();
        connections.wait().await;
        heartbeats.cancel();
        let _ = pulse.await;
        let _ = leases.await;
        if let Some(r) = &self.state.replica {
            // Let go at once: agents are already reconnecting elsewhere.
            let (store, id, url) = (self.state.store.clone(), r.id.clone(), r.url.clone());
            let _ = tokio::task::spawn_blocking(move || {
                store.hold_nodes(&id, &url, &[], Duration::ZERO)
            })
            .await;
        }
        self.state.hub.shutdown().await;
        Ok(())
    }
}

/// Binds and serves (the `tether server` command).
pub async fn run(cfg: ServerConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let server = Server::bind(cfg).await?;
    server.serve(shutdown).await
}
