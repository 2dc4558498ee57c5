//! Files: stat a path in a worker, and tar archives in (`put_archive`) and
//! out (`get_archive`) over a channel. Docker is addressed by the id of the
//! container whose labels were checked, never by a name someone else could
//! hold.

use super::{Ctx, accepted, close, refuse};
use crate::channel::{ChannelHandles, Inbound};
use crate::docker::tar_guard::{Refused, TarGuard};
use crate::docker::{self, archive, containers};
use crate::protocol::{
    Archive, ErrorBody, ErrorCode, MAX_FRAME_PAYLOAD, Stat, StatResult, StreamKind,
};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::json;
use std::sync::{Arc, Mutex};

pub(super) async fn stat(ctx: &Ctx, s: &Stat) -> Result<StatResult, docker::Error> {
    let w = containers::inspect(&ctx.engine.docker, &ctx.engine.node_id, &s.worker_id).await?;
    archive::stat(&ctx.engine.docker, &w.container_id, &s.path).await
}

/// How much of an archive goes out at once: up to four frames, queued
/// together so that they leave in one write and the server reads them at
/// one wake-up (about 15% less CPU per MB than frame by frame,
/// docs/performance.md); at most a quarter of the window, so that several
/// bursts are in flight and the stream never waits for credit in lock step.
fn burst(window: u64) -> usize {
    (window / 4).clamp(MAX_FRAME_PAYLOAD as u64, 4 * MAX_FRAME_PAYLOAD as u64) as usize
}

pub(super) async fn get(ctx: &Ctx, id: String, req: Archive, h: ChannelHandles) {
    let ch = req.channel;
    let container =
        match containers::inspect(&ctx.engine.docker, &ctx.engine.node_id, &req.worker_id).await {
            Ok(w) => w.container_id,
            Err(e) => return refuse(ctx, id, ch, e),
        };
    let mut stream =
        archive::download(&ctx.engine.docker, &container, &req.path, burst(req.window));
    // The first chunk tells whether the path exists: answer only then.
    let first = match stream.next().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            return refuse(
                ctx,
                id,
                ch,
                docker::to_error(e, &format!("read {}", req.path)),
            );
        }
        None => Bytes::new(),
    };
    accepted(ctx, id, json!({}));
    let ChannelHandles {
        mut writer, cancel, ..
    } = h;
    let mut next = Some(Ok(first));
    let error = loop {
        let item = match next.take() {
            Some(i) => Some(i),
            None => tokio::select! {
                _ = cancel.cancelled() => { ctx.upstream.channels.remove(ch); return; }
                i = stream.next() => i,
            },
        };
        match item {
            None => break None,
            Some(Ok(b)) => {
                if writer.write(StreamKind::Data, b).await.is_err() {
                    ctx.upstream.channels.remove(ch);
                    return;
                }
            }
            Some(Err(e)) => break Some(docker::to_error(e, "read archive")),
        }
    };
    close(ctx, ch, None, error);
}

pub(super) async fn put(ctx: &Ctx, id: String, req: Archive, h: ChannelHandles) {
    let ch = req.channel;
    let checked =
        match containers::inspect(&ctx.engine.docker, &ctx.engine.node_id, &req.worker_id).await {
            Ok(w) => archive::stat(&ctx.engine.docker, &w.container_id, &req.path)
                .await
                .map(|s| (w.container_id, s)),
            Err(e) => Err(e),
        };
    let container = match checked {
        Ok((container, s)) if s.exists && s.is_dir => container,
        Ok(_) => {
            let msg = format!(
                "{}: no such directory in worker {}",
                req.path, req.worker_id
            );
            return refuse(ctx, id, ch, ErrorBody::new(ErrorCode::NotFound, msg));
        }
        Err(e) => return refuse(ctx, id, ch, e),
    };
    accepted(ctx, id, json!({}));
    let ChannelHandles { reader, .. } = h;
    // Frames become the request body as Docker reads it: credit is granted
    // only as fast as the engine consumes the archive.
    // Only an explicit EOF ends the archive cleanly; a close or a vanished
    // channel fails the upload so Docker never extracts a truncated tar.
    // Every header passes the node's guard first (`tar_guard`): no device,
    // no setuid bit, no capability reaches a bind of the host.
    let refused = Arc::new(Mutex::new(None::<Refused>));
    let seen = refused.clone();
    let body = futures_util::stream::unfold(Some((reader, TarGuard::new())), move |st| {
        let seen = seen.clone();
        async move {
            let (mut r, mut guard) = st?;
            let failed = |msg: String| Some((Err(std::io::Error::other(msg)), None));
            let refuse = |e: Refused| {
                let msg = e.to_string();
                *seen.lock().unwrap() = Some(e);
                failed(msg)
            };
            match r.recv().await {
                Some(Inbound::Data(_, b)) => match guard.push(b) {
                    Ok(pieces) => Some((Ok(pieces), Some((r, guard)))),
                    Err(e) => refuse(e),
                },
                Some(Inbound::Eof) => guard.finish().err().and_then(refuse),
                Some(Inbound::Close(c)) => failed(
                    c.error
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "upload cancelled".into()),
                ),
                None => failed("upload channel closed".into()),
            }
        }
    })
    .map_ok(|pieces| futures_util::stream::iter(pieces.into_iter().map(Ok)))
    .try_flatten();
    let result = archive::upload(&ctx.engine.docker, &container, &req.path, body).await;
    let refusal = refused.lock().unwrap().take();
    let error = match (refusal, result) {
        (Some(r @ Refused::Kind { .. }), _) => {
            Some(ErrorBody::new(ErrorCode::PolicyDenied, r.to_string()))
        }
        (Some(r), _) => Some(ErrorBody::new(ErrorCode::InvalidRequest, r.to_string())),
        (None, r) => r.err().map(ErrorBody::from),
    };
    if ctx.upstream.channels.is_open(ch) {
        close(ctx, ch, None, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_bursts_are_a_quarter_window_of_one_to_four_frames() {
        const KIB: u64 = 1024;
        assert_eq!(burst(1024 * KIB), 256 * 1024);
        assert_eq!(burst(512 * KIB), 128 * 1024);
        // A server's default window: frame by frame.
        assert_eq!(burst(256 * KIB), MAX_FRAME_PAYLOAD);
        assert_eq!(burst(8), MAX_FRAME_PAYLOAD);
        assert_eq!(burst(16 * 1024 * KIB), 4 * MAX_FRAME_PAYLOAD);
    }
}
