//! Tunnels: a TCP connection from the node to a worker's port, carried by
//! a channel of the agent's own link (the worker publishes nothing).

mod common;
use common::*;
use std::time::Duration;
use tether::protocol::{ErrorCode, SpawnRequest};
use tether::server::hub::ChannelStream;
use tether::server::{Duplex, StreamEvent};

/// Reads a tunnel's output to its end; panics on an error end.
async fn read_all(output: &mut ChannelStream) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), output.next())
            .await
            .expect("tunnel output within 60 s")
        {
            Some(StreamEvent::Data(_, b)) => got.extend_from_slice(&b),
            Some(StreamEvent::End { error: None, .. }) | None => return got,
            Some(other) => panic!("unexpected tunnel event {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_a_tunnel_both_ways_and_a_half_close_passes_through() {
    let (h, _node) = Harness::start().await;
    // `cat` answers what it reads and ends when its input does: the echo
    // ends only after the client's half-close reached the worker. The
    // worker outlives it (an exiting container's namespace takes unsent
    // bytes with it).
    let w = worker(&h, "nc -l -p 9000 -e cat; sleep 3600").await;
    let Duplex {
        mut input,
        mut output,
    } = tunnel(&h.hub, &w, 9000).await;
    let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let payload = sent.clone();
    // Written while the echo is read: the window is smaller than the data.
    let writer = tokio::spawn(async move {
        for chunk in payload.chunks(50_000) {
            input
                .write(bytes::Bytes::copy_from_slice(chunk))
                .await
                .unwrap();
        }
        input.close();
        input
    });
    let got = read_all(&mut output).await;
    assert_eq!(got.len(), sent.len());
    assert_eq!(sha256(&got), sha256(&sent), "echoed bytes differ");
    drop(writer.await.unwrap());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_server_in_a_worker_answers_through_a_tunnel() {
    let (h, _node) = Harness::start().await;
    let w = worker(
        &h,
        "mkdir -p /www && head -c 200000 /dev/urandom > /www/blob && \
         sha256sum /www/blob | cut -d' ' -f1 > /www/blob.sha && httpd -f -p 8080 -h /www",
    )
    .await;
    let get = |path: &'static str| {
        let hub = h.hub.clone();
        let w = w.clone();
        async move {
            let mut t = tunnel(&hub, &w, 8080).await;
            let req = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
            t.input.write(req.into()).await.unwrap();
            t.input.close();
            let resp = read_all(&mut t.output).await;
            let split = resp
                .windows(4)
                .position(|x| x == b"\r\n\r\n")
                .expect("a head");
            let head = String::from_utf8_lossy(&resp[..split]).to_string();
            assert!(
                head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
                "{head}"
            );
            resp[split + 4..].to_vec()
        }
    };
    let want = String::from_utf8(get("/blob.sha").await).unwrap();
    let blob = get("/blob").await;
    assert_eq!(blob.len(), 200_000);
    assert_eq!(sha256(&blob), want.trim(), "the file arrived intact");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tunnels_are_refused_with_stable_codes() {
    let (h, _node) = Harness::start().await;
    let w = worker(&h, "sleep 3600").await;
    let code = |r: Result<Duplex, tether::protocol::ErrorBody>| match r {
        Ok(_) => panic!("tunnel opened"),
        Err(e) => e.code,
    };
    assert_eq!(code(h.hub.tunnel(&w, 0).await), ErrorCode::InvalidRequest);
    assert_eq!(
        code(h.hub.tunnel(&w, 9999).await),
        ErrorCode::ConnectionRefused
    );
    assert_eq!(
        code(h.hub.tunnel("01nosuchworker", 80).await),
        ErrorCode::NotFound
    );
    h.hub.stop(&w, Some(1)).await.unwrap();
    assert_eq!(code(h.hub.tunnel(&w, 80).await), ErrorCode::Conflict);
    // A refusal disturbs nothing else: the node still serves.
    let w2 = worker(&h, "sleep 3600").await;
    let (exit, out, _) = h.hub.exec_collect(&w2, &["echo", "ok"]).await.unwrap();
    assert_eq!((exit, out.as_slice()), (0, &b"ok\n"[..]));
    h.stop().await;
}

/// `tether ctl ARGS...` against the harness's server, to its end.
fn ctl(h: &Harness, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("ctl")
        .args(args)
        .env("TETHER_SERVER", &h.url)
        .env("TETHER_TOKEN", &h.token)
        .output()
        .unwrap()
}

/// `tether ctl preview-url WORKER PORT`: the URL it prints.
fn preview_url(h: &Harness, w: &str, port: &str) -> String {
    let out = ctl(h, &["preview-url", w, port, "--ttl", "10m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_port_forward_carries_raw_tcp_and_http_on_loopback() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (h, _node) = Harness::start().await;
    let w = worker(
        &h,
        "mkdir -p /www && echo hello-from-the-worker > /www/index.html && \
         httpd -p 8080 -h /www && while true; do nc -l -p 9000 -e cat; done",
    )
    .await;
    // Both listening before the first connection.
    drop(tunnel(&h.hub, &w, 8080).await);
    drop(tunnel(&h.hub, &w, 9000).await);

    let (_http_pf, http) = port_forward(&h, &w, ":8080").await;
    let mut c = tokio::net::TcpStream::connect(&http).await.unwrap();
    c.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut resp))
        .await
        .expect("the response within 30 s")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.contains(" 200 OK"), "{resp}");
    assert!(resp.ends_with("hello-from-the-worker\n"), "{resp}");

    // Raw TCP, hash-compared, with the local half-close passed through
    // (the worker's `cat` ends only when its input does).
    let (_echo_pf, echo) = port_forward(&h, &w, ":9000").await;
    let c = echo_connection(&echo).await;
    let sent: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13 % 253) as u8).collect();
    let (mut rd, mut wr) = c.into_split();
    let payload = sent.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&payload).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut got))
        .await
        .expect("the echo ends after the half-close")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(
        sha256(&got),
        sha256(&sent),
        "bytes differ through port-forward"
    );

    // A port nobody listens on: that connection is closed, the command goes on.
    let (_refused_pf, refused) = port_forward(&h, &w, ":9999").await;
    let mut c = tokio::net::TcpStream::connect(&refused).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut buf))
        .await
        .expect("a refused tunnel's connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let mut c = tokio::net::TcpStream::connect(&http).await.unwrap();
    c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).await.unwrap();
    assert!(String::from_utf8_lossy(&resp).contains("hello-from-the-worker"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_worker_closes_its_tunnels_with_a_reason() {
    let (h, _node) = Harness::start().await;
    let w = worker(&h, "nc -l -p 9000 -e cat").await;
    let mut t = tunnel(&h.hub, &w, 9000).await;
    t.input
        .write(bytes::Bytes::from_static(b"ping"))
        .await
        .unwrap();
    h.hub.remove(&w, true).await.unwrap();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), t.output.next())
            .await
            .expect("the tunnel ends within 30 s of its worker's removal")
        {
            Some(StreamEvent::End { error, .. }) => break error,
            Some(_) => {}
            None => panic!("the stream ended without its end"),
        }
    };
    let e = end.expect("an error saying why");
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.contains("removed"), "{e}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_worker_without_a_network_is_refused_clearly() {
    let (h, _node) = Harness::start().await;
    let w = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["sh".into(), "-c".into(), "nc -l -p 9000 -e cat".into()],
            network_policy: Some(tether::protocol::NetworkPolicy::None),
            ..Default::default()
        })
        .await
        .unwrap()
        .worker_id;
    // This agent is a host process given no image of its own to run a relay.
    let e = match h.hub.tunnel(&w, 9000).await {
        Ok(_) => panic!("a tunnel into a worker with no network, without a relay"),
        Err(e) => e,
    };
    assert_eq!(e.code, ErrorCode::Unsupported, "{e}");
    assert!(e.message.contains("relay of the agent's image"), "{e}");
    h.stop().await;
}

/// Echoes `size` bytes through a tunnel to port 9000 of `w` and checks
/// them byte for byte, the half-close included.
async fn echo_through(h: &Harness, w: &str, size: usize) {
    let Duplex {
        mut input,
        mut output,
    } = tunnel(&h.hub, w, 9000).await;
    let sent: Vec<u8> = (0..size as u32).map(|i| (i * 13 % 251) as u8).collect();
    let payload = sent.clone();
    let writer = tokio::spawn(async move {
        for chunk in payload.chunks(64 * 1024) {
            input
                .write(bytes::Bytes::copy_from_slice(chunk))
                .await
                .unwrap();
        }
        input.close();
        input
    });
    let mut got = Vec::with_capacity(size);
    loop {
        match tokio::time::timeout(Duration::from_secs(60), output.next())
            .await
            .expect("echo within 60 s")
        {
            Some(StreamEvent::Data(_, b)) => got.extend_from_slice(&b),
            Some(StreamEvent::Eof) => {}
            Some(StreamEvent::End { error, .. }) => {
                assert!(error.is_none(), "{error:?}");
                break;
            }
            Some(StreamEvent::Gap(n)) => panic!("gap of {n}"),
            None => break,
        }
    }
    let _input = writer.await.unwrap();
    assert_eq!(got.len(), sent.len());
    assert_eq!(sha(&got), sha(&sent), "the echo differs");
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Through the worker's relay (a sidecar of the agent's image in the
/// worker's network namespace): a worker with no network, and, with the
/// relay forced as for an agent in a container of its own network, a
/// worker on its bridge. No network is joined; the relay goes with its
/// worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_reach_workers_through_their_relay_without_joining_a_network() {
    let agent_image = format!("tether-agent:{}", unique("test-relay"));
    build_agent_image(&agent_image);
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.egress_proxy_image = Some(agent_image.clone());
    let node = h.add_agent_with(cfg).await;
    // A worker on no network running `sh -c SCRIPT`.
    let none_worker = async |script: &str| {
        h.hub
            .spawn(SpawnRequest {
                image: image(),
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                network_policy: Some(tether::protocol::NetworkPolicy::None),
                node_id: Some(node.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .worker_id
    };
    let echo = "nc -l -p 9000 -e cat; sleep 3600";
    let none = none_worker(echo).await;
    wait_listening(&h, &none, 9000).await;
    echo_through(&h, &none, 3_000_000).await;
    // A port nobody listens on: a clear refusal for that connection only.
    let e = match h.hub.tunnel(&none, 9001).await {
        Ok(_) => panic!("a tunnel to a closed port"),
        Err(e) => e,
    };
    assert_eq!(e.code, ErrorCode::ConnectionRefused, "{e}");
    let relay = format!("tether-{none}-relay");
    assert_eq!(
        docker(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", &relay]),
        format!(
            "container:{}",
            docker(&["inspect", "-f", "{{.Id}}", &format!("tether-{none}")])
        ),
        "the relay shares the worker's namespace"
    );
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            &format!("tether-{none}"),
        ]),
        "none",
        "the worker is still on no network"
    );
    // The worker's side ends first (it says `hi` and closes): its
    // half-close reaches the client while the client's direction is still
    // open (the relay frames what the worker sends).
    let half = none_worker("nc -l -p 9002 -e echo hi; sleep 3600").await;
    wait_listening(&h, &half, 9002).await;
    let Duplex {
        input: _open,
        mut output,
    } = h.hub.tunnel(&half, 9002).await.unwrap();
    output.report_eof();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), output.next())
            .await
            .expect("the worker's half-close within 10 s, ours still open")
        {
            Some(StreamEvent::Data(_, b)) => got.extend_from_slice(&b),
            Some(StreamEvent::Eof) => break,
            other => panic!("unexpected {other:?} after {got:?}"),
        }
    }
    assert_eq!(got, b"hi\n");
    h.hub.remove(&half, true).await.unwrap();
    h.hub.remove(&none, true).await.unwrap();
    assert!(
        docker(&["ps", "-aq", "--filter", &format!("name={relay}")]).is_empty(),
        "the relay went with its worker"
    );
    h.stop().await;

    // The relay forced (an agent in a container with a network of its own).
    let mut h = Harness::server().await;
    let mut cfg = h.agent_config(&unique("test"));
    cfg.egress_proxy_image = Some(agent_image.clone());
    cfg.tunnel_relay = Some(true);
    let node = h.add_agent_with(cfg).await;
    let w = h
        .hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["sh".into(), "-c".into(), echo.into()],
            node_id: Some(node.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .worker_id;
    let nets_before = docker(&[
        "network",
        "inspect",
        "-f",
        "{{json .Containers}}",
        &format!("tether-{w}"),
    ]);
    wait_listening(&h, &w, 9000).await;
    echo_through(&h, &w, 1_000_000).await;
    let nets_after = docker(&[
        "network",
        "inspect",
        "-f",
        "{{json .Containers}}",
        &format!("tether-{w}"),
    ]);
    assert_eq!(
        nets_before, nets_after,
        "nothing joined the worker's network"
    );
    // The worker restarts (as a service does by its restart policy): the
    // engine gives it a new namespace, and the relay that joined the old
    // one is made again rather than reused.
    docker(&["restart", "-t", "1", &format!("tether-{w}")]);
    wait_listening(&h, &w, 9000).await;
    echo_through(&h, &w, 100_000).await;

    // A deployment's service, through its relay: an `up` that changes the
    // service makes its container again, and the relay follows the new
    // one; `down` takes the relay with the service.
    let file = h.state_path("rl.yaml");
    let compose = |extra: &str| {
        format!(
            "services:\n  web:\n    image: {}\n    command: [\"sh\", \"-c\", \"{echo}{extra}\"]\n",
            image()
        )
    };
    let up = ["deploy", "up", "-f", file.to_str().unwrap(), "--name", "rl"];
    for extra in ["", " # changed"] {
        std::fs::write(&file, compose(extra)).unwrap();
        h.ctl_ok(&up).await;
        wait_listening(&h, "rl_web", 9000).await;
        echo_through(&h, "rl_web", 100_000).await;
    }
    h.ctl_ok(&["deploy", "down", "rl"]).await;
    assert_eq!(
        docker(&["ps", "-aq", "--filter", "label=tether.sidecar_for=rl_web"]),
        "",
        "the service's relay outlived it"
    );
    h.stop().await;
    docker(&["image", "rm", "-f", &agent_image]);
}

/// Waits until something listens on `port` in the worker (its own view).
async fn wait_listening(h: &Harness, w: &str, port: u16) {
    let hex = format!(":{port:04X}");
    for _ in 0..100 {
        let (_, out, _) = h
            .hub
            .exec_collect(w, &["cat", "/proc/net/tcp", "/proc/net/tcp6"])
            .await
            .unwrap();
        if String::from_utf8_lossy(&out).contains(&hex) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing listens on port {port} of {w}");
}

// ---- Preview URLs: HTTP through the server to a worker's port ----

/// A worker that records each request head it gets on port 9000 (in
/// /tmp/req) and answers `ok`; serves a 200 KB blob and its hash with
/// httpd on 8080; answers an upgrade on 9100 and then echoes; streams two
/// server-sent events three seconds apart on 9200.
const PREVIEW_WORKER: &str = r#"
mkdir -p /www && head -c 200000 /dev/urandom > /www/blob &&
sha256sum /www/blob | cut -d' ' -f1 > /www/blob.sha && httpd -p 8080 -h /www
cat > /rec.sh <<'EOS'
while IFS= read -r l; do
  l=$(printf '%s' "$l" | tr -d '\r'); [ -z "$l" ] && break; echo "$l" >> /tmp/req
done
printf 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok'
EOS
cat > /up.sh <<'EOS'
while IFS= read -r l; do l=$(printf '%s' "$l" | tr -d '\r'); [ -z "$l" ] && break; done
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'
exec cat
EOS
cat > /sse.sh <<'EOS'
while IFS= read -r l; do l=$(printf '%s' "$l" | tr -d '\r'); [ -z "$l" ] && break; done
printf 'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n'
printf 'data: one\n\n'; sleep 3; printf 'data: two\n\n'
EOS
(while true; do nc -l -p 9000 -e sh /rec.sh; done) &
(while true; do nc -l -p 9100 -e sh /up.sh; done) &
(while true; do nc -l -p 9200 -e sh /sse.sh; done) &
wait
"#;

async fn preview_worker(h: &Harness) -> String {
    let w = worker(h, PREVIEW_WORKER).await;
    // Every port listening, seen from inside: a probe connection would use
    // up an `nc`, and the next would race its restart.
    let want = [8080u16, 9000, 9100, 9200].map(|p| format!(":{p:04X} "));
    for _ in 0..100 {
        let (_, tcp, _) = h
            .hub
            .exec_collect(&w, &["cat", "/proc/net/tcp", "/proc/net/tcp6"])
            .await
            .unwrap();
        let tcp = String::from_utf8_lossy(&tcp);
        let listening: Vec<&str> = tcp.lines().filter(|l| l.contains(" 0A ")).collect();
        if want
            .iter()
            .all(|p| listening.iter().any(|l| l.contains(p.as_str())))
        {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the preview worker's ports never all listened");
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Issues a preview URL through the API: its id and path.
async fn issue(h: &Harness, w: &str, port: u16, ttl_secs: u64) -> (String, String) {
    let r: serde_json::Value = http()
        .post(format!("{}/api/v1/workers/{w}/previews", h.url))
        .bearer_auth(&h.token)
        .json(&serde_json::json!({"port": port, "ttl_secs": ttl_secs}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        r["id"].as_str().unwrap().to_string(),
        r["path"].as_str().unwrap().to_string(),
    )
}

async fn refusal(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap();
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_string(),
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_preview_passes_requests_on_and_keeps_the_token_from_the_worker() {
    let (h, _node) = Harness::start().await;
    let w = preview_worker(&h).await;
    let base = format!("{}/api/v1/workers/{w}/ports", h.url);
    // A file, streamed and hash-checked.
    let get = |path: String| http().get(path).bearer_auth(&h.token).send();
    let want = get(format!("{base}/8080/blob.sha"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let blob = get(format!("{base}/8080/blob")).await.unwrap();
    assert_eq!(blob.status(), 200);
    let blob = blob.bytes().await.unwrap();
    assert_eq!(sha256(&blob), want.trim());
    // The worker's own 404 comes back as it is, not as an API error.
    let missing = get(format!("{base}/8080/nothing-here")).await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(!missing.text().await.unwrap().contains("\"error\""));

    // What the worker sees: the method, path, query, Host and the app's
    // own cookies; never the operator token.
    let r = http()
        .post(format!("{base}/9000/a/b?q=1"))
        .bearer_auth(&h.token)
        .header("cookie", "app=1; tether_preview=x")
        .header("x-app", "kept")
        .body("body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let (_, seen, _) = h.hub.exec_collect(&w, &["cat", "/tmp/req"]).await.unwrap();
    let seen = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(seen.starts_with("post /a/b?q=1 http/1.1\n"), "{seen}");
    assert!(seen.contains(&format!("host: {}\n", h.addr)), "{seen}");
    assert!(seen.contains("x-app: kept\n"), "{seen}");
    assert!(seen.contains("cookie: app=1\n"), "{seen}");
    assert!(
        seen.contains(&format!(
            "x-forwarded-prefix: /api/v1/workers/{w}/ports/9000\n"
        )),
        "{seen}"
    );
    assert!(
        !seen.contains("authorization"),
        "the token reached the worker: {seen}"
    );
    assert!(!seen.contains("tether_preview"), "{seen}");

    // With a preview URL's cookie, a server token in `Authorization`
    // (here one that is not valid) is kept from the worker all the same;
    // the app's own credentials are not.
    let (_, path) = issue(&h, &w, 9000, 3600).await;
    let r = http().get(format!("{}{path}", h.url)).send().await.unwrap();
    let grant = r.headers()["set-cookie"].to_str().unwrap();
    let grant = grant.split(';').next().unwrap().to_string();
    for (auth, reaches) in [
        ("Bearer top_0123456789abcdef", false),
        ("Basic dXNlcjpwYXNz", true),
    ] {
        h.hub
            .exec_collect(&w, &["rm", "-f", "/tmp/req"])
            .await
            .unwrap();
        let r = http()
            .get(format!("{base}/9000/c"))
            .header("cookie", &grant)
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let (_, seen, _) = h.hub.exec_collect(&w, &["cat", "/tmp/req"]).await.unwrap();
        let seen = String::from_utf8_lossy(&seen).to_ascii_lowercase();
        assert!(seen.starts_with("get /c "), "{seen}");
        assert_eq!(
            seen.contains(&format!("authorization: {}\n", auth.to_ascii_lowercase())),
            reaches,
            "{auth}: {seen}"
        );
    }

    // Without the token: refused, and the worker never asked.
    let r = http()
        .get(format!("{base}/8080/blob.sha"))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "unauthorized");
    for bad in ["0", "080", "+80", "65536"] {
        let r = get(format!("{base}/{bad}/")).await.unwrap();
        assert_eq!(refusal(r).await.1, "invalid_request", "port {bad}");
    }
    let r = get(format!("{}/api/v1/workers/01nosuchworker/ports/80/", h.url))
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "not_found");
    let r = get(format!("{base}/9999/")).await.unwrap();
    assert_eq!(refusal(r).await.1, "connection_refused");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_streams_events_and_carries_an_upgraded_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (h, _node) = Harness::start().await;
    let w = preview_worker(&h).await;
    // Server-sent events arrive as they are produced: the first long
    // before the second is written.
    let started = std::time::Instant::now();
    let mut sse = http()
        .get(format!("{}/api/v1/workers/{w}/ports/9200/events", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let first = sse.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: one\n\n");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the first event waited for the second: {:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    while let Some(c) = sse.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"data: two\n\n");

    // An upgrade (a WebSocket handshake): after the 101, bytes both ways.
    let mut c = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let req = format!(
        "GET /api/v1/workers/{w}/ports/9100/ws HTTP/1.1\r\nHost: {}\r\n\
         Authorization: Bearer {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        h.addr, h.token
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 241) as u8).collect();
    let (mut rd, mut wr) = c.into_split();
    let payload = sent.clone();
    let writer = tokio::spawn(async move { wr.write_all(&payload).await.map(|_| wr) });
    let mut got = vec![0u8; sent.len()];
    tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut got))
        .await
        .expect("the echo within 60 s")
        .unwrap();
    assert_eq!(
        sha256(&got),
        sha256(&sent),
        "bytes differ through the upgrade"
    );
    drop(writer.await.unwrap());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_preview_url_sets_a_scoped_cookie_and_is_refused_once_expired_tampered_or_revoked()
{
    let (h, _node) = Harness::start().await;
    let w = preview_worker(&h).await;
    let (id, path) = issue(&h, &w, 8080, 3600).await;
    let prefix = format!("/api/v1/workers/{w}/ports/8080");
    assert!(
        path.starts_with(&format!("{prefix}/?tether_preview=")),
        "{path}"
    );
    // No token in hand: the URL alone sets a cookie and leaves the address bar.
    let r = http().get(format!("{}{path}", h.url)).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("{prefix}/").as_str());
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains(&format!("Path={prefix};")), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    let value = cookie.split(';').next().unwrap().to_string();
    let with_cookie = |url: String, c: String| http().get(url).header("cookie", c).send();
    let want = with_cookie(format!("{}{prefix}/blob.sha", h.url), value.clone())
        .await
        .unwrap();
    assert_eq!(want.status(), 200);
    let want = want.text().await.unwrap();
    let blob = with_cookie(format!("{}{prefix}/blob", h.url), value.clone())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256(&blob), want.trim());

    // For another port or worker: refused.
    let other_port = format!("{}/api/v1/workers/{w}/ports/9200/", h.url);
    let r = with_cookie(other_port.clone(), value.clone())
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "unauthorized");
    let token = value.split_once('=').unwrap().1.to_string();
    let r = http()
        .get(format!("{other_port}?tether_preview={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "unauthorized");
    // Tampered: one character of the signature changed.
    let mut bad = token.clone();
    let last = if bad.ends_with('0') { '1' } else { '0' };
    bad.pop();
    bad.push(last);
    let r = http()
        .get(format!("{}{prefix}/?tether_preview={bad}", h.url))
        .send()
        .await
        .unwrap();
    let (status, code, _) = refusal(r).await;
    assert_eq!((status, code.as_str()), (401, "unauthorized"));
    // Expired.
    let (_, short) = issue(&h, &w, 8080, 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = http()
        .get(format!("{}{short}", h.url))
        .send()
        .await
        .unwrap();
    let (_, code, message) = refusal(r).await;
    assert_eq!(code, "unauthorized");
    assert!(message.contains("expired"), "{message}");
    // Revoked: what the grant opened ends at once (an event stream whose
    // second event comes 3 s after the first)...
    let (events_id, events) = issue(&h, &w, 9200, 3600).await;
    let r = http()
        .get(format!("{}{events}", h.url))
        .send()
        .await
        .unwrap();
    let events_cookie = r.headers()["set-cookie"].to_str().unwrap();
    let events_cookie = events_cookie.split(';').next().unwrap().to_string();
    let mut sse = with_cookie(
        format!("{}/api/v1/workers/{w}/ports/9200/events", h.url),
        events_cookie,
    )
    .await
    .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(&sse.chunk().await.unwrap().unwrap()[..], b"data: one\n\n");
    let revoked = std::time::Instant::now();
    let r = http()
        .delete(format!("{}/api/v1/previews/{events_id}", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let mut rest = Vec::new();
    while let Ok(Some(c)) = sse.chunk().await {
        rest.extend_from_slice(&c);
    }
    assert!(
        rest.is_empty() && revoked.elapsed() < Duration::from_millis(2500),
        "the stream went on after its grant was revoked: {:?} after {:?}",
        String::from_utf8_lossy(&rest),
        revoked.elapsed()
    );
    // ...and the cookie stops working.
    let r = http()
        .delete(format!("{}/api/v1/previews/{id}", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = with_cookie(format!("{}{prefix}/blob.sha", h.url), value)
        .await
        .unwrap();
    let (_, code, message) = refusal(r).await;
    assert_eq!(code, "unauthorized");
    assert!(message.contains("revoked"), "{message}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_preview_serves_the_whole_path_space_of_one_worker_port() {
    let mut h = Harness::server_with(|c| c.preview_domain = Some("preview.test".into())).await;
    h.add_agent().await;
    let w = preview_worker(&h).await;
    let host = format!("8080-{w}.preview.test");
    let url = preview_url(&h, &w, "8080");
    let prefix = format!("http://{host}/?tether_preview=");
    assert!(url.starts_with(&prefix), "{url}");
    let query = url.trim().strip_prefix(&format!("http://{host}/")).unwrap();
    // The wildcard name resolves to the server: sent there with its Host.
    let r = http()
        .get(format!("{}/{query}", h.url))
        .header("host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("Path=/;"), "{cookie}");
    let value = cookie.split(';').next().unwrap().to_string();
    let get = |path: &str| {
        http()
            .get(format!("{}{path}", h.url))
            .header("host", &host)
            .header("cookie", &value)
            .send()
    };
    let want = get("/blob.sha").await.unwrap().text().await.unwrap();
    let blob = get("/blob").await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&blob), want.trim());
    // Under a preview name the API's paths belong to the worker.
    let r = get("/api/v1/nodes").await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(!r.text().await.unwrap().contains("\"nodes\""));
    // Another port of the same worker is another origin: no cookie there.
    let r = http()
        .get(format!("{}/", h.url))
        .header("host", format!("9200-{w}.preview.test"))
        .header("cookie", &value)
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "unauthorized");
    // Another preview's page (same site, another origin) cannot use this
    // preview's cookie to change state or open a WebSocket; reading a page
    // (what a link or an image does) and the preview's own page can.
    let from = |origin: String, method: reqwest::Method, upgrade: bool| {
        let mut r = http()
            .request(method, format!("{}/blob.sha", h.url))
            .header("host", &host)
            .header("cookie", &value)
            .header("origin", origin);
        if upgrade {
            r = r
                .header("connection", "Upgrade")
                .header("upgrade", "websocket");
        }
        r.send()
    };
    let other = format!("http://9200-{w}.preview.test");
    let r = from(other.clone(), reqwest::Method::POST, false)
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "policy_denied");
    let r = from(other.clone(), reqwest::Method::GET, true)
        .await
        .unwrap();
    assert_eq!(refusal(r).await.1, "policy_denied");
    let r = from(other, reqwest::Method::GET, false).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = from(format!("http://{host}"), reqwest::Method::POST, false)
        .await
        .unwrap();
    assert_ne!(r.status(), 403, "the preview's own page may post");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_tunnels_lists_open_connections_and_closes_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (h, _node) = Harness::start().await;
    let w = worker(&h, "while true; do nc -l -p 9000 -e cat; done").await;
    drop(tunnel(&h.hub, &w, 9000).await);
    let (_pf, addr) = port_forward(&h, &w, ":9000").await;
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut one = [0u8; 5];
    for _ in 0..50 {
        c.write_all(b"hello").await.unwrap();
        match tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut one)).await {
            Ok(Ok(_)) => break,
            _ => {
                c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            }
        }
    }
    assert_eq!(&one, b"hello");
    let ctl = |args: &[&str]| {
        let out = ctl(&h, args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, table) = ctl(&["tunnels"]);
    assert_eq!(code, Some(0));
    let id = format!("{w}:9000");
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..4], [w.as_str(), "9000", "1"], "{row}");
    assert!(cols[4].parse::<u64>().unwrap() >= 5, "{row}");
    assert_eq!(ctl(&["tunnels", "close", &id]).0, Some(0));
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut rest))
        .await
        .expect("the connection closes with its tunnel")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(ctl(&["tunnels", "close", &id]).0, Some(125), "already gone");
    h.stop().await;
}

/// A page that loads a script, which fetches a file, each by an absolute
/// path: what a host-based preview is for.
const BROWSER_WORKER: &str = r#"
mkdir -p /www
cat > /www/index.html <<'EOS'
<html><head><script src="/app.js"></script></head><body><p id="p">page-only</p></body></html>
EOS
cat > /www/app.js <<'EOS'
document.addEventListener("DOMContentLoaded", function () {
  fetch("/data.txt").then(function (r) { return r.text(); }).then(function (t) {
    document.getElementById("p").textContent = "asset-ran:" + t.trim() + ":cookie=" + document.cookie;
  });
});
EOS
echo fetched-from-the-worker > /www/data.txt
httpd -f -p 8080 -h /www
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_loads_a_page_and_its_assets_through_a_preview_url() {
    let Some(chromium) = ["chromium", "chromium-browser"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        assert!(
            std::env::var("CI").is_err(),
            "chromium is missing (scripts/install-browser.sh installs it)"
        );
        eprintln!("skipped: no chromium (scripts/install-browser.sh installs it)");
        return;
    };
    let mut h = Harness::server_with(|c| c.preview_domain = Some("preview.test".into())).await;
    h.add_agent().await;
    let w = worker(&h, BROWSER_WORKER).await;
    drop(tunnel(&h.hub, &w, 8080).await);
    let url = preview_url(&h, &w, "8080");
    let profile = tempfile::tempdir().unwrap();
    // The wildcard DNS name, as the browser resolves it: to the server.
    let rules = format!("MAP *.preview.test {}", h.addr);
    let browser = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--host-resolver-rules={rules}"))
        .arg("--dump-dom")
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), browser)
        .await
        .expect("the browser finished within 90 s")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    // The redirect set the cookie, the script and the file it fetched came
    // through the preview, and the grant's cookie is out of the page's reach.
    assert!(
        dom.contains("asset-ran:fetched-from-the-worker:cookie=</p>"),
        "DOM:\n{dom}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.stop().await;
}

/// A one-service deployment `pv` (worker `pv_web`) whose page says `says`,
/// with a CGI script that answers with headers a hostile page would send.
fn preview_app(says: &str) -> String {
    format!(
        r#"
services:
  web:
    image: {}
    command:
      - sh
      - -c
      - |
        mkdir -p /www/cgi-bin
        echo {says} > /www/index.html
        printf '#!/bin/sh\necho "Content-Type: text/plain"\necho "Service-Worker-Allowed: /"\necho "Set-Cookie: a=1; Path=/; Domain=example.com"\necho\necho hi\n' > /www/cgi-bin/sw
        chmod +x /www/cgi-bin/sw
        exec httpd -f -p 8080 -h /www
"#,
        image()
    )
}

/// Deploys `pv` saying `says`, once its page answers through the preview.
async fn up_preview_app(h: &Harness, says: &str) {
    let file = h.state_path("pv.yaml");
    std::fs::write(&file, preview_app(says)).unwrap();
    h.ctl_ok(&["deploy", "up", "-f", file.to_str().unwrap(), "--name", "pv"])
        .await;
    let page = format!("{}/api/v1/workers/pv_web/ports/8080/index.html", h.url);
    for _ in 0..100 {
        let r = http()
            .get(&page)
            .bearer_auth(&h.token)
            .send()
            .await
            .unwrap();
        if r.status() == 200 && r.text().await.unwrap().trim() == says {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pv never served {says}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_url_opens_only_the_worker_it_was_issued_for_and_its_pages_stay_in_their_path() {
    let (h, _node) = Harness::start().await;
    up_preview_app(&h, "one").await;
    let prefix = "/api/v1/workers/pv_web/ports/8080";
    let (_, path) = issue(&h, "pv_web", 8080, 3600).await;
    let r = http().get(format!("{}{path}", h.url)).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = format!("{}{prefix}/index.html", h.url);
    let get = |c: String| http().get(&page).header("cookie", c).send();
    let r = get(cookie.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap().trim(), "one");

    // What the page sets stays on its own preview: its cookies under the
    // prefix and on no parent domain, no service worker scope beyond it.
    let r = http()
        .get(format!("{}{prefix}/cgi-bin/sw", h.url))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("service-worker-allowed").is_none(),
        "{:?}",
        r.headers()
    );
    let set: Vec<&str> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(set, [format!("a=1; Path={prefix}/")], "{set:?}");

    // The deployment goes and comes back under the same name: a new
    // worker, which the old URL does not open.
    h.ctl_ok(&["deploy", "down", "pv"]).await;
    up_preview_app(&h, "two").await;
    let r = get(cookie).await.unwrap();
    assert_eq!(refusal(r).await.1, "unauthorized");
    let r = http().get(format!("{}{path}", h.url)).send().await.unwrap();
    assert_eq!(refusal(r).await.1, "unauthorized");
    let (_, path) = issue(&h, "pv_web", 8080, 3600).await;
    let r = http().get(format!("{}{path}", h.url)).send().await.unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    let r = get(cookie.split(';').next().unwrap().to_string())
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "two");
    h.ctl_ok(&["deploy", "down", "pv"]).await;
    h.stop().await;
}

/// A preview upgrade that the worker accepts and then leaves silent is a
/// pending connection like any other: closed to make room, its socket
/// with it. So upgrades cannot use up the server's connections, which
/// every organization's operators and agents share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_preview_upgrades_are_closed_to_make_room() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h = Harness::server_with(|c| {
        c.max_pending_connections = 4;
        c.max_connections = 10;
    })
    .await;
    h.add_agent().await;
    // Each port answers its one connection `101` and then says nothing.
    const PORTS: std::ops::RangeInclusive<u16> = 9301..=9312;
    let script = format!(
        "printf 'HTTP/1.1 101 Switching Protocols\\r\\nConnection: Upgrade\\r\\nUpgrade: x\\r\\n\\r\\n' > /tmp/up; \
         for p in $(seq {} {}); do nc -l -p $p -e sh -c 'cat /tmp/up; exec sleep 3600' & done; wait",
        PORTS.start(),
        PORTS.end()
    );
    let w = worker(&h, &script).await;
    for _ in 0..100 {
        let (_, tcp, _) = h
            .hub
            .exec_collect(&w, &["cat", "/proc/net/tcp"])
            .await
            .unwrap();
        if String::from_utf8_lossy(&tcp).contains(&format!(":{:04X} ", PORTS.end())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr = h.url.trim_start_matches("http://").to_string();
    let mut upgraded = vec![];
    for p in PORTS {
        let (_, path) = issue(&h, &w, p, 600).await;
        let token = path.split_once("tether_preview=").unwrap().1.to_string();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(
            format!(
                "GET /api/v1/workers/{w}/ports/{p}/ HTTP/1.1\r\nHost: x\r\nCookie: tether_preview={token}\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = vec![0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
            .await
            .unwrap_or_else(|_| panic!("port {p}: no answer"))
            .unwrap_or_else(|e| {
                panic!("port {p}: refused ({e}): the silent upgrades kept their sockets")
            });
        assert_eq!(&head, b"HTTP/1.1 101", "port {p}");
        upgraded.push(s);
    }
    // The first ones were closed to make room, sockets and all.
    let mut first = upgraded.remove(0);
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut rest)).await;
    assert!(eof.is_ok(), "the oldest silent upgrade is still open");
    // And the server still takes new connections.
    let ok = http()
        .get(format!("{}/healthz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    h.stop().await;
}
