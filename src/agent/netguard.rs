//! The network guard of `restricted` and `allowlist` workers: one nftables
//! table of the agent's own, `inet tether-<node id>`, installed (replacing
//! any left over) when the agent starts and deleted when it stops.
//!
//! - `input` chain: packets from the worker pool to the host itself are
//!   dropped (a host service on 0.0.0.0 or on a bridge gateway does not
//!   answer a worker), except replies on connections the host opened.
//! - `forward` chain (routed traffic, and bridged traffic too: Docker turns
//!   on `br_netfilter`): from the pool, to the pool itself (other workers;
//!   the exceptions are an allowlist worker's own egress proxy and a
//!   deployment's services among themselves), to the
//!   private, loopback, link-local (cloud metadata), CGNAT, multicast and
//!   reserved ranges: dropped, unless the node lists the range in
//!   `sandbox.allowed_private_cidrs`. DNS (port 53) to the node's own
//!   resolvers stays open, so Docker's embedded DNS keeps working for
//!   workers when the upstream resolver has a private address.
//!
//! A drop in any base chain is final, so Docker's own tables are left as
//! they are and still apply after ours. IPv6: Docker turns IPv6 off inside
//! containers whose networks have none, and tether's networks have none.

use super::nft::{self, Chain, Hook, Match, Rule, Verdict};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

/// Ranges a `restricted` worker never reaches unless allowed by CIDR.
pub const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    // Azure's host endpoint (WireServer): goal state, extension settings
    // and certificates of the VM, for anyone who reaches it.
    "168.63.129.16/32",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// What the guard needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardSpec {
    /// The worker subnet pool.
    pub pool: Ipv4Net,
    /// Prefix of each worker subnet (an allowlist worker's proxy sits at
    /// the last host address of its subnet).
    pub subnet_prefix: u8,
    /// `sandbox.allowed_private_cidrs`.
    pub allowed_private: Vec<Ipv4Net>,
    /// The node's DNS resolvers (from /etc/resolv.conf).
    pub resolvers: Vec<Ipv4Addr>,
}

/// The table's name for a node.
pub fn table_name(node_id: &str) -> String {
    format!("tether-{node_id}")
}

/// Host part of the proxy's address in every worker subnet: the last host.
pub fn proxy_host_part(subnet_prefix: u8) -> u32 {
    (1u32 << (32 - u32::from(subnet_prefix))) - 2
}

/// The chains of the table.
pub fn chains(spec: &GuardSpec) -> Vec<Chain> {
    let pool = Match::Saddr(spec.pool.network(), spec.pool.prefix_len());
    let from_pool = |mut m: Vec<Match>, verdict| {
        let mut matches = vec![Match::Ipv4, pool.clone()];
        matches.append(&mut m);
        Rule { matches, verdict }
    };
    let established = Rule {
        matches: vec![Match::EstablishedOrRelated],
        verdict: Verdict::Accept,
    };
    let input = Chain {
        name: "input".into(),
        hook: Hook::Input,
        priority: 0,
        rules: vec![established.clone(), from_pool(vec![], Verdict::Drop)],
    };
    let to_pool = Match::Daddr(spec.pool.network(), spec.pool.prefix_len());
    let mut fwd = vec![
        established,
        // An allowlist worker to its own proxy (same bridge: another
        // subnet's proxy is behind Docker's isolation between networks).
        from_pool(
            vec![
                to_pool.clone(),
                Match::DaddrHostPart(spec.subnet_prefix, proxy_host_part(spec.subnet_prefix)),
                Match::L4Proto(6),
                Match::Dport(crate::egress_proxy::PORT),
            ],
            Verdict::Accept,
        ),
        // A deployment's services to each other, on their shared bridge
        // (between two bridges, Docker's isolation between networks drops).
        from_pool(
            vec![
                to_pool.clone(),
                Match::IifnamePrefix(crate::docker::networks::SHARED_BRIDGE_PREFIX),
                Match::OifnamePrefix(crate::docker::networks::SHARED_BRIDGE_PREFIX),
            ],
            Verdict::Accept,
        ),
        from_pool(vec![to_pool], Verdict::Drop),
    ];
    let blocked: Vec<Ipv4Net> = BLOCKED.iter().map(|b| b.parse().expect("valid")).collect();
    for r in &spec.resolvers {
        if blocked.iter().any(|b| b.contains(r)) {
            for proto in [17, 6] {
                fwd.push(from_pool(
                    vec![
                        Match::Daddr(*r, 32),
                        Match::L4Proto(proto),
                        Match::Dport(53),
                    ],
                    Verdict::Accept,
                ));
            }
        }
    }
    for a in &spec.allowed_private {
        fwd.push(from_pool(
            vec![Match::Daddr(a.network(), a.prefix_len())],
            Verdict::Accept,
        ));
    }
    for b in &blocked {
        fwd.push(from_pool(
            vec![Match::Daddr(b.network(), b.prefix_len())],
            Verdict::Drop,
        ));
    }
    let forward = Chain {
        name: "forward".into(),
        hook: Hook::Forward,
        priority: 0,
        rules: fwd,
    };
    vec![input, forward]
}

/// IPv4 name servers of a resolv.conf.
pub fn resolvers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// The installed table; [`NetGuard::release`] ends it.
#[derive(Debug, Clone)]
pub struct NetGuard {
    table: String,
    chains: Vec<Chain>,
}

/// How often [`keep`] puts the table back as installed.
pub const REASSERT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl NetGuard {
    /// Installs (or replaces) the node's table.
    pub fn install(node_id: &str, spec: &GuardSpec) -> Result<NetGuard, String> {
        let table = table_name(node_id);
        let chains = chains(spec);
        nft::replace_table(&table, &chains).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (the agent needs CAP_NET_ADMIN: run it as root, or its container with --cap-add NET_ADMIN)"
            } else {
                ""
            };
            format!("cannot install nftables table inet {table}: {e}{hint}")
        })?;
        Ok(NetGuard { table, chains })
    }

    /// Puts the table back as installed, in one transaction (there is no
    /// moment without it).
    fn reassert(&self) -> std::io::Result<()> {
        nft::replace_table(&self.table, &self.chains)
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

impl NetGuard {
    /// The agent is ending: the table goes only when no container of the
    /// node is left for it to guard. Workers outlive the agent (a stop, an
    /// upgrade, a refused registration) and deployment services restart
    /// without it; they stay guarded until the next agent replaces the
    /// table. An engine that cannot be asked keeps it too.
    pub async fn release(self, docker: &bollard::Docker, node_id: &str) {
        let left = crate::docker::containers::count_of_node(docker, node_id).await;
        match left {
            Ok(0) => match nft::delete_table(&self.table) {
                Ok(()) => tracing::info!(table = %self.table, "removed the network guard"),
                Err(e) => {
                    tracing::warn!(table = %self.table, error = %e, "could not remove the network guard")
                }
            },
            Ok(n) => tracing::info!(table = %self.table, containers = n,
                "network guard left in place for the node's containers"),
            Err(e) => tracing::warn!(table = %self.table, error = %e,
                "network guard left in place: the engine could not list the node's containers"),
        }
    }
}

/// Puts the guard back as installed every [`REASSERT_EVERY`], for as long
/// as it runs (the agent's task, ended with the agent): a firewall reload
/// or `nft flush ruleset` may have removed or changed it, and the node's
/// workers would run unguarded from then on.
pub async fn keep(guard: NetGuard) {
    let mut tick = tokio::time::interval(REASSERT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now: it was just installed
    loop {
        tick.tick().await;
        let g = guard.clone();
        // A netlink round trip: off the agent's runtime thread.
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || g.reassert()).await {
            tracing::warn!(table = %guard.table, error = %e, "could not put the network guard back");
        }
    }
}

/// Whether the worker network's bridge is in the agent's network
/// namespace: the guard applies only there (an agent container without
/// `--network host` would guard its own namespace, not the workers').
pub fn bridge_visible(bridge: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(bridge).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_the_spec() {
        let spec = GuardSpec {
            pool: "10.213.0.0/16".parse().unwrap(),
            subnet_prefix: 28,
            allowed_private: vec!["192.168.5.0/24".parse().unwrap()],
            resolvers: resolvers("# x\nnameserver 10.255.255.53\nnameserver 203.0.113.53\n"),
        };
        assert_eq!(spec.resolvers.len(), 2);
        let c = chains(&spec);
        assert_eq!(c[0].hook, Hook::Input);
        assert_eq!(c[0].rules.len(), 2);
        let f = &c[1].rules;
        // established, proxy, deployment bridges, pool, 2 DNS (private
        // resolver only), 1 allowed, blocked
        assert_eq!(f.len(), 4 + 2 + 1 + BLOCKED.len());
        // Pool to pool is accepted only from one deployment bridge to one.
        assert!(f[2].matches.contains(&Match::IifnamePrefix("tdep")));
        assert!(f[2].matches.contains(&Match::OifnamePrefix("tdep")));
        assert_eq!(
            (f[2].verdict, f[3].verdict),
            (Verdict::Accept, Verdict::Drop)
        );
        assert_eq!(f[6].verdict, Verdict::Accept);
        assert!(
            f[6].matches
                .contains(&Match::Daddr("192.168.5.0".parse().unwrap(), 24))
        );
        assert!(f[7..].iter().all(|r| r.verdict == Verdict::Drop));
        assert_eq!(proxy_host_part(28), 14);
    }
}
