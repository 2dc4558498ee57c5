//! The node's startup YAML (`tether agent --config`). Parsing is a pure
//! function of the text: every unknown key, wrong type and out-of-range
//! value is reported at once with its line, before anything starts. The
//! documented example (`config/node.example.yaml`) is also the schema that
//! unknown keys and types are checked against.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

mod check;
pub use check::{ConfigErrors, Issue};
use check::{check_shape, get, key_lines, kind, validate};

/// The schema: every key with its default or an example value.
pub const EXAMPLE: &str = include_str!("../../config/node.example.yaml");

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
    /// Largest request body a job's proxy passes on, in MiB.
    pub max_request_mb: u64,
    /// Longest request through a job's proxy, answer included, in seconds.
    pub request_timeout_seconds: u64,
}

impl Default for Inference {
    fn default() -> Self {
        Inference {
            mode: "disabled".into(),
            max_concurrency: 1,
            allow_gpu: false,
            max_request_mb: 10,
            request_timeout_seconds: 300,
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
