//! A worker's network as its network policy shapes it:
//!
//! - `none`: Docker's `none` network mode; no network is made.
//! - `restricted`: the worker's own bridge, guarded by the agent's
//!   nftables table (`agent::netguard`).
//! - `allowlist`: the worker's own bridge, `internal` (no route out), plus
//!   an egress proxy container (`tether-<id>-egress`, the agent's own image
//!   running `egress-proxy`) on it at the subnet's last host address and on
//!   a second, outbound network of its own (`tether-<id>-egress`). The
//!   worker gets `HTTP_PROXY`/`HTTPS_PROXY` (and lowercase) pointing there.
//!
//! The proxy and its network carry `tether.node_id` and
//! [`labels::EGRESS_FOR`] (not `tether.managed`: they are not workers) and
//! go with their worker: removed before its network, and collected when
//! the agent finds them without one.

use super::networks::{self, NetKind, SubnetPool};
use super::{Error, labels, object_name};
use crate::protocol::{ErrorBody, ErrorCode, NetworkPolicy};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, NetworkConnectRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListNetworksOptions, RemoveContainerOptions,
};
use ipnet::Ipv4Net;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;
use tracing::{info, warn};

/// How to build a worker's network, decided by the agent after admission.
#[derive(Debug, Clone, PartialEq)]
pub enum NetPlan {
    /// The node's network (`network: host`, allowed by the node).
    Host,
    /// No network.
    None,
    /// Own bridge, guarded.
    Restricted,
    /// Internal bridge and an egress proxy.
    Allowlist(ProxySpec),
}

impl NetPlan {
    pub fn policy(&self) -> Option<NetworkPolicy> {
        match self {
            NetPlan::Host => None,
            NetPlan::None => Some(NetworkPolicy::None),
            NetPlan::Restricted => Some(NetworkPolicy::Restricted),
            NetPlan::Allowlist(_) => Some(NetworkPolicy::Allowlist),
        }
    }
}

/// The egress proxy of an allowlist worker.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySpec {
    /// The agent's own image (it holds the proxy).
    pub image: String,
    /// Allowed names (`example.com`, `*.example.com`).
    pub allow: Vec<String>,
    /// Test hook: fixed answers `NAME=IP` instead of DNS.
    pub resolve: Vec<String>,
}

/// The worker's side of its network.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Docker `network_mode` of the worker.
    pub mode: String,
    /// The worker network's subnet, if one was made.
    pub subnet: Option<Ipv4Net>,
    /// Its id (what clean-up removes).
    pub network_id: Option<String>,
    /// Environment added to the worker (the proxy settings).
    pub env: Vec<String>,
}

fn proxy_name(worker_id: &str) -> String {
    format!("{}-egress", object_name(worker_id))
}

fn unenforceable(policy: NetworkPolicy, why: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Unsupported,
        format!(
            "network policy {} cannot be enforced on this node: {why}",
            policy.as_str()
        ),
    )
}

/// Makes the worker's network (and proxy) per `plan`. `guard` is why the
/// node's nftables guard is missing, if it is. On error nothing is left.
pub async fn prepare(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    worker_id: &str,
    object_labels: &HashMap<String, String>,
    plan: &NetPlan,
    guard: Result<(), &str>,
) -> Result<Prepared, Error> {
    let name = object_name(worker_id);
    let kind = match plan {
        NetPlan::Host => {
            return Ok(Prepared {
                mode: "host".into(),
                ..Default::default()
            });
        }
        NetPlan::None => {
            return Ok(Prepared {
                mode: "none".into(),
                ..Default::default()
            });
        }
        NetPlan::Restricted => NetKind::Outbound,
        NetPlan::Allowlist(_) => NetKind::Internal,
    };
    let policy = plan.policy().expect("a guarded plan");
    if let Err(why) = guard {
        return Err(unenforceable(policy, why).into());
    }
    let created = networks::create_kind(docker, pool, &name, object_labels, kind).await?;
    let subnet = created.subnet;
    let undo = || async {
        let _ = remove_proxy(docker, pool, node_id, worker_id).await;
        let _ = networks::remove(docker, pool, node_id, &created.id).await;
    };
    let bridge = networks::bridge_name(subnet);
    if !crate::agent::netguard::bridge_visible(&bridge) {
        undo().await;
        return Err(unenforceable(
            policy,
            &format!(
                "the worker's bridge {bridge} is not in the agent's network namespace \
                 (run the agent on the host, or its container with --network host)"
            ),
        )
        .into());
    }
    let mut env = Vec::new();
    if let NetPlan::Allowlist(spec) = plan {
        match start_proxy(docker, pool, node_id, worker_id, &name, subnet, spec).await {
            Ok(ip) => env = proxy_env(ip),
            Err(e) => {
                undo().await;
                return Err(e);
            }
        }
    }
    Ok(Prepared {
        mode: name,
        subnet: Some(subnet),
        network_id: Some(created.id.clone()),
        env,
    })
}

/// The environment that points a container at the egress proxy on `ip`.
pub(crate) fn proxy_env(ip: Ipv4Addr) -> Vec<String> {
    let url = format!("http://{ip}:{}", crate::egress_proxy::PORT);
    let mut env = Vec::new();
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push(format!("{k}={url}"));
    }
    for k in ["NO_PROXY", "no_proxy"] {
        env.push(format!("{k}=localhost,127.0.0.1"));
    }
    env
}

/// Removes what [`prepare`] made, after a later step of a spawn failed.
pub async fn undo(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    worker_id: &str,
    prepared: &Prepared,
) {
    if let Some(id) = &prepared.network_id {
        let _ = remove_proxy(docker, pool, node_id, worker_id).await;
        let _ = networks::remove(docker, pool, node_id, id).await;
    }
}

/// Address of the proxy on the worker's subnet: its last host address.
pub fn proxy_ip(subnet: Ipv4Net) -> Ipv4Addr {
    let host = crate::agent::netguard::proxy_host_part(subnet.prefix_len());
    Ipv4Addr::from(u32::from(subnet.network()) | host)
}

pub(crate) async fn start_proxy(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    worker_id: &str,
    internal: &str,
    subnet: Ipv4Net,
    spec: &ProxySpec,
) -> Result<Ipv4Addr, Error> {
    let name = proxy_name(worker_id);
    let lbls = HashMap::from([
        (labels::NODE.to_string(), node_id.to_string()),
        (labels::EGRESS_FOR.to_string(), worker_id.to_string()),
    ]);
    match docker.inspect_image(&spec.image).await {
        Ok(_) => {}
        Err(e) => {
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "the egress proxy image {:?} is not on the node: {}",
                    spec.image,
                    ErrorBody::from(Error::engine(e, "inspect image")).message
                ),
            )
            .into());
        }
    }
    if docker.inspect_container(&name, None).await.is_ok() {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!("a container named {name} already exists and tether did not create it"),
        )
        .into());
    }
    networks::create_kind(docker, pool, &name, &lbls, NetKind::Outbound).await?;
    let ip = proxy_ip(subnet);
    let mut cmd = vec![
        "egress-proxy".to_string(),
        "--listen".into(),
        format!("0.0.0.0:{}", crate::egress_proxy::PORT),
    ];
    for a in &spec.allow {
        cmd.push("--allow".into());
        cmd.push(a.clone());
    }
    for r in &spec.resolve {
        cmd.push("--resolve".into());
        cmd.push(r.clone());
    }
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: Some(cmd),
        labels: Some(lbls),
        user: Some("65534:65534".into()),
        env: Some(vec!["TETHER_LOG=info".into()]),
        host_config: Some(HostConfig {
            // Like its worker: no IPv6 (the guard matches IPv4 only), on
            // either of its networks.
            sysctls: super::networks::ipv6_off(&name),
            network_mode: Some(name.clone()),
            ..super::sidecar::hardened()
        }),
        ..Default::default()
    };
    let id = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| Error::engine(e, "create egress proxy"))?
        .id;
    docker
        .connect_network(
            internal,
            NetworkConnectRequest {
                container: id.clone(),
                endpoint_config: Some(EndpointSettings {
                    ipam_config: Some(EndpointIpamConfig {
                        ipv4_address: Some(ip.to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
        )
        .await
        .map_err(|e| Error::engine(e, "attach egress proxy"))?;
    docker
        .start_container(&id, None)
        .await
        .map_err(|e| Error::engine(e, "start egress proxy"))?;
    // Ready before the worker starts (the host reaches the internal bridge:
    // replies to its own connections pass the guard).
    for _ in 0..50 {
        let probe = tokio::net::TcpStream::connect((ip, crate::egress_proxy::PORT));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), probe).await {
            return Ok(ip);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    warn!(%worker_id, %ip, "the egress proxy did not answer within 15 s; starting the worker anyway");
    Ok(ip)
}

/// Removes a worker's egress proxy and its outbound network, if any: only
/// a container carrying this node's label, by its id.
pub async fn remove_proxy(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    worker_id: &str,
) -> Result<(), Error> {
    let name = proxy_name(worker_id);
    let id = match docker.inspect_container(&name, None).await {
        Ok(c) => {
            let ours = c.config.and_then(|c| c.labels).is_some_and(|l| {
                l.get(labels::NODE).map(String::as_str) == Some(node_id)
                    && l.get(labels::EGRESS_FOR).map(String::as_str) == Some(worker_id)
            });
            c.id.filter(|_| ours)
        }
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => None,
        Err(e) => return Err(Error::engine(e, "inspect egress proxy")),
    };
    let Some(id) = id else {
        return networks::remove(docker, pool, node_id, &name).await;
    };
    match docker
        .remove_container(
            &id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            }),
        )
        .await
    {
        Ok(())
        | Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(Error::engine(e, "remove egress proxy")),
    }
    networks::remove(docker, pool, node_id, &name).await
}

/// Removes the egress proxies (and their networks) of this node whose
/// worker is gone.
pub async fn collect_garbage(docker: &Docker, pool: &SubnetPool, node_id: &str, live: &[String]) {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}={node_id}", labels::NODE),
            labels::EGRESS_FOR.to_string(),
        ],
    )]);
    let mut owners: Vec<String> = Vec::new();
    if let Ok(list) = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters.clone()),
            ..Default::default()
        }))
        .await
    {
        owners.extend(
            list.into_iter()
                .filter_map(|c| c.labels.and_then(|mut l| l.remove(labels::EGRESS_FOR))),
        );
    }
    if let Ok(nets) = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filters),
        }))
        .await
    {
        owners.extend(
            nets.into_iter()
                .filter_map(|n| n.labels.and_then(|mut l| l.remove(labels::EGRESS_FOR))),
        );
    }
    owners.sort();
    owners.dedup();
    for w in owners.into_iter().filter(|w| !live.contains(w)) {
        match remove_proxy(docker, pool, node_id, &w).await {
            Ok(()) => info!(worker_id = %w, "removed an orphaned egress proxy"),
            Err(e) => {
                warn!(worker_id = %w, error = %e, "could not remove an orphaned egress proxy")
            }
        }
    }
}

/// The container the agent runs in, if it runs in one (Docker bind-mounts
/// `/etc/hostname` from `.../containers/<id>/`).
pub async fn own_container(docker: &Docker) -> Option<bollard::models::ContainerInspectResponse> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let id = container_id_from_mountinfo(&mountinfo)?;
    docker.inspect_container(&id, None).await.ok()
}

fn container_id_from_mountinfo(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let f = l.split(' ').nth(3)?;
        let rest = f.split("/containers/").nth(1)?;
        let (id, file) = rest.split_once('/')?;
        (file == "hostname" && id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_sits_at_the_last_host() {
        assert_eq!(
            proxy_ip("10.213.0.16/28".parse().unwrap()),
            "10.213.0.30".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn container_id_is_read_from_mountinfo() {
        let id = "a".repeat(64);
        let line = format!(
            "612 600 8:1 /var/lib/docker/containers/{id}/hostname /etc/hostname rw,relatime - ext4 /dev/sda1 rw"
        );
        assert_eq!(
            container_id_from_mountinfo(&format!("1 2 3 / / rw\n{line}\n")),
            Some(id)
        );
        assert_eq!(container_id_from_mountinfo("1 2 3 / / rw\n"), None);
    }
}
