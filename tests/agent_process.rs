//! The agent as users run it: a separate process that binds no listening
//! socket, and the container image built from the Dockerfile.

mod common;
use common::*;
use std::collections::HashSet;
use std::time::Duration;

/// Socket inodes held open by `pid`.
fn socket_inodes(pid: u32) -> HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect()
}

/// (state, inode) of every inet socket in `/proc/PID/net/{tcp,tcp6,udp,udp6}`.
fn inet_sockets(pid: u32, table: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9).then(|| (f[3].to_string(), f[9].to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_process_binds_no_listening_socket() {
    let h = Harness::server().await;
    let node = unique("test");
    h.track(&node);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["agent", "--state-dir"])
        .arg(h.state_path("agent"))
        .env("TETHER_SERVER", &h.url)
        .env("TETHER_PSK", PSK)
        .env("TETHER_NODE_ID", &node)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    h.wait_status(&node, "online").await;
    // Let it settle: registration's HTTP connection closes, the WebSocket stays.
    let w = h
        .hub
        .spawn(tether::protocol::SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "60".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (code, out, _) = h
        .hub
        .exec_collect(&w.worker_id, &["echo", "hi"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"hi\n".to_vec()));

    let pid = child.id().unwrap();
    let mine = socket_inodes(pid);
    assert!(!mine.is_empty(), "the agent holds sockets (its connection)");
    let mut established = 0;
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        for (state, inode) in inet_sockets(pid, table) {
            if !mine.contains(&inode) {
                continue;
            }
            assert_ne!(
                state, "0A",
                "agent has a listening {table} socket (inode {inode})"
            );
            assert!(
                !table.starts_with("udp"),
                "agent has a bound UDP socket (inode {inode})"
            );
            if state == "01" {
                established += 1;
            }
        }
    }
    assert!(
        established >= 1,
        "the check must see the agent's own connection"
    );
    // Unix sockets: flag 00010000 is __SO_ACCEPTCON (listening).
    let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap();
    for l in unix.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 6 && mine.contains(f[6]) {
            assert_ne!(f[3], "00010000", "agent has a listening unix socket: {l}");
        }
    }
    child.kill().await.unwrap();
}

/// Removes the agent container and image even if the test fails.
struct ImageGuard {
    container: String,
    image: String,
}

/// A node id the harness cleans up after, and the agent image built under a
/// tag of its own (removed with its container by the guard).
fn agent_image_for(h: &Harness) -> (String, String, ImageGuard) {
    let node = unique("test");
    h.track(&node);
    let tag = format!("tether-agent:{}", unique("test"));
    let guard = ImageGuard {
        container: unique("test-agent"),
        image: tag.clone(),
    };
    build_agent_image(&tag);
    (node, tag, guard)
}

/// Waits for the agent container `id` to bring `node` online (its logs
/// shown if it does not).
async fn online(h: &Harness, node: &str, id: &str, guard: &ImageGuard) {
    assert!(!id.is_empty(), "docker run of the agent image failed");
    tokio::time::timeout(Duration::from_secs(60), h.wait_status(node, "online"))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "node never came online; agent logs:\n{}",
                docker_all(&["logs", &guard.container])
            )
        });
}

impl Drop for ImageGuard {
    fn drop(&mut self) {
        docker(&["rm", "-f", &self.container]);
        docker(&["rmi", "-f", &self.image]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_image_brings_a_node_online() {
    let h = Harness::server().await;
    let (node, tag, guard) = agent_image_for(&h);
    // Minimal: no shell in the image.
    let sh = std::process::Command::new("docker")
        .args(["run", "--rm", "--entrypoint", "/bin/sh", &tag, "-c", "true"])
        .output()
        .unwrap();
    assert!(!sh.status.success(), "the agent image should have no shell");

    let id = run_agent_container(&guard.container, &tag, &h.url, &node);
    online(&h, &node, &id, &guard).await;
    let w = h
        .hub
        .spawn(tether::protocol::SpawnRequest {
            image: image(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "mkdir -p /www && echo through-a-tunnel > /www/i && httpd -f -p 8080 -h /www"
                    .into(),
            ],
            node_id: Some(node.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let (code, out, _) = h
        .hub
        .exec_collect(&w.worker_id, &["echo", "from-container-agent"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"from-container-agent\n".to_vec()));
    // The agent in its container (host network) reaches the worker's port
    // on the worker's own network: a tunnel needs no published port.
    let mut page = Vec::new();
    for _ in 0..50 {
        match h.hub.tunnel(&w.worker_id, 8080).await {
            Ok(mut t) => {
                t.input
                    .write(bytes::Bytes::from_static(b"GET /i HTTP/1.0\r\n\r\n"))
                    .await
                    .unwrap();
                t.input.close();
                while let Some(ev) = t.output.next().await {
                    match ev {
                        tether::server::StreamEvent::Data(_, b) => page.extend_from_slice(&b),
                        tether::server::StreamEvent::End { error, .. } => {
                            assert!(error.is_none(), "{error:?}");
                            break;
                        }
                        _ => {}
                    }
                }
                break;
            }
            Err(e) if e.code == tether::protocol::ErrorCode::ConnectionRefused => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("tunnel through the container agent: {e}"),
        }
    }
    assert!(
        String::from_utf8_lossy(&page).ends_with("through-a-tunnel\n"),
        "{}",
        String::from_utf8_lossy(&page)
    );
    assert_eq!(
        w.network_policy,
        Some(tether::protocol::NetworkPolicy::Restricted)
    );
    h.hub.remove(&w.worker_id, true).await.unwrap();
    // The FROM-scratch image guards its workers with a table of its own,
    // and takes it away when stopped.
    let table = format!("tether-{node}");
    let listed = |args: &[&str]| {
        let out = std::process::Command::new("nft")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        listed(&["list", "table", "inet", &table]).contains("hook forward"),
        "agent logs:\n{}",
        docker_all(&["logs", &guard.container])
    );
    docker(&["stop", &guard.container]);
    let gone = !listed(&["list", "tables"]).contains(&table);
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "inet", &table])
        .output(); // a failed test must not leave it behind
    assert!(gone, "the table outlived the agent container");
    assert!(
        !docker_all(&["logs", &guard.container]).contains("could not remove the network guard"),
        "{}",
        docker_all(&["logs", &guard.container])
    );
    drop(guard);
}

/// The agent image run without `--network host` (in a network namespace of
/// its own, on Docker's default bridge, reaching the server at the bridge's
/// gateway): it cannot guard workers' networks from there, so a worker with
/// a network is refused saying why; a network-less worker runs, and a
/// tunnel to it goes through the worker's relay (the agent finds its own
/// container and uses its image for the relay), byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_container_on_its_own_network_tunnels_through_relays() {
    // The host's address on Docker's default bridge: its subnet's first.
    let subnet = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{(index .IPAM.Config 0).Subnet}}",
    ]);
    let net: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    let gateway = std::net::Ipv4Addr::from(u32::from(net) + 1);
    let h = Harness::server_with(|c| c.listen = format!("{gateway}:0").parse().unwrap()).await;
    let (node, tag, guard) = agent_image_for(&h);
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &guard.container,
        "--label",
        "tether.test=1",
        "--cap-add",
        "NET_ADMIN",
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-e",
        &format!("TETHER_SERVER={}", h.url),
        "-e",
        &format!("TETHER_PSK={PSK}"),
        "-e",
        &format!("TETHER_NODE_ID={node}"),
        &tag,
    ]);
    online(&h, &node, &id, &guard).await;
    let spawn = |policy| tether::protocol::SpawnRequest {
        image: image(),
        cmd: vec![
            "sh".into(),
            "-c".into(),
            "while true; do nc -l -p 9000 -e cat; done".into(),
        ],
        node_id: Some(node.clone()),
        network_policy: Some(policy),
        ..Default::default()
    };
    let e = h
        .hub
        .spawn(spawn(tether::protocol::NetworkPolicy::Restricted))
        .await
        .expect_err("a guarded network cannot be had from the agent's own namespace");
    assert_eq!(e.code, tether::protocol::ErrorCode::Unsupported, "{e}");
    assert!(e.message.contains("network namespace"), "{e}");
    // A deployment under `none` too: its internal bridge still gives the
    // host an address its services could reach, unguarded from here.
    let file = h.state_path("none.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  s:\n    image: {}\n    command: [\"sleep\", \"60\"]\n",
            image()
        ),
    )
    .unwrap();
    let name = unique("nd");
    let out = h
        .ctl(&[
            "deploy",
            "up",
            "-f",
            &file.to_string_lossy(),
            "--name",
            &name,
            "--network-policy",
            "none",
            "--node",
            &node,
        ])
        .await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("cannot be enforced"),
        "{err}"
    );
    assert_eq!(
        docker_all(&[
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=tether.deployment={name}")
        ]),
        "",
        "nothing of it is left"
    );
    let w = h
        .hub
        .spawn(spawn(tether::protocol::NetworkPolicy::None))
        .await
        .unwrap();
    let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let tether::server::Duplex {
        mut input,
        mut output,
    } = tunnel(&h.hub, &w.worker_id, 9000).await;
    let payload = sent.clone();
    let writer = tokio::spawn(async move {
        for c in payload.chunks(64 * 1024) {
            input.write(bytes::Bytes::copy_from_slice(c)).await.unwrap();
        }
        input.close();
        input
    });
    let mut got = Vec::new();
    while let Some(ev) = output.next().await {
        match ev {
            tether::server::StreamEvent::Data(_, b) => got.extend_from_slice(&b),
            tether::server::StreamEvent::End { error, .. } => {
                assert!(error.is_none(), "{error:?}");
                break;
            }
            _ => {}
        }
    }
    drop(writer.await.unwrap());
    assert_eq!(sha256(&got), sha256(&sent), "{} bytes back", got.len());
    let relay = format!("tether-{}-relay", w.worker_id);
    let mode = docker(&["inspect", "--format", "{{.HostConfig.NetworkMode}}", &relay]);
    assert_eq!(
        mode,
        format!("container:{}", w.container_id),
        "the relay joins the worker"
    );
    assert_eq!(
        docker(&["inspect", "--format", "{{.Image}}", &relay]),
        docker(&["inspect", "--format", "{{.Image}}", &guard.container]),
        "the relay runs the agent's own image"
    );
    h.hub.remove(&w.worker_id, true).await.unwrap();
    assert!(
        docker_all(&["ps", "-a", "-q", "--filter", &format!("name={relay}")]).is_empty(),
        "the relay goes with its worker"
    );
    docker(&["stop", &guard.container]);
}
