//! Worker events for the server: Docker's die/OOM events of this node's
//! workers and the agent's own (a worker removed at its deadline).
//!
//! One task per agent process owns the only Docker event subscription, so a
//! reconnect to the server never adds a second one (which would report each
//! death once per subscription). Events that happen while the server is
//! unreachable wait here, up to [`PENDING_MAX`], and go out when the link is
//! back; a worker's state also reaches the server in the next `hello`
//! inventory, so an event dropped past that bound loses nothing for good.

use crate::conn::Link;
use crate::docker::labels;
use crate::protocol::{Message, WorkerEvent, WorkerEventKind};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Events kept while the server is unreachable; the oldest go first.
pub(crate) const PENDING_MAX: usize = 1024;
/// Wait before subscribing again after Docker ended the stream.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(2);

/// Where the agent's own code reports worker events.
#[derive(Clone)]
pub(crate) struct Reporter(mpsc::UnboundedSender<WorkerEvent>);

impl Reporter {
    pub(crate) fn report(&self, worker_id: String, event: WorkerEventKind, exit_code: Option<i64>) {
        // Fails only after the forwarder ended, at shutdown.
        let _ = self.0.send(WorkerEvent {
            worker_id,
            event,
            exit_code,
            at: now(),
        });
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The reporter and the forwarder task's future (run it once, until `end`).
pub(crate) fn forwarder(
    docker: Docker,
    node_id: String,
    link: Arc<Link>,
    end: CancellationToken,
) -> (Reporter, impl Future<Output = ()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Reporter(tx), forward(docker, node_id, link, rx, end))
}

/// Pending events, sent in order as far as the link takes them.
struct Outbox {
    pending: VecDeque<WorkerEvent>,
}

impl Outbox {
    fn push(&mut self, ev: WorkerEvent) {
        if self.pending.len() == PENDING_MAX {
            let dropped = self.pending.pop_front();
            debug!(
                ?dropped,
                "worker event dropped: too many while disconnected"
            );
        }
        self.pending.push_back(ev);
    }

    fn flush(&mut self, link: &Link) {
        while let Some(ev) = self.pending.front() {
            if !link.send_msg(&Message::WorkerEvent(ev.clone())) {
                return;
            }
            self.pending.pop_front();
        }
    }
}

async fn forward(
    docker: Docker,
    node_id: String,
    link: Arc<Link>,
    mut own: mpsc::UnboundedReceiver<WorkerEvent>,
    end: CancellationToken,
) {
    let mut out = Outbox {
        pending: VecDeque::new(),
    };
    let mut up = link.watch();
    // Nanosecond time of the newest Docker event forwarded: a new
    // subscription starts there, so nothing is reported twice or skipped
    // while the engine stays up.
    let mut last_nano: i64 = 0;
    loop {
        let since = (last_nano > 0).then(|| {
            format!(
                "{}.{:09}",
                last_nano / 1_000_000_000,
                last_nano % 1_000_000_000
            )
        });
        let mut stream = docker.events(Some(bollard::query_parameters::EventsOptions {
            since,
            until: None,
            filters: Some(filters(&node_id)),
        }));
        loop {
            tokio::select! {
                _ = end.cancelled() => return,
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => {
                        let t = ev.time_nano.unwrap_or(0);
                        if t != 0 && t <= last_nano {
                            continue;
                        }
                        last_nano = last_nano.max(t);
                        if let Some(ev) = from_docker(ev) {
                            out.push(ev);
                            out.flush(&link);
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "Docker event stream failed; subscribing again");
                        break;
                    }
                    None => break,
                },
                Some(ev) = own.recv() => {
                    out.push(ev);
                    out.flush(&link);
                }
                Ok(()) = up.changed() => out.flush(&link),
            }
        }
        drop(stream);
        tokio::select! {
            _ = end.cancelled() => return,
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
        }
    }
}

fn filters(node_id: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        (
            "event".to_string(),
            vec!["die".to_string(), "oom".to_string()],
        ),
        (
            "label".to_string(),
            vec![format!("{}={node_id}", labels::NODE)],
        ),
    ])
}

/// The worker event a Docker event stands for, if any.
fn from_docker(ev: bollard::models::EventMessage) -> Option<WorkerEvent> {
    let attrs = ev.actor.and_then(|a| a.attributes).unwrap_or_default();
    let worker_id = attrs.get(labels::WORKER)?.clone();
    let event = match ev.action.as_deref() {
        Some("oom") => WorkerEventKind::OomKilled,
        Some("die") => WorkerEventKind::Exited,
        _ => return None,
    };
    Some(WorkerEvent {
        worker_id,
        event,
        exit_code: attrs.get("exitCode").and_then(|c| c.parse().ok()),
        at: now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: usize) -> WorkerEvent {
        WorkerEvent {
            worker_id: format!("w{n}"),
            event: WorkerEventKind::Exited,
            exit_code: Some(0),
            at: String::new(),
        }
    }

    #[tokio::test]
    async fn pending_events_wait_for_the_link_in_order_and_are_bounded() {
        let link = Link::new();
        let mut out = Outbox {
            pending: VecDeque::new(),
        };
        for n in 0..PENDING_MAX + 5 {
            out.push(ev(n));
        }
        out.flush(&link); // no link: nothing leaves
        assert_eq!(out.pending.len(), PENDING_MAX);
        let (tx, mut rx) = mpsc::unbounded_channel();
        link.set(Some(tx));
        out.flush(&link);
        assert!(out.pending.is_empty());
        let mut sent = Vec::new();
        while let Ok(crate::conn::Outbound::Text(t)) = rx.try_recv() {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            sent.push(v["payload"]["worker_id"].as_str().unwrap().to_string());
        }
        // The five oldest were dropped; the rest went in order.
        let expected: Vec<String> = (5..PENDING_MAX + 5).map(|n| format!("w{n}")).collect();
        assert_eq!(sent, expected);
    }

    #[test]
    fn docker_die_and_oom_become_worker_events() {
        let msg = |action: &str, worker: Option<&str>| bollard::models::EventMessage {
            action: Some(action.into()),
            actor: Some(bollard::models::EventActor {
                id: Some("c".into()),
                attributes: Some(
                    worker
                        .map(|w| (labels::WORKER.to_string(), w.to_string()))
                        .into_iter()
                        .chain([("exitCode".to_string(), "3".to_string())])
                        .collect(),
                ),
            }),
            ..Default::default()
        };
        let die = from_docker(msg("die", Some("w1"))).unwrap();
        assert_eq!(
            (die.worker_id.as_str(), die.event, die.exit_code),
            ("w1", WorkerEventKind::Exited, Some(3))
        );
        assert_eq!(
            from_docker(msg("oom", Some("w1"))).unwrap().event,
            WorkerEventKind::OomKilled
        );
        assert!(from_docker(msg("die", None)).is_none());
        assert!(from_docker(msg("start", Some("w1"))).is_none());
    }
}
