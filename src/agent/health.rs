//! Watches the container runtime for one connection: reports the node
//! `degraded` while Docker is unreachable and `ok` when it is back, a
//! changed capability report, and asks for newer configuration when told to
//! poll. (Worker events have their own process-wide task: `events`.)

use super::Ctx;
use crate::conn::Outbound;
use crate::protocol::{Message, NodeHealth, NodeStatus};
use std::sync::Arc;
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
    let mut ticks: u64 = 0;
    let mut polled = tokio::time::Instant::now();
    loop {
        let probe = tokio::time::timeout(PROBE_INTERVAL, ctx.engine.docker.ping()).await;
        let healthy = matches!(probe, Ok(Ok(_)));
        ctx.node.set_degraded(!healthy);
        if reported != Some(healthy) {
            let (status, reason) = if healthy {
                (NodeHealth::Ok, None)
            } else {
                let why = match probe {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer within 2 s".to_string(),
                };
                (
                    NodeHealth::Degraded,
                    Some(format!("Docker engine unreachable: {why}")),
                )
            };
            if healthy {
                info!("container runtime reachable");
            } else {
                warn!(reason = reason.as_deref().unwrap_or(""), "node degraded");
            }
            let sent = ctx
                .upstream
                .link
                .send(Outbound::msg(&Message::NodeStatus(NodeStatus {
                    status,
                    reason,
                    at: now(),
                })));
            if sent {
                reported = Some(healthy);
            }
        }
        // Capabilities can change (a GPU appears, Docker is upgraded): check
        // now and then and report a new hash. The inference backend, which
        // placement goes by, at every probe: while one that should run is
        // not yet healthy, and when it changed after the last report sent.
        ticks += 1;
        let backend = ctx.node.inference();
        let settling = backend.image.is_some() && !(backend.running && backend.healthy);
        if healthy && (ticks % 30 == 0 || settling) {
            super::inference::refresh(&ctx).await;
            report_capabilities(&ctx).await;
        } else if healthy && backend.image.is_some() && ticks % 5 == 0 {
            // A backend that should run is looked at every 10 s (a gateway
            // restart strands it), reported when it changed.
            super::inference::refresh(&ctx).await;
            if ctx.node.inference_unreported() {
                report_capabilities(&ctx).await;
            }
        } else if ctx.node.inference_unreported() {
            report_capabilities(&ctx).await;
        }
        if let Some(every) = ctx.node.config_poll
            && polled.elapsed() >= every
        {
            polled = tokio::time::Instant::now();
            let config_version = ctx.node.config_version();
            ctx.upstream.link.send(Outbound::msg(&Message::ConfigPoll(
                crate::protocol::ConfigPoll { config_version },
            )));
        }
        tokio::select! {
            _ = end.cancelled() => break,
            _ = tokio::time::sleep(ctx.node.config_poll.map_or(PROBE_INTERVAL, |p| p.min(PROBE_INTERVAL))) => {}
        }
    }
}

/// The node's capability report as it stands now.
pub(super) async fn capability_report(ctx: &Ctx) -> super::capabilities::CapabilityReport {
    super::capabilities::collect(
        &ctx.engine.docker,
        &ctx.node.identity,
        &ctx.node.state_dir,
        ctx.node.inference(),
    )
    .await
}

/// Sends the capability report if it changed since the last one sent.
pub(super) async fn report_capabilities(ctx: &Ctx) {
    let report = capability_report(ctx).await;
    let hash = report.hash();
    if ctx.node.report_changed(&hash)
        && ctx
            .upstream
            .link
            .send(Outbound::msg(&Message::Capabilities(report.clone())))
    {
        info!(%hash, "capabilities changed");
        ctx.node.reported(&report);
    }
}
