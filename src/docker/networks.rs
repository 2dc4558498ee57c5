//! Worker networks: one dedicated bridge per worker, each with a small subnet
//! carved from a configurable pool (Docker's default pools run out after
//! about 30 networks).

use super::{Error, labels};
use crate::protocol::{ErrorBody, ErrorCode};
use bollard::Docker;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptions;
use ipnet::Ipv4Net;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// Hands out non-overlapping subnets of `pool`, each `/prefix`.
pub struct SubnetPool {
    pool: Ipv4Net,
    prefix: u8,
    /// Subnets in use by any Docker network that overlaps the pool.
    used: Mutex<BTreeSet<Ipv4Net>>,
}

impl SubnetPool {
    pub fn new(pool: Ipv4Net, prefix: u8) -> Result<Self, String> {
        if prefix < pool.prefix_len() || prefix > 29 {
            return Err(format!(
                "worker subnet prefix /{prefix} must lie between the pool's /{} and /29",
                pool.prefix_len()
            ));
        }
        Ok(SubnetPool {
            pool: pool.trunc(),
            prefix,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn capacity(&self) -> u64 {
        1u64 << (self.prefix - self.pool.prefix_len())
    }

    /// Marks every subnet of existing Docker networks as used.
    pub async fn sync(&self, docker: &Docker) -> Result<(), Error> {
        let nets = docker
            .list_networks(None::<ListNetworksOptions>)
            .await
            .map_err(|e| Error::engine(e, "list networks"))?;
        let mut used = self.used.lock().unwrap();
        for n in nets {
            for c in n.ipam.and_then(|i| i.config).unwrap_or_default() {
                if let Some(net) = c.subnet.and_then(|s| s.parse::<Ipv4Net>().ok()) {
                    used.insert(net);
                }
            }
        }
        Ok(())
    }

    pub fn allocate(&self) -> Option<Ipv4Net> {
        let mut used = self.used.lock().unwrap();
        let free = self.pool.subnets(self.prefix).ok()?.find(|s| {
            !used
                .iter()
                .any(|u| u.contains(&s.network()) || s.contains(&u.network()))
        })?;
        used.insert(free);
        Some(free)
    }

    pub fn mark_used(&self, net: Ipv4Net) {
        self.used.lock().unwrap().insert(net);
    }

    pub fn release(&self, net: Ipv4Net) {
        self.used.lock().unwrap().remove(&net);
    }

    pub fn in_use(&self) -> usize {
        self.used
            .lock()
            .unwrap()
            .iter()
            .filter(|n| self.pool.contains(&n.network()))
            .count()
    }
}

/// A network the agent made: its id (what clean-up removes) and subnet.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: String,
    pub subnet: Ipv4Net,
}

fn name_taken(name: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Conflict,
        format!("a network named {name} already exists and tether did not create it"),
    )
}

/// What a worker network is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetKind {
    /// A worker's own bridge with a way out (`restricted`), or an egress
    /// proxy's way out: no traffic between its containers.
    Outbound,
    /// An `allowlist` worker's bridge: no route out (Docker `internal`);
    /// the worker and its egress proxy talk over it.
    Internal,
    /// A deployment's network: its services talk to each other, and the
    /// guard lets them (bridge prefix [`SHARED_BRIDGE_PREFIX`]); `internal`
    /// when the deployment may reach nothing outside.
    Shared { internal: bool },
}

/// Prefix of the Linux bridges of deployments' networks.
pub const SHARED_BRIDGE_PREFIX: &str = "tdep";

/// The sysctls of a container that holds its own network namespace on a
/// bridge (`network_mode` neither `none`, `host` nor `container:…`): IPv6 off.
/// tether's networks carry IPv4 only and the node's guard matches IPv4
/// only; engines since 26 turn IPv6 off in such containers themselves,
/// older ones leave link-local addresses through which a worker could reach
/// the host's services listening on `[::]`. `None` where the kernel has no
/// IPv6 (the engine would refuse the sysctl) or no namespace of its own is
/// made.
pub fn ipv6_off(network_mode: &str) -> Option<HashMap<String, String>> {
    // `host` shares the node's namespace: the engine refuses the sysctl there.
    let own = !matches!(network_mode, "none" | "host") && !network_mode.starts_with("container:");
    (own && std::path::Path::new("/proc/sys/net/ipv6/conf/all").exists()).then(|| {
        ["all", "default"]
            .into_iter()
            .map(|c| (format!("net.ipv6.conf.{c}.disable_ipv6"), "1".to_string()))
            .collect()
    })
}

/// Name of the Linux bridge of the network on `subnet`: fixed by tether
/// (unique, as subnets are) so the agent can check that the bridge is in
/// its own network namespace, where its guard applies.
pub fn bridge_name(subnet: Ipv4Net) -> String {
    format!("tether{:08x}", u32::from(subnet.network()))
}

/// Name of the Linux bridge of a deployment's network on `subnet`.
pub fn shared_bridge_name(subnet: Ipv4Net) -> String {
    format!("{SHARED_BRIDGE_PREFIX}{:08x}", u32::from(subnet.network()))
}

/// Creates the dedicated bridge network of a worker on a fresh subnet.
pub async fn create(
    docker: &Docker,
    pool: &SubnetPool,
    name: &str,
    object_labels: &HashMap<String, String>,
) -> Result<Created, Error> {
    create_kind(docker, pool, name, object_labels, NetKind::Outbound).await
}

/// Creates a worker network of `kind` on a fresh subnet. A name that is
/// taken is a `conflict`: older engines (API < 1.44) accept duplicate
/// network names, so the name is checked before and after.
pub async fn create_kind(
    docker: &Docker,
    pool: &SubnetPool,
    name: &str,
    object_labels: &HashMap<String, String>,
    kind: NetKind,
) -> Result<Created, Error> {
    if !same_name(docker, name).await?.is_empty() {
        return Err(name_taken(name).into());
    }
    // A subnet may be taken behind our back (another agent or tool on the
    // engine): it stays marked used; re-read the engine's networks and retry.
    for attempt in 0..32 {
        if attempt > 0 {
            pool.sync(docker).await?;
        }
        let subnet = pool.allocate().ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "no free worker subnet left in the pool ({} subnets)",
                    pool.capacity()
                ),
            )
        })?;
        let gateway = subnet.hosts().next().map(|g| g.to_string());
        let (internal, icc, bridge) = match kind {
            NetKind::Outbound => (false, false, bridge_name(subnet)),
            NetKind::Internal => (true, true, bridge_name(subnet)),
            NetKind::Shared { internal } => (internal, true, shared_bridge_name(subnet)),
        };
        let req = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            internal: Some(internal),
            // The guard filters IPv4: IPv6 stays off even where the
            // daemon's `default-network-opts` would turn it on.
            enable_ipv6: Some(false),
            attachable: Some(false),
            ipam: Some(Ipam {
                driver: Some("default".into()),
                config: Some(vec![IpamConfig {
                    subnet: Some(subnet.to_string()),
                    gateway,
                    ..Default::default()
                }]),
                options: None,
            }),
            labels: Some(object_labels.clone()),
            options: Some(HashMap::from([
                (
                    "com.docker.network.bridge.enable_icc".to_string(),
                    icc.to_string(),
                ),
                ("com.docker.network.bridge.name".to_string(), bridge),
            ])),
            ..Default::default()
        };
        match docker.create_network(req).await {
            Ok(r) => {
                let id = r.id;
                // Someone made a network of the same name meanwhile: ours
                // goes, theirs stays.
                if same_name(docker, name).await?.len() > 1 {
                    let _ = docker.remove_network(&id).await;
                    pool.release(subnet);
                    return Err(name_taken(name).into());
                }
                return Ok(Created { id, subnet });
            }
            Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                if message.contains("overlap") =>
            {
                continue;
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                pool.release(subnet);
                return Err(name_taken(name).into());
            }
            Err(e) => {
                pool.release(subnet);
                return Err(Error::engine(e, "create network"));
            }
        }
    }
    Err(ErrorBody::new(
        ErrorCode::Unavailable,
        "could not find a free subnet for the worker network",
    )
    .into())
}

/// Ids of the networks named exactly `name` (the engine's name filter
/// matches substrings).
async fn same_name(docker: &Docker, name: &str) -> Result<Vec<String>, Error> {
    let nets = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(HashMap::from([(
                "name".to_string(),
                vec![name.to_string()],
            )])),
        }))
        .await
        .map_err(|e| Error::engine(e, "list networks"))?;
    Ok(nets
        .into_iter()
        .filter(|n| n.name.as_deref() == Some(name))
        .filter_map(|n| n.id)
        .collect())
}

/// Removes a worker network of this node and returns its subnet to the
/// pool. Only a network carrying this node's labels is removed, by its id;
/// one that is gone, or is not ours, is left alone.
pub async fn remove(
    docker: &Docker,
    pool: &SubnetPool,
    node_id: &str,
    name_or_id: &str,
) -> Result<(), Error> {
    let net = match docker.inspect_network(name_or_id, None).await {
        Ok(n) => n,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(()),
        Err(e) => return Err(Error::engine(e, "inspect network")),
    };
    let lbls = net.labels.unwrap_or_default();
    // Worker networks and egress proxies' networks both carry the node's
    // label; nobody else can set a `tether.` label through tether.
    let ours = lbls.get(labels::NODE).map(String::as_str) == Some(node_id);
    let Some(id) = net.id.filter(|_| ours) else {
        tracing::warn!(network = %name_or_id, "not removing a network tether did not create");
        return Ok(());
    };
    let subnet = subnet_of(net.ipam);
    match docker.remove_network(&id).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(Error::engine(e, "remove network")),
    }
    if let Some(s) = subnet {
        pool.release(s);
    }
    Ok(())
}

/// The IPv4 subnet of a network, from its IPAM settings.
pub fn subnet_of(ipam: Option<bollard::models::Ipam>) -> Option<Ipv4Net> {
    ipam.and_then(|i| i.config)
        .and_then(|c| c.into_iter().find_map(|c| c.subnet))
        .and_then(|s| s.parse::<Ipv4Net>().ok())
}

/// Names of the networks tether made on this node.
pub async fn list_managed(docker: &Docker, node_id: &str) -> Result<Vec<String>, Error> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={node_id}", labels::NODE),
        ],
    )]);
    let nets = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filters),
        }))
        .await
        .map_err(|e| Error::engine(e, "list networks"))?;
    Ok(nets.into_iter().filter_map(|n| n.name).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_turned_off_only_in_namespaces_of_their_own() {
        assert_eq!(ipv6_off("none"), None);
        assert_eq!(ipv6_off("container:abc"), None);
        let own = ipv6_off("tether-w1");
        if std::path::Path::new("/proc/sys/net/ipv6/conf/all").exists() {
            let own = own.unwrap();
            assert_eq!(own["net.ipv6.conf.all.disable_ipv6"], "1");
            assert_eq!(own["net.ipv6.conf.default.disable_ipv6"], "1");
        } else {
            assert_eq!(own, None);
        }
    }

    #[test]
    fn allocates_disjoint_subnets_and_reuses_released() {
        let pool = SubnetPool::new("10.99.0.0/24".parse().unwrap(), 28).unwrap();
        assert_eq!(pool.capacity(), 16);
        pool.mark_used("10.99.0.16/28".parse().unwrap());
        // A foreign, larger network that overlaps part of the pool.
        pool.mark_used("10.99.0.128/25".parse().unwrap());
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_eq!(a.to_string(), "10.99.0.0/28");
        assert_eq!(b.to_string(), "10.99.0.32/28");
        let mut n = 2;
        while pool.allocate().is_some() {
            n += 1;
        }
        assert_eq!(n, 7, "16 - 1 used - 8 under the /25");
        pool.release(a);
        assert_eq!(pool.allocate(), Some(a));
    }

    #[test]
    fn rejects_bad_prefix() {
        assert!(SubnetPool::new("10.0.0.0/24".parse().unwrap(), 16).is_err());
        assert!(SubnetPool::new("10.0.0.0/16".parse().unwrap(), 30).is_err());
    }
}
