//! Exec: start a process in a worker, feed it stdin, pump its output to the
//! channel within credit (through the spool while the server is away), and
//! report its exit code; resize its terminal.

use super::{Ctx, accepted, close, refuse};
use crate::channel::{ChannelHandles, ChannelReader, ChannelWriter, Inbound};
use crate::docker::joined::Wait;
use crate::docker::{self, containers, exec};
use crate::protocol::{ErrorBody, ErrorCode, Exec, MAX_FRAME_PAYLOAD, Resize, StreamKind};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What the agent knows about running execs and the containers they run in.
#[derive(Default)]
pub(crate) struct ExecTable {
    /// Docker exec id of each open exec channel (for resize).
    by_channel: Mutex<HashMap<u32, String>>,
    /// Container id of each worker already found to be this node's: its
    /// execs go to that id without checking again (Docker never gives an id
    /// to another container, while a name can be taken again).
    owned: Mutex<HashMap<String, String>>,
}

impl ExecTable {
    fn exec_of(&self, channel: u32) -> Option<String> {
        self.by_channel.lock().unwrap().get(&channel).cloned()
    }

    fn started(&self, channel: u32, exec_id: String) {
        self.by_channel.lock().unwrap().insert(channel, exec_id);
    }

    /// The exec of `channel` is over (or its channel was lost).
    pub(crate) fn ended(&self, channel: u32) {
        self.by_channel.lock().unwrap().remove(&channel);
    }

    fn container_of(&self, worker_id: &str) -> Option<String> {
        self.owned.lock().unwrap().get(worker_id).cloned()
    }

    fn owned(&self, worker_id: &str, container_id: String) {
        self.owned
            .lock()
            .unwrap()
            .insert(worker_id.to_string(), container_id);
    }

    /// The worker is gone: its name may be taken by anything next.
    pub(crate) fn forget_worker(&self, worker_id: &str) {
        self.owned.lock().unwrap().remove(worker_id);
    }
}

pub(super) async fn resize(ctx: &Ctx, r: &Resize) -> Result<serde_json::Value, docker::Error> {
    match ctx.execs.exec_of(r.channel) {
        Some(e) => exec::resize(&ctx.engine.docker, &e, r.size)
            .await
            .map(|()| json!({})),
        None => Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("no exec on channel {}", r.channel),
        )
        .into()),
    }
}

/// Creates the exec of `req` in the worker's container, once it is known
/// to be this node's. A worker checked before is addressed by its container
/// id (one engine request); otherwise the check (an inspect) comes first,
/// then the exec is created in the container it found.
async fn create_owned(ctx: &Ctx, req: &Exec) -> Result<String, docker::Error> {
    if let Some(container) = ctx.execs.container_of(&req.worker_id) {
        match exec::create(&ctx.engine.docker, &container, req).await {
            // Gone (removed behind the agent's back): check the name anew.
            Err(e) if e.code() == ErrorCode::NotFound => ctx.execs.forget_worker(&req.worker_id),
            r => return r,
        }
    }
    // The check first: a container under the worker's name that tether did
    // not create never gets an exec, not even one that is never started.
    let info = containers::inspect(&ctx.engine.docker, &ctx.engine.node_id, &req.worker_id).await?;
    let exec_id = exec::create(&ctx.engine.docker, &info.container_id, req).await?;
    ctx.execs.owned(&req.worker_id, info.container_id);
    Ok(exec_id)
}

/// Runs an exec on its channel, from admission to the exit code.
pub(super) async fn run(ctx: &Ctx, id: String, mut req: Exec, h: ChannelHandles) {
    let ch = req.channel;
    if let Err(e) = ctx.node.admit_exec(&mut req.timeout_secs) {
        return refuse(ctx, id, ch, e);
    }
    let started = match create_owned(ctx, &req).await {
        Ok(exec_id) => exec::attach(&ctx.engine.docker, exec_id, req.tty).await,
        Err(e) => Err(e),
    };
    let started = match started {
        Ok(s) => s,
        Err(e) => return refuse(ctx, id, ch, e),
    };
    let exec_id = started.exec_id.clone();
    ctx.execs.started(ch, exec_id.clone());
    ctx.upstream
        .channels
        .set_tag(ch, &req.worker_id, req.label.as_deref());
    if let Some(size) = req.size
        && let Err(e) = exec::resize(&ctx.engine.docker, &exec_id, size).await
    {
        debug!(error = %e, "initial resize failed");
    }
    accepted(ctx, id, json!({ "exec_id": exec_id }));
    let ChannelHandles {
        writer,
        reader,
        cancel,
    } = h;
    let stdin = tokio::spawn(feed_stdin(reader, started.input));
    let output = exec::joined(started.output, MAX_FRAME_PAYLOAD, Wait::Asleep);
    let limit = req.timeout_secs.map(Duration::from_secs);
    let outcome = pump_output(ctx, ch, output, writer, &cancel, limit).await;
    match outcome {
        Ok(()) => match exec::exit_code(&ctx.engine.docker, &exec_id).await {
            Ok(code) => close(ctx, ch, Some(code), None),
            Err(e) => close(ctx, ch, None, Some(e.into())),
        },
        Err(Ended::TimedOut) => {
            let secs = req.timeout_secs.unwrap_or_default();
            let detail = match exec::kill(&ctx.engine.docker, &exec_id).await {
                Ok(n) => format!("killed {n} process(es)"),
                Err(e) => format!("could not kill it: {}", ErrorBody::from(e).message),
            };
            warn!(channel = ch, secs, %detail, "exec timed out");
            let e = ErrorBody::new(
                ErrorCode::Timeout,
                format!("exec exceeded its {secs} s limit; {detail}"),
            );
            close(ctx, ch, None, Some(e));
        }
        Err(Ended::Failed(e)) => close(ctx, ch, None, Some(e)),
        Err(Ended::Abandoned) => {
            // Nobody reads it any more (the client left, or the server lost
            // the channel): end the process rather than leave it running.
            let killed = exec::kill(&ctx.engine.docker, &exec_id).await;
            debug!(channel = ch, ?killed, "exec channel cancelled");
        }
    }
    ctx.execs.ended(ch);
    stdin.abort();
}

/// Copies the channel's input to the process until EOF or close.
async fn feed_stdin(mut reader: ChannelReader, mut input: impl AsyncWrite + Unpin) {
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
    // Hold the write half until the channel ends: dropping it early could
    // end the process' input before it asked for EOF.
    reader.recv().await;
    drop(input);
}

/// Why an exec's output stopped before its end.
enum Ended {
    TimedOut,
    Failed(ErrorBody),
    /// The channel was cancelled or lost: nobody reads the output.
    Abandoned,
}

/// Sends the output to the channel: straight out within credit while the
/// link is up; while it is down, or while earlier output still waits, it
/// goes through the spool. Waiting for credit (a stalled reader) does not
/// stop the clock of `limit`.
async fn pump_output(
    ctx: &Ctx,
    ch: u32,
    mut output: impl Stream<Item = Result<(StreamKind, Bytes), bollard::errors::Error>> + Unpin,
    mut writer: ChannelWriter,
    cancel: &CancellationToken,
    limit: Option<Duration>,
) -> Result<(), Ended> {
    let deadline = tokio::time::sleep(limit.unwrap_or(Duration::from_secs(365 * 86400)));
    tokio::pin!(deadline);
    let mut up = ctx.upstream.link.watch();
    let mut spool = super::super::spool::Spool::new(ctx.spools.clone(), ch);
    let mut pending: Option<(StreamKind, Bytes)> = None;
    let mut finished = false;
    let outcome = loop {
        if let Err(e) = spool.drain(&mut writer).await {
            let msg = format!("read the output spool: {e}");
            break Err(Ended::Failed(ErrorBody::new(ErrorCode::Internal, msg)));
        }
        if let Some((kind, data)) = &mut pending {
            if spool.is_empty() {
                writer.send_available(*kind, data);
            }
            let connected = *up.borrow_and_update();
            if !data.is_empty() && (!connected || !spool.is_empty()) {
                spool.push(*kind, data, !connected).await;
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
            _ = cancel.cancelled() => break Err(Ended::Abandoned),
            _ = &mut deadline, if limit.is_some() && !finished => break Err(Ended::TimedOut),
            r = writer.credit(spool.need()), if waiting => if r.is_err() { break Err(Ended::Abandoned) },
            // A link going down lets held-back output into the spool.
            _ = up.changed(), if pending.is_some() => {}
            item = output.next(), if pending.is_none() && !finished => match item {
                None => finished = true,
                Some(Ok(chunk)) => pending = Some(chunk),
                Some(Err(e)) => break Err(Ended::Failed(docker::to_error(e, "read exec output"))),
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
    outcome
}
