//! Figure 7: the server at scale. The server runs as its own process (so its
//! RSS and CPU are its own); a load generator here plays N agents that speak
//! the agent protocol with no Docker behind them: register with the
//! pre-shared key, open the WebSocket with the node JWT, `hello` (with one
//! fake worker in the inventory), read `welcome`, then answer pings,
//! `inspect` and `list_workers`, and ping when the server was silent for a
//! heartbeat interval (as the agent does).

use crate::figures::Params;
use crate::procfs;
use crate::stats::{Figure, median, p99};
use anyhow::{Context, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tether::protocol::Bootstrap;
use tether::protocol::{
    AGENT_CONNECT_PATH, ErrorCode, Hello, Message, PROOF_HEADER, PROTOCOL_VERSION, ProofPurpose,
    REGISTER_PATH, Request, SUBPROTOCOL, WorkerInfo,
};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{
    Message as WsMessage, client::IntoClientRequest, protocol::WebSocketConfig,
};
use tokio_util::sync::CancellationToken;

/// Connections opened at once while ramping up.
const RAMP_CONCURRENCY: usize = 64;
/// Source addresses the load generator spreads its connections over.
const SOURCES: u8 = 8;

pub(crate) struct ServerProc {
    pub(crate) child: tokio::process::Child,
    pub(crate) pid: u32,
    pub(crate) port: u16,
    pub(crate) admin: String,
}

async fn start_server(bin: &Path, dir: &Path, psk: &str) -> anyhow::Result<ServerProc> {
    start_server_as(bin, dir, psk, "server-proc", &[]).await
}

/// A server process named `name` (its state directory and log) with
/// `extra` arguments.
pub(crate) async fn start_server_as(
    bin: &Path,
    dir: &Path,
    psk: &str,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<ServerProc> {
    // A separate process needs a fixed port: take a free one.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let state = dir.join(name);
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = tokio::process::Command::new(bin)
        .args(["--log", "warn", "server", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(&state)
        .args(extra)
        .env("TETHER_PSK", psk)
        .env_remove("TETHER_PSK_FILE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let pid = child.id().context("server process id")?;
    let http = tether::http_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the server did not come up within 20 s (see {name}.log)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = std::fs::read_to_string(state.join("admin.token"))?
        .trim()
        .to_string();
    Ok(ServerProc {
        child,
        pid,
        port,
        admin,
    })
}

/// The simulated agents.
pub(crate) struct Fleet {
    /// The servers (replicas) agent `i` starts at `ports[i % len]`; one
    /// whose connection ends goes on to the next (a dead replica's agents
    /// move to the others).
    pub(crate) ports: Vec<u16>,
    psk: String,
    run: String,
    pub(crate) http: reqwest::Client,
    stop: CancellationToken,
    /// Connections currently up.
    pub(crate) live: Arc<AtomicUsize>,
    /// Connections currently up, by index in `ports`.
    pub(crate) live_at: Arc<Vec<AtomicUsize>>,
    tasks: Vec<JoinHandle<()>>,
    /// Worker id of each agent that registered.
    pub(crate) workers: Vec<String>,
    /// Index of this fleet's first agent (a fleet split over processes).
    first: usize,
}

/// A fake worker, built from JSON so that fields added to `WorkerInfo`
/// later (all optional) need no change here.
fn fake_worker(node: &str, worker_id: &str) -> WorkerInfo {
    serde_json::from_value(json!({
        "worker_id": worker_id,
        "node_id": node,
        "image": "bench/simulated",
        "container_id": format!("sim-{worker_id}"),
        "network": format!("tether-{worker_id}"),
        "state": "running",
        "created_at": "2025-01-01T00:00:00Z",
    }))
    .expect("a valid WorkerInfo")
}

impl Fleet {
    pub(crate) fn new(ports: Vec<u16>, psk: &str, run: &str) -> Fleet {
        let live_at = Arc::new(ports.iter().map(|_| AtomicUsize::new(0)).collect());
        Fleet {
            ports,
            psk: psk.to_string(),
            run: run.chars().rev().take(8).collect(),
            http: tether::http_client(),
            stop: CancellationToken::new(),
            live: Arc::new(AtomicUsize::new(0)),
            live_at,
            tasks: Vec::new(),
            workers: Vec::new(),
            first: 0,
        }
    }

    /// A fleet whose agents are numbered from `first`.
    pub(crate) fn starting_at(self, first: usize) -> Fleet {
        Fleet { first, ..self }
    }

    /// Registers agent `i` and connects it; returns its worker id and the
    /// task that serves its connection (and makes it again elsewhere when
    /// it ends).
    async fn connect(&self, i: usize) -> anyhow::Result<(String, JoinHandle<()>)> {
        let node = format!("test-bench-sim-{}-{i}", self.run);
        let at = i % self.ports.len();
        let base = format!("http://127.0.0.1:{}", self.ports[at]);
        let key = tether::agent::identity::NodeKey::generate();
        let resp = self
            .http
            .post(format!("{base}{REGISTER_PATH}"))
            .bearer_auth(&self.psk)
            .json(&json!({
                "node_id": node,
                "public_key": key.public_key(),
                "proof": key.proof(ProofPurpose::Register, &node),
            }))
            .send()
            .await
            .context("register")?;
        ensure!(
            resp.status().is_success(),
            "register: HTTP {}",
            resp.status()
        );
        let boot: Bootstrap = resp.json().await.context("bootstrap payload")?;
        // As the server names a spawned worker: a lower-case ULID.
        let worker_id = ulid::Ulid::new().to_string().to_ascii_lowercase();
        let sim = Sim {
            i,
            node,
            key,
            jwt: boot.auth.node_jwt,
            worker: fake_worker_of(&worker_id, i, &self.run),
        };
        let (ws, interval) = sim.open(self.ports[at]).await?;
        let task = tokio::spawn(sim.run(
            ws,
            interval,
            at,
            self.ports.clone(),
            self.stop.clone(),
            self.live.clone(),
            self.live_at.clone(),
        ));
        Ok((worker_id, task))
    }

    /// Brings the fleet up to `target` connected agents. Stops early after
    /// repeated failures; returns the first error if it did.
    pub(crate) async fn grow(&mut self, target: usize) -> Option<String> {
        let start = self.first + self.workers.len();
        let this = &*self;
        let mut attempts = futures_util::stream::iter(start..target)
            .map(|i| async move { this.connect(i).await })
            .buffer_unordered(RAMP_CONCURRENCY);
        let mut made = Vec::new();
        let mut failures = 0;
        let mut first_error = None;
        while let Some(r) = attempts.next().await {
            match r {
                Ok(x) => made.push(x),
                Err(e) => {
                    failures += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                    if failures >= 20 {
                        break;
                    }
                }
            }
        }
        drop(attempts);
        for (w, t) in made {
            self.workers.push(w);
            self.tasks.push(t);
        }
        first_error
    }

    pub(crate) async fn shutdown(&mut self) {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

fn fake_worker_of(worker_id: &str, i: usize, run: &str) -> WorkerInfo {
    fake_worker(&format!("test-bench-sim-{run}-{i}"), worker_id)
}

/// One simulated agent: its identity, token and worker.
struct Sim {
    i: usize,
    node: String,
    key: tether::agent::identity::NodeKey,
    jwt: String,
    worker: WorkerInfo,
}

impl Sim {
    /// Opens the agent WebSocket at `port`, says `hello`, reads `welcome`:
    /// the socket and the heartbeat interval.
    async fn open(&self, port: u16) -> anyhow::Result<(Ws, Duration)> {
        let src = Ipv4Addr::new(127, 0, 0, 2 + (self.i % SOURCES as usize) as u8);
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(src.into(), 0))
            .with_context(|| format!("bind {src}"))?;
        let dst: SocketAddr = ([127, 0, 0, 1], port).into();
        let stream = sock.connect(dst).await.context("connect")?;
        stream.set_nodelay(true)?;
        let mut req = format!("ws://127.0.0.1:{port}{AGENT_CONNECT_PATH}").into_client_request()?;
        let h = req.headers_mut();
        h.insert("authorization", format!("Bearer {}", self.jwt).parse()?);
        h.insert("sec-websocket-protocol", SUBPROTOCOL.parse()?);
        h.insert(
            PROOF_HEADER,
            self.key.proof(ProofPurpose::Connect, &self.node).parse()?,
        );
        let cfg = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(cfg))
            .await
            .context("WebSocket handshake")?;
        // From JSON too: later optional fields of `hello` need no change here.
        let hello: Hello = serde_json::from_value(json!({
            "versions": [PROTOCOL_VERSION],
            "node_id": self.node,
            "agent_version": "bench-simulated",
            "inventory": [self.worker],
        }))?;
        ws.send(WsMessage::text(Message::Hello(hello).encode()))
            .await?;
        let welcome = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Text(t))) => return Ok(t.to_string()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("before welcome: {e}"),
                    None => bail!("closed before welcome"),
                }
            }
        })
        .await
        .context("no welcome within 15 s")??;
        let interval = match Message::decode(&welcome) {
            Ok(Message::Welcome(w)) => Duration::from_secs(w.heartbeat_interval_secs.max(1)),
            other => bail!("expected welcome, got {other:?}"),
        };
        Ok((ws, interval))
    }

    /// Serves the connection; when it ends (not stopped), connects again at
    /// the next server, as an agent given several replicas does.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        self,
        mut ws: Ws,
        mut interval: Duration,
        mut at: usize,
        ports: Vec<u16>,
        stop: CancellationToken,
        live: Arc<AtomicUsize>,
        live_at: Arc<Vec<AtomicUsize>>,
    ) {
        let payload = serde_json::to_value(&self.worker).expect("a worker serializes");
        loop {
            // Spread the pings of the fleet over the interval.
            let offset =
                Duration::from_millis((self.i as u64 * 7919) % interval.as_millis().max(1) as u64);
            live_at[at].fetch_add(1, Ordering::SeqCst);
            serve(
                ws,
                payload.clone(),
                interval,
                offset,
                stop.clone(),
                live.clone(),
            )
            .await;
            live_at[at].fetch_sub(1, Ordering::SeqCst);
            loop {
                if stop.is_cancelled() {
                    return;
                }
                at = (at + 1) % ports.len();
                match self.open(ports[at]).await {
                    Ok((w, i)) => {
                        (ws, interval) = (w, i);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    }
}

/// One simulated agent's connection.
async fn serve(
    mut ws: Ws,
    worker: Value,
    interval: Duration,
    offset: Duration,
    stop: CancellationToken,
    live: Arc<AtomicUsize>,
) {
    live.fetch_add(1, Ordering::SeqCst);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // As the real agent: ping only after a whole interval without a word
    // from the server (whose pings keep the link alive).
    let mut last_rx = tokio::time::Instant::now();
    loop {
        tokio::select! {
            m = ws.next() => {
                last_rx = tokio::time::Instant::now();
                match m {
                    Some(Ok(WsMessage::Text(t))) => {
                        let Ok(Message::Request { id, request }) = Message::decode(t.as_str()) else {
                            continue;
                        };
                        let reply = match request {
                            Request::Inspect(_) => Message::Result { id, payload: worker.clone() },
                            Request::ListWorkers(_) => Message::Result {
                                id,
                                payload: json!({ "workers": [worker.clone()] }),
                            },
                            other => Message::error(
                                Some(id),
                                ErrorCode::Unsupported,
                                format!("simulated agent: no {}", other.kind()),
                            ),
                        };
                        if ws.send(WsMessage::text(reply.encode())).await.is_err() {
                            break;
                        }
                    }
                    // Pings are answered by tungstenite as the stream is read.
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                }
            }
            _ = tick.tick() => {
                if last_rx.elapsed() >= interval
                    && ws.send(WsMessage::Ping(Default::default())).await.is_err()
                {
                    break;
                }
            }
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
                break;
            }
        }
    }
    live.fetch_sub(1, Ordering::SeqCst);
}

/// Sequential `GET /api/v1/workers/{id}` (the server forwards an `inspect`
/// to the worker's agent): latencies in ms.
pub(crate) async fn dispatch(
    http: &reqwest::Client,
    port: u16,
    admin: &str,
    workers: &[String],
    samples: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(samples);
    let warmup = 50;
    for k in 0..warmup + samples {
        let w = &workers[(k * 7919) % workers.len()];
        let t0 = Instant::now();
        let resp = http
            .get(format!("http://127.0.0.1:{port}/api/v1/workers/{w}"))
            .bearer_auth(admin)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        let dt = t0.elapsed();
        ensure!(
            status.is_success() && body["worker_id"] == w.as_str(),
            "inspect {w}: HTTP {status}: {body}"
        );
        if k >= warmup {
            lat.push(dt.as_secs_f64() * 1000.0);
        }
    }
    Ok(lat)
}

/// Runs the scale figures for each step of `p.scale_steps` (capped by
/// `max_agents` and by the open-file limit).
pub async fn run(
    p: &Params,
    bin: &Path,
    dir: &Path,
    run: &str,
    max_agents: Option<usize>,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Figure>> {
    let psk = format!("bench-psk-{run}");
    let mut server = start_server(bin, dir, &psk).await?;
    let r = measure(p, &server, &psk, run, max_agents, notes).await;
    let _ = server.child.kill().await;
    r
}

async fn measure(
    p: &Params,
    server: &ServerProc,
    psk: &str,
    run: &str,
    max_agents: Option<usize>,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Figure>> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = procfs::rss_kib(server.pid)?;
    let tick = procfs::clock_ticks() as f64;
    let mut nominal: Vec<usize> = p.scale_steps.clone();
    if let Some(m) = max_agents {
        nominal.retain(|&s| s <= m);
        if nominal.is_empty() {
            nominal.push(m);
        }
    }
    // (name, agents to aim for): each connection is one descriptor here (the
    // server process has its own limit).
    let mut steps: Vec<(usize, usize)> = nominal.iter().map(|&s| (s, s)).collect();
    if let Some(limit) = procfs::nofile_limit() {
        let room = limit.saturating_sub(256) as usize;
        if steps.iter().any(|&(s, _)| s > room) {
            notes.push(format!(
                "scale: open-file limit {limit} allows about {room} agent connections here; steps above it are capped (raise `ulimit -n`)"
            ));
            for s in &mut steps {
                s.1 = s.1.min(room);
            }
        }
    }
    let mut fleet = Fleet::new(vec![server.port], psk, run);
    let r = measure_steps(p, server, &mut fleet, &steps, rss0, tick, notes).await;
    fleet.shutdown().await;
    r
}

async fn measure_steps(
    p: &Params,
    server: &ServerProc,
    fleet: &mut Fleet,
    steps: &[(usize, usize)],
    rss0: u64,
    tick: f64,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut reached = 0;
    for &(name, target) in steps {
        let t0 = Instant::now();
        let err = fleet.grow(target).await;
        let ramp = t0.elapsed();
        // Let the server settle, then check who is still up.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let n = fleet.live.load(Ordering::SeqCst);
        reached = n;
        if let Some(e) = &err {
            notes.push(format!(
                "scale: aimed for {target} agents, {n} connected; first error: {e}"
            ));
        }
        if n == 0 {
            bail!(
                "no simulated agent could connect: {}",
                err.unwrap_or_default()
            );
        }
        let rss = procfs::rss_kib(server.pid)?;
        // KB = 1000 bytes; /proc counts KiB.
        let per_agent = (rss.saturating_sub(rss0) as f64 * 1024.0 / 1000.0) / n as f64;
        let c0 = procfs::cpu_ticks(server.pid)?;
        // One heartbeat interval or more: every agent pinged once.
        let idle_window = Duration::from_secs(10);
        tokio::time::sleep(idle_window).await;
        let c1 = procfs::cpu_ticks(server.pid)?;
        let cpu_pct = (c1 - c0) as f64 / tick / idle_window.as_secs_f64() * 100.0;
        let lat = dispatch(
            &fleet.http,
            server.port,
            &server.admin,
            &fleet.workers,
            p.dispatch_samples,
        )
        .await?;
        notes.push(format!(
            "scale: {n} agents connected in {:.1} s; server RSS {:.1} MB before, {:.1} MB with them; idle CPU {cpu_pct:.1}% of one core",
            ramp.as_secs_f64(),
            rss0 as f64 * 1024.0 / 1e6,
            rss as f64 * 1024.0 / 1e6
        ));
        figures.push(Figure::solo(
            &format!("server_rss_kb_per_agent_{name}"),
            "KB",
            Some(per_agent),
        ));
        figures.push(Figure::solo(
            &format!("server_dispatch_p50_ms_{name}"),
            "ms",
            median(&lat),
        ));
        figures.push(Figure::solo(
            &format!("server_dispatch_p99_ms_{name}"),
            "ms",
            p99(&lat),
        ));
        figures.push(Figure::solo(
            &format!("server_idle_cpu_pct_{name}"),
            "% of a core",
            Some(cpu_pct),
        ));
        if n < target {
            break;
        }
    }
    figures.push(Figure::solo(
        "server_agents_reached",
        "agents",
        Some(reached as f64),
    ));
    Ok(figures)
}
