//! Workers: what a spawn asks for, how a worker is described, the requests
//! that act on one, and the events the agent reports about it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Resource limits of a worker. Missing values take the node's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// Writable-layer size in MB (`unsupported` where the engine's storage
    /// driver cannot limit it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

/// What the operator asks for when spawning (operator API body). Unknown
/// fields are refused, naming the field: a misspelt limit must not be
/// silently dropped.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub image: String,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Seconds after which the worker is stopped and removed (`timeout`
    /// worker event); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Run privileged (refused unless the node allows it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// `host` to share the node's network (refused unless allowed); absent:
    /// the worker's own bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Host devices to pass in, e.g. `/dev/fuse` (refused unless allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Host paths to mount (only under the node's allowed host paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Node to place the worker on; the server picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// What the worker may reach; absent: the node's
    /// `sandbox.default_network_policy`. A request may only narrow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicy>,
    /// The job wants the node's inference backend through its own proxy on
    /// `localhost:11434` (docs/inference.md): placed only on a node whose
    /// report says inference runs; refused by a node where it is disabled
    /// or not running.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inference: bool,
}

/// What a worker may reach over the network, narrowest first (the order
/// is the one a spawn may narrow along): `none` < `allowlist` < `restricted`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPolicy {
    /// No network at all (Docker's `none`); exec and files still work.
    None,
    /// Only the node's `allowed_egress_domains`, by name, through a
    /// per-worker HTTP(S) egress proxy.
    Allowlist,
    /// The internet, but not the host, link-local, other workers or private
    /// ranges (unless the node lists them in `allowed_private_cidrs`).
    Restricted,
}

impl NetworkPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkPolicy::None => "none",
            NetworkPolicy::Allowlist => "allowlist",
            NetworkPolicy::Restricted => "restricted",
        }
    }
}

impl std::str::FromStr for NetworkPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetworkPolicy::None),
            "allowlist" => Ok(NetworkPolicy::Allowlist),
            "restricted" => Ok(NetworkPolicy::Restricted),
            _ => Err(format!(
                "network policy must be none, allowlist or restricted, got {s:?}"
            )),
        }
    }
}

/// A host path mounted into a worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub source: String,
    pub target: String,
    /// Absent: the node's `read_only_by_default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

/// `spawn` request payload, server to agent: the [`SpawnRequest`] fields
/// and `worker_id` in one object. Deserialised by hand because serde's
/// `flatten` would drop unknown fields instead of refusing them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spawn {
    /// Chosen by the server; a spawn with an id that already exists returns
    /// the existing worker.
    pub worker_id: String,
    #[serde(flatten)]
    pub spec: SpawnRequest,
}

impl<'de> Deserialize<'de> for Spawn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::<String, Value>::deserialize(d)?;
        let worker_id = match map.remove("worker_id") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(D::Error::custom("worker_id must be a string")),
            None => return Err(D::Error::missing_field("worker_id")),
        };
        let spec = SpawnRequest::deserialize(Value::Object(map)).map_err(D::Error::custom)?;
        Ok(Spawn { worker_id, spec })
    }
}

/// A worker as the agent and the server describe it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub node_id: String,
    pub image: String,
    pub container_id: String,
    /// Name of the worker's dedicated bridge network.
    pub network: String,
    /// Subnet of that network (CIDR).
    #[serde(default)]
    pub subnet: Option<String>,
    /// The worker's address on its network.
    #[serde(default)]
    pub ip: Option<String>,
    /// Docker's state of the worker's container.
    pub state: WorkerState,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub task_id: Option<String>,
    #[serde(default)]
    pub job_id: Option<String>,
    /// The deployment this worker is a service of (docs/deployments.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Unix time at which the worker is stopped and removed, if it has a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// The network policy the worker runs under (absent for workers made
    /// before policies were enforced, and for host-network workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicy>,
    /// What the job's inference proxy has carried (jobs with inference;
    /// in an `inspect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceUsage>,
}

/// Requests and bytes through a job's inference proxy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InferenceUsage {
    pub requests: u64,
    /// Answered with the proxy's own error (413, 503, 504).
    pub refused: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl InferenceUsage {
    /// From the proxy's `inference counters` log line (`key=value` pairs).
    pub fn from_log_line(line: &str) -> Option<InferenceUsage> {
        if !line.contains("inference counters") {
            return None;
        }
        let get = |k: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        Some(InferenceUsage {
            requests: get("requests")?,
            refused: get("refused")?,
            bytes_in: get("bytes_in")?,
            bytes_out: get("bytes_out")?,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerRef {
    pub worker_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stop {
    pub worker_id: String,
    /// Seconds between SIGTERM and SIGKILL (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Remove {
    pub worker_id: String,
    /// Remove even if running.
    #[serde(default)]
    pub force: bool,
}

/// `stat` request payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stat {
    pub worker_id: String,
    pub path: String,
}

/// `stat` result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatResult {
    pub exists: bool,
    #[serde(default)]
    pub is_dir: bool,
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerList {
    pub workers: Vec<WorkerInfo>,
}

/// Something happened to a worker outside any request (Docker events).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerEvent {
    pub worker_id: String,
    pub event: WorkerEventKind,
    #[serde(default)]
    pub exit_code: Option<i64>,
    pub at: String,
}

/// What happened to a worker, in a [`WorkerEvent`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerEventKind {
    /// Its main process ended (Docker `die`).
    Exited,
    /// The kernel killed a process of it for memory (Docker `oom`).
    OomKilled,
    /// The agent removed it at its deadline.
    Timeout,
    /// It is gone (the reference agent does not send this).
    Removed,
    /// A kind this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

/// The state of a worker's container, as Docker names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
    /// A state this build does not know, or none reported.
    #[serde(other)]
    Unknown,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Created => "created",
            WorkerState::Running => "running",
            WorkerState::Paused => "paused",
            WorkerState::Restarting => "restarting",
            WorkerState::Removing => "removing",
            WorkerState::Exited => "exited",
            WorkerState::Dead => "dead",
            WorkerState::Unknown => "unknown",
        }
    }

    /// From Docker's name of a container state.
    pub fn from_docker(s: &str) -> WorkerState {
        serde_json::from_value(Value::String(s.to_string())).unwrap_or(WorkerState::Unknown)
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_usage_is_read_from_the_proxys_log_line() {
        let line = "2026-12-06T02:16:18Z  INFO tether::cli: inference counters job=01abc requests=3 refused=1 bytes_in=120 bytes_out=4096";
        assert_eq!(
            InferenceUsage::from_log_line(line),
            Some(InferenceUsage {
                requests: 3,
                refused: 1,
                bytes_in: 120,
                bytes_out: 4096
            })
        );
        assert_eq!(
            InferenceUsage::from_log_line("inference proxy ready listen=..."),
            None
        );
        assert_eq!(
            InferenceUsage::from_log_line("inference counters requests=x"),
            None
        );
    }
}
