//! The node: its health, the configuration the orchestrator pushes and the
//! agent's answer to it, and the capability report's hash.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The node's health, agent to server: sent at the start of every
/// connection and whenever it changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub status: NodeHealth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
}

/// Versioned node configuration pushed by the orchestrator (`configure`).
/// The node's own YAML policy stays the last word: this can only narrow it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default = "one")]
    pub version: u32,
    /// A ULID: monotonic by string order; an older or equal one is ignored.
    #[serde(default)]
    pub config_version: String,
    /// Registries and their pull credentials (used for image pulls only).
    #[serde(default)]
    pub registries: Vec<Registry>,
    #[serde(default)]
    pub policy: ConfigPolicy,
    #[serde(default)]
    pub constraints: Constraints,
    /// The node's one inference container (docs/inference.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_backend: Option<InferenceBackend>,
}

/// The node's inference backend: one Ollama container per node, private to
/// it, reached by jobs only through their own proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InferenceBackend {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The image; when left out, the variant's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub variant: InferenceVariant,
    /// Environment of the inference container (`OLLAMA_HOST` is the
    /// agent's: the backend listens on its own loopback only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Models to pull once it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

impl InferenceBackend {
    /// The image to run: the one named, or the variant's default.
    pub fn image(&self) -> &str {
        match (&self.image, self.variant) {
            (Some(i), _) => i,
            (None, InferenceVariant::Rocm) => "ollama/ollama:rocm",
            (None, _) => "ollama/ollama:latest",
        }
    }
}

fn yes() -> bool {
    true
}

/// Which build of Ollama: it picks the default image.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InferenceVariant {
    #[default]
    Cpu,
    Cuda,
    Rocm,
}

/// Where the node's inference stands: in the config ack and the
/// capability report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InferenceStatus {
    /// The node allows inference (`inference.mode: allow`, sandbox allowed).
    pub supported: bool,
    /// The inference container runs.
    pub running: bool,
    /// It answers (the agent's probe through its gateway).
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// GPUs given to it.
    #[serde(default)]
    pub gpus: u32,
    /// Why it does not run, or what it runs without (a refused GPU request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The models the configuration asks for: `pulling`, `ready`, or
    /// `failed: <why>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub server: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigPolicy {
    /// Same keys as the node YAML's `sandbox` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_job_timeout_seconds: Option<u64>,
}

/// The agent's answer to `configure`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigAck {
    pub config_version: String,
    pub status: AckStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ConfigAckError>,
    /// SHA-256 of the configuration in force after this push (secrets excluded).
    pub effective_config_hash: String,
    /// The node's inference after this push, when the push carried a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigAckError {
    #[serde(rename = "type")]
    pub kind: AckErrorKind,
    pub message: String,
}

/// Payload of `config_poll`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigPoll {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
}

/// Hash of a capability report: SHA-256 of its canonical JSON (keys sorted)
/// without the volatile `reported_at` and `compute.storage_free_mb`.
pub fn capability_hash(report: &Value) -> String {
    use sha2::Digest;
    let mut v = report.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("reported_at");
        if let Some(c) = o.get_mut("compute").and_then(|c| c.as_object_mut()) {
            c.remove("storage_free_mb");
        }
    }
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))
}

/// A node's health in `node_status`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeHealth {
    Ok,
    /// The container runtime is unreachable: new work is refused.
    Degraded,
    /// A status this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

/// What became of a pushed configuration.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// In force.
    Applied,
    /// Refused; nothing changed.
    Failed,
    /// Applying it failed and the previous configuration is back.
    RolledBack,
    /// A status this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

impl AckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Applied => "applied",
            AckStatus::Failed => "failed",
            AckStatus::RolledBack => "rolled_back",
            AckStatus::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for AckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Why a pushed configuration did not apply.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AckErrorKind {
    /// It breaks a rule of the format or of the node's policy.
    Invalid,
    /// It could not be written to the state directory.
    Storage,
    /// What it needs from the runtime failed (pulling its default image).
    Apply,
    #[serde(other)]
    Unknown,
}
