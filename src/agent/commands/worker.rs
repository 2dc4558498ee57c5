//! Worker lifecycle commands that need more than one engine call: spawn
//! (admission, host mounts, network plan), remove, the deadline reaper and
//! garbage collection at start.

use super::{Ctx, reply};
use crate::docker::{self, containers};
use crate::protocol::{ErrorBody, ErrorCode, Spawn};
use std::sync::Arc;
use tracing::{info, warn};

pub(super) async fn spawn(ctx: &Arc<Ctx>, id: String, mut s: Spawn) {
    let (d, node) = (&ctx.engine.docker, ctx.engine.node_id.as_str());
    // Already made (a repeated spawn): the same worker, no new checks.
    // (`containers::spawn` relies on this check having been made.)
    if let Ok(existing) = containers::inspect(d, node, &s.worker_id).await {
        return super::accepted(ctx, id, existing);
    }
    // Counting running workers takes a listing: only when a limit needs it.
    let running = if ctx.node.concurrency_limited() {
        containers::running_count(d, node)
            .await
            .map_err(ErrorBody::from)
    } else {
        Ok(0)
    };
    if s.spec.inference {
        s.spec.env.insert(
            "OLLAMA_BASE_URL".into(),
            format!("http://localhost:{}", crate::inference::proxy::PORT),
        );
    }
    let plan = running
        .and_then(|running| ctx.node.admit_spawn(&mut s.spec, running))
        .and_then(|()| ctx.node.net_plan(&s.spec));
    let creds = ctx.node.credentials(&s.spec.image);
    // Host paths are resolved on the node, and nothing that could redirect
    // them runs between the check and the start.
    let _mount_guard = if s.spec.mounts.is_empty() {
        None
    } else {
        Some(super::super::mounts::MOUNT_LOCK.lock().await)
    };
    let plan = match plan {
        Ok(plan) if !s.spec.mounts.is_empty() => containers::bind_mounts(d, node)
            .await
            .map_err(ErrorBody::from)
            .and_then(|existing| {
                super::super::mounts::resolve_all(
                    &mut s.spec.mounts,
                    &ctx.node.policy.allowed_host_paths,
                    &existing,
                    &ctx.node.protected,
                )
            })
            .map(|()| plan),
        other => other,
    };
    // A job with inference gets its proxy before its command starts;
    // without one it does not run.
    let proxy = if s.spec.inference {
        inference_proxy(ctx).map(Some)
    } else {
        Ok(None)
    };
    let r = match plan.and_then(|plan| proxy.map(|p| (plan, p))) {
        Ok((plan, proxy)) => {
            let (pool, defaults, guard) = (&ctx.engine.pool, ctx.engine.defaults, ctx.node.guard());
            let spawned = containers::spawn(
                d,
                pool,
                node,
                defaults,
                &s,
                creds,
                &plan,
                guard,
                proxy.as_ref(),
            );
            spawned.await.map_err(ErrorBody::from)
        }
        Err(e) => Err(e),
    };
    if let Ok(w) = &r {
        info!(worker_id = %w.worker_id, "worker running");
        if let Some(at) = w.deadline {
            schedule_reaper(ctx.clone(), w.worker_id.clone(), at);
        }
    }
    reply(ctx, id, r);
}

/// What this node's job proxies run: the agent's image, the node's limits.
fn inference_proxy(ctx: &Ctx) -> Result<docker::inference::JobProxy, ErrorBody> {
    let Some(image) = ctx.node.egress_image.clone() else {
        return Err(ErrorBody::new(
            ErrorCode::Unavailable,
            "no image for the inference proxy on this node",
        ));
    };
    let id = &ctx.node.identity;
    Ok(docker::inference::JobProxy {
        image,
        limits: (id.inference_max_body_bytes, id.inference_timeout_secs),
        max_concurrency: id.inference_max_concurrency,
    })
}

/// Removes a worker (its sidecars with it) and forgets its checked
/// container id.
pub(super) async fn remove(ctx: &Ctx, worker_id: &str, force: bool) -> Result<(), ErrorBody> {
    let removed = containers::remove(
        &ctx.engine.docker,
        &ctx.engine.pool,
        &ctx.engine.node_id,
        worker_id,
        force,
    )
    .await;
    ctx.execs.forget_worker(worker_id);
    if removed.is_ok() {
        ctx.tunnels.worker_removed(ctx, worker_id);
    }
    removed.map_err(ErrorBody::from)
}

/// Removes networks whose worker container is gone (after crashes or a
/// `docker rm` behind tether's back).
pub(crate) async fn collect_garbage(ctx: &Ctx) {
    let live = containers::list_ids(&ctx.engine.docker, &ctx.engine.node_id).await;
    // A deployment's egress proxy belongs to the deployment.
    let deployments = docker::deployment::names(&ctx.engine.docker, &ctx.engine.node_id).await;
    if let (Ok(mut live), Ok(deployments)) = (live, deployments) {
        live.extend(
            deployments
                .iter()
                .map(|d| docker::deployment::proxy_owner(d)),
        );
        docker::egress::collect_garbage(
            &ctx.engine.docker,
            &ctx.engine.pool,
            &ctx.engine.node_id,
            &live,
        )
        .await;
        docker::sidecar::collect_garbage(&ctx.engine.docker, &ctx.engine.node_id, &live).await;
    }
    match containers::orphan_networks(&ctx.engine.docker, &ctx.engine.node_id).await {
        Ok(nets) => {
            for n in nets {
                match docker::networks::remove(
                    &ctx.engine.docker,
                    &ctx.engine.pool,
                    &ctx.engine.node_id,
                    &n,
                )
                .await
                {
                    Ok(()) => info!(network = %n, "removed orphaned worker network"),
                    Err(e) => warn!(network = %n, error = %e, "could not remove orphaned network"),
                }
            }
        }
        Err(e) => warn!(error = %e, "could not look for orphaned networks"),
    }
}

/// Stops the workers and services that the policies in force would not
/// admit now (the node file, or the configuration last pushed, narrowed
/// since they were made: sandboxes disabled, an image, a host path,
/// privilege, the host network, devices, a network policy or a limit no
/// longer allowed). They are kept, with their files, and their restart
/// policy cleared so nothing starts them again; removing them is the
/// operator's call. Run when the agent starts and after each applied
/// configuration.
pub(crate) async fn stop_unadmitted(ctx: &Ctx) {
    let (d, node) = (&ctx.engine.docker, ctx.engine.node_id.as_str());
    let all = match containers::inspect_all(d, node).await {
        Ok(all) => all,
        Err(e) => {
            warn!(error = %e, "could not check the workers against the policy");
            return;
        }
    };
    let roots = ctx.node.resolved_roots();
    let mut refused = Vec::new();
    for c in all {
        let running = c.state.as_ref().and_then(|s| s.running) == Some(true);
        let restarts = c
            .host_config
            .as_ref()
            .and_then(|h| h.restart_policy.as_ref())
            .and_then(|r| r.name)
            .is_some_and(|n| {
                !matches!(
                    n,
                    bollard::models::RestartPolicyNameEnum::NO
                        | bollard::models::RestartPolicyNameEnum::EMPTY
                )
            });
        if !running && !restarts {
            continue;
        }
        let Some(why) = ctx.node.readmit(containers::as_asked(&c), roots.as_deref()) else {
            continue;
        };
        let worker_id = c
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(docker::labels::WORKER).cloned())
            .unwrap_or_default();
        refused.push((c.id.unwrap_or_default(), worker_id, why));
    }
    // All at once: each stop may wait out its grace period.
    let halts = refused.into_iter().map(|(id, worker_id, why)| async move {
        match containers::halt(d, &id).await {
            Ok(()) => warn!(%worker_id, reason = %why.message, "stopped: the node's policy no longer admits it"),
            Err(e) => warn!(%worker_id, reason = %why.message, error = %e, "the node's policy no longer admits it, but it could not be stopped"),
        }
    });
    futures_util::future::join_all(halts).await;
}

/// Stops and removes a worker at its deadline (Unix seconds) and reports a
/// `timeout` worker event. Scheduled at spawn and again when the agent
/// starts, from the deadline label, so a restart does not forget it.
pub(crate) fn schedule_reaper(ctx: Arc<Ctx>, worker_id: String, deadline: u64) {
    let tasks = ctx.clone();
    tasks.spawn(async move {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        tokio::time::sleep(std::time::Duration::from_secs(deadline.saturating_sub(now))).await;
        match remove(&ctx, &worker_id, true).await {
            Ok(()) => {
                info!(%worker_id, "worker reached its timeout: removed");
                ctx.events
                    .report(worker_id, crate::protocol::WorkerEventKind::Timeout, None);
            }
            Err(e) if e.code == ErrorCode::NotFound => {}
            Err(e) => warn!(%worker_id, error = %e, "could not remove a timed-out worker"),
        }
    });
}
