//! Deployments (protocol §5.28–§5.30): several services on one private
//! network of their own, on one node. The server reads the Compose subset
//! (`server::compose`) and sends the agent the typed result; the agent
//! converges the node to it.

use super::worker::{NetworkPolicy, WorkerInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `deploy_apply`: make the node run exactly these services.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeployApply {
    /// Lowercase letters, digits and `-`, at most 32.
    pub deployment: String,
    /// In start order (dependencies first).
    pub services: Vec<ServiceSpec>,
    /// What the deployment may reach; absent: the node's default. `host`
    /// does not exist for deployments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicy>,
}

/// One service of a deployment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceSpec {
    /// Lowercase letters, digits and `-`; the other services reach it by
    /// this name.
    pub name: String,
    pub image: String,
    /// Replaces the image's `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub depends_on: Vec<DependsOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// Size of the service's writable layer (the node's
    /// `sandbox.resources.max_disk_mb` when absent and it sets one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    /// Ports other services and tunnels use (documentation and inspect: on
    /// the deployment's network every port is reachable by its services).
    #[serde(default)]
    pub expose: Vec<u16>,
    /// Named volumes of the deployment mounted into the service.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Host paths, as a worker's `mounts` (only under the node's allowed
    /// host paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<super::worker::Mount>,
}

/// A service this one waits for before it starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DependsOn {
    pub service: String,
    #[serde(default)]
    pub condition: DependsCondition,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DependsCondition {
    /// Its container runs.
    #[default]
    ServiceStarted,
    /// Its health check passes.
    ServiceHealthy,
}

/// A Docker health check.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Healthcheck {
    /// As Docker takes it: `["CMD", ...]` or `["CMD-SHELL", "..."]`.
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period_ms: Option<u64>,
}

/// Docker's restart policies, as Compose names them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    No,
    OnFailure,
    Always,
    UnlessStopped,
}

impl RestartPolicy {
    pub fn as_docker(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
            RestartPolicy::UnlessStopped => "unless-stopped",
        }
    }
}

/// A named volume of the deployment at `target` in the service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMount {
    pub volume: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// `deploy_inspect`: a deployment's services as they are now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeployRef {
    pub deployment: String,
}

/// `deploy_remove`: every container and the network; the volumes too when
/// `volumes` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeployRemove {
    pub deployment: String,
    #[serde(default)]
    pub volumes: bool,
}

/// What `deploy_apply` did to a service.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ServiceAction {
    Created,
    Recreated,
    Unchanged,
    Removed,
}

/// A service as it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    /// The service's worker id (`DEPLOYMENT_SERVICE`): exec, cp, logs and
    /// tunnels address it like any worker.
    #[serde(flatten)]
    pub worker: WorkerInfo,
    /// Docker's health status (`starting`, `healthy`, `unhealthy`), if the
    /// service has a health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// How often Docker restarted it.
    #[serde(default)]
    pub restarts: i64,
    /// Set in a `deploy_apply` answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ServiceAction>,
}

/// A deployment on a node (answer of `deploy_apply` and `deploy_inspect`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeploymentInfo {
    pub deployment: String,
    pub node_id: String,
    /// The deployment's network (`tether-dep-NAME`).
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicy>,
    pub services: Vec<ServiceStatus>,
    /// Services `deploy_apply` removed (no longer in the file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// The deployment's volumes (`tether-dep-NAME_VOLUME`).
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// A line of `GET /api/v1/deployments`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeploymentSummary {
    pub deployment: String,
    pub node_id: String,
    pub services: usize,
    pub running: usize,
}

/// Deployment and service names: lowercase letters, digits and `-`, not
/// starting or ending with `-`, no `--`, at most `max` bytes. No `_`: it
/// joins a deployment's name and a service's name into the service's worker
/// id (spelled `--` in a preview host name).
pub fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Most services in one deployment (a node checks it too).
pub const MAX_SERVICES: usize = 100;

/// The shortest health-check `interval_ms` a node takes: each check is an
/// exec the engine starts, whose cost falls outside the service's limits.
pub const MIN_HEALTH_INTERVAL_MS: u64 = 250;
/// The longest health-check interval, timeout or start period (a day).
pub const MAX_HEALTH_PERIOD_MS: u64 = 86_400_000;

impl Healthcheck {
    /// Why a node refuses this health check, if it does.
    pub fn error(&self) -> Option<String> {
        // 0 is the engine's default, as in Compose.
        if self
            .interval_ms
            .is_some_and(|i| i > 0 && i < MIN_HEALTH_INTERVAL_MS)
        {
            return Some(format!(
                "healthcheck interval must be at least {MIN_HEALTH_INTERVAL_MS}ms"
            ));
        }
        [self.interval_ms, self.timeout_ms, self.start_period_ms]
            .into_iter()
            .flatten()
            .any(|ms| ms > MAX_HEALTH_PERIOD_MS)
            .then(|| "healthcheck interval, timeout and start_period must be at most 24h".into())
    }
}

/// Why `name` cannot name a deployment, if it cannot: the shape of
/// [`valid_name`], and no sidecar's suffix (`-egress`, `-relay`,
/// `-inference`), since deployment `x`'s egress proxy and its network are
/// named as deployment `x-egress`'s network would be.
pub fn deployment_name_error(name: &str) -> Option<String> {
    if !valid_name(name, MAX_DEPLOYMENT_NAME) {
        return Some(format!(
            "deployment name {name:?}: lowercase letters, digits and '-', at most {MAX_DEPLOYMENT_NAME}"
        ));
    }
    crate::docker::sidecar_suffix(name).map(|suffix| {
        format!("deployment name {name:?}: names ending in {suffix:?} are tether's sidecars'")
    })
}

/// Longest deployment name.
pub const MAX_DEPLOYMENT_NAME: usize = 32;
/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 30;

/// The worker id of a deployment's service.
pub fn service_worker_id(deployment: &str, service: &str) -> String {
    format!("{deployment}_{service}")
}

/// `NAME/SERVICE` (how operators name a service) as its worker id; anything
/// else is returned as it is.
pub fn worker_ref(s: &str) -> String {
    match s.split_once('/') {
        Some((d, svc)) if !d.is_empty() && !svc.is_empty() => service_worker_id(d, svc),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_checks_are_bounded() {
        let h = |interval_ms, timeout_ms| Healthcheck {
            test: vec!["CMD".into(), "true".into()],
            interval_ms,
            timeout_ms,
            ..Default::default()
        };
        assert_eq!(h(None, None).error(), None);
        assert_eq!(h(Some(250), Some(1)).error(), None);
        assert!(h(Some(249), None).error().unwrap().contains("250ms"));
        // Past a day, or past what the engine's nanoseconds hold.
        assert!(h(None, Some(86_400_001)).error().is_some());
        assert!(h(Some(u64::MAX), None).error().is_some());
        // 0 means the engine's default.
        assert_eq!(h(Some(0), Some(0)).error(), None);
    }

    #[test]
    fn names_and_service_refs() {
        assert!(valid_name("app-1", 32));
        for bad in ["", "-a", "a-", "a--b", "A", "a_b", "a.b", &"x".repeat(33)] {
            assert!(!valid_name(bad, 32), "{bad}");
        }
        assert_eq!(worker_ref("shop/web"), "shop_web");
        assert_eq!(worker_ref("01jabc"), "01jabc");
        assert_eq!(worker_ref("/web"), "/web");
    }
}
