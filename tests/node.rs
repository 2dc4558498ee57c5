//! The node's capability report: real values from the machine, a hash that
//! is stable across restarts.

mod common;
use common::*;
use serde_json::Value;

fn cmd(c: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(c).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_report_is_real_and_its_hash_stable() {
    let h = Harness::server().await;
    let node = unique("test");
    let cfg = h.agent_config(&node);
    let stop = tokio_util::sync::CancellationToken::new();
    h.track(&node);
    let first = tokio::spawn(tether::agent::run(cfg.clone(), stop.clone()));
    h.wait_status(&node, "online").await;

    let v: Value =
        serde_json::from_str(&h.ctl_ok(&["node", "inspect", &node, "--json"]).await).unwrap();
    let r = &v["capabilities"];
    assert_eq!(r["version"], 1);
    assert_eq!(r["node"]["node_slug"], node.as_str());
    assert_eq!(
        r["platform"]["kernel_version"],
        cmd("uname", &["-r"]).as_str()
    );
    assert_eq!(r["platform"]["arch"], std::env::consts::ARCH);
    assert_eq!(
        r["compute"]["cpu_cores"].as_u64().unwrap(),
        cmd("nproc", &[]).parse::<u64>().unwrap()
    );
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        r["compute"]["ram_mb"].as_u64().unwrap(),
        kb * 1024 / (1024 * 1024)
    );
    assert!(r["compute"]["storage_free_mb"].as_u64().unwrap() > 0);
    assert_eq!(
        r["container_runtime"]["version"],
        cmd("docker", &["version", "--format", "{{.Server.Version}}"]).as_str()
    );
    let gpu_expected = std::process::Command::new("nvidia-smi")
        .output()
        .is_ok_and(|o| o.status.success());
    assert_eq!(r["gpu"]["present"].as_bool().unwrap(), gpu_expected);
    assert!(r["reported_at"].as_str().unwrap().ends_with('Z'));
    let hash = v["capability_hash"].as_str().unwrap().to_string();
    assert_eq!(hash, tether::protocol::capability_hash(r));
    assert_eq!(hash.len(), 64);

    // Restart the agent: a new report (new timestamp), the same hash.
    stop.cancel();
    first.await.unwrap().unwrap();
    h.wait_status(&node, "offline").await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // a later reported_at
    let stop2 = tokio_util::sync::CancellationToken::new();
    let second = tokio::spawn(tether::agent::run(cfg, stop2.clone()));
    h.wait_status(&node, "online").await;
    let v2: Value = serde_json::from_str(&h.ctl_ok(&["node", "inspect", &node]).await).unwrap();
    assert_ne!(v2["capabilities"]["reported_at"], r["reported_at"]);
    assert_eq!(v2["capability_hash"].as_str().unwrap(), hash);
    stop2.cancel();
    second.await.unwrap().unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_token_is_refreshed_over_the_live_connection() {
    // Tokens live 6 s here; the server refreshes at a third left.
    let mut h = Harness::server_with(|c| c.jwt_ttl = std::time::Duration::from_secs(6)).await;
    let node = h.add_agent().await;
    let since = h.hub.node_info(&node).unwrap().connected_since.unwrap();
    let token_file = h.state_path(&format!("{node}/{node}.jwt"));
    let first = std::fs::read_to_string(&token_file).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Well past the first token's expiry (plus the 5 s leeway).
    tokio::time::sleep(std::time::Duration::from_secs(13)).await;
    let info = h.hub.node_info(&node).unwrap();
    assert_eq!(info.status, "online");
    assert_eq!(
        info.connected_since.unwrap(),
        since,
        "the agent never reconnected"
    );
    let now = std::fs::read_to_string(&token_file).unwrap();
    assert_ne!(now, first, "a fresh token was stored");
    // The stored token is valid for this node on the server.
    let key = std::fs::read_to_string(h.state_path("server/jwt.key")).unwrap();
    let signer =
        tether::server::auth::Signer::new(key.trim().as_bytes(), std::time::Duration::from_secs(6));
    assert_eq!(signer.verify(now.trim()).unwrap().node_id, node);
    assert!(
        signer.verify(first.trim()).is_err(),
        "the first token has expired"
    );
    h.stop().await;
}

#[test]
fn agent_refuses_a_bad_node_file_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.yaml");
    std::fs::write(
        &file,
        "version: 1\norchestrator:\n  url: http://127.0.0.1:9\n  psk: nope\nnode:\n  id: n1\nsandbox:\n  max_concurrency: many\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["agent", "--config"])
        .arg(&file)
        .env("TETHER_PSK", PSK)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // Both problems, each with its line, and nothing attempted first.
    assert!(
        err.contains("line 4: orchestrator.psk: unknown key"),
        "{err}"
    );
    assert!(
        err.contains("line 8: sandbox.max_concurrency: must be an integer"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
