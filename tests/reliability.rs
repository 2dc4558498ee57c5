//! Reliability across faults: cuts, black holes, replays and agent restarts,
//! through a TCP proxy the test controls.

mod common;
use common::proxy::Proxy;
use common::*;
use sha2::Digest;
use std::time::{Duration, Instant};
use tether::protocol::{SpawnRequest, StreamKind};
use tether::server::{ExecOptions, StreamEvent};

fn sleeper(img: &str) -> SpawnRequest {
    SpawnRequest {
        image: img.into(),
        cmd: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    }
}

/// Starts `sh -c SCRIPT` in a worker through the hub.
async fn sh_exec(h: &Harness, worker_id: &str, script: &str) -> tether::server::Duplex {
    h.hub
        .exec(
            worker_id,
            ExecOptions {
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

/// Reads an exec's stdout to the end, handing each chunk to `each`; anything
/// else (stderr, a gap, an error) fails the test. Returns the exit code.
async fn read_stdout(
    output: &mut tether::server::ChannelStream,
    mut each: impl FnMut(&[u8]),
) -> Option<i64> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), output.next())
            .await
            .expect("output keeps coming")
            .unwrap();
        match ev {
            StreamEvent::Data(StreamKind::Stdout, b) => each(&b),
            StreamEvent::Data(k, b) => panic!("unexpected {k:?}: {}", String::from_utf8_lossy(&b)),
            StreamEvent::Gap(n) => panic!("{n} bytes lost"),
            StreamEvent::Eof => panic!("an exec reports no separate end of data"),
            StreamEvent::End { exit_code, error } => {
                assert!(error.is_none(), "{error:?}");
                return exit_code;
            }
        }
    }
}

/// A server and one agent that reaches it through a proxy.
async fn proxied() -> (Harness, String, std::sync::Arc<Proxy>) {
    proxied_with(|_| {}).await
}

async fn proxied_with(
    tweak: impl FnOnce(&mut tether::agent::AgentConfig),
) -> (Harness, String, std::sync::Arc<Proxy>) {
    let mut h = Harness::server().await;
    let proxy = Proxy::start(h.addr).await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.server = format!("http://{}", proxy.addr).parse().unwrap();
    tweak(&mut cfg);
    let node = h.add_agent_with(cfg).await;
    (h, node, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_survive_repeated_cuts_byte_exact() {
    let (h, node, proxy) = proxied().await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    const SIZE: u64 = 50_000_000;
    let cmd = format!(
        "head -c {SIZE} /dev/urandom > /tmp/src.bin && sha256sum /tmp/src.bin > /tmp/src.sha && cat /tmp/src.bin"
    );
    let mut s = sh_exec(&h, &w.worker_id, &cmd).await;
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    let mut cuts_at = vec![8_000_000u64, 20_000_000, 33_000_000, 45_000_000];
    let mut cuts = 0;
    let exit = read_stdout(&mut s.output, |b| {
        hasher.update(b);
        total += b.len() as u64;
        if cuts_at.first().is_some_and(|&at| total >= at) {
            cuts_at.remove(0);
            proxy.cut();
            cuts += 1;
        }
    })
    .await;
    assert_eq!(cuts, 4, "the link was cut 4 times mid-stream");
    assert_eq!(exit, Some(0));
    assert_eq!(
        total,
        SIZE,
        "bytes lost or duplicated: {}",
        total as i64 - SIZE as i64
    );
    h.wait_status(&node, "online").await;
    let (_, inside, _) = h
        .hub
        .exec_collect(&w.worker_id, &["cat", "/tmp/src.sha"])
        .await
        .unwrap();
    let inside = String::from_utf8(inside).unwrap();
    assert_eq!(
        inside.split_whitespace().next().unwrap(),
        hex::encode(hasher.finalize())
    );
    eprintln!("50 MB across {cuts} cuts: 0 bytes lost, 0 duplicated");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_is_detected_on_both_sides_then_recovers() {
    let (h, node, proxy) = proxied().await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let closed_before = proxy.agent_closed.lock().unwrap().len();
    let t0 = Instant::now();
    proxy.blackhole();
    // Server side: offline, with the reason.
    h.wait_status(&node, "offline").await;
    let server_detect = t0.elapsed();
    let info = h.hub.node_info(&node).unwrap();
    assert!(
        info.offline_reason
            .as_deref()
            .unwrap_or("")
            .contains("heartbeat"),
        "{info:?}"
    );
    // Agent side: it drops its end of the dead connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.agent_closed.lock().unwrap().len() == closed_before {
        assert!(
            Instant::now() < deadline,
            "agent never noticed the dead link"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agent_detect = proxy.agent_closed.lock().unwrap()[closed_before] - t0;
    // Bound: heartbeat timeout (6 s here) plus one heartbeat interval (2 s).
    assert!(
        server_detect < Duration::from_secs(9),
        "server took {server_detect:?}"
    );
    assert!(
        agent_detect < Duration::from_secs(9),
        "agent took {agent_detect:?}"
    );
    proxy.restore();
    h.wait_status(&node, "online").await;
    let recovered = t0.elapsed();
    let (code, out, _) = h
        .hub
        .exec_collect(&w.worker_id, &["echo", "back"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"back\n".to_vec()));
    eprintln!(
        "black hole: server detected in {server_detect:?}, agent in {agent_detect:?}, online again at {recovered:?}"
    );
    h.stop().await;
}

/// The next worker event of `worker` within `wait`, if any.
async fn next_event_of(
    events: &mut tokio::sync::broadcast::Receiver<(String, tether::protocol::WorkerEvent)>,
    worker: &str,
    wait: Duration,
) -> Option<tether::protocol::WorkerEvent> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return None,
            Ok(Ok((_, ev))) if ev.worker_id == worker => return Some(ev),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("worker events: {e}"),
        }
    }
}

/// One Docker event subscription per agent process: after several
/// reconnects a worker's death is reported once, not once per connection;
/// and a death while the server is unreachable is reported when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_events_are_reported_once_across_reconnects() {
    let (h, node, proxy) = proxied().await;
    let mut events = h.hub.worker_events();
    for _ in 0..3 {
        let before = proxy.accepted();
        proxy.cut();
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.accepted() == before {
            assert!(Instant::now() < deadline, "the agent never reconnected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h.wait_status(&node, "online").await;
    }
    let exiting = |code: u8| SpawnRequest {
        image: image(),
        cmd: vec!["sh".into(), "-c".into(), format!("sleep 2; exit {code}")],
        ..Default::default()
    };
    let w = h.hub.spawn(exiting(3)).await.unwrap();
    let ev = next_event_of(&mut events, &w.worker_id, Duration::from_secs(30))
        .await
        .expect("the worker's death is reported");
    assert_eq!(ev.event, tether::protocol::WorkerEventKind::Exited);
    assert_eq!(ev.exit_code, Some(3));
    let again = next_event_of(&mut events, &w.worker_id, Duration::from_secs(3)).await;
    assert!(again.is_none(), "reported twice: {again:?}");

    // Dies while the agent cannot reach the server: reported on return.
    let w = h.hub.spawn(exiting(4)).await.unwrap();
    proxy.refuse(true);
    proxy.cut();
    let filter = format!("label=tether.worker_id={}", w.worker_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker(&["ps", "-q", "--filter", &filter]).is_empty() {
        assert!(Instant::now() < deadline, "the worker never exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.refuse(false);
    let ev = next_event_of(&mut events, &w.worker_id, Duration::from_secs(60))
        .await
        .expect("a death while disconnected is reported after the reconnect");
    assert_eq!(
        (ev.event, ev.exit_code),
        (tether::protocol::WorkerEventKind::Exited, Some(4))
    );
    let again = next_event_of(&mut events, &w.worker_id, Duration::from_secs(3)).await;
    assert!(again.is_none(), "reported twice: {again:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_whose_reply_was_lost_runs_once() {
    let (h, node, proxy) = proxied().await;
    // Requests reach the agent; its replies vanish.
    proxy.set_flow(false, true);
    let hub = h.hub.clone();
    let img = image();
    let spawn = tokio::spawn(async move { hub.spawn(sleeper(&img)).await });
    // Wait until the agent has made the container, then break the link.
    let filter = format!("label=tether.node_id={node}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while docker(&["ps", "-q", "--filter", &filter]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the spawn never reached the agent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.restore();
    proxy.cut();
    // The server sends the spawn again after the reconnect: one worker.
    let w = tokio::time::timeout(Duration::from_secs(60), spawn)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ids = docker(&["ps", "-aq", "--filter", &filter]);
    assert_eq!(ids.lines().count(), 1, "exactly one container: {ids}");
    assert_eq!(
        docker(&["network", "ls", "-q", "--filter", &filter])
            .lines()
            .count(),
        1
    );
    let (code, _, _) = h.hub.exec_collect(&w.worker_id, &["true"]).await.unwrap();
    assert_eq!(code, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_started_before_a_cut_completes_after_it() {
    let (h, _node, proxy) = proxied().await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let mut s = sh_exec(
        &h,
        &w.worker_id,
        "echo start; sleep 3; echo end >&2; exit 7",
    )
    .await;
    let Some(StreamEvent::Data(StreamKind::Stdout, b)) = s.output.next().await else {
        panic!()
    };
    assert_eq!(&b[..], b"start\n");
    proxy.blackhole();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    proxy.restore();
    let Some(StreamEvent::Data(StreamKind::Stderr, b)) = s.output.next().await else {
        panic!()
    };
    assert_eq!(&b[..], b"end\n");
    assert_eq!(
        s.output.next().await,
        Some(StreamEvent::End {
            exit_code: Some(7),
            error: None
        })
    );
    h.stop().await;
}

fn spawn_agent_process(h: &Harness, node: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["agent", "--heartbeat-timeout", "6", "--state-dir"])
        .arg(h.state_path(node))
        .env("TETHER_SERVER", &h.url)
        .env("TETHER_PSK", PSK)
        .env("TETHER_NODE_ID", node)
        // Shown when a test fails: what happened to detached execs.
        .env("TETHER_LOG", "warn,tether::server=info")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_exec_readopts_its_workers_and_collects_garbage() {
    let h = Harness::server().await;
    let node = unique("test");
    h.track(&node);
    let mut agent = spawn_agent_process(&h, &node);
    h.wait_status(&node, "online").await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let mut s = sh_exec(&h, &w.worker_id, "echo begun; sleep 30").await;
    assert!(matches!(
        s.output.next().await,
        Some(StreamEvent::Data(StreamKind::Stdout, _))
    ));

    agent.start_kill().unwrap(); // SIGKILL
    agent.wait().await.unwrap();
    h.wait_status(&node, "offline").await;
    // A leftover from a crash: a worker network whose container is gone.
    let ghost = "tether-ghost-of-a-worker";
    docker(&[
        "network",
        "create",
        "--label",
        "tether.managed=true",
        "--label",
        &format!("tether.node_id={node}"),
        "--label",
        "tether.worker_id=ghost-of-a-worker",
        ghost,
    ]);
    assert!(!docker(&["network", "ls", "-q", "--filter", &format!("name={ghost}")]).is_empty());
    // The worker itself keeps running while the agent is down.
    let name = format!("tether-{}", w.worker_id);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Status}}", &name]),
        "running"
    );

    let _agent = spawn_agent_process(&h, &node);
    h.wait_status(&node, "online").await;
    // Re-adopted: the server's view comes from the agent's inventory.
    let workers: Vec<_> = h
        .hub
        .workers()
        .into_iter()
        .filter(|x| x.node_id == node)
        .collect();
    assert_eq!(workers.len(), 1);
    assert_eq!(
        (workers[0].worker_id.as_str(), workers[0].state.as_str()),
        (w.worker_id.as_str(), "running")
    );
    // Garbage collected, and nothing else leaked.
    assert_eq!(
        docker(&["network", "ls", "-q", "--filter", &format!("name={ghost}")]),
        ""
    );
    let filter = format!("label=tether.node_id={node}");
    assert_eq!(
        docker(&["network", "ls", "-q", "--filter", &filter])
            .lines()
            .count(),
        1
    );
    // The exec the dead agent was streaming ends with an honest error.
    let end = tokio::time::timeout(Duration::from_secs(30), s.output.next())
        .await
        .unwrap();
    match end {
        Some(StreamEvent::End { error: Some(e), .. }) => {
            assert_eq!(e.code, tether::protocol::ErrorCode::Unavailable);
            assert!(e.message.contains("lost"), "{e}");
        }
        other => panic!("expected an error end, got {other:?}"),
    }
    let (code, out, _) = h
        .hub
        .exec_collect(&w.worker_id, &["echo", "ok"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"ok\n".to_vec()));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerised_agent_survives_docker_kill_and_start() {
    let h = Harness::server().await;
    let node = unique("test");
    h.track(&node);
    let tag = format!("tether-agent:{}", unique("test"));
    let container = unique("test-agent");
    let _guard = Guard(
        vec![vec!["rm", "-f", &container], vec!["rmi", "-f", &tag]]
            .into_iter()
            .map(|v| v.into_iter().map(String::from).collect())
            .collect(),
    );
    build_agent_image(&tag);
    run_agent_container(&container, &tag, &h.url, &node);
    h.wait_status(&node, "online").await;
    let w = h
        .hub
        .spawn(SpawnRequest {
            node_id: Some(node.clone()),
            ..sleeper(&image())
        })
        .await
        .unwrap();
    docker(&["kill", &container]);
    h.wait_status(&node, "offline").await;
    docker(&["start", &container]);
    h.wait_status(&node, "online").await;
    let mine: Vec<_> = h
        .hub
        .workers()
        .into_iter()
        .filter(|x| x.node_id == node)
        .collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].worker_id, w.worker_id);
    let (code, out, _) = h
        .hub
        .exec_collect(&w.worker_id, &["echo", "still"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"still\n".to_vec()));
    h.stop().await;
}

/// Runs docker commands on drop.
struct Guard(Vec<Vec<String>>);

impl Drop for Guard {
    fn drop(&mut self) {
        for args in &self.0 {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            docker(&a);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_going_away_degrades_the_node_until_it_returns() {
    let mut h = Harness::server().await;
    let sock = h.state_path("docker-proxy.sock");
    let docker_proxy = common::proxy::UnixProxy::start(sock.clone(), "/var/run/docker.sock");
    let mut cfg = h.agent_config(&unique("test"));
    cfg.docker_socket = Some(sock.to_string_lossy().into_owned());
    let node = h.add_agent_with(cfg).await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();

    docker_proxy.take_away();
    h.wait_status(&node, "degraded").await;
    let info = h.hub.node_info(&node).unwrap();
    assert!(
        info.offline_reason
            .as_deref()
            .unwrap_or("")
            .contains("Docker"),
        "{info:?}"
    );
    // New work is refused with `unavailable`; the connection stays up.
    let e = h
        .hub
        .spawn(SpawnRequest {
            node_id: Some(node.clone()),
            ..sleeper(&image())
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, tether::protocol::ErrorCode::Unavailable, "{e}");
    let e = h
        .hub
        .exec_collect(&w.worker_id, &["true"])
        .await
        .unwrap_err();
    assert_eq!(e.code, tether::protocol::ErrorCode::Unavailable, "{e}");
    // Scheduling skips it.
    assert!(h.hub.spawn(sleeper(&image())).await.is_err());

    docker_proxy.bring_back();
    h.wait_status(&node, "online").await;
    let (code, out, _) = h
        .hub
        .exec_collect(&w.worker_id, &["echo", "recovered"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"recovered\n".to_vec()));
    h.stop().await;
}

/// A stopped agent leaves no task of its own behind: a worker's deadline
/// timer ends with the agent (the next agent start takes it over from the
/// worker's label), rather than firing from a detached task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_leaves_no_task_running() {
    let h = Harness::server().await;
    let node = unique("test");
    h.track(&node);
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(tether::agent::run(h.agent_config(&node), stop.clone()));
    h.wait_status(&node, "online").await;
    let w = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "3600".into()],
            timeout_secs: Some(4),
            ..Default::default()
        })
        .await
        .unwrap();
    let filter = format!("label=tether.worker_id={}", w.worker_id);
    stop.cancel();
    agent.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        docker(&["ps", "-aq", "--filter", &filter]).lines().count(),
        1,
        "a timer of the stopped agent {node} removed the worker"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_worker_timeouts_kill_and_report() {
    let (h, node) = Harness::start().await;
    let w = h.ctl_spawn_sleeper().await;
    // An exec past its limit: killed (with what it started), reported, exit 124.
    let t0 = Instant::now();
    let out = h
        .ctl(&[
            "exec",
            "--timeout",
            "2",
            &w,
            "--",
            "sh",
            "-c",
            "echo started; sleep 60 & sleep 60; echo never",
        ])
        .await;
    assert_eq!(
        out.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("timeout"));
    // Nothing it started is still running in the worker.
    let ps = h.ctl_ok(&["exec", &w, "--", "ps", "-o", "args"]).await;
    assert!(!ps.contains("sleep 60"), "left running:\n{ps}");

    // A worker past its limit is stopped and removed, network too.
    let img = image();
    let t = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "--timeout",
            "3",
            "--",
            "sleep",
            "3600",
        ])
        .await
        .trim()
        .to_string();
    let name = format!("tether-{t}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker(&["ps", "-aq", "--filter", &format!("name={name}")]).is_empty() {
        assert!(Instant::now() < deadline, "worker outlived its timeout");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        docker(&["network", "ls", "-q", "--filter", &format!("name={name}")]),
        ""
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.hub.worker(&t).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the server still lists the reaped worker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = node;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_return_after_a_server_restart_with_their_workers() {
    use tether::server::{Server, ServerConfig};
    ensure_image();
    tether::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let config = |addr: std::net::SocketAddr| {
        let mut c = ServerConfig::new(addr, PSK.into(), dir.path().join("server"));
        c.heartbeat_interval = Duration::from_secs(2);
        c.heartbeat_timeout = Duration::from_secs(6);
        c
    };
    let first = Server::bind(config("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = first.local_addr();
    let hub = first.hub();
    let stop_first = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(first.serve(stop_first.clone()));

    const AGENTS: usize = 5;
    let stop_agents = tokio_util::sync::CancellationToken::new();
    let mut nodes = Vec::new();
    let _cleanup: Vec<NodeGuard> = (0..AGENTS)
        .map(|_| {
            let node = unique("test");
            let mut cfg = tether::agent::AgentConfig::new(
                format!("http://{addr}").parse().unwrap(),
                PSK.into(),
                node.clone(),
                dir.path().join(&node),
            );
            cfg.heartbeat_timeout = Duration::from_secs(6);
            tokio::spawn(tether::agent::run(cfg, stop_agents.clone()));
            nodes.push(node.clone());
            NodeGuard(node)
        })
        .collect();
    let all_online = |hub: tether::server::Hub| {
        let nodes = nodes.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let online = hub
                    .nodes()
                    .iter()
                    .filter(|n| nodes.contains(&n.node_id) && n.status == "online")
                    .count();
                if online == nodes.len() {
                    return;
                }
                assert!(Instant::now() < deadline, "{online}/{} online", nodes.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    all_online(hub.clone()).await;
    let w = hub.spawn(sleeper(&image())).await.unwrap();

    // Graceful stop: agents see a 1001 close, not a timeout.
    stop_first.cancel();
    served.await.unwrap().unwrap();
    let t0 = Instant::now();
    let second = Server::bind(config(addr)).await.unwrap();
    let hub2 = second.hub();
    let stop_second = tokio_util::sync::CancellationToken::new();
    tokio::spawn(second.serve(stop_second.clone()));
    all_online(hub2.clone()).await;
    let back = t0.elapsed();
    // The new server learned the worker from its agent's inventory.
    let seen = hub2.worker(&w.worker_id).unwrap();
    assert_eq!(
        (seen.node_id.as_str(), seen.state.as_str()),
        (w.node_id.as_str(), "running")
    );
    let (code, out, _) = hub2
        .exec_collect(&w.worker_id, &["echo", "same"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"same\n".to_vec()));
    eprintln!("server restart: {AGENTS} agents online again after {back:?}");
    assert!(back < Duration::from_secs(30));
    stop_agents.cancel();
    stop_second.cancel();
}

fn start_server_process(port: u16, state: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--heartbeat-interval",
            "2",
            "--heartbeat-timeout",
            "6",
            "--state-dir",
        ])
        .arg(state)
        .env("TETHER_PSK", PSK)
        // Shown when a test fails: what happened to detached execs.
        .env("TETHER_LOG", "warn,tether::server=info")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exec_survives_a_server_restart_byte_exact() {
    let mut srv = ProcServer::start().await;
    let w = srv.spawn_worker(&["sleep", "3600"]);
    const SIZE: u64 = 50_000_000;
    let cmd = format!(
        "head -c {SIZE} /dev/urandom > /tmp/s.bin && sha256sum /tmp/s.bin > /tmp/s.sha && cat /tmp/s.bin"
    );
    let mut client = srv.ctl_child(&["exec", &w, "--", "sh", "-c", &cmd]);
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    let restarted = srv
        .read_restarting(&mut client, "output resumes", |b| {
            hasher.update(b);
            total += b.len() as u64;
            total >= 15_000_000
        })
        .await;
    let status = client.wait().await.unwrap();
    assert!(restarted);
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        total,
        SIZE,
        "bytes lost or duplicated: {}",
        total as i64 - SIZE as i64
    );
    let out = srv.ctl(&["exec", &w, "--", "cat", "/tmp/s.sha"]);
    let inside = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        inside.split_whitespace().next().unwrap(),
        hex::encode(hasher.finalize())
    );
    eprintln!("50 MB through ctl across a server kill and restart: 0 bytes lost, 0 duplicated");
    srv.stop(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exec_that_ends_while_the_server_is_down_gets_its_output_and_exit_code() {
    let mut srv = ProcServer::start().await;
    let w = srv.spawn_worker(&["sleep", "3600"]);
    let script = "echo begun; while [ ! -e /tmp/go ]; do usleep 50000; done; \
                  echo done-$(cat /tmp/go); touch /tmp/ended; exit 7";
    let mut client = srv.ctl_child(&["exec", &w, "--", "sh", "-c", script]);
    let mut stdout = client.stdout.take().unwrap();
    let mut got = read_until(&mut stdout, b"begun\n").await;
    // The command finishes, and the agent learns its exit code, while no
    // server is there to tell.
    srv.kill().await;
    in_worker(&w, "echo 42 > /tmp/go");
    wait_in_worker(&w, "/tmp/ended", "the command ends").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    srv.start_again();
    let status = finish(&mut client, &mut stdout, &mut got, 90, "ctl ends").await;
    assert_eq!(String::from_utf8_lossy(&got), "begun\ndone-42\n");
    assert_eq!(status.code(), Some(7), "the command's exit code");
    srv.stop(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_logs_follow_survives_a_server_restart_exactly() {
    let mut srv = ProcServer::start().await;
    const LINES: usize = 400;
    let script =
        format!("i=0; while [ $i -lt {LINES} ]; do echo line-$i; i=$((i+1)); usleep 20000; done");
    let w = srv.spawn_worker(&["sh", "-c", &script]);
    let mut client = srv.ctl_child(&["logs", "-f", &w]);
    let mut got = Vec::new();
    let restarted = srv
        .read_restarting(&mut client, "log lines keep coming", |b| {
            got.extend_from_slice(b);
            got.iter().filter(|&&c| c == b'\n').count() >= 60
        })
        .await;
    let status = client.wait().await.unwrap();
    assert!(restarted);
    assert_eq!(status.code(), Some(0));
    let want: String = (0..LINES).map(|i| format!("line-{i}\n")).collect();
    let got = String::from_utf8(got).unwrap();
    assert!(
        got == want,
        "lines lost, duplicated or out of order:\n{got}"
    );
    eprintln!(
        "{LINES} log lines through ctl logs -f across a server kill and restart: each once, in order"
    );
    srv.stop(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exec_stdin_survives_a_server_restart_byte_exact() {
    use tokio::io::AsyncWriteExt;
    let mut srv = ProcServer::start().await;
    let w = srv.spawn_worker(&["sleep", "3600"]);
    let mut client = srv.ctl_child(&["exec", "-i", &w, "--", "sha256sum"]);
    let mut stdin = client.stdin.take().unwrap();
    const SIZE: usize = 30_000_000;
    let data: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut sent = 0;
    let mut restarted = false;
    for chunk in data.chunks(256 * 1024) {
        tokio::time::timeout(Duration::from_secs(90), stdin.write_all(chunk))
            .await
            .expect("input keeps flowing")
            .unwrap();
        sent += chunk.len();
        if !restarted && sent >= SIZE / 3 {
            restarted = true;
            srv.restart().await;
        }
    }
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), client.wait_with_output())
        .await
        .expect("ctl finished")
        .unwrap();
    assert!(restarted);
    assert_eq!(out.status.code(), Some(0));
    let inside = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        inside.split_whitespace().next(),
        Some(sha256(&data).as_str())
    );
    eprintln!(
        "{SIZE} bytes of stdin through ctl exec -i across a server kill and restart: hash equal"
    );
    srv.stop(&w).await;
}

/// A server process that a test can kill and start again on the same port
/// and state directory, with one in-process agent online.
struct ProcServer {
    _dir: tempfile::TempDir,
    port: u16,
    url: String,
    state: std::path::PathBuf,
    child: tokio::process::Child,
    token: String,
    _guard: NodeGuard,
    agent_stop: tokio_util::sync::CancellationToken,
}

impl ProcServer {
    async fn start() -> ProcServer {
        ensure_image();
        tether::init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let state = dir.path().join("server");
        let child = start_server_process(port, &state);
        let token_file = state.join("admin.token");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !token_file.exists() {
            assert!(Instant::now() < deadline, "server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token = std::fs::read_to_string(&token_file)
            .unwrap()
            .trim()
            .to_string();
        let node = unique("test");
        let agent_stop = tokio_util::sync::CancellationToken::new();
        let cfg = tether::agent::AgentConfig::new(
            url.parse().unwrap(),
            PSK.into(),
            node.clone(),
            dir.path().join("agent"),
        );
        tokio::spawn(tether::agent::run(cfg, agent_stop.clone()));
        let srv = ProcServer {
            _dir: dir,
            port,
            url,
            state,
            child,
            token,
            _guard: NodeGuard(node.clone()),
            agent_stop,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = srv.ctl(&["nodes"]);
            let online = String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with(&node) && l.contains("online"));
            if online {
                break srv;
            }
            assert!(Instant::now() < deadline, "agent never online");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("ctl")
            .args(args)
            .env("TETHER_SERVER", &self.url)
            .env("TETHER_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    /// `tether ctl ARGS` running, its stdin and stdout piped.
    fn ctl_child(&self, args: &[&str]) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("ctl")
            .args(args)
            .env("TETHER_SERVER", &self.url)
            .env("TETHER_TOKEN", &self.token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Spawns a worker running `cmd`; returns its id.
    fn spawn_worker(&self, cmd: &[&str]) -> String {
        let mut args = vec!["spawn", "--image"];
        let img = image();
        args.push(&img);
        args.push("--");
        args.extend_from_slice(cmd);
        let out = self.ctl(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Reads `client`'s stdout to the end (each read within 90 s), handing
    /// each chunk to `each`; the first time `each` says so, restarts the
    /// server. Returns whether it did.
    async fn read_restarting(
        &mut self,
        client: &mut tokio::process::Child,
        what: &str,
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> bool {
        use tokio::io::AsyncReadExt;
        let mut stdout = client.stdout.take().unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut restarted = false;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(90), stdout.read(&mut buf))
                .await
                .expect(what)
                .unwrap();
            if n == 0 {
                return restarted;
            }
            if each(&buf[..n]) && !restarted {
                restarted = true;
                self.restart().await;
            }
        }
    }

    /// A hard stop (no goodbye to anyone), then a new server process on the
    /// same port and state.
    async fn restart(&mut self) {
        self.kill().await;
        self.start_again();
    }

    /// A hard stop: no goodbye to anyone.
    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// A new server process on the same port and state.
    fn start_again(&mut self) {
        self.child = start_server_process(self.port, &self.state);
    }

    async fn stop(mut self, worker: &str) {
        self.ctl(&["rm", "-f", worker]);
        self.agent_stop.cancel();
        let _ = self.child.start_kill();
    }
}

/// `tether ctl ARGS` against the server through `proxy`, stdin and stdout
/// piped.
fn ctl_through(h: &Harness, proxy: &Proxy, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("ctl")
        .args(args)
        .env("TETHER_SERVER", format!("http://{}", proxy.addr))
        .env("TETHER_TOKEN", &h.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads a client's output until it ends with `marker` (60 s at most).
async fn read_until(out: &mut (impl tokio::io::AsyncRead + Unpin), marker: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(marker) {
        let n = tokio::time::timeout(Duration::from_secs(60), out.read(&mut buf))
            .await
            .expect("the command starts")
            .unwrap();
        assert!(n > 0, "ctl ended early");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Reads a client's output to its end (after what `got` has) and waits for
/// it to exit, within `secs`.
async fn finish(
    client: &mut tokio::process::Child,
    stdout: &mut (impl tokio::io::AsyncRead + Unpin),
    got: &mut Vec<u8>,
    secs: u64,
    what: &str,
) -> std::process::ExitStatus {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(secs), async {
        stdout.read_to_end(got).await.unwrap();
        client.wait().await.unwrap()
    })
    .await
    .expect(what)
}

/// Runs `sh -c SCRIPT` in a worker's container, with docker directly.
fn in_worker(worker_id: &str, script: &str) -> String {
    docker(&["exec", &format!("tether-{worker_id}"), "sh", "-c", script])
}

async fn wait_in_worker(worker_id: &str, path: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while in_worker(worker_id, &format!("test -e {path} && echo yes")) != "yes" {
        assert!(Instant::now() < deadline, "{what} within 90 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for /tmp/go, then writes `size` random bytes to stdout (keeping a
/// copy and its hash), then marks /tmp/done.
fn gated_writer(size: u64) -> String {
    format!(
        "touch /tmp/started; while [ ! -e /tmp/go ]; do sleep 0.1; done; \
         head -c {size} /dev/urandom > /tmp/src.bin && sha256sum /tmp/src.bin > /tmp/src.sha && \
         cat /tmp/src.bin && touch /tmp/done"
    )
}

/// Makes the server unreachable once the gated command runs, lets it write
/// everything while nobody can read, then brings the server back.
async fn produce_while_unreachable(h: &Harness, node: &str, proxy: &Proxy, worker_id: &str) {
    wait_in_worker(worker_id, "/tmp/started", "the command started").await;
    proxy.refuse(true);
    proxy.cut();
    h.wait_status(node, "offline").await;
    in_worker(worker_id, "touch /tmp/go");
    // The command completes although its output cannot leave the node: the
    // absent server does not hold it up.
    wait_in_worker(worker_id, "/tmp/done", "the command finished while offline").await;
    proxy.refuse(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_exec_waits_for_its_client_while_the_agent_is_away() {
    let (h, node, proxy) = proxied().await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let script = "echo begun; while [ ! -e /tmp/go ]; do usleep 50000; done; echo end; exit 3";
    let mut s = sh_exec(&h, &w.worker_id, script).await;
    s.output.set_manual_ack();
    let channel = s.output.channel();
    match s.output.next().await {
        Some(StreamEvent::Data(StreamKind::Stdout, b)) => assert_eq!(&b[..], b"begun\n"),
        other => panic!("{other:?}"),
    }
    // The agent goes away, then the client: the grace (1 s) must not run
    // out while the agent cannot be reached, since the client could not
    // have come back in that time anyway.
    proxy.refuse(true);
    proxy.cut();
    h.wait_status(&node, "offline").await;
    let d = tether::server::DetachedExec::new(&w.worker_id, s);
    h.hub.detach_exec(d, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.refuse(false);
    h.wait_status(&node, "online").await;
    let mut s = h
        .hub
        .attach_exec(&w.worker_id, channel)
        .expect("the exec still waits for its client")
        .session;
    in_worker(&w.worker_id, "touch /tmp/go");
    let mut got = Vec::new();
    let exit = read_stdout(&mut s.output, |b| got.extend_from_slice(b)).await;
    assert_eq!(String::from_utf8_lossy(&got), "end\n");
    assert_eq!(exit, Some(3));

    // Once the agent is back, the grace runs: nobody re-attaches, and the
    // exec is cancelled.
    let mut s = sh_exec(&h, &w.worker_id, "echo $$ > /tmp/pid; exec sleep 600").await;
    s.output.set_manual_ack();
    let channel = s.output.channel();
    wait_in_worker(&w.worker_id, "/tmp/pid", "the second command started").await;
    let d = tether::server::DetachedExec::new(&w.worker_id, s);
    h.hub.detach_exec(d, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(h.hub.attach_exec(&w.worker_id, channel).is_err(), "expired");
    h.stop().await;
}

/// A client whose connection died without the server noticing (half-open:
/// nothing arrives, nothing fails) re-attaches over a new one: the new
/// connection takes the exec over from the old, and no byte is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reattach_takes_an_exec_over_from_a_silently_dead_connection() {
    use futures_util::SinkExt;
    let (h, _node) = Harness::start().await;
    let proxy = Proxy::start(h.addr).await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    const SIZE: u64 = 20_000_000;
    let cmd = format!(
        "head -c {SIZE} /dev/urandom > /tmp/src.bin && sha256sum /tmp/src.bin > /tmp/src.sha && cat /tmp/src.bin"
    );
    let path = format!("/api/v1/workers/{}/exec", w.worker_id);
    let mut old = exec_socket(&h, proxy.addr, &path).await;
    let opts = serde_json::json!({ "cmd": ["sh", "-c", cmd], "client_acks": true });
    old.send(WsMsg::text(opts.to_string())).await.unwrap();
    let mut out = ExecRead::default();
    assert_eq!(out.read(&mut old, Some(5_000_000)).await, None);
    let channel = out.channel.expect("started");
    // The old connection goes silent, open on both ends, and stays so.
    proxy.blackhole();
    let q = format!("{path}?attach={channel}&offset={}", out.received);
    let mut new = exec_socket(&h, h.addr, &q).await;
    let exit = out.read(&mut new, None).await;
    assert_eq!(exit, Some(0));
    assert_eq!(out.received, SIZE, "bytes lost or duplicated");
    let inside = in_worker(&w.worker_id, "cat /tmp/src.sha");
    assert_eq!(
        inside.split_whitespace().next().unwrap(),
        hex::encode(out.hasher.finalize())
    );
    drop(old);
    proxy.restore();
    h.stop().await;
}

/// A re-attach takes an exec over from the connection that holds it, so
/// only the caller who started it may: another operator of the same
/// organization gets `not_found` (as for an exec that is not there), and
/// the running session is not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_caller_who_started_an_exec_takes_it_over() {
    use futures_util::SinkExt;
    let (h, _node) = Harness::start().await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let token = || async {
        h.ctl_ok(&["token", "create", "--org", "default"])
            .await
            .trim()
            .to_string()
    };
    let (mine, colleague) = (token().await, token().await);
    let path = format!("/api/v1/workers/{}/exec", w.worker_id);
    let mut ws = exec_socket_as(&mine, h.addr, &path).await.unwrap();
    let script = "echo begun; while [ ! -e /tmp/go ]; do usleep 50000; done; echo end";
    let opts = serde_json::json!({ "cmd": ["sh", "-c", script], "client_acks": true });
    ws.send(WsMsg::text(opts.to_string())).await.unwrap();
    let mut out = ExecRead::default();
    assert_eq!(out.read(&mut ws, Some(6)).await, None);
    let channel = out.channel.expect("started");

    let q = format!("{path}?attach={channel}&offset={}", out.received);
    match exec_socket_as(&colleague, h.addr, &q).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 404),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("another caller took the exec over"),
    }
    // The session it tried to take goes on, to its end.
    in_worker(&w.worker_id, "touch /tmp/go");
    assert_eq!(out.read(&mut ws, None).await, Some(0));
    assert_eq!(out.received, "begun\nend\n".len() as u64);
    h.stop().await;
}

/// An exec's input waits in the server until the agent grants credit, so
/// one connection may not hand it more than a bounded message at a time:
/// a 2 MiB message ends the connection (the server holds at most a
/// window of input and a few messages of 1 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_socket_takes_no_message_over_a_mebibyte() {
    use futures_util::{SinkExt, StreamExt};
    let (h, _node) = Harness::start().await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let path = format!("/api/v1/workers/{}/exec", w.worker_id);
    let mut ws = exec_socket(&h, h.addr, &path).await;
    let opts = serde_json::json!({ "cmd": ["sleep", "60"], "stdin": true });
    ws.send(WsMsg::text(opts.to_string())).await.unwrap();
    let _ = ws.send(WsMsg::binary(vec![0u8; 2 << 20])).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(WsMsg::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was not ended");
    h.stop().await;
}

/// `ctl exec` over a connection that dies silently (no error, no close, on
/// either end): the server's pings stop arriving, ctl gives the connection
/// up after the idle timeout it was told (6 s here) and re-attaches on a
/// new one, which takes the exec over; output sent into the dead connection
/// comes again, and the exit code is the command's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exec_leaves_a_silently_dead_connection_and_reattaches() {
    let (h, _node) = Harness::start().await;
    let proxy = Proxy::start(h.addr).await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let script = "echo begun; while [ ! -e /tmp/go ]; do usleep 50000; done; echo end; exit 5";
    let mut client = ctl_through(
        &h,
        &proxy,
        &["exec", &w.worker_id, "--", "sh", "-c", script],
    );
    let mut stdout = client.stdout.take().unwrap();
    let mut got = read_until(&mut stdout, b"begun\n").await;
    proxy.kill_open_silently();
    in_worker(&w.worker_id, "touch /tmp/go");
    let t0 = Instant::now();
    let status = finish(
        &mut client,
        &mut stdout,
        &mut got,
        60,
        "ctl notices the dead connection and finishes",
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&got), "begun\nend\n");
    assert_eq!(status.code(), Some(5), "the command's exit code");
    eprintln!(
        "ctl finished {:.1} s after its connection died",
        t0.elapsed().as_secs_f64()
    );
    h.stop().await;
}

/// `ctl port-forward` whose connection to the server is cut three times
/// while 20 MB go through it to an echo and back: it re-attaches each time,
/// and the local client sees every byte once, in order, then the worker's
/// half-close after its own. The tunnel is gone from the server's list
/// once the connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_survives_cuts_of_its_server_connection_byte_exact_both_ways() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (h, _node) = Harness::start().await;
    let proxy = Proxy::start(h.addr).await;
    let w = worker(&h, "while true; do nc -l -p 9000 -e cat; done").await;
    let mut pf = ctl_through(&h, &proxy, &["port-forward", &w, ":9000"]);
    let mut lines = tokio::io::BufReader::new(pf.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("port-forward says where it listens")
        .unwrap()
        .unwrap();
    let local = line
        .strip_prefix("Forwarding from ")
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .to_string();
    let c = echo_connection(&local).await;
    const SIZE: usize = 20_000_000;
    let sent: Vec<u8> = (0..SIZE as u32).map(|i| (i * 31 % 251) as u8).collect();
    let (mut rd, mut wr) = c.into_split();
    let payload = sent.clone();
    let writer = tokio::spawn(async move {
        for chunk in payload.chunks(64 * 1024) {
            wr.write_all(chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    });
    let mut cuts_at = vec![3_000_000, 9_000_000, 15_000_000];
    let mut got = Vec::with_capacity(SIZE);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), rd.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("echo within 60 s: {} bytes back", got.len()))
            .unwrap();
        if n == 0 {
            break; // the worker's half-close, after ours
        }
        got.extend_from_slice(&buf[..n]);
        if cuts_at.first().is_some_and(|&at| got.len() >= at) {
            cuts_at.remove(0);
            proxy.cut();
        }
    }
    writer.await.unwrap();
    assert!(cuts_at.is_empty(), "the connection was cut three times");
    assert_eq!(got.len(), SIZE, "bytes lost or duplicated");
    assert_eq!(sha256(&got), sha256(&sent), "the echo differs");
    assert!(
        proxy.accepted() >= 4,
        "port-forward opened a connection per cut: {}",
        proxy.accepted()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = h.ctl(&["tunnels"]).await;
        assert!(out.status.success());
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        if !table.contains(&w) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tunnel stays listed: {table}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        pf.try_wait().unwrap().is_none(),
        "port-forward goes on listening"
    );
    h.stop().await;
}

/// `ctl exec -i` whose connection hangs while ctl is sending input (the
/// peer stops reading both ways without closing, as a hung host: ctl's
/// writes block once the buffers are full). ctl still reads on, notices the
/// silence after the idle timeout (6 s here), re-attaches on a new
/// connection and sends what the server lacks: the command gets every input
/// byte once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exec_sending_into_a_hung_connection_reattaches() {
    use tokio::io::AsyncWriteExt;
    // ctl's writes into the hung connection must block: more input may be
    // out unacknowledged (the stdin window, 8 MiB here) than the socket's
    // send buffer (at most 4 MiB by default; on loopback it starts at
    // about 2.5 MiB) and the proxy's small fixed receive buffer take in.
    let mut h = Harness::server_with(|c| c.stdin_window = 8 * 1024 * 1024).await;
    h.add_agent().await;
    let proxy = Proxy::start_with(h.addr, Some(16 * 1024)).await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let data: Vec<u8> = (0..24_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let want = format!("{}  -\n", sha256(&data));
    let mut client = ctl_through(
        &h,
        &proxy,
        &[
            "exec",
            "-i",
            &w.worker_id,
            "--",
            "sh",
            "-c",
            "echo started; exec sha256sum",
        ],
    );
    let mut stdin = client.stdin.take().unwrap();
    let mut stdout = client.stdout.take().unwrap();
    // Hung as soon as the command runs: all the input goes into a hung
    // connection whose buffers have not grown.
    read_until(&mut stdout, b"started\n").await;
    proxy.freeze_open();
    let feed = tokio::spawn(async move {
        stdin.write_all(&data).await.unwrap();
    });
    let t0 = Instant::now();
    let mut out = Vec::new();
    let status = finish(
        &mut client,
        &mut stdout,
        &mut out,
        120,
        "ctl leaves the hung connection and finishes",
    )
    .await;
    feed.await.unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(out, want, "the command got the input exactly");
    assert_eq!(status.code(), Some(0));
    eprintln!(
        "ctl finished {:.1} s after its connection hung",
        t0.elapsed().as_secs_f64()
    );
    h.stop().await;
}

/// `ctl logs -f` over a connection that dies silently: the pings stop,
/// ctl opens the stream anew after the idle timeout (6 s here) and goes on
/// right after the last line it printed: every line once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_logs_follow_leaves_a_silently_dead_connection() {
    let (h, _node) = Harness::start().await;
    let proxy = Proxy::start(h.addr).await;
    const LINES: usize = 500;
    let script =
        format!("i=0; while [ $i -lt {LINES} ]; do echo line-$i; i=$((i+1)); usleep 20000; done");
    let spawn = SpawnRequest {
        cmd: vec!["sh".into(), "-c".into(), script],
        ..sleeper(&image())
    };
    let w = h.hub.spawn(spawn).await.unwrap();
    let mut client = ctl_through(&h, &proxy, &["logs", "-f", &w.worker_id]);
    let mut stdout = client.stdout.take().unwrap();
    let mut got = read_until(&mut stdout, b"line-40\n").await;
    proxy.kill_open_silently();
    let status = finish(
        &mut client,
        &mut stdout,
        &mut got,
        90,
        "ctl notices the dead connection and follows to the end",
    )
    .await;
    assert_eq!(status.code(), Some(0));
    let want: String = (0..LINES).map(|i| format!("line-{i}\n")).collect();
    let got = String::from_utf8(got).unwrap();
    assert!(
        got == want,
        "lines lost, duplicated or out of order:\n{got}"
    );
    h.stop().await;
}

type WsMsg = tokio_tungstenite::tungstenite::Message;
type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An operator WebSocket to `path` on the server at `addr`.
async fn exec_socket(h: &Harness, addr: std::net::SocketAddr, path: &str) -> Socket {
    exec_socket_as(&h.token, addr, path).await.unwrap()
}

async fn exec_socket_as(
    token: &str,
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

/// What a client acknowledging its exec's output has read so far.
#[derive(Default)]
struct ExecRead {
    channel: Option<u32>,
    received: u64,
    hasher: sha2::Sha256,
}

impl ExecRead {
    /// Reads stdout (acknowledging it) until the exit, whose code it
    /// returns, or until `until` bytes are in (`None`).
    async fn read(&mut self, ws: &mut Socket, until: Option<u64>) -> Option<i64> {
        use futures_util::{SinkExt, StreamExt};
        let mut acked = self.received;
        loop {
            if until.is_some_and(|n| self.received >= n) {
                return None;
            }
            let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
                .await
                .expect("output or the end within 60 s")
                .expect("the connection stays open")
                .unwrap();
            match m {
                WsMsg::Binary(b) => {
                    assert_eq!(b[0], 1, "stdout frames only");
                    self.hasher.update(&b[1..]);
                    self.received += b.len() as u64 - 1;
                    // At least every half window (protocol.md 12.6).
                    if self.received - acked >= 64 * 1024 {
                        let ack = serde_json::json!({ "type": "ack", "offset": self.received });
                        ws.send(WsMsg::text(ack.to_string())).await.unwrap();
                        acked = self.received;
                    }
                }
                WsMsg::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                    match v["type"].as_str() {
                        Some("started") => self.channel = v["channel"].as_u64().map(|c| c as u32),
                        Some("exit") => return v["exit_code"].as_i64(),
                        _ => panic!("unexpected message: {v}"),
                    }
                }
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exec_stdin_survives_losing_the_client_and_the_agent_at_once() {
    use tokio::io::AsyncWriteExt;
    let (h, node, agent_proxy) = proxied().await;
    let client_proxy = Proxy::start(h.addr).await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    let input: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let script = "cat > /tmp/in; sha256sum /tmp/in";
    let args = ["exec", "-i", &w.worker_id, "--", "sh", "-c", script];
    let mut client = ctl_through(&h, &client_proxy, &args);
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(&input[..1_000_000]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while in_worker(&w.worker_id, "wc -c < /tmp/in 2>/dev/null || echo 0") != "1000000" {
        assert!(Instant::now() < deadline, "first MB in the worker");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The agent goes away and input waits in the server (more than the
    // agent's window of credit, less than the server's queue), then the
    // client's connection breaks too: the server cannot drain the input it
    // holds, and must still keep the exec for the client.
    agent_proxy.refuse(true);
    agent_proxy.cut();
    h.wait_status(&node, "offline").await;
    const AWAY: usize = 1_400_000;
    let rest = input[1_000_000..AWAY].to_vec();
    let feeder = tokio::spawn(async move {
        stdin.write_all(&rest).await.unwrap();
        stdin
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    client_proxy.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    agent_proxy.refuse(false);
    h.wait_status(&node, "online").await;
    let mut stdin = feeder.await.unwrap();
    stdin.write_all(&input[AWAY..]).await.unwrap();
    drop(stdin);
    let mut stdout = client.stdout.take().unwrap();
    let mut out = Vec::new();
    let status = finish(&mut client, &mut stdout, &mut out, 120, "ctl ends").await;
    let out = String::from_utf8(out).unwrap();
    assert_eq!(status.code(), Some(0), "{out}");
    assert_eq!(out.split_whitespace().next(), Some(sha256(&input).as_str()));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_made_while_the_server_is_unreachable_is_spooled_not_lost() {
    let (h, node, proxy) = proxied_with(|c| c.spool.memory_bytes = 64 * 1024).await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    const SIZE: u64 = 20_000_000;
    let mut s = sh_exec(&h, &w.worker_id, &gated_writer(SIZE)).await;
    let t0 = Instant::now();
    produce_while_unreachable(&h, &node, &proxy, &w.worker_id).await;
    let offline = t0.elapsed();
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    let exit = read_stdout(&mut s.output, |b| {
        hasher.update(b);
        total += b.len() as u64;
    })
    .await;
    assert_eq!(exit, Some(0));
    assert_eq!(
        total,
        SIZE,
        "lost or duplicated: {}",
        total as i64 - SIZE as i64
    );
    let inside = in_worker(&w.worker_id, "cat /tmp/src.sha");
    assert_eq!(
        inside.split_whitespace().next().unwrap(),
        hex::encode(hasher.finalize())
    );
    eprintln!(
        "{SIZE} bytes written while the server was unreachable ({:.1} s): all delivered after the reconnect",
        offline.as_secs_f64()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_beyond_the_spool_quota_is_reported_as_a_gap_of_its_size() {
    const QUOTA: u64 = 1024 * 1024;
    const MEMORY: usize = 64 * 1024;
    let (h, node, proxy) = proxied_with(|c| {
        c.spool.memory_bytes = MEMORY;
        c.spool.quota_bytes = QUOTA;
    })
    .await;
    let w = h.hub.spawn(sleeper(&image())).await.unwrap();
    const SIZE: u64 = 5_000_000;
    let script = gated_writer(SIZE);
    let args = ["exec", &w.worker_id, "--", "sh", "-c", &script];
    let (out, ()) = tokio::join!(
        h.ctl(&args),
        produce_while_unreachable(&h, &node, &proxy, &w.worker_id)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    // One gap, with its size.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("bytes of output were lost"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let lost: u64 = lines[0]
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", lines[0]));
    let got = out.stdout.len() as u64;
    assert_eq!(got + lost, SIZE, "received {got} + lost {lost}");
    // What arrived is the start of the output (window + memory + quota),
    // byte-exact; the command ended while offline, so the gap closes it.
    assert!(got >= QUOTA + MEMORY as u64, "only {got} bytes arrived");
    let inside = in_worker(
        &w.worker_id,
        &format!("head -c {got} /tmp/src.bin | sha256sum"),
    );
    assert_eq!(
        inside.split_whitespace().next().unwrap(),
        sha256(&out.stdout)
    );
    eprintln!(
        "{SIZE} bytes written offline with a {QUOTA}-byte quota: {got} delivered, gap of {lost} reported"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_survives_cuts_of_the_agent_link_exactly() {
    let (h, _node, proxy) = proxied().await;
    const LINES: usize = 300;
    let w = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "i=0; while [ $i -lt {LINES} ]; do echo line-$i; i=$((i+1)); usleep 10000; done"
                ),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let args = ["logs", "-f", &w.worker_id];
    let cutter = async {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            proxy.cut();
        }
    };
    let (out, ()) = tokio::join!(h.ctl(&args), cutter);
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8(out.stdout).unwrap();
    let want: String = (0..LINES).map(|i| format!("line-{i}\n")).collect();
    assert!(
        got == want,
        "lines lost, duplicated or out of order:\n{got}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_survives_a_cut_of_the_agent_link_byte_exact_both_ways() {
    tunnel_across_cuts(vec![6_000_000]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_survives_repeated_cuts_of_the_agent_link_byte_exact_both_ways() {
    tunnel_across_cuts(vec![3_000_000, 9_000_000, 15_000_000]).await;
}

/// A 20 MB echo through a tunnel, the agent's link cut when the echo has
/// come back as far as each of `cuts_at`; every byte back, in order.
async fn tunnel_across_cuts(mut cuts_at: Vec<usize>) {
    let (h, node, proxy) = proxied().await;
    let w = h
        .hub
        .spawn(tether::protocol::SpawnRequest {
            image: image(),
            // The worker outlives the echo: a container that exits takes its
            // network namespace, and with it whatever its last writes left
            // in the kernel's send buffer (a cut lets that grow to MBs).
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "nc -l -p 9000 -e cat; sleep 3600".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut t = None;
    for _ in 0..100 {
        match h.hub.tunnel(&w.worker_id, 9000).await {
            Ok(s) => {
                t = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let tether::server::Duplex {
        mut input,
        mut output,
    } = t.expect("the worker's echo listens");
    const SIZE: usize = 20_000_000;
    let sent: Vec<u8> = (0..SIZE as u32).map(|i| (i * 17 % 239) as u8).collect();
    let payload = sent.clone();
    // Written while the echo is read and the link is cut under both.
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w2 = written.clone();
    let writer = tokio::spawn(async move {
        for chunk in payload.chunks(64 * 1024) {
            input
                .write(bytes::Bytes::copy_from_slice(chunk))
                .await
                .expect("input survives the cuts");
            w2.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
        input.close();
        input
    });
    let mut got = Vec::with_capacity(SIZE);
    let want_cuts = cuts_at.len();
    let mut cuts = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), output.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "tunnel output within 60 s: {} bytes back, {} written, {cuts} cuts",
                    got.len(),
                    written.load(std::sync::atomic::Ordering::Relaxed)
                )
            }) {
            Some(tether::server::StreamEvent::Data(_, b)) => {
                got.extend_from_slice(&b);
                if cuts_at.first().is_some_and(|&at| got.len() >= at) {
                    cuts_at.remove(0);
                    proxy.cut();
                    cuts += 1;
                }
            }
            Some(tether::server::StreamEvent::End { error: None, .. }) | None => break,
            Some(other) => panic!("unexpected tunnel event {other:?}"),
        }
    }
    assert_eq!(cuts, want_cuts, "the link was cut mid-transfer");
    assert_eq!(got.len(), SIZE, "bytes lost or duplicated");
    assert_eq!(sha256(&got), sha256(&sent), "the echo differs");
    drop(writer.await.unwrap());
    h.wait_status(&node, "online").await;
    h.stop().await;
}

/// An MCP exec that outlives its call is followed on after a hard server
/// restart, under the same exec id: the output the old server had read but
/// no answer had taken comes again (the agent keeps it until an answer
/// took it), then what the command wrote after, and its exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_exec_is_followed_across_a_server_restart() {
    use serde_json::json;
    let mut srv = ProcServer::start().await;
    let node = srv._guard.0.clone();
    assert!(srv.ctl(&["mcp", "allow", &node]).status.success());
    let sb = mcp_call(
        &srv.url,
        &srv.token,
        "sandbox.create",
        json!({"task_id": "t1", "image": image(), "node": node, "cmd": ["sleep", "3600"]}),
    )
    .await
    .unwrap();
    let w = sb["worker_id"].as_str().unwrap().to_string();
    let script = "echo before; while [ ! -e /tmp/m ]; do usleep 50000; done; echo middle; \
                  while [ ! -e /tmp/go ]; do usleep 50000; done; echo after; exit 7";
    let r = mcp_call(
        &srv.url,
        &srv.token,
        "sandbox.exec",
        json!({"task_id": "t1", "worker_id": w, "command": script, "wait_s": 1}),
    )
    .await
    .unwrap();
    assert_eq!(
        (r["running"].as_bool(), r["stdout"].as_str()),
        (Some(true), Some("before\n")),
        "{r}"
    );
    let exec_id = r["exec_id"].as_str().unwrap().to_string();
    // Read by this server, taken by no answer: it must not be lost.
    in_worker(&w, "touch /tmp/m");
    tokio::time::sleep(Duration::from_secs(1)).await;
    srv.restart().await;
    in_worker(&w, "touch /tmp/go");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = String::new();
    let done = loop {
        match mcp_call(
            &srv.url,
            &srv.token,
            "sandbox.exec_follow",
            json!({"task_id": "t1", "exec_id": exec_id, "wait_s": 10}),
        )
        .await
        {
            Ok(r) => {
                out.push_str(r["stdout"].as_str().unwrap_or(""));
                if r["running"] == false {
                    break r;
                }
            }
            // Until the agent is back and the exec adopted.
            Err(e) => assert!(Instant::now() < deadline, "never followed on: {e}"),
        }
        assert!(Instant::now() < deadline, "still running: {out:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(out, "middle\nafter\n", "{done}");
    assert_eq!(done["exit_code"], 7, "{done}");
    // The audit trail kept the calls from before the restart.
    let audit = srv.ctl(&["audit", "--task", "t1"]);
    let audit = String::from_utf8_lossy(&audit.stdout);
    for op in [
        "mcp:sandbox.create",
        "mcp:sandbox.exec",
        "mcp:sandbox.exec_follow",
    ] {
        assert!(audit.contains(op), "{op} missing:\n{audit}");
    }
}

/// The configuration an operator pushed is kept in the server's store: a
/// restarted server still knows what it wants on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wanted_configuration_survives_a_server_restart() {
    let mut srv = ProcServer::start().await;
    let node = srv._guard.0.clone();
    let file = srv._dir.path().join("cfg.yaml");
    let version = ulid::Ulid::new().to_string();
    std::fs::write(&file, format!("config_version: \"{version}\"\n")).unwrap();
    let out = srv.ctl(&["config", "push", &node, file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    srv.restart().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = srv.ctl(&["node", "inspect", &node]);
        if out.status.success() {
            let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if d["desired_config_version"] == version.as_str()
                && d["config_version"] == version.as_str()
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restarted server does not know the wanted configuration: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    srv.agent_stop.cancel();
}
