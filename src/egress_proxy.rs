//! The egress proxy of `allowlist` workers (`tether-agent egress-proxy`,
//! hidden): one per worker, in a container of the agent's own image, the
//! only thing on the worker's internal network with a way out.
//!
//! It speaks just enough HTTP/1.1 for proxies: `CONNECT host:port` (HTTPS)
//! and absolute-URI requests (`GET http://host/path`, plain HTTP). The name
//! the client asks for must match the allowlist, and the port must be 80 or
//! 443 (an allowed name's other services, SSH or a database, stay out of
//! reach: the allowlist is of web names); the proxy resolves it itself and connects only to
//! public addresses (never private, loopback, link-local, CGNAT, multicast
//! or reserved ones), so neither an IP literal nor a name pointing inside
//! reaches the node's networks. Every refusal is an HTTP error whose body
//! names the reason. What cannot pass: anything that is not HTTP(S) through
//! a proxy (raw TCP to an address, UDP, QUIC/HTTP3, DNS from the worker).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Port the proxy listens on inside its container.
pub const PORT: u16 = 3128;
/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One entry of `allowed_egress_domains`: a name, or `*.name` for every
/// name below it (not the name itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Below(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (below, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower.clone()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "{s:?} is an IP address: the allowlist is by name (use allowed_private_cidrs or restricted for addresses)"
            ));
        }
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is not a domain name or \"*.\" followed by one"
            ));
        }
        Ok(if below {
            Pattern::Below(name)
        } else {
            Pattern::Exact(name)
        })
    }

    /// Whether `host` (lowercase, no trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Pattern::Exact(n) => host == n,
            Pattern::Below(n) => host
                .strip_suffix(n.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }

    /// Whether every name `other` matches, this matches too.
    pub fn covers(&self, other: &Pattern) -> bool {
        match other {
            Pattern::Exact(n) => self.matches(n),
            Pattern::Below(n) => match self {
                Pattern::Below(m) => n == m || self.matches(n),
                Pattern::Exact(_) => false,
            },
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(n) => f.write_str(n),
            Pattern::Below(n) => write!(f, "*.{n}"),
        }
    }
}

/// The names both lists allow (an empty `narrower` narrows nothing).
pub fn intersect(list: &[Pattern], narrower: &[Pattern]) -> Vec<Pattern> {
    if narrower.is_empty() {
        return list.to_vec();
    }
    let mut out: Vec<Pattern> = Vec::new();
    for a in list {
        for b in narrower {
            let keep = if b.covers(a) {
                Some(a)
            } else if a.covers(b) {
                Some(b)
            } else {
                None
            };
            if let Some(p) = keep.filter(|p| !out.contains(p)) {
                out.push(p.clone());
            }
        }
    }
    out
}

/// Whether the proxy may connect to `ip`: a globally routed address, not
/// one of the node's or anyone's internal ranges.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64: an IPv4 address inside
                || s[..6] == [0; 6] // IPv4-compatible (::a.b.c.d, deprecated)
                || s[0] == 0x2002 // 6to4: an IPv4 address inside
                || (s[0] == 0x2001 && s[1] == 0) // Teredo: an IPv4 address inside
                || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || o[0] == 0
        || o[0] >= 240
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
        || o == [168, 63, 129, 16] // Azure's host endpoint (WireServer)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)) // 192.0.0.0/24, IETF protocol assignments
}

/// What the proxy allows and how it resolves names.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    pub allow: Vec<Pattern>,
    /// Fixed answers used instead of DNS: a test hook (`--resolve
    /// NAME=IP`), so tests need no DNS server. The answers are filtered
    /// like any other.
    pub resolve: HashMap<String, Vec<IpAddr>>,
}

impl ProxyConfig {
    fn allowed(&self, host: &str) -> bool {
        self.allow.iter().any(|p| p.matches(host))
    }
}

/// Serves until `shutdown`; each connection in its own task.
pub async fn serve(listener: TcpListener, cfg: ProxyConfig, shutdown: CancellationToken) {
    let cfg = Arc::new(cfg);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let cfg = cfg.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &cfg).await {
                info!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// A refusal: HTTP status and the reason, sent as the body.
struct Refusal(u16, String);

async fn refuse(stream: &mut TcpStream, Refusal(status, reason): Refusal) -> std::io::Result<()> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Bad Gateway",
    };
    let body = format!("tether egress proxy: {reason}\n");
    let msg = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the end of the request head; returns the head and any bytes
/// read past it.
async fn read_head(stream: &mut TcpStream) -> Result<(String, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // For the whole head, not each read: a byte every few seconds does
    // not hold a connection for ever.
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            let head = String::from_utf8(buf)
                .map_err(|_| Refusal(400, "the request head is not UTF-8".into()))?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal(431, "request head over 16 KiB".into()));
        }
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => {
                return Err(Refusal(400, "incomplete request head".into()));
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(Refusal(400, e.to_string())),
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets).
fn split_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("bad address {:?}", cut(s)))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => p.parse().map_err(|_| format!("bad port in {:?}", cut(s)))?,
        (None, Some(d)) => d,
        (None, None) => return Err(format!("{:?} needs a port", cut(s))),
    };
    Ok((host.trim_end_matches('.').to_ascii_lowercase(), port))
}

/// The ports an allowed name is reached on: HTTP and HTTPS.
const PORTS: [u16; 2] = [80, 443];

/// Checks the name and the port, and finds public addresses for the name.
async fn admit(cfg: &ProxyConfig, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
    if !PORTS.contains(&port) {
        return Err(Refusal(
            403,
            format!("port {port}: the egress proxy reaches allowed names on ports 80 and 443 only"),
        ));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(Refusal(
            403,
            format!(
                "{host} is an IP address; only names in the node's allowed_egress_domains may be reached"
            ),
        ));
    }
    if !cfg.allowed(host) {
        return Err(Refusal(
            403,
            format!("{host} is not in the node's allowed_egress_domains"),
        ));
    }
    let answers: Vec<SocketAddr> = match cfg.resolve.get(host) {
        Some(ips) => ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
        None => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Refusal(502, format!("cannot resolve {host}: {e}")))?
            .collect(),
    };
    let public: Vec<SocketAddr> = answers
        .iter()
        .copied()
        .filter(|a| is_public(a.ip()))
        .collect();
    if public.is_empty() {
        return Err(Refusal(
            403,
            format!(
                "{host} resolves only to private, loopback, link-local or reserved addresses ({})",
                answers
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(public)
}

async fn dial(host: &str, addrs: &[SocketAddr]) -> Result<TcpStream, Refusal> {
    let mut last = String::new();
    for a in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
    }
    Err(Refusal(502, format!("cannot connect to {host}: {last}")))
}

enum Target {
    Tunnel {
        host: String,
        port: u16,
    },
    Http {
        host: String,
        port: u16,
        head: String,
    },
}

/// Refuses a head an origin could read otherwise than the proxy does: a
/// line ended by a bare CR or LF (an origin that takes bare LF would see
/// a second request, with a `Host` of its own, inside one the proxy
/// checked), another control byte, or a folded or nameless header line.
fn strict_head(head: &str) -> Result<(), Refusal> {
    let bad = |what: &str| Err(Refusal(400, format!("request head with {what}")));
    let mut lines = head.split("\r\n");
    lines.next();
    for line in head.split("\r\n") {
        if line
            .bytes()
            .any(|b| (b.is_ascii_control() && b != b'\t') || b == 0x7f)
        {
            return bad("a bare CR or LF, or a control byte");
        }
    }
    for h in lines.filter(|l| !l.is_empty()) {
        if h.starts_with([' ', '\t']) {
            return bad("a folded header line");
        }
        match h.split_once(':') {
            Some((name, _)) if !name.is_empty() && name.bytes().all(is_tchar) => {}
            _ => return bad("a header line that is not NAME: VALUE"),
        }
    }
    Ok(())
}

/// A byte of an HTTP token (a method, a header name).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A host as the allowlist can judge it: a DNS name (or an address, which
/// is refused as such later) of at most 253 characters.
fn host_name(host: String) -> Result<String, Refusal> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    if ok {
        Ok(host)
    } else {
        Err(Refusal(400, format!("bad host name {:?}", cut(&host))))
    }
}

/// At most 64 characters of what a request sent, for a refusal's message
/// (which the proxy logs).
fn cut(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Decides what the request asks for; plain HTTP gets its head rewritten
/// for the origin (origin-form target, no proxy headers, one request).
fn parse_request(head: &str) -> Result<Target, Refusal> {
    strict_head(head)?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal(400, format!("bad request line {:?}", cut(line))));
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err(Refusal(
            400,
            format!("unsupported version {:?}", cut(version)),
        ));
    }
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(Refusal(400, format!("bad method {:?}", cut(method))));
    }
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_host_port(target, None).map_err(|e| Refusal(400, e))?;
        return Ok(Target::Tunnel {
            host: host_name(host)?,
            port,
        });
    }
    let Some(rest) = target
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])
    else {
        return Err(Refusal(
            400,
            format!(
                "{method} {}: only proxy requests pass (CONNECT host:port, or an absolute http:// URL)",
                cut(target)
            ),
        ));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = split_host_port(authority, Some(80)).map_err(|e| Refusal(400, e))?;
    let host = host_name(host)?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    // The origin sees the host that was checked: a `Host` header naming
    // another site behind the same front (domain fronting) is replaced.
    let host_header = if port == 80 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let mut out = format!("{method} {path} {version}\r\nHost: {host_header}\r\n");
    for h in lines.filter(|l| !l.is_empty()) {
        let name = h.split(':').next().unwrap_or_default().trim();
        if [
            "host",
            "proxy-connection",
            "proxy-authorization",
            "connection",
            "keep-alive",
        ]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
        {
            continue;
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(Target::Http {
        host,
        port,
        head: out,
    })
}

async fn handle(mut client: TcpStream, cfg: &ProxyConfig) -> std::io::Result<()> {
    let (head, rest) = match read_head(&mut client).await {
        Ok(h) => h,
        Err(r) => return refuse(&mut client, r).await,
    };
    let target = match parse_request(&head) {
        Ok(t) => t,
        Err(r) => return refuse(&mut client, r).await,
    };
    let (host, port) = match &target {
        Target::Tunnel { host, port } | Target::Http { host, port, .. } => (host.clone(), *port),
    };
    let addrs = match admit(cfg, &host, port).await {
        Ok(a) => a,
        Err(r) => {
            info!(%host, port, reason = %r.1, "refused");
            return refuse(&mut client, r).await;
        }
    };
    let mut upstream = match dial(&host, &addrs).await {
        Ok(s) => s,
        Err(r) => {
            info!(%host, port, reason = %r.1, "unreachable");
            return refuse(&mut client, r).await;
        }
    };
    info!(%host, port, "allowed");
    match target {
        Target::Tunnel { .. } => {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
        }
        Target::Http { head, .. } => upstream.write_all(head.as_bytes()).await?,
    }
    upstream.write_all(&rest).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn patterns_match_names_and_subdomains() {
        assert!(p("Example.COM.").matches("example.com"));
        assert!(!p("example.com").matches("www.example.com"));
        assert!(p("*.example.com").matches("a.b.example.com"));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(!p("*.example.com").matches("badexample.com"));
        for bad in [
            "10.0.0.1",
            "",
            "*",
            "a..b",
            "*.*.x",
            "exa mple.com",
            "-a.com",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert!(p("*.example.com").covers(&p("a.example.com")));
        assert!(p("*.example.com").covers(&p("*.a.example.com")));
        assert!(!p("a.example.com").covers(&p("*.example.com")));
        let list = [p("*.example.com"), p("other.org")];
        assert_eq!(
            intersect(&list, &[p("api.example.com"), p("x.net")]),
            vec![p("api.example.com")]
        );
        assert_eq!(intersect(&list, &[]), list.to_vec());
    }

    #[test]
    fn only_public_addresses_pass() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "168.63.129.16",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["198.18.0.2", "93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    /// An allowed name is reached on its web ports only: the answer would
    /// be a public address, so only the port stops a tunnel to its SSH.
    #[tokio::test]
    async fn allowed_names_are_reached_on_web_ports_only() {
        let cfg = ProxyConfig {
            allow: vec![Pattern::parse("ok.test").unwrap()],
            resolve: HashMap::from([("ok.test".to_string(), vec!["198.18.0.2".parse().unwrap()])]),
        };
        for port in [80, 443] {
            let a = admit(&cfg, "ok.test", port).await.map_err(|r| r.1).unwrap();
            assert_eq!(a, vec![SocketAddr::from(([198, 18, 0, 2], port))]);
        }
        for port in [22, 25, 5432, 8080] {
            let r = admit(&cfg, "ok.test", port).await.unwrap_err();
            assert_eq!(r.0, 403);
            assert!(r.1.contains("ports 80 and 443 only"), "{}", r.1);
        }
    }

    #[test]
    fn requests_are_parsed_and_rewritten() {
        let Ok(Target::Tunnel { host, port }) =
            parse_request("CONNECT Api.Example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        else {
            panic!()
        };
        assert_eq!((host.as_str(), port), ("api.example.com", 443));
        let Ok(Target::Http { host, port, head }) = parse_request(
            "GET http://example.com:8080/a?b HTTP/1.1\r\nHost: evil.example\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n",
        ) else {
            panic!()
        };
        assert_eq!((host.as_str(), port), ("example.com", 8080));
        // The checked host, not the client's `Host` (no domain fronting).
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        assert!(parse_request("GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request("CONNECT example.com HTTP/1.1\r\n\r\n").is_err());
    }

    #[test]
    fn heads_an_origin_could_read_otherwise_are_refused() {
        let refused = |head: &str| match parse_request(head) {
            Err(Refusal(400, why)) => why,
            _ => panic!("passed: {head:?}"),
        };
        // A second request, for another site, behind bare LFs.
        for head in [
            "GET http://allowed.test/ HTTP/1.1\nHost:other.test\n\n\r\n\r\n",
            "GET http://allowed.test/ HTTP/1.1\r\nX: a\nHost: other.test\r\n\r\n",
            "GET http://allowed.test/\rx HTTP/1.1\r\n\r\n",
            "GET http://allowed.test/ HTTP/1.1\r\nX: a\u{0}b\r\n\r\n",
        ] {
            assert!(refused(head).contains("bare CR or LF"), "{head:?}");
        }
        assert!(refused("GET http://a.test/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n").contains("folded"));
        assert!(refused("GET http://a.test/ HTTP/1.1\r\nnocolon\r\n\r\n").contains("NAME"));
        assert!(refused("GET http://a.test/ HTTP/1.2\r\n\r\n").contains("version"));
        // A host that is no name is refused, and what is logged of it is cut.
        let long = format!("CONNECT {}.test:443 HTTP/1.1\r\n\r\n", "a".repeat(16_000));
        let why = refused(&long);
        assert!(why.contains("bad host name") && why.len() < 200, "{why}");
        assert!(refused("CONNECT a/b.test:443 HTTP/1.1\r\n\r\n").contains("bad host name"));
    }
}
