//! The node's state and the decisions made from it: the local policy, the
//! configuration the orchestrator pushed, what the node reports about
//! itself and whether its runtime answers. Every admission check reads the
//! two policies here, in one place; nothing in it touches Docker, so it is
//! tested without an engine.

use super::nodeconfig::Applied;
use super::{capabilities, policy::Policy};
use crate::docker::egress::{NetPlan, ProxySpec};
use crate::protocol::{ErrorBody, ErrorCode, InferenceStatus, NetworkPolicy, SpawnRequest};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What the node is and may do; owned by the agent, shared by its tasks.
pub(crate) struct NodeState {
    /// What the node says about itself in its capability report.
    pub identity: capabilities::Identity,
    /// Where state lives (pushed configuration, measured free storage).
    pub state_dir: PathBuf,
    /// The node's local policy: the last word on every request.
    pub policy: Policy,
    /// Largest control message the node file allows.
    max_request_bytes: usize,
    /// How often to ask for newer configuration, if at all.
    pub config_poll: Option<Duration>,
    /// Whether the nftables guard is in place, or why not (`restricted`
    /// and `allowlist` workers are refused without it).
    pub guard: Result<(), String>,
    /// Image of egress proxies, if the node has one.
    pub egress_image: Option<String>,
    /// Test hook: fixed name answers for egress proxies.
    pub egress_resolve: Vec<String>,
    /// Tunnels go through a relay sidecar, not a dial to the worker.
    pub tunnel_relay: bool,
    /// Host paths no worker may mount.
    pub protected: super::mounts::Protected,
    /// The configuration pushed by the orchestrator, in force.
    applied: Mutex<Option<Applied>>,
    /// Held while a pushed configuration is applied (one at a time).
    pub(crate) configuring: tokio::sync::Mutex<()>,
    /// The last capability report sent: its hash and the inference status
    /// it carried.
    reported: Mutex<Option<(String, InferenceStatus)>>,
    /// Docker did not answer the last probe: new work is refused.
    degraded: AtomicBool,
    /// Where the node's inference backend stands.
    inference: Mutex<InferenceStatus>,
    /// Held while the inference backend is changed (one change at a time).
    pub(crate) inference_lock: tokio::sync::Mutex<()>,
}

/// How a [`NodeState`] starts.
pub(crate) struct NodeSetup {
    pub identity: capabilities::Identity,
    pub state_dir: PathBuf,
    pub policy: Policy,
    pub max_request_bytes: usize,
    pub config_poll: Option<Duration>,
    pub guard: Result<(), String>,
    pub egress_image: Option<String>,
    pub egress_resolve: Vec<String>,
    pub tunnel_relay: bool,
    pub protected: super::mounts::Protected,
    /// The configuration applied before a restart, if any.
    pub applied: Option<Applied>,
}

impl NodeState {
    pub(crate) fn new(s: NodeSetup) -> Self {
        let inference = InferenceStatus {
            supported: s.identity.inference_enabled,
            ..Default::default()
        };
        NodeState {
            identity: s.identity,
            state_dir: s.state_dir,
            policy: s.policy,
            max_request_bytes: s.max_request_bytes,
            config_poll: s.config_poll,
            guard: s.guard,
            egress_image: s.egress_image,
            egress_resolve: s.egress_resolve,
            tunnel_relay: s.tunnel_relay,
            protected: s.protected,
            applied: Mutex::new(s.applied),
            configuring: Default::default(),
            reported: Default::default(),
            degraded: Default::default(),
            inference: Mutex::new(inference),
            inference_lock: Default::default(),
        }
    }

    pub(crate) fn inference(&self) -> InferenceStatus {
        self.inference.lock().unwrap().clone()
    }

    pub(crate) fn set_inference(&self, status: InferenceStatus) {
        *self.inference.lock().unwrap() = status;
    }

    /// The pushed configuration in force, if any.
    pub(crate) fn applied(&self) -> Option<Applied> {
        self.applied.lock().unwrap().clone()
    }

    pub(crate) fn set_applied(&self, applied: Applied) {
        *self.applied.lock().unwrap() = Some(applied);
    }

    /// Version of the pushed configuration in force, if any.
    pub(crate) fn config_version(&self) -> Option<String> {
        self.applied
            .lock()
            .unwrap()
            .as_ref()
            .map(|a| a.config.config_version.clone())
    }

    /// Whether a report of this hash differs from the last one sent.
    pub(crate) fn report_changed(&self, hash: &str) -> bool {
        self.reported
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|(h, _)| h != hash)
    }

    /// Remembers a report that was sent.
    pub(crate) fn reported(&self, report: &super::capabilities::CapabilityReport) {
        let kept = (report.hash(), report.inference.status.clone());
        *self.reported.lock().unwrap() = Some(kept);
    }

    /// Whether the inference backend stands otherwise than the last report
    /// sent says (a report made while the server was away was not sent).
    pub(crate) fn inference_unreported(&self) -> bool {
        let now = self.inference();
        self.reported
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|(_, said)| *said != now)
    }

    pub(crate) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    pub(crate) fn set_degraded(&self, degraded: bool) {
        self.degraded.store(degraded, Ordering::Relaxed);
    }

    /// The orchestrator's pushed policy, if a configuration is applied.
    fn orchestrator_policy(&self) -> Option<Policy> {
        self.applied
            .lock()
            .unwrap()
            .as_ref()
            .map(|a| a.policy.clone())
    }

    /// The node's own policy first (it has the last word), then the
    /// orchestrator's, which can only narrow it.
    pub(crate) fn admit_spawn(
        &self,
        spec: &mut SpawnRequest,
        running: usize,
    ) -> Result<(), ErrorBody> {
        if spec.inference && spec.network.as_deref() == Some("host") {
            // Its proxy would listen on the node's own loopback.
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "inference needs a network namespace of the job's own: not with network host",
            ));
        }
        if spec.inference
            && let Some(e) = self.no_inference()
        {
            return Err(e);
        }
        let orchestrator = self.orchestrator_policy();
        // No policy named: the narrower of the two defaults.
        if spec.network_policy.is_none() && spec.network.as_deref() != Some("host") {
            let node = self.policy.default_network_policy;
            spec.network_policy = Some(
                orchestrator
                    .as_ref()
                    .map_or(node, |o| node.min(o.default_network_policy)),
            );
        }
        self.policy.admit_spawn(spec, running)?;
        orchestrator.map_or(Ok(()), |p| p.admit_spawn(spec, running))
    }

    /// Why the policies in force now would refuse a container that exists
    /// (made under wider ones), if they would: `spec` is what it was made
    /// with ([`crate::docker::containers::as_asked`]). Only a refusal by
    /// policy counts; limits are compared, not filled in.
    pub(crate) fn readmit(
        &self,
        mut spec: SpawnRequest,
        roots: Option<&[(PathBuf, PathBuf)]>,
    ) -> Option<ErrorBody> {
        // A bind's source is the path the engine mounts, resolved below an
        // allowed root's real path: judged under any root it can be
        // written under (a root that is a link, or several roots, one a
        // link into another). A root that cannot be resolved now (a mount
        // not up yet) leaves the host paths unjudged rather than
        // mistaken.
        match roots {
            None => spec.mounts.clear(),
            Some(roots) => {
                for m in &mut spec.mounts {
                    let src = PathBuf::from(&m.source);
                    let aliases = roots
                        .iter()
                        .filter_map(|(a, real)| Some(a.join(src.strip_prefix(real).ok()?)));
                    if let Some(p) = std::iter::once(src.clone())
                        .chain(aliases)
                        .find(|p| self.host_path_allowed(p))
                    {
                        m.source = p.to_string_lossy().into_owned();
                    }
                }
            }
        }
        match self.admit_spawn(&mut spec, 0) {
            Err(e) if e.code == ErrorCode::PolicyDenied => Some(e),
            _ => None,
        }
    }

    /// The node policy's allowed roots with their real paths, for
    /// [`readmit`](Self::readmit); `None` if one cannot be resolved now.
    pub(crate) fn resolved_roots(&self) -> Option<Vec<(PathBuf, PathBuf)>> {
        self.policy
            .allowed_host_paths
            .iter()
            .map(|a| Some((PathBuf::from(a), std::fs::canonicalize(a).ok()?)))
            .collect()
    }

    /// Whether both policies allow host path `p` (as a spawn writes it).
    fn host_path_allowed(&self, p: &std::path::Path) -> bool {
        let under = |allowed: &[String]| allowed.iter().any(|a| p.starts_with(a));
        under(&self.policy.allowed_host_paths)
            && self
                .orchestrator_policy()
                .is_none_or(|o| under(&o.allowed_host_paths))
    }

    /// Why a job cannot have inference here, if it cannot: the node turned
    /// it off, or its backend does not run or answer.
    fn no_inference(&self) -> Option<ErrorBody> {
        if !self.identity.inference_enabled {
            return Some(ErrorBody::new(
                ErrorCode::PolicyDenied,
                "inference is disabled on this node (its inference.mode is not allow, or its sandbox.mode is sandbox_only)",
            ));
        }
        let s = self.inference();
        if s.running && s.healthy {
            return None;
        }
        let why = match (s.running, s.note) {
            (_, Some(note)) => note,
            (false, None) => "no inference backend runs on this node".into(),
            (true, None) => "the node's inference backend does not answer".into(),
        };
        Some(ErrorBody::new(ErrorCode::Unavailable, why))
    }

    /// How to build an admitted spawn's network.
    pub(crate) fn net_plan(&self, spec: &SpawnRequest) -> Result<NetPlan, ErrorBody> {
        if spec.network.as_deref() == Some("host") {
            return Ok(NetPlan::Host);
        }
        Ok(match spec.network_policy.unwrap_or(NetworkPolicy::None) {
            NetworkPolicy::None => NetPlan::None,
            NetworkPolicy::Restricted => NetPlan::Restricted,
            NetworkPolicy::Allowlist => {
                let Some(image) = self.egress_image.clone() else {
                    return Err(ErrorBody::new(
                        ErrorCode::Unsupported,
                        "network policy allowlist cannot be enforced on this node: it needs the \
                         egress proxy image (run the agent from its image, or pass \
                         --egress-proxy-image)",
                    ));
                };
                let narrower = self
                    .orchestrator_policy()
                    .map(|o| o.allowed_egress_domains)
                    .unwrap_or_default();
                let allow =
                    crate::egress_proxy::intersect(&self.policy.allowed_egress_domains, &narrower)
                        .iter()
                        .map(|p| p.to_string())
                        .collect();
                NetPlan::Allowlist(ProxySpec {
                    image,
                    allow,
                    resolve: self.egress_resolve.clone(),
                })
            }
        })
    }

    /// Why the network guard is missing, if it is.
    pub(crate) fn guard(&self) -> Result<(), &str> {
        self.guard.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// Whether the node's or the orchestrator's policy caps running workers.
    pub(crate) fn concurrency_limited(&self) -> bool {
        self.policy.max_concurrency > 0
            || self
                .orchestrator_policy()
                .is_some_and(|p| p.max_concurrency > 0)
    }

    pub(crate) fn admit_exec(&self, timeout_secs: &mut Option<u64>) -> Result<(), ErrorBody> {
        self.policy.admit_exec(timeout_secs)?;
        self.orchestrator_policy()
            .map_or(Ok(()), |p| p.admit_exec(timeout_secs))
    }

    /// Largest control message accepted: the node file's
    /// `worker_api.max_request_bytes`, narrowed by a pushed
    /// `constraints.max_request_bytes`.
    pub(crate) fn request_limit(&self) -> usize {
        let pushed = self
            .applied
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|a| a.config.constraints.max_request_bytes)
            .map(|b| b.max(1024) as usize);
        pushed.map_or(self.max_request_bytes, |p| p.min(self.max_request_bytes))
    }

    /// Pull credentials for `image` from the applied configuration.
    pub(crate) fn credentials(&self, image: &str) -> Option<bollard::auth::DockerCredentials> {
        let host = image
            .split('/')
            .next()
            .filter(|h| {
                image.contains('/') && (h.contains('.') || h.contains(':') || *h == "localhost")
            })
            .unwrap_or("docker.io");
        self.applied
            .lock()
            .unwrap()
            .as_ref()?
            .config
            .registries
            .iter()
            .find(|r| r.server == host)
            .map(|r| bollard::auth::DockerCredentials {
                username: Some(r.username.clone()),
                password: Some(r.password.clone()),
                serveraddress: Some(r.server.clone()),
                ..Default::default()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::NodeConfig;

    fn node(policy: Policy, applied: Option<NodeConfig>) -> NodeState {
        NodeState::new(NodeSetup {
            identity: Default::default(),
            state_dir: PathBuf::from("/nonexistent"),
            policy,
            max_request_bytes: 1 << 20,
            config_poll: None,
            guard: Ok(()),
            egress_image: None,
            egress_resolve: Vec::new(),
            tunnel_relay: false,
            protected: Default::default(),
            applied: applied.map(|config| Applied {
                policy: super::super::nodeconfig::interpret(&config).expect("valid push"),
                hash: super::super::nodeconfig::hash(&config),
                config,
            }),
        })
    }

    fn push(yaml_sandbox: serde_json::Value) -> NodeConfig {
        NodeConfig {
            version: 1,
            config_version: ulid::Ulid::new().to_string(),
            policy: crate::protocol::ConfigPolicy {
                sandbox: Some(yaml_sandbox),
            },
            ..Default::default()
        }
    }

    fn spec(image: &str) -> SpawnRequest {
        SpawnRequest {
            image: image.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_worker_is_judged_again_by_its_resolved_host_paths() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let allowing = |paths: Vec<String>| {
            node(
                Policy {
                    allowed_host_paths: paths,
                    ..Default::default()
                },
                None,
            )
        };
        // Made under the allowed root `link`: the engine mounts the real
        // path, which is still allowed.
        let mut made = spec("busybox");
        made.network_policy = Some(NetworkPolicy::None);
        made.mounts = vec![crate::protocol::Mount {
            source: real.join("sub").to_string_lossy().into_owned(),
            target: "/data".into(),
            read_only: Some(true),
        }];
        let link_only = allowing(vec![link.to_string_lossy().into_owned()]);
        let judge = |n: &NodeState, made: &SpawnRequest| {
            n.readmit(made.clone(), n.resolved_roots().as_deref())
        };
        assert!(judge(&link_only, &made).is_none());
        // With the root gone from the policy, it is refused by that rule.
        let e = judge(&allowing(vec![]), &made).expect("refused");
        assert!(e.message.contains("allowed_host_paths"), "{}", e.message);
        // Two roots, one a link into the other: the path is judged under
        // whichever the policies allow (here only `real`'s parent).
        let both = allowing(vec![
            link.to_string_lossy().into_owned(),
            dir.path().to_string_lossy().into_owned(),
        ]);
        assert!(judge(&both, &made).is_none());
        // A root that cannot be resolved now leaves host paths unjudged.
        let gone = allowing(vec!["/nonexistent/tether-root".into()]);
        assert!(judge(&gone, &made).is_none());
        // Only refusals by policy count.
        made.mounts.clear();
        made.network = Some("bridge".into());
        assert!(judge(&allowing(vec![]), &made).is_none());
    }

    #[test]
    fn a_spawn_naming_no_policy_gets_the_narrower_default() {
        let node_policy = Policy {
            default_network_policy: NetworkPolicy::Restricted,
            ..Default::default()
        };
        let n = node(
            node_policy.clone(),
            Some(push(serde_json::json!({"default_network_policy": "none"}))),
        );
        let mut s = spec("img");
        n.admit_spawn(&mut s, 0).unwrap();
        assert_eq!(s.network_policy, Some(NetworkPolicy::None));

        // Without a push, the node's own default.
        let n = node(node_policy, None);
        let mut s = spec("img");
        n.admit_spawn(&mut s, 0).unwrap();
        assert_eq!(s.network_policy, Some(NetworkPolicy::Restricted));
    }

    #[test]
    fn a_job_asking_for_inference_is_refused_with_the_reason() {
        let mut n = node(Policy::default(), None);
        let mut s = SpawnRequest {
            inference: true,
            ..spec("img")
        };
        let e = n.admit_spawn(&mut s, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied, "{e}");
        assert!(e.message.contains("disabled"), "{e}");
        n.identity.inference_enabled = true;
        let e = n.admit_spawn(&mut s, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
        assert!(e.message.contains("no inference backend runs"), "{e}");
        // Running but not answering: refused, saying so.
        let running = InferenceStatus {
            supported: true,
            running: true,
            ..Default::default()
        };
        n.set_inference(running.clone());
        let e = n.admit_spawn(&mut s, 0).unwrap_err();
        assert!(e.message.contains("does not answer"), "{e}");
        n.set_inference(InferenceStatus {
            healthy: true,
            ..running
        });
        assert!(n.admit_spawn(&mut s, 0).is_ok());
        let mut host = SpawnRequest {
            network: Some("host".into()),
            ..s.clone()
        };
        let e = n.admit_spawn(&mut host, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{e}");
        s.inference = false;
        n.set_inference(InferenceStatus::default());
        assert!(n.admit_spawn(&mut s, 0).is_ok());
    }

    #[test]
    fn the_orchestrator_narrows_but_never_widens() {
        // The node allows any image; the push allows one.
        let n = node(
            Policy::default(),
            Some(push(serde_json::json!({"allowed_images": ["ok:*"]}))),
        );
        n.admit_spawn(&mut spec("ok:1"), 0).unwrap();
        let e = n.admit_spawn(&mut spec("other:1"), 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("orchestrator"), "{}", e.message);

        // The node allows one image; a permissive push changes nothing.
        let strict = Policy {
            allowed_images: vec!["ok:*".into()],
            ..Default::default()
        };
        let n = node(strict, Some(push(serde_json::json!({}))));
        let e = n.admit_spawn(&mut spec("other:1"), 0).unwrap_err();
        assert!(e.message.contains("node"), "{}", e.message);
    }

    #[test]
    fn concurrency_is_limited_by_either_policy() {
        assert!(!node(Policy::default(), None).concurrency_limited());
        let n = node(
            Policy::default(),
            Some(push(serde_json::json!({"max_concurrency": 3}))),
        );
        assert!(n.concurrency_limited());
        let e = n.admit_spawn(&mut spec("img"), 3).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
    }

    #[test]
    fn a_pushed_request_limit_only_narrows() {
        let mut small = push(serde_json::json!({}));
        small.constraints.max_request_bytes = Some(4096);
        assert_eq!(node(Policy::default(), Some(small)).request_limit(), 4096);
        let mut large = push(serde_json::json!({}));
        large.constraints.max_request_bytes = Some(1 << 30);
        assert_eq!(
            node(Policy::default(), Some(large)).request_limit(),
            1 << 20
        );
        let mut tiny = push(serde_json::json!({}));
        tiny.constraints.max_request_bytes = Some(1);
        assert_eq!(node(Policy::default(), Some(tiny)).request_limit(), 1024);
    }

    #[test]
    fn allowlist_needs_the_proxy_image_and_intersects_both_lists() {
        let p = Policy {
            allowed_egress_domains: vec![
                crate::egress_proxy::Pattern::parse("*.example.com").unwrap(),
                crate::egress_proxy::Pattern::parse("pypi.org").unwrap(),
            ],
            ..Default::default()
        };
        let mut s = spec("img");
        s.network_policy = Some(NetworkPolicy::Allowlist);
        let e = node(p.clone(), None).net_plan(&s).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported);

        let mut n = node(
            p,
            Some(push(
                serde_json::json!({"allowed_egress_domains": ["api.example.com", "crates.io"]}),
            )),
        );
        n.egress_image = Some("proxy:1".into());
        match n.net_plan(&s).unwrap() {
            NetPlan::Allowlist(spec) => assert_eq!(spec.allow, vec!["api.example.com"]),
            _ => panic!("not an allowlist plan"),
        }
    }

    #[test]
    fn credentials_match_the_image_registry() {
        let mut cfg = push(serde_json::json!({}));
        cfg.registries = vec![
            crate::protocol::Registry {
                server: "reg.example:5000".into(),
                username: "u".into(),
                password: "p".into(),
            },
            crate::protocol::Registry {
                server: "docker.io".into(),
                username: "hub".into(),
                password: "q".into(),
            },
        ];
        let n = node(Policy::default(), Some(cfg));
        let c = n.credentials("reg.example:5000/team/app:1").unwrap();
        assert_eq!(c.username.as_deref(), Some("u"));
        assert_eq!(
            n.credentials("library/busybox")
                .unwrap()
                .username
                .as_deref(),
            Some("hub")
        );
        assert!(n.credentials("other.example/app").is_none());
        assert!(
            node(Policy::default(), None)
                .credentials("busybox")
                .is_none()
        );
    }
}
