//! Command-line plumbing shared by the `tether` and `tether-agent`
//! binaries: the agent's flags and how they combine with the node file,
//! logging, signals.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Flags of `tether agent` (and of `tether-agent`).
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Node configuration file (YAML; see config/node.example.yaml). Flags and
    /// environment variables override its values.
    #[arg(long, env = "TETHER_CONFIG", default_value = "/etc/tether/node.yaml")]
    pub config: PathBuf,
    /// Server base URL (http:// or https://) [file: orchestrator.url].
    #[arg(long, env = "TETHER_SERVER")]
    pub server: Option<url::Url>,
    /// Another replica of the server, tried in turn after --server when a
    /// connection fails or is lost (repeat, or a comma-separated list).
    #[arg(
        long = "also-server",
        env = "TETHER_ALSO_SERVERS",
        value_delimiter = ','
    )]
    pub also_servers: Vec<url::Url>,
    /// Registration key (prefer --psk-file: environment variables show in `docker inspect`).
    #[arg(long, env = "TETHER_PSK", hide_env_values = true)]
    pub psk: Option<String>,
    /// File holding the registration key [file: orchestrator.registration_psk_file].
    #[arg(long, env = "TETHER_PSK_FILE")]
    pub psk_file: Option<PathBuf>,
    /// This node's id [file: node.id; default: the host name].
    #[arg(long, env = "TETHER_NODE_ID")]
    pub node_id: Option<String>,
    /// Where the node token and state are kept [file: storage.state_dir; default: /var/lib/tether].
    #[arg(long, env = "TETHER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Docker socket path (default: DOCKER_HOST or /var/run/docker.sock).
    #[arg(long, env = "TETHER_DOCKER_SOCKET")]
    pub docker_socket: Option<String>,
    /// Address pool for worker networks.
    #[arg(long, env = "TETHER_SUBNET_POOL", default_value = "10.213.0.0/16")]
    pub subnet_pool: ipnet::Ipv4Net,
    /// Prefix length of each worker's subnet.
    #[arg(long, env = "TETHER_SUBNET_PREFIX", default_value_t = 28)]
    pub subnet_prefix: u8,
    /// Seconds of silence after which the connection is dropped; also the
    /// connect timeout [file: orchestrator.timeouts.connect_seconds].
    #[arg(long)]
    pub heartbeat_timeout: Option<u64>,
    /// Image of allowlist workers' egress proxies (it runs `tether-agent
    /// egress-proxy`) [default: the agent container's own image].
    #[arg(long, env = "TETHER_EGRESS_PROXY_IMAGE")]
    pub egress_proxy_image: Option<String>,
}

/// Flags of the hidden `egress-proxy` subcommand.
#[derive(Args, Debug)]
pub struct EgressProxyArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:3128")]
    pub listen: std::net::SocketAddr,
    /// Allowed name: `example.com` or `*.example.com` (repeatable).
    #[arg(long = "allow", value_name = "PATTERN")]
    pub allow: Vec<String>,
    /// Test hook: answer NAME with IP instead of asking DNS (repeatable).
    #[arg(long = "resolve", value_name = "NAME=IP")]
    pub resolve: Vec<String>,
}

/// Runs the egress proxy until a signal.
pub async fn run_egress_proxy(a: EgressProxyArgs, log: Option<String>) -> ExitCode {
    use crate::egress_proxy::{Pattern, ProxyConfig};
    let mut cfg = ProxyConfig::default();
    for p in &a.allow {
        match Pattern::parse(p) {
            Ok(p) => cfg.allow.push(p),
            Err(e) => return fail(format!("--allow: {e}")),
        }
    }
    for r in &a.resolve {
        let Some((name, ip)) = r.split_once('=') else {
            return fail(format!("--resolve {r:?} must be NAME=IP"));
        };
        let Ok(ip) = ip.parse() else {
            return fail(format!("--resolve {r:?}: {ip:?} is not an IP address"));
        };
        cfg.resolve
            .entry(name.trim_end_matches('.').to_ascii_lowercase())
            .or_default()
            .push(ip);
    }
    init_tracing(log.as_deref().unwrap_or("info"), "text");
    let listener = match tokio::net::TcpListener::bind(a.listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", a.listen)),
    };
    tracing::info!(listen = %a.listen, allow = ?a.allow, "egress proxy ready");
    crate::egress_proxy::serve(listener, cfg, shutdown_on_signals()).await;
    ExitCode::SUCCESS
}

/// Flags of the hidden `inference-proxy` subcommand.
#[derive(Args, Debug)]
pub struct InferenceProxyArgs {
    /// Where to listen: `IP:PORT` (inside the job's network namespace) or
    /// `unix:/path` (the node's gateway).
    #[arg(long, default_value = "127.0.0.1:11434")]
    pub listen: crate::inference::proxy::Backend,
    /// The node's backend: `unix:/path` or `IP:PORT`.
    #[arg(long)]
    pub backend: crate::inference::proxy::Backend,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = crate::inference::proxy::DEFAULT_MAX_BODY)]
    pub max_body_bytes: u64,
    /// Longest request, answer included, in seconds.
    #[arg(long, default_value_t = crate::inference::proxy::DEFAULT_TIMEOUT.as_secs())]
    pub timeout_secs: u64,
    /// Requests at the backend at once (no bound when left out).
    #[arg(long)]
    pub max_concurrency: Option<std::num::NonZeroUsize>,
    /// The job (worker) it serves, for its log lines.
    #[arg(long)]
    pub job: Option<String>,
}

/// Binds `addr`: TCP, or a Unix socket that any local user may connect to
/// (it lives in a volume only the node's inference containers mount); a
/// stale socket file is replaced.
async fn bind(addr: &crate::inference::proxy::Backend) -> std::io::Result<Listener> {
    use crate::inference::proxy::Backend;
    match addr {
        Backend::Tcp(a) => tokio::net::TcpListener::bind(a).await.map(Listener::Tcp),
        Backend::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = tokio::net::UnixListener::bind(p)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666))?;
            Ok(Listener::Unix(l))
        }
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Runs the inference proxy until a signal.
pub async fn run_inference_proxy(a: InferenceProxyArgs, log: Option<String>) -> ExitCode {
    use crate::inference::proxy;
    init_tracing(log.as_deref().unwrap_or("info"), "text");
    let listener = match bind(&a.listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {:?}: {e}", a.listen)),
    };
    let mut cfg = proxy::Config::new(a.backend);
    cfg.max_body = a.max_body_bytes;
    cfg.timeout = std::time::Duration::from_secs(a.timeout_secs.max(1));
    cfg.max_concurrency = a.max_concurrency.map(|n| n.get());
    let job = a.job.unwrap_or_default();
    tracing::info!(listen = ?a.listen, backend = ?cfg.backend, %job, "inference proxy ready");
    let counters = std::sync::Arc::new(proxy::Counters::default());
    let stop = shutdown_on_signals();
    let c = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    // The totals, each second they changed and every 30 s regardless: the
    // agent reads the last such line of the log's tail for the worker's
    // inspect, so no other line (the proxy's warnings are rate-limited)
    // can push them out of it.
    let (totals, job_id) = (counters.clone(), job.clone());
    tokio::spawn(async move {
        let mut last = (0, 0, 0, 0);
        let mut quiet = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let now = (
                c(&totals.requests),
                c(&totals.refused),
                c(&totals.bytes_in),
                c(&totals.bytes_out),
            );
            quiet += 1;
            if now != last || quiet >= 30 {
                (last, quiet) = (now, 0);
                tracing::info!(
                    job = %job_id,
                    requests = now.0,
                    refused = now.1,
                    bytes_in = now.2,
                    bytes_out = now.3,
                    "inference counters"
                );
            }
        }
    });
    match listener {
        Listener::Tcp(l) => proxy::serve(l, cfg, counters.clone(), stop).await,
        Listener::Unix(l) => proxy::serve(l, cfg, counters.clone(), stop).await,
    }
    tracing::info!(
        %job,
        requests = c(&counters.requests),
        refused = c(&counters.refused),
        bytes_in = c(&counters.bytes_in),
        bytes_out = c(&counters.bytes_out),
        "inference proxy stopped"
    );
    ExitCode::SUCCESS
}

/// Exit status of `tunnel-connect` when nothing listens on the port.
pub const TUNNEL_REFUSED_EXIT: u8 = 111;

/// Connects to `port` on the loopback of the namespace it runs in, writes
/// one zero byte to stdout once connected, then carries stdin to the
/// connection (its end becomes a half-close) and the connection to stdout:
/// `framed`, in frames of a 4-byte big-endian length and the bytes, and an
/// empty frame when the connection half-closes.
pub async fn run_tunnel_connect(port: u16, framed: bool) -> ExitCode {
    use tokio::io::{AsyncWriteExt, BufReader};
    let v4 = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    // A service on IPv6 loopback only; otherwise IPv4's answer stands.
    let sock = match v4 {
        Ok(s) => Ok(s),
        Err(e4) => tokio::net::TcpStream::connect(("::1", port))
            .await
            .map_err(|_| e4),
    };
    let sock = match sock {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            eprintln!("nothing listens on port {port}");
            return ExitCode::from(TUNNEL_REFUSED_EXIT);
        }
        Err(e) => {
            eprintln!("cannot connect to port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = sock.set_nodelay(true);
    let mut stdout = tokio::io::stdout();
    if stdout.write_all(&[0]).await.is_err() || stdout.flush().await.is_err() {
        return ExitCode::FAILURE;
    }
    let (r, mut w) = sock.into_split();
    const BUF: usize = 64 * 1024;
    let up = async {
        let mut stdin = BufReader::with_capacity(BUF, tokio::io::stdin());
        let _ = tokio::io::copy_buf(&mut stdin, &mut w).await;
        let _ = w.shutdown().await;
    };
    let down = async {
        if !framed {
            let mut r = BufReader::with_capacity(BUF, r);
            let _ = tokio::io::copy_buf(&mut r, &mut stdout).await;
            let _ = stdout.flush().await;
            return;
        }
        use tokio::io::AsyncReadExt;
        let mut r = r;
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(n) => n,
                Err(_) => return, // no half-close to tell: the exec's end says it
            };
            let len = (n as u32).to_be_bytes();
            if stdout.write_all(&len).await.is_err()
                || stdout.write_all(&buf[..n]).await.is_err()
                || stdout.flush().await.is_err()
            {
                return;
            }
            if n == 0 {
                return;
            }
        }
    };
    tokio::join!(up, down);
    ExitCode::SUCCESS
}

/// One HTTP/1.0 exchange with an Ollama API at `addr`: the status code and
/// the body.
async fn ollama_call(
    addr: &crate::inference::proxy::Backend,
    head: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use crate::inference::proxy::Backend;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn ask<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut s: S,
        req: Vec<u8>,
    ) -> std::io::Result<(u16, String)> {
        s.write_all(&req).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let code = text
            .strip_prefix("HTTP/1.")
            .and_then(|t| t.get(2..5))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, body.trim().to_string()))
    }
    let mut req = format!(
        "{head} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    match addr {
        Backend::Tcp(a) => ask(tokio::net::TcpStream::connect(a).await?, req).await,
        Backend::Unix(p) => ask(tokio::net::UnixStream::connect(p).await?, req).await,
    }
}

/// `GET /api/version` at `addr`: success on a 200 within 3 s.
pub async fn run_inference_probe(addr: crate::inference::proxy::Backend) -> ExitCode {
    let probe = ollama_call(&addr, "GET /api/version", b"");
    match tokio::time::timeout(std::time::Duration::from_secs(3), probe).await {
        Ok(Ok((200, _))) => ExitCode::SUCCESS,
        Ok(Ok((code, body))) => fail(format!("{addr:?} answered {code}: {body}")),
        Ok(Err(e)) => fail(format!("{addr:?}: {e}")),
        Err(_) => fail(format!("{addr:?} did not answer within 3 s")),
    }
}

/// `POST /api/pull` of `model` at `addr`, waiting for the whole pull.
pub async fn run_inference_pull(addr: crate::inference::proxy::Backend, model: String) -> ExitCode {
    let body = serde_json::json!({"model": model, "stream": false}).to_string();
    match ollama_call(&addr, "POST /api/pull", body.as_bytes()).await {
        Ok((200, _)) => ExitCode::SUCCESS,
        Ok((code, body)) => {
            let why = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or(body);
            fail(format!("pulling {model}: {code} {why}"))
        }
        Err(e) => fail(format!("pulling {model}: {e}")),
    }
}

/// Serves the Ollama stand-in until a signal.
pub async fn run_inference_standin(
    listen: crate::inference::proxy::Backend,
    token_delay_ms: u64,
    log: Option<String>,
) -> ExitCode {
    use crate::inference::standin;
    init_tracing(log.as_deref().unwrap_or("info"), "text");
    let listener = match bind(&listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {listen:?}: {e}")),
    };
    let knobs = standin::Knobs {
        token_delay: std::time::Duration::from_millis(token_delay_ms),
        ..Default::default()
    };
    tracing::info!(listen = ?listen, "inference stand-in ready");
    let stop = shutdown_on_signals();
    match listener {
        Listener::Tcp(l) => standin::serve(l, knobs, stop).await,
        Listener::Unix(l) => standin::serve(l, knobs, stop).await,
    }
    ExitCode::SUCCESS
}

/// Runs the agent from its flags until a signal or a permanent error.
/// `log` and `log_format` override the node file's `logging` section.
pub async fn run_agent(a: AgentArgs, log: Option<String>, log_format: Option<String>) -> ExitCode {
    let (cfg, logging) = match agent_config(a) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let level = log.unwrap_or(logging.level);
    let format = log_format.unwrap_or(logging.format);
    init_tracing_to(&level, &format, Some(&logging.file_path));
    match crate::agent::run(cfg, shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Prints `tether: MSG` and returns exit status 2.
pub fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tether: {msg}");
    ExitCode::from(2)
}

/// The registration key from a file or a value, trimmed; at least 16 characters.
pub fn read_psk(psk: Option<String>, file: Option<PathBuf>) -> Result<String, String> {
    let key = match (psk, file) {
        (_, Some(f)) => {
            std::fs::read_to_string(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
        }
        (Some(p), None) => p,
        (None, None) => {
            return Err(
                "a registration key is required: --psk-file, TETHER_PSK_FILE or TETHER_PSK".into(),
            );
        }
    };
    let key = key.trim().to_string();
    if key.len() < 16 {
        return Err("the registration key must be at least 16 characters".into());
    }
    Ok(key)
}

/// Reads the node file named by `--config`: `None` when the default path
/// does not exist (it is optional; a path the user named is not).
fn read_node_file(path: &std::path::Path) -> Result<Option<crate::config::NodeFile>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => crate::config::parse(&text)
            .map(Some)
            .map_err(|e| format!("{}: invalid configuration:\n{e}", path.display())),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && path.as_os_str() == "/etc/tether/node.yaml" =>
        {
            Ok(None)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// What the agent's configuration reads from outside its flags.
struct Outside<'a> {
    /// An environment variable (the node file names the key's).
    env: &'a dyn Fn(&str) -> Option<String>,
    /// A file's text (the registration key's).
    read: &'a dyn Fn(&std::path::Path) -> Result<String, String>,
    /// The host name: the default node id.
    host_name: Option<String>,
}

/// Builds the agent's configuration from the node file and the flags.
fn agent_config(
    a: AgentArgs,
) -> Result<(crate::agent::AgentConfig, crate::config::Logging), String> {
    let file = read_node_file(&a.config)?;
    let outside = Outside {
        env: &|name| std::env::var(name).ok(),
        read: &|path| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        },
        host_name: sysinfo::System::host_name(),
    };
    merge(a, file, &outside)
}

/// The node file (if any), then environment variables and flags on top
/// (clap has already put the environment into `a`). Touches nothing
/// outside `outside`.
fn merge(
    a: AgentArgs,
    file: Option<crate::config::NodeFile>,
    outside: &Outside<'_>,
) -> Result<(crate::agent::AgentConfig, crate::config::Logging), String> {
    use std::time::Duration;
    let server = match (a.server, &file) {
        (Some(s), _) => s,
        (None, Some(f)) => f
            .orchestrator
            .url
            .parse()
            .map_err(|e| format!("orchestrator.url: {e}"))?,
        (None, None) => return Err(
            "the server URL is required: --server, TETHER_SERVER or orchestrator.url in --config"
                .into(),
        ),
    };
    let psk_file = a.psk_file.or_else(|| {
        file.as_ref()
            .map(|f| f.orchestrator.registration_psk_file.clone())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    });
    let psk = a.psk.or_else(|| {
        let var = file
            .as_ref()
            .map(|f| f.orchestrator.registration_psk_env.clone())?;
        (outside.env)(&var)
    });
    let psk = match psk_file {
        Some(path) => Some((outside.read)(&path)?),
        None => psk,
    };
    let psk = read_psk(psk, None)?;
    let node_id = a
        .node_id
        .or_else(|| file.as_ref().map(|f| f.node.id.clone()))
        .or_else(|| outside.host_name.clone())
        .unwrap_or_else(|| "node".into());
    let state_dir = a
        .state_dir
        .or_else(|| file.as_ref().map(|f| PathBuf::from(&f.storage.state_dir)))
        .unwrap_or_else(|| PathBuf::from("/var/lib/tether"));
    let mut cfg = crate::agent::AgentConfig::new(server, psk, node_id, state_dir);
    cfg.other_servers = a.also_servers;
    cfg.docker_socket = a.docker_socket;
    cfg.subnet_pool = a.subnet_pool;
    cfg.subnet_prefix = a.subnet_prefix;
    cfg.egress_proxy_image = a.egress_proxy_image;
    let mut logging = crate::config::Logging::default();
    if let Some(f) = &file {
        cfg.heartbeat_timeout = Duration::from_secs(f.orchestrator.timeouts.connect_seconds.max(2));
        cfg.policy = crate::agent::policy::Policy::from_file(&f.sandbox);
        cfg.defaults.log_max_size_mb = f.sandbox.logs.max_size_mb;
        cfg.defaults.log_max_files = f.sandbox.logs.max_files;
        cfg.max_request_bytes = f.worker_api.max_request_bytes as usize;
        cfg.spool.memory_bytes = (f.storage.spool_memory_kb * 1024) as usize;
        cfg.spool.quota_bytes = f.storage.spool_quota_mb * 1024 * 1024;
        let tls = &f.orchestrator.tls;
        cfg.tls_ca_bundle =
            (!tls.ca_bundle_path.is_empty()).then(|| PathBuf::from(&tls.ca_bundle_path));
        cfg.tls_pin =
            (!tls.pinned_sha256.is_empty()).then(|| tls.pinned_sha256.to_ascii_lowercase());
        cfg.identity.name = (!f.node.name.is_empty()).then(|| f.node.name.clone());
        cfg.identity.labels = f.node.labels.clone();
        cfg.identity.sandbox_enabled = f.sandbox.mode != "disabled";
        cfg.identity.max_concurrency = f.sandbox.max_concurrency;
        cfg.config_poll = f
            .updates
            .enable_dynamic_config
            .then(|| Duration::from_secs(f.updates.poll_interval_seconds));
        cfg.identity.inference_enabled = f.inference.mode == "allow" && f.sandbox.mode == "allow";
        cfg.identity.inference_allow_gpu = f.inference.allow_gpu;
        cfg.identity.inference_max_concurrency = f.inference.max_concurrency;
        cfg.identity.inference_max_body_bytes = f.inference.max_request_mb * 1024 * 1024;
        cfg.identity.inference_timeout_secs = f.inference.request_timeout_seconds;
        cfg.allowed_private_cidrs = f
            .sandbox
            .allowed_private_cidrs
            .iter()
            .filter_map(|c| c.parse().ok()) // checked when the file was read
            .collect();
        logging = f.logging.clone();
    }
    if let Some(t) = a.heartbeat_timeout {
        cfg.heartbeat_timeout = Duration::from_secs(t.max(2));
    }
    Ok((cfg, logging))
}

/// Resolves when SIGINT or SIGTERM arrives; a second signal exits at once.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("signal handler");
        let mut int = signal(SignalKind::interrupt()).expect("signal handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutting down (signal again to force)");
        t.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(130);
    });
    token
}

pub fn init_tracing(level: &str, format: &str) {
    init_tracing_to(level, format, None)
}

/// The log filter: `RUST_LOG` if set, else `level`; either a level
/// (`info`) or `target=level` directives (`info,tether::agent=debug`).
/// Plain targets rather than an `EnvFilter`: no regex engine in the binary.
pub fn log_filter(env: Option<&str>, level: &str) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::Targets;
    let mut filter = None;
    for spec in env.into_iter().chain([level]) {
        match spec.parse::<Targets>() {
            Ok(t) => {
                filter = Some(t);
                break;
            }
            Err(e) => eprintln!("tether: ignoring log filter {spec:?}: {e}"),
        }
    }
    let filter = filter.unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    // At debug and trace these libraries log whole messages, request bodies
    // and headers: node tokens, proofs, pushed registry passwords, workers'
    // environments. Capped at info whatever the filter says, for them and
    // every target below them.
    use tracing::level_filters::LevelFilter;
    let secret = |t: &str| {
        SECRET_TARGETS
            .iter()
            .any(|s| t == *s || t.starts_with(&format!("{s}::")))
    };
    let default = filter.default_level().unwrap_or(LevelFilter::OFF);
    let mut capped = Targets::new().with_default(default);
    for (t, l) in filter.iter() {
        let l = if secret(t) {
            l.min(LevelFilter::INFO)
        } else {
            l
        };
        capped = capped.with_target(t, l);
    }
    for s in SECRET_TARGETS {
        if !filter.iter().any(|(t, _)| t == *s) {
            capped = capped.with_target(*s, default.min(LevelFilter::INFO));
        }
    }
    capped
}

/// Targets whose debug output carries secrets (see [`log_filter`]).
const SECRET_TARGETS: &[&str] = &[
    "bollard",
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "reqwest",
    "axum",
];

/// Logs to stderr, and also to `file` when given.
pub fn init_tracing_to(level: &str, format: &str, file: Option<&str>) {
    use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), level);
    let file = file.filter(|f| !f.is_empty()).and_then(|f| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)
            .map_err(|e| eprintln!("tether: cannot open log file {f}: {e}"))
            .ok()
    });
    // Colours only for a terminal (not in `docker logs` or a log file).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && file.is_none();
    let writer = match file {
        Some(f) => BoxMakeWriter::new(std::io::stderr.and(std::sync::Mutex::new(f))),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(writer))
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer),
            )
            .init();
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    mod merge {
        use super::super::{AgentArgs, Outside, merge};
        use clap::Parser;
        use std::path::Path;

        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: AgentArgs,
        }

        fn args(flags: &[&str]) -> AgentArgs {
            Cli::parse_from(std::iter::once("tether-agent").chain(flags.iter().copied())).a
        }

        const FILE: &str = "version: 1\norchestrator:\n  url: http://file.example:7878\n  \
            registration_psk_env: MY_KEY\nnode:\n  id: from-file\n  labels: [gpu]\n\
            sandbox:\n  mode: disabled\n  max_concurrency: 3\n";

        fn outside<'a>(
            env: &'a dyn Fn(&str) -> Option<String>,
            read: &'a dyn Fn(&Path) -> Result<String, String>,
        ) -> Outside<'a> {
            Outside {
                env,
                read,
                host_name: Some("host".into()),
            }
        }

        fn no_file(p: &Path) -> Result<String, String> {
            Err(format!("unexpected read of {}", p.display()))
        }

        #[test]
        fn the_file_fills_what_the_flags_leave_out() {
            let file = crate::config::parse(FILE).unwrap();
            let env = |v: &str| (v == "MY_KEY").then(|| "k".repeat(20));
            let (cfg, _) = merge(args(&[]), Some(file), &outside(&env, &no_file)).unwrap();
            assert_eq!(cfg.server.as_str(), "http://file.example:7878/");
            assert_eq!(cfg.node_id, "from-file");
            assert_eq!(cfg.psk, "k".repeat(20));
            assert_eq!(cfg.identity.labels, vec!["gpu".to_string()]);
            assert!(!cfg.identity.sandbox_enabled);
            assert!(!cfg.policy.sandbox_enabled);
            assert_eq!(cfg.policy.max_concurrency, 3);
        }

        #[test]
        fn flags_win_over_the_file_and_a_key_file_over_a_key() {
            let file = crate::config::parse(FILE).unwrap();
            let env = |_: &str| Some("from-the-environment-var".to_string());
            let read = |p: &Path| {
                assert_eq!(p, Path::new("/keys/psk"));
                Ok("  from-the-key-file-0123\n".to_string())
            };
            let a = args(&[
                "--server=https://flag.example",
                "--also-server=https://b.example,https://c.example",
                "--node-id=from-flag",
                "--psk-file=/keys/psk",
                "--heartbeat-timeout=1",
            ]);
            let (cfg, _) = merge(a, Some(file), &outside(&env, &read)).unwrap();
            assert_eq!(cfg.server.as_str(), "https://flag.example/");
            let others: Vec<&str> = cfg.other_servers.iter().map(|u| u.as_str()).collect();
            assert_eq!(others, ["https://b.example/", "https://c.example/"]);
            assert_eq!(cfg.node_id, "from-flag");
            assert_eq!(cfg.psk, "from-the-key-file-0123");
            assert_eq!(cfg.heartbeat_timeout.as_secs(), 2, "at least 2 s");
        }

        #[test]
        fn without_a_file_the_server_and_key_are_required() {
            let none = |_: &str| None;
            let e = merge(args(&[]), None, &outside(&none, &no_file)).unwrap_err();
            assert!(e.contains("server URL is required"), "{e}");
            let a = args(&["--server=http://s"]);
            let e = merge(a, None, &outside(&none, &no_file)).unwrap_err();
            assert!(e.contains("registration key is required"), "{e}");
            let a = args(&["--server=http://s", "--psk=short"]);
            let e = merge(a, None, &outside(&none, &no_file)).unwrap_err();
            assert!(e.contains("at least 16"), "{e}");
            // The host name is the default node id.
            let a = args(&["--server=http://s", "--psk=0123456789abcdef"]);
            let (cfg, _) = merge(a, None, &outside(&none, &no_file)).unwrap();
            assert_eq!(cfg.node_id, "host");
        }
    }

    #[test]
    fn secret_carrying_targets_never_log_below_info() {
        for spec in [
            "trace",
            "info,tungstenite=trace",
            "tungstenite::protocol=trace",
        ] {
            let f = log_filter(Some(spec), "info");
            for t in [
                "tungstenite::protocol",
                "tokio_tungstenite",
                "hyper::proto",
                "bollard::docker",
            ] {
                assert!(!f.would_enable(t, &Level::DEBUG), "{spec}: {t}");
            }
        }
        let f = log_filter(Some("trace"), "info");
        assert!(f.would_enable("tungstenite::protocol", &Level::INFO));
        assert!(f.would_enable("tether::agent", &Level::TRACE));
        let f = log_filter(Some("warn"), "info");
        assert!(!f.would_enable("tungstenite", &Level::INFO));
    }

    #[test]
    fn log_filter_takes_levels_and_directives_and_survives_nonsense() {
        let f = log_filter(None, "warn");
        assert!(f.would_enable("tether::agent", &Level::WARN));
        assert!(!f.would_enable("tether::agent", &Level::INFO));
        let f = log_filter(Some("info,tether::agent=debug"), "warn");
        assert!(f.would_enable("tether::agent::session", &Level::DEBUG));
        assert!(!f.would_enable("bollard", &Level::DEBUG));
        // Nonsense in RUST_LOG falls back to the level.
        let f = log_filter(Some("=??="), "error");
        assert!(!f.would_enable("tether", &Level::WARN));
    }
}
