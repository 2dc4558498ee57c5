//! The node's capability report (§5.24): what the machine and its container
//! runtime offer. The agent reads it from the machine
//! (`agent::capabilities`); the server keeps the latest one per node. Every
//! member has a default, and members this build does not know are kept, so
//! a report from a newer or older agent still reads.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CapabilityReport {
    pub version: u32,
    pub node: NodeIdentity,
    pub platform: Platform,
    pub container_runtime: ContainerRuntime,
    pub compute: Compute,
    pub gpu: Gpu,
    pub sandbox: Sandbox,
    pub inference: Inference,
    pub reported_at: String,
    /// Members this build does not know (a newer agent's), kept as sent.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeIdentity {
    pub node_slug: String,
    pub name: String,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Platform {
    pub os: String,
    pub distro: String,
    pub arch: String,
    pub kernel_version: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ContainerRuntime {
    pub runtime: String,
    pub version: String,
    pub rootless_supported: bool,
    pub rootless_enabled: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Compute {
    pub cpu_model: String,
    pub cpu_cores: u64,
    pub ram_mb: u64,
    pub storage_free_mb: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Gpu {
    pub present: bool,
    pub devices: Vec<GpuDevice>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GpuDevice {
    pub vendor: String,
    pub model: String,
    pub device_id: String,
    pub vram_mb: u64,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Sandbox {
    pub supported: bool,
    /// Isolation features the runtime offers: seccomp, apparmor, selinux,
    /// cgroup_v2, userns, rootless.
    pub features: Vec<String>,
    pub max_concurrency: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Inference {
    pub mode: String,
    #[serde(flatten)]
    pub status: super::InferenceStatus,
}

impl CapabilityReport {
    /// SHA-256 of the canonical JSON (sorted keys) without volatile fields.
    pub fn hash(&self) -> String {
        super::capability_hash(&serde_json::to_value(self).expect("reports serialize"))
    }

    /// The node's inference backend runs and answers its probe.
    pub fn inference_ready(&self) -> bool {
        self.inference.status.running && self.inference.status.healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_of_other_agents_read_with_defaults_and_keep_unknown_members() {
        let sent = serde_json::json!({
            "version": 2,
            "inference": {"mode": "allow", "supported": true, "running": true, "healthy": true, "gpus": 1},
            "accelerators": {"npu": 1}
        });
        let r: CapabilityReport = serde_json::from_value(sent).unwrap();
        assert!(r.inference_ready());
        assert_eq!(
            r.compute.cpu_cores, 0,
            "a missing section takes its defaults"
        );
        assert_eq!(r.extra["accelerators"]["npu"], 1, "kept as sent");
        let shown = serde_json::to_value(&r).unwrap();
        assert_eq!(shown["accelerators"]["npu"], 1);
        // A fraction where the table says integer is not a report.
        let bad = serde_json::json!({"compute": {"cpu_cores": 16.5}});
        assert!(serde_json::from_value::<CapabilityReport>(bad).is_err());
    }
}
