//! Preview URLs: signed, expiring, revocable grants to reach one port of
//! one worker over HTTP without the operator token.
//!
//! A grant's token is `{id}.{expires}.{mac}`: the MAC (HMAC-SHA256 under a
//! key only the server holds) covers the id, the worker, its container, the
//! port and the expiry, so a token works for its own worker and port only
//! and cannot be stretched. The container makes it one worker's, not its
//! name's: a deployment's service is named `NAME_SERVICE`, and a later
//! deployment of that name (perhaps another organization's) gets a new
//! container that no earlier grant opens. The grant is also kept in the store: deleting it revokes the
//! token before it expires.

use crate::protocol::{ErrorBody, ErrorCode};
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The query parameter a preview URL carries; the cookie it becomes.
pub const PREVIEW_PARAM: &str = "tether_preview";

/// Longest lifetime of a grant.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// One issued grant, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewGrant {
    pub id: String,
    pub worker_id: String,
    pub port: u16,
    /// Unix seconds.
    pub expires: u64,
    /// The worker's container when the grant was issued.
    #[serde(default)]
    pub container_id: String,
    /// The organization of the worker's node when the grant was issued:
    /// who may list and revoke it, also once the worker is gone.
    #[serde(default)]
    pub org: Option<String>,
}

/// What a grant opens: one port of one worker's container.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub worker_id: &'a str,
    pub container_id: &'a str,
    pub port: u16,
}

/// Unix seconds now.
pub(crate) fn now_secs() -> u64 {
    crate::protocol::now_millis() / 1000
}

/// Signs and checks grant tokens.
pub struct PreviewKey(hmac::Key);

impl PreviewKey {
    pub fn new(secret: &[u8]) -> Self {
        PreviewKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// Ids, container ids, ports and numbers hold no newline: the fields
    /// cannot be shifted into one another.
    fn message(id: &str, t: Target, expires: u64) -> String {
        format!(
            "tether-preview-v2\n{id}\n{}\n{}\n{}\n{expires}",
            t.worker_id, t.container_id, t.port
        )
    }

    /// A new grant to `target` for `ttl` from now, and its token.
    pub fn grant(
        &self,
        target: Target,
        org: Option<String>,
        ttl: Duration,
    ) -> (PreviewGrant, String) {
        let g = PreviewGrant {
            id: ulid::Ulid::new().to_string().to_ascii_lowercase(),
            worker_id: target.worker_id.to_string(),
            port: target.port,
            expires: now_secs() + ttl.as_secs().max(1),
            container_id: target.container_id.to_string(),
            org,
        };
        let token = self.token(&g);
        (g, token)
    }

    pub fn token(&self, g: &PreviewGrant) -> String {
        let t = Target {
            worker_id: &g.worker_id,
            container_id: &g.container_id,
            port: g.port,
        };
        let tag = hmac::sign(&self.0, Self::message(&g.id, t, g.expires).as_bytes());
        format!("{}.{}.{}", g.id, g.expires, hex::encode(tag.as_ref()))
    }

    /// Checks `token` for `target`: the grant id it names when the
    /// signature holds and it has not expired. Whether the grant is still
    /// in the store (not revoked) is the caller's check.
    pub fn verify(&self, token: &str, target: Target) -> Result<String, ErrorBody> {
        let refused = |why: &str| ErrorBody::new(ErrorCode::Unauthorized, why.to_string());
        let mut parts = token.split('.');
        let (Some(id), Some(expires), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refused("malformed preview token"));
        };
        let expires: u64 = expires
            .parse()
            .map_err(|_| refused("malformed preview token"))?;
        let mac = hex::decode(mac).map_err(|_| refused("malformed preview token"))?;
        hmac::verify(&self.0, Self::message(id, target, expires).as_bytes(), &mac)
            .map_err(|_| refused("the preview token is not valid for this worker and port"))?;
        if expires <= now_secs() {
            return Err(refused("the preview token has expired"));
        }
        Ok(id.to_string())
    }
}

/// Seconds until `expires` (at least 1), for a cookie's `Max-Age`.
pub fn remaining(expires: u64) -> u64 {
    expires.saturating_sub(now_secs()).max(1)
}

/// The worker and port a host-based preview name addresses:
/// `{port}-{worker}.{domain}`, with or without `:port` after it, in any case.
/// A deployment's service (worker `NAME_SERVICE`; `_` is no host name
/// character) is spelled `{port}-{NAME}--{SERVICE}`.
pub fn parse_host(host: &str, domain: &str) -> Option<(String, u16)> {
    let host = host.to_ascii_lowercase();
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
        _ => host,
    };
    let domain = domain_name(domain).to_ascii_lowercase();
    let label = host.strip_suffix(&domain)?.strip_suffix('.')?;
    let (port, worker) = label.split_once('-')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    if worker.is_empty()
        || !worker
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    Some((worker.replace("--", "_"), port))
}

/// How a worker id is spelled in a host-based preview name.
pub fn host_label(worker_id: &str) -> String {
    worker_id.replace('_', "--")
}

/// The preview domain without the port it may carry for printed URLs.
pub fn domain_name(domain: &str) -> &str {
    match domain.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => domain,
    }
}

/// The values of every cookie named `name` in a request's `Cookie` headers.
pub fn cookies<'a>(
    headers: impl Iterator<Item = &'a str> + 'a,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers.flat_map(|h| h.split(';')).filter_map(move |c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A `Cookie` header without the cookies named `name` (None when nothing
/// is left): the preview token is the server's, never the worker's.
pub fn without_cookie(header: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = header
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split_once('=').map(|(k, _)| k) != Some(name))
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// A query string without the preview parameter (None when nothing is left).
pub fn without_param(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(PREVIEW_PARAM))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// The preview parameter's value in a query string.
pub fn param(query: &str) -> Option<&str> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == PREVIEW_PARAM).then_some(v)
    })
}

/// A worker's `Set-Cookie` as the browser gets it through a preview: no
/// `Domain` (the cookie stays on the preview's own host, never on a parent
/// domain every other preview, or another site, shares), and under a
/// path-based preview's `prefix` its `Path` is taken to be below the prefix
/// (an app that sets `Path=/` means its own root, not the API's origin).
pub fn contained_set_cookie(value: &str, prefix: Option<&str>) -> String {
    let mut parts = value.split(';');
    let mut out = parts.next().unwrap_or("").trim().to_string();
    for attr in parts.map(str::trim).filter(|a| !a.is_empty()) {
        let (name, v) = attr.split_once('=').unwrap_or((attr, ""));
        let name = name.trim();
        if name.eq_ignore_ascii_case("domain") {
            continue;
        }
        out.push_str("; ");
        match prefix {
            Some(p) if name.eq_ignore_ascii_case("path") => {
                let v = v.trim();
                let below = if v.starts_with('/') { v } else { "/" };
                out.push_str(&format!("Path={p}{below}"));
            }
            _ => out.push_str(attr),
        }
    }
    out
}

/// Whether a request's `Origin`, when it has one, is the host it is sent
/// to (a browser sends `Origin` with every cross-origin request and every
/// WebSocket handshake; none: not a browser's cross-origin request).
pub fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, h)| h.trim_end_matches('/'));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// Whether an `Authorization` value carries one of the server's own
/// credentials (an operator, MCP or admin token), valid or not: such a
/// value never reaches a worker, though an app's own credentials do.
pub fn is_server_credential(value: &str, admin_token: &str) -> bool {
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    let token = token.trim();
    scheme.eq_ignore_ascii_case("bearer")
        && (token.starts_with(crate::server::orgs::TOKEN_PREFIX)
            || token.starts_with(crate::server::orgs::MCP_TOKEN_PREFIX)
            || crate::server::auth::secret_eq(token, admin_token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_own_worker_and_port_only() {
        let key = PreviewKey::new(b"k1");
        let t = |worker_id, container_id, port| Target {
            worker_id,
            container_id,
            port,
        };
        let (g, token) = key.grant(t("w1", "c1", 8080), None, Duration::from_secs(60));
        assert_eq!(key.verify(&token, t("w1", "c1", 8080)).unwrap(), g.id);
        assert!(
            key.verify(&token, t("w1", "c1", 8081)).is_err(),
            "another port"
        );
        assert!(
            key.verify(&token, t("w2", "c1", 8080)).is_err(),
            "another worker"
        );
        assert!(
            key.verify(&token, t("w1", "c2", 8080)).is_err(),
            "a later worker of the same name"
        );
        assert!(
            PreviewKey::new(b"k2")
                .verify(&token, t("w1", "c1", 8080))
                .is_err(),
            "another server's key"
        );
        // Stretching the expiry breaks the signature.
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        parts[1] = (g.expires + 3600).to_string();
        let stretched = parts.join(".");
        let e = key.verify(&stretched, t("w1", "c1", 8080)).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        for bad in ["", "a.b", "a.b.c.d", "x.1.zz", &token[..token.len() - 2]] {
            assert!(key.verify(bad, t("w1", "c1", 8080)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_expired_token_is_refused() {
        let key = PreviewKey::new(b"k");
        let g = PreviewGrant {
            id: "g".into(),
            worker_id: "w".into(),
            port: 80,
            expires: now_secs() - 1,
            container_id: "c".into(),
            org: None,
        };
        let t = Target {
            worker_id: "w",
            container_id: "c",
            port: 80,
        };
        let e = key.verify(&key.token(&g), t).unwrap_err();
        assert!(e.message.contains("expired"), "{e}");
    }

    #[test]
    fn host_names_address_a_worker_port() {
        let d = "preview.example.test";
        assert_eq!(
            parse_host("8080-01abc.preview.example.test", d),
            Some(("01abc".into(), 8080))
        );
        assert_eq!(
            parse_host(
                "8080-01ABC.Preview.Example.Test:7878",
                "preview.example.test:7878"
            ),
            Some(("01abc".into(), 8080))
        );
        assert_eq!(
            parse_host("80-shop--web.preview.example.test", d),
            Some(("shop_web".into(), 80))
        );
        assert_eq!(
            parse_host(&format!("80-{}.{d}", host_label("shop_web")), d)
                .unwrap()
                .0,
            "shop_web"
        );
        for h in [
            "preview.example.test",
            "x.preview.example.test",
            "0-w.preview.example.test",
            "70000-w.preview.example.test",
            "8080-.preview.example.test",
            "8080-w.other.test",
            "8080-w.a.preview.example.test",
            "8080-wpreview.example.test",
        ] {
            assert_eq!(parse_host(h, d), None, "{h}");
        }
    }

    #[test]
    fn a_workers_cookies_stay_on_its_preview() {
        let p = Some("/api/v1/workers/w/ports/80");
        assert_eq!(
            contained_set_cookie("a=1; Path=/; Domain=.example.com; HttpOnly", p),
            "a=1; Path=/api/v1/workers/w/ports/80/; HttpOnly"
        );
        assert_eq!(
            contained_set_cookie("a=1; path=/app; domain=example.com", p),
            "a=1; Path=/api/v1/workers/w/ports/80/app"
        );
        assert_eq!(contained_set_cookie("b=2", p), "b=2");
        assert_eq!(
            contained_set_cookie("a=1; Path=/x; Domain=example.com; Secure", None),
            "a=1; Path=/x; Secure"
        );
    }

    #[test]
    fn an_origin_is_the_host_it_is_sent_to_or_none() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        assert!(same_origin(&h(&[("host", "80-a.p.test")])));
        assert!(same_origin(&h(&[
            ("host", "80-a.p.test:7878"),
            ("origin", "https://80-A.p.test:7878")
        ])));
        for o in ["http://80-b.p.test:7878", "null", "http://80-a.p.test"] {
            assert!(
                !same_origin(&h(&[("host", "80-a.p.test:7878"), ("origin", o)])),
                "{o}"
            );
        }
    }

    #[test]
    fn the_servers_credentials_are_known_valid_or_not() {
        for v in ["Bearer top_x", "bearer  tmcp_y", "BEARER admin"] {
            assert!(is_server_credential(v, "admin"), "{v}");
        }
        for v in ["Bearer app-token", "Basic dXNlcjpwYXNz", "top_x"] {
            assert!(!is_server_credential(v, "admin"), "{v}");
        }
    }

    #[test]
    fn the_token_is_taken_out_of_what_the_worker_sees() {
        assert_eq!(
            without_cookie("a=1; tether_preview=x; b=2", PREVIEW_PARAM).as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(without_cookie("tether_preview=x", PREVIEW_PARAM), None);
        assert_eq!(
            without_param("a=1&tether_preview=x&b").as_deref(),
            Some("a=1&b")
        );
        assert_eq!(without_param("tether_preview=x"), None);
        assert_eq!(param("a=1&tether_preview=t.1.ff"), Some("t.1.ff"));
        let hs = ["a=1; tether_preview=one", "tether_preview=two"];
        let v: Vec<&str> = cookies(hs.into_iter(), PREVIEW_PARAM).collect();
        assert_eq!(v, ["one", "two"]);
    }
}
