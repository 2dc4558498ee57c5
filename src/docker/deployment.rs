//! A deployment's objects in the engine: one network `tether-dep-NAME`,
//! named volumes `tether-dep-NAME_VOLUME`, and one container per service,
//! `tether-NAME_SERVICE`, labelled like a worker (so exec, files, logs and
//! tunnels address it as the worker `NAME_SERVICE`) and with the
//! deployment, the service and the hash of the spec it was made from.
//! Everything the agent knows of a deployment is in these labels: after a
//! restart it finds the deployment as it left it.

use super::containers::{self, Defaults};
use super::egress;
use super::networks::{self, NetKind, SubnetPool};
use super::{Error, labels, object_name};
use crate::protocol::{
    ErrorBody, ErrorCode, NetworkPolicy, Resources, ServiceSpec, ServiceStatus, service_worker_id,
};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, Mount, MountType,
    NetworkingConfig, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListVolumesOptions, RemoveVolumeOptions,
};
use sha2::Digest;
use std::collections::HashMap;

pub fn network_name(deployment: &str) -> String {
    format!("tether-dep-{deployment}")
}

/// `_` appears in no deployment or volume name: `a` + `b-c` and `a-b` + `c`
/// cannot meet in one volume.
pub fn volume_name(deployment: &str, volume: &str) -> String {
    format!("tether-dep-{deployment}_{volume}")
}

fn object_labels(node_id: &str, deployment: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::NODE.to_string(), node_id.to_string()),
        (labels::DEPLOYMENT.to_string(), deployment.to_string()),
    ])
}

fn filters(node_id: &str, deployment: Option<&str>) -> HashMap<String, Vec<String>> {
    let mut l = vec![format!("{}={node_id}", labels::NODE)];
    match deployment {
        Some(d) => l.push(format!("{}={d}", labels::DEPLOYMENT)),
        None => l.push(labels::DEPLOYMENT.to_string()),
    }
    HashMap::from([("label".to_string(), l)])
}

/// The hash a service's container carries: a changed spec (or policy)
/// means a new container.
pub fn spec_hash(spec: &ServiceSpec, policy: NetworkPolicy) -> String {
    let v = serde_json::json!({ "spec": spec, "policy": policy });
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))[..16].to_string()
}

/// What owns a deployment's egress proxy (in the place of a worker id).
pub fn proxy_owner(deployment: &str) -> String {
    format!("dep-{deployment}")
}

/// The deployment's network, made if missing, and the environment its
/// services get. `none` makes it internal (the services reach each other and
/// nothing else); `restricted` gives it the guarded way out workers have;
/// `allowlist` makes it internal with an egress proxy on it (`proxy`), as
/// for an allowlist worker.
pub async fn ensure_network(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    deployment: &str,
    policy: NetworkPolicy,
    proxy: Option<&egress::ProxySpec>,
    guard: Result<(), &str>,
) -> Result<(String, Vec<String>), Error> {
    let name = network_name(deployment);
    if let Ok(n) = docker.inspect_network(&name, None).await {
        let lbls = n.labels.unwrap_or_default();
        let ours = lbls.get(labels::NODE).map(String::as_str) == Some(node_id)
            && lbls.get(labels::DEPLOYMENT).map(String::as_str) == Some(deployment);
        if !ours {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!("a network named {name} already exists and tether did not create it"),
            )
            .into());
        }
        let made_for = lbls.get(labels::NETWORK_POLICY).map(String::as_str);
        if made_for != Some(policy.as_str()) {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!(
                    "deployment {deployment} runs under network policy {}; take it down to change the policy",
                    made_for.unwrap_or("unknown")
                ),
            )
            .into());
        }
        let subnet = networks::subnet_of(n.ipam);
        let env = match (policy, subnet) {
            (NetworkPolicy::Allowlist, Some(s)) => egress::proxy_env(egress::proxy_ip(s)),
            _ => Vec::new(),
        };
        return Ok((name, env));
    }
    let unenforceable = |why: &str| {
        Error::from(ErrorBody::new(
            ErrorCode::Unsupported,
            format!(
                "network policy {} cannot be enforced on this node: {why}",
                policy.as_str()
            ),
        ))
    };
    let internal = policy != NetworkPolicy::Restricted;
    // `none` too: an internal bridge has no way out, but the host holds
    // its gateway address, and only the guard's input rule keeps the
    // services off the host's own ports.
    if let Err(why) = guard {
        return Err(unenforceable(why));
    }
    let mut lbls = object_labels(node_id, deployment);
    lbls.insert(labels::NETWORK_POLICY.into(), policy.as_str().into());
    let created =
        networks::create_kind(docker, pool, &name, &lbls, NetKind::Shared { internal }).await?;
    let undo = || async {
        let _ = egress::remove_proxy(docker, pool, node_id, &proxy_owner(deployment)).await;
        let _ = networks::remove(docker, pool, node_id, &created.id).await;
    };
    let bridge = networks::shared_bridge_name(created.subnet);
    if !crate::agent::netguard::bridge_visible(&bridge) {
        undo().await;
        return Err(unenforceable(&format!(
            "the deployment's bridge {bridge} is not in the agent's network namespace"
        )));
    }
    let mut env = Vec::new();
    if policy == NetworkPolicy::Allowlist {
        let Some(spec) = proxy else {
            undo().await;
            return Err(unenforceable("no egress proxy image"));
        };
        let owner = proxy_owner(deployment);
        match egress::start_proxy(docker, pool, node_id, &owner, &name, created.subnet, spec).await
        {
            Ok(ip) => env = egress::proxy_env(ip),
            Err(e) => {
                undo().await;
                return Err(e);
            }
        }
    }
    Ok((name, env))
}

/// Makes the deployment's named volumes that are missing. A volume of that
/// name that is not this deployment's is a `conflict`, never shared.
pub async fn ensure_volumes(
    docker: &Docker,
    node_id: &str,
    deployment: &str,
    volumes: &[String],
) -> Result<(), Error> {
    for v in volumes {
        let name = volume_name(deployment, v);
        if let Ok(existing) = docker.inspect_volume(&name).await {
            let l = existing.labels;
            let ours = l.get(labels::NODE).map(String::as_str) == Some(node_id)
                && l.get(labels::DEPLOYMENT).map(String::as_str) == Some(deployment);
            if !ours {
                return Err(ErrorBody::new(
                    ErrorCode::Conflict,
                    format!("a volume named {name} already exists and is not this deployment's"),
                )
                .into());
            }
            continue;
        }
        docker
            .create_volume(VolumeCreateRequest {
                name: Some(name),
                labels: Some(object_labels(node_id, deployment)),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::engine(e, "create volume"))?;
    }
    Ok(())
}

/// The container ids and spec hashes of a deployment's services, by service.
pub async fn services(
    docker: &Docker,
    node_id: &str,
    deployment: &str,
) -> Result<HashMap<String, (String, String)>, Error> {
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters(node_id, Some(deployment))),
            ..Default::default()
        }))
        .await
        .map_err(|e| Error::engine(e, "list containers"))?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let l = c.labels.unwrap_or_default();
            let svc = l.get(labels::SERVICE)?.clone();
            let hash = l.get(labels::SPEC_HASH).cloned().unwrap_or_default();
            Some((svc, (c.id?, hash)))
        })
        .collect())
}

/// How many of the deployment's services run now (a stopped one holds no
/// place under `max_concurrency`, so an `up` replacing it must count it).
pub async fn running_services(
    docker: &Docker,
    node_id: &str,
    deployment: &str,
) -> Result<usize, Error> {
    let mut f = filters(node_id, Some(deployment));
    f.insert("status".to_string(), vec!["running".to_string()]);
    Ok(containers::listed(docker, f, false)
        .await?
        .iter()
        .filter(|c| {
            c.labels
                .as_ref()
                .is_some_and(|l| l.contains_key(labels::SERVICE))
        })
        .count())
}

/// Names of the deployments that have objects on this node.
pub async fn names(docker: &Docker, node_id: &str) -> Result<Vec<String>, Error> {
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters(node_id, None)),
            ..Default::default()
        }))
        .await
        .map_err(|e| Error::engine(e, "list containers"))?;
    let mut v: Vec<String> = list
        .into_iter()
        .filter_map(|c| c.labels?.get(labels::DEPLOYMENT).cloned())
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// Creates and starts one service's container on the deployment's network,
/// reachable there by the service's name. Returns its id.
#[allow(clippy::too_many_arguments)]
pub async fn create_service(
    docker: &Docker,
    node_id: &str,
    deployment: &str,
    network: &str,
    net_env: &[String],
    spec: &ServiceSpec,
    policy: NetworkPolicy,
    defaults: Defaults,
    credentials: Option<bollard::auth::DockerCredentials>,
) -> Result<String, Error> {
    let worker_id = service_worker_id(deployment, &spec.name);
    let name = object_name(&worker_id);
    containers::ensure_image(docker, &spec.image, credentials).await?;
    let mut lbls = object_labels(node_id, deployment);
    lbls.extend([
        (labels::MANAGED.to_string(), "true".to_string()),
        (labels::WORKER.to_string(), worker_id.clone()),
        (labels::SERVICE.to_string(), spec.name.clone()),
        (labels::SPEC_HASH.to_string(), spec_hash(spec, policy)),
        (labels::NETWORK.to_string(), network.to_string()),
        (labels::NETWORK_POLICY.to_string(), policy.as_str().into()),
    ]);
    lbls.extend(labels::stored(&spec.labels));
    let resources = Resources {
        cpus: spec.cpus,
        memory_mb: spec.memory_mb,
        pids: spec.pids,
        disk_mb: spec.disk_mb,
    };
    let healthcheck = spec.healthcheck.as_ref().map(|h| HealthConfig {
        test: Some(h.test.clone()),
        interval: h.interval_ms.map(|ms| ms as i64 * 1_000_000),
        timeout: h.timeout_ms.map(|ms| ms as i64 * 1_000_000),
        retries: h.retries.map(i64::from),
        start_period: h.start_period_ms.map(|ms| ms as i64 * 1_000_000),
        ..Default::default()
    });
    let restart = restart_policy(spec.restart);
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: spec.command.clone(),
        entrypoint: spec.entrypoint.clone(),
        env: Some(
            spec.environment
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .chain(net_env.iter().cloned())
                .collect(),
        ),
        labels: Some(lbls),
        hostname: Some(spec.name.clone()),
        exposed_ports: (!spec.expose.is_empty())
            .then(|| spec.expose.iter().map(|p| format!("{p}/tcp")).collect()),
        healthcheck,
        host_config: Some(HostConfig {
            network_mode: Some(network.to_string()),
            sysctls: super::networks::ipv6_off(network),
            restart_policy: Some(RestartPolicy {
                name: Some(restart),
                maximum_retry_count: None,
            }),
            mounts: (!spec.volumes.is_empty()).then(|| {
                spec.volumes
                    .iter()
                    .map(|v| Mount {
                        target: Some(v.target.clone()),
                        source: Some(volume_name(deployment, &v.volume)),
                        typ: Some(MountType::VOLUME),
                        read_only: Some(v.read_only),
                        ..Default::default()
                    })
                    .collect()
            }),
            binds: containers::binds(&spec.mounts),
            ..containers::limited(&resources, defaults)
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network.to_string(),
                EndpointSettings {
                    aliases: Some(vec![spec.name.clone()]),
                    ..Default::default()
                },
            )])),
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
        .await
        .map_err(|e| match e {
            DockerError::DockerResponseServerError {
                status_code: 409, ..
            } => ErrorBody::new(
                ErrorCode::Conflict,
                format!("a container named {name} already exists and tether did not create it"),
            )
            .into(),
            DockerError::DockerResponseServerError { message, .. }
                if spec.disk_mb.is_some() && message.contains("storage-opt") =>
            {
                ErrorBody::new(
                    ErrorCode::Unsupported,
                    format!(
                        "this node's storage driver cannot limit service {}'s disk: {message}",
                        spec.name
                    ),
                )
                .into()
            }
            e => Error::engine(e, format!("create service {}", spec.name)),
        })?;
    if let Err(e) = docker.start_container(&created.id, None).await {
        let _ = containers::remove_id(docker, &created.id).await;
        return Err(Error::engine(e, format!("start service {}", spec.name)));
    }
    Ok(created.id)
}

/// Starts a service's container if it is not running.
fn restart_policy(r: crate::protocol::RestartPolicy) -> RestartPolicyNameEnum {
    match r {
        crate::protocol::RestartPolicy::No => RestartPolicyNameEnum::NO,
        crate::protocol::RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
        crate::protocol::RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
        crate::protocol::RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
    }
}

/// Starts an unchanged service that is not running, under its restart
/// policy again (one stopped because a narrowed policy refused it had its
/// restart policy cleared).
pub async fn ensure_started(docker: &Docker, id: &str, spec: &ServiceSpec) -> Result<(), Error> {
    containers::set_restart(docker, id, restart_policy(spec.restart)).await?;
    match docker.start_container(id, None).await {
        Ok(())
        | Err(DockerError::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) => Err(Error::engine(e, "start service")),
    }
}

/// A service as it runs now (its worker view, health and restarts).
pub async fn status(docker: &Docker, node_id: &str, id: &str) -> Result<ServiceStatus, Error> {
    let c = docker
        .inspect_container(id, None)
        .await
        .map_err(|e| Error::engine(e, "inspect service"))?;
    let health = c
        .state
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .and_then(|h| h.status)
        .map(|s| s.to_string())
        .filter(|s| !s.is_empty() && s != "none");
    let restarts = c.restart_count.unwrap_or(0);
    let worker = containers::to_info(c, node_id).ok_or_else(|| {
        Error::from(ErrorBody::new(
            ErrorCode::NotFound,
            format!("container {id} is not a service of this node"),
        ))
    })?;
    Ok(ServiceStatus {
        worker,
        health,
        restarts,
        action: None,
    })
}

/// Names of the deployment's volumes on this node.
pub async fn volumes(
    docker: &Docker,
    node_id: &str,
    deployment: &str,
) -> Result<Vec<String>, Error> {
    let r = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(filters(node_id, Some(deployment))),
        }))
        .await
        .map_err(|e| Error::engine(e, "list volumes"))?;
    let mut v: Vec<String> = r
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect();
    v.sort();
    Ok(v)
}

/// Removes every container of the deployment, its network, and its volumes
/// if `with_volumes`. Returns whether there was anything.
pub async fn remove(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    deployment: &str,
    with_volumes: bool,
) -> Result<bool, Error> {
    let svcs = services(docker, node_id, deployment).await?;
    let mut found = !svcs.is_empty();
    for (svc, (id, _)) in &svcs {
        containers::remove_id(docker, id).await?;
        // A tunnel's relay in the service's namespace goes with it.
        let worker = crate::protocol::service_worker_id(deployment, svc);
        super::sidecar::remove_all(docker, node_id, &worker).await?;
    }
    egress::remove_proxy(docker, pool, node_id, &proxy_owner(deployment)).await?;
    let net = network_name(deployment);
    if let Ok(n) = docker.inspect_network(&net, None).await {
        let lbls = n.labels.unwrap_or_default();
        if lbls.get(labels::DEPLOYMENT).map(String::as_str) == Some(deployment) {
            found = true;
            networks::remove(docker, pool, node_id, &net).await?;
        }
    }
    let vols = volumes(docker, node_id, deployment).await?;
    if with_volumes {
        for v in &vols {
            match docker.remove_volume(v, None::<RemoveVolumeOptions>).await {
                Ok(())
                | Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => return Err(Error::engine(e, "remove volume")),
            }
        }
    }
    Ok(found || (with_volumes && !vols.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_deployments_never_name_the_same_volume() {
        assert_ne!(volume_name("a", "b-c"), volume_name("a-b", "c"));
        assert_eq!(volume_name("shop", "data"), "tether-dep-shop_data");
    }
}
