//! The node's inference containers (docs/inference.md):
//!
//! - the **gateway** (`tether-inference-<node>`, the agent's own image
//!   running `inference-proxy`): on a network of its own, it owns the
//!   network namespace the backend shares, and serves the backend on a Unix
//!   socket in a volume (`…-sock`) with the node's concurrency bound;
//! - the **backend** (`…-backend`, Ollama): in the gateway's namespace,
//!   listening on its loopback only, models on a named volume (`…-models`),
//!   restarted by the engine if it dies, with the node's GPUs when allowed;
//! - per job, a **job proxy** (`tether-<worker>-inference`, a sidecar of
//!   the agent's own image, `docker::sidecar`): in the worker's network
//!   namespace, on `localhost:11434`, to the gateway's socket, with the
//!   request size limit and timeout.
//!
//! Nothing is published, and no worker's network reaches the gateway's.
//! Every object carries `tether.node_id` and [`labels::INFERENCE`] (never
//! `tether.managed`: they are not workers).

use super::networks::{self, NetKind, SubnetPool};
use super::sidecar::{self, AGENT_BIN};
use super::{Error, labels};
use crate::protocol::{ErrorBody, ErrorCode, InferenceBackend, InferenceStatus};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, DeviceMapping, DeviceRequest, HealthConfig, HostConfig, Mount, MountType,
    RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{LogsOptions, RemoveVolumeOptions};
use futures_util::StreamExt;
use sha2::Digest;
use std::collections::HashMap;
use std::time::Duration;
use tracing::{info, warn};

/// Where the gateway's socket is, inside the gateway and every job proxy.
const SOCK_DIR: &str = "/run/tether-inference";
const SOCK: &str = "/run/tether-inference/ollama.sock";
/// The spec a backend was made from (a changed one replaces it).
const SPEC_LABEL: &str = "tether.inference_spec";

/// What the node gives the backend, beyond the pushed section.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The agent's own image (gateway and job proxies run it).
    pub helper_image: Option<String>,
    /// The node allows GPUs for inference.
    pub allow_gpu: bool,
    /// NVIDIA GPUs found on the node.
    pub nvidia: u32,
    /// AMD GPUs found on the node.
    pub amd: u32,
    /// Requests at the backend at once (0: no bound).
    pub max_concurrency: u64,
    /// The node's request body limit and timeout (`inference.max_request_mb`,
    /// `request_timeout_seconds`): the gateway enforces them too, so no
    /// path to the backend skips them.
    pub max_body_bytes: u64,
    pub timeout_secs: u64,
    /// Pull credentials for the backend's image (the pushed registries').
    pub credentials: Option<bollard::auth::DockerCredentials>,
}

/// An inference proxy's body limit and timeout arguments (0: the default).
fn limit_args(max_body: u64, timeout_secs: u64) -> Vec<String> {
    use crate::inference::proxy::{DEFAULT_MAX_BODY, DEFAULT_TIMEOUT};
    let or = |v: u64, d: u64| if v > 0 { v } else { d };
    vec![
        "--max-body-bytes".into(),
        or(max_body, DEFAULT_MAX_BODY).to_string(),
        "--timeout-secs".into(),
        or(timeout_secs, DEFAULT_TIMEOUT.as_secs()).to_string(),
    ]
}

/// The names of a node's inference objects.
pub fn base_name(node_id: &str) -> String {
    let h = hex::encode(sha2::Sha256::digest(node_id.as_bytes()));
    format!("tether-inference-{}", &h[..12])
}

fn node_labels(node_id: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::NODE.to_string(), node_id.to_string()),
        (labels::INFERENCE.to_string(), "true".to_string()),
    ])
}

fn spec_hash(b: &InferenceBackend, host: &Host) -> String {
    let v = serde_json::json!({
        "image": b.image(),
        "env": b.env,
        "gpu": host.allow_gpu,
        "helper": host.helper_image,
        "max_concurrency": host.max_concurrency,
        "max_body": host.max_body_bytes,
        "timeout": host.timeout_secs,
    });
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))[..16].to_string()
}

/// A container of ours by name: its id, labels, whether it runs and its
/// health status.
struct Found {
    id: String,
    labels: HashMap<String, String>,
    running: bool,
    health: Option<String>,
    started_at: Option<std::time::SystemTime>,
}

async fn find(docker: &Docker, node_id: &str, name: &str) -> Result<Option<Found>, Error> {
    match docker.inspect_container(name, None).await {
        Ok(c) => {
            let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
            let ours = labels.get(labels::NODE).map(String::as_str) == Some(node_id)
                && labels.contains_key(labels::INFERENCE);
            if !ours {
                return Err(ErrorBody::new(
                    ErrorCode::Conflict,
                    format!("a container named {name} exists and tether did not create it"),
                )
                .into());
            }
            let state = c.state.unwrap_or_default();
            Ok(Some(Found {
                id: c.id.unwrap_or_default(),
                labels,
                running: state.running == Some(true),
                started_at: super::containers::started(&state),
                health: state.health.and_then(|h| h.status).map(|s| s.to_string()),
            }))
        }
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(Error::engine(e, "inspect inference container")),
    }
}

/// Makes the node's backend match `want` (none or disabled: removed) and
/// says where it stands. An existing backend made from the same spec is
/// adopted (started again if it stopped): still one.
pub async fn ensure(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    want: Option<&InferenceBackend>,
    host: &Host,
) -> InferenceStatus {
    let mut status = InferenceStatus {
        supported: true,
        ..Default::default()
    };
    let Some(b) = want.filter(|b| b.enabled) else {
        if let Err(e) = remove_all(docker, pool, node_id).await {
            status.note = Some(format!("could not remove the inference containers: {e}"));
        }
        return status;
    };
    status.image = Some(b.image().to_string());
    match ensure_running(docker, pool, node_id, b, host).await {
        Ok(gpus) => {
            status.running = true;
            status.gpus = gpus.0;
            status.note = gpus.1;
            status.healthy = healthy(docker, node_id, Duration::from_secs(20)).await;
        }
        Err(e) => status.note = Some(ErrorBody::from(e).message),
    }
    status
}

/// GPUs given and a note about them.
type Gpus = (u32, Option<String>);

async fn ensure_running(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    b: &InferenceBackend,
    host: &Host,
) -> Result<Gpus, Error> {
    let base = base_name(node_id);
    let spec = spec_hash(b, host);
    let Some(helper) = host.helper_image.clone() else {
        return Err(ErrorBody::new(
            ErrorCode::Unavailable,
            "no image for the inference gateway: the agent runs outside a container and no --egress-proxy-image was given",
        )
        .into());
    };
    let backend = find(docker, node_id, &format!("{base}-backend")).await?;
    let gateway = find(docker, node_id, &base).await?;
    if let (Some(bk), Some(gw)) = (&backend, &gateway)
        && bk.labels.get(SPEC_LABEL) == Some(&spec)
        && gw.labels.get(SPEC_LABEL) == Some(&spec)
    {
        for (c, what) in [(gw, "gateway"), (bk, "backend")] {
            if !c.running {
                docker
                    .start_container(&c.id, None)
                    .await
                    .map_err(|e| Error::engine(e, format!("start inference {what}")))?;
            }
        }
        info!(%base, "inference backend adopted");
        let gpus = bk
            .labels
            .get(labels::INFERENCE_GPUS)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        return Ok((gpus, None));
    }
    remove_all(docker, pool, node_id).await?;
    super::containers::ensure_image(docker, b.image(), host.credentials.clone()).await?;
    let mut lbls = node_labels(node_id);
    lbls.insert(SPEC_LABEL.into(), spec);
    networks::create_kind(docker, pool, &base, &lbls, NetKind::Outbound).await?;
    for v in ["sock", "models"] {
        docker
            .create_volume(VolumeCreateRequest {
                name: Some(format!("{base}-{v}")),
                labels: Some(lbls.clone()),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::engine(e, "create inference volume"))?;
    }
    // The gateway first: it holds the namespace, so the backend can restart
    // on its own and come back into the same one.
    let mut cmd = vec![
        "inference-proxy".to_string(),
        "--listen".into(),
        format!("unix:{SOCK}"),
        "--backend".into(),
        format!("127.0.0.1:{}", crate::inference::proxy::PORT),
    ];
    cmd.extend(limit_args(host.max_body_bytes, host.timeout_secs));
    if host.max_concurrency > 0 {
        cmd.extend(["--max-concurrency".into(), host.max_concurrency.to_string()]);
    }
    let gw = ContainerCreateBody {
        image: Some(helper),
        cmd: Some(cmd),
        labels: Some(lbls.clone()),
        env: Some(vec!["TETHER_LOG=info".into()]),
        healthcheck: Some(HealthConfig {
            test: Some(vec![
                "CMD".into(),
                AGENT_BIN.into(),
                "inference-probe".into(),
                format!("127.0.0.1:{}", crate::inference::proxy::PORT),
            ]),
            interval: Some(2_000_000_000),
            timeout: Some(3_000_000_000),
            retries: Some(2),
            start_period: None,
            start_interval: None,
        }),
        host_config: Some(HostConfig {
            network_mode: Some(base.clone()),
            mounts: Some(vec![volume_mount(&format!("{base}-sock"), SOCK_DIR)]),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::ALWAYS),
                maximum_retry_count: None,
            }),
            ..sidecar::hardened()
        }),
        ..Default::default()
    };
    let gw_id = sidecar::create_start(docker, &base, gw).await?;
    let (body, gpus) = backend_body(b, host, &lbls, &gw_id, &base);
    let gpus = match sidecar::create_start(docker, &format!("{base}-backend"), body).await {
        Ok(_) => gpus,
        Err(e) if gpus.0 > 0 => {
            // The engine would not give the GPUs (no NVIDIA runtime, say):
            // run on the CPU and say so.
            let why = ErrorBody::from(e).message;
            warn!(error = %why, "the engine refused the inference container's GPUs; starting it without");
            if let Ok(Some(f)) = find(docker, node_id, &format!("{base}-backend")).await {
                sidecar::remove_id(docker, &f.id).await?;
            }
            let cpu = Host {
                allow_gpu: false,
                ..host.clone()
            };
            let (body, _) = backend_body(b, &cpu, &lbls, &gw_id, &base);
            sidecar::create_start(docker, &format!("{base}-backend"), body).await?;
            (
                0,
                Some(format!(
                    "running without GPUs: the engine refused them: {why}"
                )),
            )
        }
        Err(e) => return Err(e),
    };
    info!(%base, image = b.image(), gpus = gpus.0, "inference backend started");
    Ok(gpus)
}

/// Processes and threads the backend may hold at once.
const BACKEND_PIDS: i64 = 4096;

/// The backend's container (and how many GPUs it asks for).
fn backend_body(
    b: &InferenceBackend,
    host: &Host,
    lbls: &HashMap<String, String>,
    gateway_id: &str,
    base: &str,
) -> (ContainerCreateBody, Gpus) {
    let mut env: Vec<String> = b
        .env
        .iter()
        .filter(|(k, _)| k.as_str() != "OLLAMA_HOST")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // Its own loopback only: reached through the gateway, nothing else.
    env.push(format!(
        "OLLAMA_HOST=127.0.0.1:{}",
        crate::inference::proxy::PORT
    ));
    let mut hc = HostConfig {
        network_mode: Some(format!("container:{gateway_id}")),
        mounts: Some(vec![volume_mount(
            &format!("{base}-models"),
            "/root/.ollama",
        )]),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::ALWAYS),
            maximum_retry_count: None,
        }),
        // Held like a worker: it runs an image the orchestrator chose, and
        // serves every job of the node. No capability (a model server
        // needs none, GPUs included), no new privileges, and a bound on
        // processes (a runner is one process of many threads).
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        pids_limit: Some(BACKEND_PIDS),
        init: Some(true),
        publish_all_ports: Some(false),
        // It logs every job's request.
        log_config: Some(super::containers::rotated_logs(10, 3)),
        ..Default::default()
    };
    let mut gpus = 0;
    if host.allow_gpu && host.nvidia > 0 {
        hc.device_requests = Some(vec![DeviceRequest {
            driver: Some("nvidia".into()),
            count: Some(-1),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]);
        gpus += host.nvidia;
    }
    if host.allow_gpu && host.amd > 0 {
        hc.devices = Some(
            ["/dev/kfd", "/dev/dri"]
                .into_iter()
                .map(|d| DeviceMapping {
                    path_on_host: Some(d.into()),
                    path_in_container: Some(d.into()),
                    cgroup_permissions: Some("rwm".into()),
                })
                .collect(),
        );
        hc.group_add = Some(vec!["video".into()]);
        gpus += host.amd;
    }
    let mut lbls = lbls.clone();
    lbls.insert(labels::INFERENCE_GPUS.into(), gpus.to_string());
    (
        ContainerCreateBody {
            image: Some(b.image().to_string()),
            env: Some(env),
            labels: Some(lbls),
            host_config: Some(hc),
            ..Default::default()
        },
        (gpus, None),
    )
}

fn volume_mount(volume: &str, target: &str) -> Mount {
    Mount {
        target: Some(target.into()),
        source: Some(volume.into()),
        typ: Some(MountType::VOLUME),
        ..Default::default()
    }
}

/// Whether the gateway's probe of the backend passes, waiting up to `wait`
/// for a verdict.
pub async fn healthy(docker: &Docker, node_id: &str, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let health = find(docker, node_id, &base_name(node_id))
            .await
            .ok()
            .flatten()
            .and_then(|f| f.health);
        match health.as_deref() {
            Some("healthy") => return true,
            _ if tokio::time::Instant::now() >= deadline => return false,
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Where the node's backend stands now (no change made): running,
/// healthy, GPUs given.
pub async fn state(docker: &Docker, node_id: &str) -> (bool, bool, u32) {
    let base = base_name(node_id);
    let backend = find(docker, node_id, &format!("{base}-backend"))
        .await
        .ok()
        .flatten();
    let gateway = find(docker, node_id, &base).await.ok().flatten();
    let running =
        backend.as_ref().is_some_and(|b| b.running) && gateway.as_ref().is_some_and(|g| g.running);
    let healthy = running && gateway.and_then(|g| g.health).as_deref() == Some("healthy");
    let gpus = backend
        .and_then(|b| b.labels.get(labels::INFERENCE_GPUS).cloned())
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    (running, healthy, gpus)
}

/// Restarts the backend if the gateway started after it: the engine gives
/// a restarted container (the gateway, after a crash or running out of
/// memory) a new network namespace, and a container that joined the old
/// one (the backend) stays in it, listening where nobody reaches it. A
/// restart joins the gateway's namespace as it is now. Says whether it did.
pub async fn rejoin(docker: &Docker, node_id: &str) -> Result<bool, Error> {
    let base = base_name(node_id);
    let (Some(backend), Some(gateway)) = (
        find(docker, node_id, &format!("{base}-backend")).await?,
        find(docker, node_id, &base).await?,
    ) else {
        return Ok(false);
    };
    let stale = gateway.running
        && matches!((gateway.started_at, backend.started_at), (Some(g), Some(b)) if g > b);
    if stale {
        docker
            .restart_container(&backend.id, None)
            .await
            .map_err(|e| Error::engine(e, "restart the inference backend"))?;
    }
    Ok(stale)
}

/// Pulls `model` into the backend (an exec in the gateway, which reaches
/// the backend's loopback); the error says why not.
pub async fn pull(docker: &Docker, node_id: &str, model: &str) -> Result<(), String> {
    use bollard::container::LogOutput;
    let req = crate::protocol::Exec {
        cmd: vec![
            AGENT_BIN.into(),
            "inference-pull".into(),
            format!("127.0.0.1:{}", crate::inference::proxy::PORT),
            model.into(),
        ],
        ..Default::default()
    };
    let gateway = base_name(node_id);
    let run = async {
        let id = super::exec::create(docker, &gateway, &req).await?;
        let mut started = super::exec::attach(docker, id.clone(), false).await?;
        let mut said = Vec::new();
        while let Some(Ok(o)) = started.output.next().await {
            if let LogOutput::StdErr { message } = o {
                said.extend_from_slice(&message);
            }
        }
        let code = super::exec::exit_code(docker, &id).await?;
        Ok::<_, Error>((code, String::from_utf8_lossy(&said).trim().to_string()))
    };
    match run.await {
        Ok((0, _)) => Ok(()),
        Ok((_, said)) => Err(said.trim_start_matches("tether: ").to_string()),
        Err(e) => Err(ErrorBody::from(e).message),
    }
}

/// What a worker's inference proxy has carried, if the worker has one:
/// the last totals it logged (zeros before its first request).
pub async fn job_usage(
    docker: &Docker,
    node_id: &str,
    worker_id: &str,
) -> Option<crate::protocol::InferenceUsage> {
    let id = sidecar::find(docker, node_id, worker_id, sidecar::Kind::Inference)
        .await
        .ok()??
        .id;
    let logs: Vec<_> = docker
        .logs(
            &id,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: "50".into(),
                ..Default::default()
            }),
        )
        .collect()
        .await;
    let usage = logs
        .iter()
        .rev()
        .filter_map(|l| l.as_ref().ok())
        .find_map(|l| crate::protocol::InferenceUsage::from_log_line(&l.to_string()));
    Some(usage.unwrap_or_default())
}

/// Removes the backend, the gateway, their network and socket volume; the
/// models volume stays (a re-enabled backend need not pull again).
pub async fn remove_all(docker: &Docker, pool: &SubnetPool, node_id: &str) -> Result<(), Error> {
    let base = base_name(node_id);
    for name in [format!("{base}-backend"), base.clone()] {
        if let Some(f) = find(docker, node_id, &name).await? {
            sidecar::remove_id(docker, &f.id).await?;
            info!(container = %name, "inference container removed");
        }
    }
    networks::remove(docker, pool, node_id, &base).await?;
    match docker
        .remove_volume(&format!("{base}-sock"), None::<RemoveVolumeOptions>)
        .await
    {
        Ok(())
        | Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(Error::engine(e, "remove inference socket volume")),
    }
}

/// Requests of one job at the gateway at once, where the node sets no
/// bound: the gateway serves 256 connections, shared by every job.
pub const MAX_JOB_REQUESTS: u64 = 32;

/// What a job's inference proxy needs: the agent's image and the node's
/// limits (request body bytes, seconds).
#[derive(Debug, Clone)]
pub struct JobProxy {
    pub image: String,
    pub limits: (u64, u64),
    /// The node's `max_concurrency`: one job has no more requests waiting
    /// at the gateway than the backend takes at once, so the gateway's
    /// queue, first come first served, takes each job's in turn and one
    /// job's burst cannot keep the others waiting. With no bound on the
    /// node (0), each job still has at most [`MAX_JOB_REQUESTS`].
    pub max_concurrency: u64,
}

/// Starts a job's proxy, which holds the job's network namespace: on the
/// worker's network (`network_mode`) under the worker's host name. Returns
/// its id once it listens, so the worker, made next in its namespace
/// (`container:<id>`), finds `localhost:11434` answering from its first
/// instruction.
pub async fn start_job_proxy(
    docker: &Docker,
    node_id: &str,
    worker_id: &str,
    network_mode: &str,
    hostname: Option<String>,
    proxy: &JobProxy,
) -> Result<String, Error> {
    let base = base_name(node_id);
    let (max_body, timeout) = proxy.limits;
    let id = sidecar::start(
        docker,
        sidecar::Spec {
            node_id,
            worker_id,
            network_mode: network_mode.into(),
            hostname,
            image: &proxy.image,
            kind: sidecar::Kind::Inference,
            cmd: vec![
                "inference-proxy".into(),
                "--listen".into(),
                format!("127.0.0.1:{}", crate::inference::proxy::PORT),
                "--backend".into(),
                format!("unix:{SOCK}"),
                "--job".into(),
                worker_id.into(),
            ]
            .into_iter()
            .chain(limit_args(max_body, timeout))
            .chain([
                "--max-concurrency".into(),
                match proxy.max_concurrency {
                    0 => MAX_JOB_REQUESTS,
                    n => n,
                }
                .to_string(),
            ])
            .collect(),
            mounts: vec![volume_mount(&format!("{base}-sock"), SOCK_DIR)],
            labels: HashMap::new(),
        },
    )
    .await?;
    // Ready when it says so (the agent cannot reach the worker's loopback).
    let mut logs = docker.logs(
        &id,
        Some(LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(chunk)) = logs.next().await {
            if chunk.to_string().contains("inference proxy ready") {
                return true;
            }
        }
        false
    })
    .await;
    if ready != Ok(true) {
        let _ = sidecar::remove_id(docker, &id).await;
        return Err(ErrorBody::new(
            ErrorCode::Unavailable,
            format!("the inference proxy of worker {worker_id} did not start"),
        )
        .into());
    }
    Ok(id)
}
