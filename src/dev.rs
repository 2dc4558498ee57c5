//! `tether dev`: the server and one agent in one process on loopback, against
//! the local Docker engine. The first thing a new user runs.

use crate::agent::{self, AgentConfig};
use crate::server::{Server, ServerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
}

/// Options of `tether dev`.
#[derive(Debug, Clone)]
pub struct DevConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub node_id: String,
    pub docker_socket: Option<String>,
}

/// Runs server and agent until `shutdown`.
pub async fn run(cfg: DevConfig, shutdown: CancellationToken) -> Result<(), DevError> {
    let psk = crate::server::auth::random_secret(32);
    let server = Server::bind(ServerConfig::new(
        cfg.listen,
        psk.clone(),
        cfg.state_dir.join("server"),
    ))
    .await?;
    let addr = server.local_addr();
    // The local node's tools are on /mcp from the start.
    server.allow_mcp_node(&cfg.node_id, true)?;
    let token_path = cfg.state_dir.join("admin.token");
    crate::private_file::write(&token_path, server.admin_token()).map_err(|source| {
        crate::server::ServerError::State {
            path: token_path.clone(),
            source,
        }
    })?;
    let url: url::Url = format!("http://{addr}")
        .parse()
        .expect("valid loopback URL");
    eprintln!(
        "tether dev: server on {url}, one agent (node {}) on the local Docker engine",
        cfg.node_id
    );
    eprintln!("Point tether ctl at it:");
    eprintln!(
        "  export TETHER_SERVER={url} TETHER_TOKEN=$(cat {})",
        token_path.display()
    );
    eprintln!("  tether ctl nodes");
    let mut acfg = AgentConfig::new(url, psk, cfg.node_id.clone(), cfg.state_dir.join("agent"));
    acfg.docker_socket = cfg.docker_socket;
    let server_stop = CancellationToken::new();
    let agent_stop = shutdown.clone();
    let srv = tokio::spawn(server.serve(server_stop.clone()));
    let agent_result = agent::run(acfg, agent_stop).await;
    // Agent first (it closes its connection cleanly), then the server.
    server_stop.cancel();
    let server_result = srv.await.expect("server task does not panic");
    agent_result?;
    server_result?;
    Ok(())
}
