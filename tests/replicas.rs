//! The server's state in PostgreSQL: replicas on one database share node
//! identities, organizations, tokens and the keys that sign node tokens, and
//! a replica that restarts forgets nothing. A real PostgreSQL server of the
//! test's own (`common::postgres`), real agents and Docker.

mod common;

use common::postgres::Postgres;
use common::*;
use std::time::{Duration, Instant};
use tether::agent::identity::NodeKey;

async fn replica(url: &str) -> Harness {
    let url = url.to_string();
    Harness::server_with(move |c| c.database = Some(url)).await
}

/// Waits until `ctl ARGS` (as `token`) prints something containing `want`:
/// another replica's write reaches this one's copy by a notification.
async fn eventually(h: &Harness, token: &str, args: &[&str], want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = h.ctl_as(token, args, None).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "ctl {args:?} never showed {want:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_database_share_identities_organizations_and_tokens() {
    let pg = Postgres::start();
    let db = pg.database("tether_replicas");
    // Two replicas start at once: the schema is made once.
    let (a, b) = tokio::join!(replica(&db), replica(&db));
    assert_eq!(
        pg.query(
            "tether_replicas",
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM tether_migrations"
        ),
        "1,2,3",
        "each step of the schema once"
    );
    assert_eq!(a.token, b.token, "one admin token for every replica");
    assert!(
        !a.state_path("server/state.json").exists(),
        "the state is in the database, not in a file"
    );

    // An organization and its operator token made at A work at B.
    let key = a
        .ctl_ok(&["org", "create", "acme"])
        .await
        .trim()
        .to_string();
    let token = a
        .ctl_ok(&["token", "create", "--org", "acme"])
        .await
        .trim()
        .to_string();
    eventually(&b, &b.token, &["org", "ls"], "acme").await;
    eventually(&b, &token, &["org", "ls"], "acme").await;
    // A token no notification announced (written behind the replicas'
    // backs) works at once: a replica whose copy lacks a token reads the
    // database. A made-up one is still refused.
    let unheard = format!("top_{}", unique("unheard"));
    pg.query(
        "tether_replicas",
        &format!(
            "INSERT INTO operator_tokens (id, org, hash, created_at) \
             VALUES ('tok-unheard', 'acme', '{}', '2026-01-01T00:00:00Z')",
            sha256(unheard.as_bytes())
        ),
    );
    let out = b.ctl_as(&unheard, &["org", "ls"], None).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("acme"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = b.ctl_as("top_madeup", &["org", "ls"], None).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid operator token"));

    // A node token that A issued opens a connection at B: the signing key
    // and the node's identity are shared.
    let node = unique("acme");
    let nk = NodeKey::generate();
    let r = fake::register(&a, &node, &key, &nk).await;
    assert!(r.status().is_success(), "{}", r.status());
    let v: serde_json::Value = r.json().await.unwrap();
    let jwt = v["auth"]["node_jwt"].as_str().unwrap().to_string();
    assert!(fake::connect(&b, &jwt, &node, Some(&nk)).await.is_ok());
    // A proof is good once across the replicas: a captured upgrade request
    // that A took is refused at B (after the upgrade: B learns it from the
    // database while the hello comes, and closes before the node joins).
    let proof = nk.proof(tether::protocol::ProofPurpose::Connect, &node);
    let first = fake::connect_with(fake::upgrade(&a, &jwt, Some(&proof)))
        .await
        .expect("the first use of a proof is accepted");
    drop(fake::welcomed(first, &node).await);
    let replay = fake::connect_with(fake::upgrade(&b, &jwt, Some(&proof)))
        .await
        .expect("the upgrade itself");
    let (code, reason) = fake::closed_after_hello(replay, &node).await;
    assert_eq!(code, 1008, "replayed at another replica: {reason}");
    assert!(reason.contains("already used"), "{reason}");
    assert_eq!(
        pg.query(
            "tether_replicas",
            &format!("SELECT org FROM nodes WHERE node_id = '{node}'")
        ),
        "acme"
    );
    // Another key for that node id is refused at either replica.
    let other = NodeKey::generate();
    assert_eq!(fake::register(&b, &node, &key, &other).await.status(), 409);

    // B saw the node as acme's. The id is then bound anew in the default
    // organization, and no notification of it has reached B yet (written
    // behind the replicas' backs). acme's operator at B no longer reaches
    // it: B judges a node it does not hold by the database, not by its
    // registry's memory of the node or its copy of the store.
    let mut ws = fake::hello(&b, &node, &jwt, &nk, serde_json::json!([])).await;
    let _ = ws.close(None).await;
    b.wait_status(&node, "offline").await;
    pg.query(
        "tether_replicas",
        &format!(
            "UPDATE nodes SET org = 'default', binding = 'rebound', \
             public_key = '{}' WHERE node_id = '{node}'",
            "ab".repeat(32)
        ),
    );
    let r = reqwest::Client::new()
        .put(format!("{}/api/v1/nodes/{node}/config", b.url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"version": 1, "config_version": "from-acme"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, 404, "{text}");
    assert!(text.contains(&format!("no such node: {node}")), "{text}");
    assert_eq!(
        pg.query(
            "tether_replicas",
            &format!("SELECT count(*) FROM desired_configs WHERE node_id = '{node}'")
        ),
        "0"
    );

    // A real agent registered at A comes up at B; B's operator of acme
    // sees it and runs a worker on it.
    let mut b = b;
    let mut cfg = b.agent_config(&unique("acme"));
    cfg.psk = key.clone();
    cfg.server = a.url.parse().unwrap();
    let agent_node = cfg.node_id.clone();
    let mut a = a;
    let state = cfg.state_dir.clone();
    a.add_agent_with(cfg.clone()).await;
    a.stop().await;
    let mut cfg_b = b.agent_config(&agent_node);
    cfg_b.psk = key.clone();
    cfg_b.state_dir = state;
    b.add_agent_with(cfg_b).await;
    let nodes = eventually(&b, &token, &["nodes"], &agent_node).await;
    assert!(nodes.contains("online"), "{nodes}");
    let img = image();
    let w = b
        .ctl_as(
            &token,
            &["spawn", "--image", &img, "--", "sleep", "60"],
            None,
        )
        .await;
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let w = String::from_utf8_lossy(&w.stdout).trim().to_string();

    // Revoked at B, refused at a replica started afresh on the database,
    // where the organization, the audit trail and the node are all kept.
    let listed = b.ctl_ok(&["token", "ls"]).await;
    let id = listed.split('\t').next().unwrap().to_string();
    let c = replica(&db).await;
    let audit = c.ctl_ok(&["audit", "--json"]).await;
    assert!(
        audit.contains(&w) && audit.contains("\"org\":\"acme\""),
        "{audit}"
    );
    assert!(c.ctl_ok(&["org", "ls"]).await.contains("acme"));
    b.ctl_ok(&["token", "revoke", &id]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = c.ctl_as(&token, &["ps"], None).await;
        if !out.status.success() {
            assert!(String::from_utf8_lossy(&out.stderr).contains("invalid operator token"));
            break;
        }
        assert!(Instant::now() < deadline, "the revocation never reached C");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.ctl_ok(&["rm", "-f", &w]).await;
    b.stop().await;
    c.stop().await;
}

/// The rules every store keeps, checked on both: first come first bound,
/// one organization per node, organizations and tokens only of existing
/// organizations, revocation, forgetting a node takes its configuration.
fn keeps_the_store_rules(s: &dyn tether::server::store::Store) {
    use tether::server::orgs::{
        OperatorToken, Organization, RegistrationKey, new_id, now_rfc3339, secret_hash,
    };
    use tether::server::store::StoreError;
    let a = s.bind_node("n1", "AA", "default").unwrap();
    assert_eq!(a.public_key, "aa");
    assert_eq!(s.bind_node("n1", "aa", "default").unwrap(), a);
    assert!(matches!(
        s.bind_node("n1", "bb", "default"),
        Err(StoreError::BoundElsewhere { .. })
    ));
    assert!(matches!(
        s.bind_node("n1", "aa", "acme"),
        Err(StoreError::OtherOrganization { .. })
    ));
    assert!(s.is_current("n1", &a.binding));
    // A deployment's name stays with the node it was made on until taken
    // down or until that node is forgotten.
    s.set_deployment_node("shop", Some("n1")).unwrap();
    s.set_deployment_node("gone", Some("n1")).unwrap();
    s.set_deployment_node("other", Some("n9")).unwrap();
    assert_eq!(s.deployment_node("shop").as_deref(), Some("n1"));
    s.set_deployment_node("gone", None).unwrap();
    assert_eq!(s.deployment_node("gone"), None);
    // A name is claimed for a node before the node makes it: free, the
    // node's already, or held by another; given back only by its holder.
    use tether::server::store::Claim;
    s.bind_node("n4", "ee", "default").unwrap();
    assert_eq!(s.claim_deployment("fresh", "n1").unwrap(), Claim::New);
    assert_eq!(s.claim_deployment("fresh", "n1").unwrap(), Claim::Held);
    assert_eq!(
        s.claim_deployment("fresh", "n4").unwrap(),
        Claim::TakenBy("n1".into())
    );
    s.release_deployment("fresh", "n4").unwrap();
    assert_eq!(s.deployment_node("fresh").as_deref(), Some("n1"));
    s.release_deployment("fresh", "n1").unwrap();
    assert_eq!(s.deployment_node("fresh"), None);
    assert_eq!(s.claim_deployment("fresh", "n2").unwrap(), Claim::New);
    s.release_deployment("fresh", "n2").unwrap();
    let org = Organization {
        name: "acme".into(),
        created_at: now_rfc3339(),
    };
    let key = RegistrationKey {
        id: new_id(),
        org: "acme".into(),
        hash: secret_hash("k"),
        created_at: now_rfc3339(),
    };
    s.add_organization(org.clone(), key.clone()).unwrap();
    assert!(matches!(
        s.add_organization(org.clone(), key.clone()),
        Err(StoreError::OrgExists(_))
    ));
    assert_eq!(s.registration_key_by_hash(&secret_hash("k")), Some(key));
    let t = OperatorToken {
        id: new_id(),
        org: "acme".into(),
        hash: secret_hash("t"),
        created_at: now_rfc3339(),
        expires: Some(4_000_000_000),
    };
    s.add_operator_token(t.clone()).unwrap();
    assert!(matches!(
        s.add_operator_token(OperatorToken {
            org: "nope".into(),
            ..t.clone()
        }),
        Err(StoreError::NoSuchOrg(_))
    ));
    assert_eq!(s.operator_token_by_hash(&secret_hash("t")), Some(t.clone()));
    assert!(s.revoke_operator_token(&t.id).unwrap());
    assert!(!s.revoke_operator_token(&t.id).unwrap());
    let cfg: tether::protocol::NodeConfig =
        serde_json::from_value(serde_json::json!({"config_version": "v7"})).unwrap();
    s.set_desired_config("n1", Some(&cfg)).unwrap();
    assert_eq!(s.desired_configs().len(), 1);
    assert!(s.set_mcp_node("n1", true).unwrap());
    assert!(!s.set_mcp_node("n1", true).unwrap());
    assert!(s.forget_node("n1").unwrap());
    assert!(!s.is_current("n1", &a.binding));
    assert_eq!(s.deployment_node("shop"), None, "forgotten with its node");
    assert_eq!(s.deployment_node("other").as_deref(), Some("n9"));
    assert!(s.desired_configs().is_empty());
    assert!(
        s.mcp_nodes().is_empty(),
        "a forgotten node leaves the MCP allowlist"
    );
    assert_eq!(s.secret("jwt.key", "first".into()).unwrap(), "first");
    assert_eq!(s.secret("jwt.key", "second".into()).unwrap(), "first");
    let mut r = tether::server::audit::AuditRecord::new("operator", "api:spawn");
    r.task_id = Some("t1".into());
    r.org = Some("acme".into());
    s.append_audit(&r).unwrap();
    let f = tether::server::audit::AuditFilter {
        org: Some("acme".into()),
        ..Default::default()
    };
    assert_eq!(s.audit(&f).len(), 1);
    let other = tether::server::audit::AuditFilter {
        org: Some("other".into()),
        ..Default::default()
    };
    assert!(s.audit(&other).is_empty());
    // An organization goes with its keys, not while a node belongs to it.
    s.bind_node("n2", "cc", "acme").unwrap();
    assert!(matches!(
        s.remove_organization("acme"),
        Err(StoreError::OrgHasNodes { nodes: 1, .. })
    ));
    assert!(s.forget_node("n2").unwrap());
    // Its preview grants go with it: a later organization of the same name
    // must not list (or revoke) them.
    let grant = |id: &str, org: Option<&str>| tether::server::preview::PreviewGrant {
        id: id.into(),
        worker_id: "w1".into(),
        port: 8080,
        expires: 4_000_000_000,
        container_id: "c1".into(),
        org: org.map(Into::into),
    };
    s.add_preview(grant("g-acme", Some("acme"))).unwrap();
    s.add_preview(grant("g-default", None)).unwrap();
    assert!(s.remove_organization("acme").unwrap());
    assert_eq!(s.registration_key_by_hash(&secret_hash("k")), None);
    assert_eq!(s.preview("g-acme"), None);
    assert_eq!(s.preview("g-default"), Some(grant("g-default", None)));
    assert!(!s.remove_organization("acme").unwrap());
    assert!(matches!(
        s.remove_organization("default"),
        Err(StoreError::DefaultOrg)
    ));
}

#[test]
fn the_sqlite_and_the_postgres_store_keep_the_same_rules() {
    use tether::server::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let file = tether::server::store::SqliteStore::open(dir.path()).unwrap();
    keeps_the_store_rules(&file);
    let pg = Postgres::start();
    let url = pg.database("tether_rules");
    let store = tether::server::store::PgStore::connect(&url).unwrap();
    keeps_the_store_rules(&store);
    // A second connection (another replica) reads what the first wrote.
    let again = tether::server::store::PgStore::connect(&url).unwrap();
    assert!(again.organizations().is_empty());
    assert!(again.mcp_nodes().is_empty(), "forgotten at every replica");
    assert_eq!(again.deployment_node("other").as_deref(), Some("n9"));
    assert_eq!(again.secret("jwt.key", "third".into()).unwrap(), "first");
    // The audit table is bounded: the newest records stay, in order.
    let bounded = again.keep_audit(5);
    let before = bounded.audit(&Default::default()).len();
    for i in 0..12 {
        let r = tether::server::audit::AuditRecord::new("operator", &format!("test:{i}"));
        bounded.append_audit(&r).unwrap();
    }
    let kept: Vec<String> = bounded
        .audit(&Default::default())
        .into_iter()
        .map(|r| r.operation)
        .collect();
    assert_eq!(
        kept,
        ["test:7", "test:8", "test:9", "test:10", "test:11"],
        "{before} before"
    );
    assert_eq!(pg.query("tether_rules", "SELECT count(*) FROM audit"), "5");
    // Two replicas claiming one new deployment name at once: one wins.
    bounded.bind_node("n3", "dd", "default").unwrap();
    let claims: Vec<_> = std::thread::scope(|t| {
        let one = t.spawn(|| store.claim_deployment("raced", "n1").unwrap());
        let two = t.spawn(|| bounded.claim_deployment("raced", "n3").unwrap());
        vec![one.join().unwrap(), two.join().unwrap()]
    });
    use tether::server::store::Claim;
    assert_eq!(
        claims.iter().filter(|c| **c == Claim::New).count(),
        1,
        "{claims:?}"
    );
    assert!(
        claims.iter().any(|c| matches!(c, Claim::TakenBy(_))),
        "{claims:?}"
    );
    // A node proof is new once across replicas, also when the same proof
    // arrives many times at once (one batch holds it more than once).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let until = tether::protocol::now_millis() + 60_000;
    let answers: Vec<bool> = rt
        .block_on(futures_util::future::join_all(
            (0..50).map(|_| store.use_proof("proof-a", until)),
        ))
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(answers.iter().filter(|new| **new).count(), 1, "{answers:?}");
    assert!(!rt.block_on(bounded.use_proof("proof-a", until)).unwrap());
    assert!(rt.block_on(bounded.use_proof("proof-b", until)).unwrap());
    assert!(!rt.block_on(store.use_proof("proof-b", until)).unwrap());
}

/// With `sslmode=require` the store speaks TLS to PostgreSQL and verifies
/// the certificate: against the operator's CA it works (and the server sees
/// a TLS session); without that CA, or under a name the certificate does
/// not carry, the connection is refused saying why. A CA given for a URL
/// that does not ask for TLS is refused too, not ignored.
#[test]
fn the_postgres_store_speaks_tls_and_verifies_the_certificate() {
    let pki = test_pki("127.0.0.1");
    let pg = Postgres::start_tls(&pki.cert_pem, &pki.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let plain = pg.database("tether_tls");
    let url = format!("{plain}?sslmode=require&application_name=tether-tls-test");

    let store = tether::server::store::PgStore::connect_with(&url, Some(&ca)).unwrap();
    use tether::server::store::Store;
    assert!(store.set_mcp_node("n1", true).unwrap());
    assert_eq!(store.mcp_nodes(), vec!["n1".to_string()]);
    assert_eq!(
        pg.query(
            "tether_tls",
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'tether-tls-test'"
        ),
        "t",
        "the store's session is TLS"
    );
    // libpq's verifying mode reads the same.
    let verify = url.replace("sslmode=require", "sslmode=verify-full");
    drop(tether::server::store::PgStore::connect_with(&verify, Some(&ca)).unwrap());

    let refused = |url: &str, ca: Option<&std::path::Path>| {
        match tether::server::store::PgStore::connect_with(url, ca) {
            Ok(_) => panic!("{url} connected"),
            Err(e) => tether::error_chain(&e),
        }
    };
    let e = refused(&url, None);
    assert!(e.contains("UnknownIssuer"), "the web's roots only: {e}");
    let by_name = url.replace("127.0.0.1", "localhost");
    let e = refused(&by_name, Some(&ca));
    assert!(e.contains("not valid for name"), "another name: {e}");
    let e = refused(&plain, Some(&ca));
    assert!(e.contains("sslmode=require"), "{e}");
}

/// Two organizations `up` one new deployment name at once, each at its own
/// replica: the name is reserved in the database before a node is asked,
/// so one deployment is made and the other `up` is told the name is taken
/// (each replica's own hold sees only its own requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_new_deployment_name_is_made_once_across_replicas() {
    let pg = Postgres::start();
    let db = pg.database("tether_dep_race");
    let (mut a, mut b) = tokio::join!(replica(&db), replica(&db));
    let key_a = a
        .ctl_ok(&["org", "create", "acme"])
        .await
        .trim()
        .to_string();
    let key_b = a
        .ctl_ok(&["org", "create", "globex"])
        .await
        .trim()
        .to_string();
    let ta = a
        .ctl_ok(&["token", "create", "--org", "acme"])
        .await
        .trim()
        .to_string();
    let tb = a
        .ctl_ok(&["token", "create", "--org", "globex"])
        .await
        .trim()
        .to_string();
    eventually(&b, &tb, &["org", "ls"], "globex").await;
    let mut cfg = a.agent_config(&unique("acme"));
    cfg.psk = key_a;
    let na = a.add_agent_with(cfg).await;
    let mut cfg = b.agent_config(&unique("globex"));
    cfg.psk = key_b;
    let nb = b.add_agent_with(cfg).await;

    let name = unique("race");
    let text = format!(
        "services:\n  web:\n    image: {}\n    command: [\"sleep\", \"3600\"]\n",
        image()
    );
    let (ra, rb) = tokio::join!(
        a.deploy_up_as(&ta, &text, &name),
        b.deploy_up_as(&tb, &text, &name)
    );
    let made: Vec<_> = [(&ra, &na, &ta, &a), (&rb, &nb, &tb, &b)]
        .into_iter()
        .filter(|(r, ..)| r.status.success())
        .collect();
    let err = |r: &std::process::Output| String::from_utf8_lossy(&r.stderr).to_string();
    assert_eq!(made.len(), 1, "acme: {} globex: {}", err(&ra), err(&rb));
    let lost = if ra.status.success() { &rb } else { &ra };
    assert!(err(lost).contains("is taken"), "{}", err(lost));
    let (_, winner, token, at) = made[0];
    let ps = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=tether.deployment={name}"),
        "--format",
        "{{.Label \"tether.node_id\"}}",
    ]);
    assert_eq!(ps.trim(), winner.as_str(), "one deployment, the winner's");
    // The loser's node holds nothing of it; the name is the winner's to
    // take down, and free again after.
    at.ctl_ok_as(token, &["deploy", "down", &name]).await;
    assert_eq!(
        pg.query(
            "tether_dep_race",
            &format!("SELECT count(*) FROM deployments WHERE name = '{name}'")
        ),
        "0"
    );
    a.stop().await;
    b.stop().await;
}

/// Replicas that serve HTTPS pass requests to each other over TLS,
/// verifying the holder's certificate with `--replica-ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serving_https_pass_requests_over_tls() {
    let pg = Postgres::start();
    let db = pg.database("tether_replicas_tls");
    let pki = test_pki("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let tls_replica = |with_ca: bool| {
        let (db, ca, cert, key) = (db.clone(), ca.clone(), cert.clone(), key.clone());
        Harness::server_with(move |c| {
            c.database = Some(db);
            c.tls = Some((cert, key));
            c.replica_ca = with_ca.then_some(ca);
        })
    };
    let mut a = tls_replica(true).await;
    let b = tls_replica(true).await;
    let https = |h: &Harness| format!("https://127.0.0.1:{}", h.addr.port());
    let mut cfg = a.agent_config(&unique("tls"));
    cfg.server = https(&a).parse().unwrap();
    cfg.tls_ca_bundle = Some(ca.clone());
    let node = a.add_agent_with(cfg).await;
    let w = a
        .hub
        .spawn(tether::protocol::SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "60".into()],
            node_id: Some(node.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let pem = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(pem)
        .build()
        .unwrap();
    let stat = |h: &Harness| {
        client
            .get(format!(
                "{}/api/v1/workers/{}/stat?path=/etc",
                https(h),
                w.worker_id
            ))
            .bearer_auth(&h.token)
            .send()
    };
    // Through B, which holds nothing: passed to A over TLS.
    let r = stat(&b).await.unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["exists"].as_bool(), v["is_dir"].as_bool()),
        (Some(true), Some(true)),
        "{body}"
    );
    // A replica that does not trust the holder's CA does not pass a
    // request for the node (whose holder the database names) on.
    let c = tls_replica(false).await;
    let r = client
        .get(format!("{}/api/v1/nodes/{node}", https(&c)))
        .bearer_auth(&c.token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("TLS"), "{body}");
    a.hub.remove(&w.worker_id, true).await.unwrap();
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_at_any_replica_reaches_a_node_another_holds() {
    let pg = Postgres::start();
    let db = pg.database("tether_forward");
    let previewing = |db: &str| {
        let db = db.to_string();
        Harness::server_with(move |c| {
            c.database = Some(db);
            c.preview_domain = Some("preview.test".into());
        })
    };
    // B reaches A through a proxy that counts its connections.
    let a_port = free_port();
    let to_a = common::proxy::Proxy::start(([127, 0, 0, 1], a_port).into()).await;
    let a_url = format!("http://{}", to_a.addr);
    let a_db = db.clone();
    let mut a = Harness::server_with(move |c| {
        c.database = Some(a_db);
        c.preview_domain = Some("preview.test".into());
        c.listen = ([127, 0, 0, 1], a_port).into();
        c.advertise_url = Some(a_url);
    })
    .await;
    let b = previewing(&db).await;
    let node = a.add_agent().await;
    let img = image();

    // B gathers A's part of the lists.
    let nodes = eventually(&b, &b.token, &["nodes"], &node).await;
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with(&node) && l.contains("online")),
        "{nodes}"
    );
    // A spawn at B, which holds no node, is placed on A's node.
    let w = b
        .ctl_ok(&["spawn", "--image", &img, "--", "sleep", "3600"])
        .await
        .trim()
        .to_string();
    let info: serde_json::Value = serde_json::from_str(&b.ctl_ok(&["inspect", &w]).await).unwrap();
    assert_eq!(info["node_id"], node.as_str(), "{info}");
    eventually(&b, &b.token, &["ps"], &w).await;

    // Exec through B: the WebSocket is passed to A, both ways, exit code
    // included.
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let out = b
        .ctl_stdin(&["exec", "-i", &w, "--", "sha256sum"], Some(&input))
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&sha256(&input)),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = b.ctl(&["exec", &w, "--", "sh", "-c", "exit 7"]).await;
    assert_eq!(out.status.code(), Some(7));

    // Files both ways through B, byte-exact.
    let local = b.state_path("in.bin");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    b.ctl_ok(&["cp", local.to_str().unwrap(), &format!("{w}:/tmp/in.bin")])
        .await;
    let back = b.state_path("back.bin");
    b.ctl_ok(&["cp", &format!("{w}:/tmp/in.bin"), back.to_str().unwrap()])
        .await;
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&data));

    // A port-forward through B: its tunnel is carried by A, listed and
    // closed through B.
    let echo = b
        .ctl_spawn_sh("while true; do nc -l -p 9000 -e cat; done")
        .await;
    let (_pf, addr) = port_forward(&b, &echo, ":9000").await;
    let mut conn = echo_connection(&addr).await;
    let id = format!("{echo}:9000");
    let listed = b.ctl_ok(&["tunnels"]).await;
    let row = listed
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("B lists the tunnel A carries: {listed}"));
    assert_eq!(
        row.split_whitespace().nth(3),
        Some("1"),
        "one connection: {row}"
    );
    b.ctl_ok(&["tunnels", "close", &id]).await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut rest),
    )
    .await
    .expect("the connection ends with its tunnel")
    .unwrap_or(0);
    assert_eq!(n, 0);
    let out = b.ctl(&["tunnels", "close", &id]).await;
    assert_eq!(out.status.code(), Some(125), "already closed everywhere");

    // A host-based preview whose name reaches B is served by A.
    let web = b
        .ctl_spawn_sh("mkdir -p /www && echo served-by-a > /www/i && httpd -f -p 8080 -h /www")
        .await;
    let host = format!("8080-{web}.preview.test");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = tether::http_client()
            .get(format!("{}/i", b.url))
            .header("host", &host)
            .bearer_auth(&b.token)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        if status.is_success() {
            assert_eq!(text, "served-by-a\n");
            break;
        }
        // Only while httpd starts: the worker is found, its port not yet.
        assert!(
            Instant::now() < deadline && !text.contains("not_found"),
            "{status}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A deployment made, listed, shown, followed into and taken down
    // through B.
    let name = unique("fwd");
    let compose = b.state_path("app.yaml");
    std::fs::write(
        &compose,
        format!("services:\n  web:\n    image: {img}\n    command: [\"sleep\", \"3600\"]\n"),
    )
    .unwrap();
    let up: serde_json::Value = serde_json::from_str(
        &b.ctl_ok(&[
            "deploy",
            "up",
            "-f",
            compose.to_str().unwrap(),
            "--name",
            &name,
            "--json",
        ])
        .await,
    )
    .unwrap();
    assert_eq!(up["node_id"], node.as_str(), "{up}");
    let listed = b.ctl_ok(&["deploy", "ls"]).await;
    assert!(listed.contains(&name), "{listed}");
    let shown = b.ctl_ok(&["deploy", "inspect", &name]).await;
    assert!(shown.contains("\"web\""), "{shown}");
    let out = b
        .ctl(&["exec", &format!("{name}/web"), "--", "echo", "through-b"])
        .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through-b\n");
    b.ctl_ok(&["deploy", "down", &name]).await;
    assert_eq!(
        docker(&[
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=tether.deployment={name}")
        ]),
        ""
    );

    // A path-based preview through B reaches the worker's port at A.
    let web = b
        .ctl_spawn_sh("mkdir -p /w && echo served-at-a > /w/i.txt && exec httpd -f -p 8080 -h /w")
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = reqwest::Client::new()
            .get(format!("{}/api/v1/workers/{web}/ports/8080/i.txt", b.url))
            .bearer_auth(&b.token)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            assert_eq!(r.text().await.unwrap(), "served-at-a\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "preview through B: HTTP {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Without a credential that could open it, B refuses a preview of a
    // worker it does not hold at once: A is not asked where it is (no
    // fan-out to every peer, no timing that tells where a worker runs).
    to_a.cut();
    let asked_before = to_a.accepted();
    let anonymous = [
        reqwest::Client::new().get(format!("{}/api/v1/workers/{web}/ports/8080/i.txt", b.url)),
        reqwest::Client::new()
            .get(format!("{}/api/v1/workers/{web}/ports/8080/i.txt", b.url))
            .header("cookie", format!("tether_preview=forged.{}.00", u32::MAX)),
        reqwest::Client::new()
            .get(format!("{}/i.txt?tether_preview=x.1.00", b.url))
            .header("host", format!("8080-{web}.preview.test")),
        reqwest::Client::new()
            .get(format!("{}/api/v1/workers/{web}/ports/8080/i.txt", b.url))
            .bearer_auth("tok_not-a-token"),
    ];
    for r in anonymous {
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{}", r.text().await.unwrap());
    }
    assert_eq!(
        to_a.accepted(),
        asked_before,
        "B asked A about an anonymous preview"
    );
    b.ctl_ok(&["rm", "-f", &web]).await;

    // Node routes through B too.
    let detail: serde_json::Value =
        serde_json::from_str(&b.ctl_ok(&["node", "inspect", &node]).await).unwrap();
    assert_eq!(detail["status"], "online", "{detail}");

    // An organization's token is judged at the holder: another
    // organization's worker stays absent through the forward.
    b.ctl_ok(&["org", "create", "other"]).await;
    let t = b
        .ctl_ok(&["token", "create", "--org", "other"])
        .await
        .trim()
        .to_string();
    let out = b.ctl_as(&t, &["inspect", &w], None).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("no such worker: {w}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ps = String::from_utf8_lossy(&b.ctl_as(&t, &["ps"], None).await.stdout).to_string();
    assert!(!ps.contains(&w), "{ps}");

    // Removed through B: gone from the engine.
    b.ctl_ok(&["rm", "-f", &w]).await;
    assert_eq!(
        docker(&["ps", "-a", "-q", "--filter", &format!("name=tether-{w}")]),
        ""
    );

    // MCP through B, which holds no node: a new session begins at A, which
    // holds the allow-listed node, and its tools reach that node.
    b.ctl_ok(&["mcp", "allow", &node]).await;
    let args = serde_json::json!({"task_id": "via-b", "image": img, "cmd": ["sleep", "60"]});
    let made = mcp_call(&b.url, &b.token, "sandbox.create", args)
        .await
        .unwrap();
    let sw = made["worker_id"].as_str().unwrap().to_string();
    let args = serde_json::json!({"task_id": "via-b", "worker_id": sw, "argv": ["echo", "via-b"]});
    let ran = mcp_call(&b.url, &b.token, "sandbox.exec", args)
        .await
        .unwrap();
    assert_eq!(
        (ran["exit_code"].as_i64(), ran["stdout"].as_str()),
        (Some(0), Some("via-b\n")),
        "{ran}"
    );
    let args = serde_json::json!({"task_id": "via-b", "worker_id": sw});
    mcp_call(&b.url, &b.token, "sandbox.destroy", args)
        .await
        .unwrap();

    // An MCP session begun at A goes on through B (no balancer stickiness
    // needed); a session nobody serves is still unknown.
    let mcp = |h: &Harness, session: Option<(&str, &str)>, body: serde_json::Value| {
        let mut r = tether::http_client()
            .post(format!("{}/mcp", h.url))
            .bearer_auth(&h.token)
            .header("accept", "application/json, text/event-stream")
            .json(&body);
        if let Some((id, version)) = session {
            r = r
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", version);
        }
        r.send()
    };
    let init = mcp(
        &a,
        None,
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "replica-test", "version": "1"}}}),
    )
    .await
    .unwrap();
    assert!(init.status().is_success(), "{}", init.status());
    let sid = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    // The answer as JSON, or as one server-sent event.
    let text = init.text().await.unwrap();
    let json = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .find(|d| !d.trim().is_empty())
        .unwrap_or(&text);
    let v: serde_json::Value =
        serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    let version = v["result"]["protocolVersion"].as_str().unwrap().to_string();
    let session = Some((sid.as_str(), version.as_str()));
    let note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let r = mcp(&b, session, note).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let list = serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let r = mcp(&b, session, list.clone()).await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(
        status.is_success() && text.contains("sandbox.create"),
        "{status}: {text}"
    );
    let r = mcp(&b, Some(("no-such-session", &version)), list)
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A holds the node but does not answer B: the admin's request, passed
    // on, fails as `unavailable`. Another organization's token is answered
    // `not_found` before that, as for a node that does not exist.
    to_a.refuse(true);
    let admin = b.ctl_as(&b.token, &["node", "inspect", &node], None).await;
    let admin = String::from_utf8_lossy(&admin.stderr).to_string();
    assert!(admin.contains("did not answer"), "{admin}");
    let out = b.ctl_as(&t, &["node", "inspect", &node], None).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("no such node: {node}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    to_a.refuse(false);
    a.stop().await;
    b.stop().await;
}

/// One MCP session reaches the nodes every replica holds: a session at B
/// lists A's node, places a sandbox there when it is the least loaded, and
/// each tool acts on that sandbox at A, judged there for the same caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_at_one_replica_uses_the_nodes_every_replica_holds() {
    let pg = Postgres::start();
    let db = pg.database("tether_mcp_spread");
    let mut a = replica(&db).await;
    let mut b = replica(&db).await;
    let na = a.add_agent().await;
    let nb = b.add_agent().await;
    a.ctl_ok(&["mcp", "allow", &na]).await;
    b.ctl_ok(&["mcp", "allow", &nb]).await;
    let call = |tool: &'static str, args: serde_json::Value| {
        let (url, token) = (b.url.clone(), b.token.clone());
        async move { mcp_call(&url, &token, tool, args).await }
    };

    // Both nodes, each as its holder sees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = call("node.list", serde_json::json!({})).await.unwrap();
        let online = |n: &str| {
            list["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["node_id"] == n && e["status"] == "online")
        };
        if online(&na) && online(&nb) {
            break;
        }
        assert!(Instant::now() < deadline, "B's node.list: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // B's node is busier: a sandbox without a node goes to A's.
    let mut at_b = Vec::new();
    for _ in 0..2 {
        let args = serde_json::json!({"task_id": "spread", "image": image(), "node": nb, "cmd": ["sleep", "600"]});
        let made = call("sandbox.create", args).await.unwrap();
        assert_eq!(made["node_id"], nb.as_str(), "{made}");
        at_b.push(made["worker_id"].as_str().unwrap().to_string());
    }
    let args = serde_json::json!({"task_id": "spread", "job_id": "j1", "image": image(),
        "cmd": ["sh", "-c", "echo hello-from-a; exec sleep 600"]});
    let made = call("sandbox.create", args).await.unwrap();
    assert_eq!(
        made["node_id"],
        na.as_str(),
        "the least-loaded node: {made}"
    );
    let w = made["worker_id"].as_str().unwrap().to_string();

    // Exec with input, by worker and by job.
    let input = "input through B to A\n".repeat(1000);
    let args = serde_json::json!({"task_id": "spread", "worker_id": w, "argv": ["sha256sum"], "stdin": input});
    let ran = call("sandbox.exec", args).await.unwrap();
    assert_eq!(ran["exit_code"], 0, "{ran}");
    assert!(
        ran["stdout"]
            .as_str()
            .unwrap()
            .starts_with(&sha256(input.as_bytes())),
        "{ran}"
    );
    let args = serde_json::json!({"task_id": "spread", "job_id": "j1", "command": "exit 3"});
    let ran = call("sandbox.exec", args).await.unwrap();
    assert_eq!(ran["exit_code"], 3, "{ran}");
    // A job with a sandbox at each replica names neither.
    let args = serde_json::json!({"task_id": "spread", "job_id": "j1", "image": image(), "node": nb, "cmd": ["sleep", "600"]});
    let twin = call("sandbox.create", args).await.unwrap();
    let args = serde_json::json!({"task_id": "spread", "job_id": "j1", "command": "true"});
    let e = call("sandbox.exec", args).await.unwrap_err();
    assert!(e.contains("several replicas"), "{e}");
    let args = serde_json::json!({"task_id": "spread", "worker_id": twin["worker_id"]});
    call("sandbox.destroy", args).await.unwrap();

    // Output as it comes, when the client asks for progress: made at A,
    // heard by the client of B's session.
    let mut m = common::mcp::Mcp::connect(&b.url, &b.token).await;
    let (notes, r) = m
        .exec_with_progress(serde_json::json!({"task_id": "spread", "worker_id": w,
            "command": "echo first; sleep 1; echo second >&2"}))
        .await;
    assert_eq!(r["stdout"], "first\n", "{r}");
    assert_eq!(notes, vec!["stdout: first\n", "stderr: second\n"]);
    drop(m);

    // A file in and out, byte-exact.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 256) as u8).collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    let args = serde_json::json!({"task_id": "spread", "worker_id": w, "path": "/tmp/f.bin", "content_base64": b64});
    call("sandbox.put_file", args).await.unwrap();
    let args = serde_json::json!({"task_id": "spread", "worker_id": w, "path": "/tmp/f.bin"});
    let got = call("sandbox.get_file", args).await.unwrap();
    let back = base64::engine::general_purpose::STANDARD
        .decode(got["content_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(sha256(&back), sha256(&data));

    // The main process's output.
    let args = serde_json::json!({"task_id": "spread", "worker_id": w, "follow_s": 2});
    let logs = call("sandbox.stream_logs", args).await.unwrap();
    assert!(
        logs["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["line"] == "hello-from-a"),
        "{logs}"
    );

    // A command that outlives its call is followed at A, from another
    // session at B.
    let args = serde_json::json!({"task_id": "spread", "worker_id": w,
        "command": "echo start; sleep 2; echo done; exit 4", "wait_s": 0});
    let r = call("sandbox.exec", args).await.unwrap();
    assert_eq!(r["running"], true, "{r}");
    let id = r["exec_id"].as_str().unwrap().to_string();
    let mut out = r["stdout"].as_str().unwrap().to_string();
    let end = loop {
        let args = serde_json::json!({"task_id": "spread", "exec_id": id, "wait_s": 10});
        let f = call("sandbox.exec_follow", args).await.unwrap();
        out.push_str(f["stdout"].as_str().unwrap());
        if f["running"] == false {
            break f;
        }
    };
    assert_eq!(
        (end["exit_code"].as_i64(), out.as_str()),
        (Some(4), "start\ndone\n")
    );

    // Judged at A for the same caller: another task may not use it.
    let args = serde_json::json!({"task_id": "other", "worker_id": w, "argv": ["true"]});
    let e = call("sandbox.exec", args).await.unwrap_err();
    assert!(e.contains("belongs to another task"), "{e}");

    // Only a replica may pass a call on.
    let r = tether::http_client()
        .post(format!("{}/internal/v1/mcp/call", a.url))
        .bearer_auth(&a.token)
        .header("x-tether-caller", format!("Bearer {}", a.token))
        .json(&serde_json::json!({"tool": "node.list", "arguments": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Destroyed through B: gone from the engine.
    let args = serde_json::json!({"task_id": "spread", "worker_id": w});
    let gone = call("sandbox.destroy", args).await.unwrap();
    assert_eq!(gone["node_id"], na.as_str(), "{gone}");
    assert_eq!(
        docker(&["ps", "-a", "-q", "--filter", &format!("name=tether-{w}")]),
        ""
    );
    for w in at_b {
        let args = serde_json::json!({"task_id": "spread", "worker_id": w});
        call("sandbox.destroy", args).await.unwrap();
    }
    a.stop().await;
    b.stop().await;
}

/// What came of a `ctl exec` whose output was read while `victim` (a
/// replica) was killed with -9 a quarter of the way.
struct AcrossAKill {
    exit: Option<i32>,
    total: u64,
    sha256: String,
    killed_at: Instant,
}

/// Runs `ctl exec WORKER -- sh -c CMD` against `url`, reads its `size`
/// bytes of output, and kills `victim` once a quarter has arrived.
async fn exec_across_a_kill(
    url: &str,
    token: &str,
    worker: &str,
    cmd: &str,
    size: u64,
    victim: &mut tokio::process::Child,
) -> AcrossAKill {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let mut client = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["ctl", "exec", worker, "--", "sh", "-c", cmd])
        .env("TETHER_SERVER", url)
        .env("TETHER_TOKEN", token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = client.stdout.take().unwrap();
    let mut hasher = sha2::Sha256::new();
    let (mut total, mut killed_at) = (0u64, None);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(90), stdout.read(&mut buf))
            .await
            .expect("output resumes after the kill")
            .unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        if total >= size / 4 && killed_at.is_none() {
            victim.start_kill().unwrap();
            victim.wait().await.unwrap();
            killed_at = Some(Instant::now());
        }
    }
    AcrossAKill {
        exit: client.wait().await.unwrap().code(),
        total,
        sha256: hex::encode(hasher.finalize()),
        killed_at: killed_at.expect("the replica was killed"),
    }
}

/// A load balancer as plain as they come: each connection goes to the first
/// of `upstreams` that accepts it.
async fn balancer(upstreams: Vec<std::net::SocketAddr>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let ups = upstreams.clone();
            tokio::spawn(async move {
                for u in ups {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(u).await {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn replica_process(port: u16, state: &std::path::Path, db: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["server", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--heartbeat-interval", "2", "--heartbeat-timeout", "6"])
        .arg("--state-dir")
        .arg(state)
        .args(["--database", db])
        .env("TETHER_PSK", PSK)
        .env("TETHER_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_replica_dies_its_agents_and_execs_carry_on_at_another_byte_exact() {
    ensure_image();
    tether::init_crypto();
    let pg = Postgres::start();
    let db = pg.database("tether_failover");
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let mut a = replica_process(pa, &dir.path().join("a"), &db);
    let _b = replica_process(pb, &dir.path().join("b"), &db);
    let lb = balancer(vec![
        format!("127.0.0.1:{pa}").parse().unwrap(),
        format!("127.0.0.1:{pb}").parse().unwrap(),
    ])
    .await;
    let url = format!("http://{lb}");
    let token_file = dir.path().join("b/admin.token");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !token_file.exists() || !dir.path().join("a/admin.token").exists() {
        assert!(Instant::now() < deadline, "replicas did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("ctl")
            .args(args)
            .env("TETHER_SERVER", &url)
            .env("TETHER_TOKEN", &token)
            .output()
            .unwrap()
    };
    let node = unique("test");
    let _cleanup = NodeGuard(node.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let mut cfg = tether::agent::AgentConfig::new(
        url.parse().unwrap(),
        PSK.into(),
        node.clone(),
        dir.path().join("agent"),
    );
    cfg.heartbeat_timeout = Duration::from_secs(6);
    tokio::spawn(tether::agent::run(cfg, stop.clone()));
    let online = |out: std::process::Output| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&node) && l.contains("online"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !online(ctl(&["nodes"])) {
        assert!(Instant::now() < deadline, "agent never online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let img = image();
    let out = ctl(&["spawn", "--image", &img, "--", "sleep", "3600"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // 20 MB through ctl exec, and replica A, which holds the agent and the
    // exec, is killed a quarter of the way.
    const SIZE: u64 = 20_000_000;
    let cmd = format!(
        "head -c {SIZE} /dev/urandom > /tmp/s.bin && sha256sum /tmp/s.bin > /tmp/s.sha && cat /tmp/s.bin"
    );
    let r = exec_across_a_kill(&url, &token, &w, &cmd, SIZE, &mut a).await;
    assert_eq!(r.exit, Some(0));
    assert_eq!(r.total, SIZE, "bytes lost or duplicated");
    let out = ctl(&["exec", &w, "--", "cat", "/tmp/s.sha"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(r.sha256.as_str())
    );
    // The node is back online at B.
    assert!(online(ctl(&["nodes"])));
    let back = r.killed_at.elapsed();
    eprintln!(
        "replica killed mid-exec: 20 MB byte-exact through the other; all done {back:?} after the kill"
    );
    let _ = ctl(&["rm", "-f", &w]);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_carries_on_when_the_database_comes_back() {
    let mut pg = Postgres::start();
    let db = pg.database("tether_restart");
    let h = replica(&db).await;
    h.ctl_ok(&["org", "create", "before"]).await;
    // Down for two seconds: a write then fails fast and says why, reads
    // serve the last copy, and after it writes work again.
    let (tx, rx) = std::sync::mpsc::channel();
    let restarter = std::thread::spawn(move || {
        pg.restart(Duration::from_secs(2));
        tx.send(()).unwrap();
        pg
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let out = h.ctl(&["org", "create", "during"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unavailable") && err.contains("database"),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a write without the database hung"
    );
    assert!(h.ctl_ok(&["org", "ls"]).await.contains("before"));
    while rx.try_recv().is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pg = restarter.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = h.ctl(&["org", "create", "after"]).await;
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes never came back: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = h.ctl_ok(&["org", "ls"]).await;
    assert!(
        listed.contains("before") && listed.contains("after"),
        "{listed}"
    );
    assert_eq!(pg.query("tether_restart", "SELECT count(*) FROM orgs"), "2");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_given_several_replicas_moves_to_the_next_when_one_stops() {
    let pg = Postgres::start();
    let db = pg.database("tether_list");
    let a = replica(&db).await;
    let b = replica(&db).await;
    let node = unique("test");
    let _cleanup = NodeGuard(node.clone());
    let mut cfg = a.agent_config(&node);
    // A dead address first: the agent goes on to the next.
    cfg.server = format!("http://127.0.0.1:{}", free_port()).parse().unwrap();
    cfg.other_servers = vec![a.url.parse().unwrap(), b.url.parse().unwrap()];
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(tether::agent::run(cfg, stop.clone()));
    a.wait_status(&node, "online").await;
    let t0 = Instant::now();
    a.stop().await;
    b.wait_status(&node, "online").await;
    eprintln!(
        "online at the next replica {:?} after the first stopped",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(20));
    let img = image();
    let w = b
        .ctl_ok(&["spawn", "--image", &img, "--", "sleep", "60"])
        .await
        .trim()
        .to_string();
    b.ctl_ok(&["rm", "-f", &w]).await;
    stop.cancel();
    b.stop().await;
}

/// HAProxy in front of `replicas` on a free port: its address. None (and
/// the test skipped) without haproxy, except under CI, where it must be.
fn haproxy(dir: &std::path::Path, replicas: &[u16]) -> Option<(tokio::process::Child, u16)> {
    let bin = ["/usr/sbin/haproxy", "haproxy"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(bin) = bin else {
        assert!(
            std::env::var("CI").is_err(),
            "haproxy is missing (scripts/install-haproxy.sh installs it)"
        );
        eprintln!("skipped: no haproxy (scripts/install-haproxy.sh installs it)");
        return None;
    };
    let port = free_port();
    let servers: String = replicas
        .iter()
        .enumerate()
        .map(|(i, p)| format!("    server r{i} 127.0.0.1:{p} check inter 300ms fall 1 rise 1\n"))
        .collect();
    // As docs/operations.md says, with quick checks for the test.
    let cfg = format!(
        "global\n    maxconn 4096\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 1h\n    timeout server 1h\n    timeout tunnel 1h\n    retries 3\n    option redispatch\n\
         frontend tether\n    bind 127.0.0.1:{port}\n    default_backend replicas\n\
         backend replicas\n    balance roundrobin\n    option httpchk GET /healthz\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = tokio::process::Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Some((child, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_behind_haproxy_serve_twenty_agents_and_survive_a_kill() {
    ensure_image();
    tether::init_crypto();
    let pg = Postgres::start();
    let db = pg.database("tether_haproxy");
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut procs: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| replica_process(*p, &dir.path().join(format!("r{i}")), &db))
        .collect();
    let Some((_lb, lb_port)) = haproxy(dir.path(), &ports) else {
        return;
    };
    let lb = format!("http://127.0.0.1:{lb_port}");
    let direct = |i: usize| format!("http://127.0.0.1:{}", ports[i]);
    let token_file = dir.path().join("r0/admin.token");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(0..3).all(|i| dir.path().join(format!("r{i}/admin.token")).exists()) {
        assert!(Instant::now() < deadline, "replicas did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let ctl = |url: &str, token: &str, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("ctl")
            .args(args)
            .env("TETHER_SERVER", url)
            .env("TETHER_TOKEN", token)
            .output()
            .unwrap()
    };

    // Twenty agents through the balancer.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut guards = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..20 {
        let node = unique("test");
        guards.push(NodeGuard(node.clone()));
        let mut cfg = tether::agent::AgentConfig::new(
            lb.parse().unwrap(),
            PSK.into(),
            node.clone(),
            dir.path().join(&node),
        );
        cfg.heartbeat_timeout = Duration::from_secs(6);
        tokio::spawn(tether::agent::run(cfg, stop.clone()));
        nodes.push(node);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = String::from_utf8_lossy(&ctl(&lb, &token, &["nodes"]).stdout).to_string();
        let online = out.lines().filter(|l| l.contains("online")).count();
        if online == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{online} of 20 agents online:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A node replica 3 holds (the balancer spread the agents).
    let held_by_3 = |pg: &Postgres| {
        pg.query(
            "tether_haproxy",
            &format!(
                "SELECT h.node_id FROM node_holders h JOIN replicas r ON r.id = h.replica_id \
                 WHERE r.url = '{}' AND h.held_until > now() ORDER BY 1 LIMIT 1",
                direct(2)
            ),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let node = loop {
        let n = held_by_3(&pg);
        if !n.is_empty() {
            break n;
        }
        assert!(Instant::now() < deadline, "replica 3 holds no agent");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(nodes.contains(&node));

    // Through replica 1 to that node: spawn, exec with 1 MB in, hashed.
    let img = image();
    let out = ctl(
        &direct(0),
        &token,
        &[
            "spawn", "--node", &node, "--image", &img, "--", "sleep", "3600",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let input: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["ctl", "exec", "-i", &w, "--", "sha256sum"])
        .env("TETHER_SERVER", direct(0))
        .env("TETHER_TOKEN", &token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut si = child.stdin.take().unwrap();
        si.write_all(&input).await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256(&input)));

    // Replica 3 killed with -9 while 10 MB come through replica 1: the
    // agent moves through the balancer, the exec re-attaches, every byte
    // arrives once and the exit code is kept.
    const SIZE: u64 = 10_000_000;
    let cmd = format!(
        "head -c {SIZE} /dev/urandom > /tmp/s.bin && sha256sum /tmp/s.bin > /tmp/s.sha && cat /tmp/s.bin; exit 3"
    );
    let r = exec_across_a_kill(&direct(0), &token, &w, &cmd, SIZE, &mut procs[2]).await;
    assert_eq!(r.exit, Some(3));
    assert_eq!(r.total, SIZE, "bytes lost or duplicated");
    let out = ctl(&lb, &token, &["exec", &w, "--", "cat", "/tmp/s.sha"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(r.sha256.as_str())
    );
    // Every agent is back, through the two replicas left.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = String::from_utf8_lossy(&ctl(&lb, &token, &["nodes"]).stdout).to_string();
        if out.lines().filter(|l| l.contains("online")).count() == 20 {
            break;
        }
        assert!(Instant::now() < deadline, "agents not all back:\n{out}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A token revoked at one replica is refused at every other.
    let t = {
        let _ = ctl(&direct(0), &token, &["org", "create", "acme"]);
        let out = ctl(&direct(0), &token, &["token", "create", "--org", "acme"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let id = String::from_utf8_lossy(&ctl(&direct(1), &token, &["token", "ls"]).stdout)
        .split('\t')
        .next()
        .unwrap()
        .to_string();
    assert!(ctl(&direct(1), &t, &["ps"]).status.success());
    assert!(
        ctl(&direct(1), &token, &["token", "revoke", &id])
            .status
            .success()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in [0, 1] {
        let out = ctl(&direct(i), &t, &["ps"]);
        assert!(
            !out.status.success(),
            "replica {i} still takes a revoked token"
        );
    }
    let _ = ctl(&lb, &token, &["rm", "-f", &w]);
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
}
