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

impl Drop for ImageGuard {
    fn drop(&mut self) {
        docker(&["rm", "-f", &self.container]);
        docker(&["rmi", "-f", &self.image]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_image_brings_a_node_online() {
    let h = Harness::server().await;
    let node = unique("test");
    h.track(&node);
    let tag = format!("tether-agent:{}", unique("test"));
    let guard = ImageGuard {
        container: unique("test-agent"),
        image: tag.clone(),
    };
    build_agent_image(&tag);
    // Minimal: no shell in the image.
    let sh = std::process::Command::new("docker")
        .args(["run", "--rm", "--entrypoint", "/bin/sh", &tag, "-c", "true"])
        .output()
        .unwrap();
    assert!(!sh.status.success(), "the agent image should have no shell");

    let id = run_agent_container(&guard.container, &tag, &h.url, &node);
    assert!(!id.is_empty(), "docker run of the agent image failed");
    tokio::time::timeout(Duration::from_secs(60), h.wait_status(&node, "online"))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "node never came online; agent logs:\n{}",
                docker_all(&["logs", &guard.container])
            )
        });
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
