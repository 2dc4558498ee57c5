//! Deployments: converge the node to a deployment's services
//! (`deploy_apply`), show them (`deploy_inspect`), take them down
//! (`deploy_remove`). Every service is admitted by the node's policy before
//! anything is made; a new deployment that fails half-way is removed whole.

use super::{Ctx, reply};
use crate::docker::egress::NetPlan;
use crate::docker::{self, deployment as dep};
use crate::protocol::{
    DependsCondition, DeployApply, DeployRef, DeployRemove, DeploymentInfo, ErrorBody, ErrorCode,
    MAX_SERVICE_NAME, NetworkPolicy, ServiceAction, ServiceSpec, SpawnRequest, valid_name,
};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tracing::{info, warn};

/// One deployment change at a time on a node: two applies of one
/// deployment must not both make its containers.
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a service waits for a dependency to be healthy.
const HEALTHY_WAIT: Duration = Duration::from_secs(180);

/// A refusal of one service, named.
fn of_service(service: &str, e: ErrorBody) -> ErrorBody {
    ErrorBody::new(e.code, format!("service {service}: {}", e.message))
}

fn bad(msg: String) -> ErrorBody {
    ErrorBody::new(ErrorCode::InvalidRequest, msg)
}

/// Names are well formed, unique, and every dependency comes earlier.
fn check_shape(req: &DeployApply) -> Result<(), ErrorBody> {
    if let Some(why) = crate::protocol::deployment_name_error(&req.deployment) {
        return Err(bad(why));
    }
    if req.services.is_empty() {
        return Err(bad("a deployment needs at least one service".into()));
    }
    if req.services.len() > crate::protocol::MAX_SERVICES {
        return Err(bad(format!(
            "a deployment has at most {} services",
            crate::protocol::MAX_SERVICES
        )));
    }
    let mut seen = BTreeSet::new();
    for s in &req.services {
        if !valid_name(&s.name, MAX_SERVICE_NAME) {
            return Err(bad(format!(
                "service name {:?}: lowercase letters, digits and '-', at most {MAX_SERVICE_NAME}",
                s.name
            )));
        }
        if let Some(why) = s.healthcheck.as_ref().and_then(|h| h.error()) {
            return Err(bad(format!("service {}: {why}", s.name)));
        }
        for d in &s.depends_on {
            if !seen.contains(d.service.as_str()) {
                return Err(bad(format!(
                    "service {}: depends on {}, which is not an earlier service",
                    s.name, d.service
                )));
            }
        }
        if !seen.insert(s.name.as_str()) {
            return Err(bad(format!("service {} is named twice", s.name)));
        }
        for v in &s.volumes {
            if !valid_name(&v.volume, MAX_SERVICE_NAME) || !v.target.starts_with('/') {
                return Err(bad(format!(
                    "service {}: volume {:?} at {:?}: a named volume (lowercase letters, digits, '-') at an absolute path",
                    s.name, v.volume, v.target
                )));
            }
        }
    }
    Ok(())
}

/// The node's policy on each service, as on a worker's spawn: the limits
/// it sets where the file sets none are written into the service. Returns
/// the network policy the deployment runs under.
fn admit(ctx: &Ctx, req: &mut DeployApply, running: usize) -> Result<NetPlan, ErrorBody> {
    let mut plan = None;
    for (i, s) in req.services.iter_mut().enumerate() {
        let mut spawn = SpawnRequest {
            image: s.image.clone(),
            cmd: s.command.clone().unwrap_or_default(),
            env: s.environment.clone(),
            labels: s.labels.clone(),
            resources: crate::protocol::Resources {
                cpus: s.cpus,
                memory_mb: s.memory_mb,
                pids: s.pids,
                disk_mb: s.disk_mb,
            },
            network_policy: req.network_policy,
            mounts: s.mounts.clone(),
            ..Default::default()
        };
        // The checks every worker's spawn gets: names, reserved labels,
        // environment names, limits in range.
        let whole = crate::protocol::Spawn {
            worker_id: crate::protocol::service_worker_id(&req.deployment, &s.name),
            spec: spawn.clone(),
        };
        docker::containers::validate(&whole).map_err(|e| of_service(&s.name, e.into()))?;
        ctx.node
            .admit_spawn(&mut spawn, running + i)
            .map_err(|e| of_service(&s.name, e))?;
        // Services run until the deployment is taken down: a node that
        // ends every workload in time takes none.
        if let Some(t) = spawn.timeout_secs {
            return Err(ErrorBody::new(
                ErrorCode::PolicyDenied,
                format!(
                    "service {}: this node ends every workload after at most {t} s \
                     (sandbox.timeouts); deployments run until taken down",
                    s.name
                ),
            ));
        }
        let r = spawn.resources.clone();
        (s.cpus, s.memory_mb, s.pids, s.disk_mb) = (r.cpus, r.memory_mb, r.pids, r.disk_mb);
        if plan.is_none() {
            plan = Some(ctx.node.net_plan(&spawn)?);
        }
        s.mounts = spawn.mounts;
    }
    Ok(plan.unwrap_or(NetPlan::None))
}

pub(super) async fn apply(ctx: &Ctx, id: String, mut req: DeployApply) {
    let _one = LOCK.lock().await;
    reply(ctx, id, converge(ctx, &mut req).await);
}

async fn converge(ctx: &Ctx, req: &mut DeployApply) -> Result<DeploymentInfo, ErrorBody> {
    check_shape(req)?;
    let (d, node) = (&ctx.engine.docker, ctx.engine.node_id.as_str());
    let existing = dep::services(d, node, &req.deployment).await?;
    // The node's running workers other than this deployment's own running
    // services (which the `up` replaces); a stopped service of it counts
    // as what it is, nothing.
    let running = if ctx.node.concurrency_limited() {
        docker::containers::running_count(d, node)
            .await?
            .saturating_sub(dep::running_services(d, node, &req.deployment).await?)
    } else {
        0
    };
    let plan = admit(ctx, req, running)?;
    let fresh = existing.is_empty();
    // Volumes a `down` without `--volumes` kept are the user's data: an
    // `up` that fails leaves them (and with them what it made beside them).
    let kept_volumes = fresh
        && !dep::volumes(d, node, &req.deployment)
            .await
            .map_err(ErrorBody::from)?
            .is_empty();
    let result = make(ctx, req, &plan, existing).await;
    if result.is_err() && fresh {
        // Nothing half-made is left of a deployment that did not exist.
        let volumes = !kept_volumes;
        if let Err(e) = dep::remove(d, &ctx.engine.pool, node, &req.deployment, volumes).await {
            warn!(deployment = %req.deployment, error = %e, "could not undo a failed deployment");
        }
    }
    result
}

async fn make(
    ctx: &Ctx,
    req: &DeployApply,
    plan: &NetPlan,
    mut existing: HashMap<String, (String, String)>,
) -> Result<DeploymentInfo, ErrorBody> {
    let (d, node, name) = (
        &ctx.engine.docker,
        ctx.engine.node_id.as_str(),
        req.deployment.as_str(),
    );
    let (policy, proxy) = match plan {
        NetPlan::None => (NetworkPolicy::None, None),
        NetPlan::Restricted => (NetworkPolicy::Restricted, None),
        NetPlan::Allowlist(spec) => (NetworkPolicy::Allowlist, Some(spec)),
        NetPlan::Host => {
            let msg = "a deployment cannot use the host network";
            return Err(ErrorBody::new(ErrorCode::InvalidRequest, msg));
        }
    };
    let guard = ctx.node.guard();
    let (network, net_env) =
        dep::ensure_network(d, &ctx.engine.pool, node, name, policy, proxy, guard).await?;
    let volumes: BTreeSet<String> = req
        .services
        .iter()
        .flat_map(|s| s.volumes.iter().map(|v| v.volume.clone()))
        .collect();
    dep::ensure_volumes(d, node, name, &volumes.into_iter().collect::<Vec<_>>()).await?;
    let mut actions = HashMap::new();
    let mut ids = HashMap::new();
    for s in &req.services {
        wait_for_dependencies(ctx, s, &ids).await?;
        // Host paths are resolved on the node, and nothing that could
        // redirect them runs between the check and the start (as a spawn).
        let mut s = s.clone();
        let _mount_guard = if s.mounts.is_empty() {
            None
        } else {
            let guard = crate::agent::mounts::MOUNT_LOCK.lock().await;
            let existing = docker::containers::bind_mounts(d, node).await?;
            let allowed = &ctx.node.policy.allowed_host_paths;
            crate::agent::mounts::resolve_all(
                &mut s.mounts,
                allowed,
                &existing,
                &ctx.node.protected,
            )
            .map_err(|e| of_service(&s.name, e))?;
            Some(guard)
        };
        let s = &s;
        let hash = dep::spec_hash(s, policy);
        let action = match existing.remove(&s.name) {
            Some((cid, h)) if h == hash => {
                // Unchanged, but it may have stopped (`restart: no`): `up`
                // runs it again, as Compose does.
                dep::ensure_started(d, &cid, s).await?;
                ids.insert(s.name.clone(), cid);
                actions.insert(s.name.clone(), ServiceAction::Unchanged);
                continue;
            }
            Some((cid, _)) => {
                drop_service(ctx, name, &s.name, &cid).await?;
                ServiceAction::Recreated
            }
            None => ServiceAction::Created,
        };
        let creds = ctx.node.credentials(&s.image);
        let cid = dep::create_service(
            d,
            node,
            name,
            &network,
            &net_env,
            s,
            policy,
            ctx.engine.defaults,
            creds,
        )
        .await?;
        info!(deployment = name, service = %s.name, ?action, "service running");
        ids.insert(s.name.clone(), cid);
        actions.insert(s.name.clone(), action);
    }
    // What the file no longer names goes.
    let mut removed: Vec<String> = existing.keys().cloned().collect();
    removed.sort();
    for (svc, (cid, _)) in existing {
        drop_service(ctx, name, &svc, &cid).await?;
        info!(deployment = name, service = %svc, "service removed");
    }
    let mut info = describe(ctx, name, req.services.iter().map(|s| s.name.clone())).await?;
    for s in &mut info.services {
        s.action = s
            .worker
            .service
            .as_ref()
            .and_then(|n| actions.get(n).copied());
    }
    info.removed = removed;
    Ok(info)
}

/// Waits until each dependency of `s` is as its condition asks.
async fn wait_for_dependencies(
    ctx: &Ctx,
    s: &ServiceSpec,
    ids: &HashMap<String, String>,
) -> Result<(), ErrorBody> {
    for dep_on in &s.depends_on {
        if dep_on.condition != DependsCondition::ServiceHealthy {
            continue;
        }
        let cid = &ids[&dep_on.service];
        let deadline = tokio::time::Instant::now() + HEALTHY_WAIT;
        loop {
            let st = dep::status(&ctx.engine.docker, &ctx.engine.node_id, cid).await?;
            match st.health.as_deref() {
                Some("healthy") => break,
                None => {
                    return Err(bad(format!(
                        "service {} waits for {} to be healthy, but {} has no healthcheck",
                        s.name, dep_on.service, dep_on.service
                    )));
                }
                Some("unhealthy") => {
                    return Err(ErrorBody::new(
                        ErrorCode::Unavailable,
                        format!(
                            "service {} waits for {}, which is unhealthy",
                            s.name, dep_on.service
                        ),
                    ));
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(ErrorBody::new(
                        ErrorCode::Timeout,
                        format!(
                            "service {} waited {} s for {} to be healthy",
                            s.name,
                            HEALTHY_WAIT.as_secs(),
                            dep_on.service
                        ),
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    Ok(())
}

/// The deployment's services as they are, in `order` first, then any other.
async fn describe(
    ctx: &Ctx,
    name: &str,
    order: impl Iterator<Item = String>,
) -> Result<DeploymentInfo, ErrorBody> {
    let (d, node) = (&ctx.engine.docker, ctx.engine.node_id.as_str());
    let mut found = dep::services(d, node, name).await?;
    let ordered: Vec<String> = order
        .filter_map(|s| found.remove(&s))
        .map(|v| v.0)
        .collect();
    let mut services = Vec::new();
    for id in ordered {
        services.push(dep::status(d, node, &id).await?);
    }
    // The rest (an inspect names no order): as they were made.
    let mut rest = Vec::new();
    for (id, _) in found.into_values() {
        rest.push(dep::status(d, node, &id).await?);
    }
    rest.sort_by(|a, b| a.worker.created_at.cmp(&b.worker.created_at));
    services.extend(rest);
    let network_policy = services.first().and_then(|s| s.worker.network_policy);
    Ok(DeploymentInfo {
        deployment: name.to_string(),
        node_id: node.to_string(),
        network: dep::network_name(name),
        network_policy,
        services,
        removed: Vec::new(),
        volumes: dep::volumes(d, node, name).await?,
    })
}

fn no_such(name: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::NotFound, format!("no such deployment: {name}"))
}

pub(super) async fn inspect(ctx: &Ctx, id: String, r: DeployRef) {
    let info = describe(ctx, &r.deployment, std::iter::empty()).await;
    let info = match info {
        Ok(i) if i.services.is_empty() => Err(no_such(&r.deployment)),
        other => other,
    };
    reply(ctx, id, info)
}

/// Removes a service's container and what hangs on it: its sidecars (a
/// tunnel's relay shares its network namespace, and would outlive it
/// holding a namespace nothing else is in) and the agent's exec and
/// tunnel state for its worker id, which its next container takes.
async fn drop_service(
    ctx: &Ctx,
    deployment: &str,
    service: &str,
    cid: &str,
) -> Result<(), ErrorBody> {
    let (d, node) = (&ctx.engine.docker, ctx.engine.node_id.as_str());
    docker::containers::remove_id(d, cid).await?;
    let worker = crate::protocol::service_worker_id(deployment, service);
    if let Err(e) = docker::sidecar::remove_all(d, node, &worker).await {
        warn!(%worker, error = %e, "could not remove the service's sidecars");
    }
    ctx.execs.forget_worker(&worker);
    ctx.tunnels.worker_removed(ctx, &worker);
    Ok(())
}

pub(super) async fn remove(ctx: &Ctx, id: String, r: DeployRemove) {
    let _one = LOCK.lock().await;
    let (d, node) = (&ctx.engine.docker, ctx.engine.node_id.as_str());
    let services = dep::services(d, node, &r.deployment)
        .await
        .unwrap_or_default();
    let removed = dep::remove(d, &ctx.engine.pool, node, &r.deployment, r.volumes).await;
    let answer = match removed {
        Ok(true) => {
            for svc in services.keys() {
                let worker = crate::protocol::service_worker_id(&r.deployment, svc);
                ctx.execs.forget_worker(&worker);
                ctx.tunnels.worker_removed(ctx, &worker);
            }
            info!(deployment = %r.deployment, volumes = r.volumes, "deployment removed");
            Ok(serde_json::json!({ "deployment": r.deployment, "volumes_removed": r.volumes }))
        }
        Ok(false) => Err(no_such(&r.deployment)),
        Err(e) => Err(e.into()),
    };
    reply(ctx, id, answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DependsOn;

    fn svc(name: &str, deps: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            image: "img".into(),
            depends_on: deps
                .iter()
                .map(|d| DependsOn {
                    service: d.to_string(),
                    condition: DependsCondition::ServiceStarted,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_deployment_names_its_services_once_dependencies_first() {
        let req = |services| DeployApply {
            deployment: "shop".into(),
            services,
            network_policy: None,
        };
        assert!(check_shape(&req(vec![svc("db", &[]), svc("web", &["db"])])).is_ok());
        let e = check_shape(&req(vec![svc("web", &["db"]), svc("db", &[])])).unwrap_err();
        assert!(e.message.contains("depends on db"), "{}", e.message);
        let e = check_shape(&req(vec![svc("db", &[]), svc("db", &[])])).unwrap_err();
        assert!(e.message.contains("named twice"), "{}", e.message);
        let e = check_shape(&req(vec![svc("a_b", &[])])).unwrap_err();
        assert!(e.message.contains("a_b"), "{}", e.message);
        assert!(check_shape(&req(vec![])).is_err());
    }
}
