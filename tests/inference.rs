//! Node-local inference against a real engine (docs/inference.md): the
//! node's one backend (the Ollama stand-in in an image of its own), each
//! job's proxy on its own `localhost:11434`, and the isolation around them.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tether::protocol::{
    AckStatus, ErrorCode, InferenceBackend, InferenceVariant, NetworkPolicy, NodeConfig,
    SpawnRequest,
};

/// The agent's image (gateway and job proxies run it) and an "Ollama"
/// image: the same binary serving the stand-in on its loopback.
fn images() -> (String, String) {
    let agent = format!("tether-agent:{}", unique("test-inf"));
    build_agent_image(&agent);
    let standin = format!("tether-agent:{}", unique("test-ollama"));
    let dockerfile = format!(
        "FROM {agent}\nLABEL tether.test=1\nENTRYPOINT [\"/usr/local/bin/tether-agent\", \"inference-standin\", \"--listen\", \"127.0.0.1:11434\", \"--token-delay-ms\", \"100\"]\n"
    );
    build_image_from(&standin, &dockerfile);
    (agent, standin)
}

fn backend(image: &str) -> InferenceBackend {
    InferenceBackend {
        enabled: true,
        image: Some(image.into()),
        variant: InferenceVariant::Cpu,
        env: Default::default(),
        models: vec![],
    }
}

fn config(b: Option<InferenceBackend>) -> NodeConfig {
    NodeConfig {
        version: 1,
        inference_backend: b,
        ..Default::default()
    }
}

/// Containers of `node` carrying the inference label, by name.
fn inference_containers(node: &str) -> Vec<String> {
    let mut v: Vec<String> = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=tether.node_id={node}"),
        "--filter",
        "label=tether.inference",
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .map(String::from)
    .collect();
    v.sort();
    v
}

/// The logs of the node's inference containers (for failure messages).
fn logs(node: &str) -> String {
    let mut out = String::new();
    for c in docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=tether.node_id={node}"),
        "--format",
        "{{.Names}}",
    ])
    .lines()
    {
        out += &format!("== {c}\n{}\n", docker_all(&["logs", c]));
    }
    out
}

async fn sh(h: &Harness, worker: &str, script: &str) -> (i64, String) {
    let (code, out, err) = h
        .hub
        .exec_collect(worker, &["sh", "-c", script])
        .await
        .unwrap();
    (
        code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        ),
    )
}

/// One HTTP/1.0 exchange with the job's proxy, from inside the worker.
fn http(method: &str, path: &str, body: &str) -> String {
    format!(
        "printf '{method} {path} HTTP/1.0\\r\\nHost: localhost\\r\\nContent-Type: application/json\\r\\nContent-Length: {}\\r\\n\\r\\n{body}' | nc localhost 11434",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reaches_the_nodes_one_backend_through_its_own_proxy() {
    let (agent_image, standin) = images();
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.identity.inference_enabled = true;
    // The node file's inference.max_request_mb, made small.
    cfg.identity.inference_max_body_bytes = 4096;
    cfg.egress_proxy_image = Some(agent_image.clone());
    let node = h.add_agent_with(cfg.clone()).await;

    // The push starts the backend; the ack says so.
    let mut with_models = backend(&standin);
    with_models.models = vec!["standin:latest".into(), "no-such:model".into()];
    let ack = h
        .hub
        .push_config(&node, config(Some(with_models)))
        .await
        .unwrap();
    assert_eq!(ack.status, AckStatus::Applied, "{ack:?}");
    let st = ack.inference.expect("the ack reports inference");
    assert!(st.supported && st.running && st.healthy, "{st:?}");
    assert_eq!(st.image.as_deref(), Some(standin.as_str()));
    assert_eq!(st.gpus, 0, "no GPU on this machine");
    let base = inference_containers(&node);
    assert_eq!(base.len(), 2, "a gateway and one backend: {base:?}");
    // The gateway holds to the node's limits too, not only the job proxies.
    let cmds: Vec<String> = base
        .iter()
        .map(|c| docker(&["inspect", "-f", "{{json .Config.Cmd}}", c]))
        .collect();
    assert!(
        cmds.iter()
            .any(|c| c.contains("\"inference-proxy\"")
                && c.contains("\"--max-body-bytes\",\"4096\"")),
        "{cmds:?}"
    );
    // Nothing published; no capability, no new privileges, bounded
    // processes: the backend runs an image the orchestrator chose.
    for c in &base {
        let ports = docker(&["inspect", "-f", "{{json .HostConfig.PortBindings}}", c]);
        assert!(ports == "{}" || ports == "null", "{c}: {ports}");
        let held = docker(&[
            "inspect",
            "-f",
            "{{json .HostConfig.CapDrop}} {{json .HostConfig.SecurityOpt}} {{.HostConfig.PidsLimit}}",
            c,
        ]);
        let mut parts = held.split(' ');
        let (caps, opts, pids) = (parts.next(), parts.next(), parts.next());
        assert_eq!(caps, Some("[\"ALL\"]"), "{c}: {held}");
        assert!(
            opts.is_some_and(|o| o.contains("no-new-privileges")),
            "{c}: {held}"
        );
        let pids: i64 = pids.and_then(|p| p.trim().parse().ok()).unwrap_or(0);
        assert!(pids > 0, "{c}: no process bound: {held}");
    }

    // The models are pulled after the ack; the report follows each one.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caps = h.hub.node_detail(&node).unwrap().capabilities;
        let models = caps
            .as_ref()
            .map(|c| serde_json::to_value(&c.inference.status.models).unwrap());
        if let Some(m) = &models
            && m["standin:latest"] == "ready"
            && m["no-such:model"]
                .as_str()
                .is_some_and(|s| s.starts_with("failed:"))
        {
            assert!(
                m["no-such:model"]
                    .as_str()
                    .unwrap()
                    .contains("does not exist"),
                "{m}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "models pulled and reported: {models:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The report says it runs: the server places a job asking for it. Its
    // command asks the model first thing: the proxy already listens.
    let first = format!("{}; sleep 600", http("GET", "/api/version", ""));
    let w = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                first.replace("nc localhost 11434", "nc localhost 11434 > /tmp/first 2>&1"),
            ],
            inference: true,
            // Even with no network at all, the proxy is on its loopback.
            network_policy: Some(NetworkPolicy::None),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(w.node_id, node);
    let (_, said) = sh(
        &h,
        &w.worker_id,
        "for i in $(seq 50); do [ -s /tmp/first ] && break; sleep 0.1; done; cat /tmp/first",
    )
    .await;
    assert!(
        said.starts_with("HTTP/1.0 200"),
        "the job's first request: {said:?}"
    );
    // The job's host name is its own, though its proxy holds the namespace.
    let (_, host) = sh(&h, &w.worker_id, "hostname").await;
    assert!(host.trim().starts_with("w-"), "{host}");
    let (_, env) = sh(&h, &w.worker_id, "echo $OLLAMA_BASE_URL").await;
    assert_eq!(env.trim(), "http://localhost:11434");
    let (code, tags) = sh(&h, &w.worker_id, &http("GET", "/api/tags", "")).await;
    assert_eq!(code, 0, "{tags}");
    assert!(tags.starts_with("HTTP/1.0 200"), "{tags}\n{}", logs(&node));
    assert!(tags.contains("standin:latest"), "{tags}");

    // A streamed generation arrives as produced: 8 tokens 100 ms apart,
    // then the final chunk.
    let t0 = Instant::now();
    let (code, gen_out) = sh(
        &h,
        &w.worker_id,
        &http(
            "POST",
            "/api/generate",
            r#"{"model":"standin:latest","prompt":"hi"}"#,
        ),
    )
    .await;
    assert_eq!(code, 0, "{gen_out}");
    let chunks = gen_out
        .lines()
        .filter(|l| l.contains("\"done\":false"))
        .count();
    assert_eq!(chunks, 8, "{gen_out}");
    assert!(gen_out.contains("\"done\":true"), "{gen_out}");
    assert!(t0.elapsed() >= Duration::from_millis(800));

    // A request over the node's limit is refused by the proxy, with
    // Ollama's error shape.
    let (_, big) = sh(
        &h,
        &w.worker_id,
        "printf 'POST /api/generate HTTP/1.0\\r\\nHost: localhost\\r\\nContent-Length: 5000\\r\\n\\r\\n' | nc localhost 11434",
    )
    .await;
    assert!(big.starts_with("HTTP/1.0 413"), "{big}");
    assert!(big.contains("\"error\"") && big.contains("4096"), "{big}");
    // Models are the node's to manage: a pull (which would reach any
    // registry, whatever the job's network policy), a delete or a blob
    // upload is refused by the proxy.
    for (method, path) in [
        ("POST", "/api/pull"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:00"),
    ] {
        let (_, r) = sh(
            &h,
            &w.worker_id,
            &http(
                method,
                path,
                r#"{"model":"registry.example/x","insecure":true}"#,
            ),
        )
        .await;
        assert!(r.starts_with("HTTP/1.0 403"), "{method} {path}: {r}");
        assert!(r.contains("not open to jobs"), "{r}");
    }

    // The job's inspect counts what its proxy carried (its totals are
    // logged each second they change).
    let deadline = Instant::now() + Duration::from_secs(10);
    let usage = loop {
        let u = h.hub.inspect(&w.worker_id).await.unwrap().inference;
        let u = u.expect("an inference job's inspect has its usage");
        if u.requests >= 3 && u.refused >= 1 {
            break u;
        }
        assert!(Instant::now() < deadline, "usage counted: {u:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(usage.bytes_out > 500 && usage.bytes_in > 0, "{usage:?}");

    // A second job has a proxy of its own; a job without inference has none.
    let w2 = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "600".into()],
            inference: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let plain = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "600".into()],
            node_id: Some(node.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, t2) = sh(&h, &w2.worker_id, &http("GET", "/api/version", "")).await;
    assert!(t2.starts_with("HTTP/1.0 200"), "{t2}");
    let (code, none) = sh(&h, &plain.worker_id, "nc -w 2 localhost 11434 </dev/null").await;
    assert_ne!(code, 0, "a job without inference reaches no proxy: {none}");
    assert_eq!(
        h.hub.inspect(&plain.worker_id).await.unwrap().inference,
        None
    );
    let (_, penv) = sh(&h, &plain.worker_id, "echo x${OLLAMA_BASE_URL}x").await;
    assert_eq!(penv.trim(), "xx");
    // The gateway's address is reachable from no worker.
    let gw_ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &base[0],
    ]);
    assert!(
        !gw_ip.is_empty(),
        "the gateway has an address on its own network"
    );
    for wk in [&w2.worker_id, &plain.worker_id] {
        let (code, out) = sh(&h, wk, &format!("nc -w 2 {gw_ip} 11434 </dev/null")).await;
        assert_ne!(code, 0, "a worker reached the inference gateway: {out}");
    }

    // Removing a job removes its proxy.
    h.hub.remove(&w.worker_id, true).await.unwrap();
    let proxies = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=tether.sidecar_for={}", w.worker_id),
        "-q",
    ]);
    assert!(proxies.is_empty(), "the job's proxy is gone");

    // Disabled: the backend goes, and jobs asking for it are refused.
    h.hub.remove(&w2.worker_id, true).await.unwrap();
    let mut off = backend(&standin);
    off.enabled = false;
    let ack = h.hub.push_config(&node, config(Some(off))).await.unwrap();
    let st = ack.inference.unwrap();
    assert!(!st.running, "{st:?}");
    assert!(inference_containers(&node).is_empty());
    let e = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["true".into()],
            inference: true,
            node_id: Some(node.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
    h.stop().await;
    for img in [&standin, &agent_image] {
        docker(&["image", "rm", "-f", img]);
    }
}

/// The server's configuration for new nodes (`--node-config`) brings the
/// backend up at registration, with no push; an agent restart adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_is_adopted_after_an_agent_restart_and_remade_if_removed() {
    let (agent_image, standin) = images();
    let for_new_nodes = config(Some(backend(&standin)));
    let h = Harness::server_with(|c| c.node_config = Some(for_new_nodes)).await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.identity.inference_enabled = true;
    cfg.egress_proxy_image = Some(agent_image.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let node = cfg.node_id.clone();
    h.track(&node);
    let agent = tokio::spawn(tether::agent::run(cfg.clone(), stop.clone()));
    h.wait_status(&node, "online").await;
    // Reported within seconds (placement goes by the report), not at the
    // next periodic report a minute on.
    let healthy = || async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let caps = h.hub.node_detail(&node).unwrap().capabilities;
            if caps.as_ref().is_some_and(|c| c.inference.status.healthy) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the backend reported healthy: {caps:?} {}",
                logs(&node)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    healthy().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = h.hub.node_detail(&node).unwrap();
        assert!(d.desired_config_version.is_some(), "wanted at registration");
        if d.config_version == d.desired_config_version
            && d.last_config_ack
                .as_ref()
                .is_some_and(|a| a.inference.as_ref().is_some_and(|i| i.running))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the configuration for new nodes applied: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids = |node: &str| {
        docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=tether.node_id={node}"),
            "--filter",
            "label=tether.inference",
        ])
    };
    let before = ids(&node);
    assert_eq!(before.lines().count(), 2);

    // The agent restarts: the same two containers, adopted.
    stop.cancel();
    let _ = agent.await;
    let stop2 = tokio_util::sync::CancellationToken::new();
    let agent2 = tokio::spawn(tether::agent::run(cfg.clone(), stop2.clone()));
    h.wait_status(&node, "online").await;
    healthy().await;
    assert_eq!(ids(&node), before, "adopted, not made again");
    // Pushed again (a new version of the same backend), twice: still one.
    for _ in 0..2 {
        let ack = h
            .hub
            .push_config(&node, config(Some(backend(&standin))))
            .await
            .unwrap();
        assert!(ack.inference.unwrap().running);
        assert_eq!(ids(&node), before, "the same backend after a re-push");
    }

    // The gateway, which holds the namespace the backend joined, restarts
    // (a crash, out of memory): the engine gives it a new namespace and
    // leaves the backend in the old one. The agent restarts the backend
    // into the new one: the gateway's probe through its loopback answers
    // again, with the same two containers.
    let gateway = inference_containers(&node)
        .into_iter()
        .find(|n| !n.ends_with("-backend"))
        .expect("a gateway");
    docker(&["restart", "-t", "1", &gateway]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health = docker(&["inspect", "-f", "{{.State.Health.Status}}", &gateway]);
        if health.trim() == "healthy" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway reaches the backend again: {health} {}",
            logs(&node)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(ids(&node), before, "restarted, not made again");

    // Removed behind the agent's back: an agent start makes it again.
    for id in before.lines() {
        docker(&["rm", "-f", id]);
    }
    stop2.cancel();
    let _ = agent2.await;
    let stop3 = tokio_util::sync::CancellationToken::new();
    let agent3 = tokio::spawn(tether::agent::run(cfg.clone(), stop3.clone()));
    h.wait_status(&node, "online").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids(&node).lines().count() != 2 {
        assert!(Instant::now() < deadline, "the backend was made again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop3.cancel();
    let _ = agent3.await;

    // The node's file is tightened, its image no longer allowed, and the
    // agent restarts: the stored configuration does not run it, and the
    // report says why.
    let mut strict = cfg.clone();
    strict.policy.allowed_images = vec!["registry.invalid/only-this/*".into()];
    let stop4 = tokio_util::sync::CancellationToken::new();
    let agent4 = tokio::spawn(tether::agent::run(strict, stop4.clone()));
    h.wait_status(&node, "online").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caps = h.hub.node_detail(&node).unwrap().capabilities;
        let note = caps
            .as_ref()
            .and_then(|c| c.inference.status.note.clone())
            .unwrap_or_default();
        if note.contains("allowed_images") && ids(&node).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backend the node no longer allows is gone: {note:?} {}",
            ids(&node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop4.cancel();
    let _ = agent4.await;
    h.stop().await;
    for img in [&standin, &agent_image] {
        docker(&["image", "rm", "-f", img]);
    }
}

/// A node whose file does not allow inference runs none, whatever is
/// pushed, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_inference_runs_no_backend_whatever_is_pushed() {
    let (h, node) = Harness::start().await;
    let ack = h
        .hub
        .push_config(&node, config(Some(backend("ollama/ollama:latest"))))
        .await
        .unwrap();
    assert_eq!(ack.status, AckStatus::Applied, "{ack:?}");
    let st = ack.inference.expect("the ack reports inference");
    assert!(!st.supported && !st.running, "{st:?}");
    assert!(
        st.note
            .as_deref()
            .unwrap_or("")
            .contains("does not allow inference"),
        "{st:?}"
    );
    assert!(inference_containers(&node).is_empty());
    assert!(
        docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=tether.node_id={node}")
        ])
        .is_empty(),
        "nothing made"
    );
    h.stop().await;
}
