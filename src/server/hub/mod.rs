//! The embeddable control plane: a typed async [`Hub`] holding the node and
//! worker registries and one [`AgentLink`] per connected agent. The HTTP API
//! is a thin layer over it; other orchestrators can embed it directly.
//!
//! Here: the registries, the nodes' comings and goings, and what agents
//! report on their own. Each other concern has its room: `link` (requests
//! and channels to one node), `stream` (what a caller holds of a channel),
//! `workers` (operations on workers), `attach` (execs kept for a
//! re-attach), `config` (desired configuration).

use crate::channel::{ChannelReader, ChannelWriter, Channels, Inbound};
use crate::conn::{Close, Link, OutTx, Outbound};
pub use crate::protocol::operator::{ExecOptions, LogOptions, NodeInfo, NodeState};
use crate::protocol::{
    ARCHIVE_WINDOW, Archive, ChannelClose, ChannelState, DEFAULT_WINDOW, ErrorBody, ErrorCode,
    Exec, Logs, Message, Remove, Request, Resize, Spawn, SpawnRequest, Stat, StatResult, Stop,
    StreamKind, TermSize, WorkerEvent, WorkerInfo, WorkerRef,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

mod attach;
mod attachments;
mod config;
mod deployments;
mod link;
mod stream;
mod worker_table;
mod workers;

pub use attach::{DetachedExec, HeldExec, TAKEOVER_WAIT};
pub use deployments::{DeploymentNames, Unrecorded};
pub use link::AgentLink;
pub use stream::{ChannelSink, ChannelStream, Duplex, StreamEvent};
pub use workers::ArchiveUpload;

/// How long a disconnected node's channels and requests wait for it.
pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(120);

/// A node with its capability report (`GET /api/v1/nodes/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub info: NodeInfo,
    /// The configuration version the agent has applied.
    pub config_version: Option<String>,
    /// The version of the configuration the orchestrator wants on the node
    /// (pushed again when the node is behind it).
    #[serde(default)]
    pub desired_config_version: Option<String>,
    pub last_config_ack: Option<crate::protocol::ConfigAck>,
    pub capabilities: Option<crate::protocol::CapabilityReport>,
    pub capability_hash: Option<String>,
}

struct NodeEntry {
    link: Arc<AgentLink>,
    /// An agent connection is up.
    online: bool,
    connected_since: Option<SystemTime>,
    /// Why the node cannot take work although connected (runtime down).
    degraded: Option<String>,
    /// The latest capability report and its hash.
    capabilities: Option<(crate::protocol::CapabilityReport, String)>,
    /// The configuration the orchestrator wants on this node.
    desired_config: Option<crate::protocol::NodeConfig>,
    /// What the agent reports as applied.
    config_version: Option<String>,
    last_config_ack: Option<crate::protocol::ConfigAck>,
    draining: bool,
    offline_reason: Option<String>,
    agent_version: Option<String>,
    /// The organization the node belongs to.
    org: String,
}

#[derive(Default)]
struct Registry {
    nodes: HashMap<String, NodeEntry>,
    /// The online nodes' links by heartbeat slice, so that a sweep visits
    /// its own slice only, not every node (`src/server/heartbeat.rs`).
    pulse: HashMap<u32, HashMap<String, Arc<AgentLink>>>,
    /// The server's view of every worker, reconciled from agent inventories.
    workers: worker_table::WorkerTable,
}

impl Registry {
    /// Marks a known node online or offline, in its heartbeat slice too.
    fn set_online(&mut self, node_id: &str, online: bool) {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        n.online = online;
        let link = n.link.clone();
        let slice = self.pulse.entry(pulse_slice(&link)).or_default();
        if online {
            slice.insert(node_id.to_string(), link);
        } else {
            slice.remove(node_id);
        }
    }
}

/// Whether `w` carries an id the server could have given it: a spawned
/// worker's is a lower-case ULID (unguessable, so a node cannot name
/// another's), a deployment service's is `DEPLOYMENT_SERVICE` of its own
/// deployment and service. A node cannot take a name such as another
/// organization's `prod_web` by claiming it without its deployment, or
/// under a deployment of its own.
pub(super) fn id_as_given(w: &WorkerInfo) -> bool {
    match (&w.deployment, &w.service) {
        (Some(d), Some(svc)) => w.worker_id == crate::protocol::service_worker_id(d, svc),
        (None, None) => spawned_id(&w.worker_id),
        _ => false,
    }
}

/// Whether `id` is a spawned worker's id as the server makes them: a
/// lower-case ULID.
pub(crate) fn spawned_id(id: &str) -> bool {
    ulid::Ulid::from_string(id).is_ok() && !id.bytes().any(|b| b.is_ascii_uppercase())
}

/// The rules for one claim of a `hello` inventory (`foreign`: the
/// deployments of the inventory that another organization's node runs):
/// the worker is said to be on this node, no other node owns it, it takes
/// no place in a foreign deployment, and its id is one the server gives.
fn claimable(reg: &Registry, node_id: &str, w: &WorkerInfo, foreign: &HashSet<String>) -> bool {
    w.node_id == node_id
        && reg
            .workers
            .get(&w.worker_id)
            .is_none_or(|o| o.node_id == node_id)
        && w.deployment.as_ref().is_none_or(|d| !foreign.contains(d))
        && id_as_given(w)
}

/// The deployments named in `inventory` that a node of another
/// organization than `node_id`'s runs: one pass over the registry, and
/// none when the inventory names no deployment (most hellos).
fn foreign_deployments(reg: &Registry, node_id: &str, inventory: &[WorkerInfo]) -> HashSet<String> {
    let named: HashSet<&str> = inventory
        .iter()
        .filter_map(|w| w.deployment.as_deref())
        .collect();
    if named.is_empty() {
        return Default::default();
    }
    let org = reg.nodes.get(node_id).map(|n| &n.org);
    reg.workers
        .values()
        .filter(|o| reg.nodes.get(&o.node_id).map(|n| &n.org) != org)
        .filter_map(|o| o.deployment.as_deref())
        .filter(|d| named.contains(d))
        .map(String::from)
        .collect()
}

/// The heartbeat slice a node's link is swept in.
fn pulse_slice(link: &AgentLink) -> u32 {
    link.pulse_slot % crate::server::heartbeat::SLICES
}

/// The control plane, cheap to clone.
#[derive(Clone)]
pub struct Hub {
    reg: Arc<Mutex<Registry>>,
    /// Execs waiting for a re-attach or held by a client connection.
    attach: Arc<Mutex<attachments::Attachments<DetachedExec>>>,
    /// How long a disconnected node's channels and requests wait for it.
    grace: Duration,
    /// Worker events as agents report them, for whoever follows them.
    events: tokio::sync::broadcast::Sender<(String, WorkerEvent)>,
    /// The hub's own tasks (grace timers, configuration re-pushes, detached
    /// execs' timers); they end at [`Hub::shutdown`].
    tasks: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
    /// Woken when a node goes offline or an exec is handed back.
    changed: Arc<tokio::sync::Notify>,
    /// Who takes adopted execs that carry a label ([`Hub::on_labelled_exec`]).
    adopter: Arc<Mutex<Option<attach::Adopter>>>,
    /// Deployments a `deploy_apply` is under way for ([`Hub::deploy_in`]).
    applying: Arc<Mutex<HashSet<String>>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// Worker events a slow follower of [`Hub::worker_events`] may lag behind.
pub const WORKER_EVENT_BACKLOG: usize = 1024;

impl NodeEntry {
    /// Whether the node's latest report says its inference backend runs.
    fn runs_inference(&self) -> bool {
        self.capabilities
            .as_ref()
            .is_some_and(|(c, _)| c.inference.status.running)
    }

    fn info(&self, node_id: &str, workers: usize) -> NodeInfo {
        let status = match (self.online, self.degraded.is_some(), self.draining) {
            (false, _, _) => NodeState::Offline,
            (true, true, _) => NodeState::Degraded,
            (true, false, true) => NodeState::Draining,
            (true, false, false) => NodeState::Online,
        };
        NodeInfo {
            node_id: node_id.to_string(),
            status,
            draining: self.draining,
            workers,
            last_seen: Some(rfc3339(self.link.last_seen())),
            offline_reason: if self.online {
                self.degraded.clone()
            } else {
                self.offline_reason.clone()
            },
            agent_version: self.agent_version.clone(),
            connected_since: self
                .connected_since
                .filter(|_| self.online)
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
            org: Some(self.org.clone()),
        }
    }
}

/// The organization of nodes registered with the server-wide key.
pub const DEFAULT_ORG: &str = "default";

/// Which nodes, and so which workers and deployments, a caller sees and
/// may use: all of them (the server's admin, an embedder), or one
/// organization's. What lies outside is `not_found`, as if it did not
/// exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrgScope {
    All,
    Org(String),
}

impl OrgScope {
    pub fn admits(&self, org: &str) -> bool {
        match self {
            OrgScope::All => true,
            OrgScope::Org(o) => o == org,
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Hub {
    pub fn new() -> Self {
        Hub::with_grace(DEFAULT_RESUME_GRACE)
    }

    /// A hub whose disconnected nodes get `grace` to come back before their
    /// channels and requests fail.
    pub fn with_grace(grace: Duration) -> Self {
        Hub {
            reg: Arc::default(),
            attach: Arc::default(),
            grace,
            events: tokio::sync::broadcast::channel(WORKER_EVENT_BACKLOG).0,
            tasks: Default::default(),
            stop: Default::default(),
            changed: Default::default(),
            adopter: Default::default(),
            applying: Default::default(),
        }
    }

    /// Runs `work` as one of the hub's tasks: tracked, and dropped at
    /// [`Hub::shutdown`].
    pub(crate) fn spawn_task(&self, work: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = work => {}
                _ = stop.cancelled() => {}
            }
        });
    }

    /// Ends the hub's tasks and waits for them (an embedding application
    /// calls this when it stops serving; `tether server` does).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Waits until no node is online, at most `limit`; whether none is.
    pub async fn all_offline(&self, limit: Duration) -> bool {
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        loop {
            // Created before the check, so a change in between is not missed.
            let changed = self.changed.notified();
            if !self.any_online() {
                return true;
            }
            tokio::select! {
                _ = changed => {}
                _ = &mut deadline => return false,
            }
        }
    }

    /// The links of connected nodes in sweep slice `slot` of `slices`.
    pub(crate) fn connected_in_slice(&self, slot: u32) -> Vec<Arc<AgentLink>> {
        let reg = self.reg.lock().unwrap();
        reg.pulse
            .get(&slot)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every node ever seen, sorted by id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes_in(&OrgScope::All)
    }

    /// The nodes `scope` sees, sorted by id.
    pub fn nodes_in(&self, scope: &OrgScope) -> Vec<NodeInfo> {
        let reg = self.reg.lock().unwrap();
        let mut v: Vec<NodeInfo> = reg
            .nodes
            .iter()
            .filter(|(_, n)| scope.admits(&n.org))
            .map(|(id, n)| n.info(id, reg.workers.count(id)))
            .collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    pub fn node_info(&self, node_id: &str) -> Result<NodeInfo, ErrorBody> {
        let reg = self.reg.lock().unwrap();
        let n = reg.nodes.get(node_id).ok_or_else(|| {
            ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}"))
        })?;
        Ok(n.info(node_id, reg.workers.count(node_id)))
    }

    /// Every worker, sorted by node then id.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.workers_in(&OrgScope::All)
    }

    /// The workers `scope` sees, sorted by node then id.
    pub fn workers_in(&self, scope: &OrgScope) -> Vec<WorkerInfo> {
        let reg = self.reg.lock().unwrap();
        let mut v: Vec<WorkerInfo> = reg
            .workers
            .values()
            .filter(|w| {
                reg.nodes
                    .get(&w.node_id)
                    .is_some_and(|n| scope.admits(&n.org))
            })
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.node_id, &a.worker_id).cmp(&(&b.node_id, &b.worker_id)));
        v
    }

    pub fn worker(&self, worker_id: &str) -> Result<WorkerInfo, ErrorBody> {
        self.reg
            .lock()
            .unwrap()
            .workers
            .get(worker_id)
            .cloned()
            .ok_or_else(|| {
                ErrorBody::new(ErrorCode::NotFound, format!("no such worker: {worker_id}"))
            })
    }

    fn link(&self, node_id: &str) -> Result<Arc<AgentLink>, ErrorBody> {
        let reg = self.reg.lock().unwrap();
        let n = reg.nodes.get(node_id).ok_or_else(|| {
            ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}"))
        })?;
        if !n.online {
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "node {node_id} is offline{}",
                    n.offline_reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(n.link.clone())
    }

    fn worker_link(&self, worker_id: &str) -> Result<Arc<AgentLink>, ErrorBody> {
        let w = self.worker(worker_id)?;
        self.link(&w.node_id)
    }

    pub fn set_draining(&self, node_id: &str, draining: bool) -> Result<NodeInfo, ErrorBody> {
        {
            let mut reg = self.reg.lock().unwrap();
            let n = reg.nodes.get_mut(node_id).ok_or_else(|| {
                ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}"))
            })?;
            n.draining = draining;
        }
        self.node_info(node_id)
    }

    /// Picks the online, non-draining node with the fewest workers among
    /// the [`candidates`](Self::candidates).
    fn schedule(&self, inference: bool, scope: &OrgScope) -> Result<String, ErrorBody> {
        self.candidates(inference, scope)
            .map(|mut c| c.swap_remove(0))
    }

    /// Online nodes that take new work, least loaded first, among those of
    /// the caller's organization; `unavailable` if there is none. The
    /// admin's unpinned work is placed on the default organization's nodes
    /// only: another organization's node is run by that organization (a
    /// compromised one can look idle to draw work), so the admin reaches
    /// it only by naming it.
    fn candidates(&self, inference: bool, scope: &OrgScope) -> Result<Vec<String>, ErrorBody> {
        let org = match scope {
            OrgScope::All => DEFAULT_ORG,
            OrgScope::Org(o) => o.as_str(),
        };
        let reg = self.reg.lock().unwrap();
        let mut nodes: Vec<(usize, &String)> = reg
            .nodes
            .iter()
            .filter(|(_, n)| n.org == org)
            .filter(|(_, n)| n.online && !n.draining && n.degraded.is_none())
            .filter(|(_, n)| !inference || n.runs_inference())
            .map(|(id, _)| (reg.workers.count(id), id))
            .collect();
        nodes.sort();
        if nodes.is_empty() {
            let what = if inference {
                "no online node accepts new workers and runs inference"
            } else {
                "no online node accepts new workers"
            };
            let what = match scope {
                OrgScope::All => format!(
                    "{what} in the {DEFAULT_ORG} organization (the admin's unplaced work \
                     goes there only; name another organization's node with --node)"
                ),
                OrgScope::Org(_) => what.to_string(),
            };
            return Err(ErrorBody::new(ErrorCode::Unavailable, what));
        }
        Ok(nodes.into_iter().map(|(_, id)| id.clone()).collect())
    }

    // ---- called by the agent connection ----
    /// The node's link, created on first contact.
    pub(crate) fn node_link(&self, node_id: &str) -> Arc<AgentLink> {
        let mut reg = self.reg.lock().unwrap();
        reg.nodes
            .entry(node_id.to_string())
            .or_insert_with(|| NodeEntry {
                link: AgentLink::new(node_id.to_string()),
                online: false,
                connected_since: None,
                degraded: None,
                capabilities: None,
                desired_config: None,
                config_version: None,
                last_config_ack: None,
                draining: false,
                offline_reason: None,
                agent_version: None,
                org: DEFAULT_ORG.into(),
            })
            .link
            .clone()
    }

    /// Records the organization of a node (from its identity, when it
    /// connects).
    pub(crate) fn set_node_org(&self, node_id: &str, org: &str) {
        if let Some(n) = self.reg.lock().unwrap().nodes.get_mut(node_id) {
            n.org = org.to_string();
        }
    }

    /// The organization of a node this hub knows.
    pub fn node_org(&self, node_id: &str) -> Option<String> {
        let reg = self.reg.lock().unwrap();
        reg.nodes.get(node_id).map(|n| n.org.clone())
    }

    /// The organization of a worker's node.
    pub fn worker_org(&self, worker_id: &str) -> Option<String> {
        let reg = self.reg.lock().unwrap();
        let w = reg.workers.get(worker_id)?;
        reg.nodes.get(&w.node_id).map(|n| n.org.clone())
    }

    /// A connection of the node is up (after [`AgentLink::connect`]).
    pub(crate) fn attach(
        &self,
        node_id: &str,
        agent_version: &str,
        inventory: Option<Vec<WorkerInfo>>,
        config_version: Option<String>,
    ) {
        let mut reg = self.reg.lock().unwrap();
        if let Some(entry) = reg.nodes.get_mut(node_id) {
            // A node behind the desired configuration gets it again.
            if let Some(desired) = &entry.desired_config
                && config_version
                    .as_deref()
                    .is_none_or(|v| v < desired.config_version.as_str())
            {
                let (hub, node, cfg) = (self.clone(), node_id.to_string(), desired.clone());
                self.spawn_task(async move {
                    if let Err(e) = hub.push_config(&node, cfg).await {
                        tracing::warn!(node_id = %node, error = %e, "configuration push on reconnect failed");
                    }
                });
            }
            entry.config_version = config_version;
            entry.connected_since = Some(SystemTime::now());
            entry.degraded = None;
            entry.link.seen();
            entry.offline_reason = None;
            entry.agent_version = Some(agent_version.to_string());
        }
        reg.set_online(node_id, true);
        // The agent's inventory, when it has one, is the truth about its
        // node, and about nothing else: a node may claim only workers that
        // carry its own label and that no other node owns, and no place in
        // a deployment that another organization's node runs (its
        // deployment routes would find the claim).
        if let Some(inventory) = inventory {
            reg.workers.remove_of_node(node_id, |_| true);
            let foreign = foreign_deployments(&reg, node_id, &inventory);
            for w in inventory {
                if !claimable(&reg, node_id, &w, &foreign) {
                    let owner = reg.workers.get(&w.worker_id).map(|o| o.node_id.as_str());
                    tracing::warn!(
                        %node_id,
                        worker_id = %w.worker_id,
                        claimed_for = %w.node_id,
                        owner = owner.unwrap_or("-"),
                        "inventory claim refused: the worker is not this node's"
                    );
                    continue;
                }
                reg.workers.insert(w);
            }
        }
    }

    /// The workers of `inventory` that `node_id` may say, in its hello,
    /// that it runs: the rules of [`Hub::attach`], against the registry now.
    pub(crate) fn claimable_ids<'a>(
        &self,
        node_id: &str,
        inventory: &'a [WorkerInfo],
    ) -> HashSet<&'a str> {
        let reg = self.reg.lock().unwrap();
        let foreign = foreign_deployments(&reg, node_id, inventory);
        inventory
            .iter()
            .filter(|w| claimable(&reg, node_id, w, &foreign))
            .map(|w| w.worker_id.as_str())
            .collect()
    }

    /// Forgets a node (`tether ctl node rm`): its live connection closes at
    /// once, what waits on it fails, and its workers leave the registry.
    /// Tokens are voided by the caller through the store. True if the node
    /// was known.
    pub fn forget_node(&self, node_id: &str) -> bool {
        let entry = {
            let mut reg = self.reg.lock().unwrap();
            reg.workers.remove_of_node(node_id, |_| true);
            reg.set_online(node_id, false);
            reg.nodes.remove(node_id)
        };
        // Dropped outside the lock: dropping cancels on the agent.
        drop(self.attach.lock().unwrap().forget_node(node_id));
        match entry {
            Some(e) => {
                e.link.revoke();
                e.link.expire("removed by an operator");
                true
            }
            None => false,
        }
    }

    /// The connection of `generation` ended. Channels and requests wait for
    /// the agent to come back; after the grace period they fail.
    pub(crate) fn detach(&self, link: &Arc<AgentLink>, generation: u64, reason: &str) {
        let node_id = link.node_id.as_str();
        let link = link.clone();
        link.disconnect(generation);
        if link.generation.load(Ordering::SeqCst) != generation {
            return; // a newer connection already took over
        }
        let mut reg = self.reg.lock().unwrap();
        if let Some(n) = reg.nodes.get_mut(node_id)
            && Arc::ptr_eq(&n.link, &link)
        {
            n.offline_reason = Some(reason.to_string());
            reg.set_online(node_id, false);
        }
        drop(reg);
        self.changed.notify_waiters();
        let grace = self.grace;
        let reason = reason.to_string();
        self.spawn_task(async move {
            tokio::time::sleep(grace).await;
            if link.generation.load(Ordering::SeqCst) == generation && !link.is_connected() {
                link.expire(&reason);
            }
        });
    }

    pub(crate) fn on_capabilities(&self, node_id: &str, report: crate::protocol::CapabilityReport) {
        let hash = report.hash();
        if let Some(n) = self.reg.lock().unwrap().nodes.get_mut(node_id) {
            n.capabilities = Some((report, hash));
        }
    }

    /// A node with its latest capability report.
    pub fn node_detail(&self, node_id: &str) -> Result<NodeDetail, ErrorBody> {
        let info = self.node_info(node_id)?;
        let reg = self.reg.lock().unwrap();
        let n = reg.nodes.get(node_id);
        let caps = n.and_then(|n| n.capabilities.clone());
        Ok(NodeDetail {
            info,
            config_version: n.and_then(|n| n.config_version.clone()),
            desired_config_version: n
                .and_then(|n| n.desired_config.as_ref())
                .map(|c| c.config_version.clone()),
            last_config_ack: n.and_then(|n| n.last_config_ack.clone()),
            capability_hash: caps.as_ref().map(|c| c.1.clone()),
            capabilities: caps.map(|c| c.0),
        })
    }

    pub(crate) fn on_node_status(&self, node_id: &str, st: crate::protocol::NodeStatus) {
        if let Some(n) = self.reg.lock().unwrap().nodes.get_mut(node_id) {
            n.degraded = (st.status != crate::protocol::NodeHealth::Ok)
                .then(|| st.reason.unwrap_or_else(|| "not ok".into()));
        }
    }

    /// Follows worker events (`(node id, event)`) of workers this hub
    /// knows, as agents report them. A receiver that falls more than
    /// [`WORKER_EVENT_BACKLOG`] behind loses the oldest.
    pub fn worker_events(&self) -> tokio::sync::broadcast::Receiver<(String, WorkerEvent)> {
        self.events.subscribe()
    }

    pub(crate) fn on_worker_event(&self, node_id: &str, ev: WorkerEvent) {
        use crate::protocol::WorkerEventKind;
        {
            let mut reg = self.reg.lock().unwrap();
            if reg
                .workers
                .get(&ev.worker_id)
                .is_none_or(|w| w.node_id != node_id)
            {
                return;
            }
            match ev.event {
                WorkerEventKind::Timeout | WorkerEventKind::Removed => {
                    reg.workers.remove(&ev.worker_id);
                }
                WorkerEventKind::Exited | WorkerEventKind::OomKilled => {
                    reg.workers.update(&ev.worker_id, |w| {
                        w.state = crate::protocol::WorkerState::Exited;
                        w.exit_code = ev.exit_code.or(w.exit_code);
                    });
                }
                WorkerEventKind::Unknown => {}
            }
        }
        let _ = self.events.send((node_id.to_string(), ev));
    }

    /// Whether any agent is connected.
    pub(crate) fn any_online(&self) -> bool {
        self.reg.lock().unwrap().nodes.values().any(|n| n.online)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_heartbeat_slice_holds_exactly_its_online_nodes() {
        let hub = Hub::new();
        let slices = crate::server::heartbeat::SLICES;
        let mut links = Vec::new();
        for n in 0..(2 * slices) {
            let id = format!("n{n}");
            let link = hub.node_link(&id);
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let (_, generation) = link.connect(&[], tx);
            hub.attach(&id, "test", None, None);
            links.push((id, link, generation));
        }
        let in_slice = |slot: u32| -> Vec<String> {
            let mut v: Vec<String> = hub
                .connected_in_slice(slot)
                .iter()
                .map(|l| l.node_id.clone())
                .collect();
            v.sort();
            v
        };
        // Every online node in exactly one slice: its own.
        let mut all: Vec<String> = (0..slices).flat_map(in_slice).collect();
        all.sort();
        let mut ids: Vec<String> = links.iter().map(|(id, ..)| id.clone()).collect();
        ids.sort();
        assert_eq!(all, ids);
        for (id, link, _) in &links {
            assert!(in_slice(pulse_slice(link)).contains(id));
        }
        // Gone from its slice once offline or forgotten; back on reattach.
        let (id0, link0, generation0) = &links[0];
        hub.detach(link0, *generation0, "test");
        assert!(!in_slice(pulse_slice(link0)).contains(id0));
        hub.attach(id0, "test", None, None);
        assert!(in_slice(pulse_slice(link0)).contains(id0));
        let (id1, link1, _) = &links[1];
        assert!(hub.forget_node(id1));
        assert!(!in_slice(pulse_slice(link1)).contains(id1));
        hub.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_ends_every_hub_task() {
        let hub = Hub::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        // A task that would run for a day holds `tx`: it is dropped when
        // the task ends.
        hub.spawn_task(async move {
            let _held = tx;
            tokio::time::sleep(Duration::from_secs(86_400)).await;
        });
        tokio::time::timeout(Duration::from_secs(5), hub.shutdown())
            .await
            .expect("shutdown waits for its tasks, which end at once");
        assert!(rx.recv().await.is_none(), "the task is gone");
        // With no node online, waiting for all to go offline is immediate.
        assert!(hub.all_offline(Duration::from_secs(5)).await);
    }
}
