//! Deployments against the real engine, driven through `tether ctl` as a
//! user would: a Compose file up, reached by service name and through a
//! tunnel, across an agent restart, converged after an edit, down with
//! nothing left; isolation both ways; refusals that leave nothing behind.

mod common;

use common::*;
use std::time::Duration;
use tether::protocol::DeploymentInfo;

/// db serves a file and turns healthy; api (started once db is healthy)
/// answers `/cgi-bin/data` with what it fetches from db by name; web
/// prints a line and waits.
fn app(image: &str, web_says: &str) -> String {
    format!(
        r#"
services:
  db:
    image: {image}
    command: ["sh", "-c", "mkdir -p /www && echo secret-data > /www/data && exec httpd -f -p 8080 -h /www"]
    healthcheck:
      test: ["CMD", "sh", "-c", "echo | nc 127.0.0.1 8080"]
      interval: 300ms
      retries: 30
    volumes: ["state:/state"]
  api:
    image: {image}
    depends_on:
      db:
        condition: service_healthy
    command:
      - sh
      - -c
      - |
        mkdir -p /www/cgi-bin
        printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\nprintf "GET /data HTTP/1.0\\r\\n\\r\\n" | nc db 8080 | tail -n 1\n' > /www/cgi-bin/data
        chmod +x /www/cgi-bin/data
        exec httpd -f -p 80 -h /www
    expose: [80]
    restart: always
  web:
    image: {image}
    depends_on: [api]
    command: ["sh", "-c", "echo {web_says}; exec sleep 3600"]
volumes:
  state:
"#
    )
}

fn write(h: &Harness, name: &str, text: &str) -> String {
    let p = h.state_path(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

async fn up(h: &Harness, file: &str, name: &str, extra: &[&str]) -> DeploymentInfo {
    let mut args = vec!["deploy", "up", "-f", file, "--name", name, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&h.ctl_ok(&args).await).unwrap()
}

/// `deploy up` that may be refused: its output.
async fn try_up(h: &Harness, file: &str, name: &str) -> std::process::Output {
    h.ctl(&["deploy", "up", "-f", file, "--name", name]).await
}

fn ids(d: &DeploymentInfo) -> Vec<(String, String)> {
    d.services
        .iter()
        .map(|s| {
            (
                s.worker.service.clone().unwrap(),
                s.worker.container_id.clone(),
            )
        })
        .collect()
}

fn actions(d: &DeploymentInfo) -> Vec<String> {
    d.services
        .iter()
        .map(|s| {
            format!(
                "{}:{:?}",
                s.worker.service.as_deref().unwrap(),
                s.action.unwrap()
            )
            .to_lowercase()
        })
        .collect()
}

/// Docker's time stamp of `field` (a Go template) of a container.
fn docker_time(id: &str, field: &str) -> std::time::SystemTime {
    let t = docker(&["inspect", "-f", field, id]);
    humantime::parse_rfc3339_weak(t.trim_end_matches('Z').split('.').next().unwrap())
        .map(|s| {
            let nanos: String = t
                .split('.')
                .nth(1)
                .unwrap_or("0")
                .trim_end_matches('Z')
                .into();
            s + Duration::from_nanos(format!("{nanos:0<9}")[..9].parse().unwrap())
        })
        .unwrap_or_else(|e| panic!("{field} of {id}: {t:?}: {e}"))
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = tokio::net::TcpStream::connect(addr).await {
            let req = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
            c.write_all(req.as_bytes()).await.unwrap();
            let mut got = String::new();
            let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut got)).await;
            if matches!(r, Ok(Ok(_))) && got.contains("200 OK") {
                return got;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer from {addr}{path}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn leftovers(name: &str) -> (String, String, String) {
    let f = format!("label=tether.deployment={name}");
    (
        docker(&["ps", "-aq", "--filter", &f]),
        docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("name=tether-dep-{name}"),
        ]),
        docker(&["volume", "ls", "-q", "--filter", &f]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_service_deployment_comes_up_in_order_serves_survives_converges_and_goes() {
    let h = Harness::server_with(|c| c.preview_domain = Some("preview.test".into())).await;
    let cfg = h.agent_config(&unique("test"));
    let node = cfg.node_id.clone();
    h.track(&node);
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(tether::agent::run(cfg.clone(), stop.clone()));
    h.wait_status(&node, "online").await;
    let name = unique("shop");
    let file = write(&h, "app.yaml", &app(&image(), "web-up"));

    // Up, in order: api starts only once db's health check has passed.
    let d = up(&h, &file, &name, &[]).await;
    assert_eq!(d.node_id, node);
    assert_eq!(actions(&d), ["db:created", "api:created", "web:created"]);
    assert_eq!(d.services[0].health.as_deref(), Some("healthy"));
    let (db, api) = (&d.services[0].worker, &d.services[1].worker);
    assert_eq!(db.worker_id, format!("{name}_db"));
    assert_eq!(db.network, format!("tether-dep-{name}"));
    let healthy_at = {
        let log = docker(&[
            "inspect",
            "-f",
            "{{json .State.Health.Log}}",
            &db.container_id,
        ]);
        let log: serde_json::Value = serde_json::from_str(&log).unwrap();
        let first_ok = log
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["ExitCode"] == 0)
            .expect("a passing probe");
        let end = first_ok["End"].as_str().unwrap().to_string();
        humantime::parse_rfc3339_weak(end.split('.').next().unwrap()).unwrap()
    };
    let api_started = docker_time(&api.container_id, "{{.State.StartedAt}}");
    assert!(
        api_started + Duration::from_secs(1) > healthy_at,
        "api started before db was healthy"
    );
    assert_eq!(d.volumes, [format!("tether-dep-{name}_state")]);
    // Nothing is published.
    for s in &d.services {
        let ports = docker(&[
            "inspect",
            "-f",
            "{{json .HostConfig.PortBindings}}",
            &s.worker.container_id,
        ]);
        assert!(ports == "{}" || ports == "null", "{ports}");
    }

    // Services reach each other by name; web gets db's data through api.
    let got = h
        .ctl_ok(&[
            "exec",
            &format!("{name}/web"),
            "--",
            "sh",
            "-c",
            "printf 'GET /cgi-bin/data HTTP/1.0\\r\\n\\r\\n' | nc api 80",
        ])
        .await;
    assert!(got.ends_with("secret-data\n"), "{got:?}");

    // Through a tunnel from the operator's machine.
    let (mut pf, addr) = port_forward(&h, &format!("{name}/api"), ":80").await;
    let page = http_get(&addr, "/cgi-bin/data").await;
    assert!(page.ends_with("secret-data\n"), "{page:?}");
    pf.kill().await.unwrap();

    // A preview URL for NAME/SERVICE:PORT, host-based (`_` is spelled `--`).
    let url = h
        .ctl_ok(&["preview-url", &format!("{name}/api"), "80"])
        .await;
    let host = format!("80-{name}--api.preview.test");
    let query = url
        .trim()
        .strip_prefix(&format!("http://{host}/"))
        .unwrap_or_else(|| panic!("{url}"));
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/{query}", h.url))
        .header("host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = client
        .get(format!("{}/cgi-bin/data", h.url))
        .header("host", &host)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page, "secret-data\n");

    // A service that dies is restarted by its policy, and its exit is a
    // worker event.
    let mut events = h.hub.worker_events();
    let api_id = format!("{name}/api");
    h.ctl_ok(&["exec", &api_id, "--", "sh", "-c", "kill $(pidof httpd)"])
        .await;
    let ev = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (_, ev) = events.recv().await.unwrap();
            if ev.worker_id == format!("{name}_api") {
                return ev;
            }
        }
    })
    .await
    .expect("an exit event for api");
    assert_eq!(ev.event, tether::protocol::WorkerEventKind::Exited);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let d: DeploymentInfo =
            serde_json::from_str(&h.ctl_ok(&["deploy", "inspect", &name]).await).unwrap();
        let api = &d.services[1];
        if api.restarts >= 1 && api.worker.state == tether::protocol::WorkerState::Running {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "api not restarted: {api:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut pf, addr) = port_forward(&h, &api_id, ":80").await;
    let page = http_get(&addr, "/cgi-bin/data").await;
    assert!(page.ends_with("secret-data\n"), "{page:?}");
    pf.kill().await.unwrap();

    // Files both ways, by NAME/SERVICE.
    let local = h.state_path("blob.bin");
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &blob).unwrap();
    let web = format!("{name}/web");
    h.ctl_ok(&["cp", local.to_str().unwrap(), &format!("{web}:/tmp")])
        .await;
    let back = h.state_path("back");
    std::fs::create_dir_all(&back).unwrap();
    h.ctl_ok(&[
        "cp",
        &format!("{web}:/tmp/blob.bin"),
        back.to_str().unwrap(),
    ])
    .await;
    assert_eq!(
        sha256(&std::fs::read(back.join("blob.bin")).unwrap()),
        sha256(&blob)
    );

    // Followed logs, prefixed by service, as they come.
    let mut follow = h.ctl_running(&["deploy", "logs", "-f", &name, "web"]);
    {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a followed line")
            .unwrap();
        assert_eq!(first.as_deref(), Some("web | web-up"));
        h.ctl_ok(&["exec", &web, "--", "sh", "-c", "echo later > /proc/1/fd/1"])
            .await;
        let next = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a line written later, while following")
            .unwrap();
        assert_eq!(next.as_deref(), Some("web | later"));
    }
    follow.kill().await.unwrap();

    // Logs, prefixed by service.
    let logs = h.ctl_ok(&["deploy", "logs", &name]).await;
    assert!(logs.lines().any(|l| l == "web | web-up"), "{logs:?}");
    let ls = h.ctl_ok(&["deploy", "ls"]).await;
    assert!(
        ls.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == [name.as_str(), node.as_str(), "3", "3"]),
        "{ls}"
    );

    // The agent restarts: the deployment is adopted as it was.
    stop.cancel();
    let _ = agent.await;
    let stop2 = tokio_util::sync::CancellationToken::new();
    let agent2 = tokio::spawn(tether::agent::run(cfg.clone(), stop2.clone()));
    h.wait_status(&node, "online").await;
    let again = up(&h, &file, &name, &[]).await;
    assert_eq!(
        actions(&again),
        ["db:unchanged", "api:unchanged", "web:unchanged"]
    );
    assert_eq!(ids(&again), ids(&d), "the same containers after a restart");

    // A service that stopped runs again on the next `up` (same container),
    // under its own restart policy even if it was cleared (as a narrowed
    // node policy clears it when it stops a service).
    docker(&["stop", "-t", "1", &d.services[2].worker.container_id]);
    let api = &d.services[1].worker.container_id;
    docker(&["update", "--restart", "no", api]);
    docker(&["stop", "-t", "1", api]);
    let again = up(&h, &file, &name, &[]).await;
    assert_eq!(ids(&again), ids(&d));
    for s in [1, 2] {
        assert_eq!(
            again.services[s].worker.state,
            tether::protocol::WorkerState::Running
        );
    }
    assert_eq!(
        docker(&["inspect", "-f", "{{.HostConfig.RestartPolicy.Name}}", api]).trim(),
        "always"
    );

    // An edit to web: only web's container changes.
    let edited = write(&h, "app2.yaml", &app(&image(), "web-edited"));
    let after = up(&h, &edited, &name, &[]).await;
    assert_eq!(
        actions(&after),
        ["db:unchanged", "api:unchanged", "web:recreated"]
    );
    let (before_ids, after_ids) = (ids(&d), ids(&after));
    assert_eq!(before_ids[..2], after_ids[..2]);
    assert_ne!(before_ids[2], after_ids[2]);
    // A service dropped from the file goes.
    let without_web = app(&image(), "x");
    let without_web =
        without_web.split("  web:").next().unwrap().to_string() + "volumes:\n  state:\n";
    let fewer = up(&h, &write(&h, "app3.yaml", &without_web), &name, &[]).await;
    assert_eq!(fewer.removed, ["web"]);
    assert_eq!(fewer.services.len(), 2);
    assert_eq!(
        docker(&["ps", "-aq", "--filter", &format!("id={}", after_ids[2].1)]),
        ""
    );

    // Down: containers, network and (asked for) volumes gone.
    h.ctl_ok(&["deploy", "down", &name, "--volumes"]).await;
    assert_eq!(
        leftovers(&name),
        (String::new(), String::new(), String::new())
    );
    let out = h.ctl(&["deploy", "inspect", &name]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such deployment"));
    stop2.cancel();
    let _ = agent2.await;
}

/// Two deployments and a worker on one node: none reaches another's
/// services; within a deployment under policy `none` the services reach
/// each other and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_are_isolated_from_workers_and_from_each_other() {
    let (h, _node) = Harness::start().await;
    let img = image();
    let one = |port: u16| {
        format!(
            "services:\n  srv:\n    image: {img}\n    command: [\"sh\", \"-c\", \"mkdir -p /w && echo hi > /w/x && exec httpd -f -p {port} -h /w\"]\n  peer:\n    image: {img}\n    command: [\"sleep\", \"3600\"]\n"
        )
    };
    let (a, b) = (unique("iso-a"), unique("iso-b"));
    let da = up(&h, &write(&h, "a.yaml", &one(80)), &a, &[]).await;
    let db = up(
        &h,
        &write(&h, "b.yaml", &one(80)),
        &b,
        &["--network-policy", "none"],
    )
    .await;
    let ip = |d: &DeploymentInfo| {
        let srv = d
            .services
            .iter()
            .find(|s| s.worker.service.as_deref() == Some("srv"));
        srv.and_then(|s| s.worker.ip.clone())
            .expect("srv has an address")
    };
    let (ip_a, ip_b) = (ip(&da), ip(&db));
    let w = h.ctl_spawn_sleeper().await;
    let probe = |target: String, ip: String| {
        let h = &h;
        async move {
            let cmd = format!("printf 'GET /x HTTP/1.0\\r\\n\\r\\n' | timeout 3 nc {ip} 80");
            let out = h.ctl(&["exec", &target, "--", "sh", "-c", &cmd]).await;
            String::from_utf8_lossy(&out.stdout).contains("hi")
        }
    };
    // Within each deployment: yes (by address and by name), once the
    // servers listen.
    let mut reached = (false, false);
    for _ in 0..50 {
        reached = (
            reached.0 || probe(format!("{a}/peer"), ip_a.clone()).await,
            reached.1 || probe(format!("{b}/peer"), "srv".into()).await,
        );
        if reached == (true, true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        reached,
        (true, true),
        "siblings talk (b is under policy none)"
    );
    // Across: no, in every direction.
    assert!(
        !probe(w.clone(), ip_a.clone()).await,
        "worker -> deployment a"
    );
    assert!(
        !probe(w.clone(), ip_b.clone()).await,
        "worker -> deployment b"
    );
    assert!(!probe(format!("{a}/peer"), ip_b.clone()).await, "a -> b");
    assert!(!probe(format!("{b}/peer"), ip_a.clone()).await, "b -> a");
    // Policy none: the network has no way out.
    let internal = docker(&[
        "network",
        "inspect",
        "-f",
        "{{.Internal}}",
        &format!("tether-dep-{b}"),
    ]);
    assert_eq!(internal, "true");
    assert_eq!(
        db.network_policy,
        Some(tether::protocol::NetworkPolicy::None)
    );
    for d in [&a, &b] {
        h.ctl_ok(&["deploy", "down", d]).await;
        assert_eq!(leftovers(d).0, "");
        assert_eq!(leftovers(d).1, "");
    }
}

/// The node's disk limit holds for services as for workers: applied where
/// the storage driver can, refused clearly (and nothing left) where not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_gets_the_nodes_disk_limit() {
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.policy.max_disk_mb = 64;
    h.add_agent_with(cfg).await;
    let name = unique("disk");
    let text = format!(
        "services:\n  s:\n    image: {}\n    command: [\"sleep\", \"60\"]\n",
        image()
    );
    let file = write(&h, "disk.yaml", &text);
    let out = try_up(&h, &file, &name).await;
    if out.status.success() {
        let id = docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=tether.deployment={name}"),
        ]);
        let opt = docker(&[
            "inspect",
            "-f",
            "{{json .HostConfig.StorageOpt}}",
            id.trim(),
        ]);
        assert!(opt.contains("\"size\":\"64M\""), "{opt}");
        h.ctl_ok(&["deploy", "down", &name]).await;
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unsupported")
                && err.contains("storage driver")
                && err.contains("service s"),
            "{err}"
        );
    }
    assert_eq!(
        leftovers(&name),
        (String::new(), String::new(), String::new())
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failed_deployments_leave_nothing_behind() {
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.policy.max_memory_mb = 128;
    let shared = h.state_path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("f"), b"from-the-host").unwrap();
    let shared = shared.to_string_lossy().into_owned();
    cfg.policy.allowed_host_paths = vec![shared.clone()];
    let node = h.add_agent_with(cfg).await;
    let img = image();
    let name = unique("bad");

    // The node's policy refuses the second service: nothing starts.
    let text = format!(
        "services:\n  ok:\n    image: {img}\n    command: [\"sleep\", \"60\"]\n  big:\n    image: {img}\n    mem_limit: 512m\n"
    );
    let out = try_up(&h, &write(&h, "big.yaml", &text), &name).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("service big") && err.contains("128"), "{err}");
    assert_eq!(
        leftovers(&name),
        (String::new(), String::new(), String::new())
    );

    // A service that names no limit gets the node's, not the default 512 MB.
    let text = format!("services:\n  small:\n    image: {img}\n    command: [\"sleep\", \"60\"]\n");
    let d = up(&h, &write(&h, "small.yaml", &text), &name, &[]).await;
    let memory = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.Memory}}",
        &d.services[0].worker.container_id,
    ]);
    assert_eq!(memory, (128u64 << 20).to_string());
    h.ctl_ok(&["deploy", "down", &name]).await;

    // Host paths: under the node's allowed paths (read-only by default)...
    let text = format!(
        "services:\n  h:\n    image: {img}\n    command: [\"sleep\", \"60\"]\n    volumes: [\"{shared}:/data\"]\n"
    );
    up(&h, &write(&h, "host.yaml", &text), &name, &[]).await;
    let svc = format!("{name}/h");
    let got = h.ctl_ok(&["exec", &svc, "--", "cat", "/data/f"]).await;
    assert_eq!(got, "from-the-host");
    let out = h
        .ctl(&["exec", &svc, "--", "sh", "-c", "echo x > /data/g"])
        .await;
    assert!(!out.status.success(), "mounted read-only");
    h.ctl_ok(&["deploy", "down", &name]).await;
    // ...and nowhere else.
    let text = format!("services:\n  h:\n    image: {img}\n    volumes: [\"/etc:/data\"]\n");
    let out = try_up(&h, &write(&h, "etc.yaml", &text), &name).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service h") && err.contains("allowed_host_paths"),
        "{err}"
    );
    assert_eq!(
        leftovers(&name),
        (String::new(), String::new(), String::new())
    );

    // A service that fails after another started: the whole new deployment goes.
    let text = format!(
        "services:\n  ok:\n    image: {img}\n    command: [\"sleep\", \"60\"]\n    volumes: [\"v:/v\"]\n  missing:\n    image: tether-test-no-such-image:1\n    depends_on: [ok]\nvolumes:\n  v:\n"
    );
    let out = try_up(&h, &write(&h, "missing.yaml", &text), &name).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no-such-image"), "{err}");
    assert_eq!(
        leftovers(&name),
        (String::new(), String::new(), String::new())
    );

    // Data a `down` kept is not lost to a later `up` that fails.
    let keep = format!(
        "services:\n  ok:\n    image: {img}\n    command: [\"sleep\", \"60\"]\n    volumes: [\"v:/v\"]\nvolumes:\n  v:\n"
    );
    let svc = format!("{name}/ok");
    up(&h, &write(&h, "keep.yaml", &keep), &name, &[]).await;
    h.ctl_ok(&["exec", &svc, "--", "sh", "-c", "echo kept > /v/f"])
        .await;
    h.ctl_ok(&["deploy", "down", &name]).await;
    let out = try_up(&h, &write(&h, "missing.yaml", &text), &name).await;
    assert!(!out.status.success());
    let (containers, _, volumes) = leftovers(&name);
    assert_eq!(containers, "");
    assert_eq!(
        volumes,
        format!("tether-dep-{name}_v"),
        "the volume is kept"
    );
    up(&h, &write(&h, "keep.yaml", &keep), &name, &[]).await;
    let got = h.ctl_ok(&["exec", &svc, "--", "cat", "/v/f"]).await;
    assert_eq!(got, "kept\n");
    h.ctl_ok(&["deploy", "down", &name, "--volumes"]).await;
    assert_eq!(
        leftovers(&name),
        (String::new(), String::new(), String::new())
    );

    // A label in tether's own namespace is refused: a service cannot pass
    // for another node's worker.
    let text = format!(
        "services:\n  sly:\n    image: {img}\n    labels:\n      tether.node_id: someone-else\n"
    );
    let out = try_up(&h, &write(&h, "sly.yaml", &text), &name).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service sly") && err.contains("reserved prefix"),
        "{err}"
    );
    assert_eq!(leftovers(&name).0, "");

    // A health check every millisecond is an exec per millisecond the
    // engine runs outside the service's limits: refused.
    let text = format!(
        "services:\n  busy:\n    image: {img}\n    healthcheck:\n      test: [\"CMD\", \"true\"]\n      interval: 1ms\n"
    );
    let out = try_up(&h, &write(&h, "busy.yaml", &text), &name).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service busy") && err.contains("at least 250ms"),
        "{err}"
    );
    assert_eq!(leftovers(&name).0, "");

    // A key tether does not apply is refused with its line.
    let text = format!("services:\n  web:\n    image: {img}\n    ports: [\"8080:80\"]\n");
    let out = try_up(&h, &write(&h, "ports.yaml", &text), &name).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ports") && err.contains("line 4"), "{err}");
    assert_eq!(leftovers(&name).0, "");
    let _ = node;
}

/// The least-loaded node is asked first; a node whose policy refuses a
/// service is passed over for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_passes_over_a_node_whose_policy_refuses_a_service() {
    let mut h = Harness::server().await;
    let mut strict = h.agent_config(&unique("test"));
    strict.policy.allowed_images = vec!["registry.invalid/only-this/*".into()];
    let strict = h.add_agent_with(strict).await;
    let open = h.add_agent().await;
    // The open node is the busier one.
    let w = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &image(),
            "--node",
            &open,
            "--",
            "sleep",
            "600",
        ])
        .await;
    assert!(!w.trim().is_empty());
    let name = unique("place");
    let text = format!(
        "services:\n  one:\n    image: {}\n    command: [\"sleep\", \"600\"]\n",
        image()
    );
    let file = write(&h, "one.yaml", &text);
    let d = up(&h, &file, &name, &[]).await;
    assert_eq!(d.node_id, open, "placed on the node that admits it");
    h.ctl_ok(&["deploy", "down", &name]).await;

    // Asked for by name, the strict node says why not.
    let out = h
        .ctl(&[
            "deploy", "up", "-f", &file, "--name", &name, "--node", &strict,
        ])
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("service one") && err.contains("allowed_images"),
        "{err}"
    );
    assert_eq!(leftovers(&name).0, "");
}
