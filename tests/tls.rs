//! TLS: the server serves HTTPS from a cert/key pair; the agent trusts a
//! private CA bundle, or pins the server's certificate and refuses anything
//! else. Certificates are made in the test.

mod common;
use common::*;
use sha2::Digest;

struct Pki {
    ca_pem: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    leaf_sha256: String,
}

fn make_pki(dir: &std::path::Path) -> Pki {
    let t = test_pki("localhost");
    let p = Pki {
        ca_pem: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        leaf_sha256: hex::encode(sha2::Sha256::digest(&t.cert_der)),
    };
    std::fs::write(&p.ca_pem, t.ca_pem).unwrap();
    std::fs::write(&p.cert, t.cert_pem).unwrap();
    std::fs::write(&p.key, t.key_pem).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_over_tls_with_a_private_ca_or_a_pin() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let (cert, key) = (pki.cert.clone(), pki.key.clone());
    let mut h = Harness::server_with(move |c| c.tls = Some((cert, key))).await;
    let https: url::Url = format!("https://localhost:{}", h.addr.port())
        .parse()
        .unwrap();

    // Plain webpki roots do not know the private CA: refused, saying why.
    let mut cfg = h.agent_config(&unique("test"));
    cfg.server = https.clone();
    let e = tether::agent::register(&cfg, &tether::agent::identity::NodeKey::generate())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );

    // With the CA bundle: online over wss, and work flows.
    let mut cfg = h.agent_config(&unique("test"));
    cfg.server = https.clone();
    cfg.tls_ca_bundle = Some(pki.ca_pem.clone());
    let node = h.add_agent_with(cfg).await;
    let w = h
        .hub
        .spawn(tether::protocol::SpawnRequest {
            image: image(),
            cmd: vec!["sleep".into(), "60".into()],
            node_id: Some(node),
            ..Default::default()
        })
        .await
        .unwrap();
    let (code, out, _) = h
        .hub
        .exec_collect(&w.worker_id, &["echo", "over-tls"])
        .await
        .unwrap();
    assert_eq!((code, out), (0, b"over-tls\n".to_vec()));

    // Pinned to the server's certificate: online, without any CA.
    let mut cfg = h.agent_config(&unique("test"));
    cfg.server = https.clone();
    cfg.tls_pin = Some(pki.leaf_sha256.clone());
    h.add_agent_with(cfg).await;

    // Pinned to another certificate: refused with an error that says so.
    let mut cfg = h.agent_config(&unique("test"));
    cfg.server = https;
    cfg.tls_pin = Some("ab".repeat(32));
    let e = tether::agent::register(&cfg, &tether::agent::identity::NodeKey::generate())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pin mismatch") && e.contains(&pki.leaf_sha256),
        "{e}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_material_fails_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
    let mut cfg = tether::server::ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        PSK.into(),
        dir.path().join("state"),
    );
    cfg.tls = Some((dir.path().join("junk.pem"), dir.path().join("missing.key")));
    let e = tether::server::Server::bind(cfg)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("TLS") && e.contains("junk.pem"), "{e}");
    let mut a = tether::agent::AgentConfig::new(
        "https://localhost:1".parse().unwrap(),
        PSK.into(),
        "n".into(),
        dir.path().join("agent"),
    );
    a.tls_pin = Some("zz".into());
    let e = tether::agent::run(a, Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("pin"), "{e}");
}
