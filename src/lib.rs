//! tether: run sandboxed workloads on compute you own, steered from a central
//! orchestrator over an outbound, authenticated WebSocket.
//!
//! - [`agent`]: the node side (dials out, drives Docker).
//! - [`server`]: the reference control plane and the embeddable [`server::Hub`].
//! - [`ctl`]: the operator CLI's client.
//! - [`protocol`]: the wire protocol of `docs/protocol.md`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod channel;
pub mod cli;
pub mod config;
pub mod conn;
pub mod ctl;
pub mod dev;
pub mod docker;
pub mod egress_proxy;
pub mod inference;
pub mod private_file;
pub mod protocol;
pub mod server;

/// Installs rustls' process-wide crypto provider (ring). Idempotent.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Client TLS settings: Mozilla's roots from webpki-roots, so a `FROM
/// scratch` image with no system trust store still verifies servers.
pub fn tls_client_config() -> rustls::ClientConfig {
    tls_client_config_with(None, None).expect("the default TLS configuration builds")
}

/// Client TLS settings with an optional private CA bundle (PEM, trusted
/// besides the webpki roots) and an optional pin: the hex SHA-256 of the
/// server's certificate (DER). With a pin, only that certificate is
/// accepted, whoever signed it.
pub fn tls_client_config_with(
    ca_bundle: Option<&std::path::Path>,
    pin: Option<&str>,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    init_crypto();
    if let Some(pin) = pin {
        let pin = hex::decode(pin.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| "the certificate pin must be 64 hex digits (SHA-256)".to_string())?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        return Ok(rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(tls::PinVerifier {
                pin,
                provider,
            }))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_bundle {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("CA bundle {} holds no certificate", path.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

pub mod tls;

/// The HTTP client used by the agent and `tether ctl`.
pub fn http_client() -> reqwest::Client {
    http_client_with(tls_client_config())
}

/// An HTTP client with these TLS settings.
pub fn http_client_with(tls: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .use_preconfigured_tls(tls)
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
