//! Sidecars: containers of the agent's own image that share a worker's
//! network namespace, so they reach its loopback and nothing else: the
//! tunnel relay joins the worker's (`network_mode: container:<worker>`),
//! and a job's inference proxy holds it (it is made on the worker's network
//! first, listening before the job starts, and the worker joins it). Each
//! carries `tether.node_id` and [`labels::SIDECAR_FOR`] (its worker), goes
//! with its worker, and is collected when found without one.

use super::{Error, labels, object_name};
use crate::protocol::{ErrorBody, ErrorCode};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, Mount};
use bollard::query_parameters::{CreateContainerOptions, ListContainersOptions};
use std::collections::HashMap;
use tracing::{info, warn};

/// The agent binary inside its own image.
pub const AGENT_BIN: &str = "/usr/local/bin/tether-agent";

/// What a sidecar does; part of its name (`tether-<worker>-<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Inference,
    Relay,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Inference => "inference",
            Kind::Relay => "relay",
        }
    }
}

pub fn name(worker_id: &str, kind: Kind) -> String {
    format!("{}-{}", object_name(worker_id), kind.as_str())
}

/// The hardening of every container that runs the agent's own binary:
/// no capability, a read-only root, small limits, and logs rotated at
/// 1 MB x 2 (a worker whose every refused request its egress proxy logs
/// must not fill the disk through the proxy).
pub fn hardened() -> HostConfig {
    HostConfig {
        log_config: Some(super::containers::rotated_logs(1, 2)),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        readonly_rootfs: Some(true),
        memory: Some(64 * 1024 * 1024),
        memory_swap: Some(64 * 1024 * 1024),
        nano_cpus: Some(500_000_000),
        pids_limit: Some(64),
        init: Some(true),
        publish_all_ports: Some(false),
        ..Default::default()
    }
}

/// A sidecar to create.
pub struct Spec<'a> {
    pub node_id: &'a str,
    pub worker_id: &'a str,
    /// Its `network_mode`: `container:<worker>` to join the worker's
    /// namespace, or the worker's network for a namespace's holder.
    pub network_mode: String,
    /// Its host name (a holder's is the worker's).
    pub hostname: Option<String>,
    pub image: &'a str,
    pub kind: Kind,
    pub cmd: Vec<String>,
    pub mounts: Vec<Mount>,
    pub labels: HashMap<String, String>,
}

/// Creates and starts a sidecar; returns its id.
pub async fn start(docker: &Docker, s: Spec<'_>) -> Result<String, Error> {
    let name = name(s.worker_id, s.kind);
    let mut lbls = s.labels;
    lbls.insert(labels::NODE.into(), s.node_id.into());
    lbls.insert(labels::SIDECAR_FOR.into(), s.worker_id.into());
    let body = ContainerCreateBody {
        image: Some(s.image.into()),
        cmd: Some(s.cmd),
        labels: Some(lbls),
        env: Some(vec!["TETHER_LOG=info".into()]),
        hostname: s.hostname,
        host_config: Some(HostConfig {
            // A namespace's holder makes the namespace its worker joins.
            sysctls: super::networks::ipv6_off(&s.network_mode),
            network_mode: Some(s.network_mode),
            mounts: (!s.mounts.is_empty()).then_some(s.mounts),
            ..hardened()
        }),
        ..Default::default()
    };
    create_start(docker, &name, body).await
}

/// Creates and starts a container named `name`; returns its id. Nothing is
/// left behind when it cannot start.
pub async fn create_start(
    docker: &Docker,
    name: &str,
    body: ContainerCreateBody,
) -> Result<String, Error> {
    let id = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_string()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| Error::engine(e, format!("create {name}")))?
        .id;
    if let Err(e) = docker.start_container(&id, None).await {
        let _ = remove_id(docker, &id).await;
        return Err(Error::engine(e, format!("start {name}")));
    }
    Ok(id)
}

pub use super::containers::remove_id;

/// A worker's sidecar as [`find`] finds it.
pub struct Found {
    pub id: String,
    pub running: bool,
    pub labels: HashMap<String, String>,
    /// When it last started.
    pub started_at: Option<std::time::SystemTime>,
}

/// The worker's sidecar of `kind`, if it has one (only a container
/// carrying this node's and this worker's labels).
pub async fn find(
    docker: &Docker,
    node_id: &str,
    worker_id: &str,
    kind: Kind,
) -> Result<Option<Found>, Error> {
    let name = name(worker_id, kind);
    match docker.inspect_container(&name, None).await {
        Ok(c) => {
            let l = c.config.and_then(|c| c.labels).unwrap_or_default();
            let ours = l.get(labels::NODE).map(String::as_str) == Some(node_id)
                && l.get(labels::SIDECAR_FOR).map(String::as_str) == Some(worker_id);
            if !ours {
                return Err(ErrorBody::new(
                    ErrorCode::Conflict,
                    format!("a container named {name} exists and tether did not create it"),
                )
                .into());
            }
            let state = c.state.unwrap_or_default();
            Ok(c.id.map(|id| Found {
                id,
                running: state.running.unwrap_or(false),
                labels: l,
                started_at: super::containers::started(&state),
            }))
        }
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(Error::engine(e, "inspect sidecar")),
    }
}

/// Removes every sidecar of a worker.
pub async fn remove_all(docker: &Docker, node_id: &str, worker_id: &str) -> Result<(), Error> {
    for kind in [Kind::Inference, Kind::Relay] {
        if let Some(Found { id, .. }) = find(docker, node_id, worker_id, kind).await? {
            remove_id(docker, &id).await?;
        }
    }
    Ok(())
}

/// Removes sidecars whose worker is gone.
pub async fn collect_garbage(docker: &Docker, node_id: &str, live: &[String]) {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}={node_id}", labels::NODE),
            labels::SIDECAR_FOR.to_string(),
        ],
    )]);
    let Ok(list) = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
    else {
        return;
    };
    for c in list {
        let worker = c.labels.and_then(|mut l| l.remove(labels::SIDECAR_FOR));
        if let (Some(w), Some(id)) = (worker, c.id)
            && !live.contains(&w)
        {
            match remove_id(docker, &id).await {
                Ok(()) => info!(worker_id = %w, "removed an orphaned sidecar"),
                Err(e) => warn!(worker_id = %w, error = %e, "could not remove an orphaned sidecar"),
            }
        }
    }
}
