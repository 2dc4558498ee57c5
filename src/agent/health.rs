//! Watches the container runtime for one connection: reports the node
//! `degraded` while Docker is unreachable and `ok` when it is back, and
//! forwards Docker's die/OOM events of this node's workers.

use super::Ctx;
use crate::docker::labels;
use crate::mux::Outbound;
use crate::protocol::{Message, NodeStatus, WorkerEvent};
use futures_util::StreamExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the runtime is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Probes Docker until `end`; reports every change (and the first state).
pub(super) async fn watch_docker(ctx: Arc<Ctx>, end: CancellationToken) {
    let mut reported: Option<bool> = None;
    let mut events: Option<tokio::task::JoinHandle<()>> = None;
    let mut ticks: u64 = 0;
    let mut polled = tokio::time::Instant::now();
    loop {
        let probe = tokio::time::timeout(PROBE_INTERVAL, ctx.docker.ping()).await;
        let healthy = matches!(probe, Ok(Ok(_)));
        ctx.degraded.store(!healthy, Ordering::Relaxed);
        if reported != Some(healthy) {
            let (status, reason) = if healthy {
                ("ok", None)
            } else {
                let why = match probe {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer within 2 s".to_string(),
                };
                (
                    "degraded",
                    Some(format!("Docker engine unreachable: {why}")),
                )
            };
            if healthy {
                info!("container runtime reachable");
            } else {
                warn!(reason = reason.as_deref().unwrap_or(""), "node degraded");
            }
            let sent = ctx
                .link
                .send(Outbound::msg(&Message::NodeStatus(NodeStatus {
                    status: status.into(),
                    reason,
                    at: now(),
                })));
            if sent {
                reported = Some(healthy);
            }
        }
        // Capabilities can change (a GPU appears, Docker is upgraded): check
        // now and then and report a new hash.
        ticks += 1;
        if healthy && ticks % 30 == 0 {
            let report =
                super::capabilities::collect(&ctx.docker, &ctx.identity, &ctx.state_dir).await;
            let hash = report.hash();
            let changed = ctx.reported_hash.lock().unwrap().as_deref() != Some(hash.as_str());
            if changed {
                let v = serde_json::to_value(&report).expect("reports serialize");
                if ctx.link.send(Outbound::msg(&Message::Capabilities(v))) {
                    info!(%hash, "capabilities changed");
                    *ctx.reported_hash.lock().unwrap() = Some(hash);
                }
            }
        }
        if let Some(every) = ctx.config_poll
            && polled.elapsed() >= every
        {
            polled = tokio::time::Instant::now();
            let config_version = ctx
                .applied
                .lock()
                .unwrap()
                .as_ref()
                .map(|a| a.config.config_version.clone());
            ctx.link.send(Outbound::msg(&Message::ConfigPoll(
                crate::protocol::ConfigPoll { config_version },
            )));
        }
        // (Re)subscribe to events whenever the runtime is healthy and the
        // previous subscription ended (it ends when Docker goes away).
        if healthy && events.as_ref().is_none_or(|t| t.is_finished()) {
            events = Some(tokio::spawn(forward_events(ctx.clone())));
        }
        tokio::select! {
            _ = end.cancelled() => break,
            _ = tokio::time::sleep(ctx.config_poll.map_or(PROBE_INTERVAL, |p| p.min(PROBE_INTERVAL))) => {}
        }
    }
    if let Some(t) = events {
        t.abort();
    }
}

/// Forwards Docker's container events for this node's workers until the
/// stream ends.
async fn forward_events(ctx: Arc<Ctx>) {
    let filters = std::collections::HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        (
            "event".to_string(),
            vec!["die".to_string(), "oom".to_string()],
        ),
        (
            "label".to_string(),
            vec![format!("{}={}", labels::NODE, ctx.node_id)],
        ),
    ]);
    let mut events = ctx
        .docker
        .events(Some(bollard::query_parameters::EventsOptions {
            since: None,
            until: None,
            filters: Some(filters),
        }));
    while let Some(Ok(ev)) = events.next().await {
        let attrs = ev.actor.and_then(|a| a.attributes).unwrap_or_default();
        let Some(worker_id) = attrs.get(labels::WORKER).cloned() else {
            continue;
        };
        let event = match ev.action.as_deref() {
            Some("oom") => "oom_killed",
            _ => "exited",
        };
        let exit_code = attrs.get("exitCode").and_then(|c| c.parse().ok());
        ctx.link
            .send(Outbound::msg(&Message::WorkerEvent(WorkerEvent {
                worker_id,
                event: event.into(),
                exit_code,
                at: now(),
            })));
    }
}
