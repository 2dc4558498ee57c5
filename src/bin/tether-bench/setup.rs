//! The system under test: a real server and a real agent in this process,
//! over a loopback WebSocket, driving the local Docker engine.

use crate::api::ApiClient;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tether::agent::{AgentConfig, AgentError};
use tether::server::{Hub, Server, ServerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct InProc {
    pub hub: Hub,
    /// Base URL of the server (`http://127.0.0.1:PORT`).
    pub url: String,
    pub psk: String,
    /// A client of the server's HTTP/WebSocket API, as `tether ctl`.
    pub api: ApiClient,
    /// Node id of the in-process agent (`test-bench-...`).
    pub node: String,
    server_stop: CancellationToken,
    agent_stop: CancellationToken,
    agent: Option<JoinHandle<Result<(), AgentError>>>,
    _agent_rt: RuntimeThread,
}

/// A fresh lowercase id.
pub fn ulid() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

impl InProc {
    pub async fn start(dir: &Path) -> anyhow::Result<InProc> {
        tether::init_crypto();
        let psk = format!("bench-psk-{}", ulid());
        let cfg = ServerConfig::new(
            "127.0.0.1:0".parse().expect("valid address"),
            psk.clone(),
            dir.join("server"),
        );
        let server = Server::bind(cfg).await.context("bind the server")?;
        let url = format!("http://{}", server.local_addr());
        let hub = server.hub();
        let api = ApiClient::start(url.clone(), server.admin_token().to_string())?;
        let server_stop = CancellationToken::new();
        tokio::spawn(server.serve(server_stop.clone()));
        let node = format!("test-bench-{}", ulid());
        let acfg = AgentConfig::new(
            url.parse().expect("valid URL"),
            psk.clone(),
            node.clone(),
            dir.join("agent"),
        );
        let agent_stop = CancellationToken::new();
        // The agent on a runtime of its own, one thread, as the agent binary
        // runs it (a process of its own in production).
        let agent_rt = RuntimeThread::start("agent")?;
        let agent = agent_rt
            .handle
            .spawn(tether::agent::run(acfg, agent_stop.clone()));
        let me = InProc {
            hub,
            url,
            psk,
            api,
            node,
            server_stop,
            agent_stop,
            agent: Some(agent),
            _agent_rt: agent_rt,
        };
        wait_online(&me.hub, &me.node, Duration::from_secs(60)).await?;
        Ok(me)
    }

    /// Stops the agent, then the server.
    pub async fn stop(&mut self) {
        self.agent_stop.cancel();
        if let Some(a) = self.agent.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
        }
        self.server_stop.cancel();
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.agent_stop.cancel();
        self.server_stop.cancel();
    }
}

/// A current-thread tokio runtime on a thread of its own, running what is
/// spawned on `handle` until dropped: for what runs in a process of its own
/// in production (the agent, `tether ctl`), so that it shares no worker
/// with the server.
pub struct RuntimeThread {
    pub handle: tokio::runtime::Handle,
    stop: CancellationToken,
}

impl RuntimeThread {
    pub fn start(name: &str) -> anyhow::Result<RuntimeThread> {
        let stop = CancellationToken::new();
        let until = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                let _ = tx.send(rt.handle().clone());
                rt.block_on(until.cancelled());
            })
            .with_context(|| format!("start the {name} thread"))?;
        let handle = rx
            .recv()
            .with_context(|| format!("the {name} thread's runtime did not start"))?;
        Ok(RuntimeThread { handle, stop })
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Waits until `node` is online in the hub.
pub async fn wait_online(hub: &Hub, node: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if hub
            .nodes()
            .iter()
            .any(|n| n.node_id == node && n.status == "online")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node {node} not online within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A scratch directory for state, removed by [`Scratch::drop`].
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> anyhow::Result<Scratch> {
        let p = std::env::temp_dir().join(format!("tether-bench-{}", ulid()));
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
