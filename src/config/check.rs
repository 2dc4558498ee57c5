//! The checks behind [`parse`](super::parse): the file's shape against the
//! documented example (unknown keys, wrong types), the line of each key,
//! and the range and value checks on a well-typed file.

use super::{FREE_MAPS, NodeFile};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;

/// One problem in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub line: Option<usize>,
    pub path: String,
    pub message: String,
}

/// Every problem found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Issue>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match e.line {
                Some(l) => write!(f, "line {l}: {}: {}", e.path, e.message)?,
                None => write!(f, "{}: {}", e.path, e.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Line of each `a.b.c` key in block-style YAML.
pub(super) fn key_lines(text: &str) -> HashMap<String, usize> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut lines = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') || trimmed.starts_with('-') || trimmed.is_empty() {
            continue;
        }
        let indent = line.len() - trimmed.len();
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        if key.is_empty() || key.contains(' ') {
            continue;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_string()));
        let path = stack
            .iter()
            .map(|(_, k)| k.as_str())
            .collect::<Vec<_>>()
            .join(".");
        lines.entry(path).or_insert(n + 1);
    }
    lines
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

pub(super) fn compatible(expected: &Value, got: &Value) -> bool {
    match (expected, got) {
        (Value::Number(e), Value::Number(g)) => {
            if e.is_f64() {
                true
            } else {
                g.is_u64() || g.is_i64()
            }
        }
        (Value::Array(e), Value::Array(g)) => {
            let elem = e.first().cloned().unwrap_or(Value::String(String::new()));
            g.iter().all(|x| compatible(&elem, x))
        }
        (Value::Object(_), Value::Object(_)) => true,
        (e, g) => std::mem::discriminant(e) == std::mem::discriminant(g),
    }
}

/// Compares `got` against the schema, collecting unknown keys and types.
pub(super) fn check_shape(
    schema: &Value,
    got: &Value,
    path: &str,
    lines: &HashMap<String, usize>,
    out: &mut Vec<Issue>,
) {
    let at = |p: &str| lines.get(p).copied().or_else(|| lines.get(path).copied());
    let (Value::Object(s), Value::Object(g)) = (schema, got) else {
        return;
    };
    for (k, v) in g {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let Some(expected) = s.get(k) else {
            let known: Vec<&str> = s.keys().map(String::as_str).collect();
            out.push(Issue {
                line: at(&p),
                path: p,
                message: format!("unknown key (expected one of: {})", known.join(", ")),
            });
            continue;
        };
        if FREE_MAPS.contains(&p.as_str()) {
            match v {
                Value::Object(m) => {
                    for (mk, mv) in m {
                        if !mv.is_string() {
                            out.push(Issue {
                                line: at(&p),
                                path: format!("{p}.{mk}"),
                                message: format!("must be a string, got {}", kind(mv)),
                            });
                        }
                    }
                }
                Value::Null => {}
                other => out.push(Issue {
                    line: at(&p),
                    path: p.clone(),
                    message: format!("must be a map, got {}", kind(other)),
                }),
            }
            continue;
        }
        if !compatible(expected, v) {
            let want = match expected {
                Value::Array(e) => format!(
                    "a list of {}",
                    kind(e.first().unwrap_or(&Value::String(String::new())))
                        .trim_start_matches("a ")
                        .trim_start_matches("an ")
                ),
                e => kind(e).to_string(),
            };
            out.push(Issue {
                line: at(&p),
                path: p,
                message: format!("must be {want}, got {}", kind(v)),
            });
            continue;
        }
        check_shape(expected, v, &p, lines, out);
    }
}

pub(super) fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

/// Range and value checks on a well-typed file.
pub(super) fn validate(f: &NodeFile) -> Vec<Issue> {
    let mut out = Vec::new();
    let mut bad = |path: &str, message: String| {
        out.push(Issue {
            line: None,
            path: path.into(),
            message,
        });
    };
    if f.version != 1 {
        bad("version", format!("must be 1, got {}", f.version));
    }
    match url::Url::parse(&f.orchestrator.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
        Ok(u) => bad(
            "orchestrator.url",
            format!("must be http:// or https://, got {}://", u.scheme()),
        ),
        Err(e) => bad("orchestrator.url", format!("not a URL: {e}")),
    }
    let pin = &f.orchestrator.tls.pinned_sha256;
    if !pin.is_empty() && (pin.len() != 64 || !pin.chars().all(|c| c.is_ascii_hexdigit())) {
        bad(
            "orchestrator.tls.pinned_sha256",
            "must be 64 hex digits".into(),
        );
    }
    if !(1..=300).contains(&f.orchestrator.timeouts.connect_seconds) {
        bad(
            "orchestrator.timeouts.connect_seconds",
            format!(
                "must be 1..=300, got {}",
                f.orchestrator.timeouts.connect_seconds
            ),
        );
    }
    if !(1..=300).contains(&f.orchestrator.timeouts.request_seconds) {
        bad(
            "orchestrator.timeouts.request_seconds",
            format!(
                "must be 1..=300, got {}",
                f.orchestrator.timeouts.request_seconds
            ),
        );
    }
    if !crate::docker::valid_node_id(&f.node.id) {
        bad(
            "node.id",
            format!(
                "{:?}: 1-64 letters, digits, '-', '_' or '.', not starting with '.' or '-'",
                f.node.id
            ),
        );
    }
    if !(1024..=crate::protocol::MAX_CONTROL_BYTES as u64).contains(&f.worker_api.max_request_bytes)
    {
        bad(
            "worker_api.max_request_bytes",
            format!(
                "must be 1024..={}, got {}",
                crate::protocol::MAX_CONTROL_BYTES,
                f.worker_api.max_request_bytes
            ),
        );
    }
    let one_of = |v: &str, allowed: &[&str]| allowed.contains(&v);
    let s = &f.sandbox;
    if !one_of(&s.mode, &["allow", "sandbox_only", "disabled"]) {
        bad(
            "sandbox.mode",
            format!("must be allow, sandbox_only or disabled, got {:?}", s.mode),
        );
    }
    if !one_of(&s.runtime, &["docker", "podman"]) {
        bad(
            "sandbox.runtime",
            format!("must be docker or podman, got {:?}", s.runtime),
        );
    } else if s.runtime == "podman" {
        bad("sandbox.runtime", "podman is not supported yet".into());
    }
    if !one_of(
        &s.default_network_policy,
        &["restricted", "none", "allowlist"],
    ) {
        bad(
            "sandbox.default_network_policy",
            format!(
                "must be restricted, none or allowlist, got {:?}",
                s.default_network_policy
            ),
        );
    }
    for d in &s.allowed_egress_domains {
        if let Err(e) = crate::egress_proxy::Pattern::parse(d) {
            bad("sandbox.allowed_egress_domains", e);
        }
    }
    for c in &s.allowed_private_cidrs {
        if c.parse::<ipnet::Ipv4Net>().is_err() {
            bad(
                "sandbox.allowed_private_cidrs",
                format!("{c:?} is not an IPv4 CIDR (e.g. 10.1.2.0/24)"),
            );
        }
    }
    if s.resources.max_cpu_cores < 0.0 {
        bad(
            "sandbox.resources.max_cpu_cores",
            format!("must be >= 0, got {}", s.resources.max_cpu_cores),
        );
    }
    if s.resources.max_memory_mb != 0 && s.resources.max_memory_mb < 6 {
        bad(
            "sandbox.resources.max_memory_mb",
            format!(
                "must be 0 (no limit) or >= 6, got {}",
                s.resources.max_memory_mb
            ),
        );
    }
    let t = &s.timeouts;
    if t.max_seconds != 0 && t.default_seconds > t.max_seconds {
        bad(
            "sandbox.timeouts.default_seconds",
            format!(
                "{} exceeds max_seconds {}",
                t.default_seconds, t.max_seconds
            ),
        );
    }
    for p in &s.mounts.allowed_host_paths {
        if !p.starts_with('/') {
            bad(
                "sandbox.mounts.allowed_host_paths",
                format!("{p:?} is not an absolute path"),
            );
        }
    }
    if !(1..=10_240).contains(&s.logs.max_size_mb) {
        bad(
            "sandbox.logs.max_size_mb",
            format!("{} is not between 1 and 10240", s.logs.max_size_mb),
        );
    }
    if !(1..=100).contains(&s.logs.max_files) {
        bad(
            "sandbox.logs.max_files",
            format!("{} is not between 1 and 100", s.logs.max_files),
        );
    }
    if !one_of(&f.inference.mode, &["allow", "disabled"]) {
        bad(
            "inference.mode",
            format!("must be allow or disabled, got {:?}", f.inference.mode),
        );
    }
    if !f.storage.state_dir.starts_with('/') {
        bad(
            "storage.state_dir",
            format!("{:?} is not an absolute path", f.storage.state_dir),
        );
    }
    if f.storage.spool_memory_kb > 64 * 1024 {
        bad(
            "storage.spool_memory_kb",
            format!(
                "must be at most 65536 (64 MiB per exec), got {}",
                f.storage.spool_memory_kb
            ),
        );
    }
    if f.storage.spool_quota_mb > 1024 * 1024 {
        bad(
            "storage.spool_quota_mb",
            format!(
                "must be at most 1048576 (1 TiB), got {}",
                f.storage.spool_quota_mb
            ),
        );
    }
    if !one_of(
        &f.logging.level,
        &["error", "warn", "info", "debug", "trace"],
    ) {
        bad(
            "logging.level",
            format!(
                "must be error, warn, info, debug or trace, got {:?}",
                f.logging.level
            ),
        );
    }
    if !one_of(&f.logging.format, &["text", "json"]) {
        bad(
            "logging.format",
            format!("must be text or json, got {:?}", f.logging.format),
        );
    }
    if f.updates.poll_interval_seconds < 10 {
        bad(
            "updates.poll_interval_seconds",
            format!("must be >= 10, got {}", f.updates.poll_interval_seconds),
        );
    }
    out
}
