//! Deployments: where each runs (the node of its services in the worker
//! registry), and the requests that make, show and remove them.

use super::*;
use crate::protocol::{
    DeployApply, DeployRef, DeployRemove, DeploymentInfo, DeploymentSummary, WorkerState,
};
use futures_util::future::BoxFuture;

impl Hub {
    /// The organization of the node a deployment runs on.
    pub fn deployment_org(&self, name: &str) -> Option<String> {
        self.node_org(&self.deployment_node(name)?)
    }

    /// The node a deployment's services run on, if the registry knows it.
    fn deployment_node(&self, name: &str) -> Option<String> {
        let reg = self.reg.lock().unwrap();
        reg.workers
            .values()
            .find(|w| w.deployment.as_deref() == Some(name))
            .map(|w| w.node_id.clone())
    }

    fn deployment_link(&self, name: &str) -> Result<Arc<AgentLink>, ErrorBody> {
        let node = self.deployment_node(name).ok_or_else(|| {
            ErrorBody::new(ErrorCode::NotFound, format!("no such deployment: {name}"))
        })?;
        self.link(&node)
    }

    /// Makes or converges a deployment: on the node it already runs on, or
    /// on `node`, or on the least-loaded node.
    pub async fn deploy(
        &self,
        req: DeployApply,
        node: Option<String>,
    ) -> Result<DeploymentInfo, ErrorBody> {
        self.deploy_in(req, node, &OrgScope::All, &Unrecorded).await
    }

    /// [`Hub::deploy`] for a caller who sees `scope`: placed only on its
    /// nodes. Deployment names are one namespace for the server (a
    /// service's worker id is `NAME_SERVICE`), so a name another
    /// organization uses is a conflict. `names` reserves the name for a
    /// node before the node is asked (and gives it back if the node made
    /// nothing), so servers sharing `names` agree on whose it is.
    pub async fn deploy_in(
        &self,
        req: DeployApply,
        node: Option<String>,
        scope: &OrgScope,
        names: &dyn DeploymentNames,
    ) -> Result<DeploymentInfo, ErrorBody> {
        if let Some(n) = &node {
            self.check_node_in(n, scope)?;
        }
        // A name is known to the registry only once its node has answered:
        // until then it is held here, so that a second `up` of the same
        // name (another organization's, on another node) waits its turn.
        let _held = Applying::hold(&self.applying, &req.deployment)?;
        let at = self.deployment_node(&req.deployment);
        if let Some(at) = &at
            && !self.node_org(at).is_some_and(|o| scope.admits(&o))
        {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!(
                    "the deployment name {} is taken: choose another",
                    req.deployment
                ),
            ));
        }
        let nodes = match (at, node) {
            (Some(at), Some(n)) if at != n => {
                return Err(ErrorBody::new(
                    ErrorCode::Conflict,
                    format!(
                        "deployment {} runs on node {at}: take it down to move it to {n}",
                        req.deployment
                    ),
                ));
            }
            (Some(at), _) => vec![at],
            (None, Some(n)) => {
                self.check_not_draining(&n)?;
                vec![n]
            }
            // The least-loaded node whose policy admits every service (a
            // refusal by policy comes before anything is made).
            (None, None) => self.candidates(false, scope)?,
        };
        let mut first_refusal = None;
        for node_id in nodes {
            let link = self.link(&node_id)?;
            let name = req.deployment.clone();
            let claimed = names.claim(&name, &node_id).await?;
            let r = as_asked(
                &node_id,
                &name,
                link.request_as(Request::DeployApply(req.clone())).await,
            );
            self.note_deployment(&node_id, &name, &r);
            // A node that answered with an error undid what it made of a
            // new deployment; one that did not answer may still be making
            // it, and keeps the name.
            if let Err(e) = &r
                && claimed
                && !matches!(e.code, ErrorCode::Timeout | ErrorCode::Unavailable)
            {
                names.release(&name, &node_id).await;
            }
            match r {
                Err(e) if e.code == ErrorCode::PolicyDenied => {
                    let e = ErrorBody::new(e.code, format!("node {node_id}: {}", e.message));
                    first_refusal.get_or_insert(e);
                }
                other => return other,
            }
        }
        Err(first_refusal.expect("at least one node was asked"))
    }

    /// A deployment's services as its node sees them now.
    pub async fn deployment(&self, name: &str) -> Result<DeploymentInfo, ErrorBody> {
        let link = self.deployment_link(name)?;
        let r = link
            .request_as(Request::DeployInspect(DeployRef {
                deployment: name.into(),
            }))
            .await;
        let r = as_asked(&link.node_id, name, r);
        self.note_deployment(&link.node_id, name, &r);
        r
    }

    /// Removes every service and the network (and the volumes if asked).
    pub async fn undeploy(&self, name: &str, volumes: bool) -> Result<Value, ErrorBody> {
        let link = self.deployment_link(name)?;
        let r = link
            .request(Request::DeployRemove(DeployRemove {
                deployment: name.into(),
                volumes,
            }))
            .await;
        if r.is_ok() || r.as_ref().is_err_and(|e| e.code == ErrorCode::NotFound) {
            let gone = Err(ErrorBody::new(ErrorCode::NotFound, "removed"));
            self.note_deployment(&link.node_id, name, &gone);
        }
        r
    }

    /// Every deployment the registry knows, by name.
    pub fn deployments(&self) -> Vec<DeploymentSummary> {
        self.deployments_in(&OrgScope::All)
    }

    /// The deployments `scope` sees, by name.
    pub fn deployments_in(&self, scope: &OrgScope) -> Vec<DeploymentSummary> {
        let reg = self.reg.lock().unwrap();
        let mut by_name: std::collections::BTreeMap<&str, DeploymentSummary> = Default::default();
        for w in reg.workers.values() {
            let Some(d) = w.deployment.as_deref() else {
                continue;
            };
            if !reg
                .nodes
                .get(&w.node_id)
                .is_some_and(|n| scope.admits(&n.org))
            {
                continue;
            }
            let e = by_name.entry(d).or_insert_with(|| DeploymentSummary {
                deployment: d.to_string(),
                node_id: w.node_id.clone(),
                services: 0,
                running: 0,
            });
            e.services += 1;
            e.running += usize::from(w.state == WorkerState::Running);
        }
        by_name.into_values().collect()
    }

    /// Brings the registry's services of deployment `name` on `node_id` in
    /// line with what the node answered (none, if it answered not found).
    fn note_deployment(&self, node_id: &str, name: &str, r: &Result<DeploymentInfo, ErrorBody>) {
        let services = match r {
            Ok(info) => info.services.as_slice(),
            Err(e) if e.code == ErrorCode::NotFound => &[],
            // Other failures say nothing of what exists.
            Err(_) => return,
        };
        let mut reg = self.reg.lock().unwrap();
        reg.workers
            .remove_of_node(node_id, |w| w.deployment.as_deref() == Some(name));
        for s in services {
            // A node speaks only for its own services of this deployment,
            // under their own worker ids.
            if s.worker.deployment.as_deref() != Some(name) || !super::id_as_given(&s.worker) {
                continue;
            }
            if reg
                .workers
                .get(&s.worker.worker_id)
                .is_some_and(|w| w.node_id != node_id)
            {
                continue;
            }
            let mut w = s.worker.clone();
            w.node_id = node_id.to_string();
            reg.workers.insert(w);
        }
    }
}

/// A node's answer about deployment `name` as the server asked it: the
/// node and the name it records and audits are the ones it asked, never
/// what the node wrote in.
fn as_asked(
    node_id: &str,
    name: &str,
    r: Result<DeploymentInfo, ErrorBody>,
) -> Result<DeploymentInfo, ErrorBody> {
    r.map(|mut d| {
        d.node_id = node_id.to_string();
        d.deployment = name.to_string();
        d
    })
}

/// A deployment name held while its `deploy_apply` is under way.
/// Where deployment names are reserved before a node makes one.
pub trait DeploymentNames: Send + Sync {
    /// Reserves `name` for `node`: `Ok(true)` if it was free, `Ok(false)`
    /// if it was the node's already, `conflict` if another node holds it.
    fn claim(&self, name: &str, node: &str) -> BoxFuture<'static, Result<bool, ErrorBody>>;
    /// Gives back what [`claim`](Self::claim) reserved.
    fn release(&self, name: &str, node: &str) -> BoxFuture<'static, ()>;
}

/// No reservation beyond the hub's own registry (one process, no store).
pub struct Unrecorded;

impl DeploymentNames for Unrecorded {
    fn claim(&self, _: &str, _: &str) -> BoxFuture<'static, Result<bool, ErrorBody>> {
        Box::pin(async { Ok(true) })
    }
    fn release(&self, _: &str, _: &str) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

struct Applying {
    set: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Applying {
    fn hold(set: &Arc<Mutex<HashSet<String>>>, name: &str) -> Result<Applying, ErrorBody> {
        if !set.lock().unwrap().insert(name.to_string()) {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!(
                    "deployment {name} is being applied by another request: try again when it ends"
                ),
            ));
        }
        Ok(Applying {
            set: set.clone(),
            name: name.to_string(),
        })
    }
}

impl Drop for Applying {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_name_is_held_by_one_apply_at_a_time() {
        let set = Arc::default();
        let first = Applying::hold(&set, "shop").unwrap();
        let e = Applying::hold(&set, "shop").err().expect("held");
        assert_eq!(e.code, ErrorCode::Conflict);
        let other = Applying::hold(&set, "blog").unwrap();
        drop(first);
        let again = Applying::hold(&set, "shop").unwrap();
        drop((other, again));
        assert!(set.lock().unwrap().is_empty());
    }
}
