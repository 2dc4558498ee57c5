//! The node's startup YAML (`tether agent --config`). Parsing is a pure
//! function of the text: every unknown key, wrong type and out-of-range
//! value is reported at once with its line, before anything starts. The
//! documented example (`config/node.example.yaml`) is also the schema that
//! unknown keys and types are checked against.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// The schema: every key with its default or an example value.
pub const EXAMPLE: &str = include_str!("../config/node.example.yaml");

/// Free-form maps: any key, string values.
const FREE_MAPS: &[&str] = &["node.metadata"];
/// Keys that must be present.
const REQUIRED: &[&str] = &["version", "orchestrator.url", "node.id"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub version: u32,
    pub orchestrator: Orchestrator,
    pub node: Node,
    #[serde(default)]
    pub worker_api: WorkerApi,
    #[serde(default)]
    pub sandbox: Sandbox,
    #[serde(default)]
    pub inference: Inference,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub logging: Logging,
    #[serde(default)]
    pub updates: Updates,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Orchestrator {
    pub url: String,
    #[serde(default = "default_psk_env")]
    pub registration_psk_env: String,
    #[serde(default)]
    pub registration_psk_file: String,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub timeouts: OrchestratorTimeouts,
}

fn default_psk_env() -> String {
    "TETHER_PSK".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    pub ca_bundle_path: String,
    pub pinned_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorTimeouts {
    pub connect_seconds: u64,
    pub request_seconds: u64,
}

impl Default for OrchestratorTimeouts {
    fn default() -> Self {
        OrchestratorTimeouts {
            connect_seconds: 10,
            request_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerApi {
    pub listen_host: String,
    pub listen_port: u16,
    pub public_base_url: String,
    pub max_request_bytes: u64,
}

impl Default for WorkerApi {
    fn default() -> Self {
        WorkerApi {
            listen_host: "127.0.0.1".into(),
            listen_port: 0,
            public_base_url: String::new(),
            max_request_bytes: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Sandbox {
    pub mode: String,
    pub runtime: String,
    pub rootless: bool,
    pub max_concurrency: u64,
    pub default_image: String,
    pub allowed_images: Vec<String>,
    pub default_network_policy: String,
    pub allowed_egress_domains: Vec<String>,
    /// Private, link-local or other special ranges `restricted` workers may
    /// reach after all (CIDRs; none by default).
    pub allowed_private_cidrs: Vec<String>,
    pub resources: Resources,
    pub timeouts: Timeouts,
    pub mounts: Mounts,
    pub security: Security,
    pub logs: Logs,
}

/// What the engine keeps of a worker's output (json-file driver): a worker
/// that prints without end must not fill the node's disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Logs {
    pub max_size_mb: u64,
    pub max_files: u64,
}

impl Default for Logs {
    fn default() -> Self {
        Logs {
            max_size_mb: 10,
            max_files: 3,
        }
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            mode: "allow".into(),
            runtime: "docker".into(),
            rootless: false,
            max_concurrency: 0,
            default_image: String::new(),
            allowed_images: Vec::new(),
            default_network_policy: "restricted".into(),
            allowed_egress_domains: Vec::new(),
            allowed_private_cidrs: Vec::new(),
            resources: Resources::default(),
            timeouts: Timeouts::default(),
            mounts: Mounts::default(),
            security: Security::default(),
            logs: Logs::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub max_cpu_cores: f64,
    pub max_memory_mb: u64,
    pub max_pids: u64,
    /// Writable-layer size per worker; 0 = no limit. Needs a storage driver
    /// that supports it (overlay2 on xfs with pquota, btrfs, zfs).
    pub max_disk_mb: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub default_seconds: u64,
    pub max_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Mounts {
    pub allowed_host_paths: Vec<String>,
    pub read_only_by_default: bool,
    /// Every host mount read-only; a request for read-write is refused.
    pub force_read_only: bool,
}

impl Default for Mounts {
    fn default() -> Self {
        Mounts {
            allowed_host_paths: Vec::new(),
            read_only_by_default: true,
            force_read_only: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    pub allow_privileged: bool,
    pub allow_host_network: bool,
    pub allow_device_mounts: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Inference {
    pub mode: String,
    pub max_concurrency: u64,
    pub allow_gpu: bool,
}

impl Default for Inference {
    fn default() -> Self {
        Inference {
            mode: "disabled".into(),
            max_concurrency: 1,
            allow_gpu: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    pub state_dir: String,
    pub cache_dir: String,
    pub artifacts_dir: String,
    /// Disk for exec output made while the server is unreachable.
    pub spool_quota_mb: u64,
    /// Per exec, output kept in memory before it goes to disk.
    pub spool_memory_kb: u64,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            state_dir: "/var/lib/tether".into(),
            cache_dir: "/var/cache/tether".into(),
            artifacts_dir: "/var/lib/tether/artifacts".into(),
            spool_quota_mb: 1024,
            spool_memory_kb: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Logging {
    pub level: String,
    pub format: String,
    pub file_path: String,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            level: "info".into(),
            format: "text".into(),
            file_path: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Updates {
    pub enable_dynamic_config: bool,
    pub poll_interval_seconds: u64,
    pub allow_service_restart: bool,
}

impl Default for Updates {
    fn default() -> Self {
        Updates {
            enable_dynamic_config: false,
            poll_interval_seconds: 300,
            allow_service_restart: false,
        }
    }
}

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
fn key_lines(text: &str) -> HashMap<String, usize> {
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

fn kind(v: &Value) -> &'static str {
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

fn compatible(expected: &Value, got: &Value) -> bool {
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
fn check_shape(
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

fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

/// Parses and validates the node YAML.
pub fn parse(text: &str) -> Result<NodeFile, ConfigErrors> {
    let raw: Value = serde_saphyr::from_str(text).map_err(|e| {
        ConfigErrors(vec![Issue {
            line: e.location().map(|l| l.line() as usize),
            path: "(file)".into(),
            message: format!("not valid YAML: {e}"),
        }])
    })?;
    let raw = if raw.is_null() {
        Value::Object(Default::default())
    } else {
        raw
    };
    let schema: Value = serde_saphyr::from_str(EXAMPLE).expect("the example configuration parses");
    let lines = key_lines(text);
    let mut issues = Vec::new();
    if !raw.is_object() {
        issues.push(Issue {
            line: Some(1),
            path: "(file)".into(),
            message: format!("must be a map, got {}", kind(&raw)),
        });
        return Err(ConfigErrors(issues));
    }
    check_shape(&schema, &raw, "", &lines, &mut issues);
    for r in REQUIRED {
        if get(&raw, r).is_none() {
            issues.push(Issue {
                line: None,
                path: r.to_string(),
                message: "is required".into(),
            });
        }
    }
    if !issues.is_empty() {
        issues.sort_by_key(|i| i.line.unwrap_or(usize::MAX));
        return Err(ConfigErrors(issues));
    }
    let file: NodeFile = serde_json::from_value(raw).map_err(|e| {
        ConfigErrors(vec![Issue {
            line: None,
            path: "(file)".into(),
            message: e.to_string(),
        }])
    })?;
    let mut issues = validate(&file);
    for i in &mut issues {
        i.line = lines.get(&i.path).copied();
    }
    if issues.is_empty() {
        Ok(file)
    } else {
        issues.sort_by_key(|i| i.line.unwrap_or(usize::MAX));
        Err(ConfigErrors(issues))
    }
}

/// Range and value checks on a well-typed file.
fn validate(f: &NodeFile) -> Vec<Issue> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_valid() {
        let f = parse(EXAMPLE).unwrap();
        assert_eq!(f.node.id, "node-1");
        assert!(f.sandbox.mounts.read_only_by_default);
        assert_eq!(f.worker_api.max_request_bytes, 1048576);
    }

    #[test]
    fn minimal_file_takes_defaults() {
        let f = parse("version: 1\norchestrator:\n  url: http://h:1\nnode:\n  id: n1\n").unwrap();
        assert_eq!(f.sandbox, Sandbox::default());
        assert_eq!(f.storage.state_dir, "/var/lib/tether");
    }

    #[test]
    fn every_problem_at_once_with_lines() {
        let text = "\
version: 1
orchestrator:
  url: http://h:1
  colour: blue
node:
  id: n1
  labels: [1, 2]
sandbox:
  max_concurrency: \"lots\"
  resources:
    max_cpu_cores: -1
  bogus: true
";
        let e = parse(text).unwrap_err();
        let got: Vec<(Option<usize>, &str)> =
            e.0.iter().map(|i| (i.line, i.path.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (Some(4), "orchestrator.colour"),
                (Some(7), "node.labels"),
                (Some(9), "sandbox.max_concurrency"),
                (Some(12), "sandbox.bogus"),
            ],
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("line 9: sandbox.max_concurrency: must be an integer, got a string"),
            "{e}"
        );
        // Types fixed: the range problem is reported with its line.
        let text = text
            .replace("  colour: blue\n", "")
            .replace("[1, 2]", "[a]")
            .replace("\"lots\"", "3")
            .replace("  bogus: true\n", "");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(
            (e.0[0].line, e.0[0].path.as_str()),
            (Some(10), "sandbox.resources.max_cpu_cores")
        );
    }

    #[test]
    fn missing_required_and_bad_values() {
        let e = parse("version: 2\nnode:\n  id: \"..\"\n").unwrap_err();
        assert!(
            e.0.iter()
                .any(|i| i.path == "orchestrator.url" && i.message == "is required"),
            "{e}"
        );
        let e = parse("version: 2\norchestrator:\n  url: ftp://x\nnode:\n  id: \"..\"\nsandbox:\n  mode: maybe\n").unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["version", "orchestrator.url", "node.id", "sandbox.mode"],
            "{e}"
        );
        assert_eq!(e.0[3].line, Some(7));
    }

    #[test]
    fn network_policy_keys_are_checked() {
        let base = "version: 1\norchestrator:\n  url: http://h:1\nnode:\n  id: n1\nsandbox:\n";
        let f = parse(&format!(
            "{base}  default_network_policy: allowlist\n  allowed_egress_domains: [\"example.com\", \"*.example.org\"]\n  allowed_private_cidrs: [\"10.1.2.0/24\"]\n"
        ))
        .unwrap();
        assert_eq!(f.sandbox.allowed_private_cidrs, vec!["10.1.2.0/24"]);
        let e = parse(&format!(
            "{base}  default_network_policy: open\n  allowed_egress_domains: [\"10.0.0.1\", \"*\"]\n  allowed_private_cidrs: [\"lan\"]\n"
        ))
        .unwrap_err();
        let paths: Vec<(Option<usize>, &str)> =
            e.0.iter().map(|i| (i.line, i.path.as_str())).collect();
        assert_eq!(
            paths,
            vec![
                (Some(7), "sandbox.default_network_policy"),
                (Some(8), "sandbox.allowed_egress_domains"),
                (Some(8), "sandbox.allowed_egress_domains"),
                (Some(9), "sandbox.allowed_private_cidrs"),
            ],
            "{e}"
        );
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = parse("version: 1\nnode: [unclosed\n").unwrap_err();
        assert!(e.0[0].line.is_some(), "{e}");
    }
}
