//! Node identity, attacked (docs/security.md, "One node cannot act as
//! another"): the registration key alone, a copied token, a replayed proof
//! or a crafted inventory must not let anyone act as another node; an
//! operator can revoke a node at once.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tether::agent::identity::NodeKey;
use tether::protocol::ProofPurpose;
use tokio_tungstenite::tungstenite::Message as Ws;

/// The node's token as its agent stored it.
fn stolen_token(h: &Harness, node: &str) -> String {
    std::fs::read_to_string(h.state_path(&format!("{node}/{node}.jwt")))
        .unwrap()
        .trim()
        .to_string()
}

async fn exec_echo(h: &Harness, w: &str) {
    let out = h.ctl_ok(&["exec", w, "--", "echo", "still-mine"]).await;
    assert_eq!(out, "still-mine\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_key_alone_cannot_take_a_bound_node_id() {
    let (mut h, node) = Harness::start().await;
    let w = h.ctl_spawn_sleeper().await;

    // An impostor with the shared registration key and its own key pair,
    // its proof dated near the end of the allowed skew (so that, were it
    // remembered, the real node's proofs would look like replays).
    let impostor = NodeKey::generate();
    let future = tether::protocol::now_millis() + 290_000;
    let resp = tether::http_client()
        .post(format!("{}/api/v1/register", h.url))
        .bearer_auth(PSK)
        .json(&json!({
            "node_id": node,
            "public_key": impostor.public_key(),
            "proof": impostor.proof_at(ProofPurpose::Register, &node, future),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "conflict", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bound to another key"),
        "{v}"
    );

    // A whole second agent under the same node id (another state directory,
    // so another key) stops with that reason instead of replacing the first.
    let mut cfg = h.agent_config(&node);
    cfg.state_dir = h.state_path("impostor-agent");
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        tether::agent::run(cfg, Default::default()),
    )
    .await
    .expect("the impostor agent gives up")
    .unwrap_err();
    assert!(e.to_string().contains("bound to another key"), "{e}");

    // The real agent kept its connection and its worker, and its key still
    // connects (as after a network cut).
    h.wait_status(&node, "online").await;
    exec_echo(&h, &w).await;
    let real_key = NodeKey::load_or_create(&h.state_path(&node)).unwrap();
    fake::connect(&h, &stolen_token(&h, &node), &node, Some(&real_key))
        .await
        .expect("the real node's proof is accepted");
    h.wait_status(&node, "online").await;
    exec_echo(&h, &w).await;

    // A second, honest node registers its own id as usual.
    let other = h.add_agent().await;
    assert_ne!(other, node);
    h.ctl_ok(&["rm", "-f", &w]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_token_or_a_replayed_proof_cannot_connect() {
    let (h, node) = Harness::start().await;
    let w = h.ctl_spawn_sleeper().await;
    let token = stolen_token(&h, &node);

    // The token with no proof, and with a proof made by another key.
    assert_eq!(
        fake::refused_status(fake::connect(&h, &token, &node, None).await),
        401
    );
    let other = NodeKey::generate();
    assert_eq!(
        fake::refused_status(fake::connect(&h, &token, &node, Some(&other)).await),
        401
    );

    // A proof is good once: the same upgrade request sent twice (as a
    // captured request would be) is refused the second time.
    let key = NodeKey::generate();
    let fake_node = unique("fake");
    h.track(&fake_node);
    let jwt = fake::token(&h, &fake_node, &key).await;
    let proof = key.proof(ProofPurpose::Connect, &fake_node);
    let first = fake::connect_with(fake::upgrade(&h, &jwt, Some(&proof))).await;
    assert!(first.is_ok(), "the first use of a proof is accepted");
    let replay = fake::connect_with(fake::upgrade(&h, &jwt, Some(&proof))).await;
    assert_eq!(fake::refused_status(replay), 401);
    // Nor written another way: the signature in upper case, the time with
    // a leading zero or a sign. (The hex part is all the signature, so
    // upper case is a different string for the same signature.)
    let (ms, sig) = proof.split_once('.').unwrap();
    for rewritten in [
        format!("{ms}.{}", sig.to_uppercase()),
        format!("0{proof}"),
        format!("+{proof}"),
        format!(" {proof} "),
    ] {
        let replay = fake::connect_with(fake::upgrade(&h, &jwt, Some(&rewritten))).await;
        assert_eq!(fake::refused_status(replay), 401, "{rewritten}");
    }

    // The real agent never noticed.
    h.wait_status(&node, "online").await;
    exec_echo(&h, &w).await;
    h.ctl_ok(&["rm", "-f", &w]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_cannot_claim_another_nodes_worker() {
    let (h, node) = Harness::start().await;
    let w = h.ctl_spawn_sleeper().await;
    let info: Value = serde_json::from_str(&h.ctl_ok(&["inspect", &w]).await).unwrap();
    assert_eq!(info["node_id"], node.as_str());

    // Another node, with a valid registration of its own, lists the worker
    // in its hello: once as the real node's, once relabelled as its own.
    let key = NodeKey::generate();
    let thief = unique("fake");
    h.track(&thief);
    let jwt = fake::token(&h, &thief, &key).await;
    let mut as_own = info.clone();
    as_own["node_id"] = json!(thief);
    for claimed in [info.clone(), as_own] {
        let mut ws = fake::connect(&h, &jwt, &thief, Some(&key)).await.unwrap();
        let hello = json!({"type": "hello", "payload": {
            "versions": [1], "node_id": thief, "agent_version": "fake",
            "inventory": [claimed],
        }});
        ws.send(Ws::text(hello.to_string())).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Ws::Text(t)))) if t.contains("\"welcome\"") => break,
                Ok(Some(Ok(_))) => {}
                other => panic!("no welcome: {other:?}"),
            }
        }
        h.wait_status(&thief, "online").await;
        // The worker stays the real node's, and commands still reach it.
        let now: Value = serde_json::from_str(&h.ctl_ok(&["inspect", &w]).await).unwrap();
        assert_eq!(now["node_id"], node.as_str(), "worker moved: {now}");
        exec_echo(&h, &w).await;
        let _ = ws.close(None).await;
    }
    // Nor can a node answer a spawn with another node's worker.
    let mut ws = fake::connect(&h, &jwt, &thief, Some(&key)).await.unwrap();
    let hello = json!({"type": "hello", "payload": {"versions": [1], "node_id": thief, "agent_version": "fake", "inventory": []}});
    ws.send(Ws::text(hello.to_string())).await.unwrap();
    h.wait_status(&thief, "online").await;
    let answer = {
        // The other node's worker, relabelled as the thief's own.
        let mut info = info.clone();
        info["node_id"] = json!(thief);
        async move {
            loop {
                match ws.next().await {
                    Some(Ok(Ws::Text(t))) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap();
                        if v["type"] == "spawn" {
                            let reply = json!({"type": "result", "id": v["id"], "payload": info});
                            ws.send(Ws::text(reply.to_string())).await.unwrap();
                            return ws;
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("connection ended: {other:?}"),
                }
            }
        }
    };
    let answering = tokio::spawn(answer);
    let img = image();
    let out = h
        .ctl(&["spawn", "--node", &thief, "--image", &img, "--", "true"])
        .await;
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let _ws = answering.await.unwrap();
    let now: Value = serde_json::from_str(&h.ctl_ok(&["inspect", &w]).await).unwrap();
    assert_eq!(now["node_id"], node.as_str(), "worker moved: {now}");
    exec_echo(&h, &w).await;
    h.ctl_ok(&["rm", "-f", &w]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_revokes_its_tokens_and_connection_at_once() {
    let mut h = Harness::server().await;
    // A hand-driven node: it stays away once removed, so what happens to
    // its connection and token can be watched.
    let key = NodeKey::generate();
    let node = unique("fake");
    h.track(&node);
    let jwt = fake::token(&h, &node, &key).await;
    let mut ws = fake::connect(&h, &jwt, &node, Some(&key)).await.unwrap();
    let hello = json!({"type": "hello", "payload": {"versions": [1], "node_id": node, "agent_version": "fake"}});
    ws.send(Ws::text(hello.to_string())).await.unwrap();
    h.wait_status(&node, "online").await;

    let t0 = std::time::Instant::now();
    assert_eq!(h.ctl_ok(&["node", "rm", &node]).await.trim(), node);
    // The connection is closed by the server, with the reason.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Ws::Close(f))) => return f.map(|f| f.reason.to_string()),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("connection closed within 5 s");
    assert_eq!(closed.as_deref(), Some("node removed by an operator"));
    assert!(t0.elapsed() < Duration::from_secs(5));
    let nodes = h.ctl_ok(&["nodes", "--json"]).await;
    assert!(!nodes.contains(&node), "{nodes}");
    // Its token is refused, even with a fresh proof by its own key.
    assert_eq!(
        fake::refused_status(fake::connect(&h, &jwt, &node, Some(&key)).await),
        401
    );
    // Unknown nodes are an error.
    let out = h.ctl(&["node", "rm", "no-such-node"]).await;
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));

    // A connection still in its handshake when the node is removed does
    // not bring it back.
    let key2 = NodeKey::generate();
    let node2 = unique("fake");
    h.track(&node2);
    let jwt2 = fake::token(&h, &node2, &key2).await;
    let mut ws2 = fake::connect(&h, &jwt2, &node2, Some(&key2)).await.unwrap();
    h.ctl_ok(&["node", "rm", &node2]).await;
    let hello2 = json!({"type": "hello", "payload": {"versions": [1], "node_id": node2, "agent_version": "fake"}});
    ws2.send(Ws::text(hello2.to_string())).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws2.next().await {
                Some(Ok(Ws::Close(f))) => return f.map(|f| f.reason.to_string()),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed within 5 s");
    assert_eq!(reason.as_deref(), Some("node removed by an operator"));
    let nodes = h.ctl_ok(&["nodes", "--json"]).await;
    assert!(!nodes.contains(&node2), "{nodes}");

    // The id is free again: a new key may bind it.
    let new_key = NodeKey::generate();
    let new_jwt = fake::token(&h, &node, &new_key).await;
    assert_ne!(new_jwt, jwt);
    fake::connect(&h, &new_jwt, &node, Some(&new_key))
        .await
        .unwrap();

    // A real agent that is removed comes back under a new binding (it still
    // has the registration key): its old token is void.
    let real = h.add_agent().await;
    let old = stolen_token(&h, &real);
    h.ctl_ok(&["node", "rm", &real]).await;
    h.wait_status(&real, "online").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stolen_token(&h, &real) == old {
        assert!(std::time::Instant::now() < deadline, "no new token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let real_key = NodeKey::load_or_create(&h.state_path(&real)).unwrap();
    assert_eq!(
        fake::refused_status(fake::connect(&h, &old, &real, Some(&real_key)).await),
        401
    );
    h.stop().await;
}

/// `deploy up` of deployment `name`: one service, `web`, that sleeps.
async fn deploy_sleeper(h: &Harness, name: &str) {
    let file = h.state_path(&format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "services:\n  web:\n    image: {}\n    command: [\"sleep\", \"3600\"]\n",
            image()
        ),
    )
    .unwrap();
    h.ctl_ok(&["deploy", "up", "-f", file.to_str().unwrap(), "--name", name])
        .await;
}

/// A real worker's inspection `info` as node `thief` claims it, as worker
/// `worker_id`, in a hello's inventory.
fn claimed(info: &Value, worker_id: &str, thief: &str) -> Value {
    let mut claim = info.clone();
    claim["worker_id"] = json!(worker_id);
    claim["node_id"] = json!(thief);
    claim["container_id"] = json!("0".repeat(64));
    claim
}

/// A node `thief` registered with `key` (another organization's) whose
/// hello claims `claim` as its worker; online.
async fn thief_says(h: &Harness, thief: &str, key: &str, claim: Value) -> fake::Client {
    h.track(thief);
    let node_key = NodeKey::generate();
    let jwt = fake::registered(h, thief, key, &node_key).await;
    fake::hello(h, thief, &jwt, &node_key, json!([claim])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_cannot_claim_a_place_in_another_organizations_deployment() {
    let (h, node) = Harness::start().await;
    // The default organization's deployment `prod`, one service.
    deploy_sleeper(&h, "prod").await;
    let real: Value = serde_json::from_str(&h.ctl_ok(&["inspect", "prod_web"]).await).unwrap();

    // A node of another organization says, in its hello, that it runs a
    // service of `prod` too.
    let acme_key = h
        .ctl_ok(&["org", "create", "acme"])
        .await
        .trim()
        .to_string();
    let thief = unique("fake");
    let mut ghost = claimed(&real, "prod_ghost", &thief);
    ghost["service"] = json!("ghost");
    let mut ws = thief_says(&h, &thief, &acme_key, ghost).await;

    // Refused: `prod` is the default organization's, on its node only.
    assert!(
        h.hub.worker("prod_ghost").is_err(),
        "the ghost was taken in"
    );
    let prod: Vec<_> = h
        .hub
        .deployments()
        .into_iter()
        .filter(|d| d.deployment == "prod")
        .collect();
    assert_eq!(prod.len(), 1);
    assert_eq!(
        (prod[0].node_id.as_str(), prod[0].services),
        (node.as_str(), 1)
    );
    let _ = ws.close(None).await;
    h.ctl_ok(&["deploy", "down", "prod"]).await;
    h.stop().await;
}

/// After a restart the server knows a deployment's services only as nodes
/// report them. A node of another organization that reports first must not
/// take the name from the node it was made on: the store keeps which node
/// that is, and the owner's own report is taken when it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_name_is_not_squatted_by_the_first_node_to_report_it() {
    let mut h = Harness::server().await;
    // The owner reaches the server through a proxy that can keep it away.
    let proxy = common::proxy::Proxy::start(h.addr).await;
    let owner = unique("test");
    let mut cfg = h.agent_config(&owner);
    cfg.server = format!("http://{}", proxy.addr).parse().unwrap();
    h.add_agent_with(cfg).await;
    let name = unique("prod");
    deploy_sleeper(&h, &name).await;
    let web = format!("{name}_web");
    let real: Value = serde_json::from_str(&h.ctl_ok(&["inspect", &web]).await).unwrap();
    let acme_key = h
        .ctl_ok(&["org", "create", "acme"])
        .await
        .trim()
        .to_string();

    // The owner is kept away; the server restarts.
    proxy.refuse(true);
    proxy.cut();
    h.restart_server().await;

    // A node of another organization reports the deployment's service as
    // its own, before the owner is back.
    let thief = unique("fake");
    let mut squat = real.clone();
    squat["node_id"] = json!(thief);
    let mut ws = thief_says(&h, &thief, &acme_key, squat).await;
    assert!(
        h.hub.worker(&web).is_err(),
        "the squatter's claim was taken in"
    );

    // The owner comes back and has its deployment.
    proxy.refuse(false);
    h.wait_status(&owner, "online").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.hub.worker(&web).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the owner's service is known again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.hub.worker(&web).unwrap().node_id, owner);
    let out = h
        .ctl_ok(&["exec", &format!("{name}/web"), "--", "echo", "mine"])
        .await;
    assert_eq!(out, "mine\n");
    let _ = ws.close(None).await;
    h.ctl_ok(&["deploy", "down", &name]).await;
    h.stop().await;
}

/// Worker ids a node may claim are the ones the server gives: a spawned
/// worker's ULID, or `DEPLOYMENT_SERVICE` of the deployment it claims. A
/// node of another organization that claims `later_web` before deployment
/// `later` exists (without a deployment, or under one of its own) takes
/// nothing: the deployment, made afterwards, is its own node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_cannot_claim_a_service_name_ahead_of_its_deployment() {
    let (h, node) = Harness::start().await;
    let probe = h.ctl_spawn_sleeper().await;
    let info: Value = serde_json::from_str(&h.ctl_ok(&["inspect", &probe]).await).unwrap();
    let acme_key = h
        .ctl_ok(&["org", "create", "acme"])
        .await
        .trim()
        .to_string();
    let thief = unique("fake");
    let bare = claimed(&info, "later_web", &thief);
    let mut under_its_own = bare.clone();
    under_its_own["deployment"] = json!("mine");
    under_its_own["service"] = json!("web");
    h.track(&thief);
    let node_key = NodeKey::generate();
    let jwt = fake::registered(&h, &thief, &acme_key, &node_key).await;
    for claim in [bare, under_its_own] {
        let mut ws = fake::hello(&h, &thief, &jwt, &node_key, json!([claim.clone()])).await;
        assert!(h.hub.worker("later_web").is_err(), "taken in: {claim}");
        let _ = ws.close(None).await;
        h.wait_status(&thief, "offline").await;
    }

    deploy_sleeper(&h, "later").await;
    let made: Value = serde_json::from_str(&h.ctl_ok(&["inspect", "later_web"]).await).unwrap();
    assert_eq!(made["node_id"], node.as_str(), "{made}");
    exec_echo(&h, "later_web").await;
    h.ctl_ok(&["deploy", "down", "later"]).await;
    h.stop().await;
}

/// A hello lists the execs its agent runs that the server may not know
/// (after a server restart), and the server takes them in. Only execs of
/// the node's own workers, and a bounded number: another node's worker
/// gets no stream here (nor, labelled as an MCP exec, kept output under an
/// exec id of its choosing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_adopts_only_a_bounded_number_of_its_own_workers_execs() {
    let (h, _node) = Harness::start().await;
    let victim = h.ctl_spawn_sleeper().await;
    let info: Value = serde_json::from_str(&h.ctl_ok(&["inspect", &victim]).await).unwrap();
    let key = NodeKey::generate();
    let thief = unique("fake");
    h.track(&thief);
    let jwt = fake::token(&h, &thief, &key).await;
    // A worker of its own, as the server would have named it.
    let own = ulid::Ulid::new().to_string().to_ascii_lowercase();
    let own_info = claimed(&info, &own, &thief);
    let (mut open, mut channels) = (Vec::new(), Vec::new());
    // One more than the server adopts of its own worker's, then ten of the
    // victim's (labelled as MCP execs).
    const OWN: u32 = 4097;
    for n in 1..=OWN + 10 {
        let (worker, label) = if n <= OWN {
            (own.as_str(), None)
        } else {
            let label = json!({"mcp_exec": format!("stolen-{n}"), "task_id": "t",
                "worker_id": victim, "cap": 16 << 20});
            (victim.as_str(), Some(label.to_string()))
        };
        open.push(json!({"channel": n, "worker_id": worker, "from": 0, "sent": 0, "label": label}));
        channels.push(json!({"channel": n, "received": 0, "limit": 65536}));
    }
    let mut ws = fake::connect(&h, &jwt, &thief, Some(&key)).await.unwrap();
    let hello = json!({"type": "hello", "payload": {
        "versions": [1], "node_id": thief, "agent_version": "fake",
        "inventory": [own_info], "channels": channels, "open": open,
    }});
    ws.send(Ws::text(hello.to_string())).await.unwrap();
    let welcome = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Ws::Text(t)))) if t.contains("\"welcome\"") => {
                break serde_json::from_str::<Value>(&t).unwrap();
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no welcome: {other:?}"),
        }
    };
    let held: Vec<u64> = welcome["payload"]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_u64().unwrap())
        .collect();
    assert!(
        held.iter().all(|&c| c <= u64::from(OWN)),
        "an exec of another node's worker was adopted"
    );
    assert_eq!(held.len(), 4096);
    let _ = ws.close(None).await;
    exec_echo(&h, &victim).await;
    h.stop().await;
}
