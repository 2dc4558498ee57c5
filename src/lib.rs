//! tether: run sandboxed workloads on compute you own, steered from a central
//! orchestrator over an outbound, authenticated WebSocket.
//!
//! - [`agent`]: the node side (dials out, drives Docker).
//! - [`server`]: the reference control plane and the embeddable [`server::Hub`].
//! - [`ctl`]: the operator CLI's client.
//! - [`protocol`]: the wire protocol of `docs/protocol.md`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod ctl;
pub mod dev;
pub mod docker;
pub mod mux;
pub mod protocol;
pub mod server;

/// Installs rustls' process-wide crypto provider (ring). Idempotent.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Client TLS settings: Mozilla's roots from webpki-roots, so a `FROM
/// scratch` image with no system trust store still verifies servers.
pub fn tls_client_config() -> rustls::ClientConfig {
    init_crypto();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The HTTP client used by the agent and `tether ctl`.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .use_preconfigured_tls(tls_client_config())
        .build()
        .expect("a client with a preconfigured TLS config always builds")
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
