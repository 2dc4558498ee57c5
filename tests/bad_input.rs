//! Bad input at every layer gets a clear error with a stable code, and the
//! server and agent keep running with nothing else disturbed.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tether::agent::identity::NodeKey;
use tether::protocol::{ErrorCode, Frame, StreamKind};
use tokio_tungstenite::tungstenite::Message as Ws;

type Client = fake::Client;

fn http() -> reqwest::Client {
    tether::http_client()
}

async fn error_of(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

async fn register(h: &Harness, node: &str, psk: &str) -> reqwest::Response {
    fake::register(h, node, psk, &NodeKey::generate()).await
}

/// Next text message that is not a ping, as JSON.
async fn next_json(ws: &mut Client) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("reply in time")
            .unwrap()
            .unwrap();
        if let Ws::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_api_refuses_bad_requests_with_codes() {
    let (h, node) = Harness::start().await;
    // Missing and wrong operator token.
    let r = http()
        .get(format!("{}/api/v1/nodes", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 401);
    let r = http()
        .get(format!("{}/api/v1/nodes", h.url))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    let (s, code, _) = error_of(r).await;
    assert_eq!((s, code.as_str()), (401, "unauthorized"));
    // Malformed spawn body.
    let r = http()
        .post(format!("{}/api/v1/workers", h.url))
        .bearer_auth(&h.token)
        .header("content-type", "application/json")
        .body("{\"image\": 5}")
        .send()
        .await
        .unwrap();
    let (s, code, _) = error_of(r).await;
    assert_eq!((s, code.as_str()), (400, "invalid_request"));

    let img = image();
    let check = |out: std::process::Output, code: &str| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains(code), "expected {code}: {err}");
        err
    };
    // Unknown image: not_found, and nothing left behind on the node.
    let err = check(
        h.ctl(&["spawn", "--image", "no-such-image-tether:1", "--", "true"])
            .await,
        "not_found",
    );
    assert!(err.contains("no-such-image-tether:1"), "{err}");
    let filter = format!("label=tether.node_id={node}");
    assert_eq!(docker(&["network", "ls", "-q", "--filter", &filter]), "");
    assert_eq!(docker(&["ps", "-aq", "--filter", &filter]), "");
    // Unknown worker, for every verb.
    for args in [
        vec!["exec", "nope", "--", "true"],
        vec!["logs", "nope"],
        vec!["stop", "nope"],
        vec!["rm", "-f", "nope"],
        vec!["inspect", "nope"],
        vec!["cp", "nope:/etc/passwd", "/tmp/x"],
    ] {
        check(h.ctl(&args).await, "not_found");
    }
    // Unknown node.
    check(
        h.ctl(&["spawn", "--image", &img, "--node", "nope", "--", "true"])
            .await,
        "not_found",
    );
    check(h.ctl(&["drain", "nope"]).await, "not_found");
    // Bad values.
    check(
        h.ctl(&["spawn", "--image", &img, "--memory", "1", "--", "true"])
            .await,
        "invalid_request",
    );
    // A CPU share the engine would round to 0, which means no limit.
    let err = check(
        h.ctl(&[
            "spawn",
            "--image",
            &img,
            "--cpus",
            "0.000000001",
            "--",
            "true",
        ])
        .await,
        "invalid_request",
    );
    assert!(err.contains("0.01"), "{err}");
    check(
        h.ctl(&[
            "spawn",
            "--image",
            &img,
            "--label",
            "tether.node_id=x",
            "--",
            "true",
        ])
        .await,
        "invalid_request",
    );
    // A path that does not exist in a real worker.
    let w = h
        .ctl_ok(&["spawn", "--image", &img, "--", "sleep", "60"])
        .await
        .trim()
        .to_string();
    check(
        h.ctl(&["cp", &format!("{w}:/no/such/file"), "/tmp/x"])
            .await,
        "not_found",
    );
    // A source with no name of its own (`/`) into an existing directory:
    // refused, rather than the worker's entries landing there by their
    // own names.
    let into = h.state_path("cp-into");
    std::fs::create_dir_all(&into).unwrap();
    let out = h
        .ctl(&["cp", &format!("{w}:/"), into.to_str().unwrap()])
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("no name to copy"), "{err}");
    assert_eq!(std::fs::read_dir(&into).unwrap().count(), 0);
    let out = h.ctl(&["exec", &w, "--", "/no/such/binary"]).await;
    assert_ne!(out.status.code(), Some(0));
    // Everything still works.
    assert_eq!(
        h.ctl_ok(&["exec", &w, "--", "echo", "fine"]).await,
        "fine\n"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_tokens_are_checked() {
    let (h, node) = Harness::start().await;
    // Wrong PSK.
    let (s, code, _) = error_of(register(&h, "n1", "not-the-key-at-all").await).await;
    assert_eq!((s, code.as_str()), (401, "unauthorized"));
    // Bad node id.
    let (s, code, _) = error_of(register(&h, "../etc", PSK).await).await;
    assert_eq!((s, code.as_str()), (400, "invalid_request"));
    // Every malformed body is a 400 (which the agent takes as permanent),
    // and only for a caller with the key.
    let url = format!("{}/api/v1/register", h.url);
    let bodies: [(&str, &str); 5] = [
        ("application/json", "{not json"),
        (
            "text/plain",
            r#"{"node_id":"n1","public_key":"ab","proof":"1.ab"}"#,
        ),
        ("", r#"{"node_id":"n1","public_key":"ab","proof":"1.ab"}"#),
        ("application/json", r#"{"node_id":"n1","public_key":"ab"}"#),
        (
            "application/json",
            r#"{"node_id":"n1","public_key":"ab","proof":"1.ab","x":1}"#,
        ),
    ];
    for (ctype, body) in bodies {
        let send = |psk: &str| {
            let mut r = http().post(&url).bearer_auth(psk).body(body.to_string());
            if !ctype.is_empty() {
                r = r.header("content-type", ctype);
            }
            r.send()
        };
        let (s, code, msg) = error_of(send(PSK).await.unwrap()).await;
        assert_eq!(
            (s, code.as_str()),
            (400, "invalid_request"),
            "{ctype} {body}: {msg}"
        );
        let (s, _, _) = error_of(send("not-the-key-at-all").await.unwrap()).await;
        assert_eq!(s, 401, "{ctype} {body}");
    }
    // An agent with the wrong key stops with a clear error.
    let mut cfg = h.agent_config(&unique("test"));
    cfg.psk = "definitely-the-wrong-key".into();
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        tether::agent::run(cfg, Default::default()),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(e.to_string().contains("unauthorized"), "{e}");

    // A JWT signed with another key, and garbage.
    let forged = tether::server::auth::Signer::new(b"another key", Duration::from_secs(600))
        .issue("n1", "b")
        .0;
    for bad in [forged.as_str(), "garbage"] {
        match fake::connect(&h, bad, "n1", None).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 401);
                let v: Value = serde_json::from_slice(resp.body().as_ref().unwrap()).unwrap();
                assert_eq!(v["error"]["code"], "unauthorized");
            }
            other => panic!("forged token accepted: {other:?}"),
        }
    }
    // An expired one (signed with the server's own key, in its state dir).
    let key = std::fs::read_to_string(h.state_path("server/jwt.key")).unwrap();
    let expired = tether::server::auth::Signer::new(key.trim().as_bytes(), Duration::ZERO);
    let (tok, _) = expired.issue("n1", "b");
    tokio::time::sleep(Duration::from_secs(7)).await; // past the 5 s leeway
    match fake::connect(&h, &tok, "n1", None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expired token accepted: {other:?}"),
    }
    // The real agent never noticed.
    h.wait_status(&node, "online").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_answers_bad_frames_and_keeps_the_connection() {
    let (h, real_node) = Harness::start().await;
    let node = unique("fake");
    let key = NodeKey::generate();
    let jwt = fake::token(&h, &node, &key).await;
    let mut ws = fake::connect(&h, &jwt, &node, Some(&key)).await.unwrap();
    let hello = json!({"type": "hello", "payload": {"versions": [1], "node_id": node, "agent_version": "fake"}});
    ws.send(Ws::text(hello.to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    h.wait_status(&node, "online").await;

    let expect = |v: Value, code: ErrorCode| {
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["payload"]["code"], code.as_str(), "{v}");
        v
    };
    ws.send(Ws::text("this is not json")).await.unwrap();
    expect(next_json(&mut ws).await, ErrorCode::InvalidRequest);
    ws.send(Ws::text(r#"{"type":"teleport","id":"q1","payload":{}}"#))
        .await
        .unwrap();
    let v = expect(next_json(&mut ws).await, ErrorCode::Unsupported);
    assert_eq!(v["id"], "q1");
    ws.send(Ws::text(r#"{"type":"window","payload":{"channel":"x"}}"#))
        .await
        .unwrap();
    expect(next_json(&mut ws).await, ErrorCode::InvalidRequest);
    ws.send(Ws::binary(vec![1u8, 2, 3])).await.unwrap();
    expect(next_json(&mut ws).await, ErrorCode::InvalidRequest);
    let huge = Frame {
        channel: 9,
        stream: StreamKind::Stdout,
        offset: 0,
        payload: vec![0u8; 200_000].into(),
    };
    ws.send(Ws::Binary(huge.encode())).await.unwrap();
    expect(next_json(&mut ws).await, ErrorCode::TooLarge);
    let big_text = format!(
        r#"{{"type":"x","payload":"{}"}}"#,
        "a".repeat(2 * 1024 * 1024)
    );
    ws.send(Ws::text(big_text)).await.unwrap();
    expect(next_json(&mut ws).await, ErrorCode::TooLarge);
    // A message out of place, or of a type the server does not know, is
    // named in the answer, never sent back: a node that stops reading
    // cannot make the server queue its own megabytes for it.
    let padded = json!({"type": "hello", "payload": {"versions": [1], "node_id": node,
        "agent_version": "a".repeat(900_000)}});
    ws.send(Ws::text(padded.to_string())).await.unwrap();
    let v = expect(next_json(&mut ws).await, ErrorCode::InvalidRequest);
    assert!(
        v.to_string().len() < 1000,
        "the answer carries the message back"
    );
    assert!(
        v["payload"]["message"].as_str().unwrap().contains("hello"),
        "{v}"
    );
    let odd = json!({"type": "t".repeat(900_000), "id": "q2", "payload": {}});
    ws.send(Ws::text(odd.to_string())).await.unwrap();
    let v = expect(next_json(&mut ws).await, ErrorCode::Unsupported);
    assert!(
        v.to_string().len() < 1000,
        "the answer carries the type back"
    );
    // A flood of garbage does not kill the connection either.
    for _ in 0..500 {
        ws.send(Ws::text("{}")).await.unwrap();
    }
    for _ in 0..500 {
        expect(next_json(&mut ws).await, ErrorCode::InvalidRequest);
    }
    // Still connected and online; the real node is unaffected.
    ws.send(Ws::Ping(vec![7].into())).await.unwrap();
    h.wait_status(&node, "online").await;
    let w = h
        .hub
        .spawn(tether::protocol::SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "30".into()],
            node_id: Some(real_node),
            ..Default::default()
        })
        .await
        .unwrap();
    let (code, out, _) = h
        .hub
        .exec_collect(&w.worker_id, &["echo", "ok"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"ok\n".to_vec()));
    h.stop().await;
}

/// A fake server that speaks just enough to hand the agent bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::result_large_err)] // tungstenite's handshake callback signature
async fn agent_answers_bad_frames_and_keeps_the_connection() {
    ensure_image();
    tether::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let node = unique("test");
    let _cleanup = NodeGuard(node.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Pre-provisioned token: the agent goes straight to the WebSocket.
    std::fs::create_dir_all(dir.path().join("agent")).unwrap();
    std::fs::write(
        dir.path().join(format!("agent/{node}.jwt")),
        "pre-provisioned",
    )
    .unwrap();
    let cfg = tether::agent::AgentConfig::new(
        format!("http://{addr}").parse().unwrap(),
        PSK.into(),
        node.clone(),
        dir.path().join("agent"),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(tether::agent::run(cfg, stop.clone()));

    let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
              mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
        assert_eq!(req.headers()["authorization"], "Bearer pre-provisioned");
        resp.headers_mut()
            .insert("sec-websocket-protocol", "tether.v1".parse().unwrap());
        Ok(resp)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(tcp, cb).await.unwrap();
    let hello = next(&mut ws).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["payload"]["node_id"], node.as_str());
    let welcome = json!({"type": "welcome", "payload": {"version": 1, "session_id": "s1",
        "heartbeat_interval_secs": 10, "heartbeat_timeout_secs": 30}});
    ws.send(Ws::text(welcome.to_string())).await.unwrap();

    let code_of = |v: &Value| {
        v["payload"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    ws.send(Ws::text("{{{")).await.unwrap();
    let v = next(&mut ws).await;
    assert_eq!(code_of(&v), "invalid_request");
    ws.send(Ws::text(
        r#"{"type":"self_destruct","id":"r1","payload":{}}"#,
    ))
    .await
    .unwrap();
    let v = next(&mut ws).await;
    assert_eq!(
        (code_of(&v).as_str(), v["id"].as_str()),
        ("unsupported", Some("r1"))
    );
    ws.send(Ws::text(
        r#"{"type":"spawn","id":"r2","payload":{"worker_id":12}}"#,
    ))
    .await
    .unwrap();
    let v = next(&mut ws).await;
    assert_eq!(
        (code_of(&v).as_str(), v["id"].as_str()),
        ("invalid_request", Some("r2"))
    );
    let huge = Frame {
        channel: 1,
        stream: StreamKind::Stdin,
        offset: 0,
        payload: vec![0u8; 100_000].into(),
    };
    ws.send(Ws::Binary(huge.encode())).await.unwrap();
    assert_eq!(code_of(&next(&mut ws).await), "too_large");
    // A real worker, spawned by the fake server.
    let wid = format!("{node}-w");
    let spawn = json!({"type": "spawn", "id": "r3", "payload": {"worker_id": wid, "image": image(), "cmd": ["sleep", "60"]}});
    ws.send(Ws::text(spawn.to_string())).await.unwrap();
    let v = next(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["id"].as_str()),
        (Some("result"), Some("r3")),
        "{v}"
    );
    // Data beyond the granted credit closes that channel only, with a reason.
    let open = json!({"type": "exec", "id": "r4", "payload": {"channel": 5, "worker_id": wid, "cmd": ["cat"], "stdin": true, "window": 8}});
    ws.send(Ws::text(open.to_string())).await.unwrap();
    let v = next(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["id"].as_str()),
        (Some("result"), Some("r4")),
        "{v}"
    );
    let over = Frame {
        channel: 5,
        stream: StreamKind::Stdin,
        offset: 0,
        payload: vec![1u8; 10].into(),
    };
    ws.send(Ws::Binary(over.encode())).await.unwrap();
    let v = next(&mut ws).await;
    assert_eq!(v["type"], "channel_close", "{v}");
    assert_eq!(v["payload"]["channel"], 5);
    assert_eq!(v["payload"]["error"]["code"], "invalid_request", "{v}");
    // And a valid request is still served.
    ws.send(Ws::text(
        r#"{"type":"list_workers","id":"r5","payload":{}}"#,
    ))
    .await
    .unwrap();
    let v = loop {
        let v = next(&mut ws).await;
        if v["id"] == "r5" {
            break v;
        }
    };
    assert_eq!(v["type"], "result");
    assert_eq!(v["payload"]["workers"][0]["worker_id"], wid.as_str());
    stop.cancel();
    // The agent closes with 1001 on shutdown.
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Ws::Close(f))) => return f,
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    agent.await.unwrap().unwrap();
}

async fn next(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Value {
    let f = async {
        loop {
            if let Ws::Text(t) = ws.next().await.unwrap().unwrap() {
                let v = serde_json::from_str::<Value>(t.as_str()).unwrap();
                // Unsolicited reports are not answers.
                if !matches!(
                    v["type"].as_str(),
                    Some("node_status" | "capabilities" | "worker_event")
                ) {
                    return v;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("agent replied")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_asking_for_inference_is_refused_where_none_runs() {
    let (h, node) = Harness::start().await;
    let ask = |node_id: Option<String>| tether::protocol::SpawnRequest {
        image: image(),
        cmd: vec!["sleep".into(), "60".into()],
        inference: true,
        node_id,
        ..Default::default()
    };
    // Placed by the server: no node reports a running backend.
    let e = h.hub.spawn(ask(None)).await.unwrap_err();
    assert_eq!(e.code, tether::protocol::ErrorCode::Unavailable, "{e}");
    assert!(e.message.contains("inference"), "{e}");
    // Sent to a node whose file leaves inference off: the node says why.
    let e = h.hub.spawn(ask(Some(node.clone()))).await.unwrap_err();
    assert_eq!(e.code, tether::protocol::ErrorCode::PolicyDenied, "{e}");
    assert!(e.message.contains("inference is disabled"), "{e}");
    // Through the API and ctl alike.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "ctl",
            "spawn",
            "--inference",
            "--image",
            &image(),
            "--",
            "true",
        ])
        .env("TETHER_SERVER", &h.url)
        .env("TETHER_TOKEN", &h.token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inference"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was created on the node.
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=tether.node_id={node}"),
    ]);
    assert!(left.trim().is_empty(), "containers left: {left}");
    h.stop().await;
}

/// A server given a bad `--node-config` does not start, and says which
/// file and what in it.
#[test]
fn a_bad_node_config_file_stops_the_server_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("node.yaml");
    std::fs::write(
        &bad,
        "version: 1\ninference_backend: {enabled: true, bogus: 1}\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.yaml");
    for (file, said) in [(&bad, "unknown field `bogus`"), (&missing, "No such file")] {
        let err = server_refuses(
            &dir.path().join("state"),
            &["--node-config".as_ref(), file.as_os_str()],
        );
        assert!(
            err.contains("--node-config")
                && err.contains(&*file.to_string_lossy())
                && err.contains(said),
            "{err}"
        );
    }
    assert!(
        !dir.path().join("state").exists(),
        "nothing made before the check"
    );
}

/// A heartbeat timeout within one ping interval would drop every idle
/// agent between two pings: the server refuses to start with it.
#[test]
fn a_heartbeat_timeout_within_the_interval_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let err = server_refuses(dir.path(), &["--heartbeat-timeout".as_ref(), "8".as_ref()]);
    assert!(
        err.contains("--heartbeat-timeout (8 s) must be longer than --heartbeat-interval (10 s)"),
        "{err}"
    );
}

/// `tether server` with `args` (and a state directory): it exits with 2
/// before it listens; its standard error.
fn server_refuses(state: &std::path::Path, args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["server", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .args(args)
        .env("TETHER_PSK", "a-registration-key-long-enough")
        .env_remove("TETHER_PSK_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}
