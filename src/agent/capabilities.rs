//! The node's capability report: what the machine and its container runtime
//! offer, read from the machine (sysinfo, /proc, Docker, nvidia-smi /
//! rocm-smi), never made up. Its hash is over canonical JSON without the
//! volatile fields (`reported_at`, `compute.storage_free_mb`), so the same
//! machine always hashes the same and the hash changes only with
//! capabilities.

pub use crate::protocol::capabilities::*;
use bollard::Docker;
use std::time::{Duration, SystemTime};

/// What the node configuration says about itself.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub node_id: String,
    pub name: Option<String>,
    pub labels: Vec<String>,
    pub sandbox_enabled: bool,
    pub max_concurrency: u64,
    pub inference_enabled: bool,
    /// The inference container may have the node's GPUs.
    pub inference_allow_gpu: bool,
    /// Requests at the inference container at once (0: no bound).
    pub inference_max_concurrency: u64,
    /// Largest request body through a job's inference proxy (0: the default).
    pub inference_max_body_bytes: u64,
    /// Longest request through a job's inference proxy (0: the default).
    pub inference_timeout_secs: u64,
}

/// Reads the report from the machine and the engine.
pub async fn collect(
    docker: &Docker,
    id: &Identity,
    state_dir: &std::path::Path,
    inference: crate::protocol::InferenceStatus,
) -> CapabilityReport {
    let info = tokio::time::timeout(ENGINE_TIMEOUT, docker.info())
        .await
        .ok()
        .and_then(Result::ok);
    let version = tokio::time::timeout(ENGINE_TIMEOUT, docker.version())
        .await
        .ok()
        .and_then(Result::ok);
    let security: Vec<String> = info
        .as_ref()
        .and_then(|i| i.security_options.clone())
        .unwrap_or_default();
    let has = |name: &str| security.iter().any(|s| s.contains(&format!("name={name}")));
    let mut features = Vec::new();
    for f in ["seccomp", "apparmor", "selinux", "userns", "rootless"] {
        if has(f) {
            features.push(f.to_string());
        }
    }
    let cgroup_v2 = info
        .as_ref()
        .and_then(|i| i.cgroup_version.as_ref())
        .is_some_and(|v| v.to_string() == "2");
    if cgroup_v2 {
        features.push("cgroup_v2".into());
    }
    features.sort();

    let dir = state_dir.to_path_buf();
    let (cpu_model, cpu_cores, ram_mb, storage_free_mb) = tokio::task::spawn_blocking(move || {
        let mut sys = sysinfo::System::new();
        sys.refresh_cpu_all();
        sys.refresh_memory();
        let model = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .unwrap_or_default();
        let cores = sys.cpus().len() as u64;
        let disks = sysinfo::Disks::new_with_refreshed_list();
        // The disk holding the state directory (longest matching mount point).
        let free = disks
            .list()
            .iter()
            .filter(|d| dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map(|d| d.available_space() / (1024 * 1024))
            .unwrap_or(0);
        (model, cores, sys.total_memory() / (1024 * 1024), free)
    })
    .await
    .unwrap_or_default();

    CapabilityReport {
        version: 1,
        node: NodeIdentity {
            node_slug: id.node_id.clone(),
            name: id.name.clone().unwrap_or_else(|| id.node_id.clone()),
            labels: id.labels.clone(),
        },
        platform: Platform {
            os: std::env::consts::OS.into(),
            distro: sysinfo::System::long_os_version()
                .unwrap_or_else(sysinfo::System::distribution_id),
            arch: std::env::consts::ARCH.into(),
            kernel_version: sysinfo::System::kernel_version().unwrap_or_default(),
        },
        container_runtime: ContainerRuntime {
            runtime: "docker".into(),
            version: version.and_then(|v| v.version).unwrap_or_default(),
            rootless_supported: true,
            rootless_enabled: has("rootless"),
        },
        compute: Compute {
            cpu_model,
            cpu_cores,
            ram_mb,
            storage_free_mb,
        },
        gpu: gpus().await,
        sandbox: Sandbox {
            supported: info.is_some() && id.sandbox_enabled,
            features,
            max_concurrency: id.max_concurrency,
        },
        inference: Inference {
            mode: if id.inference_enabled {
                "allow".into()
            } else {
                "disabled".into()
            },
            status: inference,
        },
        reported_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        extra: Default::default(),
    }
}

/// How long a GPU tool may take: a wedged driver can hang `nvidia-smi` for
/// ever, and the report is sent before `hello`.
const GPU_TOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Docker's `info` / `version` may take for the report.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `cmd args` and returns its stdout if it succeeds within `limit`;
/// a command still running then is killed.
async fn run(cmd: &str, args: &[&str], limit: Duration) -> Option<String> {
    let child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(limit, child).await {
        Ok(out) => out.ok()?,
        Err(_) => {
            tracing::warn!(
                cmd,
                "no answer within {} s: killed, no GPUs reported from it",
                limit.as_secs()
            );
            return None;
        }
    };
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// NVIDIA GPUs via nvidia-smi, AMD via rocm-smi; absent when neither runs.
pub(crate) async fn gpus() -> Gpu {
    let mut devices = Vec::new();
    if let Some(text) = run(
        "nvidia-smi",
        &[
            "--query-gpu=name,memory.total,uuid,compute_cap",
            "--format=csv,noheader,nounits",
        ],
        GPU_TOOL_TIMEOUT,
    )
    .await
    {
        devices.extend(parse_nvidia(&text));
    }
    if let Some(text) = run(
        "rocm-smi",
        &["--showproductname", "--showmeminfo", "vram", "--json"],
        GPU_TOOL_TIMEOUT,
    )
    .await
    {
        devices.extend(parse_rocm(&text));
    }
    Gpu {
        present: !devices.is_empty(),
        devices,
    }
}

fn parse_nvidia(csv: &str) -> Vec<GpuDevice> {
    csv.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            (f.len() >= 3).then(|| GpuDevice {
                vendor: "nvidia".into(),
                model: f[0].to_string(),
                vram_mb: f[1].parse().unwrap_or(0),
                device_id: f[2].to_string(),
                features: f
                    .get(3)
                    .map(|c| vec![format!("compute_capability={c}")])
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn parse_rocm(json: &str) -> Vec<GpuDevice> {
    let Ok(serde_json::Value::Object(cards)) = serde_json::from_str::<serde_json::Value>(json)
    else {
        return Vec::new();
    };
    cards
        .iter()
        .filter(|(k, _)| k.starts_with("card"))
        .map(|(k, v)| GpuDevice {
            vendor: "amd".into(),
            model: v["Card series"]
                .as_str()
                .or(v["Card SKU"].as_str())
                .unwrap_or("")
                .to_string(),
            device_id: k.clone(),
            vram_mb: v["VRAM Total Memory (B)"]
                .as_str()
                .and_then(|b| b.parse::<u64>().ok())
                .map(|b| b / (1024 * 1024))
                .unwrap_or(0),
            features: Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hanging_gpu_tool_is_killed_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("still-running");
        let script = dir.path().join("wedged-smi");
        std::fs::write(
            &script,
            format!("#!/bin/sh\nsleep 2\ntouch {}\n", marker.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let t0 = std::time::Instant::now();
        let out = run(script.to_str().unwrap(), &[], Duration::from_millis(300)).await;
        assert!(out.is_none());
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // Killed, not left behind: it never gets to its last line.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "the hanging tool kept running");
        assert_eq!(
            run("sh", &["-c", "echo ok"], Duration::from_secs(10))
                .await
                .as_deref(),
            Some("ok\n")
        );
    }

    #[test]
    fn parses_nvidia_smi() {
        let d = parse_nvidia("NVIDIA H100 80GB HBM3, 81559, GPU-5f1c, 9.0\n");
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].model.as_str(), d[0].vram_mb),
            ("NVIDIA H100 80GB HBM3", 81559)
        );
        assert_eq!(d[0].features, vec!["compute_capability=9.0"]);
    }

    #[test]
    fn parses_rocm_smi() {
        let j = r#"{"card0": {"Card series": "Instinct MI210", "VRAM Total Memory (B)": "68702699520"}}"#;
        let d = parse_rocm(j);
        assert_eq!((d[0].vendor.as_str(), d[0].vram_mb), ("amd", 65520));
    }
}
