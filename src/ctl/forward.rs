//! `tether ctl port-forward`: loopback listeners (by default) whose every
//! accepted connection becomes its own tunnel to a port of a worker,
//! through the server and the node's agent.

use super::resume::{Output, resumable, stdin_eof};
use super::ws::{End, open};
use super::{Client, CtlError};
use crate::protocol::StreamKind;
use crate::protocol::operator::parse_data_frame;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

/// One `[LOCAL_ADDR:]LOCAL_PORT:REMOTE_PORT` (or `:REMOTE_PORT`, or
/// `PORT` for the same port on both sides).
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub remote: u16,
}

fn port(s: &str, what: &str, zero_ok: bool) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) if !zero_ok => Err(format!("{what} port must be 1 to 65535, got 0")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{what} port must be 1 to 65535, got {s:?}")),
    }
}

impl std::str::FromStr for Forward {
    type Err = String;

    fn from_str(spec: &str) -> Result<Forward, String> {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let Some((local, remote)) = spec.rsplit_once(':') else {
            let p = port(spec, "the", false)?;
            return Ok(Forward {
                listen: SocketAddr::new(loopback, p),
                remote: p,
            });
        };
        let remote = port(remote, "the remote", false)?;
        let listen = if local.is_empty() {
            SocketAddr::new(loopback, 0) // a free port, printed
        } else if let Some((addr, p)) = local.rsplit_once(':') {
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            let ip = addr
                .parse::<IpAddr>()
                .map_err(|_| format!("{addr:?} is not an IP address"))?;
            SocketAddr::new(ip, port(p, "the local", true)?)
        } else {
            SocketAddr::new(loopback, port(local, "the local", true)?)
        };
        Ok(Forward { listen, remote })
    }
}

/// Listens on every forward's address until `stop`; each accepted
/// connection gets its own tunnel. A connection whose tunnel fails (the
/// port refuses, the worker is gone) is closed with a message; the others
/// and the listeners go on.
pub async fn port_forward(
    client: &Client,
    worker: &str,
    forwards: &[Forward],
    stop: CancellationToken,
) -> Result<(), CtlError> {
    // An unknown worker is an error at once, not at the first connection.
    client.inspect(worker).await?;
    let mut listeners = Vec::new();
    for f in forwards {
        let l = TcpListener::bind(f.listen)
            .await
            .map_err(|e| CtlError::Local(format!("cannot listen on {}: {e}", f.listen)))?;
        let local = l.local_addr().map_err(|e| CtlError::Local(e.to_string()))?;
        println!("Forwarding from {local} -> {}", f.remote);
        listeners.push((l, f.remote));
    }
    let tasks = tokio_util::task::TaskTracker::new();
    for (listener, remote) in listeners {
        let (client, worker, stop, conns) = (
            client.clone(),
            worker.to_string(),
            stop.clone(),
            tasks.clone(),
        );
        tasks.spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok((tcp, _)) => tcp,
                        Err(e) => {
                            eprintln!("tether: port-forward: accept: {e}");
                            continue;
                        }
                    },
                };
                let (client, worker, stop) = (client.clone(), worker.clone(), stop.clone());
                conns.spawn(async move {
                    tokio::select! {
                        r = carry(&client, &worker, remote, tcp) => if let Err(e) = r {
                            eprintln!("tether: port-forward to port {remote}: {e}");
                        },
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
    }
    stop.cancelled().await;
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// One local connection through one tunnel, both ways, half-closes passed
/// on; a lost connection to the server is re-attached without losing a
/// byte.
async fn carry(client: &Client, worker: &str, remote: u16, tcp: TcpStream) -> Result<(), CtlError> {
    let _ = tcp.set_nodelay(true);
    let path = format!("{}/tunnels/{remote}", super::worker_path(worker));
    let ws = open(client, &path, &[("acks", "true".to_string())]).await?;
    let (mut from_local, to_local) = tcp.into_split();
    let (input, mut input_rx) = tokio::sync::mpsc::channel::<WsMessage>(16);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_local.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = input.send(stdin_eof()).await;
                    return;
                }
                Ok(n) => {
                    let data = WsMessage::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if input.send(data).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut out = Local {
        w: to_local,
        shut: false,
    };
    let end = resumable(client, &path, ws, &mut input_rx, &mut out).await;
    reader.abort();
    match end? {
        End::Exit(_) => Ok(()),
        End::Error(e) => Err(CtlError::Api(e)),
    }
}

/// The local connection's writing half.
struct Local {
    w: tokio::net::tcp::OwnedWriteHalf,
    shut: bool,
}

impl Output for Local {
    async fn frame(&mut self, frame: &[u8]) -> Result<(), CtlError> {
        match parse_data_frame(frame) {
            Some((Some(StreamKind::Gap), _)) => Err(CtlError::Local(
                "bytes from the worker were lost (the node's spool was full)".into(),
            )),
            Some((_, data)) => self
                .w
                .write_all(data)
                .await
                .map_err(|e| CtlError::Local(format!("the local connection: {e}"))),
            None => Ok(()),
        }
    }

    async fn eof(&mut self) {
        if !std::mem::replace(&mut self.shut, true) {
            let _ = self.w.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs_read_like_kubectls() {
        let f = |s: &str| s.parse::<Forward>();
        let lo = |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p);
        assert_eq!(
            f("8080").unwrap(),
            Forward {
                listen: lo(8080),
                remote: 8080
            }
        );
        assert_eq!(
            f("9000:80").unwrap(),
            Forward {
                listen: lo(9000),
                remote: 80
            }
        );
        assert_eq!(
            f(":80").unwrap(),
            Forward {
                listen: lo(0),
                remote: 80
            }
        );
        assert_eq!(
            f("0.0.0.0:9000:80").unwrap().listen,
            "0.0.0.0:9000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            f("[::1]:9000:80").unwrap().listen,
            "[::1]:9000".parse::<SocketAddr>().unwrap()
        );
        for bad in ["0", "9000:0", "9000:70000", "x:80", "host:1:2", "", "80:"] {
            assert!(f(bad).is_err(), "{bad:?} accepted");
        }
    }
}
