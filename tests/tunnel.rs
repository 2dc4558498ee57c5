//! Tunnels: a TCP connection from the node to a worker's port, carried by
//! a channel of the agent's own link (the worker publishes nothing).

mod common;
use common::*;
use std::time::Duration;
use tether::protocol::{ErrorCode, SpawnRequest};
use tether::server::hub::ChannelStream;
use tether::server::{ExecSession, Hub, StreamEvent};

async fn worker(h: &Harness, script: &str) -> String {
    h.hub
        .spawn(SpawnRequest {
            image: image(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .worker_id
}

/// A tunnel to `port`, once something listens there.
async fn tunnel(hub: &Hub, w: &str, port: u16) -> ExecSession {
    for _ in 0..100 {
        match hub.tunnel(w, port).await {
            Ok(t) => return t,
            Err(e) if e.code == ErrorCode::ConnectionRefused => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("tunnel to {w}:{port}: {e}"),
        }
    }
    panic!("nothing listened on {w}:{port} within 10 s");
}

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
    // ends only after the client's half-close reached the worker.
    let w = worker(&h, "nc -l -p 9000 -e cat").await;
    let ExecSession {
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
    let code = |r: Result<ExecSession, tether::protocol::ErrorBody>| match r {
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

/// `tether ctl port-forward WORKER SPEC` running, and the local address it
/// printed.
async fn port_forward(h: &Harness, w: &str, spec: &str) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["ctl", "port-forward", w, spec])
        .env("TETHER_SERVER", &h.url)
        .env("TETHER_TOKEN", &h.token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tether ctl port-forward");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("port-forward printed its address")
        .unwrap()
        .expect("a line");
    // "Forwarding from 127.0.0.1:PORT -> REMOTE"
    let addr = line
        .split_whitespace()
        .nth(2)
        .expect("an address")
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{line}");
    (child, addr)
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
    let mut c = None;
    for _ in 0..50 {
        // `nc` listens again a moment after the previous connection.
        let mut s = tokio::net::TcpStream::connect(&echo).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut one)).await {
            c = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = c.expect("an echo through port-forward");
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
