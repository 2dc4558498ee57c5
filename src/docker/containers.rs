//! Worker containers: create (with default hardening), inspect, list, stop,
//! remove. A worker is one container on its own network, both named
//! `tether-<worker id>`.

use super::egress::{self, NetPlan};
use super::networks::{self, SubnetPool};
use super::{Error, labels, object_name, valid_worker_id};
use crate::protocol::{ErrorBody, ErrorCode, Resources, Spawn, WorkerInfo, WorkerState};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::Duration;

/// Limits applied when a request names none.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub cpus: f64,
    pub memory_mb: u64,
    pub pids: i64,
    /// Log rotation of every worker (`sandbox.logs`).
    pub log_max_size_mb: u64,
    pub log_max_files: u64,
}

impl Default for Defaults {
    fn default() -> Self {
        let logs = crate::config::Logs::default();
        Defaults {
            cpus: 1.0,
            memory_mb: 512,
            pids: 512,
            log_max_size_mb: logs.max_size_mb,
            log_max_files: logs.max_files,
        }
    }
}

fn not_found(worker_id: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::NotFound, format!("no such worker: {worker_id}"))
}

/// Inspects a worker's container; `not_found` if it does not exist or is not
/// a tether worker of this node.
pub async fn inspect(docker: &Docker, node_id: &str, worker_id: &str) -> Result<WorkerInfo, Error> {
    if !valid_worker_id(worker_id) {
        return Err(not_found(worker_id).into());
    }
    match docker
        .inspect_container(&object_name(worker_id), None)
        .await
    {
        Ok(c) => {
            let holder = c
                .host_config
                .as_ref()
                .and_then(|h| h.network_mode.as_deref())
                .and_then(|m| m.strip_prefix("container:"))
                .map(String::from);
            let mut info = to_info(c, node_id).ok_or_else(|| not_found(worker_id))?;
            if let Some(holder) = holder {
                held_network(docker, &holder, &mut info).await;
            }
            Ok(info)
        }
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Err(not_found(worker_id).into()),
        Err(e) => Err(Error::engine(e, "inspect worker")),
    }
}

/// A worker in the namespace of another container (a job's inference
/// proxy): its network and address are that container's.
async fn held_network(docker: &Docker, holder: &str, info: &mut WorkerInfo) {
    let Ok(c) = docker.inspect_container(holder, None).await else {
        return;
    };
    if c.host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        == Some("none")
    {
        info.network = "none".into();
        return;
    }
    info.ip = c
        .network_settings
        .and_then(|n| n.networks)
        .and_then(|mut n| n.remove(&info.network))
        .and_then(|e| e.ip_address)
        .filter(|ip| !ip.is_empty());
}

/// Builds a [`WorkerInfo`] from an inspect response, if it is one of ours.
pub(crate) fn to_info(c: ContainerInspectResponse, node_id: &str) -> Option<WorkerInfo> {
    let config = c.config?;
    let lbls = config.labels.unwrap_or_default();
    if lbls.get(labels::MANAGED).map(String::as_str) != Some("true")
        || lbls.get(labels::NODE).map(String::as_str) != Some(node_id)
    {
        return None;
    }
    let worker_id = lbls.get(labels::WORKER)?.clone();
    // A deployment's services share the deployment's network.
    let mut network = lbls
        .get(labels::NETWORK)
        .cloned()
        .unwrap_or_else(|| object_name(&worker_id));
    if c.host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        == Some("none")
    {
        network = "none".into();
    }
    let ip = c
        .network_settings
        .and_then(|n| n.networks)
        .and_then(|mut n| n.remove(&network))
        .and_then(|e| e.ip_address)
        .filter(|ip| !ip.is_empty());
    let state = c.state.unwrap_or_default();
    let status = state.status.map_or(WorkerState::Unknown, |s| {
        WorkerState::from_docker(s.as_ref())
    });
    let exit_code = if status == WorkerState::Exited {
        state.exit_code
    } else {
        None
    };
    let user_labels = labels::given(&lbls);
    Some(WorkerInfo {
        node_id: node_id.to_string(),
        image: config.image.unwrap_or_default(),
        container_id: c.id.unwrap_or_default(),
        network,
        subnet: None,
        ip,
        state: status,
        exit_code,
        task_id: lbls.get(labels::TASK).cloned(),
        deployment: lbls.get(labels::DEPLOYMENT).cloned(),
        service: lbls.get(labels::SERVICE).cloned(),
        job_id: lbls.get(labels::JOB).cloned(),
        labels: user_labels,
        created_at: c.created.map(|d| d.to_string()).unwrap_or_default(),
        deadline: lbls.get(labels::DEADLINE).and_then(|d| d.parse().ok()),
        network_policy: lbls
            .get(labels::NETWORK_POLICY)
            .and_then(|p| p.parse().ok()),
        inference: None,
        worker_id,
    })
}

/// Ids of the workers of this node, from container labels.
pub async fn list_ids(docker: &Docker, node_id: &str) -> Result<Vec<String>, Error> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={node_id}", labels::NODE),
        ],
    )]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| Error::engine(e, "list containers"))?;
    Ok(list
        .into_iter()
        .filter_map(|c| c.labels.and_then(|mut l| l.remove(labels::WORKER)))
        .collect())
}

/// How many containers carry this node's label, in any state: workers,
/// services, their sidecars, the inference backend.
pub async fn count_of_node(docker: &Docker, node_id: &str) -> Result<usize, Error> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{}={node_id}", labels::NODE)],
    )]);
    Ok(listed(docker, filters, true).await?.len())
}

/// The containers `filters` select (`all`: stopped ones too).
pub(crate) async fn listed(
    docker: &Docker,
    filters: HashMap<String, Vec<String>>,
    all: bool,
) -> Result<Vec<bollard::models::ContainerSummary>, Error> {
    docker
        .list_containers(Some(ListContainersOptions {
            all,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| Error::engine(e, "list containers"))
}

/// How many of this node's workers are running.
pub async fn running_count(docker: &Docker, node_id: &str) -> Result<usize, Error> {
    let filters = HashMap::from([
        (
            "label".to_string(),
            vec![
                format!("{}=true", labels::MANAGED),
                format!("{}={node_id}", labels::NODE),
            ],
        ),
        ("status".to_string(), vec!["running".to_string()]),
    ]);
    Ok(listed(docker, filters, false).await?.len())
}

/// Every worker of this node.
pub async fn list(docker: &Docker, node_id: &str) -> Result<Vec<WorkerInfo>, Error> {
    let mut out = Vec::new();
    for id in list_ids(docker, node_id).await? {
        match inspect(docker, node_id, &id).await {
            Ok(w) => out.push(w),
            Err(e) if e.code() == ErrorCode::NotFound => {} // removed meanwhile
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Refuses an image that carries a label the agent reads back from its
/// containers or their events (see [`labels::READ`], [`labels::EVENT`]).
fn labels_not_ours(image: &str, found: &bollard::models::ImageInspect) -> Result<(), Error> {
    let carried = found.config.as_ref().and_then(|c| c.labels.as_ref());
    let read =
        |k: &&String| labels::READ.contains(&k.as_str()) || labels::EVENT.contains(&k.as_str());
    match carried.and_then(|l| l.keys().find(read)) {
        Some(k) => Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("image {image:?} carries the label {k:?}, which tether reads back from its containers: rebuild it without"),
        )
        .into()),
        None => Ok(()),
    }
}

/// Makes sure `image` is present, pulling it if the engine can, and that it
/// carries none of the labels tether reads.
pub async fn ensure_image(
    docker: &Docker,
    image: &str,
    credentials: Option<bollard::auth::DockerCredentials>,
) -> Result<(), Error> {
    match docker.inspect_image(image).await {
        Ok(found) => return labels_not_ours(image, &found),
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(Error::engine(e, "inspect image")),
    }
    let pull = async {
        let mut s = docker.create_image(
            Some(CreateImageOptions {
                from_image: Some(image.to_string()),
                ..Default::default()
            }),
            None,
            credentials,
        );
        while let Some(item) = s.next().await {
            item?;
        }
        Ok::<_, DockerError>(())
    };
    match tokio::time::timeout(Duration::from_secs(300), pull).await {
        Ok(Ok(())) => {
            let pulled = docker
                .inspect_image(image)
                .await
                .map_err(|e| Error::engine(e, "inspect image"))?;
            labels_not_ours(image, &pulled)
        }
        Ok(Err(e)) => Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!(
                "image {image:?} is not on the node and could not be pulled: {}",
                ErrorBody::from(Error::engine(e, "pull")).message
            ),
        )
        .into()),
        Err(_) => Err(ErrorBody::new(
            ErrorCode::Timeout,
            format!("pulling image {image:?} took over 300 s"),
        )
        .into()),
    }
}

pub(crate) fn validate(spec: &Spawn) -> Result<(), Error> {
    let bad = |m: String| Err(ErrorBody::new(ErrorCode::InvalidRequest, m).into());
    if let Some(suffix) = super::sidecar_suffix(&spec.worker_id) {
        return bad(format!(
            "invalid worker id {:?}: names ending in {suffix:?} are tether's sidecars'",
            spec.worker_id
        ));
    }
    if !valid_worker_id(&spec.worker_id) {
        return bad(format!("invalid worker id {:?}", spec.worker_id));
    }
    if spec.spec.image.trim().is_empty() {
        return bad("image must not be empty".into());
    }
    if let Some(k) = spec
        .spec
        .labels
        .keys()
        .find(|k| k.starts_with(labels::PREFIX))
    {
        return bad(format!(
            "label {k:?} uses the reserved prefix {:?}",
            labels::PREFIX
        ));
    }
    if let Some(k) = spec
        .spec
        .env
        .keys()
        .find(|k| k.is_empty() || k.contains('='))
    {
        return bad(format!("invalid environment variable name {k:?}"));
    }
    let Resources {
        cpus,
        memory_mb,
        pids,
        disk_mb,
    } = &spec.spec.resources;
    if disk_mb.is_some_and(|d| d < 1) {
        return bad("disk must be at least 1 MB".into());
    }
    // Below 0.01 the engine's NanoCpus (or the CFS quota runc derives from
    // it) rounds to 0, which means no limit at all.
    if cpus.is_some_and(|c| !(0.01..=1024.0).contains(&c)) {
        return bad("cpus must be between 0.01 and 1024".into());
    }
    if memory_mb.is_some_and(|m| !(6..=16 * 1024 * 1024).contains(&m)) {
        return bad("memory must be between 6 MB (Docker's minimum) and 16 TB".into());
    }
    if spec
        .spec
        .timeout_secs
        .is_some_and(|t| t == 0 || t > 10 * 365 * 86400)
    {
        return bad("timeout must be between 1 second and 10 years".into());
    }
    if pids.is_some_and(|p| p < 1) {
        return bad("pids must be at least 1".into());
    }
    Ok(())
}

/// Host paths as Docker binds (`SRC:DST:ro|rw`; read-only unless said).
pub(crate) fn binds(mounts: &[crate::protocol::Mount]) -> Option<Vec<String>> {
    (!mounts.is_empty()).then(|| {
        mounts
            .iter()
            .map(|m| {
                let mode = if m.read_only.unwrap_or(true) {
                    "ro"
                } else {
                    "rw"
                };
                format!("{}:{}:{mode}", m.source, m.target)
            })
            .collect()
    })
}

/// What every worker container gets, whatever else it asks for: no
/// capabilities, no privilege gain, its limits (or the node's defaults), an
/// init, nothing published, rotated json-file logs.
pub(crate) fn limited(r: &Resources, defaults: Defaults) -> HostConfig {
    let memory = (r.memory_mb.unwrap_or(defaults.memory_mb) * 1024 * 1024) as i64;
    HostConfig {
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: Some((r.cpus.unwrap_or(defaults.cpus) * 1e9) as i64),
        pids_limit: Some(r.pids.unwrap_or(defaults.pids)),
        storage_opt: r
            .disk_mb
            .map(|d| HashMap::from([("size".to_string(), format!("{d}M"))])),
        init: Some(true),
        publish_all_ports: Some(false),
        log_config: Some(rotated_logs(
            defaults.log_max_size_mb,
            defaults.log_max_files,
        )),
        ..Default::default()
    }
}

/// json-file logs, whatever the engine's default (`logs` reads them),
/// rotated at `size_mb` with `files` kept, so that what a container writes,
/// or makes one of tether's own containers write, cannot fill the disk.
pub(crate) fn rotated_logs(size_mb: u64, files: u64) -> bollard::models::HostConfigLogConfig {
    bollard::models::HostConfigLogConfig {
        typ: Some("json-file".into()),
        config: Some(HashMap::from([
            ("max-size".to_string(), format!("{}m", size_mb.max(1))),
            ("max-file".to_string(), files.max(1).to_string()),
        ])),
    }
}

/// Creates and starts a worker: its network as `plan` says (while the image
/// is checked), then its container on it. The caller has checked that the
/// worker does not exist yet (the agent answers a repeated spawn with the
/// existing worker). `guard` is why the node's network guard is missing.
#[allow(clippy::too_many_arguments)]
pub async fn spawn(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    defaults: Defaults,
    spec: &Spawn,
    credentials: Option<bollard::auth::DockerCredentials>,
    plan: &NetPlan,
    guard: Result<(), &str>,
    inference: Option<&super::inference::JobProxy>,
) -> Result<WorkerInfo, Error> {
    validate(spec)?;

    let name = object_name(&spec.worker_id);
    let mut object_labels = HashMap::from([
        (labels::MANAGED.to_string(), "true".to_string()),
        (labels::WORKER.to_string(), spec.worker_id.clone()),
        (labels::NODE.to_string(), node_id.to_string()),
    ]);
    if let Some(t) = &spec.spec.task_id {
        object_labels.insert(labels::TASK.into(), t.clone());
    }
    if let Some(j) = &spec.spec.job_id {
        object_labels.insert(labels::JOB.into(), j.clone());
    }
    if let Some(t) = spec.spec.timeout_secs {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        object_labels.insert(labels::DEADLINE.into(), (now + t).to_string());
    }
    let host_net = *plan == NetPlan::Host;
    // The caller found no worker of ours by this id; anything else under
    // its name was made by someone else and is never touched.
    match docker.inspect_container(&name, None).await {
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Ok(_) => {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!("a container named {name} already exists and tether did not create it"),
            )
            .into());
        }
        Err(e) => return Err(Error::engine(e, "inspect container")),
    }
    // The image (pulled if need be; credentials go to the pull only, never
    // into the container) and the network at once: neither needs the other.
    let (image, net) = tokio::join!(
        ensure_image(docker, &spec.spec.image, credentials),
        egress::prepare(
            docker,
            pool,
            node_id,
            &spec.worker_id,
            &object_labels,
            plan,
            guard
        )
    );
    let net = match (image, net) {
        (Ok(()), Ok(net)) => net,
        (Err(e), net) => {
            if let Ok(net) = net {
                egress::undo(docker, pool, node_id, &spec.worker_id, &net).await;
            }
            return Err(e);
        }
        (Ok(()), Err(e)) => return Err(e),
    };
    let hostname = (!host_net).then(|| format!("w-{}", &name[7..name.len().min(19)]));
    // A job with inference: its proxy holds the namespace, listening before
    // the worker exists; the worker joins it.
    let holder = match inference {
        Some(p) => {
            let holder = super::inference::start_job_proxy(
                docker,
                node_id,
                &spec.worker_id,
                &net.mode,
                hostname.clone(),
                p,
            )
            .await;
            match holder {
                Ok(id) => Some(id),
                Err(e) => {
                    egress::undo(docker, pool, node_id, &spec.worker_id, &net).await;
                    return Err(e);
                }
            }
        }
        None => None,
    };

    let mut container_labels = object_labels.clone();
    if let Some(p) = plan.policy() {
        container_labels.insert(labels::NETWORK_POLICY.into(), p.as_str().into());
    }
    container_labels.extend(labels::stored(&spec.spec.labels));
    let r = &spec.spec.resources;
    let body = ContainerCreateBody {
        image: Some(spec.spec.image.clone()),
        cmd: (!spec.spec.cmd.is_empty()).then(|| spec.spec.cmd.clone()),
        env: Some(
            spec.spec
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .chain(net.env.iter().cloned())
                .collect(),
        ),
        labels: Some(container_labels),
        working_dir: spec.spec.workdir.clone(),
        // One joining a holder's namespace takes its host name.
        hostname: hostname.filter(|_| holder.is_none()),
        host_config: Some(HostConfig {
            sysctls: holder
                .is_none()
                .then(|| super::networks::ipv6_off(&net.mode))
                .flatten(),
            network_mode: Some(match &holder {
                Some(id) => format!("container:{id}"),
                None => net.mode.clone(),
            }),
            privileged: Some(spec.spec.privileged),
            devices: (!spec.spec.devices.is_empty()).then(|| {
                spec.spec
                    .devices
                    .iter()
                    .map(|d| bollard::models::DeviceMapping {
                        path_on_host: Some(d.clone()),
                        path_in_container: Some(d.clone()),
                        cgroup_permissions: Some("rwm".into()),
                    })
                    .collect()
            }),
            binds: binds(&spec.spec.mounts),
            ..limited(r, defaults)
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await;
    // Clean-up after a failure removes only what this call created, by the
    // ids the engine returned: never a name someone else may hold.
    let result = match created {
        Ok(c) => docker
            .start_container(&c.id, None)
            .await
            .map_err(|e| (Some(c.id), Error::engine(e, "start container"))),
        Err(DockerError::DockerResponseServerError {
            status_code: 409, ..
        }) => Err((
            None,
            ErrorBody::new(
                ErrorCode::Conflict,
                format!("a container named {name} already exists and tether did not create it"),
            )
            .into(),
        )),
        Err(DockerError::DockerResponseServerError { message, .. })
            if r.disk_mb.is_some() && message.contains("storage-opt") =>
        {
            Err((
                None,
                ErrorBody::new(
                    ErrorCode::Unsupported,
                    format!("this node's storage driver cannot limit a worker's disk: {message}"),
                )
                .into(),
            ))
        }
        Err(e) => Err((None, Error::engine(e, "create container"))),
    };
    if let Err((container, e)) = result {
        for id in container.iter().chain(&holder) {
            let _ = remove_container(docker, id, true).await;
        }
        egress::undo(docker, pool, node_id, &spec.worker_id, &net).await;
        return Err(e);
    }
    let mut info = inspect(docker, node_id, &spec.worker_id).await?;
    info.subnet = net.subnet.map(|s| s.to_string());
    Ok(info)
}

/// When a container last started, from its inspected state.
pub fn started(state: &bollard::models::ContainerState) -> Option<std::time::SystemTime> {
    state
        .started_at
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
}

/// When container `id` last started (`None`: not found, never started).
pub async fn started_at(docker: &Docker, id: &str) -> Option<std::time::SystemTime> {
    let c = docker.inspect_container(id, None).await.ok()?;
    started(c.state.as_ref()?)
}

/// Each worker and service container of this node, inspected (one that
/// went away meanwhile is left out).
pub async fn inspect_all(
    docker: &Docker,
    node_id: &str,
) -> Result<Vec<ContainerInspectResponse>, Error> {
    let mut all = Vec::new();
    for id in list_ids(docker, node_id).await? {
        match docker.inspect_container(&object_name(&id), None).await {
            Ok(c) => all.push(c),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(Error::engine(e, "inspect container")),
        }
    }
    Ok(all)
}

/// What a container was made with, written as the spawn that would ask
/// for it, to be judged again by a policy: image, privilege, network,
/// devices, host paths (as the engine mounts them, resolved) and limits.
/// Inference and the timeout are left out: a backend not up yet is no
/// reason to stop a job, and a deadline is kept in a label of its own.
pub(crate) fn as_asked(c: &ContainerInspectResponse) -> crate::protocol::SpawnRequest {
    let config = c.config.clone().unwrap_or_default();
    let host = c.host_config.clone().unwrap_or_default();
    let lbls = config.labels.unwrap_or_default();
    let host_network = host.network_mode.as_deref() == Some("host");
    let mounts = c
        .mounts
        .iter()
        .flatten()
        .filter(|m| m.typ.as_ref().map(|t| t.to_string()).as_deref() == Some("bind"))
        .filter_map(|m| {
            Some(crate::protocol::Mount {
                source: m.source.clone()?,
                target: m.destination.clone()?,
                read_only: Some(m.rw != Some(true)),
            })
        })
        .collect();
    let disk_mb = host
        .storage_opt
        .as_ref()
        .and_then(|o| o.get("size"))
        .and_then(|s| s.trim_end_matches(['M', 'm']).parse().ok());
    crate::protocol::SpawnRequest {
        image: config.image.unwrap_or_default(),
        privileged: host.privileged == Some(true),
        network: host_network.then(|| "host".to_string()),
        network_policy: lbls
            .get(labels::NETWORK_POLICY)
            .and_then(|p| p.parse().ok()),
        devices: host
            .devices
            .iter()
            .flatten()
            .filter_map(|d| d.path_on_host.clone())
            .collect(),
        mounts,
        resources: Resources {
            cpus: host.nano_cpus.filter(|n| *n > 0).map(|n| n as f64 / 1e9),
            memory_mb: host
                .memory
                .filter(|m| *m > 0)
                .map(|m| m as u64 / (1024 * 1024)),
            pids: host.pids_limit.filter(|p| *p > 0),
            disk_mb,
        },
        ..Default::default()
    }
}

/// Stops a container and clears its restart policy, so that neither the
/// engine nor a daemon restart starts it again; it is kept, with its files.
pub async fn halt(docker: &Docker, container_id: &str) -> Result<(), Error> {
    set_restart(
        docker,
        container_id,
        bollard::models::RestartPolicyNameEnum::NO,
    )
    .await?;
    stop_id(docker, container_id, 10).await
}

/// Sets a container's restart policy.
pub(crate) async fn set_restart(
    docker: &Docker,
    container_id: &str,
    name: bollard::models::RestartPolicyNameEnum,
) -> Result<(), Error> {
    let body = bollard::models::ContainerUpdateBody {
        restart_policy: Some(bollard::models::RestartPolicy {
            name: Some(name),
            maximum_retry_count: None,
        }),
        ..Default::default()
    };
    docker
        .update_container(container_id, body)
        .await
        .map_err(|e| Error::engine(e, "update container"))
}

/// Stops a container by id, giving it `timeout_secs` after SIGTERM (already
/// stopped: fine).
async fn stop_id(docker: &Docker, container_id: &str, timeout_secs: u32) -> Result<(), Error> {
    match docker
        .stop_container(
            container_id,
            Some(StopContainerOptions {
                t: Some(timeout_secs as i32),
                signal: None,
            }),
        )
        .await
    {
        Ok(())
        | Err(DockerError::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) => Err(Error::engine(e, "stop container")),
    }
}

pub async fn stop(
    docker: &Docker,
    node_id: &str,
    worker_id: &str,
    timeout_secs: u32,
) -> Result<WorkerInfo, Error> {
    let info = inspect(docker, node_id, worker_id).await?;
    stop_id(docker, &info.container_id, timeout_secs).await?;
    inspect(docker, node_id, worker_id).await
}

/// Removes a container of ours by id, running or not, with its anonymous
/// volumes (gone already: fine).
pub async fn remove_id(docker: &Docker, id: &str) -> Result<(), Error> {
    remove_container(docker, id, true)
        .await
        .map_err(|e| Error::engine(e, "remove container"))
}

async fn remove_container(docker: &Docker, name: &str, force: bool) -> Result<(), DockerError> {
    match docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force,
                v: true,
                link: false,
            }),
        )
        .await
    {
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        r => r,
    }
}

/// Removes the container and its network. Without `force` a running worker
/// is a `conflict`.
pub async fn remove(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    worker_id: &str,
    force: bool,
) -> Result<(), Error> {
    let info = inspect(docker, node_id, worker_id).await?;
    if !force && info.state == crate::protocol::WorkerState::Running {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!("worker {worker_id} is running: stop it first or remove with force"),
        )
        .into());
    }
    // By the id of the container whose labels were just checked.
    remove_container(docker, &info.container_id, force)
        .await
        .map_err(|e| Error::engine(e, "remove container"))?;
    // Its sidecars (a job's inference proxy holds the namespace, on the
    // worker's network) and an allowlist worker's egress proxy are on the
    // worker's network: they go first.
    if let Err(e) = super::sidecar::remove_all(docker, node_id, worker_id).await {
        tracing::warn!(%worker_id, error = %e, "could not remove the worker's sidecars");
    }
    egress::remove_proxy(docker, pool, node_id, worker_id).await?;
    networks::remove(docker, pool, node_id, &object_name(worker_id)).await
}

/// A host path a worker of this node mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: std::path::PathBuf,
    pub writable: bool,
}

/// Host paths that workers of this node mount, running or not: a stopped
/// worker's bind is written by a file upload into it, or by the worker
/// once restarted (a deployment's service restarts by itself, and the
/// engine resolves the path again at each start).
pub async fn bind_mounts(docker: &Docker, node_id: &str) -> Result<Vec<BindMount>, Error> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={node_id}", labels::NODE),
        ],
    )]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| Error::engine(e, "list containers"))?;
    Ok(list
        .into_iter()
        .flat_map(|c| c.mounts.unwrap_or_default())
        .filter(|m| m.typ.as_ref().map(|t| t.to_string()).as_deref() == Some("bind"))
        .filter_map(|m| {
            Some(BindMount {
                source: std::path::PathBuf::from(m.source?),
                writable: m.rw == Some(true),
            })
        })
        .collect())
}

/// Networks labelled as ours whose worker container no longer exists.
pub async fn orphan_networks(docker: &Docker, node_id: &str) -> Result<Vec<String>, Error> {
    let live: std::collections::HashSet<String> = list_ids(docker, node_id)
        .await?
        .iter()
        .map(|id| object_name(id))
        .collect();
    Ok(networks::list_managed(docker, node_id)
        .await?
        .into_iter()
        .filter(|n| !live.contains(n))
        .collect())
}
