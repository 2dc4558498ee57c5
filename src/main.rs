//! The `tether` binary: parses flags, starts tracing, installs the crypto
//! provider and signal handling, then hands over to the library.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use tether::cli::{AgentArgs, fail, init_tracing, read_psk, run_agent, shutdown_on_signals};
use tether::ctl::{self, Client, CpTarget, CtlError};
use tether::protocol::{Resources, SpawnRequest};
use tether::server::LogOptions;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Run sandboxed workloads on compute you own"
)]
struct Cli {
    /// Log level filter (also RUST_LOG) [default: info, or the node file's logging.level].
    #[arg(long, global = true, env = "TETHER_LOG")]
    log: Option<String>,
    /// Log format: text or json [default: text, or the node file's logging.format].
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: register, dial out to the server, drive Docker.
    Agent(AgentArgs),
    /// Run the reference control plane.
    Server(ServerArgs),
    /// Server and agent in one process on loopback, for a first run.
    Dev(DevArgs),
    /// Operator CLI against a server.
    Ctl(CtlArgs),
    /// The egress proxy of allowlist workers (run by the agent in a container).
    #[command(hide = true)]
    EgressProxy(tether::cli::EgressProxyArgs),
}

#[derive(Args)]
struct ServerArgs {
    #[arg(long, env = "TETHER_LISTEN", default_value = "0.0.0.0:7878")]
    listen: SocketAddr,
    /// Registration key (prefer --psk-file).
    #[arg(long, env = "TETHER_PSK", hide_env_values = true)]
    psk: Option<String>,
    #[arg(long, env = "TETHER_PSK_FILE")]
    psk_file: Option<PathBuf>,
    #[arg(
        long,
        env = "TETHER_STATE_DIR",
        default_value = "/var/lib/tether-server"
    )]
    state_dir: PathBuf,
    /// Lifetime of node tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    jwt_ttl: u64,
    /// Seconds between heartbeat pings (both sides use the server's values;
    /// exec clients are pinged too and told the timeout).
    #[arg(long, default_value_t = 10)]
    heartbeat_interval: u64,
    /// Seconds of silence after which a link counts as dead: a half-open
    /// link is detected within timeout + interval (30 s by default). Must
    /// be longer than the interval.
    #[arg(long, default_value_t = 20)]
    heartbeat_timeout: u64,
    /// Serve HTTPS: certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "TETHER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "TETHER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Most connections in all (agents, operators and the rest); lowered
    /// to fit the open-file limit.
    #[arg(long, default_value_t = nonzero(tether::server::DEFAULT_MAX_CONNECTIONS))]
    max_connections: NonZeroUsize,
    /// Most connections that have not authenticated yet; beyond it the
    /// oldest is closed (idle and slow connections go first).
    #[arg(long, default_value_t = nonzero(tether::server::DEFAULT_MAX_PENDING_CONNECTIONS))]
    max_pending_connections: NonZeroUsize,
    /// Serve host-based preview URLs, `{port}-{worker}.DOMAIN` (point a
    /// wildcard DNS name at the server); `DOMAIN:PORT` puts that port in the
    /// URLs `ctl preview-url` prints.
    #[arg(long, env = "TETHER_PREVIEW_DOMAIN")]
    preview_domain: Option<String>,
    /// A `Host` (name or `name:port`) the MCP endpoint answers besides
    /// loopback names; repeat for several.
    #[arg(long = "mcp-allowed-host")]
    mcp_allowed_hosts: Vec<String>,
    /// Keep the state (node identities, organizations, tokens, desired
    /// configurations, previews, the MCP allowlist, the audit trail) in
    /// PostgreSQL instead of STATE_DIR/state.db, so several replicas can
    /// share it: postgres://USER:PASSWORD@HOST[:PORT]/DB (or
    /// host=/run/postgresql user=… dbname=…). The schema is made at start.
    #[arg(long, env = "TETHER_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
    /// With --database: a PEM bundle of CA certificates trusted for the
    /// database's TLS certificate besides the web's roots. TLS is used when
    /// the URL says sslmode=require (or verify-ca, verify-full); the
    /// certificate is always verified, host name included.
    #[arg(long, env = "TETHER_DATABASE_CA", requires = "database")]
    database_ca: Option<PathBuf>,
    /// With --database: the URL the other replicas reach this one at
    /// (default: http:// and the listen address, 127.0.0.1 for 0.0.0.0).
    #[arg(long, env = "TETHER_ADVERTISE_URL", requires = "database")]
    advertise_url: Option<String>,
    /// With --database: a PEM bundle of CA certificates trusted, besides the
    /// web's roots, for the other replicas' certificates (when they serve
    /// HTTPS, requests passed between replicas go over TLS).
    #[arg(long, env = "TETHER_REPLICA_CA", requires = "database")]
    replica_ca: Option<PathBuf>,
    /// Node configuration (YAML or JSON, as `ctl config push` takes) that
    /// every node registering without one gets, pushed once it connects:
    /// an `inference_backend` for the whole fleet, say.
    #[arg(long, env = "TETHER_NODE_CONFIG", value_name = "FILE")]
    node_config: Option<PathBuf>,
}

fn nonzero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("the default limits are positive")
}

#[derive(Args)]
struct DevArgs {
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    #[arg(long, default_value = ".tether-dev")]
    state_dir: PathBuf,
    #[arg(long, default_value = "dev")]
    node_id: String,
    #[arg(long, env = "TETHER_DOCKER_SOCKET")]
    docker_socket: Option<String>,
}

#[derive(Args)]
struct CtlArgs {
    #[arg(long, env = "TETHER_SERVER", default_value = "http://127.0.0.1:7878")]
    server: url::Url,
    /// Operator token: the server's admin.token, or an organization's
    /// (`ctl token create`).
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: CtlCmd,
}

// Parsed once per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum CtlCmd {
    /// List nodes.
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// List workers across nodes.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Create and start a worker; prints its id.
    Spawn {
        #[arg(long)]
        image: String,
        #[arg(long)]
        node: Option<String>,
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        #[arg(long = "label", value_name = "K=V")]
        label: Vec<String>,
        #[arg(long)]
        task_id: Option<String>,
        #[arg(long)]
        job_id: Option<String>,
        #[arg(long)]
        cpus: Option<f64>,
        /// Memory limit in MB.
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        pids: Option<i64>,
        /// Disk (writable layer) limit in MB, where the node's storage driver supports one.
        #[arg(long, value_name = "MB")]
        disk: Option<u64>,
        #[arg(long)]
        workdir: Option<String>,
        /// Stop and remove the worker after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Run privileged (the node must allow it).
        #[arg(long)]
        privileged: bool,
        /// `host` to share the node's network (the node must allow it).
        #[arg(long)]
        network: Option<String>,
        /// none, allowlist or restricted: narrows the node's
        /// default_network_policy (none < allowlist < restricted).
        #[arg(long, value_name = "POLICY")]
        network_policy: Option<tether::protocol::NetworkPolicy>,
        /// Give the job the node's inference backend on localhost:11434
        /// (placed only on a node that runs one).
        #[arg(long)]
        inference: bool,
        /// Pass a host device in (the node must allow it).
        #[arg(long = "device", value_name = "PATH")]
        devices: Vec<String>,
        /// Mount a host path: SRC:DST[:ro|rw] (under the node's allowed paths).
        #[arg(short = 'v', long = "volume", value_name = "SRC:DST[:MODE]")]
        volumes: Vec<String>,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Run a command in a worker; exits with its exit code.
    Exec {
        #[arg(short, long)]
        interactive: bool,
        #[arg(short, long)]
        tty: bool,
        /// Kill the command after this many seconds (exit 124, like timeout(1)).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        worker: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Copy files or directories: `cp SRC WORKER:DST` or `cp WORKER:SRC DST`.
    Cp { src: String, dst: String },
    /// Show a worker's output.
    Logs {
        #[arg(short, long)]
        follow: bool,
        /// Only since this Unix time or duration ago (e.g. 10m).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        tail: Option<u64>,
        #[arg(short = 't', long)]
        timestamps: bool,
        worker: String,
    },
    /// Forward local ports to ports of a worker until Ctrl-C: each
    /// `[LOCAL_ADDR:]LOCAL_PORT:REMOTE_PORT`, `:REMOTE_PORT` (a free local
    /// port, printed) or `PORT`; listens on loopback unless an address is given.
    PortForward {
        worker: String,
        #[arg(required = true, value_name = "PORTS")]
        ports: Vec<tether::ctl::Forward>,
    },
    /// Print a signed, expiring URL that opens PORT of a worker in a
    /// browser without a token (revoke it with `previews revoke ID`).
    PreviewUrl {
        worker: String,
        port: u16,
        /// How long the URL works (e.g. 30m, 1h, 7d; at most 30d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// List preview URLs not yet expired or revoked (`previews revoke ID`).
    Previews {
        #[command(subcommand)]
        cmd: Option<PreviewsCmd>,
    },
    /// The MCP endpoint: which nodes' tools it exposes, and the snippet
    /// an MCP client needs (docs/mcp.md).
    Mcp {
        #[command(subcommand)]
        cmd: McpCmd,
    },
    /// The audit trail of sandbox operations (MCP and API), oldest first.
    Audit {
        /// Only this task's.
        #[arg(long)]
        task: Option<String>,
        /// Only this worker's.
        #[arg(long)]
        worker: Option<String>,
        /// One JSON record per line.
        #[arg(long)]
        json: bool,
    },
    /// List open tunnels (`tunnels close WORKER:PORT` ends one).
    Tunnels {
        #[command(subcommand)]
        cmd: Option<TunnelsCmd>,
    },
    /// Deployments: several services on one private network
    /// (`deploy up -f app.yaml`; docs/deployments.md).
    Deploy {
        #[command(subcommand)]
        cmd: tether::ctl::deploy::DeployCmd,
    },
    /// Organizations (admin token): `org create NAME` prints the key its
    /// nodes register with (docs/organizations.md).
    Org {
        #[command(subcommand)]
        cmd: tether::ctl::orgs::OrgCmd,
    },
    /// Operator tokens of an organization (`token create --org ORG`).
    Token {
        #[command(subcommand)]
        cmd: tether::ctl::orgs::TokenCmd,
    },
    /// Stop a worker (SIGTERM, then SIGKILL).
    Stop { worker: String },
    /// Remove a worker and its network.
    Rm {
        #[arg(short, long)]
        force: bool,
        worker: String,
    },
    /// Inspect a worker (JSON).
    Inspect { worker: String },
    /// Configuration commands (`config push NODE FILE`).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Node commands (`node inspect NODE`).
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Stop scheduling new workers on a node.
    Drain { node: String },
    /// Resume scheduling on a node.
    Undrain { node: String },
}

#[derive(Subcommand)]
enum PreviewsCmd {
    /// Revoke a preview URL at once.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum McpCmd {
    /// Expose a node's tools through /mcp.
    Allow { node: String },
    /// Stop exposing a node's tools.
    Deny { node: String },
    /// The nodes whose tools /mcp exposes.
    List,
    /// Print the client configuration (URL and authorization header).
    Config,
    /// Tokens for MCP clients, narrower than the operator's.
    Token {
        #[command(subcommand)]
        cmd: McpTokenCmd,
    },
}

#[derive(Subcommand)]
enum McpTokenCmd {
    /// Create a token (printed once); limit it to nodes and a task prefix.
    Create {
        /// A node it may use (repeat; default: every allow-listed node).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Task ids it may name must start with this.
        #[arg(long)]
        task_prefix: Option<String>,
    },
    /// List tokens (not their secrets).
    Ls,
    /// Revoke a token at once.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum TunnelsCmd {
    /// End every connection of a tunnel (port-forwards and previews).
    Close { id: String },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Push versioned configuration (YAML or JSON) to a node; prints the ack.
    Push { node: String, file: PathBuf },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// A node's status, latest capability report and its hash (JSON).
    Inspect {
        node: String,
        /// Output JSON (the default; accepted for docker-CLI habits).
        #[arg(long)]
        json: bool,
    },
    /// Forget a node: its key binding and tokens become void, its
    /// connection closes at once, and the id may register again (with a
    /// new key, e.g. after the node's state directory was lost).
    Rm { node: String },
}

/// `SRC:DST[:ro|rw]`, docker's -v syntax for host paths.
fn parse_volume(v: &str) -> Result<tether::protocol::Mount, String> {
    let parts: Vec<&str> = v.split(':').collect();
    let read_only = match parts.get(2) {
        None => None,
        Some(&"ro") => Some(true),
        Some(&"rw") => Some(false),
        Some(m) => return Err(format!("--volume {v:?}: mode must be ro or rw, got {m:?}")),
    };
    match parts[..] {
        [src, dst] | [src, dst, _] if src.starts_with('/') && dst.starts_with('/') => {
            Ok(tether::protocol::Mount {
                source: src.into(),
                target: dst.into(),
                read_only,
            })
        }
        _ => Err(format!(
            "--volume {v:?} must be /HOST/PATH:/CONTAINER/PATH[:ro|rw]"
        )),
    }
}

fn kv(list: &[String], what: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    list.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{what} {s:?} must be KEY=VALUE")),
        })
        .collect()
}

fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("--since {s:?}: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(now.saturating_sub(d).as_secs() as i64)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent runs on one thread, as `tether-agent` does (see there).
    let rt = match cli.cmd {
        Cmd::Agent(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build();
    match rt {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    tether::init_crypto();
    match cli.cmd {
        Cmd::Agent(a) => run_agent(a, cli.log, cli.log_format).await,
        Cmd::Server(s) => {
            init_tracing(
                cli.log.as_deref().unwrap_or("info"),
                cli.log_format.as_deref().unwrap_or("text"),
            );
            let psk = match read_psk(s.psk, s.psk_file) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            let mut cfg = tether::server::ServerConfig::new(s.listen, psk, s.state_dir);
            cfg.jwt_ttl = std::time::Duration::from_secs(s.jwt_ttl.max(60));
            cfg.tls = s.tls_cert.zip(s.tls_key);
            cfg.heartbeat_interval = std::time::Duration::from_secs(s.heartbeat_interval.max(1));
            cfg.heartbeat_timeout = std::time::Duration::from_secs(s.heartbeat_timeout.max(2));
            // A timeout within one interval drops every idle link between
            // two pings.
            if cfg.heartbeat_timeout <= cfg.heartbeat_interval {
                return fail(format!(
                    "--heartbeat-timeout ({} s) must be longer than --heartbeat-interval ({} s); twice the interval or more is safe",
                    cfg.heartbeat_timeout.as_secs(),
                    cfg.heartbeat_interval.as_secs()
                ));
            }
            cfg.max_connections = s.max_connections.get();
            cfg.preview_domain = s.preview_domain;
            cfg.mcp_allowed_hosts = s.mcp_allowed_hosts;
            cfg.database = s.database;
            cfg.database_ca = s.database_ca;
            cfg.advertise_url = s.advertise_url;
            cfg.replica_ca = s.replica_ca;
            if let Some(file) = &s.node_config {
                let read = std::fs::read_to_string(file).map_err(|e| e.to_string());
                match read.and_then(|t| serde_saphyr::from_str(&t).map_err(|e| e.to_string())) {
                    Ok(c) => cfg.node_config = Some(c),
                    Err(e) => return fail(format!("--node-config {}: {e}", file.display())),
                }
            }
            cfg.max_pending_connections = s.max_pending_connections.get();
            match tether::server::run(cfg, shutdown_on_signals()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Dev(d) => {
            init_tracing(
                cli.log.as_deref().unwrap_or("info"),
                cli.log_format.as_deref().unwrap_or("text"),
            );
            let cfg = tether::dev::DevConfig {
                listen: d.listen,
                state_dir: d.state_dir,
                node_id: d.node_id,
                docker_socket: d.docker_socket,
            };
            match tether::dev::run(cfg, shutdown_on_signals()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Ctl(c) => run_ctl(c).await,
        Cmd::EgressProxy(p) => tether::cli::run_egress_proxy(p, cli.log).await,
    }
}

async fn run_ctl(c: CtlArgs) -> ExitCode {
    let Some(token) = c.token else {
        return fail(
            "an operator token is required: --token or TETHER_TOKEN (the server's admin.token)",
        );
    };
    let mcp_url = c.server.join("mcp").map(|u| u.to_string());
    let client = Client::new(c.server, token.clone());
    let r: Result<i64, CtlError> = async {
        match c.cmd {
            CtlCmd::Mcp {
                cmd: McpCmd::Config,
            } => {
                let snippet = serde_json::json!({
                    "mcpServers": {
                        "tether": {
                            "type": "http",
                            "url": mcp_url.clone().unwrap_or_default(),
                            "headers": {"Authorization": format!("Bearer {token}")},
                        }
                    }
                });
                println!("{}", serde_json::to_string_pretty(&snippet).expect("json"));
            }
            CtlCmd::Mcp {
                cmd: McpCmd::Allow { node },
            } => {
                for n in client.mcp_allow(&node, true).await? {
                    println!("{n}");
                }
            }
            CtlCmd::Mcp {
                cmd: McpCmd::Deny { node },
            } => {
                for n in client.mcp_allow(&node, false).await? {
                    println!("{n}");
                }
            }
            CtlCmd::Mcp {
                cmd:
                    McpCmd::Token {
                        cmd: McpTokenCmd::Create { nodes, task_prefix },
                    },
            } => {
                let t = client
                    .mcp_token_create(&nodes, task_prefix.as_deref())
                    .await?;
                eprintln!(
                    "MCP token {} (shown once; revoke with `tether ctl mcp token revoke {}`)",
                    t["id"].as_str().unwrap_or(""),
                    t["id"].as_str().unwrap_or("")
                );
                println!("{}", t["token"].as_str().unwrap_or(""));
            }
            CtlCmd::Mcp {
                cmd: McpCmd::Token {
                    cmd: McpTokenCmd::Ls,
                },
            } => {
                for t in client.mcp_tokens().await? {
                    println!(
                        "{}\tnodes={}\ttask_prefix={}\t{}",
                        t["id"].as_str().unwrap_or(""),
                        t["nodes"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(|n| n.as_str())
                                .collect::<Vec<_>>()
                                .join(","))
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| "*".into()),
                        t["task_prefix"].as_str().unwrap_or("*"),
                        t["created_at"].as_str().unwrap_or(""),
                    );
                }
            }
            CtlCmd::Mcp {
                cmd:
                    McpCmd::Token {
                        cmd: McpTokenCmd::Revoke { id },
                    },
            } => {
                client.mcp_token_revoke(&id).await?;
                println!("{id}");
            }
            CtlCmd::Mcp { cmd: McpCmd::List } => {
                for n in client.mcp_nodes().await? {
                    println!("{n}");
                }
            }
            CtlCmd::Nodes { json } => {
                let n = client.nodes().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&n).expect("serializes"));
                } else {
                    print!("{}", ctl::format_nodes(&n));
                }
            }
            CtlCmd::Ps { json } => {
                let w = client.workers().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&w).expect("serializes"));
                } else {
                    print!("{}", ctl::format_workers(&w));
                }
            }
            CtlCmd::Spawn {
                image,
                node,
                env,
                label,
                task_id,
                job_id,
                cpus,
                memory,
                pids,
                disk,
                workdir,
                timeout,
                privileged,
                network,
                network_policy,
                inference,
                devices,
                volumes,
                cmd,
            } => {
                let mounts = volumes
                    .iter()
                    .map(|v| parse_volume(v))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(CtlError::Local)?;
                let req = SpawnRequest {
                    image,
                    cmd,
                    env: kv(&env, "--env").map_err(CtlError::Local)?,
                    labels: kv(&label, "--label").map_err(CtlError::Local)?,
                    task_id,
                    job_id,
                    resources: Resources {
                        cpus,
                        memory_mb: memory,
                        pids,
                        disk_mb: disk,
                    },
                    workdir,
                    timeout_secs: timeout,
                    privileged,
                    network,
                    devices,
                    mounts,
                    node_id: node,
                    network_policy,
                    inference,
                };
                println!("{}", client.spawn(&req).await?.worker_id);
            }
            CtlCmd::Exec {
                interactive,
                tty,
                timeout,
                worker,
                cmd,
            } => {
                return ctl::exec(&client, &worker, cmd, interactive, tty, timeout).await;
            }
            CtlCmd::Cp { src, dst } => {
                ctl::copy(&client, CpTarget::parse(&src), CpTarget::parse(&dst)).await?;
            }
            CtlCmd::Logs {
                follow,
                since,
                tail,
                timestamps,
                worker,
            } => {
                let since = since
                    .map(|s| parse_since(&s))
                    .transpose()
                    .map_err(CtlError::Local)?;
                ctl::logs(
                    &client,
                    &worker,
                    LogOptions {
                        follow,
                        since,
                        tail,
                        timestamps,
                    },
                )
                .await?;
            }
            CtlCmd::PortForward { worker, ports } => {
                ctl::port_forward(&client, &worker, &ports, shutdown_on_signals()).await?;
            }
            CtlCmd::PreviewUrl { worker, port, ttl } => {
                let p = client.preview_url(&worker, port, ttl).await?;
                println!("{}", p.url.unwrap_or_default());
                eprintln!("preview {} expires {}", p.id, p.expires_at);
            }
            CtlCmd::Previews { cmd: None } => {
                print!("{}", ctl::format_previews(&client.previews().await?));
            }
            CtlCmd::Previews {
                cmd: Some(PreviewsCmd::Revoke { id }),
            } => {
                client.revoke_preview(&id).await?;
                println!("{id}");
            }
            CtlCmd::Audit { task, worker, json } => {
                let records = client.audit(task.as_deref(), worker.as_deref()).await?;
                if json {
                    for r in &records {
                        println!("{r}");
                    }
                } else {
                    print!("{}", ctl::format_audit(&records));
                }
            }
            CtlCmd::Tunnels { cmd: None } => {
                print!("{}", ctl::format_tunnels(&client.tunnels().await?));
            }
            CtlCmd::Tunnels {
                cmd: Some(TunnelsCmd::Close { id }),
            } => {
                client.close_tunnel(&id).await?;
                println!("{id}");
            }
            CtlCmd::Deploy { cmd } => tether::ctl::deploy::run(&client, cmd).await?,
            CtlCmd::Org { cmd } => tether::ctl::orgs::run_org(&client, cmd).await?,
            CtlCmd::Token { cmd } => tether::ctl::orgs::run_token(&client, cmd).await?,
            CtlCmd::Stop { worker } => {
                client.stop(&worker).await?;
                println!("{worker}");
            }
            CtlCmd::Rm { force, worker } => {
                client.remove(&worker, force).await?;
                println!("{worker}");
            }
            CtlCmd::Inspect { worker } => {
                let w = client.inspect(&worker).await?;
                println!("{}", serde_json::to_string_pretty(&w).expect("serializes"));
            }
            CtlCmd::Node {
                cmd: NodeCmd::Inspect { node, json: _ },
            } => {
                let n = client.node(&node).await?;
                println!("{}", serde_json::to_string_pretty(&n).expect("serializes"));
            }
            CtlCmd::Node {
                cmd: NodeCmd::Rm { node },
            } => {
                client.forget_node(&node).await?;
                println!("{node}");
            }
            CtlCmd::Config {
                cmd: ConfigCmd::Push { node, file },
            } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| CtlError::Local(format!("{}: {e}", file.display())))?;
                let cfg: tether::protocol::NodeConfig = serde_saphyr::from_str(&text)
                    .map_err(|e| CtlError::Local(format!("{}: {e}", file.display())))?;
                let ack = client.push_config(&node, &cfg).await?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&ack).expect("serializes")
                );
                if ack.status != tether::protocol::AckStatus::Applied {
                    return Ok(1);
                }
            }
            CtlCmd::Drain { node } => {
                client.drain(&node, true).await?;
                println!("{node}");
            }
            CtlCmd::Undrain { node } => {
                client.drain(&node, false).await?;
                println!("{node}");
            }
        }
        Ok(0)
    }
    .await;
    match r {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("Error: {}", ctl::printable(&e.to_string()));
            // docker's convention: 125 when the failure is tether's, not the command's.
            ExitCode::from(125)
        }
    }
}
