//! The agent's commands: one task per request, each in its own span, one
//! file per family. Channel requests (exec, logs, archives) get their
//! channel opened in the read loop before their task starts, so data sent
//! right behind the request is never lost.

mod archive;
mod deploy;
mod exec;
mod logs;
mod tunnel;
mod worker;

pub(crate) use exec::ExecTable;
pub(crate) use tunnel::TunnelTable;
pub(super) use worker::{collect_garbage, schedule_reaper, stop_unadmitted};

use super::Ctx;
use crate::conn::Outbound;
use crate::protocol::{
    Archive, ChannelClose, ErrorBody, ErrorCode, Exec, Logs, Message, Request, Tunnel, WorkerList,
};
use serde::Serialize;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tracing::{Instrument, info_span};

/// Sends the reply to request `id` and remembers it for a repeat.
fn reply<T: Serialize, E: Into<ErrorBody>>(ctx: &Ctx, id: String, r: Result<T, E>) {
    let m = match r.map_err(Into::into) {
        Ok(v) => Message::Result {
            id: id.clone(),
            payload: serde_json::to_value(v).expect("results serialize"),
        },
        Err(error) => Message::Error {
            id: Some(id.clone()),
            error,
        },
    };
    let text = m.encode();
    ctx.upstream.replies.lock().unwrap().done(&id, text.clone());
    ctx.upstream.link.send(Outbound::Text(text));
}

/// Answers request `id` with success.
fn accepted<T: Serialize>(ctx: &Ctx, id: String, v: T) {
    reply::<T, ErrorBody>(ctx, id, Ok(v));
}

/// Refuses a channel request: the channel opened for it goes again.
fn refuse(ctx: &Ctx, id: String, channel: u32, e: impl Into<ErrorBody>) {
    ctx.upstream.channels.remove(channel);
    reply::<(), ErrorBody>(ctx, id, Err(e.into()));
}

fn close(ctx: &Ctx, channel: u32, exit_code: Option<i64>, error: Option<ErrorBody>) {
    ctx.upstream.channels.close(ChannelClose {
        channel,
        exit_code,
        error,
    });
}

/// Replies to recent requests, so a request the server sends again after a
/// reconnect (same id) is answered, not executed twice.
#[derive(Default)]
pub(crate) struct Replies {
    /// `None` while the request runs.
    map: HashMap<String, Option<String>>,
    order: VecDeque<String>,
}

impl Replies {
    const CAPACITY: usize = 4096;

    /// Registers `id`; returns what to do if it was seen before.
    fn begin(&mut self, id: &str) -> Option<Option<String>> {
        if let Some(r) = self.map.get(id) {
            return Some(r.clone());
        }
        self.map.insert(id.to_string(), None);
        self.order.push_back(id.to_string());
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        None
    }

    fn done(&mut self, id: &str, reply: String) {
        if let Some(slot) = self.map.get_mut(id) {
            *slot = Some(reply);
        }
    }
}

/// Runs request `id`: a repeat is answered from memory, the rest get a task.
pub(super) fn dispatch(id: String, request: Request, ctx: Arc<Ctx>) {
    match ctx.upstream.replies.lock().unwrap().begin(&id) {
        None => {}
        Some(Some(done)) => {
            ctx.upstream.link.send(Outbound::Text(done));
            return;
        }
        Some(None) => return, // still running: its reply goes out when done
    }
    if ctx.node.is_degraded() && !matches!(request, Request::Resize(_)) {
        let msg = format!(
            "node {} is degraded: its Docker engine is unreachable",
            ctx.engine.node_id
        );
        return reply::<(), ErrorBody>(&ctx, id, Err(ErrorBody::new(ErrorCode::Unavailable, msg)));
    }
    let span = info_span!("request", request_id = %id, kind = request.kind());
    // Channel-opening requests: open now, in order with the frames behind them.
    let channel = match &request {
        Request::Exec(Exec {
            channel, window, ..
        })
        | Request::Logs(Logs {
            channel, window, ..
        })
        | Request::PutArchive(Archive {
            channel, window, ..
        })
        | Request::GetArchive(Archive {
            channel, window, ..
        })
        | Request::Tunnel(Tunnel {
            channel, window, ..
        }) => match ctx.upstream.channels.open(*channel, *window) {
            Ok(h) => Some(h),
            Err(e) => return reply::<(), ErrorBody>(&ctx, id, Err(e)),
        },
        _ => None,
    };
    let tasks = ctx.clone();
    let task = async move {
        let node = ctx.engine.node_id.as_str();
        let d = &ctx.engine.docker;
        use crate::docker::containers;
        match (request, channel) {
            (Request::Spawn(s), _) => worker::spawn(&ctx, id, s).await,
            (Request::Stop(s), _) => {
                let timeout = s.timeout_secs.unwrap_or(10);
                reply(
                    &ctx,
                    id,
                    containers::stop(d, node, &s.worker_id, timeout).await,
                )
            }
            (Request::Remove(r), _) => {
                // A job's inference usage, read before its proxy goes.
                let usage = crate::docker::inference::job_usage(d, node, &r.worker_id).await;
                let res = worker::remove(&ctx, &r.worker_id, r.force).await;
                let answer = |()| match usage {
                    Some(u) => json!({ "worker_id": r.worker_id, "inference": u }),
                    None => json!({ "worker_id": r.worker_id }),
                };
                reply(&ctx, id, res.map(answer));
            }
            (Request::Configure(c), _) => {
                let carries = c.inference_backend.is_some();
                let before = ctx.node.applied().and_then(|a| a.config.inference_backend);
                let mut ack = super::nodeconfig::apply(&ctx.node, d, c).await;
                if let Ok(a) = &mut ack
                    && a.status == crate::protocol::AckStatus::Applied
                    && (carries || before.is_some())
                {
                    a.inference = Some(super::inference::converge(&ctx).await);
                    super::health::report_capabilities(&ctx).await;
                }
                let applied = ack
                    .as_ref()
                    .is_ok_and(|a| a.status == crate::protocol::AckStatus::Applied);
                reply(&ctx, id, ack);
                if applied {
                    worker::stop_unadmitted(&ctx).await;
                }
            }
            (Request::Inspect(w), _) => {
                let mut r = containers::inspect(d, node, &w.worker_id).await;
                if let Ok(info) = &mut r {
                    info.inference =
                        crate::docker::inference::job_usage(d, node, &w.worker_id).await;
                }
                reply(&ctx, id, r)
            }
            (Request::ListWorkers(_), _) => {
                let list = containers::list(d, node).await;
                reply(&ctx, id, list.map(|workers| WorkerList { workers }))
            }
            (Request::Stat(s), _) => reply(&ctx, id, archive::stat(&ctx, &s).await),
            (Request::Resize(r), _) => reply(&ctx, id, exec::resize(&ctx, &r).await),
            (Request::Exec(e), Some(h)) => exec::run(&ctx, id, e, h).await,
            (Request::Logs(l), Some(h)) => logs::run(&ctx, id, l, h).await,
            (Request::GetArchive(a), Some(h)) => archive::get(&ctx, id, a, h).await,
            (Request::PutArchive(a), Some(h)) => archive::put(&ctx, id, a, h).await,
            (Request::Tunnel(t), Some(h)) => tunnel::run(&ctx, id, t, h).await,
            (Request::DeployApply(a), _) => deploy::apply(&ctx, id, a).await,
            (Request::DeployInspect(r), _) => deploy::inspect(&ctx, id, r).await,
            (Request::DeployRemove(r), _) => deploy::remove(&ctx, id, r).await,
            (r, None) => {
                let e =
                    ErrorBody::new(ErrorCode::Internal, format!("{} without channel", r.kind()));
                reply::<(), ErrorBody>(&ctx, id, Err(e))
            }
        }
    };
    tasks.spawn(task.instrument(span));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_request_is_answered_from_memory_and_runs_once() {
        let mut r = Replies::default();
        assert_eq!(r.begin("a"), None);
        assert_eq!(r.begin("a"), Some(None), "still running: no second run");
        r.done("a", "reply".into());
        assert_eq!(r.begin("a"), Some(Some("reply".into())));
        // The oldest are forgotten beyond the capacity.
        for i in 0..Replies::CAPACITY {
            r.begin(&i.to_string());
        }
        assert_eq!(r.begin("a"), None);
    }
}
