//! Test harness: a real server and agents in-process on 127.0.0.1:0 against
//! the real Docker engine. Everything a test creates carries the node id of
//! its agents (`test-...`), and is removed when the harness drops, even when
//! the test fails.
#![allow(dead_code)]

pub mod mcp;
pub mod postgres;
pub mod proxy;

use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether::agent::AgentConfig;
use tether::server::{Hub, Server, ServerConfig};
use tokio_util::sync::CancellationToken;

pub const PSK: &str = "test-registration-key-0123456789";

pub fn image() -> String {
    std::env::var("TETHER_TEST_IMAGE").unwrap_or_else(|_| "tether-test-busybox:latest".into())
}

/// Builds the sandbox test image once per process (the script skips an
/// existing image).
pub fn ensure_image() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let root = env!("CARGO_MANIFEST_DIR");
        let st = std::process::Command::new("bash")
            .arg(format!("{root}/scripts/build-test-image.sh"))
            .status()
            .expect("run build-test-image.sh");
        assert!(st.success(), "building the test image failed");
    });
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        ulid::Ulid::new().to_string().to_ascii_lowercase()
    )
}

/// Removes every container and network labelled with `node_id`, and the
/// node's nftables guard (an agent killed with SIGKILL cannot).
pub fn docker_cleanup(node_id: &str) {
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "inet", &format!("tether-{node_id}")])
        .stderr(std::process::Stdio::null())
        .status();
    let filter = format!("label=tether.node_id={node_id}");
    let ids = docker(&["ps", "-aq", "--filter", &filter]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        docker(&args);
    }
    let nets = docker(&["network", "ls", "-q", "--filter", &filter]);
    for n in nets.split_whitespace() {
        docker(&["network", "rm", n]);
    }
    let vols = docker(&["volume", "ls", "-q", "--filter", &filter]);
    for v in vols.split_whitespace() {
        docker(&["volume", "rm", "-f", v]);
    }
}

/// Runs the docker CLI; returns stdout and stderr together.
pub fn docker_all(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the docker CLI; returns stdout (trimmed).
pub fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub struct Harness {
    pub addr: std::net::SocketAddr,
    pub url: String,
    pub token: String,
    pub hub: Hub,
    pub dir: tempfile::TempDir,
    pub nodes: Arc<Mutex<Vec<String>>>,
    shutdown: CancellationToken,
    server_stop: CancellationToken,
    agents: Vec<tokio::task::JoinHandle<Result<(), tether::agent::AgentError>>>,
}

impl Harness {
    /// A server with no agent.
    pub async fn server() -> Harness {
        Harness::server_with(|_| {}).await
    }

    /// A server whose configuration `tweak` adjusts.
    pub async fn server_with(tweak: impl FnOnce(&mut ServerConfig)) -> Harness {
        ensure_image();
        tether::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            PSK.into(),
            dir.path().join("server"),
        );
        cfg.heartbeat_interval = Duration::from_secs(2);
        cfg.heartbeat_timeout = Duration::from_secs(6);
        tweak(&mut cfg);
        let server = Server::bind(cfg).await.unwrap();
        let addr = server.local_addr();
        let url = format!("http://{addr}");
        let token = server.admin_token().to_string();
        let hub = server.hub();
        let server_stop = CancellationToken::new();
        tokio::spawn(server.serve(server_stop.clone()));
        Harness {
            addr,
            url,
            token,
            hub,
            dir,
            nodes: Arc::new(Mutex::new(Vec::new())),
            shutdown: CancellationToken::new(),
            server_stop,
            agents: Vec::new(),
        }
    }

    /// A server and one in-process agent, online.
    pub async fn start() -> (Harness, String) {
        let mut h = Harness::server().await;
        let node = h.add_agent().await;
        (h, node)
    }

    pub fn agent_config(&self, node_id: &str) -> AgentConfig {
        let mut cfg = AgentConfig::new(
            self.url.parse().unwrap(),
            PSK.into(),
            node_id.into(),
            self.dir.path().join(node_id),
        );
        cfg.heartbeat_timeout = Duration::from_secs(6);
        cfg
    }

    /// Starts an agent in this process and waits until it is online.
    pub async fn add_agent(&mut self) -> String {
        let cfg = self.agent_config(&unique("test"));
        self.add_agent_with(cfg).await
    }

    /// Starts an agent with `cfg` and waits until it is online.
    pub async fn add_agent_with(&mut self, cfg: AgentConfig) -> String {
        let node = cfg.node_id.clone();
        self.track(&node);
        self.agents
            .push(tokio::spawn(tether::agent::run(cfg, self.shutdown.clone())));
        self.wait_status(&node, "online").await;
        node
    }

    pub fn track(&self, node: &str) {
        self.nodes.lock().unwrap().push(node.to_string());
    }

    pub async fn wait_status(&self, node: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .hub
                .nodes()
                .iter()
                .any(|n| n.node_id == node && n.status == status)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} not {status} within 60 s: {:?}",
                self.hub.nodes()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `tether ctl ARGS` against this server.
    pub async fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_stdin(args, None).await
    }

    pub async fn ctl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.ctl_as(&self.token, args, stdin).await
    }

    /// Runs `tether ctl ARGS` with operator token `token`.
    pub async fn ctl_as(&self, token: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.arg("ctl")
            .args(args)
            .env("TETHER_SERVER", &self.url)
            .env("TETHER_TOKEN", token)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tether ctl");
        // Fed while the output is read: a command may echo its input.
        let feed = stdin.map(|data| {
            let mut si = child.stdin.take().unwrap();
            let data = data.to_vec();
            tokio::spawn(async move {
                let _ = si.write_all(&data).await;
            })
        });
        let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
            .await
            .expect("tether ctl finished within 180 s")
            .unwrap();
        if let Some(f) = feed {
            f.await.unwrap();
        }
        out
    }

    /// `tether ctl ARGS` left running, its stdout piped (killed when
    /// dropped).
    pub fn ctl_running(&self, args: &[&str]) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("ctl")
            .args(args)
            .env("TETHER_SERVER", &self.url)
            .env("TETHER_TOKEN", &self.token)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tether ctl")
    }

    /// `ctl ARGS`, asserting success; returns stdout.
    pub async fn ctl_ok(&self, args: &[&str]) -> String {
        self.ctl_ok_as(&self.token, args).await
    }

    /// `ctl ARGS` as `token`, asserting success; returns stdout.
    pub async fn ctl_ok_as(&self, token: &str, args: &[&str]) -> String {
        let out = self.ctl_as(token, args, None).await;
        assert!(
            out.status.success(),
            "tether ctl {args:?} failed ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Writes Compose file `text` in the state directory and runs
    /// `ctl deploy up -f FILE --name NAME` as `token`.
    pub async fn deploy_up_as(&self, token: &str, text: &str, name: &str) -> Output {
        let file = self.state_path(&format!("{name}.yaml"));
        std::fs::write(&file, text).unwrap();
        let file = file.to_str().unwrap();
        let args = ["deploy", "up", "-f", file, "--name", name];
        self.ctl_as(token, &args, None).await
    }

    /// `ctl spawn` of a worker that sleeps for an hour; returns its id.
    pub async fn ctl_spawn_sleeper(&self) -> String {
        let img = image();
        self.ctl_ok(&["spawn", "--image", &img, "--", "sleep", "3600"])
            .await
            .trim()
            .to_string()
    }

    /// `tether ctl spawn` of a worker running `sh -c SCRIPT`; its id.
    #[allow(dead_code)]
    pub async fn ctl_spawn_sh(&self, script: &str) -> String {
        let img = image();
        self.ctl_ok(&["spawn", "--image", &img, "--", "sh", "-c", script])
            .await
            .trim()
            .to_string()
    }

    pub fn state_path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Stops the server and starts another on the same address and state
    /// directory (its agents connect to it again), as after a restart: the
    /// new server knows only what its store kept and what agents report.
    pub async fn restart_server(&mut self) {
        self.server_stop.cancel();
        let deadline = Instant::now() + Duration::from_secs(10);
        let server = loop {
            let mut cfg = ServerConfig::new(self.addr, PSK.into(), self.dir.path().join("server"));
            cfg.heartbeat_interval = Duration::from_secs(2);
            cfg.heartbeat_timeout = Duration::from_secs(6);
            match Server::bind(cfg).await {
                Ok(s) => break s,
                // The old one may still hold the port for a moment.
                Err(e) => {
                    assert!(Instant::now() < deadline, "restart: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert_eq!(
            server.admin_token(),
            self.token,
            "the store kept the admin token"
        );
        self.hub = server.hub();
        self.server_stop = CancellationToken::new();
        tokio::spawn(server.serve(self.server_stop.clone()));
    }

    /// Stops the agents and the server, then removes what they created.
    pub async fn stop(mut self) {
        self.stop_agents().await;
        self.server_stop.cancel();
    }

    /// Stops the in-process agents as a shutdown would (their workers run
    /// on), keeping the server and what the harness cleans up on drop.
    pub async fn stop_agents(&mut self) {
        self.shutdown.cancel();
        for a in self.agents.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.server_stop.cancel();
        for n in self.nodes.lock().unwrap().iter() {
            docker_cleanup(n);
        }
    }
}

/// `tether ctl port-forward WORKER SPEC` running, and the local address it
/// printed.
pub async fn port_forward(h: &Harness, w: &str, spec: &str) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = h.ctl_running(&["port-forward", w, spec]);
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("port-forward printed its address")
        .unwrap()
        .expect("a line");
    // "Forwarding from 127.0.0.1:PORT -> REMOTE"
    let addr = line
        .split_whitespace()
        .nth(2)
        .expect("an address")
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{line}");
    (child, addr)
}

/// Builds the agent image from the Dockerfile around the test binary.
pub fn build_agent_image(tag: &str) {
    let st = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/build-agent-image.sh"
        ))
        .args([
            "--binary",
            env!("CARGO_BIN_EXE_tether-agent"),
            "--tag",
            tag,
            "--label",
            "tether.test=1",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "building the agent image failed");
}

/// Builds image `tag` from `dockerfile` (given on standard input: no
/// context, so it can only build on images that are there).
pub fn build_image_from(tag: &str, dockerfile: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("docker")
        .args(["build", "-q", "-t", tag, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "building image {tag}");
}

/// Runs the agent image the way users do: the Docker socket mounted,
/// configured by environment, in the host's network namespace with
/// NET_ADMIN (it installs the nftables guard of its workers there).
/// Returns the container id (empty if `docker run` failed).
pub fn run_agent_container(name: &str, tag: &str, server_url: &str, node: &str) -> String {
    docker(&[
        "run",
        "-d",
        "--name",
        name,
        "--label",
        "tether.test=1",
        "--network",
        "host",
        "--cap-add",
        "NET_ADMIN",
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-e",
        &format!("TETHER_SERVER={server_url}"),
        "-e",
        &format!("TETHER_PSK={PSK}"),
        "-e",
        &format!("TETHER_NODE_ID={node}"),
        tag,
    ])
}

/// Removes what a node made (`docker_cleanup`) when dropped, even when
/// the test fails.
pub struct NodeGuard(pub String);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        docker_cleanup(&self.0);
    }
}

/// A loopback port nobody listens on (for a server started after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A node driven by hand over the wire (no Docker): registers with its own
/// key and opens raw agent connections, for tests that play an impostor or
/// send what a real agent never would.
pub mod fake {
    use super::Harness;
    use tether::agent::identity::NodeKey;
    use tether::protocol::{PROOF_HEADER, ProofPurpose};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    pub type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// `POST /api/v1/register` for `node` with `key`.
    pub async fn register(h: &Harness, node: &str, psk: &str, key: &NodeKey) -> reqwest::Response {
        tether::http_client()
            .post(format!("{}/api/v1/register", h.url))
            .bearer_auth(psk)
            .json(&serde_json::json!({
                "node_id": node,
                "public_key": key.public_key(),
                "proof": key.proof(ProofPurpose::Register, node),
            }))
            .send()
            .await
            .unwrap()
    }

    /// Registers and returns the node token.
    pub async fn token(h: &Harness, node: &str, key: &NodeKey) -> String {
        let resp = register(h, node, super::PSK, key).await;
        assert!(
            resp.status().is_success(),
            "registration: {}",
            resp.status()
        );
        let v: serde_json::Value = resp.json().await.unwrap();
        v["auth"]["node_jwt"].as_str().unwrap().to_string()
    }

    /// Opens the agent WebSocket with `jwt` and, if given, a proof by `key`.
    pub async fn connect(
        h: &Harness,
        jwt: &str,
        node: &str,
        key: Option<&NodeKey>,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let proof = key.map(|k| k.proof(ProofPurpose::Connect, node));
        connect_with(upgrade(h, jwt, proof.as_deref())).await
    }

    /// The agent WebSocket's upgrade request with `jwt` and `proof` (sent
    /// twice, it is a captured request replayed).
    pub fn upgrade(
        h: &Harness,
        jwt: &str,
        proof: Option<&str>,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        let mut req = format!("{}/api/agent/connect", h.url.replace("http", "ws"))
            .into_client_request()
            .unwrap();
        let hs = req.headers_mut();
        hs.insert("authorization", format!("Bearer {jwt}").parse().unwrap());
        hs.insert("sec-websocket-protocol", "tether.v1".parse().unwrap());
        if let Some(proof) = proof {
            hs.insert(PROOF_HEADER, proof.parse().unwrap());
        }
        req
    }

    /// Sends an upgrade request.
    pub async fn connect_with(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        tokio_tungstenite::connect_async(req)
            .await
            .map(|(ws, _)| ws)
    }

    /// Registers `node` with `psk` and `key`: its node token.
    pub async fn registered(h: &Harness, node: &str, psk: &str, key: &NodeKey) -> String {
        let resp = register(h, node, psk, key).await;
        assert!(resp.status().is_success(), "{}", resp.status());
        let v: serde_json::Value = resp.json().await.unwrap();
        v["auth"]["node_jwt"].as_str().unwrap().to_string()
    }

    /// Connects as `node` and says hello with `inventory`; returns the
    /// connection once the node is online.
    pub async fn hello(
        h: &Harness,
        node: &str,
        jwt: &str,
        key: &NodeKey,
        inventory: serde_json::Value,
    ) -> Client {
        use futures_util::SinkExt;
        let mut ws = connect(h, jwt, node, Some(key)).await.unwrap();
        let hello = serde_json::json!({"type": "hello", "payload": {
            "versions": [1], "node_id": node, "agent_version": "fake",
            "inventory": inventory,
        }});
        ws.send(tokio_tungstenite::tungstenite::Message::text(
            hello.to_string(),
        ))
        .await
        .unwrap();
        h.wait_status(node, "online").await;
        ws
    }

    /// The HTTP status of a refused connection attempt.
    /// Sends a `hello` as `node` with an empty inventory.
    async fn say_hello(ws: &mut Client, node: &str) {
        use futures_util::SinkExt;
        let hello = serde_json::json!({"type": "hello", "payload": {
            "versions": [1], "node_id": node, "agent_version": "fake", "inventory": [],
        }});
        ws.send(tokio_tungstenite::tungstenite::Message::text(
            hello.to_string(),
        ))
        .await
        .unwrap();
    }

    /// Says hello as `node` on `ws` and reads the server's `welcome`: the
    /// session is up (its proof recorded with every replica).
    pub async fn welcomed(mut ws: Client, node: &str) -> Client {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        say_hello(&mut ws, node).await;
        let read = async {
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Text(t)) if t.contains("\"welcome\"") => return,
                    Ok(Message::Close(f)) => panic!("closed before welcome: {f:?}"),
                    Ok(_) => continue,
                    Err(e) => panic!("the connection failed before welcome: {e}"),
                }
            }
            panic!("the connection ended before welcome")
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), read)
            .await
            .expect("a welcome within 20 s");
        ws
    }

    /// Says hello as `node` on `ws` and reads to the server's close: its
    /// code and reason (a refusal that comes after the upgrade).
    pub async fn closed_after_hello(mut ws: Client, node: &str) -> (u16, String) {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        say_hello(&mut ws, node).await;
        let read = async {
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Close(Some(f))) => {
                        return (u16::from(f.code), f.reason.to_string());
                    }
                    Ok(Message::Close(None)) => return (1005, String::new()),
                    Ok(Message::Text(t)) => panic!("the session went on: {t}"),
                    Ok(_) => continue,
                    Err(e) => panic!("the connection failed without a close: {e}"),
                }
            }
            panic!("the connection ended without a close")
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), read)
            .await
            .expect("a close within 20 s")
    }

    pub fn refused_status(r: Result<Client, tokio_tungstenite::tungstenite::Error>) -> u16 {
        match r {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("connection failed without an HTTP refusal: {e}"),
            Ok(_) => panic!("connection accepted"),
        }
    }
}

/// Calls an MCP tool through the official client (`rmcp`) with `token`;
/// a tool error comes back as its text.
#[allow(dead_code)]
pub async fn mcp_call(
    url: &str,
    token: &str,
    tool: &str,
    args: serde_json::Value,
) -> Result<serde_json::Value, String> {
    use rmcp::ServiceExt;
    use rmcp::model::CallToolRequestParams;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let cfg =
        StreamableHttpClientTransportConfig::with_uri(format!("{url}/mcp")).auth_header(token);
    let client =
        ().serve(StreamableHttpClientTransport::from_config(cfg))
            .await
            .map_err(|e| format!("MCP initialize: {e}"))?;
    let params = CallToolRequestParams::new(tool.to_string())
        .with_arguments(args.as_object().cloned().unwrap_or_default());
    let r = client.call_tool(params).await;
    let _ = client.cancel().await;
    let r = r.map_err(|e| format!("MCP call: {e}"))?;
    if r.is_error == Some(true) {
        return Err(serde_json::to_string(&r.content).unwrap());
    }
    Ok(r.structured_content.unwrap_or_default())
}

/// A worker running `sh -c SCRIPT`; its id.
#[allow(dead_code)]
pub async fn worker(h: &Harness, script: &str) -> String {
    h.hub
        .spawn(tether::protocol::SpawnRequest {
            image: image(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .worker_id
}

/// A tunnel to `port`, once something listens there.
#[allow(dead_code)]
pub async fn tunnel(hub: &tether::server::Hub, w: &str, port: u16) -> tether::server::Duplex {
    for _ in 0..100 {
        match hub.tunnel(w, port).await {
            Ok(t) => return t,
            Err(e) if e.code == tether::protocol::ErrorCode::ConnectionRefused => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => panic!("tunnel to {w}:{port}: {e}"),
        }
    }
    panic!("nothing listened on {w}:{port} within 10 s");
}

/// A connection to an echo (`nc -l -p PORT -e cat` in a loop) at `addr`,
/// once it answers: `nc` listens again a moment after each connection.
#[allow(dead_code)]
pub async fn echo_connection(addr: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        if let Ok(Ok(1)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut one)).await
        {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("no echo at {addr}");
}

/// A private CA and a server certificate it signed for `name`: the CA's
/// PEM, the certificate's PEM and DER, and its key's PEM.
#[allow(dead_code)]
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_pem: String,
}

#[allow(dead_code)]
pub fn test_pki(name: &str) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf.pem(),
        cert_der: leaf.der().to_vec(),
        key_pem: leaf_key.serialize_pem(),
    }
}
