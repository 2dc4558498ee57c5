//! Versioned configuration pushed to a node: applied atomically, acked with
//! its hash, stale versions ignored, failures rolled back, kept across agent
//! restarts; local policy and credentials handled as the node spec says.

mod common;
use common::*;
use serde_json::Value;

const SECRET: &str = "s3cr3t-pull-pass-9f2";

fn push(h: &Harness, node: &str, yaml: &str) -> std::process::Output {
    let path = h.state_path(&format!("push-{}.yaml", ulid::Ulid::new()));
    std::fs::write(&path, yaml).unwrap();
    let args = ["config", "push", node, path.to_str().unwrap()];
    std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("ctl")
        .args(args)
        .env("TETHER_SERVER", &h.url)
        .env("TETHER_TOKEN", &h.token)
        .output()
        .unwrap()
}

fn ack(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_configuration_lifecycle() {
    let h = Harness::server().await;
    let node = unique("test");
    let cfg = h.agent_config(&node);
    let state_dir = cfg.state_dir.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    h.track(&node);
    let agent = tokio::spawn(tether::agent::run(cfg.clone(), stop.clone()));
    h.wait_status(&node, "online").await;

    let v1 = ulid::Ulid::new().to_string();
    let good = format!(
        "config_version: \"{v1}\"\nregistries:\n  - server: registry.example\n    username: bot\n    password: \"{SECRET}\"\npolicy:\n  sandbox:\n    allowed_images: [\"tether-test-*\"]\n    resources:\n      max_memory_mb: 64\n"
    );
    let out = push(&h, &node, &good);
    let a = ack(&out);
    assert_eq!(
        (a["config_version"].as_str(), a["status"].as_str()),
        (Some(v1.as_str()), Some("applied")),
        "{a}"
    );
    let hash = a["effective_config_hash"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 64);
    let detail: Value = serde_json::from_str(&h.ctl_ok(&["node", "inspect", &node]).await).unwrap();
    assert_eq!(detail["config_version"], v1.as_str());
    assert_eq!(detail["last_config_ack"]["status"], "applied");

    // Stored atomically, owner-only (it holds credentials).
    let file = state_dir.join("node-config.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(std::fs::read_to_string(&file).unwrap().contains(&v1));

    // The orchestrator's policy applies.
    let img = image();
    let out = h
        .ctl(&["spawn", "--image", &img, "--memory", "128", "--", "true"])
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy_denied") && err.contains("sandbox.resources.max_memory_mb"),
        "{err}"
    );
    assert!(
        err.contains("orchestrator policy"),
        "which policy refused: {err}"
    );
    let w = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "--env",
            "VISIBLE=yes",
            "--",
            "sleep",
            "60",
        ])
        .await
        .trim()
        .to_string();
    // Credentials never reach the sandbox: not in its config, env, labels,
    // mounts or command, nor visible from inside.
    let inspect = docker(&["inspect", &format!("tether-{w}")]);
    assert!(inspect.contains("VISIBLE=yes"));
    assert!(
        !inspect.contains(SECRET) && !inspect.contains("registry.example"),
        "credential leaked into the container"
    );
    let inside = h
        .ctl_ok(&[
            "exec",
            &w,
            "--",
            "sh",
            "-c",
            "env; cat /proc/1/cmdline; ls -R / 2>/dev/null | head -2000",
        ])
        .await;
    assert!(!inside.contains(SECRET));

    // Stale: an older version is ignored, with a reason.
    let old = ulid::Ulid::from_parts(1, 1).to_string();
    let out = push(&h, &node, &format!("config_version: \"{old}\"\n"));
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not newer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Invalid: failed, nothing changed.
    let out = push(
        &h,
        &node,
        &format!("config_version: \"{}\"\nversion: 7\n", ulid::Ulid::new()),
    );
    assert_eq!(out.status.code(), Some(1));
    let a = ack(&out);
    assert_eq!(a["status"], "failed");
    assert_eq!(a["effective_config_hash"].as_str().unwrap(), hash);
    // Fails while applying (its default image cannot be had): rolled back.
    let v3 = ulid::Ulid::new().to_string();
    let out = push(
        &h,
        &node,
        &format!(
            "config_version: \"{v3}\"\npolicy:\n  sandbox:\n    default_image: no-such-image-tether:9\n"
        ),
    );
    let a = ack(&out);
    assert_eq!(a["status"], "rolled_back", "{a}");
    assert_eq!(a["error"]["type"], "apply");
    assert_eq!(a["effective_config_hash"].as_str().unwrap(), hash);
    assert!(
        std::fs::read_to_string(&file).unwrap().contains(&v1),
        "the previous file is back"
    );
    let detail: Value = serde_json::from_str(&h.ctl_ok(&["node", "inspect", &node]).await).unwrap();
    assert_eq!(detail["config_version"], v1.as_str());
    assert_eq!(detail["last_config_ack"]["status"], "rolled_back");

    // Survives an agent restart.
    stop.cancel();
    agent.await.unwrap().unwrap();
    h.wait_status(&node, "offline").await;
    let stop2 = tokio_util::sync::CancellationToken::new();
    let agent2 = tokio::spawn(tether::agent::run(cfg, stop2.clone()));
    h.wait_status(&node, "online").await;
    let detail: Value = serde_json::from_str(&h.ctl_ok(&["node", "inspect", &node]).await).unwrap();
    assert_eq!(detail["config_version"], v1.as_str());
    let out = h
        .ctl(&["spawn", "--image", &img, "--memory", "128", "--", "true"])
        .await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox.resources.max_memory_mb"));
    stop2.cancel();
    agent2.await.unwrap().unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_policy_is_the_last_word() {
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    // The node allows at most 2 workers and 128 MB each, whatever is pushed.
    cfg.policy = tether::agent::policy::Policy::from_file(&tether::config::Sandbox {
        max_concurrency: 2,
        allowed_images: vec!["tether-test-*".into()],
        resources: tether::config::Resources {
            max_memory_mb: 128,
            ..Default::default()
        },
        ..Default::default()
    });
    let node = h.add_agent_with(cfg).await;
    // A default image the node does not allow is refused before any pull
    // (a pull would fail here and roll back instead).
    let yaml = format!(
        "config_version: \"{}\"\npolicy:\n  sandbox:\n    default_image: evil-miner:1\n",
        ulid::Ulid::new()
    );
    let a = ack(&push(&h, &node, &yaml));
    assert_eq!(a["status"], "failed", "{a}");
    assert_eq!(a["error"]["type"], "invalid", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("node policy's allowed_images"),
        "{a}"
    );
    // So is an inference backend's image: the node runs nothing it would
    // not run for a worker.
    let yaml = format!(
        "config_version: \"{}\"\ninference_backend:\n  enabled: true\n  image: evil-miner:1\n",
        ulid::Ulid::new()
    );
    let a = ack(&push(&h, &node, &yaml));
    assert_eq!(a["status"], "failed", "{a}");
    assert!(
        a["error"]["message"].as_str().unwrap().contains(
            "inference_backend.image \"evil-miner:1\" is not in the node policy's allowed_images"
        ),
        "{a}"
    );
    // The orchestrator asks for more: it cannot widen the node's policy.
    let yaml = "policy:\n  sandbox:\n    max_concurrency: 100\n    resources:\n      max_memory_mb: 4096\n";
    let a = ack(&push(&h, &node, yaml));
    assert_eq!(a["status"], "applied");
    let img = image();
    let out = h
        .ctl(&["spawn", "--image", &img, "--memory", "1024", "--", "true"])
        .await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox.resources.max_memory_mb"));
    h.ctl_ok(&["spawn", "--image", &img, "--", "sleep", "60"])
        .await;
    h.ctl_ok(&["spawn", "--image", &img, "--", "sleep", "60"])
        .await;
    let out = h
        .ctl(&["spawn", "--image", &img, "--", "sleep", "60"])
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy_denied") && err.contains("sandbox.max_concurrency"),
        "{err}"
    );
    // Defaults apply even when the request names none: limits always set.
    let ps: Value = serde_json::from_str(&h.ctl_ok(&["ps", "--json"]).await).unwrap();
    let id = ps[0]["worker_id"].as_str().unwrap();
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.Memory}}",
            &format!("tether-{id}")
        ]),
        (128u64 << 20).to_string()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_sandbox_mode_refuses_spawns() {
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.policy = tether::agent::policy::Policy::from_file(&tether::config::Sandbox {
        mode: "disabled".into(),
        ..Default::default()
    });
    h.add_agent_with(cfg).await;
    let out = h.ctl(&["spawn", "--image", &image(), "--", "true"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy_denied") && err.contains("sandbox.mode"),
        "{err}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_polls_for_configuration_when_asked_to() {
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.config_poll = Some(std::time::Duration::from_secs(1));
    let node = h.add_agent_with(cfg).await;
    // Staged, not pushed: only the agent's poll can bring it.
    let version = h
        .hub
        .set_desired_config(
            &node,
            tether::protocol::NodeConfig {
                version: 1,
                ..Default::default()
            },
        )
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let d = h.hub.node_detail(&node).unwrap();
        if d.config_version.as_deref() == Some(version.as_str()) {
            assert_eq!(
                d.last_config_ack.unwrap().status,
                tether::protocol::AckStatus::Applied
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never picked up the staged configuration"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_request_size_limit_refuses_large_requests() {
    let mut h = Harness::server().await;
    let node = h.add_agent().await;
    let w = h
        .ctl_ok(&["spawn", "--image", &image(), "--", "sleep", "60"])
        .await
        .trim()
        .to_string();
    let big = "x".repeat(4000);
    assert_eq!(
        h.ctl_ok(&["exec", &w, "--", "echo", &big]).await.trim(),
        big
    );
    let a = ack(&push(
        &h,
        &node,
        "constraints:\n  max_request_bytes: 2048\n",
    ));
    assert_eq!(a["status"], "applied");
    let out = h.ctl(&["exec", &w, "--", "echo", &big]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("too_large") && err.contains("2048"), "{err}");
    assert_eq!(
        h.ctl_ok(&["exec", &w, "--", "echo", "small"]).await,
        "small\n"
    );
    h.stop().await;
}

/// A policy narrowed while workers run holds for them too: at the agent's
/// next start (a node file tightened) and at a pushed configuration, the
/// workers and services it would not admit now are stopped, kept, with
/// their restart policy cleared; those it admits run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_policy_stops_what_it_no_longer_admits() {
    use tether::config::{Mounts, Resources, Sandbox};
    let mut h = Harness::server().await;
    let node = unique("narrow");
    let shared = h.state_path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let shared = shared.canonicalize().unwrap().to_string_lossy().to_string();
    let wide = Sandbox {
        mounts: Mounts {
            allowed_host_paths: vec![shared.clone()],
            ..Default::default()
        },
        resources: Resources {
            max_memory_mb: 256,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut cfg = h.agent_config(&node);
    cfg.policy = tether::agent::policy::Policy::from_file(&wide);
    h.add_agent_with(cfg).await;
    let img = image();
    let spawn = |extra: &[&str]| {
        let mut a = vec!["spawn", "--image", img.as_str()];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--", "sleep", "3600"]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let mut ids = vec![];
    for extra in [
        vec!["--memory", "256"],
        vec!["--memory", "64"],
        vec!["--memory", "64", "-v"],
    ] {
        let mut args = spawn(&extra);
        if extra.last() == Some(&"-v") {
            args.insert(args.len() - 3, format!("{shared}:/data:rw"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ids.push(h.ctl_ok(&args).await.trim().to_string());
    }
    let (big, small, mounted) = (&ids[0], &ids[1], &ids[2]);
    let dep = unique("nar");
    let text = format!(
        "services:\n  web:\n    image: {img}\n    command: [\"sleep\", \"3600\"]\n    mem_limit: 256m\n    restart: always\n"
    );
    let out = h.deploy_up_as(&h.token, &text, &dep).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svc = format!("{dep}_web");
    let state = |w: &str| {
        docker(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.HostConfig.RestartPolicy.Name}}",
            &format!("tether-{w}"),
        ])
    };
    for w in [big, small, mounted] {
        assert!(state(w).starts_with("running"), "{w}: {}", state(w));
    }
    assert_eq!(state(&svc).trim(), "running always");

    // The agent stops; its node file is narrowed: 128 MB at most, no host
    // path. At its next start, what exceeds that is stopped.
    h.stop_agents().await;
    let narrow = Sandbox {
        resources: Resources {
            max_memory_mb: 128,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut cfg = h.agent_config(&node);
    cfg.policy = tether::agent::policy::Policy::from_file(&narrow);
    let again = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(tether::agent::run(cfg, again.clone()));
    let exited = |w: String| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !state(&w).starts_with("exited") {
            assert!(std::time::Instant::now() < deadline, "{w}: {}", state(&w));
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    for w in [big, mounted, &svc] {
        exited(w.clone()).await;
    }
    h.wait_status(&node, "online").await;
    assert_eq!(state(&svc).trim(), "exited no", "no restart brings it back");
    assert!(state(small).starts_with("running"), "{}", state(small));
    // Kept, not removed: the operator still finds and removes them.
    let ps = h.ctl_ok(&["ps"]).await;
    assert!(
        ps.contains(big.as_str()) && ps.contains(mounted.as_str()),
        "{ps}"
    );

    // A pushed configuration that narrows further holds at once.
    let yaml = "policy:\n  sandbox:\n    resources:\n      max_memory_mb: 32\n";
    let a = ack(&push(&h, &node, yaml));
    assert_eq!(a["status"], "applied", "{a}");
    exited(small.clone()).await;
    h.ctl_ok(&["deploy", "down", &dep]).await;
    again.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), agent).await;
    h.stop().await;
}
