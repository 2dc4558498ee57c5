//! Tunnel: one TCP connection from the node to a port of a worker, carried
//! by a channel. A host agent dials the worker's address on its own bridge
//! network. A worker with no address (network policy `none`), or an agent
//! in a container of its own network, goes through the worker's relay: a
//! sidecar of the agent's image in the worker's network namespace
//! (`docker::sidecar`), where each connection is one exec of
//! `tunnel-connect PORT` whose stdin and stdout carry the bytes through the
//! Docker API. Nothing is published, no network is joined, and the worker
//! gains no path to the node.

use super::{Ctx, accepted, close, refuse};
use crate::channel::{ChannelHandles, ChannelReader, ChannelWriter, Inbound};
use crate::docker::containers;
use crate::protocol::{ErrorBody, ErrorCode, MAX_FRAME_PAYLOAD, StreamKind, Tunnel, WorkerState};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

/// The two halves of a connection to the worker's port.
type ToWorker = Box<dyn AsyncWrite + Send + Unpin>;
type FromWorker = Box<dyn AsyncRead + Send + Unpin>;

/// Open tunnels by worker, so that removing a worker ends its tunnels
/// with a reason (a removed container's connections may never say so).
#[derive(Default)]
pub(crate) struct TunnelTable {
    by_worker: std::sync::Mutex<std::collections::HashMap<String, Vec<u32>>>,
    /// Held while a relay is looked up or made (one per worker).
    relays: tokio::sync::Mutex<()>,
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
    let (from_worker, to_worker) = match connect(ctx, &req).await {
        Ok(s) => s,
        Err(e) => return refuse(ctx, id, ch, e),
    };
    accepted(ctx, id, json!({}));
    let ChannelHandles {
        writer,
        reader,
        cancel,
    } = h;
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

/// Checks the worker and port, then connects: a dial, or through the relay.
async fn connect(ctx: &Ctx, req: &Tunnel) -> Result<(FromWorker, ToWorker), ErrorBody> {
    if req.port == 0 {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            "port must be 1 to 65535",
        ));
    }
    let w = containers::inspect(&ctx.engine.docker, &ctx.engine.node_id, &req.worker_id).await?;
    if w.state != WorkerState::Running {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!("worker {} is {}, not running", req.worker_id, w.state),
        ));
    }
    let ip =
        w.ip.as_deref()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    let no_network = w.network_policy == Some(crate::protocol::NetworkPolicy::None);
    if ctx.node.tunnel_relay || (ip.is_none() && no_network) {
        return relay(ctx, req, &w).await;
    }
    let Some(ip) = ip else {
        return Err(ErrorBody::new(
            ErrorCode::HostUnreachable,
            format!(
                "worker {} has no address on a network of its own",
                req.worker_id
            ),
        ));
    };
    let addr = std::net::SocketAddr::new(ip, req.port);
    let s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(refused(req));
        }
        Ok(Err(e)) => {
            return Err(ErrorBody::new(
                ErrorCode::HostUnreachable,
                format!("cannot reach worker {} at {addr}: {e}", req.worker_id),
            ));
        }
        Err(_) => {
            return Err(ErrorBody::new(
                ErrorCode::HostUnreachable,
                format!(
                    "worker {} did not answer at {addr} within {} s",
                    req.worker_id,
                    CONNECT_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    let _ = s.set_nodelay(true);
    let (r, w) = s.into_split();
    Ok((Box::new(r), Box::new(w)))
}

fn refused(req: &Tunnel) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::ConnectionRefused,
        format!(
            "nothing listens on port {} of worker {}",
            req.port, req.worker_id
        ),
    )
}

/// The worker's relay sidecar: the running one, or a new one.
async fn relay_container(ctx: &Ctx, w: &crate::protocol::WorkerInfo) -> Result<String, ErrorBody> {
    use crate::docker::sidecar::{self, Kind};
    let Some(image) = ctx.node.egress_image.as_deref() else {
        return Err(ErrorBody::new(
            ErrorCode::Unsupported,
            format!(
                "a tunnel into worker {} needs a relay of the agent's image, and this node has none (run the agent from its image, or give --egress-proxy-image)",
                w.worker_id
            ),
        ));
    };
    let _one = ctx.tunnels.relays.lock().await;
    match sidecar::find(
        &ctx.engine.docker,
        &ctx.engine.node_id,
        &w.worker_id,
        Kind::Relay,
    )
    .await?
    {
        Some(f)
            if f.running
                && f.labels.get(RELAY_FRAMING.0).map(String::as_str) == Some(RELAY_FRAMING.1)
                && !outlived(&f, &ctx.engine.docker, &w.container_id).await =>
        {
            return Ok(f.id);
        }
        // Stopped, made by an agent whose relay did not frame its output,
        // or left in the namespace of the worker before it restarted: made
        // again.
        Some(f) => sidecar::remove_id(&ctx.engine.docker, &f.id).await?,
        None => {}
    }
    let spec = sidecar::Spec {
        node_id: &ctx.engine.node_id,
        worker_id: &w.worker_id,
        network_mode: format!("container:{}", w.container_id),
        hostname: None,
        image,
        kind: Kind::Relay,
        cmd: vec!["idle".into()],
        mounts: vec![],
        labels: [(RELAY_FRAMING.0.to_string(), RELAY_FRAMING.1.to_string())].into(),
    };
    Ok(sidecar::start(&ctx.engine.docker, spec).await?)
}

/// Whether the worker started again after its relay did: a restarted
/// container gets a new network namespace from the engine, and a relay
/// that joined the old one reaches nothing (a deployment's service that
/// restarts by its policy, a worker restarted by hand).
async fn outlived(
    relay: &crate::docker::sidecar::Found,
    docker: &bollard::Docker,
    worker: &str,
) -> bool {
    let worker = crate::docker::containers::started_at(docker, worker).await;
    matches!((worker, relay.started_at), (Some(w), Some(r)) if w > r)
}

/// The label of a relay whose `tunnel-connect --framed` frames what the
/// worker sends (so its half-close can be told apart from the exec's end).
const RELAY_FRAMING: (&str, &str) = (crate::docker::labels::RELAY_FRAMING, "1");

/// One connection through the worker's relay: an exec of `tunnel-connect
/// --framed`, whose first byte says it connected (else its exit status says
/// why not). Then its stdout carries the worker's bytes in frames (a
/// 4-byte big-endian length, then the bytes); an empty frame is the
/// worker's half-close, which so reaches the client while the client's own
/// direction is still open.
async fn relay(
    ctx: &Ctx,
    req: &Tunnel,
    w: &crate::protocol::WorkerInfo,
) -> Result<(FromWorker, ToWorker), ErrorBody> {
    use crate::docker::exec;
    use bollard::container::LogOutput;
    let relay = relay_container(ctx, w).await?;
    let cmd = crate::protocol::Exec {
        worker_id: w.worker_id.clone(),
        cmd: vec![
            crate::docker::sidecar::AGENT_BIN.into(),
            "tunnel-connect".into(),
            "--framed".into(),
            req.port.to_string(),
        ],
        stdin: true,
        ..Default::default()
    };
    let exec_id = exec::create(&ctx.engine.docker, &relay, &cmd).await?;
    let started = exec::attach(&ctx.engine.docker, exec_id.clone(), false).await?;
    let mut output = started.output;
    let mut stderr = Vec::new();
    let first = tokio::time::timeout(CONNECT_TIMEOUT, async {
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdOut { message }) => return Ok(Some(message)),
                Ok(LogOutput::StdErr { message }) => stderr.extend_from_slice(&message),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    })
    .await;
    let first = match first {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            return Err(crate::docker::Error::engine(e, "tunnel relay").into());
        }
        Err(_) => {
            return Err(ErrorBody::new(
                ErrorCode::HostUnreachable,
                format!(
                    "port {} of worker {} did not answer within {} s",
                    req.port,
                    req.worker_id,
                    CONNECT_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    let Some(rest) = first.filter(|f| f.first() == Some(&0)) else {
        let code = exec::exit_code(&ctx.engine.docker, &exec_id).await.ok();
        if code == Some(i64::from(crate::cli::TUNNEL_REFUSED_EXIT)) {
            return Err(refused(req));
        }
        return Err(ErrorBody::new(
            ErrorCode::HostUnreachable,
            format!(
                "cannot reach port {} of worker {}: {}",
                req.port,
                req.worker_id,
                String::from_utf8_lossy(&stderr).trim()
            ),
        ));
    };
    let rest = rest.slice(1..);
    let data =
        futures_util::stream::iter((!rest.is_empty()).then_some(Ok::<Bytes, std::io::Error>(rest)))
            .chain(output.filter_map(|item| async move {
                match item {
                    Ok(LogOutput::StdOut { message }) => Some(Ok(message)),
                    Ok(_) => None,
                    Err(e) => Some(Err(std::io::Error::other(e))),
                }
            }));
    let framed = tokio_util::codec::FramedRead::new(
        tokio_util::io::StreamReader::new(Box::pin(data)),
        tokio_util::codec::LengthDelimitedCodec::new(),
    );
    // Up to the empty frame: the worker's half-close.
    let frames = framed
        .take_while(|f| std::future::ready(!matches!(f, Ok(b) if b.is_empty())))
        .map(|f| f.map(bytes::BytesMut::freeze));
    let reader = tokio_util::io::StreamReader::new(Box::pin(frames));
    Ok((Box::new(reader), Box::new(started.input)))
}

/// Worker to channel, within credit; the worker's half-close becomes
/// `channel_eof`.
async fn downstream(mut from: FromWorker, mut writer: ChannelWriter) -> Result<(), ErrorBody> {
    // One buffer, read into where the last read ended: what is sent (and
    // kept until acknowledged) shares its allocation, so a worker that
    // sends one byte at a time costs a byte a byte, not a fresh 64 KiB
    // buffer kept whole for each.
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(MAX_FRAME_PAYLOAD);
        match from.read_buf(&mut buf).await {
            Ok(0) => {
                writer.eof();
                return Ok(());
            }
            Ok(_) => {
                if writer
                    .write(StreamKind::Data, buf.split().freeze())
                    .await
                    .is_err()
                {
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
async fn upstream(mut reader: ChannelReader, mut to: ToWorker) -> Result<(), ErrorBody> {
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
