//! Network policies, checked from inside workers against stand-ins on this
//! machine (no traffic leaves it): an "internet host" in a network
//! namespace behind a veth pair (198.18.x.2, reached the normal way,
//! through Docker's masquerade), a cloud metadata stand-in
//! (169.254.169.254, routed to that namespace) and a host service (a
//! listener of the test on 0.0.0.0).

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use tether::agent::AgentConfig;

/// What the stand-in internet host serves.
const INTERNET_BODY: &str = "hello-from-the-stand-in-internet";
const HOST_BODY: &str = "hello-from-a-host-service";

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ip(args: &[&str]) {
    let (ok, out) = run("ip", args);
    assert!(ok, "ip {args:?}: {out}");
}

fn rand_u8() -> u8 {
    (ulid::Ulid::new().random() % 250) as u8 + 2
}

/// A busybox binary for the host side, taken out of the test image.
fn host_busybox(dir: &std::path::Path) -> PathBuf {
    let name = unique("bbx");
    docker(&[
        "create",
        "--name",
        &name,
        "--label",
        "tether.test=1",
        &image(),
        "true",
    ]);
    let dst = dir.join("busybox");
    let (ok, out) = run(
        "docker",
        &["cp", &format!("{name}:/bin/busybox"), dst.to_str().unwrap()],
    );
    docker(&["rm", "-f", &name]);
    assert!(ok, "docker cp busybox: {out}");
    dst
}

/// The stand-in internet host and the metadata route; all removed on drop.
struct Internet {
    ns: String,
    veth: String,
    /// Address of the stand-in host.
    addr: Ipv4Addr,
    /// The host's end of the veth pair (a host address).
    host_addr: Ipv4Addr,
    metadata_route: bool,
    httpd: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl Internet {
    fn start(metadata: bool) -> Internet {
        let dir = tempfile::tempdir().unwrap();
        let bb = host_busybox(dir.path());
        let www = dir.path().join("www");
        std::fs::create_dir(&www).unwrap();
        std::fs::write(www.join("index.html"), INTERNET_BODY).unwrap();
        let tag = ulid::Ulid::new().to_string().to_ascii_lowercase();
        let tag = &tag[tag.len() - 8..];
        let (a, b) = (rand_u8(), rand_u8() & 0xfc);
        let host_addr = Ipv4Addr::new(198, 18, a, b + 1);
        let addr = Ipv4Addr::new(198, 18, a, b + 2);
        let mut net = Internet {
            ns: format!("tether-inet-{tag}"),
            veth: format!("tvh{tag}"),
            addr,
            host_addr,
            metadata_route: false,
            httpd: None,
            _dir: dir,
        };
        let peer = format!("tvn{tag}");
        ip(&["netns", "add", &net.ns]);
        ip(&[
            "link", "add", &net.veth, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &net.ns]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &net.veth]);
        ip(&["link", "set", &net.veth, "up"]);
        let nsip = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &net.ns, "ip"];
            a.extend_from_slice(args);
            ip(&a);
        };
        nsip(&["addr", "add", &format!("{addr}/30"), "dev", &peer]);
        nsip(&["link", "set", &peer, "up"]);
        nsip(&["link", "set", "lo", "up"]);
        nsip(&["route", "add", "default", "via", &host_addr.to_string()]);
        if metadata {
            nsip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
            ip(&[
                "route",
                "replace",
                "169.254.169.254/32",
                "via",
                &addr.to_string(),
            ]);
            net.metadata_route = true;
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &net.ns])
            .arg(&bb)
            .args(["httpd", "-f", "-p", "80", "-h"])
            .arg(&www)
            .spawn()
            .expect("start httpd in the namespace");
        net.httpd = Some(child);
        // Control: the host reaches it (so a worker that does not is blocked).
        let mut ok = false;
        for _ in 0..50 {
            if http_get(addr, 80).contains(INTERNET_BODY) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ok, "the stand-in internet host does not answer the host");
        if metadata {
            assert!(http_get(Ipv4Addr::new(169, 254, 169, 254), 80).contains(INTERNET_BODY));
        }
        net
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        if let Some(mut c) = self.httpd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.metadata_route {
            let _ = run("ip", &["route", "del", "169.254.169.254/32"]);
        }
        let _ = run("ip", &["link", "del", &self.veth]);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}

/// GET / from the host; the response or an empty string.
fn http_get(addr: Ipv4Addr, port: u16) -> String {
    let Ok(mut s) =
        std::net::TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(2))
    else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A host service on 0.0.0.0 answering every connection with HOST_BODY.
fn host_service() -> u16 {
    let l = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(HOST_BODY.as_bytes());
        }
    });
    port
}

/// An agent config on a pool of its own (its guard covers only its workers).
fn agent_cfg(h: &Harness) -> AgentConfig {
    let mut cfg = h.agent_config(&unique("test"));
    cfg.subnet_pool = format!("10.214.{}.0/24", rand_u8()).parse().unwrap();
    cfg
}

/// Removes the node's nftables table if the agent could not (a failed test).
struct TableGuard(String);

impl Drop for TableGuard {
    fn drop(&mut self) {
        let _ = run("nft", &["delete", "table", "inet", &self.0]);
    }
}

fn tables() -> String {
    run("nft", &["list", "tables"]).1
}

/// Runs `sh -c SCRIPT` in the worker; returns exit code and stdout + stderr.
async fn sh(h: &Harness, w: &str, script: &str) -> (i32, String) {
    let out = h.ctl(&["exec", w, "--", "sh", "-c", script]).await;
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn get(addr: impl std::fmt::Display, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} {port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_reaches_the_internet_but_not_the_host_metadata_or_workers() {
    let net = Internet::start(true);
    let port = host_service();
    let mut h = Harness::server().await;
    let cfg = agent_cfg(&h);
    let node = cfg.node_id.clone();
    let table = format!("tether-{node}");
    let _t = TableGuard(table.clone());
    h.add_agent_with(cfg).await;
    // The guard is in place while the agent runs.
    let (ok, listing) = run("nft", &["list", "table", "inet", &table]);
    assert!(ok, "{listing}");
    assert!(
        listing.contains("hook forward") && listing.contains("hook input"),
        "{listing}"
    );
    // Removed by someone else (a firewall reload, `nft flush ruleset`): the
    // agent puts it back.
    let (ok, out) = run("nft", &["delete", "table", "inet", &table]);
    assert!(ok, "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !tables().contains(&table) {
        assert!(
            std::time::Instant::now() < deadline,
            "the guard was not put back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let img = image();
    let a = h
        .ctl_ok(&["spawn", "--image", &img, "--", "sleep", "3600"])
        .await
        .trim()
        .to_string();
    let b = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "--",
            "sh",
            "-c",
            "while true; do echo pong | nc -l -p 8080; done",
        ])
        .await
        .trim()
        .to_string();
    let ia: serde_json::Value = serde_json::from_str(&h.ctl_ok(&["inspect", &a]).await).unwrap();
    let ib: serde_json::Value = serde_json::from_str(&h.ctl_ok(&["inspect", &b]).await).unwrap();
    assert_eq!(ia["network_policy"], "restricted", "the node's default");
    let b_ip = ib["ip"].as_str().unwrap().to_string();
    let gateway = {
        let ip: Ipv4Addr = ia["ip"].as_str().unwrap().parse().unwrap();
        let o = ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], (o[3] & 0xf0) | 1)
    };

    // Out to the internet: yes.
    let (code, out) = sh(&h, &a, &get(net.addr, 80)).await;
    assert!(
        out.contains(INTERNET_BODY),
        "restricted worker cannot reach the internet ({code}): {out}"
    );
    // B answers on its own address (so the probe below is meaningful).
    let (_, out) = sh(&h, &b, &format!("echo ping | nc -w 2 {b_ip} 8080")).await;
    assert!(out.contains("pong"), "{out}");

    // The host's own addresses, metadata, another worker: no.
    for (what, target, port) in [
        ("the host's bridge address", gateway.to_string(), port),
        ("the host's own address", net.host_addr.to_string(), port),
        ("the metadata service", "169.254.169.254".to_string(), 80),
        ("another worker", b_ip.clone(), 8080),
    ] {
        let (_, out) = sh(&h, &a, &format!("echo ping | nc -w 3 {target} {port}")).await;
        assert!(
            !out.contains(HOST_BODY) && !out.contains(INTERNET_BODY) && !out.contains("pong"),
            "a restricted worker reached {what} ({target}:{port}): {out}"
        );
    }

    // The agent stops (an upgrade, a refused registration) while its
    // workers run on: they stay guarded until the next agent replaces the
    // table. (The harness removes it here; the next test, whose node has
    // no container left, sees it go with the agent.)
    h.stop_agents().await;
    assert!(
        tables().contains(&table),
        "the guard went with the agent while its workers run: {}",
        tables()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_reaches_nothing_and_may_not_be_widened() {
    let net = Internet::start(false);
    let mut h = Harness::server().await;
    let mut cfg = agent_cfg(&h);
    cfg.policy.default_network_policy = tether::protocol::NetworkPolicy::Allowlist;
    let node = cfg.node_id.clone();
    let _t = TableGuard(format!("tether-{node}"));
    h.add_agent_with(cfg).await;
    let img = image();

    // Widening is refused, naming the rule.
    let out = h
        .ctl(&[
            "spawn",
            "--image",
            &img,
            "--network-policy",
            "restricted",
            "--",
            "sleep",
            "60",
        ])
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("policy_denied") || err.contains("denied by node policy"),
        "{err}"
    );
    assert!(err.contains("sandbox.default_network_policy"), "{err}");

    let w = h
        .ctl_ok(&[
            "spawn",
            "--image",
            &img,
            "--network-policy",
            "none",
            "--",
            "sleep",
            "3600",
        ])
        .await
        .trim()
        .to_string();
    // Exec works; the worker has loopback only and reaches nothing.
    let (code, out) = sh(&h, &w, "cat /proc/net/dev").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("lo:") && !out.contains("eth0"), "{out}");
    let (code, out) = sh(&h, &w, &get(net.addr, 80)).await;
    assert!(!out.contains(INTERNET_BODY), "{out}");
    assert_ne!(code, 0);
    // No network was made for it; inspect, ps, stop, rm work.
    let filter = format!("label=tether.node_id={node}");
    assert_eq!(docker(&["network", "ls", "-q", "--filter", &filter]), "");
    let info: serde_json::Value = serde_json::from_str(&h.ctl_ok(&["inspect", &w]).await).unwrap();
    assert_eq!(info["network"], "none");
    assert_eq!(info["network_policy"], "none");
    assert!(h.ctl_ok(&["ps"]).await.contains(&w));
    h.ctl_ok(&["stop", &w]).await;
    h.ctl_ok(&["rm", &w]).await;
    assert_eq!(docker(&["ps", "-aq", "--filter", &filter]), "");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_passes_allowed_names_through_the_proxy_only() {
    let net = Internet::start(false);
    let tag = format!("tether-egress-test:{}", unique("t"));
    build_agent_image(&tag);
    struct Image(String);
    impl Drop for Image {
        fn drop(&mut self) {
            docker(&["rmi", "-f", &self.0]);
        }
    }
    let _img = Image(tag.clone());
    let port = host_service();
    let mut h = Harness::server().await;
    let mut cfg = agent_cfg(&h);
    cfg.policy.default_network_policy = tether::protocol::NetworkPolicy::Allowlist;
    cfg.policy.allowed_egress_domains = ["allowed.test", "*.ok.test"]
        .iter()
        .map(|d| tether::egress_proxy::Pattern::parse(d).unwrap())
        .collect();
    cfg.egress_proxy_image = Some(tag.clone());
    cfg.egress_resolve = vec![
        format!("allowed.test={}", net.addr),
        format!("www.ok.test={}", net.addr),
        "inside.ok.test=10.0.0.1".into(),
        "meta.ok.test=169.254.169.254".into(),
        format!("denied.test={}", net.addr),
    ];
    let node = cfg.node_id.clone();
    let table = format!("tether-{node}");
    let _t = TableGuard(table.clone());
    h.add_agent_with(cfg).await;

    let w = h
        .ctl_ok(&["spawn", "--image", &image(), "--", "sleep", "3600"])
        .await
        .trim()
        .to_string();
    let info: serde_json::Value = serde_json::from_str(&h.ctl_ok(&["inspect", &w]).await).unwrap();
    assert_eq!(info["network_policy"], "allowlist");
    let gateway = {
        let ip: Ipv4Addr = info["ip"].as_str().unwrap().parse().unwrap();
        let o = ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], (o[3] & 0xf0) | 1)
    };
    let (_, env) = sh(&h, &w, "echo $HTTP_PROXY $https_proxy").await;
    assert!(env.contains("http://") && env.contains(":3128"), "{env}");
    // `proxy REQUEST` sends a raw request to $HTTP_PROXY.
    let proxy = |req: &str| {
        format!("p=${{HTTP_PROXY#http://}}; printf '{req}' | nc -w 5 ${{p%:*}} ${{p##*:}}")
    };

    // Allowed names pass, as plain HTTP and through CONNECT.
    let (_, out) = sh(
        &h,
        &w,
        &proxy("GET http://allowed.test/ HTTP/1.0\\r\\nHost: allowed.test\\r\\n\\r\\n"),
    )
    .await;
    assert!(out.contains(INTERNET_BODY), "{out}");
    let (_, out) = sh(
        &h,
        &w,
        &proxy("CONNECT www.ok.test:80 HTTP/1.1\\r\\nHost: www.ok.test:80\\r\\n\\r\\nGET / HTTP/1.0\\r\\n\\r\\n"),
    )
    .await;
    assert!(
        out.contains("200 Connection established") && out.contains(INTERNET_BODY),
        "{out}"
    );

    // Other names, names resolving inside, IP literals: refused with the reason.
    for (req, reason) in [
        (
            "GET http://denied.test/ HTTP/1.0\\r\\n\\r\\n",
            "not in the node's allowed_egress_domains",
        ),
        (
            "CONNECT inside.ok.test:443 HTTP/1.1\\r\\n\\r\\n",
            "resolves only to private",
        ),
        (
            "GET http://meta.ok.test/ HTTP/1.0\\r\\n\\r\\n",
            "resolves only to private",
        ),
        (
            &format!("GET http://{}/ HTTP/1.0\\r\\n\\r\\n", net.addr),
            "is an IP address",
        ),
        (
            "CONNECT 169.254.169.254:80 HTTP/1.1\\r\\n\\r\\n",
            "is an IP address",
        ),
        // An allowed name, but not a web port: its SSH is out of reach.
        (
            "CONNECT www.ok.test:22 HTTP/1.1\\r\\n\\r\\n",
            "ports 80 and 443 only",
        ),
        (
            "GET http://allowed.test:8080/ HTTP/1.0\\r\\n\\r\\n",
            "ports 80 and 443 only",
        ),
    ] {
        let (_, out) = sh(&h, &w, &proxy(req)).await;
        assert!(out.contains("403") && out.contains(reason), "{req}: {out}");
        assert!(!out.contains(INTERNET_BODY), "{req}: {out}");
    }

    // A request that an origin taking bare LF would read as a second one,
    // for another site, is refused before anything is sent on.
    let (_, out) = sh(
        &h,
        &w,
        &proxy("GET http://allowed.test/ HTTP/1.1\\nHost:other.test\\n\\n\\r\\n\\r\\n"),
    )
    .await;
    assert!(out.contains("400") && !out.contains(INTERNET_BODY), "{out}");
    // The proxy's logs are rotated: what it logs of a worker's refused
    // requests cannot fill the disk.
    let proxy_id = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=tether.egress_for={w}"),
    ]);
    let logs = docker(&[
        "inspect",
        "-f",
        "{{json .HostConfig.LogConfig}}",
        proxy_id.trim(),
    ]);
    assert!(
        logs.contains(r#""max-size":"1m""#) && logs.contains(r#""max-file":"2""#),
        "{logs}"
    );

    // No direct way out, nor to the host.
    for (target, port) in [(net.addr.to_string(), 80), (gateway.to_string(), port)] {
        let (_, out) = sh(&h, &w, &format!("echo x | nc -w 3 {target} {port}")).await;
        assert!(
            !out.contains(INTERNET_BODY) && !out.contains(HOST_BODY),
            "an allowlist worker reached {target}:{port} directly: {out}"
        );
    }

    // The proxy goes with its worker.
    let proxies = format!("label=tether.egress_for={w}");
    assert_eq!(
        docker(&["ps", "-aq", "--filter", &proxies]).lines().count(),
        1
    );
    h.ctl_ok(&["rm", "-f", &w]).await;
    assert_eq!(docker(&["ps", "-aq", "--filter", &proxies]), "");
    assert_eq!(docker(&["network", "ls", "-q", "--filter", &proxies]), "");

    // A deployment under allowlist: its services talk to each other, and
    // reach out only through its own proxy, which goes with it.
    let name = unique("allow");
    let file = h.state_path("dep.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  a:\n    image: {img}\n    command: [\"sh\", \"-c\", \"mkdir -p /w && echo sibling > /w/x && exec httpd -f -p 80 -h /w\"]\n  b:\n    image: {img}\n    command: [\"sleep\", \"3600\"]\n",
            img = image()
        ),
    )
    .unwrap();
    let up = h
        .ctl_ok(&[
            "deploy",
            "up",
            "-f",
            file.to_str().unwrap(),
            "--name",
            &name,
            "--json",
        ])
        .await;
    let d: tether::protocol::DeploymentInfo = serde_json::from_str(&up).unwrap();
    assert_eq!(
        d.network_policy,
        Some(tether::protocol::NetworkPolicy::Allowlist)
    );
    let b = format!("{name}/b");
    let (_, out) = sh(
        &h,
        &b,
        "for i in 1 2 3 4 5 6 7 8 9 10; do printf 'GET /x HTTP/1.0\\r\\n\\r\\n' | nc -w 3 a 80 && break; sleep 0.3; done",
    )
    .await;
    assert!(out.contains("sibling"), "{out}");
    let (_, out) = sh(
        &h,
        &b,
        &proxy("GET http://allowed.test/ HTTP/1.0\\r\\nHost: allowed.test\\r\\n\\r\\n"),
    )
    .await;
    assert!(out.contains(INTERNET_BODY), "{out}");
    let (_, out) = sh(
        &h,
        &b,
        &proxy("GET http://denied.test/ HTTP/1.0\\r\\n\\r\\n"),
    )
    .await;
    assert!(out.contains("403"), "{out}");
    let (_, out) = sh(&h, &b, &get(net.addr, 80)).await;
    assert!(
        !out.contains(INTERNET_BODY),
        "a service reached out directly: {out}"
    );
    let dep_proxy = format!("label=tether.egress_for=dep-{name}");
    assert_eq!(
        docker(&["ps", "-q", "--filter", &dep_proxy])
            .lines()
            .count(),
        1
    );
    h.ctl_ok(&["deploy", "down", &name]).await;
    assert_eq!(docker(&["ps", "-aq", "--filter", &dep_proxy]), "");
    assert_eq!(docker(&["network", "ls", "-q", "--filter", &dep_proxy]), "");

    let filter = format!("label=tether.node_id={node}");
    assert_eq!(docker(&["network", "ls", "-q", "--filter", &filter]), "");
    // No container of the node is left: the guard goes with the agent.
    h.stop_agents().await;
    assert!(!tables().contains(&table), "{}", tables());
    h.stop().await;
}
