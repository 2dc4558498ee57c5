//! The node side: registers with the server, dials out, keeps the WebSocket
//! alive and turns pushed requests into Docker calls. Binds no listening
//! socket.

pub mod capabilities;
mod commands;
mod events;
mod health;
pub mod identity;
mod inference;
pub mod mounts;
pub mod netguard;
mod nft;
mod node;
mod nodeconfig;
pub mod policy;
mod session;
pub mod spool;

use crate::docker::containers::Defaults;
use crate::docker::networks::SubnetPool;
use crate::protocol::{Bootstrap, RegisterRequest};
use crate::protocol::{ErrorBody, REGISTER_PATH};
use backon::{BackoffBuilder, ExponentialBuilder};
use bollard::Docker;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Reconnects after a server restart are spread uniformly over this window.
const RESTART_SPREAD_MS: u64 = 3000;

/// Everything the agent needs to run, already validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Base URL of the server (`http://` or `https://`).
    pub server: url::Url,
    /// Other replicas of the server, tried in turn after `server` when a
    /// connection fails or is lost (replicas sharing one database).
    pub other_servers: Vec<url::Url>,
    /// Registration pre-shared key.
    pub psk: String,
    pub node_id: String,
    /// Where the node JWT and other state live.
    pub state_dir: PathBuf,
    /// Docker socket path; `None` uses `DOCKER_HOST` or the default socket.
    pub docker_socket: Option<String>,
    /// Pool that worker networks take their subnets from.
    pub subnet_pool: ipnet::Ipv4Net,
    /// Prefix length of each worker subnet.
    pub subnet_prefix: u8,
    /// Time allowed for the WebSocket handshake (once connected, both
    /// sides use the heartbeat settings announced in `welcome`).
    pub heartbeat_timeout: Duration,
    /// Limits for workers whose request names none.
    pub defaults: Defaults,
    /// Name, labels and limits reported in the capability report.
    pub identity: capabilities::Identity,
    /// The node's local policy (the last word on every request).
    pub policy: policy::Policy,
    /// Largest control message accepted from the server.
    pub max_request_bytes: usize,
    /// Private CA bundle (PEM) trusted besides the webpki roots.
    pub tls_ca_bundle: Option<PathBuf>,
    /// Hex SHA-256 of the server's certificate: anything else is refused.
    pub tls_pin: Option<String>,
    /// Ask the server for newer configuration this often
    /// (`updates.enable_dynamic_config`); pushes work without it.
    pub config_poll: Option<Duration>,
    /// Where exec output waits while the server is unreachable.
    pub spool: spool::SpoolConfig,
    /// `sandbox.allowed_private_cidrs`: ranges `restricted` workers may
    /// reach after all.
    pub allowed_private_cidrs: Vec<ipnet::Ipv4Net>,
    /// Image of `allowlist` workers' egress proxies; `None`: the image of
    /// the agent's own container, if it runs in one.
    pub egress_proxy_image: Option<String>,
    /// Test hook: fixed name answers (`NAME=IP`) handed to egress proxies
    /// instead of DNS. Not settable from the command line or node file.
    pub egress_resolve: Vec<String>,
    /// Tunnels go through a relay in the worker's network namespace
    /// instead of a dial to its address; `None`: when the agent runs in a
    /// container with a network of its own (it cannot dial worker bridges).
    pub tunnel_relay: Option<bool>,
}

impl AgentConfig {
    pub fn new(server: url::Url, psk: String, node_id: String, state_dir: PathBuf) -> Self {
        let identity = capabilities::Identity {
            node_id: node_id.clone(),
            sandbox_enabled: true,
            max_concurrency: 0,
            ..Default::default()
        };
        AgentConfig {
            server,
            other_servers: Vec::new(),
            psk,
            node_id,
            docker_socket: None,
            subnet_pool: "10.213.0.0/16".parse().expect("valid default pool"),
            subnet_prefix: 28,
            heartbeat_timeout: Duration::from_secs(20),
            defaults: Defaults::default(),
            identity,
            policy: policy::Policy::default(),
            max_request_bytes: crate::protocol::MAX_CONTROL_BYTES,
            tls_ca_bundle: None,
            tls_pin: None,
            config_poll: None,
            spool: spool::SpoolConfig::new(&state_dir),
            state_dir,
            allowed_private_cidrs: Vec::new(),
            egress_proxy_image: None,
            egress_resolve: Vec::new(),
            tunnel_relay: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("registration refused by the server: {0}")]
    Unauthorized(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("could not reach the server at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    #[error("the server is going away: {0}")]
    ServerGoingAway(String),
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AgentConfig {
    /// TLS settings for reaching the server: webpki roots plus the private
    /// CA bundle, or only the pinned certificate.
    pub fn tls(&self) -> Result<rustls::ClientConfig, AgentError> {
        crate::tls_client_config_with(self.tls_ca_bundle.as_deref(), self.tls_pin.as_deref())
            .map_err(AgentError::Config)
    }
}

impl AgentError {
    /// Permanent errors end the agent; the rest are retried with backoff.
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            AgentError::Unauthorized(_) | AgentError::Config(_) | AgentError::State { .. }
        )
    }
}

/// What the agent's tasks share: the engine, the node's state, the link
/// to the server, and the bookkeeping of running commands.
pub(crate) struct Ctx {
    /// The Docker engine and what scopes the objects made on it.
    pub engine: Engine,
    /// The node's policy, pushed configuration, report and health.
    pub node: node::NodeState,
    /// The server's side: the link, its channels, replies, the token.
    pub upstream: Upstream,
    /// Running execs and the containers checked to be this node's.
    pub execs: commands::ExecTable,
    /// Open tunnels, by worker.
    pub tunnels: commands::TunnelTable,
    /// Exec output spools (used while the server is unreachable).
    pub spools: Arc<spool::Spools>,
    /// Where worker events go (the process-wide forwarder, `events`).
    pub events: events::Reporter,
    /// Every task the agent starts (request handlers, stream pumps,
    /// deadline timers, token writes); they end when `stop` fires.
    tasks: tokio_util::task::TaskTracker,
    /// Fires when the agent stops: its tasks end (a running exec is left
    /// running in its worker, not killed).
    stop: CancellationToken,
}

/// The node's Docker engine as the agent uses it.
pub(crate) struct Engine {
    pub docker: Docker,
    /// Labels every object the agent makes (`tether.node_id`): the agent
    /// touches only its own.
    pub node_id: String,
    /// Subnets of worker networks.
    pub pool: SubnetPool,
    /// Limits of a worker whose request names none.
    pub defaults: Defaults,
}

/// The agent's side of the server: what outlives one connection.
pub(crate) struct Upstream {
    /// The current connection to the server (none while reconnecting).
    pub link: Arc<crate::conn::Link>,
    /// Open channels; they outlive a connection and resume on the next one.
    pub channels: crate::channel::Channels,
    /// Recent request ids and their replies (a replayed request runs once).
    pub replies: std::sync::Mutex<commands::Replies>,
    /// Where the node token is kept (0600).
    pub token_path: PathBuf,
    /// A token the server sent over the live link, for the next connection.
    pub refreshed_token: std::sync::Mutex<Option<String>>,
}

impl Ctx {
    /// Runs `work` as one of the agent's tasks: tracked, and dropped when
    /// the agent stops.
    pub(crate) fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = work => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Runs the agent until `shutdown` fires or a permanent error occurs.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    if let Some(u) = std::iter::once(&cfg.server)
        .chain(&cfg.other_servers)
        .find(|u| !matches!(u.scheme(), "http" | "https"))
    {
        return Err(AgentError::Config(format!(
            "server URL must be http:// or https://, got {u}"
        )));
    }
    let pool = SubnetPool::new(cfg.subnet_pool, cfg.subnet_prefix).map_err(AgentError::Config)?;
    cfg.tls()?; // a bad CA bundle or pin is a configuration error: fail now
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::State {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let key =
        identity::NodeKey::load_or_create(&cfg.state_dir).map_err(|source| AgentError::State {
            path: cfg.state_dir.join(identity::KEY_FILE),
            source,
        })?;
    info!(key_id = %crate::protocol::key_id(&key.public_key()), "node key loaded");
    let Some(docker) = wait_for_docker(&cfg, &shutdown).await else {
        return Ok(());
    };
    if let Err(e) = pool.sync(&docker).await {
        warn!(error = %e, "could not read existing networks");
    }
    // Owned here, not by `Ctx` (which tasks may outlive the agent with):
    // released when this function ends (kept while the node has
    // containers; a panic or an early return keeps it too).
    let netguard = netguard::NetGuard::install(
        &cfg.node_id,
        &netguard::GuardSpec {
            pool: cfg.subnet_pool,
            subnet_prefix: cfg.subnet_prefix,
            allowed_private: cfg.allowed_private_cidrs.clone(),
            resolvers: netguard::resolvers(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        },
    );
    match &netguard {
        Ok(g) => info!(table = g.table(), "network guard installed"),
        Err(e) => warn!(
            error = %e,
            "no network guard: restricted and allowlist workers will be refused"
        ),
    }
    let own = crate::docker::egress::own_container(&docker).await;
    let egress_image = match cfg.egress_proxy_image.clone() {
        Some(i) => Some(i),
        None => own.as_ref().and_then(|c| c.image.clone()),
    };
    let tunnel_relay = cfg.tunnel_relay.unwrap_or_else(|| {
        own.as_ref().is_some_and(|c| {
            c.host_config
                .as_ref()
                .and_then(|h| h.network_mode.as_deref())
                != Some("host")
        })
    });
    let protected = protected_paths(&docker, &cfg, own.as_ref()).await;
    let link = crate::conn::Link::new();
    // One Docker event subscription for the whole process, ended when this
    // function returns, however it returns.
    let events_end = shutdown.child_token();
    let _events_guard = events_end.clone().drop_guard();
    let (events, forwarder) = events::forwarder(
        docker.clone(),
        cfg.node_id.clone(),
        link.clone(),
        events_end,
    );
    tokio::spawn(forwarder);
    let node = node::NodeState::new(node::NodeSetup {
        identity: cfg.identity.clone(),
        state_dir: cfg.state_dir.clone(),
        policy: cfg.policy.clone(),
        max_request_bytes: cfg.max_request_bytes,
        config_poll: cfg.config_poll,
        guard: netguard.as_ref().map(|_| ()).map_err(Clone::clone),
        egress_image,
        egress_resolve: cfg.egress_resolve.clone(),
        tunnel_relay,
        protected,
        applied: nodeconfig::load(&cfg.state_dir),
    });
    let ctx = Arc::new(Ctx {
        events,
        tasks: Default::default(),
        stop: CancellationToken::new(),
        engine: Engine {
            docker,
            node_id: cfg.node_id.clone(),
            pool,
            defaults: cfg.defaults,
        },
        node,
        upstream: Upstream {
            link: link.clone(),
            channels: crate::channel::Channels::new(link),
            replies: Default::default(),
            token_path: cfg.state_dir.join(format!("{}.jwt", cfg.node_id)),
            refreshed_token: Default::default(),
        },
        execs: Default::default(),
        tunnels: Default::default(),
        spools: spool::Spools::new(cfg.spool.clone()),
    });
    if let Ok(g) = &netguard {
        ctx.spawn(netguard::keep(g.clone()));
    }
    commands::collect_garbage(&ctx).await;
    // A policy narrowed while the agent was down holds for what runs.
    commands::stop_unadmitted(&ctx).await;
    // The inference backend of the configuration in force: adopted, made
    // or removed, then reported (the report at `hello` may precede it).
    let c = ctx.clone();
    ctx.spawn(async move {
        inference::converge(&c).await;
        health::report_capabilities(&c).await;
    });
    // Deadlines survive agent restarts: they live in the workers' labels.
    if let Ok(workers) =
        crate::docker::containers::list(&ctx.engine.docker, &ctx.engine.node_id).await
    {
        for w in workers {
            if let Some(at) = w.deadline {
                commands::schedule_reaper(ctx.clone(), w.worker_id, at);
            }
        }
    }

    let result = reconnect(&cfg, &ctx, &key, &shutdown).await;
    // The agent's tasks end with it; a few seconds for them to let go.
    ctx.stop.cancel();
    ctx.tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), ctx.tasks.wait())
        .await
        .is_err()
    {
        warn!(left = ctx.tasks.len(), "agent tasks still ending after 5 s");
    }
    if let Ok(g) = netguard {
        g.release(&ctx.engine.docker, &ctx.engine.node_id).await;
    }
    result
}

/// Connects and serves, reconnecting with backoff, until shutdown or a
/// permanent error.
async fn reconnect(
    cfg: &AgentConfig,
    ctx: &Arc<Ctx>,
    key: &identity::NodeKey,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    // One token file per node id: a renamed node registers afresh.
    let token_path = ctx.upstream.token_path.clone();
    let mut token = std::fs::read_to_string(&token_path)
        .ok()
        .map(|t| t.trim().to_string());
    let new_backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    // The servers in turn: after a failure or a loss, the next one.
    let servers: Vec<url::Url> = std::iter::once(cfg.server.clone())
        .chain(cfg.other_servers.iter().cloned())
        .collect();
    let mut cur = cfg.clone();
    let mut at = 0;
    loop {
        let started = Instant::now();
        let result = connect_and_serve(&cur, ctx, key, &mut token, &token_path, shutdown).await;
        match &result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_permanent() => return result,
            Err(e) => {
                warn!(node_id = %cfg.node_id, server = %cur.server, error = %e, "disconnected; will reconnect")
            }
        }
        if servers.len() > 1 {
            at = (at + 1) % servers.len();
            cur.server = servers[at].clone();
            if at != 0 {
                // Another replica of the same server: no reason to wait.
                continue;
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = new_backoff(); // the link was stable: start over from short delays
        }
        let mut delay = backoff.next().unwrap_or(Duration::from_secs(30));
        if matches!(result, Err(AgentError::ServerGoingAway(_))) {
            // A restarting server has every agent back at once: spread the
            // reconnects over a few seconds instead of arriving in lockstep.
            use rand::Rng;
            delay = Duration::from_millis(rand::rng().random_range(0..RESTART_SPREAD_MS));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The host paths no worker may mount (`mounts::Protected`): Docker's data
/// directory as the engine reports it, and the agent's state and socket as
/// this process and, through its container's binds, the host see them.
async fn protected_paths(
    docker: &Docker,
    cfg: &AgentConfig,
    own: Option<&bollard::models::ContainerInspectResponse>,
) -> mounts::Protected {
    let root = tokio::time::timeout(Duration::from_secs(10), docker.info())
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|i| i.docker_root_dir)
        .unwrap_or_else(|| "/var/lib/docker".into());
    let binds: Vec<(std::path::PathBuf, std::path::PathBuf)> = own
        .and_then(|c| c.mounts.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m.source.clone()?.into(), m.destination.clone()?.into())))
        .collect();
    let socket = mounts::docker_socket(cfg.docker_socket.as_deref());
    let dir = cfg.state_dir.clone();
    tokio::task::spawn_blocking(move || {
        mounts::Protected::new(&dir, &socket, std::path::Path::new(&root), &binds)
    })
    .await
    .unwrap_or_default()
}

async fn wait_for_docker(cfg: &AgentConfig, shutdown: &CancellationToken) -> Option<Docker> {
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        match crate::docker::connect(cfg.docker_socket.as_deref()).await {
            Ok(d) => return Some(d),
            Err(e) => warn!(error = %e, "Docker engine unreachable; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(10))) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// Registers (if there is no token yet), connects, and serves one session.
async fn connect_and_serve(
    cfg: &AgentConfig,
    ctx: &Arc<Ctx>,
    key: &identity::NodeKey,
    token: &mut Option<String>,
    token_path: &Path,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    if let Some(t) = ctx.upstream.refreshed_token.lock().unwrap().take() {
        *token = Some(t);
    }
    let jwt = match token.clone() {
        Some(t) => t,
        None => {
            let b = register(cfg, key).await?;
            if let Some(v) = &b.config_version {
                info!(config_version = %v, "the server holds a configuration for this node; it comes once connected");
            }
            crate::private_file::store(token_path.to_path_buf(), b.auth.node_jwt.clone())
                .await
                .map_err(|source| AgentError::State {
                    path: token_path.to_path_buf(),
                    source,
                })?;
            *token = Some(b.auth.node_jwt.clone());
            b.auth.node_jwt
        }
    };
    let ws = match session::connect(cfg, &jwt, key).await {
        Ok(ws) => ws,
        Err(session::ConnectError::Unauthorized) => {
            // Expired or revoked token: register again on the next attempt
            // (after the usual backoff, so a server that keeps refusing is
            // not hammered).
            info!("node token refused; will register again");
            *token = None;
            let _ = std::fs::remove_file(token_path);
            return Err(AgentError::ConnectionLost(
                "node token refused by the server".into(),
            ));
        }
        Err(session::ConnectError::Other(reason)) => {
            return Err(AgentError::Connect {
                url: cfg.server.to_string(),
                reason,
            });
        }
    };
    session::serve(ws, cfg, ctx.clone(), shutdown).await
}

/// Exchanges the pre-shared key for a node JWT and the bootstrap payload,
/// binding the node id to `key` (or proving it is the key already bound).
pub async fn register(cfg: &AgentConfig, key: &identity::NodeKey) -> Result<Bootstrap, AgentError> {
    let url = cfg
        .server
        .join(REGISTER_PATH)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let conn_err = |reason: String| AgentError::Connect {
        url: url.to_string(),
        reason,
    };
    let resp = crate::http_client_with(cfg.tls()?)
        .post(url.clone())
        .bearer_auth(&cfg.psk)
        .json(&RegisterRequest {
            node_id: cfg.node_id.clone(),
            public_key: key.public_key(),
            proof: key.proof(crate::protocol::ProofPurpose::Register, &cfg.node_id),
        })
        .send()
        .await
        .map_err(|e| conn_err(crate::error_chain(&e)))?;
    let status = resp.status();
    if status.is_success() {
        return resp
            .json::<Bootstrap>()
            .await
            .map_err(|e| conn_err(e.to_string()));
    }
    let body = resp
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| serde_json::from_value::<ErrorBody>(v["error"].clone()).ok());
    let msg = body
        .map(|b| b.to_string())
        .unwrap_or_else(|| status.to_string());
    // 409: the node id is bound to another key; only an operator can free
    // it (`tether ctl node rm`), so retrying is pointless.
    if matches!(status.as_u16(), 400 | 401 | 403 | 409) {
        Err(AgentError::Unauthorized(msg))
    } else {
        Err(conn_err(msg))
    }
}
