//! Local policy: the node's last word. It can only narrow what the
//! orchestrator asks for; a request it forbids is refused with
//! `policy_denied` naming the rule. It also fills in the node's defaults.

use crate::config;
use crate::egress_proxy::Pattern;
use crate::protocol::{ErrorBody, ErrorCode, NetworkPolicy, SpawnRequest};

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Whose rules these are, for refusals: "node" or "orchestrator".
    pub source: &'static str,
    /// `sandbox.mode` is not `disabled`.
    pub sandbox_enabled: bool,
    /// 0 = unlimited.
    pub max_concurrency: u64,
    pub default_image: Option<String>,
    /// Empty = any; `prefix*` entries match by prefix.
    pub allowed_images: Vec<String>,
    /// 0 = no limit.
    pub max_cpu_cores: f64,
    pub max_memory_mb: u64,
    pub max_pids: u64,
    pub max_disk_mb: u64,
    /// 0 = none.
    pub default_timeout_secs: u64,
    /// 0 = no limit.
    pub max_timeout_secs: u64,
    pub allowed_host_paths: Vec<String>,
    pub read_only_by_default: bool,
    /// Every host mount read-only (`sandbox.mounts.force_read_only`).
    pub force_read_only: bool,
    pub allow_privileged: bool,
    pub allow_host_network: bool,
    pub allow_device_mounts: bool,
    /// `sandbox.default_network_policy`: the widest a spawn may ask for,
    /// and what it gets when it names none.
    pub default_network_policy: NetworkPolicy,
    /// `sandbox.allowed_egress_domains`: what `allowlist` workers reach.
    pub allowed_egress_domains: Vec<Pattern>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from_file(&config::Sandbox::default())
    }
}

fn denied_by(source: &str, rule: &str, what: String) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::PolicyDenied,
        format!("denied by {source} policy `{rule}`: {what}"),
    )
}

impl Policy {
    pub fn from_file(s: &config::Sandbox) -> Policy {
        Policy {
            source: "node",
            sandbox_enabled: s.mode != "disabled",
            max_concurrency: s.max_concurrency,
            default_image: (!s.default_image.is_empty()).then(|| s.default_image.clone()),
            allowed_images: s.allowed_images.clone(),
            max_cpu_cores: s.resources.max_cpu_cores,
            max_memory_mb: s.resources.max_memory_mb,
            max_pids: s.resources.max_pids,
            max_disk_mb: s.resources.max_disk_mb,
            default_timeout_secs: s.timeouts.default_seconds,
            max_timeout_secs: s.timeouts.max_seconds,
            allowed_host_paths: s.mounts.allowed_host_paths.clone(),
            read_only_by_default: s.mounts.read_only_by_default,
            force_read_only: s.mounts.force_read_only,
            allow_privileged: s.security.allow_privileged,
            allow_host_network: s.security.allow_host_network,
            allow_device_mounts: s.security.allow_device_mounts,
            // Both checked when the file (or pushed configuration) is read;
            // an unknown policy falls back to the narrowest.
            default_network_policy: s
                .default_network_policy
                .parse()
                .unwrap_or(NetworkPolicy::None),
            allowed_egress_domains: s
                .allowed_egress_domains
                .iter()
                .filter_map(|d| Pattern::parse(d).ok())
                .collect(),
        }
    }

    fn denied(&self, rule: &str, what: String) -> ErrorBody {
        denied_by(self.source, rule, what)
    }

    pub(crate) fn image_allowed(&self, image: &str) -> bool {
        self.allowed_images.is_empty()
            || self
                .allowed_images
                .iter()
                .any(|a| match a.strip_suffix('*') {
                    Some(prefix) => image.starts_with(prefix),
                    None => a == image,
                })
    }

    fn admit_timeout(&self, t: &mut Option<u64>) -> Result<(), ErrorBody> {
        if t.is_none() && self.default_timeout_secs > 0 {
            *t = Some(self.default_timeout_secs);
        }
        if self.max_timeout_secs > 0 {
            match *t {
                Some(s) if s > self.max_timeout_secs => {
                    return Err(self.denied(
                        "sandbox.timeouts.max_seconds",
                        format!(
                            "timeout {s} s exceeds the node's maximum of {} s",
                            self.max_timeout_secs
                        ),
                    ));
                }
                None => *t = Some(self.max_timeout_secs),
                _ => {}
            }
        }
        Ok(())
    }

    /// Checks a spawn against the node's rules and fills in its defaults.
    /// `running` is the number of workers running now.
    pub fn admit_spawn(&self, spec: &mut SpawnRequest, running: usize) -> Result<(), ErrorBody> {
        if !self.sandbox_enabled {
            return Err(self.denied("sandbox.mode", "sandboxes are disabled on this node".into()));
        }
        if self.max_concurrency > 0 && running as u64 >= self.max_concurrency {
            return Err(self.denied(
                "sandbox.max_concurrency",
                format!(
                    "{running} workers already run, the node allows {}",
                    self.max_concurrency
                ),
            ));
        }
        if spec.image.trim().is_empty()
            && let Some(d) = &self.default_image
        {
            spec.image = d.clone();
        }
        if !self.image_allowed(&spec.image) {
            return Err(self.denied(
                "sandbox.allowed_images",
                format!("image {:?} is not allowed", spec.image),
            ));
        }
        if spec.privileged && !self.allow_privileged {
            return Err(self.denied(
                "sandbox.security.allow_privileged",
                "privileged workers are not allowed".into(),
            ));
        }
        match spec.network.as_deref() {
            None => {}
            Some("host") if self.allow_host_network => {}
            Some("host") => {
                return Err(self.denied(
                    "sandbox.security.allow_host_network",
                    "host networking is not allowed".into(),
                ));
            }
            Some(other) => {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "network {other:?}: only \"host\" may be named (default: the worker's own bridge)"
                    ),
                ));
            }
        }
        self.admit_network_policy(spec)?;
        if !spec.devices.is_empty() && !self.allow_device_mounts {
            return Err(self.denied(
                "sandbox.security.allow_device_mounts",
                format!("devices {:?} are not allowed", spec.devices),
            ));
        }
        for m in &mut spec.mounts {
            let src = std::path::Path::new(&m.source);
            let clean = src.is_absolute()
                && src
                    .components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir));
            let allowed = clean && self.allowed_host_paths.iter().any(|a| src.starts_with(a));
            if !allowed {
                return Err(self.denied(
                    "sandbox.mounts.allowed_host_paths",
                    format!("host path {:?} is not under an allowed path", m.source),
                ));
            }
            if self.force_read_only && m.read_only == Some(false) {
                return Err(self.denied(
                    "sandbox.mounts.force_read_only",
                    format!("host path {:?} may only be mounted read-only", m.source),
                ));
            }
            if m.read_only.is_none() || self.force_read_only {
                m.read_only = Some(self.read_only_by_default || self.force_read_only);
            }
        }
        let r = &mut spec.resources;
        if self.max_cpu_cores > 0.0 {
            match r.cpus {
                Some(c) if c > self.max_cpu_cores => {
                    return Err(self.denied(
                        "sandbox.resources.max_cpu_cores",
                        format!("{c} CPUs requested, the node allows {}", self.max_cpu_cores),
                    ));
                }
                None => r.cpus = Some(self.max_cpu_cores.min(1.0)),
                _ => {}
            }
        }
        if self.max_memory_mb > 0 {
            match r.memory_mb {
                Some(m) if m > self.max_memory_mb => {
                    return Err(self.denied(
                        "sandbox.resources.max_memory_mb",
                        format!(
                            "{m} MB requested, the node allows {} MB",
                            self.max_memory_mb
                        ),
                    ));
                }
                None => r.memory_mb = Some(self.max_memory_mb.min(512)),
                _ => {}
            }
        }
        if self.max_pids > 0 {
            match r.pids {
                Some(p) if p as u64 > self.max_pids => {
                    return Err(self.denied(
                        "sandbox.resources.max_pids",
                        format!("{p} pids requested, the node allows {}", self.max_pids),
                    ));
                }
                None => r.pids = Some(self.max_pids.min(512) as i64),
                _ => {}
            }
        }
        if self.max_disk_mb > 0 {
            match r.disk_mb {
                Some(d) if d > self.max_disk_mb => {
                    return Err(self.denied(
                        "sandbox.resources.max_disk_mb",
                        format!(
                            "{d} MB of disk requested, the node allows {} MB",
                            self.max_disk_mb
                        ),
                    ));
                }
                None => r.disk_mb = Some(self.max_disk_mb),
                _ => {}
            }
        }
        self.admit_timeout(&mut spec.timeout_secs)
    }

    /// A spawn may only narrow the node's network policy (none < allowlist
    /// < restricted); one that names none gets the default. A host-network
    /// worker (allowed above) has the node's network: no policy applies.
    fn admit_network_policy(&self, spec: &mut SpawnRequest) -> Result<(), ErrorBody> {
        if spec.network.as_deref() == Some("host") {
            return match spec.network_policy {
                None => Ok(()),
                Some(p) => Err(ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "network \"host\" shares the node's network: network_policy {} cannot apply",
                        p.as_str()
                    ),
                )),
            };
        }
        let wanted = *spec
            .network_policy
            .get_or_insert(self.default_network_policy);
        // A privileged worker holds NET_ADMIN: it can take another source
        // address or turn IPv6 back on, past the guard and its proxy.
        if spec.privileged && wanted != NetworkPolicy::None {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "a privileged worker can change its own network, so network_policy {} cannot hold it: ask for network_policy none (or network host, where allowed)",
                    wanted.as_str()
                ),
            ));
        }
        if wanted > self.default_network_policy {
            return Err(self.denied(
                "sandbox.default_network_policy",
                format!(
                    "network policy {} is wider than the node's {} (none < allowlist < restricted)",
                    wanted.as_str(),
                    self.default_network_policy.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Checks an exec's timeout and fills in the default.
    pub fn admit_exec(&self, timeout_secs: &mut Option<u64>) -> Result<(), ErrorBody> {
        if !self.sandbox_enabled {
            return Err(self.denied("sandbox.mode", "sandboxes are disabled on this node".into()));
        }
        self.admit_timeout(timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Mount, Resources};

    fn strict() -> Policy {
        let s = config::Sandbox {
            allowed_images: vec!["tether-test-*".into(), "alpine:3".into()],
            max_concurrency: 2,
            resources: config::Resources {
                max_cpu_cores: 2.0,
                max_memory_mb: 256,
                max_pids: 100,
                max_disk_mb: 1024,
            },
            timeouts: config::Timeouts {
                default_seconds: 60,
                max_seconds: 600,
            },
            mounts: config::Mounts {
                allowed_host_paths: vec!["/srv/data".into()],
                read_only_by_default: true,
                force_read_only: false,
            },
            ..Default::default()
        };
        Policy::from_file(&s)
    }

    fn req(image: &str) -> SpawnRequest {
        SpawnRequest {
            image: image.into(),
            ..Default::default()
        }
    }

    fn rule(r: Result<(), ErrorBody>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied, "{e}");
        e.message.split('`').nth(1).unwrap().to_string()
    }

    #[test]
    fn each_rule_denies_with_its_name() {
        let p = strict();
        assert_eq!(
            rule(p.admit_spawn(&mut req("debian"), 0)),
            "sandbox.allowed_images"
        );
        assert_eq!(
            rule(p.admit_spawn(&mut req("tether-test-x"), 2)),
            "sandbox.max_concurrency"
        );
        let mut r = req("alpine:3");
        r.privileged = true;
        assert_eq!(
            rule(p.admit_spawn(&mut r, 0)),
            "sandbox.security.allow_privileged"
        );
        // Where privileged workers are allowed, only without a network
        // policy they could undo.
        let open = Policy {
            allow_privileged: true,
            default_network_policy: NetworkPolicy::Restricted,
            ..Policy::default()
        };
        for (policy, ok) in [
            (None, false),
            (Some(NetworkPolicy::Restricted), false),
            (Some(NetworkPolicy::Allowlist), false),
            (Some(NetworkPolicy::None), true),
        ] {
            let mut r = req("alpine:3");
            r.privileged = true;
            r.network_policy = policy;
            let got = open.admit_spawn(&mut r, 0);
            assert_eq!(got.is_ok(), ok, "{policy:?}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.code, ErrorCode::InvalidRequest);
            }
        }
        let mut r = req("alpine:3");
        r.network = Some("host".into());
        assert_eq!(
            rule(p.admit_spawn(&mut r, 0)),
            "sandbox.security.allow_host_network"
        );
        let mut r = req("alpine:3");
        r.devices = vec!["/dev/fuse".into()];
        assert_eq!(
            rule(p.admit_spawn(&mut r, 0)),
            "sandbox.security.allow_device_mounts"
        );
        for src in ["/etc", "/srv/data/../../etc", "srv/data"] {
            let mut r = req("alpine:3");
            r.mounts = vec![Mount {
                source: src.into(),
                target: "/d".into(),
                read_only: None,
            }];
            assert_eq!(
                rule(p.admit_spawn(&mut r, 0)),
                "sandbox.mounts.allowed_host_paths",
                "{src}"
            );
        }
        let mut forced = strict();
        forced.force_read_only = true;
        forced.read_only_by_default = false;
        let mut r = req("alpine:3");
        r.mounts = vec![Mount {
            source: "/srv/data/x".into(),
            target: "/d".into(),
            read_only: Some(false),
        }];
        assert_eq!(
            rule(forced.admit_spawn(&mut r, 0)),
            "sandbox.mounts.force_read_only"
        );
        r.mounts[0].read_only = None;
        forced.admit_spawn(&mut r, 0).unwrap();
        assert_eq!(r.mounts[0].read_only, Some(true));
        let mut r = req("alpine:3");
        r.resources = Resources {
            cpus: Some(4.0),
            ..Default::default()
        };
        assert_eq!(
            rule(p.admit_spawn(&mut r, 0)),
            "sandbox.resources.max_cpu_cores"
        );
        r.resources = Resources {
            memory_mb: Some(1024),
            ..Default::default()
        };
        assert_eq!(
            rule(p.admit_spawn(&mut r, 0)),
            "sandbox.resources.max_memory_mb"
        );
        r.resources = Resources {
            pids: Some(1000),
            ..Default::default()
        };
        assert_eq!(rule(p.admit_spawn(&mut r, 0)), "sandbox.resources.max_pids");
        r.resources = Resources {
            disk_mb: Some(2048),
            ..Default::default()
        };
        assert_eq!(
            rule(p.admit_spawn(&mut r, 0)),
            "sandbox.resources.max_disk_mb"
        );
        let mut r = req("alpine:3");
        r.timeout_secs = Some(601);
        assert_eq!(
            rule(p.admit_spawn(&mut r, 0)),
            "sandbox.timeouts.max_seconds"
        );
        assert_eq!(
            rule(p.admit_exec(&mut Some(9999))),
            "sandbox.timeouts.max_seconds"
        );
        let narrow = Policy::from_file(&config::Sandbox {
            default_network_policy: "allowlist".into(),
            ..Default::default()
        });
        let mut r = req("x");
        r.network_policy = Some(NetworkPolicy::Restricted);
        assert_eq!(
            rule(narrow.admit_spawn(&mut r, 0)),
            "sandbox.default_network_policy"
        );
        r.network_policy = Some(NetworkPolicy::None);
        narrow.admit_spawn(&mut r, 0).unwrap();
        let mut r = req("x");
        narrow.admit_spawn(&mut r, 0).unwrap();
        assert_eq!(r.network_policy, Some(NetworkPolicy::Allowlist));
        let off = config::Sandbox {
            mode: "disabled".into(),
            ..Default::default()
        };
        assert_eq!(
            rule(Policy::from_file(&off).admit_spawn(&mut req("x"), 0)),
            "sandbox.mode"
        );
    }

    #[test]
    fn allowed_requests_get_defaults() {
        let p = strict();
        let mut r = req("tether-test-busybox:latest");
        r.mounts = vec![Mount {
            source: "/srv/data/in".into(),
            target: "/in".into(),
            read_only: None,
        }];
        p.admit_spawn(&mut r, 1).unwrap();
        assert_eq!(
            r.resources,
            Resources {
                cpus: Some(1.0),
                memory_mb: Some(256),
                pids: Some(100),
                disk_mb: Some(1024),
            }
        );
        assert_eq!(r.timeout_secs, Some(60));
        assert_eq!(r.mounts[0].read_only, Some(true));
        let mut t = None;
        p.admit_exec(&mut t).unwrap();
        assert_eq!(t, Some(60));
        // The permissive default changes nothing but the network policy.
        let mut r = req("anything");
        Policy::default().admit_spawn(&mut r, 10_000).unwrap();
        assert_eq!(
            r,
            SpawnRequest {
                network_policy: Some(NetworkPolicy::Restricted),
                ..req("anything")
            }
        );
    }
}
