//! `tether-agent`: the node agent alone, the same as `tether agent`. Built
//! as its own binary so a node maps only agent code: the agent image ships
//! it, and its resident memory is what the agent needs, not the server's
//! and the CLI's code around it (docs/performance.md).

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "The tether node agent: register, dial out to the server, drive Docker"
)]
struct Cli {
    /// Log level filter (also RUST_LOG) [default: info, or the node file's logging.level].
    #[arg(long, env = "TETHER_LOG")]
    log: Option<String>,
    /// Log format: text or json [default: text, or the node file's logging.format].
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(flatten)]
    agent: tether::cli::AgentArgs,
    #[command(subcommand)]
    sub: Option<Sub>,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// The egress proxy of allowlist workers (the agent runs it in a
    /// container of its own image).
    #[command(hide = true)]
    EgressProxy(tether::cli::EgressProxyArgs),
    /// A job's inference proxy on localhost:11434 (docs/inference.md).
    #[command(hide = true)]
    InferenceProxy(tether::cli::InferenceProxyArgs),
    /// Exits 0 when an Ollama API answers `GET /api/version` with 200 (the
    /// inference gateway's health check).
    #[command(hide = true)]
    InferenceProbe {
        /// `IP:PORT` or `unix:/path`.
        addr: tether::inference::proxy::Backend,
    },
    /// Waits for a signal: the main process of a tunnel relay sidecar.
    #[command(hide = true)]
    Idle,
    /// Connects to PORT on this network namespace's loopback and carries
    /// stdin and stdout to and from it (run by a tunnel relay, §5.27).
    #[command(hide = true)]
    TunnelConnect {
        port: u16,
        /// Frame what the port sends (4-byte big-endian length, then the
        /// bytes; an empty frame when it half-closes).
        #[arg(long)]
        framed: bool,
    },
    /// Pulls MODEL through an Ollama API (`POST /api/pull`, not streamed).
    #[command(hide = true)]
    InferencePull {
        /// `IP:PORT` or `unix:/path`.
        addr: tether::inference::proxy::Backend,
        model: String,
    },
    /// An Ollama stand-in for tests (docs/inference.md).
    #[command(hide = true)]
    InferenceStandin {
        /// `IP:PORT` or `unix:/path`.
        #[arg(long, default_value = "127.0.0.1:11434")]
        listen: tether::inference::proxy::Backend,
        /// Pause before each token, in milliseconds.
        #[arg(long, default_value_t = 0)]
        token_delay_ms: u64,
    },
}

/// One thread: the agent forwards bytes between two sockets, and on one
/// thread its tasks hand them on without waking another thread each time
/// (about a quarter less CPU per MB of a download than on a worker pool,
/// docs/performance.md). Blocking work goes to tokio's blocking pool.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tether::init_crypto();
    match cli.sub {
        Some(Sub::EgressProxy(p)) => tether::cli::run_egress_proxy(p, cli.log).await,
        Some(Sub::InferenceProxy(p)) => tether::cli::run_inference_proxy(p, cli.log).await,
        Some(Sub::Idle) => {
            tether::cli::shutdown_on_signals().cancelled().await;
            ExitCode::SUCCESS
        }
        Some(Sub::TunnelConnect { port, framed }) => {
            tether::cli::run_tunnel_connect(port, framed).await
        }
        Some(Sub::InferenceProbe { addr }) => tether::cli::run_inference_probe(addr).await,
        Some(Sub::InferencePull { addr, model }) => {
            tether::cli::run_inference_pull(addr, model).await
        }
        Some(Sub::InferenceStandin {
            listen,
            token_delay_ms,
        }) => tether::cli::run_inference_standin(listen, token_delay_ms, cli.log).await,
        None => tether::cli::run_agent(cli.agent, cli.log, cli.log_format).await,
    }
}
