//! Logs: a worker's output so far (and, with `follow`, as it comes) on a
//! channel, within credit.

use super::{Ctx, accepted, close, refuse};
use crate::channel::ChannelHandles;
use crate::docker::joined::Wait;
use crate::docker::{self, containers, exec};
use crate::protocol::{Logs, MAX_FRAME_PAYLOAD};
use futures_util::StreamExt;
use serde_json::json;

pub(super) async fn run(ctx: &Ctx, id: String, req: Logs, h: ChannelHandles) {
    let ch = req.channel;
    let container =
        match containers::inspect(&ctx.engine.docker, &ctx.engine.node_id, &req.worker_id).await {
            Ok(w) => w.container_id,
            Err(e) => return refuse(ctx, id, ch, e),
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
        ctx.engine.docker.logs(&container, Some(opts)),
        MAX_FRAME_PAYLOAD,
        Wait::Reading,
    );
    accepted(ctx, id, json!({}));
    let ChannelHandles {
        mut writer, cancel, ..
    } = h;
    let error = loop {
        tokio::select! {
            _ = cancel.cancelled() => { ctx.upstream.channels.remove(ch); return; }
            item = stream.next() => match item {
                None => break None,
                Some(Ok((kind, data))) => {
                    if writer.write(kind, data).await.is_err() {
                        ctx.upstream.channels.remove(ch);
                        return;
                    }
                }
                Some(Err(e)) => break Some(docker::to_error(e, "read logs")),
            }
        }
    };
    close(ctx, ch, None, error);
}
