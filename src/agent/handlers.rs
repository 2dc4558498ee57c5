//! Request handlers: one task per request, each in its own span. Channel
//! requests (exec, logs, archives) are opened in the read loop before their
//! task starts, so data sent right behind the request is never lost.

use super::Ctx;
use crate::conn::Outbound;
use crate::docker::joined::Wait;
use crate::docker::{self, archive, containers, exec};
use crate::mux::{ChannelHandles, Inbound};
use crate::protocol::{
    Archive, ChannelClose, ErrorBody, ErrorCode, Exec, Logs, MAX_FRAME_PAYLOAD, Message, Request,
    StreamKind, WorkerList,
};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, debug, info, info_span, warn};

fn reply<T: Serialize>(ctx: &Ctx, id: String, r: Result<T, ErrorBody>) {
    let m = match r {
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
    ctx.replies.lock().unwrap().done(&id, text.clone());
    ctx.link.send(Outbound::Text(text));
}

fn close(ctx: &Ctx, channel: u32, exit_code: Option<i64>, error: Option<ErrorBody>) {
    ctx.channels.close(ChannelClose {
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

pub(super) fn dispatch(id: String, request: Request, ctx: Arc<Ctx>) {
    match ctx.replies.lock().unwrap().begin(&id) {
        None => {}
        Some(Some(done)) => {
            ctx.link.send(Outbound::Text(done));
            return;
        }
        Some(None) => return, // still running: its reply goes out when done
    }
    let channels = &ctx.channels;
    if ctx.degraded.load(std::sync::atomic::Ordering::Relaxed)
        && !matches!(request, Request::Resize(_))
    {
        return reply::<()>(
            &ctx,
            id,
            Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "node {} is degraded: its Docker engine is unreachable",
                    ctx.node_id
                ),
            )),
        );
    }
    let span = info_span!("request", request_id = %id, kind = request.kind());
    // Channel-opening requests: open now, in order with the frames behind them.
    let opened = match &request {
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
        }) => match channels.open(*channel, *window) {
            Ok(h) => Some(h),
            Err(e) => return reply::<()>(&ctx, id, Err(e)),
        },
        _ => None,
    };
    let node = ctx.node_id.clone();
    let tasks = ctx.clone();
    let task = async move {
        let d = &ctx.docker;
        match (request, opened) {
            (Request::Spawn(mut s), _) => {
                // Already made (a repeated spawn): the same worker, no new checks.
                // (`containers::spawn` relies on this check having been made.)
                if let Ok(existing) = containers::inspect(d, &node, &s.worker_id).await {
                    return reply(&ctx, id, Ok(existing));
                }
                // Counting running workers takes a listing: only when a limit needs it.
                let running = if ctx.concurrency_limited() {
                    containers::running_count(d, &node).await
                } else {
                    Ok(0)
                };
                let admitted = running
                    .and_then(|running| ctx.admit_spawn(&mut s.spec, running))
                    .and_then(|()| ctx.net_plan(&s.spec));
                let creds = super::nodeconfig::credentials(&ctx, &s.spec.image);
                // Host paths are resolved on the node, and nothing that could
                // redirect them runs between the check and the start.
                let _mount_guard = if s.spec.mounts.is_empty() {
                    None
                } else {
                    Some(super::mounts::MOUNT_LOCK.lock().await)
                };
                let admitted = match admitted {
                    Ok(plan) if !s.spec.mounts.is_empty() => {
                        match containers::writable_mounts(d, &node).await {
                            Ok(writable) => super::mounts::resolve_all(
                                &mut s.spec.mounts,
                                &ctx.policy.allowed_host_paths,
                                &writable,
                            )
                            .map(|()| plan),
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                };
                let r = match admitted {
                    Ok(plan) => {
                        let guard = ctx.guard.as_ref().map(|_| ()).map_err(String::as_str);
                        containers::spawn(
                            d,
                            &ctx.pool,
                            &node,
                            ctx.defaults,
                            &s,
                            creds,
                            &plan,
                            guard,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                if let Ok(w) = &r {
                    info!(worker_id = %w.worker_id, "worker running");
                    if let Some(at) = w.deadline {
                        schedule_reaper(ctx.clone(), w.worker_id.clone(), at);
                    }
                }
                reply(&ctx, id, r);
            }
            (Request::Stop(s), _) => reply(
                &ctx,
                id,
                containers::stop(d, &node, &s.worker_id, s.timeout_secs.unwrap_or(10)).await,
            ),
            (Request::Remove(r), _) => {
                let res = remove_worker(&ctx, &r.worker_id, r.force).await;
                reply(&ctx, id, res.map(|()| json!({ "worker_id": r.worker_id })));
            }
            (Request::Configure(c), _) => reply(&ctx, id, super::nodeconfig::apply(&ctx, c).await),
            (Request::Inspect(w), _) => {
                reply(&ctx, id, containers::inspect(d, &node, &w.worker_id).await)
            }
            (Request::ListWorkers, _) => reply(
                &ctx,
                id,
                containers::list(d, &node)
                    .await
                    .map(|workers| WorkerList { workers }),
            ),
            (Request::Stat(s), _) => {
                let r = match containers::inspect(d, &node, &s.worker_id).await {
                    Ok(w) => archive::stat(d, &w.container_id, &s.path).await,
                    Err(e) => Err(e),
                };
                reply(&ctx, id, r)
            }
            (Request::Resize(r), _) => {
                let exec_id = ctx.execs.lock().unwrap().get(&r.channel).cloned();
                let res = match exec_id {
                    Some(e) => exec::resize(d, &e, r.size).await,
                    None => Err(ErrorBody::new(
                        ErrorCode::NotFound,
                        format!("no exec on channel {}", r.channel),
                    )),
                };
                reply(&ctx, id, res.map(|()| json!({})));
            }
            (Request::Exec(e), Some(h)) => run_exec(&ctx, id, e, h).await,
            (Request::Logs(l), Some(h)) => run_logs(&ctx, id, l, h).await,
            (Request::GetArchive(a), Some(h)) => run_get(&ctx, id, a, h).await,
            (Request::PutArchive(a), Some(h)) => run_put(&ctx, id, a, h).await,
            (r, None) => reply::<()>(
                &ctx,
                id,
                Err(ErrorBody::new(
                    ErrorCode::Internal,
                    format!("{} without channel", r.kind()),
                )),
            ),
        }
    };
    tasks.spawn(task.instrument(span));
}

/// Removes a worker and forgets its checked container id.
async fn remove_worker(ctx: &Ctx, worker_id: &str, force: bool) -> Result<(), ErrorBody> {
    let removed = containers::remove(&ctx.docker, &ctx.pool, &ctx.node_id, worker_id, force).await;
    ctx.owned.lock().unwrap().remove(worker_id);
    removed
}

/// Creates the exec of `req` in the worker's container, once it is known
/// to be this node's. A worker checked before is addressed by its container
/// id (one engine request); otherwise the check (an inspect) comes first,
/// then the exec is created in the container it found.
async fn create_owned_exec(ctx: &Ctx, req: &Exec) -> Result<String, ErrorBody> {
    let known = ctx.owned.lock().unwrap().get(&req.worker_id).cloned();
    if let Some(container) = known {
        match exec::create(&ctx.docker, &container, req).await {
            Err(e) if e.code == ErrorCode::NotFound => {
                // Gone (removed behind the agent's back): check the name anew.
                ctx.owned.lock().unwrap().remove(&req.worker_id);
            }
            r => return r,
        }
    }
    // The check first: a container under the worker's name that tether did
    // not create never gets an exec, not even one that is never started.
    let info = containers::inspect(&ctx.docker, &ctx.node_id, &req.worker_id).await?;
    let exec_id = exec::create(&ctx.docker, &info.container_id, req).await?;
    ctx.owned
        .lock()
        .unwrap()
        .insert(req.worker_id.clone(), info.container_id);
    Ok(exec_id)
}

/// Streams an exec's output within credit and feeds it stdin.
async fn run_exec(ctx: &Ctx, id: String, req: Exec, h: ChannelHandles) {
    let ch = req.channel;
    let channels = &ctx.channels;
    let mut req = req;
    if let Err(e) = ctx.admit_exec(&mut req.timeout_secs) {
        channels.remove(ch);
        return reply::<()>(ctx, id, Err(e));
    }
    let started = match create_owned_exec(ctx, &req).await {
        Ok(exec_id) => exec::attach(&ctx.docker, exec_id, req.tty).await,
        Err(e) => Err(e),
    };
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            channels.remove(ch);
            return reply::<()>(ctx, id, Err(e));
        }
    };
    let exec_id = started.exec_id.clone();
    ctx.execs.lock().unwrap().insert(ch, exec_id.clone());
    channels.set_tag(ch, &req.worker_id);
    if let Some(size) = req.size
        && let Err(e) = exec::resize(&ctx.docker, &exec_id, size).await
    {
        debug!(error = %e, "initial resize failed");
    }
    reply(ctx, id, Ok(json!({ "exec_id": exec_id })));
    let ChannelHandles {
        mut writer,
        mut reader,
        cancel,
    } = h;
    let mut input = started.input;
    let stdin = tokio::spawn(async move {
        while let Some(ev) = reader.recv().await {
            match ev {
                Inbound::Data(_, b) => {
                    if input.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Inbound::Eof => {
                    let _ = input.shutdown().await;
                    break;
                }
                Inbound::Close(_) => break,
            }
        }
        // Hold the write half until the channel ends: dropping it early
        // could end the process' input before it asked for EOF.
        reader.recv().await;
        drop(input);
    });
    let mut output = exec::joined(started.output, MAX_FRAME_PAYLOAD, Wait::Asleep);
    let limit = req.timeout_secs.map(std::time::Duration::from_secs);
    let deadline = tokio::time::sleep(limit.unwrap_or(std::time::Duration::from_secs(365 * 86400)));
    tokio::pin!(deadline);
    let timed_out = || async {
        let secs = req.timeout_secs.unwrap_or_default();
        let detail = match exec::kill(&ctx.docker, &exec_id).await {
            Ok(n) => format!("killed {n} process(es)"),
            Err(e) => format!("could not kill it: {}", e.message),
        };
        warn!(channel = ch, secs, %detail, "exec timed out");
        ErrorBody::new(
            ErrorCode::Timeout,
            format!("exec exceeded its {secs} s limit; {detail}"),
        )
    };
    // Output goes straight out within credit while connected; while not,
    // or while earlier output still waits, it goes through the spool.
    let mut up = ctx.link.watch();
    let mut spool = super::spool::Spool::new(ctx.spools.clone(), ch);
    let mut pending: Option<(StreamKind, Bytes)> = None;
    let mut finished = false;
    let outcome: Result<(), Option<ErrorBody>> = loop {
        if let Err(e) = spool.drain(&mut writer) {
            break Err(Some(ErrorBody::new(
                ErrorCode::Internal,
                format!("read the output spool: {e}"),
            )));
        }
        if let Some((kind, data)) = &mut pending {
            if spool.is_empty() {
                writer.send_available(*kind, data);
            }
            let connected = *up.borrow_and_update();
            if !data.is_empty() && (!connected || !spool.is_empty()) {
                spool.push(*kind, data, !connected);
            }
            if data.is_empty() {
                pending = None;
            }
        }
        if finished && pending.is_none() && spool.is_empty() {
            break Ok(());
        }
        let waiting = pending.is_some() || !spool.is_empty();
        tokio::select! {
            _ = cancel.cancelled() => break Err(None),
            // Waiting for credit (a stalled reader) does not stop the clock.
            _ = &mut deadline, if limit.is_some() && !finished => break Err(Some(timed_out().await)),
            r = writer.credit(spool.need()), if waiting => if r.is_err() { break Err(None) },
            // A link going down lets held-back output into the spool.
            _ = up.changed(), if pending.is_some() => {}
            item = output.next(), if pending.is_none() && !finished => match item {
                None => finished = true,
                Some(Ok(chunk)) => pending = Some(chunk),
                Some(Err(e)) => break Err(Some(docker::to_error(e, "read exec output"))),
            }
        }
    };
    if spool.dropped > 0 {
        warn!(
            channel = ch,
            bytes = spool.dropped,
            "exec output dropped: the spool was full while the server was unreachable"
        );
    }
    match outcome {
        Ok(()) => match exec::exit_code(&ctx.docker, &exec_id).await {
            Ok(code) => close(ctx, ch, Some(code), None),
            Err(e) => close(ctx, ch, None, Some(e)),
        },
        Err(Some(e)) => close(ctx, ch, None, Some(e)),
        Err(None) => {
            // Nobody reads it any more (the client left, or the server lost
            // the channel): end the process rather than leave it running.
            let killed = exec::kill(&ctx.docker, &exec_id).await;
            debug!(channel = ch, ?killed, "exec channel cancelled");
        }
    }
    ctx.execs.lock().unwrap().remove(&ch);
    stdin.abort();
}

async fn run_logs(ctx: &Ctx, id: String, req: Logs, h: ChannelHandles) {
    let ch = req.channel;
    let channels = &ctx.channels;
    let container = match containers::inspect(&ctx.docker, &ctx.node_id, &req.worker_id).await {
        Ok(w) => w.container_id,
        Err(e) => {
            channels.remove(ch);
            return reply::<()>(ctx, id, Err(e));
        }
    };
    let opts = bollard::query_parameters::LogsOptions {
        follow: req.follow,
        stdout: true,
        stderr: true,
        since: req.since.unwrap_or(0).clamp(0, i32::MAX as i64) as i32,
        until: 0,
        timestamps: req.timestamps,
        tail: req
            .tail
            .map(|n| n.to_string())
            .unwrap_or_else(|| "all".into()),
    };
    let mut stream = exec::joined(
        ctx.docker.logs(&container, Some(opts)),
        MAX_FRAME_PAYLOAD,
        Wait::Reading,
    );
    reply(ctx, id, Ok(json!({})));
    let ChannelHandles {
        mut writer, cancel, ..
    } = h;
    let error = loop {
        tokio::select! {
            _ = cancel.cancelled() => { channels.remove(ch); return; }
            item = stream.next() => match item {
                None => break None,
                Some(Ok((kind, data))) => {
                    if writer.write(kind, data).await.is_err() {
                        channels.remove(ch);
                        return;
                    }
                }
                Some(Err(e)) => break Some(docker::to_error(e, "read logs")),
            }
        }
    };
    close(ctx, ch, None, error);
}

/// How much of an archive goes out at once: up to four frames, queued
/// together so that they leave in one write and the server reads them at
/// one wake-up (about 15% less CPU per MB than frame by frame,
/// docs/performance.md); at most a quarter of the window, so that several
/// bursts are in flight and the stream never waits for credit in lock step.
fn burst(window: u64) -> usize {
    (window / 4).clamp(MAX_FRAME_PAYLOAD as u64, 4 * MAX_FRAME_PAYLOAD as u64) as usize
}

async fn run_get(ctx: &Ctx, id: String, req: Archive, h: ChannelHandles) {
    let ch = req.channel;
    let channels = &ctx.channels;
    // Docker is addressed by the id of the container whose labels were
    // checked, never by a name someone else could hold.
    let container = match containers::inspect(&ctx.docker, &ctx.node_id, &req.worker_id).await {
        Ok(w) => w.container_id,
        Err(e) => {
            channels.remove(ch);
            return reply::<()>(ctx, id, Err(e));
        }
    };
    let mut stream = archive::download(&ctx.docker, &container, &req.path, burst(req.window));
    // The first chunk tells whether the path exists: answer only then.
    let first = match stream.next().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            channels.remove(ch);
            return reply::<()>(
                ctx,
                id,
                Err(docker::to_error(e, &format!("read {}", req.path))),
            );
        }
        None => Bytes::new(),
    };
    reply(ctx, id, Ok(json!({})));
    let ChannelHandles {
        mut writer, cancel, ..
    } = h;
    let mut next = Some(Ok(first));
    let error = loop {
        let item = match next.take() {
            Some(i) => Some(i),
            None => tokio::select! {
                _ = cancel.cancelled() => { channels.remove(ch); return; }
                i = stream.next() => i,
            },
        };
        match item {
            None => break None,
            Some(Ok(b)) => {
                if writer.write(StreamKind::Data, b).await.is_err() {
                    channels.remove(ch);
                    return;
                }
            }
            Some(Err(e)) => break Some(docker::to_error(e, "read archive")),
        }
    };
    close(ctx, ch, None, error);
}

async fn run_put(ctx: &Ctx, id: String, req: Archive, h: ChannelHandles) {
    let ch = req.channel;
    let channels = &ctx.channels;
    let mut container = String::new();
    let check = match containers::inspect(&ctx.docker, &ctx.node_id, &req.worker_id).await {
        Ok(w) => {
            container = w.container_id;
            archive::stat(&ctx.docker, &container, &req.path).await
        }
        Err(e) => Err(e),
    };
    match check {
        Ok(s) if s.exists && s.is_dir => {}
        Ok(_) => {
            channels.remove(ch);
            return reply::<()>(
                ctx,
                id,
                Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!(
                        "{}: no such directory in worker {}",
                        req.path, req.worker_id
                    ),
                )),
            );
        }
        Err(e) => {
            channels.remove(ch);
            return reply::<()>(ctx, id, Err(e));
        }
    }
    reply(ctx, id, Ok(json!({})));
    let ChannelHandles { reader, .. } = h;
    // Frames become the request body as Docker reads it: credit is granted
    // only as fast as the engine consumes the archive.
    // Only an explicit EOF ends the archive cleanly; a close or a vanished
    // channel fails the upload so Docker never extracts a truncated tar.
    let body = futures_util::stream::unfold(Some(reader), |r| async move {
        let mut r = r?;
        let failed = |msg: String| Some((Err(std::io::Error::other(msg)), None));
        match r.recv().await {
            Some(Inbound::Data(_, b)) => Some((Ok(b), Some(r))),
            Some(Inbound::Eof) => None,
            Some(Inbound::Close(c)) => failed(
                c.error
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "upload cancelled".into()),
            ),
            None => failed("upload channel closed".into()),
        }
    });
    let result = archive::upload(&ctx.docker, &container, &req.path, body).await;
    if channels.is_open(ch) {
        close(ctx, ch, None, result.err());
    }
}

/// Removes networks whose worker container is gone (after crashes or a
/// `docker rm` behind tether's back).
pub(super) async fn collect_garbage(ctx: &Ctx) {
    if let Ok(live) = containers::list_ids(&ctx.docker, &ctx.node_id).await {
        docker::egress::collect_garbage(&ctx.docker, &ctx.pool, &ctx.node_id, &live).await;
    }
    match containers::orphan_networks(&ctx.docker, &ctx.node_id).await {
        Ok(nets) => {
            for n in nets {
                match docker::networks::remove(&ctx.docker, &ctx.pool, &ctx.node_id, &n).await {
                    Ok(()) => info!(network = %n, "removed orphaned worker network"),
                    Err(e) => warn!(network = %n, error = %e, "could not remove orphaned network"),
                }
            }
        }
        Err(e) => warn!(error = %e, "could not look for orphaned networks"),
    }
}

/// Stops and removes a worker at its deadline (Unix seconds) and reports a
/// `timeout` worker event. Scheduled at spawn and again when the agent
/// starts, from the deadline label, so a restart does not forget it.
pub(super) fn schedule_reaper(ctx: Arc<Ctx>, worker_id: String, deadline: u64) {
    let tasks = ctx.clone();
    tasks.spawn(async move {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        tokio::time::sleep(std::time::Duration::from_secs(deadline.saturating_sub(now))).await;
        match remove_worker(&ctx, &worker_id, true).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_bursts_are_a_quarter_window_of_one_to_four_frames() {
        const KIB: u64 = 1024;
        assert_eq!(burst(1024 * KIB), 256 * 1024);
        assert_eq!(burst(512 * KIB), 128 * 1024);
        // A server's default window: frame by frame, as before.
        assert_eq!(burst(256 * KIB), MAX_FRAME_PAYLOAD);
        assert_eq!(burst(8), MAX_FRAME_PAYLOAD);
        assert_eq!(burst(16 * 1024 * KIB), 4 * MAX_FRAME_PAYLOAD);
    }
}
