//! Tunnel: one TCP connection from the node to a port of a worker, carried
//! by a channel. The agent dials the worker's address on its own bridge
//! network; nothing is published and the worker gains no path to the node.

use super::{Ctx, accepted, close, refuse};
use crate::channel::{ChannelHandles, ChannelReader, ChannelWriter, Inbound};
use crate::docker::containers;
use crate::protocol::{ErrorBody, ErrorCode, MAX_FRAME_PAYLOAD, StreamKind, Tunnel, WorkerState};
use bytes::BytesMut;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tracing::debug;

/// Open tunnels by worker, so that removing a worker ends its tunnels
/// with a reason (a removed container's connections may never say so).
#[derive(Default)]
pub(crate) struct TunnelTable {
    by_worker: std::sync::Mutex<std::collections::HashMap<String, Vec<u32>>>,
}

impl TunnelTable {
    fn opened(&self, worker_id: &str, channel: u32) {
        let mut m = self.by_worker.lock().unwrap();
        m.entry(worker_id.to_string()).or_default().push(channel);
    }

    fn ended(&self, worker_id: &str, channel: u32) {
        let mut m = self.by_worker.lock().unwrap();
        if let Some(v) = m.get_mut(worker_id) {
            v.retain(|c| *c != channel);
            if v.is_empty() {
                m.remove(worker_id);
            }
        }
    }

    /// The worker is gone: its tunnels close with that reason.
    pub(crate) fn worker_removed(&self, ctx: &Ctx, worker_id: &str) {
        let channels = self.by_worker.lock().unwrap().remove(worker_id);
        for channel in channels.unwrap_or_default() {
            let e = ErrorBody::new(
                ErrorCode::Unavailable,
                format!("worker {worker_id} was removed"),
            );
            close(ctx, channel, None, Some(e));
        }
    }
}

/// How long the worker's port has to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn run(ctx: &Ctx, id: String, req: Tunnel, h: ChannelHandles) {
    let ch = req.channel;
    let stream = match connect(ctx, &req).await {
        Ok(s) => s,
        Err(e) => return refuse(ctx, id, ch, e),
    };
    let _ = stream.set_nodelay(true);
    accepted(ctx, id, json!({}));
    let ChannelHandles {
        writer,
        reader,
        cancel,
    } = h;
    let (from_worker, to_worker) = stream.into_split();
    ctx.tunnels.opened(&req.worker_id, ch);
    // Each direction ends on its own (a half-close passes through); the
    // channel closes when both have.
    let both = async {
        let (down, up) = tokio::join!(downstream(from_worker, writer), upstream(reader, to_worker));
        down.err().or(up.err())
    };
    tokio::select! {
        error = both => close(ctx, ch, None, error),
        // The client or the server let go: the connection goes with it.
        _ = cancel.cancelled() => debug!(channel = ch, "tunnel cancelled"),
    }
    ctx.tunnels.ended(&req.worker_id, ch);
}

/// Checks the worker and port, then dials the worker's address.
async fn connect(ctx: &Ctx, req: &Tunnel) -> Result<TcpStream, ErrorBody> {
    if req.port == 0 {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            "port must be 1 to 65535",
        ));
    }
    let w = containers::inspect(&ctx.docker, &ctx.node_id, &req.worker_id).await?;
    if w.state != WorkerState::Running {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!("worker {} is {}, not running", req.worker_id, w.state),
        ));
    }
    let Some(ip) =
        w.ip.as_deref()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
    else {
        if w.network_policy == Some(crate::protocol::NetworkPolicy::None) {
            // Reaching into a worker with no network needs a relay inside
            // its namespace, which the agent does not have.
            return Err(ErrorBody::new(
                ErrorCode::Unsupported,
                format!(
                    "worker {} has network policy none: no address a tunnel can reach",
                    req.worker_id
                ),
            ));
        }
        return Err(ErrorBody::new(
            ErrorCode::HostUnreachable,
            format!(
                "worker {} has no address on a network of its own",
                req.worker_id
            ),
        ));
    };
    let addr = std::net::SocketAddr::new(ip, req.port);
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(ErrorBody::new(
            ErrorCode::ConnectionRefused,
            format!(
                "nothing listens on port {} of worker {}",
                req.port, req.worker_id
            ),
        )),
        Ok(Err(e)) => Err(ErrorBody::new(
            ErrorCode::HostUnreachable,
            format!("cannot reach worker {} at {addr}: {e}", req.worker_id),
        )),
        Err(_) => Err(ErrorBody::new(
            ErrorCode::HostUnreachable,
            format!(
                "worker {} did not answer at {addr} within {} s",
                req.worker_id,
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Worker to channel, within credit; the worker's half-close becomes
/// `channel_eof`.
async fn downstream(mut from: OwnedReadHalf, mut writer: ChannelWriter) -> Result<(), ErrorBody> {
    loop {
        let mut buf = BytesMut::with_capacity(MAX_FRAME_PAYLOAD);
        match from.read_buf(&mut buf).await {
            Ok(0) => {
                writer.eof();
                return Ok(());
            }
            Ok(_) => {
                if writer.write(StreamKind::Data, buf.freeze()).await.is_err() {
                    return Ok(()); // the channel is gone: nothing to report to
                }
            }
            Err(e) => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("the worker's connection failed: {e}"),
                ));
            }
        }
    }
}

/// Channel to worker; `channel_eof` becomes a half-close of the connection.
async fn upstream(mut reader: ChannelReader, mut to: OwnedWriteHalf) -> Result<(), ErrorBody> {
    while let Some(ev) = reader.recv().await {
        match ev {
            Inbound::Data(_, b) => {
                if let Err(e) = to.write_all(&b).await {
                    return Err(ErrorBody::new(
                        ErrorCode::Unavailable,
                        format!("the worker's connection failed: {e}"),
                    ));
                }
            }
            Inbound::Eof => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Inbound::Close(_) => return Ok(()),
        }
    }
    Ok(())
}
